//! The density experiment: how many guests start and stay healthy within a host memory
//! budget: static partitioning, the modern stack (free page reporting, host swap with
//! zswap, KSM), self-ballooning + tmem, and both; once with idle guests and once with
//! guests that each run a light steady workload ([`DensityWorkload`]).
//!
//! The budget is a memory cgroup limit on the QEMU processes (and tmemd, whose pool is
//! host memory too). Static partitioning = each guest's memory is allocated up front
//! (`-mem-prealloc`, like Xen's partitioning). Self-ballooning + tmem = no preallocation,
//! tmemd's selfballoon policy shrinks every guest, swap goes to a tmemd `swap` export.
//! Guests are launched one after another (as the 2008 paper's dom0 script did), each given
//! a few seconds to settle; launching stops at the first guest that fails to boot or when
//! any running guest dies (the cgroup OOM killer), then all must survive a hold period.
//!
//! Light guests read their data disk (a tmem `cached` export in the tmem modes, the
//! image file with `cache=none` otherwise) and print one `LAB-CYCLE` line per cycle; a
//! light guest whose cycles stop, or whose kernel's OOM killer ran, is not healthy, and
//! the pass reports the workload's slowdown ([`crate::cycles`]).

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tmem_api::{CreateExport, ExportKind, Size};
use tmem_vm::{Drive, Guest, GuestConfig, GuestImage, MemCgroup};

use crate::cycles::{cycle_stats, CycleStats, CycleWatch};
use crate::hoststack::ModernStack;
use crate::image::{self, WorkParams, MARK_WAIT};
use crate::procstat;
use crate::tmemd::{Daemon, DaemonOpts};
use crate::Params;

/// How the guests of one density mode are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DensityKind {
    /// Guest RAM allocated up front (`-mem-prealloc`), file swap.
    Static,
    /// No preallocation; free page reporting; host swap file with zswap and KSM on.
    Modern,
    /// tmemd's selfballoon policy and a tmem swap export per guest.
    SelfballoonTmem,
    /// Both.
    ModernTmem,
}

impl DensityKind {
    /// Every mode, in table order.
    pub const ALL: [DensityKind; 4] = [
        DensityKind::Static,
        DensityKind::Modern,
        DensityKind::SelfballoonTmem,
        DensityKind::ModernTmem,
    ];

    /// The name in tables and results.json.
    pub fn name(self) -> &'static str {
        match self {
            DensityKind::Static => "static",
            DensityKind::Modern => "modern",
            DensityKind::SelfballoonTmem => "selfballoon+tmem",
            DensityKind::ModernTmem => "modern+tmem",
        }
    }

    fn tmem(self) -> bool {
        matches!(self, DensityKind::SelfballoonTmem | DensityKind::ModernTmem)
    }

    fn modern(self) -> bool {
        matches!(self, DensityKind::Modern | DensityKind::ModernTmem)
    }

    fn short(self) -> &'static str {
        match self {
            DensityKind::Static => "s",
            DensityKind::Modern => "m",
            DensityKind::SelfballoonTmem => "t",
            DensityKind::ModernTmem => "mt",
        }
    }
}

/// What every guest of a density pass runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DensityWorkload {
    /// Nothing: the guest boots and waits.
    #[default]
    Idle,
    /// A steady cycle of a file scan of the data disk plus one allocation, then a sleep
    /// (`tmem-work light`).
    Light,
}

impl DensityWorkload {
    /// Both, in report order.
    pub const ALL: [DensityWorkload; 2] = [DensityWorkload::Idle, DensityWorkload::Light];

    /// The name in flags, tables and results.json.
    pub fn name(self) -> &'static str {
        match self {
            DensityWorkload::Idle => "idle",
            DensityWorkload::Light => "light",
        }
    }

    /// Parses a name (`idle`, `light`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }
}

/// The light workload's parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LightParams {
    /// Most guests tried per mode.
    pub max: u32,
    /// Files of the data disk read per cycle (a seeded subset per guest), MiB.
    pub scan_mib: u32,
    /// Allocated and written once per cycle, MiB.
    pub alloc_mib: u32,
    /// Sleep after each cycle, ms.
    pub sleep_ms: u32,
    /// Seconds every guest count is measured (the settle period of the light pass).
    pub window_secs: u64,
    /// A guest without a new cycle for this long is not healthy, seconds.
    pub stall_secs: u64,
}

