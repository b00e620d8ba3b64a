//! `tmemctl top`: a live, xentop-like view of the pool, its clients, exports and guests.
//!
//! A [`Frame`] is built from two [`Stats`] samples (for rates) and rendered either as plain
//! text ([`Frame::to_text`], used by `--once` and `stats`) or with ratatui.

use std::io;
use std::time::{Duration, Instant};

use tmem_api::{format_size, ExportAccess, ExportKind, Stats};

/// One table of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Title.
    pub title: String,
    /// Column headers.
    pub headers: Vec<&'static str>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

/// One frame of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Header lines.
    pub header: Vec<String>,
    /// Tables.
    pub tables: Vec<Table>,
}

/// A counter's value, or "n/a" where it does not apply to this export kind (a cached
/// export never spills; a swap export has no backing image to read sectors from).
fn applies(applicable: bool, v: u64) -> String {
    if applicable {
        v.to_string()
    } else {
        "n/a".into()
    }
}

/// Who may open an export, in a few characters: `tenant:NAME`, `uid:1,2`, `gid:3`, `open`.
pub fn access_text(a: &ExportAccess) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &a.tenant {
        parts.push(format!("tenant:{t}"));
    }
    let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    if !a.allow_uids.is_empty() {
        parts.push(format!("uid:{}", ids(&a.allow_uids)));
    }
    if !a.allow_gids.is_empty() {
        parts.push(format!("gid:{}", ids(&a.allow_gids)));
    }
    if parts.is_empty() {
        "open".into()
    } else {
        parts.join(" ")
    }
}

