//! Engine, client and pool configuration.

use crate::types::{Persistence, Sharing};

/// How a pool stores page data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Pages are stored as they are.
    None,
    /// LZ4 (fast; ≈6 µs compress, ≈1.3 µs decompress per page on our machines).
    Lz4,
    /// Zstandard at the given level (1..=19; 1 is the usual choice: ≈4× on process memory).
    Zstd(i8),
}

impl Codec {
    /// The one-byte tag of this codec (used in entries and in save streams).
    pub(crate) fn tag(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd(_) => 2,
        }
    }
}

/// Where identical pages are looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DedupScope {
    /// No deduplication.
    Off,
    /// Only among the pages of the same pool.
    Pool,
    /// Among all pages of the same client (the default: no cross-tenant side channel).
    Client,
    /// Among all pages of all clients that also chose `Global`. Cross-tenant dedup leaks
    /// whether another tenant holds a page (timing side channel): opt in knowingly.
    Global,
}

/// How a pool is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// Ephemeral or persistent.
    pub persistence: Persistence,
    /// Private, or shared under a UUID.
    pub sharing: Sharing,
    /// Private-ephemeral only: a get removes the page (exclusive cache, the default),
    /// so a page is never held both in the guest and in the pool. Ignored elsewhere:
    /// shared-ephemeral gets are never exclusive, persistent gets never are.
    pub exclusive_gets: bool,
    /// Where duplicates are looked for. Default: [`DedupScope::Client`].
    pub dedup: DedupScope,
    /// How pages are compressed. Default: [`Codec::Lz4`].
    pub codec: Codec,
    /// A free-form label (≤ 255 bytes) kept with the pool and in save streams, so that a
    /// frontend can find its pools again after a restore.
    pub label: String,
}

impl PoolSpec {
    /// A private ephemeral pool with exclusive gets, per-client dedup and lz4.
    pub fn private_ephemeral() -> Self {
        PoolSpec {
            persistence: Persistence::Ephemeral,
            sharing: Sharing::Private,
            exclusive_gets: true,
            dedup: DedupScope::Client,
            codec: Codec::Lz4,
            label: String::new(),
        }
    }

    /// A private persistent pool (frontswap) with per-client dedup and lz4.
    pub fn private_persistent() -> Self {
        PoolSpec {
            persistence: Persistence::Persistent,
            exclusive_gets: false,
            ..Self::private_ephemeral()
        }
    }

    /// A shared ephemeral pool (shared cleancache) joined under `uuid`.
    pub fn shared_ephemeral(uuid: crate::PoolUuid) -> Self {
        PoolSpec {
            sharing: Sharing::Shared(uuid),
            exclusive_gets: false,
            ..Self::private_ephemeral()
        }
    }

    /// Sets the codec.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Sets the dedup scope.
    pub fn with_dedup(mut self, dedup: DedupScope) -> Self {
        self.dedup = dedup;
        self
    }

    /// Sets whether private-ephemeral gets are exclusive.
    pub fn with_exclusive_gets(mut self, exclusive: bool) -> Self {
        self.exclusive_gets = exclusive;
        self
    }

    /// Sets the label.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
}

/// Per-client settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Share of ephemeral capacity relative to other clients' weights. Default 100.
    pub weight: u32,
    /// Cap on the bytes this client's persistent pages may be charged. Default: no cap.
    pub persistent_cap: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            weight: 100,
            persistent_cap: u64::MAX,
        }
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Global budget in bytes for everything the engine holds (data plus metadata).
    pub budget: u64,
    /// A page is kept compressed only if it compresses to at most this many bytes
    /// (default 3584 = ⅞ page: on real process memory this beats ¾ page by 2 % with zstd and
    /// loses nothing with lz4); otherwise it is stored raw.
    pub compress_threshold: usize,
    /// Number of index shards (rounded up to a power of two). Default 64.
    pub shards: usize,
    /// Number of allocator arenas (each with its own lock). Default 4.
    pub arenas: usize,
    /// While the engine holds less than this fraction of its budget, pages are stored raw
    /// at put time and compressed later by [`crate::Engine::compress_deferred`] (called
    /// from a background thread by the daemon): puts cost a copy instead of a compression
    /// while there is headroom and the compressor keeps up (at most 1024 pages wait; past
    /// that, puts compress inline again). 0 (the default) compresses at put time.
    pub defer_compression_below: f64,
    /// Ask for transparent huge pages on the allocator's 2 MiB regions (`MADV_HUGEPAGE`).
    /// Off by default (`MADV_NOHUGEPAGE`): giving back a 4 KiB frame of a huge page splits
    /// it, and the rest of it stays charged until the kernel's deferred split runs, while
    /// gets gain little (see BENCHMARKS.md, "Huge pages").
    pub huge_pages: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            budget: 1 << 30,
            compress_threshold: 3584,
            shards: 64,
            arenas: 4,
            defer_compression_below: 0.0,
            huge_pages: false,
        }
    }
}

impl EngineConfig {
    /// Default configuration with the given budget.
    pub fn with_budget(budget: u64) -> Self {
        EngineConfig {
            budget,
            ..Default::default()
        }
    }
}
