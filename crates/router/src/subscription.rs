//! The presence subscription state machine (RFC 6121 §3 and Appendix A), with subscription
//! pre-approval (§3.4): pure functions from (state, stanza) to (new state, what the server
//! does), so every row of the RFC's tables is a unit test.
//!
//! The state is always the one of a *local* user's roster item for one contact. "Outbound"
//! means the user sent the stanza to the contact (RFC 6121 A.2); "inbound" means the contact
//! sent it to the user (A.3).
//!
//! A state is stored in the roster item's `subscription` string and `ask` flag (see
//! [`Subscription::to_stored`]): `ask` holds "pending out", the string holds the rest
//! (`none`, `to`, `from`, `both`, with `+in` for "pending in" and `+approved` for a
//! pre-approval). Unknown strings read as `none`, so a corrupt item loses a subscription
//! rather than inventing one.

/// The nine subscription states of RFC 6121 Appendix A.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubState {
    /// Neither side is subscribed and nothing is pending.
    None,
    /// The user asked for the contact's presence; not yet answered ("None + Pending Out").
    NonePendingOut,
    /// The contact asked for the user's presence; not yet answered ("None + Pending In").
    NonePendingIn,
    /// Both asked, neither answered ("None + Pending Out/In").
    NonePendingOutIn,
    /// The user receives the contact's presence.
    To,
    /// "To", and the contact asked for the user's presence.
    ToPendingIn,
    /// The contact receives the user's presence.
    From,
    /// "From", and the user asked for the contact's presence.
    FromPendingOut,
    /// Both receive each other's presence.
    Both,
}

impl SubState {
    /// Every state, in the order of the RFC's tables.
    pub const ALL: [SubState; 9] = [
        SubState::None,
        SubState::NonePendingOut,
        SubState::NonePendingIn,
        SubState::NonePendingOutIn,
        SubState::To,
        SubState::ToPendingIn,
        SubState::From,
        SubState::FromPendingOut,
        SubState::Both,
    ];

    /// The user receives the contact's presence (`to` or `both`).
    pub fn has_to(self) -> bool {
        matches!(self, Self::To | Self::ToPendingIn | Self::Both)
    }

    /// The contact receives the user's presence (`from` or `both`).
    pub fn has_from(self) -> bool {
        matches!(self, Self::From | Self::FromPendingOut | Self::Both)
    }

    /// The user's request to the contact is unanswered (`ask='subscribe'`).
    pub fn pending_out(self) -> bool {
        matches!(
            self,
            Self::NonePendingOut | Self::NonePendingOutIn | Self::FromPendingOut
        )
    }

    /// The contact's request to the user is unanswered.
    pub fn pending_in(self) -> bool {
        matches!(
            self,
            Self::NonePendingIn | Self::NonePendingOutIn | Self::ToPendingIn
        )
    }

    /// The `subscription` attribute of a roster item in this state (RFC 6121 §2.1.2.5).
    pub fn attribute(self) -> &'static str {
        match (self.has_to(), self.has_from()) {
            (true, true) => "both",
            (true, false) => "to",
            (false, true) => "from",
            (false, false) => "none",
        }
    }

    fn from_parts(to: bool, from: bool, out: bool, in_: bool) -> Self {
        match (to, from, out, in_) {
            (true, true, _, _) => Self::Both,
            (true, false, _, true) => Self::ToPendingIn,
            (true, false, _, false) => Self::To,
            (false, true, true, _) => Self::FromPendingOut,
            (false, true, false, _) => Self::From,
            (false, false, true, true) => Self::NonePendingOutIn,
            (false, false, true, false) => Self::NonePendingOut,
            (false, false, false, true) => Self::NonePendingIn,
            (false, false, false, false) => Self::None,
        }
    }
}

/// A roster item's subscription: the state, and whether the user pre-approved the contact's
/// future request (RFC 6121 §3.4). A pre-approval exists only where it can matter: when the
/// contact has no subscription and no pending request (`None`, `None + Pending Out`, `To`);
/// [`Subscription::new`] drops it anywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subscription {
    state: SubState,
    preapproved: bool,
}

impl Subscription {
    /// `none`, nothing pending, not pre-approved.
    pub const NONE: Subscription = Subscription {
        state: SubState::None,
        preapproved: false,
    };

