//! End-to-end tests: the real tmemd and tmemctl binaries, curl, qemu-io, qemu-img, nbdinfo.

mod common;

use common::*;
use tmem_api::{ErrorBody, ExportInfo, Stats, Status};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tmemd-test")
        .tempdir()
        .unwrap()
}

fn err_body(body: &str) -> ErrorBody {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
}

#[test]
fn exports_via_cli_and_curl_with_qemu_io_nbdinfo_metrics_and_top() {
    let t = tmp();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--budget", "256M"]);

    // Status through curl, typed.
    let (code, body) = d.curl("GET", "/api/v1/status", None);
    assert_eq!(code, 200, "{body}");
    let st: Status = serde_json::from_str(&body).unwrap();
    assert_eq!(st.budget, 256 << 20);
    assert_eq!(st.pid, d.pid());
    assert!(st.warnings.is_empty());

    // A swap export through tmemctl, a cached one through curl.
    let o = d.ctl(&[
        "export", "add", "swap0", "--kind", "swap", "--size", "64M", "--client", "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&d.nbd_uri("swap0")), "{}", stdout(&o));
    let img = t.path().join("disk.raw");
    std::fs::write(&img, pattern(8 << 20, 3)).unwrap();
    let (code, body) = d.curl(
        "POST",
        "/api/v1/exports",
        Some(&format!(
            r#"{{"name":"disk0","kind":"cached","image":"{}"}}"#,
            img.display()
        )),
    );
    assert_eq!(code, 201, "{body}");
    let e: ExportInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(e.size, 8 << 20);

    // nbdinfo lists both.
    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", dir.join("nbd.sock").display()),
        ],
    );
    assert!(list.contains("export=\"swap0\""), "{list}");
    assert!(list.contains("export=\"disk0\""), "{list}");

    // Write and read back through qemu-io.
    let swap = d.nbd_uri("swap0");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0xc3 40M 1M",
            &swap,
        ],
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 4M",
            "-c",
            "read -P 0xc3 40M 1M",
            "-c",
            "read -P 0 8M 1M",
            &swap,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The cached export reads the image.
    let copy = t.path().join("copy.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &d.nbd_uri("disk0"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(read_all(&copy) == read_all(&img));
    qemu_img_compare(img.to_str().unwrap(), &d.nbd_uri("disk0"));

    // Listings.
    let o = d.ctl(&["exports", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Vec<ExportInfo> = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = v.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["disk0", "swap0"]);
    let sw = &v[1];
    assert_eq!((sw.client, sw.size), (7, 64 << 20));
    assert!(
        sw.nbd.writes >= 2 && sw.nbd.bytes_written >= 5 << 20,
        "{sw:?}"
    );
    assert!(sw.backend.pool_pages >= 1280, "{sw:?}");
    let dk = &v[0];
    assert!(dk.backend.sectors_read >= (8 << 20) / 512, "{dk:?}");

    // Stats JSON has the clients.
    let o = d.ctl(&["stats", "--json"]);
    let s: Stats = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(s
        .clients
        .iter()
        .any(|c| c.id == 7 && c.persistent.pages >= 1280));
    assert!(s.pool.logical_bytes >= 5 << 20);

    // Metrics: Prometheus text with the expected series.
    let (code, text) = d.curl("GET", "/metrics", None);
    assert_eq!(code, 200);
    let samples = parse_prometheus(&text);
    let has = |name: &str, label: &str| {
        samples
            .iter()
            .any(|(n, l, _)| n == name && l.contains(label))
    };
    for (n, l) in [
        ("tmem_budget_bytes", ""),
        ("tmem_held_bytes", ""),
        ("tmem_logical_bytes", ""),
        ("tmem_physical_bytes", ""),
        ("tmem_pages", "kind=\"persistent\""),
        ("tmem_dedup_ratio", ""),
        ("tmem_compression_ratio", ""),
        ("tmem_fragmentation_ratio", ""),
        ("tmem_client_ops_total", "client=\"7\""),
        ("tmem_pool_ops_total", "label=\"swap:swap0\""),
        (
            "tmem_export_nbd_requests_total",
            "export=\"swap0\",op=\"write\"",
        ),
        ("tmem_swap_spilled_pages", "export=\"swap0\""),
        ("tmem_cached_sectors_total", "export=\"disk0\",dir=\"read\""),
    ] {
        assert!(has(n, l), "missing {n}{{{l}}} in\n{text}");
    }
    let budget = samples
        .iter()
        .find(|(n, _, _)| n == "tmem_budget_bytes")
        .unwrap()
        .2;
    assert_eq!(budget, (256u64 << 20) as f64);

    // top --once: header, clients, exports.
    let o = d.ctl(&["top", "--once", "--interval", "0.2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let frame = stdout(&o);
    assert!(frame.starts_with("tmem pool  budget 256M"), "{frame}");
    for want in [
        "dedup",
        "compression",
        "fragmentation",
        "freeable",
        "Clients",
        "Exports",
        "Guests",
        "swap0",
        "disk0",
        "PUTS/s",
        "NBD OPS/s",
    ] {
        assert!(frame.contains(want), "missing {want} in\n{frame}");
    }
    assert!(frame.lines().any(|l| l.starts_with("7 ")), "{frame}");

    // Budget, shrink, freeze/thaw.
    let o = d.ctl(&["budget", "set", "512M"]);
    assert!(
        o.status.success() && stdout(&o).contains("budget 512M"),
        "{}",
        stderr(&o)
    );
    assert!(d.ctl(&["shrink", "1M"]).status.success());
    let o = d.ctl(&["freeze", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A frozen client's puts are refused: the swap export spills instead of failing.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 16M 1M", &swap],
    );
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 16M 1M", &swap],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(d.ctl(&["thaw", "7"]).status.success());
    let (code, body) = d.curl("DELETE", "/api/v1/clients/7", None);
    assert_eq!(code, 409, "{body}");

    // Remove an export: gone from the NBD list.
    let o = d.ctl(&["export", "rm", "disk0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", dir.join("nbd.sock").display()),
        ],
    );
    assert!(!list.contains("disk0"), "{list}");
    assert!(read_all(&img) == pattern(8 << 20, 3), "image changed");
}

#[test]
fn error_paths_return_typed_errors() {
    let t = tmp();
    let d = Tmemd::start(&t.path().join("s"), &["--budget", "64M"]);
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/api/v1/exports/nope", None, 404, "Unknown export"),
        (
            "DELETE",
            "/api/v1/exports/nope",
            None,
            404,
            "Unknown export",
        ),
        (
            "POST",
            "/api/v1/clients/42/freeze",
            None,
            404,
            "Unknown client 42",
        ),
        (
            "DELETE",
            "/api/v1/clients/42",
            None,
            404,
            "Unknown client 42",
        ),
        (
            "POST",
            "/api/v1/clients/x/thaw",
            None,
            400,
            "Invalid path parameter",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some("{bad json"),
            400,
            "Invalid JSON body",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some(r#"{"name":"a","kind":"swap","size":"12Q"}"#),
            400,
            "Invalid size",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some(r#"{"name":"a","kind":"swap"}"#),
            400,
            "needs a size",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some(r#"{"name":"a/b","kind":"swap","size":4096}"#),
            400,
            "export name",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some(r#"{"name":"a","kind":"disk","size":4096}"#),
            400,
            "unknown variant",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some(r#"{"name":"a","kind":"swap","size":4096,"extra":1}"#),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/api/v1/exports",
            Some(r#"{"name":"c","kind":"cached","image":"/nonexistent/img"}"#),
            404,
            "Cannot open image",
        ),
        (
            "PUT",
            "/api/v1/budget",
            Some(r#"{"bytes":"lots"}"#),
            400,
            "Invalid size",
        ),
        (
            "POST",
            "/api/v1/shrink",
            Some(r#"{}"#),
            400,
            "missing field",
        ),
        ("DELETE", "/api/v1/guests/nope", None, 404, "Unknown guest"),
        (
            "POST",
            "/api/v1/guests",
            Some(r#"{"name":"g","qmp":"/nonexistent.sock"}"#),
            502,
            "QMP",
        ),
        ("GET", "/api/v1/nothing", None, 404, "No resource"),
        ("GET", "/api/v2/status", None, 404, "No resource"),
        ("DELETE", "/api/v1/status", None, 405, "not allowed"),
        ("POST", "/metrics", None, 405, "not allowed"),
    ];
    for (m, p, b, code, msg) in cases {
        let (c, body) = d.curl(m, p, *b);
        assert_eq!(c, *code, "{m} {p}: {body}");
        let e = err_body(&body);
        assert_eq!(e.chain.first(), Some(&e.error), "{body}");
        assert!(
            e.chain.iter().any(|l| l.contains(msg)),
            "{m} {p}: want {msg:?} in {body}"
        );
    }
    // Conflicts.
    let (c, _) = d.curl(
        "POST",
        "/api/v1/exports",
        Some(r#"{"name":"a","kind":"swap","size":"1M"}"#),
    );
    assert_eq!(c, 201);
    let (c, body) = d.curl(
        "POST",
        "/api/v1/exports",
        Some(r#"{"name":"a","kind":"swap","size":"1M"}"#),
    );
    assert_eq!(c, 409, "{body}");
    let (c, _) = d.curl("POST", "/api/v1/clients", Some(r#"{"id":9}"#));
    assert_eq!(c, 201);
    let (c, body) = d.curl("POST", "/api/v1/clients", Some(r#"{"id":9}"#));
    assert_eq!(c, 409, "{body}");
    let (c, _) = d.curl("DELETE", "/api/v1/clients/9", None);
    assert_eq!(c, 204);
    // Oversized body.
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(2 << 20));
    let (c, body) = d.curl("POST", "/api/v1/clients", Some(&big));
    assert_eq!(c, 413, "{body}");

    // tmemctl: bad sizes are refused locally, server errors print the chain, exit non-zero.
    let o = d.ctl(&["budget", "set", "12Q"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Invalid size"), "{}", stderr(&o));
    let o = d.ctl(&["export", "rm", "nope"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Unknown export \"nope\""),
        "{}",
        stderr(&o)
    );
    let o = d.ctl(&["freeze", "1234"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("HTTP 404"), "{}", stderr(&o));
    let o = d.ctl(&[
        "export",
        "add",
        "b",
        "--kind",
        "cached",
        "--image",
        "/nonexistent/img",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("No such file"), "{}", stderr(&o));
    // No daemon: a clear error.
    let o = ctl(&t.path().join("nowhere"), &["status"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Cannot connect to tmemd"),
        "{}",
        stderr(&o)
    );
    // The daemon is still fine.
    let (c, _) = d.curl("GET", "/api/v1/status", None);
    assert_eq!(c, 200);
}

#[test]
fn restart_loses_no_swap_data() {
    let t = tmp();
    let dir = t.path().join("state");
    // A budget smaller than the data: part of it goes to the spill file.
    let args = ["--budget", "6M"];
    let t0 = std::time::Instant::now();
    let mut d = Tmemd::start(&dir, &args);
    let o = d.ctl(&["export", "add", "swap0", "--kind", "swap", "--size", "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.ctl(&[
        "export", "add", "swap1", "--kind", "swap", "--size", "8M", "--codec", "zstd",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ref0 = t.path().join("ref0.raw");
    let ref1 = t.path().join("ref1.raw");
    std::fs::write(&ref0, pattern(16 << 20, 11)).unwrap();
    std::fs::write(&ref1, pattern(8 << 20, 12)).unwrap();
    for (r, n) in [(&ref0, "swap0"), (&ref1, "swap1")] {
        qemu_img_write(r.to_str().unwrap(), &d.nbd_uri(n));
        qemu_img_compare(r.to_str().unwrap(), &d.nbd_uri(n));
    }
    let v: Vec<ExportInfo> = serde_json::from_str(&stdout(&d.ctl(&["exports", "--json"]))).unwrap();
    assert!(
        v.iter().any(|e| e.backend.spilled_pages > 0),
        "expected spilled pages: {v:?}"
    );
    assert!(v.iter().all(|e| e.backend.pool_pages > 0), "{v:?}");

    eprintln!("written and compared in {:?}", t0.elapsed());
    let st = d.terminate();
    eprintln!("stopped at {:?}", t0.elapsed());
    assert!(st.success(), "exit {st:?}\n{}", d.log_text());
    assert!(!dir.join("ctl.sock").exists() && !dir.join("nbd.sock").exists());
    assert!(dir.join("state/manifest.json").exists());

    for round in 0..3 {
        // The last round restarts with a budget below what the saved pages need.
        let low = ["--budget", "1M"];
        let mut d = Tmemd::start(&dir, if round == 2 { &low } else { &args });
        let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
        if round < 2 {
            assert!(st.warnings.is_empty(), "round {round}: {:?}", st.warnings);
        } else {
            assert!(
                !st.warnings.is_empty()
                    && st.warnings.iter().all(|w| w.contains("over the budget")),
                "{:?}",
                st.warnings
            );
        }
        assert_eq!(st.exports, 2);
        for (r, n) in [(&ref0, "swap0"), (&ref1, "swap1")] {
            qemu_img_compare(r.to_str().unwrap(), &d.nbd_uri(n));
        }
        let s: Stats = serde_json::from_str(&stdout(&d.ctl(&["stats", "--json"]))).unwrap();
        assert!(s.pool.persistent_pages > 0);
        let st = d.terminate();
        assert!(st.success(), "round {round}: exit {st:?}\n{}", d.log_text());
    }
}

#[test]
fn corrupt_state_is_reported_and_moved_aside() {
    let t = tmp();
    let dir = t.path().join("state");
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    assert!(d
        .ctl(&["export", "add", "s", "--kind", "swap", "--size", "4M", "--client", "3"])
        .status
        .success());
    let data = t.path().join("d.raw");
    std::fs::write(&data, pattern(4 << 20, 5)).unwrap();
    qemu_img_write(data.to_str().unwrap(), &d.nbd_uri("s"));
    assert!(d.terminate().success());

    // Flip bytes in the middle of the client's save stream.
    let stream = dir.join("state/client-3.tmem");
    let mut bytes = read_all(&stream);
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&stream, &bytes).unwrap();

    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
    assert!(
        st.warnings
            .iter()
            .any(|w| w.contains("Corrupt state file") && w.contains("client-3.tmem")),
        "{:?}",
        st.warnings
    );
    assert!(dir.join("state/client-3.tmem.corrupt").exists());
    assert!(!stream.exists());
    assert!(d.log_text().contains("Corrupt state file"));
    // The export is back (empty) and usable.
    assert_eq!(st.exports, 1);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "read -P 1 0 64k",
            &d.nbd_uri("s"),
        ],
    );
    let o = d.ctl(&["status"]);
    assert!(
        stdout(&o).contains("warning: Corrupt state file"),
        "{}",
        stdout(&o)
    );
    assert!(d.terminate().success());

    // A corrupt manifest: start empty, move it aside.
    std::fs::write(
        dir.join("state/manifest.json"),
        b"{\"version\": 1, \"clean\": tr",
    )
    .unwrap();
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
    assert!(
        st.warnings
            .iter()
            .any(|w| w.contains("Saved state is unusable")),
        "{:?}",
        st.warnings
    );
    assert!(dir.join("state/manifest.json.corrupt").exists());
    assert_eq!(st.exports, 0);
    assert!(d.terminate().success());
}

#[test]
fn second_daemon_on_same_dir_is_refused() {
    let t = tmp();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--budget", "64M"]);
    let mut second = Tmemd::spawn(&dir, &["--budget", "64M"]);
    let st = second.wait_exit();
    assert!(!st.success());
    assert!(
        second.log_text().contains("in use by another tmemd"),
        "{}",
        second.log_text()
    );
    // The first one still serves on its sockets.
    let (c, _) = d.curl("GET", "/api/v1/status", None);
    assert_eq!(c, 200);
    drop(second);
}

#[test]
fn runtime_and_state_directories_are_separate() {
    let t = tmp();
    let run = t.path().join("run");
    let state = t.path().join("lib");
    let mut d = Tmemd::start_split(&run, &state, &["--budget", "4M", "--codec", "none"]);
    // Sockets and lock in the runtime dir; spill files and saved state in the state dir.
    for f in ["ctl.sock", "nbd.sock", "tmemd.lock"] {
        assert!(run.join(f).exists(), "{f} not in {}", run.display());
    }
    assert!(!state.join("ctl.sock").exists() && !state.join("nbd.sock").exists());
    let o = run_ok(
        tmemctl_bin().to_str().unwrap(),
        &["--runtime-dir", run.to_str().unwrap(), "status", "--json"],
    );
    let st: Status = serde_json::from_str(&o).unwrap();
    assert_eq!(
        (st.state_dir.as_path(), st.runtime_dir.as_path()),
        (state.as_path(), run.as_path())
    );
    assert_eq!(st.nbd_socket, run.join("nbd.sock"));
    let o = d.ctl(&["export", "add", "s", "--kind", "swap", "--size", "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("socket={}", run.join("nbd.sock").display())));
    let data = t.path().join("d.raw");
    std::fs::write(&data, pattern(8 << 20, 21)).unwrap();
    run_ok("nbdcopy", &[data.to_str().unwrap(), &d.nbd_uri("s")]);
    assert!(state.join("spill/s.spill").exists());
    assert!(state.join("state/manifest.json").exists());
    assert!(!run.join("spill").exists() && !run.join("state").exists());

    // Another daemon on the same state dir but its own runtime dir is refused.
    let run2 = t.path().join("run2");
    let mut second = Tmemd::spawn_with(
        &state,
        &["--budget", "4M"],
        Launch {
            runtime: Some(&run2),
            ..Default::default()
        },
    );
    assert!(!second.wait_exit().success());
    assert!(
        second.log_text().contains("in use by another tmemd"),
        "{}",
        second.log_text()
    );
    drop(second);

    // A clean restart brings the data back from the state dir.
    assert!(d.terminate().success());
    assert!(!run.join("ctl.sock").exists());
    let d = Tmemd::start_split(&run, &state, &["--budget", "4M", "--codec", "none"]);
    qemu_img_compare(data.to_str().unwrap(), &d.nbd_uri("s"));
}

#[test]
fn config_file_and_metrics_tcp() {
    let t = tmp();
    let dir = t.path().join("state");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let port = free_port();
    let nbd_port = free_port();
    let cfg = t.path().join("tmemd.toml");
    std::fs::write(
        &cfg,
        format!("budget = \"96M\"\ncodec = \"zstd:3\"\nmetrics_addr = \"127.0.0.1:{port}\"\nnbd_tcp_allow_plain = true\n[balloon]\ninterval_ms = 500\n"),
    )
    .unwrap();
    let nbd_tcp = format!("127.0.0.1:{nbd_port}");
    let d = Tmemd::start(
        &dir,
        &["--config", cfg.to_str().unwrap(), "--nbd-tcp", &nbd_tcp],
    );
    let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
    assert_eq!(st.budget, 96 << 20);
    assert_eq!(st.nbd_tcp.as_deref(), Some(nbd_tcp.as_str()));
    // Exports are served on the NBD TCP listener too; the codec default comes from the file.
    assert!(d
        .ctl(&["export", "add", "t0", "--kind", "swap", "--size", "1M"])
        .status
        .success());
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{nbd_tcp}")]);
    assert!(list.contains("export=\"t0\""), "{list}");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 3 0 64k",
            "-c",
            "read -P 3 0 64k",
            &format!("nbd://{nbd_tcp}/t0"),
        ],
    );
    let manifest = std::fs::read_to_string(dir.join("state/manifest.json")).unwrap();
    assert!(manifest.contains("\"codec\": \"zstd:3\""), "{manifest}");
    let out = run_ok(
        "curl",
        &["-sS", &format!("http://127.0.0.1:{port}/metrics")],
    );
    let samples = parse_prometheus(&out);
    assert!(samples
        .iter()
        .any(|(n, _, v)| n == "tmem_budget_bytes" && *v == (96u64 << 20) as f64));
    let out = run(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/api/v1/status"),
        ],
    );
    assert_eq!(stdout(&out), "404");

    // An unknown key is refused with the file named.
    std::fs::write(&cfg, "budgett = 1\n").unwrap();
    let mut bad = Tmemd::spawn(
        &t.path().join("other"),
        &["--config", cfg.to_str().unwrap()],
    );
    assert!(!bad.wait_exit().success());
    assert!(
        bad.log_text().contains("Invalid config file"),
        "{}",
        bad.log_text()
    );
}

/// A private tmux server (its own socket name), killed on every path.
struct Tmux(String);

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["-L", self.0.as_str()];
        a.extend_from_slice(args);
        run("tmux", &a)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_live_view_in_tmux() {
    if tmem_vm::test_tool("tmux").is_none() {
        return;
    }
    let t = tmp();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--budget", "128M"]);
    assert!(d
        .ctl(&["export", "add", "live0", "--kind", "swap", "--size", "8M"])
        .status
        .success());
    let tmux = Tmux(format!("tmemd-test-{}", std::process::id()));
    let cmd = format!(
        "{} --state-dir {} top --interval 0.2",
        tmemctl_bin().display(),
        dir.display()
    );
    let o = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut screen = String::new();
    let shown = wait_until(std::time::Duration::from_secs(30), || {
        screen = stdout(&tmux.cmd(&["capture-pane", "-p", "-t", "top"]));
        screen.contains("tmem pool") && screen.contains("live0")
    });
    assert!(shown, "live view not shown:\n{screen}");
    assert!(screen.contains("q quits"), "{screen}");
    // Traffic shows up on a later refresh.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 1M", &d.nbd_uri("live0")],
    );
    let updated = wait_until(std::time::Duration::from_secs(30), || {
        screen = stdout(&tmux.cmd(&["capture-pane", "-p", "-t", "top"]));
        screen
            .lines()
            .any(|l| l.contains("live0") && l.contains(" 256 "))
    });
    assert!(updated, "pool pages not updated:\n{screen}");
    let o = tmux.cmd(&["send-keys", "-t", "top", "q"]);
    assert!(o.status.success());
    let gone = wait_until(std::time::Duration::from_secs(30), || {
        !tmux.cmd(&["has-session", "-t", "top"]).status.success()
    });
    assert!(gone, "q did not quit the live view");
}

/// A paused QEMU with a balloon device (no guest OS), killed by PID on every path.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn guests_are_managed_over_the_api_with_real_qemu() {
    use tmem_api::GuestInfo;
    if tmem_vm::test_tool("qemu-system-x86_64").is_none() {
        return;
    }
    let t = tmp();
    let qmp = t.path().join("qmp.sock");
    let child = std::process::Command::new("qemu-system-x86_64")
        .args([
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
        .args(["-device", "virtio-balloon-pci,id=balloon0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let _qemu = Qemu(child);
    assert!(wait_until(std::time::Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&qmp).is_ok()
    }));
    let cfg = t.path().join("tmemd.toml");
    std::fs::write(&cfg, "budget = \"64M\"\n[balloon]\ninterval_ms = 200\n").unwrap();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--config", cfg.to_str().unwrap()]);

    let q = qmp.to_str().unwrap();
    let o = d.ctl(&["guest", "add", "vm0", "--qmp", q, "--policy", "static"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("static"), "{}", stdout(&o));
    let o = d.ctl(&["guest", "add", "vm0", "--qmp", q]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));

    let mut g: Vec<GuestInfo> = Vec::new();
    let seen = wait_until(std::time::Duration::from_secs(30), || {
        g = serde_json::from_str(&stdout(&d.ctl(&["guests", "--json"]))).unwrap();
        g.len() == 1 && g[0].intervals >= 2 && g[0].actual == 256 << 20
    });
    assert!(seen, "{g:?}");
    assert_eq!((g[0].max, g[0].policy.as_str()), (256 << 20, "static"));
    // The manager moves the pool budget, never above the operator's budget.
    let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
    assert!(st.budget <= 64 << 20, "{}", st.budget);
    let (_, text) = d.curl("GET", "/metrics", None);
    let samples = parse_prometheus(&text);
    assert!(
        samples
            .iter()
            .any(|(n, l, v)| n == "tmem_guest_balloon_actual_bytes"
                && l == "guest=\"vm0\""
                && *v == (256u64 << 20) as f64),
        "{text}"
    );
    assert!(samples
        .iter()
        .any(|(n, l, _)| n == "tmem_guest_balloon_target_bytes" && l == "guest=\"vm0\""));
    let o = d.ctl(&["top", "--once", "--interval", "0.1"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("vm0") && l.contains("256M")),
        "{}",
        stdout(&o)
    );

    // Managed guests are in the manifest: a restart (clean or not) re-attaches them.
    let mut d = d;
    assert!(d.terminate().success());
    let d = Tmemd::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let g: Vec<GuestInfo> = serde_json::from_str(&stdout(&d.ctl(&["guests", "--json"]))).unwrap();
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0].name, "vm0");
    let mut d = d;
    d.kill9();
    let d = Tmemd::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let g: Vec<GuestInfo> = serde_json::from_str(&stdout(&d.ctl(&["guests", "--json"]))).unwrap();
    assert_eq!(g.len(), 1, "after kill -9: {g:?}");
    let o = d.ctl(&["guest", "rm", "vm0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g: Vec<GuestInfo> = serde_json::from_str(&stdout(&d.ctl(&["guests", "--json"]))).unwrap();
    assert!(g.is_empty(), "{g:?}");
}

#[test]
fn crash_leaves_stale_sockets_and_serves_the_pages_back() {
    let t = tmp();
    let dir = t.path().join("state");
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    assert!(d
        .ctl(&["export", "add", "s", "--kind", "swap", "--size", "4M"])
        .status
        .success());
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 0 1M", &d.nbd_uri("s")],
    );
    // A clean restart first: the pages are saved and restored.
    assert!(d.terminate().success());
    let mut d = Tmemd::start(&dir, &["--budget", "64M"]);
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x42 0 1M", &d.nbd_uri("s")],
    );
    assert!(!out.contains("verification failed"), "{out}");
    // Now a crash: SIGKILL leaves both sockets behind.
    let mut c = d.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(dir.join("ctl.sock").exists() && dir.join("nbd.sock").exists());
    let d = Tmemd::start(&dir, &["--budget", "64M"]);
    let st: Status = serde_json::from_str(&d.curl("GET", "/api/v1/status", None).1).unwrap();
    // The export is back with its pages, recovered from the durable pool memory the killed
    // daemon left (durable.rs and crash.rs test this in depth; without durable memory the
    // pages would be poisoned, never served as zeros).
    assert_eq!(st.exports, 1);
    assert!(st.damaged_exports.is_empty(), "{st:?}");
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x42 0 1M", &d.nbd_uri("s")],
    );
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn export_with_open_connections_is_not_deleted_unless_forced() {
    let t = tmp();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--budget", "64M"]);
    assert!(d
        .ctl(&["export", "add", "s", "--kind", "swap", "--size", "4M"])
        .status
        .success());
    // An interactive qemu-io keeps its NBD connection open until its stdin closes.
    let mut client = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &d.nbd_uri("s")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    let live = || {
        let e: ExportInfo =
            serde_json::from_str(&d.curl("GET", "/api/v1/exports/s", None).1).unwrap();
        e.nbd.live_connections
    };
    assert!(wait_until(std::time::Duration::from_secs(20), || live() == 1));
    let o = d.ctl(&["export", "rm", "s"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("open NBD connections"),
        "{}",
        stderr(&o)
    );
    let (code, _) = d.curl("DELETE", "/api/v1/exports/s", None);
    assert_eq!(code, 409);
    // Once the client is gone the count drops and the export can go.
    drop(client.stdin.take());
    let _ = client.wait();
    assert!(wait_until(std::time::Duration::from_secs(20), || live() == 0));
    let e: ExportInfo = serde_json::from_str(&d.curl("GET", "/api/v1/exports/s", None).1).unwrap();
    assert_eq!(e.nbd.connections, 1, "the total stays");
    // Forced, it goes even with a client connected.
    let mut client = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &d.nbd_uri("s")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    assert!(wait_until(std::time::Duration::from_secs(20), || live() == 1));
    let o = d.ctl(&["export", "rm", "s", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(client.stdin.take());
    let _ = client.wait();
}

#[test]
fn slow_http_clients_do_not_lock_out_the_control_api() {
    let t = tmp();
    let dir = t.path().join("state");
    let d = Tmemd::start(&dir, &["--budget", "64M"]);
    let sock = dir.join("ctl.sock");
    // 100 clients that connect and then send nothing, or half a request head.
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        if i % 2 == 0 {
            use std::io::Write;
            s.write_all(b"GET /api/v1/stats HTTP/1.1\r\nHo").unwrap();
        }
        idle.push(s);
    }
    // The operator still gets an answer, every time.
    for _ in 0..3 {
        let o = d.ctl(&["stats", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s: Stats = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(s.pool.budget, 64 << 20);
    }
    drop(idle);
}
