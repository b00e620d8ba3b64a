//! Host-pressure-driven sharing (MOM §1.5 / Proxmox §2.4 shape), fixed to
//! use *MemAvailable* (page cache is not "used") and PSI.
//!
//! ```text
//! host goal  = host MemAvailable - host MemTotal * (1 - host_target_used)   (Proxmox: 80 %)
//!   host PSI some avg10 >= psi_shrink_some (or full >= psi_shrink_full):
//!              goal = min(goal, -host MemTotal * psi_take_fraction)
//!   host PSI some avg10 >= psi_no_grow_some: goal = min(goal, 0)
//!   |goal| < dead_band: goal = 0                                            (Proxmox: 10 MiB)
//! guest min  = max(min_bytes, used + guest_headroom * actual + kernel offset)
//!              used = MemTotal - MemAvailable
//!              a guest whose major-fault / refault / swap-in rate is above its
//!              threshold is "under pressure": min = max(min, actual) (never taken from)
//! share plan = pool = Σ(current - min) + goal;  desired = min + pool * shares / Σshares,
//!              water-filled against each guest's max; then only grow when goal > 0
//!              and only shrink when goal < 0, scaled so Σ|moves| ≤ |goal|.
//! ```
//!
//! [`distribute`] is the multi-guest share plan; the manager runs it over all
//! guests and passes each guest's allotment in [`HostView::share_target`].

use serde::{Deserialize, Serialize};

use super::{mib, Decision, GuestView, HostView, Policy, MIB};

/// Tunables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PressureConfig {
    /// Fraction of host RAM the host aims to use. Default 0.80 (Proxmox).
    pub host_target_used: f64,
    /// Ignore host goals smaller than this, bytes. Default 10 MiB (Proxmox).
    pub dead_band: u64,
    /// Host PSI `some` avg10 (%) at or above which guests are not grown. Default 1.0.
    pub psi_no_grow_some: f64,
    /// Host PSI `some` avg10 (%) at or above which memory is taken. Default 10.0.
    pub psi_shrink_some: f64,
    /// Host PSI `full` avg10 (%) at or above which memory is taken. Default 2.0.
    pub psi_shrink_full: f64,
    /// Fraction of host RAM to take per interval under PSI pressure. Default 0.05.
    pub psi_take_fraction: f64,
    /// MemAvailable headroom a guest keeps, as a fraction of its size. Default 0.20 (MOM).
    pub guest_headroom: f64,
    /// Absolute minimum guest size, bytes. Default 256 MiB.
    pub min_bytes: u64,
    /// Weight for sharing; 0 excludes the guest from auto-ballooning. Default 1000.
    pub shares: u32,
    /// Guest major faults/s marking it under pressure. Default 100.
    pub guest_major_faults_per_s: f64,
    /// Guest refaults/s marking it under pressure. Default 1000.
    pub guest_refaults_per_s: f64,
    /// Guest swap-in bytes/s marking it under pressure. Default 1 MiB/s.
    pub guest_swap_in_bytes_per_s: f64,
}

impl Default for PressureConfig {
    fn default() -> Self {
        Self {
            host_target_used: 0.80,
            dead_band: 10 * MIB,
            psi_no_grow_some: 1.0,
            psi_shrink_some: 10.0,
            psi_shrink_full: 2.0,
            psi_take_fraction: 0.05,
            guest_headroom: 0.20,
            min_bytes: 256 * MIB,
            shares: 1000,
            guest_major_faults_per_s: 100.0,
            guest_refaults_per_s: 1000.0,
            guest_swap_in_bytes_per_s: MIB as f64,
        }
    }
}

/// One guest's input to the share plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInput {
    /// Current logical size, bytes.
    pub current: u64,
    /// Minimum the plan may give it, bytes.
    pub min: u64,
    /// Maximum (boot size), bytes.
    pub max: u64,
    /// Weight; 0 = not managed by the plan (kept at current).
    pub shares: u32,
}

fn frac(x: u64, f: f64) -> u64 {
    let v = x as f64 * f;
    if v.is_finite() && v > 0.0 {
        v as u64
    } else {
        0
    }
}

