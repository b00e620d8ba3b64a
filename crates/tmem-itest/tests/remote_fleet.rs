//! Issue 13, "How it is checked": three hosts in network namespaces made by the test, each
//! with its own tmemd and two Redis nodes, the six nodes one Redis Cluster with a replica
//! of every primary on another host (`tmem_itest::fleet`). Host A's tmemd has a 16 MiB
//! pool and the cluster behind it as its remote tier; every host lends its first Redis
//! node to the tier (`[lend]`).
//!
//! 1. Ephemeral: a writable cached export of a 48 MiB image (3× the pool) is read whole
//!    twice (pages evicted from the pool are demoted to Redis; the second pass finds
//!    them there), then 8 MiB of it are rewritten through the export and everything is
//!    read again: every read is the image's current content — a hit or a miss, never a
//!    stale page.
//! 2. Persistent: a swap export takes 48 MiB of random data (3× the pool): pages the pool
//!    refuses go to Redis once a replica acknowledged them (`WAIT`); all read back intact.
//! 3. The Redis primary holding most of A's persistent pages is SIGKILLed; its replica
//!    takes over; every page reads back intact (tmemd retries through the failover).
//! 4. tmemd on A is SIGKILLed and restarted: its page map finds the remote pages again.
//! 5. Host A is cut off the network: new swap writes go to the local spill file (no
//!    error), the tier is reported down; once reconnected it is up again and everything
//!    (remote, spilled, pooled) reads back intact.
//! 6. Lending: each host's node has the `maxmemory` its tmemd computed from the host's
//!    available memory — the most allowed on A, the least on B, whose `keep_free` is more
//!    than the machine has.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tmem_api::{ExportInfo, Stats};
use tmem_itest::daemon::{daemon_bins, Tmemd};
use tmem_itest::fleet::{Fleet, FleetOptions, RedisNode, Role};
use tmem_itest::{wait_until, TempDir, MIB};

const POOL: u64 = 16 * MIB;
const DATA: u64 = 48 * MIB;

fn config(fleet: &Fleet, host: usize, budget: u64, keep_free: &str) -> String {
    let nodes: Vec<String> = fleet.seeds().iter().map(|s| format!("{s:?}")).collect();
    format!(
        "budget = {budget}\ncodec = \"none\"\n\
         [remote]\nnodes = [{}]\nnode_name = \"host{host}\"\nreplicas = 1\n\
         durable_timeout_ms = 15000\n\
         [lend]\nnode = \"{}:6379\"\nmin = \"32M\"\nmax = \"64M\"\nkeep_free = \"{keep_free}\"\n\
         interval_ms = 200\n",
        nodes.join(", "),
        fleet.host_ip(host)
    )
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uri(d: &Tmemd, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", d.nbd_socket().display())
}

/// Copies the whole export into `to` with nbdcopy and returns the bytes.
fn read_export(d: &Tmemd, export: &str, to: &Path) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").arg(uri(d, export)).arg(to));
    std::fs::read(to).expect("read copy")
}

fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn stats(d: &Tmemd) -> Stats {
    d.get("/api/v1/stats").expect("stats")
}

fn export<'a>(s: &'a Stats, name: &str) -> &'a ExportInfo {
    s.exports
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no export {name}: {s:?}"))
}

/// Host A's durable keys on each live primary: `(node, count)`, most first.
fn durable_keys_by_primary(fleet: &mut Fleet) -> Vec<(RedisNode, usize)> {
    fleet.refresh().expect("refresh");
    let mut out: Vec<(RedisNode, usize)> = fleet
        .redis_nodes()
        .into_iter()
        .filter(|n| n.alive && n.role == Role::Primary)
        .map(|n| {
            let keys = fleet
                .node_cmd(&n, &["--scan", "--pattern", "tmem:host0:*:d:*"])
                .unwrap_or_default();
            let count = keys.lines().filter(|l| !l.trim().is_empty()).count();
            (n, count)
        })
        .collect();
    out.sort_by_key(|n| std::cmp::Reverse(n.1));
    out
}

/// The host-side veth of `host` (the one link that is not `lo`).
fn host_link(fleet: &Fleet, host: usize) -> String {
    let ns = &fleet.namespaces()[host];
    let text = run_ok(Command::new("ip").args(["-n", ns, "-o", "link", "show"]));
    text.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .find(|n| !n.is_empty() && n != "lo")
        .unwrap_or_else(|| panic!("no link in {ns}: {text}"))
}

