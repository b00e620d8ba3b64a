//! Listeners, per-connection threads and the [`ServerHandle`] with clean shutdown.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::ExportTable;
use crate::budget::{BufferBudget, HeldBytes};
use crate::handshake::{negotiate_with, HandshakeCtx, HandshakeError, Outcome, Policy, Session};
use crate::peer::{unix_peer_cred, Peer, Transport};
use crate::rl_event;
use crate::stats::{ExportStats, StatsSnapshot};
use crate::tls::{TlsServer, TlsShared};
use crate::transmission::{serve_transmission, TransmissionConfig, TransmissionError};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path (a stale socket file is replaced; a live one is an error). Unlinked on shutdown.
    Unix(PathBuf),
    /// A TCP address (port 0 picks a free port; see [`ServerHandle::tcp_addrs`]).
    Tcp(SocketAddr),
}

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Transmission-phase tuning (worker pool, inline threshold). Default: [`TransmissionConfig::default`].
    pub transmission: TransmissionConfig,
    /// Deadline for the whole handshake (from accept to transmission), however slowly
    /// the client trickles its bytes: a client that has not entered transmission by then
    /// is dropped and its connection slot freed. Default: 10 s.
    pub handshake_timeout: Option<Duration>,
    /// Connections open at once (handshake and transmission). At the limit, a new
    /// connection closes the one waiting longest in the handshake; only when every
    /// connection is in transmission is the newcomer closed instead. Default: 1024.
    pub max_connections: usize,
    /// TLS with pre-shared keys, offered to every client through `NBD_OPT_STARTTLS` when set.
    /// Default: none (STARTTLS answered with `NBD_REP_ERR_UNSUP`).
    pub tls: Option<TlsServer>,
    /// Serve TCP clients that did not start TLS. Default: false — a TCP client gets
    /// `NBD_REP_ERR_TLS_REQD` for everything but `STARTTLS` (and without a TLS setup, nothing).
    /// Unix-socket clients may always go without TLS; the export table decides what they open.
    pub allow_plain_tcp: bool,
    /// Connections in the handshake at once, from all peers. At the limit, a new connection
    /// closes the one that has been in the handshake longest (clients stalled or trickling
    /// bytes cannot lock others out; a real client's handshake takes milliseconds).
    /// Connections in transmission are never closed for a newcomer. Default: 256.
    pub max_handshakes: usize,
    /// Connections in the handshake at once from one peer: a TCP client address (IPv6 by
    /// its /64 prefix) or a Unix socket peer's uid (root included: local VMs usually share
    /// one uid, so the per-peer cap on a Unix socket mostly limits how many of its handshake
    /// slots one local user can take from the others). At the limit, the peer's own oldest
    /// handshake is closed. Default: 64.
    pub max_handshakes_per_peer: usize,
    /// Server-wide budget for request buffers larger than `transmission.inline_max` (WRITE
    /// payloads, READ replies; see [`BufferBudget`]), bytes; at least
    /// [`crate::MIN_BUFFER_LIMIT`]. A connection that needs more waits. With it, the
    /// server's memory is bounded by `buffer_limit` + about 2 MiB per connection in
    /// transmission (its fixed buffers with the default [`TransmissionConfig`]) + at most
    /// 64 KiB per connection in the handshake (one option's data, at most
    /// `max_handshakes` of them), plus the thread stacks. [`ServerHandle::start`]
    /// installs a budget of this size as `transmission.budget` (replacing any set there).
    /// Default: 256 MiB.
    pub buffer_limit: u64,
    /// A connection in transmission that holds request buffers from that budget and receives
    /// nothing for this long (a client that announced a large WRITE and stalled), or whose
    /// reply cannot be written for this long (a client that stopped reading), is closed, so
    /// it cannot hold the shared budget for ever. An idle client holding nothing is never
    /// closed. Default: 60 s.
    pub stall_timeout: Duration,
}

