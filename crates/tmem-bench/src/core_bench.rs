//! Engine throughput and memory efficiency, with the physical limits (memcpy, raw lz4) and
//! zram measured in the same run on the same pages.

use anyhow::{Context, Result};
use serde::Serialize;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tmem_core::*;

use crate::corpus::{shuffled, Corpus};
use crate::sys::{median, meminfo_kb, rss_bytes, sh};

/// A named engine configuration.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Config {
    /// Name in the tables.
    pub name: &'static str,
    #[serde(skip)]
    codec: Codec,
    #[serde(skip)]
    dedup: DedupScope,
}

/// The configurations measured.
pub const CONFIGS: &[Config] = &[
    Config {
        name: "raw",
        codec: Codec::None,
        dedup: DedupScope::Off,
    },
    Config {
        name: "dedup",
        codec: Codec::None,
        dedup: DedupScope::Client,
    },
    Config {
        name: "lz4",
        codec: Codec::Lz4,
        dedup: DedupScope::Off,
    },
    Config {
        name: "lz4+dedup",
        codec: Codec::Lz4,
        dedup: DedupScope::Client,
    },
    Config {
        name: "zstd-1",
        codec: Codec::Zstd(1),
        dedup: DedupScope::Off,
    },
    Config {
        name: "zstd-1+dedup",
        codec: Codec::Zstd(1),
        dedup: DedupScope::Client,
    },
];

/// The zero-page run: all-zero pages into an lz4 + dedup pool.
pub const ZERO: Config = Config {
    name: "zero",
    codec: Codec::Lz4,
    dedup: DedupScope::Client,
};

/// Looks a configuration up by name.
pub fn config(name: &str) -> Option<Config> {
    CONFIGS.iter().copied().find(|c| c.name == name)
}

/// Throughput of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Configuration name (or "zero").
    pub config: String,
    /// Threads.
    pub threads: usize,
    /// Puts per second (all threads).
    pub put_per_s: f64,
    /// Gets per second (all threads).
    pub get_per_s: f64,
    /// Engine effective ratio after the puts (logical / held).
    pub effective_ratio: f64,
}

/// Physical limits on the same pages: ns per page.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// memcpy of a random corpus page into a buffer.
    pub memcpy_ns: f64,
    /// memcpy of one hot (cached) page.
    pub memcpy_hot_ns: f64,
    /// raw lz4 compress of a corpus page.
    pub lz4_compress_ns: f64,
    /// raw lz4 decompress of a corpus page.
    pub lz4_decompress_ns: f64,
    /// Zero check of a page (u64 fold), for reference.
    pub zero_check_ns: f64,
    /// xxh3-64 of a page (the dedup search key).
    pub xxh3_ns: f64,
    /// lz4 decompress + 4 KiB compare (what a KSM-style lookahead guess costs here).
    pub lookahead_guess_ns: f64,
}

/// Measures the physical limits (median of 5 runs).
pub fn limits(c: &Corpus) -> Limits {
    let order = shuffled(c.pages(), 7);
    let mut buf = vec![0u8; 4096];
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for &i in &order {
            buf.copy_from_slice(c.page(i));
            black_box(&buf);
        }
        runs.push(t.elapsed().as_nanos() as f64 / order.len() as f64);
    }
    let memcpy_ns = median(runs);
    let hot = c.page(0).to_vec();
    let t = Instant::now();
    for _ in 0..200_000 {
        buf.copy_from_slice(black_box(&hot));
        black_box(&buf);
    }
    let memcpy_hot_ns = t.elapsed().as_nanos() as f64 / 200_000.0;
    // Every data page, in a random order (like the engine's puts and gets, which the
    // throughput runs issue in shuffled order): DRAM-bound, as the engine is.
    let data = c.data_pages();
    let sample: Vec<usize> = shuffled(data.len(), 13)
        .into_iter()
        .map(|k| data[k])
        .collect();
    let mut comp = vec![0u8; 5000];
    let mut compressed = Vec::with_capacity(sample.len());
    let t = Instant::now();
    for &i in &sample {
        let n = lz4::block::compress_to_buffer(c.page(i), None, false, &mut comp).unwrap_or(0);
        compressed.push(comp[..n].to_vec());
    }
    let lz4_compress_ns = t.elapsed().as_nanos() as f64 / sample.len().max(1) as f64;
    let reorder = shuffled(compressed.len(), 17);
    let t = Instant::now();
    for &k in &reorder {
        let _ = lz4::block::decompress_to_buffer(&compressed[k], Some(4096), &mut buf);
        black_box(&buf);
    }
    let lz4_decompress_ns = t.elapsed().as_nanos() as f64 / compressed.len().max(1) as f64;
    let t = Instant::now();
    let mut z = 0u64;
    for &i in &order {
        let p = c.page(i);
        let mut acc = 0u64;
        for w in p.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        z += u64::from(acc == 0);
    }
    black_box(z);
    let zero_check_ns = t.elapsed().as_nanos() as f64 / order.len() as f64;
    let t = Instant::now();
    let mut h = 0u64;
    for &i in &order {
        h ^= xxhash_rust::xxh3::xxh3_64(c.page(i));
    }
    black_box(h);
    let xxh3_ns = t.elapsed().as_nanos() as f64 / order.len() as f64;
    let t = Instant::now();
    let mut same = 0u64;
    for &k in &reorder {
        let _ = lz4::block::decompress_to_buffer(&compressed[k], Some(4096), &mut buf);
        same += u64::from(buf[..] == *c.page(sample[k]));
    }
    black_box(same);
    let lookahead_guess_ns = t.elapsed().as_nanos() as f64 / compressed.len().max(1) as f64;
    Limits {
        xxh3_ns,
        lookahead_guess_ns,
        memcpy_ns,
        memcpy_hot_ns,
        lz4_compress_ns,
        lz4_decompress_ns,
        zero_check_ns,
    }
}

