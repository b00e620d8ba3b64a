//! # tmem-nbd: an NBD server library
//!
//! Serves block devices over the Network Block Device protocol (fixed newstyle handshake,
//! structured replies, `base:allocation`) on Unix and TCP sockets.
//!
//! ## Design
//! * The server is generic over the consumer-side trait [`BlockBackend`] (one export) and
//!   [`ExportTable`] (name → export). [`MemBackend`] is a sparse in-memory store used by tests and
//!   as the benchmark baseline; the daemon implements the trait over the page pool.
//! * [`negotiate`] runs the handshake over any `Read + Write` (fuzzable); [`serve_transmission`]
//!   runs the transmission phase over a reader and a writer.
//! * Threads, no async runtime: one accept thread per listener, one reader thread per connection.
//!   Cheap requests execute inline on the reader (the protocol CPU per request is what limits
//!   throughput on small hosts); FLUSH, large requests and reads the backend says may block
//!   ([`BlockBackend::read_may_block`]: a page in a remote tier) go to a small per-connection
//!   worker pool, so replies can come back out of order. Replies are written whole under a per-connection lock;
//!   replies to a pipelined batch of inline requests go out in one write.
//! * Zero ranges reported by [`BlockBackend::read`] are sent as `OFFSET_HOLE` chunks when
//!   structured replies are negotiated.
//! * [`ServerHandle`] owns everything it starts; shutdown closes every connection, joins every
//!   thread and unlinks Unix socket files.
//! * Peer-triggerable log lines are rate limited per callsite.
//! * Limits against hostile or broken clients: a deadline for the whole handshake, caps on
//!   connections in the handshake (in total and per peer: TCP address or Unix uid) that
//!   close the connection waiting longest in the handshake rather than the newcomer, a cap
//!   on all connections, and a server-wide budget for request buffers ([`BufferBudget`];
//!   see [`ServerConfig`] for the defaults and the memory bound they give).
//!
//! ## Example
//! ```no_run
//! use std::sync::Arc;
//! use tmem_nbd::{ListenAddr, MemBackend, ServerConfig, ServerHandle, StaticExports};
//!
//! let exports = StaticExports::new()
//!     .with_export("swap", "in-memory swap", Arc::new(MemBackend::new(2 << 30)))
//!     .with_export("cached", "", Arc::new(MemBackend::new(1 << 30)));
//! let server = ServerHandle::start(
//!     Arc::new(exports),
//!     ServerConfig::default(),
//!     &[ListenAddr::Unix("/run/tmem/nbd.sock".into())],
//! )?;
//! // qemu-img info 'nbd+unix:///swap?socket=/run/tmem/nbd.sock'
//! println!("{:?}", server.stats("swap"));
//! server.shutdown(); // closes clients, joins threads, unlinks the socket
//! # Ok::<(), tmem_nbd::ServerError>(())
//! ```

pub mod backend;
pub mod budget;
pub mod handshake;
pub mod mem;
pub mod peer;
pub mod proto;
#[doc(hidden)]
pub mod ratelimit;
pub mod server;
pub mod stats;
pub mod tls;
pub mod transmission;

pub use backend::{
    BackendCaps, BackendError, BlockBackend, ExportInfo, ExportTable, Extent, StaticExports,
    ZeroRanges,
};
pub use budget::{BufferBudget, BufferPermit, HeldBytes, MIN_BUFFER_LIMIT};
pub use handshake::{
    negotiate, negotiate_with, HandshakeCtx, HandshakeError, Outcome, Policy, Session,
};
pub use mem::MemBackend;
pub use peer::{Peer, Transport, UnixCred};
pub use server::{ListenAddr, ServerConfig, ServerError, ServerHandle};
pub use stats::{ExportStats, StatsSnapshot};
pub use tls::{PskFile, PskStore, TlsServer};
pub use transmission::{
    serve_transmission, validate, Request, TransmissionConfig, TransmissionError,
};
