//! Limits against hostile or broken NBD clients, with the real daemon, real sockets and a
//! real client: stalled handshakes cannot lock a client out, and clients sending maximum-size
//! writes cannot grow the daemon beyond its stated memory bound.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-limits")
        .tempdir()
        .unwrap()
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `n` (up to the hard limit).
fn raise_nofile(n: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_cur < n {
            rl.rlim_cur = n.min(rl.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
        }
    }
    assert!(
        rl.rlim_cur >= n,
        "RLIMIT_NOFILE hard limit {} is below {n}",
        rl.rlim_max
    );
}

/// `VmRSS` or `VmHWM` (peak) of a process, bytes.
fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Connects to the NBD socket and reads the 18-byte greeting (best effort: the server may
/// already have closed an older stalled connection, never this newest one).
fn stalled_client(sock: &Path, flags: bool) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect nbd.sock");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    let _ = s.read_exact(&mut g);
    if flags {
        // Half of the client flags, then nothing.
        let _ = s.write_all(&[0, 0]);
    }
    s
}

#[test]
fn stalled_handshakes_and_a_trickling_client_do_not_lock_out_qemu_io() {
    let Some(qemu_io) = tmem_vm::test_tool("qemu-io") else {
        return;
    };
    raise_nofile(4096);
    let t = tmp();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--budget", "64M"]);
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sock = d.run.join("nbd.sock");

    // One client sending one byte per second, for ever (reconnecting when dropped).
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (stop, sock) = (stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut s = stalled_client(&sock, false);
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(&[0]).is_err() {
                    s = stalled_client(&sock, false);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // 1 100 clients that read the greeting and stall, half after a few bytes.
    let stalled: Vec<UnixStream> = (0..1100)
        .map(|i| stalled_client(&sock, i % 2 == 1))
        .collect();

    // A real client connects and reads within 5 s.
    let mut child = std::process::Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "read 0 4k", &d.nbd_uri("s")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    stop.store(true, Ordering::Relaxed);
    let log = d.log_text();
    assert!(
        status.is_some(),
        "qemu-io did not finish within 5 s\n{}",
        log
    );
    assert!(
        out.status.success(),
        "qemu-io failed: {}\n{}\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 4096/4096 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The daemon named the flooding peer (uid) once, not once per closed connection.
    let warned = log
        .matches("too many connections in the handshake from one peer")
        .count();
    assert_eq!(warned, 1, "{log}");
    drop(stalled);
    trickler.join().unwrap();
}

/// A minimal NBD client: fixed newstyle, `OPT_GO` to `export`, simple replies.
fn open_export(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect nbd.sock");
    // Deadlock guard only.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec(); // IHAVEOPT
    opt.extend_from_slice(&7u32.to_be_bytes()); // OPT_GO
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        match typ {
            1 => return s, // REP_ACK: transmission
            3 => {}        // REP_INFO
            _ => panic!("OPT_GO failed: reply type {typ:#x}"),
        }
    }
}

/// The largest NBD request payload the server accepts.
const MAX_PAYLOAD: u32 = tmem_nbd::proto::MAX_PAYLOAD;

#[test]
fn maximum_size_writes_from_many_clients_stay_within_the_buffer_limit() {
    const CLIENTS: u64 = 16;
    const WRITES: u64 = 4;
    const POOL: u64 = 64 << 20;
    const BUFFER_LIMIT: u64 = 64 << 20;
    // Baseline (binary, allocator, threads), per-connection fixed buffers (16 × ~2 MiB),
    // the swap export's own bookkeeping.
    const SLACK: u64 = 128 << 20;
    let t = tmp();
    let d = Tmemd::start_config(
        t.path(),
        &format!("budget = {POOL}\nnbd_buffer_limit = {BUFFER_LIMIT}\n"),
    );
    let size = CLIENTS * u64::from(MAX_PAYLOAD);
    let o = d.ctl(&[
        "export",
        "add",
        "big",
        "--kind",
        "swap",
        "--size",
        &size.to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sock: PathBuf = d.run.join("nbd.sock");
    let pid = d.pid();

    // Sample the daemon's resident size while the clients run.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(Ordering::Relaxed) {
                max = max.max(proc_status_kb(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(10));
            }
            max
        })
    };
    // Incompressible data, so that the pool fills and pages go to the spill file.
    let data: Arc<Vec<u8>> = Arc::new(pattern(MAX_PAYLOAD as usize, 11));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (sock, data) = (sock.clone(), data.clone());
            std::thread::spawn(move || {
                let mut s = open_export(&sock, "big");
                // Every write sent before any reply is read.
                for w in 0..WRITES {
                    let mut h = Vec::with_capacity(28);
                    h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                    h.extend_from_slice(&0u16.to_be_bytes());
                    h.extend_from_slice(&1u16.to_be_bytes()); // CMD_WRITE
                    h.extend_from_slice(&w.to_be_bytes());
                    h.extend_from_slice(&(i * u64::from(MAX_PAYLOAD)).to_be_bytes());
                    h.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    s.write_all(&h).unwrap();
                    s.write_all(&data).unwrap();
                }
                for _ in 0..WRITES {
                    let mut r = [0u8; 16];
                    s.read_exact(&mut r).expect("write reply");
                    let err = u32::from_be_bytes(r[4..8].try_into().unwrap());
                    assert_eq!(err, 0, "write failed");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let sampled = sampler.join().unwrap();
    let peak = proc_status_kb(pid, "VmHWM:");
    let bound = POOL + BUFFER_LIMIT + SLACK;
    eprintln!(
        "daemon VmRSS peak sampled {} MiB, VmHWM {} MiB, bound {} MiB",
        sampled >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(
        peak.max(sampled) <= bound,
        "daemon grew to {} MiB (bound {} MiB)\n{}",
        peak.max(sampled) >> 20,
        bound >> 20,
        d.log_text()
    );
    // Every write arrived.
    let o = d.ctl(&["exports", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Vec<tmem_api::ExportInfo> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0].nbd.writes, CLIENTS * WRITES);
}

/// A 28-byte NBD WRITE request header.
fn write_header(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&1u16.to_be_bytes()); // CMD_WRITE
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[test]
fn a_client_stalling_mid_payload_does_not_hold_the_buffer_budget_for_ever() {
    // Room for exactly one maximum-size request: while the staller holds it, nobody else's
    // large write can start.
    let limit = tmem_nbd::MIN_BUFFER_LIMIT;
    let t = tmp();
    let d = Tmemd::start_config(
        t.path(),
        &format!("budget = \"256M\"\nnbd_buffer_limit = {limit}\nnbd_stall_timeout_secs = 2\n"),
    );
    let size = 2 * u64::from(MAX_PAYLOAD);
    let o = d.ctl(&[
        "export",
        "add",
        "s",
        "--kind",
        "swap",
        "--size",
        &size.to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sock: PathBuf = d.run.join("nbd.sock");

    // The staller announces a maximum-size write, sends 1 MiB of it and stops.
    let mut staller = open_export(&sock, "s");
    staller.write_all(&write_header(1, 0, MAX_PAYLOAD)).unwrap();
    staller.write_all(&vec![7u8; 1 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A well-behaved client's maximum-size write: it must complete (a reply with error 0)
    // once the staller's reservation is reclaimed. The read timeout is only a hang guard.
    let mut good = open_export(&sock, "s");
    good.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    good.write_all(&write_header(2, u64::from(MAX_PAYLOAD), MAX_PAYLOAD))
        .unwrap();
    good.write_all(&pattern(MAX_PAYLOAD as usize, 3)).unwrap();
    let mut reply = [0u8; 16];
    good.read_exact(&mut reply)
        .expect("the good client's write never completed: the staller kept the buffer budget");
    assert_eq!(
        u32::from_be_bytes(reply[0..4].try_into().unwrap()),
        0x6744_6698
    );
    assert_eq!(
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        0,
        "write error"
    );
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 2);
    // The staller was disconnected (EOF or reset), not answered.
    staller
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 16];
    match staller.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the staller got {n} bytes of a reply"),
    }
}
