//! One XMPP client connection: TCP from a chosen source address, STARTTLS (RFC 6120 §5) or
//! direct TLS (XEP-0368), SASL (§6), resource binding (§7), the optional legacy session
//! (RFC 6121 §1.4), in-band registration (XEP-0077 §3.1) and answers to server pings
//! (XEP-0199 §4.2) and other server IQs (§8.4 `service-unavailable`).
//!
//! Only standard behaviour: this talks to any compliant server. Frames are read with the
//! `starling-xml` framer. While a session idles it holds no read buffer: it waits for the
//! socket to become readable, then reads with a temporary buffer until the TLS layer has
//! nothing more (see [`Session::drain`]).

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use rustls_pki_types::ServerName;
use starling_xml::writer::{StreamOpen, write_stream_open};
use starling_xml::{Element, Frame, Framer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::load::sasl::{Mechanism, SaltCache, ScramClient, plain_initial};

const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_REGISTER: &str = "jabber:iq:register";
const NS_PING: &str = "urn:xmpp:ping";
/// Bytes read per call while data flows; freed when the socket goes idle.
const READ_CHUNK: usize = 8192;

/// How TLS is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum TlsMode {
    /// Plain TCP, then `<starttls/>` (RFC 6120 §5).
    Starttls,
    /// TLS from the first byte, ALPN `xmpp-client` (XEP-0368).
    Direct,
}

/// Why a connection step failed; [`LoadError::kind`] is the key errors are counted under.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// TCP connect (or bind of the source address) failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// TLS negotiation failed.
    #[error("tls: {0}")]
    Tls(String),
    /// SASL failed: the condition from `<failure/>`, or a client-side check.
    #[error("auth: {0}")]
    Auth(String),
    /// In-band registration failed with this condition.
    #[error("register: {0}")]
    Register(String),
    /// Resource binding failed with this condition.
    #[error("bind: {0}")]
    Bind(String),
    /// The server closed the stream with `<stream:error/>`.
    #[error("stream error: {0}")]
    Stream(String),
    /// A step did not complete in time.
    #[error("timeout while {0}")]
    Timeout(&'static str),
    /// The server closed the stream or the connection.
    #[error("closed by server")]
    Closed,
    /// The server sent something this client cannot follow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// I/O after connect.
    #[error("io: {0}")]
    Io(io::Error),
}

impl LoadError {
    /// The kind errors are counted under.
    pub fn kind(&self) -> String {
        match self {
            LoadError::Connect(_) => "connect".to_owned(),
            LoadError::Tls(_) => "tls".to_owned(),
            LoadError::Auth(c) => format!("auth:{c}"),
            LoadError::Register(c) => format!("register:{c}"),
            LoadError::Bind(c) => format!("bind:{c}"),
            LoadError::Stream(c) => format!("stream-error:{c}"),
            LoadError::Timeout(step) => format!("timeout:{step}"),
            LoadError::Closed => "closed".to_owned(),
            LoadError::Protocol(_) => "protocol".to_owned(),
            LoadError::Io(_) => "io".to_owned(),
        }
    }
}

/// One account: a localpart on the target domain and its password.
#[derive(Debug)]
pub struct Account {
    /// The localpart.
    pub user: String,
    /// The password.
    pub password: String,
    /// The salted password, cached after the first SCRAM login.
    pub salt: SaltCache,
}

impl Account {
    /// An account with an empty SCRAM cache.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Account {
            user: user.into(),
            password: password.into(),
            salt: SaltCache::default(),
        }
    }
}

