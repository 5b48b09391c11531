//! The self-signed development certificate: generated with rcgen (ECDSA P-256, SHA-256) when no
//! certificate is configured, kept in `<data_dir>/tls/{cert,key}.pem` and reused while it still
//! covers every served domain and has not expired.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;

use super::TlsError;
use super::certs::{self, CertEntry};

/// File names inside the generated-certificate directory.
pub(super) const CERT_FILE: &str = "cert.pem";
pub(super) const KEY_FILE: &str = "key.pem";

/// Validity of a generated certificate.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Back-dating of `notBefore`, for clients whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// A certificate this close to its end counts as expired, so the watcher replaces it before
/// clients start refusing it.
pub(super) const RENEW_BEFORE_SECS: i64 = 24 * 3600;

/// Why a certificate was generated rather than reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    Missing,
    Unreadable,
    DomainAdded,
    Expired,
}

impl Reason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "no certificate yet",
            Reason::Unreadable => "existing files unreadable",
            Reason::DomainAdded => "a domain is not covered",
            Reason::Expired => "expired or about to expire",
        }
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Reused,
    Generated(Reason),
}

/// The generated certificate's PEM files and the entry built from them.
pub(super) struct Material {
    pub(super) cert_pem: Vec<u8>,
    pub(super) key_pem: Vec<u8>,
    pub(super) entry: CertEntry,
}

pub(super) fn cert_path(dir: &Path) -> PathBuf {
    dir.join(CERT_FILE)
}

pub(super) fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

/// Loads the certificate in `dir` if it is usable for `domains` at `now` (Unix seconds), else
/// generates and writes a new one.
pub(super) fn ensure(
    dir: &Path,
    domains: &[String],
    now: i64,
    provider: &CryptoProvider,
) -> Result<(Material, Outcome), TlsError> {
    if domains.is_empty() {
        return Err(TlsError::NoDomains);
    }
    let reason = match read_existing(dir, provider) {
        Ok(None) => Reason::Missing,
        Err(error) => {
            tracing::warn!(path = %dir.display(), %error, "generated TLS certificate unreadable");
            Reason::Unreadable
        }
        Ok(Some(material)) => {
            if !domains.iter().all(|d| material.entry.covers(d)) {
                Reason::DomainAdded
            } else if material.entry.not_after <= now.saturating_add(RENEW_BEFORE_SECS) {
                Reason::Expired
            } else {
                return Ok((material, Outcome::Reused));
            }
        }
    };
    let material = generate(dir, domains, now, provider)?;
    Ok((material, Outcome::Generated(reason)))
}

/// `Ok(None)` when neither file exists.
fn read_existing(dir: &Path, provider: &CryptoProvider) -> Result<Option<Material>, TlsError> {
    let cert_path = cert_path(dir);
    let key_path = key_path(dir);
    let cert_pem = match fs::read(&cert_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !key_path.exists() => return Ok(None),
        Err(source) => {
            return Err(TlsError::Read {
                path: cert_path,
                source,
            });
        }
    };
    let key_pem = fs::read(&key_path).map_err(|source| TlsError::Read {
        path: key_path.clone(),
        source,
    })?;
    let entry = certs::load_entry(&cert_pem, &key_pem, &cert_path, &key_path, provider)?;
    Ok(Some(Material {
        cert_pem,
        key_pem,
        entry,
    }))
}

fn generate(
    dir: &Path,
    domains: &[String],
    now: i64,
    provider: &CryptoProvider,
) -> Result<Material, TlsError> {
    let generate_error = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
    let mut params = rcgen::CertificateParams::new(domains.to_vec()).map_err(generate_error)?;
    let mut name = rcgen::DistinguishedName::new();
    if let Some(first) = domains.first() {
        name.push(rcgen::DnType::CommonName, first.as_str());
    }
    name.push(
        rcgen::DnType::OrganizationName,
        "Starling self-signed development certificate",
    );
    params.distinguished_name = name;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now_time = time::OffsetDateTime::from_unix_timestamp(now)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    params.not_before = now_time - BACKDATE;
    params.not_after = now_time + VALIDITY;
    let cert = params.self_signed(&key).map_err(generate_error)?;

    let cert_pem = cert.pem().into_bytes();
    let key_pem = key.serialize_pem().into_bytes();
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = cert_path(dir);
    let key_path = key_path(dir);
    // Key first: a crash between the two renames leaves a pair that fails the key match and is
    // regenerated on the next start, never a certificate served with someone else's key.
    write_atomically(&key_path, &key_pem, true)?;
    write_atomically(&cert_path, &cert_pem, false)?;
    let entry = certs::load_entry(&cert_pem, &key_pem, &cert_path, &key_path, provider)?;
    Ok(Material {
        cert_pem,
        key_pem,
        entry,
    })
}

/// Writes `path` through a temporary file and a rename; `private` files get mode 0600 from
/// creation on, so the key is never readable by others, not even briefly.
fn write_atomically(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(write_error(source)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_error)
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> i64 {
    match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
