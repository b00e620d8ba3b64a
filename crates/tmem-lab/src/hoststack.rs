//! The host memory stack KVM operators run today, for the `modern` rows: a host swap
//! file with zswap (lz4) in front of it, and KSM merging identical guest pages (QEMU marks
//! guest RAM mergeable by default). Free page reporting is a guest device flag and is set
//! where the guests are launched.
//!
//! [`ModernStack::enable`] records the host's settings in a file *before* changing them
//! and puts them back on drop (error, panic, end of run). A run killed outright leaves the
//! record behind; the next `enable` (or [`restore_leftover`]) restores from it first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

const ZSWAP: &str = "/sys/module/zswap/parameters";
const KSM: &str = "/sys/kernel/mm/ksm";
/// zswap compressors of the modern rows, in order of preference: lz4 (what operators pick
/// for speed), else lzo-rle (zram's default, same speed class), else lzo (zswap's default).
pub const ZSWAP_COMPRESSORS: [&str; 3] = ["lz4", "lzo-rle", "lzo"];

/// Where the host's previous settings are kept while the stack is on.
const RECORD: &str = "/var/tmp/tmem-lab-host-settings.json";

/// The host settings we change, as they were.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Saved {
    zswap_enabled: Option<String>,
    zswap_compressor: Option<String>,
    zswap_shrinker: Option<String>,
    ksm_run: Option<String>,
    ksm_pages_to_scan: Option<String>,
    ksm_sleep_millisecs: Option<String>,
    /// The swap file we made (switched off and removed on restore).
    swap_file: Option<PathBuf>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn write(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {path}"))
}

impl Saved {
    fn capture() -> Self {
        Saved {
            zswap_enabled: read(&format!("{ZSWAP}/enabled")),
            zswap_compressor: read(&format!("{ZSWAP}/compressor")),
            zswap_shrinker: read(&format!("{ZSWAP}/shrinker_enabled")),
            ksm_run: read(&format!("{KSM}/run")),
            ksm_pages_to_scan: read(&format!("{KSM}/pages_to_scan")),
            ksm_sleep_millisecs: read(&format!("{KSM}/sleep_millisecs")),
            swap_file: None,
        }
    }

