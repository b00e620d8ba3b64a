//! Guest images, a QEMU launcher and data disks for tmem's real-VM tests and the lab.
//!
//! - [`ImageBuilder`] builds a bootable (kernel, initramfs) pair from the host's
//!   `linux-image-cloud-amd64` kernel, busybox-static and static binaries of
//!   our own, with an `/init` that runs a workload script and prints
//!   [`MARK_READY`] / [`MARK_EXIT`] markers on the serial console.
//! - [`GuestConfig`] / [`Guest`] launch QEMU with virtio-balloon, QMP, an agent
//!   channel and virtio disks, capture the serial console and always kill the
//!   process on drop.
//! - [`probe_accel`] finds out whether KVM really works here (it may not).
//! - [`build_guest_binaries`] builds `tmem-guest` and `tmem-work` statically.
//! - [`make_data_tree`] / [`make_data_image`] generate a deterministic,
//!   compile-like source tree and pack it into an ext4 image.
//!
//! ```no_run
//! use std::time::Duration;
//! use tmem_vm::{build_guest_binary, Drive, GuestConfig, ImageBuilder, MARK_READY};
//!
//! # fn main() -> tmem_vm::Result<()> {
//! let work = build_guest_binary(std::path::Path::new("."), "tmem-work")?;
//! let image = ImageBuilder::new()
//!     .binary("tmem-work", &work)
//!     .swap("/dev/vda")
//!     .script("tmem-work eatmem --max-mib 64 --rounds 5 --sleep-ms 500\n")
//!     .build()?; // cached by a hash of all inputs
//! let guest = GuestConfig::new("g1")
//!     .memory_mib(256)
//!     .deflate_on_oom(true)
//!     .drive(Drive::nbd("/run/tmem/nbd.sock", "g1-swap"))
//!     .image(image)
//!     .launch()?; // accelerator from probe_accel()
//! guest.wait_for_console(MARK_READY, Duration::from_secs(60))?;
//! // ... talk QMP on guest.qmp_path() ...
//! let code = guest.wait_exit(Duration::from_secs(600))?;
//! assert_eq!(code, 0);
//! # Ok(())
//! # }
//! ```
//!
//! Missing system tools give [`Error::Missing`], which tells the user to run
//! `scripts/setup` as root. Tests across the workspace that need a tool use
//! [`test_tool`] / [`test_kernel`]: they fail under `TMEM_REQUIRE_VM=1` (CI) and
//! skip with a message otherwise.

mod accel;
mod binaries;
mod cgroup;
mod data;
mod guest;
mod image;
mod prereq;

use std::path::PathBuf;

pub use accel::{probe_accel, try_probe_accel, Accel};
pub use binaries::{
    build_guest_binaries, build_guest_binary, is_static_elf, GuestBinaries, GUEST_TARGET,
};
pub use cgroup::MemCgroup;
pub use data::{cached_data_image, make_data_image, make_data_tree, DataTreeStats};
pub use guest::{Drive, DriveSource, Guest, GuestConfig};
pub use image::{newest_cloud_kernel, GuestImage, ImageBuilder, Kernel, DEFAULT_MODULES};
pub use prereq::{
    missing_prerequisite, test_kernel, test_tool, test_tools, vm_required, REQUIRE_VM_ENV,
};

