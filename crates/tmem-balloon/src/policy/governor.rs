//! The common wrapper around every policy: floor/max, rate limit on the way
//! down, fast give-back on the way up, and stuck detection.
//!
//! Order of rules in [`Governor::step`]:
//!
//! 1. **Progress check** on the previous target: if `actual` did not move
//!    toward it by at least `stuck_tolerance` for `stuck_after` consecutive
//!    intervals, the guest is flagged *stuck*; for `stuck_backoff` intervals
//!    the governor stops chasing (target = actual), then tries again.
//! 2. **Fast give-back**: a spike in major faults, swap-in, allocation stalls,
//!    an OOM kill, or MemAvailable under `min_available` → target =
//!    max(policy target, need, actual) where need = used + swap used +
//!    headroom, **in the same interval, without rate limit** (and even while
//!    stuck). Shrinking is then held off for `hold_intervals`.
//! 3. Otherwise the policy's target, clamped to [floor, max], with shrinking
//!    limited to `shrink_per_interval` bytes below `actual`.

use serde::{Deserialize, Serialize};

use super::{mib, AnyPolicy, Decision, GuestView, HostView, Policy, PolicyKind, MIB};

/// Thresholds for fast give-back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GiveBackConfig {
    /// Major faults per second. Default 200.
    pub major_faults_per_s: f64,
    /// Swap-in bytes per second. Default 4 MiB/s.
    pub swap_in_bytes_per_s: f64,
    /// Allocation stalls per second. Default 1.
    pub alloc_stalls_per_s: f64,
    /// Trigger when guest MemAvailable falls below this many bytes. Default 64 MiB.
    pub min_available: u64,
    /// ... or below this fraction of MemTotal. Default 0.05.
    pub min_available_fraction: f64,
    /// Headroom added to the need, as a fraction of the guest maximum. Default 0.10.
    pub headroom_fraction: f64,
    /// Minimum headroom, bytes. Default 64 MiB.
    pub headroom_min: u64,
    /// Intervals during which shrinking is suppressed after a give-back. Default 3.
    pub hold_intervals: u32,
    /// After a give-back, `need` becomes a learned floor that decays by
    /// 1/`learned_floor_decay` of itself per quiet interval (probing down
    /// again, senpai-style, instead of a sawtooth). 0 disables. Default 64.
    pub learned_floor_decay: u32,
}

impl Default for GiveBackConfig {
    fn default() -> Self {
        Self {
            major_faults_per_s: 200.0,
            swap_in_bytes_per_s: 4.0 * MIB as f64,
            alloc_stalls_per_s: 1.0,
            min_available: 64 * MIB,
            min_available_fraction: 0.05,
            headroom_fraction: 0.10,
            headroom_min: 64 * MIB,
            hold_intervals: 3,
            learned_floor_decay: 64,
        }
    }
}

/// Per-guest limits and the policy choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GovernorConfig {
    /// The policy.
    pub policy: PolicyKind,
    /// Never go below this logical size, bytes. Default 0 (policy floor only).
    pub floor: u64,
    /// Never go above this, bytes. Default `None` = guest maximum.
    pub max: Option<u64>,
    /// Largest shrink per interval, bytes. Default 256 MiB.
    pub shrink_per_interval: u64,
    /// Fast give-back thresholds.
    pub give_back: GiveBackConfig,
    /// Intervals without progress before flagging stuck. Default 6.
    pub stuck_after: u32,
    /// Movement that counts as progress / distance that counts as arrived, bytes. Default 4 MiB.
    pub stuck_tolerance: u64,
    /// Intervals to stop chasing after being flagged stuck. Default 12.
    pub stuck_backoff: u32,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::default(),
            floor: 0,
            max: None,
            shrink_per_interval: 256 * MIB,
            give_back: GiveBackConfig::default(),
            stuck_after: 6,
            stuck_tolerance: 4 * MIB,
            stuck_backoff: 12,
        }
    }
}

