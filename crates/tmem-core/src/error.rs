//! The engine's error type.

use crate::types::{ClientId, PoolId, PoolUuid};

/// Everything an engine operation can refuse. Every variant is a normal outcome that a
/// frontend must handle; none of them changes what the engine holds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The client id is not registered.
    #[error("unknown client {0:?}")]
    UnknownClient(ClientId),
    /// A client with this id is already registered.
    #[error("client {0:?} already exists")]
    ClientExists(ClientId),
    /// The pool does not exist (or was destroyed).
    #[error("unknown pool {0:?}")]
    UnknownPool(PoolId),
    /// The pool exists but this client may not touch it (another client's private pool, or
    /// a shared pool it has not joined).
    #[error("client {client:?} has no access to pool {pool:?}")]
    AccessDenied {
        /// The client that asked.
        client: ClientId,
        /// The pool it asked for.
        pool: PoolId,
    },
    /// The client is not authorized to join the shared pool with this UUID.
    #[error("client {client:?} is not authorized for shared pool {uuid:?}")]
    NotAuthorized {
        /// The client that asked.
        client: ClientId,
        /// The shared pool's UUID.
        uuid: PoolUuid,
    },
    /// A shared pool with this UUID already exists with a different specification.
    #[error("shared pool {0:?} exists with a different specification")]
    SpecMismatch(PoolUuid),
    /// The request is not supported (e.g. a shared persistent pool).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The client is frozen: puts are refused, gets and flushes still work.
    #[error("client {0:?} is frozen")]
    Frozen(ClientId),
    /// The client's cap on persistent bytes would be exceeded.
    #[error("client {0:?} is over its persistent quota")]
    QuotaExceeded(ClientId),
    /// The pool budget is full and nothing could be evicted to make room.
    #[error("pool budget is full")]
    NoSpace,
    /// The buffer given is not exactly one page.
    #[error("buffer is {0} bytes, a page is 4096")]
    BadLength(usize),
    /// Too many pools: pool ids are exhausted.
    #[error("too many pools")]
    TooManyPools,
    /// A save or restore stream failed; the engine is unchanged.
    #[error("save stream: {0}")]
    Stream(#[from] crate::save::StreamError),
}

/// Shorthand for results of engine operations.
pub type Result<T> = std::result::Result<T, Error>;
