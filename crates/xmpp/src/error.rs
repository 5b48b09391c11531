//! Stream errors (RFC 6120 §4.9), stanza errors (RFC 6120 §8.3) and SASL failures
//! (RFC 6120 §6.5): every defined condition, its wire name, and a writer for each element.
//!
//! Writers append to a caller's buffer and escape every text and attribute value with
//! `starling_xml::escape`, so what they write is well-formed whatever the text holds.

use std::fmt;
use std::str::FromStr;

use starling_xml::escape::{escape_attr_into, escape_text_into};

use crate::ns;

/// A condition or error type name that the RFC does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{name}`")]
pub struct UnknownCondition {
    kind: &'static str,
    name: String,
}

impl UnknownCondition {
    fn new(kind: &'static str, name: &str) -> Self {
        Self {
            kind,
            name: name.to_owned(),
        }
    }

    /// The name that was not recognised.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Text after a condition in an error's message: `": text"`, or nothing.
struct Detail<'a>(&'a Option<String>);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(text) => write!(f, ": {text}"),
            None => Ok(()),
        }
    }
}

/// Writes `<name xmlns='ns'/>`, or `<name xmlns='ns'>content</name>` when there is content.
fn write_condition(out: &mut Vec<u8>, name: &str, xmlns: Option<&str>, content: Option<&str>) {
    out.push(b'<');
    out.extend_from_slice(name.as_bytes());
    if let Some(xmlns) = xmlns {
        out.extend_from_slice(b" xmlns='");
        out.extend_from_slice(xmlns.as_bytes());
        out.push(b'\'');
    }
    match content {
        Some(content) if !content.is_empty() => {
            out.push(b'>');
            escape_text_into(out, content);
            out.extend_from_slice(b"</");
            out.extend_from_slice(name.as_bytes());
            out.push(b'>');
        }
        _ => out.extend_from_slice(b"/>"),
    }
}

/// Writes `<text xmlns='ns' xml:lang='lang'>text</text>`.
fn write_text(out: &mut Vec<u8>, xmlns: Option<&str>, lang: Option<&str>, text: &str) {
    out.extend_from_slice(b"<text");
    if let Some(xmlns) = xmlns {
        out.extend_from_slice(b" xmlns='");
        out.extend_from_slice(xmlns.as_bytes());
        out.push(b'\'');
    }
    if let Some(lang) = lang {
        out.extend_from_slice(b" xml:lang='");
        escape_attr_into(out, lang);
        out.push(b'\'');
    }
    out.push(b'>');
    escape_text_into(out, text);
    out.extend_from_slice(b"</text>");
}

/// The language of the text Starling itself writes into errors.
const SERVER_LANG: &str = "en";

// ---------------------------------------------------------------------------------------------
// Stream errors

/// A stream error condition (RFC 6120 §4.9.3). Any of them closes the stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamErrorCondition {
    /// The entity sent XML that cannot be processed (§4.9.3.1).
    BadFormat,
    /// A namespace prefix is unsupported or missing (§4.9.3.2).
    BadNamespacePrefix,
    /// A new stream conflicts with this one (§4.9.3.3).
    Conflict,
    /// The peer sent nothing for too long (§4.9.3.4).
    ConnectionTimeout,
    /// The `to` of the stream header names a host this server no longer serves (§4.9.3.5).
    HostGone,
    /// The `to` of the stream header names a host this server does not serve (§4.9.3.6).
    HostUnknown,
    /// A stanza between two servers lacks `to` or `from`, or they are not JIDs (§4.9.3.7).
    ImproperAddressing,
    /// The server failed in a way it cannot describe better (§4.9.3.8).
    InternalServerError,
    /// The `from` of a stanza does not match an authorised JID (§4.9.3.9).
    InvalidFrom,
    /// The stream or content namespace is wrong (§4.9.3.10).
    InvalidNamespace,
    /// The XML is invalid against the schema (§4.9.3.11).
    InvalidXml,
    /// The entity tried to send data before authenticating (§4.9.3.12).
    NotAuthorized,
    /// The data is not well-formed XML (§4.9.3.13).
    NotWellFormed,
    /// The entity violated a local policy such as a size or rate limit (§4.9.3.14).
    PolicyViolation,
    /// A connection this stream depends on failed (§4.9.3.15).
    RemoteConnectionFailed,
    /// Security-relevant state changed; the peer should reconnect (§4.9.3.16).
    Reset,
    /// The server lacks the resources to serve the stream (§4.9.3.17).
    ResourceConstraint,
    /// The entity sent a comment, PI, DTD, entity reference or similar (§4.9.3.18).
    RestrictedXml,
    /// Reconnect to this host instead: a domain or IP, optionally with `:port` (§4.9.3.19).
    SeeOtherHost(String),
    /// The server is shutting down (§4.9.3.20).
    SystemShutdown,
    /// None of the others; used with an application-specific condition (§4.9.3.21).
    UndefinedCondition,
    /// The stream is not UTF-8 (§4.9.3.22).
    UnsupportedEncoding,
    /// A mandatory-to-negotiate feature is not supported by the peer (§4.9.3.23).
    UnsupportedFeature,
    /// A first-level child of the stream is not supported (§4.9.3.24).
    UnsupportedStanzaType,
    /// The `version` of the stream header is not supported (§4.9.3.25).
    UnsupportedVersion,
}

