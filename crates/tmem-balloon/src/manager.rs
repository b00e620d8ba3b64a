//! The manager runtime: one thread per guest (no async runtime).
//!
//! Every interval each guest loop ([`GuestLoop::step`]):
//!
//! 1. reads the balloon's `actual` through its [`BalloonActuator`] and
//!    accounts reclaimed / given-back bytes and rates;
//! 2. polls its [`StatsSource`]s (QMP `guest-stats`, the agent channel) and
//!    pushes the merged snapshot (agent first, gaps filled from QMP),
//!    normalised for `deflate-on-oom` ([`GuestStats::balloon_normalized`]);
//! 3. for the `pressure` policy, publishes its [`ShareInput`] and computes the
//!    host-wide share plan ([`distribute`]) over all guests' latest inputs;
//! 4. runs the [`Governor`];
//! 5. actuates. **Growing a guest**: first [`PoolControl::shrink`] the pool
//!    by the growth (at once), lower the budget, then deflate. **Shrinking**:
//!    inflate; the pool budget rises as `actual` falls.
//!
//! Pool budget = host RAM − host reserve − Σ over guests of max(actual, target).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent::AgentReader;
use crate::policy::{
    distribute, host_goal, AnyPolicy, Decision, Governor, GovernorConfig, GuestView, HostView,
    Policy, ShareInput, Spike, MIB,
};
use crate::qmp::{QmpClient, QmpError, QmpEvent};
use crate::stats::{GuestStats, MemInfo, Rates, StatsHistory};

/// The host-side memory pool, as the manager sees it (implemented by the daemon).
pub trait PoolControl: Send + Sync {
    /// Set the pool's budget (bytes it may hold).
    fn set_budget(&self, bytes: u64);
    /// Release up to `bytes` now; returns bytes actually released.
    fn shrink(&self, bytes: u64) -> u64;
    /// Current budget.
    fn budget(&self) -> u64;
}

/// A pool that does nothing (budget is only recorded). Useful without tmem.
#[derive(Debug, Default)]
pub struct NoPool(Mutex<u64>);

impl PoolControl for NoPool {
    fn set_budget(&self, bytes: u64) {
        *lock(&self.0) = bytes;
    }
    fn shrink(&self, _bytes: u64) -> u64 {
        0
    }
    fn budget(&self) -> u64 {
        *lock(&self.0)
    }
}

/// Errors from actuators and stats sources.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    /// A QMP operation failed.
    #[error("QMP operation failed")]
    Qmp(#[source] QmpError),
    /// A cgroup file could not be read or written.
    #[error("Cgroup file access failed: {0}")]
    Cgroup(PathBuf, #[source] std::io::Error),
    /// A value could not be parsed.
    #[error("Cannot parse {0}")]
    Parse(String),
    /// A libvirt operation (a `virsh` run) failed.
    #[error("libvirt operation failed: {0}")]
    Libvirt(String),
    /// The guest no longer exists or runs (its libvirt domain was destroyed, undefined or
    /// restarted): its loop ends and the manager's gone hook is told.
    #[error("The guest is gone: {0}")]
    Gone(String),
}

/// Sets a guest's size.
pub trait BalloonActuator: Send {
    /// Short name for status (`"qmp"`, `"cgroup"`).
    fn name(&self) -> &'static str;
    /// Current logical size, bytes.
    fn actual(&mut self) -> Result<u64, ActuatorError>;
    /// Request logical size `bytes`.
    fn set_target(&mut self, bytes: u64) -> Result<(), ActuatorError>;
}

/// Produces guest stats.
pub trait StatsSource: Send {
    /// Short name for status (`"qmp"`, `"agent"`).
    fn name(&self) -> &'static str;
    /// Newest stats. `t_ms` must be milliseconds since `epoch` of when the
    /// data was produced/received, so that an unchanged report keeps its
    /// timestamp. `Ok(None)`: nothing (fresh) available.
    fn poll(&mut self, epoch: Instant) -> Result<Option<GuestStats>, ActuatorError>;
}

/// Samples the host (MemTotal, MemAvailable, PSI).
pub trait HostProbe: Send + Sync {
    /// A fresh host view (`share_target` is filled in by the manager).
    fn sample(&self) -> HostView;
}

/// Reads `/proc/meminfo` and `/proc/pressure/memory`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcHost;

impl HostProbe for ProcHost {
    fn sample(&self) -> HostView {
        let m = MemInfo::parse(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
        HostView {
            total: m.total.unwrap_or(0),
            available: m.available.unwrap_or(0),
            psi: crate::psi::Psi::read_host(),
            share_target: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

// ---------------------------------------------------------------- QMP adapter

#[derive(Debug)]
struct QmpConn {
    path: PathBuf,
    timeout: Duration,
    qom_path: String,
    polling_secs: u32,
    client: Option<QmpClient>,
    last_update: u64,
    last_stats: Option<GuestStats>,
    events: std::collections::VecDeque<QmpEvent>,
}

impl QmpConn {
    fn with<R>(
        &mut self,
        f: impl FnOnce(&mut QmpClient) -> Result<R, QmpError>,
    ) -> Result<R, ActuatorError> {
        if self.client.is_none() {
            let mut c = QmpClient::connect(&self.path, self.timeout).map_err(ActuatorError::Qmp)?;
            if self.polling_secs > 0 {
                // Stats polling is optional: a missing balloon device is reported later.
                let _ = c.set_stats_polling(&self.qom_path, self.polling_secs);
            }
            self.client = Some(c);
        }
        let Some(c) = self.client.as_mut() else {
            return Err(ActuatorError::Qmp(QmpError::Closed));
        };
        let r = f(c);
        // Keep asynchronous events (BALLOON_CHANGE, ...) for the owner, bounded.
        for ev in c.take_events() {
            if self.events.len() >= 256 {
                self.events.pop_front();
            }
            self.events.push_back(ev);
        }
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if !matches!(e, QmpError::Command { .. }) {
                    self.client = None; // reconnect next time
                }
                Err(ActuatorError::Qmp(e))
            }
        }
    }
}

/// A shared, lazily (re)connecting QMP connection for one guest; clone it to
/// use as both the [`BalloonActuator`] and (via [`QmpHandle::stats_source`])
/// a [`StatsSource`].
#[derive(Debug, Clone)]
pub struct QmpHandle(Arc<Mutex<QmpConn>>);

impl QmpHandle {
    /// A handle for the QMP socket at `path`; `qom_path` is the balloon
    /// device (`/machine/peripheral/balloon0`); `polling_secs` > 0 enables
    /// guest-stats polling on connect.
    pub fn new(
        path: impl Into<PathBuf>,
        qom_path: impl Into<String>,
        polling_secs: u32,
        timeout: Duration,
    ) -> Self {
        Self(Arc::new(Mutex::new(QmpConn {
            path: path.into(),
            timeout,
            qom_path: qom_path.into(),
            polling_secs,
            client: None,
            last_update: 0,
            last_stats: None,
            events: std::collections::VecDeque::new(),
        })))
    }

    /// Events QEMU sent since the last call (e.g. `BALLOON_CHANGE {actual}`),
    /// oldest first; at most the newest 256 are kept.
    pub fn take_events(&self) -> Vec<QmpEvent> {
        lock(&self.0).events.drain(..).collect()
    }

    /// A [`StatsSource`] reading QOM `guest-stats` over this connection.
    pub fn stats_source(&self) -> QmpStats {
        QmpStats(self.clone())
    }
}

impl BalloonActuator for QmpHandle {
    fn name(&self) -> &'static str {
        "qmp"
    }
    fn actual(&mut self) -> Result<u64, ActuatorError> {
        lock(&self.0).with(|c| c.query_balloon())
    }
    fn set_target(&mut self, bytes: u64) -> Result<(), ActuatorError> {
        lock(&self.0).with(|c| c.balloon(bytes))
    }
}

/// QOM `guest-stats` as a [`StatsSource`] (see [`QmpHandle::stats_source`]).
#[derive(Debug, Clone)]
pub struct QmpStats(QmpHandle);

impl StatsSource for QmpStats {
    fn name(&self) -> &'static str {
        "qmp"
    }
    fn poll(&mut self, epoch: Instant) -> Result<Option<GuestStats>, ActuatorError> {
        let mut conn = lock(&(self.0).0);
        let qom = conn.qom_path.clone();
        let t_ms = epoch.elapsed().as_millis() as u64;
        let (s, last) = conn.with(|c| c.guest_stats(&qom, t_ms))?;
        if last == 0 {
            return Ok(None); // guest driver never reported
        }
        if last == conn.last_update {
            return Ok(conn.last_stats); // unchanged: keep its timestamp
        }
        conn.last_update = last;
        conn.last_stats = Some(s);
        Ok(Some(s))
    }
}

/// The agent channel as a [`StatsSource`].
#[derive(Debug)]
pub struct AgentStats {
    reader: AgentReader,
    max_age: Duration,
}

impl AgentStats {
    /// Read from the agent socket at `path`; reports older than `max_age` are ignored.
    pub fn spawn(path: impl Into<PathBuf>, max_age: Duration) -> std::io::Result<Self> {
        Ok(Self {
            reader: AgentReader::spawn(path)?,
            max_age,
        })
    }
}

impl StatsSource for AgentStats {
    fn name(&self) -> &'static str {
        "agent"
    }
    fn poll(&mut self, epoch: Instant) -> Result<Option<GuestStats>, ActuatorError> {
        let st = self.reader.status();
        let Some((at, r)) = st.latest else {
            return Ok(None);
        };
        if at.elapsed() > self.max_age {
            return Ok(None);
        }
        let t_ms = at.saturating_duration_since(epoch).as_millis() as u64;
        Ok(Some(r.to_stats(t_ms)))
    }
}

