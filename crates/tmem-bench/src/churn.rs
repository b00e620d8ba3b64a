//! Churn and give-back ("memory truth"): what tmem and zram really hold while pages come
//! and go, how fast tmem gives memory back, and what transparent huge pages change.
//!
//! * **Churn**: one seeded sequence of operations, replayed on a tmem persistent pool (lz4,
//!   dedup off) and on `/dev/zram0` (lz4, then lzo-rle): fill N keys with N corpus pages;
//!   5 rounds of N operations, alternately a put of a random corpus page to a random key and
//!   a discard of a random key; a discard of 75 % of the keys still live; compaction. After
//!   every phase: live logical bytes ÷ memory, for tmem by the process's RSS growth (after
//!   `malloc_trim(0)`), by the engine's `held_bytes` and by its `resident_bytes`; for zram
//!   by `mm_stat`'s `mem_used_total`.
//! * **Give-back**: a full ephemeral pool, `Engine::shrink(held / 2)` timed, the RSS drop
//!   per second, and the machine's `MemAvailable` / `AnonHugePages` around it.
//! * **Huge pages**: random gets over a full pool with `huge_pages` off and on.
//!
//! Every tmem figure is measured in a fresh child process (`tmem-bench churn | giveback |
//! gets`), so that one run's heap does not weigh on the next.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;
use tmem_core::*;

use crate::corpus::{shuffled, Corpus};
use crate::sys;

/// `Op::page` of a discard.
const DISCARD: u32 = u32::MAX;
/// Churn rounds.
pub const ROUNDS: usize = 5;
/// Share of the live keys discarded after the churn rounds, in per cent.
const FINAL_DISCARD_PCT: usize = 75;
/// Slack allowed between RSS growth and held bytes on top of 5 %.
const AGREEMENT_SLACK: u64 = 4 << 20;

/// One operation: a put of corpus page `page` to `key`, or a discard of `key`.
#[derive(Clone, Copy)]
struct Op {
    key: u32,
    page: u32,
}

/// One phase of the churn sequence.
pub struct Phase {
    /// Name in the tables.
    pub name: String,
    ops: Vec<Op>,
    compact: bool,
    /// Keys live at the end of the phase.
    pub live_pages: u64,
}

/// splitmix64: a small seeded generator, identical on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> u32 {
        (self.next() % n as u64) as u32
    }
}

/// The churn sequence for `keys` keys over a corpus of `corpus_pages` pages.
pub fn plan(keys: usize, corpus_pages: usize, seed: u64) -> Result<Vec<Phase>> {
    if keys == 0 || corpus_pages == 0 || keys >= DISCARD as usize {
        bail!("churn: {keys} keys over {corpus_pages} corpus pages");
    }
    let mut rng = Rng(seed);
    let mut live = vec![false; keys];
    let count = |live: &[bool]| live.iter().filter(|&&l| l).count() as u64;
    let mut phases = Vec::new();
    let fill: Vec<Op> = (0..keys)
        .map(|k| Op {
            key: k as u32,
            page: (k % corpus_pages) as u32,
        })
        .collect();
    live.iter_mut().for_each(|l| *l = true);
    phases.push(Phase {
        name: "fill".into(),
        ops: fill,
        compact: false,
        live_pages: count(&live),
    });
    for round in 1..=ROUNDS {
        let mut ops = Vec::with_capacity(keys);
        for i in 0..keys {
            let key = rng.below(keys);
            if i % 2 == 0 {
                ops.push(Op {
                    key,
                    page: rng.below(corpus_pages),
                });
                live[key as usize] = true;
            } else {
                ops.push(Op { key, page: DISCARD });
                live[key as usize] = false;
            }
        }
        phases.push(Phase {
            name: format!("churn {round}"),
            ops,
            compact: false,
            live_pages: count(&live),
        });
    }
    let left: Vec<u32> = (0..keys as u32).filter(|&k| live[k as usize]).collect();
    let order = shuffled(left.len(), rng.next());
    let ops: Vec<Op> = order[..left.len() * FINAL_DISCARD_PCT / 100]
        .iter()
        .map(|&i| Op {
            key: left[i],
            page: DISCARD,
        })
        .collect();
    for op in &ops {
        live[op.key as usize] = false;
    }
    phases.push(Phase {
        name: format!("discard {FINAL_DISCARD_PCT} %"),
        ops,
        compact: false,
        live_pages: count(&live),
    });
    phases.push(Phase {
        name: "compacted".into(),
        ops: Vec::new(),
        compact: true,
        live_pages: count(&live),
    });
    Ok(phases)
}

fn codec(name: &str) -> Result<Codec> {
    Ok(match name {
        "lz4" => Codec::Lz4,
        "raw" => Codec::None,
        other => bail!("unknown codec {other} (lz4 or raw)"),
    })
}

fn engine(huge: bool) -> Engine {
    Engine::new(EngineConfig {
        budget: u64::MAX / 2,
        huge_pages: huge,
        ..Default::default()
    })
}

