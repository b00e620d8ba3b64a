//! The cached export: a raw image file fronted by a shared ephemeral pool (shared
//! cleancache) that every client using the same image joins.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard, RwLock};
use tmem_core::{
    ClientId, Codec, DedupScope, Engine, EvictionSink, ObjectId, PageKey, PageState, PoolId,
    PoolSpec, PoolUuid, PAGE_SIZE,
};
use tmem_nbd::{BackendCaps, BackendError, BlockBackend, Extent, ZeroRanges};

use crate::identity::{self, ImageCheck, ImageIdentity, PathState};
use crate::remote::RemoteTier;
use crate::sys::{self, rl_log, AlignedBuf};
use crate::{check_range, ExportError, MAX_EXPORT_BYTES};

use Ordering::{Acquire, Relaxed, Release};

const PAGE: u64 = PAGE_SIZE as u64;
/// Page-lock / generation stripes per image (power of two).
const STRIPES: usize = 256;
/// Most pages `read_may_block` looks at; a longer read is taken to be slow.
const MAY_BLOCK_MAX_PAGES: u64 = 64;
/// Most pages read from or written to the image in one system call.
const MAX_RUN: u64 = 64;
/// Most bytes one `cache` (prefetch) request reads.
const PREFETCH_MAX: u64 = 64 << 20;

/// How a cached export is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedConfig {
    /// Export name (the pool is labelled `cached:<name>` when this export creates it).
    pub name: String,
    /// The raw backing image (a regular file or a block device).
    pub image: PathBuf,
    /// The client (guest) reading through this export.
    pub client: ClientId,
    /// The shared pool's UUID. `None`: derived from the image's device and inode numbers,
    /// so every export of the same file shares one cache.
    pub uuid: Option<PoolUuid>,
    /// Open the image with `O_DIRECT` (falls back to buffered I/O, with a log line, where
    /// the filesystem refuses it).
    pub direct_io: bool,
    /// How the pool compresses pages (must match other members of the pool).
    pub codec: Codec,
    /// Where the pool looks for duplicates (must match other members; `Global` on both
    /// pools lets identical blocks of different images share payloads).
    pub dedup: DedupScope,
    /// Open the image read-write and let clients write, trim and zero it. Default
    /// `false`: the image is opened `O_RDONLY`, the export is advertised read-only to NBD
    /// clients and writes fail with `EPERM` — a shared base image is never changed by one
    /// of the guests using it. A writable export whose image cannot be opened for writing
    /// fails to open (it is never silently downgraded).
    pub writable: bool,
}

/// Counters of a cached export (this export's requests only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachedStats {
    /// 512-byte sectors read from the image (real I/O: cache misses and read-modify-write).
    pub sectors_read: u64,
    /// 512-byte sectors written to the image (real I/O).
    pub sectors_written: u64,
    /// Pages found in the cache.
    pub cache_hits: u64,
    /// Pages not found in the cache (read from the image).
    pub cache_misses: u64,
    /// Pages put into the cache (after a miss, or replacing a written page).
    pub pages_inserted: u64,
    /// Cached pages invalidated by writes, trims and zeroing (each touched page once).
    pub invalidations: u64,
    /// Missed pages not inserted because a write raced with the read.
    pub insert_races: u64,
    /// Read requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// Whether the image is really open with `O_DIRECT`.
    pub direct_io: bool,
    /// Whether the export is read-only (not [`CachedConfig::writable`]).
    pub read_only: bool,
    /// Times the image was found changed underneath the export (or invalidated by hand)
    /// and every cached page of it was dropped.
    pub image_invalidations: u64,
    /// Pages dropped by those invalidations.
    pub pages_dropped: u64,
    /// Missed pages served by the remote tier (a copy of the current version).
    pub remote_hits: u64,
    /// Missed pages asked of the remote tier that it did not have (or could not serve).
    pub remote_misses: u64,
    /// Remote copies refused because the page was written since they left the pool.
    pub remote_stale: u64,
    /// Pages of this image the shared pool evicted and handed to the remote tier (every
    /// export of the image reports the same count).
    pub demoted: u64,
}

