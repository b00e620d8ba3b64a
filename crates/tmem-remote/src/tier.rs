//! [`RedisTier`]: the [`RemoteTier`] on Redis.

use crate::codec;
use crate::config::RemoteConfig;
use crate::keys::{slot_of, Kind, SpaceKeys};
use crate::router::{Fail, Router};
use crate::stats::{add, bump, Counters, RemoteStats};
use parking_lot::{Condvar, Mutex, RwLock};
use redis::Value;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tmem_exports::remote::{RemoteError, RemotePage, RemoteTier, REMOTE_PAGE};
use tracing::{debug, info, warn};

/// Forget jobs kept beyond `queue_pages` before further forgets are dropped.
const FORGET_SLACK: usize = 4;

enum Job {
    Demote {
        key: String,
        tag: u64,
        page: Vec<u8>,
    },
    Forget {
        keys: [String; 2],
    },
}

impl Job {
    fn slot(&self) -> u16 {
        match self {
            Job::Demote { key, .. } => slot_of(key.as_bytes()),
            Job::Forget { keys } => slot_of(keys[0].as_bytes()),
        }
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    demotes: usize,
    forgets: usize,
}

struct Inner {
    cfg: RemoteConfig,
    router: Router,
    stats: Counters,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    /// Wakes the health thread (tier went down, a refresh is wanted, stop).
    health: Mutex<()>,
    health_cv: Condvar,
    down: AtomicBool,
    /// Jobs the writer took from the queue and has not finished.
    in_flight: AtomicUsize,
    /// Orders durable writes against queued deletions of the same keys: the writer holds
    /// it exclusively while a batch with deletions is on the wire, a durable put holds it
    /// shared and first drops queued deletions of its keys — so a deletion queued before a
    /// put never lands after it.
    durable_order: RwLock<()>,
    need_refresh: AtomicBool,
    /// A durable write was not replicated: the health thread probes every primary now (a
    /// host cut off from the others still reaches its own node, which cannot replicate), and
    /// marks the tier down if one does not answer.
    probe_now: AtomicBool,
    stop: AtomicBool,
}

/// A remote tier of 4 KiB pages on Redis (one server or a Redis Cluster). See the crate
/// documentation for the design. Create it with [`RedisTier::connect`]; dropping the last
/// handle or calling [`RedisTier::shutdown`] stops its two background threads (the
/// demotion writer and the health prober).
pub struct RedisTier {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("mode", &self.inner.cfg.mode)
            .field("nodes", &self.inner.cfg.nodes)
            .field("available", &self.available())
            .finish()
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// The error code of an error reply (`MOVED`, `OOM`, `READONLY`…), if `v` is one.
fn error_code(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(e.code().to_string()),
        _ => None,
    }
}

fn error_text(v: &Value) -> String {
    match v {
        Value::ServerError(e) => e.to_string(),
        other => format!("unexpected reply {other:?}")
            .chars()
            .take(200)
            .collect(),
    }
}

/// Whether an error reply means "the cluster is reconfiguring: refresh and retry".
fn retryable(code: &str) -> bool {
    matches!(
        code,
        "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "LOADING" | "READONLY"
    )
}

impl RedisTier {
    /// Validates `cfg` and starts the tier. When the servers are unreachable the tier
    /// still starts, down, and its health thread keeps probing them with backoff; only an
    /// invalid configuration is an error.
    pub fn connect(cfg: RemoteConfig) -> Result<Arc<RedisTier>, RemoteError> {
        cfg.validate()?;
        let router = Router::new(cfg.mode, cfg.nodes.clone(), cfg.connections);
        let inner = Arc::new(Inner {
            router,
            stats: Counters::new(),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            health: Mutex::new(()),
            health_cv: Condvar::new(),
            down: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            durable_order: RwLock::new(()),
            need_refresh: AtomicBool::new(false),
            probe_now: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            cfg,
        });
        match inner.probe() {
            Ok(()) => {
                inner.down.store(false, Ordering::SeqCst);
                inner.stats.reachable.store(true, Ordering::Relaxed);
                info!(nodes = ?inner.cfg.nodes, "remote tier up");
            }
            Err(e) => {
                warn!(nodes = ?inner.cfg.nodes, error = %e, "remote tier down at start; will retry")
            }
        }
        let mut threads = Vec::new();
        for (name, body) in [
            ("tmem-remote-wr", Inner::writer as fn(&Inner)),
            ("tmem-remote-hc", Inner::health_loop as fn(&Inner)),
        ] {
            let i = Arc::clone(&inner);
            let h = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&i))
                .map_err(|e| RemoteError::Protocol(format!("cannot start a thread: {e}")));
            match h {
                Ok(h) => threads.push(h),
                Err(e) => {
                    inner.stop_threads();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(RedisTier {
            inner,
            threads: Mutex::new(threads),
        }))
    }

