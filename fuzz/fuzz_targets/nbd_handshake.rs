//! Drive the real handshake state machine, then the transmission phase, over an in-memory stream.
#![no_main]

use std::io::{self, Read, Write};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tmem_nbd::{negotiate, serve_transmission, MemBackend, StaticExports, TransmissionConfig};

/// Reads come from the fuzz input; writes are counted and dropped.
struct Duplex<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = StaticExports::new()
        .with_export("a", "first", Arc::new(MemBackend::with_shards(1 << 20, 2)))
        .with_export("b", "", Arc::new(MemBackend::with_shards(12345, 1)));
    let mut s = Duplex { input: data, written: 0 };
    if let Ok(session) = negotiate(&mut s, &exports) {
        let rest = s.input;
        let stats = Arc::new(tmem_nbd::ExportStats::default());
        let cfg = TransmissionConfig { workers: 0, ..Default::default() };
        let _ = serve_transmission(rest, io::sink(), session, stats, &cfg);
    }
});