// ---------------------------------------------------------------- status

/// Per-guest status, for the daemon's API.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestStatus {
    /// Guest name.
    pub name: String,
    /// Policy name.
    pub policy: String,
    /// Actuator name.
    pub actuator: String,
    /// Maximum (boot) size, bytes.
    pub max: u64,
    /// Last read logical size, bytes.
    pub actual: u64,
    /// Last requested target, bytes.
    pub target: u64,
    /// Newest merged stats.
    pub stats: Option<GuestStats>,
    /// Rates from the newest two snapshots.
    pub rates: Rates,
    /// Stats sources that delivered data in the last interval.
    pub live_sources: Vec<String>,
    /// Last decision and its reason.
    pub last_decision: Option<Decision>,
    /// Last fast give-back.
    pub last_spike: Option<Spike>,
    /// The guest did not approach its target (see [`Governor`]).
    pub stuck: bool,
    /// Bytes taken from the guest (sum of observed decreases of `actual`).
    pub reclaimed_bytes: u64,
    /// Bytes given back (sum of observed increases of `actual`).
    pub given_back_bytes: u64,
    /// Last measured reclaim rate, MiB/s.
    pub reclaim_mib_s: f64,
    /// Last measured give-back rate, MiB/s.
    pub give_back_mib_s: f64,
    /// Time from a give-back decision until `actual` reached its target, ms
    /// (interval-quantised).
    pub last_spike_to_deflate_ms: Option<u64>,
    /// Intervals run.
    pub intervals: u64,
    /// Errors seen.
    pub errors: u64,
    /// Last error message (full chain).
    pub last_error: Option<String>,
    /// The actuator reported the guest gone ([`ActuatorError::Gone`]): its loop has ended.
    pub gone: bool,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------- guest loop

/// Everything needed to manage one guest.
pub struct GuestSpec {
    /// Unique name.
    pub name: String,
    /// Boot (maximum) size, bytes.
    pub max: u64,
    /// Policy and limits.
    pub governor: GovernorConfig,
    /// How to set the size.
    pub actuator: Box<dyn BalloonActuator>,
    /// Stats sources, in priority order (agent first).
    pub sources: Vec<Box<dyn StatsSource>>,
}

impl std::fmt::Debug for GuestSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSpec")
            .field("name", &self.name)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// Host-wide manager configuration.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Policy interval, ms. Default 2000.
    pub interval_ms: u64,
    /// Host RAM kept out of both guests and pool, bytes. Default 1 GiB.
    pub host_reserve: u64,
    /// Host RAM, bytes; `None` = host MemTotal from the probe. When stated (e.g. the
    /// memory cgroup limit tmemd and the QEMUs run under), it is also a cap: guests grow
    /// only while all of them together stay within `host_total − host_reserve − pool_min`.
    pub host_total: Option<u64>,
    /// With a stated `host_total`: memory kept for the pool that guest growth does not
    /// take, bytes. Default 0 (guests first, the pool gets what is left). A pool that
    /// deduplicates and compresses what several guests read and swap can hold more in a
    /// MiB than a guest's own page cache does; this is how an operator says so.
    pub pool_min: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            interval_ms: 2000,
            host_reserve: 1024 * MIB,
            host_total: None,
            pool_min: 0,
        }
    }
}

