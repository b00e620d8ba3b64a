//! The daemon's death and a full disk, with the real binaries and real clients (nbdcopy,
//! qemu-io, qemu-img): after `kill -9` nothing unproven is served (reads fail with EIO,
//! never zeros), the spill file is kept and its verified pages served; a spill filesystem
//! that fills up gives clean NBD errors and loses nothing already stored.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tmem_api::{ExportInfo, Status};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-crash")
        .tempdir()
        .unwrap()
}

fn status(d: &Tmemd) -> Status {
    serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap()
}

fn export(d: &Tmemd, name: &str) -> ExportInfo {
    let (code, body) = d.curl("GET", &format!("/api/v1/exports/{name}"), None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `(length, allocated bytes)` of a file.
fn file_size(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.len(), m.blocks() * 512)
}

/// Reads `[off, off+len)` of an export with `qemu-img convert` (a raw view with offset and
/// size over the NBD socket): the bytes, or the tool's error text.
fn read_range(
    d: &Tmemd,
    name: &str,
    off: u64,
    len: u64,
    scratch: &Path,
) -> Result<Vec<u8>, String> {
    let opts = format!(
        "driver=raw,offset={off},size={len},file.driver=nbd,file.server.type=unix,file.server.path={},file.export={name}",
        d.run.join("nbd.sock").display()
    );
    let out_file = scratch.join(format!("chunk-{off}"));
    let out = run(
        "qemu-img",
        &[
            "convert",
            "--image-opts",
            &opts,
            "-O",
            "raw",
            out_file.to_str().unwrap(),
        ],
    );
    let r = if out.status.success() {
        Ok(read_all(&out_file))
    } else {
        Err(stdout(&out) + &stderr(&out))
    };
    let _ = std::fs::remove_file(&out_file);
    r
}

/// Writes `data` at `off` with `qemu-io write -s FILE`: `Ok` or the tool's output.
fn write_range(d: &Tmemd, name: &str, off: u64, data: &[u8], scratch: &Path) -> Result<(), String> {
    let src = scratch.join(format!("src-{off}"));
    std::fs::write(&src, data).unwrap();
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} {off} {}", src.display(), data.len()),
            &d.nbd_uri(name),
        ],
    );
    let _ = std::fs::remove_file(&src);
    let text = stdout(&out) + &stderr(&out);
    if out.status.success() && !text.contains("failed") {
        Ok(())
    } else {
        Err(text)
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const MIB: u64 = 1 << 20;

#[test]
fn kill_9_never_serves_zeros_and_keeps_the_spill_file() {
    let t = tmp();
    let dir = t.path().join("state");
    // A pool much smaller than the data, no compression: most of it spills, the newest
    // pages stay in memory. Without durable pool memory (its safety net is tested here;
    // with it, see kill_9_loses_no_acknowledged_page), the pages in memory die with it.
    let cfg = t.path().join("tmemd.toml");
    std::fs::write(&cfg, "durable_pool = false\n").unwrap();
    let args = [
        "--budget",
        "8M",
        "--codec",
        "none",
        "--config",
        cfg.to_str().unwrap(),
    ];
    let mut d = Tmemd::start(&dir, &args);
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = t.path().join("ref.raw");
    let data = random_bytes(32 << 20, 99);
    std::fs::write(&reference, &data).unwrap();
    run_ok("nbdcopy", &[reference.to_str().unwrap(), &d.nbd_uri("s")]);
    let before = export(&d, "s");
    assert!(
        before.backend.spilled_pages > 0 && before.backend.pool_pages > 0,
        "{before:?}"
    );
    let spill = dir.join("spill/s.spill");
    let spill_before = file_size(&spill);
    assert!(
        spill_before.1 >= before.backend.spilled_pages * 4096,
        "{spill_before:?}"
    );

    // kill -9 by PID: no shutdown, no save.
    d.kill9();
    let d = Tmemd::start(&dir, &args);
    let st = status(&d);
    assert!(
        st.warnings
            .iter()
            .any(|w| w.contains("did not shut down cleanly")),
        "{:?}",
        st.warnings
    );
    assert!(
        st.warnings
            .iter()
            .any(|w| w.contains("Swap export \"s\"") && w.contains("poisoned")),
        "{:?}",
        st.warnings
    );
    // Exactly the pages that were in memory are poisoned; the spill file is untouched.
    assert_eq!(
        st.damaged_exports,
        vec![tmem_api::DamagedExport {
            name: "s".into(),
            poisoned_pages: before.backend.pool_pages
        }]
    );
    assert_eq!(file_size(&spill), spill_before, "spill file changed");
    let after = export(&d, "s");
    assert_eq!(after.backend.spilled_pages, before.backend.spilled_pages);
    assert_eq!(after.backend.poisoned_pages, before.backend.pool_pages);
    let o = d.ctl(&["status"]);
    assert!(
        stdout(&o).contains(&format!(
            "poisoned: export s has {} pages",
            before.backend.pool_pages
        )),
        "{}",
        stdout(&o)
    );
    let o = d.ctl(&["stats"]);
    assert!(stdout(&o).contains("POISONED"), "{}", stdout(&o));
    let (_, metrics) = d.curl("GET", "/metrics", None);
    assert!(
        metrics.contains(&format!(
            "tmem_swap_poisoned_pages{{export=\"s\"}} {}\n",
            before.backend.pool_pages
        )),
        "{metrics}"
    );

    // A whole copy fails with an I/O error instead of returning zeros.
    let copy = t.path().join("copy.raw");
    let out = run("nbdcopy", &[&d.nbd_uri("s"), copy.to_str().unwrap()]);
    assert!(!out.status.success(), "nbdcopy read a poisoned export");
    assert!(
        stderr(&out).contains("Input/output error"),
        "{}",
        stderr(&out)
    );
    // Chunk by chunk: every MiB is either exactly what was written (served from the
    // verified spill file) or an I/O error; never zeros, never other data.
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for c in 0..32u64 {
        match read_range(&d, "s", c * MIB, MIB, t.path()) {
            Ok(got) => {
                assert!(
                    got[..] == data[(c * MIB) as usize..((c + 1) * MIB) as usize],
                    "MiB {c}: wrong data after the crash"
                );
                good.push(c);
            }
            Err(e) => {
                assert!(e.contains("Input/output error"), "MiB {c}: {e}");
                bad.push(c);
            }
        }
    }
    eprintln!("intact MiB {good:?}, failing MiB {bad:?}");
    assert!(!good.is_empty() && !bad.is_empty(), "{good:?} {bad:?}");
    // Never-written space still reads as zeros.
    assert_eq!(
        read_range(&d, "s", 40 * MIB, MIB, t.path()).unwrap(),
        vec![0u8; MIB as usize]
    );

    // Writing a failing range makes it readable again; so does a trim.
    let (w, z) = (bad[bad.len() - 1], bad[bad.len() - 2]);
    let fresh = random_bytes(MIB as usize, 7);
    write_range(&d, "s", w * MIB, &fresh, t.path()).unwrap();
    assert_eq!(read_range(&d, "s", w * MIB, MIB, t.path()).unwrap(), fresh);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("discard {} 1M", z * MIB),
            &d.nbd_uri("s"),
        ],
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("read -P 0 {} 1M", z * MIB),
            &d.nbd_uri("s"),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // (nbdcopy writes in parallel, so a MiB may mix spilled and in-memory pages.)
    let poisoned = export(&d, "s").backend.poisoned_pages;
    assert!(poisoned + 2 <= before.backend.pool_pages, "{poisoned}");

    // A clean stop and restart keeps both the recovered data and the poison.
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log_text());
    let d = Tmemd::start(&dir, &args);
    let st = status(&d);
    assert!(
        !st.warnings
            .iter()
            .any(|w| w.contains("did not shut down cleanly")),
        "{:?}",
        st.warnings
    );
    assert_eq!(st.damaged_exports[0].poisoned_pages, poisoned);
    for &c in &good {
        let got = read_range(&d, "s", c * MIB, MIB, t.path()).unwrap();
        assert!(
            got[..] == data[(c * MIB) as usize..((c + 1) * MIB) as usize],
            "MiB {c}"
        );
    }
    assert_eq!(read_range(&d, "s", w * MIB, MIB, t.path()).unwrap(), fresh);
    assert!(read_range(&d, "s", bad[0] * MIB, MIB, t.path()).is_err());
}

