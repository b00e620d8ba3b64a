//! NBD over TLS with pre-shared keys, against real clients: QEMU's `qemu-io` with a
//! `tls-creds-psk` object and libnbd's `nbdinfo` with a PSK file, on a Unix socket and on TCP.
//!
//! Two tenants, alice and bob, each own one export. Each must open its own export, be refused
//! the other's, see only its own in `NBD_OPT_LIST`, and a client without TLS on TCP gets nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use tmem_nbd::tls::{encode_hex, generate_key, PskFile};
use tmem_nbd::{
    BlockBackend, ExportInfo, ExportTable, ListenAddr, MemBackend, Peer, ServerConfig,
    ServerHandle, StaticExports, TlsServer,
};

const SIZE: u64 = 16 << 20;

/// Exports `a-disk` (alice's) and `b-disk` (bob's); `open` is served to Unix peers without TLS.
struct Tenants(StaticExports);

fn owner(name: &str) -> Option<&'static str> {
    match name {
        "a-disk" => Some("alice"),
        "b-disk" => Some("bob"),
        _ => None,
    }
}

impl ExportTable for Tenants {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        self.0.lookup(name)
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0.list()
    }
    fn permits(&self, name: &str, peer: &Peer) -> bool {
        match owner(name) {
            Some(o) => peer.tls_identity.as_deref() == Some(o),
            None => name == "open" && peer.tls_identity.is_none() && !peer.is_tcp(),
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    handle: ServerHandle,
    sock: std::path::PathBuf,
    port: u16,
    /// Client key directories (QEMU's `dir=`: a `keys.psk` with one line each).
    alice_dir: std::path::PathBuf,
    bob_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server_keys = String::new();
    let mut client_dir = |who: &str| {
        let line = format!("{who}:{}\n", encode_hex(&generate_key(32).expect("key")));
        server_keys.push_str(&line);
        let d = dir.path().join(who);
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("keys.psk"), line).expect("write key");
        d
    };
    let alice_dir = client_dir("alice");
    let bob_dir = client_dir("bob");
    let server_file = dir.path().join("server.psk");
    std::fs::write(&server_file, server_keys).expect("write keys");
    let tls = TlsServer::new(Arc::new(PskFile::new(&server_file))).expect("tls");
    let mut t = StaticExports::new();
    for n in ["a-disk", "b-disk", "open"] {
        t = t.with_export(
            n,
            format!("export {n}"),
            Arc::new(MemBackend::new(SIZE)) as Arc<dyn BlockBackend>,
        );
    }
    let sock = dir.path().join("nbd.sock");
    let handle = ServerHandle::start(
        Arc::new(Tenants(t)),
        ServerConfig {
            tls: Some(tls),
            ..ServerConfig::default()
        },
        &[
            ListenAddr::Unix(sock.clone()),
            ListenAddr::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        ],
    )
    .expect("start");
    let port = handle.tcp_addrs()[0].port();
    Setup {
        _dir: dir,
        handle,
        sock,
        port,
        alice_dir,
        bob_dir,
    }
}

fn output(mut c: Command) -> Output {
    c.output().expect("spawn client")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// qemu-io over TLS as `user` (key in `keydir`) on `server` (`unix:PATH` or `tcp:PORT`).
fn qemu_io_tls(user: &str, keydir: &Path, server: &str, export: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new(tmem_vm::test_tool("qemu-io").expect("qemu-io"));
    c.arg("--object").arg(format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}",
        keydir.display()
    ));
    let srv = match server.split_once(':') {
        Some(("unix", p)) => format!("server.type=unix,server.path={p}"),
        Some(("tcp", port)) => format!("server.type=inet,server.host=127.0.0.1,server.port={port}"),
        _ => panic!("bad server {server}"),
    };
    c.arg("--image-opts")
        .arg(format!("driver=nbd,{srv},export={export},tls-creds=tls0"));
    for m in cmds {
        c.arg("-c").arg(m);
    }
    output(c)
}

