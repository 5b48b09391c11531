//! Real handshakes over in-memory pipes against a rustls client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "starling-tls-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(dir: &Path, domains: &[&str], certificates: Vec<CertFiles>) -> TlsSettings {
    TlsSettings {
        certificates,
        data_dir: dir.to_owned(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        reload_check: Duration::from_millis(50),
    }
}

/// A self-signed certificate and key, as PEM.
struct Pem {
    cert: String,
    key: String,
}

fn self_signed(alg: &'static rcgen::SignatureAlgorithm, names: &[&str]) -> Pem {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn write_pair(dir: &Path, stem: &str, pem: &Pem) -> CertFiles {
    let files = CertFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&files.cert, &pem.cert).unwrap();
    std::fs::write(&files.key, &pem.key).unwrap();
    files
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn client_config(
    trusted: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        roots.add(der_of(pem)).unwrap();
    }
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

type Pair = (
    server::TlsStream<DuplexStream>,
    client::TlsStream<DuplexStream>,
);

async fn handshake(server: Arc<rustls::ServerConfig>, client: ClientConfig, name: &str) -> Pair {
    try_handshake(server, client, name).await.unwrap()
}

async fn try_handshake(
    server: Arc<rustls::ServerConfig>,
    client: ClientConfig,
    name: &str,
) -> std::io::Result<Pair> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let (server, client) = tokio::join!(
        TlsAcceptor::from(server).accept(server_io),
        TlsConnector::from(Arc::new(client)).connect(name, client_io),
    );
    Ok((server?, client?))
}

fn served_leaf(pair: &Pair) -> CertificateDer<'static> {
    pair.1.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Sends a line each way over an established pair.
async fn exchange(pair: &mut Pair, text: &[u8]) {
    let (server, client) = pair;
    client.write_all(text).await.unwrap();
    client.flush().await.unwrap();
    let mut buf = vec![0; text.len()];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, text);
    server.write_all(text).await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, text);
}

const BOTH: &[&rustls::SupportedProtocolVersion] = PROTOCOL_VERSIONS;
const TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

#[tokio::test]
async fn generated_certificate_is_created_then_reused() {
    let dir = TempDir::new();
    let manager =
        TlsManager::load(settings(dir.path(), &["localhost", "chat.test"], vec![])).unwrap();
    let cert_path = dir.path().join("tls").join("cert.pem");
    let key_path = dir.path().join("tls").join("key.pem");
    assert_eq!(manager.generated_cert_path(), Some(cert_path.clone()));
    let cert_pem = std::fs::read_to_string(&cert_path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A client trusting the generated certificate connects to both domains.
    for name in ["localhost", "chat.test"] {
        let pair = handshake(
            manager.server_config(Alpn::None),
            client_config(&[&cert_pem], BOTH),
            name,
        )
        .await;
        assert_eq!(served_leaf(&pair), der_of(&cert_pem));
    }

    // A second start reuses the files unchanged.
    let key_pem = std::fs::read(&key_path).unwrap();
    let again =
        TlsManager::load(settings(dir.path(), &["localhost", "chat.test"], vec![])).unwrap();
    assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), cert_pem);
    assert_eq!(std::fs::read(&key_path).unwrap(), key_pem);
    let pair = handshake(
        again.server_config(Alpn::None),
        client_config(&[&cert_pem], BOTH),
        "localhost",
    )
    .await;
    assert_eq!(served_leaf(&pair), der_of(&cert_pem));
    // And reload finds nothing to do.
    assert!(!again.reload().unwrap());
}

#[tokio::test]
async fn generated_certificate_is_regenerated_when_a_domain_is_added() {
    let dir = TempDir::new();
    TlsManager::load(settings(dir.path(), &["localhost"], vec![])).unwrap();
    let cert_path = dir.path().join("tls").join("cert.pem");
    let first = std::fs::read_to_string(&cert_path).unwrap();

    let manager =
        TlsManager::load(settings(dir.path(), &["localhost", "new.test"], vec![])).unwrap();
    let second = std::fs::read_to_string(&cert_path).unwrap();
    assert_ne!(first, second);
    let pair = handshake(
        manager.server_config(Alpn::None),
        client_config(&[&second], BOTH),
        "new.test",
    )
    .await;
    assert_eq!(served_leaf(&pair), der_of(&second));
}

#[test]
fn generated_certificate_with_an_ip_literal_domain_is_reused() {
    let dir = TempDir::new();
    let domains = ["localhost", "127.0.0.1"];
    TlsManager::load(settings(dir.path(), &domains, vec![])).unwrap();
    let cert_path = dir.path().join("tls").join("cert.pem");
    let first = std::fs::read(&cert_path).unwrap();
    TlsManager::load(settings(dir.path(), &domains, vec![])).unwrap();
    assert_eq!(std::fs::read(&cert_path).unwrap(), first);
}

