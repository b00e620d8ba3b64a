//! Consumer-side traits the server needs from a block store.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::peer::Peer;
use crate::proto;

/// What a backend supports; turned into NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendCaps {
    /// Export is read-only (WRITE/TRIM/WRITE_ZEROES fail with `EPERM`).
    pub read_only: bool,
    /// `trim` does something useful (advertise `SEND_TRIM`).
    pub can_trim: bool,
    /// `write_zeroes` is implemented (advertise `SEND_WRITE_ZEROES`).
    pub can_write_zeroes: bool,
    /// `write_zeroes(.., fast_only = true)` answers quickly (advertise `SEND_FAST_ZERO`).
    pub can_fast_zero: bool,
    /// `cache` is implemented (advertise `SEND_CACHE`).
    pub can_cache: bool,
    /// `flush` and FUA make data visible to every connection (advertise `CAN_MULTI_CONN`).
    pub multi_conn_safe: bool,
    /// `block_status` returns meaningful hole/zero information (offer `base:allocation`).
    pub can_block_status: bool,
}

impl Default for BackendCaps {
    /// Default: writable, every optional feature off.
    fn default() -> Self {
        Self {
            read_only: false,
            can_trim: false,
            can_write_zeroes: false,
            can_fast_zero: false,
            can_cache: false,
            multi_conn_safe: false,
            can_block_status: false,
        }
    }
}

/// Errors a backend may return; each maps to exactly one NBD errno.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The range lies (partly) outside the export.
    #[error("Range {offset}+{len} outside export")]
    OutOfRange {
        /// Start of the rejected range, in bytes.
        offset: u64,
        /// Length of the rejected range, in bytes.
        len: u64,
    },
    /// The export cannot be modified.
    #[error("Export is read-only")]
    ReadOnly,
    /// The store is full.
    #[error("No space left in store")]
    NoSpace,
    /// The operation is not implemented by this backend.
    #[error("Operation not supported")]
    Unsupported,
    /// A fast-only zero request could not be served quickly.
    #[error("Zeroing would not be fast")]
    NotFast,
    /// The request is invalid for this backend (e.g. misaligned).
    #[error("Invalid request: {0}")]
    Invalid(&'static str),
    /// The backend is shutting down.
    #[error("Backend is shutting down")]
    ShuttingDown,
    /// Underlying I/O failure.
    #[error("I/O failure")]
    Io(#[source] std::io::Error),
}

impl BackendError {
    /// The NBD error value sent to the client. Exhaustive on purpose: a new variant
    /// must decide its errno.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Self::OutOfRange { .. } => proto::EINVAL,
            Self::ReadOnly => proto::EPERM,
            Self::NoSpace => proto::ENOSPC,
            Self::Unsupported => proto::EINVAL,
            Self::NotFast => proto::ENOTSUP,
            Self::Invalid(_) => proto::EINVAL,
            Self::ShuttingDown => proto::ESHUTDOWN,
            Self::Io(_) => proto::EIO,
        }
    }
}

/// Sub-ranges of a read buffer that are known to read as zero.
///
/// Ranges are `(start, len)` in bytes relative to the start of the buffer, sorted, non-overlapping.
/// Bytes inside a reported range MAY be left unwritten by the backend: the server either sends them
/// as `OFFSET_HOLE` chunks or zero-fills them itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZeroRanges {
    ranges: Vec<(usize, usize)>,
}

impl ZeroRanges {
    /// No zero ranges (all bytes were written by the backend). Does not allocate.
    pub const fn none() -> Self {
        Self { ranges: Vec::new() }
    }

    /// Append a zero range; must start at or after the end of the previous one. Adjacent ranges merge.
    /// Out-of-order or empty ranges are ignored.
    pub fn push(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            let end = last.0 + last.1;
            if start == end {
                last.1 += len;
                return;
            }
            if start < end {
                return;
            }
        }
        self.ranges.push((start, len));
    }

    /// The ranges, sorted by start.
    pub fn as_slice(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// True if no range is reported.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// One `base:allocation` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub len: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// The `base:allocation` status bits of this extent.
    pub fn flags(&self) -> u32 {
        (if self.hole { proto::STATE_HOLE } else { 0 })
            | (if self.zero { proto::STATE_ZERO } else { 0 })
    }
}

