//! The multi-host fixture (`tmem_itest::fleet`) on its own: three hosts in network
//! namespaces this test creates, each with two Redis nodes, forming one Redis Cluster.
//!
//! 1. every replica is on another host than its primary, and stays so: a replica moved
//!    next to its primary (`CLUSTER REPLICATE`) is moved away by `wait_formed`;
//! 2. from host 1, `redis-cli -c` against host 2's node writes and reads keys spread over
//!    the cluster; `CONFIG GET`/`SET maxmemory` work per node;
//! 3. a key is written to its primary and acknowledged by a replica (`WAIT 1 1000`), that
//!    primary is SIGKILLed, its replica takes over, and host 2 reads the key back through
//!    `redis-cli -c` (the earlier keys too);
//! 4. dropping the fleet removes its namespaces and leaves no redis-server running.
//!
//! Run: `cargo test -p tmem-itest --test fleet -- --nocapture` (as root). Skips (with a
//! message) without `ip`, `redis-server`, `redis-cli` or root; fails instead under
//! `TMEM_REQUIRE_VM=1`. `TMEM_ITEST_KEEP=1` keeps the run directory (node logs).

use std::process::Command;
use std::time::{Duration, Instant};

use tmem_itest::fleet::{Fleet, FleetOptions, RedisNode, Role, Shaping};
use tmem_itest::wait_until;

/// `ip`, `redis-server`, `redis-cli` and root, or `None` after
/// `tmem_vm::missing_prerequisite` (a failure under `TMEM_REQUIRE_VM=1`).
fn prerequisites() -> Option<()> {
    tmem_vm::test_tools(["ip", "redis-server", "redis-cli"])?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        tmem_vm::missing_prerequisite("root", "network namespaces need CAP_SYS_ADMIN");
        return None;
    }
    Some(())
}

/// A live node on `host` (its address and port as strings).
fn live_on(fleet: &Fleet, host: usize) -> (String, String) {
    let n = fleet
        .redis_nodes()
        .into_iter()
        .find(|n| n.host == host && n.alive)
        .expect("a live node on the host");
    (n.addr.ip().to_string(), n.addr.port().to_string())
}

fn netns_list() -> String {
    let out = Command::new(tmem_vm::find_tool("ip").expect("ip"))
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn redis_pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "redis-server")
}

