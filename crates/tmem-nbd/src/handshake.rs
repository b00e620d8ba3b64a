//! Fixed-newstyle handshake and option haggling, generic over any `Read + Write` stream.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::backend::{BlockBackend, ExportTable};
use crate::peer::Peer;
use crate::proto::*;
use crate::rl_event;

/// Most options one connection may send before we hang up.
/// Options one handshake may send (a real client sends a handful; more is an attack).
const MAX_OPTIONS: u32 = 1024;
/// Larger option payloads are discarded (and answered with `ERR_TOO_BIG`) up to this size, then we disconnect.
const MAX_DISCARD: u32 = 16 << 20;

/// The state negotiated for the transmission phase.
#[derive(Clone)]
pub struct Session {
    /// Export name the client selected.
    pub name: String,
    /// The selected backend.
    pub backend: Arc<dyn BlockBackend>,
    /// Export size in bytes, fixed for the session.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub tflags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export (BLOCK_STATUS allowed).
    pub base_allocation: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("tflags", &format_args!("{:#x}", self.tflags))
            .field("structured", &self.structured)
            .field("base_allocation", &self.base_allocation)
            .finish()
    }
}

/// How a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading from or writing to the peer failed (includes EOF).
    #[error("Handshake I/O failed")]
    Io(#[source] io::Error),
    /// The client sent flags we do not know.
    #[error("Unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("Bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// An option payload was too large to discard.
    #[error("Option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
    /// Too many options on one connection.
    #[error("Too many options")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the protocol can only hang up).
    #[error("Unknown export {0:?} requested with EXPORT_NAME")]
    UnknownExport(String),
    /// The client sent `NBD_OPT_ABORT`.
    #[error("Client aborted the handshake")]
    Aborted,
    /// `NBD_OPT_EXPORT_NAME` named an export this peer may not open (the protocol can only hang up).
    #[error("Export {0:?} refused to this peer with EXPORT_NAME")]
    Refused(String),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

/// The handshake's security policy for one connection.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The server answers `NBD_OPT_STARTTLS` (it has a TLS acceptor).
    pub tls_offered: bool,
    /// Every option but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD`
    /// until TLS is up (plain TCP when the operator did not allow it).
    pub tls_required: bool,
}

/// Where a connection's handshake stands; kept across the switch to TLS.
#[derive(Debug, Clone)]
pub struct HandshakeCtx {
    /// Who is on the other end (TLS identity filled in once TLS is up).
    pub peer: Peer,
    /// What this connection must do before it may see exports.
    pub policy: Policy,
    greeted: bool,
    no_zeroes: bool,
    options: u32,
}

impl HandshakeCtx {
    /// A fresh handshake with `peer` under `policy`.
    pub fn new(peer: Peer, policy: Policy) -> Self {
        Self {
            peer,
            policy,
            greeted: false,
            no_zeroes: false,
            options: 0,
        }
    }

    /// Records that TLS is up with the PSK identity `identity`.
    pub fn tls_established(&mut self, identity: String) {
        self.peer.tls_identity = Some(identity);
    }

    fn tls_active(&self) -> bool {
        self.peer.tls_identity.is_some()
    }
}

