//! One run of one configuration: N guests started together, measured, torn down.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tmem_api::{CreateExport, ExportInfo, ExportKind, Size, Stats};
use tmem_balloon::agent::AgentReport;
use tmem_balloon::qmp::QmpClient;
use tmem_vm::{Accel, Drive, Guest, GuestConfig, GuestImage, MemCgroup};

use crate::configs::ConfigKind;
use crate::hoststack::{self, ModernStack, StackInfo};
use crate::image::{self, WorkParams, MARK_DONE, MARK_VMSTAT, MARK_WAIT};
use crate::procstat;
use crate::tmemd::{Daemon, DaemonOpts};

/// Everything a run needs that does not change between runs.
#[derive(Debug, Clone)]
pub struct RunSetup {
    /// Number of guests.
    pub guests: u32,
    /// Guest memory (boot size), MiB.
    pub memory_mib: u32,
    /// Swap disk per guest, MiB.
    pub swap_mib: u32,
    /// The shared data image.
    pub data_image: PathBuf,
    /// The guest image.
    pub image: GuestImage,
    /// Accelerator.
    pub accel: Accel,
    /// Under the host budget, memory guest growth leaves to the pool, bytes.
    pub pool_min: u64,
    /// TCG translated-code cache per guest, MiB (`None`: QEMU's default).
    pub tcg_tb_mib: Option<u32>,
    /// Workload (the seed is offset per guest).
    pub work: WorkParams,
    /// tmemd binary.
    pub tmemd: PathBuf,
    /// Codec of the compressing configuration (`lz4`, `zstd`, `zstd:N`).
    pub codec: String,
    /// tmem pool budget, bytes.
    pub pool_budget: u64,
    /// Seconds every configuration idles between boot (and registering the balloon
    /// manager, where there is one) and starting the workload.
    pub settle_secs: u64,
    /// One host memory budget for every configuration: a memory cgroup limit on all QEMU
    /// processes and tmemd (and the page cache they cause), bytes. `None`: no limit.
    pub host_budget: Option<u64>,
    /// Where the `modern` rows make their host swap file (a disk filesystem).
    pub swap_dir: PathBuf,
    /// Statically partitioned rows allocate guest RAM up front (`-mem-prealloc`), as a
    /// long-running VM has touched all of its RAM.
    pub static_prealloc: bool,
    /// Balloon manager interval, ms.
    pub balloon_interval_ms: u64,
    /// Longest a run may take.
    pub timeout: Duration,
    /// Sampling interval.
    pub sample: Duration,
    /// Scratch directory (short path: Unix sockets live here).
    pub scratch: PathBuf,
    /// Where console logs are copied (if any).
    pub logs: Option<PathBuf>,
}

/// A time series point of one guest's balloon (logical memory size).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct BalloonPoint {
    /// Seconds since the workload started (negative: settle period).
    pub t: f64,
    /// Guest memory size as seen through the balloon (`query-balloon` `actual`), bytes.
    pub bytes: u64,
}

/// A time series point of the pool.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PoolPoint {
    /// Seconds since the workload started.
    pub t: f64,
    /// Logical bytes (pages × 4096): the pool's apparent size.
    pub logical: u64,
    /// Bytes really held (allocator slabs + metadata).
    pub held: u64,
    /// The pool budget at that moment (the balloon manager moves it), bytes.
    #[serde(default)]
    pub budget: u64,
    /// Ephemeral pages evicted so far.
    #[serde(default)]
    pub evictions: u64,
    /// Puts refused so far.
    #[serde(default)]
    pub puts_refused: u64,
}

/// What the daemon counted for one export during the workload (deltas).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportDelta {
    /// Export name.
    pub name: String,
    /// `swap` or `cached`.
    pub kind: String,
    /// Backend `sectors_read` delta.
    pub sectors_read: u64,
    /// Backend `sectors_written` delta.
    pub sectors_written: u64,
    /// Backend `spilled_pages` delta (swap).
    pub spilled_pages: u64,
    /// Pool hits delta.
    pub hits: u64,
    /// Pool misses delta.
    pub misses: u64,
}

/// Per-guest outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuestOutcome {
    /// Guest name.
    pub name: String,
    /// Workload exit code (`None`: no `LAB-DONE`).
    pub exit_code: Option<i32>,
    /// Seconds from start to `LAB-DONE`.
    pub done_secs: Option<f64>,
    /// Pages swapped in (guest `/proc/vmstat` `pswpin`).
    pub swap_in: u64,
    /// Pages swapped out.
    pub swap_out: u64,
    /// OOM kills in the guest.
    pub oom_kills: u64,
    /// Major faults.
    pub major_faults: u64,
    /// Where the counters came from (`console` final line or `agent` last report).
    pub counters_from: String,
    /// Balloon size over time.
    pub balloon: Vec<BalloonPoint>,
}

