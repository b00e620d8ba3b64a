//! Benchmark of the remote tier (`scripts/bench-remote`; BENCHMARKS.md §5). `#[ignore]`d:
//! it runs only when asked for, e.g.
//! `cargo test --release -p tmem-itest --test remote_bench -- --ignored --nocapture`.
//!
//! One run on a three-host [`Fleet`] (network namespaces on one machine, veths on a bridge,
//! a six-node Redis Cluster, replicas on other hosts), every tmemd on host 0:
//!
//! 1. **local pool**: a swap export of 64 MiB of random data in a 256 MiB pool;
//! 2. **remote tier**: the same data in an 8 MiB pool with `[remote]` on the cluster
//!    (`replicas = 1`): most pages live in Redis, reads of them are Redis GETs;
//! 3. **spill file**: the same data in an 8 MiB pool without `[remote]`: most pages live
//!    in the export's spill file (state directory, under the test's temp dir);
//!
//! each read with fio's nbd engine, 4 KiB random reads at depth 1 (latency) and depth 16
//! (IOPS), configurations interleaved within each rep. Codec `none` and dedup `off`
//! everywhere (the data is incompressible anyway) and `durable_pool = false` (the fixture's
//! runtime directory is the state directory, on disk), so the only difference is where
//! the pages live.
//!
//! 4. **cached export**: a 64 MiB random image behind a cached export (8 MiB pool,
//!    `--direct-io`), read twice sequentially (`nbdcopy … null:`), with and without the
//!    remote tier; after the second pass: misses, remote hits, their share, the image
//!    bytes read.
//!
//! Physical reference: `redis-benchmark` (one client, no pipelining) GET of a 4 KiB value
//! over the namespace link (from another host) and to the host's own node.
//!
//! Settings (environment): `TMEM_BENCH_REPS` (3), `TMEM_BENCH_SECS` (10, per fio job),
//! `TMEM_BENCH_OUT` (`target/bench-remote`): `remote.md` and `remote.json` go there.
//! Needs root, `ip`, `redis-server`, `redis-cli`, `fio` (with its nbd engine), `nbdcopy`;
//! `redis-benchmark` is optional. Nothing here asserts a timing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tmem_api::{BackendCounters, ExportInfo, Stats};
use tmem_itest::daemon::{daemon_bins, run, DaemonBins, Tmemd};
use tmem_itest::fleet::{Fleet, FleetOptions};
use tmem_itest::{TempDir, MIB};

/// Bytes of data per export and of the cached image.
const DATA: u64 = 64 * MIB;

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Writes `len` bytes of xorshift64* output (incompressible) to `path`.
fn random_file(path: &Path, len: u64, seed: u64) {
    let mut x = seed | 1;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create data file"));
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..len / buf.len() as u64 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            c.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        f.write_all(&buf).expect("write data file");
    }
    f.flush().expect("flush data file");
}

fn uri(d: &Tmemd, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", d.nbd_socket().display())
}

fn stats(d: &Tmemd) -> Stats {
    d.get("/api/v1/stats").expect("GET /api/v1/stats")
}

fn export(d: &Tmemd, name: &str) -> ExportInfo {
    stats(d)
        .exports
        .into_iter()
        .find(|e| e.name == name)
        .expect("export listed")
}

