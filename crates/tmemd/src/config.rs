//! Configuration: embedded defaults, an optional TOML file, and command-line flags (in
//! increasing priority).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tmem_api::Size;
use tmem_balloon::manager::ManagerConfig;
use tmem_core::{Codec, DedupScope};

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("Cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The config file is not valid TOML for our schema.
    #[error("Invalid config file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    /// A codec name is invalid.
    #[error("Invalid codec {0:?} (none, lz4, zstd or zstd:LEVEL with LEVEL 1..=19)")]
    Codec(String),
    /// A dedup scope name is invalid.
    #[error("Invalid dedup scope {0:?} (off, pool, client or global)")]
    Dedup(String),
    /// The budget fraction is out of range.
    #[error("Invalid budget fraction {0} (0 < fraction <= 1)")]
    Fraction(f64),
    /// A socket group or mode is invalid.
    #[error("Invalid socket setting")]
    Socket(#[source] crate::secure::SecureError),
    /// An NBD limit is out of range.
    #[error("Invalid {0}: {1} (must be at least {2})")]
    NbdLimit(&'static str, u64, u64),
    /// The `[remote]` table is unusable.
    #[error("Invalid [remote] settings")]
    Remote(#[source] tmem_exports::RemoteError),
    /// The `[lend]` table is unusable.
    #[error("Invalid [lend] settings: {0}")]
    Lend(String),
}

/// `[lend]`: this host lends memory to the remote tier through its own Redis node, whose
/// `maxmemory` tmemd moves as the host's own guests need memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LendConfig {
    /// The local Redis node (`host:port`). Not set: no lending.
    pub node: String,
    /// Least memory lent (bytes or `"64M"`). Default 64 MiB.
    pub min: Size,
    /// Most memory lent. Default 1 GiB.
    pub max: Size,
    /// Host memory (MemAvailable) kept free for the host's own guests and the pool: the
    /// lent amount grows while more is available and shrinks while less is. Default 2 GiB.
    pub keep_free: Size,
    /// How often the lent amount is reconsidered, in milliseconds. Default 2000.
    pub interval_ms: u64,
}

impl Default for LendConfig {
    fn default() -> Self {
        LendConfig {
            node: String::new(),
            min: Size(64 << 20),
            max: Size(1 << 30),
            keep_free: Size(2 << 30),
            interval_ms: 2000,
        }
    }
}

impl LendConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Lend(m));
        match self.node.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
            _ => return bad(format!("node {:?} is not host:port", self.node)),
        }
        if self.min.0 > self.max.0 {
            return bad(format!("min {} is above max {}", self.min.0, self.max.0));
        }
        if self.interval_ms < 100 {
            return bad(format!("interval_ms {} is below 100", self.interval_ms));
        }
        Ok(())
    }
}

/// Who may connect to a socket: its group and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Group owning the socket (`None`: the daemon's).
    pub gid: Option<u32>,
    /// Permission bits.
    pub mode: u32,
}

impl SocketAccess {
    /// From a group name and an octal mode (defaults: 0600, or 0660 with a group).
    pub fn resolve(group: Option<&str>, mode: Option<&str>) -> Result<Self, ConfigError> {
        let gid = group
            .map(crate::secure::group_id)
            .transpose()
            .map_err(ConfigError::Socket)?;
        let mode = match mode {
            Some(m) => crate::secure::parse_mode(m).map_err(ConfigError::Socket)?,
            None if gid.is_some() => 0o660,
            None => 0o600,
        };
        Ok(SocketAccess { gid, mode })
    }
}