/// The measured result of one run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    /// Configuration.
    pub config: ConfigKind,
    /// Repeat index (0-based).
    pub repeat: u32,
    /// Wall time from the start signal until every guest finished, seconds.
    pub wall_secs: f64,
    /// CPU seconds of all QEMU processes + tmemd during the workload.
    pub cpu_secs: f64,
    /// Of which tmemd.
    pub cpu_tmemd_secs: f64,
    /// 512-byte sectors read from backing storage.
    pub sectors_read: u64,
    /// 512-byte sectors written to backing storage.
    pub sectors_written: u64,
    /// How the sectors were measured.
    pub sectors_source: String,
    /// Sectors the guests read from their virtual disks (QMP `query-blockstats`).
    pub guest_sectors_read: u64,
    /// Sectors the guests wrote to their virtual disks.
    pub guest_sectors_written: u64,
    /// Guest swap-in pages, all guests.
    pub swap_in: u64,
    /// Guest swap-out pages, all guests.
    pub swap_out: u64,
    /// Guest OOM kills, all guests.
    pub oom_kills: u64,
    /// Guest major faults, all guests.
    pub major_faults: u64,
    /// Guests whose workload failed or did not finish.
    pub failed_guests: u32,
    /// Peak logical bytes in the pool (0 without tmem).
    pub pool_peak_logical: u64,
    /// Peak bytes held by the pool (0 without tmem).
    pub pool_peak_held: u64,
    /// Peak logical / peak held ("apparent size" multiplier; 0 without tmem).
    pub apparent_ratio: f64,
    /// Pool time series.
    pub pool: Vec<PoolPoint>,
    /// tmem: the daemon's per-export counters (their sum is `sectors_read`/`sectors_written`).
    pub exports: Vec<ExportDelta>,
    /// Per-guest outcomes.
    pub guests: Vec<GuestOutcome>,
    /// Seconds this run idled between boot and the workload.
    #[serde(default)]
    pub settle_secs: u64,
    /// Memory each guest booted with, MiB (less than asked for where the configuration is
    /// statically partitioned under the host budget).
    #[serde(default)]
    pub guest_memory_mib: u32,
    /// The host budget (cgroup limit on QEMU + tmemd) of this run, bytes (0: none).
    #[serde(default)]
    pub host_budget: u64,
    /// Peak memory charged to the budget during the workload (cgroup usage, page cache
    /// included; without a cgroup the sum of RSS), bytes.
    #[serde(default)]
    pub host_peak_bytes: u64,
    /// Sum of QEMU and tmemd PSS when the workload ended, bytes.
    #[serde(default)]
    pub host_pss_bytes: u64,
    /// Processes the budget's OOM killer killed during the run.
    #[serde(default)]
    pub host_oom_kills: u64,
    /// Modern stack: host swap in use at the peak, bytes.
    #[serde(default)]
    pub host_swap_peak_bytes: u64,
    /// Modern stack: zswap pool at the peak, bytes.
    #[serde(default)]
    pub zswap_peak_bytes: u64,
    /// Modern stack: memory KSM saved when the workload ended (pages_sharing × 4 KiB).
    #[serde(default)]
    pub ksm_saved_bytes: u64,
    /// Minor page faults of the QEMU processes during the workload (mostly first touches
    /// of guest RAM the host had not backed yet).
    #[serde(default)]
    pub qemu_minor_faults: u64,
    /// Whether guest RAM was allocated up front (`-mem-prealloc`).
    #[serde(default)]
    pub prealloc: bool,
    /// Modern stack: what was on (swap size, zswap compressor, KSM scan rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<StackInfo>,
}

/// QEMU's own memory per guest beside guest RAM and its translated-code cache, MiB:
/// heap, device buffers and libraries, measured here (`/proc/PID/smaps`, ~14 MiB heap and
/// ~7 MiB libraries at boot, growing with a workload's I/O) and rounded up.
pub const QEMU_BASE_MIB: u32 = 64;

/// What static partitioning and the balloon manager's host reserve set aside per guest
/// for QEMU under the host budget, MiB: [`QEMU_BASE_MIB`] plus the TCG translated-code
/// cache when it is capped (`--tcg-tb-mib`), else 128 in all (QEMU's default cache is
/// 1 GiB, filled lazily: measured here ~53 MiB after a workload, ~100 MiB for all of
/// QEMU). Under KVM there is no such cache, so this is an upper bound there.
pub fn qemu_overhead_mib(tcg_tb_mib: Option<u32>) -> u32 {
    match tcg_tb_mib {
        Some(tb) => QEMU_BASE_MIB + tb,
        None => 128,
    }
}