/// How an option haggling round ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client entered transmission on this session.
    Go(Session),
    /// The client asked for TLS and was acknowledged: run the TLS handshake on the socket,
    /// then call [`negotiate_with`] again over the TLS stream.
    StartTls,
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Compute transmission flags for a backend.
pub fn transmission_flags(backend: &dyn BlockBackend, structured: bool) -> u16 {
    let c = backend.caps();
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if c.read_only {
        f |= TFLAG_READ_ONLY;
    }
    if c.can_trim {
        f |= TFLAG_SEND_TRIM;
    }
    if c.can_write_zeroes {
        f |= TFLAG_SEND_WRITE_ZEROES;
        if c.can_fast_zero {
            f |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if c.multi_conn_safe {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if c.can_cache {
        f |= TFLAG_SEND_CACHE;
    }
    f
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A cursor over option data that fails with `None` instead of panicking.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
}

fn send_rep<W: Write>(w: &mut W, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

fn send_err<W: Write>(w: &mut W, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
    send_rep(w, opt, typ, msg.as_bytes())
}

struct State<'a> {
    exports: &'a dyn ExportTable,
    ctx: &'a mut HandshakeCtx,
    structured: bool,
    no_zeroes: bool,
    /// Export name for which `base:allocation` was selected by the last SET_META_CONTEXT.
    meta_for: Option<String>,
}

/// Run the server side of the handshake on `stream` for a local peer with no TLS on offer
/// (every export the table permits to [`Peer::local`]).
///
/// Returns the [`Session`] when the client enters transmission (`GO` or `EXPORT_NAME`).
/// Every error means the connection must be closed; nothing from the wire can panic here.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    exports: &dyn ExportTable,
) -> Result<Session, HandshakeError> {
    let mut ctx = HandshakeCtx::new(Peer::local(), Policy::default());
    match negotiate_with(stream, exports, &mut ctx)? {
        Outcome::Go(s) => Ok(s),
        // STARTTLS is refused when TLS is not offered, so this cannot happen; treat it as
        // a broken handshake rather than trusting that.
        Outcome::StartTls => Err(HandshakeError::Tls("TLS not offered".into())),
    }
}

/// Run (or, after STARTTLS, continue) the server side of the handshake under `ctx`'s policy.
///
/// The first call sends the greeting. When it returns [`Outcome::StartTls`] the caller runs the
/// TLS handshake, calls [`HandshakeCtx::tls_established`] and calls this again over the TLS
/// stream; option state (structured replies, meta contexts) starts afresh there, as the
/// protocol requires. Every error means the connection must be closed.
pub fn negotiate_with<S: Read + Write>(
    stream: &mut S,
    exports: &dyn ExportTable,
    ctx: &mut HandshakeCtx,
) -> Result<Outcome, HandshakeError> {
    if !ctx.greeted {
        let mut greet = [0u8; 18];
        greet[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        greet[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        greet[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        stream.write_all(&greet)?;
        stream.flush()?;
        let cflags = read_u32(stream)?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::BadClientFlags(cflags));
        }
        ctx.greeted = true;
        ctx.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    }
    let mut st = State {
        exports,
        structured: false,
        no_zeroes: ctx.no_zeroes,
        meta_for: None,
        ctx,
    };
    while st.ctx.options < MAX_OPTIONS {
        st.ctx.options += 1;
        let mut hdr = [0u8; 16];
        stream.read_exact(&mut hdr)?;
        let magic = u64::from_be_bytes([
            hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7],
        ]);
        let opt = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if len > MAX_OPTION_LEN {
            if len > MAX_DISCARD {
                let _ = send_err(stream, opt, REP_ERR_TOO_BIG, "option too large");
                return Err(HandshakeError::OptionTooLarge(len));
            }
            io::copy(&mut (&mut *stream).take(u64::from(len)), &mut io::sink())?;
            send_err(stream, opt, REP_ERR_TOO_BIG, "option too large")?;
            stream.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        let done = handle_option(stream, &mut st, opt, &data)?;
        stream.flush()?;
        if let Some(o) = done {
            return Ok(o);
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// Why an export is not served to this peer, if it is not.
enum Denial {
    /// Unknown name.
    Unknown,
    /// The peer must switch to TLS first (it may be allowed then).
    TlsRequired,
    /// Not this peer's export.
    Policy,
}

impl Denial {
    fn reply(&self) -> (u32, &'static str) {
        match self {
            Denial::Unknown => (REP_ERR_UNKNOWN, "unknown export"),
            Denial::TlsRequired => (REP_ERR_TLS_REQD, "TLS required for this export"),
            Denial::Policy => (REP_ERR_POLICY, "export not permitted to this client"),
        }
    }
}

/// The export `name` if this peer may open it.
fn open_export(st: &State<'_>, name: &str) -> Result<Arc<dyn BlockBackend>, Denial> {
    let Some(backend) = st.exports.lookup(name) else {
        return Err(Denial::Unknown);
    };
    if st.exports.permits(name, &st.ctx.peer) {
        return Ok(backend);
    }
    if st.ctx.policy.tls_offered && !st.ctx.tls_active() {
        Err(Denial::TlsRequired)
    } else {
        rl_event!(info, export = name, peer = %st.ctx.peer, "NBD export refused to this peer");
        Err(Denial::Policy)
    }
}

fn handle_option<S: Write>(
    w: &mut S,
    st: &mut State<'_>,
    opt: u32,
    data: &[u8],
) -> Result<Option<Outcome>, HandshakeError> {
    if st.ctx.policy.tls_required && !st.ctx.tls_active() {
        match opt {
            OPT_STARTTLS | OPT_ABORT => {}
            OPT_EXPORT_NAME => {
                rl_event!(info, peer = %st.ctx.peer, "NBD: EXPORT_NAME without the required TLS");
                return Err(HandshakeError::Refused(
                    String::from_utf8_lossy(data).into_owned(),
                ));
            }
            _ => {
                send_err(w, opt, REP_ERR_TLS_REQD, "TLS required")?;
                return Ok(None);
            }
        }
    }
    match opt {
        OPT_STARTTLS => {
            if !st.ctx.policy.tls_offered {
                send_err(w, opt, REP_ERR_UNSUP, "TLS not configured on this server")?;
            } else if st.ctx.tls_active() {
                send_err(w, opt, REP_ERR_INVALID, "TLS already active")?;
            } else if !data.is_empty() {
                send_err(w, opt, REP_ERR_INVALID, "STARTTLS takes no data")?;
            } else {
                send_rep(w, opt, REP_ACK, &[])?;
                return Ok(Some(Outcome::StartTls));
            }
            Ok(None)
        }
        OPT_EXPORT_NAME => {
            let name = String::from_utf8_lossy(data).into_owned();
            let backend = match open_export(st, &name) {
                Ok(b) => b,
                Err(Denial::Unknown) => return Err(HandshakeError::UnknownExport(name)),
                Err(_) => return Err(HandshakeError::Refused(name)),
            };
            let s = make_session(st, name, backend);
            let mut b = Vec::with_capacity(10 + 124);
            b.extend_from_slice(&s.size.to_be_bytes());
            b.extend_from_slice(&s.tflags.to_be_bytes());
            if !st.no_zeroes {
                b.extend_from_slice(&[0u8; 124]);
            }
            w.write_all(&b)?;
            Ok(Some(Outcome::Go(s)))
        }
        OPT_ABORT => {
            // The client may already have closed; the ACK is best effort.
            let _ = send_rep(w, opt, REP_ACK, &[]);
            Err(HandshakeError::Aborted)
        }
        OPT_LIST => {
            if !data.is_empty() {
                send_err(w, opt, REP_ERR_INVALID, "LIST takes no data")?;
                return Ok(None);
            }
            for e in st.exports.list() {
                if !st.exports.permits(&e.name, &st.ctx.peer) {
                    continue;
                }
                let mut b = Vec::with_capacity(4 + e.name.len() + e.description.len());
                b.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                b.extend_from_slice(e.name.as_bytes());
                b.extend_from_slice(e.description.as_bytes());
                send_rep(w, opt, REP_SERVER, &b)?;
            }
            send_rep(w, opt, REP_ACK, &[])?;
            Ok(None)
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                send_err(w, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                return Ok(None);
            }
            st.structured = true;
            send_rep(w, opt, REP_ACK, &[])?;
            Ok(None)
        }
        OPT_INFO | OPT_GO => info_or_go(w, st, opt, data),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(w, st, opt, data)?;
            Ok(None)
        }
        _ => {
            rl_event!(debug, opt, "unsupported NBD option");
            send_err(w, opt, REP_ERR_UNSUP, "unsupported option")?;
            Ok(None)
        }
    }
}

fn make_session(st: &State<'_>, name: String, backend: Arc<dyn BlockBackend>) -> Session {
    let tflags = transmission_flags(&*backend, st.structured);
    let base_allocation = st.structured
        && backend.caps().can_block_status
        && st.meta_for.as_deref() == Some(name.as_str());
    Session {
        size: backend.size(),
        tflags,
        structured: st.structured,
        base_allocation,
        backend,
        name,
    }
}

fn info_or_go<S: Write>(
    w: &mut S,
    st: &mut State<'_>,
    opt: u32,
    data: &[u8],
) -> Result<Option<Outcome>, HandshakeError> {
    let mut c = Cur(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u16()?;
        let mut reqs = Vec::with_capacity(usize::from(n).min(16));
        for _ in 0..n {
            reqs.push(c.u16()?);
        }
        if !c.0.is_empty() {
            return None;
        }
        Some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        send_err(w, opt, REP_ERR_INVALID, "malformed INFO/GO request")?;
        return Ok(None);
    };
    let backend = match open_export(st, name) {
        Ok(b) => b,
        Err(d) => {
            rl_event!(debug, export = name, "export not opened");
            let (typ, msg) = d.reply();
            send_err(w, opt, typ, msg)?;
            return Ok(None);
        }
    };
    let s = make_session(st, name.to_owned(), backend);
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&s.size.to_be_bytes());
    b.extend_from_slice(&s.tflags.to_be_bytes());
    send_rep(w, opt, REP_INFO, &b)?;
    let mut sent_name = false;
    let mut sent_desc = false;
    let mut sent_bs = false;
    for r in reqs {
        match r {
            INFO_NAME if !sent_name => {
                sent_name = true;
                let mut b = INFO_NAME.to_be_bytes().to_vec();
                b.extend_from_slice(name.as_bytes());
                send_rep(w, opt, REP_INFO, &b)?;
            }
            INFO_DESCRIPTION if !sent_desc => {
                sent_desc = true;
                let desc = st
                    .exports
                    .list()
                    .into_iter()
                    .find(|e| e.name == name)
                    .map(|e| e.description);
                if let Some(d) = desc.filter(|d| !d.is_empty()) {
                    let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    b.extend_from_slice(&d.as_bytes()[..d.len().min(MAX_STRING)]);
                    send_rep(w, opt, REP_INFO, &b)?;
                }
            }
            INFO_BLOCK_SIZE if !sent_bs => {
                sent_bs = true;
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&4096u32.to_be_bytes());
                b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                send_rep(w, opt, REP_INFO, &b)?;
            }
            _ => {}
        }
    }
    send_rep(w, opt, REP_ACK, &[])?;
    Ok(if opt == OPT_GO {
        Some(Outcome::Go(s))
    } else {
        None
    })
}

fn meta_context<S: Write>(
    w: &mut S,
    st: &mut State<'_>,
    opt: u32,
    data: &[u8],
) -> Result<(), HandshakeError> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the previous selection even when it fails.
        st.meta_for = None;
    }
    if !st.structured {
        send_err(w, opt, REP_ERR_INVALID, "structured replies not negotiated")?;
        return Ok(());
    }
    let mut c = Cur(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(c.string()?);
            if queries.len() > 1024 {
                return None;
            }
        }
        if !c.0.is_empty() {
            return None;
        }
        Some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        send_err(w, opt, REP_ERR_INVALID, "malformed meta context request")?;
        return Ok(());
    };
    let backend = match open_export(st, name) {
        Ok(b) => b,
        Err(d) => {
            let (typ, msg) = d.reply();
            send_err(w, opt, typ, msg)?;
            return Ok(());
        }
    };
    let available = backend.caps().can_block_status;
    let selected = available
        && if set {
            queries.contains(&BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == BASE_ALLOCATION || *q == "base:")
        };
    if selected {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut b = id.to_be_bytes().to_vec();
        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
        send_rep(w, opt, REP_META_CONTEXT, &b)?;
        if set {
            st.meta_for = Some(name.to_owned());
        }
    }
    send_rep(w, opt, REP_ACK, &[])?;
    Ok(())
}
