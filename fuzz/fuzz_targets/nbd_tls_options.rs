//! The handshake's TLS and access-control path: `negotiate_with` under a TLS policy (offered,
//! required for TCP), `STARTTLS`, then the option haggling again as a tenant, against an
//! export table that permits by PSK identity and Unix credentials. The TLS record layer is
//! OpenSSL's; what is fuzzed is our state machine around it and the PSK file parser.
//!
//! Input: byte 0 picks the policy and transport; bytes 1..=8 name the tenant the "TLS
//! handshake" proves; the rest is the client's byte stream (both phases). Invariants: never
//! panic; a session is only ever handed out for an export the peer is permitted.
#![no_main]

use std::io::{self, Read, Write};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tmem_nbd::{
    negotiate_with, BlockBackend, ExportInfo, ExportTable, HandshakeCtx, MemBackend, Outcome,
    Peer, Policy, StaticExports, Transport, UnixCred,
};

struct Duplex<'a> {
    input: &'a [u8],
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `a` belongs to tenant "a", `b` to uid 1000, `open` to anyone without TLS.
struct Table(StaticExports);

fn allowed(name: &str, peer: &Peer) -> bool {
    match name {
        "a" => peer.tls_identity.as_deref() == Some("a"),
        "b" => peer.unix_cred().is_some_and(|c| c.uid == 1000),
        "open" => peer.tls_identity.is_none(),
        _ => false,
    }
}

impl ExportTable for Table {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        self.0.lookup(name)
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0.list()
    }
    fn permits(&self, name: &str, peer: &Peer) -> bool {
        allowed(name, peer)
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (mode, rest) = (data[0], &data[1..]);
    let (tenant, stream) = rest.split_at(8);
    let tenant: String = tenant
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| char::from(b'a' + b % 3))
        .collect();
    let _ = tmem_nbd::tls::parse_psk_text(
        &String::from_utf8_lossy(stream),
        std::path::Path::new("fuzz.psk"),
    );
    let mut t = StaticExports::new();
    for n in ["a", "b", "open"] {
        t = t.with_export(n, n, Arc::new(MemBackend::new(1 << 16)) as Arc<dyn BlockBackend>);
    }
    let table = Table(t);
    let transport = if mode & 1 == 0 {
        Transport::Unix(Some(UnixCred {
            pid: 1,
            uid: if mode & 2 == 0 { 1000 } else { 0 },
            gid: 0,
        }))
    } else {
        Transport::Tcp(([127, 0, 0, 1], 10809).into())
    };
    let policy = Policy {
        tls_offered: mode & 4 == 0,
        tls_required: mode & 1 == 1 && mode & 8 == 0,
    };
    let mut ctx = HandshakeCtx::new(
        Peer {
            transport,
            tls_identity: None,
        },
        policy,
    );
    let mut s = Duplex { input: stream };
    let mut out = negotiate_with(&mut s, &table, &mut ctx);
    if let Ok(Outcome::StartTls) = out {
        assert!(ctx.policy.tls_offered, "STARTTLS accepted without TLS on offer");
        ctx.tls_established(tenant);
        out = negotiate_with(&mut s, &table, &mut ctx);
    }
    if let Ok(Outcome::Go(session)) = out {
        assert!(
            allowed(&session.name, &ctx.peer),
            "session for {:?} handed to {}",
            session.name,
            ctx.peer
        );
        assert!(
            !(ctx.policy.tls_required && ctx.peer.tls_identity.is_none()),
            "transmission without the required TLS"
        );
    }
});
