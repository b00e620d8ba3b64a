//! libvirt domains: the balloon driven **through libvirt**, never through the QMP monitor
//! libvirt owns.
//!
//! Every operation is one run of libvirt's own client, `virsh` (package `libvirt-clients`),
//! against the domain's connection URI:
//!
//! | here | virsh | libvirt API |
//! |---|---|---|
//! | [`BalloonActuator::actual`], [`StatsSource::poll`] | `domid` + `domstats --state --balloon` (one run) | `virDomainGetID`, `virDomainListGetStats` |
//! | [`BalloonActuator::set_target`] | `setmem --live` | `virDomainSetMemoryFlags(VIR_DOMAIN_AFFECT_LIVE)` |
//! | the stats period, once | `dommemstat --period N --live` | `virDomainSetMemoryStatsPeriod` |
//! | "is it gone?", after a failure | `list --all --name` | `virConnectListAllDomains` |
//!
//! Why `virsh` rather than the `virt` crate (Rust bindings to `libvirt.so`): the bindings
//! link every `tmemd` against `libvirt0` (and its dozen libraries; the Debian package would
//! depend on them on hosts without libvirt), need `libvirt-dev` to build the workspace at
//! all, and `virt-sys` pins `libc` to one exact version, which holds the whole workspace's
//! `libc` back. `virsh` is libvirt's maintained client, speaks its protocol, honours its
//! URIs, authentication and `LIBVIRT_DEFAULT_URI`, and is only needed on hosts that run
//! libvirt; one run costs a few ms per interval. It runs with `LC_ALL=C`, and its output is
//! parsed from the stable `key=value` form of `domstats`.
//!
//! **A domain that is gone** (undefined, shut off, crashed, or restarted since it was
//! registered: its domain id changed) makes the actuator fail with [`ActuatorError::Gone`];
//! the manager then ends that guest's loop and tells its owner (see
//! [`crate::manager::Manager::set_gone_hook`]), so that nothing stale stays behind.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::manager::{ActuatorError, BalloonActuator, StatsSource};
use crate::stats::GuestStats;

/// libvirt's `virDomainState` values that mean the domain no longer runs.
const STATE_SHUTOFF: u64 = 5;
const STATE_CRASHED: u64 = 6;

/// A sample older than this is taken again when stats are polled.
const SAMPLE_REUSE: Duration = Duration::from_millis(1000);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Quotes `s` as one token of a `virsh` command string (every character escaped with a
/// backslash, which virsh's parser takes literally outside single quotes).
fn virsh_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        out.push('\\');
        out.push(c);
    }
    out
}

/// One `domid` + `domstats --state --balloon` result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainSample {
    /// Domain id (`None`: not running, virsh printed `-`).
    pub id: Option<u64>,
    /// `state.state` (libvirt's `virDomainState`).
    pub state: Option<u64>,
    /// The `balloon.*` fields (without the prefix), as virsh printed them.
    pub balloon: BTreeMap<String, u64>,
}