    /// A subscription; `preapproved` is kept only in the states where it can apply.
    pub fn new(state: SubState, preapproved: bool) -> Self {
        let can_preapprove = matches!(
            state,
            SubState::None | SubState::NonePendingOut | SubState::To
        );
        Subscription {
            state,
            preapproved: preapproved && can_preapprove,
        }
    }

    /// The state.
    pub fn state(self) -> SubState {
        self.state
    }

    /// Whether the contact's next request will be approved by the server (§3.4).
    pub fn preapproved(self) -> bool {
        self.preapproved
    }

    /// The stored form: the `subscription` string and the `ask` flag.
    pub fn to_stored(self) -> (String, bool) {
        let mut s = String::from(self.state.attribute());
        if self.state.pending_in() {
            s.push_str("+in");
        }
        if self.preapproved {
            s.push_str("+approved");
        }
        (s, self.state.pending_out())
    }

    /// Reads the stored form back (see the module doc).
    pub fn from_stored(subscription: &str, ask: bool) -> Self {
        let mut parts = subscription.split('+');
        let (to, from) = match parts.next() {
            Some("to") => (true, false),
            Some("from") => (false, true),
            Some("both") => (true, true),
            _ => (false, false),
        };
        let (mut in_, mut approved) = (false, false);
        for flag in parts {
            match flag {
                "in" => in_ = true,
                "approved" => approved = true,
                _ => {}
            }
        }
        Self::new(SubState::from_parts(to, from, ask, in_), approved)
    }
}

/// The four subscription-related presence types (RFC 6121 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubKind {
    /// `subscribe`: a request for the recipient's presence.
    Subscribe,
    /// `subscribed`: approval of a request.
    Subscribed,
    /// `unsubscribe`: the sender no longer wants the recipient's presence.
    Unsubscribe,
    /// `unsubscribed`: denial or cancellation of the recipient's subscription.
    Unsubscribed,
}

impl SubKind {
    /// Every kind.
    pub const ALL: [SubKind; 4] = [
        SubKind::Subscribe,
        SubKind::Subscribed,
        SubKind::Unsubscribe,
        SubKind::Unsubscribed,
    ];

    /// The kind of a presence `type`, if it is subscription-related.
    pub fn parse(type_: &str) -> Option<Self> {
        match type_ {
            "subscribe" => Some(Self::Subscribe),
            "subscribed" => Some(Self::Subscribed),
            "unsubscribe" => Some(Self::Unsubscribe),
            "unsubscribed" => Some(Self::Unsubscribed),
            _ => None,
        }
    }

    /// The `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Subscribed => "subscribed",
            Self::Unsubscribe => "unsubscribe",
            Self::Unsubscribed => "unsubscribed",
        }
    }
}

/// What the user's server does with a stanza the user sent (RFC 6121 A.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// The item's subscription afterwards.
    pub next: Subscription,
    /// Whether the stanza is routed to the contact.
    pub route: bool,
}

/// What the user's server does with a stanza the contact sent (RFC 6121 A.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// The item's subscription afterwards.
    pub next: Subscription,
    /// Whether the stanza is delivered to the user.
    pub deliver: bool,
    /// Whether the server answers the contact with `subscribed` on the user's behalf: the
    /// contact is already subscribed (A.3.1's footnote) or was pre-approved (§3.4).
    pub auto_subscribed: bool,
}