impl Default for LightParams {
    /// The full run's defaults.
    fn default() -> Self {
        Self {
            max: 16,
            scan_mib: 16,
            alloc_mib: 32,
            sleep_ms: 1000,
            window_secs: 20,
            stall_secs: 60,
        }
    }
}

/// One mode's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DensityMode {
    /// `static` or `selfballoon+tmem`.
    pub mode: String,
    /// Guests launched.
    pub tried: u32,
    /// Guests that booted.
    pub booted: u32,
    /// Guests alive and healthy at the end of the hold period.
    pub healthy: u32,
    /// Most guests that were all alive after a settle period (the last stable count
    /// before launching stopped).
    #[serde(default)]
    pub last_stable: u32,
    /// Peak memory charged to the budget, bytes.
    pub peak_bytes: u64,
    /// Why launching stopped.
    pub stop_reason: String,
    /// The light workload's cycle times and slowdown (light passes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycles: Option<CycleStats>,
}

/// One pass of the experiment (every mode, one workload).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DensityResult {
    /// Budget, MiB.
    pub budget_mib: u64,
    /// Memory of each guest, MiB.
    pub guest_mib: u32,
    /// How the budget is enforced.
    pub enforcement: String,
    /// Static partitioning.
    pub static_mode: DensityMode,
    /// Self-ballooning + tmem.
    pub tmem_mode: DensityMode,
    /// The modern stack (absent in results of older runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modern_mode: Option<DensityMode>,
    /// The modern stack + self-ballooning + tmem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modern_tmem_mode: Option<DensityMode>,
    /// tmem last stable count / static last stable count.
    pub ratio: f64,
    /// What the guests ran (`idle` in results of older runs).
    #[serde(default)]
    pub workload: DensityWorkload,
    /// The light workload's parameters (light passes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub light: Option<LightParams>,
}