/// Default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`ServerConfig::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default [`ServerConfig::max_handshakes_per_peer`].
pub const DEFAULT_MAX_HANDSHAKES_PER_PEER: usize = 64;
/// Default [`ServerConfig::buffer_limit`] (256 MiB).
pub const DEFAULT_BUFFER_LIMIT: u64 = 256 << 20;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            transmission: TransmissionConfig::default(),
            handshake_timeout: Some(Duration::from_secs(10)),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_peer: DEFAULT_MAX_HANDSHAKES_PER_PEER,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            stall_timeout: Duration::from_secs(60),
            tls: None,
            allow_plain_tcp: false,
        }
    }
}

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding a listener failed.
    #[error("Cannot listen on {addr}")]
    Bind {
        /// The address as text.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A live server already listens on this Unix socket path.
    #[error("Socket {0} is in use by a live server")]
    SocketInUse(PathBuf),
    /// Creating the shutdown wake-up pipe or a thread failed.
    #[error("Cannot start server")]
    Start(#[source] io::Error),
    /// No listen address was given.
    #[error("No listen address given")]
    NoListener,
}

/// A connected socket of either family.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        // The peer may already be gone; shutdown is best effort.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Stream {
    /// The peer as the access check sees it (no TLS identity yet).
    fn peer(&self) -> Peer {
        let transport = match self {
            Stream::Unix(s) => Transport::Unix(unix_peer_cred(s.as_raw_fd())),
            Stream::Tcp(s) => match s.peer_addr() {
                Ok(a) => Transport::Tcp(a),
                Err(_) => Transport::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))),
            },
        };
        Peer {
            transport,
            tls_identity: None,
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// The socket during the handshake (plain, then possibly under TLS): every read may wait
/// only until the handshake's deadline (a per-read timeout alone would let a client that
/// sends a byte now and then hold its connection slot for ever).
struct DeadlineSock {
    s: Stream,
    deadline: Option<Instant>,
}

impl Read for DeadlineSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "NBD handshake deadline passed",
                ));
            }
            self.s.set_read_timeout(Some(left))?;
        }
        self.s.read(buf)
    }
}

impl Write for DeadlineSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

impl AsRawFd for DeadlineSock {
    fn as_raw_fd(&self) -> RawFd {
        self.s.as_raw_fd()
    }
}

impl DeadlineSock {
    /// Ends the handshake's deadline: transmission reads and writes block as long as needed.
    fn enter_transmission(&mut self) {
        self.deadline = None;
        let _ = self.s.set_write_timeout(None);
        let _ = self.s.set_read_timeout(None);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
    fn accept(&self) -> io::Result<(Stream, PeerKey)> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                let peer = peer_uid(s.as_raw_fd()).map_or(PeerKey::Unknown, PeerKey::Uid);
                (Stream::Unix(s), peer)
            }),
            Listener::Tcp(l) => l.accept().map(|(s, a)| {
                // Latency matters more than packet count for NBD replies.
                let _ = s.set_nodelay(true);
                (Stream::Tcp(s), PeerKey::of_ip(a.ip()))
            }),
        }
    }
}

/// Who is connecting, for the per-peer handshake cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    /// A TCP client: its IPv4 address, or its IPv6 /64 prefix (one host's share).
    Ip(IpAddr),
    /// A Unix socket client: its uid (`SO_PEERCRED`).
    Uid(u32),
    /// The credentials could not be read.
    Unknown,
}

impl PeerKey {
    fn of_ip(ip: IpAddr) -> PeerKey {
        match ip {
            IpAddr::V4(_) => PeerKey::Ip(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::Ip(IpAddr::V4(v4)),
                None => PeerKey::Ip(IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into())),
            },
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Ip(IpAddr::V6(a)) => write!(f, "{a}/64"),
            PeerKey::Ip(a) => write!(f, "{a}"),
            PeerKey::Uid(u) => write!(f, "uid {u}"),
            PeerKey::Unknown => write!(f, "unknown peer"),
        }
    }
}

/// The uid of a Unix socket's peer.
fn peer_uid(fd: RawFd) -> Option<u32> {
    crate::peer::unix_peer_cred(fd).map(|c| c.uid)
}

