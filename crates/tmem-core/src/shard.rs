//! One shard of the page index: the objects whose (pool, object, index/16) hash here,
//! their page tables, and per-client FIFO queues of ephemeral pages for eviction.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;

use crate::entry::Entry;
use crate::types::{ObjectId, PoolId};

/// Pages of one object are grouped by 16 consecutive indexes per shard.
pub(crate) const GROUP_SHIFT: u32 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct ObjKey {
    pub(crate) pool: u32,
    pub(crate) oid: [u64; 3],
}

impl ObjKey {
    pub(crate) fn new(pool: PoolId, oid: ObjectId) -> Self {
        ObjKey {
            pool: pool.0,
            oid: oid.0,
        }
    }
}

pub(crate) struct Object {
    pub(crate) key: ObjKey,
    pub(crate) pages: FxHashMap<u32, Entry>,
}

/// A queued ephemeral page: (object slot, page index).
type QItem = (u32, u32);

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) items: VecDeque<QItem>,
    /// Live ephemeral entries of this client in this shard.
    pub(crate) live: usize,
}

/// Bytes of one page-table slot (key, entry, control byte).
const PAGE_SLOT: i64 = (std::mem::size_of::<(u32, Entry)>() + 1) as i64;
/// Bytes of one object-table slot plus the object header.
const OBJ_SLOT: i64 =
    (std::mem::size_of::<(ObjKey, u32)>() + 1 + std::mem::size_of::<Option<Object>>()) as i64;
const QUEUE_SLOT: i64 = std::mem::size_of::<QItem>() as i64;

#[derive(Default)]
pub(crate) struct Shard {
    pub(crate) index: FxHashMap<ObjKey, u32>,
    pub(crate) objs: Vec<Option<Object>>,
    free_objs: Vec<u32>,
    pub(crate) queues: FxHashMap<u32, Queue>,
    /// Metadata bytes of this shard (tables and queues, by capacity).
    pub(crate) meta: i64,
}

/// An entry removed from the index, to be released after the shard lock is dropped.
pub(crate) struct Removed {
    pub(crate) entry: Entry,
}

impl Shard {
    fn recount(&mut self) -> i64 {
        let mut m = self.index.capacity() as i64 * OBJ_SLOT;
        for o in self.objs.iter().flatten() {
            m += o.pages.capacity() as i64 * PAGE_SLOT;
        }
        for q in self.queues.values() {
            m += q.items.capacity() as i64 * QUEUE_SLOT;
        }
        let delta = m - self.meta;
        self.meta = m;
        delta
    }

    /// Looks up an entry.
    pub(crate) fn get_mut(&mut self, key: &ObjKey, idx: u32) -> Option<&mut Entry> {
        let &slot = self.index.get(key)?;
        self.objs
            .get_mut(slot as usize)?
            .as_mut()?
            .pages
            .get_mut(&idx)
    }

    /// Inserts or replaces an entry; returns the old one and the metadata delta.
    /// `queue_client` is the client charged for an ephemeral page (None for persistent).
    pub(crate) fn insert(
        &mut self,
        key: ObjKey,
        idx: u32,
        e: Entry,
        queue_client: Option<u32>,
    ) -> (Option<Removed>, i64) {
        let (slot, mut delta) = match self.index.get(&key) {
            Some(&s) => (s, 0),
            None => {
                let cap = self.index.capacity();
                let obj = Object {
                    key,
                    pages: FxHashMap::default(),
                };
                let s = match self.free_objs.pop() {
                    Some(s) => {
                        self.objs[s as usize] = Some(obj);
                        s
                    }
                    None => {
                        self.objs.push(Some(obj));
                        (self.objs.len() - 1) as u32
                    }
                };
                self.index.insert(key, s);
                (s, (self.index.capacity() as i64 - cap as i64) * OBJ_SLOT)
            }
        };
        let Some(Some(obj)) = self.objs.get_mut(slot as usize) else {
            unreachable!("index points at a live object")
        };
        let cap = obj.pages.capacity();
        let old = obj.pages.insert(idx, e);
        delta += (obj.pages.capacity() as i64 - cap as i64) * PAGE_SLOT;
        if let Some(c) = queue_client {
            let q = self.queues.entry(c).or_default();
            let qcap = q.items.capacity();
            q.items.push_back((slot, idx));
            if old.is_none() {
                q.live += 1;
            }
            delta += (q.items.capacity() as i64 - qcap as i64) * QUEUE_SLOT;
            if q.live == 0 || q.items.len() > 2 * q.live + 64 {
                delta += self.compact_queue(c);
            }
        }
        self.meta += delta;
        (old.map(|entry| Removed { entry }), delta)
    }

    /// Removes an entry; returns it and the metadata delta.
    pub(crate) fn remove(
        &mut self,
        key: &ObjKey,
        idx: u32,
        queue_client: Option<u32>,
    ) -> (Option<Removed>, i64) {
        let Some(&slot) = self.index.get(key) else {
            return (None, 0);
        };
        let Some(Some(obj)) = self.objs.get_mut(slot as usize) else {
            return (None, 0);
        };
        // Capacities are read around every change: a removal can lower a hash table's
        // reported capacity (a tombstone), and only a bracketed count sums to zero when the
        // table is gone.
        let cap0 = obj.pages.capacity();
        let Some(entry) = obj.pages.remove(&idx) else {
            return (None, 0);
        };
        let mut delta = (obj.pages.capacity() as i64 - cap0 as i64) * PAGE_SLOT;
        if obj.pages.is_empty() {
            delta -= obj.pages.capacity() as i64 * PAGE_SLOT;
            delta += self.drop_object(key, slot);
        } else if obj.pages.capacity() > 64 && obj.pages.len() < obj.pages.capacity() / 4 {
            let cap = obj.pages.capacity();
            obj.pages.shrink_to_fit();
            delta += (obj.pages.capacity() as i64 - cap as i64) * PAGE_SLOT;
        }
        if let Some(c) = queue_client {
            if let Some(q) = self.queues.get_mut(&c) {
                q.live = q.live.saturating_sub(1);
                if q.live == 0 || q.items.len() > 2 * q.live + 64 {
                    delta += self.compact_queue(c);
                }
            }
        }
        self.meta += delta;
        (Some(Removed { entry }), delta)
    }

