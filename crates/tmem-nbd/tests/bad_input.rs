//! Misbehaving clients over a raw socket: each gets a typed error reply or is disconnected,
//! and a second, well-behaved client on the same server keeps working throughout.

mod common;

use std::io::Write;
use std::net::Shutdown;

use common::{info_data, meta_data, RawClient, TestServer};
use tmem_nbd::proto::*;

const SIZE: u64 = 16 << 20;

#[test]
fn handshake_garbage_and_bad_options() {
    let srv = TestServer::start(SIZE);
    let mut good = RawClient::open(&srv.sock, "a", true);
    good.check_alive(100);

    // Garbage instead of client flags: unknown flag bits -> disconnect.
    let mut c = RawClient::connect_raw(&srv.sock);
    c.send(b"\xde\xad\xbe\xefgarbage garbage garbage");
    assert!(c.is_closed(), "garbage client flags must disconnect");
    good.check_alive(102);

    // Wrong option magic -> disconnect.
    let mut c = RawClient::connect(&srv.sock);
    c.send(&[0x11; 16]);
    assert!(c.is_closed(), "bad option magic must disconnect");
    good.check_alive(104);

    // Truncated option header, then EOF.
    let mut c = RawClient::connect(&srv.sock);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.is_closed());
    good.check_alive(106);

    // Unknown option with data -> ERR_UNSUP, and the next option still parses.
    let mut c = RawClient::connect(&srv.sock);
    let r = c.option(0x4242, b"some option payload");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].typ, REP_ERR_UNSUP);
    let r = c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r[0].typ, REP_ERR_UNSUP);
    let r = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r[0].typ, REP_ERR_UNSUP);
    let r = c.option(OPT_LIST, &[]);
    let names: Vec<_> = r
        .iter()
        .filter(|x| x.typ == REP_SERVER)
        .map(|x| x.data[4..5].to_vec())
        .collect();
    assert_eq!(names, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(r.last().unwrap().typ, REP_ACK);
    // LIST with data is invalid.
    assert_eq!(c.option(OPT_LIST, b"x")[0].typ, REP_ERR_INVALID);
    // Unknown export name -> ERR_UNKNOWN, connection stays usable.
    assert_eq!(
        c.option(OPT_GO, &info_data("nope", &[]))[0].typ,
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        c.option(OPT_INFO, &info_data("nope", &[]))[0].typ,
        REP_ERR_UNKNOWN
    );
    // Malformed INFO (name length beyond the option) -> ERR_INVALID.
    let mut bad = info_data("a", &[]);
    bad[3] = 200;
    assert_eq!(c.option(OPT_INFO, &bad)[0].typ, REP_ERR_INVALID);
    // Trailing bytes after the info requests -> ERR_INVALID.
    let mut bad = info_data("a", &[INFO_NAME]);
    bad.push(0);
    assert_eq!(c.option(OPT_GO, &bad)[0].typ, REP_ERR_INVALID);
    // Out of order: meta context before structured replies -> ERR_INVALID.
    let r = c.option(OPT_SET_META_CONTEXT, &meta_data("a", &[BASE_ALLOCATION]));
    assert_eq!(r[0].typ, REP_ERR_INVALID);
    let r = c.option(OPT_LIST_META_CONTEXT, &meta_data("a", &[]));
    assert_eq!(r[0].typ, REP_ERR_INVALID);
    // Structured reply with a payload is invalid.
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, b"x")[0].typ, REP_ERR_INVALID);
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[])[0].typ, REP_ACK);
    // Meta context for an unknown export / malformed.
    assert_eq!(
        c.option(OPT_SET_META_CONTEXT, &meta_data("zz", &[BASE_ALLOCATION]))[0].typ,
        REP_ERR_UNKNOWN
    );
    let mut bad = meta_data("a", &[BASE_ALLOCATION]);
    bad.truncate(bad.len() - 3);
    assert_eq!(c.option(OPT_SET_META_CONTEXT, &bad)[0].typ, REP_ERR_INVALID);
    // LIST_META_CONTEXT with no query lists base:allocation.
    let r = c.option(OPT_LIST_META_CONTEXT, &meta_data("a", &[]));
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].data[4..], BASE_ALLOCATION.as_bytes());
    // Unknown namespace selects nothing.
    let r = c.option(OPT_SET_META_CONTEXT, &meta_data("a", &["x-foo:bar"]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].typ, REP_ACK);
    // GO now works; without a selected context BLOCK_STATUS is EINVAL.
    let r = c.option(
        OPT_GO,
        &info_data("a", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    assert_eq!(r.last().unwrap().typ, REP_ACK);
    assert_eq!(r.len(), 5, "{r:?}");
    c.structured = true;
    c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096, &[]);
    assert_eq!(c.reply(0).0, EINVAL);
    c.check_alive(200);
    good.check_alive(108);

    // EXPORT_NAME with an unknown name: the protocol can only hang up.
    let mut c = RawClient::connect(&srv.sock);
    c.send_option(OPT_EXPORT_NAME, b"missing");
    assert!(c.is_closed());
    // EXPORT_NAME with a known name: size + flags, no zeroes (we asked for NO_ZEROES).
    let mut c = RawClient::connect(&srv.sock);
    c.send_option(OPT_EXPORT_NAME, b"b");
    let mut b = [0u8; 10];
    std::io::Read::read_exact(&mut c.s, &mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    c.check_alive(300);

    // Oversized option: ERR_TOO_BIG, then still parses (data discarded).
    let mut c = RawClient::connect(&srv.sock);
    let r = c.option(0x77, &vec![0u8; 200 << 10]);
    assert_eq!(r[0].typ, REP_ERR_TOO_BIG);
    assert_eq!(c.option(OPT_LIST, &[]).last().unwrap().typ, REP_ACK);
    // Absurd option length: disconnect.
    let mut c = RawClient::connect(&srv.sock);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&h);
    assert_eq!(c.read_opt_reply().typ, REP_ERR_TOO_BIG);
    assert!(c.is_closed());

    // ABORT gets an ACK and a close.
    let mut c = RawClient::connect(&srv.sock);
    assert_eq!(c.option(OPT_ABORT, &[])[0].typ, REP_ACK);
    assert!(c.is_closed());

    good.check_alive(110);
}

