//! Server-side batching: concurrent write requests for one shard are merged into one Raft
//! entry. A proposer task per shard takes every request queued while the previous entry was
//! being submitted, stamps the batch with the leader's clock, and hands it to openraft; the
//! results are split back per request. Several entries may be in flight (openraft pipelines
//! them); their order in the log is the order of submission.
//!
//! The rebalancer may **hold** a proposer while it hands the shard's leadership to another
//! node ([`Proposer::hold`]): requests keep queueing (bounded) and are submitted once the hold
//! is released, answered `NotLeader` if the leadership moved meanwhile.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::error::ClientWriteError;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::codec::{MemberId, ShardRaft};
use crate::pb;

/// Why a proposal did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProposeError {
    /// This node does not lead the shard (any more); the leader, if known.
    #[error("not the leader")]
    NotLeader(Option<(MemberId, String)>),
    /// The proposal queue is full: the shard is overloaded.
    #[error("proposal queue full")]
    Overloaded,
    /// Raft failed or is shutting down; the outcome of the operations is unknown.
    #[error("raft: {0}")]
    Failed(String),
}

type Reply = oneshot::Sender<Result<(u64, Vec<pb::OpResult>), ProposeError>>;

struct Proposal {
    ops: Vec<pb::Op>,
    reply: Reply,
}

/// The write queue of one shard's leader.
#[derive(Debug, Clone)]
pub(crate) struct Proposer {
    tx: mpsc::Sender<Proposal>,
    hold: Arc<watch::Sender<bool>>,
}

/// Keeps a proposer's submissions on hold while it lives (see [`Proposer::hold`]).
#[derive(Debug)]
pub(crate) struct Hold(Arc<watch::Sender<bool>>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// Milliseconds since the Unix epoch by this node's clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Proposer {
    /// Starts the proposer task of a shard. `queue` bounds waiting requests, `max_ops` the
    /// operations of one entry, `in_flight` the entries submitted and not yet applied.
    pub(crate) fn spawn(
        shard: u32,
        raft: ShardRaft,
        queue: usize,
        max_ops: usize,
        in_flight: usize,
        cancel: CancellationToken,
    ) -> (Proposer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (hold, held) = watch::channel(false);
        let task = tokio::spawn(run(
            shard,
            raft,
            rx,
            held,
            max_ops.max(1),
            in_flight.max(1),
            cancel,
        ));
        (
            Proposer {
                tx,
                hold: Arc::new(hold),
            },
            task,
        )
    }

    /// Holds new submissions until the returned guard is dropped; entries already submitted
    /// go on.
    pub(crate) fn hold(&self) -> Hold {
        self.hold.send_replace(true);
        Hold(self.hold.clone())
    }

    /// Proposes `ops` and waits for them to be committed and applied; returns the log index
    /// and one result per operation.
    pub(crate) async fn propose(
        &self,
        ops: Vec<pb::Op>,
    ) -> Result<(u64, Vec<pb::OpResult>), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Proposal { ops, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ProposeError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    ProposeError::Failed("proposer stopped".into())
                }
            })?;
        rx.await
            .map_err(|_| ProposeError::Failed("proposer stopped".into()))?
    }
}

async fn run(
    shard: u32,
    raft: ShardRaft,
    mut rx: mpsc::Receiver<Proposal>,
    mut held: watch::Receiver<bool>,
    max_ops: usize,
    in_flight: usize,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    let shard_label = shard.to_string();
    loop {
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            () = cancel.cancelled() => return,
        };
        // Wait for room in the pipeline before draining, so requests that arrive meanwhile
        // join this entry.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // A hold (leadership hand-over) keeps the next entry back; what queues meanwhile
        // joins it.
        tokio::select! {
            r = held.wait_for(|h| !*h) => if r.is_err() { return },
            () = cancel.cancelled() => return,
        }
        let mut group = vec![first];
        let mut ops_n = group[0].ops.len();
        while ops_n < max_ops {
            match rx.try_recv() {
                Ok(p) => {
                    ops_n += p.ops.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let mut counts = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut ops = Vec::with_capacity(ops_n);
        for p in group {
            counts.push(p.ops.len());
            ops.extend(p.ops);
            replies.push(p.reply);
        }
        metrics::histogram!("starling_registry_entry_ops", "shard" => shard_label.clone())
            .record(ops.len() as f64);
        let batch = pb::Batch {
            time_ms: now_ms(),
            ops,
        };
        match raft.client_write_ff(batch).await {
            Err(fatal) => {
                drop(permit);
                let e = ProposeError::Failed(fatal.to_string());
                for r in replies {
                    let _ = r.send(Err(e.clone()));
                }
            }
            Ok(pending) => {
                tokio::spawn(async move {
                    let outcome = match pending.await {
                        Ok(Ok(resp)) => Ok((resp.log_id.index, resp.data)),
                        Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(
                            ProposeError::NotLeader(f.leader_id.zip(f.leader_node.map(|n| n.addr))),
                        ),
                        Ok(Err(e)) => Err(ProposeError::Failed(e.to_string())),
                        Err(_) => Err(ProposeError::Failed("raft stopped".into())),
                    };
                    drop(permit);
                    metrics::counter!(
                        "starling_registry_entries_total",
                        "outcome" => if outcome.is_ok() { "committed" } else { "failed" }
                    )
                    .increment(1);
                    match outcome {
                        Ok((index, results)) => {
                            let mut results = results.into_iter();
                            for (reply, n) in replies.into_iter().zip(counts) {
                                let part: Vec<pb::OpResult> = results.by_ref().take(n).collect();
                                let _ = reply.send(Ok((index, part)));
                            }
                        }
                        Err(e) => {
                            for r in replies {
                                let _ = r.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        }
    }
}
