//! The dedup table: content hash → one stored payload with a reference count.
//!
//! A page is looked up by its xxh3 hash (seeded with its dedup domain, so domains never
//! meet) and confirmed by a full comparison with the stored page before it is shared. A
//! different page with the same hash (a collision) is simply stored on its own.

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use crate::alloc::{Arenas, Handle};
use crate::codec;
use crate::types::{Page, PAGE_SIZE};

#[derive(Clone, Copy)]
struct Rec {
    handle: Handle,
    refs: u32,
    len: u16,
    codec: u8,
}

/// Bytes per table slot, for metadata accounting (key + record + control byte).
const SLOT_BYTES: i64 = (std::mem::size_of::<(u64, Rec)>() + 1) as i64;

/// Result of a lookup.
pub(crate) enum Found {
    /// An identical page is stored; a reference was taken. Its payload length.
    Hit(usize),
    /// A different page has this hash.
    Collision,
    /// Nothing under this hash.
    Miss,
}

/// Result of an insert.
pub(crate) enum Inserted {
    /// The payload is now owned by the table.
    Owned,
    /// An identical page was inserted meanwhile; a reference to it was taken and the
    /// caller must free its own payload. Its payload length.
    Existing(usize),
    /// A different page has this hash: the caller keeps its payload as a plain entry.
    Collision,
}

pub(crate) struct DedupTable {
    shards: Vec<Mutex<FxHashMap<u64, Rec>>>,
    pub(crate) meta: AtomicI64,
}

/// Resolves a handle to its arena set.
pub(crate) trait Payloads {
    fn arenas(&self, h: Handle) -> &Arenas;
}

impl DedupTable {
    pub(crate) fn new(shards: usize) -> Self {
        DedupTable {
            shards: (0..shards.next_power_of_two())
                .map(|_| Mutex::new(FxHashMap::default()))
                .collect(),
            meta: AtomicI64::new(0),
        }
    }

    fn shard(&self, hash: u64) -> &Mutex<FxHashMap<u64, Rec>> {
        &self.shards[(hash >> 7) as usize & (self.shards.len() - 1)]
    }

    fn same_content(p: &dyn Payloads, rec: &Rec, page: &Page) -> bool {
        let mut tmp = [0u8; PAGE_SIZE];
        p.arenas(rec.handle)
            .with(rec.handle, rec.len as usize, |b| {
                codec::decompress(rec.codec, b, &mut tmp)
            })
            .unwrap_or(false)
            && tmp == *page
    }

    /// Looks `page` up; on a confirmed match takes a reference.
    pub(crate) fn find_and_ref(&self, p: &dyn Payloads, hash: u64, page: &Page) -> Found {
        let mut map = self.shard(hash).lock();
        match map.get_mut(&hash) {
            None => Found::Miss,
            Some(rec) => {
                if rec.refs < u32::MAX && Self::same_content(p, rec, page) {
                    rec.refs += 1;
                    Found::Hit(rec.len as usize)
                } else {
                    Found::Collision
                }
            }
        }
    }

    /// Registers a freshly stored payload for `page` under `hash`.
    pub(crate) fn insert(
        &self,
        p: &dyn Payloads,
        hash: u64,
        page: &Page,
        handle: Handle,
        codec: u8,
        len: usize,
    ) -> Inserted {
        let mut map = self.shard(hash).lock();
        if let Some(rec) = map.get_mut(&hash) {
            if rec.refs < u32::MAX && Self::same_content(p, rec, page) {
                rec.refs += 1;
                return Inserted::Existing(rec.len as usize);
            }
            return Inserted::Collision;
        }
        let cap = map.capacity();
        map.insert(
            hash,
            Rec {
                handle,
                refs: 1,
                len: len as u16,
                codec,
            },
        );
        self.track(cap, map.capacity());
        Inserted::Owned
    }

    fn track(&self, before: usize, after: usize) {
        if before != after {
            self.meta
                .fetch_add((after as i64 - before as i64) * SLOT_BYTES, Relaxed);
        }
    }

    /// Drops one reference; frees the payload when it was the last. Returns bytes released.
    pub(crate) fn unref(&self, p: &dyn Payloads, hash: u64) -> u64 {
        let mut map = self.shard(hash).lock();
        let Some(rec) = map.get_mut(&hash) else {
            debug_assert!(false, "unref of a missing dedup record");
            return 0;
        };
        rec.refs -= 1;
        if rec.refs > 0 {
            return 0;
        }
        let rec = *rec;
        // Capacity before the removal: a removal can lower it (a tombstone).
        let cap = map.capacity();
        map.remove(&hash);
        if map.is_empty() || cap > 64 && map.len() < cap / 4 {
            map.shrink_to_fit();
        }
        self.track(cap, map.capacity());
        drop(map);
        p.arenas(rec.handle).free(rec.handle, rec.len as usize)
    }

    /// Copies the page stored under `hash` into `out`.
    pub(crate) fn read(&self, p: &dyn Payloads, hash: u64, out: &mut Page) -> bool {
        let map = self.shard(hash).lock();
        let Some(rec) = map.get(&hash) else {
            return false;
        };
        p.arenas(rec.handle)
            .with(rec.handle, rec.len as usize, |b| {
                codec::decompress(rec.codec, b, out)
            })
            .unwrap_or(false)
    }

    /// The payload handle under `hash`.
    pub(crate) fn handle_of(&self, hash: u64) -> Option<Handle> {
        self.shard(hash).lock().get(&hash).map(|r| r.handle)
    }

    /// Replaces the payload under `hash` if it is still the raw page `raw` at `old` (same
    /// content, new form). The bytes are compared too: the slot may have been reused.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn swap_payload(
        &self,
        p: &dyn Payloads,
        hash: u64,
        old: Handle,
        raw: &Page,
        new: Handle,
        codec: u8,
        len: usize,
    ) -> bool {
        let mut map = self.shard(hash).lock();
        match map.get_mut(&hash) {
            Some(rec)
                if rec.handle == old
                    && rec.codec == 0
                    && p.arenas(old).with(old, PAGE_SIZE, |b| b == &raw[..]) == Some(true) =>
            {
                rec.handle = new;
                rec.codec = codec;
                rec.len = len as u16;
                true
            }
            _ => false,
        }
    }

    /// The stored form (codec, bytes) under `hash`, for save streams.
    pub(crate) fn stored_form(&self, p: &dyn Payloads, hash: u64) -> Option<(u8, Vec<u8>)> {
        let map = self.shard(hash).lock();
        let rec = map.get(&hash)?;
        p.arenas(rec.handle)
            .with(rec.handle, rec.len as usize, |b| (rec.codec, b.to_vec()))
    }
}
