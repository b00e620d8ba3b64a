//! Accelerator probing: does KVM really boot a guest here?

use std::sync::OnceLock;
use std::time::Duration;

use crate::{cache_dir, Error, GuestConfig, ImageBuilder, Result, MARK_READY};

/// A QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// The name QEMU uses (`-accel NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `kvm` or `tcg` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How long the KVM probe waits for the guest's ready marker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// The accelerator to use for guests, probed once per process.
///
/// `TMEM_ACCEL=kvm|tcg` overrides. Otherwise, if `/dev/kvm` opens, a tiny
/// guest is really booted under KVM and must print its ready marker within
/// 8 s (on some hosts KVM opens but guests hang after decompression); the
/// answer is cached per kernel version in the cache dir. Any failure of the
/// probe itself yields [`Accel::Tcg`] (logged).
pub fn probe_accel() -> Accel {
    static PROBED: OnceLock<Accel> = OnceLock::new();
    *PROBED.get_or_init(|| match try_probe_accel() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("accelerator probe failed, using TCG: {e}");
            Accel::Tcg
        }
    })
}

/// Like [`probe_accel`] but uncached in memory and reporting probe errors.
pub fn try_probe_accel() -> Result<Accel> {
    if let Ok(v) = std::env::var("TMEM_ACCEL") {
        if !v.is_empty() {
            return Accel::parse(&v)
                .ok_or_else(|| Error::Invalid(format!("TMEM_ACCEL={v:?} (want kvm or tcg)")));
        }
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(Accel::Tcg);
    }
    let kernel = crate::newest_cloud_kernel()?;
    let cache = cache_dir().join(format!("accel-{}", kernel.version));
    if let Some(a) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|s| Accel::parse(&s))
    {
        return Ok(a);
    }
    let image = ImageBuilder::new()
        .kernel(kernel)
        .modules::<&str>(&[])
        .script("true\n")
        .build()?;
    let guest = GuestConfig::new("accel-probe")
        .memory_mib(128)
        .accel(Accel::Kvm)
        .balloon(false)
        .qmp(false)
        .image(image)
        .launch()?;
    let accel = match guest.wait_for_console(MARK_READY, PROBE_TIMEOUT) {
        Ok(_) => Accel::Kvm,
        Err(e) => {
            tracing::info!("KVM probe guest did not come up, using TCG: {e}");
            Accel::Tcg
        }
    };
    drop(guest);
    if let Some(parent) = cache.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = crate::write_atomic(&cache, accel.name().as_bytes());
    Ok(accel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(Accel::parse("KVM"), Some(Accel::Kvm));
        assert_eq!(Accel::parse("tcg\n"), Some(Accel::Tcg));
        assert_eq!(Accel::parse("hvf"), None);
        assert_eq!(Accel::Tcg.to_string(), "tcg");
    }
}
