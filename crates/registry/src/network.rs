//! The Raft transport's sending side: openraft's `RaftNetwork` over tonic, one factory per
//! shard (each message names its shard), sharing one HTTP/2 channel per peer address across
//! all shards of a node.

// openraft's `RPCError` is large; it is the return type `RaftNetwork` requires.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, SnapshotMismatch,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, SnapshotSegmentId};
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};

use crate::codec::{self, CodecError, MemberId, TypeConfig};
use crate::pb;
use crate::pb::raft_transport_client::RaftTransportClient;

/// The largest message a registry node or client accepts (entries and snapshot chunks).
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 channels by peer address, created on first use and reused by every shard.
#[derive(Debug, Default)]
pub(crate) struct Channels {
    map: Mutex<HashMap<String, Channel>>,
}

/// Why a peer address cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("bad registry address {addr}: {reason}")]
pub(crate) struct BadAddress {
    addr: String,
    reason: String,
}

impl Channels {
    /// The channel to `addr` (`host:port`), connecting lazily.
    pub(crate) fn get(&self, addr: &str) -> Result<Channel, BadAddress> {
        if let Some(c) = self.map.lock().get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BadAddress {
                addr: addr.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        self.map.lock().insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// openraft's network factory for one shard.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub(crate) shard: u32,
    pub(crate) channels: Arc<Channels>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: MemberId, node: &BasicNode) -> Connection {
        Connection {
            shard: self.shard,
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
        }
    }
}

/// A connection from one shard's leader to one peer.
#[derive(Debug)]
pub(crate) struct Connection {
    shard: u32,
    target: MemberId,
    addr: String,
    channels: Arc<Channels>,
}

type RpcErr<E = openraft::error::Infallible> =
    RPCError<MemberId, BasicNode, RaftError<MemberId, E>>;

fn status_err<E: std::error::Error>(s: tonic::Status) -> RpcErr<E> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            RPCError::Unreachable(Unreachable::new(&s))
        }
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

fn codec_err<E: std::error::Error>(e: CodecError) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl Connection {
    fn client<E: std::error::Error>(&self) -> Result<RaftTransportClient<Channel>, RpcErr<E>> {
        let channel = self
            .channels
            .get(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn request<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(option.hard_ttl());
        r
    }

    fn count(&self, rpc: &'static str, ok: bool) {
        metrics::counter!(
            "starling_registry_raft_rpc_total",
            "rpc" => rpc,
            "outcome" => if ok { "ok" } else { "error" }
        )
        .increment(1);
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MemberId>, RpcErr> {
        let msg = pb::AppendEntriesRequest {
            shard: self.shard,
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            prev_log_id: codec::opt_log_id_to_pb(rpc.prev_log_id.as_ref()),
            entries: rpc.entries.iter().map(codec::entry_to_pb).collect(),
            leader_commit: codec::opt_log_id_to_pb(rpc.leader_commit.as_ref()),
        };
        let res = self
            .client()?
            .append_entries(Self::request(msg, &option))
            .await;
        self.count("append_entries", res.is_ok());
        let res = res.map_err(status_err)?.into_inner();
        use pb::append_entries_response::Result as R;
        match res.result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => Ok(AppendEntriesResponse::PartialSuccess(
                codec::opt_log_id_from_pb(p.matching.as_ref()),
            )),
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => Ok(AppendEntriesResponse::HigherVote(
                codec::vote_from_pb(Some(v)).map_err(codec_err)?,
            )),
            None => Err(codec_err(CodecError(
                "append-entries response without result",
            ))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<MemberId>, RpcErr<InstallSnapshotError>> {
        let msg = pb::InstallSnapshotRequest {
            shard: self.shard,
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            meta: Some(codec::snapshot_meta_to_pb(&rpc.meta)),
            offset: rpc.offset,
            data: rpc.data.into(),
            done: rpc.done,
        };
        let res = self
            .client()?
            .install_snapshot(Self::request(msg, &option))
            .await;
        self.count("install_snapshot", res.is_ok());
        let res = res.map_err(status_err)?.into_inner();
        use pb::install_snapshot_response::Result as R;
        match res.result {
            Some(R::Vote(v)) => Ok(InstallSnapshotResponse {
                vote: codec::vote_from_pb(Some(v)).map_err(codec_err)?,
            }),
            Some(R::Mismatch(m)) => Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: SnapshotSegmentId {
                        id: m.expect_id,
                        offset: m.expect_offset,
                    },
                    got: SnapshotSegmentId {
                        id: m.got_id,
                        offset: m.got_offset,
                    },
                })),
            ))),
            None => Err(codec_err(CodecError(
                "install-snapshot response without result",
            ))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MemberId>,
        option: RPCOption,
    ) -> Result<VoteResponse<MemberId>, RpcErr> {
        let msg = pb::VoteRequest {
            shard: self.shard,
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            last_log_id: codec::opt_log_id_to_pb(rpc.last_log_id.as_ref()),
        };
        let res = self.client()?.vote(Self::request(msg, &option)).await;
        self.count("vote", res.is_ok());
        let res = res.map_err(status_err)?.into_inner();
        Ok(VoteResponse {
            vote: codec::vote_from_pb(res.vote).map_err(codec_err)?,
            vote_granted: res.vote_granted,
            last_log_id: codec::opt_log_id_from_pb(res.last_log_id.as_ref()),
        })
    }
}
