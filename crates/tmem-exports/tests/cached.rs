//! Cached export: miss accounting, sharing between clients, a byte model, and coherency
//! (concurrent stamped writes/reads, and the deterministic miss/write race).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use common::*;
use rand::Rng;
use tmem_core::{DedupScope, PoolUuid};
use tmem_exports::{CachedExport, ExportError};
use tmem_nbd::BlockBackend;

fn image(dir: &Path, name: &str, size: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; size];
    let mut r = rng(seed);
    r.fill(&mut data[..]);
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[test]
fn misses_read_once_and_clients_share_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let size = (1 << 20) + 1000; // partial tail page
    let (img, data) = image(dir.path(), "a.img", size, 1);
    let e = engine(64 << 20, &[1, 2]);
    let a = cached(&e, &img, "a", 1);
    assert_eq!(a.size(), size as u64);
    assert_eq!(read(&*a, 0, size), data);
    let st = a.stats();
    assert_eq!(st.sectors_read, (size as u64).div_ceil(512), "{st:?}");
    assert_eq!(st.cache_misses, 257);
    assert_eq!(st.pages_inserted, 257);
    // Second read of the same range: all hits, nothing read from the image.
    assert_eq!(read(&*a, 0, size), data);
    assert_eq!(read(&*a, 5000, 70000), data[5000..75000]);
    let st2 = a.stats();
    assert_eq!(st2.sectors_read, st.sectors_read, "{st2:?}");
    assert!(st2.cache_hits >= 257);
    // Another client on the same image: hits in the shared pool.
    let b = cached(&e, &img, "b", 2);
    assert_eq!(b.uuid(), a.uuid());
    assert_eq!(read(&*b, 0, size), data);
    let sb = b.stats();
    assert_eq!((sb.sectors_read, sb.cache_misses), (0, 0), "{sb:?}");
    assert_eq!(sb.cache_hits, 257);
    b.close().unwrap();
    a.close().unwrap();
    assert!(a.read(0, &mut [0u8; 10]).is_err());
}

