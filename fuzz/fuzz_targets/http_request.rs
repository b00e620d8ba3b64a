//! tmemd's control-API request parser (`tmemd::http::read_request`) on arbitrary bytes: a
//! stream of pipelined requests, delivered in pieces of fuzzer-chosen sizes. It must never
//! panic, and what it accepts must respect its limits.
#![no_main]

use std::io::{self, BufReader, Read};

use libfuzzer_sys::fuzz_target;
use tmemd::http::{read_request, ReadError, MAX_HEAD};

/// Hands out the input in pieces of at most `piece` bytes (short reads, as from a socket).
struct Pieces<'a> {
    input: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Low 3 bits: the body limit; the others: the most bytes per read (0: no limit).
    let max_body = [0usize, 1, 16, 100, 4096, 65536, 1 << 20, 4][usize::from(mode & 7)];
    let piece = match mode >> 3 {
        0 => usize::MAX,
        p => usize::from(p),
    };
    let mut r = BufReader::with_capacity(64, Pieces { input: rest, piece });
    let mut w = Vec::new();
    // Pipelined requests on one keep-alive connection, as the server reads them.
    for _ in 0..64 {
        match read_request(&mut r, &mut w, max_body) {
            Ok((req, _keep_alive)) => {
                assert!(req.body.len() <= max_body);
                assert!(!req.method.is_empty());
                assert!(req.path.starts_with('/'));
                assert!(req.method.len() + req.path.len() <= MAX_HEAD);
            }
            Err(ReadError::Bad(status, _)) => {
                assert!(matches!(status, 400 | 413 | 431 | 501), "{status}");
                break;
            }
            Err(ReadError::Closed | ReadError::Io(_)) => break,
        }
    }
    // Only `100 Continue` is ever written while reading.
    assert!(w.chunks(25).all(|c| c == b"HTTP/1.1 100 Continue\r\n\r\n"));
});
