//! Test helpers (cargo feature `testing`): `redis-server` processes and a Redis Cluster on
//! loopback, each in its own temporary directory, killed (only those PIDs) when dropped.
//! Used by this crate's tests and by `tmem-itest`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a helper failed.
pub type Error = String;

/// A free loopback TCP port whose cluster bus port (`port + 10000`) is free too.
pub fn free_port() -> Result<u16, Error> {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port pair".into())
}

/// A plain connection to `addr` with `timeout` on connect, reads and writes.
pub fn connection(addr: &str, timeout: Duration) -> Result<redis::Connection, Error> {
    let c = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
    let con = c
        .get_connection_with_timeout(timeout)
        .map_err(|e| format!("{addr}: {e}"))?;
    con.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    con.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    Ok(con)
}

/// Runs one command on `addr` and converts the reply.
pub fn query<T: redis::FromRedisValue>(addr: &str, cmd: &redis::Cmd) -> Result<T, Error> {
    let mut con = connection(addr, Duration::from_secs(2))?;
    cmd.query(&mut con).map_err(|e| format!("{addr}: {e}"))
}

/// One `redis-server` process on `127.0.0.1`, stopped (SIGKILL) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// Its working directory.
    pub dir: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `binary` (`redis-server`) on a free port with no persistence and `extra`
    /// arguments (e.g. `["--maxmemory", "2mb"]`), and waits until it answers PING.
    pub fn start(binary: &Path, extra: &[&str]) -> Result<Self, Error> {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = tmp.path().to_path_buf();
        let port = free_port()?;
        Self::start_at(binary, port, tmp, dir, extra)
    }

    /// [`Self::start`] on a given `port`.
    pub fn start_on(binary: &Path, port: u16, extra: &[&str]) -> Result<Self, Error> {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = tmp.path().to_path_buf();
        Self::start_at(binary, port, tmp, dir, extra)
    }

    fn start_at(
        binary: &Path,
        port: u16,
        tmp: tempfile::TempDir,
        dir: PathBuf,
        extra: &[&str],
    ) -> Result<Self, Error> {
        let log = std::fs::File::create(dir.join("redis.log")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let s = Self {
            port,
            addr: format!("127.0.0.1:{port}"),
            dir,
            child: Some(child),
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = connection(&s.addr, Duration::from_millis(500)) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not answer PING", s.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id (None once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) -> Result<(), Error> {
        let pid = self.pid().ok_or("not running")?;
        let st = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .map_err(|e| e.to_string())?;
        st.success()
            .then_some(())
            .ok_or_else(|| format!("kill {sig} {pid} failed"))
    }

    /// SIGSTOP: the process freezes (its connections stay open).
    pub fn pause(&self) -> Result<(), Error> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) -> Result<(), Error> {
        self.signal("-CONT")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// `ip:port`.
    pub addr: String,
    /// Whether it is a primary.
    pub primary: bool,
    /// For a replica: its primary's id.
    pub primary_id: Option<String>,
    /// Whether it is flagged `fail` or `fail?`.
    pub failing: bool,
    /// Slot ranges it serves (primaries).
    pub slots: Vec<(u16, u16)>,
}

/// Parses `CLUSTER NODES` output.
pub fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let addr = f[1].split('@').next().unwrap_or("").to_string();
        let flags = f[2];
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|a| (a, a)),
            })
            .collect();
        out.push(NodeInfo {
            id: f[0].to_string(),
            addr,
            primary: flags.contains("master"),
            primary_id: (f[3] != "-").then(|| f[3].to_string()),
            failing: flags.contains("fail"),
            slots,
        });
    }
    out
}

/// A Redis Cluster of `primaries × (1 + replicas)` `redis-server`s on loopback.
#[derive(Debug)]
pub struct Cluster {
    /// The servers, in creation order.
    pub servers: Vec<RedisServer>,
}