/// Where and how to connect; shared by every connection of a run.
pub struct Target {
    /// The server's address.
    pub addr: SocketAddr,
    /// The XMPP domain (stream `to`).
    pub domain: String,
    /// STARTTLS or direct TLS.
    pub tls: TlsMode,
    /// The name the certificate is checked against.
    pub tls_name: ServerName<'static>,
    /// The TLS client configuration.
    pub connector: TlsConnector,
    /// Source addresses, used round-robin; empty: the system chooses.
    pub sources: Vec<IpAddr>,
    /// Deadline of each negotiation step.
    pub step_timeout: Duration,
    /// The SASL mechanism to insist on; `None`: the best SCRAM offered, else PLAIN.
    pub mechanism: Option<Mechanism>,
    /// Whether to send initial presence after binding.
    pub presence: bool,
    next_source: AtomicUsize,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("domain", &self.domain)
            .field("tls", &self.tls)
            .field("sources", &self.sources.len())
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// A target; see the field docs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        addr: SocketAddr,
        domain: String,
        tls: TlsMode,
        tls_name: ServerName<'static>,
        connector: TlsConnector,
        sources: Vec<IpAddr>,
        step_timeout: Duration,
        mechanism: Option<Mechanism>,
        presence: bool,
    ) -> Self {
        Target {
            addr,
            domain,
            tls,
            tls_name,
            connector,
            sources,
            step_timeout,
            mechanism,
            presence,
            next_source: AtomicUsize::new(0),
        }
    }

    fn source(&self) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
        self.sources.get(i).copied()
    }

    async fn tcp(&self) -> Result<TcpStream, LoadError> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(LoadError::Connect)?;
        if let Some(ip) = self.source() {
            socket.set_reuseaddr(true).map_err(LoadError::Connect)?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(LoadError::Connect)?;
        }
        let stream = tokio::time::timeout(self.step_timeout, socket.connect(self.addr))
            .await
            .map_err(|_| LoadError::Timeout("connecting"))?
            .map_err(LoadError::Connect)?;
        stream.set_nodelay(true).map_err(LoadError::Connect)?;
        Ok(stream)
    }

    /// Connects, secures and opens a stream; returns the stream with the features read.
    async fn open(&self) -> Result<(Negotiating, Element), LoadError> {
        let tcp = self.tcp().await?;
        let mut framer = Framer::new();
        let tls = match self.tls {
            TlsMode::Direct => self.handshake(tcp).await?,
            TlsMode::Starttls => {
                let mut tcp = tcp;
                let features = open_stream(&mut tcp, &mut framer, self).await?;
                if !has_child(&features, "starttls", NS_TLS) {
                    return Err(LoadError::Tls("server offers no STARTTLS".to_owned()));
                }
                write(&mut tcp, format!("<starttls xmlns='{NS_TLS}'/>").as_bytes()).await?;
                let answer = next_element(&mut tcp, &mut framer, self, "starting TLS").await?;
                if answer.name() != "proceed" {
                    return Err(LoadError::Tls(format!(
                        "server answered <{}/>",
                        answer.name()
                    )));
                }
                framer.reset();
                self.handshake(tcp).await?
            }
        };
        let mut neg = Negotiating { tls, framer };
        let features = open_stream(&mut neg.tls, &mut neg.framer, self).await?;
        Ok((neg, features))
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<Tls, LoadError> {
        tokio::time::timeout(
            self.step_timeout,
            self.connector.connect(self.tls_name.clone(), tcp),
        )
        .await
        .map_err(|_| LoadError::Timeout("tls handshake"))?
        .map_err(|e| LoadError::Tls(e.to_string()))
    }

    /// Creates `account` through in-band registration (XEP-0077 §3.1). `Ok(false)`: it existed
    /// (`conflict`).
    pub async fn register(&self, account: &Account) -> Result<bool, LoadError> {
        let (mut neg, features) = self.open().await?;
        if !has_child(
            &features,
            "register",
            "http://jabber.org/features/iq-register",
        ) {
            // Some servers do not advertise the feature but still answer; try anyway.
        }
        let mut req = Vec::with_capacity(256);
        req.extend_from_slice(
            format!("<iq type='set' id='reg1'><query xmlns='{NS_REGISTER}'><username>").as_bytes(),
        );
        starling_xml::escape::escape_text_into(&mut req, &account.user);
        req.extend_from_slice(b"</username><password>");
        starling_xml::escape::escape_text_into(&mut req, &account.password);
        req.extend_from_slice(b"</password></query></iq>");
        write(&mut neg.tls, &req).await?;
        let reply = loop {
            let el = next_element(&mut neg.tls, &mut neg.framer, self, "registering").await?;
            if el.name() == "iq" && el.id().as_deref() == Some("reg1") {
                break el;
            }
        };
        let outcome = match reply.stanza_type().as_deref() {
            Some("result") => Ok(true),
            _ => match error_condition(&reply).as_deref() {
                Some("conflict") => Ok(false),
                Some(c) => Err(LoadError::Register(c.to_owned())),
                None => Err(LoadError::Register("undefined-condition".to_owned())),
            },
        };
        close(&mut neg.tls, &mut neg.framer, self.step_timeout).await;
        outcome
    }

    /// Logs `account` in and binds `resource`: a bound [`Session`].
    pub async fn login(&self, account: &Account, resource: &str) -> Result<Session, LoadError> {
        let (mut neg, features) = self.open().await?;
        let offered = mechanisms(&features);
        let mech = Mechanism::choose(&offered, self.mechanism).ok_or_else(|| {
            LoadError::Auth(format!("no usable mechanism among {}", offered.join(" ")))
        })?;
        self.authenticate(&mut neg, account, mech).await?;
        neg.framer.reset();
        let features = open_stream(&mut neg.tls, &mut neg.framer, self).await?;
        if !has_child(&features, "bind", NS_BIND) {
            return Err(LoadError::Bind("server offers no bind".to_owned()));
        }
        let mut req = Vec::with_capacity(160);
        req.extend_from_slice(
            format!("<iq type='set' id='bind1'><bind xmlns='{NS_BIND}'><resource>").as_bytes(),
        );
        starling_xml::escape::escape_text_into(&mut req, resource);
        req.extend_from_slice(b"</resource></bind></iq>");
        write(&mut neg.tls, &req).await?;
        let reply = self.await_iq(&mut neg, "bind1", "binding").await?;
        if reply.stanza_type().as_deref() != Some("result") {
            return Err(LoadError::Bind(
                error_condition(&reply).unwrap_or_else(|| "undefined-condition".to_owned()),
            ));
        }
        let jid = child_text(&reply, "jid")
            .ok_or_else(|| LoadError::Bind("result without <jid/>".to_owned()))?;
        let session_needed = features_raw(&features).contains(NS_SESSION)
            && !session_optional(features_raw(&features));
        if session_needed {
            write(
                &mut neg.tls,
                format!("<iq type='set' id='sess1'><session xmlns='{NS_SESSION}'/></iq>")
                    .as_bytes(),
            )
            .await?;
            let reply = self.await_iq(&mut neg, "sess1", "starting session").await?;
            if reply.stanza_type().as_deref() != Some("result") {
                return Err(LoadError::Protocol(
                    "session establishment refused".to_owned(),
                ));
            }
        }
        if self.presence {
            write(&mut neg.tls, b"<presence/>").await?;
        }
        Ok(Session {
            tls: neg.tls,
            framer: neg.framer,
            jid,
            mechanism: mech,
        })
    }

    async fn await_iq(
        &self,
        neg: &mut Negotiating,
        id: &str,
        step: &'static str,
    ) -> Result<Element, LoadError> {
        loop {
            let el = next_element(&mut neg.tls, &mut neg.framer, self, step).await?;
            if el.name() == "iq" && el.id().as_deref() == Some(id) {
                return Ok(el);
            }
        }
    }

    async fn authenticate(
        &self,
        neg: &mut Negotiating,
        account: &Account,
        mech: Mechanism,
    ) -> Result<(), LoadError> {
        let auth = |payload: &str| {
            format!(
                "<auth xmlns='{NS_SASL}' mechanism='{}'>{payload}</auth>",
                mech.name()
            )
        };
        let failure = |el: &Element| {
            LoadError::Auth(
                el.first_child()
                    .map(|(n, _)| n.to_owned())
                    .unwrap_or_else(|| "failure".to_owned()),
            )
        };
        if mech == Mechanism::Plain {
            let msg = auth(&plain_initial(&account.user, &account.password));
            write(&mut neg.tls, msg.as_bytes()).await?;
            let el = next_element(&mut neg.tls, &mut neg.framer, self, "authenticating").await?;
            return match el.name() {
                "success" => Ok(()),
                "failure" => Err(failure(&el)),
                other => Err(LoadError::Protocol(format!("<{other}/> during SASL"))),
            };
        }
        let mut scram = ScramClient::new(mech, &account.user, &account.password, &account.salt);
        let msg = auth(&scram.client_first());
        write(&mut neg.tls, msg.as_bytes()).await?;
        let el = next_element(&mut neg.tls, &mut neg.framer, self, "authenticating").await?;
        match el.name() {
            "challenge" => {}
            "failure" => return Err(failure(&el)),
            other => return Err(LoadError::Protocol(format!("<{other}/> during SASL"))),
        }
        let text = element_text(&el);
        let response = scram
            .client_final(&text)
            .map_err(|e| LoadError::Auth(format!("client:{e}")))?;
        write(
            &mut neg.tls,
            format!("<response xmlns='{NS_SASL}'>{response}</response>").as_bytes(),
        )
        .await?;
        let el = next_element(&mut neg.tls, &mut neg.framer, self, "authenticating").await?;
        match el.name() {
            "success" => scram
                .verify_success(&element_text(&el))
                .map_err(|e| LoadError::Auth(format!("client:{e}"))),
            "failure" => Err(failure(&el)),
            other => Err(LoadError::Protocol(format!("<{other}/> during SASL"))),
        }
    }
}