impl StreamErrorCondition {
    /// The condition's element name, e.g. `"not-well-formed"`.
    pub fn as_str(&self) -> &'static str {
        use StreamErrorCondition::*;
        match self {
            BadFormat => "bad-format",
            BadNamespacePrefix => "bad-namespace-prefix",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostGone => "host-gone",
            HostUnknown => "host-unknown",
            ImproperAddressing => "improper-addressing",
            InternalServerError => "internal-server-error",
            InvalidFrom => "invalid-from",
            InvalidNamespace => "invalid-namespace",
            InvalidXml => "invalid-xml",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            RemoteConnectionFailed => "remote-connection-failed",
            Reset => "reset",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SeeOtherHost(_) => "see-other-host",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedEncoding => "unsupported-encoding",
            UnsupportedFeature => "unsupported-feature",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }

    /// The condition named `name`; `see-other-host` comes with an empty host (see
    /// [`from_element`](Self::from_element) to keep the element's content).
    pub fn from_name(name: &str) -> Option<Self> {
        use StreamErrorCondition::*;
        Some(match name {
            "bad-format" => BadFormat,
            "bad-namespace-prefix" => BadNamespacePrefix,
            "conflict" => Conflict,
            "connection-timeout" => ConnectionTimeout,
            "host-gone" => HostGone,
            "host-unknown" => HostUnknown,
            "improper-addressing" => ImproperAddressing,
            "internal-server-error" => InternalServerError,
            "invalid-from" => InvalidFrom,
            "invalid-namespace" => InvalidNamespace,
            "invalid-xml" => InvalidXml,
            "not-authorized" => NotAuthorized,
            "not-well-formed" => NotWellFormed,
            "policy-violation" => PolicyViolation,
            "remote-connection-failed" => RemoteConnectionFailed,
            "reset" => Reset,
            "resource-constraint" => ResourceConstraint,
            "restricted-xml" => RestrictedXml,
            "see-other-host" => SeeOtherHost(String::new()),
            "system-shutdown" => SystemShutdown,
            "undefined-condition" => UndefinedCondition,
            "unsupported-encoding" => UnsupportedEncoding,
            "unsupported-feature" => UnsupportedFeature,
            "unsupported-stanza-type" => UnsupportedStanzaType,
            "unsupported-version" => UnsupportedVersion,
            _ => return None,
        })
    }

    /// The condition of a received `<name>content</name>` element, keeping the (trimmed)
    /// content where the condition carries one (`see-other-host`).
    pub fn from_element(name: &str, content: &str) -> Option<Self> {
        let mut condition = Self::from_name(name)?;
        if let Self::SeeOtherHost(host) = &mut condition {
            content.trim().clone_into(host);
        }
        Some(condition)
    }

    /// The element's character data, if the condition carries any.
    fn content(&self) -> Option<&str> {
        match self {
            Self::SeeOtherHost(host) => Some(host),
            _ => None,
        }
    }
}

impl fmt::Display for StreamErrorCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        match self.content() {
            Some(content) if !content.is_empty() => write!(f, " ({content})"),
            _ => Ok(()),
        }
    }
}

impl FromStr for StreamErrorCondition {
    type Err = UnknownCondition;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::from_name(name).ok_or_else(|| UnknownCondition::new("stream error condition", name))
    }
}

/// A stream error: written as `<stream:error>` just before the stream is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream error <{condition}>{}", Detail(.text))]
pub struct StreamError {
    /// What went wrong.
    pub condition: StreamErrorCondition,
    /// Human-readable detail for the peer's logs, never shown as a protocol decision.
    pub text: Option<String>,
    /// The `xml:lang` of `text`.
    pub lang: Option<String>,
}

impl StreamError {
    /// A stream error with no text.
    pub fn new(condition: StreamErrorCondition) -> Self {
        Self {
            condition,
            text: None,
            lang: None,
        }
    }

    /// Adds English text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self.lang = Some(SERVER_LANG.to_owned());
        self
    }

    /// Appends `<stream:error>…</stream:error>` to `out`. The `stream` prefix must be bound to
    /// [`ns::STREAM`] by the stream header, as Starling's always is.
    pub fn write_xml(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"<stream:error>");
        write_condition(
            out,
            self.condition.as_str(),
            Some(ns::XMPP_STREAMS),
            self.condition.content(),
        );
        if let Some(text) = &self.text {
            write_text(out, Some(ns::XMPP_STREAMS), self.lang.as_deref(), text);
        }
        out.extend_from_slice(b"</stream:error>");
    }
}

impl From<StreamErrorCondition> for StreamError {
    fn from(condition: StreamErrorCondition) -> Self {
        Self::new(condition)
    }
}

// ---------------------------------------------------------------------------------------------
// Stanza errors

