//! Finding a dead process's persistent pages again: recovery from durable memory.
//!
//! An engine built with [`Engine::with_durable`] writes each payload of a persistent pool
//! into durable memory behind a [`SlotHeader`] (pool tag, object, index, write sequence,
//! checksum of header and payload) before the put returns, and clears the header when the
//! payload is freed. A replaced page's new copy is complete before the old one is cleared,
//! and compaction copies a slot whole before clearing its source. So whatever moment the
//! process died at, every acknowledged page has at least one live, intact copy, and of two
//! copies of a page the one with the higher sequence number is the newer (equal numbers
//! mean equal content). A slot whose checksum fails was being written when the process died:
//! its put was never acknowledged, and the page's previous copy, still live, is the answer.
//!
//! [`Engine::recover`] reads the old memory window by window, keeps the newest copy of each
//! page, puts it into this engine and frees each window as soon as it has been read, so a
//! recovery needs little more memory than the pages themselves.

use std::collections::{BTreeMap, HashMap};

use crate::alloc::{geometry, SlotHeader};
use crate::engine::Engine;
use crate::region::{DurableFile, DurableMemory, REGION_BYTES};
use crate::types::{ClientId, ObjectId, PageKey, PoolId, PAGE_SIZE};

/// What a recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Pages recovered (the newest intact copy of each).
    pub pages: u64,
    /// Older live copies of recovered pages, left behind.
    pub stale_copies: u64,
    /// Slots marked live whose header or payload failed its checksum (puts cut short by
    /// the process's death: never acknowledged).
    pub torn_slots: u64,
    /// Pages of pools the caller did not claim.
    pub unclaimed: u64,
    /// Pages that could not be put into this engine (no space, a payload that does not
    /// decode): lost, and counted so that the caller can refuse to serve them.
    pub failed: u64,
    /// Windows of old memory read.
    pub windows: u64,
    /// Pages (old pool tag, object, index, as their torn headers claim) with a torn slot and
    /// no intact copy: most likely a first write cut short, but not provably so — a caller
    /// should refuse to serve them (an I/O error) until they are written again.
    pub damaged: Vec<(u32, u64, u32)>,
}

/// A page as durable headers name it: (pool tag, object, index).
type PageName = (u32, u64, u32);

/// Where the newest copy of a page is.
#[derive(Clone, Copy)]
struct Copy {
    seq: u64,
    file: DurableFile,
    window: u32,
    offset: usize,
}

/// The key a (possibly torn) header claims: (tag, object, index).
fn claimed_key(slot: &[u8]) -> PageName {
    let u32_at = |i: usize| u32::from_le_bytes([slot[i], slot[i + 1], slot[i + 2], slot[i + 3]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&slot[24..32]);
    (u32_at(16), u64::from_le_bytes(o), u32_at(20))
}

/// Calls `f` on every intact live slot in a window of `file`, with its offset; collects
/// the keys torn slots claim.
fn each_slot(
    file: DurableFile,
    window: &[u8],
    torn: &mut Vec<PageName>,
    mut f: impl FnMut(usize, SlotHeader, &[u8]),
) {
    let (slot_size, pages) = geometry(file.class as usize, true);
    let frame_bytes = pages * PAGE_SIZE;
    let slots = frame_bytes / slot_size;
    for frame in 0..REGION_BYTES / frame_bytes {
        for s in 0..slots {
            let at = frame * frame_bytes + s * slot_size;
            let slot = &window[at..at + slot_size];
            if slot[4] == 0 {
                continue;
            }
            match SlotHeader::decode(slot) {
                Some((h, payload)) => f(at, h, payload),
                None => torn.push(claimed_key(slot)),
            }
        }
    }
}

/// The tag a durable pool's slots carry: a hash of its label, so that it is the same in
/// every process that creates the pool under that label. An engine refuses a second
/// durable pool with the same tag.
pub fn durable_tag(label: &str) -> u32 {
    crc32fast::hash(label.as_bytes())
}

impl Engine {
    /// Recovers the persistent pages a dead process left in `old` (the durable memory of an
    /// engine built with [`Engine::with_durable`]): the newest intact copy of every page is
    /// put into the pool that `pools` names for its tag ([`durable_tag`] of the label of
    /// the pool it had in the old engine). Each window of `old` is discarded once read; the caller
    /// deletes the old files afterwards.
    ///
    /// The pools must exist (and have room: raise the budget for the recovery, as a restore
    /// does). Pages of unclaimed tags are dropped and counted.
    pub fn recover(
        &self,
        old: &dyn DurableMemory,
        pools: &dyn Fn(u32) -> Option<(ClientId, PoolId)>,
    ) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let mut files = old.files();
        files.sort();
        // Pass 1: the newest copy of each page.
        let mut newest: HashMap<PageName, Copy> = HashMap::new();
        let mut torn = Vec::new();
        for &(file, windows) in &files {
            if file.class as usize >= crate::alloc::NUM_CLASSES {
                continue;
            }
            for w in 0..windows {
                let Some(ptr) = old.map(file, w) else {
                    continue;
                };
                report.windows += 1;
                // SAFETY: `map` returned a readable window of REGION_BYTES that nothing
                // else writes (the process that wrote it is gone).
                let window = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), REGION_BYTES) };
                each_slot(file, window, &mut torn, |at, h, _| {
                    let copy = Copy {
                        seq: h.seq,
                        file,
                        window: w,
                        offset: at,
                    };
                    match newest.entry((h.tag, h.object, h.index)) {
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(copy);
                        }
                        std::collections::hash_map::Entry::Occupied(mut o) => {
                            report.stale_copies += 1;
                            if h.seq > o.get().seq {
                                o.insert(copy);
                            }
                        }
                    }
                });
                old.unmap(file, w, ptr);
            }
        }
        report.torn_slots = torn.len() as u64;
        report.damaged = torn
            .into_iter()
            .filter(|k| !newest.contains_key(k))
            .collect();
        report.damaged.sort_unstable();
        report.damaged.dedup();
        // Pass 2: window by window, put the newest copies and free the window.
        let mut by_window: BTreeMap<(DurableFile, u32), Vec<(usize, PageName)>> = BTreeMap::new();
        for (key, c) in newest {
            by_window
                .entry((c.file, c.window))
                .or_default()
                .push((c.offset, key));
        }
        let mut page = [0u8; PAGE_SIZE];
        for &(file, windows) in &files {
            for w in 0..windows {
                let Some(ptr) = old.map(file, w) else {
                    continue;
                };
                if let Some(list) = by_window.get(&(file, w)) {
                    // SAFETY: as in pass 1.
                    let window = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), REGION_BYTES) };
                    let (slot_size, _) = geometry(file.class as usize, true);
                    for &(at, (tag, object, index)) in list {
                        let Some((h, payload)) = SlotHeader::decode(&window[at..at + slot_size])
                        else {
                            report.failed += 1;
                            continue;
                        };
                        let Some((client, pool)) = pools(tag) else {
                            report.unclaimed += 1;
                            continue;
                        };
                        if !crate::codec::decompress(h.codec, payload, &mut page) {
                            report.failed += 1;
                            continue;
                        }
                        let key = PageKey::new(pool, ObjectId::from_u64(object), index);
                        match self.put(client, key, &page) {
                            Ok(()) => report.pages += 1,
                            Err(e) => {
                                tracing::warn!(?key, error = %e, "a recovered page could not be stored");
                                report.failed += 1;
                            }
                        }
                    }
                }
                old.discard(ptr, REGION_BYTES);
                old.unmap(file, w, ptr);
            }
        }
        report
    }
}
