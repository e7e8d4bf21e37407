//! Leader election on a file (`--lease-file`), for operators without a Kubernetes API (the `dir:`
//! source): the leader is the process that holds an exclusive `flock(2)` on the file.
//!
//! The kernel ties the lock to the open file: a graceful stop releases it by closing the file,
//! and a process that dies any other way (SIGKILL, OOM) releases it as it dies. So there is no
//! lease duration to wait out: a standby, which tries the lock every [`POLL`], takes over within
//! that. Locks are per open file, so two operators in one process exclude each other too. The
//! holder writes its process id into the file, for people asking which one leads; the file must
//! stay in place (one that is replaced lets a new opener lock the new file), which the standby
//! checks after locking.

use std::{
    fs::File,
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

/// How often a standby tries the lock.
pub const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LeaseFileError {
    #[error("lease file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lock, held: this process leads until it is released or dropped.
#[derive(Debug)]
pub struct FileLease {
    /// Locked (`File::try_lock` is `flock(LOCK_EX | LOCK_NB)` on Linux); closing it unlocks.
    file: File,
    path: PathBuf,
}

impl FileLease {
    /// Waits until this process holds the lock on `path` (created if missing).
    pub async fn acquire(path: &Path) -> Result<FileLease, LeaseFileError> {
        let io = |source| LeaseFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut waiting = false;
        loop {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {
                    if !still_at(&file, path) {
                        // Locked a file that was renamed or removed meanwhile: whoever opens the
                        // path now gets another file, and would lead too.
                        continue;
                    }
                    // Only diagnostics: the lock is what elects.
                    let mut file = file;
                    let _ = file
                        .set_len(0)
                        .and_then(|()| writeln!(file, "{}", std::process::id()));
                    return Ok(FileLease {
                        file,
                        path: path.to_owned(),
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !waiting {
                        waiting = true;
                        tracing::info!(path = %path.display(), "another operator holds the lease file: standing by");
                    }
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Gives the lock up (as dropping does), so that a standby takes over at its next try.
    pub fn release(self) {
        if let Err(e) = self.file.unlock() {
            // Closing the file, just below, releases it anyway.
            tracing::warn!(path = %self.path.display(), error = %e, "unlocking the lease file");
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether `path` still names the file `file` has open.
fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_and_the_next_takes_over_when_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        let first = FileLease::acquire(&path).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        let mut second = Box::pin(FileLease::acquire(&path));
        assert!(
            tokio::time::timeout(POLL * 5, &mut second).await.is_err(),
            "a second holder while the first holds the lock"
        );
        first.release();
        let second = tokio::time::timeout(POLL * 5, second)
            .await
            .expect("the standby takes over within a few polls")
            .unwrap();
        // Dropping (a crash, as far as the lock is concerned) lets go too.
        let mut third = Box::pin(FileLease::acquire(&path));
        assert!(tokio::time::timeout(POLL * 3, &mut third).await.is_err());
        drop(second);
        tokio::time::timeout(POLL * 5, third).await.unwrap().unwrap();
    }
}
