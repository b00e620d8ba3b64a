//! Guest memory statistics: `/proc/meminfo` and `/proc/vmstat` parsers, the
//! [`GuestStats`] snapshot and the [`StatsHistory`] ring buffer.
//!
//! All parsers are total functions of text: malformed lines are skipped, never
//! a panic. Every [`GuestStats`] field is optional because sources differ (the
//! in-guest agent reports everything, QEMU's `guest-stats` only a subset).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Iterate `Key: value [kB]` lines of `/proc/meminfo` as `(key, bytes)`.
///
/// Values with a `kB` suffix are multiplied by 1024; lines that do not parse
/// are skipped.
pub fn meminfo_pairs(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let (key, rest) = line.split_once(':')?;
        let mut it = rest.split_whitespace();
        let num: u64 = it.next()?.parse().ok()?;
        let bytes = match it.next() {
            Some("kB") => num.checked_mul(1024)?,
            Some(_) => return None,
            None => num,
        };
        Some((key.trim(), bytes))
    })
}

/// Iterate `key value` lines of `/proc/vmstat` as `(key, value)`.
pub fn vmstat_pairs(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let mut it = line.split_whitespace();
        let key = it.next()?;
        let val = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some((key, val))
    })
}

/// The subset of `/proc/meminfo` the balloon policies use. All values in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemInfo {
    /// `MemTotal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// `MemFree`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free: Option<u64>,
    /// `MemAvailable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<u64>,
    /// `Buffers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffers: Option<u64>,
    /// `Cached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<u64>,
    /// `SwapCached`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_cached: Option<u64>,
    /// `Committed_AS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed_as: Option<u64>,
    /// `SwapTotal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_total: Option<u64>,
    /// `SwapFree`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_free: Option<u64>,
    /// `AnonPages`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anon: Option<u64>,
    /// `Slab`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slab: Option<u64>,
    /// `SReclaimable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sreclaimable: Option<u64>,
    /// `Shmem`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shmem: Option<u64>,
}

impl MemInfo {
    /// Parse `/proc/meminfo` text.
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for (k, v) in meminfo_pairs(text) {
            let slot = match k {
                "MemTotal" => &mut m.total,
                "MemFree" => &mut m.free,
                "MemAvailable" => &mut m.available,
                "Buffers" => &mut m.buffers,
                "Cached" => &mut m.cached,
                "SwapCached" => &mut m.swap_cached,
                "Committed_AS" => &mut m.committed_as,
                "SwapTotal" => &mut m.swap_total,
                "SwapFree" => &mut m.swap_free,
                "AnonPages" => &mut m.anon,
                "Slab" => &mut m.slab,
                "SReclaimable" => &mut m.sreclaimable,
                "Shmem" => &mut m.shmem,
                _ => continue,
            };
            *slot = Some(v);
        }
        m
    }
}

/// The subset of `/proc/vmstat` the policies use. Cumulative event counters.
///
/// `pswpin`/`pswpout` are in pages, the rest are event counts. Summed fields
/// (`allocstall`, `pgscan`, `pgsteal`) add all per-zone / per-source variants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmStat {
    /// `pgfault` (all faults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgfault: Option<u64>,
    /// `pgmajfault`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgmajfault: Option<u64>,
    /// `pswpin` (pages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pswpin: Option<u64>,
    /// `pswpout` (pages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pswpout: Option<u64>,
    /// `workingset_refault_anon` (or `workingset_refault` on old kernels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refault_anon: Option<u64>,
    /// `workingset_refault_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refault_file: Option<u64>,
    /// Sum of `allocstall_*` (or `allocstall` on old kernels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocstall: Option<u64>,
    /// `oom_kill`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Sum of `pgscan_kswapd`, `pgscan_direct`, `pgscan_khugepaged`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgscan: Option<u64>,
    /// Sum of `pgsteal_kswapd`, `pgsteal_direct`, `pgsteal_khugepaged`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgsteal: Option<u64>,
}

