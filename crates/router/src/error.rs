//! The router's error type at its boundary (construction). Once running, the router turns
//! every failure into a stanza error for the sender or a counted drop, never a returned error.

use starling_xmpp::JidError;

/// Why a router could not be built from its settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// No domain to serve.
    #[error("the router serves no domain")]
    NoDomains,
    /// A configured domain is not a valid JID domainpart (RFC 7622 §3.2).
    #[error("invalid served domain {domain:?}: {source}")]
    InvalidDomain {
        /// The domain as configured.
        domain: String,
        /// Why it is not a domain.
        source: JidError,
    },
    /// `workers` is 0.
    #[error("the router needs at least one worker")]
    NoWorkers,
    /// `queue_per_worker` is 0.
    #[error("worker queues need room for at least one message")]
    EmptyQueue,
}
