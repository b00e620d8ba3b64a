//! Swap export against an in-memory model: random I/O, zeros, TRIM, spill, concurrency,
//! re-attach after save/restore.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use rand::Rng;
use tmem_core::{ClientConfig, ClientId, SaveOptions};
use tmem_exports::{ExportError, SwapConfig, SwapExport, MAX_EXPORT_BYTES};
use tmem_nbd::BlockBackend;

fn check_all(b: &dyn BlockBackend, model: &[u8]) -> usize {
    let mut bad = 0;
    for (i, chunk) in model.chunks(1 << 20).enumerate() {
        let got = read(b, (i << 20) as u64, chunk.len());
        if let Some(d) = first_diff(&got, chunk) {
            eprintln!("mismatch at {}", (i << 20) + d);
            bad += got.iter().zip(chunk).filter(|(a, b)| a != b).count();
        }
    }
    bad
}

fn random_ops(b: &dyn BlockBackend, model: &mut [u8], seed: u64, ops: usize, max: u64) {
    let size = model.len() as u64;
    let mut r = rng(seed);
    for i in 0..ops {
        let (off, len) = range(&mut r, size, max);
        let (o, l) = (off as usize, len as usize);
        match r.gen_range(0..10) {
            0..=4 => {
                let mut data = vec![0u8; l];
                fill(&mut r, &mut data);
                b.write(off, &data, r.gen_bool(0.1)).expect("write");
                model[o..o + l].copy_from_slice(&data);
            }
            5 => {
                b.trim(off, len).expect("trim");
                model[o..o + l].fill(0);
            }
            6 => {
                b.write_zeroes(off, len, true, false).expect("write_zeroes");
                model[o..o + l].fill(0);
            }
            7 => b.flush().expect("flush"),
            _ => {
                let got = read(b, off, l);
                assert_eq!(
                    first_diff(&got, &model[o..o + l]),
                    None,
                    "op {i}: read {off}+{len}"
                );
            }
        }
    }
}

#[test]
fn never_written_reads_zero_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(16 << 20, &[1]);
    let s = swap(&e, dir.path(), "z", 1 << 20);
    let mut buf = vec![0xaau8; 3 * 4096 + 100];
    let zr = s.read(5000, &mut buf).unwrap();
    assert_eq!(zr.as_slice(), &[(0, buf.len())]);
    let ext = s.block_status(0, 1 << 20).unwrap();
    assert_eq!(ext.len(), 1);
    assert!(ext[0].hole && ext[0].zero && ext[0].len == 1 << 20);
    // Writing zeros stores nothing.
    s.write(0, &[0u8; 8192], false).unwrap();
    assert_eq!(s.stats().pages_in_pool, 0);
    s.write(4096, &[7u8; 10], false).unwrap();
    assert_eq!(s.stats().pages_in_pool, 1);
    let ext = s.block_status(0, 3 * 4096).unwrap();
    assert!(ext[0].hole && !ext[1].hole && ext[2].hole, "{ext:?}");
    s.trim(4096, 4096).unwrap();
    assert_eq!(s.stats().pages_in_pool, 0);
    assert_eq!(read(&*s, 4096, 4096), vec![0u8; 4096]);
    s.destroy().unwrap();
}

#[test]
fn random_io_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(64 << 20, &[1]);
    // Not a multiple of 4096: the tail page is partial.
    let size = (8 << 20) + 1234;
    let s = swap(&e, dir.path(), "m", size);
    let mut model = vec![0u8; size as usize];
    random_ops(&*s, &mut model, 1, 4000, 64 << 10);
    assert_eq!(check_all(&*s, &model), 0);
    let st = s.stats();
    assert_eq!(st.pages_spilled, 0, "{st:?}");
    assert!(st.pages_in_pool > 0);
    s.destroy().unwrap();
}

#[test]
fn too_large_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1 << 20, &[1]);
    let r = SwapExport::create(
        e.clone(),
        swap_cfg(dir.path(), "big", MAX_EXPORT_BYTES + 1, 1),
    );
    assert!(matches!(r, Err(ExportError::TooLarge { .. })), "{r:?}");
    let r = SwapExport::create(e, swap_cfg(dir.path(), "zero", 0, 1));
    assert!(matches!(r, Err(ExportError::InvalidConfig(_))), "{r:?}");
}

