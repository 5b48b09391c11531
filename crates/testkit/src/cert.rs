//! The shared test certificate: a throw-away CA and a leaf certificate it signed, generated
//! once per test process with rcgen (ECDSA P-256) and written to a per-process directory.
//!
//! Every [`crate::TestServer`] presents the leaf through `[tls] certificates` (RFC 6120 §13.7.1.2
//! and RFC 6125: the leaf names each test domain as a DNS SAN), so a client trusts one file for
//! every server of the run. A CA-signed leaf (rather than a self-signed one) keeps strict
//! verifiers happy: OpenSSL's `X509_V_FLAG_X509_STRICT` (Python 3.13's default) wants a CA with
//! basic constraints and key identifiers, which rcgen writes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;

use crate::HarnessError;
use crate::paths;

/// The names the leaf certificate is valid for. Test servers may serve only domains these
/// names cover ([`TestCert::covers`]).
pub const CERT_NAMES: &[&str] = &["localhost", "example.test", "*.example.test"];

/// The files of the shared test certificate.
#[derive(Debug, Clone)]
pub struct TestCert {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl TestCert {
    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cert.pem`: the server's chain, leaf then CA. A client may trust this file as it is
    /// (its CA is in it).
    pub fn cert_pem_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// `key.pem`: the leaf's private key (PKCS#8).
    pub fn key_pem_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// `ca.pem`: only the CA, the one trust anchor clients need.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA certificate in DER, to put in a rustls root store.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// A rustls client configuration (ring provider) trusting only the test CA, with ALPN set
    /// to `alpn` (XEP-0368 asks for `xmpp-client` on direct TLS).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, HarnessError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|e| HarnessError::Cert(format!("adding the test CA to a root store: {e}")))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HarnessError::Cert(format!("rustls protocol versions: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// Whether the leaf is valid for `domain` (exact names, and `*.example.test` for one label).
    pub fn covers(domain: &str) -> bool {
        let domain = domain.to_ascii_lowercase();
        CERT_NAMES.iter().any(|name| match name.strip_prefix("*.") {
            Some(parent) => domain
                .strip_suffix(parent)
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => *name == domain,
        })
    }
}

/// The test certificate of this process, generated on first use.
pub fn shared_cert() -> Result<&'static TestCert, HarnessError> {
    static CERT: OnceLock<Result<TestCert, String>> = OnceLock::new();
    CERT.get_or_init(|| generate().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| HarnessError::Cert(e.clone()))
}

fn generate() -> Result<TestCert, HarnessError> {
    let cert_err = |e: rcgen::Error| HarnessError::Cert(e.to_string());
    paths::remove_stale("cert");
    let dir = paths::unique_dir("cert")?;

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Starling test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let names: Vec<String> = CERT_NAMES
        .iter()
        .map(|n| (*n).to_owned())
        .chain(["127.0.0.1".to_owned(), "::1".to_owned()])
        .collect();
    let mut leaf_params = CertificateParams::new(names).map_err(cert_err)?;
    leaf_params.distinguished_name = rcgen::DistinguishedName::new();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "example.test");
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .map_err(cert_err)?;

    let write = |name: &str, contents: String| {
        let path = dir.join(name);
        std::fs::write(&path, contents)
            .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
    };
    write("cert.pem", format!("{}{}", leaf_cert.pem(), ca_cert.pem()))?;
    write("key.pem", leaf_key.serialize_pem())?;
    write("ca.pem", ca_cert.pem())?;
    Ok(TestCert {
        dir,
        ca_der: ca_cert.der().clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_covered() {
        assert!(TestCert::covers("localhost"));
        assert!(TestCert::covers("example.test"));
        assert!(TestCert::covers("a.example.test"));
        assert!(TestCert::covers("B.Example.Test"));
        assert!(!TestCert::covers("a.b.example.test"));
        assert!(!TestCert::covers(".example.test"));
        assert!(!TestCert::covers("example.org"));
        assert!(!TestCert::covers("notexample.test"));
    }

    #[test]
    fn generated_once_with_all_files() {
        let a = shared_cert().unwrap();
        let b = shared_cert().unwrap();
        assert_eq!(a.dir(), b.dir());
        let chain = std::fs::read_to_string(a.cert_pem_path()).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let key = std::fs::read_to_string(a.key_pem_path()).unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"));
        let ca = std::fs::read_to_string(a.ca_pem_path()).unwrap();
        assert_eq!(ca.matches("BEGIN CERTIFICATE").count(), 1);
        assert!(chain.ends_with(&ca));
    }

    #[tokio::test]
    async fn a_rustls_client_trusting_the_ca_accepts_the_leaf() {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let cert = shared_cert().unwrap();
        let chain: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_file_iter(cert.cert_pem_path())
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = rustls_pki_types::pem::PemObject::from_pem_file(cert.key_pem_path()).unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let names = ["example.test", "sub.example.test", "localhost"];
        let server = tokio::spawn(async move {
            for _ in 0..names.len() {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                tls.write_all(b"hello").await.unwrap();
                tls.shutdown().await.unwrap();
            }
        });
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(cert.client_config(&[]).unwrap()));
        for name in names {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
            let mut tls = connector.connect(server_name, tcp).await.unwrap();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "{name}");
        }
        server.await.unwrap();
    }
}
