//! The engine: clients, pools, put/get/flush, budget and eviction.

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};
use std::sync::Arc;

use crate::alloc::{Alloc, Arenas, CompactStep, Handle, SlotHeader};
use crate::codec::{self, Shape};
use crate::config::{ClientConfig, Codec, DedupScope, EngineConfig, PoolSpec};
use crate::dedup::{DedupTable, Found, Inserted, Payloads};
use crate::entry::{charge_for, Entry, Target};
use crate::error::{Error, Result};
use crate::shard::{ObjKey, Removed, Shard, GROUP_SHIFT};
use crate::sink::EvictionSink;
use crate::stats::{
    ClientStats, CompactionCounters, EngineStats, Gauges, OpStats, PoolStats, Striped,
};
use crate::types::*;

/// Most pages waiting for deferred compression before puts compress inline again.
const MAX_DEFERRED: usize = 1024;

/// Pages evicted per shard visit.
const EVICT_BATCH: usize = 32;

/// Payloads compaction may move to make room for one allocation under budget pressure.
const PRESSURE_COMPACT_MOVES: usize = 4096;

pub(crate) struct ClientInfo {
    pub(crate) id: ClientId,
    pub(crate) weight: AtomicU32,
    pub(crate) cap: AtomicU64,
    pub(crate) frozen: AtomicBool,
    pub(crate) ops: Striped,
    pub(crate) eph: Gauges,
    pub(crate) pers: Gauges,
    /// Set while a live save runs: keys put or flushed meanwhile.
    pub(crate) save_log: Mutex<Option<BTreeSet<PageKey>>>,
    pub(crate) saving: AtomicBool,
}

pub(crate) struct PoolInfo {
    pub(crate) id: PoolId,
    pub(crate) spec: PoolSpec,
    /// The client charged for the pool's pages (its creator).
    pub(crate) owner: Arc<ClientInfo>,
    /// Clients that joined a shared pool (the owner included).
    pub(crate) members: RwLock<BTreeSet<ClientId>>,
    pub(crate) ops: Striped,
    pub(crate) held: Gauges,
    pub(crate) dedup_domain: Option<u64>,
    /// Set by [`Engine::destroy_pool`] before it sweeps the shards. A put that resolved
    /// the pool earlier checks it under the shard lock, so it cannot insert into a shard
    /// the sweep has already visited (the page would be orphaned: charged, never freed).
    pub(crate) dead: AtomicBool,
    /// Durable pools: the tag their slots carry ([`crate::durable_tag`] of the label).
    pub(crate) durable_tag: u32,
}

impl PoolInfo {
    fn persistent(&self) -> bool {
        self.spec.persistence == Persistence::Persistent
    }
    fn exclusive(&self) -> bool {
        self.spec.persistence == Persistence::Ephemeral
            && self.spec.sharing == Sharing::Private
            && self.spec.exclusive_gets
    }
    fn gauges_of_owner(&self) -> &Gauges {
        if self.persistent() {
            &self.owner.pers
        } else {
            &self.owner.eph
        }
    }
    fn queue_client(&self) -> Option<u32> {
        (!self.persistent()).then_some(self.owner.id.0)
    }
}

#[derive(Default)]
struct Admin {
    next_pool: u32,
    /// Shared pools by UUID.
    shared: BTreeMap<PoolUuid, PoolId>,
    /// Who may join which shared pool.
    authorized: BTreeMap<PoolUuid, BTreeSet<ClientId>>,
}

type Table<K, V> = ArcSwap<FxHashMap<K, Arc<V>>>;

/// The transcendent memory pool engine. Cheap to share (`Send + Sync`); see the crate docs
/// for the contract.
pub struct Engine {
    budget: AtomicU64,
    threshold: usize,
    shards: Box<[Mutex<Shard>]>,
    eph_store: Arenas,
    pers_store: Arenas,
    dedup: DedupTable,
    pools: Table<u32, PoolInfo>,
    clients: Table<u32, ClientInfo>,
    admin: Mutex<Admin>,
    ops: Striped,
    meta: AtomicI64,
    evict_cursor: AtomicUsize,
    /// Serialises evictors so that two puts do not both empty the pool for one page.
    evict_lock: Mutex<()>,
    /// Deferral fraction of the budget (0 = compress at put time).
    defer_below: f64,
    /// Pages stored raw, waiting to be compressed (striped queues).
    deferred: Box<[Mutex<std::collections::VecDeque<Deferred>>]>,
    deferred_count: AtomicUsize,
    deferred_cursor: AtomicUsize,
    /// What compaction has done so far.
    compaction: CompactionCounters,
    /// Write sequence of durable slots (see [`Engine::with_durable`]).
    seq: AtomicU64,
    /// Eviction sinks of ephemeral pools (see [`Engine::set_eviction_sink`]).
    sinks: ArcSwap<FxHashMap<u32, Arc<dyn EvictionSink>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("budget", &self.budget())
            .field("held", &self.held_bytes())
            .finish()
    }
}

impl Payloads for Engine {
    fn arenas(&self, h: Handle) -> &Arenas {
        if h.arena() >= 8 {
            &self.pers_store
        } else {
            &self.eph_store
        }
    }
}

/// Bumps a counter in the global, pool and client stripes at once.
struct Bump<'a>([&'a crate::stats::OpCounters; 3]);

impl Bump<'_> {
    fn add(&self, f: impl Fn(&crate::stats::OpCounters) -> &AtomicU64) {
        for c in self.0 {
            f(c).fetch_add(1, Relaxed);
        }
    }
}

/// How a data payload was stored before it is put in the index.
struct Prepared {
    entry: Entry,
    charge: u64,
    /// Stored raw now, to be compressed later by [`Engine::compress_deferred`].
    deferred: bool,
}

/// A page stored raw whose compression was put off.
enum Deferred {
    /// A plain entry, found again by its key.
    Entry {
        shard: u32,
        key: ObjKey,
        index: u32,
        codec: Codec,
    },
    /// A dedup record, found again by its hash.
    Rec { hash: u64, codec: Codec },
}

impl Engine {
    /// Creates an empty engine.
    pub fn new(cfg: EngineConfig) -> Self {
        Self::build(cfg, None)
    }

    /// Creates an empty engine whose persistent pages live in `mem`, memory that outlives
    /// the process (files in a tmpfs, memfds): every payload of a persistent pool is written
    /// there behind a checksummed header naming its page, before the put returns, so a new
    /// process finds every acknowledged page again after this one was killed
    /// ([`Engine::recover`]).
    ///
    /// Persistent pools of such an engine do not deduplicate (a payload names one page),
    /// keep same-filled pages other than zero as data, compress at put time, and accept
    /// only objects whose id is a single word ([`ObjectId::from_u64`]). Zero pages are kept
    /// in the index alone: a page missing after recovery reads as zero, which is what it held.
    pub fn with_durable(cfg: EngineConfig, mem: Arc<dyn crate::DurableMemory>) -> Self {
        Self::build(cfg, Some(mem))
    }

