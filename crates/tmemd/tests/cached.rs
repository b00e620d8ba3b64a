//! Cached exports through the real tmemd and tmemctl with qemu-io as the client:
//! read-only unless created `--writable`, an image changed underneath is seen fresh (on a
//! new connection and after a FLUSH), `tmemctl export invalidate`, and the writable flag
//! across restarts (including manifests written before it existed).

mod common;

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use tmem_api::{ErrorBody, ExportInfo, InvalidateReply, Status};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-cached")
        .tempdir()
        .unwrap()
}

fn export(d: &Tmemd, name: &str) -> ExportInfo {
    let (code, body) = d.curl("GET", &format!("/api/v1/exports/{name}"), None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Rewrites the whole image with `byte` in place (same inode, same size) and gives it a
/// distinct mtime (no dependence on timestamp granularity).
fn rewrite(img: &Path, byte: u8, mtime_secs: u64) {
    let len = std::fs::metadata(img).unwrap().len() as usize;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![byte; len], 0).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime_secs))
        .unwrap();
}

/// `qemu-io -r -c CMD... URI`: (success, output).
fn qemu_io_ro(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw", "-r"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let o = run("qemu-io", &args);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    let ok = o.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

/// One qemu-io session (one NBD connection) driven command by command.
struct Session {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Session {
    fn open(uri: &str) -> Session {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut s = Session { child, stdin, out };
        s.until_prompt();
        s
    }

    /// Reads up to and including the next prompt (printed once qemu-io is ready for
    /// another command; it reads stdin unreliably when commands arrive early).
    fn until_prompt(&mut self) -> String {
        let mut out = Vec::new();
        while !out.ends_with(PROMPT) {
            let mut b = [0u8; 1];
            let n = self.out.read(&mut b).unwrap();
            assert!(n > 0, "qemu-io ended: {}", String::from_utf8_lossy(&out));
            out.push(b[0]);
        }
        out.truncate(out.len() - PROMPT.len());
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Runs one command and returns its output.
    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        self.until_prompt()
    }
}

const PROMPT: &[u8] = b"qemu-io> ";

impl Drop for Session {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

#[test]
fn cached_exports_are_read_only_by_default_and_see_the_image_change() {
    if tmem_vm::test_tool("qemu-io").is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    let img = t.path().join("base.raw");
    std::fs::write(&img, vec![0x11u8; 4 << 20]).unwrap();
    let o = d.ctl(&[
        "export",
        "add",
        "base",
        "--kind",
        "cached",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("read-only"), "{}", stdout(&o));
    assert!(!export(&d, "base").writable);
    let uri = d.nbd_uri("base");

    // Reads are served (and fill the shared pool).
    let (ok, text) = qemu_io_ro(&uri, &["read -P 0x11 0 4M"]);
    assert!(ok, "{text}");
    assert!(export(&d, "base").backend.pool_pages >= 1024);

    // A write is refused: qemu-io cannot open the read-only export for writing.
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 0x99 0 4k", &uri]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "write accepted: {text}");
    assert!(text.contains("Permission denied"), "{text}");
    assert!(!text.contains("wrote"), "{text}");
    assert_eq!(read_all(&img), vec![0x11u8; 4 << 20], "image untouched");
    assert_eq!(export(&d, "base").nbd.writes, 0);

    // The image is rewritten underneath: a new connection reads the new bytes, not the
    // pages cached from the old ones.
    rewrite(&img, 0x22, 2_000_000);
    let (ok, text) = qemu_io_ro(&uri, &["read -P 0x22 0 4k", "read -P 0x22 4092k 4k"]);
    assert!(ok, "stale cache served: {text}");
    let (ok, text) = qemu_io_ro(&uri, &["read -P 0x22 0 4M"]);
    assert!(ok, "{text}");
    assert!(
        d.log_text().contains("image changed underneath"),
        "{}",
        d.log_text()
    );

    // Invalidation by hand: everything cached is dropped.
    let held = export(&d, "base").backend.pool_pages;
    assert!(held >= 1024, "{held}");
    let o = d.ctl(&["export", "invalidate", "base"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("{held} cached pages dropped")),
        "{}",
        stdout(&o)
    );
    assert_eq!(export(&d, "base").backend.pool_pages, 0);
    let (code, body) = d.curl("POST", "/api/v1/exports/base/invalidate", None);
    assert_eq!(code, 200, "{body}");
    let r: InvalidateReply = serde_json::from_str(&body).unwrap();
    assert_eq!((r.name.as_str(), r.pages_dropped), ("base", 0));
    let (ok, text) = qemu_io_ro(&uri, &["read -P 0x22 0 64k"]);
    assert!(ok, "{text}");

    // Typed refusals: unknown export 404, swap export 409.
    let (code, body) = d.curl("POST", "/api/v1/exports/nope/invalidate", None);
    assert_eq!(code, 404, "{body}");
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "4M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("writable"), "{}", stdout(&o));
    let (code, body) = d.curl("POST", "/api/v1/exports/s/invalidate", None);
    assert_eq!(code, 409, "{body}");
    let e: ErrorBody = serde_json::from_str(&body).unwrap();
    assert!(
        e.chain.iter().any(|c| c.contains("not a cached export")),
        "{e:?}"
    );
    let o = d.ctl(&["export", "invalidate", "s"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a cached export"), "{}", stderr(&o));
    let (code, body) = d.curl(
        "POST",
        "/api/v1/exports",
        Some(r#"{"name":"s2","kind":"swap","size":4096,"writable":false}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log_text());
}

#[test]
fn writable_export_flush_sees_outside_change_and_flags_survive_restarts() {
    if tmem_vm::test_tool("qemu-io").is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    let img = t.path().join("rw.raw");
    std::fs::write(&img, vec![0x11u8; 1 << 20]).unwrap();
    let base = t.path().join("base.raw");
    std::fs::write(&base, vec![0x44u8; 1 << 20]).unwrap();
    let o = d.ctl(&[
        "export",
        "add",
        "rw",
        "--kind",
        "cached",
        "--image",
        img.to_str().unwrap(),
        "--writable",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("writable"), "{}", stdout(&o));
    assert!(export(&d, "rw").writable);
    let o = d.ctl(&[
        "export",
        "add",
        "ro",
        "--kind",
        "cached",
        "--image",
        base.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // One connection: write, read (cached), change underneath, FLUSH, read fresh.
    let mut s = Session::open(&d.nbd_uri("rw"));
    let out = s.cmd("write -P 0x33 0 8k");
    assert!(out.contains("wrote 8192/8192"), "{out}");
    let out = s.cmd("flush");
    assert!(out.trim().is_empty(), "{out}");
    let out = s.cmd("read -P 0x33 0 8k");
    assert!(!out.contains("failed"), "{out}");
    let out = s.cmd("read -P 0x11 8k 1016k");
    assert!(!out.contains("failed"), "{out}");
    // Its own writes are not changes underneath.
    assert!(
        !d.log_text().contains("image changed underneath"),
        "{}",
        d.log_text()
    );
    rewrite(&img, 0x55, 3_000_000);
    let out = s.cmd("flush");
    assert!(out.trim().is_empty(), "{out}");
    let out = s.cmd("read -P 0x55 0 1M");
    assert!(!out.contains("failed"), "stale cache after FLUSH: {out}");
    drop(s);
    assert!(d.log_text().contains("image changed underneath"));

    // The flags survive a restart.
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log_text());
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    assert!(export(&d, "rw").writable);
    assert!(!export(&d, "ro").writable);
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 0 4k", &d.nbd_uri("ro")],
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    let (ok, text) = qemu_io_ro(&d.nbd_uri("ro"), &["read -P 0x44 0 4k"]);
    assert!(ok, "{text}");
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log_text());

    // A manifest from before the flag: its cached exports were opened read-write and stay
    // so (with a warning); saved again with the flag.
    let manifest = dir.join("state").join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for e in m["exports"].as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("writable");
    }
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(!std::fs::read_to_string(&manifest)
        .unwrap()
        .contains("writable"));
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    assert!(export(&d, "rw").writable);
    assert!(export(&d, "ro").writable);
    let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
    assert!(
        st.warnings
            .iter()
            .any(|w| w.contains("older tmemd") && w.contains("\"rw\"")),
        "{:?}",
        st.warnings
    );
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log_text());
    let m = std::fs::read_to_string(&manifest).unwrap();
    assert!(m.contains("\"writable\": true"), "{m}");
}
