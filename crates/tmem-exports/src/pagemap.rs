//! The page map of a swap export: `SPILL_PATH.map`, one little-endian `u64` per page after a
//! 64-byte header, saying where the page's content is — so that after the daemon dies
//! (SIGKILL, OOM kill, panic) a restart can tell which pages it can still serve.
//!
//! | entry | meaning |
//! | --- | --- |
//! | `0` | the header's default: zero (never written, trimmed), or *lost* in a map made after an unclean stop without a usable map |
//! | `1` | held in memory only (lost if the daemon dies) |
//! | `2` | zero (explicit, for maps whose default is *lost*) |
//! | `3` | lost: content unknown, reads fail with EIO until the page is rewritten |
//! | `1 << 63 \| h` | in the spill file, whose copy hashes (xxh3, 63 bits) to `h` |
//! | `1 << 62 \| h` | in the remote tier (replicated), whose copy hashes (xxh3, 62 bits) to `h` |
//! | `1 << 61 \| o << 30 \| n` | in the spill file, being overwritten in place: its copy hashes (the low 30 bits of xxh3) to `o` (the old content) or `n` (the new) |
//! | `1 << 60 \| o << 30 \| n` | in the remote tier, being overwritten in place: its copy hashes (the low 30 bits of xxh3) to `o` or `n` |
//!
//! Releases before the remote tier read a `1 << 62` entry as an unknown value, i.e. lost:
//! going back to one poisons remote pages rather than serving anything else.
//!
//! Every entry is written with `pwrite` under the page's lock, after the data operation it
//! describes and before the request is acknowledged: a daemon that dies between the two
//! leaves the older entry, which is either still true or *weaker* (in memory, or a spill
//! hash the new content does not match) — never a claim that a page is zero or intact when
//! it is not. The writes that change a copy in place — a page in the spill file or the
//! remote tier rewritten while the pool refuses it — first record both contents' hashes
//! (`1 << 61`, `1 << 60`), so a daemon that dies during one leaves a copy that matches one
//! of them: the old content or the new. A write that completed in the kernel survives the death of the process, so a
//! SIGKILL loses no entry; FLUSH `fdatasync`s the map with the spill file.
//!
//! If an entry cannot be written the map is deleted and not written again: a later restart
//! without a map trusts nothing after an unclean stop (every page is lost) and rebuilds the
//! map from the pool and the spill file after a clean one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::sys;

const MAGIC: &[u8; 8] = b"TMEMPMAP";
const VERSION: u32 = 1;
/// Bytes before entry 0.
const HEADER: u64 = 64;
/// Header flag: entry 0 means *lost* (not zero).
const DEFAULT_LOST: u32 = 1;

const E_DEFAULT: u64 = 0;
const E_MEM: u64 = 1;
const E_ZERO: u64 = 2;
const E_LOST: u64 = 3;
const SPILL_BIT: u64 = 1 << 63;
const REMOTE_BIT: u64 = 1 << 62;
const PENDING_BIT: u64 = 1 << 61;
const REMOTE_PENDING_BIT: u64 = 1 << 60;
/// Bits of each hash a pending entry keeps.
const HALF: u64 = (1 << 30) - 1;

/// What the map says about a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Reads as zero.
    Zero,
    /// Held in the pool (memory) only.
    Mem,
    /// Content unknown.
    Lost,
    /// In the spill file; the copy's [`spill_hash`].
    Spill(u64),
    /// In the remote tier; the copy's [`remote_hash`].
    Remote(u64),
    /// In the spill file while it is overwritten in place: the copy's [`spill_hash`] matches
    /// `old` or `new` in its low 30 bits (see [`Entry::pending`]).
    SpillPending {
        /// The low 30 bits of the old copy's hash.
        old: u64,
        /// The low 30 bits of the new copy's hash.
        new: u64,
    },
    /// In the remote tier while it is overwritten in place: the copy's [`remote_hash`]
    /// matches `old` or `new` in its low 30 bits (see [`Entry::remote_pending`]).
    RemotePending {
        /// The low 30 bits of the old copy's hash.
        old: u64,
        /// The low 30 bits of the new copy's hash.
        new: u64,
    },
}

