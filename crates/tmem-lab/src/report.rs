//! results.json and results.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::configs::ConfigKind;
use crate::density::DensityResult;
use crate::run::{RunResult, Summary};
use crate::Params;

/// Everything one `tmem-lab run` measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Results {
    /// Parameters (defaults resolved).
    pub params: Params,
    /// Guest kernel release.
    pub kernel: String,
    /// Host CPUs.
    pub host_cpus: u32,
    /// Whole experiment duration, seconds.
    pub total_secs: f64,
    /// Every completed run.
    pub runs: Vec<RunResult>,
    /// Per-configuration trimmed means.
    pub summaries: Vec<Summary>,
    /// The density experiment, if run.
    pub density: Option<DensityResult>,
    /// Runs that failed (with the error chain).
    pub errors: Vec<String>,
}

impl Results {
    /// The summary of a configuration.
    pub fn summary(&self, c: ConfigKind) -> Option<&Summary> {
        self.summaries.iter().find(|s| s.config == c)
    }
}

/// What the talk (and the 2008 paper) reported, per configuration, as text.
pub fn talk_figure(c: ConfigKind) -> &'static str {
    match c {
        ConfigKind::Unchanged => "baseline (100%)",
        ConfigKind::HostCache => "— (not in the talk)",
        ConfigKind::Selfballoon => "slower, more sectors read (\"a performance hit\")",
        ConfigKind::Tmem => "5–8% faster, 31–52% fewer sectors read (sb+tmem range)",
        ConfigKind::TmemDedup => "within the 5–8% / 31–52% range",
        ConfigKind::TmemDedupComp => {
            "5–8% faster, up to 52% fewer reads; pool 984 MB real → 3723 MB apparent (3.8×)"
        }
    }
}

fn get(s: &Summary, m: &str) -> f64 {
    s.metrics.get(m).copied().unwrap_or(0.0)
}

fn pct(v: f64, base: f64) -> String {
    if base <= 0.0 {
        "—".into()
    } else {
        format!("{:+.0}%", (v / base - 1.0) * 100.0)
    }
}

fn mib(b: f64) -> String {
    format!("{:.0}", b / 1048576.0)
}

/// The main table (markdown), also printed at the end of a run.
pub fn summary_table(r: &Results) -> String {
    let mut t = String::new();
    let base = r.summary(ConfigKind::Unchanged);
    let _ = writeln!(
        t,
        "| configuration | runs | wall s | vs unchanged | CPU s | sectors read | vs unchanged | sectors written | swap in / out (pages) | OOM kills | failed guests | pool peak logical / held MiB | apparent × |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &r.summaries {
        let (bw, br) = base
            .map(|b| (get(b, "wall_secs"), get(b, "sectors_read")))
            .unwrap_or((0.0, 0.0));
        let pool = if s.config.tmem() {
            format!(
                "{} / {}",
                mib(get(s, "pool_peak_logical")),
                mib(get(s, "pool_peak_held"))
            )
        } else {
            "—".into()
        };
        let ratio = if s.config.tmem() {
            format!("{:.2}", get(s, "apparent_ratio"))
        } else {
            "—".into()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} | {} | {:.1} | {:.0} | {} | {:.0} | {:.0} / {:.0} | {:.1} | {:.1} | {} | {} |",
            s.config.label(),
            s.runs,
            get(s, "wall_secs"),
            if s.config == ConfigKind::Unchanged { "—".into() } else { pct(get(s, "wall_secs"), bw) },
            get(s, "cpu_secs"),
            get(s, "sectors_read"),
            if s.config == ConfigKind::Unchanged { "—".into() } else { pct(get(s, "sectors_read"), br) },
            get(s, "sectors_written"),
            get(s, "swap_in"),
            get(s, "swap_out"),
            get(s, "oom_kills"),
            get(s, "failed_guests"),
            pool,
            ratio,
        );
    }
    t
}

