//! The real `tmemd` and `tmemctl` binaries: locating/building them, a daemon
//! guard, `tmemctl` calls and a small HTTP client for the control socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::{io_err, Error, Result};

/// Paths of the daemon binaries.
#[derive(Debug, Clone)]
pub struct DaemonBins {
    /// `tmemd`.
    pub tmemd: PathBuf,
    /// `tmemctl`.
    pub tmemctl: PathBuf,
}

/// Finds `tmemd` and `tmemctl`.
///
/// `$TMEM_ITEST_TMEMD` / `$TMEM_ITEST_TMEMCTL` override. Otherwise both are
/// built with `cargo build -p tmemd -p tmemctl` into the target directory of
/// the running test executable (`exe` is its path, e.g.
/// `target/debug/deps/balloon_guests-…`), so they match the sources under
/// test; cargo makes the repeated call cheap.
pub fn daemon_bins(exe: &Path) -> Result<DaemonBins> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let (Some(tmemd), Some(tmemctl)) = (env("TMEM_ITEST_TMEMD"), env("TMEM_ITEST_TMEMCTL")) {
        return Ok(DaemonBins { tmemd, tmemctl });
    }
    // <target>/<profile>/deps/<exe>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Error::Parse {
            what: "test executable path".into(),
            detail: exe.display().to_string(),
        })?;
    let target_dir = profile_dir.parent().ok_or_else(|| Error::Parse {
        what: "target directory".into(),
        detail: profile_dir.display().to_string(),
    })?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root())
        .args(["build", "-p", "tmemd", "-p", "tmemctl"])
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let bins = DaemonBins {
        tmemd: profile_dir.join("tmemd"),
        tmemctl: profile_dir.join("tmemctl"),
    };
    for p in [&bins.tmemd, &bins.tmemctl] {
        if !p.is_file() {
            return Err(Error::Parse {
                what: "daemon binaries".into(),
                detail: format!("{} missing after cargo build", p.display()),
            });
        }
    }
    Ok(bins)
}

/// Runs a command, returning its output; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("spawning {desc}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        return Err(Error::Command {
            cmd: desc,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(out)
}

/// A running `tmemd` on its own state directory. Dropping it sends SIGTERM
/// (clean shutdown), waits up to 10 s, then SIGKILLs; always by its PID.
#[derive(Debug)]
pub struct Tmemd {
    child: Option<Child>,
    bins: DaemonBins,
    state_dir: PathBuf,
    log: PathBuf,
    /// Network namespace the daemon runs in (`ip netns exec`, which execs it: same PID).
    netns: Option<String>,
}

impl Tmemd {
    /// Starts `tmemd --state-dir DIR --config CONFIG` (the TOML text is
    /// written next to the state dir) and waits until the control socket
    /// answers. The log goes to `DIR.log`.
    pub fn start(bins: &DaemonBins, state_dir: &Path, config_toml: &str) -> Result<Self> {
        Self::start_in(bins, state_dir, config_toml, None)
    }

