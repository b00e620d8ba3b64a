//! Profiling aid: puts a corpus (or synthetic pages) into an lz4 pool, then loops gets in a
//! shuffled order. `perf record cargo run --release --example get_loop -- CORPUS [PAGES]`.
use tmem_core::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .and_then(|p| std::fs::read(p).ok())
        .unwrap_or_else(|| vec![7u8; 64 << 20]);
    let n: usize = args
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000)
        .min(data.len() / PAGE_SIZE);
    let e = Engine::new(EngineConfig::with_budget(1 << 34));
    let c = ClientId(1);
    e.add_client(c, ClientConfig::default()).expect("client");
    let p = e
        .create_pool(
            c,
            PoolSpec::private_persistent().with_dedup(DedupScope::Off),
        )
        .expect("pool");
    for i in 0..n {
        e.put(
            c,
            PageKey::new(p, ObjectId::default(), i as u32),
            &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
        )
        .expect("put");
    }
    let mut out = [0u8; PAGE_SIZE];
    let t = std::time::Instant::now();
    let mut k = 0u64;
    for _ in 0..10 {
        for j in 0..n {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (k >> 33) as usize % n;
            let _ = e.get(c, PageKey::new(p, ObjectId::default(), i as u32), &mut out);
            std::hint::black_box(&out);
            let _ = j;
        }
    }
    eprintln!("{:.0} gets/s", (10 * n) as f64 / t.elapsed().as_secs_f64());
}
