//! The remote tier in the daemon: the [`tmem_remote::RedisTier`] behind every export, its
//! figures for `GET /stats`, and the lender that moves this host's Redis node's `maxmemory`
//! as the host's own guests need memory.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tmem_api::{LendInfo, RemoteInfo};
use tmem_balloon::manager::{HostProbe, ProcHost};
use tmem_remote::{Mode, RedisTier, RemoteConfig};

use crate::config::LendConfig;

/// Timeout of one `CONFIG` exchange with the local Redis node.
const LEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Smallest change of `maxmemory` worth making.
const LEND_STEP: u64 = 1 << 20;

/// The next amount to lend: the current one moved by half the surplus (or deficit) of
/// available memory over `keep_free`, within `[min, max]`, in whole MiB. Half a step per
/// round keeps the loop from overshooting while Redis fills or empties.
pub fn next_lend(current: u64, available: u64, cfg: &LendConfig) -> u64 {
    let surplus = available as i128 - cfg.keep_free.0 as i128;
    let next = (current as i128 + surplus / 2).clamp(cfg.min.0 as i128, cfg.max.0 as i128) as u64;
    next & !(LEND_STEP - 1)
}

/// The lender's state, shared with its thread.
#[derive(Debug)]
pub struct Lender {
    cfg: LendConfig,
    bytes: AtomicU64,
    target: AtomicU64,
    changes: AtomicU64,
    errors: AtomicU64,
}

impl Lender {
    /// Starts the lender thread (it stops when the returned `Arc` is dropped).
    pub fn start(cfg: LendConfig, host: Arc<dyn HostProbe>) -> Arc<Lender> {
        let l = Arc::new(Lender {
            cfg,
            bytes: AtomicU64::new(0),
            target: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&l);
        let every = Duration::from_millis(l.cfg.interval_ms);
        let spawned = std::thread::Builder::new()
            .name("tmemd-lend".into())
            .spawn(move || lend_loop(weak, host, every));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lender thread; this host lends nothing");
        }
        l
    }