/// Locks and generation counters shared by every export of one image in one engine.
///
/// Generation protocol (a seqlock per stripe): a writer holds the stripe locks of the
/// pages it writes and bumps their generations to odd before touching the image and back
/// to even after the cache holds the new content. A reader that missed records the
/// generation *before* reading the image and inserts the page only if, under the stripe
/// lock, the generation is even and unchanged. So a page read before or during a write is
/// never inserted after that write invalidated the cache.
///
/// `ident` is the image's identity as last recorded (at the first open, after a writable
/// export's own writes, after an invalidation); every export of the image checks against
/// it, so one change underneath is acted on once. Writes hold `writing` shared until
/// they re-recorded the identity, a check holds it exclusively while it compares: a
/// check never mistakes a write of ours in progress for a change underneath.
///
/// `space` names the image's copies in a remote tier: the pool UUID and a random epoch
/// drawn when this registry entry is made, so that copies left by an earlier incarnation
/// (before a restart, when generations started again at zero) are never read.
struct ImageShared {
    uuid: PoolUuid,
    locks: Box<[Mutex<()>]>,
    gens: Box<[AtomicU64]>,
    ident: Mutex<ImageIdentity>,
    writing: RwLock<()>,
    space: String,
    demoted: AtomicU64,
}

/// Hands the shared pool's evicted pages to the remote tier, tagged with the generation of
/// their stripe. The engine calls it with the page's shard locked, so a writer (which bumps
/// the generation to odd *before* it invalidates the page) has either not started — the
/// tag is the generation the content belongs to, and any later write moves past it — or is
/// in progress (odd: the page is not demoted).
struct Demoter {
    shared: Arc<ImageShared>,
    tier: Arc<dyn RemoteTier>,
}

impl EvictionSink for Demoter {
    fn evicted(&self, key: PageKey, data: &[u8]) {
        if key.object != ObjectId::from_u64(0) {
            return;
        }
        let page = u64::from(key.index.0);
        let g = self.shared.gens[page as usize & (STRIPES - 1)].load(Acquire);
        if g % 2 == 1 || !self.tier.available() {
            return;
        }
        self.tier.demote(&self.shared.space, page, g, data);
        self.shared.demoted.fetch_add(1, Relaxed);
    }
}

/// A random 64-bit number (std's per-process random hash keys, mixed with the clock).
fn random_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

type RegistryKey = (usize, u64, u64);
static REGISTRY: std::sync::Mutex<Vec<(RegistryKey, Weak<ImageShared>)>> =
    std::sync::Mutex::new(Vec::new());

fn shared_for(
    key: RegistryKey,
    uuid: PoolUuid,
    ident: ImageIdentity,
) -> Result<Arc<ImageShared>, ExportError> {
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|(_, w)| w.strong_count() > 0);
    if let Some(s) = reg
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        if s.uuid != uuid {
            return Err(ExportError::InvalidConfig(
                "image is already cached under another pool uuid",
            ));
        }
        return Ok(s);
    }
    let s = Arc::new(ImageShared {
        uuid,
        locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        gens: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        ident: Mutex::new(ident),
        writing: RwLock::new(()),
        space: format!("c/{:032x}/{:016x}", uuid.0, random_epoch()),
        demoted: AtomicU64::new(0),
    });
    reg.push((key, Arc::downgrade(&s)));
    Ok(s)
}

/// The pool UUID derived from an image's device and inode numbers.
pub fn image_uuid(dev: u64, ino: u64) -> PoolUuid {
    // "tmemimg\0" in the top word keeps derived UUIDs apart from hand-chosen small ones.
    PoolUuid(((0x746d_656d_696d_6700u128 ^ u128::from(dev)) << 64) | u128::from(ino))
}

#[derive(Default)]
struct Counters {
    sectors_read: AtomicU64,
    sectors_written: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
    invalidations: AtomicU64,
    insert_races: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    image_invalidations: AtomicU64,
    pages_dropped: AtomicU64,
    remote_hits: AtomicU64,
    remote_misses: AtomicU64,
    remote_stale: AtomicU64,
}

type MissHook = Arc<dyn Fn(u64) + Send + Sync>;

/// A cached export: see the crate documentation for the design.
pub struct CachedExport {
    engine: Arc<Engine>,
    cfg: CachedConfig,
    uuid: PoolUuid,
    pool: PoolId,
    size: u64,
    /// The image, with `O_DIRECT` when `direct`.
    file: File,
    /// The image without `O_DIRECT`, for the partial tail page.
    buffered: File,
    direct: bool,
    read_only: bool,
    can_punch: AtomicBool,
    shared: Arc<ImageShared>,
    /// The image's path named another file (or none) at the last check.
    path_replaced: AtomicBool,
    closed: AtomicBool,
    c: Counters,
    miss_hook: Mutex<Option<MissHook>>,
    remote: RwLock<Option<Arc<dyn RemoteTier>>>,
}

