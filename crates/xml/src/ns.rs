//! Namespace names the framer knows by heart, so it can hand them out as `&'static str`
//! instead of copying them out of every element that declares them.

/// RFC 6120 stream namespace.
pub const STREAMS: &str = "http://etherx.jabber.org/streams";
/// Client-to-server content namespace.
pub const CLIENT: &str = "jabber:client";
/// Server-to-server content namespace.
pub const SERVER: &str = "jabber:server";
/// XEP-0114 component content namespace.
pub const COMPONENT: &str = "jabber:component:accept";
/// The namespace bound to the `xml` prefix by definition.
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
/// The namespace of `xmlns` itself; never declarable.
pub const XMLNS: &str = "http://www.w3.org/2000/xmlns/";

/// Namespaces common enough on a stream to intern: matching them is cheaper than
/// allocating for them.
const WELL_KNOWN: &[&str] = &[
    CLIENT,
    SERVER,
    COMPONENT,
    STREAMS,
    "urn:ietf:params:xml:ns:xmpp-streams",
    "urn:ietf:params:xml:ns:xmpp-stanzas",
    "urn:ietf:params:xml:ns:xmpp-tls",
    "urn:ietf:params:xml:ns:xmpp-sasl",
    "urn:ietf:params:xml:ns:xmpp-bind",
    "urn:ietf:params:xml:ns:xmpp-session",
    "urn:xmpp:sm:3",
    "urn:xmpp:csi:0",
    "urn:xmpp:ping",
    "urn:xmpp:time",
    "urn:xmpp:receipts",
    "urn:xmpp:carbons:2",
    "urn:xmpp:delay",
    "urn:xmpp:blocking",
    "jabber:iq:roster",
    "jabber:iq:register",
    "jabber:iq:version",
    "jabber:iq:private",
    "jabber:x:data",
    "vcard-temp",
    "http://jabber.org/protocol/disco#info",
    "http://jabber.org/protocol/disco#items",
    "http://jabber.org/protocol/caps",
    "http://jabber.org/protocol/pubsub",
    "http://jabber.org/protocol/pubsub#event",
    "http://jabber.org/protocol/chatstates",
];

/// The interned copy of `uri`, if it is one the framer knows.
pub(crate) fn well_known(uri: &[u8]) -> Option<&'static str> {
    WELL_KNOWN.iter().copied().find(|k| k.as_bytes() == uri)
}
