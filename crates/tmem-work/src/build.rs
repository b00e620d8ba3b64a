//! `build`: a compile-like job over a source tree.
//!
//! Mimics `make clean; make -jJ` from the tmem kernel-compile experiment: each
//! round removes the output directory, then J worker threads take files from a
//! shared queue, read each one, spend CPU time proportional to its size
//! (hashing plus an LZ77-style match search, `--work` passes), and write an
//! "object" file of derived content under `--out`. The printed checksum only
//! depends on the input tree and the options, so it also checks that the
//! guest read its disk correctly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::rng::mix;
use crate::Opts;

/// Recursively lists regular files under `dir`, sorted, as paths relative to `dir`.
pub(crate) fn walk(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let rd = std::fs::read_dir(&abs).map_err(|e| format!("reading {}: {e}", abs.display()))?;
        for ent in rd {
            let ent = ent.map_err(|e| format!("reading {}: {e}", abs.display()))?;
            let ft = ent
                .file_type()
                .map_err(|e| format!("stat {}: {e}", ent.path().display()))?;
            let r = rel.join(ent.file_name());
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// FNV-1a over `data`, continuing from `h`.
fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// "Compiles" one file: `work` passes of hashing and LZ77-style matching.
/// Returns the object bytes and a checksum.
fn compile(src: &[u8], work: u64, seed: u64) -> (Vec<u8>, u64) {
    const WIN_BITS: u32 = 12;
    let mut table = vec![0u32; 1 << WIN_BITS];
    let mut h = fnv1a(0xCBF2_9CE4_8422_2325 ^ seed, src);
    let mut obj = Vec::with_capacity(src.len() / 2 + 64);
    for pass in 0..work.max(1) {
        table.iter_mut().for_each(|t| *t = 0);
        obj.clear();
        let mut i = 0usize;
        let mut literals = 0u64;
        let mut matched = 0u64;
        while i + 4 <= src.len() {
            let w = u32::from_le_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]);
            let slot = (w.wrapping_mul(2_654_435_761) >> (32 - WIN_BITS)) as usize;
            let cand = table[slot] as usize;
            table[slot] = i as u32;
            let mut len = 0usize;
            if cand < i {
                while i + len < src.len() && len < 255 && src[cand + len] == src[i + len] {
                    len += 1;
                }
            }
            if len >= 4 {
                obj.push(0xFF);
                obj.push(len as u8);
                obj.extend_from_slice(&((i - cand) as u16).to_le_bytes());
                matched += len as u64;
                i += len;
            } else {
                obj.push(src[i] ^ (pass as u8));
                literals += 1;
                i += 1;
            }
        }
        obj.extend_from_slice(&src[i..]);
        h = mix(h ^ fnv1a(pass, &obj) ^ literals.rotate_left(17) ^ matched);
    }
    // Object header: a little "symbol table" derived from the content.
    let mut header = Vec::with_capacity(64);
    header.extend_from_slice(b"TMEMOBJ1");
    for k in 0..7u64 {
        header.extend_from_slice(&mix(h ^ k).to_le_bytes());
    }
    header.extend_from_slice(&obj);
    (header, h)
}

struct Totals {
    bytes_read: u64,
    bytes_written: u64,
}

