//! tmem-guest: the in-guest agent.
//!
//! Every `--interval` seconds it reads `/proc/meminfo`, `/proc/vmstat` and
//! `/proc/uptime` and writes one JSON report per line (wire format:
//! `tmem_balloon::agent`) to a virtio-serial port.
//!
//! ```text
//! tmem-guest [--interval SECS] (--port NAME | --port /dev/PATH | --stdout) [--count N]
//! ```
//!
//! * `--port NAME` finds the port whose `/sys/class/virtio-ports/*/name` is
//!   NAME and opens `/dev/<vportXpY>` (no udev needed). Default name:
//!   `org.tmem.agent` (the name tmem-vm and the QEMU helpers give the port).
//! * A missing or closed port is retried with backoff (1 s doubling to 30 s);
//!   the agent never exits because of it. Reports produced while the port is
//!   down are dropped (the host sees a gap in `seq`).
//! * SIGTERM/SIGINT end it cleanly (exit 0).
//! * Test-only knobs: `--count N` (exit after N reports), `--proc DIR`
//!   (read `meminfo`/`vmstat`/`uptime` from DIR), `--sysfs DIR`, `--dev DIR`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tmem_balloon::agent::AgentReport;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
        // the handler only stores to an atomic (async-signal-safe). No
        // SA_RESTART, so a blocked write/poll returns EINTR and we see STOP.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // Writing to a closed pipe must be an error, not death.
    // SAFETY: setting SIGPIPE to SIG_IGN has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

#[derive(Debug, Clone)]
enum Target {
    Stdout,
    Path(PathBuf),
    Name(String),
}

#[derive(Debug, Clone)]
struct Args {
    interval: Duration,
    target: Target,
    count: Option<u64>,
    proc_dir: PathBuf,
    sysfs: PathBuf,
    dev: PathBuf,
}

const USAGE: &str =
    "usage: tmem-guest [--interval SECS] (--port NAME|/path | --stdout) [--count N]";

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        interval: Duration::from_secs(2),
        target: Target::Name(tmem_balloon::qemu::AGENT_PORT_NAME.to_string()),
        count: None,
        proc_dir: PathBuf::from("/proc"),
        sysfs: PathBuf::from("/sys"),
        dev: PathBuf::from("/dev"),
    };
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--interval" => {
                let v = val("--interval")?;
                let s: f64 = v.parse().map_err(|_| format!("bad --interval {v}"))?;
                if !(0.01..=86400.0).contains(&s) {
                    return Err(format!("--interval out of range: {v}"));
                }
                a.interval = Duration::from_secs_f64(s);
            }
            "--port" => {
                let v = val("--port")?;
                a.target = if v.starts_with('/') {
                    Target::Path(v.into())
                } else {
                    Target::Name(v)
                };
            }
            "--stdout" => a.target = Target::Stdout,
            "--count" => {
                let v = val("--count")?;
                a.count = Some(v.parse().map_err(|_| format!("bad --count {v}"))?);
            }
            "--proc" => a.proc_dir = val("--proc")?.into(),
            "--sysfs" => a.sysfs = val("--sysfs")?.into(),
            "--dev" => a.dev = val("--dev")?.into(),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// Find `/dev/<vportXpY>` for a port name via sysfs.
fn resolve_port(name: &str, sysfs: &Path, dev: &Path) -> Option<PathBuf> {
    let dir = std::fs::read_dir(sysfs.join("class/virtio-ports")).ok()?;
    for e in dir.flatten() {
        let Ok(n) = std::fs::read_to_string(e.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Some(dev.join(e.file_name()));
        }
    }
    None
}

enum Sink {
    Stdout(std::io::Stdout),
    Port(File),
}

fn open_port(a: &Args) -> Result<Sink, String> {
    let path = match &a.target {
        Target::Stdout => return Ok(Sink::Stdout(std::io::stdout())),
        Target::Path(p) => p.clone(),
        Target::Name(n) => {
            resolve_port(n, &a.sysfs, &a.dev).ok_or_else(|| format!("port {n} not found"))?
        }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&path)
        .map(Sink::Port)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

/// What waiting for a port to take more bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortState {
    /// It takes bytes now.
    Writable,
    /// Nobody is reading on the host side (virtio-serial reports `POLLHUP` while the
    /// host end is not connected): writing would block until someone connects.
    HangUp,
    /// Still full when the wait ended.
    Timeout,
}

/// Waits until `fd` is writable, hung up, or `ms` elapse.
fn poll_out(fd: i32, ms: i32) -> PortState {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is a valid pollfd array of length 1 for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r <= 0 {
        PortState::Timeout
    } else if p.revents & libc::POLLOUT != 0 {
        PortState::Writable
    } else if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        PortState::HangUp
    } else {
        PortState::Timeout
    }
}

