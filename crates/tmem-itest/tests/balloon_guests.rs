//! Issue 4, "How it is checked": two real (TCG) QEMU guests managed by the
//! real tmemd's balloon manager (`selfballoon`), each with a swap disk that is
//! a tmemd `swap` export. Idle, both are ballooned down toward their need;
//! then guest A runs the 2008 Xen Summit `eatmem` workload and gets memory
//! back in time: no OOM kill, and eatmem completes.
//!
//! Prints reclaim rate, give-back rate, spike→deflate time, guest swap
//! traffic and the pages the swap exports hold, against the anchors
//! (Proxmox: at most 10 MiB/s per VM; give-back within 2 intervals).
//! Timings are printed, never asserted.
//!
//! Run: `cargo test -p tmem-itest --test balloon_guests -- --nocapture`.
//! Skips (with a message) when QEMU, the guest kernel or busybox are missing; fails
//! instead under `TMEM_REQUIRE_VM=1`.
//! `TMEM_ITEST_KEEP=1` keeps the run directory (logs, consoles);
//! `TMEM_ITEST_RESULTS=FILE` also writes the markdown summary to FILE.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tmem_api::{ExportInfo, GuestInfo, Stats};
use tmem_balloon::policy::selfballoon_floor;
use tmem_itest::daemon::{daemon_bins, Tmemd};
use tmem_itest::figures::{self, GiveBack, Reclaim, TOLERANCE};
use tmem_itest::observe::{Observer, Timeline, Watch};
use tmem_itest::vm::{self, GuestCtl, TestGuest};
use tmem_itest::{wait_until, TempDir, MIB};
use tmem_vm::Drive;

/// Guest size at boot, MiB.
const GUEST_MIB: u32 = 512;
/// Manager interval, ms (short, so the test stays quick under TCG).
const INTERVAL_MS: u64 = 1000;
/// The manager's agent and the observer agent report intervals, s.
const AGENT_S: f64 = 0.5;
const OBS_AGENT_S: f64 = 0.25;
/// The workload: random sizes up to 300 MiB, 4 rounds, sleeps up to 4 s.
/// Seed 3 gives rounds of 211, 65, 267 and 210 MiB.
const EATMEM: &str = "eatmem --max-mib 300 --rounds 4 --sleep-ms 4000 --max-touch 3 --seed 3";
const EATMEM_ROUNDS: usize = 4;
/// Proxmox's anchor: 100 MiB per VM per 10 s.
const PROXMOX_MIB_S: f64 = 10.0;

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// QEMU, the guest kernel and busybox, or `None` after `tmem_vm::missing_prerequisite`
/// (a failure under `TMEM_REQUIRE_VM=1`).
fn prerequisites() -> Option<()> {
    tmem_vm::test_tools(["qemu-system-x86_64", "busybox"])?;
    tmem_vm::test_kernel()?;
    Some(())
}

