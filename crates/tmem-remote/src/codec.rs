//! The value format of one stored page.
//!
//! ```text
//! offset size field
//!      0    4 magic "TMRP"
//!      4    1 format version (1)
//!      5    1 flags: bit 0 = payload is LZ4 (block format), otherwise raw; other bits 0
//!      6    2 reserved, 0
//!      8    8 key hash: xxh3-64 of the full Redis key the value is stored under (LE)
//!     16    8 tag (LE)
//!     24    4 payload length (LE)
//!     28    4 crc32 of bytes 4..28 and of the payload (LE)
//!     32    … payload: the 4096-byte page, raw or LZ4-compressed
//! ```
//!
//! The key hash binds a value to its key: a value copied under another key (another page,
//! another space, another host's name) is rejected. The crc32 covers every header field
//! after the magic as well as the payload, so any change of up to 32 consecutive bits
//! anywhere in the value is detected. Decoding never panics and never returns a page that
//! is not exactly 4096 bytes.

use tmem_exports::remote::{RemoteError, REMOTE_PAGE};

/// The first four bytes of every value.
pub const MAGIC: [u8; 4] = *b"TMRP";
/// The format version written and accepted.
pub const VERSION: u8 = 1;
/// Flag: the payload is LZ4-compressed.
pub const FLAG_LZ4: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 32;

/// The hash that binds a value to its key.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[4..28]);
    h.update(payload);
    h.finalize()
}

