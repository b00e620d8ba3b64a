//! The tier against one real `redis-server`.

mod common;

use common::{config, page, wait_until};
use std::time::Duration;
use tmem_remote::keys::{Kind, SpaceKeys};
use tmem_remote::testing::{free_port, query, RedisServer};
use tmem_remote::{
    get_maxmemory, get_policy, set_maxmemory, set_policy, Mode, RedisTier, RemoteError, RemoteTier,
    REMOTE_PAGE,
};

fn server(extra: &[&str]) -> Option<RedisServer> {
    let bin = tmem_vm::test_tool("redis-server")?;
    Some(RedisServer::start(&bin, extra).expect("start redis-server"))
}

fn tier(s: &RedisServer) -> std::sync::Arc<RedisTier> {
    let t = RedisTier::connect(config(Mode::Single, vec![s.addr.clone()])).expect("connect");
    assert!(t.available());
    t
}

#[test]
fn demote_fetch_round_trip() {
    let Some(s) = server(&[]) else { return };
    let t = tier(&s);
    let space = "c/0b5c-uuid/3";
    for p in 0..200u64 {
        t.demote(space, p, 1000 + p, &page(1, p, p % 2 == 0));
    }
    assert!(t.flush(Duration::from_secs(20)));
    let pages: Vec<u64> = (0..220).collect();
    let got = t.fetch(space, &pages);
    assert_eq!(got.len(), 220);
    for (p, g) in pages.iter().zip(&got) {
        if *p < 200 {
            let g = g.as_ref().expect("hit");
            assert_eq!(g.tag, 1000 + p);
            assert_eq!(g.data, page(1, *p, p % 2 == 0));
        } else {
            assert!(g.is_none());
        }
    }
    // Another space, or another host's name, sees nothing.
    assert!(t.fetch("c/other/3", &[1, 2]).iter().all(Option::is_none));
    let mut other = config(Mode::Single, vec![s.addr.clone()]);
    other.node_name = "otherhost".into();
    let t2 = RedisTier::connect(other).unwrap();
    assert!(t2.fetch(space, &[1, 2]).iter().all(Option::is_none));
    // Invalid space names are errors, not panics.
    t.demote("bad space{}", 1, 1, &page(1, 1, true));
    assert!(t.fetch("bad space", &[1]).iter().all(Option::is_none));
    assert!(t.put_durable("bad:space", 1, &page(1, 1, true)).is_err());
    let st = t.stats();
    assert!(st.reachable);
    assert_eq!(st.demoted_pages, 200);
    assert_eq!(st.fetch_hits, 200);
    assert!(st.fetch_misses >= 20);
    assert!(st.bytes_sent > 0 && st.bytes_received > 0 && st.stored_bytes_estimate > 0);
    assert!(st.fetch_p99_us >= st.fetch_p50_us);
    // Serializable for the daemon's API.
    let _ = serde_json::to_string(&st).unwrap();
    t.shutdown();
    assert!(!t.available());
}

