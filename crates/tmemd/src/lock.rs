//! The directory locks: an `flock` on `DIR/tmemd.lock` in the runtime directory, taken
//! before any stale socket is unlinked (as Cloud Hypervisor does), and one in the state
//! directory when it is another directory, so two daemons can never share either.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// File name of the lock inside the runtime (and state) directory.
pub const LOCK_FILE: &str = "tmemd.lock";

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened.
    #[error("Cannot open lock file {0}")]
    Open(PathBuf, #[source] io::Error),
    /// Another daemon holds the lock.
    #[error("Directory {0} is in use by another tmemd")]
    Busy(PathBuf),
    /// flock failed for another reason.
    #[error("Cannot lock {0}")]
    Lock(PathBuf, #[source] io::Error),
}

/// A held lock; released when dropped (the file stays).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir` without waiting.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| LockError::Open(path.clone(), e))?;
        // SAFETY: the fd is valid for the lifetime of `file`; flock has no memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                LockError::Busy(dir.to_owned())
            } else {
                LockError::Lock(path, e)
            });
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = DirLock::acquire(d.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(d.path()),
            Err(LockError::Busy(_))
        ));
        drop(a);
        DirLock::acquire(d.path()).unwrap();
    }
}
