//! Issue 12, part 1: tmem with a real libvirtd.
//!
//! A private libvirtd (its own mount namespace and sockets, `tmem_itest::libvirt`) runs a
//! TCG domain (busybox guest, direct kernel boot) whose swap disk is a tmemd `swap` export
//! (`<disk type='network'><source protocol='nbd' name=...><host transport='unix' .../>`).
//! The domain is handed to tmemd's balloon manager **through libvirt**
//! (`tmemctl guest add --libvirt DOMAIN --libvirt-uri URI`, policy `selfballoon`, with the
//! in-guest agent on a libvirt `<channel>`); nothing but libvirt talks to its QMP monitor.
//! Then:
//!
//! 1. idle, the domain is ballooned well below its boot size (seen through libvirt);
//! 2. a memory spike larger than the guest (`tmem-work memcheck` of MemTotal) swaps through
//!    the export, the guest gets memory back, every page checks out and no OOM kill
//!    happens;
//! 3. `virsh destroy` makes tmemd drop the guest (no stale guest, also after a tmemd
//!    restart);
//! 4. `virsh start`, register again, then `virsh destroy` + `virsh start` right away (a
//!    restart): tmemd drops the registration of the old run too.
//!
//! Timings are printed, never asserted (timeouts only catch hangs).
//!
//! Run: `cargo test -p tmem-itest --test libvirt_guest -- --nocapture` (as root). Skips
//! (with a message) when libvirtd, virsh, unshare, QEMU, the guest kernel or busybox are
//! missing, or without root; fails instead under `TMEM_REQUIRE_VM=1`.
//! `TMEM_ITEST_KEEP=1` keeps the run directory (logs, console, domain XML).

use std::time::{Duration, Instant};

use tmem_api::{ExportInfo, GuestInfo};
use tmem_balloon::agent::AgentReader;
use tmem_itest::daemon::{daemon_bins, Tmemd};
use tmem_itest::libvirt::{Domain, DomainXml, Libvirtd};
use tmem_itest::vm::GuestCtl;
use tmem_itest::{wait_until, TempDir, MIB};
use tmem_vm::ImageBuilder;

/// Guest size at boot (and its maximum), MiB.
const GUEST_MIB: u32 = 512;
/// Manager interval, ms.
const INTERVAL_MS: u64 = 1000;
/// The manager's agent port and the test's observer port.
const AGENT_PORT: &str = "org.tmem.agent";
const OBS_PORT: &str = "org.tmem.itest.obs";
const CTL_PORT: &str = "org.tmem.itest.ctl";
const MARK_CTL: &str = "LV-CTL-READY";
const MARK_SPIKE: &str = "LV-SPIKE-START";
const MARK_RC: &str = "LV-SPIKE-RC";

