//! `tmem-bench`: end-to-end benchmarks of tmem against physical limits and peers, measured
//! in the same run. See `scripts/bench-core` and BENCHMARKS.md.

mod churn;
mod core_bench;
mod corpus;
mod dump;
mod sys;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "tmem benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Appends the present anonymous pages of processes to a corpus file.
    Dump {
        /// Process ids.
        #[arg(long = "pid", required = true)]
        pids: Vec<u32>,
        /// Output file (appended to).
        #[arg(long)]
        out: PathBuf,
    },
    /// Engine throughput, memory efficiency, physical limits and zram on a corpus.
    Core {
        /// Corpus file of 4 KiB pages.
        #[arg(long)]
        corpus: PathBuf,
        /// Pages used for throughput runs.
        #[arg(long, default_value_t = 60_000)]
        pages: usize,
        /// Repetitions per throughput figure (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Skip the zram comparison.
        #[arg(long)]
        no_zram: bool,
        /// Write all figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Skip the churn, give-back and huge page sections.
        #[arg(long)]
        no_churn: bool,
        /// Keys of the churn pool (0: as many as the corpus has pages).
        #[arg(long, default_value_t = 0)]
        churn_keys: usize,
        /// Seed of the churn sequence.
        #[arg(long, default_value_t = 8)]
        seed: u64,
    },
    /// (internal) the churn sequence on tmem, in a fresh process; prints JSON.
    Churn {
        /// Corpus file.
        #[arg(long)]
        corpus: PathBuf,
        /// Keys (0: as many as the corpus has pages).
        #[arg(long, default_value_t = 0)]
        keys: usize,
        /// Seed.
        #[arg(long, default_value_t = 8)]
        seed: u64,
    },
    /// (internal) give-back speed of a full ephemeral pool, in a fresh process; prints JSON.
    Giveback {
        /// Corpus file.
        #[arg(long)]
        corpus: PathBuf,
        /// Codec: lz4 or raw.
        #[arg(long, default_value = "lz4")]
        codec: String,
        /// Transparent huge pages on the allocator's regions.
        #[arg(long)]
        huge: bool,
    },
    /// (internal) random gets over a full pool, in a fresh process; prints JSON.
    Gets {
        /// Corpus file.
        #[arg(long)]
        corpus: PathBuf,
        /// Codec: lz4 or raw.
        #[arg(long, default_value = "lz4")]
        codec: String,
        /// Transparent huge pages on the allocator's regions.
        #[arg(long)]
        huge: bool,
        /// Passes over the pool (the median is reported).
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
    /// (internal) memory efficiency of one configuration, in a fresh process; prints JSON.
    Mem {
        /// Corpus file.
        #[arg(long)]
        corpus: PathBuf,
        /// Configuration name.
        #[arg(long)]
        config: String,
    },
}

fn main() -> Result<()> {
    // Every figure of every subcommand is taken with glibc's mmap threshold fixed (see
    // `sys::fix_mmap_threshold`).
    sys::fix_mmap_threshold();
    match Cli::parse().cmd {
        Cmd::Dump { pids, out } => {
            let mut f = std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&out)?,
            );
            for pid in pids {
                let n = dump::dump_process(pid, &mut f)?;
                eprintln!("pid {pid}: {n} pages ({} MiB)", (n * 4096) >> 20);
            }
            Ok(())
        }
        Cmd::Mem { corpus, config } => {
            let cfg = core_bench::config(&config).context("unknown config")?;
            println!(
                "{}",
                serde_json::to_string(&core_bench::memory(&corpus, cfg)?)?
            );
            Ok(())
        }
        Cmd::Churn { corpus, keys, seed } => {
            println!(
                "{}",
                serde_json::to_string(&churn::tmem_churn(&corpus, keys, seed)?)?
            );
            Ok(())
        }
        Cmd::Giveback {
            corpus,
            codec,
            huge,
        } => {
            println!(
                "{}",
                serde_json::to_string(&churn::giveback(&corpus, &codec, huge)?)?
            );
            Ok(())
        }
        Cmd::Gets {
            corpus,
            codec,
            huge,
            passes,
        } => {
            println!(
                "{}",
                serde_json::to_string(&churn::gets(&corpus, &codec, huge, passes)?)?
            );
            Ok(())
        }
        Cmd::Core {
            corpus,
            pages,
            reps,
            no_zram,
            json,
            no_churn,
            churn_keys,
            seed,
        } => run_core(CoreArgs {
            path: corpus,
            pages,
            reps,
            no_zram,
            json,
            no_churn,
            churn_keys,
            seed,
        }),
    }
}