impl Cluster {
    /// Starts the nodes (`--cluster-node-timeout 1000`), runs `redis-cli --cluster create`
    /// and waits for `cluster_state:ok` on every node.
    pub fn start(
        server_bin: &Path,
        cli_bin: &Path,
        primaries: usize,
        replicas: usize,
    ) -> Result<Self, Error> {
        let mut servers = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            let dir = tmp.path().to_path_buf();
            let port = free_port()?;
            let conf = dir.join(format!("nodes-{port}.conf"));
            let conf = conf.to_string_lossy().into_owned();
            servers.push(RedisServer::start_at(
                server_bin,
                port,
                tmp,
                dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "1000",
                ],
            )?);
        }
        let c = Cluster { servers };
        let out = Command::new(cli_bin)
            .arg("--cluster")
            .arg("create")
            .args(c.servers.iter().map(|s| s.addr.clone()))
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", cli_bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        c.wait_ok(Duration::from_secs(30))?;
        c.wait_replication(Duration::from_secs(30))?;
        Ok(c)
    }

    /// Waits until every live replica's link to its primary is up and every primary sees
    /// all its live replicas online (`cluster_state:ok` alone does not mean the initial
    /// sync is done, and `WAIT` counts only online replicas).
    pub fn wait_replication(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.nodes().is_ok_and(|nodes| {
                nodes.iter().filter(|n| !n.failing).all(|n| {
                    let Ok(info) = query::<String>(&n.addr, redis::cmd("INFO").arg("replication"))
                    else {
                        return false;
                    };
                    if n.primary {
                        let want = nodes
                            .iter()
                            .filter(|r| !r.failing && r.primary_id.as_deref() == Some(&n.id))
                            .count();
                        info.matches("state=online").count() == want
                    } else {
                        info.contains("master_link_status:up")
                    }
                })
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("replication did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// The live (not killed) servers.
    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.servers.iter().filter(|s| s.pid().is_some())
    }

    /// Waits until every live node says `cluster_state:ok` and all agree on 16384 served
    /// slots.
    pub fn wait_ok(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.live().all(|s| {
                query::<String>(&s.addr, redis::cmd("CLUSTER").arg("INFO"))
                    .map(|i| i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384"))
                    .unwrap_or(false)
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("cluster did not reach cluster_state:ok".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `CLUSTER NODES` as seen by the first live node.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, Error> {
        let s = self.live().next().ok_or("no live node")?;
        let text: String = query(&s.addr, redis::cmd("CLUSTER").arg("NODES"))?;
        Ok(parse_nodes(&text))
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn keyslot(&self, key: &str) -> Result<u16, Error> {
        let s = self.live().next().ok_or("no live node")?;
        query(&s.addr, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
    }

    /// The address of the (non-failing) primary serving `slot`.
    pub fn primary_of_slot(&self, slot: u16) -> Result<String, Error> {
        self.nodes()?
            .into_iter()
            .find(|n| {
                n.primary && !n.failing && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .map(|n| n.addr)
            .ok_or_else(|| format!("no primary serves slot {slot}"))
    }

    /// Addresses of the replicas of the primary at `addr`.
    pub fn replicas_of(&self, addr: &str) -> Result<Vec<String>, Error> {
        let nodes = self.nodes()?;
        let id = nodes
            .iter()
            .find(|n| n.addr == addr)
            .map(|n| n.id.clone())
            .ok_or_else(|| format!("{addr} is not a node"))?;
        Ok(nodes
            .into_iter()
            .filter(|n| n.primary_id.as_deref() == Some(id.as_str()))
            .map(|n| n.addr)
            .collect())
    }

    /// The server at `addr`.
    pub fn server(&mut self, addr: &str) -> Result<&mut RedisServer, Error> {
        self.servers
            .iter_mut()
            .find(|s| s.addr == addr)
            .ok_or_else(|| format!("{addr} is not a node"))
    }

    /// SIGKILLs the node at `addr`.
    pub fn kill(&mut self, addr: &str) -> Result<(), Error> {
        self.server(addr)?.kill();
        Ok(())
    }

    /// Waits until `slot` is served by a primary other than `dead` and the cluster is ok.
    pub fn wait_failover(&self, slot: u16, dead: &str, timeout: Duration) -> Result<String, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(p) = self.primary_of_slot(slot) {
                if p != dead && self.wait_ok(Duration::from_millis(1)).is_ok() {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("slot {slot} did not fail over from {dead}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let t = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                 b2 127.0.0.1:7003@17003 slave a1 0 1 1 connected\n\
                 c3 127.0.0.1:7001@17001 master,fail - 0 1 2 connected 5461 5462-10922 [5463->-x]\n";
        let n = parse_nodes(t);
        assert_eq!(n.len(), 3);
        assert!(n[0].primary && !n[0].failing);
        assert_eq!(n[0].slots, vec![(0, 5460)]);
        assert_eq!(n[1].primary_id.as_deref(), Some("a1"));
        assert!(!n[1].primary);
        assert!(n[2].failing);
        assert_eq!(n[2].slots, vec![(5461, 5461), (5462, 10922)]);
        assert_eq!(n[2].addr, "127.0.0.1:7001");
    }
}