#[tokio::test]
async fn expired_generated_certificate_is_regenerated() {
    let dir = TempDir::new();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let old = params.self_signed(&key).unwrap().pem();
    std::fs::write(tls_dir.join("cert.pem"), &old).unwrap();
    std::fs::write(tls_dir.join("key.pem"), key.serialize_pem()).unwrap();

    let manager = TlsManager::load(settings(dir.path(), &["localhost"], vec![])).unwrap();
    let new = std::fs::read_to_string(tls_dir.join("cert.pem")).unwrap();
    assert_ne!(old, new);
    handshake(
        manager.server_config(Alpn::None),
        client_config(&[&new], BOTH),
        "localhost",
    )
    .await;
}

#[tokio::test]
async fn sni_selects_among_configured_certificates() {
    let dir = TempDir::new();
    let a = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["a.test"]);
    let b = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384, &["b.test", "*.b.test"]);
    let files = vec![
        write_pair(dir.path(), "a", &a),
        write_pair(dir.path(), "b", &b),
    ];
    // b.test is the first domain, so it is also the default.
    let manager = TlsManager::load(settings(dir.path(), &["b.test", "a.test"], files)).unwrap();
    assert_eq!(manager.generated_cert_path(), None);
    let trust = || client_config(&[&a.cert, &b.cert], BOTH);

    let pair = handshake(manager.server_config(Alpn::None), trust(), "a.test").await;
    assert_eq!(served_leaf(&pair), der_of(&a.cert));
    let pair = handshake(manager.server_config(Alpn::None), trust(), "b.test").await;
    assert_eq!(served_leaf(&pair), der_of(&b.cert));
    let pair = handshake(manager.server_config(Alpn::None), trust(), "muc.b.test").await;
    assert_eq!(served_leaf(&pair), der_of(&b.cert));

    // Without SNI the first domain's certificate is served.
    let mut no_sni = trust();
    no_sni.enable_sni = false;
    let pair = handshake(manager.server_config(Alpn::None), no_sni, "b.test").await;
    assert_eq!(served_leaf(&pair), der_of(&b.cert));
    assert_eq!(pair.0.get_ref().1.server_name(), None);
}

#[tokio::test]
async fn direct_tls_negotiates_xmpp_client() {
    let dir = TempDir::new();
    let manager = TlsManager::load(settings(dir.path(), &["localhost"], vec![])).unwrap();
    let cert = std::fs::read_to_string(manager.generated_cert_path().unwrap()).unwrap();

    let mut client = client_config(&[&cert], BOTH);
    client.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let pair = handshake(manager.server_config(Alpn::XmppClient), client, "localhost").await;
    assert_eq!(
        pair.0.get_ref().1.alpn_protocol(),
        Some(&b"xmpp-client"[..])
    );
    assert_eq!(
        pair.1.get_ref().1.alpn_protocol(),
        Some(&b"xmpp-client"[..])
    );

    // STARTTLS offers no ALPN, even to a client asking for it.
    let mut client = client_config(&[&cert], BOTH);
    client.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let pair = handshake(manager.server_config(Alpn::None), client, "localhost").await;
    assert_eq!(pair.1.get_ref().1.alpn_protocol(), None);
}

#[tokio::test]
async fn reload_serves_new_certificate_and_keeps_established_sessions() {
    let dir = TempDir::new();
    let old = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &old)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();
    let new = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let trust = || client_config(&[&old.cert, &new.cert], BOTH);

    let mut established = handshake(manager.server_config(Alpn::None), trust(), "chat.test").await;
    assert_eq!(served_leaf(&established), der_of(&old.cert));
    assert!(!manager.reload().unwrap(), "nothing changed yet");

    write_pair(dir.path(), "chat", &new);
    assert!(manager.reload().unwrap());

    let fresh = handshake(manager.server_config(Alpn::None), trust(), "chat.test").await;
    assert_eq!(served_leaf(&fresh), der_of(&new.cert));
    exchange(&mut established, b"<presence/>").await;
    assert!(
        !manager.reload().unwrap(),
        "second reload of the same files"
    );
}

#[tokio::test]
async fn broken_file_on_reload_keeps_old_certificates() {
    let dir = TempDir::new();
    let good = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &good)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files.clone())).unwrap();

    // A certificate cut short.
    std::fs::write(&files[0].cert, &good.cert[..good.cert.len() / 2]).unwrap();
    assert!(manager.reload().is_err());
    // A key that belongs to another certificate.
    let other = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    std::fs::write(&files[0].cert, &good.cert).unwrap();
    std::fs::write(&files[0].key, &other.key).unwrap();
    assert!(matches!(
        manager.reload(),
        Err(TlsError::KeyMismatch { .. })
    ));
    // A missing key.
    std::fs::remove_file(&files[0].key).unwrap();
    assert!(matches!(manager.reload(), Err(TlsError::Read { .. })));

    let pair = handshake(
        manager.server_config(Alpn::None),
        client_config(&[&good.cert], BOTH),
        "chat.test",
    )
    .await;
    assert_eq!(served_leaf(&pair), der_of(&good.cert));
}

