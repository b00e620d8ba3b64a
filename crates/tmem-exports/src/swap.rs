//! The swap export: a block device whose pages live in a persistent private pool, with a
//! per-export spill file for the pages the pool refuses, a page map that says where each
//! page is (so that an unclean stop is survivable), and a [`Poison`] set of pages whose
//! content could not be proven intact.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard, RwLock};
use tmem_core::{
    ClientId, Codec, DedupScope, Engine, ObjectId, PageKey, PageState, Persistence, PoolId,
    PoolSpec, Sharing, PAGE_SIZE,
};
use tmem_nbd::{BackendCaps, BackendError, BlockBackend, Extent, ZeroRanges};

use crate::pagemap::{remote_hash, spill_hash, Entry, PageMap};
use crate::poison::Poison;
use crate::remote::{RemoteError, RemoteTier};
use crate::sys::{self, rl_log};
use crate::{check_range, ExportError, MAX_EXPORT_BYTES};

const PAGE: u64 = PAGE_SIZE as u64;
/// Number of page-lock stripes (power of two).
const STRIPES: usize = 1024;
/// Oldest pool pages moved to the spill file each time the pool refuses a put.
pub const WRITEBACK_BATCH: usize = 64;
/// Most pages one `block_status` call looks at.
const STATUS_MAX_PAGES: u64 = 1 << 16;
/// Most pages `read_may_block` looks at; a longer read is taken to be slow.
const MAY_BLOCK_MAX_PAGES: u64 = 64;

/// How a swap export is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapConfig {
    /// Export name (the pool is labelled `swap:<name>`).
    pub name: String,
    /// Device size in bytes (at most 16 TiB; need not be a multiple of 4096).
    pub size: u64,
    /// The client (guest) that owns the pool.
    pub client: ClientId,
    /// The spill file (created sparse; page `i` lives at offset `i * 4096`).
    pub spill_path: PathBuf,
    /// How the pool compresses pages.
    pub codec: Codec,
    /// Where the pool looks for duplicates.
    pub dedup: DedupScope,
    /// Free bytes the spill file's filesystem keeps: [`SwapExport::create`] refuses an
    /// export unless its worst case (every page spilled, plus the page map) and this fit,
    /// and a spill write that would leave less is refused with `ENOSPC`. 0: no checks.
    pub spill_reserve: u64,
}

/// Counters of a swap export. Page counts are 4 KiB pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapStats {
    /// Pages held in the pool (the engine's count for this pool).
    pub pages_in_pool: u64,
    /// Pages that live in the spill file now.
    pub pages_spilled: u64,
    /// Bytes the spill file occupies on disk (allocated blocks, not its sparse length).
    pub spill_file_bytes: u64,
    /// Pages read from the spill file.
    pub spill_reads: u64,
    /// Pages written to the spill file (refused puts plus writeback).
    pub spill_writes: u64,
    /// Of the spill writes, oldest pool pages moved out to make room ("writeback").
    pub written_back: u64,
    /// Spilled pages moved back into the pool on read.
    pub pulled_back: u64,
    /// Puts the pool refused (`NoSpace`, `QuotaExceeded`, `Frozen`).
    pub put_refusals: u64,
    /// Pages read as zero (never written, trimmed, or zero-filled).
    pub zero_pages: u64,
    /// Read requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// Pages whose content could not be proven intact: reads fail with EIO until the page
    /// is rewritten or trimmed (see [`SwapExport::poison`]).
    pub poisoned_pages: u64,
    /// Spill-file and page-map writes that failed or were refused for lack of space.
    pub spill_errors: u64,
    /// Pages that live in the remote tier now.
    pub pages_remote: u64,
    /// Pages written to the remote tier (acknowledged by its replicas).
    pub remote_writes: u64,
    /// Pages read from the remote tier.
    pub remote_reads: u64,
    /// Remote writes that failed or were not replicated in time, so that the page went to
    /// the spill file instead.
    pub remote_fallbacks: u64,
    /// Remote reads that failed (the request got EIO) or returned a page whose checksum
    /// did not match the page map (the page was poisoned).
    pub remote_read_errors: u64,
}

/// Where a page lives. Absent from the map: nowhere, or (after a restore) in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    /// In the pool; the number orders pages for oldest-first writeback.
    Pool(u64),
    /// In the spill file at `page * 4096`.
    Spill,
    /// In the remote tier; the check its copy must pass: the copy's [`remote_hash`] (as in
    /// the page map), or, for a page a daemon that died was rewriting in place, both
    /// contents' hashes (see [`pending_check`]).
    Remote(u64),
}

/// Tags a [`Loc::Remote`] check that holds two 30-bit hash halves (remote hashes have 62 bits).
const PENDING_CHECK: u64 = 1 << 63;

/// The [`Loc::Remote`] check of a page-map entry naming a remote copy.
fn remote_check(e: Entry) -> Option<u64> {
    match e {
        Entry::Remote(h) => Some(h),
        Entry::RemotePending { old, new } => Some(pending_check(old, new)),
        _ => None,
    }
}

/// A check passed by a copy whose hash matches `old` or `new` in its low 30 bits.
fn pending_check(old: u64, new: u64) -> u64 {
    PENDING_CHECK | (old & ((1 << 30) - 1)) << 30 | (new & ((1 << 30) - 1))
}

/// Whether a remote copy whose [`remote_hash`] is `h` passes `check`.
fn remote_check_passes(check: u64, h: u64) -> bool {
    if check & PENDING_CHECK == 0 {
        return check == h;
    }
    Entry::remote_pending(check >> 30, check).remote_matches(h)
}

impl Loc {
    /// The place a spill entry (from [`SwapExport::spill_write`]) names.
    fn of_spill(e: Entry) -> Loc {
        match e {
            Entry::Remote(h) => Loc::Remote(h),
            _ => Loc::Spill,
        }
    }
}

#[derive(Default)]
struct Stripe {
    loc: HashMap<u32, Loc>,
}

#[derive(Default)]
struct Counters {
    spill_reads: AtomicU64,
    spill_writes: AtomicU64,
    written_back: AtomicU64,
    pulled_back: AtomicU64,
    put_refusals: AtomicU64,
    zero_pages: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    spilled: AtomicU64,
    in_pool: AtomicU64,
    spill_errors: AtomicU64,
    remote: AtomicU64,
    remote_writes: AtomicU64,
    remote_reads: AtomicU64,
    remote_fallbacks: AtomicU64,
    remote_read_errors: AtomicU64,
}

/// Free-space check of the spill filesystem before spill writes: `fstatvfs` at most every
/// 100 ms while well above the reserve, before every write once close to it.
struct SpaceGuard {
    reserve: u64,
    start: Instant,
    checked_ms: AtomicU64,
    available: AtomicU64,
    written: AtomicU64,
}

/// Above the reserve by this much, a recent `fstatvfs` (less what was written since) is
/// trusted without asking again.
const SPACE_SLACK: u64 = 16 << 20;

