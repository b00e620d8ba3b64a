//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};
use tmem_remote::{Mode, RemoteConfig, REMOTE_PAGE};

/// A page that identifies `(seed, page)`; incompressible unless `compressible`.
pub fn page(seed: u64, page: u64, compressible: bool) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(page)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9)
        | 1;
    let mut out = vec![0u8; REMOTE_PAGE];
    for (i, b) in out.iter_mut().enumerate() {
        if compressible {
            *b = ((i / 256) as u64 ^ seed ^ page) as u8;
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 32) as u8;
        }
    }
    out[..8].copy_from_slice(&page.to_le_bytes());
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out
}

/// A configuration for tests: generous timeouts (the test machine is shared).
pub fn config(mode: Mode, nodes: Vec<String>) -> RemoteConfig {
    RemoteConfig {
        mode,
        nodes,
        node_name: "testhost".into(),
        replicas: 0,
        op_timeout_ms: 1000,
        wait_timeout_ms: 500,
        durable_timeout_ms: 20_000,
        ..RemoteConfig::default()
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
