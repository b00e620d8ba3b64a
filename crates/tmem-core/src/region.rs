//! Memory the allocator maps itself: 2 MiB regions carved into equal frames.
//!
//! Slabs live in frames of 1–8 pages cut from regions of [`REGION_BYTES`] that this module
//! maps with `mmap` (private, anonymous, 2 MiB aligned), not from the global heap. A frame
//! that becomes empty is handed back to the kernel at once with `MADV_DONTNEED` (not
//! `MADV_FREE`, which keeps the pages charged until the host is under pressure): the
//! process's resident set drops by the frame's size before the call returns. A region whose
//! frames are all free is unmapped (one empty region per frame size is kept mapped, which
//! costs address space but no memory). Pages of a frame are touched only while a slab
//! lives in it, so what the kernel charges for the regions equals the frames in use — and
//! [`Region::resident_bytes`] asks the kernel (`mincore`) to prove it.
//!
//! Huge pages: regions are `MADV_NOHUGEPAGE` by default — giving back one 4 KiB frame of a
//! transparent huge page splits it and the rest stays charged until the kernel's deferred
//! split runs — or `MADV_HUGEPAGE` when asked (see `EngineConfig::huge_pages`).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::types::PAGE_SIZE;

/// One file of durable memory: the slabs of one size class of one arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DurableFile {
    /// Arena number.
    pub arena: u32,
    /// Size class.
    pub class: u32,
}

/// Memory that outlives the process, provided by the embedder (e.g. files in a tmpfs such
/// as `/run`, or memfds handed over to the next process): the persistent arenas of an
/// engine built with [`crate::Engine::with_durable`] keep their slabs there, each slot
/// with a checksummed header naming its page, so that a new process can find every page
/// again after the old one was killed ([`crate::Engine::recover`]).
///
/// Each [`DurableFile`] is an array of [`REGION_BYTES`] windows; bytes never written read
/// as zero.
pub trait DurableMemory: Send + Sync + std::fmt::Debug {
    /// Maps window `window` of `file` (creating or growing the file as needed), shared and
    /// writable. `None` if it cannot (the engine then treats the pool as full).
    fn map(&self, file: DurableFile, window: u32) -> Option<NonNull<u8>>;
    /// Unmaps a window returned by [`DurableMemory::map`] (its contents stay in the file).
    fn unmap(&self, file: DurableFile, window: u32, ptr: NonNull<u8>);
    /// Frees the storage of `len` bytes at `ptr` inside a mapped window: they read as
    /// zero afterwards and stop costing memory. The default uses `MADV_REMOVE`, which
    /// works for shared mappings of tmpfs and memfd files.
    fn discard(&self, ptr: NonNull<u8>, len: usize) {
        // SAFETY: the caller passes a range inside a window it mapped and no longer uses.
        unsafe {
            libc::madvise(ptr.as_ptr() as *mut libc::c_void, len, libc::MADV_REMOVE);
        }
    }
    /// The files present and how many windows each spans (for recovery).
    fn files(&self) -> Vec<(DurableFile, u32)>;
}

/// Where a region's memory comes from.
#[derive(Clone)]
enum Backing {
    /// Private anonymous memory mapped by [`Region::map`].
    Anon,
    /// A window of a durable file.
    Durable(Arc<dyn DurableMemory>, DurableFile, u32),
}

/// Bytes of one region or durable window (one x86-64 huge page).
pub const REGION_BYTES: usize = 2 << 20;

/// One mapped region.
pub(crate) struct Region {
    base: NonNull<u8>,
    backing: Backing,
}

// SAFETY: a region is a plain block of process memory; all access to its bytes goes
// through the owning arena's lock.
unsafe impl Send for Region {}
// SAFETY: as above; shared access only reads, under the arena's read lock.
unsafe impl Sync for Region {}

