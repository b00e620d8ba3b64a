//! Unit-level tests of the engine's contract: quotas, weights, frozen clients, shared-pool
//! authorization, shrink, exclusive gets, replace semantics, dedup and compression.

use tmem_core::*;

const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);

fn page(seed: u64) -> [u8; PAGE_SIZE] {
    // Compressible but distinct per seed: text-like bytes with a seeded header.
    let mut p = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, b) in p.iter_mut().enumerate() {
        if i % 64 < 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        } else {
            *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
        }
    }
    p
}

fn random_page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    for b in p.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    p
}

fn engine(budget: u64) -> Engine {
    let e = Engine::new(EngineConfig::with_budget(budget));
    e.add_client(A, ClientConfig::default()).unwrap();
    e.add_client(B, ClientConfig::default()).unwrap();
    e
}

fn key(pool: PoolId, i: u32) -> PageKey {
    PageKey::new(pool, ObjectId::from_u64(7), i)
}

#[test]
fn persistent_round_trip_all_codecs_and_shapes() {
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)] {
        for dedup in [DedupScope::Off, DedupScope::Client] {
            let e = engine(64 << 20);
            let p = e
                .create_pool(
                    A,
                    PoolSpec::private_persistent()
                        .with_codec(codec)
                        .with_dedup(dedup),
                )
                .unwrap();
            let mut same = [0u8; PAGE_SIZE];
            for c in same.chunks_exact_mut(8) {
                c.copy_from_slice(&0x0102_0304_0506_0708u64.to_ne_bytes());
            }
            let pages = [page(1), random_page(2), [0u8; PAGE_SIZE], same, page(1)];
            for (i, pg) in pages.iter().enumerate() {
                e.put(A, key(p, i as u32), pg).unwrap();
            }
            for (i, pg) in pages.iter().enumerate() {
                let mut out = [0xffu8; PAGE_SIZE];
                let st = e.get(A, key(p, i as u32), &mut out).unwrap();
                assert_eq!(&out, pg, "codec {codec:?} dedup {dedup:?} page {i}");
                assert_eq!(
                    st,
                    Some(if i == 2 {
                        PageState::Zero
                    } else {
                        PageState::Data
                    })
                );
            }
            let s = e.stats();
            assert_eq!(s.pages, 5);
            assert_eq!(s.same_pages, 2);
            if dedup == DedupScope::Client {
                assert_eq!(s.ops.dedup_hits, 1);
                assert_eq!(s.unique_payloads, 2);
            } else {
                assert_eq!(s.unique_payloads, 3);
            }
            if codec != Codec::None {
                assert!(s.ops.compressed_puts >= 1);
                assert!(s.ops.raw_puts >= 1, "random page stays raw");
            }
        }
    }
}

#[test]
fn bad_lengths_are_refused() {
    let e = engine(1 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    assert_eq!(e.put(A, key(p, 0), &[0u8; 100]), Err(Error::BadLength(100)));
    let mut small = [0u8; 10];
    assert_eq!(e.get(A, key(p, 0), &mut small), Err(Error::BadLength(10)));
}

#[test]
fn replace_never_leaves_old_content_and_failed_replace_flushes() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    e.put(A, key(p, 1), &page(1)).unwrap();
    e.put(A, key(p, 1), &page(2)).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    e.get(A, key(p, 1), &mut out).unwrap();
    assert_eq!(out, page(2));
    assert_eq!(e.stats().pages, 1);
    // A replace that fails (frozen) flushes the old content.
    e.freeze(A).unwrap();
    assert_eq!(e.put(A, key(p, 1), &page(3)), Err(Error::Frozen(A)));
    assert_eq!(e.get(A, key(p, 1), &mut out).unwrap(), None);
    // A replace that fails on quota flushes too.
    e.thaw(A).unwrap();
    e.put(A, key(p, 2), &random_page(1)).unwrap();
    e.set_persistent_cap(A, 1).unwrap();
    assert_eq!(
        e.put(A, key(p, 2), &random_page(2)),
        Err(Error::QuotaExceeded(A))
    );
    assert_eq!(e.get(A, key(p, 2), &mut out).unwrap(), None);
}