    /// Stops the background threads (idempotent). Queued demotions and forgets not yet
    /// written are dropped; later calls fail or miss.
    pub fn shutdown(&self) {
        self.inner.stop_threads();
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RemoteStats {
        self.inner.stats.snapshot()
    }

    /// The configuration in use.
    pub fn config(&self) -> &RemoteConfig {
        &self.inner.cfg
    }

    /// Pages (demotions) waiting in the writer's queue.
    pub fn queued(&self) -> usize {
        self.inner.queue.lock().demotes
    }

    /// Waits up to `timeout` until the writer's queue is empty; whether it is.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let empty = self.inner.queue.lock().jobs.is_empty();
            if empty && !self.inner.busy() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(ms(5));
        }
    }
}

impl Drop for RedisTier {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn op_timeout(&self) -> Duration {
        ms(self.cfg.op_timeout_ms)
    }

    /// Timeout of one probe or one durable attempt's connection.
    /// Drops queued deletions of `keys` (durable keys about to be written): called with
    /// `durable_order` held shared.
    fn cancel_forgets(&self, keys: &[&str]) {
        let mut q = self.queue.lock();
        if q.forgets == 0 {
            return;
        }
        let before = q.jobs.len();
        q.jobs.retain(|j| match j {
            Job::Forget { keys: k } => !keys.contains(&k[1].as_str()),
            Job::Demote { .. } => true,
        });
        let dropped = before - q.jobs.len();
        q.forgets -= dropped;
    }

    fn probe_timeout(&self) -> Duration {
        ms(self.cfg.op_timeout_ms.max(500))
    }

    fn stop_threads(&self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _q = self.queue.lock();
            self.queue_cv.notify_all();
        }
        let _h = self.health.lock();
        self.health_cv.notify_all();
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn mark_down(&self, why: &str) {
        if !self.down.swap(true, Ordering::SeqCst) {
            self.stats.reachable.store(false, Ordering::Relaxed);
            bump(&self.stats.down_transitions);
            warn!(reason = %why, "remote tier down");
            let _h = self.health.lock();
            self.health_cv.notify_all();
        }
    }

    fn mark_up(&self) {
        if self.down.swap(false, Ordering::SeqCst) {
            self.stats.reachable.store(true, Ordering::Relaxed);
            info!("remote tier up");
        }
    }

    /// Counts a failed round trip to `addr` and trips the breaker.
    fn fail(&self, addr: &str, f: &Fail) {
        bump(&self.stats.errors);
        self.router.drop_idle(addr);
        self.need_refresh.store(true, Ordering::Relaxed);
        match f {
            Fail::Timeout => {
                bump(&self.stats.timeouts);
                self.mark_down(&format!("{addr}: timed out"));
            }
            Fail::Conn(e) => self.mark_down(&format!("{addr}: {e}")),
        }
    }

    /// Counts a durable write that was not replicated and asks the health thread to probe.
    fn not_replicated(&self) {
        bump(&self.stats.not_replicated);
        self.probe_now.store(true, Ordering::SeqCst);
        let _h = self.health.lock();
        self.health_cv.notify_all();
    }

