//! Sockets and directories that fit a real host, tried with real unprivileged users
//! (`setpriv`): only the configured group reaches `nbd.sock`, nobody but root `ctl.sock`,
//! and the daemon refuses a runtime directory that is a symlink or someone else's.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

fn tmp() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("tmemd-secure")
        .tempdir()
        .unwrap();
    // Unprivileged users must be able to walk down to the runtime directory.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// Root (to chown and to switch users): fails under `TMEM_REQUIRE_VM=1` without it.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    if !root {
        tmem_vm::missing_prerequisite("root", "the test switches users with setpriv");
    }
    root
}

/// Runs `nbdinfo --list` on the socket as uid:gid with no supplementary groups.
fn nbdinfo_as(uid: u32, gid: u32, sock: &std::path::Path) -> bool {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "nbdinfo",
            "--list",
            &format!("nbd+unix:///?socket={}", sock.display()),
        ])
        .output()
        .expect("setpriv")
        .status
        .success()
}

#[test]
fn only_the_configured_group_reaches_the_nbd_socket() {
    if !is_root() || tmem_vm::test_tools(["setpriv", "nbdinfo", "curl"]).is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let cfg = t.path().join("tmemd.toml");
    // The socket group: nogroup (65534), nobody's primary group.
    std::fs::write(&cfg, "nbd_socket_group = \"nogroup\"\n").unwrap();
    let d = Tmemd::start(&dir, &["--config", cfg.to_str().unwrap()]);
    assert!(d
        .ctl(&["export", "add", "s", "--kind", "swap", "--size", "4M"])
        .status
        .success());
    let nbd = dir.join("nbd.sock");
    let m = std::fs::metadata(&nbd).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 65534));
    let rd = std::fs::metadata(&dir).unwrap();
    assert_eq!((rd.mode() & 0o777, rd.gid()), (0o710, 65534));
    let ctl = std::fs::metadata(dir.join("ctl.sock")).unwrap();
    assert_eq!(ctl.mode() & 0o777, 0o600);
    // A member of the group connects; another unprivileged user does not.
    assert!(
        nbdinfo_as(65534, 65534, &nbd),
        "the socket group is refused"
    );
    assert!(
        !nbdinfo_as(65533, 65533, &nbd),
        "a stranger reached nbd.sock"
    );
    // Nobody but root reaches the control socket.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sf",
            "--unix-socket",
            dir.join("ctl.sock").to_str().unwrap(),
            "http://localhost/api/v1/status",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unprivileged user reached ctl.sock"
    );
}

#[test]
fn foreign_or_symlinked_runtime_dirs_are_refused() {
    if !is_root() {
        return;
    }
    let t = tmp();
    // Someone else created the directory first.
    let theirs = t.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let mut d = Tmemd::spawn(&theirs, &[]);
    assert!(!d.wait_exit().success());
    assert!(
        d.log_text().contains("owned by uid 65534"),
        "{}",
        d.log_text()
    );
    // A symlink to a directory of ours.
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut d = Tmemd::spawn(&link, &[]);
    assert!(!d.wait_exit().success());
    assert!(d.log_text().contains("symbolic link"), "{}", d.log_text());
}
