//! The density experiment: how many idle guests start and stay healthy within a host
//! memory budget: static partitioning, the modern stack (free page reporting, host swap
//! with zswap, KSM), self-ballooning + tmem, and both.
//!
//! The budget is a memory cgroup limit on the QEMU processes (and tmemd, whose pool is
//! host memory too). Static partitioning = each guest's memory is allocated up front
//! (`-mem-prealloc`, like Xen's partitioning). Self-ballooning + tmem = no preallocation,
//! tmemd's selfballoon policy shrinks every guest, swap goes to a tmemd `swap` export.
//! Guests are launched one after another (as the 2008 paper's dom0 script did), each given
//! a few seconds to settle; launching stops at the first guest that fails to boot or when
//! any running guest dies (the cgroup OOM killer), then all must survive a hold period.

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tmem_api::{CreateExport, CreateGuest, ExportKind, PolicyName, Size};
use tmem_vm::{Drive, Guest, GuestConfig, GuestImage, MemCgroup};

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
}

/// The experiment's result.
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

/// Markdown section.
pub fn markdown(d: &DensityResult) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "Idle {} MiB guests within a {} MiB host budget ({}). The 2008 paper: 3 → 7 guests on 2 GB (14 with aggressive settings).\n",
        d.guest_mib, d.budget_mib, d.enforcement
    );
    let _ = writeln!(
        m,
        "| mode | launched | booted | last stable count | healthy at end | peak charged MiB | stopped because |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    for x in d.modes() {
        let _ = writeln!(
            m,
            "| {} | {} | {} | **{}** | {} | {:.0} | {} |",
            x.mode,
            x.tried,
            x.booted,
            x.last_stable,
            x.healthy,
            x.peak_bytes as f64 / 1048576.0,
            x.stop_reason
        );
    }
    let _ = writeln!(
        m,
        "\nDensity gain of self-ballooning + tmem: **{:.1}×** static partitioning{}, from the last stable counts (the most guests that all ran together through a settle period; launching one more made the cgroup OOM killer kill some). \"Healthy at end\" counts the survivors after that last launch and the hold period.",
        d.ratio,
        match &d.modern_mode {
            Some(m) if m.last_stable > 0 => format!(
                ", **{:.1}×** the modern stack",
                f64::from(d.tmem_mode.last_stable) / f64::from(m.last_stable)
            ),
            _ => String::new(),
        }
    );
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

