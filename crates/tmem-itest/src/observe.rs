//! A background observer: samples every guest's balloon (its own QMP
//! monitor), the observer agent's `/proc` reports, and tmemd's view of the
//! guests (`GET /api/v1/guests`) into per-guest [`Timeline`]s.
//!
//! Times are seconds since the observer started ([`Observer::now`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tmem_api::{ExportInfo, GuestInfo};
use tmem_balloon::agent::AgentReader;
use tmem_balloon::qmp::QmpClient;

/// One `query-balloon` reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalloonSample {
    /// Seconds since the observer started.
    pub t: f64,
    /// Logical guest size, bytes.
    pub actual: u64,
}

/// One observer-agent report (only new reports are recorded).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentSample {
    /// Seconds since the observer started (host receive time).
    pub t: f64,
    /// Report sequence number.
    pub seq: u64,
    /// MemTotal, bytes.
    pub total: u64,
    /// MemAvailable, bytes.
    pub available: u64,
    /// Committed_AS, bytes.
    pub committed: u64,
    /// Swap in use, bytes.
    pub swap_used: u64,
    /// Cumulative pages swapped in.
    pub pswpin: u64,
    /// Cumulative pages swapped out.
    pub pswpout: u64,
    /// Cumulative OOM kills.
    pub oom_kill: u64,
    /// Cumulative major faults.
    pub pgmajfault: u64,
    /// Cumulative allocation stalls.
    pub allocstall: u64,
}

/// tmemd's view of one guest at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ManagerSample {
    /// Seconds since the observer started.
    pub t: f64,
    /// Actual as last read by the manager, bytes.
    pub actual: u64,
    /// Last requested target, bytes.
    pub target: u64,
    /// Bytes taken so far.
    pub reclaimed_bytes: u64,
    /// Bytes given back so far.
    pub given_back_bytes: u64,
    /// Intervals run.
    pub intervals: u64,
    /// Errors seen.
    pub errors: u64,
    /// Stuck flag.
    pub stuck: bool,
}

/// tmemd's view of the guest's export (its swap disk) at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExportSample {
    /// Seconds since the observer started.
    pub t: f64,
    /// Pages the export holds in the pool.
    pub pool_pages: u64,
    /// Pages in the export's spill file.
    pub spilled_pages: u64,
    /// NBD write requests so far.
    pub nbd_writes: u64,
    /// NBD read requests so far.
    pub nbd_reads: u64,
    /// NBD trim and write-zeroes requests so far.
    pub nbd_trims: u64,
}

/// Everything observed about one guest.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Balloon readings, every tick.
    pub balloon: Vec<BalloonSample>,
    /// New agent reports.
    pub agent: Vec<AgentSample>,
    /// tmemd's guest status.
    pub manager: Vec<ManagerSample>,
    /// tmemd's view of the guest's export.
    pub export: Vec<ExportSample>,
    /// Observer errors (QMP or HTTP failures), counted.
    pub errors: u64,
    /// The last observer error.
    pub last_error: Option<String>,
}

/// What to watch for one guest.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Guest name (as registered with tmemd).
    pub name: String,
    /// A QMP socket the observer may hold.
    pub qmp: PathBuf,
    /// The observer agent's socket.
    pub agent: PathBuf,
    /// The tmemd export that is this guest's disk, if any.
    pub export: Option<String>,
}

