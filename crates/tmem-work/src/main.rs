//! `tmem-work`: deterministic in-guest workloads for tmem experiments.
//!
//! A small, dependency-free, statically linkable binary that runs inside test
//! guests. Every subcommand takes `--seed`, and given the same seed and
//! arguments produces the same sequence of allocations, touches and outputs.
//!
//! Subcommands:
//! - `eatmem`: the Xen Summit 2008 "eatmem" workload (allocate a random-sized
//!   chunk, write every page a random number of times, free, sleep, repeat).
//! - `memcheck`: fill memory with a per-page checkable pattern, verify it.
//! - `build`: a compile-like job over a source tree (read, CPU work, write).
//! - `resident`: hold the same files as every guest of one image, plus private text,
//!   until told to stop; then check every page.
//! - `light`: a light steady load (a seeded file subset read plus one allocation per
//!   cycle), printing each cycle's duration.
//! - `idle`: sleep until killed.

use std::process::ExitCode;

mod build;
mod light;
mod resident;
mod rng;

use rng::Rng;

/// Size of a page as seen by the workloads.
const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

const USAGE: &str = "\
usage: tmem-work <command> [options]

commands:
  eatmem   --max-mib N [--rounds R (0 = forever)] [--sleep-ms S] [--max-touch K] [--seed X]
           allocate a random size (1..=N MiB), write each page 1..=K times, free,
           sleep a random 0..=S ms; repeat R rounds
  memcheck --mib N [--passes P] [--seed X]
           fill N MiB with a per-page pattern, verify every page (P passes);
           exits 1 on any mismatch
  build    --src DIR --out DIR [--jobs J] [--rounds R] [--work W] [--seed X]
           compile-like job: read every file under DIR, W passes of CPU work per
           file, write an object file; J worker threads; R clean+build cycles
  resident --src DIR --until FILE [--shared-mib N] [--private-mib M] [--seed X]
           load files of DIR page-aligned (N MiB, the same pages in every guest) and
           M MiB of seeded text (private), hold them until FILE exists, check them;
           exits 1 on any changed page
  light    --src DIR [--scan-mib N] [--alloc-mib M] [--sleep-ms S] [--cycles C (0 = forever)] [--seed X]
           light steady load: pick files under DIR (seeded) totalling ~N MiB; each
           cycle reads them all, writes every page of an M MiB allocation once, frees
           it, prints `LAB-CYCLE n=<i> ms=<work time>`, sleeps S ms
  idle     sleep until killed
";

/// Parsed `--key value` options.
struct Opts {
    pairs: Vec<(String, String)>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(key) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            if let Some((k, v)) = key.split_once('=') {
                pairs.push((k.to_string(), v.to_string()));
            } else {
                let v = it
                    .next()
                    .ok_or_else(|| format!("option --{key} needs a value"))?;
                pairs.push((key.to_string(), v.clone()));
            }
        }
        Ok(Self { pairs })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, key: &str, default: Option<u64>) -> Result<u64, String> {
        match self.get(key) {
            Some(v) => parse_num(v).ok_or_else(|| format!("--{key}: not a number: {v:?}")),
            None => default.ok_or_else(|| format!("missing required option --{key}")),
        }
    }

    fn path(&self, key: &str) -> Result<std::path::PathBuf, String> {
        self.get(key)
            .map(std::path::PathBuf::from)
            .ok_or_else(|| format!("missing required option --{key}"))
    }

    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        for (k, _) in &self.pairs {
            if !known.contains(&k.as_str()) {
                return Err(format!("unknown option --{k}"));
            }
        }
        Ok(())
    }
}

/// Parses decimal or `0x` hexadecimal.
fn parse_num(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    if cmd == "-h" || cmd == "--help" || cmd == "help" {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match Opts::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tmem-work: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd.as_str() {
        "eatmem" => eatmem(&opts),
        "memcheck" => memcheck(&opts),
        "build" => build::run(&opts),
        "resident" => resident::run(&opts),
        "light" => light::run(&opts),
        "idle" => idle(&opts),
        other => Err(format!("unknown command {other:?}")),
    };
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tmem-work {cmd}: {e}");
            ExitCode::from(2)
        }
    }
}

fn now_ms(start: std::time::Instant) -> u128 {
    start.elapsed().as_millis()
}

/// The eatmem workload of the Xen Summit 2008 self-ballooning paper.
fn eatmem(o: &Opts) -> Result<u8, String> {
    o.check_known(&["max-mib", "rounds", "sleep-ms", "max-touch", "seed"])?;
    let max_mib = o.num("max-mib", None)?.max(1);
    let rounds = o.num("rounds", Some(10))?;
    let sleep_ms = o.num("sleep-ms", Some(1000))?;
    let max_touch = o.num("max-touch", Some(4))?.max(1);
    let seed = o.num("seed", Some(1))?;
    let mut rng = Rng::new(seed);
    let start = std::time::Instant::now();
    let mut total_mib = 0u64;
    let mut total_touches = 0u64;
    let mut round = 0u64;
    println!(
        "eatmem: start max_mib={max_mib} rounds={rounds} sleep_ms={sleep_ms} max_touch={max_touch} seed={seed}"
    );
    while rounds == 0 || round < rounds {
        let mib = rng.range_inclusive(1, max_mib);
        let touch = rng.range_inclusive(1, max_touch);
        let bytes = usize::try_from(mib)
            .ok()
            .and_then(|m| m.checked_mul(MIB))
            .ok_or("size overflow")?;
        let t0 = std::time::Instant::now();
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(bytes)
            .map_err(|e| format!("allocating {mib} MiB: {e}"))?;
        buf.resize(bytes, 0);
        for t in 0..touch {
            for (i, page) in buf.chunks_mut(PAGE).enumerate() {
                // Write a few words per page so the page is dirty and not all-zero.
                let v = (round as u8) ^ (t as u8) ^ (i as u8) | 1;
                page[0] = v;
                page[PAGE / 2 % page.len()] = v;
            }
            std::hint::black_box(&mut buf);
        }
        let pages = bytes / PAGE;
        total_touches += touch * pages as u64;
        total_mib += mib;
        drop(buf);
        let nap = if sleep_ms == 0 {
            0
        } else {
            rng.range_inclusive(0, sleep_ms)
        };
        println!(
            "eatmem: round={round} mib={mib} touches_per_page={touch} pages={pages} work_ms={} sleep_ms={nap}",
            now_ms(t0)
        );
        std::thread::sleep(std::time::Duration::from_millis(nap));
        round += 1;
    }
    println!(
        "eatmem: done rounds={round} total_mib={total_mib} total_page_touches={total_touches} elapsed_ms={}",
        now_ms(start)
    );
    Ok(0)
}

