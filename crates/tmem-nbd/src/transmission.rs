//! Transmission phase: request parsing, validation, execution and (possibly out-of-order) replies.
//!
//! One reader loop per connection parses requests. Cheap requests (small READ/WRITE and small
//! TRIM/WRITE_ZEROES/CACHE/BLOCK_STATUS) run inline on the reader, which keeps per-request CPU low;
//! FLUSH, large requests and — while further requests are already buffered — reads the backend
//! expects to wait on (a page in a remote tier) go to a small per-connection worker pool, so
//! their replies may overtake or be overtaken by later requests; the pool grows to
//! [`TransmissionConfig::slow_workers`] threads once such a read arrives, so that that many of
//! them overlap. Every reply is written whole under the writer lock. Inline
//! replies are batched while further complete requests are already buffered and sent together
//! (one syscall per pipelined batch); they are flushed before the reader could block.
//!
//! ## Memory a connection can pin
//! Buffers sized by a request beyond [`TransmissionConfig::inline_max`] (WRITE payloads,
//! READ replies, large BLOCK_STATUS replies) are reserved from the server-wide
//! [`TransmissionConfig::budget`] before they are allocated and freed after the request;
//! when the budget is used up the connection waits (it stops reading its socket). What a
//! connection keeps outside the budget is bounded by the configuration: the 128 KiB read
//! buffer, the reply batch (< 2 × 256 KiB), one retained write buffer and one read buffer
//! per thread (reader and each worker), each at most `inline_max` (+ 28 bytes), and a
//! transient copy of a small structured READ reply: about 2 MiB with the defaults (about 2.5 MiB
//! once slow reads have grown the pool to `slow_workers`).

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::BackendError;
use crate::budget::{BufferBudget, BufferPermit};
use crate::handshake::Session;
use crate::proto::*;
use crate::rl_event;
use crate::stats::ExportStats;

/// A parsed transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub typ: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// Why a connection's transmission phase ended abnormally (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// Socket I/O failed.
    #[error("Transmission I/O failed")]
    Io(#[source] io::Error),
    /// A request did not start with the request magic.
    #[error("Bad request magic {0:#x}")]
    BadMagic(u32),
    /// The peer closed the connection in the middle of a request header.
    #[error("Truncated request header ({0} of 28 bytes)")]
    TruncatedHeader(usize),
    /// A WRITE payload larger than we accept.
    #[error("Write payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u32),
}

impl From<io::Error> for TransmissionError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl Request {
    /// Parse a 28-byte request header. Only the magic is checked here; see [`validate`].
    pub fn parse(h: &[u8; REQUEST_LEN]) -> Result<Self, TransmissionError> {
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != REQUEST_MAGIC {
            return Err(TransmissionError::BadMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([h[4], h[5]]),
            typ: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
            offset: u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
            len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        })
    }

    /// Encode as a 28-byte header (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut h = [0u8; REQUEST_LEN];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&self.flags.to_be_bytes());
        h[6..8].copy_from_slice(&self.typ.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&self.offset.to_be_bytes());
        h[24..28].copy_from_slice(&self.len.to_be_bytes());
        h
    }
}

/// Check a request against the session; `Err` is the NBD errno to reply with.
pub fn validate(r: &Request, s: &Session) -> Result<(), u32> {
    let t = s.tflags;
    let ro = t & TFLAG_READ_ONLY != 0;
    let end = r.offset.checked_add(u64::from(r.len));
    let in_range = end.is_some_and(|e| e <= s.size);
    let allowed = match r.typ {
        CMD_READ => CMD_FLAG_FUA | if s.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => {
            CMD_FLAG_FUA
                | CMD_FLAG_NO_HOLE
                | if t & TFLAG_SEND_FAST_ZERO != 0 {
                    CMD_FLAG_FAST_ZERO
                } else {
                    0
                }
        }
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(EINVAL),
    };
    if r.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    match r.typ {
        CMD_READ => {
            if r.len > MAX_PAYLOAD {
                return Err(if s.structured { EOVERFLOW } else { EINVAL });
            }
            if !in_range {
                return Err(EINVAL);
            }
        }
        CMD_WRITE => {
            if ro {
                return Err(EPERM);
            }
            if !in_range {
                return Err(ENOSPC);
            }
        }
        CMD_FLUSH => {}
        CMD_TRIM => {
            if t & TFLAG_SEND_TRIM == 0 {
                return Err(EINVAL);
            }
            if ro {
                return Err(EPERM);
            }
            if !in_range {
                return Err(EINVAL);
            }
        }
        CMD_CACHE => {
            if t & TFLAG_SEND_CACHE == 0 || !in_range {
                return Err(EINVAL);
            }
        }
        CMD_WRITE_ZEROES => {
            if t & TFLAG_SEND_WRITE_ZEROES == 0 {
                return Err(EINVAL);
            }
            if ro {
                return Err(EPERM);
            }
            if !in_range {
                return Err(ENOSPC);
            }
        }
        CMD_BLOCK_STATUS => {
            if !s.base_allocation || r.len == 0 || !in_range {
                return Err(EINVAL);
            }
        }
        _ => return Err(EINVAL),
    }
    Ok(())
}