impl DomainSample {
    /// Parses virsh's output of `domid DOM; domstats --state --balloon DOM`: the id on the
    /// first line, then `Domain: 'NAME'` and indented `key=value` lines.
    pub fn parse(out: &str) -> Result<Self, ActuatorError> {
        let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
        let id = match lines.next() {
            Some("-") => None,
            Some(l) => Some(
                l.parse()
                    .map_err(|_| ActuatorError::Parse(format!("virsh domid output {l:?}")))?,
            ),
            None => return Err(ActuatorError::Parse("empty virsh output".into())),
        };
        let mut s = DomainSample {
            id,
            ..Default::default()
        };
        let mut seen_domain = false;
        for l in lines {
            if l.starts_with("Domain:") {
                seen_domain = true;
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            let Ok(v) = v.trim().parse::<u64>() else {
                continue; // not a counter (none of the fields read here)
            };
            if k == "state.state" {
                s.state = Some(v);
            } else if let Some(b) = k.strip_prefix("balloon.") {
                s.balloon.insert(b.to_owned(), v);
            }
        }
        if !seen_domain {
            return Err(ActuatorError::Parse(
                "virsh domstats printed no domain".into(),
            ));
        }
        Ok(s)
    }

    fn kib(&self, k: &str) -> Option<u64> {
        self.balloon.get(k).map(|v| v.saturating_mul(1024))
    }

    /// Balloon size (`balloon.current`), bytes.
    pub fn current(&self) -> Option<u64> {
        self.kib("current")
    }

    /// Most memory the domain may have (`balloon.maximum`, its `<memory>`), bytes.
    pub fn maximum(&self) -> Option<u64> {
        self.kib("maximum")
    }

    /// When the guest's balloon driver last reported (`balloon.last-update`, seconds since
    /// the epoch; 0 or absent: never).
    pub fn last_update(&self) -> u64 {
        self.balloon.get("last-update").copied().unwrap_or(0)
    }

    /// The guest's figures as [`GuestStats`] (libvirt's names: `available` is the guest's
    /// MemTotal, `usable` its MemAvailable, `unused` MemFree; sizes in KiB).
    pub fn guest_stats(&self, t_ms: u64) -> GuestStats {
        GuestStats {
            t_ms,
            total: self.kib("available"),
            available: self.kib("usable"),
            free: self.kib("unused"),
            cache: self.kib("disk_caches"),
            major_faults: self.balloon.get("major_fault").copied(),
            swap_in_bytes: self.kib("swap_in"),
            swap_out_bytes: self.kib("swap_out"),
            ..Default::default()
        }
    }
}

/// How to reach one libvirt domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtDomain {
    /// Domain name.
    pub domain: String,
    /// Connection URI (`qemu:///system`, `qemu+unix:///system?socket=...`); `None`: virsh's
    /// default (`LIBVIRT_DEFAULT_URI`, `uri_default`, else `qemu:///system` as root).
    pub uri: Option<String>,
    /// The `virsh` program. Default `virsh` from `PATH`.
    pub virsh: PathBuf,
    /// Longest one virsh run may take before it is killed.
    pub timeout: Duration,
    /// Balloon statistics period set on the domain (seconds; 0 leaves it alone).
    pub stats_period_secs: u32,
}

impl LibvirtDomain {
    /// Domain `domain` on `uri` (or virsh's default), stats every 2 s, 10 s timeout.
    pub fn new(domain: impl Into<String>, uri: Option<String>) -> Self {
        LibvirtDomain {
            domain: domain.into(),
            uri,
            virsh: PathBuf::from("virsh"),
            timeout: Duration::from_secs(10),
            stats_period_secs: 2,
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.virsh);
        c.env("LC_ALL", "C").arg("-q");
        if let Some(u) = &self.uri {
            c.arg("-c").arg(u);
        }
        c
    }