/// utime + stime of `pid`, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = text.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_default()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// One fio run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct FioResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// 4 KiB random reads of the whole export for `secs` (after a 1 s ramp), fio nbd engine,
/// `jobs` connections (figures summed over them) of `depth` requests in flight each.
fn fio_randread(uri: &str, depth: u32, jobs: u32, secs: u64) -> FioResult {
    let out = run(Command::new("fio")
        .args([
            "--name=randread",
            "--ioengine=nbd",
            "--rw=randread",
            "--bs=4k",
            "--norandommap",
            "--randrepeat=0",
            "--time_based",
            "--ramp_time=1",
            "--output-format=json",
            "--group_reporting",
        ])
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--uri={uri}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={secs}")))
    .expect("fio");
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON.
    let start = text.find('{').expect("fio JSON");
    let v: Value = serde_json::from_str(&text[start..]).expect("fio JSON parses");
    let r = &v["jobs"][0]["read"];
    let pct = |k: &str| r["clat_ns"]["percentile"][k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    FioResult {
        iops: r["iops"].as_f64().unwrap_or(f64::NAN),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    }
}

/// A swap-export configuration under test.
struct SwapCase {
    key: &'static str,
    title: &'static str,
    d: Tmemd,
}

/// NBD reads and pages served by the remote tier between two snapshots of an export.
/// (A swap export counts no pool hits or misses; with uniform random reads the pool's share
/// follows from the placement.)
fn delta(a: &ExportInfo, b: &ExportInfo) -> (u64, u64) {
    (
        b.nbd.reads - a.nbd.reads,
        b.backend.remote_hits - a.backend.remote_hits,
    )
}

/// Median and (min, max) of the finite values.
fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `median (min–max)`, or the median alone for one rep.
fn cell(v: &[f64]) -> String {
    let (m, lo, hi) = summary(v);
    if v.len() < 2 {
        fmt_num(m)
    } else {
        format!("{} ({}–{})", fmt_num(m), fmt_num(lo), fmt_num(hi))
    }
}

fn ratio(a: &[f64], b: &[f64]) -> String {
    let (ma, _, _) = summary(a);
    let (mb, _, _) = summary(b);
    if ma.is_finite() && mb.is_finite() && mb != 0.0 {
        format!("{:.2}×", ma / mb)
    } else {
        "n/a".into()
    }
}

/// Waits until the tier's demotion counters stop moving (1 s unchanged, at most 30 s).
fn wait_demotions_settle(d: &Tmemd) {
    let count = || {
        stats(d)
            .remote
            .map(|r| r.demoted_pages + r.demote_dropped)
            .unwrap_or(0)
    };
    let mut last = count();
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1));
        let now = count();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Sequential read of the whole export to `null:`; returns the wall time in seconds.
fn read_through(uri: &str) -> f64 {
    let t = Instant::now();
    run(Command::new("nbdcopy").args(["--no-extents", uri, "null:"])).expect("nbdcopy read");
    t.elapsed().as_secs_f64()
}

/// One cached-export run: two sequential passes; the second pass's figures.
fn cached_run(
    bins: &DaemonBins,
    state: &Path,
    image: &Path,
    remote: Option<&str>,
    netns: &str,
) -> BTreeMap<&'static str, f64> {
    let mut cfg =
        String::from("budget = \"8M\"\ncodec = \"none\"\ndedup = \"off\"\ndurable_pool = false\n");
    if let Some(r) = remote {
        cfg.push_str(r);
    }
    let d = Tmemd::start_in(bins, state, &cfg, Some(netns)).expect("start tmemd (cached)");
    d.ctl(&[
        "export",
        "add",
        "img",
        "--kind",
        "cached",
        "--image",
        &image.display().to_string(),
        "--direct-io",
    ])
    .expect("export add cached");
    let u = uri(&d, "img");
    let pass1 = read_through(&u);
    if remote.is_some() {
        wait_demotions_settle(&d);
    }
    let s1 = stats(&d);
    let a = export(&d, "img");
    let pass2 = read_through(&u);
    let b = export(&d, "img");
    let s2 = stats(&d);
    let c = |f: fn(&BackendCounters) -> u64| (f(&b.backend) - f(&a.backend)) as f64;
    let misses = c(|x| x.misses);
    let remote_hits = c(|x| x.remote_hits);
    let mut m = BTreeMap::new();
    m.insert("pass1_s", pass1);
    m.insert("pass2_s", pass2);
    m.insert("pass2_mib_s", DATA as f64 / MIB as f64 / pass2);
    m.insert("misses", misses);
    m.insert("hits", c(|x| x.hits));
    m.insert("remote_hits", remote_hits);
    m.insert("remote_misses", c(|x| x.remote_misses));
    m.insert(
        "share_remote",
        if misses > 0.0 {
            remote_hits / misses
        } else {
            f64::NAN
        },
    );
    m.insert("image_mib_read", c(|x| x.sectors_read) * 512.0 / MIB as f64);
    if let (Some(r1), Some(r2)) = (&s1.remote, &s2.remote) {
        m.insert("demoted_pass1", r1.demoted_pages as f64);
        m.insert("demote_dropped_pass1", r1.demote_dropped as f64);
        m.insert("fetch_p50_us", r2.fetch_p50_us as f64);
        m.insert("fetch_p99_us", r2.fetch_p99_us as f64);
    }
    m
}