    fn build(cfg: EngineConfig, mem: Option<Arc<dyn crate::DurableMemory>>) -> Self {
        let n = cfg.shards.clamp(1, 1 << 16).next_power_of_two();
        let pers_store = match mem {
            Some(m) => Arenas::durable(cfg.arenas, 8, m),
            None => Arenas::new(cfg.arenas, 8, cfg.huge_pages),
        };
        Engine {
            budget: AtomicU64::new(cfg.budget),
            threshold: cfg.compress_threshold.clamp(1, PAGE_SIZE - 1),
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            eph_store: Arenas::new(cfg.arenas, 0, cfg.huge_pages),
            pers_store,
            dedup: DedupTable::new(n),
            pools: ArcSwap::from_pointee(FxHashMap::default()),
            clients: ArcSwap::from_pointee(FxHashMap::default()),
            admin: Mutex::new(Admin {
                next_pool: 1,
                ..Default::default()
            }),
            ops: Striped::default(),
            meta: AtomicI64::new(0),
            evict_cursor: AtomicUsize::new(0),
            evict_lock: Mutex::new(()),
            sinks: ArcSwap::from_pointee(FxHashMap::default()),
            defer_below: cfg.defer_compression_below.clamp(0.0, 1.0),
            deferred: (0..8)
                .map(|_| Mutex::new(std::collections::VecDeque::new()))
                .collect(),
            deferred_count: AtomicUsize::new(0),
            deferred_cursor: AtomicUsize::new(0),
            compaction: CompactionCounters::default(),
            seq: AtomicU64::new(1),
        }
    }

    // ----- clients -------------------------------------------------------------------------

    /// Registers a client.
    pub fn add_client(&self, id: ClientId, cfg: ClientConfig) -> Result<()> {
        let _a = self.admin.lock();
        if self.clients.load().contains_key(&id.0) {
            return Err(Error::ClientExists(id));
        }
        let info = Arc::new(ClientInfo {
            id,
            weight: AtomicU32::new(cfg.weight),
            cap: AtomicU64::new(cfg.persistent_cap),
            frozen: AtomicBool::new(false),
            ops: Striped::default(),
            eph: Gauges::default(),
            pers: Gauges::default(),
            save_log: Mutex::new(None),
            saving: AtomicBool::new(false),
        });
        self.clients.rcu(|t| {
            let mut t = FxHashMap::clone(t);
            t.insert(id.0, info.clone());
            t
        });
        Ok(())
    }

    /// Removes a client: destroys the pools it owns and leaves the shared pools it joined.
    pub fn remove_client(&self, id: ClientId) -> Result<()> {
        self.client(id)?;
        let pools: Vec<Arc<PoolInfo>> = self.pools.load().values().cloned().collect();
        for p in pools {
            if p.members.read().contains(&id) {
                let _ = self.destroy_pool(id, p.id);
            }
        }
        for set in self.admin.lock().authorized.values_mut() {
            set.remove(&id);
        }
        self.clients.rcu(|t| {
            let mut t = FxHashMap::clone(t);
            t.remove(&id.0);
            t
        });
        Ok(())
    }

    fn client(&self, id: ClientId) -> Result<Arc<ClientInfo>> {
        self.clients
            .load()
            .get(&id.0)
            .cloned()
            .ok_or(Error::UnknownClient(id))
    }

    /// Sets a client's weight (its share of ephemeral capacity relative to the others).
    pub fn set_weight(&self, id: ClientId, weight: u32) -> Result<()> {
        self.client(id)?.weight.store(weight, Relaxed);
        Ok(())
    }

    /// Sets a client's cap on persistent bytes (`u64::MAX` = none). Pages already held are
    /// kept; new persistent puts are refused while the client is over the cap.
    pub fn set_persistent_cap(&self, id: ClientId, cap: u64) -> Result<()> {
        self.client(id)?.cap.store(cap, Relaxed);
        Ok(())
    }

    /// Freezes a client: new puts are refused with [`Error::Frozen`]; gets and flushes work.
    pub fn freeze(&self, id: ClientId) -> Result<()> {
        self.client(id)?.frozen.store(true, Relaxed);
        Ok(())
    }

    /// Thaws a frozen client.
    pub fn thaw(&self, id: ClientId) -> Result<()> {
        self.client(id)?.frozen.store(false, Relaxed);
        Ok(())
    }

    /// Ids of all clients.
    pub fn clients(&self) -> Vec<ClientId> {
        let mut v: Vec<ClientId> = self.clients.load().values().map(|c| c.id).collect();
        v.sort();
        v
    }

    // ----- pools ---------------------------------------------------------------------------

    /// Authorizes `client` to join the shared pool `uuid` (shared pools are deny-by-default).
    pub fn authorize_shared(&self, uuid: PoolUuid, client: ClientId) {
        self.admin
            .lock()
            .authorized
            .entry(uuid)
            .or_default()
            .insert(client);
    }

    /// Withdraws an authorization (clients that joined already stay members).
    pub fn revoke_shared(&self, uuid: PoolUuid, client: ClientId) {
        if let Some(s) = self.admin.lock().authorized.get_mut(&uuid) {
            s.remove(&client);
        }
    }

    /// Creates a pool for `client`, or — for a shared spec — joins the shared pool with that
    /// UUID (creating it if it does not exist yet). Joining requires an authorization; a
    /// failed join is an error, never a silent private pool. Shared persistent pools are
    /// refused ([`Error::Unsupported`]): persistence needs one owner to cap and to save.
    pub fn create_pool(&self, client: ClientId, spec: PoolSpec) -> Result<PoolId> {
        let owner = self.client(client)?;
        if spec.label.len() > 255 {
            return Err(Error::Unsupported("pool label longer than 255 bytes"));
        }
        if let Codec::Zstd(l) = spec.codec {
            if !(1..=19).contains(&l) {
                return Err(Error::Unsupported("zstd level must be 1..=19"));
            }
        }
        let mut admin = self.admin.lock();
        if let Sharing::Shared(uuid) = spec.sharing {
            if spec.persistence == Persistence::Persistent {
                return Err(Error::Unsupported("shared persistent pools"));
            }
            if !admin
                .authorized
                .get(&uuid)
                .is_some_and(|s| s.contains(&client))
            {
                return Err(Error::NotAuthorized { client, uuid });
            }
            if let Some(&id) = admin.shared.get(&uuid) {
                let pools = self.pools.load();
                let Some(p) = pools.get(&id.0) else {
                    return Err(Error::UnknownPool(id));
                };
                if p.spec.codec != spec.codec || p.spec.dedup != spec.dedup {
                    return Err(Error::SpecMismatch(uuid));
                }
                p.members.write().insert(client);
                return Ok(id);
            }
        }
        if admin.next_pool == u32::MAX {
            return Err(Error::TooManyPools);
        }
        let id = PoolId(admin.next_pool);
        admin.next_pool += 1;
        let mut spec = spec;
        let mut durable_tag = 0;
        if self.pers_store.is_durable() && spec.persistence == Persistence::Persistent {
            // A durable payload names exactly one page, by a tag that outlives this
            // process: its pool's label.
            spec.dedup = DedupScope::Off;
            durable_tag = crate::recover::durable_tag(&spec.label);
            if self
                .pools
                .load()
                .values()
                .any(|p| p.durable_tag == durable_tag && self.durable(p))
            {
                admin.next_pool -= 1;
                return Err(Error::Unsupported(
                    "a durable pool with this label (or a label of the same tag) exists",
                ));
            }
        }
        let dedup_domain = match spec.dedup {
            DedupScope::Off => None,
            DedupScope::Pool => Some((1 << 62) | u64::from(id.0)),
            DedupScope::Client => Some((2 << 62) | u64::from(client.0)),
            DedupScope::Global => Some(3 << 62),
        };
        if let Sharing::Shared(uuid) = spec.sharing {
            admin.shared.insert(uuid, id);
        }
        let info = Arc::new(PoolInfo {
            id,
            spec,
            owner,
            members: RwLock::new([client].into_iter().collect()),
            ops: Striped::default(),
            held: Gauges::default(),
            dedup_domain,
            dead: AtomicBool::new(false),
            durable_tag,
        });
        self.pools.rcu(|t| {
            let mut t = FxHashMap::clone(t);
            t.insert(id.0, info.clone());
            t
        });
        Ok(id)
    }