impl fmt::Debug for CachedExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedExport")
            .field("name", &self.cfg.name)
            .field("image", &self.cfg.image)
            .field("client", &self.cfg.client)
            .field("uuid", &self.uuid)
            .field("pool", &self.pool)
            .field("size", &self.size)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

fn open_image(path: &Path, direct: bool, write: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Opens the image (read-write only when `write`), `O_DIRECT` if asked and possible.
/// Returns `(file, direct)`.
fn open_best(path: &Path, want_direct: bool, write: bool) -> io::Result<(File, bool)> {
    if want_direct {
        match open_image(path, true, write) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(image = %path.display(), "filesystem refuses O_DIRECT; using buffered I/O");
            }
            Err(e) => return Err(e),
        }
    }
    Ok((open_image(path, false, write)?, false))
}

impl CachedExport {
    /// Opens the image (read-only unless [`CachedConfig::writable`]), authorizes
    /// `cfg.client` for the pool UUID and joins the shared ephemeral pool (creating it if
    /// this is the first export of the image). When other exports of the image already
    /// share the pool and the image changed since they recorded it, the cached pages are
    /// dropped (see [`CachedExport::check_image`]).
    pub fn open(engine: Arc<Engine>, cfg: CachedConfig) -> Result<Arc<Self>, ExportError> {
        let img_err = |source| ExportError::ImageOpen {
            path: cfg.image.clone(),
            source,
        };
        let read_only = !cfg.writable;
        let (file, direct) = open_best(&cfg.image, cfg.direct_io, cfg.writable).map_err(img_err)?;
        let buffered = open_image(&cfg.image, false, cfg.writable).map_err(img_err)?;
        let meta = file.metadata().map_err(img_err)?;
        let size = (&file).seek(SeekFrom::End(0)).map_err(img_err)?;
        if size == 0 {
            return Err(ExportError::InvalidConfig("image is empty"));
        }
        if size > MAX_EXPORT_BYTES {
            return Err(ExportError::TooLarge { size });
        }
        let uuid = cfg
            .uuid
            .unwrap_or_else(|| image_uuid(meta.dev(), meta.ino()));
        let engine_key = Arc::as_ptr(&engine) as usize;
        let shared = shared_for(
            (engine_key, meta.dev(), meta.ino()),
            uuid,
            ImageIdentity::of(&meta),
        )?;
        engine.authorize_shared(uuid, cfg.client);
        let spec = PoolSpec::shared_ephemeral(uuid)
            .with_codec(cfg.codec)
            .with_dedup(cfg.dedup)
            .with_label(format!("cached:{}", cfg.name));
        let pool = engine
            .create_pool(cfg.client, spec)
            .map_err(ExportError::JoinPool)?;
        tracing::info!(name = %cfg.name, image = %cfg.image.display(), size, ?uuid, ?pool, direct, read_only, "cached export opened");
        let ex = Arc::new(CachedExport {
            engine,
            cfg,
            uuid,
            pool,
            size,
            file,
            buffered,
            direct,
            read_only,
            can_punch: AtomicBool::new(true),
            shared,
            path_replaced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            c: Counters::default(),
            miss_hook: Mutex::new(None),
            remote: RwLock::new(None),
        });
        // Other exports may have cached the image before it changed.
        ex.check_image()?;
        Ok(ex)
    }

    /// The shared pool's UUID.
    pub fn uuid(&self) -> PoolUuid {
        self.uuid
    }

    /// The shared pool this export joined.
    pub fn pool(&self) -> PoolId {
        self.pool
    }

    /// The configuration the export was opened with.
    pub fn config(&self) -> &CachedConfig {
        &self.cfg
    }

    /// Current counters.
    pub fn stats(&self) -> CachedStats {
        let c = &self.c;
        CachedStats {
            sectors_read: c.sectors_read.load(Relaxed),
            sectors_written: c.sectors_written.load(Relaxed),
            cache_hits: c.hits.load(Relaxed),
            cache_misses: c.misses.load(Relaxed),
            pages_inserted: c.inserted.load(Relaxed),
            invalidations: c.invalidations.load(Relaxed),
            insert_races: c.insert_races.load(Relaxed),
            reads: c.reads.load(Relaxed),
            writes: c.writes.load(Relaxed),
            direct_io: self.direct,
            read_only: self.read_only,
            image_invalidations: c.image_invalidations.load(Relaxed),
            pages_dropped: c.pages_dropped.load(Relaxed),
            remote_hits: c.remote_hits.load(Relaxed),
            remote_misses: c.remote_misses.load(Relaxed),
            remote_stale: c.remote_stale.load(Relaxed),
            demoted: self.shared.demoted.load(Relaxed),
        }
    }