#[test]
fn spill_when_pool_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1 << 20, &[1]);
    let size = 64u64 << 20;
    let s = swap(&e, dir.path(), "spill", size);
    let spill_path = dir.path().join("spill.spill");
    let mut model = vec![0u8; size as usize];
    random_ops(&*s, &mut model, 2, 3000, 256 << 10);
    // Fill a contiguous 8 MiB with incompressible data as well.
    let mut r = rng(3);
    let mut big = vec![0u8; 8 << 20];
    r.fill(&mut big[..]);
    s.write(16 << 20, &big, false).unwrap();
    model[16 << 20..24 << 20].copy_from_slice(&big);
    assert_eq!(check_all(&*s, &model), 0);
    s.check_invariants().unwrap();
    let st = s.stats();
    eprintln!("{st:?}");
    assert!(st.pages_spilled > 1000, "{st:?}");
    assert!(st.put_refusals > 0 && st.written_back > 0, "{st:?}");
    assert!(st.spill_file_bytes >= st.pages_spilled * 4096 / 2, "{st:?}");
    assert!(e.held_bytes() <= e.budget(), "engine over budget");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&spill_path).unwrap();
    assert!(m.blocks() > 0);
    // Free room and read everything again: spilled pages come back into the pool.
    s.trim(16 << 20, 8 << 20).unwrap();
    model[16 << 20..24 << 20].fill(0);
    assert_eq!(check_all(&*s, &model), 0);
    s.check_invariants().unwrap();
    s.flush().unwrap();
    s.destroy().unwrap();
    assert!(!spill_path.exists());
    assert!(s.read(0, &mut [0u8; 512]).is_err());
}

#[test]
fn quota_refusals_spill_too() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(64 << 20, &[]);
    e.add_client(
        ClientId(1),
        ClientConfig {
            persistent_cap: 256 << 10,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    let s = swap(&e, dir.path(), "q", 16 << 20);
    let mut model = vec![0u8; 16 << 20];
    random_ops(&*s, &mut model, 4, 3000, 128 << 10);
    assert_eq!(check_all(&*s, &model), 0);
    let st = s.stats();
    assert!(st.pages_spilled > 0 && st.put_refusals > 0, "{st:?}");
    s.check_invariants().unwrap();
    s.destroy().unwrap();
}

#[test]
fn concurrent_writers_keep_every_update() {
    let st = concurrent_writers(None);
    assert!(st.pages_spilled > 0 && st.written_back > 0, "{st:?}");
}

/// The same with a remote tier that goes down and up while the writers run: pages move
/// between pool, tier and spill file, and no update is lost.
#[test]
fn concurrent_writers_with_a_flapping_remote_tier_keep_every_update() {
    let tier = Arc::new(MemTier::default());
    let st = concurrent_writers(Some(tier.clone()));
    assert!(
        st.remote_writes > 0 && st.remote_fallbacks + st.spill_writes > 0,
        "{st:?}"
    );
    assert_eq!(tier.durable_pages(), 0, "destroy left remote copies");
}

fn concurrent_writers(tier: Option<Arc<MemTier>>) -> tmem_exports::SwapStats {
    let dir = tempfile::tempdir().unwrap();
    // Small budget: spill and writeback run concurrently with the writers.
    let e = engine(512 << 10, &[1]);
    let size = 4u64 << 20;
    let mut cfg = swap_cfg(dir.path(), "c", size, 1);
    cfg.codec = tmem_core::Codec::None;
    cfg.dedup = tmem_core::DedupScope::Off;
    let s = SwapExport::create(e.clone(), cfg).unwrap();
    let flapper = tier.clone().map(|t| {
        with_tier(&s, &t);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let h = std::thread::spawn(move || {
            let mut down = false;
            while !stop2.load(Ordering::Relaxed) {
                down = !down;
                t.down.store(down, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(if down { 3 } else { 10 }));
            }
            t.down.store(false, Ordering::Relaxed);
        });
        (stop, h)
    });
    const THREADS: usize = 4;
    const SHARED: u64 = 32; // pages 0..32 written by every thread, each in its own slot
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let s = s.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            let mut r = rng(100 + t as u64);
            // slot t of a shared page: 1024 bytes = (t, page, version) repeated.
            let mut last = vec![0u64; SHARED as usize];
            // private pages: region [1 MiB + t*512 KiB, +512 KiB).
            let base = (1u64 << 20) + t as u64 * (512 << 10);
            let mut private = vec![0u64; 128];
            for i in 1..=1500u64 {
                if r.gen_bool(0.5) {
                    let p = r.gen_range(0..SHARED);
                    let mut slot = [0u8; 1024];
                    for w in slot.chunks_mut(24) {
                        let v = [t as u64, p, i];
                        for (k, x) in v.iter().enumerate() {
                            if w.len() >= 8 * (k + 1) {
                                w[8 * k..8 * k + 8].copy_from_slice(&x.to_le_bytes());
                            }
                        }
                    }
                    s.write(p * 4096 + t as u64 * 1024, &slot, false).unwrap();
                    last[p as usize] = i;
                } else {
                    let p = r.gen_range(0..128u64);
                    let mut page = [0u8; 4096];
                    for w in page.chunks_mut(16) {
                        w[..8].copy_from_slice(&(base + p).to_le_bytes());
                        w[8..].copy_from_slice(&i.to_le_bytes());
                    }
                    s.write(base + p * 4096, &page, false).unwrap();
                    private[p as usize] = i;
                }
                // Self-check a private page: exactly what this thread wrote last.
                let p = r.gen_range(0..128u64);
                let got = read(&*s, base + p * 4096, 4096);
                for w in got.chunks(16) {
                    let v = u64::from_le_bytes(w[8..].try_into().unwrap());
                    if private[p as usize] == 0 {
                        assert!(w.iter().all(|&b| b == 0));
                    } else {
                        assert_eq!(v, private[p as usize], "thread {t} page {p}");
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            (last, private)
        }));
    }
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    if let Some((stop, h)) = flapper {
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }
    for (t, (last, _)) in results.iter().enumerate() {
        for p in 0..SHARED {
            let got = read(&*s, p * 4096 + t as u64 * 1024, 1024);
            if last[p as usize] == 0 {
                assert!(got.iter().all(|&b| b == 0), "thread {t} page {p}");
                continue;
            }
            let v = u64::from_le_bytes(got[16..24].try_into().unwrap());
            let tt = u64::from_le_bytes(got[0..8].try_into().unwrap());
            assert_eq!(
                (tt, v),
                (t as u64, last[p as usize]),
                "lost update: thread {t} page {p}"
            );
        }
    }
    s.check_invariants().unwrap();
    let st = s.stats();
    eprintln!("{st:?}");
    assert_eq!(st.poisoned_pages, 0, "{st:?}");
    s.destroy().unwrap();
    st
}