fn rate(cur: u64, prev: Option<u64>, dt: Option<f64>) -> String {
    match (prev, dt) {
        (Some(p), Some(dt)) if dt > 0.0 => format!("{:.0}", cur.saturating_sub(p) as f64 / dt),
        _ => "-".into(),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

impl Frame {
    /// Builds a frame from the current sample and, for rates, an earlier one `dt` before.
    pub fn build(cur: &Stats, prev: Option<(&Stats, Duration)>) -> Frame {
        let p = &cur.pool;
        let dt = prev.map(|(_, d)| d.as_secs_f64());
        let mut header = vec![
            format!(
                "tmem pool  budget {}  held {}  logical {}  physical {}  freeable {}",
                format_size(p.budget),
                format_size(p.held_bytes),
                format_size(p.logical_bytes),
                format_size(p.physical_bytes),
                format_size(p.freeable_bytes),
            ),
            format!(
                "ratio {:.2}x  dedup {:.2}x  compression {:.2}x  fragmentation {:.1}%  pages {} (eph {} / pers {} / same {})  clients {}  pools {}",
                p.effective_ratio,
                p.dedup_ratio,
                p.compression_ratio,
                p.fragmentation * 100.0,
                p.pages,
                p.ephemeral_pages,
                p.persistent_pages,
                p.same_pages,
                p.clients,
                p.pools,
            ),
            format!(
                "memory  resident {}  daemon RSS {}  compactable {}  compacted {} in {} runs ({} pages moved)",
                format_size(p.resident_bytes),
                format_size(p.process_rss_bytes),
                format_size(p.compactable_bytes),
                format_size(p.compaction.bytes_freed),
                p.compaction.runs,
                p.compaction.moved,
            ),
        ];
        if let Some(r) = &cur.remote {
            header.push(remote_line(r));
        }
        let prev_client = |id: u32| prev.and_then(|(s, _)| s.clients.iter().find(|c| c.id == id));
        let damaged: Vec<String> = cur
            .exports
            .iter()
            .filter(|e| e.backend.poisoned_pages > 0)
            .map(|e| format!("{} {} pages", e.name, e.backend.poisoned_pages))
            .collect();
        if !damaged.is_empty() {
            header.push(format!(
                "POISONED (lost at an unclean stop; reads fail with EIO until rewritten): {}",
                damaged.join(", ")
            ));
        }
        let clients = Table {
            title: "Clients".into(),
            headers: vec![
                "CLIENT",
                "STATE",
                "EPH PAGES",
                "EPH BYTES",
                "PERS PAGES",
                "PERS BYTES",
                "HIT%",
                "PUTS/s",
                "GETS/s",
                "REFUSED",
                "EVICTED",
            ],
            rows: cur
                .clients
                .iter()
                .map(|c| {
                    let pc = prev_client(c.id);
                    vec![
                        c.id.to_string(),
                        if c.frozen { "frozen" } else { "active" }.into(),
                        c.ephemeral.pages.to_string(),
                        format_size(c.ephemeral.charged_bytes),
                        c.persistent.pages.to_string(),
                        format_size(c.persistent.charged_bytes),
                        pct(c.ops.hit_rate()),
                        rate(c.ops.puts, pc.map(|x| x.ops.puts), dt),
                        rate(c.ops.gets, pc.map(|x| x.ops.gets), dt),
                        c.ops.puts_refused.to_string(),
                        c.ops.evictions.to_string(),
                    ]
                })
                .collect(),
        };
        let exports = Table {
            title: "Exports".into(),
            headers: vec![
                "EXPORT",
                "KIND",
                "SIZE",
                "CLIENT",
                "POOL PAGES",
                "SPILLED",
                "REMOTE",
                "SECT RD",
                "SECT WR",
                "NBD OPS/s",
                "NBD LIVE/ALL",
                "ACCESS",
            ],
            rows: cur
                .exports
                .iter()
                .map(|e| {
                    let pe = prev.and_then(|(s, _)| s.exports.iter().find(|x| x.name == e.name));
                    vec![
                        e.name.clone(),
                        e.kind.to_string(),
                        format_size(e.size),
                        e.client.to_string(),
                        e.backend.pool_pages.to_string(),
                        applies(e.kind == ExportKind::Swap, e.backend.spilled_pages),
                        remote_cell(e.kind, &e.backend),
                        applies(e.kind == ExportKind::Cached, e.backend.sectors_read),
                        applies(e.kind == ExportKind::Cached, e.backend.sectors_written),
                        rate(e.nbd.ops(), pe.map(|x| x.nbd.ops()), dt),
                        format!("{}/{}", e.nbd.live_connections, e.nbd.connections),
                        access_text(&e.access),
                    ]
                })
                .collect(),
        };
        let guests = Table {
            title: "Guests".into(),
            headers: vec![
                "GUEST",
                "POLICY",
                "MAX",
                "ACTUAL",
                "TARGET",
                "RECLAIMED",
                "GIVEN BACK",
                "STUCK",
                "ERRORS",
            ],
            rows: cur
                .guests
                .iter()
                .map(|g| {
                    vec![
                        g.name.clone(),
                        g.policy.clone(),
                        format_size(g.max),
                        format_size(g.actual),
                        format_size(g.target),
                        format_size(g.reclaimed_bytes),
                        format_size(g.given_back_bytes),
                        if g.stuck { "yes" } else { "no" }.into(),
                        g.errors.to_string(),
                    ]
                })
                .collect(),
        };
        Frame {
            header,
            tables: vec![clients, exports, guests],
        }
    }

    /// The frame as plain text with aligned columns.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for h in &self.header {
            out.push_str(h);
            out.push('\n');
        }
        for t in &self.tables {
            out.push('\n');
            out.push_str(&t.title);
            out.push('\n');
            let mut widths: Vec<usize> = t.headers.iter().map(|h| h.len()).collect();
            for r in &t.rows {
                for (i, c) in r.iter().enumerate() {
                    if let Some(w) = widths.get_mut(i) {
                        *w = (*w).max(c.chars().count());
                    }
                }
            }
            let line = |cells: Vec<&str>| {
                let mut s = String::new();
                for (i, c) in cells.iter().enumerate() {
                    let w = widths.get(i).copied().unwrap_or(0);
                    if i == 0 {
                        s.push_str(&format!("{c:<w$}"));
                    } else {
                        s.push_str(&format!("  {c:>w$}"));
                    }
                }
                s.trim_end().to_owned() + "\n"
            };
            out.push_str(&line(t.headers.clone()));
            if t.rows.is_empty() {
                out.push_str("(none)\n");
            }
            for r in &t.rows {
                out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
            }
        }
        out
    }
}

