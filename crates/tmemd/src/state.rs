//! Saved state: a JSON manifest of clients and exports plus one tmem-core save stream per
//! client, under `DIR/state/`. Every file is written to a temporary name, fsynced and
//! renamed, then the directory is fsynced.
//!
//! The manifest is rewritten (with `clean: false`) on every change of clients or exports, so
//! that exports come back even after a crash; at shutdown the streams are written and the
//! manifest is rewritten with `clean: true`. Streams are only restored from a clean
//! manifest, and are deleted once restored, so stale pages are never served after a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tmem_api::ExportKind;

/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest file name inside the state subdirectory.
pub const MANIFEST: &str = "manifest.json";

/// Errors reading or writing state files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Writing a state file failed.
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    /// Reading a state file failed.
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// The manifest is not valid.
    #[error("Corrupt manifest {0}")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    /// The manifest has a version we do not know.
    #[error("Manifest {0} has unsupported version {1}")]
    Version(PathBuf, u32),
    /// Encoding the manifest failed.
    #[error("Cannot encode manifest")]
    Encode(#[source] serde_json::Error),
}

/// A client as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// Client id.
    pub id: u32,
    /// Weight.
    pub weight: u32,
    /// Persistent cap (`None` = none).
    pub persistent_cap: Option<u64>,
    /// Frozen flag.
    pub frozen: bool,
    /// Save stream file name (in the state subdirectory), when the shutdown was clean.
    pub stream: Option<String>,
}

/// An export as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportEntry {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ExportKind,
    /// Size in bytes (swap).
    pub size: u64,
    /// Client id.
    pub client: u32,
    /// Cached: image path.
    pub image: Option<PathBuf>,
    /// Swap: label of its persistent pool (`swap:<name>`).
    pub pool_label: Option<String>,
    /// Codec name.
    pub codec: String,
    /// Dedup scope name.
    pub dedup: String,
    /// Cached: O_DIRECT.
    pub direct_io: bool,
    /// Who may open it (absent in manifests from before tenancy: open).
    #[serde(default)]
    pub access: tmem_api::ExportAccess,
    /// Cached: whether clients may write the image. Absent in manifests written before
    /// cached exports became read-only by default (`None`): such an export is restored as
    /// it behaved then — writable when the image can be opened for writing, else
    /// read-only — with a warning, and saved with the value it got. New exports are
    /// read-only unless created writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Written by a clean shutdown (streams are current).
    pub clean: bool,
    /// Clients.
    pub clients: Vec<ClientEntry>,
    /// Exports.
    pub exports: Vec<ExportEntry>,
    /// Guests under the balloon manager (re-attached at start).
    #[serde(default)]
    pub guests: Vec<tmem_api::CreateGuest>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            clean: false,
            clients: Vec::new(),
            exports: Vec::new(),
            guests: Vec::new(),
        }
    }
}

/// File name of a client's stream.
pub fn stream_name(client: u32) -> String {
    format!("client-{client}.tmem")
}

/// Writes `path` atomically: a temporary file in the same directory, fsync, rename, fsync of
/// the directory. `fill` writes the content.
pub fn write_atomic<T, E>(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<&File>) -> Result<T, E>,
) -> Result<Result<T, E>, StateError> {
    let tmp = path.with_extension("tmp");
    let wr = |e| StateError::Write(path.to_owned(), e);
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)
        .map_err(wr)?;
    let mut w = io::BufWriter::new(&f);
    let value = match fill(&mut w) {
        Ok(v) => v,
        Err(e) => {
            drop(w);
            let _ = fs::remove_file(&tmp);
            return Ok(Err(e));
        }
    };
    w.flush().map_err(wr)?;
    drop(w);
    f.sync_all().map_err(wr)?;
    drop(f);
    fs::rename(&tmp, path).map_err(wr)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            d.sync_all().map_err(wr)?;
        }
    }
    Ok(Ok(value))
}

/// Writes the manifest atomically.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(m).map_err(StateError::Encode)?;
    let path = dir.join(MANIFEST);
    write_atomic(&path, |w| w.write_all(&bytes))?.map_err(|e| StateError::Write(path, e))
}

/// Reads the manifest; `Ok(None)` if there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, StateError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Read(path, e)),
    };
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt(path.clone(), e))?;
    if m.version != MANIFEST_VERSION {
        return Err(StateError::Version(path, m.version));
    }
    Ok(Some(m))
}

/// Moves a bad state file aside to `NAME.corrupt` (replacing an older one); returns the new path.
pub fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(".corrupt");
    let to = PathBuf::from(name);
    fs::rename(path, &to)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_roundtrip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_manifest(d.path()).unwrap(), None);
        let m = Manifest {
            clean: true,
            clients: vec![ClientEntry {
                id: 1,
                weight: 100,
                persistent_cap: None,
                frozen: false,
                stream: Some(stream_name(1)),
            }],
            exports: vec![ExportEntry {
                name: "s".into(),
                kind: ExportKind::Swap,
                size: 1 << 20,
                client: 1,
                image: None,
                pool_label: Some("swap:s".into()),
                codec: "lz4".into(),
                dedup: "client".into(),
                direct_io: false,
                access: tmem_api::ExportAccess {
                    tenant: Some("t1".into()),
                    allow_uids: vec![107],
                    allow_gids: vec![],
                },
                writable: Some(true),
            }],
            ..Default::default()
        };
        write_manifest(d.path(), &m).unwrap();
        assert_eq!(read_manifest(d.path()).unwrap(), Some(m));
        assert!(!d.path().join("manifest.tmp").exists());
        fs::write(d.path().join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(
            read_manifest(d.path()),
            Err(StateError::Corrupt(..))
        ));
        let to = move_aside(&d.path().join(MANIFEST)).unwrap();
        assert!(to.ends_with("manifest.json.corrupt"));
        assert_eq!(read_manifest(d.path()).unwrap(), None);
    }
}
