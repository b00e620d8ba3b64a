//! Counters and latency windows of the tier.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// A snapshot of the tier's counters (since `connect`), from [`crate::RedisTier::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RemoteStats {
    /// Whether the tier is taking requests now.
    pub reachable: bool,
    /// Ephemeral pages written to Redis.
    pub demoted_pages: u64,
    /// Ephemeral pages dropped (queue full, tier down, write failed).
    pub demote_dropped: u64,
    /// Calls to `fetch`.
    pub fetch_requests: u64,
    /// Pages fetched intact.
    pub fetch_hits: u64,
    /// Pages asked for and not returned (absent, corrupt, any error).
    pub fetch_misses: u64,
    /// Durable pages stored and acknowledged by the required replicas.
    pub durable_puts: u64,
    /// Calls to `get_durable`.
    pub durable_gets: u64,
    /// Durable puts that fewer replicas than required acknowledged.
    pub not_replicated: u64,
    /// Failed operations or round trips (connection errors, error replies, timeouts).
    pub errors: u64,
    /// Values that failed decoding (garbage, checksum, another key's value).
    pub corrupt: u64,
    /// Round trips that timed out (also counted in `errors`).
    pub timeouts: u64,
    /// Value bytes sent (in SETs).
    pub bytes_sent: u64,
    /// Value bytes received (in GET/MGET replies).
    pub bytes_received: u64,
    /// Bytes of values this process stored minus those it deleted (approximate: overwrites,
    /// expiry and eviction are not seen).
    pub stored_bytes_estimate: u64,
    /// Median latency of `fetch` over the recent window, in microseconds.
    pub fetch_p50_us: u64,
    /// 99th percentile latency of `fetch` over the recent window, in microseconds.
    pub fetch_p99_us: u64,
    /// Median latency of `get_durable` over the recent window, in microseconds.
    pub get_durable_p50_us: u64,
    /// 99th percentile latency of `get_durable` over the recent window, in microseconds.
    pub get_durable_p99_us: u64,
    /// Times the tier went from up to down.
    pub down_transitions: u64,
}

/// Samples kept per latency window.
const WINDOW: usize = 1024;

/// The latencies of the last [`WINDOW`] operations; recording is two atomic stores.
pub(crate) struct Latency {
    samples: Box<[AtomicU32]>,
    next: AtomicUsize,
}

impl Latency {
    pub(crate) fn new() -> Self {
        Self {
            samples: (0..WINDOW).map(|_| AtomicU32::new(0)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn record(&self, d: std::time::Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.samples.get(i % WINDOW) {
            s.store(us, Ordering::Relaxed);
        }
    }

    /// (p50, p99) in microseconds; zeros before the first sample.
    pub(crate) fn percentiles(&self) -> (u64, u64) {
        let n = self.next.load(Ordering::Relaxed).min(WINDOW);
        if n == 0 {
            return (0, 0);
        }
        let mut v: Vec<u32> = self.samples[..n]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        v.sort_unstable();
        let at = |q: usize| u64::from(v[((n - 1) * q) / 100]);
        (at(50), at(99))
    }
}

/// The live counters.
pub(crate) struct Counters {
    pub(crate) reachable: AtomicBool,
    pub(crate) demoted_pages: AtomicU64,
    pub(crate) demote_dropped: AtomicU64,
    pub(crate) fetch_requests: AtomicU64,
    pub(crate) fetch_hits: AtomicU64,
    pub(crate) fetch_misses: AtomicU64,
    pub(crate) durable_puts: AtomicU64,
    pub(crate) durable_gets: AtomicU64,
    pub(crate) not_replicated: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) corrupt: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) stored_bytes: AtomicI64,
    pub(crate) stored_keys: AtomicI64,
    pub(crate) down_transitions: AtomicU64,
    pub(crate) fetch_latency: Latency,
    pub(crate) get_latency: Latency,
}

/// Adds one to a counter.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn new() -> Self {
        let z = || AtomicU64::new(0);
        Self {
            reachable: AtomicBool::new(false),
            demoted_pages: z(),
            demote_dropped: z(),
            fetch_requests: z(),
            fetch_hits: z(),
            fetch_misses: z(),
            durable_puts: z(),
            durable_gets: z(),
            not_replicated: z(),
            errors: z(),
            corrupt: z(),
            timeouts: z(),
            bytes_sent: z(),
            bytes_received: z(),
            stored_bytes: AtomicI64::new(0),
            stored_keys: AtomicI64::new(0),
            down_transitions: z(),
            fetch_latency: Latency::new(),
            get_latency: Latency::new(),
        }
    }

    /// A value of `len` bytes was stored.
    pub(crate) fn stored(&self, len: usize) {
        self.stored_bytes
            .fetch_add(i64::try_from(len).unwrap_or(0), Ordering::Relaxed);
        self.stored_keys.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` keys were deleted; their size is estimated by the mean stored value.
    pub(crate) fn deleted(&self, n: u64) {
        for _ in 0..n {
            let keys = self.stored_keys.load(Ordering::Relaxed);
            if keys <= 0 {
                return;
            }
            let mean = self.stored_bytes.load(Ordering::Relaxed) / keys;
            self.stored_bytes.fetch_sub(mean, Ordering::Relaxed);
            self.stored_keys.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> RemoteStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (fetch_p50_us, fetch_p99_us) = self.fetch_latency.percentiles();
        let (get_durable_p50_us, get_durable_p99_us) = self.get_latency.percentiles();
        RemoteStats {
            reachable: self.reachable.load(Ordering::Relaxed),
            demoted_pages: l(&self.demoted_pages),
            demote_dropped: l(&self.demote_dropped),
            fetch_requests: l(&self.fetch_requests),
            fetch_hits: l(&self.fetch_hits),
            fetch_misses: l(&self.fetch_misses),
            durable_puts: l(&self.durable_puts),
            durable_gets: l(&self.durable_gets),
            not_replicated: l(&self.not_replicated),
            errors: l(&self.errors),
            corrupt: l(&self.corrupt),
            timeouts: l(&self.timeouts),
            bytes_sent: l(&self.bytes_sent),
            bytes_received: l(&self.bytes_received),
            stored_bytes_estimate: u64::try_from(self.stored_bytes.load(Ordering::Relaxed))
                .unwrap_or(0),
            fetch_p50_us,
            fetch_p99_us,
            get_durable_p50_us,
            get_durable_p99_us,
            down_transitions: l(&self.down_transitions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_over_the_window() {
        let l = Latency::new();
        assert_eq!(l.percentiles(), (0, 0));
        for us in 1..=100u64 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.percentiles(), (50, 99));
        for _ in 0..WINDOW {
            l.record(Duration::from_micros(7));
        }
        assert_eq!(l.percentiles(), (7, 7));
    }

    #[test]
    fn stored_estimate() {
        let c = Counters::new();
        c.stored(100);
        c.stored(300);
        c.deleted(1);
        assert_eq!(c.snapshot().stored_bytes_estimate, 200);
        c.deleted(5);
        assert_eq!(c.snapshot().stored_bytes_estimate, 0);
    }
}
