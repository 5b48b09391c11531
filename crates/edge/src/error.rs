//! The edge's errors at its boundary with the binary.

use std::net::SocketAddr;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// No domain to serve.
    #[error("no domain configured")]
    NoDomains,
    /// A configured domain is not a valid domainpart (RFC 7622 §3.2).
    #[error("invalid domain {0:?}")]
    InvalidDomain(String),
    /// [`crate::Edge::bind`] was called twice.
    #[error("the edge is already bound")]
    AlreadyBound,
}
