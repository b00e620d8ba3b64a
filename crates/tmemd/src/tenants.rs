//! Tenants' TLS keys: the daemon's PSK file (every tenant's key, 0600 in the state
//! directory) and one client key directory per tenant for QEMU (`tls-creds-psk,dir=`) and
//! libnbd (`tls-psk-file=`), published under the runtime directory.
//!
//! Both files use the psktool/nbdkit format (`identity:hexkey`), so an operator can also
//! bring keys made by `psktool` or shared with nbdkit.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tmem_nbd::tls::{decode_hex, encode_hex, generate_key, parse_psk_text, PskError, PskFile};

/// Bytes in a key the daemon makes (256 bits).
pub const KEY_LEN: usize = 32;

/// Errors managing tenant keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file or directory could not be read or written.
    #[error("Tenant key file {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The daemon's PSK file is malformed.
    #[error(transparent)]
    Psk(#[from] PskError),
    /// The supplied key is not hex or has a bad length.
    #[error("Tenant key must be 2..=512 hex digits")]
    BadKey,
    /// The tenant already has a different key.
    #[error("Tenant {0:?} already has a different key (remove its line from {1} to replace it)")]
    Conflict(String, PathBuf),
    /// The random generator failed.
    #[error("Cannot generate a key: {0}")]
    Random(String),
}

/// The daemon's tenant keys.
#[derive(Debug)]
pub struct TenantKeys {
    server_file: PathBuf,
    client_root: PathBuf,
    /// Group that may read the client key directories (the NBD socket's group).
    group: Option<u32>,
    store: Arc<PskFile>,
    /// Serialises changes to the server file.
    write: Mutex<()>,
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |e| KeyError::Io(p.to_owned(), e)
}

impl TenantKeys {
    /// Keys in `server_file`; client key directories under `client_root`, readable by `group`.
    pub fn new(server_file: PathBuf, client_root: PathBuf, group: Option<u32>) -> Self {
        Self {
            store: Arc::new(PskFile::new(&server_file)),
            server_file,
            client_root,
            group,
            write: Mutex::new(()),
        }
    }

    /// The key store the TLS server reads.
    pub fn store(&self) -> Arc<PskFile> {
        Arc::clone(&self.store)
    }

    /// The daemon's PSK file.
    pub fn server_file(&self) -> &Path {
        &self.server_file
    }

    /// The directory holding `tenant`'s `keys.psk` for clients.
    pub fn client_dir(&self, tenant: &str) -> PathBuf {
        self.client_root.join(tenant)
    }

    fn read_keys(&self) -> Result<std::collections::HashMap<String, Vec<u8>>, KeyError> {
        match fs::read_to_string(&self.server_file) {
            Ok(t) => Ok(parse_psk_text(&t, &self.server_file)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(KeyError::Io(self.server_file.clone(), e)),
        }
    }

    /// Makes sure `tenant` has a key — `supplied` (hex) if given and it has none yet, else a
    /// fresh random one — and publishes its client key directory. Returns that directory.
    pub fn ensure(&self, tenant: &str, supplied: Option<&str>) -> Result<PathBuf, KeyError> {
        let supplied = match supplied {
            Some(h) => Some(
                decode_hex(h.trim())
                    .filter(|k| !k.is_empty() && k.len() <= tmem_nbd::tls::MAX_PSK_LEN)
                    .ok_or(KeyError::BadKey)?,
            ),
            None => None,
        };
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let keys = self.read_keys()?;
        let key = match (keys.get(tenant), supplied) {
            (Some(have), Some(s)) if *have != s => {
                return Err(KeyError::Conflict(
                    tenant.to_owned(),
                    self.server_file.clone(),
                ))
            }
            (Some(have), _) => have.clone(),
            (None, s) => {
                let k = match s {
                    Some(k) => k,
                    None => generate_key(KEY_LEN).map_err(|e| KeyError::Random(e.to_string()))?,
                };
                self.append(tenant, &k)?;
                tracing::info!(tenant, file = %self.server_file.display(), "tenant TLS key added");
                k
            }
        };
        self.publish(tenant, &key)
    }

    /// Appends one key line to the server file (written whole to a temporary file, then
    /// renamed over it, mode 0600).
    fn append(&self, tenant: &str, key: &[u8]) -> Result<(), KeyError> {
        let f = &self.server_file;
        if let Some(dir) = f.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut text = match fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(KeyError::Io(f.clone(), e)),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{tenant}:{}\n", encode_hex(key)));
        write_private(f, &text, 0o600, None)
    }

    /// Writes `tenant`'s client key directory (`keys.psk` with its one line).
    fn publish(&self, tenant: &str, key: &[u8]) -> Result<PathBuf, KeyError> {
        let (dir_mode, file_mode) = match self.group {
            Some(_) => (0o750, 0o640),
            None => (0o700, 0o600),
        };
        for d in [&self.client_root, &self.client_dir(tenant)] {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(KeyError::Io(d.clone(), e)),
            }
            crate::secure::own_dir(d, dir_mode)
                .map_err(|e| KeyError::Io(d.clone(), std::io::Error::other(e.to_string())))?;
            if let Some(g) = self.group {
                std::os::unix::fs::chown(d, None, Some(g)).map_err(io_err(d))?;
            }
        }
        let dir = self.client_dir(tenant);
        write_private(
            &dir.join("keys.psk"),
            &format!("{tenant}:{}\n", encode_hex(key)),
            file_mode,
            self.group,
        )?;
        Ok(dir)
    }