    /// Removes an (empty) object; returns the metadata delta of the object index.
    fn drop_object(&mut self, key: &ObjKey, slot: u32) -> i64 {
        drop_object_in(
            &mut self.index,
            &mut self.objs,
            &mut self.free_objs,
            key,
            slot,
        )
    }

    /// Removes every page of an object; returns them and the metadata delta.
    pub(crate) fn remove_object(
        &mut self,
        key: &ObjKey,
        queue_client: Option<u32>,
    ) -> (Vec<Removed>, i64) {
        let Some(&slot) = self.index.get(key) else {
            return (Vec::new(), 0);
        };
        let Some(Some(obj)) = self.objs.get_mut(slot as usize) else {
            return (Vec::new(), 0);
        };
        let pages = std::mem::take(&mut obj.pages);
        let n = pages.len();
        self.drop_object(key, slot);
        if let Some(c) = queue_client {
            if let Some(q) = self.queues.get_mut(&c) {
                q.live = q.live.saturating_sub(n);
            }
            self.compact_queue(c);
        }
        let delta = self.recount();
        (
            pages.into_values().map(|entry| Removed { entry }).collect(),
            delta,
        )
    }

    /// Keys of all objects of a pool.
    pub(crate) fn objects_of(&self, pool: u32) -> Vec<ObjKey> {
        self.index
            .keys()
            .filter(|k| k.pool == pool)
            .copied()
            .collect()
    }

    /// Drops stale queue items (flushed pages, duplicates). Returns the metadata delta.
    fn compact_queue(&mut self, client: u32) -> i64 {
        let Some(q) = self.queues.get_mut(&client) else {
            return 0;
        };
        let before = q.items.capacity() as i64;
        let mut seen = rustc_hash::FxHashSet::default();
        let objs = &self.objs;
        // Keep the newest occurrence of each live page, in order.
        let mut kept: VecDeque<QItem> = VecDeque::with_capacity(q.live);
        for &(slot, idx) in q.items.iter().rev() {
            let live =
                matches!(objs.get(slot as usize), Some(Some(o)) if o.pages.contains_key(&idx));
            if live && seen.insert((slot, idx)) {
                kept.push_front((slot, idx));
            }
        }
        q.items = kept;
        if q.items.is_empty() && q.live == 0 {
            self.queues.remove(&client);
            return -before * QUEUE_SLOT;
        }
        (q.items.capacity() as i64 - before) * QUEUE_SLOT
    }

    /// Pops up to `max` ephemeral victims of `client` in FIFO order, giving referenced pages
    /// a second chance (CLOCK). `is_evictable(pool)` must say whether a pool is ephemeral
    /// and charged to `client`. Returns the removed entries with their pools.
    pub(crate) fn evict(
        &mut self,
        client: u32,
        max: usize,
        is_evictable: &dyn Fn(u32) -> bool,
    ) -> (Vec<(ObjKey, u32, Removed)>, i64) {
        let mut out = Vec::new();
        let mut delta = 0;
        let Some(q) = self.queues.get_mut(&client) else {
            return (out, 0);
        };
        let mut budget = q.items.len();
        while out.len() < max && budget > 0 {
            budget -= 1;
            let Some((slot, idx)) = q.items.pop_front() else {
                break;
            };
            let Some(Some(obj)) = self.objs.get_mut(slot as usize) else {
                continue;
            };
            if !is_evictable(obj.key.pool) {
                continue;
            }
            let Some(e) = obj.pages.get_mut(&idx) else {
                continue;
            };
            if e.referenced() {
                e.set_referenced(false);
                q.items.push_back((slot, idx));
                continue;
            }
            let okey = obj.key;
            let cap0 = obj.pages.capacity();
            let Some(entry) = obj.pages.remove(&idx) else {
                continue;
            };
            delta += (obj.pages.capacity() as i64 - cap0 as i64) * PAGE_SLOT;
            q.live = q.live.saturating_sub(1);
            if obj.pages.is_empty() {
                delta -= obj.pages.capacity() as i64 * PAGE_SLOT;
                let key = obj.key;
                delta += drop_object_in(
                    &mut self.index,
                    &mut self.objs,
                    &mut self.free_objs,
                    &key,
                    slot,
                );
            }
            out.push((okey, idx, Removed { entry }));
        }
        if let Some(q) = self.queues.get(&client) {
            if q.live == 0 || q.items.len() > 2 * q.live + 64 {
                delta += self.compact_queue(client);
            }
        }
        self.meta += delta;
        (out, delta)
    }
}

/// Removes an (empty) object from the tables; returns the metadata delta of the index.
fn drop_object_in(
    index: &mut FxHashMap<ObjKey, u32>,
    objs: &mut [Option<Object>],
    free: &mut Vec<u32>,
    key: &ObjKey,
    slot: u32,
) -> i64 {
    let cap = index.capacity();
    index.remove(key);
    objs[slot as usize] = None;
    free.push(slot);
    if index.len() <= index.capacity() / 2 {
        index.shrink_to_fit();
    }
    (index.capacity() as i64 - cap as i64) * OBJ_SLOT
}
