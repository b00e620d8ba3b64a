//! `light`: a light, steady guest workload for density experiments.
//!
//! Picks a seeded subset of the files under `--src` totalling about `--scan-mib`, then
//! runs cycles: read every picked file, allocate `--alloc-mib` and write every page of
//! it once, free it, print one `LAB-CYCLE n=<i> ms=<duration>` line (the cycle's work
//! time, sleep excluded), sleep `--sleep-ms`. The picked files and the written bytes
//! depend only on the tree, the options and the seed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::build::walk;
use crate::rng::Rng;
use crate::{Opts, MIB, PAGE};

/// The marker that starts every cycle line.
pub const MARK_CYCLE: &str = "LAB-CYCLE";

/// Indices into `sizes` of a seeded subset whose sizes add up to at least `target`
/// bytes (all of them if the whole set is smaller), in the order they are read.
pub fn pick(sizes: &[u64], target: u64, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    let mut rng = Rng::new(seed);
    // Fisher-Yates shuffle.
    for i in (1..order.len()).rev() {
        let j = rng.range_inclusive(0, i as u64) as usize;
        order.swap(i, j);
    }
    let mut total = 0u64;
    let mut out = Vec::new();
    for i in order {
        if total >= target && !out.is_empty() {
            break;
        }
        total += sizes[i];
        out.push(i);
    }
    out
}

/// Reads `path` to the end through `buf`; returns the bytes read.
fn read_all(path: &Path, buf: &mut [u8]) -> Result<u64, String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut n = 0u64;
    loop {
        match f.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
    }
}

/// Allocates `mib` MiB, writes every page once with a byte derived from `tag`, frees it.
fn alloc_cycle(mib: u64, tag: u64) -> Result<(), String> {
    let bytes = usize::try_from(mib)
        .ok()
        .and_then(|m| m.checked_mul(MIB))
        .ok_or("size overflow")?;
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(bytes)
        .map_err(|e| format!("allocating {mib} MiB: {e}"))?;
    buf.resize(bytes, 0);
    for (i, page) in buf.chunks_mut(PAGE).enumerate() {
        let v = (tag as u8) ^ (i as u8) | 1;
        page[0] = v;
        page[PAGE / 2 % page.len()] = v;
    }
    std::hint::black_box(&mut buf);
    Ok(())
}

/// Runs the `light` subcommand.
pub fn run(o: &Opts) -> Result<u8, String> {
    o.check_known(&["src", "scan-mib", "alloc-mib", "sleep-ms", "cycles", "seed"])?;
    let src = o.path("src")?;
    let scan_mib = o.num("scan-mib", Some(16))?;
    let alloc_mib = o.num("alloc-mib", Some(32))?;
    let sleep_ms = o.num("sleep-ms", Some(1000))?;
    let cycles = o.num("cycles", Some(0))?;
    let seed = o.num("seed", Some(1))?;
    let files = walk(&src)?;
    let mut sizes = Vec::with_capacity(files.len());
    for rel in &files {
        let p = src.join(rel);
        let m = std::fs::metadata(&p).map_err(|e| format!("stat {}: {e}", p.display()))?;
        sizes.push(m.len());
    }
    let idx = pick(&sizes, scan_mib.saturating_mul(MIB as u64), seed);
    if idx.is_empty() {
        return Err(format!("no files under {}", src.display()));
    }
    let picked_bytes: u64 = idx.iter().map(|&i| sizes[i]).sum();
    let picked: Vec<PathBuf> = idx.iter().map(|&i| src.join(&files[i])).collect();
    say(&format!(
        "light: start src={} files={} bytes={picked_bytes} alloc_mib={alloc_mib} sleep_ms={sleep_ms} cycles={cycles} seed={seed}",
        src.display(),
        picked.len()
    ));
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    while cycles == 0 || n < cycles {
        let t0 = Instant::now();
        let mut read = 0u64;
        for p in &picked {
            read += read_all(p, &mut buf)?;
        }
        alloc_cycle(alloc_mib, seed ^ n)?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        say(&format!("{MARK_CYCLE} n={n} ms={ms:.1} read={read}"));
        n += 1;
        if cycles == 0 || n < cycles {
            std::thread::sleep(Duration::from_millis(sleep_ms));
        }
    }
    Ok(0)
}

/// Prints one line; a closed stdout does not stop the workload.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_is_seeded_and_covers_the_target() {
        let sizes: Vec<u64> = (1..=50).map(|i| i * 100).collect();
        let a = pick(&sizes, 10_000, 7);
        assert_eq!(a, pick(&sizes, 10_000, 7));
        assert_ne!(a, pick(&sizes, 10_000, 8));
        let total: u64 = a.iter().map(|&i| sizes[i]).sum();
        assert!(total >= 10_000);
        // Minimal: without the last file the target is not reached.
        assert!(total - sizes[a[a.len() - 1]] < 10_000);
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), a.len(), "no file twice");
        // More than there is: everything, once.
        assert_eq!(pick(&sizes, u64::MAX, 1).len(), sizes.len());
        assert!(pick(&[], 10, 1).is_empty());
        assert_eq!(pick(&[5], 0, 1), vec![0]);
    }

    #[test]
    fn light_runs_cycles_over_a_tree() {
        let base = std::env::temp_dir().join(format!("tmem-work-light-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a")).unwrap();
        std::fs::write(base.join("a/x.c"), b"int x;\n".repeat(300)).unwrap();
        std::fs::write(base.join("y.c"), b"int y;\n".repeat(300)).unwrap();
        let args: Vec<String> = [
            "--src",
            base.to_str().unwrap(),
            "--scan-mib",
            "1",
            "--alloc-mib",
            "1",
            "--sleep-ms",
            "0",
            "--cycles",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(run(&Opts::parse(&args).unwrap()).unwrap(), 0);
        std::fs::remove_dir_all(&base).unwrap();
        let empty = std::env::temp_dir().join(format!("tmem-work-light-e-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let args = vec!["--src".to_string(), empty.to_str().unwrap().to_string()];
        assert!(run(&Opts::parse(&args).unwrap()).is_err());
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