#[test]
fn spilled_pages_come_back_when_room_returns() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(256 << 10, &[1]);
    let s = swap(&e, dir.path(), "pb", 4 << 20);
    let mut model = vec![0u8; 4 << 20];
    let mut r = rng(9);
    r.fill(&mut model[..]);
    s.write(0, &model, false).unwrap();
    let before = s.stats();
    assert!(before.pages_spilled > 512, "{before:?}");
    e.set_budget(64 << 20);
    assert_eq!(check_all(&*s, &model), 0);
    let after = s.stats();
    assert!(after.pulled_back > 0, "{after:?}");
    assert_eq!(after.pages_spilled + after.pages_in_pool, 1024, "{after:?}");
    assert!(after.pages_spilled < before.pages_spilled, "{after:?}");
    s.check_invariants().unwrap();
    s.destroy().unwrap();
}

#[test]
fn attach_after_save_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let e1 = engine(1 << 20, &[1]);
    let size = 16u64 << 20;
    let cfg = swap_cfg(dir.path(), "r", size, 1);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    let mut model = vec![0u8; size as usize];
    random_ops(&*s, &mut model, 5, 2500, 256 << 10);
    s.flush().unwrap();
    let st = s.stats();
    assert!(st.pages_spilled > 0 && st.pages_in_pool > 0, "{st:?}");
    let mut stream = Vec::new();
    e1.save(ClientId(1), SaveOptions::default(), &mut stream)
        .unwrap();
    drop(s);
    drop(e1);
    // A new daemon: restore the pool, re-attach, reuse the spill file.
    let e2 = engine(1 << 20, &[1]);
    let rep = e2.restore(ClientId(1), &mut &stream[..]).unwrap();
    let pool = rep
        .pools
        .iter()
        .find(|(_, l)| l == "swap:r")
        .map(|(p, _)| *p)
        .expect("restored swap pool");
    let s2 = SwapExport::attach(e2.clone(), cfg, pool).unwrap();
    assert_eq!(s2.stats().pages_spilled, st.pages_spilled);
    s2.check_invariants().unwrap();
    assert_eq!(check_all(&*s2, &model), 0);
    random_ops(&*s2, &mut model, 6, 1000, 64 << 10);
    assert_eq!(check_all(&*s2, &model), 0);
    s2.destroy().unwrap();
}

#[test]
fn frozen_client_writes_go_to_spill() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(16 << 20, &[1]);
    let s = swap(&e, dir.path(), "f", 1 << 20);
    s.write(0, &[1u8; 8192], false).unwrap();
    e.freeze(ClientId(1)).unwrap();
    s.write(4096, &[2u8; 4096], true).unwrap();
    s.write(8192 + 10, &[3u8; 10], false).unwrap();
    let st = s.stats();
    assert_eq!((st.pages_in_pool, st.pages_spilled), (1, 2), "{st:?}");
    let got = read(&*s, 0, 3 * 4096);
    assert!(got[..4096].iter().all(|&b| b == 1));
    assert!(got[4096..8192].iter().all(|&b| b == 2));
    assert!(got[8192..8202].iter().all(|&b| b == 0));
    assert!(got[8202..8212].iter().all(|&b| b == 3));
    e.thaw(ClientId(1)).unwrap();
    s.destroy().unwrap();
}