/// How the sender of a failed stanza may proceed (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StanzaErrorType {
    /// Retry after providing credentials.
    Auth,
    /// Do not retry: the error cannot be remedied.
    Cancel,
    /// Proceed: the condition was only a warning.
    Continue,
    /// Retry after changing the data sent.
    Modify,
    /// Retry after waiting: the error is temporary.
    Wait,
}

impl StanzaErrorType {
    /// The value of the `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Cancel => "cancel",
            Self::Continue => "continue",
            Self::Modify => "modify",
            Self::Wait => "wait",
        }
    }

    /// The error type named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "auth" => Self::Auth,
            "cancel" => Self::Cancel,
            "continue" => Self::Continue,
            "modify" => Self::Modify,
            "wait" => Self::Wait,
            _ => return None,
        })
    }
}

impl fmt::Display for StanzaErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StanzaErrorType {
    type Err = UnknownCondition;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::from_name(name).ok_or_else(|| UnknownCondition::new("stanza error type", name))
    }
}

/// A stanza error condition (RFC 6120 §8.3.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StanzaErrorCondition {
    /// The request is malformed or missing data (§8.3.3.1).
    BadRequest,
    /// A resource or session with that name already exists (§8.3.3.2).
    Conflict,
    /// The feature is not implemented by the recipient or server (§8.3.3.3).
    FeatureNotImplemented,
    /// The sender lacks the permissions (§8.3.3.4).
    Forbidden,
    /// The recipient no longer exists at this address; optionally its new XMPP URI (§8.3.3.5).
    Gone(Option<String>),
    /// The server failed in a way it cannot describe better (§8.3.3.6).
    InternalServerError,
    /// The addressed JID or item cannot be found (§8.3.3.7).
    ItemNotFound,
    /// A JID in the request does not conform to RFC 7622 (§8.3.3.8).
    JidMalformed,
    /// The request violates a policy or data the recipient expects (§8.3.3.9).
    NotAcceptable,
    /// Nobody may perform this action (§8.3.3.10).
    NotAllowed,
    /// The sender must authenticate first (§8.3.3.11).
    NotAuthorized,
    /// The sender violated a local policy, e.g. a size or rate limit (§8.3.3.12).
    PolicyViolation,
    /// The recipient is temporarily unavailable (§8.3.3.13).
    RecipientUnavailable,
    /// Send to another address instead, optionally given as an XMPP URI (§8.3.3.14).
    Redirect(Option<String>),
    /// The sender must register first (§8.3.3.15).
    RegistrationRequired,
    /// The recipient's domain does not exist or cannot be resolved (§8.3.3.16).
    RemoteServerNotFound,
    /// The recipient's server could not be reached in time (§8.3.3.17).
    RemoteServerTimeout,
    /// The server or recipient lacks the resources to process this now (§8.3.3.18).
    ResourceConstraint,
    /// The server or recipient does not provide this service (§8.3.3.19).
    ServiceUnavailable,
    /// A subscription is required first (§8.3.3.20).
    SubscriptionRequired,
    /// None of the others; used with an application-specific condition (§8.3.3.21).
    UndefinedCondition,
    /// The request was understood but not expected now, e.g. out of order (§8.3.3.22).
    UnexpectedRequest,
}