/// The configuration file (`--config FILE`), all keys optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Pool budget (bytes or `"2G"`). Default: `budget_fraction` of MemTotal.
    pub budget: Option<Size>,
    /// Fraction of MemTotal used as budget when `budget` is not set. Default 0.25.
    pub budget_fraction: Option<f64>,
    /// State directory: spill files and saved state. Default `/var/lib/tmem` (root). Given
    /// without `runtime_dir`, it also holds the sockets and the lock (one-directory layout).
    pub state_dir: Option<PathBuf>,
    /// Runtime directory: sockets and lock. Default `/run/tmem` (root).
    pub runtime_dir: Option<PathBuf>,
    /// Free space the spill files' filesystem keeps (bytes or `"64M"`; default 64 MiB): a
    /// swap export is only created if its whole size plus this fits, and a spill write that
    /// would leave less is refused with ENOSPC. 0 turns both checks off.
    pub spill_reserve: Option<Size>,
    /// Optional TCP listener for `GET /metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Optional NBD TCP listener.
    pub nbd_tcp: Option<SocketAddr>,
    /// Default codec of new exports: `none`, `lz4` (default), `zstd`, `zstd:LEVEL`.
    pub codec: Option<String>,
    /// Default dedup scope of new exports: `off`, `pool`, `client` (default), `global`.
    pub dedup: Option<String>,
    /// Balloon manager settings (`interval_ms`, `host_reserve`, `host_total`).
    pub balloon: Option<ManagerConfig>,
    /// The remote tier (other hosts' memory, on Redis): see docs/remote-tier.md. Off
    /// while `nodes` is empty.
    pub remote: Option<tmem_remote::RemoteConfig>,
    /// Lending this host's memory to the remote tier (its Redis node's `maxmemory`).
    pub lend: Option<LendConfig>,
    /// While the pool holds less than this fraction of its budget, pages are stored raw and
    /// compressed by a background thread (puts cost a copy, not a compression). 0 turns it
    /// off (the default: on 2 cores the compressor competes with the I/O path; with a spare
    /// core, e.g. 0.75, it cuts depth-1 write latency — see BENCHMARKS.md).
    pub defer_compression: Option<f64>,
    /// Compact the pool's slabs in the background when the memory compaction could give
    /// back exceeds this fraction of what the pool holds (and 4 MiB). Default 0.10; 0 turns
    /// background compaction off (shrinks, budget pressure and `POST /compact` still
    /// compact).
    pub compact_threshold: Option<f64>,
    /// Keep persistent pages (swap exports) in durable memory under the runtime directory,
    /// so that they survive the daemon's death (SIGKILL, OOM kill, panic). Default true.
    pub durable_pool: Option<bool>,
    /// Group that may connect to `nbd.sock` (e.g. libvirt's `libvirt-qemu` or `kvm`); the
    /// runtime directory then lets that group through (mode 0710). Default: none.
    pub nbd_socket_group: Option<String>,
    /// Mode of `nbd.sock` (octal). Default "0600", "0660" with `nbd_socket_group`.
    pub nbd_socket_mode: Option<String>,
    /// Group that may use `ctl.sock` (an admin group). Default: none (root only).
    pub ctl_socket_group: Option<String>,
    /// Mode of `ctl.sock` (octal). Default "0600", "0660" with `ctl_socket_group`.
    pub ctl_socket_mode: Option<String>,
    /// The tenants' TLS pre-shared keys (psktool/nbdkit format, `identity:hexkey` per line),
    /// re-read when it changes. Default `<state_dir>/tls/keys.psk`; `tmemctl export add
    /// --tenant` adds keys to it.
    pub nbd_psk_file: Option<PathBuf>,
    /// Serve NBD TCP clients that did not start TLS (they reach only exports without a
    /// tenant or credential list). Default false: on TCP, TLS is required.
    pub nbd_tcp_allow_plain: Option<bool>,
    /// NBD connections open at once (handshake and transmission). At the limit a new
    /// client closes the connection waiting longest in the handshake; only when all are in
    /// transmission is it refused. Default 1024.
    pub nbd_max_connections: Option<usize>,
    /// NBD connections in the handshake at once, from all peers; at the limit a new client
    /// closes the one longest in the handshake. Default 256.
    pub nbd_max_handshakes: Option<usize>,
    /// NBD connections in the handshake at once from one peer (TCP: client address, IPv6 by
    /// /64; Unix socket: the client's uid, root included); at the limit the peer's oldest
    /// handshake is closed. Default 64.
    pub nbd_max_handshakes_per_peer: Option<usize>,
    /// Budget for NBD request buffers above 256 KiB (WRITE payloads, READ replies), bytes
    /// or `"256M"`; at least 32 MiB + 4 KiB (one maximum-size request). A client whose
    /// request needs more waits. Default 256 MiB. The daemon's memory stays within its
    /// baseline + the pool budget + this limit + about 2 MiB per NBD connection in
    /// transmission (see `tmem_nbd::ServerConfig::buffer_limit`).
    pub nbd_buffer_limit: Option<Size>,
    /// Seconds an NBD connection holding request buffers may receive nothing, or a reply
    /// may wait for the client to read, before the connection is closed (an idle client
    /// holding nothing is never closed). Default 60.
    pub nbd_stall_timeout_secs: Option<u64>,
}

