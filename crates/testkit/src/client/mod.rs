//! A raw XMPP client for tests that need to control every byte: stream negotiation over TCP
//! with STARTTLS (RFC 6120 §5) or direct TLS (XEP-0368, ALPN `xmpp-client`), SASL PLAIN and
//! SCRAM-SHA-256 (RFC 6120 §6, RFC 7677), in-band registration (XEP-0077), resource binding
//! (RFC 6120 §7), IQs (§8.2.3) and stream errors (§4.9), each wait bounded by a timeout.
//!
//! Real client libraries cannot misbehave on purpose; this one sends whatever a test writes
//! (`send_raw`) and reports exactly what came back. It trusts only the harness's test CA.

pub(crate) mod scram;

mod framing;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use minidom::Element;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::{HarnessError, shared_cert};
pub(crate) use framing::escape;
use framing::{Frame, Scanner};

/// Namespaces the client uses.
pub mod ns {
    /// RFC 6120 §4.8.1: the stream namespace.
    pub const STREAM: &str = "http://etherx.jabber.org/streams";
    /// RFC 6120 §4.9.2: stream error conditions.
    pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    /// RFC 6120 §5.4: STARTTLS.
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
    /// RFC 6120 §6.4: SASL.
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    /// RFC 6120 §7: resource binding.
    pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
    /// RFC 3921 §3: the legacy session establishment.
    pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
    /// RFC 6120 §8.3.2: stanza error conditions.
    pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    /// RFC 6120 §4.8.3: the client content namespace.
    pub const CLIENT: &str = "jabber:client";
    /// XEP-0077: in-band registration (the IQ namespace).
    pub const REGISTER: &str = "jabber:iq:register";
    /// XEP-0077 §4: the stream feature.
    pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
    /// XEP-0199.
    pub const PING: &str = "urn:xmpp:ping";
    /// XEP-0030.
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    /// XEP-0092.
    pub const VERSION: &str = "jabber:iq:version";
}

/// The longest any single wait lasts unless a test sets another ([`RawClient::set_timeout`]).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a raw client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake or configuration failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// Nothing (or not enough) arrived in time.
    #[error(
        "timed out after {after:?} waiting for {waiting_for}; received but unframed: {buffered:?}"
    )]
    Timeout {
        /// What was expected.
        waiting_for: String,
        /// How long the wait lasted.
        after: Duration,
        /// Bytes received that did not make a complete frame.
        buffered: String,
    },
    /// The server sent something no XMPP server may send.
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// The server sent something other than what the test expected.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: String,
        /// What arrived, as XML or a description.
        got: String,
    },
    /// The harness (certificate, configuration) failed.
    #[error(transparent)]
    Harness(#[from] HarnessError),
}

/// The attributes of the server's stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Attributes in order, values unescaped, namespace declarations included.
    pub attrs: Vec<(String, String)>,
}

impl StreamHeader {
    /// The value of attribute `name` (qualified as written, e.g. `xml:lang`).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One thing read from the stream.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// The server's stream header.
    Header(StreamHeader),
    /// A top-level element (stanza, nonza, features, stream error).
    Element(Element),
    /// The server's `</stream:stream>`.
    Close,
    /// The connection ended (TCP FIN, TLS close, or reset).
    Eof,
}

impl StreamEvent {
    fn describe(&self) -> String {
        match self {
            StreamEvent::Header(h) => format!("stream header {:?}", h.attrs),
            StreamEvent::Element(e) => format!("element {}", to_xml(e)),
            StreamEvent::Close => "</stream:stream>".into(),
            StreamEvent::Eof => "end of connection".into(),
        }
    }
}

/// The stream features (RFC 6120 §4.3.2) with helpers for the ones tests look at.
#[derive(Debug, Clone)]
pub struct Features(pub Element);

