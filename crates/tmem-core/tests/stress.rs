//! Concurrent stress: threads × random ops on shared and private pools with a budget small
//! enough to force eviction. Every page carries its own key and a version, so any read can
//! be checked: a persistent page must be exactly the last version its (single) writer put;
//! an ephemeral page must be a version some writer put for that very key and never older
//! than one that writer put and saw acknowledged after a flush. A compactor thread moves
//! payloads between slabs the whole time, and workers shrink the engine now and then.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tmem_core::*;

fn make(key: &PageKey, version: u64, zeroish: bool) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if zeroish && version % 7 == 0 {
        return p; // version 7k pages are zero pages (stored without data)
    }
    p[0..4].copy_from_slice(&key.pool.0.to_le_bytes());
    p[4..12].copy_from_slice(&key.object.0[0].to_le_bytes());
    p[12..16].copy_from_slice(&key.index.0.to_le_bytes());
    p[16..24].copy_from_slice(&version.to_le_bytes());
    // Compressible body derived from key and version: identical for equal (key, version).
    for (i, b) in p.iter_mut().enumerate().skip(24) {
        *b = ((i as u64 / 64) ^ version ^ u64::from(key.index.0)) as u8;
    }
    p
}

fn check(key: &PageKey, page: &[u8; PAGE_SIZE]) -> Option<u64> {
    if page.iter().all(|&b| b == 0) {
        return Some(0); // a zero page: version unknown but self-consistent
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&page[16..24]);
    let version = u64::from_le_bytes(v);
    (make(key, version, false) == *page).then_some(version)
}

