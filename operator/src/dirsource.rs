//! The `dir:PATH` source of truth: a directory of manifests (the files `plan` reads), watched by
//! polling.
//!
//! Whenever a file's name, size or modification time changes, the whole directory is read again
//! and diffed against the last good reading ([`Manifests::changes_to`]); only the differences go
//! to the engine. A directory that does not parse is logged (with the file and document) and
//! ignored as a whole: the last good state stays, never half of an edit.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;

use crate::{live::SourceEvent, manifests::Manifests};

/// The names, sizes and modification times of the directory's manifest files.
type Stamp = Vec<(PathBuf, u64, SystemTime)>;

fn stamp(dir: &Path) -> std::io::Result<Stamp> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.is_file()
        {
            files.push((
                path,
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
    }
    files.sort();
    Ok(files)
}

/// Watches `dir` until the engine goes away. Nothing else ends it: a directory that cannot be
/// listed or read is logged and read again at the next poll.
pub async fn run(dir: PathBuf, poll: Duration, sources: mpsc::Sender<SourceEvent>) {
    let mut good = Manifests::default();
    let mut seen: Option<Stamp> = None;
    let mut synced = false;
    loop {
        match stamp(&dir) {
            Err(e) => tracing::error!(dir = %dir.display(), error = %e, "cannot list the manifest directory"),
            Ok(s) if seen.as_ref() == Some(&s) => {}
            Ok(s) => {
                seen = Some(s);
                match crate::manifests::read_dir(&dir) {
                    Err(e) => {
                        tracing::error!(error = %e, "manifests not applied; keeping the last good state")
                    }
                    Ok(next) => {
                        for ignored in &next.ignored {
                            tracing::debug!(%ignored, "ignoring");
                        }
                        let changes = good.changes_to(&next);
                        // A file rewritten as it was (a `touch`, an editor's save) is no change.
                        if changes.is_empty() && next.service_cidrs == good.service_cidrs {
                            tracing::debug!(dir = %dir.display(), "manifests read: nothing changed");
                        } else {
                            tracing::info!(changes = changes.len(), dir = %dir.display(), "manifests read");
                        }
                        for change in changes {
                            if sources.send(SourceEvent::Change(Box::new(change))).await.is_err() {
                                return;
                            }
                        }
                        if next.service_cidrs != good.service_cidrs
                            && sources
                                .send(SourceEvent::ServiceCidrs(next.service_cidrs.clone()))
                                .await
                                .is_err()
                        {
                            return;
                        }
                        good = next;
                        if !synced {
                            synced = true;
                            if sources.send(SourceEvent::Synced).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(poll).await;
        if sources.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Change;

    const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default, uid: u-a, labels: {app: a}}
spec: {nodeName: n1}
status: {phase: Running, podIPs: [{ip: 10.244.1.10}]}
";

    /// What the source sent since the last call.
    fn sent(rx: &mut mpsc::Receiver<SourceEvent>) -> Vec<SourceEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_directory_sends_nothing_however_often_it_is_polled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        std::fs::write(&file, CLUSTER).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let poll = Duration::from_millis(10);
        let source = tokio::spawn(run(dir.path().to_owned(), poll, tx));
        tokio::time::sleep(poll * 5).await;
        let first = sent(&mut rx);
        assert_eq!(first.len(), 3, "a node, a pod and Synced: {first:?}");
        assert_eq!(first.last(), Some(&SourceEvent::Synced));

        // A thousand polls of the same directory.
        tokio::time::sleep(poll * 1000).await;
        assert_eq!(sent(&mut rx), vec![]);

        // The file written again as it was: read again (its time changed), but no change.
        let stamped = stamp(dir.path()).unwrap();
        while stamp(dir.path()).unwrap() == stamped {
            std::thread::sleep(Duration::from_millis(5));
            std::fs::write(&file, CLUSTER).unwrap();
        }
        tokio::time::sleep(poll * 100).await;
        assert_eq!(sent(&mut rx), vec![]);

        // One label changed: that pod and nothing else.
        std::fs::write(&file, CLUSTER.replace("app: a}", "app: changed}")).unwrap();
        tokio::time::sleep(poll * 100).await;
        let changed = sent(&mut rx);
        assert!(
            matches!(&changed[..], [SourceEvent::Change(c)] if matches!(&**c, Change::UpsertPod(p) if p.labels["app"] == "changed")),
            "{changed:?}"
        );
        source.abort();
    }
}
