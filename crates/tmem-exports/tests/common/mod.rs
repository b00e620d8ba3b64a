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
