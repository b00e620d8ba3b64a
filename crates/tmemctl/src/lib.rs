//! # tmemctl: command-line client of tmemd
//!
//! Talks HTTP/1.1 + JSON to `RUNTIME_DIR/ctl.sock` (runtime dir from `--runtime-dir` or
//! `TMEM_RUNTIME_DIR`; else `--state-dir`/`TMEM_STATE_DIR` for a daemon started with a
//! state dir alone, the one-directory layout; else the default `/run/tmem` as root) with the
//! request types of `tmem-api`, so sizes are parsed exactly as the daemon parses them.
//! Errors print the daemon's whole error chain and exit non-zero.
//!
//! `tmemctl top` is a live xentop-like view ([`top`]); `top --once` prints one frame as
//! plain text.

pub mod client;
pub mod snippet;
pub mod top;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use client::{Client, ClientError};
use tmem_api::{
    format_size, BudgetReply, ClientInfo, CreateClient, CreateExport, CreateGuest, ExportInfo,
    ExportKind, GuestInfo, InvalidateReply, LibvirtTarget, PolicyName, SetBudget, ShrinkReply,
    ShrinkRequest, Size, Stats, Status, API_PREFIX,
};

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "tmemctl", version, about = "Control a running tmemd")]
pub struct Cli {
    /// Runtime directory of the daemon (holds ctl.sock). Default: /run/tmem as root.
    #[arg(long, env = "TMEM_RUNTIME_DIR", value_name = "DIR", global = true)]
    pub runtime_dir: Option<PathBuf>,
    /// State directory of a daemon started with `--state-dir` alone (its sockets are there
    /// too); used when no runtime directory is given.
    #[arg(long, env = "TMEM_STATE_DIR", value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show the daemon's status.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show pool, client, export and guest statistics.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove an export.
    Export {
        /// What to do.
        #[command(subcommand)]
        cmd: ExportCmd,
    },
    /// List exports.
    Exports {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a client.
    Client {
        /// What to do.
        #[command(subcommand)]
        cmd: ClientCmd,
    },
    /// List clients.
    Clients {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the pool budget.
    Budget {
        /// What to do.
        #[command(subcommand)]
        cmd: BudgetCmd,
    },
    /// Release memory from the pool now.
    Shrink {
        /// Bytes to release (e.g. 512M).
        size: Size,
    },
    /// Compact the pool now: move pages out of sparsely used slabs and give the emptied
    /// slabs' memory back to the kernel.
    Compact {
        /// Move at most this many pages (default: until nothing more can be freed).
        #[arg(long)]
        max_moves: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hand the daemon over to a new binary without stopping the guests: it flushes, replaces
    /// itself (same PID) and recovers every persistent page from durable memory.
    Upgrade {
        /// The new tmemd binary (default: the one the daemon was started from).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Refuse new puts of a client.
    Freeze {
        /// Client id.
        client: u32,
    },
    /// Accept puts of a frozen client again.
    Thaw {
        /// Client id.
        client: u32,
    },
    /// Add or remove a ballooned guest.
    Guest {
        /// What to do.
        #[command(subcommand)]
        cmd: GuestCmd,
    },
    /// List ballooned guests.
    Guests {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live view (q quits).
    Top {
        /// Print one frame as plain text and exit.
        #[arg(long)]
        once: bool,
        /// Refresh interval in seconds (also the rate window of --once).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

/// `export` subcommands.
#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Create an export.
    Add {
        /// Export (NBD) name.
        name: String,
        /// swap or cached.
        #[arg(long)]
        kind: ExportKind,
        /// Swap: device size (e.g. 1G).
        #[arg(long)]
        size: Option<Size>,
        /// Cached: the disk image.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Client id (default: a new client).
        #[arg(long)]
        client: Option<u32>,
        /// Codec: none, lz4, zstd, zstd:LEVEL (default: the daemon's).
        #[arg(long)]
        codec: Option<String>,
        /// Dedup scope: off, pool, client, global (default: the daemon's).
        #[arg(long)]
        dedup: Option<String>,
        /// Cached: open the image with O_DIRECT.
        #[arg(long)]
        direct_io: bool,
        /// The tenant owning the export: only NBD connections that prove this TLS-PSK
        /// identity (or match --allow-uid/--allow-gid) may open it. Gets a key if it has
        /// none; prints the QEMU and libvirt settings that use it.
        #[arg(long)]
        tenant: Option<String>,
        /// Take the tenant's key from this psktool/nbdkit file (`TENANT:hexkey` line)
        /// instead of generating one.
        #[arg(long, requires = "tenant")]
        psk_file: Option<PathBuf>,
        /// Unix-socket peers with this uid may open it without TLS (repeatable).
        #[arg(long = "allow-uid")]
        allow_uids: Vec<u32>,
        /// Unix-socket peers with this primary gid may open it without TLS (repeatable).
        #[arg(long = "allow-gid")]
        allow_gids: Vec<u32>,
        /// Cached: let the client write the image (default: read-only; NBD clients are
        /// told so and writes fail with EPERM).
        #[arg(long)]
        writable: bool,
    },
    /// Cached: drop every cached page of the export's image from the shared pool (after
    /// changing the image by means the daemon cannot notice). Prints the pages dropped.
    Invalidate {
        /// Export name.
        name: String,
    },
    /// Remove an export (its pages are dropped). Refused while NBD clients have it open.
    Rm {
        /// Export name.
        name: String,
        /// Remove it even with NBD clients connected (their I/O then fails).
        #[arg(long)]
        force: bool,
    },
}

/// `client` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Create a client.
    Add {
        /// Client id (default: the next free one).
        #[arg(long)]
        id: Option<u32>,
        /// Weight (share of ephemeral capacity). Default 100.
        #[arg(long)]
        weight: Option<u32>,
        /// Cap on persistent bytes.
        #[arg(long)]
        cap: Option<Size>,
    },
    /// Remove a client (it must have no exports).
    Rm {
        /// Client id.
        id: u32,
    },
}

/// `budget` subcommands.
#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Set the budget (e.g. 2G).
    Set {
        /// New budget.
        size: Size,
    },
}

/// `guest` subcommands.
#[derive(Debug, Subcommand)]
pub enum GuestCmd {
    /// Manage a guest's balloon: a QEMU guest (`--qmp`) or a libvirt domain (`--libvirt`).
    Add {
        /// Guest name.
        name: String,
        /// QEMU QMP socket.
        #[arg(long, required_unless_present = "libvirt", conflicts_with = "libvirt")]
        qmp: Option<PathBuf>,
        /// A running libvirt domain: its balloon is set (virsh setmem --live) and its balloon
        /// statistics read through libvirt, never its QMP monitor; tmemd drops the guest when
        /// the domain is destroyed, undefined or restarted.
        #[arg(long, value_name = "DOMAIN")]
        libvirt: Option<String>,
        /// The libvirt connection URI (default: libvirt's default, qemu:///system as root).
        #[arg(long, value_name = "URI", requires = "libvirt", conflicts_with = "qmp")]
        libvirt_uri: Option<String>,
        /// Agent (virtio-serial) socket.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Policy: selfballoon, pressure or static.
        #[arg(long)]
        policy: Option<PolicyName>,
        /// Never shrink below this.
        #[arg(long)]
        min: Option<Size>,
        /// Never grow above this (default: the boot size from QMP; a libvirt domain's maximum
        /// memory).
        #[arg(long)]
        max: Option<Size>,
    },
    /// Stop managing a guest.
    Rm {
        /// Guest name.
        name: String,
    },
}

/// Errors of a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The terminal failed (top).
    #[error("Terminal error")]
    Terminal(#[source] std::io::Error),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The daemon did not do what was asked.
    #[error("{0}")]
    Daemon(String),
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("tmemctl: cannot print JSON: {e}"),
    }
}

fn v1(path: &str) -> String {
    format!("{API_PREFIX}{path}")
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let dir = cli
        .runtime_dir
        .clone()
        .or_else(|| cli.state_dir.clone())
        .unwrap_or_else(tmem_api::default_runtime_dir);
    let c = Client::new(dir.join(tmem_api::CTL_SOCKET));
    match cli.cmd {
        Cmd::Status { json } => {
            let s: Status = c.get("/status")?;
            if json {
                print_json(&s);
            } else {
                println!("tmemd {} (pid {}), up {}s", s.version, s.pid, s.uptime_secs);
                println!("state dir  {}", s.state_dir.display());
                if !s.runtime_dir.as_os_str().is_empty() && s.runtime_dir != s.state_dir {
                    println!("runtime    {}", s.runtime_dir.display());
                }
                println!("nbd socket {}", s.nbd_socket.display());
                if let Some(t) = &s.nbd_tcp {
                    println!("nbd tcp    {t}");
                }
                if let Some(m) = &s.metrics_addr {
                    println!("metrics    http://{m}/metrics");
                }
                println!(
                    "budget {}  held {}  clients {}  exports {}  guests {}",
                    format_size(s.budget),
                    format_size(s.held_bytes),
                    s.clients,
                    s.exports,
                    s.guests
                );
                for w in &s.warnings {
                    println!("warning: {w}");
                }
                for d in &s.damaged_exports {
                    println!(
                        "poisoned: export {} has {} pages that fail reads with EIO until rewritten",
                        d.name, d.poisoned_pages
                    );
                }
            }
        }
        Cmd::Stats { json } => {
            let s: Stats = c.get("/stats")?;
            if json {
                print_json(&s);
            } else {
                print!("{}", top::Frame::build(&s, None).to_text());
            }
        }
        Cmd::Export { cmd } => match cmd {
            ExportCmd::Add {
                name,
                kind,
                size,
                image,
                client,
                codec,
                dedup,
                direct_io,
                tenant,
                psk_file,
                allow_uids,
                allow_gids,
                writable,
            } => {
                let tenant_key = match (&tenant, &psk_file) {
                    (Some(t), Some(f)) => Some(snippet::key_from_file(f, t)?),
                    _ => None,
                };
                let req = CreateExport {
                    name,
                    kind,
                    size,
                    image: image.map(|p| std::path::absolute(&p).unwrap_or(p)),
                    client,
                    codec,
                    dedup,
                    direct_io: direct_io.then_some(true),
                    access: tmem_api::ExportAccess {
                        tenant,
                        allow_uids,
                        allow_gids,
                    },
                    tenant_key,
                    writable: writable.then_some(true),
                };
                let e: ExportInfo = c.call("POST", &v1("/exports"), Some(&req))?;
                println!(
                    "export {} ({}, {}, client {}, {}): {}",
                    e.name,
                    e.kind,
                    format_size(e.size),
                    e.client,
                    if e.writable { "writable" } else { "read-only" },
                    e.uri
                );
                if let Some(text) = snippet::for_export(&e) {
                    print!("{text}");
                }
            }
            ExportCmd::Invalidate { name } => {
                let r: InvalidateReply =
                    c.call::<(), _>("POST", &v1(&format!("/exports/{name}/invalidate")), None)?;
                println!(
                    "export {}: {} cached pages dropped",
                    r.name, r.pages_dropped
                );
                if r.path_replaced {
                    println!(
                        "warning: the image path of {} now names another file; the export keeps \
                         serving the file it opened (re-create the export to serve the new one)",
                        r.name
                    );
                }
            }
            ExportCmd::Rm { name, force } => {
                let q = if force { "?force=true" } else { "" };
                c.call::<(), ()>("DELETE", &v1(&format!("/exports/{name}{q}")), None)?;
                println!("export {name} removed");
            }
        },
        Cmd::Exports { json } => {
            let v: Vec<ExportInfo> = c.get("/exports")?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "{:<20} {:<6} {:>8} {:>6}  {:<16} URI",
                    "NAME", "KIND", "SIZE", "CLIENT", "ACCESS"
                );
                for e in v {
                    println!(
                        "{:<20} {:<6} {:>8} {:>6}  {:<16} {}",
                        e.name,
                        e.kind.to_string(),
                        format_size(e.size),
                        e.client,
                        top::access_text(&e.access),
                        e.uri
                    );
                }
            }
        }
        Cmd::Client { cmd } => match cmd {
            ClientCmd::Add { id, weight, cap } => {
                let req = CreateClient {
                    id,
                    weight,
                    persistent_cap: cap,
                };
                let ci: ClientInfo = c.call("POST", &v1("/clients"), Some(&req))?;
                println!("client {} (weight {})", ci.id, ci.weight);
            }
            ClientCmd::Rm { id } => {
                c.call::<(), ()>("DELETE", &v1(&format!("/clients/{id}")), None)?;
                println!("client {id} removed");
            }
        },
        Cmd::Clients { json } => {
            let v: Vec<ClientInfo> = c.get("/clients")?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "{:>6} {:>6} {:>8} {:>10} {:>10}",
                    "ID", "WEIGHT", "STATE", "EPH", "PERS"
                );
                for ci in v {
                    println!(
                        "{:>6} {:>6} {:>8} {:>10} {:>10}",
                        ci.id,
                        ci.weight,
                        if ci.frozen { "frozen" } else { "active" },
                        ci.ephemeral.pages,
                        ci.persistent.pages
                    );
                }
            }
        }
        Cmd::Budget {
            cmd: BudgetCmd::Set { size },
        } => {
            let r: BudgetReply = c.call("PUT", &v1("/budget"), Some(&SetBudget { bytes: size }))?;
            println!(
                "budget {} (released {})",
                format_size(r.budget),
                format_size(r.released)
            );
        }
        Cmd::Shrink { size } => {
            let r: ShrinkReply =
                c.call("POST", &v1("/shrink"), Some(&ShrinkRequest { bytes: size }))?;
            println!(
                "released {} of {} requested",
                format_size(r.released),
                format_size(r.requested)
            );
        }
        Cmd::Compact { max_moves, json } => {
            let r: tmem_api::CompactReply = c.call(
                "POST",
                &v1("/compact"),
                Some(&tmem_api::CompactRequest { max_moves }),
            )?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "moved {} pages, freed {} slabs ({}); daemon RSS {} -> {}",
                    r.moved,
                    r.slabs_freed,
                    format_size(r.bytes_freed),
                    format_size(r.rss_before),
                    format_size(r.rss_after)
                );
            }
        }
        Cmd::Upgrade { binary } => {
            let before: Status = c.get("/status")?;
            let r: tmem_api::UpgradeReply = c.call(
                "POST",
                &v1("/upgrade"),
                Some(&tmem_api::UpgradeRequest { binary }),
            )?;
            println!("tmemd (pid {}) hands over to {}", r.pid, r.binary.display());
            // The new binary answers on the same socket once it has recovered.
            let t0 = Instant::now();
            let mut up = None;
            while t0.elapsed() < Duration::from_secs(600) {
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(s) = c.get::<Status>("/status") {
                    if s.uptime_secs <= t0.elapsed().as_secs() && s.pid == before.pid {
                        up = Some(s);
                        break;
                    }
                }
            }
            match up {
                Some(s) => println!(
                    "tmemd {} (pid {}) is up after {:.1}s",
                    s.version,
                    s.pid,
                    t0.elapsed().as_secs_f64()
                ),
                None => {
                    return Err(CliError::Daemon(
                        "the new tmemd did not answer within 10 minutes".into(),
                    ))
                }
            }
        }
        Cmd::Freeze { client } => {
            let ci: ClientInfo =
                c.call::<(), _>("POST", &v1(&format!("/clients/{client}/freeze")), None)?;
            println!("client {} frozen", ci.id);
        }
        Cmd::Thaw { client } => {
            let ci: ClientInfo =
                c.call::<(), _>("POST", &v1(&format!("/clients/{client}/thaw")), None)?;
            println!("client {} thawed", ci.id);
        }
        Cmd::Guest { cmd } => match cmd {
            GuestCmd::Add {
                name,
                qmp,
                libvirt,
                libvirt_uri,
                agent,
                policy,
                min,
                max,
            } => {
                let req = CreateGuest {
                    name,
                    qmp: qmp
                        .map(|q| std::path::absolute(&q).unwrap_or(q))
                        .unwrap_or_default(),
                    libvirt: libvirt.map(|domain| LibvirtTarget {
                        domain,
                        uri: libvirt_uri,
                    }),
                    agent: agent.map(|a| std::path::absolute(&a).unwrap_or(a)),
                    policy,
                    min,
                    max,
                };
                let g: GuestInfo = c.call("POST", &v1("/guests"), Some(&req))?;
                println!("guest {} managed ({} policy)", g.name, g.policy);
            }
            GuestCmd::Rm { name } => {
                c.call::<(), ()>("DELETE", &v1(&format!("/guests/{name}")), None)?;
                println!("guest {name} removed");
            }
        },
        Cmd::Guests { json } => {
            let v: Vec<GuestInfo> = c.get("/guests")?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "{:<16} {:<12} {:>8} {:>8} {:>8} {:>6}",
                    "NAME", "POLICY", "MAX", "ACTUAL", "TARGET", "STUCK"
                );
                for g in v {
                    println!(
                        "{:<16} {:<12} {:>8} {:>8} {:>8} {:>6}",
                        g.name,
                        g.policy,
                        format_size(g.max),
                        format_size(g.actual),
                        format_size(g.target),
                        if g.stuck { "yes" } else { "no" }
                    );
                    let opt = |v: Option<u64>| v.map_or("-".to_owned(), format_size);
                    println!(
                        "  available {}  committed {}  oom kills {}  sources {}  reclaim {:.1} MiB/s  give-back {:.1} MiB/s  spike->deflate {}",
                        opt(g.available),
                        opt(g.committed),
                        g.oom_kills.map_or("-".to_owned(), |v| v.to_string()),
                        if g.live_sources.is_empty() { "none".to_owned() } else { g.live_sources.join(",") },
                        g.reclaim_mib_s,
                        g.give_back_mib_s,
                        g.last_spike_to_deflate_ms.map_or("-".to_owned(), |v| format!("{v} ms")),
                    );
                    if let Some(lv) = &g.libvirt {
                        println!(
                            "  libvirt domain {}{}{}",
                            lv.domain,
                            lv.uri
                                .as_deref()
                                .map_or(String::new(), |u| format!(" on {u}")),
                            if g.gone { " (gone)" } else { "" }
                        );
                    }
                    if let Some(r) = &g.decision_reason {
                        println!("  last decision: {} ({r})", opt(g.decision_target));
                    }
                    if let Some(e) = g.last_error {
                        println!("  last error: {e}");
                    }
                }
            }
        }
        Cmd::Top { once, interval } => {
            if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
                return Err(CliError::Usage(format!(
                    "--interval {interval} must be between 0 and 3600 seconds"
                )));
            }
            let interval = Duration::from_secs_f64(interval);
            if once {
                let first: Stats = c.get("/stats")?;
                let t0 = Instant::now();
                std::thread::sleep(interval);
                let cur: Stats = c.get("/stats")?;
                let frame = top::Frame::build(&cur, Some((&first, t0.elapsed())));
                print!("{}", frame.to_text());
            } else {
                // Fail early (and print the chain) if the daemon is not there.
                let _: Stats = c.get("/stats")?;
                top::run_live(interval, || {
                    c.get::<Stats>("/stats")
                        .map_err(|e| tmem_api::ErrorBody::from_error(&e).chain.join(": "))
                })
                .map_err(CliError::Terminal)?;
            }
        }
    }
    Ok(())
}

