//! The configuration of the remote tier.

use serde::{Deserialize, Serialize};
use tmem_exports::remote::RemoteError;

/// How the tier reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A Redis Cluster; `nodes` are seeds from which the slot map is learned.
    #[default]
    Cluster,
    /// One Redis server (the first of `nodes`).
    Single,
}

/// The configuration of a [`crate::RedisTier`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// `cluster` (a Redis Cluster) or `single` (one Redis server). Default: `cluster`.
    pub mode: Mode,
    /// `host:port` of the servers: the cluster's seed nodes, or the one server. Default: none
    /// (must be set).
    pub nodes: Vec<String>,
    /// First component of every key, `[A-Za-z0-9_.-]`. Default: `tmem`.
    pub key_prefix: String,
    /// This host's name, part of every key so that hosts sharing the servers never collide,
    /// `[A-Za-z0-9_.-]`. Default: the kernel's host name (or `host` if unknown).
    pub node_name: String,
    /// Replicas that must acknowledge a durable put (`WAIT numreplicas`). Default: 1.
    pub replicas: u32,
    /// `WAIT` timeout of a durable put, in milliseconds. Default: 500.
    pub wait_timeout_ms: u64,
    /// Timeout of an ephemeral operation (a fetch, a writer batch), in milliseconds.
    /// Default: 50.
    pub op_timeout_ms: u64,
    /// How long a durable get keeps retrying (redirections, a failover), in milliseconds
    /// (a durable put makes one attempt). Default: 10000.
    pub durable_timeout_ms: u64,
    /// Time to live of an ephemeral copy, in seconds. Ephemeral keys have a TTL and durable
    /// keys have none, so under `maxmemory-policy volatile-lru` Redis evicts only ephemeral
    /// copies. Default: 3600.
    pub ephemeral_ttl_s: u64,
    /// Compress pages with LZ4 when it pays. Default: true.
    pub compress: bool,
    /// Bound of the demotion queue, in pages; demotions beyond it are dropped. Default: 4096.
    pub queue_pages: usize,
    /// Pages per pipelined batch of the background writer. Default: 64.
    pub batch_pages: usize,
    /// Idle connections kept per server (an NBD connection overlaps up to 4 reads of pages
    /// in the tier, spread over the primaries). Default: 8.
    pub connections: usize,
    /// First retry delay of the circuit breaker after the tier went down, in milliseconds;
    /// doubled after each failed probe up to `backoff_max_ms`. Default: 200.
    pub backoff_ms: u64,
    /// Longest retry delay of the circuit breaker, in milliseconds. Default: 10000.
    pub backoff_max_ms: u64,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| valid_name(s))
        .unwrap_or_else(|| "host".to_string())
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Cluster,
            nodes: Vec::new(),
            key_prefix: "tmem".to_string(),
            node_name: default_node_name(),
            replicas: 1,
            wait_timeout_ms: 500,
            op_timeout_ms: 50,
            durable_timeout_ms: 10_000,
            ephemeral_ttl_s: 3600,
            compress: true,
            queue_pages: 4096,
            batch_pages: 64,
            connections: 8,
            backoff_ms: 200,
            backoff_max_ms: 10_000,
        }
    }
}

/// Whether `s` is a valid key prefix or node name: non-empty, at most 64 bytes of
/// `[A-Za-z0-9_.-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn invalid(msg: String) -> RemoteError {
    RemoteError::Protocol(format!("invalid remote tier configuration: {msg}"))
}

impl RemoteConfig {
    /// Checks the configuration; the error says what is wrong.
    pub fn validate(&self) -> Result<(), RemoteError> {
        if self.nodes.is_empty() {
            return Err(invalid("no nodes".into()));
        }
        for n in &self.nodes {
            if split_addr(n).is_none() {
                return Err(invalid(format!("node {n:?} is not host:port")));
            }
        }
        if !valid_name(&self.key_prefix) {
            return Err(invalid(format!(
                "key_prefix {:?} must be 1-64 of [A-Za-z0-9_.-]",
                self.key_prefix
            )));
        }
        if !valid_name(&self.node_name) {
            return Err(invalid(format!(
                "node_name {:?} must be 1-64 of [A-Za-z0-9_.-]",
                self.node_name
            )));
        }
        let positive = [
            ("wait_timeout_ms", self.wait_timeout_ms),
            ("op_timeout_ms", self.op_timeout_ms),
            ("durable_timeout_ms", self.durable_timeout_ms),
            ("ephemeral_ttl_s", self.ephemeral_ttl_s),
            ("queue_pages", self.queue_pages as u64),
            ("batch_pages", self.batch_pages as u64),
            ("connections", self.connections as u64),
            ("backoff_ms", self.backoff_ms),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        if self.backoff_max_ms < self.backoff_ms {
            return Err(invalid("backoff_max_ms is below backoff_ms".into()));
        }
        Ok(())
    }
}

/// Splits `host:port` (the host may be a bracketed IPv6 address).
pub(crate) fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port != 0).then(|| (host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_serde() {
        let c: RemoteConfig = serde_json::from_str(
            r#"{"mode":"single","nodes":["127.0.0.1:6379"],"node_name":"h1"}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Single);
        assert_eq!(c.key_prefix, "tmem");
        assert_eq!(c.replicas, 1);
        assert_eq!(c.wait_timeout_ms, 500);
        assert_eq!(c.op_timeout_ms, 50);
        assert_eq!(c.durable_timeout_ms, 10_000);
        assert_eq!(c.ephemeral_ttl_s, 3600);
        assert!(c.compress);
        assert_eq!(c.queue_pages, 4096);
        assert_eq!(c.batch_pages, 64);
        assert_eq!(c.connections, 8);
        assert_eq!((c.backoff_ms, c.backoff_max_ms), (200, 10_000));
        c.validate().unwrap();
        let back: RemoteConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<RemoteConfig>(r#"{"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<RemoteConfig>(r#"{"mode":"ring"}"#).is_err());
    }

    #[test]
    fn validation() {
        let ok = RemoteConfig {
            nodes: vec!["[::1]:7000".into(), "a.b:1".into()],
            node_name: "h".into(),
            ..RemoteConfig::default()
        };
        ok.validate().unwrap();
        for bad in [
            RemoteConfig {
                nodes: vec![],
                ..ok.clone()
            },
            RemoteConfig {
                nodes: vec!["nohost".into()],
                ..ok.clone()
            },
            RemoteConfig {
                nodes: vec!["h:0".into()],
                ..ok.clone()
            },
            RemoteConfig {
                node_name: "a{b}".into(),
                ..ok.clone()
            },
            RemoteConfig {
                node_name: String::new(),
                ..ok.clone()
            },
            RemoteConfig {
                key_prefix: "x:y".into(),
                ..ok.clone()
            },
            RemoteConfig {
                op_timeout_ms: 0,
                ..ok.clone()
            },
            RemoteConfig {
                backoff_max_ms: 10,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
