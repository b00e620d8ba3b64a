//! Pressure-stall information (`/proc/pressure/memory`, cgroup `memory.pressure`).

use serde::{Deserialize, Serialize};

/// One PSI line (`some` or `full`): averages in percent, total in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    /// Share of wall time stalled over the last 10 s (percent).
    pub avg10: f64,
    /// Over the last 60 s (percent).
    pub avg60: f64,
    /// Over the last 300 s (percent).
    pub avg300: f64,
    /// Cumulative stall time (µs).
    pub total_us: u64,
}

/// Parsed memory PSI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    /// At least one task stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled (absent on very old kernels: zeros).
    pub full: Option<PsiLine>,
}

impl Psi {
    /// Parse PSI text; `None` if the `some` line is missing or malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut some = None;
        let mut full = None;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let kind = it.next();
            let mut l = PsiLine::default();
            let mut seen = 0;
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                match k {
                    "avg10" => l.avg10 = v.parse().ok().filter(|x: &f64| x.is_finite())?,
                    "avg60" => l.avg60 = v.parse().ok().filter(|x: &f64| x.is_finite())?,
                    "avg300" => l.avg300 = v.parse().ok().filter(|x: &f64| x.is_finite())?,
                    "total" => l.total_us = v.parse().ok()?,
                    _ => continue,
                }
                seen += 1;
            }
            if seen < 4 {
                continue;
            }
            match kind {
                Some("some") => some = Some(l),
                Some("full") => full = Some(l),
                _ => {}
            }
        }
        Some(Self { some: some?, full })
    }

    /// Read and parse `/proc/pressure/memory`.
    pub fn read_host() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_psi() {
        let t = "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.70 avg60=0.10 avg300=0.00 total=99\n";
        let p = Psi::parse(t).expect("parses");
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.total_us, 12345);
        assert_eq!(p.full.map(|f| f.avg10), Some(0.7));
        assert!(Psi::parse("some avg10=x avg60=0 avg300=0 total=1\n").is_none());
        assert!(Psi::parse("").is_none());
        let only_some = Psi::parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=0").expect("some");
        assert!(only_some.full.is_none());
        // This host, if PSI is enabled.
        if let Ok(t) = std::fs::read_to_string("/proc/pressure/memory") {
            assert!(Psi::parse(&t).is_some(), "host PSI parses: {t}");
        }
    }
}
