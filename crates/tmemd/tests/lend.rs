//! The lend loop against a real redis-server: the node's `maxmemory` follows the host's
//! available memory (half the surplus or deficit over `keep_free` per round, within
//! `[min, max]`), its policy becomes `volatile-lru`, and a node that cannot be reached is
//! counted, not fatal.

use std::time::Duration;

use tmem_api::Size;
use tmemd::config::LendConfig;
use tmemd::remote::Lender;

const MIB: u64 = 1 << 20;

struct NoHost;

impl tmem_balloon::manager::HostProbe for NoHost {
    fn sample(&self) -> tmem_balloon::policy::HostView {
        tmem_balloon::policy::HostView::default()
    }
}

#[test]
fn lent_memory_follows_the_hosts_available_memory() {
    let Some(bin) = tmem_vm::test_tool("redis-server") else {
        return;
    };
    let server = tmem_remote::testing::RedisServer::start(&bin, &["--maxmemory", "100mb"])
        .expect("redis-server");
    let cfg = LendConfig {
        node: server.addr.clone(),
        min: Size(32 * MIB),
        max: Size(512 * MIB),
        keep_free: Size(1024 * MIB),
        // The thread's own rounds (with an empty host view) must not interfere: a long interval.
        interval_ms: 3_600_000,
    };
    let lender = Lender::start(cfg, std::sync::Arc::new(NoHost));
    // The thread's first round runs at once with 0 available: down to min.
    let t = Duration::from_secs(1);
    assert!(
        tmem_itest_wait(|| tmem_remote::get_maxmemory(&server.addr, t).ok() == Some(32 * MIB)),
        "{:?}",
        lender.info()
    );
    assert_eq!(
        tmem_remote::get_policy(&server.addr, t).unwrap(),
        "volatile-lru"
    );
    // 400 MiB more than keep_free available: +200 MiB per round, up to max.
    let mut seen = vec![];
    for _ in 0..4 {
        lender.round(1424 * MIB);
        seen.push(tmem_remote::get_maxmemory(&server.addr, t).unwrap() / MIB);
    }
    assert_eq!(seen, vec![232, 432, 512, 512], "{:?}", lender.info());
    // The guests take memory: 600 MiB short of keep_free: -300 MiB per round, down to min.
    seen.clear();
    for _ in 0..3 {
        lender.round(424 * MIB);
        seen.push(tmem_remote::get_maxmemory(&server.addr, t).unwrap() / MIB);
    }
    assert_eq!(seen, vec![212, 32, 32], "{:?}", lender.info());
    let info = lender.info();
    assert_eq!(info.bytes, 32 * MIB);
    assert!(info.changes >= 5 && info.errors == 0, "{info:?}");
    // The node goes away: counted, nothing else.
    drop(server);
    lender.round(4096 * MIB);
    assert!(lender.info().errors > 0);
}

fn tmem_itest_wait(mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
