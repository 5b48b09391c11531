//! tokio-xmpp 6 as the Rust interop client.
//!
//! How it is pointed at a test server, and why this way:
//! - **Address and certificate.** tokio-xmpp's own connectors (`StartTlsServerConnector`,
//!   `DirectTlsServerConnector`) resolve a `DnsConfig` and build their rustls root store inside
//!   `connect::tls_common::establish_tls_connection` from `rustls-native-certs` and/or
//!   `webpki-roots`, with no hook for a custom `ClientConfig`. rustls-native-certs honours
//!   `SSL_CERT_FILE`, but that would have to be set process-wide, racing between parallel
//!   tests (and `std::env::set_var` is `unsafe` in edition 2024, which the workspace forbids).
//!   So [`PinnedServer`] implements tokio-xmpp's public `ServerConnector` trait: TCP to the
//!   harness's `SocketAddr`, STARTTLS spoken with tokio-xmpp's own `XmppStream` and
//!   `XmppStreamElement` types (or TLS at once for XEP-0368), then tokio-rustls with a root
//!   store holding only the test CA (SNI and name check = the JID's domain).
//! - **SASL mechanism.** `Client::new_with_connector` negotiates SASL itself, trying
//!   SCRAM-SHA-256(-PLUS), SCRAM-SHA-1(-PLUS), PLAIN, ANONYMOUS in that order, with the `-PLUS`
//!   name whenever the connector reports a channel binding (so against a server offering only
//!   `SCRAM-SHA-256` it would silently fall through to PLAIN). To force SCRAM-SHA-256 the
//!   client is built from `StanzaStream::new` with a connector closure that calls the public
//!   `tokio_xmpp::client_login` (SASL driver) with the offered mechanisms filtered down to
//!   `{"SCRAM-SHA-256"}` and `ChannelBinding::None`; tokio-xmpp's `StanzaStream` then binds the
//!   resource and runs the session as it does for `Client`.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sasl::common::{ChannelBinding, Credentials};
use starling_testkit::TestCert;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::disco::{DiscoInfoQuery, DiscoInfoResult};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::parsers::version::{VersionQuery, VersionResult};
use tokio_xmpp::stanzastream::{Connection, Event, StanzaStream, StreamEvent};
use tokio_xmpp::xmlstream::{
    PendingFeaturesRecv, ReadError, StreamHeader, Timeouts, XmppStreamElement, initiate_stream,
};
use tokio_xmpp::{Error, Stanza};

/// The only SASL mechanism these tests let tokio-xmpp use.
pub(crate) const MECHANISM: &str = "SCRAM-SHA-256";

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Plain TCP, then STARTTLS (RFC 6120 §5).
    StartTls,
    /// TLS from the first byte (XEP-0368), ALPN `xmpp-client`.
    DirectTls,
}

/// A `ServerConnector` that connects to a fixed address and trusts only the test CA.
#[derive(Debug, Clone)]
pub(crate) struct PinnedServer {
    addr: SocketAddr,
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
}

impl PinnedServer {
    pub(crate) fn new(addr: SocketAddr, transport: Transport, cert: &TestCert) -> PinnedServer {
        let alpn: &[&[u8]] = match transport {
            Transport::StartTls => &[],
            Transport::DirectTls => &[b"xmpp-client"],
        };
        let config = cert
            .client_config(alpn)
            .expect("a rustls configuration trusting the test CA");
        PinnedServer {
            addr,
            transport,
            tls: Arc::new(config),
        }
    }

    async fn tls(&self, tcp: TcpStream, domain: &str) -> Result<TlsStream<TcpStream>, Error> {
        let name = rustls_pki_types::ServerName::try_from(domain.to_owned())
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(Error::Io)
    }
}

