//! xen-selfballoon (`drivers/xen/xen-selfballoon.c`, final version), exactly.
//!
//! ```text
//! cur  = MemTotal                       (totalram_pages)
//! goal = Committed_AS + totalreserve + reserved_mb  [+ swap in use, see below]
//! if cur > goal: tgt = cur - (cur - goal) / downhysteresis      (8)
//! if cur < goal: tgt = cur + (goal - cur) / uphysteresis        (1)
//! tgt  = max(tgt, floor)                (piecewise-linear, see selfballoon_floor)
//! balloon target = tgt + (actual - MemTotal)
//! ```
//!
//! `reserved_mb` defaults to 10 % of the guest's RAM (boot MemTotal, i.e.
//! MemTotal + balloon at the first sample, truncated to whole MiB), as
//! `xen_selfballoon_init` does. The Xen
//! driver adds `frontswap_curr_pages()` to the goal ("room to repatriate");
//! the KVM analogue is guest swap in use (the tmem pool backs guest swap), so
//! [`SelfBalloonConfig::include_swap_used`] defaults to true.

use serde::{Deserialize, Serialize};

use super::{mib, Decision, GuestView, HostView, Policy, MIB};
use crate::stats::PAGE_SIZE;

/// Tunables; defaults are the driver's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfBalloonConfig {
    /// Move 1/N of the gap per interval when shrinking. Default 8; 0 is treated as 1.
    pub down_hysteresis: u32,
    /// Move 1/N of the gap per interval when growing. Default 1; 0 is treated as 1.
    pub up_hysteresis: u32,
    /// Reserve added to the goal, MiB. Default `None` = 10 % of RAM.
    pub reserved_mb: Option<u64>,
    /// If nonzero, floor = totalreserve + this many MiB. Default 0 (piecewise floor).
    pub min_usable_mb: u64,
    /// The guest kernel's `totalreserve_pages`, in bytes (not visible from
    /// /proc/meminfo; configure it if known). Default 0.
    pub totalreserve_bytes: u64,
    /// Add guest swap in use to the goal (frontswap analogue). Default true.
    pub include_swap_used: bool,
}

impl Default for SelfBalloonConfig {
    fn default() -> Self {
        Self {
            down_hysteresis: 8,
            up_hysteresis: 1,
            reserved_mb: None,
            min_usable_mb: 0,
            totalreserve_bytes: 0,
            include_swap_used: true,
        }
    }
}

/// The selfballoon floor ("piecewise linear function ending in ~3 % slope").
///
/// `max` is the guest's maximum size (`max_pfn`), `totalreserve` the kernel's
/// reserve; all in bytes. Returns a MemTotal-domain minimum.
pub fn selfballoon_floor(max: u64, totalreserve: u64, min_usable_mb: u64) -> u64 {
    // Computed in 4 KiB pages like the driver, so integer division rounds the same way.
    let p = |b: u64| b / PAGE_SIZE;
    let mb2pages = |mb: u64| mb.saturating_mul(MIB / PAGE_SIZE);
    let (max_pfn, reserve) = (p(max), p(totalreserve));
    let floor = if min_usable_mb != 0 {
        reserve.saturating_add(mb2pages(min_usable_mb))
    } else {
        let useful = max_pfn.saturating_sub(reserve);
        if useful < mb2pages(16) {
            max_pfn // not worth ballooning
        } else if useful < mb2pages(64) {
            reserve + mb2pages(16) + (useful - mb2pages(16)) / 2
        } else if useful < mb2pages(512) {
            reserve + mb2pages(40) + (useful - mb2pages(40)) / 8
        } else {
            reserve + mb2pages(99) + (useful - mb2pages(99)) / 32
        }
    };
    floor.saturating_mul(PAGE_SIZE)
}

/// The xen-selfballoon policy.
#[derive(Debug, Clone)]
pub struct SelfBalloon {
    cfg: SelfBalloonConfig,
    reserve: Option<u64>,
}

impl SelfBalloon {
    /// New policy with `cfg`.
    pub fn new(cfg: SelfBalloonConfig) -> Self {
        let reserve = cfg.reserved_mb.map(|mb| mb.saturating_mul(MIB));
        Self { cfg, reserve }
    }

    /// The reserve in use (bytes), once known.
    pub fn reserve(&self) -> Option<u64> {
        self.reserve
    }
}