/// Per guest in the default host budget (`guests × (¾ × memory + this)`), MiB: the
/// default budget does not move with `--tcg-tb-mib`.
pub const DEFAULT_BUDGET_QEMU_MIB: u32 = 128;
/// tmemd's own memory beside its pool, MiB (set aside in the host reserve).
pub const TMEMD_OVERHEAD_MIB: u32 = 32;

/// Static partitioning: the guest size that lets `guests` guests and their QEMUs fit
/// `budget` bytes, MiB.
pub fn static_share_mib(budget: u64, guests: u32, qemu_mib: u32) -> u32 {
    let per = (budget >> 20) / u64::from(guests.max(1));
    u32::try_from(per)
        .unwrap_or(u32::MAX)
        .saturating_sub(qemu_mib)
}

/// Tears everything down in order on every path: guests, then the daemon, then files.
///
/// Fields left after `drop` (the cgroup, then the host stack) go in declaration order:
/// the cgroup is removed once its processes are gone, the host's swap, zswap and KSM
/// settings are restored last.
struct Env {
    guests: Vec<Guest>,
    daemon: Option<Daemon>,
    readers: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
    cgroup: Option<MemCgroup>,
    stack: Option<ModernStack>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = &self.daemon {
            for g in &self.guests {
                let _ = d.api().delete(&format!("/guests/{}", g.name()));
            }
        }
        self.guests.clear();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.daemon = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Latest agent report per guest, filled by a reader thread.
type Latest = Arc<Mutex<Option<AgentReport>>>;

fn spawn_reader(
    sock: PathBuf,
    latest: Latest,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok(s) = UnixStream::connect(&sock) else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut r = BufReader::new(s);
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) {
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {
                        if line.ends_with('\n') {
                            if let Ok(rep) = serde_json::from_str::<AgentReport>(line.trim()) {
                                if let Ok(mut l) = latest.lock() {
                                    *l = Some(rep);
                                }
                            }
                            line.clear();
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
                if line.len() > tmem_balloon::agent::MAX_LINE {
                    line.clear();
                }
            }
        }
    })
}

/// Sum of `rd_bytes` and `wr_bytes` over all block devices of a guest.
fn blockstats(q: &mut QmpClient) -> Result<(u64, u64)> {
    let v = q.execute("query-blockstats", None)?;
    let mut rd = 0;
    let mut wr = 0;
    for d in v.as_array().into_iter().flatten() {
        let st = &d["stats"];
        rd += st["rd_bytes"].as_u64().unwrap_or(0);
        wr += st["wr_bytes"].as_u64().unwrap_or(0);
    }
    Ok((rd, wr))
}

/// Backing I/O counted by the daemon: cached exports' sectors read/written plus swap
/// exports' spilled pages (written to the spill file).
fn daemon_sectors(exports: &[ExportInfo]) -> (u64, u64) {
    let mut rd = 0;
    let mut wr = 0;
    for e in exports {
        rd += e.backend.sectors_read;
        wr += e.backend.sectors_written;
        if e.kind == ExportKind::Swap {
            wr += e.backend.spilled_pages * 8;
        }
    }
    (rd, wr)
}

fn export_deltas(ex0: &[ExportInfo], ex1: &[ExportInfo]) -> Vec<ExportDelta> {
    ex1.iter()
        .map(|b| {
            let a = ex0.iter().find(|a| a.name == b.name);
            let d = |f: fn(&ExportInfo) -> u64| f(b).saturating_sub(a.map(f).unwrap_or(0));
            ExportDelta {
                name: b.name.clone(),
                kind: b.kind.to_string(),
                sectors_read: d(|e| e.backend.sectors_read),
                sectors_written: d(|e| e.backend.sectors_written),
                spilled_pages: d(|e| e.backend.spilled_pages),
                hits: d(|e| e.backend.hits),
                misses: d(|e| e.backend.misses),
            }
        })
        .collect()
}

fn console_line(g: &Guest, mark: &str) -> Option<String> {
    g.console_text()
        .lines()
        .find(|l| l.trim_start().starts_with(mark))
        .map(str::to_string)
}

