//! Shared helpers for the integration tests: an in-process server and a raw-socket NBD client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tmem_nbd::proto::*;
use tmem_nbd::{
    BlockBackend, ListenAddr, MemBackend, Request, ServerConfig, ServerHandle, StaticExports,
};

/// A server on a Unix socket in its own tempdir, serving exports "a" (default) and "b".
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(size: u64) -> Self {
        Self::start_with(
            vec![
                (
                    "a",
                    Arc::new(MemBackend::new(size)) as Arc<dyn BlockBackend>,
                ),
                (
                    "b",
                    Arc::new(MemBackend::new(size)) as Arc<dyn BlockBackend>,
                ),
            ],
            ServerConfig::default(),
        )
    }

    /// One in-memory export `a` of `size` bytes under `cfg`.
    pub fn one_mem(size: u64, cfg: ServerConfig) -> Self {
        Self::start_with(
            vec![(
                "a",
                Arc::new(MemBackend::new(size)) as Arc<dyn BlockBackend>,
            )],
            cfg,
        )
    }

    pub fn start_with(exports: Vec<(&str, Arc<dyn BlockBackend>)>, cfg: ServerConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let mut t = StaticExports::new();
        for (n, b) in exports {
            t = t.with_export(n, format!("test export {n}"), b);
        }
        let handle = ServerHandle::start(Arc::new(t), cfg, &[ListenAddr::Unix(sock.clone())])
            .expect("start server");
        Self {
            handle: Some(handle),
            sock,
            dir,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("running")
    }
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// A raw NBD client for protocol tests.
pub struct RawClient {
    pub s: UnixStream,
    pub structured: bool,
    pub tflags: u16,
    pub size: u64,
}

impl RawClient {
    /// Connect and read the greeting; does not send client flags.
    pub fn connect_raw(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect");
        // Deadlock guard only; no test asserts on timing.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Self {
            s,
            structured: false,
            tflags: 0,
            size: 0,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c
    }

    /// Connect and send client flags (fixed newstyle + no zeroes).
    pub fn connect(path: &Path) -> Self {
        let mut c = Self::connect_raw(path);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    /// Connect, negotiate structured replies (+ base:allocation) if asked, and GO to `export`.
    pub fn open(path: &Path, export: &str, structured: bool) -> Self {
        let mut c = Self::connect(path);
        if structured {
            let r = c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.last().unwrap().typ, REP_ACK);
            let r = c.option(OPT_SET_META_CONTEXT, &meta_data(export, &[BASE_ALLOCATION]));
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].typ, REP_META_CONTEXT);
            c.structured = true;
        }
        let r = c.option(OPT_GO, &info_data(export, &[INFO_BLOCK_SIZE]));
        assert_eq!(r.last().unwrap().typ, REP_ACK, "{r:?}");
        let info = r
            .iter()
            .find(|x| x.typ == REP_INFO && x.data[..2] == [0, 0])
            .expect("INFO_EXPORT");
        c.size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        c.tflags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply header");
        assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("option reply data");
        OptReply { opt, typ, data }
    }

    /// Send an option and collect replies up to the final ACK or error.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(opt, data);
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.opt, opt);
            let done = r.typ == REP_ACK || r.typ & REP_FLAG_ERROR != 0;
            v.push(r);
            if done {
                return v;
            }
        }
    }

    pub fn request(
        &mut self,
        typ: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Read one reply (simple, or all chunks of a structured one); returns (errno, cookie, data).
    /// Holes are materialised as zeros at their offsets relative to `base`
    /// (`u64::MAX`: relative to the first content chunk).
    pub fn reply(&mut self, mut base: u64) -> (u32, u64, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).expect("reply magic");
        let magic = u32::from_be_bytes(m);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h).unwrap();
            let err = u32::from_be_bytes(h[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            return (err, cookie, Vec::new());
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let mut out = Vec::new();
        let mut err = 0;
        let mut first = true;
        loop {
            if !first {
                self.s.read_exact(&mut m).unwrap();
                assert_eq!(u32::from_be_bytes(m), STRUCTURED_REPLY_MAGIC);
            }
            first = false;
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
            let typ = u16::from_be_bytes(h[2..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).unwrap();
            if base == u64::MAX && (typ == REPLY_TYPE_OFFSET_DATA || typ == REPLY_TYPE_OFFSET_HOLE)
            {
                base = u64::from_be_bytes(p[..8].try_into().unwrap());
            }
            match typ {
                REPLY_TYPE_OFFSET_DATA => {
                    let off = (u64::from_be_bytes(p[..8].try_into().unwrap()) - base) as usize;
                    if out.len() < off + p.len() - 8 {
                        out.resize(off + p.len() - 8, 0xEE);
                    }
                    out[off..off + p.len() - 8].copy_from_slice(&p[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let off = (u64::from_be_bytes(p[..8].try_into().unwrap()) - base) as usize;
                    let l = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    if out.len() < off + l {
                        out.resize(off + l, 0xEE);
                    }
                    out[off..off + l].fill(0);
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    err = u32::from_be_bytes(p[..4].try_into().unwrap())
                }
                _ => out.extend_from_slice(&p), // BLOCK_STATUS etc.: raw payload
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return (err, cookie, out);
            }
        }
    }

    /// Read `len` bytes at `off` with a simple-reply client (data follows the header).
    pub fn read_simple(&mut self, cookie: u64, off: u64, len: u32) -> (u32, Vec<u8>) {
        self.request(CMD_READ, 0, cookie, off, len, &[]);
        let (err, c, _) = self.reply(off);
        assert_eq!(c, cookie);
        let mut d = vec![0u8; if err == 0 { len as usize } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (err, d)
    }

    /// True if the server closed the connection (EOF or reset) without sending anything more.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Write then read back through this (transmission-phase) client.
    pub fn check_alive(&mut self, cookie: u64) {
        let data: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ (cookie as u8)).collect();
        self.request(CMD_WRITE, 0, cookie, 8192, 4096, &data);
        let (e, c, _) = self.reply(8192);
        assert_eq!((e, c), (0, cookie));
        if self.structured {
            self.request(CMD_READ, 0, cookie + 1, 8192, 4096, &[]);
            let (e, c, d) = self.reply(8192);
            assert_eq!((e, c), (0, cookie + 1));
            assert_eq!(d, data);
        } else {
            let (e, d) = self.read_simple(cookie + 1, 8192, 4096);
            assert_eq!(e, 0);
            assert_eq!(d, data);
        }
    }
}

pub fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}