    /// Puts everything back; reports (but goes on past) each failure.
    fn restore(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(f) = &self.swap_file {
            if f.exists() {
                let swapped_on = std::fs::read_to_string("/proc/swaps")
                    .map(|s| s.lines().any(|l| l.split_whitespace().next() == f.to_str()))
                    .unwrap_or(false);
                if swapped_on {
                    match Command::new("swapoff").arg(f).status() {
                        Ok(s) if s.success() => {}
                        Ok(s) => errors.push(format!("swapoff {}: {s}", f.display())),
                        Err(e) => errors.push(format!("swapoff {}: {e}", f.display())),
                    }
                }
                if let Err(e) = std::fs::remove_file(f) {
                    errors.push(format!("removing {}: {e}", f.display()));
                }
            }
        }
        let settings = [
            (format!("{ZSWAP}/enabled"), &self.zswap_enabled),
            (format!("{ZSWAP}/compressor"), &self.zswap_compressor),
            (format!("{ZSWAP}/shrinker_enabled"), &self.zswap_shrinker),
            (format!("{KSM}/pages_to_scan"), &self.ksm_pages_to_scan),
            (format!("{KSM}/sleep_millisecs"), &self.ksm_sleep_millisecs),
            (format!("{KSM}/run"), &self.ksm_run),
        ];
        for (path, value) in settings {
            if let Some(v) = value {
                if read(&path).as_deref() != Some(v.as_str()) {
                    if let Err(e) = write(&path, v) {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        errors
    }
}

/// Restores the settings a killed run left changed (its record file), if any.
pub fn restore_leftover() -> Result<()> {
    let Ok(text) = std::fs::read_to_string(RECORD) else {
        return Ok(());
    };
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{RECORD} is not a tmem-lab settings record"))?;
    eprintln!("tmem-lab: restoring the host settings a previous run left changed ({RECORD})");
    let errors = saved.restore();
    if !errors.is_empty() {
        bail!("restoring from {RECORD}: {}", errors.join("; "));
    }
    std::fs::remove_file(RECORD).with_context(|| format!("removing {RECORD}"))?;
    Ok(())
}

/// Whether some tmem-lab run's modern stack is on now (its settings record exists).
pub fn stack_on() -> bool {
    Path::new(RECORD).exists()
}

/// What the modern stack is made of in this run (for the report).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StackInfo {
    /// Host swap file size, bytes.
    pub swap_bytes: u64,
    /// zswap compressor in use (the first of the wanted ones this kernel has).
    pub zswap_compressor: String,
    /// Compressors asked for before it that this kernel lacks.
    #[serde(default)]
    pub zswap_unavailable: Vec<String>,
    /// zswap's pool cap, % of RAM.
    pub zswap_max_pool_percent: String,
    /// KSM pages_to_scan / sleep_millisecs.
    pub ksm_scan: String,
}

/// The modern stack, on while this lives.
#[derive(Debug)]
pub struct ModernStack {
    saved: Saved,
    info: StackInfo,
}

/// KSM scan rate of the modern rows: ~4 000 pages (16 MiB) per 20 ms wake-up at most,
/// enough to merge the guests' identical pages within a run (the kernel's default, 100
/// pages per 20 ms, takes minutes per GiB).
const KSM_PAGES_TO_SCAN: &str = "1000";
const KSM_SLEEP_MS: &str = "20";

impl ModernStack {
    /// Makes a swap file of `swap_bytes` in `dir` (a disk filesystem, not tmpfs), turns on
    /// zswap with the first of `compressors` the kernel has (e.g. `lz4`, then `lzo-rle`)
    /// and its shrinker, and KSM.
    pub fn enable(dir: &Path, swap_bytes: u64, compressors: &[&str]) -> Result<Self> {
        restore_leftover()?;
        for p in [format!("{ZSWAP}/enabled"), format!("{KSM}/run")] {
            if !Path::new(&p).exists() {
                bail!("the modern stack needs {p} (zswap and KSM in the host kernel)");
            }
        }
        let mut saved = Saved::capture();
        let swap_file = dir.join(format!("tmem-lab-swap-{}", std::process::id()));
        saved.swap_file = Some(swap_file.clone());
        std::fs::write(RECORD, serde_json::to_vec_pretty(&saved)?)
            .with_context(|| format!("writing {RECORD}"))?;
        // From here on, drop restores.
        let stack = ModernStack {
            saved,
            info: StackInfo {
                swap_bytes,
                ..Default::default()
            },
        };
        make_swap_file(&swap_file, swap_bytes)?;
        let mut stack = stack;
        // zswap takes a compressor the crypto API lacks without complaint before its first
        // pool exists (and falls back to its default): read back what it uses.
        let param = format!("{ZSWAP}/compressor");
        let mut chosen = None;
        for c in compressors {
            if write(&param, c).is_ok() && read(&param).as_deref() == Some(*c) {
                chosen = Some(c.to_string());
                break;
            }
            stack.info.zswap_unavailable.push(c.to_string());
        }
        if chosen.is_none() {
            bail!("zswap has none of the compressors {compressors:?} in this kernel");
        }
        write(&format!("{ZSWAP}/enabled"), "Y")?;
        if Path::new(&format!("{ZSWAP}/shrinker_enabled")).exists() {
            write(&format!("{ZSWAP}/shrinker_enabled"), "Y")?;
        }
        write(&format!("{KSM}/pages_to_scan"), KSM_PAGES_TO_SCAN)?;
        write(&format!("{KSM}/sleep_millisecs"), KSM_SLEEP_MS)?;
        write(&format!("{KSM}/run"), "1")?;
        stack.info.zswap_compressor = read(&format!("{ZSWAP}/compressor")).unwrap_or_default();
        stack.info.zswap_max_pool_percent =
            read(&format!("{ZSWAP}/max_pool_percent")).unwrap_or_default();
        stack.info.ksm_scan = format!("{KSM_PAGES_TO_SCAN} pages / {KSM_SLEEP_MS} ms");
        Ok(stack)
    }

    /// What is on.
    pub fn info(&self) -> &StackInfo {
        &self.info
    }
}

impl Drop for ModernStack {
    fn drop(&mut self) {
        let errors = self.saved.restore();
        if errors.is_empty() {
            let _ = std::fs::remove_file(RECORD);
        } else {
            eprintln!(
                "tmem-lab: could not restore every host setting (kept {RECORD}): {}",
                errors.join("; ")
            );
        }
    }
}

/// A swap file without holes (swapon refuses sparse files), `mkswap`ed and switched on
/// at a priority above any other swap of the host.
fn make_swap_file(path: &Path, bytes: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .with_context(|| format!("filling {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()?;
    drop(f);
    for (cmd, args) in [
        ("mkswap", vec!["-q".to_string()]),
        ("swapon", vec!["-p".to_string(), "32767".to_string()]),
    ] {
        let out = Command::new(cmd)
            .args(&args)
            .arg(path)
            .output()
            .with_context(|| format!("running {cmd}"))?;
        if !out.status.success() {
            bail!(
                "{cmd} {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Host-wide counters of the modern stack, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Swap in use (SwapTotal − SwapFree).
    pub swap_used: u64,
    /// The zswap pool (`Zswap:`, compressed).
    pub zswap: u64,
    /// What KSM saves (pages_sharing × 4 KiB).
    pub ksm_saved: u64,
}

/// Reads [`HostCounters`] from `/proc/meminfo` and KSM's sysfs.
pub fn host_counters() -> HostCounters {
    let mut c = HostCounters::default();
    let mut swap_total = 0;
    let mut swap_free = 0;
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    for (k, v) in tmem_balloon::stats::meminfo_pairs(&text) {
        match k {
            "SwapTotal" => swap_total = v,
            "SwapFree" => swap_free = v,
            "Zswap" => c.zswap = v,
            _ => {}
        }
    }
    c.swap_used = swap_total.saturating_sub(swap_free);
    let sharing: u64 = read(&format!("{KSM}/pages_sharing"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    c.ksm_saved = sharing * 4096;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swaps() -> String {
        std::fs::read_to_string("/proc/swaps").unwrap_or_default()
    }

    /// Changes the host's swap, zswap and KSM settings and checks they come back, after a
    /// normal end and after a run that died without cleaning up (`mem::forget`).
    #[test]
    fn host_settings_come_back_after_drop_and_after_a_killed_run() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            tmem_vm::missing_prerequisite("root", "switching swap, zswap and KSM needs root");
            return;
        }
        if tmem_vm::test_tools(["mkswap", "swapon", "swapoff"]).is_none() {
            return;
        }
        if !Path::new(ZSWAP).exists() || !Path::new(KSM).exists() {
            tmem_vm::missing_prerequisite("zswap and KSM", "not in this kernel");
            return;
        }
        let dir = std::env::temp_dir();
        // A record left by something else would be restored first: start clean.
        restore_leftover().expect("restoring a leftover record");
        let before = Saved::capture();
        let swaps_before = swaps();

        let st = ModernStack::enable(&dir, 16 << 20, &["lz4", "lzo-rle", "lzo"])
            .expect("enabling the stack");
        let comp = st.info().zswap_compressor.clone();
        let file = st.saved.swap_file.clone().expect("a swap file");
        assert!(
            swaps().contains(file.to_str().unwrap_or("?")),
            "{}",
            swaps()
        );
        assert_eq!(read(&format!("{ZSWAP}/enabled")).as_deref(), Some("Y"));
        assert!(["lz4", "lzo-rle", "lzo"].contains(&comp.as_str()), "{comp}");
        assert_eq!(read(&format!("{ZSWAP}/compressor")), Some(comp));
        assert_eq!(read(&format!("{KSM}/run")).as_deref(), Some("1"));
        assert!(Path::new(RECORD).exists());
        drop(st);
        assert_eq!(Saved::capture(), before);
        assert_eq!(swaps(), swaps_before);
        assert!(!file.exists() && !Path::new(RECORD).exists());

        // A run killed outright: nothing restored until the next one starts.
        let st = ModernStack::enable(&dir, 16 << 20, &["lzo"]).expect("enabling again");
        let file = st.saved.swap_file.clone().expect("a swap file");
        std::mem::forget(st);
        assert_eq!(read(&format!("{ZSWAP}/enabled")).as_deref(), Some("Y"));
        restore_leftover().expect("restoring after the killed run");
        assert_eq!(Saved::capture(), before);
        assert_eq!(swaps(), swaps_before);
        assert!(!file.exists() && !Path::new(RECORD).exists());
    }
}