/// Tuning for the transmission phase.
#[derive(Debug, Clone)]
pub struct TransmissionConfig {
    /// Worker threads per connection for slow requests; 0 runs everything inline (no reordering).
    /// Default: 2.
    pub workers: usize,
    /// Requests with a length above this (bytes) and every FLUSH go to the workers. Default: 256 KiB.
    pub inline_max: u32,
    /// Worker threads of a connection once it has sent a READ that the backend says may block
    /// ([`crate::BlockBackend::read_may_block`]: a page in a remote tier, say); such reads go
    /// to the workers while more requests are buffered behind them, so up to this many of
    /// them wait at once (a lone one runs inline). Never fewer than `workers`; ignored when
    /// `workers` is 0. Default: 4 (on a 2-CPU host with Redis beside tmemd, 16 gave lower
    /// throughput than 4: BENCHMARKS.md §5).
    pub slow_workers: usize,
    /// Requests queued for the workers before the reader blocks (back-pressure). Default: 32.
    pub queue: usize,
    /// Most inline replies collected before they are written together (1 = write each reply at
    /// once). Batching saves syscalls; small batches keep the client's pipeline busy. Default: 4.
    pub max_batch: usize,
    /// Where buffers larger than `inline_max` are reserved; shared by every connection of a
    /// server ([`crate::ServerHandle::start`] installs one of `ServerConfig::buffer_limit`).
    /// Default: unlimited.
    pub budget: BufferBudget,
}

impl Default for TransmissionConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            inline_max: 256 << 10,
            slow_workers: 4,
            queue: 32,
            max_batch: 4,
            budget: BufferBudget::unlimited(),
        }
    }
}

struct Ctx<W> {
    w: Mutex<W>,
    s: Session,
    stats: Arc<ExportStats>,
    broken: AtomicBool,
    /// Write payload bytes sitting in the worker queue.
    queued_bytes: AtomicU64,
    /// Buffers above `inline_max` are reserved here.
    budget: BufferBudget,
    inline_max: u32,
}

/// Most write payload bytes queued for the workers of one connection.
const MAX_QUEUED_BYTES: u64 = 64 << 20;

struct Job {
    req: Request,
    data: Vec<u8>,
    /// The budget reservation for `data`, given back when the job is done.
    _permit: Option<BufferPermit>,
}

struct Pool {
    tx: SyncSender<Job>,
    rx: Arc<Mutex<Receiver<Job>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts workers until there are `n` (fewer if a thread cannot be spawned).
    fn grow<W: Write + Send + 'static>(&mut self, ctx: &Arc<Ctx<W>>, n: usize) {
        while self.handles.len() < n {
            let i = self.handles.len();
            let ctx = Arc::clone(ctx);
            let rx = Arc::clone(&self.rx);
            match std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || worker(&ctx, &rx))
            {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot spawn NBD worker");
                    return;
                }
            }
        }
    }

    fn finish(self) {
        drop(self.tx);
        for h in self.handles {
            // A worker panic has already been reported by the panic hook; nothing else to do.
            let _ = h.join();
        }
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Serve the transmission phase of one connection until the client disconnects.
///
/// `reader` and `writer` are the two directions of the socket (e.g. `try_clone`d). Returns `Ok`
/// on `NBD_CMD_DISC` or a clean EOF between requests; all in-flight requests are answered first.
pub fn serve_transmission<R: Read, W: Write + Send + 'static>(
    reader: R,
    writer: W,
    session: Session,
    stats: Arc<ExportStats>,
    cfg: &TransmissionConfig,
) -> Result<(), TransmissionError> {
    let ctx = Arc::new(Ctx {
        w: Mutex::new(writer),
        s: session,
        stats,
        broken: AtomicBool::new(false),
        queued_bytes: AtomicU64::new(0),
        budget: cfg.budget.clone(),
        inline_max: cfg.inline_max,
    });
    let mut pool: Option<Pool> = None;
    let res = reader_loop(reader, &ctx, cfg, &mut pool);
    if let Some(p) = pool {
        p.finish();
    }
    res
}

