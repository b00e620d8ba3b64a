//! # tmemd: the tmem host daemon
//!
//! Wires the pool engine (`tmem-core`), block exports (`tmem-exports`), the NBD server
//! (`tmem-nbd`) and the balloon manager (`tmem-balloon`) into one process, controlled over
//! HTTP/1.1 + JSON on a Unix socket (Cloud Hypervisor style) with Firecracker-style
//! resources under `/api/v1` (see `tmem-api` for the routes and types).
//!
//! ## Directories
//! Two directories, as the FHS and systemd (`RuntimeDirectory=tmem`, `StateDirectory=tmem`)
//! expect:
//! * the **runtime directory** (`--runtime-dir`, `runtime_dir`; default `/run/tmem` as root,
//!   else `$XDG_RUNTIME_DIR/tmem` or `/tmp/tmem-$UID`) — a tmpfs, gone at reboot:
//!   * `tmemd.lock` — flock held while the daemon runs (taken before stale sockets are
//!     removed);
//!   * `nbd.sock` — NBD server: `nbd+unix:///NAME?socket=RUNTIME_DIR/nbd.sock`;
//!   * `ctl.sock` — control API and `GET /metrics`;
//!   * `pool/gen-N/` — **durable pool memory** (`durable_pool`, default on): the persistent
//!     pools' slabs, in files that outlive the daemon but not a reboot (see below). Keep the
//!     runtime directory on a tmpfs: there a freed slab leaves memory at once, while on a
//!     disk filesystem its pages go through the page cache and disk writeback;
//! * the **state directory** (`--state-dir`, `state_dir`; default `/var/lib/tmem` as root,
//!   else `$XDG_STATE_HOME/tmem` or `~/.local/state/tmem`) — on disk, so spilled pages do not
//!   take RAM outside the pool's budget:
//!   * `tmemd.lock` — a second flock (when it is not the runtime directory);
//!   * `spill/NAME.spill` — swap exports' spill files (sparse, page *i* at `i * 4096`);
//!   * `spill/NAME.spill.map` — each swap page's state (zero, in memory, lost, or spilled
//!     with the checksum of its spill copy), kept current so that a restart after an unclean
//!     stop knows what it can still serve (see below);
//!   * `state/manifest.json`, `state/client-ID.tmem` — saved clients, exports and pages.
//!
//! A state directory given without a runtime directory (`tmemd --state-dir DIR`, as before
//! the split) holds both: sockets and lock go to `DIR` too, and `tmemctl --state-dir DIR`
//! finds them there.
//!
//! ## Free space for spill files
//! `spill_reserve` (`--spill-reserve`, default 64 MiB, 0 = off) is the free space the spill
//! files' filesystem keeps. Creating a swap export is refused unless its whole size (its
//! worst case: every page spilled) plus the reserve is available — each export is checked
//! on its own, so exports created together may still overcommit the disk. A spill write that
//! would leave less than the reserve is refused (checked with `statvfs`): like a failed
//! write (`ENOSPC`, `EIO`), the guest gets an NBD error on that request
//! (`tmem_swap_spill_errors_total` counts them, a log line says why), and nothing already
//! stored is lost: a page being written back stays in memory; a page whose new content
//! could neither go to the pool nor to the spill file answers reads with EIO (its older
//! copy is gone: the pool drops it when it refuses the put) until it is written again.
//!
//! ## Lifecycle
//! [`run`] starts the daemon ([`daemon::Daemon::start`]: lock, restore, NBD, API), waits
//! for SIGTERM or SIGINT, then [`daemon::Running::shutdown`]: stop the API, the guests and
//! the NBD server, flush every export, save every client's persistent pages and a clean
//! manifest. A restart restores them, so guest swap data survives it. A corrupt state file
//! is moved aside (`.corrupt`) and reported in `GET /status` `warnings`.
//!
//! ## After an unclean stop: what is durable
//! A daemon that dies (SIGKILL, OOM kill, crash) saves nothing, and the manifest still says
//! `clean: false`. **The guarantee**: a WRITE to a swap export is acknowledged only after
//! its page is complete either in durable pool memory (behind a checksummed header naming
//! the page and a write sequence number; `tmem_core::Engine::with_durable`) or in the spill
//! file with its checksum in the page map, so every acknowledged write survives the
//! daemon's death; FLUSH additionally `fdatasync`s the spill file and map (for a host crash:
//! durable pool memory is RAM and, like the guests, does not survive a reboot). An
//! unacknowledged write reads back as its old or its new content, never anything else.
//!
//! Each run of the daemon writes its own generation (`RUNTIME_DIR/pool/gen-N`). At a
//! restart after an unclean stop, each swap export gets a new pool, the earlier generations
//! are read back into it (`tmem_core::Engine::recover`: the newest intact copy of every page,
//! each window of old memory freed as soon as it is read), and the export is reopened with
//! `tmem_exports::SwapExport::recover_with_pool`: pool pages are served, spilled pages are
//! served where their copy matches the map's checksum. The old generations are deleted once
//! the restore is committed; a clean stop deletes its generation after the save. Killed
//! again mid-recovery, the next start reads every generation left, oldest first.
//!
//! What cannot be proven intact is never served as zeros. With `durable_pool = false`, or
//! when the durable memory is gone (a reboot without a clean stop), the export is reopened
//! with `tmem_exports::SwapExport::recover` in an empty pool; its spill file is kept as it is
//! (never truncated), and its page map decides, page by page:
//! * spilled, and the spill copy matches the checksum the map recorded — served;
//! * zero — reads zero;
//! * in memory at the stop, a torn or mismatched spill copy, or (no usable map) every
//!   page — **poisoned**: reads fail with EIO (NBD error, the guest sees an I/O error on
//!   that swap page) until the guest rewrites or trims the whole page. BLOCK_STATUS reports
//!   poisoned pages as data, so copying tools read them and fail instead of skipping them.
//!
//! Poisoned pages stay poisoned across further restarts, clean or not (the map records
//! them). `GET /status` lists the affected exports and their poisoned page counts
//! (`damaged_exports`; `tmemctl status`, `tmemctl stats`), each export's
//! `backend.poisoned_pages` says the same, and `/metrics` has `tmem_swap_poisoned_pages`.
//! The same recovery (with a warning) reopens a swap export whose client's save failed at
//! a clean stop.
//!
//! ## Cached exports
//! Exports are created at runtime (`POST /exports`, `tmemctl export add`; the TOML file
//! declares none) and saved in the manifest. A cached export is read-only unless created
//! `writable` (`--writable`): the image is opened `O_RDONLY` and NBD clients get `EPERM`
//! for writes. Each client connecting to a cached export, and every FLUSH, checks the
//! image's identity (device, inode, size, mtime): an image rewritten underneath has its
//! cached pages dropped from the shared pool (see `tmem_exports::CachedExport::check_image`).
//! `POST /exports/{name}/invalidate` (`tmemctl export invalidate NAME`) drops them by hand
//! and answers `tmem_api::InvalidateReply` (404 unknown export, 409 not a cached export).
//! The manifest records `writable` for cached exports; an entry without it (written before
//! the flag existed, when images were opened read-write whenever possible) is restored
//! writable when the image allows, with a warning in `GET /status`.
//!
//! ## Configuration
//! Runs with no configuration at all. `--config FILE` (TOML, unknown keys refused) and
//! flags override the defaults, flags winning ([`config`]). Every key, its type, default
//! and meaning: `docs/configuration.md` (kept in step with [`config::FileConfig`] by
//! `tests/config_reference.rs`); a commented file with every key:
//! `packaging/tmemd.toml`.
//!
//! ## Under systemd
//! `packaging/tmemd.service` runs it as `Type=notify` ([`notify`]): `READY=1` once the
//! restore is committed and the sockets listen, `STOPPING=1` on SIGTERM, `STATUS=`
//! progress (extending the start/stop timeout) during a long restore or save. Without
//! `NOTIFY_SOCKET` nothing is sent.
//!
//! ## Who may open an export (tenancy)
//! Deny by default. An export made with a **tenant** (`tmemctl export add ... --tenant T`,
//! `access.tenant` in `POST /exports`) is served only to NBD connections that switched to
//! TLS (`NBD_OPT_STARTTLS`) and proved T's pre-shared key — QEMU `tls-creds-psk` with
//! `username=T`, libnbd `nbds+unix://T@/...&tls-psk-file=` — or, on the Unix socket, whose
//! kernel-reported credentials (`SO_PEERCRED`) match `--allow-uid`/`--allow-gid`. An export
//! with none of these is *open*: served to Unix-socket clients without TLS (the socket's
//! mode and group decide who can connect) and never to a TLS tenant. `NBD_OPT_LIST` shows a
//! client only what it may open; a refusal is `NBD_REP_ERR_TLS_REQD` (TLS would be needed)
//! or `NBD_REP_ERR_POLICY` (not yours). On TCP (`nbd_tcp`) TLS is required for everything
//! unless `nbd_tcp_allow_plain = true` (then open exports are served in clear text too).
//!
//! Keys: `nbd_psk_file` (default `STATE_DIR/tls/keys.psk`, mode 0600) holds every tenant's
//! key in psktool/nbdkit format (`T:hexkey`), re-read when it changes; `tmemctl export add
//! --tenant T` adds a 256-bit random key for a new tenant (or takes one from `--psk-file`)
//! and the daemon publishes each tenant's own key as `RUNTIME_DIR/tenants/T/keys.psk`
//! (directory 0750/file 0640 with `nbd_socket_group`, else 0700/0600) for the tenant's QEMU;
//! `tmemctl` prints the QEMU, qemu-io, libnbd and libvirt settings. TLS is OpenSSL's
//! (TLS 1.3 with the PSK, or TLS 1.2 PSK suites), no session resumption. See SECURITY.md.
//!
//! ## Budget and the balloon manager
//! The operator's budget (`--budget`, `PUT /budget`) is a ceiling. With guests under
//! management (`POST /guests`), the manager lowers the pool budget as guests grow
//! (shrinking the pool at once first) and raises it back, up to that ceiling, as they shrink.
//!
//! ## Memory as the host sees it
//! The pool's payloads live in 2 MiB regions that tmem-core maps itself; every emptied slab
//! frame goes back to the kernel at once, so shrinking the pool lowers the daemon's RSS
//! within the call. A background compactor ([`memory`]) moves payloads out of sparsely
//! used slabs when fragmentation passes `compact_threshold` (also `POST /compact`,
//! `tmemctl compact`); glibc's heap (index tables) is tuned and trimmed so that it gives
//! freed memory back too. `GET /stats` reports `resident_bytes` (the pool as the kernel
//! charges it) and `process_rss_bytes` beside `held_bytes`, and the balloon manager counts
//! what a shrink really gave back by the resident figure.
//!
//! ## Limits against hostile or broken NBD clients
//! * **Handshakes**: each must end within 10 s; at most `nbd_max_handshakes` (default 256)
//!   connections are in the handshake at once, and at most `nbd_max_handshakes_per_peer`
//!   (default 64) from one peer (TCP: the client address, IPv6 by /64; `nbd.sock`: the
//!   client's uid, root included). At either cap a new connection closes the one that has
//!   been in the handshake longest (of that peer, for the per-peer cap) — never itself and
//!   never a connection in transmission — so clients that connect and stall, or trickle
//!   bytes, cannot keep a real client out: its handshake takes milliseconds.
//! * **Connections**: at most `nbd_max_connections` (default 1024) open; at the limit the
//!   oldest handshake is closed, and only when every connection is in transmission is the
//!   newcomer refused. Out of descriptors, the oldest handshake is closed too. The daemon
//!   raises its soft `RLIMIT_NOFILE` to the hard limit at start.
//! * **Buffers**: request buffers above 256 KiB (WRITE payloads up to 32 MiB, READ replies)
//!   are reserved from `nbd_buffer_limit` (default 256 MiB) before they are allocated; a
//!   connection whose request does not fit waits (its socket is not read meanwhile: TCP or
//!   Unix socket back-pressure), it does not fail. `nbd_buffer_bytes` in `GET /stats` and
//!   `tmem_nbd_buffer_bytes` show what is reserved.
//! * **The memory bound** this gives: the daemon's RSS stays within its baseline + the
//!   pool budget + `nbd_buffer_limit` + about 2 MiB per NBD connection in transmission
//!   (its fixed buffers: 128 KiB read buffer, reply batch, small write and read buffers per
//!   thread) + at most 64 KiB per connection in the handshake (one option's data; at most
//!   256 such) and the thread stacks actually touched. Tested with 16 clients writing 32 MiB requests without reading replies
//!   (`tests/limits.rs`: under pool + buffer limit + 128 MiB; 1.6 GiB without the budget).
//! * Refusals and evictions are logged once per peer and reason per minute (and rate
//!   limited overall), not per connection.
//!
//! ## Modules
//! [`config`] (defaults, TOML, flags), [`http`] (the small HTTP server), [`api`] (routes and
//! error codes; handed to the daemon as handlers, so the daemon does not depend on it),
//! [`daemon`] (lifecycle and operations), [`persist`] (manifest, save/restore, recovery of
//! durable memory after an unclean stop), [`notify`] (service manager notifications),
//! [`exports`] (dynamic NBD export table), [`state`] (manifest and atomic files),
//! [`metrics`] (Prometheus text), [`balloon`] (pool control and guest runtime), [`lock`]
//! (directory locks), [`memory`] (RSS, heap trimming, background compaction), [`secure`]
//! (directory and socket ownership), [`tenants`] (tenants' TLS keys).