#[test]
fn writes_and_unaligned_io_match_model() {
    let dir = tempfile::tempdir().unwrap();
    let size = (2 << 20) + 777;
    let (img, mut model) = image(dir.path(), "m.img", size, 2);
    let e = engine(64 << 20, &[1, 2]);
    let a = cached(&e, &img, "a", 1);
    let b = cached(&e, &img, "b", 2);
    let mut r = rng(3);
    for i in 0..2000 {
        let x: &dyn BlockBackend = if r.gen_bool(0.5) { &*a } else { &*b };
        let (off, len) = range(&mut r, size as u64, 128 << 10);
        let (o, l) = (off as usize, len as usize);
        match r.gen_range(0..10) {
            0..=3 => {
                let mut d = vec![0u8; l];
                fill(&mut r, &mut d);
                x.write(off, &d, r.gen_bool(0.1)).unwrap();
                model[o..o + l].copy_from_slice(&d);
            }
            4 => {
                x.trim(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            5 => {
                x.write_zeroes(off, len, false, false).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                let got = read(x, off, l);
                assert_eq!(
                    first_diff(&got, &model[o..o + l]),
                    None,
                    "op {i}: {off}+{len}"
                );
            }
        }
    }
    a.flush().unwrap();
    // The image holds exactly the model, and only `size` bytes.
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(on_disk.len(), size);
    assert_eq!(first_diff(&on_disk, &model), None);
    assert!(a.stats().sectors_written > 0 && a.stats().invalidations > 0);
    let st = a.stats();
    eprintln!("{st:?}");
}

#[test]
fn stale_insert_after_write_is_prevented() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = image(dir.path(), "r.img", 64 << 10, 4);
    let e = engine(64 << 20, &[1, 2]);
    let reader = cached(&e, &img, "reader", 1);
    let writer = cached(&e, &img, "writer", 2);
    let (at_hook_tx, at_hook_rx) = mpsc::channel::<u64>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    reader.set_miss_hook(Some(Box::new(move |p| {
        at_hook_tx.send(p).unwrap();
        go_rx.lock().unwrap().recv().unwrap();
    })));
    let r2 = reader.clone();
    // The reader misses page 3 and reads the old data from the image...
    let t = std::thread::spawn(move || read(&*r2, 3 * 4096, 4096));
    assert_eq!(at_hook_rx.recv().unwrap(), 3);
    // ...the writer writes the image and replaces the cached page...
    let new = vec![0x5au8; 4096];
    writer.write(3 * 4096, &new, false).unwrap();
    // ...then the reader tries to put the old data.
    go_tx.send(()).unwrap();
    let old = t.join().unwrap();
    assert_eq!(old, data[3 * 4096..4 * 4096]); // concurrent with the write: old is fine
    reader.set_miss_hook(None);
    assert!(reader.stats().insert_races >= 1, "{:?}", reader.stats());
    // Every later read, from either client, sees the write.
    assert_eq!(read(&*reader, 3 * 4096, 4096), new);
    assert_eq!(read(&*writer, 3 * 4096, 4096), new);
    assert_eq!(read(&*reader, 0, 64 << 10)[3 * 4096..4 * 4096], new[..]);
}

/// Page content: (page, version) repeated.
fn stamp(page: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for w in v.chunks_mut(16) {
        w[..8].copy_from_slice(&page.to_le_bytes());
        w[8..].copy_from_slice(&version.to_le_bytes());
    }
    v
}

fn version_of(page: u64, b: &[u8]) -> u64 {
    let v = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let words: Vec<(u64, u64)> = b
        .chunks(16)
        .map(|w| {
            (
                u64::from_le_bytes(w[..8].try_into().unwrap()),
                u64::from_le_bytes(w[8..].try_into().unwrap()),
            )
        })
        .collect();
    let mut runs: Vec<(usize, (u64, u64))> = Vec::new();
    for (i, x) in words.iter().enumerate() {
        if runs.last().map(|r| r.1) != Some(*x) {
            runs.push((i * 16, *x));
        }
    }
    if runs.len() > 1 {
        eprintln!("page {page}: runs (byte offset, (page, version)): {runs:?}");
    }
    for w in b.chunks(16) {
        assert_eq!(
            u64::from_le_bytes(w[..8].try_into().unwrap()),
            page,
            "torn page {page}"
        );
        assert_eq!(
            u64::from_le_bytes(w[8..].try_into().unwrap()),
            v,
            "torn page {page}"
        );
    }
    v
}

#[test]
fn concurrent_readers_never_see_older_than_acknowledged() {
    concurrent_stamped_io(None);
}

/// The same with a remote tier behind the pool: evicted pages are demoted (landing late
/// and out of order) and missed runs are served from it; never an older version.
#[test]
fn concurrent_readers_with_a_remote_tier_never_see_older_than_acknowledged() {
    let tier = Arc::new(MemTier::default());
    let (s1, s2) = concurrent_stamped_io(Some(tier.clone()));
    eprintln!("demotions {}", tier.demotions());
    assert!(tier.demotions() > 0, "nothing was demoted");
    assert!(
        s1.remote_hits + s2.remote_hits > 0,
        "the remote tier served nothing"
    );
    assert!(
        s1.remote_stale + s2.remote_stale > 0,
        "no remote copy was ever refused as older: the race was not exercised"
    );
}

fn concurrent_stamped_io(
    tier: Option<Arc<MemTier>>,
) -> (tmem_exports::CachedStats, tmem_exports::CachedStats) {
    let dir = tempfile::tempdir().unwrap();
    const PAGES: u64 = 96;
    let img = dir.path().join("c.img");
    let mut init = Vec::new();
    for p in 0..PAGES {
        init.extend(stamp(p, 0));
    }
    std::fs::write(&img, &init).unwrap();
    // (no sync: the export must cope with a freshly written image)
    // Small budget: pages get evicted, so readers keep missing and racing the writer.
    let e = engine(160 << 10, &[1, 2, 3]);
    let w = cached(&e, &img, "w", 1);
    let r1 = cached(&e, &img, "r1", 2);
    let r2 = cached(&e, &img, "r2", 3);
    if let Some(t) = &tier {
        for x in [&w, &r1, &r2] {
            x.set_remote(Some(t.clone() as Arc<dyn tmem_exports::RemoteTier>))
                .unwrap();
        }
    }
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for (i, x) in [r1.clone(), r2.clone(), w.clone()].into_iter().enumerate() {
        let acked = acked.clone();
        let done = done.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = rng(50 + i as u64);
            let mut n = 0u64;
            while !done.load(Ordering::Acquire) {
                let first = r.gen_range(0..PAGES);
                let cnt = r.gen_range(1..=(PAGES - first).min(8));
                let min: Vec<u64> = (first..first + cnt)
                    .map(|p| acked[p as usize].load(Ordering::Acquire))
                    .collect();
                let got = read(&*x, first * 4096, (cnt * 4096) as usize);
                for k in 0..cnt {
                    let p = first + k;
                    let v = version_of(p, &got[(k * 4096) as usize..((k + 1) * 4096) as usize]);
                    assert!(
                        v >= min[k as usize],
                        "page {p}: read v{v} after v{} was acknowledged",
                        min[k as usize]
                    );
                }
                n += 1;
            }
            n
        }));
    }
    let mut r = rng(7);
    let mut version = vec![0u64; PAGES as usize];
    for i in 1..=3000u64 {
        let p = r.gen_range(0..PAGES);
        if r.gen_bool(0.2) {
            // Unaligned sub-page write (read-modify-write): bytes 8.. of the page; the
            // page number in bytes 0..8 stays, so the page is still one whole stamp.
            let s = stamp(p, i);
            w.write(p * 4096 + 8, &s[8..], false).unwrap();
        } else {
            w.write(p * 4096, &stamp(p, i), false).unwrap();
        }
        version[p as usize] = i;
        acked[p as usize].store(i, Ordering::Release);
        if tier.is_some() && i % 20 == 0 {
            // Stamped pages compress well and fit the budget: give memory back now and
            // then, so that pages are evicted (demoted) while readers and the writer race.
            e.shrink(96 << 10);
        }
    }
    done.store(true, Ordering::Release);
    let reads: Vec<u64> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    for p in 0..PAGES {
        assert_eq!(
            version_of(p, &read(&*r1, p * 4096, 4096)),
            version[p as usize]
        );
    }
    let (s1, s2) = (r1.stats(), r2.stats());
    eprintln!("reads {reads:?}\n{s1:?}\n{s2:?}\n{:?}", w.stats());
    assert!(s1.cache_hits + s2.cache_hits > 0 && s1.cache_misses + s2.cache_misses > 0);
    (s1, s2)
}