/// Command-line overrides (all optional; see `tmemd --help`).
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "tmemd",
    version,
    about = "tmem daemon: page pool, NBD exports, control API"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Pool budget (e.g. 2G, 512M, 4096).
    #[arg(long, value_name = "SIZE")]
    pub budget: Option<Size>,
    /// State directory (spill files, saved state). Default /var/lib/tmem as root. Alone
    /// (without --runtime-dir) it also holds the sockets and the lock, as before the split.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Runtime directory (sockets, lock). Default /run/tmem as root.
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Free space to keep on the spill filesystem (e.g. 64M; 0 turns the checks off).
    #[arg(long, value_name = "SIZE")]
    pub spill_reserve: Option<Size>,
    /// Serve GET /metrics on this TCP address too.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve NBD on this TCP address too.
    #[arg(long, value_name = "ADDR")]
    pub nbd_tcp: Option<SocketAddr>,
    /// Default codec of new exports (none, lz4, zstd, zstd:LEVEL).
    #[arg(long)]
    pub codec: Option<String>,
    /// Default dedup scope of new exports (off, pool, client, global).
    #[arg(long)]
    pub dedup: Option<String>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Pool budget, bytes.
    pub budget: u64,
    /// State directory (spill files, saved state).
    pub state_dir: PathBuf,
    /// Runtime directory (sockets, lock).
    pub runtime_dir: PathBuf,
    /// Free space kept on the spill filesystem, bytes.
    pub spill_reserve: u64,
    /// Metrics TCP listener.
    pub metrics_addr: Option<SocketAddr>,
    /// NBD TCP listener.
    pub nbd_tcp: Option<SocketAddr>,
    /// Default codec.
    pub codec: Codec,
    /// Default dedup scope.
    pub dedup: DedupScope,
    /// Balloon manager settings.
    pub balloon: ManagerConfig,
    /// Fraction of the budget below which compression is deferred to a background thread.
    pub defer_compression: f64,
    /// Background compaction threshold (fraction of held bytes; 0 = off).
    pub compact_threshold: f64,
    /// Persistent pages in durable memory (survive the daemon's death).
    pub durable_pool: bool,
    /// `nbd.sock`: group allowed to connect (gid) and mode.
    pub nbd_socket: SocketAccess,
    /// `ctl.sock`: group allowed to connect (gid) and mode.
    pub ctl_socket: SocketAccess,
    /// The tenants' TLS keys.
    pub nbd_psk_file: PathBuf,
    /// NBD TCP clients may go without TLS.
    pub nbd_tcp_allow_plain: bool,
    /// NBD connection caps and request buffer budget.
    pub nbd_limits: NbdLimits,
    /// The remote tier, if configured.
    pub remote: Option<tmem_remote::RemoteConfig>,
    /// Lending to the remote tier, if configured.
    pub lend: Option<LendConfig>,
}

/// NBD limits against hostile or broken clients (see [`FileConfig`] for the keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections in the handshake at once.
    pub max_handshakes: usize,
    /// Connections in the handshake at once from one peer.
    pub max_handshakes_per_peer: usize,
    /// Request buffer budget, bytes.
    pub buffer_limit: u64,
    /// Seconds a connection holding buffers may stall.
    pub stall_timeout_secs: u64,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_connections: tmem_nbd::server::DEFAULT_MAX_CONNECTIONS,
            max_handshakes: tmem_nbd::server::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_peer: tmem_nbd::server::DEFAULT_MAX_HANDSHAKES_PER_PEER,
            buffer_limit: tmem_nbd::server::DEFAULT_BUFFER_LIMIT,
            stall_timeout_secs: 60,
        }
    }
}

/// Default fraction of the budget below which compression runs in the background.
pub const DEFAULT_DEFER_COMPRESSION: f64 = 0.0;

