//! # tmem-balloon: balloon policies, guest stats and the balloon manager
//!
//! The balloon side of tmem: decide how much RAM each guest should have, take
//! the rest into the host's second-chance pool, and give it back *fast* when a
//! guest needs it.
//!
//! ## Design
//!
//! * **Stats model** ([`stats`]): [`GuestStats`] snapshots (every field
//!   optional, sources differ) in a [`StatsHistory`] ring that derives rates.
//! * **Collectors**: QEMU's balloon `guest-stats` over QMP ([`qmp`]) and the
//!   in-guest agent `tmem-guest` over virtio-serial ([`agent`]; wire format
//!   documented there). Either, both, or none may be live per guest.
//! * **Policies** ([`policy`]): pure functions (history, config, state) →
//!   [`Decision`]; `selfballoon` (xen-selfballoon exactly), `pressure`
//!   (MOM/Proxmox-like sharing on MemAvailable + PSI) and `static`, all run
//!   inside a [`Governor`] (floor/max, down rate limit, fast give-back, stuck
//!   detection).
//! * **Simulation** ([`sim`]): a deterministic scripted guest for tests/lab.
//! * **Manager** ([`manager`], feature `host`): one thread per guest; polls
//!   collectors, runs the governor, actuates through [`manager::BalloonActuator`]
//!   (QMP `balloon`; libvirt's `virDomainSetMemory` through `virsh` for
//!   libvirt domains, [`libvirt`]; or cgroup v2 `memory.high` + `memory.reclaim`
//!   for containers, [`cgroup`]) and keeps the pool budget in step through
//!   [`manager::PoolControl`].
//!
//! ## Quick start (daemon side)
//!
//! ```no_run
//! # use std::sync::Arc;
//! use tmem_balloon::manager::{GuestSpec, Manager, ManagerConfig, NoPool, ProcHost};
//! use tmem_balloon::GovernorConfig;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let m = Manager::new(ManagerConfig::default(), Arc::new(NoPool::default()), Arc::new(ProcHost));
//! m.add_guest(GuestSpec::qemu("vm1", 4 << 30, GovernorConfig::default(),
//!     "/run/vm1/qmp.sock", Some("/run/vm1/agent.sock".into()), 2)?)?;
//! for s in m.status() { println!("{} actual={} target={} stuck={}", s.name, s.actual, s.target, s.stuck); }
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! `host` (default) adds the QMP client, agent reader, cgroup actuator and
//! manager. The guest agent uses `default-features = false`: wire types and
//! `/proc` parsers only (serde, serde_json, thiserror).
//!
//! ## QEMU configuration
//!
//! Build the balloon device with [`qemu::balloon_device_args`]:
//!
//! * `free-page-reporting=on` — the guest reports free 2 MiB+ blocks (after
//!   2 s) and QEMU discards them, so memory a guest frees returns to the host
//!   even without inflating the balloon (idle high-water marks do not linger).
//!   Needs guest Linux ≥ 5.8 (`CONFIG_PAGE_REPORTING`).
//! * `deflate-on-oom=on` — last-resort safety net: the guest's OOM notifier
//!   deflates 1 MiB per callback instead of killing. The manager's fast
//!   give-back is the primary mechanism; this only covers the window between
//!   two intervals. Note (verified in a TCG guest): with this feature the
//!   guest keeps inflated pages inside `MemTotal` and counts them as used;
//!   the manager normalises stats ([`GuestStats::balloon_normalized`]) so
//!   policies behave the same in both modes.
//! * guest stats polling is enabled over QMP (`guest-stats-polling-interval`).
//!
//! The agent channel is [`qemu::agent_channel_args`]: a `virtserialport` whose
//! chardev is a Unix socket QEMU listens on (`server=on,wait=off`); the host's
//! [`agent::AgentReader`] connects to it.

pub mod agent;
pub mod policy;
pub mod psi;
pub mod qemu;
pub mod sim;
pub mod stats;

#[cfg(feature = "host")]
pub mod cgroup;
#[cfg(feature = "host")]
pub mod libvirt;
#[cfg(feature = "host")]
pub mod manager;
#[cfg(feature = "host")]
pub mod qmp;

pub use agent::AgentReport;
pub use policy::{
    Decision, Governor, GovernorConfig, GovernorDecision, GuestView, HostView, Policy, PolicyKind,
};
pub use psi::Psi;
pub use stats::{GuestStats, MemInfo, StatsHistory, VmStat};