/// Everything worth printing about one guest.
struct GuestReport {
    name: String,
    max: u64,
    floor: u64,
    idle_low: u64,
    run_low: u64,
    reclaim: Option<Reclaim>,
    reshrink: Option<Reclaim>,
    give_backs: Vec<GiveBack>,
    pswpin: u64,
    pswpout: u64,
    oom_kills: u64,
    info: Option<GuestInfo>,
    export: Option<ExportInfo>,
    /// Most pages the swap export held at once.
    export_peak_pages: u64,
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

#[test]
fn two_guests_balloon_down_idle_and_eatmem_gets_memory_back() {
    if prerequisites().is_none() {
        return;
    }
    let t_test = Instant::now();
    let tmp = TempDir::new("tmem-itest").expect("temp dir");
    let exe = std::env::current_exe().expect("test executable path");
    let bins = daemon_bins(&exe).expect("tmemd and tmemctl binaries");
    let image =
        vm::build_image(&tmem_itest::workspace_root(), AGENT_S, OBS_AGENT_S).expect("guest image");

    // tmemd: a 256 MiB pool ceiling, 1 s manager interval.
    let config = format!("budget = \"256M\"\n[balloon]\ninterval_ms = {INTERVAL_MS}\n");
    let d = Tmemd::start(&bins, &tmp.join("state"), &config).expect("start tmemd");
    for g in ["a", "b"] {
        d.ctl(&[
            "export",
            "add",
            &format!("swap-{g}"),
            "--kind",
            "swap",
            "--size",
            "512M",
        ])
        .expect("tmemctl export add");
    }

    // Two guests, swap on the exports.
    let launch = |name: &str| -> TestGuest {
        vm::launch(
            name,
            image.clone(),
            &tmp.join(name),
            GUEST_MIB,
            Drive::nbd(d.nbd_socket(), format!("swap-{name}")),
        )
        .expect("launch guest")
    };
    let guests = [launch("a"), launch("b")];
    for g in &guests {
        g.guest
            .wait_for_console(vm::MARK_CTL, Duration::from_secs(300))
            .expect("guest boots to its control loop");
        let con = g.guest.console_text();
        assert!(
            con.contains("TMEM-SWAP /dev/vda"),
            "swap on the tmemd export is not on in {}:\n{con}",
            g.guest.name()
        );
    }
    let t_boot = t_test.elapsed();

    // The observer: its own QMP monitor and agent per guest, tmemd's view.
    let watches = guests
        .iter()
        .map(|g| Watch {
            name: g.guest.name().to_string(),
            qmp: g.obs_qmp.clone(),
            agent: g.obs_agent.clone(),
            export: Some(format!("swap-{}", g.guest.name())),
        })
        .collect();
    let obs = Observer::start(watches, Some(d.ctl_socket()), Duration::from_millis(100), 2)
        .expect("observer");
    for g in &guests {
        let name = g.guest.name();
        assert!(
            wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
                obs.agent(name).is_some_and(|a| a.total > 0) && obs.actual(name).is_some()
            }),
            "no observer data from {name}: {:?}\nconsole:\n{}",
            obs.timeline(name).last_error,
            g.guest.console_text()
        );
    }
    let max = u64::from(GUEST_MIB) * MIB;
    for g in &guests {
        assert_eq!(obs.actual(g.guest.name()), Some(max));
    }

    // Hand both guests to tmemd (selfballoon), through tmemctl.
    for g in &guests {
        let out = d
            .ctl(&[
                "guest",
                "add",
                g.guest.name(),
                "--qmp",
                &g.qmp.to_string_lossy(),
                "--agent",
                &g.agent.to_string_lossy(),
                "--policy",
                "selfballoon",
            ])
            .expect("tmemctl guest add");
        assert!(out.contains("selfballoon"), "{out}");
    }
    let t_managed = obs.now();

    // Idle: both are ballooned down and settle. Progress detection: each guest
    // must keep moving until it is settled; 90 s without any movement fails.
    let well_below = max * 3 / 5;
    let idle_deadline = Instant::now() + Duration::from_secs(400);
    let mut last_move = Instant::now();
    let mut last_actuals: Vec<u64> = vec![max; guests.len()];
    loop {
        let mut done = true;
        for (i, g) in guests.iter().enumerate() {
            let tl = obs.timeline(g.guest.name());
            let a = tl.balloon.last().map(|b| b.actual).unwrap_or(max);
            if a.abs_diff(last_actuals[i]) >= TOLERANCE {
                last_actuals[i] = a;
                last_move = Instant::now();
            }
            let recent: Vec<_> = tl
                .balloon
                .iter()
                .copied()
                .filter(|b| b.t >= t_managed)
                .collect();
            done &= a <= well_below && figures::settled(&recent, 8.0);
        }
        if done {
            break;
        }
        let status: Vec<GuestInfo> = d.get("/api/v1/guests").unwrap_or_default();
        assert!(
            Instant::now() < idle_deadline && last_move.elapsed() < Duration::from_secs(90),
            "guests not ballooned down and settled (actual {:?} MiB); tmemd guests: {status:#?}\ntmemd log:\n{}",
            last_actuals.iter().map(|a| a >> 20).collect::<Vec<_>>(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let t_idle_end = obs.now();

    // Guest A runs eatmem; wait round by round (progress), then for its exit code.
    let a = &guests[0];
    let mut ctl = GuestCtl::connect(&a.ctl, Duration::from_secs(30)).expect("control port");
    let con_pos = a.guest.console_len();
    ctl.send(EATMEM).expect("start eatmem");
    let t_eat = obs.now();
    let (_, mut pos) = a
        .guest
        .wait_for_console_from(
            con_pos,
            vm::MARK_EATMEM_START,
            |l| l.contains(vm::MARK_EATMEM_START),
            Duration::from_secs(60),
        )
        .expect("eatmem starts");
    let mut rounds = Vec::new();
    let rc = loop {
        let (line, p) = a
            .guest
            .wait_for_console_from(
                pos,
                "an eatmem round or its exit code",
                |l| l.starts_with("eatmem: round=") || l.starts_with(vm::MARK_EATMEM_RC),
                Duration::from_secs(240),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "eatmem made no progress: {e}\nobserver A: {:?}\ntmemd log:\n{}",
                    obs.agent("a"),
                    d.log_text()
                )
            });
        pos = p;
        if let Some(rc) = line.strip_prefix(vm::MARK_EATMEM_RC) {
            break rc.trim().parse::<i32>().unwrap_or(-1);
        }
        rounds.push((obs.now(), line));
    };
    let t_eat_end = obs.now();

    // Afterwards selfballoon takes the memory back (slowly: the give-back's
    // learned floor decays by 1/64 per interval). Watched, not asserted: wait
    // until A is back near its idle size, stops moving for 30 s, or 150 s pass.
    let idle_low_a =
        figures::min_actual(&obs.timeline("a").balloon, t_managed, t_idle_end).unwrap_or(max);
    let tail_deadline = Instant::now() + Duration::from_secs(150);
    let mut last = obs.actual("a").unwrap_or(max);
    let mut last_move = Instant::now();
    while Instant::now() < tail_deadline && last_move.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        let a = obs.actual("a").unwrap_or(max);
        if a.abs_diff(last) >= TOLERANCE {
            last = a;
            last_move = Instant::now();
        }
        if a <= idle_low_a + 16 * MIB {
            break;
        }
    }
    let t_end = obs.now();

    // Collect.
    let infos: Vec<GuestInfo> = d.ctl_json(&["guests", "--json"]).expect("tmemctl guests");
    let exports: Vec<ExportInfo> = d.ctl_json(&["exports", "--json"]).expect("tmemctl exports");
    let stats: Stats = d.ctl_json(&["stats", "--json"]).expect("tmemctl stats");
    let timelines: Vec<(String, Timeline)> = guests
        .iter()
        .map(|g| (g.guest.name().to_string(), obs.timeline(g.guest.name())))
        .collect();
    drop(obs);
    for (name, tl) in &timelines {
        write_csv(&tmp.join(&format!("timeline-{name}.csv")), tl);
    }
    let consoles: Vec<String> = guests.iter().map(|g| g.guest.console_text()).collect();
    // Orderly end: tmemd lets go of the guests before they power off.
    for g in &guests {
        d.ctl(&["guest", "rm", g.guest.name()])
            .expect("tmemctl guest rm");
    }
    let left: Vec<GuestInfo> = d.ctl_json(&["guests", "--json"]).expect("tmemctl guests");
    assert!(left.is_empty(), "{left:?}");
    let _ = ctl.send("stop");

    let mut reports = Vec::new();
    for (name, tl) in &timelines {
        let boot_total = tl.agent.iter().map(|a| a.total).max().unwrap_or(0);
        // selfballoon's floor is MemTotal-domain; the balloon target adds the
        // kernel's offset (max - MemTotal with deflate-on-oom).
        let floor = selfballoon_floor(max, 0, 0) + max.saturating_sub(boot_total);
        let idle_low = figures::min_actual(&tl.balloon, t_managed, t_idle_end).unwrap_or(max);
        let run_low = figures::min_actual(&tl.balloon, t_managed, t_end).unwrap_or(max);
        let reclaim = figures::reclaim(&tl.balloon, t_managed, t_idle_end, 1.0);
        let reshrink = figures::reclaim(&tl.balloon, t_eat_end, t_end, 1.0);
        let sp = figures::spikes(&tl.agent, t_eat, 32 * MIB);
        let give_backs = figures::give_backs(&sp, &tl.balloon, &tl.manager, OBS_AGENT_S, 30.0);
        let oom_kills = tl.agent.last().map(|a| a.oom_kill).unwrap_or(0);
        reports.push(GuestReport {
            name: name.clone(),
            max,
            floor,
            idle_low,
            run_low,
            reclaim,
            reshrink,
            give_backs,
            pswpin: figures::counter_delta(&tl.agent, 0.0, |a| a.pswpin),
            pswpout: figures::counter_delta(&tl.agent, 0.0, |a| a.pswpout),
            oom_kills,
            info: infos.iter().find(|i| &i.name == name).cloned(),
            export: exports
                .iter()
                .find(|e| e.name == format!("swap-{name}"))
                .cloned(),
            export_peak_pages: tl.export.iter().map(|e| e.pool_pages).max().unwrap_or(0),
        });
    }

    let md = summary(
        &reports,
        &rounds,
        &stats,
        rc,
        [
            t_boot.as_secs_f64(),
            t_managed,
            t_idle_end,
            t_eat,
            t_eat_end,
            t_end,
        ],
        t_test.elapsed(),
    );
    println!("{md}");
    if let Some(p) = std::env::var_os("TMEM_ITEST_RESULTS") {
        if let Err(e) = std::fs::write(&p, &md) {
            eprintln!("cannot write {}: {e}", p.to_string_lossy());
        }
    }

    // The functional facts.
    for (r, con) in reports.iter().zip(&consoles) {
        assert!(
            r.idle_low <= well_below,
            "{}: idle guest not ballooned down well below {} MiB: lowest {} MiB",
            r.name,
            mib(max),
            mib(r.idle_low)
        );
        assert!(
            r.run_low + TOLERANCE >= r.floor,
            "{}: ballooned below the selfballoon floor: {} < {} MiB",
            r.name,
            mib(r.run_low),
            mib(r.floor)
        );
        let tl = &timelines
            .iter()
            .find(|(n, _)| *n == r.name)
            .expect("timeline")
            .1;
        if let Some(m) = tl
            .manager
            .iter()
            .filter(|m| m.target > 0)
            .min_by_key(|m| m.target)
        {
            assert!(
                m.target + TOLERANCE >= r.floor,
                "{}: tmemd target {} MiB below the floor {} MiB",
                r.name,
                mib(m.target),
                mib(r.floor)
            );
        }
        assert_eq!(r.oom_kills, 0, "{}: OOM kill counted by the guest", r.name);
        // ... by an agent that was still alive at the end.
        let last_report = tl.agent.last().map(|a| a.t).unwrap_or(0.0);
        assert!(
            last_report >= t_end - 5.0,
            "{}: observer agent silent since {last_report:.1} s (end {t_end:.1} s)",
            r.name
        );
        let ooms = console_oom(con);
        assert!(ooms.is_empty(), "{}: OOM on the console: {ooms:?}", r.name);
        let info = r.info.as_ref().expect("tmemd lists the guest");
        assert_eq!(info.policy, "selfballoon");
        assert!(
            info.reclaimed_bytes > 0,
            "{}: tmemd reclaimed nothing",
            r.name
        );
    }
    assert_eq!(rc, 0, "eatmem exit code; console:\n{}", consoles[0]);
    assert_eq!(rounds.len(), EATMEM_ROUNDS, "eatmem rounds: {rounds:?}");
    assert!(
        consoles[0].contains(&format!("eatmem: done rounds={EATMEM_ROUNDS}")),
        "eatmem did not finish"
    );
    let ra = &reports[0];
    assert!(
        ra.give_backs.iter().any(GiveBack::deflated),
        "guest A never got memory back: {:?}",
        ra.give_backs
    );
    let info_a = ra.info.as_ref().expect("tmemd lists guest a");
    assert!(info_a.given_back_bytes > 0, "tmemd gave nothing back to a");
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map(|x| format!("{x:.0} {unit}"))
        .unwrap_or_else(|| "—".into())
}