impl Policy for SelfBalloon {
    fn name(&self) -> &'static str {
        "selfballoon"
    }

    fn decide(&mut self, g: &GuestView<'_>, _host: &HostView) -> Decision {
        let Some(s) = g.history.latest() else {
            return Decision::new(g.actual, "selfballoon: no stats yet; hold");
        };
        let (Some(cur), Some(committed)) = (s.total, s.committed) else {
            return Decision::new(g.actual, "selfballoon: MemTotal/Committed_AS missing; hold");
        };
        // PAGES2MB(totalram_pages() / 10) at driver init, i.e. 10 % of the
        // boot MemTotal truncated to whole MiB. If we start on an inflated
        // guest, the boot MemTotal is MemTotal + balloon (max - actual).
        let boot_total = cur.saturating_add(g.max.saturating_sub(g.actual));
        let reserve = *self.reserve.get_or_insert((boot_total / 10) / MIB * MIB);
        let mut goal = committed
            .saturating_add(self.cfg.totalreserve_bytes)
            .saturating_add(reserve);
        if self.cfg.include_swap_used {
            goal = goal.saturating_add(s.swap_used());
        }
        let down = u64::from(self.cfg.down_hysteresis.max(1));
        let up = u64::from(self.cfg.up_hysteresis.max(1));
        // In pages, as the driver does (integer division of page counts).
        let (cur_p, goal_p) = (cur / PAGE_SIZE, goal / PAGE_SIZE);
        let (tgt_p, dir) = if cur_p > goal_p {
            (cur_p - (cur_p - goal_p) / down, "shrink")
        } else if cur_p < goal_p {
            (cur_p + (goal_p - cur_p) / up, "grow")
        } else {
            (cur_p, "steady")
        };
        let mut tgt = tgt_p * PAGE_SIZE;
        let floor = selfballoon_floor(g.max, self.cfg.totalreserve_bytes, self.cfg.min_usable_mb);
        let floored = tgt < floor;
        tgt = tgt.max(floor);
        let target = tgt.saturating_add(g.kernel_offset());
        Decision::new(
            target,
            format!(
                "selfballoon {dir}: goal {} (committed {} + reserve {}), MemTotal {} -> {}{}",
                mib(goal),
                mib(committed),
                mib(reserve),
                mib(cur),
                mib(tgt),
                if floored {
                    format!(" (floor {})", mib(floor))
                } else {
                    String::new()
                }
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{GuestStats, StatsHistory};

    fn view(h: &StatsHistory, actual: u64, max: u64) -> GuestView<'_> {
        GuestView {
            history: h,
            actual,
            max,
            interval_ms: 5000,
        }
    }

    fn hist(total: u64, committed: u64) -> StatsHistory {
        let mut h = StatsHistory::new(4);
        h.push(GuestStats {
            t_ms: 1,
            total: Some(total),
            committed: Some(committed),
            ..Default::default()
        });
        h
    }

    #[test]
    fn floor_pieces() {
        // 1 GiB guest: totalreserve + 99 + (1024 - 99)/32 MiB ≈ totalreserve + 128 MiB.
        let f = selfballoon_floor(1024 * MIB, 0, 0);
        assert_eq!(f, 99 * MIB + (925 * MIB) / 32);
        assert!((127 * MIB..=129 * MIB).contains(&f), "{}", mib(f));
        let tr = 20 * MIB;
        assert_eq!(
            selfballoon_floor(1044 * MIB, tr, 0),
            tr + 99 * MIB + (1024 - 99) * MIB / 32
        );
        // < 16 MiB useful: floor = max (not worth ballooning).
        assert_eq!(selfballoon_floor(15 * MIB, 0, 0), 15 * MIB);
        // [16, 64): 16 + (useful - 16)/2.
        assert_eq!(selfballoon_floor(48 * MIB, 0, 0), 32 * MIB);
        // [64, 512): 40 + (useful - 40)/8.
        assert_eq!(selfballoon_floor(256 * MIB, 0, 0), 67 * MIB);
        // >= 512: 99 + (useful - 99)/32; 4 GiB → 99 + 124.9.
        assert_eq!(
            selfballoon_floor(4096 * MIB, 0, 0),
            99 * MIB + 3997 * MIB / 32
        );
        // Continuity-ish at the 64 MiB boundary: 16+24=40 vs 40+3=43.
        assert!(selfballoon_floor(64 * MIB, 0, 0) >= selfballoon_floor(63 * MIB, 0, 0));
        // min_usable_mb override.
        assert_eq!(selfballoon_floor(1024 * MIB, tr, 300), tr + 300 * MIB);
    }

    #[test]
    fn down_hysteresis_moves_one_eighth() {
        // 4 GiB guest, committed 1 GiB, reserve default 10% of 4096 = 409 MiB.
        let max = 4096 * MIB;
        let h = hist(max, 1024 * MIB);
        let mut p = SelfBalloon::new(SelfBalloonConfig::default());
        let d = p.decide(&view(&h, max, max), &HostView::default());
        assert_eq!(p.reserve(), Some(409 * MIB));
        let goal = 1024 * MIB + 409 * MIB;
        assert_eq!(d.target, max - (max - goal) / 8);
        assert!(d.reason.contains("shrink"), "{}", d.reason);
    }

    #[test]
    fn up_hysteresis_closes_whole_gap() {
        let max = 4096 * MIB;
        let h = hist(1500 * MIB, 2000 * MIB);
        let cfg = SelfBalloonConfig {
            reserved_mb: Some(100),
            ..Default::default()
        };
        let mut p = SelfBalloon::new(cfg);
        let d = p.decide(&view(&h, 1500 * MIB, max), &HostView::default());
        assert_eq!(d.target, 2100 * MIB);
        // up_hysteresis 2 moves half.
        let cfg = SelfBalloonConfig {
            reserved_mb: Some(100),
            up_hysteresis: 2,
            ..Default::default()
        };
        let d = SelfBalloon::new(cfg).decide(&view(&h, 1500 * MIB, max), &HostView::default());
        assert_eq!(d.target, 1500 * MIB + 300 * MIB);
    }

    #[test]
    fn floor_applies_and_offset_converts_domain() {
        // 1 GiB guest with tiny commit: target never below the floor.
        let max = 1024 * MIB;
        let total = 1000 * MIB; // kernel keeps 24 MiB outside MemTotal
        let h = hist(140 * MIB, 10 * MIB);
        let mut p = SelfBalloon::new(SelfBalloonConfig {
            reserved_mb: Some(0),
            ..Default::default()
        });
        // Guest at MemTotal 140 MiB, actual 164 MiB: 140 - 130/8 < floor (≈128 MiB).
        let _ = total;
        let d = p.decide(&view(&h, 164 * MIB, max), &HostView::default());
        assert_eq!(d.target, selfballoon_floor(max, 0, 0) + 24 * MIB);
        assert!(d.reason.contains("floor"));
    }

    #[test]
    fn reserve_defaults_to_ten_percent_and_swap_counts() {
        let mut h = StatsHistory::new(4);
        h.push(GuestStats {
            t_ms: 1,
            total: Some(2000 * MIB),
            committed: Some(500 * MIB),
            swap_total: Some(1000 * MIB),
            swap_free: Some(900 * MIB),
            ..Default::default()
        });
        let mut p = SelfBalloon::new(SelfBalloonConfig::default());
        let d = p.decide(&view(&h, 2000 * MIB, 2000 * MIB), &HostView::default());
        let goal = 500 * MIB + 200 * MIB + 100 * MIB;
        assert_eq!(d.target, 2000 * MIB - (2000 * MIB - goal) / 8);
        let mut p = SelfBalloon::new(SelfBalloonConfig {
            include_swap_used: false,
            ..Default::default()
        });
        let d = p.decide(&view(&h, 2000 * MIB, 2000 * MIB), &HostView::default());
        assert_eq!(d.target, 2000 * MIB - (2000 * MIB - 700 * MIB) / 8);
    }

    #[test]
    fn page_granular_like_the_driver() {
        // Gap of 9 pages: the driver moves 9/8 = 1 page, not 4608 bytes.
        let cur = 4096 * MIB;
        let committed = cur - 9 * PAGE_SIZE;
        let h = hist(cur, committed);
        let cfg = SelfBalloonConfig {
            reserved_mb: Some(0),
            ..Default::default()
        };
        let d = SelfBalloon::new(cfg).decide(&view(&h, cur, 8192 * MIB), &HostView::default());
        assert_eq!(d.target, cur - PAGE_SIZE);
        // Sub-page remainders of the inputs are truncated.
        assert_eq!(selfballoon_floor(256 * MIB + 100, 0, 0), 67 * MIB);
    }

    #[test]
    fn reserve_uses_boot_memtotal_when_started_inflated() {
        // 2 GiB guest already inflated to 1 GiB: MemTotal 1000 MiB, offset 24 MiB.
        let h = hist(1000 * MIB, 100 * MIB);
        let mut p = SelfBalloon::new(SelfBalloonConfig::default());
        p.decide(&view(&h, 1024 * MIB, 2048 * MIB), &HostView::default());
        assert_eq!(p.reserve(), Some(202 * MIB)); // (1000 + 1024) / 10, truncated
    }

    #[test]
    fn converges_geometrically_without_stats_holds() {
        let empty = StatsHistory::new(2);
        let mut p = SelfBalloon::new(SelfBalloonConfig::default());
        assert_eq!(
            p.decide(&view(&empty, 777, 1000), &HostView::default())
                .target,
            777
        );
        // Repeated application: gap shrinks by 7/8 each step.
        let max = 8192 * MIB;
        let mut cur = max;
        let mut p = SelfBalloon::new(SelfBalloonConfig {
            reserved_mb: Some(0),
            ..Default::default()
        });
        for _ in 0..60 {
            let h = hist(cur, 1024 * MIB);
            let next = p.decide(&view(&h, cur, max), &HostView::default()).target;
            assert!(next <= cur);
            assert!(next - 1024 * MIB >= (cur - 1024 * MIB) * 7 / 8 - 1);
            cur = next;
        }
        assert!(cur - 1024 * MIB < 32 * MIB);
    }
}
