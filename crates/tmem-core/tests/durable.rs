//! Durable persistent pools: the engine dies (its memory is simply abandoned, as a SIGKILL
//! leaves it) and a new engine recovers every page from the files it left, checked against
//! a model — after random puts, replaces, flushes and compactions, concurrently too — and
//! torn or corrupted slots are never served as data.

use proptest::prelude::*;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use tmem_core::*;

/// Durable memory in files of a directory (what tmemd does under its runtime dir).
#[derive(Debug)]
struct DirMemory {
    dir: PathBuf,
    files: Mutex<HashMap<DurableFile, File>>,
}

impl DirMemory {
    fn new(dir: &Path) -> Arc<DirMemory> {
        std::fs::create_dir_all(dir).unwrap();
        Arc::new(DirMemory {
            dir: dir.to_owned(),
            files: Mutex::new(HashMap::new()),
        })
    }
    fn path(&self, f: DurableFile) -> PathBuf {
        self.dir.join(format!("a{}-c{}.pool", f.arena, f.class))
    }
}

impl DurableMemory for DirMemory {
    fn map(&self, file: DurableFile, window: u32) -> Option<NonNull<u8>> {
        let mut files = self.files.lock().unwrap();
        let f = match files.entry(file) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(self.path(file))
                    .ok()?,
            ),
        };
        let end = (u64::from(window) + 1) * REGION_BYTES as u64;
        if f.metadata().ok()?.len() < end {
            f.set_len(end).ok()?;
        }
        // SAFETY: a shared mapping of our own file, at a window boundary.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                (u64::from(window) * REGION_BYTES as u64) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(p as *mut u8)
    }
    fn unmap(&self, _file: DurableFile, _window: u32, ptr: NonNull<u8>) {
        // SAFETY: a window mapped by `map`.
        unsafe {
            libc::munmap(ptr.as_ptr() as *mut libc::c_void, REGION_BYTES);
        }
    }
    fn files(&self) -> Vec<(DurableFile, u32)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix('a').and_then(|r| r.strip_suffix(".pool")) else {
                continue;
            };
            let Some((a, c)) = rest.split_once("-c") else {
                continue;
            };
            let (Ok(arena), Ok(class)) = (a.parse(), c.parse()) else {
                continue;
            };
            let len = e.metadata().unwrap().len();
            v.push((
                DurableFile { arena, class },
                len.div_ceil(REGION_BYTES as u64) as u32,
            ));
        }
        v
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tmem-durable-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const C: ClientId = ClientId(1);