/// Write one whole line to a non-blocking port, waiting up to `budget`.
fn write_line(f: &mut File, mut buf: &[u8], budget: Duration) -> Result<(), String> {
    let end = Instant::now() + budget;
    let full = buf.len();
    while !buf.is_empty() {
        match f.write(buf) {
            Ok(0) => return Err("port closed".into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() || STOP.load(Ordering::Relaxed) {
                    // Nothing written yet: just drop this report. A partial line
                    // would corrupt the stream, so reopen in that case.
                    return if buf.len() == full {
                        Ok(())
                    } else {
                        Err("write stalled mid-line".into())
                    };
                }
                match poll_out(f.as_raw_fd(), left.as_millis().min(1000) as i32) {
                    PortState::Writable | PortState::Timeout => {}
                    // No reader on the host: drop this report instead of spinning on
                    // EAGAIN + POLLHUP (which took the guest's CPU from its workload
                    // whenever no balloon manager read the port).
                    PortState::HangUp if buf.len() == full => return Ok(()),
                    PortState::HangUp => return Err("host went away mid-line".into()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                if STOP.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

fn sleep_until(t: Instant) {
    while !STOP.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= t {
            return;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(100)));
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

fn run(a: &Args) -> i32 {
    let mut sink: Option<Sink> = None;
    let mut backoff = Duration::from_secs(1);
    let mut next_open = Instant::now();
    let mut last_err = String::new();
    let mut seq: u64 = 0;
    let mut next = Instant::now();
    while !STOP.load(Ordering::Relaxed) {
        if sink.is_none() && Instant::now() >= next_open {
            match open_port(a) {
                Ok(s) => {
                    sink = Some(s);
                    backoff = Duration::from_secs(1);
                    last_err.clear();
                }
                Err(e) => {
                    if e != last_err {
                        eprintln!("tmem-guest: {e}; retrying");
                        last_err = e;
                    }
                    next_open = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let report = AgentReport::from_proc_text(
            seq,
            a.interval.as_millis() as u64,
            &read(&a.proc_dir, "meminfo"),
            &read(&a.proc_dir, "vmstat"),
            &read(&a.proc_dir, "uptime"),
        );
        seq += 1;
        if let (Some(s), Ok(line)) = (sink.as_mut(), report.to_line()) {
            let res = match s {
                Sink::Stdout(o) => {
                    let mut l = o.lock();
                    l.write_all(line.as_bytes())
                        .and_then(|_| l.flush())
                        .map_err(|e| format!("stdout: {e}"))
                }
                Sink::Port(f) => {
                    write_line(f, line.as_bytes(), a.interval.min(Duration::from_secs(5)))
                }
            };
            if let Err(e) = res {
                eprintln!("tmem-guest: {e}; reopening");
                sink = None;
                next_open = Instant::now() + backoff;
            }
        }
        if a.count.is_some_and(|c| seq >= c) {
            break;
        }
        next += a.interval;
        let now = Instant::now();
        if next < now {
            next = now; // fell behind (suspend): do not burst
        }
        sleep_until(next);
    }
    0
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    install_signals();
    std::process::exit(run(&args));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arg_parsing() {
        let a = args(&["--interval", "0.5", "--port", "/dev/vport0p1"]).expect("ok");
        assert_eq!(a.interval, Duration::from_millis(500));
        assert!(matches!(a.target, Target::Path(ref p) if p == Path::new("/dev/vport0p1")));
        let a = args(&["--port", "my.port"]).expect("ok");
        assert!(matches!(a.target, Target::Name(ref n) if n == "my.port"));
        assert!(matches!(args(&[]).expect("ok").target, Target::Name(_)));
        assert!(args(&["--interval", "0"]).is_err());
        assert!(args(&["--interval", "nan"]).is_err());
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--port"]).is_err());
    }

    #[test]
    fn a_port_nobody_reads_is_reported_hung_up_not_waited_on() {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(made, 0);
        let (r, w) = (fds[0], fds[1]);
        assert_eq!(poll_out(w, 0), PortState::Writable);
        // Fill it: full means a wait that times out.
        let chunk = [0u8; 4096];
        // SAFETY: `chunk` is valid for reads of its length; `w` is our pipe's write end.
        while unsafe { libc::write(w, chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        assert_eq!(poll_out(w, 10), PortState::Timeout);
        // The reader goes away: hung up, at once.
        // SAFETY: `r` is ours and closed once.
        unsafe { libc::close(r) };
        // (A wait that ran out would say Timeout.)
        assert_eq!(poll_out(w, 5000), PortState::HangUp);
        // SAFETY: `w` is ours and closed once.
        unsafe { libc::close(w) };
    }

    #[test]
    fn resolves_port_by_name_via_sysfs() {
        let root = std::env::temp_dir().join(format!("tmem-guest-sysfs-{}", std::process::id()));
        let ports = root.join("class/virtio-ports");
        for (d, n) in [("vport0p1", "other\n"), ("vport1p2", "org.tmem.agent.0\n")] {
            std::fs::create_dir_all(ports.join(d)).expect("mkdir");
            std::fs::write(ports.join(d).join("name"), n).expect("write");
        }
        let dev = Path::new("/dev");
        assert_eq!(
            resolve_port("org.tmem.agent.0", &root, dev),
            Some(PathBuf::from("/dev/vport1p2"))
        );
        assert_eq!(resolve_port("missing", &root, dev), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
