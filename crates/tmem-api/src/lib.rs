//! # tmem-api: the control API's request and response types
//!
//! Shared by the daemon (`tmemd`) and the CLI (`tmemctl`) so that both sides agree on the
//! JSON they exchange and validate sizes the same way (Cloud Hypervisor's `ch-remote` reuses
//! the daemon's parsers for the same reason).
//!
//! ## Protocol
//! HTTP/1.1 over the Unix socket `RUNTIME_DIR/ctl.sock`, JSON bodies, resources under
//! [`API_PREFIX`] (`/api/v1`):
//!
//! | method | path | body | reply |
//! | --- | --- | --- | --- |
//! | GET | `/status` | | [`Status`] |
//! | GET | `/stats` | | [`Stats`] |
//! | GET | `/clients` | | `[`[`ClientInfo`]`]` |
//! | POST | `/clients` | [`CreateClient`] | [`ClientInfo`] (201) |
//! | DELETE | `/clients/{id}` | | 204 |
//! | POST | `/clients/{id}/freeze`, `/clients/{id}/thaw` | | [`ClientInfo`] |
//! | GET | `/exports` | | `[`[`ExportInfo`]`]` |
//! | GET | `/exports/{name}` | | [`ExportInfo`] |
//! | POST | `/exports` | [`CreateExport`] | [`ExportInfo`] (201) |
//! | DELETE | `/exports/{name}` | | 204 |
//! | POST | `/exports/{name}/invalidate` | | [`InvalidateReply`] (cached exports; 409 for others) |
//! | PUT | `/budget` | [`SetBudget`] | [`BudgetReply`] |
//! | POST | `/shrink` | [`ShrinkRequest`] | [`ShrinkReply`] |
//! | POST | `/compact` | [`CompactRequest`] (optional) | [`CompactReply`] |
//! | POST | `/upgrade` | [`UpgradeRequest`] (optional) | [`UpgradeReply`] (202) |
//! | GET | `/guests` | | `[`[`GuestInfo`]`]` |
//! | POST | `/guests` | [`CreateGuest`] | [`GuestInfo`] (201) |
//! | DELETE | `/guests/{name}` | | 204 |
//!
//! `GET /metrics` (unversioned) answers Prometheus text. Every error is an [`ErrorBody`]:
//! `{"error": "...", "chain": ["...", "..."]}` with a 4xx/5xx status.
//!
//! Sizes in request bodies ([`Size`]) are either a JSON number of bytes or a string with an
//! optional binary suffix (`"512M"`, `"2G"`, `"4096"`); see [`parse_size`].
#![warn(missing_docs, missing_debug_implementations)]

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every versioned resource.
pub const API_PREFIX: &str = "/api/v1";
/// File name of the control socket inside the runtime directory.
pub const CTL_SOCKET: &str = "ctl.sock";
/// File name of the NBD socket inside the runtime directory.
pub const NBD_SOCKET: &str = "nbd.sock";
/// Environment variable naming the state directory (read by `tmemctl`, which looks for the
/// control socket there when no runtime directory is given: the one-directory layout).
pub const STATE_DIR_ENV: &str = "TMEM_STATE_DIR";
/// Environment variable naming the runtime directory (read by `tmemctl`).
pub const RUNTIME_DIR_ENV: &str = "TMEM_RUNTIME_DIR";
/// Largest request body the daemon accepts, bytes.
pub const MAX_BODY: usize = 1 << 20;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() }
}

/// The default runtime directory (sockets, lock; a tmpfs, gone at reboot): `/run/tmem` as
/// root, otherwise `$XDG_RUNTIME_DIR/tmem`, or `/tmp/tmem-$UID` without a runtime dir.
pub fn default_runtime_dir() -> PathBuf {
    let uid = euid();
    if uid == 0 {
        return PathBuf::from("/run/tmem");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("tmem"),
        _ => PathBuf::from(format!("/tmp/tmem-{uid}")),
    }
}

