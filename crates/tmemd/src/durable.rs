//! Durable pool memory: the persistent pools' slabs in files under the runtime directory
//! (`RUNTIME_DIR/pool/gen-N/`), which outlive the daemon (a SIGKILL, an OOM kill, a panic)
//! but not a reboot (`/run` is a tmpfs), exactly like the guests whose swap they hold.
//!
//! Each start of the daemon writes a new generation. After an unclean stop the previous
//! generations are read back ([`tmem_core::Engine::recover`]) into the new one and then
//! deleted; after a clean stop the saved streams are authoritative and old generations
//! are simply deleted. A generation is also deleted at a clean stop once everything was
//! saved.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

use tmem_core::{DurableFile, DurableMemory, REGION_BYTES};

/// Subdirectory of the runtime directory that holds the generations.
pub const POOL_DIR: &str = "pool";

/// Durable memory in the files of one generation directory.
#[derive(Debug)]
pub struct DirMemory {
    dir: PathBuf,
    files: Mutex<HashMap<DurableFile, File>>,
}

impl DirMemory {
    /// Opens (creating it if needed) a generation directory.
    pub fn open(dir: &Path) -> std::io::Result<DirMemory> {
        std::fs::create_dir_all(dir)?;
        Ok(DirMemory {
            dir: dir.to_owned(),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, f: DurableFile) -> PathBuf {
        self.dir.join(format!("a{}-c{}.pool", f.arena, f.class))
    }
}

impl DurableMemory for DirMemory {
    fn map(&self, file: DurableFile, window: u32) -> Option<NonNull<u8>> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let f = match files.entry(file) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(self.path(file));
                match f {
                    Ok(f) => v.insert(f),
                    Err(e) => {
                        tracing::error!(file = %self.path(file).display(), error = %e, "cannot open durable pool file");
                        return None;
                    }
                }
            }
        };
        let end = (u64::from(window) + 1) * REGION_BYTES as u64;
        let grown = f.metadata().and_then(|m| {
            if m.len() < end {
                f.set_len(end)
            } else {
                Ok(())
            }
        });
        if let Err(e) = grown {
            tracing::error!(error = %e, "cannot grow durable pool file");
            return None;
        }
        // SAFETY: a shared mapping of our own file at a window boundary; the engine is the
        // only user of the mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                (u64::from(window) * REGION_BYTES as u64) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::error!(error = %std::io::Error::last_os_error(), "cannot map durable pool window");
            return None;
        }
        NonNull::new(p as *mut u8)
    }

    fn unmap(&self, _file: DurableFile, _window: u32, ptr: NonNull<u8>) {
        // SAFETY: a window this object mapped, no longer used by the engine.
        unsafe {
            libc::munmap(ptr.as_ptr() as *mut libc::c_void, REGION_BYTES);
        }
    }

    fn files(&self) -> Vec<(DurableFile, u32)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((a, c)) = name
                .strip_prefix('a')
                .and_then(|r| r.strip_suffix(".pool"))
                .and_then(|r| r.split_once("-c"))
            else {
                continue;
            };
            let (Ok(arena), Ok(class)) = (a.parse(), c.parse()) else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            v.push((
                DurableFile { arena, class },
                meta.len().div_ceil(REGION_BYTES as u64) as u32,
            ));
        }
        v
    }
}

/// The generation directories under `root`, oldest first.
pub fn generations(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("gen-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The directory of generation `n`.
pub fn generation_dir(root: &Path, n: u64) -> PathBuf {
    root.join(format!("gen-{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_listed_in_order() {
        let t = tempfile::tempdir().unwrap();
        for n in [3u64, 1, 12] {
            std::fs::create_dir_all(generation_dir(t.path(), n)).unwrap();
        }
        std::fs::create_dir_all(t.path().join("other")).unwrap();
        let g: Vec<u64> = generations(t.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(g, vec![1, 3, 12]);
    }

    #[test]
    fn windows_map_files_and_list_them() {
        let t = tempfile::tempdir().unwrap();
        let m = DirMemory::open(&t.path().join("gen-1")).unwrap();
        let f = DurableFile { arena: 1, class: 7 };
        let p = m.map(f, 2).unwrap();
        // SAFETY: a mapped window of REGION_BYTES.
        unsafe { *p.as_ptr() = 42 };
        m.unmap(f, 2, p);
        assert_eq!(m.files(), vec![(f, 3)]);
        let p = m.map(f, 2).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *p.as_ptr() }, 42);
        m.discard(p, REGION_BYTES);
        // SAFETY: as above.
        assert_eq!(unsafe { *p.as_ptr() }, 0);
        m.unmap(f, 2, p);
    }
}
