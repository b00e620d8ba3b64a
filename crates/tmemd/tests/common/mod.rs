//! Test harness: the real `tmemd` and `tmemctl` binaries, a state dir in a tempdir, every
//! process killed by PID on every path (Drop).
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn tmemd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tmemd"))
}

/// `tmemctl` next to `tmemd` (built by `cargo test --workspace`); built on demand otherwise.
pub fn tmemctl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let p = tmemd_bin().with_file_name("tmemctl");
        if !p.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "-p", "tmemctl", "--bin", "tmemctl"])
                .status()
                .expect("run cargo build -p tmemctl");
            assert!(st.success(), "cargo build -p tmemctl failed");
        }
        assert!(p.exists(), "tmemctl not found at {}", p.display());
        p
    })
    .clone()
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A running tmemd.
pub struct Tmemd {
    pub child: Option<Child>,
    /// The state directory.
    pub dir: PathBuf,
    /// The runtime directory (sockets): `dir` unless started with [`Tmemd::start_split`].
    pub run: PathBuf,
    pub log: PathBuf,
}

/// How to launch tmemd: its runtime directory (`None`: the one-directory layout), an
/// optional wrapper command line that ends by exec'ing its arguments (e.g. `unshare`),
/// extra environment variables and the binary (`None`: [`tmemd_bin`]).
#[derive(Default)]
pub struct Launch<'a> {
    pub runtime: Option<&'a Path>,
    pub bin: Option<&'a Path>,
    pub wrapper: &'a [&'a str],
    pub env: &'a [(&'a str, &'a std::ffi::OsStr)],
}

impl Tmemd {
    /// Starts tmemd on `dir` with extra args and waits until the control socket answers.
    pub fn start(dir: &Path, extra: &[&str]) -> Tmemd {
        Self::start_with(dir, extra, Launch::default())
    }

    /// Writes `toml` to `base/tmemd.toml` and starts tmemd with it on `base/state`.
    pub fn start_config(base: &Path, toml: &str) -> Tmemd {
        let cfg = base.join("tmemd.toml");
        std::fs::write(&cfg, toml).expect("writing tmemd.toml");
        let cfg = cfg.to_str().expect("UTF-8 path").to_owned();
        Self::start(&base.join("state"), &["--config", &cfg])
    }

    /// Starts tmemd with separate runtime and state directories.
    pub fn start_split(runtime: &Path, dir: &Path, extra: &[&str]) -> Tmemd {
        Self::start_with(
            dir,
            extra,
            Launch {
                runtime: Some(runtime),
                ..Default::default()
            },
        )
    }

    /// Starts tmemd as `launch` says and waits until the control socket answers.
    pub fn start_with(dir: &Path, extra: &[&str], launch: Launch<'_>) -> Tmemd {
        let mut t = Self::spawn_with(dir, extra, launch);
        let sock = t.run.join("ctl.sock");
        let up = wait_until(Duration::from_secs(30), || {
            if let Some(c) = t.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return true;
                }
            }
            UnixStream::connect(&sock).is_ok()
        });
        let exited = t
            .child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(Some(_))))
            .unwrap_or(true);
        assert!(up && !exited, "tmemd did not start:\n{}", t.log_text());
        t
    }

    /// Spawns tmemd without waiting.
    pub fn spawn(dir: &Path, extra: &[&str]) -> Tmemd {
        Self::spawn_with(dir, extra, Launch::default())
    }

    /// Spawns tmemd as `launch` says, without waiting.
    pub fn spawn_with(dir: &Path, extra: &[&str], launch: Launch<'_>) -> Tmemd {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension(format!(
            "{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::File::create(&log).unwrap();
        let bin = launch.bin.map_or_else(tmemd_bin, Path::to_owned);
        let mut cmd = match launch.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        if let Some(r) = launch.runtime {
            cmd.arg("--runtime-dir").arg(r);
        }
        // A test run under a service manager must not notify it on tmemd's behalf.
        cmd.env_remove("NOTIFY_SOCKET");
        for (k, v) in launch.env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("--state-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn tmemd");
        Tmemd {
            child: Some(child),
            dir: dir.to_owned(),
            run: launch.runtime.unwrap_or(dir).to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own (up to 60 s).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let mut st = None;
        wait_until(Duration::from_secs(60), || {
            st = c.try_wait().ok().flatten();
            st.is_some()
        });
        match st {
            Some(s) => s,
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!("tmemd did not exit:\n{}", self.log_text());
            }
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        self.wait_exit()
    }

    /// Runs tmemctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.run, args)
    }

    /// `curl --unix-socket` against this daemon: returns (status, body).
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        curl(&self.run.join("ctl.sock"), method, path, body)
    }

    pub fn nbd_uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{name}?socket={}",
            self.run.join("nbd.sock").display()
        )
    }

    /// SIGKILL by PID (no shutdown, no save) and reap.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = c.wait();
    }
}

impl Drop for Tmemd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(tmemctl_bin())
        .arg("--state-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tmemctl")
}

pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "--unix-socket"])
        .arg(sock)
        .args(["-w", "\n%{http_code}"]);
    if body.is_some() {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    cmd.arg(format!("http://localhost{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run curl (apt-get install curl)");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        // curl may answer (413) before reading everything: ignore a broken pipe.
        let _ = stdin.write_all(body.unwrap_or("").as_bytes());
    }
    let out = child.wait_with_output().expect("wait for curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    out
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic test data: pseudo-random pages mixed with compressible and zero pages.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 | 1 => {
                for b in page.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            2 => {
                for (j, b) in page.iter_mut().enumerate() {
                    *b = (j / 64) as u8 ^ (i as u8);
                }
            }
            _ => {}
        }
    }
    v
}

/// Reads a whole file.
pub fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Minimal Prometheus text format check: every sample line is `name{labels} value` with a
/// family declared by `# TYPE` before it. Returns (name, labels, value) samples.
pub fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap();
            let kind = it.next().unwrap();
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_owned()),
                "family declared twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "bad comment {line}");
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                assert!(l.ends_with('}'), "{line}");
                (n, l.trim_end_matches('}'))
            }
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        assert!(typed.contains(name), "sample before TYPE: {line}");
        out.push((name.to_owned(), labels.to_owned(), value));
    }
    out
}

/// `qemu-img compare` of a raw reference file with an NBD export: panics if they differ.
pub fn qemu_img_compare(reference: &str, uri: &str) {
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", reference, uri],
    );
}

/// `qemu-img convert -n` of a raw file onto an existing NBD export.
pub fn qemu_img_write(source: &str, uri: &str) {
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source, uri],
    );
}