/// The pattern word `j` of page `page` in pass `pass`.
#[inline]
fn pattern(seed: u64, pass: u64, page: u64, j: u64) -> u64 {
    rng::mix(seed ^ pass.wrapping_mul(0xA24B_AED4_963E_E407) ^ (page << 9 | j))
}

/// Fill memory with a checkable per-page pattern and verify it.
fn memcheck(o: &Opts) -> Result<u8, String> {
    o.check_known(&["mib", "passes", "seed"])?;
    let mib = o.num("mib", None)?;
    let passes = o.num("passes", Some(1))?.max(1);
    let seed = o.num("seed", Some(1))?;
    let words_per_page = PAGE / 8;
    let pages = usize::try_from(mib)
        .ok()
        .and_then(|m| m.checked_mul(MIB / PAGE))
        .ok_or("size overflow")?;
    let mut buf: Vec<u64> = Vec::new();
    buf.try_reserve_exact(pages * words_per_page)
        .map_err(|e| format!("allocating {mib} MiB: {e}"))?;
    buf.resize(pages * words_per_page, 0);
    let start = std::time::Instant::now();
    println!("memcheck: start mib={mib} pages={pages} passes={passes} seed={seed}");
    let mut mismatches = 0u64;
    let mut bad_pages = 0u64;
    for pass in 0..passes {
        for (p, page) in buf.chunks_mut(words_per_page).enumerate() {
            for (j, w) in page.iter_mut().enumerate() {
                *w = pattern(seed, pass, p as u64, j as u64);
            }
        }
        std::hint::black_box(&mut buf);
        let mut pass_bad = 0u64;
        for (p, page) in buf.chunks(words_per_page).enumerate() {
            let mut page_bad = 0u64;
            for (j, w) in page.iter().enumerate() {
                // Volatile read: the check must really read memory back.
                // SAFETY: `w` is a valid, aligned reference into `buf`.
                let got = unsafe { std::ptr::read_volatile(w) };
                if got != pattern(seed, pass, p as u64, j as u64) {
                    page_bad += 1;
                }
            }
            if page_bad > 0 {
                if bad_pages < 10 {
                    println!("memcheck: MISMATCH pass={pass} page={p} words={page_bad}");
                }
                bad_pages += 1;
                pass_bad += page_bad;
            }
        }
        mismatches += pass_bad;
        println!(
            "memcheck: pass={pass} mismatched_words={pass_bad} elapsed_ms={}",
            now_ms(start)
        );
    }
    println!(
        "memcheck: pages={pages} mismatches={mismatches} bad_pages={bad_pages} passes={passes} elapsed_ms={}",
        now_ms(start)
    );
    Ok(if mismatches == 0 { 0 } else { 1 })
}

/// Sleep until killed (SIGTERM's default action ends the process).
fn idle(o: &Opts) -> Result<u8, String> {
    o.check_known(&["seed"])?;
    println!("idle: sleeping until killed");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opts_parse_forms() {
        let a: Vec<String> = ["--mib", "4", "--seed=0x10"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = Opts::parse(&a).unwrap();
        assert_eq!(o.num("mib", None).unwrap(), 4);
        assert_eq!(o.num("seed", None).unwrap(), 16);
        assert_eq!(o.num("passes", Some(3)).unwrap(), 3);
        assert!(o.num("missing", None).is_err());
        assert!(o.check_known(&["mib"]).is_err());
        assert!(Opts::parse(&["--mib".to_string()]).is_err());
        assert!(Opts::parse(&["x".to_string()]).is_err());
    }

    #[test]
    fn pattern_depends_on_all_inputs() {
        let base = pattern(1, 0, 5, 7);
        assert_ne!(base, pattern(2, 0, 5, 7));
        assert_ne!(base, pattern(1, 1, 5, 7));
        assert_ne!(base, pattern(1, 0, 6, 7));
        assert_ne!(base, pattern(1, 0, 5, 8));
        assert_eq!(base, pattern(1, 0, 5, 7));
    }

    #[test]
    fn memcheck_small_passes() {
        let a: Vec<String> = ["--mib", "2", "--passes", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(memcheck(&Opts::parse(&a).unwrap()).unwrap(), 0);
    }

    #[test]
    fn eatmem_small_runs() {
        let a: Vec<String> = ["--max-mib", "2", "--rounds", "2", "--sleep-ms", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(eatmem(&Opts::parse(&a).unwrap()).unwrap(), 0);
    }
}
