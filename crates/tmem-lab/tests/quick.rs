//! Runs `tmem-lab run --quick` with 2 small guests and one repeat of every configuration
//! (the modern stack's included) under one host budget, plus the density experiment's
//! light-workload pass kept short (at most 2 guests per mode), then checks that the report
//! is complete and internally consistent and that the host's swap, zswap and KSM settings
//! are back. Numbers are not asserted.
//!
//! Needs QEMU and the guest kernel (`scripts/setup`); fails without them under
//! `TMEM_REQUIRE_VM=1`, skipped with a message otherwise.

use std::path::Path;
use std::process::Command;

use tmem_lab::density::DensityWorkload;
use tmem_lab::run::{metric, METRICS};
use tmem_lab::{ConfigKind, Results};

/// Fails under `TMEM_REQUIRE_VM=1` when one is missing, else skips (`tmem_vm::test_tool`).
fn have_vm_tools() -> bool {
    tmem_vm::test_tools(["qemu-system-x86_64", "busybox", "mkfs.ext4"]).is_some()
        && tmem_vm::test_kernel().is_some()
}

#[test]
fn quick_run_report_is_complete_and_consistent() {
    if !have_vm_tools() {
        return;
    }
    let out = std::env::temp_dir().join(format!("tmem-lab-test-{}", std::process::id()));
    let host_before = host_settings();
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_tmem-lab"))
        .args([
            "run",
            "--quick",
            "--density-workloads",
            "light",
            "--density-light-max",
            "2",
            "--density-light-window-secs",
            "10",
            "--density-hold-secs",
            "5",
            "--guests",
            "2",
            "--repeats",
            "1",
            "--memory-mib",
            "256",
            "--data-mib",
            "96",
            "--rounds",
            "1",
            "--eat-rounds",
            "2",
            // Every guest also holds the same files and private text through the workload
            // and checks them at the end: its exit code says whether any page changed.
            "--workload",
            "resident+build+eatmem",
            "--resident-shared-mib",
            "16",
            "--resident-private-mib",
            "16",
            "--settle-secs",
            "15",
            "--budget-mib",
            BUDGET_MIB,
            "--timeout-secs",
            "600",
        ])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("spawning tmem-lab");
    assert!(status.success(), "tmem-lab run failed: {status}");
    assert_eq!(
        host_settings(),
        host_before,
        "the modern rows left host settings changed"
    );
    check(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// Under the statically partitioned share (budget / 2 − 96 MiB QEMU with the default 32 MiB
/// TCG code cache = 254 MiB < 256).
const BUDGET_MIB: &str = "700";

/// zswap, KSM and the swap devices, as text.
fn host_settings() -> String {
    let mut s = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for f in [
        "/sys/module/zswap/parameters/enabled",
        "/sys/module/zswap/parameters/compressor",
        "/sys/kernel/mm/ksm/run",
        "/sys/kernel/mm/ksm/pages_to_scan",
    ] {
        s.push_str(&std::fs::read_to_string(f).unwrap_or_default());
    }
    s
}

fn check(out: &Path) {
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let r: Results = serde_json::from_str(&text).expect("results.json parses");
    assert!(r.errors.is_empty(), "failed runs: {:?}", r.errors);
    assert_eq!(r.params.guests, 2);
    assert_eq!(r.params.budget_mib, 700);
    // Every configuration, with every metric, finite.
    for c in ConfigKind::ALL {
        let s = r.summary(c).unwrap_or_else(|| panic!("no summary for {c}"));
        assert_eq!(s.runs, 1, "{c}");
        for m in METRICS {
            let v = s
                .metrics
                .get(*m)
                .unwrap_or_else(|| panic!("{c}: no metric {m}"));
            assert!(v.is_finite() && *v >= 0.0, "{c}: {m} = {v}");
        }
    }
    assert_eq!(r.runs.len(), ConfigKind::ALL.len());
    for run in &r.runs {
        let c = run.config;
        for m in METRICS {
            assert!(metric(run, m).is_some(), "{c}: {m}");
        }
        assert_eq!(run.failed_guests, 0, "{c}: a guest workload failed");
        // Every configuration idles as long before the workload.
        assert_eq!(run.settle_secs, 15, "{c}");
        // One budget, enforced and measured for every row.
        assert_eq!(run.host_budget, 700 << 20, "{c}");
        assert!(
            run.host_peak_bytes > 0 && run.host_peak_bytes <= run.host_budget,
            "{c}: host peak {} of {}",
            run.host_peak_bytes,
            run.host_budget
        );
        assert!(run.host_pss_bytes > 0, "{c}: no PSS");
        assert_eq!(run.prealloc, c.static_partition(), "{c}");
        if c.static_partition() {
            assert_eq!(run.guest_memory_mib, 254, "{c}: static share");
        } else {
            assert_eq!(run.guest_memory_mib, 256, "{c}");
        }
        assert_eq!(run.stack.is_some(), c.modern_stack(), "{c}");
        if let Some(st) = &run.stack {
            assert_eq!(st.swap_bytes, 512 << 20, "{c}");
            assert!(!st.zswap_compressor.is_empty(), "{c}");
        }
        assert!(run.wall_secs > 0.0, "{c}");
        assert!(run.cpu_secs > 0.0, "{c}");
        assert_eq!(run.guests.len(), 2, "{c}");
        for g in &run.guests {
            assert_eq!(g.exit_code, Some(0), "{c}/{}", g.name);
            assert!(!g.balloon.is_empty(), "{c}/{}: no balloon samples", g.name);
            assert_ne!(g.counters_from, "none", "{c}/{}: no swap counters", g.name);
        }
        // The workload read its data disk.
        assert!(run.guest_sectors_read > 0, "{c}: guests read nothing");
        if c.tmem() {
            // Sectors come from the daemon's counters: the per-export deltas add up.
            assert!(
                run.sectors_source.starts_with("tmemd export counters"),
                "{c}"
            );
            let rd: u64 = run.exports.iter().map(|e| e.sectors_read).sum();
            let wr: u64 = run
                .exports
                .iter()
                .map(|e| e.sectors_written + e.spilled_pages * 8)
                .sum();
            assert_eq!(run.sectors_read, rd, "{c}");
            assert_eq!(run.sectors_written, wr, "{c}");
            assert_eq!(run.exports.len(), 4, "{c}: 2 guests × (swap + data)");
            let misses: u64 = run.exports.iter().map(|e| e.misses).sum();
            let hits: u64 = run.exports.iter().map(|e| e.hits).sum();
            assert!(misses + hits > 0, "{c}: the cached exports saw no reads");
            assert!(run.pool_peak_logical > 0 && run.pool_peak_held > 0, "{c}");
            assert!(!run.pool.is_empty(), "{c}: no pool samples");
            assert!(run.cpu_tmemd_secs > 0.0, "{c}: tmemd CPU not measured");
        } else {
            assert!(run.exports.is_empty(), "{c}");
            assert!(run.pool.is_empty(), "{c}");
            assert_eq!(run.pool_peak_logical, 0, "{c}");
        }
        if matches!(
            c,
            ConfigKind::Unchanged | ConfigKind::Selfballoon | ConfigKind::Modern
        ) {
            assert!(run.sectors_source.contains("query-blockstats"), "{c}");
            // cache=none: backing I/O is what the guests did.
            assert_eq!(run.sectors_read, run.guest_sectors_read, "{c}");
        }
        if !c.selfballoon() {
            assert_eq!(run.cpu_tmemd_secs, 0.0, "{c}");
        }
    }
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for c in ConfigKind::ALL {
        assert!(md.contains(c.label()), "results.md lacks {}", c.label());
    }
    assert!(
        md.contains("the talk"),
        "results.md lacks the talk's figures"
    );
    assert!(
        md.contains("tmem vs the modern stack vs both") && md.contains("loses to modern on"),
        "results.md lacks the head-to-head"
    );
    assert!(md.contains("One host budget for every row: 700 MiB"));
    assert!(
        md.contains("`resident`: every guest loads 16 MiB"),
        "results.md does not describe the resident workload"
    );
    // The pool against its budget, one row per tmem run, each with a verdict.
    let section = md
        .split("## The pool against its budget (workload)")
        .nth(1)
        .expect("results.md lacks the pool-against-budget section");
    let rows = section
        .lines()
        .skip_while(|l| !l.starts_with("| configuration"))
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .count();
    assert_eq!(
        rows,
        ConfigKind::ALL.iter().filter(|c| c.tmem()).count(),
        "{section}"
    );
    check_density_light(&r, &md);
    for f in ["temporal", "sectors", "balloon", "pool", "density"] {
        for ext in ["png", "svg"] {
            let p = out.join(format!("{f}.{ext}"));
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{} missing or empty", p.display());
        }
    }
}

/// The light density pass: every mode measured a slowdown, and the table shows it.
fn check_density_light(r: &Results, md: &str) {
    assert!(r.density.is_none(), "only the light pass was asked for");
    let d = r.density_light.as_ref().expect("no light density pass");
    assert_eq!(d.workload, DensityWorkload::Light);
    let l = d.light.as_ref().expect("no light parameters");
    assert_eq!((l.max, l.window_secs), (2, 10));
    let modes = d.modes();
    assert_eq!(modes.len(), 4);
    for m in modes {
        let name = &m.mode;
        assert!(
            (1..=2).contains(&m.last_stable),
            "{name}: {} stable",
            m.last_stable
        );
        let c = m
            .cycles
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no cycles"));
        let s = c
            .slowdown
            .unwrap_or_else(|| panic!("{name}: no slowdown ({c:?})"));
        assert!(s.is_finite() && s > 0.0, "{name}: slowdown {s}");
        assert!(c.alone_ms.is_some() && c.stable_ms.is_some(), "{name}");
        let row = md
            .lines()
            .find(|line| line.starts_with(&format!("| light | {name} |")))
            .unwrap_or_else(|| panic!("results.md has no light row for {name}"));
        assert!(row.contains('×'), "{name}: no slowdown in {row:?}");
    }
    assert!(md.contains("Density gain of self-ballooning + tmem, light guests"));
    assert!(md.contains("**Slowdown** = the median cycle time"));
}