#[test]
fn durable_put_get_and_forget() {
    let Some(s) = server(&[]) else { return };
    let t = tier(&s);
    let space = "s/export_1";
    let mut out = vec![0u8; REMOTE_PAGE];
    assert!(!t.get_durable(space, 5, &mut out).unwrap());
    for p in 0..100u64 {
        t.put_durable(space, p, &page(2, p, false)).unwrap();
        t.demote(space, p, 7, &page(3, p, false));
    }
    assert!(t.flush(Duration::from_secs(20)));
    for p in 0..100u64 {
        assert!(t.get_durable(space, p, &mut out).unwrap());
        assert_eq!(
            out,
            page(2, p, false),
            "durable copy is not overwritten by a demotion"
        );
    }
    // Durable keys have no TTL, ephemeral ones have.
    let keys = SpaceKeys::new("tmem", "testhost", space).unwrap();
    let ttl_d: i64 = query(&s.addr, redis::cmd("TTL").arg(keys.key(Kind::Durable, 3))).unwrap();
    let ttl_e: i64 = query(&s.addr, redis::cmd("TTL").arg(keys.key(Kind::Ephemeral, 3))).unwrap();
    assert_eq!(ttl_d, -1);
    assert!(ttl_e > 3000, "{ttl_e}");
    // A forget queued right after a demotion wins.
    t.demote(space, 500, 1, &page(4, 500, true));
    t.forget(space, &[500]);
    t.forget(space, &(0..50).collect::<Vec<_>>());
    assert!(t.flush(Duration::from_secs(20)));
    assert!(t.fetch(space, &[500])[0].is_none());
    for p in 0..50u64 {
        assert!(!t.get_durable(space, p, &mut out).unwrap());
    }
    assert!(t.fetch(space, &[0, 1, 49]).iter().all(Option::is_none));
    assert!(t.get_durable(space, 50, &mut out).unwrap());
    let st = t.stats();
    assert_eq!(st.durable_puts, 100);
    assert!(st.durable_gets >= 151);
    assert!(st.get_durable_p50_us > 0);
    // replicas = 1 on a server without replicas: NotReplicated, and the key is gone.
    let mut cfg = config(Mode::Single, vec![s.addr.clone()]);
    cfg.replicas = 1;
    cfg.wait_timeout_ms = 100;
    let t1 = RedisTier::connect(cfg).unwrap();
    match t1.put_durable(space, 900, &page(5, 900, false)) {
        Err(RemoteError::NotReplicated { got: 0, want: 1 }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!t1.get_durable(space, 900, &mut out).unwrap());
    assert_eq!(t1.stats().not_replicated, 1);
}

#[test]
fn garbage_values_are_misses_or_corrupt() {
    let Some(s) = server(&[]) else { return };
    let t = tier(&s);
    let space = "c/g/1";
    let keys = SpaceKeys::new("tmem", "testhost", space).unwrap();
    t.demote(space, 1, 9, &page(6, 1, false));
    t.put_durable(space, 1, &page(6, 1, false)).unwrap();
    assert!(t.flush(Duration::from_secs(20)));
    // A valid value copied under another key is rejected.
    let v: Vec<u8> = query(&s.addr, redis::cmd("GET").arg(keys.key(Kind::Ephemeral, 1))).unwrap();
    let _: () = query(
        &s.addr,
        redis::cmd("SET").arg(keys.key(Kind::Ephemeral, 2)).arg(&v),
    )
    .unwrap();
    let d: Vec<u8> = query(&s.addr, redis::cmd("GET").arg(keys.key(Kind::Durable, 1))).unwrap();
    let _: () = query(
        &s.addr,
        redis::cmd("SET").arg(keys.key(Kind::Durable, 2)).arg(&d),
    )
    .unwrap();
    // Garbage over page 3 (both kinds); a truncated copy over page 4.
    for k in [Kind::Ephemeral, Kind::Durable] {
        let _: () = query(
            &s.addr,
            redis::cmd("SET")
                .arg(keys.key(k, 3))
                .arg(vec![0xA5u8; 4128]),
        )
        .unwrap();
    }
    let _: () = query(
        &s.addr,
        redis::cmd("SET")
            .arg(keys.key(Kind::Ephemeral, 4))
            .arg(&v[..v.len() - 1]),
    )
    .unwrap();
    let got = t.fetch(space, &[1, 2, 3, 4]);
    assert_eq!(got[0].as_ref().map(|p| p.tag), Some(9));
    assert!(got[1].is_none() && got[2].is_none() && got[3].is_none());
    assert_eq!(t.stats().corrupt, 3);
    let mut out = vec![0u8; REMOTE_PAGE];
    for p in [2, 3] {
        match t.get_durable(space, p, &mut out) {
            Err(RemoteError::Corrupt(_)) => {}
            other => panic!("page {p}: {other:?}"),
        }
    }
    assert!(t.get_durable(space, 1, &mut out).unwrap());
    assert_eq!(out, page(6, 1, false));
}

#[test]
fn volatile_lru_evicts_only_ephemeral_copies() {
    let Some(s) = server(&["--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"]) else {
        return;
    };
    let t = tier(&s);
    let space = "c/lru/1";
    let mut acked = Vec::new();
    for p in 0..100u64 {
        if t.put_durable(space, p, &page(7, p, false)).is_ok() {
            acked.push(p);
        }
    }
    assert!(acked.len() >= 50, "only {} durable pages fit", acked.len());
    // Flood with ~12 MiB of ephemeral copies.
    for p in 1000..4000u64 {
        t.demote(space, p, p, &page(8, p, false));
        if p % 256 == 0 {
            t.flush(Duration::from_secs(20));
        }
    }
    assert!(t.flush(Duration::from_secs(30)));
    let info: String = query(&s.addr, redis::cmd("INFO").arg("stats")).unwrap();
    let evicted: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(evicted > 0, "nothing was evicted");
    let mut out = vec![0u8; REMOTE_PAGE];
    for &p in &acked {
        assert!(
            t.get_durable(space, p, &mut out).unwrap(),
            "durable page {p} evicted"
        );
        assert_eq!(out, page(7, p, false));
    }
    let hits = t
        .fetch(space, &(1000..4000).collect::<Vec<_>>())
        .iter()
        .filter(|p| p.is_some())
        .count();
    assert!(hits < 3000, "no ephemeral copy was evicted");
    assert!(t.available());
}

#[test]
fn lend_control() {
    let Some(s) = server(&[]) else { return };
    let to = Duration::from_secs(2);
    set_maxmemory(&s.addr, 64 << 20, to).unwrap();
    assert_eq!(get_maxmemory(&s.addr, to).unwrap(), 64 << 20);
    set_policy(&s.addr, to).unwrap();
    assert_eq!(get_policy(&s.addr, to).unwrap(), "volatile-lru");
    let port = free_port().unwrap();
    assert!(matches!(
        get_maxmemory(&format!("127.0.0.1:{port}"), to),
        Err(RemoteError::Unreachable(_))
    ));
    assert!(get_maxmemory("nonsense", to).is_err());
}

#[test]
fn starts_down_and_comes_up_then_survives_a_restart() {
    let Some(bin) = tmem_vm::test_tool("redis-server") else {
        return;
    };
    let port = free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut cfg = config(Mode::Single, vec![addr.clone()]);
    cfg.backoff_ms = 50;
    cfg.backoff_max_ms = 400;
    let t = RedisTier::connect(cfg).expect("a tier starts down");
    assert!(!t.available());
    assert!(!t.stats().reachable);
    t.demote("c/x/1", 1, 1, &page(1, 1, true));
    assert!(t.fetch("c/x/1", &[1])[0].is_none());
    assert!(t.stats().demote_dropped >= 1);
    let mut s = RedisServer::start_on(&bin, port, &[]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || t.available()));
    t.demote("c/x/1", 1, 1, &page(1, 1, true));
    assert!(t.flush(Duration::from_secs(10)));
    assert!(t.fetch("c/x/1", &[1])[0].is_some());
    s.kill();
    // The next request trips the breaker.
    assert!(t.fetch("c/x/1", &[1])[0].is_none());
    assert!(!t.available());
    assert_eq!(t.stats().down_transitions, 1);
    let _s2 = RedisServer::start_on(&bin, port, &[]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || t.available()));
    assert_eq!(t.stats().down_transitions, 1);
}