impl Features {
    /// SASL mechanisms offered, in order.
    pub fn mechanisms(&self) -> Vec<String> {
        self.0
            .get_child("mechanisms", ns::SASL)
            .map(|m| {
                m.children()
                    .filter(|c| c.is("mechanism", ns::SASL))
                    .map(Element::text)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether STARTTLS is offered.
    pub fn has_starttls(&self) -> bool {
        self.0.has_child("starttls", ns::TLS)
    }

    /// Whether STARTTLS is offered as mandatory-to-negotiate.
    pub fn starttls_required(&self) -> bool {
        self.0
            .get_child("starttls", ns::TLS)
            .is_some_and(|s| s.has_child("required", ns::TLS))
    }

    /// Whether in-band registration is advertised (XEP-0077 §4).
    pub fn has_register(&self) -> bool {
        self.0.has_child("register", ns::REGISTER_FEATURE)
    }

    /// Whether resource binding is offered.
    pub fn has_bind(&self) -> bool {
        self.0.has_child("bind", ns::BIND)
    }

    /// Whether a legacy session must be established (RFC 3921 §3, not marked `<optional/>`).
    pub fn session_required(&self) -> bool {
        self.0
            .get_child("session", ns::SESSION)
            .is_some_and(|s| !s.has_child("optional", ns::SESSION))
    }
}

/// The result of a SASL exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// `<success/>` (and, for SCRAM, a verified server signature).
    Success,
    /// `<failure/>` with its condition (RFC 6120 §6.5) and optional text.
    Failure {
        /// The defined condition's element name, e.g. `not-authorized`.
        condition: String,
        /// The `<text/>`, if any.
        text: Option<String>,
    },
}

/// The response to an IQ request.
#[derive(Debug, Clone)]
pub enum IqOutcome {
    /// `type='result'`.
    Result(Element),
    /// `type='error'`, with the stanza error's defined condition (RFC 6120 §8.3.3).
    Error {
        /// The condition element's name, e.g. `service-unavailable`.
        condition: String,
        /// The whole response.
        stanza: Element,
    },
}

impl IqOutcome {
    /// The result payload, or an error describing the IQ error.
    pub fn into_result(self) -> Result<Element, ClientError> {
        match self {
            IqOutcome::Result(e) => Ok(e),
            IqOutcome::Error { stanza, .. } => Err(ClientError::Unexpected {
                expected: "an IQ result".into(),
                got: to_xml(&stanza),
            }),
        }
    }
}

/// A stream error received (RFC 6120 §4.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamErrorReport {
    /// The defined condition's element name, e.g. `policy-violation`.
    pub condition: String,
    /// The `<text/>`, if any.
    pub text: Option<String>,
    /// Whether `</stream:stream>` followed before the connection ended (§4.9.1.1 says MUST).
    pub closed_with_tag: bool,
}

/// What happened during [`RawClient::send_while_reading`].
#[derive(Debug)]
pub struct SendReport {
    /// Bytes accepted by the socket.
    pub bytes_written: usize,
    /// The write error that stopped sending early, if any (the server closing on us).
    pub write_error: Option<std::io::Error>,
    /// Everything read meanwhile, up to the end of the stream or the deadline.
    pub events: Vec<StreamEvent>,
}

impl SendReport {
    /// The stream error among the events, if any.
    pub fn stream_error(&self) -> Option<StreamErrorReport> {
        let position = self.events.iter().position(is_stream_error)?;
        let StreamEvent::Element(e) = self.events.get(position)? else {
            return None;
        };
        let (condition, text) = stream_error_parts(e);
        Some(StreamErrorReport {
            condition,
            text,
            closed_with_tag: self
                .events
                .get(position + 1..)
                .is_some_and(|rest| rest.iter().any(|e| matches!(e, StreamEvent::Close))),
        })
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between taking the TCP stream for a TLS handshake and getting the TLS stream back.
    Gone,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "connection lost in a TLS handshake",
    )
}

/// Errors that mean the peer went away rather than that the client failed.
fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

fn is_stream_error(event: &StreamEvent) -> bool {
    matches!(event, StreamEvent::Element(e) if e.is("error", ns::STREAM))
}

fn stream_error_parts(e: &Element) -> (String, Option<String>) {
    let condition = e
        .children()
        .find(|c| c.ns() == ns::STREAM_ERRORS && c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_default();
    let text = e.get_child("text", ns::STREAM_ERRORS).map(Element::text);
    (condition, text)
}

/// Serialises an element for messages.
pub fn to_xml(e: &Element) -> String {
    let mut out = Vec::new();
    match e.write_to(&mut out) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(err) => format!("<unserialisable {}: {err}>", e.name()),
    }
}

/// A raw XMPP client connection.
pub struct RawClient {
    io: Io,
    scanner: Scanner,
    prefixes: BTreeMap<Option<String>, String>,
    pending: VecDeque<StreamEvent>,
    eof: bool,
    domain: String,
    timeout: Duration,
    next_id: u64,
    tls: bool,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient")
            .field("domain", &self.domain)
            .field("tls", &self.tls)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl RawClient {
    /// Opens a TCP connection to `addr` for a stream to `domain`. Nothing is sent yet.
    pub async fn connect(addr: SocketAddr, domain: &str) -> Result<RawClient, ClientError> {
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                waiting_for: format!("TCP connect to {addr}"),
                after: DEFAULT_TIMEOUT,
                buffered: String::new(),
            })?
            .map_err(|source| ClientError::Io {
                context: format!("connecting to {addr}"),
                source,
            })?;
        // Small writes (a stanza at a time) must leave at once for the timing of the tests.
        tcp.set_nodelay(true).map_err(|source| ClientError::Io {
            context: "TCP_NODELAY".into(),
            source,
        })?;
        Ok(RawClient {
            io: Io::Plain(tcp),
            scanner: Scanner::default(),
            prefixes: BTreeMap::new(),
            pending: VecDeque::new(),
            eof: false,
            domain: domain.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            next_id: 0,
            tls: false,
        })
    }

