//! Which resources of an account receive a message sent to its bare JID (RFC 6121 §8.5.2.1.1
//! and §8.5.3.2.1): a pure function over the registry's records, so every row of the
//! rules is tested without a router.
//!
//! "Available" means the session has sent available presence (the registry holds it);
//! resources with a negative priority never receive messages addressed to the bare JID
//! (RFC 6121 §4.7.2.3).

use starling_registry::SessionRecord;
use starling_xmpp::FullJid;

use crate::stanza::MessageType;

/// The sessions a message of type `kind` to the account's bare JID goes to, leaving out
/// `exclude` (a session the edge just reported gone):
///
/// - `chat`, `normal`: the available resources with the highest non-negative priority; all
///   of them when several share it (the "most available" choice of §8.5.2.1.1);
/// - `headline`: every available resource with a non-negative priority;
/// - `groupchat`, `error`: none (they are bounced or dropped by the caller).
pub(crate) fn message_recipients<'a>(
    sessions: &'a [SessionRecord],
    kind: MessageType,
    exclude: Option<&FullJid>,
) -> Vec<&'a SessionRecord> {
    let eligible = || {
        sessions
            .iter()
            .filter(move |s| s.is_available() && s.priority >= 0 && Some(&s.jid) != exclude)
    };
    match kind {
        MessageType::Headline => eligible().collect(),
        MessageType::Chat | MessageType::Normal => match eligible().map(|s| s.priority).max() {
            Some(top) => eligible().filter(|s| s.priority == top).collect(),
            None => Vec::new(),
        },
        MessageType::Groupchat | MessageType::Error => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn rec(resource: &str, priority: Option<i8>) -> SessionRecord {
        let jid = starling_xmpp::jid::parse_full(&format!("a@x/{resource}")).unwrap();
        let mut r = SessionRecord::new(jid, Arc::from("e1"), Arc::from(resource));
        if let Some(p) = priority {
            r.priority = p;
            r.presence = Some(Bytes::from_static(b"<presence/>"));
        }
        r
    }

    fn names(v: Vec<&SessionRecord>) -> Vec<String> {
        v.iter()
            .map(|s| s.jid.resource().as_str().to_owned())
            .collect()
    }

    #[test]
    fn chat_goes_to_the_highest_priority() {
        let s = [rec("a", Some(1)), rec("b", Some(5)), rec("c", Some(3))];
        assert_eq!(
            names(message_recipients(&s, MessageType::Chat, None)),
            ["b"]
        );
        assert_eq!(
            names(message_recipients(&s, MessageType::Normal, None)),
            ["b"]
        );
    }

    #[test]
    fn ties_all_receive() {
        let s = [rec("a", Some(5)), rec("b", Some(5)), rec("c", Some(3))];
        assert_eq!(
            names(message_recipients(&s, MessageType::Chat, None)),
            ["a", "b"]
        );
    }

    #[test]
    fn negative_and_unavailable_are_excluded() {
        let s = [rec("a", Some(-1)), rec("b", None), rec("c", Some(0))];
        assert_eq!(
            names(message_recipients(&s, MessageType::Chat, None)),
            ["c"]
        );
        let s = [rec("a", Some(-1)), rec("b", None)];
        assert!(message_recipients(&s, MessageType::Chat, None).is_empty());
        assert!(message_recipients(&s, MessageType::Headline, None).is_empty());
    }

    #[test]
    fn headline_goes_to_every_non_negative_resource() {
        let s = [rec("a", Some(0)), rec("b", Some(7)), rec("c", Some(-3))];
        assert_eq!(
            names(message_recipients(&s, MessageType::Headline, None)),
            ["a", "b"]
        );
    }

    #[test]
    fn excluded_session_is_skipped_and_the_next_best_wins() {
        let s = [rec("a", Some(9)), rec("b", Some(2))];
        let gone = s[0].jid.clone();
        assert_eq!(
            names(message_recipients(&s, MessageType::Chat, Some(&gone))),
            ["b"]
        );
    }

    #[test]
    fn groupchat_and_error_go_nowhere() {
        let s = [rec("a", Some(1))];
        assert!(message_recipients(&s, MessageType::Groupchat, None).is_empty());
        assert!(message_recipients(&s, MessageType::Error, None).is_empty());
    }
}
