//! What the kernel and the C library say about this process and the machine: resident set,
//! `/proc/meminfo`, `/proc/vmstat`, the heap; plus the glibc heap settings the benchmarks
//! run with.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::process::Command;

/// Fixes glibc's mmap threshold at 128 KiB. By default the threshold starts there but rises
/// (up to 32 MiB) each time an mmapped block is freed, after which large tables (the
/// engine's index hash tables) come from the heap, whose freed memory glibc keeps. With
/// the threshold fixed, every block of 128 KiB or more is mmapped and unmapped on free, so
/// the process's resident set follows what the engine holds.
pub fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes a malloc tunable; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Hands the heap's free memory back to the kernel (`malloc_trim(0)`): glibc keeps freed
/// small blocks otherwise.
pub fn malloc_trim() {
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The C heap's own account (`mallinfo2`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Heap {
    /// Bytes of the main heap (brk) and other arenas.
    pub arena_bytes: u64,
    /// Of those, bytes in use.
    pub in_use_bytes: u64,
    /// Of those, bytes free (kept by malloc).
    pub free_bytes: u64,
    /// Bytes in mmapped blocks.
    pub mmapped_bytes: u64,
}

/// The C heap's figures now.
pub fn heap() -> Heap {
    // SAFETY: mallinfo2 reads malloc's counters and returns them by value.
    let m = unsafe { libc::mallinfo2() };
    Heap {
        arena_bytes: m.arena as u64,
        in_use_bytes: m.uordblks as u64,
        free_bytes: m.fordblks as u64,
        mmapped_bytes: m.hblkhd as u64,
    }
}

fn kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// This process's resident set (`VmRSS`), bytes.
pub fn rss_bytes() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    Ok(kb_field(&s, "VmRSS").context("VmRSS")? * 1024)
}

/// This process's anonymous memory mapped as transparent huge pages, bytes
/// (`AnonHugePages` of `/proc/self/smaps_rollup`; 0 if unknown).
pub fn own_anon_huge_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| kb_field(&s, "AnonHugePages"))
        .unwrap_or(0)
        * 1024
}

/// A `/proc/meminfo` field in KiB (0 if missing).
pub fn meminfo_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| kb_field(&s, field))
        .unwrap_or(0)
}

/// A `/proc/vmstat` counter (0 if missing).
pub fn vmstat(field: &str) -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == field).then(|| it.next()?.parse().ok())?
            })
        })
        .unwrap_or(0)
}

/// Runs a shell command; its standard output.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        anyhow::bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The load averages (1, 5, 15 min) as `/proc/loadavg` shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The date and time now, UTC.
pub fn now_utc() -> String {
    sh("date -u '+%Y-%m-%d %H:%M UTC'")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The selected value of a sysfs setting written as `a [b] c` (or the whole text).
pub fn sysfs_choice(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
            .unwrap_or(s.trim())
            .to_string(),
        Err(_) => "unavailable".into(),
    }
}

/// The median of some figures (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes of free pages waiting in the kernel's per-CPU page lists (the `count:` of every
/// pageset in `/proc/zoneinfo`). Pages a process gives back land there first and are not
/// in `MemFree`/`MemAvailable` until the lists drain (on this kernel they may hold up to
/// `high_max` pages, ≈ 190 MiB, per CPU): add them to see what really became free.
pub fn pcp_free_bytes() -> u64 {
    std::fs::read_to_string("/proc/zoneinfo")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.trim_start().strip_prefix("count:"))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .unwrap_or(0)
        * 4096
}

/// Free memory of the machine counting the per-CPU lists: `MemFree` + [`pcp_free_bytes`].
pub fn free_bytes() -> u64 {
    meminfo_kb("MemFree") * 1024 + pcp_free_bytes()
}

/// What backs this process's `MADV_HUGEPAGE` mappings, from `/proc/self/pagemap` and
/// `/proc/kpageflags` (needs root).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ThpFootprint {
    /// Distinct transparent huge pages with at least one page mapped.
    pub huge_pages: u64,
    /// Of those huge pages, the bytes still mapped (in RSS).
    pub mapped_bytes: u64,
    /// Resident small pages in those mappings.
    pub small_bytes: u64,
}

impl ThpFootprint {
    /// Held by the kernel but no longer in RSS.
    pub fn hidden_bytes(&self) -> u64 {
        (self.huge_pages * (2 << 20)).saturating_sub(self.mapped_bytes)
    }
}

/// Walks the process's `MADV_HUGEPAGE` mappings page by page.
pub fn thp_footprint() -> Result<ThpFootprint> {
    use std::os::unix::fs::FileExt;
    const KPF_THP: u64 = 1 << 22;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut ranges = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                cur = Some((a, b));
                continue;
            }
        }
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if let Some(r) = cur.take() {
                if flags.split_whitespace().any(|f| f == "hg") {
                    ranges.push(r);
                }
            }
        }
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let kflags = std::fs::File::open("/proc/kpageflags").context("/proc/kpageflags (root)")?;
    let mut heads = std::collections::HashSet::new();
    let mut fp = ThpFootprint::default();
    let mut buf = vec![0u8; 8 * 512];
    for (start, end) in ranges {
        let mut addr = start;
        while addr < end {
            let count = ((end - addr) / 4096).min(512) as usize;
            let b = &mut buf[..count * 8];
            pagemap.read_exact_at(b, addr / 4096 * 8)?;
            for e in b.chunks_exact(8) {
                let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                if e >> 63 == 0 {
                    continue;
                }
                let pfn = e & ((1 << 55) - 1);
                let mut f = [0u8; 8];
                kflags.read_exact_at(&mut f, pfn * 8)?;
                if u64::from_le_bytes(f) & KPF_THP != 0 {
                    heads.insert(pfn & !511);
                    fp.mapped_bytes += 4096;
                } else {
                    fp.small_bytes += 4096;
                }
            }
            addr += count as u64 * 4096;
        }
    }
    fp.huge_pages = heads.len() as u64;
    Ok(fp)
}
