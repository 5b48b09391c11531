//! The values the store keeps.

/// A local user: `(domain, localpart)`, both already normalised by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BareUser {
    domain: String,
    localpart: String,
}

impl BareUser {
    /// The user `localpart@domain`. Arguments are in key order: domain first.
    pub fn new(domain: impl Into<String>, localpart: impl Into<String>) -> Self {
        BareUser {
            domain: domain.into(),
            localpart: localpart.into(),
        }
    }

    /// The domain part.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The local part.
    pub fn localpart(&self) -> &str {
        &self.localpart
    }
}

impl std::fmt::Display for BareUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.localpart, self.domain)
    }
}

/// One roster entry (RFC 6121 §2.1.2), stored as an opaque record keyed by `jid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterItem {
    /// The contact's bare JID, normalised by the caller; the item's key.
    pub jid: String,
    /// The user's handle for the contact.
    pub name: Option<String>,
    /// `none`, `to`, `from` or `both` (the router owns the state machine).
    pub subscription: String,
    /// Whether a subscription request is pending (`ask='subscribe'`).
    pub ask: bool,
    /// Group names.
    pub groups: Vec<String>,
}

/// The last unavailable presence an account broadcast (RFC 6121 §4.3.2), kept to answer
/// presence probes while it has no available resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastPresence {
    /// The presence stanza as broadcast (with its `from`), serialised.
    pub stanza: bytes::Bytes,
    /// When the server received it, in milliseconds since the Unix epoch (for the XEP-0203
    /// `<delay/>` of the probe answer).
    pub stamp_ms: u64,
}

/// A user's whole roster with its version (XEP-0237 roster versioning).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Roster {
    /// Increases with every change to the roster; 0 for a roster never written.
    pub version: u64,
    /// The items, ordered by `jid`.
    pub items: Vec<RosterItem>,
}