#[test]
fn three_hosts_one_redis_cluster_remote_tier() {
    if tmem_vm::test_tools(["ip", "redis-server", "redis-cli", "nbdcopy", "qemu-io"]).is_none() {
        return;
    }
    let tmp = TempDir::new("tmem-itest-remote").expect("temp dir");
    let exe = std::env::current_exe().expect("test executable path");
    let bins = daemon_bins(&exe).expect("tmemd and tmemctl binaries");
    let mut fleet = Fleet::start(3, FleetOptions::default()).expect("fleet");
    eprintln!("fleet: {fleet:?}");

    let mut a = Tmemd::start_in(
        &bins,
        &tmp.join("a"),
        &config(&fleet, 0, POOL, "1G"),
        Some(&fleet.namespaces()[0]),
    )
    .expect("tmemd on host A");
    // B's keep_free is more than any machine has: it lends the least.
    let b = Tmemd::start_in(
        &bins,
        &tmp.join("b"),
        &config(&fleet, 1, 64 * MIB, "100T"),
        Some(&fleet.namespaces()[1]),
    )
    .expect("tmemd on host B");
    let c = Tmemd::start_in(
        &bins,
        &tmp.join("c"),
        &config(&fleet, 2, 64 * MIB, "1G"),
        Some(&fleet.namespaces()[2]),
    )
    .expect("tmemd on host C");
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            stats(&a).remote.is_some_and(|r| r.reachable)
        }),
        "host A's remote tier never came up: {:?}\n{}",
        stats(&a).remote,
        a.log_text()
    );

    // ---- 1. ephemeral: a cached export of 3× the pool, never stale -----------------------
    let image = tmp.join("image.raw");
    let mut want = random_bytes(DATA, 1);
    std::fs::write(&image, &want).expect("image");
    a.ctl(&[
        "export",
        "add",
        "img",
        "--kind",
        "cached",
        "--image",
        image.to_str().unwrap(),
        "--writable",
    ])
    .expect("cached export");
    let copy = tmp.join("copy.raw");
    for pass in 0..2 {
        let got = read_export(&a, "img", &copy);
        assert_eq!(first_diff(&got, &want), None, "pass {pass}: cached read");
    }
    let st = stats(&a);
    let e = export(&st, "img").backend;
    eprintln!("cached after two passes: {e:?}\nremote: {:?}", st.remote);
    assert!(e.demoted_pages > 0, "nothing demoted: {e:?}");
    assert!(e.remote_hits > 0, "no miss served by the tier: {e:?}");
    // Rewrite 8 MiB (pages that are in Redis now) through the export, then read all.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 4M 8M",
        &uri(&a, "img"),
    ]));
    want[4 << 20..12 << 20].fill(0x5a);
    for pass in 0..2 {
        let got = read_export(&a, "img", &copy);
        assert_eq!(
            first_diff(&got, &want),
            None,
            "pass {pass} after the rewrite: stale data"
        );
    }
    assert_eq!(
        first_diff(&std::fs::read(&image).unwrap(), &want),
        None,
        "the image"
    );
    let e2 = export(&stats(&a), "img").backend;
    eprintln!("cached after the rewrite: {e2:?}");
    assert!(
        e2.remote_misses > e.remote_misses,
        "rewritten pages' old copies were not refused: {e2:?}"
    );
    a.ctl(&["export", "rm", "img"])
        .expect("remove cached export");

    // ---- 2. persistent: a swap export takes 3× the pool ----------------------------------
    a.ctl(&["export", "add", "s", "--kind", "swap", "--size", "64M"])
        .expect("swap export");
    let data = random_bytes(DATA, 2);
    let src = tmp.join("swap-src.raw");
    std::fs::write(&src, &data).expect("source");
    run_ok(Command::new("nbdcopy").arg(&src).arg(uri(&a, "s")));
    let check = |d: &Tmemd, what: &str, extra: &[u8]| {
        let got = read_export(d, "s", &copy);
        assert_eq!(first_diff(&got[..DATA as usize], &data), None, "{what}");
        assert_eq!(
            first_diff(&got[DATA as usize..][..extra.len()], extra),
            None,
            "{what}: the part written while cut off"
        );
    };
    check(&a, "after the write", &[]);
    let st = stats(&a);
    let s = export(&st, "s").backend;
    eprintln!("swap: {s:?}\nremote: {:?}", st.remote);
    assert!(
        s.remote_pages * 4096 >= DATA / 2,
        "most pages should live in Redis: {s:?}"
    );
    assert_eq!(s.poisoned_pages, 0);

    // ---- 3. SIGKILL the primary holding most of A's persistent pages ---------------------
    let by_primary = durable_keys_by_primary(&mut fleet);
    eprintln!(
        "durable keys per primary: {:?}",
        by_primary
            .iter()
            .map(|(n, k)| (n.addr, *k))
            .collect::<Vec<_>>()
    );
    let (victim, keys) = by_primary.first().cloned().expect("a primary");
    assert!(keys > 100, "{keys} keys on the busiest primary");
    fleet.kill9(&victim).expect("kill primary");
    let promoted = fleet
        .wait_failover(&victim, Duration::from_secs(60))
        .expect("failover");
    eprintln!(
        "killed {} ({keys} keys); {} took over",
        victim.addr, promoted.addr
    );
    check(&a, "after the failover", &[]);
    let s = export(&stats(&a), "s").backend;
    assert_eq!(s.poisoned_pages, 0, "{s:?}");
    assert_eq!(s.remote_errors, 0, "{s:?}");

    let r = stats(&a).remote.expect("remote info");
    eprintln!("host A's tier before its tmemd is killed: {r:?}");
    assert!(
        r.durable_puts > 0 && r.durable_gets > 0 && r.fetch_hits > 0 && r.demoted_pages > 0,
        "{r:?}"
    );

    // ---- 4. tmemd on A dies and comes back: the page map finds the remote pages ----------
    a.kill9();
    a.restart().expect("restart A");
    check(&a, "after tmemd's SIGKILL and restart", &[]);

    // ---- 5. A cut off: writes spill locally, no error; then everything reads back --------
    let link = host_link(&fleet, 0);
    let ns0 = fleet.namespaces()[0].clone();
    run_ok(Command::new("ip").args(["-n", &ns0, "link", "set", &link, "down"]));
    let extra = random_bytes(8 * MIB, 3);
    let extra_src = tmp.join("extra.raw");
    std::fs::write(&extra_src, &extra).expect("extra");
    let written = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 48M 8M", extra_src.display()),
            &uri(&a, "s"),
        ])
        .output()
        .expect("qemu-io");
    let partitioned = stats(&a);
    run_ok(Command::new("ip").args(["-n", &ns0, "link", "set", &link, "up"]));
    assert!(
        written.status.success() && !String::from_utf8_lossy(&written.stdout).contains("error"),
        "a write while the tier is unreachable must not fail: {}{}",
        String::from_utf8_lossy(&written.stdout),
        String::from_utf8_lossy(&written.stderr)
    );
    let sp = export(&partitioned, "s").backend;
    eprintln!("while cut off: {sp:?}\nremote: {:?}", partitioned.remote);
    assert!(
        sp.spilled_pages > 0,
        "nothing went to the spill file: {sp:?}"
    );
    assert!(
        partitioned.remote.as_ref().is_some_and(|r| !r.reachable),
        "tier not reported down: {:?}",
        partitioned.remote
    );
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            stats(&a).remote.is_some_and(|r| r.reachable)
        }),
        "tier not back after the link came up"
    );
    check(&a, "after the partition", &extra);
    let s = export(&stats(&a), "s").backend;
    assert_eq!(s.poisoned_pages, 0, "{s:?}");

    // ---- 6. lending follows each host's available memory ---------------------------------
    let lent = |d: &Tmemd| stats(d).remote.and_then(|r| r.lend).map(|l| l.bytes);
    let node_of = |fleet: &Fleet, host: usize| {
        fleet
            .redis_nodes()
            .into_iter()
            .find(|n| n.host == host && n.addr.port() == 6379)
            .expect("node")
    };
    for (d, host, want) in [(&a, 0, 64 * MIB), (&b, 1, 32 * MIB), (&c, 2, 64 * MIB)] {
        assert!(
            wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
                lent(d) == Some(want)
            }),
            "host {host} lends {:?}, want {want}",
            lent(d)
        );
        let node = node_of(&fleet, host);
        if node.alive {
            let max = fleet.config_get(&node, "maxmemory").expect("maxmemory");
            assert_eq!(max.trim(), want.to_string(), "host {host}'s node");
            let policy = fleet.config_get(&node, "maxmemory-policy").expect("policy");
            assert_eq!(policy.trim(), "volatile-lru");
        }
    }
    let r = stats(&a).remote.expect("remote info");
    eprintln!("host A's tier at the end (since its restart): {r:?}");
    assert!(r.durable_gets > 0 && r.reachable, "{r:?}");
    drop((b, c));
}
