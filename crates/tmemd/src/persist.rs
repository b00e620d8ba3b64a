//! Persistence: what the daemon keeps across its restarts — the manifest (clients,
//! exports, managed guests), the saved streams of a clean stop, and the durable pool
//! memory of an unclean one — and how a start brings it all back.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tmem_api::ExportKind;
use tmem_core::{ClientConfig, ClientId, SaveOptions};
use tmem_exports::{CachedConfig, CachedExport, SwapConfig, SwapExport};

use crate::config::{codec_name, dedup_name, parse_codec, parse_dedup};
use crate::daemon::{chain, lock, Daemon, DaemonError, OpError};
use crate::exports::{Backend, Export};
use crate::state::{self, ClientEntry, ExportEntry, Manifest, StateError};

impl Daemon {
    /// Restores the saved state; returns the stream files it consumed (deleted by
    /// [`Daemon::commit_restore`] once the daemon is up, so a failed start keeps them).
    pub(crate) fn restore(&self) -> Vec<PathBuf> {
        let mut consumed = Vec::new();
        let m = match state::read_manifest(&self.paths.state) {
            Ok(Some(m)) => m,
            Ok(None) => return consumed,
            Err(e) => {
                let path = self.paths.state.join(state::MANIFEST);
                let moved = state::move_aside(&path)
                    .map(|p| format!("moved to {}", p.display()))
                    .unwrap_or_else(|e| format!("cannot move it aside: {e}"));
                self.warn(format!(
                    "Saved state is unusable, starting empty ({moved}): {}",
                    chain(&e)
                ));
                return consumed;
            }
        };
        if !m.clean && m.exports.iter().any(|e| e.kind == ExportKind::Swap) {
            if self.generation.is_some() && !self.old_generations.is_empty() {
                tracing::warn!(
                    "Previous tmemd did not shut down cleanly: recovering its persistent pages \
                     from durable memory and its spill files"
                );
            } else {
                self.warn(
                    "Previous tmemd did not shut down cleanly: pages that were in memory are lost; \
                     spilled pages are served where their checksums match, every other written \
                     page answers reads with EIO until the guest rewrites it"
                        .into(),
                );
            }
        }
        let mut restored: std::collections::HashMap<(u32, String), tmem_core::PoolId> =
            Default::default();
        // Saved persistent pages come back even if the budget or a cap was lowered meanwhile:
        // both are lifted during the restore and set afterwards (persistent pages are never
        // dropped; the pool stays over budget until guests release pages).
        let budget = self.engine.budget();
        self.engine.set_budget(u64::MAX);
        let n_clients = m.clients.len();
        for (i, c) in m.clients.iter().enumerate() {
            let id = ClientId(c.id);
            let cc = ClientConfig {
                weight: c.weight,
                persistent_cap: u64::MAX,
            };
            if let Err(e) = self.engine.add_client(id, cc) {
                self.warn(format!("Cannot restore client {}: {}", c.id, chain(&e)));
                continue;
            }
            if let (true, Some(name)) = (m.clean, &c.stream) {
                let path = self.paths.state.join(name);
                let what = format!("restoring client {} ({}/{n_clients})", c.id, i + 1);
                crate::notify::progress(&what);
                match self.restore_stream(id, &path, what) {
                    Ok(pools) => {
                        for (p, label) in pools {
                            restored.insert((c.id, label), p);
                        }
                        consumed.push(path);
                    }
                    Err(msg) => {
                        let moved = state::move_aside(&path)
                            .map(|p| format!("moved to {}", p.display()))
                            .unwrap_or_else(|e| format!("cannot move it aside: {e}"));
                        self.warn(format!(
                            "Corrupt state file {} for client {} ({moved}); its pages are lost: {msg}",
                            path.display(),
                            c.id
                        ));
                    }
                }
            }
            if let Some(cap) = c.persistent_cap {
                let _ = self.engine.set_persistent_cap(id, cap);
            }
            if c.frozen {
                let _ = self.engine.freeze(id);
            }
        }
        // Swap exports whose pages were not restored from a save (an unclean stop) get them
        // back from the durable memory the previous run left, if any.
        let recovered = self.recover_durable(&m, &restored);
        // Restored pages may have been stored raw (deferred compression): compress them
        // all before fitting the budget, so fitting never drops what compression would keep.
        while self.engine.compress_deferred(4096) > 0 {}
        self.engine.set_budget(budget);
        let held = self.engine.held_bytes();
        if held > budget {
            self.warn(format!(
                "Restored pages hold {held} bytes, over the budget of {budget} bytes"
            ));
        }
        crate::notify::progress(&format!("reopening {} exports", m.exports.len()));
        for e in &m.exports {
            let res = self.reopen_export(e, &restored, &recovered, m.clean);
            if let Err(err) = res {
                self.warn(format!(
                    "Cannot restore export {:?}: {}",
                    e.name,
                    chain(&err)
                ));
            }
        }
        // Guests the balloon manager managed come back under it (a guest whose QEMU is gone
        // meanwhile is reported and dropped).
        if !m.guests.is_empty() {
            crate::notify::progress(&format!("re-attaching {} guests", m.guests.len()));
        }
        for g in &m.guests {
            match self.guests.add(g) {
                Ok(_) => tracing::info!(guest = %g.name, "guest re-attached"),
                Err(e) => self.warn(format!(
                    "Cannot re-attach guest {:?}: {}",
                    g.name,
                    chain(&e)
                )),
            }
        }
        consumed
    }

