//! # tmem-core: the transcendent memory pool engine
//!
//! A host-wide, page-granular, copy-based memory pool. Guests (through a frontend such as
//! the NBD server in `tmem-nbd`) put pages into it and get them back; the engine
//! compresses and deduplicates what it holds, never loses a persistent page, never returns
//! a stale ephemeral one, and gives memory back the moment it is asked. It is pure and
//! synchronous: no I/O, no threads of its own, `Send + Sync`.
//!
//! ## The contract
//! * **Clients** ([`ClientId`]): one per guest or tenant, with a *weight* (its share of
//!   ephemeral capacity), a *cap* on the bytes its persistent pages may be charged, and a
//!   *frozen* flag (puts refused with [`Error::Frozen`]; gets and flushes still work).
//! * **Pools** ([`PoolId`]) belong to a client and are `ephemeral | persistent` ×
//!   `private | shared`. A shared pool is named by a 128-bit [`PoolUuid`] and joined with
//!   [`Engine::create_pool`]; joining requires [`Engine::authorize_shared`] first (deny by
//!   default) and a refused join is an error ([`Error::NotAuthorized`]), never a silent
//!   private pool. **Shared persistent pools are refused** ([`Error::Unsupported`]):
//!   persistence needs one owner to be capped and saved. A shared pool's pages are charged
//!   to the client that created it.
//! * **Keys** ([`PageKey`]): pool, object id (3 × u64), page index (u32). Pages are
//!   [`PAGE_SIZE`] = 4096 bytes.
//! * **Ops**: [`Engine::put`], [`Engine::get`], [`Engine::flush_page`],
//!   [`Engine::flush_object`], [`Engine::destroy_pool`], batched [`Engine::put_pages`].
//!   A put that replaces a key never leaves the old content readable, and a failed put
//!   (any error) flushes the key. Private-ephemeral gets are exclusive (the page leaves
//!   the pool) unless the pool was created with `exclusive_gets = false`; shared-ephemeral
//!   and persistent gets are not. Persistent puts either succeed — the page is kept until
//!   flushed — or fail with [`Error::NoSpace`] / [`Error::QuotaExceeded`]; never a silent
//!   drop. Ephemeral pages may be evicted at any time; a get then misses.
//! * **Memory**: a global budget in bytes counts what is really held — allocator slabs
//!   plus index and dedup metadata ([`Engine::held_bytes`]). When room is needed,
//!   ephemeral pages are evicted oldest first (FIFO with a second chance for pages that were
//!   read), taken first from the client whose ephemeral usage per unit of weight is the
//!   largest — the one most above its weighted share. [`Engine::shrink`] releases memory
//!   at once and returns what was freed; [`Engine::set_budget`] fits the engine to a new
//!   budget; [`Engine::freeable_bytes`] tells what could be given back now.
//! * **Zero and same-filled pages** (every 8-byte word equal) are stored in the index
//!   entry only, with no data page.
//! * **Dedup** ([`DedupScope`], default per client: cross-tenant dedup is a side channel):
//!   identical pages are stored once, reference counted, found by a 64-bit xxh3 hash seeded
//!   with the dedup domain and confirmed by a full comparison. *KSM's "lookahead"* (compare
//!   the next page with the successor of the last match before searching) was evaluated and
//!   left out: it pays in KSM because a search is a tree walk doing a 4 KiB `memcmp` per
//!   node, but here a search is one xxh3 hash plus one hash-table probe, while the
//!   lookahead's guess must first be decompressed before it can be compared — several times
//!   the cost of the search it would save (`scripts/bench-core` measures both; see
//!   BENCHMARKS.md).
//! * **Compression** ([`Codec`]: none, lz4, zstd level): a page is kept compressed only if
//!   it fits in `compress_threshold` bytes (default ¾ page). Payloads are packed by a
//!   size-class slab allocator (16-byte classes merged like zsmalloc's, 1–8 page slabs;
//!   ephemeral and persistent payloads in separate arenas so evicting ephemeral pages frees
//!   whole slabs; a put fills the fullest slab with room) in 2 MiB regions the engine maps
//!   itself: an emptied slab goes back to the kernel at once (`MADV_DONTNEED`), so
//!   [`Engine::resident_bytes`] (asked from the kernel) agrees with [`Engine::held_bytes`].
//! * **Compaction** ([`Engine::compact`], and inside [`Engine::shrink`] and under budget
//!   pressure): payload handles are indirect, so payloads move out of sparse slabs into
//!   full ones in bounded steps while every other operation goes on; the lock order is in
//!   the allocator's module docs.
//! * **Durable persistent pools** ([`Engine::with_durable`], [`Engine::recover`]): the
//!   persistent pools' slabs in memory the embedder provides ([`DurableMemory`]) that
//!   outlives the process, every payload behind a checksummed header naming its page, so
//!   a new process recovers every acknowledged page after the old one was killed.
//! * **Statistics** per client, per pool and global ([`Engine::stats`],
//!   [`Engine::client_stats`], [`Engine::pool_stats`]) are striped atomics: cheap to read
//!   while the engine is busy.
//! * **Save/restore** ([`Engine::save`], [`Engine::restore`]): a versioned, checksummed,
//!   resumable stream of a client's pools; a corrupt or truncated stream is rejected and
//!   the engine is left as it was. A save runs live and reports keys touched meanwhile.
//! * **Concurrency**: the index is split into shards (by pool, object and index/16), each
//!   with its own lock; payloads live in several independently locked arenas; the pool and
//!   client tables are read-copy-update snapshots. Eviction takes one shard lock at a time
//!   and never while a put holds one, so eviction and puts cannot deadlock.
//!
//! ## Example
//! ```
//! use tmem_core::*;
//! let engine = Engine::new(EngineConfig::with_budget(64 << 20));
//! let guest = ClientId(1);
//! engine.add_client(guest, ClientConfig::default())?;
//! let swap = engine.create_pool(guest, PoolSpec::private_persistent())?;
//! let key = PageKey::new(swap, ObjectId::from_u64(0), 42);
//! engine.put(guest, key, &[7u8; PAGE_SIZE])?;
//! let mut page = [0u8; PAGE_SIZE];
//! assert_eq!(engine.get(guest, key, &mut page)?, Some(PageState::Data));
//! assert_eq!(page, [7u8; PAGE_SIZE]);
//! # Ok::<(), tmem_core::Error>(())
//! ```
#![warn(missing_docs, missing_debug_implementations)]

mod alloc;
mod codec;
mod config;
mod dedup;
mod engine;
mod entry;
mod error;
mod recover;
mod region;
pub mod save;
mod shard;
mod sink;
mod stats;
mod types;

pub use alloc::{AllocStats, CompactStep};
pub use config::{ClientConfig, Codec, DedupScope, EngineConfig, PoolSpec};
pub use engine::Engine;
pub use error::{Error, Result};
pub use recover::{durable_tag, RecoveryReport};
pub use region::{DurableFile, DurableMemory, REGION_BYTES};
pub use save::{RestoreReport, SaveCursor, SaveOptions, SaveReport, StreamError};
pub use sink::EvictionSink;
pub use stats::{ClientStats, CompactionStats, EngineStats, HeldStats, OpStats, PoolStats};
pub use types::*;
