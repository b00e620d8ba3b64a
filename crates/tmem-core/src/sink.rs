//! Eviction sinks: where an ephemeral pool's evicted pages go instead of nowhere.
//!
//! An adapter (e.g. a remote tier, see `tmem-exports`) registers a sink on an ephemeral pool
//! with [`crate::Engine::set_eviction_sink`]. Every page the engine *evicts* from that pool
//! (budget pressure, [`crate::Engine::shrink`], [`crate::Engine::set_budget`]) is decoded
//! and handed to the sink before its storage is freed. Flushes, exclusive gets and pool
//! destruction are not evictions: the page's owner dropped it, so there is nothing to keep.
//!
//! The engine stays free of I/O: the sink is called synchronously on the evicting thread
//! while evictions are serialised and with the page's shard locked — the page is already
//! out of the index, but a flush or put of the same key cannot complete until the sink
//! returns. So a caller that bumps a version of its own before invalidating a key (as the
//! cached export does before a write) knows that a sink reading that version sees the one
//! the evicted content belongs to, or a newer one in progress. The sink must be quick (e.g.
//! copy into a bounded queue) and must never call back into the engine (it would deadlock).

use crate::types::PageKey;

/// Receives the pages evicted from one ephemeral pool.
pub trait EvictionSink: Send + Sync {
    /// `data` (one page) was evicted from the pool under `key`; it is gone from the
    /// engine when this returns.
    fn evicted(&self, key: PageKey, data: &[u8]);
}