#[test]
fn frozen_client_refuses_puts_but_serves_gets_and_flushes() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    e.put(A, key(p, 0), &page(0)).unwrap();
    e.put(A, key(p, 1), &page(1)).unwrap();
    e.freeze(A).unwrap();
    assert_eq!(e.put(A, key(p, 5), &page(5)), Err(Error::Frozen(A)));
    let mut out = [0u8; PAGE_SIZE];
    assert_eq!(
        e.get(A, key(p, 0), &mut out).unwrap(),
        Some(PageState::Data)
    );
    assert_eq!(out, page(0));
    assert!(e.flush_page(A, key(p, 1)).unwrap());
    assert!(e.client_stats(A).unwrap().frozen);
    assert_eq!(e.client_stats(A).unwrap().ops.puts_refused, 1);
    e.thaw(A).unwrap();
    e.put(A, key(p, 5), &page(5)).unwrap();
}

#[test]
fn persistent_quota_is_enforced_and_typed() {
    let e = engine(64 << 20);
    e.set_persistent_cap(A, 10 * 4200).unwrap();
    let p = e
        .create_pool(
            A,
            PoolSpec::private_persistent()
                .with_codec(Codec::None)
                .with_dedup(DedupScope::Off),
        )
        .unwrap();
    let mut ok = 0;
    for i in 0..20 {
        match e.put(A, key(p, i), &random_page(u64::from(i))) {
            Ok(()) => ok += 1,
            Err(err) => assert_eq!(err, Error::QuotaExceeded(A)),
        }
    }
    assert_eq!(ok, 10);
    // Flushing makes room again.
    e.flush_page(A, key(p, 0)).unwrap();
    e.put(A, key(p, 100), &random_page(100)).unwrap();
    // Another client is not affected by A's cap.
    let q = e.create_pool(B, PoolSpec::private_persistent()).unwrap();
    for i in 0..20 {
        e.put(B, key(q, i), &random_page(u64::from(i))).unwrap();
    }
}