/// The tests' fleets run one at a time (two cores; node timeouts of a second).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn three_host_redis_cluster_fails_over() {
    if prerequisites().is_none() {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let mut fleet = Fleet::start(3, FleetOptions::default()).expect("fleet");
    println!("fleet up in {:.1}s: {fleet:#?}", t0.elapsed().as_secs_f64());

    // 1. Placement: three primaries, one per host; each replica on another host.
    let nodes = fleet.redis_nodes();
    assert_eq!(nodes.len(), 6);
    assert!(fleet.replica_placement_violations().is_empty());
    let primaries: Vec<&RedisNode> = nodes.iter().filter(|n| n.role == Role::Primary).collect();
    assert_eq!(primaries.len(), 3, "{nodes:#?}");
    for n in &nodes {
        if let Role::Replica(p) = &n.role {
            let p = nodes.iter().find(|x| &x.id == p).expect("its primary");
            assert_ne!(p.host, n.host, "replica {} next to its primary", n.addr);
            assert_eq!(p.role, Role::Primary);
        }
    }
    assert_eq!(fleet.seeds().len(), 6);

    // A replica moved next to its primary is found and moved away again.
    let p0 = primaries
        .iter()
        .find(|p| p.host == 0)
        .expect("host 0's primary");
    let r0 = nodes
        .iter()
        .find(|n| n.host == 0 && n.role != Role::Primary)
        .expect("host 0's replica");
    fleet
        .node_cmd(r0, &["CLUSTER", "REPLICATE", &p0.id])
        .expect("CLUSTER REPLICATE");
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || { fleet.refresh().is_ok() && !fleet.replica_placement_violations().is_empty() }
    ));
    println!(
        "placement broken: {:?}",
        fleet.replica_placement_violations()
    );
    fleet
        .wait_formed(Duration::from_secs(60))
        .expect("placement repaired");
    assert!(fleet.replica_placement_violations().is_empty());
    let nodes = fleet.redis_nodes();
    for n in &nodes {
        if let Role::Replica(p) = &n.role {
            let p = nodes.iter().find(|x| &x.id == p).expect("its primary");
            assert_ne!(p.host, n.host, "replica {} next to its primary", n.addr);
        }
    }

    // The namespaces are real: host 1 has its address on its veth.
    let mut ipaddr = Command::new("ip");
    ipaddr.args(["-4", "-o", "addr", "show"]);
    let out = fleet.exec(1, &mut ipaddr).expect("ip addr in host 1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&fleet.host_ip(1).to_string()), "{text}");
    assert!(!text.contains(&fleet.host_ip(0).to_string()), "{text}");
    println!("link shaping: {:?}", fleet.shaping());

    // 2. Keys across the cluster, from host 1 through host 2's node.
    let (h2ip, h2port) = live_on(&fleet, 2);
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..24 {
        let (k, v) = (format!("fleet-key-{i}"), format!("value-{i}"));
        let out = fleet
            .redis_cli(1, &["-c", "-h", &h2ip, "-p", &h2port, "SET", &k, &v])
            .expect("SET");
        assert_eq!(out.trim(), "OK", "SET {k}");
        owners.insert(fleet.primary_for_key(&k).expect("owner").addr);
    }
    assert!(owners.len() >= 2, "24 keys on one primary: {owners:?}");
    let (h0ip, h0port) = live_on(&fleet, 0);
    for i in 0..24 {
        let k = format!("fleet-key-{i}");
        let out = fleet
            .redis_cli(1, &["-c", "-h", &h0ip, "-p", &h0port, "GET", &k])
            .expect("GET");
        assert_eq!(out.trim(), format!("value-{i}"), "GET {k}");
    }
    let n0 = &nodes[0];
    assert_eq!(fleet.config_get(n0, "maxmemory").expect("get"), "67108864");
    assert_eq!(
        fleet.config_get(n0, "maxmemory-policy").expect("get"),
        "volatile-lru"
    );
    fleet.set_maxmemory(n0, 32 << 20).expect("set");
    assert_eq!(fleet.config_get(n0, "maxmemory").expect("get"), "33554432");

    // 3. A key acknowledged by a replica survives SIGKILL of its primary.
    let key = "fleet-failover-key";
    let primary = fleet.primary_for_key(key).expect("owner");
    println!("{key} lives on {} (host {})", primary.addr, primary.host);
    let script = format!(
        "printf 'SET {key} survived\\nWAIT 1 1000\\n' | redis-cli -h {} -p {}",
        primary.addr.ip(),
        primary.addr.port()
    );
    let mut acked = false;
    for _ in 0..5 {
        let mut sh = Command::new("sh");
        sh.args(["-c", &script]);
        let out = fleet.exec(0, &mut sh).expect("SET + WAIT");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first().copied(), Some("OK"), "{text}");
        if lines.get(1).copied() == Some("1") {
            acked = true;
            break;
        }
        println!("WAIT 1 1000 answered {:?}; again", lines.get(1));
    }
    assert!(acked, "no replica acknowledged the write");

    let pid = primary.pid;
    assert!(redis_pid_alive(pid));
    let t_kill = Instant::now();
    fleet.kill9(&primary).expect("kill9");
    assert!(!redis_pid_alive(pid), "redis-server {pid} survived SIGKILL");
    let new_primary = fleet
        .wait_failover(&primary, Duration::from_secs(60))
        .expect("failover");
    println!(
        "failover: {} -> {} (host {}) in {:.2}s",
        primary.addr,
        new_primary.addr,
        new_primary.host,
        t_kill.elapsed().as_secs_f64()
    );
    assert_ne!(new_primary.addr, primary.addr);
    assert_eq!(new_primary.role, Role::Primary);
    assert_ne!(
        new_primary.host, primary.host,
        "the replica was on another host"
    );
    assert_eq!(
        fleet.primary_for_key(key).expect("owner").addr,
        new_primary.addr
    );

    let (h2ip, h2port) = live_on(&fleet, 2);
    let out = fleet
        .redis_cli(2, &["-c", "-h", &h2ip, "-p", &h2port, "GET", key])
        .expect("GET after failover");
    assert_eq!(out.trim(), "survived");
    for i in 0..24 {
        let k = format!("fleet-key-{i}");
        let out = fleet
            .redis_cli(2, &["-c", "-h", &h2ip, "-p", &h2port, "GET", &k])
            .expect("GET after failover");
        assert_eq!(out.trim(), format!("value-{i}"), "GET {k} after failover");
    }

    // 4. Drop: namespaces gone, every redis-server dead.
    let mut names: Vec<String> = fleet.namespaces().to_vec();
    names.push(fleet.switch_namespace().to_string());
    let pids: Vec<u32> = fleet.redis_nodes().iter().map(|n| n.pid).collect();
    drop(fleet);
    let list = netns_list();
    for ns in &names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "namespace {ns} left behind: {list}"
        );
    }
    for pid in pids {
        assert!(!redis_pid_alive(pid), "redis-server {pid} left running");
    }
}

/// `link_delay_us`: a netem delay on every host's veth, or (no `tc`/`sch_netem`) a
/// recorded reason and unshaped links; the cluster forms either way.
#[test]
fn link_delay_is_applied_or_reported() {
    if prerequisites().is_none() {
        return;
    }
    let _serial = serial();
    let opts = FleetOptions {
        link_delay_us: 300,
        ..FleetOptions::default()
    };
    let fleet = Fleet::start(3, opts).expect("fleet");
    println!("link shaping: {:?}", fleet.shaping());
    for h in 0..fleet.n_hosts() {
        let mut tc = Command::new("tc");
        tc.args(["qdisc", "show"]);
        let qdiscs = fleet
            .exec(h, &mut tc)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        match fleet.shaping() {
            Shaping::Delay(us) => {
                assert_eq!(*us, 300);
                assert!(qdiscs.contains("netem"), "host {h}: {qdiscs}");
            }
            Shaping::Unavailable(why) => {
                assert!(!why.is_empty());
                assert!(!qdiscs.contains("netem"), "host {h}: {qdiscs}");
            }
            Shaping::Off => panic!("a delay was asked for"),
        }
    }
    let (ip, port) = live_on(&fleet, 0);
    let out = fleet
        .redis_cli(1, &["-c", "-h", &ip, "-p", &port, "SET", "shaped", "1"])
        .expect("SET");
    assert_eq!(out.trim(), "OK");
}