    /// Learns the topology and PINGs every primary.
    fn probe(&self) -> Result<(), String> {
        let t = self.probe_timeout();
        self.router.refresh(t)?;
        if !self.router.covered() {
            return Err("some slots have no primary".into());
        }
        let ping = redis::cmd("PING").get_packed_command();
        for addr in self.router.primaries() {
            match self.router.round_trip(&addr, &ping, 1, t) {
                Ok(v) if matches!(v.first(), Some(Value::SimpleString(_) | Value::Okay)) => {}
                Ok(v) => {
                    return Err(format!(
                        "{addr}: {}",
                        v.first().map(error_text).unwrap_or_default()
                    ))
                }
                Err(Fail::Conn(e)) => return Err(format!("{addr}: {e}")),
                Err(Fail::Timeout) => return Err(format!("{addr}: PING timed out")),
            }
        }
        Ok(())
    }

    fn health_loop(&self) {
        let min = self.cfg.backoff_ms;
        let mut backoff = min;
        while !self.stop.load(Ordering::SeqCst) {
            let wait = if self.is_down() {
                ms(backoff)
            } else {
                ms(1000)
            };
            {
                let mut g = self.health.lock();
                if !self.stop.load(Ordering::SeqCst) && !self.probe_now.load(Ordering::SeqCst) {
                    self.health_cv.wait_for(&mut g, wait);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if self.is_down() {
                match self.probe() {
                    Ok(()) => {
                        backoff = min;
                        self.need_refresh.store(false, Ordering::Relaxed);
                        self.mark_up();
                    }
                    Err(e) => {
                        debug!(error = %e, backoff_ms = backoff, "remote tier probe failed");
                        backoff = backoff.saturating_mul(2).min(self.cfg.backoff_max_ms);
                    }
                }
            } else if self.probe_now.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.probe() {
                    self.mark_down(&format!("a write was not replicated and {e}"));
                }
            } else if self.need_refresh.swap(false, Ordering::Relaxed) {
                if let Err(e) = self.router.refresh(self.probe_timeout()) {
                    debug!(error = %e, "remote tier topology refresh failed");
                }
            }
        }
    }

    // ---- the writer ----

    fn writer(&self) {
        loop {
            // Wait for work without holding `durable_order`.
            {
                let mut q = self.queue.lock();
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if self.is_down() && q.demotes > 0 {
                        // A cache copy is worthless later; forgets wait for the tier.
                        let before = q.jobs.len();
                        q.jobs.retain(|j| matches!(j, Job::Forget { .. }));
                        add(&self.stats.demote_dropped, (before - q.jobs.len()) as u64);
                        q.demotes = 0;
                    }
                    if !q.jobs.is_empty() && !self.is_down() {
                        break;
                    }
                    let wait = if self.is_down() { ms(100) } else { ms(1000) };
                    self.queue_cv.wait_for(&mut q, wait);
                }
            }
            // Take the batch with `durable_order` held exclusively, and keep it while the
            // batch's deletions are on the wire: a durable put (which cancels queued
            // deletions of its keys under the shared side) never races one.
            let order = self.durable_order.write();
            let batch = {
                let mut q = self.queue.lock();
                let n = q.jobs.len().min(self.cfg.batch_pages);
                let batch: Vec<Job> = q.jobs.drain(..n).collect();
                for j in &batch {
                    match j {
                        Job::Demote { .. } => q.demotes -= 1,
                        Job::Forget { .. } => q.forgets -= 1,
                    }
                }
                self.in_flight.store(batch.len(), Ordering::SeqCst);
                batch
            };
            let order = batch
                .iter()
                .any(|j| matches!(j, Job::Forget { .. }))
                .then_some(order);
            let retry = self.write_batch(batch, true);
            if !retry.is_empty() {
                // Forgets that could not be written go back first, before later demotions
                // of the same keys.
                let mut q = self.queue.lock();
                for j in retry.into_iter().rev() {
                    q.forgets += 1;
                    q.jobs.push_front(j);
                }
            }
            drop(order);
            self.in_flight.store(0, Ordering::SeqCst);
        }
    }