/// One open connection, as the accept path sees it.
struct Conn {
    /// A clone of the socket, to close it from another thread.
    stream: Stream,
    peer: PeerKey,
    /// Since when it is in the handshake (`None`: in transmission).
    handshake_since: Option<Instant>,
}

/// Why the accept path closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// Its peer had `max_handshakes_per_peer` handshakes open; its oldest was closed.
    PeerHandshakes,
    /// `max_handshakes` or `max_connections` was reached; the oldest handshake was closed.
    Handshakes,
    /// Every connection is in transmission: the newcomer was refused.
    Full,
    /// Out of file descriptors; the oldest handshake was closed.
    NoFds,
}

struct Shared {
    exports: Arc<dyn ExportTable>,
    cfg: ServerConfig,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Conn>>,
    conn_threads: Mutex<Vec<JoinHandle<()>>>,
    stats: Mutex<HashMap<String, Arc<ExportStats>>>,
    /// When each peer was last named in a warning (one line per peer per minute).
    warned: Mutex<HashMap<(PeerKey, u8), Instant>>,
}

/// A peer is named in a refusal or eviction warning at most once per this period.
const WARN_PERIOD: Duration = Duration::from_secs(60);
/// Peers remembered for [`WARN_PERIOD`]; beyond it the oldest are forgotten early.
const WARN_PEERS: usize = 1024;

impl Shared {
    fn stats_for(&self, name: &str) -> Arc<ExportStats> {
        let mut m = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(name.to_owned()).or_default())
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection finished its handshake: it no longer counts against the handshake
    /// caps and is never closed to make room.
    fn entered_transmission(&self, id: u64) {
        if let Some(c) = self.conns().get_mut(&id) {
            c.handshake_since = None;
        }
    }

    /// Logs that the accept path closed a connection of `peer`: once per peer and reason
    /// per [`WARN_PERIOD`], and rate limited overall.
    fn warn_closed(&self, peer: PeerKey, why: Closed) {
        let now = Instant::now();
        {
            let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            let key = (peer, why as u8);
            if w.get(&key)
                .is_some_and(|&t| now.duration_since(t) < WARN_PERIOD)
            {
                return;
            }
            if w.len() >= WARN_PEERS {
                w.retain(|_, t| now.duration_since(*t) < WARN_PERIOD);
                if w.len() >= WARN_PEERS {
                    w.clear();
                }
            }
            w.insert(key, now);
        }
        match why {
            Closed::PeerHandshakes => rl_event!(
                warn,
                %peer,
                limit = self.cfg.max_handshakes_per_peer,
                "NBD: too many connections in the handshake from one peer, closing its oldest"
            ),
            Closed::Handshakes => rl_event!(
                warn,
                %peer,
                handshakes = self.cfg.max_handshakes,
                connections = self.cfg.max_connections,
                "NBD: handshake or connection limit reached, closing the oldest handshake"
            ),
            Closed::Full => rl_event!(
                warn,
                %peer,
                limit = self.cfg.max_connections,
                "NBD connection limit reached, every connection in transmission: refusing client"
            ),
            Closed::NoFds => rl_event!(
                warn,
                %peer,
                "NBD: out of file descriptors, closing the oldest handshake"
            ),
        }
    }
}

/// Removes the connection longest in the handshake (of `peer` only, if given).
fn take_oldest_handshake(conns: &mut HashMap<u64, Conn>, peer: Option<PeerKey>) -> Option<Conn> {
    let id = conns
        .iter()
        .filter(|(_, c)| peer.is_none_or(|p| c.peer == p))
        .filter_map(|(&id, c)| c.handshake_since.map(|t| (t, id)))
        .min()?
        .1;
    conns.remove(&id)
}