impl ServerConnector for PinnedServer {
    type Stream = BufStream<TlsStream<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<
        (
            PendingFeaturesRecv<Self::Stream>,
            sasl::common::ChannelBinding,
        ),
        Error,
    > {
        let domain = jid.domain().as_str();
        let header = || StreamHeader {
            to: Some(domain.into()),
            from: None,
            id: None,
        };
        let tcp = TcpStream::connect(self.addr).await?;
        let tcp = match self.transport {
            Transport::DirectTls => tcp,
            Transport::StartTls => {
                let plain = initiate_stream(BufStream::new(tcp), ns, header(), timeouts).await?;
                let (features, mut stream) = plain.recv_features::<XmppStreamElement>().await?;
                if !features.can_starttls() {
                    return Err(tokio_xmpp::error::ProtocolError::NoTls.into());
                }
                stream
                    .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                        starttls::Request,
                    )))
                    .await?;
                loop {
                    match stream.next().await {
                        Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
                        Some(Ok(other)) => {
                            return Err(Error::Io(std::io::Error::other(format!(
                                "expected <proceed/>, got {other:?}"
                            ))));
                        }
                        // Soft timeouts only mean silence so far (tokio-xmpp's own loop).
                        Some(Err(ReadError::SoftTimeout)) => continue,
                        Some(Err(e)) => return Err(read_error(e)),
                        None => return Err(Error::Disconnected),
                    }
                }
                stream.into_inner().into_inner()
            }
        };
        let tls = self.tls(tcp, domain).await?;
        let pending = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
        Ok((pending, ChannelBinding::None))
    }
}

fn read_error(e: ReadError) -> Error {
    match e {
        ReadError::HardError(e) => Error::Io(e),
        ReadError::ParseError(e) => Error::Io(std::io::Error::other(e)),
        ReadError::SoftTimeout => Error::Io(std::io::Error::other("soft timeout")),
        ReadError::StreamFooterReceived => Error::Disconnected,
    }
}

/// Connects, negotiates TLS, authenticates with SCRAM-SHA-256 only and restarts the stream:
/// what `StanzaStream` expects from its connector (it binds the resource itself).
async fn login(
    server: PinnedServer,
    jid: Jid,
    password: String,
    timeouts: Timeouts,
) -> Result<Connection, Error> {
    let (pending, channel_binding) = server.connect(&jid, ns::JABBER_CLIENT, timeouts).await?;
    let (features, stream) = pending.recv_features().await?;
    let offered = features.sasl_mechanisms;
    let forced: BTreeSet<String> = offered
        .iter()
        .filter(|m| m.as_str() == MECHANISM)
        .cloned()
        .collect();
    if forced.is_empty() {
        return Err(Error::Io(std::io::Error::other(format!(
            "the server does not offer {MECHANISM}; it offers {offered:?}"
        ))));
    }
    let username = jid
        .node()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default();
    let credentials = Credentials::default()
        .with_username(username)
        .with_password(password)
        .with_channel_binding(channel_binding);
    let stream = tokio_xmpp::client_login(stream, forced, credentials).await?;
    let pending = stream
        .send_header(StreamHeader {
            to: Some(jid.domain().as_str().into()),
            from: None,
            id: None,
        })
        .await?;
    let (features, stream) = pending.recv_features().await?;
    Ok(Connection {
        stream: stream.box_stream(),
        features,
        identity: jid,
    })
}

/// A logged-in tokio-xmpp session.
pub(crate) struct TxClient {
    stream: StanzaStream,
    jid: FullJid,
    pending: VecDeque<Stanza>,
    next_id: u32,
}

impl std::fmt::Debug for TxClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxClient").field("jid", &self.jid).finish()
    }
}

/// The longest a single step waits.
const STEP: Duration = Duration::from_secs(15);

