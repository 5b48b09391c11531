//! Client stream negotiation as an explicit, sans-IO state machine.
//!
//! Frames go in ([`Machine::on_frame`]); bytes for the client come out in a caller-owned
//! buffer, and an [`Action`] tells the driver what to do next: nothing, run the TLS handshake,
//! restart the framer, look something up, route a stanza, or close. The results of those
//! requests come back through `on_*` methods. No I/O, no clock (time is passed in), no task:
//! the unit tests drive it with strings.
//!
//! ```text
//!            ┌──────────── direct TLS (XEP-0368) ─────────────┐
//!  AwaitingHeader(Plain) ──► TlsRequired ──<starttls/>──► TlsHandshake ──► AwaitingHeader(Tls)
//!            │ (require_tls = false)                                           │
//!            └────────────► PreAuth ◄─────────────────────────────────────────┘
//!                             │ SASL <success/> (stream restart)
//!                             ▼
//!  AwaitingHeader(Authenticated) ──► Authenticated ──bind──► Binding ──► Bound ──► Closed
//!                                          │ <resume/> (XEP-0198)               ▲
//!                                          └──────────► Resuming ──<resumed/>───┘
//!                                                          └─<failed/>─► Authenticated
//! ```
//!
//! What it implements:
//! - stream headers and features, RFC 6120 §4.3, §4.7 (`to` must be served: `host-unknown`,
//!   §4.9.3.6; major version 1: `unsupported-version`, §4.7.5, §4.9.3.25);
//! - STARTTLS, §5.4 (mandatory-to-negotiate when `require_tls`, §5.3.1);
//! - SASL, §6.4 (mechanisms from `starling_sasl`; XEP-0440 channel-binding types; at most
//!   `max_attempts_per_stream` failures, then `policy-violation` per §6.4.5; throttling per
//!   client address and per account with `temporary-auth-failure`, §6.5.11);
//! - in-band registration before authentication, XEP-0077 §3.1 (and §3.1.1 on repeated
//!   registration on one stream);
//! - resource binding, RFC 6120 §7, and the RFC 3921 §3 `session` no-op (RFC 6121 §1.4 keeps
//!   it as `<optional/>` for old clients);
//! - Stream Management, XEP-0198: the `<sm/>` feature after authentication (§2), `<enable/>`
//!   after bind with or without resumption (§3; `<failed><unexpected-request/>` before bind or
//!   when repeated), `<r/>`/`<a/>` with `h` counting `message`/`presence`/`iq` only, mod
//!   2^32 (§4), a server `<r/>` every `sm_ack_every_stanzas` stanzas or `sm_ack_every`,
//!   `handled-count-too-high` (§4), the unacked bound (`policy-violation`), and `<resume/>`
//!   / `<resumed/>` / `<failed><item-not-found/>` (§5) with retransmission of what the
//!   client did not acknowledge;
//! - Client State Indication, XEP-0352: the `<csi/>` feature after authentication (§3),
//!   `<active/>` / `<inactive/>` (§4, not counted in `h`), and presence held while inactive
//!   (see [`crate::csi`] for what is held, coalesced, passed and flushed);
//! - Entity Capabilities, XEP-0115 §6.3: the server's `<c/>` with the features after
//!   authentication, when the binary gives one (`Settings::caps`, computed by the router from
//!   exactly what its disco#info answers);
//! - stanza checks once bound, §8.1.1.1 (`to` must be a JID: `jid-malformed`), §8.1.2.1
//!   (`from` is stamped with the full JID), §8.2.3 (IQ `id` and `type`: `bad-request`),
//!   §4.9.3.24 (anything else at top level: `unsupported-stanza-type`).
//!
//! Conditions chosen where the RFC leaves a choice (each documented where it is raised):
//! - a stanza before authentication is `not-authorized` (§4.9.3.12); any other element than
//!   `<starttls/>` before mandatory TLS is `policy-violation` (§4.9.3.14, a local policy);
//! - a top-level element the stream does not know is `unsupported-stanza-type`;
//! - a stanza other than bind/session before binding is `not-authorized`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use starling_cluster::{EndReason, ToRouter};
use starling_registry::RegistryError;
use starling_sasl::{
    ChannelBindingInfo, HashAlgo, Mechanism, NeedCredentials, SaslFailureReason, SaslServer,
    ScramCredentials, Step, decode_payload, encode_payload,
};
use starling_store::{BareUser, StoreError};
use starling_xml::writer::{StreamOpen, XmlWriter, write_stream_close, write_stream_open};
use starling_xml::{Element, Frame, FrameError, Framer, Limits, StreamHeader};
use starling_xmpp::jid::{self, FullJid};
use starling_xmpp::{
    SaslFailure, SaslFailureCondition, StanzaError, StanzaErrorCondition, StanzaErrorType,
    StreamError, StreamErrorCondition, ns,
};

use crate::csi::{self, Class, Indication};
use crate::limits::WindowCounter;
use crate::settings::{AuthSettings, RegistrationSettings, ServerCaps};
use crate::sm::{self, Outbound, ResumptionState, Sm, SmLimits};
use crate::{metrics, xmlread};

/// What every stream of the edge shares: settings the negotiation reads, the SASL server, and
/// the throttles (which are per client address or account, so shared across streams).
#[derive(Debug)]
pub(crate) struct StreamConfig {
    /// Served domains, normalised.
    pub(crate) domains: Vec<Arc<str>>,
    pub(crate) require_tls: bool,
    pub(crate) auth: AuthSettings,
    pub(crate) registration: RegistrationSettings,
    pub(crate) sasl: SaslServer,
    /// Limits of the framer (element size from `max_stanza_size`).
    pub(crate) limits: Limits,
    pub(crate) auth_failures_ip: WindowCounter<IpAddr>,
    pub(crate) auth_failures_account: WindowCounter<BareUser>,
    pub(crate) registrations_ip: WindowCounter<IpAddr>,
    /// Stream management (XEP-0198) limits.
    pub(crate) sm: SmLimits,
    /// Most senders whose presence is held for an inactive client (XEP-0352).
    pub(crate) csi_max_held: usize,
    /// The server's `<c/>` stream feature (XEP-0115 §6.3), if it advertises one.
    pub(crate) caps: Option<Box<[u8]>>,
    /// The per-stanza counters, registered once.
    pub(crate) hot: metrics::Hot,
}

/// The `<c/>` stream feature (XEP-0115 §6.3) for the server's capabilities.
pub(crate) fn caps_feature(caps: &ServerCaps) -> Box<[u8]> {
    let mut out = Vec::with_capacity(96 + caps.node.len() + caps.ver.len());
    XmlWriter::new(&mut out)
        .start("c")
        .attr("xmlns", ns::CAPS)
        .attr("hash", &caps.hash)
        .attr("node", &caps.node)
        .attr("ver", &caps.ver)
        .empty();
    out.into_boxed_slice()
}

/// What the driver does after a call into the machine. Output bytes, if any, are already in
/// the buffer and must be written first.
#[derive(Debug)]
pub(crate) enum Action {
    /// Keep reading.
    Continue,
    /// Flush, then run the TLS handshake (no ALPN), start a new framer, and call
    /// [`Machine::tls_established`]. Bytes buffered before the handshake are discarded
    /// (RFC 6120 §5.4.3.3).
    StartTls,
    /// Flush, then reset the framer: the client opens a new stream (RFC 6120 §6.4.6).
    Restart,
    /// Look up the user's credentials and call [`Machine::on_credentials`].
    LookupCredentials {
        /// The account.
        user: BareUser,
        /// The hash of the mechanism.
        hash: HashAlgo,
    },
    /// Run the PLAIN check (PBKDF2) on a blocking thread and call [`Machine::on_sasl_step`].
    VerifyPlain {
        /// The exchange.
        need: Box<NeedCredentials>,
        /// The stored credentials, if the account exists.
        credentials: Option<ScramCredentials>,
    },
    /// Create the account (XEP-0077) and call [`Machine::on_registered`].
    Register {
        /// The account.
        user: BareUser,
        /// Its password, to derive credentials from.
        password: String,
    },
    /// Bind the resource (registry, session table) and call [`Machine::on_bind`].
    Bind {
        /// The full JID to bind.
        jid: FullJid,
    },
    /// Send to the router.
    Route(ToRouter),
    /// Record the XEP-0198 resumption id of the bound session in the registry, then call
    /// [`Machine::on_resumption_recorded`].
    RecordResumption {
        /// The bound JID.
        jid: FullJid,
        /// The stream the session was bound on.
        stream_id: Arc<str>,
        /// The new id.
        id: Arc<str>,
    },
    /// Find and take over the session with resumption id `previd` of `account` (XEP-0198
    /// §5), then call [`Machine::on_resume`].
    Resume {
        /// The authenticated account.
        account: starling_xmpp::BareJid,
        /// The id the client asks for.
        previd: String,
    },
    /// Flush, then close the connection. The buffer ends with `</stream:stream>` when a
    /// stream was open.
    Close(EndReason),
}