    /// Puts a remote tier behind the shared pool (or, with `None`, takes it away): pages
    /// the pool evicts are demoted to it, and a missed run asks it before the image. Never
    /// stale: a remote copy carries its stripe's generation and is used only while that
    /// generation is unchanged (every write bumps it before it is acknowledged).
    pub fn set_remote(&self, tier: Option<Arc<dyn RemoteTier>>) -> Result<(), ExportError> {
        self.check_open()?;
        let sink = tier.clone().map(|tier| {
            Arc::new(Demoter {
                shared: Arc::clone(&self.shared),
                tier,
            }) as Arc<dyn EvictionSink>
        });
        self.engine
            .set_eviction_sink(self.cfg.client, self.pool, sink)
            .map_err(ExportError::Engine)?;
        *self.remote.write() = tier;
        Ok(())
    }

    /// The remote tier's name for this image's copies (`c/<pool uuid>/<epoch>`).
    pub fn remote_space(&self) -> &str {
        &self.shared.space
    }

    /// Whether clients may write (the export was opened [`CachedConfig::writable`]).
    pub fn writable(&self) -> bool {
        !self.read_only
    }

    /// Leaves the shared pool (the pool goes when its last member leaves). Further I/O
    /// fails with [`ExportError::Closed`]. Calling it again does nothing.
    pub fn close(&self) -> Result<(), ExportError> {
        if self.closed.swap(true, Relaxed) {
            return Ok(());
        }
        tracing::info!(name = %self.cfg.name, pool = ?self.pool, "cached export closed");
        self.engine
            .destroy_pool(self.cfg.client, self.pool)
            .map_err(ExportError::ReleasePool)
    }

    /// Test hook: called with the first page of a run of missed pages after the image was
    /// read and before the pages are inserted into the cache (to provoke the miss/write race).
    #[doc(hidden)]
    pub fn set_miss_hook(&self, hook: Option<Box<dyn Fn(u64) + Send + Sync>>) {
        *self.miss_hook.lock() = hook.map(Arc::from);
    }

    /// Checks that the image still is what the cache holds (run on every FLUSH and by the
    /// daemon when a client connects; cheap: one `fstat`, one `stat`).
    ///
    /// * The open image's identity ([`ImageIdentity`]: device, inode, size, mtime with
    ///   nanoseconds) is compared with the one recorded for the image (shared by every
    ///   export of it in this engine). If it differs, someone rewrote the image underneath:
    ///   every cached page of it is dropped from the shared pool (as
    ///   [`CachedExport::invalidate_image`]), the new identity is recorded and one warning
    ///   is logged. A writable export's own writes re-record the identity after they
    ///   complete, so they do not count as changes; an outside write racing with them may
    ///   go unnoticed.
    /// * The image's path is compared with the open file. If it names another file (a
    ///   `mv new.img base.img`) or none, one warning is logged and the export keeps serving
    ///   the file it opened — the cache still matches that file, so nothing is dropped.
    ///   Re-create the export (or restart the daemon) to serve the new file.
    pub fn check_image(&self) -> Result<ImageCheck, ExportError> {
        self.check_open()?;
        let (before, now) = {
            let _w = self.shared.writing.write();
            let now = ImageIdentity::of(&self.file.metadata().map_err(ExportError::ImageIo)?);
            let mut id = self.shared.ident.lock();
            let before = *id;
            *id = now;
            (before, now)
        };
        let mut check = ImageCheck::default();
        let replaced = match identity::path_state(&self.cfg.image, &now) {
            PathState::Same => false,
            PathState::Replaced => true,
            PathState::Unknown => self.path_replaced.load(Relaxed),
        };
        check.path_replaced = replaced;
        if replaced && !self.path_replaced.swap(true, Relaxed) {
            tracing::warn!(name = %self.cfg.name, image = %self.cfg.image.display(),
                "image path now names another file (or none); the export keeps serving the file it opened — re-create the export to serve the new one");
        } else if !replaced {
            self.path_replaced.store(false, Relaxed);
        }
        if before != now {
            check.changed = true;
            check.pages_dropped = self.drop_cached()?;
            tracing::warn!(name = %self.cfg.name, image = %self.cfg.image.display(),
                old_size = before.size, new_size = now.size,
                old_mtime = %format_args!("{}.{:09}", before.mtime_sec, before.mtime_nsec),
                new_mtime = %format_args!("{}.{:09}", now.mtime_sec, now.mtime_nsec),
                pages_dropped = check.pages_dropped,
                "image changed underneath the cached export; cached pages dropped");
        }
        Ok(check)
    }