/// Prints an error: the local chain, then the daemon's chain for server errors.
pub fn print_error(e: &CliError) {
    match e {
        CliError::Client(ClientError::Server { status, body }) => {
            eprintln!("tmemctl: error: {} (HTTP {status})", body.error);
            for (i, c) in body.chain.iter().skip(1).enumerate() {
                eprintln!("  {}: {c}", i + 1);
            }
        }
        e => {
            eprintln!("tmemctl: error: {e}");
            let mut cur = std::error::Error::source(e);
            let mut i = 1;
            while let Some(c) = cur {
                eprintln!("  {i}: {c}");
                cur = c.source();
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_add(args: &[&str]) -> Result<GuestCmd, clap::Error> {
        let mut argv = vec!["tmemctl", "guest", "add", "g"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.cmd {
            Cmd::Guest { cmd } => Ok(cmd),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn guest_add_takes_qmp_or_libvirt() {
        match guest_add(&["--libvirt", "vm1", "--libvirt-uri", "qemu:///system"]).unwrap() {
            GuestCmd::Add {
                qmp,
                libvirt,
                libvirt_uri,
                ..
            } => {
                assert_eq!(qmp, None);
                assert_eq!(libvirt.as_deref(), Some("vm1"));
                assert_eq!(libvirt_uri.as_deref(), Some("qemu:///system"));
            }
            other => panic!("{other:?}"),
        }
        match guest_add(&["--qmp", "/run/q.sock"]).unwrap() {
            GuestCmd::Add { qmp, libvirt, .. } => {
                assert_eq!(qmp, Some(PathBuf::from("/run/q.sock")));
                assert_eq!(libvirt, None);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &[][..],
            &["--qmp", "/q", "--libvirt", "vm1"],
            &["--qmp", "/q", "--libvirt-uri", "qemu:///system"],
            &["--libvirt-uri", "qemu:///system"],
        ] {
            assert!(guest_add(bad).is_err(), "{bad:?}");
        }
    }
}
