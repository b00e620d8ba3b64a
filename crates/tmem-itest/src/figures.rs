//! Figures from observed timelines: reclaim rate while a guest is ballooned
//! down, give-back after a demand spike, and the time from spike to deflate.
//!
//! All inputs are [`crate::observe`] samples (seconds since the observer
//! started); all functions are pure so they are unit-tested on synthetic data.
//! Resolution: balloon readings are taken every observer tick; a spike is
//! seen when the observer agent reports (its interval), so spike→deflate
//! times carry up to one agent interval of uncertainty.

use crate::observe::{AgentSample, BalloonSample, ManagerSample};
use crate::MIB;

/// Movement below this is noise, bytes.
pub const TOLERANCE: u64 = 2 * MIB;

/// How a guest was ballooned down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reclaim {
    /// Size when shrinking started, bytes.
    pub from: u64,
    /// Lowest size reached, bytes.
    pub to: u64,
    /// When shrinking started, s.
    pub t_start: f64,
    /// When the lowest size was (first) reached within [`TOLERANCE`], s.
    pub t_end: f64,
    /// Average rate from start to end, MiB/s.
    pub avg_mib_s: f64,
    /// Fastest rate over any window of at least `window` s, MiB/s.
    pub peak_mib_s: f64,
    /// Time to take 90 % of the total, s.
    pub t90: f64,
}

/// The reclaim of the first shrink in `[from_t, to_t]`, or `None` if the
/// balloon did not move down by more than [`TOLERANCE`].
pub fn reclaim(balloon: &[BalloonSample], from_t: f64, to_t: f64, window: f64) -> Option<Reclaim> {
    let s: Vec<BalloonSample> = balloon
        .iter()
        .copied()
        .filter(|b| b.t >= from_t && b.t <= to_t)
        .collect();
    let first = *s.first()?;
    let low = s.iter().map(|b| b.actual).min()?;
    if first.actual < low + TOLERANCE {
        return None;
    }
    // Start: the last sample still at the initial size before the first drop.
    let drop_i = s
        .iter()
        .position(|b| b.actual + TOLERANCE <= first.actual)?;
    let start = s[drop_i.saturating_sub(1)];
    let end_i = s.iter().position(|b| b.actual <= low + TOLERANCE)?;
    let end = s[end_i];
    let total = start.actual.saturating_sub(low);
    let dt = (end.t - start.t).max(1e-3);
    let t90 = s
        .iter()
        .find(|b| start.actual.saturating_sub(b.actual) as f64 >= 0.9 * total as f64)
        .map(|b| b.t - start.t)
        .unwrap_or(dt);
    let mut peak: f64 = 0.0;
    for (i, a) in s.iter().enumerate() {
        if let Some(b) = s[i..].iter().find(|b| b.t - a.t >= window) {
            let r = a.actual.saturating_sub(b.actual) as f64 / MIB as f64 / (b.t - a.t);
            peak = peak.max(r);
        }
    }
    Some(Reclaim {
        from: start.actual,
        to: low,
        t_start: start.t,
        t_end: end.t,
        avg_mib_s: total as f64 / MIB as f64 / dt,
        peak_mib_s: peak,
        t90,
    })
}

/// A sudden rise in demand (Committed_AS), as reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spike {
    /// When the report showing it arrived, s.
    pub t: f64,
    /// Committed_AS before, bytes.
    pub committed_before: u64,
    /// Committed_AS after, bytes.
    pub committed_after: u64,
}

impl Spike {
    /// The rise, bytes.
    pub fn size(&self) -> u64 {
        self.committed_after.saturating_sub(self.committed_before)
    }
}

/// Reports (after `from_t`) where Committed_AS rose by at least `min_jump`
/// since the previous report.
pub fn spikes(agent: &[AgentSample], from_t: f64, min_jump: u64) -> Vec<Spike> {
    agent
        .windows(2)
        .filter(|w| w[1].t >= from_t && w[1].committed >= w[0].committed.saturating_add(min_jump))
        .map(|w| Spike {
            t: w[1].t,
            committed_before: w[0].committed,
            committed_after: w[1].committed,
        })
        .collect()
}

/// How the balloon answered one spike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GiveBack {
    /// The spike.
    pub spike: Spike,
    /// Size just before the spike, bytes.
    pub before: u64,
    /// Largest size reached before the next spike (or the window end), bytes.
    pub peak: u64,
    /// Spike → the manager's target first rose (None: not seen), ms.
    pub decided_ms: Option<f64>,
    /// Spike → the balloon first grew (None: no deflate needed), ms.
    /// Negative when the manager's agent saw the spike before the observer's.
    pub start_ms: Option<f64>,
    /// Spike → the balloon reached its peak (within [`TOLERANCE`]), ms.
    pub done_ms: Option<f64>,
    /// Deflate speed from first growth to peak, MiB/s.
    pub rate_mib_s: Option<f64>,
    /// The balloon was still growing (from an earlier spike) when this one
    /// came: its times then say little about this spike.
    pub already_growing: bool,
}

