//! The registry client used by edges and routers: a [`SessionRegistry`] over the gRPC API of
//! a replicated registry.
//!
//! - **Leader finding**: the client keeps the last known leader of each shard; a `NotLeader`
//!   answer names the new one (followed at once), an unknown leader or a transport error
//!   makes it try the other members, with exponential backoff and jitter, until the
//!   operation's deadline. An attempt unanswered within `attempt_timeout` (a paused or cut-off
//!   member) counts as a transport error, so one silent member cannot hold a shard's writes.
//! - **Batching**: writes queue per shard; one task per shard sends everything queued as one
//!   request, with up to `requests_in_flight_per_shard` requests in flight, so concurrent binds
//!   share a request (and, on the leader, a Raft entry). A full queue makes callers wait until
//!   their deadline.
//! - **Reads** are linearizable by default (the leader confirms its leadership with a quorum,
//!   read index, before answering). In [`ReadMode::Cached`], account lookups are answered
//!   from a bounded local cache kept fresh by the watch stream; a miss reads through the
//!   leader, and any gap in the stream (reconnect, lag) drops the cached accounts of the
//!   shard. Cached answers may be stale for the time a change takes to reach the watcher,
//!   which routers tolerate (DESIGN.md: a stale route is detected by the edge and retried).
//!
//! **Bulk removals**: in [`ReadMode::Cached`] the watch stream also reports the sessions a
//! lease expiry removed (`Change::expired_node`), and [`SessionRegistry::node_removals`]
//! hands them on as [`NodeRemoved`] events, one per shard and node; removals made through
//! this client's own `remove_node` are reported too.
//!
//! **Retries and outcomes**: a write whose answer was lost is retried; binds are idempotent
//! for the same stream id, heartbeats always are, and an unbind retried after it took effect
//! reports `false`. An error return means the outcome is unknown, never that nothing happened.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use starling_xmpp::{BareJid, FullJid};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;

use crate::codec::MemberId;
use crate::network::{Channels, MAX_MESSAGE_BYTES};
use crate::pb;
use crate::pb::registry_client::RegistryClient as Grpc;
use crate::shard::shard_of;
use crate::{
    BindOutcome, NODE_REMOVALS_BUFFER, NodeRemoved, RegistryError, SessionRecord, SessionRegistry,
};

/// How lookups are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Every lookup reads through the shard leader (read index).
    Linearizable,
    /// Account lookups use the watch-fed local cache; misses read through the leader.
    Cached,
}

/// Client settings; `ClientConfig::new` holds the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Addresses (`host:port`) of registry members to start from.
    pub seeds: Vec<String>,
    /// Most resources per account (0 for no limit).
    pub max_per_account: u32,
    /// Time allowed for one operation, retries included.
    pub deadline: Duration,
    /// Time allowed for one attempt at one member; then the next member is tried (a member
    /// that is paused or partitioned answers nothing, and must not hold the shard's writes
    /// for the whole deadline).
    pub attempt_timeout: Duration,
    /// Time allowed for one membership change of one shard (it waits for a learner to catch
    /// up).
    pub membership_deadline: Duration,
    /// First and largest pause between retries.
    pub backoff: (Duration, Duration),
    /// Most operations in one write request.
    pub max_batch_ops: usize,
    /// Write requests of one shard in flight at once; what queues meanwhile is batched into
    /// the next. Operations of one caller are never in flight together (each call waits), so
    /// pipelining reorders nothing a caller can observe.
    pub requests_in_flight_per_shard: usize,
    /// Writes waiting per shard; callers wait for room until their deadline.
    pub queue_per_shard: usize,
    /// How lookups are answered.
    pub reads: ReadMode,
    /// Most accounts in the lookup cache.
    pub cache_capacity: usize,
}

impl ClientConfig {
    /// The defaults, for the given members.
    pub fn new(seeds: Vec<String>) -> Self {
        ClientConfig {
            seeds,
            max_per_account: 64,
            deadline: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(2),
            membership_deadline: Duration::from_secs(60),
            backoff: (Duration::from_millis(20), Duration::from_millis(500)),
            max_batch_ops: 512,
            requests_in_flight_per_shard: 4,
            queue_per_shard: 8192,
            reads: ReadMode::Linearizable,
            cache_capacity: 100_000,
        }
    }
}

fn unavailable(msg: impl Into<String>) -> RegistryError {
    RegistryError::Unavailable(msg.into())
}

/// What a shard's cache knows about its watch stream.
#[derive(Debug, Default, Clone, Copy)]
struct ShardWatch {
    /// The stream is up and has delivered everything since `generation` began.
    live: bool,
    /// Bumped on every (re)connection and resync.
    generation: u64,
    /// The index of the last event seen.
    last_event: u64,
}