/// Makes room for a new connection from `peer`: the connections to close for it, or
/// `Err` if the newcomer must be refused (every connection is in transmission).
fn make_room(
    conns: &mut HashMap<u64, Conn>,
    peer: PeerKey,
    cfg: &ServerConfig,
) -> Result<Vec<(Conn, Closed)>, ()> {
    let mut out = Vec::new();
    let handshaking = |conns: &HashMap<u64, Conn>, p: Option<PeerKey>| {
        conns
            .values()
            .filter(|c| c.handshake_since.is_some() && p.is_none_or(|p| c.peer == p))
            .count()
    };
    while handshaking(conns, Some(peer)) >= cfg.max_handshakes_per_peer.max(1) {
        match take_oldest_handshake(conns, Some(peer)) {
            Some(c) => out.push((c, Closed::PeerHandshakes)),
            None => break,
        }
    }
    while handshaking(conns, None) >= cfg.max_handshakes.max(1) {
        match take_oldest_handshake(conns, None) {
            Some(c) => out.push((c, Closed::Handshakes)),
            None => break,
        }
    }
    while conns.len() >= cfg.max_connections {
        match take_oldest_handshake(conns, None) {
            Some(c) => out.push((c, Closed::Handshakes)),
            None => {
                for (c, _) in &out {
                    c.stream.shutdown();
                }
                return Err(());
            }
        }
    }
    Ok(out)
}

/// A running NBD server. Dropping it shuts it down (see [`ServerHandle::shutdown`]).
pub struct ServerHandle {
    shared: Arc<Shared>,
    wake: Option<UnixStream>,
    accept_threads: Vec<JoinHandle<()>>,
    unix_paths: Vec<PathBuf>,
    tcp_addrs: Vec<SocketAddr>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("unix_paths", &self.unix_paths)
            .field("tcp_addrs", &self.tcp_addrs)
            .finish()
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ServerError::Bind {
        addr: path.display().to_string(),
        source,
    })
}

impl ServerHandle {
    /// Bind every address and start serving `exports`.
    pub fn start(
        exports: Arc<dyn ExportTable>,
        cfg: ServerConfig,
        listen: &[ListenAddr],
    ) -> Result<ServerHandle, ServerError> {
        if listen.is_empty() {
            return Err(ServerError::NoListener);
        }
        let mut listeners = Vec::new();
        let mut unix_paths = Vec::new();
        let mut tcp_addrs = Vec::new();
        let cleanup = |paths: &[PathBuf]| {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
        };
        for a in listen {
            let l = match a {
                ListenAddr::Unix(p) => bind_unix(p).map(|l| {
                    unix_paths.push(p.clone());
                    Listener::Unix(l, p.clone())
                }),
                ListenAddr::Tcp(sa) => TcpListener::bind(sa)
                    .map_err(|source| ServerError::Bind {
                        addr: sa.to_string(),
                        source,
                    })
                    .and_then(|l| {
                        let la = l.local_addr().map_err(ServerError::Start)?;
                        tcp_addrs.push(la);
                        Ok(Listener::Tcp(l))
                    }),
            };
            match l {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    cleanup(&unix_paths);
                    return Err(e);
                }
            }
        }
        let (wake_tx, wake_rx) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                cleanup(&unix_paths);
                return Err(ServerError::Start(e));
            }
        };
        let mut cfg = cfg;
        cfg.transmission.budget = BufferBudget::new(cfg.buffer_limit);
        let shared = Arc::new(Shared {
            exports,
            cfg,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            conn_threads: Mutex::new(Vec::new()),
            stats: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashMap::new()),
        });
        let wake_rx = Arc::new(wake_rx);
        let mut handle = ServerHandle {
            shared: Arc::clone(&shared),
            wake: Some(wake_tx),
            accept_threads: Vec::new(),
            unix_paths,
            tcp_addrs,
        };
        for l in listeners {
            let shared = Arc::clone(&shared);
            let wake_rx = Arc::clone(&wake_rx);
            let t = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&shared, &l, wake_rx.as_raw_fd()))
                .map_err(ServerError::Start);
            match t {
                Ok(t) => handle.accept_threads.push(t),
                Err(e) => return Err(e), // `handle` drops and cleans up what started
            }
        }
        Ok(handle)
    }

    /// Unix socket paths being served.
    pub fn unix_paths(&self) -> &[PathBuf] {
        &self.unix_paths
    }

    /// Bound TCP addresses (with the real port if 0 was requested).
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Counters for one export (by the name clients used), if any client selected it yet.
    pub fn stats(&self, export: &str) -> Option<StatsSnapshot> {
        let m = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        m.get(export).map(|s| s.snapshot())
    }

    /// Counters for every export that has been selected at least once.
    pub fn all_stats(&self) -> Vec<(String, StatsSnapshot)> {
        let m = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, s)| (k.clone(), s.snapshot())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Connections currently open (handshake or transmission).
    pub fn active_connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Connections currently in the handshake.
    pub fn handshaking_connections(&self) -> usize {
        let conns = self.shared.conns();
        conns
            .values()
            .filter(|c| c.handshake_since.is_some())
            .count()
    }

    /// Request buffer bytes reserved now (see [`ServerConfig::buffer_limit`]).
    pub fn buffer_bytes(&self) -> u64 {
        self.shared.cfg.transmission.budget.in_use()
    }

    /// Stop accepting, disconnect every client, join every thread and unlink socket files.
    /// Idempotent; also run by `Drop`.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(mut w) = self.wake.take() {
            // A byte on the wake socket makes every accept thread's poll return.
            let _ = w.write_all(&[1]);
            for t in self.accept_threads.drain(..) {
                let _ = t.join();
            }
            drop(w);
        }
        {
            let conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            for c in conns.values() {
                c.stream.shutdown();
            }
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .conn_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
        for p in self.unix_paths.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until `fd` or `wake` is readable. Returns true if the listener is ready.
fn wait_readable(fd: RawFd, wake: RawFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        return fds[0].revents != 0;
    }
}

