//! A small HTTP/1.1 server on a Unix (or TCP) listener: one thread per connection,
//! keep-alive, `Content-Length` bodies only, capped header and body sizes.
//!
//! Requests go to a [`Handler`] (a trait, so routes can be tested and fuzzed without sockets).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ratelimit::RateLimit;

/// Longest request head (request line + headers) accepted, bytes.
pub const MAX_HEAD: usize = 16 << 10;
/// Connections served at once. A new connection beyond it closes the connection that has
/// waited longest for a request (idle keep-alive or slow clients cannot lock the API out);
/// only when every connection is busy with a request is the new one answered 503.
pub const MAX_CONNECTIONS: usize = 64;
/// Idle time after which a keep-alive connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, upper case as sent.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Query string (without `?`), if any.
    pub query: Option<String>,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }
    /// An empty response.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: Vec::new(),
        }
    }
}

/// Serves requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request; must not panic.
    fn handle(&self, req: &Request) -> Response;
    /// Answers a request that could not be parsed (status 400, 413, 431 or 501).
    fn reject(&self, status: u16, message: &str) -> Response;
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between requests.
    #[error("Connection closed")]
    Closed,
    /// Reading failed.
    #[error("Read failed")]
    Io(#[source] io::Error),
    /// The request is malformed (answer with this status).
    #[error("Bad request: {1}")]
    Bad(u16, &'static str),
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Reads one request. `Ok((req, keep_alive))`.
pub fn read_request<R: BufRead, W: Write>(
    r: &mut R,
    w: &mut W,
    max_body: usize,
) -> Result<(Request, bool), ReadError> {
    let mut head = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD + 1 - head.len().min(MAX_HEAD)) as u64)
            .read_until(b'\n', &mut line)
            .map_err(ReadError::Io)?;
        if n == 0 {
            return if lines.is_empty() {
                Err(ReadError::Closed)
            } else {
                Err(ReadError::Bad(400, "truncated request head"))
            };
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(ReadError::Bad(431, "request head too large"));
        }
        if !line.ends_with(b"\n") {
            return Err(ReadError::Bad(400, "truncated request head"));
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| ReadError::Bad(400, "request head is not UTF-8"))?
            .trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            if lines.is_empty() {
                continue; // tolerate blank lines between requests
            }
            break;
        }
        lines.push(text.to_owned());
    }
    let mut parts = lines[0].split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(400, "malformed request line"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(ReadError::Bad(400, "unsupported HTTP version")),
    };
    if method.is_empty() || !target.starts_with('/') {
        return Err(ReadError::Bad(400, "malformed request line"));
    }
    let mut content_length: Option<usize> = None;
    let mut keep_alive = http11;
    let mut expect_continue = false;
    for h in &lines[1..] {
        let Some((k, v)) = h.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header"));
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| ReadError::Bad(400, "invalid Content-Length"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(ReadError::Bad(400, "conflicting Content-Length"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(ReadError::Bad(501, "Transfer-Encoding is not supported"))
            }
            "connection" => {
                let v = v.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            "expect" => expect_continue = v.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    let len = content_length.unwrap_or(0);
    if len > max_body {
        return Err(ReadError::Bad(413, "request body too large"));
    }
    if expect_continue && len > 0 {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(ReadError::Io)?;
        w.flush().map_err(ReadError::Io)?;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Bad(400, "truncated body")
        } else {
            ReadError::Io(e)
        }
    })?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    Ok((
        Request {
            method: method.to_owned(),
            path,
            query,
            body,
        },
        keep_alive,
    ))
}

/// Writes a response.
pub fn write_response<W: Write>(w: &mut W, resp: &Response, keep_alive: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: tmemd\r\nContent-Length: {}\r\nConnection: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    if !resp.body.is_empty() {
        out.extend_from_slice(format!("Content-Type: {}\r\n", resp.content_type).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&resp.body);
    w.write_all(&out)?;
    w.flush()
}

/// Serves one connection until it closes, errs or the server stops.
pub fn serve_connection<S: Read + Write>(
    stream: S,
    writer: S,
    handler: &dyn Handler,
    max_body: usize,
    stop: &AtomicBool,
) {
    serve_tracked(stream, writer, handler, max_body, stop, &|_| {});
}

/// [`serve_connection`], telling `waiting` whether the connection waits for a request
/// (`true`) or is busy answering one (`false`).
fn serve_tracked<S: Read + Write>(
    stream: S,
    writer: S,
    handler: &dyn Handler,
    max_body: usize,
    stop: &AtomicBool,
    waiting: &dyn Fn(bool),
) {
    let mut r = BufReader::new(stream);
    let mut w = writer;
    while !stop.load(Ordering::Relaxed) {
        waiting(true);
        let got = read_request(&mut r, &mut w, max_body);
        waiting(false);
        match got {
            Ok((req, keep_alive)) => {
                // A handler bug must not take the connection thread (or the daemon) down.
                let resp =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(&req)))
                        .unwrap_or_else(|_| handler.reject(500, "internal error"));
                let keep_alive = keep_alive && !stop.load(Ordering::Relaxed);
                if write_response(&mut w, &resp, keep_alive).is_err() || !keep_alive {
                    return;
                }
            }
            Err(ReadError::Closed) | Err(ReadError::Io(_)) => return,
            Err(ReadError::Bad(status, msg)) => {
                let _ = write_response(&mut w, &handler.reject(status, msg), false);
                return;
            }
        }
    }
}

enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A running HTTP server (one accept thread; detached connection threads).
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    wake: Box<dyn Fn() + Send + Sync>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer").finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Serves `handler` on an already bound Unix listener.
    pub fn unix(
        l: UnixListener,
        handler: Arc<dyn Handler>,
        max_body: usize,
    ) -> io::Result<HttpServer> {
        let path = l
            .local_addr()?
            .as_pathname()
            .map(|p| p.to_owned())
            .ok_or_else(|| io::Error::other("listener has no path"))?;
        let wake = Box::new(move || {
            let _ = std::os::unix::net::UnixStream::connect(&path);
        });
        Self::start(AnyListener::Unix(l), wake, handler, max_body, "tmemd-ctl")
    }

    /// Serves `handler` on an already bound TCP listener.
    pub fn tcp(l: TcpListener, handler: Arc<dyn Handler>, max_body: usize) -> io::Result<Self> {
        let addr = l.local_addr()?;
        let wake = Box::new(move || {
            let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        });
        Self::start(
            AnyListener::Tcp(l),
            wake,
            handler,
            max_body,
            "tmemd-metrics",
        )
    }

    fn start(
        l: AnyListener,
        wake: Box<dyn Fn() + Send + Sync>,
        handler: Arc<dyn Handler>,
        max_body: usize,
        name: &str,
    ) -> io::Result<HttpServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || accept_loop(l, handler, max_body, stop2))?;
        Ok(HttpServer {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops accepting and joins the accept thread. Open connections end after their
    /// current request.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        (self.wake)();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

static ACCEPT_ERRORS: RateLimit = RateLimit::new();

/// An open connection, as the accept loop sees it.
struct Conn {
    /// Since when it waits for a request (`None`: answering one).
    waiting_since: Option<Instant>,
    /// Closes it (both directions), from another thread.
    close: Box<dyn Fn() + Send>,
}

type Conns = Arc<Mutex<HashMap<u64, Conn>>>;

fn conns_lock(c: &Conns) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes room for one more connection: true if there is room, after closing the
/// connection that has waited longest for a request if the server is full.
fn make_room(conns: &Conns) -> bool {
    let mut c = conns_lock(conns);
    if c.len() < MAX_CONNECTIONS {
        return true;
    }
    let oldest = c
        .iter()
        .filter_map(|(&id, conn)| conn.waiting_since.map(|t| (t, id)))
        .min();
    match oldest.and_then(|(_, id)| c.remove(&id)) {
        Some(conn) => {
            (conn.close)();
            true
        }
        None => false,
    }
}

fn accept_loop(l: AnyListener, handler: Arc<dyn Handler>, max_body: usize, stop: Arc<AtomicBool>) {
    let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
    let next_id = AtomicU64::new(0);
    type Accepted = (Box<dyn ReadWrite>, Box<dyn ReadWrite>, Box<dyn Fn() + Send>);
    while !stop.load(Ordering::Relaxed) {
        let conn: io::Result<Accepted> = match &l {
            AnyListener::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_read_timeout(Some(IDLE_TIMEOUT))?;
                let (s2, s3) = (s.try_clone()?, s.try_clone()?);
                let close = Box::new(move || {
                    let _ = s3.shutdown(Shutdown::Both);
                });
                Ok((
                    Box::new(s) as Box<dyn ReadWrite>,
                    Box::new(s2) as _,
                    close as _,
                ))
            }),
            AnyListener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_read_timeout(Some(IDLE_TIMEOUT))?;
                let (s2, s3) = (s.try_clone()?, s.try_clone()?);
                let close = Box::new(move || {
                    let _ = s3.shutdown(Shutdown::Both);
                });
                Ok((
                    Box::new(s) as Box<dyn ReadWrite>,
                    Box::new(s2) as _,
                    close as _,
                ))
            }),
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (r, mut w, close) = match conn {
            Ok(c) => c,
            Err(e) => {
                if ACCEPT_ERRORS.allow() {
                    tracing::warn!(error = %e, "control API accept failed");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if !make_room(&conns) {
            let _ = write_response(&mut w, &handler.reject(503, "too many connections"), false);
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        conns_lock(&conns).insert(
            id,
            Conn {
                waiting_since: Some(Instant::now()),
                close,
            },
        );
        let (h, st, cs) = (handler.clone(), stop.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name("tmemd-http".into())
            .spawn(move || {
                let waiting = |w: bool| {
                    if let Some(c) = conns_lock(&cs).get_mut(&id) {
                        // Waiting since the first time it started waiting this round.
                        c.waiting_since = w.then(|| c.waiting_since.unwrap_or_else(Instant::now));
                    }
                };
                serve_tracked(r, w, h.as_ref(), max_body, &st, &waiting);
                conns_lock(&cs).remove(&id);
            });
        if let Err(e) = spawned {
            conns_lock(&conns).remove(&id);
            if ACCEPT_ERRORS.allow() {
                tracing::warn!(error = %e, "cannot spawn a control API thread");
            }
        }
    }
}

/// A byte stream (boxed per connection).
pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<(Request, bool), ReadError> {
        let mut r = io::Cursor::new(raw.to_vec());
        let mut w = Vec::new();
        read_request(&mut r, &mut w, 100)
    }

    #[test]
    fn parses_get_and_post() {
        let (r, ka) = parse(b"GET /api/v1/status?x=1 HTTP/1.1\r\nHost: l\r\n\r\n").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/status")
        );
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert!(ka);
        let (r, ka) =
            parse(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").unwrap();
        assert_eq!(r.body, b"{}");
        assert!(!ka);
    }

    #[test]
    fn rejects_bad_requests() {
        for (raw, code) in [
            (&b"GARBAGE\r\n\r\n"[..], 400),
            (b"GET /a HTTP/2\r\n\r\n", 400),
            (b"POST /a HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", 413),
            (b"POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}", 400),
            (b"GET /a HTTP/1.1\r\nHost", 400),
        ] {
            match parse(raw) {
                Err(ReadError::Bad(c, _)) => {
                    assert_eq!(c, code, "{:?}", String::from_utf8_lossy(raw))
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
            }
        }
        let big = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(big.as_bytes()), Err(ReadError::Bad(431, _))));
        assert!(matches!(parse(b""), Err(ReadError::Closed)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pieces: [&[u8]; 8] = [
            b"GET ",
            b"/api/v1/x ",
            b"HTTP/1.1",
            b"\r\n",
            b"Content-Length: 3",
            b"\n",
            b": ",
            b"\xff",
        ];
        for _ in 0..5000 {
            let mut raw = Vec::new();
            for _ in 0..(next() % 12) {
                if next() % 3 == 0 {
                    raw.push(next() as u8);
                } else {
                    raw.extend_from_slice(pieces[(next() % 8) as usize]);
                }
            }
            let _ = parse(&raw);
        }
    }

    #[test]
    fn expect_continue_is_answered() {
        let mut r = io::Cursor::new(
            b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        );
        let mut w = Vec::new();
        read_request(&mut r, &mut w, 100).unwrap();
        assert!(w.starts_with(b"HTTP/1.1 100 Continue"));
    }

    #[test]
    fn response_format() {
        let mut w = Vec::new();
        write_response(&mut w, &Response::json(200, b"{}".to_vec()), true).unwrap();
        let s = String::from_utf8(w).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(s.contains("Content-Length: 2\r\n"));
        assert!(s.ends_with("\r\n\r\n{}"));
    }
}