/// Writes `pages` pages of distinct random data; returns the model.
fn fill_random(s: &SwapExport, pages: u64, seed: u64) -> Vec<u8> {
    let mut model = vec![0u8; (pages * PAGE) as usize];
    let mut r = rng(seed);
    r.fill(&mut model[..]);
    for (i, chunk) in model.chunks(256 << 10).enumerate() {
        s.write((i as u64) * (256 << 10), chunk, false)
            .expect("write");
    }
    model
}

/// What reading page `p` gives: `Ok(data)` or the export error.
fn read_page(s: &SwapExport, p: u64) -> Result<Vec<u8>, tmem_nbd::BackendError> {
    let mut buf = vec![0u8; PAGE as usize];
    let zr = s.read(p * PAGE, &mut buf)?;
    for &(o, l) in zr.as_slice() {
        buf[o..o + l].fill(0);
    }
    Ok(buf)
}

fn allocated(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.len(), m.blocks())
}

/// The daemon dies (nothing saved): a new engine, the export recovered from its files.
#[test]
fn unclean_stop_serves_verified_spill_and_poisons_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let cfg = SwapConfig {
        codec: tmem_core::Codec::None,
        ..swap_cfg(dir.path(), "u", size, 1)
    };
    let e1 = engine(1 << 20, &[1]);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    let pages = 1024;
    let model = fill_random(&s, pages, 77);
    // The last page written is zeroed again, page 1500 never written.
    s.write(1023 * PAGE, &[0u8; 4096], false).unwrap();
    let st = s.stats();
    assert!(st.pages_spilled > 0 && st.pages_in_pool > 0, "{st:?}");
    s.check_invariants().unwrap();
    let spill_before = allocated(&cfg.spill_path);
    // Death: no save, no destroy. Every pwrite completed, as after a SIGKILL.
    drop(s);
    drop(e1);

    let e2 = engine(1 << 20, &[1]);
    let (s2, rep) = SwapExport::recover(e2.clone(), cfg.clone()).unwrap();
    assert!(rep.map_found, "{rep:?}");
    assert_eq!(
        allocated(&cfg.spill_path),
        spill_before,
        "spill file changed"
    );
    assert_eq!(rep.spilled, st.pages_spilled, "{rep:?} {st:?}");
    assert_eq!(rep.poisoned, st.pages_in_pool, "{rep:?} {st:?}");
    assert_eq!(s2.stats().poisoned_pages, rep.poisoned);
    s2.check_invariants().unwrap();
    let (mut good, mut lost) = (0, 0);
    for p in 0..pages - 1 {
        match read_page(&s2, p) {
            Ok(d) => {
                assert_eq!(
                    &d[..],
                    &model[(p * PAGE) as usize..((p + 1) * PAGE) as usize]
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.nbd_errno(), tmem_nbd::proto::EIO, "{e}");
                lost += 1;
            }
        }
    }
    assert_eq!((good, lost), (st.pages_spilled, st.pages_in_pool));
    // Zero pages stay zero.
    assert!(read_page(&s2, 1023).unwrap().iter().all(|&b| b == 0));
    assert!(read_page(&s2, 1500).unwrap().iter().all(|&b| b == 0));
    // A poisoned page must be read (not a hole) and fails; a whole-page write or a trim
    // clears it; a partial write or write-zeroes cannot; a partial trim leaves it.
    let lost_pages: Vec<u64> = s2
        .poison()
        .ranges()
        .iter()
        .flat_map(|&(a, b)| a..b)
        .collect();
    let (a, b, c) = (lost_pages[0], lost_pages[1], lost_pages[2]);
    let ext = s2.block_status(a * PAGE, PAGE).unwrap();
    assert!(!ext[0].hole && !ext[0].zero, "{ext:?}");
    assert!(s2.write(a * PAGE + 10, &[1u8; 10], false).is_err());
    assert!(s2.write_zeroes(a * PAGE, 100, true, false).is_err());
    s2.trim(a * PAGE, 100).unwrap();
    assert!(read_page(&s2, a).is_err());
    s2.write(a * PAGE, &[9u8; 4096], false).unwrap();
    assert_eq!(read_page(&s2, a).unwrap(), vec![9u8; 4096]);
    s2.trim(b * PAGE, PAGE).unwrap();
    assert!(read_page(&s2, b).unwrap().iter().all(|&x| x == 0));
    assert_eq!(s2.stats().poisoned_pages, rep.poisoned - 2);
    s2.check_invariants().unwrap();

    // Another unclean stop: what was poisoned stays so, the trimmed page stays zero, and
    // what was in memory (the rewritten page, pages pulled back on read) is lost again.
    drop(s2);
    drop(e2);
    let e3 = engine(1 << 20, &[1]);
    let (s3, rep3) = SwapExport::recover(e3.clone(), cfg.clone()).unwrap();
    assert!(rep3.poisoned > rep.poisoned - 2, "{rep3:?} {rep:?}");
    assert!(read_page(&s3, c).is_err() && read_page(&s3, a).is_err());
    assert!(read_page(&s3, b).unwrap().iter().all(|&x| x == 0));
    // And a clean save/restore keeps the poison.
    s3.flush().unwrap();
    let mut stream = Vec::new();
    e3.save(ClientId(1), SaveOptions::default(), &mut stream)
        .unwrap();
    drop(s3);
    drop(e3);
    let e4 = engine(1 << 20, &[1]);
    let r = e4.restore(ClientId(1), &mut &stream[..]).unwrap();
    let pool = r.pools.iter().find(|(_, l)| l == "swap:u").unwrap().0;
    let s4 = SwapExport::attach(e4.clone(), cfg, pool).unwrap();
    assert_eq!(s4.stats().poisoned_pages, rep3.poisoned);
    assert!(read_page(&s4, c).is_err());
    assert!(read_page(&s4, b).unwrap().iter().all(|&x| x == 0));
    s4.check_invariants().unwrap();
    s4.destroy().unwrap();
}