/// Encodes `page` (exactly 4096 bytes) with `tag` for storage under `key`. With `compress`,
/// the payload is LZ4 when that is smaller than the raw page, raw otherwise.
pub fn encode(key: &[u8], tag: u64, page: &[u8], compress: bool) -> Result<Vec<u8>, RemoteError> {
    if page.len() != REMOTE_PAGE {
        return Err(RemoteError::Protocol(format!(
            "a page is {REMOTE_PAGE} bytes, not {}",
            page.len()
        )));
    }
    let mut out = vec![0u8; HEADER_LEN + REMOTE_PAGE];
    let mut flags = 0u8;
    let mut len = REMOTE_PAGE;
    if compress {
        // Only a result smaller than the raw page pays; the buffer limit enforces that.
        if let Ok(n) = lz4::block::compress_to_buffer(
            page,
            Some(lz4::block::CompressionMode::DEFAULT),
            false,
            &mut out[HEADER_LEN..HEADER_LEN + REMOTE_PAGE - 1],
        ) {
            if n > 0 && n < REMOTE_PAGE {
                flags = FLAG_LZ4;
                len = n;
            }
        }
    }
    if flags == 0 {
        out[HEADER_LEN..].copy_from_slice(page);
    }
    out.truncate(HEADER_LEN + len);
    out[0..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = flags;
    out[8..16].copy_from_slice(&key_hash(key).to_le_bytes());
    out[16..24].copy_from_slice(&tag.to_le_bytes());
    // len <= 4096 always fits.
    out[24..28].copy_from_slice(&(len as u32).to_le_bytes());
    let c = crc(&out[..HEADER_LEN], &out[HEADER_LEN..]);
    out[28..32].copy_from_slice(&c.to_le_bytes());
    Ok(out)
}

fn corrupt(why: &str) -> RemoteError {
    RemoteError::Corrupt(why.to_string())
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// Decodes a value stored under `key` into `out` (exactly 4096 bytes); returns its tag.
/// Anything malformed, or a value bound to another key, is [`RemoteError::Corrupt`].
pub fn decode_into(key: &[u8], value: &[u8], out: &mut [u8]) -> Result<u64, RemoteError> {
    if out.len() != REMOTE_PAGE {
        return Err(RemoteError::Protocol(format!(
            "the output buffer is {} bytes, not {REMOTE_PAGE}",
            out.len()
        )));
    }
    if value.len() < HEADER_LEN {
        return Err(corrupt("shorter than the header"));
    }
    let (header, payload) = value.split_at(HEADER_LEN);
    if header[0..4] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    if header[4] != VERSION {
        return Err(corrupt("unknown format version"));
    }
    let flags = header[5];
    if flags & !FLAG_LZ4 != 0 || header[6] != 0 || header[7] != 0 {
        return Err(corrupt("unknown flags"));
    }
    if le_u64(&header[8..16]) != key_hash(key) {
        return Err(corrupt("stored under another key"));
    }
    let tag = le_u64(&header[16..24]);
    let len = le_u32(&header[24..28]) as usize;
    if len != payload.len() {
        return Err(corrupt("payload length mismatch"));
    }
    if le_u32(&header[28..32]) != crc(header, payload) {
        return Err(corrupt("checksum mismatch"));
    }
    if flags & FLAG_LZ4 != 0 {
        match lz4::block::decompress_to_buffer(payload, Some(REMOTE_PAGE as i32), out) {
            Ok(REMOTE_PAGE) => {}
            _ => return Err(corrupt("does not decompress to one page")),
        }
    } else {
        if len != REMOTE_PAGE {
            return Err(corrupt("raw payload is not one page"));
        }
        out.copy_from_slice(payload);
    }
    Ok(tag)
}

/// [`decode_into`] a new 4096-byte buffer.
pub fn decode(key: &[u8], value: &[u8]) -> Result<(u64, Vec<u8>), RemoteError> {
    let mut out = vec![0u8; REMOTE_PAGE];
    let tag = decode_into(key, value, &mut out)?;
    Ok((tag, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_from(seed: u8, compressible: bool) -> Vec<u8> {
        // xorshift64 noise does not compress.
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
        (0..REMOTE_PAGE)
            .map(|i| {
                if compressible {
                    (i / 64) as u8 ^ seed
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_raw_and_compressed() {
        for compressible in [false, true] {
            for compress in [false, true] {
                let p = page_from(7, compressible);
                let v = encode(b"k1", 42, &p, compress).unwrap();
                assert_eq!(v[5] == FLAG_LZ4, compressible && compress);
                if compressible && compress {
                    assert!(v.len() < HEADER_LEN + REMOTE_PAGE);
                } else {
                    assert_eq!(v.len(), HEADER_LEN + REMOTE_PAGE);
                }
                let (tag, back) = decode(b"k1", &v).unwrap();
                assert_eq!(tag, 42);
                assert_eq!(back, p);
            }
        }
    }

    #[test]
    fn wrong_key_and_wrong_sizes_are_rejected() {
        let p = page_from(1, true);
        let v = encode(b"tmem:a:s:{x.0}:e:1", 3, &p, true).unwrap();
        assert!(matches!(
            decode(b"tmem:b:s:{x.0}:e:1", &v),
            Err(RemoteError::Corrupt(_))
        ));
        assert!(matches!(
            decode(b"tmem:a:s:{x.0}:e:2", &v),
            Err(RemoteError::Corrupt(_))
        ));
        assert!(encode(b"k", 0, &p[..100], true).is_err());
        let mut small = [0u8; 10];
        assert!(decode_into(b"tmem:a:s:{x.0}:e:1", &v, &mut small).is_err());
        assert!(matches!(decode(b"k", b""), Err(RemoteError::Corrupt(_))));
        assert!(matches!(
            decode(b"k", b"garbage that is long enough to be a header....."),
            Err(RemoteError::Corrupt(_))
        ));
    }

    #[test]
    fn raw_flag_forged_to_lz4_is_rejected() {
        let p = page_from(9, false);
        let mut v = encode(b"k", 1, &p, false).unwrap();
        v[5] = FLAG_LZ4;
        assert!(decode(b"k", &v).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(seed in any::<u8>(), compressible in any::<bool>(), compress in any::<bool>(),
                      tag in any::<u64>(), key in proptest::collection::vec(any::<u8>(), 0..80)) {
            let p = page_from(seed, compressible);
            let v = encode(&key, tag, &p, compress).unwrap();
            let (t, back) = decode(&key, &v).unwrap();
            prop_assert_eq!(t, tag);
            prop_assert_eq!(back, p);
        }

        #[test]
        fn every_single_byte_corruption_is_rejected(seed in any::<u8>(), compressible in any::<bool>(),
                                                    tag in any::<u64>(), delta in 1u8..=255) {
            let p = page_from(seed, compressible);
            let v = encode(b"key", tag, &p, true).unwrap();
            for i in 0..v.len() {
                let mut bad = v.clone();
                bad[i] ^= delta;
                prop_assert!(matches!(decode(b"key", &bad), Err(RemoteError::Corrupt(_))), "byte {}", i);
            }
        }

        #[test]
        fn every_truncation_and_extension_is_rejected(seed in any::<u8>(), compressible in any::<bool>(),
                                                      extra in proptest::collection::vec(any::<u8>(), 1..16)) {
            let p = page_from(seed, compressible);
            let v = encode(b"key", 5, &p, true).unwrap();
            for n in 0..v.len() {
                prop_assert!(matches!(decode(b"key", &v[..n]), Err(RemoteError::Corrupt(_))), "len {}", n);
            }
            let mut longer = v.clone();
            longer.extend_from_slice(&extra);
            prop_assert!(matches!(decode(b"key", &longer), Err(RemoteError::Corrupt(_))));
        }

        #[test]
        fn random_bytes_never_decode(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert!(decode(b"key", &bytes).is_err());
        }
    }
}
