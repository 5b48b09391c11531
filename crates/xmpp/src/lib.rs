//! The XMPP protocol model: addresses, namespaces, and the errors the protocol defines.
//!
//! This crate names what RFC 6120, RFC 6121 and RFC 7622 define, so that every other crate
//! speaks of a JID, a namespace or an error condition in one way:
//!
//! - [`jid`]: parsing and normalising JIDs (RFC 7622) with a server-side error that maps to the
//!   `jid-malformed` stanza error, on top of the `jid` crate, with fixes for the points where
//!   that crate departs from the RFC;
//! - [`ns`]: the namespace names Starling reads and writes;
//! - [`error`]: stream errors (RFC 6120 §4.9), stanza errors (§8.3) and SASL failures (§6.5),
//!   as enums with their wire names, and writers that append their XML to a byte buffer.
//!
//! It must never do I/O, hold state, or build a DOM on the hot path: the values here are small,
//! parsing works on the `&str` of an attribute, and writers append to a caller's `Vec<u8>`.
//!
//! On the stanza path it sits just above the XML layer (`starling-xml`): the **edge** uses it to
//! check the `to`/`from` of each stanza it frames and to write stream errors and SASL failures;
//! the **router** uses it to address stanzas and to answer with stanza errors. Neither role has
//! its own notion of a JID or an error condition.

pub mod error;
pub mod jid;
pub mod ns;

pub use crate::error::{
    SaslFailure, SaslFailureCondition, StanzaError, StanzaErrorCondition, StanzaErrorType,
    StreamError, StreamErrorCondition, UnknownCondition,
};
pub use crate::jid::{BareJid, FullJid, Jid, JidError};
