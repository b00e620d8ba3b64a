//! A remote tier of 4 KiB pages on Redis: [`RedisTier`] implements
//! [`tmem_exports::RemoteTier`] over one Redis server (`mode = "single"`) or a Redis Cluster
//! (`mode = "cluster"`), with the synchronous `redis` client.
//!
//! # Keys
//! `{prefix}:{node_name}:{space}:{<h>.<run>}:<e|d>:<page>` (see [`keys`]). The node name
//! keeps hosts sharing the servers apart; `e` and `d` keep a page's ephemeral and durable
//! copies apart (a demotion never overwrites a durable copy). The braces are a Redis Cluster
//! hash tag over a hash of `prefix:node:space` and `page / 64`: the 64 pages of one run of
//! one space live in one slot, so fetching a run is one `MGET` on one node, and different
//! runs and spaces spread over the cluster.
//!
//! # Values
//! A 32-byte header then the page, LZ4-compressed when that is smaller (see [`codec`]):
//! magic, format version, flags, a 64-bit hash of the full key (a value copied under
//! another key, or written by another host, is rejected), the caller's tag, the payload
//! length and a crc32 over the header fields and the payload. Anything that does not decode
//! to exactly one page for exactly this key is a miss (`fetch`) or
//! [`RemoteError::Corrupt`] (`get_durable`) — never a wrong page.
//!
//! # Eviction: `volatile-lru`
//! Ephemeral copies are written with `SET … EX ephemeral_ttl_s`; durable copies have no TTL.
//! Under `maxmemory-policy volatile-lru` ([`lend::set_policy`]) a full Redis evicts only
//! keys with a TTL, so it drops cache copies (LRU first) and never a durable page; when only
//! durable pages are left, writes fail with `OOM` ([`RemoteError::Refused`]).
//!
//! # Durability: what `WAIT` does and does not guarantee
//! `put_durable` sends `SET key value` and `WAIT replicas wait_timeout_ms` in one pipeline
//! on one connection to the primary that owns the key's slot, so `WAIT` counts that `SET`.
//! It returns `Ok` only when at least `replicas` replicas acknowledged it; otherwise
//! [`RemoteError::NotReplicated`] (and the key is deleted, best effort). `WAIT` is not a
//! consensus: the page survives the loss of the primary *or* of some replicas, but it can
//! be lost if the primary and every replica that acknowledged it die together (or a
//! failover promotes a replica that had not received it — `WAIT` lowers the odds of that,
//! it does not exclude it). Redis replication is asynchronous; this tier adds no
//! persistence beyond what the servers are configured with.
//!
//! # Threads, timeouts, breaker
//! * `demote` and `forget` only queue (bounded by `queue_pages`); one writer thread
//!   drains the queue in batches of `batch_pages`, one pipelined round trip per server
//!   (`SET … EX ttl`, `DEL`). A forget queued after a demotion of the same page is written
//!   after it (one FIFO; one slot per page).
//! * `fetch` is one pipelined round trip per server (one `MGET` per slot), bounded by
//!   `op_timeout_ms`; any failure is a miss of the whole batch.
//! * `get_durable` retries redirections (`MOVED`), failovers (`READONLY`, `CLUSTERDOWN`,
//!   refused connections) with a fresh slot map until `durable_timeout_ms`: the page lives
//!   nowhere else. `put_durable` makes one attempt (following a redirection within it),
//!   bounded by `wait_timeout_ms` + `op_timeout_ms`: a put that fails costs nothing, the
//!   caller keeps the page locally.
//! * A connection-level failure (refused, reset, timeout, garbage) marks the tier down:
//!   `available()` is false, demotions are dropped and fetches miss at once; a health
//!   thread re-learns the topology and PINGs every primary with exponential backoff
//!   (`backoff_ms` .. `backoff_max_ms`) and marks the tier up again. Each transition is
//!   logged once (warn when going down, info when coming up). Durable operations do not
//!   consult the breaker: they are bounded by their own deadline and are what a failover
//!   must not lose.
//!
//! Slot routing is done here (slot map from `CLUSTER SLOTS`, plain connections per primary)
//! rather than by `redis::cluster::ClusterConnection`: the cluster client retries internally
//! with its own timing and routes each command on its own, while this tier needs one
//! bounded round trip per batch and `WAIT` on the very connection that carried the `SET`.
//!
//! # Lend control
//! [`lend::set_maxmemory`], [`lend::get_maxmemory`] and [`lend::set_policy`] act on one node
//! (`CONFIG SET maxmemory …`), for the daemon's balloon loop.

#![warn(missing_docs)]

pub mod codec;
pub mod config;
pub mod keys;
pub mod lend;
mod router;
pub mod stats;
mod tier;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::{Mode, RemoteConfig};
pub use lend::{get_maxmemory, get_policy, set_maxmemory, set_policy};
pub use stats::RemoteStats;
pub use tier::RedisTier;
pub use tmem_exports::remote::{RemoteError, RemotePage, RemoteTier, REMOTE_PAGE};