const CLIENT: ClientId = ClientId(1);

/// tmem after one phase of the churn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TmemPhase {
    /// Phase name.
    pub phase: String,
    /// Keys live by the plan.
    pub live_pages: u64,
    /// Pages the engine says it holds (must equal `live_pages`).
    pub engine_pages: u64,
    /// Seconds the phase took (operations, or compaction).
    pub seconds: f64,
    /// RSS growth over the baseline before `malloc_trim(0)`.
    pub rss_growth_untrimmed: u64,
    /// RSS growth over the baseline after `malloc_trim(0)`.
    pub rss_growth: u64,
    /// `Engine::held_bytes`.
    pub held_bytes: u64,
    /// `Engine::resident_bytes` (mincore on the regions + tables by capacity).
    pub resident_bytes: u64,
    /// Index and dedup metadata (held − allocator).
    pub metadata_bytes: u64,
    /// Allocator: frames and tables.
    pub alloc_held: u64,
    /// Allocator: payload bytes.
    pub alloc_payload: u64,
    /// Allocator: slot bytes in use.
    pub alloc_slots: u64,
    /// Allocator: live slabs.
    pub alloc_slabs: u64,
    /// Allocator: spare frames.
    pub alloc_spare: u64,
    /// Allocator: tables.
    pub alloc_tables: u64,
    /// Allocator: what compaction could free now.
    pub compactable: u64,
    /// Allocator: 2 MiB regions mapped.
    pub regions: u64,
    /// Compaction so far: payloads moved.
    pub moved: u64,
    /// Compaction so far: bytes given back.
    pub compacted_bytes: u64,
    /// The C heap after the trim.
    pub heap: sys::Heap,
}

/// Replays the churn sequence on a fresh engine in this process (a child of `core`).
pub fn tmem_churn(path: &Path, keys: usize, seed: u64) -> Result<Vec<TmemPhase>> {
    let c = Corpus::load(path, None)?;
    let keys = if keys == 0 { c.pages() } else { keys };
    let phases = plan(keys, c.pages(), seed)?;
    let e = engine(false);
    e.add_client(CLIENT, ClientConfig::default())?;
    let pool = e.create_pool(
        CLIENT,
        PoolSpec::private_persistent()
            .with_codec(Codec::Lz4)
            .with_dedup(DedupScope::Off),
    )?;
    let key = |k: u32| PageKey::new(pool, ObjectId::default(), k);
    sys::malloc_trim();
    let base = sys::rss_bytes()?;
    let mut out = Vec::new();
    for ph in &phases {
        let t = Instant::now();
        for op in &ph.ops {
            if op.page == DISCARD {
                e.flush_page(CLIENT, key(op.key))?;
            } else {
                e.put(CLIENT, key(op.key), c.page(op.page as usize))?;
            }
        }
        if ph.compact {
            loop {
                let s = e.compact(usize::MAX);
                if s.moved == 0 && s.slabs_freed == 0 {
                    break;
                }
            }
        }
        let seconds = t.elapsed().as_secs_f64();
        let untrimmed = sys::rss_bytes()?.saturating_sub(base);
        sys::malloc_trim();
        let rss = sys::rss_bytes()?.saturating_sub(base);
        let s = e.stats();
        out.push(TmemPhase {
            phase: ph.name.clone(),
            live_pages: ph.live_pages,
            engine_pages: s.pages,
            seconds,
            rss_growth_untrimmed: untrimmed,
            rss_growth: rss,
            held_bytes: s.held_bytes,
            resident_bytes: s.resident_bytes,
            metadata_bytes: s.metadata_bytes,
            alloc_held: s.alloc.held_bytes,
            alloc_payload: s.alloc.payload_bytes,
            alloc_slots: s.alloc.slot_bytes,
            alloc_slabs: s.alloc.slabs,
            alloc_spare: s.alloc.spare_bytes,
            alloc_tables: s.alloc.table_bytes,
            compactable: s.alloc.compactable_bytes,
            regions: s.alloc.regions,
            moved: s.compaction.moved,
            compacted_bytes: s.compaction.bytes_freed,
            heap: sys::heap(),
        });
        eprintln!(
            "      tmem {:<12} live {:>7}  RSS {:>7.1} MiB  held {:>7.1} MiB  {:.2} s",
            ph.name,
            ph.live_pages,
            mib(rss),
            mib(s.held_bytes),
            seconds
        );
    }
    Ok(out)
}

/// zram after one phase of the churn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZramPhase {
    /// Phase name.
    pub phase: String,
    /// Keys live by the plan.
    pub live_pages: u64,
    /// Pages zram says it stores (`orig_data_size` / 4 KiB; must equal `live_pages`).
    pub stored_pages: u64,
    /// Seconds the phase took.
    pub seconds: f64,
    /// `compr_data_size`.
    pub compr_bytes: u64,
    /// `mem_used_total`.
    pub mem_used_bytes: u64,
    /// `same_pages`.
    pub same_pages: u64,
    /// `pages_compacted` so far.
    pub pages_compacted: u64,
}