/// Runs one configuration once. `progress` gets short status lines.
pub fn run_once(
    s: &RunSetup,
    config: ConfigKind,
    repeat: u32,
    progress: &dyn Fn(&str),
) -> Result<RunResult> {
    let dir = s.scratch.join(format!("{}-{repeat}", short(config)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut env = Env {
        guests: Vec::new(),
        daemon: None,
        readers: Vec::new(),
        stop: stop.clone(),
        dir: dir.clone(),
        cgroup: None,
        stack: None,
    };
    let guest_mib = match s.host_budget {
        Some(b) if config.static_partition() => {
            let share = static_share_mib(b, s.guests, qemu_overhead_mib(s.tcg_tb_mib));
            if share < 96 {
                bail!(
                    "{config}: a {} MiB host budget leaves {share} MiB per guest for {} statically partitioned guests (need 96)",
                    b >> 20,
                    s.guests
                );
            }
            share.min(s.memory_mib)
        }
        _ => s.memory_mib,
    };
    if let Some(b) = s.host_budget {
        let cg = MemCgroup::create(
            &format!("tmem-lab-{}-{}-{repeat}", std::process::id(), short(config)),
            Some(b),
        )
        .context("the host budget needs a memory cgroup")?;
        env.cgroup = Some(cg);
    }
    if config.modern_stack() {
        progress("switching on host swap + zswap + KSM");
        let swap = (u64::from(s.guests) * u64::from(s.memory_mib)) << 20;
        env.stack = Some(ModernStack::enable(
            &s.swap_dir,
            swap,
            &hoststack::ZSWAP_COMPRESSORS,
        )?);
    }
    let cgroup_path = env.cgroup.as_ref().map(|c| c.path().to_path_buf());
    let prealloc = s.static_prealloc && config.static_partition();

    if config.needs_daemon() {
        let d = Daemon::start(&DaemonOpts {
            bin: s.tmemd.clone(),
            state_dir: dir.join("d"),
            budget: s.pool_budget,
            codec: config.codec(&s.codec),
            dedup: config.dedup().into(),
            balloon_interval_ms: s.balloon_interval_ms,
            cgroup: cgroup_path.clone(),
            // Under the host budget, the balloon manager sizes the pool from it: budget −
            // (QEMU and tmemd overheads) − what the guests hold now.
            host_total: s.host_budget,
            pool_min: if s.host_budget.is_some() {
                s.pool_min
            } else {
                0
            },
            host_reserve: s.host_budget.map(|_| {
                (u64::from(s.guests) * u64::from(qemu_overhead_mib(s.tcg_tb_mib))
                    + u64::from(TMEMD_OVERHEAD_MIB))
                    << 20
            }),
        })?;
        env.daemon = Some(d);
    }
    let swap_bytes = u64::from(s.swap_mib) << 20;
    let mut lab_qmp_paths = Vec::new();
    let mut go_paths = Vec::new();
    let mut latest: Vec<Latest> = Vec::new();
    for i in 0..s.guests {
        let name = format!("g{i}");
        let gdir = dir.join(&name);
        std::fs::create_dir_all(&gdir)?;
        let (swap, data) = if config.tmem() {
            let d = env.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
            let client = Some(i + 1);
            d.api().post(
                "/exports",
                &CreateExport {
                    name: format!("{name}-swap"),
                    kind: ExportKind::Swap,
                    size: Some(Size(swap_bytes)),
                    image: None,
                    client,
                    codec: None,
                    dedup: None,
                    direct_io: None,
                    access: Default::default(),
                    tenant_key: None,
                    writable: None,
                },
            )?;
            d.api().post(
                "/exports",
                &CreateExport {
                    name: format!("{name}-data"),
                    kind: ExportKind::Cached,
                    size: None,
                    image: Some(s.data_image.clone()),
                    client,
                    codec: None,
                    dedup: None,
                    direct_io: Some(true),
                    access: Default::default(),
                    tenant_key: None,
                    writable: None,
                },
            )?;
            (
                Drive::nbd(d.nbd_socket(), format!("{name}-swap")),
                Drive::nbd(d.nbd_socket(), format!("{name}-data")).read_only(),
            )
        } else {
            let swap_file = gdir.join("swap.img");
            let f = std::fs::File::create(&swap_file)?;
            f.set_len(swap_bytes)?;
            drop(f);
            let mode = config.file_cache_mode();
            (
                Drive::file(&swap_file).cache(mode),
                Drive::file(&s.data_image).read_only().cache(mode),
            )
        };
        let lab_qmp = gdir.join("lq.sock");
        let lab_ag = gdir.join("la.sock");
        let go = gdir.join("go.sock");
        let mut work = s.work.clone();
        work.seed = s.work.seed.wrapping_add(u64::from(i) * 7919);
        let mut cfg = GuestConfig::new(&name)
            .memory_mib(guest_mib)
            .accel(s.accel)
            .tcg_tb_mib(s.tcg_tb_mib)
            .agent_path(gdir.join("ag.sock"))
            .qmp_path(gdir.join("q.sock"))
            .run_dir(&gdir)
            .deflate_on_oom(config.selfballoon())
            .free_page_reporting(config.modern_stack())
            .image(s.image.clone())
            .drive(swap)
            .drive(data)
            .extra_qmp(&lab_qmp)
            .serial_port(image::PORT_LAB, &lab_ag)
            .serial_port(image::PORT_GO, &go);
        if let Some(c) = &cgroup_path {
            cfg = cfg.cgroup(c);
        }
        if prealloc {
            cfg = cfg.extra_arg("-mem-prealloc");
        }
        for a in image::kernel_args(&work) {
            cfg = cfg.cmdline(&a);
        }
        let g = cfg.launch().with_context(|| format!("launching {name}"))?;
        env.guests.push(g);
        let l: Latest = Arc::new(Mutex::new(None));
        env.readers
            .push(spawn_reader(lab_ag, l.clone(), stop.clone()));
        latest.push(l);
        lab_qmp_paths.push(lab_qmp);
        go_paths.push(go);
    }
    progress("booting");
    let boot_deadline = Duration::from_secs(300);
    for g in &env.guests {
        g.wait_for_console(MARK_WAIT, boot_deadline)
            .with_context(|| format!("guest {} did not become ready", g.name()))?;
    }
    let mut qmps = Vec::new();
    for p in &lab_qmp_paths {
        qmps.push(
            QmpClient::connect(p, Duration::from_secs(10))
                .with_context(|| format!("QMP {}", p.display()))?,
        );
    }
    let mut gos = Vec::new();
    for p in &go_paths {
        gos.push(UnixStream::connect(p).with_context(|| format!("connecting {}", p.display()))?);
    }
    if config.selfballoon() {
        let d = env.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
        for g in &env.guests {
            d.add_selfballoon_guest(g.name(), g)?;
        }
    }
    // Settle: let the balloon manager shrink idle guests before the workload (sampled).
    let mut balloon: Vec<Vec<BalloonPoint>> = vec![Vec::new(); env.guests.len()];
    let mut pool: Vec<PoolPoint> = Vec::new();
    // Every configuration idles as long: the guests finish booting and the balloon
    // manager, free page reporting or KSM (where they run) act before the workload.
    let settle = Duration::from_secs(s.settle_secs);
    let settle_start = Instant::now();
    progress("settling");
    while settle_start.elapsed() < settle {
        let t = -(settle.as_secs_f64() - settle_start.elapsed().as_secs_f64());
        sample(&mut qmps, env.daemon.as_ref(), t, &mut balloon, &mut pool);
        std::thread::sleep(s.sample);
    }

    // Baselines of the counters.
    let mut pids: Vec<u32> = env.guests.iter().map(Guest::pid).collect();
    let dpid = env.daemon.as_ref().map(Daemon::pid);
    if let Some(p) = dpid {
        pids.push(p);
    }
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| procstat::cpu_secs(*p).unwrap_or(0.0))
        .collect();
    let faults0: Vec<u64> = env
        .guests
        .iter()
        .map(|g| procstat::minor_faults(g.pid()).unwrap_or(0))
        .collect();
    let io0: Vec<(u64, u64)> = env
        .guests
        .iter()
        .map(|g| procstat::io_bytes(g.pid()).unwrap_or((0, 0)))
        .collect();
    let mut bs0 = Vec::new();
    for q in qmps.iter_mut() {
        bs0.push(blockstats(q)?);
    }
    let ex0: Vec<ExportInfo> = match &env.daemon {
        Some(d) if config.tmem() => d.api().get("/exports")?,
        _ => Vec::new(),
    };

    let start = Instant::now();
    for g in gos.iter_mut() {
        g.write_all(b"go\n")?;
    }
    progress("running");
    let n = env.guests.len();
    let mut done_at: Vec<Option<f64>> = vec![None; n];
    let mut cpu_end: Vec<Option<f64>> = vec![None; pids.len()];
    let mut bs1: Vec<Option<(u64, u64)>> = vec![None; n];
    let mut io1: Vec<Option<(u64, u64)>> = vec![None; n];
    let mut faults1: Vec<Option<u64>> = vec![None; n];
    let mut host = HostPeaks::default();
    let oom0 = env.cgroup.as_ref().map_or(0, MemCgroup::oom_kills);
    loop {
        let t = start.elapsed().as_secs_f64();
        sample(&mut qmps, env.daemon.as_ref(), t, &mut balloon, &mut pool);
        host.sample(env.cgroup.as_ref(), &pids, config.modern_stack());
        for i in 0..n {
            if done_at[i].is_some() {
                continue;
            }
            let g = &env.guests[i];
            if console_line(g, MARK_DONE).is_some() {
                done_at[i] = Some(start.elapsed().as_secs_f64());
                // The guest waits for "bye": its counters are final now.
                cpu_end[i] = procstat::cpu_secs(g.pid());
                bs1[i] = match blockstats(&mut qmps[i]) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::warn!("query-blockstats of {}: {e:#}", g.name());
                        None
                    }
                };
                io1[i] = procstat::io_bytes(g.pid());
                faults1[i] = procstat::minor_faults(g.pid());
            } else if !g.is_running() {
                let kills = env.cgroup.as_ref().map_or(0, MemCgroup::oom_kills) - oom0;
                if kills > 0 {
                    // The host budget's OOM killer took this guest's QEMU: the guest
                    // failed (counted), the others go on.
                    tracing::warn!(
                        "{config}: guest {} was killed by the host budget's OOM killer",
                        g.name()
                    );
                    done_at[i] = Some(start.elapsed().as_secs_f64());
                    continue;
                }
                bail!(
                    "guest {} exited during the workload; console tail:\n{}",
                    g.name(),
                    tail(&g.console_text(), 30)
                );
            }
        }
        if done_at.iter().all(Option::is_some) {
            break;
        }
        if start.elapsed() > s.timeout {
            bail!("run timed out after {:?}", s.timeout);
        }
        std::thread::sleep(s.sample);
    }
    let wall = start.elapsed().as_secs_f64();
    host.sample(env.cgroup.as_ref(), &pids, config.modern_stack());
    let host_pss: u64 = pids.iter().filter_map(|p| procstat::pss_bytes(*p)).sum();
    let ksm_saved = if config.modern_stack() {
        hoststack::host_counters().ksm_saved
    } else {
        0
    };
    let host_oom_kills = env.cgroup.as_ref().map_or(0, MemCgroup::oom_kills) - oom0;
    if let (Some(p), Some(slot)) = (dpid, cpu_end.last_mut()) {
        *slot = procstat::cpu_secs(p);
    }
    let ex1: Vec<ExportInfo> = match &env.daemon {
        Some(d) if config.tmem() => d.api().get("/exports")?,
        _ => Vec::new(),
    };
    // Final pool sample.
    sample(
        &mut qmps,
        env.daemon.as_ref(),
        wall,
        &mut balloon,
        &mut pool,
    );

    let cpu: Vec<f64> = cpu_end
        .iter()
        .zip(&cpu0)
        .map(|(e, b)| (e.unwrap_or(*b) - b).max(0.0))
        .collect();
    let cpu_total: f64 = cpu.iter().sum();
    let cpu_tmemd = if dpid.is_some() {
        cpu.last().copied().unwrap_or(0.0)
    } else {
        0.0
    };

    let mut guest_rd = 0;
    let mut guest_wr = 0;
    for (a, b) in bs0.iter().zip(&bs1) {
        let b = b.unwrap_or(*a);
        guest_rd += b.0.saturating_sub(a.0);
        guest_wr += b.1.saturating_sub(a.1);
    }
    let (sectors_read, sectors_written, source) = if config.tmem() {
        let (r0, w0) = daemon_sectors(&ex0);
        let (r1, w1) = daemon_sectors(&ex1);
        (
            r1.saturating_sub(r0),
            w1.saturating_sub(w0),
            "tmemd export counters (cached: sectors_read/written; swap: spilled pages x 8)"
                .to_string(),
        )
    } else if config == ConfigKind::HostCache {
        let mut r = 0;
        let mut w = 0;
        for (a, b) in io0.iter().zip(&io1) {
            let b = b.unwrap_or(*a);
            r += b.0.saturating_sub(a.0);
            w += b.1.saturating_sub(a.1);
        }
        (
            r / 512,
            w / 512,
            "QEMU /proc/PID/io read_bytes/write_bytes (host page cache absorbs the rest)"
                .to_string(),
        )
    } else {
        (
            guest_rd / 512,
            guest_wr / 512,
            "QMP query-blockstats rd_bytes/wr_bytes (cache=none)".to_string(),
        )
    };

    let mut outcomes = Vec::new();
    for (i, g) in env.guests.iter().enumerate() {
        let done = console_line(g, MARK_DONE);
        let exit_code = done
            .as_deref()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok());
        let (si, so, oom, mf, from) = match console_line(g, MARK_VMSTAT)
            .as_deref()
            .and_then(image::parse_vmstat_line)
        {
            Some((a, b, c, d)) => (a, b, c, d, "console"),
            None => {
                let l = latest[i].lock().ok().and_then(|l| l.clone());
                match l {
                    Some(r) => (
                        r.vm.pswpin.unwrap_or(0),
                        r.vm.pswpout.unwrap_or(0),
                        r.vm.oom_kill.unwrap_or(0),
                        r.vm.pgmajfault.unwrap_or(0),
                        "agent",
                    ),
                    None => (0, 0, 0, 0, "none"),
                }
            }
        };
        outcomes.push(GuestOutcome {
            name: g.name().to_string(),
            exit_code,
            done_secs: done_at[i],
            swap_in: si,
            swap_out: so,
            oom_kills: oom,
            major_faults: mf,
            counters_from: from.into(),
            balloon: std::mem::take(&mut balloon[i]),
        });
    }
    // Let the guests exit.
    for g in gos.iter_mut() {
        let _ = g.write_all(b"bye\n");
    }
    for g in &env.guests {
        let _ = g.wait_exit(Duration::from_secs(30));
    }
    if let Some(logs) = &s.logs {
        let _ = std::fs::create_dir_all(logs);
        for g in &env.guests {
            let _ = std::fs::copy(
                g.console_log(),
                logs.join(format!(
                    "{}-r{repeat}-{}.console.log",
                    config.name(),
                    g.name()
                )),
            );
        }
    }
    let peak_logical = pool.iter().map(|p| p.logical).max().unwrap_or(0);
    let peak_held = pool.iter().map(|p| p.held).max().unwrap_or(0);
    let failed = outcomes.iter().filter(|o| o.exit_code != Some(0)).count() as u32;
    Ok(RunResult {
        config,
        repeat,
        wall_secs: wall,
        cpu_secs: cpu_total,
        cpu_tmemd_secs: cpu_tmemd,
        sectors_read,
        sectors_written,
        sectors_source: source,
        guest_sectors_read: guest_rd / 512,
        guest_sectors_written: guest_wr / 512,
        swap_in: outcomes.iter().map(|o| o.swap_in).sum(),
        swap_out: outcomes.iter().map(|o| o.swap_out).sum(),
        oom_kills: outcomes.iter().map(|o| o.oom_kills).sum(),
        major_faults: outcomes.iter().map(|o| o.major_faults).sum(),
        failed_guests: failed,
        pool_peak_logical: peak_logical,
        pool_peak_held: peak_held,
        apparent_ratio: if peak_held > 0 {
            peak_logical as f64 / peak_held as f64
        } else {
            0.0
        },
        pool: if config.tmem() { pool } else { Vec::new() },
        exports: export_deltas(&ex0, &ex1),
        guests: outcomes,
        settle_secs: settle.as_secs(),
        guest_memory_mib: guest_mib,
        host_budget: s.host_budget.unwrap_or(0),
        host_peak_bytes: host.peak,
        host_pss_bytes: host_pss,
        host_oom_kills,
        host_swap_peak_bytes: host.swap,
        zswap_peak_bytes: host.zswap,
        ksm_saved_bytes: ksm_saved,
        stack: env.stack.as_ref().map(|st| st.info().clone()),
        qemu_minor_faults: faults0
            .iter()
            .zip(&faults1)
            .map(|(a, b)| b.unwrap_or(*a).saturating_sub(*a))
            .sum(),
        prealloc,
    })
}