    /// Publishes the client key directory of every tenant in `tenants` that has a key (at
    /// start: the runtime directory may be fresh).
    pub fn publish_all<'a>(
        &self,
        tenants: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), KeyError> {
        let keys = self.read_keys()?;
        for t in tenants {
            if let Some(k) = keys.get(t) {
                self.publish(t, k)?;
            }
        }
        Ok(())
    }
}

/// Writes `text` to `path` through a temporary file created with `mode` (never readable by
/// others, even for a moment), then renames it into place.
fn write_private(path: &Path, text: &str, mode: u32, group: Option<u32>) -> Result<(), KeyError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    if let Some(g) = group {
        std::os::unix::fs::chown(&tmp, None, Some(g)).map_err(io_err(&tmp))?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use tmem_nbd::PskStore;

    #[test]
    fn keys_are_made_kept_and_published() {
        let t = tempfile::tempdir().unwrap();
        let k = TenantKeys::new(
            t.path().join("state/tls/keys.psk"),
            t.path().join("run-tls"),
            None,
        );
        let d = k.ensure("alice", None).unwrap();
        let line = fs::read_to_string(d.join("keys.psk")).unwrap();
        assert!(
            line.starts_with("alice:") && line.len() == 6 + 64 + 1,
            "{line}"
        );
        assert_eq!(fs::metadata(k.server_file()).unwrap().mode() & 0o777, 0o600);
        // Same key the second time; a different supplied key is refused; a matching one is fine.
        k.ensure("alice", None).unwrap();
        assert_eq!(fs::read_to_string(d.join("keys.psk")).unwrap(), line);
        assert!(matches!(
            k.ensure("alice", Some("00ff")),
            Err(KeyError::Conflict(..))
        ));
        let hex = line.trim().split_once(':').unwrap().1.to_owned();
        k.ensure("alice", Some(&hex)).unwrap();
        // A supplied key for a new tenant is taken as is; the server store sees both.
        k.ensure("bob", Some("0102abcd")).unwrap();
        assert_eq!(k.store().key("bob"), Some(vec![1, 2, 0xab, 0xcd]));
        assert_eq!(k.store().key("alice"), decode_hex(&hex));
        assert!(matches!(
            k.ensure("carol", Some("xyz")),
            Err(KeyError::BadKey)
        ));
        // Publishing again after the runtime directory vanished restores the client files.
        fs::remove_dir_all(t.path().join("run-tls")).unwrap();
        k.publish_all(["alice", "nobody"]).unwrap();
        assert_eq!(fs::read_to_string(d.join("keys.psk")).unwrap(), line);
    }
}