#[derive(Debug)]
struct CacheEntry {
    index: u64,
    sessions: Vec<pb::Session>,
}

#[derive(Debug)]
struct Cache {
    capacity: usize,
    accounts: Mutex<HashMap<String, CacheEntry>>,
    shards: Mutex<Vec<ShardWatch>>,
}

impl Cache {
    fn new(capacity: usize, shards: u32) -> Self {
        Cache {
            capacity,
            accounts: Mutex::new(HashMap::new()),
            shards: Mutex::new(vec![ShardWatch::default(); shards as usize]),
        }
    }

    /// The cached sessions of `bare`, if the shard's stream is live.
    fn get(&self, shard: u32, bare: &str) -> Option<Vec<pb::Session>> {
        let live = self
            .shards
            .lock()
            .get(shard as usize)
            .is_some_and(|w| w.live);
        if !live {
            return None;
        }
        let hit = self.accounts.lock().get(bare).map(|e| e.sessions.clone());
        metrics::counter!(
            "starling_registry_client_cache_total",
            "outcome" => if hit.is_some() { "hit" } else { "miss" }
        )
        .increment(1);
        hit
    }

    /// The generation a read must quote to fill the cache, if the shard is live.
    fn generation(&self, shard: u32) -> Option<u64> {
        self.shards
            .lock()
            .get(shard as usize)
            .filter(|w| w.live)
            .map(|w| w.generation)
    }

    /// Caches a read answered at `index`, unless the stream restarted or already went past
    /// it since the read began.
    fn fill(&self, shard: u32, generation: u64, bare: &str, index: u64, sessions: &[pb::Session]) {
        let shards = self.shards.lock();
        let Some(w) = shards.get(shard as usize) else {
            return;
        };
        if !w.live || w.generation != generation || index < w.last_event {
            return;
        }
        let mut accounts = self.accounts.lock();
        if accounts.len() >= self.capacity && !accounts.contains_key(bare) {
            // Full: drop one entry (any) so the cache stays bounded.
            let victim = accounts.keys().next().cloned();
            if let Some(v) = victim {
                accounts.remove(&v);
                metrics::counter!("starling_registry_client_cache_evictions_total").increment(1);
            }
        }
        if self.capacity > 0 {
            accounts.insert(
                bare.to_owned(),
                CacheEntry {
                    index,
                    sessions: sessions.to_vec(),
                },
            );
        }
    }

    fn event(&self, shards_n: u32, event: &pb::WatchEvent) {
        let mut shards = self.shards.lock();
        let Some(w) = shards.get_mut(event.shard as usize) else {
            return;
        };
        if event.resync {
            w.generation += 1;
            drop(shards);
            self.drop_shard(shards_n, event.shard);
            return;
        }
        w.last_event = w.last_event.max(event.index);
        let mut accounts = self.accounts.lock();
        drop(shards);
        for c in &event.changes {
            if let Some(e) = accounts.get_mut(&c.bare)
                && event.index > e.index
            {
                e.index = event.index;
                e.sessions.clone_from(&c.sessions);
            }
        }
    }

    fn drop_shard(&self, shards_n: u32, shard: u32) {
        self.accounts
            .lock()
            .retain(|bare, _| shard_of(bare, shards_n) != shard);
    }

    fn set_live(&self, live: bool) {
        let mut shards = self.shards.lock();
        for w in shards.iter_mut() {
            w.live = live;
            w.generation += 1;
        }
        drop(shards);
        self.accounts.lock().clear();
    }
}

struct PendingWrite {
    op: pb::Op,
    reply: oneshot::Sender<Result<pb::OpResult, RegistryError>>,
}

/// Shared by the client handles and its tasks.
#[derive(Debug)]
struct Core {
    cfg: ClientConfig,
    shards: u32,
    channels: Channels,
    /// The last known leader address of each shard.
    leaders: Mutex<Vec<Option<String>>>,
    /// Every member address known (seeds and learned), tried in turn when no leader is known.
    members: Mutex<Vec<String>>,
    cache: Cache,
    /// Bulk removals for [`SessionRegistry::node_removals`] subscribers.
    removals: tokio::sync::broadcast::Sender<Arc<NodeRemoved>>,
}

/// A [`SessionRegistry`] over a replicated registry cluster. Cheap to clone; its background
/// tasks stop when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    core: Arc<Core>,
    writers: Arc<Vec<mpsc::Sender<PendingWrite>>>,
    _stop: Arc<DropGuard>,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingWrite")
    }
}