/// Bytes the host can give to guests (> 0) or must take from them (< 0).
pub fn host_goal(host: &HostView, cfg: &PressureConfig) -> i64 {
    let keep_free = frac(host.total, 1.0 - cfg.host_target_used.clamp(0.0, 1.0));
    let mut goal = host.available as i128 - keep_free as i128;
    if let Some(psi) = host.psi {
        let full = psi.full.map_or(0.0, |f| f.avg10);
        if psi.some.avg10 >= cfg.psi_shrink_some || full >= cfg.psi_shrink_full {
            goal = goal.min(-(frac(host.total, cfg.psi_take_fraction) as i128));
        } else if psi.some.avg10 >= cfg.psi_no_grow_some {
            goal = goal.min(0);
        }
    }
    if goal.unsigned_abs() < u128::from(cfg.dead_band) {
        goal = 0;
    }
    goal.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// True if the guest's fault, refault or swap-in rate is over its threshold.
pub(crate) fn guest_pressured(cfg: &PressureConfig, g: &GuestView<'_>) -> Option<String> {
    let r = g.history.rates();
    let over = |v: Option<f64>, lim: f64| v.is_some_and(|v| v >= lim);
    if over(r.major_faults, cfg.guest_major_faults_per_s) {
        return Some(format!(
            "major faults {:.0}/s",
            r.major_faults.unwrap_or(0.0)
        ));
    }
    if over(r.refaults, cfg.guest_refaults_per_s) {
        return Some(format!("refaults {:.0}/s", r.refaults.unwrap_or(0.0)));
    }
    if over(r.swap_in_bytes, cfg.guest_swap_in_bytes_per_s) {
        return Some(format!(
            "swap-in {:.1}MiB/s",
            r.swap_in_bytes.unwrap_or(0.0) / MIB as f64
        ));
    }
    None
}

/// Build this guest's [`ShareInput`] from its stats.
pub fn share_input(cfg: &PressureConfig, g: &GuestView<'_>) -> ShareInput {
    let max = g.max;
    let mut min = cfg.min_bytes;
    if let Some(used) = g.history.latest().and_then(|s| s.used()) {
        min = min.max(
            used.saturating_add(frac(g.actual, cfg.guest_headroom))
                .saturating_add(g.kernel_offset()),
        );
    } else {
        // No stats: never take from a guest we cannot see.
        min = min.max(g.actual);
    }
    if guest_pressured(cfg, g).is_some() {
        min = min.max(g.actual);
    }
    ShareInput {
        current: g.actual,
        min: min.min(max),
        max,
        shares: cfg.shares,
    }
}

/// The share plan: new target per guest (same order as `guests`).
///
/// Worked example (Proxmox docs): 9 GiB spare, shares 3000/1000/1000/1000,
/// all at their minimum → +4.5, +1.5, +1.5, +1.5 GiB.
pub fn distribute(goal: i64, guests: &[ShareInput]) -> Vec<u64> {
    let base: Vec<u64> = guests
        .iter()
        .map(|g| g.current.max(g.min.min(g.max)).min(g.max))
        .collect();
    if goal == 0 {
        return base;
    }
    // Water-fill the pool over the managed guests.
    let managed: Vec<usize> = (0..guests.len())
        .filter(|&i| guests[i].shares > 0)
        .collect();
    let mut pool: i128 = goal as i128;
    for &i in &managed {
        let g = &guests[i];
        pool += g.current as i128 - g.min.min(g.max) as i128;
    }
    let mut pool = pool.max(0) as u128;
    let mut desired = base.clone();
    let mut active = managed.clone();
    loop {
        let total: u128 = active.iter().map(|&i| u128::from(guests[i].shares)).sum();
        if total == 0 {
            break;
        }
        let mut capped = Vec::new();
        for &i in &active {
            let g = &guests[i];
            let min = g.min.min(g.max);
            let add = pool * u128::from(g.shares) / total;
            if u128::from(min) + add >= u128::from(g.max) {
                capped.push(i);
            }
        }
        if capped.is_empty() {
            for &i in &active {
                let g = &guests[i];
                let add = pool * u128::from(g.shares) / total;
                desired[i] = g.min.min(g.max) + add as u64;
            }
            break;
        }
        for &i in &capped {
            let g = &guests[i];
            desired[i] = g.max;
            pool = pool.saturating_sub(u128::from(g.max - g.min.min(g.max)));
        }
        active.retain(|i| !capped.contains(i));
    }
    // Move only in the goal's direction, scaled so that Σ|moves| ≤ |goal|.
    let budget = u128::from(goal.unsigned_abs());
    let moves: Vec<u128> = managed
        .iter()
        .map(|&i| {
            if goal > 0 {
                u128::from(desired[i].saturating_sub(base[i]))
            } else {
                u128::from(base[i].saturating_sub(desired[i]))
            }
        })
        .collect();
    let sum: u128 = moves.iter().sum();
    let mut out = base;
    for (k, &i) in managed.iter().enumerate() {
        let m = if sum > budget {
            moves[k] * budget / sum
        } else {
            moves[k]
        } as u64;
        out[i] = if goal > 0 { out[i] + m } else { out[i] - m };
    }
    out
}

/// The pressure policy for one guest.
#[derive(Debug, Clone)]
pub struct PressurePolicy {
    cfg: PressureConfig,
}

impl PressurePolicy {
    /// New policy with `cfg`.
    pub fn new(cfg: PressureConfig) -> Self {
        Self { cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &PressureConfig {
        &self.cfg
    }

    /// This guest's input to the host-wide share plan.
    pub fn share_input(&self, g: &GuestView<'_>) -> ShareInput {
        share_input(&self.cfg, g)
    }
}

impl Policy for PressurePolicy {
    fn name(&self) -> &'static str {
        "pressure"
    }

    fn decide(&mut self, g: &GuestView<'_>, host: &HostView) -> Decision {
        let input = share_input(&self.cfg, g);
        let goal = host_goal(host, &self.cfg);
        let (target, plan) = match host.share_target {
            Some(t) => (t.clamp(input.min, input.max), "shared plan"),
            None => (
                distribute(goal, &[input])
                    .first()
                    .copied()
                    .unwrap_or(input.current),
                "single-guest plan",
            ),
        };
        let psi = host
            .psi
            .map_or(String::from("n/a"), |p| format!("{:.2}%", p.some.avg10));
        let pressured = guest_pressured(&self.cfg, g).map_or(String::new(), |why| {
            format!(", guest under pressure ({why})")
        });
        Decision::new(
            target,
            format!(
                "pressure: host goal {}{} (avail {}, psi some {psi}), {plan}, guest min {}{pressured}",
                if goal < 0 { "-" } else { "+" },
                mib(goal.unsigned_abs()),
                mib(host.available),
                mib(input.min),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psi::{Psi, PsiLine};
    use crate::stats::{GuestStats, StatsHistory};

    const GIB: u64 = 1 << 30;

    fn si(current: u64, min: u64, max: u64, shares: u32) -> ShareInput {
        ShareInput {
            current,
            min,
            max,
            shares,
        }
    }

    #[test]
    fn proxmox_docs_share_example() {
        let g = [
            si(GIB, GIB, 16 * GIB, 3000),
            si(GIB, GIB, 16 * GIB, 1000),
            si(GIB, GIB, 16 * GIB, 1000),
            si(GIB, GIB, 16 * GIB, 1000),
        ];
        let t = distribute(9 * GIB as i64, &g);
        assert_eq!(
            t,
            vec![
                GIB + 9 * GIB / 2,
                GIB + 3 * GIB / 2,
                GIB + 3 * GIB / 2,
                GIB + 3 * GIB / 2
            ]
        );
    }

    #[test]
    fn water_fill_caps_at_max_and_redistributes() {
        let g = [si(GIB, GIB, 2 * GIB, 1000), si(GIB, GIB, 16 * GIB, 1000)];
        let t = distribute(6 * GIB as i64, &g);
        assert_eq!(t, vec![2 * GIB, 6 * GIB]);
    }

    #[test]
    fn shrink_by_weight_never_below_min_and_bounded_by_goal() {
        // Both at 8 GiB, min 2 GiB; must take 3 GiB; equal shares → 1.5 each.
        let g = [
            si(8 * GIB, 2 * GIB, 8 * GIB, 1000),
            si(8 * GIB, 2 * GIB, 8 * GIB, 1000),
        ];
        let t = distribute(-3 * GIB as i64, &g);
        assert_eq!(t, vec![8 * GIB - 3 * GIB / 2, 8 * GIB - 3 * GIB / 2]);
        // Heavier weight keeps more: take from the low-share guest first.
        let g = [
            si(8 * GIB, 2 * GIB, 8 * GIB, 3000),
            si(8 * GIB, 2 * GIB, 8 * GIB, 1000),
        ];
        let t = distribute(-4 * GIB as i64, &g);
        assert!(t[0] > t[1], "{t:?}");
        assert_eq!((16 * GIB) - t[0] - t[1], 4 * GIB);
        // Cannot take below min even for a huge goal.
        let t = distribute(-100 * GIB as i64, &g);
        assert_eq!(t, vec![2 * GIB, 2 * GIB]);
        // shares == 0: untouched.
        let g = [
            si(8 * GIB, 2 * GIB, 8 * GIB, 0),
            si(8 * GIB, 2 * GIB, 8 * GIB, 1000),
        ];
        let t = distribute(-2 * GIB as i64, &g);
        assert_eq!(t, vec![8 * GIB, 6 * GIB]);
        // goal 0: only raise guests below min.
        let g = [si(GIB, 2 * GIB, 8 * GIB, 1000)];
        assert_eq!(distribute(0, &g), vec![2 * GIB]);
    }

    fn psi(some: f64, full: f64) -> Option<Psi> {
        let l = |a| PsiLine {
            avg10: a,
            ..Default::default()
        };
        Some(Psi {
            some: l(some),
            full: Some(l(full)),
        })
    }

    #[test]
    fn host_goal_rules() {
        let cfg = PressureConfig::default();
        let h = HostView {
            total: 32 * GIB,
            available: 16 * GIB,
            psi: psi(0.0, 0.0),
            share_target: None,
        };
        // Keep 20 % of 32 GiB = 6.4 GiB free; 16 available → +9.6 GiB.
        assert_eq!(host_goal(&h, &cfg), (16 * GIB - frac(32 * GIB, 0.2)) as i64);
        // Dead band.
        let h2 = HostView {
            available: frac(32 * GIB, 0.2) + 5 * MIB,
            ..h
        };
        assert_eq!(host_goal(&h2, &cfg), 0);
        // Mild PSI: no growing.
        let h3 = HostView {
            psi: psi(2.0, 0.0),
            ..h
        };
        assert_eq!(host_goal(&h3, &cfg), 0);
        // Heavy PSI (full): take 5 % of host RAM even though MemAvailable looks fine.
        let h4 = HostView {
            psi: psi(0.5, 3.0),
            ..h
        };
        assert_eq!(host_goal(&h4, &cfg), -(frac(32 * GIB, 0.05) as i64));
        // Low MemAvailable: negative.
        let h5 = HostView {
            available: 2 * GIB,
            ..h
        };
        assert!(host_goal(&h5, &cfg) < 0);
    }

    #[test]
    fn guest_min_uses_memavailable_and_pressure() {
        let cfg = PressureConfig {
            min_bytes: 0,
            ..Default::default()
        };
        let mut h = StatsHistory::new(4);
        // 4 GiB guest, 1 GiB free but 3 GiB available (2 GiB page cache): used = 1 GiB.
        let s = GuestStats {
            t_ms: 0,
            total: Some(4 * GIB),
            free: Some(GIB),
            available: Some(3 * GIB),
            major_faults: Some(0),
            ..Default::default()
        };
        h.push(s);
        let g = GuestView {
            history: &h,
            actual: 4 * GIB,
            max: 4 * GIB,
            interval_ms: 1000,
        };
        let inp = share_input(&cfg, &g);
        assert_eq!(inp.min, GIB + frac(4 * GIB, 0.2));
        // Under a fault storm the guest is never taken from.
        h.push(GuestStats {
            t_ms: 1000,
            major_faults: Some(5000),
            ..s
        });
        let g = GuestView {
            history: &h,
            actual: 4 * GIB,
            max: 4 * GIB,
            interval_ms: 1000,
        };
        assert_eq!(share_input(&cfg, &g).min, 4 * GIB);
        let mut p = PressurePolicy::new(cfg);
        let host = HostView {
            total: 32 * GIB,
            available: GIB,
            psi: None,
            share_target: None,
        };
        let d = p.decide(&g, &host);
        assert_eq!(d.target, 4 * GIB);
        assert!(d.reason.contains("under pressure"), "{}", d.reason);
    }
}
