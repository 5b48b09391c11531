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

use std::collections::{BTreeMap, HashMap};

use crate::pb;
use crate::shard::bare_of;

/// The sessions and node leases of one shard.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ShardState {
    /// Sessions by bare JID. Accounts have few resources, so a vector is the cheapest map.
    accounts: HashMap<String, Vec<pb::Session>>,
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
        let sessions = self.accounts.entry(bare.clone()).or_default();
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
        let mut all = Vec::new();
        let mut touched = Vec::new();
        for (bare, sessions) in &mut self.accounts {
            if !sessions.iter().any(|s| s.node == node) {
                continue;
            }
            let mut removed = Vec::new();
            sessions.retain(|s| {
                if s.node == node {
                    removed.push(s.clone());
                    false
                } else {
                    true
                }
            });
            touched.push((bare.clone(), removed));
        }
        // Sorted so the order of changes does not depend on the hash map's iteration order.
        touched.sort_by(|a, b| a.0.cmp(&b.0));
        for (bare, removed) in touched {
            self.sessions -= removed.len();
            if self.accounts.get(&bare).is_some_and(Vec::is_empty) {
                self.accounts.remove(&bare);
            }
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
    pub(crate) fn to_snapshot(&self) -> pb::SnapshotData {
        let mut bares: Vec<&String> = self.accounts.keys().collect();
        bares.sort();
        let mut sessions = Vec::with_capacity(self.sessions);
        for bare in bares {
            if let Some(v) = self.accounts.get(bare) {
                sessions.extend(v.iter().cloned());
            }
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
            state
                .accounts
                .entry(bare_of(&s.jid).to_owned())
                .or_default()
                .push(s);
            state.sessions += 1;
        }
        for l in data.leases {
            state.leases.insert(l.node, l.expires_ms);
        }
        state
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
}