    /// Opens a TCP connection and performs a TLS handshake at once (XEP-0368), with SNI
    /// `domain` and ALPN `xmpp-client`. Nothing XMPP is sent yet.
    pub async fn connect_direct_tls(
        addr: SocketAddr,
        domain: &str,
    ) -> Result<RawClient, ClientError> {
        let mut client = RawClient::connect(addr, domain).await?;
        client.handshake(&[b"xmpp-client"]).await?;
        Ok(client)
    }

    /// Connects, negotiates STARTTLS, authenticates with SCRAM-SHA-256, restarts the stream,
    /// binds a resource (and a legacy session if required): a ready-to-use session. Returns
    /// the client and its full JID.
    pub async fn login(
        addr: SocketAddr,
        domain: &str,
        username: &str,
        password: &str,
    ) -> Result<(RawClient, String), ClientError> {
        let mut client = RawClient::connect(addr, domain).await?;
        client.open_stream().await?;
        client.starttls().await?;
        match client.auth_scram_sha256(username, password).await? {
            AuthOutcome::Success => {}
            AuthOutcome::Failure { condition, text } => {
                return Err(ClientError::Unexpected {
                    expected: format!("SASL success for {username}@{domain}"),
                    got: format!("failure {condition} {text:?}"),
                });
            }
        }
        let features = client.open_stream().await?;
        let jid = client.bind(None).await?;
        if features.session_required() {
            client.session().await?;
        }
        Ok((client, jid))
    }

    /// Creates an account with in-band registration (XEP-0077 §3.1) on a fresh STARTTLS
    /// connection and closes it.
    pub async fn register_account(
        addr: SocketAddr,
        domain: &str,
        username: &str,
        password: &str,
    ) -> Result<(), ClientError> {
        let mut client = RawClient::connect(addr, domain).await?;
        client.open_stream().await?;
        client.starttls().await?;
        client.register(username, password).await?.into_result()?;
        client.close().await
    }

