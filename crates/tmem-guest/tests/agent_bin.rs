//! Runs the real `tmem-guest` binary: `--stdout`, SIGTERM, and a FIFO standing
//! in for a virtio-serial port (found by name through a fake sysfs, created
//! only after the agent started, closed and reopened by the reader).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tmem_balloon::agent::AgentReport;

const BIN: &str = env!("CARGO_BIN_EXE_tmem-guest");

/// Kills (by PID) and reaps the agent on every path.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(c: &Child) {
    // SAFETY: sending a signal to our own child process by its PID.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
}

fn decode(line: &str) -> AgentReport {
    AgentReport::decode(line.as_bytes()).unwrap_or_else(|e| panic!("bad report {line:?}: {e}"))
}

#[test]
fn stdout_two_reports() {
    let out = Command::new(BIN)
        .args(["--stdout", "--interval", "0.05", "--count", "2"])
        .output()
        .expect("run tmem-guest");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let (a, b) = (decode(lines[0]), decode(lines[1]));
    assert_eq!((a.seq, b.seq), (0, 1));
    assert_eq!(a.v, 1);
    assert!(!a.agent.is_empty());
    assert!(
        a.mem.total.unwrap_or(0) > 0 && a.mem.available.is_some() && a.mem.committed_as.is_some()
    );
    assert!(a.vm.pgmajfault.is_some());
    assert!(b.uptime_ms >= a.uptime_ms && a.uptime_ms > 0);
}

#[test]
fn sigterm_exits_cleanly_and_rss_is_small() {
    let child = Command::new(BIN)
        .args(["--stdout", "--interval", "0.05"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut g = Guard(child);
    let mut rd = BufReader::new(g.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    rd.read_line(&mut line).expect("read");
    decode(line.trim_end());
    let status = std::fs::read_to_string(format!("/proc/{}/status", g.0.id())).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(rss_kb > 0 && rss_kb < 16 * 1024, "VmRSS {rss_kb} kB");
    sigterm(&g.0);
    let st = g.0.wait().expect("wait");
    assert_eq!(st.code(), Some(0), "{st:?}");
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("cstr");
    // SAFETY: `c` is a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo");
}

/// Open the FIFO for reading on a helper thread (blocking open waits for the
/// writer) and read `n` lines; fails the test after a generous deadline.
fn read_lines(p: &Path, n: usize) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    let p = p.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&p).expect("open fifo");
        let mut out = Vec::new();
        for l in BufReader::new(f).lines().take(n) {
            out.push(l.unwrap_or_default());
        }
        let _ = tx.send(out);
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("agent wrote to the port")
}

#[test]
fn port_by_name_appears_late_and_survives_reader_close() {
    let root = std::env::temp_dir().join(format!("tmem-guest-port-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (sysfs, dev) = (root.join("sys"), root.join("dev"));
    std::fs::create_dir_all(&dev).expect("mkdir");
    let child = Command::new(BIN)
        .args(["--port", "org.tmem.agent.0", "--interval", "0.05"])
        .arg("--sysfs")
        .arg(&sysfs)
        .arg("--dev")
        .arg(&dev)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut g = Guard(child);
    // The port shows up after the agent started.
    let port_dir = sysfs.join("class/virtio-ports/vport2p1");
    std::fs::create_dir_all(&port_dir).expect("mkdir");
    std::fs::write(port_dir.join("name"), "org.tmem.agent.0\n").expect("name");
    let fifo = dev.join("vport2p1");
    mkfifo(&fifo);
    let first = read_lines(&fifo, 2);
    let (a, b) = (decode(&first[0]), decode(&first[1]));
    assert!(b.seq > a.seq);
    // Reader closed (host disconnected): the agent keeps running and reopens.
    let again = read_lines(&fifo, 1);
    assert!(decode(&again[0]).seq > b.seq);
    assert!(
        g.0.try_wait().expect("try_wait").is_none(),
        "agent still running"
    );
    sigterm(&g.0);
    assert_eq!(g.0.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_dir_all(&root);
}
