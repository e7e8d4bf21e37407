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

/// Watches `dir` until the engine goes away.
pub async fn run(dir: PathBuf, poll: Duration, sources: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
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
                        tracing::info!(changes = changes.len(), dir = %dir.display(), "manifests read");
                        for change in changes {
                            if sources.send(SourceEvent::Change(Box::new(change))).await.is_err() {
                                return Ok(());
                            }
                        }
                        if next.service_cidrs != good.service_cidrs
                            && sources
                                .send(SourceEvent::ServiceCidrs(next.service_cidrs.clone()))
                                .await
                                .is_err()
                        {
                            return Ok(());
                        }
                        good = next;
                        if !synced {
                            synced = true;
                            if sources.send(SourceEvent::Synced).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(poll).await;
        if sources.is_closed() {
            return Ok(());
        }
    }
}