/// Peaks of what the host spends on a run, sampled during the workload.
#[derive(Debug, Default)]
struct HostPeaks {
    /// Charged to the budget (cgroup usage, else the sum of RSS).
    peak: u64,
    /// Host swap in use.
    swap: u64,
    /// zswap pool.
    zswap: u64,
}

impl HostPeaks {
    fn sample(&mut self, cg: Option<&MemCgroup>, pids: &[u32], stack: bool) {
        let used = cg
            .and_then(|c| c.usage().ok())
            .unwrap_or_else(|| pids.iter().filter_map(|p| procstat::rss_bytes(*p)).sum());
        self.peak = self.peak.max(used);
        if stack {
            let c = hoststack::host_counters();
            self.swap = self.swap.max(c.swap_used);
            self.zswap = self.zswap.max(c.zswap);
        }
    }
}

/// One sample of every guest's balloon and (with a daemon) the pool.
fn sample(
    qmps: &mut [QmpClient],
    daemon: Option<&Daemon>,
    t: f64,
    balloon: &mut [Vec<BalloonPoint>],
    pool: &mut Vec<PoolPoint>,
) {
    for (q, b) in qmps.iter_mut().zip(balloon.iter_mut()) {
        if let Ok(v) = q.query_balloon() {
            b.push(BalloonPoint { t, bytes: v });
        }
        let _ = q.take_events();
    }
    if let Some(d) = daemon {
        if let Ok(st) = d.api().get::<Stats>("/stats") {
            pool.push(PoolPoint {
                t,
                logical: st.pool.logical_bytes,
                held: st.pool.held_bytes,
                budget: st.pool.budget,
                evictions: st.pool.ops.evictions,
                puts_refused: st.pool.ops.puts_refused,
            });
        }
    }
}