/// zram through the whole churn sequence with one algorithm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZramChurn {
    /// Algorithm.
    pub alg: String,
    /// The per-slot table (VmallocUsed growth when the disk size was set; not in
    /// `mem_used_total`).
    pub table_bytes: u64,
    /// Per phase.
    pub phases: Vec<ZramPhase>,
}

const ZRAM: &str = "/sys/block/zram0";
/// `BLKDISCARD` = `_IO(0x12, 119)`.
const BLKDISCARD: libc::Ioctl = 0x1277;

/// Resets /dev/zram0 when dropped, whatever happened.
struct ZramReset;

impl Drop for ZramReset {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{ZRAM}/reset"), "1");
    }
}

#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

fn mm_stat() -> Result<Vec<u64>> {
    Ok(std::fs::read_to_string(format!("{ZRAM}/mm_stat"))?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect())
}

/// Replays the churn sequence on /dev/zram0 with `alg`: puts are 4 KiB `O_DIRECT` writes,
/// discards 4 KiB `BLKDISCARD`s, compaction `compact`. Resets the device afterwards.
pub fn zram_churn(c: &Corpus, phases: &[Phase], keys: usize, alg: &str) -> Result<ZramChurn> {
    if !Path::new(ZRAM).exists() {
        bail!("no /dev/zram0 (zram module not loaded)");
    }
    let _reset = ZramReset;
    sys::sh(&format!("echo 1 > {ZRAM}/reset"))?;
    sys::sh(&format!("echo {alg} > {ZRAM}/comp_algorithm"))?;
    let v0 = sys::meminfo_kb("VmallocUsed");
    sys::sh(&format!("echo {} > {ZRAM}/disksize", keys * PAGE_SIZE))?;
    let table_bytes = sys::meminfo_kb("VmallocUsed").saturating_sub(v0) * 1024;
    let dmax: u64 = sys::sh(&format!("cat {ZRAM}/queue/discard_max_bytes"))?
        .trim()
        .parse()
        .unwrap_or(0);
    if dmax < PAGE_SIZE as u64 {
        bail!("/dev/zram0 does not take discards");
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/zram0")
        .context("opening /dev/zram0")?;
    let fd = dev.as_raw_fd();
    let mut buf = Box::new(AlignedPage([0; PAGE_SIZE]));
    let mut out = Vec::new();
    for ph in phases {
        let t = Instant::now();
        for op in &ph.ops {
            let off = u64::from(op.key) * PAGE_SIZE as u64;
            if op.page == DISCARD {
                let range = [off, PAGE_SIZE as u64];
                // SAFETY: BLKDISCARD reads two u64 (offset, length) from the pointer, which
                // points at `range`, alive for the call.
                let r = unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) };
                if r != 0 {
                    return Err(std::io::Error::last_os_error()).context("BLKDISCARD");
                }
            } else {
                buf.0.copy_from_slice(c.page(op.page as usize));
                dev.write_all_at(&buf.0, off)
                    .context("writing /dev/zram0")?;
            }
        }
        if ph.compact {
            sys::sh(&format!("echo 1 > {ZRAM}/compact"))?;
        }
        let seconds = t.elapsed().as_secs_f64();
        let f = mm_stat()?;
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        out.push(ZramPhase {
            phase: ph.name.clone(),
            live_pages: ph.live_pages,
            stored_pages: at(0) / PAGE_SIZE as u64,
            seconds,
            compr_bytes: at(1),
            mem_used_bytes: at(2).max(1),
            same_pages: at(5),
            pages_compacted: at(6),
        });
        eprintln!(
            "      zram {alg:<7} {:<12} live {:>7}  mem_used {:>7.1} MiB  {:.2} s",
            ph.name,
            ph.live_pages,
            mib(at(2)),
            seconds
        );
    }
    drop(dev);
    Ok(ZramChurn {
        alg: alg.to_string(),
        table_bytes,
        phases: out,
    })
}

