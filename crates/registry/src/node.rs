//! A registry node: one openraft `Raft` per shard over one redb file, the gRPC server for
//! the client API and the Raft transport, cluster bootstrap, and the lease keeper.
//!
//! **Bootstrap** (idempotent, so every member of a new cluster may start at once): each shard
//! has one designated initialiser among the configured initial members, the member at
//! position `shard % n` of the sorted member ids. It initialises the shard only if its own log
//! is empty and no reachable peer reports the shard initialised; the others wait to be
//! replicated to. Since openraft 0.9's `initialize` campaigns at once, the designated node
//! also becomes the shard's first leader, which spreads leaders evenly over the members.
//!
//! **Leader placement** after failovers and membership changes: every shard has a preferred
//! leader derived from its voters (the same rule as the designated initialiser), and a leader
//! that is not preferred hands the shard over when the preferred voter is caught up (see
//! `rebalance`), so leaders return to an even spread once the nodes are back.
//!
//! **Leases**: the leader of each shard checks every `lease_check` for node leases that have
//! expired by its clock and proposes one `ExpireLeases` entry for them, stamped with its time;
//! replicas decide with that time only. A new leader waits `lease_grace` after taking over
//! before expiring anything, so nodes get a chance to heartbeat to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::codec::{MemberId, ShardRaft};
use crate::machine::{Machine, MachineStore};
use crate::network::{Channels, MAX_MESSAGE_BYTES, Network};
use crate::pb;
use crate::proposer::{Proposer, now_ms};
use crate::snapshots::{SnapshotFiles, latest_snapshot};
use crate::storage::{Disk, LogStore, StoreError};

/// Requests served at once on one client connection; more wait (HTTP/2 flow control).
const MAX_CONCURRENT_PER_CONNECTION: usize = 1024;

/// How a registry node runs. Plain data; the binary builds it from its config file.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This member's Raft id; unique in the cluster, never reused after a removal.
    pub id: MemberId,
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The `host:port` other members and clients use to reach this node.
    pub advertise: String,
    /// Directory of `registry.redb`.
    pub data_dir: PathBuf,
    /// Number of shards (Raft groups). Fixed for the life of a cluster.
    pub shards: u32,
    /// The members of a new cluster (id → `host:port`), the same list on every member.
    /// Empty for a node that joins an existing cluster (`members add`).
    pub initial_members: BTreeMap<MemberId, String>,
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Raft election timeout range (a random value in it per election).
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot (and compact the log) every this many entries. The unpurged log is
    /// also held in memory, so this bounds it (with `max_batch_ops`).
    pub snapshot_every: u64,
    /// Log entries kept after a snapshot, so slightly lagging followers need no snapshot.
    pub keep_after_snapshot: u64,
    /// Most operations in one Raft entry.
    pub max_batch_ops: usize,
    /// Write requests waiting per shard; more are refused as overloaded.
    pub proposal_queue: usize,
    /// Raft entries per shard submitted and not yet applied.
    pub proposals_in_flight: usize,
    /// Storage requests waiting for the disk writer.
    pub disk_queue: usize,
    /// Watch events buffered per shard; a watcher that falls further behind gets a resync.
    pub watch_buffer: usize,
    /// How often a shard leader looks for expired leases.
    pub lease_check: Duration,
    /// How long a new leader waits before expiring leases.
    pub lease_grace: Duration,
    /// How often a leader checks whether to hand a shard to its preferred leader; zero turns
    /// leader spreading off.
    pub rebalance_interval: Duration,
}

impl NodeConfig {
    /// A configuration with the documented defaults.
    pub fn new(id: MemberId, listen: SocketAddr, advertise: String, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            listen,
            advertise,
            data_dir,
            shards: 16,
            initial_members: BTreeMap::new(),
            heartbeat: Duration::from_millis(150),
            election_timeout: (Duration::from_millis(1000), Duration::from_millis(2000)),
            snapshot_every: 5_000,
            keep_after_snapshot: 500,
            max_batch_ops: 1024,
            proposal_queue: 4096,
            proposals_in_flight: 8,
            disk_queue: 8192,
            watch_buffer: 4096,
            lease_check: Duration::from_millis(500),
            lease_grace: Duration::from_secs(10),
            rebalance_interval: Duration::from_secs(2),
        }
    }
}

