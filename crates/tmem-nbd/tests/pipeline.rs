//! Pipelined requests, out-of-order replies, multi-client, stats and shutdown.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use common::{RawClient, TestServer};
use tmem_nbd::proto::*;
use tmem_nbd::{
    BackendCaps, BackendError, BlockBackend, Extent, MemBackend, ServerConfig, TransmissionConfig,
    ZeroRanges,
};

const SIZE: u64 = 64 << 20;

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u64).wrapping_mul(31).wrapping_add(i * 7 + 1) as u8 | 1)
        .collect()
}

#[test]
fn pipelined_mixed_requests_all_answered_once() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::open(&srv.sock, "a", true);
    let mut w = c.s.try_clone().unwrap();
    const N: u64 = 300;
    // Writer thread: N writes of varied sizes (some > inline threshold -> workers), a flush,
    // then N reads of the same ranges — all without waiting for replies.
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..N {
            let len = if i % 50 == 0 {
                512 << 10
            } else {
                4096 + (i as usize % 3) * 1000
            };
            let mut b = tmem_nbd::Request {
                flags: 0,
                typ: CMD_WRITE,
                cookie: i,
                offset: i * (1 << 20) / 8,
                len: len as u32,
            }
            .encode()
            .to_vec();
            b.extend_from_slice(&pattern(i, len));
            w.write_all(&b).unwrap();
        }
        w.write_all(
            &tmem_nbd::Request {
                flags: 0,
                typ: CMD_FLUSH,
                cookie: 10_000,
                offset: 0,
                len: 0,
            }
            .encode(),
        )
        .unwrap();
    });
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for _ in 0..=N {
        let (err, cookie, _) = c.reply(0);
        assert_eq!(err, 0);
        assert!(
            seen.insert(cookie, err).is_none(),
            "duplicate reply for {cookie}"
        );
    }
    sender.join().unwrap();
    assert!(seen.contains_key(&10_000));
    // Later writes may overlap earlier large ones; compute the expected image.
    let mut img = vec![0u8; (N * (1 << 20) / 8) as usize + (1 << 20)];
    for i in 0..N {
        let len = if i % 50 == 0 {
            512 << 10
        } else {
            4096 + (i as usize % 3) * 1000
        };
        let off = (i * (1 << 20) / 8) as usize;
        img[off..off + len].copy_from_slice(&pattern(i, len));
    }
    // Large (offloaded) writes overlap later small ones only if submitted concurrently; the
    // client must not rely on ordering there, so only check non-overlapping requests.
    for i in 0..N {
        c.request(CMD_READ, 0, 20_000 + i, i * (1 << 20) / 8, 4096, &[]);
    }
    let mut got = 0;
    for _ in 0..N {
        let (err, cookie, data) = c.reply(u64::MAX);
        assert_eq!(err, 0);
        let i = cookie - 20_000;
        let off = (i * (1 << 20) / 8) as usize;
        if i % 50 != 0 && (i % 50) > 4 {
            assert_eq!(&data[..], &img[off..off + 4096], "read {i}");
        }
        got += 1;
    }
    assert_eq!(got, N);
    let st = srv.handle().stats("a").unwrap();
    assert_eq!(st.writes, N);
    assert_eq!(st.reads, N);
    assert_eq!(st.flushes, 1);
    assert_eq!(st.errors, 0);
}

/// A backend whose `flush` blocks until the test opens a gate.
struct GatedFlush {
    inner: MemBackend,
    gate: Mutex<bool>,
    cv: Condvar,
}