/// Give-back speed of one configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GiveBack {
    /// Codec.
    pub codec: String,
    /// `huge_pages`.
    pub huge: bool,
    /// Pages put.
    pub pages: u64,
    /// RSS growth with the pool full.
    pub rss_full: u64,
    /// Held bytes with the pool full.
    pub held_full: u64,
    /// Resident bytes with the pool full.
    pub resident_full: u64,
    /// The process's AnonHugePages with the pool full.
    pub anon_huge_full: u64,
    /// What `shrink` returned.
    pub released: u64,
    /// Seconds `shrink(held / 2)` took.
    pub seconds: f64,
    /// RSS growth right after `shrink`.
    pub rss_after: u64,
    /// Held bytes after.
    pub held_after: u64,
    /// Resident bytes after.
    pub resident_after: u64,
    /// The process's AnonHugePages after.
    pub anon_huge_after: u64,
    /// RSS growth after `malloc_trim(0)`.
    pub rss_after_trim: u64,
    /// Machine-wide MemAvailable gained across the shrink (bytes; other processes add
    /// noise, and pages freed into the per-CPU lists do not show here yet).
    pub mem_available_gain: i64,
    /// Machine-wide free memory gained across the shrink, counting the per-CPU page lists
    /// (`MemFree` + pagesets' `count`; other processes add noise).
    pub free_gain: i64,
    /// What backs the huge page mappings with the pool full (THP runs only).
    pub thp_full: sys::ThpFootprint,
    /// The same right after the shrink.
    pub thp_after: sys::ThpFootprint,
    /// Machine-wide AnonHugePages change across the shrink (bytes).
    pub sys_anon_huge_change: i64,
    /// Huge page mappings split during the shrink (`thp_split_pmd`).
    pub thp_split_pmd: u64,
    /// Huge pages queued for a deferred split (`thp_deferred_split_page`): partly freed,
    /// still charged in full until the kernel splits them.
    pub thp_deferred_split: u64,
    /// Huge pages split (`thp_split_page`).
    pub thp_split_page: u64,
}

impl GiveBack {
    /// RSS drop per second, GiB/s.
    pub fn gib_per_s(&self) -> f64 {
        self.rss_full.saturating_sub(self.rss_after) as f64 / self.seconds.max(1e-9) / GIB
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn signed_mib(b: i64) -> f64 {
    b as f64 / 1048576.0
}

/// Fills an ephemeral pool with the whole corpus and times `shrink(held / 2)`.
pub fn giveback(path: &Path, codec_name: &str, huge: bool) -> Result<GiveBack> {
    let c = Corpus::load(path, None)?;
    let e = engine(huge);
    e.add_client(CLIENT, ClientConfig::default())?;
    let pool = e.create_pool(
        CLIENT,
        PoolSpec::private_ephemeral()
            .with_codec(codec(codec_name)?)
            .with_dedup(DedupScope::Off),
    )?;
    sys::malloc_trim();
    let base = sys::rss_bytes()?;
    for k in 0..c.pages() {
        e.put(
            CLIENT,
            PageKey::new(pool, ObjectId::default(), k as u32),
            c.page(k),
        )?;
    }
    let rss_full = sys::rss_bytes()?.saturating_sub(base);
    let held_full = e.held_bytes();
    let resident_full = e.resident_bytes();
    let anon_huge_full = sys::own_anon_huge_bytes();
    let thp_full = if huge {
        sys::thp_footprint()?
    } else {
        sys::ThpFootprint::default()
    };
    let vm = |f: &str| sys::vmstat(f);
    let (p0, d0, s0) = (
        vm("thp_split_pmd"),
        vm("thp_deferred_split_page"),
        vm("thp_split_page"),
    );
    let avail0 = sys::meminfo_kb("MemAvailable") as i64;
    let ahp0 = sys::meminfo_kb("AnonHugePages") as i64;
    let free0 = sys::free_bytes() as i64;
    let t = Instant::now();
    let released = e.shrink(held_full / 2);
    let seconds = t.elapsed().as_secs_f64();
    let free1 = sys::free_bytes() as i64;
    let rss_after = sys::rss_bytes()?.saturating_sub(base);
    let avail1 = sys::meminfo_kb("MemAvailable") as i64;
    let ahp1 = sys::meminfo_kb("AnonHugePages") as i64;
    let (p1, d1, s1) = (
        vm("thp_split_pmd"),
        vm("thp_deferred_split_page"),
        vm("thp_split_page"),
    );
    let r = GiveBack {
        codec: codec_name.to_string(),
        huge,
        pages: c.pages() as u64,
        rss_full,
        held_full,
        resident_full,
        anon_huge_full,
        released,
        seconds,
        rss_after,
        held_after: e.held_bytes(),
        resident_after: e.resident_bytes(),
        anon_huge_after: sys::own_anon_huge_bytes(),
        rss_after_trim: {
            sys::malloc_trim();
            sys::rss_bytes()?.saturating_sub(base)
        },
        mem_available_gain: (avail1 - avail0) * 1024,
        free_gain: free1 - free0,
        thp_full,
        thp_after: if huge {
            sys::thp_footprint()?
        } else {
            sys::ThpFootprint::default()
        },
        sys_anon_huge_change: (ahp1 - ahp0) * 1024,
        thp_split_pmd: p1.saturating_sub(p0),
        thp_deferred_split: d1.saturating_sub(d0),
        thp_split_page: s1.saturating_sub(s0),
    };
    Ok(r)
}

/// Get throughput over a full pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gets {
    /// Codec.
    pub codec: String,
    /// `huge_pages`.
    pub huge: bool,
    /// Pages in the pool.
    pub pages: u64,
    /// Puts per second while filling.
    pub put_per_s: f64,
    /// Gets per second (random order over the whole pool; median of the passes).
    pub get_per_s: f64,
    /// RSS growth with the pool full.
    pub rss_growth: u64,
    /// Held bytes.
    pub held_bytes: u64,
    /// The process's AnonHugePages with the pool full.
    pub anon_huge_bytes: u64,
}

/// Fills a persistent pool with the whole corpus, then times `passes` passes of gets of
/// every page in a random order (one thread).
pub fn gets(path: &Path, codec_name: &str, huge: bool, passes: usize) -> Result<Gets> {
    let c = Corpus::load(path, None)?;
    let e = engine(huge);
    e.add_client(CLIENT, ClientConfig::default())?;
    let pool = e.create_pool(
        CLIENT,
        PoolSpec::private_persistent()
            .with_codec(codec(codec_name)?)
            .with_dedup(DedupScope::Off),
    )?;
    let key = |k: usize| PageKey::new(pool, ObjectId::default(), k as u32);
    sys::malloc_trim();
    let base = sys::rss_bytes()?;
    let t = Instant::now();
    for k in 0..c.pages() {
        e.put(CLIENT, key(k), c.page(k))?;
    }
    let put_per_s = c.pages() as f64 / t.elapsed().as_secs_f64();
    let rss_growth = sys::rss_bytes()?.saturating_sub(base);
    let mut out = [0u8; PAGE_SIZE];
    let mut rates = Vec::new();
    for pass in 0..passes.max(1) {
        let order = shuffled(c.pages(), 101 + pass as u64);
        let t = Instant::now();
        for &k in &order {
            if e.get(CLIENT, key(k), &mut out)?.is_none() {
                bail!("page {k} missing");
            }
            std::hint::black_box(&out);
        }
        rates.push(order.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(Gets {
        codec: codec_name.to_string(),
        huge,
        pages: c.pages() as u64,
        put_per_s,
        get_per_s: sys::median(rates),
        rss_growth,
        held_bytes: e.held_bytes(),
        anon_huge_bytes: sys::own_anon_huge_bytes(),
    })
}

/// Runs this executable with `args` and parses its JSON output.
fn child<T: DeserializeOwned>(path: &Path, args: &[&str]) -> Result<T> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(&args[..1])
        .arg("--corpus")
        .arg(path)
        .args(&args[1..])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("tmem-bench {}: failed", args.join(" "));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("tmem-bench {}", args.join(" ")))
}

/// What the churn section found.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    /// Keys of the pool and of the zram disk.
    pub keys: usize,
    /// Seed of the sequence.
    pub seed: u64,
    /// tmem, per phase.
    pub tmem: Vec<TmemPhase>,
    /// zram, per algorithm.
    pub zram: Vec<ZramChurn>,
    /// Give-back runs.
    pub giveback: Vec<GiveBack>,
    /// Huge page get runs.
    pub gets: Vec<Gets>,
}