fn to_pb(r: &SessionRecord) -> pb::Session {
    pb::Session {
        jid: r.jid.to_string(),
        node: r.node.to_string(),
        stream_id: r.stream_id.to_string(),
        priority: i32::from(r.priority),
        presence: r.presence.clone(),
        resumption: r.resumption.as_deref().map(str::to_owned),
    }
}

fn from_pb(s: pb::Session) -> Result<SessionRecord, RegistryError> {
    let jid = starling_xmpp::jid::parse_full(&s.jid)
        .map_err(|e| unavailable(format!("registry returned a bad JID {:?}: {e}", s.jid)))?;
    Ok(SessionRecord {
        jid,
        node: Arc::from(s.node),
        stream_id: Arc::from(s.stream_id),
        priority: i8::try_from(s.priority).unwrap_or(if s.priority < 0 {
            i8::MIN
        } else {
            i8::MAX
        }),
        presence: s.presence,
        resumption: s.resumption.map(Arc::from),
    })
}

fn from_pb_all(v: Vec<pb::Session>) -> Result<Vec<SessionRecord>, RegistryError> {
    v.into_iter().map(from_pb).collect()
}

/// The bulk removals a watch event reports: the sessions its lease expiries removed, grouped
/// by node (a session the registry returns with a bad JID is skipped).
fn node_removals_of(event: &pb::WatchEvent) -> Vec<NodeRemoved> {
    let mut out: Vec<NodeRemoved> = Vec::new();
    for change in &event.changes {
        let Some(node) = change.expired_node.as_deref() else {
            continue;
        };
        let sessions = change
            .removed
            .iter()
            .cloned()
            .filter_map(|s| from_pb(s).ok());
        match out.iter_mut().find(|r| &*r.node == node) {
            Some(r) => r.sessions.extend(sessions),
            None => out.push(NodeRemoved {
                node: Arc::from(node),
                sessions: sessions.collect(),
            }),
        }
    }
    out.retain(|r| !r.sessions.is_empty());
    out
}

impl Core {
    fn publish_removal(&self, removal: NodeRemoved) {
        // No subscriber is not an error.
        let _ = self.removals.send(Arc::new(removal));
    }
}

/// Whether a gRPC error may succeed elsewhere or later.
fn retryable(s: &tonic::Status) -> bool {
    !matches!(
        s.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::NotFound
            | tonic::Code::Unimplemented
    )
}

