//! cgroup v2 actuator for containers: the "logical size" is `memory.high`.
//!
//! Setting a target writes `memory.high`; when shrinking below
//! `memory.current` it also writes the difference to `memory.reclaim`
//! (Linux ≥ 5.19) so the kernel reclaims proactively instead of throttling
//! the workload at `memory.high` (oomd Senpai `immediate_backoff` style).

use std::path::{Path, PathBuf};

use std::time::Instant;

use crate::manager::{ActuatorError, BalloonActuator, StatsSource};
use crate::stats::{vmstat_pairs, GuestStats};

/// A cgroup v2 directory used as a balloon.
#[derive(Debug, Clone)]
pub struct CgroupActuator {
    dir: PathBuf,
    max: u64,
    reclaim: bool,
}

impl CgroupActuator {
    /// Control the cgroup at `dir`; `max` stands for `memory.high = max`.
    pub fn new(dir: impl Into<PathBuf>, max: u64) -> Self {
        Self {
            dir: dir.into(),
            max,
            reclaim: true,
        }
    }

    /// Whether to use `memory.reclaim` when shrinking. Default true.
    pub fn with_reclaim(mut self, on: bool) -> Self {
        self.reclaim = on;
        self
    }

    fn read(&self, name: &str) -> Result<String, ActuatorError> {
        let p = self.dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| ActuatorError::Cgroup(p, e))
    }

    fn write(&self, name: &str, v: &str) -> Result<(), ActuatorError> {
        let p = self.dir.join(name);
        std::fs::write(&p, v).map_err(|e| ActuatorError::Cgroup(p, e))
    }

    /// The cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn parse_limit(s: &str, max: u64) -> Result<u64, ActuatorError> {
    match s.trim() {
        "max" => Ok(max),
        t => t
            .parse()
            .map_err(|_| ActuatorError::Parse(format!("cgroup limit {t:?}"))),
    }
}

impl BalloonActuator for CgroupActuator {
    fn name(&self) -> &'static str {
        "cgroup"
    }

    fn actual(&mut self) -> Result<u64, ActuatorError> {
        Ok(parse_limit(&self.read("memory.high")?, self.max)?.min(self.max))
    }

    fn set_target(&mut self, bytes: u64) -> Result<(), ActuatorError> {
        let v = if bytes >= self.max {
            "max".to_string()
        } else {
            bytes.to_string()
        };
        self.write("memory.high", &v)?;
        if self.reclaim {
            let cur = parse_limit(&self.read("memory.current")?, self.max)?;
            if cur > bytes {
                // Best effort: the kernel returns EAGAIN when it cannot reclaim it all.
                let _ = self.write("memory.reclaim", &(cur - bytes).to_string());
            }
        }
        Ok(())
    }
}

/// cgroup v2 statistics as a [`StatsSource`] (for the `pressure` policy;
/// cgroups have no Committed_AS, so `selfballoon` holds).
///
/// * `total` = `memory.high` (or `memory.max`, or the configured max)
/// * `available` = total − (anon + unreclaimable slab); `cache` = file
/// * counters from `memory.stat` (`pgmajfault`, `workingset_refault_*`) and
///   `memory.events` (`oom_kill`); swap in use from `memory.swap.current`.
#[derive(Debug, Clone)]
pub struct CgroupStats {
    dir: PathBuf,
    max: u64,
}

impl CgroupStats {
    /// Stats of the cgroup at `dir`; `max` stands for an unlimited cgroup.
    pub fn new(dir: impl Into<PathBuf>, max: u64) -> Self {
        Self {
            dir: dir.into(),
            max,
        }
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }
}

