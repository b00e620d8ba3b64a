//! [`MemBackend`]: a sparse in-memory block store (4 KiB pages in sharded hash maps).
//!
//! Pages that are entirely zero are never stored: they are holes, read back as
//! `OFFSET_HOLE` chunks and reported as `HOLE|ZERO` by `BLOCK_STATUS`.
//!
//! Page memory comes from per-shard slabs of 64 pages with a free list, so a first-touch write
//! does not cost one `malloc` (and, in glibc's per-thread arenas, one `mprotect`) per page.
//! Freed pages are reused but slab memory is not returned to the OS.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{BackendCaps, BackendError, BlockBackend, Extent, ZeroRanges};

/// Page size of the store, in bytes.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;
/// Pages per slab allocation.
const SLAB_PAGES: usize = 64;
type PageBuf = [u8; PAGE_SIZE];
type PageMap = HashMap<u64, u32, BuildHasherDefault<PageHasher>>;

/// Multiplicative hasher for page indices (keys are already well spread u64s).
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One shard: page index -> slot, and the slabs that hold the slots.
#[derive(Default)]
struct ShardInner {
    map: PageMap,
    slabs: Vec<Box<[PageBuf]>>,
    free: Vec<u32>,
    fresh: u32,
}

impl ShardInner {
    fn page(&self, slot: u32) -> &PageBuf {
        &self.slabs[slot as usize / SLAB_PAGES][slot as usize % SLAB_PAGES]
    }

    fn page_mut(&mut self, slot: u32) -> &mut PageBuf {
        &mut self.slabs[slot as usize / SLAB_PAGES][slot as usize % SLAB_PAGES]
    }

    /// A slot for a new page; its contents are unspecified (recycled) or zero (fresh).
    fn alloc(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        if self.fresh as usize == self.slabs.len() * SLAB_PAGES {
            self.slabs
                .push(vec![[0u8; PAGE_SIZE]; SLAB_PAGES].into_boxed_slice());
        }
        self.fresh += 1;
        self.fresh - 1
    }
}

type Shard = RwLock<ShardInner>;

/// A sparse, thread-safe, in-memory block device.
pub struct MemBackend {
    size: u64,
    shards: Box<[Shard]>,
    pages: AtomicU64,
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemBackend")
            .field("size", &self.size)
            .field("stored_pages", &self.stored_pages())
            .finish()
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets the aligned middle part.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0)
        && post.iter().all(|&x| x == 0)
        && mid.iter().fold(0u64, |a, &w| a | w) == 0
}

impl MemBackend {
    /// A store of `size` bytes (need not be page-aligned), initially all zero. 64 shards.
    pub fn new(size: u64) -> Self {
        Self::with_shards(size, 64)
    }

