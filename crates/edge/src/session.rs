//! The session table (full JID → the connection holding it) and the edge's side of the
//! router link: [`ToEdge`] messages are turned into writes on connections.
//!
//! Each bound connection owns a [`SessionHandle`]: a small bounded outbound queue that holds no
//! allocation while empty, a close request, and a [`Notify`] that wakes the connection's task.
//! The router never waits on a client: pushing is a lock and a `VecDeque` append. A queue that
//! is full means the client does not read; that session is closed with `policy-violation`
//! (RFC 6120 §4.9.3.14) and the stanza goes back to the router as
//! [`ToRouter::Undeliverable`], so nothing is dropped silently.
//!
//! **Invariant:** a table entry is removed only by the connection that inserted it (compared
//! by pointer), so a replaced session's late cleanup cannot remove its successor.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use starling_cluster::{EdgeLink, EndReason, LinkError, ToEdge, ToRouter};
use starling_xml::Element;
use starling_xmpp::{FullJid, StreamErrorCondition};
use tokio::sync::{Notify, mpsc};

use crate::metrics;

/// A stanza waiting to be written to one session.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// The stanza as the router sent it.
    pub(crate) stanza: Element,
    /// Whether `to` is set to the session's full JID while writing.
    pub(crate) stamp_to: bool,
}

/// Why and how a session must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseRequest {
    /// The stream error to send.
    pub(crate) condition: StreamErrorCondition,
    /// What to tell the router.
    pub(crate) reason: EndReason,
}

#[derive(Debug, Default)]
struct Outbox {
    queue: VecDeque<Outbound>,
    close: Option<CloseRequest>,
}

/// The part of a bound connection that others may touch.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    /// The stream the resource is bound on.
    pub(crate) stream_id: Arc<str>,
    outbox: Mutex<Outbox>,
    notify: Notify,
}

/// Why a push did not queue the stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue is at its limit; the session is now closing.
    Full,
    /// The session is already closing.
    Closing,
}

impl SessionHandle {
    pub(crate) fn new(stream_id: Arc<str>) -> Self {
        SessionHandle {
            stream_id,
            outbox: Mutex::new(Outbox::default()),
            notify: Notify::new(),
        }
    }

    /// Queues a stanza, or refuses it; a full queue closes the session with
    /// `policy-violation`.
    pub(crate) fn push(&self, item: Outbound, limit: usize) -> Result<(), PushError> {
        let mut outbox = self.outbox.lock();
        if outbox.close.is_some() {
            return Err(PushError::Closing);
        }
        if outbox.queue.len() >= limit {
            outbox.close = Some(CloseRequest {
                condition: StreamErrorCondition::PolicyViolation,
                reason: EndReason::StreamError(StreamErrorCondition::PolicyViolation),
            });
            drop(outbox);
            metrics::limit_violation("outbound_queue");
            tracing::info!(
                stream_id = %self.stream_id,
                limit,
                "outbound queue full: closing the session"
            );
            self.notify.notify_one();
            return Err(PushError::Full);
        }
        outbox.queue.push_back(item);
        drop(outbox);
        self.notify.notify_one();
        Ok(())
    }

    /// Asks the connection to close (the first request wins).
    pub(crate) fn close(&self, condition: StreamErrorCondition, reason: EndReason) {
        let mut outbox = self.outbox.lock();
        if outbox.close.is_none() {
            outbox.close = Some(CloseRequest { condition, reason });
        }
        drop(outbox);
        self.notify.notify_one();
    }

    /// Takes everything queued, and the close request if there is one. The queue left behind
    /// holds no allocation.
    pub(crate) fn take(&self) -> (VecDeque<Outbound>, Option<CloseRequest>) {
        let mut outbox = self.outbox.lock();
        let queue = std::mem::take(&mut outbox.queue);
        (queue, outbox.close.clone())
    }

    /// Waits until something was pushed or a close was requested since the last wake-up.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Full JID → the session bound to it on this edge.
#[derive(Debug, Default)]
pub(crate) struct SessionTable {
    map: RwLock<HashMap<FullJid, Arc<SessionHandle>>>,
}

impl SessionTable {
    /// Inserts a session, returning the one it displaces.
    pub(crate) fn insert(
        &self,
        jid: FullJid,
        handle: Arc<SessionHandle>,
    ) -> Option<Arc<SessionHandle>> {
        self.map.write().insert(jid, handle)
    }

    /// Removes `jid` if it still maps to `handle`.
    pub(crate) fn remove_if(&self, jid: &FullJid, handle: &Arc<SessionHandle>) -> bool {
        let mut map = self.map.write();
        if map.get(jid).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            map.remove(jid);
            true
        } else {
            false
        }
    }

    /// The session of `jid`.
    pub(crate) fn get(&self, jid: &FullJid) -> Option<Arc<SessionHandle>> {
        self.map.read().get(jid).cloned()
    }

    /// Number of bound sessions.
    pub(crate) fn len(&self) -> usize {
        self.map.read().len()
    }
}