/// A deletion queued before a durable write of the same page never lands after it (the
/// export deletes a page's remote copy when the page moves back, and may write it remote
/// again right after); and a batched durable write stores every page.
#[test]
fn queued_forget_never_deletes_a_later_durable_write() {
    let Some(s) = server(&[]) else { return };
    let t = tier(&s);
    let space = "s/order.1";
    for round in 0..300u64 {
        let p = round % 7;
        t.put_durable(space, p, &page(round, p, false)).unwrap();
        t.forget(space, &[p]);
        if round % 2 == 0 {
            t.put_durable(space, p, &page(round + 1, p, false)).unwrap();
        } else {
            let data = page(round + 1, p, false);
            let r = t.put_durable_many(space, &[(p, &data[..])]);
            assert!(r[0].is_ok(), "{r:?}");
        }
        assert!(t.flush(Duration::from_secs(20)));
        let mut out = vec![0u8; REMOTE_PAGE];
        assert!(
            t.get_durable(space, p, &mut out).unwrap(),
            "round {round}: the later write was deleted"
        );
        assert_eq!(out, page(round + 1, p, false), "round {round}");
    }
    // A batch of many pages, then each read back.
    let pages: Vec<Vec<u8>> = (0..200u64).map(|p| page(9, p, p % 3 == 0)).collect();
    let batch: Vec<(u64, &[u8])> = pages
        .iter()
        .enumerate()
        .map(|(p, d)| (p as u64 + 1000, &d[..]))
        .collect();
    let r = t.put_durable_many(space, &batch);
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    for (p, d) in &batch {
        let mut out = vec![0u8; REMOTE_PAGE];
        assert!(t.get_durable(space, *p, &mut out).unwrap());
        assert_eq!(&out[..], *d);
    }
}
