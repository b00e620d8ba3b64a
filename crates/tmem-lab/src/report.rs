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
    /// The density experiment with idle guests, if run.
    pub density: Option<DensityResult>,
    /// The density experiment with light-workload guests, if run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density_light: Option<DensityResult>,
    /// Runs that failed (with the error chain).
    pub errors: Vec<String>,
}

impl Results {
    /// The summary of a configuration.
    pub fn summary(&self, c: ConfigKind) -> Option<&Summary> {
        self.summaries.iter().find(|s| s.config == c)
    }

    /// The density passes that ran: idle, then light.
    pub fn density_passes(&self) -> Vec<&DensityResult> {
        self.density.iter().chain(&self.density_light).collect()
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
        ConfigKind::Modern => {
            "— (2026's free stack; TMO: 20–32% memory saved, DAMON_RECLAIM ~40% at ~3% slowdown)"
        }
        ConfigKind::ModernTmem => "— (not in the talk: tmem on top of the modern stack)",
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

/// The head-to-head of the best tmem row, the modern stack and both (markdown), with a
/// plain sentence for every metric where tmem loses; empty without a `modern` row.
pub fn head_to_head(r: &Results) -> String {
    let mut t = String::new();
    let Some(modern) = r.summary(ConfigKind::Modern) else {
        return t;
    };
    let rows: Vec<&Summary> = [
        ConfigKind::Modern,
        ConfigKind::TmemDedupComp,
        ConfigKind::ModernTmem,
    ]
    .iter()
    .filter_map(|c| r.summary(*c))
    .collect();
    let _ = writeln!(
        t,
        "| configuration | wall s | spread | vs modern | CPU s | vs modern | sectors read | spread | vs modern | host peak MiB | host PSS at end MiB | vs modern | OOM kills (guest / host) | failed guests |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &rows {
        let vs = |m: &str| {
            if s.config == ConfigKind::Modern {
                "—".to_string()
            } else {
                pct(get(s, m), get(modern, m))
            }
        };
        let _ = writeln!(
            t,
            "| {} | {:.1} | {} | {} | {:.1} | {} | {:.0} | {} | {} | {} | {} | {} | {:.1} / {:.1} | {:.1} |",
            s.config.label(),
            get(s, "wall_secs"),
            spread(r, s.config, "wall_secs", 1),
            vs("wall_secs"),
            get(s, "cpu_secs"),
            vs("cpu_secs"),
            get(s, "sectors_read"),
            spread(r, s.config, "sectors_read", 0),
            vs("sectors_read"),
            mib(get(s, "host_peak_bytes")),
            mib(get(s, "host_pss_bytes")),
            vs("host_pss_bytes"),
            get(s, "oom_kills"),
            get(s, "host_oom_kills"),
            get(s, "failed_guests"),
        );
    }
    let _ = writeln!(t);
    for s in rows.iter().filter(|s| s.config != ConfigKind::Modern) {
        let mut losses = Vec::new();
        for (m, what) in [
            ("wall_secs", "wall time"),
            ("cpu_secs", "CPU"),
            ("sectors_read", "sectors read"),
            ("host_pss_bytes", "host memory (PSS)"),
            ("host_oom_kills", "OOM kills by the host budget"),
            ("failed_guests", "failed guests"),
        ] {
            let (a, b) = (get(s, m), get(modern, m));
            if a > b * 1.02 && a - b > 1e-9 {
                losses.push(
                    if b > 0.0 && !matches!(m, "host_oom_kills" | "failed_guests") {
                        format!("{what} {}", pct(a, b))
                    } else {
                        format!("{what} {a:.1} vs {b:.1}")
                    },
                );
            }
        }
        let _ = writeln!(
            t,
            "- **{}** loses to modern on: {}.",
            s.config.label(),
            if losses.is_empty() {
                "nothing measured here".to_string()
            } else {
                losses.join(", ")
            }
        );
    }
    // The targets, for every tmem row.
    for b in rows.iter().filter(|s| s.config != ConfigKind::Modern) {
        let fewer = 1.0 - get(b, "sectors_read") / get(modern, "sectors_read").max(1.0);
        let faster = 1.0 - get(b, "wall_secs") / get(modern, "wall_secs").max(1e-9);
        let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
        let _ = writeln!(
            t,
            "- Targets, {}: ≥ 50 % fewer sectors read than modern: {:.0} % {}, {}; ≥ 5 % faster: {:.0} % {}, {}.",
            b.config.label(),
            fewer.abs() * 100.0,
            if fewer >= 0.0 { "fewer" } else { "more" },
            verdict(fewer >= 0.5),
            faster.abs() * 100.0,
            if faster >= 0.0 { "faster" } else { "slower" },
            verdict(faster >= 0.05)
        );
    }
    t
}

/// `min–max` of one metric over a configuration's runs (`—` with fewer than two).
fn spread(r: &Results, c: ConfigKind, m: &str, decimals: usize) -> String {
    let v: Vec<f64> = r
        .runs
        .iter()
        .filter(|x| x.config == c)
        .filter_map(|x| crate::run::metric(x, m))
        .collect();
    if v.len() < 2 {
        return "—".to_string();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.decimals$}–{hi:.decimals$}")
}

/// The main table (markdown), also printed at the end of a run.
pub fn summary_table(r: &Results) -> String {
    let mut t = String::new();
    let base = r.summary(ConfigKind::Unchanged);
    let _ = writeln!(
        t,
        "| configuration | runs | wall s | vs unchanged | CPU s | sectors read | vs unchanged | sectors written | swap in / out (pages) | OOM kills | failed guests | host peak / PSS MiB | pool peak logical / held MiB | apparent × |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
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
            "| {} | {} | {:.1} | {} | {:.1} | {:.0} | {} | {:.0} | {:.0} / {:.0} | {:.1} | {:.1} | {} / {} | {} | {} |",
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
            mib(get(s, "host_peak_bytes")),
            mib(get(s, "host_pss_bytes")),
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
        accel_text(p), r.kernel, r.host_cpus, p.pool_mib, p.codec, r.total_secs
    );
    if p.workload.contains("resident") {
        let _ = writeln!(
            m,
            "`resident`: every guest loads {} MiB of the data disk's files page-aligned (the same pages in every guest, as guests cloned from one image hold the same programs and libraries) and {} MiB of text-like data of its own at boot, holds them through the workload and checks every page at the end (a changed page fails the guest).\n",
            p.resident_shared_mib, p.resident_private_mib
        );
    }
    if p.budget_mib > 0 {
        let qemu_mib = crate::run::qemu_overhead_mib((p.tcg_tb_mib > 0).then_some(p.tcg_tb_mib));
        let statics: Vec<String> = r
            .runs
            .iter()
            .filter(|x| x.config.static_partition() && x.guest_memory_mib < p.memory_mib)
            .map(|x| format!("{} {} MiB", x.config.label(), x.guest_memory_mib))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let _ = writeln!(
            m,
            "**One host budget for every row: {} MiB** — one memory cgroup limit on all QEMU processes and tmemd, the page cache they cause included (`memory.limit_in_bytes` on this host's cgroup v1 memory controller). The balloon manager sizes the pool from the same budget (budget − {} MiB per QEMU − {} MiB tmemd − the guests' memory){}. Statically partitioned rows cannot overcommit, so their guests are sized as an operator would: budget / guests − {} MiB for QEMU{}.\n",
            p.budget_mib,
            qemu_mib,
            crate::run::TMEMD_OVERHEAD_MIB,
            if p.pool_min_mib > 0 {
                format!(" and keeps at least {} MiB for the pool (guests grow only into the rest)", p.pool_min_mib)
            } else {
                String::new()
            },
            qemu_mib,
            if statics.is_empty() {
                String::new()
            } else {
                format!(" ({})", statics.join(", "))
            }
        );
    } else {
        let _ = writeln!(m, "No host budget (`--budget-mib 0`): guests and the host page cache may use all host memory.\n");
    }
    let settles: std::collections::BTreeSet<u64> = r.runs.iter().map(|x| x.settle_secs).collect();
    let _ = writeln!(
        m,
        "Every run idled {} s between boot and the workload (per run in results.json).\n",
        settles
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let _ = writeln!(m, "## Configurations\n");
    let _ = writeln!(m, "{}", summary_table(r));
    let h2h = head_to_head(r);
    if !h2h.is_empty() {
        let _ = writeln!(m, "## tmem vs the modern stack vs both\n");
        let stack = r
            .runs
            .iter()
            .find_map(|x| x.stack.as_ref())
            .map(|st| {
                format!(
                    "a {} MiB host swap file with zswap ({}{}, max_pool_percent {}), KSM scanning {}",
                    st.swap_bytes >> 20,
                    st.zswap_compressor,
                    if st.zswap_unavailable.is_empty() {
                        String::new()
                    } else {
                        format!("; this kernel lacks {}", st.zswap_unavailable.join(", "))
                    },
                    st.zswap_max_pool_percent,
                    st.ksm_scan
                )
            })
            .unwrap_or_else(|| "host swap with zswap, KSM".to_string());
        let _ = writeln!(m, "Modern = virtio-balloon free page reporting + {stack}; no tmemd. The tmem row is the best of the talk's (dedup + compression); modern + tmem runs that row with the modern stack on as well. Same guests, workload and host budget.\n");
        let _ = writeln!(m, "{h2h}");
        let _ = writeln!(m, "A row with a guest killed by the host budget's OOM killer measured fewer guests to the end: its wall, CPU and memory figures are not comparable.\n");
    }
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
    let _ = writeln!(m, "- **host peak**: the most memory charged to the host budget's cgroup (`memory.usage_in_bytes`, page cache included) in 1 s samples during the workload; **host PSS**: the sum of `/proc/PID/smaps_rollup` `Pss` of every QEMU and tmemd when the workload ended (KSM-merged pages count once); **OOM host**: processes the budget's OOM killer killed (`memory.oom_control` `oom_kill`).");
    let _ = writeln!(m, "- **host swap / zswap / KSM saved** (modern rows): peaks of `/proc/meminfo` SwapTotal − SwapFree and `Zswap:` (the compressed pool), and `/sys/kernel/mm/ksm/pages_sharing` × 4 KiB at the end (host-wide).");
    let _ = writeln!(m, "- **QEMU minor faults**: `/proc/PID/stat` minflt of every QEMU over the workload — mostly first touches of guest RAM the host had not backed yet (statically partitioned rows preallocate guest RAM with `-mem-prealloc` unless `--static-prealloc false`, as a VM that has run for a while has touched all of it).");
    let _ = writeln!(m, "- **balloon sizes**: QMP `query-balloon` `actual` of every guest each second (second QMP monitor, so tmemd's balloon manager keeps its own).\n");
    let _ = writeln!(m, "## Per run\n");
    let _ = writeln!(m, "| configuration | repeat | settle s | guest MiB | wall s | CPU s (tmemd) | sectors read | sectors written | guest-visible read / written sectors | swap in / out | OOM guest / host | host peak / PSS MiB | pool logical / held MiB | pool budget at peak MiB | host swap / zswap / KSM saved MiB | QEMU minor faults | source of sectors |");
    let _ = writeln!(
        m,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in &r.runs {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {:.1} | {:.1} ({:.1}) | {} | {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} | {} | {} |",
            x.config.label(),
            x.repeat + 1,
            x.settle_secs,
            if x.prealloc {
                format!("{} (prealloc)", x.guest_memory_mib)
            } else {
                x.guest_memory_mib.to_string()
            },
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
            x.host_oom_kills,
            mib(x.host_peak_bytes as f64),
            mib(x.host_pss_bytes as f64),
            mib(x.pool_peak_logical as f64),
            mib(x.pool_peak_held as f64),
            x.pool
                .iter()
                .max_by_key(|p| p.logical)
                .map_or("—".to_string(), |p| mib(p.budget as f64)),
            if x.config.modern_stack() {
                format!(
                    "{} / {} / {}",
                    mib(x.host_swap_peak_bytes as f64),
                    mib(x.zswap_peak_bytes as f64),
                    mib(x.ksm_saved_bytes as f64)
                )
            } else {
                "—".to_string()
            },
            x.qemu_minor_faults,
            x.sectors_source
        );
    }
    let _ = writeln!(m);
    pool_fit_section(&mut m, r);
    let passes = r.density_passes();
    if !passes.is_empty() {
        let _ = writeln!(m, "## Density\n");
        let _ = writeln!(m, "{}", crate::density::markdown(&passes));
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

fn accel_text(p: &crate::Params) -> String {
    if p.accel == "tcg" && p.tcg_tb_mib > 0 {
        format!(
            "{} (translated-code cache {} MiB per guest)",
            p.accel, p.tcg_tb_mib
        )
    } else {
        p.accel.clone()
    }
}

/// The pool against its budget during each tmem run's workload, and why it stayed small.
fn pool_fit_section(m: &mut String, r: &Results) {
    let runs: Vec<_> = r.runs.iter().filter(|x| x.config.tmem()).collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(m, "## The pool against its budget (workload)\n");
    let _ = writeln!(m, "Sampled each second from the start signal to the end (`pool.png` draws the series). **No room** = budget < 8 MiB (the guests and the host reserve took the host budget); **full** = pool held ≥ 90 % of a budget of ≥ 8 MiB; puts refused and ephemeral evictions are counted over the workload; cached hits / misses are the guests' data-disk reads served by the pool / by the image.\n");
    let _ = writeln!(m, "| configuration | repeat | budget min / median / max MiB | pool held / logical peak MiB | no room | full | puts refused | evictions | cached hits / misses | why the pool stayed small |");
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|");
    for x in runs {
        let f = crate::poolfit::PoolFit::of(&x.pool, &x.exports);
        let _ = writeln!(
            m,
            "| {} | {} | {} / {} / {} | {} / {} | {:.0}% | {:.0}% | {} | {} | {} / {} | {} |",
            x.config.label(),
            x.repeat + 1,
            mib(f.budget_min as f64),
            mib(f.budget_median as f64),
            mib(f.budget_max as f64),
            mib(f.held_max as f64),
            mib(f.logical_max as f64),
            f.no_room_share * 100.0,
            f.full_share * 100.0,
            f.puts_refused,
            f.evictions,
            f.cached_hits,
            f.cached_misses,
            f.verdict().text()
        );
    }
    let _ = writeln!(m);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorded results under `results-run/` (written by older versions) still load
    /// and render; their density passes are idle ones.
    #[test]
    fn recorded_results_still_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results-run");
        let mut found = 0;
        for f in [
            dir.join("results.json"),
            dir.join("2026-12-03-quick/results.json"),
        ] {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            let r: Results =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(r.density_light.is_none());
            for d in r.density_passes() {
                assert_eq!(d.workload, crate::density::DensityWorkload::Idle);
            }
            assert!(markdown(&r).contains("# tmem-lab results"));
            found += 1;
        }
        assert!(found > 0, "no recorded results under {}", dir.display());
    }
}