impl StanzaErrorCondition {
    /// The condition's element name, e.g. `"service-unavailable"`.
    pub fn as_str(&self) -> &'static str {
        use StanzaErrorCondition::*;
        match self {
            BadRequest => "bad-request",
            Conflict => "conflict",
            FeatureNotImplemented => "feature-not-implemented",
            Forbidden => "forbidden",
            Gone(_) => "gone",
            InternalServerError => "internal-server-error",
            ItemNotFound => "item-not-found",
            JidMalformed => "jid-malformed",
            NotAcceptable => "not-acceptable",
            NotAllowed => "not-allowed",
            NotAuthorized => "not-authorized",
            PolicyViolation => "policy-violation",
            RecipientUnavailable => "recipient-unavailable",
            Redirect(_) => "redirect",
            RegistrationRequired => "registration-required",
            RemoteServerNotFound => "remote-server-not-found",
            RemoteServerTimeout => "remote-server-timeout",
            ResourceConstraint => "resource-constraint",
            ServiceUnavailable => "service-unavailable",
            SubscriptionRequired => "subscription-required",
            UndefinedCondition => "undefined-condition",
            UnexpectedRequest => "unexpected-request",
        }
    }

    /// The condition named `name`; `gone` and `redirect` come without a URI (see
    /// [`from_element`](Self::from_element) to keep the element's content).
    pub fn from_name(name: &str) -> Option<Self> {
        use StanzaErrorCondition::*;
        Some(match name {
            "bad-request" => BadRequest,
            "conflict" => Conflict,
            "feature-not-implemented" => FeatureNotImplemented,
            "forbidden" => Forbidden,
            "gone" => Gone(None),
            "internal-server-error" => InternalServerError,
            "item-not-found" => ItemNotFound,
            "jid-malformed" => JidMalformed,
            "not-acceptable" => NotAcceptable,
            "not-allowed" => NotAllowed,
            "not-authorized" => NotAuthorized,
            "policy-violation" => PolicyViolation,
            "recipient-unavailable" => RecipientUnavailable,
            "redirect" => Redirect(None),
            "registration-required" => RegistrationRequired,
            "remote-server-not-found" => RemoteServerNotFound,
            "remote-server-timeout" => RemoteServerTimeout,
            "resource-constraint" => ResourceConstraint,
            "service-unavailable" => ServiceUnavailable,
            "subscription-required" => SubscriptionRequired,
            "undefined-condition" => UndefinedCondition,
            "unexpected-request" => UnexpectedRequest,
            _ => return None,
        })
    }

    /// The condition of a received `<name>content</name>` element, keeping the (trimmed)
    /// content as the URI of `gone` and `redirect`; empty content means no URI.
    pub fn from_element(name: &str, content: &str) -> Option<Self> {
        let mut condition = Self::from_name(name)?;
        if let Self::Gone(uri) | Self::Redirect(uri) = &mut condition {
            let content = content.trim();
            *uri = (!content.is_empty()).then(|| content.to_owned());
        }
        Some(condition)
    }

    /// The error type RFC 6120 §8.3.3 gives this condition (it says SHOULD, so a caller with
    /// better knowledge may override it with [`StanzaError::with_type`]).
    ///
    /// `undefined-condition` allows any type; `cancel` is chosen because retrying an
    /// unexplained failure unchanged rarely helps.
    pub fn default_type(&self) -> StanzaErrorType {
        use StanzaErrorCondition::*;
        use StanzaErrorType::*;
        match self {
            BadRequest => Modify,
            Conflict => Cancel,
            FeatureNotImplemented => Cancel,
            Forbidden => Auth,
            Gone(_) => Cancel,
            InternalServerError => Cancel,
            ItemNotFound => Cancel,
            JidMalformed => Modify,
            NotAcceptable => Modify,
            NotAllowed => Cancel,
            NotAuthorized => Auth,
            PolicyViolation => Modify,
            RecipientUnavailable => Wait,
            Redirect(_) => Modify,
            RegistrationRequired => Auth,
            RemoteServerNotFound => Cancel,
            RemoteServerTimeout => Wait,
            ResourceConstraint => Wait,
            ServiceUnavailable => Cancel,
            SubscriptionRequired => Auth,
            UndefinedCondition => Cancel,
            UnexpectedRequest => Wait,
        }
    }

    /// The element's character data, if the condition carries any.
    fn content(&self) -> Option<&str> {
        match self {
            Self::Gone(uri) | Self::Redirect(uri) => uri.as_deref(),
            _ => None,
        }
    }
}

impl fmt::Display for StanzaErrorCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        match self.content() {
            Some(content) => write!(f, " ({content})"),
            None => Ok(()),
        }
    }
}

impl FromStr for StanzaErrorCondition {
    type Err = UnknownCondition;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::from_name(name).ok_or_else(|| UnknownCondition::new("stanza error condition", name))
    }
}

/// A stanza error: the `<error/>` child of a stanza of type `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stanza error <{condition}> ({type_}){}", Detail(.text))]
pub struct StanzaError {
    /// What went wrong.
    pub condition: StanzaErrorCondition,
    /// How the sender may proceed.
    pub type_: StanzaErrorType,
    /// Human-readable English detail.
    pub text: Option<String>,
    /// The entity that generated the error, when it is not the stanza's `from`.
    pub by: Option<String>,
    /// An application-specific condition (RFC 6120 §8.3.2): element name and namespace,
    /// written as an empty element after the defined condition (e.g. XEP-0191's
    /// `<blocked xmlns='urn:xmpp:blocking:errors'/>`).
    pub app: Option<(&'static str, &'static str)>,
}

impl StanzaError {
    /// A stanza error with the condition's default type and no text.
    pub fn new(condition: StanzaErrorCondition) -> Self {
        Self {
            type_: condition.default_type(),
            condition,
            text: None,
            by: None,
            app: None,
        }
    }

    /// Adds an application-specific condition element (RFC 6120 §8.3.2).
    pub fn with_app(mut self, name: &'static str, namespace: &'static str) -> Self {
        self.app = Some((name, namespace));
        self
    }

    /// Overrides the error type.
    pub fn with_type(mut self, type_: StanzaErrorType) -> Self {
        self.type_ = type_;
        self
    }

    /// Adds English text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Names the entity that generated the error.
    pub fn with_by(mut self, by: impl Into<String>) -> Self {
        self.by = Some(by.into());
        self
    }

    /// Appends `<error type='…' by='…'>…</error>` to `out`. The element takes the stanza's
    /// default namespace, so it belongs inside a stanza already written.
    pub fn write_xml(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"<error type='");
        out.extend_from_slice(self.type_.as_str().as_bytes());
        out.push(b'\'');
        if let Some(by) = &self.by {
            out.extend_from_slice(b" by='");
            escape_attr_into(out, by);
            out.push(b'\'');
        }
        out.push(b'>');
        write_condition(
            out,
            self.condition.as_str(),
            Some(ns::XMPP_STANZAS),
            self.condition.content(),
        );
        if let Some(text) = &self.text {
            write_text(out, Some(ns::XMPP_STANZAS), Some(SERVER_LANG), text);
        }
        if let Some((name, namespace)) = self.app {
            out.push(b'<');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b" xmlns='");
            escape_attr_into(out, namespace);
            out.extend_from_slice(b"'/>");
        }
        out.extend_from_slice(b"</error>");
    }
}