/// The default state directory (spill files, saved state; on disk, outside the pool's
/// memory budget): `/var/lib/tmem` as root, otherwise `$XDG_STATE_HOME/tmem`, else
/// `$HOME/.local/state/tmem`, else the [`default_runtime_dir`].
pub fn default_state_dir() -> PathBuf {
    if euid() == 0 {
        return PathBuf::from("/var/lib/tmem");
    }
    let nonempty = |k: &str| std::env::var_os(k).filter(|d| !d.is_empty());
    if let Some(d) = nonempty("XDG_STATE_HOME") {
        return PathBuf::from(d).join("tmem");
    }
    if let Some(h) = nonempty("HOME") {
        return PathBuf::from(h).join(".local/state/tmem");
    }
    default_runtime_dir()
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

// ------------------------------------------------------------------------------- sizes

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError(pub String);

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Invalid size {:?} (expected bytes or a number with K, M, G or T)",
            self.0
        )
    }
}

impl std::error::Error for SizeError {}

/// Parses a size: a decimal number of bytes with an optional binary suffix `K`, `M`, `G`,
/// `T` (also `KiB`, `MB`, `k`, ...; all powers of 1024). `"512M"` → 536870912, `"4096"` → 4096.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_owned());
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(err());
    }
    let n: u64 = t[..digits].parse().map_err(|_| err())?;
    let suffix = t[digits..].trim().to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Formats bytes for humans with a binary suffix and one decimal: `1.5G`, `512M`, `4.0K`, `17B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (u, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            let v = bytes as f64 / unit as f64;
            return if bytes % unit == 0 {
                format!("{}{u}", bytes / unit)
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{bytes}B")
}

/// A size in bytes. Deserializes from a JSON number or a size string (`"2G"`); serializes
/// as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"2G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("Invalid size {v} (negative)")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl std::str::FromStr for Size {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, SizeError> {
        parse_size(s).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

// ------------------------------------------------------------------------------- errors

/// The body of every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The top-level message.
    pub error: String,
    /// The messages of the whole chain, outermost first (the first equals `error`).
    pub chain: Vec<String>,
}

impl ErrorBody {
    /// Builds the body from an error and its `source()` chain.
    pub fn from_error(e: &dyn std::error::Error) -> Self {
        let mut chain = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(c) = cur {
            chain.push(c.to_string());
            cur = c.source();
        }
        ErrorBody {
            error: e.to_string(),
            chain,
        }
    }
}

// ------------------------------------------------------------------------------- status & stats

/// `GET /status`: what the daemon is and where it listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Daemon version.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// State directory (spill files, saved state).
    pub state_dir: PathBuf,
    /// Runtime directory (sockets, lock); the state directory in the one-directory layout.
    #[serde(default)]
    pub runtime_dir: PathBuf,
    /// NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// NBD TCP address, if any.
    pub nbd_tcp: Option<String>,
    /// Metrics TCP address, if any.
    pub metrics_addr: Option<String>,
    /// Pool budget, bytes.
    pub budget: u64,
    /// Bytes held by the pool.
    pub held_bytes: u64,
    /// Number of clients.
    pub clients: u64,
    /// Number of exports.
    pub exports: u64,
    /// Number of managed guests.
    pub guests: u64,
    /// Problems found at start (e.g. a corrupt state file moved aside).
    pub warnings: Vec<String>,
    /// Swap exports with poisoned pages now: pages whose content could not be proven intact
    /// after an unclean stop (or a failed spill) answer reads with EIO until rewritten.
    #[serde(default)]
    pub damaged_exports: Vec<DamagedExport>,
}

/// A swap export with poisoned pages (`GET /status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedExport {
    /// Export name.
    pub name: String,
    /// Pages (4 KiB) whose reads fail with EIO until the guest rewrites or trims them.
    pub poisoned_pages: u64,
}

