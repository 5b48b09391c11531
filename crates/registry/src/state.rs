//! The replicated state of one shard, and how a committed batch changes it.
//!
//! Pure and deterministic: applying the same entries in the same order gives the same state
//! and the same results on every replica. Time enters only as the leader's clock stamped into
//! each batch (`Batch::time_ms`), never as a replica's own clock, so lease expiry replays the
//! same way everywhere. No I/O here; the Raft storage wraps it.
//!
//! The key model: an account (bare JID) maps to its bound resources. Binding replaces a session
//! of the same full JID (RFC 6120 §7.7.2.2, the new session wins); unbind and presence updates
//! only touch the session of the given stream id, so a late message from a replaced session
//! cannot disturb its successor. Presence is the last available presence (RFC 6121 §4.2, §4.5).
//! Resumption ids are those of XEP-0198 §5.
//!
//! Snapshots: [`ShardState::freeze`] takes a point-in-time view in O(1) (the accounts map is
//! copy-on-write, see `accounts`), and [`Frozen::encode`] encodes it without any lock, while
//! the live state keeps applying entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::accounts::{AccountMap, Accounts};
use crate::pb;
use crate::shard::bare_of;

/// The sessions and node leases of one shard.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ShardState {
    /// Sessions by bare JID. Accounts have few resources, so a vector is the cheapest map.
    accounts: AccountMap,
    /// Node name → lease expiry (ms since the Unix epoch, leader clock).
    leases: BTreeMap<String, u64>,
    /// Number of sessions, kept in step with `accounts`.
    sessions: usize,
    /// Nobody watches the shard: applying builds no account changes (each would clone the
    /// account's sessions). Not replicated state; the machine sets it before each apply.
    pub(crate) quiet: bool,
}

/// What applying one batch produced: one result per operation, and the account changes for
/// the watch stream.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) results: Vec<pb::OpResult>,
    pub(crate) changes: Vec<pb::Change>,
}

fn result(r: pb::op_result::Result) -> pb::OpResult {
    pb::OpResult { result: Some(r) }
}

fn priority(p: i32) -> i32 {
    p.clamp(i32::from(i8::MIN), i32::from(i8::MAX))
}

impl ShardState {
    /// Applies a committed batch.
    pub(crate) fn apply(&mut self, batch: &pb::Batch) -> Applied {
        let mut out = Applied {
            results: Vec::with_capacity(batch.ops.len()),
            changes: Vec::new(),
        };
        for op in &batch.ops {
            let r = match &op.op {
                Some(pb::op::Op::Bind(b)) => self.bind(b, &mut out.changes),
                Some(pb::op::Op::Unbind(u)) => self.unbind(u, &mut out.changes),
                Some(pb::op::Op::SetPresence(p)) => self.set_presence(p, &mut out.changes),
                Some(pb::op::Op::SetResumption(r)) => self.set_resumption(r, &mut out.changes),
                Some(pb::op::Op::Heartbeat(h)) => {
                    let expires = batch.time_ms.saturating_add(h.ttl_ms);
                    self.leases.insert(h.node.clone(), expires);
                    result(pb::op_result::Result::Done(pb::Empty {}))
                }
                Some(pb::op::Op::RemoveNode(r)) => {
                    self.leases.remove(&r.node);
                    let removed = self.remove_node(&r.node, None, &mut out.changes);
                    result(pb::op_result::Result::Removed(pb::SessionList {
                        sessions: removed,
                    }))
                }
                Some(pb::op::Op::ExpireLeases(e)) => {
                    let mut removed = Vec::new();
                    for node in &e.nodes {
                        // Re-checked against the entry's time: a heartbeat committed after the
                        // leader decided saves the node.
                        let expired = self
                            .leases
                            .get(node)
                            .is_some_and(|&exp| exp <= batch.time_ms);
                        if expired {
                            self.leases.remove(node);
                            removed.extend(self.remove_node(node, Some(node), &mut out.changes));
                        }
                    }
                    result(pb::op_result::Result::Removed(pb::SessionList {
                        sessions: removed,
                    }))
                }
                None => result(pb::op_result::Result::Error("empty operation".into())),
            };
            out.results.push(r);
        }
        out
    }

