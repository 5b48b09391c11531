//! The edge over real sockets on 127.0.0.1, with a tokio-rustls client that trusts the
//! generated certificate, a redb store in memory, the local registry, and a tiny router that
//! delivers stanzas straight back through `edge.link()`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use starling_cluster::{EdgeLink, LinkError, RouterLink, ToEdge, ToRouter};
use starling_registry::{LocalRegistry, SessionRegistry};
use starling_sasl::{HashAlgo, derive_credentials};
use starling_store::{AccountStore, BareUser, RedbStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::tests::scram::{ScramClient, element_text};
use crate::tls::{TlsManager, TlsSettings};
use crate::{Edge, EdgeDeps, EdgeError, Settings};

const WAIT: Duration = Duration::from_secs(10);

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>"
    )
}

/// Records what the edge tells the router, and routes stanzas with a full-JID `to` back to
/// the edge.
#[derive(Default)]
struct TestRouter {
    edge: OnceLock<Arc<dyn EdgeLink>>,
    events: Mutex<Vec<String>>,
    /// Ids of the stanzas handed back as undeliverable.
    undeliverable: Mutex<Vec<String>>,
}

#[async_trait]
impl RouterLink for TestRouter {
    async fn send(&self, msg: ToRouter) -> Result<(), LinkError> {
        match msg {
            ToRouter::Stanza { stanza, .. } => {
                let to = stanza
                    .to()
                    .and_then(|to| starling_xmpp::jid::parse_full(&to).ok());
                if let (Some(to), Some(edge)) = (to, self.edge.get()) {
                    edge.send(ToEdge::Deliver {
                        recipients: vec![to],
                        stanza,
                        stamp_to: true,
                    })
                    .await?;
                }
            }
            ToRouter::SessionStarted { jid } => self.events.lock().push(format!("started {jid}")),
            ToRouter::SessionEnded { jid, reason } => {
                self.events.lock().push(format!("ended {jid} {reason:?}"));
            }
            ToRouter::Undeliverable { recipient, stanza } => {
                let id = stanza.id().map(|i| i.into_owned()).unwrap_or_default();
                self.undeliverable.lock().push(id);
                self.events
                    .lock()
                    .push(format!("undeliverable {recipient}"));
            }
        }
        Ok(())
    }
}

impl TestRouter {
    async fn wait_for(&self, event: &str) {
        let waited = tokio::time::timeout(WAIT, async {
            while !self.events.lock().iter().any(|e| e == event) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "no event {event:?} in {:?}",
            self.events.lock()
        );
    }
}

struct Server {
    edge: Edge,
    router: Arc<TestRouter>,
    registry: Arc<LocalRegistry>,
    starttls: SocketAddr,
    direct: SocketAddr,
    cancel: CancellationToken,
    serve: Option<JoinHandle<Result<(), EdgeError>>>,
    client_tls: Arc<ClientConfig>,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "starling-edge-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn credentials(password: &str) -> Vec<starling_sasl::ScramCredentials> {
    HashAlgo::ALL
        .into_iter()
        .map(|h| derive_credentials(h, password, b"0123456789abcdef", 64).unwrap())
        .collect()
}

async fn start(change: impl FnOnce(&mut Settings)) -> Server {
    let dir = temp_dir();
    let mut settings = Settings {
        listen_starttls: vec!["127.0.0.1:0".parse().unwrap()],
        listen_direct_tls: vec!["127.0.0.1:0".parse().unwrap()],
        shutdown_grace: Duration::from_secs(5),
        ..Settings::default()
    };
    settings.auth.scram_iterations = 64;
    change(&mut settings);
    let tls = TlsManager::load(TlsSettings {
        certificates: Vec::new(),
        data_dir: dir.clone(),
        domains: vec!["localhost".into()],
        reload_check: Duration::ZERO,
    })
    .unwrap();
    let cert = dir.join("tls").join("cert.pem");
    assert!(
        cert.exists(),
        "the generated certificate is in <data_dir>/tls"
    );
    let store = Arc::new(RedbStore::open_in_memory().unwrap());
    for (user, password) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
        store
            .create(&BareUser::new("localhost", user), credentials(password))
            .await
            .unwrap();
    }
    let registry = Arc::new(LocalRegistry::default());
    let router = Arc::new(TestRouter::default());
    let edge = Edge::new(
        settings,
        EdgeDeps {
            node: Arc::from("edge-1"),
            domains: vec!["localhost".into()],
            store,
            registry: registry.clone(),
            router: router.clone(),
            tls,
            sasl_secret: [3u8; 32],
        },
    );
    let _ = router.edge.set(edge.link());
    let bound = edge.bind().unwrap();
    let starttls = bound.starttls_addrs()[0];
    let direct = bound.direct_tls_addrs()[0];
    assert_ne!(starttls.port(), 0);
    let cancel = CancellationToken::new();
    let serve = tokio::spawn(bound.serve(cancel.clone()));

    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let client_tls = Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    Server {
        edge,
        router,
        registry,
        starttls,
        direct,
        cancel,
        serve: Some(serve),
        client_tls,
        dir,
    }
}