/// Why fast give-back fired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spike {
    /// Human-readable cause, e.g. `"major faults 950/s"`.
    pub cause: String,
    /// Bytes of logical size the guest needs now.
    pub need: u64,
    /// Collector timestamp (ms) of the stats that showed the spike.
    pub t_ms: u64,
}

/// The governor's output for one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorDecision {
    /// Final target and reason.
    pub decision: Decision,
    /// The policy's raw target before the wrapper's rules.
    pub policy_target: u64,
    /// Set when fast give-back fired this interval.
    pub spike: Option<Spike>,
    /// True while the guest is flagged stuck.
    pub stuck: bool,
}

/// Policy + common rules for one guest. Deterministic: no clock, no I/O.
#[derive(Debug, Clone)]
pub struct Governor {
    cfg: GovernorConfig,
    policy: AnyPolicy,
    hold: u32,
    consecutive_spikes: u32,
    learned_floor: u64,
    last_target: Option<u64>,
    last_actual: u64,
    no_progress: u32,
    stuck_left: u32,
    stuck: bool,
}

impl Governor {
    /// A governor running the policy chosen in `cfg.policy`.
    pub fn new(cfg: GovernorConfig) -> Self {
        let policy = AnyPolicy::from(&cfg.policy);
        Self::with_policy(cfg, policy)
    }