impl BlockBackend for GatedFlush {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> BackendCaps {
        self.inner.caps()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, BackendError> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.inner.write(offset, data, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> Result<(), BackendError> {
        self.inner.write_zeroes(offset, len, may_trim, fast_only)
    }
    fn flush(&self) -> Result<(), BackendError> {
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        Err(BackendError::Io(std::io::Error::other(
            "flush failed on purpose",
        )))
    }
    fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.inner.block_status(offset, len)
    }
}

#[test]
fn slow_flush_reply_is_overtaken_by_later_reads() {
    let be = Arc::new(GatedFlush {
        inner: MemBackend::new(SIZE),
        gate: Mutex::new(false),
        cv: Condvar::new(),
    });
    let srv = TestServer::start_with(
        vec![("g", be.clone() as Arc<dyn BlockBackend>)],
        ServerConfig::default(),
    );
    // Opens the gate on drop (also when an assertion fails), so server shutdown never hangs.
    struct OpenOnDrop(Arc<GatedFlush>);
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            *self.0.gate.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.0.cv.notify_all();
        }
    }
    let _open = OpenOnDrop(be.clone());
    let mut c = RawClient::open(&srv.sock, "g", true);
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[0x42; 4096]);
    assert_eq!(c.reply(0), (0, 1, vec![]));
    // FLUSH blocks in the backend; the READ and TRIM sent after it must still be answered.
    // (With in-order replies this test would hang until the socket timeout and fail.)
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
    c.request(CMD_READ, 0, 3, 0, 4096, &[]);
    let (e, cookie, d) = c.reply(0);
    assert_eq!((e, cookie), (0, 3));
    assert_eq!(d, vec![0x42; 4096]);
    c.request(CMD_TRIM, 0, 4, 0, 4096, &[]);
    assert_eq!(c.reply(0), (0, 4, vec![]));
    *be.gate.lock().unwrap() = true;
    be.cv.notify_all();
    let (e, cookie, _) = c.reply(0);
    assert_eq!((e, cookie), (EIO, 2), "flush error mapped to EIO");
}

/// A backend whose reads in the upper half "may block": each such read waits until `want` of
/// them are waiting at once (or 5 s pass), and the most seen at once is recorded.
struct SlowUpperHalf {
    inner: MemBackend,
    want: usize,
    /// (reads waiting now, most waiting at once)
    waiting: Mutex<(usize, usize)>,
    cv: Condvar,
}

