//! Criterion micro-benchmarks of the engine's hot paths, each beside its physical limit
//! (a 4 KiB memcpy, raw lz4) measured in the same run. Pages come from the corpus file
//! `TMEM_CORPUS` (see scripts/bench-core) when set, else from a built-in mix of
//! text-like, structured and random pages.
#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use tmem_core::*;

const N: usize = 4096;

fn pages() -> Vec<[u8; PAGE_SIZE]> {
    if let Ok(path) = std::env::var("TMEM_CORPUS") {
        if let Ok(data) = std::fs::read(path) {
            let v: Vec<[u8; PAGE_SIZE]> = data
                .chunks_exact(PAGE_SIZE)
                .filter(|p| p.iter().any(|&b| b != 0))
                .take(N)
                .map(|p| p.try_into().unwrap_or([0; PAGE_SIZE]))
                .collect();
            if v.len() == N {
                return v;
            }
        }
    }
    let words: [&[u8]; 8] = [
        b"struct ",
        b"return ",
        b"0x7f3a9c00 ",
        b"value",
        b" = ",
        b"self.",
        b"\n    ",
        b"None",
    ];
    (0..N)
        .map(|i| {
            let mut p = [0u8; PAGE_SIZE];
            let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut at = 0;
            while at < PAGE_SIZE {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 10 == 0 {
                    p[at] = x as u8; // incompressible page
                    at += 1;
                    continue;
                }
                let w = words[(x % 8) as usize];
                let n = w.len().min(PAGE_SIZE - at);
                p[at..at + n].copy_from_slice(&w[..n]);
                at += n;
                if at + 8 <= PAGE_SIZE && x % 5 == 0 {
                    p[at..at + 8].copy_from_slice(&x.to_le_bytes());
                    at += 8;
                }
            }
            p
        })
        .collect()
}

fn engine(codec: Codec, dedup: DedupScope) -> (Engine, PoolId) {
    let e = Engine::new(EngineConfig::with_budget(1 << 34));
    let c = ClientId(1);
    e.add_client(c, ClientConfig::default()).expect("client");
    let p = e
        .create_pool(
            c,
            PoolSpec::private_persistent()
                .with_codec(codec)
                .with_dedup(dedup),
        )
        .expect("pool");
    (e, p)
}

fn bench(c: &mut Criterion) {
    let pages = pages();
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Elements(1));
    let mut out = [0u8; PAGE_SIZE];
    let mut i = 0usize;
    g.bench_function("limit/memcpy", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            out.copy_from_slice(&pages[i]);
            black_box(&out);
        })
    });
    let mut buf = vec![0u8; 5000];
    g.bench_function("limit/lz4-compress", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(lz4::block::compress_to_buffer(&pages[i], None, false, &mut buf).ok())
        })
    });
    let compressed: Vec<Vec<u8>> = pages
        .iter()
        .map(|p| lz4::block::compress(p, None, false).unwrap_or_default())
        .collect();
    g.bench_function("limit/lz4-decompress", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(
                lz4::block::decompress_to_buffer(&compressed[i], Some(PAGE_SIZE as i32), &mut out)
                    .ok(),
            )
        })
    });
    for (name, codec, dedup) in [
        ("raw", Codec::None, DedupScope::Off),
        ("lz4", Codec::Lz4, DedupScope::Off),
        ("lz4+dedup", Codec::Lz4, DedupScope::Client),
        ("zstd-1", Codec::Zstd(1), DedupScope::Off),
    ] {
        let (e, p) = engine(codec, dedup);
        let c = ClientId(1);
        let mut k = 0u32;
        g.bench_with_input(BenchmarkId::new("put", name), &(), |b, _| {
            b.iter(|| {
                k = k.wrapping_add(1);
                let key = PageKey::new(p, ObjectId::default(), k % (4 * N as u32));
                e.put(c, key, &pages[k as usize % N]).expect("put");
            })
        });
        for j in 0..4 * N as u32 {
            e.put(
                c,
                PageKey::new(p, ObjectId::default(), j),
                &pages[j as usize % N],
            )
            .expect("put");
        }
        g.bench_with_input(BenchmarkId::new("get", name), &(), |b, _| {
            b.iter(|| {
                k = k.wrapping_add(7919);
                let key = PageKey::new(p, ObjectId::default(), k % (4 * N as u32));
                black_box(e.get(c, key, &mut out).expect("get"));
            })
        });
    }
    let (e, p) = engine(Codec::Lz4, DedupScope::Client);
    let zero = [0u8; PAGE_SIZE];
    let mut k = 0u32;
    g.bench_function("put/zero", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            e.put(
                ClientId(1),
                PageKey::new(p, ObjectId::default(), k % 65536),
                &zero,
            )
            .expect("put");
        })
    });
    g.bench_function("get/zero", |b| {
        b.iter(|| {
            k = k.wrapping_add(7919);
            black_box(
                e.get(
                    ClientId(1),
                    PageKey::new(p, ObjectId::default(), k % 65536),
                    &mut out,
                )
                .expect("get"),
            );
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench
}
criterion_main!(benches);
