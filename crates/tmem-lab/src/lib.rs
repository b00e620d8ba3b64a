//! # tmem-lab: the talk's experiment, with real guests
//!
//! Reproduces "Self-ballooning + Tmem Performance Analysis" (Linux Plumbers 2010): N
//! overcommitted guests start a compile-like workload together, under five
//! configurations — unchanged, self-ballooning, tmem, tmem + dedup, tmem + dedup +
//! compression — plus a labelled "host page cache" baseline row, and against the stack KVM
//! operators run today: `modern` (virtio-balloon free page reporting, a host swap file with
//! zswap, KSM; [`hoststack`] switches them on and restores the host's settings whatever
//! happens) and `modern-tmem` (tmem on top of it). Every configuration runs under one host
//! memory budget (`--budget-mib`: one memory cgroup limit on all QEMU processes and
//! tmemd; statically partitioned rows get budget / guests) and idles as long before the
//! workload (`--settle-secs`). Each configuration is repeated; per metric the highest and
//! lowest runs are dropped and the rest averaged, as in the talk. A density experiment
//! counts how many 512 MiB guests fit a host memory budget: static partitioning, the
//! modern stack, self-ballooning + tmem and both (the 2008 paper's question), with idle
//! guests and with guests that each run a light steady workload (whose slowdown it
//! reports).
//!
//! Pieces: [`image`] (guest initramfs + workload script, seeded data image), [`tmemd`]
//! (spawns the real daemon, minimal control-API client), [`run`] (one run: launch,
//! measure, tear down), [`density`] (with [`cycles`], the light workload's cycle
//! times), [`report`] (results.md / results.json) and [`plot`] (PNG + SVG).
//! `tmem-lab run --quick` is the short version (2 small guests, one repeat; about a
//! minute per configuration on 2 cores, plus the density modes).

pub mod configs;
pub mod cycles;
pub mod density;
pub mod hoststack;
pub mod image;
pub mod plot;
pub mod poolfit;
pub mod procstat;
pub mod report;
pub mod run;
pub mod tmemd;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

pub use configs::ConfigKind;
pub use report::Results;