/// A private tmpfs for the state directory: tmemd runs in its own mount namespace
/// (`unshare -m`) with `STATE` mounted as a small tmpfs, which goes away with it. The test
/// reaches the files through `/proc/PID/root`.
fn start_on_small_tmpfs(run: &Path, state: &Path, size: &str, extra: &[&str]) -> Option<Tmemd> {
    let probe = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        tmem_vm::missing_prerequisite(
            "a private mount namespace (unshare -m)",
            "needs root (CAP_SYS_ADMIN) and util-linux",
        );
        return None;
    }
    let script = format!("mount -t tmpfs -o size={size},mode=0700 tmem-test \"$0\" && exec \"$@\"");
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script.as_str(),
        state.to_str().unwrap(),
    ];
    Some(Tmemd::start_with(
        state,
        extra,
        Launch {
            runtime: Some(run),
            wrapper: &wrapper,
            ..Default::default()
        },
    ))
}

/// `path` as the daemon sees it (inside its mount namespace).
fn inside(d: &Tmemd, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", d.pid())).join(path.strip_prefix("/").unwrap())
}

fn available(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: an all-zero statvfs is a valid value; `c` is a valid C string and `st` a
    // writable statvfs for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}", p.display());
    st.f_bavail * st.f_frsize
}

/// Fills the filesystem of `dir` until `leave` bytes are available; returns the file.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let f = dir.join("filler");
    let have = available(dir);
    let n = have.saturating_sub(leave);
    let mut file = std::fs::File::create(&f).unwrap();
    let chunk = vec![0x5au8; 1 << 16];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        match std::io::Write::write(&mut file, &chunk[..k]) {
            Ok(w) => left -= w as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", f.display()),
        }
    }
    f
}

