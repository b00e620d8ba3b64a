//! Per-export request counters (lock-free atomics).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters for one export, shared by all its connections.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub(crate) connections: AtomicU64,
    pub(crate) live: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) trims: AtomicU64,
    pub(crate) write_zeroes: AtomicU64,
    pub(crate) caches: AtomicU64,
    pub(crate) block_status: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) hole_bytes_read: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// A point-in-time copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections that entered transmission on this export.
    pub connections: u64,
    /// Of those, the ones open now.
    pub live_connections: u64,
    /// READ requests.
    pub reads: u64,
    /// WRITE requests.
    pub writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// TRIM requests.
    pub trims: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// CACHE requests.
    pub caches: u64,
    /// BLOCK_STATUS requests.
    pub block_status: u64,
    /// Bytes returned by successful READs (holes included).
    pub bytes_read: u64,
    /// Bytes stored by successful WRITEs.
    pub bytes_written: u64,
    /// Bytes of successful READs sent as `OFFSET_HOLE` instead of data.
    pub hole_bytes_read: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

impl ExportStats {
    /// Copy all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections: self.connections.load(Relaxed),
            live_connections: self.live.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            trims: self.trims.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            caches: self.caches.load(Relaxed),
            block_status: self.block_status.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            hole_bytes_read: self.hole_bytes_read.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }

    pub(crate) fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}