    /// Destroys a pool (flushing all its pages). For a shared pool this only removes the
    /// client from it; the pool is destroyed when its last member leaves. Puts racing the
    /// destroy either land before it and are flushed with the pool, or are refused with
    /// [`Error::UnknownPool`]; none is left behind.
    pub fn destroy_pool(&self, client: ClientId, pool: PoolId) -> Result<()> {
        let p = self.pool_for(client, pool)?;
        if let Sharing::Shared(uuid) = p.spec.sharing {
            let mut m = p.members.write();
            m.remove(&client);
            if !m.is_empty() {
                return Ok(());
            }
            drop(m);
            self.admin.lock().shared.remove(&uuid);
        }
        self.pools.rcu(|t| {
            let mut t = FxHashMap::clone(t);
            t.remove(&pool.0);
            t
        });
        if self.sinks.load().contains_key(&pool.0) {
            self.sinks.rcu(|t| {
                let mut t = FxHashMap::clone(t);
                t.remove(&pool.0);
                t
            });
        }
        // No new op can reach the pool now, and a put that resolved it before sees `dead`
        // under the shard lock: either its insert comes before the sweep of that shard
        // (and is swept) or it is refused. Drop the pool's pages.
        p.dead.store(true, std::sync::atomic::Ordering::Release);
        for s in 0..self.shards.len() {
            let mut removed = Vec::new();
            {
                let mut shard = self.shards[s].lock();
                for key in shard.objects_of(pool.0) {
                    let (r, d) = shard.remove_object(&key, p.queue_client());
                    self.meta.fetch_add(d, Relaxed);
                    removed.extend(r);
                }
            }
            let n = removed.len() as u64;
            for r in removed {
                self.release(&p, r, s);
            }
            p.ops.at(s).flushes.fetch_add(n, Relaxed);
        }
        // A pool going away is the moment to hand spare page slabs back as well.
        self.trim();
        Ok(())
    }