type Shared = Arc<Mutex<BTreeMap<String, Timeline>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The observer thread; stops and joins on drop.
#[derive(Debug)]
pub struct Observer {
    epoch: Instant,
    data: Shared,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    /// Starts sampling every `tick` (balloon, agent) and tmemd's guests on
    /// `tmemd_ctl` every `manager_every` ticks.
    pub fn start(
        guests: Vec<Watch>,
        tmemd_ctl: Option<PathBuf>,
        tick: Duration,
        manager_every: u32,
    ) -> std::io::Result<Self> {
        let epoch = Instant::now();
        let data: Shared = Arc::new(Mutex::new(
            guests
                .iter()
                .map(|g| (g.name.clone(), Timeline::default()))
                .collect(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for g in &guests {
            readers.push(AgentReader::spawn(&g.agent)?);
        }
        let (d, s) = (data.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("itest-observer".into())
            .spawn(move || {
                run(
                    guests,
                    readers,
                    tmemd_ctl,
                    tick,
                    manager_every.max(1),
                    epoch,
                    &d,
                    &s,
                )
            })?;
        Ok(Self {
            epoch,
            data,
            stop,
            thread: Some(thread),
        })
    }

    /// Seconds since the observer started (the timelines' clock).
    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// A copy of one guest's timeline.
    pub fn timeline(&self, name: &str) -> Timeline {
        lock(&self.data).get(name).cloned().unwrap_or_default()
    }

    /// The newest balloon reading of a guest.
    pub fn actual(&self, name: &str) -> Option<u64> {
        lock(&self.data)
            .get(name)
            .and_then(|t| t.balloon.last())
            .map(|b| b.actual)
    }

    /// The newest agent report of a guest.
    pub fn agent(&self, name: &str) -> Option<AgentSample> {
        lock(&self.data)
            .get(name)
            .and_then(|t| t.agent.last())
            .copied()
    }

    /// The newest manager sample of a guest.
    pub fn manager(&self, name: &str) -> Option<ManagerSample> {
        lock(&self.data)
            .get(name)
            .and_then(|t| t.manager.last())
            .copied()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn note_error(data: &Shared, name: &str, e: String) {
    if let Some(t) = lock(data).get_mut(name) {
        t.errors += 1;
        t.last_error = Some(e);
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    guests: Vec<Watch>,
    readers: Vec<AgentReader>,
    tmemd_ctl: Option<PathBuf>,
    tick: Duration,
    manager_every: u32,
    epoch: Instant,
    data: &Shared,
    stop: &AtomicBool,
) {
    let mut qmps: Vec<Option<QmpClient>> = guests.iter().map(|_| None).collect();
    let mut last_seq: Vec<Option<u64>> = guests.iter().map(|_| None).collect();
    let mut n: u32 = 0;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for (i, g) in guests.iter().enumerate() {
            // Balloon.
            if qmps[i].is_none() {
                match QmpClient::connect(&g.qmp, Duration::from_secs(5)) {
                    Ok(c) => qmps[i] = Some(c),
                    Err(e) => note_error(data, &g.name, format!("qmp connect: {e}")),
                }
            }
            if let Some(c) = qmps[i].as_mut() {
                match c.query_balloon() {
                    Ok(actual) => {
                        let t = epoch.elapsed().as_secs_f64();
                        if let Some(tl) = lock(data).get_mut(&g.name) {
                            tl.balloon.push(BalloonSample { t, actual });
                        }
                        c.take_events();
                    }
                    Err(e) => {
                        qmps[i] = None;
                        note_error(data, &g.name, format!("query-balloon: {e}"));
                    }
                }
            }
            // Agent.
            if let Some((at, r)) = readers[i].status().latest {
                if last_seq[i] != Some(r.seq) {
                    last_seq[i] = Some(r.seq);
                    let (m, v) = (&r.mem, &r.vm);
                    let s = AgentSample {
                        t: at.saturating_duration_since(epoch).as_secs_f64(),
                        seq: r.seq,
                        total: m.total.unwrap_or(0),
                        available: m.available.unwrap_or(0),
                        committed: m.committed_as.unwrap_or(0),
                        swap_used: m
                            .swap_total
                            .unwrap_or(0)
                            .saturating_sub(m.swap_free.unwrap_or(0)),
                        pswpin: v.pswpin.unwrap_or(0),
                        pswpout: v.pswpout.unwrap_or(0),
                        oom_kill: v.oom_kill.unwrap_or(0),
                        pgmajfault: v.pgmajfault.unwrap_or(0),
                        allocstall: v.allocstall.unwrap_or(0),
                    };
                    if let Some(tl) = lock(data).get_mut(&g.name) {
                        tl.agent.push(s);
                    }
                }
            }
        }
        // tmemd's view.
        if let Some(sock) = &tmemd_ctl {
            if n % manager_every == 0 {
                let r: crate::Result<Vec<GuestInfo>> =
                    crate::daemon::http_get_json(sock, "/api/v1/guests", Duration::from_secs(2));
                let t = epoch.elapsed().as_secs_f64();
                match r {
                    Ok(list) => {
                        let mut d = lock(data);
                        for gi in list {
                            if let Some(tl) = d.get_mut(&gi.name) {
                                tl.manager.push(ManagerSample {
                                    t,
                                    actual: gi.actual,
                                    target: gi.target,
                                    reclaimed_bytes: gi.reclaimed_bytes,
                                    given_back_bytes: gi.given_back_bytes,
                                    intervals: gi.intervals,
                                    errors: gi.errors,
                                    stuck: gi.stuck,
                                });
                            }
                        }
                    }
                    Err(e) => {
                        for g in &guests {
                            note_error(data, &g.name, format!("GET /api/v1/guests: {e}"));
                        }
                    }
                }
                if guests.iter().any(|g| g.export.is_some()) {
                    sample_exports(sock, &guests, epoch, data);
                }
            }
        }
        n = n.wrapping_add(1);
        next += tick;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
    }
}

fn sample_exports(sock: &std::path::Path, guests: &[Watch], epoch: Instant, data: &Shared) {
    let r: crate::Result<Vec<ExportInfo>> =
        crate::daemon::http_get_json(sock, "/api/v1/exports", Duration::from_secs(2));
    let t = epoch.elapsed().as_secs_f64();
    match r {
        Ok(list) => {
            let mut d = lock(data);
            for g in guests {
                let Some(name) = &g.export else { continue };
                let Some(e) = list.iter().find(|e| &e.name == name) else {
                    continue;
                };
                if let Some(tl) = d.get_mut(&g.name) {
                    tl.export.push(ExportSample {
                        t,
                        pool_pages: e.backend.pool_pages,
                        spilled_pages: e.backend.spilled_pages,
                        nbd_writes: e.nbd.writes,
                        nbd_reads: e.nbd.reads,
                        nbd_trims: e.nbd.trims + e.nbd.write_zeroes,
                    });
                }
            }
        }
        Err(e) => {
            for g in guests {
                note_error(data, &g.name, format!("GET /api/v1/exports: {e}"));
            }
        }
    }
}