fn short(c: ConfigKind) -> &'static str {
    match c {
        ConfigKind::Unchanged => "u",
        ConfigKind::HostCache => "h",
        ConfigKind::Selfballoon => "s",
        ConfigKind::Tmem => "t",
        ConfigKind::TmemDedup => "td",
        ConfigKind::TmemDedupComp => "tdc",
        ConfigKind::Modern => "m",
        ConfigKind::ModernTmem => "mt",
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Per-configuration summary: the talk's method (drop highest and lowest, average the rest)
/// applied to every metric independently.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Configuration.
    pub config: ConfigKind,
    /// Runs that completed.
    pub runs: u32,
    /// Metric name → trimmed mean.
    pub metrics: BTreeMap<String, f64>,
}

/// The metric names every summary has, in table order.
pub const METRICS: &[&str] = &[
    "wall_secs",
    "cpu_secs",
    "sectors_read",
    "sectors_written",
    "guest_sectors_read",
    "guest_sectors_written",
    "swap_in",
    "swap_out",
    "oom_kills",
    "failed_guests",
    "pool_peak_logical",
    "pool_peak_held",
    "apparent_ratio",
    "host_peak_bytes",
    "host_pss_bytes",
    "host_oom_kills",
    "ksm_saved_bytes",
    "qemu_minor_faults",
];