    /// Resolves a pool for a client in a loaded table snapshot, checking access, without
    /// touching the pool's reference count (the hot paths use this).
    fn access<'a>(
        &self,
        pools: &'a FxHashMap<u32, Arc<PoolInfo>>,
        client: ClientId,
        pool: PoolId,
    ) -> Result<&'a PoolInfo> {
        let p = pools.get(&pool.0).ok_or(Error::UnknownPool(pool))?;
        match p.spec.sharing {
            Sharing::Private if p.owner.id == client => return Ok(p),
            Sharing::Shared(_) if p.members.read().contains(&client) => return Ok(p),
            _ => {}
        }
        if !self.clients.load().contains_key(&client.0) {
            return Err(Error::UnknownClient(client));
        }
        Err(Error::AccessDenied { client, pool })
    }

    /// Resolves a pool for a client, checking access.
    fn pool_for(&self, client: ClientId, pool: PoolId) -> Result<Arc<PoolInfo>> {
        let p = self
            .pools
            .load()
            .get(&pool.0)
            .cloned()
            .ok_or(Error::UnknownPool(pool))?;
        match p.spec.sharing {
            Sharing::Private if p.owner.id == client => return Ok(p),
            Sharing::Shared(_) if p.members.read().contains(&client) => return Ok(p),
            _ => {}
        }
        if !self.clients.load().contains_key(&client.0) {
            return Err(Error::UnknownClient(client));
        }
        Err(Error::AccessDenied { client, pool })
    }

    /// The specification a pool was created with.
    pub fn pool_spec(&self, client: ClientId, pool: PoolId) -> Result<PoolSpec> {
        Ok(self.pool_for(client, pool)?.spec.clone())
    }

    /// Pools a client can reach (owned or joined), with their labels.
    pub fn pools_of(&self, client: ClientId) -> Vec<(PoolId, String)> {
        let mut v: Vec<(PoolId, String)> = self
            .pools
            .load()
            .values()
            .filter(|p| p.members.read().contains(&client))
            .map(|p| (p.id, p.spec.label.clone()))
            .collect();
        v.sort();
        v
    }

    // ----- data path -----------------------------------------------------------------------

    fn shard_of(key: &PageKey) -> usize {
        let mut h = u64::from(key.pool.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for w in key.object.0 {
            h = (h ^ w).wrapping_mul(0x2545_f491_4f6c_dd1d);
        }
        h ^= u64::from(key.index.0 >> GROUP_SHIFT);
        h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 40) as usize
    }

    fn shard_idx(&self, key: &PageKey) -> usize {
        Self::shard_of(key) & (self.shards.len() - 1)
    }

    /// Bytes held right now: allocator frames and tables plus index and dedup metadata.
    pub fn held_bytes(&self) -> u64 {
        self.eph_store.held_bytes() + self.pers_store.held_bytes() + self.index_meta_bytes()
    }

    fn index_meta_bytes(&self) -> u64 {
        (self.meta.load(Relaxed) + self.dedup.meta.load(Relaxed)).max(0) as u64
    }

    /// Bytes the kernel really charges for the engine's memory: the resident pages of the
    /// allocator's regions, asked from the kernel (`mincore`), plus the tables on the heap
    /// (index, dedup and allocator tables, counted by their capacity). Costs one system
    /// call per 2 MiB region: call it for statistics, not per operation.
    pub fn resident_bytes(&self) -> u64 {
        let regions = self.eph_store.resident_bytes() + self.pers_store.resident_bytes();
        let ea = self.eph_store.stats();
        let pa = self.pers_store.stats();
        regions + ea.table_bytes + pa.table_bytes + self.index_meta_bytes()
    }

    /// Bytes that compaction could give back now.
    pub fn compactable_bytes(&self) -> u64 {
        self.eph_store.compactable_bytes() + self.pers_store.compactable_bytes()
    }

    /// Compacts the allocator: moves up to `max_moves` payloads out of sparsely used slabs
    /// into fuller slabs of the same size class and gives the emptied slabs' memory back to
    /// the kernel at once. Runs concurrently with every other operation, in steps of at most
    /// 64 moves under one allocator lock; pages keep their content and their keys. Also
    /// triggered by [`Engine::shrink`], [`Engine::set_budget`] and budget pressure on puts.
    pub fn compact(&self, max_moves: usize) -> CompactStep {
        let mut step = self.eph_store.compact(max_moves);
        let left = max_moves.saturating_sub(step.moved as usize);
        if left > 0 {
            let p = self.pers_store.compact(left);
            step.moved += p.moved;
            step.slabs_freed += p.slabs_freed;
            step.bytes_freed += p.bytes_freed;
        }
        self.compaction.record(&step);
        step
    }

    /// Compacts until nothing more can be freed this way or the engine holds at most
    /// `goal` bytes; returns what was done.
    fn compact_until(&self, goal: u64, max_moves: usize) -> CompactStep {
        let mut total = CompactStep::default();
        while self.held_bytes() > goal && (total.moved as usize) < max_moves {
            if self.compactable_bytes() == 0 {
                break;
            }
            let s = self.compact(1024.min(max_moves - total.moved as usize));
            total.moved += s.moved;
            total.slabs_freed += s.slabs_freed;
            total.bytes_freed += s.bytes_freed;
            if s.moved == 0 && s.slabs_freed == 0 {
                break;
            }
        }
        total
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget.load(Relaxed)
    }

    /// Sets the budget. If the engine holds more than the new budget, ephemeral pages are
    /// evicted at once until it fits (persistent pages are never dropped). Returns the
    /// bytes released.
    pub fn set_budget(&self, bytes: u64) -> u64 {
        self.budget.store(bytes, Relaxed);
        let held = self.held_bytes();
        if held > bytes {
            self.shrink(held - bytes)
        } else {
            0
        }
    }

    /// Releases at least `bytes` of memory at once if it can, by evicting ephemeral pages
    /// (oldest first, from the clients most above their weighted share). Returns the bytes
    /// actually released. Does not change the budget.
    pub fn shrink(&self, bytes: u64) -> u64 {
        let before = self.held_bytes();
        let goal = before.saturating_sub(bytes);
        let _g = self.evict_lock.lock();
        self.trim();
        // Compaction gives memory back without dropping a page: it goes first. Evicting
        // leaves holes in slabs, so compaction follows every batch of evictions too.
        self.compact_until(goal, usize::MAX);
        while self.held_bytes() > goal {
            if self.evict_some(EVICT_BATCH * 4) == 0 {
                break;
            }
            self.trim();
            self.compact_until(goal, usize::MAX);
        }
        before.saturating_sub(self.held_bytes())
    }

    /// Hands the allocator's spare page slabs (kept to recycle raw pages without page
    /// faults, at most 256 KiB per arena) back to the system; returns the bytes released.
    pub fn trim(&self) -> u64 {
        self.eph_store.drop_spares() + self.pers_store.drop_spares()
    }

    /// Bytes that could be given back now by dropping every ephemeral page (the ephemeral
    /// arenas plus an estimate of their index entries).
    pub fn freeable_bytes(&self) -> u64 {
        let eph_pages: u64 = self
            .clients
            .load()
            .values()
            .map(|c| c.eph.snapshot().pages)
            .sum();
        self.eph_store.held_bytes() + eph_pages * crate::entry::ENTRY_COST / 2
    }

    /// Clients holding ephemeral pages, the one most above its weighted share first
    /// (largest ephemeral usage per unit of weight; weight 0 counts as infinitely above).
    fn victims(&self) -> Vec<Arc<ClientInfo>> {
        let clients = self.clients.load();
        let mut v: Vec<(f64, &Arc<ClientInfo>)> = clients
            .values()
            .filter(|c| c.eph.pages() > 0)
            .map(|c| {
                let used = c.eph.charged().max(1) as f64;
                let w = f64::from(c.weight.load(Relaxed));
                (if w == 0.0 { f64::INFINITY } else { used / w }, c)
            })
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        v.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// Evicts up to `max` ephemeral pages, from the client most above its share first;
    /// moves on to the next client only if the first has nothing evictable (its queues
    /// hold only stale or just-referenced items, which a second pass takes). Returns how
    /// many pages were evicted.
    fn evict_some(&self, max: usize) -> usize {
        for victim in self.victims() {
            for _pass in 0..2 {
                let done = self.evict_from(&victim, max);
                if done > 0 {
                    return done;
                }
            }
        }
        0
    }

    fn evict_from(&self, victim: &ClientInfo, max: usize) -> usize {
        let pools = self.pools.load_full();
        let evictable = |pool: u32| {
            pools
                .get(&pool)
                .is_some_and(|p| !p.persistent() && p.owner.id == victim.id)
        };
        let n = self.shards.len();
        let start = self.evict_cursor.fetch_add(1, Relaxed);
        let mut done = 0;
        for i in 0..n {
            if done >= max {
                break;
            }
            let s = (start + i) & (n - 1);
            let removed = {
                let mut shard = self.shards[s].lock();
                let (removed, d) =
                    shard.evict(victim.id.0, EVICT_BATCH.min(max - done), &evictable);
                self.meta.fetch_add(d, Relaxed);
                // Sinks see each page before the shard is unlocked: a flush of the key
                // (e.g. a writer invalidating it) cannot complete in between.
                let sinks = self.sinks.load();
                if !sinks.is_empty() {
                    for (okey, index, r) in &removed {
                        if let Some(sink) = sinks.get(&okey.pool) {
                            self.hand_to_sink(sink.as_ref(), *okey, *index, r);
                        }
                    }
                }
                removed
            };
            done += removed.len();
            for (okey, _, r) in removed {
                let pool = okey.pool;
                if let Some(p) = pools.get(&pool) {
                    p.ops.at(s).evictions.fetch_add(1, Relaxed);
                    victim.ops.at(s).evictions.fetch_add(1, Relaxed);
                    self.ops.at(s).evictions.fetch_add(1, Relaxed);
                    self.release(p, r, s);
                }
            }
        }
        done
    }

    /// Decodes an evicted entry and gives it to its pool's sink (a page that fails to
    /// decode is dropped with a log line, as a get would).
    fn hand_to_sink(&self, sink: &dyn EvictionSink, okey: ObjKey, index: u32, r: &Removed) {
        let mut page: Page = [0u8; PAGE_SIZE];
        if !self.decode(&r.entry, &mut page) {
            tracing::error!(
                pool = okey.pool,
                index,
                "evicted page failed to decode; not handed on"
            );
            return;
        }
        let key = PageKey::new(PoolId(okey.pool), ObjectId(okey.oid), index);
        sink.evicted(key, &page);
    }

    /// Copies an entry's page into `out`; `false` if its stored form does not decode.
    fn decode(&self, e: &Entry, out: &mut Page) -> bool {
        match e.target() {
            Target::Same(w) => {
                codec::fill_same(out, w);
                true
            }
            Target::Stored {
                handle,
                codec: tag,
                len,
            } => self
                .arenas(handle)
                .with(handle, len, |b| codec::decompress(tag, b, out))
                .unwrap_or(false),
            Target::Dedup { hash, .. } => self.dedup.read(self, hash, out),
        }
    }

    /// Sets (or with `None` removes) the eviction sink of an ephemeral pool `client` has
    /// access to: every page evicted from the pool from now on is handed to it (see
    /// [`EvictionSink`]). Persistent pools are never evicted and are refused.
    pub fn set_eviction_sink(
        &self,
        client: ClientId,
        pool: PoolId,
        sink: Option<Arc<dyn EvictionSink>>,
    ) -> Result<()> {
        let pools = self.pools.load();
        let p = self.access(&pools, client, pool)?;
        if p.persistent() {
            return Err(Error::Unsupported("an eviction sink on a persistent pool"));
        }
        self.sinks.rcu(|t| {
            let mut t = FxHashMap::clone(t);
            match &sink {
                Some(s) => t.insert(pool.0, Arc::clone(s)),
                None => t.remove(&pool.0),
            };
            t
        });
        Ok(())
    }

    /// Releases a removed entry's storage and uncharges it. Returns bytes released.
    fn release(&self, p: &PoolInfo, r: Removed, stripe: usize) -> u64 {
        let e = r.entry;
        let charge = e.charge() as i64;
        let same = i64::from(e.is_same());
        p.held.add(stripe, -1, -same, -charge);
        p.gauges_of_owner().add(stripe, -1, -same, -charge);
        match e.target() {
            Target::Same(_) => 0,
            Target::Stored { handle, len, .. } => self.arenas(handle).free(handle, len),
            Target::Dedup { hash, .. } => self.dedup.unref(self, hash),
        }
    }

    /// Stores `data` in the arena set for `persistent`, evicting ephemeral pages if the
    /// budget requires it.
    fn alloc_room(
        &self,
        data: &[u8],
        persistent: bool,
        hdr: Option<&SlotHeader>,
    ) -> Result<Handle> {
        let store = if persistent {
            &self.pers_store
        } else {
            &self.eph_store
        };
        let need = store.slab_cost_for(data.len());
        loop {
            let can_grow = self.held_bytes() + need <= self.budget();
            match store.alloc_with(data, can_grow, hdr) {
                Alloc::Done(h) => return Ok(h),
                Alloc::OutOfMemory => {
                    tracing::warn!("the kernel refused to map memory for the pool");
                    return Err(Error::NoSpace);
                }
                Alloc::NeedsGrowth(need) => {
                    let _g = self.evict_lock.lock();
                    // Another thread may have made room meanwhile.
                    if self.held_bytes() + need <= self.budget() {
                        continue;
                    }
                    if let Alloc::Done(h) = store.alloc_with(data, false, hdr) {
                        return Ok(h);
                    }
                    // Under pressure, spare slabs go back and slabs are compacted before
                    // anything is evicted.
                    if self.trim() > 0 {
                        continue;
                    }
                    let goal = self.budget().saturating_sub(need);
                    if self.compact_until(goal, PRESSURE_COMPACT_MOVES).bytes_freed > 0 {
                        continue;
                    }
                    if self.evict_some(EVICT_BATCH) == 0 {
                        return Err(Error::NoSpace);
                    }
                }
            }
        }
    }

    /// Makes sure `extra` metadata bytes fit, evicting if needed.
    fn room_for_meta(&self, extra: u64) -> Result<()> {
        while self.held_bytes() + extra > self.budget() {
            let _g = self.evict_lock.lock();
            if self.held_bytes() + extra <= self.budget() {
                break;
            }
            if self.trim() > 0 {
                continue;
            }
            let goal = self.budget().saturating_sub(extra);
            if self.compact_until(goal, PRESSURE_COMPACT_MOVES).bytes_freed > 0 {
                continue;
            }
            if self.evict_some(EVICT_BATCH) == 0 {
                return Err(Error::NoSpace);
            }
        }
        Ok(())
    }

    /// Compresses (if it pays) and stores a data page outside the dedup table.
    fn store_data(
        &self,
        p: &PoolInfo,
        page: &Page,
        hdr: Option<SlotHeader>,
    ) -> Result<(Handle, u8, usize)> {
        let mut buf = [0u8; PAGE_SIZE];
        let (bytes, tag): (&[u8], u8) = if self.defer_now(p) {
            (&page[..], 0)
        } else {
            match codec::compress(p.spec.codec, page, &mut buf, self.threshold) {
                Some(n) => (&buf[..n], p.spec.codec.tag()),
                None => (&page[..], 0),
            }
        };
        let hdr = hdr.map(|h| SlotHeader { codec: tag, ..h });
        let h = self.alloc_room(bytes, p.persistent(), hdr.as_ref())?;
        Ok((h, tag, bytes.len()))
    }

    /// Whether a put into `p` should store raw now and compress later: only with a codec,
    /// only while the engine holds less than the deferral fraction of its budget (raw
    /// pages waiting for compression are part of what it holds), and only while fewer than
    /// 1024 pages wait.
    fn defer_now(&self, p: &PoolInfo) -> bool {
        let frac = self.defer_below;
        if frac <= 0.0 || p.spec.codec == Codec::None || self.durable(p) {
            return false;
        }
        // When the background compressor falls behind (puts arrive faster than it
        // compresses), compress inline: deferring then only adds work.
        if self.deferred_count.load(Relaxed) >= MAX_DEFERRED {
            return false;
        }
        ((self.held_bytes() + PAGE_SIZE as u64) as f64) < frac * self.budget() as f64
    }

    /// Whether the pool's payloads live in durable memory.
    fn durable(&self, p: &PoolInfo) -> bool {
        p.persistent() && self.pers_store.is_durable()
    }

    fn prepare(
        &self,
        p: &PoolInfo,
        page: &Page,
        stripe: usize,
        hdr: Option<SlotHeader>,
    ) -> Result<Prepared> {
        let ops = Bump([
            self.ops.at(stripe),
            p.ops.at(stripe),
            p.owner.ops.at(stripe),
        ]);
        let shape = match codec::classify(page) {
            // Only zero pages live in the index alone in a durable pool (a page missing
            // after recovery reads as zero); other same-filled pages are stored as data.
            Shape::Same(w) if w != 0 && hdr.is_some() => Shape::Data,
            s => s,
        };
        match shape {
            Shape::Same(w) => {
                self.room_for_meta(crate::entry::ENTRY_COST)?;
                if w == 0 {
                    ops.add(|o| &o.zero_puts);
                } else {
                    ops.add(|o| &o.same_puts);
                }
                Ok(Prepared {
                    entry: Entry::same(w),
                    charge: charge_for(None),
                    deferred: false,
                })
            }
            Shape::Data => {
                let counted = |tag: u8| {
                    if tag == 0 {
                        ops.add(|o| &o.raw_puts);
                    } else {
                        ops.add(|o| &o.compressed_puts);
                    }
                };
                let Some(domain) = p.dedup_domain else {
                    let (h, tag, len) = self.store_data(p, page, hdr)?;
                    counted(tag);
                    return Ok(Prepared {
                        entry: Entry::stored(h, tag, len),
                        charge: charge_for(Some(len)),
                        deferred: tag == 0 && p.spec.codec != Codec::None && self.defer_below > 0.0,
                    });
                };
                let hash = codec::hash_page(page, domain);
                match self.dedup.find_and_ref(self, hash, page) {
                    Found::Hit(len) => {
                        ops.add(|o| &o.dedup_hits);
                        return Ok(Prepared {
                            entry: Entry::dedup(hash, len),
                            charge: charge_for(Some(len)),
                            deferred: false,
                        });
                    }
                    Found::Collision => {
                        let (h, tag, len) = self.store_data(p, page, hdr)?;
                        counted(tag);
                        return Ok(Prepared {
                            entry: Entry::stored(h, tag, len),
                            charge: charge_for(Some(len)),
                            deferred: tag == 0
                                && p.spec.codec != Codec::None
                                && self.defer_below > 0.0,
                        });
                    }
                    Found::Miss => {}
                }
                let (h, tag, len) = self.store_data(p, page, hdr)?;
                if let Err(e) = self.room_for_meta(0) {
                    self.arenas(h).free(h, len);
                    return Err(e);
                }
                match self.dedup.insert(self, hash, page, h, tag, len) {
                    Inserted::Owned => {
                        counted(tag);
                        if tag == 0 && p.spec.codec != Codec::None && self.defer_below > 0.0 {
                            self.push_deferred(
                                stripe,
                                Deferred::Rec {
                                    hash,
                                    codec: p.spec.codec,
                                },
                            );
                        }
                        Ok(Prepared {
                            entry: Entry::dedup(hash, len),
                            charge: charge_for(Some(len)),
                            deferred: false,
                        })
                    }
                    Inserted::Existing(elen) => {
                        self.arenas(h).free(h, len);
                        ops.add(|o| &o.dedup_hits);
                        Ok(Prepared {
                            entry: Entry::dedup(hash, elen),
                            charge: charge_for(Some(elen)),
                            deferred: false,
                        })
                    }
                    Inserted::Collision => {
                        counted(tag);
                        Ok(Prepared {
                            entry: Entry::stored(h, tag, len),
                            charge: charge_for(Some(len)),
                            deferred: tag == 0
                                && p.spec.codec != Codec::None
                                && self.defer_below > 0.0,
                        })
                    }
                }
            }
        }
    }

    /// Undoes a prepared entry that will not be installed.
    fn discard(&self, prep: Prepared) {
        match prep.entry.target() {
            Target::Same(_) => {}
            Target::Stored { handle, len, .. } => {
                self.arenas(handle).free(handle, len);
            }
            Target::Dedup { hash, .. } => {
                self.dedup.unref(self, hash);
            }
        }
    }

    fn log_touch(c: &ClientInfo, key: PageKey) {
        if c.saving.load(Relaxed) {
            if let Some(log) = c.save_log.lock().as_mut() {
                log.insert(key);
            }
        }
    }

    /// Puts one page (exactly 4096 bytes). On success the page is held until flushed
    /// (persistent) or until flushed or evicted (ephemeral). On any error the key holds
    /// nothing afterwards: a failed replace flushes the old content.
    pub fn put(&self, client: ClientId, key: PageKey, data: &[u8]) -> Result<()> {
        self.put_or(client, key, data, true)
    }

    /// Like [`Engine::put`], except that a put that fails leaves the key as it was: its
    /// old content stays readable (and charged) until the caller flushes it. For a
    /// frontend that must keep the old copy until the new one is safe elsewhere (a swap
    /// export writing a refused page to its spill file: old or new content after a crash,
    /// never neither).
    pub fn try_put(&self, client: ClientId, key: PageKey, data: &[u8]) -> Result<()> {
        self.put_or(client, key, data, false)
    }

    fn put_or(
        &self,
        client: ClientId,
        key: PageKey,
        data: &[u8],
        flush_on_error: bool,
    ) -> Result<()> {
        let pools = self.pools.load();
        let p = self.access(&pools, client, key.pool)?;
        let s = self.shard_idx(&key);
        let result = self.put_in(p, client, key, data, s);
        let c = &p.owner;
        match &result {
            Ok(()) => {
                self.ops.at(s).puts.fetch_add(1, Relaxed);
                p.ops.at(s).puts.fetch_add(1, Relaxed);
                c.ops.at(s).puts.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.ops.at(s).puts_refused.fetch_add(1, Relaxed);
                p.ops.at(s).puts_refused.fetch_add(1, Relaxed);
                c.ops.at(s).puts_refused.fetch_add(1, Relaxed);
                if flush_on_error {
                    self.flush_in(p, key, s);
                }
            }
        }
        Self::log_touch(&p.owner, key);
        result
    }

    fn put_in(
        &self,
        p: &PoolInfo,
        client: ClientId,
        key: PageKey,
        data: &[u8],
        s: usize,
    ) -> Result<()> {
        let page: &Page = data.try_into().map_err(|_| Error::BadLength(data.len()))?;
        if p.owner.frozen.load(Relaxed) {
            return Err(Error::Frozen(p.owner.id));
        }
        if client != p.owner.id && self.client(client)?.frozen.load(Relaxed) {
            return Err(Error::Frozen(client));
        }
        if p.dead.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::UnknownPool(p.id));
        }
        let hdr = if self.durable(p) {
            let [object, 0, 0] = key.object.0 else {
                return Err(Error::Unsupported(
                    "durable pools take single-word object ids",
                ));
            };
            Some(SlotHeader {
                seq: self.seq.fetch_add(1, Relaxed),
                tag: p.durable_tag,
                index: key.index.0,
                object,
                codec: 0,
            })
        } else {
            None
        };
        let prep = self.prepare(p, page, s, hdr)?;
        if p.persistent() {
            let cap = p.owner.cap.load(Relaxed);
            let charged = p.owner.pers.charged().max(0) as u64;
            if charged.saturating_add(prep.charge) > cap {
                self.discard(prep);
                return Err(Error::QuotaExceeded(p.owner.id));
            }
        }
        let okey = ObjKey::new(key.pool, key.object);
        let (old, d) = {
            let mut shard = self.shards[s].lock();
            if p.dead.load(std::sync::atomic::Ordering::Acquire) {
                // destroy_pool has swept or will sweep this shard: do not orphan the page.
                // Nothing was charged yet; the prepared payload goes back.
                drop(shard);
                self.discard(prep);
                return Err(Error::UnknownPool(p.id));
            }
            let mut e = prep.entry;
            e.set_referenced(false);
            shard.insert(okey, key.index.0, e, p.queue_client())
        };
        self.meta.fetch_add(d, Relaxed);
        let same = i64::from(prep.entry.is_same());
        p.held.add(s, 1, same, prep.charge as i64);
        p.gauges_of_owner().add(s, 1, same, prep.charge as i64);
        if let Some(old) = old {
            self.release(p, old, s);
        }
        if prep.deferred {
            self.push_deferred(
                s,
                Deferred::Entry {
                    shard: s as u32,
                    key: okey,
                    index: key.index.0,
                    codec: p.spec.codec,
                },
            );
        }
        Ok(())
    }

    fn push_deferred(&self, stripe: usize, d: Deferred) {
        self.deferred[stripe % self.deferred.len()]
            .lock()
            .push_back(d);
        self.deferred_count.fetch_add(1, Relaxed);
    }

    /// Pages stored raw and waiting for [`Engine::compress_deferred`].
    pub fn deferred_pages(&self) -> usize {
        self.deferred_count.load(Relaxed)
    }

    /// Compresses up to `max` pages whose compression was deferred (see
    /// [`EngineConfig::defer_compression_below`]); returns how many were looked at. Meant
    /// for a background thread: it takes each lock only to copy a page out or to swap the
    /// stored form in, and never evicts anything to make room.
    pub fn compress_deferred(&self, max: usize) -> usize {
        let mut done = 0;
        let n = self.deferred.len();
        let start = self.deferred_cursor.fetch_add(1, Relaxed);
        let mut idle = 0;
        while done < max && idle < n {
            let q = (start + done + idle) % n;
            let Some(item) = self.deferred[q].lock().pop_front() else {
                idle += 1;
                continue;
            };
            idle = 0;
            self.deferred_count.fetch_sub(1, Relaxed);
            done += 1;
            match item {
                Deferred::Entry {
                    shard,
                    key,
                    index,
                    codec,
                } => self.recompress_entry(shard as usize, key, index, codec),
                Deferred::Rec { hash, codec } => self.recompress_rec(hash, codec),
            }
        }
        done
    }

    /// Compresses `raw` and stores it without evicting; `None` if it does not pay or fit.
    fn store_compressed(
        &self,
        codec: Codec,
        raw: &Page,
        persistent: bool,
    ) -> Option<(Handle, u8, usize)> {
        let mut buf = [0u8; PAGE_SIZE];
        let n = codec::compress(codec, raw, &mut buf, self.threshold)?;
        let store = if persistent {
            &self.pers_store
        } else {
            &self.eph_store
        };
        if store.is_durable() {
            // Durable pools compress at put time; nothing of theirs waits for this.
            return None;
        }
        let can_grow = self.held_bytes() + crate::alloc::slab_cost_for(n) <= self.budget();
        let Alloc::Done(h) = store.alloc(&buf[..n], can_grow) else {
            return None;
        };
        Some((h, codec.tag(), n))
    }

    fn recompress_entry(&self, s: usize, key: ObjKey, index: u32, codec: Codec) {
        let mut raw = [0u8; PAGE_SIZE];
        let old = {
            let mut shard = self.shards[s].lock();
            let Some(e) = shard.get_mut(&key, index) else {
                return;
            };
            let Target::Stored {
                handle,
                codec: 0,
                len: PAGE_SIZE,
            } = e.target()
            else {
                return;
            };
            if self
                .arenas(handle)
                .with(handle, PAGE_SIZE, |b| raw.copy_from_slice(b))
                .is_none()
            {
                return;
            }
            handle
        };
        let pools = self.pools.load();
        let Some(p) = pools.get(&key.pool) else {
            return;
        };
        let Some((h, tag, n)) = self.store_compressed(codec, &raw, p.persistent()) else {
            return;
        };
        let swapped = {
            let mut shard = self.shards[s].lock();
            match shard.get_mut(&key, index) {
                // Same handle *and* same bytes: the slot may have been freed and reused for
                // a newer raw page of this key meanwhile (ABA), which must not be replaced
                // by the compressed old content.
                Some(e)
                    if e.target()
                        == (Target::Stored {
                            handle: old,
                            codec: 0,
                            len: PAGE_SIZE,
                        })
                        && self.arenas(old).with(old, PAGE_SIZE, |b| b == &raw[..])
                            == Some(true) =>
                {
                    let referenced = e.referenced();
                    let before = e.charge() as i64;
                    let mut ne = Entry::stored(h, tag, n);
                    ne.set_referenced(referenced);
                    *e = ne;
                    Some(ne.charge() as i64 - before)
                }
                _ => None,
            }
        };
        match swapped {
            Some(delta) => {
                p.held.add(s, 0, 0, delta);
                p.gauges_of_owner().add(s, 0, 0, delta);
                self.arenas(old).free(old, PAGE_SIZE);
            }
            None => {
                self.arenas(h).free(h, n);
            }
        }
    }

    fn recompress_rec(&self, hash: u64, codec: Codec) {
        let Some((tag, raw)) = self.dedup.stored_form(self, hash) else {
            return;
        };
        if tag != 0 || raw.len() != PAGE_SIZE {
            return;
        }
        let Ok(raw): std::result::Result<Page, _> = raw.try_into() else {
            return;
        };
        let Some(old) = self.dedup.handle_of(hash) else {
            return;
        };
        let persistent = old.arena() >= 8;
        let Some((h, tag, n)) = self.store_compressed(codec, &raw, persistent) else {
            return;
        };
        if self.dedup.swap_payload(self, hash, old, &raw, h, tag, n) {
            self.arenas(old).free(old, PAGE_SIZE);
        } else {
            self.arenas(h).free(h, n);
        }
    }

    /// Gets one page into `out` (exactly 4096 bytes). `Ok(None)` is a miss. Private
    /// ephemeral pools with exclusive gets drop the page once it has been read.
    pub fn get(&self, client: ClientId, key: PageKey, out: &mut [u8]) -> Result<Option<PageState>> {
        let pools = self.pools.load();
        let p = self.access(&pools, client, key.pool)?;
        let len = out.len();
        let out: &mut Page = out.try_into().map_err(|_| Error::BadLength(len))?;
        let s = self.shard_idx(&key);
        let okey = ObjKey::new(key.pool, key.object);
        let exclusive = p.exclusive();
        let mut removed = None;
        let mut corrupt = false;
        let state = {
            let mut shard = self.shards[s].lock();
            match shard.get_mut(&okey, key.index.0) {
                None => None,
                Some(e) => {
                    let state = self.decode(e, out).then_some(match e.target() {
                        Target::Same(0) => PageState::Zero,
                        _ => PageState::Data,
                    });
                    if state.is_none() {
                        corrupt = true;
                    } else if !exclusive && !p.persistent() {
                        e.set_referenced(true);
                    }
                    if exclusive || corrupt {
                        let (r, d) = shard.remove(&okey, key.index.0, p.queue_client());
                        self.meta.fetch_add(d, Relaxed);
                        removed = r;
                    }
                    state
                }
            }
        };
        if corrupt {
            tracing::error!(?key, "stored page failed to decode; dropped");
        }
        if let Some(r) = removed {
            self.release(p, r, s);
            Self::log_touch(&p.owner, key);
        }
        let hit = state.is_some();
        for ops in [self.ops.at(s), p.ops.at(s), p.owner.ops.at(s)] {
            ops.gets.fetch_add(1, Relaxed);
            if hit {
                ops.get_hits.fetch_add(1, Relaxed);
            } else {
                ops.get_misses.fetch_add(1, Relaxed);
            }
        }
        Ok(state)
    }

    /// Tells what a key holds without copying or counting a get (for block-status queries).
    pub fn probe(&self, client: ClientId, key: PageKey) -> Result<Option<PageState>> {
        let pools = self.pools.load();
        self.access(&pools, client, key.pool)?;
        let s = self.shard_idx(&key);
        let mut shard = self.shards[s].lock();
        Ok(shard
            .get_mut(&ObjKey::new(key.pool, key.object), key.index.0)
            .map(|e| match e.target() {
                Target::Same(0) => PageState::Zero,
                _ => PageState::Data,
            }))
    }

    fn flush_in(&self, p: &PoolInfo, key: PageKey, s: usize) -> bool {
        let (r, d) = self.shards[s].lock().remove(
            &ObjKey::new(key.pool, key.object),
            key.index.0,
            p.queue_client(),
        );
        self.meta.fetch_add(d, Relaxed);
        match r {
            Some(r) => {
                self.release(p, r, s);
                true
            }
            None => false,
        }
    }

    /// Flushes one page. Returns whether it was held.
    pub fn flush_page(&self, client: ClientId, key: PageKey) -> Result<bool> {
        let pools = self.pools.load();
        let p = self.access(&pools, client, key.pool)?;
        let s = self.shard_idx(&key);
        let had = self.flush_in(p, key, s);
        if had {
            for ops in [self.ops.at(s), p.ops.at(s), p.owner.ops.at(s)] {
                ops.flushes.fetch_add(1, Relaxed);
            }
        }
        Self::log_touch(&p.owner, key);
        Ok(had)
    }

    /// Flushes every page of an object. Returns how many pages were held.
    pub fn flush_object(&self, client: ClientId, pool: PoolId, object: ObjectId) -> Result<u64> {
        let p = self.pool_for(client, pool)?;
        let okey = ObjKey::new(pool, object);
        let mut total = 0;
        for s in 0..self.shards.len() {
            let (removed, d) = self.shards[s].lock().remove_object(&okey, p.queue_client());
            self.meta.fetch_add(d, Relaxed);
            let n = removed.len() as u64;
            total += n;
            for r in removed {
                self.release(&p, r, s);
            }
            if n > 0 {
                for ops in [self.ops.at(s), p.ops.at(s), p.owner.ops.at(s)] {
                    ops.flushes.fetch_add(n, Relaxed);
                }
            }
        }
        if p.owner.saving.load(Relaxed) {
            // Object-wide flush during a live save: log the object by its first key.
            Self::log_touch(
                &p.owner,
                PageKey {
                    pool,
                    object,
                    index: PageIndex(u32::MAX),
                },
            );
        }
        Ok(total)
    }

    /// Puts consecutive pages of one object (`data.len()` must be a multiple of 4096),
    /// resolving the pool once. Returns one result per page.
    pub fn put_pages(
        &self,
        client: ClientId,
        pool: PoolId,
        object: ObjectId,
        first: u32,
        data: &[u8],
    ) -> Result<Vec<Result<()>>> {
        if data.len() % PAGE_SIZE != 0 {
            return Err(Error::BadLength(data.len()));
        }
        let pools = self.pools.load();
        let p = self.access(&pools, client, pool)?;
        let mut out = Vec::with_capacity(data.len() / PAGE_SIZE);
        for (i, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let key = PageKey::new(pool, object, first.wrapping_add(i as u32));
            let s = self.shard_idx(&key);
            let r = self.put_in(p, client, key, chunk, s);
            let ops = [self.ops.at(s), p.ops.at(s), p.owner.ops.at(s)];
            if r.is_ok() {
                ops.iter().for_each(|o| _ = o.puts.fetch_add(1, Relaxed));
            } else {
                ops.iter()
                    .for_each(|o| _ = o.puts_refused.fetch_add(1, Relaxed));
                self.flush_in(p, key, s);
            }
            Self::log_touch(&p.owner, key);
            out.push(r);
        }
        Ok(out)
    }

    // ----- statistics ----------------------------------------------------------------------

    /// Engine-wide statistics (cheap: sums of counters, no locks on the data path).
    pub fn stats(&self) -> EngineStats {
        let clients = self.clients.load();
        let pools = self.pools.load();
        let (mut pages, mut eph, mut pers, mut same) = (0, 0, 0, 0);
        for c in clients.values() {
            let e = c.eph.snapshot();
            let p = c.pers.snapshot();
            eph += e.pages;
            pers += p.pages;
            pages += e.pages + p.pages;
            same += e.same_pages + p.same_pages;
        }
        let alloc = self.eph_store.stats().plus(self.pers_store.stats());
        let held = self.held_bytes();
        EngineStats {
            budget: self.budget(),
            held_bytes: held,
            resident_bytes: self.resident_bytes(),
            metadata_bytes: held.saturating_sub(alloc.held_bytes),
            compaction: self.compaction.snapshot(),
            alloc,
            logical_bytes: pages * PAGE_SIZE as u64,
            pages,
            ephemeral_pages: eph,
            persistent_pages: pers,
            same_pages: same,
            unique_payloads: alloc.objects,
            freeable_bytes: self.freeable_bytes(),
            ops: self.ops.snapshot(),
            clients: clients.len() as u64,
            pools: pools.len() as u64,
        }
    }

    /// Statistics of one client.
    pub fn client_stats(&self, id: ClientId) -> Result<ClientStats> {
        let c = self.client(id)?;
        Ok(ClientStats {
            client: id,
            weight: c.weight.load(Relaxed),
            persistent_cap: c.cap.load(Relaxed),
            frozen: c.frozen.load(Relaxed),
            ephemeral: c.eph.snapshot(),
            persistent: c.pers.snapshot(),
            ops: c.ops.snapshot(),
            pools: self.pools_of(id).into_iter().map(|(p, _)| p).collect(),
        })
    }

    /// Statistics of one pool (any client that can reach it may ask).
    pub fn pool_stats(&self, client: ClientId, pool: PoolId) -> Result<PoolStats> {
        let p = self.pool_for(client, pool)?;
        Ok(Self::pool_stats_of(&p))
    }

    fn pool_stats_of(p: &PoolInfo) -> PoolStats {
        PoolStats {
            pool: p.id,
            label: p.spec.label.clone(),
            persistent: p.persistent(),
            shared: matches!(p.spec.sharing, Sharing::Shared(_)),
            held: p.held.snapshot(),
            ops: p.ops.snapshot(),
        }
    }

    /// Statistics of every pool.
    pub fn all_pool_stats(&self) -> Vec<PoolStats> {
        let mut v: Vec<PoolStats> = self
            .pools
            .load()
            .values()
            .map(|p| Self::pool_stats_of(p))
            .collect();
        v.sort_by_key(|s| s.pool);
        v
    }

    /// Operation counts summed over the engine.
    pub fn op_stats(&self) -> OpStats {
        self.ops.snapshot()
    }

    // ----- internals for save/restore --------------------------------------------------------

    pub(crate) fn pool_infos_of(&self, client: ClientId) -> Vec<Arc<PoolInfo>> {
        let mut v: Vec<Arc<PoolInfo>> = self
            .pools
            .load()
            .values()
            .filter(|p| p.owner.id == client)
            .cloned()
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    pub(crate) fn client_info(&self, id: ClientId) -> Result<Arc<ClientInfo>> {
        self.client(id)
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Copies out (key index, stored form) of the pages of `pool` in shard `s`.
    pub(crate) fn snapshot_shard(
        &self,
        s: usize,
        pool: PoolId,
    ) -> Vec<(ObjectId, u32, crate::save::Stored)> {
        let shard = self.shards[s].lock();
        let mut out = Vec::new();
        for key in shard.objects_of(pool.0) {
            let Some(&slot) = shard.index.get(&key) else {
                continue;
            };
            let Some(Some(obj)) = shard.objs.get(slot as usize) else {
                continue;
            };
            let mut idxs: Vec<(&u32, &Entry)> = obj.pages.iter().collect();
            idxs.sort_by_key(|(i, _)| **i);
            for (&idx, e) in idxs {
                let stored = match e.target() {
                    Target::Same(w) => Some(crate::save::Stored::Same(w)),
                    Target::Stored { handle, codec, len } => {
                        self.arenas(handle).with(handle, len, |b| {
                            crate::save::Stored::Data(codec, b.to_vec())
                        })
                    }
                    Target::Dedup { hash, .. } => self
                        .dedup
                        .stored_form(self, hash)
                        .map(|(c, b)| crate::save::Stored::Data(c, b)),
                };
                if let Some(st) = stored {
                    out.push((ObjectId(key.oid), idx, st));
                }
            }
        }
        out
    }

    /// Destroys pools created by a failed restore.
    pub(crate) fn rollback_pools(&self, client: ClientId, pools: &[PoolId]) {
        for &p in pools {
            let _ = self.destroy_pool(client, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Engine>();
    }
}