/// Operation counters (see tmem-core `OpStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops {
    /// Puts accepted.
    pub puts: u64,
    /// Puts refused (frozen, quota, no space).
    pub puts_refused: u64,
    /// Gets asked.
    pub gets: u64,
    /// Gets that found the page.
    pub get_hits: u64,
    /// Gets that missed.
    pub get_misses: u64,
    /// Pages flushed on request.
    pub flushes: u64,
    /// Ephemeral pages evicted.
    pub evictions: u64,
    /// Puts of all-zero pages.
    pub zero_puts: u64,
    /// Puts of same-filled non-zero pages.
    pub same_puts: u64,
    /// Puts that found an identical page.
    pub dedup_hits: u64,
    /// Puts stored compressed.
    pub compressed_puts: u64,
    /// Puts stored raw.
    pub raw_puts: u64,
}

impl Ops {
    /// Hits / gets, or `None` before the first get.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.gets > 0).then(|| self.get_hits as f64 / self.gets as f64)
    }
}

/// What a client or pool holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Pages held.
    pub pages: u64,
    /// Of those, zero or same-filled pages (no data page).
    pub same_pages: u64,
    /// Bytes charged (stored size plus metadata).
    pub charged_bytes: u64,
    /// Logical bytes: pages × 4096.
    pub logical_bytes: u64,
}

/// The pool as a whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// Budget, bytes.
    pub budget: u64,
    /// Bytes really held (allocator slabs + metadata).
    pub held_bytes: u64,
    /// Of which index metadata.
    pub metadata_bytes: u64,
    /// Logical bytes: pages × 4096.
    pub logical_bytes: u64,
    /// Physical payload bytes (compressed lengths) in the allocator.
    pub physical_bytes: u64,
    /// Allocator slab bytes.
    pub slab_bytes: u64,
    /// Pages held.
    pub pages: u64,
    /// Ephemeral pages held.
    pub ephemeral_pages: u64,
    /// Persistent pages held.
    pub persistent_pages: u64,
    /// Zero or same-filled pages held.
    pub same_pages: u64,
    /// Distinct stored payloads.
    pub unique_payloads: u64,
    /// Bytes that could be released now.
    pub freeable_bytes: u64,
    /// Logical / held.
    pub effective_ratio: f64,
    /// Compression ratio of data pages.
    pub compression_ratio: f64,
    /// Dedup ratio of data pages.
    pub dedup_ratio: f64,
    /// Allocator fragmentation, 0..1.
    pub fragmentation: f64,
    /// Number of clients.
    pub clients: u64,
    /// Number of pools.
    pub pools: u64,
    /// Operation counters.
    pub ops: Ops,
    /// Bytes the kernel charges for the pool's memory (regions measured with `mincore`,
    /// tables counted by capacity); agrees with `held_bytes`.
    #[serde(default)]
    pub resident_bytes: u64,
    /// The daemon's whole resident set (`VmRSS`): the pool plus connections, threads and
    /// the program itself.
    #[serde(default)]
    pub process_rss_bytes: u64,
    /// Bytes compaction could give back now.
    #[serde(default)]
    pub compactable_bytes: u64,
    /// What compaction has done since the daemon started.
    #[serde(default)]
    pub compaction: CompactionSummary,
    /// NBD request buffer bytes reserved now (large WRITE payloads and READ replies in
    /// flight), out of the `nbd_buffer_limit`.
    #[serde(default)]
    pub nbd_buffer_bytes: u64,
}

/// Compaction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionSummary {
    /// Compaction runs that moved or freed something.
    pub runs: u64,
    /// Pages (payloads) moved.
    pub moved: u64,
    /// Slabs emptied and given back.
    pub slabs_freed: u64,
    /// Bytes given back to the kernel.
    pub bytes_freed: u64,
}

/// One client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Client id.
    pub id: u32,
    /// Weight (share of ephemeral capacity).
    pub weight: u32,
    /// Cap on persistent bytes (`None` = no cap).
    pub persistent_cap: Option<u64>,
    /// Whether puts are refused.
    pub frozen: bool,
    /// Ephemeral pages charged.
    pub ephemeral: Held,
    /// Persistent pages charged.
    pub persistent: Held,
    /// Operation counters.
    pub ops: Ops,
    /// Pool ids it can reach.
    pub pools: Vec<u32>,
}

