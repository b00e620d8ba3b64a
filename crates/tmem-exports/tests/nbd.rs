//! End to end through the real NBD server (in-process, tempdir Unix socket) with
//! `qemu-io` and `qemu-img` as clients, checked with `qemu-img compare` against a
//! reference file that got the same writes.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use common::*;
use rand::Rng;
use tmem_nbd::{BlockBackend, ListenAddr, ServerConfig, ServerHandle, StaticExports};

struct Server {
    handle: Option<ServerHandle>,
    sock: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str, b: Arc<dyn BlockBackend>) -> Self {
        let sock = dir.join("nbd.sock");
        let t = StaticExports::new().with_export(name, "test export", b);
        let handle = ServerHandle::start(
            Arc::new(t),
            ServerConfig::default(),
            &[ListenAddr::Unix(sock.clone())],
        )
        .expect("start server");
        Server {
            handle: Some(handle),
            sock,
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

fn run(mut c: Command) -> Output {
    let out = c
        .output()
        .expect("spawn qemu tool (installed by scripts/setup)");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{c:?} failed: {}\nstdout: {so}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!so.contains("verification failed"), "{c:?}: {so}");
    assert!(!so.to_lowercase().contains("error"), "{c:?}: {so}");
    out
}

/// Runs the same qemu-io commands on the NBD export and on the reference file.
fn qemu_io_both(uri: &str, reference: &Path, cmds: &[&str]) {
    for target in [uri, reference.to_str().expect("utf-8 path")] {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(target);
        run(c);
    }
}

fn compare(reference: &Path, uri: &str) {
    let mut c = Command::new("qemu-img");
    c.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(reference)
        .arg(uri);
    run(c);
}

fn random_file(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    let mut r = rng(seed);
    // Random 1 MiB chunks, zero chunks and pattern chunks.
    for chunk in data.chunks_mut(1 << 20) {
        match r.gen_range(0..3) {
            0 => {}
            1 => chunk.fill(r.gen()),
            _ => r.fill(chunk),
        }
    }
    std::fs::write(path, &data).unwrap();
}

const IO_CMDS: &[&str] = &[
    "write -P 0xab 0 64k",
    "read -P 0xab 0 64k",
    "write -P 0x5c 1000 513",
    "read -P 0x5c 1000 513",
    "write -P 0x11 65535 4098",
    "write -z 200k 12k",
    "write -z 300001 9000",
    "discard 1m 64k",
    "write -P 0x77 3m 1m",
    "read -P 0x77 3m 1m",
    "flush",
];

#[test]
fn swap_export_through_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(2 << 20, &[1]);
    let size = 24usize << 20;
    let s = swap(&e, dir.path(), "nbdswap", size as u64);
    let srv = Server::start(dir.path(), "swap", s.clone());
    let uri = srv.uri("swap");
    let reference = dir.path().join("ref.raw");
    random_file(&reference, size, 11);
    // Copy the reference onto the export (far more than the engine's 2 MiB: spills).
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&reference)
        .arg(&uri);
    run(c);
    compare(&reference, &uri);
    qemu_io_both(&uri, &reference, IO_CMDS);
    compare(&reference, &uri);
    let st = s.stats();
    assert!(st.pages_spilled > 0 && st.spill_file_bytes > 0, "{st:?}");
    drop(srv);
    s.destroy().unwrap();
}

#[test]
fn cached_export_through_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(64 << 20, &[1]);
    let size = (16usize << 20) + 512;
    let image = dir.path().join("disk.img");
    random_file(&image, size, 12);
    let reference = dir.path().join("ref.raw");
    std::fs::copy(&image, &reference).unwrap();
    let x = cached(&e, &image, "disk", 1);
    let srv = Server::start(dir.path(), "disk", x.clone());
    let uri = srv.uri("disk");
    compare(&reference, &uri);
    let first = x.stats();
    assert!(first.sectors_read >= (size as u64) / 512, "{first:?}");
    // Everything is cached now: a second full compare reads nothing from the image.
    compare(&reference, &uri);
    assert_eq!(
        x.stats().sectors_read,
        first.sectors_read,
        "{:?}",
        x.stats()
    );
    qemu_io_both(&uri, &reference, IO_CMDS);
    compare(&reference, &uri);
    drop(srv);
    // The image itself got the writes.
    let mut c = Command::new("qemu-img");
    c.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&reference)
        .arg(&image);
    run(c);
    assert!(x.stats().sectors_written > 0);
    x.close().unwrap();
}

#[test]
fn read_only_cached_export_refuses_qemu_io_writes() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(16 << 20, &[1]);
    let image = dir.path().join("base.img");
    std::fs::write(&image, vec![0x3cu8; 1 << 20]).unwrap();
    let mut cfg = cached_cfg(&image, "base", 1);
    cfg.writable = false;
    let x = tmem_exports::CachedExport::open(e, cfg).unwrap();
    let srv = Server::start(dir.path(), "base", x.clone());
    let uri = srv.uri("base");
    // Reads are served.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-r", "-c", "read -P 0x3c 0 64k"])
        .arg(&uri);
    run(c);
    // A write is refused: qemu-io either fails to open the read-only export for writing
    // or reports the EPERM of the write.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 4k"])
        .arg(&uri)
        .output()
        .expect("spawn qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "qemu-io write on a read-only export: {}: {text}",
        out.status
    );
    let refused = !out.status.success()
        || text.contains("Operation not permitted")
        || text.contains("read-only")
        || text.contains("Read-only");
    assert!(refused, "write was not refused: {text}");
    assert!(!text.contains("wrote 4096/4096"), "{text}");
    drop(srv);
    assert_eq!(std::fs::read(&image).unwrap(), vec![0x3cu8; 1 << 20]);
    assert_eq!(x.stats().writes, 0);
}
