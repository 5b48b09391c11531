//! What kind of stanza the router holds (RFC 6120 §8.2, RFC 6121 §4.7.1 and §5.2.2), and
//! the stanzas it writes itself: IQ results (RFC 6120 §8.2.3) and error replies (§8.3).
//!
//! Server-built stanzas are written with [`XmlWriter`] and framed back with
//! [`Element::parse`], so they travel to the edge as the same type as framed ones.

use bytes::Bytes;
use starling_xml::writer::XmlWriter;
use starling_xml::{Element, FrameError};
use starling_xmpp::StanzaError;

/// The `type` of a message (RFC 6121 §5.2.2). A missing or unknown type is `normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// `normal`, no type, or a type this server does not know.
    Normal,
    /// `chat`.
    Chat,
    /// `groupchat`.
    Groupchat,
    /// `headline`.
    Headline,
    /// `error`.
    Error,
}

impl MessageType {
    /// The message type of a `type` attribute.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("chat") => Self::Chat,
            Some("groupchat") => Self::Groupchat,
            Some("headline") => Self::Headline,
            Some("error") => Self::Error,
            _ => Self::Normal,
        }
    }
}

/// The `type` of an IQ (RFC 6120 §8.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IqType {
    /// `get`: a request for information.
    Get,
    /// `set`: a request to change something.
    Set,
    /// `result`: the answer to a get or set.
    Result,
    /// `error`: the request failed.
    Error,
}

impl IqType {
    /// The IQ type of a `type` attribute; `None` when missing or not one of the four.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value? {
            "get" => Some(Self::Get),
            "set" => Some(Self::Set),
            "result" => Some(Self::Result),
            "error" => Some(Self::Error),
            _ => None,
        }
    }

    /// Whether this is a request (get or set), which must be answered exactly once.
    pub fn is_request(self) -> bool {
        matches!(self, Self::Get | Self::Set)
    }
}

/// The three stanza kinds, with what routing needs of their `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StanzaKind {
    Message(MessageType),
    /// Presence; `error` is set for `type='error'`, which is never answered.
    Presence {
        error: bool,
    },
    /// An IQ; `None` for a missing or invalid type (answered with `bad-request`).
    Iq(Option<IqType>),
}

impl StanzaKind {
    /// The kind of a stanza, or `None` for an element that is not one.
    pub(crate) fn of(stanza: &Element) -> Option<Self> {
        if !stanza.is_stanza() {
            return None;
        }
        let type_ = stanza.stanza_type();
        let type_ = type_.as_deref();
        Some(match stanza.name() {
            "message" => Self::Message(MessageType::parse(type_)),
            "presence" => Self::Presence {
                error: type_ == Some("error"),
            },
            _ => Self::Iq(IqType::parse(type_)),
        })
    }

    /// The element name, also the `kind` label of the router's metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Message(_) => "message",
            Self::Presence { .. } => "presence",
            Self::Iq(_) => "iq",
        }
    }

    /// Whether an error may be sent back for this stanza: never for an error (RFC 6120
    /// §8.3.1) and never for an IQ result, which nobody waits on.
    pub(crate) fn may_answer_with_error(self) -> bool {
        !matches!(
            self,
            Self::Message(MessageType::Error)
                | Self::Presence { error: true }
                | Self::Iq(Some(IqType::Result | IqType::Error))
        )
    }
}

/// The bare part of a JID string: everything before the first `/` (RFC 7622 §3.1; a
/// localpart or domainpart never contains `/`).
pub(crate) fn bare_part(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(bare, _)| bare)
}

/// `<iq type='result'/>` answering `id`, with an optional payload element.
pub(crate) fn iq_result(
    id: Option<&str>,
    from: &str,
    to: &str,
    payload: Option<&[u8]>,
) -> Result<Element, FrameError> {
    let mut out = Vec::with_capacity(96 + payload.map_or(0, <[u8]>::len));
    let mut w = XmlWriter::new(&mut out);
    w.start("iq")
        .attr("type", "result")
        .attr_opt("id", id)
        .attr("from", from)
        .attr("to", to);
    match payload {
        Some(payload) => w.raw(payload).end("iq"),
        None => w.empty(),
    };
    Element::parse(Bytes::from(out), starling_xmpp::ns::JABBER_CLIENT)
}