/// The churn, give-back and huge page sections of `core`: runs them and prints their
/// tables as they finish.
pub fn run(path: &Path, keys: usize, seed: u64, reps: usize, no_zram: bool) -> Result<ChurnReport> {
    let corpus_pages = (std::fs::metadata(path)?.len() / PAGE_SIZE as u64) as usize;
    let keys = if keys == 0 { corpus_pages } else { keys };
    let ks = keys.to_string();
    let ss = seed.to_string();
    eprintln!("[5/7] churn: tmem ({keys} keys, seed {seed}, fresh process) ...");
    let tmem: Vec<TmemPhase> = child(path, &["churn", "--keys", &ks, "--seed", &ss])?;
    let mut zram = Vec::new();
    if !no_zram {
        let c = Corpus::load(path, None)?;
        let phases = plan(keys, c.pages(), seed)?;
        for alg in ["lz4", "lzo-rle"] {
            eprintln!("      churn: zram {alg} (same pages, same operations) ...");
            match zram_churn(&c, &phases, keys, alg) {
                Ok(z) => zram.push(z),
                Err(e) => eprintln!("      zram {alg}: skipped ({e:#})"),
            }
        }
    }
    print_churn(keys, seed, &tmem, &zram);
    eprintln!("[6/7] give-back: shrink(held / 2) of a full ephemeral pool, THP off and on ...");
    let mut gb = Vec::new();
    for codec in ["lz4", "raw"] {
        for _ in 0..reps.max(1) {
            for huge in [false, true] {
                let mut args = vec!["giveback", "--codec", codec];
                if huge {
                    args.push("--huge");
                }
                let g: GiveBack = child(path, &args)?;
                eprintln!(
                    "      {codec} THP {}: {:.1} MiB in {:.3} s = {:.2} GiB/s",
                    if huge { "on " } else { "off" },
                    mib(g.rss_full.saturating_sub(g.rss_after)),
                    g.seconds,
                    g.gib_per_s()
                );
                gb.push(g);
            }
        }
    }
    print_giveback(&gb);
    eprintln!("[7/7] huge pages: random gets over a full pool, THP off and on ...");
    let mut gs = Vec::new();
    for codec in ["lz4", "raw"] {
        for _ in 0..reps.max(1) {
            for huge in [false, true] {
                let mut args = vec!["gets", "--codec", codec];
                if huge {
                    args.push("--huge");
                }
                let g: Gets = child(path, &args)?;
                eprintln!(
                    "      {codec} THP {}: put {:.0} k/s, get {:.0} k/s",
                    if huge { "on " } else { "off" },
                    g.put_per_s / 1e3,
                    g.get_per_s / 1e3
                );
                gs.push(g);
            }
        }
    }
    print_gets(&gs, &gb);
    Ok(ChurnReport {
        keys,
        seed,
        tmem,
        zram,
        giveback: gb,
        gets: gs,
    })
}

