//! The gRPC services of a registry node: the Raft transport's receiving side and the client
//! API (`proto/registry.proto`). Requests for a shard this node does not lead are answered
//! with `NotLeader` and the leader's address, never forwarded.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use crate::codec::{self, MemberId};
use crate::node::{Shard, Shared};
use crate::pb;
use crate::proposer::ProposeError;
use crate::shard::{bare_of, shard_of};

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

/// The Raft transport's server side.
#[derive(Debug)]
pub(crate) struct RaftService {
    shared: Arc<Shared>,
}

impl RaftService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RaftService { shared }
    }
}

#[tonic::async_trait]
impl pb::raft_transport_server::RaftTransport for RaftService {
    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = request.into_inner();
        let shard = self.shared.shard(req.shard)?;
        let rpc = VoteRequest {
            vote: codec::vote_from_pb(req.vote).map_err(bad)?,
            last_log_id: codec::opt_log_id_from_pb(req.last_log_id.as_ref()),
        };
        let resp = shard.raft.vote(rpc).await.map_err(unavailable)?;
        Ok(Response::new(pb::VoteResponse {
            vote: Some(codec::vote_to_pb(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_to_pb(resp.last_log_id.as_ref()),
        }))
    }

    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let req = request.into_inner();
        let shard = self.shared.shard(req.shard)?;
        let entries = req
            .entries
            .into_iter()
            .map(codec::entry_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let rpc = AppendEntriesRequest {
            vote: codec::vote_from_pb(req.vote).map_err(bad)?,
            prev_log_id: codec::opt_log_id_from_pb(req.prev_log_id.as_ref()),
            entries,
            leader_commit: codec::opt_log_id_from_pb(req.leader_commit.as_ref()),
        };
        let resp = shard.raft.append_entries(rpc).await.map_err(unavailable)?;
        use openraft::raft::AppendEntriesResponse as A;
        use pb::append_entries_response::Result as R;
        let result = match resp {
            A::Success => R::Success(pb::Empty {}),
            A::PartialSuccess(m) => R::PartialSuccess(pb::PartialSuccess {
                matching: codec::opt_log_id_to_pb(m.as_ref()),
            }),
            A::Conflict => R::Conflict(pb::Empty {}),
            A::HigherVote(v) => R::HigherVote(codec::vote_to_pb(&v)),
        };
        Ok(Response::new(pb::AppendEntriesResponse {
            result: Some(result),
        }))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let req = request.into_inner();
        let shard = self.shared.shard(req.shard)?;
        let meta = codec::snapshot_meta_from_pb(
            req.meta
                .as_ref()
                .ok_or_else(|| bad("snapshot without meta"))?,
        )
        .map_err(bad)?;
        let rpc = InstallSnapshotRequest {
            vote: codec::vote_from_pb(req.vote).map_err(bad)?,
            meta,
            offset: req.offset,
            data: req.data.to_vec(),
            done: req.done,
        };
        use pb::install_snapshot_response::Result as R;
        let result = match shard.raft.install_snapshot(rpc).await {
            Ok(resp) => R::Vote(codec::vote_to_pb(&resp.vote)),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
                R::Mismatch(pb::SnapshotMismatch {
                    expect_id: m.expect.id,
                    expect_offset: m.expect.offset,
                    got_id: m.got.id,
                    got_offset: m.got.offset,
                })
            }
            Err(e) => return Err(unavailable(e)),
        };
        Ok(Response::new(pb::InstallSnapshotResponse {
            result: Some(result),
        }))
    }

    async fn campaign(
        &self,
        request: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignResponse>, Status> {
        let req = request.into_inner();
        let shard = self.shared.shard(req.shard)?;
        let refused = crate::rebalance::campaign(self.shared.id, shard, &req).await;
        if let Some(reason) = &refused {
            tracing::info!(
                shard = req.shard,
                from = req.from,
                reason,
                "registry campaign refused"
            );
        }
        Ok(Response::new(pb::CampaignResponse {
            started: refused.is_none(),
            refused: refused.unwrap_or_default(),
        }))
    }
}

/// The client API.
#[derive(Debug)]
pub(crate) struct RegistryService {
    shared: Arc<Shared>,
}

impl RegistryService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RegistryService { shared }
    }

    fn not_leader(&self, shard: u32, leader: Option<(MemberId, String)>) -> pb::NotLeader {
        metrics::counter!("starling_registry_requests_total", "outcome" => "not_leader")
            .increment(1);
        match leader {
            Some((id, addr)) if id != self.shared.id => pb::NotLeader {
                shard,
                leader_id: Some(id),
                leader_addr: addr,
            },
            _ => pb::NotLeader {
                shard,
                leader_id: None,
                leader_addr: String::new(),
            },
        }
    }

    fn is_leader(&self, s: &Shard) -> bool {
        s.raft.metrics().borrow().current_leader == Some(self.shared.id)
    }
}