/// How a registration attempt ended, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegisterOutcome {
    /// The account was created.
    Created,
    /// It already exists.
    Conflict,
    /// The password is not acceptable (empty or refused by SASLprep).
    InvalidPassword,
    /// The store failed.
    Failed,
}

/// How a bind ended, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BindOutcome {
    /// Bound (possibly replacing an older session of the same JID).
    Bound,
    /// The registry refused or failed.
    Failed(RegistryError),
}

/// Security level reached, which decides the features after the next stream header.
#[derive(Debug)]
enum Stage {
    Plain,
    Tls(Box<ChannelBindingInfo>),
    Authenticated(Box<str>),
}

#[derive(Debug)]
enum State {
    /// Waiting for the client's stream header.
    AwaitingHeader(Stage),
    /// Plain-text stream where TLS is mandatory: only `<starttls/>` is accepted.
    TlsRequired,
    /// `<proceed/>` was written; the driver runs the handshake.
    TlsHandshake,
    /// Before authentication: SASL and registration.
    PreAuth(Box<PreAuth>),
    /// Authenticated (the localpart), not bound yet.
    Authenticated(Box<str>),
    /// A bind is with the driver.
    Binding(Box<Binding>),
    /// A resumption (XEP-0198 §5) is with the driver.
    Resuming(Box<Resuming>),
    /// A resource is bound.
    Bound(Box<Bound>),
    /// The stream is closed; nothing more is read. Keeps what was bound, for the driver's
    /// cleanup.
    Closed(Option<Box<Bound>>),
}

/// A bound resource: its JID and, while the client is inactive and presence updates wait for
/// it, the held presences (XEP-0352; `None` otherwise, so an active session allocates
/// nothing for CSI).
#[derive(Debug)]
struct Bound {
    jid: FullJid,
    held: Option<Box<csi::Held>>,
}

impl Bound {
    fn new(jid: FullJid) -> Box<Bound> {
        Box::new(Bound { jid, held: None })
    }
}

#[derive(Debug)]
struct PreAuth {
    /// `None` on a plain-text stream.
    tls: Option<ChannelBindingInfo>,
    sasl: Sasl,
    /// The id of a registration IQ with the driver.
    pending_iq: Option<String>,
}

#[derive(Debug)]
enum Sasl {
    Idle,
    /// `<auth/>` came without an initial response; an empty challenge was sent.
    AwaitingInitialResponse(Mechanism),
    /// The credentials lookup is with the driver. `localpart` is `None` when the user name
    /// cannot be a localpart of this domain (the exchange then fails like a wrong password).
    LookingUp {
        need: Box<NeedCredentials>,
        localpart: Option<Box<str>>,
    },
    /// The PLAIN check is with the driver.
    Verifying {
        mechanism: Mechanism,
        localpart: Option<Box<str>>,
    },
    /// SCRAM's server-first-message was sent.
    AwaitingResponse {
        next: Box<starling_sasl::AwaitingClientFinal>,
        localpart: Option<Box<str>>,
    },
}

#[derive(Debug)]
struct Resuming {
    localpart: Box<str>,
    previd: String,
    h: u32,
}

#[derive(Debug)]
struct Binding {
    jid: FullJid,
    iq_id: String,
    localpart: Box<str>,
}

/// One client connection's negotiation and stanza checks.
#[derive(Debug)]
pub(crate) struct Machine {
    cfg: Arc<StreamConfig>,
    peer: IpAddr,
    stream_id: Arc<str>,
    domain: Option<Arc<str>>,
    state: State,
    /// Whether our stream header of the current stream is written (an error must be preceded
    /// by one, RFC 6120 §4.9.1.2).
    header_sent: bool,
    auth_failures: u8,
    registered: bool,
    /// Stream management, once enabled (or resumed).
    sm: Option<Box<Sm>>,
    /// What the client indicated with XEP-0352 (from authentication on).
    csi: csi::State,
}

const TLS_REQUIRED: &[u8] =
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>";
const TLS_OPTIONAL: &[u8] = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>";
const PROCEED: &[u8] = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>";
/// After authentication: bind (RFC 6120 §7), the legacy session no-op (RFC 6121 §1.4 notes
/// it), and roster versioning (XEP-0237 §3), which the router's roster module implements.
const BIND_FEATURES: &[u8] = b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
    <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
    <ver xmlns='urn:xmpp:features:rosterver'/>";
const SM_FEATURE: &[u8] = b"<sm xmlns='urn:xmpp:sm:3'/>";
const REGISTER_FEATURE: &[u8] = b"<register xmlns='http://jabber.org/features/iq-register'/>";
const SASL_CB_NS: &str = "urn:xmpp:sasl-cb:0";
/// Channel-binding data of a plain-text stream: none.
static NO_BINDING: std::sync::LazyLock<ChannelBindingInfo> =
    std::sync::LazyLock::new(ChannelBindingInfo::none);
const REGISTER_INSTRUCTIONS: &str = "Choose a username and password for use with this service.";

impl Machine {
    /// A machine for a new connection from `peer`; `direct_tls` holds the channel-binding
    /// data when TLS came first (XEP-0368).
    pub(crate) fn new(
        cfg: Arc<StreamConfig>,
        peer: IpAddr,
        direct_tls: Option<ChannelBindingInfo>,
    ) -> Self {
        let stage = match direct_tls {
            Some(cb) => Stage::Tls(Box::new(cb)),
            None => Stage::Plain,
        };
        Machine {
            cfg,
            peer,
            stream_id: random_id(),
            domain: None,
            state: State::AwaitingHeader(stage),
            header_sent: false,
            auth_failures: 0,
            registered: false,
            sm: None,
            csi: csi::State::default(),
        }
    }

    /// A framer for this machine's streams: `jabber:client` only, with the stanza size limit.
    pub(crate) fn framer(&self) -> Framer {
        let mut framer = Framer::with_limits(self.cfg.limits);
        framer.allow_content_namespaces(&[ns::JABBER_CLIENT]);
        framer
    }

    /// The id of the current stream.
    pub(crate) fn stream_id(&self) -> &Arc<str> {
        &self.stream_id
    }

    /// The bound full JID, once bound (and still after the stream closed).
    pub(crate) fn bound_jid(&self) -> Option<&FullJid> {
        match &self.state {
            State::Bound(bound) | State::Closed(Some(bound)) => Some(&bound.jid),
            _ => None,
        }
    }

    fn set_closed(&mut self) {
        let jid = match std::mem::replace(&mut self.state, State::Closed(None)) {
            State::Bound(bound) => Some(bound),
            State::Closed(bound) => bound,
            _ => None,
        };
        self.state = State::Closed(jid);
    }

    /// Whether SASL has succeeded on this connection.
    pub(crate) fn is_authenticated(&self) -> bool {
        matches!(
            self.state,
            State::AwaitingHeader(Stage::Authenticated(_))
                | State::Authenticated(_)
                | State::Binding(_)
                | State::Resuming(_)
                | State::Bound(_)
        )
    }

    /// Whether a stream is open towards the client, so that whitespace may be written.
    pub(crate) fn is_stream_open(&self) -> bool {
        self.header_sent && !matches!(self.state, State::Closed(_) | State::TlsHandshake)
    }

    /// Whether the stream is closed.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Handles one frame from the client.
    pub(crate) fn on_frame(&mut self, frame: Frame, now: Instant, out: &mut Vec<u8>) -> Action {
        if let Some(sm) = &mut self.sm {
            sm.last_input = now;
        }
        match frame {
            Frame::StreamOpen(header) => self.on_header(header, out),
            Frame::Element(el) => self.on_element(el, now, out),
            Frame::StreamClose => self.on_stream_close(out),
        }
    }

    /// The framer refused the input: close with its condition.
    pub(crate) fn on_frame_error(&mut self, error: &FrameError, out: &mut Vec<u8>) -> Action {
        let condition = StreamErrorCondition::from_name(error.condition.as_str())
            .unwrap_or(StreamErrorCondition::NotWellFormed);
        if condition == StreamErrorCondition::PolicyViolation {
            metrics::limit_violation("stanza_size");
        }
        self.fail(StreamError::new(condition).with_text(error.reason), out)
    }