impl Core {
    fn grpc(&self, addr: &str) -> Result<Grpc<Channel>, RegistryError> {
        let channel = self
            .channels
            .get(addr)
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Where to send a request for `shard` on the `attempt`-th try.
    fn target(&self, shard: u32, attempt: usize) -> Option<String> {
        if let Some(Some(l)) = self.leaders.lock().get(shard as usize) {
            return Some(l.clone());
        }
        let members = self.members.lock();
        if members.is_empty() {
            return None;
        }
        members.get(attempt % members.len()).cloned()
    }

    fn set_leader(&self, shard: u32, addr: Option<String>) {
        if let Some(addr) = &addr {
            let mut members = self.members.lock();
            if !members.contains(addr) {
                members.push(addr.clone());
            }
        }
        if let Some(slot) = self.leaders.lock().get_mut(shard as usize) {
            *slot = addr;
        }
    }

    fn learn(&self, resp: &pb::MembersResponse) {
        let mut members = self.members.lock();
        let mut leaders = self.leaders.lock();
        for s in &resp.shards {
            for m in s.voters.iter().chain(&s.learners) {
                if !members.contains(&m.addr) {
                    members.push(m.addr.clone());
                }
            }
            if let (Some(l), Some(slot)) = (s.leader, leaders.get_mut(s.shard as usize))
                && let Some(m) = s.voters.iter().find(|m| m.id == l)
            {
                *slot = Some(m.addr.clone());
            }
        }
    }

    async fn pause(&self, backoff: &mut Duration, deadline: Instant) -> Result<(), RegistryError> {
        let jitter = rand::rng().random_range(0..=backoff.as_millis().max(1) as u64 / 2);
        let wait = *backoff + Duration::from_millis(jitter);
        if Instant::now() + wait >= deadline {
            return Err(unavailable("registry deadline exceeded"));
        }
        tokio::time::sleep(wait).await;
        *backoff = (*backoff * 2).min(self.cfg.backoff.1);
        Ok(())
    }

    /// Runs `call` against the shard's leader until it answers, following redirects and
    /// retrying with backoff until `deadline`. `call` returns the answer, or the leader named
    /// by a `NotLeader`.
    async fn at_leader<T, F, Fut>(
        &self,
        shard: u32,
        deadline: Instant,
        per_attempt: Duration,
        what: &'static str,
        mut call: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Grpc<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, pb::NotLeader>, tonic::Status>>,
    {
        let mut backoff = self.cfg.backoff.0;
        let mut attempt = 0usize;
        let mut hops = 0usize;
        // A member that left an attempt unanswered in this operation: until another answers
        // with a leader elsewhere, it is skipped, and a redirect naming it (from a follower
        // that has not noticed yet) is not followed.
        let mut silent: Option<String> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                metrics::counter!("starling_registry_client_requests_total", "op" => what, "outcome" => "deadline").increment(1);
                return Err(unavailable(format!("registry {what}: deadline exceeded")));
            }
            let Some(mut addr) = self.target(shard, attempt) else {
                return Err(unavailable("no registry member known"));
            };
            attempt += 1;
            if silent.as_ref() == Some(&addr)
                && let Some(other) = self.target(shard, attempt)
            {
                attempt += 1;
                addr = other;
            }
            let remaining = (deadline - now).min(per_attempt.max(Duration::from_millis(1)));
            let client = self.grpc(&addr)?;
            match tokio::time::timeout(remaining, call(client, remaining)).await {
                Ok(Ok(Ok(answer))) => {
                    metrics::counter!("starling_registry_client_requests_total", "op" => what, "outcome" => "ok").increment(1);
                    return Ok(answer);
                }
                Ok(Ok(Err(not_leader))) => {
                    metrics::counter!("starling_registry_client_redirects_total").increment(1);
                    let leader = (!not_leader.leader_addr.is_empty()
                        && not_leader.leader_addr != addr
                        && silent.as_ref() != Some(&not_leader.leader_addr))
                    .then_some(not_leader.leader_addr);
                    let known = leader.is_some();
                    self.set_leader(shard, leader);
                    hops += 1;
                    // Follow a named leader at once, but not around a loop of stale answers.
                    if !known || hops.is_multiple_of(3) {
                        self.pause(&mut backoff, deadline).await?;
                    }
                }
                Ok(Err(status)) => {
                    if !retryable(&status) {
                        return Err(unavailable(format!("registry {what}: {status}")));
                    }
                    tracing::debug!(shard, %addr, error = %status, "registry request failed; retrying");
                    self.set_leader(shard, None);
                    self.pause(&mut backoff, deadline).await?;
                }
                Err(_) => {
                    // No answer in time: the outcome is unknown, and this member may be
                    // paused or cut off. Try another.
                    tracing::debug!(shard, %addr, "registry request timed out; retrying");
                    metrics::counter!("starling_registry_client_attempt_timeouts_total")
                        .increment(1);
                    self.set_leader(shard, None);
                    silent = Some(addr);
                }
            }
        }
    }

    async fn write(&self, shard: u32, ops: Vec<pb::Op>) -> Result<pb::WriteOk, RegistryError> {
        let deadline = Instant::now() + self.cfg.deadline;
        let req = pb::WriteRequest { shard, ops };
        self.at_leader(
            shard,
            deadline,
            self.cfg.attempt_timeout,
            "write",
            |mut c, t| {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(t);
                async move {
                    use pb::write_response::Outcome;
                    match c.write(r).await?.into_inner().outcome {
                        Some(Outcome::Ok(ok)) => Ok(Ok(ok)),
                        Some(Outcome::NotLeader(nl)) => Ok(Err(nl)),
                        None => Err(tonic::Status::internal("empty write response")),
                    }
                }
            },
        )
        .await
    }

    async fn read(
        &self,
        shard: u32,
        queries: Vec<pb::Query>,
        linearizable: bool,
    ) -> Result<pb::ReadOk, RegistryError> {
        let deadline = Instant::now() + self.cfg.deadline;
        let req = pb::ReadRequest {
            shard,
            linearizable,
            queries,
        };
        self.at_leader(
            shard,
            deadline,
            self.cfg.attempt_timeout,
            "read",
            |mut c, t| {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(t);
                async move {
                    use pb::read_response::Outcome;
                    match c.read(r).await?.into_inner().outcome {
                        Some(Outcome::Ok(ok)) => Ok(Ok(ok)),
                        Some(Outcome::NotLeader(nl)) => Ok(Err(nl)),
                        None => Err(tonic::Status::internal("empty read response")),
                    }
                }
            },
        )
        .await
    }

