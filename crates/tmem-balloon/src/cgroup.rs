//! cgroup v2 actuator for containers: the "logical size" is `memory.high`.
//!
//! Setting a target writes `memory.high`; when shrinking below
//! `memory.current` it also writes the difference to `memory.reclaim`
//! (Linux ≥ 5.19) so the kernel reclaims proactively instead of throttling
//! the workload at `memory.high` (oomd Senpai `immediate_backoff` style).

use std::path::{Path, PathBuf};

use crate::manager::{ActuatorError, BalloonActuator};

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

#[cfg(test)]
mod tests {
    use super::*;

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