    /// A governor around an explicit policy instance.
    pub fn with_policy(cfg: GovernorConfig, policy: AnyPolicy) -> Self {
        Self {
            cfg,
            policy,
            hold: 0,
            consecutive_spikes: 0,
            learned_floor: 0,
            last_target: None,
            last_actual: 0,
            no_progress: 0,
            stuck_left: 0,
            stuck: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GovernorConfig {
        &self.cfg
    }

    /// The wrapped policy.
    pub fn policy(&self) -> &AnyPolicy {
        &self.policy
    }

    /// The current learned floor (bytes; 0 = none).
    pub fn learned_floor(&self) -> u64 {
        self.learned_floor
    }

    /// True while flagged stuck.
    pub fn is_stuck(&self) -> bool {
        self.stuck
    }

    /// Detect a give-back spike in the newest stats; `need` is in logical bytes.
    pub fn detect_spike(&self, g: &GuestView<'_>) -> Option<Spike> {
        let gb = &self.cfg.give_back;
        let s = g.history.latest()?;
        let r = g.history.rates();
        let over = |v: Option<f64>, lim: f64| v.is_some_and(|v| v >= lim);
        let cause = if r.oom_kills.is_some_and(|n| n > 0) {
            format!("{} OOM kill(s)", r.oom_kills.unwrap_or(0))
        } else if over(r.major_faults, gb.major_faults_per_s) {
            format!("major faults {:.0}/s", r.major_faults.unwrap_or(0.0))
        } else if over(r.swap_in_bytes, gb.swap_in_bytes_per_s) {
            format!(
                "swap-in {:.1}MiB/s",
                r.swap_in_bytes.unwrap_or(0.0) / MIB as f64
            )
        } else if over(r.alloc_stalls, gb.alloc_stalls_per_s) {
            format!("alloc stalls {:.1}/s", r.alloc_stalls.unwrap_or(0.0))
        } else {
            let (total, avail) = (s.total?, s.available?);
            let min_avail = gb.min_available.max(frac(total, gb.min_available_fraction));
            if avail >= min_avail {
                return None;
            }
            format!("MemAvailable {} < {}", mib(avail), mib(min_avail))
        };
        // Headroom doubles for each consecutive interval that still spikes
        // (the previous give-back was not enough), senpai-backoff style.
        let headroom = gb
            .headroom_min
            .max(frac(g.max, gb.headroom_fraction))
            .saturating_mul(1u64 << self.consecutive_spikes.min(16));
        // The guest is short at its current size, so it needs more than `actual`;
        // a known deficit (used + swapped out) may say more.
        let need = s
            .used()
            .unwrap_or(g.actual)
            .saturating_add(s.swap_used())
            .saturating_add(headroom)
            .saturating_add(g.kernel_offset())
            .max(g.actual.saturating_add(headroom));
        Some(Spike {
            cause,
            need,
            t_ms: s.t_ms,
        })
    }

    /// Run one interval: the policy, then the common rules.
    pub fn step(&mut self, g: &GuestView<'_>, host: &HostView) -> GovernorDecision {
        let max = self.cfg.max.unwrap_or(g.max).min(g.max);
        let floor = self.cfg.floor.min(max);
        let tol = self.cfg.stuck_tolerance;

        // 1. Progress toward the previous target.
        if let Some(t) = self.last_target {
            let before = self.last_actual.abs_diff(t);
            let now = g.actual.abs_diff(t);
            if now <= tol || before.saturating_sub(now) >= tol {
                self.no_progress = 0;
            } else {
                self.no_progress += 1;
            }
            if self.no_progress >= self.cfg.stuck_after.max(1) && !self.stuck {
                self.stuck = true;
                self.stuck_left = self.cfg.stuck_backoff;
            }
        }
        self.last_actual = g.actual;

        let raw = self.policy.decide(g, host);
        let policy_target = raw.target;

        // 2. Fast give-back.
        if let Some(spike) = self.detect_spike(g) {
            self.hold = self.cfg.give_back.hold_intervals;
            self.consecutive_spikes = self.consecutive_spikes.saturating_add(1);
            if self.cfg.give_back.learned_floor_decay > 0 {
                self.learned_floor = self.learned_floor.max(spike.need);
            }
            let target = policy_target
                .max(spike.need)
                .max(g.actual)
                .clamp(floor, max);
            let reason = format!(
                "give-back: {}; need {} -> target {} (policy: {})",
                spike.cause,
                mib(spike.need),
                mib(target),
                raw.reason
            );
            // A give-back is a new chase; it also clears a stuck flag.
            self.stuck = false;
            self.stuck_left = 0;
            self.no_progress = 0;
            self.last_target = Some(target);
            return GovernorDecision {
                decision: Decision::new(target, reason),
                policy_target,
                spike: Some(spike),
                stuck: false,
            };
        }

        // Stuck: stop chasing for a while.
        if self.stuck {
            if self.stuck_left == 0 {
                self.stuck = false;
                self.no_progress = 0;
            } else {
                self.stuck_left -= 1;
                self.last_target = None;
                let target = g.actual.clamp(floor, max);
                return GovernorDecision {
                    decision: Decision::new(
                        target,
                        format!(
                            "stuck: no progress toward target for {} intervals; holding at {} ({} intervals left); policy: {}",
                            self.cfg.stuck_after, mib(g.actual), self.stuck_left, raw.reason
                        ),
                    ),
                    policy_target,
                    spike: None,
                    stuck: true,
                };
            }
        }

        // 3. Policy target with floor/max, learned floor and rate limit.
        self.consecutive_spikes = 0;
        let decay = u64::from(self.cfg.give_back.learned_floor_decay);
        if decay > 0 && self.hold == 0 {
            self.learned_floor -= self.learned_floor / decay;
        }
        let mut reason = raw.reason;
        let mut target = policy_target.clamp(floor, max);
        if target < g.actual && self.hold > 0 {
            self.hold -= 1;
            reason = format!("hold after give-back ({} left): {reason}", self.hold);
            target = g.actual.clamp(floor, max);
        } else {
            self.hold = self.hold.saturating_sub(1);
            if target < self.learned_floor {
                target = self.learned_floor.clamp(floor, max);
                reason = format!(
                    "{reason}; learned floor {} (from last give-back)",
                    mib(target)
                );
            }
            if target < g.actual {
                let limit = g.actual.saturating_sub(self.cfg.shrink_per_interval);
                if target < limit {
                    reason = format!(
                        "{reason}; rate-limited to -{}/interval",
                        mib(self.cfg.shrink_per_interval)
                    );
                    target = limit;
                }
            }
        }
        // `actual` above `max` (impossible for a real balloon) must not leak through.
        let target = target.clamp(floor, max);
        if target != policy_target
            && !reason.contains("rate-limited")
            && !reason.contains("learned floor")
            && !reason.starts_with("hold")
        {
            reason = format!("{reason}; clamped to [{}, {}]", mib(floor), mib(max));
        }
        self.last_target = Some(target);
        GovernorDecision {
            decision: Decision::new(target, reason),
            policy_target,
            spike: None,
            stuck: false,
        }
    }
}

fn frac(x: u64, f: f64) -> u64 {
    let v = x as f64 * f;
    if v.is_finite() && v > 0.0 {
        v as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{SelfBalloonConfig, StaticPolicy};
    use crate::stats::{GuestStats, StatsHistory};

    const GIB: u64 = 1 << 30;

    fn static_gov() -> Governor {
        Governor::with_policy(GovernorConfig::default(), AnyPolicy::Static(StaticPolicy))
    }

    fn stats(t_ms: u64, total: u64, avail: u64, committed: u64, mf: u64) -> GuestStats {
        GuestStats {
            t_ms,
            total: Some(total),
            available: Some(avail),
            committed: Some(committed),
            major_faults: Some(mf),
            swap_in_bytes: Some(0),
            alloc_stalls: Some(0),
            oom_kills: Some(0),
            swap_total: Some(0),
            swap_free: Some(0),
            ..Default::default()
        }
    }

    fn sb_cfg(shrink: u64) -> GovernorConfig {
        GovernorConfig {
            policy: PolicyKind::SelfBalloon(SelfBalloonConfig {
                reserved_mb: Some(0),
                include_swap_used: false,
                ..Default::default()
            }),
            shrink_per_interval: shrink,
            ..Default::default()
        }
    }

    #[test]
    fn rate_limit_on_the_way_down() {
        let mut gov = Governor::new(sb_cfg(100 * MIB));
        let mut h = StatsHistory::new(8);
        h.push(stats(0, 8 * GIB, 7 * GIB, GIB, 0));
        let g = GuestView {
            history: &h,
            actual: 8 * GIB,
            max: 8 * GIB,
            interval_ms: 1000,
        };
        let d = gov.step(&g, &HostView::default());
        // Policy wants 8 - 7/8 GiB = 7.125 GiB; limited to 8 GiB - 100 MiB.
        assert_eq!(d.policy_target, 8 * GIB - 7 * GIB / 8);
        assert_eq!(d.decision.target, 8 * GIB - 100 * MIB);
        assert!(d.decision.reason.contains("rate-limited"));
        assert!(d.spike.is_none());
    }

    #[test]
    fn floor_and_max_clamp() {
        let cfg = GovernorConfig {
            floor: 7900 * MIB,
            max: Some(7 * GIB),
            ..sb_cfg(GIB)
        };
        let mut gov = Governor::new(cfg);
        let mut h = StatsHistory::new(8);
        h.push(stats(0, 8 * GIB, 7 * GIB, GIB, 0));
        let g = GuestView {
            history: &h,
            actual: 8 * GIB,
            max: 8 * GIB,
            interval_ms: 1000,
        };
        // floor (7900 MiB) is capped by max (7 GiB): max wins.
        assert_eq!(gov.step(&g, &HostView::default()).decision.target, 7 * GIB);
        let cfg = GovernorConfig {
            floor: 7900 * MIB,
            ..sb_cfg(GIB)
        };
        let mut gov = Governor::new(cfg);
        assert_eq!(
            gov.step(&g, &HostView::default()).decision.target,
            7900 * MIB
        );
        // Static baseline: always max.
        let mut st = static_gov();
        assert_eq!(st.step(&g, &HostView::default()).decision.target, 8 * GIB);
    }

    #[test]
    fn fast_give_back_on_fault_spike_same_interval() {
        let mut gov = Governor::new(sb_cfg(100 * MIB));
        let mut h = StatsHistory::new(8);
        // Squeezed guest: 2 GiB actual, 1.9 GiB MemTotal, committed small (policy wants to shrink).
        h.push(stats(0, 1900 * MIB, 800 * MIB, 500 * MIB, 1000));
        h.push(stats(1000, 1900 * MIB, 700 * MIB, 500 * MIB, 3000)); // 2000 faults/s
        let g = GuestView {
            history: &h,
            actual: 2 * GIB,
            max: 8 * GIB,
            interval_ms: 1000,
        };
        let d = gov.step(&g, &HostView::default());
        let spike = d.spike.clone().expect("spike");
        assert!(spike.cause.contains("major faults"), "{}", spike.cause);
        // need = max(used (1200) + swap 0 + headroom + offset (148 MiB), actual + headroom),
        // headroom = max(64 MiB, 10% of 8 GiB).
        let headroom = frac(8 * GIB, 0.10);
        assert!(1200 * MIB + headroom + 148 * MIB < 2 * GIB + headroom);
        let need = 2 * GIB + headroom;
        assert_eq!(spike.need, need);
        assert_eq!(d.decision.target, need);
        assert!(d.decision.target > g.actual, "deflates at once");
        // Next interval, quiet again, policy wants to shrink: held for hold_intervals.
        h.push(stats(2000, 1900 * MIB, 1500 * MIB, 500 * MIB, 3000));
        let g2 = GuestView {
            history: &h,
            actual: need,
            max: 8 * GIB,
            interval_ms: 1000,
        };
        for left in (0..3).rev() {
            let d = gov.step(&g2, &HostView::default());
            assert_eq!(d.decision.target, need, "held");
            assert!(
                d.decision.reason.starts_with("hold"),
                "{} ({left})",
                d.decision.reason
            );
        }
        // Then the learned floor (need, decaying 1/64 per interval) bounds the shrink.
        let d = gov.step(&g2, &HostView::default());
        assert_eq!(d.decision.target, need - need / 64);
        assert!(
            d.decision.reason.contains("learned floor"),
            "{}",
            d.decision.reason
        );
    }

    /// Hostile guest-reported values (any u64) never overflow-panic any policy.
    #[test]
    fn hostile_stats_never_panic() {
        use crate::policy::PressureConfig;
        let mut x: u64 = 12345;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match x >> 62 {
                0 => Some(u64::MAX - (x & 0xff)),
                1 => None,
                2 => Some(x >> 40),
                _ => Some(x),
            }
        };
        let kinds = [
            PolicyKind::Static,
            PolicyKind::SelfBalloon(SelfBalloonConfig::default()),
            PolicyKind::Pressure(PressureConfig::default()),
        ];
        for kind in kinds {
            let mut gov = Governor::new(GovernorConfig {
                policy: kind,
                ..Default::default()
            });
            let mut h = StatsHistory::new(4);
            for t in 0..500u64 {
                let s = GuestStats {
                    t_ms: t * 1000,
                    total: next(),
                    available: next(),
                    free: next(),
                    cache: next(),
                    committed: next(),
                    swap_total: next(),
                    swap_free: next(),
                    major_faults: next(),
                    swap_in_bytes: next(),
                    alloc_stalls: next(),
                    oom_kills: next(),
                    ..Default::default()
                };
                h.push(s.balloon_normalized(next().unwrap_or(0), next().unwrap_or(0)));
                let g = GuestView {
                    history: &h,
                    actual: next().unwrap_or(0),
                    max: next().unwrap_or(u64::MAX),
                    interval_ms: 1000,
                };
                let host = HostView {
                    total: next().unwrap_or(0),
                    available: next().unwrap_or(0),
                    psi: None,
                    share_target: next(),
                };
                let d = gov.step(&g, &host);
                assert!(
                    d.decision.target <= g.max.max(gov.config().floor),
                    "{d:?} {} {}",
                    g.actual,
                    g.max
                );
            }
        }
    }

    #[test]
    fn repeated_spikes_double_headroom() {
        let mut gov = Governor::new(sb_cfg(100 * MIB));
        let mut h = StatsHistory::new(8);
        let mut mf = 0;
        let mut needs = Vec::new();
        for t in 0..4 {
            h.push(stats(t * 1000, 1900 * MIB, 1000 * MIB, 500 * MIB, mf));
            mf += 5000;
            let g = GuestView {
                history: &h,
                actual: 2 * GIB,
                max: 8 * GIB,
                interval_ms: 1000,
            };
            let d = gov.step(&g, &HostView::default());
            needs.push(d.spike.map(|s| s.need));
        }
        let hr = frac(8 * GIB, 0.10);
        assert_eq!(needs[0], None, "first sample has no rate");
        assert_eq!(needs[1], Some(2 * GIB + hr));
        assert_eq!(needs[2], Some(2 * GIB + 2 * hr));
        assert_eq!(needs[3], Some(2 * GIB + 4 * hr));
    }

    #[test]
    fn give_back_on_low_available_swapin_stalls_oom() {
        let gov = Governor::new(sb_cfg(100 * MIB));
        let mut h = StatsHistory::new(8);
        h.push(stats(0, GIB, 10 * MIB, 500 * MIB, 0));
        let g = GuestView {
            history: &h,
            actual: GIB,
            max: 4 * GIB,
            interval_ms: 1000,
        };
        assert!(gov
            .detect_spike(&g)
            .is_some_and(|s| s.cause.contains("MemAvailable")));

        let base = stats(0, GIB, 500 * MIB, 500 * MIB, 0);
        for (field, cause) in [(0, "swap-in"), (1, "alloc stalls"), (2, "OOM")] {
            let mut h = StatsHistory::new(8);
            h.push(base);
            let mut s = GuestStats { t_ms: 1000, ..base };
            match field {
                0 => s.swap_in_bytes = Some(64 * MIB),
                1 => s.alloc_stalls = Some(10),
                _ => s.oom_kills = Some(1),
            }
            h.push(s);
            let g = GuestView { history: &h, ..g };
            let sp = gov.detect_spike(&g);
            assert!(
                sp.as_ref().is_some_and(|s| s.cause.contains(cause)),
                "{sp:?}"
            );
        }
        // Quiet guest: no spike.
        let mut h = StatsHistory::new(8);
        h.push(base);
        h.push(GuestStats { t_ms: 1000, ..base });
        let g = GuestView { history: &h, ..g };
        assert!(gov.detect_spike(&g).is_none());
    }

    #[test]
    fn stuck_detection_stops_chasing_then_retries() {
        let cfg = GovernorConfig {
            stuck_after: 3,
            stuck_backoff: 2,
            ..sb_cfg(100 * MIB)
        };
        let mut gov = Governor::new(cfg);
        let mut h = StatsHistory::new(8);
        h.push(stats(0, 8 * GIB, 7 * GIB, GIB, 0));
        // The guest never moves from 8 GiB.
        let g = GuestView {
            history: &h,
            actual: 8 * GIB,
            max: 8 * GIB,
            interval_ms: 1000,
        };
        let mut flags = Vec::new();
        for _ in 0..8 {
            let d = gov.step(&g, &HostView::default());
            flags.push((d.stuck, d.decision.target == 8 * GIB));
        }
        // Steps 0..=2 chase (1..=3 no progress), step 3 flags stuck; 2 backoff intervals, then retry.
        assert_eq!(flags[0], (false, false));
        assert_eq!(flags[2], (false, false));
        assert_eq!(flags[3], (true, true));
        assert_eq!(flags[4], (true, true));
        assert_eq!(flags[5], (false, false), "{flags:?}");
        assert!(gov.config().stuck_after == 3);
    }

    #[test]
    fn progress_resets_stuck_counter() {
        let cfg = GovernorConfig {
            stuck_after: 2,
            ..sb_cfg(100 * MIB)
        };
        let mut gov = Governor::new(cfg);
        let mut h = StatsHistory::new(8);
        h.push(stats(0, 8 * GIB, 7 * GIB, GIB, 0));
        let mut actual = 8 * GIB;
        for _ in 0..10 {
            let g = GuestView {
                history: &h,
                actual,
                max: 8 * GIB,
                interval_ms: 1000,
            };
            let d = gov.step(&g, &HostView::default());
            assert!(!d.stuck);
            actual = d.decision.target; // guest follows
        }
        assert!(!gov.is_stuck());
    }
}