/// A page evicted to the remote tier is served from there (no image read) until it is
/// written; after the write the remote copy is refused and the new content is read.
#[test]
fn remote_copy_serves_misses_until_the_page_is_written() {
    let dir = tempfile::tempdir().unwrap();
    const PAGES: u64 = 64;
    let img = dir.path().join("r.img");
    let mut init = Vec::new();
    for p in 0..PAGES {
        init.extend(stamp(p, 1));
    }
    std::fs::write(&img, &init).unwrap();
    let e = engine(1 << 20, &[1]);
    let x = cached(&e, &img, "x", 1);
    assert!(
        !x.read_may_block(0, 4096),
        "no tier: a miss reads the image"
    );
    let tier = Arc::new(MemTier::default());
    x.set_remote(Some(tier.clone() as Arc<dyn tmem_exports::RemoteTier>))
        .unwrap();
    assert!(x.read_may_block(0, 4096), "a miss may go to the tier");
    read(&*x, 0, (PAGES * 4096) as usize);
    assert!(!x.read_may_block(0, PAGES * 4096), "all in the pool");
    // Give everything back: every page is evicted, so demoted.
    e.shrink(u64::MAX);
    assert_eq!(tier.demotions(), PAGES);
    assert!(
        x.read_may_block(4096 + 100, 10),
        "evicted: a tier round trip"
    );
    let before = x.stats();
    let got = read(&*x, 0, (PAGES * 4096) as usize);
    for p in 0..PAGES {
        assert_eq!(version_of(p, &got[(p * 4096) as usize..][..4096]), 1);
    }
    let after = x.stats();
    assert_eq!(after.remote_hits - before.remote_hits, PAGES);
    assert_eq!(after.sectors_read, before.sectors_read, "read the image");
    // Evict again, then write page 3 (its stripe's generation moves on).
    e.shrink(u64::MAX);
    x.write(3 * 4096, &stamp(3, 2), false).unwrap();
    e.shrink(u64::MAX);
    let got = read(&*x, 0, 8 * 4096);
    for p in 0..8 {
        let want = if p == 3 { 2 } else { 1 };
        assert_eq!(version_of(p, &got[(p * 4096) as usize..][..4096]), want);
    }
    // With the tier down, misses go to the image.
    tier.down.store(true, Ordering::Relaxed);
    e.shrink(u64::MAX);
    assert!(!x.read_may_block(0, 4096), "tier down: not a round trip");
    let s0 = x.stats();
    read(&*x, 0, 4096);
    assert!(x.stats().sectors_read > s0.sectors_read);
}