    /// Writes one batch, one pipelined round trip per server; returns the forgets to retry.
    fn write_batch(&self, batch: Vec<Job>, may_refresh: bool) -> Vec<Job> {
        let mut groups: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        let mut retry = Vec::new();
        for job in batch {
            let slot = job.slot();
            let mut addr = self.router.addr_for_slot(slot);
            if addr.is_none() && may_refresh {
                let _ = self.router.refresh(self.op_timeout());
                addr = self.router.addr_for_slot(slot);
            }
            match addr {
                Some(a) => groups.entry(a).or_default().push(job),
                None => {
                    bump(&self.stats.errors);
                    match job {
                        Job::Demote { .. } => bump(&self.stats.demote_dropped),
                        Job::Forget { .. } => retry.push(job),
                    }
                }
            }
        }
        let ttl = self.cfg.ephemeral_ttl_s;
        let mut moved = false;
        for (addr, jobs) in groups {
            let mut pipe = redis::pipe();
            let mut lens = Vec::with_capacity(jobs.len());
            for j in &jobs {
                match j {
                    Job::Demote { key, tag, page } => {
                        match codec::encode(key.as_bytes(), *tag, page, self.cfg.compress) {
                            Ok(v) => {
                                lens.push(v.len());
                                pipe.cmd("SET").arg(key).arg(v).arg("EX").arg(ttl);
                            }
                            Err(_) => {
                                // Not reachable: demote checks the length.
                                lens.push(0);
                                pipe.cmd("PING");
                            }
                        }
                    }
                    Job::Forget { keys } => {
                        lens.push(0);
                        pipe.cmd("DEL").arg(&keys[0]).arg(&keys[1]);
                    }
                }
            }
            let packed = pipe.get_packed_pipeline();
            match self
                .router
                .round_trip(&addr, &packed, jobs.len(), self.op_timeout())
            {
                Ok(replies) => {
                    for ((j, r), len) in jobs.into_iter().zip(replies.iter()).zip(lens) {
                        let code = error_code(r);
                        if matches!(code.as_deref(), Some("MOVED" | "ASK")) {
                            moved = true;
                        }
                        match j {
                            Job::Demote { .. } => match r {
                                Value::Okay | Value::SimpleString(_) if len > 0 => {
                                    bump(&self.stats.demoted_pages);
                                    add(&self.stats.bytes_sent, len as u64);
                                    self.stats.stored(len);
                                }
                                _ => {
                                    bump(&self.stats.errors);
                                    bump(&self.stats.demote_dropped);
                                }
                            },
                            Job::Forget { .. } => match r {
                                Value::Int(n) => self.stats.deleted(u64::try_from(*n).unwrap_or(0)),
                                _ if code.as_deref().is_some_and(retryable) => retry.push(j),
                                _ => bump(&self.stats.errors),
                            },
                        }
                    }
                }
                Err(f) => {
                    self.fail(&addr, &f);
                    for j in jobs {
                        match j {
                            Job::Demote { .. } => bump(&self.stats.demote_dropped),
                            Job::Forget { .. } => retry.push(j),
                        }
                    }
                }
            }
        }
        if moved {
            self.need_refresh.store(true, Ordering::Relaxed);
            if may_refresh && !retry.is_empty() {
                let _ = self.router.refresh(self.probe_timeout());
                return self.write_batch(retry, false);
            }
        }
        retry
    }

    // ---- durable operations ----

