//! Interoperability with real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) run as
//! subprocesses against an in-process server on a tempdir Unix socket.
//!
//! The tools come from `scripts/setup`. If one is missing the test fails under
//! `TMEM_REQUIRE_VM=1` (CI) and is skipped with a message otherwise (`tmem_vm::test_tool`).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};
use std::sync::Arc;

use common::TestServer;
use tmem_nbd::{BlockBackend, ListenAddr, MemBackend, ServerConfig, ServerHandle, StaticExports};

const SIZE: u64 = 32 << 20;

fn tool(name: &str) -> Option<Command> {
    tmem_vm::test_tool(name).map(Command::new)
}

fn run(mut c: Command) -> Output {
    let out = c.output().expect("spawn client");
    assert!(
        out.status.success(),
        "{c:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn qemu_io_patterns_and_unaligned() {
    let srv = TestServer::start(SIZE);
    let Some(mut c) = tool("qemu-io") else { return };
    c.args(["-f", "raw"]);
    for cmd in [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0x5c 1000 513",
        "read -P 0x5c 1000 513",
        "read -P 0xab 0 1000",
        "read -P 0xab 1513 64023",
        "write -z 4096 8192",
        "read -P 0 4096 8192",
        "write -z -u 65536 1m",
        "discard 16k 4k",
        "read -P 0 16k 4k",
        "write -P 0x77 31m 1m",
        "read -P 0x77 31m 1m",
        "flush",
        "read -P 0 1m 1m",
    ] {
        c.args(["-c", cmd]);
    }
    c.arg(srv.uri("a"));
    let out = run(c);
    let s = stdout(&out);
    assert!(!s.contains("verification failed"), "{s}");
    assert!(!s.to_lowercase().contains("error"), "{s}");
    assert_eq!(s.matches("read ").count(), 8, "{s}");
    let st = srv.handle().stats("a").unwrap();
    assert_eq!(
        (st.writes, st.write_zeroes, st.trims, st.reads, st.errors),
        (3, 2, 1, 8, 0),
        "{st:?}"
    );
}

#[test]
fn qemu_io_detects_wrong_pattern() {
    // Guard against a test that cannot fail: a wrong pattern must be reported.
    let srv = TestServer::start(SIZE);
    let Some(mut c) = tool("qemu-io") else { return };
    c.args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 4k",
        "-c",
        "read -P 0xac 0 4k",
        &srv.uri("a"),
    ]);
    let out = c.output().unwrap();
    let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("verification failed"), "{all}");
}

fn make_image(path: &std::path::Path, size: usize) -> Vec<u8> {
    // Data islands separated by holes, including unaligned ones.
    let mut img = vec![0u8; size];
    let mut x = 0x1234_5678u32;
    for (start, len) in [
        (0usize, 100_000usize),
        (1 << 20, 4096),
        ((3 << 20) + 777, 333_333),
        (size - 5000, 5000),
    ] {
        for b in &mut img[start..start + len] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = (x >> 7) as u8;
        }
    }
    std::fs::write(path, &img).unwrap();
    img
}

#[test]
fn qemu_img_convert_then_compare() {
    let srv = TestServer::start(SIZE);
    let file = srv.dir.path().join("src.raw");
    make_image(&file, SIZE as usize);
    let Some(mut c) = tool("qemu-img") else {
        return;
    };
    c.args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&file)
        .arg(srv.uri("b"));
    run(c);
    let Some(mut c) = tool("qemu-img") else {
        return;
    };
    c.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&file)
        .arg(srv.uri("b"));
    let out = run(c);
    assert!(stdout(&out).contains("identical"), "{}", stdout(&out));
    // And the comparison can fail: export "a" is empty.
    let Some(mut c) = tool("qemu-img") else {
        return;
    };
    c.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&file)
        .arg(srv.uri("a"));
    assert!(!c.output().unwrap().status.success());
}

#[test]
fn nbdinfo_list_and_map() {
    let srv = TestServer::start(SIZE);
    let Some(mut c) = tool("nbdinfo") else { return };
    c.args(["--list", &srv.uri("")]);
    let s = stdout(&run(c));
    assert!(
        s.contains("export=\"a\"") && s.contains("export=\"b\""),
        "{s}"
    );
    assert!(s.contains("test export b"), "{s}");
    assert!(
        s.contains("base:allocation") && s.contains("using structured"),
        "{s}"
    );
    assert!(
        s.contains("can_multi_conn: true") && s.contains("can_fast_zero: true"),
        "{s}"
    );

    let Some(mut w) = tool("qemu-io") else { return };
    w.args([
        "-f",
        "raw",
        "-c",
        "write -P 1 64k 64k",
        "-c",
        "write -P 2 1m 4k",
        &srv.uri("a"),
    ]);
    run(w);
    let Some(mut c) = tool("nbdinfo") else { return };
    c.args(["--map", &srv.uri("a")]);
    let s = stdout(&run(c));
    let rows: Vec<Vec<&str>> = s.lines().map(|l| l.split_whitespace().collect()).collect();
    let want: Vec<Vec<&str>> = vec![
        vec!["0", "65536", "3", "hole,zero"],
        vec!["65536", "65536", "0", "data"],
        vec!["131072", "917504", "3", "hole,zero"],
        vec!["1048576", "4096", "0", "data"],
        vec!["1052672", "32501760", "3", "hole,zero"],
    ];
    assert_eq!(rows, want, "{s}");
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    let srv = TestServer::start(SIZE);
    let src = srv.dir.path().join("src.raw");
    let dst = srv.dir.path().join("dst.raw");
    let img = make_image(&src, SIZE as usize);
    let Some(mut c) = tool("nbdcopy") else { return };
    c.args(["--connections=4", "--requests=16"])
        .arg(&src)
        .arg(srv.uri("a"));
    run(c);
    let Some(mut c) = tool("nbdcopy") else { return };
    c.arg(srv.uri("a")).arg(&dst);
    run(c);
    assert!(std::fs::read(&dst).unwrap() == img, "round trip differs");
    let st = srv.handle().stats("a").unwrap();
    assert!(st.connections >= 2, "{st:?}");
    assert!(
        st.hole_bytes_read > 0,
        "holes should be sent as holes: {st:?}"
    );
}

#[test]
fn tcp_listener_with_qemu_io() {
    let t = StaticExports::new().with_export(
        "t",
        "",
        Arc::new(MemBackend::new(SIZE)) as Arc<dyn BlockBackend>,
    );
    let h = ServerHandle::start(
        Arc::new(t),
        ServerConfig {
            allow_plain_tcp: true,
            ..ServerConfig::default()
        },
        &[ListenAddr::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))],
    )
    .unwrap();
    let addr = h.tcp_addrs()[0];
    let Some(mut c) = tool("qemu-io") else { return };
    c.args([
        "-f",
        "raw",
        "-c",
        "write -P 0x31 4k 12k",
        "-c",
        "read -P 0x31 4k 12k",
    ]);
    c.arg(format!("nbd://127.0.0.1:{}/t", addr.port()));
    let s = stdout(&run(c));
    assert!(!s.contains("verification failed"), "{s}");
    h.shutdown();
}