#[test]
fn explicit_uuid_needs_consistent_use() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = image(dir.path(), "u.img", 8192, 5);
    let e = engine(8 << 20, &[1, 2]);
    let mut cfg = cached_cfg(&img, "a", 1);
    cfg.uuid = Some(PoolUuid(42));
    let a = CachedExport::open(e.clone(), cfg).unwrap();
    assert_eq!(a.uuid(), PoolUuid(42));
    // The same image under another uuid would split the cache: refused.
    let r = CachedExport::open(e.clone(), cached_cfg(&img, "b", 2));
    assert!(matches!(r, Err(ExportError::InvalidConfig(_))), "{r:?}");
    // A different codec/dedup spec for the same pool is refused by the engine.
    let mut cfg = cached_cfg(&img, "c", 2);
    cfg.uuid = Some(PoolUuid(42));
    cfg.dedup = DedupScope::Global;
    let r = CachedExport::open(e.clone(), cfg);
    assert!(matches!(r, Err(ExportError::JoinPool(_))), "{r:?}");
    // A missing image is a typed error.
    let r = CachedExport::open(e, cached_cfg(&dir.path().join("nope"), "d", 2));
    assert!(matches!(r, Err(ExportError::ImageOpen { .. })), "{r:?}");
}

#[test]
fn global_dedup_shares_payloads_between_images() {
    let dir = tempfile::tempdir().unwrap();
    let (img1, data) = image(dir.path(), "d1.img", 256 << 10, 6);
    let img2 = dir.path().join("d2.img");
    std::fs::write(&img2, &data).unwrap();
    let e = engine(64 << 20, &[1, 2]);
    let mut c1 = cached_cfg(&img1, "d1", 1);
    c1.dedup = DedupScope::Global;
    let mut c2 = cached_cfg(&img2, "d2", 2);
    c2.dedup = DedupScope::Global;
    let a = CachedExport::open(e.clone(), c1).unwrap();
    let b = CachedExport::open(e.clone(), c2).unwrap();
    assert_ne!(a.uuid(), b.uuid());
    assert_eq!(read(&*a, 0, data.len()), data);
    assert_eq!(read(&*b, 0, data.len()), data);
    let st = e.stats();
    assert_eq!(st.pages, 128, "{st:?}");
    assert_eq!(st.unique_payloads, 64, "{st:?}");
}