fn summary(
    reports: &[GuestReport],
    rounds: &[(f64, String)],
    stats: &Stats,
    rc: i32,
    t: [f64; 6],
    elapsed: Duration,
) -> String {
    let [t_boot, t_managed, t_idle_end, t_eat, t_eat_end, t_end] = t;
    let interval_s = INTERVAL_MS as f64 / 1000.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Balloon manager with real guests (tmem-itest `balloon_guests`)\n"
    );
    let _ = writeln!(
        s,
        "Two TCG guests, {GUEST_MIB} MiB each, virtio-balloon (free-page-reporting, deflate-on-oom), \
         swap on a tmemd `swap` export (512 MiB), managed by tmemd's balloon manager, policy \
         `selfballoon`, interval {INTERVAL_MS} ms, pool ceiling 256 MiB. Guest A then runs \
         `tmem-work {EATMEM}`. Test runtime {:.0} s (boot {:.0} s; idle phase {:.0} s; eatmem {:.0} s; \
         tail {:.0} s).\n",
        elapsed.as_secs_f64(),
        t_boot,
        t_idle_end - t_managed,
        t_eat_end - t_eat,
        t_end - t_eat_end
    );
    let _ = writeln!(s, "### Idle: ballooned down\n");
    let _ = writeln!(
        s,
        "| guest | boot | lowest idle | floor | reclaim avg | reclaim peak (1 s) | 90 % after | vs Proxmox 10 MiB/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for r in reports {
        match &r.reclaim {
            Some(rc) => {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} MiB/s ({:.0} MiB in {:.1} s) | {:.1} MiB/s | {:.1} s | {:.1}× |",
                    r.name,
                    mib(r.max),
                    mib(r.idle_low),
                    mib(r.floor),
                    rc.avg_mib_s,
                    mib(rc.from - rc.to),
                    rc.t_end - rc.t_start,
                    rc.peak_mib_s,
                    rc.t90,
                    rc.avg_mib_s / PROXMOX_MIB_S
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} MiB | {:.0} MiB | {:.0} MiB | — | — | — | — |",
                    r.name,
                    mib(r.max),
                    mib(r.idle_low),
                    mib(r.floor)
                );
            }
        }
    }
    let _ = writeln!(s, "\n### eatmem on guest A: give-back\n");
    let _ = writeln!(
        s,
        "eatmem exit code {rc}, {} rounds: {}\n",
        rounds.len(),
        rounds
            .iter()
            .map(|(_, l)| l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("mib="))
                .unwrap_or("?")
                .to_string()
                + " MiB")
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "| spike (Committed_AS) | size before | given back | spike→target raised | spike→deflate starts | spike→deflated | give-back rate | within 2 intervals ({:.0} ms)? |",
        2.0 * interval_s * 1000.0
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for g in &reports[0].give_backs {
        if g.already_growing {
            let _ = writeln!(
                s,
                "| +{:.0} MiB at {:.1} s | {:.0} MiB | {:.0} MiB | (balloon still growing from the previous spike) | | | | |",
                mib(g.spike.size()),
                g.spike.t - t_eat,
                mib(g.before),
                mib(g.given()),
            );
            continue;
        }
        let within = match g.done_ms {
            Some(ms) => {
                if ms <= 2.0 * interval_s * 1000.0 {
                    "yes"
                } else {
                    "no"
                }
            }
            None => "no deflate needed",
        };
        let _ = writeln!(
            s,
            "| +{:.0} MiB at {:.1} s | {:.0} MiB | {:.0} MiB | {} | {} | {} | {} | {within} |",
            mib(g.spike.size()),
            g.spike.t - t_eat,
            mib(g.before),
            mib(g.given()),
            fmt_opt(g.decided_ms, "ms"),
            fmt_opt(g.start_ms, "ms"),
            fmt_opt(g.done_ms, "ms"),
            g.rate_mib_s
                .map(|r| format!("{r:.0} MiB/s"))
                .unwrap_or_else(|| "—".into()),
        );
    }
    let _ = writeln!(
        s,
        "\nSpike times are when the observer agent's report (every {OBS_AGENT_S} s) showed the \
         Committed_AS jump; \"target raised\" is sampled from tmemd's API every 0.2 s; balloon \
         sizes every 0.1 s over a second QMP monitor; tmemd's own agent reports every \
         {AGENT_S} s and its manager steps every {INTERVAL_MS} ms, so a spike waits up to \
         {:.1} s before the manager can see it.{}\n",
        AGENT_S + interval_s,
        if reports[0]
            .give_backs
            .iter()
            .any(|g| g.decided_ms.or(g.start_ms).is_some_and(|ms| ms < 0.0))
        {
            " Negative values: tmemd's agent saw the spike before the observer's."
        } else {
            ""
        }
    );
    let _ = writeln!(s, "### After the workload: taken back again\n");
    let ra = &reports[0];
    match &ra.reshrink {
        Some(r) => {
            let _ = writeln!(
                s,
                "Guest A went from {:.0} MiB back to {:.0} MiB in {:.1} s after eatmem ended \
                 (avg {:.1} MiB/s, peak {:.1} MiB/s over 1 s; the give-back's learned floor \
                 decays by 1/64 per interval). Idle size before the workload: {:.0} MiB.\n",
                mib(r.from),
                mib(r.to),
                r.t_end - r.t_start,
                r.avg_mib_s,
                r.peak_mib_s,
                mib(ra.idle_low)
            );
        }
        None => {
            let _ = writeln!(
                s,
                "Guest A did not shrink within {:.0} s after eatmem ended.\n",
                t_end - t_eat_end
            );
        }
    }
    let _ = writeln!(s, "### Guests, swap and the swap exports\n");
    let _ = writeln!(
        s,
        "| guest | lowest (run) | final | tmemd reclaimed | tmemd given back | intervals | errors | pswpin | pswpout | OOM kills | export pages (peak / end) | spilled | NBD writes / reads / trims |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let i = r.info.clone().unwrap_or_default();
        let (pages, spilled, w, rd, tr) = r
            .export
            .as_ref()
            .map(|e| {
                (
                    e.backend.pool_pages,
                    e.backend.spilled_pages,
                    e.nbd.writes,
                    e.nbd.reads,
                    e.nbd.trims + e.nbd.write_zeroes,
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {} | {} | {} | {} | {} | {} / {} | {} | {w} / {rd} / {tr} |",
            r.name,
            mib(r.run_low),
            mib(i.actual),
            mib(i.reclaimed_bytes),
            mib(i.given_back_bytes),
            i.intervals,
            i.errors,
            r.pswpin,
            r.pswpout,
            r.oom_kills,
            r.export_peak_pages,
            pages,
            spilled
        );
    }
    let p = &stats.pool;
    let _ = writeln!(
        s,
        "\nPool at the end: budget {:.0} MiB, {} pages held ({:.1} MiB held, {} persistent).\n",
        mib(p.budget),
        p.pages,
        mib(p.held_bytes),
        p.persistent_pages
    );
    let _ = writeln!(
        s,
        "Anchors: Proxmox reclaims at most 10 MiB/s per VM (100 MiB per 10 s); give-back to a \
         spiking guest should land within 2 intervals ({:.0} s here).",
        2.0 * interval_s
    );
    s
}

/// Writes a guest's timeline as CSV (kept with `TMEM_ITEST_KEEP=1`).
fn write_csv(path: &std::path::Path, tl: &Timeline) {
    let mut s = String::from(
        "kind,t,actual,target,committed,available,swap_used,pswpin,pswpout,oom_kill,export_pages,nbd_trims\n",
    );
    for b in &tl.balloon {
        let _ = writeln!(s, "balloon,{:.3},{},,,,,,,,,", b.t, b.actual);
    }
    for m in &tl.manager {
        let _ = writeln!(s, "manager,{:.3},{},{},,,,,,,,", m.t, m.actual, m.target);
    }
    for a in &tl.agent {
        let _ = writeln!(
            s,
            "agent,{:.3},,,{},{},{},{},{},{},,",
            a.t, a.committed, a.available, a.swap_used, a.pswpin, a.pswpout, a.oom_kill
        );
    }
    for e in &tl.export {
        let _ = writeln!(
            s,
            "export,{:.3},,,,,,,,,{},{}",
            e.t, e.pool_pages, e.nbd_trims
        );
    }
    if let Err(e) = std::fs::write(path, s) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}