/// One pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Pool id.
    pub id: u32,
    /// Label.
    pub label: String,
    /// Persistent or ephemeral.
    pub persistent: bool,
    /// Shared or private.
    pub shared: bool,
    /// What it holds.
    pub held: Held,
    /// Operation counters.
    pub ops: Ops,
}

/// Kind of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// A swap device backed by a persistent pool (with a spill file).
    Swap,
    /// A disk image with an ephemeral read cache in the pool.
    Cached,
}

impl fmt::Display for ExportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportKind::Swap => "swap",
            ExportKind::Cached => "cached",
        })
    }
}

impl std::str::FromStr for ExportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "swap" => Ok(ExportKind::Swap),
            "cached" => Ok(ExportKind::Cached),
            _ => Err(format!("unknown export kind {s:?} (swap or cached)")),
        }
    }
}

/// NBD request counters of an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdStats {
    /// Connections that used the export.
    pub connections: u64,
    /// Connections open now.
    #[serde(default)]
    pub live_connections: u64,
    /// READ requests.
    pub reads: u64,
    /// WRITE requests.
    pub writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// TRIM requests.
    pub trims: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

impl NbdStats {
    /// All requests.
    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.trims + self.write_zeroes
    }
}

/// Backend counters of an export (fields that do not apply to its kind are 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCounters {
    /// Pages held in the pool.
    pub pool_pages: u64,
    /// Swap: pages written to the spill file because the pool refused them.
    pub spilled_pages: u64,
    /// Cached: 512-byte sectors read from the image.
    pub sectors_read: u64,
    /// Cached: 512-byte sectors written to the image.
    pub sectors_written: u64,
    /// Reads served from the pool.
    pub hits: u64,
    /// Reads that missed the pool.
    pub misses: u64,
    /// Swap: pages whose content could not be proven intact (reads fail with EIO until the
    /// page is rewritten or trimmed).
    #[serde(default)]
    pub poisoned_pages: u64,
    /// Swap: spill-file or page-map writes that failed or were refused for lack of space.
    #[serde(default)]
    pub spill_errors: u64,
    /// Swap: pages that live in the remote tier now.
    #[serde(default)]
    pub remote_pages: u64,
    /// Pages served by the remote tier (swap: reads of remote pages; cached: missed pages
    /// found there).
    #[serde(default)]
    pub remote_hits: u64,
    /// Cached: missed pages the remote tier did not have, or had only in an older version.
    #[serde(default)]
    pub remote_misses: u64,
    /// Swap: pages that went to the spill file because the remote tier failed or did not
    /// replicate them in time.
    #[serde(default)]
    pub remote_fallbacks: u64,
    /// Swap: reads of remote pages that failed (EIO) or found a copy not matching the page
    /// map (poisoned).
    #[serde(default)]
    pub remote_errors: u64,
    /// Cached: evicted pages of the image handed to the remote tier.
    #[serde(default)]
    pub demoted_pages: u64,
}

