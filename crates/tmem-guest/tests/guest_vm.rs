//! End to end in a real (TCG) guest: `tmem-guest` runs inside a busybox
//! initramfs and reports over a virtio-serial port found by name; the host
//! reads it with `AgentReader`, inflates/deflates the balloon over QMP, reads
//! QOM guest-stats, and runs one manager loop with both sources live.
//!
//! Self-contained (does not use tmem-vm). Skips with a message when QEMU, a
//! kernel in /boot with its modules, busybox or cpio are missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tmem_balloon::agent::AgentReader;
use tmem_balloon::manager::{
    AgentStats, GuestLoop, GuestSpec, ManagerConfig, NoPool, ProcHost, QmpHandle, Shared,
};
use tmem_balloon::policy::{GovernorConfig, PolicyKind};
use tmem_balloon::qemu::{
    agent_channel_args, balloon_device_args, BalloonDeviceOpts, AGENT_PORT_NAME,
};
use tmem_balloon::qmp::QmpClient;

const MIB: u64 = 1 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_tmem-guest");
const MODULES: [&str; 7] = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/virtio/virtio_balloon.ko",
    "kernel/drivers/char/virtio_console.ko",
];

struct Vm {
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("TMEM_KEEP_VM_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn kernel() -> Option<(PathBuf, PathBuf)> {
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    ks.sort();
    for k in ks.into_iter().rev() {
        let ver = k
            .file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")?
            .to_string();
        let m = PathBuf::from("/lib/modules").join(ver);
        if MODULES.iter().all(|x| m.join(x).is_file()) && std::fs::File::open(&k).is_ok() {
            return Some((k, m));
        }
    }
    None
}

fn copy_into(root: &Path, src: &Path, dst_rel: &str) {
    let dst = root.join(dst_rel.trim_start_matches('/'));
    if let Some(p) = dst.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// Shared libraries of the (dynamically linked, debug) agent binary.
fn libs_of(bin: &str) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| {
            let p = l.split("=>").last()?.split_whitespace().next()?;
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect()
}

fn build_initrd(dir: &Path, modules: &Path, busybox: &Path, tail: &str) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "lib/modules"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    copy_into(&root, busybox, "/bin/busybox");
    copy_into(&root, Path::new(BIN), "/tmem-guest");
    for l in libs_of(BIN) {
        copy_into(&root, &l, &l.to_string_lossy());
    }
    let mut ins = String::new();
    for m in MODULES {
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        copy_into(&root, &modules.join(m), &format!("/lib/modules/{name}"));
        ins.push_str(&format!("insmod /lib/modules/{name}\n"));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\nmkdir -p /dev/shm\nmount -t tmpfs tmpfs /dev/shm\n{ins}echo TMEM-INIT-READY\n/tmem-guest --port {AGENT_PORT_NAME} --interval 0.5 &\n{tail}\nsleep 3600\npoweroff -f\n"
    );
    std::fs::write(root.join("init"), init).expect("init");
    let st = Command::new("chmod")
        .arg("755")
        .arg(root.join("init"))
        .status()
        .expect("chmod");
    assert!(st.success());
    let initrd = dir.join("initrd.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            root.display(),
            initrd.display()
        ))
        .status()
        .expect("cpio");
    assert!(st.success(), "initramfs build");
    initrd
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

/// A booted guest: QMP socket, agent socket, optional control socket.
struct Booted {
    vm: Vm,
    qmp: PathBuf,
    agent: PathBuf,
    ctl: PathBuf,
}

const CTL_PORT: &str = "org.tmem.test.ctl";

/// Guest side of the control port: `hog N` writes N MiB to tmpfs, `free` removes it.
const CTL_LOOP: &str = r#"for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = org.tmem.test.ctl ] && CTL=/dev/$(basename $d); done
( exec 3<$CTL; while true; do while read cmd arg <&3; do
  case "$cmd" in hog) dd if=/dev/zero of=/dev/shm/hog bs=1M count=$arg 2>/dev/null; echo HOG-DONE ;; free) rm -f /dev/shm/hog ;; esac
done; sleep 0.2; done ) &"#;