fn ratio(logical: u64, mem: u64) -> f64 {
    logical as f64 / mem.max(1) as f64
}

fn agrees(rss: u64, held: u64) -> bool {
    rss.abs_diff(held) <= held / 20 + AGREEMENT_SLACK
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**not met**"
    }
}

fn print_churn(keys: usize, seed: u64, tmem: &[TmemPhase], zram: &[ZramChurn]) {
    println!(
        "### Churn: live logical bytes ÷ memory, same pages, same operations ({keys} keys, seed {seed})\n"
    );
    println!(
        "tmem: one persistent pool, lz4, dedup off, fresh process; RSS growth over the baseline \
         after `malloc_trim(0)` (the process runs with `M_MMAP_THRESHOLD` fixed at 128 KiB). \
         zram: `/dev/zram0`, 4 KiB O_DIRECT writes and BLKDISCARDs, `mem_used_total` from \
         `mm_stat` (its per-slot table, {} MiB, is not in it).\n",
        zram.first()
            .map(|z| format!("{:.2}", mib(z.table_bytes)))
            .unwrap_or_else(|| "?".into())
    );
    let mut head = String::from(
        "| phase | live pages | tmem ÷ RSS | tmem ÷ held | tmem ÷ resident | RSS − held |",
    );
    let mut rule = String::from("| --- | --- | --- | --- | --- | --- |");
    for z in zram {
        head.push_str(&format!(" zram {} ÷ mem_used |", z.alg));
        rule.push_str(" --- |");
    }
    let lz4 = zram.iter().find(|z| z.alg == "lz4");
    if lz4.is_some() {
        head.push_str(" zram lz4 ÷ (mem_used + table) |");
        rule.push_str(" --- |");
    }
    println!("{head}\n{rule}");
    for (i, t) in tmem.iter().enumerate() {
        let logical = t.live_pages * PAGE_SIZE as u64;
        let mut row = format!(
            "| {} | {} | {:.3}× | {:.3}× | {:.3}× | {:+.1} MiB ({:+.1} %) |",
            t.phase,
            t.live_pages,
            ratio(logical, t.rss_growth),
            ratio(logical, t.held_bytes),
            ratio(logical, t.resident_bytes),
            signed_mib(t.rss_growth as i64 - t.held_bytes as i64),
            100.0 * (t.rss_growth as f64 - t.held_bytes as f64) / t.held_bytes.max(1) as f64
        );
        for z in zram {
            match z.phases.get(i) {
                Some(p) => row.push_str(&format!(" {:.3}× |", ratio(logical, p.mem_used_bytes))),
                None => row.push_str(" — |"),
            }
        }
        if let Some(p) = lz4.and_then(|z| z.phases.get(i).map(|p| (z, p))) {
            row.push_str(&format!(
                " {:.3}× |",
                ratio(logical, p.1.mem_used_bytes + p.0.table_bytes)
            ));
        }
        println!("{row}");
    }
    if let Some(z) = zram.iter().find(|z| z.alg == "lz4") {
        println!(
            "\nWhere the bytes are (MiB): tmem's slab frames against zram lz4's zsmalloc pages, \
             and the metadata beside them (zram's per-slot table is fixed: {:.2} MiB):\n",
            mib(z.table_bytes)
        );
        println!("| phase | tmem payload | tmem slab frames | zram compressed data | zram mem_used | tmem allocator tables | tmem index |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for (t, p) in tmem.iter().zip(&z.phases) {
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                t.phase,
                mib(t.alloc_payload),
                mib(t.alloc_held.saturating_sub(t.alloc_tables)),
                mib(p.compr_bytes),
                mib(p.mem_used_bytes),
                mib(t.alloc_tables),
                mib(t.metadata_bytes)
            );
        }
    }
    println!("\ntmem detail (MiB unless said):\n");
    println!("| phase | s | RSS before trim | RSS | held | resident | index | slabs | alloc tables | spare | compactable | regions | moved | heap in use / free |");
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for t in tmem {
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.2} | {:.1} | {} | {} | {:.1} / {:.1} |",
            t.phase,
            t.seconds,
            mib(t.rss_growth_untrimmed),
            mib(t.rss_growth),
            mib(t.held_bytes),
            mib(t.resident_bytes),
            mib(t.metadata_bytes),
            t.alloc_slabs,
            mib(t.alloc_tables),
            mib(t.alloc_spare),
            mib(t.compactable),
            t.regions,
            t.moved,
            mib(t.heap.in_use_bytes),
            mib(t.heap.free_bytes)
        );
    }
    for z in zram {
        let bad: Vec<&str> = z
            .phases
            .iter()
            .filter(|p| p.stored_pages != p.live_pages)
            .map(|p| p.phase.as_str())
            .collect();
        println!(
            "\nzram {}: {} s of operations; compaction moved {} pages{}",
            z.alg,
            z.phases.iter().map(|p| p.seconds).sum::<f64>().round(),
            z.phases.last().map_or(0, |p| p.pages_compacted),
            if bad.is_empty() {
                "; stored pages = live pages in every phase".to_string()
            } else {
                format!("; stored pages ≠ live pages in: {}", bad.join(", "))
            }
        );
    }
    let bad: Vec<&str> = tmem
        .iter()
        .filter(|t| t.engine_pages != t.live_pages)
        .map(|t| t.phase.as_str())
        .collect();
    if !bad.is_empty() {
        println!("\n**tmem pages ≠ live pages in: {}**", bad.join(", "));
    }
    // Targets.
    println!("\nAgainst the targets:\n");
    if let Some(z) = zram.iter().find(|z| z.alg == "lz4") {
        let behind: Vec<String> = tmem
            .iter()
            .zip(&z.phases)
            .filter(|(t, p)| t.rss_growth > p.mem_used_bytes)
            .map(|(t, p)| {
                format!(
                    "{} ({:.3}× vs {:.3}×)",
                    t.phase,
                    ratio(t.live_pages * PAGE_SIZE as u64, t.rss_growth),
                    ratio(p.live_pages * PAGE_SIZE as u64, p.mem_used_bytes)
                )
            })
            .collect();
        println!(
            "* tmem's RSS ratio ≥ zram lz4's in every phase: {}{}",
            met(behind.is_empty()),
            if behind.is_empty() {
                String::new()
            } else {
                format!(" (behind in: {})", behind.join("; "))
            }
        );
    }
    if let (Some(f), Some(l)) = (tmem.first(), tmem.last()) {
        let rf = ratio(f.live_pages * PAGE_SIZE as u64, f.rss_growth);
        let rl = ratio(l.live_pages * PAGE_SIZE as u64, l.rss_growth);
        println!(
            "* after compaction ≥ 0.8× the fill ratio (by RSS): {:.3}× vs {:.3}× = {:.2} of it: {}",
            rl,
            rf,
            rl / rf.max(1e-9),
            met(rl >= 0.8 * rf)
        );
    }
    let off: Vec<&str> = tmem
        .iter()
        .filter(|t| !agrees(t.rss_growth, t.held_bytes))
        .map(|t| t.phase.as_str())
        .collect();
    println!(
        "* RSS growth within 5 % + {} MiB of held bytes in every phase: {}{}\n",
        AGREEMENT_SLACK >> 20,
        met(off.is_empty()),
        if off.is_empty() {
            String::new()
        } else {
            format!(" (off in: {})", off.join(", "))
        }
    );
}