#[derive(Debug, Default)]
struct SharedGuest {
    committed: u64,
    pressure: bool,
    share: Option<ShareInput>,
}

/// State shared by all guest loops.
#[derive(Default)]
pub struct Shared {
    guests: Mutex<BTreeMap<String, SharedGuest>>,
    status: Mutex<BTreeMap<String, GuestStatus>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Register a guest loop before any loop runs, so that the share plan
    /// waits for every pressure-policy guest's first input.
    pub fn register(&self, gl: &GuestLoop) {
        let pressure = matches!(gl.gov.policy(), AnyPolicy::Pressure(_));
        lock(&self.guests)
            .entry(gl.spec.name.clone())
            .or_default()
            .pressure = pressure;
    }

    /// Forget a guest: it no longer counts in the pool budget or the share
    /// plan, and its status is dropped. Stop its loop first.
    pub fn unregister(&self, name: &str) {
        lock(&self.guests).remove(name);
        lock(&self.status).remove(name);
    }

    /// Status of every guest, by name.
    pub fn status(&self) -> Vec<GuestStatus> {
        lock(&self.status).values().cloned().collect()
    }
}

/// One guest's control loop; [`GuestLoop::step`] runs one interval
/// synchronously (the manager threads call it; tests can too).
pub struct GuestLoop {
    spec: GuestSpec,
    gov: Governor,
    history: StatsHistory,
    status: GuestStatus,
    epoch: Instant,
    prev_actual: Option<(u64, Instant)>,
    last_sent: Option<u64>,
    pending_spike: Option<(Instant, u64)>,
}