/// Outbound processing (RFC 6121 A.2.1 to A.2.4, and §3.4.2 for pre-approval).
pub fn outbound(current: Subscription, kind: SubKind) -> Outbound {
    use SubState::*;
    let s = current.state;
    let keep = current.preapproved;
    let (state, route, preapproved) = match kind {
        // A.2.1: always routed.
        SubKind::Subscribe => {
            let next = match s {
                None => NonePendingOut,
                NonePendingIn => NonePendingOutIn,
                From => FromPendingOut,
                other => other,
            };
            (next, true, keep)
        }
        // A.2.2: always routed.
        SubKind::Unsubscribe => {
            let next = match s {
                NonePendingOut | To => None,
                NonePendingOutIn | ToPendingIn => NonePendingIn,
                FromPendingOut | Both => From,
                other => other,
            };
            (next, true, keep)
        }
        // A.2.3; where it is not routed and the contact could still ask, it is a
        // pre-approval (§3.4.2).
        SubKind::Subscribed => match s {
            NonePendingIn => (From, true, false),
            NonePendingOutIn => (FromPendingOut, true, false),
            ToPendingIn => (Both, true, false),
            None | NonePendingOut | To => (s, false, true),
            From | FromPendingOut | Both => (s, false, false),
        },
        // A.2.4; it also cancels a pre-approval (§3.4.2).
        SubKind::Unsubscribed => match s {
            NonePendingIn => (None, true, false),
            NonePendingOutIn => (NonePendingOut, true, false),
            ToPendingIn => (To, true, false),
            From => (None, true, false),
            FromPendingOut => (NonePendingOut, true, false),
            Both => (To, true, false),
            None | NonePendingOut | To => (s, false, false),
        },
    };
    Outbound {
        next: Subscription::new(state, preapproved),
        route,
    }
}

/// Inbound processing (RFC 6121 A.3.1 to A.3.4, and §3.4 for pre-approval).
pub fn inbound(current: Subscription, kind: SubKind) -> Inbound {
    use SubState::*;
    let s = current.state;
    let keep = current.preapproved;
    let (state, deliver, auto, preapproved) = match kind {
        // A.3.1.
        SubKind::Subscribe => match s {
            // §3.4: a pre-approved contact is subscribed without asking the user.
            None if keep => (From, false, true, false),
            NonePendingOut if keep => (FromPendingOut, false, true, false),
            To if keep => (Both, false, true, false),
            None => (NonePendingIn, true, false, false),
            NonePendingOut => (NonePendingOutIn, true, false, false),
            To => (ToPendingIn, true, false, false),
            // Already pending: the user has it (or gets it at its next presence).
            NonePendingIn | NonePendingOutIn | ToPendingIn => (s, false, false, false),
            // Already subscribed: the server answers for the user.
            From | FromPendingOut | Both => (s, false, true, false),
        },
        // A.3.2.
        SubKind::Unsubscribe => match s {
            NonePendingIn => (None, true, false, keep),
            NonePendingOutIn => (NonePendingOut, true, false, keep),
            ToPendingIn => (To, true, false, keep),
            From => (None, true, false, keep),
            FromPendingOut => (NonePendingOut, true, false, keep),
            Both => (To, true, false, keep),
            None | NonePendingOut | To => (s, false, false, keep),
        },
        // A.3.3.
        SubKind::Subscribed => match s {
            NonePendingOut => (To, true, false, keep),
            NonePendingOutIn => (ToPendingIn, true, false, keep),
            FromPendingOut => (Both, true, false, keep),
            other => (other, false, false, keep),
        },
        // A.3.4.
        SubKind::Unsubscribed => match s {
            NonePendingOut | To => (None, true, false, keep),
            NonePendingOutIn | ToPendingIn => (NonePendingIn, true, false, keep),
            FromPendingOut | Both => (From, true, false, keep),
            other => (other, false, false, keep),
        },
    };
    Inbound {
        next: Subscription::new(state, preapproved),
        deliver,
        auto_subscribed: auto,
    }
}

#[cfg(test)]
mod tests {
    use super::SubKind::*;
    use super::SubState::*;
    use super::*;

    /// `None` in a row's "new state" column: "no state change".
    type Row = (SubState, bool, Option<SubState>);

    fn check_outbound(kind: SubKind, table: &[Row]) {
        assert_eq!(table.len(), 9, "every state has a row");
        for &(state, route, next) in table {
            let got = outbound(Subscription::new(state, false), kind);
            let want = next.unwrap_or(state);
            assert_eq!(
                (got.route, got.next.state()),
                (route, want),
                "outbound {kind:?} in {state:?}"
            );
            // A pre-approval is never created by anything but `subscribed`.
            if kind != Subscribed {
                assert!(!got.next.preapproved(), "outbound {kind:?} in {state:?}");
            }
        }
    }