impl StatsSource for CgroupStats {
    fn name(&self) -> &'static str {
        "cgroup"
    }

    fn poll(&mut self, epoch: Instant) -> Result<Option<GuestStats>, ActuatorError> {
        let p = self.dir.join("memory.stat");
        let stat = std::fs::read_to_string(&p).map_err(|e| ActuatorError::Cgroup(p, e))?;
        let get = |k: &str| vmstat_pairs(&stat).find(|(n, _)| *n == k).map(|(_, v)| v);
        let limit = ["memory.high", "memory.max"]
            .iter()
            .filter_map(|f| self.read(f))
            .filter_map(|t| parse_limit(&t, self.max).ok())
            .find(|&v| v < self.max)
            .unwrap_or(self.max);
        let pinned = get("anon")
            .unwrap_or(0)
            .saturating_add(get("slab_unreclaimable").unwrap_or(0));
        let refaults = match (
            get("workingset_refault_anon"),
            get("workingset_refault_file"),
        ) {
            (None, None) => None,
            (a, f) => Some(a.unwrap_or(0).saturating_add(f.unwrap_or(0))),
        };
        let oom = self.read("memory.events").and_then(|t| {
            vmstat_pairs(&t)
                .find(|(n, _)| *n == "oom_kill")
                .map(|(_, v)| v)
        });
        let swap = self
            .read("memory.swap.current")
            .and_then(|t| t.trim().parse().ok());
        Ok(Some(GuestStats {
            t_ms: epoch.elapsed().as_millis() as u64,
            total: Some(limit),
            available: Some(limit.saturating_sub(pinned)),
            cache: get("file"),
            anon: get("anon"),
            major_faults: get("pgmajfault"),
            refaults,
            oom_kills: oom,
            swap_total: swap,
            swap_free: swap.map(|_| 0),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cgroup_stats() {
        let d = std::env::temp_dir().join(format!("tmem-cgs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        std::fs::write(d.join("memory.high"), "max\n").expect("w");
        std::fs::write(d.join("memory.max"), "1000000\n").expect("w");
        std::fs::write(
            d.join("memory.stat"),
            "anon 300000\nfile 200000\nslab_unreclaimable 50000\npgmajfault 7\nworkingset_refault_anon 1\nworkingset_refault_file 2\n",
        )
        .expect("w");
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 3\nmax 0\noom 0\noom_kill 2\n",
        )
        .expect("w");
        std::fs::write(d.join("memory.swap.current"), "4096\n").expect("w");
        let mut s = CgroupStats::new(&d, u64::MAX);
        let g = s.poll(Instant::now()).expect("poll").expect("some");
        assert_eq!(g.total, Some(1_000_000));
        assert_eq!(g.available, Some(650_000));
        assert_eq!(
            (g.cache, g.major_faults, g.refaults, g.oom_kills),
            (Some(200_000), Some(7), Some(3), Some(2))
        );
        assert_eq!(g.swap_used(), 4096);
        let _ = std::fs::remove_dir_all(&d);
        assert!(s.poll(Instant::now()).is_err());
    }

    #[test]
    fn writes_high_and_reclaim() {
        let d = std::env::temp_dir().join(format!("tmem-cg-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        std::fs::write(d.join("memory.high"), "max\n").expect("w");
        std::fs::write(d.join("memory.current"), "1000\n").expect("w");
        let mut a = CgroupActuator::new(&d, 5000);
        assert_eq!(a.actual().expect("read"), 5000);
        a.set_target(600).expect("set");
        assert_eq!(
            std::fs::read_to_string(d.join("memory.high")).unwrap_or_default(),
            "600"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("memory.reclaim")).unwrap_or_default(),
            "400"
        );
        assert_eq!(a.actual().expect("read"), 600);
        a.set_target(9000).expect("set");
        assert_eq!(
            std::fs::read_to_string(d.join("memory.high")).unwrap_or_default(),
            "max"
        );
        std::fs::write(d.join("memory.high"), "junk").expect("w");
        assert!(matches!(a.actual(), Err(ActuatorError::Parse(_))));
        let _ = std::fs::remove_dir_all(&d);
        assert!(matches!(a.actual(), Err(ActuatorError::Cgroup(..))));
    }
}
