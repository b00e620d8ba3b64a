//! Each guest reaches only its own pages: tenant exports over NBD TLS with pre-shared keys,
//! tried with real clients (qemu-io with `tls-creds-psk`, nbdinfo with a PSK file) on the
//! daemon's Unix socket and on TCP, across a daemon restart; plain TCP is refused; a Unix
//! peer listed by uid opens its export without TLS and sees nothing else.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// qemu-io as `user` with the key directory `keydir`; `server` is `unix:PATH` or `tcp:PORT`.
fn qemu_io_tls(user: &str, keydir: &Path, server: &str, export: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.arg("--object").arg(format!(
        "tls-creds-psk,id=t0,endpoint=client,dir={},username={user}",
        keydir.display()
    ));
    let srv = match server.split_once(':') {
        Some(("unix", p)) => format!("server.type=unix,server.path={p}"),
        Some(("tcp", port)) => {
            format!("server.type=inet,server.host=127.0.0.1,server.port={port}")
        }
        _ => panic!("bad server {server}"),
    };
    c.arg("--image-opts")
        .arg(format!("driver=nbd,{srv},export={export},tls-creds=t0"));
    for m in cmds {
        c.arg("-c").arg(m);
    }
    c.output().expect("qemu-io")
}

fn nbdinfo_list(user: &str, keydir: &Path, sock: &Path) -> String {
    let uri = format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        sock.display(),
        keydir.join("keys.psk").display()
    );
    run_ok("nbdinfo", &["--list", "--json", &uri])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn tenants_reach_only_their_own_exports() {
    if tmem_vm::test_tools(["qemu-io", "nbdinfo"]).is_none() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("state");
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let args = ["--nbd-tcp", tcp.as_str(), "--budget", "64M"];
    let mut d = Tmemd::start(&dir, &args);
    // alice gets a generated key; bob brings his own (psktool format).
    let o = d.ctl(&[
        "export", "add", "a-swap", "--kind", "swap", "--size", "8M", "--tenant", "alice",
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for want in [
        "tls-creds-psk,id=tmem-tls-alice,endpoint=client",
        "username=alice",
        "export=a-swap,tls-creds=tmem-tls-alice",
        "<qemu:commandline>",
    ] {
        assert!(out.contains(want), "snippet lacks {want:?}:\n{out}");
    }
    let bob_file = t.path().join("bob.psk");
    std::fs::write(&bob_file, "bob:00112233445566778899aabbccddeeff\n").unwrap();
    let o = d.ctl(&[
        "export",
        "add",
        "b-swap",
        "--kind",
        "swap",
        "--size",
        "8M",
        "--tenant",
        "bob",
        "--psk-file",
        bob_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // An open export (no tenant) for comparison.
    assert!(d
        .ctl(&["export", "add", "open", "--kind", "swap", "--size", "4M"])
        .status
        .success());
    let alice: PathBuf = dir.join("tenants/alice");
    let bob: PathBuf = dir.join("tenants/bob");
    assert_eq!(
        std::fs::read_to_string(bob.join("keys.psk")).unwrap(),
        "bob:00112233445566778899aabbccddeeff\n"
    );
    // A different key for an existing tenant is refused.
    let bad = t.path().join("bad.psk");
    std::fs::write(&bad, "bob:ffff\n").unwrap();
    let o = d.ctl(&[
        "export",
        "add",
        "b2",
        "--kind",
        "swap",
        "--size",
        "4M",
        "--tenant",
        "bob",
        "--psk-file",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));

    let sock = dir.join("nbd.sock");
    let unix = format!("unix:{}", sock.display());
    let tcp_srv = format!("tcp:{port}");
    for round in 0..2 {
        for srv in [&unix, &tcp_srv] {
            let o = if round == 0 {
                qemu_io_tls(
                    "alice",
                    &alice,
                    srv,
                    "a-swap",
                    &["write -P 0x5a 0 256k", "read -P 0x5a 0 256k"],
                )
            } else {
                qemu_io_tls("alice", &alice, srv, "a-swap", &["read -P 0x5a 0 256k"])
            };
            assert!(
                o.status.success() && !text(&o).contains("fail"),
                "round {round} {srv}: {}",
                text(&o)
            );
            // bob's key opens bob's export, not alice's; alice's name with bob's key fails.
            let o = qemu_io_tls("bob", &bob, srv, "a-swap", &["read 0 4k"]);
            assert!(!o.status.success(), "bob opened a-swap: {}", text(&o));
            assert!(text(&o).contains("not permitted"), "{}", text(&o));
            let o = qemu_io_tls("alice", &bob, srv, "a-swap", &["read 0 4k"]);
            assert!(!o.status.success(), "wrong key accepted: {}", text(&o));
            let o = qemu_io_tls("bob", &bob, srv, "b-swap", &["read -P 0 0 64k"]);
            assert!(o.status.success(), "{}", text(&o));
            // Tenants do not reach the open export either.
            let o = qemu_io_tls("alice", &alice, srv, "open", &["read 0 4k"]);
            assert!(!o.status.success(), "alice opened 'open': {}", text(&o));
        }
        // LIST shows each tenant only its own exports.
        let l = nbdinfo_list("alice", &alice, &sock);
        assert!(
            l.contains("a-swap") && !l.contains("b-swap") && !l.contains("\"open\""),
            "{l}"
        );
        let l = nbdinfo_list("bob", &bob, &sock);
        assert!(l.contains("b-swap") && !l.contains("a-swap"), "{l}");
        // Without TLS: TCP gets nothing, the Unix socket only the open export.
        let o = run(
            "qemu-io",
            &["-f", "raw", "-c", "read 0 4k", &format!("nbd://{tcp}/open")],
        );
        assert!(!o.status.success(), "plain TCP served: {}", text(&o));
        let o = run(
            "qemu-io",
            &["-f", "raw", "-c", "read 0 4k", &d.nbd_uri("a-swap")],
        );
        assert!(
            !o.status.success(),
            "plain Unix opened a tenant export: {}",
            text(&o)
        );
        assert!(text(&o).to_lowercase().contains("tls"), "{}", text(&o));
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "read 0 4k", &d.nbd_uri("open")],
        );
        let l = run_ok("nbdinfo", &["--list", &d.nbd_uri("")]);
        assert!(l.contains("open") && !l.contains("a-swap"), "{l}");
        if round == 0 {
            // Tenancy and keys survive a restart (the runtime key directories are rebuilt).
            d.terminate();
            std::fs::remove_dir_all(dir.join("tenants")).unwrap();
            d = Tmemd::start(&dir, &args);
        }
    }
    let list = d.ctl(&["exports", "--json"]);
    assert!(
        stdout(&list).contains("\"tenant\": \"alice\""),
        "{}",
        stdout(&list)
    );
}

/// Root (to switch users with setpriv): fails under `TMEM_REQUIRE_VM=1` without it.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    if !root {
        tmem_vm::missing_prerequisite("root", "the test switches users with setpriv");
    }
    root
}

