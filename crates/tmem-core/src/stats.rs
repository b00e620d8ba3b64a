//! Statistics: lock-free counters, striped so that busy threads do not share cache lines.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident { $($(#[$fm:meta])* $f:ident,)* }) => {
        /// Live counters (one stripe).
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub(crate) struct $name { $(pub(crate) $f: AtomicU64,)* }

        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $snap { $($(#[$fm])* pub $f: u64,)* }

        impl $snap {
            fn add_from(&mut self, c: &$name) { $(self.$f += c.$f.load(Relaxed);)* }
        }
    };
}

counters! {
    /// Operation counts of a client, a pool or the whole engine.
    OpCounters / OpStats {
        /// Puts accepted.
        puts,
        /// Puts refused (frozen, quota, no space).
        puts_refused,
        /// Gets asked.
        gets,
        /// Gets that found the page.
        get_hits,
        /// Gets that missed.
        get_misses,
        /// Pages flushed by request (flush page, flush object, destroy pool, replaced).
        flushes,
        /// Ephemeral pages evicted by the engine.
        evictions,
        /// Puts of all-zero pages (stored without data).
        zero_puts,
        /// Puts of same-filled non-zero pages (stored without data).
        same_puts,
        /// Puts that found an identical page and shared it.
        dedup_hits,
        /// Puts stored compressed.
        compressed_puts,
        /// Puts stored raw (codec off or page incompressible).
        raw_puts,
    }
}

/// Number of stripes per counter set.
const STRIPES: usize = 8;

/// Striped operation counters.
#[derive(Default, Debug)]
pub(crate) struct Striped {
    stripes: [OpCounters; STRIPES],
}

impl Striped {
    /// The stripe for a shard index.
    pub(crate) fn at(&self, shard: usize) -> &OpCounters {
        &self.stripes[shard % STRIPES]
    }
    /// Sums the stripes.
    pub(crate) fn snapshot(&self) -> OpStats {
        let mut s = OpStats::default();
        for c in &self.stripes {
            s.add_from(c);
        }
        s
    }
}

/// One stripe of gauges (signed so that transient races cannot wrap).
#[derive(Default, Debug)]
#[repr(align(128))]
pub(crate) struct GaugeStripe {
    pages: AtomicI64,
    same_pages: AtomicI64,
    charged: AtomicI64,
}

/// Live gauges of what a client or pool holds, striped like the counters.
#[derive(Default, Debug)]
pub(crate) struct Gauges {
    stripes: [GaugeStripe; STRIPES],
}

impl Gauges {
    pub(crate) fn add(&self, stripe: usize, pages: i64, same: i64, charged: i64) {
        let g = &self.stripes[stripe % STRIPES];
        g.pages.fetch_add(pages, Relaxed);
        if same != 0 {
            g.same_pages.fetch_add(same, Relaxed);
        }
        g.charged.fetch_add(charged, Relaxed);
    }
    /// Pages held (sum of stripes).
    pub(crate) fn pages(&self) -> i64 {
        self.stripes.iter().map(|g| g.pages.load(Relaxed)).sum()
    }
    /// Bytes charged (sum of stripes).
    pub(crate) fn charged(&self) -> i64 {
        self.stripes.iter().map(|g| g.charged.load(Relaxed)).sum()
    }
    pub(crate) fn snapshot(&self) -> HeldStats {
        let sum = |f: fn(&GaugeStripe) -> &AtomicI64| {
            self.stripes
                .iter()
                .map(|g| f(g).load(Relaxed))
                .sum::<i64>()
                .max(0) as u64
        };
        HeldStats {
            pages: sum(|g| &g.pages),
            same_pages: sum(|g| &g.same_pages),
            charged_bytes: sum(|g| &g.charged),
        }
    }
}

/// What a client or pool holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HeldStats {
    /// Pages held.
    pub pages: u64,
    /// Of those, zero or same-filled pages (no data page).
    pub same_pages: u64,
    /// Bytes charged to the holder (stored size of each page plus metadata).
    pub charged_bytes: u64,
}

impl HeldStats {
    /// Logical bytes: pages × 4096.
    pub fn logical_bytes(&self) -> u64 {
        self.pages * crate::PAGE_SIZE as u64
    }
}

/// Statistics of one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStats {
    /// The pool.
    pub pool: crate::PoolId,
    /// Its label.
    pub label: String,
    /// Whether it is persistent.
    pub persistent: bool,
    /// Whether it is shared.
    pub shared: bool,
    /// What it holds.
    pub held: HeldStats,
    /// Operation counts.
    pub ops: OpStats,
}

