//! Save → restore round trips, resumed saves, live-save logging, and rejection of corrupt
//! or truncated streams with the engine left unchanged.

use tmem_core::*;

const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);
/// Length of a (version 2) stream header.
const HEADER: usize = 64;
/// A frame bound small enough to give every data page its own PAGES frame.
const TINY_FRAMES: usize = 0;

/// The frames of a stream part, after its header: (type, payload length).
fn frames_of(part: &[u8]) -> Vec<(u8, usize)> {
    let mut pos = HEADER;
    let mut v = Vec::new();
    while pos + 5 <= part.len() {
        let len = u32::from_le_bytes(part[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if pos + 9 + len > part.len() {
            break;
        }
        v.push((part[pos], len));
        pos += 9 + len;
    }
    v
}

/// Bytes of the complete frames of a stream part, header included.
fn complete_prefix(part: &[u8], frames: usize) -> usize {
    HEADER
        + frames_of(part)[..frames]
            .iter()
            .map(|(_, l)| 9 + l)
            .sum::<usize>()
}

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

/// Restores `parts` into a target engine that already holds a page, with every
/// truncation and every flipped byte of each part in turn (the other parts intact): each
/// is rejected and leaves the engine unchanged; the intact parts then restore `pages`.
fn assert_every_corruption_rejected(parts: &[Vec<u8>], pages: u64) {
    let target = Engine::new(EngineConfig::with_budget(16 << 20));
    target.add_client(B, ClientConfig::default()).unwrap();
    let q = target
        .create_pool(B, PoolSpec::private_persistent())
        .unwrap();
    target
        .put(B, PageKey::new(q, ObjectId::default(), 0), &page(99))
        .unwrap();
    let restore = |parts: &[Vec<u8>]| {
        let mut slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let mut readers: Vec<&mut &[u8]> = slices.iter_mut().collect();
        target.restore_parts(B, &mut readers)
    };
    let before = target.stats();
    for n in 0..parts.len() {
        for cut in 0..parts[n].len() {
            let mut bad = parts.to_vec();
            bad[n].truncate(cut);
            let r = restore(&bad);
            assert!(
                matches!(r, Err(Error::Stream(_))),
                "part {n} truncated at {cut} rejected: {r:?}"
            );
        }
        for at in 0..parts[n].len() {
            let mut bad = parts.to_vec();
            bad[n][at] ^= 0x41;
            let r = restore(&bad);
            assert!(r.is_err(), "part {n}: flip at {at} rejected");
        }
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
    assert_eq!(restore(parts).unwrap().pages, pages);
}

/// A small engine (six pages of one object, so all in one shard) for the corruption tests.
fn small() -> Engine {
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
    small
}

#[test]
fn every_truncation_and_every_flipped_byte_is_rejected_without_change() {
    // A small stream keeps this test fast while covering every frame type.
    let mut buf = Vec::new();
    small().save(A, SaveOptions::default(), &mut buf).unwrap();
    assert_eq!(
        frames_of(&buf).iter().map(|f| f.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "POOL, one PAGES frame for the shard, END"
    );
    assert_every_corruption_rejected(&[buf], 6);
}

#[test]
fn split_frames_reject_every_truncation_and_flipped_byte() {
    // The same shard cut into one PAGES frame per data page.
    let e = small();
    let mut buf = Vec::new();
    e.save_with_frame_limit(A, SaveOptions::default(), TINY_FRAMES, &mut buf)
        .unwrap();
    let pages_frames = frames_of(&buf).iter().filter(|f| f.0 == 2).count();
    assert_eq!(pages_frames, 3, "the shard spans several frames");
    assert_every_corruption_rejected(&[buf.clone()], 6);
    // An interrupted save resumed inside that shard: a continuation whose header holds a
    // resume position.
    let cut_in = complete_prefix(&buf, 2) + 100;
    let mut w = Failing {
        buf: Vec::new(),
        limit: cut_in,
    };
    let err = e
        .save_with_frame_limit(A, SaveOptions::default(), TINY_FRAMES, &mut w)
        .unwrap_err();
    let Error::Stream(StreamError::WriteAt { cursor, .. }) = err else {
        panic!("{err:?}")
    };
    assert_eq!(cursor.frames, 2);
    assert!(
        cursor.after.is_some(),
        "resumes inside the shard: {cursor:?}"
    );
    let first = w.buf[..complete_prefix(&w.buf, 2)].to_vec();
    let mut rest = Vec::new();
    e.save_with_frame_limit(
        A,
        SaveOptions {
            include_ephemeral: false,
            resume: Some(cursor),
        },
        TINY_FRAMES,
        &mut rest,
    )
    .unwrap();
    assert_every_corruption_rejected(&[first, rest], 6);
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

/// Interrupts a save (with PAGES frames bounded to `frame_limit`) at several points,
/// resumes it from its cursor and restores both parts. Returns the cursors.
fn interrupt_and_resume(frame_limit: usize, cuts: usize) -> Vec<SaveCursor> {
    let (e, pools) = populated();
    let save = |opts, w: &mut dyn std::io::Write| {
        let mut w = w;
        e.save_with_frame_limit(A, opts, frame_limit, &mut w)
    };
    let mut full = Vec::new();
    save(SaveOptions::default(), &mut full).unwrap();
    let mut limits = vec![100, full.len() - 20];
    limits.extend((1..cuts).map(|k| full.len() * k / cuts));
    let mut cursors = Vec::new();
    for limit in limits {
        let mut w = Failing {
            buf: Vec::new(),
            limit,
        };
        let err = save(SaveOptions::default(), &mut w).unwrap_err();
        let Error::Stream(StreamError::WriteAt { cursor, .. }) = err else {
            panic!("{err:?}")
        };
        cursors.push(cursor);
        // The interrupted part, cut after its last complete frame (as a receiver keeps it).
        let frames = frames_of(&w.buf).len();
        assert_eq!(
            frames as u64, cursor.frames,
            "cursor counts the complete frames"
        );
        let first = &w.buf[..complete_prefix(&w.buf, frames)];
        let mut rest = Vec::new();
        save(
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
            let short = complete_prefix(first, frames - 1);
            let r = f.restore_parts(B, &mut [&mut &first[..short], &mut &rest[..]]);
            assert!(r.is_err(), "lost frame detected");
            assert_eq!(f.stats().pools, 0);
        }
        // Together they restore everything, each page once.
        let r = f
            .restore_parts(B, &mut [&mut &first[..], &mut &rest[..]])
            .unwrap();
        assert_eq!(r.pages, 1500);
        check_restored(&f, B, &r, &pools);
        assert_eq!(f.stats().pages, 1500);
    }
    cursors
}

#[test]
fn interrupted_save_resumes_from_its_cursor() {
    interrupt_and_resume(usize::MAX, 4);
}

#[test]
fn interrupted_save_resumes_inside_a_shard_split_into_frames() {
    let cursors = interrupt_and_resume(TINY_FRAMES, 12);
    assert!(
        cursors.iter().filter(|c| c.after.is_some()).count() >= 2,
        "several saves stopped inside a shard: {cursors:?}"
    );
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

/// An incompressible page derived from `seed`.
fn random_page(seed: u64) -> [u8; PAGE_SIZE] {
    use rand::{RngCore, SeedableRng};
    let mut p = [0u8; PAGE_SIZE];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut p);
    p
}

#[test]
fn one_shard_far_above_the_old_frame_limit_round_trips() {
    // 24 Ki + 100 raw pages (> 96 MiB) in a single shard: the old format wrote them as one
    // frame, which restore refused (it accepted frames up to 64 MiB).
    const PAGES: u32 = 24 * 1024 + 100;
    let cfg = EngineConfig {
        shards: 1,
        ..EngineConfig::with_budget(512 << 20)
    };
    let spec = PoolSpec::private_persistent()
        .with_codec(Codec::None)
        .with_dedup(DedupScope::Off)
        .with_label("big");
    let key = |pool, i: u32| PageKey::new(pool, ObjectId([u64::from(i % 3), 7, 0]), i / 3);
    let e = Engine::new(cfg);
    e.add_client(A, ClientConfig::default()).unwrap();
    let p = e.create_pool(A, spec).unwrap();
    for i in 0..PAGES {
        e.put(A, key(p, i), &random_page(u64::from(i))).unwrap();
    }
    let mut buf = Vec::new();
    let rep = e.save(A, SaveOptions::default(), &mut buf).unwrap();
    drop(e);
    assert_eq!((rep.pools, rep.pages), (1, u64::from(PAGES)));
    assert!(buf.len() > 96 << 20, "stream of {} bytes", buf.len());
    let frames = frames_of(&buf);
    assert!(
        frames.iter().all(|&(_, len)| len <= 8 << 20),
        "bounded frames"
    );
    assert!(frames.iter().filter(|f| f.0 == 2).count() >= 12);
    let f = Engine::new(cfg);
    f.add_client(B, ClientConfig::default()).unwrap();
    let r = f.restore(B, &mut &buf[..]).unwrap();
    assert_eq!(r.pages, u64::from(PAGES));
    let (np, label) = &r.pools[0];
    assert_eq!(label, "big");
    let mut out = [0u8; PAGE_SIZE];
    for i in 0..PAGES {
        assert_eq!(
            f.get(B, key(*np, i), &mut out).unwrap(),
            Some(PageState::Data)
        );
        assert!(out == random_page(u64::from(i)), "page {i} byte-identical");
    }
    assert_eq!(f.stats().pages, u64::from(PAGES));
}

/// Rewrites a (first, version 2) stream as version 1 wrote it: the same frames after a
/// 36-byte header.
fn as_version_1(v2: &[u8]) -> Vec<u8> {
    let mut s = v2[..32].to_vec();
    s[8..10].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32fast::hash(&s);
    s.extend_from_slice(&crc.to_le_bytes());
    s.extend_from_slice(&v2[HEADER..]);
    s
}

/// Sets the header's version and flags and fixes its checksum.
fn with_header(v2: &[u8], version: u16, flags: u16) -> Vec<u8> {
    let mut s = v2.to_vec();
    s[8..10].copy_from_slice(&version.to_le_bytes());
    s[10..12].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32fast::hash(&s[..HEADER - 4]);
    s[HEADER - 4..HEADER].copy_from_slice(&crc.to_le_bytes());
    s
}

#[test]
fn version_1_streams_still_restore_and_other_versions_are_refused() {
    let (e, pools) = populated();
    let (buf, _) = save_all(&e, SaveOptions::default());
    let f = Engine::new(EngineConfig::with_budget(256 << 20));
    f.add_client(B, ClientConfig::default()).unwrap();
    let r = f.restore(B, &mut &as_version_1(&buf)[..]).unwrap();
    assert_eq!(r.pages, 1500);
    check_restored(&f, B, &r, &pools);
    let fresh = Engine::new(EngineConfig::with_budget(16 << 20));
    fresh.add_client(B, ClientConfig::default()).unwrap();
    for v in [0, 3, u16::MAX] {
        assert_eq!(
            fresh.restore(B, &mut &with_header(&buf, v, 0)[..]),
            Err(Error::Stream(StreamError::BadVersion(v)))
        );
    }
    // Version 1 has no resume position; version 2 allows one only in a continuation.
    assert!(matches!(
        fresh.restore(B, &mut &with_header(&buf, 2, 4)[..]),
        Err(Error::Stream(StreamError::Malformed { frame: 0, .. }))
    ));
    let mut v1 = as_version_1(&buf);
    v1[10] = 4;
    let crc = crc32fast::hash(&v1[..32]);
    v1[32..36].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        fresh.restore(B, &mut &v1[..]),
        Err(Error::Stream(StreamError::Malformed { frame: 0, .. }))
    ));
    assert_eq!(fresh.stats().pools, 0);
}

#[test]
fn restore_bounds_frames_by_version() {
    let mut buf = Vec::new();
    small().save(A, SaveOptions::default(), &mut buf).unwrap();
    let f = Engine::new(EngineConfig::with_budget(16 << 20));
    f.add_client(B, ClientConfig::default()).unwrap();
    // The first frame's length field, set to `len` (its payload is then missing).
    let with_len = |s: &[u8], header: usize, len: u32| {
        let mut s = s.to_vec();
        s[header + 1..header + 5].copy_from_slice(&len.to_le_bytes());
        s
    };
    // Version 2: up to 16 MiB.
    assert_eq!(
        f.restore(B, &mut &with_len(&buf, HEADER, 16 << 20)[..]),
        Err(Error::Stream(StreamError::Truncated))
    );
    assert_eq!(
        f.restore(B, &mut &with_len(&buf, HEADER, (16 << 20) + 1)[..]),
        Err(Error::Stream(StreamError::Malformed {
            frame: 1,
            what: "frame too large"
        }))
    );
    // Version 1 (frames were not bounded by its writer): up to 64 MiB.
    let v1 = as_version_1(&buf);
    assert_eq!(
        f.restore(B, &mut &with_len(&v1, 36, 64 << 20)[..]),
        Err(Error::Stream(StreamError::Truncated))
    );
    assert_eq!(
        f.restore(B, &mut &with_len(&v1, 36, (64 << 20) + 1)[..]),
        Err(Error::Stream(StreamError::Malformed {
            frame: 1,
            what: "frame too large"
        }))
    );
    assert_eq!(f.stats().pools, 0);
}