/// Printed by `/init` once modules are loaded and the console is set up.
pub const MARK_READY: &str = "TMEM-READY";
/// Printed by `/init` after the workload, followed by a space and its exit code.
pub const MARK_EXIT: &str = "TMEM-EXIT";

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system tool or file is missing; `scripts/setup` installs it.
    #[error(
        "{what} not found ({detail}); run `sudo scripts/setup` to install the system dependencies"
    )]
    Missing {
        /// What is missing (e.g. "qemu-system-x86_64").
        what: String,
        /// Where we looked, or the underlying error.
        detail: String,
    },
    /// An I/O error on a path.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external command failed.
    #[error("command `{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the message.
        cmd: String,
        /// Its exit status.
        status: String,
        /// The tail of its standard error.
        stderr: String,
    },
    /// The guest did not show what we waited for in time.
    #[error("timed out after {secs:.1}s waiting for {what:?}; console tail:\n{tail}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        secs: f64,
        /// The last lines of the console log.
        tail: String,
    },
    /// QEMU exited before what we waited for appeared.
    #[error("QEMU exited ({status}) while waiting for {what:?}; qemu stderr: {stderr}; console tail:\n{tail}")]
    Exited {
        /// What we waited for.
        what: String,
        /// QEMU's exit status.
        status: String,
        /// QEMU's standard error.
        stderr: String,
        /// The last lines of the console log.
        tail: String,
    },
    /// Invalid configuration or input.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The cache directory for images, data disks and the accelerator probe.
///
/// `$TMEM_VM_CACHE_DIR`, else `$XDG_CACHE_HOME/tmem-vm`, else
/// `$HOME/.cache/tmem-vm`, else `<tmp>/tmem-vm-cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TMEM_VM_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tmem-vm");
    }
    if let Some(d) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join(".cache").join("tmem-vm");
    }
    std::env::temp_dir().join("tmem-vm-cache")
}

/// Finds `name` in `$PATH` (and the sbin directories, which root's PATH may lack).
pub fn find_tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    for dir in std::env::split_paths(&path).chain(extra) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Missing {
        what: name.to_string(),
        detail: "not in PATH".into(),
    })
}

/// Runs a command to completion, returning stdout; errors carry stderr.
pub(crate) fn run_cmd(cmd: &mut std::process::Command) -> Result<Vec<u8>> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io_err(format!("spawning {desc}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(Error::Command {
            cmd: desc,
            status: out.status.to_string(),
            stderr: tail,
        });
    }
    Ok(out.stdout)
}

/// A small non-cryptographic 128-bit content hash (two FNV-1a lanes) for cache keys.
#[derive(Clone, Debug)]
pub struct KeyHasher {
    a: u64,
    b: u64,
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self {
            a: 0xCBF2_9CE4_8422_2325,
            b: 0x6C62_272E_07BB_0142,
        }
    }

    /// Feeds bytes, length-prefixed so that field boundaries matter.
    pub fn update(&mut self, data: &[u8]) -> &mut Self {
        self.raw(&(data.len() as u64).to_le_bytes());
        self.raw(data);
        self
    }

    fn raw(&mut self, data: &[u8]) {
        for &x in data {
            self.a = (self.a ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01B3);
            self.b = (self.b ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01B3) ^ (self.a >> 29);
        }
    }

    /// Feeds a file's content.
    pub fn update_file(&mut self, path: &std::path::Path) -> Result<&mut Self> {
        let data = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
        Ok(self.update(&data))
    }

    /// The digest as 32 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.a, self.b)
    }
}

/// Writes `data` to `path` atomically (temp file in the same directory, then rename).
pub(crate) fn write_atomic(path: &std::path::Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

/// A unique temporary sibling path of `path`.
pub(crate) fn tmp_sibling(path: &std::path::Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hasher_separates_fields() {
        let mut a = KeyHasher::new();
        a.update(b"ab").update(b"c");
        let mut b = KeyHasher::new();
        b.update(b"a").update(b"bc");
        assert_ne!(a.hex(), b.hex());
        let mut c = KeyHasher::new();
        c.update(b"ab").update(b"c");
        assert_eq!(a.hex(), c.hex());
        assert_eq!(a.hex().len(), 32);
    }

    #[test]
    fn find_tool_reports_missing() {
        let e = find_tool("definitely-not-a-tool-xyz").unwrap_err();
        assert!(e.to_string().contains("scripts/setup"), "{e}");
        assert!(find_tool("sh").is_ok());
    }
}
