//! A small synchronous QMP client (QEMU Machine Protocol over a Unix socket).
//!
//! * Reads the greeting, negotiates `qmp_capabilities`.
//! * Every command carries a numeric `id`; replies with other ids (left over
//!   from a command that timed out) are dropped.
//! * Asynchronous events (`BALLOON_CHANGE`, ...) that arrive between replies are
//!   queued, never lost: see [`QmpClient::take_events`] / [`QmpClient::wait_event`].
//! * Read timeouts, line-length cap, typed errors; nothing a peer sends can
//!   cause a panic.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::stats::GuestStats;

/// Longest accepted QMP line (bytes).
pub const MAX_QMP_LINE: usize = 4 << 20;

/// QMP errors.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error("Cannot connect to QMP socket")]
    Connect(#[source] std::io::Error),
    /// Reading or writing the socket failed.
    #[error("QMP I/O error")]
    Io(#[source] std::io::Error),
    /// No complete reply within the timeout.
    #[error("Timed out waiting for QMP reply")]
    Timeout,
    /// The peer closed the connection.
    #[error("QMP connection closed by peer")]
    Closed,
    /// The peer sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered with an error object.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP error class (e.g. `CommandNotFound`, `DeviceNotActive`).
        class: String,
        /// QMP error description.
        desc: String,
    },
}

/// One asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `BALLOON_CHANGE`.
    pub name: String,
    /// `data` member (Null if absent).
    pub data: Value,
    /// Local receive time.
    pub received: Instant,
}

/// A connected QMP session.
#[derive(Debug)]
pub struct QmpClient {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    partial: Vec<u8>,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    greeting: Value,
    timeout: Duration,
    max_events: usize,
}

enum Msg {
    Reply {
        id: Option<Value>,
        result: Result<Value, (String, String)>,
    },
    Event(QmpEvent),
}