/// A test client's end of a stream: writes XML, reads until a pattern.
struct Conn<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(s: S) -> Self {
        Conn { s, buf: Vec::new() }
    }

    async fn send(&mut self, xml: &str) {
        self.s.write_all(xml.as_bytes()).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// Everything up to and including `pat`.
    async fn until(&mut self, pat: &str) -> String {
        let read = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(i) = find(&self.buf, pat.as_bytes()) {
                    let taken: Vec<u8> = self.buf.drain(..i + pat.len()).collect();
                    return String::from_utf8(taken).unwrap();
                }
                let mut chunk = [0u8; 4096];
                match self.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        panic!(
                            "stream ended before {pat:?}: {}",
                            String::from_utf8_lossy(&self.buf)
                        )
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        match read {
            Ok(s) => s,
            Err(_) => panic!(
                "timed out waiting for {pat:?}: {}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Everything until the server closes.
    async fn rest(&mut self) -> String {
        let _ = tokio::time::timeout(WAIT, async {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = self.s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Server {
    async fn tls_connect(&self, tcp: TcpStream, alpn: Option<&[u8]>) -> TlsStream<TcpStream> {
        let mut config = (*self.client_tls).clone();
        if let Some(alpn) = alpn {
            config.alpn_protocols = vec![alpn.to_vec()];
        }
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Connects to the STARTTLS port and negotiates TLS.
    async fn starttls(&self) -> Conn<TlsStream<TcpStream>> {
        let mut plain = Conn::new(TcpStream::connect(self.starttls).await.unwrap());
        plain.send(&header("localhost")).await;
        let features = plain.until("</stream:features>").await;
        assert!(features.contains("<required/>"), "{features}");
        plain
            .send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await;
        plain
            .until("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await;
        assert!(plain.buf.is_empty());
        Conn::new(self.tls_connect(plain.s, None).await)
    }

    /// Connects to the direct-TLS port with ALPN `xmpp-client`.
    async fn direct(&self) -> Conn<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.direct).await.unwrap();
        let tls = self.tls_connect(tcp, Some(b"xmpp-client")).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"xmpp-client"[..]));
        Conn::new(tls)
    }

    /// A bound session of `user` with `resource`, over direct TLS and PLAIN.
    async fn session(&self, user: &str, resource: &str) -> Conn<TlsStream<TcpStream>> {
        let mut c = self.direct().await;
        c.send(&header("localhost")).await;
        c.until("</stream:features>").await;
        let payload = STANDARD.encode(format!("\0{user}\0{user}-pw"));
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>"
        ))
        .await;
        c.until("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
            .await;
        c.send(&header("localhost")).await;
        c.until("</stream:features>").await;
        bind(&mut c, resource).await;
        c
    }

    /// A connection of `user` that authenticated and restarted, not bound; and the features.
    async fn login(&self, user: &str) -> (Conn<TlsStream<TcpStream>>, String) {
        let mut c = self.direct().await;
        c.send(&header("localhost")).await;
        c.until("</stream:features>").await;
        let payload = STANDARD.encode(format!("\0{user}\0{user}-pw"));
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>"
        ))
        .await;
        c.until("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
            .await;
        c.send(&header("localhost")).await;
        let features = c.until("</stream:features>").await;
        (c, features)
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        let serve = self.serve.take().unwrap();
        let result = tokio::time::timeout(WAIT, serve).await;
        assert!(
            matches!(result, Ok(Ok(Ok(())))),
            "serve ended with {result:?}"
        );
    }
}

async fn bind<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>, resource: &str) -> String {
    c.send(&format!(
        "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>{resource}</resource></bind></iq>"
    ))
    .await;
    let result = c.until("</iq>").await;
    element_text(&result, "jid")
        .unwrap_or_else(|| panic!("no jid in {result}"))
        .to_owned()
}

fn stream_error(out: &str, condition: &str) -> bool {
    out.contains(&format!(
        "<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
    )) && out.contains("</stream:stream>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_scram_plus_login_and_bind() {
    let server = start(|_| {}).await;
    let mut c = server.starttls().await;
    c.send(&header("localhost")).await;
    let features = c.until("</stream:features>").await;
    assert!(
        features.contains("<mechanism>SCRAM-SHA-256-PLUS</mechanism>"),
        "{features}"
    );
    assert!(
        features.contains("<channel-binding type='tls-exporter'/>"),
        "{features}"
    );
    assert!(
        features.contains("<register xmlns='http://jabber.org/features/iq-register'/>"),
        "registration is open to loopback clients by default: {features}"
    );
    let exporter =
        c.s.get_ref()
            .1
            .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
            .unwrap()
            .to_vec();
    let mut scram = ScramClient::with_binding("alice", "alice-pw", "p=tls-exporter,,", exporter);
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256-PLUS'>{}</auth>",
        scram.first()
    ))
    .await;
    let challenge = c.until("</challenge>").await;
    let challenge = element_text(&challenge, "challenge").unwrap().to_owned();
    c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        scram.finish(&challenge)
    ))
    .await;
    let success = c.until("</success>").await;
    assert!(scram.verify(element_text(&success, "success").unwrap()));
    c.send(&header("localhost")).await;
    let features = c.until("</stream:features>").await;
    assert!(features.contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"));
    let jid = bind(&mut c, "laptop").await;
    assert_eq!(jid, "alice@localhost/laptop");
    server
        .router
        .wait_for("started alice@localhost/laptop")
        .await;
    let full = starling_xmpp::jid::parse_full("alice@localhost/laptop").unwrap();
    let record = server.registry.session(&full).await.unwrap().unwrap();
    assert_eq!(&*record.node, "edge-1");
    assert_eq!(server.edge.session_count(), 1);

    c.send("</stream:stream>").await;
    let rest = c.rest().await;
    assert_eq!(rest, "</stream:stream>");
    server
        .router
        .wait_for("ended alice@localhost/laptop Closed")
        .await;
    assert_eq!(server.registry.count().await.unwrap(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_registration_then_login() {
    let server = start(|_| {}).await;
    let mut c = server.direct().await;
    c.send(&header("localhost")).await;
    let features = c.until("</stream:features>").await;
    assert!(
        features.contains("<mechanism>PLAIN</mechanism>"),
        "{features}"
    );
    c.send(
        "<iq type='set' id='reg'><query xmlns='jabber:iq:register'>\
         <username>carol</username><password>carol-pw</password></query></iq>",
    )
    .await;
    assert_eq!(c.until("/>").await, "<iq type='result' id='reg'/>");
    let payload = STANDARD.encode("\0carol\0carol-pw");
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>"
    ))
    .await;
    c.until("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        .await;
    c.send(&header("localhost")).await;
    c.until("</stream:features>").await;
    assert_eq!(bind(&mut c, "phone").await, "carol@localhost/phone");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_between_two_sessions() {
    let server = start(|_| {}).await;
    let mut alice = server.session("alice", "a").await;
    let mut bob = server.session("bob", "b").await;
    server.router.wait_for("started bob@localhost/b").await;
    alice
        .send("<message to='bob@localhost/b' from='spoof@evil/x' id='m1'><body>hi</body></message>")
        .await;
    let got = bob.until("</message>").await;
    assert!(got.contains("from='alice@localhost/a'"), "{got}");
    assert!(got.contains("to='bob@localhost/b'"), "{got}");
    assert!(got.contains("<body>hi</body>"), "{got}");
    assert!(!got.contains("spoof"), "{got}");

    // A resource that is not bound: back to the router.
    alice
        .send("<message to='bob@localhost/elsewhere'><body>?</body></message>")
        .await;
    server
        .router
        .wait_for("undeliverable bob@localhost/elsewhere")
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bind_of_the_same_resource_replaces_the_first() {
    let server = start(|_| {}).await;
    let mut first = server.session("alice", "same").await;
    let _second = server.session("alice", "same").await;
    let rest = first.rest().await;
    assert!(stream_error(&rest, "conflict"), "{rest}");
    server
        .router
        .wait_for("ended alice@localhost/same Replaced")
        .await;
    let events = server.router.events.lock().clone();
    let ended = events
        .iter()
        .position(|e| e == "ended alice@localhost/same Replaced");
    let started = events
        .iter()
        .rposition(|e| e == "started alice@localhost/same");
    assert!(
        ended < started,
        "replacement is reported before the new start: {events:?}"
    );
    assert_eq!(server.registry.count().await.unwrap(), 1);
    assert_eq!(server.edge.session_count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_flood_closes_with_policy_violation() {
    let server = start(|s| {
        s.rate_bytes_per_sec = 1000;
        s.rate_burst_bytes = 4000;
    })
    .await;
    let mut c = server.session("alice", "r").await;
    let flood = " ".repeat(20_000);
    let _ = c.s.write_all(flood.as_bytes()).await;
    let _ = c.s.flush().await;
    let rest = c.rest().await;
    assert!(stream_error(&rest, "policy-violation"), "{rest}");
    server
        .router
        .wait_for("ended alice@localhost/r StreamError(PolicyViolation)")
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_stanza_closes_with_policy_violation() {
    let server = start(|s| s.max_stanza_size = 2048).await;
    let mut c = server.session("alice", "r").await;
    let body = "x".repeat(4000);
    let _ =
        c.s.write_all(
            format!("<message to='bob@localhost/b'><body>{body}</body></message>").as_bytes(),
        )
        .await;
    let rest = c.rest().await;
    assert!(stream_error(&rest, "policy-violation"), "{rest}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited() {
    let server = start(|s| s.max_connections_per_ip = 2).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = Conn::new(TcpStream::connect(server.starttls).await.unwrap());
        c.send(&header("localhost")).await;
        c.until("</stream:features>").await;
        open.push(c);
    }
    let mut third = Conn::new(TcpStream::connect(server.starttls).await.unwrap());
    let rest = third.rest().await;
    assert!(
        rest.starts_with("<?xml version='1.0'?><stream:stream"),
        "{rest}"
    );
    assert!(stream_error(&rest, "policy-violation"), "{rest}");
    // On the direct-TLS port the connection is just closed, before any handshake.
    let mut tcp = TcpStream::connect(server.direct).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, tcp.read(&mut byte))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)));
    // A slot frees up once the server has seen a connection close.
    drop(open.pop());
    let freed = tokio::time::timeout(WAIT, async {
        loop {
            let mut again = Conn::new(TcpStream::connect(server.starttls).await.unwrap());
            again.send(&header("localhost")).await;
            let reply = again.until("</stream:").await;
            if !reply.contains("policy-violation") {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a slot frees up");
    assert!(freed.contains("<stream:features"), "{freed}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_keepalive_and_preauth_timeout() {
    let server = start(|s| {
        s.idle_timeout = Duration::from_millis(1500);
        s.keepalive_interval = Duration::from_millis(300);
    })
    .await;
    let mut c = server.session("alice", "idle").await;
    // Whitespace keepalives while nothing else is written.
    let spaces = c.until("  ").await;
    assert_eq!(spaces.trim(), "");
    let rest = c.rest().await;
    assert!(stream_error(&rest, "connection-timeout"), "{rest}");
    server
        .router
        .wait_for("ended alice@localhost/idle Timeout")
        .await;
    server.stop().await;

    let server = start(|s| s.preauth_timeout = Duration::from_millis(500)).await;
    let mut c = server.direct().await;
    c.send(&header("localhost")).await;
    let rest = c.rest().await;
    assert!(stream_error(&rest, "policy-violation"), "{rest}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_sends_system_shutdown() {
    let server = start(|_| {}).await;
    let mut bound = server.session("alice", "s").await;
    let mut fresh = Conn::new(TcpStream::connect(server.starttls).await.unwrap());
    fresh.send(&header("localhost")).await;
    fresh.until("</stream:features>").await;
    server.router.wait_for("started alice@localhost/s").await;
    let router = server.router.clone();
    let registry = server.registry.clone();
    let addr = server.starttls;
    server.stop().await;
    let rest = bound.rest().await;
    assert!(stream_error(&rest, "system-shutdown"), "{rest}");
    let rest = fresh.rest().await;
    assert!(stream_error(&rest, "system-shutdown"), "{rest}");
    router.wait_for("ended alice@localhost/s Shutdown").await;
    assert_eq!(registry.count().await.unwrap(), 0);
    // Not accepting any more.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn connection_future_is_small() {
    let server = start(|_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).await.unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    let counter = Arc::new(crate::limits::ConnectionCounter::default());
    let guard = counter.try_open(peer.ip(), 1).unwrap();
    let future =
        crate::connection::tests_support::connection_future(server.edge.shared(), tcp, peer, guard);
    let size = std::mem::size_of_val(&future);

    assert!(size < 2048, "connection future is {size} bytes");
    drop(future);
    drop(client);
}

#[path = "sm_socket.rs"]
mod sm_socket;