#[cfg(test)]
mod app_condition_tests {
    use super::*;

    #[test]
    fn application_condition_follows_the_text() {
        let mut out = Vec::new();
        StanzaError::new(StanzaErrorCondition::NotAcceptable)
            .with_text("blocked")
            .with_app("blocked", "urn:xmpp:blocking:errors")
            .write_xml(&mut out);
        let xml = String::from_utf8(out).unwrap();
        assert!(
            xml.starts_with("<error type='modify'><not-acceptable "),
            "{xml}"
        );
        assert!(
            xml.ends_with("</text><blocked xmlns='urn:xmpp:blocking:errors'/></error>"),
            "{xml}"
        );
    }
}

impl From<StanzaErrorCondition> for StanzaError {
    fn from(condition: StanzaErrorCondition) -> Self {
        Self::new(condition)
    }
}

// ---------------------------------------------------------------------------------------------
// SASL failures

/// A SASL failure condition (RFC 6120 §6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaslFailureCondition {
    /// The initiating entity aborted the exchange (§6.5.1).
    Aborted,
    /// The account is disabled (§6.5.2).
    AccountDisabled,
    /// The credentials have expired (§6.5.3).
    CredentialsExpired,
    /// The mechanism requires an encrypted stream (§6.5.4).
    EncryptionRequired,
    /// The data was not valid base64 (§6.5.5).
    IncorrectEncoding,
    /// The authorization identity is invalid (§6.5.6).
    InvalidAuthzid,
    /// The mechanism is not supported or not offered (§6.5.7).
    InvalidMechanism,
    /// The request is malformed (§6.5.8).
    MalformedRequest,
    /// The mechanism is weaker than policy allows for this account (§6.5.9).
    MechanismTooWeak,
    /// The credentials are wrong, or the account does not exist (§6.5.10).
    NotAuthorized,
    /// A temporary failure on the server; try again later (§6.5.11).
    TemporaryAuthFailure,
}

impl SaslFailureCondition {
    /// The condition's element name, e.g. `"not-authorized"`.
    pub fn as_str(self) -> &'static str {
        use SaslFailureCondition::*;
        match self {
            Aborted => "aborted",
            AccountDisabled => "account-disabled",
            CredentialsExpired => "credentials-expired",
            EncryptionRequired => "encryption-required",
            IncorrectEncoding => "incorrect-encoding",
            InvalidAuthzid => "invalid-authzid",
            InvalidMechanism => "invalid-mechanism",
            MalformedRequest => "malformed-request",
            MechanismTooWeak => "mechanism-too-weak",
            NotAuthorized => "not-authorized",
            TemporaryAuthFailure => "temporary-auth-failure",
        }
    }

    /// The condition named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        use SaslFailureCondition::*;
        Some(match name {
            "aborted" => Aborted,
            "account-disabled" => AccountDisabled,
            "credentials-expired" => CredentialsExpired,
            "encryption-required" => EncryptionRequired,
            "incorrect-encoding" => IncorrectEncoding,
            "invalid-authzid" => InvalidAuthzid,
            "invalid-mechanism" => InvalidMechanism,
            "malformed-request" => MalformedRequest,
            "mechanism-too-weak" => MechanismTooWeak,
            "not-authorized" => NotAuthorized,
            "temporary-auth-failure" => TemporaryAuthFailure,
            _ => return None,
        })
    }
}

impl fmt::Display for SaslFailureCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SaslFailureCondition {
    type Err = UnknownCondition;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::from_name(name).ok_or_else(|| UnknownCondition::new("SASL failure condition", name))
    }
}

/// A SASL failure: ends the authentication exchange, not the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SASL failure <{condition}>{}", Detail(.text))]
pub struct SaslFailure {
    /// What went wrong.
    pub condition: SaslFailureCondition,
    /// Human-readable English detail.
    pub text: Option<String>,
}

impl SaslFailure {
    /// A failure with no text.
    pub fn new(condition: SaslFailureCondition) -> Self {
        Self {
            condition,
            text: None,
        }
    }

    /// Adds English text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Appends `<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>…</failure>` to `out`.
    pub fn write_xml(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"<failure xmlns='");
        out.extend_from_slice(ns::SASL.as_bytes());
        out.extend_from_slice(b"'>");
        write_condition(out, self.condition.as_str(), None, None);
        if let Some(text) = &self.text {
            write_text(out, None, Some(SERVER_LANG), text);
        }
        out.extend_from_slice(b"</failure>");
    }
}

