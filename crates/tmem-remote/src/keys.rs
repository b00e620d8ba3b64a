//! Key layout.
//!
//! `{prefix}:{node_name}:{space}:{<h>.<run>}:<kind>:<page>` where `<h>` is 16 hex digits of
//! xxh3-64 over `prefix:node_name:space`, `<run>` is `page / 64` in hex and `<kind>` is `e`
//! (ephemeral copy) or `d` (durable copy). The braces are a Redis Cluster hash tag: only
//! `<h>.<run>` is hashed, so the 64 consecutive pages of one run of one space, ephemeral and
//! durable, all live in one slot (one node), and a fetch of a run is one `MGET`. Prefix,
//! node name and space cannot contain `{`, so the tag is always the first brace pair.

use tmem_exports::remote::RemoteError;

/// Pages per run: the pages of one run share one hash slot.
pub const RUN_PAGES: u64 = 64;
/// Longest accepted space name, in bytes.
pub const MAX_SPACE_LEN: usize = 200;

/// Whether `space` is a valid space name: 1 to [`MAX_SPACE_LEN`] bytes of `[A-Za-z0-9/_.-]`.
pub fn valid_space(space: &str) -> bool {
    !space.is_empty()
        && space.len() <= MAX_SPACE_LEN
        && space
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'.' | b'-'))
}

/// Which copy a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An ephemeral copy (with a TTL).
    Ephemeral,
    /// A durable copy (no TTL).
    Durable,
}

/// Builds the keys of one space of one host.
#[derive(Debug, Clone)]
pub struct SpaceKeys {
    /// `prefix:node:space:`
    head: String,
    /// xxh3 of `prefix:node:space`.
    hash: u64,
}

impl SpaceKeys {
    /// The key builder for `space`, or an error if the name is invalid.
    pub fn new(prefix: &str, node: &str, space: &str) -> Result<Self, RemoteError> {
        if !valid_space(space) {
            return Err(RemoteError::Protocol(format!(
                "invalid space name {:?}",
                space.chars().take(64).collect::<String>()
            )));
        }
        let head = format!("{prefix}:{node}:{space}");
        let hash = xxhash_rust::xxh3::xxh3_64(head.as_bytes());
        Ok(Self {
            head: format!("{head}:"),
            hash,
        })
    }

    /// The key of `page`'s copy of `kind`.
    pub fn key(&self, kind: Kind, page: u64) -> String {
        let k = match kind {
            Kind::Ephemeral => 'e',
            Kind::Durable => 'd',
        };
        format!(
            "{}{{{:016x}.{:x}}}:{k}:{page:x}",
            self.head,
            self.hash,
            page / RUN_PAGES
        )
    }
}

/// The Redis Cluster hash slot of `key`: CRC16/XMODEM of its hash tag (or of the whole key
/// when it has none), modulo 16384. (`redis::cluster_routing::Slot` computes the same but
/// does not expose the number; the tests check both agree.)
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn space_validation() {
        assert!(valid_space("c/0b5c-uuid/3"));
        assert!(valid_space("s/export_1.x"));
        for bad in ["", "a b", "a{b", "a}b", "a:b", "é", &"x".repeat(201)] {
            assert!(!valid_space(bad), "{bad:?}");
            assert!(SpaceKeys::new("tmem", "h", bad).is_err());
        }
    }

    #[test]
    fn runs_share_a_slot_and_kinds_and_hosts_differ() {
        let a = SpaceKeys::new("tmem", "h1", "c/x/1").unwrap();
        let b = SpaceKeys::new("tmem", "h2", "c/x/1").unwrap();
        let k = a.key(Kind::Ephemeral, 130);
        assert!(k.starts_with("tmem:h1:c/x/1:{"), "{k}");
        assert!(k.ends_with("}:e:82"), "{k}");
        let s = slot_of(a.key(Kind::Ephemeral, 128).as_bytes());
        for p in 128..192 {
            assert_eq!(slot_of(a.key(Kind::Ephemeral, p).as_bytes()), s);
            assert_eq!(slot_of(a.key(Kind::Durable, p).as_bytes()), s);
        }
        assert_ne!(a.key(Kind::Ephemeral, 5), a.key(Kind::Durable, 5));
        assert_ne!(a.key(Kind::Ephemeral, 5), b.key(Kind::Ephemeral, 5));
        // Runs spread over slots.
        let slots: std::collections::HashSet<u16> = (0..64u64)
            .map(|r| slot_of(a.key(Kind::Ephemeral, r * RUN_PAGES).as_bytes()))
            .collect();
        assert!(slots.len() > 50);
    }

    #[test]
    fn slot_matches_redis_reference_values() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        // CRC16/XMODEM("123456789") = 0x31C3, below 16384.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        for k in ["a", "tmem:h:{x.1}:e:3", "{}x", "x{y"] {
            assert_eq!(
                slot_of(k.as_bytes()),
                Slot::for_key(k.as_bytes()).to_owned_debug_slot()
            );
        }
    }

    trait DebugSlot {
        fn to_owned_debug_slot(&self) -> u16;
    }
    impl DebugSlot for Slot {
        fn to_owned_debug_slot(&self) -> u16 {
            let s = format!("{self:?}");
            s.trim_start_matches("Slot(")
                .trim_end_matches(')')
                .parse()
                .unwrap()
        }
    }
}
