//! NBD over TLS with pre-shared keys (`NBD_OPT_STARTTLS`), the way QEMU's
//! `tls-creds-psk` and nbdkit's `--tls-psk` speak it.
//!
//! The TLS itself is OpenSSL's (through the `openssl` crate): TLS 1.3 with a PSK (and an
//! ephemeral key exchange where the client offers one) or TLS 1.2 PSK cipher suites. The
//! client's PSK identity is the tenant name; the key is looked up in a [`PskStore`], usually a
//! [`PskFile`] in the psktool/nbdkit format (`identity:hexkey` per line).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    HandshakeError as SslHandshakeError, Ssl, SslContext, SslMethod, SslMode, SslOptions,
    SslStream, SslVersion,
};

/// Longest key accepted (OpenSSL's own PSK limit is 512 bytes).
pub const MAX_PSK_LEN: usize = 256;

/// TLS 1.2 suites offered: PSK with an ephemeral key exchange first, plain PSK last
/// (QEMU/GnuTLS clients offer `ECDHE-PSK`, `DHE-PSK` and `PSK`).
const TLS12_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:\
DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:\
ECDHE-PSK-AES128-CBC-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";

/// Where TLS keys come from.
pub trait PskStore: Send + Sync + fmt::Debug {
    /// The key of `identity`, or `None` if that identity has none.
    fn key(&self, identity: &str) -> Option<Vec<u8>>;
}

/// Errors reading a PSK file.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// The file could not be read.
    #[error("Cannot read PSK file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A line is not `identity:hexkey`.
    #[error("{path}:{line}: not `identity:hexkey` ({why})")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// Parses psktool/nbdkit PSK text: `identity:hexkey` per line; blank lines and `#` comments
/// are skipped. Identities may not contain `:`; keys are 1..=[`MAX_PSK_LEN`] bytes.
pub fn parse_psk_text(text: &str, path: &Path) -> Result<HashMap<String, Vec<u8>>, PskError> {
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why| PskError::Syntax {
            path: path.to_owned(),
            line: i + 1,
            why,
        };
        let (id, hex) = line.split_once(':').ok_or_else(|| err("no ':'"))?;
        if id.is_empty() {
            return Err(err("empty identity"));
        }
        let key = decode_hex(hex).ok_or_else(|| err("key is not hex"))?;
        if key.is_empty() || key.len() > MAX_PSK_LEN {
            return Err(err("key length out of range"));
        }
        out.insert(id.to_owned(), key);
    }
    Ok(out)
}

/// Lower-case hex of `b`.
pub fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of an even-length hex string, `None` if it is not one.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A fresh random key of `len` bytes from OpenSSL's CSPRNG.
pub fn generate_key(len: usize) -> Result<Vec<u8>, ErrorStack> {
    let mut k = vec![0u8; len];
    openssl::rand::rand_bytes(&mut k)?;
    Ok(k)
}

/// What a [`PskFile`] last read: the file's (mtime, length) and its keys.
type PskCache = (Option<(SystemTime, u64)>, HashMap<String, Vec<u8>>);

/// A PSK file in psktool/nbdkit format, re-read whenever it changes on disk (so keys added by
/// the operator or the daemon take effect for the next handshake without a restart).
#[derive(Debug)]
pub struct PskFile {
    path: PathBuf,
    cache: Mutex<PskCache>,
}

impl PskFile {
    /// A store reading `path` (which may not exist yet: no keys until it does).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache: Mutex::new((None, HashMap::new())),
        }
    }

    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if it changed; a missing file means no keys.
    pub fn refresh(&self) -> Result<(), PskError> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(PskError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        if stamp == c.0 && stamp.is_some() {
            return Ok(());
        }
        let keys = match stamp {
            None => HashMap::new(),
            Some(_) => {
                let text =
                    std::fs::read_to_string(&self.path).map_err(|source| PskError::Read {
                        path: self.path.clone(),
                        source,
                    })?;
                parse_psk_text(&text, &self.path)?
            }
        };
        *c = (stamp, keys);
        Ok(())
    }
}

