//! A page corpus: a file of 4 KiB pages.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tmem_core::PAGE_SIZE;

/// Pages loaded in memory.
pub struct Corpus {
    /// The pages, back to back.
    pub data: Vec<u8>,
}

impl Corpus {
    /// Loads at most `limit` pages of the corpus file.
    pub fn load(path: &Path, limit: Option<usize>) -> Result<Self> {
        let mut data =
            std::fs::read(path).with_context(|| format!("reading corpus {}", path.display()))?;
        if data.len() < PAGE_SIZE {
            bail!("corpus {} holds no page", path.display());
        }
        data.truncate(data.len() / PAGE_SIZE * PAGE_SIZE);
        if let Some(l) = limit {
            data.truncate(l.min(data.len() / PAGE_SIZE) * PAGE_SIZE);
        }
        Ok(Corpus { data })
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }

    /// Page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    /// Indexes of pages that are not all-zero (or same-filled).
    pub fn data_pages(&self) -> Vec<usize> {
        (0..self.pages())
            .filter(|&i| {
                let p = self.page(i);
                let first = &p[..8];
                !p.chunks_exact(8).all(|w| w == first)
            })
            .collect()
    }
}

/// A deterministic permutation of 0..n (xorshift-driven Fisher–Yates).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}