/// How the router reaches this edge.
#[derive(Debug)]
pub(crate) struct LocalEdgeLink {
    pub(crate) sessions: Arc<SessionTable>,
    /// Undeliverable stanzas on their way back to the router, through a task of the edge
    /// (so a router that delivers from inside its own `send` never waits on itself).
    pub(crate) undeliverable: mpsc::Sender<ToRouter>,
    pub(crate) queue_limit: usize,
}

impl LocalEdgeLink {
    async fn bounce(&self, recipient: FullJid, stanza: Element) -> Result<(), LinkError> {
        metrics::undeliverable();
        self.undeliverable
            .send(ToRouter::Undeliverable { recipient, stanza })
            .await
            .map_err(|_| LinkError::Closed)
    }
}

#[async_trait]
impl EdgeLink for LocalEdgeLink {
    async fn send(&self, msg: ToEdge) -> Result<(), LinkError> {
        match msg {
            ToEdge::Deliver {
                recipients,
                stanza,
                stamp_to,
            } => {
                let mut missing = Vec::new();
                for recipient in recipients {
                    let Some(handle) = self.sessions.get(&recipient) else {
                        missing.push(recipient);
                        continue;
                    };
                    let item = Outbound {
                        stanza: stanza.clone(),
                        stamp_to,
                    };
                    if handle.push(item, self.queue_limit).is_err() {
                        missing.push(recipient);
                    }
                }
                for recipient in missing {
                    tracing::debug!(%recipient, "recipient not here");
                    self.bounce(recipient, stanza.clone()).await?;
                }
                Ok(())
            }
            ToEdge::Close { jid, condition } => {
                match self.sessions.get(&jid) {
                    Some(handle) => {
                        let reason = EndReason::StreamError(condition.clone());
                        handle.close(condition, reason);
                    }
                    None => tracing::debug!(%jid, "close for a session not here"),
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn jid(s: &str) -> FullJid {
        starling_xmpp::jid::parse_full(s).unwrap()
    }

    fn message() -> Element {
        Element::parse(
            Bytes::from_static(b"<message><body>hi</body></message>"),
            "jabber:client",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn deliver_queue_full_and_missing() {
        let sessions = Arc::new(SessionTable::default());
        let (tx, mut rx) = mpsc::channel(8);
        let link = LocalEdgeLink {
            sessions: sessions.clone(),
            undeliverable: tx,
            queue_limit: 2,
        };
        let a = Arc::new(SessionHandle::new(Arc::from("s1")));
        sessions.insert(jid("a@x/1"), a.clone());
        for _ in 0..3 {
            link.send(ToEdge::Deliver {
                recipients: vec![jid("a@x/1"), jid("b@x/1")],
                stanza: message(),
                stamp_to: true,
            })
            .await
            .unwrap();
        }
        let (queue, close) = a.take();
        assert_eq!(queue.len(), 2);
        assert_eq!(
            close.map(|c| c.condition),
            Some(StreamErrorCondition::PolicyViolation)
        );
        // Three for the absent b, one for the overflowing a: none lost.
        let mut bounced = Vec::new();
        while let Ok(ToRouter::Undeliverable { recipient, .. }) = rx.try_recv() {
            bounced.push(recipient.to_string());
        }
        assert_eq!(bounced.len(), 4);
        assert_eq!(bounced.iter().filter(|r| *r == "a@x/1").count(), 1);
        // Emptied, the queue holds no allocation.
        assert_eq!(a.outbox.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn close_and_table_ownership() {
        let sessions = Arc::new(SessionTable::default());
        let (tx, _rx) = mpsc::channel(8);
        let link = LocalEdgeLink {
            sessions: sessions.clone(),
            undeliverable: tx,
            queue_limit: 2,
        };
        let old = Arc::new(SessionHandle::new(Arc::from("s1")));
        let new = Arc::new(SessionHandle::new(Arc::from("s2")));
        sessions.insert(jid("a@x/1"), old.clone());
        assert!(Arc::ptr_eq(
            &sessions.insert(jid("a@x/1"), new.clone()).unwrap(),
            &old
        ));
        assert!(!sessions.remove_if(&jid("a@x/1"), &old));
        assert_eq!(sessions.len(), 1);
        link.send(ToEdge::Close {
            jid: jid("a@x/1"),
            condition: StreamErrorCondition::NotAuthorized,
        })
        .await
        .unwrap();
        let (_, close) = new.take();
        assert_eq!(
            close,
            Some(CloseRequest {
                condition: StreamErrorCondition::NotAuthorized,
                reason: EndReason::StreamError(StreamErrorCondition::NotAuthorized),
            })
        );
        assert_eq!(
            new.push(
                Outbound {
                    stanza: message(),
                    stamp_to: false
                },
                8
            ),
            Err(PushError::Closing)
        );
        assert!(sessions.remove_if(&jid("a@x/1"), &new));
        assert_eq!(sessions.len(), 0);
    }
}