fn run_mode(
    p: &Params,
    image: &GuestImage,
    tmemd: &Path,
    scratch: &Path,
    kind: DensityKind,
) -> Result<(DensityMode, String)> {
    let budget = p.host_budget_mib << 20;
    let tmem = kind.tmem();
    let name = kind.name();
    let dir = scratch.join(format!("d{}", kind.short()));
    std::fs::create_dir_all(&dir)?;
    let cg = match MemCgroup::create(
        &format!("tmem-lab-{}-d{}", std::process::id(), kind.short()),
        Some(budget),
    ) {
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
    let b = Budget { cg };
    // Field order = drop order: guests first, then the daemon, then the host stack.
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
    if tmem {
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
    let mut mode = DensityMode {
        mode: name.into(),
        tried: 0,
        booted: 0,
        healthy: 0,
        last_stable: 0,
        peak_bytes: 0,
        stop_reason: format!("reached --density-max {}", p.density_max),
    };
    let settle = Duration::from_secs(if p.quick { 4 } else { 8 });
    let pids = |l: &Live| -> Vec<u32> {
        let mut v: Vec<u32> = l.guests.iter().map(Guest::pid).collect();
        if let Some(d) = &l.daemon {
            v.push(d.pid());
        }
        v
    };
    for i in 0..p.density_max {
        let gname = format!("d{i}");
        let gdir = dir.join(&gname);
        std::fs::create_dir_all(&gdir)?;
        let swap_bytes = 256u64 << 20;
        let swap = if let Some(d) = &live.daemon {
            d.api().post(
                "/exports",
                &CreateExport {
                    name: format!("{gname}-swap"),
                    kind: ExportKind::Swap,
                    size: Some(Size(swap_bytes)),
                    image: None,
                    client: Some(i + 1),
                    codec: None,
                    dedup: None,
                    direct_io: None,
                    access: Default::default(),
                    tenant_key: None,
                    writable: None,
                },
            )?;
            Drive::nbd(d.nbd_socket(), format!("{gname}-swap"))
        } else {
            let f = gdir.join("swap.img");
            std::fs::File::create(&f)?.set_len(swap_bytes)?;
            Drive::file(&f).cache("none")
        };
        let go = gdir.join("go.sock");
        let mut cfg = GuestConfig::new(&gname)
            .memory_mib(p.density_guest_mib)
            .accel(tmem_vm::Accel::parse(&p.accel).unwrap_or(tmem_vm::Accel::Tcg))
            .tcg_tb_mib((p.tcg_tb_mib > 0).then_some(p.tcg_tb_mib))
            .agent_path(gdir.join("ag.sock"))
            .qmp_path(gdir.join("q.sock"))
            .run_dir(&gdir)
            .deflate_on_oom(tmem)
            .free_page_reporting(kind.modern())
            .image(image.clone())
            .drive(swap)
            .serial_port(image::PORT_GO, &go);
        if kind == DensityKind::Static {
            cfg = cfg.extra_arg("-mem-prealloc");
        }
        if let Some(c) = &b.cg {
            cfg = cfg.cgroup(c.path());
        }
        let work = WorkParams {
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
        for a in image::kernel_args(&work) {
            cfg = cfg.cmdline(&a);
        }
        mode.tried += 1;
        eprintln!("tmem-lab: density {name}: launching guest {}", i + 1);
        let g = match cfg.launch() {
            Ok(g) => g,
            Err(e) => {
                mode.stop_reason = format!("guest {} failed to launch: {e}", i + 1);
                break;
            }
        };
        let booted = g.wait_for_console(MARK_WAIT, Duration::from_secs(180));
        live.guests.push(g);
        if let Err(e) = booted {
            mode.stop_reason = format!(
                "guest {} did not boot: {}",
                i + 1,
                first_line(&e.to_string())
            );
            break;
        }
        mode.booted += 1;
        if let Ok(mut s) = UnixStream::connect(&go) {
            let _ = s.write_all(b"go\n");
            live.gos.push(s);
        }
        if let Some(d) = &live.daemon {
            let g = live.guests.last().context("no guest")?;
            d.api().post(
                "/guests",
                &CreateGuest {
                    name: gname.clone(),
                    qmp: g.qmp_path().map(Path::to_path_buf).unwrap_or_default(),
                    agent: g.agent_path().map(Path::to_path_buf),
                    policy: Some(PolicyName::Selfballoon),
                    min: None,
                    max: None,
                },
            )?;
        }
        let t = Instant::now();
        while t.elapsed() < settle {
            mode.peak_bytes = mode.peak_bytes.max(b.usage(&pids(&live)));
            std::thread::sleep(Duration::from_millis(500));
        }
        let dead = live.guests.iter().filter(|g| !g.is_running()).count();
        if dead > 0 {
            mode.stop_reason =
                format!("{dead} guest(s) died (OOM) after launching guest {}", i + 1);
            break;
        }
        if b.cg.is_none() && b.usage(&pids(&live)) > budget {
            mode.stop_reason = format!("RSS over budget after guest {}", i + 1);
            break;
        }
        mode.last_stable = i + 1;
    }
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(p.density_hold_secs) {
        mode.peak_bytes = mode.peak_bytes.max(b.usage(&pids(&live)));
        std::thread::sleep(Duration::from_millis(500));
    }
    let over = b.cg.is_none() && b.usage(&pids(&live)) > budget;
    mode.healthy = live
        .guests
        .iter()
        .filter(|g| {
            g.is_running()
                && g.console_text().contains(MARK_WAIT)
                && !g.console_text().contains("Out of memory")
        })
        .count() as u32;
    if over {
        // Without a cgroup nobody is killed: count only as many guests as fit.
        let per = mode.peak_bytes / u64::from(mode.healthy.max(1));
        mode.healthy = (budget / per.max(1)) as u32;
    }
    drop(live);
    drop(b);
    Ok((mode, enforcement))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Runs every mode, one after another under the same budget.
pub fn run_density(
    p: &Params,
    image: &GuestImage,
    tmemd: &Path,
    scratch: &Path,
) -> Result<DensityResult> {
    let scratch: PathBuf = scratch.join("dens");
    let mut out = Vec::new();
    let mut enforcement = String::new();
    for kind in DensityKind::ALL {
        let (m, e) = run_mode(p, image, tmemd, &scratch, kind)?;
        eprintln!(
            "tmem-lab: density {}: {} stable, {} healthy ({})",
            kind.name(),
            m.last_stable,
            m.healthy,
            m.stop_reason
        );
        enforcement = e;
        out.push(m);
    }
    let _ = std::fs::remove_dir_all(&scratch);
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
    })
}
