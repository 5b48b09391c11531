//! Real handshakes over loopback TCP between [`TlsManager::accept`] and a rustls client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsConnector, client};

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
    client_config_with(rustls::crypto::ring::default_provider(), trusted, versions)
}

fn client_config_with(
    provider: rustls::crypto::CryptoProvider,
    trusted: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        roots.add(der_of(pem)).unwrap();
    }
    ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A manager serving `localhost` with a generated certificate, and that certificate (PEM).
fn generated_localhost(dir: &TempDir) -> (Arc<TlsManager>, String) {
    let manager = TlsManager::load(settings(dir.path(), &["localhost"], vec![])).unwrap();
    let cert = std::fs::read_to_string(manager.generated_cert_path().unwrap()).unwrap();
    (manager, cert)
}

/// A manager serving `chat.test` with a self-signed certificate of `alg`, and its PEM.
fn chat_test(dir: &TempDir, alg: &'static rcgen::SignatureAlgorithm) -> (Arc<TlsManager>, Pem) {
    let pem = self_signed(alg, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &pem)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();
    (manager, pem)
}

/// The `tls-exporter` value as the client computes it (RFC 9266).
fn client_exporter(pair: &Pair) -> [u8; 32] {
    pair.client
        .get_ref()
        .1
        .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
        .unwrap()
}

/// A STARTTLS handshake with a client that trusts `cert` and offers `versions`.
async fn localhost_pair(
    manager: &TlsManager,
    cert: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Pair {
    handshake(
        manager,
        Alpn::None,
        client_config(&[cert], versions),
        "localhost",
    )
    .await
}

/// The server's stream and channel-binding data, and the client's stream.
struct Pair {
    server: TlsStream,
    binding: ChannelBindingInfo,
    client: client::TlsStream<TcpStream>,
}

async fn handshake(manager: &TlsManager, alpn: Alpn, client: ClientConfig, name: &str) -> Pair {
    try_handshake(manager, alpn, client, name).await.unwrap()
}

async fn try_handshake(
    manager: &TlsManager,
    alpn: Alpn,
    client: ClientConfig,
    name: &str,
) -> std::io::Result<Pair> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let client_tcp = TcpStream::connect(listener.local_addr()?).await?;
    let (server_tcp, _) = listener.accept().await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let (server, client) = tokio::join!(
        manager.accept(server_tcp, alpn),
        TlsConnector::from(Arc::new(client)).connect(name, client_tcp),
    );
    let (server, binding) = server?;
    Ok(Pair {
        server,
        binding,
        client: client?,
    })
}

fn served_leaf(pair: &Pair) -> CertificateDer<'static> {
    pair.client.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Reads from the server stream until `n` plaintext bytes arrived.
async fn server_read(server: &mut TlsStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let read = std::future::poll_fn(|cx| {
            server.poll_read(cx, &mut |bytes| got.extend_from_slice(bytes))
        })
        .await
        .unwrap();
        assert!(read > 0, "end of stream after {} bytes", got.len());
    }
    got
}

/// Sends a line each way over an established pair.
async fn exchange(pair: &mut Pair, text: &[u8]) {
    let Pair { server, client, .. } = pair;
    client.write_all(text).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(server_read(server, text.len()).await, text);
    assert!(!server.holds_buffers(), "an idle stream holds no buffer");
    server.write_all(text).await.unwrap();
    let mut buf = vec![0; text.len()];
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, text);
    assert!(!server.holds_buffers(), "an idle stream holds no buffer");
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
            &manager,
            Alpn::None,
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
        &again,
        Alpn::None,
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
        &manager,
        Alpn::None,
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
        &manager,
        Alpn::None,
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

    let pair = handshake(&manager, Alpn::None, trust(), "a.test").await;
    assert_eq!(served_leaf(&pair), der_of(&a.cert));
    let pair = handshake(&manager, Alpn::None, trust(), "b.test").await;
    assert_eq!(served_leaf(&pair), der_of(&b.cert));
    let pair = handshake(&manager, Alpn::None, trust(), "muc.b.test").await;
    assert_eq!(served_leaf(&pair), der_of(&b.cert));

    // Without SNI the first domain's certificate is served.
    let mut no_sni = trust();
    no_sni.enable_sni = false;
    let pair = handshake(&manager, Alpn::None, no_sni, "b.test").await;
    assert_eq!(served_leaf(&pair), der_of(&b.cert));
    // And the end-point binding is that of the certificate served.
    let leaf_hash = sha2::Sha384::digest(der_of(&b.cert).as_ref());
    assert_eq!(
        pair.binding.data(ChannelBindingType::TlsServerEndPoint),
        Some(&leaf_hash[..])
    );
}

