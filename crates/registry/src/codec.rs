//! The openraft 0.9 type configuration of the registry, and the conversions between openraft's
//! types and their protobuf form (`proto/registry.proto`), used both on the wire (Raft
//! transport) and on disk (log entries, vote, snapshots). Decoding never panics: a malformed
//! message from a peer or a damaged record becomes a [`CodecError`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};

use crate::pb;

openraft::declare_raft_types!(
    /// The registry's Raft types: entries carry a [`pb::Batch`] of operations, applying one
    /// returns one [`pb::OpResult`] per operation.
    pub TypeConfig:
        D = pb::Batch,
        R = Vec<pb::OpResult>,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A registry member's id in Raft.
pub type MemberId = u64;
/// One shard's Raft instance.
pub(crate) type ShardRaft = openraft::Raft<TypeConfig>;

/// A protobuf message that does not describe a valid openraft value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed registry message: {0}")]
pub struct CodecError(pub &'static str);

pub(crate) fn vote_to_pb(v: &Vote<MemberId>) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node_id: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub(crate) fn vote_from_pb(v: Option<pb::Vote>) -> Result<Vote<MemberId>, CodecError> {
    let v = v.ok_or(CodecError("missing vote"))?;
    Ok(if v.committed {
        Vote::new_committed(v.term, v.node_id)
    } else {
        Vote::new(v.term, v.node_id)
    })
}

pub(crate) fn log_id_to_pb(l: &LogId<MemberId>) -> pb::LogId {
    pb::LogId {
        term: l.leader_id.term,
        node_id: l.leader_id.node_id,
        index: l.index,
    }
}

pub(crate) fn opt_log_id_to_pb(l: Option<&LogId<MemberId>>) -> Option<pb::LogId> {
    l.map(log_id_to_pb)
}

pub(crate) fn log_id_from_pb(l: &pb::LogId) -> LogId<MemberId> {
    LogId::new(CommittedLeaderId::new(l.term, l.node_id), l.index)
}

pub(crate) fn opt_log_id_from_pb(l: Option<&pb::LogId>) -> Option<LogId<MemberId>> {
    l.map(log_id_from_pb)
}

pub(crate) fn membership_to_pb(m: &Membership<MemberId, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeSet {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| pb::Member {
                id: *id,
                addr: n.addr.clone(),
            })
            .collect(),
    }
}

pub(crate) fn membership_from_pb(m: &pb::Membership) -> Membership<MemberId, BasicNode> {
    let configs: Vec<BTreeSet<MemberId>> = m
        .configs
        .iter()
        .map(|c| c.ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<MemberId, BasicNode> = m
        .nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(&n.addr)))
        .collect();
    Membership::new(configs, nodes)
}

pub(crate) fn entry_to_pb(e: &Entry<TypeConfig>) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Empty {}),
        EntryPayload::Normal(b) => pb::entry::Payload::Normal(b.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

pub(crate) fn entry_from_pb(e: pb::Entry) -> Result<Entry<TypeConfig>, CodecError> {
    let log_id = log_id_from_pb(
        e.log_id
            .as_ref()
            .ok_or(CodecError("entry without log id"))?,
    );
    let payload = match e.payload.ok_or(CodecError("entry without payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(b) => EntryPayload::Normal(b),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(&m)),
    };
    Ok(Entry { log_id, payload })
}

pub(crate) fn snapshot_meta_to_pb(m: &SnapshotMeta<MemberId, BasicNode>) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(m.last_log_id.as_ref()),
        last_membership_log_id: opt_log_id_to_pb(m.last_membership.log_id().as_ref()),
        last_membership: Some(membership_to_pb(m.last_membership.membership())),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub(crate) fn snapshot_meta_from_pb(
    m: &pb::SnapshotMeta,
) -> Result<SnapshotMeta<MemberId, BasicNode>, CodecError> {
    let membership = membership_from_pb(
        m.last_membership
            .as_ref()
            .ok_or(CodecError("snapshot without membership"))?,
    );
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(m.last_log_id.as_ref()),
        last_membership: StoredMembership::new(
            opt_log_id_from_pb(m.last_membership_log_id.as_ref()),
            membership,
        ),
        snapshot_id: m.snapshot_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let log_id = LogId::new(CommittedLeaderId::new(3, 2), 17);
        let members: BTreeMap<u64, BasicNode> = [
            (1, BasicNode::new("a:1")),
            (2, BasicNode::new("b:2")),
            (4, BasicNode::new("d:4")),
        ]
        .into();
        let m = Membership::new(vec![[1, 2].into(), [1, 2, 4].into()], members);
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(pb::Batch {
                time_ms: 9,
                ops: vec![pb::Op {
                    op: Some(pb::op::Op::RemoveNode(pb::RemoveNode { node: "e".into() })),
                }],
            }),
            EntryPayload::Membership(m),
        ] {
            let e = Entry::<TypeConfig> { log_id, payload };
            let back = entry_from_pb(entry_to_pb(&e)).unwrap();
            assert_eq!(back, e);
        }
        assert!(entry_from_pb(pb::Entry::default()).is_err());
    }

    #[test]
    fn votes_and_meta_round_trip() {
        for v in [Vote::new(4, 1), Vote::new_committed(5, 2)] {
            assert_eq!(vote_from_pb(Some(vote_to_pb(&v))).unwrap(), v);
        }
        let members: BTreeMap<u64, BasicNode> = [(1, BasicNode::new("a:1"))].into();
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
            last_membership: StoredMembership::new(
                Some(LogId::new(CommittedLeaderId::new(1, 1), 0)),
                Membership::new(vec![[1].into()], members),
            ),
            snapshot_id: "s-1".into(),
        };
        assert_eq!(
            snapshot_meta_from_pb(&snapshot_meta_to_pb(&meta)).unwrap(),
            meta
        );
    }
}
