//! Capture of real page data: the present anonymous pages of running processes, read
//! through `/proc/PID/pagemap` and `/proc/PID/mem` (needs root or ptrace rights).

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

const PAGE: u64 = 4096;

/// One mapping of a process.
struct Mapping {
    start: u64,
    end: u64,
    anon: bool,
    readable: bool,
}

fn mappings(pid: u32) -> Result<Vec<Mapping>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let anon = path.is_empty() || path == "[heap]" || path == "[stack]";
        out.push(Mapping {
            start,
            end,
            anon,
            readable: perms.starts_with('r') && path != "[vvar]" && path != "[vsyscall]",
        });
    }
    Ok(out)
}

/// Appends the present anonymous pages of `pid` to `out`; returns how many were written.
pub fn dump_process(pid: u32, out: &mut impl Write) -> Result<u64> {
    let pagemap =
        File::open(format!("/proc/{pid}/pagemap")).context("opening pagemap (run as root)")?;
    let mem = File::open(format!("/proc/{pid}/mem")).context("opening mem (run as root)")?;
    let mut n = 0;
    let mut entries = vec![0u8; 8 * 512];
    let mut page = vec![0u8; PAGE as usize];
    for m in mappings(pid)?.into_iter().filter(|m| m.anon && m.readable) {
        let mut addr = m.start;
        while addr < m.end {
            let count = ((m.end - addr) / PAGE).min(512) as usize;
            let buf = &mut entries[..count * 8];
            if pagemap.read_exact_at(buf, addr / PAGE * 8).is_err() {
                break;
            }
            for i in 0..count {
                let mut e = [0u8; 8];
                e.copy_from_slice(&buf[i * 8..i * 8 + 8]);
                let present = u64::from_le_bytes(e) >> 63 == 1;
                if present && mem.read_exact_at(&mut page, addr + i as u64 * PAGE).is_ok() {
                    out.write_all(&page)?;
                    n += 1;
                }
            }
            addr += count as u64 * PAGE;
        }
    }
    Ok(n)
}