/// results.md.
pub fn markdown(r: &Results) -> String {
    let p = &r.params;
    let mut m = String::new();
    let _ = writeln!(m, "# tmem-lab results\n");
    let _ = writeln!(
        m,
        "{} guests × {} MiB ({} MiB swap each), workload `{}` (build: {} jobs × {} rounds over a {} MiB seeded data image, {} CPU pass(es)/file; eatmem ≤ {} MiB × {} rounds), seed {}, {} repeat(s) per configuration{}, accelerator **{}**, kernel {}, {} host CPUs, tmem pool budget {} MiB, compression codec {}. Total time {:.0} s.\n",
        p.guests, p.memory_mib, p.swap_mib, p.workload, p.jobs, p.rounds, p.data_mib, p.work_passes,
        p.eat_mib, p.eat_rounds, p.seed, p.repeats,
        if p.repeats >= 3 { " (highest and lowest dropped per metric, the rest averaged, as in the talk)" } else { "" },
        p.accel, r.kernel, r.host_cpus, p.pool_mib, p.codec, r.total_secs
    );
    let _ = writeln!(m, "## Configurations\n");
    let _ = writeln!(m, "{}", summary_table(r));
    let _ = writeln!(m, "## Beside the talk\n");
    let _ = writeln!(m, "| configuration | the talk (4 guests × 2 kernel compiles, 2 GB Xen host) | ours: wall vs unchanged | ours: sectors read vs unchanged |");
    let _ = writeln!(m, "|---|---|---|---|");
    let base = r.summary(ConfigKind::Unchanged);
    for s in &r.summaries {
        let (bw, br) = base
            .map(|b| (get(b, "wall_secs"), get(b, "sectors_read")))
            .unwrap_or((0.0, 0.0));
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            s.config.label(),
            talk_figure(s.config),
            pct(get(s, "wall_secs"), bw),
            pct(get(s, "sectors_read"), br)
        );
    }
    let _ = writeln!(m);
    let _ = writeln!(m, "## How each metric is measured\n");
    let _ = writeln!(m, "- **wall s**: host clock from the start signal (sent to every guest at once over a virtio-serial port) until every guest printed `LAB-DONE`.");
    let _ = writeln!(m, "- **CPU s**: utime + stime from `/proc/PID/stat` of every QEMU process and tmemd over the same interval.");
    let _ = writeln!(m, "- **sectors read / written** (512 B, backing storage): tmem rows — tmemd's own export counters (cached exports' `sectors_read`/`sectors_written`, swap exports' spilled pages × 8); plain rows — QMP `query-blockstats` `rd_bytes`/`wr_bytes` of both disks (`cache=none`, so that is the backing I/O); host-page-cache row — QEMU's `/proc/PID/io` `read_bytes`/`write_bytes` (what really reached storage).");
    let _ = writeln!(m, "- **swap in / out**: the guests' final `/proc/vmstat` `pswpin`/`pswpout` (printed on the console at the end; the agent's last report if missing).");
    let _ = writeln!(m, "- **OOM kills**: the guests' `/proc/vmstat` `oom_kill`; **failed guests**: workloads that exited non-zero.");
    let _ = writeln!(m, "- **pool peak logical / held**: maxima over 1 s samples of tmemd `GET /api/v1/stats` `pool.logical_bytes` (pages × 4 KiB: the apparent size) and `pool.held_bytes` (real memory incl. metadata); **apparent ×** = peak logical / peak held.");
    let _ = writeln!(m, "- **balloon sizes**: QMP `query-balloon` `actual` of every guest each second (second QMP monitor, so tmemd's balloon manager keeps its own).\n");
    let _ = writeln!(m, "## Per run\n");
    let _ = writeln!(m, "| configuration | repeat | wall s | CPU s (tmemd) | sectors read | sectors written | guest-visible read / written sectors | swap in / out | OOM | pool logical / held MiB | source of sectors |");
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.runs {
        let _ = writeln!(
            m,
            "| {} | {} | {:.1} | {:.1} ({:.1}) | {} | {} | {} / {} | {} / {} | {} | {} / {} | {} |",
            x.config.label(),
            x.repeat + 1,
            x.wall_secs,
            x.cpu_secs,
            x.cpu_tmemd_secs,
            x.sectors_read,
            x.sectors_written,
            x.guest_sectors_read,
            x.guest_sectors_written,
            x.swap_in,
            x.swap_out,
            x.oom_kills,
            mib(x.pool_peak_logical as f64),
            mib(x.pool_peak_held as f64),
            x.sectors_source
        );
    }
    let _ = writeln!(m);
    if let Some(d) = &r.density {
        let _ = writeln!(m, "## Density\n");
        let _ = writeln!(m, "{}", crate::density::markdown(d));
    }
    let _ = writeln!(m, "## Plots\n");
    for (f, what) in crate::plot::FILES {
        let _ = writeln!(m, "- {what}: [`{f}.png`]({f}.png) / [`{f}.svg`]({f}.svg)");
    }
    if !r.errors.is_empty() {
        let _ = writeln!(m, "\n## Failed runs\n");
        for e in &r.errors {
            let _ = writeln!(m, "- {}", e.replace('\n', " "));
        }
    }
    m
}

/// Writes results.json, results.md and the plots into `out`.
pub fn write_all(r: &Results, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(out.join("results.json"), json).context("writing results.json")?;
    std::fs::write(out.join("results.md"), markdown(r)).context("writing results.md")?;
    if let Err(e) = crate::plot::write_plots(r, out) {
        eprintln!("tmem-lab: plots failed: {e:#}");
    }
    Ok(())
}
