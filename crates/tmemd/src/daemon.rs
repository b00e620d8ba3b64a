//! The daemon: engine, exports, NBD server, balloon guests, saved state.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tmem_api::{
    BudgetReply, ClientInfo, CreateClient, CreateExport, CreateGuest, DamagedExport, ExportInfo,
    ExportKind, GuestInfo, Held, InvalidateReply, NbdStats, Ops, PoolInfo, PoolSummary,
    ShrinkReply, Stats, Status,
};
use tmem_balloon::manager::ProcHost;
use tmem_core::{ClientConfig, ClientId, Engine, EngineConfig};
use tmem_exports::{CachedConfig, CachedExport, ExportError, SwapConfig, SwapExport};
use tmem_nbd::{ListenAddr, ServerConfig, ServerHandle, TlsServer};

use crate::balloon::{EnginePool, GuestError, GuestRuntime};
use crate::config::{parse_codec, parse_dedup, Config, ConfigError};
use crate::exports::{valid_name, Backend, Export, ExportSet};
use crate::http::{Handler, HttpServer};
use crate::lock::{DirLock, LockError};
use crate::state::StateError;
use crate::tenants::TenantKeys;

/// Errors of control operations (each maps to an HTTP status in `api`).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request is invalid.
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// An option value is invalid.
    #[error("Invalid option")]
    Option(#[source] ConfigError),
    /// No such client.
    #[error("Unknown client {0}")]
    UnknownClient(u32),
    /// The client exists.
    #[error("Client {0} already exists")]
    ClientExists(u32),
    /// The client still has exports.
    #[error("Client {0} still has exports: {1}")]
    ClientBusy(u32, String),
    /// The export has open NBD connections (delete with `force`).
    #[error("Export {0:?} has {1} open NBD connections (force to delete it anyway)")]
    ExportBusy(String, u64),
    /// No such export.
    #[error("Unknown export {0:?}")]
    UnknownExport(String),
    /// The operation applies to cached exports only.
    #[error("Export {0:?} is not a cached export")]
    NotCached(String),
    /// The export exists.
    #[error("Export {0:?} already exists")]
    ExportExists(String),
    /// The engine refused.
    #[error("Pool operation failed")]
    Engine(#[source] tmem_core::Error),
    /// Creating or releasing an export failed.
    #[error("Export {0:?} failed")]
    Export(String, #[source] ExportError),
    /// A balloon guest operation failed.
    #[error("Guest operation failed")]
    Guest(#[source] GuestError),
    /// The daemon is shutting down.
    #[error("Daemon is shutting down")]
    ShuttingDown,
}

/// Errors starting or stopping the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory or socket is not safe to use.
    #[error("Unsafe directory or socket")]
    Insecure(#[source] crate::secure::SecureError),
    /// The state or runtime directory could not be created.
    #[error("Cannot create directory {0}")]
    StateDir(PathBuf, #[source] io::Error),
    /// Another daemon owns the runtime or state directory.
    #[error("Cannot lock directory")]
    Lock(#[source] LockError),
    /// The NBD server did not start.
    #[error("Cannot start NBD server")]
    Nbd(#[source] tmem_nbd::ServerError),
    /// The TLS server could not be set up.
    #[error(transparent)]
    Tls(#[from] tmem_nbd::tls::TlsSetupError),
    /// A control or metrics socket could not be bound.
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] io::Error),
    /// Saving state failed.
    #[error("Cannot save state")]
    Save(#[source] StateError),
    /// Saving a client's pages failed.
    #[error("Cannot save pages of client {0}")]
    SaveClient(u32, #[source] tmem_core::Error),
}

/// Paths inside the runtime and state directories.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The state directory (spill files, saved state).
    pub dir: PathBuf,
    /// The runtime directory (sockets, lock); may be the state directory.
    pub runtime: PathBuf,
    /// NBD socket.
    pub nbd: PathBuf,
    /// Control socket.
    pub ctl: PathBuf,
    /// Saved state (manifest and streams).
    pub state: PathBuf,
    /// Spill files.
    pub spill: PathBuf,
}

impl Paths {
    /// The layout of a runtime directory and a state directory (the same one in the
    /// one-directory layout).
    pub fn new(runtime: &Path, dir: &Path) -> Self {
        Paths {
            dir: dir.to_owned(),
            runtime: runtime.to_owned(),
            nbd: runtime.join(tmem_api::NBD_SOCKET),
            ctl: runtime.join(tmem_api::CTL_SOCKET),
            state: dir.join("state"),
            spill: dir.join("spill"),
        }
    }

    /// Whether the runtime and state directories are one (compared once both exist).
    fn one_dir(&self) -> bool {
        match (fs::canonicalize(&self.runtime), fs::canonicalize(&self.dir)) {
            (Ok(a), Ok(b)) => a == b,
            _ => self.runtime == self.dir,
        }
    }
}

/// The control API's request handlers, made by the caller (`crate::api::handlers`): the
/// daemon serves them without depending on the API's routes, which depend on it.
pub struct ApiHandlers {
    /// Everything under `/api/v1` and `/metrics`, on the control socket.
    pub ctl: Arc<dyn Handler>,
    /// `/metrics` alone, on the optional TCP listener.
    pub metrics: Arc<dyn Handler>,
}

/// The daemon's shared state.
pub struct Daemon {
    pub(crate) cfg: Config,
    pub(crate) paths: Paths,
    pub(crate) engine: Arc<Engine>,
    pub(crate) pool: Arc<EnginePool>,
    pub(crate) exports: Arc<ExportSet>,
    /// The tenants' TLS keys.
    pub(crate) keys: TenantKeys,
    pub(crate) guests: GuestRuntime,
    pub(crate) nbd: Mutex<Option<ServerHandle>>,
    control: Mutex<()>,
    started: Instant,
    pub(crate) warnings: Mutex<Vec<String>>,
    pub(crate) stopping: AtomicBool,
    /// This run's durable pool generation (`None` with `durable_pool = false`).
    pub(crate) generation: Option<PathBuf>,
    /// Older generations, deleted once the restore is committed.
    pub(crate) old_generations: Vec<PathBuf>,
    /// Guests stopped by the shutdown, still saved in its manifest.
    pub(crate) stopped_guests: Mutex<Vec<tmem_api::CreateGuest>>,
    /// The program this process runs (for an upgrade without a new path).
    exe: Option<PathBuf>,
    /// The binary an upgrade requested (`POST /upgrade`) hands over to.
    upgrade_to: Mutex<Option<PathBuf>>,
    /// The remote tier behind the exports, and lending to it.
    pub(crate) remote: crate::remote::Remote,
    _lock: DirLock,
    _state_lock: Option<DirLock>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    tmem_api::ErrorBody::from_error(e).chain.join(": ")
}

/// What the running daemon owns besides [`Daemon`]: its listeners.
pub struct Running {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    ctl: HttpServer,
    metrics: Option<HttpServer>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    // The directory lock is held: any socket file here is stale.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DaemonError::Listen(path.display().to_string(), e)),
    }
    UnixListener::bind(path).map_err(|e| DaemonError::Listen(path.display().to_string(), e))
}

/// Compresses pages the engine stored raw (deferred compression) until the daemon stops.
fn spawn_compressor(daemon: std::sync::Weak<Daemon>) {
    let spawned = std::thread::Builder::new()
        .name("tmem-compress".into())
        .spawn(move || loop {
            let Some(d) = daemon.upgrade() else { break };
            if d.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let n = d.engine.compress_deferred(256);
            drop(d);
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the background compressor; deferred pages stay raw");
    }
}

/// Drops the guests the balloon manager finds gone (a libvirt domain destroyed, undefined or
/// restarted) and rewrites the manifest, so that no stale guest stays; ends with the daemon.
fn spawn_reaper(daemon: std::sync::Weak<Daemon>, gone: std::sync::mpsc::Receiver<String>) {
    use std::sync::mpsc::RecvTimeoutError;
    let spawned = std::thread::Builder::new()
        .name("tmem-reaper".into())
        .spawn(move || loop {
            match gone.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(name) => match daemon.upgrade() {
                    Some(d) => d.reap_guest(&name),
                    None => break,
                },
                Err(RecvTimeoutError::Timeout) => {
                    if daemon.strong_count() == 0 {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the guest reaper; gone guests stay listed");
    }
}

impl Daemon {
    /// Starts everything: locks the state directory, restores saved state, starts the NBD
    /// server and the control API (and the metrics listener if configured).
    pub fn start(
        cfg: Config,
        api: fn(&Arc<Daemon>) -> ApiHandlers,
    ) -> Result<Running, DaemonError> {
        crate::memory::tune_heap();
        let paths = Paths::new(&cfg.runtime_dir, &cfg.state_dir);
        for d in [&paths.runtime, &paths.dir, &paths.state, &paths.spill] {
            fs::create_dir_all(d).map_err(|e| DaemonError::StateDir(d.clone(), e))?;
        }
        // Never a symlink or someone else's directory; the runtime directory lets the
        // sockets' groups through (search only) when there are any.
        let runtime_mode = if cfg.nbd_socket.gid.is_some() || cfg.ctl_socket.gid.is_some() {
            0o710
        } else {
            0o700
        };
        for (d, mode) in [(&paths.runtime, runtime_mode), (&paths.dir, 0o700)] {
            crate::secure::own_dir(d, mode).map_err(DaemonError::Insecure)?;
        }
        if let Some(g) = cfg.nbd_socket.gid.or(cfg.ctl_socket.gid) {
            crate::secure::set_owner_and_mode(&paths.runtime, Some(g), runtime_mode)
                .map_err(DaemonError::Insecure)?;
        }
        // Both directories are locked: two daemons can share neither sockets nor spill files.
        let dir_lock = DirLock::acquire(&paths.runtime).map_err(DaemonError::Lock)?;
        let state_lock = if paths.one_dir() {
            None
        } else {
            Some(DirLock::acquire(&paths.dir).map_err(DaemonError::Lock)?)
        };
        let ecfg = EngineConfig {
            budget: cfg.budget,
            defer_compression_below: cfg.defer_compression,
            ..Default::default()
        };
        // Persistent pages live in durable memory under the runtime directory: they outlive
        // this process (see `durable`). Each run writes a new generation.
        let root = paths.runtime.join(crate::durable::POOL_DIR);
        let old: Vec<PathBuf> = crate::durable::generations(&root)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let (engine, generation) = if cfg.durable_pool {
            let next = crate::durable::generations(&root)
                .last()
                .map_or(1, |(n, _)| n + 1);
            let dir = crate::durable::generation_dir(&root, next);
            let mem = crate::durable::DirMemory::open(&dir)
                .map_err(|e| DaemonError::StateDir(dir.clone(), e))?;
            let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o700));
            (Engine::with_durable(ecfg, Arc::new(mem)), Some(dir))
        } else {
            (Engine::new(ecfg), None)
        };
        let engine = Arc::new(engine);
        let pool = Arc::new(EnginePool::new(engine.clone()));
        let guests = GuestRuntime::new(cfg.balloon.clone(), pool.clone(), Arc::new(ProcHost));
        let daemon = Arc::new(Daemon {
            cfg: cfg.clone(),
            paths: paths.clone(),
            engine,
            pool,
            exports: Arc::new(ExportSet::default()),
            keys: TenantKeys::new(
                cfg.nbd_psk_file.clone(),
                paths.runtime.join("tenants"),
                cfg.nbd_socket.gid,
            ),
            guests,
            nbd: Mutex::new(None),
            control: Mutex::new(()),
            started: Instant::now(),
            warnings: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            generation,
            old_generations: old,
            stopped_guests: Mutex::new(Vec::new()),
            exe: std::env::current_exe().ok(),
            upgrade_to: Mutex::new(None),
            remote: crate::remote::Remote::start(cfg.remote.as_ref(), cfg.lend.as_ref()),
            _lock: dir_lock,
            _state_lock: state_lock,
        });
        let consumed = daemon.restore();
        let mut listen = vec![ListenAddr::Unix(paths.nbd.clone())];
        if let Some(a) = cfg.nbd_tcp {
            listen.push(ListenAddr::Tcp(a));
        }
        let _ = fs::remove_file(&paths.nbd);
        daemon.exports.set_allow_plain_tcp(cfg.nbd_tcp_allow_plain);
        let tenants: Vec<String> = daemon
            .exports
            .all()
            .iter()
            .filter_map(|e| e.access.tenant.clone())
            .collect();
        if let Err(e) = daemon.keys.publish_all(tenants.iter().map(String::as_str)) {
            daemon.warn(format!("Tenant TLS keys not published: {e}"));
        }
        let tls = TlsServer::new(daemon.keys.store()).map_err(DaemonError::Tls)?;
        let lim = cfg.nbd_limits;
        let nbd_cfg = ServerConfig {
            tls: Some(tls),
            allow_plain_tcp: cfg.nbd_tcp_allow_plain,
            max_connections: lim.max_connections,
            max_handshakes: lim.max_handshakes,
            max_handshakes_per_peer: lim.max_handshakes_per_peer,
            buffer_limit: lim.buffer_limit,
            stall_timeout: std::time::Duration::from_secs(lim.stall_timeout_secs),
            ..ServerConfig::default()
        };
        let nbd = ServerHandle::start(daemon.exports.clone(), nbd_cfg, &listen)
            .map_err(DaemonError::Nbd)?;
        *lock(&daemon.nbd) = Some(nbd);
        crate::secure::set_owner_and_mode(&paths.nbd, cfg.nbd_socket.gid, cfg.nbd_socket.mode)
            .map_err(DaemonError::Insecure)?;
        let handlers = api(&daemon);
        let ctl = HttpServer::unix(bind_unix(&paths.ctl)?, handlers.ctl, tmem_api::MAX_BODY)
            .map_err(|e| DaemonError::Listen(paths.ctl.display().to_string(), e))?;
        crate::secure::set_owner_and_mode(&paths.ctl, cfg.ctl_socket.gid, cfg.ctl_socket.mode)
            .map_err(DaemonError::Insecure)?;
        let metrics = match cfg.metrics_addr {
            Some(a) => {
                let l = std::net::TcpListener::bind(a)
                    .map_err(|e| DaemonError::Listen(a.to_string(), e))?;
                Some(
                    HttpServer::tcp(l, handlers.metrics, 0)
                        .map_err(|e| DaemonError::Listen(a.to_string(), e))?,
                )
            }
            None => None,
        };
        daemon.commit_restore(consumed);
        if cfg.defer_compression > 0.0 {
            spawn_compressor(Arc::downgrade(&daemon));
        }
        if let Some(gone) = daemon.guests.take_gone() {
            spawn_reaper(Arc::downgrade(&daemon), gone);
        }
        crate::memory::spawn_compactor(
            Arc::downgrade(&daemon),
            crate::memory::CompactPolicy {
                threshold: cfg.compact_threshold,
                ..Default::default()
            },
        );
        tracing::info!(
            dir = %paths.dir.display(),
            runtime = %paths.runtime.display(),
            budget = cfg.budget,
            nbd = %paths.nbd.display(),
            ctl = %paths.ctl.display(),
            "tmemd started"
        );
        Ok(Running {
            daemon,
            ctl,
            metrics,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn warn(&self, msg: String) {
        tracing::error!("{msg}");
        lock(&self.warnings).push(msg);
    }

    // ------------------------------------------------------------------ queries

    /// `GET /status`.
    pub fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            state_dir: self.paths.dir.clone(),
            runtime_dir: self.paths.runtime.clone(),
            nbd_socket: self.paths.nbd.clone(),
            nbd_tcp: self.cfg.nbd_tcp.map(|a| a.to_string()),
            metrics_addr: self.cfg.metrics_addr.map(|a| a.to_string()),
            budget: self.engine.budget(),
            held_bytes: self.engine.held_bytes(),
            clients: self.engine.clients().len() as u64,
            exports: self.exports.all().len() as u64,
            guests: self.guests.len() as u64,
            warnings: lock(&self.warnings).clone(),
            damaged_exports: self
                .exports
                .all()
                .iter()
                .filter_map(|e| match &e.backend {
                    Backend::Swap(s) if s.poison().count() > 0 => Some(DamagedExport {
                        name: e.name.clone(),
                        poisoned_pages: s.poison().count(),
                    }),
                    _ => None,
                })
                .collect(),
        }
    }

    /// The status line sent with `READY=1`: what is being served and any warnings.
    pub fn ready_status(&self) -> String {
        let warnings = lock(&self.warnings).len();
        let mut s = format!(
            "serving {} exports, {} guests; pool {} of {}",
            self.exports.all().len(),
            self.guests.len(),
            tmem_api::format_size(self.engine.held_bytes()),
            tmem_api::format_size(self.engine.budget()),
        );
        if warnings > 0 {
            s.push_str(&format!("; {warnings} warnings (tmemctl status)"));
        }
        s
    }

    fn client_info(&self, id: ClientId) -> Result<ClientInfo, OpError> {
        let c = self.engine.client_stats(id).map_err(|e| match e {
            tmem_core::Error::UnknownClient(c) => OpError::UnknownClient(c.0),
            e => OpError::Engine(e),
        })?;
        Ok(ClientInfo {
            id: c.client.0,
            weight: c.weight,
            persistent_cap: (c.persistent_cap != u64::MAX).then_some(c.persistent_cap),
            frozen: c.frozen,
            ephemeral: held(&c.ephemeral),
            persistent: held(&c.persistent),
            ops: ops(&c.ops),
            pools: c.pools.iter().map(|p| p.0).collect(),
        })
    }

    /// `GET /clients`.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.engine
            .clients()
            .into_iter()
            .filter_map(|id| self.client_info(id).ok())
            .collect()
    }

    fn export_info(&self, e: &Export, nbd: Option<&ServerHandle>) -> ExportInfo {
        let n = nbd.and_then(|s| s.stats(&e.name)).unwrap_or_default();
        ExportInfo {
            name: e.name.clone(),
            kind: e.kind,
            size: e.size,
            client: e.client.0,
            pool: e.backend.pool().map(|p| p.0),
            image: e.image.clone(),
            writable: e.writable,
            uri: format!("nbd+unix:///{}?socket={}", e.name, self.paths.nbd.display()),
            access: e.access.clone(),
            tls_dir: e.access.tenant.as_deref().map(|t| self.keys.client_dir(t)),
            backend: e.backend.counters(&self.engine, e.client),
            nbd: NbdStats {
                connections: n.connections,
                live_connections: n.live_connections,
                reads: n.reads,
                writes: n.writes,
                flushes: n.flushes,
                trims: n.trims,
                write_zeroes: n.write_zeroes,
                bytes_read: n.bytes_read,
                bytes_written: n.bytes_written,
                errors: n.errors,
            },
        }
    }

    /// `GET /exports`.
    pub fn exports(&self) -> Vec<ExportInfo> {
        let nbd = lock(&self.nbd);
        self.exports
            .all()
            .iter()
            .map(|e| self.export_info(e, nbd.as_ref()))
            .collect()
    }

    /// `GET /exports/{name}`.
    pub fn export(&self, name: &str) -> Result<ExportInfo, OpError> {
        let e = self
            .exports
            .get(name)
            .ok_or_else(|| OpError::UnknownExport(name.to_owned()))?;
        let nbd = lock(&self.nbd);
        Ok(self.export_info(&e, nbd.as_ref()))
    }

    /// `GET /guests`.
    pub fn guests(&self) -> Vec<GuestInfo> {
        self.guests.list()
    }

    /// `GET /stats`.
    pub fn stats(&self) -> Stats {
        let s = self.engine.stats();
        let pool = PoolSummary {
            budget: s.budget,
            held_bytes: s.held_bytes,
            metadata_bytes: s.metadata_bytes,
            logical_bytes: s.logical_bytes,
            physical_bytes: s.alloc.payload_bytes,
            slab_bytes: s.alloc.held_bytes,
            pages: s.pages,
            ephemeral_pages: s.ephemeral_pages,
            persistent_pages: s.persistent_pages,
            same_pages: s.same_pages,
            unique_payloads: s.unique_payloads,
            freeable_bytes: s.freeable_bytes,
            effective_ratio: s.effective_ratio(),
            compression_ratio: s.compression_ratio(),
            dedup_ratio: s.dedup_ratio(),
            fragmentation: s.alloc.fragmentation(),
            clients: s.clients,
            pools: s.pools,
            ops: ops(&s.ops),
            resident_bytes: s.resident_bytes,
            process_rss_bytes: crate::memory::process_rss(),
            nbd_buffer_bytes: lock(&self.nbd).as_ref().map_or(0, |n| n.buffer_bytes()),
            compactable_bytes: s.alloc.compactable_bytes,
            compaction: tmem_api::CompactionSummary {
                runs: s.compaction.runs,
                moved: s.compaction.moved,
                slabs_freed: s.compaction.slabs_freed,
                bytes_freed: s.compaction.bytes_freed,
            },
        };
        let pools = self
            .engine
            .all_pool_stats()
            .into_iter()
            .map(|p| PoolInfo {
                id: p.pool.0,
                label: p.label,
                persistent: p.persistent,
                shared: p.shared,
                held: held(&p.held),
                ops: ops(&p.ops),
            })
            .collect();
        Stats {
            pool,
            clients: self.clients(),
            pools,
            exports: self.exports(),
            guests: self.guests(),
            remote: self.remote_info(),
        }
    }

    /// The remote tier's state, if one is configured.
    fn remote_info(&self) -> Option<tmem_api::RemoteInfo> {
        self.remote.info()
    }

    /// Puts the remote tier (if any) behind a new or restored export's backend.
    pub(crate) fn attach_remote(&self, name: &str, backend: &Backend) {
        if let Some(t) = self.remote.for_exports() {
            if let Err(e) = backend.set_remote(Some(t)) {
                self.warn(format!(
                    "Export {name}: remote tier not attached: {}",
                    chain(&e)
                ));
            }
        }
    }

    // ------------------------------------------------------------------ mutations

    fn guard(&self) -> Result<MutexGuard<'_, ()>, OpError> {
        let g = lock(&self.control);
        if self.stopping.load(Ordering::Relaxed) {
            return Err(OpError::ShuttingDown);
        }
        Ok(g)
    }

    fn next_client_id(&self) -> u32 {
        self.engine
            .clients()
            .iter()
            .map(|c| c.0)
            .max()
            .map_or(1, |m| m.saturating_add(1))
    }

    /// `POST /clients`.
    pub fn create_client(&self, req: &CreateClient) -> Result<ClientInfo, OpError> {
        let _g = self.guard()?;
        let id = req.id.unwrap_or_else(|| self.next_client_id());
        let cfg = ClientConfig {
            weight: req.weight.unwrap_or(100),
            persistent_cap: req.persistent_cap.map_or(u64::MAX, |s| s.0),
        };
        self.engine
            .add_client(ClientId(id), cfg)
            .map_err(|e| match e {
                tmem_core::Error::ClientExists(_) => OpError::ClientExists(id),
                e => OpError::Engine(e),
            })?;
        self.manifest_changed();
        self.client_info(ClientId(id))
    }

    /// `DELETE /clients/{id}`.
    pub fn delete_client(&self, id: u32) -> Result<(), OpError> {
        let _g = self.guard()?;
        let users: Vec<String> = self
            .exports
            .all()
            .iter()
            .filter(|e| e.client.0 == id)
            .map(|e| e.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(OpError::ClientBusy(id, users.join(", ")));
        }
        self.engine
            .remove_client(ClientId(id))
            .map_err(|e| match e {
                tmem_core::Error::UnknownClient(_) => OpError::UnknownClient(id),
                e => OpError::Engine(e),
            })?;
        self.manifest_changed();
        Ok(())
    }

    /// `POST /clients/{id}/freeze` (`freeze = true`) or `/thaw`.
    pub fn freeze_client(&self, id: u32, freeze: bool) -> Result<ClientInfo, OpError> {
        let _g = self.guard()?;
        let r = if freeze {
            self.engine.freeze(ClientId(id))
        } else {
            self.engine.thaw(ClientId(id))
        };
        r.map_err(|e| match e {
            tmem_core::Error::UnknownClient(_) => OpError::UnknownClient(id),
            e => OpError::Engine(e),
        })?;
        self.manifest_changed();
        self.client_info(ClientId(id))
    }

    /// `POST /exports`.
    pub fn create_export(&self, req: &CreateExport) -> Result<ExportInfo, OpError> {
        let _g = self.guard()?;
        if !valid_name(&req.name) {
            return Err(OpError::Invalid(format!(
                "export name {:?} must be 1-64 characters of A-Z a-z 0-9 . _ - (not starting with .)",
                req.name
            )));
        }
        if self.exports.contains(&req.name) {
            return Err(OpError::ExportExists(req.name.clone()));
        }
        let codec = match &req.codec {
            Some(c) => parse_codec(c).map_err(OpError::Option)?,
            None => self.cfg.codec,
        };
        let dedup = match &req.dedup {
            Some(d) => parse_dedup(d).map_err(OpError::Option)?,
            None => self.cfg.dedup,
        };
        match req.kind {
            ExportKind::Swap => {
                if req.image.is_some() {
                    return Err(OpError::Invalid("a swap export takes no image".into()));
                }
                if req.writable == Some(false) {
                    return Err(OpError::Invalid("a swap export is always writable".into()));
                }
                match req.size {
                    None => return Err(OpError::Invalid("a swap export needs a size".into())),
                    Some(s) if s.0 == 0 || s.0 % 4096 != 0 => {
                        return Err(OpError::Invalid(format!(
                            "swap size {} must be a non-zero multiple of 4096",
                            s.0
                        )))
                    }
                    Some(_) => {}
                }
            }
            ExportKind::Cached => {
                if req.image.is_none() {
                    return Err(OpError::Invalid("a cached export needs an image".into()));
                }
                if req.size.is_some() {
                    return Err(OpError::Invalid(
                        "a cached export takes its size from the image".into(),
                    ));
                }
            }
        }
        let (client, created) = match req.client {
            Some(id) => match self
                .engine
                .add_client(ClientId(id), ClientConfig::default())
            {
                Ok(()) => (ClientId(id), true),
                Err(tmem_core::Error::ClientExists(_)) => (ClientId(id), false),
                Err(e) => return Err(OpError::Engine(e)),
            },
            None => {
                let id = ClientId(self.next_client_id());
                self.engine
                    .add_client(id, ClientConfig::default())
                    .map_err(OpError::Engine)?;
                (id, true)
            }
        };
        let access = req.access.clone();
        if let Some(t) = &access.tenant {
            if !tmem_api::valid_tenant(t) {
                return Err(OpError::Invalid(format!(
                    "tenant {t:?} must be 1-64 characters of A-Z a-z 0-9 . _ - (not starting with .)"
                )));
            }
        } else if req.tenant_key.is_some() {
            return Err(OpError::Invalid("a tenant key needs a tenant".into()));
        }
        if let Some(t) = &access.tenant {
            // The key first: an export nobody can open is no use.
            self.keys
                .ensure(t, req.tenant_key.as_deref())
                .map_err(|e| OpError::Invalid(e.to_string()))?;
        }
        let made = match req.kind {
            ExportKind::Swap => SwapExport::create(
                self.engine.clone(),
                SwapConfig {
                    name: req.name.clone(),
                    size: req.size.map_or(0, |s| s.0),
                    client,
                    spill_path: self.spill_path(&req.name),
                    codec,
                    dedup,
                    spill_reserve: self.cfg.spill_reserve,
                },
            )
            .map(Backend::Swap),
            ExportKind::Cached => CachedExport::open(
                self.engine.clone(),
                CachedConfig {
                    name: req.name.clone(),
                    image: req.image.clone().unwrap_or_default(),
                    client,
                    uuid: None,
                    direct_io: req.direct_io.unwrap_or(false),
                    codec,
                    dedup,
                    writable: req.writable.unwrap_or(false),
                },
            )
            .map(Backend::Cached),
        };
        let backend = match made {
            Ok(b) => b,
            Err(e) => {
                if created {
                    let _ = self.engine.remove_client(client);
                }
                return Err(OpError::Export(req.name.clone(), e));
            }
        };
        let export = Arc::new(Export {
            name: req.name.clone(),
            kind: req.kind,
            size: backend.block().size(),
            client,
            image: req.image.clone(),
            codec,
            dedup,
            direct_io: req.direct_io.unwrap_or(false),
            access,
            writable: !backend.block().caps().read_only,
            backend,
        });
        self.attach_remote(&export.name, &export.backend);
        self.exports.insert(export.clone());
        self.manifest_changed();
        tracing::info!(name = %export.name, kind = %export.kind, size = export.size, client = client.0, writable = export.writable, "export added");
        let nbd = lock(&self.nbd);
        Ok(self.export_info(&export, nbd.as_ref()))
    }

    /// `DELETE /exports/{name}`.
    pub fn delete_export(&self, name: &str, force: bool) -> Result<(), OpError> {
        let _g = self.guard()?;
        if !force {
            let live = lock(&self.nbd)
                .as_ref()
                .and_then(|s| s.stats(name))
                .map_or(0, |n| n.live_connections);
            if live > 0 && self.exports.get(name).is_some() {
                // A guest's disk does not vanish under it by accident.
                return Err(OpError::ExportBusy(name.to_owned(), live));
            }
        }
        let e = self
            .exports
            .remove(name)
            .ok_or_else(|| OpError::UnknownExport(name.to_owned()))?;
        self.manifest_changed();
        tracing::info!(name, "export removed");
        e.backend
            .release()
            .map_err(|x| OpError::Export(name.to_owned(), x))
    }

    /// `POST /exports/{name}/invalidate`: drops every cached page of a cached export's
    /// image from the shared pool (a maintenance operation: it does not take the control
    /// lock, so it works while other changes are made).
    pub fn invalidate_export(&self, name: &str) -> Result<InvalidateReply, OpError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(OpError::ShuttingDown);
        }
        let e = self
            .exports
            .get(name)
            .ok_or_else(|| OpError::UnknownExport(name.to_owned()))?;
        let Backend::Cached(c) = &e.backend else {
            return Err(OpError::NotCached(name.to_owned()));
        };
        let ex = |x| OpError::Export(name.to_owned(), x);
        let check = c.check_image().map_err(ex)?;
        let dropped = c.invalidate_image().map_err(ex)?;
        Ok(InvalidateReply {
            name: name.to_owned(),
            pages_dropped: check.pages_dropped + dropped,
            path_replaced: check.path_replaced,
        })
    }

    /// `PUT /budget`.
    pub fn set_budget(&self, bytes: u64) -> Result<BudgetReply, OpError> {
        let _g = self.guard()?;
        if bytes == 0 {
            return Err(OpError::Invalid("budget must be above 0".into()));
        }
        let released = self.pool.set_ceiling(bytes);
        crate::memory::trim_heap();
        tracing::info!(budget = bytes, released, "budget set");
        Ok(BudgetReply {
            budget: self.engine.budget(),
            released,
        })
    }

    /// `POST /upgrade`: checks that `binary` (default: the program this process runs) is
    /// an executable file and asks the main loop to hand over to it (SIGUSR2 to itself).
    pub fn upgrade(&self, binary: Option<PathBuf>) -> Result<tmem_api::UpgradeReply, OpError> {
        use std::os::unix::fs::PermissionsExt;
        let _g = self.guard()?;
        let binary = binary
            .or_else(|| self.exe.clone())
            .ok_or_else(|| OpError::Invalid("the running binary's path is unknown".into()))?;
        match fs::metadata(&binary) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => {
                return Err(OpError::Invalid(format!(
                    "{} is not an executable file",
                    binary.display()
                )))
            }
            Err(e) => {
                return Err(OpError::Invalid(format!(
                    "cannot use {}: {e}",
                    binary.display()
                )))
            }
        }
        *lock(&self.upgrade_to) = Some(binary.clone());
        // SAFETY: kill(2) on our own pid with a signal the main loop handles.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGUSR2);
        }
        Ok(tmem_api::UpgradeReply {
            pid: std::process::id(),
            binary,
        })
    }

    /// `POST /shrink`.
    pub fn shrink(&self, bytes: u64) -> Result<ShrinkReply, OpError> {
        let _g = self.guard()?;
        let released = self.engine.shrink(bytes);
        crate::memory::trim_heap();
        Ok(ShrinkReply {
            requested: bytes,
            released,
        })
    }

    /// `POST /compact`: compacts the pool now (until nothing more can be freed, or
    /// `max_moves` payloads moved) and trims the heap; reports the RSS before and after.
    pub fn compact(&self, max_moves: Option<u64>) -> Result<tmem_api::CompactReply, OpError> {
        let rss_before = crate::memory::process_rss();
        let limit = max_moves.map_or(usize::MAX, |m| m.min(usize::MAX as u64) as usize);
        let mut total = tmem_core::CompactStep::default();
        while (total.moved as usize) < limit {
            let step = self
                .engine
                .compact((limit - total.moved as usize).min(1 << 16));
            total.moved += step.moved;
            total.slabs_freed += step.slabs_freed;
            total.bytes_freed += step.bytes_freed;
            if step.moved == 0 && step.slabs_freed == 0 {
                break;
            }
        }
        crate::memory::trim_heap();
        let rss_after = crate::memory::process_rss();
        tracing::info!(
            moved = total.moved,
            freed = total.bytes_freed,
            rss_before,
            rss_after,
            "compacted"
        );
        Ok(tmem_api::CompactReply {
            moved: total.moved,
            slabs_freed: total.slabs_freed,
            bytes_freed: total.bytes_freed,
            rss_before,
            rss_after,
        })
    }

    /// `POST /guests`.
    pub fn add_guest(&self, req: &CreateGuest) -> Result<GuestInfo, OpError> {
        let _g = self.guard()?;
        let info = self.guests.add(req).map_err(OpError::Guest)?;
        self.manifest_changed();
        Ok(info)
    }

    /// Drops a guest the balloon manager found gone (if it still is) and saves the manifest.
    pub(crate) fn reap_guest(&self, name: &str) {
        let Ok(_g) = self.guard() else { return };
        if self.guests.reap(name) {
            tracing::info!(guest = %name, "gone guest removed");
            self.manifest_changed();
        }
    }

    /// `DELETE /guests/{name}`.
    pub fn remove_guest(&self, name: &str) -> Result<(), OpError> {
        let _g = self.guard()?;
        self.guests.remove(name).map_err(OpError::Guest)?;
        self.manifest_changed();
        Ok(())
    }
}

impl Running {
    /// Stops serving in order: control API and metrics, balloon guests, NBD server; then
    /// flushes every export (spill files and page maps synced).
    fn stop_serving(&mut self) -> Arc<Daemon> {
        let d = self.daemon.clone();
        {
            let _g = lock(&d.control);
            d.stopping.store(true, Ordering::Relaxed);
        }
        self.ctl.shutdown();
        if let Some(m) = self.metrics.as_mut() {
            m.shutdown();
        }
        *lock(&d.stopped_guests) = d.guests.stop_all();
        if let Some(nbd) = lock(&d.nbd).take() {
            nbd.shutdown();
        }
        for e in d.exports.all() {
            if let Err(err) = e.backend.flush() {
                tracing::error!(export = %e.name, error = %chain(&err), "flush failed");
            }
        }
        d.remote.shutdown();
        d
    }

    /// The binary to hand over to: the one `POST /upgrade` named, else the path this
    /// process was started from (read at start, so a package that replaced the file is
    /// found there).
    pub fn upgrade_target(&self) -> Option<PathBuf> {
        lock(&self.daemon.upgrade_to)
            .clone()
            .or_else(|| self.daemon.exe.clone())
    }

    /// Hands over to a new binary without saving: stops serving, flushes every export,
    /// writes the manifest (with the managed guests) and replaces this process with `binary`
    /// (same PID, same arguments). The new process finds the manifest not clean and this
    /// run's durable pool memory, and recovers every persistent page from it, as after a
    /// crash, only without losing a request in flight; QEMU's NBD client reconnects
    /// (`reconnect-delay`). Returns only if the exec failed, after saving everything as a
    /// shutdown would.
    pub fn hand_over(mut self, binary: &Path) -> Result<(), DaemonError> {
        let d = self.stop_serving();
        if let Err(e) = d.write_manifest() {
            tracing::error!(error = %chain(&e), "cannot write the manifest before the hand-over");
        } else {
            let _ = fs::remove_file(&d.paths.ctl);
            let _ = fs::remove_file(&d.paths.nbd);
            tracing::info!(binary = %binary.display(), "handing over to a new tmemd");
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new(binary)
                .args(std::env::args_os().skip(1))
                .exec();
            tracing::error!(error = %err, binary = %binary.display(), "upgrade failed: cannot run the new binary; saving and stopping");
        }
        crate::notify::stopping("upgrade failed: saving state");
        d.finish_shutdown()
    }

    /// Stops everything in order: control API and metrics, balloon guests, NBD server; then
    /// flushes every export and saves every client's persistent pages.
    pub fn shutdown(mut self) -> Result<(), DaemonError> {
        let d = self.stop_serving();
        d.finish_shutdown()
    }
}

fn held(h: &tmem_core::HeldStats) -> Held {
    Held {
        pages: h.pages,
        same_pages: h.same_pages,
        charged_bytes: h.charged_bytes,
        logical_bytes: h.logical_bytes(),
    }
}

fn ops(o: &tmem_core::OpStats) -> Ops {
    Ops {
        puts: o.puts,
        puts_refused: o.puts_refused,
        gets: o.gets,
        get_hits: o.get_hits,
        get_misses: o.get_misses,
        flushes: o.flushes,
        evictions: o.evictions,
        zero_puts: o.zero_puts,
        same_puts: o.same_puts,
        dedup_hits: o.dedup_hits,
        compressed_puts: o.compressed_puts,
        raw_puts: o.raw_puts,
    }
}