impl DensityResult {
    /// Every mode that ran, in table order.
    pub fn modes(&self) -> Vec<&DensityMode> {
        let mut v = vec![&self.static_mode];
        v.extend(self.modern_mode.as_ref());
        v.push(&self.tmem_mode);
        v.extend(self.modern_tmem_mode.as_ref());
        v
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("—".into(), |x| format!("{x:.0}"))
}

/// The table row of one mode.
fn mode_row(workload: DensityWorkload, x: &DensityMode) -> String {
    let (alone, stable, slow, steps) = match &x.cycles {
        Some(c) => (
            fmt_ms(c.alone_ms),
            fmt_ms(c.stable_ms),
            c.slowdown.map_or("—".into(), |s| format!("**{s:.2}×**")),
            c.steps
                .iter()
                .map(|s| format!("{:.0}", s.median_ms))
                .collect::<Vec<_>>()
                .join(" / "),
        ),
        None => ("—".into(), "—".into(), "—".into(), "—".into()),
    };
    format!(
        "| {} | {} | {} | {} | **{}** | {} | {:.0} | {alone} | {stable} | {slow} | {steps} | {} |",
        workload.name(),
        x.mode,
        x.tried,
        x.booted,
        x.last_stable,
        x.healthy,
        x.peak_bytes as f64 / 1048576.0,
        x.stop_reason
    )
}

/// The "density gain" sentence of one pass.
fn gain_line(d: &DensityResult) -> String {
    format!(
        "Density gain of self-ballooning + tmem, {} guests: **{:.1}×** static partitioning{}.",
        d.workload.name(),
        d.ratio,
        match &d.modern_mode {
            Some(m) if m.last_stable > 0 => format!(
                ", **{:.1}×** the modern stack",
                f64::from(d.tmem_mode.last_stable) / f64::from(m.last_stable)
            ),
            _ => String::new(),
        }
    )
}

/// What the light guests run and how the slowdown is defined.
fn light_text(l: &LightParams) -> String {
    format!(
        "Light guests each run a steady cycle (`tmem-work light`): read a seeded {} MiB subset of the files of the data disk (a tmem `cached` export in the tmem modes, the image file with `cache=none` otherwise), write every page of a {} MiB allocation once and free it, then sleep {} ms; each cycle prints its work time. **Slowdown** = the median cycle time of all guests in the window at the last stable count ÷ the median cycle time of the first guest while it ran alone. A window is the {} s after a guest count is reached (every guest booted and started), plus the hold period when launching stopped at the most guests tried (here {}); each guest's first {} cycles (warm-up) and its first cycle in every window (it may have started earlier) are dropped. \"Cycle ms at 1 / 2 / … guests\" is the median of every stable count's window; a slowdown below 1 means the first guest's cycles while alone (its first seconds after boot) were slower than later ones. A light guest with no new cycle for {} s, or whose kernel's OOM killer ran, is not healthy: launching stops there.",
        l.scan_mib,
        l.alloc_mib,
        l.sleep_ms,
        l.window_secs,
        l.max,
        crate::cycles::WARMUP_CYCLES,
        l.stall_secs
    )
}

/// Markdown section for every pass that ran (idle, light).
pub fn markdown(passes: &[&DensityResult]) -> String {
    let mut m = String::new();
    let Some(first) = passes.first() else {
        return m;
    };
    let _ = writeln!(
        m,
        "{} MiB guests within a {} MiB host budget ({}): {}. The 2008 paper (idle guests): 3 → 7 guests on 2 GB (14 with aggressive settings).\n",
        first.guest_mib,
        first.budget_mib,
        first.enforcement,
        passes
            .iter()
            .map(|d| match d.workload {
                DensityWorkload::Idle => "idle",
                DensityWorkload::Light => "each running a light steady workload",
            })
            .collect::<Vec<_>>()
            .join("; then ")
    );
    let _ = writeln!(
        m,
        "| workload | mode | launched | booted | last stable count | healthy at end | peak charged MiB | cycle ms alone | cycle ms at stable count | slowdown | cycle ms at 1 / 2 / … guests | stopped because |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for d in passes {
        for x in d.modes() {
            let _ = writeln!(m, "{}", mode_row(d.workload, x));
        }
    }
    let _ = writeln!(m);
    for d in passes {
        let _ = writeln!(m, "{}\n", gain_line(d));
    }
    let _ = writeln!(
        m,
        "Gains are ratios of the last stable counts (the most guests that all ran together through a settle period; launching one more made the cgroup OOM killer kill some, or a light guest stall). \"Healthy at end\" counts the survivors after that last launch and the hold period."
    );
    if let Some(l) = passes.iter().find_map(|d| d.light.as_ref()) {
        let _ = writeln!(m, "\n{}", light_text(l));
    }
    m
}

/// Memory charged: the cgroup's usage, or the sum of RSS without a cgroup.
struct Budget {
    cg: Option<MemCgroup>,
}

impl Budget {
    fn usage(&self, pids: &[u32]) -> u64 {
        if let Some(cg) = &self.cg {
            if let Ok(u) = cg.usage() {
                return u;
            }
        }
        pids.iter().filter_map(|p| procstat::rss_bytes(*p)).sum()
    }
}

/// What every density pass needs besides the parameters.
#[derive(Debug, Clone)]
pub struct DensityEnv {
    /// The guest image.
    pub image: GuestImage,
    /// The data image (light guests read it).
    pub data_image: PathBuf,
    /// The tmemd binary.
    pub tmemd: PathBuf,
    /// Scratch directory (short path: Unix sockets live here).
    pub scratch: PathBuf,
    /// Where light guests' console logs are copied (if any).
    pub logs: Option<PathBuf>,
}

/// One pass's settings, resolved from [`Params`].
struct Pass<'a> {
    p: &'a Params,
    env: &'a DensityEnv,
    workload: DensityWorkload,
    light: Option<&'a LightParams>,
}

impl Pass<'_> {
    /// Most guests tried per mode.
    fn max(&self) -> u32 {
        self.light.map_or(self.p.density_max, |l| l.max)
    }

    /// The flag that sets [`Pass::max`].
    fn max_flag(&self) -> &'static str {
        if self.light.is_some() {
            "--density-light-max"
        } else {
            "--density-max"
        }
    }

    /// How long every guest count must last before the next launch.
    fn settle(&self) -> Duration {
        let s = if self.p.quick { 4 } else { 8 };
        Duration::from_secs(self.light.map_or(s, |l| l.window_secs.max(s)))
    }

    /// Short tag in scratch paths and cgroup names.
    fn tag(&self, kind: DensityKind) -> String {
        match self.workload {
            DensityWorkload::Idle => format!("d{}", kind.short()),
            DensityWorkload::Light => format!("l{}", kind.short()),
        }
    }
}

