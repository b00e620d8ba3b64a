//! CPU and I/O accounting of host processes from `/proc/PID/stat` and `/proc/PID/io`.

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a process so far, or `None` if it is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&s).map(|ticks| ticks as f64 / clk_tck())
}

/// Minor page faults of a process so far (`/proc/PID/stat` field 10): for QEMU, mostly
/// the first touch of guest RAM pages the host has not backed yet.
pub fn minor_faults(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // rest starts at field 3 (state): minflt is field 10 → index 7.
    rest.split_whitespace().nth(7)?.parse().ok()
}

/// utime + stime (fields 14 and 15) from a `/proc/PID/stat` line.
pub fn parse_stat_cpu(s: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some(ut + st)
}

/// `(read_bytes, write_bytes)` from `/proc/PID/io`: bytes the process caused to be
/// fetched from / sent to the storage layer.
pub fn io_bytes(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((get("read_bytes:")?, get("write_bytes:")?))
}

/// Resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Proportional set size of a process (`/proc/PID/smaps_rollup` `Pss:`), bytes: its
/// private pages plus its share of pages it shares (KSM-merged pages count once overall).
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let line = "1234 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0";
        assert_eq!(parse_stat_cpu(line), Some(200));
        assert_eq!(parse_stat_cpu("garbage"), None);
        let me = std::process::id();
        assert!(cpu_secs(me).is_some());
        assert!(rss_bytes(me).unwrap_or(0) > 0);
        assert!(pss_bytes(me).unwrap_or(0) > 0);
        assert!(minor_faults(me).unwrap_or(0) > 0);
    }
}
