//! The tier against misbehaving fake servers: it must miss, fail with typed errors, trip
//! its breaker where the server is unusable, never panic and never return a wrong page.

mod common;

use common::{config, page, wait_until};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tmem_remote::{Mode, RedisTier, RemoteConfig, RemoteError, RemoteTier, REMOTE_PAGE};

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// (a) Random bytes, whatever is asked.
    Garbage,
    /// (b) Accept, then close.
    Close,
    /// (c) Valid replies, each after 300 ms.
    Slow,
    /// (d) Valid RESP, garbage values: GET/MGET bulk garbage, SET +OK, WAIT :0.
    LyingValues,
    /// Announces absurd lengths (arrays and bulk strings of ~2^62 elements / bytes).
    HugeLengths,
}

struct Fake {
    addr: String,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn fake(b: Behaviour) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let st = Arc::clone(&stop);
    let accept = std::thread::spawn(move || {
        for (n, s) in l.incoming().enumerate() {
            if st.load(Ordering::SeqCst) {
                return;
            }
            let Ok(s) = s else { continue };
            let st = Arc::clone(&st);
            std::thread::spawn(move || serve(s, b, n as u64, &st));
        }
    });
    Fake {
        addr,
        stop,
        accept: Some(accept),
    }
}

/// Reads one RESP command (an array of bulk strings); None at EOF or on nonsense.
fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0u8; len + 2];
        r.read_exact(&mut buf).ok()?;
        buf.truncate(len);
        args.push(buf);
    }
    Some(args)
}

