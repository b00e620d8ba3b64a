//! Deterministic simulation harness: a scripted guest model plus a clock,
//! driven by a [`Governor`]. Used by tests, benches and the lab.
//!
//! The guest model is deliberately simple but has the effects a balloon
//! policy must respect:
//!
//! * `Committed_AS` follows a piecewise-linear script; a fraction of it is
//!   touched anonymous memory (the anon working set).
//! * `MemTotal = actual - kernel_offset`; slab is fixed; page cache fills what
//!   is left up to a file working set; cache misses are refaults + major faults.
//! * When the anon working set does not fit, the excess goes to swap
//!   (swap-out); a fixed share of swapped pages is touched every tick
//!   (swap-in + major faults, thrash); returning memory swaps pages back in.
//!   Swap exhaustion counts an OOM kill. Allocation stalls while swapping.
//! * The balloon inflates at most `inflate_per_tick` per interval (guest
//!   driver speed) and never below `stuck_at`; deflation is immediate.
//!
//! Each tick: the model produces stats at `t = tick * interval`, the governor
//! decides, the balloon moves toward the target (visible next tick).

use serde::{Deserialize, Serialize};

use crate::policy::{Governor, GovernorConfig, GuestView, HostView, MIB};
use crate::stats::{GuestStats, StatsHistory, PAGE_SIZE};

/// A scripted guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestModel {
    /// Boot size (bytes).
    pub max: u64,
    /// Logical bytes not in MemTotal (kernel image, reserved). Default 24 MiB.
    pub kernel_offset: u64,
    /// Unreclaimable slab etc. (bytes). Default 64 MiB.
    pub slab: u64,
    /// `Committed_AS` script: `(tick, bytes)` points, linearly interpolated,
    /// held constant outside.
    pub committed: Vec<(u64, u64)>,
    /// Fraction of Committed_AS that is touched anon memory. Default 0.9.
    pub resident_fraction: f64,
    /// File working set the guest would like cached (bytes). Default 256 MiB.
    pub cache_wanted: u64,
    /// Swap size (bytes). Default = max.
    pub swap_total: u64,
    /// Fraction of swapped pages touched per tick (thrash). Default 0.05.
    pub swap_touch: f64,
    /// Fraction of missing cache refaulted per tick. Default 0.1.
    pub refault_touch: f64,
    /// Fastest inflate per tick (bytes). Default 512 MiB.
    pub inflate_per_tick: u64,
    /// The balloon cannot inflate below this logical size. Default 0.
    pub stuck_at: u64,
    /// Initial logical size. Default `max`.
    pub start: Option<u64>,
}

impl GuestModel {
    /// A guest of `max` bytes with the given Committed_AS script and defaults.
    pub fn new(max: u64, committed: Vec<(u64, u64)>) -> Self {
        Self {
            max,
            kernel_offset: 24 * MIB,
            slab: 64 * MIB,
            committed,
            resident_fraction: 0.9,
            cache_wanted: 256 * MIB,
            swap_total: max,
            swap_touch: 0.05,
            refault_touch: 0.1,
            inflate_per_tick: 512 * MIB,
            stuck_at: 0,
            start: None,
        }
    }

    /// Committed_AS at `tick`.
    pub fn committed_at(&self, tick: u64) -> u64 {
        let pts = &self.committed;
        let Some(first) = pts.first() else { return 0 };
        if tick <= first.0 {
            return first.1;
        }
        for w in pts.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if tick <= t1 {
                if t1 == t0 {
                    return v1;
                }
                let f = (tick - t0) as f64 / (t1 - t0) as f64;
                return (v0 as f64 + (v1 as f64 - v0 as f64) * f) as u64;
            }
        }
        pts.last().map_or(0, |p| p.1)
    }
}

/// The model's mutable state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestState {
    /// Logical size (bytes).
    pub actual: u64,
    /// Bytes in swap.
    pub swap_used: u64,
    /// Counters (as the guest reports them).
    pub major_faults: u64,
    /// Bytes swapped in.
    pub swap_in_bytes: u64,
    /// Bytes swapped out.
    pub swap_out_bytes: u64,
    /// Refaults.
    pub refaults: u64,
    /// Allocation stalls.
    pub alloc_stalls: u64,
    /// OOM kills.
    pub oom_kills: u64,
}

