//! A size-class slab allocator for page payloads, with compaction (the zsmalloc idea).
//!
//! Payloads of 1..=4096 bytes go to one of 256 classes of 16-byte granularity (neighbours
//! with identical slab geometry merged, as zsmalloc does). Each class carves slabs of 1–8
//! pages (the smallest count with a tail under 1.5 %) into equal slots; free slots form an
//! intrusive list inside the slab. Slabs live in frames of regions that the allocator maps
//! itself ([`crate::region`]): an empty slab's frame goes back to the kernel at once, so
//! what the allocator says it holds is what the kernel charges the process.
//!
//! **Handles are indirect**, as in zsmalloc: a [`Handle`] names an entry of its class's
//! location table, which says where the payload is (slab, slot). A payload can therefore
//! be moved without touching the index entry or dedup record that refers to it, and
//! **compaction** ([`Arenas::compact`]) moves payloads out of the least used slabs of a
//! class into the fullest ones, freeing the emptied slabs. It works in small steps, each
//! under one arena's write lock; readers ([`Arenas::with`]) hold the read lock while they
//! look at a payload, so a payload never moves under a reader.
//!
//! **Lock order** (the whole engine): index shard lock → arena lock; dedup shard lock →
//! arena lock. An arena lock is the innermost lock: nothing else is locked while one is
//! held, so compaction (which takes only arena locks) can never deadlock with puts, gets,
//! flushes or eviction.
//!
//! Partly used slabs are kept in fullness groups: a put fills one of the fullest slabs
//! with room, so holes are refilled and sparse slabs left to empty.
//!
//! A **durable** set keeps its slabs in [`DurableMemory`] (one file per arena and class)
//! and writes a [`SlotHeader`] in front of every payload — after the payload, so a slot is
//! live only once complete; a freed slot's header is cleared; compaction copies a slot
//! whole before clearing its source. `crate::recover` reads such memory back.
//!
//! An [`Arenas`] set has several independently locked arenas so that puts on different
//! threads do not serialise on one lock.

use parking_lot::RwLock;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::region::{DurableFile, DurableMemory, FrameId, Frames};
use crate::types::PAGE_SIZE;

/// Granularity of size classes in bytes.
pub(crate) const CLASS_DELTA: usize = 16;
/// Number of size classes.
pub(crate) const NUM_CLASSES: usize = PAGE_SIZE / CLASS_DELTA;
/// Bytes charged for a new slab on top of its frame (its header and table slots), for
/// the budget check before growing; the exact figures are counted as metadata.
const SLAB_HEADER: u64 = 32;
const NO_SLOT: u16 = u16::MAX;
const NOT_PARTIAL: u32 = u32::MAX;
const NO_OWNER: u32 = u32::MAX;
const FREE_LOC: u64 = u64::MAX;
/// Largest slab, in pages.
const MAX_SLAB_PAGES: usize = 8;
/// A slab size whose unused tail is at most this (per mille) is good enough.
const GOOD_TAIL_PER_MILLE: usize = 15;
/// Whole-page frames kept per arena for reuse (256 KiB), counted as held and resident.
const MAX_SPARES: usize = 64;
/// Payloads moved per arena lock hold during compaction.
const COMPACT_STEP: usize = 64;
/// Fullness groups of partly used slabs (zsmalloc's idea): a payload goes into the fullest
/// slab that has room, so holes left by frees are filled before new slabs are made and
/// sparse slabs are left to empty; compaction moves from the sparsest to the fullest.
const BUCKETS: usize = 8;

/// Bytes of the header in front of every payload in a durable arena.
pub(crate) const SLOT_HEADER: usize = 32;
/// The class of durable whole pages: a 4 KiB payload and its header (4128 bytes), 31 to a
/// 32-page frame (2.4 % tail).
pub(crate) const DURABLE_RAW_CLASS: usize = NUM_CLASSES - 1;
const DURABLE_RAW_SLOT: usize = PAGE_SIZE + SLOT_HEADER;
const DURABLE_RAW_PAGES: usize = 32;
const LIVE: u8 = 1;

/// Slot size and frame pages of a class (in a durable arena when `durable`).
pub(crate) fn geometry(class: usize, durable: bool) -> (usize, usize) {
    if durable && class == DURABLE_RAW_CLASS {
        (DURABLE_RAW_SLOT, DURABLE_RAW_PAGES)
    } else {
        (class_size(class), pages_per_slab(class))
    }
}

/// The class of a payload of `len` bytes in a durable arena (header included).
pub(crate) fn durable_class_of(len: usize) -> usize {
    if len + SLOT_HEADER > PAGE_SIZE {
        DURABLE_RAW_CLASS
    } else {
        class_of(len + SLOT_HEADER)
    }
}

/// What a durable slot's header says: the page it holds and when it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotHeader {
    /// Write sequence number: of two live copies of a page, the higher is newer.
    pub(crate) seq: u64,
    /// The durable pool tag.
    pub(crate) tag: u32,
    /// Page index.
    pub(crate) index: u32,
    /// Object id (first word; durable pools use single-word objects).
    pub(crate) object: u64,
    /// Codec tag of the payload.
    pub(crate) codec: u8,
}

impl SlotHeader {
    /// Layout: crc32 (of bytes 4.. and the payload) | flags | codec | len u16 | seq u64 |
    /// tag u32 | index u32 | object u64, little endian.
    pub(crate) fn encode(&self, payload: &[u8]) -> [u8; SLOT_HEADER] {
        let mut h = [0u8; SLOT_HEADER];
        h[4] = LIVE;
        h[5] = self.codec;
        h[6..8].copy_from_slice(&(payload.len() as u16).to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..20].copy_from_slice(&self.tag.to_le_bytes());
        h[20..24].copy_from_slice(&self.index.to_le_bytes());
        h[24..32].copy_from_slice(&self.object.to_le_bytes());
        let mut c = crc32fast::Hasher::new();
        c.update(&h[4..]);
        c.update(payload);
        h[..4].copy_from_slice(&c.finalize().to_le_bytes());
        h
    }