impl GiveBack {
    /// Bytes given back.
    pub fn given(&self) -> u64 {
        self.peak.saturating_sub(self.before)
    }

    /// True if the balloon deflated for this spike.
    pub fn deflated(&self) -> bool {
        self.start_ms.is_some()
    }
}

/// Matches each spike with the balloon's reaction up to the next spike (at
/// most `horizon` s). `lead` (s, normally the observer agent's interval) is
/// how much earlier than the observer the manager may have seen the spike:
/// the size "before" is read at `spike.t - lead`, and growth from then on
/// counts as the answer.
pub fn give_backs(
    spikes: &[Spike],
    balloon: &[BalloonSample],
    manager: &[ManagerSample],
    lead: f64,
    horizon: f64,
) -> Vec<GiveBack> {
    let mut out = Vec::new();
    for (i, sp) in spikes.iter().enumerate() {
        let t0 = sp.t - lead;
        let t1 = spikes
            .get(i + 1)
            .map(|n| n.t - lead)
            .unwrap_or(f64::INFINITY)
            .min(sp.t + horizon);
        let Some(before) = balloon
            .iter()
            .rev()
            .find(|b| b.t <= t0)
            .or_else(|| balloon.first())
            .map(|b| b.actual)
        else {
            continue;
        };
        let already_growing = balloon
            .iter()
            .rev()
            .find(|b| b.t <= t0 - lead)
            .is_some_and(|b| b.actual + TOLERANCE <= before);
        let win: Vec<&BalloonSample> = balloon.iter().filter(|b| b.t > t0 && b.t <= t1).collect();
        let peak = win
            .iter()
            .map(|b| b.actual)
            .max()
            .unwrap_or(before)
            .max(before);
        let ms = |t: f64| (t - sp.t) * 1000.0;
        let decided_ms = manager
            .iter()
            .find(|m| m.t > t0 && m.t <= t1 && m.target >= before + TOLERANCE)
            .map(|m| ms(m.t));
        let (start_ms, done_ms, rate_mib_s) = if peak >= before + TOLERANCE {
            let start = win.iter().find(|b| b.actual >= before + TOLERANCE);
            let done = win.iter().find(|b| b.actual + TOLERANCE >= peak);
            match (start, done) {
                (Some(s), Some(d)) => {
                    // Growth began between the previous sample and `s`.
                    let prev_t = win
                        .iter()
                        .rev()
                        .find(|b| b.t < s.t)
                        .map(|b| b.t)
                        .unwrap_or(t0);
                    let dt = (d.t - prev_t).max(1e-3);
                    (
                        Some(ms(s.t)),
                        Some(ms(d.t)),
                        Some((peak - before) as f64 / MIB as f64 / dt),
                    )
                }
                _ => (None, None, None),
            }
        } else {
            (None, None, None)
        };
        out.push(GiveBack {
            spike: *sp,
            before,
            peak,
            decided_ms,
            start_ms,
            done_ms,
            rate_mib_s,
            already_growing,
        });
    }
    out
}

/// Smallest balloon size in `[from_t, to_t]`.
pub fn min_actual(balloon: &[BalloonSample], from_t: f64, to_t: f64) -> Option<u64> {
    balloon
        .iter()
        .filter(|b| b.t >= from_t && b.t <= to_t)
        .map(|b| b.actual)
        .min()
}

/// Increase of a cumulative agent counter between the first report at or
/// after `from_t` (or the last before it) and the last report.
pub fn counter_delta(agent: &[AgentSample], from_t: f64, f: impl Fn(&AgentSample) -> u64) -> u64 {
    let base = agent
        .iter()
        .rev()
        .find(|a| a.t <= from_t)
        .or_else(|| agent.first());
    match (base, agent.last()) {
        (Some(a), Some(b)) => f(b).saturating_sub(f(a)),
        _ => 0,
    }
}