impl From<SaslFailureCondition> for SaslFailure {
    fn from(condition: SaslFailureCondition) -> Self {
        Self::new(condition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM_NAMES: [&str; 25] = [
        "bad-format",
        "bad-namespace-prefix",
        "conflict",
        "connection-timeout",
        "host-gone",
        "host-unknown",
        "improper-addressing",
        "internal-server-error",
        "invalid-from",
        "invalid-namespace",
        "invalid-xml",
        "not-authorized",
        "not-well-formed",
        "policy-violation",
        "remote-connection-failed",
        "reset",
        "resource-constraint",
        "restricted-xml",
        "see-other-host",
        "system-shutdown",
        "undefined-condition",
        "unsupported-encoding",
        "unsupported-feature",
        "unsupported-stanza-type",
        "unsupported-version",
    ];

    /// RFC 6120 §8.3.3, in order, with the error type the RFC gives each.
    const STANZA_NAMES: [(&str, &str); 22] = [
        ("bad-request", "modify"),
        ("conflict", "cancel"),
        ("feature-not-implemented", "cancel"),
        ("forbidden", "auth"),
        ("gone", "cancel"),
        ("internal-server-error", "cancel"),
        ("item-not-found", "cancel"),
        ("jid-malformed", "modify"),
        ("not-acceptable", "modify"),
        ("not-allowed", "cancel"),
        ("not-authorized", "auth"),
        ("policy-violation", "modify"),
        ("recipient-unavailable", "wait"),
        ("redirect", "modify"),
        ("registration-required", "auth"),
        ("remote-server-not-found", "cancel"),
        ("remote-server-timeout", "wait"),
        ("resource-constraint", "wait"),
        ("service-unavailable", "cancel"),
        ("subscription-required", "auth"),
        ("undefined-condition", "cancel"),
        ("unexpected-request", "wait"),
    ];

    const SASL_NAMES: [&str; 11] = [
        "aborted",
        "account-disabled",
        "credentials-expired",
        "encryption-required",
        "incorrect-encoding",
        "invalid-authzid",
        "invalid-mechanism",
        "malformed-request",
        "mechanism-too-weak",
        "not-authorized",
        "temporary-auth-failure",
    ];

    /// Checks that `xml` is one well-formed element: tags nest and match, attribute values are
    /// quoted and hold no `<`, and every `&` starts a predefined or numeric reference.
    /// Returns the concatenated, unescaped character data of every `<text>` element.
    fn check_well_formed(xml: &[u8]) -> Result<String, String> {
        let xml = std::str::from_utf8(xml).map_err(|e| e.to_string())?;
        let mut stack: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut texts = String::new();
        let mut rest = xml;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("</") {
                let end = after.find('>').ok_or("unterminated end tag")?;
                let name = &after[..end];
                if stack.pop() != Some(name) {
                    return Err(format!("mismatched </{name}>"));
                }
                rest = &after[end + 1..];
            } else if let Some(after) = rest.strip_prefix('<') {
                let name_end = after
                    .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
                    .ok_or("unterminated start tag")?;
                let name = &after[..name_end];
                if name.is_empty() {
                    return Err("empty element name".into());
                }
                if stack.is_empty() {
                    roots += 1;
                }
                let mut tag = &after[name_end..];
                loop {
                    let trimmed = tag.trim_start();
                    if let Some(r) = trimmed.strip_prefix("/>") {
                        tag = r;
                        break;
                    }
                    if let Some(r) = trimmed.strip_prefix('>') {
                        stack.push(name);
                        tag = r;
                        break;
                    }
                    if trimmed.len() == tag.len() {
                        return Err(format!("no space before attribute in <{name}>"));
                    }
                    let eq = trimmed.find('=').ok_or("attribute without value")?;
                    let value = &trimmed[eq + 1..];
                    let quote = value.chars().next().ok_or("missing quote")?;
                    if quote != '\'' && quote != '"' {
                        return Err("unquoted attribute".into());
                    }
                    let close = value[1..].find(quote).ok_or("unterminated attribute")?;
                    let raw = &value[1..=close];
                    if raw.contains('<') {
                        return Err("'<' in attribute".into());
                    }
                    unescape(raw)?;
                    tag = &value[close + 2..];
                }
                rest = tag;
            } else {
                let end = rest.find('<').unwrap_or(rest.len());
                if stack.is_empty() {
                    return Err("text outside the root element".into());
                }
                let text = unescape(&rest[..end])?;
                if stack.last() == Some(&"text") {
                    texts.push_str(&text);
                }
                rest = &rest[end..];
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed <{}>", stack.join("><")));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(texts)
    }

    fn unescape(raw: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = raw;
        while let Some(amp) = rest.find('&') {
            out.push_str(&rest[..amp]);
            let semi = rest[amp..].find(';').ok_or("unterminated reference")? + amp;
            let c = match &rest[amp + 1..semi] {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                num => {
                    let code = if let Some(hex) = num.strip_prefix("#x") {
                        u32::from_str_radix(hex, 16)
                    } else if let Some(dec) = num.strip_prefix('#') {
                        dec.parse()
                    } else {
                        return Err(format!("unknown entity &{num};"));
                    };
                    code.ok()
                        .and_then(char::from_u32)
                        .ok_or(format!("bad reference &{num};"))?
                }
            };
            out.push(c);
            rest = &rest[semi + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn xml(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        write(&mut out);
        check_well_formed(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn the_checker_rejects_broken_xml() {
        for bad in [
            "<a>",
            "<a></b>",
            "<a>x<y</a>",
            "<a b='<'/>",
            "<a>&bogus;</a>",
            "<a>&amp</a>",
            "<a/><b/>",
            "text",
            "<a b=c/>",
        ] {
            assert!(check_well_formed(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            check_well_formed(b"<a x='1'><text>&lt;&#38;&#x41;</text></a>").as_deref(),
            Ok("<&A")
        );
    }

    #[test]
    fn every_stream_condition_round_trips() {
        for name in STREAM_NAMES {
            let condition = StreamErrorCondition::from_name(name).expect(name);
            assert_eq!(condition.as_str(), name);
            assert_eq!(
                name.parse::<StreamErrorCondition>().as_ref(),
                Ok(&condition)
            );
            assert_eq!(condition.to_string(), name);
        }
        let distinct: std::collections::HashSet<_> = STREAM_NAMES.iter().collect();
        assert_eq!(distinct.len(), 25);
    }

    #[test]
    fn every_stanza_condition_round_trips_with_its_rfc_type() {
        for (name, type_) in STANZA_NAMES {
            let condition = StanzaErrorCondition::from_name(name).expect(name);
            assert_eq!(condition.as_str(), name);
            assert_eq!(
                name.parse::<StanzaErrorCondition>().as_ref(),
                Ok(&condition)
            );
            assert_eq!(condition.default_type().as_str(), type_, "{name}");
            assert_eq!(StanzaError::new(condition).type_.as_str(), type_);
        }
    }

    #[test]
    fn the_briefs_examples_of_default_types() {
        use StanzaErrorCondition as C;
        assert_eq!(
            C::ServiceUnavailable.default_type(),
            StanzaErrorType::Cancel
        );
        assert_eq!(C::NotAuthorized.default_type(), StanzaErrorType::Auth);
        assert_eq!(C::ResourceConstraint.default_type(), StanzaErrorType::Wait);
        assert_eq!(C::BadRequest.default_type(), StanzaErrorType::Modify);
    }

    #[test]
    fn every_sasl_condition_round_trips() {
        for name in SASL_NAMES {
            let condition = SaslFailureCondition::from_name(name).expect(name);
            assert_eq!(condition.as_str(), name);
            assert_eq!(name.parse(), Ok(condition));
        }
    }

    #[test]
    fn every_error_type_round_trips() {
        for name in ["auth", "cancel", "continue", "modify", "wait"] {
            let type_: StanzaErrorType = name.parse().expect(name);
            assert_eq!(type_.as_str(), name);
            assert_eq!(type_.to_string(), name);
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        assert_eq!(StreamErrorCondition::from_name("Bad-Format"), None);
        assert_eq!(StanzaErrorCondition::from_name(""), None);
        assert_eq!(SaslFailureCondition::from_name("see-other-host"), None);
        assert_eq!(StanzaErrorType::from_name("error"), None);
        let err = "xml-not-well-formed"
            .parse::<StreamErrorCondition>()
            .unwrap_err();
        assert_eq!(err.name(), "xml-not-well-formed");
        assert_eq!(
            err.to_string(),
            "unknown stream error condition `xml-not-well-formed`"
        );
        let err = "bogus".parse::<StanzaErrorType>().unwrap_err();
        assert_eq!(err.to_string(), "unknown stanza error type `bogus`");
    }

    #[test]
    fn element_content_fills_the_conditions_that_carry_it() {
        assert_eq!(
            StreamErrorCondition::from_element("see-other-host", " [2001:db8::1]:5222\n"),
            Some(StreamErrorCondition::SeeOtherHost(
                "[2001:db8::1]:5222".into()
            ))
        );
        assert_eq!(
            StreamErrorCondition::from_element("conflict", "ignored"),
            Some(StreamErrorCondition::Conflict)
        );
        assert_eq!(
            StanzaErrorCondition::from_element("gone", "xmpp:romeo@example.net"),
            Some(StanzaErrorCondition::Gone(Some(
                "xmpp:romeo@example.net".into()
            )))
        );
        assert_eq!(
            StanzaErrorCondition::from_element("redirect", "  "),
            Some(StanzaErrorCondition::Redirect(None))
        );
    }

    #[test]
    fn writes_stream_errors() {
        let error = StreamError::new(StreamErrorCondition::NotWellFormed);
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             </stream:error>"
        );
        let error = StreamError::new(StreamErrorCondition::PolicyViolation)
            .with_text("stanza larger than 65536 bytes");
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>\
             stanza larger than 65536 bytes</text></stream:error>"
        );
        let error = StreamError::from(StreamErrorCondition::SeeOtherHost(
            "[2001:db8::1]:5222".into(),
        ));
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>\
             [2001:db8::1]:5222</see-other-host></stream:error>"
        );
        let error = StreamError {
            text: Some("Au revoir".into()),
            lang: None,
            ..StreamError::new(StreamErrorCondition::SystemShutdown)
        };
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Au revoir</text></stream:error>"
        );
    }

    #[test]
    fn writes_stanza_errors() {
        let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<error type='cancel'>\
             <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
        );
        let error = StanzaError::new(StanzaErrorCondition::Redirect(Some(
            "xmpp:characters@conference.example.org".into(),
        )))
        .with_by("example.org")
        .with_text("Moved");
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<error type='modify' by='example.org'>\
             <redirect xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>\
             xmpp:characters@conference.example.org</redirect>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>Moved</text>\
             </error>"
        );
        let error =
            StanzaError::new(StanzaErrorCondition::Gone(None)).with_type(StanzaErrorType::Wait);
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<error type='wait'><gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
        );
    }

    #[test]
    fn writes_sasl_failures() {
        let failure = SaslFailure::new(SaslFailureCondition::NotAuthorized);
        assert_eq!(
            xml(|out| failure.write_xml(out)),
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
        );
        let failure = SaslFailure::from(SaslFailureCondition::AccountDisabled)
            .with_text("Call 212-555-1212 for help.");
        assert_eq!(
            xml(|out| failure.write_xml(out)),
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><account-disabled/>\
             <text xml:lang='en'>Call 212-555-1212 for help.</text></failure>"
        );
    }

    #[test]
    fn escapes_text_and_attributes() {
        let nasty = "a<b>&c'd\"e</text>";
        let error =
            StreamError::new(StreamErrorCondition::SeeOtherHost(nasty.into())).with_text(nasty);
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>\
             a&lt;b&gt;&amp;c'd\"e&lt;/text&gt;</see-other-host>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>\
             a&lt;b&gt;&amp;c'd\"e&lt;/text&gt;</text></stream:error>"
        );
        let error = StanzaError::new(StanzaErrorCondition::Forbidden)
            .with_by("x' y='1")
            .with_text(nasty);
        assert_eq!(
            xml(|out| error.write_xml(out)),
            "<error type='auth' by='x&apos; y=&apos;1'>\
             <forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>\
             a&lt;b&gt;&amp;c'd\"e&lt;/text&gt;</text></error>"
        );
        let failure = SaslFailure::new(SaslFailureCondition::Aborted).with_text(nasty);
        assert_eq!(
            xml(|out| failure.write_xml(out)),
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><aborted/>\
             <text xml:lang='en'>a&lt;b&gt;&amp;c'd\"e&lt;/text&gt;</text></failure>"
        );
    }

    #[test]
    fn writers_append_without_clearing() {
        let mut out = b"<message>".to_vec();
        StanzaError::new(StanzaErrorCondition::ItemNotFound).write_xml(&mut out);
        out.extend_from_slice(b"</message>");
        assert!(check_well_formed(&out).is_ok());
        assert!(out.starts_with(b"<message><error type='cancel'><item-not-found"));
    }

    #[test]
    fn messages_are_readable() {
        let error = StreamError::new(StreamErrorCondition::HostUnknown).with_text("no such host");
        assert_eq!(
            error.to_string(),
            "stream error <host-unknown>: no such host"
        );
        let error = StreamError::new(StreamErrorCondition::SeeOtherHost("b.example".into()));
        assert_eq!(
            error.to_string(),
            "stream error <see-other-host (b.example)>"
        );
        let error = StanzaError::new(StanzaErrorCondition::ItemNotFound);
        assert_eq!(error.to_string(), "stanza error <item-not-found> (cancel)");
        let failure = SaslFailure::new(SaslFailureCondition::MalformedRequest).with_text("no NUL");
        assert_eq!(
            failure.to_string(),
            "SASL failure <malformed-request>: no NUL"
        );
        let _: &dyn std::error::Error = &failure;
    }

    /// What a text written through `escape_text_into` reads back as: XML forbids most C0
    /// controls, so the escaper drops them.
    fn readable(text: &str) -> String {
        text.chars()
            .filter(|&c| c >= ' ' || matches!(c, '\t' | '\n' | '\r'))
            .collect()
    }

    proptest! {
        #[test]
        fn any_text_is_written_well_formed(text in any::<String>(), by in any::<String>()) {
            let mut out = Vec::new();
            StanzaError::new(StanzaErrorCondition::Redirect(Some(text.clone())))
                .with_by(by)
                .with_text(text.clone())
                .write_xml(&mut out);
            let texts = check_well_formed(&out).map_err(TestCaseError::fail)?;
            prop_assert_eq!(texts, readable(&text));

            let mut out = Vec::new();
            StreamError::new(StreamErrorCondition::SeeOtherHost(text.clone()))
                .with_text(text.clone())
                .write_xml(&mut out);
            let texts = check_well_formed(&out).map_err(TestCaseError::fail)?;
            prop_assert_eq!(texts, readable(&text));

            let mut out = Vec::new();
            SaslFailure::new(SaslFailureCondition::NotAuthorized)
                .with_text(text.clone())
                .write_xml(&mut out);
            let texts = check_well_formed(&out).map_err(TestCaseError::fail)?;
            prop_assert_eq!(texts, readable(&text));
        }
    }
}