/// A node failed to start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is not usable.
    #[error("registry config: {0}")]
    Config(String),
    /// The data directory or database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("registry listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// openraft refused to start a shard.
    #[error("registry raft: {0}")]
    Raft(String),
}

/// One shard as a node holds it.
pub(crate) struct Shard {
    pub(crate) raft: ShardRaft,
    pub(crate) machine: Arc<Machine>,
    pub(crate) proposer: Proposer,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// What the services and tasks of a node share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: MemberId,
    pub(crate) shards: Vec<Shard>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) cancel: CancellationToken,
}

impl Shared {
    pub(crate) fn shard(&self, shard: u32) -> Result<&Shard, tonic::Status> {
        self.shards
            .get(shard as usize)
            .ok_or_else(|| tonic::Status::not_found(format!("no shard {shard}")))
    }

    /// The leader of a shard as this node knows it, with its address.
    pub(crate) fn leader(&self, shard: &Shard) -> Option<(MemberId, String)> {
        let m = shard.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((leader, addr))
    }
}

/// A running registry node.
#[derive(Debug)]
pub struct RegistryNode {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    disk: Arc<Disk>,
    tasks: JoinSet<()>,
}

/// Runs a registry node until `cancel` fires, then shuts it down. The entry point of
/// `starling registry`.
pub async fn run(config: NodeConfig, cancel: CancellationToken) -> Result<(), NodeError> {
    let node = RegistryNode::start(config, None).await?;
    cancel.cancelled().await;
    node.shutdown().await;
    Ok(())
}

fn raft_config(c: &NodeConfig) -> Result<Arc<Config>, NodeError> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let config = Config {
        cluster_name: "starling-registry".into(),
        heartbeat_interval: ms(c.heartbeat),
        election_timeout_min: ms(c.election_timeout.0),
        election_timeout_max: ms(c.election_timeout.1),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: c.keep_after_snapshot,
        max_payload_entries: 64,
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        install_snapshot_timeout: 2000,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| NodeError::Config(e.to_string()))
}

