//! Memory truth, measured from the outside: what the daemon gives back must leave its
//! resident set as the kernel reports it (`/proc/PID/status`), not only its own books.

mod common;

use common::*;
use std::time::Duration;
use tmem_api::Stats;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-memory")
        .tempdir()
        .unwrap()
}

/// `VmRSS` of a process, bytes.
fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A runtime directory on a tmpfs, as `/run` is on a real host: the durable pool memory
/// lives there, and on a tmpfs a freed page leaves the page cache at once (so the kernel's
/// account, `mincore`, follows the engine's).
fn tmpfs_runtime() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("tmemd-memory-run")
        .tempdir_in(shm);
    b.unwrap_or_else(|_| tmp())
}

fn stats(d: &Tmemd) -> Stats {
    serde_json::from_str(&stdout(&d.ctl(&["stats", "--json"]))).unwrap()
}

/// The engine's account and the kernel's agree: resident within 5 % + 4 MiB of held.
fn assert_books_match(s: &Stats, phase: &str) {
    let (held, resident) = (s.pool.held_bytes as f64, s.pool.resident_bytes as f64);
    assert!(
        (held - resident).abs() <= 0.05 * held + (4 << 20) as f64,
        "{phase}: held {held} resident {resident}"
    );
}

#[test]
fn discarded_swap_data_leaves_the_daemons_rss() {
    if tmem_vm::test_tools(["nbdcopy", "qemu-io"]).is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let run = tmpfs_runtime();
    let d = Tmemd::start_split(run.path(), &dir, &["--budget", "1G"]);
    let o = d.ctl(&["export", "add", "swap0", "--kind", "swap", "--size", "512M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let start = rss_of(d.pid());

    // 320 MiB: half random pages, a quarter compressible, a quarter zero (≈ 2× overall).
    let data = t.path().join("data.raw");
    std::fs::write(&data, pattern(320 << 20, 7)).unwrap();
    run_ok("nbdcopy", &[data.to_str().unwrap(), &d.nbd_uri("swap0")]);
    let full = rss_of(d.pid());
    let s = stats(&d);
    eprintln!(
        "start RSS {} MiB, after 320 MiB written {} MiB (held {} MiB, resident {} MiB, {} pages)",
        start >> 20,
        full >> 20,
        s.pool.held_bytes >> 20,
        s.pool.resident_bytes >> 20,
        s.pool.pages
    );
    assert!(s.pool.persistent_pages > 60_000, "{:?}", s.pool);
    assert!(
        full > start + (100 << 20),
        "the data is in the daemon: {start} -> {full}"
    );
    assert_books_match(&s, "full");

    // Discard it all: the pool empties and the memory leaves the process.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "discard 0 512M", &d.nbd_uri("swap0")],
    );
    // The release happens inside the discard; the poll only waits for /proc to be read
    // after the client has gone (no timing is asserted).
    let back = wait_until(Duration::from_secs(10), || {
        rss_of(d.pid()) <= start + (32 << 20)
    });
    let after = rss_of(d.pid());
    let s = stats(&d);
    eprintln!(
        "after discard RSS {} MiB (held {} MiB, resident {} MiB, {} pages)",
        after >> 20,
        s.pool.held_bytes >> 20,
        s.pool.resident_bytes >> 20,
        s.pool.pages
    );
    assert_eq!(s.pool.pages, 0);
    assert!(
        back,
        "RSS {} MiB did not fall back to within 32 MiB of {} MiB",
        after >> 20,
        start >> 20
    );
    assert_books_match(&s, "empty");
}

#[test]
fn churn_then_compact_gives_memory_back() {
    if tmem_vm::test_tools(["qemu-io", "qemu-img"]).is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    // Background compaction off: this test drives it by hand (tmemctl compact).
    let cfg = t.path().join("tmemd.toml");
    std::fs::write(&cfg, "compact_threshold = 0\n").unwrap();
    let run = tmpfs_runtime();
    let d = Tmemd::start_split(
        run.path(),
        &dir,
        &["--budget", "1G", "--config", cfg.to_str().unwrap()],
    );
    let o = d.ctl(&["export", "add", "swap0", "--kind", "swap", "--size", "128M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let data = t.path().join("data.raw");
    let want = compressible(128 << 20);
    std::fs::write(&data, &want).unwrap();
    qemu_img_write(data.to_str().unwrap(), &d.nbd_uri("swap0"));
    // Discard three pages of every four: every slab keeps a few pages.
    let mut cmds = Vec::new();
    for page in 0..(128u64 << 20) / 4096 {
        if page % 4 != 0 {
            cmds.push("-c".to_string());
            cmds.push(format!("discard {} 4k", page * 4096));
        }
    }
    for chunk in cmds.chunks(4096) {
        let mut args: Vec<&str> = vec!["-f", "raw"];
        args.extend(chunk.iter().map(String::as_str));
        let uri = d.nbd_uri("swap0");
        args.push(&uri);
        run_ok("qemu-io", &args);
    }
    let before = stats(&d);
    assert!(
        before.pool.compactable_bytes > 8 << 20,
        "fragmented: {:?}",
        before.pool
    );
    let rss_before = rss_of(d.pid());
    let o = d.ctl(&["compact", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: tmem_api::CompactReply = serde_json::from_str(&stdout(&o)).unwrap();
    let after = stats(&d);
    let rss_after = rss_of(d.pid());
    eprintln!(
        "compact: moved {} freed {} MiB; RSS {} -> {} MiB; held {} -> {} MiB",
        r.moved,
        r.bytes_freed >> 20,
        rss_before >> 20,
        rss_after >> 20,
        before.pool.held_bytes >> 20,
        after.pool.held_bytes >> 20
    );
    assert!(r.moved > 0 && r.bytes_freed > 8 << 20, "{r:?}");
    // The kernel saw it: the RSS fell by most of what compaction freed.
    assert!(
        rss_before.saturating_sub(rss_after) >= r.bytes_freed / 2,
        "RSS {rss_before} -> {rss_after}, freed {}",
        r.bytes_freed
    );
    assert_books_match(&after, "compacted");
    assert_eq!(after.pool.compaction.runs, before.pool.compaction.runs + 1);
    // Every page that was kept still reads back exactly.
    let mut reads = Vec::new();
    for page in (0..(128u64 << 20) / 4096).step_by(4 * 97) {
        let at = page * 4096;
        let chunk = &want[at as usize..at as usize + 4096];
        let path = t.path().join(format!("p{page}"));
        std::fs::write(&path, chunk).unwrap();
        reads.push((at, path));
    }
    for (at, path) in reads {
        // qemu-io's compare reads from the export and compares with the file's bytes.
        let out = run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("read -v {at} 4k"),
                &d.nbd_uri("swap0"),
            ],
        );
        let got = hexdump_bytes(&out);
        assert_eq!(got, std::fs::read(&path).unwrap(), "page at {at}");
    }
    // The metrics say the same.
    let (_, m) = d.curl("GET", "/metrics", None);
    let samples = parse_prometheus(&m);
    let get = |n: &str| {
        samples
            .iter()
            .find(|(name, _, _)| name == n)
            .map(|s| s.2)
            .unwrap_or(-1.0)
    };
    assert!(get("tmem_compaction_freed_bytes_total") >= r.bytes_freed as f64);
    assert!(get("tmem_resident_bytes") > 0.0);
}

/// Pages that compress to many different sizes: a random head of 512..2560 bytes, then
/// zeros (so that every size class fills, and fragments when pages go).
fn compressible(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = vec![0u8; len];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        let head = 512 + (i * 37) % 2048;
        for b in page.iter_mut().take(head) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

/// Parses `qemu-io read -v` output (`OFFSET:  xx xx ... ascii`) into bytes.
fn hexdump_bytes(out: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for line in out.lines() {
        let Some((off, rest)) = line.split_once(':') else {
            continue;
        };
        if u64::from_str_radix(off.trim(), 16).is_err() {
            continue;
        }
        for tok in rest.split_whitespace().take(16) {
            match u8::from_str_radix(tok, 16) {
                Ok(b) if tok.len() == 2 => v.push(b),
                _ => break,
            }
        }
    }
    v
}
