//! Server features as modules (CONVENTIONS.md #4): each XEP or RFC area is one type
//! implementing [`Module`], registered with the router in a list. The router asks the list
//! who handles an IQ addressed to the server (RFC 6120 §10.3.3, §10.4) and tells every module
//! about session starts and ends; the disco features (XEP-0030 §3.1) are collected from the
//! registered modules, so disco can never advertise what is not there.
//!
//! Modules now: [`Disco`] (XEP-0030), [`Version`] (XEP-0092), [`Ping`] (XEP-0199),
//! [`Time`] (XEP-0202), [`Register`] (XEP-0077 after authentication), [`Roster`] (RFC 6121
//! §2, XEP-0237), [`Presence`] (the session hooks of RFC 6121 §4), [`Vcard`] (XEP-0054)
//! [`Private`] (XEP-0049), [`Blocking`] (XEP-0191), [`Carbons`] (XEP-0280) and
//! [`EntityCaps`] (XEP-0115; the verification string of all their features is in
//! [`crate::caps`]).

mod blocking;
mod caps;
mod carbons;
pub(crate) mod disco;
mod ping;
mod presence;
mod private;
mod receipts;
mod register;
mod roster;
pub(crate) mod time;
mod vcard;
mod version;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use starling_cluster::{Edges, EndReason};
use starling_registry::SessionRegistry;
use starling_store::Store;
use starling_xml::Element;
use starling_xmpp::{BareJid, FullJid, StanzaError, StreamErrorCondition};

use crate::Settings;
use crate::caps::Caps;
use crate::payload::{self, Payload, PayloadError};
use crate::stanza::IqType;

pub use blocking::Blocking;
pub use caps::EntityCaps;
pub use carbons::Carbons;
pub use disco::{Disco, identities};
pub use ping::Ping;
pub use presence::Presence;
pub use private::Private;
pub use receipts::Receipts;
pub use register::Register;
pub use roster::Roster;
pub use time::Time;
pub use vcard::Vcard;
pub use version::Version;

/// What a router offers its modules: the store, the registry, the edges and the settings.
pub struct Services {
    /// Accounts and per-user data.
    pub store: Arc<dyn Store>,
    /// Where sessions are.
    pub registry: Arc<dyn SessionRegistry>,
    /// How to reach the edges holding them.
    pub edges: Arc<Edges>,
    /// The router's settings.
    pub settings: Settings,
    /// Presence and subscription state (RFC 6121).
    pub(crate) im: crate::im::Im,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("edges", &self.edges)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whom an IQ request is addressed to, as far as the server answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IqTarget {
    /// A served domain (or `domain/resource`): the server itself (RFC 6120 §10.4).
    Server,
    /// No `to`: the sender's own account, answered by the server on its behalf (RFC 6120
    /// §10.3.3). The server-level modules answer these as if addressed to the server, as
    /// clients expect for `<ping/>` and friends.
    OwnAccount,
    /// The bare JID of a local account (maybe the sender's own), answered by the server on
    /// the account's behalf (RFC 6121 §8.5.2.1.3 / RFC 6120 §10.5.3.2).
    Account(BareJid),
}

/// An IQ request handed to a module.
#[derive(Debug, Clone, Copy)]
pub struct IqRequest<'a> {
    /// `get` or `set` (results and errors never reach modules).
    pub kind: IqType,
    /// The whole stanza, `from` stamped by the edge.
    pub stanza: &'a Element,
    /// The local name of the payload element.
    pub name: &'a str,
    /// The namespace of the payload element.
    pub ns: &'a str,
}

impl IqRequest<'_> {
    /// Reads the payload one level deep (see [`payload::parse`]).
    pub fn payload(&self) -> Result<Payload, PayloadError> {
        payload::parse(&self.stanza.inner(), self.ns)
    }
}

/// Everything a module needs to answer one IQ.
#[derive(Debug, Clone, Copy)]
pub struct IqContext<'a> {
    /// The router's services.
    pub services: &'a Services,
    /// The features of every registered module, in registration order (for disco).
    pub features: &'a [&'static str],
    /// The server's entity capabilities (XEP-0115), computed from `features`.
    pub caps: &'a Caps,
    /// The sender's full JID.
    pub from: &'a FullJid,
    /// Whom the IQ is for.
    pub target: &'a IqTarget,
    /// The served domain the request concerns (the `to` domain, or the sender's domain
    /// when there is no `to`).
    pub domain: &'a str,
}

/// A module's answer to an IQ request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IqResult {
    /// `type='result'` with this payload element (serialised), or empty.
    Result(Option<Bytes>),
    /// `type='error'` with this error.
    Error(StanzaError),
    /// `type='result'`, and once it is on its way, close every session of `account` with
    /// the stream error `condition` (XEP-0077 §3.2 after account removal). The result goes
    /// first so the requesting client sees its request succeed.
    ResultThenClose {
        /// The result's payload, if any.
        payload: Option<Bytes>,
        /// The account whose sessions are closed.
        account: BareJid,
        /// The stream error they are closed with.
        condition: StreamErrorCondition,
    },
}