    /// Records the change of account `bare` for the watch stream (unless `quiet`).
    fn note(
        &self,
        changes: &mut Vec<pb::Change>,
        bare: &str,
        removed: Vec<pb::Session>,
        expired: Option<&str>,
    ) {
        if self.quiet {
            return;
        }
        changes.push(pb::Change {
            bare: bare.to_owned(),
            sessions: self.accounts.get(bare).cloned().unwrap_or_default(),
            removed,
            expired_node: expired.map(str::to_owned),
        });
    }

    fn bind(&mut self, b: &pb::Bind, changes: &mut Vec<pb::Change>) -> pb::OpResult {
        let Some(session) = &b.session else {
            return result(pb::op_result::Result::Error(
                "bind without a session".into(),
            ));
        };
        let mut session = session.clone();
        session.priority = priority(session.priority);
        let bare = bare_of(&session.jid).to_owned();
        let sessions = self.accounts.entry(bare.clone());
        let mut replaced = None;
        if let Some(existing) = sessions.iter_mut().find(|s| s.jid == session.jid) {
            let old = std::mem::replace(existing, session);
            // The same stream binding again is a retried request, not a conflict.
            if old.stream_id != existing.stream_id {
                replaced = Some(old);
            }
        } else {
            let max = usize::try_from(b.max_per_account).unwrap_or(usize::MAX);
            if max != 0 && sessions.len() >= max {
                if sessions.is_empty() {
                    self.accounts.remove(&bare);
                }
                return result(pb::op_result::Result::Bind(pb::BindResult {
                    replaced: None,
                    limit_reached: true,
                }));
            }
            sessions.push(session);
            self.sessions += 1;
        }
        self.note(changes, &bare, replaced.iter().cloned().collect(), None);
        result(pb::op_result::Result::Bind(pb::BindResult {
            replaced,
            limit_reached: false,
        }))
    }

    fn unbind(&mut self, u: &pb::Unbind, changes: &mut Vec<pb::Change>) -> pb::OpResult {
        let bare = bare_of(&u.jid);
        let mut removed = Vec::new();
        if let Some(sessions) = self.accounts.get_mut(bare) {
            if let Some(i) = sessions
                .iter()
                .position(|s| s.jid == u.jid && s.stream_id == u.stream_id)
            {
                removed.push(sessions.swap_remove(i));
                self.sessions -= 1;
            }
            if sessions.is_empty() {
                self.accounts.remove(bare);
            }
        }
        let changed = !removed.is_empty();
        if changed {
            self.note(changes, bare, removed, None);
        }
        result(pb::op_result::Result::Changed(changed))
    }

    fn find_mut(&mut self, jid: &str, stream_id: &str) -> Option<&mut pb::Session> {
        self.accounts
            .get_mut(bare_of(jid))?
            .iter_mut()
            .find(|s| s.jid == jid && s.stream_id == stream_id)
    }

    fn set_presence(&mut self, p: &pb::SetPresence, changes: &mut Vec<pb::Change>) -> pb::OpResult {
        let changed = match self.find_mut(&p.jid, &p.stream_id) {
            Some(s) => {
                s.priority = priority(p.priority);
                s.presence.clone_from(&p.presence);
                true
            }
            None => false,
        };
        if changed {
            self.note(changes, bare_of(&p.jid), Vec::new(), None);
        }
        result(pb::op_result::Result::Changed(changed))
    }

    fn set_resumption(
        &mut self,
        r: &pb::SetResumption,
        changes: &mut Vec<pb::Change>,
    ) -> pb::OpResult {
        let changed = match self.find_mut(&r.jid, &r.stream_id) {
            Some(s) => {
                s.resumption.clone_from(&r.resumption);
                true
            }
            None => false,
        };
        if changed {
            self.note(changes, bare_of(&r.jid), Vec::new(), None);
        }
        result(pb::op_result::Result::Changed(changed))
    }

