//! The router role of Starling: everything a server does with a stanza once an edge has
//! framed it and stamped its sender. It decides where each stanza goes (RFC 6120 §10,
//! RFC 6121 §8), answers what is addressed to the server through its [`modules`], and sends
//! errors back for what cannot be delivered.
//!
//! On the stanza path it is the middle hop: edge → [`RouterLink`] → **router** →
//! [`EdgeLink`] → edge. The edge sends through [`Router::link`]; the router finds sessions
//! only in the [`SessionRegistry`] and reaches them only through [`Edges`], so the same code
//! runs when sessions live on other nodes.
//!
//! **Invariant:** a user's stanzas pass one router worker, in order (RFC 6120 §10.1): the
//! link shards by the bare JID of the sender.
//!
//! Instant messaging and presence (RFC 6121) live in `im` (broadcast, probes, directed
//! presence, roster pushes, offline messages, carbons and blocking checks) over the pure
//! subscription state machine of [`subscription`]; the IQ sides are [`modules`]. Sessions
//! the registry removes in bulk (an edge's lease expired) are queued on their users' workers
//! and end like any other (see `router`). The server's entity capabilities (XEP-0115) are
//! computed by [`caps`] from the modules, for the edge's `<c/>` stream feature.
//!
//! It must never build a DOM on the routing path (only the payload of a server-addressed
//! IQ is read, by [`payload`]), never touch a connection, never answer an error with an
//! error, and never lose a stanza silently: every stanza ends as delivered, handled, an
//! error to its sender, or a counted drop the RFCs ask for.
//!
//! [`RouterLink`]: starling_cluster::RouterLink
//! [`EdgeLink`]: starling_cluster::EdgeLink
//! [`SessionRegistry`]: starling_registry::SessionRegistry
//! [`Edges`]: starling_cluster::Edges

#![forbid(unsafe_code)]

pub mod caps;
mod error;
mod im;
pub mod metrics;
pub mod modules;
pub mod payload;
mod router;
mod routing;
mod select;
mod settings;
mod stanza;
pub mod subscription;

#[cfg(test)]
mod tests;

pub use error::RouterError;
pub use router::{Router, RouterDeps};
pub use settings::Settings;
pub use stanza::{IqType, MessageType};