impl Entry {
    /// The entry of a spill copy with hash `old` being overwritten by content of hash `new`.
    pub(crate) fn pending(old: u64, new: u64) -> Entry {
        Entry::SpillPending {
            old: old & HALF,
            new: new & HALF,
        }
    }

    /// The entry of a remote copy with hash `old` being overwritten by content of hash `new`.
    pub(crate) fn remote_pending(old: u64, new: u64) -> Entry {
        Entry::RemotePending {
            old: old & HALF,
            new: new & HALF,
        }
    }

    /// Whether a remote copy whose [`remote_hash`] is `h` is one this entry describes.
    pub(crate) fn remote_matches(&self, h: u64) -> bool {
        match *self {
            Entry::Remote(e) => e == h,
            Entry::RemotePending { old, new } => h & HALF == old || h & HALF == new,
            _ => false,
        }
    }

    /// Whether a spill copy whose [`spill_hash`] is `h` is one this entry describes.
    pub(crate) fn spill_matches(&self, h: u64) -> bool {
        match *self {
            Entry::Spill(e) => e == h,
            Entry::SpillPending { old, new } => h & HALF == old || h & HALF == new,
            _ => false,
        }
    }
}

/// The 63-bit hash a spilled page's entry records.
pub(crate) fn spill_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data) & !SPILL_BIT
}

/// The 62-bit hash a remote page's entry records.
pub(crate) fn remote_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data) & (REMOTE_BIT - 1)
}

fn entry_path(spill: &Path) -> PathBuf {
    let mut p = spill.as_os_str().to_owned();
    p.push(".map");
    PathBuf::from(p)
}

/// An open page map.
pub(crate) struct PageMap {
    path: PathBuf,
    file: File,
    default_lost: bool,
    dirty: AtomicBool,
    disabled: AtomicBool,
}

impl PageMap {
    /// The map file of the spill file at `spill`.
    pub(crate) fn path_for(spill: &Path) -> PathBuf {
        entry_path(spill)
    }

