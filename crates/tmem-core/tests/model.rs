//! Model-based property tests: random op sequences against a plain HashMap model, across
//! every pool kind and option, with budgets small enough to force evictions.
//!
//! Invariants checked after every op:
//! * a persistent page is never lost: a get returns exactly the last content put;
//! * an ephemeral get returns either a miss or exactly the last content put (never stale);
//! * the engine never holds more than the budget plus one slab per arena and class in flight;
//! * the kernel never charges more for the engine's regions than the engine counts as held
//!   (every freed frame went back);
//! * compaction (an op of its own, and part of shrink and budget pressure) moves pages
//!   without losing or changing any;
//! * every page an ephemeral pool evicts reaches its eviction sink with exactly the content
//!   the model held for its key before the op, and is gone from the pool afterwards.

use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tmem_core::*;

/// Collects what the engine evicts.
#[derive(Default)]
struct Collect(Mutex<Vec<(PageKey, Vec<u8>)>>);

impl EvictionSink for Collect {
    fn evicted(&self, key: PageKey, data: &[u8]) {
        self.0.lock().unwrap().push((key, data.to_vec()));
    }
}

const C1: ClientId = ClientId(1);
const C2: ClientId = ClientId(2);

#[derive(Debug, Clone)]
enum Op {
    Compress {
        n: u8,
    },
    Put {
        pool: usize,
        obj: u8,
        idx: u8,
        content: u8,
    },
    Get {
        pool: usize,
        obj: u8,
        idx: u8,
        client: bool,
    },
    Flush {
        pool: usize,
        obj: u8,
        idx: u8,
    },
    FlushObject {
        pool: usize,
        obj: u8,
    },
    Shrink {
        kib: u16,
    },
    Budget {
        kib: u16,
    },
    Compact {
        moves: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4usize, 0..3u8, 0..40u8, 0..40u8).prop_map(|(pool, obj, idx, content)| Op::Put { pool, obj, idx, content }),
        4 => (0..4usize, 0..3u8, 0..40u8, any::<bool>()).prop_map(|(pool, obj, idx, client)| Op::Get { pool, obj, idx, client }),
        1 => (0..4usize, 0..3u8, 0..40u8).prop_map(|(pool, obj, idx)| Op::Flush { pool, obj, idx }),
        1 => (0..4usize, 0..3u8).prop_map(|(pool, obj)| Op::FlushObject { pool, obj }),
        1 => (0..64u16).prop_map(|kib| Op::Shrink { kib }),
        1 => (64..1024u16).prop_map(|kib| Op::Budget { kib }),
        2 => (0..16u8).prop_map(|n| Op::Compress { n }),
        1 => (1..512u16).prop_map(|moves| Op::Compact { moves }),
    ]
}