#[test]
fn a_unix_peer_listed_by_uid_opens_its_export_without_tls() {
    if !is_root() || tmem_vm::test_tools(["setpriv", "nbdinfo"]).is_none() {
        return;
    }
    let t = tempfile::Builder::new()
        .prefix("tmemd-tenancy")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        t.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // nogroup (65534) may connect to nbd.sock; exports decide who opens what.
    let d = Tmemd::start_config(t.path(), "nbd_socket_group = \"nogroup\"\n");
    for args in [
        &[
            "export",
            "add",
            "mine",
            "--kind",
            "swap",
            "--size",
            "4M",
            "--allow-uid",
            "65534",
        ][..],
        &[
            "export", "add", "theirs", "--kind", "swap", "--size", "4M", "--tenant", "t2",
        ][..],
    ] {
        let o = d.ctl(args);
        assert!(o.status.success(), "{}", text(&o));
    }
    let as_user = |uid: u32, uri: &str, list: bool| {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            "--regid=65534",
            "--clear-groups",
            "nbdinfo",
        ]);
        if list {
            c.arg("--list");
        }
        c.arg(uri).output().expect("setpriv")
    };
    let sock = t.path().join("state").join("nbd.sock");
    let o = as_user(
        65534,
        &format!("nbd+unix:///?socket={}", sock.display()),
        true,
    );
    let l = text(&o);
    assert!(
        o.status.success() && l.contains("mine") && !l.contains("theirs"),
        "{l}"
    );
    let o = as_user(
        65534,
        &format!("nbd+unix:///mine?socket={}", sock.display()),
        false,
    );
    assert!(o.status.success(), "{}", text(&o));
    // Another uid in the socket's group connects but opens nothing.
    let o = as_user(
        65533,
        &format!("nbd+unix:///mine?socket={}", sock.display()),
        false,
    );
    assert!(
        !o.status.success(),
        "uid 65533 opened uid 65534's export: {}",
        text(&o)
    );
}