    /// The domain this client's streams are addressed to.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Sets the timeout of each subsequent wait.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends bytes as they are, bounded by the timeout.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let timeout = self.timeout;
        let write = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ClientError::Io {
                context: format!("writing {} bytes", bytes.len()),
                source,
            }),
            Err(_) => Err(ClientError::Timeout {
                waiting_for: format!("the server to accept {} bytes", bytes.len()),
                after: timeout,
                buffered: String::new(),
            }),
        }
    }

    /// Sends a string as it is.
    pub async fn send(&mut self, xml: &str) -> Result<(), ClientError> {
        self.send_raw(xml.as_bytes()).await
    }

    /// Sends the initial stream header to this client's domain (RFC 6120 §4.7) and returns the
    /// features that follow the server's header.
    pub async fn open_stream(&mut self) -> Result<Features, ClientError> {
        let domain = self.domain.clone();
        self.send_header(Some(&domain)).await?;
        self.expect_header().await?;
        let features = self.expect_element("stream features").await?;
        if !features.is("features", ns::STREAM) {
            return Err(ClientError::Unexpected {
                expected: "<stream:features/>".into(),
                got: to_xml(&features),
            });
        }
        Ok(Features(features))
    }

    /// Sends a stream header with the given `to` (or none).
    pub async fn send_header(&mut self, to: Option<&str>) -> Result<(), ClientError> {
        let to = to
            .map(|t| format!(" to='{}'", escape(t)))
            .unwrap_or_default();
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}'{to} \
             version='1.0' xml:lang='en'>",
            ns::CLIENT,
            ns::STREAM
        );
        self.send(&header).await
    }

    /// Waits for the server's stream header.
    pub async fn expect_header(&mut self) -> Result<StreamHeader, ClientError> {
        match self.next_event().await? {
            StreamEvent::Header(h) => Ok(h),
            other => Err(ClientError::Unexpected {
                expected: "the server's stream header".into(),
                got: other.describe(),
            }),
        }
    }

    /// Waits for the next top-level element.
    pub async fn expect_element(&mut self, what: &str) -> Result<Element, ClientError> {
        match self.next_event().await? {
            StreamEvent::Element(e) => Ok(e),
            other => Err(ClientError::Unexpected {
                expected: what.into(),
                got: other.describe(),
            }),
        }
    }

    /// Waits for a stream error (RFC 6120 §4.9), skipping stanzas that arrive before it, then
    /// for the end of the stream (closing tag and/or end of connection).
    pub async fn expect_stream_error(&mut self) -> Result<StreamErrorReport, ClientError> {
        loop {
            match self.next_event().await? {
                StreamEvent::Element(e) if e.is("error", ns::STREAM) => {
                    let (condition, text) = stream_error_parts(&e);
                    let closed_with_tag = matches!(self.next_event().await, Ok(StreamEvent::Close));
                    return Ok(StreamErrorReport {
                        condition,
                        text,
                        closed_with_tag,
                    });
                }
                StreamEvent::Element(_) | StreamEvent::Header(_) => continue,
                other => {
                    return Err(ClientError::Unexpected {
                        expected: "a stream error".into(),
                        got: other.describe(),
                    });
                }
            }
        }
    }

    /// Waits until the server ends the stream (closing tag or end of connection), skipping
    /// anything else; returns what was skipped.
    pub async fn expect_end(&mut self) -> Result<Vec<StreamEvent>, ClientError> {
        let mut skipped = Vec::new();
        loop {
            match self.next_event().await? {
                StreamEvent::Close | StreamEvent::Eof => return Ok(skipped),
                other => skipped.push(other),
            }
        }
    }

    /// The next event, waiting at most the timeout.
    pub async fn next_event(&mut self) -> Result<StreamEvent, ClientError> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        let deadline = Instant::now() + self.timeout;
        self.next_event_until(deadline).await
    }

    async fn next_event_until(&mut self, deadline: Instant) -> Result<StreamEvent, ClientError> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(frame) = self.scanner.next_frame().map_err(ClientError::Protocol)? {
                return frame_to_event(&mut self.prefixes, frame);
            }
            if self.eof {
                return Ok(StreamEvent::Eof);
            }
            let read = tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await;
            match read {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        waiting_for: "data from the server".into(),
                        after: self.timeout,
                        buffered: self.scanner.buffered(),
                    });
                }
                Ok(Ok(0)) => self.eof = true,
                Ok(Ok(n)) => self.scanner.push(buf.get(..n).unwrap_or_default()),
                Ok(Err(e)) if is_disconnect(&e) => self.eof = true,
                Ok(Err(source)) => {
                    return Err(ClientError::Io {
                        context: "reading from the server".into(),
                        source,
                    });
                }
            }
        }
    }

    /// Negotiates STARTTLS (RFC 6120 §5.4.2), restarts the stream and returns the new features.
    pub async fn starttls(&mut self) -> Result<Features, ClientError> {
        self.send(&format!("<starttls xmlns='{}'/>", ns::TLS))
            .await?;
        let answer = self.expect_element("<proceed/>").await?;
        if !answer.is("proceed", ns::TLS) {
            return Err(ClientError::Unexpected {
                expected: "<proceed/>".into(),
                got: to_xml(&answer),
            });
        }
        self.handshake(&[]).await?;
        self.open_stream().await
    }

    async fn handshake(&mut self, alpn: &[&[u8]]) -> Result<(), ClientError> {
        let config = shared_cert()?.client_config(alpn)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name = rustls_pki_types::ServerName::try_from(self.domain.clone())
            .map_err(|e| ClientError::Tls(format!("server name {}: {e}", self.domain)))?;
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Err(ClientError::Tls("TLS is already established".into()));
        };
        let tls = tokio::time::timeout(self.timeout, connector.connect(server_name, tcp))
            .await
            .map_err(|_| ClientError::Timeout {
                waiting_for: "the TLS handshake".into(),
                after: self.timeout,
                buffered: String::new(),
            })?
            .map_err(|e| ClientError::Tls(format!("handshake with {}: {e}", self.domain)))?;
        self.io = Io::Tls(Box::new(tls));
        self.tls = true;
        self.scanner.reset();
        Ok(())
    }

    /// The ALPN protocol the server chose, if TLS is up.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        match &self.io {
            Io::Tls(tls) => tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
            _ => None,
        }
    }

    /// SASL PLAIN (RFC 4616) with the initial response in `<auth/>`.
    pub async fn auth_plain(
        &mut self,
        username: &str,
        password: &str,
    ) -> Result<AuthOutcome, ClientError> {
        let message = format!("\0{username}\0{password}");
        self.send_auth("PLAIN", Some(message.as_bytes())).await?;
        match self.read_sasl().await? {
            SaslStep::Success(_) => Ok(self.sasl_success()),
            SaslStep::Failure(outcome) => Ok(outcome),
            SaslStep::Challenge(data) => Err(ClientError::Unexpected {
                expected: "success or failure after PLAIN".into(),
                got: format!("challenge {:?}", String::from_utf8_lossy(&data)),
            }),
        }
    }

    /// SASL SCRAM-SHA-256 (RFC 7677) with the server signature verified.
    pub async fn auth_scram_sha256(
        &mut self,
        username: &str,
        password: &str,
    ) -> Result<AuthOutcome, ClientError> {
        let mut scram = scram::ScramClient::new(username, password);
        self.send_auth("SCRAM-SHA-256", Some(scram.client_first().as_bytes()))
            .await?;
        let server_first = match self.read_sasl().await? {
            SaslStep::Challenge(data) => String::from_utf8(data)
                .map_err(|_| ClientError::Protocol("server-first-message is not UTF-8".into()))?,
            SaslStep::Failure(outcome) => return Ok(outcome),
            SaslStep::Success(_) => {
                return Err(ClientError::Protocol(
                    "SCRAM success before any proof".into(),
                ));
            }
        };
        let client_final = scram
            .client_final(&server_first)
            .map_err(ClientError::Protocol)?;
        self.send(&format!(
            "<response xmlns='{}'>{}</response>",
            ns::SASL,
            B64.encode(client_final)
        ))
        .await?;
        let server_final = match self.read_sasl().await? {
            SaslStep::Success(data) => data,
            SaslStep::Failure(outcome) => return Ok(outcome),
            // RFC 6120 §6.4.6 lets a server send the additional data as a last challenge.
            SaslStep::Challenge(data) => {
                self.send(&format!("<response xmlns='{}'/>", ns::SASL))
                    .await?;
                match self.read_sasl().await? {
                    SaslStep::Success(_) => data,
                    SaslStep::Failure(outcome) => return Ok(outcome),
                    SaslStep::Challenge(_) => {
                        return Err(ClientError::Protocol("a third SCRAM challenge".into()));
                    }
                }
            }
        };
        let server_final = String::from_utf8(server_final)
            .map_err(|_| ClientError::Protocol("server-final-message is not UTF-8".into()))?;
        scram
            .verify_server_final(&server_final)
            .map_err(ClientError::Protocol)?;
        Ok(self.sasl_success())
    }

    /// Sends `<auth mechanism='...'>` with an optional initial response (base64-encoded here;
    /// an empty one is sent as `=`, RFC 6120 §6.4.2).
    pub async fn send_auth(
        &mut self,
        mechanism: &str,
        initial: Option<&[u8]>,
    ) -> Result<(), ClientError> {
        let body = match initial {
            Some([]) => "=".to_owned(),
            Some(data) => B64.encode(data),
            None => String::new(),
        };
        self.send(&format!(
            "<auth xmlns='{}' mechanism='{}'>{body}</auth>",
            ns::SASL,
            escape(mechanism)
        ))
        .await
    }

    /// Reads the server's answer to a SASL step and reports a failure as an [`AuthOutcome`].
    pub async fn read_auth_outcome(&mut self) -> Result<AuthOutcome, ClientError> {
        match self.read_sasl().await? {
            SaslStep::Success(_) => Ok(self.sasl_success()),
            SaslStep::Failure(outcome) => Ok(outcome),
            SaslStep::Challenge(data) => Err(ClientError::Unexpected {
                expected: "SASL success or failure".into(),
                got: format!("challenge {:?}", String::from_utf8_lossy(&data)),
            }),
        }
    }

    fn sasl_success(&mut self) -> AuthOutcome {
        // The stream restarts (RFC 6120 §6.4.6): nothing from the old stream may follow.
        self.scanner.reset();
        AuthOutcome::Success
    }

    async fn read_sasl(&mut self) -> Result<SaslStep, ClientError> {
        let e = self.expect_element("a SASL answer").await?;
        if e.ns() != ns::SASL {
            return Err(ClientError::Unexpected {
                expected: "a SASL answer".into(),
                got: to_xml(&e),
            });
        }
        let decode = |e: &Element| {
            let text = e.text();
            let text = text.trim();
            if text.is_empty() || text == "=" {
                Ok(Vec::new())
            } else {
                B64.decode(text)
                    .map_err(|err| ClientError::Protocol(format!("bad base64 in SASL: {err}")))
            }
        };
        match e.name() {
            "challenge" => Ok(SaslStep::Challenge(decode(&e)?)),
            "success" => Ok(SaslStep::Success(decode(&e)?)),
            "failure" => {
                let condition = e
                    .children()
                    .find(|c| c.name() != "text")
                    .map(|c| c.name().to_owned())
                    .unwrap_or_default();
                let text = e.get_child("text", ns::SASL).map(Element::text);
                Ok(SaslStep::Failure(AuthOutcome::Failure { condition, text }))
            }
            _ => Err(ClientError::Unexpected {
                expected: "challenge, success or failure".into(),
                got: to_xml(&e),
            }),
        }
    }

    /// A fresh stanza id.
    pub fn next_id(&mut self) -> String {
        self.next_id += 1;
        format!("t{}", self.next_id)
    }

    /// Sends an IQ of `kind` (`get`/`set`) with `payload` to `to` (or the account/server when
    /// `None`) and waits for the response with the same id. Other stanzas arriving meanwhile
    /// are kept for later [`next_event`](Self::next_event) calls.
    pub async fn iq(
        &mut self,
        kind: &str,
        to: Option<&str>,
        payload: &str,
    ) -> Result<IqOutcome, ClientError> {
        let id = self.next_id();
        let to = to
            .map(|t| format!(" to='{}'", escape(t)))
            .unwrap_or_default();
        self.send(&format!("<iq type='{kind}' id='{id}'{to}>{payload}</iq>"))
            .await?;
        self.expect_iq_response(&id).await
    }

    /// Waits for the IQ response with `id`, keeping other events for later.
    pub async fn expect_iq_response(&mut self, id: &str) -> Result<IqOutcome, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut kept = VecDeque::new();
        let outcome = loop {
            let event = match self.pending.pop_front() {
                Some(event) => event,
                None => match self.next_event_until(deadline).await {
                    Ok(event) => event,
                    Err(e) => {
                        self.pending.extend(kept);
                        return Err(e);
                    }
                },
            };
            match event {
                StreamEvent::Element(e)
                    if e.is("iq", ns::CLIENT)
                        && e.attr("id") == Some(id)
                        && matches!(e.attr("type"), Some("result" | "error")) =>
                {
                    break Ok(if e.attr("type") == Some("result") {
                        IqOutcome::Result(e)
                    } else {
                        let condition = e
                            .get_child("error", ns::CLIENT)
                            .and_then(|err| {
                                err.children()
                                    .find(|c| c.ns() == ns::STANZAS && c.name() != "text")
                            })
                            .map(|c| c.name().to_owned())
                            .unwrap_or_default();
                        IqOutcome::Error {
                            condition,
                            stanza: e,
                        }
                    });
                }
                // A stream error ends the wait but stays readable (`expect_stream_error`).
                StreamEvent::Element(e) if e.is("error", ns::STREAM) => {
                    let got = format!("stream error {}", to_xml(&e));
                    kept.push_back(StreamEvent::Element(e));
                    break Err(ClientError::Unexpected {
                        expected: format!("the response to IQ {id}"),
                        got,
                    });
                }
                StreamEvent::Element(e) => kept.push_back(StreamEvent::Element(e)),
                other => {
                    break Err(ClientError::Unexpected {
                        expected: format!("the response to IQ {id}"),
                        got: other.describe(),
                    });
                }
            }
        };
        // Keep the order: what was set aside comes before anything still pending.
        while let Some(event) = kept.pop_back() {
            self.pending.push_front(event);
        }
        outcome
    }

    /// In-band registration (XEP-0077 §3.1): asks for the fields, checks that username and
    /// password are among them, then submits them.
    pub async fn register(
        &mut self,
        username: &str,
        password: &str,
    ) -> Result<IqOutcome, ClientError> {
        let form = self
            .iq("get", None, &format!("<query xmlns='{}'/>", ns::REGISTER))
            .await?
            .into_result()?;
        let query =
            form.get_child("query", ns::REGISTER)
                .ok_or_else(|| ClientError::Unexpected {
                    expected: "a registration form".into(),
                    got: to_xml(&form),
                })?;
        for field in ["username", "password"] {
            if !query.has_child(field, ns::REGISTER) {
                return Err(ClientError::Unexpected {
                    expected: format!("a <{field}/> field in the registration form"),
                    got: to_xml(&form),
                });
            }
        }
        self.iq(
            "set",
            None,
            &format!(
                "<query xmlns='{}'><username>{}</username><password>{}</password></query>",
                ns::REGISTER,
                escape(username),
                escape(password)
            ),
        )
        .await
    }

    /// Binds a resource (RFC 6120 §7.6), server-generated when `resource` is `None`; returns
    /// the full JID.
    pub async fn bind(&mut self, resource: Option<&str>) -> Result<String, ClientError> {
        let payload = match resource {
            Some(r) => format!(
                "<bind xmlns='{}'><resource>{}</resource></bind>",
                ns::BIND,
                escape(r)
            ),
            None => format!("<bind xmlns='{}'/>", ns::BIND),
        };
        let result = self.iq("set", None, &payload).await?.into_result()?;
        result
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("jid", ns::BIND))
            .map(Element::text)
            .ok_or_else(|| ClientError::Unexpected {
                expected: "<bind><jid/></bind>".into(),
                got: to_xml(&result),
            })
    }

    /// Establishes a legacy session (RFC 3921 §3), for servers that still require it.
    pub async fn session(&mut self) -> Result<(), ClientError> {
        self.iq("set", None, &format!("<session xmlns='{}'/>", ns::SESSION))
            .await?
            .into_result()
            .map(drop)
    }

    /// XEP-0199 ping of `to` (the server's domain when `None`); errors unless the answer is
    /// a result.
    pub async fn ping(&mut self, to: Option<&str>) -> Result<(), ClientError> {
        let to = to.map(str::to_owned).unwrap_or_else(|| self.domain.clone());
        self.iq("get", Some(&to), &format!("<ping xmlns='{}'/>", ns::PING))
            .await?
            .into_result()
            .map(drop)
    }

    /// Writes `chunks` in order while reading whatever the server sends, until the server ends
    /// the stream, the writes fail, or `deadline` passes after writing. For floods and
    /// oversized stanzas: reading concurrently means the server's stream error is consumed
    /// before a reset of the connection could discard it.
    pub async fn send_while_reading<I>(
        &mut self,
        chunks: I,
        deadline: Duration,
    ) -> Result<SendReport, ClientError>
    where
        I: IntoIterator<Item = Vec<u8>>,
    {
        let until = Instant::now() + deadline;
        let written = std::cell::Cell::new(0usize);
        let mut write_error = None;
        let mut events = Vec::new();
        {
            let (mut reader, mut writer) = tokio::io::split(&mut self.io);
            let scanner = &mut self.scanner;
            let prefixes = &mut self.prefixes;
            let write_all = async {
                for chunk in chunks {
                    writer.write_all(&chunk).await?;
                    written.set(written.get() + chunk.len());
                }
                writer.flush().await
            };
            tokio::pin!(write_all);
            let mut writing = true;
            let mut buf = vec![0u8; 16 * 1024];
            'outer: loop {
                // Frame everything buffered first.
                while let Some(frame) = scanner.next_frame().map_err(ClientError::Protocol)? {
                    let event = frame_to_event(prefixes, frame)?;
                    let end = matches!(event, StreamEvent::Close);
                    events.push(event);
                    if end {
                        break 'outer;
                    }
                }
                tokio::select! {
                    result = &mut write_all, if writing => {
                        writing = false;
                        if let Err(e) = result {
                            write_error = Some(e);
                        }
                    }
                    read = reader.read(&mut buf) => match read {
                        Ok(0) => { events.push(StreamEvent::Eof); break; }
                        Ok(n) => scanner.push(buf.get(..n).unwrap_or_default()),
                        Err(e) if is_disconnect(&e) => { events.push(StreamEvent::Eof); break; }
                        Err(source) => {
                            return Err(ClientError::Io {
                                context: "reading while sending".into(),
                                source,
                            });
                        }
                    },
                    () = tokio::time::sleep_until(until), if !writing => break,
                }
            }
        }
        if events.iter().any(|e| matches!(e, StreamEvent::Eof)) {
            self.eof = true;
        }
        Ok(SendReport {
            bytes_written: written.get(),
            write_error,
            events,
        })
    }

    /// Ends the stream politely (RFC 6120 §4.4) and waits for the server's closing tag or the
    /// end of the connection.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.send("</stream:stream>").await?;
        self.expect_end().await.map(drop)
    }
}