fn reader_loop<R: Read, W: Write + Send + 'static>(
    reader: R,
    ctx: &Arc<Ctx<W>>,
    cfg: &TransmissionConfig,
    pool: &mut Option<Pool>,
) -> Result<(), TransmissionError> {
    let mut pending = Vec::new();
    let res = reader_loop_inner(reader, ctx, cfg, pool, &mut pending);
    // Replies of requests already executed are still owed to the client.
    let flushed = flush_pending(ctx, &mut pending);
    res.and(flushed.map_err(TransmissionError::Io))
}

/// Replies are batched while more complete requests are already buffered.
const FLUSH_AT: usize = 256 << 10;

/// True if `buf` holds a complete request (header, plus payload for WRITE).
fn complete_request_buffered(buf: &[u8]) -> bool {
    let Some(h) = buf.get(..REQUEST_LEN) else {
        return false;
    };
    let typ = u16::from_be_bytes([h[6], h[7]]);
    let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
    typ != CMD_WRITE || buf.len() - REQUEST_LEN >= len
}

fn flush_pending<W: Write>(ctx: &Ctx<W>, pending: &mut Vec<u8>) -> io::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let r = send(ctx, pending);
    pending.clear();
    r
}

fn reader_loop_inner<R: Read, W: Write + Send + 'static>(
    reader: R,
    ctx: &Arc<Ctx<W>>,
    cfg: &TransmissionConfig,
    pool: &mut Option<Pool>,
    pending: &mut Vec<u8>,
) -> Result<(), TransmissionError> {
    let mut r = BufReader::with_capacity(128 << 10, reader);
    let mut scratch: Vec<u8> = Vec::new();
    let mut wbuf: Vec<u8> = Vec::new();
    let mut batched = 0usize;
    loop {
        if ctx.broken.load(Ordering::Relaxed) {
            return Err(TransmissionError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "reply write failed",
            )));
        }
        if batched >= cfg.max_batch
            || pending.len() >= FLUSH_AT
            || !complete_request_buffered(r.buffer())
        {
            flush_pending(ctx, pending)?;
            batched = 0;
        }
        batched += 1;
        let mut h = [0u8; REQUEST_LEN];
        match read_full(&mut r, &mut h)? {
            0 => return Ok(()),
            REQUEST_LEN => {}
            n => return Err(TransmissionError::TruncatedHeader(n)),
        }
        let req = Request::parse(&h)?;
        if req.typ == CMD_DISC {
            return Ok(());
        }
        let mut heavy = cfg.workers > 0 && (req.typ == CMD_FLUSH || req.len > cfg.inline_max);
        // Bound the write payload bytes queued for workers; past it, run inline (back-pressure).
        let queued = if req.typ == CMD_WRITE {
            u64::from(req.len)
        } else {
            0
        };
        if heavy && ctx.queued_bytes.load(Ordering::Relaxed) + queued > MAX_QUEUED_BYTES {
            heavy = false;
        }
        let mut data = Vec::new();
        let mut permit = None;
        if req.typ == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                rl_event!(
                    warn,
                    len = req.len,
                    "NBD write payload too large, disconnecting"
                );
                return Err(TransmissionError::PayloadTooLarge(req.len));
            }
            // A payload above the inline size gets its own buffer, reserved from the budget
            // (waiting for it is the back-pressure) and freed after the request; `wbuf`
            // stays small.
            let large = req.len > cfg.inline_max;
            if large {
                permit = Some(ctx.budget.acquire(u64::from(req.len)));
            }
            let buf = if heavy || large { &mut data } else { &mut wbuf };
            if large {
                // Already reserved: one exact allocation (its pages become resident only as
                // data arrives), returned to the system when dropped.
                buf.reserve_exact(req.len as usize);
            }
            // A small buffer grows with the data actually received.
            buf.clear();
            let got = (&mut r).take(u64::from(req.len)).read_to_end(buf)?;
            if got != req.len as usize {
                return Err(TransmissionError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
        if let Err(errno) = validate(&req, &ctx.s) {
            count_type(&ctx.stats, req.typ);
            rl_event!(
                debug,
                typ = req.typ,
                flags = req.flags,
                errno,
                "NBD request rejected"
            );
            reply_error(ctx, &mut Out::Batch(pending), &req, errno)?;
            continue;
        }
        // A read the backend expects to wait (a remote round trip) goes to the workers too
        // when the client has already sent more requests, so that those need not queue
        // behind it. Alone, it runs inline: handing it to a worker would only add two
        // thread wake-ups to its latency.
        let mut want_workers = cfg.workers;
        if !heavy
            && cfg.workers > 0
            && req.typ == CMD_READ
            && complete_request_buffered(r.buffer())
            && ctx.s.backend.read_may_block(req.offset, u64::from(req.len))
        {
            heavy = true;
            want_workers = cfg.slow_workers.max(cfg.workers);
        }
        if !heavy {
            let payload: &[u8] = match (req.typ, permit.is_some()) {
                (CMD_WRITE, true) => &data,
                (CMD_WRITE, false) => &wbuf,
                _ => &[],
            };
            execute(ctx, &mut Out::Batch(pending), &req, payload, &mut scratch)?;
            continue;
        }
        // The worker queue may block; do not sit on finished replies meanwhile.
        flush_pending(ctx, pending)?;
        if pool.is_none() {
            *pool = start_pool(ctx, cfg);
        }
        if let Some(p) = pool.as_mut() {
            p.grow(ctx, want_workers);
        }
        match pool {
            Some(p) => {
                ctx.queued_bytes.fetch_add(queued, Ordering::Relaxed);
                let job = Job {
                    req,
                    data,
                    _permit: permit,
                };
                if let Err(e) = p.tx.send(job) {
                    ctx.queued_bytes.fetch_sub(queued, Ordering::Relaxed);
                    let job = e.0;
                    execute(ctx, &mut Out::Direct, &job.req, &job.data, &mut scratch)?;
                }
            }
            None => execute(ctx, &mut Out::Direct, &req, &data, &mut scratch)?,
        }
    }
}

