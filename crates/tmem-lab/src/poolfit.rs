//! How a run's pool used its budget during the workload, and why it stayed small.
//!
//! The pool can stay empty while guests read from disk for three different reasons: it
//! had no budget (the guests and the host reserve took the host budget), it was full
//! (its budget was small and puts were refused or ephemeral pages evicted), or it kept
//! everything it was sent and had room to spare. This module tells them apart from the sampled series and
//! the export counters of one run.

use serde::{Deserialize, Serialize};

use crate::run::{ExportDelta, PoolPoint};

/// A budget below this is "no room" (a few MiB of metadata and slabs).
const NO_ROOM: u64 = 8 << 20;

/// Pool use against its budget during one run's workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PoolFit {
    /// Samples during the workload.
    pub samples: usize,
    /// Smallest, median and largest pool budget during the workload, bytes.
    pub budget_min: u64,
    /// Median budget.
    pub budget_median: u64,
    /// Largest budget.
    pub budget_max: u64,
    /// Largest held bytes during the workload.
    pub held_max: u64,
    /// Largest logical bytes during the workload.
    pub logical_max: u64,
    /// Share of samples in which the budget was below 8 MiB.
    pub no_room_share: f64,
    /// Share of samples in which the pool held ≥ 90 % of its budget (and the budget was
    /// at least 8 MiB).
    pub full_share: f64,
    /// Puts refused during the workload.
    pub puts_refused: u64,
    /// Ephemeral pages evicted during the workload.
    pub evictions: u64,
    /// Cached exports: pool hits / misses during the workload.
    pub cached_hits: u64,
    /// Cached exports' misses (reads that went to the image).
    pub cached_misses: u64,
}

/// Why the pool stayed small in a run, as far as its samples tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolVerdict {
    /// No samples during the workload.
    NoData,
    /// The budget was below 8 MiB for most of the workload: the guests and the reserve
    /// took the host budget.
    NoRoom,
    /// The pool was at its budget for a large part of the workload (refusing puts or
    /// evicting): a bigger budget would have kept more.
    Full,
    /// The budget had room to spare: nothing was refused or evicted, so the pool kept
    /// every page it was sent (the guests sent no more: their own page cache served
    /// the rest, or they read nothing more).
    Unused,
}

impl PoolVerdict {
    /// A sentence for the report.
    pub fn text(self) -> &'static str {
        match self {
            PoolVerdict::NoData => "no samples",
            PoolVerdict::NoRoom => "no room: guests + reserve took the budget",
            PoolVerdict::Full => "full: at its budget (puts refused / evictions)",
            PoolVerdict::Unused => "room to spare: it kept all it was sent",
        }
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

impl PoolFit {
    /// Computes the fit from a run's pool series (samples with `t ≥ 0` are the workload)
    /// and its export deltas.
    pub fn of(pool: &[PoolPoint], exports: &[ExportDelta]) -> PoolFit {
        let work: Vec<&PoolPoint> = pool.iter().filter(|p| p.t >= 0.0).collect();
        let before = pool
            .iter()
            .rev()
            .find(|p| p.t < 0.0)
            .or(work.first().copied());
        let last = work.last().copied();
        let n = work.len();
        let share = |f: &dyn Fn(&PoolPoint) -> bool| {
            if n == 0 {
                0.0
            } else {
                work.iter().filter(|p| f(p)).count() as f64 / n as f64
            }
        };
        let delta = |f: fn(&PoolPoint) -> u64| match (before, last) {
            (Some(b), Some(l)) => f(l).saturating_sub(f(b)),
            _ => 0,
        };
        let cached = exports.iter().filter(|e| e.kind == "cached");
        let (cached_hits, cached_misses) =
            cached.fold((0, 0), |(h, m), e| (h + e.hits, m + e.misses));
        PoolFit {
            samples: n,
            budget_min: work.iter().map(|p| p.budget).min().unwrap_or(0),
            budget_median: median(work.iter().map(|p| p.budget).collect()),
            budget_max: work.iter().map(|p| p.budget).max().unwrap_or(0),
            held_max: work.iter().map(|p| p.held).max().unwrap_or(0),
            logical_max: work.iter().map(|p| p.logical).max().unwrap_or(0),
            no_room_share: share(&|p| p.budget < NO_ROOM),
            full_share: share(&|p| p.budget >= NO_ROOM && p.held * 10 >= p.budget * 9),
            puts_refused: delta(|p| p.puts_refused),
            evictions: delta(|p| p.evictions),
            cached_hits,
            cached_misses,
        }
    }

    /// The main reason the pool stayed small (or was used), from the shares above.
    pub fn verdict(&self) -> PoolVerdict {
        if self.samples == 0 {
            PoolVerdict::NoData
        } else if self.no_room_share >= 0.5 {
            PoolVerdict::NoRoom
        } else if self.full_share >= 0.25 || (self.puts_refused + self.evictions) > 0 {
            PoolVerdict::Full
        } else {
            PoolVerdict::Unused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn pt(t: f64, held: u64, budget: u64, refused: u64) -> PoolPoint {
        PoolPoint {
            t,
            logical: held * 2,
            held,
            budget,
            evictions: 0,
            puts_refused: refused,
        }
    }

    fn cached(hits: u64, misses: u64) -> ExportDelta {
        ExportDelta {
            name: "g0-data".into(),
            kind: "cached".into(),
            sectors_read: 0,
            sectors_written: 0,
            spilled_pages: 0,
            hits,
            misses,
        }
    }

    #[test]
    fn a_budget_near_zero_is_no_room() {
        let s = [
            pt(-1.0, 0, 70 * M, 0),
            pt(0.0, 0, 0, 0),
            pt(1.0, M, 2 * M, 0),
            pt(2.0, 0, 0, 0),
        ];
        let f = PoolFit::of(&s, &[]);
        assert_eq!(f.samples, 3);
        assert_eq!((f.budget_min, f.budget_max), (0, 2 * M));
        assert_eq!(f.verdict(), PoolVerdict::NoRoom);
    }

    #[test]
    fn a_pool_at_its_budget_that_refuses_puts_is_full() {
        let s = [
            pt(-1.0, 0, 64 * M, 5),
            pt(0.0, 60 * M, 64 * M, 9),
            pt(1.0, 63 * M, 64 * M, 40),
        ];
        let f = PoolFit::of(&s, &[cached(10, 90)]);
        assert_eq!(f.puts_refused, 35);
        assert!(f.full_share > 0.9);
        assert_eq!((f.cached_hits, f.cached_misses), (10, 90));
        assert_eq!(f.verdict(), PoolVerdict::Full);
    }

    #[test]
    fn room_the_pool_did_not_use_is_unused() {
        let s = [pt(0.0, M, 256 * M, 0), pt(1.0, 3 * M, 256 * M, 0)];
        let f = PoolFit::of(&s, &[]);
        assert_eq!(f.held_max, 3 * M);
        assert_eq!(f.verdict(), PoolVerdict::Unused);
        assert_eq!(PoolFit::of(&[], &[]).verdict(), PoolVerdict::NoData);
    }
}
