//! # tmem-itest: cross-component integration tests
//!
//! Helpers for tests that run the real `tmemd` and `tmemctl` binaries together
//! with real QEMU guests (TCG is fine), and the tests themselves under
//! `tests/`:
//!
//! * `tests/balloon_guests.rs` — issue 4's real-guest test: two 512 MiB
//!   guests whose swap disks are tmemd `swap` exports, both managed by tmemd's
//!   balloon manager (`selfballoon`); idle they are ballooned down, then one
//!   runs the 2008 Xen Summit `eatmem` workload and gets memory back in time
//!   (no OOM kill). Prints reclaim and give-back rates and spike→deflate time.
//! * `tests/guest_crash.rs` — issue 9's guest crash test: a guest swapping
//!   through a tmemd `swap` export (QEMU's NBD client with `reconnect-delay`)
//!   while tmemd is SIGKILLed twice and restarted on the same directories;
//!   memcheck must find every page intact, with no I/O error or OOM kill in
//!   the guest. Prints swap traffic, restart times and recovery figures.
//! * `tests/libvirt_guest.rs` — issue 12's libvirt test: a domain of a private
//!   libvirtd whose swap disk is a tmemd export, its balloon managed by tmemd
//!   through libvirt (`tmemctl guest add --libvirt`); idle it is ballooned down,
//!   a memory spike swaps through the export and gets memory back without an
//!   OOM kill, and `virsh destroy` (also right before `virsh start`) leaves
//!   tmemd without a stale guest.
//! * `tests/fleet.rs` — the multi-host fixture on its own: three hosts in
//!   network namespaces forming one Redis Cluster (replicas on other hosts
//!   than their primaries), keys written and read across hosts, a primary
//!   SIGKILLed after `WAIT 1` acknowledged a key, failover, the key read back;
//!   nothing (namespace, redis-server) left after drop.
//!
//! The helpers:
//!
//! * [`TempDir`] — a short temporary directory removed on drop (Unix socket
//!   paths must stay under 108 bytes).
//! * [`daemon`] — locating (building on demand) the daemon binaries, a
//!   [`daemon::Tmemd`] guard (SIGTERM, then SIGKILL, by PID, on drop; also
//!   `kill9` and `restart` on the same directories),
//!   `tmemctl` calls and a tiny HTTP client for the control socket.
//! * [`observe`] — an [`observe::Observer`] thread that samples each guest's
//!   balloon over a second QMP monitor, an in-guest agent on a second
//!   virtio-serial port and tmemd's guest list into [`observe::Timeline`]s.
//! * [`figures`] — pure functions turning timelines into the figures the
//!   issue asks for (reclaim rate, give-back rate, spike→deflate time).
//! * [`vm`] — guest image and launch helpers on top of `tmem-vm`: an extra
//!   QMP monitor, an observer agent port and a control port to start
//!   workloads inside a running guest.
//! * [`libvirt`] — a private, test-only `libvirtd` (its own mount namespace and
//!   sockets) and libvirt domains (direct kernel boot, TCG, NBD disks) that are
//!   destroyed and undefined on drop.
//! * [`fleet`] — a multi-host fixture: hosts in network namespaces the test
//!   creates (veths on a bridge in a "switch" namespace), each with two Redis
//!   nodes, forming one Redis Cluster with one replica per primary on another
//!   host; SIGKILL a primary and wait for the failover. Removed on drop.
//!
//! Nothing here kills a process it did not start: every child is killed by
//! its own PID from a `Drop` guard.

pub mod daemon;
pub mod figures;
pub mod fleet;
pub mod libvirt;
pub mod observe;
pub mod vm;

mod tempdir;

pub use tempdir::TempDir;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Errors of the helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command ran but failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// Its standard error (tail).
        stderr: String,
    },
    /// An answer could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was parsed.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {secs:.0}s waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        secs: f64,
    },
    /// A guest helper failed.
    #[error("guest")]
    Vm(#[from] tmem_vm::Error),
}

/// Result alias for the helpers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(|p| p.parent())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// Polls `cond` every `every` until it returns true or `timeout` passes;
/// returns whether it held.
pub fn wait_until(
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let end = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(every);
    }
}