/// A swap export's page map, read and written raw (as a daemon killed mid-write leaves it):
/// one little-endian `u64` per page after a 64-byte header.
struct RawMap(std::fs::File);

impl RawMap {
    fn open(spill: &std::path::Path) -> RawMap {
        let mut p = spill.as_os_str().to_owned();
        p.push(".map");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(std::path::PathBuf::from(p))
            .unwrap();
        RawMap(f)
    }
    fn get(&self, page: u64) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        self.0.read_exact_at(&mut b, 64 + page * 8).unwrap();
        u64::from_le_bytes(b)
    }
    fn set(&self, page: u64, v: u64) {
        use std::os::unix::fs::FileExt;
        self.0
            .write_all_at(&v.to_le_bytes(), 64 + page * 8)
            .unwrap();
    }
}

/// A pending entry (`tag`: `1 << 61` spill, `1 << 60` remote) naming `old` and `new`.
fn pending_entry(tag: u64, old: &[u8], new: &[u8]) -> u64 {
    let half = |d: &[u8]| xxhash_rust::xxh3::xxh3_64(d) & ((1 << 30) - 1);
    tag | half(old) << 30 | half(new)
}

/// A daemon killed while a spilled page was rewritten in place (the pool refusing the new
/// content) leaves a page-map entry naming both contents: recovery serves whichever the
/// copy is, and poisons a copy that is neither.
#[test]
fn killed_during_an_in_place_spill_rewrite_serves_the_old_or_the_new_content() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let cfg = SwapConfig {
        codec: tmem_core::Codec::None,
        ..swap_cfg(dir.path(), "k", size, 1)
    };
    let e1 = engine(1 << 20, &[1]);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    let pages = 1024;
    let model = fill_random(&s, pages, 78);
    let map = RawMap::open(&cfg.spill_path);
    let entry = |p: u64| map.get(p);
    let spilled: Vec<u64> = (0..pages).filter(|&p| entry(p) >> 63 == 1).collect();
    assert!(spilled.len() >= 3, "{:?}", s.stats());
    let (p1, p2, p3) = (spilled[0], spilled[1], spilled[2]);
    s.check_invariants().unwrap();
    // Death with three rewrites in flight (every pwrite completed, as after a SIGKILL).
    drop(s);
    drop(e1);
    let pending = |old: &[u8], new: &[u8]| pending_entry(1 << 61, old, new);
    let page = |p: u64| &model[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
    let spill = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.spill_path)
        .unwrap();
    let new1 = vec![0x11u8; PAGE as usize];
    let set = |p: u64, v: u64| map.set(p, v);
    // p1: the new copy was written, its final entry not yet.
    set(p1, pending(page(p1), &new1));
    spill.write_all_at(&new1, p1 * PAGE).unwrap();
    // p2: killed before the new copy was written.
    set(p2, pending(page(p2), &new1));
    // p3: an entry whose hashes match neither the copy.
    set(p3, pending(&[0x22u8; 4096], &new1));
    let e2 = engine(1 << 20, &[1]);
    let (s2, rep) = SwapExport::recover(e2.clone(), cfg.clone()).unwrap();
    assert!(rep.map_found, "{rep:?}");
    // Recovered entries are plain spill entries again (before a read pulls a page back).
    assert_eq!(
        entry(p1),
        (1 << 63) | (xxhash_rust::xxh3::xxh3_64(&new1) & !(1 << 63))
    );
    assert_eq!(entry(p2) >> 63, 1);
    assert_eq!(read_page(&s2, p1).unwrap(), new1, "the new content");
    assert_eq!(read_page(&s2, p2).unwrap(), page(p2), "the old content");
    let e = read_page(&s2, p3).unwrap_err();
    assert_eq!(e.nbd_errno(), tmem_nbd::proto::EIO, "{e}");
    assert!(s2.poison().contains(p3) && !s2.poison().contains(p1) && !s2.poison().contains(p2));
    s2.check_invariants().unwrap();
    s2.destroy().unwrap();
}