fn start_pool<W: Write + Send + 'static>(
    ctx: &Arc<Ctx<W>>,
    cfg: &TransmissionConfig,
) -> Option<Pool> {
    let (tx, rx) = sync_channel::<Job>(cfg.queue.max(1));
    let mut pool = Pool {
        tx,
        rx: Arc::new(Mutex::new(rx)),
        handles: Vec::new(),
    };
    pool.grow(ctx, cfg.workers);
    if pool.handles.is_empty() {
        return None;
    }
    Some(pool)
}

fn worker<W: Write + Send>(ctx: &Ctx<W>, rx: &Mutex<Receiver<Job>>) {
    let mut scratch = Vec::new();
    loop {
        let job = {
            let guard = rx.lock().unwrap_or_else(|e| e.into_inner());
            guard.recv()
        };
        let Ok(job) = job else { return };
        let res = execute(ctx, &mut Out::Direct, &job.req, &job.data, &mut scratch);
        if job.req.typ == CMD_WRITE {
            ctx.queued_bytes
                .fetch_sub(u64::from(job.req.len), Ordering::Relaxed);
        }
        if let Err(e) = res {
            ctx.broken.store(true, Ordering::Relaxed);
            rl_event!(debug, error = %e, "NBD reply failed");
        }
    }
}

fn count_type(st: &ExportStats, typ: u16) {
    let c = match typ {
        CMD_READ => &st.reads,
        CMD_WRITE => &st.writes,
        CMD_FLUSH => &st.flushes,
        CMD_TRIM => &st.trims,
        CMD_WRITE_ZEROES => &st.write_zeroes,
        CMD_CACHE => &st.caches,
        CMD_BLOCK_STATUS => &st.block_status,
        _ => return,
    };
    ExportStats::inc(c, 1);
}

/// Where a reply goes: straight to the socket, or appended to the reader's batch.
enum Out<'a> {
    Direct,
    Batch(&'a mut Vec<u8>),
}

fn emit<W: Write>(ctx: &Ctx<W>, out: &mut Out<'_>, bytes: &[u8]) -> io::Result<()> {
    match out {
        Out::Direct => send(ctx, bytes),
        // A large reply goes out directly (after what is batched), not copied into the batch.
        Out::Batch(v) if bytes.len() > FLUSH_AT => {
            flush_pending(ctx, v)?;
            send(ctx, bytes)
        }
        Out::Batch(v) => {
            v.extend_from_slice(bytes);
            Ok(())
        }
    }
}