struct CoreArgs {
    path: PathBuf,
    pages: usize,
    reps: usize,
    no_zram: bool,
    json: Option<PathBuf>,
    no_churn: bool,
    churn_keys: usize,
    seed: u64,
}

fn run_core(a: CoreArgs) -> Result<()> {
    let CoreArgs {
        path,
        pages,
        reps,
        no_zram,
        json,
        no_churn,
        churn_keys,
        seed,
    } = a;
    let started = sys::now_utc();
    let load_start = sys::load_average();
    let full = corpus::Corpus::load(&path, None)?;
    let total_pages = full.pages();
    let zero_pages = total_pages - full.data_pages().len();
    drop(full);
    let c = Arc::new(corpus::Corpus::load(&path, Some(pages))?);
    eprintln!(
        "corpus: {} pages ({} MiB), {} zero/same-filled; throughput on {} pages",
        total_pages,
        (total_pages * 4096) >> 20,
        zero_pages,
        c.pages()
    );
    println!(
        "## tmem-core on {total_pages} real pages ({} MiB; {zero_pages} zero/same-filled)\n",
        (total_pages * 4096) >> 20
    );
    let commit = sys::sh("git rev-parse --short HEAD 2>/dev/null")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dirty = sys::sh("git status --porcelain crates/tmem-core 2>/dev/null")
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    println!(
        "Run started {started}, load average {load_start} (1, 5, 15 min); {} CPUs; tmem-core \
         at commit {}{}. The bench process fixes glibc's `M_MMAP_THRESHOLD` at 128 KiB and \
         calls `malloc_trim(0)` after flush and shrink phases.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if commit.is_empty() { "?" } else { &commit },
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    eprintln!("[1/7] physical limits (memcpy, raw lz4) ...");
    let lim = core_bench::limits(&c);
    print_limits(&lim);
    eprintln!("[2/7] throughput ...");
    let idx: Vec<usize> = (0..c.pages()).collect();
    let mut tp = Vec::new();
    for cfg in core_bench::CONFIGS {
        for threads in [1, 2] {
            eprintln!("      {} x{threads}", cfg.name);
            tp.push(core_bench::throughput(
                &c, *cfg, &idx, threads, false, reps,
            )?);
        }
    }
    for threads in [1, 2] {
        tp.push(core_bench::throughput(
            &c,
            core_bench::ZERO,
            &idx,
            threads,
            true,
            reps,
        )?);
    }
    drop(c);
    print_throughput(&lim, &tp);
    eprintln!("[3/7] memory efficiency (fresh process per config, whole corpus) ...");
    let exe = std::env::current_exe()?;
    let mut mem = Vec::new();
    for cfg in core_bench::CONFIGS {
        let out = std::process::Command::new(&exe)
            .args(["mem", "--corpus"])
            .arg(&path)
            .args(["--config", cfg.name])
            .output()?;
        if !out.status.success() {
            anyhow::bail!("mem {}: {}", cfg.name, String::from_utf8_lossy(&out.stderr));
        }
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        eprintln!(
            "      {}: {:.2}x",
            cfg.name,
            r["ratio_rss"].as_f64().unwrap_or(0.0)
        );
        mem.push(r);
    }
    print_memory(&mem);
    let mut zr = Vec::new();
    if !no_zram {
        eprintln!("[4/7] zram on the same pages ...");
        for alg in ["lz4", "lzo-rle"] {
            match core_bench::zram(&path, alg) {
                Ok(z) => zr.push(z),
                Err(e) => eprintln!("      zram {alg}: skipped ({e:#})"),
            }
        }
        print_zram(&zr);
    }
    let churn = if no_churn {
        None
    } else {
        Some(churn::run(&path, churn_keys, seed, reps, no_zram)?)
    };
    let ended = sys::now_utc();
    let load_end = sys::load_average();
    println!("Run ended {ended}, load average {load_end}.");
    if let Some(j) = json {
        let v = serde_json::json!({
            "started": started, "load_average_start": load_start,
            "ended": ended, "load_average_end": load_end,
            "corpus_pages": total_pages, "zero_pages": zero_pages, "limits": lim,
            "throughput": tp, "memory": mem, "zram": zr, "churn": churn,
        });
        std::fs::write(j, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn print_limits(lim: &core_bench::Limits) {
    println!("### Physical limits, same pages, same run (ns per 4 KiB page)\n");
    println!(
        "| memcpy (random page) | memcpy (hot) | lz4 compress | lz4 decompress | zero check | xxh3 | lz4 decompress + compare |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
        lim.memcpy_ns,
        lim.memcpy_hot_ns,
        lim.lz4_compress_ns,
        lim.lz4_decompress_ns,
        lim.zero_check_ns,
        lim.xxh3_ns,
        lim.lookahead_guess_ns
    );
}

fn print_throughput(lim: &core_bench::Limits, tp: &[core_bench::Throughput]) {
    println!("### Throughput (k pages/s, median)\n");
    println!("| config | put 1T | get 1T | put 2T | get 2T | put scaling | get scaling | put+get 1T vs 2×memcpy |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let names: Vec<&str> = {
        let mut v: Vec<&str> = tp.iter().map(|t| t.config.as_str()).collect();
        v.dedup();
        v
    };
    for n in names {
        let one = tp.iter().find(|t| t.config == n && t.threads == 1);
        let two = tp.iter().find(|t| t.config == n && t.threads == 2);
        if let (Some(a), Some(b)) = (one, two) {
            let pg_ns = 1e9 / a.put_per_s + 1e9 / a.get_per_s;
            println!(
                "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.2}× |",
                a.put_per_s / 1e3,
                a.get_per_s / 1e3,
                b.put_per_s / 1e3,
                b.get_per_s / 1e3,
                b.put_per_s / a.put_per_s,
                b.get_per_s / a.get_per_s,
                pg_ns / (2.0 * lim.memcpy_ns)
            );
        }
    }
    println!();
}

fn print_memory(mem: &[serde_json::Value]) {
    println!("### Memory: logical bytes / process RSS growth (whole corpus, fresh process each)\n");
    println!("| config | ratio (RSS) | engine ratio | index B/page | fragmentation | compression | dedup |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for m in mem {
        let f = |k: &str| m[k].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {:.3}× | {:.3}× | {:.1} | {:.1} % | {:.2}× | {:.3}× |",
            m["config"].as_str().unwrap_or("?"),
            f("ratio_rss"),
            f("logical_bytes") / f("engine_held_bytes").max(1.0),
            f("index_bytes_per_page"),
            100.0 * f("fragmentation"),
            f("compression_ratio"),
            f("dedup_ratio")
        );
    }
    println!();
}

fn print_zram(zr: &[core_bench::ZramResult]) {
    if zr.is_empty() {
        return;
    }
    println!("### zram on the same bytes (kernel, same run)\n");
    println!("| alg | corpus / mem_used_total (zram's view) | slot table (VmallocUsed Δ) | slab Δ (noisy) | corpus / all of it (our definition) |");
    println!("| --- | --- | --- | --- | --- |");
    for z in zr {
        let mib = |b: u64| b as f64 / 1048576.0;
        println!(
            "| {} | {:.3}× | {:.2} MiB | {:.2} MiB | {:.3}× |",
            z.alg,
            z.ratio_mm_stat,
            mib(z.table_bytes),
            mib(z.slab_bytes),
            z.ratio_total
        );
    }
    println!();
}