/// The guest's loop: two agents, then `memcheck ARGS` commands from the control port.
fn control_script() -> String {
    format!(
        r#"tmem-guest --port {AGENT_PORT} --interval 0.5 >/dev/null 2>&1 &
tmem-guest --port {OBS_PORT} --interval 0.25 >/dev/null 2>&1 &
CTL=
i=0
while [ -z "$CTL" ] && [ $i -lt 200 ]; do
  for d in /sys/class/virtio-ports/*; do
    [ "$(cat $d/name 2>/dev/null)" = {CTL_PORT} ] && CTL=/dev/$(basename $d)
  done
  [ -z "$CTL" ] && sleep 0.1
  i=$((i+1))
done
[ -n "$CTL" ] || {{ echo "LV-WARN no control port"; exit 3; }}
exec 3<"$CTL"
echo {MARK_CTL}
while true; do
  if read -r cmd args <&3; then
    case "$cmd" in
      memcheck) echo {MARK_SPIKE}; tmem-work memcheck $args; echo "{MARK_RC} $?" ;;
      stop) break ;;
      *) echo "LV-WARN unknown command $cmd" ;;
    esac
  else
    sleep 0.2
  fi
done
exit 0
"#
    )
}

/// libvirtd, virsh, unshare, QEMU, the kernel, busybox and root, or `None` after
/// `tmem_vm::missing_prerequisite` (a failure under `TMEM_REQUIRE_VM=1`).
fn prerequisites() -> Option<[std::path::PathBuf; 4]> {
    let tools = tmem_vm::test_tools(["libvirtd", "virsh", "unshare", "qemu-system-x86_64"])?;
    tmem_vm::test_tool("busybox")?;
    tmem_vm::test_kernel()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        tmem_vm::missing_prerequisite("root", "a private libvirtd needs its own mount namespace");
        return None;
    }
    Some(tools)
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

fn console_oom(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            l.contains("Out of memory")
                || l.contains("oom-kill")
                || l.contains("Killed process")
                || l.contains("invoked oom-killer")
        })
        .map(str::to_string)
        .collect()
}

/// Waits until the console file has a line containing `needle` after byte `from`; returns
/// that line and the offset after it, or `None` after `timeout`. Calls `tick` between
/// looks.
fn wait_console(
    path: &std::path::Path,
    from: usize,
    needle: &str,
    timeout: Duration,
    mut tick: impl FnMut(),
) -> Option<(String, usize)> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let text = std::fs::read(path).unwrap_or_default();
        if text.len() > from {
            let mut pos = from;
            for line in text[from..].split_inclusive(|&b| b == b'\n') {
                let complete = line.ends_with(b"\n");
                if !complete {
                    break;
                }
                pos += line.len();
                let l = String::from_utf8_lossy(line);
                if l.contains(needle) {
                    return Some((l.trim().to_string(), pos));
                }
            }
        }
        tick();
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

fn guests(d: &Tmemd) -> Vec<GuestInfo> {
    d.ctl_json(&["guests", "--json"]).expect("tmemctl guests")
}

fn add_guest(d: &Tmemd, name: &str, dom: &str, uri: &str, agent: &std::path::Path) -> String {
    d.ctl(&[
        "guest",
        "add",
        name,
        "--libvirt",
        dom,
        "--libvirt-uri",
        uri,
        "--agent",
        &agent.to_string_lossy(),
        "--policy",
        "selfballoon",
    ])
    .expect("tmemctl guest add --libvirt")
}

#[test]
fn libvirt_domain_is_ballooned_through_libvirt_and_never_left_stale() {
    let Some([libvirtd, virsh, unshare, qemu]) = prerequisites() else {
        return;
    };
    let t0 = Instant::now();
    let tmp = TempDir::new("tmem-lv").expect("temp dir");
    let exe = std::env::current_exe().expect("test executable path");
    let bins = daemon_bins(&exe).expect("tmemd and tmemctl binaries");
    let root = tmem_itest::workspace_root();
    let gb = tmem_vm::build_guest_binaries(&root).expect("static guest binaries");
    let image = ImageBuilder::new()
        .binary("tmem-guest", &gb.tmem_guest)
        .binary("tmem-work", &gb.tmem_work)
        .swap("/dev/vda")
        .script(control_script())
        .build()
        .expect("guest image");

    // tmemd with a 256 MiB pool ceiling and the domain's swap export.
    let config = format!("budget = \"256M\"\n[balloon]\ninterval_ms = {INTERVAL_MS}\n");
    let mut d = Tmemd::start(&bins, &tmp.join("state"), &config).expect("start tmemd");
    d.ctl(&[
        "export", "add", "lv-swap", "--kind", "swap", "--size", "512M",
    ])
    .expect("tmemctl export add");

    // The private libvirtd and the domain.
    let lv = Libvirtd::start(&tmp.join("lv"), &libvirtd, &unshare, &virsh).expect("libvirtd");
    let uri = lv.uri().to_owned();
    let dom_name = format!("tmem-itest-{}", std::process::id());
    let run = tmp.join("g");
    std::fs::create_dir_all(&run).expect("run dir");
    let (console, agent, obs, ctl) = (
        run.join("console.log"),
        run.join("agent.sock"),
        run.join("obs.sock"),
        run.join("ctl.sock"),
    );
    let xml = DomainXml {
        name: dom_name.clone(),
        memory_mib: GUEST_MIB,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        console: console.clone(),
        nbd_disks: vec![(d.nbd_socket(), "lv-swap".into())],
        channels: vec![
            (AGENT_PORT.into(), agent.clone()),
            (OBS_PORT.into(), obs.clone()),
            (CTL_PORT.into(), ctl.clone()),
        ],
        stats_period: 1,
        emulator: qemu,
    }
    .xml();
    let mut dom = Domain::define(&lv, &dom_name, &xml).expect("virsh define");
    dom.start().expect("virsh start");
    eprintln!(
        "libvirtd {} at {uri}; domain {dom_name} (QEMU {:?}) started",
        lv.pid(),
        dom.qemu_pid()
    );
    let (_, mut pos) = wait_console(&console, 0, MARK_CTL, Duration::from_secs(300), || {})
        .unwrap_or_else(|| {
            panic!(
                "the guest did not boot to its control loop:\n{}\nlibvirtd log:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default(),
                lv.log_text()
            )
        });
    let con = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        con.contains("TMEM-SWAP /dev/vda"),
        "swap on the tmemd export is not on:\n{con}"
    );
    let t_boot = t0.elapsed();
    let max = u64::from(GUEST_MIB) * MIB;
    assert_eq!(dom.balloon_current().expect("balloon through libvirt"), max);

    // The test's own view of the guest: the observer agent (OOM kills, swap traffic).
    let obs_agent = AgentReader::spawn(&obs).expect("observer agent");
    assert!(
        wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
            obs_agent.status().latest.is_some()
        }),
        "no report from the observer agent"
    );
    let report = || obs_agent.status().latest.map(|(_, r)| r);
    let boot = report().expect("observer report");
    let mem_total = boot.mem.total.unwrap_or(0);
    assert!(mem_total > 0, "{boot:?}");

    // Register with tmemd through libvirt.
    let out = add_guest(&d, "lv", &dom_name, &uri, &agent);
    assert!(out.contains("selfballoon"), "{out}");
    let g = guests(&d);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0].actuator, "libvirt");
    assert_eq!(g[0].max, max);
    assert_eq!(
        g[0].libvirt.as_ref().map(|l| l.domain.as_str()),
        Some(dom_name.as_str())
    );
    assert!(g[0].qmp.as_os_str().is_empty());
    let t_managed = t0.elapsed();

    // 1. Idle: ballooned well below the boot size (libvirt's balloon.current). Progress:
    //    90 s without any movement is a hang.
    let well_below = max * 3 / 5;
    let mut last = max;
    let mut last_move = Instant::now();
    let idle_low = loop {
        let a = dom.balloon_current().expect("balloon through libvirt");
        if a.abs_diff(last) >= 4 * MIB {
            last = a;
            last_move = Instant::now();
        }
        if a <= well_below {
            break a;
        }
        assert!(
            last_move.elapsed() < Duration::from_secs(90),
            "the idle guest is not ballooned down (at {} MiB); tmemd: {:#?}\ntmemd log:\n{}",
            mib(a),
            guests(&d),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let t_idle = t0.elapsed();
    let g = guests(&d);
    assert!(g[0].reclaimed_bytes > 0, "{g:?}");
    assert!(
        g[0].live_sources.iter().any(|s| s == "libvirt"),
        "libvirt's balloon statistics never arrived: {g:?}"
    );
    assert!(!g[0].gone);

    // 2. A spike larger than the guest: it must swap through the export; watch the
    //    balloon (through libvirt) while it runs.
    let spike_mib = mem_total / MIB;
    let before = report().expect("observer report");
    let nbd_of = |d: &Tmemd| {
        let v: Vec<ExportInfo> = d.ctl_json(&["exports", "--json"]).expect("exports");
        v.into_iter()
            .find(|e| e.name == "lv-swap")
            .map(|e| e.nbd)
            .unwrap_or_default()
    };
    let nbd_before = nbd_of(&d);
    let mut ctl_port = GuestCtl::connect(&ctl, Duration::from_secs(30)).expect("control port");
    ctl_port
        .send(&format!("memcheck --mib {spike_mib} --passes 1 --seed 12"))
        .expect("start the spike");
    let t_spike = t0.elapsed();
    let mut peak = idle_low;
    let mut sample = || {
        if let Ok(a) = dom.balloon_current() {
            peak = peak.max(a);
        }
    };
    let (_, p) = wait_console(
        &console,
        pos,
        MARK_SPIKE,
        Duration::from_secs(60),
        &mut sample,
    )
    .expect("the spike starts");
    pos = p;
    let mut progress = 0usize;
    let rc = loop {
        // memcheck prints per pass; the whole spike gets 20 minutes under TCG.
        let got = wait_console(
            &console,
            pos,
            MARK_RC,
            Duration::from_secs(1200),
            &mut sample,
        );
        match got {
            Some((line, _)) => {
                break line
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(-1)
            }
            None => {
                let len = std::fs::read(&console).map_or(0, |t| t.len());
                assert!(
                    len > progress,
                    "the spike made no progress; tmemd: {:#?}\nconsole:\n{}",
                    guests(&d),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
                progress = len;
            }
        }
    };
    let t_spike_end = t0.elapsed();
    sample();
    let after = report().expect("observer report");
    let g = guests(&d);
    let nbd = nbd_of(&d);
    let written = nbd.bytes_written.saturating_sub(nbd_before.bytes_written);
    let read = nbd.bytes_read.saturating_sub(nbd_before.bytes_read);
    let delta = |f: fn(&tmem_balloon::VmStat) -> Option<u64>| {
        f(&after.vm)
            .unwrap_or(0)
            .saturating_sub(f(&before.vm).unwrap_or(0))
    };
    let (pswpout, pswpin) = (delta(|v| v.pswpout), delta(|v| v.pswpin));
    let oom = after.vm.oom_kill.unwrap_or(0);
    let con = std::fs::read_to_string(&console).unwrap_or_default();
    println!(
        "\n## tmem with a real libvirtd (tmem-itest `libvirt_guest`)\n\n\
         One TCG domain of {GUEST_MIB} MiB (MemTotal {:.0} MiB) under a private libvirtd, swap on \
         a tmemd `swap` export, balloon driven by tmemd through libvirt (selfballoon, \
         {INTERVAL_MS} ms).\n\n\
         | phase | figure |\n|---|---|\n\
         | boot | {:.0} s |\n\
         | idle: ballooned to | {:.0} MiB ({:.0} s after registering) |\n\
         | spike | memcheck {spike_mib} MiB, rc {rc}, {:.0} s |\n\
         | balloon peak during the spike | {:.0} MiB |\n\
         | guest swap out / in | {:.0} / {:.0} MiB (pages ×4 KiB) |\n\
         | written to / read from the export (NBD) | {:.0} / {:.0} MiB |\n\
         | tmemd reclaimed / gave back | {:.0} / {:.0} MiB |\n\
         | OOM kills | {oom} |\n",
        mib(mem_total),
        t_boot.as_secs_f64(),
        mib(idle_low),
        (t_idle - t_managed).as_secs_f64(),
        (t_spike_end - t_spike).as_secs_f64(),
        mib(peak),
        mib(pswpout * 4096),
        mib(pswpin * 4096),
        mib(written),
        mib(read),
        mib(g[0].reclaimed_bytes),
        mib(g[0].given_back_bytes),
    );
    assert_eq!(rc, 0, "memcheck failed (a page lost through swap?):\n{con}");
    assert!(
        pswpout > 0 && written > 0 && pswpin > 0 && read > 0,
        "the spike did not swap through the export (pages out {pswpout}, in {pswpin}; NBD \
         bytes written {written}, read {read})"
    );
    assert_eq!(oom, 0, "OOM kill counted by the guest:\n{con}");
    let ooms = console_oom(&con);
    assert!(ooms.is_empty(), "OOM on the console: {ooms:?}");
    assert!(
        peak >= idle_low + 64 * MIB,
        "the guest was not given memory back: idle {} MiB, peak {} MiB; tmemd: {g:#?}",
        mib(idle_low),
        mib(peak)
    );
    assert!(g[0].given_back_bytes > 0, "{g:?}");
    assert_eq!(g[0].errors, 0, "{g:?}");
    drop(ctl_port);
    drop(obs_agent);

    // 3. virsh destroy: tmemd drops the guest, and a restarted tmemd does not bring it back.
    dom.destroy().expect("virsh destroy");
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            guests(&d).is_empty()
        }),
        "tmemd kept the destroyed domain: {:#?}",
        guests(&d)
    );
    assert!(
        d.log_text().contains("gone guest removed"),
        "{}",
        d.log_text()
    );
    d.stop(Duration::from_secs(30)).expect("tmemd stops");
    d.restart().expect("tmemd restarts");
    assert!(guests(&d).is_empty(), "{:#?}", guests(&d));
    let log = d.log_text();
    assert!(!log.contains("Cannot re-attach"), "{log}");

    // 4. virsh start and register again (the name is free), then destroy and start at once:
    //    the registration belonged to the old run and goes.
    std::fs::write(&console, b"").expect("truncate console");
    dom.start().expect("virsh start again");
    let out = add_guest(&d, "lv", &dom_name, &uri, &agent);
    assert!(out.contains("selfballoon"), "{out}");
    assert_eq!(guests(&d).len(), 1);
    dom.destroy().expect("virsh destroy");
    dom.start().expect("virsh start right away");
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            guests(&d).is_empty()
        }),
        "tmemd kept the registration of the old run: {:#?}",
        guests(&d)
    );
    assert!(dom.is_running());
    dom.destroy().expect("virsh destroy");
    assert!(guests(&d).is_empty());
    println!(
        "virsh destroy, restart and start again: no stale guest; test {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    // Drop order: the domain (destroyed, undefined), libvirtd (stopped), tmemd, the directory.
    drop(dom);
    drop(lv);
}