    /// Runs virsh with `args`; stdout on success, else a [`ActuatorError::Libvirt`] carrying
    /// virsh's error lines.
    pub fn virsh(&self, args: &[&str]) -> Result<String, ActuatorError> {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("virsh {}", args.first().copied().unwrap_or(""));
        let mut child = cmd.spawn().map_err(|e| {
            ActuatorError::Libvirt(format!(
                "cannot run {} (package libvirt-clients): {e}",
                self.virsh.display()
            ))
        })?;
        let reader = |p: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = p {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = reader(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let end = Instant::now() + self.timeout;
        let mut nap = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() >= end => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ActuatorError::Libvirt(format!(
                        "{what} did not finish within {:?}",
                        self.timeout
                    )));
                }
                Ok(None) => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(ActuatorError::Libvirt(format!("{what}: {e}"))),
            }
        };
        let out = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        if !status.success() {
            let msg: Vec<&str> = err
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            return Err(ActuatorError::Libvirt(format!(
                "{what} failed ({status}): {}",
                if msg.is_empty() {
                    "no message".to_owned()
                } else {
                    msg.join("; ")
                }
            )));
        }
        Ok(out)
    }

    /// Whether the domain is defined (or running) on the connection: `Ok(false)` only when
    /// libvirt answered and did not list it.
    pub fn exists(&self) -> Result<bool, ActuatorError> {
        let out = self.virsh(&["list", "--all", "--name"])?;
        Ok(out.lines().any(|l| l.trim_end() == self.domain))
    }

    /// One sample: domain id, state and balloon figures. A failure is
    /// [`ActuatorError::Gone`] when the domain no longer exists.
    pub fn sample(&self) -> Result<DomainSample, ActuatorError> {
        if self.domain.contains('\n') {
            return Err(ActuatorError::Parse("domain name with a newline".into()));
        }
        let d = virsh_token(&self.domain);
        let script = format!("domid --domain {d}; domstats --state --balloon -- {d}");
        let r = self
            .virsh(&[script.as_str()])
            .and_then(|out| DomainSample::parse(&out));
        match r {
            Ok(s) => Ok(s),
            Err(e) => match self.exists() {
                Ok(false) => Err(ActuatorError::Gone(format!(
                    "libvirt domain {:?} no longer exists",
                    self.domain
                ))),
                _ => Err(e),
            },
        }
    }

    /// Sets the balloon (`virsh setmem --live`), bytes (rounded down to KiB).
    pub fn set_memory(&self, bytes: u64) -> Result<(), ActuatorError> {
        let kib = (bytes / 1024).to_string();
        self.virsh(&["setmem", "--domain", &self.domain, "--size", &kib, "--live"])
            .map(drop)
    }

    /// Sets the balloon statistics period of the running domain (`virsh dommemstat --period
    /// N --live`).
    pub fn set_stats_period(&self, secs: u32) -> Result<(), ActuatorError> {
        self.virsh(&[
            "dommemstat",
            "--domain",
            &self.domain,
            "--period",
            &secs.to_string(),
            "--live",
        ])
        .map(drop)
    }
}

#[derive(Debug)]
struct Conn {
    dom: LibvirtDomain,
    /// The domain id of the run this guest was registered for.
    id: Option<u64>,
    period_set: bool,
    last: Option<(Instant, DomainSample)>,
    last_update: u64,
    last_stats: Option<GuestStats>,
}

impl Conn {
    fn sample(&mut self) -> Result<&DomainSample, ActuatorError> {
        let s = self.dom.sample()?;
        let name = &self.dom.domain;
        // While libvirt stops a domain, the id can still be there and the state not yet.
        let (Some(id), false) = (s.id, matches!(s.state, Some(STATE_SHUTOFF | STATE_CRASHED)))
        else {
            return Err(ActuatorError::Gone(format!(
                "libvirt domain {name:?} no longer runs"
            )));
        };
        match self.id {
            Some(prev) if prev != id => {
                return Err(ActuatorError::Gone(format!(
                    "libvirt domain {name:?} was restarted (id {prev} -> {id})"
                )))
            }
            _ => self.id = Some(id),
        }
        if !self.period_set && self.dom.stats_period_secs > 0 {
            // Stats are optional: a domain without a balloon device is reported later.
            if let Err(e) = self.dom.set_stats_period(self.dom.stats_period_secs) {
                tracing::debug!(domain = %name, error = %e, "cannot set the memory stats period");
            }
            self.period_set = true;
        }
        self.last = Some((Instant::now(), s));
        match &self.last {
            Some((_, s)) => Ok(s),
            None => Err(ActuatorError::Parse("no sample".into())),
        }
    }
}

/// A libvirt domain as the balloon manager's [`BalloonActuator`]; clone it, or take
/// [`LibvirtHandle::stats_source`], for its [`StatsSource`] (both share one sample per
/// interval).
#[derive(Debug, Clone)]
pub struct LibvirtHandle(Arc<Mutex<Conn>>);