/// Guests of one mode and what they need. Field order = drop order: guests first, then
/// the daemon, then the host stack.
struct Live {
    guests: Vec<Guest>,
    gos: Vec<UnixStream>,
    daemon: Option<Daemon>,
    stack: Option<ModernStack>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(d) = &self.daemon {
            for g in &self.guests {
                let _ = d.api().delete(&format!("/guests/{}", g.name()));
            }
        }
        self.gos.clear();
        self.guests.clear();
        self.daemon = None;
    }
}

impl Live {
    fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.guests.iter().map(Guest::pid).collect();
        v.extend(self.daemon.as_ref().map(Daemon::pid));
        v
    }

    fn consoles(&self) -> Vec<String> {
        self.guests.iter().map(Guest::console_text).collect()
    }
}

/// What one mode samples while its guests run.
struct Meter {
    budget: Budget,
    /// The mode runs the modern stack itself.
    modern: bool,
    /// Peak memory charged, bytes.
    peak: u64,
    /// Another run's modern stack (host swap, zswap, KSM) was seen on.
    foreign_stack: bool,
}

impl Meter {
    /// Samples the budget's usage (and light guests' cycles) for `dur`.
    fn watch(&mut self, live: &Live, cycles: &mut Option<CycleWatch>, dur: Duration) {
        let t = Instant::now();
        loop {
            self.peak = self.peak.max(self.budget.usage(&live.pids()));
            self.foreign_stack |= !self.modern && crate::hoststack::stack_on();
            if let Some(c) = cycles.as_mut() {
                c.poll(&live.consoles());
            }
            if t.elapsed() >= dur {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Appended to the stop reason of a mode that did not have the host to itself.
const FOREIGN_STACK: &str = "; another tmem-lab run's modern stack (host swap, zswap, KSM) was on meanwhile: not comparable";

/// How `tmem-work light` reports that it gave up (on stderr, the console).
const LIGHT_FAILED: &str = "tmem-work light: ";

/// Whether a guest's kernel reported running its OOM killer.
fn guest_oom(g: &Guest) -> bool {
    g.console_text().contains("Out of memory")
}

/// Why the guests are not all healthy after launching guest `n` (`None`: they are).
fn unhealthy(live: &Live, cycles: Option<&CycleWatch>, n: u32, stall: u64) -> Option<String> {
    let dead = live.guests.iter().filter(|g| !g.is_running()).count();
    if dead > 0 {
        return Some(format!(
            "{dead} guest(s) died (OOM) after launching guest {n}"
        ));
    }
    let cycles = cycles?;
    for (k, g) in live.guests.iter().enumerate() {
        if let Some(l) = g.console_text().lines().find(|l| l.contains(LIGHT_FAILED)) {
            return Some(format!("guest {}'s workload failed: {}", k + 1, l.trim()));
        }
    }
    if let Some(g) = live.guests.iter().position(guest_oom) {
        return Some(format!(
            "guest {}'s OOM killer ran after launching guest {n}",
            g + 1
        ));
    }
    let stalled = cycles.stalled();
    (!stalled.is_empty()).then(|| {
        format!(
            "{} guest(s)' cycles stalled (none for {stall} s) after launching guest {n}",
            stalled.len()
        )
    })
}

/// The budget's cgroup (or none: RSS is compared instead) and how it is enforced.
fn make_budget(name: &str, budget: u64) -> (Budget, String) {
    let cg = match MemCgroup::create(name, Some(budget)) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("tmem-lab: density: no memory cgroup ({e}); comparing the sum of QEMU RSS with the budget instead");
            None
        }
    };
    let enforcement = match &cg {
        Some(c) if c.is_v2() => "cgroup v2 memory.max on QEMU + tmemd".to_string(),
        Some(_) => "cgroup v1 memory.limit_in_bytes on QEMU + tmemd (this host has no cgroup v2 memory controller)".to_string(),
        None => "sum of QEMU + tmemd RSS compared with the budget (no memory cgroup)".to_string(),
    };
    (Budget { cg }, enforcement)
}

/// A tmemd export for guest `i`.
fn add_export(
    d: &Daemon,
    name: String,
    i: u32,
    kind: ExportKind,
    image: Option<&Path>,
) -> Result<()> {
    let cached = kind == ExportKind::Cached;
    d.api().post(
        "/exports",
        &CreateExport {
            name,
            kind,
            size: (!cached).then_some(Size(256 << 20)),
            image: image.map(Path::to_path_buf),
            client: Some(i + 1),
            codec: None,
            dedup: None,
            direct_io: cached.then_some(true),
            access: Default::default(),
            tenant_key: None,
            writable: None,
        },
    )
}

/// Guest `i`'s swap disk and, for light guests, its data disk.
fn guest_drives(pass: &Pass, live: &Live, i: u32, gname: &str, gdir: &Path) -> Result<Vec<Drive>> {
    let light = pass.light.is_some();
    let data = &pass.env.data_image;
    if let Some(d) = &live.daemon {
        add_export(d, format!("{gname}-swap"), i, ExportKind::Swap, None)?;
        let mut v = vec![Drive::nbd(d.nbd_socket(), format!("{gname}-swap"))];
        if light {
            add_export(
                d,
                format!("{gname}-data"),
                i,
                ExportKind::Cached,
                Some(data),
            )?;
            v.push(Drive::nbd(d.nbd_socket(), format!("{gname}-data")).read_only());
        }
        return Ok(v);
    }
    let f = gdir.join("swap.img");
    std::fs::File::create(&f)?.set_len(256 << 20)?;
    let mut v = vec![Drive::file(&f).cache("none")];
    if light {
        v.push(Drive::file(data).read_only().cache("none"));
    }
    Ok(v)
}

/// Guest `i`'s configuration.
fn guest_config(
    pass: &Pass,
    kind: DensityKind,
    i: u32,
    gdir: &Path,
    drives: Vec<Drive>,
    cgroup: Option<&Path>,
) -> GuestConfig {
    let p = pass.p;
    let mut cfg = GuestConfig::new(&format!("d{i}"))
        .memory_mib(p.density_guest_mib)
        .accel(tmem_vm::Accel::parse(&p.accel).unwrap_or(tmem_vm::Accel::Tcg))
        .tcg_tb_mib((p.tcg_tb_mib > 0).then_some(p.tcg_tb_mib))
        .agent_path(gdir.join("ag.sock"))
        .qmp_path(gdir.join("q.sock"))
        .run_dir(gdir)
        .deflate_on_oom(kind.tmem())
        .free_page_reporting(kind.modern())
        .image(pass.env.image.clone())
        .serial_port(image::PORT_GO, gdir.join("go.sock"));
    for d in drives {
        cfg = cfg.drive(d);
    }
    if kind == DensityKind::Static {
        cfg = cfg.extra_arg("-mem-prealloc");
    }
    if let Some(c) = cgroup {
        cfg = cfg.cgroup(c);
    }
    let mut work = WorkParams {
        work: "idle".into(),
        seed: p.seed + u64::from(i),
        jobs: 1,
        rounds: 1,
        wpass: 1,
        eat_mib: 1,
        eat_rounds: 1,
        eat_sleep_ms: 0,
        res_shared_mib: 0,
        res_private_mib: 0,
    };
    if let Some(l) = pass.light {
        work.work = "light".into();
        work.eat_mib = l.alloc_mib;
        work.eat_sleep_ms = l.sleep_ms;
        cfg = cfg.cmdline(&format!("lab.scanmib={}", l.scan_mib));
    }
    for a in image::kernel_args(&work) {
        cfg = cfg.cmdline(&a);
    }
    cfg
}

/// Copies the guests' console logs into `logs` (best effort).
fn save_consoles(live: &Live, logs: Option<&Path>, tag: &str) {
    let Some(dir) = logs else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    for g in &live.guests {
        let _ = std::fs::copy(
            g.console_log(),
            dir.join(format!("density-{tag}-{}.console.log", g.name())),
        );
    }
}

/// Launches guest `i`, waits for it to boot and starts it. `Err(reason)` stops launching.
fn launch_one(
    pass: &Pass,
    kind: DensityKind,
    live: &mut Live,
    b: &Budget,
    dir: &Path,
    i: u32,
) -> Result<std::result::Result<(), String>> {
    let gname = format!("d{i}");
    let gdir = dir.join(&gname);
    std::fs::create_dir_all(&gdir)?;
    let drives = guest_drives(pass, live, i, &gname, &gdir)?;
    let cfg = guest_config(
        pass,
        kind,
        i,
        &gdir,
        drives,
        b.cg.as_ref().map(MemCgroup::path),
    );
    eprintln!(
        "tmem-lab: density {} ({}): launching guest {}",
        kind.name(),
        pass.workload.name(),
        i + 1
    );
    let g = match cfg.launch() {
        Ok(g) => g,
        Err(e) => return Ok(Err(format!("guest {} failed to launch: {e}", i + 1))),
    };
    let booted = g.wait_for_console(MARK_WAIT, Duration::from_secs(180));
    live.guests.push(g);
    if let Err(e) = booted {
        return Ok(Err(format!(
            "guest {} did not boot: {}",
            i + 1,
            first_line(&e.to_string())
        )));
    }
    if let Ok(mut s) = UnixStream::connect(gdir.join("go.sock")) {
        let _ = s.write_all(b"go\n");
        live.gos.push(s);
    }
    if let Some(d) = &live.daemon {
        let g = live.guests.last().context("no guest")?;
        d.add_selfballoon_guest(&gname, g)?;
    }
    Ok(Ok(()))
}

/// Whether another `tmem-lab` process runs on this host.
fn another_lab_running() -> bool {
    let me = std::process::id().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let pid = e.file_name();
        pid.to_str() != Some(me.as_str())
            && std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end() == "tmem-lab")
    })
}

