//! Crash-proof tmemd, measured from the outside: a swap export's acknowledged writes are
//! read back intact after `kill -9` of the daemon (its pool pages come back from durable
//! memory, its spilled pages from the spill file), with real clients: nbdcopy, qemu-img
//! and fio's nbd engine with crc32c verification.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tmem_api::{ExportInfo, Status};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-durable")
        .tempdir()
        .unwrap()
}

fn status(d: &Tmemd) -> Status {
    serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap()
}

fn export(d: &Tmemd, name: &str) -> ExportInfo {
    serde_json::from_str(&d.curl("GET", &format!("/api/v1/exports/{name}"), None).1).unwrap()
}

/// Compressible pseudo-random data (a random head, then zeros, per page).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        let head = if i % 3 == 0 {
            4096
        } else {
            1024 + (i * 53) % 2048
        };
        for b in page.iter_mut().take(head) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
    }
    v
}

fn compare(d: &Tmemd, reference: &Path, name: &str) {
    qemu_img_compare(reference.to_str().unwrap(), &d.nbd_uri(name));
}

#[test]
fn kill_9_loses_no_acknowledged_page() {
    if tmem_vm::test_tools(["nbdcopy", "qemu-img"]).is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    // A pool smaller than the data: part spills to the file, the newest stays in memory.
    let args = ["--budget", "12M"];
    let mut d = Tmemd::start(&dir, &args);
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = t.path().join("ref.raw");
    let mut content = data(48 << 20, 5);
    content.resize(64 << 20, 0);
    std::fs::write(&reference, &content).unwrap();
    run_ok("nbdcopy", &[reference.to_str().unwrap(), &d.nbd_uri("s")]);
    let before = export(&d, "s");
    assert!(
        before.backend.pool_pages > 1000 && before.backend.spilled_pages > 1000,
        "{before:?}"
    );

    for round in 0..2 {
        d.kill9();
        d = Tmemd::start(&dir, &args);
        let st = status(&d);
        assert!(st.damaged_exports.is_empty(), "round {round}: {st:?}");
        let e = export(&d, "s");
        assert_eq!(e.backend.poisoned_pages, 0, "round {round}");
        compare(&d, &reference, "s");
        // Rewrite a part (replacing pool and spilled pages) before the next crash.
        let part = data(8 << 20, 100 + round);
        content[(16 << 20)..(24 << 20)].copy_from_slice(&part);
        std::fs::write(&reference, &content).unwrap();
        let p = t.path().join("part.raw");
        std::fs::write(&p, &part).unwrap();
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -s {} {} 8M", p.display(), 16 << 20),
                &d.nbd_uri("s"),
            ],
        );
    }
    d.kill9();
    // A clean stop after a recovery, and a start from the saved state.
    let mut d = Tmemd::start(&dir, &args);
    compare(&d, &reference, "s");
    assert!(d.terminate().success(), "{}", d.log_text());
    let d = Tmemd::start(&dir, &args);
    assert!(status(&d).warnings.is_empty(), "{:?}", status(&d).warnings);
    compare(&d, &reference, "s");
    // Durable memory of older runs is gone once read back.
    let gens = std::fs::read_dir(dir.join("pool")).unwrap().count();
    assert_eq!(gens, 1, "one generation: this run's");
}

/// fio on export `s` at `uri`: 4 KiB random writes over 32 MiB at depth 8, crc32c verify
/// headers in half-compressible blocks, in `dir` (where its verify state file goes).
fn fio_cmd(uri: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("fio");
    c.current_dir(dir)
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=8",
            "--verify=crc32c",
            "--buffer_compress_percentage=50",
            "--refill_buffers",
        ])
        .args(extra)
        .stdin(Stdio::null());
    c
}

