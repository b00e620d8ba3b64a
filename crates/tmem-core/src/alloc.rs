//! A size-class slab allocator for page payloads (the zsmalloc idea, in safe Rust).
//!
//! Payloads of 1..=4096 bytes go to one of 256 classes of 16-byte granularity (neighbours
//! with identical slab geometry merged, as zsmalloc does). Each class carves slabs of 1–8
//! pages (the smallest count with a tail under 1.5 %) into equal slots;
//! free slots form an intrusive list inside the slab, so the allocator's own overhead is a
//! small header per slab. An empty slab is returned to the system at once. The memory that
//! counts against the budget is the sum of slab sizes plus slab headers: real bytes held.
//!
//! An [`Arenas`] set has several independently locked arenas so that puts on different
//! threads do not serialise on one lock.

use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::types::PAGE_SIZE;

/// Granularity of size classes in bytes.
pub(crate) const CLASS_DELTA: usize = 16;
/// Number of size classes.
pub(crate) const NUM_CLASSES: usize = PAGE_SIZE / CLASS_DELTA;
/// Bytes charged per slab for its header (the `Slab` struct and its vector slot).
const SLAB_HEADER: u64 = 32;
const NO_SLOT: u16 = u16::MAX;
const NOT_PARTIAL: u32 = u32::MAX;

/// A stored payload's location: arena (4 bits) | class (8) | slab (36) | slot (16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Handle(pub(crate) u64);

impl Handle {
    fn new(arena: usize, class: usize, slab: u32, slot: u16) -> Self {
        Handle(
            ((arena as u64) << 60) | ((class as u64) << 52) | ((slab as u64) << 16) | slot as u64,
        )
    }
    /// The arena field (the set's tag plus the arena number).
    pub(crate) fn arena(self) -> usize {
        (self.0 >> 60) as usize
    }
    fn class(self) -> usize {
        ((self.0 >> 52) & 0xff) as usize
    }
    fn slab(self) -> usize {
        ((self.0 >> 16) & 0xf_ffff_ffff) as usize
    }
    fn slot(self) -> usize {
        (self.0 & 0xffff) as usize
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
            let (p, n) = (
                pages_per_slab(c),
                pages_per_slab(c) * PAGE_SIZE / class_size(c),
            );
            let (tp, tn) = (
                pages_per_slab(group_top),
                pages_per_slab(group_top) * PAGE_SIZE / class_size(group_top),
            );
            if (p, n) != (tp, tn) {
                group_top = c;
            }
            map[c] = group_top as u8;
        }
        map
    });
    map[len.clamp(1, PAGE_SIZE).div_ceil(CLASS_DELTA) - 1] as usize
}

/// Bytes a new slab of `class` costs (data plus header).
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

/// Largest slab, in pages.
const MAX_SLAB_PAGES: usize = 8;
/// A slab size whose unused tail is at most this (per mille) is good enough.
const GOOD_TAIL_PER_MILLE: usize = 15;

/// Pages per slab for a class: the smallest count in 1..=16 whose unused tail is at most
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

struct Slab {
    data: Box<[u8]>,
    first_free: u16,
    used: u16,
    partial_pos: u32,
}

struct Class {
    slot_size: usize,
    slots: usize,
    slab_bytes: usize,
    slabs: Vec<Option<Slab>>,
    free_ids: Vec<u32>,
    partial: Vec<u32>,
}

impl Class {
    fn new(class: usize) -> Self {
        let slot_size = class_size(class);
        let slab_bytes = pages_per_slab(class) * PAGE_SIZE;
        Class {
            slot_size,
            slots: slab_bytes / slot_size,
            slab_bytes,
            slabs: Vec::new(),
            free_ids: Vec::new(),
            partial: Vec::new(),
        }
    }
}

/// One arena: a lock's worth of classes, with its own counters (kept under its lock so
/// that busy threads never share a counter's cache line).
struct Arena {
    classes: Vec<Class>,
    payload: u64,
    slot_bytes: u64,
    objects: u64,
    slabs: u64,
    /// Freed whole-page slabs kept for reuse (still counted as held): raw pages are often
    /// freed and allocated in quick succession (replaced swap pages, deferred compression),
    /// and handing each page back to malloc makes the next one fault in fresh memory.
    spares: Vec<Box<[u8]>>,
}