#[test]
fn qemu_io_with_tenant_key_opens_own_export_only() {
    if tmem_vm::test_tool("qemu-io").is_none() {
        return;
    }
    let s = setup();
    let unix = format!("unix:{}", s.sock.display());
    let tcp = format!("tcp:{}", s.port);
    for server in [&unix, &tcp] {
        let o = qemu_io_tls(
            "alice",
            &s.alice_dir,
            server,
            "a-disk",
            &["write -P 0x41 0 64k", "read -P 0x41 0 64k"],
        );
        let t = text(&o);
        assert!(o.status.success() && !t.contains("fail"), "{server}: {t}");
        // Bob cannot read alice's data, with his own key...
        let o = qemu_io_tls("bob", &s.bob_dir, server, "a-disk", &["read 0 4k"]);
        assert!(
            !o.status.success(),
            "{server}: bob opened a-disk: {}",
            text(&o)
        );
        assert!(text(&o).contains("not permitted"), "{}", text(&o));
        // ...nor by claiming to be alice without her key.
        let o = qemu_io_tls("alice", &s.bob_dir, server, "a-disk", &["read 0 4k"]);
        assert!(
            !o.status.success(),
            "{server}: wrong key accepted: {}",
            text(&o)
        );
        // And bob's own export works for bob.
        let o = qemu_io_tls("bob", &s.bob_dir, server, "b-disk", &["read -P 0 0 64k"]);
        assert!(o.status.success(), "{server}: {}", text(&o));
    }
    s.handle.shutdown();
}

#[test]
fn without_tls_tcp_is_refused_and_unix_reaches_only_open_exports() {
    let Some(qio) = tmem_vm::test_tool("qemu-io") else {
        return;
    };
    let s = setup();
    // Plain TCP: even the export served without TLS on the Unix socket is refused.
    for e in ["a-disk", "open"] {
        let o = output({
            let mut c = Command::new(&qio);
            c.args(["-f", "raw", "-c", "read 0 4k"])
                .arg(format!("nbd://127.0.0.1:{}/{e}", s.port));
            c
        });
        assert!(!o.status.success(), "plain TCP opened {e}: {}", text(&o));
        assert!(text(&o).to_lowercase().contains("tls"), "{}", text(&o));
    }
    // Plain Unix: the tenant exports need TLS, the open one works.
    let plain_unix = |e: &str| {
        let mut c = Command::new(&qio);
        c.args(["-f", "raw", "-c", "read 0 4k"])
            .arg(format!("nbd+unix:///{e}?socket={}", s.sock.display()));
        output(c)
    };
    let o = plain_unix("a-disk");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).to_lowercase().contains("tls"), "{}", text(&o));
    let o = plain_unix("open");
    assert!(o.status.success(), "{}", text(&o));
    s.handle.shutdown();
}

#[test]
fn nbdinfo_list_shows_only_the_tenants_exports() {
    let Some(nbdinfo) = tmem_vm::test_tool("nbdinfo") else {
        return;
    };
    let s = setup();
    // libnbd takes the TLS user name from the URI's user part.
    let list = |dir: &Path, uri_base: String| {
        let uri = format!("{uri_base}tls-psk-file={}", dir.join("keys.psk").display());
        let o = output({
            let mut c = Command::new(&nbdinfo);
            c.args(["--list", "--json", &uri]);
            c
        });
        assert!(o.status.success(), "{uri}: {}", text(&o));
        text(&o)
    };
    for (who, dir, mine, theirs) in [
        ("alice", &s.alice_dir, "a-disk", "b-disk"),
        ("bob", &s.bob_dir, "b-disk", "a-disk"),
    ] {
        for base in [
            format!("nbds+unix://{who}@/?socket={}&", s.sock.display()),
            format!("nbds://{who}@127.0.0.1:{}/?", s.port),
        ] {
            let t = list(dir, base);
            assert!(t.contains(mine), "{who} does not see {mine}: {t}");
            assert!(!t.contains(theirs), "{who} sees {theirs}: {t}");
            assert!(!t.contains("\"open\""), "{who} sees the open export: {t}");
        }
    }
    s.handle.shutdown();
}