    /// One round: reads the node's `maxmemory` (0 = unlimited counts as `max`), computes
    /// the next amount from the host's available memory and sets it when it moved.
    pub fn round(&self, available: u64) {
        let node = &self.cfg.node;
        let current = match tmem_remote::get_maxmemory(node, LEND_TIMEOUT) {
            Ok(0) => self.cfg.max.0,
            Ok(b) => b,
            Err(e) => {
                if self.errors.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!(node, error = %e, "cannot read the lending node's maxmemory");
                }
                return;
            }
        };
        if self.bytes.load(Relaxed) == 0 {
            // First contact: Redis must evict only ephemeral copies.
            if let Err(e) = tmem_remote::set_policy(node, LEND_TIMEOUT) {
                self.errors.fetch_add(1, Relaxed);
                tracing::warn!(node, error = %e, "cannot set the lending node's maxmemory-policy");
            }
        }
        let next = next_lend(current, available, &self.cfg);
        self.target.store(next, Relaxed);
        if next.abs_diff(current) < LEND_STEP && self.bytes.load(Relaxed) != 0 {
            self.bytes.store(current, Relaxed);
            return;
        }
        match tmem_remote::set_maxmemory(node, next, LEND_TIMEOUT) {
            Ok(()) => {
                self.bytes.store(next, Relaxed);
                self.changes.fetch_add(1, Relaxed);
                tracing::info!(
                    node,
                    bytes = next,
                    available,
                    "lending memory to the remote tier"
                );
            }
            Err(e) => {
                self.errors.fetch_add(1, Relaxed);
                tracing::warn!(node, error = %e, "cannot set the lending node's maxmemory");
            }
        }
    }

    /// What `GET /stats` shows.
    pub fn info(&self) -> LendInfo {
        LendInfo {
            node: self.cfg.node.clone(),
            bytes: self.bytes.load(Relaxed),
            target: self.target.load(Relaxed),
            changes: self.changes.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

fn lend_loop(lender: Weak<Lender>, host: Arc<dyn HostProbe>, every: Duration) {
    loop {
        let Some(l) = lender.upgrade() else { return };
        l.round(host.sample().available);
        drop(l);
        std::thread::sleep(every);
    }
}

/// The daemon's remote tier and lender.
#[derive(Debug, Default)]
pub struct Remote {
    /// The tier, if `[remote]` is configured.
    pub tier: Option<Arc<RedisTier>>,
    /// The lender, if `[lend]` is configured.
    pub lender: Option<Arc<Lender>>,
}

impl Remote {
    /// Connects the tier (a tier that cannot be reached yet starts down and keeps trying)
    /// and starts the lender. A tier that cannot even be set up is logged and left out:
    /// the daemon then runs with local storage only.
    pub fn start(cfg: Option<&RemoteConfig>, lend: Option<&LendConfig>) -> Remote {
        let tier = cfg.and_then(|c| match RedisTier::connect(c.clone()) {
            Ok(t) => {
                tracing::info!(nodes = ?c.nodes, mode = ?c.mode, "remote tier configured");
                Some(t)
            }
            Err(e) => {
                tracing::error!(error = %e, "remote tier not started; exports use local storage only");
                None
            }
        });
        let lender = lend.map(|l| Lender::start(l.clone(), Arc::new(ProcHost)));
        Remote { tier, lender }
    }

    /// The tier as the exports see it.
    pub fn for_exports(&self) -> Option<Arc<dyn tmem_exports::RemoteTier>> {
        self.tier
            .clone()
            .map(|t| t as Arc<dyn tmem_exports::RemoteTier>)
    }

    /// What `GET /stats` shows (`None` when neither a tier nor lending is configured).
    pub fn info(&self) -> Option<RemoteInfo> {
        if self.tier.is_none() && self.lender.is_none() {
            return None;
        }
        let mut info = RemoteInfo {
            mode: "none".into(),
            lend: self.lender.as_ref().map(|l| l.info()),
            ..Default::default()
        };
        if let Some(t) = &self.tier {
            let s = t.stats();
            let c = t.config();
            info.mode = match c.mode {
                Mode::Cluster => "cluster",
                Mode::Single => "single",
            }
            .into();
            info.nodes = c.nodes.clone();
            info.reachable = s.reachable;
            info.down_transitions = s.down_transitions;
            info.demoted_pages = s.demoted_pages;
            info.demote_dropped = s.demote_dropped;
            info.fetch_pages = s.fetch_hits + s.fetch_misses;
            info.fetch_hits = s.fetch_hits;
            info.durable_puts = s.durable_puts;
            info.durable_gets = s.durable_gets;
            info.not_replicated = s.not_replicated;
            info.errors = s.errors;
            info.timeouts = s.timeouts;
            info.corrupt = s.corrupt;
            info.bytes_sent = s.bytes_sent;
            info.bytes_received = s.bytes_received;
            info.stored_bytes = s.stored_bytes_estimate;
            info.fetch_p50_us = s.fetch_p50_us;
            info.fetch_p99_us = s.fetch_p99_us;
            info.get_p50_us = s.get_durable_p50_us;
            info.get_p99_us = s.get_durable_p99_us;
        }
        Some(info)
    }

    /// Gives queued writes (demotions, deletions) up to two seconds, then stops the tier's
    /// threads; what is still queued is dropped (demotions are only a cache; a deletion
    /// that did not happen leaves a copy nothing reads).
    pub fn shutdown(&self) {
        if let Some(t) = &self.tier {
            if !t.flush(Duration::from_secs(2)) {
                tracing::info!("remote tier: queued writes dropped at shutdown");
            }
            t.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmem_api::Size;

    fn cfg() -> LendConfig {
        LendConfig {
            node: "127.0.0.1:6379".into(),
            min: Size(64 << 20),
            max: Size(1 << 30),
            keep_free: Size(2 << 30),
            interval_ms: 1000,
        }
    }

    #[test]
    fn lend_follows_available_memory_within_bounds() {
        let c = cfg();
        // 1 GiB more than keep_free available: grow by half of it.
        assert_eq!(next_lend(256 << 20, 3 << 30, &c), (256 << 20) + (512 << 20));
        // Guests took memory: 512 MiB short of keep_free → give back 256 MiB.
        assert_eq!(next_lend(512 << 20, (2 << 30) - (512 << 20), &c), 256 << 20);
        // Bounds.
        assert_eq!(next_lend(1 << 30, 20 << 30, &c), 1 << 30);
        assert_eq!(next_lend(64 << 20, 0, &c), 64 << 20);
        // Whole MiB.
        assert_eq!(next_lend(100 << 20, (2 << 30) + 3, &c) % (1 << 20), 0);
    }
}