/// `redis-benchmark` GET of a 4 KiB value, one client, no pipelining: (p50, p99, avg) µs
/// and requests/s, or `None` (not installed or unparsable).
fn redis_rtt(
    fleet: &Fleet,
    from: usize,
    ip: &str,
    port: u16,
) -> Option<BTreeMap<&'static str, f64>> {
    let mut c = fleet.command(from, "redis-benchmark");
    c.args(["-h", ip, "-p", &port.to_string()]).args([
        "-t", "set,get", "-d", "4096", "-n", "20000", "-c", "1", "-P", "1", "--csv",
    ]);
    let out = run(&mut c).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()?
        .split(',')
        .map(|s| s.trim_matches('"').to_string())
        .collect();
    let row = lines.find(|l| l.starts_with("\"GET\""))?;
    let vals: Vec<f64> = row
        .split(',')
        .map(|s| s.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    let get = |k: &str| {
        header
            .iter()
            .position(|h| h == k)
            .and_then(|i| vals.get(i).copied())
    };
    let mut m = BTreeMap::new();
    m.insert("rps", get("rps")?);
    m.insert("avg_us", get("avg_latency_ms")? * 1000.0);
    m.insert("p50_us", get("p50_latency_ms")? * 1000.0);
    m.insert("p99_us", get("p99_latency_ms")? * 1000.0);
    Some(m)
}

fn prerequisites() -> Option<()> {
    tmem_vm::test_tools(["ip", "redis-server", "redis-cli", "fio", "nbdcopy"])?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        tmem_vm::missing_prerequisite("root", "network namespaces need CAP_SYS_ADMIN");
        return None;
    }
    Some(())
}