fn accept_loop(shared: &Arc<Shared>, l: &Listener, wake: RawFd) {
    while !shared.stopping.load(Ordering::SeqCst) {
        if !wait_readable(l.fd(), wake) {
            break;
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let (stream, peer) = match l.accept() {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors: a connection stalled in the handshake gives its back.
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    let oldest = take_oldest_handshake(&mut shared.conns(), None);
                    if let Some(c) = oldest {
                        c.stream.shutdown();
                        shared.warn_closed(c.peer, Closed::NoFds);
                        drop(c);
                        // Its thread closes its own descriptor once it sees the shutdown.
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                }
                rl_event!(warn, error = %e, "NBD accept failed");
                // Back off briefly on e.g. EMFILE so we do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        reap(shared);
        spawn_conn(shared, stream, peer);
    }
    if let Listener::Unix(_, p) = l {
        tracing::debug!(path = %p.display(), "NBD unix listener stopped");
    }
}

fn reap(shared: &Shared) {
    let mut t = shared
        .conn_threads
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *t)
        .into_iter()
        .partition(|h| h.is_finished());
    *t = live;
    drop(t);
    for h in done {
        let _ = h.join();
    }
}

fn spawn_conn(shared: &Arc<Shared>, stream: Stream, peer: PeerKey) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let closed = {
        let mut conns = shared.conns();
        let closed = match make_room(&mut conns, peer, &shared.cfg) {
            Ok(c) => c,
            Err(()) => {
                drop(conns);
                stream.shutdown();
                shared.warn_closed(peer, Closed::Full);
                return;
            }
        };
        match stream.try_clone() {
            Ok(c) => {
                let conn = Conn {
                    stream: c,
                    peer,
                    handshake_since: Some(Instant::now()),
                };
                conns.insert(id, conn);
            }
            Err(e) => {
                rl_event!(warn, error = %e, "NBD: cannot clone socket");
                return;
            }
        }
        closed
    };
    // Their threads see the shutdown and end; their entries are already gone.
    for (c, why) in closed {
        c.stream.shutdown();
        shared.warn_closed(c.peer, why);
    }
    let sh = Arc::clone(shared);
    let r = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            serve_conn(&sh, id, stream);
            sh.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    match r {
        Ok(h) => shared
            .conn_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h),
        Err(e) => {
            rl_event!(warn, error = %e, "NBD: cannot spawn connection thread");
            if let Some(s) = shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
            {
                s.stream.shutdown();
            }
        }
    }
}