impl PskStore for PskFile {
    fn key(&self, identity: &str) -> Option<Vec<u8>> {
        if let Err(e) = self.refresh() {
            crate::rl_event!(warn, error = %e, "NBD TLS: PSK file unusable; keeping the keys read before");
        }
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.1.get(identity).cloned()
    }
}

/// The ex-data slot where the PSK callback leaves the identity it accepted.
fn identity_index() -> Result<Index<Ssl, String>, ErrorStack> {
    static IDX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    if let Some(i) = IDX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<String>()?;
    Ok(*IDX.get_or_init(|| i))
}

/// Errors setting up the TLS server.
#[derive(Debug, thiserror::Error)]
#[error("Cannot set up TLS: {0}")]
pub struct TlsSetupError(#[from] ErrorStack);

/// A TLS-PSK server context shared by every connection.
#[derive(Clone)]
pub struct TlsServer {
    ctx: SslContext,
    idx: Index<Ssl, String>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

impl TlsServer {
    /// A server that accepts any identity `store` has a key for.
    pub fn new(store: Arc<dyn PskStore>) -> Result<Self, TlsSetupError> {
        let idx = identity_index()?;
        let mut b = SslContext::builder(SslMethod::tls_server())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        b.set_cipher_list(TLS12_CIPHERS)?;
        // No session tickets or resumption: every connection proves the key afresh.
        b.set_options(SslOptions::NO_TICKET);
        b.set_num_tickets(0)?;
        b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
        b.set_mode(SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE);
        // One read(2) takes in every record already sent (pipelined requests).
        b.set_read_ahead(true);
        // AES-GCM first (hardware AES); every TLS 1.3 suite a PSK can use hashes with SHA-256.
        b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")?;
        b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some(id) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                return Ok(0);
            };
            let Some(key) = store.key(id) else {
                crate::rl_event!(info, identity = id, "NBD TLS: unknown PSK identity");
                return Ok(0);
            };
            if key.len() > out.len() {
                return Ok(0);
            }
            out[..key.len()].copy_from_slice(&key);
            ssl.set_ex_data(idx, id.to_owned());
            Ok(key.len())
        });
        Ok(Self {
            ctx: b.build(),
            idx,
        })
    }

    /// Runs the server side of the TLS handshake on `sock`; returns the TLS stream and the
    /// PSK identity the client proved.
    pub fn accept<S: Read + Write>(&self, sock: S) -> Result<(SslStream<S>, String), String> {
        let ssl = Ssl::new(&self.ctx).map_err(|e| e.to_string())?;
        let s = ssl.accept(sock).map_err(|e| match e {
            SslHandshakeError::SetupFailure(e) => e.to_string(),
            SslHandshakeError::Failure(m) | SslHandshakeError::WouldBlock(m) => {
                m.error().to_string()
            }
        })?;
        let id = s
            .ssl()
            .ex_data(self.idx)
            .cloned()
            .ok_or_else(|| "no PSK identity negotiated".to_owned())?;
        tracing::debug!(
            identity = %id,
            version = s.ssl().version_str(),
            cipher = s.ssl().current_cipher().map_or("?", |c| c.name()),
            "NBD TLS session established"
        );
        Ok((s, id))
    }
}

/// A TLS connection in transmission, shared by the reader and the reply writer.
///
/// One TLS object cannot be read and written from two threads at once, so both go through
/// a mutex. The socket is non-blocking: neither side ever holds the mutex while waiting for
/// the peer (a reader waiting for the next request does not hold up replies, and a reply
/// waiting for socket space does not hold up reading). With read-ahead on, one `read(2)`
/// takes in every record the client has sent.
pub struct TlsShared<S> {
    inner: Mutex<SslStream<S>>,
    fd: RawFd,
    /// How long a read waits before it returns `TimedOut` (the caller decides whether that
    /// is a stall or just an idle client).
    read_wait: Option<Duration>,
    /// How long a reply may wait for socket space before the connection is given up.
    write_wait: Option<Duration>,
}

