//! Profiling aid: puts corpus pages (or synthetic ones) into a pool with the codec given
//! (`none`, `lz4`, `zstd`), repeatedly. `perf record target/release/examples/put_loop CORPUS none`.
use tmem_core::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .and_then(|p| std::fs::read(p).ok())
        .unwrap_or_else(|| vec![7u8; 64 << 20]);
    let codec = match args.next().as_deref() {
        Some("lz4") => Codec::Lz4,
        Some("zstd") => Codec::Zstd(1),
        _ => Codec::None,
    };
    let n = (data.len() / PAGE_SIZE).min(60_000);
    let t = std::time::Instant::now();
    for _ in 0..5 {
        let e = Engine::new(EngineConfig::with_budget(1 << 34));
        let c = ClientId(1);
        e.add_client(c, ClientConfig::default()).expect("client");
        let p = e
            .create_pool(
                c,
                PoolSpec::private_persistent()
                    .with_codec(codec)
                    .with_dedup(DedupScope::Off),
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
    }
    eprintln!("{:.0} puts/s", (5 * n) as f64 / t.elapsed().as_secs_f64());
}
