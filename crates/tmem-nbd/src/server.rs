//! Listeners, per-connection threads and the [`ServerHandle`] with clean shutdown.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::ExportTable;
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
    /// Connections served at once; further ones are closed immediately. Default: 1024.
    pub max_connections: usize,
    /// TLS with pre-shared keys, offered to every client through `NBD_OPT_STARTTLS` when set.
    /// Default: none (STARTTLS answered with `NBD_REP_ERR_UNSUP`).
    pub tls: Option<TlsServer>,
    /// Serve TCP clients that did not start TLS. Default: false — a TCP client gets
    /// `NBD_REP_ERR_TLS_REQD` for everything but `STARTTLS` (and without a TLS setup, nothing).
    /// Unix-socket clients may always go without TLS; the export table decides what they open.
    pub allow_plain_tcp: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            transmission: TransmissionConfig::default(),
            handshake_timeout: Some(Duration::from_secs(10)),
            max_connections: 1024,
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
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Latency matters more than packet count for NBD replies.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

struct Shared {
    exports: Arc<dyn ExportTable>,
    cfg: ServerConfig,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Stream>>,
    conn_threads: Mutex<Vec<JoinHandle<()>>>,
    stats: Mutex<HashMap<String, Arc<ExportStats>>>,
}

impl Shared {
    fn stats_for(&self, name: &str) -> Arc<ExportStats> {
        let mut m = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(name.to_owned()).or_default())
    }
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
        let shared = Arc::new(Shared {
            exports,
            cfg,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            conn_threads: Mutex::new(Vec::new()),
            stats: Mutex::new(HashMap::new()),
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
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
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
            for s in conns.values() {
                s.shutdown();
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
        let stream = match l.accept() {
            Ok(s) => s,
            Err(e) => {
                rl_event!(warn, error = %e, "NBD accept failed");
                // Back off briefly on e.g. EMFILE so we do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        reap(shared);
        spawn_conn(shared, stream);
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

fn spawn_conn(shared: &Arc<Shared>, stream: Stream) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= shared.cfg.max_connections {
            rl_event!(warn, "NBD connection limit reached, refusing client");
            stream.shutdown();
            return;
        }
        match stream.try_clone() {
            Ok(c) => {
                conns.insert(id, c);
            }
            Err(e) => {
                rl_event!(warn, error = %e, "NBD: cannot clone socket");
                return;
            }
        }
    }
    let sh = Arc::clone(shared);
    let r = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            serve_conn(&sh, stream);
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
                s.shutdown();
            }
        }
    }
}

fn serve_conn(shared: &Shared, stream: Stream) {
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
            let writer = match sock.s.try_clone() {
                Ok(w) => w,
                Err(e) => {
                    rl_event!(warn, error = %e, "NBD: cannot clone socket");
                    return;
                }
            };
            run_transmission(shared, session, sock.s, writer);
        }
        Ok(Outcome::StartTls) => serve_tls(shared, sock, ctx),
        Err(e) => handshake_failed(&ctx.peer, e),
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
fn serve_tls(shared: &Shared, sock: DeadlineSock, mut ctx: HandshakeCtx) {
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
            let (r, w) = TlsShared::split(ssl);
            run_transmission(shared, session, r, w);
        }
        Ok(Outcome::StartTls) => {
            handshake_failed(&ctx.peer, HandshakeError::Tls("STARTTLS twice".into()))
        }
        Err(e) => handshake_failed(&ctx.peer, e),
    }
}

fn run_transmission<R: Read, W: Write + Send + 'static>(
    shared: &Shared,
    session: Session,
    reader: R,
    writer: W,
) {
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
    match serve_transmission(reader, writer, session, stats, &shared.cfg.transmission) {
        Ok(()) => {}
        Err(TransmissionError::Io(e)) if shared.stopping.load(Ordering::SeqCst) => {
            tracing::trace!(error = %e, "NBD connection closed by shutdown");
        }
        Err(e) => rl_event!(info, error = %e, "NBD connection closed on error"),
    }
}