impl RegistryNode {
    /// Opens the node's storage, starts every shard's Raft and the gRPC server (on
    /// `listener` if given, else on `config.listen`), and begins bootstrap if this is a new
    /// cluster. Returns once the server is listening.
    pub async fn start(
        config: NodeConfig,
        listener: Option<TcpListener>,
    ) -> Result<RegistryNode, NodeError> {
        if config.shards == 0 {
            return Err(NodeError::Config("shards must be at least 1".into()));
        }
        if !config.initial_members.is_empty() && !config.initial_members.contains_key(&config.id) {
            return Err(NodeError::Config(format!(
                "initial members do not include this node's id {}",
                config.id
            )));
        }
        let raft_cfg = raft_config(&config)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            NodeError::Config(format!("data dir {}: {e}", config.data_dir.display()))
        })?;
        let disk = Disk::open(&config.data_dir.join("registry.redb"), config.disk_queue)?;
        let files = Arc::new(SnapshotFiles::open(&config.data_dir.join("snapshots"))?);
        let channels = Arc::new(Channels::default());
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut shards = Vec::with_capacity(config.shards as usize);
        for shard in 0..config.shards {
            let mut loaded = disk.load_shard(shard)?;
            let snapshot =
                latest_snapshot(&disk, &files, shard, loaded.legacy_snapshot.take()).await?;
            let machine = Machine::open(shard, files.clone(), snapshot, config.watch_buffer)?;
            let log = LogStore::new(shard, disk.clone(), &mut loaded);
            let network = Network {
                shard,
                channels: channels.clone(),
            };
            let raft = ShardRaft::new(
                config.id,
                raft_cfg.clone(),
                network,
                log,
                MachineStore(machine.clone()),
            )
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
            let (proposer, task) = Proposer::spawn(
                shard,
                raft.clone(),
                config.proposal_queue,
                config.max_batch_ops,
                config.proposals_in_flight,
                cancel.clone(),
            );
            tasks.spawn(async move {
                let _ = task.await;
            });
            shards.push(Shard {
                raft,
                machine,
                proposer,
            });
        }
        let shared = Arc::new(Shared {
            id: config.id,
            shards,
            channels,
            cancel: cancel.clone(),
        });

        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|source| NodeError::Listen {
                    addr: config.listen,
                    source,
                })?,
        };
        let local_addr = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
        // `Server::tcp_nodelay` covers only listeners the server binds itself: without
        // TCP_NODELAY on accepted sockets, small answers wait for delayed ACKs (~40 ms).
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(30)));
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
            .add_service(
                pb::raft_transport_server::RaftTransportServer::new(
                    crate::server::RaftService::new(shared.clone()),
                )
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::registry_server::RegistryServer::new(crate::server::RegistryService::new(
                    shared.clone(),
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let stop = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = server
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "registry gRPC server failed");
            }
        });

        if !config.initial_members.is_empty() {
            let shared = shared.clone();
            let members = config.initial_members.clone();
            tasks.spawn(async move { bootstrap(shared, members).await });
        }
        {
            let shared = shared.clone();
            let (check, grace) = (config.lease_check, config.lease_grace);
            tasks.spawn(async move { lease_keeper(shared, check, grace).await });
        }
        {
            let shared = shared.clone();
            let (every, lease) = (config.rebalance_interval, config.election_timeout.1);
            tasks.spawn(async move { crate::rebalance::run(shared, every, lease).await });
        }
        tracing::info!(
            node = config.id,
            addr = %local_addr,
            shards = config.shards,
            "registry node started"
        );
        Ok(RegistryNode {
            shared,
            local_addr,
            disk,
            tasks,
        })
    }

    /// The address the gRPC server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This member's id.
    pub fn id(&self) -> MemberId {
        self.shared.id
    }

    /// How many shards the node holds.
    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.shared.shards.len()).unwrap_or(u32::MAX)
    }

    /// The leader of `shard` as this node currently sees it.
    pub fn leader_of(&self, shard: u32) -> Option<MemberId> {
        let s = self.shared.shards.get(shard as usize)?;
        s.raft.metrics().borrow().current_leader
    }

    /// Whether every shard this node is a member of knows its leader: the node can answer or
    /// redirect every request. A node not yet added to a shard (it waits to join) does not
    /// wait for that shard.
    pub fn leaders_known(&self) -> bool {
        self.shared.shards.iter().all(|s| {
            let m = s.raft.metrics();
            let m = m.borrow();
            let member = m
                .membership_config
                .membership()
                .nodes()
                .any(|(id, _)| *id == self.shared.id);
            !member || m.current_leader.is_some()
        })
    }

    /// The shards this node currently leads.
    pub fn led_shards(&self) -> Vec<u32> {
        (0..self.shard_count())
            .filter(|s| {
                self.shared
                    .shards
                    .get(*s as usize)
                    .is_some_and(|sh| sh.raft.metrics().borrow().state == ServerState::Leader)
            })
            .collect()
    }

    /// The highest log index this node has applied in `shard`.
    pub fn applied_index(&self, shard: u32) -> Option<u64> {
        let s = self.shared.shards.get(shard as usize)?;
        s.raft.metrics().borrow().last_applied.map(|l| l.index)
    }

    /// The index of the latest snapshot of `shard` on this node.
    pub fn snapshot_index(&self, shard: u32) -> Option<u64> {
        let s = self.shared.shards.get(shard as usize)?;
        s.raft.metrics().borrow().snapshot.map(|l| l.index)
    }

    /// How many sessions this node's replica of `shard` holds.
    pub fn local_count(&self, shard: u32) -> Option<usize> {
        let s = self.shared.shards.get(shard as usize)?;
        Some(s.machine.read(|st| st.count()).1)
    }

    /// Stops the server and every shard, then closes the database.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        for s in &self.shared.shards {
            if let Err(e) = s.raft.shutdown().await {
                tracing::warn!(error = %e, "registry shard did not stop cleanly");
            }
        }
        while self.tasks.join_next().await.is_some() {}
        self.disk.close().await;
        tracing::info!(node = self.shared.id, "registry node stopped");
    }
}