    /// Sends `packed` (`count` commands, the first of which names `key`) to the primary of
    /// `key`'s slot, retrying redirections, failovers and connection failures until
    /// `deadline`. Returns the replies once the first one is not a retryable error.
    fn durable_round_trip(
        &self,
        key: &str,
        packed: &[u8],
        count: usize,
        reply_timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<Value>, RemoteError> {
        let slot = slot_of(key.as_bytes());
        let mut pause = ms(20);
        let mut last: RemoteError = RemoteError::Timeout;
        loop {
            let addr = match self.router.addr_for_slot(slot) {
                Some(a) => Some(a),
                None => {
                    let _ = self.router.refresh(self.probe_timeout());
                    self.router.addr_for_slot(slot)
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            if let Some(addr) = addr {
                match self
                    .router
                    .round_trip(&addr, packed, count, reply_timeout.min(left))
                {
                    Ok(replies) => {
                        let code = replies.first().and_then(error_code);
                        match code {
                            Some(c) if retryable(&c) => {
                                bump(&self.stats.errors);
                                let text = replies.first().map(error_text).unwrap_or_default();
                                last = match c.as_str() {
                                    "READONLY" => RemoteError::Refused(text),
                                    _ => RemoteError::Unreachable(text),
                                };
                                let _ = self.router.refresh(self.probe_timeout().min(left));
                                if c == "MOVED" {
                                    continue;
                                }
                            }
                            _ => return Ok(replies),
                        }
                    }
                    Err(f) => {
                        self.fail(&addr, &f);
                        last = match f {
                            Fail::Timeout => RemoteError::Timeout,
                            Fail::Conn(e) => RemoteError::Unreachable(format!("{addr}: {e}")),
                        };
                        let _ = self.router.refresh(self.probe_timeout().min(left));
                    }
                }
            } else {
                bump(&self.stats.errors);
                last = RemoteError::Unreachable(format!("no primary serves slot {slot}"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(ms(500));
        }
    }
}

impl RemoteTier for RedisTier {
    fn demote(&self, space: &str, page: u64, tag: u64, data: &[u8]) {
        let i = &self.inner;
        if data.len() != REMOTE_PAGE || i.is_down() || i.stop.load(Ordering::Relaxed) {
            if data.len() != REMOTE_PAGE {
                bump(&i.stats.errors);
            }
            bump(&i.stats.demote_dropped);
            return;
        }
        let keys = match SpaceKeys::new(&i.cfg.key_prefix, &i.cfg.node_name, space) {
            Ok(k) => k,
            Err(_) => {
                bump(&i.stats.errors);
                bump(&i.stats.demote_dropped);
                return;
            }
        };
        let mut q = i.queue.lock();
        if q.demotes >= i.cfg.queue_pages {
            drop(q);
            bump(&i.stats.demote_dropped);
            return;
        }
        q.demotes += 1;
        q.jobs.push_back(Job::Demote {
            key: keys.key(Kind::Ephemeral, page),
            tag,
            page: data.to_vec(),
        });
        i.queue_cv.notify_one();
    }

    fn fetch(&self, space: &str, pages: &[u64]) -> Vec<Option<RemotePage>> {
        let i = &self.inner;
        let start = Instant::now();
        bump(&i.stats.fetch_requests);
        let mut out: Vec<Option<RemotePage>> = vec![None; pages.len()];
        if pages.is_empty() {
            return out;
        }
        let miss_all = |out: Vec<Option<RemotePage>>| {
            add(&i.stats.fetch_misses, pages.len() as u64);
            i.stats.fetch_latency.record(start.elapsed());
            out
        };
        if i.is_down() {
            return miss_all(out);
        }
        let keys = match SpaceKeys::new(&i.cfg.key_prefix, &i.cfg.node_name, space) {
            Ok(k) => k,
            Err(_) => {
                bump(&i.stats.errors);
                return miss_all(out);
            }
        };
        let names: Vec<String> = pages
            .iter()
            .map(|&p| keys.key(Kind::Ephemeral, p))
            .collect();
        // server -> slot -> indices into `pages`
        let mut groups: BTreeMap<String, BTreeMap<u16, Vec<usize>>> = BTreeMap::new();
        for (idx, k) in names.iter().enumerate() {
            let slot = slot_of(k.as_bytes());
            match i.router.addr_for_slot(slot) {
                Some(a) => groups
                    .entry(a)
                    .or_default()
                    .entry(slot)
                    .or_default()
                    .push(idx),
                None => {
                    i.need_refresh.store(true, Ordering::Relaxed);
                    bump(&i.stats.errors);
                    return miss_all(out);
                }
            }
        }
        let deadline = start + i.op_timeout();
        for (addr, slots) in groups {
            let mut pipe = redis::pipe();
            for idxs in slots.values() {
                let c = pipe.cmd("MGET");
                for &x in idxs {
                    c.arg(&names[x]);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bump(&i.stats.errors);
                bump(&i.stats.timeouts);
                return miss_all(vec![None; pages.len()]);
            }
            let packed = pipe.get_packed_pipeline();
            let replies = match i.router.round_trip(&addr, &packed, slots.len(), left) {
                Ok(r) => r,
                Err(f) => {
                    i.fail(&addr, &f);
                    return miss_all(vec![None; pages.len()]);
                }
            };
            for (idxs, reply) in slots.values().zip(replies.iter()) {
                let Value::Array(vals) = reply else {
                    if matches!(error_code(reply).as_deref(), Some("MOVED" | "ASK")) {
                        i.need_refresh.store(true, Ordering::Relaxed);
                    }
                    bump(&i.stats.errors);
                    return miss_all(vec![None; pages.len()]);
                };
                if vals.len() != idxs.len() {
                    bump(&i.stats.errors);
                    return miss_all(vec![None; pages.len()]);
                }
                for (&x, v) in idxs.iter().zip(vals) {
                    match v {
                        Value::BulkString(b) => {
                            add(&i.stats.bytes_received, b.len() as u64);
                            match codec::decode(names[x].as_bytes(), b) {
                                Ok((tag, data)) => out[x] = Some(RemotePage { tag, data }),
                                Err(_) => bump(&i.stats.corrupt),
                            }
                        }
                        Value::Nil => {}
                        _ => bump(&i.stats.corrupt),
                    }
                }
            }
        }
        let hits = out.iter().filter(|o| o.is_some()).count() as u64;
        add(&i.stats.fetch_hits, hits);
        add(&i.stats.fetch_misses, pages.len() as u64 - hits);
        i.stats.fetch_latency.record(start.elapsed());
        out
    }

    fn put_durable(&self, space: &str, page: u64, data: &[u8]) -> Result<(), RemoteError> {
        let i = &self.inner;
        if i.stop.load(Ordering::Relaxed) {
            return Err(RemoteError::Unreachable("the tier is shut down".into()));
        }
        let keys = SpaceKeys::new(&i.cfg.key_prefix, &i.cfg.node_name, space)?;
        let key = keys.key(Kind::Durable, page);
        let value = codec::encode(key.as_bytes(), 0, data, i.cfg.compress)?;
        let want = u64::from(i.cfg.replicas);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&key).arg(&value);
        if want > 0 {
            pipe.cmd("WAIT").arg(want).arg(i.cfg.wait_timeout_ms);
        }
        let count = if want > 0 { 2 } else { 1 };
        let _order = i.durable_order.read();
        i.cancel_forgets(&[key.as_str()]);
        let reply_timeout = ms(i.cfg.wait_timeout_ms + i.cfg.op_timeout_ms.max(500));
        // One attempt (and a redirection or two): a put that fails is not lost — the caller
        // keeps the page locally — so it is not worth waiting out a failover or a bad server.
        let deadline = Instant::now() + reply_timeout + ms(i.cfg.op_timeout_ms);
        let replies = i.durable_round_trip(
            &key,
            &pipe.get_packed_pipeline(),
            count,
            reply_timeout,
            deadline,
        )?;
        match replies.first() {
            Some(Value::Okay) => {}
            Some(Value::SimpleString(s)) if s == "OK" => {}
            Some(r) => {
                bump(&i.stats.errors);
                let text = error_text(r);
                return Err(match error_code(r).as_deref() {
                    Some("OOM") | Some("READONLY") | Some("NOPERM") => RemoteError::Refused(text),
                    Some("CLUSTERDOWN") | Some("MASTERDOWN") => RemoteError::Unreachable(text),
                    _ => RemoteError::Protocol(text),
                });
            }
            None => {
                bump(&i.stats.errors);
                return Err(RemoteError::Protocol("no reply to SET".into()));
            }
        }
        add(&i.stats.bytes_sent, value.len() as u64);
        if want > 0 {
            let got = match replies.get(1) {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                other => {
                    bump(&i.stats.errors);
                    let text = other.map(error_text).unwrap_or_default();
                    self.delete_best_effort(&key);
                    return Err(RemoteError::Protocol(format!("WAIT: {text}")));
                }
            };
            if got < want {
                i.not_replicated();
                self.delete_best_effort(&key);
                return Err(RemoteError::NotReplicated { got, want });
            }
        }
        i.stats.stored(value.len());
        bump(&i.stats.durable_puts);
        Ok(())
    }

    fn put_durable_many(
        &self,
        space: &str,
        pages: &[(u64, &[u8])],
    ) -> Vec<Result<(), RemoteError>> {
        let i = &self.inner;
        let fail_all = |e: &RemoteError| -> Vec<Result<(), RemoteError>> {
            pages
                .iter()
                .map(|_| Err(RemoteError::Unreachable(e.to_string())))
                .collect()
        };
        if i.stop.load(Ordering::Relaxed) {
            return fail_all(&RemoteError::Unreachable("the tier is shut down".into()));
        }
        let keys = match SpaceKeys::new(&i.cfg.key_prefix, &i.cfg.node_name, space) {
            Ok(k) => k,
            Err(e) => return fail_all(&e),
        };
        let mut out: Vec<Result<(), RemoteError>> = pages
            .iter()
            .map(|_| Err(RemoteError::Unreachable("not sent".into())))
            .collect();
        // One pipeline per primary: its SETs, then one WAIT that counts them all.
        let mut groups: std::collections::BTreeMap<String, Vec<(usize, String, Vec<u8>)>> =
            Default::default();
        for (idx, &(page, data)) in pages.iter().enumerate() {
            let key = keys.key(Kind::Durable, page);
            let value = match codec::encode(key.as_bytes(), 0, data, i.cfg.compress) {
                Ok(v) => v,
                Err(e) => {
                    out[idx] = Err(e);
                    continue;
                }
            };
            let slot = slot_of(key.as_bytes());
            let addr = i.router.addr_for_slot(slot).or_else(|| {
                let _ = i.router.refresh(i.probe_timeout());
                i.router.addr_for_slot(slot)
            });
            match addr {
                Some(a) => groups.entry(a).or_default().push((idx, key, value)),
                None => {
                    bump(&i.stats.errors);
                    out[idx] = Err(RemoteError::Unreachable(format!(
                        "no primary serves slot {slot}"
                    )));
                }
            }
        }
        let want = u64::from(i.cfg.replicas);
        let reply_timeout = ms(i.cfg.wait_timeout_ms + i.cfg.op_timeout_ms.max(500));
        let _order = i.durable_order.read();
        let all: Vec<&str> = groups
            .values()
            .flatten()
            .map(|(_, k, _)| k.as_str())
            .collect();
        i.cancel_forgets(&all);
        for (addr, items) in groups {
            let mut pipe = redis::pipe();
            for (_, key, value) in &items {
                pipe.cmd("SET").arg(key).arg(value);
            }
            if want > 0 {
                pipe.cmd("WAIT").arg(want).arg(i.cfg.wait_timeout_ms);
            }
            let count = items.len() + usize::from(want > 0);
            let replies =
                match i
                    .router
                    .round_trip(&addr, &pipe.get_packed_pipeline(), count, reply_timeout)
                {
                    Ok(r) => r,
                    Err(f) => {
                        i.fail(&addr, &f);
                        for (idx, _, _) in &items {
                            out[*idx] = Err(match &f {
                                Fail::Timeout => RemoteError::Timeout,
                                Fail::Conn(e) => RemoteError::Unreachable(format!("{addr}: {e}")),
                            });
                        }
                        continue;
                    }
                };
            let got = if want > 0 {
                match replies.get(items.len()) {
                    Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                    _ => {
                        bump(&i.stats.errors);
                        0
                    }
                }
            } else {
                0
            };
            for (k, (idx, key, value)) in items.iter().enumerate() {
                let ok = matches!(
                    replies.get(k),
                    Some(Value::Okay) | Some(Value::SimpleString(_))
                );
                out[*idx] = if !ok {
                    bump(&i.stats.errors);
                    let r = replies.get(k);
                    let text = r
                        .map(error_text)
                        .unwrap_or_else(|| "no reply to SET".into());
                    match r.and_then(error_code).as_deref() {
                        Some("OOM") | Some("READONLY") | Some("NOPERM") => {
                            Err(RemoteError::Refused(text))
                        }
                        Some(c) if retryable(c) => {
                            i.need_refresh.store(true, Ordering::Relaxed);
                            Err(RemoteError::Unreachable(text))
                        }
                        _ => Err(RemoteError::Protocol(text)),
                    }
                } else if got < want {
                    i.not_replicated();
                    self.delete_best_effort(key);
                    Err(RemoteError::NotReplicated { got, want })
                } else {
                    add(&i.stats.bytes_sent, value.len() as u64);
                    i.stats.stored(value.len());
                    bump(&i.stats.durable_puts);
                    Ok(())
                };
            }
        }
        out
    }

    fn get_durable(&self, space: &str, page: u64, out: &mut [u8]) -> Result<bool, RemoteError> {
        let i = &self.inner;
        let start = Instant::now();
        bump(&i.stats.durable_gets);
        let r = self.get_durable_inner(space, page, out);
        i.stats.get_latency.record(start.elapsed());
        r
    }

    fn forget(&self, space: &str, pages: &[u64]) {
        let i = &self.inner;
        let Ok(keys) = SpaceKeys::new(&i.cfg.key_prefix, &i.cfg.node_name, space) else {
            bump(&i.stats.errors);
            return;
        };
        let mut q = i.queue.lock();
        for &p in pages {
            if q.forgets >= i.cfg.queue_pages.saturating_mul(FORGET_SLACK) {
                bump(&i.stats.errors);
                continue;
            }
            q.forgets += 1;
            q.jobs.push_back(Job::Forget {
                keys: [keys.key(Kind::Ephemeral, p), keys.key(Kind::Durable, p)],
            });
        }
        i.queue_cv.notify_one();
    }

    fn available(&self) -> bool {
        !self.inner.is_down() && !self.inner.stop.load(Ordering::Relaxed)
    }
}

impl RedisTier {
    fn get_durable_inner(
        &self,
        space: &str,
        page: u64,
        out: &mut [u8],
    ) -> Result<bool, RemoteError> {
        let i = &self.inner;
        if out.len() != REMOTE_PAGE {
            return Err(RemoteError::Protocol(format!(
                "the output buffer is {} bytes, not {REMOTE_PAGE}",
                out.len()
            )));
        }
        if i.stop.load(Ordering::Relaxed) {
            return Err(RemoteError::Unreachable("the tier is shut down".into()));
        }
        let keys = SpaceKeys::new(&i.cfg.key_prefix, &i.cfg.node_name, space)?;
        let key = keys.key(Kind::Durable, page);
        let packed = redis::cmd("GET").arg(&key).get_packed_command();
        let reply_timeout = ms(i.cfg.op_timeout_ms.max(500));
        // A read retries through a failover: the page lives nowhere else.
        let deadline = Instant::now() + ms(i.cfg.durable_timeout_ms);
        let replies = i.durable_round_trip(&key, &packed, 1, reply_timeout, deadline)?;
        match replies.first() {
            Some(Value::Nil) => Ok(false),
            Some(Value::BulkString(b)) => {
                add(&i.stats.bytes_received, b.len() as u64);
                match codec::decode_into(key.as_bytes(), b, out) {
                    Ok(_) => Ok(true),
                    Err(e) => {
                        bump(&i.stats.corrupt);
                        Err(e)
                    }
                }
            }
            Some(r) => {
                bump(&i.stats.errors);
                Err(RemoteError::Protocol(error_text(r)))
            }
            None => {
                bump(&i.stats.errors);
                Err(RemoteError::Protocol("no reply to GET".into()))
            }
        }
    }

    /// Deletes `key` from its primary, once, bounded by the op timeout; errors are ignored.
    fn delete_best_effort(&self, key: &str) {
        let i = &self.inner;
        if let Some(addr) = i.router.addr_for_slot(slot_of(key.as_bytes())) {
            let packed = redis::cmd("DEL").arg(key).get_packed_command();
            let _ = i
                .router
                .round_trip(&addr, &packed, 1, ms(i.cfg.op_timeout_ms.max(200)));
        }
    }
}
