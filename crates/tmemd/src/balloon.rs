//! Balloon manager integration: the engine as the manager's [`PoolControl`], and the
//! API's guests run by `tmem_balloon`'s [`Manager`] (one loop per guest; guests are added
//! and removed while the daemon runs, and a removed guest no longer counts in the pool
//! budget).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tmem_api::{CreateGuest, GuestInfo, PolicyName};
use tmem_balloon::libvirt::{LibvirtDomain, LibvirtHandle};
use tmem_balloon::manager::{
    AgentStats, BalloonActuator, GuestSpec, HostProbe, Manager, ManagerConfig, ManagerError,
    PoolControl, QmpHandle, StatsSource,
};
use tmem_balloon::policy::{PressureConfig, SelfBalloonConfig};
use tmem_balloon::{GovernorConfig, PolicyKind};
use tmem_core::Engine;

/// QOM path of the balloon device (`tmem_balloon::qemu` names it `balloon0`).
pub const BALLOON_QOM: &str = "/machine/peripheral/balloon0";
/// QMP command timeout.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// The engine as the balloon manager's pool: budget up when guests shrink, `shrink` at once
/// when a guest must grow.
///
/// Both act on memory as the kernel charges it: a shrink reports how much the pool's
/// resident memory really fell (not what the engine's books say it freed), and a new
/// budget is enforced on the resident figure.
///
/// The manager computes the budget as host RAM − reserve − Σ guests; the operator's budget
/// (`--budget`, `PUT /budget`) stays the ceiling, so the manager moves the budget below it
/// and never above.
#[derive(Debug)]
pub struct EnginePool {
    engine: Arc<Engine>,
    ceiling: AtomicU64,
}

impl EnginePool {
    /// The engine, with its current budget as the ceiling.
    pub fn new(engine: Arc<Engine>) -> Self {
        let ceiling = AtomicU64::new(engine.budget());
        EnginePool { engine, ceiling }
    }

    /// Sets the operator's budget (the ceiling) and applies it now; returns bytes released.
    pub fn set_ceiling(&self, bytes: u64) -> u64 {
        self.ceiling.store(bytes, Ordering::Relaxed);
        self.fit(bytes)
    }

    /// Applies a budget and makes the pool's resident memory fit it; returns the fall of
    /// resident memory in bytes.
    fn fit(&self, bytes: u64) -> u64 {
        let before = self.engine.resident_bytes();
        self.engine.set_budget(bytes);
        // The engine's account and the kernel's can differ by tables and in-flight pages:
        // what counts is the kernel's.
        for _ in 0..3 {
            let resident = self.engine.resident_bytes();
            if resident <= bytes || self.engine.shrink(resident - bytes) == 0 {
                break;
            }
        }
        crate::memory::trim_heap();
        before.saturating_sub(self.engine.resident_bytes())
    }

    /// The operator's budget.
    pub fn ceiling(&self) -> u64 {
        self.ceiling.load(Ordering::Relaxed)
    }
}

impl PoolControl for EnginePool {
    fn set_budget(&self, bytes: u64) {
        let bytes = bytes.min(self.ceiling());
        if bytes == self.engine.budget() {
            return;
        }
        let released = self.fit(bytes);
        tracing::debug!(budget = bytes, released, "balloon manager set pool budget");
    }
    fn shrink(&self, bytes: u64) -> u64 {
        let before = self.engine.resident_bytes();
        self.engine.shrink(bytes);
        crate::memory::trim_heap();
        before.saturating_sub(self.engine.resident_bytes())
    }
    fn budget(&self) -> u64 {
        self.engine.budget()
    }
}