/// Default background compaction threshold (fraction of held bytes compaction could free).
pub const DEFAULT_COMPACT_THRESHOLD: f64 = 0.10;

/// Default free space kept on the spill filesystem (64 MiB).
pub const DEFAULT_SPILL_RESERVE: u64 = 64 << 20;

/// Default share of host RAM for the pool budget.
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.25;
/// Budget used when MemTotal cannot be read.
pub const FALLBACK_BUDGET: u64 = 1 << 30;

/// Parses a codec name.
pub fn parse_codec(s: &str) -> Result<Codec, ConfigError> {
    let bad = || ConfigError::Codec(s.to_owned());
    match s {
        "none" | "off" => Ok(Codec::None),
        "lz4" => Ok(Codec::Lz4),
        "zstd" => Ok(Codec::Zstd(1)),
        _ => {
            let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
            let l: i8 = level.parse().map_err(|_| bad())?;
            if (1..=19).contains(&l) {
                Ok(Codec::Zstd(l))
            } else {
                Err(bad())
            }
        }
    }
}

/// Formats a codec as [`parse_codec`] reads it.
pub fn codec_name(c: Codec) -> String {
    match c {
        Codec::None => "none".into(),
        Codec::Lz4 => "lz4".into(),
        Codec::Zstd(l) => format!("zstd:{l}"),
    }
}

/// Parses a dedup scope name.
pub fn parse_dedup(s: &str) -> Result<DedupScope, ConfigError> {
    match s {
        "off" | "none" => Ok(DedupScope::Off),
        "pool" => Ok(DedupScope::Pool),
        "client" => Ok(DedupScope::Client),
        "global" => Ok(DedupScope::Global),
        _ => Err(ConfigError::Dedup(s.to_owned())),
    }
}

/// Formats a dedup scope as [`parse_dedup`] reads it.
pub fn dedup_name(d: DedupScope) -> &'static str {
    match d {
        DedupScope::Off => "off",
        DedupScope::Pool => "pool",
        DedupScope::Client => "client",
        DedupScope::Global => "global",
    }
}

/// MemTotal from `/proc/meminfo`, bytes.
pub fn host_mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&s)
}

fn parse_mem_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

impl Config {
    /// Resolves defaults, the file named by `args.config` (if any) and the flags.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file, host_mem_total())
    }

    /// Resolves from already-read parts (testable).
    pub fn resolve(
        args: &Args,
        file: FileConfig,
        mem_total: Option<u64>,
    ) -> Result<Config, ConfigError> {
        let nbd_limits = nbd_limits(&file)?;
        // A table without its servers is off (so each key can be set on its own).
        let remote = file.remote.clone().filter(|r| !r.nodes.is_empty());
        if let Some(r) = &remote {
            r.validate().map_err(ConfigError::Remote)?;
        }
        let lend = file.lend.clone().filter(|l| !l.node.is_empty());
        if let Some(l) = &lend {
            l.validate()?;
        }
        let fraction = file.budget_fraction.unwrap_or(DEFAULT_BUDGET_FRACTION);
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ConfigError::Fraction(fraction));
        }
        let default_budget = mem_total
            .map(|m| ((m as f64 * fraction) as u64) & !4095)
            .unwrap_or(FALLBACK_BUDGET);
        let budget = args
            .budget
            .or(file.budget)
            .map(|s| s.0)
            .unwrap_or(default_budget);
        let codec = match args.codec.as_deref().or(file.codec.as_deref()) {
            Some(c) => parse_codec(c)?,
            None => Codec::Lz4,
        };
        let dedup = match args.dedup.as_deref().or(file.dedup.as_deref()) {
            Some(d) => parse_dedup(d)?,
            None => DedupScope::Client,
        };
        // Flags win over the file, key by key. A state directory given without a runtime
        // directory keeps the one-directory layout of older releases (sockets next to it).
        let state = args.state_dir.clone().or(file.state_dir);
        let runtime = args.runtime_dir.clone().or(file.runtime_dir);
        let (runtime_dir, state_dir) = match (runtime, state) {
            (Some(r), Some(s)) => (r, s),
            (None, Some(s)) => (s.clone(), s),
            (Some(r), None) => (r, tmem_api::default_state_dir()),
            (None, None) => (
                tmem_api::default_runtime_dir(),
                tmem_api::default_state_dir(),
            ),
        };
        let nbd_psk_file = file
            .nbd_psk_file
            .clone()
            .unwrap_or_else(|| state_dir.join("tls").join("keys.psk"));
        Ok(Config {
            budget,
            state_dir,
            runtime_dir,
            spill_reserve: args
                .spill_reserve
                .or(file.spill_reserve)
                .map_or(DEFAULT_SPILL_RESERVE, |s| s.0),
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            nbd_tcp: args.nbd_tcp.or(file.nbd_tcp),
            codec,
            dedup,
            balloon: file.balloon.unwrap_or_default(),
            defer_compression: match file.defer_compression {
                Some(f) if (0.0..=1.0).contains(&f) => f,
                Some(f) => return Err(ConfigError::Fraction(f)),
                None => DEFAULT_DEFER_COMPRESSION,
            },
            compact_threshold: match file.compact_threshold {
                Some(f) if (0.0..=1.0).contains(&f) => f,
                Some(f) => return Err(ConfigError::Fraction(f)),
                None => DEFAULT_COMPACT_THRESHOLD,
            },
            durable_pool: file.durable_pool.unwrap_or(true),
            nbd_socket: SocketAccess::resolve(
                file.nbd_socket_group.as_deref(),
                file.nbd_socket_mode.as_deref(),
            )?,
            ctl_socket: SocketAccess::resolve(
                file.ctl_socket_group.as_deref(),
                file.ctl_socket_mode.as_deref(),
            )?,
            nbd_psk_file,
            nbd_tcp_allow_plain: file.nbd_tcp_allow_plain.unwrap_or(false),
            nbd_limits,
            remote,
            lend,
        })
    }
}