fn noise(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .collect()
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

fn serve(s: TcpStream, b: Behaviour, n: u64, stop: &AtomicBool) {
    let mut seed = 0x1234_5678_9abc_def1u64 ^ (n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    match b {
        Behaviour::Close => drop(s),
        Behaviour::Garbage => {
            while !stop.load(Ordering::SeqCst) {
                if w.write_all(&noise(&mut seed, 512)).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Behaviour::Slow | Behaviour::LyingValues | Behaviour::HugeLengths => {
            let mut r = BufReader::new(s);
            while !stop.load(Ordering::SeqCst) {
                let Some(args) = read_command(&mut r) else {
                    return;
                };
                let name = args
                    .first()
                    .map(|a| String::from_utf8_lossy(a).to_uppercase())
                    .unwrap_or_default();
                let reply: Vec<u8> = match (b, name.as_str()) {
                    (Behaviour::LyingValues, "GET") => bulk(&noise(&mut seed, 4128)),
                    (Behaviour::LyingValues, "MGET") => {
                        let mut out = format!("*{}\r\n", args.len() - 1).into_bytes();
                        for i in 1..args.len() {
                            // Some plausible-looking values: a real header prefix.
                            let mut v = b"TMRP\x01\x00\x00\x00".to_vec();
                            v.extend(noise(&mut seed, 24 + i * 10));
                            out.extend(bulk(&v));
                        }
                        out
                    }
                    (Behaviour::HugeLengths, "GET") => b"$4611686018427387903\r\nabc".to_vec(),
                    (Behaviour::HugeLengths, "MGET" | "CLUSTER") => {
                        b"*4611686018427387903\r\n$3\r\nabc\r\n".to_vec()
                    }
                    (Behaviour::HugeLengths, "SET") => b"*-5\r\n".to_vec(),
                    (Behaviour::HugeLengths, "WAIT") => b":99999999999999999999999\r\n".to_vec(),
                    (Behaviour::Slow, "GET") => b"$-1\r\n".to_vec(),
                    (Behaviour::Slow, "MGET") => {
                        let mut out = format!("*{}\r\n", args.len() - 1).into_bytes();
                        for _ in 1..args.len() {
                            out.extend_from_slice(b"$-1\r\n");
                        }
                        out
                    }
                    (_, "WAIT") => b":0\r\n".to_vec(),
                    (_, "PING") => b"+PONG\r\n".to_vec(),
                    (_, "DEL") => b":1\r\n".to_vec(),
                    _ => b"+OK\r\n".to_vec(),
                };
                if matches!(b, Behaviour::Slow) {
                    std::thread::sleep(Duration::from_millis(300));
                }
                if w.write_all(&reply).is_err() {
                    return;
                }
            }
        }
    }
}

fn cfg(mode: Mode, addr: &str) -> RemoteConfig {
    let mut c = config(mode, vec![addr.to_string()]);
    c.replicas = 1;
    c.op_timeout_ms = 50;
    c.wait_timeout_ms = 100;
    c.durable_timeout_ms = 1500;
    c.backoff_ms = 50;
    c.backoff_max_ms = 200;
    c
}

/// Exercises every operation; checks that nothing succeeds wrongly.
fn exercise(t: &RedisTier) {
    let space = "c/fake/1";
    for p in 0..8 {
        t.demote(space, p, p, &page(1, p, true));
    }
    let got = t.fetch(space, &(0..70).collect::<Vec<_>>());
    assert_eq!(got.len(), 70);
    assert!(got.iter().all(Option::is_none), "a fake server gave a page");
    assert!(t.put_durable(space, 1, &page(1, 1, false)).is_err());
    let mut out = vec![0u8; REMOTE_PAGE];
    let r = t.get_durable(space, 1, &mut out);
    assert!(!matches!(r, Ok(true)), "a fake server gave a durable page");
    t.forget(space, &[1, 2]);
    let _ = t.stats();
}

fn run(b: Behaviour, mode: Mode) -> Arc<RedisTier> {
    let f = fake(b);
    let start = Instant::now();
    let t = RedisTier::connect(cfg(mode, &f.addr)).expect("connect never fails on a bad server");
    for _ in 0..3 {
        exercise(&t);
    }
    eprintln!("{b:?} {mode:?}: {:?} {:?}", start.elapsed(), t.stats());
    assert!(start.elapsed() < Duration::from_secs(60));
    drop(f);
    t
}

#[test]
fn garbage_server() {
    for mode in [Mode::Single, Mode::Cluster] {
        let f = fake(Behaviour::Garbage);
        let t = RedisTier::connect(cfg(mode, &f.addr)).unwrap();
        exercise(&t);
        assert!(wait_until(Duration::from_secs(5), || !t.available()));
        exercise(&t);
        assert!(!t.stats().reachable);
        drop(f);
        drop(run(Behaviour::Garbage, mode));
    }
}

#[test]
fn closing_server() {
    for mode in [Mode::Single, Mode::Cluster] {
        let f = fake(Behaviour::Close);
        let t = RedisTier::connect(cfg(mode, &f.addr)).unwrap();
        exercise(&t);
        assert!(wait_until(Duration::from_secs(5), || !t.available()));
        match t.put_durable("c/x/1", 1, &page(1, 1, false)) {
            Err(RemoteError::Unreachable(_) | RemoteError::Timeout) => {}
            other => panic!("{other:?}"),
        }
        drop(f);
    }
}

#[test]
fn slow_server() {
    let t = run(Behaviour::Slow, Mode::Single);
    let st = t.stats();
    assert!(st.timeouts > 0 || st.errors > 0, "{st:?}");
    assert_eq!(st.fetch_hits, 0);
}

#[test]
fn server_with_garbage_values() {
    let f = fake(Behaviour::LyingValues);
    let t = RedisTier::connect(cfg(Mode::Single, &f.addr)).unwrap();
    assert!(t.available());
    let space = "c/lie/1";
    let got = t.fetch(space, &(0..10).collect::<Vec<_>>());
    assert!(got.iter().all(Option::is_none));
    assert_eq!(t.stats().corrupt, 10);
    match t.put_durable(space, 1, &page(1, 1, false)) {
        Err(RemoteError::NotReplicated { got: 0, want: 1 }) => {}
        other => panic!("{other:?}"),
    }
    let mut out = vec![0u8; REMOTE_PAGE];
    match t.get_durable(space, 1, &mut out) {
        Err(RemoteError::Corrupt(_)) => {}
        other => panic!("{other:?}"),
    }
    drop(f);
    // Cluster mode: the fake's answer to CLUSTER SLOTS is unusable, so the tier stays down.
    drop(run(Behaviour::LyingValues, Mode::Cluster));
}

#[test]
fn server_announcing_huge_lengths() {
    for mode in [Mode::Single, Mode::Cluster] {
        let t = run(Behaviour::HugeLengths, mode);
        assert_eq!(t.stats().fetch_hits, 0);
    }
}

/// Behind real exports, a misbehaving tier costs only time: a swap export keeps every page
/// (what the tier does not acknowledge goes to the spill file) and a cached export serves
/// the image's bytes (what the tier returns fails its checks and is a miss).
#[test]
fn exports_behind_a_misbehaving_tier_lose_nothing_and_serve_no_wrong_page() {
    use tmem_core::{ClientConfig, ClientId, Codec, DedupScope, Engine, EngineConfig};
    use tmem_exports::{CachedConfig, CachedExport, SwapConfig, SwapExport};
    use tmem_nbd::BlockBackend;

    const BYTES: usize = 1 << 20;
    let data: Vec<u8> = (0..BYTES as u64 / 4096)
        .flat_map(|p| page(7, p, false))
        .collect();
    for b in [
        Behaviour::Garbage,
        Behaviour::Close,
        Behaviour::Slow,
        Behaviour::LyingValues,
        Behaviour::HugeLengths,
    ] {
        let start = Instant::now();
        let f = fake(b);
        let t = RedisTier::connect(cfg(Mode::Single, &f.addr)).unwrap();
        let tier = Arc::clone(&t) as Arc<dyn RemoteTier>;
        // A pool of 64 pages for 256 pages of each export: most pages leave it.
        let e = Arc::new(Engine::new(EngineConfig::with_budget(256 << 10)));
        e.add_client(ClientId(1), ClientConfig::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let swap = SwapExport::create(
            Arc::clone(&e),
            SwapConfig {
                name: "s".into(),
                size: BYTES as u64,
                client: ClientId(1),
                spill_path: dir.path().join("s.spill"),
                codec: Codec::None,
                dedup: DedupScope::Off,
                spill_reserve: 0,
            },
        )
        .unwrap();
        swap.set_remote(Some(Arc::clone(&tier)));
        swap.write(0, &data, false).unwrap();
        let mut got = vec![0u8; BYTES];
        swap.read(0, &mut got).unwrap();
        assert!(got == data, "{b:?}: swap export read back other bytes");
        let st = swap.stats();
        assert_eq!(st.pages_remote, 0, "{b:?}: {st:?}");
        assert!(st.pages_spilled > 0, "{b:?}: {st:?}");

        let image = dir.path().join("image.raw");
        std::fs::write(&image, &data).unwrap();
        let cached = CachedExport::open(
            Arc::clone(&e),
            CachedConfig {
                name: "c".into(),
                image,
                client: ClientId(1),
                uuid: None,
                direct_io: false,
                codec: Codec::None,
                dedup: DedupScope::Off,
                writable: false,
            },
        )
        .unwrap();
        cached.set_remote(Some(Arc::clone(&tier))).unwrap();
        for pass in 0..2 {
            let mut got = vec![0u8; BYTES];
            cached.read(0, &mut got).unwrap();
            assert!(
                got == data,
                "{b:?}: cached export pass {pass} read other bytes"
            );
        }
        let cs = cached.stats();
        assert_eq!(cs.remote_hits, 0, "{b:?}: {cs:?}");
        eprintln!(
            "{b:?}: {:?}\nswap {st:?}\ncached {cs:?}\ntier {:?}",
            start.elapsed(),
            t.stats()
        );
        drop(f);
    }
}