    /// Reads a live, intact slot (header and payload checked); `None` for a free, torn or
    /// corrupt one. `slot` is the whole slot.
    pub(crate) fn decode(slot: &[u8]) -> Option<(SlotHeader, &[u8])> {
        let h = slot.get(..SLOT_HEADER)?;
        if h[4] != LIVE {
            return None;
        }
        let len = u16::from_le_bytes([h[6], h[7]]) as usize;
        let payload = slot.get(SLOT_HEADER..SLOT_HEADER + len)?;
        let mut c = crc32fast::Hasher::new();
        c.update(&h[4..]);
        c.update(payload);
        if c.finalize().to_le_bytes() != h[..4] {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        Some((
            SlotHeader {
                seq: u64_at(8),
                tag: u32_at(16),
                index: u32_at(20),
                object: u64_at(24),
                codec: h[5],
            },
            payload,
        ))
    }
}

/// A stored payload's name: arena (4 bits) | class (8) | location-table entry (32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Handle(pub(crate) u64);

impl Handle {
    fn new(arena: usize, class: usize, id: u32) -> Self {
        Handle(((arena as u64) << 60) | ((class as u64) << 52) | id as u64)
    }
    /// The arena field (the set's tag plus the arena number).
    pub(crate) fn arena(self) -> usize {
        (self.0 >> 60) as usize
    }
    fn class(self) -> usize {
        ((self.0 >> 52) & 0xff) as usize
    }
    fn id(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

/// The class index that holds payloads of `len` bytes (1..=4096).
///
/// Like zsmalloc, neighbouring 16-byte classes whose slabs have the same page count and
/// the same number of slots are merged into the largest of them: the merged size wastes
/// nothing more per slab, and fewer classes mean fewer partly filled slabs.
pub(crate) fn class_of(len: usize) -> usize {
    static MAP: std::sync::OnceLock<[u8; NUM_CLASSES]> = std::sync::OnceLock::new();
    let map = MAP.get_or_init(|| {
        let mut map = [0u8; NUM_CLASSES];
        let mut group_top = NUM_CLASSES - 1;
        for c in (0..NUM_CLASSES).rev() {
            let geometry = |c: usize| {
                (
                    pages_per_slab(c),
                    pages_per_slab(c) * PAGE_SIZE / class_size(c),
                )
            };
            if geometry(c) != geometry(group_top) {
                group_top = c;
            }
            map[c] = group_top as u8;
        }
        map
    });
    map[len.clamp(1, PAGE_SIZE).div_ceil(CLASS_DELTA) - 1] as usize
}

/// Bytes a new slab of `class` costs (frame plus header).
pub(crate) fn slab_cost(class: usize) -> u64 {
    (pages_per_slab(class) * PAGE_SIZE) as u64 + SLAB_HEADER
}

/// Bytes a new slab for a payload of `len` bytes costs.
pub(crate) fn slab_cost_for(len: usize) -> u64 {
    slab_cost(class_of(len))
}

/// Bytes of one slot in class `class`.
pub(crate) fn class_size(class: usize) -> usize {
    (class + 1) * CLASS_DELTA
}

/// Pages per slab for a class: the smallest count in 1..=8 whose unused tail is at most
/// 1.5 %, else the count with the smallest tail. Small slabs keep partly filled slabs cheap;
/// longer ones stop odd sizes from wasting up to 10 % (4-page slabs average 4.6 % tail
/// waste over the 256 classes, this rule 1.0 %).
fn pages_per_slab(class: usize) -> usize {
    let size = class_size(class);
    let mut best = (1, usize::MAX);
    for pages in 1..=MAX_SLAB_PAGES {
        let bytes = pages * PAGE_SIZE;
        let waste_per_mille = (bytes % size) * 1000 / bytes;
        if waste_per_mille <= GOOD_TAIL_PER_MILLE {
            return pages;
        }
        if waste_per_mille < best.1 {
            best = (pages, waste_per_mille);
        }
    }
    best.0
}

/// One slab: a frame cut into slots.
struct Slab {
    ptr: NonNull<u8>,
    frame: FrameId,
    first_free: u16,
    used: u16,
    partial_pos: u32,
    /// The fullness group it is in, while it is partly used.
    bucket: u8,
}

// SAFETY: `ptr` points into a region owned by the same arena; it is only dereferenced
// under that arena's lock.
unsafe impl Send for Slab {}
// SAFETY: as above.
unsafe impl Sync for Slab {}

impl Slab {
    /// The `len` bytes at byte offset `at`.
    ///
    /// # Safety
    /// `at + len` must lie inside the slab's frame, and the caller must hold the arena lock.
    unsafe fn bytes(&self, at: usize, len: usize) -> &[u8] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), len) }
    }
    /// Mutable access to the `len` bytes at byte offset `at`.
    ///
    /// # Safety
    /// As [`Slab::bytes`], with the arena's write lock held.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut(&self, at: usize, len: usize) -> &mut [u8] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), len) }
    }
    fn next_free_at(&self, at: usize) -> u16 {
        // SAFETY: a slot is at least 16 bytes; the caller holds the lock.
        let b = unsafe { self.bytes(at, 2) };
        u16::from_ne_bytes([b[0], b[1]])
    }
    fn set_next_free_at(&self, at: usize, next: u16) {
        // SAFETY: as above, under the write lock.
        unsafe { self.bytes_mut(at, 2) }.copy_from_slice(&next.to_ne_bytes());
    }
}

struct Class {
    id: usize,
    durable: bool,
    slot_size: usize,
    slots: usize,
    pages: usize,
    slabs: Vec<Option<Slab>>,
    /// Free slab numbers; the lowest is reused first so that the table can shrink.
    free_slabs: FreeIds,
    /// Slabs with a free slot, by fullness group (index: used × BUCKETS / slots).
    partial: Vec<Vec<u32>>,
    /// Slot (slab × slots + slot) → the location-table entry of the payload in it.
    owners: Vec<u32>,
    /// Location table: handle id → slab << 16 | slot, or `FREE_LOC`.
    locs: Vec<u64>,
    /// Free location-table entries; the lowest is reused first.
    free_locs: FreeIds,
    live_slabs: u64,
    objects: u64,
    /// Metadata bytes counted for this class (table capacities).
    meta: u64,
}

impl Class {
    fn new(class: usize, durable: bool) -> Self {
        let (slot_size, pages) = geometry(class, durable);
        Class {
            id: class,
            durable,
            slot_size,
            slots: pages * PAGE_SIZE / slot_size,
            pages,
            slabs: Vec::new(),
            free_slabs: FreeIds::default(),
            partial: vec![Vec::new(); BUCKETS],
            owners: Vec::new(),
            locs: Vec::new(),
            free_locs: FreeIds::default(),
            live_slabs: 0,
            objects: 0,
            meta: 0,
        }
    }

