//! `resident`: what several guests of one distribution hold in memory.
//!
//! Guests cloned from one OS image with the same packages hold the same file contents in
//! memory (program text, libraries, data files), next to data of their own. This job
//! models both: it loads the files of a shared tree (`--src`, in sorted order, each file
//! starting on a page boundary, so that every guest that loads the same tree holds the
//! same pages) up to `--shared-mib`, and fills `--private-mib` with text-like data drawn
//! from `--seed` (different in every guest, compressible as text is). Then it holds both
//! until `--until FILE` exists, touching nothing, so that memory pressure from other jobs
//! pushes them out to swap, and at the end checks every page against what it loaded.

use std::path::Path;

use crate::rng::{mix, Rng};
use crate::{Opts, MIB, PAGE};

/// Words the private text is made of: enough variety that it is not trivially
/// compressible, few enough that it compresses like prose or logs.
const WORDS: [&str; 48] = [
    "the", "guest", "memory", "page", "swap", "pool", "host", "of", "and", "to", "a", "in", "is",
    "that", "for", "on", "with", "as", "was", "it", "by", "kernel", "cache", "data", "file",
    "block", "write", "read", "free", "balloon", "request", "error", "time", "value", "user",
    "process", "thread", "lock", "queue", "buffer", "device", "driver", "network", "packet",
    "disk", "log", "entry", "table",
];

/// A page-aligned region inside an over-allocated `Vec<u8>`.
struct Region {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Result<Self, String> {
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(len + PAGE)
            .map_err(|e| format!("allocating {} MiB: {e}", len / MIB))?;
        buf.resize(len + PAGE, 0);
        let off = buf.as_ptr().align_offset(PAGE).min(PAGE);
        Ok(Self { buf, off, len })
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Fills `page` with text-like content that depends only on `(seed, index)`.
pub fn private_page(seed: u64, index: u64, page: &mut [u8]) {
    let mut rng = Rng::new(mix(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut at = 0usize;
    while at < page.len() {
        let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes();
        for &b in w.iter().chain(std::iter::once(&b' ')) {
            if at == page.len() {
                break;
            }
            page[at] = b;
            at += 1;
        }
    }
}

/// Loads the files under `src` (sorted) page-aligned into `region`, up to its length.
/// Returns the number of files loaded and the bytes of file content.
fn load_shared(
    src: &Path,
    files: &[std::path::PathBuf],
    region: &mut Region,
) -> Result<(u64, u64), String> {
    let dst = region.bytes_mut();
    let mut at = 0usize;
    let mut loaded = 0u64;
    let mut content = 0u64;
    for rel in files {
        if at >= dst.len() {
            break;
        }
        let p = src.join(rel);
        let data = std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        let n = data.len().min(dst.len() - at);
        dst[at..at + n].copy_from_slice(&data[..n]);
        content += n as u64;
        loaded += 1;
        at += n.div_ceil(PAGE) * PAGE;
    }
    Ok((loaded, content))
}

/// FNV-1a of a page, for the end-of-run check of the shared region.
fn page_hash(page: &[u8]) -> u64 {
    page.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Runs the `resident` subcommand.
pub fn run(o: &Opts) -> Result<u8, String> {
    o.check_known(&["src", "shared-mib", "private-mib", "seed", "until"])?;
    let src = o.path("src")?;
    let until = o.path("until")?;
    let shared_mib = o.num("shared-mib", Some(32))?;
    let private_mib = o.num("private-mib", Some(32))?;
    let seed = o.num("seed", Some(1))?;
    let mib = |m: u64| {
        usize::try_from(m)
            .ok()
            .and_then(|m| m.checked_mul(MIB))
            .ok_or("size overflow")
    };
    let start = std::time::Instant::now();
    let files = crate::build::walk(&src)?;
    let mut shared = Region::new(mib(shared_mib)?)?;
    let (loaded, content) = load_shared(&src, &files, &mut shared)?;
    let hashes: Vec<u64> = shared.bytes().chunks(PAGE).map(page_hash).collect();
    let mut private = Region::new(mib(private_mib)?)?;
    for (i, page) in private.bytes_mut().chunks_mut(PAGE).enumerate() {
        private_page(seed, i as u64, page);
    }
    println!(
        "resident: loaded files={loaded} shared_bytes={content} shared_mib={shared_mib} private_mib={private_mib} seed={seed} ms={}",
        start.elapsed().as_millis()
    );
    while !until.exists() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let bad_shared = shared
        .bytes()
        .chunks(PAGE)
        .zip(&hashes)
        .filter(|(p, h)| page_hash(p) != **h)
        .count();
    let mut want = vec![0u8; PAGE];
    let bad_private = private
        .bytes()
        .chunks(PAGE)
        .enumerate()
        .filter(|(i, p)| {
            private_page(seed, *i as u64, &mut want[..p.len()]);
            *p != &want[..p.len()]
        })
        .count();
    println!(
        "resident: checked bad_shared_pages={bad_shared} bad_private_pages={bad_private} ms={}",
        start.elapsed().as_millis()
    );
    Ok(if bad_shared + bad_private == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_pages_depend_on_seed_and_index_only() {
        let mut a = vec![0u8; PAGE];
        let mut b = vec![0u8; PAGE];
        private_page(7, 3, &mut a);
        private_page(7, 3, &mut b);
        assert_eq!(a, b);
        private_page(8, 3, &mut b);
        assert_ne!(a, b);
        private_page(7, 4, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().all(|c| c.is_ascii_lowercase() || *c == b' '));
    }

    #[test]
    fn shared_files_start_on_page_boundaries() {
        let dir = std::env::temp_dir().join(format!("tmem-work-resident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), vec![1u8; 100]).unwrap();
        std::fs::write(dir.join("b"), vec![2u8; PAGE + 1]).unwrap();
        let files = crate::build::walk(&dir).unwrap();
        let mut r = Region::new(4 * PAGE).unwrap();
        assert_eq!(r.bytes().as_ptr() as usize % PAGE, 0);
        let (n, content) = load_shared(&dir, &files, &mut r).unwrap();
        assert_eq!((n, content), (2, 100 + PAGE as u64 + 1));
        let b = r.bytes();
        assert_eq!(b[99], 1);
        assert_eq!(b[100], 0);
        assert_eq!(b[PAGE], 2);
        assert_eq!(b[2 * PAGE], 2);
        assert_eq!(b[2 * PAGE + 1], 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