#[test]
fn direct_io_tail_page_writes_keep_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * 4096 + 100;
    let (img, mut model) = image(dir.path(), "t.img", size, 8);
    let e = engine(8 << 20, &[1]);
    let a = cached(&e, &img, "t", 1);
    let d = vec![0x11u8; 4096 + 100];
    a.write(2 * 4096, &d, true).unwrap();
    model[2 * 4096..].copy_from_slice(&d);
    a.write(3 * 4096 + 50, &[0x22; 50], false).unwrap();
    model[3 * 4096 + 50..].fill(0x22);
    assert_eq!(read(&*a, 0, size), model);
    let f = std::fs::File::open(&img).unwrap();
    let mut on_disk = vec![0u8; size + 10];
    let n = f.read_at(&mut on_disk, 0).unwrap();
    assert_eq!(n, size);
    assert_eq!(&on_disk[..size], &model[..]);
    eprintln!("{:?}", a.stats());
}

#[test]
fn read_only_by_default_refuses_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = image(dir.path(), "ro.img", 64 << 10, 9);
    let e = engine(8 << 20, &[1]);
    let mut cfg = cached_cfg(&img, "ro", 1);
    cfg.writable = false;
    let a = CachedExport::open(e, cfg).unwrap();
    assert!(!a.writable());
    assert!(a.caps().read_only && !a.caps().can_trim && !a.caps().can_write_zeroes);
    assert!(a.stats().read_only);
    let w = a.write(0, &[0x55; 4096], false);
    assert!(matches!(w, Err(tmem_nbd::BackendError::ReadOnly)), "{w:?}");
    assert_eq!(
        w.unwrap_err().nbd_errno(),
        tmem_nbd::proto::EPERM,
        "clients get EPERM"
    );
    assert!(matches!(
        a.trim(0, 4096),
        Err(tmem_nbd::BackendError::ReadOnly)
    ));
    assert!(matches!(
        a.write_zeroes(0, 4096, true, false),
        Err(tmem_nbd::BackendError::ReadOnly)
    ));
    assert_eq!(read(&*a, 0, data.len()), data);
    assert_eq!(std::fs::read(&img).unwrap(), data, "image untouched");
    assert_eq!(a.stats().sectors_written, 0);
    a.flush().unwrap();
    a.close().unwrap();
}

#[test]
fn read_only_export_of_an_unwritable_image_opens_writable_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = image(dir.path(), "perm.img", 16 << 10, 10);
    // A read-only open needs no write permission: the image is opened O_RDONLY.
    let f = std::fs::File::open(&img).unwrap();
    let mut perm = f.metadata().unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&img, perm).unwrap();
    let e = engine(8 << 20, &[1, 2]);
    let mut cfg = cached_cfg(&img, "p", 1);
    cfg.writable = false;
    let a = CachedExport::open(e.clone(), cfg).unwrap();
    assert_eq!(read(&*a, 0, data.len()), data);
    // Asking for writable on an image we cannot write fails (never a silent downgrade);
    // root may write anything, so only check without it.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        let r = CachedExport::open(e, cached_cfg(&img, "w", 2));
        assert!(matches!(r, Err(ExportError::ImageOpen { .. })), "{r:?}");
    }
}

/// Sets the image's mtime to a fixed, distinct time (no dependence on the filesystem's
/// timestamp granularity).
fn set_mtime(path: &Path, secs: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn image_rewritten_underneath_is_seen_fresh_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 << 10;
    let (img, old) = image(dir.path(), "base.img", size, 11);
    set_mtime(&img, 1_000_000);
    let e = engine(16 << 20, &[1, 2]);
    let mut cfg = cached_cfg(&img, "ro1", 1);
    cfg.writable = false;
    let a = CachedExport::open(e.clone(), cfg.clone()).unwrap();
    cfg.name = "ro2".into();
    cfg.client = tmem_core::ClientId(2);
    let b = CachedExport::open(e.clone(), cfg).unwrap();
    // Both read everything: the shared pool holds the old content.
    assert_eq!(read(&*a, 0, size), old);
    assert_eq!(read(&*b, 0, size), old);
    let before = b.stats();
    assert_eq!(read(&*b, 0, size), old);
    assert_eq!(
        b.stats().sectors_read,
        before.sectors_read,
        "served from the pool"
    );
    // Someone rewrites the image in place (same size) behind the exports' backs.
    let mut new = old.clone();
    for (i, x) in new.iter_mut().enumerate() {
        *x = !*x ^ (i as u8);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&new, 0)
        .unwrap();
    set_mtime(&img, 2_000_000);
    // Before any check the cache may still answer with the old bytes: that is what the
    // FLUSH is for.
    assert_eq!(read(&*a, 0, 4096), old[..4096]);
    a.flush().unwrap();
    let st = a.stats();
    assert_eq!(st.image_invalidations, 1, "{st:?}");
    assert!(st.pages_dropped >= (size / 4096) as u64, "{st:?}");
    // Every export of the image now reads the new content, not the stale cache.
    assert_eq!(read(&*a, 0, size), new);
    assert_eq!(read(&*b, 0, size), new);
    // b shares the recorded identity: its flush finds nothing new to drop.
    b.flush().unwrap();
    assert_eq!(b.stats().image_invalidations, 0);
    assert_eq!(read(&*b, 0, size), new);
    // A size change counts too (and an explicit check finds it).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[1u8; 4096], size as u64)
        .unwrap();
    set_mtime(&img, 2_000_000);
    let c = b.check_image().unwrap();
    assert!(c.changed && !c.path_replaced, "{c:?}");
    assert_eq!(b.check_image().unwrap(), Default::default());
}

