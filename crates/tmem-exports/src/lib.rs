//! # tmem-exports: the two export kinds tmemd serves over NBD
//!
//! Both are [`tmem_nbd::BlockBackend`]s on top of a [`tmem_core::Engine`].
//!
//! ## swap ([`SwapExport`]): frontswap with writeback
//! A block device of `size` bytes whose page *i* is key (object 0, index *i*) of a
//! persistent private pool labelled `swap:<name>`. Devices above 16 TiB (2^32 pages) are
//! refused ([`ExportError::TooLarge`]).
//! * **Zeros.** Never-written, trimmed and all-zero pages are held nowhere: a write of an
//!   all-zero page flushes the key. Such pages (and engine [`tmem_core::PageState::Zero`]
//!   pages) are reported as zero ranges, so the server sends holes. TRIM and WRITE_ZEROES
//!   flush whole pages (and free their spill copies) and zero partial ones.
//! * **Page locks.** 1024 striped mutexes, one per `page % 1024`. Every page operation —
//!   read, the read-modify-write of an unaligned or sub-page write, discard, writeback,
//!   pull-back — runs under its page's stripe, and no code path holds two stripes at once.
//!   The stripe also guards the **location map** (`page → Pool(seq) | Spill`; absent =
//!   zero, or a page restored into the pool): a page is in exactly one place.
//! * **Spill.** When a put is refused (`NoSpace`, `QuotaExceeded`, `Frozen`) the engine has
//!   already flushed the key; the page is written to the export's sparse spill file at
//!   offset `page * 4096` (identity layout: no slot allocator, and the file describes
//!   itself after a restart). A page leaving the spill file (rewritten into the pool,
//!   pulled back, discarded) gets its range hole-punched (zero-filled where the filesystem
//!   cannot punch). The older copy is always invalidated unconditionally — the zswap
//!   stale-duplicate bug cannot happen because both places change under the same lock.
//!   A guest never sees an error because the pool is full; only spill-file I/O errors
//!   (`ENOSPC` → NBD `ENOSPC`, others `EIO`) reach it, and spill writes refused because
//!   the filesystem would keep less than [`SwapConfig::spill_reserve`] (`fstatvfs`;
//!   `ENOSPC`). Such a failure is counted ([`SwapStats::spill_errors`]) and loses nothing
//!   already stored: a page being written back stays in the pool; a rewritten page whose
//!   older copy went with the refused put (or with a torn spill write) is poisoned, not
//!   zeroed. Creating an export needs room for its worst case (every page spilled) plus
//!   the reserve ([`ExportError::SpillSpace`]).
//! * **Remote tier.** With [`SwapExport::set_remote`], a page the pool refuses (or that
//!   writeback moves out) goes first to a [`RemoteTier`] (other hosts' memory): it is
//!   recorded there (`Loc::Remote`, page-map entry `remote` with a 62-bit hash) only once
//!   the tier acknowledged it as replicated; any failure sends it to the spill file as
//!   before (and for a while after such a failure — 100 ms doubling to 30 s — spills go
//!   straight to the file, so a slow or broken tier costs one attempt per period). Reads
//!   check the copy against the map's hash: a missing or different copy
//!   poisons the page (EIO, never wrong data); a tier that cannot answer fails that one
//!   request. Rewrites, trims, pull-backs and `destroy` delete remote copies.
//! * **Oldest first.** Every successful put appends `(page, seq)` to a FIFO; an entry is
//!   stale once the page's map entry no longer says `Pool(seq)`. After a refused put the
//!   writer (outside its page lock; one writer at a time) moves up to
//!   [`swap::WRITEBACK_BATCH`] of the oldest pool pages to the spill file — spill copy
//!   written first, then the pool copy flushed — so that the next writes fit in the pool
//!   (zswap's LRU writeback). The FIFO is compacted when it grows past 4× the pool pages.
//! * **Pull-back.** Reading a spilled page moves it back into the pool when the engine has
//!   room (more than ⅛ of the budget, and at least 64 pages, free).
//! * **Durability.** Pool pages live as long as the daemon (which saves pools on SIGTERM);
//!   FLUSH and FUA `fdatasync` the spill file and the page map if written since the last
//!   sync.
//! * **Page map.** `SPILL_PATH.map` holds one entry per page — zero, in memory, lost, or
//!   spilled with a 63-bit xxh3 of its spill copy — written (`pwrite`, under the page lock)
//!   after each change of place and before the request is acknowledged, so that it is never
//!   ahead of the data: a dying daemon leaves entries that are true or weaker (see the
//!   `pagemap` module).
//! * **Poison.** [`Poison`] holds the pages whose content cannot be proven intact. Reading
//!   one fails with EIO (never zeros), BLOCK_STATUS reports it as data so clients do read
//!   it; a whole-page write or a trim clears it; a sub-page write or WRITE_ZEROES of it
//!   fails (the rest of the page is unknown), a sub-page trim leaves it.
//! * **Restart after a clean stop.** [`SwapExport::attach`] re-attaches to the restored
//!   pool: pages the pool holds are served from it (a spill copy of them is dropped: every
//!   path leaves the pool copy at least as new), spilled pages from the spill file, and
//!   pages the map calls lost, or in memory but missing from the pool, stay poisoned.
//!   Without a map (older releases) the spill file's allocated extents are the spilled
//!   pages. This assumes the save was taken with the export quiesced (no write after the
//!   save point).
//! * **Restart after an unclean stop.** [`SwapExport::recover`] opens the export in a new,
//!   empty pool and keeps the spill file (never truncated): a spilled page is served if its
//!   copy matches the map's checksum; pages that were in memory, torn copies, and — without
//!   a usable map — every page are poisoned until the guest rewrites or trims them.
//!   [`SwapExport::adopt_recovered`] clears pages that a recovery of the pool brings back.
//!
//! ## cached ([`CachedExport`]): shared cleancache in front of a raw image
//! Reads look each page up in a shared ephemeral pool joined by UUID (by default derived
//! from the image's device and inode), object 0, index = page. A run of missed pages is
//! read from the image in one `pread` (`O_DIRECT` where the filesystem allows, through a
//! 4096-aligned buffer) and put into the pool. Writes go to the image and replace the
//! cached pages before they are acknowledged; unaligned writes read-modify-write whole
//! pages. Only the image's `size` bytes are exposed; the partial tail page is written
//! through a second, buffered descriptor.
//!
//! **The miss/write race** (reader misses, reads old data, writer writes and invalidates,
//! reader puts the old data) is closed by per-stripe generation counters shared by every
//! export of the image in the process (a registry keyed by engine and device/inode): a
//! writer holds the stripe locks of its pages (ascending order) and bumps their generation
//! to odd before reading/writing anything and back to even after the new pages are in
//! the cache; a reader records the generation before its `pread` and puts a page only if,
//! under the stripe lock, it is even and unchanged. The reader holds no lock during I/O.
//! Opening an image that is already cached in the same engine under another UUID is
//! refused ([`ExportError::InvalidConfig`]): two pools for one file could not be kept
//! coherent. The image size is read once, at open.
//!
//! **Remote tier.** With [`CachedExport::set_remote`], the shared pool hands every page it
//! evicts to a [`RemoteTier`] (an eviction sink, see [`tmem_core::EvictionSink`]), tagged
//! with its stripe's generation; a run of missed pages asks the tier before the image and
//! takes a copy only if its tag equals the generation read before the fetch. Every write
//! bumps the generation before it is acknowledged, and the engine calls the sink with the
//! page's shard locked (a writer's invalidation cannot slip in between), so a remote copy
//! is never older than the last acknowledged write: no round trip on the write path. The
//! tier's key space holds a random epoch per process, so copies from before a restart are
//! never read.
//!
//! **Read-only by default.** A cached export opens its image `O_RDONLY` and tells NBD
//! clients it is read-only (writes, trims and zeroing fail with `EPERM`) unless its
//! [`CachedConfig::writable`] is set: the image is usually a base shared by many guests.
//!
//! **The image changing underneath.** The image's [`ImageIdentity`] (device, inode, size,
//! mtime with nanoseconds) is recorded at open and compared on every FLUSH and on
//! [`CachedExport::check_image`] (tmemd calls it when a client connects). A change other
//! than the export's own writes (which re-record it) drops every cached page of the image
//! from the shared pool, with the stripe generations bumped so no read in flight puts an
//! older page back, and logs one warning. A path that now names another file (the image
//! was replaced by `mv`) is logged once; the export keeps serving the file it opened,
//! whose cache is still right. [`CachedExport::invalidate_image`] drops the cache by hand.
//!
//! ## Errors
//! [`ExportError`] maps into [`tmem_nbd::BackendError`] with an exhaustive match.
#![warn(missing_docs)]

mod cached;
mod error;
mod identity;
mod pagemap;
mod poison;
pub mod remote;
pub mod swap;
mod sys;

pub use cached::{image_uuid, CachedConfig, CachedExport, CachedStats};
pub use error::ExportError;
pub use identity::{ImageCheck, ImageIdentity};
pub use poison::Poison;
pub use remote::{RemoteError, RemotePage, RemoteTier};
pub use swap::{ReopenReport, SwapConfig, SwapExport, SwapStats};

use tmem_nbd::BackendError;

/// Largest export: 2^32 pages of 4 KiB (one object's index space), i.e. 16 TiB.
pub const MAX_EXPORT_BYTES: u64 = (1u64 << 32) * tmem_core::PAGE_SIZE as u64;

/// Rejects ranges outside an export of `size` bytes (the server checks too; direct
/// callers may not).
fn check_range(size: u64, offset: u64, len: u64) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len }),
    }
}