    /// Removes every session of `node`; one change per account touched. A full scan: node
    /// removal is rare, and an index by node would cost memory on every session.
    fn remove_node(
        &mut self,
        node: &str,
        expired: Option<&str>,
        changes: &mut Vec<pb::Change>,
    ) -> Vec<pb::Session> {
        let mut touched: Vec<String> = self
            .accounts
            .iter()
            .filter(|(_, sessions)| sessions.iter().any(|s| s.node == node))
            .map(|(bare, _)| bare.clone())
            .collect();
        // Sorted so the order of changes does not depend on the hash map's iteration order.
        touched.sort_unstable();
        let mut all = Vec::new();
        for bare in touched {
            let Some(sessions) = self.accounts.get_mut(&bare) else {
                continue;
            };
            let mut removed = Vec::new();
            sessions.retain(|s| {
                if s.node == node {
                    removed.push(s.clone());
                    false
                } else {
                    true
                }
            });
            if sessions.is_empty() {
                self.accounts.remove(&bare);
            }
            self.sessions -= removed.len();
            all.extend(removed.iter().cloned());
            self.note(changes, &bare, removed, expired);
        }
        all
    }

    /// Every session of an account.
    pub(crate) fn sessions(&self, bare: &str) -> Vec<pb::Session> {
        self.accounts.get(bare).cloned().unwrap_or_default()
    }

    /// The session of a full JID.
    pub(crate) fn session(&self, full: &str) -> Option<pb::Session> {
        self.accounts
            .get(bare_of(full))?
            .iter()
            .find(|s| s.jid == full)
            .cloned()
    }

    /// The session of an account holding a resumption id.
    pub(crate) fn by_resumption(&self, bare: &str, id: &str) -> Option<pb::Session> {
        self.accounts
            .get(bare)?
            .iter()
            .find(|s| s.resumption.as_deref() == Some(id))
            .cloned()
    }

    /// How many sessions the shard holds.
    pub(crate) fn count(&self) -> usize {
        self.sessions
    }

    /// Nodes whose lease has expired at `now_ms`.
    pub(crate) fn expired_nodes(&self, now_ms: u64) -> Vec<String> {
        self.leases
            .iter()
            .filter(|(_, exp)| **exp <= now_ms)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The snapshot form, in a canonical order (sorted), so equal states encode equally.
    /// Snapshots are built with [`ShardState::freeze`] and [`Frozen::encode`], which give the
    /// same bytes without copying the sessions; this form is for tests and comparisons.
    #[cfg(test)]
    pub(crate) fn to_snapshot(&self) -> pb::SnapshotData {
        let mut accounts: Vec<_> = self.accounts.iter().collect();
        accounts.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut sessions = Vec::with_capacity(self.sessions);
        for (_, v) in accounts {
            sessions.extend(v.iter().cloned());
        }
        pb::SnapshotData {
            sessions,
            leases: self
                .leases
                .iter()
                .map(|(node, exp)| pb::Lease {
                    node: node.clone(),
                    expires_ms: *exp,
                })
                .collect(),
        }
    }

    /// Rebuilds a state from its snapshot form.
    pub(crate) fn from_snapshot(data: pb::SnapshotData) -> Self {
        let mut state = ShardState::default();
        for s in data.sessions {
            state.accounts.entry(bare_of(&s.jid).to_owned()).push(s);
            state.sessions += 1;
        }
        for l in data.leases {
            state.leases.insert(l.node, l.expires_ms);
        }
        state
    }

    /// A point-in-time view for a snapshot, in O(1) (plus the leases, a handful): later
    /// applies do not change it. Hold it only while encoding: while it lives, writes go to the
    /// accounts' overlay, merged back by the first write after it is dropped.
    pub(crate) fn freeze(&mut self) -> Frozen {
        Frozen {
            accounts: self.accounts.freeze(),
            leases: self.leases.clone(),
            sessions: self.sessions,
        }
    }
}

/// A frozen view of a shard's state (see [`ShardState::freeze`]).
#[derive(Debug)]
pub(crate) struct Frozen {
    accounts: Arc<Accounts>,
    leases: BTreeMap<String, u64>,
    sessions: usize,
}

/// The field numbers of `SnapshotData` (proto/registry.proto).
const SNAPSHOT_SESSIONS: u32 = 1;
const SNAPSHOT_LEASES: u32 = 2;

impl Frozen {
    /// The encoded `pb::SnapshotData` of the view: byte for byte what encoding
    /// [`ShardState::to_snapshot`] would give (sessions sorted by bare JID, leases by node),
    /// written straight from the shared records instead of a copy of every session.
    pub(crate) fn encode(&self) -> Vec<u8> {
        use prost::encoding::message;
        let mut accounts: Vec<(&String, &Vec<pb::Session>)> = self.accounts.iter().collect();
        accounts.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let leases: Vec<pb::Lease> = self
            .leases
            .iter()
            .map(|(node, exp)| pb::Lease {
                node: node.clone(),
                expires_ms: *exp,
            })
            .collect();
        let len = accounts
            .iter()
            .flat_map(|(_, v)| v.iter())
            .map(|s| message::encoded_len(SNAPSHOT_SESSIONS, s))
            .sum::<usize>()
            + leases
                .iter()
                .map(|l| message::encoded_len(SNAPSHOT_LEASES, l))
                .sum::<usize>();
        let mut buf = Vec::with_capacity(len);
        for s in accounts.iter().flat_map(|(_, v)| v.iter()) {
            message::encode(SNAPSHOT_SESSIONS, s, &mut buf);
        }
        for l in &leases {
            message::encode(SNAPSHOT_LEASES, l, &mut buf);
        }
        debug_assert_eq!(buf.len(), len);
        buf
    }

