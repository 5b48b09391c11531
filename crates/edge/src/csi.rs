//! Client State Indication (XEP-0352): while a client says it is inactive, presence updates
//! for it are held, only the latest per sender, and written when it says it is active again.
//!
//! The protocol is two nonzas, `<active/>` and `<inactive/>` in `urn:xmpp:csi:0` (§4), sent
//! by the client after authentication, where the server advertises `<csi/>` (§3). They are
//! not stanzas: no reply, and XEP-0198 does not count them. What the server does with the
//! state is its choice (§2, §5); Starling does the first optimisation §2 lists:
//!
//! - **Held** ([`Class::Hold`]): a presence without `type` (available) or with
//!   `type='unavailable'`, carrying a `from`. The buffer keeps one per sender full JID: a newer
//!   one replaces the older (counted as `superseded`) and moves to the end, so the buffer is
//!   in the order of the latest updates.
//! - **Passed** ([`Class::Pass`]): everything else at once: messages, IQs, and the presences
//!   that need an answer or report a failure (`subscribe`, `subscribed`, `unsubscribe`,
//!   `unsubscribed`, `probe`, `error`).
//! - **Ordering**: before a passed stanza is written, the held presences of the same bare JID
//!   (any resource of the contact) are written first, so a message never arrives from a
//!   contact the client still believes offline, and the order of one sender's stanzas is
//!   kept (RFC 6120 §10.1). Other contacts' presences stay held.
//! - **Flush**: `<active/>` writes everything held, oldest update first, before the next
//!   element of the stream is processed (§5.1 on in-order processing).
//! - **Bound** (`c2s.csi_max_held` senders): a presence from a new sender that does not fit
//!   flushes the whole buffer, then is written itself; holding starts again empty.
//! - **End of the connection**: with a resumable XEP-0198 session, what is held travels with
//!   the session ([`crate::ResumptionState::pending`]) and is written when it is resumed (a
//!   resumed stream starts active, §6); otherwise it is dropped with the session, as every
//!   presence for a session that is gone is (counted as `discarded`).
//!
//! An active session holds no allocation for CSI: the buffer is created on the first presence
//! held and dropped when flushed.

use std::collections::VecDeque;

use starling_xml::Element;
use starling_xmpp::ns;

use crate::metrics;
use crate::sm::Outbound;

/// The stream feature (§3), offered with the features after authentication.
pub(crate) const FEATURE: &[u8] = b"<csi xmlns='urn:xmpp:csi:0'/>";

/// What the client indicated (§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Indication {
    /// `<active/>`.
    Active,
    /// `<inactive/>`.
    Inactive,
}

impl Indication {
    /// The indication an element is, if it is one.
    pub(crate) fn of(el: &Element) -> Option<Indication> {
        if el.ns() != ns::CSI {
            return None;
        }
        match el.name() {
            "active" => Some(Indication::Active),
            "inactive" => Some(Indication::Inactive),
            _ => None,
        }
    }
}

/// What happens to an outbound stanza while the client is inactive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A presence update: held, the latest per sender.
    Hold,
    /// Written at once, after the held presences of the same contact.
    Pass,
}

/// Sorts an outbound stanza (see the module doc).
pub(crate) fn classify(stanza: &Element) -> Class {
    if stanza.name() != "presence" || stanza.from().is_none() {
        return Class::Pass;
    }
    match stanza.stanza_type().as_deref() {
        None | Some("unavailable") => Class::Hold,
        Some(_) => Class::Pass,
    }
}

/// The bare part of a JID as written (RFC 7622 §3.1: a bare JID has no `/`).
fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(bare, _)| bare)
}

/// The client's state as the stream tracks it; an inactive stream is counted in
/// `starling_csi_inactive_streams` until it becomes active or the stream is gone.
#[derive(Debug, Default)]
pub(crate) struct State {
    inactive: bool,
}

impl State {
    /// Whether the client said it is inactive.
    pub(crate) fn is_inactive(&self) -> bool {
        self.inactive
    }