#[test]
fn torn_spill_copy_and_missing_map_are_poisoned() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let cfg = SwapConfig {
        codec: tmem_core::Codec::None,
        ..swap_cfg(dir.path(), "t", size, 1)
    };
    let e1 = engine(1 << 20, &[1]);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    let model = fill_random(&s, 1024, 5);
    let st = s.stats();
    assert!(st.pages_spilled > 2, "{st:?}");
    // Oldest first: page 0 and 1 went to the spill file.
    let key = |p| tmem_core::PageKey::new(s.pool(), tmem_core::ObjectId::from_u64(0), p);
    assert!(e1.probe(ClientId(1), key(0)).unwrap().is_none());
    assert!(e1.probe(ClientId(1), key(1)).unwrap().is_none());
    drop(s);
    drop(e1);
    // Tear the copy of the first spilled page (the oldest pages were written back).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.spill_path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xffu8; 512], 0).unwrap();
    let e2 = engine(1 << 20, &[1]);
    let (s2, rep) = SwapExport::recover(e2.clone(), cfg.clone()).unwrap();
    assert!(read_page(&s2, 0).is_err(), "{rep:?}");
    assert_eq!(read_page(&s2, 1).unwrap(), model[4096..8192].to_vec());
    assert_eq!(rep.spilled, st.pages_spilled - 1, "{rep:?} {st:?}");
    assert_eq!(rep.poisoned, 1024 - rep.spilled);
    drop(s2);
    drop(e2);
    // Without a map nothing can be proven: every page is poisoned, the spill file kept.
    let before = allocated(&cfg.spill_path);
    std::fs::remove_file(format!("{}.map", cfg.spill_path.display())).unwrap();
    let e3 = engine(1 << 20, &[1]);
    let (s3, rep) = SwapExport::recover(e3.clone(), cfg.clone()).unwrap();
    assert!(!rep.map_found);
    assert_eq!(rep.poisoned, 1024);
    assert_eq!(allocated(&cfg.spill_path), before);
    assert!(read_page(&s3, 1).is_err() && read_page(&s3, 1000).is_err());
    s3.check_invariants().unwrap();
    // Writing everything makes it whole again.
    let model = fill_random(&s3, 1024, 6);
    assert_eq!(s3.stats().poisoned_pages, 0);
    assert_eq!(check_all(&*s3, &model), 0);
    s3.check_invariants().unwrap();
    s3.destroy().unwrap();
    assert!(!cfg.spill_path.exists());
}

#[test]
fn adopt_recovered_serves_a_poisoned_page_from_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = swap_cfg(dir.path(), "a", 1 << 20, 1);
    let e1 = engine(64 << 20, &[1]);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    s.write(0, &[7u8; 8192], false).unwrap();
    drop(s);
    drop(e1);
    let e2 = engine(64 << 20, &[1]);
    let (s2, rep) = SwapExport::recover(e2.clone(), cfg).unwrap();
    assert_eq!(rep.poisoned, 2);
    assert!(!s2.adopt_recovered(0).unwrap(), "not in the pool yet");
    // A recovery puts the page back into the export's pool, then clears its poison.
    let key = tmem_core::PageKey::new(s2.pool(), tmem_core::ObjectId::from_u64(0), 0);
    e2.put(ClientId(1), key, &[7u8; 4096]).unwrap();
    assert!(s2.adopt_recovered(0).unwrap());
    assert_eq!(read_page(&s2, 0).unwrap(), vec![7u8; 4096]);
    assert!(read_page(&s2, 1).is_err());
    assert_eq!(s2.stats().poisoned_pages, 1);
    s2.check_invariants().unwrap();
    s2.destroy().unwrap();
}

#[test]
fn creation_needs_room_for_the_worst_case() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1 << 20, &[1]);
    let cfg = SwapConfig {
        spill_reserve: 1 << 60,
        ..swap_cfg(dir.path(), "big", 1 << 30, 1)
    };
    match SwapExport::create(e.clone(), cfg.clone()) {
        Err(ExportError::SpillSpace {
            needed, available, ..
        }) => assert!(needed > available),
        other => panic!("expected SpillSpace, got {other:?}"),
    }
    assert!(!cfg.spill_path.exists());
    assert!(e.pools_of(ClientId(1)).is_empty());
    // A reserve that fits.
    let cfg = SwapConfig {
        spill_reserve: 1 << 20,
        ..cfg
    };
    SwapExport::create(e, cfg).unwrap().destroy().unwrap();
}

