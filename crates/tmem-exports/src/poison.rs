//! [`Poison`]: the pages of an export whose content cannot be proven intact (lost with the
//! daemon's memory at an unclean stop, or dropped when neither the pool nor the spill file
//! could take a rewrite). A poisoned page answers reads with an I/O error, never with zeros
//! or stale data, until it is written or trimmed as a whole.
//!
//! The set is a bitmap in chunks of 32 768 pages (4 KiB of bits each), allocated only for
//! chunks that are partly poisoned: a whole export poisoned at once costs one word per chunk
//! (128 MiB of export), a clean export nothing. The count is kept apart so that the hot path
//! of a clean export ([`Poison::is_empty`]) is one atomic load.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

/// Pages per chunk (a power of two).
const CHUNK_PAGES: u64 = 1 << 15;
const WORDS: usize = (CHUNK_PAGES / 64) as usize;

#[derive(Clone)]
enum Chunk {
    /// No page poisoned.
    Clear,
    /// Every page (of the export's part of the chunk) poisoned.
    Full,
    /// Some pages poisoned: one bit per page.
    Bits(Box<[u64; WORDS]>),
}

/// A set of poisoned pages of an export of `pages` pages. Thread-safe; callers serialise
/// operations on one page (the swap export's page locks do).
pub struct Poison {
    pages: u64,
    count: AtomicU64,
    chunks: Mutex<Vec<Chunk>>,
}

impl std::fmt::Debug for Poison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poison")
            .field("pages", &self.pages)
            .field("poisoned", &self.count())
            .finish()
    }
}

impl Poison {
    /// An empty set for an export of `pages` pages.
    pub fn new(pages: u64) -> Self {
        let n = pages.div_ceil(CHUNK_PAGES) as usize;
        Poison {
            pages,
            count: AtomicU64::new(0),
            chunks: Mutex::new(vec![Chunk::Clear; n]),
        }
    }

    /// Pages of the export.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of poisoned pages.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Whether no page is poisoned (one atomic load).
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Pages in chunk `c` (the last one may be short).
    fn chunk_len(&self, c: usize) -> u64 {
        (self.pages - c as u64 * CHUNK_PAGES).min(CHUNK_PAGES)
    }

    /// Whether `page` is poisoned.
    pub fn contains(&self, page: u64) -> bool {
        if self.is_empty() || page >= self.pages {
            return false;
        }
        let (c, i) = ((page / CHUNK_PAGES) as usize, page % CHUNK_PAGES);
        match &self.chunks.lock()[c] {
            Chunk::Clear => false,
            Chunk::Full => true,
            Chunk::Bits(b) => b[(i / 64) as usize] & (1 << (i % 64)) != 0,
        }
    }

    /// Poisons `page`; returns whether it was clean before.
    pub fn insert(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (c, i) = ((page / CHUNK_PAGES) as usize, page % CHUNK_PAGES);
        let len = self.chunk_len(c);
        let mut chunks = self.chunks.lock();
        let chunk = &mut chunks[c];
        let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        match chunk {
            Chunk::Full => return false,
            Chunk::Bits(b) if b[w] & bit != 0 => return false,
            Chunk::Bits(b) => b[w] |= bit,
            Chunk::Clear => {
                let mut b = Box::new([0u64; WORDS]);
                b[w] = bit;
                *chunk = Chunk::Bits(b);
            }
        }
        if let Chunk::Bits(b) = chunk {
            if b.iter().map(|x| u64::from(x.count_ones())).sum::<u64>() == len {
                *chunk = Chunk::Full;
            }
        }
        self.count.fetch_add(1, Relaxed);
        true
    }

    /// Poisons every page of the export.
    pub fn insert_all(&self) {
        let mut chunks = self.chunks.lock();
        chunks.iter_mut().for_each(|c| *c = Chunk::Full);
        self.count.store(self.pages, Relaxed);
    }

    /// Clears `page`; returns whether it was poisoned.
    pub fn remove(&self, page: u64) -> bool {
        if self.is_empty() || page >= self.pages {
            return false;
        }
        let (c, i) = ((page / CHUNK_PAGES) as usize, page % CHUNK_PAGES);
        let len = self.chunk_len(c);
        let mut chunks = self.chunks.lock();
        let chunk = &mut chunks[c];
        let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        match chunk {
            Chunk::Clear => return false,
            Chunk::Bits(b) if b[w] & bit == 0 => return false,
            Chunk::Bits(b) => {
                b[w] &= !bit;
                if b.iter().all(|&x| x == 0) {
                    *chunk = Chunk::Clear;
                }
            }
            Chunk::Full => {
                let mut b = Box::new([0u64; WORDS]);
                for p in 0..len {
                    b[(p / 64) as usize] |= 1 << (p % 64);
                }
                b[w] &= !bit;
                *chunk = if len == 1 {
                    Chunk::Clear
                } else {
                    Chunk::Bits(b)
                };
            }
        }
        self.count.fetch_sub(1, Relaxed);
        true
    }

    /// The poisoned pages as sorted, disjoint `[start, end)` ranges.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, e: u64| match out.last_mut() {
            Some(l) if l.1 == s => l.1 = e,
            _ => out.push((s, e)),
        };
        if self.is_empty() {
            return out;
        }
        let chunks = self.chunks.lock();
        for (c, chunk) in chunks.iter().enumerate() {
            let base = c as u64 * CHUNK_PAGES;
            match chunk {
                Chunk::Clear => {}
                Chunk::Full => push(base, base + self.chunk_len(c)),
                Chunk::Bits(b) => {
                    for i in 0..self.chunk_len(c) {
                        if b[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                            push(base + i, base + i + 1);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_count_and_ranges() {
        let p = Poison::new(CHUNK_PAGES * 2 + 10);
        assert!(p.is_empty() && !p.contains(5));
        assert!(p.insert(5) && !p.insert(5));
        assert!(p.insert(CHUNK_PAGES * 2 + 9));
        assert!(!p.insert(CHUNK_PAGES * 2 + 10), "out of range");
        assert_eq!(p.count(), 2);
        assert_eq!(
            p.ranges(),
            vec![(5, 6), (CHUNK_PAGES * 2 + 9, CHUNK_PAGES * 2 + 10)]
        );
        assert!(p.remove(5) && !p.remove(5) && !p.contains(5));
        assert_eq!(p.count(), 1);
    }

    #[test]
    fn whole_export_then_holes() {
        let pages = CHUNK_PAGES + 3;
        let p = Poison::new(pages);
        p.insert_all();
        assert_eq!(p.count(), pages);
        assert_eq!(p.ranges(), vec![(0, pages)]);
        assert!(p.contains(0) && p.contains(pages - 1) && !p.contains(pages));
        assert!(p.remove(7) && p.remove(CHUNK_PAGES + 1));
        assert!(!p.contains(7) && p.contains(8));
        assert_eq!(p.count(), pages - 2);
        assert_eq!(
            p.ranges(),
            vec![(0, 7), (8, CHUNK_PAGES + 1), (CHUNK_PAGES + 2, pages)]
        );
        // Clearing a short last chunk page by page ends clear; refilling makes it full.
        for i in CHUNK_PAGES..pages {
            p.remove(i);
        }
        assert_eq!(p.ranges().last(), Some(&(8, CHUNK_PAGES)));
        for i in CHUNK_PAGES..pages {
            assert!(p.insert(i));
        }
        assert!(matches!(p.chunks.lock()[1], Chunk::Full));
        assert_eq!(p.count(), pages - 1);
    }
}
