//! The swap export: a block device whose pages live in a persistent private pool, with a
//! per-export spill file for the pages the pool refuses.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use tmem_core::{
    ClientId, Codec, DedupScope, Engine, ObjectId, PageKey, PageState, Persistence, PoolId,
    PoolSpec, Sharing, PAGE_SIZE,
};
use tmem_nbd::{BackendCaps, BackendError, BlockBackend, Extent, ZeroRanges};

use crate::sys::{self, rl_log};
use crate::{check_range, ExportError, MAX_EXPORT_BYTES};

const PAGE: u64 = PAGE_SIZE as u64;
/// Number of page-lock stripes (power of two).
const STRIPES: usize = 1024;
/// Oldest pool pages moved to the spill file each time the pool refuses a put.
pub const WRITEBACK_BATCH: usize = 64;
/// Most pages one `block_status` call looks at.
const STATUS_MAX_PAGES: u64 = 1 << 16;

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
}

/// Where a page lives. Absent from the map: nowhere, or (after a restore) in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    /// In the pool; the number orders pages for oldest-first writeback.
    Pool(u64),
    /// In the spill file at `page * 4096`.
    Spill,
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

impl SwapExport {
    /// Creates a new persistent private pool labelled `swap:<name>` for `cfg.client` and a
    /// fresh (truncated) sparse spill file at `cfg.spill_path`.
    pub fn create(engine: Arc<Engine>, cfg: SwapConfig) -> Result<Arc<Self>, ExportError> {
        validate(&cfg)?;
        let spec = PoolSpec::private_persistent()
            .with_codec(cfg.codec)
            .with_dedup(cfg.dedup)
            .with_label(format!("swap:{}", cfg.name));
        let pool = engine
            .create_pool(cfg.client, spec)
            .map_err(ExportError::CreatePool)?;
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
                let _ = engine.destroy_pool(cfg.client, pool);
                return Err(ExportError::SpillOpen {
                    path: cfg.spill_path,
                    source,
                });
            }
        };
        tracing::info!(name = %cfg.name, size = cfg.size, ?pool, spill = %cfg.spill_path.display(), "swap export created");
        Ok(Arc::new(Self::new(engine, cfg, pool, spill)))
    }

    /// Re-attaches to `pool` (a persistent private pool of `cfg.client`, typically restored
    /// from a save). An existing spill file is reused: its allocated pages are the spilled
    /// pages, except where the pool also holds the page (the pool copy is then the newer
    /// one and the spill copy is dropped). A missing spill file is created.
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
        let spill = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cfg.spill_path)
            .and_then(|f| f.set_len(spill_len(cfg.size)).map(|()| f))
            .map_err(|source| ExportError::SpillOpen {
                path: cfg.spill_path.clone(),
                source,
            })?;
        let me = Self::new(engine, cfg, pool, spill);
        me.scan_spill()?;
        tracing::info!(name = %me.cfg.name, ?pool, spilled = me.c.spilled.load(Relaxed), "swap export attached");
        Ok(Arc::new(me))
    }

    fn new(engine: Arc<Engine>, cfg: SwapConfig, pool: PoolId, spill: File) -> Self {
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
        }
    }

    /// Rebuilds the spilled-page map from the spill file's allocated extents.
    fn scan_spill(&self) -> Result<(), ExportError> {
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
        for p in pages {
            let page = p as u32;
            let mut st = self.lock(page);
            match self.engine.probe(self.cfg.client, self.key(page)) {
                Ok(Some(_)) => self.free_spill(page)?,
                Ok(None) => self.set_loc(&mut st, page, Some(Loc::Spill)),
                Err(e) => return Err(ExportError::Engine(e)),
            }
        }
        Ok(())
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
        }
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
        for s in self.stripes.iter() {
            s.lock().loc.clear();
        }
        self.fifo.lock().clear();
        self.c.spilled.store(0, Relaxed);
        self.c.in_pool.store(0, Relaxed);
        tracing::info!(name = %self.cfg.name, pool = ?self.pool, "swap export destroyed");
        pool.map_err(ExportError::ReleasePool)?;
        file
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
                    (Loc::Spill, Some(_)) => {
                        return Err(format!("page {page} is both spilled and in the pool"))
                    }
                    (Loc::Pool(_), None) => {
                        return Err(format!("page {page} mapped to the pool is not there"))
                    }
                    (Loc::Spill, None) => spilled += 1,
                    (Loc::Pool(_), Some(_)) => {}
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

    fn spill_write(&self, page: u32, data: &[u8]) -> Result<(), ExportError> {
        self.spill
            .write_all_at(data, u64::from(page) * PAGE)
            .map_err(ExportError::SpillIo)?;
        self.spill_dirty.store(true, Relaxed);
        self.c.spill_writes.fetch_add(1, Relaxed);
        Ok(())
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
        let loc = st.loc.get(&page).copied();
        if loc == Some(Loc::Spill) {
            let n = sys::pread_full(&self.spill, out, u64::from(page) * PAGE)
                .map_err(ExportError::SpillIo)?;
            out[n..].fill(0);
            self.c.spill_reads.fetch_add(1, Relaxed);
            return Ok(true);
        }
        match self.engine.get(self.cfg.client, self.key(page), out) {
            Ok(Some(PageState::Data)) => {
                if loc.is_none() {
                    // A page restored into the pool: adopt it for writeback.
                    let seq = self.seq.fetch_add(1, Relaxed);
                    self.set_loc(st, page, Some(Loc::Pool(seq)));
                }
                Ok(true)
            }
            Ok(Some(PageState::Zero)) => Ok(false),
            Ok(None) => {
                if loc.is_some() {
                    rl_log!(warn, page, "swap page missing from its pool");
                    self.set_loc(st, page, None);
                }
                Ok(false)
            }
            Err(e) => Err(ExportError::Engine(e)),
        }
    }

    /// Makes a page read as zero: flushes it from the pool (unconditionally) and frees its
    /// spill copy.
    fn discard(&self, st: &mut Stripe, page: u32) -> Result<(), ExportError> {
        let was = st.loc.get(&page).copied();
        self.engine
            .flush_page(self.cfg.client, self.key(page))
            .map_err(ExportError::Engine)?;
        self.set_loc(st, page, None);
        if was == Some(Loc::Spill) {
            self.free_spill(page)?;
        }
        Ok(())
    }

    /// Stores a full page. A zero page is discarded instead. A refused put (the engine has
    /// already flushed the key) sends the page to the spill file.
    fn store(&self, st: &mut Stripe, page: u32, data: &[u8]) -> Result<Stored, ExportError> {
        if sys::is_zero(data) {
            self.discard(st, page)?;
            return Ok(Stored::Zero);
        }
        let was = st.loc.get(&page).copied();
        match self.engine.put(self.cfg.client, self.key(page), data) {
            Ok(()) => {
                let seq = self.seq.fetch_add(1, Relaxed);
                self.set_loc(st, page, Some(Loc::Pool(seq)));
                if was == Some(Loc::Spill) {
                    // Unconditional invalidation of the older copy.
                    self.free_spill(page)?;
                }
                Ok(Stored::InPool)
            }
            Err(
                e @ (tmem_core::Error::NoSpace
                | tmem_core::Error::QuotaExceeded(_)
                | tmem_core::Error::Frozen(_)),
            ) => {
                let frozen = matches!(e, tmem_core::Error::Frozen(_));
                self.c.put_refusals.fetch_add(1, Relaxed);
                // The failed put flushed any pool copy; the spill copy is now the only one.
                match self.spill_write(page, data) {
                    Ok(()) => {
                        self.set_loc(st, page, Some(Loc::Spill));
                        Ok(Stored::Spilled(frozen))
                    }
                    Err(e) => {
                        self.set_loc(st, page, None);
                        Err(e)
                    }
                }
            }
            Err(e) => {
                self.set_loc(st, page, None);
                Err(ExportError::Engine(e))
            }
        }
    }

    /// Moves up to `n` of the oldest pool pages to the spill file (zswap-style writeback).
    /// Runs in one thread at a time; others return at once.
    fn writeback(&self, n: usize) {
        let Some(_g) = self.writeback_lock.try_lock() else {
            return;
        };
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
                    if let Err(e) = self.spill_write(page, &buf) {
                        rl_log!(warn, error = %e, "swap writeback to spill file failed");
                        // Leave the page in the pool, in its place in the queue.
                        self.fifo.lock().push_front((page, seq));
                        break;
                    }
                    // Spill copy first, then the pool copy goes: never zero copies.
                    let _ = self.engine.flush_page(self.cfg.client, self.key(page));
                    self.set_loc(&mut st, page, Some(Loc::Spill));
                    self.c.written_back.fetch_add(1, Relaxed);
                    moved += 1;
                }
                Ok(Some(PageState::Zero)) | Ok(None) => {
                    let _ = self.engine.flush_page(self.cfg.client, self.key(page));
                    self.set_loc(&mut st, page, None);
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
        if data
            && st.loc.get(&page) == Some(&Loc::Spill)
            && self.pullback_allowed()
            && self
                .engine
                .put(self.cfg.client, self.key(page), out)
                .is_ok()
        {
            let seq = self.seq.fetch_add(1, Relaxed);
            self.set_loc(&mut st, page, Some(Loc::Pool(seq)));
            self.c.pulled_back.fetch_add(1, Relaxed);
            self.free_spill(page)?;
        }
        Ok(data)
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

    fn do_zero(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.check_open()?;
        let mut tmp = [0u8; PAGE_SIZE];
        self.for_pages(offset, len, |page, in_page, n, full| {
            let mut st = self.lock(page);
            if full {
                self.discard(&mut st, page)
            } else {
                tmp.fill(0);
                if self.load(&mut st, page, &mut tmp)? {
                    tmp[in_page..in_page + n].fill(0);
                    self.store(&mut st, page, &tmp)?;
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
        Ok(())
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
                    Some(Loc::Spill) => true,
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
        Ok(self.do_zero(offset, len)?)
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
        Ok(self.do_zero(offset, len)?)
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
}
