//! The in-guest agent's wire format, and (with feature `host`) the host-side
//! reader for the virtio-serial channel.
//!
//! # Wire format (version 1)
//!
//! One JSON object per line (`\n`-terminated, UTF-8), written by `tmem-guest`
//! every interval:
//!
//! ```json
//! {"v":1,"agent":"0.1.0","seq":7,"uptime_ms":123450,"interval_ms":2000,
//!  "mem":{"total":1039163392,"available":670044160,"committed_as":409600000,...},
//!  "vm":{"pgmajfault":42,"pswpin":10,"allocstall":0,"oom_kill":0,...}}
//! ```
//!
//! * `v` — wire version ([`WIRE_VERSION`]); readers reject larger major versions.
//! * `agent` — the agent's crate version.
//! * `seq` — increments by one per report since agent start (gaps = lost lines).
//! * `uptime_ms` — guest `/proc/uptime`.
//! * `mem` — [`MemInfo`]: bytes; absent keys are omitted.
//! * `vm` — [`VmStat`]: cumulative counters (`pswpin`/`pswpout` in pages).
//!
//! Unknown fields are ignored so newer agents can add data.

use serde::{Deserialize, Serialize};

use crate::stats::{GuestStats, MemInfo, VmStat};

/// Current wire version.
pub const WIRE_VERSION: u32 = 1;

/// Longest accepted report line (bytes). Longer lines are discarded.
pub const MAX_LINE: usize = 64 * 1024;

/// One agent report (one line on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Wire version, [`WIRE_VERSION`].
    pub v: u32,
    /// Agent software version.
    #[serde(default)]
    pub agent: String,
    /// Sequence number, from 0 at agent start.
    pub seq: u64,
    /// Guest uptime in milliseconds.
    #[serde(default)]
    pub uptime_ms: u64,
    /// Reporting interval in milliseconds.
    #[serde(default)]
    pub interval_ms: u64,
    /// Parsed `/proc/meminfo`.
    #[serde(default)]
    pub mem: MemInfo,
    /// Parsed `/proc/vmstat`.
    #[serde(default)]
    pub vm: VmStat,
}

/// Errors decoding a report line.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The line is not a valid report object.
    #[error("Malformed agent report")]
    Json(#[source] serde_json::Error),
    /// The report uses a wire version this reader does not know.
    #[error("Unsupported agent wire version {0}")]
    Version(u32),
}

impl AgentReport {
    /// Build a report from raw `/proc` texts.
    pub fn from_proc_text(
        seq: u64,
        interval_ms: u64,
        meminfo: &str,
        vmstat: &str,
        uptime: &str,
    ) -> Self {
        Self {
            v: WIRE_VERSION,
            agent: env!("CARGO_PKG_VERSION").to_string(),
            seq,
            uptime_ms: crate::stats::parse_uptime_ms(uptime).unwrap_or(0),
            interval_ms,
            mem: MemInfo::parse(meminfo),
            vm: VmStat::parse(vmstat),
        }
    }

    /// Encode as one line, including the trailing `\n`.
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        let mut s = serde_json::to_string(self)?;
        s.push('\n');
        Ok(s)
    }

    /// Decode one line (with or without the trailing newline).
    pub fn decode(line: &[u8]) -> Result<Self, DecodeError> {
        let r: Self = serde_json::from_slice(line).map_err(DecodeError::Json)?;
        if r.v == 0 || r.v > WIRE_VERSION {
            return Err(DecodeError::Version(r.v));
        }
        Ok(r)
    }

    /// Convert into a [`GuestStats`] snapshot stamped with the host's clock.
    pub fn to_stats(&self, t_ms: u64) -> GuestStats {
        GuestStats::from_proc(t_ms, &self.mem, &self.vm)
    }
}

#[cfg(feature = "host")]
pub use reader::{AgentReader, AgentReaderStatus};

#[cfg(feature = "host")]
mod reader {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::{AgentReport, MAX_LINE};

