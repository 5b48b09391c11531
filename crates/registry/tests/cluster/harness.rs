//! An in-process registry cluster over real gRPC on 127.0.0.1: each node its own data
//! directory, stoppable, restartable (with or without its data).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use starling_registry::{
    ClientConfig, NodeConfig, ReadMode, RegistryClient, RegistryNode, SessionRecord,
};
use tokio::net::TcpListener;

pub(crate) struct TestDir(pub PathBuf);

impl TestDir {
    pub(crate) fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "starling-registry-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) struct Cluster {
    pub(crate) configs: Vec<NodeConfig>,
    pub(crate) nodes: Vec<Option<RegistryNode>>,
    _dir: TestDir,
}

/// Test timings: fast elections and snapshots.
pub(crate) struct Opts {
    pub(crate) shards: u32,
    pub(crate) snapshot_every: u64,
    pub(crate) keep_after_snapshot: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            shards: 4,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
        }
    }
}

impl Cluster {
    pub(crate) async fn start(name: &str, n: usize, opts: Opts) -> Cluster {
        let dir = TestDir::new(name);
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let members: BTreeMap<u64, String> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string()))
            .collect();
        let mut configs = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            let addr = l.local_addr().unwrap();
            let mut c = NodeConfig::new(
                i as u64 + 1,
                addr,
                addr.to_string(),
                dir.0.join(format!("node{}", i + 1)),
            );
            c.shards = opts.shards;
            c.initial_members = members.clone();
            c.heartbeat = Duration::from_millis(50);
            c.election_timeout = (Duration::from_millis(300), Duration::from_millis(600));
            c.snapshot_every = opts.snapshot_every;
            c.keep_after_snapshot = opts.keep_after_snapshot;
            c.lease_check = Duration::from_millis(50);
            c.lease_grace = Duration::from_millis(300);
            c.rebalance_interval = Duration::from_millis(200);
            configs.push(c);
        }
        let mut nodes = Vec::new();
        for (c, l) in configs.iter().zip(listeners) {
            nodes.push(Some(RegistryNode::start(c.clone(), Some(l)).await.unwrap()));
        }
        let cluster = Cluster {
            configs,
            nodes,
            _dir: dir,
        };
        cluster.wait_leaders().await;
        cluster
    }

    pub(crate) fn addrs(&self) -> Vec<String> {
        self.configs.iter().map(|c| c.advertise.clone()).collect()
    }

    pub(crate) fn node(&self, i: usize) -> &RegistryNode {
        self.nodes[i].as_ref().expect("node running")
    }

    /// Waits until every shard has a leader that all running nodes agree on.
    pub(crate) async fn wait_leaders(&self) {
        let shards = self.configs[0].shards;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let all = (0..shards).all(|s| {
                let seen: Vec<Option<u64>> = self
                    .nodes
                    .iter()
                    .flatten()
                    .map(|n| n.leader_of(s))
                    .collect();
                let first = seen[0];
                first.is_some()
                    && seen.iter().all(|l| *l == first)
                    && self.nodes.iter().flatten().any(|n| Some(n.id()) == first)
            });
            if all {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "shards did not elect leaders"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index (into `nodes`) of the current leader of `shard`.
    pub(crate) fn leader_index(&self, shard: u32) -> usize {
        let id = self
            .nodes
            .iter()
            .flatten()
            .find_map(|n| n.leader_of(shard))
            .expect("a leader");
        (id - 1) as usize
    }

    pub(crate) async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    /// Stops every node, then starts each again from its data directory, and waits for every
    /// shard to have a leader.
    pub(crate) async fn restart_all_from_disk(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
        for i in 0..self.nodes.len() {
            self.restart(i, false).await;
        }
        self.wait_leaders().await;
    }

    pub(crate) async fn restart(&mut self, i: usize, wipe: bool) {
        assert!(self.nodes[i].is_none());
        let c = self.configs[i].clone();
        if wipe {
            let _ = std::fs::remove_dir_all(&c.data_dir);
        }
        // The port is free again once the old server is gone.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(c.listen).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "rebinding {}: {e}", c.listen);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.nodes[i] = Some(RegistryNode::start(c, Some(listener)).await.unwrap());
    }

    /// Waits until node `i` has applied, in every shard, at least what the leader had.
    pub(crate) async fn wait_caught_up(&self, i: usize) {
        let shards = self.configs[0].shards;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let done = (0..shards).all(|s| {
                let leader = self.node(self.leader_index(s));
                let target = leader.applied_index(s);
                target.is_some()
                    && self.node(i).applied_index(s) >= target
                    && self.node(i).local_count(s) == leader.local_count(s)
            });
            if done {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn client(&self, reads: ReadMode) -> RegistryClient {
        let mut cfg = ClientConfig::new(self.addrs());
        cfg.deadline = Duration::from_secs(10);
        cfg.backoff = (Duration::from_millis(10), Duration::from_millis(200));
        cfg.reads = reads;
        RegistryClient::connect(cfg).await.unwrap()
    }
}

pub(crate) fn full(s: &str) -> starling_xmpp::FullJid {
    starling_xmpp::jid::parse_full(s).unwrap()
}

pub(crate) fn rec(jid: &str, node: &str, stream: &str) -> SessionRecord {
    SessionRecord::new(full(jid), Arc::from(node), Arc::from(stream))
}