fn add(slot: &mut Option<u64>, v: u64) {
    *slot = Some(slot.unwrap_or(0).saturating_add(v));
}

impl VmStat {
    /// Parse `/proc/vmstat` text.
    pub fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for (k, v) in vmstat_pairs(text) {
            match k {
                "pgfault" => s.pgfault = Some(v),
                "pgmajfault" => s.pgmajfault = Some(v),
                "pswpin" => s.pswpin = Some(v),
                "pswpout" => s.pswpout = Some(v),
                "workingset_refault_anon" | "workingset_refault" => s.refault_anon = Some(v),
                "workingset_refault_file" => s.refault_file = Some(v),
                "oom_kill" => s.oom_kill = Some(v),
                _ if k == "allocstall" || k.starts_with("allocstall_") => add(&mut s.allocstall, v),
                "pgscan_kswapd" | "pgscan_direct" | "pgscan_khugepaged" => add(&mut s.pgscan, v),
                "pgsteal_kswapd" | "pgsteal_direct" | "pgsteal_khugepaged" => {
                    add(&mut s.pgsteal, v)
                }
                _ => {}
            }
        }
        s
    }
}

/// Parse the first field of `/proc/uptime` into milliseconds.
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let secs: f64 = first.parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some((secs * 1000.0) as u64)
}

/// One snapshot of a guest's memory state.
///
/// Gauges are in bytes; counters are cumulative since guest boot.
/// `t_ms` is the collector's monotonic clock (milliseconds), used to derive
/// rates; it is not comparable across hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestStats {
    /// Collector timestamp, monotonic milliseconds.
    pub t_ms: u64,
    /// Guest `MemTotal` (bytes).
    pub total: Option<u64>,
    /// Guest `MemAvailable` (bytes).
    pub available: Option<u64>,
    /// Guest `MemFree` (bytes).
    pub free: Option<u64>,
    /// Page cache: `Buffers + Cached + SwapCached` (bytes; QEMU's `stat-disk-caches`).
    pub cache: Option<u64>,
    /// `Committed_AS` (bytes).
    pub committed: Option<u64>,
    /// `SwapTotal` (bytes).
    pub swap_total: Option<u64>,
    /// `SwapFree` (bytes).
    pub swap_free: Option<u64>,
    /// `AnonPages` (bytes).
    pub anon: Option<u64>,
    /// `Slab` (bytes).
    pub slab: Option<u64>,
    /// Counter: major faults.
    pub major_faults: Option<u64>,
    /// Counter: bytes swapped in.
    pub swap_in_bytes: Option<u64>,
    /// Counter: bytes swapped out.
    pub swap_out_bytes: Option<u64>,
    /// Counter: workingset refaults, anon + file.
    pub refaults: Option<u64>,
    /// Counter: direct-reclaim allocation stalls.
    pub alloc_stalls: Option<u64>,
    /// Counter: OOM kills.
    pub oom_kills: Option<u64>,
}

/// Guest page size assumed when converting page counters to bytes.
pub const PAGE_SIZE: u64 = 4096;

impl GuestStats {
    /// Build a snapshot from parsed meminfo and vmstat.
    pub fn from_proc(t_ms: u64, m: &MemInfo, v: &VmStat) -> Self {
        let cache = match (m.buffers, m.cached, m.swap_cached) {
            (None, None, _) => None,
            (b, c, s) => Some(
                b.unwrap_or(0)
                    .saturating_add(c.unwrap_or(0))
                    .saturating_add(s.unwrap_or(0)),
            ),
        };
        let refaults = match (v.refault_anon, v.refault_file) {
            (None, None) => None,
            (a, f) => Some(a.unwrap_or(0).saturating_add(f.unwrap_or(0))),
        };
        Self {
            t_ms,
            total: m.total,
            available: m.available,
            free: m.free,
            cache,
            committed: m.committed_as,
            swap_total: m.swap_total,
            swap_free: m.swap_free,
            anon: m.anon,
            slab: m.slab,
            major_faults: v.pgmajfault,
            swap_in_bytes: v.pswpin.map(|p| p.saturating_mul(PAGE_SIZE)),
            swap_out_bytes: v.pswpout.map(|p| p.saturating_mul(PAGE_SIZE)),
            refaults,
            alloc_stalls: v.allocstall,
            oom_kills: v.oom_kill,
        }
    }