impl TxClient {
    /// Logs in as `jid` and waits until the stream is bound. Connection or authentication
    /// failures are reported (never retried: a test wants the first failure, not a backoff).
    pub(crate) async fn connect(
        addr: SocketAddr,
        transport: Transport,
        cert: &TestCert,
        jid: &BareJid,
        password: &str,
    ) -> Result<TxClient, String> {
        let server = PinnedServer::new(addr, transport, cert);
        let jid = Jid::from(jid.clone());
        let password = password.to_owned();
        let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let recorded = Arc::clone(&failure);
        let connector = Box::new(
            move |_location: Option<String>, slot: tokio::sync::oneshot::Sender<Connection>| {
                let (server, jid, password) = (server.clone(), jid.clone(), password.clone());
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    match login(server, jid, password, Timeouts::tight()).await {
                        Ok(connection) => {
                            let _ = slot.send(connection);
                        }
                        Err(e) => {
                            if let Ok(mut f) = recorded.lock() {
                                *f = Some(e.to_string());
                            }
                            // Dropping the slot makes the StanzaStream give up: no retry loop.
                            drop(slot);
                        }
                    }
                });
            },
        );
        let mut stream = StanzaStream::new(connector, 16);
        let bound = tokio::time::timeout(STEP, async {
            loop {
                match stream.next().await {
                    Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => {
                        break Ok(bound_jid);
                    }
                    Some(_) => continue,
                    None => break Err(()),
                }
            }
        })
        .await;
        let reason = || {
            failure
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_else(|| "the stream ended before it was bound".into())
        };
        let jid = match bound {
            Ok(Ok(jid)) => jid
                .try_into_full()
                .map_err(|j| format!("bound to a bare JID {j}"))?,
            Ok(Err(())) => return Err(reason()),
            Err(_) => return Err(format!("not bound within {STEP:?}: {}", reason())),
        };
        Ok(TxClient {
            stream,
            jid,
            pending: VecDeque::new(),
            next_id: 0,
        })
    }

    /// The bound full JID.
    pub(crate) fn jid(&self) -> &FullJid {
        &self.jid
    }

    /// Sends a stanza. With stream management (XEP-0198) the server's ack may come before
    /// this waiter looks, so `Acked` counts as sent too.
    pub(crate) async fn send(&mut self, stanza: impl Into<Stanza>) {
        let mut token = self.stream.send(Box::new(stanza.into())).await;
        let state = tokio::time::timeout(
            STEP,
            token.wait_for(tokio_xmpp::stanzastream::StanzaStage::Sent),
        )
        .await;
        assert!(
            matches!(
                state,
                Ok(Some(
                    tokio_xmpp::stanzastream::StanzaState::Sent { .. }
                        | tokio_xmpp::stanzastream::StanzaState::Acked { .. }
                ))
            ),
            "stanza not sent: {state:?}"
        );
    }

    /// Sends initial available presence (RFC 6121 §4.2).
    pub(crate) async fn send_presence(&mut self) {
        self.send(Presence::available()).await;
    }

    /// Sends a chat message.
    pub(crate) async fn send_chat(&mut self, to: Jid, body: &str) {
        let message = Message::chat(to).with_body(Default::default(), body.to_owned());
        self.send(message).await;
    }

    /// The next stanza, from what was set aside first.
    pub(crate) async fn next_stanza(&mut self, timeout: Duration) -> Result<Stanza, String> {
        if let Some(stanza) = self.pending.pop_front() {
            return Ok(stanza);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Err(format!("no stanza within {timeout:?}")),
                Ok(None) => return Err("the stream ended".into()),
                Ok(Some(Event::Stanza(stanza))) => return Ok(stanza),
                Ok(Some(Event::Stream(event))) => {
                    if !matches!(event, StreamEvent::Resumed) {
                        return Err(format!("stream event while waiting: {event:?}"));
                    }
                }
            }
        }
    }

    /// Waits for a message with a body, setting other stanzas aside.
    pub(crate) async fn expect_message(&mut self, timeout: Duration) -> Result<Message, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut aside = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_stanza(left).await {
                Ok(Stanza::Message(m)) if !m.bodies.is_empty() => break Ok(m),
                Ok(other) => aside.push(other),
                Err(e) => break Err(format!("{e}; other stanzas: {aside:?}")),
            }
        };
        self.pending.extend(aside);
        result
    }

    /// Sends an IQ get to `to` and waits for its result payload (`None` for an empty result).
    pub(crate) async fn iq_get(
        &mut self,
        to: Jid,
        payload: impl tokio_xmpp::parsers::iq::IqGetPayload,
    ) -> Result<Option<Element>, String> {
        self.next_id += 1;
        let id = format!("tx{}", self.next_id);
        self.send(Iq::from_get(id.clone(), payload).with_to(to))
            .await;
        let deadline = tokio::time::Instant::now() + STEP;
        let mut aside = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_stanza(left).await {
                Ok(Stanza::Iq(Iq::Result {
                    id: got, payload, ..
                })) if got == id => break Ok(payload),
                Ok(Stanza::Iq(Iq::Error { id: got, error, .. })) if got == id => {
                    break Err(format!("IQ error: {error:?}"));
                }
                Ok(other) => aside.push(other),
                Err(e) => break Err(e),
            }
        };
        self.pending.extend(aside);
        result
    }

    /// XEP-0199 ping of the server's domain.
    pub(crate) async fn ping_server(&mut self) -> Result<(), String> {
        let domain = Jid::from(self.jid.domain().to_owned());
        self.iq_get(domain, Ping).await.map(drop)
    }

    /// XEP-0030 disco#info of the server's domain.
    pub(crate) async fn disco_info_server(&mut self) -> Result<DiscoInfoResult, String> {
        let domain = Jid::from(self.jid.domain().to_owned());
        let payload = self
            .iq_get(domain, DiscoInfoQuery { node: None })
            .await?
            .ok_or("empty disco#info result")?;
        DiscoInfoResult::try_from(payload).map_err(|e| format!("bad disco#info result: {e:?}"))
    }

    /// XEP-0092 software version of the server's domain.
    pub(crate) async fn version_server(&mut self) -> Result<VersionResult, String> {
        let domain = Jid::from(self.jid.domain().to_owned());
        let payload = self
            .iq_get(domain, VersionQuery)
            .await?
            .ok_or("empty version result")?;
        VersionResult::try_from(payload).map_err(|e| format!("bad version result: {e:?}"))
    }

    /// Closes the stream cleanly.
    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(STEP, self.stream.close()).await;
    }
}