#[test]
fn transmission_errors_structured() {
    let srv = TestServer::start(SIZE);
    let mut good = RawClient::open(&srv.sock, "b", false);
    good.check_alive(1);
    let mut c = RawClient::open(&srv.sock, "a", true);
    assert!(c.tflags & TFLAG_SEND_DF != 0);
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        // (cmd, flags, offset, len, expected errno)
        (CMD_READ, 0, SIZE - 10, 20, EINVAL),
        (CMD_READ, 0, u64::MAX - 1, 4096, EINVAL),
        (CMD_READ, 0, 0, (32 << 20) + 1, EOVERFLOW),
        (CMD_READ, CMD_FLAG_NO_HOLE, 0, 4096, EINVAL),
        (CMD_READ, 1 << 12, 0, 4096, EINVAL),
        (42, 0, 0, 0, EINVAL),
        (CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 4096, EINVAL),
        (CMD_TRIM, 0, SIZE, 1, EINVAL),
        (CMD_WRITE_ZEROES, 0, SIZE - 1, 2, ENOSPC),
        (CMD_WRITE_ZEROES, CMD_FLAG_DF, 0, 4096, EINVAL),
        (CMD_CACHE, 0, SIZE, 4096, EINVAL),
        (CMD_BLOCK_STATUS, 0, 0, 0, EINVAL),
        (CMD_BLOCK_STATUS, 0, SIZE - 1, 2, EINVAL),
        (CMD_BLOCK_STATUS, CMD_FLAG_DF, 0, 4096, EINVAL),
    ];
    for (i, &(cmd, flags, off, len, want)) in cases.iter().enumerate() {
        c.request(cmd, flags, 1000 + i as u64, off, len, &[]);
        let (err, cookie, _) = c.reply(off);
        assert_eq!(
            (err, cookie),
            (want, 1000 + i as u64),
            "case {i}: cmd {cmd} flags {flags:#x}"
        );
    }
    // Write beyond the end: payload is consumed, ENOSPC, stream stays in sync.
    c.request(CMD_WRITE, 0, 50, SIZE - 100, 4096, &[7u8; 4096]);
    assert_eq!(c.reply(0).0, ENOSPC);
    // Zero-length read and write are fine.
    c.request(CMD_READ, 0, 51, 0, 0, &[]);
    assert_eq!(c.reply(0).0, 0);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 52, 0, 0, &[]);
    assert_eq!(c.reply(0).0, 0);
    c.check_alive(60);
    let st = srv.handle().stats("a").unwrap();
    assert_eq!(st.errors, cases.len() as u64 + 1);
    good.check_alive(3);

    // Wrong request magic -> disconnect.
    let mut h = tmem_nbd::Request {
        flags: 0,
        typ: CMD_READ,
        cookie: 9,
        offset: 0,
        len: 512,
    }
    .encode();
    h[0] ^= 0xff;
    c.send(&h);
    assert!(c.is_closed());
    good.check_alive(5);

    // Truncated header -> disconnect.
    let mut c = RawClient::open(&srv.sock, "a", true);
    c.send(&h[..11]);
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.is_closed());
    good.check_alive(7);

    // Huge write length -> disconnect (payload cannot be buffered).
    let mut c = RawClient::open(&srv.sock, "a", true);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[]);
    let _ = c.s.write_all(&[0u8; 4096]);
    assert!(c.is_closed());
    good.check_alive(9);

    // Pure garbage after GO -> disconnect.
    let mut c = RawClient::open(&srv.sock, "a", false);
    c.send(&[0x5a; 300]);
    assert!(c.is_closed());
    good.check_alive(11);
}

