//! The light density workload's cycle times: parsing `LAB-CYCLE` console lines,
//! following them per guest and per measurement window, and the slowdown.
//!
//! Slowdown = the median cycle time of all guests in the window at the last stable
//! count ÷ the median cycle time of the first guest while it ran alone (the window at
//! one guest). A window's first cycle of every guest is dropped: it may have started
//! before the window did (while another guest booted); so are a guest's first
//! [`WARMUP_CYCLES`] cycles (cold disk reads, code not yet translated under TCG).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::image::MARK_CYCLE;

/// A guest's first cycles (numbers below this) are never measured: they warm up.
pub const WARMUP_CYCLES: u64 = 2;

/// One guest count's measurement window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CycleStep {
    /// Guests running.
    pub guests: u32,
    /// Cycles measured (all guests).
    pub cycles: u32,
    /// Their median work time, ms.
    pub median_ms: f64,
}

/// The light workload's cycle times in one density mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CycleStats {
    /// Median cycle time of the first guest while it ran alone, ms.
    pub alone_ms: Option<f64>,
    /// Median cycle time of all guests in the window at the last stable count, ms.
    pub stable_ms: Option<f64>,
    /// `stable_ms / alone_ms`.
    pub slowdown: Option<f64>,
    /// Every stable guest count's window, in order.
    pub steps: Vec<CycleStep>,
    /// Guests whose cycles stopped (no new cycle for the stall time) by the end.
    pub stalled: u32,
}

/// Parses a `LAB-CYCLE n=<i> ms=<duration>` line (other text may precede the marker,
/// kernel messages share the console) into `(n, ms)`.
pub fn parse_cycle_line(line: &str) -> Option<(u64, f64)> {
    let rest = line.split_once(MARK_CYCLE)?.1;
    let mut n = None;
    let mut ms = None;
    for w in rest.split_whitespace() {
        if let Some(v) = w.strip_prefix("n=") {
            n = v.parse::<u64>().ok();
        } else if let Some(v) = w.strip_prefix("ms=") {
            ms = v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
        }
    }
    Some((n?, ms?))
}

/// The cycle lines among the complete lines of `text` from byte `pos` on; returns them
/// and the position after the last complete line (a partial last line waits).
pub fn new_cycles(text: &str, pos: usize) -> (Vec<(u64, f64)>, usize) {
    let Some(rest) = text.get(pos..) else {
        return (Vec::new(), pos);
    };
    let Some(end) = rest.rfind('\n') else {
        return (Vec::new(), pos);
    };
    let found = rest[..end].lines().filter_map(parse_cycle_line).collect();
    (found, pos + end + 1)
}

/// The median (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 0 {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    })
}

/// median(`stable`) ÷ median(`alone`); `None` if either is empty or `alone`'s is 0.
pub fn slowdown(alone: &[f64], stable: &[f64]) -> Option<f64> {
    let a = median(alone)?;
    let s = median(stable)?;
    (a > 0.0).then(|| s / a)
}

/// The stats of a mode from the cycle times of each guest count's window
/// (`by_count[k]` = the window at `k + 1` guests) and its last stable count.
pub fn cycle_stats(by_count: &[Vec<f64>], last_stable: u32, stalled: u32) -> CycleStats {
    let upto = (last_stable as usize).min(by_count.len());
    let steps = by_count[..upto]
        .iter()
        .enumerate()
        .filter_map(|(k, v)| {
            Some(CycleStep {
                guests: k as u32 + 1,
                cycles: v.len() as u32,
                median_ms: median(v)?,
            })
        })
        .collect();
    let alone = by_count.first().map(Vec::as_slice).unwrap_or_default();
    let stable = upto
        .checked_sub(1)
        .and_then(|k| by_count.get(k))
        .map(Vec::as_slice)
        .unwrap_or_default();
    CycleStats {
        alone_ms: median(alone),
        stable_ms: median(stable),
        slowdown: slowdown(alone, stable),
        steps,
        stalled,
    }
}

/// Follows one guest's cycle lines.
#[derive(Debug)]
struct GuestCycles {
    /// Console bytes already looked at.
    pos: usize,
    /// When a new cycle line was last seen (or the guest was started).
    last_new: Instant,
    /// Drop the next cycle: the window began while it ran.
    skip_next: bool,
}

/// Follows every guest's cycles and collects the current window's cycle times.
#[derive(Debug)]
pub struct CycleWatch {
    guests: Vec<GuestCycles>,
    window: Vec<f64>,
    stall: Duration,
}

impl CycleWatch {
    /// A watch that calls a guest stalled after `stall` without a new cycle.
    pub fn new(stall: Duration) -> Self {
        Self {
            guests: Vec::new(),
            window: Vec::new(),
            stall,
        }
    }

    /// Starts following the next guest (just started; its first cycle is dropped).
    pub fn add_guest(&mut self) {
        self.guests.push(GuestCycles {
            pos: 0,
            last_new: Instant::now(),
            skip_next: true,
        });
    }

    /// Starts a window: what the consoles (`texts`, one per guest in order) hold so
    /// far does not count, nor does each guest's next cycle.
    pub fn begin_window(&mut self, texts: &[String]) {
        self.poll(texts);
        self.window.clear();
        for g in &mut self.guests {
            g.skip_next = true;
        }
    }

