//! Lend control: how much memory one Redis node may use, and its eviction policy. Used by
//! the daemon's balloon loop to lend (or take back) host memory to the tier. Each call is one
//! plain connection to one node, bounded by `timeout`.

use crate::router::{exchange, open, Fail};
use redis::Value;
use std::time::{Duration, Instant};
use tmem_exports::remote::RemoteError;

/// The eviction policy the tier needs: evict only keys with a TTL (ephemeral copies).
pub const POLICY: &str = "volatile-lru";

fn one(addr: &str, cmd: &redis::Cmd, timeout: Duration) -> Result<Value, RemoteError> {
    let deadline = Instant::now() + timeout;
    let mut con = open(addr, timeout).map_err(|f| map_fail(addr, f))?;
    let mut r = exchange(&mut con, &cmd.get_packed_command(), 1, deadline)
        .map_err(|f| map_fail(addr, f))?;
    let v = r.pop().unwrap_or(Value::Nil);
    if let Value::ServerError(e) = &v {
        return Err(RemoteError::Refused(format!("{addr}: {e}")));
    }
    Ok(v)
}

fn map_fail(addr: &str, f: Fail) -> RemoteError {
    match f {
        Fail::Timeout => RemoteError::Timeout,
        Fail::Conn(e) => RemoteError::Unreachable(format!("{addr}: {e}")),
    }
}

fn config_set(addr: &str, name: &str, value: &str, timeout: Duration) -> Result<(), RemoteError> {
    match one(
        addr,
        redis::cmd("CONFIG").arg("SET").arg(name).arg(value),
        timeout,
    )? {
        Value::Okay => Ok(()),
        Value::SimpleString(s) if s == "OK" => Ok(()),
        other => Err(RemoteError::Protocol(format!(
            "{addr}: CONFIG SET {name}: unexpected reply {other:?}"
        ))),
    }
}

fn config_get(addr: &str, name: &str, timeout: Duration) -> Result<String, RemoteError> {
    let v = one(addr, redis::cmd("CONFIG").arg("GET").arg(name), timeout)?;
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let found = match &v {
        Value::Array(a) if a.len() == 2 => text(&a[1]),
        Value::Map(m) if m.len() == 1 => text(&m[0].1),
        _ => None,
    };
    found.ok_or_else(|| RemoteError::Protocol(format!("{addr}: CONFIG GET {name}: {v:?}")))
}

/// Sets `maxmemory` of the node at `addr` (`host:port`) to `bytes` (0 = no limit).
pub fn set_maxmemory(addr: &str, bytes: u64, timeout: Duration) -> Result<(), RemoteError> {
    config_set(addr, "maxmemory", &bytes.to_string(), timeout)
}

/// The `maxmemory` of the node at `addr`, in bytes (0 = no limit).
pub fn get_maxmemory(addr: &str, timeout: Duration) -> Result<u64, RemoteError> {
    let s = config_get(addr, "maxmemory", timeout)?;
    s.trim()
        .parse()
        .map_err(|_| RemoteError::Protocol(format!("{addr}: maxmemory {s:?} is not a number")))
}

/// Sets `maxmemory-policy` of the node at `addr` to [`POLICY`] (`volatile-lru`).
pub fn set_policy(addr: &str, timeout: Duration) -> Result<(), RemoteError> {
    config_set(addr, "maxmemory-policy", POLICY, timeout)
}

/// The `maxmemory-policy` of the node at `addr`.
pub fn get_policy(addr: &str, timeout: Duration) -> Result<String, RemoteError> {
    config_get(addr, "maxmemory-policy", timeout)
}