/// The remote tier (other hosts' memory, on Redis): its state and counters since the daemon
/// started. Absent when none is configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteInfo {
    /// `cluster` or `single`.
    pub mode: String,
    /// The seed nodes (`host:port`).
    pub nodes: Vec<String>,
    /// Whether the tier takes requests now (reachable and not backing off).
    pub reachable: bool,
    /// Times it went from reachable to down.
    pub down_transitions: u64,
    /// Evicted ephemeral pages written to the tier.
    pub demoted_pages: u64,
    /// Evicted ephemeral pages dropped (queue full, tier down, write failed).
    pub demote_dropped: u64,
    /// Pages asked for on local misses.
    pub fetch_pages: u64,
    /// Of those, pages returned intact.
    pub fetch_hits: u64,
    /// Persistent pages stored and acknowledged by the required replicas.
    pub durable_puts: u64,
    /// Persistent page reads.
    pub durable_gets: u64,
    /// Persistent writes fewer replicas acknowledged than required (sent to the spill file).
    pub not_replicated: u64,
    /// Failed operations (connection errors, error replies, timeouts).
    pub errors: u64,
    /// Of the errors, timeouts.
    pub timeouts: u64,
    /// Values that failed their checks (garbage, checksum, another key's value).
    pub corrupt: u64,
    /// Value bytes sent.
    pub bytes_sent: u64,
    /// Value bytes received.
    pub bytes_received: u64,
    /// Bytes this daemon stored in the tier minus those it deleted (approximate).
    pub stored_bytes: u64,
    /// Median latency of a fetch of missed pages (µs, recent window).
    pub fetch_p50_us: u64,
    /// 99th percentile latency of a fetch (µs, recent window).
    pub fetch_p99_us: u64,
    /// Median latency of a persistent page read (µs, recent window).
    pub get_p50_us: u64,
    /// 99th percentile latency of a persistent page read (µs, recent window).
    pub get_p99_us: u64,
    /// What this host lends to others, when tmemd manages its Redis node's `maxmemory`.
    pub lend: Option<LendInfo>,
}

/// The memory this host lends to the remote tier: its Redis node's `maxmemory`, moved by
/// tmemd as the host's own guests need memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LendInfo {
    /// The local Redis node (`host:port`).
    pub node: String,
    /// `maxmemory` as last set (bytes; 0 before the first).
    pub bytes: u64,
    /// What the last computation asked for (bytes).
    pub target: u64,
    /// Times `maxmemory` was changed.
    pub changes: u64,
    /// Failed attempts to set it.
    pub errors: u64,
}

/// One export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Export (and NBD export) name.
    pub name: String,
    /// Kind.
    pub kind: ExportKind,
    /// Size in bytes.
    pub size: u64,
    /// Client whose pools hold its pages.
    pub client: u32,
    /// Pool id, if known.
    pub pool: Option<u32>,
    /// Cached: the image.
    pub image: Option<PathBuf>,
    /// Whether clients may write. Swap exports always; cached exports only when created
    /// `writable` (they are read-only by default). Absent from older daemons: `false`.
    #[serde(default)]
    pub writable: bool,
    /// NBD URI to reach it.
    pub uri: String,
    /// Who may open it.
    #[serde(default)]
    pub access: ExportAccess,
    /// Tenant exports: the directory holding the tenant's `keys.psk` for QEMU
    /// (`tls-creds-psk,dir=...`) and libnbd (`tls-psk-file=.../keys.psk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Backend counters.
    pub backend: BackendCounters,
    /// NBD counters.
    pub nbd: NbdStats,
}

/// One managed guest (balloon).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Name.
    pub name: String,
    /// QMP socket (empty for a libvirt domain).
    #[serde(default)]
    pub qmp: PathBuf,
    /// The libvirt domain, if the guest is one.
    #[serde(default)]
    pub libvirt: Option<LibvirtTarget>,
    /// The guest is gone (its libvirt domain no longer runs); the daemon drops it.
    #[serde(default)]
    pub gone: bool,
    /// Agent socket, if any.
    pub agent: Option<PathBuf>,
    /// Policy name.
    pub policy: String,
    /// Actuator name.
    pub actuator: String,
    /// Maximum (boot) size, bytes (0 until known).
    pub max: u64,
    /// Last read balloon size, bytes.
    pub actual: u64,
    /// Last requested target, bytes.
    pub target: u64,
    /// Whether the guest is flagged stuck.
    pub stuck: bool,
    /// Bytes taken from the guest.
    pub reclaimed_bytes: u64,
    /// Bytes given back.
    pub given_back_bytes: u64,
    /// Intervals run.
    pub intervals: u64,
    /// Errors seen.
    pub errors: u64,
    /// Last error (full chain).
    pub last_error: Option<String>,
    /// Target of the last policy decision, bytes.
    #[serde(default)]
    pub decision_target: Option<u64>,
    /// Why the last decision was taken.
    #[serde(default)]
    pub decision_reason: Option<String>,
    /// Stats sources that delivered data in the last interval (`qmp`, `agent`, ...).
    #[serde(default)]
    pub live_sources: Vec<String>,
    /// Guest MemAvailable, bytes (newest stats).
    #[serde(default)]
    pub available: Option<u64>,
    /// Guest Committed_AS, bytes.
    #[serde(default)]
    pub committed: Option<u64>,
    /// Guest major faults per second.
    #[serde(default)]
    pub major_faults_per_s: Option<f64>,
    /// Guest swap-in bytes per second.
    #[serde(default)]
    pub swap_in_bytes_per_s: Option<f64>,
    /// Guest OOM kills (counter).
    #[serde(default)]
    pub oom_kills: Option<u64>,
    /// Last measured reclaim rate, MiB/s.
    #[serde(default)]
    pub reclaim_mib_s: f64,
    /// Last measured give-back rate, MiB/s.
    #[serde(default)]
    pub give_back_mib_s: f64,
    /// Time from the last give-back decision to the balloon reaching its target, ms.
    #[serde(default)]
    pub last_spike_to_deflate_ms: Option<u64>,
}