/// Runs fio on the export; returns (exit status success, output).
fn fio(d: &Tmemd, dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = fio_cmd(&d.nbd_uri("s"), dir, extra)
        .output()
        .expect("run fio");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn fio_verify_finds_every_acknowledged_write_after_20_kills() {
    if tmem_vm::test_tools(["fio"]).is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let work = t.path().join("fio");
    std::fs::create_dir_all(&work).unwrap();
    // Pool, spill and writeback all in play.
    let args = ["--budget", "10M"];
    let mut d = Tmemd::start(&dir, &args);
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "32M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut x = 0x5eed_u64;
    let mut recovered = 0u64;
    let mut in_flight_losses = 0usize;
    for kill in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(x % 1500);
        let _ = std::fs::remove_file(work.join("local-w-0-verify.state"));
        // The writer runs until the daemon dies under it.
        let writer = {
            let uri_dir = work.clone();
            let uri = d.nbd_uri("s");
            let seed = format!("--randseed={}", x % 100_000);
            std::thread::spawn(move || {
                fio_cmd(
                    &uri,
                    &uri_dir,
                    &[
                        "--verify_state_save=1",
                        "--do_verify=0",
                        "--time_based",
                        "--runtime=60",
                        &seed,
                    ],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
            })
        };
        // Kill while fio is writing: once the pool has taken some of its writes, after a
        // random delay.
        let puts = || -> u64 {
            serde_json::from_str::<tmem_api::Stats>(&d.curl("GET", "/api/v1/stats", None).1)
                .map(|s| s.pool.ops.puts + s.pool.ops.puts_refused)
                .unwrap_or(0)
        };
        let start = puts();
        assert!(
            wait_until(Duration::from_secs(20), || puts() > start + 64),
            "kill {kill}: fio does not write"
        );
        std::thread::sleep(delay);
        d.kill9();
        let _ = writer.join();
        d = Tmemd::start(&dir, &args);
        // Nothing is poisoned: every page has its old or its new content, a write the pool
        // refused included (its old pool copy goes only once the spill copy is recorded).
        let st = status(&d);
        let poisoned: u64 = st.damaged_exports.iter().map(|e| e.poisoned_pages).sum();
        assert_eq!(poisoned, 0, "kill {kill}: {:?}", st.damaged_exports);
        recovered += export(&d, "s").backend.pool_pages;
        // Every write fio saw acknowledged reads back intact (fio skips the ones in flight).
        let seed = format!("--randseed={}", x % 100_000);
        let (ok, text) = fio(
            &d,
            &work,
            &[
                "--verify_state_load=1",
                "--verify_only=1",
                "--continue_on_error=all",
                &seed,
            ],
        );
        // fio counts the writes that failed when the daemon died (at most one per slot of
        // its queue, 8) as done, although they were never acknowledged: those may read as
        // never written (all zeros: "bad magic header 0") or, poisoned (above), fail with
        // EIO. Anything else — other data, a checksum mismatch, more such blocks than
        // writes in flight, an EIO beyond the poisoned pages — fails.
        let bad: Vec<&str> = text.lines().filter(|l| l.starts_with("verify:")).collect();
        let unwritten = bad
            .iter()
            .filter(|l| l.contains("bad magic header 0,"))
            .count();
        let eio = text
            .lines()
            .filter(|l| l.contains("Input/output error") && l.contains("offset="))
            .count();
        assert!(
            unwritten == bad.len() && unwritten + eio <= 8 && eio as u64 <= poisoned,
            "kill {kill} after {delay:?}: verify failed:\n{text}"
        );
        assert!(
            ok || unwritten + eio > 0,
            "kill {kill} after {delay:?}: fio failed:\n{text}"
        );
        in_flight_losses += unwritten + eio;
    }
    eprintln!(
        "20 kills, {recovered} pool pages recovered in all; {in_flight_losses} writes in flight at a kill read as never written or EIO"
    );
    assert!(recovered > 0);
    assert!(d.terminate().success());
}

#[test]
fn upgrade_hands_over_to_a_new_binary_without_losing_a_page() {
    if tmem_vm::test_tools(["nbdcopy", "qemu-img"]).is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let mut d = Tmemd::start(&dir, &["--budget", "12M"]);
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = t.path().join("ref.raw");
    let mut content = data(40 << 20, 9);
    content.resize(64 << 20, 0);
    std::fs::write(&reference, &content).unwrap();
    run_ok("nbdcopy", &[reference.to_str().unwrap(), &d.nbd_uri("s")]);
    let pid = d.pid();
    // The hand-over: same process (PID), the binary replaced, every page recovered.
    let o = d.ctl(&["upgrade"]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());
    assert!(stdout(&o).contains("is up"), "{}", stdout(&o));
    let st = status(&d);
    assert_eq!(st.pid, pid);
    assert!(st.damaged_exports.is_empty(), "{st:?}");
    assert!(st.warnings.is_empty(), "{:?}", st.warnings);
    compare(&d, &reference, "s");
    assert!(
        d.log_text().contains("handing over to a new tmemd"),
        "{}",
        d.log_text()
    );
    // A binary that is not there is refused before anything stops.
    let o = d.ctl(&["upgrade", "--binary", "/nonexistent/tmemd"]);
    assert!(!o.status.success());
    compare(&d, &reference, "s");
    assert!(d.terminate().success(), "{}", d.log_text());
}