#[tokio::test]
async fn load_refuses_broken_configuration() {
    let dir = TempDir::new();
    let good = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let files = write_pair(dir.path(), "chat", &good);
    std::fs::write(&files.key, "not a key").unwrap();
    assert!(matches!(
        TlsManager::load(settings(dir.path(), &["chat.test"], vec![files.clone()])),
        Err(TlsError::Key { .. })
    ));
    std::fs::write(&files.cert, "").unwrap();
    assert!(matches!(
        TlsManager::load(settings(dir.path(), &["chat.test"], vec![files])),
        Err(TlsError::NoCertificate { .. })
    ));
    assert!(matches!(
        TlsManager::load(settings(dir.path(), &[], vec![])),
        Err(TlsError::NoDomains)
    ));
}

#[tokio::test]
async fn watcher_reloads_changed_files() {
    let dir = TempDir::new();
    let old = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &old)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();
    let cancel = CancellationToken::new();
    let watcher = manager.spawn_watcher(cancel.clone());

    let new = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    write_pair(dir.path(), "chat", &new);
    let trust = || client_config(&[&old.cert, &new.cert], BOTH);
    let mut served_new = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let pair = handshake(manager.server_config(Alpn::None), trust(), "chat.test").await;
        if served_leaf(&pair) == der_of(&new.cert) {
            served_new = true;
            break;
        }
    }
    assert!(served_new, "the watcher never picked up the new files");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn channel_binding_on_tls13() {
    let dir = TempDir::new();
    let pem = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &pem)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();

    let pair = handshake(
        manager.server_config(Alpn::XmppClient),
        client_config(&[&pem.cert], BOTH),
        "chat.test",
    )
    .await;
    let server = pair.0.get_ref().1;
    assert_eq!(
        server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let info = manager.channel_binding(server);

    let client_export = pair
        .1
        .get_ref()
        .1
        .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
        .unwrap();
    assert_eq!(
        info.data(ChannelBindingType::TlsExporter),
        Some(&client_export[..])
    );
    let leaf_hash = sha2::Sha256::digest(der_of(&pem.cert).as_ref());
    assert_eq!(
        info.data(ChannelBindingType::TlsServerEndPoint),
        Some(&leaf_hash[..])
    );
    assert_eq!(
        info.types().collect::<Vec<_>>(),
        [
            ChannelBindingType::TlsExporter,
            ChannelBindingType::TlsServerEndPoint
        ]
    );
}

#[tokio::test]
async fn channel_binding_on_tls12_has_no_exporter() {
    let dir = TempDir::new();
    let pem = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &pem)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();

    let pair = handshake(
        manager.server_config(Alpn::None),
        client_config(&[&pem.cert], TLS12_ONLY),
        "chat.test",
    )
    .await;
    let server = pair.0.get_ref().1;
    assert_eq!(
        server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let info = manager.channel_binding(server);
    assert_eq!(info.data(ChannelBindingType::TlsExporter), None);
    // ECDSA with SHA-384 → SHA-384 of the leaf.
    let leaf_hash = sha2::Sha384::digest(der_of(&pem.cert).as_ref());
    assert_eq!(
        info.data(ChannelBindingType::TlsServerEndPoint),
        Some(&leaf_hash[..])
    );
}

#[tokio::test]
async fn channel_binding_omits_end_point_for_ed25519() {
    let dir = TempDir::new();
    let pem = self_signed(&rcgen::PKCS_ED25519, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &pem)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();
    let pair = handshake(
        manager.server_config(Alpn::None),
        client_config(&[&pem.cert], BOTH),
        "chat.test",
    )
    .await;
    let info = manager.channel_binding(pair.0.get_ref().1);
    assert!(info.data(ChannelBindingType::TlsExporter).is_some());
    assert_eq!(info.data(ChannelBindingType::TlsServerEndPoint), None);
}

#[test]
fn only_tls12_and_tls13_are_enabled() {
    let versions: Vec<_> = PROTOCOL_VERSIONS.iter().map(|v| v.version).collect();
    assert_eq!(
        versions,
        [
            rustls::ProtocolVersion::TLSv1_3,
            rustls::ProtocolVersion::TLSv1_2
        ]
    );
}

/// A hand-written TLS 1.1 ClientHello (rustls clients cannot produce one) is refused.
#[test]
fn tls11_client_hello_is_refused() {
    let dir = TempDir::new();
    let manager = TlsManager::load(settings(dir.path(), &["localhost"], vec![])).unwrap();
    let mut conn = rustls::ServerConnection::new(manager.server_config(Alpn::XmppClient)).unwrap();

    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // empty session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x09, 0x00, 0x2f]); // ECDHE-ECDSA-AES128-SHA, AES128-SHA
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);

    conn.read_tls(&mut &record[..]).unwrap();
    let error = conn.process_new_packets().unwrap_err();
    assert!(
        matches!(error, rustls::Error::PeerIncompatible(_)),
        "unexpected error {error:?}"
    );
}