fn with_tier(s: &SwapExport, t: &Arc<MemTier>) {
    s.set_remote(Some(t.clone() as Arc<dyn tmem_exports::RemoteTier>));
}

/// With a remote tier, pages the pool refuses go there instead of the spill file; random
/// I/O still matches the model; with the tier down, spills fall back to the file.
#[test]
fn remote_tier_takes_spills_and_falls_back_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1 << 20, &[1]);
    let size = 32u64 << 20;
    let s = swap(&e, dir.path(), "r", size);
    let tier = Arc::new(MemTier::default());
    with_tier(&s, &tier);
    let mut model = vec![0u8; size as usize];
    random_ops(&*s, &mut model, 21, 3000, 256 << 10);
    assert_eq!(check_all(&*s, &model), 0);
    s.check_invariants().unwrap();
    let st = s.stats();
    eprintln!("{st:?}");
    assert!(st.pages_remote > 100 && st.remote_writes > 0, "{st:?}");
    assert_eq!(st.pages_spilled, 0, "{st:?}");
    assert_eq!(st.spill_file_bytes, 0, "{st:?}");
    assert_eq!(
        tier.durable_pages() as u64,
        st.pages_remote,
        "remote copies leaked"
    );
    // Tier down: new spills go to the file; pages already remote cannot be read (EIO, not
    // poisoned) until it is back.
    tier.down.store(true, Ordering::Relaxed);
    let mut r = rng(22);
    for _ in 0..2000 {
        let p = r.gen_range(0..size / PAGE);
        let mut data = vec![0u8; PAGE as usize];
        r.fill(&mut data[..]);
        s.write(p * PAGE, &data, false).unwrap();
        model[(p * PAGE) as usize..][..PAGE as usize].copy_from_slice(&data);
    }
    let st2 = s.stats();
    assert!(st2.pages_spilled > 0, "{st2:?}");
    tier.down.store(false, Ordering::Relaxed);
    assert_eq!(check_all(&*s, &model), 0);
    s.check_invariants().unwrap();
    let st3 = s.stats();
    assert_eq!(st3.poisoned_pages, 0, "{st3:?}");
    s.destroy().unwrap();
    assert_eq!(tier.durable_pages(), 0, "destroy left remote copies");
}

/// The NBD server runs a read on its workers when the export says it may block: exactly
/// the reads that touch a page in the remote tier.
#[test]
fn reads_of_remote_pages_are_flagged_as_slow() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1 << 20, &[1]);
    let size = 8u64 << 20;
    let s = swap(&e, dir.path(), "m", size);
    let pages = size / PAGE;
    let _ = fill_random(&s, pages, 5);
    assert!(
        (0..pages).all(|p| !s.read_may_block(p * PAGE, PAGE)),
        "nothing is remote without a tier"
    );
    let tier = Arc::new(MemTier::default());
    with_tier(&s, &tier);
    let model = fill_random(&s, pages, 6);
    let st = s.stats();
    assert!(st.pages_remote > 0 && st.pages_in_pool > 0, "{st:?}");
    let flagged = (0..pages)
        .filter(|&p| s.read_may_block(p * PAGE, PAGE))
        .count() as u64;
    assert_eq!(flagged, st.pages_remote, "{st:?}");
    // A sub-page read and a two-page read that touch a remote page are flagged too.
    let remote = (0..pages)
        .find(|&p| s.read_may_block(p * PAGE, PAGE))
        .unwrap();
    assert!(s.read_may_block(remote * PAGE + 512, 512));
    assert!(s.read_may_block(remote.saturating_sub(1) * PAGE + 100, PAGE));
    assert!(!s.read_may_block(0, 0));
    assert_eq!(check_all(&*s, &model), 0);
    s.destroy().unwrap();
}

/// A tier that returns other content than was stored: the page is poisoned (EIO), never
/// served wrong.
#[test]
fn garbled_remote_copies_are_poisoned_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(256 << 10, &[1]);
    let s = swap(&e, dir.path(), "g", 8 << 20);
    let tier = Arc::new(MemTier::default());
    with_tier(&s, &tier);
    let model = fill_random(&s, 1024, 5);
    let st = s.stats();
    assert!(st.pages_remote > 0, "{st:?}");
    tier.garble_durable();
    let (mut good, mut bad) = (0, 0);
    for p in 0..1024 {
        match read_page(&s, p) {
            Ok(d) => {
                assert_eq!(&d[..], &model[(p * PAGE) as usize..][..4096], "page {p}");
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.nbd_errno(), tmem_nbd::proto::EIO, "{e}");
                bad += 1;
            }
        }
    }
    assert_eq!(bad, st.pages_remote, "good {good}");
    assert_eq!(s.stats().poisoned_pages, st.pages_remote);
    s.check_invariants().unwrap();
}