/// Waits (at most `limit`) while another running lab has its modern stack on: enabling
/// ours would first undo its settings. Returns whether it was still on.
fn wait_for_foreign_stack(limit: Duration) -> bool {
    let t = Instant::now();
    let mut told = false;
    while crate::hoststack::stack_on() && another_lab_running() {
        if t.elapsed() >= limit {
            return true;
        }
        if !std::mem::replace(&mut told, true) {
            eprintln!("tmem-lab: density: another tmem-lab run has the modern stack on; waiting for it (at most {} s)", limit.as_secs());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    false
}

/// The host side of a mode: the modern stack and tmemd, as the mode asks.
fn start_host(p: &Params, kind: DensityKind, b: &Budget, tmemd: &Path, dir: &Path) -> Result<Live> {
    let budget = p.host_budget_mib << 20;
    let mut live = Live {
        guests: Vec::new(),
        gos: Vec::new(),
        daemon: None,
        stack: None,
    };
    if kind.modern() {
        live.stack = Some(ModernStack::enable(
            &p.swap_dir,
            budget,
            &crate::hoststack::ZSWAP_COMPRESSORS,
        )?);
    }
    if kind.tmem() {
        live.daemon = Some(Daemon::start(&DaemonOpts {
            bin: tmemd.to_path_buf(),
            state_dir: dir.join("d"),
            budget: budget / 4,
            codec: "lz4".into(),
            dedup: "global".into(),
            balloon_interval_ms: p.balloon_interval_ms,
            cgroup: b.cg.as_ref().map(|c| c.path().to_path_buf()),
            // As in the recorded runs: the balloon manager sizes the pool from host RAM
            // (the cgroup limit bounds it); the main table passes the budget instead.
            host_total: None,
            host_reserve: None,
            pool_min: 0,
        })?);
    }
    Ok(live)
}

/// Guests alive, booted and (light) still cycling without an OOM kill at the end.
fn count_healthy(live: &Live, cycles: Option<&CycleWatch>) -> (u32, u32) {
    let stalled = cycles.map(CycleWatch::stalled).unwrap_or_default();
    let healthy = live
        .guests
        .iter()
        .enumerate()
        .filter(|(i, g)| {
            g.is_running()
                && g.console_text().contains(MARK_WAIT)
                && !guest_oom(g)
                && !stalled.contains(i)
        })
        .count() as u32;
    (healthy, stalled.len() as u32)
}

/// One mode's outcome while it is measured.
struct ModeRun {
    mode: DensityMode,
    /// The light guests' cycles (light passes only).
    cycles: Option<CycleWatch>,
    /// Cycle times of each guest count's window (index: guests − 1).
    by_count: Vec<Vec<f64>>,
}

/// Launches guests one after another until one fails, the guests stop being healthy or
/// the pass's maximum is reached; sets the counts and the stop reason.
fn launch_until_unstable(
    pass: &Pass,
    kind: DensityKind,
    live: &mut Live,
    meter: &mut Meter,
    run: &mut ModeRun,
    dir: &Path,
) -> Result<()> {
    let budget = pass.p.host_budget_mib << 20;
    let stall = pass.light.map_or(0, |l| l.stall_secs);
    for i in 0..pass.max() {
        let mode = &mut run.mode;
        mode.tried += 1;
        if let Err(reason) = launch_one(pass, kind, live, &meter.budget, dir, i)? {
            mode.stop_reason = reason;
            return Ok(());
        }
        mode.booted += 1;
        if let Some(c) = run.cycles.as_mut() {
            c.add_guest();
            c.begin_window(&live.consoles());
        }
        meter.watch(live, &mut run.cycles, pass.settle());
        run.by_count
            .extend(run.cycles.as_ref().map(|c| c.window().to_vec()));
        if let Some(r) = unhealthy(live, run.cycles.as_ref(), i + 1, stall) {
            run.mode.stop_reason = r;
            return Ok(());
        }
        if meter.budget.cg.is_none() && meter.budget.usage(&live.pids()) > budget {
            run.mode.stop_reason = format!("RSS over budget after guest {}", i + 1);
            return Ok(());
        }
        run.mode.last_stable = i + 1;
    }
    Ok(())
}

/// The hold period: every guest must stay healthy; counts the healthy ones at its end.
fn hold_and_count(pass: &Pass, live: &Live, meter: &mut Meter, run: &mut ModeRun) {
    let budget = pass.p.host_budget_mib << 20;
    let mode = &mut run.mode;
    // The hold is at the last stable count when every launched guest was stable.
    let hold_is_stable = mode.tried == mode.last_stable && mode.last_stable > 0;
    if let Some(c) = run.cycles.as_mut() {
        c.begin_window(&live.consoles());
    }
    let hold = Duration::from_secs(pass.p.density_hold_secs);
    meter.watch(live, &mut run.cycles, hold);
    if let (Some(c), true) = (&run.cycles, hold_is_stable) {
        if let Some(w) = run.by_count.get_mut(mode.last_stable as usize - 1) {
            w.extend_from_slice(c.window());
        }
    }
    mode.peak_bytes = meter.peak;
    let over = meter.budget.cg.is_none() && meter.budget.usage(&live.pids()) > budget;
    let (healthy, stalled) = count_healthy(live, run.cycles.as_ref());
    mode.healthy = healthy;
    if over {
        // Without a cgroup nobody is killed: count only as many guests as fit.
        let per = mode.peak_bytes / u64::from(mode.healthy.max(1));
        mode.healthy = (budget / per.max(1)) as u32;
    }
    if pass.light.is_some() {
        mode.cycles = Some(cycle_stats(&run.by_count, mode.last_stable, stalled));
    }
}

fn run_mode(pass: &Pass, kind: DensityKind) -> Result<(DensityMode, String)> {
    let p = pass.p;
    let tag = pass.tag(kind);
    let dir = pass.env.scratch.join(&tag);
    std::fs::create_dir_all(&dir)?;
    let (budget, enforcement) = make_budget(
        &format!("tmem-lab-{}-{tag}", std::process::id()),
        p.host_budget_mib << 20,
    );
    let mut meter = Meter {
        budget,
        modern: kind.modern(),
        peak: 0,
        // Enabling ours would first undo another run's stack.
        foreign_stack: kind.modern() && wait_for_foreign_stack(Duration::from_secs(900)),
    };
    let mut live = start_host(p, kind, &meter.budget, &pass.env.tmemd, &dir)?;
    let mut run = ModeRun {
        mode: DensityMode {
            mode: kind.name().into(),
            tried: 0,
            booted: 0,
            healthy: 0,
            last_stable: 0,
            peak_bytes: 0,
            stop_reason: format!("reached {} {}", pass.max_flag(), pass.max()),
            cycles: None,
        },
        cycles: pass
            .light
            .map(|l| CycleWatch::new(Duration::from_secs(l.stall_secs))),
        by_count: Vec::new(),
    };
    launch_until_unstable(pass, kind, &mut live, &mut meter, &mut run, &dir)?;
    hold_and_count(pass, &live, &mut meter, &mut run);
    if meter.foreign_stack {
        run.mode.stop_reason.push_str(FOREIGN_STACK);
    }
    if pass.light.is_some() {
        save_consoles(&live, pass.env.logs.as_deref(), &tag);
    }
    // Guests, tmemd and the host stack before the budget's cgroup.
    drop(live);
    drop(meter);
    Ok((run.mode, enforcement))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Runs every mode with `workload` guests, one after another under the same budget.
pub fn run_density(
    p: &Params,
    env: &DensityEnv,
    workload: DensityWorkload,
) -> Result<DensityResult> {
    let pass = Pass {
        p,
        env,
        workload,
        light: (workload == DensityWorkload::Light).then_some(&p.density_light),
    };
    let mut out = Vec::new();
    let mut enforcement = String::new();
    for kind in DensityKind::ALL {
        let (m, e) = run_mode(&pass, kind)?;
        eprintln!(
            "tmem-lab: density {} ({}): {} stable, {} healthy ({}){}",
            kind.name(),
            workload.name(),
            m.last_stable,
            m.healthy,
            m.stop_reason,
            m.cycles
                .as_ref()
                .and_then(|c| c.slowdown)
                .map_or(String::new(), |s| format!("; slowdown {s:.2}×"))
        );
        enforcement = e;
        out.push(m);
    }
    let _ = std::fs::remove_dir_all(&env.scratch);
    let mut it = out.into_iter();
    let (Some(s), Some(modern), Some(t), Some(mt)) = (it.next(), it.next(), it.next(), it.next())
    else {
        anyhow::bail!("density: a mode is missing");
    };
    Ok(DensityResult {
        budget_mib: p.host_budget_mib,
        guest_mib: p.density_guest_mib,
        enforcement,
        ratio: if s.last_stable > 0 {
            f64::from(t.last_stable) / f64::from(s.last_stable)
        } else {
            f64::from(t.last_stable)
        },
        static_mode: s,
        tmem_mode: t,
        modern_mode: Some(modern),
        modern_tmem_mode: Some(mt),
        workload,
        light: pass.light.cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cycles::CycleStep;

    fn mode(name: &str, stable: u32, cycles: Option<CycleStats>) -> DensityMode {
        DensityMode {
            mode: name.into(),
            tried: stable + 1,
            booted: stable + 1,
            healthy: stable,
            last_stable: stable,
            peak_bytes: 900 << 20,
            stop_reason: "1 guest(s) died (OOM) after launching guest 3".into(),
            cycles,
        }
    }

    fn result(workload: DensityWorkload) -> DensityResult {
        let light = workload == DensityWorkload::Light;
        let c = |s: f64| {
            light.then(|| CycleStats {
                alone_ms: Some(200.0),
                stable_ms: Some(200.0 * s),
                slowdown: Some(s),
                steps: [200.0, 200.0 * s]
                    .iter()
                    .enumerate()
                    .map(|(k, &median_ms)| CycleStep {
                        guests: k as u32 + 1,
                        cycles: 5,
                        median_ms,
                    })
                    .collect(),
                stalled: 0,
            })
        };
        DensityResult {
            budget_mib: 1024,
            guest_mib: 512,
            enforcement: "cgroup v2".into(),
            static_mode: mode("static", 1, c(1.0)),
            modern_mode: Some(mode("modern", 4, c(1.5))),
            tmem_mode: mode("selfballoon+tmem", 3, c(1.25)),
            modern_tmem_mode: Some(mode("modern+tmem", 4, c(1.75))),
            ratio: 3.0,
            workload,
            light: light.then(LightParams::default),
        }
    }

    #[test]
    fn workload_names_round_trip() {
        for w in DensityWorkload::ALL {
            assert_eq!(DensityWorkload::parse(w.name()), Some(w));
        }
        assert_eq!(DensityWorkload::parse("busy"), None);
    }

    #[test]
    fn old_results_without_workload_parse_as_idle() {
        let mut v = serde_json::to_value(result(DensityWorkload::Idle)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("workload");
        assert!(!o.contains_key("light"), "None is not written");
        let d: DensityResult = serde_json::from_value(v).unwrap();
        assert_eq!(d.workload, DensityWorkload::Idle);
        assert!(d.modes().iter().all(|m| m.cycles.is_none()));
        let l = result(DensityWorkload::Light);
        let back: DensityResult =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn markdown_has_a_row_per_workload_and_mode() {
        let (i, l) = (
            result(DensityWorkload::Idle),
            result(DensityWorkload::Light),
        );
        let md = markdown(&[&i, &l]);
        assert!(md.contains("| idle | static | 2 | 2 | **1** | 1 | 900 | — | — | — | — |"));
        assert!(md.contains(
            "| light | modern | 5 | 5 | **4** | 4 | 900 | 200 | 300 | **1.50×** | 200 / 300 |"
        ));
        assert!(md.contains("Density gain of self-ballooning + tmem, idle guests: **3.0×** static partitioning, **0.8×** the modern stack."));
        assert!(md.contains("Density gain of self-ballooning + tmem, light guests"));
        assert!(md.contains("**Slowdown** = the median cycle time"));
        assert_eq!(md.matches("| light |").count(), 4);
        assert!(markdown(&[]).is_empty());
        assert!(!markdown(&[&i]).contains("Slowdown"));
    }
}