    /// Creates (truncating) a map of `pages` pages, all at the default: zero, or lost if
    /// `default_lost`.
    pub(crate) fn create(spill: &Path, pages: u64, default_lost: bool) -> io::Result<PageMap> {
        let path = entry_path(spill);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if default_lost { DEFAULT_LOST } else { 0 };
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&pages.to_le_bytes());
        file.write_all_at(&h, 0)?;
        file.set_len(HEADER + pages * 8)?;
        file.sync_all()?;
        Ok(PageMap {
            path,
            file,
            default_lost,
            dirty: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
        })
    }

    /// Opens an existing map of `pages` pages; `Ok(None)` if there is none or it is not
    /// usable (bad magic, version or page count).
    pub(crate) fn open(spill: &Path, pages: u64) -> io::Result<Option<PageMap>> {
        let path = entry_path(spill);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut h = [0u8; HEADER as usize];
        if sys::pread_full(&file, &mut h, 0)? != h.len() {
            return Ok(None);
        }
        let word = |r: std::ops::Range<usize>| -> u64 {
            h[r].iter()
                .rev()
                .fold(0u64, |a, &b| (a << 8) | u64::from(b))
        };
        let (version, flags, n) = (word(8..12), word(12..16), word(16..24));
        let len = file.metadata()?.len();
        if &h[..8] != MAGIC || version != u64::from(VERSION) || n != pages {
            return Ok(None);
        }
        if len < HEADER + pages * 8 {
            file.set_len(HEADER + pages * 8)?;
        }
        Ok(Some(PageMap {
            path,
            file,
            default_lost: flags & u64::from(DEFAULT_LOST) != 0,
            dirty: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
        }))
    }

    /// What entry 0 means: lost (`true`) or zero.
    pub(crate) fn default_lost(&self) -> bool {
        self.default_lost
    }

    /// Whether the map was given up after a write error (nothing more is recorded).
    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled.load(Relaxed)
    }

    fn decode(&self, v: u64) -> Entry {
        match v {
            E_DEFAULT if self.default_lost => Entry::Lost,
            E_DEFAULT | E_ZERO => Entry::Zero,
            E_MEM => Entry::Mem,
            v if v & SPILL_BIT != 0 => Entry::Spill(v & !SPILL_BIT),
            v if v & REMOTE_BIT != 0 => Entry::Remote(v & (REMOTE_BIT - 1)),
            v if v & PENDING_BIT != 0 => Entry::SpillPending {
                old: (v >> 30) & HALF,
                new: v & HALF,
            },
            v if v & REMOTE_PENDING_BIT != 0 => Entry::RemotePending {
                old: (v >> 30) & HALF,
                new: v & HALF,
            },
            // E_LOST, and anything unknown: trust nothing.
            _ => Entry::Lost,
        }
    }

    fn encode(&self, e: Entry) -> u64 {
        match e {
            Entry::Zero if self.default_lost => E_ZERO,
            Entry::Zero => E_DEFAULT,
            Entry::Mem => E_MEM,
            Entry::Lost => E_LOST,
            Entry::Spill(h) => SPILL_BIT | (h & !SPILL_BIT),
            Entry::Remote(h) => REMOTE_BIT | (h & (REMOTE_BIT - 1)),
            Entry::SpillPending { old, new } => PENDING_BIT | (old & HALF) << 30 | (new & HALF),
            Entry::RemotePending { old, new } => {
                REMOTE_PENDING_BIT | (old & HALF) << 30 | (new & HALF)
            }
        }
    }

    /// Every page whose entry is not the default, in page order.
    pub(crate) fn entries(&self, pages: u64) -> io::Result<Vec<(u32, Entry)>> {
        let end = HEADER + pages * 8;
        let mut out = Vec::new();
        let mut regions = Vec::new();
        match sys::seek(&self.file, HEADER, true) {
            Ok(first) => {
                let mut data = first;
                while let Some(d) = data.filter(|&d| d < end) {
                    let hole = sys::seek(&self.file, d, false)?.unwrap_or(end).min(end);
                    regions.push((d.max(HEADER), hole));
                    data = sys::seek(&self.file, hole, true)?;
                }
            }
            Err(_) => regions.push((HEADER, end)),
        }
        let mut buf = vec![0u8; 1 << 20];
        for (start, stop) in regions {
            // Align to entries.
            let mut off = HEADER + (start - HEADER) / 8 * 8;
            while off < stop {
                let n = ((stop - off) as usize).min(buf.len()).div_ceil(8) * 8;
                let got = sys::pread_full(&self.file, &mut buf[..n], off)?;
                for (i, e) in buf[..got - got % 8].chunks_exact(8).enumerate() {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(e);
                    let v = u64::from_le_bytes(w);
                    let page = (off - HEADER) / 8 + i as u64;
                    if v != E_DEFAULT && page < pages {
                        out.push((page as u32, self.decode(v)));
                    }
                }
                if got < n {
                    break;
                }
                off += n as u64;
            }
        }
        Ok(out)
    }

    /// The entry recorded for `page`.
    pub(crate) fn get(&self, page: u32) -> io::Result<Entry> {
        let mut v = [0u8; 8];
        self.file
            .read_exact_at(&mut v, HEADER + u64::from(page) * 8)?;
        Ok(self.decode(u64::from_le_bytes(v)))
    }

    /// Records `e` for `page`. On an error the map is deleted and disabled (see the module
    /// documentation) and the error returned for the caller to count and log.
    pub(crate) fn set(&self, page: u32, e: Entry) -> io::Result<()> {
        if self.is_disabled() {
            return Ok(());
        }
        let v = self.encode(e).to_le_bytes();
        match self.file.write_all_at(&v, HEADER + u64::from(page) * 8) {
            Ok(()) => {
                self.dirty.store(true, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.disable();
                Err(e)
            }
        }
    }

    /// Stops recording and deletes the file, so that nothing trusts a map that missed a write.
    pub(crate) fn disable(&self) {
        if !self.disabled.swap(true, Relaxed) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::error!(map = %self.path.display(), error = %e, "cannot delete the page map after a write error; a restart may trust it");
            }
        }
    }

    /// `fdatasync`s the map if it was written since the last sync.
    pub(crate) fn sync(&self) -> io::Result<()> {
        if self.is_disabled() || !self.dirty.swap(false, Relaxed) {
            return Ok(());
        }
        self.file.sync_data().inspect_err(|_| {
            self.dirty.store(true, Relaxed);
        })
    }

    /// Deletes the file (the export is destroyed).
    pub(crate) fn remove(&self) -> io::Result<()> {
        self.disabled.store(true, Relaxed);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_roundtrip_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let spill = d.path().join("x.spill");
        let pages = 300_000;
        let m = PageMap::create(&spill, pages, false).unwrap();
        assert!(m.entries(pages).unwrap().is_empty());
        m.set(0, Entry::Mem).unwrap();
        m.set(7, Entry::Spill(spill_hash(&[1u8; 4096]))).unwrap();
        m.set(299_999, Entry::Lost).unwrap();
        m.set(8, Entry::Mem).unwrap();
        m.set(8, Entry::Zero).unwrap();
        drop(m);
        let m = PageMap::open(&spill, pages).unwrap().expect("valid map");
        assert!(!m.default_lost());
        assert_eq!(
            m.entries(pages).unwrap(),
            vec![
                (0, Entry::Mem),
                (7, Entry::Spill(spill_hash(&[1u8; 4096]))),
                (299_999, Entry::Lost)
            ]
        );
        // Another size: not this export's map.
        assert!(PageMap::open(&spill, pages + 1).unwrap().is_none());
        // Default lost: zero is explicit.
        let m = PageMap::create(&spill, 16, true).unwrap();
        m.set(3, Entry::Zero).unwrap();
        drop(m);
        let m = PageMap::open(&spill, 16).unwrap().unwrap();
        assert!(m.default_lost());
        assert_eq!(m.entries(16).unwrap(), vec![(3, Entry::Zero)]);
        m.remove().unwrap();
        assert!(PageMap::open(&spill, 16).unwrap().is_none());
    }

    #[test]
    fn pending_entries_accept_either_copy_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let spill = d.path().join("p.spill");
        let m = PageMap::create(&spill, 8, false).unwrap();
        let (a, b, c) = (
            spill_hash(&[1u8; 4096]),
            spill_hash(&[2u8; 4096]),
            spill_hash(&[3u8; 4096]),
        );
        m.set(5, Entry::Spill(a)).unwrap();
        assert_eq!(m.get(5).unwrap(), Entry::Spill(a));
        m.set(5, Entry::pending(a, b)).unwrap();
        drop(m);
        let m = PageMap::open(&spill, 8).unwrap().unwrap();
        let e = m.get(5).unwrap();
        assert_eq!(e, Entry::pending(a, b));
        assert_eq!(m.entries(8).unwrap(), vec![(5, e)]);
        assert!(e.spill_matches(a) && e.spill_matches(b) && !e.spill_matches(c));
        assert!(Entry::Spill(a).spill_matches(a) && !Entry::Spill(a).spill_matches(b));
        assert!(!Entry::Mem.spill_matches(a));
        assert_eq!(m.get(6).unwrap(), Entry::Zero);
        let (ra, rb, rc) = (
            remote_hash(&[1u8; 4096]),
            remote_hash(&[2u8; 4096]),
            remote_hash(&[3u8; 4096]),
        );
        m.set(6, Entry::remote_pending(ra, rb)).unwrap();
        let e = m.get(6).unwrap();
        assert_eq!(e, Entry::remote_pending(ra, rb));
        assert!(e.remote_matches(ra) && e.remote_matches(rb) && !e.remote_matches(rc));
        assert!(!e.spill_matches(a) && !Entry::Spill(ra).remote_matches(ra));
        assert!(Entry::Remote(ra).remote_matches(ra) && !Entry::Remote(ra).remote_matches(rb));
    }

    #[test]
    fn garbage_is_not_a_map() {
        let d = tempfile::tempdir().unwrap();
        let spill = d.path().join("y.spill");
        std::fs::write(PageMap::path_for(&spill), b"not a map").unwrap();
        assert!(PageMap::open(&spill, 4).unwrap().is_none());
    }
}