/// A daemon killed while a page in the remote tier was rewritten in place (the pool
/// refusing the new content) leaves an entry naming both contents: the restarted export
/// serves whichever the tier holds, and poisons a copy that is neither.
#[test]
fn killed_during_an_in_place_remote_rewrite_serves_the_old_or_the_new_content() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SwapConfig {
        codec: tmem_core::Codec::None,
        ..swap_cfg(dir.path(), "kr", 8 << 20, 1)
    };
    let tier = Arc::new(MemTier::default());
    let e1 = engine(1 << 20, &[1]);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    with_tier(&s, &tier);
    let pages = 1024;
    let model = fill_random(&s, pages, 79);
    let remote: Vec<u64> = (0..pages)
        .filter(|&p| s.read_may_block(p * PAGE, PAGE))
        .collect();
    assert!(remote.len() >= 4, "{:?}", s.stats());
    // A rewrite through the whole path while the pool refuses it ends with a plain entry.
    let p0 = remote[3];
    let new0 = vec![0x33u8; PAGE as usize];
    e1.freeze(tmem_core::ClientId(1)).unwrap(); // the pool refuses every put
    s.write(p0 * PAGE, &new0, false).unwrap();
    drop(s);
    drop(e1);
    let map = RawMap::open(&cfg.spill_path);
    let entry = |p: u64| map.get(p);
    let set = |p: u64, v: u64| map.set(p, v);
    assert_eq!(
        entry(p0) >> 62,
        0b01,
        "p0 {:#x}: a plain remote entry",
        entry(p0)
    );
    let pending = |old: &[u8], new: &[u8]| pending_entry(1 << 60, old, new);
    let page = |p: u64| &model[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
    let (p1, p2, p3) = (remote[0], remote[1], remote[2]);
    let new1 = vec![0x11u8; PAGE as usize];
    // p1: the tier took the new copy, its final entry was not written yet.
    set(p1, pending(page(p1), &new1));
    tier.replace_durable(p1, &new1);
    // p2: killed before the tier took it.
    set(p2, pending(page(p2), &new1));
    // p3: neither content.
    set(p3, pending(&[0x22u8; 4096], &new1));
    let e2 = engine(1 << 20, &[1]);
    let (s2, rep) = SwapExport::recover(e2.clone(), cfg.clone()).unwrap();
    assert!(rep.remote >= 3, "{rep:?}");
    with_tier(&s2, &tier);
    assert_eq!(read_page(&s2, p1).unwrap(), new1, "the new content");
    assert_eq!(read_page(&s2, p2).unwrap(), page(p2), "the old content");
    let e = read_page(&s2, p3).unwrap_err();
    assert_eq!(e.nbd_errno(), tmem_nbd::proto::EIO, "{e}");
    assert!(s2.poison().contains(p3));
    assert!(!s2.poison().contains(p1) && !s2.poison().contains(p2));
    assert_eq!(read_page(&s2, p0).unwrap(), new0);
    s2.check_invariants().unwrap();
    s2.destroy().unwrap();
}

/// After an unclean stop the page map finds the remote pages again; a restarted export
/// with the tier serves them, checked against the map.
#[test]
fn unclean_stop_keeps_remote_pages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SwapConfig {
        codec: tmem_core::Codec::None,
        ..swap_cfg(dir.path(), "ur", 8 << 20, 1)
    };
    let tier = Arc::new(MemTier::default());
    let e1 = engine(1 << 20, &[1]);
    let s = SwapExport::create(e1.clone(), cfg.clone()).unwrap();
    with_tier(&s, &tier);
    let pages = 1024;
    let model = fill_random(&s, pages, 78);
    let st = s.stats();
    assert!(st.pages_remote > 0 && st.pages_in_pool > 0, "{st:?}");
    drop(s);
    drop(e1);
    let e2 = engine(1 << 20, &[1]);
    let (s2, rep) = SwapExport::recover(e2.clone(), cfg.clone()).unwrap();
    assert_eq!(rep.remote, st.pages_remote, "{rep:?}");
    assert_eq!(rep.poisoned, st.pages_in_pool, "{rep:?}");
    with_tier(&s2, &tier);
    let mut good = 0;
    for p in 0..pages {
        if let Ok(d) = read_page(&s2, p) {
            assert_eq!(&d[..], &model[(p * PAGE) as usize..][..4096], "page {p}");
            good += 1;
        }
    }
    assert_eq!(good, st.pages_remote);
    s2.check_invariants().unwrap();
}