impl<S: Read + Write + AsRawFd> TlsShared<S> {
    /// Shares `s` between a [`TlsReader`] and a [`TlsWriter`]; the caller has made the
    /// socket non-blocking. A read waiting longer than `read_wait` for the client returns
    /// `TimedOut` (and may be retried); a write waiting longer than `write_wait` for socket
    /// space fails with `TimedOut`. `None`: wait for ever.
    pub fn split(
        s: SslStream<S>,
        read_wait: Option<Duration>,
        write_wait: Option<Duration>,
    ) -> (TlsReader<S>, TlsWriter<S>) {
        let fd = s.get_ref().as_raw_fd();
        let sh = Arc::new(TlsShared {
            inner: Mutex::new(s),
            fd,
            read_wait,
            write_wait,
        });
        (TlsReader(Arc::clone(&sh)), TlsWriter(sh))
    }
}

impl<S> TlsShared<S> {
    fn lock(&self) -> MutexGuard<'_, SslStream<S>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The reading half of a [`TlsShared`] stream.
pub struct TlsReader<S>(Arc<TlsShared<S>>);
/// The writing half of a [`TlsShared`] stream (one writer at a time: the transmission
/// phase writes each reply whole under its own lock).
pub struct TlsWriter<S>(Arc<TlsShared<S>>);

/// What a non-blocking TLS call needs before it can go on.
enum Wait {
    Readable,
    Writable,
}

/// Sorts an OpenSSL error into "wait for the socket, then retry" or a final I/O error.
fn classify(e: openssl::ssl::Error) -> Result<Wait, io::Error> {
    use openssl::ssl::ErrorCode;
    match e.code() {
        ErrorCode::WANT_READ => Ok(Wait::Readable),
        ErrorCode::WANT_WRITE => Ok(Wait::Writable),
        ErrorCode::ZERO_RETURN => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "TLS session closed",
        )),
        _ => match e.into_io_error() {
            Ok(io) if io.kind() == io::ErrorKind::WouldBlock => Ok(Wait::Readable),
            Ok(io) => Err(io),
            Err(e) => Err(io::Error::other(e.to_string())),
        },
    }
}

fn wait_for(fd: RawFd, w: Wait, limit: Option<Duration>) -> io::Result<()> {
    let timeout = limit.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
    let events = match w {
        Wait::Readable => libc::POLLIN,
        Wait::Writable => libc::POLLOUT,
    };
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, timeout) };
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "NBD TLS connection made no progress",
            ));
        }
        if r > 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl<S: Read + Write> Read for TlsReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = self.0.lock().ssl_read(buf);
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => return Ok(0),
                Err(e) => wait_for(self.0.fd, classify(e)?, self.0.read_wait)?,
            }
        }
    }
}

impl<S: Read + Write> Write for TlsWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let r = self.0.lock().ssl_write(buf);
            match r {
                Ok(n) => return Ok(n),
                Err(e) => wait_for(self.0.fd, classify(e)?, self.0.write_wait)?,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_text() {
        let p = Path::new("k.psk");
        let m = parse_psk_text("# c\n\nalice:00ff10\nbob:0102\n", p).unwrap_or_default();
        assert_eq!(m.get("alice"), Some(&vec![0, 0xff, 0x10]));
        assert_eq!(m.get("bob"), Some(&vec![1, 2]));
        for bad in ["nocolon", ":00", "a:0", "a:zz", "a:"] {
            assert!(parse_psk_text(bad, p).is_err(), "{bad}");
        }
        assert_eq!(decode_hex(&encode_hex(&[0, 9, 255])), Some(vec![0, 9, 255]));
    }
}
