//! The export error type and its mapping onto NBD errors.

use std::io;
use std::path::PathBuf;

use tmem_core::PoolId;
use tmem_nbd::BackendError;

/// Everything creating, attaching, opening or serving an export can fail with.
///
/// Messages are short and never repeat their source: print the whole chain at the edge.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The export would have more pages than one object can index (2^32 pages = 16 TiB).
    #[error("Export of {size} bytes is larger than the 16 TiB limit")]
    TooLarge {
        /// The requested size in bytes.
        size: u64,
    },
    /// The configuration is unusable (e.g. a zero size).
    #[error("Invalid export configuration: {0}")]
    InvalidConfig(&'static str),
    /// The engine refused to create the swap pool.
    #[error("Cannot create swap pool")]
    CreatePool(#[source] tmem_core::Error),
    /// The pool given to `attach` cannot be used.
    #[error("Cannot attach to pool {pool:?}: {reason}")]
    AttachPool {
        /// The pool.
        pool: PoolId,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The engine refused to tell the pool's specification (e.g. unknown pool or client).
    #[error("Cannot look up pool {pool:?}")]
    LookupPool {
        /// The pool.
        pool: PoolId,
        /// The engine's refusal.
        #[source]
        source: tmem_core::Error,
    },
    /// Joining the shared cache pool failed (not authorized, spec mismatch, ...).
    #[error("Cannot join shared cache pool")]
    JoinPool(#[source] tmem_core::Error),
    /// Leaving or destroying the pool failed.
    #[error("Cannot release pool")]
    ReleasePool(#[source] tmem_core::Error),
    /// A page operation on the engine failed in a way the export cannot absorb.
    #[error("Page operation on the pool failed")]
    Engine(#[source] tmem_core::Error),
    /// The spill file could not be created or opened.
    #[error("Cannot open spill file {path}")]
    SpillOpen {
        /// The spill file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading, writing, punching or syncing the spill file failed.
    #[error("Spill file I/O failed")]
    SpillIo(#[source] io::Error),
    /// Removing the spill file failed.
    #[error("Cannot remove spill file {path}")]
    SpillRemove {
        /// The spill file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The backing image could not be opened or inspected.
    #[error("Cannot open image {path}")]
    ImageOpen {
        /// The image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Reading, writing or syncing the backing image failed.
    #[error("Image I/O failed")]
    ImageIo(#[source] io::Error),
    /// The export is read-only (a cached export not opened `writable`): writes, trims and
    /// zeroing are refused (NBD `EPERM`).
    #[error("Export is read-only")]
    ReadOnly,
    /// The export was destroyed or closed; no further I/O is served.
    #[error("Export is closed")]
    Closed,
    /// The page's content could not be proven intact (lost at an unclean stop, or dropped
    /// when neither the pool nor the spill file took a rewrite): reads fail until the page
    /// is written or trimmed as a whole.
    #[error("Page {page} was lost (unclean stop or failed spill) and has not been rewritten")]
    Poisoned {
        /// The page (4 KiB index).
        page: u64,
    },
    /// The spill file's filesystem cannot hold the export's worst case (every page spilled)
    /// plus the configured reserve.
    #[error(
        "Not enough free space for spill file {path}: the export needs {needed} bytes \
         (its size plus the {reserve}-byte reserve), {available} are available"
    )]
    SpillSpace {
        /// The spill file.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// The reserve included in `needed`.
        reserve: u64,
        /// Bytes available.
        available: u64,
    },
    /// The remote tier could not serve a page that lives there (this request fails; the
    /// page is not lost).
    #[error("Remote tier")]
    Remote(#[source] crate::remote::RemoteError),
    /// The page map next to the spill file could not be created, read or opened.
    #[error("Cannot use page map {path}")]
    PageMap {
        /// The map file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn io_to_backend(e: io::Error) -> BackendError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        BackendError::NoSpace
    } else {
        BackendError::Io(e)
    }
}

fn engine_to_backend(e: tmem_core::Error) -> BackendError {
    use tmem_core::Error as E;
    // Exhaustive on purpose: a new engine error must decide its NBD meaning.
    match e {
        E::NoSpace | E::QuotaExceeded(_) => BackendError::NoSpace,
        E::Frozen(_) => BackendError::NoSpace,
        E::BadLength(_) => BackendError::Invalid("bad page length"),
        E::UnknownPool(_) | E::UnknownClient(_) => BackendError::ShuttingDown,
        e @ (E::ClientExists(_)
        | E::AccessDenied { .. }
        | E::NotAuthorized { .. }
        | E::SpecMismatch(_)
        | E::Unsupported(_)
        | E::TooManyPools
        | E::Stream(_)) => BackendError::Io(io::Error::other(e)),
    }
}

impl From<ExportError> for BackendError {
    /// Exhaustive on purpose (no `_` arm): a new variant must choose its NBD errno.
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::TooLarge { .. } => BackendError::Invalid("export too large"),
            ExportError::InvalidConfig(m) => BackendError::Invalid(m),
            ExportError::Engine(e) => engine_to_backend(e),
            ExportError::SpillIo(e) | ExportError::ImageIo(e) => io_to_backend(e),
            ExportError::Closed => BackendError::ShuttingDown,
            ExportError::ReadOnly => BackendError::ReadOnly,
            e @ (ExportError::Poisoned { .. } | ExportError::Remote(_)) => {
                BackendError::Io(io::Error::other(e))
            }
            e @ (ExportError::CreatePool(_)
            | ExportError::SpillSpace { .. }
            | ExportError::PageMap { .. }
            | ExportError::AttachPool { .. }
            | ExportError::LookupPool { .. }
            | ExportError::JoinPool(_)
            | ExportError::ReleasePool(_)
            | ExportError::SpillOpen { .. }
            | ExportError::SpillRemove { .. }
            | ExportError::ImageOpen { .. }) => BackendError::Io(io::Error::other(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmem_core::ClientId;

    #[test]
    fn mapping() {
        let m = |e: ExportError| BackendError::from(e).nbd_errno();
        assert_eq!(m(ExportError::Closed), tmem_nbd::proto::ESHUTDOWN);
        assert_eq!(
            m(ExportError::SpillIo(io::Error::from_raw_os_error(
                libc::ENOSPC
            ))),
            tmem_nbd::proto::ENOSPC
        );
        assert_eq!(
            m(ExportError::ImageIo(io::Error::from_raw_os_error(
                libc::EIO
            ))),
            tmem_nbd::proto::EIO
        );
        assert_eq!(
            m(ExportError::Engine(tmem_core::Error::QuotaExceeded(
                ClientId(1)
            ))),
            tmem_nbd::proto::ENOSPC
        );
        assert_eq!(m(ExportError::InvalidConfig("x")), tmem_nbd::proto::EINVAL);
        assert_eq!(m(ExportError::Poisoned { page: 3 }), tmem_nbd::proto::EIO);
        assert_eq!(m(ExportError::ReadOnly), tmem_nbd::proto::EPERM);
    }
}