impl BlockBackend for SlowUpperHalf {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> BackendCaps {
        self.inner.caps()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ZeroRanges, BackendError> {
        if offset >= SIZE / 2 {
            let mut w = self.waiting.lock().unwrap();
            w.0 += 1;
            w.1 = w.1.max(w.0);
            self.cv.notify_all();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while w.1 < self.want {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                w = self.cv.wait_timeout(w, left).unwrap().0;
            }
            w.0 -= 1;
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.inner.write(offset, data, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> Result<(), BackendError> {
        self.inner.write_zeroes(offset, len, may_trim, fast_only)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.inner.block_status(offset, len)
    }
    fn read_may_block(&self, offset: u64, _len: u64) -> bool {
        offset >= SIZE / 2
    }
}

#[test]
fn reads_the_backend_calls_slow_overlap_on_one_connection() {
    let want = TransmissionConfig::default().slow_workers;
    assert!(want > TransmissionConfig::default().workers);
    let be = Arc::new(SlowUpperHalf {
        inner: MemBackend::new(SIZE),
        want,
        waiting: Mutex::new((0, 0)),
        cv: Condvar::new(),
    });
    let srv = TestServer::start_with(
        vec![("s", be.clone() as Arc<dyn BlockBackend>)],
        ServerConfig::default(),
    );
    let mut c = RawClient::open(&srv.sock, "s", true);
    for (i, off) in [(1, 0), (2, SIZE / 2)] {
        c.request(CMD_WRITE, 0, i, off, 4096, &pattern(i, 4096));
        assert_eq!(c.reply(0), (0, i, vec![]));
    }
    // `want` slow reads, then a fast one, sent in one write before any reply is read (the
    // server hands a slow read to a worker when more requests are buffered behind it): the
    // slow ones can only all finish once every one of them waits at the same time.
    let read = |cookie: u64, offset: u64| tmem_nbd::Request {
        flags: 0,
        typ: CMD_READ,
        cookie,
        offset,
        len: 4096,
    };
    let mut batch: Vec<u8> = (0..want as u64)
        .flat_map(|k| read(100 + k, SIZE / 2).encode())
        .collect();
    batch.extend_from_slice(&read(99, 0).encode());
    c.send(&batch);
    let mut seen = Vec::new();
    for _ in 0..=want {
        let (e, cookie, d) = c.reply(u64::MAX);
        assert_eq!(e, 0);
        let expect = if cookie == 99 { 1 } else { 2 };
        assert_eq!(d, pattern(expect, 4096), "read {cookie}");
        seen.push(cookie);
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), want + 1, "every read answered once");
    let peak = be.waiting.lock().unwrap().1;
    assert_eq!(peak, want, "slow reads of one connection waited together");
}

#[test]
fn many_concurrent_clients_and_multi_conn_visibility() {
    let srv = TestServer::start(SIZE);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let sock = srv.sock.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::open(&sock, "b", t % 2 == 0);
                assert!(c.tflags & TFLAG_CAN_MULTI_CONN != 0);
                for k in 0..50u64 {
                    let off = (t * 50 + k) * 4096;
                    let data = pattern(t * 1000 + k, 4096);
                    c.request(CMD_WRITE, CMD_FLAG_FUA, k, off, 4096, &data);
                    assert_eq!(c.reply(off).0, 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Another connection sees every write.
    let mut c = RawClient::open(&srv.sock, "b", false);
    for t in 0..8u64 {
        for k in 0..50u64 {
            let off = (t * 50 + k) * 4096;
            let (e, d) = c.read_simple(1, off, 4096);
            assert_eq!(e, 0);
            assert_eq!(d, pattern(t * 1000 + k, 4096));
        }
    }
    assert_eq!(srv.handle().stats("b").unwrap().connections, 9);
}

#[test]
fn structured_reads_send_holes_and_block_status() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::open(&srv.sock, "a", true);
    c.request(CMD_WRITE, 0, 1, 8192, 4096, &[9u8; 4096]);
    assert_eq!(c.reply(0).0, 0);
    // Read 0..16K: hole, hole, data, hole -> reassembled correctly.
    c.request(CMD_READ, 0, 2, 0, 16384, &[]);
    let (e, _, d) = c.reply(0);
    assert_eq!(e, 0);
    let mut want = vec![0u8; 16384];
    want[8192..12288].fill(9);
    assert_eq!(d, want);
    // DF: one chunk only.
    c.request(CMD_READ, CMD_FLAG_DF, 3, 0, 16384, &[]);
    assert_eq!(c.reply(0).2, want);
    let st = srv.handle().stats("a").unwrap();
    assert_eq!(st.hole_bytes_read, 12288);
    // BLOCK_STATUS: hole|zero, data, hole|zero (truncated to the request).
    c.request(CMD_BLOCK_STATUS, 0, 4, 0, 20480, &[]);
    let (e, _, p) = c.reply(0);
    assert_eq!(e, 0);
    let words: Vec<u32> = p
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![BASE_ALLOCATION_ID, 8192, 3, 4096, 0, 8192, 3]);
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 0, 4096, &[]);
    let (_, _, p) = c.reply(0);
    assert_eq!(p.len(), 12);
    // WRITE_ZEROES with FAST_ZERO and NO_HOLE, then the page is a hole again.
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        6,
        8192,
        4096,
        &[],
    );
    assert_eq!(c.reply(0).0, 0);
    c.request(CMD_READ, 0, 7, 0, 16384, &[]);
    assert_eq!(c.reply(0).2, vec![0u8; 16384]);
    c.request(CMD_CACHE, 0, 8, 0, 16384, &[]);
    assert_eq!(c.reply(0).0, 0);
}

#[test]
fn shutdown_closes_clients_joins_and_unlinks_socket() {
    let cfg = ServerConfig {
        transmission: TransmissionConfig {
            workers: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut srv = TestServer::one_mem(SIZE, cfg);
    let mut c1 = RawClient::open(&srv.sock, "a", true);
    c1.check_alive(1);
    c1.request(CMD_FLUSH, 0, 3, 0, 0, &[]); // starts the worker pool
    assert_eq!(c1.reply(0).0, 0);
    let mut c2 = RawClient::connect(&srv.sock); // stuck in the handshake
    assert_eq!(srv.handle().active_connections(), 2);
    assert!(srv.sock.exists());
    srv.handle.take().unwrap().shutdown();
    assert!(!srv.sock.exists(), "socket file must be unlinked");
    assert!(c1.is_closed());
    assert!(c2.is_closed());
    assert!(std::os::unix::net::UnixStream::connect(&srv.sock).is_err());
}

#[test]
fn handshake_timeout_and_connection_limit() {
    let cfg = ServerConfig {
        handshake_timeout: Some(std::time::Duration::from_millis(200)),
        max_connections: 2,
        ..Default::default()
    };
    let srv = TestServer::one_mem(SIZE, cfg);
    // A client that never finishes the handshake is dropped by the server.
    let mut idle = RawClient::connect(&srv.sock);
    assert!(idle.is_closed(), "idle handshake must time out");
    // Transmission has no timeout: an idle open client stays connected.
    let mut c1 = RawClient::open(&srv.sock, "a", true);
    let mut c2 = RawClient::open(&srv.sock, "a", false);
    // A third concurrent connection is refused (closed before the greeting).
    let s3 = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    s3.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut &s3, &mut b),
        Ok(0) | Err(_)
    ));
    c1.check_alive(1);
    c2.check_alive(3);
}

