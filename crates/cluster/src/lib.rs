//! The links between Starling's roles: what an edge tells a router, what a router tells an
//! edge, and the traits both sides talk through.
//!
//! In `starling serve` the links are in-process calls and channels; in a cluster the same
//! traits are implemented over gRPC streams. Edge and router code only ever see the traits,
//! so one code path is tested both ways.
//!
//! **Invariant:** the edge never reaches into router state and the router never touches a
//! connection: everything between them is a [`ToRouter`] or a [`ToEdge`] message.
//!
//! On the stanza path this is the hop in the middle: edge → [`RouterLink`] → router →
//! [`EdgeLink`] → edge. Messages carry stanzas as [`Element`]s (raw bytes plus envelope),
//! never as trees, and a delivery to several recipients on one edge carries the payload once.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use starling_registry::NodeId;
use starling_xml::Element;
use starling_xmpp::{FullJid, StreamErrorCondition};

/// Why a session ended, as the router needs to know it (RFC 6121 §4.5.2: unavailable
/// presence is broadcast whatever the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client closed its stream.
    Closed,
    /// The connection dropped without a stream close.
    ConnectionLost,
    /// The session timed out.
    Timeout,
    /// A new session bound the same resource.
    Replaced,
    /// The server closed the stream with an error.
    StreamError(StreamErrorCondition),
    /// The server is shutting down.
    Shutdown,
}

/// From an edge to a router.
#[derive(Debug, Clone)]
pub enum ToRouter {
    /// A stanza sent by a bound session. Its `from` already holds the session's full JID.
    Stanza {
        /// The session that sent it.
        from: FullJid,
        /// The stanza, `from` stamped.
        stanza: Element,
    },
    /// A resource was bound (and recorded in the registry).
    SessionStarted {
        /// The bound full JID.
        jid: FullJid,
    },
    /// A session ended; the registry no longer lists it.
    SessionEnded {
        /// The full JID it had.
        jid: FullJid,
        /// Why it ended.
        reason: EndReason,
    },
    /// A delivery the router asked for found no such session on the edge: the router
    /// applies the fallback (RFC 6120 §10.5.4 and RFC 6121 §8.5).
    Undeliverable {
        /// The recipient that was not there.
        recipient: FullJid,
        /// The stanza, as the router sent it.
        stanza: Element,
    },
}

/// From a router to an edge.
#[derive(Debug, Clone)]
pub enum ToEdge {
    /// Write a stanza to sessions on this edge.
    Deliver {
        /// The sessions to write it to.
        recipients: Vec<FullJid>,
        /// The stanza; `from` is already set.
        stanza: Element,
        /// Whether the edge stamps each recipient's full JID into `to` as it writes (for a
        /// broadcast, where the payload travels once for many recipients); otherwise the
        /// stanza is written as it is.
        stamp_to: bool,
    },
    /// Close a session's stream with a stream error (e.g. `conflict`, `not-authorized`
    /// after account removal).
    Close {
        /// The session.
        jid: FullJid,
        /// The condition to close with.
        condition: StreamErrorCondition,
    },
}

/// A link failure: the peer is gone or overloaded. The sender treats the message as not
/// delivered and applies the fallback for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The other side is not there (shut down, or never connected).
    #[error("link closed")]
    Closed,
    /// The other side did not accept the message in time.
    #[error("link overloaded")]
    Overloaded,
}

/// How an edge reaches the router responsible for a stanza's sender.
#[async_trait]
pub trait RouterLink: Send + Sync + 'static {
    /// Sends a message; waits while the router applies backpressure.
    async fn send(&self, msg: ToRouter) -> Result<(), LinkError>;
}

/// How a router reaches one edge.
#[async_trait]
pub trait EdgeLink: Send + Sync + 'static {
    /// Sends a message; waits while the edge applies backpressure.
    async fn send(&self, msg: ToEdge) -> Result<(), LinkError>;
}

/// The edges a router knows, by node name.
#[derive(Default)]
pub struct Edges {
    links: RwLock<HashMap<NodeId, Arc<dyn EdgeLink>>>,
}

impl std::fmt::Debug for Edges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edges")
            .field("nodes", &self.links.read().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Edges {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the link to an edge.
    pub fn insert(&self, node: NodeId, link: Arc<dyn EdgeLink>) {
        self.links.write().insert(node, link);
    }

    /// Forgets an edge.
    pub fn remove(&self, node: &str) {
        self.links.write().remove(node);
    }

    /// The link to an edge, if it is known.
    pub fn get(&self, node: &str) -> Option<Arc<dyn EdgeLink>> {
        self.links.read().get(node).cloned()
    }
}

/// A link that is a bounded in-process channel: the receiver side is whatever task serves
/// the messages. Used in tests and wherever a role wants a queue in front of it.
pub struct ChannelLink<T> {
    tx: tokio::sync::mpsc::Sender<T>,
}

impl<T> std::fmt::Debug for ChannelLink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelLink")
            .field("capacity", &self.tx.max_capacity())
            .finish()
    }
}

/// A channel link with room for `capacity` messages, and its receiving end.
pub fn channel_link<T>(capacity: usize) -> (ChannelLink<T>, tokio::sync::mpsc::Receiver<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (ChannelLink { tx }, rx)
}

#[async_trait]
impl RouterLink for ChannelLink<ToRouter> {
    async fn send(&self, msg: ToRouter) -> Result<(), LinkError> {
        self.tx.send(msg).await.map_err(|_| LinkError::Closed)
    }
}

#[async_trait]
impl EdgeLink for ChannelLink<ToEdge> {
    async fn send(&self, msg: ToEdge) -> Result<(), LinkError> {
        self.tx.send(msg).await.map_err(|_| LinkError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn edges_directory_and_channel_links() {
        let (link, mut rx) = channel_link::<ToEdge>(4);
        let edges = Edges::new();
        edges.insert(Arc::from("edge-1"), Arc::new(link));
        let jid = starling_xmpp::jid::parse_full("a@b/c").unwrap();
        let stanza =
            Element::parse(bytes::Bytes::from_static(b"<message/>"), "jabber:client").unwrap();
        let to = edges.get("edge-1").unwrap();
        to.send(ToEdge::Deliver {
            recipients: vec![jid.clone()],
            stanza,
            stamp_to: true,
        })
        .await
        .unwrap();
        let Some(ToEdge::Deliver { recipients, .. }) = rx.recv().await else {
            panic!()
        };
        assert_eq!(recipients, vec![jid]);
        assert!(edges.get("edge-2").is_none());
        drop(rx);
        let err = to
            .send(ToEdge::Close {
                jid: starling_xmpp::jid::parse_full("a@b/c").unwrap(),
                condition: StreamErrorCondition::Conflict,
            })
            .await;
        assert_eq!(err, Err(LinkError::Closed));
        edges.remove("edge-1");
        assert!(edges.get("edge-1").is_none());
    }
}