    async fn change_members(
        &self,
        shard: u32,
        change: pb::change_members_request::Change,
    ) -> Result<(), RegistryError> {
        let deadline = Instant::now() + self.cfg.membership_deadline;
        let req = pb::ChangeMembersRequest {
            shard,
            change: Some(change),
        };
        let per_attempt = self.cfg.membership_deadline;
        self.at_leader(
            shard,
            deadline,
            per_attempt,
            "change_members",
            |mut c, t| {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(t);
                async move {
                    use pb::change_members_response::Outcome;
                    match c.change_members(r).await?.into_inner().outcome {
                        Some(Outcome::Ok(_)) => Ok(Ok(Ok(()))),
                        Some(Outcome::NotLeader(nl)) => Ok(Err(nl)),
                        Some(Outcome::Error(e)) => Ok(Ok(Err(e))),
                        None => Err(tonic::Status::internal("empty membership response")),
                    }
                }
            },
        )
        .await?
        .map_err(|e| unavailable(format!("membership change of shard {shard}: {e}")))
    }

    /// The status of every shard as one member sees it (the first that answers).
    async fn members(&self) -> Result<pb::MembersResponse, RegistryError> {
        let deadline = Instant::now() + self.cfg.deadline;
        let mut backoff = self.cfg.backoff.0;
        loop {
            let addrs = self.members.lock().clone();
            for addr in &addrs {
                let Ok(mut c) = self.grpc(addr) else { continue };
                let mut r = tonic::Request::new(pb::MembersRequest {});
                r.set_timeout(Duration::from_secs(1).min(self.cfg.deadline));
                if let Ok(resp) = c.members(r).await {
                    let resp = resp.into_inner();
                    self.learn(&resp);
                    return Ok(resp);
                }
            }
            self.pause(&mut backoff, deadline).await?;
        }
    }
}

async fn write_loop(
    core: Arc<Core>,
    shard: u32,
    mut rx: mpsc::Receiver<PendingWrite>,
    cancel: CancellationToken,
) {
    let max = core.cfg.max_batch_ops.max(1);
    let mut in_flight = tokio::task::JoinSet::new();
    let limit = core.cfg.requests_in_flight_per_shard.max(1);
    loop {
        // Reap finished requests; wait for one when the pipeline is full, so what queues
        // meanwhile joins the next request.
        while in_flight.try_join_next().is_some() {}
        if in_flight.len() >= limit {
            tokio::select! {
                _ = in_flight.join_next() => continue,
                () = cancel.cancelled() => return,
            }
        }
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => break },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
            () = cancel.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        metrics::histogram!("starling_registry_client_batch_ops").record(batch.len() as f64);
        let core = core.clone();
        in_flight.spawn(async move { send_batch(&core, shard, batch).await });
    }
    // The handles are gone: let the requests in flight answer their callers.
    while in_flight.join_next().await.is_some() {}
}

