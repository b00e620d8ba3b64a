//! Request parser + validation + execution: the input is a stream of transmission requests
//! for an already negotiated session (first byte picks structured/simple and worker mode).
#![no_main]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use tmem_nbd::proto::*;
use tmem_nbd::{handshake::transmission_flags, serve_transmission, BlockBackend, MemBackend, Request, Session, TransmissionConfig};

/// Collects reply bytes so their framing can be checked.
#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Walk the replies and check every one is well framed.
fn check_replies(mut b: &[u8], structured: bool) {
    while b.len() >= 4 {
        let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            assert!(b.len() >= 16);
            // Read payloads cannot be framed without the request; stop at the first data reply.
            return;
        }
        assert!(structured, "structured chunk without negotiation");
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        assert!(b.len() >= 20 + len, "truncated chunk");
        b = &b[20 + len..];
    }
    assert!(b.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let structured = mode & 1 != 0;
    let backend: Arc<dyn BlockBackend> = Arc::new(MemBackend::with_shards(1 << 20 | u64::from(mode & 0x0e) << 8, 2));
    let tflags = transmission_flags(&*backend, structured);
    let session = Session {
        name: "f".into(),
        size: backend.size(),
        tflags,
        structured,
        base_allocation: structured && mode & 2 != 0,
        backend,
    };
    // Parsing a header never panics.
    if rest.len() >= REQUEST_LEN {
        let _ = Request::parse(rest[..REQUEST_LEN].try_into().unwrap());
    }
    let out = Out::default();
    let cfg = TransmissionConfig {
        workers: if mode & 0x10 != 0 { 1 } else { 0 },
        inline_max: 4096,
        queue: 4,
        max_batch: if mode & 0x20 != 0 { 1 } else { 4 },
        ..Default::default()
    };
    let stats = Arc::new(tmem_nbd::ExportStats::default());
    let _ = serve_transmission(rest, out.clone(), session, stats, &cfg);
    let bytes = out.0.lock().unwrap().clone();
    if cfg.workers == 0 {
        check_replies(&bytes, structured);
    }
});