/// A block device the server exports. Methods take `&self`; implementations use interior mutability
/// and must be safe to call concurrently from several connections and worker threads.
///
/// The server validates ranges (`offset + len <= size()`) and read-only-ness before calling,
/// and passes byte ranges exactly as the client sent them (they may be unaligned and sub-page).
pub trait BlockBackend: Send + Sync {
    /// Export size in bytes.
    fn size(&self) -> u64;
    /// Supported features.
    fn caps(&self) -> BackendCaps;
    /// Fill `buf` with the bytes at `offset`. Bytes inside returned zero ranges may be left unwritten.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, BackendError>;
    /// Store `data` at `offset`. With `fua`, the data must be durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;
    /// Discard a range (contents afterwards unspecified; ours read as zero).
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Make a range read as zeros. `may_trim`: holes may be punched. `fast_only`: fail with
    /// [`BackendError::NotFast`] unless this is faster than writing zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> Result<(), BackendError>;
    /// Make all completed writes durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Allocation status starting at `offset`. Extents are consecutive from `offset`, non-empty, and may
    /// cover less (never zero) or more than `len`; the server trims and validates them.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError>;
    /// Whether reading `[offset, offset+len)` may wait on something slow (a network round trip,
    /// a disk): the server then runs the read on a connection's worker threads, so several such
    /// reads of one connection overlap instead of queueing behind each other. A hint only — a
    /// wrong answer costs speed, never correctness. Must be cheap. Default: false (inline).
    fn read_may_block(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
}

/// Name and description of one export, for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name as clients select it.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
}

/// The set of exports a server offers. Looked up on every `GO`/`INFO`/`EXPORT_NAME`.
pub trait ExportTable: Send + Sync {
    /// Backend for `name`, or `None` if unknown. The empty name selects the default export, if any.
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>>;
    /// All exports, for `NBD_OPT_LIST` (filtered by [`ExportTable::permits`] per peer).
    fn list(&self) -> Vec<ExportInfo>;
    /// Whether `peer` may open (and see in `NBD_OPT_LIST`) the export `name`. Checked on
    /// every `LIST`, `INFO`, `GO`, `EXPORT_NAME` and meta-context query. The default serves
    /// every export to every peer: a table that holds anyone's data overrides it.
    fn permits(&self, name: &str, peer: &Peer) -> bool {
        let _ = (name, peer);
        true
    }
}

/// A fixed [`ExportTable`] built from named backends.
#[derive(Default)]
pub struct StaticExports {
    exports: BTreeMap<String, (String, Arc<dyn BlockBackend>)>,
    default: Option<String>,
}

impl std::fmt::Debug for StaticExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticExports")
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl StaticExports {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an export (replacing one with the same name). The first export added becomes the
    /// default (served for the empty name) unless [`StaticExports::with_default`] says otherwise.
    pub fn with_export(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        backend: Arc<dyn BlockBackend>,
    ) -> Self {
        let name = name.into();
        if self.default.is_none() {
            self.default = Some(name.clone());
        }
        self.exports.insert(name, (description.into(), backend));
        self
    }

    /// Choose the export served for the empty name. Default: the first export added.
    pub fn with_default(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }
}

impl ExportTable for StaticExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        let name = if name.is_empty() {
            self.default.as_deref()?
        } else {
            name
        };
        self.exports.get(name).map(|(_, b)| Arc::clone(b))
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .map(|(n, (d, _))| ExportInfo {
                name: n.clone(),
                description: d.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_ranges_merge_and_reject_overlap() {
        let mut z = ZeroRanges::none();
        z.push(0, 10);
        z.push(10, 5);
        z.push(12, 5); // overlaps: ignored
        z.push(20, 0); // empty: ignored
        z.push(30, 2);
        assert_eq!(z.as_slice(), &[(0, 15), (30, 2)]);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(BackendError::ReadOnly.nbd_errno(), proto::EPERM);
        assert_eq!(BackendError::NotFast.nbd_errno(), proto::ENOTSUP);
        assert_eq!(
            BackendError::Io(std::io::Error::other("x")).nbd_errno(),
            proto::EIO
        );
    }
}