/// The TLS stream every session runs over.
pub type Tls = TlsStream<TcpStream>;

/// A stream being negotiated (TLS up, not bound yet).
struct Negotiating {
    tls: Tls,
    framer: Framer,
}

/// What [`Session::drain`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The stream is open; nothing more to read now.
    Open,
    /// The server closed the stream (`</stream:stream>` or end of file).
    Closed,
}

/// A bound session.
#[derive(Debug)]
pub struct Session {
    tls: Tls,
    framer: Framer,
    /// The full JID the server bound.
    pub jid: String,
    /// The SASL mechanism that logged in.
    pub mechanism: Mechanism,
}

impl Session {
    /// Sends bytes (whole stanzas) and flushes them to the socket.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), LoadError> {
        write(&mut self.tls, bytes).await
    }

    /// Resolves when the socket has bytes to read (or was closed).
    pub async fn readable(&self) -> io::Result<()> {
        self.tls.get_ref().0.readable().await
    }

    /// Reads everything available without waiting, hands each stanza to `on_stanza`, and
    /// answers server IQs (pings with a result, others with `service-unavailable`). The read
    /// buffer exists only during this call.
    pub async fn drain(
        &mut self,
        mut on_stanza: impl FnMut(&Element),
    ) -> Result<Drained, LoadError> {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut replies = Vec::new();
        let mut state = Drained::Open;
        loop {
            // Frames already buffered first (a negotiation read may have brought some).
            loop {
                match self.framer.next_frame() {
                    Ok(None) => break,
                    Ok(Some(Frame::StreamClose)) => state = Drained::Closed,
                    Ok(Some(Frame::StreamOpen(_))) => {
                        return Err(LoadError::Protocol("second stream header".to_owned()));
                    }
                    Ok(Some(Frame::Element(el))) => {
                        if el.name() == "error" && el.ns() == NS_STREAMS {
                            return Err(stream_error(&el));
                        }
                        if el.name() == "iq" {
                            answer_iq(&el, &mut replies);
                        }
                        on_stanza(&el);
                    }
                    Err(e) => return Err(LoadError::Protocol(e.to_string())),
                }
            }
            if state == Drained::Closed {
                break;
            }
            match self.tls.read(&mut buf).now_or_never() {
                None => break,
                Some(Ok(0)) => {
                    state = Drained::Closed;
                    break;
                }
                Some(Ok(n)) => self.framer.feed(buf.get(..n).unwrap_or_default()),
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Some(Err(e)) => return Err(LoadError::Io(e)),
            }
        }
        drop(buf);
        if !replies.is_empty() && state == Drained::Open {
            self.send(&replies).await?;
        }
        Ok(state)
    }

    /// Closes the stream (`</stream:stream>`), waits up to `wait` for the server's close,
    /// then shuts TLS down.
    pub async fn close(mut self, wait: Duration) {
        close(&mut self.tls, &mut self.framer, wait).await;
    }
}