/// The run with the median speed among `runs`.
fn median_run<'a, T>(runs: &[&'a T], key: impl Fn(&T) -> f64) -> Option<&'a T> {
    let mut v: Vec<&T> = runs.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v.get(v.len() / 2).copied()
}

fn print_giveback(gb: &[GiveBack]) {
    println!(
        "### Give-back: `Engine::shrink(held / 2)` on a full ephemeral pool (whole corpus; median of {} runs by speed)\n",
        gb.iter().filter(|g| g.codec == "lz4" && !g.huge).count()
    );
    println!("| codec | THP | held before | RSS before | RSS after | RSS drop | seconds | **RSS drop / s** | free memory gained (machine) | MemAvailable gained (machine) | huge pages before → after | held by the kernel, not in RSS, after | AnonHugePages Δ (machine) | PMDs split / deferred split / split |");
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut all_fast = true;
    for codec in ["lz4", "raw"] {
        for huge in [false, true] {
            let runs: Vec<&GiveBack> = gb
                .iter()
                .filter(|g| g.codec == codec && g.huge == huge)
                .collect();
            let Some(g) = median_run(&runs, GiveBack::gib_per_s) else {
                continue;
            };
            if !huge {
                all_fast &= g.gib_per_s() >= 1.0;
            }
            println!(
                "| {codec} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.3} | {:.2} GiB/s | {:+.1} MiB | {:+.1} MiB | {} → {} | {:.1} MiB | {:+.1} MiB | {} / {} / {} |",
                if huge { "on" } else { "off" },
                mib(g.held_full),
                mib(g.rss_full),
                mib(g.rss_after),
                mib(g.rss_full.saturating_sub(g.rss_after)),
                g.seconds,
                g.gib_per_s(),
                signed_mib(g.free_gain),
                signed_mib(g.mem_available_gain),
                g.thp_full.huge_pages,
                g.thp_after.huge_pages,
                mib(g.thp_after.hidden_bytes()),
                signed_mib(g.sys_anon_huge_change),
                g.thp_split_pmd,
                g.thp_deferred_split,
                g.thp_split_page
            );
        }
    }
    println!(
        "\n* give-back ≥ 1 GiB/s (RSS drop per second, THP off): {}\n",
        met(all_fast)
    );
}

