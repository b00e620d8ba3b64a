//! Notifications to the service manager (systemd `Type=notify`, `sd_notify(3)`), sent with
//! the `sd-notify` crate. Without `NOTIFY_SOCKET` in the environment (not started by
//! systemd) every function here does nothing; a notification that cannot be sent is logged
//! once and otherwise ignored, because the daemon works the same without it.
//!
//! What the daemon sends (see `packaging/tmemd.service`):
//! * `STATUS=` with `EXTEND_TIMEOUT_USEC=` while it restores saved state at start and while
//!   it saves at stop ([`progress`], [`Progress`]): each message gives the manager
//!   [`PROGRESS_EXTEND`] more, so a restore or save that keeps moving is never cut short by
//!   `TimeoutStartSec=`/`TimeoutStopSec=`, and one that hangs still is;
//! * `READY=1` once the restore is committed and the NBD and control sockets listen
//!   ([`ready`]);
//! * `STOPPING=1` as soon as SIGTERM or SIGINT arrives, before serving stops and the save
//!   begins ([`stopping`]);
//! * `RELOADING=1` (with `MONOTONIC_USEC=`) before an upgrade replaces the process with a
//!   new binary ([`reloading`]); the new binary, same PID, sends `READY=1` when it is up.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How much longer the service manager waits after each progress message before it gives
/// up on a start or a stop (sent as `EXTEND_TIMEOUT_USEC=`). Covers the longest step that
/// sends nothing: the final `fsync` of a saved stream.
pub const PROGRESS_EXTEND: Duration = Duration::from_secs(300);

/// Progress messages while bytes move are sent at most this often.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the daemon was started with a notification socket (`NOTIFY_SOCKET`).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        } else {
            tracing::debug!(error = %e, "cannot notify the service manager");
        }
    }
}

/// Start-up is complete: `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown has begun: `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The process is about to be replaced by a new binary (same PID): `RELOADING=1`, the
/// monotonic time systemd 253+ asks for, and a status line. The new binary's `READY=1`
/// ends the reload.
pub fn reloading(status: &str) {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status(status)];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::debug!(error = %e, "cannot read CLOCK_MONOTONIC"),
    }
    send(&states);
}

/// A free-form status line (`STATUS=`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

fn extend_usec() -> u32 {
    u32::try_from(PROGRESS_EXTEND.as_micros()).unwrap_or(u32::MAX)
}

/// A status line for a step of a restore or save, with [`PROGRESS_EXTEND`] more time
/// (`STATUS=` and `EXTEND_TIMEOUT_USEC=`).
pub fn progress(status: &str) {
    send(&[
        NotifyState::Status(status),
        NotifyState::ExtendTimeoutUsec(extend_usec()),
    ]);
}

/// A reader or writer that reports the bytes moved through it with [`progress`], at most
/// once per [`PROGRESS_INTERVAL`] (nothing at all when [`enabled`] is false).
#[derive(Debug)]
pub struct Progress<T> {
    inner: T,
    what: String,
    bytes: u64,
    last: Instant,
    on: bool,
}

impl<T> Progress<T> {
    /// Wraps `inner`; `what` starts each status line (e.g. `"saving client 3"`).
    pub fn new(inner: T, what: impl Into<String>) -> Self {
        Progress {
            inner,
            what: what.into(),
            bytes: 0,
            last: Instant::now(),
            on: enabled(),
        }
    }

    /// Bytes moved so far.
    pub fn moved(&self) -> u64 {
        self.bytes
    }

    fn count(&mut self, n: usize) {
        self.bytes += n as u64;
        if self.on && self.last.elapsed() >= PROGRESS_INTERVAL {
            self.last = Instant::now();
            progress(&format!("{}: {} MiB", self.what, self.bytes >> 20));
        }
    }
}

impl<R: io::Read> io::Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count(n);
        Ok(n)
    }
}

impl<W: io::Write> io::Write for Progress<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn progress_passes_bytes_through_and_counts_them() {
        let mut out = Vec::new();
        let mut w = Progress::new(&mut out, "saving");
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        w.flush().unwrap();
        assert_eq!(w.moved(), 11);
        assert_eq!(out, b"hello world");
        let mut r = Progress::new(&b"abc"[..], "restoring");
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!((s.as_str(), r.moved()), ("abc", 3));
    }

    #[test]
    fn extension_fits_the_protocol_field() {
        assert_eq!(u64::from(extend_usec()), PROGRESS_EXTEND.as_micros() as u64);
    }
}