#[test]
fn a_client_trickling_its_handshake_is_dropped_at_the_deadline() {
    let cfg = ServerConfig {
        handshake_timeout: Some(std::time::Duration::from_millis(300)),
        ..Default::default()
    };
    let srv = TestServer::one_mem(SIZE, cfg);
    // A valid option header announcing 1000 bytes of data, then the data one byte every
    // 100 ms: every single read is quick, but the handshake never ends. Only a deadline for
    // the whole handshake drops this client (a per-read timeout never fires); it must be
    // gone long before the 3 s of trickling are over.
    let mut c = RawClient::connect(&srv.sock);
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&6u32.to_be_bytes()); // NBD_OPT_INFO
    hdr.extend_from_slice(&1000u32.to_be_bytes());
    c.send(&hdr);
    let mut closed = false;
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if std::io::Write::write_all(&mut c.s, &[0u8]).is_err() {
            closed = true;
            break;
        }
    }
    // (A write to a connection the server closed fails; one it keeps open never does.)
    assert!(closed, "the trickling client was never dropped");
}

#[test]
fn stalled_handshakes_make_room_for_new_clients() {
    let cfg = ServerConfig {
        handshake_timeout: None,
        max_connections: 8,
        max_handshakes: 4,
        max_handshakes_per_peer: 3,
        ..Default::default()
    };
    let srv = TestServer::one_mem(SIZE, cfg);
    // Clients that read the greeting and stall: each newcomer closes the oldest of this
    // peer's (this uid's) handshakes beyond the cap, not itself.
    let mut stalled: Vec<RawClient> = (0..20).map(|_| RawClient::connect(&srv.sock)).collect();
    // (A closed connection leaves the table once its thread has seen the socket shut, which
    // on a loaded machine may be a moment after the newcomer got its greeting.)
    let t0 = std::time::Instant::now();
    while srv.handle().handshaking_connections() > 3 && t0.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(srv.handle().handshaking_connections() <= 3);
    assert!(
        stalled[0].is_closed(),
        "the oldest stalled client is closed"
    );
    // Real clients get through; at the connection limit the stalled ones make room, and
    // clients in transmission are never closed for a newcomer.
    let mut open: Vec<RawClient> = (0..8)
        .map(|i| RawClient::open(&srv.sock, "a", i % 2 == 0))
        .collect();
    // (A client sees the end of its handshake just before the server counts it as done,
    // and a closed stalled connection leaves the table just after its socket is shut.)
    let t0 = std::time::Instant::now();
    while (srv.handle().handshaking_connections() > 0 || srv.handle().active_connections() != 8)
        && t0.elapsed().as_secs() < 30
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(srv.handle().handshaking_connections(), 0);
    assert_eq!(srv.handle().active_connections(), 8);
    assert!(stalled[19].is_closed());
    // Every connection is in transmission: the newcomer is refused.
    let s = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut &s, &mut b),
        Ok(0) | Err(_)
    ));
    for (i, c) in open.iter_mut().enumerate() {
        c.check_alive(10 * i as u64 + 1);
    }
}

#[test]
fn large_requests_wait_for_the_buffer_budget_and_all_complete() {
    // The smallest budget: one maximum-size request at a time, server-wide.
    let cfg = ServerConfig {
        buffer_limit: 0,
        transmission: TransmissionConfig {
            workers: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let srv = TestServer::one_mem(SIZE, cfg);
    let len = (SIZE / 4).min(u64::from(MAX_PAYLOAD)) as u32;
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let sock = srv.sock.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::open(&sock, "a", true);
                let off = i * u64::from(len);
                let data = vec![i as u8 + 1; len as usize];
                // Writes and reads pipelined before any reply is read.
                c.request(CMD_WRITE, 0, 1, off, len, &data);
                c.request(CMD_WRITE, 0, 2, off, len, &data);
                c.request(CMD_READ, 0, 3, 0, len, &[]);
                let mut got: Vec<_> = (0..3).map(|_| c.reply(u64::MAX)).collect();
                got.sort_by_key(|r| r.1);
                assert_eq!((got[0].0, got[1].0, got[2].0), (0, 0, 0));
                c.request(CMD_READ, 0, 4, off, len, &[]);
                let (e, cookie, d) = c.reply(off);
                assert_eq!((e, cookie), (0, 4));
                assert!(d == data, "read back what was written");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(srv.handle().buffer_bytes(), 0);
}