pub mod api;
pub mod balloon;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod exports;
pub mod http;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod persist;
pub mod ratelimit;
pub mod remote;
pub mod secure;
pub mod state;
pub mod tenants;

use config::{Args, Config, ConfigError};
use daemon::{Daemon, DaemonError};

/// Errors of the whole run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error("Invalid configuration")]
    Config(#[source] ConfigError),
    /// Starting or stopping failed.
    #[error("Daemon failed")]
    Daemon(#[source] DaemonError),
    /// Signal handlers could not be installed.
    #[error("Cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Installs a tracing subscriber (`RUST_LOG`, default `info`) writing to stderr.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down cleanly.
pub fn run(args: &Args) -> Result<(), RunError> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
    let cfg = Config::load(args).map_err(RunError::Config)?;
    raise_fd_limit();
    // Register before starting so that an early signal is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR2])
        .map_err(RunError::Signals)?;
    notify::status("starting: restoring saved state");
    let running = Daemon::start(cfg, api::handlers).map_err(RunError::Daemon)?;
    // Restore committed, sockets listening: the service manager may start what needs us.
    notify::ready(&running.daemon.ready_status());
    for sig in signals.forever() {
        if sig == SIGUSR2 {
            // An upgrade (`POST /upgrade`, `tmemctl upgrade`, or SIGUSR2 from the operator:
            // the binary this process was started from).
            match running.upgrade_target() {
                Some(b) => {
                    notify::reloading(&format!("handing over to {}", b.display()));
                    return running.hand_over(&b).map_err(RunError::Daemon);
                }
                None => {
                    tracing::error!("SIGUSR2: no binary to hand over to");
                    continue;
                }
            }
        }
        tracing::info!(signal = sig, "shutting down");
        break;
    }
    notify::stopping("stopping: saving state");
    running.shutdown().map_err(RunError::Daemon)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every NBD and API connection takes
/// descriptors (two per NBD connection), and the default soft limit (often 1024) is below
/// what `nbd_max_connections` allows. Failure is logged, not fatal.
pub fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if got != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return;
    }
    if rl.rlim_cur >= rl.rlim_max {
        return;
    }
    let old = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
    } else {
        tracing::debug!(from = old, to = rl.rlim_max, "raised RLIMIT_NOFILE");
    }
}

/// Prints an error and its numbered chain to stderr.
pub fn print_error_chain(e: &dyn std::error::Error) {
    eprintln!("tmemd: error: {e}");
    let mut cur = e.source();
    let mut i = 1;
    while let Some(c) = cur {
        eprintln!("  {i}: {c}");
        cur = c.source();
        i += 1;
    }
}