fn print_gets(gs: &[Gets], gb: &[GiveBack]) {
    println!(
        "### Huge pages (`EngineConfig::huge_pages`): THP `enabled` = {}, `defrag` = {}; median of {} runs each, alternated\n",
        sys::sysfs_choice("/sys/kernel/mm/transparent_hugepage/enabled"),
        sys::sysfs_choice("/sys/kernel/mm/transparent_hugepage/defrag"),
        gs.iter().filter(|g| g.codec == "lz4" && !g.huge).count()
    );
    println!("| codec | put k/s off | put k/s on | get k/s off | get k/s on | **get on ÷ off** | AnonHugePages on | RSS − held off | RSS − held on |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for codec in ["lz4", "raw"] {
        let pick = |huge: bool| -> Vec<&Gets> {
            gs.iter()
                .filter(|g| g.codec == codec && g.huge == huge)
                .collect()
        };
        let (off, on) = (pick(false), pick(true));
        if off.is_empty() || on.is_empty() {
            continue;
        }
        let med = |v: &[&Gets], f: fn(&Gets) -> f64| sys::median(v.iter().map(|g| f(g)).collect());
        let gap = |v: &[&Gets]| med(v, |g| g.rss_growth as f64 - g.held_bytes as f64) / 1048576.0;
        println!(
            "| {codec} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3}× | {:.0} MiB | {:+.1} MiB | {:+.1} MiB |",
            med(&off, |g| g.put_per_s) / 1e3,
            med(&on, |g| g.put_per_s) / 1e3,
            med(&off, |g| g.get_per_s) / 1e3,
            med(&on, |g| g.get_per_s) / 1e3,
            med(&on, |g| g.get_per_s) / med(&off, |g| g.get_per_s).max(1.0),
            med(&on, |g| g.anon_huge_bytes as f64) / 1048576.0,
            gap(&off),
            gap(&on)
        );
    }
    let speed = |huge: bool| {
        sys::median(
            gb.iter()
                .filter(|g| g.codec == "lz4" && g.huge == huge)
                .map(GiveBack::gib_per_s)
                .collect(),
        )
    };
    let freed = |huge: bool| {
        sys::median(
            gb.iter()
                .filter(|g| g.codec == "lz4" && g.huge == huge)
                .map(|g| g.free_gain as f64 / g.rss_full.saturating_sub(g.rss_after).max(1) as f64)
                .collect(),
        )
    };
    let hidden = sys::median(
        gb.iter()
            .filter(|g| g.codec == "lz4" && g.huge)
            .map(|g| mib(g.thp_after.hidden_bytes()))
            .collect(),
    );
    println!(
        "\nGive-back, lz4: {:.2} GiB/s with THP off, {:.2} GiB/s with THP on. The machine's free \
         memory (MemFree + per-CPU lists) grew by {:.0} % of the RSS drop with THP off, {:.0} % \
         with THP on; with THP on, {hidden:.1} MiB of split huge pages stay held by the kernel \
         but out of RSS after the shrink (until the kernel's deferred split runs).\n",
        speed(false),
        speed(true),
        100.0 * freed(false),
        100.0 * freed(true)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_seeded_and_counts_live_keys() {
        let a = plan(1000, 300, 8).expect("plan");
        let b = plan(1000, 300, 8).expect("plan");
        assert_eq!(a.len(), ROUNDS + 3);
        let mut live = vec![false; 1000];
        for (pa, pb) in a.iter().zip(&b) {
            assert_eq!(pa.name, pb.name);
            assert_eq!(pa.ops.len(), pb.ops.len());
            for (x, y) in pa.ops.iter().zip(&pb.ops) {
                assert_eq!((x.key, x.page), (y.key, y.page));
                assert!((x.key as usize) < 1000);
                assert!(x.page == DISCARD || (x.page as usize) < 300);
                live[x.key as usize] = x.page != DISCARD;
            }
            assert_eq!(pa.live_pages, live.iter().filter(|&&l| l).count() as u64);
        }
        assert_eq!(a[0].live_pages, 1000);
        let before = a[ROUNDS].live_pages;
        let after = a[ROUNDS + 1].live_pages;
        assert_eq!(after, before - before * 75 / 100);
        assert!(a[ROUNDS + 2].compact && a[ROUNDS + 2].ops.is_empty());
        let other = plan(1000, 300, 9).expect("plan");
        assert!(other[1]
            .ops
            .iter()
            .zip(&a[1].ops)
            .any(|(x, y)| x.key != y.key));
    }
}
