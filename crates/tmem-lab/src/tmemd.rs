//! Spawning the real `tmemd` binary and talking to its control API.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Finds (or builds) the `tmemd` binary.
///
/// Order: `explicit`, `$TMEM_LAB_TMEMD`, a `tmemd` beside the running executable
/// (or one directory up, for test binaries in `deps/`), else
/// `cargo build --release -p tmemd` in the workspace and its `target/release/tmemd`.
pub fn locate_tmemd(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--tmemd {} is not a file", p.display());
    }
    if let Some(p) = std::env::var_os("TMEM_LAB_TMEMD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            for c in [dir.join("tmemd"), dir.join("../release/tmemd")] {
                if c.is_file() {
                    return Ok(c);
                }
            }
        }
    }
    build_tmemd()
}

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or(here)
}

fn build_tmemd() -> Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    tracing::info!("building tmemd (cargo build --release -p tmemd)");
    let st = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "tmemd", "--target-dir"])
        .arg(&target)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {cargo:?}"))?;
    if !st.success() {
        bail!("cargo build -p tmemd failed ({st})");
    }
    let p = target.join("release").join("tmemd");
    if !p.is_file() {
        bail!("cargo built tmemd but {} is missing", p.display());
    }
    Ok(p)
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// The binary.
    pub bin: PathBuf,
    /// Its state directory (sockets, spill files).
    pub state_dir: PathBuf,
    /// Pool budget, bytes.
    pub budget: u64,
    /// Default codec (`none`, `lz4`, `zstd`).
    pub codec: String,
    /// Default dedup scope (`off`, `pool`, `client`, `global`).
    pub dedup: String,
    /// Balloon manager interval, ms.
    pub balloon_interval_ms: u64,
    /// Put the daemon into this cgroup (its `cgroup.procs`) right after spawning.
    pub cgroup: Option<PathBuf>,
    /// Balloon manager `host_total`, bytes (the host budget; `None`: host MemTotal).
    pub host_total: Option<u64>,
    /// Balloon manager `host_reserve`, bytes (`None`: tmemd's default, 1 GiB).
    pub host_reserve: Option<u64>,
    /// Balloon manager `pool_min`, bytes (memory guest growth leaves to the pool).
    pub pool_min: u64,
}

/// A running `tmemd`, stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pid: u32,
    api: Api,
    state_dir: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until its control socket answers.
    pub fn start(o: &DaemonOpts) -> Result<Self> {
        std::fs::create_dir_all(&o.state_dir)
            .with_context(|| format!("creating {}", o.state_dir.display()))?;
        let stderr = o.state_dir.with_extension("tmemd.log");
        let log = std::fs::File::create(&stderr)
            .with_context(|| format!("creating {}", stderr.display()))?;
        let conf = o.state_dir.with_extension("toml");
        let mut toml = format!(
            "[balloon]\ninterval_ms = {}\n",
            o.balloon_interval_ms.max(100)
        );
        if let Some(t) = o.host_total {
            toml.push_str(&format!("host_total = {t}\n"));
        }
        if let Some(r) = o.host_reserve {
            toml.push_str(&format!("host_reserve = {r}\n"));
        }
        if o.pool_min > 0 {
            toml.push_str(&format!("pool_min = {}\n", o.pool_min));
        }
        std::fs::write(&conf, toml).with_context(|| format!("writing {}", conf.display()))?;
        let child = Command::new(&o.bin)
            .arg("--config")
            .arg(&conf)
            .arg("--state-dir")
            .arg(&o.state_dir)
            .arg("--budget")
            .arg(o.budget.to_string())
            .arg("--codec")
            .arg(&o.codec)
            .arg("--dedup")
            .arg(&o.dedup)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", o.bin.display()))?;
        let pid = child.id();
        let mut d = Daemon {
            child: Some(child),
            pid,
            api: Api::new(o.state_dir.join(tmem_api::CTL_SOCKET)),
            state_dir: o.state_dir.clone(),
            stderr,
        };
        if let Some(cg) = &o.cgroup {
            std::fs::write(cg.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("moving tmemd {pid} into {}", cg.display()))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = d.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    let log = std::fs::read_to_string(&d.stderr).unwrap_or_default();
                    d.child = None;
                    bail!("tmemd exited at start ({st}): {}", log.trim());
                }
            }
            if d.api.get::<tmem_api::Status>("/status").is_ok() {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!(
                    "tmemd did not answer on {} within 30 s",
                    d.api.sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's PID (for CPU accounting).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The control API.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Hands `guest` to the balloon manager under the selfballoon policy (`POST /guests`).
    pub fn add_selfballoon_guest(&self, name: &str, guest: &tmem_vm::Guest) -> Result<()> {
        self.api.post(
            "/guests",
            &tmem_api::CreateGuest {
                name: name.to_string(),
                qmp: guest.qmp_path().map(Path::to_path_buf).unwrap_or_default(),
                libvirt: None,
                agent: guest.agent_path().map(Path::to_path_buf),
                policy: Some(tmem_api::PolicyName::Selfballoon),
                min: None,
                max: None,
            },
        )
    }

    /// The NBD socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.state_dir.join(tmem_api::NBD_SOCKET)
    }

    /// Stops the daemon: SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_file(&self.stderr);
        let _ = std::fs::remove_file(self.state_dir.with_extension("toml"));
    }
}

/// A minimal HTTP/1.1 client for the control socket (one connection per request).
#[derive(Debug, Clone)]
pub struct Api {
    sock: PathBuf,
}

impl Api {
    /// A client for `sock`.
    pub fn new(sock: PathBuf) -> Self {
        Api { sock }
    }

    /// Sends a request; returns status and body.
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>)> {
        let mut s = UnixStream::connect(&self.sock)
            .with_context(|| format!("connecting to {}", self.sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        let body = body.unwrap_or(&[]);
        let full = if path.starts_with("/metrics") {
            path.to_string()
        } else {
            format!("{}{path}", tmem_api::API_PREFIX)
        };
        let head = format!(
            "{method} {full} HTTP/1.1\r\nHost: tmemd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut buf = Vec::new();
        s.take(64 << 20).read_to_end(&mut buf)?;
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("bad HTTP reply from tmemd"))?;
        let head = String::from_utf8_lossy(&buf[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {head:?}"))?;
        Ok((status, buf[split + 4..].to_vec()))
    }

    /// `GET` a JSON resource.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (st, body) = self.raw("GET", path, None)?;
        if st != 200 {
            bail!("GET {path}: HTTP {st}: {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice(&body).with_context(|| format!("decoding GET {path}"))
    }

    /// `POST` a JSON body, expecting 2xx.
    pub fn post<B: Serialize>(&self, path: &str, b: &B) -> Result<()> {
        let data = serde_json::to_vec(b)?;
        let (st, body) = self.raw("POST", path, Some(&data))?;
        if !(200..300).contains(&st) {
            bail!("POST {path}: HTTP {st}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// `DELETE` a resource (errors ignored by callers during cleanup).
    pub fn delete(&self, path: &str) -> Result<()> {
        let (st, body) = self.raw("DELETE", path, None)?;
        if !(200..300).contains(&st) {
            bail!(
                "DELETE {path}: HTTP {st}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }
}