impl Region {
    /// Maps a new region aligned to [`REGION_BYTES`], or `None` if the kernel refuses.
    pub(crate) fn map(huge: bool) -> Option<Region> {
        let len = REGION_BYTES * 2;
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let aligned = start.next_multiple_of(REGION_BYTES);
        let head = aligned - start;
        let tail = len - head - REGION_BYTES;
        // SAFETY: both ranges lie inside the mapping just made and are not used elsewhere.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((aligned + REGION_BYTES) as *mut libc::c_void, tail);
            }
            let advice = if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            // Advice only: a kernel without THP refuses it, which changes nothing.
            libc::madvise(aligned as *mut libc::c_void, REGION_BYTES, advice);
        }
        Some(Region {
            base: NonNull::new(aligned as *mut u8)?,
            backing: Backing::Anon,
        })
    }

    /// Maps window `window` of a durable file.
    pub(crate) fn map_durable(
        mem: &Arc<dyn DurableMemory>,
        file: DurableFile,
        window: u32,
    ) -> Option<Region> {
        let base = mem.map(file, window)?;
        Some(Region {
            base,
            backing: Backing::Durable(mem.clone(), file, window),
        })
    }

    /// Pointer to byte `off` of the region.
    pub(crate) fn at(&self, off: usize) -> NonNull<u8> {
        debug_assert!(off < REGION_BYTES);
        // SAFETY: `off` is inside the region.
        unsafe { self.base.add(off) }
    }

    /// Gives `len` bytes at `off` back to the kernel now (`MADV_DONTNEED`): they stop being
    /// charged to the process and read as zeros when next touched.
    pub(crate) fn release(&self, off: usize, len: usize) {
        debug_assert!(off % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 && off + len <= REGION_BYTES);
        match &self.backing {
            // SAFETY: the range is inside the region and no slab lives there any more (the
            // caller holds the arena's write lock, so no reader can be looking at it).
            Backing::Anon => unsafe {
                libc::madvise(
                    self.base.as_ptr().add(off) as *mut libc::c_void,
                    len,
                    libc::MADV_DONTNEED,
                );
            },
            Backing::Durable(mem, ..) => mem.discard(self.at(off), len),
        }
    }

    /// Bytes of this region the kernel holds in RAM right now (`mincore`).
    pub(crate) fn resident_bytes(&self) -> u64 {
        let mut vec = [0u8; REGION_BYTES / PAGE_SIZE];
        // SAFETY: the range is our mapping and `vec` has one byte per page of it.
        let r = unsafe {
            libc::mincore(
                self.base.as_ptr() as *mut libc::c_void,
                REGION_BYTES,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return 0;
        }
        vec.iter().filter(|b| *b & 1 != 0).count() as u64 * PAGE_SIZE as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match &self.backing {
            // SAFETY: the region was mapped by `map` with this length and nothing refers
            // to it any more (its frames are all free).
            Backing::Anon => unsafe {
                libc::munmap(self.base.as_ptr() as *mut libc::c_void, REGION_BYTES);
            },
            Backing::Durable(mem, file, window) => mem.unmap(*file, *window, self.base),
        }
    }
}

/// Where a frame is: region number and frame number inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameId {
    pub(crate) region: u32,
    pub(crate) frame: u16,
}

struct Slot {
    region: Region,
    /// Free frame numbers (a stack).
    free: Vec<u16>,
    /// Frames in use.
    used: u16,
}

/// The frames of one size (`pages` pages each), from regions of their own.
pub(crate) struct Frames {
    frame_bytes: usize,
    per_region: u16,
    regions: Vec<Option<Slot>>,
    free_region_ids: Vec<u32>,
    /// Regions with at least one free frame.
    open: Vec<u32>,
    huge: bool,
    /// Durable frames: region `n` is window `n` of this file.
    durable: Option<(Arc<dyn DurableMemory>, DurableFile)>,
}

impl Frames {
    /// Frames of `pages` pages (1..=8).
    pub(crate) fn new(pages: usize, huge: bool) -> Self {
        let frame_bytes = pages * PAGE_SIZE;
        Frames {
            frame_bytes,
            per_region: (REGION_BYTES / frame_bytes) as u16,
            regions: Vec::new(),
            free_region_ids: Vec::new(),
            open: Vec::new(),
            huge,
            durable: None,
        }
    }

    /// Frames of `pages` pages in windows of a durable file.
    pub(crate) fn durable(pages: usize, mem: Arc<dyn DurableMemory>, file: DurableFile) -> Self {
        Frames {
            durable: Some((mem, file)),
            ..Self::new(pages, false)
        }
    }