/// Runs the `build` subcommand.
pub fn run(o: &Opts) -> Result<u8, String> {
    o.check_known(&["src", "out", "jobs", "rounds", "work", "seed"])?;
    let src = o.path("src")?;
    let out = o.path("out")?;
    let jobs = usize::try_from(o.num("jobs", Some(1))?.clamp(1, 1024)).unwrap_or(1);
    let rounds = o.num("rounds", Some(1))?.max(1);
    let work = o.num("work", Some(4))?.clamp(1, 1000);
    let seed = o.num("seed", Some(1))?;
    let files = walk(&src)?;
    println!(
        "build: start src={} out={} files={} jobs={jobs} rounds={rounds} work={work} seed={seed}",
        src.display(),
        out.display(),
        files.len()
    );
    let start = std::time::Instant::now();
    let mut grand = Totals {
        bytes_read: 0,
        bytes_written: 0,
    };
    let mut checksum = 0u64;
    for round in 0..rounds {
        let t0 = std::time::Instant::now();
        // make clean
        match std::fs::remove_dir_all(&out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cleaning {}: {e}", out.display())),
        }
        std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
        let next = AtomicUsize::new(0);
        let sums = Mutex::new(vec![0u64; files.len()]);
        let totals = Mutex::new(Totals {
            bytes_read: 0,
            bytes_written: 0,
        });
        let first_err: Mutex<Option<String>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..jobs {
                s.spawn(|| {
                    let mut read = 0u64;
                    let mut written = 0u64;
                    loop {
                        let idx = next.fetch_add(1, Ordering::Relaxed);
                        let Some(rel) = files.get(idx) else { break };
                        let r = (|| -> Result<(), String> {
                            let sp = src.join(rel);
                            let data = std::fs::read(&sp)
                                .map_err(|e| format!("reading {}: {e}", sp.display()))?;
                            let (obj, h) = compile(&data, work, seed);
                            let mut op = out.join(rel);
                            op.set_extension("o");
                            if let Some(parent) = op.parent() {
                                std::fs::create_dir_all(parent)
                                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
                            }
                            std::fs::write(&op, &obj)
                                .map_err(|e| format!("writing {}: {e}", op.display()))?;
                            read += data.len() as u64;
                            written += obj.len() as u64;
                            if let Ok(mut v) = sums.lock() {
                                v[idx] = h;
                            }
                            Ok(())
                        })();
                        if let Err(e) = r {
                            if let Ok(mut fe) = first_err.lock() {
                                fe.get_or_insert(e);
                            }
                            break;
                        }
                    }
                    if let Ok(mut t) = totals.lock() {
                        t.bytes_read += read;
                        t.bytes_written += written;
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().ok().flatten() {
            return Err(e);
        }
        let t = totals.into_inner().map_err(|_| "worker panicked")?;
        let sums = sums.into_inner().map_err(|_| "worker panicked")?;
        checksum = sums.iter().fold(0u64, |acc, &h| mix(acc ^ h));
        println!(
            "build: round={round} files={} bytes_read={} bytes_written={} wall_ms={} checksum={checksum:016x}",
            files.len(),
            t.bytes_read,
            t.bytes_written,
            t0.elapsed().as_millis()
        );
        grand.bytes_read += t.bytes_read;
        grand.bytes_written += t.bytes_written;
    }
    println!(
        "build: done rounds={rounds} files={} bytes_read={} bytes_written={} wall_ms={} checksum={checksum:016x}",
        files.len(),
        grand.bytes_read,
        grand.bytes_written,
        start.elapsed().as_millis()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_is_deterministic_and_compresses_repeats() {
        let src: Vec<u8> = b"int main(void) { return 0; }\n".repeat(100);
        let (a, ha) = compile(&src, 2, 1);
        let (b, hb) = compile(&src, 2, 1);
        assert_eq!(a, b);
        assert_eq!(ha, hb);
        assert!(a.len() < src.len() / 2, "{} vs {}", a.len(), src.len());
        let (_, hc) = compile(&src, 2, 2);
        assert_ne!(ha, hc);
        // Tiny inputs are fine.
        let _ = compile(b"ab", 1, 0);
        let _ = compile(b"", 1, 0);
    }

    #[test]
    fn build_tree_roundtrip() {
        let base = std::env::temp_dir().join(format!("tmem-work-build-{}", std::process::id()));
        let src = base.join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/x.c"), b"static int x = 1;\n".repeat(50)).unwrap();
        std::fs::write(src.join("a/b/y.c"), b"void y(void) {}\n".repeat(70)).unwrap();
        let args: Vec<String> = [
            "--src",
            src.to_str().unwrap(),
            "--out",
            base.join("out").to_str().unwrap(),
            "--jobs",
            "2",
            "--rounds",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rc = run(&Opts::parse(&args).unwrap()).unwrap();
        assert_eq!(rc, 0);
        assert!(base.join("out/a/x.o").is_file());
        assert!(base.join("out/a/b/y.o").is_file());
        assert_eq!(walk(&src).unwrap().len(), 2);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
