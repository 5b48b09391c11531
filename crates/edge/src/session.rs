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
//! Stream management (XEP-0198 §5) adds an owner to each handle: the id of the connection
//! that holds the session. When a resumable session's connection dies, the handle stays in
//! the table *detached*, holding the [`ResumptionState`]; deliveries keep queueing (bounded by
//! the unacked limits: overflow ends the session and everything goes back to the router). A
//! resuming connection takes the handle over ([`SessionHandle::take_over`]): from the detached
//! state at once, or from a live connection through a one-shot handover that connection
//! answers when it closes with `conflict`.
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
use tokio::sync::{Notify, mpsc, oneshot};

use crate::metrics;
use crate::sm::{ResumptionState, SmLimits};

pub(crate) use crate::sm::Outbound;

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
    /// Bytes of stanza XML in `queue`.
    queued_bytes: usize,
    close: Option<CloseRequest>,
    /// The connection holding the session.
    owner: u64,
    /// Set while no connection holds a resumable session (boxed: rare, and every bound
    /// session's handle would pay for it inline).
    detached: Option<Box<Detached>>,
    /// A resuming connection waits for the live one to hand the session over.
    handover: Option<oneshot::Sender<ResumptionState>>,
}

#[derive(Debug)]
struct Detached {
    state: ResumptionState,
    /// Stanzas and bytes of `state.unacked`.
    weight: (usize, usize),
}

/// What [`SessionHandle::take`] found.
#[derive(Debug, Default)]
pub(crate) struct Drained {
    /// Stanzas to write.
    pub(crate) queue: VecDeque<Outbound>,
    /// A close request.
    pub(crate) close: Option<CloseRequest>,
    /// Another connection resumed the session: close with `conflict`, write nothing.
    pub(crate) handover: bool,
}

/// What [`SessionHandle::take_over`] found.
#[derive(Debug)]
pub(crate) enum TakeOver {
    /// The session was detached: here it is, with what was delivered meanwhile in
    /// `pending`.
    Detached(ResumptionState),
    /// A connection still holds it; it sends the state when it has closed.
    Live(oneshot::Receiver<ResumptionState>),
    /// The session is ending.
    Gone,
}

/// What [`SessionHandle::detach`] did.
#[derive(Debug)]
pub(crate) enum Detach {
    /// The session waits for a resumption.
    Detached,
    /// A resuming connection was waiting and got the state.
    HandedOver,
    /// The session cannot be kept (a close was requested, or the waiting connection is
    /// gone): it ends now, with this state.
    End(ResumptionState),
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
    pub(crate) fn new(stream_id: Arc<str>, owner: u64) -> Self {
        SessionHandle {
            stream_id,
            outbox: Mutex::new(Outbox {
                owner,
                ..Outbox::default()
            }),
            notify: Notify::new(),
        }
    }