/// Whether a message is a chat message from `from` (bare match) with `body`.
pub(crate) fn is_chat_from(message: &Message, from: &BareJid, body: &str) -> bool {
    message.type_ == MessageType::Chat
        && message.from.as_ref().map(Jid::to_bare).as_ref() == Some(from)
        && message.bodies.values().any(|b| b == body)
}

/// A tokio-xmpp session driven below `StanzaStream`, on tokio-xmpp's own XML stream, for
/// what `StanzaStream` cannot do: read the stream features of the authenticated stream, and
/// send a nonza (XEP-0352's `<active/>` and `<inactive/>`, xmpp-parsers' `csi` types written
/// through the stream's `Sink`). The resource is bound with xmpp-parsers' `bind` types; no
/// stream management. Stanzas not yet wanted are kept, in order.
pub(crate) struct TxStream {
    conn: Connection,
    jid: FullJid,
    next_id: u32,
    backlog: VecDeque<Stanza>,
}

impl std::fmt::Debug for TxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxStream").field("jid", &self.jid).finish()
    }
}

impl TxStream {
    /// Logs in to `server` as `jid` (SCRAM-SHA-256, like [`TxClient`]) and binds a
    /// resource.
    pub(crate) async fn connect(
        server: PinnedServer,
        jid: &BareJid,
        password: &str,
    ) -> Result<TxStream, String> {
        let conn = tokio::time::timeout(
            STEP,
            login(
                server,
                Jid::from(jid.clone()),
                password.to_owned(),
                Timeouts::tight(),
            ),
        )
        .await
        .map_err(|_| format!("no login within {STEP:?}"))?
        .map_err(|e| e.to_string())?;
        let mut stream = TxStream {
            conn,
            jid: FullJid::new(&format!("{jid}/unbound")).map_err(|e| e.to_string())?,
            next_id: 0,
            backlog: VecDeque::new(),
        };
        let bind = Iq::from_set("bind", tokio_xmpp::parsers::bind::BindQuery::new(None));
        stream.send(bind).await?;
        let payload = stream.answer("bind").await?.ok_or("an empty bind result")?;
        let bound = tokio_xmpp::parsers::bind::BindResponse::try_from(payload)
            .map_err(|e| format!("bad bind result: {e:?}"))?;
        stream.jid = bound.into();
        Ok(stream)
    }

    /// The bound full JID.
    pub(crate) fn jid(&self) -> &FullJid {
        &self.jid
    }

    /// The stream features after authentication.
    pub(crate) fn features(&self) -> &tokio_xmpp::parsers::stream_features::StreamFeatures {
        &self.conn.features
    }