    /// Reads new cycles from the consoles into the window.
    pub fn poll(&mut self, texts: &[String]) {
        for (g, text) in self.guests.iter_mut().zip(texts) {
            let (found, pos) = new_cycles(text, g.pos);
            g.pos = pos;
            if found.is_empty() {
                continue;
            }
            g.last_new = Instant::now();
            for (n, ms) in found {
                // Any cycle ends the one that may have started before the window.
                let first = std::mem::take(&mut g.skip_next);
                if first || n < WARMUP_CYCLES {
                    continue;
                }
                self.window.push(ms);
            }
        }
    }

    /// The current window's cycle times.
    pub fn window(&self) -> &[f64] {
        &self.window
    }

    /// Indices of the guests with no new cycle for the stall time.
    pub fn stalled(&self) -> Vec<usize> {
        self.guests
            .iter()
            .enumerate()
            .filter(|(_, g)| g.last_new.elapsed() > self.stall)
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_lines_parse() {
        assert_eq!(
            parse_cycle_line("LAB-CYCLE n=3 ms=412.5 read=16777216"),
            Some((3, 412.5))
        );
        assert_eq!(
            parse_cycle_line("[   12.3] random: crng init done LAB-CYCLE ms=7 n=0"),
            Some((0, 7.0))
        );
        assert_eq!(parse_cycle_line("LAB-CYCLE n=3"), None);
        assert_eq!(parse_cycle_line("LAB-CYCLE n=x ms=1"), None);
        assert_eq!(parse_cycle_line("LAB-CYCLE n=1 ms=-1"), None);
        assert_eq!(parse_cycle_line("LAB-CYCLE n=1 ms=NaN"), None);
        assert_eq!(parse_cycle_line("LAB-WAIT work=light"), None);
    }

    #[test]
    fn new_cycles_waits_for_whole_lines() {
        let t = "boot\nLAB-CYCLE n=0 ms=10\nLAB-CYCLE n=1 ms=2";
        let (c, pos) = new_cycles(t, 0);
        assert_eq!(c, vec![(0, 10.0)]);
        assert_eq!(&t[pos..], "LAB-CYCLE n=1 ms=2");
        let t2 = format!("{t}0\nLAB-CYC");
        let (c, pos2) = new_cycles(&t2, pos);
        assert_eq!(c, vec![(1, 20.0)]);
        assert_eq!(&t2[pos2..], "LAB-CYC");
        assert_eq!(new_cycles(&t2, pos2), (vec![], pos2));
        // A position past the text (a console that shrank) finds nothing.
        assert_eq!(new_cycles("ab", 10), (vec![], 10));
    }

    #[test]
    fn median_and_slowdown() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 100.0]), Some(3.0));
        assert_eq!(
            slowdown(&[100.0, 110.0, 90.0], &[150.0, 250.0, 200.0]),
            Some(2.0)
        );
        assert_eq!(slowdown(&[], &[1.0]), None);
        assert_eq!(slowdown(&[1.0], &[]), None);
        assert_eq!(slowdown(&[0.0], &[1.0]), None);
    }

    #[test]
    fn stats_use_the_first_and_the_last_stable_window() {
        let by_count = vec![
            vec![100.0, 100.0, 120.0],
            vec![130.0, 150.0],
            vec![300.0, 310.0, 290.0],
            vec![900.0],
        ];
        let s = cycle_stats(&by_count, 3, 1);
        assert_eq!(s.alone_ms, Some(100.0));
        assert_eq!(s.stable_ms, Some(300.0));
        assert_eq!(s.slowdown, Some(3.0));
        assert_eq!(s.stalled, 1);
        assert_eq!(s.steps.len(), 3, "the unstable count is left out");
        assert_eq!(
            s.steps[1],
            CycleStep {
                guests: 2,
                cycles: 2,
                median_ms: 140.0
            }
        );
        // One stable guest: the same window, no slowdown.
        assert_eq!(cycle_stats(&by_count, 1, 0).slowdown, Some(1.0));
        // Nothing stable or measured.
        let none = cycle_stats(&by_count, 0, 0);
        assert_eq!((none.stable_ms, none.slowdown), (None, None));
        assert_eq!(cycle_stats(&[], 2, 0).alone_ms, None);
    }

    #[test]
    fn watch_drops_each_guests_first_cycle_in_a_window() {
        let mut w = CycleWatch::new(Duration::from_secs(3600));
        w.add_guest();
        let mut a = String::from("LAB-WAIT\n");
        w.begin_window(std::slice::from_ref(&a));
        a.push_str("LAB-CYCLE n=0 ms=900\nLAB-CYCLE n=1 ms=500\n");
        a.push_str("LAB-CYCLE n=2 ms=90\nLAB-CYCLE n=3 ms=100\n");
        w.poll(std::slice::from_ref(&a));
        assert_eq!(w.window(), &[90.0, 100.0], "warm-up cycles are dropped");
        w.add_guest();
        let mut b = String::new();
        w.begin_window(&[a.clone(), b.clone()]);
        assert!(w.window().is_empty());
        a.push_str("LAB-CYCLE n=4 ms=150\nLAB-CYCLE n=5 ms=120\n");
        b.push_str("LAB-CYCLE n=0 ms=800\nLAB-CYCLE n=1 ms=300\n");
        b.push_str("LAB-CYCLE n=2 ms=130\n");
        w.poll(&[a.clone(), b.clone()]);
        assert_eq!(w.window(), &[120.0, 130.0]);
        assert!(w.stalled().is_empty());
        let mut s = CycleWatch::new(Duration::ZERO);
        s.add_guest();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.stalled(), vec![0]);
    }
}