fn content(c: u16) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    match c % 5 {
        0 => {}                          // zero page: index only
        1 => p.fill((c >> 3) as u8 | 1), // same-filled: stored as data when durable
        _ => {
            let mut x = u64::from(c).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let n = if c % 5 == 2 {
                PAGE_SIZE
            } else {
                100 * usize::from(c % 37) + 64
            };
            for b in p.iter_mut().take(n) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    p
}

fn durable_engine(dir: &Path, codec: Codec) -> (Engine, PoolId, Arc<DirMemory>) {
    let mem = DirMemory::new(dir);
    let e = Engine::with_durable(
        EngineConfig {
            budget: 1 << 30,
            arenas: 2,
            ..Default::default()
        },
        mem.clone(),
    );
    e.add_client(C, ClientConfig::default()).unwrap();
    let p = e
        .create_pool(
            C,
            PoolSpec::private_persistent()
                .with_codec(codec)
                .with_label("swap:test"),
        )
        .unwrap();
    (e, p, mem)
}

fn key(p: PoolId, i: u32) -> PageKey {
    PageKey::new(p, ObjectId::from_u64(3), i)
}

/// Abandons `e` as a killed process would, recovers into a fresh engine, and checks it
/// against the model. Returns the report.
fn crash_and_check(
    e: Engine,
    old_mem: &Arc<DirMemory>,
    model: &HashMap<u32, u16>,
    codec: Codec,
) -> RecoveryReport {
    // Nothing runs at a SIGKILL: the engine's memory is abandoned, its files stay.
    std::mem::forget(e);
    let dir = scratch("recovered");
    let (e2, p2, _mem2) = durable_engine(&dir, codec);
    let report = e2.recover(old_mem.as_ref(), &|tag| {
        (tag == durable_tag("swap:test")).then_some((C, p2))
    });
    let mut out = [0u8; PAGE_SIZE];
    for (&i, &c) in model {
        let got = e2.get(C, key(p2, i), &mut out).unwrap();
        if c % 5 == 0 {
            // A zero page: absent or zero, both read as zero.
            assert!(got.is_none() || out == [0u8; PAGE_SIZE], "page {i}");
        } else {
            assert!(got.is_some(), "page {i} lost: {report:?}");
            assert_eq!(out, content(c), "page {i} wrong");
        }
    }
    // Nothing the model does not hold.
    let st = e2.stats();
    let live = model.values().filter(|&&c| c % 5 != 0).count() as u64;
    assert_eq!(st.persistent_pages - st.same_pages, live, "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
    report
}

#[test]
fn every_acknowledged_page_survives_the_engines_death() {
    let dir = scratch("basic");
    let (e, p, mem) = durable_engine(&dir, Codec::Lz4);
    let mut model = HashMap::new();
    for i in 0..6000u32 {
        let c = (i % 997) as u16;
        e.put(C, key(p, i), &content(c)).unwrap();
        model.insert(i, c);
    }
    // Replace a third, flush a fifth, then compact what the flushes fragmented.
    for i in (0..6000u32).step_by(3) {
        let c = ((i * 7) % 991) as u16 + 3;
        e.put(C, key(p, i), &content(c)).unwrap();
        model.insert(i, c);
    }
    for i in (0..6000u32).step_by(5) {
        e.flush_page(C, key(p, i)).unwrap();
        model.remove(&i);
    }
    let moved = e.compact(usize::MAX).moved;
    assert!(moved > 0, "compaction had work to do");
    let r = crash_and_check(e, &mem, &model, Codec::Lz4);
    assert_eq!(r.torn_slots, 0);
    assert_eq!(r.failed, 0);
    assert!(r.damaged.is_empty());
    // Recovery freed the old memory as it went.
    assert_eq!(
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|f| {
                use std::os::unix::fs::MetadataExt;
                f.metadata().unwrap().blocks()
            })
            .sum::<u64>(),
        0,
        "old files hold no data after recovery"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn torn_slots_are_never_served_and_are_reported() {
    let dir = scratch("torn");
    let (e, p, mem) = durable_engine(&dir, Codec::None);
    for i in 0..64u32 {
        e.put(C, key(p, i), &content(2 + 5 * i as u16)).unwrap();
    }
    std::mem::forget(e);
    // Flip one byte in the payload of a few live slots, as a write cut short would leave.
    let mut flipped = 0;
    for (f, _) in mem.files() {
        let path = mem.path(f);
        let mut bytes = std::fs::read(&path).unwrap();
        // Raw pages: 4128-byte slots, header first.
        let mut at = 0;
        while at + 4128 <= bytes.len() && flipped < 3 {
            if bytes[at + 4] == 1 {
                bytes[at + 32 + 100] ^= 0xff;
                flipped += 1;
            }
            at += 4128 * 9;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    assert_eq!(flipped, 3);
    let dir2 = scratch("torn2");
    let (e2, p2, _m2) = durable_engine(&dir2, Codec::None);
    let r = e2.recover(mem.as_ref(), &|tag| {
        (tag == durable_tag("swap:test")).then_some((C, p2))
    });
    assert_eq!(r.torn_slots, 3);
    assert_eq!(r.pages, 61);
    assert_eq!(r.damaged.len(), 3, "{r:?}");
    let mut out = [0u8; PAGE_SIZE];
    for i in 0..64u32 {
        let damaged = r.damaged.iter().any(|&(_, _, idx)| idx == i);
        let got = e2.get(C, key(p2, i), &mut out).unwrap();
        if damaged {
            assert_eq!(got, None, "a torn page is not served");
        } else {
            assert_eq!(out, content(2 + 5 * i as u16));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[test]
fn concurrent_writers_and_compaction_then_death() {
    let dir = scratch("concurrent");
    let (e, p, mem) = durable_engine(&dir, Codec::Lz4);
    let e = Arc::new(e);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                e.compact(128);
                std::thread::yield_now();
            }
        })
    };
    let workers: Vec<_> = (0..4u32)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                // Each thread owns its own keys, so its model is exact.
                let mut model = HashMap::new();
                let mut x = 0x1234_5678u64 + u64::from(t);
                for n in 0..20_000u32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = t * 10_000 + (x % 1500) as u32;
                    if x % 4 == 0 {
                        e.flush_page(C, key(p, i)).unwrap();
                        model.remove(&i);
                    } else {
                        let c = ((n + t) % 4000) as u16;
                        e.put(C, key(p, i), &content(c)).unwrap();
                        model.insert(i, c);
                    }
                }
                model
            })
        })
        .collect();
    let mut model = HashMap::new();
    for w in workers {
        model.extend(w.join().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    compactor.join().unwrap();
    assert!(e.stats().compaction.moved > 0);
    let e = Arc::try_unwrap(e).unwrap();
    let r = crash_and_check(e, &mem, &model, Codec::Lz4);
    assert_eq!((r.torn_slots, r.failed), (0, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn recovery_matches_the_model(
        ops in proptest::collection::vec((0..4u8, 0..200u32, any::<u16>()), 1..600),
        codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(1))],
    ) {
        let dir = scratch("prop");
        let (e, p, mem) = durable_engine(&dir, codec);
        let mut model = HashMap::new();
        for (op, i, c) in ops {
            match op {
                0 | 1 => {
                    e.put(C, key(p, i), &content(c)).unwrap();
                    model.insert(i, c);
                }
                2 => {
                    e.flush_page(C, key(p, i)).unwrap();
                    model.remove(&i);
                }
                _ => {
                    e.compact(usize::from(c % 64));
                }
            }
        }
        let r = crash_and_check(e, &mem, &model, codec);
        prop_assert_eq!(r.torn_slots, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