#[test]
fn concurrent_random_ops_keep_every_page_consistent() {
    let threads = 4;
    let ops_per_thread = 40_000;
    let e = Arc::new(Engine::new(EngineConfig {
        budget: 3 << 20,
        shards: 16,
        arenas: 2,
        // Store raw and compress in the background (the daemon's mode) to race the
        // compressor against every other op.
        defer_compression_below: 0.9,
        ..Default::default()
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compressor = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += e.compress_deferred(64);
                std::thread::yield_now();
            }
            n
        })
    };
    // Compaction runs concurrently with everything else, all the time.
    let compactor = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut moved = 0;
            while !stop.load(Ordering::Relaxed) {
                moved += e.compact(256).moved;
                std::thread::yield_now();
            }
            moved
        })
    };
    let uuid = PoolUuid(1);
    let mut private = Vec::new();
    for t in 0..threads {
        let c = ClientId(t as u32);
        e.add_client(
            c,
            ClientConfig {
                weight: 100 + 50 * t as u32,
                ..Default::default()
            },
        )
        .unwrap();
        e.authorize_shared(uuid, c);
        let pers = e.create_pool(c, PoolSpec::private_persistent()).unwrap();
        let eph = e
            .create_pool(
                c,
                PoolSpec::private_ephemeral().with_exclusive_gets(t % 2 == 0),
            )
            .unwrap();
        private.push((pers, eph));
    }
    let shared = e
        .create_pool(ClientId(0), PoolSpec::shared_ephemeral(uuid))
        .unwrap();
    for t in 1..threads {
        assert_eq!(
            e.create_pool(ClientId(t as u32), PoolSpec::shared_ephemeral(uuid))
                .unwrap(),
            shared
        );
    }
    let errors = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let e = e.clone();
            let (pers, eph) = private[t];
            let errors = errors.clone();
            std::thread::spawn(move || {
                let c = ClientId(t as u32);
                let mut rng = SmallRng::seed_from_u64(t as u64);
                // Last acknowledged version per persistent key (this thread is its only writer).
                let mut last: std::collections::HashMap<u32, u64> = Default::default();
                let mut out = [0u8; PAGE_SIZE];
                let mut version = 1u64;
                for _ in 0..ops_per_thread {
                    let idx = rng.gen_range(0..300u32);
                    let obj = ObjectId::from_u64(u64::from(idx % 3));
                    version += 1;
                    match rng.gen_range(0..10) {
                        0..=2 => {
                            let key = PageKey::new(pers, obj, idx);
                            match e.put(c, key, &make(&key, version, true)) {
                                Ok(()) => {
                                    last.insert(idx, version);
                                }
                                Err(Error::NoSpace) => {
                                    last.remove(&idx);
                                }
                                Err(other) => panic!("{other}"),
                            }
                        }
                        3..=4 => {
                            let key = PageKey::new(pers, obj, idx);
                            let got = e.get(c, key, &mut out).unwrap();
                            match (got, last.get(&idx)) {
                                (Some(_), Some(&v)) => {
                                    let want = make(&key, v, true);
                                    if out != want {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                (None, Some(_)) | (Some(_), None) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                                (None, None) => {}
                            }
                        }
                        5 => {
                            let key = PageKey::new(pers, obj, idx);
                            e.flush_page(c, key).unwrap();
                            last.remove(&idx);
                        }
                        6 => {
                            let pool = if rng.gen_bool(0.5) { eph } else { shared };
                            let key = PageKey::new(pool, obj, idx);
                            let _ = e.put(c, key, &make(&key, version, true));
                        }
                        7..=8 => {
                            let pool = if rng.gen_bool(0.5) { eph } else { shared };
                            let key = PageKey::new(pool, obj, idx);
                            if e.get(c, key, &mut out).unwrap().is_some()
                                && check(&key, &out).is_none()
                            {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            if rng.gen_ratio(1, 50) {
                                e.shrink(256 << 10);
                            } else {
                                let key = PageKey::new(shared, obj, idx);
                                let _ = e.flush_page(c, key);
                            }
                        }
                    }
                }
                // Final check of every persistent page this thread owns.
                for (&idx, &v) in &last {
                    let key = PageKey::new(pers, ObjectId::from_u64(u64::from(idx % 3)), idx);
                    match e.get(c, key, &mut out).unwrap() {
                        Some(_) if out == make(&key, v, true) => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread panicked");
    }
    stop.store(true, Ordering::Relaxed);
    let compressed = compressor.join().expect("compressor panicked");
    let moved = compactor.join().expect("compactor panicked");
    assert!(moved > 0, "compaction moved pages while the workers ran");
    assert!(
        compressed > 0,
        "deferred pages were compressed in the background"
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "inconsistent reads");
    let s = e.stats();
    // The kernel charges no more than the engine counts (no leaked frame).
    assert!(
        s.resident_bytes <= s.held_bytes,
        "resident {} held {}",
        s.resident_bytes,
        s.held_bytes
    );
    assert!(s.ops.evictions > 0, "the budget forced evictions");
    assert!(
        s.held_bytes <= s.budget + (1 << 20),
        "held {} budget {}",
        s.held_bytes,
        s.budget
    );
    // Tear down releases everything.
    for t in 0..threads {
        e.remove_client(ClientId(t as u32)).unwrap();
    }
    let s = e.stats();
    assert_eq!((s.pages, s.alloc.objects, s.alloc.held_bytes), (0, 0, 0));
}

/// `destroy_pool` racing puts (and gets and flushes) that already resolved the pool: no
/// put may land in a shard after the destroy swept it. Such an orphaned page would stay
/// charged to its client forever (it can be neither evicted nor flushed any more).
#[test]
fn destroy_pool_racing_puts_leaves_no_orphaned_page() {
    let rounds = 300u64;
    let e = Engine::new(EngineConfig {
        budget: 1 << 30,
        shards: 64,
        ..Default::default()
    });
    let c = ClientId(1);
    e.add_client(c, ClientConfig::default()).unwrap();
    e.trim();
    let baseline = e.held_bytes();
    let specs = [
        PoolSpec::private_persistent()
            .with_codec(Codec::None)
            .with_dedup(DedupScope::Off),
        PoolSpec::private_ephemeral(),
        PoolSpec::private_persistent()
            .with_codec(Codec::Zstd(1))
            .with_dedup(DedupScope::Pool),
        PoolSpec::private_ephemeral().with_exclusive_gets(false),
    ];
    for round in 0..rounds {
        let pool = e
            .create_pool(c, specs[round as usize % specs.len()].clone())
            .unwrap();
        let puts = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let (e, puts) = (&e, &puts);
                s.spawn(move || {
                    let mut i = 0u32;
                    loop {
                        let key = PageKey::new(pool, ObjectId([t, round, 0]), i);
                        // Zero pages, duplicates and unique pages: every prepared form.
                        let page = make(&key, u64::from(i % 5), true);
                        match e.put(c, key, &page) {
                            Ok(()) => _ = puts.fetch_add(1, Ordering::Relaxed),
                            Err(Error::UnknownPool(p)) if p == pool => break,
                            Err(other) => panic!("round {round}: put refused: {other}"),
                        }
                        i = (i + 1) % 2048;
                    }
                });
            }
            // A reader/flusher racing the destroy as well.
            let (e, puts) = (&e, &puts);
            s.spawn(move || {
                let mut out = [0u8; PAGE_SIZE];
                let mut i = 0u32;
                loop {
                    let key = PageKey::new(pool, ObjectId([u64::from(i % 3), round, 0]), i);
                    let r = match i % 4 {
                        0 | 1 => e.get(c, key, &mut out).map(drop),
                        2 => e.flush_page(c, key).map(drop),
                        _ => e.flush_object(c, pool, key.object).map(drop),
                    };
                    match r {
                        Ok(()) => {}
                        Err(Error::UnknownPool(p)) if p == pool => break,
                        Err(other) => panic!("round {round}: {other}"),
                    }
                    i = (i + 1) % 2048;
                    if puts.load(Ordering::Relaxed) == 0 {
                        std::thread::yield_now();
                    }
                }
            });
            while puts.load(Ordering::Relaxed) < 32 {
                std::thread::yield_now();
            }
            e.destroy_pool(c, pool).unwrap();
        });
        let cs = e.client_stats(c).unwrap();
        assert_eq!(
            (cs.persistent, cs.ephemeral),
            (HeldStats::default(), HeldStats::default()),
            "round {round}: pages still charged after destroy_pool"
        );
        let s = e.stats();
        assert_eq!((s.pages, s.pools), (0, 0), "round {round}");
    }
    e.trim();
    let s = e.stats();
    assert_eq!((s.alloc.objects, s.alloc.held_bytes), (0, 0));
    assert_eq!(e.held_bytes(), baseline, "held bytes back to the baseline");
}
