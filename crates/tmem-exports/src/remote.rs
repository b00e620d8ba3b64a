//! The seam between the exports and a remote tier (memory of other hosts): the narrow trait
//! an export calls, implemented by `tmem-remote` on Redis. The exports decide *what* goes
//! remote and keep the books (which page is where, with which version or checksum); the
//! tier only stores and returns opaque pages under `(space, page)` keys.
//!
//! * **Ephemeral** copies ([`RemoteTier::demote`], [`RemoteTier::fetch`]) may vanish at any
//!   time (the tier evicts them LRU); a fetch that fails in any way is a miss. Each copy
//!   carries the caller's `tag` (a version), returned by `fetch`, so that the caller can
//!   refuse a copy older than what it knows — never stale data.
//! * **Durable** copies ([`RemoteTier::put_durable`], [`RemoteTier::get_durable`]) are never
//!   evicted by the tier; `put_durable` returns only once the copy reached the configured
//!   number of replicas, and an error means the caller keeps its local copy.
//!
//! Every method is synchronous and bounded by the tier's own timeouts; none panics on
//! anything the remote side sends.

use std::fmt;

/// Bytes in one page.
pub const REMOTE_PAGE: usize = tmem_core::PAGE_SIZE;

/// An ephemeral page fetched from the tier.
#[derive(Clone, PartialEq, Eq)]
pub struct RemotePage {
    /// The tag given to [`RemoteTier::demote`].
    pub tag: u64,
    /// The page's 4096 bytes.
    pub data: Vec<u8>,
}

impl fmt::Debug for RemotePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemotePage")
            .field("tag", &self.tag)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Why a durable operation of the tier failed. The caller falls back to local storage (a
/// put) or reports an I/O error for this request (a get); it never reads wrong data.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The tier is not reachable now (connection refused or lost, cluster down), or was
    /// marked down after recent failures and is not being tried.
    #[error("remote tier unreachable: {0}")]
    Unreachable(String),
    /// The operation did not complete within the tier's timeout.
    #[error("remote tier timed out")]
    Timeout,
    /// The write was stored on the primary but fewer replicas than required acknowledged it
    /// before the timeout.
    #[error("remote write reached {got} of {want} replicas")]
    NotReplicated {
        /// Replicas that acknowledged.
        got: u64,
        /// Replicas required.
        want: u64,
    },
    /// The tier refused the write (e.g. its memory limit is reached: `OOM` under
    /// `noeviction`/`volatile-*` policies).
    #[error("remote tier refused the write: {0}")]
    Refused(String),
    /// The tier answered with something that is not a valid page for this key (garbage,
    /// a wrong checksum, another key's page, an unknown format).
    #[error("remote tier returned a corrupt page: {0}")]
    Corrupt(String),
    /// Any other protocol-level error.
    #[error("remote tier error: {0}")]
    Protocol(String),
}

/// A remote store of 4 KiB pages under `(space, page)` keys. `space` names one export's
/// incarnation (e.g. `c/<pool uuid>/<epoch>` or `s/<export name>`); it is made of
/// `[A-Za-z0-9/_.-]` only.
pub trait RemoteTier: Send + Sync {
    /// Queues an ephemeral copy of `data` (4096 bytes) with `tag`; returns at once. The copy
    /// may be dropped (queue full, tier down) — it is only a cache.
    fn demote(&self, space: &str, page: u64, tag: u64, data: &[u8]);

    /// Fetches ephemeral copies of `pages` in one batch. `out[i]` is `Some` only for a
    /// complete, checksum-verified copy of `pages[i]`; every failure is `None` (a miss).
    fn fetch(&self, space: &str, pages: &[u64]) -> Vec<Option<RemotePage>>;

    /// Stores a durable copy of `data` (4096 bytes), never evicted by the tier. Returns once
    /// the configured number of replicas acknowledged it; an error means the copy must not be
    /// relied on (the caller keeps or writes its local copy).
    fn put_durable(&self, space: &str, page: u64, data: &[u8]) -> Result<(), RemoteError>;

    /// Stores durable copies of several pages, each as [`RemoteTier::put_durable`] would
    /// (acknowledged by the replicas or an error), but batched: `out[i]` is the result for
    /// `pages[i]`. The default sends them one by one.
    fn put_durable_many(
        &self,
        space: &str,
        pages: &[(u64, &[u8])],
    ) -> Vec<Result<(), RemoteError>> {
        pages
            .iter()
            .map(|&(page, data)| self.put_durable(space, page, data))
            .collect()
    }

    /// Reads a durable copy into `out` (4096 bytes). `Ok(false)`: the tier has no copy.
    /// Retries across a failover up to the tier's timeout.
    fn get_durable(&self, space: &str, page: u64, out: &mut [u8]) -> Result<bool, RemoteError>;

    /// Deletes copies (ephemeral or durable) of `pages`, in the background, best effort.
    fn forget(&self, space: &str, pages: &[u64]);

    /// Whether the tier is taking requests now (reachable and not backing off after
    /// failures). Callers skip the tier while it is not.
    fn available(&self) -> bool;
}