fn answer_iq(el: &Element, out: &mut Vec<u8>) {
    let kind = el.stanza_type();
    if !matches!(kind.as_deref(), Some("get" | "set")) {
        return;
    }
    let id = el.id().unwrap_or(Cow::Borrowed(""));
    let mut w = starling_xml::writer::XmlWriter::new(out);
    w.start("iq");
    if let Some(from) = el.from() {
        w.attr("to", &from);
    }
    w.attr("id", &id);
    let child_ns = el.first_child().map(|(_, ns)| ns);
    // Pings (XEP-0199 §4.2) and roster pushes (RFC 6121 §2.1.6, which a client must
    // acknowledge) get a result.
    let roster_push = kind.as_deref() == Some("set") && child_ns == Some("jabber:iq:roster");
    if child_ns == Some(NS_PING) || roster_push {
        w.attr("type", "result").empty();
    } else {
        w.attr("type", "error");
        w.start("error").attr("type", "cancel");
        w.start("service-unavailable")
            .attr("xmlns", "urn:ietf:params:xml:ns:xmpp-stanzas")
            .empty();
        w.end("error").end("iq");
    }
}

async fn write<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> Result<(), LoadError> {
    s.write_all(bytes).await.map_err(LoadError::Io)?;
    s.flush().await.map_err(LoadError::Io)
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, framer: &mut Framer, wait: Duration) {
    if write(s, b"</stream:stream>").await.is_err() {
        return;
    }
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 2048];
    'outer: loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                framer.feed(buf.get(..n).unwrap_or_default());
                loop {
                    match framer.next_frame() {
                        Ok(Some(Frame::StreamClose)) | Err(_) => break 'outer,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                    }
                }
            }
            _ => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
}