impl LibvirtHandle {
    /// A handle for `dom`.
    pub fn new(dom: LibvirtDomain) -> Self {
        LibvirtHandle(Arc::new(Mutex::new(Conn {
            dom,
            id: None,
            period_set: false,
            last: None,
            last_update: 0,
            last_stats: None,
        })))
    }

    /// A fresh sample (it also pins the domain id this handle manages, if not yet).
    pub fn sample(&self) -> Result<DomainSample, ActuatorError> {
        lock(&self.0).sample().cloned()
    }

    /// The domain's maximum memory (its `<memory>`), bytes.
    pub fn maximum(&self) -> Result<u64, ActuatorError> {
        self.sample()?
            .maximum()
            .ok_or_else(|| ActuatorError::Parse("virsh domstats without balloon.maximum".into()))
    }

    /// The [`StatsSource`] reading libvirt's balloon statistics.
    pub fn stats_source(&self) -> LibvirtStats {
        LibvirtStats(self.clone())
    }

    /// The domain this handle drives.
    pub fn domain(&self) -> LibvirtDomain {
        lock(&self.0).dom.clone()
    }
}

impl BalloonActuator for LibvirtHandle {
    fn name(&self) -> &'static str {
        "libvirt"
    }
    fn actual(&mut self) -> Result<u64, ActuatorError> {
        lock(&self.0)
            .sample()?
            .current()
            .ok_or_else(|| ActuatorError::Parse("virsh domstats without balloon.current".into()))
    }
    fn set_target(&mut self, bytes: u64) -> Result<(), ActuatorError> {
        let c = lock(&self.0);
        match c.dom.set_memory(bytes) {
            Ok(()) => Ok(()),
            Err(e) => match c.dom.exists() {
                Ok(false) => Err(ActuatorError::Gone(format!(
                    "libvirt domain {:?} no longer exists",
                    c.dom.domain
                ))),
                _ => Err(e),
            },
        }
    }
}

/// libvirt's balloon statistics (`virsh domstats --balloon`) as a [`StatsSource`] (see
/// [`LibvirtHandle::stats_source`]). They carry no `Committed_AS`: the `selfballoon` policy
/// needs the in-guest agent beside them.
#[derive(Debug, Clone)]
pub struct LibvirtStats(LibvirtHandle);