#[test]
fn full_budget_gives_typed_no_space_for_persistent_and_never_drops() {
    let e = engine(256 << 10);
    let p = e
        .create_pool(
            A,
            PoolSpec::private_persistent()
                .with_codec(Codec::None)
                .with_dedup(DedupScope::Off),
        )
        .unwrap();
    let mut stored = Vec::new();
    let mut refused = 0;
    for i in 0..200u32 {
        match e.put(A, key(p, i), &random_page(u64::from(i))) {
            Ok(()) => stored.push(i),
            Err(Error::NoSpace) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0 && !stored.is_empty());
    assert!(e.held_bytes() <= e.budget() + 64 * 1024);
    let mut out = [0u8; PAGE_SIZE];
    for i in stored {
        assert_eq!(
            e.get(A, key(p, i), &mut out).unwrap(),
            Some(PageState::Data)
        );
        assert_eq!(out, random_page(u64::from(i)));
    }
}

#[test]
fn persistent_puts_evict_ephemeral_pages() {
    let e = engine(512 << 10);
    let eph = e
        .create_pool(
            B,
            PoolSpec::private_ephemeral()
                .with_codec(Codec::None)
                .with_dedup(DedupScope::Off),
        )
        .unwrap();
    for i in 0..200 {
        let _ = e.put(B, key(eph, i), &random_page(1000 + u64::from(i)));
    }
    let before = e.client_stats(B).unwrap().ephemeral.pages;
    assert!(before > 50);
    let p = e
        .create_pool(
            A,
            PoolSpec::private_persistent()
                .with_codec(Codec::None)
                .with_dedup(DedupScope::Off),
        )
        .unwrap();
    for i in 0..50 {
        e.put(A, key(p, i), &random_page(u64::from(i))).unwrap();
    }
    let after = e.client_stats(B).unwrap().ephemeral.pages;
    assert!(
        after < before,
        "ephemeral pages were evicted ({before} -> {after})"
    );
    assert!(e.stats().ops.evictions > 0);
}

/// Xen got the direction of this rule backwards; ours evicts from the client most above
/// its weighted share.
#[test]
fn eviction_takes_first_from_client_most_above_weighted_share() {
    let e = Engine::new(EngineConfig::with_budget(2 << 20));
    let heavy = ClientId(10);
    let light = ClientId(11);
    // Same usage, but `light` is entitled to 3× the share: `heavy` is further above its share.
    e.add_client(
        heavy,
        ClientConfig {
            weight: 100,
            ..Default::default()
        },
    )
    .unwrap();
    e.add_client(
        light,
        ClientConfig {
            weight: 300,
            ..Default::default()
        },
    )
    .unwrap();
    let spec = PoolSpec::private_ephemeral()
        .with_codec(Codec::None)
        .with_dedup(DedupScope::Off);
    let ph = e.create_pool(heavy, spec.clone()).unwrap();
    let pl = e.create_pool(light, spec).unwrap();
    for i in 0..100 {
        e.put(heavy, key(ph, i), &random_page(u64::from(i)))
            .unwrap();
        e.put(light, key(pl, i), &random_page(500 + u64::from(i)))
            .unwrap();
    }
    let freed = e.shrink(200 * 1024);
    assert!(freed >= 200 * 1024, "freed {freed}");
    let h = e.client_stats(heavy).unwrap();
    let l = e.client_stats(light).unwrap();
    assert!(h.ops.evictions > 0);
    assert_eq!(
        l.ops.evictions, 0,
        "the client under its share keeps its pages"
    );
    // Weights flip the choice.
    e.set_weight(heavy, 1000).unwrap();
    e.shrink(100 * 1024);
    assert!(e.client_stats(light).unwrap().ops.evictions > 0);
}

#[test]
fn eviction_is_oldest_first_with_second_chance() {
    let e = Engine::new(EngineConfig {
        budget: 64 << 20,
        shards: 1,
        ..Default::default()
    });
    e.add_client(A, ClientConfig::default()).unwrap();
    let p = e.create_pool(
        A,
        PoolSpec::shared_ephemeral(PoolUuid(9))
            .with_codec(Codec::None)
            .with_dedup(DedupScope::Off),
    );
    assert!(matches!(p, Err(Error::NotAuthorized { .. })));
    e.authorize_shared(PoolUuid(9), A);
    let p = e
        .create_pool(
            A,
            PoolSpec::shared_ephemeral(PoolUuid(9))
                .with_codec(Codec::None)
                .with_dedup(DedupScope::Off),
        )
        .unwrap();
    for i in 0..64 {
        e.put(A, key(p, i), &random_page(u64::from(i))).unwrap();
    }
    // Read page 0: it gets a second chance. Then shrink a little.
    let mut out = [0u8; PAGE_SIZE];
    assert!(e.get(A, key(p, 0), &mut out).unwrap().is_some());
    while e.client_stats(A).unwrap().ephemeral.pages > 60 {
        e.shrink(4096);
    }
    assert!(
        e.get(A, key(p, 0), &mut out).unwrap().is_some(),
        "referenced page survived"
    );
    assert_eq!(
        e.get(A, key(p, 1), &mut out).unwrap(),
        None,
        "oldest unreferenced page went first"
    );
    assert!(
        e.get(A, key(p, 63), &mut out).unwrap().is_some(),
        "newest page kept"
    );
}

#[test]
fn shrink_releases_memory_at_once_and_reports_it() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_ephemeral()).unwrap();
    let q = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    for i in 0..2000 {
        e.put(A, key(p, i), &page(u64::from(i))).unwrap();
    }
    for i in 0..100 {
        e.put(A, key(q, i), &page(10_000 + u64::from(i))).unwrap();
    }
    let held = e.held_bytes();
    let freeable = e.freeable_bytes();
    assert!(freeable > 0 && freeable < held);
    let freed = e.shrink(held / 2);
    assert!(freed >= held / 2, "freed {freed} of {held}");
    assert_eq!(e.held_bytes(), held - freed);
    // Everything: only persistent remains.
    e.shrink(u64::MAX);
    assert_eq!(e.client_stats(A).unwrap().ephemeral.pages, 0);
    assert_eq!(e.client_stats(A).unwrap().persistent.pages, 100);
    let mut out = [0u8; PAGE_SIZE];
    for i in 0..100 {
        e.get(A, key(q, i), &mut out).unwrap();
        assert_eq!(out, page(10_000 + u64::from(i)));
    }
    // set_budget below what is held evicts at once.
    for i in 0..2000 {
        e.put(A, key(p, i), &page(u64::from(i))).unwrap();
    }
    let target = e.held_bytes() / 3;
    e.set_budget(target);
    assert!(e.held_bytes() <= target.max(e.held_bytes() - e.freeable_bytes()) + 64 * 1024);
}