impl std::fmt::Debug for GuestLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLoop")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl GuestLoop {
    /// A loop for `spec`; `epoch` is the common time origin of stats timestamps.
    pub fn new(spec: GuestSpec, epoch: Instant) -> Self {
        let gov = Governor::new(spec.governor.clone());
        let status = GuestStatus {
            name: spec.name.clone(),
            policy: gov.policy().name().into(),
            actuator: spec.actuator.name().into(),
            max: spec.max,
            ..Default::default()
        };
        Self {
            spec,
            gov,
            history: StatsHistory::new(64),
            status,
            epoch,
            prev_actual: None,
            last_sent: None,
            pending_spike: None,
        }
    }

    /// Current status.
    pub fn status(&self) -> &GuestStatus {
        &self.status
    }

    /// Records an actuator or stats source error; [`ActuatorError::Gone`] marks the guest gone.
    fn fail(&mut self, e: &ActuatorError) {
        if matches!(e, ActuatorError::Gone(_)) {
            self.status.gone = true;
        }
        self.error(e);
    }

    fn error(&mut self, e: &dyn std::error::Error) {
        self.status.errors += 1;
        let msg = chain(e);
        #[cfg(feature = "host")]
        if self.status.last_error.as_deref() != Some(msg.as_str()) {
            tracing::warn!(guest = %self.status.name, error = %msg, "balloon manager");
        }
        self.status.last_error = Some(msg);
    }

    /// Run one interval.
    pub fn step(
        &mut self,
        cfg: &ManagerConfig,
        host_probe: &dyn HostProbe,
        pool: &dyn PoolControl,
        shared: &Shared,
    ) {
        self.status.intervals += 1;
        let now = Instant::now();
        // 1. Actual size and reclaim/give-back accounting.
        let actual = match self.spec.actuator.actual() {
            Ok(a) => a,
            Err(e) => {
                self.fail(&e);
                self.publish(shared);
                return;
            }
        };
        if let Some((prev, at)) = self.prev_actual {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if actual < prev {
                self.status.reclaimed_bytes =
                    self.status.reclaimed_bytes.saturating_add(prev - actual);
                if dt > 0.0 {
                    self.status.reclaim_mib_s = (prev - actual) as f64 / MIB as f64 / dt;
                }
            } else if actual > prev {
                self.status.given_back_bytes =
                    self.status.given_back_bytes.saturating_add(actual - prev);
                if dt > 0.0 {
                    self.status.give_back_mib_s = (actual - prev) as f64 / MIB as f64 / dt;
                }
            }
        }
        self.prev_actual = Some((actual, now));
        self.status.actual = actual;
        if let Some((at, target)) = self.pending_spike {
            if actual.saturating_add(self.gov.config().stuck_tolerance) >= target {
                self.status.last_spike_to_deflate_ms =
                    Some(now.saturating_duration_since(at).as_millis() as u64);
                self.pending_spike = None;
            }
        }

        // 2. Stats.
        let mut merged: Option<GuestStats> = None;
        let mut live = Vec::new();
        for i in 0..self.spec.sources.len() {
            match self.spec.sources[i].poll(self.epoch) {
                Ok(Some(s)) => {
                    live.push(self.spec.sources[i].name().to_string());
                    merged = Some(match merged {
                        Some(m) => m.or(&s),
                        None => s,
                    });
                }
                Ok(None) => {}
                Err(e) => self.fail(&e),
            }
        }
        self.status.live_sources = live;
        if let Some(s) = merged {
            self.history
                .push(s.balloon_normalized(actual, self.spec.max));
        }
        self.status.stats = self.history.latest().copied();
        self.status.rates = self.history.rates();

        // 3. Host view and share plan.
        let mut host = host_probe.sample();
        let view = GuestView {
            history: &self.history,
            actual,
            max: self.spec.max,
            interval_ms: cfg.interval_ms,
        };
        if let AnyPolicy::Pressure(p) = self.gov.policy() {
            let mine = p.share_input(&view);
            let goal = host_goal(&host, p.config());
            let mut g = lock(&shared.guests);
            g.entry(self.spec.name.clone()).or_default().share = Some(mine);
            if g.values().any(|v| v.pressure && v.share.is_none()) {
                // Not every guest has reported yet: hold rather than plan alone.
                host.share_target = Some(actual);
            } else {
                let names: Vec<&String> = g
                    .iter()
                    .filter(|(_, v)| v.share.is_some())
                    .map(|(k, _)| k)
                    .collect();
                let inputs: Vec<ShareInput> = g.values().filter_map(|v| v.share).collect();
                let plan = distribute(goal, &inputs);
                host.share_target = names
                    .iter()
                    .position(|n| **n == self.spec.name)
                    .and_then(|i| plan.get(i).copied());
            }
        }

        // 4. Decide.
        let d = self.gov.step(&view, &host);
        let target = self.cap_growth(cfg, shared, actual, d.decision.target);
        self.status.stuck = d.stuck;
        if let Some(sp) = &d.spike {
            self.status.last_spike = Some(sp.clone());
            if target > actual {
                self.pending_spike = Some((now, target));
            }
        }
        self.status.last_decision = Some(d.decision.clone());
        self.status.target = target;

        // 5. Actuate, pool first when growing: the pool gives back at once what the
        //    growth needs and the host does not have free. With a stated host budget,
        //    the new pool budget below evicts what no longer fits; without one, the
        //    shortfall is the growth beyond MemAvailable − reserve. A pool with room
        //    keeps its pages (shrinking it by every growth emptied it while guests read
        //    from disk).
        if target > actual {
            let grow = target - actual;
            let short = match cfg.host_total {
                Some(_) => 0,
                None => grow.saturating_sub(host.available.saturating_sub(cfg.host_reserve)),
            };
            if short > 0 {
                pool.shrink(short);
            }
            self.set_committed(shared, actual.max(target));
            self.update_budget(cfg, &host, pool, shared);
            if self.last_sent != Some(target) {
                match self.spec.actuator.set_target(target) {
                    Ok(()) => self.last_sent = Some(target),
                    Err(e) => self.fail(&e),
                }
            }
        } else {
            // While stuck, re-send `actual` once to cancel the outstanding
            // request, so the guest driver stops burning CPU on it.
            let cancel = d.stuck && target == actual;
            if (target < actual || cancel) && self.last_sent != Some(target) {
                match self.spec.actuator.set_target(target) {
                    Ok(()) => self.last_sent = Some(target),
                    Err(e) => self.fail(&e),
                }
            }
            self.set_committed(shared, actual);
            self.update_budget(cfg, &host, pool, shared);
        }
        self.publish(shared);
    }

    /// After a give-back, poll `actual` every `poll` until the guest reached
    /// the give-back target or `max_wait` passed; records the spike→deflate
    /// latency at that resolution. Returns immediately when nothing is pending.
    /// The manager threads call this in place of part of the interval sleep.
    pub fn settle(&mut self, max_wait: Duration, poll: Duration) {
        let end = Instant::now() + max_wait;
        while let Some((at, target)) = self.pending_spike {
            match self.spec.actuator.actual() {
                Ok(a) if a.saturating_add(self.gov.config().stuck_tolerance) >= target => {
                    let now = Instant::now();
                    self.status.last_spike_to_deflate_ms =
                        Some(now.saturating_duration_since(at).as_millis() as u64);
                    self.pending_spike = None;
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(&e);
                    return;
                }
            }
            let now = Instant::now();
            if now >= end {
                return;
            }
            std::thread::sleep(poll.min(end - now));
        }
    }

    /// With a stated host budget (`host_total`), a guest grows only into the room the
    /// other guests, the reserve and the pool's minimum leave: all guests together stay
    /// within `host_total − host_reserve − pool_min` (the pool gets what is left). Without
    /// it, host RAM is the limit and the policy's target stands. Never shrinks below
    /// `actual` (the policies shrink; this only withholds growth). The room is taken under
    /// the same lock it is computed in, so two guests growing at once cannot both take it.
    fn cap_growth(&self, cfg: &ManagerConfig, shared: &Shared, actual: u64, target: u64) -> u64 {
        let Some(total) = cfg.host_total else {
            return target;
        };
        if target <= actual {
            return target;
        }
        let mut guests = lock(&shared.guests);
        let others: u64 = guests
            .iter()
            .filter(|(name, _)| **name != self.spec.name)
            .map(|(_, g)| g.committed)
            .sum();
        let room = total
            .saturating_sub(cfg.host_reserve)
            .saturating_sub(cfg.pool_min)
            .saturating_sub(others);
        let capped = target.min(room).max(actual);
        guests.entry(self.spec.name.clone()).or_default().committed = capped;
        drop(guests);
        if capped < target {
            tracing::debug!(
                guest = %self.spec.name,
                target,
                capped,
                "growth held back by the host budget"
            );
        }
        capped
    }

    fn set_committed(&self, shared: &Shared, bytes: u64) {
        lock(&shared.guests)
            .entry(self.spec.name.clone())
            .or_default()
            .committed = bytes;
    }

    fn update_budget(
        &self,
        cfg: &ManagerConfig,
        host: &HostView,
        pool: &dyn PoolControl,
        shared: &Shared,
    ) {
        let total = cfg.host_total.unwrap_or(host.total);
        let guests: u64 = lock(&shared.guests).values().map(|g| g.committed).sum();
        pool.set_budget(
            total
                .saturating_sub(cfg.host_reserve)
                .saturating_sub(guests),
        );
    }

    /// Publish this loop's status into `shared` (done by `step`; call it
    /// again after [`GuestLoop::settle`] to expose the measured latency).
    pub fn publish(&self, shared: &Shared) {
        lock(&shared.status).insert(self.spec.name.clone(), self.status.clone());
    }
}

/// Errors from [`Manager`] operations.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A guest with this name is already managed.
    #[error("Guest {0} is already managed")]
    Duplicate(String),
    /// The guest's thread could not be started.
    #[error("Cannot start guest thread")]
    Spawn(#[source] std::io::Error),
}

struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Told the name of a guest whose actuator reported it gone ([`ActuatorError::Gone`]), on
/// that guest's own thread, once its loop has ended. It must not block on anything that
/// [`Manager::remove_guest`] of the same guest could hold: hand the name to another thread
/// (e.g. over a channel) and remove the guest there.
pub type GoneHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The running manager: one thread per guest; guests can be added and
/// removed while it runs.
pub struct Manager {
    cfg: ManagerConfig,
    pool: Arc<dyn PoolControl>,
    host: Arc<dyn HostProbe>,
    epoch: Instant,
    shared: Arc<Shared>,
    workers: Mutex<BTreeMap<String, Worker>>,
    gone_hook: Arc<Mutex<Option<GoneHook>>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager with no guests yet.
    pub fn new(cfg: ManagerConfig, pool: Arc<dyn PoolControl>, host: Arc<dyn HostProbe>) -> Self {
        Self {
            cfg,
            pool,
            host,
            epoch: Instant::now(),
            shared: Arc::new(Shared::default()),
            workers: Mutex::new(BTreeMap::new()),
            gone_hook: Arc::new(Mutex::new(None)),
        }
    }

    /// Sets the hook told about guests that are gone (see [`GoneHook`]). A gone guest's
    /// loop ends either way; it stays listed, with [`GuestStatus::gone`], until
    /// [`Manager::remove_guest`].
    pub fn set_gone_hook(&self, hook: GoneHook) {
        *lock(&self.gone_hook) = Some(hook);
    }

    /// A manager running `guests`.
    pub fn start(
        cfg: ManagerConfig,
        guests: Vec<GuestSpec>,
        pool: Arc<dyn PoolControl>,
        host: Arc<dyn HostProbe>,
    ) -> Result<Self, ManagerError> {
        let m = Self::new(cfg, pool, host);
        // Register all first so the share plan waits for every guest's input.
        let loops: Vec<GuestLoop> = guests
            .into_iter()
            .map(|g| GuestLoop::new(g, m.epoch))
            .collect();
        for gl in &loops {
            m.shared.register(gl);
        }
        for gl in loops {
            m.spawn(gl)?;
        }
        Ok(m)
    }

    /// Start managing one more guest.
    pub fn add_guest(&self, spec: GuestSpec) -> Result<(), ManagerError> {
        let gl = GuestLoop::new(spec, self.epoch);
        self.shared.register(&gl);
        self.spawn(gl)
    }