    /// Records an indication; returns whether the state changed.
    pub(crate) fn set(&mut self, indication: Indication) -> bool {
        let inactive = indication == Indication::Inactive;
        if inactive == self.inactive {
            return false;
        }
        self.inactive = inactive;
        metrics::csi_inactive_streams(if inactive { 1.0 } else { -1.0 });
        true
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if self.inactive {
            metrics::csi_inactive_streams(-1.0);
        }
    }
}

/// What [`Held::hold`] did with a presence.
#[derive(Debug)]
pub(crate) enum Hold {
    /// Held for a sender that had nothing held.
    Held,
    /// Held in place of the sender's previous presence, which is dropped.
    Superseded,
    /// The buffer is full: everything held, oldest first, then the presence itself, all to
    /// be written now.
    Full(VecDeque<Outbound>),
}

/// The presences held for one inactive session: at most one per sender full JID, in the order
/// of their arrival.
#[derive(Debug, Default)]
pub(crate) struct Held {
    items: VecDeque<Outbound>,
}

impl Held {
    /// Holds `item` (which [`classify`] sorted as [`Class::Hold`]), within `limit` senders.
    pub(crate) fn hold(&mut self, item: Outbound, limit: usize) -> Hold {
        let from = item
            .stanza
            .from()
            .map(|f| f.into_owned())
            .unwrap_or_default();
        let previous = self
            .items
            .iter()
            .position(|held| held.stanza.from().as_deref() == Some(from.as_str()));
        if let Some(at) = previous {
            self.items.remove(at);
            self.items.push_back(item);
            metrics::csi_presences("superseded", 1);
            metrics::csi_presences("held", 1);
            return Hold::Superseded;
        }
        if self.items.len() >= limit {
            let mut all = self.take_all();
            all.push_back(item);
            return Hold::Full(all);
        }
        self.items.push_back(item);
        metrics::csi_held(1.0);
        metrics::csi_presences("held", 1);
        Hold::Held
    }

    /// Takes the held presences of any resource of `bare`, oldest first.
    pub(crate) fn take_from(&mut self, bare: &str) -> VecDeque<Outbound> {
        let mut taken = VecDeque::new();
        if bare.is_empty() {
            return taken;
        }
        let mut kept = VecDeque::with_capacity(self.items.len());
        for item in self.items.drain(..) {
            let same = item.stanza.from().is_some_and(|f| bare_of(&f) == bare);
            if same {
                taken.push_back(item);
            } else {
                kept.push_back(item);
            }
        }
        self.items = kept;
        metrics::csi_held(-(taken.len() as f64));
        taken
    }

    /// Takes everything held, oldest first.
    pub(crate) fn take_all(&mut self) -> VecDeque<Outbound> {
        metrics::csi_held(-(self.items.len() as f64));
        std::mem::take(&mut self.items)
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many presences are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.items.is_empty() {
            let n = self.items.len();
            metrics::csi_held(-(n as f64));
            metrics::csi_presences("discarded", n as u64);
        }
    }
}