impl StatsSource for LibvirtStats {
    fn name(&self) -> &'static str {
        "libvirt"
    }
    fn poll(&mut self, epoch: Instant) -> Result<Option<GuestStats>, ActuatorError> {
        let mut c = lock(&(self.0).0);
        let fresh = c
            .last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < SAMPLE_REUSE);
        if !fresh {
            c.sample()?;
        }
        let Some((at, s)) = c.last.clone() else {
            return Ok(None);
        };
        let last = s.last_update();
        if last == 0 {
            return Ok(None); // the guest's balloon driver never reported
        }
        if last == c.last_update {
            return Ok(c.last_stats); // unchanged: keep its timestamp
        }
        let st = s.guest_stats(at.saturating_duration_since(epoch).as_millis() as u64);
        c.last_update = last;
        c.last_stats = Some(st);
        Ok(Some(st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "1\n\nDomain: 'vm 1'\n  state.state=1\n  state.reason=1\n  balloon.current=307200\n  balloon.maximum=524288\n  balloon.swap_in=8\n  balloon.swap_out=16\n  balloon.major_fault=3\n  balloon.minor_fault=8983\n  balloon.unused=231276\n  balloon.available=481412\n  balloon.usable=231112\n  balloon.last-update=1796286799\n  balloon.disk_caches=4928\n  balloon.rss=206392\n\n";

    #[test]
    fn parses_domid_and_domstats() {
        let s = DomainSample::parse(OUT).unwrap();
        assert_eq!(s.id, Some(1));
        assert_eq!(s.state, Some(1));
        assert_eq!(s.current(), Some(307200 * 1024));
        assert_eq!(s.maximum(), Some(512 << 20));
        assert_eq!(s.last_update(), 1796286799);
        let g = s.guest_stats(7);
        assert_eq!(g.t_ms, 7);
        assert_eq!(g.total, Some(481412 * 1024));
        assert_eq!(g.available, Some(231112 * 1024));
        assert_eq!(g.free, Some(231276 * 1024));
        assert_eq!(g.cache, Some(4928 * 1024));
        assert_eq!(g.major_faults, Some(3));
        assert_eq!(g.swap_in_bytes, Some(8192));
        assert_eq!(g.swap_out_bytes, Some(16384));
        assert_eq!(g.committed, None);
    }

    #[test]
    fn inactive_and_broken_output() {
        let s = DomainSample::parse("-\nDomain: 'x'\n  state.state=5\n  state.reason=1\n").unwrap();
        assert_eq!((s.id, s.state, s.current()), (None, Some(5), None));
        assert_eq!(s.last_update(), 0);
        for bad in ["", "x\nDomain: 'a'\n", "3\n", "3\n  balloon.current=1\n"] {
            assert!(DomainSample::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_escaped() {
        assert_eq!(virsh_token("a b;c"), "\\a\\ \\b\\;\\c");
        assert_eq!(virsh_token("é'\""), "\\é\\'\\\"");
    }

    /// A fake `virsh` (a shell script) answers; covers running, a stats period, gone.
    #[test]
    fn fake_virsh_drives_the_handle() {
        let dir = std::env::temp_dir().join(format!("tmem-lv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state");
        let log = dir.join("log");
        let script = dir.join("virsh");
        std::fs::write(&state, "running").unwrap();
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
echo "$@" >> {log}
st=$(cat {state})
case "$*" in
  *"list --all --name"*) [ "$st" = gone ] || echo vm1; exit 0 ;;
  *setmem*) exit 0 ;;
  *dommemstat*) exit 0 ;;
esac
case "$st" in
  running) printf '4\nDomain: %s\n  state.state=1\n  balloon.current=1024\n  balloon.maximum=2048\n  balloon.available=1000\n  balloon.last-update=5\n' "'vm1'" ;;
  restarted) printf '5\nDomain: %s\n  state.state=1\n  balloon.current=2048\n' "'vm1'" ;;
  off) printf '%s\nDomain: %s\n  state.state=5\n' - "'vm1'" ;;
  gone) echo "error: failed to get domain 'vm1'" >&2; exit 1 ;;
esac
"#,
                log = log.display(),
                state = state.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut dom = LibvirtDomain::new("vm1", Some("test:///x".into()));
        dom.virsh = script.clone();
        let mut h = LibvirtHandle::new(dom);
        let epoch = Instant::now();
        assert_eq!(h.actual().unwrap(), 1 << 20);
        assert_eq!(h.maximum().unwrap(), 2 << 20);
        let mut src = h.stats_source();
        let s = src.poll(epoch).unwrap().unwrap();
        assert_eq!(s.total, Some(1000 * 1024));
        h.set_target(3 << 19).unwrap();
        let calls = std::fs::read_to_string(&log).unwrap();
        assert!(calls.contains("-q -c test:///x domid --domain"), "{calls}");
        assert!(
            calls.contains("dommemstat --domain vm1 --period 2 --live"),
            "{calls}"
        );
        assert!(
            calls.contains("setmem --domain vm1 --size 1536 --live"),
            "{calls}"
        );
        for (st, what) in [
            ("restarted", "restarted"),
            ("off", "no longer runs"),
            ("gone", "no longer exists"),
        ] {
            std::fs::write(&state, st).unwrap();
            match h.actual() {
                Err(ActuatorError::Gone(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{st}: {other:?}"),
            }
        }
        // A failure while libvirt still lists the domain is not "gone".
        std::fs::write(&state, "gone").unwrap();
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$*\" in *list*) echo vm1;; *) exit 1;; esac\n",
        )
        .unwrap();
        assert!(matches!(h.actual(), Err(ActuatorError::Libvirt(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
