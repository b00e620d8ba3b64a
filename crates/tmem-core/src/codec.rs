//! Page classification (zero / same-filled), hashing and compression.

use crate::config::Codec;
use crate::types::PAGE_SIZE;
use std::cell::RefCell;

/// What a page looks like before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Every 8-byte word equals this value (0 = zero page).
    Same(u64),
    /// Anything else.
    Data,
}

/// Reads the page as u64 words (native endian) and tells whether they are all equal.
pub(crate) fn classify(page: &[u8; PAGE_SIZE]) -> Shape {
    let mut words = page.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_ne_bytes(w)
    });
    let first = words.next().unwrap_or(0);
    // OR-fold of XOR differences: branch-free inner loop, vectorises well.
    let mut diff = 0u64;
    for w in words {
        diff |= w ^ first;
    }
    if diff == 0 {
        Shape::Same(first)
    } else {
        Shape::Data
    }
}

/// Fills a page with the given word pattern.
pub(crate) fn fill_same(out: &mut [u8; PAGE_SIZE], word: u64) {
    if word == 0 {
        out.fill(0);
        return;
    }
    let bytes = word.to_ne_bytes();
    for c in out.chunks_exact_mut(8) {
        c.copy_from_slice(&bytes);
    }
}

/// 64-bit content hash (xxh3) used by dedup, mixed with the dedup domain.
pub(crate) fn hash_page(page: &[u8; PAGE_SIZE], domain: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(page, domain)
}

thread_local! {
    static ZSTD_C: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `page` into `out` if the result is at most `limit` bytes; returns its length.
/// `None` means "store raw" (incompressible enough, or the codec failed).
pub(crate) fn compress(
    codec: Codec,
    page: &[u8; PAGE_SIZE],
    out: &mut [u8],
    limit: usize,
) -> Option<usize> {
    let limit = limit.min(out.len());
    match codec {
        Codec::None => None,
        Codec::Lz4 => lz4::block::compress_to_buffer(
            page,
            Some(lz4::block::CompressionMode::DEFAULT),
            false,
            &mut out[..limit],
        )
        .ok(),
        Codec::Zstd(level) => ZSTD_C.with(|cell| {
            let mut slot = cell.borrow_mut();
            let level = i32::from(level);
            if slot.as_ref().map(|(l, _)| *l) != Some(level) {
                *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
            }
            let (_, c) = slot.as_mut()?;
            c.compress_to_buffer(&page[..], &mut out[..limit]).ok()
        }),
    }
    .filter(|&n| n > 0 && n <= limit)
}

/// Decompresses `src` (stored with codec tag `tag`) into exactly one page.
/// Returns false if the data does not decompress to exactly one page.
pub(crate) fn decompress(tag: u8, src: &[u8], out: &mut [u8; PAGE_SIZE]) -> bool {
    match tag {
        0 => {
            if src.len() != PAGE_SIZE {
                return false;
            }
            out.copy_from_slice(src);
            true
        }
        1 => matches!(
            lz4::block::decompress_to_buffer(src, Some(PAGE_SIZE as i32), out),
            Ok(PAGE_SIZE)
        ),
        2 => ZSTD_D.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = zstd::bulk::Decompressor::new().ok();
            }
            match slot.as_mut() {
                Some(d) => matches!(d.decompress_to_buffer(src, &mut out[..]), Ok(PAGE_SIZE)),
                None => false,
            }
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_zero_same_data() {
        let mut p = [0u8; PAGE_SIZE];
        assert_eq!(classify(&p), Shape::Same(0));
        fill_same(&mut p, 0xdead_beef_0000_0001);
        assert_eq!(classify(&p), Shape::Same(0xdead_beef_0000_0001));
        p[4095] ^= 1;
        assert_eq!(classify(&p), Shape::Data);
    }

    #[test]
    fn codecs_round_trip_and_respect_limit() {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i % 251) as u8 ^ (i / 512) as u8;
        }
        for codec in [Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)] {
            let mut buf = [0u8; PAGE_SIZE];
            let n = compress(codec, &p, &mut buf, 3072).expect("compressible");
            let mut back = [0u8; PAGE_SIZE];
            assert!(decompress(codec.tag(), &buf[..n], &mut back));
            assert_eq!(back, p);
            // Corrupted input never yields a wrong page silently: either it fails or differs.
            assert!(!decompress(codec.tag(), &buf[..n / 2], &mut back) || back != p);
        }
        // Random data does not fit under the limit.
        let mut r = [0u8; PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in r.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut buf = [0u8; PAGE_SIZE];
        assert_eq!(compress(Codec::Lz4, &r, &mut buf, 3072), None);
    }
}
