//! The daemon's dynamic export table: exports added and removed at runtime, served by the
//! NBD server through [`tmem_nbd::ExportTable`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tmem_api::{BackendCounters, ExportAccess, ExportKind};
use tmem_core::{ClientId, Codec, DedupScope, Engine, PoolId};
use tmem_exports::{CachedExport, ExportError, SwapExport};
use tmem_nbd::{BlockBackend, ExportInfo, ExportTable, Peer};

/// The store behind an export.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A swap export.
    Swap(Arc<SwapExport>),
    /// A cached image export.
    Cached(Arc<CachedExport>),
}

impl Backend {
    /// The backend as the NBD server sees it.
    pub fn block(&self) -> Arc<dyn BlockBackend> {
        match self {
            Backend::Swap(s) => s.clone(),
            Backend::Cached(c) => c.clone(),
        }
    }

    /// The pool the export keeps its pages in, when it has one of its own.
    pub fn pool(&self) -> Option<PoolId> {
        match self {
            Backend::Swap(s) => Some(s.pool()),
            Backend::Cached(c) => Some(c.pool()),
        }
    }

    /// Backend counters (`engine` and `client` give the cached pool's page count).
    pub fn counters(&self, engine: &Engine, client: ClientId) -> BackendCounters {
        match self {
            Backend::Swap(s) => {
                let st = s.stats();
                BackendCounters {
                    pool_pages: st.pages_in_pool,
                    spilled_pages: st.pages_spilled,
                    sectors_read: 0,
                    sectors_written: 0,
                    hits: 0,
                    misses: 0,
                    poisoned_pages: st.poisoned_pages,
                    spill_errors: st.spill_errors,
                    remote_pages: st.pages_remote,
                    remote_hits: st.remote_reads,
                    remote_misses: 0,
                    remote_fallbacks: st.remote_fallbacks,
                    remote_errors: st.remote_read_errors,
                    demoted_pages: 0,
                }
            }
            Backend::Cached(c) => {
                let st = c.stats();
                BackendCounters {
                    pool_pages: engine
                        .pool_stats(client, c.pool())
                        .map_or(0, |p| p.held.pages),
                    spilled_pages: 0,
                    sectors_read: st.sectors_read,
                    sectors_written: st.sectors_written,
                    hits: st.cache_hits,
                    misses: st.cache_misses,
                    poisoned_pages: 0,
                    spill_errors: 0,
                    remote_pages: 0,
                    remote_hits: st.remote_hits,
                    remote_misses: st.remote_misses + st.remote_stale,
                    remote_fallbacks: 0,
                    remote_errors: 0,
                    demoted_pages: st.demoted,
                }
            }
        }
    }

    /// Makes completed writes durable (spill file or image).
    pub fn flush(&self) -> Result<(), tmem_nbd::BackendError> {
        self.block().flush()
    }

    /// Puts the remote tier behind the export (or takes it away with `None`).
    pub fn set_remote(
        &self,
        tier: Option<Arc<dyn tmem_exports::RemoteTier>>,
    ) -> Result<(), ExportError> {
        match self {
            Backend::Swap(s) => {
                s.set_remote(tier);
                Ok(())
            }
            Backend::Cached(c) => c.set_remote(tier),
        }
    }

    /// Destroys a swap export (pool and spill file) or closes a cached one.
    pub fn release(&self) -> Result<(), ExportError> {
        match self {
            Backend::Swap(s) => s.destroy(),
            Backend::Cached(c) => c.close(),
        }
    }
}

/// One export and how it was made.
#[derive(Debug, Clone)]
pub struct Export {
    /// Name (= NBD export name).
    pub name: String,
    /// Kind.
    pub kind: ExportKind,
    /// Size in bytes.
    pub size: u64,
    /// Client.
    pub client: ClientId,
    /// Cached: the image.
    pub image: Option<PathBuf>,
    /// Codec.
    pub codec: Codec,
    /// Dedup scope.
    pub dedup: DedupScope,
    /// Cached: O_DIRECT.
    pub direct_io: bool,
    /// Who may open it over NBD.
    pub access: ExportAccess,
    /// Whether clients may write (swap: always; cached: only when created writable).
    pub writable: bool,
    /// The store.
    pub backend: Backend,
}

