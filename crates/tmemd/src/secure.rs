//! Directories and sockets that fit a real host: the daemon refuses a runtime or state
//! directory that is a symlink or belongs to someone else (e.g. a `/tmp/tmem-UID` another
//! user created first), tightens one that is group- or world-writable, and gives its
//! sockets the owner group and mode the operator chose — so that, say, libvirt's QEMU
//! user can reach `nbd.sock` while `ctl.sock` stays root's.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a directory or socket setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The directory is a symbolic link.
    #[error("{0} is a symbolic link; refusing to use it")]
    Symlink(PathBuf),
    /// The directory belongs to another user.
    #[error("{0} is owned by uid {1}, not by this daemon (uid {2}); refusing to use it")]
    Owner(PathBuf, u32, u32),
    /// The directory cannot be inspected or changed.
    #[error("Cannot check {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// No such group.
    #[error("Unknown group {0:?}")]
    UnknownGroup(String),
    /// A mode that is not an octal permission.
    #[error("Invalid socket mode {0:?} (octal, e.g. \"0660\")")]
    Mode(String),
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Checks a directory the daemon created or found: not a symlink, owned by this process's
/// user; a group- or world-writable mode is tightened to `mode`, which is set in any case.
pub fn own_dir(dir: &Path, mode: u32) -> Result<(), SecureError> {
    let meta = fs::symlink_metadata(dir).map_err(|e| SecureError::Io(dir.to_owned(), e))?;
    if meta.file_type().is_symlink() {
        return Err(SecureError::Symlink(dir.to_owned()));
    }
    let me = euid();
    if meta.uid() != me {
        return Err(SecureError::Owner(dir.to_owned(), meta.uid(), me));
    }
    if meta.mode() & 0o022 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o7777), "directory was group- or world-writable; tightening it");
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| SecureError::Io(dir.to_owned(), e))
}

/// The group id of a group name (or a number).
pub fn group_id(name: &str) -> Result<u32, SecureError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let groups = fs::read_to_string("/etc/group")
        .map_err(|e| SecureError::Io(PathBuf::from("/etc/group"), e))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| SecureError::UnknownGroup(name.to_owned()))
}

/// Parses an octal permission mode ("0660", "660").
pub fn parse_mode(s: &str) -> Result<u32, SecureError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| SecureError::Mode(s.to_owned()))
}

/// Gives `path` (a socket, or a directory) the group `gid` (if any) and `mode`.
pub fn set_owner_and_mode(path: &Path, gid: Option<u32>, mode: u32) -> Result<(), SecureError> {
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g))
            .map_err(|e| SecureError::Io(path.to_owned(), e))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| SecureError::Io(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_groups_parse() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("7777").is_err());
        assert_eq!(group_id("root").unwrap(), 0);
        assert_eq!(group_id("123").unwrap(), 123);
        assert!(group_id("no-such-group-tmem").is_err());
    }

    #[test]
    fn symlinks_and_foreign_dirs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o777)).unwrap();
        own_dir(&real, 0o700).unwrap();
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o777, 0o700);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            own_dir(&link, 0o700),
            Err(SecureError::Symlink(_))
        ));
        // Another user's directory needs root to make; as root, always checked.
        if euid() == 0 {
            let theirs = t.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            assert!(matches!(
                own_dir(&theirs, 0o700),
                Err(SecureError::Owner(_, 65534, 0))
            ));
        }
    }
}