fn send<W: Write>(ctx: &Ctx<W>, bytes: &[u8]) -> io::Result<()> {
    let mut w = ctx.w.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(bytes)?;
    w.flush()
}

fn simple_header(buf: &mut [u8], errno: u32, cookie: u64) {
    buf[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&errno.to_be_bytes());
    buf[8..16].copy_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn reply_error<W: Write>(
    ctx: &Ctx<W>,
    out: &mut Out<'_>,
    req: &Request,
    errno: u32,
) -> io::Result<()> {
    ExportStats::inc(&ctx.stats.errors, 1);
    if ctx.s.structured {
        let mut b = Vec::with_capacity(26);
        chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req.cookie, 6);
        b.extend_from_slice(&errno.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        emit(ctx, out, &b)
    } else {
        let mut b = [0u8; 16];
        simple_header(&mut b, errno, req.cookie);
        emit(ctx, out, &b)
    }
}

fn reply_ok<W: Write>(ctx: &Ctx<W>, out: &mut Out<'_>, req: &Request) -> io::Result<()> {
    let mut b = [0u8; 16];
    simple_header(&mut b, 0, req.cookie);
    emit(ctx, out, &b)
}

fn backend_result<W: Write>(
    ctx: &Ctx<W>,
    out: &mut Out<'_>,
    req: &Request,
    r: Result<(), BackendError>,
) -> io::Result<()> {
    match r {
        Ok(()) => reply_ok(ctx, out, req),
        Err(e) => {
            rl_event!(debug, error = %e, typ = req.typ, "NBD backend error");
            reply_error(ctx, out, req, e.nbd_errno())
        }
    }
}

/// Execute a validated request and send its reply.
fn execute<W: Write>(
    ctx: &Ctx<W>,
    out: &mut Out<'_>,
    req: &Request,
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    let b = &*ctx.s.backend;
    let st = &*ctx.stats;
    count_type(st, req.typ);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.typ {
        CMD_READ => read(ctx, out, req, scratch),
        CMD_WRITE => {
            let r = b.write(req.offset, payload, fua);
            if r.is_ok() {
                ExportStats::inc(&st.bytes_written, payload.len() as u64);
            }
            backend_result(ctx, out, req, r)
        }
        CMD_FLUSH => backend_result(ctx, out, req, b.flush()),
        CMD_TRIM => {
            let r = b.trim(req.offset, u64::from(req.len)).and_then(|()| {
                if fua {
                    b.flush()
                } else {
                    Ok(())
                }
            });
            backend_result(ctx, out, req, r)
        }
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            let r = b
                .write_zeroes(req.offset, u64::from(req.len), may_trim, fast)
                .and_then(|()| if fua { b.flush() } else { Ok(()) });
            backend_result(ctx, out, req, r)
        }
        CMD_CACHE => backend_result(ctx, out, req, b.cache(req.offset, u64::from(req.len))),
        CMD_BLOCK_STATUS => block_status(ctx, out, req),
        _ => reply_error(ctx, out, req, EINVAL),
    }
}

/// Smallest zero run sent as a hole chunk; shorter runs are zero-filled and sent as data.
const MIN_HOLE: usize = 512;