/// Whether `peer` may open an export with `access` (`allow_plain_tcp`: the operator lets
/// TCP clients without TLS reach open exports).
pub fn permits(access: &ExportAccess, peer: &Peer, allow_plain_tcp: bool) -> bool {
    if access.is_open() {
        // Open exports are for clients that did not prove a tenant identity: a tenant's
        // connection sees only its own exports.
        return peer.tls_identity.is_none() && (!peer.is_tcp() || allow_plain_tcp);
    }
    if let (Some(t), Some(id)) = (&access.tenant, &peer.tls_identity) {
        if t == id {
            return true;
        }
    }
    peer.unix_cred()
        .is_some_and(|c| access.allow_uids.contains(&c.uid) || access.allow_gids.contains(&c.gid))
}

/// Name → export, read by every NBD `GO`/`LIST` and changed by the control API.
#[derive(Debug, Default)]
pub struct ExportSet {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
    /// TCP clients without TLS may open open exports (`nbd_tcp_allow_plain`).
    allow_plain_tcp: std::sync::atomic::AtomicBool,
}

impl ExportSet {
    /// Lets TCP clients without TLS open exports that have no access restriction.
    pub fn set_allow_plain_tcp(&self, allow: bool) {
        self.allow_plain_tcp
            .store(allow, std::sync::atomic::Ordering::Relaxed);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an export; `false` if the name is taken.
    pub fn insert(&self, e: Arc<Export>) -> bool {
        let mut m = self.write();
        if m.contains_key(&e.name) {
            return false;
        }
        m.insert(e.name.clone(), e);
        true
    }

    /// Removes an export.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.write().remove(name)
    }

    /// One export.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.read().get(name).cloned()
    }

    /// Whether the name is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// All exports, by name.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.read().values().cloned().collect()
    }

    /// Removes every export (for shutdown).
    pub fn drain(&self) -> Vec<Arc<Export>> {
        std::mem::take(&mut *self.write()).into_values().collect()
    }
}

impl ExportTable for ExportSet {
    /// Called for each client selecting an export: a cached export first checks that its
    /// image did not change underneath (dropping stale cached pages if it did).
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        let e = self.read().get(name).cloned()?;
        if let Backend::Cached(c) = &e.backend {
            if let Err(err) = c.check_image() {
                tracing::warn!(name, error = %crate::daemon::chain(&err), "cannot check the cached export's image");
            }
        }
        Some(e.backend.block())
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.read()
            .values()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                description: format!("tmem {} export, client {}", e.kind, e.client.0),
            })
            .collect()
    }

    fn permits(&self, name: &str, peer: &Peer) -> bool {
        let plain_tcp = self
            .allow_plain_tcp
            .load(std::sync::atomic::Ordering::Relaxed);
        self.read()
            .get(name)
            .is_some_and(|e| permits(&e.access, peer, plain_tcp))
    }
}

pub use tmem_api::valid_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        use tmem_nbd::{Transport, UnixCred};
        let unix = |uid, gid| Peer {
            transport: Transport::Unix(Some(UnixCred { pid: 1, uid, gid })),
            tls_identity: None,
        };
        let tls = |id: &str, tcp: bool| Peer {
            transport: if tcp {
                Transport::Tcp(([127, 0, 0, 1], 9).into())
            } else {
                Transport::Unix(Some(UnixCred {
                    pid: 1,
                    uid: 0,
                    gid: 0,
                }))
            },
            tls_identity: Some(id.into()),
        };
        let tcp_plain = Peer {
            transport: Transport::Tcp(([127, 0, 0, 1], 9).into()),
            tls_identity: None,
        };
        let open = ExportAccess::default();
        assert!(permits(&open, &unix(0, 0), false));
        assert!(
            !permits(&open, &tls("a", false), false),
            "a tenant sees only its own"
        );
        assert!(!permits(&open, &tcp_plain, false));
        assert!(permits(&open, &tcp_plain, true));
        let a = ExportAccess {
            tenant: Some("a".into()),
            allow_uids: vec![107],
            allow_gids: vec![200],
        };
        assert!(permits(&a, &tls("a", true), false));
        assert!(permits(&a, &tls("a", false), false));
        assert!(!permits(&a, &tls("b", true), false));
        assert!(
            !permits(&a, &unix(0, 0), false),
            "root without TLS is not the tenant"
        );
        assert!(!permits(&a, &tcp_plain, true));
        assert!(permits(&a, &unix(107, 5), false));
        assert!(permits(&a, &unix(5, 200), false));
        assert!(!permits(&a, &unix(5, 5), false));
    }

    #[test]
    fn names() {
        assert!(valid_name("swap-1.vm_a"));
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