/// `GET /stats`: everything `tmemctl top` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Pool-wide figures.
    pub pool: PoolSummary,
    /// Clients.
    pub clients: Vec<ClientInfo>,
    /// Pools.
    pub pools: Vec<PoolInfo>,
    /// Exports.
    pub exports: Vec<ExportInfo>,
    /// Guests.
    pub guests: Vec<GuestInfo>,
    /// The remote tier, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteInfo>,
}

// ------------------------------------------------------------------------------- requests

/// `POST /clients`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    /// Client id (`None`: the next free id).
    #[serde(default)]
    pub id: Option<u32>,
    /// Weight. Default 100.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Cap on persistent bytes. Default none.
    #[serde(default)]
    pub persistent_cap: Option<Size>,
}

/// Who may open an export over NBD. Empty (the default): any client that can connect to the
/// Unix socket without TLS (and plain TCP clients only where the operator allowed plain TCP);
/// no TLS tenant sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportAccess {
    /// The tenant owning the export: its TLS-PSK identity (QEMU `tls-creds-psk` `username`).
    /// Set: the export is served only to connections that proved this identity's key, or
    /// whose Unix credentials are listed below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Unix-socket peers with one of these user ids (`SO_PEERCRED`) may open it without TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_uids: Vec<u32>,
    /// Unix-socket peers with one of these primary group ids may open it without TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_gids: Vec<u32>,
}

impl ExportAccess {
    /// True when nothing restricts the export (the pre-tenancy behaviour).
    pub fn is_open(&self) -> bool {
        self.tenant.is_none() && self.allow_uids.is_empty() && self.allow_gids.is_empty()
    }
}

/// Checks a tenant name (a TLS-PSK identity and a directory name): the rule of
/// [`valid_name`].
pub fn valid_tenant(name: &str) -> bool {
    valid_name(name)
}

/// Checks an export, guest or tenant name: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting
/// with `.` (safe as a file name, a URI path and a PSK identity).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `POST /exports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateExport {
    /// Name (letters, digits, `-`, `_`, `.`; 1..=64 bytes).
    pub name: String,
    /// Kind.
    pub kind: ExportKind,
    /// Swap: device size (required).
    #[serde(default)]
    pub size: Option<Size>,
    /// Cached: the image file (required).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Client (`None`: a new client; a given id is created if it does not exist).
    #[serde(default)]
    pub client: Option<u32>,
    /// Codec: `none`, `lz4`, `zstd` or `zstd:LEVEL`. Default: the daemon's.
    #[serde(default)]
    pub codec: Option<String>,
    /// Dedup scope: `off`, `pool`, `client`, `global`. Default: the daemon's.
    #[serde(default)]
    pub dedup: Option<String>,
    /// Cached: open the image with O_DIRECT. Default false.
    #[serde(default)]
    pub direct_io: Option<bool>,
    /// Who may open the export (default: open to Unix-socket clients without TLS).
    #[serde(default)]
    pub access: ExportAccess,
    /// The tenant's TLS key (hex) when the caller brings its own; without it a tenant with
    /// no key yet gets a fresh random one. A tenant that has a key keeps it (a different one
    /// here is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<String>,
    /// Cached: open the image read-write and let the client write it. Default false: the
    /// export is read-only (the image is usually a base shared by several guests). Swap
    /// exports are always writable (`false` is refused for them).
    #[serde(default)]
    pub writable: Option<bool>,
}