fn frame_to_event(
    prefixes: &mut BTreeMap<Option<String>, String>,
    frame: Frame,
) -> Result<StreamEvent, ClientError> {
    Ok(match frame {
        Frame::Header(attrs) => {
            *prefixes = framing::prefixes(&attrs);
            StreamEvent::Header(StreamHeader { attrs })
        }
        Frame::Close => StreamEvent::Close,
        Frame::Element(xml) => {
            let mut with_stream = prefixes.clone();
            with_stream
                .entry(Some("stream".into()))
                .or_insert_with(|| ns::STREAM.to_owned());
            let element = Element::from_reader_with_prefixes(xml.as_bytes(), with_stream)
                .map_err(|e| ClientError::Protocol(format!("{e} in {xml:?}")))?;
            StreamEvent::Element(element)
        }
    })
}

enum SaslStep {
    Challenge(Vec<u8>),
    Success(Vec<u8>),
    Failure(AuthOutcome),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='example.test' version='1.0'>";

    /// A scripted server over plain TCP: for each step, reads until the client has sent
    /// `expect`, then writes `reply`.
    async fn scripted(steps: Vec<(&'static str, String)>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut seen = String::new();
            let mut buf = [0u8; 4096];
            for (expect, reply) in steps {
                while !seen.contains(expect) {
                    let n = tcp.read(&mut buf).await.unwrap();
                    assert!(
                        n > 0,
                        "client closed before sending {expect:?}; sent {seen:?}"
                    );
                    seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
                }
                seen = seen.split_once(expect).unwrap().1.to_owned();
                tcp.write_all(reply.as_bytes()).await.unwrap();
            }
            // Hold the connection until the client is done.
            let _ = tcp.read(&mut buf).await;
        });
        addr
    }

    #[tokio::test]
    async fn negotiates_registers_binds_and_reads_a_stream_error() {
        let addr = scripted(vec![
            (
                "to='example.test'",
                format!(
                    "{HEADER}<stream:features><register xmlns='{}'/><mechanisms xmlns='{}'>\
                     <mechanism>SCRAM-SHA-256</mechanism><mechanism>PLAIN</mechanism>\
                     </mechanisms></stream:features>",
                    ns::REGISTER_FEATURE,
                    ns::SASL
                ),
            ),
            (
                "<query xmlns='jabber:iq:register'/></iq>",
                "<iq type='result' id='t1'><query xmlns='jabber:iq:register'><username/>\
                 <password/></query></iq>"
                    .into(),
            ),
            (
                "<username>al&amp;ice</username>",
                "<iq type='error' id='t2'><error type='cancel'><conflict \
                 xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
                    .into(),
            ),
            (
                "<resource>r</resource>",
                // A message arrives before the bind result; it is kept for later.
                "<message from='x@example.test' id='m1'><body>early</body></message>\
                 <iq type='result' id='t3'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                 <jid>alice@example.test/r</jid></bind></iq>"
                    .into(),
            ),
            (
                "<ping",
                "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
                 <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too fast</text></stream:error>\
                 </stream:stream>"
                    .into(),
            ),
        ])
        .await;
        let mut client = RawClient::connect(addr, "example.test").await.unwrap();
        let features = client.open_stream().await.unwrap();
        assert_eq!(features.mechanisms(), ["SCRAM-SHA-256", "PLAIN"]);
        assert!(features.has_register() && !features.has_starttls() && !features.has_bind());

        match client.register("al&ice", "pw").await.unwrap() {
            IqOutcome::Error { condition, .. } => assert_eq!(condition, "conflict"),
            IqOutcome::Result(r) => panic!("{}", to_xml(&r)),
        }
        assert_eq!(
            client.bind(Some("r")).await.unwrap(),
            "alice@example.test/r"
        );
        match client.next_event().await.unwrap() {
            StreamEvent::Element(m) => assert_eq!(m.attr("id"), Some("m1")),
            other => panic!("{other:?}"),
        }
        let error = client.ping(None).await.unwrap_err();
        assert!(error.to_string().contains("policy-violation"), "{error}");
        // The ping's wait left the stream error for the test to examine.
        let report = client.expect_stream_error().await.unwrap();
        assert_eq!(report.condition, "policy-violation");
        assert_eq!(report.text.as_deref(), Some("too fast"));
        assert!(report.closed_with_tag);
    }

    #[tokio::test]
    async fn send_while_reading_catches_the_error_of_an_interrupted_send() {
        let addr = scripted(vec![
            ("version='1.0'", format!("{HEADER}<stream:features/>")),
            (
                "xxxx",
                "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
                 </stream:error></stream:stream>"
                    .into(),
            ),
        ])
        .await;
        let mut client = RawClient::connect(addr, "example.test").await.unwrap();
        client.open_stream().await.unwrap();
        let chunks = (0..4).map(|_| vec![b'x'; 1024]);
        let report = client
            .send_while_reading(chunks, Duration::from_secs(5))
            .await
            .unwrap();
        let error = report.stream_error().expect("the stream error");
        assert_eq!(error.condition, "policy-violation");
        assert!(error.closed_with_tag);
    }

    #[tokio::test]
    async fn a_silent_server_times_out_with_what_was_received() {
        let addr = scripted(vec![(
            "version='1.0'",
            "<stream:stream xmlns='jabber:cl".into(),
        )])
        .await;
        let mut client = RawClient::connect(addr, "example.test").await.unwrap();
        client.set_timeout(Duration::from_millis(200));
        match client.open_stream().await {
            Err(ClientError::Timeout { buffered, .. }) => {
                assert!(buffered.contains("jabber:cl"), "{buffered}")
            }
            other => panic!("{other:?}"),
        }
    }
}