fn nbd_limits(file: &FileConfig) -> Result<NbdLimits, ConfigError> {
    let d = NbdLimits::default();
    let at_least = |key: &'static str, v: Option<u64>, min: u64, default: u64| match v {
        Some(v) if v < min => Err(ConfigError::NbdLimit(key, v, min)),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let count = |key, v: Option<usize>, default: usize| {
        at_least(key, v.map(|v| v as u64), 1, default as u64).map(|v| v as usize)
    };
    Ok(NbdLimits {
        max_connections: count(
            "nbd_max_connections",
            file.nbd_max_connections,
            d.max_connections,
        )?,
        max_handshakes: count(
            "nbd_max_handshakes",
            file.nbd_max_handshakes,
            d.max_handshakes,
        )?,
        max_handshakes_per_peer: count(
            "nbd_max_handshakes_per_peer",
            file.nbd_max_handshakes_per_peer,
            d.max_handshakes_per_peer,
        )?,
        buffer_limit: at_least(
            "nbd_buffer_limit",
            file.nbd_buffer_limit.map(|s| s.0),
            tmem_nbd::MIN_BUFFER_LIMIT,
            d.buffer_limit,
        )?,
        stall_timeout_secs: at_least(
            "nbd_stall_timeout_secs",
            file.nbd_stall_timeout_secs,
            1,
            d.stall_timeout_secs,
        )?,
    })
}