/// True if the balloon moved by less than [`TOLERANCE`] over the last
/// `window` seconds of samples (and there are samples covering the window).
pub fn settled(balloon: &[BalloonSample], window: f64) -> bool {
    let Some(last) = balloon.last() else {
        return false;
    };
    if balloon.first().is_none_or(|f| last.t - f.t < window) {
        return false;
    }
    let recent = balloon.iter().filter(|b| b.t >= last.t - window);
    let (lo, hi) = recent.fold((u64::MAX, 0), |(lo, hi), b| {
        (lo.min(b.actual), hi.max(b.actual))
    });
    hi.saturating_sub(lo) < TOLERANCE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(t: f64, mib: u64) -> BalloonSample {
        BalloonSample {
            t,
            actual: mib * MIB,
        }
    }

    fn a(t: f64, committed_mib: u64) -> AgentSample {
        AgentSample {
            t,
            committed: committed_mib * MIB,
            ..Default::default()
        }
    }

    #[test]
    fn reclaim_from_a_linear_ramp() {
        // 512 until t=2, then -50 MiB/s down to 162 at t=9, flat afterwards.
        let mut s = Vec::new();
        let mut t: f64 = 0.0;
        while t <= 20.0 {
            let mib: f64 = if t <= 2.0 {
                512.0
            } else {
                (512.0 - 50.0 * (t - 2.0)).max(162.0)
            };
            s.push(BalloonSample {
                t,
                actual: (mib * MIB as f64) as u64,
            });
            t += 0.25;
        }
        let r = reclaim(&s, 0.0, 20.0, 1.0).unwrap();
        assert_eq!((r.from, r.to), (512 * MIB, 162 * MIB));
        assert!((r.t_start - 2.0).abs() < 0.01, "{r:?}");
        assert!((r.t_end - 9.0).abs() < 0.3, "{r:?}");
        assert!((r.avg_mib_s - 50.0).abs() < 3.0, "{r:?}");
        assert!((r.peak_mib_s - 50.0).abs() < 1.0, "{r:?}");
        assert!((r.t90 - 6.3).abs() < 0.3, "{r:?}");
        // No movement: no reclaim.
        assert!(reclaim(&[b(0.0, 512), b(1.0, 511)], 0.0, 5.0, 1.0).is_none());
        assert!(reclaim(&[], 0.0, 5.0, 1.0).is_none());
    }

    #[test]
    fn spikes_and_give_backs() {
        let agent = vec![
            a(10.0, 40),
            a(10.5, 40),
            a(11.0, 250), // spike 1 (+210)
            a(11.5, 250),
            a(14.0, 41),
            a(15.0, 60),  // +19: below the threshold
            a(20.0, 140), // spike 2 (+80)
        ];
        let sp = spikes(&agent, 0.0, 32 * MIB);
        assert_eq!(sp.len(), 2);
        assert_eq!(sp[0].size(), 210 * MIB);
        assert!(spikes(&agent, 12.0, 32 * MIB).len() == 1);

        // Balloon: 150 until 11.2, ramps to 400 by 12.2, stays; nothing at spike 2.
        let mut bal = Vec::new();
        let mut t: f64 = 9.0;
        while t <= 25.0 {
            let mib: f64 = if t < 11.2 {
                150.0
            } else {
                (150.0 + 250.0 * (t - 11.2)).min(400.0)
            };
            bal.push(BalloonSample {
                t,
                actual: (mib * MIB as f64) as u64,
            });
            t += 0.1;
        }
        let mgr = vec![
            ManagerSample {
                t: 10.9,
                target: 150 * MIB,
                ..Default::default()
            },
            ManagerSample {
                t: 11.1,
                target: 420 * MIB,
                ..Default::default()
            },
        ];
        let g = give_backs(&sp, &bal, &mgr, 0.5, 30.0);
        assert_eq!(g.len(), 2);
        let g0 = g[0];
        assert!(g0.deflated());
        assert!(
            (g0.before as f64 / MIB as f64 - 150.0).abs() < 1.0,
            "{g0:?}"
        );
        assert!(
            (g0.given() as f64 / MIB as f64 - 250.0).abs() < 2.0,
            "{g0:?}"
        );
        assert!((g0.decided_ms.unwrap() - 100.0).abs() < 1.0, "{g0:?}");
        let start = g0.start_ms.unwrap();
        assert!((200.0..=400.0).contains(&start), "{g0:?}");
        let done = g0.done_ms.unwrap();
        assert!((1100.0..=1300.0).contains(&done), "{g0:?}");
        let rate = g0.rate_mib_s.unwrap();
        assert!((200.0..=260.0).contains(&rate), "{g0:?}");
        assert!(!g0.already_growing);
        // Spike 2: the guest already had room.
        assert!(!g[1].deflated());
        assert_eq!(g[1].given(), 0);
        assert!(!g[1].already_growing);
        // A spike in the middle of the ramp finds the balloon growing.
        let mid = Spike {
            t: 11.9,
            committed_before: 0,
            committed_after: 64 * MIB,
        };
        let g = give_backs(&[mid], &bal, &mgr, 0.3, 30.0);
        assert!(g[0].already_growing, "{:?}", g[0]);
    }

    #[test]
    fn helpers() {
        let s = vec![
            b(0.0, 512),
            b(1.0, 300),
            b(2.0, 200),
            b(3.0, 201),
            b(4.0, 200),
        ];
        assert_eq!(min_actual(&s, 0.0, 10.0), Some(200 * MIB));
        assert_eq!(min_actual(&s, 0.0, 0.5), Some(512 * MIB));
        assert!(settled(&s, 2.0));
        assert!(!settled(&s, 3.5));
        assert!(!settled(&s, 10.0));
        let ag = vec![
            AgentSample {
                t: 1.0,
                pswpout: 5,
                ..Default::default()
            },
            AgentSample {
                t: 5.0,
                pswpout: 105,
                ..Default::default()
            },
        ];
        assert_eq!(counter_delta(&ag, 2.0, |a| a.pswpout), 100);
        assert_eq!(counter_delta(&ag, 0.0, |a| a.pswpout), 100);
        assert_eq!(counter_delta(&[], 0.0, |a| a.pswpout), 0);
    }
}