/// Sends a stream header and reads the server's header and features.
async fn open_stream<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    target: &Target,
) -> Result<Element, LoadError> {
    let mut out = Vec::with_capacity(200);
    write_stream_open(
        &mut out,
        &StreamOpen {
            content_ns: "jabber:client",
            to: Some(&target.domain),
            ..StreamOpen::default()
        },
    );
    write(s, &out).await?;
    let mut header_seen = false;
    loop {
        match read_frame(s, framer, target, "opening stream").await? {
            Frame::StreamOpen(_) => header_seen = true,
            Frame::Element(el) if el.name() == "error" && el.ns() == NS_STREAMS => {
                return Err(stream_error(&el));
            }
            Frame::Element(el) if header_seen && el.name() == "features" => return Ok(el),
            Frame::Element(el) => {
                return Err(LoadError::Protocol(format!(
                    "<{}/> instead of stream features",
                    el.name()
                )));
            }
            Frame::StreamClose => return Err(LoadError::Closed),
        }
    }
}

async fn next_element<S: AsyncRead + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    target: &Target,
    step: &'static str,
) -> Result<Element, LoadError> {
    match read_frame(s, framer, target, step).await? {
        Frame::Element(el) if el.name() == "error" && el.ns() == NS_STREAMS => {
            Err(stream_error(&el))
        }
        Frame::Element(el) => Ok(el),
        Frame::StreamClose => Err(LoadError::Closed),
        Frame::StreamOpen(_) => Err(LoadError::Protocol("unexpected stream header".to_owned())),
    }
}

async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    target: &Target,
    step: &'static str,
) -> Result<Frame, LoadError> {
    let deadline = tokio::time::Instant::now() + target.step_timeout;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match framer.next_frame() {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(LoadError::Protocol(e.to_string())),
        }
        if buf.is_empty() {
            buf.resize(4096, 0);
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .map_err(|_| LoadError::Timeout(step))?
            .map_err(LoadError::Io)?;
        if n == 0 {
            return Err(LoadError::Closed);
        }
        framer.feed(buf.get(..n).unwrap_or_default());
    }
}

fn stream_error(el: &Element) -> LoadError {
    LoadError::Stream(
        el.first_child()
            .map(|(n, _)| n.to_owned())
            .unwrap_or_else(|| "undefined-condition".to_owned()),
    )
}

fn features_raw(el: &Element) -> &str {
    std::str::from_utf8(el.raw()).unwrap_or("")
}

/// Whether the features hold `<name xmlns='ns'`; scanning suffices for the handful of
/// feature elements servers send.
fn has_child(features: &Element, name: &str, ns: &str) -> bool {
    let raw = features_raw(features);
    raw.match_indices(&format!("<{name}"))
        .any(|(i, _)| raw.get(i..).is_some_and(|rest| rest.contains(ns)))
}

fn session_optional(raw: &str) -> bool {
    raw.find(NS_SESSION)
        .and_then(|i| raw.get(i..))
        .is_some_and(|rest| {
            let end = rest.find("</session>").unwrap_or(rest.len());
            rest.get(..end).is_some_and(|s| s.contains("<optional"))
        })
}

