//! Real-VM tests: boot QEMU guests (TCG unless KVM really works) and check
//! workloads, the balloon over QMP, NBD-backed swap and ext4 data images.
//!
//! Guests are small (128–384 MiB, 1 vCPU) and run one at a time. Every guest
//! and every nbdkit process is killed by PID when its guard drops, also when a
//! test fails.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tmem_vm::{
    build_guest_binary, make_data_image, make_data_tree, Drive, Guest, GuestConfig, ImageBuilder,
    MemCgroup, MARK_READY,
};

/// Generous: TCG on two shared cores can be slow.
const BOOT: Duration = Duration::from_secs(120);
const RUN: Duration = Duration::from_secs(400);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The static `tmem-work` (only it: these tests must not depend on the
/// state of other crates' binaries).
fn tmem_work() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        build_guest_binary(&workspace_root(), "tmem-work").expect("building static tmem-work")
    })
}

/// One guest at a time: the machine has two cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn image(script: &str) -> ImageBuilder {
    ImageBuilder::new()
        .binary("tmem-work", tmem_work())
        .script(script)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tmem-vm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes a directory when dropped.
struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a child process (by PID, via `Child::kill`) when dropped.
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn field(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)? + key.len();
    let digits: String = text[i..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn boots_runs_script_and_reports_exit_code() {
    let _s = serial();
    let img = image(
        "echo hello-from-guest\n\
         grep MemTotal /proc/meminfo\n\
         tmem-work memcheck --mib 8 --seed 3 || exit 10\n\
         tmem-work eatmem --max-mib 16 --rounds 3 --sleep-ms 10 --seed 5 || exit 11\n\
         ls /sys/class/virtio-ports/ 2>/dev/null\n\
         exit 3\n",
    )
    .build()
    .expect("image");
    // Building again with the same inputs is a cache hit with the same key.
    let again = image(
        "echo hello-from-guest\n\
         grep MemTotal /proc/meminfo\n\
         tmem-work memcheck --mib 8 --seed 3 || exit 10\n\
         tmem-work eatmem --max-mib 16 --rounds 3 --sleep-ms 10 --seed 5 || exit 11\n\
         ls /sys/class/virtio-ports/ 2>/dev/null\n\
         exit 3\n",
    )
    .build()
    .expect("image");
    assert_eq!(img.key, again.key);
    assert_eq!(img.initrd, again.initrd);

    let t0 = Instant::now();
    let guest = GuestConfig::new("boot")
        .memory_mib(192)
        .agent(true)
        .image(img)
        .launch()
        .expect("launch");
    guest.wait_for_console(MARK_READY, BOOT).expect("ready");
    eprintln!(
        "boot to {MARK_READY} took {:.2}s under {}",
        t0.elapsed().as_secs_f64(),
        guest.accel()
    );
    assert!(guest.agent_path().is_some_and(|p| p.exists()));
    let code = guest.wait_exit(RUN).expect("exit");
    let log = guest.console_text();
    assert_eq!(code, 3, "console:\n{log}");
    assert!(log.contains("hello-from-guest"), "{log}");
    assert!(log.contains("memcheck: pages=2048 mismatches=0"), "{log}");
    assert!(log.contains("eatmem: done rounds=3"), "{log}");
    assert!(!log.contains("TMEM-WARN"), "{log}");
    // The agent channel's virtio-serial port is visible to the guest.
    assert!(log.contains("vport"), "{log}");
    let run_dir = guest.run_dir().to_path_buf();
    let pid = guest.pid();
    drop(guest);
    assert!(!run_dir.exists(), "run dir removed on drop");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| !c.contains("qemu"))
                .unwrap_or(true)
    );
}