/// An error reply (RFC 6120 §8.3.1): the same stanza name and `id`, `from` and `to`
/// swapped by the caller, `type='error'` and the error. The original payload is not
/// included (§8.3.1 makes that optional; it saves the bytes).
pub(crate) fn error_reply(
    name: &'static str,
    id: Option<&str>,
    from: &str,
    to: &str,
    error: &StanzaError,
) -> Result<Element, FrameError> {
    let mut out = Vec::with_capacity(192);
    XmlWriter::new(&mut out)
        .start(name)
        .attr("type", "error")
        .attr_opt("id", id)
        .attr("from", from)
        .attr("to", to)
        .raw(b"");
    error.write_xml(&mut out);
    XmlWriter::new(&mut out).end(name);
    Element::parse(Bytes::from(out), starling_xmpp::ns::JABBER_CLIENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_xmpp::StanzaErrorCondition;

    fn el(xml: &'static str) -> Element {
        Element::parse(Bytes::from_static(xml.as_bytes()), "jabber:client").unwrap()
    }

    #[test]
    fn kinds_and_types() {
        assert_eq!(
            StanzaKind::of(&el("<message/>")),
            Some(StanzaKind::Message(MessageType::Normal))
        );
        assert_eq!(
            StanzaKind::of(&el("<message type='bogus'/>")),
            Some(StanzaKind::Message(MessageType::Normal))
        );
        assert_eq!(
            StanzaKind::of(&el("<message type='headline'/>")),
            Some(StanzaKind::Message(MessageType::Headline))
        );
        assert_eq!(
            StanzaKind::of(&el("<iq type='set'/>")),
            Some(StanzaKind::Iq(Some(IqType::Set)))
        );
        assert_eq!(
            StanzaKind::of(&el("<iq type='nope'/>")),
            Some(StanzaKind::Iq(None))
        );
        assert_eq!(StanzaKind::of(&el("<foo/>")), None);
        assert!(!StanzaKind::Iq(Some(IqType::Result)).may_answer_with_error());
        assert!(!StanzaKind::Presence { error: true }.may_answer_with_error());
        assert!(StanzaKind::Iq(None).may_answer_with_error());
        assert!(StanzaKind::Message(MessageType::Chat).may_answer_with_error());
    }

    #[test]
    fn bare_part_cuts_at_the_first_slash() {
        assert_eq!(bare_part("a@b/c/d"), "a@b");
        assert_eq!(bare_part("a@b"), "a@b");
        assert_eq!(bare_part("b/c@d"), "b");
    }

    #[test]
    fn replies_are_framed_stanzas() {
        let r = iq_result(
            Some("1"),
            "x.org",
            "a@x.org/r",
            Some(b"<ping xmlns='urn:xmpp:ping'/>"),
        )
        .unwrap();
        assert_eq!(r.stanza_type().as_deref(), Some("result"));
        assert_eq!(r.first_child(), Some(("ping", "urn:xmpp:ping")));
        let r = iq_result(None, "x.org", "a@x.org/r", None).unwrap();
        assert!(r.id().is_none() && r.first_child().is_none());
        let err = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
        let e = error_reply("message", Some("m'1"), "b@x.org", "a@x.org/r", &err).unwrap();
        assert_eq!(e.name(), "message");
        assert_eq!(e.id().as_deref(), Some("m'1"));
        assert_eq!(e.to().as_deref(), Some("a@x.org/r"));
        assert_eq!(e.from().as_deref(), Some("b@x.org"));
        assert_eq!(e.first_child(), Some(("error", "jabber:client")));
        let text = std::str::from_utf8(e.raw()).unwrap();
        assert!(
            text.contains("<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
        );
    }
}