/// The SASL mechanisms offered in the features.
fn mechanisms(features: &Element) -> Vec<String> {
    let raw = features_raw(features);
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(i) = rest.find("<mechanism>") {
        let after = rest.get(i + "<mechanism>".len()..).unwrap_or("");
        let Some(end) = after.find("</mechanism>") else {
            break;
        };
        out.push(after.get(..end).unwrap_or("").trim().to_owned());
        rest = after.get(end..).unwrap_or("");
    }
    out
}

/// Unescapes the five predefined entities (enough for base64, JIDs and our stamps).
fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The text content of a leaf element.
fn element_text(el: &Element) -> String {
    std::str::from_utf8(&el.inner())
        .map(|s| unescape(s.trim()))
        .unwrap_or_default()
}

/// The text of the first descendant `<name>...</name>`.
pub fn child_text(el: &Element, name: &str) -> Option<String> {
    let raw = std::str::from_utf8(el.raw()).ok()?;
    let open = format!("<{name}");
    let mut from = 0;
    while let Some(i) = raw.get(from..)?.find(&open) {
        let start = from + i + open.len();
        let rest = raw.get(start..)?;
        let next = rest.chars().next()?;
        if next == '>' || next.is_whitespace() {
            let gt = rest.find('>')?;
            if rest.get(..gt)?.ends_with('/') {
                return Some(String::new());
            }
            let body = rest.get(gt + 1..)?;
            let end = body.find('<')?;
            return Some(unescape(body.get(..end)?));
        }
        from = start;
    }
    None
}

/// The defined condition of a stanza error (RFC 6120 §8.3).
pub fn error_condition(el: &Element) -> Option<String> {
    let raw = std::str::from_utf8(el.raw()).ok()?;
    let i = raw.find("urn:ietf:params:xml:ns:xmpp-stanzas")?;
    let head = raw.get(..i)?;
    let lt = head.rfind('<')?;
    let tag = head.get(lt + 1..)?;
    let name: String = tag
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/' && *c != '>')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// A TLS client configuration: the given CA file, the platform-independent choice of
/// accepting any certificate (`insecure`, for development certificates), ALPN for direct TLS.
pub fn tls_config(
    ca: Option<&std::path::Path>,
    insecure: bool,
    tls: TlsMode,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth()
    } else {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let path = ca.ok_or("give --ca FILE or --insecure")?;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    if tls == TlsMode::Direct {
        config.alpn_protocols = vec![b"xmpp-client".to_vec()];
    }
    Ok(Arc::new(config))
}

/// Accepts any server certificate (signatures are still checked): `--insecure`.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_xml::Framer;

    fn element(xml: &str) -> Element {
        let mut f = Framer::new();
        f.feed(
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
        );
        f.feed(xml.as_bytes());
        let _ = f.next_frame();
        match f.next_frame() {
            Ok(Some(Frame::Element(el))) => el,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_features() {
        let f = element(
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>\
             <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism>\
             <mechanism>PLAIN</mechanism></mechanisms>\
             <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session></stream:features>",
        );
        assert!(has_child(&f, "starttls", NS_TLS));
        assert!(!has_child(&f, "bind", NS_BIND));
        assert_eq!(mechanisms(&f), vec!["SCRAM-SHA-1", "PLAIN"]);
        assert!(session_optional(features_raw(&f)));
    }

    #[test]
    fn reads_bind_result_and_errors() {
        let r = element(
            "<iq type='result' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <jid>load0@example.test/r&amp;1</jid></bind></iq>",
        );
        assert_eq!(
            child_text(&r, "jid").as_deref(),
            Some("load0@example.test/r&1")
        );
        let e = element(
            "<iq type='error' id='reg1'><error type='cancel'>\
             <conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        );
        assert_eq!(error_condition(&e).as_deref(), Some("conflict"));
    }

    #[test]
    fn answers_pings_and_refuses_other_iqs() {
        let mut out = Vec::new();
        answer_iq(
            &element(
                "<iq type='get' id='p1' from='example.test'><ping xmlns='urn:xmpp:ping'/></iq>",
            ),
            &mut out,
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "<iq to='example.test' id='p1' type='result'/>"
        );
        out.clear();
        answer_iq(
            &element("<iq type='get' id='v1' from='a@b'><query xmlns='jabber:iq:version'/></iq>"),
            &mut out,
        );
        assert!(String::from_utf8_lossy(&out).contains("service-unavailable"));
        out.clear();
        answer_iq(&element("<iq type='result' id='x'/>"), &mut out);
        assert!(out.is_empty());
    }
}