    /// Once the daemon is up: marks the manifest not clean and deletes the consumed streams,
    /// so that a crash never brings back stale pages.
    pub(crate) fn commit_restore(&self, consumed: Vec<PathBuf>) {
        if let Err(e) = self.write_manifest() {
            self.warn(format!("Cannot rewrite manifest: {}", chain(&e)));
            return;
        }
        for p in consumed {
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove restored state file");
            }
        }
        // Earlier runs' durable memory was read back (or superseded by a clean save).
        for dir in &self.old_generations {
            if let Err(e) = fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove old durable memory");
            }
        }
    }

    /// Restores one client's saved stream; `what` names it in progress notifications.
    fn restore_stream(
        &self,
        client: ClientId,
        path: &Path,
        what: String,
    ) -> Result<Vec<(tmem_core::PoolId, String)>, String> {
        let f = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) => return Err(format!("cannot open: {e}")),
        };
        let mut r = BufReader::new(crate::notify::Progress::new(f, what));
        self.engine
            .restore(client, &mut r)
            .map(|rep| {
                tracing::info!(client = client.0, pages = rep.pages, "restored saved pages");
                rep.pools
            })
            .map_err(|e| chain(&e))
    }

    /// The swap configuration of a saved export.
    fn swap_config(&self, e: &ExportEntry) -> Result<SwapConfig, OpError> {
        Ok(SwapConfig {
            name: e.name.clone(),
            size: e.size,
            client: ClientId(e.client),
            spill_path: self.spill_path(&e.name),
            codec: parse_codec(&e.codec).map_err(OpError::Option)?,
            dedup: parse_dedup(&e.dedup).map_err(OpError::Option)?,
            spill_reserve: self.cfg.spill_reserve,
        })
    }

    /// Reads the durable memory of earlier runs back into new pools of the swap exports
    /// that were not restored from a save; returns those pools by export name. Old
    /// generations are read oldest first, so a page in a newer one wins.
    fn recover_durable(
        &self,
        m: &Manifest,
        restored: &std::collections::HashMap<(u32, String), tmem_core::PoolId>,
    ) -> std::collections::HashMap<String, tmem_core::PoolId> {
        let mut pools = std::collections::HashMap::new();
        if self.generation.is_none() || self.old_generations.is_empty() {
            return pools;
        }
        let mut tags = std::collections::HashMap::new();
        for e in m.exports.iter().filter(|e| e.kind == ExportKind::Swap) {
            let label = SwapExport::pool_label(&e.name);
            if restored.contains_key(&(e.client, label.clone())) {
                continue;
            }
            let pool = self.swap_config(e).and_then(|cfg| {
                SwapExport::create_pool(&self.engine, &cfg)
                    .map_err(|x| OpError::Export(e.name.clone(), x))
            });
            match pool {
                Ok(p) => {
                    tags.insert(tmem_core::durable_tag(&label), (ClientId(e.client), p));
                    pools.insert(e.name.clone(), p);
                }
                Err(err) => self.warn(format!(
                    "Cannot recover swap export {:?}: {}",
                    e.name,
                    chain(&err)
                )),
            }
        }
        if tags.is_empty() {
            return pools;
        }
        for dir in &self.old_generations {
            let mem = match crate::durable::DirMemory::open(dir) {
                Ok(m) => m,
                Err(e) => {
                    self.warn(format!("Cannot open durable memory {}: {e}", dir.display()));
                    continue;
                }
            };
            crate::notify::progress(&format!(
                "recovering persistent pages from {}",
                dir.display()
            ));
            let t0 = Instant::now();
            let rep = self.engine.recover(&mem, &|t| tags.get(&t).copied());
            tracing::info!(
                dir = %dir.display(),
                pages = rep.pages,
                torn = rep.torn_slots,
                failed = rep.failed,
                secs = t0.elapsed().as_secs_f64(),
                "recovered persistent pages from durable memory"
            );
            if rep.failed > 0 || !rep.damaged.is_empty() {
                self.warn(format!(
                    "Durable memory {}: {} pages recovered, {} could not be stored and {} were \
                     being written when the previous tmemd died (those answer reads with EIO \
                     until rewritten)",
                    dir.display(),
                    rep.pages,
                    rep.failed,
                    rep.damaged.len()
                ));
            }
        }
        pools
    }

    fn reopen_export(
        &self,
        e: &ExportEntry,
        restored: &std::collections::HashMap<(u32, String), tmem_core::PoolId>,
        recovered: &std::collections::HashMap<String, tmem_core::PoolId>,
        clean: bool,
    ) -> Result<(), OpError> {
        let codec = parse_codec(&e.codec).map_err(OpError::Option)?;
        let dedup = parse_dedup(&e.dedup).map_err(OpError::Option)?;
        let client = ClientId(e.client);
        let backend = match e.kind {
            ExportKind::Swap => {
                let cfg = SwapConfig {
                    name: e.name.clone(),
                    size: e.size,
                    client,
                    spill_path: self.spill_path(&e.name),
                    codec,
                    dedup,
                    spill_reserve: self.cfg.spill_reserve,
                };
                let label = e.pool_label.clone().unwrap_or(format!("swap:{}", e.name));
                if let Some(&pool) = recovered.get(&e.name) {
                    let (s, rep) = SwapExport::recover_with_pool(self.engine.clone(), cfg, pool)
                        .map_err(|x| OpError::Export(e.name.clone(), x))?;
                    tracing::info!(
                        name = %e.name,
                        in_pool = rep.in_pool,
                        spilled = rep.spilled,
                        poisoned = rep.poisoned,
                        "swap export recovered after an unclean stop"
                    );
                    if rep.poisoned > 0 {
                        self.warn(format!(
                            "Swap export {:?} (unclean stop): {} pages recovered from durable \
                             memory, {} spilled pages recovered, {} pages poisoned: reads of \
                             them fail with EIO until the guest rewrites or trims them",
                            e.name, rep.in_pool, rep.spilled, rep.poisoned
                        ));
                    }
                    self.insert_export(e, codec, dedup, Backend::Swap(s));
                    return Ok(());
                }
                match restored.get(&(e.client, label)) {
                    Some(&pool) => match SwapExport::attach(self.engine.clone(), cfg, pool) {
                        Ok(s) => Backend::Swap(s),
                        Err(x) => {
                            // Do not keep an unreachable pool around.
                            let _ = self.engine.destroy_pool(client, pool);
                            return Err(OpError::Export(e.name.clone(), x));
                        }
                    },
                    None => {
                        // An unclean stop, or a clean one whose save of this client failed:
                        // the spill file is kept, nothing unproven is served.
                        let (s, rep) = SwapExport::recover(self.engine.clone(), cfg)
                            .map_err(|x| OpError::Export(e.name.clone(), x))?;
                        let why = if clean {
                            "no saved pool found"
                        } else {
                            "unclean stop"
                        };
                        let map = if rep.map_found {
                            ""
                        } else {
                            " (no usable page map: every page)"
                        };
                        self.warn(format!(
                            "Swap export {:?} ({why}): {} spilled pages recovered, {} pages poisoned{map}: \
                             reads of them fail with EIO until the guest rewrites or trims them",
                            e.name, rep.spilled, rep.poisoned
                        ));
                        Backend::Swap(s)
                    }
                }
            }
            ExportKind::Cached => {
                let image = e
                    .image
                    .clone()
                    .ok_or_else(|| OpError::Invalid("cached export without image".into()))?;
                let cfg = CachedConfig {
                    name: e.name.clone(),
                    image,
                    client,
                    uuid: None,
                    direct_io: e.direct_io,
                    codec,
                    dedup,
                    writable: e.writable.unwrap_or(true),
                };
                Backend::Cached(self.open_cached(cfg, e.writable.is_none())?)
            }
        };
        self.insert_export(e, codec, dedup, backend);
        Ok(())
    }

    /// Opens a saved cached export. `legacy`: saved before exports had a `writable` flag,
    /// when they were opened read-write whenever the image allowed: do the same (a guest
    /// writing its disk keeps working across the upgrade) and say how to change it.
    fn open_cached(
        &self,
        mut cfg: CachedConfig,
        legacy: bool,
    ) -> Result<Arc<CachedExport>, OpError> {
        let name = cfg.name.clone();
        let mut r = CachedExport::open(self.engine.clone(), cfg.clone());
        if legacy {
            if let Err(tmem_exports::ExportError::ImageOpen { source, .. }) = &r {
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
                ) {
                    cfg.writable = false;
                    r = CachedExport::open(self.engine.clone(), cfg);
                }
            }
            if let Ok(c) = &r {
                if c.writable() {
                    self.warn(format!(
                        "Cached export {name:?} was saved by an older tmemd, which opened images \
                         read-write: it stays writable. Cached exports are read-only by default \
                         now; re-create it without --writable to protect a shared image"
                    ));
                }
            }
        }
        r.map_err(|x| OpError::Export(name, x))
    }

    fn insert_export(
        &self,
        e: &ExportEntry,
        codec: tmem_core::Codec,
        dedup: tmem_core::DedupScope,
        backend: Backend,
    ) {
        let size = backend.block().size();
        let writable = !backend.block().caps().read_only;
        self.attach_remote(&e.name, &backend);
        self.exports.insert(Arc::new(Export {
            name: e.name.clone(),
            kind: e.kind,
            size,
            client: ClientId(e.client),
            image: e.image.clone(),
            codec,
            dedup,
            direct_io: e.direct_io,
            access: e.access.clone(),
            writable,
            backend,
        }));
    }

    fn manifest(&self, clean: bool) -> Manifest {
        let clients = self
            .engine
            .clients()
            .into_iter()
            .filter_map(|id| self.engine.client_stats(id).ok())
            .map(|c| ClientEntry {
                id: c.client.0,
                weight: c.weight,
                persistent_cap: (c.persistent_cap != u64::MAX).then_some(c.persistent_cap),
                frozen: c.frozen,
                stream: clean.then(|| state::stream_name(c.client.0)),
            })
            .collect();
        let exports = self
            .exports
            .all()
            .iter()
            .map(|e| ExportEntry {
                name: e.name.clone(),
                kind: e.kind,
                size: e.size,
                client: e.client.0,
                image: e.image.clone(),
                pool_label: (e.kind == ExportKind::Swap).then(|| format!("swap:{}", e.name)),
                codec: codec_name(e.codec),
                dedup: dedup_name(e.dedup).into(),
                direct_io: e.direct_io,
                access: e.access.clone(),
                writable: (e.kind == ExportKind::Cached).then_some(e.writable),
            })
            .collect();
        Manifest {
            clean,
            clients,
            exports,
            guests: {
                let mut g = self.guests.requests();
                g.extend(lock(&self.stopped_guests).iter().cloned());
                g
            },
            ..Default::default()
        }
    }

    pub(crate) fn write_manifest(&self) -> Result<(), StateError> {
        state::write_manifest(&self.paths.state, &self.manifest(false))
    }

    pub(crate) fn manifest_changed(&self) {
        if let Err(e) = self.write_manifest() {
            tracing::error!(error = %chain(&e), "cannot write manifest");
        }
    }

    /// Saves every client's persistent pages and a clean manifest. A client whose save
    /// fails is left out (its swap exports come back empty, with a warning) and the first
    /// such error is returned after the manifest is written.
    pub(crate) fn save_all(&self) -> Result<(), DaemonError> {
        let mut first_err = None;
        let mut failed = Vec::new();
        let clients = self.engine.clients();
        let n_clients = clients.len();
        for (i, id) in clients.into_iter().enumerate() {
            let path = self.paths.state.join(state::stream_name(id.0));
            let engine = &self.engine;
            let what = format!("saving client {} ({}/{n_clients})", id.0, i + 1);
            crate::notify::progress(&what);
            let r = state::write_atomic(&path, |w| {
                engine.save(
                    id,
                    SaveOptions::default(),
                    &mut crate::notify::Progress::new(w, what),
                )
            });
            let err = match r {
                Ok(Ok(rep)) => {
                    tracing::info!(
                        client = id.0,
                        pages = rep.pages,
                        bytes = rep.bytes,
                        "saved pages"
                    );
                    continue;
                }
                Ok(Err(e)) => DaemonError::SaveClient(id.0, e),
                Err(e) => DaemonError::Save(e),
            };
            tracing::error!(client = id.0, error = %chain(&err), "cannot save client");
            let _ = fs::remove_file(&path);
            failed.push(id.0);
            first_err.get_or_insert(err);
        }
        let mut m = self.manifest(true);
        for c in &mut m.clients {
            if failed.contains(&c.id) {
                c.stream = None;
            }
        }
        state::write_manifest(&self.paths.state, &m).map_err(DaemonError::Save)?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(crate) fn spill_path(&self, name: &str) -> PathBuf {
        self.paths.spill.join(format!("{name}.spill"))
    }

    /// After serving stopped: saves every client's persistent pages and a clean manifest;
    /// the durable memory of this run goes once the save succeeded.
    pub(crate) fn finish_shutdown(&self) -> Result<(), DaemonError> {
        let d = self;
        let r = d.save_all();
        if let (Ok(()), Some(dir)) = (&r, &d.generation) {
            // Everything is in the saved streams: the durable copy is not needed (and a
            // reboot would lose it anyway). After a failed save it stays, for recovery.
            if let Err(e) = fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove durable memory");
            }
        }
        let _ = fs::remove_file(&d.paths.ctl);
        let _ = fs::remove_file(&d.paths.nbd);
        if r.is_ok() {
            tracing::info!("state saved, tmemd stopped");
        }
        r
    }
}