/// Sends one batch of writes of `shard` and answers each caller.
async fn send_batch(core: &Core, shard: u32, batch: Vec<PendingWrite>) {
    let (ops, replies): (Vec<pb::Op>, Vec<_>) = batch.into_iter().map(|p| (p.op, p.reply)).unzip();
    let n = ops.len();
    match core.write(shard, ops).await {
        Ok(ok) if ok.results.len() == n => {
            for (reply, r) in replies.into_iter().zip(ok.results) {
                let _ = reply.send(Ok(r));
            }
        }
        Ok(_) => {
            let e = unavailable("registry answered a different number of results");
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

async fn watch_loop(core: Arc<Core>, cancel: CancellationToken) {
    let mut backoff = core.cfg.backoff.0;
    let mut attempt = 0usize;
    loop {
        let addr = {
            let members = core.members.lock();
            if members.is_empty() {
                return;
            }
            members.get(attempt % members.len()).cloned()
        };
        attempt += 1;
        let Some(addr) = addr else { return };
        let stream = match core.grpc(&addr) {
            Ok(mut c) => c
                .watch(pb::WatchRequest { shards: Vec::new() })
                .await
                .map(tonic::Response::into_inner),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match stream {
            Ok(mut stream) => {
                backoff = core.cfg.backoff.0;
                core.cache.set_live(true);
                tracing::debug!(%addr, "registry watch connected");
                loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        () = cancel.cancelled() => return,
                    };
                    match msg {
                        Ok(Some(event)) => {
                            core.cache.event(core.shards, &event);
                            for removal in node_removals_of(&event) {
                                core.publish_removal(removal);
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                core.cache.set_live(false);
                metrics::counter!("starling_registry_client_watch_reconnects_total").increment(1);
            }
            Err(e) => tracing::debug!(%addr, error = %e, "registry watch failed"),
        }
        let wait = backoff;
        backoff = (backoff * 2).min(core.cfg.backoff.1);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
    }
}

impl RegistryClient {
    /// Connects to a registry cluster: learns the shard count and the leaders from the first
    /// member that answers, and starts the write batchers (and the watch, for cached reads).
    pub async fn connect(cfg: ClientConfig) -> Result<RegistryClient, RegistryError> {
        if cfg.seeds.is_empty() {
            return Err(unavailable("no registry member configured"));
        }
        let probe = Core {
            shards: 0,
            channels: Channels::default(),
            leaders: Mutex::new(Vec::new()),
            members: Mutex::new(cfg.seeds.clone()),
            cache: Cache::new(0, 0),
            removals: tokio::sync::broadcast::channel(1).0,
            cfg: cfg.clone(),
        };
        let status = probe.members().await?;
        let shards = u32::try_from(status.shards.len()).unwrap_or(0);
        if shards == 0 {
            return Err(unavailable("registry reports no shards"));
        }
        let core = Arc::new(Core {
            shards,
            channels: probe.channels,
            leaders: Mutex::new(vec![None; shards as usize]),
            members: Mutex::new(probe.members.into_inner()),
            cache: Cache::new(cfg.cache_capacity, shards),
            removals: tokio::sync::broadcast::channel(NODE_REMOVALS_BUFFER).0,
            cfg,
        });
        core.learn(&status);
        let cancel = CancellationToken::new();
        let mut writers = Vec::with_capacity(shards as usize);
        for shard in 0..shards {
            let (tx, rx) = mpsc::channel(core.cfg.queue_per_shard.max(1));
            tokio::spawn(write_loop(core.clone(), shard, rx, cancel.clone()));
            writers.push(tx);
        }
        if core.cfg.reads == ReadMode::Cached {
            tokio::spawn(watch_loop(core.clone(), cancel.clone()));
        }
        Ok(RegistryClient {
            core,
            writers: Arc::new(writers),
            _stop: Arc::new(cancel.drop_guard()),
        })
    }

    /// The number of shards of the cluster.
    pub fn shard_count(&self) -> u32 {
        self.core.shards
    }

    /// The shard of an account.
    pub fn shard_of(&self, bare: &BareJid) -> u32 {
        shard_of(bare.as_str(), self.core.shards)
    }

    async fn op(&self, shard: u32, op: pb::Op) -> Result<pb::OpResult, RegistryError> {
        let Some(tx) = self.writers.get(shard as usize) else {
            return Err(unavailable("no such shard"));
        };
        let (reply, rx) = oneshot::channel();
        match tokio::time::timeout(self.core.cfg.deadline, tx.send(PendingWrite { op, reply }))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(unavailable("registry client stopped")),
            Err(_) => {
                metrics::counter!("starling_registry_client_queue_full_total").increment(1);
                return Err(unavailable("registry client queue full"));
            }
        }
        rx.await
            .map_err(|_| unavailable("registry client stopped"))?
    }

    /// Runs `op` on every shard, in parallel, and returns the results in shard order.
    async fn on_all_shards(&self, op: pb::Op) -> Result<Vec<pb::OpResult>, RegistryError> {
        let futures = (0..self.core.shards).map(|s| self.op(s, op.clone()));
        futures_util::future::join_all(futures)
            .await
            .into_iter()
            .collect()
    }

    /// Every session of an account, read through the shard leader (linearizable), whatever
    /// the read mode.
    pub async fn sessions_linearizable(
        &self,
        bare: &BareJid,
    ) -> Result<Vec<SessionRecord>, RegistryError> {
        let shard = self.shard_of(bare);
        let generation = self.core.cache.generation(shard);
        let ok = self
            .core
            .read(
                shard,
                vec![pb::Query {
                    query: Some(pb::query::Query::Bare(bare.to_string())),
                }],
                true,
            )
            .await?;
        let sessions = ok
            .results
            .into_iter()
            .next()
            .map(|r| r.sessions)
            .unwrap_or_default();
        if let Some(g) = generation {
            self.core
                .cache
                .fill(shard, g, bare.as_str(), ok.index, &sessions);
        }
        from_pb_all(sessions)
    }

    /// The status of every shard (members, leader, indexes) as one member sees it: the data
    /// of `starling registry members list`.
    pub async fn members(&self) -> Result<pb::MembersResponse, RegistryError> {
        self.core.members().await
    }

    /// Adds a registry member to every shard: as a learner, then, once it caught up, as a
    /// voter (`starling registry members add`). The new node must be running, started with
    /// no initial member list.
    pub async fn add_member(&self, id: MemberId, addr: &str) -> Result<(), RegistryError> {
        for shard in 0..self.core.shards {
            self.core
                .change_members(
                    shard,
                    pb::change_members_request::Change::Add(pb::Member {
                        id,
                        addr: addr.to_owned(),
                    }),
                )
                .await?;
        }
        Ok(())
    }

    /// Removes a registry member from every shard (`starling registry members remove`). A
    /// dead member is replaced by removing it and adding a new one with a new id.
    pub async fn remove_member(&self, id: MemberId) -> Result<(), RegistryError> {
        for shard in 0..self.core.shards {
            self.core
                .change_members(shard, pb::change_members_request::Change::Remove(id))
                .await?;
        }
        Ok(())
    }

    /// Heartbeats `node` every `every` with lease `ttl` until `cancel` fires. Failures are
    /// logged and retried at the next beat; the lease should outlast a few beats.
    pub fn spawn_heartbeat(
        &self,
        node: Arc<str>,
        ttl: Duration,
        every: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = cancel.cancelled() => return,
                }
                if let Err(e) = client.heartbeat(&node, ttl).await {
                    tracing::warn!(node = %node, error = %e, "registry heartbeat failed");
                }
            }
        })
    }
}

fn expect_changed(r: pb::OpResult) -> Result<bool, RegistryError> {
    match r.result {
        Some(pb::op_result::Result::Changed(c)) => Ok(c),
        Some(pb::op_result::Result::Error(e)) => Err(unavailable(e)),
        _ => Err(unavailable("unexpected registry result")),
    }
}

fn expect_removed(r: pb::OpResult) -> Result<Vec<pb::Session>, RegistryError> {
    match r.result {
        Some(pb::op_result::Result::Removed(l)) => Ok(l.sessions),
        Some(pb::op_result::Result::Error(e)) => Err(unavailable(e)),
        _ => Err(unavailable("unexpected registry result")),
    }
}

#[async_trait]
impl SessionRegistry for RegistryClient {
    async fn bind(&self, record: SessionRecord) -> Result<BindOutcome, RegistryError> {
        let shard = self.shard_of(&record.jid.to_bare());
        let op = pb::Op {
            op: Some(pb::op::Op::Bind(pb::Bind {
                session: Some(to_pb(&record)),
                max_per_account: self.core.cfg.max_per_account,
            })),
        };
        match self.op(shard, op).await?.result {
            Some(pb::op_result::Result::Bind(b)) => {
                if b.limit_reached {
                    Err(RegistryError::LimitReached)
                } else if let Some(old) = b.replaced {
                    Ok(BindOutcome::Replaced(from_pb(old)?))
                } else {
                    Ok(BindOutcome::Bound)
                }
            }
            Some(pb::op_result::Result::Error(e)) => Err(unavailable(e)),
            _ => Err(unavailable("unexpected registry result")),
        }
    }

    async fn unbind(&self, jid: &FullJid, stream_id: &str) -> Result<bool, RegistryError> {
        let shard = self.shard_of(&jid.to_bare());
        let op = pb::Op {
            op: Some(pb::op::Op::Unbind(pb::Unbind {
                jid: jid.to_string(),
                stream_id: stream_id.to_owned(),
            })),
        };
        expect_changed(self.op(shard, op).await?)
    }

    async fn set_presence(
        &self,
        jid: &FullJid,
        stream_id: &str,
        priority: i8,
        presence: Option<Bytes>,
    ) -> Result<(), RegistryError> {
        let shard = self.shard_of(&jid.to_bare());
        let op = pb::Op {
            op: Some(pb::op::Op::SetPresence(pb::SetPresence {
                jid: jid.to_string(),
                stream_id: stream_id.to_owned(),
                priority: i32::from(priority),
                presence,
            })),
        };
        expect_changed(self.op(shard, op).await?).map(|_| ())
    }

    async fn session(&self, jid: &FullJid) -> Result<Option<SessionRecord>, RegistryError> {
        let bare = jid.to_bare();
        if self.core.cfg.reads == ReadMode::Cached {
            let all = self.sessions(&bare).await?;
            return Ok(all.into_iter().find(|s| s.jid == *jid));
        }
        let shard = self.shard_of(&bare);
        let ok = self
            .core
            .read(
                shard,
                vec![pb::Query {
                    query: Some(pb::query::Query::Full(jid.to_string())),
                }],
                true,
            )
            .await?;
        let s = ok
            .results
            .into_iter()
            .next()
            .and_then(|r| r.sessions.into_iter().next());
        s.map(from_pb).transpose()
    }

    async fn sessions(&self, bare: &BareJid) -> Result<Vec<SessionRecord>, RegistryError> {
        if self.core.cfg.reads == ReadMode::Cached {
            let shard = self.shard_of(bare);
            if let Some(hit) = self.core.cache.get(shard, bare.as_str()) {
                return from_pb_all(hit);
            }
        }
        self.sessions_linearizable(bare).await
    }

    async fn remove_node(&self, node: &str) -> Result<Vec<SessionRecord>, RegistryError> {
        let op = pb::Op {
            op: Some(pb::op::Op::RemoveNode(pb::RemoveNode {
                node: node.to_owned(),
            })),
        };
        let mut out = Vec::new();
        for r in self.on_all_shards(op).await? {
            out.extend(from_pb_all(expect_removed(r)?)?);
        }
        if !out.is_empty() {
            self.core.publish_removal(NodeRemoved {
                node: Arc::from(node),
                sessions: out.clone(),
            });
        }
        Ok(out)
    }

    fn node_removals(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<NodeRemoved>>> {
        (self.core.cfg.reads == ReadMode::Cached).then(|| self.core.removals.subscribe())
    }

    async fn count(&self) -> Result<usize, RegistryError> {
        let futures = (0..self.core.shards).map(|s| {
            self.core.read(
                s,
                vec![pb::Query {
                    query: Some(pb::query::Query::Count(pb::Empty {})),
                }],
                false,
            )
        });
        let mut total = 0u64;
        for r in futures_util::future::join_all(futures).await {
            total += r?.results.first().map_or(0, |q| q.count);
        }
        Ok(usize::try_from(total).unwrap_or(usize::MAX))
    }

    async fn set_resumption(
        &self,
        jid: &FullJid,
        stream_id: &str,
        resumption: Option<Arc<str>>,
    ) -> Result<bool, RegistryError> {
        let shard = self.shard_of(&jid.to_bare());
        let op = pb::Op {
            op: Some(pb::op::Op::SetResumption(pb::SetResumption {
                jid: jid.to_string(),
                stream_id: stream_id.to_owned(),
                resumption: resumption.as_deref().map(str::to_owned),
            })),
        };
        expect_changed(self.op(shard, op).await?)
    }

    async fn session_by_resumption(
        &self,
        bare: &BareJid,
        id: &str,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        let ok = self
            .core
            .read(
                self.shard_of(bare),
                vec![pb::Query {
                    query: Some(pb::query::Query::Resumption(pb::ResumptionQuery {
                        bare: bare.to_string(),
                        id: id.to_owned(),
                    })),
                }],
                true,
            )
            .await?;
        ok.results
            .into_iter()
            .next()
            .and_then(|r| r.sessions.into_iter().next())
            .map(from_pb)
            .transpose()
    }

    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<(), RegistryError> {
        let op = pb::Op {
            op: Some(pb::op::Op::Heartbeat(pb::Heartbeat {
                node: node.to_owned(),
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            })),
        };
        self.on_all_shards(op).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(jid: &str, node: &str) -> pb::Session {
        pb::Session {
            jid: jid.to_owned(),
            node: node.to_owned(),
            stream_id: "s".to_owned(),
            priority: 0,
            presence: None,
            resumption: None,
        }
    }

    #[test]
    fn lease_expiries_in_a_watch_event_become_node_removals() {
        let change = |bare: &str, removed: Vec<pb::Session>, expired: Option<&str>| pb::Change {
            bare: bare.to_owned(),
            sessions: Vec::new(),
            removed,
            expired_node: expired.map(str::to_owned),
        };
        let event = pb::WatchEvent {
            shard: 0,
            index: 9,
            changes: vec![
                change("a@x", vec![session("a@x/1", "e1")], Some("e1")),
                // An unbind: not a bulk removal.
                change("b@x", vec![session("b@x/1", "e1")], None),
                change(
                    "c@x",
                    vec![session("c@x/1", "e1"), session("c@x/2", "e1")],
                    Some("e1"),
                ),
                change("d@x", vec![session("not a jid/", "e2")], Some("e2")),
            ],
            resync: false,
        };
        let removals = node_removals_of(&event);
        assert_eq!(removals.len(), 1, "{removals:?}");
        assert_eq!(&*removals[0].node, "e1");
        let jids: Vec<String> = removals[0]
            .sessions
            .iter()
            .map(|s| s.jid.to_string())
            .collect();
        assert_eq!(jids, ["a@x/1", "c@x/1", "c@x/2"]);
        assert!(node_removals_of(&pb::WatchEvent::default()).is_empty());
    }
}