    fn check_inbound(kind: SubKind, table: &[(SubState, bool, Option<SubState>, bool)]) {
        assert_eq!(table.len(), 9, "every state has a row");
        for &(state, deliver, next, auto) in table {
            let got = inbound(Subscription::new(state, false), kind);
            let want = next.unwrap_or(state);
            assert_eq!(
                (got.deliver, got.next.state(), got.auto_subscribed),
                (deliver, want, auto),
                "inbound {kind:?} in {state:?}"
            );
            assert!(!got.next.preapproved());
        }
    }

    /// RFC 6121 A.2.1: outbound `subscribe`.
    #[test]
    fn a_2_1_outbound_subscribe() {
        check_outbound(
            Subscribe,
            &[
                (None, true, Some(NonePendingOut)),
                (NonePendingOut, true, Option::None),
                (NonePendingIn, true, Some(NonePendingOutIn)),
                (NonePendingOutIn, true, Option::None),
                (To, true, Option::None),
                (ToPendingIn, true, Option::None),
                (From, true, Some(FromPendingOut)),
                (FromPendingOut, true, Option::None),
                (Both, true, Option::None),
            ],
        );
    }

    /// RFC 6121 A.2.2: outbound `unsubscribe`.
    #[test]
    fn a_2_2_outbound_unsubscribe() {
        check_outbound(
            Unsubscribe,
            &[
                (None, true, Option::None),
                (NonePendingOut, true, Some(None)),
                (NonePendingIn, true, Option::None),
                (NonePendingOutIn, true, Some(NonePendingIn)),
                (To, true, Some(None)),
                (ToPendingIn, true, Some(NonePendingIn)),
                (From, true, Option::None),
                (FromPendingOut, true, Some(From)),
                (Both, true, Some(From)),
            ],
        );
    }

    /// RFC 6121 A.2.3: outbound `subscribed`.
    #[test]
    fn a_2_3_outbound_subscribed() {
        check_outbound(
            Subscribed,
            &[
                (None, false, Option::None),
                (NonePendingOut, false, Option::None),
                (NonePendingIn, true, Some(From)),
                (NonePendingOutIn, true, Some(FromPendingOut)),
                (To, false, Option::None),
                (ToPendingIn, true, Some(Both)),
                (From, false, Option::None),
                (FromPendingOut, false, Option::None),
                (Both, false, Option::None),
            ],
        );
    }

    /// RFC 6121 A.2.4: outbound `unsubscribed`.
    #[test]
    fn a_2_4_outbound_unsubscribed() {
        check_outbound(
            Unsubscribed,
            &[
                (None, false, Option::None),
                (NonePendingOut, false, Option::None),
                (NonePendingIn, true, Some(None)),
                (NonePendingOutIn, true, Some(NonePendingOut)),
                (To, false, Option::None),
                (ToPendingIn, true, Some(To)),
                (From, true, Some(None)),
                (FromPendingOut, true, Some(NonePendingOut)),
                (Both, true, Some(To)),
            ],
        );
    }

    /// RFC 6121 A.3.1: inbound `subscribe` (last column: the server answers `subscribed`
    /// for an already subscribed contact).
    #[test]
    fn a_3_1_inbound_subscribe() {
        check_inbound(
            Subscribe,
            &[
                (None, true, Some(NonePendingIn), false),
                (NonePendingOut, true, Some(NonePendingOutIn), false),
                (NonePendingIn, false, Option::None, false),
                (NonePendingOutIn, false, Option::None, false),
                (To, true, Some(ToPendingIn), false),
                (ToPendingIn, false, Option::None, false),
                (From, false, Option::None, true),
                (FromPendingOut, false, Option::None, true),
                (Both, false, Option::None, true),
            ],
        );
    }

    /// RFC 6121 A.3.2: inbound `unsubscribe`.
    #[test]
    fn a_3_2_inbound_unsubscribe() {
        check_inbound(
            Unsubscribe,
            &[
                (None, false, Option::None, false),
                (NonePendingOut, false, Option::None, false),
                (NonePendingIn, true, Some(None), false),
                (NonePendingOutIn, true, Some(NonePendingOut), false),
                (To, false, Option::None, false),
                (ToPendingIn, true, Some(To), false),
                (From, true, Some(None), false),
                (FromPendingOut, true, Some(NonePendingOut), false),
                (Both, true, Some(To), false),
            ],
        );
    }