#[test]
fn private_pools_are_private() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    e.put(A, key(p, 0), &page(0)).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    assert_eq!(
        e.get(B, key(p, 0), &mut out),
        Err(Error::AccessDenied { client: B, pool: p })
    );
    assert_eq!(
        e.put(B, key(p, 0), &page(1)),
        Err(Error::AccessDenied { client: B, pool: p })
    );
    assert_eq!(
        e.flush_page(B, key(p, 0)),
        Err(Error::AccessDenied { client: B, pool: p })
    );
    assert_eq!(
        e.flush_object(B, p, ObjectId::from_u64(7)),
        Err(Error::AccessDenied { client: B, pool: p })
    );
    assert_eq!(
        e.destroy_pool(B, p),
        Err(Error::AccessDenied { client: B, pool: p })
    );
    assert_eq!(
        e.get(ClientId(99), key(p, 0), &mut out),
        Err(Error::UnknownClient(ClientId(99)))
    );
    assert_eq!(
        e.get(A, key(PoolId(999), 0), &mut out),
        Err(Error::UnknownPool(PoolId(999)))
    );
    // A's data is intact.
    e.get(A, key(p, 0), &mut out).unwrap();
    assert_eq!(out, page(0));
}

#[test]
fn shared_pools_need_authorization_and_share_pages() {
    let e = engine(64 << 20);
    let uuid = PoolUuid(0x1234_5678_9abc_def0_1122_3344_5566_7788);
    assert_eq!(
        e.create_pool(A, PoolSpec::shared_ephemeral(uuid)),
        Err(Error::NotAuthorized { client: A, uuid })
    );
    assert!(
        e.pools_of(A).is_empty(),
        "a failed join never makes a private pool"
    );
    e.authorize_shared(uuid, A);
    let pa = e.create_pool(A, PoolSpec::shared_ephemeral(uuid)).unwrap();
    assert_eq!(
        e.create_pool(B, PoolSpec::shared_ephemeral(uuid)),
        Err(Error::NotAuthorized { client: B, uuid })
    );
    e.authorize_shared(uuid, B);
    let pb = e.create_pool(B, PoolSpec::shared_ephemeral(uuid)).unwrap();
    assert_eq!(pa, pb);
    e.put(A, key(pa, 3), &page(3)).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    // Shared-ephemeral gets are not exclusive: both can read it, repeatedly.
    assert!(e.get(B, key(pb, 3), &mut out).unwrap().is_some());
    assert_eq!(out, page(3));
    assert!(e.get(A, key(pa, 3), &mut out).unwrap().is_some());
    // B writes a new version: A never sees the old one.
    e.put(B, key(pb, 3), &page(4)).unwrap();
    e.get(A, key(pa, 3), &mut out).unwrap();
    assert_eq!(out, page(4));
    // Spec mismatch is refused.
    e.authorize_shared(uuid, ClientId(1));
    assert_eq!(
        e.create_pool(A, PoolSpec::shared_ephemeral(uuid).with_codec(Codec::None)),
        Err(Error::SpecMismatch(uuid))
    );
    // Shared persistent pools are refused.
    let mut sp = PoolSpec::shared_ephemeral(uuid);
    sp.persistence = Persistence::Persistent;
    assert!(matches!(e.create_pool(A, sp), Err(Error::Unsupported(_))));
    // Leaving: the pool lives until its last member leaves.
    e.destroy_pool(A, pa).unwrap();
    assert!(e.get(B, key(pb, 3), &mut out).unwrap().is_some());
    assert!(matches!(
        e.get(A, key(pa, 3), &mut out),
        Err(Error::AccessDenied { .. })
    ));
    e.destroy_pool(B, pb).unwrap();
    assert_eq!(e.get(B, key(pb, 3), &mut out), Err(Error::UnknownPool(pb)));
    assert_eq!(e.stats().pages, 0);
}

