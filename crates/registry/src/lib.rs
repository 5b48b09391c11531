//! The session and presence registry: which full JID is bound on which edge, with which
//! stream, priority, last available presence and stream-management resumption id, and which
//! edges and routers are alive (leases).
//!
//! Edges write to it when a resource is bound, changes presence or goes away; routers read
//! it to decide where a stanza goes, and learn from [`SessionRegistry::node_removals`] of the
//! sessions it removed in bulk when their edge went away ([`NodeRemoved`]), so they can
//! broadcast unavailable presence for them. Everything goes through the [`SessionRegistry`] trait,
//! so the same edge and router code runs over the in-process [`LocalRegistry`] of
//! `starling serve` and over the Raft-replicated, sharded registry of a cluster
//! ([`RegistryClient`] talking to [`node::RegistryNode`]s).
//!
//! It must never hold stanzas or rosters, and never be on the path of a message: a lookup
//! answers "where", nothing more.
//!
//! Map of the replicated registry (see `proto/registry.proto` for the wire API):
//! - [`shard`]: the stable hash of a bare JID to its shard (one Raft group per shard);
//! - `state`: the deterministic state machine of one shard (sessions, leases), and the
//!   frozen views snapshots are encoded from;
//! - `accounts`: its copy-on-write accounts map, so a snapshot never stops `apply`;
//! - `codec`: openraft 0.9 types and their protobuf form;
//! - `storage`: the redb log with group commit, vote, committed pointer;
//! - `snapshots`: one snapshot file per shard, written outside the log's writer;
//! - `machine`: openraft's state machine around `state`, with the watch channel;
//! - `network` / `server`: the Raft transport and the client API over tonic;
//! - `proposer`: server-side batching of concurrent writes into one entry;
//! - `rebalance`: preferred leaders and the hand-over that spreads leaders over the nodes;
//! - [`node`]: a registry node (all shards, bootstrap, leases) and [`node::run`];
//! - [`client`]: the client used by edges and routers.

mod accounts;
pub mod client;
mod codec;
mod local;
mod machine;
mod network;
pub mod node;
mod proposer;
mod rebalance;
mod server;
pub mod shard;
mod snapshots;
mod state;
mod storage;

/// The generated protobuf and gRPC types of `proto/registry.proto`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("starling.registry.v1");
}

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use starling_xmpp::{BareJid, FullJid};

pub use client::{ClientConfig, ReadMode, RegistryClient};
pub use codec::{CodecError, MemberId};
pub use local::LocalRegistry;
pub use node::{NodeConfig, NodeError, RegistryNode};

/// The name of a node of the cluster (an edge, a router, a registry member).
pub type NodeId = Arc<str>;

/// One bound resource: what the registry knows of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The bound full JID.
    pub jid: FullJid,
    /// The edge holding the connection.
    pub node: NodeId,
    /// The id of the stream the resource is bound on; with `jid` it names one session, so
    /// a late unbind of a replaced session cannot remove its successor.
    pub stream_id: Arc<str>,
    /// The priority of the last available presence (RFC 6121 §4.7.2.3), 0 before any.
    pub priority: i8,
    /// The last available presence broadcast by the resource, `None` while it has sent no
    /// initial presence or after it went unavailable (RFC 6121 §4.2, §4.5).
    pub presence: Option<Bytes>,
    /// The XEP-0198 resumption id of the session, `None` while resumption is not enabled.
    pub resumption: Option<Arc<str>>,
}

impl SessionRecord {
    /// A freshly bound resource that has not sent presence yet.
    pub fn new(jid: FullJid, node: NodeId, stream_id: Arc<str>) -> Self {
        SessionRecord {
            jid,
            node,
            stream_id,
            priority: 0,
            presence: None,
            resumption: None,
        }
    }

    /// Whether the resource is available (has sent available presence).
    pub fn is_available(&self) -> bool {
        self.presence.is_some()
    }
}