/// Spill filesystem full, once through the reserve check (`--spill-reserve`), once for real
/// (`ENOSPC` from the write, reserve 0): the writes that need the spill file fail with an NBD
/// error, the error counter and the log say so, and every page already stored reads back.
#[test]
fn full_spill_filesystem_gives_clean_errors_and_loses_nothing() {
    let t = tmp();
    let run = t.path().join("run");
    for reserve in ["2M", "0"] {
        let state = t.path().join(format!("state-{reserve}"));
        let extra = [
            "--budget",
            "4M",
            "--codec",
            "none",
            "--spill-reserve",
            reserve,
        ];
        let Some(mut d) = start_on_small_tmpfs(&run, &state, "24m", &extra) else {
            return;
        };
        let inner = inside(&d, &state);
        assert!(available(&inner) <= 24 << 20, "not on the small tmpfs");
        if reserve != "0" {
            // Too big for the filesystem with the reserve: refused with a clear error.
            let o = d.ctl(&["export", "add", "big", "--kind", "swap", "--size", "32M"]);
            assert!(!o.status.success());
            assert!(
                stderr(&o).contains("Not enough free space for spill file"),
                "{}",
                stderr(&o)
            );
            assert!(!inner.join("spill/big.spill").exists());
        }
        let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "12M"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let first = random_bytes(8 << 20, 3);
        write_range(&d, "s", 0, &first, t.path()).unwrap();
        assert!(export(&d, "s").backend.spilled_pages > 0);

        // The filesystem fills up (someone else's file): nearly nothing left.
        let filler = fill(&inner, if reserve == "0" { 0 } else { 1 << 20 });
        let second = random_bytes(4 << 20, 4);
        let err = write_range(&d, "s", 8 * MIB, &second, t.path()).unwrap_err();
        assert!(err.contains("No space left on device"), "{err}");
        let e = export(&d, "s");
        assert!(e.backend.spill_errors > 0, "{e:?}");
        assert!(e.nbd.errors > 0, "{e:?}");
        assert_eq!(e.backend.poisoned_pages, 0, "{e:?}\n{}", d.log_text());
        let (_, metrics) = d.curl("GET", "/metrics", None);
        assert!(
            metrics.lines().any(
                |l| l.starts_with("tmem_swap_spill_errors_total{export=\"s\"}")
                    && !l.ends_with(" 0")
            ),
            "{metrics}"
        );
        assert!(
            d.log_text().contains("spill write failed"),
            "{}",
            d.log_text()
        );
        // Everything stored before is intact.
        assert_eq!(read_range(&d, "s", 0, 8 * MIB, t.path()).unwrap(), first);

        // Room again: the write goes through.
        std::fs::remove_file(&filler).unwrap();
        write_range(&d, "s", 8 * MIB, &second, t.path()).unwrap();
        assert_eq!(
            read_range(&d, "s", 8 * MIB, 4 * MIB, t.path()).unwrap(),
            second
        );
        assert_eq!(read_range(&d, "s", 0, 8 * MIB, t.path()).unwrap(), first);
        assert!(d.terminate().success(), "{}", d.log_text());
    }
}
