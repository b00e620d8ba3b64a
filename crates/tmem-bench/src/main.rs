//! `tmem-bench`: end-to-end benchmarks of tmem against physical limits and peers, measured
//! in the same run. See `scripts/bench-core` and BENCHMARKS.md.

mod core_bench;
mod corpus;
mod dump;

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
        Cmd::Core {
            corpus,
            pages,
            reps,
            no_zram,
            json,
        } => run_core(corpus, pages, reps, no_zram, json),
    }
}

fn run_core(
    path: PathBuf,
    pages: usize,
    reps: usize,
    no_zram: bool,
    json: Option<PathBuf>,
) -> Result<()> {
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
    eprintln!("[1/4] physical limits (memcpy, raw lz4) ...");
    let lim = core_bench::limits(&c);
    eprintln!("[2/4] throughput ...");
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
    eprintln!("[3/4] memory efficiency (fresh process per config, whole corpus) ...");
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
    let mut zr = Vec::new();
    if !no_zram {
        eprintln!("[4/4] zram on the same pages ...");
        for alg in ["lz4", "lzo-rle"] {
            match core_bench::zram(&path, alg) {
                Ok(z) => zr.push(z),
                Err(e) => eprintln!("      zram {alg}: skipped ({e:#})"),
            }
        }
    }
    print_report(total_pages, zero_pages, &lim, &tp, &mem, &zr);
    if let Some(j) = json {
        let v = serde_json::json!({ "corpus_pages": total_pages, "zero_pages": zero_pages, "limits": lim, "throughput": tp, "memory": mem, "zram": zr });
        std::fs::write(j, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn print_report(
    total: usize,
    zero: usize,
    lim: &core_bench::Limits,
    tp: &[core_bench::Throughput],
    mem: &[serde_json::Value],
    zr: &[core_bench::ZramResult],
) {
    println!(
        "## tmem-core on {total} real pages ({} MiB; {zero} zero/same-filled)\n",
        (total * 4096) >> 20
    );
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
    println!(
        "\n### Memory: logical bytes / process RSS growth (whole corpus, fresh process each)\n"
    );
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
    if !zr.is_empty() {
        println!("\n### zram on the same bytes (kernel, same run)\n");
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
    }
}