    /// Closes the stream with `error` for a reason outside the protocol (timeout, limit,
    /// shutdown, conflict): writes a header first if none is open, the error, and the close.
    pub(crate) fn close_with(
        &mut self,
        error: StreamError,
        reason: EndReason,
        out: &mut Vec<u8>,
    ) -> Action {
        if self.is_closed() {
            return Action::Close(reason);
        }
        if !matches!(self.state, State::TlsHandshake) {
            if !self.header_sent {
                self.write_header(None, out);
            }
            metrics::stream_error(error.condition.as_str());
            error.write_xml(out);
            write_stream_close(out);
        }
        self.set_closed();
        Action::Close(reason)
    }

    /// The TLS handshake after `<proceed/>` succeeded: the client restarts the stream.
    pub(crate) fn tls_established(&mut self, channel_binding: ChannelBindingInfo) {
        self.header_sent = false;
        self.state = State::AwaitingHeader(Stage::Tls(Box::new(channel_binding)));
    }

    // -----------------------------------------------------------------------------------------
    // Stream headers

    fn on_header(&mut self, header: StreamHeader, out: &mut Vec<u8>) -> Action {
        // Placeholder until the new state is known; `fail` replaces it with `Closed`.
        let placeholder = State::AwaitingHeader(Stage::Plain);
        let stage = match std::mem::replace(&mut self.state, placeholder) {
            State::AwaitingHeader(stage) => stage,
            other => {
                self.state = other;
                return self.fail(
                    StreamError::new(StreamErrorCondition::BadFormat)
                        .with_text("stream header inside the stream"),
                    out,
                );
            }
        };
        // RFC 6120 §4.7.2: `to` names the domain; after a restart it must stay the same one.
        let requested = header
            .to
            .as_deref()
            .and_then(|to| jid::parse_domain(to).ok())
            .and_then(|d| {
                self.cfg
                    .domains
                    .iter()
                    .find(|s| s.as_ref() == d.as_str())
                    .cloned()
            });
        let domain = match (requested, &self.domain) {
            (Some(d), None) => d,
            (Some(d), Some(prev)) if d == *prev => d,
            _ => {
                return self.fail(
                    StreamError::new(StreamErrorCondition::HostUnknown)
                        .with_text("this server does not serve that domain"),
                    out,
                );
            }
        };
        self.domain = Some(domain);
        // RFC 6120 §4.7.5: the major version must be 1; a higher minor version is answered
        // with 1.0. No version at all means a pre-1.0 entity.
        let version_ok = header
            .version
            .as_deref()
            .and_then(|v| v.split_once('.'))
            .is_some_and(|(major, minor)| {
                major.trim_start_matches('0') == "1"
                    && !minor.is_empty()
                    && minor.bytes().all(|b| b.is_ascii_digit())
            });
        if !version_ok {
            return self.fail(
                StreamError::new(StreamErrorCondition::UnsupportedVersion)
                    .with_text("only XMPP 1.0 is supported"),
                out,
            );
        }
        self.stream_id = random_id();
        self.write_header(Some(&header), out);
        out.extend_from_slice(b"<stream:features>");
        self.state = match stage {
            Stage::Plain if self.cfg.require_tls => {
                out.extend_from_slice(TLS_REQUIRED);
                State::TlsRequired
            }
            Stage::Plain => {
                out.extend_from_slice(TLS_OPTIONAL);
                self.write_auth_features(None, out);
                State::PreAuth(Box::new(PreAuth {
                    tls: None,
                    sasl: Sasl::Idle,
                    pending_iq: None,
                }))
            }
            Stage::Tls(cb) => {
                self.write_auth_features(Some(&cb), out);
                State::PreAuth(Box::new(PreAuth {
                    tls: Some(*cb),
                    sasl: Sasl::Idle,
                    pending_iq: None,
                }))
            }
            Stage::Authenticated(localpart) => {
                out.extend_from_slice(BIND_FEATURES);
                out.extend_from_slice(SM_FEATURE);
                out.extend_from_slice(csi::FEATURE);
                if let Some(caps) = &self.cfg.caps {
                    out.extend_from_slice(caps);
                }
                State::Authenticated(localpart)
            }
        };
        out.extend_from_slice(b"</stream:features>");
        Action::Continue
    }