#[test]
fn writable_exports_own_writes_are_not_changes_underneath() {
    let dir = tempfile::tempdir().unwrap();
    let (img, mut model) = image(dir.path(), "w.img", 64 << 10, 12);
    let e = engine(8 << 20, &[1]);
    let a = cached(&e, &img, "w", 1);
    assert!(a.writable() && !a.caps().read_only);
    assert_eq!(read(&*a, 0, model.len()), model);
    for i in 0..8u64 {
        let d = vec![i as u8 + 1; 4096];
        a.write(i * 4096, &d, false).unwrap();
        model[(i * 4096) as usize..((i + 1) * 4096) as usize].copy_from_slice(&d);
        a.flush().unwrap();
    }
    a.trim(8 * 4096, 4096).unwrap();
    model[8 * 4096..9 * 4096].fill(0);
    a.flush().unwrap();
    assert_eq!(a.stats().image_invalidations, 0, "{:?}", a.stats());
    assert_eq!(read(&*a, 0, model.len()), model);
    // An outside change is still noticed.
    let outside = vec![0xa5u8; 4096];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&outside, 0)
        .unwrap();
    set_mtime(&img, 3_000_000);
    a.flush().unwrap();
    assert_eq!(a.stats().image_invalidations, 1);
    model[..4096].copy_from_slice(&outside);
    assert_eq!(read(&*a, 0, model.len()), model);
}

#[test]
fn replaced_path_keeps_serving_the_open_file_and_invalidate_drops_all() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 << 10;
    let (img, old) = image(dir.path(), "base.img", size, 13);
    let e = engine(8 << 20, &[1]);
    let mut cfg = cached_cfg(&img, "r", 1);
    cfg.writable = false;
    let a = CachedExport::open(e.clone(), cfg).unwrap();
    assert_eq!(read(&*a, 0, size), old);
    // mv new.img base.img: the path names a new inode; the open file is unchanged.
    let (newp, new) = image(dir.path(), "new.img", size, 14);
    std::fs::rename(&newp, &img).unwrap();
    let c = a.check_image().unwrap();
    assert!(c.path_replaced && !c.changed, "{c:?}");
    assert_eq!(read(&*a, 0, size), old, "the open file is still served");
    assert_ne!(old, new);
    // Invalidating by hand drops every cached page (the pool held all 16).
    let held = e
        .pool_stats(tmem_core::ClientId(1), a.pool())
        .unwrap()
        .held
        .pages;
    assert_eq!(held, (size / 4096) as u64);
    assert_eq!(a.invalidate_image().unwrap(), held);
    assert_eq!(
        e.pool_stats(tmem_core::ClientId(1), a.pool())
            .unwrap()
            .held
            .pages,
        0
    );
    let before = a.stats().sectors_read;
    assert_eq!(read(&*a, 0, size), old);
    assert!(a.stats().sectors_read > before, "read from the image again");
}