/// Statistics of one client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientStats {
    /// The client.
    pub client: crate::ClientId,
    /// Its weight.
    pub weight: u32,
    /// Its cap on persistent bytes (`u64::MAX` = none).
    pub persistent_cap: u64,
    /// Whether it is frozen.
    pub frozen: bool,
    /// Ephemeral pages charged to it.
    pub ephemeral: HeldStats,
    /// Persistent pages charged to it.
    pub persistent: HeldStats,
    /// Operation counts.
    pub ops: OpStats,
    /// Pool ids it can reach (owned or joined).
    pub pools: Vec<crate::PoolId>,
}

/// Engine-wide statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// The budget in bytes.
    pub budget: u64,
    /// Bytes really held: allocator frames and tables + index metadata.
    pub held_bytes: u64,
    /// Bytes the kernel charges for the engine's memory (see [`crate::Engine::resident_bytes`]):
    /// agrees with `held_bytes` unless memory is leaking somewhere.
    pub resident_bytes: u64,
    /// What compaction has done since the engine started.
    pub compaction: CompactionStats,
    /// Of which index metadata (hash tables, queues), estimated from table capacities.
    pub metadata_bytes: u64,
    /// Allocator figures (payload, slots, slabs; fragmentation).
    pub alloc: crate::alloc::AllocStats,
    /// Logical bytes held: pages × 4096.
    pub logical_bytes: u64,
    /// Pages held.
    pub pages: u64,
    /// Ephemeral pages held.
    pub ephemeral_pages: u64,
    /// Persistent pages held.
    pub persistent_pages: u64,
    /// Zero or same-filled pages held.
    pub same_pages: u64,
    /// Distinct data payloads stored (after dedup).
    pub unique_payloads: u64,
    /// Bytes that could be given back now by evicting every ephemeral page (estimate).
    pub freeable_bytes: u64,
    /// Operation counts.
    pub ops: OpStats,
    /// Number of clients.
    pub clients: u64,
    /// Number of pools.
    pub pools: u64,
}

impl EngineStats {
    /// Logical / held: how many times larger the pool looks than the memory it uses.
    pub fn effective_ratio(&self) -> f64 {
        if self.held_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.held_bytes as f64
        }
    }

    /// Logical bytes of data pages / payload bytes: the compression ratio alone.
    pub fn compression_ratio(&self) -> f64 {
        let data_pages = self.alloc.objects;
        if self.alloc.payload_bytes == 0 {
            1.0
        } else {
            (data_pages * crate::PAGE_SIZE as u64) as f64 / self.alloc.payload_bytes as f64
        }
    }

    /// Data pages held / unique payloads: the dedup ratio.
    pub fn dedup_ratio(&self) -> f64 {
        let data_pages = self.pages.saturating_sub(self.same_pages);
        if self.unique_payloads == 0 {
            1.0
        } else {
            data_pages as f64 / self.unique_payloads as f64
        }
    }
}

/// What compaction has done since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionStats {
    /// Compaction calls that moved or freed something.
    pub runs: u64,
    /// Payloads moved.
    pub moved: u64,
    /// Slabs emptied and given back.
    pub slabs_freed: u64,
    /// Bytes given back to the kernel by compaction.
    pub bytes_freed: u64,
}

/// Live compaction counters.
#[derive(Default, Debug)]
pub(crate) struct CompactionCounters {
    runs: AtomicU64,
    moved: AtomicU64,
    slabs_freed: AtomicU64,
    bytes_freed: AtomicU64,
}

impl CompactionCounters {
    /// Counts one compaction call.
    pub(crate) fn record(&self, s: &crate::alloc::CompactStep) {
        if s.moved == 0 && s.slabs_freed == 0 {
            return;
        }
        self.runs.fetch_add(1, Relaxed);
        self.moved.fetch_add(s.moved, Relaxed);
        self.slabs_freed.fetch_add(s.slabs_freed, Relaxed);
        self.bytes_freed.fetch_add(s.bytes_freed, Relaxed);
    }

    /// The counters now.
    pub(crate) fn snapshot(&self) -> CompactionStats {
        CompactionStats {
            runs: self.runs.load(Relaxed),
            moved: self.moved.load(Relaxed),
            slabs_freed: self.slabs_freed.load(Relaxed),
            bytes_freed: self.bytes_freed.load(Relaxed),
        }
    }
}