/// One row of the recorded trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimRecord {
    /// Tick number.
    pub tick: u64,
    /// Simulated time, ms.
    pub t_ms: u64,
    /// Logical size during this tick.
    pub actual: u64,
    /// Target decided this tick.
    pub target: u64,
    /// The policy's raw target.
    pub policy_target: u64,
    /// Committed_AS.
    pub committed: u64,
    /// Touched anon bytes (the need).
    pub anon_need: u64,
    /// MemAvailable.
    pub available: u64,
    /// Swap in use.
    pub swap_used: u64,
    /// Cumulative OOM kills.
    pub oom_kills: u64,
    /// Fast give-back fired.
    pub spike: bool,
    /// Flagged stuck.
    pub stuck: bool,
    /// Decision reason.
    pub reason: String,
}

/// A simulation run: model + governor + fixed host view.
#[derive(Debug)]
pub struct Sim {
    /// The guest script.
    pub model: GuestModel,
    /// Live model state.
    pub state: GuestState,
    /// The governor under test.
    pub governor: Governor,
    /// Host view given to the policy every tick.
    pub host: HostView,
    /// Interval, ms.
    pub interval_ms: u64,
    history: StatsHistory,
    tick: u64,
}

impl Sim {
    /// New simulation with a governor built from `cfg`.
    pub fn new(model: GuestModel, cfg: GovernorConfig, host: HostView, interval_ms: u64) -> Self {
        let state = GuestState {
            actual: model.start.unwrap_or(model.max),
            ..Default::default()
        };
        Self {
            model,
            state,
            governor: Governor::new(cfg),
            host,
            interval_ms: interval_ms.max(1),
            history: StatsHistory::new(16),
            tick: 0,
        }
    }

    /// Advance the guest model one tick at the current `actual`; returns the
    /// stats it would report.
    fn guest_tick(&mut self) -> (GuestStats, u64, u64) {
        let m = &self.model;
        let st = &mut self.state;
        let committed = m.committed_at(self.tick);
        let anon_need = (committed as f64 * m.resident_fraction.clamp(0.0, 1.0)) as u64;
        let total = st.actual.saturating_sub(m.kernel_offset);
        let min_free = total / 100;
        let room = total.saturating_sub(m.slab + min_free);
        let resident = anon_need.min(room);
        let mut swapped = anon_need - resident;
        if swapped > m.swap_total {
            st.oom_kills += 1;
            swapped = m.swap_total;
        }
        if swapped > st.swap_used {
            st.swap_out_bytes += swapped - st.swap_used;
            st.alloc_stalls += 10;
        } else {
            let back = st.swap_used - swapped;
            st.swap_in_bytes += back;
            st.major_faults += back / PAGE_SIZE;
        }
        st.swap_used = swapped;
        // Thrash: touched swapped pages come in and go back out.
        let touched = (swapped as f64 * m.swap_touch) as u64;
        st.swap_in_bytes += touched;
        st.swap_out_bytes += touched;
        st.major_faults += touched / PAGE_SIZE;
        if swapped > 0 {
            st.alloc_stalls += 1;
        }
        let cache = m.cache_wanted.min(room - resident);
        let miss = m.cache_wanted - cache;
        let refaults = (miss as f64 * m.refault_touch) as u64 / PAGE_SIZE;
        st.refaults += refaults;
        st.major_faults += refaults;
        let free = total.saturating_sub(m.slab + resident + cache);
        let t_ms = self.tick * self.interval_ms;
        let s = GuestStats {
            t_ms,
            total: Some(total),
            available: Some(free + cache),
            free: Some(free),
            cache: Some(cache),
            committed: Some(committed),
            swap_total: Some(m.swap_total),
            swap_free: Some(m.swap_total - st.swap_used),
            anon: Some(resident),
            slab: Some(m.slab),
            major_faults: Some(st.major_faults),
            swap_in_bytes: Some(st.swap_in_bytes),
            swap_out_bytes: Some(st.swap_out_bytes),
            refaults: Some(st.refaults),
            alloc_stalls: Some(st.alloc_stalls),
            oom_kills: Some(st.oom_kills),
        };
        (s, committed, anon_need)
    }

