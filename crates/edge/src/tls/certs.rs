//! Certificate sets and SNI selection (RFC 6066 §3; RFC 6125 §6.4 for names and wildcards).
//!
//! A [`CertSet`] is immutable once built; the [`CertResolver`] holds the current one behind a
//! lock and swaps it whole on reload, so a handshake sees either the old set or the new one.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;
use super::der;

/// One loaded certificate chain with its key and what was read from its leaf.
pub(super) struct CertEntry {
    pub(super) key: Arc<CertifiedKey>,
    /// subjectAltName dNSNames, lower case.
    pub(super) names: Vec<String>,
    /// subjectAltName iPAddresses (never selected by SNI, which carries no addresses).
    pub(super) ip_addresses: Vec<IpAddr>,
    /// End of the leaf's validity, Unix seconds.
    pub(super) not_after: i64,
    /// `tls-server-end-point` data for this leaf (RFC 5929 §4.1), computed once at load.
    pub(super) end_point: Option<Vec<u8>>,
}

impl CertEntry {
    /// Whether `name` (lower case) is one of this certificate's names, directly or through a
    /// wildcard covering exactly its first label (RFC 6125 §6.4.3); an IP-literal domain must
    /// be one of its addresses.
    pub(super) fn covers(&self, name: &str) -> bool {
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return self.ip_addresses.contains(&ip);
        }
        let parent = parent_of(name);
        self.names.iter().any(|n| {
            n == name
                || n.strip_prefix("*.")
                    .is_some_and(|suffix| Some(suffix) == parent)
        })
    }
}

impl fmt::Debug for CertEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertEntry")
            .field("names", &self.names)
            .field("ip_addresses", &self.ip_addresses)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The domain below the first label: `a.example.org` → `example.org`; `None` for a single label.
fn parent_of(name: &str) -> Option<&str> {
    name.split_once('.')
        .map(|(_, rest)| rest)
        .filter(|rest| !rest.is_empty())
}

/// Parses one PEM chain and its key into an entry. `cert_path`/`key_path` only name the
/// sources in errors.
pub(super) fn load_entry(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertEntry, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    };
    let info = der::parse_leaf(leaf).map_err(|reason| TlsError::Certificate {
        path: cert_path.to_owned(),
        reason,
    })?;
    let end_point = info.end_point_hash.map(|hash| hash.digest(leaf));

    // PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys are all accepted; the first key in the file wins.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot report its public key; rustls accepts that too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
    }

    Ok(CertEntry {
        key: Arc::new(certified),
        names: info.dns_names,
        ip_addresses: info.ip_addresses,
        not_after: info.not_after,
        end_point,
    })
}

/// An immutable set of certificates indexed by name.
pub(super) struct CertSet {
    entries: Vec<CertEntry>,
    /// Exact names → index of the first entry listing them.
    exact: HashMap<String, usize>,
    /// `example.org` for `*.example.org` → index of the first entry listing the wildcard.
    wildcard: HashMap<String, usize>,
    /// Served without SNI or for an unknown name.
    default: usize,
}

impl CertSet {
    /// Builds the index. The default is the first certificate covering `domains[0]`, else the
    /// first certificate. `None` when `entries` is empty.
    pub(super) fn new(entries: Vec<CertEntry>, domains: &[String]) -> Option<CertSet> {
        if entries.is_empty() {
            return None;
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            for name in &entry.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_insert(index),
                    None => exact.entry(name.clone()).or_insert(index),
                };
            }
        }
        let default = domains
            .first()
            .and_then(|first| entries.iter().position(|e| e.covers(first)))
            .unwrap_or(0);
        Some(CertSet {
            entries,
            exact,
            wildcard,
            default,
        })
    }

    pub(super) fn entries(&self) -> &[CertEntry] {
        &self.entries
    }

    /// The entry to serve for an SNI name (RFC 6066 §3): exact match first, then a wildcard for
    /// its parent domain, then the default. Never `None` in practice: a set is never empty.
    pub(super) fn select(&self, server_name: Option<&str>) -> Option<&CertEntry> {
        let index = server_name
            .and_then(|name| {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                self.exact.get(&name).copied().or_else(|| {
                    parent_of(&name).and_then(|parent| self.wildcard.get(parent).copied())
                })
            })
            .unwrap_or(self.default);
        self.entries.get(index)
    }
}

impl fmt::Debug for CertSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSet")
            .field("entries", &self.entries)
            .field("default", &self.default)
            .finish()
    }
}

/// The certificate resolver shared by every server config of one [`super::TlsManager`].
#[derive(Debug)]
pub(super) struct CertResolver {
    current: RwLock<Arc<CertSet>>,
}

impl CertResolver {
    pub(super) fn new(set: CertSet) -> Self {
        CertResolver {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// The current set. The lock is held only to clone the `Arc`.
    pub(super) fn current(&self) -> Arc<CertSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the set; handshakes already past `resolve` keep the certificate they chose.
    pub(super) fn swap(&self, set: CertSet) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current();
        let entry = set.select(client_hello.server_name())?;
        // The handshake being accepted learns which certificate it serves.
        super::capture::served(entry.end_point.as_deref());
        Some(entry.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(names: &[&str]) -> CertEntry {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        load_entry(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            Path::new("cert.pem"),
            Path::new("key.pem"),
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap()
    }

    #[test]
    fn wildcards_cover_exactly_one_label() {
        let e = entry(&["*.example.org", "chat.test", "10.0.0.1"]);
        assert!(e.covers("muc.example.org"));
        assert!(!e.covers("example.org"));
        assert!(!e.covers("a.muc.example.org"));
        assert!(e.covers("chat.test"));
        assert!(!e.covers("other.test"));
        assert!(e.covers("10.0.0.1"));
        assert!(!e.covers("10.0.0.2"));
    }

    #[test]
    fn selection_prefers_exact_then_wildcard_then_default() {
        let domains = ["b.test".to_owned()];
        let set = CertSet::new(
            vec![
                entry(&["a.test", "*.a.test"]),
                entry(&["x.a.test", "b.test"]),
            ],
            &domains,
        )
        .unwrap();
        let names = |sni: Option<&str>| set.select(sni).unwrap().names.clone();
        assert_eq!(names(Some("x.a.test")), ["x.a.test", "b.test"]);
        assert_eq!(names(Some("X.A.Test.")), ["x.a.test", "b.test"]);
        assert_eq!(names(Some("y.a.test")), ["a.test", "*.a.test"]);
        assert_eq!(names(Some("unknown.test")), ["x.a.test", "b.test"]);
        assert_eq!(names(None), ["x.a.test", "b.test"]);
        assert!(CertSet::new(Vec::new(), &domains).is_none());
    }
}
