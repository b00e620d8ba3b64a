//! A multi-host test fixture: `n` "hosts" in network namespaces on one machine, each
//! with two Redis nodes, forming one Redis Cluster with one replica per primary.
//!
//! Layout ([`Fleet::start`]):
//!
//! * a "switch" namespace `tmf<pid>s` holding a bridge `tf<pid>br`;
//! * per host `i` a namespace `tmf<pid>h<i>` with `lo` up and one end of a veth pair,
//!   `tf<pid>e<i>`, addressed `10.<x>.<y>.<i+1>/24` (the /24 is derived from the PID so
//!   that parallel tests differ); the other end, `tf<pid>s<i>`, sits on the bridge in
//!   the switch namespace. Every link lives in the test's namespaces; nothing is added
//!   to the machine's own network namespace. A second fleet in the same process gets
//!   `tmf<pid>x<k>…` names;
//! * per host two `redis-server`s (ports 6379 and 6380) bound to the host's address,
//!   started with `ip netns exec`, which execs, so the child's PID is redis-server's;
//! * `redis-cli --cluster create … --cluster-replicas 1` from host 0, then a wait until
//!   every node says `cluster_state:ok`, every primary has one replica with its
//!   replication link up, and the placement (a replica never on its primary's host) is
//!   checked from `CLUSTER NODES`; if redis-cli put a replica next to its primary, the
//!   replicas are re-pointed (`CLUSTER REPLICATE`) so that host `i`'s replica follows
//!   host `i+1`'s primary.
//!
//! Dropping the [`Fleet`] SIGKILLs every redis-server it started (by PID) and deletes
//! its namespaces (which removes the veths and the bridge), also while a test panics;
//! then the node logs are printed (tails) and the run directory is kept, for diagnosis.
//! `TMEM_ITEST_KEEP=1` keeps the run directory always.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::run;
use crate::{io_err, Error, Result, TempDir};

/// The Redis ports of every host: the first and second node.
pub const REDIS_PORTS: [u16; 2] = [6379, 6380];

/// Options of [`Fleet::start`].
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// `cluster-node-timeout`, ms: how long a primary may be unreachable before its
    /// replica is promoted. Default: 1000.
    pub node_timeout_ms: u64,
    /// `maxmemory` of every node, bytes (`maxmemory-policy volatile-lru`: keys with a
    /// TTL are evicted LRU, keys without one never). Default: 64 MiB.
    pub maxmemory: u64,
    /// If non-zero, a `netem` delay of this many µs on each host's veth (egress), for
    /// benchmarks. Skipped with a log line when `tc` or `sch_netem` is missing; see
    /// [`Fleet::shaping`]. Default: 0 (off).
    pub link_delay_us: u32,
    /// How long to wait for the cluster to form. Default: 60 s.
    pub form_timeout: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            node_timeout_ms: 1000,
            maxmemory: 64 * crate::MIB,
            link_delay_us: 0,
            form_timeout: Duration::from_secs(60),
        }
    }
}

/// What became of [`FleetOptions::link_delay_us`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shaping {
    /// No delay was asked for.
    Off,
    /// A netem delay of this many µs is on every host-side veth.
    Delay(u32),
    /// A delay was asked for but could not be set (why); the links are unshaped.
    Unavailable(String),
}

/// A node's role in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A primary (`master`).
    Primary,
    /// A replica of the primary with this cluster node ID.
    Replica(String),
}

