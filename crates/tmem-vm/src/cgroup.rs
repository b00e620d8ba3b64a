//! A memory cgroup for QEMU processes (cgroup v2, or the v1 memory hierarchy).
//!
//! Hosts differ: a pure cgroup v2 host has the memory controller at
//! `/sys/fs/cgroup`; a hybrid host (like the project's machines) has only
//! `hugetlb` in `/sys/fs/cgroup/unified` and the memory controller in the v1
//! hierarchy `/sys/fs/cgroup/memory`. [`MemCgroup`] hides the difference.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{io_err, Error, Result};

const V2_ROOTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
const V1_ROOT: &str = "/sys/fs/cgroup/memory";

/// A memory cgroup directory created by us and removed on drop.
///
/// Pass [`MemCgroup::path`] to [`crate::GuestConfig::cgroup`].
#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    /// Creates `<memory hierarchy>/<name>`, optionally with a memory limit.
    pub fn create(name: &str, limit_bytes: Option<u64>) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::Invalid(format!("cgroup name {name:?}")));
        }
        let (root, v2) = Self::memory_root()?;
        if v2 {
            // Make the controller available to children (may already be).
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        let dir = root.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("creating cgroup {}", dir.display()))(e)),
        }
        let cg = Self { dir, v2 };
        if let Some(l) = limit_bytes {
            cg.set_limit(l)?;
        }
        Ok(cg)
    }

    /// Finds the hierarchy with the memory controller.
    fn memory_root() -> Result<(PathBuf, bool)> {
        for r in V2_ROOTS {
            let ctl = Path::new(r).join("cgroup.controllers");
            if std::fs::read_to_string(&ctl)
                .map(|c| c.split_whitespace().any(|w| w == "memory"))
                .unwrap_or(false)
            {
                return Ok((PathBuf::from(r), true));
            }
        }
        let v1 = Path::new(V1_ROOT);
        if v1.join("memory.limit_in_bytes").exists() {
            return Ok((v1.to_path_buf(), false));
        }
        Err(Error::Missing {
            what: "a memory cgroup hierarchy".into(),
            detail: format!("neither cgroup v2 with the memory controller nor {V1_ROOT}"),
        })
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// True on cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    fn file(&self, v2: &str, v1: &str) -> PathBuf {
        self.dir.join(if self.v2 { v2 } else { v1 })
    }

    /// Sets the memory limit (`memory.max` / `memory.limit_in_bytes`).
    pub fn set_limit(&self, bytes: u64) -> Result<()> {
        let f = self.file("memory.max", "memory.limit_in_bytes");
        std::fs::write(&f, bytes.to_string()).map_err(io_err(format!("writing {}", f.display())))
    }

    /// Current memory usage (`memory.current` / `memory.usage_in_bytes`).
    pub fn usage(&self) -> Result<u64> {
        let f = self.file("memory.current", "memory.usage_in_bytes");
        let s = std::fs::read_to_string(&f).map_err(io_err(format!("reading {}", f.display())))?;
        s.trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("{}: {s:?}", f.display())))
    }

    /// Processes the cgroup's OOM killer has killed so far (`oom_kill` in
    /// `memory.events` / `memory.oom_control`); 0 where the kernel does not count them.
    pub fn oom_kills(&self) -> u64 {
        let f = self.file("memory.events", "memory.oom_control");
        std::fs::read_to_string(f)
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|v| v.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// The PIDs in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let f = self.dir.join("cgroup.procs");
        let s = std::fs::read_to_string(&f).map_err(io_err(format!("reading {}", f.display())))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Killed processes take a moment to leave; rmdir fails with EBUSY until then.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