    /// RFC 6121 A.3.3: inbound `subscribed`.
    #[test]
    fn a_3_3_inbound_subscribed() {
        check_inbound(
            Subscribed,
            &[
                (None, false, Option::None, false),
                (NonePendingOut, true, Some(To), false),
                (NonePendingIn, false, Option::None, false),
                (NonePendingOutIn, true, Some(ToPendingIn), false),
                (To, false, Option::None, false),
                (ToPendingIn, false, Option::None, false),
                (From, false, Option::None, false),
                (FromPendingOut, true, Some(Both), false),
                (Both, false, Option::None, false),
            ],
        );
    }

    /// RFC 6121 A.3.4: inbound `unsubscribed`.
    #[test]
    fn a_3_4_inbound_unsubscribed() {
        check_inbound(
            Unsubscribed,
            &[
                (None, false, Option::None, false),
                (NonePendingOut, true, Some(None), false),
                (NonePendingIn, false, Option::None, false),
                (NonePendingOutIn, true, Some(NonePendingIn), false),
                (To, true, Some(None), false),
                (ToPendingIn, true, Some(NonePendingIn), false),
                (From, false, Option::None, false),
                (FromPendingOut, true, Some(From), false),
                (Both, true, Some(From), false),
            ],
        );
    }

    /// §3.4: outbound `subscribed` where the contact has not asked records a pre-approval
    /// (not routed); the contact's later request is approved by the server and not shown
    /// to the user; `unsubscribed` cancels a pre-approval.
    #[test]
    fn pre_approval_rows() {
        for (state, approved_state) in [(None, From), (NonePendingOut, FromPendingOut), (To, Both)]
        {
            let pre = outbound(Subscription::new(state, false), Subscribed);
            assert!(!pre.route && pre.next.preapproved(), "{state:?}");
            assert_eq!(pre.next.state(), state);
            let req = inbound(pre.next, Subscribe);
            assert_eq!(
                (req.deliver, req.auto_subscribed, req.next.state()),
                (false, true, approved_state),
                "{state:?}"
            );
            assert!(!req.next.preapproved(), "a pre-approval is used once");
            let cancel = outbound(pre.next, Unsubscribed);
            assert!(!cancel.route && !cancel.next.preapproved(), "{state:?}");
            assert_eq!(cancel.next.state(), state);
        }
        // A pre-approval survives the user's own outbound subscribe/unsubscribe and the
        // contact's answers about the user's subscription.
        let pre = Subscription::new(None, true);
        let asked = outbound(pre, Subscribe).next;
        assert_eq!((asked.state(), asked.preapproved()), (NonePendingOut, true));
        let answered = inbound(asked, Subscribed).next;
        assert_eq!((answered.state(), answered.preapproved()), (To, true));
        let dropped = inbound(answered, Unsubscribed).next;
        assert_eq!((dropped.state(), dropped.preapproved()), (None, true));
        // Where the contact is subscribed or asking, a pre-approval cannot exist.
        for state in [
            NonePendingIn,
            NonePendingOutIn,
            ToPendingIn,
            From,
            FromPendingOut,
            Both,
        ] {
            assert!(!Subscription::new(state, true).preapproved(), "{state:?}");
        }
    }

    #[test]
    fn stored_form_round_trips_every_state() {
        for state in SubState::ALL {
            for pre in [false, true] {
                let sub = Subscription::new(state, pre);
                let (s, ask) = sub.to_stored();
                assert_eq!(Subscription::from_stored(&s, ask), sub, "{s} {ask}");
                assert_eq!(ask, state.pending_out());
                assert!(s.starts_with(state.attribute()));
            }
        }
        assert_eq!(
            Subscription::from_stored("garbage", false),
            Subscription::NONE
        );
        assert_eq!(
            Subscription::from_stored("both", false).state().attribute(),
            "both"
        );
    }

    #[test]
    fn attributes_and_flags() {
        let attr: Vec<_> = SubState::ALL.iter().map(|s| s.attribute()).collect();
        assert_eq!(
            attr,
            [
                "none", "none", "none", "none", "to", "to", "from", "from", "both"
            ]
        );
        for kind in SubKind::ALL {
            assert_eq!(SubKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(SubKind::parse("probe"), Option::None);
    }
}