/// Reply to `POST /exports/{name}/invalidate`: every cached page of the export's image
/// was dropped from the shared pool (for every export sharing it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidateReply {
    /// The export.
    pub name: String,
    /// Pages dropped from the pool.
    pub pages_dropped: u64,
    /// The image's path names another file (or none) now: the export keeps serving the
    /// file it opened; re-create the export to serve the new one.
    #[serde(default)]
    pub path_replaced: bool,
}

/// `PUT /budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    /// New budget.
    pub bytes: Size,
}

/// Reply to `PUT /budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetReply {
    /// The budget now.
    pub budget: u64,
    /// Bytes released to fit it.
    pub released: u64,
}

/// `POST /shrink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShrinkRequest {
    /// Bytes to release.
    pub bytes: Size,
}

/// Reply to `POST /shrink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShrinkReply {
    /// Bytes asked for.
    pub requested: u64,
    /// Bytes released.
    pub released: u64,
}

/// `POST /compact` (the body may be empty: compact until nothing more can be freed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactRequest {
    /// Most payloads to move (default: no limit).
    #[serde(default)]
    pub max_moves: Option<u64>,
}

/// Reply to `POST /compact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReply {
    /// Payloads moved.
    pub moved: u64,
    /// Slabs emptied and given back.
    pub slabs_freed: u64,
    /// Bytes the allocator gave back to the kernel.
    pub bytes_freed: u64,
    /// The daemon's resident set before, bytes (`VmRSS`).
    pub rss_before: u64,
    /// The daemon's resident set after, bytes.
    pub rss_after: u64,
}

/// `POST /upgrade` (the body may be empty: the binary the daemon was started from).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The new tmemd binary to hand over to.
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// Reply to `POST /upgrade`: the daemon hands over right after answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReply {
    /// The process (it keeps its PID across the hand-over).
    pub pid: u32,
    /// The binary it hands over to.
    pub binary: PathBuf,
}

/// A balloon policy choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyName {
    /// xen-selfballoon (the default).
    #[default]
    Selfballoon,
    /// MemAvailable + PSI sharing.
    Pressure,
    /// Keep the guest at its maximum (or `min`..`max` bounds).
    Static,
}

impl std::str::FromStr for PolicyName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "selfballoon" => Ok(PolicyName::Selfballoon),
            "pressure" => Ok(PolicyName::Pressure),
            "static" => Ok(PolicyName::Static),
            _ => Err(format!(
                "unknown policy {s:?} (selfballoon, pressure or static)"
            )),
        }
    }
}

/// A libvirt domain whose balloon the manager drives through libvirt (never through the
/// QMP monitor libvirt owns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtTarget {
    /// Domain name.
    pub domain: String,
    /// Connection URI (`qemu:///system`, ...); default: libvirt's default
    /// (`LIBVIRT_DEFAULT_URI` in tmemd's environment, else `qemu:///system` as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

