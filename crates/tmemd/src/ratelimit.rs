//! A tiny per-callsite log rate limiter: at most [`BURST`] lines per second per limiter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines allowed per second per callsite.
pub const BURST: u64 = 5;

/// One callsite's limiter (a `static`): second number in the high bits, count in the low 16.
#[derive(Debug)]
pub struct RateLimit(AtomicU64);

impl RateLimit {
    /// A fresh limiter.
    pub const fn new() -> Self {
        RateLimit(AtomicU64::new(0))
    }

    /// Whether a line may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (sec, n) = (cur >> 16, cur & 0xffff);
            let next = if sec == now {
                if n >= BURST {
                    return false;
                }
                cur + 1
            } else {
                (now << 16) | 1
            };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_a_burst() {
        let r = RateLimit::new();
        let allowed = (0..100).filter(|_| r.allow()).count() as u64;
        // At most two seconds' worth even if the second ticks over meanwhile.
        assert!((BURST..=2 * BURST).contains(&allowed), "{allowed}");
    }
}