/// Minimal QMP over a Unix socket (the real client lives in tmem-balloon).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connecting to QMP {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = q.line();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        let r = q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        assert!(r.contains("\"return\""), "{r}");
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        assert!(!l.is_empty(), "QMP closed");
        l
    }

    /// Sends a command and returns its reply, skipping events.
    fn cmd(&mut self, json: &str) -> String {
        self.w.write_all(json.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        loop {
            let l = self.line();
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    }
}

#[test]
fn balloon_inflates_to_target_over_qmp() {
    let _s = serial();
    let img = image("echo idle; tmem-work idle\n").build().expect("image");
    let guest = GuestConfig::new("balloon")
        .memory_mib(384)
        .image(img)
        .launch()
        .expect("launch");
    guest.wait_for_console(MARK_READY, BOOT).expect("ready");
    guest
        .wait_for_console("idle: sleeping", BOOT)
        .expect("workload started");
    let mut q = Qmp::connect(guest.qmp_path().expect("qmp socket"));
    let r = q.cmd(r#"{"execute":"query-balloon"}"#);
    assert_eq!(field(&r, "\"actual\": "), Some(384 << 20), "{r}");
    let target: u64 = 256 << 20;
    let r = q.cmd(&format!(
        r#"{{"execute":"balloon","arguments":{{"value":{target}}}}}"#
    ));
    assert!(r.contains("\"return\""), "{r}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        last = q.cmd(r#"{"execute":"query-balloon"}"#);
        if field(&last, "\"actual\": ") == Some(target) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        field(&last, "\"actual\": "),
        Some(target),
        "last reply {last}; console:\n{}",
        guest.console_text()
    );
    assert!(guest.is_running());
}

/// Spawns `nbdkit memory SIZE` on a Unix socket and waits for the socket.
fn nbdkit_memory(size: &str, sock: &Path) -> ChildGuard {
    let nbdkit = tmem_vm::find_tool("nbdkit").expect("nbdkit (run scripts/setup)");
    let child = Command::new(nbdkit)
        .args(["-f", "-U"])
        .arg(sock)
        .args(["memory", size])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nbdkit");
    let mut g = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit socket never appeared");
        assert!(g.0.try_wait().unwrap().is_none(), "nbdkit exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    g
}

#[test]
fn nbd_swap_keeps_data_intact() {
    let _s = serial();
    let dir = scratch("swap");
    let _dg = DirGuard(dir.clone());
    let sock = dir.join("nbd.sock");
    let _nbd = nbdkit_memory("256M", &sock);
    let img = image(
        "cat /proc/swaps\n\
         tmem-work memcheck --mib 160 --seed 9\n\
         rc=$?\n\
         cat /proc/swaps\n\
         grep -E '^pswp(in|out) ' /proc/vmstat\n\
         exit $rc\n",
    )
    .swap("/dev/vda")
    .build()
    .expect("image");
    let guest = GuestConfig::new("swap")
        .memory_mib(128)
        .drive(Drive::nbd(&sock, ""))
        .image(img)
        .launch()
        .expect("launch");
    guest
        .wait_for_console("TMEM-SWAP /dev/vda", BOOT)
        .expect("swap enabled");
    let code = guest.wait_exit(RUN).expect("exit");
    let log = guest.console_text();
    assert_eq!(code, 0, "console:\n{log}");
    assert!(log.contains("memcheck: pages=40960 mismatches=0"), "{log}");
    let pswpout = log
        .lines()
        .find_map(|l| l.strip_prefix("pswpout "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no pswpout in:\n{log}"));
    assert!(pswpout > 0, "guest did not swap:\n{log}");
    eprintln!("pswpout={pswpout}");
}

#[test]
fn data_image_is_readable_in_guest() {
    let _s = serial();
    let dir = scratch("data");
    let _dg = DirGuard(dir.clone());
    let (seed, size) = (42u64, 32u64 << 20);
    let img_path = dir.join("data.img");
    make_data_image(seed, size, &img_path).expect("data image");
    // Host reference: the same tree, built with the same (static) binary.
    let tree = dir.join("tree");
    let stats = make_data_tree(seed, size / 10 * 6, &tree).expect("tree");
    let host = Command::new(tmem_work())
        .args(["build", "--src"])
        .arg(&tree)
        .arg("--out")
        .arg(dir.join("out"))
        .args(["--jobs", "1", "--rounds", "1", "--work", "1"])
        .output()
        .expect("host build");
    assert!(host.status.success());
    let host_out = String::from_utf8_lossy(&host.stdout);
    let done = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("build: done"))
            .and_then(|l| l.split("checksum=").nth(1))
            .map(|c| c.trim().to_string())
    };
    let host_sum = done(&host_out).expect("host checksum");

    let img = image(
        "mount -t ext4 -o ro /dev/vda /mnt || exit 20\n\
         echo files=$(find /mnt -type f | wc -l)\n\
         touch /mnt/x 2>/dev/null && exit 21\n\
         tmem-work build --src /mnt --out /tmp/out --jobs 1 --rounds 1 --work 1\n",
    )
    .build()
    .expect("image");
    let guest = GuestConfig::new("data")
        .memory_mib(192)
        .drive(Drive::file(&img_path).read_only())
        .image(img)
        .launch()
        .expect("launch");
    let code = guest.wait_exit(RUN).expect("exit");
    let log = guest.console_text();
    assert_eq!(code, 0, "console:\n{log}");
    assert!(
        log.contains(&format!("files={}", stats.files)),
        "{stats:?}\n{log}"
    );
    assert_eq!(done(&log).as_deref(), Some(host_sum.as_str()), "{log}");
}

/// Drop kills a guest that would otherwise run forever.
#[test]
fn drop_kills_running_guest() {
    let _s = serial();
    let img = image("tmem-work idle\n").build().expect("image");
    let guest: Guest = GuestConfig::new("dropme")
        .memory_mib(128)
        .qmp(false)
        .balloon(false)
        .image(img)
        .launch()
        .expect("launch");
    let pid = guest.pid();
    assert!(guest.is_running());
    drop(guest);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Either gone, or (pid reused) not our QEMU.
    assert!(
        stat.is_empty() || !stat.contains("qemu"),
        "QEMU {pid} still alive: {stat}"
    );
}

/// The cgroup option puts QEMU into a memory cgroup the lab can limit.
#[test]
fn guest_runs_in_memory_cgroup() {
    let _s = serial();
    let cg = MemCgroup::create(
        &format!("tmem-vm-test-{}", std::process::id()),
        Some(1 << 30),
    )
    .expect("memory cgroup");
    let img = image("tmem-work memcheck --mib 32\n")
        .build()
        .expect("image");
    let guest = GuestConfig::new("cgroup")
        .memory_mib(128)
        .cgroup(cg.path())
        .image(img)
        .launch()
        .expect("launch");
    assert_eq!(cg.pids().expect("pids"), vec![guest.pid()]);
    let code = guest.wait_exit(RUN).expect("exit");
    assert_eq!(code, 0, "{}", guest.console_text());
    drop(guest);
    let dir = cg.path().to_path_buf();
    drop(cg);
    assert!(!dir.exists(), "cgroup {} not removed", dir.display());
}
