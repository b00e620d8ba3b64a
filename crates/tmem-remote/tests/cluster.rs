//! The tier against a real 6-node Redis Cluster (3 primaries, 1 replica each) on loopback.

mod common;

use common::{config, page, wait_until};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tmem_remote::keys::{slot_of, Kind, SpaceKeys};
use tmem_remote::testing::{query, Cluster};
use tmem_remote::{Mode, RedisTier, RemoteError, RemoteTier, REMOTE_PAGE};

/// Clusters are CPU-hungry on a small machine: one at a time, so that no failover is
/// triggered by a starved node.
static SERIAL: Mutex<()> = Mutex::new(());

fn cluster() -> Option<Cluster> {
    let [server, cli] = tmem_vm::test_tools(["redis-server", "redis-cli"])?;
    Some(Cluster::start(&server, &cli, 3, 1).expect("start a cluster"))
}

fn tier(c: &Cluster, replicas: u32) -> std::sync::Arc<RedisTier> {
    let mut cfg = config(Mode::Cluster, c.addrs());
    cfg.replicas = replicas;
    let t = RedisTier::connect(cfg).expect("connect");
    assert!(t.available());
    t
}

#[test]
fn slots_and_ephemeral_round_trip() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = cluster() else { return };
    let keys = SpaceKeys::new("tmem", "testhost", "c/u/1").unwrap();
    for p in [0u64, 1, 63, 64, 1000, 123_456] {
        let k = keys.key(Kind::Ephemeral, p);
        assert_eq!(c.keyslot(&k).unwrap(), slot_of(k.as_bytes()), "{k}");
    }
    let t = tier(&c, 1);
    for p in 0..640u64 {
        t.demote("c/u/1", p, p * 3, &page(11, p, p % 3 == 0));
    }
    assert!(t.flush(Duration::from_secs(30)));
    let got = t.fetch("c/u/1", &(0..640).collect::<Vec<_>>());
    for (p, g) in got.iter().enumerate() {
        let g = g.as_ref().expect("hit");
        assert_eq!(g.tag, p as u64 * 3);
        assert_eq!(g.data, page(11, p as u64, p % 3 == 0));
    }
    assert_eq!(t.stats().demoted_pages, 640);
    // A run of 64 pages is one MGET on one node; ten runs are ten MGETs.
    let mget_calls = || -> u64 {
        c.addrs()
            .iter()
            .map(|a| {
                let info: String = query(a, redis::cmd("INFO").arg("commandstats")).unwrap();
                info.lines()
                    .find_map(|l| l.strip_prefix("cmdstat_mget:calls="))
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    for a in c.addrs() {
        let _: () = query(&a, redis::cmd("CONFIG").arg("RESETSTAT")).unwrap();
    }
    assert!(t
        .fetch("c/u/1", &(128..192).collect::<Vec<_>>())
        .iter()
        .all(Option::is_some));
    assert_eq!(mget_calls(), 1);
    assert!(t
        .fetch("c/u/1", &(0..640).collect::<Vec<_>>())
        .iter()
        .all(Option::is_some));
    assert_eq!(mget_calls(), 11);
    t.forget("c/u/1", &(0..320).collect::<Vec<_>>());
    assert!(t.flush(Duration::from_secs(30)));
    let got = t.fetch("c/u/1", &(0..640).collect::<Vec<_>>());
    assert!(got[..320].iter().all(Option::is_none));
    assert!(got[320..].iter().all(Option::is_some));
}

#[test]
fn durable_pages_survive_a_primary_failover() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = cluster() else { return };
    let t = tier(&c, 1);
    let space = "s/durable";
    let keys = SpaceKeys::new("tmem", "testhost", space).unwrap();
    let mut acked = Vec::new();
    for p in 0..2000u64 {
        match t.put_durable(space, p, &page(12, p, p % 4 == 0)) {
            Ok(()) => acked.push(p),
            Err(e) => eprintln!("page {p} not stored: {e}"),
        }
    }
    assert!(acked.len() >= 1990, "only {} acknowledged", acked.len());
    let slot = slot_of(keys.key(Kind::Durable, 0).as_bytes());
    let victim = c.primary_of_slot(slot).unwrap();
    let victim_pages = acked
        .iter()
        .filter(|&&p| {
            c.primary_of_slot(slot_of(keys.key(Kind::Durable, p).as_bytes()))
                .ok()
                .as_deref()
                == Some(victim.as_str())
        })
        .count();
    assert!(victim_pages > 100, "{victim_pages}");
    eprintln!("killing {victim}, primary of {victim_pages} pages");
    c.kill(&victim).unwrap();
    let start = Instant::now();
    // Read everything back at once: reads of the dead primary's slots retry across the
    // failover (get_durable's own retry loop).
    let mut out = vec![0u8; REMOTE_PAGE];
    for &p in &acked {
        match t.get_durable(space, p, &mut out) {
            Ok(true) => assert!(out == page(12, p, p % 4 == 0), "page {p} differs"),
            other => panic!("page {p}: {other:?} after {:?}", start.elapsed()),
        }
    }
    eprintln!(
        "all {} pages read back in {:?}",
        acked.len(),
        start.elapsed()
    );
    let new = c
        .wait_failover(slot, &victim, Duration::from_secs(30))
        .unwrap();
    assert_ne!(new, victim);
    // The tier comes back up (the breaker tripped on the dead node) and writes again.
    assert!(wait_until(Duration::from_secs(30), || t.available()));
    assert!(t.stats().down_transitions >= 1);
    // The promoted primary has no replica now: replicas=1 cannot be met on its slots.
    match t.put_durable(space, 0, &page(13, 0, false)) {
        Err(RemoteError::NotReplicated { got: 0, want: 1 }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stopped_replica_means_not_replicated() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = cluster() else { return };
    let t = tier(&c, 1);
    let space = "s/wait";
    let keys = SpaceKeys::new("tmem", "testhost", space).unwrap();
    t.put_durable(space, 7, &page(14, 7, false)).unwrap();
    let slot = slot_of(keys.key(Kind::Durable, 7).as_bytes());
    let primary = c.primary_of_slot(slot).unwrap();
    let replicas = c.replicas_of(&primary).unwrap();
    assert_eq!(replicas.len(), 1);
    let replica = c
        .servers
        .iter()
        .find(|s| s.addr == replicas[0])
        .expect("replica server");
    replica.pause().unwrap();
    let start = Instant::now();
    let r = t.put_durable(space, 7, &page(15, 7, false));
    let took = start.elapsed();
    replica.resume().unwrap();
    match r {
        Err(RemoteError::NotReplicated { got: 0, want: 1 }) => {}
        other => panic!("{other:?}"),
    }
    // Within the WAIT timeout (500 ms) plus slack, not the durable retry budget.
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The unreplicated copy was deleted (best effort), so no stale read.
    let mut out = vec![0u8; REMOTE_PAGE];
    assert!(!t.get_durable(space, 7, &mut out).unwrap());
    // Pages on other primaries were unaffected, and once the replica is back puts succeed.
    assert!(wait_until(Duration::from_secs(20), || t
        .put_durable(space, 7, &page(16, 7, false))
        .is_ok()));
    assert!(t.get_durable(space, 7, &mut out).unwrap());
    assert_eq!(out, page(16, 7, false));
    assert!(t.stats().not_replicated >= 1);
    // The write that was not replicated made the tier probe every primary; all answered,
    // so a replica that lags alone does not take the tier down.
    assert_eq!(t.stats().down_transitions, 0);
    assert!(t.available());
}
