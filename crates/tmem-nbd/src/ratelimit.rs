//! Per-callsite log rate limiting for peer-triggerable messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages allowed per callsite per second.
pub const BURST_PER_SEC: u64 = 5;

/// One callsite's state: `(second << 16) | count` in one atomic.
#[derive(Debug)]
pub struct RateLimiter(AtomicU64);

impl RateLimiter {
    /// A fresh limiter (for `static` use).
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// True if a message may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            & 0xffff_ffff_ffff;
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (sec, count) = (cur >> 16, cur & 0xffff);
            let next = if sec != now {
                (now << 16) | 1
            } else if count < BURST_PER_SEC {
                cur + 1
            } else {
                return false;
            };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing` event at `$lvl`, limited to [`BURST_PER_SEC`] per second at this callsite.
#[macro_export]
#[doc(hidden)]
macro_rules! rl_event {
    ($lvl:ident, $($arg:tt)+) => {{
        static RL: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new();
        if RL.allow() {
            ::tracing::$lvl!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    #[test]
    fn limits_burst() {
        let rl = super::RateLimiter::new();
        let n = (0..100).filter(|_| rl.allow()).count() as u64;
        // At most two windows can be touched in a fast loop.
        assert!(
            (super::BURST_PER_SEC..=2 * super::BURST_PER_SEC).contains(&n),
            "{n}"
        );
    }
}
