//! Prometheus text exposition (format 0.0.4) of the daemon's [`Stats`].

use std::fmt::Write;

use tmem_api::{Ops, Stats};

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    s: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.s, "# HELP {name} {help}");
        let _ = writeln!(self.s, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.s.push_str(name);
        if !labels.is_empty() {
            self.s.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.s.push(',');
                }
                let _ = write!(self.s, "{k}=\"{}\"", esc(val));
            }
            self.s.push('}');
        }
        if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
            let _ = writeln!(self.s, " {}", v as i64);
        } else if v.is_finite() {
            let _ = writeln!(self.s, " {v}");
        } else {
            let _ = writeln!(self.s, " NaN");
        }
    }
    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], v);
    }
}

fn op_list(o: &Ops) -> [(&'static str, u64); 12] {
    [
        ("put", o.puts),
        ("put_refused", o.puts_refused),
        ("get", o.gets),
        ("get_hit", o.get_hits),
        ("get_miss", o.get_misses),
        ("flush", o.flushes),
        ("eviction", o.evictions),
        ("zero_put", o.zero_puts),
        ("same_put", o.same_puts),
        ("dedup_hit", o.dedup_hits),
        ("compressed_put", o.compressed_puts),
        ("raw_put", o.raw_puts),
    ]
}

/// Renders all metrics.
pub fn render(st: &Stats) -> String {
    let mut o = Out { s: String::new() };
    let p = &st.pool;
    o.gauge(
        "tmem_budget_bytes",
        "Pool budget in bytes.",
        p.budget as f64,
    );
    o.gauge(
        "tmem_held_bytes",
        "Bytes really held by the pool (slabs + metadata).",
        p.held_bytes as f64,
    );
    o.gauge(
        "tmem_metadata_bytes",
        "Index and dedup metadata bytes.",
        p.metadata_bytes as f64,
    );
    o.gauge(
        "tmem_logical_bytes",
        "Logical bytes held (pages x 4096).",
        p.logical_bytes as f64,
    );
    o.gauge(
        "tmem_physical_bytes",
        "Payload bytes stored after compression.",
        p.physical_bytes as f64,
    );
    o.gauge(
        "tmem_slab_bytes",
        "Allocator slab bytes.",
        p.slab_bytes as f64,
    );
    o.gauge(
        "tmem_freeable_bytes",
        "Bytes that could be released now.",
        p.freeable_bytes as f64,
    );
    o.gauge(
        "tmem_unique_payloads",
        "Distinct stored payloads after dedup.",
        p.unique_payloads as f64,
    );
    o.gauge(
        "tmem_effective_ratio",
        "Logical bytes / held bytes.",
        p.effective_ratio,
    );
    o.gauge(
        "tmem_compression_ratio",
        "Compression ratio of data pages.",
        p.compression_ratio,
    );
    o.gauge(
        "tmem_dedup_ratio",
        "Data pages / unique payloads.",
        p.dedup_ratio,
    );
    o.gauge(
        "tmem_fragmentation_ratio",
        "Allocator fragmentation (held - payload) / held.",
        p.fragmentation,
    );
    o.gauge(
        "tmem_resident_bytes",
        "Bytes the kernel charges for the pool (regions by mincore + tables).",
        p.resident_bytes as f64,
    );
    o.gauge(
        "tmem_process_rss_bytes",
        "The daemon's whole resident set (VmRSS).",
        p.process_rss_bytes as f64,
    );
    o.gauge(
        "tmem_nbd_buffer_bytes",
        "NBD request buffer bytes reserved now (large payloads and replies in flight).",
        p.nbd_buffer_bytes as f64,
    );
    o.gauge(
        "tmem_compactable_bytes",
        "Bytes compaction could give back now.",
        p.compactable_bytes as f64,
    );
    for (name, help, v) in [
        (
            "tmem_compaction_runs_total",
            "Compaction runs that moved or freed something.",
            p.compaction.runs,
        ),
        (
            "tmem_compaction_moved_pages_total",
            "Payloads moved by compaction.",
            p.compaction.moved,
        ),
        (
            "tmem_compaction_freed_bytes_total",
            "Bytes compaction gave back to the kernel.",
            p.compaction.bytes_freed,
        ),
    ] {
        o.family(name, "counter", help);
        o.sample(name, &[], v as f64);
    }
    o.gauge("tmem_clients", "Number of clients.", p.clients as f64);
    o.gauge("tmem_pools", "Number of pools.", p.pools as f64);
    o.family("tmem_pages", "gauge", "Pages held by kind.");
    for (k, v) in [
        ("ephemeral", p.ephemeral_pages),
        ("persistent", p.persistent_pages),
        ("same_filled", p.same_pages),
    ] {
        o.sample("tmem_pages", &[("kind", k)], v as f64);
    }
    o.family("tmem_ops_total", "counter", "Engine operations.");
    for (op, v) in op_list(&p.ops) {
        o.sample("tmem_ops_total", &[("op", op)], v as f64);
    }

    o.family(
        "tmem_client_pages",
        "gauge",
        "Pages charged to a client by kind.",
    );
    for c in &st.clients {
        let id = c.id.to_string();
        o.sample(
            "tmem_client_pages",
            &[("client", &id), ("kind", "ephemeral")],
            c.ephemeral.pages as f64,
        );
        o.sample(
            "tmem_client_pages",
            &[("client", &id), ("kind", "persistent")],
            c.persistent.pages as f64,
        );
    }
    o.family(
        "tmem_client_charged_bytes",
        "gauge",
        "Bytes charged to a client by kind.",
    );
    for c in &st.clients {
        let id = c.id.to_string();
        o.sample(
            "tmem_client_charged_bytes",
            &[("client", &id), ("kind", "ephemeral")],
            c.ephemeral.charged_bytes as f64,
        );
        o.sample(
            "tmem_client_charged_bytes",
            &[("client", &id), ("kind", "persistent")],
            c.persistent.charged_bytes as f64,
        );
    }
    o.family(
        "tmem_client_frozen",
        "gauge",
        "1 if the client's puts are refused.",
    );
    for c in &st.clients {
        o.sample(
            "tmem_client_frozen",
            &[("client", &c.id.to_string())],
            f64::from(u8::from(c.frozen)),
        );
    }
    o.family(
        "tmem_client_ops_total",
        "counter",
        "Operations of a client.",
    );
    for c in &st.clients {
        let id = c.id.to_string();
        for (op, v) in op_list(&c.ops) {
            o.sample(
                "tmem_client_ops_total",
                &[("client", &id), ("op", op)],
                v as f64,
            );
        }
    }

    o.family("tmem_pool_pages", "gauge", "Pages held in a pool.");
    for pl in &st.pools {
        let id = pl.id.to_string();
        o.sample(
            "tmem_pool_pages",
            &[("pool", &id), ("label", &pl.label)],
            pl.held.pages as f64,
        );
    }
    o.family("tmem_pool_ops_total", "counter", "Operations on a pool.");
    for pl in &st.pools {
        let id = pl.id.to_string();
        for (op, v) in op_list(&pl.ops) {
            o.sample(
                "tmem_pool_ops_total",
                &[("pool", &id), ("label", &pl.label), ("op", op)],
                v as f64,
            );
        }
    }

    o.family("tmem_export_size_bytes", "gauge", "Size of an export.");
    for e in &st.exports {
        let kind = e.kind.to_string();
        o.sample(
            "tmem_export_size_bytes",
            &[("export", &e.name), ("kind", &kind)],
            e.size as f64,
        );
    }
    o.family(
        "tmem_export_pool_pages",
        "gauge",
        "Pages an export holds in the pool.",
    );
    for e in &st.exports {
        o.sample(
            "tmem_export_pool_pages",
            &[("export", &e.name)],
            e.backend.pool_pages as f64,
        );
    }
    o.family(
        "tmem_export_nbd_requests_total",
        "counter",
        "NBD requests to an export.",
    );
    for e in &st.exports {
        for (op, v) in [
            ("read", e.nbd.reads),
            ("write", e.nbd.writes),
            ("flush", e.nbd.flushes),
            ("trim", e.nbd.trims),
            ("write_zeroes", e.nbd.write_zeroes),
        ] {
            o.sample(
                "tmem_export_nbd_requests_total",
                &[("export", &e.name), ("op", op)],
                v as f64,
            );
        }
    }
    o.family(
        "tmem_export_nbd_bytes_total",
        "counter",
        "NBD payload bytes of an export.",
    );
    for e in &st.exports {
        o.sample(
            "tmem_export_nbd_bytes_total",
            &[("export", &e.name), ("dir", "read")],
            e.nbd.bytes_read as f64,
        );
        o.sample(
            "tmem_export_nbd_bytes_total",
            &[("export", &e.name), ("dir", "write")],
            e.nbd.bytes_written as f64,
        );
    }
    o.family(
        "tmem_export_nbd_connections_total",
        "counter",
        "NBD connections to an export.",
    );
    for e in &st.exports {
        o.sample(
            "tmem_export_nbd_connections_total",
            &[("export", &e.name)],
            e.nbd.connections as f64,
        );
    }
    o.family(
        "tmem_export_nbd_live_connections",
        "gauge",
        "NBD connections open to an export now.",
    );
    for e in &st.exports {
        o.sample(
            "tmem_export_nbd_live_connections",
            &[("export", &e.name)],
            e.nbd.live_connections as f64,
        );
    }
    o.family(
        "tmem_export_nbd_errors_total",
        "counter",
        "NBD requests answered with an error.",
    );
    for e in &st.exports {
        o.sample(
            "tmem_export_nbd_errors_total",
            &[("export", &e.name)],
            e.nbd.errors as f64,
        );
    }
    o.family(
        "tmem_swap_spilled_pages",
        "gauge",
        "Swap pages in the spill file.",
    );
    for e in st
        .exports
        .iter()
        .filter(|e| e.kind == tmem_api::ExportKind::Swap)
    {
        o.sample(
            "tmem_swap_spilled_pages",
            &[("export", &e.name)],
            e.backend.spilled_pages as f64,
        );
    }
    o.family(
        "tmem_swap_poisoned_pages",
        "gauge",
        "Swap pages lost at an unclean stop or in a failed spill: reads fail until rewritten.",
    );
    for e in st
        .exports
        .iter()
        .filter(|e| e.kind == tmem_api::ExportKind::Swap)
    {
        o.sample(
            "tmem_swap_poisoned_pages",
            &[("export", &e.name)],
            e.backend.poisoned_pages as f64,
        );
    }
    o.family(
        "tmem_swap_spill_errors_total",
        "counter",
        "Spill-file or page-map writes that failed or were refused for lack of space.",
    );
    for e in st
        .exports
        .iter()
        .filter(|e| e.kind == tmem_api::ExportKind::Swap)
    {
        o.sample(
            "tmem_swap_spill_errors_total",
            &[("export", &e.name)],
            e.backend.spill_errors as f64,
        );
    }
    o.family(
        "tmem_cached_sectors_total",
        "counter",
        "512-byte sectors read from or written to a cached export's image.",
    );
    for e in st
        .exports
        .iter()
        .filter(|e| e.kind == tmem_api::ExportKind::Cached)
    {
        o.sample(
            "tmem_cached_sectors_total",
            &[("export", &e.name), ("dir", "read")],
            e.backend.sectors_read as f64,
        );
        o.sample(
            "tmem_cached_sectors_total",
            &[("export", &e.name), ("dir", "write")],
            e.backend.sectors_written as f64,
        );
    }
    o.family(
        "tmem_cached_lookups_total",
        "counter",
        "Cached export reads served from the pool (hit) or the image (miss).",
    );
    for e in st
        .exports
        .iter()
        .filter(|e| e.kind == tmem_api::ExportKind::Cached)
    {
        o.sample(
            "tmem_cached_lookups_total",
            &[("export", &e.name), ("result", "hit")],
            e.backend.hits as f64,
        );
        o.sample(
            "tmem_cached_lookups_total",
            &[("export", &e.name), ("result", "miss")],
            e.backend.misses as f64,
        );
    }
    o.family(
        "tmem_export_remote_pages_total",
        "counter",
        "Per export: pages served by the remote tier (hit), missed there (miss), \
         demoted to it (demoted), sent to the spill file because it failed (fallback), \
         and reads of remote pages that failed (error).",
    );
    for e in &st.exports {
        let b = &e.backend;
        for (what, v) in [
            ("hit", b.remote_hits),
            ("miss", b.remote_misses),
            ("demoted", b.demoted_pages),
            ("fallback", b.remote_fallbacks),
            ("error", b.remote_errors),
        ] {
            o.sample(
                "tmem_export_remote_pages_total",
                &[("export", &e.name), ("result", what)],
                v as f64,
            );
        }
    }
    o.family(
        "tmem_swap_remote_pages",
        "gauge",
        "Swap pages that live in the remote tier now.",
    );
    for e in st
        .exports
        .iter()
        .filter(|e| e.kind == tmem_api::ExportKind::Swap)
    {
        o.sample(
            "tmem_swap_remote_pages",
            &[("export", &e.name)],
            e.backend.remote_pages as f64,
        );
    }
    if let Some(r) = &st.remote {
        remote(&mut o, r);
    }

    o.family(
        "tmem_guest_balloon_actual_bytes",
        "gauge",
        "Guest balloon size last read.",
    );
    for g in &st.guests {
        o.sample(
            "tmem_guest_balloon_actual_bytes",
            &[("guest", &g.name)],
            g.actual as f64,
        );
    }
    o.family(
        "tmem_guest_balloon_target_bytes",
        "gauge",
        "Guest balloon target last requested.",
    );
    for g in &st.guests {
        o.sample(
            "tmem_guest_balloon_target_bytes",
            &[("guest", &g.name)],
            g.target as f64,
        );
    }
    o.family(
        "tmem_guest_max_bytes",
        "gauge",
        "Guest maximum (boot) size.",
    );
    for g in &st.guests {
        o.sample("tmem_guest_max_bytes", &[("guest", &g.name)], g.max as f64);
    }
    o.family(
        "tmem_guest_stuck",
        "gauge",
        "1 if the guest does not approach its target.",
    );
    for g in &st.guests {
        o.sample(
            "tmem_guest_stuck",
            &[("guest", &g.name)],
            f64::from(u8::from(g.stuck)),
        );
    }
    o.s
}

/// The remote tier's families (present only when one is configured).
fn remote(o: &mut Out, r: &tmem_api::RemoteInfo) {
    o.gauge(
        "tmem_remote_up",
        "1 if the remote tier takes requests (reachable, not backing off).",
        f64::from(u8::from(r.reachable)),
    );
    o.family(
        "tmem_remote_pages_total",
        "counter",
        "Remote tier page operations by kind.",
    );
    for (op, v) in [
        ("demoted", r.demoted_pages),
        ("demote_dropped", r.demote_dropped),
        ("fetched", r.fetch_pages),
        ("fetch_hit", r.fetch_hits),
        ("durable_put", r.durable_puts),
        ("durable_get", r.durable_gets),
        ("not_replicated", r.not_replicated),
    ] {
        o.sample("tmem_remote_pages_total", &[("op", op)], v as f64);
    }
    o.family(
        "tmem_remote_errors_total",
        "counter",
        "Remote tier failures: all errors, timeouts (among them) and corrupt values.",
    );
    for (kind, v) in [
        ("error", r.errors),
        ("timeout", r.timeouts),
        ("corrupt", r.corrupt),
    ] {
        o.sample("tmem_remote_errors_total", &[("kind", kind)], v as f64);
    }
    o.family(
        "tmem_remote_bytes_total",
        "counter",
        "Value bytes sent to and received from the remote tier.",
    );
    o.sample(
        "tmem_remote_bytes_total",
        &[("dir", "sent")],
        r.bytes_sent as f64,
    );
    o.sample(
        "tmem_remote_bytes_total",
        &[("dir", "received")],
        r.bytes_received as f64,
    );
    o.gauge(
        "tmem_remote_stored_bytes",
        "Bytes this daemon stored in the remote tier minus those it deleted (approximate).",
        r.stored_bytes as f64,
    );
    o.family(
        "tmem_remote_latency_seconds",
        "gauge",
        "Remote tier latency over a recent window, by operation and quantile.",
    );
    for (op, q, v) in [
        ("fetch", "0.5", r.fetch_p50_us),
        ("fetch", "0.99", r.fetch_p99_us),
        ("get", "0.5", r.get_p50_us),
        ("get", "0.99", r.get_p99_us),
    ] {
        o.sample(
            "tmem_remote_latency_seconds",
            &[("op", op), ("quantile", q)],
            v as f64 / 1e6,
        );
    }
    if let Some(l) = &r.lend {
        o.gauge(
            "tmem_remote_lend_bytes",
            "What this host lends to the remote tier: its Redis node's maxmemory.",
            l.bytes as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmem_api::{ExportInfo, ExportKind, GuestInfo};

    #[test]
    fn renders_valid_lines() {
        let mut st = Stats::default();
        st.pool.budget = 1 << 30;
        st.pool.effective_ratio = 2.5;
        st.exports.push(ExportInfo {
            name: "a\"b".into(),
            kind: ExportKind::Swap,
            size: 4096,
            client: 1,
            pool: Some(0),
            image: None,
            writable: false,
            uri: String::new(),
            access: Default::default(),
            tls_dir: None,
            backend: Default::default(),
            nbd: Default::default(),
        });
        st.guests.push(GuestInfo {
            name: "g".into(),
            actual: 5,
            ..Default::default()
        });
        let t = render(&st);
        assert!(t.contains("tmem_budget_bytes 1073741824\n"));
        assert!(t.contains("tmem_effective_ratio 2.5\n"));
        assert!(t.contains("tmem_swap_spilled_pages{export=\"a\\\"b\"} 0\n"));
        assert!(t.contains("tmem_guest_balloon_actual_bytes{guest=\"g\"} 5\n"));
        st.pool.resident_bytes = 7 << 20;
        st.pool.compaction.bytes_freed = 8192;
        let t = render(&st);
        assert!(t.contains("tmem_resident_bytes 7340032\n"));
        assert!(t.contains("tmem_compaction_freed_bytes_total 8192\n"));
        assert!(t.contains("# TYPE tmem_compaction_runs_total counter\n"));
        assert!(!t.contains("tmem_remote_up"), "no tier configured");
        st.remote = Some(tmem_api::RemoteInfo {
            reachable: true,
            fetch_p99_us: 1500,
            lend: Some(tmem_api::LendInfo {
                bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        st.exports[0].backend.remote_pages = 3;
        let t = render(&st);
        assert!(t.contains("tmem_remote_up 1\n"));
        assert!(t.contains("tmem_remote_latency_seconds{op=\"fetch\",quantile=\"0.99\"} 0.0015\n"));
        assert!(t.contains("tmem_remote_lend_bytes 67108864\n"));
        assert!(t.contains("tmem_swap_remote_pages{export=\"a\\\"b\"} 3\n"));
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap();
        }
    }
}