/// The bare JID an operation writes, if it writes one account.
fn op_key(op: &pb::Op) -> Result<Option<&str>, Status> {
    use pb::op::Op;
    Ok(match &op.op {
        Some(Op::Bind(b)) => Some(bare_of(
            &b.session
                .as_ref()
                .ok_or_else(|| bad("bind without a session"))?
                .jid,
        )),
        Some(Op::Unbind(u)) => Some(bare_of(&u.jid)),
        Some(Op::SetPresence(p)) => Some(bare_of(&p.jid)),
        Some(Op::SetResumption(r)) => Some(bare_of(&r.jid)),
        Some(Op::Heartbeat(_)) | Some(Op::RemoveNode(_)) => None,
        Some(Op::ExpireLeases(_)) => {
            return Err(Status::permission_denied(
                "lease expiry is decided by the shard leader",
            ));
        }
        None => return Err(bad("empty operation")),
    })
}

fn query(state: &crate::state::ShardState, q: &pb::Query) -> Result<pb::QueryResult, Status> {
    use pb::query::Query as Q;
    Ok(match &q.query {
        Some(Q::Bare(b)) => pb::QueryResult {
            sessions: state.sessions(b),
            count: 0,
        },
        Some(Q::Full(f)) => pb::QueryResult {
            sessions: state.session(f).into_iter().collect(),
            count: 0,
        },
        Some(Q::Resumption(r)) => pb::QueryResult {
            sessions: state.by_resumption(&r.bare, &r.id).into_iter().collect(),
            count: 0,
        },
        Some(Q::Count(_)) => pb::QueryResult {
            sessions: Vec::new(),
            count: state.count() as u64,
        },
        None => return Err(bad("empty query")),
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        let shards = u32::try_from(self.shared.shards.len()).unwrap_or(u32::MAX);
        let shard = self.shared.shard(req.shard)?;
        for op in &req.ops {
            if let Some(bare) = op_key(op)?
                && shard_of(bare, shards) != req.shard
            {
                return Err(bad(format!("{bare} is not in shard {}", req.shard)));
            }
        }
        use pb::write_response::Outcome;
        if !self.is_leader(shard) {
            let nl = self.not_leader(req.shard, self.shared.leader(shard));
            return Ok(Response::new(pb::WriteResponse {
                outcome: Some(Outcome::NotLeader(nl)),
            }));
        }
        match shard.proposer.propose(req.ops).await {
            Ok((index, results)) => {
                metrics::counter!("starling_registry_requests_total", "outcome" => "written")
                    .increment(1);
                Ok(Response::new(pb::WriteResponse {
                    outcome: Some(Outcome::Ok(pb::WriteOk { index, results })),
                }))
            }
            Err(ProposeError::NotLeader(leader)) => Ok(Response::new(pb::WriteResponse {
                outcome: Some(Outcome::NotLeader(self.not_leader(req.shard, leader))),
            })),
            Err(ProposeError::Overloaded) => {
                metrics::counter!("starling_registry_requests_total", "outcome" => "overloaded")
                    .increment(1);
                Err(Status::resource_exhausted("registry shard overloaded"))
            }
            Err(ProposeError::Failed(e)) => Err(Status::unavailable(e)),
        }
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let req = request.into_inner();
        let shard = self.shared.shard(req.shard)?;
        use pb::read_response::Outcome;
        if req.linearizable {
            match shard.raft.ensure_linearizable().await {
                Ok(_) => {}
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    let leader = f.leader_id.zip(f.leader_node.map(|n| n.addr));
                    return Ok(Response::new(pb::ReadResponse {
                        outcome: Some(Outcome::NotLeader(self.not_leader(req.shard, leader))),
                    }));
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        let (index, results) = shard.machine.read(|st| {
            req.queries
                .iter()
                .map(|q| query(st, q))
                .collect::<Result<Vec<_>, _>>()
        });
        Ok(Response::new(pb::ReadResponse {
            outcome: Some(Outcome::Ok(pb::ReadOk {
                index,
                results: results?,
            })),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let wanted: Vec<u32> = if req.shards.is_empty() {
            (0..u32::try_from(self.shared.shards.len()).unwrap_or(0)).collect()
        } else {
            req.shards
        };
        let (tx, rx) = mpsc::channel::<Result<pb::WatchEvent, Status>>(256);
        for shard in wanted {
            let mut events = self.shared.shard(shard)?.machine.subscribe();
            let tx = tx.clone();
            let cancel = self.shared.cancel.clone();
            tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        e = events.recv() => e,
                        () = cancel.cancelled() => return,
                        () = tx.closed() => return,
                    };
                    let msg = match event {
                        Ok(e) => (*e).clone(),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            metrics::counter!("starling_registry_watch_lagged_total").increment(n);
                            pb::WatchEvent {
                                shard,
                                index: 0,
                                changes: Vec::new(),
                                resync: true,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn members(
        &self,
        _request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let mut shards = Vec::with_capacity(self.shared.shards.len());
        for (i, s) in self.shared.shards.iter().enumerate() {
            let m = s.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<MemberId> = membership.voter_ids().collect();
            let member = |(id, n): (&MemberId, &BasicNode)| pb::Member {
                id: *id,
                addr: n.addr.clone(),
            };
            let nodes: BTreeMap<&MemberId, &BasicNode> = membership.nodes().collect();
            shards.push(pb::ShardStatus {
                shard: u32::try_from(i).unwrap_or(u32::MAX),
                initialized: m.vote.leader_id.term > 0 || m.last_log_index.is_some(),
                voters: nodes
                    .iter()
                    .filter(|(id, _)| voters.contains(id))
                    .map(|(id, n)| member((id, n)))
                    .collect(),
                learners: nodes
                    .iter()
                    .filter(|(id, _)| !voters.contains(id))
                    .map(|(id, n)| member((id, n)))
                    .collect(),
                leader: m.current_leader,
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                applied_index: m.last_applied.map_or(0, |l| l.index),
            });
        }
        Ok(Response::new(pb::MembersResponse {
            node_id: self.shared.id,
            shards,
        }))
    }

    async fn change_members(
        &self,
        request: Request<pb::ChangeMembersRequest>,
    ) -> Result<Response<pb::ChangeMembersResponse>, Status> {
        let req = request.into_inner();
        let shard = self.shared.shard(req.shard)?;
        use pb::change_members_response::Outcome;
        let outcome = |o| {
            Ok(Response::new(pb::ChangeMembersResponse {
                outcome: Some(o),
            }))
        };
        let forward = |e: &RaftError<MemberId, ClientWriteError<MemberId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Some(
                f.leader_id
                    .zip(f.leader_node.as_ref().map(|n| n.addr.clone())),
            ),
            _ => None,
        };
        if !self.is_leader(shard) {
            return outcome(Outcome::NotLeader(
                self.not_leader(req.shard, self.shared.leader(shard)),
            ));
        }
        let result = match req.change {
            Some(pb::change_members_request::Change::Add(m)) => {
                tracing::info!(shard = req.shard, id = m.id, addr = %m.addr, "adding registry member");
                match shard
                    .raft
                    .add_learner(m.id, BasicNode::new(&m.addr), true)
                    .await
                {
                    Ok(_) => shard
                        .raft
                        .change_membership(ChangeMembers::AddVoterIds([m.id].into()), false)
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                }
            }
            Some(pb::change_members_request::Change::Remove(id)) => {
                tracing::info!(shard = req.shard, id, "removing registry member");
                let m = shard.raft.metrics().borrow().clone();
                let is_voter = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == id);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters([id].into())
                } else {
                    ChangeMembers::RemoveNodes([id].into())
                };
                shard
                    .raft
                    .change_membership(change, false)
                    .await
                    .map(|_| ())
            }
            None => return Err(bad("no membership change given")),
        };
        match result {
            Ok(()) => outcome(Outcome::Ok(pb::Empty {})),
            Err(e) => match forward(&e) {
                Some(leader) => outcome(Outcome::NotLeader(self.not_leader(req.shard, leader))),
                None => outcome(Outcome::Error(e.to_string())),
            },
        }
    }
}
