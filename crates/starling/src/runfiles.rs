//! Files `starling serve` keeps in its data directory besides the store:
//!
//! - `secret`: 32 random bytes (mode 0600), created once, used to derive the fake SCRAM salts
//!   that keep unknown accounts indistinguishable from known ones;
//! - `run/listeners.json`: the addresses actually bound, written (atomically, by rename) once
//!   every listener is up and removed on a clean exit. Tests and tools wait for it.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Length of the server secret.
pub(crate) const SECRET_LEN: usize = 32;
/// The secret's file name in the data directory.
pub(crate) const SECRET_FILE: &str = "secret";
/// Directory of run files in the data directory.
pub(crate) const RUN_DIR: &str = "run";
/// The listeners file's name in [`RUN_DIR`].
pub(crate) const LISTENERS_FILE: &str = "listeners.json";

/// Creates `dir` (and parents) if missing; a directory this creates is private (0700).
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Reads `<data_dir>/secret`, or creates it with fresh random bytes (mode 0600) when missing.
pub(crate) fn load_or_create_secret(data_dir: &Path) -> anyhow::Result<[u8; SECRET_LEN]> {
    let path = data_dir.join(SECRET_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let secret: [u8; SECRET_LEN] = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{} holds {} bytes, expected {SECRET_LEN}: remove it to generate a new one \
                     (clients then see different fake salts for unknown accounts)",
                    path.display(),
                    bytes.len()
                )
            })?;
            if let Ok(meta) = fs::metadata(&path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                    "the server secret is readable by other users; chmod 600 it"
                );
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; SECRET_LEN];
            getrandom::fill(&mut secret)
                .map_err(|e| anyhow::anyhow!("no randomness for the server secret: {e}"))?;
            let tmp = data_dir.join(format!("{SECRET_FILE}.tmp"));
            let _ = fs::remove_file(&tmp);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            // `rename` keeps an existing secret from being half-overwritten by a crash.
            fs::rename(&tmp, &path).with_context(|| format!("cannot create {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated a new server secret");
            Ok(secret)
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// The bound addresses, as written to `run/listeners.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listeners {
    pub(crate) c2s_starttls: Vec<SocketAddr>,
    pub(crate) c2s_direct_tls: Vec<SocketAddr>,
    pub(crate) admin: SocketAddr,
}

impl Listeners {
    /// `{"c2s_starttls": [...], "c2s_direct_tls": [...], "admin": "..."}`.
    pub(crate) fn to_json(&self) -> String {
        let list = |addrs: &[SocketAddr]| {
            serde_json::Value::Array(
                addrs
                    .iter()
                    .map(|a| serde_json::Value::String(a.to_string()))
                    .collect(),
            )
        };
        let mut map = serde_json::Map::new();
        map.insert("c2s_starttls".into(), list(&self.c2s_starttls));
        map.insert("c2s_direct_tls".into(), list(&self.c2s_direct_tls));
        map.insert(
            "admin".into(),
            serde_json::Value::String(self.admin.to_string()),
        );
        serde_json::Value::Object(map).to_string()
    }
}

/// `<data_dir>/run/listeners.json`.
#[cfg(test)]
pub(crate) fn listeners_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RUN_DIR).join(LISTENERS_FILE)
}

/// Removes a listeners file left by an earlier run, so nobody mistakes it for this one's.
pub(crate) fn remove_listeners(data_dir: &Path) -> anyhow::Result<()> {
    remove_run_file(data_dir, LISTENERS_FILE)
}

/// Removes `run/<name>` if it exists.
pub(crate) fn remove_run_file(data_dir: &Path, name: &str) -> anyhow::Result<()> {
    let path = data_dir.join(RUN_DIR).join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => bail!("cannot remove {}: {e}", path.display()),
    }
}

/// Writes `run/listeners.json` through a temporary file and a rename, so a reader sees the
/// whole file or none.
pub(crate) fn write_listeners(data_dir: &Path, listeners: &Listeners) -> anyhow::Result<PathBuf> {
    write_run_file(data_dir, LISTENERS_FILE, &listeners.to_json())
}

/// Writes `run/<name>` atomically (temporary file and rename).
pub(crate) fn write_run_file(
    data_dir: &Path,
    name: &str,
    contents: &str,
) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join(RUN_DIR);
    create_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn secret_is_created_once_private_and_kept() {
        let dir = TempDir::new("secret");
        let first = load_or_create_secret(dir.path()).unwrap();
        let path = dir.path().join(SECRET_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&path).unwrap(), first);
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), first);
        assert_ne!(first, [0u8; SECRET_LEN]);

        fs::write(&path, b"short").unwrap();
        let e = load_or_create_secret(dir.path()).unwrap_err().to_string();
        assert!(e.contains("holds 5 bytes"), "{e}");
    }

    #[test]
    fn listeners_file_is_the_documented_json() {
        let dir = TempDir::new("listeners");
        let listeners = Listeners {
            c2s_starttls: vec![
                "127.0.0.1:5222".parse().unwrap(),
                "[::1]:5222".parse().unwrap(),
            ],
            c2s_direct_tls: vec![],
            admin: "127.0.0.1:5280".parse().unwrap(),
        };
        let path = write_listeners(dir.path(), &listeners).unwrap();
        assert_eq!(path, listeners_path(dir.path()));
        let value: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "c2s_starttls": ["127.0.0.1:5222", "[::1]:5222"],
                "c2s_direct_tls": [],
                "admin": "127.0.0.1:5280",
            })
        );
        assert!(!dir.path().join(RUN_DIR).join("listeners.json.tmp").exists());
        remove_listeners(dir.path()).unwrap();
        assert!(!path.exists());
        remove_listeners(dir.path()).unwrap();
    }
}
