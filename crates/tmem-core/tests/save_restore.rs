//! Save → restore round trips, resumed saves, live-save logging, and rejection of corrupt
//! or truncated streams with the engine left unchanged.

use tmem_core::*;

const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);

fn page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, b) in p.iter_mut().enumerate() {
        if i % 16 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        *b = (x >> (i % 8)) as u8 & 0x3f;
    }
    p
}

/// Pools with the pages put into them.
type Saved = Vec<(PoolId, Vec<(PageKey, [u8; PAGE_SIZE])>)>;

fn populated() -> (Engine, Saved) {
    let e = Engine::new(EngineConfig::with_budget(256 << 20));
    e.add_client(A, ClientConfig::default()).unwrap();
    e.add_client(B, ClientConfig::default()).unwrap();
    let mut pools = Vec::new();
    for (n, spec) in [
        PoolSpec::private_persistent().with_label("swap0"),
        PoolSpec::private_persistent()
            .with_codec(Codec::Zstd(3))
            .with_dedup(DedupScope::Off)
            .with_label("swap1"),
        PoolSpec::private_persistent()
            .with_codec(Codec::None)
            .with_label("raw"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = e.create_pool(A, spec).unwrap();
        let mut pages = Vec::new();
        for i in 0..500u32 {
            let key = PageKey::new(p, ObjectId([n as u64, 1, 2]), i * 3);
            let data = match i % 5 {
                0 => [0u8; PAGE_SIZE],
                1 => [0xa5; PAGE_SIZE],
                2 => page(7), // duplicates
                _ => page(u64::from(i) + 1000 * n as u64),
            };
            e.put(A, key, &data).unwrap();
            pages.push((key, data));
        }
        pools.push((p, pages));
    }
    let eph = e
        .create_pool(A, PoolSpec::private_ephemeral().with_label("cache"))
        .unwrap();
    e.put(A, PageKey::new(eph, ObjectId::default(), 0), &page(1))
        .unwrap();
    (e, pools)
}

fn save_all(e: &Engine, opts: SaveOptions) -> (Vec<u8>, SaveReport) {
    let mut buf = Vec::new();
    let rep = e.save(A, opts, &mut buf).unwrap();
    (buf, rep)
}

fn check_restored(e: &Engine, client: ClientId, rep: &RestoreReport, pools: &Saved) {
    let labels = ["swap0", "swap1", "raw"];
    let mut out = [0u8; PAGE_SIZE];
    for (n, (_, pages)) in pools.iter().enumerate() {
        let (np, _) = rep
            .pools
            .iter()
            .find(|(_, l)| l == labels[n])
            .expect("pool restored with its label");
        for (key, data) in pages {
            let k = PageKey { pool: *np, ..*key };
            assert!(
                e.get(client, k, &mut out).unwrap().is_some(),
                "page {key:?} restored"
            );
            assert_eq!(&out, data);
        }
    }
}

#[test]
fn round_trip_into_a_fresh_engine_and_another_client() {
    let (e, pools) = populated();
    let (buf, rep) = save_all(&e, SaveOptions::default());
    assert_eq!(rep.pools, 3, "ephemeral pools are left out by default");
    assert_eq!(rep.pages, 1500);
    assert!(rep.touched.is_empty());
    let f = Engine::new(EngineConfig::with_budget(256 << 20));
    f.add_client(B, ClientConfig::default()).unwrap();
    let r = f.restore(B, &mut &buf[..]).unwrap();
    assert_eq!(r.pages, 1500);
    check_restored(&f, B, &r, &pools);
    let spec = f.pool_spec(B, r.pools[1].0).unwrap();
    assert_eq!(spec.codec, Codec::Zstd(3));
    assert_eq!(spec.persistence, Persistence::Persistent);
    // Including ephemeral pools.
    let (buf, rep) = save_all(
        &e,
        SaveOptions {
            include_ephemeral: true,
            resume: None,
        },
    );
    assert_eq!(rep.pools, 4);
    let g = Engine::new(EngineConfig::with_budget(256 << 20));
    g.add_client(A, ClientConfig::default()).unwrap();
    let r = g.restore(A, &mut &buf[..]).unwrap();
    assert_eq!(r.pools.len(), 4);
    assert_eq!(r.pages, 1501);
}

#[test]
fn every_truncation_and_every_flipped_byte_is_rejected_without_change() {
    let (e, _pools) = populated();
    // A smaller stream keeps this test fast while covering every frame type.
    let small = Engine::new(EngineConfig::with_budget(16 << 20));
    small.add_client(A, ClientConfig::default()).unwrap();
    let p = small
        .create_pool(A, PoolSpec::private_persistent().with_label("s"))
        .unwrap();
    for i in 0..6 {
        small
            .put(
                A,
                PageKey::new(p, ObjectId::default(), i),
                &if i % 2 == 0 {
                    page(u64::from(i))
                } else {
                    [0u8; PAGE_SIZE]
                },
            )
            .unwrap();
    }
    let mut buf = Vec::new();
    small.save(A, SaveOptions::default(), &mut buf).unwrap();
    let target = Engine::new(EngineConfig::with_budget(16 << 20));
    target.add_client(B, ClientConfig::default()).unwrap();
    let q = target
        .create_pool(B, PoolSpec::private_persistent())
        .unwrap();
    target
        .put(B, PageKey::new(q, ObjectId::default(), 0), &page(99))
        .unwrap();
    let before = target.stats();
    for cut in 0..buf.len() {
        let r = target.restore(B, &mut &buf[..cut]);
        assert!(
            matches!(r, Err(Error::Stream(_))),
            "truncation at {cut} rejected: {r:?}"
        );
    }
    for at in 0..buf.len() {
        let mut bad = buf.clone();
        bad[at] ^= 0x41;
        let r = target.restore(B, &mut &bad[..]);
        assert!(r.is_err(), "flip at {at} rejected");
    }
    let after = target.stats();
    assert_eq!(
        (before.pages, before.pools, before.held_bytes),
        (after.pages, after.pools, after.held_bytes),
        "engine unchanged"
    );
    let mut out = [0u8; PAGE_SIZE];
    target
        .get(B, PageKey::new(q, ObjectId::default(), 0), &mut out)
        .unwrap();
    assert_eq!(out, page(99));
    // The good stream still restores.
    assert_eq!(target.restore(B, &mut &buf[..]).unwrap().pages, 6);
    drop(e);
}

#[test]
fn restore_that_does_not_fit_rolls_back() {
    let (e, _) = populated();
    let (buf, _) = save_all(&e, SaveOptions::default());
    let tiny = Engine::new(EngineConfig::with_budget(256 << 10));
    tiny.add_client(A, ClientConfig::default()).unwrap();
    assert_eq!(tiny.restore(A, &mut &buf[..]).unwrap_err(), Error::NoSpace);
    let s = tiny.stats();
    assert_eq!((s.pages, s.pools, s.alloc.held_bytes), (0, 0, 0));
    assert!(matches!(
        tiny.restore(ClientId(9), &mut &buf[..]),
        Err(Error::UnknownClient(_))
    ));
    assert!(matches!(
        tiny.restore(A, &mut &b"not a save stream at all"[..]),
        Err(Error::Stream(StreamError::BadMagic))
    ));
}

/// A writer that fails after `limit` bytes.
struct Failing {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Failing {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            return Err(std::io::Error::other("disk full"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn interrupted_save_resumes_from_its_cursor() {
    let (e, pools) = populated();
    let (full, _) = save_all(&e, SaveOptions::default());
    for limit in [100, full.len() / 3, full.len() / 2, full.len() - 20] {
        let mut w = Failing {
            buf: Vec::new(),
            limit,
        };
        let err = e.save(A, SaveOptions::default(), &mut w).unwrap_err();
        let Error::Stream(StreamError::WriteAt { cursor, .. }) = err else {
            panic!("{err:?}")
        };
        // The interrupted part, cut after its last complete frame (as a receiver keeps it).
        let mut pos = 36;
        let mut frames = 0;
        while pos + 5 <= w.buf.len() {
            let len = u32::from_le_bytes(w.buf[pos + 1..pos + 5].try_into().unwrap()) as usize;
            if pos + 9 + len > w.buf.len() {
                break;
            }
            pos += 9 + len;
            frames += 1;
        }
        assert_eq!(frames, cursor.frames, "cursor counts the complete frames");
        let first = &w.buf[..pos];
        let mut rest = Vec::new();
        e.save(
            A,
            SaveOptions {
                include_ephemeral: false,
                resume: Some(cursor),
            },
            &mut rest,
        )
        .unwrap();
        let f = Engine::new(EngineConfig::with_budget(256 << 20));
        f.add_client(B, ClientConfig::default()).unwrap();
        // Alone, neither part is a whole stream.
        assert!(f.restore(B, &mut &first[..]).is_err());
        assert!(matches!(
            f.restore(B, &mut &rest[..]),
            Err(Error::Stream(StreamError::OutOfOrder))
        ));
        assert_eq!(f.stats().pools, 0);
        // A part that lost its last frame does not fit the continuation.
        if frames > 1 {
            let mut short = 36;
            for _ in 0..frames - 1 {
                let len =
                    u32::from_le_bytes(first[short + 1..short + 5].try_into().unwrap()) as usize;
                short += 9 + len;
            }
            let r = f.restore_parts(B, &mut [&mut &first[..short], &mut &rest[..]]);
            assert!(r.is_err(), "lost frame detected");
            assert_eq!(f.stats().pools, 0);
        }
        // Together they restore everything.
        let r = f
            .restore_parts(B, &mut [&mut &first[..], &mut &rest[..]])
            .unwrap();
        assert_eq!(r.pages, 1500);
        check_restored(&f, B, &r, &pools);
    }
}

/// A save destination that, like a slow network link, lets the guest keep writing: every
/// write of the stream is accompanied by a put and a flush on the pool being saved.
struct BusyLink<'e> {
    e: &'e Engine,
    pool: PoolId,
    out: Vec<u8>,
    n: u32,
}

impl std::io::Write for BusyLink<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let key = PageKey::new(self.pool, ObjectId([0, 1, 2]), 100_000 + self.n % 64);
        self.e
            .put(A, key, &page(u64::from(self.n)))
            .map_err(std::io::Error::other)?;
        if self.n % 3 == 0 {
            let _ = self
                .e
                .flush_page(A, PageKey::new(self.pool, ObjectId([0, 1, 2]), 3));
        }
        self.n += 1;
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn live_save_reports_keys_touched_meanwhile() {
    let (e, pools) = populated();
    let (p0, _) = pools[0];
    let mut link = BusyLink {
        e: &e,
        pool: p0,
        out: Vec::new(),
        n: 0,
    };
    let rep = e.save(A, SaveOptions::default(), &mut link).unwrap();
    assert!(link.n > 0);
    assert!(!rep.touched.is_empty(), "puts during the save are reported");
    assert!(rep
        .touched
        .iter()
        .all(|k| k.pool == p0 && (k.index.0 >= 100_000 || k.index.0 == 3)));
    assert!(
        rep.touched.iter().any(|k| k.index.0 == 3),
        "the flush during the save is reported"
    );
    // After the save, nothing is logged any more.
    e.put(A, PageKey::new(p0, ObjectId([0, 1, 2]), 7), &page(1))
        .unwrap();
    let mut buf2 = Vec::new();
    let rep2 = e.save(A, SaveOptions::default(), &mut buf2).unwrap();
    assert!(rep2.touched.is_empty());
}