/// Installs a tracing subscriber (`RUST_LOG`, default `warn`) on stderr.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "tmem-lab",
    version,
    about = "Reproduce the self-ballooning + tmem experiment with real guests"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the experiment and write the report.
    Run(Box<RunArgs>),
    /// Re-render results.md and the plots from a results.json.
    Report {
        /// The results.json to read.
        #[arg(long)]
        from: PathBuf,
        /// Output directory (default: the JSON's directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Flags of `tmem-lab run`. Unset values take the full or `--quick` default.
#[derive(Debug, Clone, Args, Default)]
pub struct RunArgs {
    /// Small and short: 2 guests of 256 MiB, a 160 MiB data image, 1 repeat.
    #[arg(long)]
    pub quick: bool,
    /// Guests run together [full 4, quick 2].
    #[arg(long)]
    pub guests: Option<u32>,
    /// Guest memory (boot size), MiB [full 384, quick 256].
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Swap disk per guest, MiB [full 512, quick 256].
    #[arg(long)]
    pub swap_mib: Option<u32>,
    /// Shared data image size, MiB; ~60% of it is the source tree [full 1024, quick 160].
    #[arg(long)]
    pub data_mib: Option<u64>,
    /// Workload mix: build, eatmem and resident joined with `+` (e.g. build+eatmem, or
    /// resident+build+eatmem: every guest also holds the same files of the data disk and
    /// text of its own, as guests cloned from one image do) [build+eatmem].
    #[arg(long)]
    pub workload: Option<String>,
    /// resident: MiB of the data disk's files each guest holds (the same pages in every
    /// guest) [memory/8].
    #[arg(long)]
    pub resident_shared_mib: Option<u32>,
    /// resident: MiB of text-like data of each guest's own [memory/8].
    #[arg(long)]
    pub resident_private_mib: Option<u32>,
    /// Parallel build jobs per guest [2].
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Build rounds (clean + build) per guest [full 2, quick 2].
    #[arg(long)]
    pub rounds: Option<u32>,
    /// CPU passes per source file [1].
    #[arg(long)]
    pub work_passes: Option<u32>,
    /// eatmem: largest allocation, MiB [memory/3].
    #[arg(long)]
    pub eat_mib: Option<u32>,
    /// eatmem: rounds [full 8, quick 3].
    #[arg(long)]
    pub eat_rounds: Option<u32>,
    /// eatmem: longest sleep between rounds, ms [2000].
    #[arg(long)]
    pub eat_sleep_ms: Option<u32>,
    /// Seed of the data image and the workloads [42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Repeats per configuration; the highest and lowest are dropped when ≥ 3 [full 5, quick 1].
    #[arg(long)]
    pub repeats: Option<u32>,
    /// Configurations, comma-separated (unchanged, host-cache, selfballoon, tmem,
    /// tmem-dedup, tmem-dedup-comp, modern, modern-tmem; `none` for the density
    /// experiment only) [all].
    #[arg(long, value_delimiter = ',')]
    pub configs: Option<Vec<String>>,
    /// Codec of the tmem+dedup+compression configuration: lz4, zstd or zstd:LEVEL [zstd].
    #[arg(long)]
    pub codec: Option<String>,
    /// tmem pool budget, MiB [guests × memory / 2].
    #[arg(long)]
    pub pool_mib: Option<u64>,
    /// Seconds every configuration idles after boot before the workload starts (the
    /// balloon manager shrinks the guests meanwhile) [full 60, quick 30].
    #[arg(long)]
    pub settle_secs: Option<u64>,
    /// One host memory budget for every configuration: a memory cgroup limit on all QEMU
    /// processes and tmemd (and the page cache they cause), MiB; statically partitioned
    /// configurations (unchanged, host-cache) get guests of budget / guests − 128 MiB
    /// (QEMU's own) when that is less than --memory-mib; 0 = no limit
    /// [guests × (¾ × memory + 128)].
    #[arg(long)]
    pub budget_mib: Option<u64>,
    /// Under the host budget, memory the balloon manager keeps for the tmem pool (guests
    /// grow only into the rest: tmemd's `[balloon] pool_min`), MiB; 0 = guests first, the
    /// pool gets what is left [budget / 8].
    #[arg(long)]
    pub pool_min_mib: Option<u64>,
    /// Where the `modern` rows make their host swap file (a disk filesystem) [/var/tmp].
    #[arg(long)]
    pub swap_dir: Option<PathBuf>,
    /// Statically partitioned rows (unchanged, host-cache): allocate guest RAM up front
    /// (`-mem-prealloc`, like a VM that has run long enough to touch all its RAM) [on].
    #[arg(long)]
    pub static_prealloc: Option<bool>,
    /// Balloon manager (selfballoon policy) interval, ms [1000].
    #[arg(long)]
    pub balloon_interval_ms: Option<u64>,
    /// Longest one run may take, seconds [full 3600, quick 900].
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Accelerator: auto (probe), kvm or tcg [auto].
    #[arg(long)]
    pub accel: Option<String>,
    /// Under TCG, QEMU's translated-code cache per guest, MiB; 0 = QEMU's default (1 GiB,
    /// filled lazily, tens of MiB per guest that a KVM guest's QEMU does not have) [32].
    #[arg(long)]
    pub tcg_tb_mib: Option<u32>,
    /// The tmemd binary [beside tmem-lab, else built with cargo].
    #[arg(long)]
    pub tmemd: Option<PathBuf>,
    /// Skip the density experiment.
    #[arg(long)]
    pub no_density: bool,
    /// Density: host memory budget (cgroup limit on QEMU + tmemd), MiB [full 2048, quick 1024].
    #[arg(long)]
    pub host_budget_mib: Option<u64>,
    /// Density: memory of each idle guest, MiB [512].
    #[arg(long)]
    pub density_guest_mib: Option<u32>,
    /// Density: most guests tried per mode [full 16, quick 6].
    #[arg(long)]
    pub density_max: Option<u32>,
    /// Density: seconds every guest must stay healthy at the end [full 30, quick 10].
    #[arg(long)]
    pub density_hold_secs: Option<u64>,
    /// Density: what the guests run, comma-separated passes: idle, light (a steady
    /// file scan of the data disk plus an allocation per cycle) [idle,light].
    #[arg(long, value_delimiter = ',')]
    pub density_workloads: Option<Vec<String>>,
    /// Density, light guests: most guests tried per mode [full --density-max, quick 4].
    #[arg(long)]
    pub density_light_max: Option<u32>,
    /// Density, light guests: files of the data disk read per cycle, MiB [16].
    #[arg(long)]
    pub density_light_scan_mib: Option<u32>,
    /// Density, light guests: memory allocated and written once per cycle, MiB [32].
    #[arg(long)]
    pub density_light_alloc_mib: Option<u32>,
    /// Density, light guests: sleep after each cycle, ms [1000].
    #[arg(long)]
    pub density_light_sleep_ms: Option<u32>,
    /// Density, light guests: seconds each guest count is measured before the next
    /// launch [full 20, quick 10].
    #[arg(long)]
    pub density_light_window_secs: Option<u64>,
    /// Results directory [tmem-lab-results].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Resolved parameters of a run (every default filled in); stored in results.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Params {
    /// Quick mode.
    pub quick: bool,
    /// Guests.
    pub guests: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Swap per guest, MiB.
    pub swap_mib: u32,
    /// Data image, MiB.
    pub data_mib: u64,
    /// Workload mix.
    pub workload: String,
    /// Build jobs.
    pub jobs: u32,
    /// Build rounds.
    pub rounds: u32,
    /// CPU passes per file.
    pub work_passes: u32,
    /// eatmem max MiB.
    pub eat_mib: u32,
    /// eatmem rounds.
    pub eat_rounds: u32,
    /// eatmem sleep ms.
    pub eat_sleep_ms: u32,
    /// resident: shared MiB per guest.
    #[serde(default)]
    pub resident_shared_mib: u32,
    /// resident: private MiB per guest.
    #[serde(default)]
    pub resident_private_mib: u32,
    /// Seed.
    pub seed: u64,
    /// Repeats.
    pub repeats: u32,
    /// Configurations.
    pub configs: Vec<ConfigKind>,
    /// Codec with compression.
    #[serde(default)]
    pub codec: String,
    /// Pool budget, MiB.
    pub pool_mib: u64,
    /// Settle seconds (every configuration).
    pub settle_secs: u64,
    /// Host memory budget of every configuration of the main table, MiB (0: none).
    #[serde(default)]
    pub budget_mib: u64,
    /// Memory kept for the pool under the host budget, MiB.
    #[serde(default)]
    pub pool_min_mib: u64,
    /// Where the modern rows' host swap file goes.
    #[serde(default)]
    pub swap_dir: PathBuf,
    /// Statically partitioned rows preallocate guest RAM.
    #[serde(default)]
    pub static_prealloc: bool,
    /// Balloon manager interval, ms.
    pub balloon_interval_ms: u64,
    /// Timeout per run, seconds.
    pub timeout_secs: u64,
    /// Accelerator used.
    pub accel: String,
    /// TCG translated-code cache per guest, MiB (0: QEMU's default).
    #[serde(default)]
    pub tcg_tb_mib: u32,
    /// Density experiment on.
    pub density: bool,
    /// Density budget, MiB.
    pub host_budget_mib: u64,
    /// Density guest size, MiB.
    pub density_guest_mib: u32,
    /// Density max guests.
    pub density_max: u32,
    /// Density hold seconds.
    pub density_hold_secs: u64,
    /// Density passes (`idle` alone in results of older runs).
    #[serde(default = "idle_only")]
    pub density_workloads: Vec<density::DensityWorkload>,
    /// Density: the light workload's parameters.
    #[serde(default)]
    pub density_light: density::LightParams,
}

fn idle_only() -> Vec<density::DensityWorkload> {
    vec![density::DensityWorkload::Idle]
}

/// Parses `--density-workloads` (none given: both).
fn density_workloads(v: Option<&[String]>) -> Result<Vec<density::DensityWorkload>> {
    let Some(v) = v else {
        return Ok(density::DensityWorkload::ALL.to_vec());
    };
    let mut out = Vec::new();
    for s in v {
        let w = density::DensityWorkload::parse(s).with_context(|| {
            format!("--density-workloads: unknown workload {s:?} (idle, light)")
        })?;
        if !out.contains(&w) {
            out.push(w);
        }
    }
    Ok(out)
}

/// Whether `w` is one or more of `build`, `eatmem`, `resident` joined with `+`, each once.
pub fn valid_workload(w: &str) -> bool {
    let parts: Vec<&str> = w.split('+').collect();
    !parts.is_empty()
        && parts
            .iter()
            .all(|p| matches!(*p, "build" | "eatmem" | "resident"))
        && parts
            .iter()
            .enumerate()
            .all(|(i, p)| !parts[..i].contains(p))
}

impl RunArgs {
    /// Fills in defaults.
    pub fn resolve(&self) -> Result<Params> {
        let q = self.quick;
        let pick =
            |v: Option<u64>, full: u64, quick: u64| v.unwrap_or(if q { quick } else { full });
        let guests = self.guests.unwrap_or(if q { 2 } else { 4 });
        let memory_mib = self.memory_mib.unwrap_or(if q { 256 } else { 384 });
        let workload = self
            .workload
            .clone()
            .unwrap_or_else(|| "build+eatmem".into());
        if !valid_workload(&workload) {
            bail!(
                "--workload {workload:?}: want build, eatmem and/or resident joined with '+' (e.g. build+eatmem)"
            );
        }
        let configs = match &self.configs {
            None => ConfigKind::ALL.to_vec(),
            Some(v) => {
                let mut out = Vec::new();
                for s in v {
                    if s == "none" {
                        continue;
                    }
                    let c = ConfigKind::parse(s).with_context(|| {
                        format!("unknown configuration {s:?} (unchanged, host-cache, selfballoon, tmem, tmem-dedup, tmem-dedup-comp, modern, modern-tmem)")
                    })?;
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
                out
            }
        };
        if guests == 0 || memory_mib < 96 {
            bail!("need at least one guest of at least 96 MiB");
        }
        let accel = match self.accel.as_deref().unwrap_or("auto") {
            "auto" => tmem_vm::probe_accel(),
            other => tmem_vm::Accel::parse(other)
                .with_context(|| format!("--accel {other:?}: want auto, kvm or tcg"))?,
        };
        let budget_mib = self.budget_mib.unwrap_or(
            u64::from(guests)
                * (u64::from(memory_mib) * 3 / 4 + u64::from(run::DEFAULT_BUDGET_QEMU_MIB)),
        );
        let density_max = self.density_max.unwrap_or(if q { 6 } else { 16 });
        let density_light = density::LightParams {
            max: self
                .density_light_max
                .unwrap_or(if q { 4 } else { density_max }),
            scan_mib: self.density_light_scan_mib.unwrap_or(16),
            alloc_mib: self.density_light_alloc_mib.unwrap_or(32),
            sleep_ms: self.density_light_sleep_ms.unwrap_or(1000),
            window_secs: pick(self.density_light_window_secs, 20, 10),
            stall_secs: if q { 30 } else { 60 },
        };
        Ok(Params {
            quick: q,
            guests,
            memory_mib,
            swap_mib: self.swap_mib.unwrap_or(if q { 256 } else { 512 }),
            data_mib: pick(self.data_mib, 1024, 160),
            workload,
            jobs: self.jobs.unwrap_or(2),
            rounds: self.rounds.unwrap_or(2),
            work_passes: self.work_passes.unwrap_or(1),
            eat_mib: self.eat_mib.unwrap_or(memory_mib / 3),
            eat_rounds: self.eat_rounds.unwrap_or(if q { 3 } else { 8 }),
            eat_sleep_ms: self.eat_sleep_ms.unwrap_or(2000),
            resident_shared_mib: self.resident_shared_mib.unwrap_or(memory_mib / 8),
            resident_private_mib: self.resident_private_mib.unwrap_or(memory_mib / 8),
            seed: self.seed.unwrap_or(42),
            repeats: self.repeats.unwrap_or(if q { 1 } else { 5 }).max(1),
            configs,
            pool_mib: pick(
                self.pool_mib,
                u64::from(guests) * u64::from(memory_mib) / 2,
                u64::from(guests) * u64::from(memory_mib) / 2,
            ),
            codec: self.codec.clone().unwrap_or_else(|| "zstd".into()),
            settle_secs: pick(self.settle_secs, 60, 30),
            budget_mib,
            pool_min_mib: self.pool_min_mib.unwrap_or(budget_mib / 8),
            swap_dir: self
                .swap_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/tmp")),
            static_prealloc: self.static_prealloc.unwrap_or(true),
            balloon_interval_ms: self.balloon_interval_ms.unwrap_or(1000),
            timeout_secs: pick(self.timeout_secs, 3600, 900),
            accel: accel.name().to_string(),
            tcg_tb_mib: self.tcg_tb_mib.unwrap_or(32),
            density: !self.no_density,
            host_budget_mib: pick(self.host_budget_mib, 2048, 1024),
            density_guest_mib: self.density_guest_mib.unwrap_or(512),
            density_max,
            density_hold_secs: pick(self.density_hold_secs, 30, 10),
            density_workloads: density_workloads(self.density_workloads.as_deref())?,
            density_light,
        })
    }
}

/// Runs a parsed command line.
pub fn main_with(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => {
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("tmem-lab-results"));
            let res = run_experiment(&a, &out)?;
            println!("{}", report::summary_table(&res));
            println!("results: {}", out.join("results.md").display());
            Ok(())
        }
        Cmd::Report { from, out } => {
            let text = std::fs::read_to_string(&from)
                .with_context(|| format!("reading {}", from.display()))?;
            let res: Results = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", from.display()))?;
            let out = out
                .or_else(|| from.parent().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("."));
            report::write_all(&res, &out)?;
            println!("{}", report::summary_table(&res));
            Ok(())
        }
    }
}