    /// Our stream header: a fresh id, `from` our domain, `to` the client's `from` when it is a
    /// JID (RFC 6120 §4.7.1), `xml:lang` the client's if it looks like a language tag.
    fn write_header(&mut self, client: Option<&StreamHeader>, out: &mut Vec<u8>) {
        let from = self
            .domain
            .clone()
            .or_else(|| self.cfg.domains.first().cloned());
        let to = client
            .and_then(|h| h.from.as_deref())
            .and_then(|f| jid::parse(f).ok());
        let lang = client
            .and_then(|h| h.lang.as_deref())
            .filter(|l| {
                !l.is_empty()
                    && l.len() <= 35
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            .unwrap_or("en");
        write_stream_open(
            out,
            &StreamOpen {
                content_ns: ns::JABBER_CLIENT,
                from: from.as_deref(),
                to: to.as_ref().map(|j| j.as_str()),
                id: Some(&self.stream_id),
                lang: Some(lang),
            },
        );
        self.header_sent = true;
    }

    fn domain(&self) -> &str {
        self.domain.as_deref().unwrap_or("")
    }

    fn registration_allowed(&self, encrypted: bool) -> bool {
        (encrypted || !self.cfg.require_tls)
            && self
                .cfg
                .registration
                .mode_for(self.domain())
                .allows(self.peer)
    }

    /// `<mechanisms/>`, XEP-0440's `<sasl-channel-binding/>`, and `<register/>`.
    fn write_auth_features(&self, tls: Option<&ChannelBindingInfo>, out: &mut Vec<u8>) {
        let none = ChannelBindingInfo::none();
        let cb = tls.unwrap_or(&none);
        let mut w = XmlWriter::new(out);
        w.start("mechanisms").attr("xmlns", ns::SASL);
        for mechanism in Mechanism::offered(cb, tls.is_some()) {
            w.text_element("mechanism", mechanism.name());
        }
        w.end("mechanisms");
        if cb.advertises_plus() {
            w.start("sasl-channel-binding").attr("xmlns", SASL_CB_NS);
            for kind in cb.types() {
                w.start("channel-binding").attr("type", kind.name()).empty();
            }
            w.end("sasl-channel-binding");
        }
        if self.registration_allowed(tls.is_some()) {
            w.raw(REGISTER_FEATURE);
        }
    }

    fn on_stream_close(&mut self, out: &mut Vec<u8>) -> Action {
        if self.header_sent && !self.is_closed() {
            write_stream_close(out);
        }
        self.set_closed();
        Action::Close(EndReason::Closed)
    }

    /// Closes with a stream error caused by what the client sent.
    fn fail(&mut self, error: StreamError, out: &mut Vec<u8>) -> Action {
        let reason = EndReason::StreamError(error.condition.clone());
        self.close_with(error, reason, out)
    }

    // -----------------------------------------------------------------------------------------
    // Elements

    fn on_element(&mut self, el: Element, now: Instant, out: &mut Vec<u8>) -> Action {
        match &self.state {
            State::TlsRequired => {
                if el.name() == "starttls" && el.ns() == ns::TLS {
                    return self.start_tls(out);
                }
                if el.is_stanza() {
                    return self.not_authorized(out);
                }
                self.fail(
                    StreamError::new(StreamErrorCondition::PolicyViolation)
                        .with_text("STARTTLS is required"),
                    out,
                )
            }
            State::PreAuth(_) => self.on_preauth_element(el, now, out),
            State::Authenticated(_) => self.on_authenticated_element(el, out),
            State::Bound(_) => self.on_bound_element(el, now, out),
            State::AwaitingHeader(_)
            | State::TlsHandshake
            | State::Binding(_)
            | State::Resuming(_) => self.fail(
                StreamError::new(StreamErrorCondition::BadFormat).with_text("element out of order"),
                out,
            ),
            State::Closed(_) => Action::Close(EndReason::Closed),
        }
    }

    fn start_tls(&mut self, out: &mut Vec<u8>) -> Action {
        out.extend_from_slice(PROCEED);
        self.state = State::TlsHandshake;
        Action::StartTls
    }

    /// RFC 6120 §4.9.3.12: a stanza before the stream is authenticated (or bound).
    fn not_authorized(&mut self, out: &mut Vec<u8>) -> Action {
        self.fail(
            StreamError::new(StreamErrorCondition::NotAuthorized)
                .with_text("authenticate and bind a resource first"),
            out,
        )
    }

    fn unsupported(&mut self, out: &mut Vec<u8>) -> Action {
        self.fail(
            StreamError::new(StreamErrorCondition::UnsupportedStanzaType),
            out,
        )
    }

    fn on_preauth_element(&mut self, el: Element, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::PreAuth(pre) = &self.state else {
            return Action::Continue;
        };
        let encrypted = pre.tls.is_some();
        match (el.ns(), el.name()) {
            (ns::TLS, "starttls") if !encrypted => self.start_tls(out),
            (ns::TLS, _) => self.fail(
                StreamError::new(StreamErrorCondition::PolicyViolation)
                    .with_text("TLS is already negotiated"),
                out,
            ),
            (ns::SASL, "auth") => self.on_auth(&el, now, out),
            (ns::SASL, "response") => self.on_response(&el, now, out),
            (ns::SASL, "abort") => {
                if let State::PreAuth(pre) = &mut self.state {
                    pre.sasl = Sasl::Idle;
                }
                self.sasl_failure(SaslFailureReason::Aborted, None, None, now, out)
            }
            (ns::JABBER_CLIENT, "iq") if el.first_child() == Some(("query", ns::REGISTER)) => {
                self.on_register(&el, now, out)
            }
            _ if el.is_stanza() => self.not_authorized(out),
            _ => self.unsupported(out),
        }
    }

    // -----------------------------------------------------------------------------------------
    // SASL (RFC 6120 §6.4)

    fn on_auth(&mut self, el: &Element, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::PreAuth(pre) = &mut self.state else {
            return Action::Continue;
        };
        if !matches!(pre.sasl, Sasl::Idle) {
            // A new <auth/> in the middle of an exchange: that exchange fails.
            pre.sasl = Sasl::Idle;
            return self.sasl_failure(SaslFailureReason::MalformedRequest, None, None, now, out);
        }
        let encrypted = pre.tls.is_some();
        let offered = Mechanism::offered(pre.tls.as_ref().unwrap_or(&NO_BINDING), encrypted);
        let mechanism =
            xmlread::attribute(el.raw(), "mechanism").and_then(|name| Mechanism::from_name(&name));
        let mechanism = match mechanism {
            Some(m) if offered.contains(&m) => m,
            Some(Mechanism::Plain) if !encrypted => {
                // §6.5.4: PLAIN needs a protected stream.
                let reason = SaslFailureReason::EncryptionRequired;
                return self.sasl_failure(reason, Some(Mechanism::Plain), None, now, out);
            }
            _ => {
                let reason = SaslFailureReason::InvalidMechanism;
                return self.sasl_failure(reason, None, None, now, out);
            }
        };
        let ip_limit = self.cfg.auth.failures_per_minute_per_ip;
        if self
            .cfg
            .auth_failures_ip
            .is_limited(&self.peer, ip_limit, now)
        {
            return self.throttled(mechanism, out);
        }
        let text = xmlread::text(el.raw());
        let text = text.trim();
        if text.is_empty() {
            // §6.4.2: no initial response; ask for it with an empty challenge.
            if let State::PreAuth(pre) = &mut self.state {
                pre.sasl = Sasl::AwaitingInitialResponse(mechanism);
            }
            XmlWriter::new(out)
                .start("challenge")
                .attr("xmlns", ns::SASL)
                .empty();
            return Action::Continue;
        }
        self.start_exchange(mechanism, text, now, out)
    }

    fn start_exchange(
        &mut self,
        mechanism: Mechanism,
        text: &str,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        let data = match decode_payload(text) {
            Ok(d) => d,
            Err(e) => return self.sasl_failure(e.reason(), Some(mechanism), None, now, out),
        };
        let State::PreAuth(pre) = &self.state else {
            return Action::Continue;
        };
        let cb = pre.tls.as_ref().unwrap_or(&NO_BINDING);
        let step = self
            .cfg
            .sasl
            .start(mechanism, cb, Some(self.domain()), &data);
        self.on_step(step, mechanism, None, now, out)
    }

    fn on_response(&mut self, el: &Element, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::PreAuth(pre) = &mut self.state else {
            return Action::Continue;
        };
        let text = xmlread::text(el.raw());
        let text = text.trim();
        match std::mem::replace(&mut pre.sasl, Sasl::Idle) {
            Sasl::AwaitingInitialResponse(mechanism) => {
                self.start_exchange(mechanism, text, now, out)
            }
            Sasl::AwaitingResponse { next, localpart } => {
                let mechanism = next.mechanism();
                match decode_payload(text) {
                    Ok(data) => {
                        let step = next.client_final(&data);
                        self.on_step(step, mechanism, Some(localpart), now, out)
                    }
                    Err(e) => {
                        let local = localpart.as_deref();
                        self.sasl_failure(e.reason(), Some(mechanism), local, now, out)
                    }
                }
            }
            _ => self.sasl_failure(SaslFailureReason::MalformedRequest, None, None, now, out),
        }
    }

    /// The credentials lookup finished.
    pub(crate) fn on_credentials(
        &mut self,
        found: Result<Option<ScramCredentials>, StoreError>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        let State::PreAuth(pre) = &mut self.state else {
            return Action::Continue;
        };
        let Sasl::LookingUp { need, localpart } = std::mem::replace(&mut pre.sasl, Sasl::Idle)
        else {
            return Action::Continue;
        };
        let mechanism = need.mechanism();
        let credentials = match found {
            Ok(c) => c,
            Err(e) => {
                // §6.5.11: a server-side problem; the client may retry later.
                tracing::warn!(error = %e, "credentials lookup failed");
                let reason = SaslFailureReason::TemporaryAuthFailure;
                return self.sasl_failure(reason, Some(mechanism), None, now, out);
            }
        };
        if need.is_expensive() {
            pre.sasl = Sasl::Verifying {
                mechanism,
                localpart,
            };
            return Action::VerifyPlain { need, credentials };
        }
        let step = need.with_credentials(credentials);
        self.on_step(step, mechanism, Some(localpart), now, out)
    }

    /// The PLAIN check finished.
    pub(crate) fn on_sasl_step(&mut self, step: Step, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::PreAuth(pre) = &mut self.state else {
            return Action::Continue;
        };
        let Sasl::Verifying {
            mechanism,
            localpart,
        } = std::mem::replace(&mut pre.sasl, Sasl::Idle)
        else {
            return Action::Continue;
        };
        self.on_step(step, mechanism, Some(localpart), now, out)
    }

    /// One step of the exchange. `localpart` is known once the user name was resolved
    /// (`Some(None)`: resolved, but not a possible account of this domain).
    fn on_step(
        &mut self,
        step: Step,
        mechanism: Mechanism,
        localpart: Option<Option<Box<str>>>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        match step {
            Step::NeedCredentials(need) => {
                let localpart = localpart_for(need.username(), self.domain());
                let user = localpart
                    .as_deref()
                    .map(|l| BareUser::new(self.domain(), l));
                if let Some(user) = &user {
                    let limit = self.cfg.auth.failures_per_minute_per_account;
                    if self.cfg.auth_failures_account.is_limited(user, limit, now) {
                        return self.throttled(mechanism, out);
                    }
                }
                let hash = need.hash();
                let State::PreAuth(pre) = &mut self.state else {
                    return Action::Continue;
                };
                pre.sasl = Sasl::LookingUp {
                    need: Box::new(need),
                    localpart,
                };
                match user {
                    Some(user) => Action::LookupCredentials { user, hash },
                    // Not a possible account: go on as for an unknown user.
                    None => self.on_credentials(Ok(None), now, out),
                }
            }
            Step::Challenge { data, next } => {
                XmlWriter::new(out)
                    .start("challenge")
                    .attr("xmlns", ns::SASL)
                    .text(&encode_payload(&data))
                    .end("challenge");
                if let State::PreAuth(pre) = &mut self.state {
                    pre.sasl = Sasl::AwaitingResponse {
                        next: Box::new(next),
                        localpart: localpart.flatten(),
                    };
                }
                Action::Continue
            }
            Step::Success {
                additional_data, ..
            } => {
                let Some(localpart) = localpart.flatten() else {
                    // Cannot happen: a user that is no account never succeeds.
                    let reason = SaslFailureReason::NotAuthorized;
                    return self.sasl_failure(reason, Some(mechanism), None, now, out);
                };
                metrics::auth(mechanism.name(), "success");
                let mut w = XmlWriter::new(out);
                w.start("success").attr("xmlns", ns::SASL);
                match additional_data {
                    Some(data) => w.text(&encode_payload(&data)).end("success"),
                    None => w.empty(),
                };
                tracing::debug!(
                    user = %localpart,
                    domain = self.domain(),
                    mechanism = mechanism.name(),
                    "authenticated"
                );
                // §6.4.6: the client restarts the stream; our next header is a new one.
                self.header_sent = false;
                self.state = State::AwaitingHeader(Stage::Authenticated(localpart));
                Action::Restart
            }
            Step::Failure { reason, detail } => {
                tracing::debug!(%reason, detail, mechanism = mechanism.name(), "SASL failure");
                let local = localpart.flatten();
                self.sasl_failure(reason, Some(mechanism), local.as_deref(), now, out)
            }
        }
    }

    /// §6.5.11: throttled; the password is not checked.
    fn throttled(&mut self, mechanism: Mechanism, out: &mut Vec<u8>) -> Action {
        metrics::auth(mechanism.name(), "throttled");
        metrics::limit_violation("auth_throttle");
        tracing::info!(peer = %self.peer, "SASL attempt throttled");
        if let State::PreAuth(pre) = &mut self.state {
            pre.sasl = Sasl::Idle;
        }
        self.count_attempt(SaslFailureReason::TemporaryAuthFailure, out)
    }

    /// Writes `<failure/>`, records it for throttling, and closes the stream once the
    /// per-stream limit is reached (§6.4.5).
    fn sasl_failure(
        &mut self,
        reason: SaslFailureReason,
        mechanism: Option<Mechanism>,
        localpart: Option<&str>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        metrics::auth(mechanism.map_or("none", Mechanism::name), reason.as_str());
        if !matches!(
            reason,
            SaslFailureReason::Aborted | SaslFailureReason::TemporaryAuthFailure
        ) {
            self.cfg.auth_failures_ip.record(self.peer, now);
            if reason == SaslFailureReason::NotAuthorized
                && let Some(local) = localpart
            {
                self.cfg
                    .auth_failures_account
                    .record(BareUser::new(self.domain(), local), now);
            }
        }
        if let State::PreAuth(pre) = &mut self.state {
            pre.sasl = Sasl::Idle;
        }
        self.count_attempt(reason, out)
    }

    fn count_attempt(&mut self, reason: SaslFailureReason, out: &mut Vec<u8>) -> Action {
        let condition = SaslFailureCondition::from_name(reason.as_str())
            .unwrap_or(SaslFailureCondition::NotAuthorized);
        SaslFailure::new(condition).write_xml(out);
        self.auth_failures = self.auth_failures.saturating_add(1);
        if u32::from(self.auth_failures) >= self.cfg.auth.max_attempts_per_stream {
            metrics::limit_violation("auth_attempts");
            return self.fail(
                StreamError::new(StreamErrorCondition::PolicyViolation)
                    .with_text("too many failed authentication attempts"),
                out,
            );
        }
        Action::Continue
    }

    // -----------------------------------------------------------------------------------------
    // In-band registration (XEP-0077 §3.1)

    fn on_register(&mut self, el: &Element, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::PreAuth(pre) = &self.state else {
            return Action::Continue;
        };
        let encrypted = pre.tls.is_some();
        let id = el.id().map(|s| s.into_owned());
        let Some(id) = id else {
            return self.iq_error(None, StanzaErrorCondition::BadRequest.into(), out);
        };
        if !self.registration_allowed(encrypted) {
            metrics::registration("not-allowed");
            return self.iq_error(Some(&id), StanzaErrorCondition::NotAllowed.into(), out);
        }
        match el.stanza_type().as_deref() {
            Some("get") => {
                let mut w = XmlWriter::new(out);
                w.start("iq").attr("type", "result").attr("id", &id);
                w.start("query").attr("xmlns", ns::REGISTER);
                w.text_element("instructions", REGISTER_INSTRUCTIONS);
                w.start("username").empty();
                w.start("password").empty();
                w.end("query").end("iq");
                Action::Continue
            }
            Some("set") => self.on_register_set(el, id, now, out),
            _ => self.iq_error(Some(&id), StanzaErrorCondition::BadRequest.into(), out),
        }
    }

    fn on_register_set(
        &mut self,
        el: &Element,
        id: String,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        if self.registered {
            // §3.1.1: one registration per stream.
            metrics::registration("repeated");
            return self.iq_error(
                Some(&id),
                StanzaError::new(StanzaErrorCondition::NotAcceptable)
                    .with_text("already registered on this stream"),
                out,
            );
        }
        let limit = self.cfg.registration.per_minute_per_ip;
        if self.cfg.registrations_ip.is_limited(&self.peer, limit, now) {
            metrics::registration("throttled");
            metrics::limit_violation("registration_throttle");
            return self.iq_error(
                Some(&id),
                StanzaError::new(StanzaErrorCondition::ResourceConstraint)
                    .with_type(StanzaErrorType::Wait),
                out,
            );
        }
        self.cfg.registrations_ip.record(self.peer, now);
        let fields = xmlread::grandchildren(el.raw());
        if fields.iter().any(|f| f.name == "remove") {
            // Removing an account needs an authenticated stream (§3.2).
            return self.iq_error(Some(&id), StanzaErrorCondition::NotAuthorized.into(), out);
        }
        let field = |name: &str| {
            fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.text.as_str())
                .filter(|t| !t.is_empty())
        };
        let (Some(username), Some(password)) = (field("username"), field("password")) else {
            metrics::registration("not-acceptable");
            return self.iq_error(
                Some(&id),
                StanzaError::new(StanzaErrorCondition::NotAcceptable)
                    .with_text("username and password are required"),
                out,
            );
        };
        let Some(localpart) = localpart_for(username, self.domain()) else {
            metrics::registration("not-acceptable");
            return self.iq_error(
                Some(&id),
                StanzaError::new(StanzaErrorCondition::NotAcceptable)
                    .with_text("the username is not a valid localpart"),
                out,
            );
        };
        let password = password.to_owned();
        let user = BareUser::new(self.domain(), &*localpart);
        if let State::PreAuth(pre) = &mut self.state {
            pre.pending_iq = Some(id);
        }
        Action::Register { user, password }
    }

    /// The account creation finished.
    pub(crate) fn on_registered(&mut self, outcome: RegisterOutcome, out: &mut Vec<u8>) -> Action {
        let State::PreAuth(pre) = &mut self.state else {
            return Action::Continue;
        };
        let Some(id) = pre.pending_iq.take() else {
            return Action::Continue;
        };
        let error = match outcome {
            RegisterOutcome::Created => {
                metrics::registration("created");
                self.registered = true;
                XmlWriter::new(out)
                    .start("iq")
                    .attr("type", "result")
                    .attr("id", &id)
                    .empty();
                return Action::Continue;
            }
            RegisterOutcome::Conflict => {
                metrics::registration("conflict");
                StanzaError::new(StanzaErrorCondition::Conflict)
            }
            RegisterOutcome::InvalidPassword => {
                metrics::registration("not-acceptable");
                StanzaError::new(StanzaErrorCondition::NotAcceptable)
                    .with_text("the password is not acceptable")
            }
            RegisterOutcome::Failed => {
                metrics::registration("error");
                StanzaError::new(StanzaErrorCondition::InternalServerError)
            }
        };
        self.iq_error(Some(&id), error, out)
    }

    // -----------------------------------------------------------------------------------------
    // Resource binding (RFC 6120 §7)

    fn on_authenticated_element(&mut self, el: Element, out: &mut Vec<u8>) -> Action {
        if let Some(indication) = Indication::of(&el) {
            // Nothing is delivered before bind; the state carries over to the session.
            self.indicate(indication);
            return Action::Continue;
        }
        if el.ns() == sm::NS {
            return match el.name() {
                "resume" => self.on_resume_request(&el, out),
                // §3: enabling needs a bound resource.
                "enable" => {
                    write_sm_failed(out, None, "unexpected-request");
                    Action::Continue
                }
                _ => self.unsupported(out),
            };
        }
        if el.name() == "iq" && el.ns() == ns::JABBER_CLIENT {
            match el.first_child() {
                Some(("bind", ns::BIND)) => return self.on_bind_iq(&el, out),
                Some(("session", ns::SESSION)) => return self.on_session_iq(&el, out),
                _ => {}
            }
        }
        if el.is_stanza() {
            return self.not_authorized(out);
        }
        self.unsupported(out)
    }

    fn on_bind_iq(&mut self, el: &Element, out: &mut Vec<u8>) -> Action {
        let id = el.id().map(|s| s.into_owned());
        let (Some(id), Some("set")) = (id, el.stanza_type().as_deref()) else {
            let id = el.id().map(|s| s.into_owned());
            return self.iq_error(id.as_deref(), StanzaErrorCondition::BadRequest.into(), out);
        };
        let State::Authenticated(localpart) =
            std::mem::replace(&mut self.state, State::Closed(None))
        else {
            return Action::Continue;
        };
        let requested = xmlread::grandchildren(el.raw())
            .into_iter()
            .find(|f| f.name == "resource")
            .map(|f| f.text)
            .filter(|r| !r.is_empty());
        let resource = requested.unwrap_or_else(|| random_id().to_string());
        let full = format!("{localpart}@{}/{resource}", self.domain());
        let jid = match jid::parse_full(&full) {
            Ok(jid)
                if jid.node().map(|n| n.as_str()) == Some(&*localpart)
                    && jid.domain().as_str() == self.domain() =>
            {
                jid
            }
            _ => {
                self.state = State::Authenticated(localpart);
                metrics::bind("bad-request");
                return self.iq_error(
                    Some(&id),
                    StanzaError::new(StanzaErrorCondition::BadRequest)
                        .with_text("the resource is not valid"),
                    out,
                );
            }
        };
        self.state = State::Binding(Box::new(Binding {
            jid: jid.clone(),
            iq_id: id,
            localpart,
        }));
        Action::Bind { jid }
    }

    /// The bind finished.
    pub(crate) fn on_bind(&mut self, outcome: BindOutcome, out: &mut Vec<u8>) -> Action {
        let State::Binding(binding) = std::mem::replace(&mut self.state, State::Closed(None))
        else {
            return Action::Continue;
        };
        let Binding {
            jid,
            iq_id,
            localpart,
        } = *binding;
        match outcome {
            BindOutcome::Bound => {
                metrics::bind("bound");
                let mut w = XmlWriter::new(out);
                w.start("iq").attr("type", "result").attr("id", &iq_id);
                w.start("bind").attr("xmlns", ns::BIND);
                w.text_element("jid", jid.as_str());
                w.end("bind").end("iq");
                self.state = State::Bound(Bound::new(jid));
                Action::Continue
            }
            BindOutcome::Failed(error) => {
                self.state = State::Authenticated(localpart);
                let error = match error {
                    // §7.6.2.1: too many resources.
                    RegistryError::LimitReached => {
                        metrics::bind("resource-constraint");
                        StanzaError::new(StanzaErrorCondition::ResourceConstraint)
                            .with_type(StanzaErrorType::Wait)
                    }
                    RegistryError::Unavailable(_) => {
                        metrics::bind("error");
                        StanzaError::new(StanzaErrorCondition::InternalServerError)
                            .with_type(StanzaErrorType::Wait)
                    }
                };
                self.iq_error(Some(&iq_id), error, out)
            }
        }
    }

    /// RFC 3921 §3 session establishment, a no-op kept for old clients.
    fn on_session_iq(&mut self, el: &Element, out: &mut Vec<u8>) -> Action {
        let id = el.id().map(|s| s.into_owned());
        match (id, el.stanza_type().as_deref()) {
            (Some(id), Some("set")) => {
                let mut result = Vec::new();
                XmlWriter::new(&mut result)
                    .start("iq")
                    .attr("type", "result")
                    .attr("id", &id)
                    .empty();
                self.emit(result, true, out)
            }
            (id, _) => self.iq_error(id.as_deref(), StanzaErrorCondition::BadRequest.into(), out),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Stream management (XEP-0198)

    /// The stream-management state, for tests.
    #[cfg(test)]
    pub(crate) fn sm(&self) -> Option<&Sm> {
        self.sm.as_deref()
    }

    /// The stream-management state, taken out when the connection ends, with the presences
    /// CSI still held (see [`Machine::release_held`]).
    pub(crate) fn take_sm(&mut self) -> Option<Box<Sm>> {
        self.release_held();
        self.sm.take()
    }

    /// Puts back a state taken with [`Machine::take_sm`] that could not be handed over.
    pub(crate) fn restore_sm(&mut self, sm: impl Into<Box<Sm>>) {
        self.sm = Some(sm.into());
    }

    fn on_sm_element(&mut self, el: &Element, now: Instant, out: &mut Vec<u8>) -> Action {
        match (el.name(), &mut self.sm) {
            ("enable", None) => self.on_enable(el, now, out),
            // §3: enabling twice, or resuming on a bound stream, is not expected.
            ("enable" | "resume", _) => {
                write_sm_failed(out, None, "unexpected-request");
                Action::Continue
            }
            ("r", Some(sm)) => {
                write_sm_ack(out, sm.inbound);
                Action::Continue
            }
            ("a", Some(_)) => {
                let h = xmlread::attribute(el.raw(), "h").and_then(|h| h.parse::<u32>().ok());
                match h {
                    Some(h) => self.on_ack(h, out),
                    None => self.fail(
                        StreamError::new(StreamErrorCondition::BadFormat)
                            .with_text("'h' must be an unsigned 32-bit number"),
                        out,
                    ),
                }
            }
            // <r/> and <a/> before <enable/>: not part of this stream.
            _ => self.unsupported(out),
        }
    }

    fn on_enable(&mut self, el: &Element, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::Bound(bound) = &self.state else {
            return Action::Continue;
        };
        let jid = bound.jid.clone();
        let mut sm = Sm::new(self.stream_id.clone(), now);
        let resume = matches!(
            xmlread::attribute(el.raw(), "resume").as_deref(),
            Some("true" | "1")
        );
        if resume && let Some(id) = sm::resumption_id() {
            sm.resumption = Some(id.clone());
            let stream_id = sm.session_stream_id.clone();
            self.sm = Some(Box::new(sm));
            return Action::RecordResumption { jid, stream_id, id };
        }
        self.sm = Some(Box::new(sm));
        metrics::sm_enabled(false);
        XmlWriter::new(out)
            .start("enabled")
            .attr("xmlns", sm::NS)
            .empty();
        Action::Continue
    }

    /// The registry recorded the resumption id (or failed to: then the session is not
    /// resumable, which `<enabled/>` without `resume` tells the client).
    pub(crate) fn on_resumption_recorded(&mut self, recorded: bool, out: &mut Vec<u8>) -> Action {
        let Some(sm) = &mut self.sm else {
            return Action::Continue;
        };
        let mut w = XmlWriter::new(out);
        w.start("enabled").attr("xmlns", sm::NS);
        match (&sm.resumption, recorded) {
            (Some(id), true) => {
                let max = self.cfg.sm.max_resume_secs.to_string();
                w.attr("id", id).attr("resume", "true").attr("max", &max);
            }
            _ => sm.resumption = None,
        }
        w.empty();
        metrics::sm_enabled(sm.resumption.is_some());
        Action::Continue
    }

    fn on_ack(&mut self, h: u32, out: &mut Vec<u8>) -> Action {
        let Some(sm) = &mut self.sm else {
            return Action::Continue;
        };
        match sm.ack(h) {
            Ok(_) => Action::Continue,
            Err(too_high) => self.handled_count_too_high(too_high, out),
        }
    }

    /// §4: the peer acknowledged more than was sent: `undefined-condition` with
    /// `<handled-count-too-high/>`.
    fn handled_count_too_high(&mut self, too_high: sm::TooHigh, out: &mut Vec<u8>) -> Action {
        let sm::TooHigh { h, sent } = too_high;
        tracing::info!(h, sent, "client acknowledged more stanzas than were sent");
        if !self.header_sent {
            self.write_header(None, out);
        }
        let condition = StreamErrorCondition::UndefinedCondition;
        metrics::stream_error(condition.as_str());
        out.extend_from_slice(b"<stream:error>");
        let mut w = XmlWriter::new(out);
        w.start(condition.as_str())
            .attr("xmlns", ns::XMPP_STREAMS)
            .empty();
        w.start("handled-count-too-high")
            .attr("xmlns", sm::NS)
            .attr("h", &h.to_string())
            .attr("send-count", &sent.to_string())
            .empty();
        w.start("text")
            .attr("xml:lang", "en")
            .attr("xmlns", ns::XMPP_STREAMS)
            .text(&format!(
                "You acknowledged {h} stanzas, but I only sent you {sent} so far."
            ))
            .end("text");
        out.extend_from_slice(b"</stream:error>");
        write_stream_close(out);
        self.set_closed();
        Action::Close(EndReason::StreamError(condition))
    }

    /// One stanza the router delivered for the session. While the client is inactive
    /// (XEP-0352) a presence update is held ([`crate::csi`]); anything else is written, after
    /// the held presences of its sender's bare JID.
    pub(crate) fn on_outbound(
        &mut self,
        item: Outbound,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        if !self.csi.is_inactive() {
            return self.write_stanza(item, now, out);
        }
        let State::Bound(bound) = &mut self.state else {
            return self.write_stanza(item, now, out);
        };
        match csi::classify(&item.stanza) {
            Class::Hold => {
                let held = bound.held.get_or_insert_with(Box::default);
                match held.hold(item, self.cfg.csi_max_held) {
                    csi::Hold::Held | csi::Hold::Superseded => Action::Continue,
                    csi::Hold::Full(all) => {
                        bound.held = None;
                        metrics::limit_violation("csi_held");
                        tracing::info!(
                            held = all.len() - 1,
                            "presence buffer of an inactive client full: flushing it"
                        );
                        self.write_all(all, "full", now, out)
                    }
                }
            }
            Class::Pass => {
                let first = match (&mut bound.held, csi::sender_bare(&item.stanza)) {
                    (Some(held), Some(bare)) => {
                        let first = held.take_from(&bare);
                        if held.is_empty() {
                            bound.held = None;
                        }
                        first
                    }
                    _ => VecDeque::new(),
                };
                if first.is_empty() {
                    return self.write_stanza(item, now, out);
                }
                let mut all = first;
                all.push_back(item);
                self.write_all(all, "contact", now, out)
            }
        }
    }

    /// The client's `<active/>` or `<inactive/>` (XEP-0352 §4): no answer; becoming active
    /// writes every held presence before the next element is read (§5.1).
    fn indicate(&mut self, indication: Indication) {
        if self.csi.set(indication) {
            tracing::debug!(?indication, "client state indicated");
        }
    }

    fn on_csi(&mut self, indication: Indication, now: Instant, out: &mut Vec<u8>) -> Action {
        self.indicate(indication);
        if indication == Indication::Inactive {
            return Action::Continue;
        }
        let held = match &mut self.state {
            State::Bound(bound) => bound.held.take(),
            _ => None,
        };
        match held {
            Some(mut held) => {
                let all = held.take_all();
                tracing::debug!(
                    presences = all.len(),
                    "client active: held presence written"
                );
                self.write_all(all, "active", now, out)
            }
            None => Action::Continue,
        }
    }

    /// Writes presences that were held, oldest first (`reason` labels the flush). If the
    /// stream closes on the way (the unacked limit), the rest stays with stream management
    /// and goes back to the router with it; the first close is returned.
    fn write_all(
        &mut self,
        items: VecDeque<Outbound>,
        reason: &'static str,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        metrics::csi_flush(reason);
        // The last item of a flush caused by a passed stanza or a full buffer was never held.
        let held = match reason {
            "active" => items.len(),
            _ => items.len().saturating_sub(1),
        };
        metrics::csi_presences("written", held as u64);
        let mut result = Action::Continue;
        for item in items {
            let action = self.write_stanza(item, now, out);
            if matches!(result, Action::Continue) {
                result = action;
            }
        }
        result
    }

    /// Presences still held, for the end of the connection: with a resumable session they
    /// travel with it (written when it is resumed); otherwise they stay here and are dropped
    /// with the machine (counted as `discarded`).
    fn release_held(&mut self) {
        let Some(sm) = self.sm.as_mut().filter(|sm| sm.resumption.is_some()) else {
            return;
        };
        let held = match &mut self.state {
            State::Bound(bound) | State::Closed(Some(bound)) => bound.held.take(),
            _ => None,
        };
        let Some(mut held) = held else {
            return;
        };
        let items = held.take_all();
        metrics::csi_presences("handed_over", items.len() as u64);
        sm.held.get_or_insert_with(Box::default).extend(items);
    }

    /// Writes one stanza for the session, counting it when stream management is on; a full
    /// unacknowledged queue closes the stream with `policy-violation` (the stanza is kept in
    /// the queue, which goes back to the router).
    fn write_stanza(&mut self, item: Outbound, now: Instant, out: &mut Vec<u8>) -> Action {
        let State::Bound(bound) = &self.state else {
            // Not reached: the driver writes only to an open, bound stream.
            if let Some(sm) = &mut self.sm {
                sm.push(item, now);
            }
            return Action::Continue;
        };
        let jid = &bound.jid;
        let Some(sm) = &mut self.sm else {
            write_outbound(&item, jid, out);
            return Action::Continue;
        };
        let limits = self.cfg.sm;
        if !limits.fits(sm.unacked.len(), sm.unacked_bytes, item.weight()) {
            sm.push(item, now);
            metrics::limit_violation("sm_unacked");
            tracing::info!(
                unacked = sm.unacked.len(),
                bytes = sm.unacked_bytes,
                "unacknowledged queue full: closing the stream"
            );
            let condition = StreamErrorCondition::PolicyViolation;
            return self.close_with(
                StreamError::new(condition.clone()).with_text("too many unacknowledged stanzas"),
                EndReason::StreamError(condition),
                out,
            );
        }
        write_outbound(&item, jid, out);
        sm.push(item, now);
        sm.since_request = sm.since_request.saturating_add(1);
        if sm.since_request >= limits.ack_every_stanzas {
            write_sm_request(out);
            sm.since_request = 0;
            sm.last_request = now;
        }
        Action::Continue
    }

    /// When the next time-based `<r/>` is due: stanzas are unacknowledged.
    pub(crate) fn sm_deadline(&self) -> Option<Instant> {
        let sm = self.sm.as_ref()?;
        if sm.unacked.is_empty() || !matches!(self.state, State::Bound(_)) {
            return None;
        }
        Some(sm.last_request + self.cfg.sm.ack_every)
    }

    /// The timer fired: asks for an ack if one is due.
    pub(crate) fn on_sm_timer(&mut self, now: Instant, out: &mut Vec<u8>) {
        if self.sm_deadline().is_some_and(|d| d <= now)
            && let Some(sm) = &mut self.sm
        {
            write_sm_request(out);
            sm.since_request = 0;
            sm.last_request = now;
        }
    }

    fn on_resume_request(&mut self, el: &Element, out: &mut Vec<u8>) -> Action {
        let previd = xmlread::attribute(el.raw(), "previd").filter(|p| !p.is_empty());
        let h = xmlread::attribute(el.raw(), "h").and_then(|h| h.parse::<u32>().ok());
        let (Some(previd), Some(h)) = (previd, h) else {
            write_sm_failed(out, None, "bad-request");
            return Action::Continue;
        };
        let State::Authenticated(localpart) =
            std::mem::replace(&mut self.state, State::Closed(None))
        else {
            return Action::Continue;
        };
        let Ok(account) = jid::parse_bare(&format!("{localpart}@{}", self.domain())) else {
            self.state = State::Authenticated(localpart);
            write_sm_failed(out, None, "item-not-found");
            return Action::Continue;
        };
        self.state = State::Resuming(Box::new(Resuming {
            localpart,
            previd: previd.clone(),
            h,
        }));
        Action::Resume { account, previd }
    }

    /// The driver took over the session (`Ok`), or found none to resume (`Err`, with the
    /// `h` to report if known). On success the stream continues as the old session:
    /// `<resumed/>`, then the stanzas the client did not acknowledge, again.
    pub(crate) fn on_resume(
        &mut self,
        found: Result<ResumptionState, Option<u32>>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Action {
        let State::Resuming(resuming) = std::mem::replace(&mut self.state, State::Closed(None))
        else {
            return Action::Continue;
        };
        let Resuming {
            localpart,
            previd,
            h,
        } = *resuming;
        let state = match found {
            Ok(state) => state,
            Err(known_h) => {
                // §5: the client may bind a new resource on this stream.
                self.state = State::Authenticated(localpart);
                write_sm_failed(out, known_h, "item-not-found");
                return Action::Continue;
            }
        };
        let jid = state.jid.clone();
        let (mut sm, pending) = Sm::from_resumption(state, now);
        self.state = State::Bound(Bound::new(jid.clone()));
        let acked = sm.ack(h);
        for item in pending {
            // Kept, never written: the session's end hands them to the router.
            sm.push(item, now);
        }
        self.sm = Some(Box::new(sm));
        if let Err(too_high) = acked {
            return self.handled_count_too_high(too_high, out);
        }
        let Some(sm) = &mut self.sm else {
            return Action::Continue;
        };
        XmlWriter::new(out)
            .start("resumed")
            .attr("xmlns", sm::NS)
            .attr("previd", &previd)
            .attr("h", &sm.inbound.to_string())
            .empty();
        for item in &sm.unacked {
            write_outbound(item, &jid, out);
        }
        if !sm.unacked.is_empty() {
            write_sm_request(out);
        }
        sm.since_request = 0;
        sm.last_request = now;
        tracing::info!(%jid, retransmitted = sm.unacked.len(), "session resumed");
        Action::Continue
    }

    // -----------------------------------------------------------------------------------------
    // Bound: stanzas to the router

    fn on_bound_element(&mut self, el: Element, now: Instant, out: &mut Vec<u8>) -> Action {
        if el.ns() == sm::NS {
            return self.on_sm_element(&el, now, out);
        }
        // Nonzas, not stanzas: not counted in `h` (XEP-0198 §4).
        if let Some(indication) = Indication::of(&el) {
            return self.on_csi(indication, now, out);
        }
        let name = el.name();
        if !(el.ns() == ns::JABBER_CLIENT && matches!(name, "message" | "presence" | "iq")) {
            return self.unsupported(out);
        }
        // XEP-0198 §4: every stanza received counts as handled, whether it is routed or
        // answered with an error here.
        if let Some(sm) = &mut self.sm {
            sm.inbound = sm.inbound.wrapping_add(1);
        }
        let is_error = el.stanza_type().as_deref() == Some("error");
        if name == "iq" {
            // RFC 6120 §8.2.3: `id` and one of the four types are required, and a request
            // carries exactly one payload.
            let type_ = el.stanza_type();
            let request = matches!(type_.as_deref(), Some("get" | "set"));
            let valid = request || matches!(type_.as_deref(), Some("result" | "error"));
            let id = el.id().map(|s| s.into_owned());
            let for_server = el.to().is_none();
            match (id, el.first_child()) {
                (None, _) => {
                    return self.iq_error(None, StanzaErrorCondition::BadRequest.into(), out);
                }
                (Some(id), _) if !valid => {
                    return self.iq_error(Some(&id), StanzaErrorCondition::BadRequest.into(), out);
                }
                (Some(id), None) if request => {
                    return self.iq_error(Some(&id), StanzaErrorCondition::BadRequest.into(), out);
                }
                (Some(_), Some(("session", ns::SESSION))) if request && for_server => {
                    return self.on_session_iq(&el, out);
                }
                (Some(id), Some(("bind", ns::BIND))) if request && for_server => {
                    // One resource per stream (RFC 6120 §7.7.1 leaves more optional).
                    return self.iq_error(Some(&id), StanzaErrorCondition::NotAllowed.into(), out);
                }
                _ => {}
            }
        }
        let State::Bound(bound) = &self.state else {
            return Action::Continue;
        };
        let jid = &bound.jid;
        if let Some(to) = el.to()
            && let Err(e) = jid::parse(&to)
        {
            // §8.3.1: never answer an error with an error.
            if !is_error {
                let id = el.id();
                let mut reply = Vec::new();
                write_stanza_error(
                    &mut reply,
                    name,
                    id.as_deref(),
                    Some(jid.as_str()),
                    e.into(),
                );
                return self.emit(reply, true, out);
            }
            return Action::Continue;
        }
        let jid_str = jid.as_str();
        if el.uses_stream_prefixes() {
            // It uses a prefix declared on the client's stream header, so it cannot travel
            // on its own.
            if !is_error {
                let id = el.id();
                let error = StanzaError::new(StanzaErrorCondition::BadRequest)
                    .with_text("the stanza depends on stream-level declarations");
                let mut reply = Vec::new();
                write_stanza_error(&mut reply, name, id.as_deref(), Some(jid_str), error);
                return self.emit(reply, true, out);
            }
            return Action::Continue;
        }
        let stanza = if el.from().as_deref() == Some(jid_str) {
            el
        } else {
            // Stamp `from` by rewriting the start tag; the envelope moves with the bytes.
            el.readdressed(None, Some(jid_str))
        };
        self.cfg.hot.stanzas_received.increment(1);
        tracing::debug!(name = stanza.name(), to = ?stanza.to(), "stanza in");
        Action::Route(ToRouter::Stanza {
            from: jid.clone(),
            stanza,
        })
    }

    /// Answers a stanza the router could not take with `error` (RFC 6120 §8.3), unless it
    /// was an error itself.
    pub(crate) fn bounce(&mut self, stanza: &Element, error: StanzaError, out: &mut Vec<u8>) {
        if stanza.stanza_type().as_deref() == Some("error") {
            return;
        }
        let mut reply = Vec::new();
        let id = stanza.id();
        let to = self.bound_jid().map(|j| j.as_str());
        let from = stanza.to();
        let mut payload = Vec::new();
        error.write_xml(&mut payload);
        XmlWriter::new(&mut reply)
            .start(stanza.name())
            .attr("type", "error")
            .attr_opt("id", id.as_deref())
            .attr_opt("from", from.as_deref())
            .attr_opt("to", to)
            .raw(&payload)
            .end(stanza.name());
        // Outside frame handling a close could not be carried out here; the unacked limit
        // is enforced by the next stanza instead.
        let _ = self.emit(reply, false, out);
    }

    fn iq_error(&mut self, id: Option<&str>, error: StanzaError, out: &mut Vec<u8>) -> Action {
        let to = self.bound_jid().map(|j| j.as_str().to_owned());
        let mut reply = Vec::new();
        write_stanza_error(&mut reply, "iq", id, to.as_deref(), error);
        self.emit(reply, true, out)
    }

    /// Writes a stanza the edge itself answers with. Once stream management is on, it is a
    /// stanza like any other for the client's `h` (XEP-0198 §4), so it is counted and kept
    /// until acknowledged (and, with `limit`, bounded like the rest).
    fn emit(&mut self, stanza: Vec<u8>, limit: bool, out: &mut Vec<u8>) -> Action {
        if self.sm.is_none() || !matches!(self.state, State::Bound(_)) {
            out.extend_from_slice(&stanza);
            return Action::Continue;
        }
        let stanza = Bytes::from(stanza);
        let item = match Element::parse(stanza.clone(), ns::JABBER_CLIENT) {
            Ok(el) => Outbound {
                stanza: el,
                stamp_to: false,
            },
            Err(error) => {
                // Not reached: the edge writes well-formed stanzas.
                tracing::warn!(%error, "a stanza written by the edge does not parse");
                out.extend_from_slice(&stanza);
                return Action::Continue;
            }
        };
        let now = self
            .sm
            .as_ref()
            .map_or_else(Instant::now, |sm| sm.last_input);
        if limit {
            return self.on_outbound(item, now, out);
        }
        if let (State::Bound(bound), Some(sm)) = (&self.state, &mut self.sm) {
            write_outbound(&item, &bound.jid, out);
            sm.push(item, now);
        }
        Action::Continue
    }
}

/// Writes a stanza for the session `jid`, stamping `to` when asked.
fn write_outbound(item: &Outbound, jid: &FullJid, out: &mut Vec<u8>) {
    if item.stamp_to {
        item.stanza
            .write_with_addresses(out, Some(jid.as_str()), None);
    } else {
        out.extend_from_slice(item.stanza.raw());
    }
}

/// `<r/>` (XEP-0198 §4).
fn write_sm_request(out: &mut Vec<u8>) {
    XmlWriter::new(out).start("r").attr("xmlns", sm::NS).empty();
}

/// `<a h='…'/>` (XEP-0198 §4).
fn write_sm_ack(out: &mut Vec<u8>, h: u32) {
    XmlWriter::new(out)
        .start("a")
        .attr("xmlns", sm::NS)
        .attr("h", &h.to_string())
        .empty();
}

/// `<failed h='…'><condition xmlns='…stanzas'/></failed>` (XEP-0198 §3, §5).
fn write_sm_failed(out: &mut Vec<u8>, h: Option<u32>, condition: &str) {
    let h = h.map(|h| h.to_string());
    let mut w = XmlWriter::new(out);
    w.start("failed")
        .attr("xmlns", sm::NS)
        .attr_opt("h", h.as_deref());
    w.start(condition).attr("xmlns", ns::XMPP_STANZAS).empty();
    w.end("failed");
}

/// The localpart of `username@domain` once normalised (RFC 7622), if that is a bare JID of
/// `domain`.
pub(crate) fn localpart_for(username: &str, domain: &str) -> Option<Box<str>> {
    if username.is_empty() || domain.is_empty() {
        return None;
    }
    let jid = jid::parse(&format!("{username}@{domain}")).ok()?;
    if jid.resource().is_some() || jid.domain().as_str() != domain {
        return None;
    }
    jid.node().map(|n| Box::from(n.as_str()))
}

/// `<name type='error' id='…' to='…'><error…/></name>`.
fn write_stanza_error(
    out: &mut Vec<u8>,
    name: &str,
    id: Option<&str>,
    to: Option<&str>,
    error: StanzaError,
) {
    let mut payload = Vec::new();
    error.write_xml(&mut payload);
    XmlWriter::new(out)
        .start(name)
        .attr("type", "error")
        .attr_opt("id", id)
        .attr_opt("to", to)
        .raw(&payload)
        .end(name);
}

/// A random identifier: 12 bytes as 24 hex digits (stream ids, generated resources).
pub(crate) fn random_id() -> Arc<str> {
    let mut raw = [0u8; 12];
    if getrandom::fill(&mut raw).is_err() {
        // The OS random source failing is extraordinary; fall back to a counter and the clock,
        // which stays unique, if predictable, within the process.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        raw[..8].copy_from_slice(&n.to_le_bytes());
        raw[8..].copy_from_slice(&t.to_le_bytes()[..4]);
    }
    let mut s = String::with_capacity(24);
    for b in raw {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    Arc::from(s)
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