#[test]
fn private_ephemeral_gets_are_exclusive_unless_asked() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_ephemeral()).unwrap();
    let q = e
        .create_pool(A, PoolSpec::private_ephemeral().with_exclusive_gets(false))
        .unwrap();
    e.put(A, key(p, 0), &page(0)).unwrap();
    e.put(A, key(q, 0), &page(0)).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    assert!(e.get(A, key(p, 0), &mut out).unwrap().is_some());
    assert_eq!(
        e.get(A, key(p, 0), &mut out).unwrap(),
        None,
        "exclusive get removed it"
    );
    assert!(e.get(A, key(q, 0), &mut out).unwrap().is_some());
    assert!(
        e.get(A, key(q, 0), &mut out).unwrap().is_some(),
        "non-exclusive keeps it"
    );
}

#[test]
fn flush_object_and_destroy_pool_release_everything() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    for o in 0..3u64 {
        for i in 0..100 {
            e.put(
                A,
                PageKey::new(p, ObjectId::from_u64(o), i),
                &page(o * 1000 + u64::from(i)),
            )
            .unwrap();
        }
    }
    assert_eq!(e.flush_object(A, p, ObjectId::from_u64(1)).unwrap(), 100);
    assert_eq!(e.stats().pages, 200);
    let mut out = [0u8; PAGE_SIZE];
    assert_eq!(
        e.get(A, PageKey::new(p, ObjectId::from_u64(1), 5), &mut out)
            .unwrap(),
        None
    );
    assert!(e
        .get(A, PageKey::new(p, ObjectId::from_u64(2), 5), &mut out)
        .unwrap()
        .is_some());
    e.destroy_pool(A, p).unwrap();
    let s = e.stats();
    assert_eq!(s.pages, 0);
    assert_eq!(s.alloc.objects, 0);
    assert_eq!(s.alloc.held_bytes, 0, "all slabs returned");
}

#[test]
fn dedup_is_per_client_by_default() {
    let e = engine(64 << 20);
    let pa = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    let pa2 = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    let pb = e.create_pool(B, PoolSpec::private_persistent()).unwrap();
    e.put(A, key(pa, 0), &page(42)).unwrap();
    e.put(A, key(pa2, 0), &page(42)).unwrap();
    e.put(B, key(pb, 0), &page(42)).unwrap();
    let s = e.stats();
    assert_eq!(
        s.ops.dedup_hits, 1,
        "same client shares, other client does not"
    );
    assert_eq!(s.unique_payloads, 2);
    // Flushing one reference keeps the other readable.
    e.flush_page(A, key(pa, 0)).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    e.get(A, key(pa2, 0), &mut out).unwrap();
    assert_eq!(out, page(42));
    // Global dedup shares across clients when both opt in.
    let ga = e
        .create_pool(
            A,
            PoolSpec::private_persistent().with_dedup(DedupScope::Global),
        )
        .unwrap();
    let gb = e
        .create_pool(
            B,
            PoolSpec::private_persistent().with_dedup(DedupScope::Global),
        )
        .unwrap();
    e.put(A, key(ga, 0), &page(43)).unwrap();
    e.put(B, key(gb, 0), &page(43)).unwrap();
    assert_eq!(e.stats().ops.dedup_hits, 2);
}

#[test]
fn remove_client_destroys_its_pools() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    e.put(A, key(p, 0), &page(0)).unwrap();
    e.remove_client(A).unwrap();
    assert_eq!(e.stats().pages, 0);
    assert_eq!(e.client_stats(A), Err(Error::UnknownClient(A)));
    assert_eq!(
        e.add_client(B, ClientConfig::default()),
        Err(Error::ClientExists(B))
    );
}