/// Puts `pages` (indexes into the corpus, or zero pages when `zero`) with `threads` threads,
/// then gets them back in a shuffled order. Median of `reps` runs.
pub fn throughput(
    c: &Arc<Corpus>,
    cfg: Config,
    pages: &[usize],
    threads: usize,
    zero: bool,
    reps: usize,
) -> Result<Throughput> {
    let mut puts = Vec::new();
    let mut gets = Vec::new();
    let mut ratio = 0.0;
    for _ in 0..reps {
        let e = Arc::new(Engine::new(EngineConfig {
            budget: u64::MAX / 2,
            ..Default::default()
        }));
        e.add_client(ClientId(1), ClientConfig::default())?;
        let pool = e.create_pool(
            ClientId(1),
            PoolSpec::private_persistent()
                .with_codec(cfg.codec)
                .with_dedup(cfg.dedup),
        )?;
        let chunks: Vec<Vec<(u32, usize)>> = (0..threads)
            .map(|t| {
                pages
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| k % threads == t)
                    .map(|(k, &i)| (k as u32, i))
                    .collect()
            })
            .collect();
        let run = |phase: u8| -> Result<f64> {
            let start = std::sync::Barrier::new(threads);
            let t0 = std::sync::Mutex::new(None::<Instant>);
            std::thread::scope(|s| -> Result<()> {
                let mut hs = Vec::new();
                for chunk in &chunks {
                    let (e, c, start, t0) = (&e, &c, &start, &t0);
                    hs.push(s.spawn(move || -> Result<()> {
                        let zp = [0u8; PAGE_SIZE];
                        let mut out = [0u8; PAGE_SIZE];
                        let order = shuffled(chunk.len(), 11);
                        if start.wait().is_leader() {
                            if let Ok(mut g) = t0.lock() {
                                *g = Some(Instant::now());
                            }
                        }
                        if phase == 0 {
                            for &(k, i) in chunk {
                                let data = if zero { &zp[..] } else { c.page(i) };
                                e.put(
                                    ClientId(1),
                                    PageKey::new(pool, ObjectId::default(), k),
                                    data,
                                )?;
                            }
                        } else {
                            for &j in &order {
                                let (k, _) = chunk[j];
                                e.get(
                                    ClientId(1),
                                    PageKey::new(pool, ObjectId::default(), k),
                                    &mut out,
                                )?;
                                black_box(&out);
                            }
                        }
                        Ok(())
                    }));
                }
                for h in hs {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
                }
                Ok(())
            })?;
            let t0 = t0
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .context("no start time")?;
            Ok(pages.len() as f64 / t0.elapsed().as_secs_f64())
        };
        puts.push(run(0)?);
        ratio = e.stats().effective_ratio();
        gets.push(run(1)?);
    }
    Ok(Throughput {
        config: cfg.name.to_string(),
        threads,
        put_per_s: median(puts),
        get_per_s: median(gets),
        effective_ratio: ratio,
    })
}

/// Memory efficiency of one configuration, measured in this (fresh) process.
#[derive(Debug, Clone, Serialize)]
pub struct MemResult {
    /// Configuration name.
    pub config: String,
    /// Pages put.
    pub pages: u64,
    /// Logical bytes (pages × 4096).
    pub logical_bytes: u64,
    /// Growth of the process's resident memory while the pages were put.
    pub rss_growth_bytes: u64,
    /// logical / RSS growth: the ratio that counts.
    pub ratio_rss: f64,
    /// What the engine accounts (held bytes).
    pub engine_held_bytes: u64,
    /// Index metadata bytes per stored page.
    pub index_bytes_per_page: f64,
    /// Allocator fragmentation (held − payload) / held.
    pub fragmentation: f64,
    /// Compression ratio on data pages.
    pub compression_ratio: f64,
    /// Dedup ratio on data pages.
    pub dedup_ratio: f64,
    /// Zero and same-filled pages.
    pub same_pages: u64,
    /// Allocator figures.
    pub alloc_payload: u64,
    /// Bytes of slots in use.
    pub alloc_slots: u64,
    /// Bytes of slabs.
    pub alloc_held: u64,
}