/// The remote tier's header line.
fn remote_line(r: &tmem_api::RemoteInfo) -> String {
    let mut s = format!(
        "remote  {} {}  demoted {} (dropped {})  fetched {} hit {}  persistent put {} get {} (not replicated {})  errors {} (timeouts {}, corrupt {})  stored {}  fetch p50/p99 {}/{} µs  get p50/p99 {}/{} µs",
        r.mode,
        if r.reachable { "up" } else { "DOWN" },
        r.demoted_pages,
        r.demote_dropped,
        r.fetch_pages,
        r.fetch_hits,
        r.durable_puts,
        r.durable_gets,
        r.not_replicated,
        r.errors,
        r.timeouts,
        r.corrupt,
        format_size(r.stored_bytes),
        r.fetch_p50_us,
        r.fetch_p99_us,
        r.get_p50_us,
        r.get_p99_us,
    );
    if let Some(l) = &r.lend {
        s.push_str(&format!("  lends {} ({})", format_size(l.bytes), l.node));
    }
    s
}

/// The REMOTE column: a swap export's pages in the remote tier, a cached export's misses
/// the tier served ("N hit").
fn remote_cell(kind: ExportKind, b: &tmem_api::BackendCounters) -> String {
    match kind {
        ExportKind::Swap => b.remote_pages.to_string(),
        ExportKind::Cached => format!("{} hit", b.remote_hits),
    }
}

/// Runs the live view until `q`, Esc or Ctrl-C. `fetch` gets a fresh sample.
pub fn run_live(
    interval: Duration,
    mut fetch: impl FnMut() -> Result<Stats, String>,
) -> io::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use crossterm::terminal::{
        disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
    };
    use crossterm::ExecutableCommand;
    use ratatui::prelude::{CrosstermBackend, Terminal};

    enable_raw_mode()?;
    let mut stdout = io::stdout();
    if let Err(e) = stdout.execute(EnterAlternateScreen) {
        let _ = disable_raw_mode();
        return Err(e);
    }
    let restore = || {
        let _ = disable_raw_mode();
        let _ = io::stdout().execute(LeaveAlternateScreen);
    };
    let result = (|| -> io::Result<()> {
        let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
        let mut prev: Option<(Stats, Instant)> = None;
        loop {
            let now = Instant::now();
            let (frame, err) = match fetch() {
                Ok(cur) => {
                    let f = Frame::build(
                        &cur,
                        prev.as_ref()
                            .map(|(s, t)| (s, now.saturating_duration_since(*t))),
                    );
                    prev = Some((cur, now));
                    (Some(f), None)
                }
                Err(e) => (None, Some(e)),
            };
            term.draw(|f| draw(f, frame.as_ref(), err.as_deref()))?;
            let deadline = now + interval;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        if k.kind == KeyEventKind::Release {
                            continue;
                        }
                        let quit = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                            || (k.code == KeyCode::Char('c')
                                && k.modifiers.contains(KeyModifiers::CONTROL));
                        if quit {
                            return Ok(());
                        }
                    }
                }
            }
        }
    })();
    restore();
    result
}