    fn spawn(&self, mut gl: GuestLoop) -> Result<(), ManagerError> {
        let name = gl.spec.name.clone();
        let mut workers = lock(&self.workers);
        if workers.contains_key(&name) {
            return Err(ManagerError::Duplicate(name));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stop2, pool, host, cfg, gone_hook) = (
            self.shared.clone(),
            stop.clone(),
            self.pool.clone(),
            self.host.clone(),
            self.cfg.clone(),
            self.gone_hook.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("tmem-bl-{name}"))
            .spawn(move || {
                let interval = Duration::from_millis(cfg.interval_ms.max(1));
                let mut next = Instant::now();
                while !stop2.load(Ordering::Relaxed) {
                    gl.step(&cfg, host.as_ref(), pool.as_ref(), &shared);
                    if gl.status.gone {
                        break;
                    }
                    next += interval;
                    gl.settle(
                        next.saturating_duration_since(Instant::now()),
                        Duration::from_millis(20),
                    );
                    gl.publish(&shared);
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    while !stop2.load(Ordering::Relaxed) && Instant::now() < next {
                        std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
                    }
                }
                if gl.status.gone {
                    tracing::info!(
                        guest = %gl.spec.name,
                        reason = gl.status.last_error.as_deref().unwrap_or(""),
                        "guest gone; its balloon loop ended"
                    );
                    // It no longer takes host memory: out of the pool budget and the share
                    // plan at once (its status stays until it is removed).
                    lock(&shared.guests).remove(&gl.spec.name);
                    let hook = lock(&gone_hook).clone();
                    if let Some(h) = hook {
                        h(&gl.spec.name);
                    }
                }
            })
            .map_err(ManagerError::Spawn)?;
        workers.insert(
            name,
            Worker {
                stop,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// Stop managing `name` (its balloon is left where it is). Returns false
    /// if no such guest. The pool budget is recomputed on the next interval
    /// of any remaining guest.
    pub fn remove_guest(&self, name: &str) -> bool {
        let w = lock(&self.workers).remove(name);
        let Some(mut w) = w else { return false };
        w.halt();
        self.shared.unregister(name);
        true
    }

    /// Names of managed guests.
    pub fn guests(&self) -> Vec<String> {
        lock(&self.workers).keys().cloned().collect()
    }

    /// Status of every guest.
    pub fn status(&self) -> Vec<GuestStatus> {
        self.shared.status()
    }

    /// Stop all loops and wait for them.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let mut ws = std::mem::take(&mut *lock(&self.workers));
        for w in ws.values_mut() {
            w.stop.store(true, Ordering::Relaxed);
        }
        for w in ws.values_mut() {
            w.halt();
        }
    }
}

impl GuestSpec {
    /// A QEMU guest: QMP `balloon` actuator; stats from the agent socket (if
    /// given, first) and QOM guest-stats (polled every `stats_secs`).
    pub fn qemu(
        name: impl Into<String>,
        max: u64,
        governor: GovernorConfig,
        qmp_socket: impl Into<PathBuf>,
        agent_socket: Option<PathBuf>,
        stats_secs: u32,
    ) -> std::io::Result<Self> {
        let qh = QmpHandle::new(
            qmp_socket,
            crate::qemu::BalloonDeviceOpts::default().qom_path(),
            stats_secs,
            Duration::from_secs(5),
        );
        let mut sources: Vec<Box<dyn StatsSource>> = Vec::new();
        if let Some(a) = agent_socket {
            let max_age = Duration::from_secs(u64::from(stats_secs.max(1)) * 3);
            sources.push(Box::new(AgentStats::spawn(a, max_age)?));
        }
        sources.push(Box::new(qh.stats_source()));
        Ok(Self {
            name: name.into(),
            max,
            governor,
            actuator: Box::new(qh),
            sources,
        })
    }
}

impl GuestSpec {
    /// A libvirt domain (see [`crate::libvirt`]): the balloon set through libvirt, stats
    /// from the agent socket (if given, first; a `<channel type='unix'>` of the domain) and
    /// libvirt's balloon statistics. `max` defaults to the domain's maximum memory.
    pub fn libvirt(
        name: impl Into<String>,
        max: Option<u64>,
        governor: GovernorConfig,
        domain: crate::libvirt::LibvirtDomain,
        agent_socket: Option<PathBuf>,
    ) -> Result<Self, ActuatorError> {
        let period = domain.stats_period_secs;
        let h = crate::libvirt::LibvirtHandle::new(domain);
        let max = match max {
            Some(m) => m,
            None => h.maximum()?,
        };
        let mut sources: Vec<Box<dyn StatsSource>> = Vec::new();
        if let Some(a) = agent_socket {
            let max_age = Duration::from_secs(u64::from(period.max(1)) * 3);
            let s = AgentStats::spawn(&a, max_age)
                .map_err(|e| ActuatorError::Libvirt(format!("agent {}: {e}", a.display())))?;
            sources.push(Box::new(s));
        }
        sources.push(Box::new(h.stats_source()));
        Ok(Self {
            name: name.into(),
            max,
            governor,
            actuator: Box::new(h),
            sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyKind, PressureConfig, SelfBalloonConfig};

    const GIB: u64 = 1 << 30;

    #[derive(Debug, Clone, PartialEq)]
    enum Op {
        Shrink(u64),
        Budget(u64),
        Set(u64),
    }

    type Log = Arc<Mutex<Vec<Op>>>;

    struct FakeBalloon {
        actual: Arc<Mutex<u64>>,
        log: Log,
    }
    impl BalloonActuator for FakeBalloon {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn actual(&mut self) -> Result<u64, ActuatorError> {
            Ok(*lock(&self.actual))
        }
        fn set_target(&mut self, b: u64) -> Result<(), ActuatorError> {
            lock(&self.log).push(Op::Set(b));
            *lock(&self.actual) = b; // instant balloon
            Ok(())
        }
    }

    struct FakePool {
        log: Log,
        budget: Mutex<u64>,
    }
    impl PoolControl for FakePool {
        fn set_budget(&self, b: u64) {
            *lock(&self.budget) = b;
            lock(&self.log).push(Op::Budget(b));
        }
        fn shrink(&self, b: u64) -> u64 {
            lock(&self.log).push(Op::Shrink(b));
            b
        }
        fn budget(&self) -> u64 {
            *lock(&self.budget)
        }
    }

    struct Script(Arc<Mutex<Vec<GuestStats>>>);
    impl StatsSource for Script {
        fn name(&self) -> &'static str {
            "script"
        }
        fn poll(&mut self, _: Instant) -> Result<Option<GuestStats>, ActuatorError> {
            let mut v = lock(&self.0);
            Ok(if v.is_empty() {
                None
            } else {
                Some(v.remove(0))
            })
        }
    }

    struct FixedHost(HostView);
    impl HostProbe for FixedHost {
        fn sample(&self) -> HostView {
            self.0
        }
    }

    fn st(t: u64, total: u64, avail: u64, committed: u64, mf: u64) -> GuestStats {
        GuestStats {
            t_ms: t,
            total: Some(total),
            available: Some(avail),
            committed: Some(committed),
            major_faults: Some(mf),
            ..Default::default()
        }
    }

    fn sb() -> GovernorConfig {
        GovernorConfig {
            policy: PolicyKind::SelfBalloon(SelfBalloonConfig {
                reserved_mb: Some(0),
                ..Default::default()
            }),
            shrink_per_interval: GIB,
            ..Default::default()
        }
    }

    /// A selfballoon guest of 4 GiB whose balloon and stats the test drives.
    fn sb_guest(
        name: &str,
        actual: &Arc<Mutex<u64>>,
        stats: &Arc<Mutex<Vec<GuestStats>>>,
        log: &Log,
    ) -> GuestSpec {
        GuestSpec {
            name: name.into(),
            max: 4 * GIB,
            governor: sb(),
            actuator: Box::new(FakeBalloon {
                actual: actual.clone(),
                log: log.clone(),
            }),
            sources: vec![Box::new(Script(stats.clone()))],
        }
    }

    fn fake_pool(log: &Log) -> FakePool {
        FakePool {
            log: log.clone(),
            budget: Mutex::new(0),
        }
    }

    /// A stated 6 GiB host budget with 1 GiB reserved and `pool_min` kept for the pool.
    fn stated_6g(pool_min: u64) -> ManagerConfig {
        ManagerConfig {
            interval_ms: 1000,
            host_reserve: GIB,
            host_total: Some(6 * GIB),
            pool_min,
        }
    }

    /// A 16 GiB host with 8 GiB available.
    fn host_16g() -> FixedHost {
        FixedHost(HostView {
            total: 16 * GIB,
            available: 8 * GIB,
            psi: None,
            share_target: None,
        })
    }

    #[test]
    fn shrink_raises_budget_and_spike_shrinks_pool_before_deflate() {
        let log: Log = Arc::default();
        let actual = Arc::new(Mutex::new(4 * GIB));
        let stats = Arc::new(Mutex::new(vec![st(0, 4 * GIB - 24 * MIB, 3 * GIB, GIB, 0)]));
        let spec = sb_guest("g1", &actual, &stats, &log);
        let pool = fake_pool(&log);
        let host = host_16g();
        let cfg = ManagerConfig {
            interval_ms: 1000,
            host_reserve: GIB,
            host_total: None,
            pool_min: 0,
        };
        let shared = Shared::default();
        let mut gl = GuestLoop::new(spec, Instant::now());

        // Interval 1: selfballoon shrinks (1/8 of the gap); budget counts actual (not yet freed).
        gl.step(&cfg, &host, &pool, &shared);
        let t1 = gl.status().target;
        assert!(t1 < 4 * GIB);
        assert_eq!(
            lock(&log).as_slice(),
            &[Op::Set(t1), Op::Budget(16 * GIB - GIB - 4 * GIB)]
        );
        lock(&log).clear();

        // Interval 2: actual fell → reclaimed counted, budget rose.
        lock(&stats).push(st(1000, t1 - 24 * MIB, t1 - 24 * MIB - GIB, GIB, 0));
        gl.step(&cfg, &host, &pool, &shared);
        assert_eq!(gl.status().reclaimed_bytes, 4 * GIB - t1);
        let t2 = gl.status().target;
        assert_eq!(lock(&log).last(), Some(&Op::Budget(16 * GIB - GIB - t1)));
        lock(&log).clear();

        // Interval 3: fault spike on a host with 256 MiB available beyond the reserve →
        // the pool gives back the rest of the growth first, budget drops, then deflate.
        let tight = FixedHost(HostView {
            available: GIB + 256 * MIB,
            ..host.0
        });
        lock(&stats).push(st(2000, t2 - 24 * MIB, 100 * MIB, GIB, 100_000));
        gl.step(&cfg, &tight, &pool, &shared);
        let s = gl.status().clone();
        assert!(s.last_spike.is_some(), "{:?}", s.last_decision);
        assert!(s.target > t2 + 256 * MIB);
        let ops = lock(&log).clone();
        assert_eq!(
            ops,
            vec![
                Op::Shrink(s.target - t2 - 256 * MIB),
                Op::Budget(16 * GIB - GIB - s.target),
                Op::Set(s.target),
            ]
        );
        assert_eq!(s.live_sources, vec!["script".to_string()]);
        // Within the interval, settle() sees the deflate and records the latency.
        assert!(gl.status().last_spike_to_deflate_ms.is_none());
        gl.settle(Duration::from_secs(30), Duration::from_millis(1));
        assert!(gl.status().last_spike_to_deflate_ms.is_some());
        // Interval 4: given-back counted.
        gl.step(&cfg, &host, &pool, &shared);
        assert_eq!(gl.status().given_back_bytes, s.target - t2);
        assert_eq!(shared.status().len(), 1);
    }

    #[test]
    fn growth_the_host_has_room_for_leaves_the_pool_alone() {
        // 8 GiB available, 1 GiB reserve: a spike that grows the guest by less than 7 GiB
        // evicts nothing from the pool; only the budget moves.
        let log: Log = Arc::default();
        let actual = Arc::new(Mutex::new(2 * GIB));
        let stats = Arc::new(Mutex::new(vec![st(
            0,
            2 * GIB - 24 * MIB,
            100 * MIB,
            GIB,
            0,
        )]));
        let spec = sb_guest("g1", &actual, &stats, &log);
        let pool = fake_pool(&log);
        let cfg = ManagerConfig {
            interval_ms: 1000,
            host_reserve: GIB,
            host_total: None,
            pool_min: 0,
        };
        let shared = Shared::default();
        let mut gl = GuestLoop::new(spec, Instant::now());
        gl.step(&cfg, &host_16g(), &pool, &shared);
        lock(&log).clear();
        lock(&stats).push(st(1000, 2 * GIB - 24 * MIB, 10 * MIB, 3 * GIB, 100_000));
        gl.step(&cfg, &host_16g(), &pool, &shared);
        let t = gl.status().target;
        assert!(t > 2 * GIB, "{:?}", gl.status().last_decision);
        let ops = lock(&log).clone();
        assert!(!ops.iter().any(|o| matches!(o, Op::Shrink(_))), "{ops:?}");
        assert_eq!(ops.last(), Some(&Op::Set(t)));
    }

    #[test]
    fn a_stated_host_budget_holds_back_growth_beyond_it() {
        // Two guests of 4 GiB on a stated 6 GiB host with 1 GiB reserved: the second one's
        // spike may only grow it into the 5 GiB the first one leaves.
        let log: Log = Arc::default();
        let pool = fake_pool(&log);
        let host = host_16g();
        let cfg = stated_6g(0);
        let shared = Shared::default();
        lock(&shared.guests)
            .entry("other".into())
            .or_default()
            .committed = 3 * GIB;
        let actual = Arc::new(Mutex::new(GIB));
        let stats = Arc::new(Mutex::new(vec![st(0, GIB - 24 * MIB, 900 * MIB, GIB, 0)]));
        let spec = sb_guest("g1", &actual, &stats, &log);
        let mut gl = GuestLoop::new(spec, Instant::now());
        gl.step(&cfg, &host, &pool, &shared);
        lock(&log).clear();
        // A fault spike asks for much more than the 2 GiB of room.
        lock(&stats).push(st(1000, GIB - 24 * MIB, 10 * MIB, 3 * GIB, 100_000));
        gl.step(&cfg, &host, &pool, &shared);
        let t = gl.status().target;
        assert_eq!(t, 2 * GIB, "{:?}", gl.status().last_decision);
        assert_eq!(lock(&log).last(), Some(&Op::Set(2 * GIB)));
        // The pool gets what is left: nothing.
        assert!(lock(&log).contains(&Op::Budget(0)));
        // Without a stated budget the same spike grows past it.
        let free = ManagerConfig {
            host_total: None,
            ..cfg
        };
        lock(&stats).push(st(2000, GIB - 24 * MIB, 10 * MIB, 3 * GIB, 200_000));
        gl.step(&free, &host, &pool, &shared);
        assert!(
            gl.status().target > 2 * GIB,
            "{:?}",
            gl.status().last_decision
        );
    }

    #[test]
    fn a_pool_minimum_is_left_to_the_pool_when_guests_grow() {
        // 6 GiB stated, 1 GiB reserve, 1 GiB kept for the pool: two 1 GiB guests that
        // both spike may together grow to 4 GiB: the first to ask takes the room
        // the second leaves.
        let log: Log = Arc::default();
        let pool = fake_pool(&log);
        let host = host_16g();
        let cfg = stated_6g(GIB);
        let shared = Shared::default();
        let mut loops = Vec::new();
        for name in ["a", "b"] {
            let actual = Arc::new(Mutex::new(GIB));
            let stats = Arc::new(Mutex::new(vec![st(0, GIB - 24 * MIB, 900 * MIB, GIB, 0)]));
            let gl = GuestLoop::new(sb_guest(name, &actual, &stats, &log), Instant::now());
            loops.push((gl, stats));
        }
        for (gl, _) in &mut loops {
            gl.step(&cfg, &host, &pool, &shared);
        }
        for (_, stats) in &loops {
            lock(stats).push(st(1000, GIB - 24 * MIB, 10 * MIB, 4 * GIB, 100_000));
        }
        for (gl, _) in &mut loops {
            gl.step(&cfg, &host, &pool, &shared);
        }
        let a = loops[0].0.status().target;
        let b = loops[1].0.status().target;
        // The first takes all the room the second's current size leaves; the second gets
        // nothing more than it had.
        assert!(
            a > 2 * GIB && a < 4 * GIB,
            "{:?}",
            loops[0].0.status().last_decision
        );
        assert!(b < 2 * GIB, "{:?}", loops[1].0.status().last_decision);
        assert_eq!(a + b, 4 * GIB);
        // The pool keeps its minimum.
        assert_eq!(
            lock(&log).iter().rev().find_map(|o| match o {
                Op::Budget(b) => Some(*b),
                _ => None,
            }),
            Some(GIB)
        );
    }

    #[test]
    fn pressure_share_plan_across_guests() {
        // Two guests, host short by ~2 GiB: the plan splits the take by shares.
        let log: Log = Arc::default();
        let pool = fake_pool(&log);
        let h0 = HostView {
            total: 16 * GIB,
            available: 0,
            psi: None,
            share_target: None,
        };
        let keep_free = host_goal(&h0, &PressureConfig::default()).unsigned_abs();
        let host = FixedHost(HostView {
            available: keep_free - GIB,
            ..h0
        });
        let cfg = ManagerConfig {
            interval_ms: 1000,
            host_reserve: 0,
            host_total: None,
            pool_min: 0,
        };
        let shared = Shared::default();
        let mk = |name: &str, shares: u32| {
            let gc = GovernorConfig {
                policy: PolicyKind::Pressure(PressureConfig {
                    shares,
                    min_bytes: 0,
                    ..Default::default()
                }),
                shrink_per_interval: 8 * GIB,
                ..Default::default()
            };
            let stats = Arc::new(Mutex::new(vec![st(0, 8 * GIB, 7 * GIB, GIB, 0)]));
            GuestLoop::new(
                GuestSpec {
                    name: name.into(),
                    max: 8 * GIB,
                    governor: gc,
                    actuator: Box::new(FakeBalloon {
                        actual: Arc::new(Mutex::new(8 * GIB)),
                        log: log.clone(),
                    }),
                    sources: vec![Box::new(Script(stats))],
                },
                Instant::now(),
            )
        };
        let (mut a, mut b) = (mk("a", 3000), mk("b", 1000));
        shared.register(&a);
        shared.register(&b);
        let goal = host_goal(&host.0, &PressureConfig::default());
        assert_eq!(goal, -(GIB as i64));
        // a runs first: b has not reported, so a holds instead of taking it all.
        a.step(&cfg, &host, &pool, &shared);
        assert_eq!(a.status().target, 8 * GIB, "{:?}", a.status().last_decision);
        // b plans with both inputs: min = used 1 GiB + 20 % = 2.6 GiB each; the
        // 3000-share guest fills to its max first, so the whole take is b's.
        b.step(&cfg, &host, &pool, &shared);
        assert_eq!(b.status().target, 7 * GIB, "{:?}", b.status().last_decision);
        a.step(&cfg, &host, &pool, &shared);
        assert_eq!(a.status().target, 8 * GIB);
        assert!(b
            .status()
            .last_decision
            .as_ref()
            .is_some_and(|d| d.reason.contains("shared plan")));
        assert_eq!(a.status().policy, "pressure");
    }

    /// A balloon whose guest goes away after `left` reads.
    struct Vanishing {
        left: u32,
    }
    impl BalloonActuator for Vanishing {
        fn name(&self) -> &'static str {
            "vanishing"
        }
        fn actual(&mut self) -> Result<u64, ActuatorError> {
            if self.left == 0 {
                return Err(ActuatorError::Gone("domain destroyed".into()));
            }
            self.left -= 1;
            Ok(GIB)
        }
        fn set_target(&mut self, _: u64) -> Result<(), ActuatorError> {
            Ok(())
        }
    }

    #[test]
    fn a_gone_guest_ends_its_loop_and_tells_the_hook() {
        let pool: Arc<dyn PoolControl> = Arc::new(NoPool::default());
        let host: Arc<dyn HostProbe> = Arc::new(host_16g());
        let cfg = ManagerConfig {
            interval_ms: 5,
            host_reserve: 0,
            host_total: None,
            pool_min: 0,
        };
        let m = Manager::new(cfg, pool, host);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        m.set_gone_hook(Arc::new(move |n: &str| {
            let _ = lock(&tx).send(n.to_owned());
        }));
        let spec = GuestSpec {
            name: "v".into(),
            max: GIB,
            governor: sb(),
            actuator: Box::new(Vanishing { left: 3 }),
            sources: vec![],
        };
        m.add_guest(spec).expect("add");
        let name = rx.recv_timeout(Duration::from_secs(60)).expect("hook");
        assert_eq!(name, "v");
        let st = m.status();
        assert!(st[0].gone, "{st:?}");
        assert!(st[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("destroyed"));
        assert_eq!(st[0].intervals, 4);
        assert!(lock(&m.shared.guests).is_empty());
        // Its thread has ended: removing it does not wait.
        assert!(m.remove_guest("v"));
        assert!(m.status().is_empty());
    }

    #[test]
    fn threads_run_and_stop() {
        let log: Log = Arc::default();
        let stats = Arc::new(Mutex::new(
            (0..1000)
                .map(|i| st(i * 10, 4 * GIB, 3 * GIB, GIB, 0))
                .collect(),
        ));
        let spec = GuestSpec {
            name: "t".into(),
            max: 4 * GIB,
            governor: sb(),
            actuator: Box::new(FakeBalloon {
                actual: Arc::new(Mutex::new(4 * GIB)),
                log: log.clone(),
            }),
            sources: vec![Box::new(Script(stats))],
        };
        let pool: Arc<dyn PoolControl> = Arc::new(NoPool::default());
        let host: Arc<dyn HostProbe> = Arc::new(FixedHost(HostView {
            total: 16 * GIB,
            ..Default::default()
        }));
        let cfg = ManagerConfig {
            interval_ms: 5,
            host_reserve: 0,
            host_total: None,
            pool_min: 0,
        };
        let m = Manager::start(cfg, vec![spec], pool.clone(), host).expect("start");
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end && m.status().first().map_or(0, |s| s.intervals) < 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = m.status();
        assert!(s[0].intervals >= 3);
        assert!(pool.budget() > 0);
        let dup = GuestSpec {
            name: "t".into(),
            max: GIB,
            governor: sb(),
            actuator: Box::new(FakeBalloon {
                actual: Arc::new(Mutex::new(GIB)),
                log: log.clone(),
            }),
            sources: vec![],
        };
        assert!(matches!(m.add_guest(dup), Err(ManagerError::Duplicate(_))));
        assert_eq!(m.guests(), vec!["t".to_string()]);
        assert!(m.remove_guest("t"));
        assert!(!m.remove_guest("t"));
        assert!(m.status().is_empty());
        m.stop();
    }
}