    /// Drops every cached page of the image from the shared pool (for every export that
    /// shares it) and re-records the image's identity. Returns how many pages were
    /// dropped. Reads in flight cannot put pages they read before the call back into
    /// the cache (the generation protocol). Use after changing the image by means the
    /// export cannot notice.
    pub fn invalidate_image(&self) -> Result<u64, ExportError> {
        self.check_open()?;
        {
            let _w = self.shared.writing.write();
            let now = ImageIdentity::of(&self.file.metadata().map_err(ExportError::ImageIo)?);
            *self.shared.ident.lock() = now;
        }
        let n = self.drop_cached()?;
        tracing::info!(name = %self.cfg.name, image = %self.cfg.image.display(), pages_dropped = n, "cached pages of the image dropped");
        Ok(n)
    }

    /// Flushes object 0 of the pool with every stripe "write in progress", so that no
    /// reader puts a page it read before.
    fn drop_cached(&self) -> Result<u64, ExportError> {
        let w = self.lock_for_write(0, STRIPES as u64);
        let r = self
            .engine
            .flush_object(self.cfg.client, self.pool, ObjectId::from_u64(0));
        drop(w);
        let n = r.map_err(ExportError::Engine)?;
        self.c.image_invalidations.fetch_add(1, Relaxed);
        self.c.pages_dropped.fetch_add(n, Relaxed);
        Ok(n)
    }

    /// Runs one of this export's own changes of the image, then records the image's
    /// identity (its mtime moved), with `writing` held shared throughout.
    fn own_write(&self, f: impl FnOnce() -> Result<(), ExportError>) -> Result<(), ExportError> {
        let _g = self.shared.writing.read();
        let r = f();
        if let Ok(m) = self.file.metadata() {
            *self.shared.ident.lock() = ImageIdentity::of(&m);
        }
        r
    }

    // ----- helpers -------------------------------------------------------------------------

    /// True if reading `[offset, offset+len)` may wait on a remote-tier round trip: a tier is
    /// attached and up, and some page of the range is not in the pool (or the range is too
    /// long to look at cheaply).
    fn range_may_block(&self, offset: u64, len: u64) -> bool {
        if len == 0 || !self.remote.read().as_ref().is_some_and(|t| t.available()) {
            return false;
        }
        let first = offset / PAGE;
        let last = (offset + len - 1) / PAGE;
        if last - first >= MAY_BLOCK_MAX_PAGES {
            return true;
        }
        (first..=last)
            .any(|p| !matches!(self.engine.probe(self.cfg.client, self.key(p)), Ok(Some(_))))
    }

    fn key(&self, page: u64) -> PageKey {
        // `size <= 16 TiB`, so every page index fits in 32 bits.
        PageKey::new(self.pool, ObjectId::from_u64(0), page as u32)
    }

    fn stripe(page: u64) -> usize {
        page as usize & (STRIPES - 1)
    }

    fn gen(&self, page: u64) -> &AtomicU64 {
        &self.shared.gens[Self::stripe(page)]
    }

    fn check_open(&self) -> Result<(), ExportError> {
        if self.closed.load(Relaxed) {
            Err(ExportError::Closed)
        } else {
            Ok(())
        }
    }

    fn last_page(&self) -> u64 {
        (self.size - 1) / PAGE
    }

    /// Bytes of page `p` that lie inside the image.
    fn page_bytes(&self, p: u64) -> usize {
        (self.size - p * PAGE).min(PAGE) as usize
    }

    /// Reads pages `[first, first + n)` of the image into `buf`; bytes past the end of the
    /// image read as zero.
    fn read_image(&self, first: u64, buf: &mut AlignedBuf) -> Result<(), ExportError> {
        let b = buf.as_mut_slice();
        let got = sys::pread_full(&self.file, b, first * PAGE).map_err(ExportError::ImageIo)?;
        b[got..].fill(0);
        self.c
            .sectors_read
            .fetch_add((got as u64).div_ceil(512), Relaxed);
        Ok(())
    }