#[test]
#[ignore = "benchmark: scripts/bench-remote"]
fn remote_tier_benchmark() {
    if prerequisites().is_none() {
        return;
    }
    let reps = env_u64("TMEM_BENCH_REPS", 3).max(1) as usize;
    let secs = env_u64("TMEM_BENCH_SECS", 10).max(1);
    let out_dir = std::env::var_os("TMEM_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmem_itest::workspace_root().join("target/bench-remote"));
    std::fs::create_dir_all(&out_dir).expect("output dir");
    let root = tmem_itest::workspace_root();
    let commit = sh(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !sh(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_empty();
    let date_start = sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let load_start = loadavg();
    let t_all = Instant::now();

    let exe = std::env::current_exe().expect("test executable path");
    let bins = daemon_bins(&exe).expect("tmemd and tmemctl binaries");
    let profile = if exe.to_string_lossy().contains("/release/") {
        "release"
    } else {
        "debug"
    };
    let tmp = TempDir::new("tmem-bench-remote").expect("temp dir");
    let fs_type = sh(
        "findmnt",
        &[
            "-n",
            "-o",
            "FSTYPE,SOURCE",
            "--target",
            &tmp.path().display().to_string(),
        ],
    );
    let data = tmp.join("data.bin");
    let image = tmp.join("image.raw");
    random_file(&data, DATA, 0x7e57_da7a);
    random_file(&image, DATA, 0x1a6e_5eed);

    let mut fleet = Fleet::start(
        3,
        FleetOptions {
            maxmemory: 512 * MIB,
            ..FleetOptions::default()
        },
    )
    .expect("fleet");
    let seeds = fleet.seeds();
    let nodes_toml = seeds
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let remote_toml = |name: &str| {
        format!("[remote]\nnodes = [{nodes_toml}]\nmode = \"cluster\"\nnode_name = \"{name}\"\nreplicas = 1\n")
    };
    let ns0 = fleet.namespaces()[0].clone();
    let base = "codec = \"none\"\ndedup = \"off\"\ndurable_pool = false\n";

    // The three swap configurations, all on host 0, filled with the same data.
    let mut cases = Vec::new();
    for (key, title, cfg) in [
        ("local", "local pool", format!("budget = \"256M\"\n{base}")),
        (
            "remote",
            "remote tier",
            format!("budget = \"8M\"\n{base}{}", remote_toml("bench-h0")),
        ),
        ("spill", "spill file", format!("budget = \"8M\"\n{base}")),
    ] {
        let d = Tmemd::start_in(&bins, &tmp.join(key), &cfg, Some(&ns0)).expect("start tmemd");
        d.ctl(&["export", "add", "swap", "--kind", "swap", "--size", "64M"])
            .expect("export add swap");
        let t = Instant::now();
        run(Command::new("nbdcopy").arg(&data).arg(uri(&d, "swap"))).expect("nbdcopy fill");
        let e = export(&d, "swap");
        println!(
            "{title}: filled {} MiB in {:.2}s: pool_pages {}, remote_pages {}, spilled_pages {}",
            DATA / MIB,
            t.elapsed().as_secs_f64(),
            e.backend.pool_pages,
            e.backend.remote_pages,
            e.backend.spilled_pages
        );
        cases.push(SwapCase { key, title, d });
    }
    let placement: BTreeMap<&str, Value> = cases
        .iter()
        .map(|c| {
            let b = export(&c.d, "swap").backend;
            (
                c.key,
                json!({"pool_pages": b.pool_pages, "remote_pages": b.remote_pages,
                       "spilled_pages": b.spilled_pages}),
            )
        })
        .collect();
    {
        let r = export(&cases[1].d, "swap").backend;
        assert!(
            r.remote_pages > DATA / 4096 / 2,
            "most pages should live in the remote tier: {r:?}"
        );
        let s = export(&cases[2].d, "swap").backend;
        assert!(
            s.spilled_pages > DATA / 4096 / 2,
            "most pages spilled: {s:?}"
        );
    }
    let spill_file = tmp.join("spill");
    let resident = sh(
        "sh",
        &[
            "-c",
            &format!(
                "fincore -b -n -o RES,SIZE,FILE $(find {} -type f) 2>/dev/null",
                spill_file.display()
            ),
        ],
    );
    println!("spill files' page-cache residency before the runs (fincore):\n{resident}");

    // Redis round trip: the owner of redis-benchmark's key, from another host and its own.
    let mut rtt: BTreeMap<&str, Vec<BTreeMap<&str, f64>>> = BTreeMap::new();
    let owner = if tmem_vm::find_tool("redis-benchmark").is_ok() {
        fleet.primary_for_key("key:__rand_int__").ok()
    } else {
        println!("redis-benchmark not installed: no raw Redis round trip");
        None
    };
    let rtt_round = |rtt: &mut BTreeMap<&str, Vec<BTreeMap<&str, f64>>>| {
        if let Some(o) = &owner {
            let ip = o.addr.ip().to_string();
            let other = (o.host + 1) % fleet.n_hosts();
            for (k, from) in [("other_host", other), ("same_host", o.host)] {
                if let Some(m) = redis_rtt(&fleet, from, &ip, o.addr.port()) {
                    rtt.entry(k).or_default().push(m);
                }
            }
        }
    };

    // Measurements, configurations interleaved within each rep.
    let redis_pids: Vec<u32> = fleet.redis_nodes().iter().map(|n| n.pid).collect();
    let mut m: BTreeMap<(&str, String), Vec<f64>> = BTreeMap::new();
    let mut cached_runs: BTreeMap<&str, Vec<BTreeMap<&str, f64>>> = BTreeMap::new();
    let mut tier_get: Vec<(u64, u64)> = Vec::new();
    for rep in 0..reps {
        println!("rep {}/{reps} (load {})", rep + 1, loadavg());
        rtt_round(&mut rtt);
        for c in &cases {
            let u = uri(&c.d, "swap");
            for (tag, depth, jobs) in [("d1", 1u32, 1u32), ("d16", 16, 1), ("c4", 4, 4)] {
                let a = export(&c.d, "swap");
                let cpu_a = cpu_secs(c.d.pid());
                let redis_a: f64 = redis_pids.iter().map(|&p| cpu_secs(p)).sum();
                let r = fio_randread(&u, depth, jobs, secs);
                let cpu_b = cpu_secs(c.d.pid());
                let redis_b: f64 = redis_pids.iter().map(|&p| cpu_secs(p)).sum();
                let b = export(&c.d, "swap");
                let (reads, remote_hits) = delta(&a, &b);
                let reads = reads.max(1) as f64;
                let share = remote_hits as f64 / reads;
                let mut put = |k: &str, v: f64| {
                    m.entry((c.key, format!("{tag}_{k}"))).or_default().push(v);
                };
                put("p50_us", r.p50_us);
                put("p99_us", r.p99_us);
                put("kiops", r.iops / 1000.0);
                put("tmemd_cpu_us", (cpu_b - cpu_a) * 1e6 / reads);
                put("redis_cpu_us", (redis_b - redis_a) * 1e6 / reads);
                put("remote_share", share);
                if c.key == "remote" && depth == 1 {
                    if let Some(ri) = stats(&c.d).remote {
                        tier_get.push((ri.get_p50_us, ri.get_p99_us));
                    }
                }
                println!(
                    "  {:<12} {tag:>3}: {:>7.1} kIOPS  p50 {:>7.1} µs  p99 {:>7.1} µs  {:.0} % of reads from Redis; tmemd {:.1} µs, redis {:.1} µs CPU/read",
                    c.title,
                    r.iops / 1000.0,
                    r.p50_us,
                    r.p99_us,
                    share * 100.0,
                    (cpu_b - cpu_a) * 1e6 / reads,
                    (redis_b - redis_a) * 1e6 / reads,
                );
            }
        }
        for (key, remote) in [("with_remote", true), ("without_remote", false)] {
            let rt = remote_toml(&format!("bench-h0-cached-{rep}"));
            let state = tmp.join(&format!("cached-{key}-{rep}"));
            let r = cached_run(&bins, &state, &image, remote.then_some(rt.as_str()), &ns0);
            println!("  cached {key}: {r:?}");
            cached_runs.entry(key).or_default().push(r);
        }
    }
    rtt_round(&mut rtt);
    let final_placement: BTreeMap<&str, Value> = cases
        .iter()
        .map(|c| {
            let b = export(&c.d, "swap").backend;
            (
                c.key,
                json!({"pool_pages": b.pool_pages, "remote_pages": b.remote_pages,
                       "spilled_pages": b.spilled_pages, "remote_errors": b.remote_errors,
                       "poisoned_pages": b.poisoned_pages}),
            )
        })
        .collect();
    let remote_info = stats(&cases[1].d).remote;
    let load_end = loadavg();
    let date_end = sh("date", &["-u", "+%H:%M:%S UTC"]);
    drop(cases);
    drop(fleet);

    // ---------------------------------------------------------------- report
    let col =
        |case: &'static str, k: &str| m.get(&(case, k.to_string())).cloned().unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Run {date_start} – {date_end}, commit `{commit}`{}, tmemd built `{profile}`, {reps} rep(s), \
         fio {secs} s per job (+1 s ramp); load average {load_start} at the start, {load_end} at the end; \
         {} CPUs; data and state directories on {fs_type} ({}).\n",
        if dirty { " (+ uncommitted changes)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tmp.path().display(),
    );
    let _ = writeln!(md, "**Swap export, 4 KiB random reads (fio nbd engine), 64 MiB of random data; median (min–max) of the reps:**\n");
    let _ = writeln!(md, "| figure | local pool (256M) | remote tier (8M pool + Redis) | spill file (8M pool + file) | remote ÷ local | spill ÷ local |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- |");
    for (k, label) in [
        ("d1_p50_us", "depth 1 p50 µs"),
        ("d1_p99_us", "depth 1 p99 µs"),
        ("d1_kiops", "depth 1 kIOPS"),
        ("d16_p50_us", "depth 16 p50 µs"),
        ("d16_p99_us", "depth 16 p99 µs"),
        ("d16_kiops", "depth 16 kIOPS"),
        ("c4_p50_us", "4 connections × depth 4: p50 µs"),
        ("c4_p99_us", "4 connections × depth 4: p99 µs"),
        ("c4_kiops", "4 connections × depth 4: kIOPS"),
        ("d1_remote_share", "depth 1: share of reads from Redis"),
        ("d16_remote_share", "depth 16: share of reads from Redis"),
        ("c4_remote_share", "4 × 4: share of reads from Redis"),
        ("d1_tmemd_cpu_us", "depth 1: tmemd CPU µs per read"),
        (
            "d1_redis_cpu_us",
            "depth 1: all Redis nodes' CPU µs per read",
        ),
        ("d16_tmemd_cpu_us", "depth 16: tmemd CPU µs per read"),
        (
            "d16_redis_cpu_us",
            "depth 16: all Redis nodes' CPU µs per read",
        ),
        ("c4_tmemd_cpu_us", "4 × 4: tmemd CPU µs per read"),
        ("c4_redis_cpu_us", "4 × 4: all Redis nodes' CPU µs per read"),
    ] {
        let (l, r, s) = (col("local", k), col("remote", k), col("spill", k));
        // Redis's CPU in the local columns is the cluster's background work: no ratio.
        let ratios = (k.ends_with("_us") || k.ends_with("kiops")) && !k.contains("redis");
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} |",
            cell(&l),
            cell(&r),
            cell(&s),
            if ratios { ratio(&r, &l) } else { String::new() },
            if ratios { ratio(&s, &l) } else { String::new() },
        );
    }
    let _ = writeln!(
        md,
        "\nPlacement after the fill: {}; at the end: {}.",
        serde_json::to_string(&placement).unwrap_or_default(),
        serde_json::to_string(&final_placement).unwrap_or_default()
    );
    if !tier_get.is_empty() {
        let p50: Vec<f64> = tier_get.iter().map(|x| x.0 as f64).collect();
        let p99: Vec<f64> = tier_get.iter().map(|x| x.1 as f64).collect();
        let _ = writeln!(
            md,
            "tmemd's own figure for a persistent page read from Redis (`remote.get_p50_us` / `get_p99_us`, recent window, after each depth-1 run): p50 {} µs, p99 {} µs.",
            cell(&p50),
            cell(&p99)
        );
    }
    if !resident.is_empty() {
        let _ = writeln!(
            md,
            "Spill files' page-cache residency before the runs (`fincore`: resident bytes, size, file):\n\n```\n{resident}\n```"
        );
    }
    if !rtt.is_empty() {
        let _ = writeln!(md, "\n**Raw Redis round trip** (`redis-benchmark -t set,get -d 4096 -n 20000 -c 1 -P 1`, GET row, one run before each rep and one after; median (min–max)):\n");
        let _ = writeln!(md, "| path | p50 µs | p99 µs | avg µs | GETs/s |");
        let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
        for (k, label) in [
            (
                "other_host",
                "another host's namespace → node (veth, bridge, veth)",
            ),
            ("same_host", "the node's own namespace → node"),
        ] {
            if let Some(v) = rtt.get(k) {
                let f = |x: &str| v.iter().map(|m| m[x]).collect::<Vec<f64>>();
                let _ = writeln!(
                    md,
                    "| {label} | {} | {} | {} | {} |",
                    cell(&f("p50_us")),
                    cell(&f("p99_us")),
                    cell(&f("avg_us")),
                    cell(&f("rps"))
                );
            }
        }
        if let (Some(v), Some(lp)) = (
            rtt.get("other_host"),
            m.get(&("local", "d1_p50_us".to_string())),
        ) {
            let p: Vec<f64> = v.iter().map(|m| m["p50_us"]).collect();
            let _ = writeln!(
                md,
                "\nRedis GET p50 (other host) = {} the local pool's depth-1 p50.",
                ratio(&p, lp)
            );
        }
    }
    let _ = writeln!(md, "\n**Cached export, 64 MiB random image, 8 MiB pool, `--direct-io`, read twice sequentially (`nbdcopy --no-extents URI null:`); second pass, median (min–max):**\n");
    let _ = writeln!(md, "| figure | with remote tier | without |");
    let _ = writeln!(md, "| --- | --- | --- |");
    for (k, label) in [
        ("misses", "pool misses (pages)"),
        ("hits", "pool hits (pages)"),
        ("remote_hits", "remote hits (pages)"),
        ("remote_misses", "remote misses (pages)"),
        ("share_remote", "share of misses served remotely"),
        ("image_mib_read", "MiB read from the image"),
        ("pass2_s", "second pass, s"),
        ("pass2_mib_s", "second pass, MiB/s"),
        ("pass1_s", "first pass, s"),
        ("demoted_pass1", "pages demoted after the first pass"),
        (
            "demote_dropped_pass1",
            "demotions dropped after the first pass",
        ),
        ("fetch_p50_us", "tier fetch p50 µs (recent window)"),
        ("fetch_p99_us", "tier fetch p99 µs (recent window)"),
    ] {
        let f = |key: &str| -> Vec<f64> {
            cached_runs
                .get(key)
                .map(|v| v.iter().filter_map(|m| m.get(k).copied()).collect())
                .unwrap_or_default()
        };
        let (w, wo) = (f("with_remote"), f("without_remote"));
        let _ = writeln!(
            md,
            "| {label} | {} | {} |",
            if w.is_empty() { "n/a".into() } else { cell(&w) },
            if wo.is_empty() {
                "n/a".into()
            } else {
                cell(&wo)
            }
        );
    }
    println!("\n{md}");

    let series = |v: &BTreeMap<(&str, String), Vec<f64>>| -> Value {
        let mut o = serde_json::Map::new();
        for ((case, k), vals) in v {
            let (med, lo, hi) = summary(vals);
            o.entry(case.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object")
                .insert(
                    k.clone(),
                    json!({"values": vals, "median": med, "min": lo, "max": hi}),
                );
        }
        Value::Object(o)
    };
    let report = json!({
        "date_start": date_start,
        "date_end": date_end,
        "commit": commit,
        "dirty": dirty,
        "profile": profile,
        "reps": reps,
        "fio_secs": secs,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "filesystem": fs_type,
        "elapsed_s": t_all.elapsed().as_secs_f64(),
        "swap": series(&m),
        "placement_after_fill": placement,
        "placement_end": final_placement,
        "tier_get_p50_p99_us": tier_get,
        "remote_info_end": serde_json::to_value(&remote_info).unwrap_or(Value::Null),
        "redis_rtt": rtt,
        "cached": cached_runs,
        "spill_page_cache": resident,
    });
    std::fs::write(out_dir.join("remote.md"), &md).expect("write remote.md");
    std::fs::write(
        out_dir.join("remote.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write remote.json");
    println!("wrote {}/remote.md and remote.json", out_dir.display());
}