    fn slab_bytes(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Metadata bytes by capacity.
    fn meta_bytes(&self) -> u64 {
        (self.slabs.capacity() * std::mem::size_of::<Option<Slab>>()
            + self.partial.iter().map(Vec::capacity).sum::<usize>() * 4
            + self.owners.capacity() * 4
            + self.locs.capacity() * 8
            + self.free_slabs.bytes()
            + self.free_locs.bytes()) as u64
    }

    /// Bytes that compaction could give back in this class: whole slabs' worth of free
    /// slots.
    fn compactable_bytes(&self) -> u64 {
        if self.slots < 2 {
            return 0;
        }
        let free = (self.live_slabs * self.slots as u64).saturating_sub(self.objects);
        free / self.slots as u64 * self.slab_bytes() as u64
    }

    fn new_handle(&mut self, slab: u32, slot: u16) -> u32 {
        let loc = (u64::from(slab) << 16) | u64::from(slot);
        let id = match self.free_locs.pop_first() {
            Some(id) => {
                self.locs[id as usize] = loc;
                id
            }
            None => {
                self.locs.push(loc);
                (self.locs.len() - 1) as u32
            }
        };
        self.owners[slab as usize * self.slots + slot as usize] = id;
        id
    }

    fn drop_handle(&mut self, id: u32) {
        self.locs[id as usize] = FREE_LOC;
        if id as usize + 1 == self.locs.len() {
            // Trailing free entries go, so the table shrinks as the pool empties.
            self.locs.pop();
            while self.locs.last() == Some(&FREE_LOC) {
                self.locs.pop();
                self.free_locs.remove(self.locs.len() as u32);
            }
            shrink_vec(&mut self.locs);
        } else {
            self.free_locs.insert(id);
        }
    }

    fn loc(&self, id: usize) -> Option<(usize, usize)> {
        let l = *self.locs.get(id)?;
        (l != FREE_LOC).then_some(((l >> 16) as usize, (l & 0xffff) as usize))
    }

    /// Number of partly used slabs.
    fn partial_len(&self) -> usize {
        self.partial.iter().map(Vec::len).sum()
    }

    /// Takes slab `id` out of its fullness group, if it is in one.
    fn partial_remove(&mut self, id: u32) {
        let Some(Some(s)) = self.slabs.get_mut(id as usize) else {
            return;
        };
        if s.partial_pos == NOT_PARTIAL {
            return;
        }
        let (b, pos) = (s.bucket as usize, s.partial_pos as usize);
        s.partial_pos = NOT_PARTIAL;
        let group = &mut self.partial[b];
        group.swap_remove(pos);
        if let Some(&moved) = group.get(pos) {
            if let Some(Some(m)) = self.slabs.get_mut(moved as usize) {
                m.partial_pos = pos as u32;
            }
        }
        if self.partial[b].is_empty() {
            // An empty group holds no memory (so that tables return to what they were).
            self.partial[b] = Vec::new();
        } else {
            shrink_vec(&mut self.partial[b]);
        }
    }

    /// Puts slab `id` in the fullness group its use says, or in none when it is full.
    fn partial_update(&mut self, id: u32) {
        let slots = self.slots;
        let Some(Some(s)) = self.slabs.get(id as usize) else {
            return;
        };
        let want = (s.first_free != NO_SLOT)
            .then(|| (usize::from(s.used) * BUCKETS / slots).min(BUCKETS - 1) as u8);
        let have = (s.partial_pos != NOT_PARTIAL).then_some(s.bucket);
        if want == have {
            return;
        }
        self.partial_remove(id);
        if let (Some(b), Some(Some(s))) = (want, self.slabs.get_mut(id as usize)) {
            s.bucket = b;
            s.partial_pos = self.partial[b as usize].len() as u32;
            self.partial[b as usize].push(id);
        }
    }

    /// The partly used slab to fill next: one of the fullest.
    fn fullest_partial(&self) -> Option<u32> {
        self.partial.iter().rev().find_map(|g| g.last().copied())
    }

    /// A source and a destination for compaction: of the sparsest fullness group, the
    /// highest-numbered slab; of the fullest, the lowest-numbered other one. Payloads so
    /// gather in low-numbered slabs and the slab and owner tables shrink from their end.
    fn compaction_pair(&self) -> Option<(u32, u32)> {
        let low = self.partial.iter().find(|g| !g.is_empty())?;
        let src = *low.iter().max()?;
        let dst = self
            .partial
            .iter()
            .rev()
            .find_map(|g| g.iter().copied().filter(|&id| id != src).min())?;
        Some((src, dst))
    }

    /// Registers a new slab in `frame`; returns its number. Free-list threading is left
    /// to the caller.
    fn add_slab(&mut self, frame: FrameId, ptr: NonNull<u8>, first_free: u16) -> u32 {
        let slab = Slab {
            ptr,
            frame,
            first_free,
            used: 0,
            partial_pos: NOT_PARTIAL,
            bucket: 0,
        };
        let id = match self.free_slabs.pop_first() {
            Some(id) => {
                self.slabs[id as usize] = Some(slab);
                id
            }
            None => {
                self.slabs.push(Some(slab));
                self.owners.resize(self.slabs.len() * self.slots, NO_OWNER);
                (self.slabs.len() - 1) as u32
            }
        };
        self.live_slabs += 1;
        id
    }

    /// Removes an empty slab from the tables; returns its frame.
    fn remove_slab(&mut self, id: u32) -> Option<FrameId> {
        self.partial_remove(id);
        let slab = self.slabs.get_mut(id as usize)?.take()?;
        self.live_slabs -= 1;
        if id as usize + 1 == self.slabs.len() {
            self.slabs.pop();
            while matches!(self.slabs.last(), Some(None)) {
                self.slabs.pop();
                self.free_slabs.remove(self.slabs.len() as u32);
            }
            self.owners.truncate(self.slabs.len() * self.slots);
            shrink_vec(&mut self.slabs);
            shrink_vec(&mut self.owners);
        } else {
            self.free_slabs.insert(id);
        }
        if self.live_slabs == 0 {
            // The class is empty: drop its tables entirely.
            debug_assert_eq!(self.objects, 0);
            let meta = self.meta;
            *self = Class::new(self.id, self.durable);
            self.meta = meta;
        }
        Some(slab.frame)
    }
}

/// A set of free table entries, lowest first (so that tables shrink from their end): one
/// bit per entry.
#[derive(Debug, Default)]
struct FreeIds {
    words: Vec<u64>,
    count: usize,
    /// No free entry below word `hint`.
    hint: usize,
}

impl FreeIds {
    fn insert(&mut self, id: u32) {
        let (w, b) = (id as usize / 64, id % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & (1 << b) == 0 {
            self.words[w] |= 1 << b;
            self.count += 1;
        }
        self.hint = self.hint.min(w);
    }

    fn remove(&mut self, id: u32) {
        let (w, b) = (id as usize / 64, id % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & (1 << b) != 0 {
                *word &= !(1 << b);
                self.count -= 1;
            }
        }
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
        if self.words.is_empty() {
            self.words = Vec::new();
            self.hint = 0;
        } else {
            shrink_vec(&mut self.words);
        }
    }

    /// Takes the lowest free entry.
    fn pop_first(&mut self) -> Option<u32> {
        if self.count == 0 {
            return None;
        }
        while self.hint < self.words.len() {
            let word = self.words[self.hint];
            if word != 0 {
                let b = word.trailing_zeros();
                let id = (self.hint * 64) as u32 + b;
                self.remove(id);
                return Some(id);
            }
            self.hint += 1;
        }
        None
    }

    fn bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

/// Gives a vector's spare capacity back when it is mostly unused.
fn shrink_vec<T>(v: &mut Vec<T>) {
    if v.capacity() > 64 && v.len() < v.capacity() / 4 {
        v.shrink_to(v.len() * 2);
    }
}

/// One arena: a lock's worth of classes and the frames they live in, with its own counters
/// (kept under its lock so that busy threads never share a counter's cache line).
struct Arena {
    classes: Vec<Class>,
    /// Frames of 1..=8 pages (index: pages − 1); in a durable arena, one durable file per
    /// class (index: class).
    frames: Vec<Frames>,
    /// Bytes of header in front of each payload (0, or [`SLOT_HEADER`] when durable).
    header: usize,
    /// Freed whole-page frames kept for reuse (still charged: counted as held): raw pages
    /// are often freed and allocated in quick succession (replaced swap pages, deferred
    /// compression), and a fresh frame must be faulted in again.
    spares: Vec<(FrameId, NonNull<u8>)>,
    payload: u64,
    slot_bytes: u64,
    objects: u64,
    slabs: u64,
    /// Bytes of frames in use plus spares.
    frame_bytes: u64,
    /// Metadata bytes of the classes' tables.
    meta: u64,
}

// SAFETY: the spare pointers point into regions owned by this arena.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

/// What the arenas hold, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes of slab frames (spares included) plus the allocator's tables: what the
    /// allocator really holds.
    pub held_bytes: u64,
    /// Bytes of payload stored in slots (compressed lengths).
    pub payload_bytes: u64,
    /// Bytes of slots in use (payload rounded up to the class size).
    pub slot_bytes: u64,
    /// Number of live slabs (spare frames included).
    pub slabs: u64,
    /// Number of live payloads.
    pub objects: u64,
    /// Of `held_bytes`: whole-page frames kept for reuse.
    pub spare_bytes: u64,
    /// Of `held_bytes`: the allocator's tables (slab, location and owner tables).
    pub table_bytes: u64,
    /// Bytes that compaction could give back now (free slots amounting to whole slabs).
    pub compactable_bytes: u64,
    /// Number of 2 MiB regions mapped.
    pub regions: u64,
}

impl AllocStats {
    /// Share of held bytes that is not payload: (held − payload) / held, 0 when empty.
    pub fn fragmentation(&self) -> f64 {
        if self.held_bytes == 0 {
            0.0
        } else {
            (self.held_bytes.saturating_sub(self.payload_bytes)) as f64 / self.held_bytes as f64
        }
    }

