//! Shared helpers: engines, exports, a byte model and deterministic random data.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tmem_core::{ClientConfig, ClientId, Codec, DedupScope, Engine, EngineConfig};
use tmem_exports::{CachedConfig, CachedExport, SwapConfig, SwapExport};
use tmem_nbd::BlockBackend;

pub const PAGE: u64 = 4096;

pub fn engine(budget: u64, clients: &[u32]) -> Arc<Engine> {
    let e = Arc::new(Engine::new(EngineConfig::with_budget(budget)));
    for &c in clients {
        e.add_client(ClientId(c), ClientConfig::default())
            .expect("add client");
    }
    e
}

pub fn swap_cfg(dir: &Path, name: &str, size: u64, client: u32) -> SwapConfig {
    SwapConfig {
        name: name.into(),
        size,
        client: ClientId(client),
        spill_path: dir.join(format!("{name}.spill")),
        codec: Codec::Lz4,
        dedup: DedupScope::Client,
        spill_reserve: 0,
    }
}

pub fn swap(engine: &Arc<Engine>, dir: &Path, name: &str, size: u64) -> Arc<SwapExport> {
    SwapExport::create(engine.clone(), swap_cfg(dir, name, size, 1)).expect("create swap")
}

pub fn cached_cfg(image: &Path, name: &str, client: u32) -> CachedConfig {
    CachedConfig {
        name: name.into(),
        image: image.to_path_buf(),
        client: ClientId(client),
        uuid: None,
        direct_io: true,
        codec: Codec::Lz4,
        dedup: DedupScope::Client,
        // These tests write through the export; read-only ones clear it.
        writable: true,
    }
}

pub fn cached(engine: &Arc<Engine>, image: &Path, name: &str, client: u32) -> Arc<CachedExport> {
    CachedExport::open(engine.clone(), cached_cfg(image, name, client)).expect("open cached")
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Random bytes with some structure: runs of zeros, repeated bytes and noise.
pub fn fill(rng: &mut SmallRng, buf: &mut [u8]) {
    match rng.gen_range(0..4) {
        0 => buf.fill(0),
        1 => buf.fill(rng.gen()),
        _ => rng.fill(buf),
    }
}

/// Reads `[off, off+len)` and materialises reported zero ranges.
pub fn read(b: &dyn BlockBackend, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    let zr = b.read(off, &mut buf).expect("read");
    for &(s, l) in zr.as_slice() {
        buf[s..s + l].fill(0);
    }
    buf
}

/// A random range inside `size`: aligned, unaligned or sub-page.
pub fn range(rng: &mut SmallRng, size: u64, max: u64) -> (u64, u64) {
    let (off, len) = match rng.gen_range(0..3) {
        0 => {
            let pages = size / PAGE;
            let p = rng.gen_range(0..pages);
            let n = rng.gen_range(1..=(max / PAGE).min(pages - p).max(1));
            (p * PAGE, n * PAGE)
        }
        1 => {
            let off = rng.gen_range(0..size);
            (off, rng.gen_range(1..=max.min(size - off)))
        }
        _ => {
            let off = rng.gen_range(0..size);
            (off, rng.gen_range(1..=600u64.min(size - off)))
        }
    };
    (off, len)
}

/// Index of the first differing byte, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// An in-memory stand-in for a remote tier, for the exports' own tests (the real one, on
/// Redis, is tested in `tmem-remote` and the multi-host test). Demotions wait in a pending
/// list and land in a shuffled order at the next fetch — later than and out of the order
/// they were made in, as over a network with several connections.
#[derive(Default)]
pub struct MemTier {
    state: std::sync::Mutex<MemTierState>,
    pub down: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct MemTierState {
    pending: Vec<(String, u64, u64, Vec<u8>)>,
    ephemeral: std::collections::HashMap<(String, u64), (u64, Vec<u8>)>,
    durable: std::collections::HashMap<(String, u64), Vec<u8>>,
    seed: u64,
    pub demotions: u64,
}

impl MemTier {
    pub fn demotions(&self) -> u64 {
        self.state.lock().unwrap().demotions
    }
    pub fn durable_pages(&self) -> usize {
        self.state.lock().unwrap().durable.len()
    }
    /// Replaces the durable copy of `page` (in every space) with `data`.
    pub fn replace_durable(&self, page: u64, data: &[u8]) {
        for ((_, p), v) in self.state.lock().unwrap().durable.iter_mut() {
            if *p == page {
                *v = data.to_vec();
            }
        }
    }
    /// Replaces every durable copy's content (a tier that lost or garbled pages).
    pub fn garble_durable(&self) {
        for v in self.state.lock().unwrap().durable.values_mut() {
            v[100] ^= 0x55;
        }
    }
    fn land(st: &mut MemTierState) {
        let mut r = rng(st.seed);
        st.seed += 1;
        let mut p = std::mem::take(&mut st.pending);
        for i in (1..p.len()).rev() {
            p.swap(i, r.gen_range(0..=i));
        }
        for (space, page, tag, data) in p {
            st.ephemeral.insert((space, page), (tag, data));
        }
    }
}

impl tmem_exports::RemoteTier for MemTier {
    fn demote(&self, space: &str, page: u64, tag: u64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        st.demotions += 1;
        st.pending.push((space.into(), page, tag, data.to_vec()));
    }
    fn fetch(&self, space: &str, pages: &[u64]) -> Vec<Option<tmem_exports::RemotePage>> {
        let mut st = self.state.lock().unwrap();
        Self::land(&mut st);
        pages
            .iter()
            .map(|&p| {
                st.ephemeral
                    .get(&(space.to_string(), p))
                    .map(|(tag, data)| tmem_exports::RemotePage {
                        tag: *tag,
                        data: data.clone(),
                    })
            })
            .collect()
    }
    fn put_durable(
        &self,
        space: &str,
        page: u64,
        data: &[u8],
    ) -> Result<(), tmem_exports::RemoteError> {
        if !self.available() {
            return Err(tmem_exports::RemoteError::Unreachable("down".into()));
        }
        let mut st = self.state.lock().unwrap();
        st.durable.insert((space.into(), page), data.to_vec());
        Ok(())
    }
    fn get_durable(
        &self,
        space: &str,
        page: u64,
        out: &mut [u8],
    ) -> Result<bool, tmem_exports::RemoteError> {
        // Like the real tier, a durable read retries for a while (a failover) before it
        // gives up.
        let end = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while !self.available() {
            if std::time::Instant::now() >= end {
                return Err(tmem_exports::RemoteError::Unreachable("down".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let st = self.state.lock().unwrap();
        match st.durable.get(&(space.to_string(), page)) {
            Some(d) => {
                out.copy_from_slice(d);
                Ok(true)
            }
            None => Ok(false),
        }
    }
    fn forget(&self, space: &str, pages: &[u64]) {
        let mut st = self.state.lock().unwrap();
        for &p in pages {
            st.durable.remove(&(space.to_string(), p));
            st.ephemeral.remove(&(space.to_string(), p));
        }
    }
    fn available(&self) -> bool {
        !self.down.load(std::sync::atomic::Ordering::Relaxed)
    }
}
