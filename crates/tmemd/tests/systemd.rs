//! tmemd under systemd: the shipped units (`packaging/`) pass `systemd-analyze verify` and
//! agree with the daemon's paths and the shipped configuration, and the real binary speaks
//! the notify protocol (`READY=1` once restored and listening, `STOPPING=1` on SIGTERM)
//! to a datagram socket the test binds as `NOTIFY_SOCKET`, as systemd would.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-systemd")
        .tempdir()
        .unwrap()
}

fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging")
        .join(name)
}

fn read(name: &str) -> String {
    let p = packaging(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every value of `key=` in a unit file (comments and other keys skipped).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// The single value of `key=` in a unit file.
fn unit_value(text: &str, key: &str) -> String {
    let v = unit_values(text, key);
    assert_eq!(v.len(), 1, "{key}= should appear once: {v:?}");
    v[0].clone()
}

#[test]
fn unit_matches_the_daemon_and_the_shipped_config() {
    let unit = read("tmemd.service");
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "NotifyAccess"), "main");
    let exec = unit_value(&unit, "ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[0], "/usr/bin/tmemd", "{exec}");
    // The --config path is in the ConfigurationDirectory= and is tmemd.toml.
    let conf_dir = unit_value(&unit, "ConfigurationDirectory");
    assert_eq!(
        args[1..],
        ["--config", &format!("/etc/{conf_dir}/tmemd.toml")],
        "{exec}"
    );
    // The runtime and state directories are tmemd's defaults as root and the shipped
    // config's (commented-out) values, and the durable memory's mount is the runtime dir.
    let run = format!("/run/{}", unit_value(&unit, "RuntimeDirectory"));
    let state = format!("/var/lib/{}", unit_value(&unit, "StateDirectory"));
    assert_eq!(
        (run.as_str(), state.as_str()),
        ("/run/tmem", "/var/lib/tmem")
    );
    let toml = read("tmemd.toml");
    assert!(
        toml.lines()
            .any(|l| l == format!("#runtime_dir = \"{run}\"")),
        "tmemd.toml: runtime_dir should be {run}"
    );
    assert!(
        toml.lines()
            .any(|l| l == format!("#state_dir = \"{state}\"")),
        "tmemd.toml: state_dir should be {state}"
    );
    assert_eq!(unit_value(&unit, "RequiresMountsFor"), run);
    assert_eq!(unit_value(&read("run-tmem.mount"), "Where"), run);
    // Durable pool memory survives a stop after a crash.
    assert_eq!(unit_value(&unit, "RuntimeDirectoryPreserve"), "yes");
    // A save on SIGTERM to tmemd alone, with time for it; never the first OOM victim.
    assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");
    assert_eq!(unit_value(&unit, "KillMode"), "mixed");
    assert_eq!(unit_value(&unit, "TimeoutStopSec"), "15min");
    let oom: i32 = unit_value(&unit, "OOMScoreAdjust").parse().unwrap();
    assert!((-999..0).contains(&oom), "OOMScoreAdjust={oom}");
    assert_eq!(unit_value(&unit, "Restart"), "on-failure");
    assert_eq!(unit_value(&unit, "ProtectSystem"), "strict");
}

/// Runs `systemd-analyze verify` on copies of the shipped units in `dir` (with `ExecStart=`
/// pointing at the binary under test: verify requires it to exist) plus `extra` lines in
/// the service's `[Service]` section; returns (success, every line of output).
fn verify(sa: &Path, dir: &Path, extra: &str) -> (bool, String) {
    let bin = tmemd_bin();
    let bin = bin.to_str().expect("UTF-8 path");
    let quoted = if bin.contains(char::is_whitespace) {
        format!("\"{bin}\"")
    } else {
        bin.to_owned()
    };
    let unit =
        read("tmemd.service").replace("ExecStart=/usr/bin/tmemd", &format!("ExecStart={quoted}"));
    assert!(unit.contains(&format!("ExecStart={quoted} ")));
    assert_eq!(unit.matches("\n[Service]\n").count(), 1);
    let unit = unit.replacen("\n[Service]\n", &format!("\n[Service]\n{extra}"), 1);
    let service = dir.join("tmemd.service");
    let mount = dir.join("run-tmem.mount");
    std::fs::write(&service, unit).unwrap();
    std::fs::write(&mount, read("run-tmem.mount")).unwrap();
    let out = Command::new(sa)
        .arg("verify")
        .arg("--man=no")
        .arg(&service)
        .arg(&mount)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    (out.status.success(), text)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(sa) = tmem_vm::test_tool("systemd-analyze") else {
        return;
    };
    let t = tmp();
    let (ok, text) = verify(&sa, t.path(), "");
    // verify exits 0 on unknown keys and bad values, which it only prints: any line about
    // our units is a failure.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tmemd.service") || l.contains("run-tmem.mount"))
        .collect();
    assert!(ok && ours.is_empty(), "systemd-analyze verify:\n{text}");
    if !text.trim().is_empty() {
        eprintln!("systemd-analyze verify (not about our units):\n{text}");
    }
    // The check sees a mistake: an unknown key and a bad value are reported.
    let (_, text) = verify(&sa, t.path(), "TimeoutStopSecs=1\nOOMScoreAdjust=-5000\n");
    assert!(
        text.contains("TimeoutStopSecs") && text.contains("-5000"),
        "systemd-analyze verify did not report the planted mistakes:\n{text}"
    );
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received, in order.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Receives until a message has the line `line`; returns that message's index in
    /// `seen`, or `None` after `timeout`.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> Option<usize> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("recv on the notify socket: {e}"),
            };
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification");
            let hit = msg.lines().any(|l| l == line);
            self.seen.push(msg);
            if hit {
                return Some(self.seen.len() - 1);
            }
        }
    }

    /// Index of the first message with a line starting with `prefix`.
    fn first(&self, prefix: &str) -> Option<usize> {
        self.seen
            .iter()
            .position(|m| m.lines().any(|l| l.starts_with(prefix)))
    }
}