fn boot(name: &str, tail: &str) -> Option<Booted> {
    let [qemu, busybox, _, _] =
        tmem_vm::test_tools(["qemu-system-x86_64", "busybox", "cpio", "gzip"])?;
    let Some((vmlinuz, modules)) = kernel() else {
        tmem_vm::missing_prerequisite(
            "the guest kernel",
            "no readable /boot/vmlinuz-* with virtio modules",
        );
        return None;
    };
    let dir = std::env::temp_dir().join(format!("tmem-guest-vm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmpdir");
    let mut vm = Vm {
        child: None,
        dir: dir.clone(),
    };
    let initrd = build_initrd(&dir, &modules, &busybox, tail);
    let (qmp, agent, ctl) = (
        dir.join("qmp.sock"),
        dir.join("agent.sock"),
        dir.join("ctl.sock"),
    );
    let child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(balloon_device_args(&BalloonDeviceOpts::default()))
        .args(agent_channel_args("tmemag", &agent, AGENT_PORT_NAME))
        .arg("-chardev")
        .arg(format!(
            "socket,id=tmemctl,path={},server=on,wait=off",
            ctl.display()
        ))
        .args([
            "-device",
            &format!("virtserialport,bus=tmemvser0.0,chardev=tmemctl,name={CTL_PORT}"),
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    vm.child = Some(child);
    // The socket files appear before QEMU listens: probe QMP until it accepts.
    wait_until("QEMU sockets", 60, || {
        agent.exists() && ctl.exists() && std::os::unix::net::UnixStream::connect(&qmp).is_ok()
    });
    Some(Booted {
        vm,
        qmp,
        agent,
        ctl,
    })
}

#[test]
fn agent_balloon_and_stats_in_a_real_guest() {
    let Some(b) = boot("stats", "") else { return };
    let (qmp_sock, agent_sock, dir) = (b.qmp.clone(), b.agent.clone(), b.vm.dir.clone());
    let opts = BalloonDeviceOpts::default();
    let reader = AgentReader::spawn(&agent_sock).expect("reader");
    let console = dir.join("console.log");
    let show = || std::fs::read_to_string(&console).unwrap_or_default();
    let end = Instant::now() + Duration::from_secs(240);
    while reader.status().reports < 2 {
        assert!(
            Instant::now() < end,
            "no agent reports; console:\n{}",
            show()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = reader.status();
    let (_, r) = st.latest.clone().expect("report");
    let total = r.mem.total.unwrap_or(0);
    let avail0 = r.mem.available.unwrap_or(0);
    assert!(
        total > 128 * MIB && total <= 256 * MIB,
        "guest MemTotal {total}"
    );
    assert!(r.mem.committed_as.is_some() && r.vm.pgmajfault.is_some());
    assert_eq!(st.bad_lines, 0);

    // 2. Balloon inflates (with BALLOON_CHANGE events) and deflates; QOM stats update.
    let mut q = QmpClient::connect(&qmp_sock, Duration::from_secs(30)).expect("qmp");
    assert_eq!(q.query_balloon().expect("query"), 256 * MIB);
    q.set_stats_polling(&opts.qom_path(), 1).expect("polling");
    q.balloon(192 * MIB).expect("inflate");
    wait_until("inflate to 192 MiB", 240, || {
        q.query_balloon().is_ok_and(|a| a <= 193 * MIB)
    });
    assert!(
        q.take_events().iter().any(|e| e.name == "BALLOON_CHANGE"),
        "BALLOON_CHANGE seen"
    );
    // The agent sees the inflation: with deflate-on-oom=on the balloon's pages
    // stay in MemTotal and show up as used (MemAvailable drops); without it
    // MemTotal shrinks.
    wait_until("agent sees inflation", 120, || {
        reader.fresh(Duration::from_secs(30)).is_some_and(|r| {
            r.mem.total.is_some_and(|t| t + 32 * MIB < total)
                || r.mem.available.is_some_and(|a| a + 32 * MIB < avail0)
        })
    });
    wait_until("QOM guest-stats", 120, || {
        q.guest_stats(&opts.qom_path(), 0)
            .is_ok_and(|(s, last)| last > 0 && s.total.is_some())
    });
    q.balloon(256 * MIB).expect("deflate");
    wait_until("deflate to 256 MiB", 240, || {
        q.query_balloon().is_ok_and(|a| a >= 255 * MIB)
    });
    drop(q);
    drop(reader);

    // 3. One manager loop with both sources live (static policy: no change).
    let qh = QmpHandle::new(&qmp_sock, opts.qom_path(), 1, Duration::from_secs(30));
    let spec = GuestSpec {
        name: "vm".into(),
        max: 256 * MIB,
        governor: GovernorConfig {
            policy: PolicyKind::Static,
            ..Default::default()
        },
        actuator: Box::new(qh.clone()),
        sources: vec![
            Box::new(AgentStats::spawn(&agent_sock, Duration::from_secs(30)).expect("agent")),
            Box::new(qh.stats_source()),
        ],
    };
    let shared = Shared::default();
    let mut gl = GuestLoop::new(spec, Instant::now());
    let cfg = ManagerConfig {
        interval_ms: 1000,
        ..Default::default()
    };
    wait_until("both sources live", 120, || {
        gl.step(&cfg, &ProcHost, &NoPool::default(), &shared);
        gl.status().live_sources.len() == 2
    });
    let s = gl.status();
    assert_eq!(s.live_sources, vec!["agent".to_string(), "qmp".to_string()]);
    assert!(
        s.stats.and_then(|s| s.committed).is_some(),
        "agent fields merged"
    );
    assert_eq!(s.errors, 0, "{:?}", s.last_error);
}

/// Fast give-back on a real guest: the manager squeezes the guest with
/// selfballoon down to a floor, then the guest fills tmpfs; MemAvailable falls
/// under the give-back threshold and the next interval deflates at once.
#[test]
fn give_back_in_a_real_guest() {
    let Some(b) = boot("giveback", CTL_LOOP) else {
        return;
    };
    let opts = BalloonDeviceOpts::default();
    let qh = QmpHandle::new(&b.qmp, opts.qom_path(), 1, Duration::from_secs(30));
    let gov = GovernorConfig {
        policy: PolicyKind::SelfBalloon(Default::default()),
        floor: 160 * MIB,
        shrink_per_interval: 64 * MIB,
        ..Default::default()
    };
    let spec = GuestSpec {
        name: "vm".into(),
        max: 256 * MIB,
        governor: gov,
        actuator: Box::new(qh.clone()),
        sources: vec![
            Box::new(AgentStats::spawn(&b.agent, Duration::from_secs(30)).expect("agent")),
            Box::new(qh.stats_source()),
        ],
    };
    let shared = Shared::default();
    let mut gl = GuestLoop::new(spec, Instant::now());
    let cfg = ManagerConfig {
        interval_ms: 1000,
        ..Default::default()
    };
    let pool = NoPool::default();
    let console = b.vm.dir.join("console.log");
    let tick = |gl: &mut GuestLoop| {
        let next = Instant::now() + Duration::from_millis(cfg.interval_ms);
        gl.step(&cfg, &ProcHost, &pool, &shared);
        gl.settle(
            next.saturating_duration_since(Instant::now()),
            Duration::from_millis(20),
        );
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    };
    // 1. Squeeze to the floor.
    let end = Instant::now() + Duration::from_secs(300);
    tick(&mut gl);
    while gl.status().actual == 0 || gl.status().actual > 170 * MIB {
        assert!(
            Instant::now() < end,
            "not squeezed: {:?}\nconsole:\n{}",
            gl.status(),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        tick(&mut gl);
    }
    let squeezed = gl.status().actual;
    assert!(
        gl.status().last_spike.is_none(),
        "{:?}",
        gl.status().last_decision
    );
    assert!(gl.status().reclaimed_bytes >= 80 * MIB);

    // 2. The guest allocates 60 MiB of tmpfs.
    let mut ctl = std::os::unix::net::UnixStream::connect(&b.ctl).expect("ctl");
    std::io::Write::write_all(&mut ctl, b"hog 60\n").expect("hog");
    let end = Instant::now() + Duration::from_secs(300);
    while gl.status().given_back_bytes == 0 || gl.status().last_spike_to_deflate_ms.is_none() {
        assert!(Instant::now() < end, "no give-back: {:?}", gl.status());
        tick(&mut gl);
    }
    let s = gl.status();
    let spike = s.last_spike.clone().expect("spike");
    assert!(
        spike.cause.contains("MemAvailable") || spike.cause.contains("fault"),
        "{}",
        spike.cause
    );
    assert!(
        s.actual > squeezed,
        "deflated: {} -> {}",
        squeezed,
        s.actual
    );
    assert_eq!(s.errors, 0, "{:?}", s.last_error);
    assert!(
        s.stats.and_then(|x| x.oom_kills).unwrap_or(0) == 0,
        "no OOM kill in the guest"
    );
    eprintln!(
        "give-back: {} -> {} MiB, cause {}, spike->deflate {:?} ms, reclaim {:.1} MiB/s, give-back {:.1} MiB/s",
        squeezed >> 20,
        s.actual >> 20,
        spike.cause,
        s.last_spike_to_deflate_ms,
        s.reclaim_mib_s,
        s.give_back_mib_s
    );
}
