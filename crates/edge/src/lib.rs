//! The edge role of Starling: it holds client connections and turns them into sessions.
//!
//! What it does: listeners (STARTTLS on 5222-style ports, direct TLS with ALPN `xmpp-client`
//! on 5223-style ports), TLS, XML framing, stream negotiation (STARTTLS, SASL, in-band
//! registration before authentication, resource binding), per-connection limits (byte rate,
//! stanza size, connections per address, pre-authentication and idle timeouts), whitespace
//! keepalives, and writing the stanzas the router delivers to the right connections.
//!
//! What it must never do: know about rosters, presence subscriptions or any server feature,
//! or reach into router state. Stanzas from bound sessions go out through
//! `Arc<dyn RouterLink>` as [`starling_cluster::ToRouter`] messages; deliveries come in
//! through the [`starling_cluster::EdgeLink`] the edge implements ([`Edge::link`]). It never
//! holds a buffer for an idle connection (TLS runs on rustls's unbuffered API and borrows
//! record buffers from a bounded pool only while bytes flow), and never drops a stanza
//! silently: what it cannot deliver goes back to the router as `Undeliverable`.
//!
//! Where it sits on the stanza path: first and last. Client bytes → framer → negotiation
//! machine → `from` stamped → router; router → session table → outbound queue → `to`
//! stamped per recipient while writing → client.
//!
//! ```text
//! Edge::new(settings, deps) ──bind()──► BoundEdge ──serve(cancel)──► runs until cancelled
//!        └─ link() → Arc<dyn EdgeLink> for the router
//! ```
//!
//! Modules: `machine` (the sans-IO negotiation state machine, RFC 6120 §4–§8, XEP-0077,
//! XEP-0440), `connection` (one task per connection: I/O, timers, limits, RFC 6120 §4.6),
//! `session` (the session table and the `EdgeLink`), `sm` (XEP-0198 counters, unacked
//! queue, [`ResumptionState`]), `csi` (XEP-0352: presence held while the client is
//! inactive), `limits` (RFC 6120 §13.12), `server`
//! (listeners, accept loop, graceful shutdown), [`tls`] (certificates, SNI, ALPN, reload,
//! the TLS stream and its buffer pool, channel binding; XEP-0368, RFC 9266, RFC 5929).

#![forbid(unsafe_code)]

mod connection;
mod csi;
mod error;
mod limits;
mod machine;
mod metrics;
mod server;
mod session;
mod settings;
mod sm;
pub mod tls;
mod xmlread;

#[cfg(test)]
mod tests;

pub use error::EdgeError;
pub use server::{BoundEdge, Edge, EdgeDeps};
pub use settings::{AuthSettings, RegistrationMode, RegistrationSettings, ServerCaps, Settings};
pub use sm::{DecodeError, Outbound, ResumptionState};