fn path_is_empty(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// `POST /guests`: a QEMU guest (`qmp`) or a libvirt domain (`libvirt`), exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGuest {
    /// Unique name.
    pub name: String,
    /// QEMU QMP socket (empty with `libvirt`).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub qmp: PathBuf,
    /// The libvirt domain (instead of `qmp`): its balloon is set and its balloon statistics
    /// are read through libvirt. When the domain is destroyed, undefined or restarted, the
    /// daemon drops the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtTarget>,
    /// Agent (virtio-serial) socket.
    #[serde(default)]
    pub agent: Option<PathBuf>,
    /// Policy. Default selfballoon.
    #[serde(default)]
    pub policy: Option<PolicyName>,
    /// Never shrink below this.
    #[serde(default)]
    pub min: Option<Size>,
    /// Never grow above this (default: the boot size).
    #[serde(default)]
    pub max: Option<Size>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        for bad in ["", "G", "12Q", "-1", "1.5G", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(3 << 29), "1.5G");
        assert_eq!(format_size(17), "17B");
    }

    #[test]
    fn size_json() {
        let s: SetBudget = serde_json::from_str(r#"{"bytes":"2G"}"#).unwrap();
        assert_eq!(s.bytes, Size(2 << 30));
        let s: SetBudget = serde_json::from_str(r#"{"bytes":4096}"#).unwrap();
        assert_eq!(s.bytes, Size(4096));
        assert!(serde_json::from_str::<SetBudget>(r#"{"bytes":"2Q"}"#).is_err());
        assert!(serde_json::from_str::<SetBudget>(r#"{"bytes":-1}"#).is_err());
        assert!(serde_json::from_str::<SetBudget>(r#"{"bytes":1.5}"#).is_err());
        let e = serde_json::from_str::<SetBudget>(r#"{}"#).unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
        assert!(serde_json::from_str::<SetBudget>(r#"{"bytes":1,"x":2}"#).is_err());
        assert_eq!(
            serde_json::to_string(&SetBudget { bytes: Size(5) }).unwrap(),
            r#"{"bytes":5}"#
        );
    }

    #[test]
    fn export_request_roundtrip() {
        let r: CreateExport =
            serde_json::from_str(r#"{"name":"s","kind":"swap","size":"1G"}"#).unwrap();
        assert_eq!(r.kind, ExportKind::Swap);
        assert_eq!(r.size, Some(Size(1 << 30)));
        let back: CreateExport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn guest_requests_old_and_libvirt() {
        // A request (and a saved manifest entry) from before libvirt guests still reads.
        let old: CreateGuest =
            serde_json::from_str(r#"{"name":"g","qmp":"/run/g.qmp","policy":"static"}"#).unwrap();
        assert_eq!(old.qmp, PathBuf::from("/run/g.qmp"));
        assert_eq!(old.libvirt, None);
        assert_eq!(
            serde_json::to_value(&old).unwrap()["qmp"],
            serde_json::json!("/run/g.qmp")
        );
        let lv: CreateGuest =
            serde_json::from_str(r#"{"name":"g","libvirt":{"domain":"vm1"}}"#).unwrap();
        assert!(lv.qmp.as_os_str().is_empty());
        assert_eq!(
            lv.libvirt,
            Some(LibvirtTarget {
                domain: "vm1".into(),
                uri: None
            })
        );
        let v = serde_json::to_value(&lv).unwrap();
        assert!(v.get("qmp").is_none(), "{v}");
        assert_eq!(v["libvirt"], serde_json::json!({"domain": "vm1"}));
        let back: CreateGuest = serde_json::from_value(v).unwrap();
        assert_eq!(back, lv);
        assert!(serde_json::from_str::<CreateGuest>(
            r#"{"name":"g","libvirt":{"domain":"vm1","socket":"x"}}"#
        )
        .is_err());
        // A GuestInfo from an older daemon (no libvirt, no gone) still reads.
        let gi: GuestInfo = serde_json::from_str(
            r#"{"name":"g","qmp":"/q","agent":null,"policy":"static","actuator":"qmp","max":1,
                "actual":1,"target":1,"stuck":false,"reclaimed_bytes":0,"given_back_bytes":0,
                "intervals":0,"errors":0,"last_error":null}"#,
        )
        .unwrap();
        assert!(!gi.gone && gi.libvirt.is_none());
    }
}
