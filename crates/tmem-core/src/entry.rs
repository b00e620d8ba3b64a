//! The 12-byte index entry of one page.

use crate::alloc::{class_of, class_size, Handle};
use crate::types::PAGE_SIZE;

/// Bytes charged per page for its index entry and queue slot, on top of its payload.
pub(crate) const ENTRY_COST: u64 = 32;

const KIND_MASK: u32 = 0b11;
const KIND_SAME: u32 = 0;
const KIND_STORED: u32 = 1;
const KIND_DEDUP: u32 = 2;
const REFERENCED: u32 = 1 << 2;
const CODEC_SHIFT: u32 = 3;
const LEN_SHIFT: u32 = 5;

/// One page's entry: a word (pattern, payload handle or dedup hash) and a packed tag word
/// (kind, referenced bit, codec, payload length). Packed to 12 bytes to keep the index
/// small: with the u32 page index, a hash-table slot is 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
pub(crate) struct Entry {
    w0: u64,
    w1: u32,
}

/// What an entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Every word of the page equals this.
    Same(u64),
    /// A payload of `len` bytes in codec `codec` at `handle`.
    Stored {
        handle: Handle,
        codec: u8,
        len: usize,
    },
    /// A deduplicated payload of `len` bytes, found in the dedup table under `hash`.
    Dedup { hash: u64, len: usize },
}

impl Entry {
    pub(crate) fn same(word: u64) -> Self {
        Entry {
            w0: word,
            w1: KIND_SAME,
        }
    }
    pub(crate) fn stored(handle: Handle, codec: u8, len: usize) -> Self {
        Entry {
            w0: handle.0,
            w1: KIND_STORED | (u32::from(codec) << CODEC_SHIFT) | ((len as u32) << LEN_SHIFT),
        }
    }
    pub(crate) fn dedup(hash: u64, len: usize) -> Self {
        Entry {
            w0: hash,
            w1: KIND_DEDUP | ((len as u32) << LEN_SHIFT),
        }
    }
    pub(crate) fn target(&self) -> Target {
        let w0 = self.w0;
        let w1 = self.w1;
        let len = ((w1 >> LEN_SHIFT) & 0x1fff) as usize;
        match w1 & KIND_MASK {
            KIND_STORED => Target::Stored {
                handle: Handle(w0),
                codec: ((w1 >> CODEC_SHIFT) & 0b11) as u8,
                len,
            },
            KIND_DEDUP => Target::Dedup { hash: w0, len },
            _ => Target::Same(w0),
        }
    }
    pub(crate) fn is_same(&self) -> bool {
        self.w1 & KIND_MASK == KIND_SAME
    }
    pub(crate) fn referenced(&self) -> bool {
        self.w1 & REFERENCED != 0
    }
    pub(crate) fn set_referenced(&mut self, on: bool) {
        if on {
            self.w1 |= REFERENCED;
        } else {
            self.w1 &= !REFERENCED;
        }
    }
    /// Bytes charged to the holder of this entry.
    pub(crate) fn charge(&self) -> u64 {
        match self.target() {
            Target::Same(_) => ENTRY_COST,
            Target::Stored { len, .. } | Target::Dedup { len, .. } => {
                ENTRY_COST + class_size(class_of(len)) as u64
            }
        }
    }
}

/// Charge of a payload of `len` bytes (0 for same-filled pages).
pub(crate) fn charge_for(len: Option<usize>) -> u64 {
    ENTRY_COST + len.map_or(0, |l| class_size(class_of(l.min(PAGE_SIZE))) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_small_and_round_trips() {
        assert_eq!(std::mem::size_of::<Entry>(), 12);
        assert_eq!(std::mem::size_of::<(u32, Entry)>(), 16);
        let h = Handle(0xf123_4567_89ab_cdef);
        let mut e = Entry::stored(h, 2, 4096);
        assert_eq!(
            e.target(),
            Target::Stored {
                handle: h,
                codec: 2,
                len: 4096
            }
        );
        e.set_referenced(true);
        assert!(e.referenced());
        assert_eq!(
            e.target(),
            Target::Stored {
                handle: h,
                codec: 2,
                len: 4096
            }
        );
        e.set_referenced(false);
        assert!(!e.referenced());
        assert_eq!(
            Entry::dedup(7, 1).target(),
            Target::Dedup { hash: 7, len: 1 }
        );
        assert_eq!(Entry::same(u64::MAX).target(), Target::Same(u64::MAX));
        assert!(Entry::same(0).is_same());
        assert_eq!(Entry::same(0).charge(), ENTRY_COST);
        assert_eq!(Entry::dedup(1, 100).charge(), ENTRY_COST + 112);
    }
}