fn fmt_dur(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A scratch directory with short paths (Unix sockets), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs everything the flags ask for and writes the results directory.
pub fn run_experiment(a: &RunArgs, out: &std::path::Path) -> Result<Results> {
    let p = a.resolve()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let t0 = Instant::now();
    eprintln!(
        "tmem-lab: accelerator {}; building guest image and data image",
        p.accel
    );
    let workspace = tmemd::workspace_root();
    let image = image::build_image(&workspace)?;
    let data_image = image::data_image(p.seed, p.data_mib << 20)?;
    let tmemd_bin = tmemd::locate_tmemd(a.tmemd.as_deref())?;
    let scratch = Scratch(std::env::temp_dir().join(format!("tl{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)?;
    let accel = tmem_vm::Accel::parse(&p.accel).unwrap_or(tmem_vm::Accel::Tcg);
    let setup = run::RunSetup {
        guests: p.guests,
        memory_mib: p.memory_mib,
        swap_mib: p.swap_mib,
        data_image: data_image.clone(),
        image: image.clone(),
        accel,
        tcg_tb_mib: (p.tcg_tb_mib > 0).then_some(p.tcg_tb_mib),
        work: image::WorkParams {
            work: p.workload.clone(),
            seed: p.seed,
            jobs: p.jobs,
            rounds: p.rounds,
            wpass: p.work_passes,
            eat_mib: p.eat_mib,
            eat_rounds: p.eat_rounds,
            eat_sleep_ms: p.eat_sleep_ms,
            res_shared_mib: p.resident_shared_mib,
            res_private_mib: p.resident_private_mib,
        },
        tmemd: tmemd_bin.clone(),
        codec: p.codec.clone(),
        pool_budget: p.pool_mib << 20,
        settle_secs: p.settle_secs,
        host_budget: (p.budget_mib > 0).then_some(p.budget_mib << 20),
        pool_min: p.pool_min_mib << 20,
        swap_dir: p.swap_dir.clone(),
        static_prealloc: p.static_prealloc,
        balloon_interval_ms: p.balloon_interval_ms,
        timeout: Duration::from_secs(p.timeout_secs),
        sample: Duration::from_secs(1),
        scratch: scratch.0.clone(),
        logs: Some(out.join("logs")),
    };
    eprintln!(
        "tmem-lab: image {} ({}), data {} ({} MiB), tmemd {}; setup took {}",
        image.key,
        image.kernel_version,
        data_image.display(),
        p.data_mib,
        tmemd_bin.display(),
        fmt_dur(t0.elapsed().as_secs_f64())
    );
    let total = p.configs.len() as u32 * p.repeats;
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    let mut done = 0u32;
    let runs_start = Instant::now();
    // Repeats outermost, so an interrupted run still has every configuration once.
    for rep in 0..p.repeats {
        for &c in &p.configs {
            let eta = if done == 0 {
                "?".to_string()
            } else {
                fmt_dur(
                    runs_start.elapsed().as_secs_f64() / f64::from(done) * f64::from(total - done),
                )
            };
            let tag = format!(
                "[{}/{total}] {} repeat {}/{}",
                done + 1,
                c.name(),
                rep + 1,
                p.repeats
            );
            eprintln!("tmem-lab: {tag}: starting (ETA {eta})");
            let started = Instant::now();
            let progress = |what: &str| {
                eprintln!(
                    "tmem-lab: {tag}: {what} ({})",
                    fmt_dur(started.elapsed().as_secs_f64())
                )
            };
            match run::run_once(&setup, c, rep, &progress) {
                Ok(r) => {
                    eprintln!(
                        "tmem-lab: {tag}: wall {:.1}s cpu {:.1}s read {} written {} sectors swap in/out {}/{} oom {}",
                        r.wall_secs, r.cpu_secs, r.sectors_read, r.sectors_written, r.swap_in, r.swap_out, r.oom_kills
                    );
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!("tmem-lab: {tag}: FAILED: {e:#}");
                    errors.push(format!("{tag}: {e:#}"));
                }
            }
            done += 1;
        }
    }
    let (mut density, mut density_light) = (None, None);
    let env = density::DensityEnv {
        image: image.clone(),
        data_image,
        tmemd: tmemd_bin,
        scratch: scratch.0.join("dens"),
        logs: Some(out.join("logs")),
    };
    let workloads: &[density::DensityWorkload] = if p.density { &p.density_workloads } else { &[] };
    for &w in workloads {
        eprintln!(
            "tmem-lab: density experiment, {} guests ({} MiB budget)",
            w.name(),
            p.host_budget_mib
        );
        match density::run_density(&p, &env, w) {
            Ok(d) if w == density::DensityWorkload::Light => density_light = Some(d),
            Ok(d) => density = Some(d),
            Err(e) => {
                eprintln!("tmem-lab: density ({}) FAILED: {e:#}", w.name());
                errors.push(format!("density ({}): {e:#}", w.name()));
            }
        }
    }
    let summaries = p
        .configs
        .iter()
        .map(|c| run::summarize(*c, &runs))
        .collect();
    let res = Results {
        params: p,
        kernel: image.kernel_version.clone(),
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        total_secs: t0.elapsed().as_secs_f64(),
        runs,
        summaries,
        density,
        density_light,
        errors,
    };
    report::write_all(&res, out)?;
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_known_parts_joined_with_plus_each_once() {
        for ok in ["build", "build+eatmem", "resident+build+eatmem", "resident"] {
            assert!(valid_workload(ok), "{ok}");
        }
        for bad in ["", "idle", "build+", "build+build", "resident+bogus"] {
            assert!(!valid_workload(bad), "{bad}");
        }
    }
}