/// The value of a metric in a run.
pub fn metric(r: &RunResult, name: &str) -> Option<f64> {
    Some(match name {
        "wall_secs" => r.wall_secs,
        "cpu_secs" => r.cpu_secs,
        "sectors_read" => r.sectors_read as f64,
        "sectors_written" => r.sectors_written as f64,
        "guest_sectors_read" => r.guest_sectors_read as f64,
        "guest_sectors_written" => r.guest_sectors_written as f64,
        "swap_in" => r.swap_in as f64,
        "swap_out" => r.swap_out as f64,
        "oom_kills" => r.oom_kills as f64,
        "failed_guests" => f64::from(r.failed_guests),
        "pool_peak_logical" => r.pool_peak_logical as f64,
        "pool_peak_held" => r.pool_peak_held as f64,
        "apparent_ratio" => r.apparent_ratio,
        "host_peak_bytes" => r.host_peak_bytes as f64,
        "host_pss_bytes" => r.host_pss_bytes as f64,
        "host_oom_kills" => r.host_oom_kills as f64,
        "ksm_saved_bytes" => r.ksm_saved_bytes as f64,
        "qemu_minor_faults" => r.qemu_minor_faults as f64,
        _ => return None,
    })
}

/// Drops the highest and lowest sample when there are at least three, averages the rest.
pub fn trimmed_mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = if s.len() >= 3 {
        &s[1..s.len() - 1]
    } else {
        &s[..]
    };
    mid.iter().sum::<f64>() / mid.len() as f64
}