    /// Field-wise merge: values from `self` win, gaps are filled from `other`.
    /// The timestamp is the later of the two.
    pub fn or(self, other: &Self) -> Self {
        Self {
            t_ms: self.t_ms.max(other.t_ms),
            total: self.total.or(other.total),
            available: self.available.or(other.available),
            free: self.free.or(other.free),
            cache: self.cache.or(other.cache),
            committed: self.committed.or(other.committed),
            swap_total: self.swap_total.or(other.swap_total),
            swap_free: self.swap_free.or(other.swap_free),
            anon: self.anon.or(other.anon),
            slab: self.slab.or(other.slab),
            major_faults: self.major_faults.or(other.major_faults),
            swap_in_bytes: self.swap_in_bytes.or(other.swap_in_bytes),
            swap_out_bytes: self.swap_out_bytes.or(other.swap_out_bytes),
            refaults: self.refaults.or(other.refaults),
            alloc_stalls: self.alloc_stalls.or(other.alloc_stalls),
            oom_kills: self.oom_kills.or(other.oom_kills),
        }
    }

    /// Make `total` mean "memory the guest can use" whatever the balloon mode.
    ///
    /// Without `deflate-on-oom`, the Linux driver removes inflated pages from
    /// `MemTotal`. With `deflate-on-oom=on` it does not: `MemTotal` stays at
    /// the boot value and the balloon's pages count as used (MemAvailable
    /// drops). `MemTotal > actual` can only happen in the second mode; then
    /// the balloon (`max - actual`) is subtracted from `total` so policies
    /// see the same numbers in both modes. (When the balloon is smaller than
    /// the kernel's reserved memory the modes are indistinguishable and the
    /// error is at most that reserve.)
    pub fn balloon_normalized(mut self, actual: u64, max: u64) -> Self {
        if let Some(t) = self.total {
            if t > actual {
                self.total = Some(t.saturating_sub(max.saturating_sub(actual)));
            }
        }
        self
    }

    /// Memory in use that cannot be reclaimed cheaply: `MemTotal - MemAvailable`.
    pub fn used(&self) -> Option<u64> {
        Some(self.total?.saturating_sub(self.available?))
    }

    /// Swap in use (bytes), 0 if swap is absent.
    pub fn swap_used(&self) -> u64 {
        match (self.swap_total, self.swap_free) {
            (Some(t), Some(f)) => t.saturating_sub(f),
            _ => 0,
        }
    }
}

/// Per-second rates derived from two consecutive snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Major faults per second.
    pub major_faults: Option<f64>,
    /// Swap-in bytes per second.
    pub swap_in_bytes: Option<f64>,
    /// Swap-out bytes per second.
    pub swap_out_bytes: Option<f64>,
    /// Refaults per second.
    pub refaults: Option<f64>,
    /// Allocation stalls per second.
    pub alloc_stalls: Option<f64>,
    /// OOM kills in the interval (count, not per second).
    pub oom_kills: Option<u64>,
}

/// A fixed-capacity ring buffer of snapshots with rate derivation.
#[derive(Debug, Clone)]
pub struct StatsHistory {
    cap: usize,
    buf: VecDeque<GuestStats>,
}

impl Default for StatsHistory {
    fn default() -> Self {
        Self::new(64)
    }
}