    /// Sums two sets of figures.
    pub(crate) fn plus(self, o: AllocStats) -> AllocStats {
        AllocStats {
            held_bytes: self.held_bytes + o.held_bytes,
            payload_bytes: self.payload_bytes + o.payload_bytes,
            slot_bytes: self.slot_bytes + o.slot_bytes,
            slabs: self.slabs + o.slabs,
            objects: self.objects + o.objects,
            spare_bytes: self.spare_bytes + o.spare_bytes,
            table_bytes: self.table_bytes + o.table_bytes,
            compactable_bytes: self.compactable_bytes + o.compactable_bytes,
            regions: self.regions + o.regions,
        }
    }
}

/// What one compaction call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStep {
    /// Payloads moved.
    pub moved: u64,
    /// Slabs emptied and given back.
    pub slabs_freed: u64,
    /// Bytes given back to the kernel.
    pub bytes_freed: u64,
}

impl CompactStep {
    fn add(&mut self, o: CompactStep) {
        self.moved += o.moved;
        self.slabs_freed += o.slabs_freed;
        self.bytes_freed += o.bytes_freed;
    }
}

/// A set of independently locked arenas.
pub(crate) struct Arenas {
    arenas: Vec<RwLock<Arena>>,
    /// Whether slabs live in durable memory, each payload behind a [`SlotHeader`].
    durable: bool,
    /// Added to arena numbers in handles, so two sets can share the handle space.
    tag: usize,
    next: AtomicUsize,
    held: AtomicI64,
}

/// Outcome of an allocation attempt.
pub(crate) enum Alloc {
    /// Stored at this handle.
    Done(Handle),
    /// A new slab of this many bytes would be needed.
    NeedsGrowth(u64),
    /// The kernel refused to map more memory.
    OutOfMemory,
}

thread_local! {
    static ARENA_HINT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

impl Arenas {
    /// Creates `n` arenas (1..=8); handles carry `tag` (0 or 8) in their arena field.
    /// `huge` asks for transparent huge pages on the regions.
    pub(crate) fn new(n: usize, tag: usize, huge: bool) -> Self {
        Self::build(n, tag, huge, None)
    }

    /// Creates `n` arenas whose slabs live in `mem`, one file per (arena, class); every
    /// payload carries a [`SlotHeader`].
    pub(crate) fn durable(n: usize, tag: usize, mem: Arc<dyn DurableMemory>) -> Self {
        Self::build(n, tag, false, Some(mem))
    }

    fn build(n: usize, tag: usize, huge: bool, mem: Option<Arc<dyn DurableMemory>>) -> Self {
        let n = n.clamp(1, 8);
        let durable = mem.is_some();
        Arenas {
            tag,
            durable,
            arenas: (0..n)
                .map(|a| {
                    let frames = match &mem {
                        None => (1..=MAX_SLAB_PAGES).map(|p| Frames::new(p, huge)).collect(),
                        Some(m) => (0..NUM_CLASSES)
                            .map(|c| {
                                let file = DurableFile {
                                    arena: a as u32,
                                    class: c as u32,
                                };
                                Frames::durable(geometry(c, true).1, m.clone(), file)
                            })
                            .collect(),
                    };
                    RwLock::new(Arena {
                        classes: (0..NUM_CLASSES).map(|c| Class::new(c, durable)).collect(),
                        frames,
                        header: if durable { SLOT_HEADER } else { 0 },
                        spares: Vec::new(),
                        payload: 0,
                        slot_bytes: 0,
                        objects: 0,
                        slabs: 0,
                        frame_bytes: 0,
                        meta: 0,
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            held: AtomicI64::new(0),
        }
    }

    fn home_arena(&self) -> usize {
        ARENA_HINT.with(|h| {
            let mut v = h.get();
            if v == usize::MAX {
                v = self.next.fetch_add(1, Ordering::Relaxed);
                h.set(v);
            }
            v % self.arenas.len()
        })
    }

    /// Runs `f` on an arena under its write lock and applies the change of what the arena
    /// holds to the set's total.
    fn mutate<R>(&self, a: usize, f: impl FnOnce(&mut Arena) -> R) -> R {
        let mut arena = self.arenas[a].write();
        let before = arena.charged();
        let r = f(&mut arena);
        let after = arena.charged();
        drop(arena);
        if after != before {
            self.held
                .fetch_add(after as i64 - before as i64, Ordering::Relaxed);
        }
        r
    }

    /// Bytes held by all arenas (frames, spares and tables).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed).max(0) as u64
    }

    /// Current statistics.
    pub(crate) fn stats(&self) -> AllocStats {
        let mut s = AllocStats {
            held_bytes: self.held_bytes(),
            ..Default::default()
        };
        for a in &self.arenas {
            let a = a.read();
            s.payload_bytes += a.payload;
            s.slot_bytes += a.slot_bytes;
            s.slabs += a.slabs + a.spares.len() as u64;
            s.objects += a.objects;
            s.spare_bytes += (a.spares.len() * PAGE_SIZE) as u64;
            s.table_bytes += a.meta;
            s.compactable_bytes += a.classes.iter().map(Class::compactable_bytes).sum::<u64>();
            s.regions += a
                .frames
                .iter()
                .map(|f| f.mapped_regions() as u64)
                .sum::<u64>();
        }
        s
    }

    /// Bytes of the arenas' regions that the kernel holds in RAM now (asked with
    /// `mincore`, region by region, each under its arena's read lock).
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.arenas
            .iter()
            .map(|a| {
                let a = a.read();
                a.frames.iter().map(Frames::resident_bytes).sum::<u64>()
            })
            .sum()
    }

    /// Bytes that compaction could give back now.
    pub(crate) fn compactable_bytes(&self) -> u64 {
        self.arenas
            .iter()
            .map(|a| {
                a.read()
                    .classes
                    .iter()
                    .map(Class::compactable_bytes)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Whether payloads live in durable memory (and need a [`SlotHeader`]).
    pub(crate) fn is_durable(&self) -> bool {
        self.durable
    }

    /// Bytes a new slab for a payload of `len` bytes costs in this set.
    pub(crate) fn slab_cost_for(&self, len: usize) -> u64 {
        if self.durable {
            let (_, pages) = geometry(durable_class_of(len), true);
            (pages * PAGE_SIZE) as u64 + SLAB_HEADER
        } else {
            slab_cost_for(len)
        }
    }

    /// Stores `data` (1..=4096 bytes). With `grow == false` only existing free slots are
    /// used; otherwise a new slab is allocated if needed.
    pub(crate) fn alloc(&self, data: &[u8], grow: bool) -> Alloc {
        self.alloc_with(data, grow, None)
    }

    /// [`Arenas::alloc`] with the header of a durable slot (required there): the page the
    /// payload belongs to, written in front of it with a checksum of both.
    pub(crate) fn alloc_with(&self, data: &[u8], grow: bool, hdr: Option<&SlotHeader>) -> Alloc {
        let hbytes = match (self.durable, hdr) {
            (true, Some(h)) => Some(h.encode(data)),
            (true, None) => {
                debug_assert!(false, "a durable slot needs a header");
                return Alloc::OutOfMemory;
            }
            (false, _) => None,
        };
        let hdr = hbytes.as_ref().map(|h| &h[..]);
        let class = if self.durable {
            durable_class_of(data.len())
        } else {
            class_of(data.len())
        };
        let home = self.home_arena();
        // The thread's home arena first: a free slot there, or a new slab if allowed. Other
        // arenas are only looked at when growing is not allowed (free slots anywhere are
        // free memory), so that puts on different threads do not take each other's locks.
        let tag = self.tag;
        let r = self.mutate(home, |arena| {
            if let Some(h) = arena.reuse(home + tag, class, data, hdr) {
                return Some(Alloc::Done(h));
            }
            if grow {
                return Some(match arena.grow_and_take(home + tag, class, data, hdr) {
                    Some(h) => Alloc::Done(h),
                    None => Alloc::OutOfMemory,
                });
            }
            None
        });
        if let Some(r) = r {
            return r;
        }
        for i in 1..self.arenas.len() {
            let a = (home + i) % self.arenas.len();
            if let Some(h) = self.mutate(a, |arena| arena.reuse(a + tag, class, data, hdr)) {
                return Alloc::Done(h);
            }
        }
        let (_, pages) = geometry(class, self.durable);
        Alloc::NeedsGrowth((pages * PAGE_SIZE) as u64 + SLAB_HEADER)
    }

    /// Frees the payload at `h` whose length was `len`. Returns the bytes given back to the
    /// kernel (a whole slab's frame when it became empty, else 0).
    pub(crate) fn free(&self, h: Handle, len: usize) -> u64 {
        let Some(a) = h
            .arena()
            .checked_sub(self.tag)
            .filter(|&a| a < self.arenas.len())
        else {
            debug_assert!(false, "bad handle");
            return 0;
        };
        self.mutate(a, |arena| arena.free(h, len))
    }

    /// Returns the spare whole-page frames to the kernel; returns the bytes released.
    pub(crate) fn drop_spares(&self) -> u64 {
        (0..self.arenas.len())
            .map(|a| self.mutate(a, Arena::drop_spares))
            .sum()
    }

    /// Runs `f` on the `len` payload bytes at `h`, under the arena's read lock.
    pub(crate) fn with<R>(&self, h: Handle, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let arena = self.arenas.get(h.arena().checked_sub(self.tag)?)?.read();
        let class = arena.classes.get(h.class())?;
        let (slab, slot) = class.loc(h.id())?;
        let slab = class.slabs.get(slab)?.as_ref()?;
        let len = len.min(class.slot_size - arena.header);
        // SAFETY: the slot lies inside the slab's frame and we hold the read lock, so the
        // payload can neither move nor be freed while `f` looks at it.
        let bytes = unsafe { slab.bytes(slot * class.slot_size + arena.header, len) };
        Some(f(bytes))
    }

    /// Moves up to `max_moves` payloads out of sparsely used slabs into fuller ones of the
    /// same class and gives the emptied slabs back, in steps of at most 64 moves per lock
    /// hold. Only classes with at least a slab's worth of free slots are touched.
    pub(crate) fn compact(&self, max_moves: usize) -> CompactStep {
        let mut done = CompactStep::default();
        for a in 0..self.arenas.len() {
            let candidates: Vec<usize> = {
                let arena = self.arenas[a].read();
                (0..NUM_CLASSES)
                    .filter(|&c| arena.classes[c].compactable_bytes() > 0)
                    .collect()
            };
            for class in candidates {
                loop {
                    let left = max_moves.saturating_sub(done.moved as usize);
                    if left == 0 {
                        return done;
                    }
                    let step = self.mutate(a, |arena| {
                        arena.compact_class(class, left.min(COMPACT_STEP))
                    });
                    done.add(step);
                    if step.moved == 0 && step.slabs_freed == 0 {
                        break;
                    }
                }
            }
        }
        done
    }
}

impl Arena {
    fn charged(&self) -> u64 {
        self.frame_bytes + self.meta
    }

    /// Recounts a class's table bytes after a change.
    fn refresh_meta(&mut self, class: usize) {
        let c = &mut self.classes[class];
        let m = c.meta_bytes();
        self.meta = self.meta - c.meta + m;
        c.meta = m;
    }

    /// Adds (`sign` = 1) or removes (`sign` = -1) one payload from the counters.
    fn account(&mut self, len: usize, class: usize, sign: i64) {
        let apply = |v: &mut u64, d: u64| {
            *v = if sign > 0 {
                *v + d
            } else {
                v.saturating_sub(d)
            }
        };
        apply(&mut self.payload, len as u64);
        apply(&mut self.slot_bytes, class_size(class) as u64);
        apply(&mut self.objects, 1);
        let c = &mut self.classes[class];
        apply(&mut c.objects, 1);
    }

    /// Takes a free slot of a partly used slab, if there is one, and stores `data` there
    /// (behind `hdr` in a durable arena).
    fn take_slot(
        &mut self,
        arena: usize,
        class: usize,
        data: &[u8],
        hdr: Option<&[u8]>,
    ) -> Option<Handle> {
        let header = self.header;
        let c = &mut self.classes[class];
        let slab_id = c.fullest_partial()?;
        let slot_size = c.slot_size;
        let slab = c.slabs[slab_id as usize].as_mut()?;
        let slot = slab.first_free;
        debug_assert_ne!(slot, NO_SLOT);
        let at = slot as usize * slot_size;
        slab.first_free = slab.next_free_at(at);
        slab.used += 1;
        // SAFETY: the slot is inside the frame; we hold the write lock.
        unsafe { slab.bytes_mut(at + header, data.len()) }.copy_from_slice(data);
        if let Some(h) = hdr {
            // The header last: a slot is live only once its payload is complete.
            // SAFETY: as above.
            unsafe { slab.bytes_mut(at, h.len()) }.copy_from_slice(h);
        }
        c.partial_update(slab_id);
        let id = c.new_handle(slab_id, slot);
        Some(Handle::new(arena, class, id))
    }

    /// Stores `data` without new memory: in a free slot of an existing slab, or (whole
    /// pages) in a spare frame.
    fn reuse(
        &mut self,
        arena: usize,
        class: usize,
        data: &[u8],
        hdr: Option<&[u8]>,
    ) -> Option<Handle> {
        let h = match self.take_slot(arena, class, data, hdr) {
            Some(h) => h,
            None => {
                let c = &self.classes[class];
                if c.slots != 1 || data.len() != c.slab_bytes() || self.spares.is_empty() {
                    return None;
                }
                // Counted by grow_and_take.
                return self.grow_and_take(arena, class, data, hdr);
            }
        };
        self.account(data.len(), class, 1);
        self.refresh_meta(class);
        Some(h)
    }

    /// Makes a new slab for `class` (in a spare frame for whole pages, else a fresh frame)
    /// and stores `data` in it. `None` if the kernel refused to map a region.
    fn grow_and_take(
        &mut self,
        arena: usize,
        class: usize,
        data: &[u8],
        hdr: Option<&[u8]>,
    ) -> Option<Handle> {
        let pages = self.classes[class].pages;
        let whole_page = self.classes[class].slots == 1 && data.len() == PAGE_SIZE;
        let frames = if self.header > 0 { class } else { pages - 1 };
        let (frame, ptr) = match whole_page.then(|| self.spares.pop()).flatten() {
            Some(spare) => spare,
            None => {
                let f = self.frames[frames].take()?;
                self.frame_bytes += (pages * PAGE_SIZE) as u64;
                f
            }
        };
        self.slabs += 1;
        let c = &mut self.classes[class];
        let id = if c.slots == 1 {
            c.add_slab(frame, ptr, NO_SLOT)
        } else {
            let id = c.add_slab(frame, ptr, 0);
            let slab = c.slabs[id as usize].as_ref()?;
            // Thread the intrusive free list through the slots.
            for s in 0..c.slots {
                let next = if s + 1 < c.slots {
                    (s + 1) as u16
                } else {
                    NO_SLOT
                };
                slab.set_next_free_at(s * c.slot_size, next);
            }
            c.partial_update(id);
            id
        };
        let h = if c.slots == 1 {
            // Only in plain arenas: durable whole pages share 32-page frames.
            let slab = c.slabs[id as usize].as_mut()?;
            slab.used = 1;
            // SAFETY: a whole-page slot in our frame, under the write lock.
            unsafe { slab.bytes_mut(0, data.len()) }.copy_from_slice(data);
            Handle::new(arena, class, c.new_handle(id, 0))
        } else {
            self.take_slot(arena, class, data, hdr)?
        };
        self.account(data.len(), class, 1);
        self.refresh_meta(class);
        Some(h)
    }

    /// Frees a payload; returns the bytes given back to the kernel.
    fn free(&mut self, h: Handle, len: usize) -> u64 {
        let class = h.class();
        let Some(c) = self.classes.get_mut(class) else {
            debug_assert!(false, "bad class");
            return 0;
        };
        let Some((slab_id, slot)) = c.loc(h.id()) else {
            debug_assert!(false, "free of a dead handle");
            return 0;
        };
        c.drop_handle(h.id() as u32);
        c.owners[slab_id * c.slots + slot] = NO_OWNER;
        let slot_size = c.slot_size;
        let Some(Some(slab)) = c.slabs.get_mut(slab_id) else {
            debug_assert!(false, "free in a dead slab");
            return 0;
        };
        if self.header > 0 {
            clear_header(slab, slot * slot_size);
        }
        slab.set_next_free_at(slot * slot_size, slab.first_free);
        slab.first_free = slot as u16;
        slab.used -= 1;
        let empty = slab.used == 0;
        if !empty {
            c.partial_update(slab_id as u32);
        }
        self.account(len, class, -1);
        let released = if empty {
            self.release_slab(class, slab_id as u32)
        } else {
            0
        };
        self.refresh_meta(class);
        released
    }

    /// Releases an empty slab: its frame becomes a spare (whole pages, while there is
    /// room) or goes back to the kernel. Returns the bytes given back.
    fn release_slab(&mut self, class: usize, slab_id: u32) -> u64 {
        let frames = if self.header > 0 {
            class
        } else {
            self.classes[class].pages - 1
        };
        let c = &mut self.classes[class];
        let (pages, slots) = (c.pages, c.slots);
        let ptr = c.slabs[slab_id as usize].as_ref().map(|s| s.ptr);
        let Some(frame) = c.remove_slab(slab_id) else {
            return 0;
        };
        self.slabs -= 1;
        if let (1, 1, Some(ptr), 0) = (pages, slots, ptr, self.header) {
            if self.spares.len() < MAX_SPARES {
                self.spares.push((frame, ptr));
                return 0;
            }
        }
        self.frames[frames].give_back(frame);
        let bytes = (pages * PAGE_SIZE) as u64;
        self.frame_bytes -= bytes;
        bytes
    }

    fn drop_spares(&mut self) -> u64 {
        let n = self.spares.len() as u64;
        for (frame, _) in std::mem::take(&mut self.spares) {
            self.frames[0].give_back(frame);
        }
        let bytes = n * PAGE_SIZE as u64;
        self.frame_bytes -= bytes;
        bytes
    }

    /// One bounded compaction step in `class`: moves up to `max` payloads from the least
    /// used slabs into the most used ones; emptied slabs are given back at once.
    fn compact_class(&mut self, class: usize, max: usize) -> CompactStep {
        let mut done = CompactStep::default();
        while (done.moved as usize) < max {
            let c = &self.classes[class];
            if c.compactable_bytes() == 0 || c.partial_len() < 2 {
                break;
            }
            // The sparsest partly used slab is the source; the fullest other one the
            // destination.
            let used = |id: u32| c.slabs[id as usize].as_ref().map_or(0, |s| s.used);
            let Some((src, dst)) = c.compaction_pair() else {
                break;
            };
            // Only worth it if the source can be emptied into the other slabs' free slots.
            let free_elsewhere = (c.live_slabs * c.slots as u64)
                .saturating_sub(c.objects)
                .saturating_sub((c.slots - used(src) as usize) as u64);
            if free_elsewhere < u64::from(used(src)) {
                break;
            }
            while (done.moved as usize) < max && self.move_one(class, src, dst) {
                done.moved += 1;
            }
            let c = &self.classes[class];
            if c.slabs[src as usize].as_ref().is_some_and(|s| s.used == 0) {
                done.bytes_freed += self.release_slab(class, src);
                done.slabs_freed += 1;
            }
        }
        self.refresh_meta(class);
        done
    }

    /// Moves one payload from slab `src` to slab `dst` (same class). Returns false when
    /// `src` is empty or `dst` full.
    fn move_one(&mut self, class: usize, src: u32, dst: u32) -> bool {
        let durable = self.header > 0;
        let c = &mut self.classes[class];
        let (slots, slot_size) = (c.slots, c.slot_size);
        let (Some(Some(s)), Some(Some(d))) = (c.slabs.get(src as usize), c.slabs.get(dst as usize))
        else {
            return false;
        };
        if s.used == 0 || d.first_free == NO_SLOT {
            return false;
        }
        let base = src as usize * slots;
        let Some(from) = (0..slots).find(|&i| c.owners[base + i] != NO_OWNER) else {
            return false;
        };
        let to = d.first_free as usize;
        let next = d.next_free_at(to * slot_size);
        // SAFETY: two slots of the same size in two different slabs' frames, under the
        // write lock; no reader can be looking at either.
        unsafe {
            std::ptr::copy_nonoverlapping(
                s.ptr.as_ptr().add(from * slot_size),
                d.ptr.as_ptr().add(to * slot_size),
                slot_size,
            );
        }
        let id = c.owners[base + from];
        c.owners[base + from] = NO_OWNER;
        c.owners[dst as usize * slots + to] = id;
        c.locs[id as usize] = (u64::from(dst) << 16) | to as u64;
        // The source slot joins its slab's free list; the destination slot leaves its own.
        // (A durable copy is complete, header and all, before the source stops being live:
        // killed in between, both copies carry the same sequence number and content.)
        if let Some(Some(s)) = c.slabs.get_mut(src as usize) {
            if durable {
                clear_header(s, from * slot_size);
            }
            s.set_next_free_at(from * slot_size, s.first_free);
            s.first_free = from as u16;
            s.used -= 1;
        }
        if let Some(Some(d)) = c.slabs.get_mut(dst as usize) {
            d.first_free = next;
            d.used += 1;
        }
        c.partial_update(dst);
        if c.slabs[src as usize].as_ref().is_some_and(|s| s.used > 0) {
            c.partial_update(src);
        }
        true
    }
}

/// Marks a durable slot free (its header no longer live).
fn clear_header(slab: &Slab, at: usize) {
    // SAFETY: a slot of at least 32 bytes inside the frame; the caller holds the write lock.
    unsafe { slab.bytes_mut(at, SLOT_HEADER) }.fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(a: &Arenas, data: &[u8]) -> Handle {
        match a.alloc(data, true) {
            Alloc::Done(h) => h,
            _ => panic!("grow allowed"),
        }
    }

    #[test]
    fn classes_cover_all_lengths() {
        assert_eq!(class_of(1), 0);
        assert!(class_of(16) <= class_of(17));
        assert_eq!(class_of(4096), NUM_CLASSES - 1);
        for len in 1..=PAGE_SIZE {
            assert!(class_size(class_of(len)) >= len);
            // A merged class never packs fewer objects per slab than the exact class would.
            let exact = len.div_ceil(CLASS_DELTA) - 1;
            let merged = class_of(len);
            assert_eq!(pages_per_slab(exact), pages_per_slab(merged));
            assert_eq!(
                pages_per_slab(exact) * PAGE_SIZE / class_size(exact),
                pages_per_slab(merged) * PAGE_SIZE / class_size(merged)
            );
        }
        for c in 0..NUM_CLASSES {
            let cl = Class::new(c, c % 2 == 0);
            assert!(cl.slots >= 1 && cl.slots < NO_SLOT as usize);
        }
    }

    #[test]
    fn alloc_read_free_releases_slabs() {
        let a = Arenas::new(2, 0, false);
        let mut hs = Vec::new();
        for i in 0..3000usize {
            // Every class gets used, but most payloads cluster like compressed pages do.
            let len = if i % 100 == 0 {
                1 + (i * 37) % 4096
            } else {
                1200 + (i * 7) % 200
            };
            let data: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
            hs.push((store(&a, &data), data));
        }
        for (h, d) in &hs {
            assert_eq!(a.with(*h, d.len(), |b| b.to_vec()).as_deref(), Some(&d[..]));
        }
        let s = a.stats();
        assert!(s.held_bytes >= s.slot_bytes && s.slot_bytes >= s.payload_bytes);
        assert!(
            s.fragmentation() < 0.2,
            "fragmentation {}",
            s.fragmentation()
        );
        // What the allocator counts for its frames is what the kernel holds.
        assert_eq!(
            a.resident_bytes(),
            s.held_bytes - s.table_bytes,
            "resident frames"
        );
        for (h, d) in hs.drain(..) {
            a.free(h, d.len());
        }
        // Freed whole-page frames are kept as spares (still held) until dropped.
        let s = a.stats();
        assert!(s.slabs <= MAX_SPARES as u64 * 2);
        assert_eq!(s.held_bytes, s.spare_bytes);
        assert_eq!(a.drop_spares(), s.spare_bytes);
        assert_eq!(a.stats().held_bytes, 0);
        assert_eq!(a.stats().objects, 0);
        assert_eq!(a.resident_bytes(), 0, "every frame went back to the kernel");
    }

    #[test]
    fn free_ids_come_back_lowest_first_and_shrink() {
        let mut f = FreeIds::default();
        for id in [700u32, 3, 64, 65, 5] {
            f.insert(id);
        }
        f.insert(3);
        assert_eq!(f.count, 5);
        assert_eq!(f.pop_first(), Some(3));
        assert_eq!(f.pop_first(), Some(5));
        f.insert(1);
        assert_eq!(f.pop_first(), Some(1));
        f.remove(700);
        assert_eq!(f.words.len(), 2, "trailing empty words go");
        assert_eq!(
            (f.pop_first(), f.pop_first(), f.pop_first()),
            (Some(64), Some(65), None)
        );
        assert_eq!(f.count, 0);
    }

    #[test]
    fn no_growth_means_no_new_memory() {
        let a = Arenas::new(1, 8, false);
        assert!(matches!(a.alloc(&[1u8; 100], false), Alloc::NeedsGrowth(_)));
        assert_eq!(a.held_bytes(), 0);
        let h = store(&a, &[1u8; 100]);
        let held = a.held_bytes();
        // The same class now has free slots: no growth needed.
        assert!(matches!(a.alloc(&[2u8; 100], false), Alloc::Done(_)));
        assert_eq!(a.held_bytes(), held);
        a.free(h, 100);
    }

    #[test]
    fn compaction_moves_payloads_and_gives_slabs_back() {
        let a = Arenas::new(1, 0, false);
        let mut hs = Vec::new();
        for i in 0..20_000usize {
            let len = 900 + (i % 7) * 100;
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            hs.push((store(&a, &data), data));
        }
        // Free three of every four payloads: every slab stays partly used.
        let mut kept = Vec::new();
        for (i, (h, d)) in hs.into_iter().enumerate() {
            if i % 4 == 0 {
                kept.push((h, d));
            } else {
                a.free(h, d.len());
            }
        }
        let before = a.stats();
        assert!(before.compactable_bytes > before.held_bytes / 2);
        let resident_before = a.resident_bytes();
        let mut total = CompactStep::default();
        loop {
            let s = a.compact(500);
            total.add(s);
            if s.moved == 0 && s.slabs_freed == 0 {
                break;
            }
        }
        let after = a.stats();
        assert!(total.moved > 0 && total.slabs_freed > 0);
        assert!(after.compactable_bytes < after.held_bytes / 10, "{after:?}");
        assert!(
            after.held_bytes < before.held_bytes * 45 / 100,
            "{before:?} {after:?}"
        );
        // The kernel agrees: the emptied frames left the resident set.
        let resident_after = a.resident_bytes();
        assert_eq!(resident_after, after.held_bytes - after.table_bytes);
        assert!(resident_before - resident_after >= total.bytes_freed);
        // Every payload is still there, under its old handle.
        for (h, d) in &kept {
            assert_eq!(a.with(*h, d.len(), |b| b.to_vec()).as_deref(), Some(&d[..]));
        }
        for (h, d) in kept {
            a.free(h, d.len());
        }
        a.drop_spares();
        assert_eq!(a.stats().held_bytes, 0);
    }
}