    /// A store with `shards` lock shards (at least 1).
    pub fn with_shards(size: u64, shards: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| RwLock::new(ShardInner::default()))
            .collect();
        Self {
            size,
            shards,
            pages: AtomicU64::new(0),
        }
    }

    /// Number of non-zero pages currently stored.
    pub fn stored_pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    fn shard(&self, idx: u64) -> &Shard {
        // Consecutive pages go to different shards.
        let n = self.shards.len() as u64;
        &self.shards[(idx % n) as usize]
    }

    fn read_shard(&self, idx: u64) -> RwLockReadGuard<'_, ShardInner> {
        // A poisoned lock only means another thread panicked mid-copy; page data is plain bytes.
        self.shard(idx).read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_shard(&self, idx: u64) -> RwLockWriteGuard<'_, ShardInner> {
        self.shard(idx).write().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::OutOfRange { offset, len }),
        }
    }

    /// Calls `f(page_index, offset_in_page, byte_offset_in_request, len)` for each page piece.
    fn for_pieces(offset: u64, len: u64, mut f: impl FnMut(u64, usize, u64, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE_SIZE - in_page).min((end - pos) as usize);
            f(idx, in_page, pos - offset, n);
            pos += n as u64;
        }
    }

    /// Store `data` (or zeros if `None`) into a piece of one page, dropping pages that become zero.
    fn put_piece(&self, idx: u64, in_page: usize, data: Option<&[u8]>, n: usize) {
        let full = n == PAGE_SIZE;
        let zero = match data {
            Some(d) => is_zero(d),
            None => true,
        };
        let mut guard = self.write_shard(idx);
        let shard = &mut *guard;
        let existing = shard.map.get(&idx).copied();
        if zero && (full || existing.is_none()) {
            if let Some(slot) = shard.map.remove(&idx) {
                shard.free.push(slot);
                self.pages.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
        let slot = match existing {
            Some(s) => s,
            None => {
                let s = shard.alloc();
                if !full {
                    shard.page_mut(s).fill(0);
                }
                shard.map.insert(idx, s);
                self.pages.fetch_add(1, Ordering::Relaxed);
                s
            }
        };
        let page = shard.page_mut(slot);
        let dst = &mut page[in_page..in_page + n];
        match data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        if !full && is_zero(&page[..]) {
            shard.map.remove(&idx);
            shard.free.push(slot);
            self.pages.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            multi_conn_safe: true,
            can_block_status: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, BackendError> {
        self.check(offset, buf.len() as u64)?;
        let mut zeros = ZeroRanges::none();
        Self::for_pieces(offset, buf.len() as u64, |idx, in_page, at, n| {
            let at = at as usize;
            let shard = self.read_shard(idx);
            match shard.map.get(&idx) {
                Some(&slot) => {
                    buf[at..at + n].copy_from_slice(&shard.page(slot)[in_page..in_page + n])
                }
                None => zeros.push(at, n),
            }
        });
        Ok(zeros)
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        self.check(offset, data.len() as u64)?;
        Self::for_pieces(offset, data.len() as u64, |idx, in_page, at, n| {
            let at = at as usize;
            self.put_piece(idx, in_page, Some(&data[at..at + n]), n);
        });
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _fast_only: bool,
    ) -> Result<(), BackendError> {
        self.check(offset, len)?;
        // Zeroing is always a page drop (fast), so `fast_only` never fails.
        Self::for_pieces(offset, len, |idx, in_page, _at, n| {
            self.put_piece(idx, in_page, None, n)
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.check(offset, len)?;
        // Scan at most 1 GiB per call; clients continue from where the reply ends.
        let len = len.min(1 << 30);
        let mut out: Vec<Extent> = Vec::new();
        Self::for_pieces(offset, len, |idx, _in_page, _at, n| {
            let present = self.read_shard(idx).map.contains_key(&idx);
            let hole = !present;
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += n as u64,
                _ => out.push(Extent {
                    len: n as u64,
                    hole,
                    zero: hole,
                }),
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_roundtrip_and_holes() {
        let m = MemBackend::new(1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        m.write(1000, &data, false).unwrap();
        assert_eq!(m.stored_pages(), 3);
        let mut buf = vec![0xffu8; 16384];
        let z = m.read(0, &mut buf).unwrap();
        // bytes 0..1000 in page 0 are stored zeros (page present); page 3 is a hole
        assert_eq!(z.as_slice(), &[(12288, 4096)]);
        assert_eq!(&buf[1000..11000], &data[..]);
        assert!(buf[..1000].iter().all(|&b| b == 0));
        m.write_zeroes(0, 8192, true, false).unwrap();
        assert_eq!(m.stored_pages(), 1);
        m.trim(8192, 4096).unwrap();
        assert_eq!(m.stored_pages(), 0);
        let ext = m.block_status(0, 1 << 20).unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                len: 1 << 20,
                hole: true,
                zero: true
            }]
        );
    }

    #[test]
    fn zero_write_does_not_allocate_and_clears() {
        let m = MemBackend::new(65536);
        m.write(0, &[0u8; 4096], false).unwrap();
        assert_eq!(m.stored_pages(), 0);
        m.write(10, &[1, 2, 3], false).unwrap();
        assert_eq!(m.stored_pages(), 1);
        m.write(10, &[0, 0, 0], false).unwrap();
        assert_eq!(m.stored_pages(), 0);
        assert!(m.write(65535, &[1, 2], false).is_err());
        let e = m.block_status(0, 65536).unwrap();
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn recycled_slots_are_zeroed_for_partial_writes() {
        let m = MemBackend::with_shards(1 << 20, 1);
        m.write(0, &[0xff; 4096], false).unwrap();
        m.trim(0, 4096).unwrap();
        assert_eq!(m.stored_pages(), 0);
        m.write(4096 + 10, &[1, 2, 3], false).unwrap(); // reuses the freed slot
        let mut buf = vec![0xaa; 4096];
        let z = m.read(4096, &mut buf).unwrap();
        assert!(z.is_empty());
        let mut want = vec![0u8; 4096];
        want[10..13].copy_from_slice(&[1, 2, 3]);
        assert_eq!(buf, want);
        // Many pages across several slabs.
        for i in 0..200u64 {
            m.write(i * 4096, &[i as u8 | 1; 4096], false).unwrap();
        }
        for i in 0..200u64 {
            let mut b = vec![0u8; 4096];
            m.read(i * 4096, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == i as u8 | 1));
        }
    }
}