impl StatsHistory {
    /// A history holding at most `cap` snapshots (at least 2).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(2);
        Self {
            cap,
            buf: VecDeque::with_capacity(cap),
        }
    }

    /// Append a snapshot, dropping the oldest when full. A snapshot whose
    /// timestamp is not after the latest one replaces it.
    pub fn push(&mut self, s: GuestStats) {
        if let Some(last) = self.buf.back_mut() {
            if s.t_ms <= last.t_ms {
                *last = s;
                return;
            }
        }
        if self.buf.len() == self.cap {
            self.buf.pop_front();
        }
        self.buf.push_back(s);
    }

    /// The newest snapshot.
    pub fn latest(&self) -> Option<&GuestStats> {
        self.buf.back()
    }

    /// The snapshot before the newest.
    pub fn previous(&self) -> Option<&GuestStats> {
        self.buf.len().checked_sub(2).and_then(|i| self.buf.get(i))
    }

    /// Number of stored snapshots.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no snapshot is stored.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Iterate snapshots, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &GuestStats> {
        self.buf.iter()
    }

    /// Rate per second of a counter between the two newest snapshots.
    /// `None` if a value is missing, time did not advance, or the counter
    /// went backwards (guest reboot).
    pub fn rate(&self, f: impl Fn(&GuestStats) -> Option<u64>) -> Option<f64> {
        let (a, b) = (self.previous()?, self.latest()?);
        let dt = b.t_ms.checked_sub(a.t_ms)?;
        if dt == 0 {
            return None;
        }
        let dv = f(b)?.checked_sub(f(a)?)?;
        Some(dv as f64 * 1000.0 / dt as f64)
    }

    /// All rates between the two newest snapshots.
    pub fn rates(&self) -> Rates {
        let oom = match (self.previous(), self.latest()) {
            (Some(a), Some(b)) => match (a.oom_kills, b.oom_kills) {
                (Some(x), Some(y)) => y.checked_sub(x),
                _ => None,
            },
            _ => None,
        };
        Rates {
            major_faults: self.rate(|s| s.major_faults),
            swap_in_bytes: self.rate(|s| s.swap_in_bytes),
            swap_out_bytes: self.rate(|s| s.swap_out_bytes),
            refaults: self.rate(|s| s.refaults),
            alloc_stalls: self.rate(|s| s.alloc_stalls),
            oom_kills: oom,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        1014808 kB\nMemFree:          123456 kB\nMemAvailable:     654321 kB\nBuffers:            1000 kB\nCached:           200000 kB\nSwapCached:            4 kB\nActive:           1 kB\nSwapTotal:       1048572 kB\nSwapFree:        1048000 kB\nAnonPages:        100000 kB\nSlab:              50000 kB\nSReclaimable:      30000 kB\nCommitted_AS:     400000 kB\nHugePages_Total:       0\ngarbage line\nBad:   x kB\n";
    const VMSTAT: &str = "nr_free_pages 1234\npgfault 99999\npgmajfault 42\npswpin 10\npswpout 20\nworkingset_refault_anon 5\nworkingset_refault_file 7\nallocstall_dma 1\nallocstall_dma32 2\nallocstall_normal 3\nallocstall_movable 4\npgscan_kswapd 100\npgscan_direct 11\npgsteal_kswapd 90\npgsteal_direct 9\noom_kill 1\nbroken\nx y z\n";

    #[test]
    fn meminfo_fixed_text() {
        let m = MemInfo::parse(MEMINFO);
        assert_eq!(m.total, Some(1014808 * 1024));
        assert_eq!(m.available, Some(654321 * 1024));
        assert_eq!(m.committed_as, Some(400000 * 1024));
        assert_eq!(m.swap_cached, Some(4096));
        assert_eq!(m.shmem, None);
        // HugePages_Total has no unit: raw number.
        assert!(meminfo_pairs(MEMINFO).any(|(k, v)| k == "HugePages_Total" && v == 0));
    }

    #[test]
    fn vmstat_fixed_text() {
        let v = VmStat::parse(VMSTAT);
        assert_eq!(v.pgmajfault, Some(42));
        assert_eq!(v.allocstall, Some(10));
        assert_eq!(v.pgscan, Some(111));
        assert_eq!(v.pgsteal, Some(99));
        assert_eq!(v.refault_anon, Some(5));
        assert_eq!(v.oom_kill, Some(1));
        let old = VmStat::parse("allocstall 7\nworkingset_refault 3\n");
        assert_eq!(old.allocstall, Some(7));
        assert_eq!(old.refault_anon, Some(3));
    }

    #[test]
    fn guest_stats_from_proc() {
        let g = GuestStats::from_proc(5, &MemInfo::parse(MEMINFO), &VmStat::parse(VMSTAT));
        assert_eq!(g.cache, Some((1000 + 200000 + 4) * 1024));
        assert_eq!(g.swap_in_bytes, Some(10 * 4096));
        assert_eq!(g.refaults, Some(12));
        assert_eq!(g.used(), Some((1014808 - 654321) * 1024));
        assert_eq!(g.swap_used(), 572 * 1024);
    }

    #[test]
    fn real_proc_of_this_host() {
        let Ok(mi) = std::fs::read_to_string("/proc/meminfo") else {
            return;
        };
        let m = MemInfo::parse(&mi);
        let (total, avail) = (m.total.unwrap_or(0), m.available.unwrap_or(u64::MAX));
        assert!(total > 0, "MemTotal parsed");
        assert!(avail <= total, "MemAvailable <= MemTotal");
        assert!(m.committed_as.is_some());
        if let Ok(vs) = std::fs::read_to_string("/proc/vmstat") {
            let v = VmStat::parse(&vs);
            assert!(v.pgfault.unwrap_or(0) > 0);
            assert!(v.pgmajfault.is_some());
        }
        if let Ok(up) = std::fs::read_to_string("/proc/uptime") {
            assert!(parse_uptime_ms(&up).is_some());
        }
    }

    #[test]
    fn history_rates_and_reset() {
        let mut h = StatsHistory::new(3);
        let s = |t, mf| GuestStats {
            t_ms: t,
            major_faults: Some(mf),
            ..Default::default()
        };
        h.push(s(1000, 10));
        assert_eq!(h.rate(|s| s.major_faults), None);
        h.push(s(3000, 110));
        assert_eq!(h.rate(|s| s.major_faults), Some(50.0));
        h.push(s(4000, 5)); // counter reset (reboot)
        assert_eq!(h.rate(|s| s.major_faults), None);
        h.push(s(5000, 15));
        assert_eq!(h.len(), 3);
        assert_eq!(h.rates().major_faults, Some(10.0));
        h.push(s(5000, 25)); // same timestamp replaces
        assert_eq!(h.len(), 3);
        assert_eq!(h.rates().major_faults, Some(20.0));
    }

    #[test]
    fn balloon_normalization_both_modes() {
        let mib = 1u64 << 20;
        // deflate-on-oom: MemTotal stays 1000 MiB of a 1024 MiB guest inflated to 512 MiB.
        let s = GuestStats {
            total: Some(1000 * mib),
            available: Some(300 * mib),
            ..Default::default()
        };
        let n = s.balloon_normalized(512 * mib, 1024 * mib);
        assert_eq!(n.total, Some(488 * mib));
        assert_eq!(n.used(), Some(188 * mib));
        // Plain mode: MemTotal already shrank to 488 MiB: unchanged.
        let s = GuestStats {
            total: Some(488 * mib),
            ..Default::default()
        };
        assert_eq!(
            s.balloon_normalized(512 * mib, 1024 * mib).total,
            Some(488 * mib)
        );
        // Not inflated: unchanged.
        let s = GuestStats {
            total: Some(1000 * mib),
            ..Default::default()
        };
        assert_eq!(
            s.balloon_normalized(1024 * mib, 1024 * mib).total,
            Some(1000 * mib)
        );
    }

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_ms("12.50 3.00\n"), Some(12500));
        assert_eq!(parse_uptime_ms("nan 1"), None);
        assert_eq!(parse_uptime_ms(""), None);
    }
}