#[tokio::test]
async fn direct_tls_negotiates_xmpp_client() {
    let dir = TempDir::new();
    let (manager, cert) = generated_localhost(&dir);

    let mut client = client_config(&[&cert], BOTH);
    client.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let pair = handshake(&manager, Alpn::XmppClient, client, "localhost").await;
    assert_eq!(pair.server.alpn_protocol(), Some(&b"xmpp-client"[..]));
    assert_eq!(
        pair.client.get_ref().1.alpn_protocol(),
        Some(&b"xmpp-client"[..])
    );

    // STARTTLS offers no ALPN, even to a client asking for it.
    let mut client = client_config(&[&cert], BOTH);
    client.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let pair = handshake(&manager, Alpn::None, client, "localhost").await;
    assert_eq!(pair.client.get_ref().1.alpn_protocol(), None);
    assert_eq!(pair.server.alpn_protocol(), None);
}

#[tokio::test]
async fn reload_serves_new_certificate_and_keeps_established_sessions() {
    let dir = TempDir::new();
    let old = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let files = vec![write_pair(dir.path(), "chat", &old)];
    let manager = TlsManager::load(settings(dir.path(), &["chat.test"], files)).unwrap();
    let new = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256, &["chat.test"]);
    let trust = || client_config(&[&old.cert, &new.cert], BOTH);

    let mut established = handshake(&manager, Alpn::None, trust(), "chat.test").await;
    assert_eq!(served_leaf(&established), der_of(&old.cert));
    assert!(!manager.reload().unwrap(), "nothing changed yet");

    write_pair(dir.path(), "chat", &new);
    assert!(manager.reload().unwrap());

    let fresh = handshake(&manager, Alpn::None, trust(), "chat.test").await;
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
        &manager,
        Alpn::None,
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
        let pair = handshake(&manager, Alpn::None, trust(), "chat.test").await;
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
    let (manager, pem) = chat_test(&dir, &rcgen::PKCS_ECDSA_P256_SHA256);

    let pair = handshake(
        &manager,
        Alpn::XmppClient,
        client_config(&[&pem.cert], BOTH),
        "chat.test",
    )
    .await;
    assert_eq!(
        pair.server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let info = &pair.binding;

    let client_export = client_exporter(&pair);
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
    let (manager, pem) = chat_test(&dir, &rcgen::PKCS_ECDSA_P384_SHA384);

    let pair = handshake(
        &manager,
        Alpn::None,
        client_config(&[&pem.cert], TLS12_ONLY),
        "chat.test",
    )
    .await;
    assert_eq!(
        pair.server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let info = &pair.binding;
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
    let (manager, pem) = chat_test(&dir, &rcgen::PKCS_ED25519);
    let pair = handshake(
        &manager,
        Alpn::None,
        client_config(&[&pem.cert], BOTH),
        "chat.test",
    )
    .await;
    let info = &pair.binding;
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

/// A client offering only `suite`.
fn client_with_suite(trusted: &str, suite: rustls::SupportedCipherSuite) -> ClientConfig {
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::ring::default_provider()
    };
    client_config_with(provider, &[trusted], BOTH)
}

#[tokio::test]
async fn tls_exporter_matches_the_client_for_every_tls13_suite() {
    use rustls::crypto::ring::cipher_suite as suites;
    let dir = TempDir::new();
    let (manager, pem) = chat_test(&dir, &rcgen::PKCS_ECDSA_P256_SHA256);
    for suite in [
        suites::TLS13_AES_128_GCM_SHA256,
        suites::TLS13_AES_256_GCM_SHA384,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut pair = handshake(
            &manager,
            Alpn::None,
            client_with_suite(&pem.cert, suite),
            "chat.test",
        )
        .await;
        assert_eq!(
            pair.server.negotiated_cipher_suite().map(|s| s.suite()),
            Some(suite.suite())
        );
        let client_export = client_exporter(&pair);
        assert_eq!(
            pair.binding.data(ChannelBindingType::TlsExporter),
            Some(&client_export[..]),
            "{suite:?}"
        );
        exchange(&mut pair, b"<r xmlns='urn:xmpp:sm:3'/>").await;
    }
}

#[tokio::test]
async fn resumed_handshake_keeps_channel_binding() {
    let dir = TempDir::new();
    let (manager, pem) = chat_test(&dir, &rcgen::PKCS_ECDSA_P256_SHA256);
    let leaf_hash = sha2::Sha256::digest(der_of(&pem.cert).as_ref());
    for versions in [BOTH, TLS12_ONLY] {
        // One client configuration keeps its session cache across the two connections.
        let client = client_config(&[&pem.cert], versions);
        let mut first = handshake(&manager, Alpn::None, client.clone(), "chat.test").await;
        // TLS 1.3 tickets arrive after the handshake; an exchange makes sure the client has
        // read them.
        exchange(&mut first, b"<presence/>").await;
        let mut second = handshake(&manager, Alpn::None, client, "chat.test").await;
        assert_eq!(
            second.client.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{versions:?}"
        );
        assert_eq!(
            second.binding.data(ChannelBindingType::TlsServerEndPoint),
            Some(&leaf_hash[..])
        );
        if versions == BOTH {
            let client_export = client_exporter(&second);
            assert_eq!(
                second.binding.data(ChannelBindingType::TlsExporter),
                Some(&client_export[..])
            );
        }
        exchange(&mut second, b"<presence/>").await;
    }
}

#[tokio::test]
async fn large_writes_and_reads_cross_many_records() {
    let dir = TempDir::new();
    let (manager, cert) = generated_localhost(&dir);
    for versions in [BOTH, TLS12_ONLY] {
        let mut pair = localhost_pair(&manager, &cert, versions).await;
        let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        exchange(&mut pair, &big).await;
    }
}

#[tokio::test]
async fn records_cut_into_single_bytes_are_joined() {
    let dir = TempDir::new();
    let (manager, cert) = generated_localhost(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Arc::new(client_config(&[&cert], BOTH));
    // A client that writes every TLS byte in a segment of its own, handshake included.
    let client = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut sent_data = false;
        let mut received = Vec::new();
        loop {
            while conn.wants_write() {
                let mut out = Vec::new();
                conn.write_tls(&mut out).unwrap();
                for byte in out {
                    tcp.write_all(&[byte]).await.unwrap();
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
            }
            if !conn.is_handshaking() && !sent_data {
                std::io::Write::write_all(&mut conn.writer(), b"<stream/>").unwrap();
                sent_data = true;
                continue;
            }
            if received.len() >= 6 {
                return received;
            }
            let mut buf = [0u8; 4096];
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0);
            conn.read_tls(&mut &buf[..n]).unwrap();
            conn.process_new_packets().unwrap();
            let mut plain = [0u8; 64];
            while let Ok(n) = std::io::Read::read(&mut conn.reader(), &mut plain) {
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&plain[..n]);
            }
        }
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let (mut server, _) = manager.accept(tcp, Alpn::None).await.unwrap();
    assert_eq!(server_read(&mut server, 9).await, b"<stream/>");
    assert!(!server.holds_buffers());
    server.write_all(b"<ok/>\n").await.unwrap();
    assert_eq!(client.await.unwrap(), b"<ok/>\n");
}

#[tokio::test]
async fn key_update_from_the_client_is_answered() {
    let dir = TempDir::new();
    let (manager, cert) = generated_localhost(&dir);
    let mut pair = localhost_pair(&manager, &cert, BOTH).await;
    exchange(&mut pair, b"before").await;
    for _ in 0..3 {
        pair.client.get_mut().1.refresh_traffic_keys().unwrap();
        exchange(&mut pair, b"after a key update").await;
    }
}

#[tokio::test]
async fn close_notify_both_ways() {
    let dir = TempDir::new();
    let (manager, cert) = generated_localhost(&dir);

    // The server closes: the client sees a clean end (close_notify, not a truncation).
    let mut pair = localhost_pair(&manager, &cert, BOTH).await;
    pair.server.write_all(b"bye").await.unwrap();
    pair.server.shutdown().await.unwrap();
    let mut rest = Vec::new();
    pair.client.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"bye");

    // The client closes: the server reads the data, then the end.
    let mut pair = localhost_pair(&manager, &cert, BOTH).await;
    pair.client.write_all(b"last words").await.unwrap();
    pair.client.shutdown().await.unwrap();
    assert_eq!(server_read(&mut pair.server, 10).await, b"last words");
    let end = std::future::poll_fn(|cx| pair.server.poll_read(cx, &mut |_| {}))
        .await
        .unwrap();
    assert_eq!(end, 0);
    assert!(!pair.server.holds_buffers());
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_fails_the_handshake_with_an_alert() {
    let dir = TempDir::new();
    let manager = TlsManager::load(settings(dir.path(), &["localhost"], vec![])).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    client
        .write_all(b"<stream:stream xmlns='jabber:client'>")
        .await
        .unwrap();
    assert!(manager.accept(tcp, Alpn::None).await.is_err());
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    // A TLS alert record (content type 21).
    assert_eq!(answer.first(), Some(&21), "{answer:?}");
}

/// A client that comes back resumes with the ticket of its first session (stateless: nothing
/// of it stays on the server), over either listener, and the resumed session's `tls-exporter`
/// channel binding still matches the client's (RFC 9266 allows it for TLS 1.3 resumption).
#[tokio::test]
async fn a_returning_client_resumes_with_its_ticket() {
    use rustls::HandshakeKind;
    let dir = TempDir::new();
    let (manager, pem) = chat_test(&dir, &rcgen::PKCS_ECDSA_P256_SHA256);
    for alpn in [Alpn::None, Alpn::XmppClient] {
        let mut config = client_config(&[&pem.cert], BOTH);
        if alpn == Alpn::XmppClient {
            config.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
        }
        let mut first = handshake(&manager, alpn, config.clone(), "chat.test").await;
        assert_eq!(
            first.client.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full)
        );
        // The ticket comes after the handshake; the client takes it when it next reads.
        exchange(&mut first, b"<presence/>").await;
        let mut second = handshake(&manager, alpn, config.clone(), "chat.test").await;
        assert_eq!(
            second.client.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{alpn:?}"
        );
        let client_export = client_exporter(&second);
        assert_eq!(
            second.binding.data(ChannelBindingType::TlsExporter),
            Some(&client_export[..])
        );
        exchange(&mut second, b"<presence/>").await;
    }
}