/// Sessions the registry removed together because the node holding them went away: its lease
/// expired, or [`SessionRegistry::remove_node`] was called. Routers broadcast unavailable
/// presence for each of them (RFC 6121 §4.5.2), as for a session that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRemoved {
    /// The node that went away.
    pub node: NodeId,
    /// The sessions it held, as they were recorded.
    pub sessions: Vec<SessionRecord>,
}

/// How many [`NodeRemoved`] events a subscriber may fall behind before it misses the oldest
/// (`broadcast::error::RecvError::Lagged` tells it how many).
pub const NODE_REMOVALS_BUFFER: usize = 64;

/// What a bind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindOutcome {
    /// The resource was free.
    Bound,
    /// The resource was bound by another session, which the new one replaced (RFC 6120
    /// §7.7.2.2: the new session wins); the caller must close the old one with `<conflict/>`.
    Replaced(SessionRecord),
}

/// A registry failure. Callers answer stanzas that depend on it with
/// `internal-server-error` (or `wait` conditions once retries are exhausted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or did not answer in time.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// Too many sessions for one account or one node.
    #[error("session limit reached")]
    LimitReached,
}

/// The registry as edges and routers use it.
#[async_trait]
pub trait SessionRegistry: Send + Sync + 'static {
    /// Records a bound resource. A session already bound to the same full JID is replaced
    /// and returned; more than `max_per_account` resources of one account fail with
    /// [`RegistryError::LimitReached`].
    async fn bind(&self, record: SessionRecord) -> Result<BindOutcome, RegistryError>;

    /// Removes the session of `jid` if it is still the one on `stream_id`; returns whether
    /// something was removed.
    async fn unbind(&self, jid: &FullJid, stream_id: &str) -> Result<bool, RegistryError>;

    /// Records the presence of a bound session: `Some` for available (with its priority),
    /// `None` for unavailable. Ignored if the session is no longer the one on `stream_id`.
    async fn set_presence(
        &self,
        jid: &FullJid,
        stream_id: &str,
        priority: i8,
        presence: Option<Bytes>,
    ) -> Result<(), RegistryError>;

    /// The session bound to a full JID.
    async fn session(&self, jid: &FullJid) -> Result<Option<SessionRecord>, RegistryError>;

    /// Every session of an account.
    async fn sessions(&self, bare: &BareJid) -> Result<Vec<SessionRecord>, RegistryError>;

    /// Removes every session held by a node (its lease expired, or it shut down) and returns
    /// them, so routers can broadcast unavailable presence on their behalf.
    async fn remove_node(&self, node: &str) -> Result<Vec<SessionRecord>, RegistryError>;

    /// How many sessions are registered, for metrics and admin.
    async fn count(&self) -> Result<usize, RegistryError>;

    /// Records (or clears, with `None`) the XEP-0198 resumption id of a bound session.
    /// Ignored if the session is no longer the one on `stream_id`; returns whether it matched.
    async fn set_resumption(
        &self,
        jid: &FullJid,
        stream_id: &str,
        resumption: Option<Arc<str>>,
    ) -> Result<bool, RegistryError>;

    /// The session of an account holding a resumption id (XEP-0198 §5: the resuming client
    /// has authenticated, so its bare JID is known).
    async fn session_by_resumption(
        &self,
        bare: &BareJid,
        id: &str,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        Ok(self
            .sessions(bare)
            .await?
            .into_iter()
            .find(|s| s.resumption.as_deref() == Some(id)))
    }

    /// Subscribes to the bulk removals ([`NodeRemoved`]) made from now on. `None` when this
    /// registry cannot report them (a [`RegistryClient`] in [`ReadMode::Linearizable`] runs
    /// no watch stream to learn of lease expiries).
    fn node_removals(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<NodeRemoved>>> {
        None
    }

    /// Renews the lease of `node` (an edge or router) for `ttl`. When a lease expires, the
    /// registry removes the node's sessions. A registry without leases (the in-process one,
    /// whose sessions die with the process) accepts and ignores it.
    async fn heartbeat(&self, node: &str, ttl: std::time::Duration) -> Result<(), RegistryError> {
        let _ = (node, ttl);
        Ok(())
    }
}