/// Initialises the shards this node is the designated initialiser of (see the module doc).
async fn bootstrap(shared: Arc<Shared>, members: BTreeMap<MemberId, String>) {
    let ids: Vec<MemberId> = members.keys().copied().collect();
    let Some(pos) = ids.iter().position(|id| *id == shared.id) else {
        return;
    };
    let nodes: BTreeMap<MemberId, BasicNode> = members
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    let mine: Vec<u32> = (0..u32::try_from(shared.shards.len()).unwrap_or(0))
        .filter(|s| *s as usize % ids.len() == pos)
        .collect();
    // Shards a peer already reports initialised are never initialised here: this node may
    // have lost its data and must catch up instead of founding a second cluster.
    let mut known_elsewhere = std::collections::BTreeSet::new();
    for (id, addr) in &members {
        if *id == shared.id {
            continue;
        }
        let Ok(channel) = shared.channels.get(addr) else {
            continue;
        };
        let mut client = pb::registry_client::RegistryClient::new(channel);
        let mut req = tonic::Request::new(pb::MembersRequest {});
        req.set_timeout(Duration::from_secs(1));
        if let Ok(resp) = client.members(req).await {
            for s in resp.into_inner().shards {
                if s.initialized {
                    known_elsewhere.insert(s.shard);
                }
            }
        }
    }
    for shard in mine {
        let Some(s) = shared.shards.get(shard as usize) else {
            continue;
        };
        if known_elsewhere.contains(&shard) {
            continue;
        }
        match s.raft.is_initialized().await {
            Ok(true) | Err(_) => continue,
            Ok(false) => {}
        }
        match s.raft.initialize(nodes.clone()).await {
            Ok(()) => tracing::info!(shard, node = shared.id, "registry shard initialised"),
            Err(e) => tracing::info!(shard, error = %e, "registry shard not initialised here"),
        }
    }
}

/// Proposes lease expiry on the shards this node leads (see the module doc).
async fn lease_keeper(shared: Arc<Shared>, check: Duration, grace: Duration) {
    let mut leading_since: Vec<Option<(u64, Instant)>> = vec![None; shared.shards.len()];
    let mut tick = tokio::time::interval(check.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.cancel.cancelled() => return,
        }
        for (i, s) in shared.shards.iter().enumerate() {
            let (state, term) = {
                let m = s.raft.metrics();
                let m = m.borrow();
                (m.state, m.current_term)
            };
            let Some(slot) = leading_since.get_mut(i) else {
                continue;
            };
            if state != ServerState::Leader {
                *slot = None;
                continue;
            }
            let since = match slot {
                Some((t, since)) if *t == term => *since,
                _ => {
                    let now = Instant::now();
                    *slot = Some((term, now));
                    now
                }
            };
            if since.elapsed() < grace {
                continue;
            }
            let (_, expired) = s.machine.read(|st| st.expired_nodes(now_ms()));
            if expired.is_empty() {
                continue;
            }
            tracing::info!(shard = i, nodes = ?expired, "registry leases expired");
            metrics::counter!("starling_registry_lease_expiries_total")
                .increment(expired.len() as u64);
            let op = pb::Op {
                op: Some(pb::op::Op::ExpireLeases(pb::ExpireLeases {
                    nodes: expired,
                })),
            };
            if let Err(e) = s.proposer.propose(vec![op]).await {
                tracing::warn!(shard = i, error = %e, "lease expiry not committed");
            }
        }
    }
}