/// One Redis node of the fleet, as last seen (see [`Fleet::refresh`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisNode {
    /// Its address (the host's IP and its port).
    pub addr: SocketAddrV4,
    /// The host (namespace) it runs in.
    pub host: usize,
    /// Its cluster node ID.
    pub id: String,
    /// Its role.
    pub role: Role,
    /// The redis-server PID (still reported after [`Fleet::kill9`]).
    pub pid: u32,
    /// Whether the fleet has not killed it.
    pub alive: bool,
    /// The slot ranges it served (inclusive), as last seen.
    pub slots: Vec<(u16, u16)>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNodeLine {
    /// Node ID.
    pub id: String,
    /// `ip:port` (without the bus port and hostname).
    pub addr: String,
    /// Flags (`myself`, `master`, `slave`, `fail`, `fail?`, ...).
    pub flags: Vec<String>,
    /// The primary's ID for a replica, `None` for a primary.
    pub primary: Option<String>,
    /// `connected` or `disconnected`.
    pub link: String,
    /// Slot ranges served (inclusive); import/migrate markers are left out.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNodeLine {
    /// Whether it is a primary.
    pub fn is_primary(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Whether it is flagged failed (`fail`, or `fail?` when `pfail` is true).
    pub fn failed(&self, pfail: bool) -> bool {
        self.flags
            .iter()
            .any(|f| f == "fail" || (pfail && f == "fail?"))
    }

    /// Whether it serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// Parses `CLUSTER NODES` output.
pub fn parse_cluster_nodes(text: &str) -> Result<Vec<ClusterNodeLine>> {
    let bad = |l: &str, why: &str| Error::Parse {
        what: "CLUSTER NODES".into(),
        detail: format!("{why}: {l:?}"),
    };
    let mut out = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 {
            return Err(bad(l, "fewer than 8 fields"));
        }
        let addr = f[1]
            .split(['@', ','])
            .next()
            .unwrap_or_default()
            .to_string();
        let primary = (f[3] != "-").then(|| f[3].to_string());
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue;
            }
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let a: u16 = a.parse().map_err(|_| bad(l, "slot"))?;
            let b: u16 = b.parse().map_err(|_| bad(l, "slot"))?;
            slots.push((a, b));
        }
        out.push(ClusterNodeLine {
            id: f[0].to_string(),
            addr,
            flags: f[2].split(',').map(str::to_string).collect(),
            primary,
            link: f[7].to_string(),
            slots,
        });
    }
    Ok(out)
}

/// `key:value` lines of `CLUSTER INFO` / `INFO`.
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether a redis-cli (raw mode) answer is an error reply.
fn is_error_reply(out: &str) -> bool {
    const PREFIXES: [&str; 14] = [
        "ERR",
        "CLUSTERDOWN",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "LOADING",
        "NOREPLICAS",
        "READONLY",
        "MASTERDOWN",
        "WRONGTYPE",
        "NOAUTH",
        "OOM",
        "BUSY",
        "CROSSSLOT",
    ];
    let first = out.lines().next().unwrap_or_default();
    let word = first.split_whitespace().next().unwrap_or_default();
    first.starts_with("(error)") || (first.contains(' ') && PREFIXES.contains(&word))
}

struct NodeProc {
    addr: SocketAddrV4,
    host: usize,
    child: Option<Child>,
    pid: u32,
    id: String,
    role: Role,
    slots: Vec<(u16, u16)>,
    log: PathBuf,
}

/// A running fleet; see the [module docs](self). Cleans up on drop.
pub struct Fleet {
    ip_bin: PathBuf,
    cli_bin: PathBuf,
    /// Every namespace created so far (deleted on drop), switch first.
    created_ns: Vec<String>,
    switch_ns: String,
    hosts: Vec<String>,
    ips: Vec<Ipv4Addr>,
    nodes: Vec<NodeProc>,
    shaping: Shaping,
    dir: TempDir,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("hosts", &self.hosts)
            .field("ips", &self.ips)
            .field("nodes", &self.redis_nodes())
            .field("shaping", &self.shaping)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Names and the /24 of the `k`-th fleet of process `pid`.
fn naming(pid: u32, k: u32) -> (String, [u8; 2]) {
    let prefix = if k == 0 {
        format!("tmf{pid}")
    } else {
        format!("tmf{pid}x{k}")
    };
    // 10.100.0.0 – 10.199.255.0: 25600 /24s.
    let v = (u64::from(pid) + u64::from(k) * 7919) % 25_600;
    let x = 100 + (v / 256) as u8;
    let y = (v % 256) as u8;
    (prefix, [x, y])
}

impl Fleet {
    /// Builds the namespaces, links and Redis nodes and forms the cluster; see the
    /// [module docs](self). Needs root, `ip`, `redis-server` and `redis-cli`;
    /// `n_hosts` must be 3..=250 (a cluster needs three primaries). On error everything
    /// created so far is removed again.
    pub fn start(n_hosts: usize, opts: FleetOptions) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        if !(3..=250).contains(&n_hosts) {
            return Err(Error::Parse {
                what: "fleet size".into(),
                detail: format!("{n_hosts} hosts; a Redis Cluster needs 3 to 250 here"),
            });
        }
        let tool = |n: &str| tmem_vm::find_tool(n).map_err(Error::from);
        let ip_bin = tool("ip")?;
        let server_bin = tool("redis-server")?;
        let cli_bin = tool("redis-cli")?;
        let pid = std::process::id();
        let k = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let (prefix, [x, y]) = naming(pid, k);
        let dir = TempDir::new("tmem-fleet")?;
        let mut fleet = Fleet {
            ip_bin,
            cli_bin,
            created_ns: Vec::new(),
            switch_ns: format!("{prefix}s"),
            hosts: (0..n_hosts).map(|i| format!("{prefix}h{i}")).collect(),
            ips: (0..n_hosts)
                .map(|i| Ipv4Addr::new(10, x, y, (i + 1) as u8))
                .collect(),
            nodes: Vec::new(),
            shaping: Shaping::Off,
            dir,
        };
        let res = (|| {
            fleet.build_network(&format!("tf{pid}"), opts.link_delay_us)?;
            fleet.start_nodes(&server_bin, &opts)?;
            fleet.check_connectivity()?;
            fleet.form_cluster(opts.form_timeout)
        })();
        match res {
            Ok(()) => Ok(fleet),
            Err(e) => {
                fleet.dump_logs();
                Err(e)
            }
        }
    }

    fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new(&self.ip_bin).args(args))
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        let listed = self.ip(&["netns", "list"])?;
        let listed = String::from_utf8_lossy(&listed.stdout);
        if listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
        {
            return Err(Error::Parse {
                what: "network namespace".into(),
                detail: format!("{name} already exists (a stale one of a dead test?)"),
            });
        }
        self.ip(&["netns", "add", name])?;
        self.created_ns.push(name.to_string());
        self.ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The switch namespace with its bridge, and each host's namespace and veth.
    fn build_network(&mut self, link_prefix: &str, delay_us: u32) -> Result<()> {
        let sw = self.switch_ns.clone();
        self.add_ns(&sw)?;
        let br = format!("{link_prefix}br");
        self.ip(&["-n", &sw, "link", "add", &br, "type", "bridge"])?;
        self.ip(&["-n", &sw, "link", "set", &br, "up"])?;
        let mut shaping = if delay_us == 0 {
            Shaping::Off
        } else {
            Shaping::Delay(delay_us)
        };
        let tc = tmem_vm::find_tool("tc").ok();
        for i in 0..self.hosts.len() {
            let ns = self.hosts[i].clone();
            self.add_ns(&ns)?;
            let (he, se) = (format!("{link_prefix}e{i}"), format!("{link_prefix}s{i}"));
            // Both ends are born in the switch namespace; one moves to the host.
            self.ip(&[
                "-n", &sw, "link", "add", &se, "type", "veth", "peer", "name", &he,
            ])?;
            self.ip(&["-n", &sw, "link", "set", &he, "netns", &ns])?;
            self.ip(&["-n", &sw, "link", "set", &se, "master", &br])?;
            self.ip(&["-n", &sw, "link", "set", &se, "up"])?;
            let cidr = format!("{}/24", self.ips[i]);
            self.ip(&["-n", &ns, "addr", "add", &cidr, "dev", &he])?;
            self.ip(&["-n", &ns, "link", "set", &he, "up"])?;
            if let Shaping::Delay(us) = shaping {
                let Some(tc) = &tc else {
                    shaping = Shaping::Unavailable("tc not found".into());
                    continue;
                };
                let delay = format!("{us}us");
                let r = run(Command::new(&self.ip_bin)
                    .args(["netns", "exec", &ns])
                    .arg(tc)
                    .args(["qdisc", "add", "dev", &he, "root", "netem", "delay", &delay]));
                if let Err(e) = r {
                    shaping = Shaping::Unavailable(e.to_string());
                    // Unshape the hosts done so far: all links alike or none.
                    for (j, h) in self.hosts[..i].iter().enumerate() {
                        let dev = format!("{link_prefix}e{j}");
                        let _ = run(Command::new(&self.ip_bin)
                            .args(["netns", "exec", h])
                            .arg(tc)
                            .args(["qdisc", "del", "dev", &dev, "root"]));
                    }
                }
            }
        }
        if let Shaping::Unavailable(why) = &shaping {
            eprintln!("tmem-itest fleet: no link delay (netem unavailable): {why}");
        }
        self.shaping = shaping;
        Ok(())
    }

    fn start_nodes(&mut self, server: &Path, opts: &FleetOptions) -> Result<()> {
        for host in 0..self.hosts.len() {
            for port in REDIS_PORTS {
                let ndir = self.dir.join(&format!("h{host}-{port}"));
                std::fs::create_dir_all(&ndir)
                    .map_err(io_err(format!("creating {}", ndir.display())))?;
                let log = ndir.join("redis.log");
                let mut cmd = self.command(host, server);
                cmd.arg("--bind")
                    .arg(self.ips[host].to_string())
                    .args(["--port", &port.to_string()])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-node-timeout", &opts.node_timeout_ms.to_string()])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(&ndir)
                    .args(["--maxmemory", &opts.maxmemory.to_string()])
                    .args(["--maxmemory-policy", "volatile-lru"])
                    .args(["--protected-mode", "no", "--daemonize", "no"])
                    // Replicas sync at once, not after the default 5 s wait.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--logfile")
                    .arg(&log)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let child = cmd.spawn().map_err(io_err(format!(
                    "spawning redis-server in {}",
                    self.hosts[host]
                )))?;
                self.nodes.push(NodeProc {
                    addr: SocketAddrV4::new(self.ips[host], port),
                    host,
                    pid: child.id(),
                    child: Some(child),
                    id: String::new(),
                    role: Role::Primary,
                    slots: Vec::new(),
                    log,
                });
            }
        }
        // Up when each answers PING from its own host.
        let end = Instant::now() + Duration::from_secs(30);
        for i in 0..self.nodes.len() {
            loop {
                if let Some(st) = self.nodes[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    self.nodes[i].child = None;
                    return Err(Error::Command {
                        cmd: format!("redis-server {}", self.nodes[i].addr),
                        status: st.to_string(),
                        stderr: log_tail(&self.nodes[i].log, 20),
                    });
                }
                if self
                    .node_cli(i, &["PING"])
                    .is_ok_and(|o| o.trim() == "PONG")
                {
                    break;
                }
                if Instant::now() >= end {
                    return Err(Error::Timeout {
                        what: format!("redis-server {} to answer PING", self.nodes[i].addr),
                        secs: 30.0,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let id = self.node_cli(i, &["CLUSTER", "MYID"])?;
            self.nodes[i].id = id.trim().to_string();
        }
        Ok(())
    }

    /// Every host reaches every node over the bridge (TCP, `PING`).
    fn check_connectivity(&self) -> Result<()> {
        for h in 0..self.hosts.len() {
            for n in &self.nodes {
                let (ip, port) = (n.addr.ip().to_string(), n.addr.port().to_string());
                let out = self.redis_cli(h, &["-h", &ip, "-p", &port, "PING"])?;
                if out.trim() != "PONG" {
                    return Err(Error::Parse {
                        what: format!("PING from host {h} to {}", n.addr),
                        detail: out,
                    });
                }
            }
        }
        Ok(())
    }

    fn form_cluster(&mut self, timeout: Duration) -> Result<()> {
        let mut cmd = self.command(0, &self.cli_bin);
        cmd.args(["--cluster", "create"]).args(self.seeds()).args([
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ]);
        run(&mut cmd)?;
        self.wait_formed(timeout)
    }

    /// Waits until the cluster is whole: every node says `cluster_state:ok` and sees all
    /// nodes connected, each primary has exactly one replica whose replication link is
    /// up, and no replica is on its primary's host. If a replica is on its primary's host
    /// and every host has one primary, the replicas are re-pointed once
    /// (`CLUSTER REPLICATE`: host `h`'s replica follows host `h+1`'s primary). Needs every
    /// node alive (not after [`Fleet::kill9`]). Roles are refreshed.
    pub fn wait_formed(&mut self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        let mut repointed = false;
        loop {
            let state = self.formed();
            match state {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => {}
            }
            if !repointed && self.placement_fixable() {
                self.repoint_replicas()?;
                repointed = true;
            }
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    what: format!("the cluster to form ({})", self.dir.path().display()),
                    secs: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.refresh()?;
        let bad = self.replica_placement_violations();
        if !bad.is_empty() {
            return Err(Error::Parse {
                what: "replica placement".into(),
                detail: bad.join("; "),
            });
        }
        Ok(())
    }

    /// Whether every node says `cluster_state:ok`, knows all nodes connected, sees each
    /// primary with exactly one replica placed on another host, and every replica's link
    /// is up.
    fn formed(&mut self) -> Result<bool> {
        let n = self.nodes.len();
        for i in 0..n {
            let info = parse_info(&self.node_cli(i, &["CLUSTER", "INFO"])?);
            if info.get("cluster_state").map(String::as_str) != Some("ok") {
                return Ok(false);
            }
            let lines = parse_cluster_nodes(&self.node_cli(i, &["CLUSTER", "NODES"])?)?;
            if lines.len() != n
                || lines
                    .iter()
                    .any(|l| l.link != "connected" || l.failed(true))
            {
                return Ok(false);
            }
            let primaries: Vec<_> = lines.iter().filter(|l| l.is_primary()).collect();
            if primaries.len() != n / 2 {
                return Ok(false);
            }
            for p in primaries {
                if lines
                    .iter()
                    .filter(|l| l.primary.as_ref() == Some(&p.id))
                    .count()
                    != 1
                {
                    return Ok(false);
                }
            }
        }
        self.refresh()?;
        if !self.replica_placement_violations().is_empty() {
            return Ok(false);
        }
        for i in 0..n {
            if matches!(self.nodes[i].role, Role::Replica(_)) {
                let info = parse_info(&self.node_cli(i, &["INFO", "replication"])?);
                if info.get("master_link_status").map(String::as_str) != Some("up") {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// One primary per host and some replica next to its primary: re-pointing helps.
    fn placement_fixable(&mut self) -> bool {
        if self.refresh().is_err() || self.replica_placement_violations().is_empty() {
            return false;
        }
        (0..self.hosts.len()).all(|h| {
            self.nodes
                .iter()
                .filter(|n| n.host == h && n.role == Role::Primary)
                .count()
                == 1
        })
    }

    /// `CLUSTER REPLICATE`: host `h`'s replica follows host `h+1`'s primary.
    fn repoint_replicas(&mut self) -> Result<()> {
        let nh = self.hosts.len();
        for h in 0..nh {
            let next = (h + 1) % nh;
            let primary = self
                .nodes
                .iter()
                .find(|n| n.host == next && n.role == Role::Primary)
                .map(|n| n.id.clone());
            let replica = self
                .nodes
                .iter()
                .position(|n| n.host == h && n.role != Role::Primary);
            if let (Some(p), Some(r)) = (primary, replica) {
                if self.nodes[r].role != Role::Replica(p.clone()) {
                    eprintln!(
                        "tmem-itest fleet: re-pointing replica {} to host {next}'s primary",
                        self.nodes[r].addr
                    );
                    self.node_cli(r, &["CLUSTER", "REPLICATE", &p])?;
                }
            }
        }
        Ok(())
    }

    /// Replicas on the same host as their primary, as messages (empty: placement good).
    pub fn replica_placement_violations(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for n in &self.nodes {
            if let Role::Replica(pid) = &n.role {
                match self.nodes.iter().find(|p| &p.id == pid) {
                    Some(p) if p.host == n.host => bad.push(format!(
                        "replica {} is on host {} with its primary {}",
                        n.addr, n.host, p.addr
                    )),
                    Some(_) => {}
                    None => bad.push(format!("replica {} follows unknown node {pid}", n.addr)),
                }
            }
        }
        bad
    }

    /// Re-reads roles from `CLUSTER NODES` of the first live node that answers.
    pub fn refresh(&mut self) -> Result<()> {
        let lines = self.cluster_nodes()?;
        for n in &mut self.nodes {
            if let Some(l) = lines.iter().find(|l| l.id == n.id) {
                n.role = match &l.primary {
                    Some(p) => Role::Replica(p.clone()),
                    None => Role::Primary,
                };
                n.slots = l.slots.clone();
            }
        }
        Ok(())
    }

    /// `CLUSTER NODES` of the first live node that answers, parsed.
    pub fn cluster_nodes(&self) -> Result<Vec<ClusterNodeLine>> {
        let mut last = None;
        for i in self.live() {
            match self.node_cli(i, &["CLUSTER", "NODES"]) {
                Ok(t) => return parse_cluster_nodes(&t),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Parse {
            what: "CLUSTER NODES".into(),
            detail: "no live node".into(),
        }))
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].child.is_some())
    }

    /// The host namespaces' names, by host index.
    pub fn namespaces(&self) -> &[String] {
        &self.hosts
    }

    /// The switch namespace (holding the bridge).
    pub fn switch_namespace(&self) -> &str {
        &self.switch_ns
    }

    /// Number of hosts.
    pub fn n_hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Host `host`'s IP address.
    ///
    /// # Panics
    /// If `host` is out of range.
    pub fn host_ip(&self, host: usize) -> Ipv4Addr {
        self.ips[host]
    }

    /// What became of the link delay option.
    pub fn shaping(&self) -> &Shaping {
        &self.shaping
    }

    /// The run directory (per-node directories with `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// All Redis nodes, with roles as last seen ([`Fleet::refresh`]).
    pub fn redis_nodes(&self) -> Vec<RedisNode> {
        (0..self.nodes.len()).map(|i| self.node(i)).collect()
    }

    fn node(&self, i: usize) -> RedisNode {
        let n = &self.nodes[i];
        RedisNode {
            addr: n.addr,
            host: n.host,
            id: n.id.clone(),
            role: n.role.clone(),
            pid: n.pid,
            alive: n.child.is_some(),
            slots: n.slots.clone(),
        }
    }

    fn index_of(&self, node: &RedisNode) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.addr == node.addr)
            .ok_or_else(|| Error::Parse {
                what: "redis node".into(),
                detail: format!("{} is not in this fleet", node.addr),
            })
    }

    /// Every node's address as `ip:port` (cluster seeds).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    /// A command `ip netns exec NS program` running in host `host`'s namespace; add
    /// arguments, environment and stdio to it. `ip netns exec` execs `program`, so the
    /// spawned child's PID is the program's.
    ///
    /// # Panics
    /// If `host` is out of range.
    pub fn command(&self, host: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(&self.ip_bin);
        c.args(["netns", "exec", &self.hosts[host]]).arg(program);
        c
    }

    /// `cmd` (program, arguments, environment, working directory; not its stdio) moved
    /// into host `host`'s namespace.
    fn wrap(&self, host: usize, cmd: &Command) -> Command {
        let mut c = self.command(host, cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Runs `cmd` inside host `host`'s namespace to completion (stdin null, output
    /// captured); a non-zero exit is an error with its stderr.
    pub fn exec(&self, host: usize, cmd: &mut Command) -> Result<Output> {
        run(&mut self.wrap(host, cmd))
    }

    /// Spawns `cmd` inside host `host`'s namespace (stdin null, stdout and stderr
    /// inherited; use [`Fleet::command`] to choose stdio). The caller owns the child and
    /// must kill it: the fleet's drop does not.
    pub fn spawn_in(&self, host: usize, cmd: Command) -> Result<Child> {
        let mut c = self.wrap(host, &cmd);
        c.stdin(Stdio::null())
            .spawn()
            .map_err(io_err(format!("spawning {cmd:?} in {}", self.hosts[host])))
    }

    /// `redis-cli ARGS…` (raw output) inside host `host`'s namespace; returns its stdout.
    /// Note that redis-cli exits 0 on an error reply (e.g. `ERR …` or `CLUSTERDOWN …`):
    /// only failures to connect and the like are errors here.
    pub fn redis_cli(&self, host: usize, args: &[&str]) -> Result<String> {
        let mut c = self.command(host, &self.cli_bin);
        c.args(args);
        let out = run(&mut c)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `redis-cli -h IP -p PORT ARGS…` against one node (from its own host); an error
    /// reply is an error too.
    fn node_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let n = &self.nodes[i];
        let (ip, port) = (n.addr.ip().to_string(), n.addr.port().to_string());
        let mut full = vec!["-h", ip.as_str(), "-p", port.as_str()];
        full.extend_from_slice(args);
        let out = self.redis_cli(n.host, &full)?;
        if is_error_reply(&out) {
            return Err(Error::Command {
                cmd: format!("redis-cli -h {ip} -p {port} {}", args.join(" ")),
                status: "error reply".into(),
                stderr: out.trim().to_string(),
            });
        }
        Ok(out)
    }

    /// Runs a command against one node (no cluster redirection); an error reply is an
    /// error.
    pub fn node_cmd(&self, node: &RedisNode, args: &[&str]) -> Result<String> {
        self.node_cli(self.index_of(node)?, args)
    }

    /// The primary serving `key` now (`CLUSTER KEYSLOT` + `CLUSTER NODES`, from a live
    /// node), with roles refreshed.
    pub fn primary_for_key(&mut self, key: &str) -> Result<RedisNode> {
        let i = self.live().next().ok_or_else(|| Error::Parse {
            what: "primary for key".into(),
            detail: "no live node".into(),
        })?;
        let slot = self.node_cli(i, &["CLUSTER", "KEYSLOT", key])?;
        let slot: u16 = slot.trim().parse().map_err(|_| Error::Parse {
            what: "CLUSTER KEYSLOT".into(),
            detail: slot.clone(),
        })?;
        self.refresh()?;
        let lines = self.cluster_nodes()?;
        let owner = lines
            .iter()
            .find(|l| l.is_primary() && !l.failed(false) && l.serves(slot))
            .ok_or_else(|| Error::Parse {
                what: "CLUSTER NODES".into(),
                detail: format!("no primary serves slot {slot}"),
            })?;
        let idx = self
            .nodes
            .iter()
            .position(|n| n.id == owner.id)
            .ok_or_else(|| Error::Parse {
                what: "CLUSTER NODES".into(),
                detail: format!("slot {slot}'s owner {} is not ours", owner.addr),
            })?;
        Ok(self.node(idx))
    }

    /// SIGKILLs a node's redis-server (by its PID) and reaps it. Idempotent.
    pub fn kill9(&mut self, node: &RedisNode) -> Result<()> {
        let i = self.index_of(node)?;
        if let Some(mut c) = self.nodes[i].child.take() {
            // Child::kill sends SIGKILL to this (unreaped) child's PID.
            let _ = c.kill();
            c.wait()
                .map_err(io_err(format!("reaping redis-server {}", node.addr)))?;
        }
        Ok(())
    }

    /// Waits until, in the view of every surviving node, `killed` is flagged `fail`, one
    /// live primary serves all the slots `killed` served (`killed.slots`: pass the node
    /// as seen before [`Fleet::kill9`], e.g. from [`Fleet::primary_for_key`]) and
    /// `cluster_state:ok`. Returns the new primary. Roles are refreshed.
    pub fn wait_failover(&mut self, killed: &RedisNode, timeout: Duration) -> Result<RedisNode> {
        let start = Instant::now();
        let end = start + timeout;
        let mut last = String::from("nothing checked yet");
        let slots = killed.slots.clone();
        if slots.is_empty() {
            return Err(Error::Parse {
                what: "failover".into(),
                detail: format!("{} served no slots (not a primary?)", killed.addr),
            });
        }
        loop {
            match self.failover_done(killed, &slots) {
                Ok(Some(new_id)) => {
                    self.refresh()?;
                    let i = self
                        .nodes
                        .iter()
                        .position(|n| n.id == new_id)
                        .ok_or_else(|| Error::Parse {
                            what: "failover".into(),
                            detail: format!("new primary {new_id} is not ours"),
                        })?;
                    return Ok(self.node(i));
                }
                Ok(None) => {}
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    what: format!("failover of {} (last error: {last})", killed.addr),
                    secs: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `Some(new primary's id)` once every survivor agrees the failover is complete.
    fn failover_done(&self, killed: &RedisNode, slots: &[(u16, u16)]) -> Result<Option<String>> {
        let mut owner: Option<String> = None;
        for i in self.live() {
            if self.nodes[i].addr == killed.addr {
                continue;
            }
            let info = parse_info(&self.node_cli(i, &["CLUSTER", "INFO"])?);
            if info.get("cluster_state").map(String::as_str) != Some("ok") {
                return Ok(None);
            }
            let lines = parse_cluster_nodes(&self.node_cli(i, &["CLUSTER", "NODES"])?)?;
            if !lines.iter().any(|l| l.id == killed.id && l.failed(false)) {
                return Ok(None);
            }
            for &(a, _) in slots {
                let o = lines.iter().find(|l| {
                    l.id != killed.id && l.is_primary() && !l.failed(true) && l.serves(a)
                });
                let Some(o) = o else { return Ok(None) };
                if !slots.iter().all(|&(a, b)| (a..=b).all(|s| o.serves(s))) {
                    return Ok(None);
                }
                match &owner {
                    Some(id) if id != &o.id => return Ok(None),
                    _ => owner = Some(o.id.clone()),
                }
            }
        }
        Ok(owner)
    }

    /// `CONFIG SET maxmemory BYTES` on one node.
    pub fn set_maxmemory(&self, node: &RedisNode, bytes: u64) -> Result<()> {
        self.node_cmd(node, &["CONFIG", "SET", "maxmemory", &bytes.to_string()])?;
        Ok(())
    }

    /// `CONFIG GET PARAM` on one node: the value.
    pub fn config_get(&self, node: &RedisNode, param: &str) -> Result<String> {
        let out = self.node_cmd(node, &["CONFIG", "GET", param])?;
        let mut lines = out.lines();
        match (lines.next(), lines.next()) {
            (Some(k), Some(v)) if k.eq_ignore_ascii_case(param) => Ok(v.to_string()),
            _ => Err(Error::Parse {
                what: format!("CONFIG GET {param} on {}", node.addr),
                detail: out,
            }),
        }
    }

    /// Prints the tail of every node's log to stderr and keeps the run directory.
    fn dump_logs(&mut self) {
        for n in &self.nodes {
            eprintln!(
                "tmem-itest fleet: {} (host {}) log {}:\n{}",
                n.addr,
                n.host,
                n.log.display(),
                log_tail(&n.log, 20)
            );
        }
        self.dir.keep();
    }
}

fn log_tail(p: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for ns in self.created_ns.iter().rev() {
            if let Err(e) = run(Command::new(&self.ip_bin).args(["netns", "del", ns])) {
                eprintln!("tmem-itest fleet: deleting namespace {ns}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_parse() {
        let t = "\
07c3 10.1.2.1:6379@16379 myself,master - 0 0 1 connected 0-5460
e7d1 10.1.2.2:6380@16380,h slave 07c3 0 1426238317239 4 connected
292f 10.1.2.3:6379@16379 master,fail - 1 1 3 disconnected 5461 5463-10922 [5462->-e7d1]
";
        let l = parse_cluster_nodes(t).unwrap();
        assert_eq!(l.len(), 3);
        assert!(l[0].is_primary() && l[0].serves(5460) && !l[0].serves(5461));
        assert_eq!(l[1].addr, "10.1.2.2:6380");
        assert_eq!(l[1].primary.as_deref(), Some("07c3"));
        assert!(!l[1].is_primary());
        assert!(l[2].failed(false) && l[2].link == "disconnected");
        assert_eq!(l[2].slots, [(5461, 5461), (5463, 10922)]);
        assert!(parse_cluster_nodes("a b c").is_err());
        assert!(parse_cluster_nodes("a b c d e f g h x-y").is_err());
    }

    #[test]
    fn info_and_errors() {
        let i = parse_info("# Cluster\r\ncluster_state:ok\r\ncluster_size:3\r\n");
        assert_eq!(i["cluster_state"], "ok");
        assert_eq!(i["cluster_size"], "3");
        assert!(is_error_reply("ERR unknown command 'FOO'\n"));
        assert!(is_error_reply("CLUSTERDOWN The cluster is down\n"));
        assert!(!is_error_reply("PONG\n"));
        assert!(!is_error_reply("OK\n"));
        assert!(!is_error_reply("ERR\n"));
    }

    #[test]
    fn too_few_hosts() {
        let e = Fleet::start(2, FleetOptions::default()).unwrap_err();
        assert!(e.to_string().contains("fleet size"), "{e}");
    }

    #[test]
    fn names_fit() {
        let (p, [x, _]) = naming(4_194_304, 3);
        assert_eq!(p, "tmf4194304x3");
        assert!((100..200).contains(&x));
        // Interface names (`tf<pid>…`, in the fleet's own namespaces): at most 15 bytes.
        assert!("tf4194304e249".len() <= 15);
        assert_ne!(naming(1000, 0).1, naming(1001, 0).1);
    }
}
