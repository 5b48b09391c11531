//! Namespace names Starling reads and writes, one constant per namespace.
//!
//! Compare an element's resolved namespace against these, never against a literal, so a typo
//! cannot silently make a feature unreachable.

// Streams and stanzas (RFC 6120, XEP-0114, RFC 7395).

/// Default namespace of client-to-server streams (RFC 6120 §4.8.3).
pub const JABBER_CLIENT: &str = "jabber:client";
/// Default namespace of server-to-server streams (RFC 6120 §4.8.3).
pub const JABBER_SERVER: &str = "jabber:server";
/// Default namespace of external component streams (XEP-0114).
pub const COMPONENT_ACCEPT: &str = "jabber:component:accept";
/// The `stream:` namespace of the stream header, features and errors (RFC 6120 §4.8.1).
pub const STREAM: &str = "http://etherx.jabber.org/streams";
/// Stream error conditions and their `<text/>` (RFC 6120 §4.9.2).
pub const XMPP_STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// Stanza error conditions and their `<text/>` (RFC 6120 §8.3.2).
pub const XMPP_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// STARTTLS negotiation (RFC 6120 §5).
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// SASL negotiation (RFC 6120 §6).
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Resource binding (RFC 6120 §7).
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// Legacy session establishment (RFC 3921 §3, kept as optional by RFC 6121 Appendix E).
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// The WebSocket sub-protocol's `<open/>` and `<close/>` framing (RFC 7395 §3.3).
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// Server dialback (XEP-0220).
pub const DIALBACK: &str = "jabber:server:dialback";
/// The reserved `xml:` prefix, which carries `xml:lang` (Namespaces in XML 1.0 §3).
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";

// Protocol extensions.

/// Stream management (XEP-0198).
pub const SM: &str = "urn:xmpp:sm:3";
/// Roster management (RFC 6121 §2).
pub const ROSTER: &str = "jabber:iq:roster";
/// In-band registration queries (XEP-0077).
pub const REGISTER: &str = "jabber:iq:register";
/// The in-band registration stream feature (XEP-0077 §4).
pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
/// Software version (XEP-0092).
pub const VERSION: &str = "jabber:iq:version";
/// XMPP ping (XEP-0199).
pub const PING: &str = "urn:xmpp:ping";
/// Entity time (XEP-0202).
pub const TIME: &str = "urn:xmpp:time";
/// Service discovery, information (XEP-0030).
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// Service discovery, items (XEP-0030).
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// Message delivery receipts (XEP-0184).
pub const RECEIPTS: &str = "urn:xmpp:receipts";
/// Message carbons (XEP-0280).
pub const CARBONS: &str = "urn:xmpp:carbons:2";
/// Stanza forwarding, the wrapper carbons use (XEP-0297).
pub const FORWARD: &str = "urn:xmpp:forward:0";
/// Blocking command (XEP-0191).
pub const BLOCKING: &str = "urn:xmpp:blocking";
/// vcard-temp (XEP-0054).
pub const VCARD: &str = "vcard-temp";
/// Private XML storage (XEP-0049).
pub const PRIVATE: &str = "jabber:iq:private";
/// Client state indication (XEP-0352).
pub const CSI: &str = "urn:xmpp:csi:0";
/// Entity capabilities (XEP-0115).
pub const CAPS: &str = "http://jabber.org/protocol/caps";
/// Delayed delivery (XEP-0203).
pub const DELAY: &str = "urn:xmpp:delay";
/// Data forms (XEP-0004).
pub const DATA_FORMS: &str = "jabber:x:data";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_distinct_and_have_no_stray_whitespace() {
        let all = [
            JABBER_CLIENT,
            JABBER_SERVER,
            COMPONENT_ACCEPT,
            STREAM,
            XMPP_STREAMS,
            XMPP_STANZAS,
            TLS,
            SASL,
            BIND,
            SESSION,
            FRAMING,
            DIALBACK,
            XML,
            SM,
            ROSTER,
            REGISTER,
            REGISTER_FEATURE,
            VERSION,
            PING,
            TIME,
            DISCO_INFO,
            DISCO_ITEMS,
            RECEIPTS,
            CARBONS,
            FORWARD,
            BLOCKING,
            VCARD,
            PRIVATE,
            CSI,
            CAPS,
            DELAY,
            DATA_FORMS,
        ];
        let mut seen = std::collections::HashSet::new();
        for ns in all {
            assert!(seen.insert(ns), "{ns} listed twice");
            assert_eq!(ns, ns.trim());
            assert!(
                !ns.contains(['\'', '"', '<', '&']),
                "{ns} would need escaping"
            );
        }
    }
}