    /// [`Tmemd::start`] inside the network namespace `netns` (made by the test, e.g. a
    /// [`crate::fleet::Fleet`] host): the daemon reaches only that namespace's network, its
    /// Unix sockets are reachable from everywhere as usual.
    pub fn start_in(
        bins: &DaemonBins,
        state_dir: &Path,
        config_toml: &str,
        netns: Option<&str>,
    ) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(io_err(format!("creating {}", state_dir.display())))?;
        let cfg = state_dir.with_extension("toml");
        std::fs::write(&cfg, config_toml).map_err(io_err(format!("writing {}", cfg.display())))?;
        let mut d = Tmemd {
            child: None,
            bins: bins.clone(),
            state_dir: state_dir.to_path_buf(),
            log: state_dir.with_extension("log"),
            netns: netns.map(str::to_owned),
        };
        d.spawn(false)?;
        Ok(d)
    }

    /// Starts the daemon again on the same state directory and config after
    /// [`Tmemd::kill9`] or [`Tmemd::stop`], appending to the same log, and
    /// waits until the control socket answers (tmemd restores its exports
    /// before it listens, so they are back by then).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(Error::Parse {
                what: "tmemd restart".into(),
                detail: format!("tmemd {} is still running", self.pid()),
            });
        }
        self.spawn(true)
    }

    /// Kills the daemon with SIGKILL (by its PID, like an OOM kill or a
    /// crash: no shutdown code runs) and reaps it. Its sockets, lock file and
    /// durable memory stay behind. Idempotent.
    pub fn kill9(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // Child::kill sends SIGKILL to this child's PID; it is not reaped yet.
        let _ = c.kill();
        c.wait().ok()
    }

    /// Spawns tmemd (log truncated, or appended to) and waits for its control socket.
    fn spawn(&mut self, append: bool) -> Result<()> {
        let cfg = self.state_dir.with_extension("toml");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bins.tmemd);
                c
            }
            None => Command::new(&self.bins.tmemd),
        };
        let child = cmd
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--config")
            .arg(&cfg)
            .env(
                "RUST_LOG",
                std::env::var("TMEM_ITEST_TMEMD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(io_err(format!("spawning {}", self.bins.tmemd.display())))?;
        self.child = Some(child);
        // A socket file left by a killed daemon refuses connections: only the
        // new daemon's listener makes this succeed.
        let sock = self.ctl_socket();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.try_exit() {
                self.child = None;
                return Err(Error::Command {
                    cmd: "tmemd".into(),
                    status: st.to_string(),
                    stderr: self.log_text(),
                });
            }
            if UnixStream::connect(&sock).is_ok() {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    what: format!("tmemd control socket {}", sock.display()),
                    secs: 60.0,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The daemon's PID (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The control socket.
    pub fn ctl_socket(&self) -> PathBuf {
        self.state_dir.join(tmem_api::CTL_SOCKET)
    }

    /// The NBD socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.state_dir.join(tmem_api::NBD_SOCKET)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `tmemctl --state-dir DIR ARGS…`; a failure is an error with its stderr.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new(&self.bins.tmemctl)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a `tmemctl … --json` listing and parses it.
    pub fn ctl_json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let text = self.ctl(args)?;
        serde_json::from_str(&text).map_err(|e| Error::Parse {
            what: format!("tmemctl {}", args.join(" ")),
            detail: format!("{e}: {text}"),
        })
    }

    /// `GET path` on the control socket (HTTP/1.1), parsed as JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        http_get_json(&self.ctl_socket(), path, Duration::from_secs(5))
    }

    /// Stops the daemon: SIGTERM, wait up to `grace`, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: kill(2) on the PID of our own child, not yet reaped
            // (try_wait above returned None), so the PID cannot be reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Tmemd {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
        if std::env::var_os("TMEM_ITEST_KEEP").is_none_or(|v| v != "1") {
            let _ = std::fs::remove_file(&self.log);
            let _ = std::fs::remove_file(self.state_dir.with_extension("toml"));
        }
    }
}

/// `GET path` over HTTP/1.1 on a Unix socket; returns the body of a 2xx answer
/// parsed as JSON, else an error with the status and body.
pub fn http_get_json<T: DeserializeOwned>(sock: &Path, path: &str, timeout: Duration) -> Result<T> {
    let (status, body) = http_get(sock, path, timeout)?;
    if !(200..300).contains(&status) {
        return Err(Error::Command {
            cmd: format!("GET {path}"),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|e| Error::Parse {
        what: format!("GET {path}"),
        detail: e.to_string(),
    })
}

/// `GET path` over HTTP/1.1 on a Unix socket with `Connection: close`;
/// returns (status, body).
pub fn http_get(sock: &Path, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let ctx = || format!("GET {path} on {}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(io_err(ctx()))?;
    s.set_read_timeout(Some(timeout)).map_err(io_err(ctx()))?;
    s.set_write_timeout(Some(timeout)).map_err(io_err(ctx()))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(io_err(ctx()))?;
    let mut buf = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut buf)
        .map_err(io_err(ctx()))?;
    parse_response(&buf).ok_or_else(|| Error::Parse {
        what: ctx(),
        detail: String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned(),
    })
}

/// Splits an HTTP/1.1 response (Content-Length or read-to-close body) into
/// (status, body).
fn parse_response(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let body = &buf[end + 4..];
    let len = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let body = match len {
        Some(n) => body.get(..n)?,
        None => body,
    };
    Some((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]extra").unwrap();
        assert_eq!(r, (200, b"[]".to_vec()));
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\":1}").unwrap();
        assert_eq!(r.0, 404);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n[]").is_none());
        assert!(parse_response(b"garbage").is_none());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_none());
    }

    #[test]
    fn http_get_against_a_fake_server() {
        let d = crate::TempDir::with_keep("tmem-itest-http", false).unwrap();
        let sock = d.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short: {req:?}");
                req.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&req).starts_with("GET /x HTTP/1.1\r\n"));
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n[1,2,3]")
                .unwrap();
        });
        let v: Vec<u32> = http_get_json(&sock, "/x", Duration::from_secs(5)).unwrap();
        assert_eq!(v, [1, 2, 3]);
        t.join().unwrap();
        assert!(http_get(&d.join("nope.sock"), "/x", Duration::from_secs(1)).is_err());
    }
}