    /// Counters and the latest report of an [`AgentReader`].
    #[derive(Debug, Clone, Default)]
    pub struct AgentReaderStatus {
        /// Latest decoded report and when (host clock) it arrived.
        pub latest: Option<(Instant, AgentReport)>,
        /// True while the socket is connected.
        pub connected: bool,
        /// Reports decoded.
        pub reports: u64,
        /// Lines that did not decode (garbage, too long, bad version).
        pub bad_lines: u64,
        /// Successful connects (so `connects - 1` reconnects).
        pub connects: u64,
        /// Reports lost according to sequence gaps.
        pub seq_gaps: u64,
    }

    /// Host-side reader of the agent channel.
    ///
    /// Connects to the Unix socket QEMU listens on for the `virtserialport`
    /// chardev (`-chardev socket,server=on,wait=off`), reads line-delimited
    /// reports on a background thread, skips garbage lines and reconnects with
    /// backoff (100 ms doubling to 5 s) when the socket is missing or closed.
    #[derive(Debug)]
    pub struct AgentReader {
        state: Arc<Mutex<AgentReaderStatus>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl AgentReader {
        /// Start reading from `path` on a background thread.
        pub fn spawn(path: impl Into<PathBuf>) -> std::io::Result<Self> {
            let path = path.into();
            let state = Arc::new(Mutex::new(AgentReaderStatus::default()));
            let stop = Arc::new(AtomicBool::new(false));
            let (st, sp) = (state.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name("tmem-agent-rd".into())
                .spawn(move || run(&path, &st, &sp))?;
            Ok(Self {
                state,
                stop,
                thread: Some(thread),
            })
        }

        /// Snapshot of counters and the latest report.
        pub fn status(&self) -> AgentReaderStatus {
            match self.state.lock() {
                Ok(g) => g.clone(),
                Err(p) => p.into_inner().clone(),
            }
        }

        /// Latest report if it arrived within `max_age`.
        pub fn fresh(&self, max_age: Duration) -> Option<AgentReport> {
            let s = self.status();
            let (at, r) = s.latest?;
            (at.elapsed() <= max_age).then_some(r)
        }
    }

    impl Drop for AgentReader {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn with<R>(state: &Mutex<AgentReaderStatus>, f: impl FnOnce(&mut AgentReaderStatus) -> R) -> R {
        match state.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
        let end = Instant::now() + d;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    fn run(path: &std::path::Path, state: &Mutex<AgentReaderStatus>, stop: &AtomicBool) {
        let mut backoff = Duration::from_millis(100);
        let mut last_seq: Option<u64> = None;
        while !stop.load(Ordering::Relaxed) {
            let stream = match UnixStream::connect(path) {
                Ok(s) => s,
                Err(_) => {
                    sleep_unless_stopped(backoff, stop);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // A short read timeout lets the thread notice `stop`.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            with(state, |s| {
                s.connected = true;
                s.connects += 1;
            });
            let mut rd = BufReader::new(stream);
            let mut line: Vec<u8> = Vec::new();
            let mut discarding = false;
            while !stop.load(Ordering::Relaxed) {
                let room = (MAX_LINE + 1).saturating_sub(line.len()) as u64;
                match (&mut rd).take(room.max(1)).read_until(b'\n', &mut line) {
                    Ok(0) => break, // EOF: peer closed
                    Ok(_) => {
                        let complete = line.last() == Some(&b'\n');
                        if !complete {
                            if line.len() > MAX_LINE {
                                if !discarding {
                                    with(state, |s| s.bad_lines += 1);
                                    discarding = true;
                                }
                                line.clear();
                            }
                            continue; // partial line, keep reading
                        }
                        if discarding {
                            // Tail of an over-long line.
                            discarding = false;
                            line.clear();
                            continue;
                        }
                        let trimmed = line.trim_ascii();
                        if !trimmed.is_empty() {
                            match AgentReport::decode(trimmed) {
                                Ok(r) => with(state, |s| {
                                    if let Some(prev) = last_seq {
                                        if r.seq > prev + 1 {
                                            s.seq_gaps += r.seq - prev - 1;
                                        }
                                    }
                                    last_seq = Some(r.seq);
                                    s.reports += 1;
                                    s.latest = Some((Instant::now(), r));
                                }),
                                Err(_) => with(state, |s| s.bad_lines += 1),
                            }
                        }
                        line.clear();
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => break,
                }
            }
            with(state, |s| s.connected = false);
            sleep_unless_stopped(backoff, stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_versions() {
        let r =
            AgentReport::from_proc_text(3, 2000, "MemTotal: 100 kB\n", "pgmajfault 5\n", "1.5 0");
        let line = r.to_line().unwrap_or_default();
        assert!(line.ends_with('\n'));
        assert!(!line.contains("swap_free"), "absent fields omitted: {line}");
        let back = AgentReport::decode(line.as_bytes()).ok();
        assert_eq!(back.as_ref(), Some(&r));
        assert_eq!(r.uptime_ms, 1500);
        assert!(matches!(
            AgentReport::decode(b"{\"v\":9,\"seq\":1}"),
            Err(DecodeError::Version(9))
        ));
        assert!(AgentReport::decode(b"garbage").is_err());
        // Unknown fields are tolerated.
        let ok = AgentReport::decode(b"{\"v\":1,\"seq\":1,\"future\":[1,2]}");
        assert!(ok.is_ok());
    }

    /// Parsers and decoder never panic on arbitrary bytes (deterministic LCG).
    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let alphabet = b"{}[]\":,0123456789 -.eE\nkBMemTotal:xyzallocstall_\ttrue";
        for len in 0..2000usize {
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len % 300 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 33) as usize;
                buf.push(if b % 4 == 0 {
                    (b >> 8) as u8
                } else {
                    alphabet[b % alphabet.len()]
                });
            }
            let _ = AgentReport::decode(&buf);
            let text = String::from_utf8_lossy(&buf);
            let _ = MemInfo::parse(&text);
            let _ = VmStat::parse(&text);
            let _ = crate::stats::parse_uptime_ms(&text);
            let _ = crate::psi::Psi::parse(&text);
        }
        // Overflowing kB values are skipped, not wrapped.
        assert_eq!(
            MemInfo::parse("MemTotal: 18446744073709551615 kB\n").total,
            None
        );
    }

    #[cfg(feature = "host")]
    #[test]
    fn reader_skips_garbage_and_reconnects() {
        use std::io::Write;
        use std::os::unix::net::UnixListener;
        use std::time::{Duration, Instant};

        let dir = std::env::temp_dir().join(format!("tmem-agent-rd-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind");
        let reader = AgentReader::spawn(&sock).expect("spawn");
        let wait = |pred: &dyn Fn(&AgentReaderStatus) -> bool| {
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                if pred(&reader.status()) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        };
        let mk = |seq| {
            AgentReport {
                v: 1,
                seq,
                ..Default::default()
            }
            .to_line()
            .unwrap_or_default()
        };
        {
            let (mut c, _) = listener.accept().expect("accept");
            let long = "x".repeat(MAX_LINE + 10);
            let msg = format!("garbage\n{}{long}\n{}\n\n{}", mk(0), mk(1), mk(3));
            c.write_all(msg.as_bytes()).expect("write");
            assert!(wait(&|s| s.reports == 3), "{:?}", reader.status());
        } // closed here: reader must reconnect
        let (mut c, _) = listener.accept().expect("re-accept");
        c.write_all(mk(4).as_bytes()).expect("write");
        assert!(wait(&|s| s.reports == 4));
        let st = reader.status();
        assert_eq!(st.bad_lines, 2);
        assert_eq!(st.seq_gaps, 1);
        assert!(st.connects >= 2);
        assert_eq!(st.latest.map(|(_, r)| r.seq), Some(4));
        drop(reader);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