impl QmpClient {
    /// Connect, read the greeting and send `qmp_capabilities`.
    /// `timeout` bounds each wait for a reply.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path).map_err(QmpError::Connect)?;
        let wr = s.try_clone().map_err(QmpError::Connect)?;
        let mut c = Self {
            rd: BufReader::new(s),
            wr,
            partial: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
            greeting: Value::Null,
            timeout,
            max_events: 1024,
        };
        let deadline = Instant::now() + timeout;
        let g = c.read_value(deadline)?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol("missing QMP greeting".into()));
        }
        c.greeting = g;
        c.execute("qmp_capabilities", None)?;
        Ok(c)
    }

    /// The greeting object QEMU sent (contains the version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Set the per-reply timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Read one JSON value (one line) before `deadline`.
    fn read_value(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.rd
                .get_ref()
                .set_read_timeout(Some(wait))
                .map_err(QmpError::Io)?;
            let room = (MAX_QMP_LINE + 1).saturating_sub(self.partial.len()).max(1) as u64;
            match (&mut self.rd)
                .take(room)
                .read_until(b'\n', &mut self.partial)
            {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) => {
                    if self.partial.last() != Some(&b'\n') {
                        if self.partial.len() > MAX_QMP_LINE {
                            self.partial.clear();
                            return Err(QmpError::Protocol("line too long".into()));
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.partial);
                    let trimmed = line.trim_ascii();
                    if trimmed.is_empty() {
                        continue;
                    }
                    return serde_json::from_slice(trimmed)
                        .map_err(|e| QmpError::Protocol(format!("bad JSON: {e}")));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }

    fn classify(v: Value) -> Result<Msg, QmpError> {
        let Value::Object(mut o) = v else {
            return Err(QmpError::Protocol("message is not an object".into()));
        };
        if let Some(Value::String(name)) = o.remove("event") {
            let data = o.remove("data").unwrap_or(Value::Null);
            return Ok(Msg::Event(QmpEvent {
                name,
                data,
                received: Instant::now(),
            }));
        }
        let id = o.remove("id");
        if let Some(r) = o.remove("return") {
            return Ok(Msg::Reply { id, result: Ok(r) });
        }
        if let Some(e) = o.remove("error") {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Ok(Msg::Reply {
                id,
                result: Err((s("class"), s("desc"))),
            });
        }
        Err(QmpError::Protocol(
            "message has neither event, return nor error".into(),
        ))
    }

    fn push_event(&mut self, ev: QmpEvent) {
        if self.events.len() >= self.max_events {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Execute `command` with optional `arguments`; returns the `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), json!(id));
        let mut line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| QmpError::Protocol(format!("encode: {e}")))?;
        line.push(b'\n');
        self.wr
            .set_write_timeout(Some(self.timeout))
            .map_err(QmpError::Io)?;
        self.wr.write_all(&line).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                QmpError::Closed
            }
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => QmpError::Timeout,
            _ => QmpError::Io(e),
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.read_value(deadline)?;
            match Self::classify(v)? {
                Msg::Event(ev) => self.push_event(ev),
                Msg::Reply { id: rid, result } => {
                    if rid.as_ref().and_then(Value::as_u64) != Some(id) {
                        continue; // stale reply to an earlier, timed-out command
                    }
                    return result.map_err(|(class, desc)| QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    });
                }
            }
        }
    }

    /// Read events for up to `wait` (returns early once one arrives).
    pub fn poll_events(&mut self, wait: Duration) -> Result<usize, QmpError> {
        let deadline = Instant::now() + wait;
        let before = self.events.len();
        loop {
            match self.read_value(deadline) {
                Ok(v) => match Self::classify(v)? {
                    Msg::Event(ev) => {
                        self.push_event(ev);
                        return Ok(self.events.len().saturating_sub(before).max(1));
                    }
                    Msg::Reply { .. } => continue,
                },
                Err(QmpError::Timeout) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait up to `wait` for an event named `name` (already queued ones count);
    /// removes and returns it. Other events stay queued.
    pub fn wait_event(&mut self, name: &str, wait: Duration) -> Result<Option<QmpEvent>, QmpError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(pos) = self.events.iter().position(|e| e.name == name) {
                return Ok(self.events.remove(pos));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.poll_events(deadline - now)?;
        }
    }

    /// Remove and return all queued events.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// `query-balloon` → logical guest size (`actual`), bytes.
    pub fn query_balloon(&mut self) -> Result<u64, QmpError> {
        let r = self.execute("query-balloon", None)?;
        r.get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Protocol("query-balloon: no numeric 'actual'".into()))
    }

    /// `balloon {value}`: request logical guest size `bytes`.
    pub fn balloon(&mut self, bytes: u64) -> Result<(), QmpError> {
        self.execute("balloon", Some(json!({ "value": bytes })))
            .map(drop)
    }

    /// `qom-set <path> guest-stats-polling-interval <secs>` (0 disables).
    pub fn set_stats_polling(&mut self, device_path: &str, secs: u32) -> Result<(), QmpError> {
        self.execute(
            "qom-set",
            Some(json!({"path": device_path, "property": "guest-stats-polling-interval", "value": secs})),
        )
        .map(drop)
    }

    /// `qom-get <path> guest-stats`, mapped to [`GuestStats`] stamped `t_ms`.
    /// Returns the stats and QEMU's `last-update` (0 = never updated).
    pub fn guest_stats(
        &mut self,
        device_path: &str,
        t_ms: u64,
    ) -> Result<(GuestStats, u64), QmpError> {
        let r = self.execute(
            "qom-get",
            Some(json!({"path": device_path, "property": "guest-stats"})),
        )?;
        Ok((
            guest_stats_from_qom(&r, t_ms),
            r.get("last-update").and_then(Value::as_u64).unwrap_or(0),
        ))
    }
}

/// Map a QOM `guest-stats` object to [`GuestStats`]. Unset stats (-1 /
/// `u64::MAX`) become `None`.
pub fn guest_stats_from_qom(v: &Value, t_ms: u64) -> GuestStats {
    let st = v.get("stats");
    let get = |k: &str| {
        st.and_then(|s| s.get(k))
            .and_then(Value::as_u64)
            .filter(|&x| x != u64::MAX)
    };
    GuestStats {
        t_ms,
        total: get("stat-total-memory"),
        available: get("stat-available-memory"),
        free: get("stat-free-memory"),
        cache: get("stat-disk-caches"),
        major_faults: get("stat-major-faults"),
        swap_in_bytes: get("stat-swap-in"),
        swap_out_bytes: get("stat-swap-out"),
        alloc_stalls: get("stat-alloc-stalls"),
        oom_kills: get("stat-oom-kills"),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tmem-qmp-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d.join("s")
    }

    #[test]
    fn maps_qom_stats_and_unset_values() {
        let v = json!({"stats": {"stat-total-memory": 100, "stat-free-memory": u64::MAX,
            "stat-available-memory": 60, "stat-major-faults": 3}, "last-update": 5});
        let s = guest_stats_from_qom(&v, 9);
        assert_eq!(
            (s.total, s.free, s.available, s.major_faults),
            (Some(100), None, Some(60), Some(3))
        );
        assert_eq!(guest_stats_from_qom(&json!(null), 0), GuestStats::default());
    }

    /// Adversarial replies: every one is an error or a value, never a panic.
    #[test]
    fn adversarial_replies() {
        let path = tmp("adv");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).expect("bind");
        let replies: Vec<String> = vec![
            "[1,2]".into(),
            "{\"event\":5}".into(),
            "{\"return\":{\"actual\":\"x\"},\"id\":ID}".into(),
            "{\"return\":{\"actual\":-1},\"id\":ID}".into(),
            "{\"error\":7,\"id\":ID}".into(),
            "\u{0}\u{1}\u{ff}".into(),
            "{\"return\":{\"actual\":1e400},\"id\":ID}".into(),
            "{\"return\":{\"actual\":7},\"id\":ID}".into(),
        ];
        let n = replies.len();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            let _ = w.write_all(b"{\"QMP\":{}}\n");
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let _ = w.write_all(format!("{{\"return\":{{}},\"id\":{}}}\n", v["id"]).as_bytes());
            for rep in replies {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let out = rep.replace("ID", &v["id"].to_string());
                let _ = w.write_all(format!("{out}\n").as_bytes());
            }
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(10)).expect("connect");
        c.set_timeout(Duration::from_millis(300));
        let mut results = Vec::new();
        for _ in 0..n {
            results.push(c.query_balloon().ok());
        }
        // Only the last, well-formed reply yields a value (earlier garbage may
        // desynchronise nothing: ids keep replies matched).
        assert_eq!(results.last().copied().flatten(), Some(7), "{results:?}");
        assert!(results[..n - 1].iter().all(|r| r.is_none()), "{results:?}");
        let _ = srv.join();
        let _ = std::fs::remove_file(&path);
    }

    /// A fake QEMU that interleaves events, stale replies and garbage.
    #[test]
    fn fake_peer_events_ids_and_errors() {
        let path = tmp("fake");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).expect("bind");
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            let mut line = String::new();
            let _ = w.write_all(b"{\"QMP\":{\"version\":{},\"capabilities\":[]}}\n");
            let mut n = 0;
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                line.clear();
                let id = v["id"].clone();
                let out = match n {
                    0 => format!("{{\"return\":{{}},\"id\":{id}}}\n"),
                    1 => format!(
                        "{{\"event\":\"BALLOON_CHANGE\",\"data\":{{\"actual\":5}}}}\n{{\"return\":{{}},\"id\":999}}\n{{\"return\":{{\"actual\":42}},\"id\":{id}}}\n"
                    ),
                    2 => format!("{{\"id\":{id},\"error\":{{\"class\":\"GenericError\",\"desc\":\"nope\"}}}}\n"),
                    3 => "not json\n".to_string(),
                    _ => String::new(),
                };
                n += 1;
                if w.write_all(out.as_bytes()).is_err() || n > 4 {
                    break;
                }
            }
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(10)).expect("connect");
        assert_eq!(c.query_balloon().expect("query"), 42);
        let ev = c.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].name, "BALLOON_CHANGE");
        assert_eq!(ev[0].data["actual"], 5);
        match c.balloon(1) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("expected command error, got {other:?}"),
        }
        assert!(matches!(c.query_balloon(), Err(QmpError::Protocol(_))));
        // 4th command gets no answer: timeout, then the peer closes.
        c.set_timeout(Duration::from_millis(200));
        let r = c.query_balloon();
        assert!(
            matches!(r, Err(QmpError::Timeout) | Err(QmpError::Closed)),
            "{r:?}"
        );
        let _ = srv.join();
        let _ = std::fs::remove_file(&path);
    }
}