/// Streams the corpus file into a fresh engine and measures RSS growth.
pub fn memory(path: &Path, cfg: Config) -> Result<MemResult> {
    use std::io::Read;
    let mut f = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
    let mut ec = EngineConfig {
        budget: u64::MAX / 2,
        ..Default::default()
    };
    if let Some(t) = std::env::var("TMEM_BENCH_THRESHOLD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        ec.compress_threshold = t;
    }
    let e = Engine::new(ec);
    e.add_client(ClientId(1), ClientConfig::default())?;
    let pool = e.create_pool(
        ClientId(1),
        PoolSpec::private_persistent()
            .with_codec(cfg.codec)
            .with_dedup(cfg.dedup),
    )?;
    let mut page = [0u8; PAGE_SIZE];
    // Warm the allocator's and hash tables' code paths before the baseline.
    let before = rss_bytes()?;
    let mut n = 0u32;
    while f.read_exact(&mut page).is_ok() {
        e.put(
            ClientId(1),
            PageKey::new(pool, ObjectId::default(), n),
            &page,
        )?;
        n += 1;
    }
    let after = rss_bytes()?;
    let s = e.stats();
    let growth = after.saturating_sub(before).max(1);
    Ok(MemResult {
        config: cfg.name.to_string(),
        pages: u64::from(n),
        logical_bytes: s.logical_bytes,
        rss_growth_bytes: growth,
        ratio_rss: s.logical_bytes as f64 / growth as f64,
        engine_held_bytes: s.held_bytes,
        index_bytes_per_page: s.metadata_bytes as f64 / s.pages.max(1) as f64,
        fragmentation: s.alloc.fragmentation(),
        compression_ratio: s.compression_ratio(),
        dedup_ratio: s.dedup_ratio(),
        same_pages: s.same_pages,
        alloc_payload: s.alloc.payload_bytes,
        alloc_slots: s.alloc.slot_bytes,
        alloc_held: s.alloc.held_bytes,
    })
}

/// zram on the same bytes.
#[derive(Debug, Clone, Serialize)]
pub struct ZramResult {
    /// Algorithm.
    pub alg: String,
    /// orig_data_size (excludes same-filled pages).
    pub orig_bytes: u64,
    /// compr_data_size.
    pub compr_bytes: u64,
    /// mem_used_total.
    pub mem_used_bytes: u64,
    /// Kernel memory for zram's per-slot table, measured as the VmallocUsed growth when the
    /// disk size is set.
    pub table_bytes: u64,
    /// Slab growth while the corpus was written (zsmalloc handles and zspage structs; noisy).
    pub slab_bytes: u64,
    /// Corpus bytes / mem_used_total (zram's own view: compressed pages only).
    pub ratio_mm_stat: f64,
    /// Corpus bytes / (mem_used_total + table + slab): all memory zram needs, the same
    /// definition as our RSS-based ratio.
    pub ratio_total: f64,
}

/// Writes the corpus to /dev/zram0 with `alg`, reads mm_stat, resets the device.
pub fn zram(path: &Path, alg: &str) -> Result<ZramResult> {
    let z = "/sys/block/zram0";
    if !Path::new(z).exists() {
        anyhow::bail!("no /dev/zram0 (zram module not loaded)");
    }
    let size = std::fs::metadata(path)?.len();
    sh(&format!("echo 1 > {z}/reset"))?;
    sh(&format!("echo {alg} > {z}/comp_algorithm"))?;
    let v0 = meminfo_kb("VmallocUsed");
    sh(&format!(
        "echo {} > {z}/disksize",
        (size / 4096 + 1024) * 4096
    ))?;
    let table = meminfo_kb("VmallocUsed").saturating_sub(v0) * 1024;
    let res = (|| -> Result<ZramResult> {
        let s0 = meminfo_kb("Slab");
        sh(&format!(
            "dd if={} of=/dev/zram0 bs=1M oflag=direct status=none",
            path.display()
        ))?;
        let slab = meminfo_kb("Slab").saturating_sub(s0) * 1024;
        let mm = std::fs::read_to_string(format!("{z}/mm_stat"))?;
        let f: Vec<u64> = mm
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let (orig, compr, used) = (
            f.first().copied().unwrap_or(0),
            f.get(1).copied().unwrap_or(0),
            f.get(2).copied().unwrap_or(1).max(1),
        );
        Ok(ZramResult {
            alg: alg.to_string(),
            orig_bytes: orig,
            compr_bytes: compr,
            mem_used_bytes: used,
            table_bytes: table,
            slab_bytes: slab,
            ratio_mm_stat: size as f64 / used as f64,
            ratio_total: size as f64 / (used + table + slab) as f64,
        })
    })();
    let _ = sh(&format!("echo 1 > {z}/reset"));
    res
}