    /// Queues a stanza, or refuses it; a full queue closes the session with
    /// `policy-violation`. While detached, the limits are the unacked ones (`sm`), counting
    /// the held unacked stanzas.
    pub(crate) fn push(
        &self,
        item: Outbound,
        limit: usize,
        sm: &SmLimits,
    ) -> Result<(), PushError> {
        let mut outbox = self.outbox.lock();
        if outbox.close.is_some() {
            return Err(PushError::Closing);
        }
        let full = match &outbox.detached {
            Some(d) => !sm.fits(
                d.weight.0.saturating_add(outbox.queue.len()),
                d.weight.1.saturating_add(outbox.queued_bytes),
                item.weight(),
            ),
            None => outbox.queue.len() >= limit,
        };
        if full {
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
        outbox.queued_bytes = outbox.queued_bytes.saturating_add(item.weight());
        outbox.queue.push_back(item);
        drop(outbox);
        self.notify.notify_one();
        Ok(())
    }

    /// Puts stanzas that were taken but not written back at the front of the queue.
    pub(crate) fn requeue_front(&self, items: impl DoubleEndedIterator<Item = Outbound>) {
        let mut outbox = self.outbox.lock();
        for item in items.rev() {
            outbox.queued_bytes = outbox.queued_bytes.saturating_add(item.weight());
            outbox.queue.push_front(item);
        }
    }

    /// Whether connection `owner` holds the session.
    pub(crate) fn is_owner(&self, owner: u64) -> bool {
        self.outbox.lock().owner == owner
    }

    /// Connection `owner` died with a resumable session: keep it detached, or hand it to a
    /// resuming connection already waiting.
    pub(crate) fn detach(&self, owner: u64, state: ResumptionState) -> Detach {
        let mut outbox = self.outbox.lock();
        if let Some(tx) = outbox.handover.take() {
            return match tx.send(state) {
                Ok(()) => Detach::HandedOver,
                Err(state) => Detach::End(state),
            };
        }
        if outbox.owner != owner || outbox.close.is_some() {
            return Detach::End(state);
        }
        let weight = state.weight();
        outbox.detached = Some(Box::new(Detached { state, weight }));
        Detach::Detached
    }

    /// Connection `owner` gives the session to the connection that resumed it, if one asked.
    /// Returns the state if no one took it.
    pub(crate) fn hand_over(&self, state: ResumptionState) -> Option<ResumptionState> {
        match self.outbox.lock().handover.take() {
            Some(tx) => tx.send(state).err(),
            None => Some(state),
        }
    }

    /// Connection `owner` (a resuming one) takes the session over.
    pub(crate) fn take_over(&self, owner: u64) -> TakeOver {
        let mut outbox = self.outbox.lock();
        if outbox.close.is_some() {
            return TakeOver::Gone;
        }
        let taken = match outbox.detached.take() {
            Some(d) => TakeOver::Detached(d.state),
            None => {
                let (tx, rx) = oneshot::channel();
                // A second resumption racing the first: the first one's wait ends.
                outbox.handover = Some(tx);
                TakeOver::Live(rx)
            }
        };
        outbox.owner = owner;
        drop(outbox);
        self.notify.notify_one();
        taken
    }

    /// The detached session of `owner` ends (timeout, overflow, shutdown): its state and
    /// queue, unless it was resumed meanwhile.
    pub(crate) fn end_detached(&self, owner: u64) -> Option<(ResumptionState, VecDeque<Outbound>)> {
        let mut outbox = self.outbox.lock();
        if outbox.owner != owner {
            return None;
        }
        let detached = outbox.detached.take()?;
        outbox.queued_bytes = 0;
        outbox.close.get_or_insert(CloseRequest {
            condition: StreamErrorCondition::ConnectionTimeout,
            reason: EndReason::Timeout,
        });
        Some((detached.state, std::mem::take(&mut outbox.queue)))
    }

    /// Whether a detached session of `owner` should end now (`Some(Some(why))`: a close
    /// was requested, by an overflow or a new bind), or is no longer `owner`'s (`None`:
    /// resumed).
    pub(crate) fn detached_should_end(&self, owner: u64) -> Option<Option<EndReason>> {
        let outbox = self.outbox.lock();
        (outbox.owner == owner).then(|| outbox.close.as_ref().map(|c| c.reason.clone()))
    }

    /// The session ends: takes what is queued and the close request that was pending, and
    /// refuses every later push (they go back to the router). A resuming connection still
    /// waiting for a handover is told at once that there is none.
    pub(crate) fn close_out(&self) -> (VecDeque<Outbound>, Option<CloseRequest>) {
        let mut outbox = self.outbox.lock();
        outbox.handover = None;
        let previous = outbox.close.clone();
        if previous.is_none() {
            outbox.close = Some(CloseRequest {
                condition: StreamErrorCondition::ConnectionTimeout,
                reason: EndReason::ConnectionLost,
            });
        }
        outbox.queued_bytes = 0;
        (std::mem::take(&mut outbox.queue), previous)
    }

    /// Whether the session is detached, waiting for a resumption.
    #[cfg(test)]
    pub(crate) fn is_detached(&self) -> bool {
        self.outbox.lock().detached.is_some()
    }

    /// Wakes the connection (after a wake-up meant for it was consumed elsewhere).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
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
    pub(crate) fn take(&self) -> Drained {
        let mut outbox = self.outbox.lock();
        if outbox.handover.is_some() {
            return Drained {
                handover: true,
                ..Drained::default()
            };
        }
        outbox.queued_bytes = 0;
        Drained {
            queue: std::mem::take(&mut outbox.queue),
            close: outbox.close.clone(),
            handover: false,
        }
    }

    /// Waits until something was pushed or a close was requested since the last wake-up.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// How many expired resumable sessions [`ExpiredSessions`] remembers.
const EXPIRED_REMEMBERED: usize = 1024;

/// The last `h` of recently expired resumable sessions (XEP-0198 §5: `<failed/>` carries
/// `h` when known, so the client learns which of its stanzas arrived). Bounded: the oldest
/// are forgotten first.
#[derive(Debug, Default)]
pub(crate) struct ExpiredSessions {
    entries: Mutex<VecDeque<(Arc<str>, FullJid, u32)>>,
}

impl ExpiredSessions {
    pub(crate) fn record(&self, id: &Arc<str>, jid: &FullJid, h: u32) {
        let mut entries = self.entries.lock();
        if entries.len() >= EXPIRED_REMEMBERED {
            entries.pop_front();
        }
        entries.push_back((id.clone(), jid.clone(), h));
    }

    /// The `h` of the expired session `id` of `account`.
    pub(crate) fn h(&self, account: &starling_xmpp::BareJid, id: &str) -> Option<u32> {
        self.entries
            .lock()
            .iter()
            .rev()
            .find(|(i, jid, _)| &**i == id && jid.to_bare() == *account)
            .map(|(_, _, h)| *h)
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
    pub(crate) sm: SmLimits,
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
                    if handle.push(item, self.queue_limit, &self.sm).is_err() {
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
            sm: SmLimits::from_settings(&crate::Settings::default()),
        };
        let a = Arc::new(SessionHandle::new(Arc::from("s1"), 1));
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
        let Drained { queue, close, .. } = a.take();
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
            sm: SmLimits::from_settings(&crate::Settings::default()),
        };
        let old = Arc::new(SessionHandle::new(Arc::from("s1"), 1));
        let new = Arc::new(SessionHandle::new(Arc::from("s2"), 2));
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
        let Drained { close, .. } = new.take();
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
                8,
                &SmLimits::from_settings(&crate::Settings::default()),
            ),
            Err(PushError::Closing)
        );
        assert!(sessions.remove_if(&jid("a@x/1"), &new));
        assert_eq!(sessions.len(), 0);
    }

    fn state(unacked: usize) -> ResumptionState {
        ResumptionState {
            id: Arc::from("id"),
            jid: jid("a@x/1"),
            stream_id: Arc::from("s1"),
            inbound: 3,
            acked: 0,
            unacked: (0..unacked)
                .map(|_| Outbound {
                    stanza: message(),
                    stamp_to: true,
                })
                .collect(),
            pending: VecDeque::new(),
        }
    }

    #[tokio::test]
    async fn detach_take_over_and_handover() {
        let limits = SmLimits {
            max_unacked_stanzas: 3,
            ..SmLimits::from_settings(&crate::Settings::default())
        };
        let item = || Outbound {
            stanza: message(),
            stamp_to: true,
        };
        // Detached: deliveries queue up to the unacked limit, counting the held ones.
        let h = SessionHandle::new(Arc::from("s1"), 1);
        assert!(matches!(h.detach(1, state(2)), Detach::Detached));
        assert!(h.is_detached());
        assert_eq!(h.push(item(), 100, &limits), Ok(()));
        assert_eq!(h.detached_should_end(1), Some(None));
        // A resuming connection takes it at once, with what was delivered meanwhile.
        let TakeOver::Detached(taken) = h.take_over(2) else {
            panic!("not detached")
        };
        assert_eq!(taken.unacked.len(), 2);
        assert_eq!(
            h.detached_should_end(1),
            None,
            "the waiter sees the takeover"
        );
        assert!(h.end_detached(1).is_none(), "and cannot end it any more");
        assert_eq!(h.take().queue.len(), 1);

        // Overflow while detached ends the session; the refused stanza is the caller's.
        let h = SessionHandle::new(Arc::from("s1"), 1);
        assert!(matches!(h.detach(1, state(2)), Detach::Detached));
        assert_eq!(h.push(item(), 100, &limits), Ok(()));
        assert_eq!(h.push(item(), 100, &limits), Err(PushError::Full));
        assert!(matches!(h.detached_should_end(1), Some(Some(_))));
        let (held, queue) = h.end_detached(1).unwrap();
        assert_eq!((held.unacked.len(), queue.len()), (2, 1));
        assert!(matches!(h.take_over(3), TakeOver::Gone));

        // Live: the old connection is asked to hand over, and does when it closes.
        let h = SessionHandle::new(Arc::from("s1"), 1);
        let TakeOver::Live(rx) = h.take_over(2) else {
            panic!("not live")
        };
        assert!(
            h.take().handover,
            "the old connection must close with conflict"
        );
        assert_eq!(
            h.push(item(), 100, &limits),
            Ok(()),
            "deliveries still queue"
        );
        assert!(!h.is_owner(1));
        assert!(h.hand_over(state(1)).is_none());
        assert_eq!(rx.await.unwrap().unacked.len(), 1);

        // A session that ends while a resumption waits: the waiter hears at once, and later
        // pushes are refused (they go back to the router).
        let h = SessionHandle::new(Arc::from("s1"), 1);
        assert_eq!(h.push(item(), 100, &limits), Ok(()));
        let TakeOver::Live(rx) = h.take_over(2) else {
            panic!("not live")
        };
        let (queue, close) = h.close_out();
        assert_eq!((queue.len(), close), (1, None));
        assert!(rx.await.is_err());
        assert_eq!(h.push(item(), 100, &limits), Err(PushError::Closing));
    }

    #[test]
    fn expired_sessions_remember_h_per_account() {
        let expired = ExpiredSessions::default();
        expired.record(&Arc::from("r1"), &jid("a@x/1"), 7);
        let a = starling_xmpp::jid::parse_bare("a@x").unwrap();
        let b = starling_xmpp::jid::parse_bare("b@x").unwrap();
        assert_eq!(expired.h(&a, "r1"), Some(7));
        assert_eq!(expired.h(&b, "r1"), None, "another account learns nothing");
        for n in 0..EXPIRED_REMEMBERED {
            expired.record(&Arc::from(format!("x{n}")), &jid("a@x/1"), 1);
        }
        assert_eq!(
            expired.h(&a, "r1"),
            None,
            "bounded: the oldest is forgotten"
        );
    }
}
