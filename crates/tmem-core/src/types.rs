//! Identifiers, keys and pool kinds: the vocabulary of the engine's contract.

use std::fmt;

/// Size of one page in bytes. Every put and get moves exactly one page.
pub const PAGE_SIZE: usize = 4096;

/// One page of data.
pub type Page = [u8; PAGE_SIZE];

/// A tenant of the pool (one per guest): chosen by the caller, unique in an [`crate::Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

/// A pool handle, assigned by the engine when a pool is created or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub u32);

/// An object inside a pool (tmem's "object id": an inode, a swap type, a file handle...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ObjectId(pub [u64; 3]);

impl ObjectId {
    /// An object id made from a single number (the two other words are zero).
    pub const fn from_u64(v: u64) -> Self {
        ObjectId([v, 0, 0])
    }
}

/// Index of a page inside an object. 32 bits address 16 TiB per object, which is more than
/// a swap device or a file page cache needs; larger devices use several objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageIndex(pub u32);

/// The full address of a page: pool, object and index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey {
    /// The pool the page lives in.
    pub pool: PoolId,
    /// The object inside the pool.
    pub object: ObjectId,
    /// The page index inside the object.
    pub index: PageIndex,
}

impl PageKey {
    /// Builds a key from its parts.
    pub const fn new(pool: PoolId, object: ObjectId, index: u32) -> Self {
        PageKey {
            pool,
            object,
            index: PageIndex(index),
        }
    }
}

/// A 128-bit identifier that names a shared pool. Knowing it is not enough to join: the
/// client must also be authorized for it (see [`crate::Engine::authorize_shared`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolUuid(pub u128);

impl fmt::Debug for PoolUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolUuid({:032x})", self.0)
    }
}

/// Whether a pool's pages may be dropped by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Persistence {
    /// Pages may be evicted at any time (a get may miss) but are never stale.
    Ephemeral,
    /// Pages are kept until flushed; a put either succeeds or fails with a typed error.
    Persistent,
}

/// Whether a pool belongs to one client or is joined by several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sharing {
    /// Only the creating client can reach the pool.
    Private,
    /// Joined by UUID by every authorized client.
    Shared(PoolUuid),
}

/// What kind of data a get found (lets a frontend send zero pages as holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// The page is all zeros (stored without a data page).
    Zero,
    /// The page holds data.
    Data,
}