fn serve_conn(shared: &Shared, id: u64, stream: Stream) {
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    let peer = stream.peer();
    let policy = Policy {
        tls_offered: shared.cfg.tls.is_some(),
        tls_required: peer.is_tcp() && !shared.cfg.allow_plain_tcp,
    };
    let mut ctx = HandshakeCtx::new(peer, policy);
    let deadline = shared.cfg.handshake_timeout.map(|t| Instant::now() + t);
    let _ = stream.set_write_timeout(shared.cfg.handshake_timeout);
    let mut sock = DeadlineSock {
        s: stream,
        deadline,
    };
    let negotiated = negotiate_with(&mut sock, &*shared.exports, &mut ctx);
    match negotiated {
        Ok(Outcome::Go(session)) => {
            sock.enter_transmission();
            // Reads wake up now and then to check for a stall; replies may wait for socket
            // space only so long (SO_RCVTIMEO/SO_SNDTIMEO, shared by the writer's clone).
            let _ = sock.s.set_read_timeout(Some(STALL_CHECK));
            let _ = sock.s.set_write_timeout(Some(shared.cfg.stall_timeout));
            let writer = match sock.s.try_clone() {
                Ok(w) => w,
                Err(e) => {
                    rl_event!(warn, error = %e, "NBD: cannot clone socket");
                    return;
                }
            };
            run_transmission(shared, id, session, sock.s, writer);
        }
        Ok(Outcome::StartTls) => serve_tls(shared, id, sock, ctx),
        Err(e) => handshake_failed(&ctx.peer, e),
    }
}

/// How often a transmission-phase read wakes up to check whether its client stalls.
const STALL_CHECK: Duration = Duration::from_secs(1);

/// The reader of a connection in transmission. Its socket reads time out every
/// [`STALL_CHECK`]; a timeout is retried, unless the connection holds request buffers from
/// the shared budget and has received nothing for `timeout` — then the read fails and the
/// connection closes, giving the buffers back.
struct StallGuard<R> {
    r: R,
    held: HeldBytes,
    timeout: Duration,
    since: Option<Instant>,
}

impl<R: Read> Read for StallGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.r.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.held.get() == 0 {
                        self.since = None;
                        continue;
                    }
                    let since = *self.since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.timeout {
                        rl_event!(
                            warn,
                            held = self.held.get(),
                            "NBD client stalled while holding request buffers, disconnecting"
                        );
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client stalled while holding request buffers",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => {
                    self.since = None;
                    return other;
                }
            }
        }
    }
}

fn handshake_failed(peer: &Peer, e: HandshakeError) {
    match e {
        HandshakeError::Aborted => {}
        HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        e => rl_event!(info, error = %e, %peer, "NBD handshake failed"),
    }
}

/// After `STARTTLS`: the TLS handshake, the rest of the option haggling under TLS, then
/// transmission over TLS.
fn serve_tls(shared: &Shared, id: u64, sock: DeadlineSock, mut ctx: HandshakeCtx) {
    let Some(tls) = shared.cfg.tls.as_ref() else {
        return;
    };
    let (mut ssl, identity) = match tls.accept(sock) {
        Ok(x) => x,
        Err(why) => {
            handshake_failed(&ctx.peer, HandshakeError::Tls(why));
            return;
        }
    };
    ctx.tls_established(identity);
    match negotiate_with(&mut ssl, &*shared.exports, &mut ctx) {
        Ok(Outcome::Go(session)) => {
            ssl.get_mut().enter_transmission();
            if let Err(e) = ssl.get_ref().s.set_nonblocking(true) {
                rl_event!(warn, error = %e, "NBD: cannot make a TLS socket non-blocking");
                return;
            }
            let (r, w) = TlsShared::split(ssl, Some(STALL_CHECK), Some(shared.cfg.stall_timeout));
            run_transmission(shared, id, session, r, w);
        }
        Ok(Outcome::StartTls) => {
            handshake_failed(&ctx.peer, HandshakeError::Tls("STARTTLS twice".into()))
        }
        Err(e) => handshake_failed(&ctx.peer, e),
    }
}