    /// The region with id `rid`, mapped from its window for durable frames.
    fn map_region(&self, rid: u32) -> Option<Region> {
        match &self.durable {
            None => Region::map(self.huge),
            Some((mem, file)) => Region::map_durable(mem, *file, rid),
        }
    }

    /// Takes a free frame (zeroed, untouched: it costs nothing until written), mapping a
    /// new region if every region is full. `None` if the kernel refuses the mapping.
    pub(crate) fn take(&mut self) -> Option<(FrameId, NonNull<u8>)> {
        let rid = match self.open.last() {
            Some(&r) => r,
            None => {
                // Durable windows are reused lowest first, so that files stay short.
                let rid = if self.durable.is_some() {
                    let lowest = self.free_region_ids.iter().copied().min();
                    if let Some(l) = lowest {
                        self.free_region_ids.retain(|&r| r != l);
                    }
                    lowest
                } else {
                    self.free_region_ids.pop()
                }
                .unwrap_or(self.regions.len() as u32);
                let Some(region) = self.map_region(rid) else {
                    if (rid as usize) < self.regions.len() {
                        self.free_region_ids.push(rid);
                    }
                    return None;
                };
                let slot = Slot {
                    region,
                    free: (0..self.per_region).rev().collect(),
                    used: 0,
                };
                if rid as usize == self.regions.len() {
                    self.regions.push(Some(slot));
                } else {
                    self.regions[rid as usize] = Some(slot);
                }
                self.open.push(rid);
                rid
            }
        };
        let slot = self.regions[rid as usize].as_mut()?;
        let frame = slot.free.pop()?;
        slot.used += 1;
        if slot.free.is_empty() {
            self.open.retain(|&r| r != rid);
        }
        let ptr = slot.region.at(frame as usize * self.frame_bytes);
        Some((FrameId { region: rid, frame }, ptr))
    }

    /// Gives a frame back: its pages go back to the kernel at once. A region left empty is
    /// unmapped unless it is the only one with free frames.
    pub(crate) fn give_back(&mut self, id: FrameId) {
        let Some(Some(slot)) = self.regions.get_mut(id.region as usize) else {
            debug_assert!(false, "give_back of an unknown frame");
            return;
        };
        slot.region
            .release(id.frame as usize * self.frame_bytes, self.frame_bytes);
        let was_full = slot.free.is_empty();
        slot.free.push(id.frame);
        slot.used -= 1;
        if was_full {
            self.open.push(id.region);
        }
        if slot.used == 0 && self.open.len() > 1 {
            self.open.retain(|&r| r != id.region);
            self.regions[id.region as usize] = None;
            self.free_region_ids.push(id.region);
            while matches!(self.regions.last(), Some(None)) {
                self.regions.pop();
                let last = self.regions.len() as u32;
                self.free_region_ids.retain(|&r| r != last);
            }
        }
    }

    /// Bytes of the mapped regions the kernel holds in RAM now (`mincore`).
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|s| s.region.resident_bytes())
            .sum()
    }

    /// Number of mapped regions.
    pub(crate) fn mapped_regions(&self) -> usize {
        self.regions.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_untouched_until_written_and_released_at_once() {
        let mut f = Frames::new(2, false);
        let mut ids = Vec::new();
        for _ in 0..300 {
            let (id, p) = f.take().expect("mmap");
            // SAFETY: the frame is ours and 8 KiB long.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 0xab, 2 * PAGE_SIZE) };
            ids.push(id);
        }
        // 300 frames of 2 pages: 256 per region, two regions.
        assert_eq!(f.mapped_regions(), 2);
        assert_eq!(f.resident_bytes(), 300 * 2 * PAGE_SIZE as u64);
        for id in ids.drain(..200) {
            f.give_back(id);
        }
        assert_eq!(f.resident_bytes(), 100 * 2 * PAGE_SIZE as u64);
        // A frame taken again reads as zeros (its old content went back to the kernel).
        let (id, p) = f.take().expect("frame");
        // SAFETY: the frame is ours.
        let first = unsafe { *p.as_ptr() };
        assert_eq!(first, 0);
        ids.push(id);
        for id in ids.drain(..) {
            f.give_back(id);
        }
        assert_eq!(f.resident_bytes(), 0);
        assert!(f.mapped_regions() <= 1);
    }
}