#[test]
fn transmission_errors_simple() {
    let srv = TestServer::start(SIZE);
    let mut c = RawClient::open(&srv.sock, "a", false);
    assert!(c.tflags & TFLAG_SEND_DF == 0);
    // DF without structured replies, read too large, unknown command, BLOCK_STATUS without context.
    for (i, &(cmd, flags, len)) in [
        (CMD_READ, CMD_FLAG_DF, 512u32),
        (CMD_READ, 0, (32 << 20) + 1),
        (9, 0, 0),
        (CMD_BLOCK_STATUS, 0, 512),
    ]
    .iter()
    .enumerate()
    {
        c.request(cmd, flags, i as u64, 0, len, &[]);
        let (err, cookie, _) = c.reply(0);
        assert_eq!((err, cookie), (EINVAL, i as u64), "case {i}");
    }
    c.check_alive(20);
    // Simple replies must zero-fill holes themselves (the read buffer is reused between requests).
    c.request(CMD_WRITE, 0, 30, 65536, 8192, &[0xcd; 8192]);
    assert_eq!(c.reply(0).0, 0);
    assert_eq!(c.read_simple(31, 65536, 8192), (0, vec![0xcd; 8192]));
    let (e, d) = c.read_simple(32, 65536 + 4096, 8192);
    assert_eq!(e, 0);
    assert_eq!(&d[..4096], &[0xcd; 4096][..]);
    assert!(d[4096..].iter().all(|&b| b == 0), "hole must read as zeros");
    // Disconnect politely: no reply, connection closes.
    c.request(CMD_DISC, 0, 99, 0, 0, &[]);
    assert!(c.is_closed());
}

/// A read-only view of a `MemBackend`.
struct ReadOnly(tmem_nbd::MemBackend);

impl tmem_nbd::BlockBackend for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn caps(&self) -> tmem_nbd::BackendCaps {
        tmem_nbd::BackendCaps {
            read_only: true,
            can_block_status: true,
            ..Default::default()
        }
    }
    fn read(&self, o: u64, b: &mut [u8]) -> Result<tmem_nbd::ZeroRanges, tmem_nbd::BackendError> {
        self.0.read(o, b)
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), tmem_nbd::BackendError> {
        Err(tmem_nbd::BackendError::ReadOnly)
    }
    fn trim(&self, _: u64, _: u64) -> Result<(), tmem_nbd::BackendError> {
        Err(tmem_nbd::BackendError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), tmem_nbd::BackendError> {
        Err(tmem_nbd::BackendError::ReadOnly)
    }
    fn flush(&self) -> Result<(), tmem_nbd::BackendError> {
        Ok(())
    }
    fn cache(&self, _: u64, _: u64) -> Result<(), tmem_nbd::BackendError> {
        Err(tmem_nbd::BackendError::Unsupported)
    }
    fn block_status(
        &self,
        o: u64,
        l: u64,
    ) -> Result<Vec<tmem_nbd::Extent>, tmem_nbd::BackendError> {
        self.0.block_status(o, l)
    }
}

#[test]
fn read_only_export_and_unadvertised_commands() {
    use std::sync::Arc;
    let be: Arc<dyn tmem_nbd::BlockBackend> = Arc::new(ReadOnly(tmem_nbd::MemBackend::new(SIZE)));
    let srv = TestServer::start_with(vec![("ro", be)], tmem_nbd::ServerConfig::default());
    let mut c = RawClient::open(&srv.sock, "ro", true);
    assert!(c.tflags & TFLAG_READ_ONLY != 0);
    assert!(
        c.tflags
            & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN)
            == 0
    );
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[1u8; 4096]);
    assert_eq!(c.reply(0).0, EPERM);
    // Not advertised -> EINVAL (TRIM, WRITE_ZEROES, CACHE).
    for (i, cmd) in [CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE]
        .into_iter()
        .enumerate()
    {
        c.request(cmd, 0, 10 + i as u64, 0, 4096, &[]);
        assert_eq!(c.reply(0).0, EINVAL, "cmd {cmd}");
    }
    c.request(CMD_READ, 0, 20, 0, 4096, &[]);
    assert_eq!(c.reply(0), (0, 20, vec![0u8; 4096]));
    c.request(CMD_FLUSH, 0, 21, 0, 0, &[]);
    assert_eq!(c.reply(0).0, 0);
}