fn run_transmission<R: Read, W: Write + Send + 'static>(
    shared: &Shared,
    id: u64,
    session: Session,
    reader: R,
    writer: W,
) {
    // From here on the connection serves a guest: caps never close it for a newcomer.
    shared.entered_transmission(id);
    let (budget, held) = shared.cfg.transmission.budget.scoped();
    let tcfg = TransmissionConfig {
        budget,
        ..shared.cfg.transmission.clone()
    };
    let reader = StallGuard {
        r: reader,
        held,
        timeout: shared.cfg.stall_timeout,
        since: None,
    };
    let stats = shared.stats_for(&session.name);
    ExportStats::inc(&stats.connections, 1);
    // Counts this connection as open until it ends, however it ends.
    struct Live(std::sync::Arc<ExportStats>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
    stats.live.fetch_add(1, Ordering::Relaxed);
    let _live = Live(stats.clone());
    tracing::debug!(export = %session.name, structured = session.structured, "NBD client entered transmission");
    match serve_transmission(reader, writer, session, stats, &tcfg) {
        Ok(()) => {}
        Err(TransmissionError::Io(e)) if shared.stopping.load(Ordering::SeqCst) => {
            tracing::trace!(error = %e, "NBD connection closed by shutdown");
        }
        Err(e) => rl_event!(info, error = %e, "NBD connection closed on error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_by_address_v6_by_prefix() {
        let p = |s: &str| PeerKey::of_ip(s.parse().unwrap());
        assert_eq!(p("10.0.0.1"), p("::ffff:10.0.0.1"));
        assert_ne!(p("10.0.0.1"), p("10.0.0.2"));
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn room_is_made_from_the_oldest_handshakes_never_from_transmission() {
        let cfg = ServerConfig {
            max_connections: 6,
            max_handshakes: 4,
            max_handshakes_per_peer: 2,
            ..Default::default()
        };
        let a = PeerKey::of_ip("10.0.0.1".parse().unwrap());
        let b = PeerKey::of_ip("10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let mut keep = Vec::new();
        let mut conns = HashMap::new();
        let mut add = |conns: &mut HashMap<u64, Conn>, id: u64, peer, since: Option<u64>| {
            let (x, y) = UnixStream::pair().unwrap();
            keep.push(y);
            let handshake_since = since.map(|ms| t0 + Duration::from_millis(ms));
            let conn = Conn {
                stream: Stream::Unix(x),
                peer,
                handshake_since,
            };
            conns.insert(id, conn);
        };
        // PeerKey a has two handshakes: its oldest (id 1) goes, b's are untouched.
        add(&mut conns, 1, a, Some(1));
        add(&mut conns, 2, a, Some(2));
        add(&mut conns, 3, b, Some(0));
        let ids = |v: Vec<(Conn, Closed)>| {
            let mut ids: Vec<_> = v.iter().map(|(c, why)| (c.handshake_since, *why)).collect();
            ids.sort_by_key(|x| x.0);
            ids
        };
        let out = make_room(&mut conns, a, &cfg).unwrap();
        assert_eq!(
            ids(out),
            [(Some(t0 + Duration::from_millis(1)), Closed::PeerHandshakes)]
        );
        assert!(!conns.contains_key(&1));
        // Four handshakes in all: the oldest of anyone's (b's, id 3) goes.
        add(&mut conns, 4, b, Some(4));
        add(&mut conns, 5, a, Some(5));
        let out = make_room(&mut conns, PeerKey::Unknown, &cfg).unwrap();
        assert_eq!(ids(out), [(Some(t0), Closed::Handshakes)]);
        // Full of connections in transmission: the newcomer is refused.
        conns.clear();
        for id in 0..6 {
            add(&mut conns, id, a, None);
        }
        assert!(make_room(&mut conns, b, &cfg).is_err());
        assert_eq!(conns.len(), 6);
    }
}
