//! The daemon's memory as the host sees it: its resident set, the C heap's habit of keeping
//! freed memory, and the background compactor that gives fragmented slabs back.
//!
//! The pool's payloads live in regions that tmem-core maps and unmaps itself, so they go
//! back to the kernel the moment they are freed. Its tables (index, dedup) and everything
//! else the daemon allocates come from glibc's heap, which keeps freed blocks for reuse:
//! [`tune_heap`] fixes the mmap threshold (so large tables are mapped on their own and
//! unmapped when freed, instead of glibc raising the threshold as it does by default) and
//! [`trim_heap`] hands free heap pages back after the pool shrank.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use crate::daemon::Daemon;

/// Allocations at least this large are mapped on their own (glibc's default start value,
/// here fixed rather than raised on every free).
const MMAP_THRESHOLD: i32 = 128 << 10;
/// glibc trims the top of its main heap when this much is free there.
const TRIM_THRESHOLD: i32 = 1 << 20;

/// Sets glibc's heap to give memory back: a fixed mmap threshold and a small trim
/// threshold. Call once at start, before the pool fills.
pub fn tune_heap() {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Gives the free pages of every glibc heap back to the kernel (`malloc_trim(0)`).
pub fn trim_heap() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's resident set in bytes (`VmRSS` of `/proc/self/status`), 0 if unknown.
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// When to compact in the background.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactPolicy {
    /// Compact when the bytes compaction could free exceed this fraction of what the pool
    /// holds (0 disables background compaction; on demand and under pressure it still runs).
    pub threshold: f64,
    /// ... and exceed this many bytes (small pools are not worth the work).
    pub min_bytes: u64,
    /// How often to look.
    pub interval: Duration,
    /// Payloads moved per look at most (the compactor yields between steps).
    pub max_moves: usize,
}

impl Default for CompactPolicy {
    fn default() -> Self {
        CompactPolicy {
            threshold: 0.10,
            min_bytes: 4 << 20,
            interval: Duration::from_millis(250),
            max_moves: 64 << 10,
        }
    }
}

impl CompactPolicy {
    /// Whether fragmentation is high enough to compact.
    pub fn due(&self, compactable: u64, held: u64) -> bool {
        self.threshold > 0.0
            && compactable >= self.min_bytes
            && compactable as f64 > self.threshold * held as f64
    }
}

/// Starts the background compactor: every interval, if fragmentation is over the policy's
/// threshold, compacts (in bounded steps, alongside the data path) and trims the heap.
pub fn spawn_compactor(daemon: Weak<Daemon>, policy: CompactPolicy) {
    if policy.threshold <= 0.0 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tmem-compact".into())
        .spawn(move || loop {
            std::thread::sleep(policy.interval);
            let Some(d) = daemon.upgrade() else { break };
            if d.stopping.load(Ordering::Relaxed) {
                break;
            }
            let engine = d.engine().clone();
            drop(d);
            if policy.due(engine.compactable_bytes(), engine.held_bytes()) {
                let step = engine.compact(policy.max_moves);
                if step.bytes_freed > 0 {
                    trim_heap();
                    tracing::debug!(
                        moved = step.moved,
                        freed = step.bytes_freed,
                        "background compaction"
                    );
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the background compactor");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_thresholds() {
        let p = CompactPolicy::default();
        assert!(!p.due(1 << 20, 2 << 20), "below the byte floor");
        assert!(!p.due(8 << 20, 100 << 20), "below the fraction");
        assert!(p.due(16 << 20, 100 << 20));
        let off = CompactPolicy {
            threshold: 0.0,
            ..p
        };
        assert!(!off.due(1 << 30, 1 << 30));
    }

    #[test]
    fn rss_is_read() {
        assert!(process_rss() > 0);
    }
}