    /// How many sessions the view holds.
    pub(crate) fn count(&self) -> usize {
        self.sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sess(jid: &str, node: &str, stream: &str) -> pb::Session {
        pb::Session {
            jid: jid.into(),
            node: node.into(),
            stream_id: stream.into(),
            priority: 0,
            presence: None,
            resumption: None,
        }
    }

    fn op(o: pb::op::Op) -> pb::Op {
        pb::Op { op: Some(o) }
    }

    fn bind(jid: &str, node: &str, stream: &str, max: u32) -> pb::Op {
        op(pb::op::Op::Bind(pb::Bind {
            session: Some(sess(jid, node, stream)),
            max_per_account: max,
        }))
    }

    fn batch(time_ms: u64, ops: Vec<pb::Op>) -> pb::Batch {
        pb::Batch { time_ms, ops }
    }

    fn bind_result(r: &pb::OpResult) -> pb::BindResult {
        match &r.result {
            Some(pb::op_result::Result::Bind(b)) => b.clone(),
            other => panic!("not a bind result: {other:?}"),
        }
    }

    #[test]
    fn bind_replace_limit_unbind() {
        let mut st = ShardState::default();
        let a = st.apply(&batch(
            1,
            vec![
                bind("a@x/1", "e1", "s1", 2),
                bind("a@x/2", "e1", "s2", 2),
                bind("a@x/3", "e1", "s3", 2),
                bind("a@x/1", "e2", "s4", 2),
                // A retried bind of the same stream is not a replacement.
                bind("a@x/1", "e2", "s4", 2),
            ],
        ));
        assert_eq!(bind_result(&a.results[0]).replaced, None);
        assert!(bind_result(&a.results[2]).limit_reached);
        assert_eq!(
            bind_result(&a.results[3]).replaced,
            Some(sess("a@x/1", "e1", "s1"))
        );
        assert_eq!(bind_result(&a.results[4]).replaced, None);
        assert_eq!(st.count(), 2);
        // The replacement is reported as a removal on the watch stream.
        assert_eq!(a.changes[2].removed, vec![sess("a@x/1", "e1", "s1")]);
        assert_eq!(a.changes[2].sessions.len(), 2);

        let u = st.apply(&batch(
            2,
            vec![
                op(pb::op::Op::Unbind(pb::Unbind {
                    jid: "a@x/1".into(),
                    stream_id: "s1".into(),
                })),
                op(pb::op::Op::Unbind(pb::Unbind {
                    jid: "a@x/1".into(),
                    stream_id: "s4".into(),
                })),
            ],
        ));
        assert_eq!(
            u.results[0].result,
            Some(pb::op_result::Result::Changed(false))
        );
        assert_eq!(
            u.results[1].result,
            Some(pb::op_result::Result::Changed(true))
        );
        assert_eq!(st.count(), 1);
        assert_eq!(st.sessions("a@x").len(), 1);
        assert!(st.session("a@x/1").is_none());
    }

    #[test]
    fn presence_and_resumption_follow_the_stream() {
        let mut st = ShardState::default();
        st.apply(&batch(1, vec![bind("a@x/1", "e1", "s1", 0)]));
        st.apply(&batch(
            2,
            vec![
                op(pb::op::Op::SetPresence(pb::SetPresence {
                    jid: "a@x/1".into(),
                    stream_id: "s1".into(),
                    priority: 500,
                    presence: Some(bytes::Bytes::from_static(b"<presence/>")),
                })),
                op(pb::op::Op::SetPresence(pb::SetPresence {
                    jid: "a@x/1".into(),
                    stream_id: "old".into(),
                    priority: 1,
                    presence: None,
                })),
                op(pb::op::Op::SetResumption(pb::SetResumption {
                    jid: "a@x/1".into(),
                    stream_id: "s1".into(),
                    resumption: Some("r1".into()),
                })),
            ],
        ));
        let s = st.session("a@x/1").unwrap();
        assert_eq!(s.priority, 127);
        assert!(s.presence.is_some());
        assert_eq!(st.by_resumption("a@x", "r1").unwrap().jid, "a@x/1");
        assert!(st.by_resumption("a@x", "r2").is_none());
    }

    #[test]
    fn lease_expiry_uses_the_entry_time_and_removes_all_sessions_at_once() {
        let mut st = ShardState::default();
        st.apply(&batch(
            1000,
            vec![
                op(pb::op::Op::Heartbeat(pb::Heartbeat {
                    node: "e1".into(),
                    ttl_ms: 500,
                })),
                op(pb::op::Op::Heartbeat(pb::Heartbeat {
                    node: "e2".into(),
                    ttl_ms: 5000,
                })),
                bind("a@x/1", "e1", "s1", 0),
                bind("b@x/1", "e1", "s2", 0),
                bind("b@x/2", "e2", "s3", 0),
            ],
        ));
        assert_eq!(st.expired_nodes(1499), Vec::<String>::new());
        assert_eq!(st.expired_nodes(1500), vec!["e1".to_owned()]);
        // Proposed too early (entry time before expiry): nothing happens.
        let early = st.apply(&batch(
            1400,
            vec![op(pb::op::Op::ExpireLeases(pb::ExpireLeases {
                nodes: vec!["e1".into(), "e2".into()],
            }))],
        ));
        assert!(early.changes.is_empty());
        let a = st.apply(&batch(
            1600,
            vec![op(pb::op::Op::ExpireLeases(pb::ExpireLeases {
                nodes: vec!["e1".into(), "e2".into()],
            }))],
        ));
        match &a.results[0].result {
            Some(pb::op_result::Result::Removed(l)) => assert_eq!(l.sessions.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(a.changes.len(), 2);
        assert!(
            a.changes
                .iter()
                .all(|c| c.expired_node.as_deref() == Some("e1"))
        );
        assert_eq!(a.changes[1].bare, "b@x");
        assert_eq!(a.changes[1].sessions, vec![sess("b@x/2", "e2", "s3")]);
        assert_eq!(st.count(), 1);
        assert!(st.expired_nodes(2000).is_empty());
    }

    #[test]
    fn snapshot_round_trip_and_determinism() {
        let mut a = ShardState::default();
        let ops = vec![
            bind("a@x/1", "e1", "s1", 0),
            bind("b@x/1", "e2", "s2", 0),
            op(pb::op::Op::Heartbeat(pb::Heartbeat {
                node: "e1".into(),
                ttl_ms: 10,
            })),
            op(pb::op::Op::RemoveNode(pb::RemoveNode { node: "e2".into() })),
        ];
        a.apply(&batch(5, ops.clone()));
        let mut b = ShardState::default();
        b.apply(&batch(5, ops));
        assert_eq!(a, b);
        let snap = a.to_snapshot();
        assert_eq!(snap, b.to_snapshot());
        let c = ShardState::from_snapshot(snap);
        assert_eq!(c, a);
        assert_eq!(c.count(), 1);
    }

    /// A deterministic mix of every operation over a few accounts, resources and nodes.
    fn mixed_ops(seed: u64, n: usize) -> Vec<pb::Op> {
        let mut x = seed;
        let mut next = move |m: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        (0..n)
            .map(|_| {
                let jid = format!("u{}@x/{}", next(40), next(3));
                let node = format!("e{}", next(3));
                let stream = format!("s{}", next(4));
                match next(10) {
                    0..=3 => bind(&jid, &node, &stream, 3),
                    4 | 5 => op(pb::op::Op::Unbind(pb::Unbind {
                        jid,
                        stream_id: stream,
                    })),
                    6 => op(pb::op::Op::SetPresence(pb::SetPresence {
                        jid,
                        stream_id: stream,
                        priority: 1,
                        presence: Some(bytes::Bytes::from_static(b"<presence/>")),
                    })),
                    7 => op(pb::op::Op::SetResumption(pb::SetResumption {
                        jid,
                        stream_id: stream,
                        resumption: Some("r".into()),
                    })),
                    8 => op(pb::op::Op::Heartbeat(pb::Heartbeat { node, ttl_ms: 10 })),
                    _ if next(4) == 0 => op(pb::op::Op::RemoveNode(pb::RemoveNode { node })),
                    _ => bind(&jid, &node, &stream, 0),
                }
            })
            .collect()
    }

    fn encoded(st: &ShardState) -> Vec<u8> {
        prost::Message::encode_to_vec(&st.to_snapshot())
    }

    /// Applies `ops` to both states and checks they answered alike.
    fn apply_both(a: &mut ShardState, b: &mut ShardState, time_ms: u64, ops: Vec<pb::Op>) {
        let batch = batch(time_ms, ops);
        let (ra, rb) = (a.apply(&batch), b.apply(&batch));
        assert_eq!(ra.results, rb.results);
        assert_eq!(ra.changes, rb.changes);
    }

    #[test]
    fn writes_during_a_frozen_view_stay_out_of_it_and_merge_back_to_the_same_state() {
        // `cow` is frozen in the middle; `plain` never is; `then` stops at the freeze.
        let (mut cow, mut plain, mut then) = (
            ShardState::default(),
            ShardState::default(),
            ShardState::default(),
        );
        let first = mixed_ops(1, 400);
        apply_both(&mut cow, &mut plain, 1, first.clone());
        then.apply(&batch(1, first));
        assert!(cow.count() > 0);

        let view = cow.freeze();
        assert!(cow.accounts.is_frozen());
        assert_eq!(view.count(), then.count());
        for round in 0..5 {
            apply_both(&mut cow, &mut plain, 2 + round, mixed_ops(100 + round, 200));
            assert_eq!(cow, plain);
            assert_eq!(encoded(&cow), encoded(&plain));
            assert_eq!(cow.count(), plain.count());
        }
        assert!(cow.accounts.overlay_len() > 0);
        // The view is the state as it was at the freeze, nothing later.
        assert_eq!(view.encode(), encoded(&then));
        drop(view);

        apply_both(&mut cow, &mut plain, 10, mixed_ops(7, 50));
        assert_eq!(cow.accounts.overlay_len(), 0);
        assert!(!cow.accounts.is_frozen());
        assert_eq!(cow, plain);
        assert_eq!(encoded(&cow), encoded(&plain));
        // And a freeze with nothing held encodes what the non-CoW form encodes.
        assert_eq!(cow.freeze().encode(), encoded(&plain));
    }

    #[test]
    fn frozen_encoding_is_byte_identical_to_the_snapshot_message() {
        let mut st = ShardState::default();
        assert_eq!(st.freeze().encode(), encoded(&st));
        st.apply(&batch(3, mixed_ops(42, 1000)));
        let bytes = st.freeze().encode();
        assert_eq!(bytes, encoded(&st));
        let back = ShardState::from_snapshot(
            <pb::SnapshotData as prost::Message>::decode(bytes.as_slice()).unwrap(),
        );
        assert_eq!(back, st);
        assert_eq!(back.count(), st.count());
    }
}
