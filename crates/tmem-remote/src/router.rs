//! Routing to the server that owns a key, and a small pool of plain connections per server.
//!
//! The tier does its own slot routing (slot map from `CLUSTER SLOTS`, slot of a key from
//! CRC16 of its hash tag) over plain `redis::Connection`s, one per round trip, so that:
//! * a batch for one server is one pipelined round trip whose time is bounded by a deadline
//!   (the read timeout is re-armed with the time left before each reply);
//! * `SET` and the `WAIT` that must count it travel in one pipeline on one connection to the
//!   primary that owns the key's slot — `WAIT` then counts exactly that `SET`;
//! * a connection that saw any error (I/O, timeout, unparsable reply) is dropped, never
//!   reused in an unknown state.

use crate::config::{split_addr, Mode};
use parking_lot::{Mutex, RwLock};
use redis::{Connection, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;

/// A round trip that failed below the Redis protocol level.
#[derive(Debug)]
pub(crate) enum Fail {
    /// Could not connect, or the connection broke, or the reply was not valid RESP.
    Conn(String),
    /// The deadline passed before all replies arrived.
    Timeout,
}

impl Fail {
    fn from_redis(e: &redis::RedisError) -> Self {
        if e.is_timeout() {
            Fail::Timeout
        } else {
            Fail::Conn(e.to_string())
        }
    }
}

/// Which primary owns each slot.
struct Topology {
    /// Primary addresses (`host:port`).
    addrs: Vec<String>,
    /// Per slot: index into `addrs` + 1, or 0 when no primary is known.
    owner: Vec<u16>,
}

/// Routing plus connection pool.
pub(crate) struct Router {
    mode: Mode,
    seeds: Vec<String>,
    topo: RwLock<Topology>,
    idle: Mutex<HashMap<String, Vec<Connection>>>,
    max_idle: usize,
}

fn redis_url(addr: &str) -> Option<String> {
    let (host, port) = split_addr(addr)?;
    if host.contains(':') {
        Some(format!("redis://[{host}]:{port}/"))
    } else {
        Some(format!("redis://{host}:{port}/"))
    }
}

/// A fresh connection to `addr`, set up within `timeout`.
pub(crate) fn open(addr: &str, timeout: Duration) -> Result<Connection, Fail> {
    use redis::IntoConnectionInfo;
    let url = redis_url(addr).ok_or_else(|| Fail::Conn(format!("bad address {addr:?}")))?;
    let info = url
        .into_connection_info()
        .map_err(|e| Fail::Conn(e.to_string()))?;
    // No `CLIENT SETINFO` handshake: with RESP2, no password and db 0, connecting is just
    // the TCP connect, so `timeout` bounds it exactly.
    let redis_info = info.redis_settings().clone().set_skip_set_lib_name();
    let info = info.set_redis_settings(redis_info);
    let client = redis::Client::open(info).map_err(|e| Fail::Conn(e.to_string()))?;
    client
        .get_connection_with_timeout(timeout.max(Duration::from_millis(1)))
        .map_err(|e| Fail::from_redis(&e))
}

/// Sends `packed` (`count` commands) on `con` and reads `count` replies before `deadline`.
/// Error replies come back as `Value::ServerError`; anything else that fails is a [`Fail`].
pub(crate) fn exchange(
    con: &mut Connection,
    packed: &[u8],
    count: usize,
    deadline: Instant,
) -> Result<Vec<Value>, Fail> {
    let left = |d: Instant| {
        d.checked_duration_since(Instant::now())
            .filter(|t| !t.is_zero())
            .ok_or(Fail::Timeout)
    };
    con.set_write_timeout(Some(left(deadline)?))
        .map_err(|e| Fail::from_redis(&e))?;
    con.send_packed_command(packed)
        .map_err(|e| Fail::from_redis(&e))?;
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        con.set_read_timeout(Some(left(deadline)?))
            .map_err(|e| Fail::from_redis(&e))?;
        match con.recv_response() {
            // RESP3 push messages are not replies (RESP2 is used, but be safe).
            Ok(Value::Push { .. }) => {}
            Ok(v) => out.push(v),
            Err(e) => return Err(Fail::from_redis(&e)),
        }
    }
    Ok(out)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// Parses a `CLUSTER SLOTS` reply; `queried_host` replaces an empty node IP.
fn parse_cluster_slots(v: &Value, queried_host: &str) -> Option<Topology> {
    let Value::Array(ranges) = v else {
        return None;
    };
    let mut addrs: Vec<String> = Vec::new();
    let mut owner = vec![0u16; SLOTS];
    for r in ranges {
        let Value::Array(f) = r else { return None };
        let start = usize::try_from(int(f.first()?)?).ok()?;
        let end = usize::try_from(int(f.get(1)?)?).ok()?;
        let Value::Array(node) = f.get(2)? else {
            return None;
        };
        let mut ip = text(node.first()?)?;
        let port = int(node.get(1)?)?;
        if ip.is_empty() || ip == "?" {
            ip = queried_host.to_string();
        }
        let addr = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        if start > end || end >= SLOTS {
            return None;
        }
        let idx = match addrs.iter().position(|a| *a == addr) {
            Some(i) => i,
            None => {
                addrs.push(addr);
                addrs.len() - 1
            }
        };
        let tag = u16::try_from(idx + 1).ok()?;
        owner[start..=end].iter_mut().for_each(|o| *o = tag);
    }
    Some(Topology { addrs, owner })
}

impl Router {
    pub(crate) fn new(mode: Mode, seeds: Vec<String>, max_idle: usize) -> Self {
        Self {
            mode,
            seeds,
            topo: RwLock::new(Topology {
                addrs: Vec::new(),
                owner: vec![0; SLOTS],
            }),
            idle: Mutex::new(HashMap::new()),
            max_idle,
        }
    }

    /// The server that owns `slot`, if known.
    pub(crate) fn addr_for_slot(&self, slot: u16) -> Option<String> {
        match self.mode {
            Mode::Single => self.seeds.first().cloned(),
            Mode::Cluster => {
                let t = self.topo.read();
                let o = *t.owner.get(usize::from(slot))?;
                t.addrs.get(usize::from(o).checked_sub(1)?).cloned()
            }
        }
    }

    /// Every primary (the one server in single mode).
    pub(crate) fn primaries(&self) -> Vec<String> {
        match self.mode {
            Mode::Single => self.seeds.iter().take(1).cloned().collect(),
            Mode::Cluster => self.topo.read().addrs.clone(),
        }
    }

    /// Whether every slot has a known primary (always true in single mode).
    pub(crate) fn covered(&self) -> bool {
        match self.mode {
            Mode::Single => true,
            Mode::Cluster => self.topo.read().owner.iter().all(|&o| o != 0),
        }
    }

    /// Relearns the slot map from the known primaries or the seeds (cluster mode), each
    /// try bounded by `timeout`.
    pub(crate) fn refresh(&self, timeout: Duration) -> Result<(), String> {
        if self.mode == Mode::Single {
            return Ok(());
        }
        let mut candidates = self.primaries();
        for s in &self.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let mut last = String::from("no nodes");
        let packed = redis::cmd("CLUSTER").arg("SLOTS").get_packed_command();
        for addr in candidates {
            let host = split_addr(&addr).map(|(h, _)| h).unwrap_or_default();
            let reply = self.round_trip(&addr, &packed, 1, timeout);
            match reply.as_ref().map(|v| v.first()) {
                Ok(Some(v)) => match parse_cluster_slots(v, &host) {
                    Some(t) if !t.addrs.is_empty() => {
                        self.drop_idle_except(&t.addrs);
                        *self.topo.write() = t;
                        return Ok(());
                    }
                    _ => last = format!("{addr}: unusable CLUSTER SLOTS reply"),
                },
                Ok(None) => last = format!("{addr}: no reply"),
                Err(Fail::Conn(e)) => last = format!("{addr}: {e}"),
                Err(Fail::Timeout) => last = format!("{addr}: timed out"),
            }
        }
        Err(last)
    }

    fn drop_idle_except(&self, keep: &[String]) {
        self.idle.lock().retain(|a, _| keep.contains(a));
    }

    /// One pipelined round trip of `count` commands to `addr`, within `timeout` (connecting
    /// included when no idle connection is at hand).
    pub(crate) fn round_trip(
        &self,
        addr: &str,
        packed: &[u8],
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>, Fail> {
        let deadline = Instant::now() + timeout;
        let pooled = self.idle.lock().get_mut(addr).and_then(|v| v.pop());
        let mut con = match pooled {
            Some(c) => c,
            None => open(addr, timeout)?,
        };
        let out = exchange(&mut con, packed, count, deadline)?;
        let mut idle = self.idle.lock();
        let v = idle.entry(addr.to_string()).or_default();
        if v.len() < self.max_idle {
            v.push(con);
        }
        Ok(out)
    }

    /// Drops every idle connection (after a failure, so that the next try reconnects).
    pub(crate) fn drop_idle(&self, addr: &str) {
        self.idle.lock().remove(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_cluster_slots() {
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id1")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id4")]),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                Value::Array(vec![bulk(""), Value::Int(7001), bulk("id2")]),
            ]),
        ]);
        let t = parse_cluster_slots(&v, "10.0.0.1").unwrap();
        assert_eq!(t.addrs, vec!["127.0.0.1:7000", "10.0.0.1:7001"]);
        assert_eq!(t.owner[0], 1);
        assert_eq!(t.owner[8191], 1);
        assert_eq!(t.owner[8192], 2);
        assert_eq!(t.owner[16383], 2);
        assert!(parse_cluster_slots(&Value::Int(1), "h").is_none());
        let bad = Value::Array(vec![Value::Array(vec![Value::Int(5), Value::Int(99999)])]);
        assert!(parse_cluster_slots(&bad, "h").is_none());
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(5),
            Value::Int(99999),
            Value::Array(vec![bulk("h"), Value::Int(1)]),
        ])]);
        assert!(parse_cluster_slots(&bad, "h").is_none());
    }
}