#[test]
fn put_pages_batches() {
    let e = engine(64 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    let mut data = Vec::new();
    for i in 0..40 {
        data.extend_from_slice(&page(i));
    }
    let r = e.put_pages(A, p, ObjectId::from_u64(7), 10, &data).unwrap();
    assert!(r.iter().all(|r| r.is_ok()));
    let mut out = [0u8; PAGE_SIZE];
    for i in 0..40 {
        e.get(A, key(p, 10 + i as u32), &mut out).unwrap();
        assert_eq!(out, page(i));
    }
    assert_eq!(
        e.put_pages(A, p, ObjectId::from_u64(7), 0, &data[..100]),
        Err(Error::BadLength(100))
    );
}

#[test]
fn referenced_pages_do_not_cause_spurious_no_space() {
    // Every ephemeral page was just read (second chance): a persistent put that needs room
    // must still get it, taking the pages on the second pass.
    let e = Engine::new(EngineConfig {
        budget: 256 << 10,
        shards: 2,
        ..Default::default()
    });
    e.add_client(A, ClientConfig::default()).unwrap();
    e.authorize_shared(PoolUuid(5), A);
    let spec = PoolSpec::shared_ephemeral(PoolUuid(5))
        .with_codec(Codec::None)
        .with_dedup(DedupScope::Off);
    let eph = e.create_pool(A, spec).unwrap();
    let mut n = 0;
    while e.put(A, key(eph, n), &random_page(u64::from(n))).is_ok() && n < 1000 {
        n += 1;
    }
    let mut out = [0u8; PAGE_SIZE];
    for i in 0..=n {
        let _ = e.get(A, key(eph, i), &mut out);
    }
    let p = e
        .create_pool(
            A,
            PoolSpec::private_persistent()
                .with_codec(Codec::None)
                .with_dedup(DedupScope::Off),
        )
        .unwrap();
    let evicted_before = e.stats().ops.evictions;
    for i in 0..40 {
        e.put(A, key(p, i), &random_page(9000 + u64::from(i)))
            .unwrap();
    }
    assert!(
        e.stats().ops.evictions > evicted_before,
        "the persistent puts needed room"
    );
}

#[test]
fn deferred_compression_stores_raw_then_compresses_in_the_background() {
    let e = Engine::new(EngineConfig {
        budget: 64 << 20,
        defer_compression_below: 0.5,
        ..Default::default()
    });
    e.add_client(A, ClientConfig::default()).unwrap();
    for dedup in [DedupScope::Off, DedupScope::Client] {
        let p = e
            .create_pool(A, PoolSpec::private_persistent().with_dedup(dedup))
            .unwrap();
        for i in 0..200 {
            e.put(A, key(p, i), &page(u64::from(i))).unwrap();
        }
        assert_eq!(
            e.deferred_pages(),
            200,
            "stored raw while there is headroom"
        );
        let raw_held = e.held_bytes();
        while e.compress_deferred(64) > 0 {}
        assert_eq!(e.deferred_pages(), 0);
        e.trim();
        assert!(
            e.held_bytes() < raw_held / 2,
            "compressed: {} -> {}",
            raw_held,
            e.held_bytes()
        );
        let mut out = [0u8; PAGE_SIZE];
        for i in 0..200 {
            e.get(A, key(p, i), &mut out).unwrap();
            assert_eq!(out, page(u64::from(i)));
        }
        // Replaced and flushed pages are skipped, never resurrected or made stale.
        e.put(A, key(p, 0), &page(1000)).unwrap();
        e.put(A, key(p, 0), &page(1001)).unwrap();
        e.put(A, key(p, 1), &page(1002)).unwrap();
        e.flush_page(A, key(p, 1)).unwrap();
        while e.compress_deferred(64) > 0 {}
        e.get(A, key(p, 0), &mut out).unwrap();
        assert_eq!(out, page(1001));
        assert_eq!(e.get(A, key(p, 1), &mut out).unwrap(), None);
        e.destroy_pool(A, p).unwrap();
    }
    // Once half the budget is used, pages are compressed at put time.
    e.set_budget(1 << 20);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    let mut i = 0;
    loop {
        let before = e.deferred_pages();
        e.put(A, key(p, i), &page(u64::from(i))).unwrap();
        i += 1;
        if e.deferred_pages() == before {
            break;
        }
        assert!(i < 200, "deferral never stopped");
    }
    assert!(
        e.held_bytes() * 2 >= (1 << 20) - 8192,
        "stopped at half the budget: {}",
        e.held_bytes()
    );
    let waiting = e.deferred_pages();
    for j in 0..5 {
        e.put(A, key(p, 1000 + j), &page(u64::from(j))).unwrap();
    }
    assert_eq!(
        e.deferred_pages(),
        waiting,
        "no headroom: compressed at put time"
    );
}

#[test]
fn flushing_everything_gives_tables_and_slabs_back() {
    // Not only the slabs: the index, dedup and allocator tables shrink as the pool empties.
    let e = engine(1 << 30);
    let p = e.create_pool(A, PoolSpec::private_persistent()).unwrap();
    let q = e
        .create_pool(
            A,
            PoolSpec::private_persistent().with_dedup(DedupScope::Off),
        )
        .unwrap();
    for i in 0..60_000u32 {
        e.put(A, key(p, i), &page(u64::from(i))).unwrap();
        e.put(A, key(q, i), &random_page(u64::from(i))).unwrap();
    }
    let full = e.stats();
    assert!(full.held_bytes > 200 << 20, "{}", full.held_bytes);
    assert!(full.metadata_bytes > 2 << 20);
    for i in 0..60_000u32 {
        e.flush_page(A, key(p, i)).unwrap();
        e.flush_page(A, key(q, i)).unwrap();
    }
    e.trim();
    let empty = e.stats();
    assert_eq!(empty.pages, 0);
    assert!(
        empty.held_bytes < 64 << 10,
        "held {} after flushing everything ({} of it metadata)",
        empty.held_bytes,
        empty.metadata_bytes
    );
    assert!(empty.resident_bytes <= empty.held_bytes);
}

#[test]
fn shrink_compacts_instead_of_evicting_more_than_asked() {
    // Two clients' ephemeral pages interleaved in the same slabs: evicting one client's pages
    // frees no whole slab by itself. Shrink compacts, so it evicts only about what it must.
    let e = engine(1 << 30);
    let pa = e.create_pool(A, PoolSpec::private_ephemeral()).unwrap();
    let pb = e.create_pool(B, PoolSpec::private_ephemeral()).unwrap();
    e.set_weight(B, 1).unwrap();
    for i in 0..20_000u32 {
        e.put(A, key(pa, i), &page(u64::from(i))).unwrap();
        e.put(B, key(pb, i), &page(1_000_000 + u64::from(i)))
            .unwrap();
    }
    let held = e.held_bytes();
    let b_pages = e.client_stats(B).unwrap().ephemeral.pages;
    let freed = e.shrink(held / 4);
    assert!(freed >= held / 4, "freed {freed} of {}", held / 4);
    let s = e.stats();
    assert!(s.compaction.moved > 0, "{:?}", s.compaction);
    // B (far above its share) pays, A keeps everything.
    assert_eq!(e.client_stats(A).unwrap().ephemeral.pages, 20_000);
    let evicted = b_pages - e.client_stats(B).unwrap().ephemeral.pages;
    // Without compaction nearly all of B would go before a slab empties; with it, about
    // the bytes asked for (half of B's pages, plus a margin for partly filled slabs).
    assert!(
        evicted < b_pages * 3 / 5,
        "evicted {evicted} of B's {b_pages} pages for a quarter of the pool"
    );
    assert!(s.resident_bytes <= s.held_bytes);
}

#[test]
fn try_put_keeps_the_old_content_when_refused() {
    let e = Engine::new(EngineConfig::with_budget(256 << 10));
    e.add_client(A, ClientConfig::default()).unwrap();
    let p = e
        .create_pool(A, PoolSpec::private_persistent().with_codec(Codec::None))
        .unwrap();
    // Fill the budget with incompressible persistent pages.
    let mut n = 0;
    while e.put(A, key(p, n), &random_page(u64::from(n))).is_ok() {
        n += 1;
    }
    let mut out = [0u8; PAGE_SIZE];
    // The key n - 2 holds its page; a refused replacement with try_put keeps it.
    let k = key(p, n - 2);
    let refused = e.try_put(A, k, &random_page(999_999));
    assert!(matches!(refused, Err(Error::NoSpace)), "{refused:?}");
    assert!(e.get(A, k, &mut out).unwrap().is_some());
    assert_eq!(out, random_page(u64::from(n - 2)));
    // put drops it (never stale content after a failed replace).
    assert!(e.put(A, k, &random_page(999_999)).is_err());
    assert_eq!(e.get(A, k, &mut out).unwrap(), None);
}