    /// Writes `buf` (whole pages) at page `first`; the tail page only up to the image size.
    fn write_image(&self, first: u64, buf: &AlignedBuf) -> Result<(), ExportError> {
        let pages = (buf.as_slice().len() / PAGE_SIZE) as u64;
        let partial_tail = self.size % PAGE != 0 && first + pages - 1 == self.last_page();
        let whole = if partial_tail { pages - 1 } else { pages };
        if whole > 0 {
            self.file
                .write_all_at(&buf.as_slice()[..whole as usize * PAGE_SIZE], first * PAGE)
                .map_err(ExportError::ImageIo)?;
        }
        let mut bytes = whole * PAGE;
        if partial_tail {
            let p = first + pages - 1;
            let n = self.page_bytes(p);
            self.buffered
                .write_all_at(&buf.page((pages - 1) as usize)[..n], p * PAGE)
                .map_err(ExportError::ImageIo)?;
            bytes += n as u64;
        }
        self.c
            .sectors_written
            .fetch_add(bytes.div_ceil(512), Relaxed);
        Ok(())
    }

    /// Locks the stripes of pages `[first, first + n)` in ascending order (no deadlock
    /// between writers) and marks them "write in progress" (odd generation).
    fn lock_for_write(&self, first: u64, n: u64) -> WriteGuard<'_> {
        let mut idx: Vec<usize> = (first..first + n).map(Self::stripe).collect();
        idx.sort_unstable();
        idx.dedup();
        let guards = idx.iter().map(|&i| self.shared.locks[i].lock()).collect();
        for &i in &idx {
            self.shared.gens[i].fetch_add(1, Release);
        }
        WriteGuard {
            ex: self,
            idx,
            _guards: guards,
        }
    }

    fn invalidate(&self, first: u64, n: u64) -> Result<(), ExportError> {
        for p in first..first + n {
            self.engine
                .flush_page(self.cfg.client, self.key(p))
                .map_err(ExportError::Engine)?;
        }
        self.c.invalidations.fetch_add(n, Relaxed);
        Ok(())
    }

    fn insert(&self, page: u64, data: &[u8]) {
        match self.engine.put(self.cfg.client, self.key(page), data) {
            Ok(()) => {
                self.c.inserted.fetch_add(1, Relaxed);
            }
            Err(e) => rl_log!(debug, error = %e, "cache insert refused"),
        }
    }

    // ----- data path -----------------------------------------------------------------------

    fn do_read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, ExportError> {
        self.check_open()?;
        self.c.reads.fetch_add(1, Relaxed);
        let mut zr = ZeroRanges::none();
        if buf.is_empty() {
            return Ok(zr);
        }
        let end = offset + buf.len() as u64;
        let last = (end - 1) / PAGE;
        // Copies page `p`'s bytes that the request wants from `src` into `buf`.
        let place = |buf: &mut [u8], p: u64, src: &[u8]| {
            let lo = (p * PAGE).max(offset);
            let hi = ((p + 1) * PAGE).min(end);
            let s = (lo - p * PAGE) as usize;
            let d = (lo - offset) as usize;
            let n = (hi - lo) as usize;
            buf[d..d + n].copy_from_slice(&src[s..s + n]);
            (d, n)
        };
        let mut tmp = [0u8; PAGE_SIZE];
        let mut p = offset / PAGE;
        while p <= last {
            match self.engine.get(self.cfg.client, self.key(p), &mut tmp) {
                Ok(Some(state)) => {
                    self.c.hits.fetch_add(1, Relaxed);
                    let (d, n) = place(buf, p, &tmp);
                    if state == PageState::Zero {
                        zr.push(d, n);
                    }
                    p += 1;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(ExportError::Engine(e)),
            }
            // A run of missing pages, read from the image in one call.
            let mut run = 1;
            while p + run <= last
                && run < MAX_RUN
                && matches!(
                    self.engine.probe(self.cfg.client, self.key(p + run)),
                    Ok(None)
                )
            {
                run += 1;
            }
            // Generations are read before the remote tier and the image are.
            let gens: Vec<u64> = (p..p + run).map(|q| self.gen(q).load(Acquire)).collect();
            let mut data = AlignedBuf::new(run as usize);
            let served = self.fetch_remote(p, &gens, &mut data);
            // The pages the remote tier did not serve, a run at a time, from the image.
            let mut i = 0;
            while i < run as usize {
                if served[i] {
                    i += 1;
                    continue;
                }
                let j = (i..run as usize)
                    .find(|&j| served[j])
                    .unwrap_or(run as usize);
                let mut part = AlignedBuf::new(j - i);
                self.read_image(p + i as u64, &mut part)?;
                for k in i..j {
                    data.page_mut(k).copy_from_slice(part.page(k - i));
                }
                i = j;
            }
            self.c.misses.fetch_add(run, Relaxed);
            let hook = self.miss_hook.lock().clone();
            if let Some(h) = hook {
                h(p);
            }
            for (i, g) in gens.into_iter().enumerate() {
                let q = p + i as u64;
                {
                    let _l = self.shared.locks[Self::stripe(q)].lock();
                    if g % 2 == 0 && self.gen(q).load(Acquire) == g {
                        self.insert(q, data.page(i));
                    } else {
                        self.c.insert_races.fetch_add(1, Relaxed);
                    }
                }
                place(buf, q, data.page(i));
            }
            p += run;
        }
        Ok(zr)
    }

    /// Asks the remote tier (if any, and available) for pages `[first, first + gens.len())`
    /// and copies into `data` each copy whose tag is the page's generation `gens[i]` read
    /// before the fetch (even: no write in progress). Returns which pages it served.
    fn fetch_remote(&self, first: u64, gens: &[u64], data: &mut AlignedBuf) -> Vec<bool> {
        let mut served = vec![false; gens.len()];
        let Some(tier) = self.remote.read().clone() else {
            return served;
        };
        if !tier.available() {
            return served;
        }
        let pages: Vec<u64> = (first..first + gens.len() as u64).collect();
        let got = tier.fetch(&self.shared.space, &pages);
        for (i, copy) in got.into_iter().enumerate().take(gens.len()) {
            match copy {
                Some(c) if c.tag == gens[i] && gens[i] % 2 == 0 && c.data.len() == PAGE_SIZE => {
                    data.page_mut(i).copy_from_slice(&c.data);
                    served[i] = true;
                    self.c.remote_hits.fetch_add(1, Relaxed);
                }
                Some(_) => {
                    self.c.remote_stale.fetch_add(1, Relaxed);
                }
                None => {
                    self.c.remote_misses.fetch_add(1, Relaxed);
                }
            }
        }
        served
    }

    /// Writes `data` at `offset` (or zeros when `data` is `None`, `len` bytes), a run of
    /// pages at a time: lock, invalidate, read-modify-write the partial pages, write the
    /// image, put the new pages, unlock. Returns once the cache cannot serve older data.
    fn do_write(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), ExportError> {
        self.check_open()?;
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let mut first = offset / PAGE;
        let last = (end - 1) / PAGE;
        while first <= last {
            let n = (last + 1 - first).min(MAX_RUN);
            let _w = self.lock_for_write(first, n);
            let mut buf = AlignedBuf::new(n as usize);
            // Partial pages: current content first (cache, else image).
            let ends = if n == 1 {
                vec![first]
            } else {
                vec![first, first + n - 1]
            };
            for p in ends {
                let lo = (p * PAGE).max(offset);
                let hi = ((p + 1) * PAGE).min(end);
                if lo == p * PAGE && hi >= p * PAGE + self.page_bytes(p) as u64 {
                    continue; // the request covers every byte of the page
                }
                let i = (p - first) as usize;
                let hit = matches!(
                    self.engine
                        .get(self.cfg.client, self.key(p), buf.page_mut(i)),
                    Ok(Some(_))
                );
                if hit {
                    self.c.hits.fetch_add(1, Relaxed);
                } else {
                    let mut one = AlignedBuf::new(1);
                    self.read_image(p, &mut one)?;
                    buf.page_mut(i).copy_from_slice(one.page(0));
                }
            }
            self.invalidate(first, n)?;
            let lo = (first * PAGE).max(offset);
            let hi = ((first + n) * PAGE).min(end);
            let b = buf.as_mut_slice();
            let dst = &mut b[(lo - first * PAGE) as usize..(hi - first * PAGE) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize]),
                None => dst.fill(0),
            }
            self.write_image(first, &buf)?;
            for i in 0..n {
                self.insert(first + i, buf.page(i as usize));
            }
            first += n;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset+len)`: whole pages by punching holes in the image (when the
    /// filesystem can), partial pages by writing zeros.
    fn do_zero(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check_open()?;
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let end = offset + len;
        let full_lo = offset.div_ceil(PAGE);
        // The tail page counts as whole when the range reaches the end of the image.
        let full_hi = if end >= self.size {
            self.last_page() + 1
        } else {
            end / PAGE
        };
        if full_lo >= full_hi || !self.can_punch.load(Relaxed) {
            return self.do_write(offset, len, None);
        }
        if offset < full_lo * PAGE {
            self.do_write(offset, full_lo * PAGE - offset, None)?;
        }
        let mut first = full_lo;
        while first < full_hi {
            let n = (full_hi - first).min(MAX_RUN);
            let w = self.lock_for_write(first, n);
            self.invalidate(first, n)?;
            let hi = ((first + n) * PAGE).min(self.size);
            match sys::punch_hole(&self.file, first * PAGE, hi - first * PAGE) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(image = %self.cfg.image.display(), "image filesystem cannot punch holes; writing zeros");
                    self.can_punch.store(false, Relaxed);
                    drop(w);
                    self.do_write(first * PAGE, end.min(self.size) - first * PAGE, None)?;
                    return Ok(());
                }
                Err(e) => return Err(ExportError::ImageIo(e)),
            }
            drop(w);
            first += n;
        }
        if full_hi * PAGE < end && full_hi <= self.last_page() {
            self.do_write(full_hi * PAGE, end - full_hi * PAGE, None)?;
        }
        Ok(())
    }

    fn do_flush(&self) -> Result<(), ExportError> {
        self.check_open()?;
        self.file.sync_data().map_err(ExportError::ImageIo)?;
        self.check_image()?;
        Ok(())
    }

    fn do_block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.check_open()?;
        let data = |len| Extent {
            len,
            hole: false,
            zero: false,
        };
        let hole = |len| Extent {
            len,
            hole: true,
            zero: true,
        };
        let Ok(next_data) = sys::seek(&self.buffered, offset, true) else {
            return Ok(vec![data(len.max(1))]);
        };
        Ok(match next_data {
            None => vec![hole(self.size - offset)],
            Some(d) if d > offset => vec![hole(d.min(self.size) - offset)],
            Some(_) => {
                let h = sys::seek(&self.buffered, offset, false)
                    .ok()
                    .flatten()
                    .unwrap_or(self.size)
                    .min(self.size);
                vec![data((h.max(offset + 1)) - offset)]
            }
        })
    }

    fn do_prefetch(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let mut buf = vec![0u8; (MAX_RUN * PAGE) as usize];
        let end = offset + len.min(PREFETCH_MAX);
        let mut off = offset;
        while off < end {
            let n = (end - off).min(buf.len() as u64) as usize;
            self.do_read(off, &mut buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }
}

/// Stripe locks held by a writer; restores even generations when dropped.
struct WriteGuard<'a> {
    ex: &'a CachedExport,
    idx: Vec<usize>,
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // Still under the locks (fields drop after this body): the write is complete.
        for &i in &self.idx {
            self.ex.shared.gens[i].fetch_add(1, Release);
        }
    }
}

impl Drop for CachedExport {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl BlockBackend for CachedExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: self.read_only,
            can_trim: !self.read_only,
            can_write_zeroes: !self.read_only,
            can_fast_zero: false,
            can_cache: true,
            multi_conn_safe: true,
            can_block_status: true,
        }
    }

    /// With a remote tier up, a read that misses the pool is a network round trip.
    fn read_may_block(&self, offset: u64, len: u64) -> bool {
        self.range_may_block(offset, len)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, BackendError> {
        check_range(self.size, offset, buf.len() as u64)?;
        Ok(self.do_read(offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        check_range(self.size, offset, data.len() as u64)?;
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.c.writes.fetch_add(1, Relaxed);
        self.own_write(|| self.do_write(offset, data.len() as u64, Some(data)))?;
        if fua {
            self.do_flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(self.size, offset, len)?;
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        Ok(self.own_write(|| self.do_zero(offset, len))?)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        fast_only: bool,
    ) -> Result<(), BackendError> {
        check_range(self.size, offset, len)?;
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        if fast_only {
            return Err(BackendError::NotFast);
        }
        Ok(self.own_write(|| self.do_zero(offset, len))?)
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(self.do_flush()?)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(self.size, offset, len)?;
        Ok(self.do_prefetch(offset, len)?)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        check_range(self.size, offset, len)?;
        Ok(self.do_block_status(offset, len)?)
    }
}
