//! A short temporary directory, removed on drop.

use std::path::{Path, PathBuf};

use crate::{io_err, Result};

/// A fresh directory `<tmp>/<prefix>.<pid>.<n>` removed (recursively) on drop,
/// unless `TMEM_ITEST_KEEP=1` is set (then its path is printed instead).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates the directory. Paths stay short so that Unix sockets fit.
    pub fn new(prefix: &str) -> Result<Self> {
        let keep = std::env::var_os("TMEM_ITEST_KEEP").is_some_and(|v| v == "1");
        Self::with_keep(prefix, keep)
    }

    pub(crate) fn with_keep(prefix: &str, keep: bool) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = base.join(format!("{prefix}.{}.{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(Self { path: p, keep }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(format!("creating {}", p.display()))(e)),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory on drop (printing its path), e.g. for logs after a failure.
    pub(crate) fn keep(&mut self) {
        self.keep = true;
    }

    /// A path inside the directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("tmem-itest: keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop() {
        let d = TempDir::with_keep("tmem-itest-t", false).unwrap();
        std::fs::write(d.join("x"), b"1").unwrap();
        let p = d.path().to_path_buf();
        assert!(p.join("x").is_file());
        drop(d);
        assert!(!p.exists());
    }
}