    /// Sends a stanza.
    pub(crate) async fn send(&mut self, stanza: impl Into<Stanza>) -> Result<(), String> {
        let element = XmppStreamElement::Stanza(stanza.into());
        tokio::time::timeout(STEP, self.conn.stream.send(&element))
            .await
            .map_err(|_| "send timed out".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// Sends XEP-0352's `<inactive/>` (`inactive`) or `<active/>`.
    pub(crate) async fn indicate(&mut self, inactive: bool) -> Result<(), String> {
        use tokio_xmpp::parsers::csi;
        let sent = if inactive {
            tokio::time::timeout(STEP, self.conn.stream.send(&csi::Inactive)).await
        } else {
            tokio::time::timeout(STEP, self.conn.stream.send(&csi::Active)).await
        };
        sent.map_err(|_| "send timed out".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// The next stanza from the stream (not from what was set aside).
    async fn read(&mut self, timeout: Duration) -> Result<Stanza, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.conn.stream.next())
                .await
                .map_err(|_| format!("no stanza within {timeout:?}"))?;
            match next.map(|r| r.and_then(|e| e.into_read_error())) {
                None => return Err("the stream ended".into()),
                Some(Ok(XmppStreamElement::Stanza(stanza))) => return Ok(stanza),
                Some(Ok(other)) => return Err(format!("not a stanza: {other:?}")),
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Err(e)) => return Err(read_error(e).to_string()),
            }
        }
    }

    /// Waits for a stanza `pred` accepts, setting the others aside in order.
    pub(crate) async fn expect(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&Stanza) -> bool,
    ) -> Result<Stanza, String> {
        if let Some(at) = self.backlog.iter().position(&mut pred)
            && let Some(found) = self.backlog.remove(at)
        {
            return Ok(found);
        }
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => self.backlog.push_back(s),
                Err(e) => {
                    return Err(format!(
                        "{} waiting for {what}: {e}; set aside: {:?}",
                        self.jid, self.backlog
                    ));
                }
            }
        }
    }

    /// The result payload (or error) of the IQ with `id`.
    async fn answer(&mut self, id: &str) -> Result<Option<Element>, String> {
        let answer = self
            .expect(&format!("the answer to IQ {id}"), |s| {
                matches!(s, Stanza::Iq(Iq::Result { id: got, .. } | Iq::Error { id: got, .. })
                    if got == id)
            })
            .await?;
        match answer {
            Stanza::Iq(Iq::Result { payload, .. }) => Ok(payload),
            Stanza::Iq(Iq::Error { error, .. }) => Err(format!("IQ error: {error:?}")),
            other => Err(format!("not an IQ answer: {other:?}")),
        }
    }

    /// Sends an IQ get (to the account itself when `to` is `None`) and waits for its answer.
    pub(crate) async fn iq_get(
        &mut self,
        to: Option<Jid>,
        payload: impl tokio_xmpp::parsers::iq::IqGetPayload,
    ) -> Result<Option<Element>, String> {
        self.next_id += 1;
        let id = format!("txs{}", self.next_id);
        let mut iq = Iq::from_get(id.clone(), payload);
        if let Some(to) = to {
            iq = iq.with_to(to);
        }
        self.send(iq).await?;
        self.answer(&id).await
    }

    /// A round trip to the server on this stream: everything delivered to the session before
    /// the answer has been read (and set aside) when it returns.
    pub(crate) async fn barrier(&mut self) -> Result<(), String> {
        let domain = Jid::from(self.jid.domain().to_owned());
        self.iq_get(Some(domain), Ping).await.map(drop)
    }

    /// XEP-0030 disco#info of the server's domain, of `node` if given.
    pub(crate) async fn disco_info_server(
        &mut self,
        node: Option<String>,
    ) -> Result<DiscoInfoResult, String> {
        let domain = Jid::from(self.jid.domain().to_owned());
        let payload = self
            .iq_get(Some(domain), DiscoInfoQuery { node })
            .await?
            .ok_or("empty disco#info result")?;
        DiscoInfoResult::try_from(payload).map_err(|e| format!("bad disco#info result: {e:?}"))
    }

    /// What was received and set aside so far, oldest first.
    pub(crate) fn backlog(&self) -> impl Iterator<Item = &Stanza> {
        self.backlog.iter()
    }

    /// Closes the stream (`</stream:stream>`).
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(STEP, self.conn.stream.shutdown()).await;
    }
}