/// Summarises the runs of one configuration.
pub fn summarize(config: ConfigKind, runs: &[RunResult]) -> Summary {
    let mine: Vec<&RunResult> = runs.iter().filter(|r| r.config == config).collect();
    let mut metrics = BTreeMap::new();
    for m in METRICS {
        let v: Vec<f64> = mine.iter().filter_map(|r| metric(r, m)).collect();
        metrics.insert((*m).to_string(), trimmed_mean(&v));
    }
    Summary {
        config,
        runs: mine.len() as u32,
        metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_mean_drops_extremes() {
        assert_eq!(trimmed_mean(&[1.0, 100.0, 2.0, 3.0, -50.0]), 2.0);
        assert_eq!(trimmed_mean(&[4.0]), 4.0);
        assert_eq!(trimmed_mean(&[4.0, 6.0]), 5.0);
        assert_eq!(trimmed_mean(&[]), 0.0);
    }

    #[test]
    fn daemon_sector_sum() {
        let mk = |kind, r, w, sp| ExportInfo {
            name: "x".into(),
            kind,
            size: 0,
            client: 1,
            pool: None,
            image: None,
            writable: false,
            uri: String::new(),
            access: Default::default(),
            tls_dir: None,
            backend: tmem_api::BackendCounters {
                sectors_read: r,
                sectors_written: w,
                spilled_pages: sp,
                ..Default::default()
            },
            nbd: Default::default(),
        };
        let v = vec![
            mk(ExportKind::Cached, 10, 2, 0),
            mk(ExportKind::Swap, 0, 0, 3),
        ];
        assert_eq!(daemon_sectors(&v), (10, 26));
    }
}