/// Page contents: kinds chosen so that zero, same-filled, duplicate, compressible and
/// incompressible pages all occur.
fn content(c: u8) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    match c {
        0 => {}
        1 => p.fill(0xff),
        2..=5 => {
            for (i, b) in p.iter_mut().enumerate() {
                *b = b"lorem ipsum dolor sit amet "[i % 27] ^ c;
            }
        }
        6..=11 => {
            let mut x = u64::from(c).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for b in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        _ => {
            // Random head, zero tail: payloads of many sizes, so that slabs of many
            // classes fill, empty and fragment.
            let mut x = u64::from(c).wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
            for b in p.iter_mut().take(usize::from(c) * 100) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    p
}

#[derive(Debug, Clone)]
struct Setup {
    codec: Codec,
    dedup: DedupScope,
    exclusive: bool,
    budget_kib: u64,
    shards: usize,
    defer: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(1))],
        prop_oneof![
            Just(DedupScope::Off),
            Just(DedupScope::Pool),
            Just(DedupScope::Client),
            Just(DedupScope::Global)
        ],
        any::<bool>(),
        64..2048u64,
        prop_oneof![Just(1usize), Just(4), Just(64)],
        any::<bool>(),
    )
        .prop_map(
            |(codec, dedup, exclusive, budget_kib, shards, defer)| Setup {
                codec,
                dedup,
                exclusive,
                budget_kib,
                shards,
                defer,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(s in setup(), ops in proptest::collection::vec(op(), 1..300)) {
        let e = Engine::new(EngineConfig {
            budget: s.budget_kib * 1024,
            shards: s.shards,
            arenas: 2,
            defer_compression_below: if s.defer { 0.9 } else { 0.0 },
            ..Default::default()
        });
        e.add_client(C1, ClientConfig::default()).unwrap();
        e.add_client(C2, ClientConfig { weight: 50, ..Default::default() }).unwrap();
        let uuid = PoolUuid(77);
        e.authorize_shared(uuid, C1);
        e.authorize_shared(uuid, C2);
        let specs = [
            PoolSpec::private_persistent(),
            PoolSpec::private_ephemeral().with_exclusive_gets(s.exclusive),
            PoolSpec::shared_ephemeral(uuid),
            PoolSpec::private_persistent(),
        ];
        let mut pools = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let owner = if i == 3 { C2 } else { C1 };
            let id = e.create_pool(owner, spec.with_codec(s.codec).with_dedup(s.dedup)).unwrap();
            pools.push((id, owner));
        }
        // C2 joins the shared pool.
        prop_assert_eq!(e.create_pool(C2, PoolSpec::shared_ephemeral(uuid).with_codec(s.codec).with_dedup(s.dedup)).unwrap(), pools[2].0);
        let persistent = |p: usize| p == 0 || p == 3;
        let sink = Arc::new(Collect::default());
        for p in [1, 2] {
            e.set_eviction_sink(pools[p].1, pools[p].0, Some(sink.clone())).unwrap();
        }
        prop_assert!(e.set_eviction_sink(C1, pools[0].0, Some(sink.clone())).is_err(), "a sink on a persistent pool");
        let mut model: HashMap<(usize, u8, u8), u8> = HashMap::new();
        let mut out = [0u8; PAGE_SIZE];
        for op in ops {
            let before = model.clone();
            let put_key = match &op { Op::Put { pool, obj, idx, .. } => Some((*pool, *obj, *idx)), _ => None };
            match op {
                Op::Put { pool, obj, idx, content: c } => {
                    let (id, owner) = pools[pool];
                    let key = PageKey::new(id, ObjectId::from_u64(obj.into()), idx.into());
                    match e.put(owner, key, &content(c)) {
                        Ok(()) => { model.insert((pool, obj, idx), c); }
                        Err(Error::NoSpace) => {
                            // Refused: the key holds nothing now.
                            model.remove(&(pool, obj, idx));
                        }
                        Err(other) => prop_assert!(false, "unexpected error {other}"),
                    }
                }
                Op::Get { pool, obj, idx, client } => {
                    let (id, owner) = pools[pool];
                    let who = if pool == 2 && client { C2 } else { owner };
                    let key = PageKey::new(id, ObjectId::from_u64(obj.into()), idx.into());
                    let got = e.get(who, key, &mut out).unwrap();
                    match (got, model.get(&(pool, obj, idx))) {
                        (Some(_), Some(&c)) => {
                            prop_assert_eq!(&out[..], &content(c)[..], "stale or wrong content");
                            if pool == 1 && s.exclusive {
                                model.remove(&(pool, obj, idx));
                            }
                        }
                        (Some(_), None) => prop_assert!(false, "get returned a page that was never put or was flushed"),
                        (None, Some(_)) => {
                            prop_assert!(!persistent(pool), "persistent page lost");
                            model.remove(&(pool, obj, idx));
                        }
                        (None, None) => {}
                    }
                }
                Op::Flush { pool, obj, idx } => {
                    let (id, owner) = pools[pool];
                    let key = PageKey::new(id, ObjectId::from_u64(obj.into()), idx.into());
                    let had = e.flush_page(owner, key).unwrap();
                    let modeled = model.remove(&(pool, obj, idx)).is_some();
                    if persistent(pool) {
                        prop_assert_eq!(had, modeled);
                    } else {
                        prop_assert!(!had || modeled, "flushed a page the model does not hold");
                    }
                }
                Op::FlushObject { pool, obj } => {
                    let (id, owner) = pools[pool];
                    e.flush_object(owner, id, ObjectId::from_u64(obj.into())).unwrap();
                    model.retain(|k, _| !(k.0 == pool && k.1 == obj));
                }
                Op::Shrink { kib } => { e.shrink(u64::from(kib) * 1024); }
                Op::Budget { kib } => { e.set_budget(u64::from(kib) * 1024); }
                Op::Compress { n } => { e.compress_deferred(usize::from(n)); }
                Op::Compact { moves } => { e.compact(usize::from(moves)); }
            }
            for (key, data) in std::mem::take(&mut *sink.0.lock().unwrap()) {
                let pool = pools.iter().position(|p| p.0 == key.pool).unwrap();
                prop_assert!(!persistent(pool), "a persistent page was evicted");
                let m = (pool, key.object.0[0] as u8, key.index.0 as u8);
                let Some(&c) = before.get(&m) else {
                    return Err(TestCaseError::fail(format!("evicted {m:?}, which the model did not hold")));
                };
                prop_assert_eq!(&data[..], &content(c)[..], "evicted page with wrong content");
                if put_key != Some(m) {
                    prop_assert!(e.probe(pools[pool].1, key).unwrap().is_none(), "evicted page still in the pool");
                    model.remove(&m);
                }
            }
            let (resident, held) = (e.resident_bytes(), e.held_bytes());
            prop_assert!(resident <= held, "resident {} > held {}", resident, held);
            // Persistent pages are all there, always.
            for (&(pool, obj, idx), &c) in model.iter().filter(|(k, _)| persistent(k.0)) {
                let (id, owner) = pools[pool];
                let key = PageKey::new(id, ObjectId::from_u64(obj.into()), idx.into());
                prop_assert!(e.get(owner, key, &mut out).unwrap().is_some(), "persistent page lost");
                prop_assert_eq!(&out[..], &content(c)[..]);
            }
            let st = e.stats();
            prop_assert_eq!(st.persistent_pages, model.keys().filter(|k| persistent(k.0)).count() as u64);
            prop_assert!(st.ephemeral_pages <= model.keys().filter(|k| !persistent(k.0)).count() as u64);
        }
        // Tear down: everything is released.
        for &(id, owner) in &pools {
            e.destroy_pool(owner, id).unwrap();
        }
        e.destroy_pool(C2, pools[2].0).unwrap();
        let st = e.stats();
        prop_assert_eq!(st.pages, 0);
        prop_assert_eq!(st.alloc.held_bytes, 0);
        // Tables too: nothing keeps its peak size once the pools are gone.
        prop_assert_eq!(st.held_bytes, 0, "metadata left: {}", st.metadata_bytes);
        prop_assert_eq!(e.resident_bytes(), 0);
        prop_assert_eq!(st.alloc.objects, 0);
    }
}