/// The bare JID of a passed stanza's sender, whose held presences go first.
pub(crate) fn sender_bare(stanza: &Element) -> Option<String> {
    stanza.from().map(|f| bare_of(&f).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn el(xml: &str) -> Element {
        Element::parse(Bytes::from(xml.to_owned()), ns::JABBER_CLIENT).unwrap()
    }

    fn out(xml: &str) -> Outbound {
        Outbound {
            stanza: el(xml),
            stamp_to: true,
        }
    }

    fn ids(items: &VecDeque<Outbound>) -> Vec<String> {
        items
            .iter()
            .map(|o| o.stanza.id().unwrap_or_default().into_owned())
            .collect()
    }

    #[test]
    fn what_is_held_and_what_passes() {
        let table = [
            ("<presence from='a@x/1'/>", Class::Hold),
            (
                "<presence from='a@x/1'><show>away</show></presence>",
                Class::Hold,
            ),
            ("<presence from='a@x/1' type='unavailable'/>", Class::Hold),
            ("<presence from='a@x' type='subscribe'/>", Class::Pass),
            ("<presence from='a@x' type='subscribed'/>", Class::Pass),
            ("<presence from='a@x' type='unsubscribe'/>", Class::Pass),
            ("<presence from='a@x' type='unsubscribed'/>", Class::Pass),
            ("<presence from='a@x' type='probe'/>", Class::Pass),
            ("<presence from='a@x/1' type='error'/>", Class::Pass),
            // No sender: nothing to coalesce on.
            ("<presence/>", Class::Pass),
            (
                "<message from='a@x/1'><body>hi</body></message>",
                Class::Pass,
            ),
            ("<iq from='x' type='result' id='1'/>", Class::Pass),
        ];
        for (xml, class) in table {
            assert_eq!(classify(&el(xml)), class, "{xml}");
        }
    }

    #[test]
    fn indications() {
        let csi = |name: &str| el(&format!("<{name} xmlns='urn:xmpp:csi:0'/>"));
        assert_eq!(Indication::of(&csi("active")), Some(Indication::Active));
        assert_eq!(Indication::of(&csi("inactive")), Some(Indication::Inactive));
        assert_eq!(Indication::of(&csi("asleep")), None);
        assert_eq!(Indication::of(&el("<active/>")), None);
    }

    #[test]
    fn the_latest_per_sender_is_kept_in_the_order_of_the_latest_update() {
        let mut held = Held::default();
        assert!(matches!(
            held.hold(out("<presence id='a1' from='a@x/1'/>"), 8),
            Hold::Held
        ));
        assert!(matches!(
            held.hold(out("<presence id='b1' from='b@x/1'/>"), 8),
            Hold::Held
        ));
        assert!(matches!(
            held.hold(out("<presence id='a2' from='a@x/2'/>"), 8),
            Hold::Held
        ));
        assert!(matches!(
            held.hold(
                out("<presence id='a1x' from='a@x/1' type='unavailable'/>"),
                8
            ),
            Hold::Superseded
        ));
        assert_eq!(held.len(), 3);
        assert_eq!(ids(&held.take_all()), ["b1", "a2", "a1x"]);
        assert!(held.is_empty());
    }

    #[test]
    fn a_contact_s_held_presences_are_taken_by_bare_jid() {
        let mut held = Held::default();
        for (id, from) in [
            ("a1", "a@x/1"),
            ("b1", "b@x/1"),
            ("a2", "a@x/2"),
            ("ab", "ab@x/1"),
        ] {
            held.hold(out(&format!("<presence id='{id}' from='{from}'/>")), 8);
        }
        assert_eq!(ids(&held.take_from("a@x")), ["a1", "a2"]);
        assert!(held.take_from("").is_empty());
        assert_eq!(ids(&held.take_all()), ["b1", "ab"]);
        let msg = el("<message from='a@x/res/with/slash'/>");
        assert_eq!(sender_bare(&msg).as_deref(), Some("a@x"));
    }

    #[test]
    fn a_full_buffer_gives_everything_back_with_the_newcomer_last() {
        let mut held = Held::default();
        held.hold(out("<presence id='a' from='a@x/1'/>"), 2);
        held.hold(out("<presence id='b' from='b@x/1'/>"), 2);
        // A known sender still fits.
        assert!(matches!(
            held.hold(out("<presence id='b2' from='b@x/1'/>"), 2),
            Hold::Superseded
        ));
        let Hold::Full(all) = held.hold(out("<presence id='c' from='c@x/1'/>"), 2) else {
            panic!("not full");
        };
        assert_eq!(ids(&all), ["a", "b2", "c"]);
        assert!(held.is_empty());
    }

    #[test]
    fn state_changes_only_on_a_different_indication() {
        let mut s = State::default();
        assert!(!s.is_inactive());
        assert!(!s.set(Indication::Active));
        assert!(s.set(Indication::Inactive));
        assert!(!s.set(Indication::Inactive));
        assert!(s.is_inactive());
        assert!(s.set(Indication::Active));
    }
}
