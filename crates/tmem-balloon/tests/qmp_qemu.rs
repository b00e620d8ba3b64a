//! QMP client against a real QEMU (paused q35 machine, TCG, no guest kernel).
//! Skips with a message when `qemu-system-x86_64` is not installed.
#![cfg(feature = "host")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use tmem_balloon::manager::{
    ActuatorError, GuestLoop, GuestSpec, HostProbe, ManagerConfig, NoPool, PoolControl, QmpHandle,
    Shared, StatsSource,
};
use tmem_balloon::policy::{GovernorConfig, HostView, PolicyKind, SelfBalloonConfig};
use tmem_balloon::qemu::{balloon_device_args, BalloonDeviceOpts};
use tmem_balloon::qmp::{QmpClient, QmpError};
use tmem_balloon::GuestStats;

const MIB: u64 = 1 << 20;

/// A QEMU process we started; killed (by PID) and reaped on every path.
struct Qemu {
    child: Child,
    dir: PathBuf,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str) -> Option<Qemu> {
    let bin = tmem_vm::test_tool("qemu-system-x86_64")?;
    let dir = std::env::temp_dir().join(format!("tmem-balloon-qemu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmpdir");
    let qmp = dir.join("qmp.sock");
    let mut cmd = Command::new(bin);
    cmd.args([
        "-M",
        "q35",
        "-S",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "256",
    ])
    .args(balloon_device_args(&BalloonDeviceOpts::default()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = cmd.spawn().expect("spawn qemu");
    let q = Qemu { child, dir, qmp };
    wait_for(&q.qmp);
    Some(q)
}

/// Wait until QEMU accepts connections (the socket file appears before listen()).
fn wait_for(p: &Path) {
    let end = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(p).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn qmp_balloon_qom_and_events() {
    let Some(q) = start("main") else { return };
    let mut c = QmpClient::connect(&q.qmp, Duration::from_secs(20)).expect("connect");
    assert!(c.greeting()["QMP"]["version"]["qemu"]["major"]
        .as_u64()
        .is_some());

    // Balloon: logical size equals RAM; a request is accepted even without a guest driver.
    assert_eq!(c.query_balloon().expect("query-balloon"), 256 * MIB);
    c.balloon(128 * MIB).expect("balloon");
    assert_eq!(
        c.query_balloon().expect("query-balloon"),
        256 * MIB,
        "no driver: unchanged"
    );

    // QOM guest stats: polling can be set; without a guest every stat is unset.
    let path = BalloonDeviceOpts::default().qom_path();
    c.set_stats_polling(&path, 2).expect("qom-set");
    let (s, last) = c.guest_stats(&path, 1).expect("qom-get guest-stats");
    assert_eq!(last, 0);
    assert_eq!((s.total, s.available, s.major_faults), (None, None, None));

    // Typed errors.
    match c.execute("no-such-command", None) {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected CommandNotFound, got {other:?}"),
    }
    assert!(matches!(
        c.guest_stats("/machine/peripheral/nope", 0),
        Err(QmpError::Command { .. })
    ));

    // Events interleaved with replies are captured: cont → RESUME, stop → STOP.
    c.execute("cont", None).expect("cont");
    let _ = c.query_balloon().expect("query after cont");
    let ev = c
        .wait_event("RESUME", Duration::from_secs(20))
        .expect("wait");
    assert!(ev.is_some(), "RESUME event captured");
    c.execute("stop", None).expect("stop");
    assert!(c
        .wait_event("STOP", Duration::from_secs(20))
        .expect("wait")
        .is_some());
    // Still in sync after events.
    assert_eq!(c.query_balloon().expect("query"), 256 * MIB);
}

#[test]
fn qmp_peer_gone_is_an_error_not_a_panic() {
    let Some(mut q) = start("gone") else { return };
    let mut c = QmpClient::connect(&q.qmp, Duration::from_secs(20)).expect("connect");
    let _ = q.child.kill();
    let _ = q.child.wait();
    let r = c.query_balloon();
    assert!(
        matches!(
            r,
            Err(QmpError::Closed) | Err(QmpError::Io(_)) | Err(QmpError::Timeout)
        ),
        "{r:?}"
    );
    assert!(matches!(
        QmpClient::connect(q.dir.join("missing.sock"), Duration::from_secs(1)),
        Err(QmpError::Connect(_))
    ));
}

struct Script(Arc<Mutex<u64>>);
impl StatsSource for Script {
    fn name(&self) -> &'static str {
        "script"
    }
    fn poll(&mut self, _: Instant) -> Result<Option<GuestStats>, ActuatorError> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += 1000;
        Ok(Some(GuestStats {
            t_ms: *t,
            total: Some(250 * MIB),
            available: Some(200 * MIB),
            committed: Some(20 * MIB),
            major_faults: Some(0),
            ..Default::default()
        }))
    }
}

struct Host;
impl HostProbe for Host {
    fn sample(&self) -> HostView {
        HostView {
            total: 8 << 30,
            available: 4 << 30,
            psi: None,
            share_target: None,
        }
    }
}

/// The manager against a real QEMU whose guest never runs a balloon driver:
/// the `balloon` request is accepted but `actual` never moves, so the guest is
/// reported stuck instead of being chased forever.
#[test]
fn manager_reports_stuck_guest_against_real_qemu() {
    let Some(q) = start("mgr") else { return };
    let qmp = QmpHandle::new(
        &q.qmp,
        BalloonDeviceOpts::default().qom_path(),
        2,
        Duration::from_secs(20),
    );
    let gov = GovernorConfig {
        policy: PolicyKind::SelfBalloon(SelfBalloonConfig {
            reserved_mb: Some(0),
            ..Default::default()
        }),
        stuck_after: 3,
        stuck_backoff: 100,
        ..Default::default()
    };
    let spec = GuestSpec {
        name: "vm0".into(),
        max: 256 * MIB,
        governor: gov,
        actuator: Box::new(qmp.clone()),
        sources: vec![
            Box::new(Script(Arc::default())),
            Box::new(qmp.stats_source()),
        ],
    };
    let shared = Shared::default();
    let mut gl = GuestLoop::new(spec, Instant::now());
    shared.register(&gl);
    let pool = NoPool::default();
    let cfg = ManagerConfig {
        interval_ms: 1000,
        host_reserve: 1 << 30,
        host_total: None,
        pool_min: 0,
    };
    for _ in 0..6 {
        gl.step(&cfg, &Host, &pool, &shared);
    }
    let s = gl.status();
    assert_eq!(s.errors, 0, "{:?}", s.last_error);
    assert_eq!(s.actual, 256 * MIB, "no guest driver: actual unchanged");
    assert!(s.stuck, "{:?}", s.last_decision);
    assert_eq!(
        s.live_sources,
        vec!["script".to_string()],
        "QMP guest-stats never updated"
    );
    assert_eq!(s.target, s.actual, "stuck: not chased");
    // Budget = 8 GiB - 1 GiB reserve - 256 MiB guest.
    assert_eq!(pool.budget(), (7 << 30) - 256 * MIB);
}