fn draw(f: &mut ratatui::Frame<'_>, frame: Option<&Frame>, err: Option<&str>) {
    use ratatui::prelude::*;
    use ratatui::widgets::{Block, Borders, Paragraph, Row, Table as TTable};

    let area = f.area();
    let Some(frame) = frame else {
        let msg = format!("tmemctl top: {}  (q quits)", err.unwrap_or("no data"));
        f.render_widget(Paragraph::new(msg), area);
        return;
    };
    let mut constraints = vec![Constraint::Length(frame.header.len() as u16 + 1)];
    for t in &frame.tables {
        constraints.push(Constraint::Min((t.rows.len().max(1) + 3) as u16));
    }
    let chunks = Layout::vertical(constraints).split(area);
    let mut head: Vec<Line<'_>> = frame
        .header
        .iter()
        .map(|h| Line::from(h.as_str()).bold())
        .collect();
    head.push(Line::from("q quits").dim());
    f.render_widget(Paragraph::new(head), chunks[0]);
    for (i, t) in frame.tables.iter().enumerate() {
        let widths: Vec<Constraint> = t
            .headers
            .iter()
            .enumerate()
            .map(|(c, h)| {
                let w = t
                    .rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.len())
                    .max()
                    .unwrap_or(0)
                    .max(h.len());
                Constraint::Length(w as u16 + 1)
            })
            .collect();
        let rows = t.rows.iter().map(|r| Row::new(r.clone()));
        let table = TTable::new(rows, widths)
            .header(Row::new(t.headers.clone()).reversed())
            .block(
                Block::default()
                    .borders(Borders::TOP)
                    .title(t.title.as_str()),
            );
        if let Some(area) = chunks.get(i + 1) {
            f.render_widget(table, *area);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tmem_api::{ClientInfo, ExportInfo, ExportKind};

    #[test]
    fn text_frame_has_header_and_rows() {
        let mut s = Stats::default();
        s.pool.budget = 1 << 30;
        s.clients.push(ClientInfo {
            id: 7,
            ..Default::default()
        });
        s.exports.push(ExportInfo {
            name: "swap0".into(),
            kind: ExportKind::Swap,
            size: 64 << 20,
            client: 7,
            pool: Some(1),
            image: None,
            writable: false,
            uri: String::new(),
            access: Default::default(),
            tls_dir: None,
            backend: Default::default(),
            nbd: Default::default(),
        });
        let mut later = s.clone();
        later.clients[0].ops.puts = 100;
        let t = Frame::build(&later, Some((&s, Duration::from_secs(2)))).to_text();
        assert!(t.starts_with("tmem pool  budget 1G"), "{t}");
        assert!(t.contains("swap0"));
        assert!(t.contains("Guests\n"));
        assert!(t.contains("(none)"));
        // 100 puts in 2 s.
        let row = t.lines().find(|l| l.starts_with("7 ")).unwrap();
        assert!(row.contains(" 50 "), "{row}");
        // A swap export has no image sectors: those columns say so instead of 0.
        let row = t.lines().find(|l| l.starts_with("swap0")).unwrap();
        assert_eq!(row.matches("n/a").count(), 2, "{row}");
        assert!(row.contains("open"), "{row}");
        assert!(!t.contains("remote "), "no tier, no line: {t}");
        later.remote = Some(tmem_api::RemoteInfo {
            mode: "cluster".into(),
            reachable: false,
            durable_puts: 12,
            ..Default::default()
        });
        later.exports[0].backend.remote_pages = 12;
        let t = Frame::build(&later, None).to_text();
        assert!(t.contains("remote  cluster DOWN"), "{t}");
        assert!(t.contains("persistent put 12"), "{t}");
        let row = t.lines().find(|l| l.starts_with("swap0")).unwrap();
        assert!(row.contains(" 12 "), "{row}");
    }

    #[test]
    fn access_is_summarised() {
        let a = ExportAccess {
            tenant: Some("vm1".into()),
            allow_uids: vec![107, 108],
            allow_gids: vec![],
        };
        assert_eq!(access_text(&a), "tenant:vm1 uid:107,108");
        assert_eq!(access_text(&ExportAccess::default()), "open");
    }
}