fn read_file(p: &Path) -> Result<FileConfig, ConfigError> {
    let s = std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.to_owned(), e))?;
    toml::from_str(&s).map_err(|e| ConfigError::Parse(p.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_any_config() {
        let c = Config::resolve(&Args::default(), FileConfig::default(), Some(8 << 30)).unwrap();
        assert_eq!(c.budget, 2 << 30);
        assert_eq!(c.codec, Codec::Lz4);
        assert_eq!(c.dedup, DedupScope::Client);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.runtime_dir, tmem_api::default_runtime_dir());
        assert_eq!(c.state_dir, tmem_api::default_state_dir());
        assert_eq!(c.spill_reserve, DEFAULT_SPILL_RESERVE);
        let c = Config::resolve(&Args::default(), FileConfig::default(), None).unwrap();
        assert_eq!(c.budget, FALLBACK_BUDGET);
        assert_eq!(c.nbd_limits, NbdLimits::default());
        assert_eq!(c.nbd_limits.buffer_limit, 256 << 20);
    }

    #[test]
    fn nbd_limits() {
        let file: FileConfig = toml::from_str(
            "nbd_buffer_limit = \"64M\"\nnbd_max_handshakes = 8\nnbd_max_handshakes_per_peer = 2\nnbd_max_connections = 100\nnbd_stall_timeout_secs = 5\n",
        )
        .unwrap();
        let c = Config::resolve(&Args::default(), file, None).unwrap();
        assert_eq!(
            c.nbd_limits,
            NbdLimits {
                max_connections: 100,
                max_handshakes: 8,
                max_handshakes_per_peer: 2,
                buffer_limit: 64 << 20,
                stall_timeout_secs: 5,
            }
        );
        for bad in [
            "nbd_buffer_limit = \"1M\"",
            "nbd_max_handshakes = 0",
            "nbd_stall_timeout_secs = 0",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            assert!(
                Config::resolve(&Args::default(), file, None).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn runtime_and_state_dirs() {
        let dirs = |args: Args, file: &str| {
            let file: FileConfig = toml::from_str(file).unwrap();
            let c = Config::resolve(&args, file, None).unwrap();
            (c.runtime_dir, c.state_dir)
        };
        let p = PathBuf::from;
        // A state dir alone: the one-directory layout (sockets next to the state).
        let args = Args {
            state_dir: Some(p("/s")),
            ..Default::default()
        };
        assert_eq!(dirs(args, ""), (p("/s"), p("/s")));
        assert_eq!(
            dirs(Args::default(), "state_dir = \"/s\""),
            (p("/s"), p("/s"))
        );
        // Both, from the file, a flag overriding one of them.
        let both = "state_dir = \"/s\"\nruntime_dir = \"/r\"\n";
        assert_eq!(dirs(Args::default(), both), (p("/r"), p("/s")));
        let args = Args {
            runtime_dir: Some(p("/r2")),
            ..Default::default()
        };
        assert_eq!(dirs(args, both), (p("/r2"), p("/s")));
        // A runtime dir alone: the default state dir.
        let args = Args {
            runtime_dir: Some(p("/r")),
            ..Default::default()
        };
        assert_eq!(dirs(args, ""), (p("/r"), tmem_api::default_state_dir()));
        let file: FileConfig = toml::from_str("spill_reserve = \"1G\"").unwrap();
        let c = Config::resolve(&Args::default(), file, None).unwrap();
        assert_eq!(c.spill_reserve, 1 << 30);
    }

    #[test]
    fn file_then_flags() {
        let file: FileConfig = toml::from_str(
            "budget = \"1G\"\ncodec = \"zstd:3\"\nstate_dir = \"/x\"\n[balloon]\ninterval_ms = 500\n",
        )
        .unwrap();
        let args = Args {
            budget: Some(Size(512 << 20)),
            ..Default::default()
        };
        let c = Config::resolve(&args, file, Some(8 << 30)).unwrap();
        assert_eq!(c.budget, 512 << 20);
        assert_eq!(c.codec, Codec::Zstd(3));
        assert_eq!(c.state_dir, PathBuf::from("/x"));
        assert_eq!(c.balloon.interval_ms, 500);
        assert_eq!(c.compact_threshold, DEFAULT_COMPACT_THRESHOLD);
        let file: FileConfig = toml::from_str("compact_threshold = 0.3\n").unwrap();
        let c = Config::resolve(&Args::default(), file, None).unwrap();
        assert_eq!(c.compact_threshold, 0.3);
        let file: FileConfig = toml::from_str("compact_threshold = 1.5\n").unwrap();
        assert!(Config::resolve(&Args::default(), file, None).is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_rejected() {
        assert!(toml::from_str::<FileConfig>("budgt = 1").is_err());
        assert!(toml::from_str::<FileConfig>("budget = \"1Q\"").is_err());
        assert!(toml::from_str::<FileConfig>("[balloon]\nfoo = 1").is_err());
        let file = FileConfig {
            codec: Some("zstd:99".into()),
            ..Default::default()
        };
        assert!(Config::resolve(&Args::default(), file, None).is_err());
        assert!(parse_dedup("all").is_err());
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            parse_mem_total("MemTotal:       16318440 kB\nMemFree: 1 kB\n"),
            Some(16318440 * 1024)
        );
        assert_eq!(parse_mem_total("nothing"), None);
    }
}
