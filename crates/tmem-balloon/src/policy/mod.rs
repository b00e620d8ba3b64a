//! Balloon policies: pure functions of (stats history, config, current state)
//! → [`Decision`] {target bytes, reason}.
//!
//! * [`SelfBalloon`] — xen-selfballoon, exactly (goal = Committed_AS +
//!   reserve, 1/8 down / 1/1 up hysteresis, piecewise-linear floor).
//! * [`PressurePolicy`] — host-pressure-driven sharing by weights (MOM /
//!   Proxmox shape) on guest *MemAvailable*, host MemAvailable and PSI, and
//!   guest fault/refault/swap-in rates.
//! * [`StaticPolicy`] — no ballooning (baseline): the guest keeps its maximum.
//!
//! Every policy runs inside a [`Governor`], which applies the per-guest floor
//! and maximum, the rate limit on the way down, **fast give-back** on the way
//! up, and stuck detection.
//!
//! Units: all sizes are bytes of *logical guest size*, i.e. the value of QMP
//! `balloon {value}` / `query-balloon {actual}`.

mod governor;
mod pressure;
mod selfballoon;

pub use governor::{GiveBackConfig, Governor, GovernorConfig, GovernorDecision, Spike};
pub use pressure::{distribute, host_goal, PressureConfig, PressurePolicy, ShareInput};
pub use selfballoon::{selfballoon_floor, SelfBalloon, SelfBalloonConfig};

use serde::{Deserialize, Serialize};

use crate::psi::Psi;
use crate::stats::StatsHistory;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// The guest side of a policy's input.
#[derive(Debug, Clone, Copy)]
pub struct GuestView<'a> {
    /// Snapshots, newest last.
    pub history: &'a StatsHistory,
    /// Current logical size (`query-balloon` `actual`), bytes.
    pub actual: u64,
    /// Boot (maximum) size of the guest, bytes.
    pub max: u64,
    /// Policy interval, milliseconds.
    pub interval_ms: u64,
}

impl GuestView<'_> {
    /// Bytes of logical size that the guest kernel does not count in
    /// `MemTotal` (kernel image, reserved pages): `actual - MemTotal`.
    /// Adding it converts a MemTotal-domain size to a balloon target.
    pub fn kernel_offset(&self) -> u64 {
        match self.history.latest().and_then(|s| s.total) {
            Some(t) => self.actual.saturating_sub(t),
            None => 0,
        }
    }
}

/// The host side of a policy's input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    /// Host `MemTotal`, bytes.
    pub total: u64,
    /// Host `MemAvailable`, bytes.
    pub available: u64,
    /// Host memory PSI, if available.
    pub psi: Option<Psi>,
    /// This guest's allotment from the host-wide share plan
    /// ([`distribute`]), computed by the manager over all guests. `None`
    /// makes [`PressurePolicy`] plan for this guest alone.
    pub share_target: Option<u64>,
}

/// A policy's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Target logical size, bytes.
    pub target: u64,
    /// Human-readable reason, for status and logs.
    pub reason: String,
}

impl Decision {
    /// Shorthand constructor.
    pub fn new(target: u64, reason: impl Into<String>) -> Self {
        Self {
            target,
            reason: reason.into(),
        }
    }
}

/// A balloon policy.
///
/// Contract: `decide` is called once per interval with the newest stats
/// already pushed into the history; it must not do I/O and must return a
/// target even when stats are missing (typically "hold at `actual`").
pub trait Policy: Send + std::fmt::Debug {
    /// Short stable name (`"selfballoon"`, `"pressure"`, `"static"`).
    fn name(&self) -> &'static str;
    /// Compute the target for this interval.
    fn decide(&mut self, guest: &GuestView<'_>, host: &HostView) -> Decision;
}

/// No ballooning: the target is always the guest's maximum.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaticPolicy;

impl Policy for StaticPolicy {
    fn name(&self) -> &'static str {
        "static"
    }
    fn decide(&mut self, guest: &GuestView<'_>, _host: &HostView) -> Decision {
        Decision::new(guest.max, "static: no ballooning")
    }
}

/// Policy selection (configuration form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PolicyKind {
    /// [`StaticPolicy`].
    Static,
    /// [`SelfBalloon`].
    SelfBalloon(SelfBalloonConfig),
    /// [`PressurePolicy`].
    Pressure(PressureConfig),
}

impl Default for PolicyKind {
    fn default() -> Self {
        Self::SelfBalloon(SelfBalloonConfig::default())
    }
}

/// A policy chosen by [`PolicyKind`], dispatched without boxing.
#[derive(Debug, Clone)]
pub enum AnyPolicy {
    /// See [`StaticPolicy`].
    Static(StaticPolicy),
    /// See [`SelfBalloon`].
    SelfBalloon(SelfBalloon),
    /// See [`PressurePolicy`].
    Pressure(PressurePolicy),
}

impl From<&PolicyKind> for AnyPolicy {
    fn from(k: &PolicyKind) -> Self {
        match k {
            PolicyKind::Static => Self::Static(StaticPolicy),
            PolicyKind::SelfBalloon(c) => Self::SelfBalloon(SelfBalloon::new(c.clone())),
            PolicyKind::Pressure(c) => Self::Pressure(PressurePolicy::new(c.clone())),
        }
    }
}

impl Policy for AnyPolicy {
    fn name(&self) -> &'static str {
        match self {
            Self::Static(p) => p.name(),
            Self::SelfBalloon(p) => p.name(),
            Self::Pressure(p) => p.name(),
        }
    }
    fn decide(&mut self, guest: &GuestView<'_>, host: &HostView) -> Decision {
        match self {
            Self::Static(p) => p.decide(guest, host),
            Self::SelfBalloon(p) => p.decide(guest, host),
            Self::Pressure(p) => p.decide(guest, host),
        }
    }
}

/// Format bytes as MiB with one decimal, for reasons.
pub(crate) fn mib(b: u64) -> String {
    format!("{:.1}MiB", b as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_policy_keeps_max_and_kind_serde() {
        let h = StatsHistory::new(4);
        let g = GuestView {
            history: &h,
            actual: 100,
            max: 1000,
            interval_ms: 1000,
        };
        let mut p = AnyPolicy::from(&PolicyKind::Static);
        assert_eq!(p.decide(&g, &HostView::default()).target, 1000);
        assert_eq!(p.name(), "static");
        let k: PolicyKind =
            serde_json::from_str(r#"{"kind":"selfballoon","down_hysteresis":4}"#).expect("parse");
        match k {
            PolicyKind::SelfBalloon(c) => {
                assert_eq!(c.down_hysteresis, 4);
                assert_eq!(c.up_hysteresis, 1);
            }
            other => panic!("wrong kind {other:?}"),
        }
    }
}