/// Whole-page slabs kept per arena for reuse (256 KiB).
const MAX_SPARES: usize = 64;

/// What the arenas hold, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes of slabs plus slab headers: what the allocator really holds.
    pub held_bytes: u64,
    /// Bytes of payload stored in slots (compressed lengths).
    pub payload_bytes: u64,
    /// Bytes of slots in use (payload rounded up to the class size).
    pub slot_bytes: u64,
    /// Number of live slabs.
    pub slabs: u64,
    /// Number of live payloads.
    pub objects: u64,
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
}

/// A set of independently locked arenas.
pub(crate) struct Arenas {
    arenas: Vec<RwLock<Arena>>,
    /// Added to arena numbers in handles, so two sets can share the handle space.
    tag: usize,
    next: AtomicUsize,
    held: AtomicU64,
}

/// Outcome of an allocation attempt.
pub(crate) enum Alloc {
    /// Stored at this handle.
    Done(Handle),
    /// A new slab of this many bytes would be needed.
    NeedsGrowth(u64),
}

thread_local! {
    static ARENA_HINT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

impl Arenas {
    /// Creates `n` arenas (1..=8); handles carry `tag` (0 or 8) in their arena field.
    pub(crate) fn new(n: usize, tag: usize) -> Self {
        let n = n.clamp(1, 8);
        Arenas {
            tag,
            arenas: (0..n)
                .map(|_| {
                    RwLock::new(Arena {
                        classes: (0..NUM_CLASSES).map(Class::new).collect(),
                        payload: 0,
                        slot_bytes: 0,
                        objects: 0,
                        slabs: 0,
                        spares: Vec::new(),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            held: AtomicU64::new(0),
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

    /// Bytes held by all arenas (slabs plus headers).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Current statistics.
    pub(crate) fn stats(&self) -> AllocStats {
        let mut s = AllocStats {
            held_bytes: self.held.load(Ordering::Relaxed),
            ..Default::default()
        };
        for a in &self.arenas {
            let a = a.read();
            s.payload_bytes += a.payload;
            s.slot_bytes += a.slot_bytes;
            s.slabs += a.slabs;
            s.objects += a.objects;
        }
        s
    }

    /// Stores `data` (1..=4096 bytes). With `grow == false` only existing free slots are
    /// used; otherwise a new slab is allocated if needed.
    pub(crate) fn alloc(&self, data: &[u8], grow: bool) -> Alloc {
        let class = class_of(data.len());
        let home = self.home_arena();
        // The thread's home arena first: a free slot there, or a new slab if allowed. Other
        // arenas are only looked at when growing is not allowed (free slots anywhere are
        // free memory), so that puts on different threads do not take each other's locks.
        {
            let mut arena = self.arenas[home].write();
            if let Some(h) = arena.reuse(home + self.tag, class, data) {
                return Alloc::Done(h);
            }
            if grow {
                let (h, reused) = arena.grow_and_take(home + self.tag, class, data);
                arena.account(data.len(), class, 1);
                if !reused {
                    arena.slabs += 1;
                    drop(arena);
                    self.held.fetch_add(slab_cost(class), Ordering::Relaxed);
                }
                return Alloc::Done(h);
            }
        }
        for i in 1..self.arenas.len() {
            let a = (home + i) % self.arenas.len();
            let mut arena = self.arenas[a].write();
            if let Some(h) = arena.reuse(a + self.tag, class, data) {
                return Alloc::Done(h);
            }
        }
        Alloc::NeedsGrowth(slab_cost(class))
    }

    /// Frees the slot at `h` whose payload was `len` bytes. Returns the bytes released to
    /// the system (a whole slab when it became empty, else 0).
    pub(crate) fn free(&self, h: Handle, len: usize) -> u64 {
        let Some(lock) = h
            .arena()
            .checked_sub(self.tag)
            .and_then(|a| self.arenas.get(a))
        else {
            debug_assert!(false, "bad handle");
            return 0;
        };
        let released = {
            let mut arena = lock.write();
            let released = arena.free(h);
            arena.account(len, h.class(), -1);
            if released > 0 {
                arena.slabs -= 1;
            }
            released
        };
        if released > 0 {
            let r = released + SLAB_HEADER;
            self.held.fetch_sub(r, Ordering::Relaxed);
            r
        } else {
            0
        }
    }

    /// Returns the spare whole-page slabs to the system; returns the bytes released.
    pub(crate) fn drop_spares(&self) -> u64 {
        let mut n = 0u64;
        for a in &self.arenas {
            let mut a = a.write();
            n += a.spares.len() as u64;
            a.slabs -= a.spares.len() as u64;
            a.spares = Vec::new();
        }
        let bytes = n * slab_cost(NUM_CLASSES - 1);
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        bytes
    }

    /// Runs `f` on the `len` payload bytes at `h`, under the arena's read lock.
    pub(crate) fn with<R>(&self, h: Handle, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let arena = self.arenas.get(h.arena().checked_sub(self.tag)?)?.read();
        let class = arena.classes.get(h.class())?;
        let slab = class.slabs.get(h.slab())?.as_ref()?;
        let start = h.slot() * class.slot_size;
        let bytes = slab.data.get(start..start + len.min(class.slot_size))?;
        Some(f(bytes))
    }
}

impl Arena {
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
    }

    fn take_slot(&mut self, arena: usize, class: usize, data: &[u8]) -> Option<Handle> {
        let c = &mut self.classes[class];
        let &slab_id = c.partial.last()?;
        let slab = c.slabs[slab_id as usize].as_mut()?;
        let slot = slab.first_free;
        debug_assert_ne!(slot, NO_SLOT);
        let start = slot as usize * c.slot_size;
        let next = u16::from_ne_bytes([slab.data[start], slab.data[start + 1]]);
        slab.first_free = next;
        slab.used += 1;
        slab.data[start..start + data.len()].copy_from_slice(data);
        if slab.first_free == NO_SLOT {
            // Full: leave the partial list.
            slab.partial_pos = NOT_PARTIAL;
            c.partial.pop();
        }
        Some(Handle::new(arena, class, slab_id, slot))
    }

    /// Stores `data` without new memory: in a free slot of an existing slab, or (whole
    /// pages) in a spare slab.
    fn reuse(&mut self, arena: usize, class: usize, data: &[u8]) -> Option<Handle> {
        let h = match self.take_slot(arena, class, data) {
            Some(h) => h,
            None => self.take_spare(arena, class, data)?,
        };
        self.account(data.len(), class, 1);
        Some(h)
    }

    /// Stores a whole page in a spare slab, if there is one (no new memory).
    fn take_spare(&mut self, arena: usize, class: usize, data: &[u8]) -> Option<Handle> {
        let c = &self.classes[class];
        if c.slots != 1 || data.len() != c.slab_bytes || self.spares.is_empty() {
            return None;
        }
        Some(self.grow_and_take(arena, class, data).0)
    }

    /// Makes a new slab for `class` and stores `data` in it. Returns the handle and whether
    /// a spare slab was reused (its memory was already counted as held).
    fn grow_and_take(&mut self, arena: usize, class: usize, data: &[u8]) -> (Handle, bool) {
        let c = &mut self.classes[class];
        if c.slots == 1 && data.len() == c.slab_bytes {
            // A whole-page slab (raw pages): a spare one, or built from the data itself (no
            // zeroing); holding no free slot it goes straight to "full".
            let (mem, reused) = match self.spares.pop() {
                Some(mut b) if b.len() == data.len() => {
                    b.copy_from_slice(data);
                    (b, true)
                }
                _ => (data.into(), false),
            };
            let slab = Slab {
                data: mem,
                first_free: NO_SLOT,
                used: 1,
                partial_pos: NOT_PARTIAL,
            };
            let id = match c.free_ids.pop() {
                Some(id) => {
                    c.slabs[id as usize] = Some(slab);
                    id
                }
                None => {
                    c.slabs.push(Some(slab));
                    (c.slabs.len() - 1) as u32
                }
            };
            return (Handle::new(arena, class, id, 0), reused);
        }
        let mut mem = vec![0u8; c.slab_bytes].into_boxed_slice();
        // Thread the intrusive free list through the slots.
        for s in 0..c.slots {
            let next = if s + 1 < c.slots {
                (s + 1) as u16
            } else {
                NO_SLOT
            };
            let at = s * c.slot_size;
            mem[at..at + 2].copy_from_slice(&next.to_ne_bytes());
        }
        let slab = Slab {
            data: mem,
            first_free: 0,
            used: 0,
            partial_pos: c.partial.len() as u32,
        };
        let id = match c.free_ids.pop() {
            Some(id) => {
                c.slabs[id as usize] = Some(slab);
                id
            }
            None => {
                c.slabs.push(Some(slab));
                (c.slabs.len() - 1) as u32
            }
        };
        c.partial.push(id);
        match self.take_slot(arena, class, data) {
            Some(h) => (h, false),
            None => unreachable!("a fresh slab has a free slot"),
        }
    }

    /// Frees a slot; returns the slab's byte size if the slab was released.
    fn free(&mut self, h: Handle) -> u64 {
        let c = &mut self.classes[h.class()];
        let slab_id = h.slab();
        let Some(Some(slab)) = c.slabs.get_mut(slab_id) else {
            debug_assert!(false, "free of a dead slab");
            return 0;
        };
        let slot = h.slot();
        let at = slot * c.slot_size;
        slab.data[at..at + 2].copy_from_slice(&slab.first_free.to_ne_bytes());
        let was_full = slab.first_free == NO_SLOT;
        slab.first_free = slot as u16;
        slab.used -= 1;
        if slab.used == 0 {
            // Release the slab at once.
            let pos = slab.partial_pos;
            if pos != NOT_PARTIAL {
                Self::partial_remove(c, pos as usize);
            }
            let released = c.slabs[slab_id].take();
            c.free_ids.push(slab_id as u32);
            if c.slots == 1 && self.spares.len() < MAX_SPARES {
                if let Some(slab) = released {
                    self.spares.push(slab.data);
                    return 0;
                }
            }
            return c.slab_bytes as u64;
        }
        if was_full {
            slab.partial_pos = c.partial.len() as u32;
            c.partial.push(slab_id as u32);
        }
        0
    }

    fn partial_remove(c: &mut Class, pos: usize) {
        c.partial.swap_remove(pos);
        if let Some(&moved) = c.partial.get(pos) {
            if let Some(Some(s)) = c.slabs.get_mut(moved as usize) {
                s.partial_pos = pos as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let cl = Class::new(c);
            assert!(cl.slots >= 1 && cl.slots < NO_SLOT as usize);
        }
    }

    #[test]
    fn alloc_read_free_releases_slabs() {
        let a = Arenas::new(2, 0);
        let mut hs = Vec::new();
        for i in 0..3000usize {
            // Every class gets used, but most payloads cluster like compressed pages do.
            let len = if i % 100 == 0 {
                1 + (i * 37) % 4096
            } else {
                1200 + (i * 7) % 200
            };
            let data: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
            let h = match a.alloc(&data, true) {
                Alloc::Done(h) => h,
                Alloc::NeedsGrowth(_) => panic!("grow allowed"),
            };
            hs.push((h, data));
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
        for (h, d) in hs.drain(..) {
            a.free(h, d.len());
        }
        // Freed whole-page slabs are kept as spares (still held) until dropped.
        let spares = a.stats().slabs;
        assert!(spares <= MAX_SPARES as u64 * 2);
        assert_eq!(a.drop_spares(), spares * slab_cost(NUM_CLASSES - 1));
        assert_eq!(a.stats(), AllocStats::default());
    }

    #[test]
    fn no_growth_means_no_new_memory() {
        let a = Arenas::new(1, 8);
        assert!(matches!(a.alloc(&[1u8; 100], false), Alloc::NeedsGrowth(_)));
        assert_eq!(a.held_bytes(), 0);
        let Alloc::Done(h) = a.alloc(&[1u8; 100], true) else {
            panic!()
        };
        let held = a.held_bytes();
        // The same class now has free slots: no growth needed.
        assert!(matches!(a.alloc(&[2u8; 100], false), Alloc::Done(_)));
        assert_eq!(a.held_bytes(), held);
        a.free(h, 100);
    }
}