/// Errors adding or removing a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A guest with this name is managed already.
    #[error("Guest {0:?} already exists")]
    Exists(String),
    /// No guest with this name.
    #[error("Unknown guest {0:?}")]
    Unknown(String),
    /// The name is not valid.
    #[error("Invalid guest name {0:?}")]
    BadName(String),
    /// Neither or both of a QMP socket and a libvirt domain were given.
    #[error("Give a guest either a QMP socket or a libvirt domain")]
    Target,
    /// The guest's size could not be read over QMP.
    #[error("Cannot query guest {0:?} over QMP")]
    Qmp(String, #[source] tmem_balloon::manager::ActuatorError),
    /// The libvirt domain could not be reached, or it does not run.
    #[error("Cannot query libvirt domain {0:?}")]
    Libvirt(String, #[source] tmem_balloon::manager::ActuatorError),
    /// The agent channel could not be opened.
    #[error("Cannot open agent channel {0}")]
    Agent(PathBuf, #[source] std::io::Error),
    /// The guest thread could not be started.
    #[error("Cannot start guest thread")]
    Thread(#[source] std::io::Error),
    /// `min` is above `max`.
    #[error("Guest min {0} is above max {1}")]
    Bounds(u64, u64),
}

/// A managed guest: what it was added with.
struct Managed {
    /// The request (kept in the manifest).
    req: CreateGuest,
    /// Its policy's name.
    policy: String,
    /// Its maximum, bytes (shown before the first interval publishes a status).
    max: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The managed guests: the API's requests, run by `tmem_balloon`'s [`Manager`] (one loop
/// per guest, added and removed while the daemon runs).
pub struct GuestRuntime {
    cfg: ManagerConfig,
    manager: Manager,
    guests: Mutex<BTreeMap<String, Managed>>,
    /// Names of guests the manager found gone, for [`GuestRuntime::reap`] (taken once).
    gone: Mutex<Option<Receiver<String>>>,
}

impl std::fmt::Debug for GuestRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRuntime")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl GuestRuntime {
    /// A runtime with no guests.
    pub fn new(cfg: ManagerConfig, pool: Arc<dyn PoolControl>, host: Arc<dyn HostProbe>) -> Self {
        let manager = Manager::new(cfg.clone(), pool, host);
        let (tx, rx): (Sender<String>, Receiver<String>) = std::sync::mpsc::channel();
        // Told on the gone guest's own thread: only pass the name on (see GoneHook).
        manager.set_gone_hook(Arc::new(move |name: &str| {
            let _ = tx.send(name.to_owned());
        }));
        GuestRuntime {
            manager,
            cfg,
            guests: Mutex::new(BTreeMap::new()),
            gone: Mutex::new(Some(rx)),
        }
    }

    /// The names of guests found gone (a libvirt domain destroyed, undefined or restarted),
    /// as they happen; for the thread that calls [`GuestRuntime::reap`]. `None` after the
    /// first call. The channel closes when the runtime is dropped.
    pub fn take_gone(&self) -> Option<Receiver<String>> {
        lock(&self.gone).take()
    }

    /// Drops `name` if it is still managed and gone (not a guest added since under the same
    /// name); returns whether it did.
    pub fn reap(&self, name: &str) -> bool {
        let mut guests = lock(&self.guests);
        if !guests.contains_key(name) {
            return false;
        }
        let gone = self
            .manager
            .status()
            .iter()
            .any(|s| s.name == name && s.gone);
        if !gone {
            return false;
        }
        guests.remove(name);
        self.manager.remove_guest(name);
        true
    }

    /// Starts managing a guest.
    pub fn add(&self, req: &CreateGuest) -> Result<GuestInfo, GuestError> {
        if !crate::exports::valid_name(&req.name) {
            return Err(GuestError::BadName(req.name.clone()));
        }
        let mut guests = lock(&self.guests);
        if guests.contains_key(&req.name) {
            return Err(GuestError::Exists(req.name.clone()));
        }
        if req.libvirt.is_some() != req.qmp.as_os_str().is_empty() {
            return Err(GuestError::Target);
        }
        // The actuator, its own stats source and the guest's maximum.
        let (actuator, own_stats, max): (Box<dyn BalloonActuator>, Box<dyn StatsSource>, u64) =
            match &req.libvirt {
                Some(lv) => {
                    let mut dom = LibvirtDomain::new(&lv.domain, lv.uri.clone());
                    dom.stats_period_secs = (self.cfg.interval_ms / 1000).clamp(1, 60) as u32;
                    let h = LibvirtHandle::new(dom);
                    // Also pins the domain's current run: a restart later ends the guest.
                    let max = h
                        .maximum()
                        .map_err(|e| GuestError::Libvirt(lv.domain.clone(), e))?;
                    let max = req.max.map_or(max, |m| m.0);
                    (Box::new(h.clone()), Box::new(h.stats_source()), max)
                }
                None => {
                    let mut qmp = QmpHandle::new(&req.qmp, BALLOON_QOM, 2, QMP_TIMEOUT);
                    let max = match req.max {
                        Some(m) => m.0,
                        None => qmp
                            .actual()
                            .map_err(|e| GuestError::Qmp(req.name.clone(), e))?,
                    };
                    let src = qmp.stats_source();
                    (Box::new(qmp), Box::new(src), max)
                }
            };
        let floor = req.min.map(|m| m.0).unwrap_or(0);
        if floor > max {
            return Err(GuestError::Bounds(floor, max));
        }
        let policy = req.policy.unwrap_or_default();
        let (kind, policy_name) = match policy {
            PolicyName::Selfballoon => (
                PolicyKind::SelfBalloon(SelfBalloonConfig::default()),
                "selfballoon",
            ),
            PolicyName::Pressure => (PolicyKind::Pressure(PressureConfig::default()), "pressure"),
            PolicyName::Static => (PolicyKind::Static, "static"),
        };
        let mut sources: Vec<Box<dyn StatsSource>> = Vec::new();
        if let Some(a) = &req.agent {
            let s = AgentStats::spawn(a, Duration::from_millis(self.cfg.interval_ms.max(1) * 3))
                .map_err(|e| GuestError::Agent(a.clone(), e))?;
            sources.push(Box::new(s));
        }
        sources.push(own_stats);
        let spec = GuestSpec {
            name: req.name.clone(),
            max,
            governor: GovernorConfig {
                policy: kind,
                floor,
                max: req.max.map(|m| m.0),
                ..Default::default()
            },
            actuator,
            sources,
        };
        self.manager.add_guest(spec).map_err(|e| match e {
            ManagerError::Duplicate(n) => GuestError::Exists(n),
            ManagerError::Spawn(e) => GuestError::Thread(e),
        })?;
        let m = Managed {
            req: req.clone(),
            policy: policy_name.into(),
            max,
        };
        let info = self.info_of(&req.name, &m);
        guests.insert(req.name.clone(), m);
        tracing::info!(guest = %req.name, max, "guest added to balloon manager");
        Ok(info)
    }

    /// Stops managing a guest (its balloon stays where it is; it no longer counts in the
    /// pool budget).
    pub fn remove(&self, name: &str) -> Result<(), GuestError> {
        let mut guests = lock(&self.guests);
        guests
            .remove(name)
            .ok_or_else(|| GuestError::Unknown(name.to_owned()))?;
        self.manager.remove_guest(name);
        tracing::info!(guest = %name, "guest removed from balloon manager");
        Ok(())
    }

    fn info_of(&self, name: &str, m: &Managed) -> GuestInfo {
        let st = self
            .manager
            .status()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_default();
        GuestInfo {
            name: name.to_owned(),
            qmp: m.req.qmp.clone(),
            libvirt: m.req.libvirt.clone(),
            gone: st.gone,
            agent: m.req.agent.clone(),
            policy: if st.policy.is_empty() {
                m.policy.clone()
            } else {
                st.policy
            },
            actuator: if !st.actuator.is_empty() {
                st.actuator
            } else if m.req.libvirt.is_some() {
                "libvirt".into()
            } else {
                "qmp".into()
            },
            max: if st.max == 0 { m.max } else { st.max },
            actual: st.actual,
            target: st.target,
            stuck: st.stuck,
            reclaimed_bytes: st.reclaimed_bytes,
            given_back_bytes: st.given_back_bytes,
            intervals: st.intervals,
            errors: st.errors,
            last_error: st.last_error,
            decision_target: st.last_decision.as_ref().map(|d| d.target),
            decision_reason: st.last_decision.map(|d| d.reason),
            live_sources: st.live_sources,
            available: st.stats.as_ref().and_then(|s| s.available),
            committed: st.stats.as_ref().and_then(|s| s.committed),
            major_faults_per_s: st.rates.major_faults,
            swap_in_bytes_per_s: st.rates.swap_in_bytes,
            oom_kills: st.stats.as_ref().and_then(|s| s.oom_kills),
            reclaim_mib_s: st.reclaim_mib_s,
            give_back_mib_s: st.give_back_mib_s,
            last_spike_to_deflate_ms: st.last_spike_to_deflate_ms,
        }
    }

    /// The requests the managed guests were added with, by name.
    pub fn requests(&self) -> Vec<CreateGuest> {
        lock(&self.guests).values().map(|m| m.req.clone()).collect()
    }

    /// The managed guests, as the API shows them.
    pub fn list(&self) -> Vec<GuestInfo> {
        let guests = lock(&self.guests);
        guests.iter().map(|(n, m)| self.info_of(n, m)).collect()
    }

    /// Number of guests.
    pub fn len(&self) -> usize {
        lock(&self.guests).len()
    }

    /// Whether no guest is managed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every guest loop; returns the requests they were added with.
    pub fn stop_all(&self) -> Vec<CreateGuest> {
        let guests = std::mem::take(&mut *lock(&self.guests));
        for name in guests.keys() {
            self.manager.remove_guest(name);
        }
        guests.into_values().map(|m| m.req).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmem_balloon::manager::ProcHost;
    use tmem_core::EngineConfig;

    #[test]
    fn engine_pool_control() {
        let e = Arc::new(Engine::new(EngineConfig::with_budget(64 << 20)));
        let p = EnginePool::new(e.clone());
        p.set_budget(32 << 20);
        assert_eq!(p.budget(), 32 << 20);
        assert_eq!(e.budget(), 32 << 20);
        // Never above the operator's budget.
        p.set_budget(1 << 40);
        assert_eq!(e.budget(), 64 << 20);
        p.set_ceiling(16 << 20);
        p.set_budget(1 << 40);
        assert_eq!(e.budget(), 16 << 20);
        assert_eq!(p.shrink(1 << 20), 0);
    }

    #[test]
    fn engine_pool_shrinks_and_fits_resident_memory() {
        use tmem_core::{ClientConfig, ClientId, ObjectId, PageKey, PoolSpec, PAGE_SIZE};
        let e = Arc::new(Engine::new(EngineConfig::with_budget(64 << 20)));
        let p = EnginePool::new(e.clone());
        let c = ClientId(1);
        e.add_client(c, ClientConfig::default()).unwrap();
        let pool = e
            .create_pool(
                c,
                PoolSpec::private_ephemeral().with_codec(tmem_core::Codec::None),
            )
            .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for i in 0..8192u32 {
            page[..4].copy_from_slice(&i.to_le_bytes());
            page[100] = 1;
            e.put(c, PageKey::new(pool, ObjectId::from_u64(0), i), &page)
                .unwrap();
        }
        let full = e.resident_bytes();
        assert!(full >= 32 << 20, "{full}");
        // A shrink reports what the kernel stopped charging.
        let released = p.shrink(16 << 20);
        assert!(released >= 16 << 20, "released {released}");
        assert_eq!(full - e.resident_bytes(), released);
        // A lower budget is met by resident memory, not only by the engine's account.
        p.set_ceiling(8 << 20);
        assert!(e.resident_bytes() <= 8 << 20, "{}", e.resident_bytes());
    }

    #[test]
    fn unreachable_qmp_is_a_typed_error() {
        let e = Arc::new(Engine::new(EngineConfig::with_budget(64 << 20)));
        let rt = GuestRuntime::new(
            ManagerConfig::default(),
            Arc::new(EnginePool::new(e)),
            Arc::new(ProcHost),
        );
        let d = tempfile::tempdir().unwrap();
        let req = CreateGuest {
            name: "g".into(),
            qmp: d.path().join("nope.sock"),
            libvirt: None,
            agent: None,
            policy: None,
            min: None,
            max: None,
        };
        assert!(matches!(rt.add(&req), Err(GuestError::Qmp(..))));
        assert!(matches!(rt.remove("g"), Err(GuestError::Unknown(_))));
        assert!(rt.is_empty());
    }

    #[test]
    fn a_guest_needs_one_target_and_a_reachable_libvirt() {
        let e = Arc::new(Engine::new(EngineConfig::with_budget(64 << 20)));
        let rt = GuestRuntime::new(
            ManagerConfig::default(),
            Arc::new(EnginePool::new(e)),
            Arc::new(ProcHost),
        );
        let d = tempfile::tempdir().unwrap();
        let lv = tmem_api::LibvirtTarget {
            domain: "vm1".into(),
            uri: Some(format!(
                "qemu+unix:///system?socket={}",
                d.path().join("no-libvirt-sock").display()
            )),
        };
        let mut req = CreateGuest {
            name: "g".into(),
            qmp: d.path().join("q.sock"),
            libvirt: Some(lv.clone()),
            agent: None,
            policy: None,
            min: None,
            max: None,
        };
        assert!(matches!(rt.add(&req), Err(GuestError::Target)));
        req.qmp = PathBuf::new();
        req.libvirt = None;
        assert!(matches!(rt.add(&req), Err(GuestError::Target)));
        // No libvirtd behind the URI (or no virsh at all): a typed error, nothing added.
        req.libvirt = Some(lv);
        assert!(matches!(rt.add(&req), Err(GuestError::Libvirt(..))));
        assert!(rt.is_empty());
        assert!(!rt.reap("g"));
        assert!(rt.take_gone().is_some());
        assert!(rt.take_gone().is_none());
    }
}
