//! Image identity: the `stat` figures that tell whether a cached export's image still
//! holds what the shared pool caches.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What identifies an image's content for the cache: device, inode, size and
/// modification time (with nanoseconds), as `fstat` reports them.
///
/// A change of any of them means someone other than the export may have rewritten the
/// image, so every cached page of it is suspect. (A write that keeps the size and lands
/// within the filesystem's timestamp granularity of the previous one can keep the same
/// mtime; nothing short of reading the image could notice that.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size` (bytes; 0 for block devices, whose size the export reads by seeking).
    pub size: u64,
    /// `st_mtime` (seconds).
    pub mtime_sec: i64,
    /// `st_mtime_nsec`.
    pub mtime_nsec: i64,
}

impl ImageIdentity {
    /// The identity in `meta`.
    pub fn of(meta: &Metadata) -> Self {
        ImageIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }

    /// Whether `other` is the same file (device and inode), whatever its content.
    pub fn same_file(&self, other: &ImageIdentity) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// What the path of an image names now, compared with the open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathState {
    /// The path still names the open file.
    Same,
    /// The path names another file, or nothing (the image was replaced or removed).
    Replaced,
    /// The path could not be inspected (e.g. a permission change); nothing is concluded.
    Unknown,
}

/// Compares what `path` names now with the open file `open`.
pub(crate) fn path_state(path: &Path, open: &ImageIdentity) -> PathState {
    match std::fs::metadata(path) {
        Ok(m) if ImageIdentity::of(&m).same_file(open) => PathState::Same,
        Ok(_) => PathState::Replaced,
        Err(e) if e.kind() == io::ErrorKind::NotFound => PathState::Replaced,
        Err(_) => PathState::Unknown,
    }
}

/// The result of checking (or invalidating) a cached export's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageCheck {
    /// The open image changed (size or mtime, other than by this export's own writes)
    /// since it was last recorded; its cached pages were dropped.
    pub changed: bool,
    /// The image's path names another file (or none) now. The export keeps serving the
    /// file it opened; re-create the export (or restart the daemon) to serve the new one.
    pub path_replaced: bool,
    /// Pages dropped from the shared pool (0 when nothing changed).
    pub pages_dropped: u64,
}