    /// Run one tick and return its record.
    pub fn step(&mut self) -> SimRecord {
        let (s, committed, anon_need) = self.guest_tick();
        self.history.push(s);
        let actual = self.state.actual;
        let view = GuestView {
            history: &self.history,
            actual,
            max: self.model.max,
            interval_ms: self.interval_ms,
        };
        let d = self.governor.step(&view, &self.host);
        let target = d.decision.target;
        // Actuate: deflate at once, inflate at the driver's speed.
        self.state.actual = if target >= actual {
            target.min(self.model.max)
        } else {
            target
                .max(actual.saturating_sub(self.model.inflate_per_tick))
                .max(self.model.stuck_at.min(actual))
        };
        let rec = SimRecord {
            tick: self.tick,
            t_ms: s.t_ms,
            actual,
            target,
            policy_target: d.policy_target,
            committed,
            anon_need,
            available: s.available.unwrap_or(0),
            swap_used: self.state.swap_used,
            oom_kills: self.state.oom_kills,
            spike: d.spike.is_some(),
            stuck: d.stuck,
            reason: d.decision.reason,
        };
        self.tick += 1;
        rec
    }

    /// Run `ticks` ticks and return the trajectory.
    pub fn run(&mut self, ticks: u64) -> Vec<SimRecord> {
        (0..ticks).map(|_| self.step()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{selfballoon_floor, PolicyKind, PressureConfig, SelfBalloonConfig};

    const GIB: u64 = 1 << 30;

    #[test]
    fn committed_script_interpolates() {
        let m = GuestModel::new(GIB, vec![(10, 100), (20, 200), (30, 0)]);
        assert_eq!(m.committed_at(0), 100);
        assert_eq!(m.committed_at(15), 150);
        assert_eq!(m.committed_at(25), 100);
        assert_eq!(m.committed_at(99), 0);
        assert_eq!(GuestModel::new(GIB, vec![]).committed_at(3), 0);
    }

    fn sb(shrink: u64) -> GovernorConfig {
        GovernorConfig {
            policy: PolicyKind::SelfBalloon(SelfBalloonConfig::default()),
            shrink_per_interval: shrink,
            ..Default::default()
        }
    }

    #[test]
    fn selfballoon_tracks_rising_and_falling_need() {
        let max = 2 * GIB;
        let script = vec![
            (0, 300 * MIB),
            (20, 300 * MIB),
            (30, 1200 * MIB),
            (60, 1200 * MIB),
            (80, 200 * MIB),
        ];
        let mut model = GuestModel::new(max, script);
        model.cache_wanted = 32 * MIB; // pure selfballoon behaviour: no cache thrash
        let offset = model.kernel_offset;
        let shrink = 128 * MIB;
        let mut sim = Sim::new(model, sb(shrink), HostView::default(), 5000);
        let recs = sim.run(200);
        let floor = selfballoon_floor(max, 0, 0) + offset;
        let reserve = ((max - offset) / 10) / MIB * MIB;
        for r in &recs {
            assert!(
                r.target >= floor,
                "tick {}: target {} < floor {}",
                r.tick,
                r.target,
                floor
            );
            assert!(r.target <= max);
            if r.target < r.actual {
                assert!(r.actual - r.target <= shrink, "tick {}: rate limit", r.tick);
            }
            assert_eq!(r.oom_kills, 0, "tick {}", r.tick);
        }
        // Rising need (up hysteresis 1): one tick later the target covers committed + reserve.
        for r in recs.iter().filter(|r| (21..=60).contains(&r.tick)) {
            let prev = &recs[r.tick as usize - 1];
            assert!(
                r.target >= prev.committed + reserve + offset,
                "tick {}: target {} < committed {} + reserve",
                r.tick,
                r.target,
                prev.committed
            );
        }
        // After the fall, the target converges near goal = 200 MiB + reserve (+ offset).
        let last = recs.last().expect("ran");
        let goal = (200 * MIB + reserve + offset).max(floor);
        assert!(
            last.target >= goal && last.target - goal < 16 * MIB,
            "{} vs {}",
            last.target,
            goal
        );
        // It did shrink at some point from the 1.2 GiB plateau, gradually.
        assert!(recs.iter().any(|r| r.reason.contains("shrink")));
        assert!(recs.iter().all(|r| !r.spike), "no give-back needed");
    }

    #[test]
    fn cache_thrash_gives_back_and_learned_floor_damps_sawtooth() {
        // Committed_AS ignores page cache: selfballoon squeezes the 256 MiB file
        // working set out, refaults spike, give-back returns memory.
        let max = 2 * GIB;
        let model = GuestModel::new(max, vec![(0, 200 * MIB)]);
        let mut sim = Sim::new(model.clone(), sb(128 * MIB), HostView::default(), 5000);
        let recs = sim.run(300);
        let spikes = recs.iter().filter(|r| r.spike).count();
        assert!(spikes >= 1, "cache thrash detected");
        // With the learned floor the guest is re-probed rarely, not every few intervals.
        assert!(spikes <= 12, "{spikes} give-backs in 300 intervals");
        // Without it (decay 0) the sawtooth is much more frequent.
        let mut cfg = sb(128 * MIB);
        cfg.give_back.learned_floor_decay = 0;
        let mut sim2 = Sim::new(model, cfg, HostView::default(), 5000);
        let spikes2 = sim2.run(300).iter().filter(|r| r.spike).count();
        assert!(spikes2 > spikes + spikes / 2, "{spikes2} vs {spikes}");
    }

    #[test]
    fn spike_deflates_within_one_interval_even_when_host_wants_memory() {
        let max = 4 * GIB;
        // Quiet at 400 MiB, then a step to 2.5 GiB at tick 30.
        let script = vec![(0, 400 * MIB), (29, 400 * MIB), (30, 2560 * MIB)];
        let mut model = GuestModel::new(max, script);
        model.cache_wanted = 64 * MIB;
        // Host short of memory: pressure policy would keep squeezing.
        let host = HostView {
            total: 16 * GIB,
            available: GIB,
            psi: None,
            share_target: None,
        };
        let cfg = GovernorConfig {
            policy: PolicyKind::Pressure(PressureConfig::default()),
            shrink_per_interval: 512 * MIB,
            ..Default::default()
        };
        let mut sim = Sim::new(model, cfg, host, 2000);
        let recs = sim.run(60);
        // Squeezed before the step.
        assert!(recs[29].actual < 2 * GIB, "squeezed: {}", recs[29].actual);
        let k = recs.iter().position(|r| r.spike).expect("a spike fires");
        assert!((30..=31).contains(&k), "spike at tick {k}");
        // Within one interval, the guest has all it needs: the anon working set
        // is resident (nothing left in swap beyond one tick of lag).
        let next = &recs[k + 1];
        assert!(next.actual >= recs[k].target, "deflated at once");
        assert!(next.actual >= next.anon_need + sim.model.slab + sim.model.kernel_offset);
        assert_eq!(next.swap_used, 0, "swap drained: {:?}", next);
        // And the target is not taken back while the need stays (no oscillation into swap).
        for r in &recs[k + 1..] {
            assert_eq!(r.swap_used, 0, "tick {}: {}", r.tick, r.reason);
        }
        assert_eq!(recs.last().map(|r| r.oom_kills), Some(0));
    }

    #[test]
    fn stuck_balloon_is_reported_not_chased() {
        let max = 4 * GIB;
        let mut model = GuestModel::new(max, vec![(0, 200 * MIB)]);
        model.stuck_at = 3 * GIB; // the guest driver will not inflate past this
        let cfg = GovernorConfig {
            stuck_after: 3,
            stuck_backoff: 5,
            ..sb(512 * MIB)
        };
        let mut sim = Sim::new(model, cfg, HostView::default(), 1000);
        let recs = sim.run(30);
        let first = recs.iter().position(|r| r.stuck).expect("flagged stuck");
        // While stuck, the target is the actual size (no chasing).
        for r in recs.iter().skip(first).take_while(|r| r.stuck) {
            assert_eq!(r.target, r.actual, "tick {}", r.tick);
            assert!(r.reason.starts_with("stuck"));
        }
        assert!(recs.iter().all(|r| r.actual >= 3 * GIB));
    }
}