/// One HTTP/1.1 request on the control socket, raw (no curl): (status, body). Fails if the
/// socket does not accept the connection.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("an HTTP status");
    (code, body.to_owned())
}

fn sigterm(d: &Tmemd) {
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    unsafe {
        libc::kill(d.pid() as libc::pid_t, libc::SIGTERM);
    }
}

#[test]
fn ready_after_the_restore_and_stopping_on_sigterm() {
    let t = tmp();
    let dir = t.path().join("state");
    let args = ["--budget", "16M"];
    // A first run leaves state to restore: two exports, saved at a clean stop.
    let mut d = Tmemd::start(&dir, &args);
    for name in ["s0", "s1"] {
        let body = format!("{{\"name\":\"{name}\",\"kind\":\"swap\",\"size\":8388608}}");
        let (code, reply) = request(&d.run.join("ctl.sock"), "POST", "/api/v1/exports", &body);
        assert!(code == 200 || code == 201, "{code} {reply}");
    }
    assert!(d.terminate().success(), "{}", d.log_text());
    drop(d);

    let mut n = NotifySocket::bind(t.path().join("notify.sock"));
    let mut d = Tmemd::spawn_with(
        &dir,
        &args,
        Launch {
            env: &[("NOTIFY_SOCKET", n.path.as_os_str())],
            ..Default::default()
        },
    );
    let ready = n
        .wait_for("READY=1", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no READY=1 ({:?}):\n{}", n.seen, d.log_text()));
    // The moment READY=1 arrives, both sockets accept and the restored exports are served.
    UnixStream::connect(d.run.join("nbd.sock")).expect("nbd.sock accepts at READY=1");
    let (code, body) = request(&d.run.join("ctl.sock"), "GET", "/api/v1/exports", "");
    assert_eq!(code, 200, "{body}");
    let exports: Vec<tmem_api::ExportInfo> = serde_json::from_str(&body).unwrap();
    let mut names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["s0", "s1"]);
    // The restore reported its steps before READY=1, with more time for each, and READY=1
    // came once.
    let restoring = n
        .first("STATUS=restoring client")
        .expect("restore progress");
    let reopening = n
        .first("STATUS=reopening 2 exports")
        .expect("reopen progress");
    assert!(restoring < reopening && reopening < ready, "{:?}", n.seen);
    assert!(n.seen[restoring]
        .lines()
        .any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")));
    assert!(
        n.seen[ready].contains("STATUS=serving 2 exports"),
        "{:?}",
        n.seen[ready]
    );
    assert_eq!(n.seen.iter().filter(|m| m.contains("READY=1")).count(), 1);
    assert!(n.first("STOPPING=1").is_none());

    // SIGTERM: STOPPING=1 first, then the save reports itself, then a clean exit.
    sigterm(&d);
    let stopping = n
        .wait_for("STOPPING=1", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no STOPPING=1 ({:?}):\n{}", n.seen, d.log_text()));
    let st = d.wait_exit();
    assert!(st.success(), "exit {st:?}\n{}", d.log_text());
    // Whatever else was sent is queued on the socket by now.
    n.wait_for("(nothing more)", Duration::from_millis(200));
    let saving = n.first("STATUS=saving client").expect("save progress");
    assert!(stopping < saving, "{:?}", n.seen);
    assert_eq!(n.seen.iter().filter(|m| m.contains("READY=1")).count(), 1);
}

#[test]
fn a_notify_socket_nobody_listens_on_changes_nothing() {
    let t = tmp();
    let dir = t.path().join("state");
    let gone = t.path().join("no-such-socket");
    let mut d = Tmemd::start_with(
        &dir,
        &["--budget", "8M"],
        Launch {
            env: &[("NOTIFY_SOCKET", gone.as_os_str())],
            ..Default::default()
        },
    );
    let (code, body) = request(&d.run.join("ctl.sock"), "GET", "/api/v1/status", "");
    assert_eq!(code, 200, "{body}");
    assert!(d.terminate().success(), "{}", d.log_text());
    // One warning, however many notifications failed (ready, stopping, ...).
    let log = d.log_text();
    assert_eq!(
        log.matches("cannot notify the service manager").count(),
        1,
        "{log}"
    );
}