impl From<StanzaError> for IqResult {
    fn from(error: StanzaError) -> Self {
        IqResult::Error(error)
    }
}

/// One server feature: the namespaces it answers and what it advertises.
#[async_trait]
pub trait Module: Send + Sync + 'static {
    /// A short name for logs and the handler-latency metric (`disco`, `ping`...).
    fn name(&self) -> &'static str;

    /// The disco features (XEP-0030 §3.1) this module implements, advertised for the
    /// server.
    fn features(&self) -> &[&'static str];

    /// Whether this module answers IQ requests with a payload in namespace `ns` sent to
    /// `target`. By default none: a module that only advertises a feature or watches
    /// sessions.
    fn handles_iq(&self, _target: &IqTarget, _ns: &str) -> bool {
        false
    }

    /// Answers one IQ request this module said it handles. Must not panic on anything in
    /// the stanza; a failure is an [`IqResult::Error`]. By default (never called while
    /// `handles_iq` claims nothing) `service-unavailable`.
    async fn handle_iq(&self, _ctx: &IqContext<'_>, _iq: &IqRequest<'_>) -> IqResult {
        IqResult::Error(StanzaError::new(
            starling_xmpp::StanzaErrorCondition::ServiceUnavailable,
        ))
    }

    /// A resource was bound (extension point for presence and offline delivery, issue 4).
    async fn session_started(&self, _services: &Services, _jid: &FullJid) {}

    /// A session ended (extension point for unavailable presence broadcast, RFC 6121
    /// §4.5.2, issue 4).
    async fn session_ended(&self, _services: &Services, _jid: &FullJid, _reason: &EndReason) {}
}

/// The registered modules and the features collected from them.
pub struct ModuleSet {
    modules: Vec<Arc<dyn Module>>,
    features: Vec<&'static str>,
}

impl std::fmt::Debug for ModuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSet")
            .field(
                "modules",
                &self.modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
            )
            .field("features", &self.features)
            .finish()
    }
}

impl ModuleSet {
    /// Registers `modules`; a feature advertised by two modules is listed once.
    pub fn new(modules: Vec<Arc<dyn Module>>) -> Self {
        let mut features: Vec<&'static str> = Vec::new();
        for feature in modules.iter().flat_map(|m| m.features().iter().copied()) {
            if !features.contains(&feature) {
                features.push(feature);
            }
        }
        ModuleSet { modules, features }
    }

    /// Every feature of every module, in registration order.
    pub fn features(&self) -> &[&'static str] {
        &self.features
    }

    /// The first module that handles `ns` for `target`.
    pub fn for_iq(&self, target: &IqTarget, ns: &str) -> Option<&Arc<dyn Module>> {
        self.modules.iter().find(|m| m.handles_iq(target, ns))
    }

    /// Every module, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Module>> {
        self.modules.iter()
    }
}

/// The modules of a single-node server now: disco, version, ping, time, register, roster,
/// presence, vcard-temp, private XML storage, blocking, carbons, receipts and entity
/// capabilities.
pub fn default_modules() -> Vec<Arc<dyn Module>> {
    vec![
        Arc::new(Disco),
        Arc::new(Version),
        Arc::new(Ping),
        Arc::new(Time),
        Arc::new(Register),
        Arc::new(Roster),
        Arc::new(Presence),
        Arc::new(Vcard),
        Arc::new(Private),
        Arc::new(Blocking),
        Arc::new(Carbons),
        Arc::new(Receipts),
        Arc::new(EntityCaps),
    ]
}

/// Whether `target` is one the server-level modules answer: the server itself, or an IQ
/// without `to`.
pub(crate) fn is_server_level(target: &IqTarget) -> bool {
    matches!(target, IqTarget::Server | IqTarget::OwnAccount)
}

/// The answer to a `set` on a get-only query: `not-allowed`.
pub(crate) fn get_only() -> IqResult {
    IqResult::Error(
        StanzaError::new(starling_xmpp::StanzaErrorCondition::NotAllowed)
            .with_text("only 'get' is defined for this query"),
    )
}

/// The payload element of an IQ request, framed on its own (`content_ns` is the default
/// namespace it is read in); `bad-request` when it cannot be (e.g. it uses a prefix declared
/// outside itself).
pub(crate) fn payload_element(
    iq: &IqRequest<'_>,
    content_ns: &'static str,
) -> Result<Element, IqResult> {
    let inner = iq.stanza.inner();
    let trimmed = inner.trim_ascii();
    let start = inner.len() - inner.trim_ascii_start().len();
    Element::parse(inner.slice(start..start + trimmed.len()), content_ns)
        .map_err(|_| bad_request("the payload cannot be read on its own"))
}

/// The answer to a payload that is not the element the namespace defines: `bad-request`.
pub(crate) fn bad_request(text: &str) -> IqResult {
    IqResult::Error(
        StanzaError::new(starling_xmpp::StanzaErrorCondition::BadRequest).with_text(text),
    )
}