fn read<W: Write>(
    ctx: &Ctx<W>,
    out: &mut Out<'_>,
    req: &Request,
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    let structured = ctx.s.structured;
    let pre = if structured { 28 } else { 16 };
    let len = req.len as usize;
    // Above the inline size: a buffer of its own, reserved from the budget and freed after
    // the reply; `scratch` stays small.
    let large = req.len > ctx.inline_max;
    let _permit = large.then(|| ctx.budget.acquire((pre + len) as u64));
    let mut own;
    let buf = if large {
        own = vec![0u8; pre + len];
        &mut own[..]
    } else {
        if scratch.len() < pre + len {
            scratch.resize(pre + len, 0);
        }
        &mut scratch[..pre + len]
    };
    let zeros = match ctx.s.backend.read(req.offset, &mut buf[pre..]) {
        Ok(z) => z,
        Err(e) => {
            rl_event!(debug, error = %e, "NBD backend read error");
            return reply_error(ctx, out, req, e.nbd_errno());
        }
    };
    ExportStats::inc(&ctx.stats.bytes_read, len as u64);
    // Sanitize the backend's ranges: clamp to the buffer, zero-fill short runs.
    let mut holes: Vec<(usize, usize)> = Vec::new();
    for &(s, l) in zeros.as_slice() {
        let s = s.min(len);
        let l = l.min(len - s);
        if l == 0 {
            continue;
        }
        if !structured || l < MIN_HOLE {
            buf[pre + s..pre + s + l].fill(0);
        } else {
            holes.push((s, l));
        }
    }
    if !structured {
        simple_header(buf, 0, req.cookie);
        return emit(ctx, out, buf);
    }
    let hole_bytes: usize = holes.iter().map(|h| h.1).sum();
    // Mixed data and holes are sent from a second buffer; if the budget cannot cover it at
    // once, the holes go out as zero data instead (always allowed), without waiting while
    // holding the first reservation.
    let mixed_cap = (len - hole_bytes.min(len)) + (holes.len() * 2 + 1) * 32;
    let mixed_permit = if large && !holes.is_empty() && hole_bytes < len {
        ctx.budget.try_acquire(mixed_cap as u64).map(Some)
    } else {
        Some(None)
    };
    let df = req.flags & CMD_FLAG_DF != 0 || mixed_permit.is_none();
    if len > 0 && hole_bytes == len {
        ExportStats::inc(&ctx.stats.hole_bytes_read, len as u64);
        let mut b = Vec::with_capacity(32);
        chunk_header(
            &mut b,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_HOLE,
            req.cookie,
            12,
        );
        b.extend_from_slice(&req.offset.to_be_bytes());
        b.extend_from_slice(&req.len.to_be_bytes());
        return emit(ctx, out, &b);
    }
    if holes.is_empty() || df {
        for &(s, l) in &holes {
            buf[pre + s..pre + s + l].fill(0);
        }
        let mut h = Vec::with_capacity(28);
        chunk_header(
            &mut h,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            req.len + 8,
        );
        h.extend_from_slice(&req.offset.to_be_bytes());
        buf[..28].copy_from_slice(&h);
        return emit(ctx, out, buf);
    }
    ExportStats::inc(&ctx.stats.hole_bytes_read, hole_bytes as u64);
    // Mixed data and holes: one chunk per run, DONE on the last.
    let mut runs: Vec<(usize, usize, bool)> = Vec::with_capacity(holes.len() * 2 + 1);
    let mut pos = 0;
    for &(s, l) in &holes {
        if s > pos {
            runs.push((pos, s - pos, false));
        }
        runs.push((s, l, true));
        pos = s + l;
    }
    if pos < len {
        runs.push((pos, len - pos, false));
    }
    let mut chunks = Vec::with_capacity(mixed_cap);
    let last = runs.len() - 1;
    for (i, &(s, l, hole)) in runs.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let off = req.offset + s as u64;
        if hole {
            chunk_header(&mut chunks, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
            chunks.extend_from_slice(&off.to_be_bytes());
            chunks.extend_from_slice(&(l as u32).to_be_bytes());
        } else {
            chunk_header(
                &mut chunks,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                l as u32 + 8,
            );
            chunks.extend_from_slice(&off.to_be_bytes());
            chunks.extend_from_slice(&buf[pre + s..pre + s + l]);
        }
    }
    emit(ctx, out, &chunks)
}

/// Most descriptors per BLOCK_STATUS chunk (spec: SHOULD NOT exceed 2^20).
const MAX_EXTENTS: usize = 1 << 20;

fn block_status<W: Write>(ctx: &Ctx<W>, out: &mut Out<'_>, req: &Request) -> io::Result<()> {
    let ext = match ctx.s.backend.block_status(req.offset, u64::from(req.len)) {
        Ok(e) => e,
        Err(e) => return reply_error(ctx, out, req, e.nbd_errno()),
    };
    let want = u64::from(req.len);
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut desc: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in ext {
        if e.len == 0 {
            continue;
        }
        let l = e.len.min(want - covered);
        // `l <= want <= u32::MAX`.
        desc.push((l as u32, e.flags()));
        covered += l;
        if covered >= want || one || desc.len() >= MAX_EXTENTS {
            break;
        }
    }
    if desc.is_empty() {
        desc.push((req.len, 0));
    }
    let plen = 4 + desc.len() * 8;
    // Up to 8 MiB for a whole-disk answer: reserved like other large buffers (the
    // descriptor list is already built, but this caps how many such replies exist at once).
    let _permit = (plen > ctx.inline_max as usize).then(|| ctx.budget.acquire(2 * plen as u64));
    let mut b = Vec::with_capacity(20 + plen);
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        plen as u32,
    );
    b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in desc {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    emit(ctx, out, &b)
}
