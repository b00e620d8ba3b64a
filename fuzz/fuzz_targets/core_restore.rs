//! Fuzzes tmem-core's save-stream parser: arbitrary bytes (and mutations of a valid stream)
//! must be rejected with a typed error or restored, never panic, and a rejected stream must
//! leave the engine exactly as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tmem_core::*;

/// A small valid stream, so that mutations reach deep into the frames.
fn seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let e = Engine::new(EngineConfig::with_budget(8 << 20));
        let c = ClientId(1);
        let _ = e.add_client(c, ClientConfig::default());
        let mut buf = Vec::new();
        if let Ok(p) = e.create_pool(c, PoolSpec::private_persistent().with_label("s")) {
            for i in 0..4u32 {
                let mut page = [0u8; PAGE_SIZE];
                if i % 2 == 0 {
                    page.iter_mut().enumerate().for_each(|(j, b)| *b = (j % 7) as u8 ^ i as u8);
                }
                let _ = e.put(c, PageKey::new(p, ObjectId::default(), i), &page);
            }
            let _ = e.save(c, SaveOptions::default(), &mut buf);
        }
        buf
    })
}

fuzz_target!(|data: &[u8]| {
    let e = Engine::new(EngineConfig::with_budget(4 << 20));
    let c = ClientId(7);
    if e.add_client(c, ClientConfig::default()).is_err() {
        return;
    }
    // Either the raw input, or the seed stream with the input XORed over it.
    let input: Vec<u8> = if data.first().is_some_and(|b| b & 1 == 1) {
        let mut s = seed().to_vec();
        for (i, b) in data.iter().enumerate().skip(1) {
            let at = (i * 131 + usize::from(*b)) % s.len().max(1);
            if let Some(x) = s.get_mut(at) {
                *x ^= *b;
            }
        }
        s
    } else {
        data.to_vec()
    };
    match e.restore(c, &mut &input[..]) {
        Ok(_) => {}
        Err(_) => {
            let s = e.stats();
            assert_eq!((s.pages, s.pools, s.alloc.held_bytes), (0, 0, 0), "rejected stream changed the engine");
        }
    }
});
