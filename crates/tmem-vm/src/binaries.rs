//! Building the static guest binaries (`tmem-guest`, `tmem-work`).

use std::path::{Path, PathBuf};

use crate::{io_err, Error, Result};

/// The target triple the guest binaries are built for.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Paths of the statically linked guest binaries.
#[derive(Clone, Debug)]
pub struct GuestBinaries {
    /// The in-guest agent.
    pub tmem_guest: PathBuf,
    /// The workload binary.
    pub tmem_work: PathBuf,
}

/// Builds `tmem-guest` and `tmem-work` with `+crt-static` for the guest.
///
/// Uses a separate target directory (`$TMEM_GUEST_TARGET_DIR`, else
/// `<workspace_root>/target/guest`) so the host build is not invalidated by the
/// different `RUSTFLAGS`. Cargo makes repeated calls cheap.
pub fn build_guest_binaries(workspace_root: &Path) -> Result<GuestBinaries> {
    let mut paths = build_static(workspace_root, &["tmem-guest", "tmem-work"])?.into_iter();
    let (Some(tmem_guest), Some(tmem_work)) = (paths.next(), paths.next()) else {
        return Err(Error::Invalid(
            "cargo built fewer binaries than asked".into(),
        ));
    };
    Ok(GuestBinaries {
        tmem_guest,
        tmem_work,
    })
}

/// Builds one workspace binary package (whose binary has the package's name)
/// statically for the guest, like [`build_guest_binaries`]; returns its path.
pub fn build_guest_binary(workspace_root: &Path, package: &str) -> Result<PathBuf> {
    build_static(workspace_root, &[package])?
        .pop()
        .ok_or_else(|| Error::Invalid("cargo built no binary".into()))
}

fn build_static(workspace_root: &Path, packages: &[&str]) -> Result<Vec<PathBuf>> {
    let target_dir = std::env::var_os("TMEM_GUEST_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root.join("target").join("guest"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(&cargo);
    cmd.current_dir(workspace_root)
        .args(["build", "--release", "--target", GUEST_TARGET]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    cmd.arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        // Small binaries make small initramfs images.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true");
    tracing::info!(target_dir = %target_dir.display(), ?packages, "building static guest binaries");
    crate::run_cmd(&mut cmd).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Missing {
                what: "cargo".into(),
                detail: format!("{cargo:?}: {source}"),
            }
        }
        other => other,
    })?;
    let dir = target_dir.join(GUEST_TARGET).join("release");
    let mut out = Vec::new();
    for p in packages {
        let path = dir.join(p);
        if !is_static_elf(&path)? {
            return Err(Error::Invalid(format!(
                "{} is not statically linked",
                path.display()
            )));
        }
        out.push(path);
    }
    Ok(out)
}

/// True if `path` is an ELF executable without a program interpreter
/// (i.e. statically linked). Errors if it cannot be read or is not ELF64.
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let data = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    let not_elf = || {
        Error::Invalid(format!(
            "{} is not a 64-bit little-endian ELF",
            path.display()
        ))
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let phoff = u64_at(0x20).ok_or_else(not_elf)? as usize;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(not_elf)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(not_elf)?);
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).ok_or_else(not_elf)?;
        if p_type == 3 {
            // PT_INTERP
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_detection() {
        // /bin/sh on Debian is dynamic; busybox-static is static.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        if let Some(bb) = crate::test_tool("busybox") {
            assert!(is_static_elf(&bb).unwrap());
        }
        let tmp = std::env::temp_dir().join(format!("tmem-vm-notelf-{}", std::process::id()));
        std::fs::write(&tmp, b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&tmp).is_err());
        std::fs::remove_file(&tmp).unwrap();
    }
}