impl SpaceGuard {
    fn new(reserve: u64) -> Self {
        SpaceGuard {
            reserve,
            start: Instant::now(),
            checked_ms: AtomicU64::new(0),
            available: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// `Err(ENOSPC)` if writing one more page would leave less than the reserve.
    fn check(&self, f: &File) -> io::Result<()> {
        if self.reserve == 0 {
            return Ok(());
        }
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let estimate = self
            .available
            .load(Relaxed)
            .saturating_sub(self.written.load(Relaxed));
        let last = self.checked_ms.load(Relaxed);
        if last != 0 && now - last.min(now) < 100 && estimate >= self.reserve + SPACE_SLACK {
            return Ok(());
        }
        let available = match sys::available_bytes(f) {
            Ok(a) => a,
            Err(e) => {
                rl_log!(warn, error = %e, "cannot read the spill filesystem's free space; not checking it");
                return Ok(());
            }
        };
        self.available.store(available, Relaxed);
        self.written.store(0, Relaxed);
        self.checked_ms.store(now, Relaxed);
        if available < self.reserve.saturating_add(PAGE) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    fn wrote(&self, bytes: u64) {
        self.written.fetch_add(bytes, Relaxed);
    }
}

/// Why a spill write failed.
struct SpillFailed {
    error: ExportError,
    /// The write was attempted: the page's range of the spill file may hold a torn copy
    /// (an older spill copy of the page is gone).
    touched: bool,
}

/// A swap (frontswap-like) export: see the crate documentation for the design.
pub struct SwapExport {
    engine: Arc<Engine>,
    cfg: SwapConfig,
    pool: PoolId,
    stripes: Box<[Mutex<Stripe>]>,
    spill: File,
    spill_dirty: AtomicBool,
    can_punch: AtomicBool,
    /// Pool pages in put order: `(page, seq)`; stale entries are skipped.
    fifo: Mutex<VecDeque<(u32, u64)>>,
    writeback_lock: Mutex<()>,
    compact_lock: Mutex<()>,
    seq: AtomicU64,
    closed: AtomicBool,
    c: Counters,
    map: PageMap,
    poison: Poison,
    space: SpaceGuard,
    remote: RwLock<Option<Arc<dyn RemoteTier>>>,
    /// This export's name in the remote tier (see [`SwapExport::remote_space`]).
    remote_space: String,
    /// Pages whose remote copies are no longer needed (found at a restart, before a tier
    /// was set): deleted when one is.
    orphans: Mutex<Vec<u64>>,
    backoff: RemoteBackoff,
}

/// After a failed remote write the export sends spills straight to the file for a while:
/// 100 ms after the first failure, doubling to 30 s, back to nothing after a success. A tier
/// that answers slowly or wrongly then costs one bounded attempt per period, not one per
/// page.
struct RemoteBackoff {
    start: Instant,
    /// Milliseconds since `start` before which the tier is not tried.
    until_ms: AtomicU64,
    /// The current period in milliseconds (0: no failure since the last success).
    step_ms: AtomicU64,
}

impl RemoteBackoff {
    const FIRST_MS: u64 = 100;
    const MAX_MS: u64 = 30_000;

    fn new() -> Self {
        RemoteBackoff {
            start: Instant::now(),
            until_ms: AtomicU64::new(0),
            step_ms: AtomicU64::new(0),
        }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn open(&self) -> bool {
        self.now_ms() >= self.until_ms.load(Relaxed)
    }
    fn succeeded(&self) {
        if self.step_ms.load(Relaxed) != 0 {
            self.step_ms.store(0, Relaxed);
        }
    }
    fn failed(&self) {
        let step = (self.step_ms.load(Relaxed) * 2).clamp(Self::FIRST_MS, Self::MAX_MS);
        self.step_ms.store(step, Relaxed);
        self.until_ms.store(self.now_ms() + step, Relaxed);
    }
}

/// A remote-tier space name for a swap export: `s/` and the name with characters outside
/// `[A-Za-z0-9_.-]` replaced, plus a hash of the exact name (so two names never share one).
fn remote_space_of(name: &str) -> String {
    let clean: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as u32;
    format!("s/{clean}.{h:08x}")
}

impl fmt::Debug for SwapExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapExport")
            .field("name", &self.cfg.name)
            .field("size", &self.cfg.size)
            .field("client", &self.cfg.client)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Result of storing a page.
#[derive(PartialEq, Eq)]
enum Stored {
    InPool,
    /// Refused and spilled; `true` if refused because the client is frozen (writeback
    /// cannot help then).
    Spilled(bool),
    Zero,
}

fn validate(cfg: &SwapConfig) -> Result<(), ExportError> {
    if cfg.size == 0 {
        return Err(ExportError::InvalidConfig("swap size is zero"));
    }
    if cfg.size > MAX_EXPORT_BYTES {
        return Err(ExportError::TooLarge { size: cfg.size });
    }
    Ok(())
}

fn spill_len(size: u64) -> u64 {
    size.div_ceil(PAGE) * PAGE
}

/// What [`SwapExport::attach`] or [`SwapExport::recover`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReopenReport {
    /// A usable page map was found (otherwise one was made: after an unclean stop, every
    /// page is then poisoned).
    pub map_found: bool,
    /// Pages served from the spill file (after an unclean stop: those whose copy matches
    /// the checksum the map recorded).
    pub spilled: u64,
    /// Pages adopted from the restored pool.
    pub in_pool: u64,
    /// Pages the page map places in the remote tier (checked when read).
    pub remote: u64,
    /// Pages poisoned: reads fail with EIO until they are rewritten or trimmed.
    pub poisoned: u64,
}

impl SwapExport {
    /// Creates a new persistent private pool labelled `swap:<name>` for `cfg.client`, a
    /// fresh (truncated) sparse spill file at `cfg.spill_path` and its page map. Refused
    /// ([`ExportError::SpillSpace`]) when `cfg.spill_reserve` is set and the filesystem
    /// cannot hold the export's worst case (every page spilled, plus the map) and the
    /// reserve.
    pub fn create(engine: Arc<Engine>, cfg: SwapConfig) -> Result<Arc<Self>, ExportError> {
        validate(&cfg)?;
        let pool = Self::new_pool(&engine, &cfg)?;
        let undo = |engine: &Engine, cfg: &SwapConfig, remove: bool| {
            let _ = engine.destroy_pool(cfg.client, pool);
            if remove {
                let _ = std::fs::remove_file(&cfg.spill_path);
                let _ = std::fs::remove_file(PageMap::path_for(&cfg.spill_path));
            }
        };
        let spill = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&cfg.spill_path)
            .and_then(|f| f.set_len(spill_len(cfg.size)).map(|()| f));
        let spill = match spill {
            Ok(f) => f,
            Err(source) => {
                undo(&engine, &cfg, false);
                return Err(ExportError::SpillOpen {
                    path: cfg.spill_path,
                    source,
                });
            }
        };
        if cfg.spill_reserve > 0 {
            let pages = spill_len(cfg.size) / PAGE;
            let needed = spill_len(cfg.size)
                .saturating_add(pages * 8 + 64)
                .saturating_add(cfg.spill_reserve);
            match sys::available_bytes(&spill) {
                Ok(available) if available < needed => {
                    undo(&engine, &cfg, true);
                    return Err(ExportError::SpillSpace {
                        path: cfg.spill_path,
                        needed,
                        reserve: cfg.spill_reserve,
                        available,
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(spill = %cfg.spill_path.display(), error = %e, "cannot read the spill filesystem's free space; not checking it");
                }
            }
        }
        let map = match PageMap::create(&cfg.spill_path, spill_len(cfg.size) / PAGE, false) {
            Ok(m) => m,
            Err(source) => {
                undo(&engine, &cfg, true);
                return Err(ExportError::PageMap {
                    path: PageMap::path_for(&cfg.spill_path),
                    source,
                });
            }
        };
        tracing::info!(name = %cfg.name, size = cfg.size, ?pool, spill = %cfg.spill_path.display(), "swap export created");
        Ok(Arc::new(Self::new(engine, cfg, pool, spill, map)))
    }

    /// The label of a swap export's pool (`swap:NAME`): what its durable pages are tagged
    /// with ([`tmem_core::durable_tag`]).
    pub fn pool_label(name: &str) -> String {
        format!("swap:{name}")
    }

    /// Creates the pool a swap export with `cfg` uses, for [`SwapExport::recover_with_pool`]
    /// (pages recovered from durable memory are put into it first).
    pub fn create_pool(engine: &Engine, cfg: &SwapConfig) -> Result<PoolId, ExportError> {
        validate(cfg)?;
        Self::new_pool(engine, cfg)
    }

    fn new_pool(engine: &Engine, cfg: &SwapConfig) -> Result<PoolId, ExportError> {
        let spec = PoolSpec::private_persistent()
            .with_codec(cfg.codec)
            .with_dedup(cfg.dedup)
            .with_label(Self::pool_label(&cfg.name));
        engine
            .create_pool(cfg.client, spec)
            .map_err(ExportError::CreatePool)
    }

    /// Re-attaches to `pool` (a persistent private pool of `cfg.client`, restored from a
    /// save at a clean stop). The spill file is reused, never truncated; a missing one is
    /// created. With a page map, it says where each page is: pages the pool holds are
    /// served from there (a spill copy of them is dropped: the pool copy is at least as
    /// new), spilled pages from the spill file, and pages the map says were in memory but
    /// the pool lacks (their client's save failed) or were lost before are poisoned.
    /// Without a map (older releases), the spill file's allocated extents are the spilled
    /// pages and a map is rebuilt from them and the pool.
    pub fn attach(
        engine: Arc<Engine>,
        cfg: SwapConfig,
        pool: PoolId,
    ) -> Result<Arc<Self>, ExportError> {
        validate(&cfg)?;
        let spec = engine
            .pool_spec(cfg.client, pool)
            .map_err(|source| ExportError::LookupPool { pool, source })?;
        if spec.persistence != Persistence::Persistent {
            return Err(ExportError::AttachPool {
                pool,
                reason: "not a persistent pool",
            });
        }
        if spec.sharing != Sharing::Private {
            return Err(ExportError::AttachPool {
                pool,
                reason: "not a private pool",
            });
        }
        let (me, rep) = Self::reopen(engine, cfg, pool, true, true)?;
        tracing::info!(name = %me.cfg.name, ?pool, ?rep, "swap export attached");
        Ok(me)
    }

    /// Re-opens an export whose pool did not survive (an unclean stop: the daemon's memory
    /// is gone), in a new empty pool. Nothing is served that cannot be proven intact: the
    /// spill file is kept (never truncated) and a spilled page is served only if its copy
    /// matches the checksum the page map recorded; pages the map says were in memory, or
    /// whose copy does not match, are poisoned — reads fail with EIO until the guest
    /// rewrites or trims them. Without a usable map every page is poisoned. Pages the map
    /// says are zero read as zero.
    pub fn recover(
        engine: Arc<Engine>,
        cfg: SwapConfig,
    ) -> Result<(Arc<Self>, ReopenReport), ExportError> {
        validate(&cfg)?;
        let pool = Self::new_pool(&engine, &cfg)?;
        match Self::reopen(engine.clone(), cfg.clone(), pool, false, false) {
            Ok((me, rep)) => {
                tracing::info!(name = %me.cfg.name, ?pool, ?rep, "swap export recovered after an unclean stop");
                Ok((me, rep))
            }
            Err(e) => {
                let _ = engine.destroy_pool(cfg.client, pool);
                Err(e)
            }
        }
    }

    /// Reopens after an unclean stop with `pool` (made by [`SwapExport::create_pool`])
    /// holding the pages recovered from durable memory ([`tmem_core::Engine::recover`]):
    /// those are served (a pool copy is never older than a spill copy: a page is put into
    /// the pool before its map entry changes, and leaves the pool only after its spill
    /// copy is complete), spilled pages are served where their copy matches the map's
    /// checksum, and every other page the map says was written is poisoned.
    pub fn recover_with_pool(
        engine: Arc<Engine>,
        cfg: SwapConfig,
        pool: PoolId,
    ) -> Result<(Arc<Self>, ReopenReport), ExportError> {
        validate(&cfg)?;
        let (me, rep) = Self::reopen(engine, cfg, pool, false, true)?;
        tracing::info!(name = %me.cfg.name, ?pool, ?rep, "swap export recovered from durable memory after an unclean stop");
        Ok((me, rep))
    }

    /// `restored`: the spill file and map were left by a clean stop (trusted as they are);
    /// `pool_trusted`: the pool holds the export's pages as they were (restored from a save,
    /// or recovered from durable memory).
    fn reopen(
        engine: Arc<Engine>,
        cfg: SwapConfig,
        pool: PoolId,
        restored: bool,
        pool_trusted: bool,
    ) -> Result<(Arc<Self>, ReopenReport), ExportError> {
        let spill = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cfg.spill_path)
            .and_then(|f| {
                // Grow only: a spill file is never cut.
                let len = spill_len(cfg.size);
                if f.metadata()?.len() < len {
                    f.set_len(len)?;
                }
                Ok(f)
            })
            .map_err(|source| ExportError::SpillOpen {
                path: cfg.spill_path.clone(),
                source,
            })?;
        let pages = spill_len(cfg.size) / PAGE;
        let map_err = |source| ExportError::PageMap {
            path: PageMap::path_for(&cfg.spill_path),
            source,
        };
        let (map, map_found) = match PageMap::open(&cfg.spill_path, pages).map_err(map_err)? {
            Some(m) => (m, true),
            None => (
                // After an unclean stop without a map nothing is known: default "lost".
                PageMap::create(&cfg.spill_path, pages, !restored).map_err(map_err)?,
                false,
            ),
        };
        let me = Self::new(engine, cfg, pool, spill, map);
        let rep = me.rebuild(restored, pool_trusted, map_found)?;
        Ok((Arc::new(me), rep))
    }

    fn new(engine: Arc<Engine>, cfg: SwapConfig, pool: PoolId, spill: File, map: PageMap) -> Self {
        let pages = spill_len(cfg.size) / PAGE;
        let space = SpaceGuard::new(cfg.spill_reserve);
        let remote_space = remote_space_of(&cfg.name);
        SwapExport {
            engine,
            cfg,
            pool,
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Stripe::default()))
                .collect(),
            spill,
            spill_dirty: AtomicBool::new(false),
            can_punch: AtomicBool::new(true),
            fifo: Mutex::new(VecDeque::new()),
            writeback_lock: Mutex::new(()),
            compact_lock: Mutex::new(()),
            seq: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            c: Counters::default(),
            map,
            poison: Poison::new(pages),
            space,
            remote: RwLock::new(None),
            remote_space,
            orphans: Mutex::new(Vec::new()),
            backoff: RemoteBackoff::new(),
        }
    }

    /// Pages of the spill file that hold data (allocated extents; without `SEEK_DATA`,
    /// non-zero pages), in order.
    fn spill_extents(&self) -> Result<Vec<u64>, ExportError> {
        let end = spill_len(self.cfg.size);
        let mut pages = Vec::new();
        match sys::seek(&self.spill, 0, true) {
            Ok(first) => {
                let mut data = first;
                while let Some(d) = data.filter(|&d| d < end) {
                    let hole = sys::seek(&self.spill, d, false)
                        .map_err(ExportError::SpillIo)?
                        .unwrap_or(end)
                        .min(end);
                    pages.extend(d / PAGE..hole.div_ceil(PAGE));
                    data = sys::seek(&self.spill, hole, true).map_err(ExportError::SpillIo)?;
                }
            }
            Err(_) => {
                // No SEEK_DATA: every non-zero page is a spilled page.
                let mut buf = [0u8; PAGE_SIZE];
                for p in 0..end / PAGE {
                    let n = sys::pread_full(&self.spill, &mut buf, p * PAGE)
                        .map_err(ExportError::SpillIo)?;
                    if !sys::is_zero(&buf[..n]) {
                        pages.push(p);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// The spill copy's map entry, read back from the file.
    fn spill_entry_on_disk(&self, page: u32) -> Result<Entry, ExportError> {
        let mut buf = [0u8; PAGE_SIZE];
        let n = sys::pread_full(&self.spill, &mut buf, u64::from(page) * PAGE)
            .map_err(ExportError::SpillIo)?;
        buf[n..].fill(0);
        Ok(Entry::Spill(spill_hash(&buf)))
    }

    /// Rebuilds the location map, the poison set and the page map at a (re)start: see
    /// [`SwapExport::attach`] and [`SwapExport::recover`]. `restored`: the pool is the one
    /// saved at a clean stop.
    fn rebuild(
        &self,
        restored: bool,
        pool_trusted: bool,
        map_found: bool,
    ) -> Result<ReopenReport, ExportError> {
        let pages = spill_len(self.cfg.size) / PAGE;
        let extents = self.spill_extents()?;
        let entries = if map_found {
            self.map
                .entries(pages)
                .map_err(|source| ExportError::PageMap {
                    path: PageMap::path_for(&self.cfg.spill_path),
                    source,
                })?
        } else {
            Vec::new()
        };
        let default_lost = self.map.default_lost();
        if default_lost {
            self.poison.insert_all();
        }
        // Find the pool's pages by probing: after a clean restart without a map (older
        // release), and after a recovery from durable memory (a first write whose map entry
        // had not changed yet is in the pool alone).
        let mut pool_pages = Vec::new();
        if pool_trusted && (!map_found || !restored) {
            let held = self
                .engine
                .pool_stats(self.cfg.client, self.pool)
                .map(|s| s.held.pages)
                .unwrap_or(0);
            let mut p = 0;
            while (pool_pages.len() as u64) < held && p < pages {
                if let Ok(Some(_)) = self.engine.probe(self.cfg.client, self.key(p as u32)) {
                    pool_pages.push(p);
                }
                p += 1;
            }
        }
        // Every page with something to say, in order: (page, has spill data, map entry).
        let mut todo: std::collections::BTreeMap<u64, (bool, Option<Entry>)> = Default::default();
        for p in extents {
            todo.entry(p).or_default().0 = true;
        }
        for (p, e) in entries {
            todo.entry(u64::from(p)).or_default().1 = Some(e);
        }
        for p in pool_pages {
            todo.entry(p).or_default();
        }
        let mut rep = ReopenReport {
            map_found,
            ..Default::default()
        };
        for (p, (has_data, entry)) in todo {
            let page = p as u32;
            let entry = entry.unwrap_or(if default_lost {
                Entry::Lost
            } else {
                Entry::Zero
            });
            let mut st = self.lock(page);
            let in_pool = pool_trusted
                && matches!(
                    self.engine.probe(self.cfg.client, self.key(page)),
                    Ok(Some(_))
                );
            if in_pool {
                self.poison.remove(p);
                let seq = self.seq.fetch_add(1, Relaxed);
                self.set_loc(&mut st, page, Some(Loc::Pool(seq)));
                if entry != Entry::Mem {
                    self.record(page, Entry::Mem);
                }
                if has_data {
                    self.free_spill(page)?;
                }
                if remote_check(entry).is_some() {
                    self.orphans.lock().push(p);
                }
                rep.in_pool += 1;
                continue;
            }
            if let Some(h) = remote_check(entry) {
                // Served from the remote tier, checked against `h` when read. A spill copy
                // is older (the map moves to the remote copy only once it is replicated) or
                // from a write that was not acknowledged (a pending entry's).
                if has_data {
                    self.free_spill(page)?;
                }
                self.poison.remove(p);
                self.set_loc(&mut st, page, Some(Loc::Remote(h)));
                rep.remote += 1;
                continue;
            }
            let spilled_ok = has_data
                && match entry {
                    // Trusted after a clean stop (every write completed); checked otherwise.
                    Entry::Spill(h) => {
                        restored || self.spill_entry_on_disk(page)? == Entry::Spill(h)
                    }
                    // Overwritten in place when the daemon stopped: the old or the new
                    // content, whichever the copy is; recorded as such from now on.
                    Entry::SpillPending { .. } => {
                        let on_disk = self.spill_entry_on_disk(page)?;
                        let ok = matches!(on_disk, Entry::Spill(h) if entry.spill_matches(h));
                        if ok {
                            self.record(page, on_disk);
                        }
                        ok
                    }
                    // A spill file from before page maps, after a clean stop.
                    Entry::Zero if restored && !map_found => {
                        let e = self.spill_entry_on_disk(page)?;
                        self.record(page, e);
                        true
                    }
                    _ => false,
                };
            if spilled_ok {
                self.poison.remove(p);
                self.set_loc(&mut st, page, Some(Loc::Spill));
                rep.spilled += 1;
            } else if entry == Entry::Zero {
                // The map says zero (it is never ahead of the data): a copy in the spill
                // file is from a write that was not acknowledged before the stop.
                self.poison.remove(p);
                if has_data {
                    self.free_spill(page)?;
                }
            } else {
                // In memory at the stop, lost before, or a copy that does not match.
                self.poison.insert(p);
                if entry != Entry::Lost {
                    self.record(page, Entry::Lost);
                }
                if has_data {
                    // Kept (never truncated); freed when the page is rewritten or trimmed.
                    self.set_loc(&mut st, page, Some(Loc::Spill));
                }
            }
        }
        rep.poisoned = self.poison.count();
        Ok(rep)
    }

    /// The pool this export stores its pages in.
    pub fn pool(&self) -> PoolId {
        self.pool
    }

    /// The configuration the export was made with.
    pub fn config(&self) -> &SwapConfig {
        &self.cfg
    }

    /// Current counters.
    pub fn stats(&self) -> SwapStats {
        let in_pool = self
            .engine
            .pool_stats(self.cfg.client, self.pool)
            .map(|s| s.held.pages)
            .unwrap_or_else(|_| self.c.in_pool.load(Relaxed));
        SwapStats {
            pages_in_pool: in_pool,
            pages_spilled: self.c.spilled.load(Relaxed),
            spill_file_bytes: sys::allocated_bytes(&self.spill),
            spill_reads: self.c.spill_reads.load(Relaxed),
            spill_writes: self.c.spill_writes.load(Relaxed),
            written_back: self.c.written_back.load(Relaxed),
            pulled_back: self.c.pulled_back.load(Relaxed),
            put_refusals: self.c.put_refusals.load(Relaxed),
            zero_pages: self.c.zero_pages.load(Relaxed),
            reads: self.c.reads.load(Relaxed),
            writes: self.c.writes.load(Relaxed),
            poisoned_pages: self.poison.count(),
            spill_errors: self.c.spill_errors.load(Relaxed),
            pages_remote: self.c.remote.load(Relaxed),
            remote_writes: self.c.remote_writes.load(Relaxed),
            remote_reads: self.c.remote_reads.load(Relaxed),
            remote_fallbacks: self.c.remote_fallbacks.load(Relaxed),
            remote_read_errors: self.c.remote_read_errors.load(Relaxed),
        }
    }

    /// Puts a remote tier in front of the spill file (or, with `None`, takes it away for
    /// new spills): a page the pool refuses, or that writeback moves out, goes to the tier
    /// first and is recorded there only once the tier acknowledged it as replicated; when
    /// the tier fails or is unavailable it goes to the spill file as before. Pages already
    /// in the tier stay there (reading them needs a tier again).
    pub fn set_remote(&self, tier: Option<Arc<dyn RemoteTier>>) {
        if let Some(t) = &tier {
            let orphans = std::mem::take(&mut *self.orphans.lock());
            for chunk in orphans.chunks(1024) {
                t.forget(&self.remote_space, chunk);
            }
        }
        *self.remote.write() = tier;
    }

    /// This export's name in the remote tier (`s/<name>.<hash>`): stable across restarts,
    /// so that a recovered page map finds its remote pages again.
    pub fn remote_space(&self) -> &str {
        &self.remote_space
    }

    fn tier(&self) -> Option<Arc<dyn RemoteTier>> {
        self.remote.read().clone()
    }

    /// Releases the copy at `was` (spill file or remote tier) of a page now held elsewhere
    /// (`now`); nothing when both are the same place.
    fn free_copy(&self, page: u32, was: Option<Loc>, now: Option<Loc>) -> Result<(), ExportError> {
        match was {
            Some(Loc::Spill) if now != Some(Loc::Spill) => self.free_spill(page),
            Some(Loc::Remote(_)) if !matches!(now, Some(Loc::Remote(_))) => {
                if let Some(t) = self.tier() {
                    t.forget(&self.remote_space, &[u64::from(page)]);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The pages whose content could not be proven intact (after an unclean stop, or when a
    /// rewrite could go neither to the pool nor to the spill file). Reads of them fail with
    /// EIO; a write or trim of a whole page clears it. A later recovery of pool pages
    /// clears them with [`SwapExport::adopt_recovered`].
    pub fn poison(&self) -> &Poison {
        &self.poison
    }

    /// For a recovery that brings pages back into this export's pool after an unclean stop:
    /// if `page` is poisoned and the pool now holds it, it is served from the pool again.
    /// Returns whether the page was cleared.
    pub fn adopt_recovered(&self, page: u64) -> Result<bool, ExportError> {
        self.check_open()?;
        let Ok(p) = u32::try_from(page) else {
            return Ok(false);
        };
        let mut st = self.lock(p);
        if !self.poison.contains(page) {
            return Ok(false);
        }
        match self.engine.probe(self.cfg.client, self.key(p)) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(false),
            Err(e) => return Err(ExportError::Engine(e)),
        }
        let was = st.loc.get(&p).copied();
        let seq = self.seq.fetch_add(1, Relaxed);
        self.set_loc(&mut st, p, Some(Loc::Pool(seq)));
        self.record(p, Entry::Mem);
        self.poison.remove(page);
        self.free_copy(p, was, Some(Loc::Pool(seq)))?;
        Ok(true)
    }

    /// Flushes (destroys) the pool and removes the spill file. Further I/O fails with
    /// [`ExportError::Closed`]. Calling it again does nothing.
    pub fn destroy(&self) -> Result<(), ExportError> {
        if self.closed.swap(true, Relaxed) {
            return Ok(());
        }
        let pool = self.engine.destroy_pool(self.cfg.client, self.pool);
        let file = match std::fs::remove_file(&self.cfg.spill_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ExportError::SpillRemove {
                path: self.cfg.spill_path.clone(),
                source: e,
            }),
            _ => Ok(()),
        };
        let map = self
            .map
            .remove()
            .map_err(|source| ExportError::SpillRemove {
                path: PageMap::path_for(&self.cfg.spill_path),
                source,
            });
        let mut remote = Vec::new();
        for s in self.stripes.iter() {
            let mut st = s.lock();
            remote.extend(
                st.loc
                    .iter()
                    .filter_map(|(&p, l)| matches!(l, Loc::Remote(_)).then_some(u64::from(p))),
            );
            st.loc.clear();
        }
        if let (Some(t), false) = (self.tier(), remote.is_empty()) {
            for chunk in remote.chunks(1024) {
                t.forget(&self.remote_space, chunk);
            }
        }
        self.c.remote.store(0, Relaxed);
        self.fifo.lock().clear();
        self.c.spilled.store(0, Relaxed);
        self.c.in_pool.store(0, Relaxed);
        tracing::info!(name = %self.cfg.name, pool = ?self.pool, "swap export destroyed");
        pool.map_err(ExportError::ReleasePool)?;
        file.and(map)
    }

    /// Test support: checks that every page is in exactly one place — a page mapped to
    /// the spill file is not in the pool, a page mapped to the pool is there, and every
    /// allocated page of the spill file is a mapped spilled page. Call it while no I/O runs.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut spilled = 0u64;
        for (i, s) in self.stripes.iter().enumerate() {
            let st = s.lock();
            for (&page, &loc) in &st.loc {
                if page as usize & (STRIPES - 1) != i {
                    return Err(format!("page {page} in stripe {i}"));
                }
                let probe = self
                    .engine
                    .probe(self.cfg.client, self.key(page))
                    .map_err(|e| e.to_string())?;
                match (loc, probe) {
                    (Loc::Spill | Loc::Remote(_), Some(_)) => {
                        return Err(format!("page {page} is both spilled and in the pool"))
                    }
                    (Loc::Remote(_), None) => {}
                    (Loc::Pool(_), None) => {
                        return Err(format!("page {page} mapped to the pool is not there"))
                    }
                    (Loc::Spill, None) => spilled += 1,
                    (Loc::Pool(_), Some(_)) => {}
                }
                if matches!(loc, Loc::Pool(_)) && self.poison.contains(u64::from(page)) {
                    return Err(format!("page {page} is in the pool and poisoned"));
                }
            }
        }
        if spilled != self.c.spilled.load(Relaxed) {
            return Err(format!(
                "{spilled} spilled pages, counter says {}",
                self.c.spilled.load(Relaxed)
            ));
        }
        if self.can_punch.load(Relaxed) {
            let end = spill_len(self.cfg.size);
            let mut data = sys::seek(&self.spill, 0, true).map_err(|e| e.to_string())?;
            while let Some(d) = data.filter(|&d| d < end) {
                let hole = sys::seek(&self.spill, d, false)
                    .map_err(|e| e.to_string())?
                    .unwrap_or(end)
                    .min(end);
                for p in d / PAGE..hole.div_ceil(PAGE) {
                    let page = p as u32;
                    if self.lock(page).loc.get(&page) != Some(&Loc::Spill) {
                        return Err(format!(
                            "spill file holds data for page {page}, which is not spilled"
                        ));
                    }
                }
                data = sys::seek(&self.spill, hole, true).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    // ----- page primitives (called with the page's stripe locked) ------------------------

    fn key(&self, page: u32) -> PageKey {
        PageKey::new(self.pool, ObjectId::from_u64(0), page)
    }

    fn lock(&self, page: u32) -> MutexGuard<'_, Stripe> {
        self.stripes[page as usize & (STRIPES - 1)].lock()
    }

    fn check_open(&self) -> Result<(), ExportError> {
        if self.closed.load(Relaxed) {
            Err(ExportError::Closed)
        } else {
            Ok(())
        }
    }

    /// Records a page's new location, keeping the counters in step.
    fn set_loc(&self, st: &mut Stripe, page: u32, new: Option<Loc>) {
        let old = match new {
            Some(l) => st.loc.insert(page, l),
            None => st.loc.remove(&page),
        };
        for (l, d) in [(old, -1i64), (new, 1)] {
            let ctr = match l {
                Some(Loc::Pool(_)) => &self.c.in_pool,
                Some(Loc::Spill) => &self.c.spilled,
                Some(Loc::Remote(_)) => &self.c.remote,
                None => continue,
            };
            if d > 0 {
                ctr.fetch_add(1, Relaxed);
            } else {
                ctr.fetch_sub(1, Relaxed);
            }
        }
        if let Some(Loc::Pool(seq)) = new {
            self.fifo.lock().push_back((page, seq));
        }
    }

    /// Writes a page's spill copy — to the remote tier when there is one and it acknowledges
    /// the copy as replicated, else to the spill file — and returns its map entry (recorded
    /// by the caller; [`Loc::of_spill`] names the place). A spill-file write is refused
    /// without writing (`ENOSPC`) when the filesystem would keep less than the reserve.
    fn spill_write(&self, page: u32, data: &[u8]) -> Result<Entry, SpillFailed> {
        if let Some(t) = self.tier().filter(|t| t.available() && self.backoff.open()) {
            match t.put_durable(&self.remote_space, u64::from(page), data) {
                Ok(()) => {
                    self.backoff.succeeded();
                    self.c.remote_writes.fetch_add(1, Relaxed);
                    return Ok(Entry::Remote(remote_hash(data)));
                }
                Err(e) => {
                    self.backoff.failed();
                    self.c.remote_fallbacks.fetch_add(1, Relaxed);
                    rl_log!(warn, export = %self.cfg.name, page, error = %e, "remote tier did not take the page; spilling it to the local file");
                }
            }
        }
        self.file_write(page, data)
    }

    /// Writes a page's copy to the spill file (see [`SwapExport::spill_write`]).
    fn file_write(&self, page: u32, data: &[u8]) -> Result<Entry, SpillFailed> {
        let failed = |e: io::Error, touched: bool| {
            self.c.spill_errors.fetch_add(1, Relaxed);
            rl_log!(warn, export = %self.cfg.name, page, error = %e, "spill write failed; the request gets an error");
            SpillFailed {
                error: ExportError::SpillIo(e),
                touched,
            }
        };
        self.space
            .check(&self.spill)
            .map_err(|e| failed(e, false))?;
        self.spill
            .write_all_at(data, u64::from(page) * PAGE)
            .map_err(|e| failed(e, true))?;
        self.space.wrote(PAGE);
        self.spill_dirty.store(true, Relaxed);
        self.c.spill_writes.fetch_add(1, Relaxed);
        Ok(Entry::Spill(spill_hash(data)))
    }

    /// Writes `page`'s entry in the page map. A failure is counted and logged once (the map
    /// then deletes itself: see the `pagemap` module), never an error of the request.
    fn record(&self, page: u32, e: Entry) {
        if let Err(err) = self.map.set(page, e) {
            self.c.spill_errors.fetch_add(1, Relaxed);
            tracing::error!(export = %self.cfg.name, error = %err, "cannot write the page map; deleted it: after an unclean stop every page of this export will be poisoned");
        }
    }

    /// Poisons `page` (its content is gone) and records it in the page map.
    fn poison_page(&self, page: u32) {
        self.poison.insert(u64::from(page));
        self.record(page, Entry::Lost);
    }

    /// Releases a page's spill copy (punches a hole; zero-fills where holes are unsupported).
    fn free_spill(&self, page: u32) -> Result<(), ExportError> {
        let off = u64::from(page) * PAGE;
        if self.can_punch.load(Relaxed) {
            match sys::punch_hole(&self.spill, off, PAGE) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::info!(spill = %self.cfg.spill_path.display(), "spill filesystem cannot punch holes; zero-filling freed pages");
                    self.can_punch.store(false, Relaxed);
                }
                Err(e) => return Err(ExportError::SpillIo(e)),
            }
        }
        self.spill
            .write_all_at(&[0u8; PAGE_SIZE], off)
            .map_err(ExportError::SpillIo)?;
        self.spill_dirty.store(true, Relaxed);
        Ok(())
    }

    /// Reads a page into `out`. Returns `false` if it reads as zero (`out` is then zeroed or
    /// left as it was, which callers pass in zeroed).
    fn load(&self, st: &mut Stripe, page: u32, out: &mut [u8]) -> Result<bool, ExportError> {
        if !self.poison.is_empty() && self.poison.contains(u64::from(page)) {
            rl_log!(warn, export = %self.cfg.name, page, "read of a poisoned page (lost at an unclean stop or in a failed spill): I/O error until it is rewritten");
            return Err(ExportError::Poisoned {
                page: u64::from(page),
            });
        }
        let loc = st.loc.get(&page).copied();
        if loc == Some(Loc::Spill) {
            let n = sys::pread_full(&self.spill, out, u64::from(page) * PAGE)
                .map_err(ExportError::SpillIo)?;
            out[n..].fill(0);
            self.c.spill_reads.fetch_add(1, Relaxed);
            return Ok(true);
        }
        if let Some(Loc::Remote(h)) = loc {
            self.load_remote(page, h, out)?;
            if h & PENDING_CHECK != 0 {
                // Rewritten in place when a daemon died: the copy is the old or the new
                // content, and from now on just this one.
                let full = remote_hash(out);
                self.set_loc(st, page, Some(Loc::Remote(full)));
                self.record(page, Entry::Remote(full));
            }
            return Ok(true);
        }
        match self.engine.get(self.cfg.client, self.key(page), out) {
            Ok(Some(PageState::Data)) => {
                if loc.is_none() {
                    // A page restored into the pool: adopt it for writeback.
                    let seq = self.seq.fetch_add(1, Relaxed);
                    self.set_loc(st, page, Some(Loc::Pool(seq)));
                    self.record(page, Entry::Mem);
                }
                Ok(true)
            }
            Ok(Some(PageState::Zero)) => Ok(false),
            Ok(None) => {
                if loc.is_some() {
                    // Never answer zeros for a page that had data.
                    rl_log!(error, export = %self.cfg.name, page, "swap page missing from its pool: poisoned");
                    self.set_loc(st, page, None);
                    self.poison_page(page);
                    return Err(ExportError::Poisoned {
                        page: u64::from(page),
                    });
                }
                Ok(false)
            }
            Err(e) => Err(ExportError::Engine(e)),
        }
    }

    /// Reads a page's remote copy and checks it against the page map's hash `h`. A copy that
    /// is missing or does not match poisons the page (never wrong data); a tier that cannot
    /// answer now fails this request only.
    fn load_remote(&self, page: u32, h: u64, out: &mut [u8]) -> Result<(), ExportError> {
        let Some(t) = self.tier() else {
            self.c.remote_read_errors.fetch_add(1, Relaxed);
            rl_log!(error, export = %self.cfg.name, page, "page lives in the remote tier, but none is configured: I/O error");
            return Err(ExportError::Remote(RemoteError::Unreachable(
                "no remote tier configured".into(),
            )));
        };
        match t.get_durable(&self.remote_space, u64::from(page), out) {
            Ok(true) if remote_check_passes(h, remote_hash(out)) => {
                self.c.remote_reads.fetch_add(1, Relaxed);
                Ok(())
            }
            Ok(found) => {
                self.c.remote_read_errors.fetch_add(1, Relaxed);
                rl_log!(error, export = %self.cfg.name, page, found, "remote copy missing or not the one the page map records: poisoned");
                self.poison_page(page);
                Err(ExportError::Poisoned {
                    page: u64::from(page),
                })
            }
            Err(e) => {
                self.c.remote_read_errors.fetch_add(1, Relaxed);
                rl_log!(warn, export = %self.cfg.name, page, error = %e, "remote tier read failed: I/O error for this request");
                Err(ExportError::Remote(e))
            }
        }
    }

    /// Makes a page read as zero: flushes it from the pool (unconditionally) and frees its
    /// spill or remote copy.
    fn discard(&self, st: &mut Stripe, page: u32) -> Result<(), ExportError> {
        let was = st.loc.get(&page).copied();
        self.engine
            .flush_page(self.cfg.client, self.key(page))
            .map_err(ExportError::Engine)?;
        self.set_loc(st, page, None);
        self.free_copy(page, was, None)?;
        let was_poisoned = self.poison.remove(u64::from(page));
        if was.is_some() || was_poisoned {
            self.record(page, Entry::Zero);
        }
        Ok(())
    }

    /// Stores a full page. A zero page is discarded instead. A refused put sends the page to
    /// the spill file; the old pool copy (the engine keeps it on a refused `try_put`) goes
    /// only once the spill copy is recorded, so a crash in between leaves the old content
    /// or the new, never neither.
    fn store(&self, st: &mut Stripe, page: u32, data: &[u8]) -> Result<Stored, ExportError> {
        if sys::is_zero(data) {
            self.discard(st, page)?;
            return Ok(Stored::Zero);
        }
        let was = st.loc.get(&page).copied();
        // A whole-page write replaces whatever was lost.
        let was_poisoned = self.poison.remove(u64::from(page));
        match self.engine.try_put(self.cfg.client, self.key(page), data) {
            Ok(()) => {
                let seq = self.seq.fetch_add(1, Relaxed);
                self.set_loc(st, page, Some(Loc::Pool(seq)));
                if !matches!(was, Some(Loc::Pool(_))) || was_poisoned {
                    self.record(page, Entry::Mem);
                }
                // Unconditional invalidation of the older copy.
                self.free_copy(page, was, Some(Loc::Pool(seq)))?;
                Ok(Stored::InPool)
            }
            Err(
                e @ (tmem_core::Error::NoSpace
                | tmem_core::Error::QuotaExceeded(_)
                | tmem_core::Error::Frozen(_)),
            ) => {
                let frozen = matches!(e, tmem_core::Error::Frozen(_));
                self.c.put_refusals.fetch_add(1, Relaxed);
                // The spill or remote copy may be overwritten in place: until the new entry
                // is recorded, the map accepts the old copy or the new one, so a daemon
                // killed in between leaves the old content or the new, never poison.
                match was {
                    Some(Loc::Spill) => {
                        if let Ok(Entry::Spill(old)) = self.map.get(page) {
                            self.record(page, Entry::pending(old, spill_hash(data)));
                        }
                    }
                    Some(Loc::Remote(old)) if old & PENDING_CHECK == 0 => {
                        self.record(page, Entry::remote_pending(old, remote_hash(data)));
                    }
                    _ => {}
                }
                // The refused put left any pool copy in place: it goes once the spill copy
                // is written and recorded (a pool copy wins over a spill copy at recovery, so
                // a crash before the flush serves the old content).
                match self.spill_write(page, data) {
                    Ok(entry) => {
                        self.record(page, entry);
                        let now = Loc::of_spill(entry);
                        self.set_loc(st, page, Some(now));
                        if matches!(was, Some(Loc::Pool(_))) {
                            self.engine
                                .flush_page(self.cfg.client, self.key(page))
                                .map_err(ExportError::Engine)?;
                        }
                        self.free_copy(page, was, Some(now))?;
                        Ok(Stored::Spilled(frozen))
                    }
                    Err(SpillFailed { error, touched }) => {
                        // The request fails. What the page held before survives if it was
                        // zero, an untouched spill copy or a pool copy (kept by the refused
                        // put); a spill copy a failed write touched is poisoned, never read
                        // back as zeros.
                        let kept = !was_poisoned
                            && match was {
                                // Zero before: drop what the failed write may have left.
                                None => !touched || self.free_spill(page).is_ok(),
                                Some(Loc::Spill) => !touched,
                                Some(Loc::Pool(_)) => true,
                                // The refused remote write may have replaced it.
                                Some(Loc::Remote(_)) => false,
                            };
                        if !kept {
                            self.free_copy(
                                page,
                                was.filter(|l| matches!(l, Loc::Remote(_))),
                                None,
                            )?;
                            let loc = (touched || was == Some(Loc::Spill)).then_some(Loc::Spill);
                            self.set_loc(st, page, loc);
                            self.poison_page(page);
                        }
                        Err(error)
                    }
                }
            }
            Err(e) => {
                // The engine failed otherwise (e.g. the pool is gone): a pool copy cannot
                // be trusted any more; a spill copy is untouched.
                if matches!(was, Some(Loc::Pool(_))) || was_poisoned {
                    let loc = was.filter(|l| !matches!(l, Loc::Pool(_)));
                    self.set_loc(st, page, loc);
                    self.poison_page(page);
                }
                Err(ExportError::Engine(e))
            }
        }
    }

    /// Moves up to `n` of the oldest pool pages out of the pool (zswap-style writeback): to
    /// the remote tier in batches when there is one taking pages, else to the spill file.
    /// Runs in one thread at a time; others return at once.
    fn writeback(&self, n: usize) {
        let Some(_g) = self.writeback_lock.try_lock() else {
            return;
        };
        if let Some(t) = self.tier().filter(|t| t.available() && self.backoff.open()) {
            self.writeback_remote(t.as_ref(), n);
        } else {
            self.writeback_local(n);
        }
    }

    /// Writeback to the remote tier, [`WRITEBACK_BATCH`] pages per batched write (one
    /// pipeline and one `WAIT` per server). The batch's stripes are locked in ascending
    /// order for the whole batch — no write to its pages can slip in between reading a
    /// page from the pool and recording where it went, and no other path holds two
    /// stripes, so this cannot deadlock. A page the tier does not take goes to the spill
    /// file; a page neither takes stays in the pool, in its place in the queue.
    fn writeback_remote(&self, t: &dyn RemoteTier, n: usize) {
        let mut moved = 0;
        let mut buf = [0u8; PAGE_SIZE];
        while moved < n {
            let want = (n - moved).min(WRITEBACK_BATCH);
            let entries: Vec<(u32, u64)> = {
                let mut f = self.fifo.lock();
                (0..want).map_while(|_| f.pop_front()).collect()
            };
            if entries.is_empty() {
                break;
            }
            let mut idx: Vec<usize> = entries
                .iter()
                .map(|&(p, _)| p as usize & (STRIPES - 1))
                .collect();
            idx.sort_unstable();
            idx.dedup();
            let mut guards: Vec<MutexGuard<'_, Stripe>> =
                idx.iter().map(|&i| self.stripes[i].lock()).collect();
            let slot = |page: u32| {
                idx.binary_search(&(page as usize & (STRIPES - 1)))
                    .unwrap_or_default()
            };
            let mut leftovers: Vec<(u32, u64)> = Vec::new();
            let mut items: Vec<(u32, u64, Vec<u8>)> = Vec::new();
            for (k, &(page, seq)) in entries.iter().enumerate() {
                let st = &mut guards[slot(page)];
                if st.loc.get(&page) != Some(&Loc::Pool(seq)) {
                    continue; // rewritten, moved or dropped since: a stale queue entry
                }
                match self.engine.get(self.cfg.client, self.key(page), &mut buf) {
                    Ok(Some(PageState::Data)) => items.push((page, seq, buf.to_vec())),
                    Ok(Some(PageState::Zero)) => {
                        let _ = self.engine.flush_page(self.cfg.client, self.key(page));
                        self.set_loc(st, page, None);
                        self.record(page, Entry::Zero);
                    }
                    Ok(None) => {
                        // Mapped to the pool but gone from it: never read back as zeros.
                        self.set_loc(st, page, None);
                        self.poison_page(page);
                    }
                    Err(_) => {
                        leftovers.extend_from_slice(&entries[k..]);
                        break;
                    }
                }
            }
            let refs: Vec<(u64, &[u8])> = items
                .iter()
                .map(|(p, _, d)| (u64::from(*p), d.as_slice()))
                .collect();
            let results = if refs.is_empty() {
                Vec::new()
            } else {
                t.put_durable_many(&self.remote_space, &refs)
            };
            let mut refused = false;
            let mut stuck = false;
            for ((page, seq, data), r) in items.iter().zip(results) {
                let page = *page;
                let entry = match r {
                    Ok(()) => {
                        self.c.remote_writes.fetch_add(1, Relaxed);
                        Entry::Remote(remote_hash(data))
                    }
                    Err(e) => {
                        if !refused {
                            rl_log!(warn, export = %self.cfg.name, page, error = %e, "remote tier did not take written-back pages; spilling them to the local file");
                        }
                        refused = true;
                        self.c.remote_fallbacks.fetch_add(1, Relaxed);
                        match self.file_write(page, data) {
                            Ok(entry) => entry,
                            Err(SpillFailed { touched, .. }) => {
                                if touched {
                                    let _ = self.free_spill(page);
                                }
                                leftovers.push((page, *seq));
                                stuck = true;
                                continue;
                            }
                        }
                    }
                };
                // The new copy first, then the pool copy goes: never zero copies.
                self.record(page, entry);
                let _ = self.engine.flush_page(self.cfg.client, self.key(page));
                self.set_loc(&mut guards[slot(page)], page, Some(Loc::of_spill(entry)));
                self.c.written_back.fetch_add(1, Relaxed);
                moved += 1;
            }
            drop(guards);
            if !leftovers.is_empty() {
                let mut f = self.fifo.lock();
                for e in leftovers.into_iter().rev() {
                    f.push_front(e);
                }
                stuck = true;
            }
            if refused {
                self.backoff.failed();
            } else if !items.is_empty() {
                self.backoff.succeeded();
            }
            if stuck || refused {
                break;
            }
        }
    }

    /// Writeback to the spill file, one page at a time.
    fn writeback_local(&self, n: usize) {
        let mut moved = 0;
        let mut buf = [0u8; PAGE_SIZE];
        while moved < n {
            let Some((page, seq)) = self.fifo.lock().pop_front() else {
                break;
            };
            let mut st = self.lock(page);
            if st.loc.get(&page) != Some(&Loc::Pool(seq)) {
                continue; // rewritten, moved or dropped since: a stale queue entry
            }
            match self.engine.get(self.cfg.client, self.key(page), &mut buf) {
                Ok(Some(PageState::Data)) => {
                    let entry = match self.spill_write(page, &buf) {
                        Ok(entry) => entry,
                        Err(SpillFailed { touched, .. }) => {
                            // Leave the page in the pool, in its place in the queue; drop a
                            // torn copy so the spill file holds only spilled pages.
                            if touched {
                                let _ = self.free_spill(page);
                            }
                            self.fifo.lock().push_front((page, seq));
                            break;
                        }
                    };
                    // Spill copy first, then the pool copy goes: never zero copies.
                    self.record(page, entry);
                    let _ = self.engine.flush_page(self.cfg.client, self.key(page));
                    self.set_loc(&mut st, page, Some(Loc::of_spill(entry)));
                    self.c.written_back.fetch_add(1, Relaxed);
                    moved += 1;
                }
                Ok(Some(PageState::Zero)) => {
                    let _ = self.engine.flush_page(self.cfg.client, self.key(page));
                    self.set_loc(&mut st, page, None);
                    self.record(page, Entry::Zero);
                }
                Ok(None) => {
                    // Mapped to the pool but gone from it: never read back as zeros.
                    self.set_loc(&mut st, page, None);
                    self.poison_page(page);
                }
                Err(_) => break,
            }
        }
    }

    /// Drops stale queue entries when the queue has grown far beyond the pool's pages.
    fn maybe_compact(&self) {
        let limit = 4 * self.c.in_pool.load(Relaxed) + 4096;
        if self.fifo.lock().len() as u64 <= limit {
            return;
        }
        let Some(_g) = self.compact_lock.try_lock() else {
            return;
        };
        let old = std::mem::take(&mut *self.fifo.lock());
        let kept: VecDeque<(u32, u64)> = old
            .into_iter()
            .filter(|&(page, seq)| self.lock(page).loc.get(&page) == Some(&Loc::Pool(seq)))
            .collect();
        let mut q = self.fifo.lock();
        let newer = std::mem::replace(&mut *q, kept);
        q.extend(newer);
    }

    /// Whether a spilled page that was just read should move back into the pool: only
    /// when the engine has clear room (more than an eighth of its budget, at least 64
    /// pages), so pull-back and writeback do not chase each other.
    fn pullback_allowed(&self) -> bool {
        let budget = self.engine.budget();
        let free = budget.saturating_sub(self.engine.held_bytes());
        free > (budget / 8).max(64 * PAGE)
    }

    fn read_page(&self, page: u32, out: &mut [u8]) -> Result<bool, ExportError> {
        let mut st = self.lock(page);
        let data = self.load(&mut st, page, out)?;
        let was = st.loc.get(&page).copied();
        if data
            && matches!(was, Some(Loc::Spill | Loc::Remote(_)))
            && self.pullback_allowed()
            && self
                .engine
                .put(self.cfg.client, self.key(page), out)
                .is_ok()
        {
            let seq = self.seq.fetch_add(1, Relaxed);
            self.set_loc(&mut st, page, Some(Loc::Pool(seq)));
            self.record(page, Entry::Mem);
            self.c.pulled_back.fetch_add(1, Relaxed);
            self.free_copy(page, was, Some(Loc::Pool(seq)))?;
        }
        Ok(data)
    }

    /// True if reading `[offset, offset+len)` may take a remote-tier round trip: some page of
    /// it lives in the tier, or its stripe is busy (held, perhaps, by such a read), or the
    /// range is too long to look at cheaply. Never waits for a lock.
    fn range_may_block(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.c.remote.load(Relaxed) == 0 {
            return false;
        }
        let first = offset / PAGE;
        let last = (offset + len - 1) / PAGE;
        if last - first >= MAY_BLOCK_MAX_PAGES {
            return true;
        }
        (first..=last).any(|p| {
            let page = p as u32;
            match self.stripes[page as usize & (STRIPES - 1)].try_lock() {
                Some(st) => matches!(st.loc.get(&page), Some(Loc::Remote(_))),
                None => true,
            }
        })
    }

    fn do_read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, ExportError> {
        self.check_open()?;
        self.c.reads.fetch_add(1, Relaxed);
        let mut zr = ZeroRanges::none();
        let mut tmp = [0u8; PAGE_SIZE];
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let page = (off / PAGE) as u32;
            let in_page = (off % PAGE) as usize;
            let n = (PAGE_SIZE - in_page).min(buf.len() - pos);
            let data = if n == PAGE_SIZE {
                self.read_page(page, &mut buf[pos..pos + n])?
            } else {
                tmp.fill(0);
                let d = self.read_page(page, &mut tmp)?;
                if d {
                    buf[pos..pos + n].copy_from_slice(&tmp[in_page..in_page + n]);
                }
                d
            };
            if !data {
                self.c.zero_pages.fetch_add(1, Relaxed);
                zr.push(pos, n);
            }
            pos += n;
        }
        Ok(zr)
    }

    /// Applies `f` to each page touched by `[offset, offset+len)`: `f(page, in_page, n, full)`
    /// where `full` means the request covers every exposed byte of the page.
    fn for_pages(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u32, usize, usize, bool) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let page = off / PAGE;
            let in_page = (off % PAGE) as usize;
            let n = ((PAGE - in_page as u64).min(end - off)) as usize;
            let exposed_end = ((page + 1) * PAGE).min(self.cfg.size);
            let full = in_page == 0 && off + n as u64 >= exposed_end;
            f(page as u32, in_page, n, full)?;
            off += n as u64;
        }
        Ok(())
    }

    fn do_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.check_open()?;
        self.c.writes.fetch_add(1, Relaxed);
        let mut tmp = [0u8; PAGE_SIZE];
        let mut pos = 0usize;
        self.for_pages(offset, data.len() as u64, |page, in_page, n, _| {
            let chunk = &data[pos..pos + n];
            pos += n;
            let mut st = self.lock(page);
            let r = if n == PAGE_SIZE {
                self.store(&mut st, page, chunk)?
            } else {
                // Read-modify-write under the page lock: concurrent writers can't lose updates.
                tmp.fill(0);
                self.load(&mut st, page, &mut tmp)?;
                tmp[in_page..in_page + n].copy_from_slice(chunk);
                self.store(&mut st, page, &tmp)?
            };
            drop(st);
            if r == Stored::Spilled(false) {
                self.writeback(WRITEBACK_BATCH);
            }
            Ok(())
        })?;
        self.maybe_compact();
        if fua {
            self.do_flush()?;
        }
        Ok(())
    }

    /// TRIM (`trim`) or WRITE_ZEROES. A part of a poisoned page cannot be zeroed (the rest
    /// of it is unknown): WRITE_ZEROES fails, TRIM leaves it (trimmed data is unspecified).
    fn do_zero(&self, offset: u64, len: u64, trim: bool) -> Result<(), ExportError> {
        self.check_open()?;
        let mut tmp = [0u8; PAGE_SIZE];
        self.for_pages(offset, len, |page, in_page, n, full| {
            let mut st = self.lock(page);
            if full {
                self.discard(&mut st, page)
            } else {
                tmp.fill(0);
                match self.load(&mut st, page, &mut tmp) {
                    Ok(true) => {
                        tmp[in_page..in_page + n].fill(0);
                        self.store(&mut st, page, &tmp)?;
                    }
                    Ok(false) => {}
                    Err(ExportError::Poisoned { .. }) if trim => {}
                    Err(e) => return Err(e),
                }
                Ok(())
            }
        })
    }

    fn do_flush(&self) -> Result<(), ExportError> {
        self.check_open()?;
        if self.spill_dirty.swap(false, Relaxed) {
            if let Err(e) = self.spill.sync_data() {
                self.spill_dirty.store(true, Relaxed);
                return Err(ExportError::SpillIo(e));
            }
        }
        self.map.sync().map_err(ExportError::SpillIo)
    }

    fn do_block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        self.check_open()?;
        let first = offset / PAGE;
        let last = (offset + len.max(1))
            .div_ceil(PAGE)
            .min(first + STATUS_MAX_PAGES);
        let mut out: Vec<Extent> = Vec::new();
        let mut off = offset;
        for p in first..last {
            let page = p as u32;
            let data = {
                let st = self.lock(page);
                match st.loc.get(&page) {
                    // A poisoned page is not a hole: clients must read it (and fail).
                    _ if self.poison.contains(p) => true,
                    Some(Loc::Spill | Loc::Remote(_)) => true,
                    _ => matches!(
                        self.engine.probe(self.cfg.client, self.key(page)),
                        Ok(Some(PageState::Data))
                    ),
                }
            };
            let end = ((p + 1) * PAGE).min(self.cfg.size);
            if end <= off {
                break;
            }
            let ext = Extent {
                len: end - off,
                hole: !data,
                zero: !data,
            };
            match out.last_mut() {
                Some(l) if l.hole == ext.hole && l.zero == ext.zero => l.len += ext.len,
                _ => out.push(ext),
            }
            off = end;
        }
        Ok(out)
    }
}

impl BlockBackend for SwapExport {
    fn size(&self) -> u64 {
        self.cfg.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: false,
            multi_conn_safe: true,
            can_block_status: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, BackendError> {
        check_range(self.cfg.size, offset, buf.len() as u64)?;
        Ok(self.do_read(offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        check_range(self.cfg.size, offset, data.len() as u64)?;
        Ok(self.do_write(offset, data, fua)?)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(self.cfg.size, offset, len)?;
        Ok(self.do_zero(offset, len, true)?)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _fast_only: bool,
    ) -> Result<(), BackendError> {
        // Always fast: whole pages are flushed, never written.
        check_range(self.cfg.size, offset, len)?;
        Ok(self.do_zero(offset, len, false)?)
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(self.do_flush()?)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(self.cfg.size, offset, len)?;
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        check_range(self.cfg.size, offset, len)?;
        Ok(self.do_block_status(offset, len)?)
    }

    /// Reads that touch a page in the remote tier wait on a network round trip.
    fn read_may_block(&self, offset: u64, len: u64) -> bool {
        self.range_may_block(offset, len)
    }
}
