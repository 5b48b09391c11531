//! `[registry]`: a node of the replicated session registry (`starling registry`). Read only
//! by that command; `starling serve` keeps its in-process registry and ignores the section
//! (it is still validated, so a file is checked the same way whichever command reads it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[registry]`, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RegistryConfig {
    /// Where the gRPC server (client API and Raft transport) listens.
    pub(crate) listen: String,
    /// The `host:port` other members and clients reach this node at; empty: `listen`.
    pub(crate) advertise: String,
    /// This member's Raft id: unique, never reused.
    pub(crate) node_id: u64,
    /// `ID=HOST:PORT` of every member of a new cluster, the same list on each.
    pub(crate) initial_members: Vec<String>,
    /// Number of shards (Raft groups), fixed for the life of the cluster.
    pub(crate) shards: u32,
    /// The Raft log, votes and snapshots; empty: `<server.data_dir>/registry`.
    pub(crate) data_dir: PathBuf,
    /// Raft heartbeat interval.
    pub(crate) heartbeat_ms: u64,
    /// Election timeout, lower bound.
    pub(crate) election_timeout_min_ms: u64,
    /// Election timeout, upper bound (also the leader lease).
    pub(crate) election_timeout_max_ms: u64,
    /// Snapshot (and compact the log) every this many entries.
    pub(crate) snapshot_every: u64,
    /// Entries kept after a snapshot.
    pub(crate) keep_after_snapshot: u64,
    /// Most operations in one Raft entry.
    pub(crate) max_batch_ops: u32,
    /// Write requests waiting per shard.
    pub(crate) proposal_queue: u32,
    /// Entries per shard submitted and not yet applied.
    pub(crate) proposals_in_flight: u32,
    /// Storage requests waiting for the disk writer.
    pub(crate) disk_queue: u32,
    /// Watch events buffered per shard.
    pub(crate) watch_buffer: u32,
    /// How often a shard leader looks for expired leases.
    pub(crate) lease_check_ms: u64,
    /// How long a new leader waits before expiring leases.
    pub(crate) lease_grace_ms: u64,
    /// How often leaders check the spread of leadership; 0 turns rebalancing off.
    pub(crate) rebalance_interval_ms: u64,
}

impl Default for RegistryConfig {
    /// The registry crate's own defaults (`NodeConfig::new`), so they live in one place.
    fn default() -> Self {
        let listen = SocketAddr::from(([127, 0, 0, 1], 5290));
        let n = starling_registry::NodeConfig::new(1, listen, String::new(), PathBuf::new());
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let count = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        RegistryConfig {
            listen: listen.to_string(),
            advertise: String::new(),
            node_id: n.id,
            initial_members: Vec::new(),
            shards: n.shards,
            data_dir: PathBuf::new(),
            heartbeat_ms: ms(n.heartbeat),
            election_timeout_min_ms: ms(n.election_timeout.0),
            election_timeout_max_ms: ms(n.election_timeout.1),
            snapshot_every: n.snapshot_every,
            keep_after_snapshot: n.keep_after_snapshot,
            max_batch_ops: count(n.max_batch_ops),
            proposal_queue: count(n.proposal_queue),
            proposals_in_flight: count(n.proposals_in_flight),
            disk_queue: count(n.disk_queue),
            watch_buffer: count(n.watch_buffer),
            lease_check_ms: ms(n.lease_check),
            lease_grace_ms: ms(n.lease_grace),
            rebalance_interval_ms: ms(n.rebalance_interval),
        }
    }
}

/// The most shards a cluster may have (each is a Raft group with its own tasks on every node).
const MAX_SHARDS: u32 = 4096;

/// `[registry]` after validation: what `starling registry` needs, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegistrySettings {
    /// `registry.listen`.
    pub(crate) listen: SocketAddr,
    /// `registry.advertise`, or `listen` when empty.
    pub(crate) advertise: String,
    /// `registry.initial_members` by id.
    pub(crate) initial_members: BTreeMap<u64, String>,
}

impl RegistryConfig {
    /// The data directory of the node.
    pub(crate) fn data_dir(&self, server_data_dir: &Path) -> PathBuf {
        if self.data_dir.as_os_str().is_empty() {
            server_data_dir.join("registry")
        } else {
            self.data_dir.clone()
        }
    }

    /// The node's settings for `starling-registry`.
    pub(crate) fn node_config(
        &self,
        settings: &RegistrySettings,
        server_data_dir: &Path,
    ) -> starling_registry::NodeConfig {
        let mut c = starling_registry::NodeConfig::new(
            self.node_id,
            settings.listen,
            settings.advertise.clone(),
            self.data_dir(server_data_dir),
        );
        let ms = Duration::from_millis;
        let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        c.shards = self.shards;
        c.initial_members = settings.initial_members.clone();
        c.heartbeat = ms(self.heartbeat_ms);
        c.election_timeout = (
            ms(self.election_timeout_min_ms),
            ms(self.election_timeout_max_ms),
        );
        c.snapshot_every = self.snapshot_every;
        c.keep_after_snapshot = self.keep_after_snapshot;
        c.max_batch_ops = n(self.max_batch_ops);
        c.proposal_queue = n(self.proposal_queue);
        c.proposals_in_flight = n(self.proposals_in_flight);
        c.disk_queue = n(self.disk_queue);
        c.watch_buffer = n(self.watch_buffer);
        c.lease_check = ms(self.lease_check_ms);
        c.lease_grace = ms(self.lease_grace_ms);
        c.rebalance_interval = ms(self.rebalance_interval_ms);
        c
    }
}

/// Whether `addr` looks like `host:port` (a name or IP and a port number).
fn host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.chars().any(|c| c.is_whitespace() || c == '/')
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// Checks `[registry]`, reporting every problem through `err`; `Some` when all is well.
pub(crate) fn validate(
    r: &RegistryConfig,
    err: &mut dyn FnMut(String, String),
) -> Option<RegistrySettings> {
    let mut ok = true;
    let mut bad = |key: &str, message: String| {
        ok = false;
        err(format!("registry.{key}"), message);
    };
    let listen = match r.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            bad(
                "listen",
                format!(
                    "`{}` is not an IP address with a port (e.g. `0.0.0.0:5290`)",
                    r.listen
                ),
            );
            None
        }
    };
    if !r.advertise.is_empty() && !host_port(&r.advertise) {
        bad("advertise", format!("`{}` is not `host:port`", r.advertise));
    }
    if r.node_id == 0 {
        bad("node_id", "must be greater than 0".into());
    }
    let mut members = BTreeMap::new();
    for (i, m) in r.initial_members.iter().enumerate() {
        let parsed = m
            .split_once('=')
            .and_then(|(id, addr)| Some((id.trim().parse::<u64>().ok()?, addr.trim())));
        match parsed {
            Some((id, addr)) if id > 0 && host_port(addr) => {
                if members.insert(id, addr.to_owned()).is_some() {
                    bad(
                        &format!("initial_members[{i}]"),
                        format!("member id {id} is listed more than once"),
                    );
                }
            }
            _ => bad(
                &format!("initial_members[{i}]"),
                format!("`{m}` is not `ID=HOST:PORT` with an id greater than 0"),
            ),
        }
    }
    if !members.is_empty() && !members.contains_key(&r.node_id) {
        bad(
            "initial_members",
            format!(
                "does not list this node (registry.node_id = {}); leave it empty on a node \
                 that joins an existing cluster",
                r.node_id
            ),
        );
    }
    if r.shards == 0 || r.shards > MAX_SHARDS {
        bad("shards", format!("must be between 1 and {MAX_SHARDS}"));
    }
    for (key, value) in [
        ("heartbeat_ms", r.heartbeat_ms),
        ("election_timeout_min_ms", r.election_timeout_min_ms),
        ("election_timeout_max_ms", r.election_timeout_max_ms),
        ("snapshot_every", r.snapshot_every),
        ("max_batch_ops", u64::from(r.max_batch_ops)),
        ("proposal_queue", u64::from(r.proposal_queue)),
        ("proposals_in_flight", u64::from(r.proposals_in_flight)),
        ("disk_queue", u64::from(r.disk_queue)),
        ("watch_buffer", u64::from(r.watch_buffer)),
        ("lease_check_ms", r.lease_check_ms),
    ] {
        if value == 0 {
            bad(key, "must be greater than 0".into());
        }
    }
    if r.election_timeout_min_ms >= r.election_timeout_max_ms {
        bad(
            "election_timeout_max_ms",
            "must be greater than registry.election_timeout_min_ms".into(),
        );
    }
    if r.heartbeat_ms >= r.election_timeout_min_ms {
        bad(
            "heartbeat_ms",
            "must be less than registry.election_timeout_min_ms".into(),
        );
    }
    let listen = listen?;
    ok.then(|| RegistrySettings {
        listen,
        advertise: if r.advertise.is_empty() {
            listen.to_string()
        } else {
            r.advertise.clone()
        },
        initial_members: members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(r: &RegistryConfig) -> Result<RegistrySettings, Vec<String>> {
        let mut errors = Vec::new();
        let out = validate(r, &mut |path, msg| errors.push(format!("{path}: {msg}")));
        out.ok_or(errors)
    }

    #[test]
    fn defaults_and_members_parse() {
        // The README documents these values.
        let d = RegistryConfig::default();
        assert_eq!(
            (
                d.shards,
                d.heartbeat_ms,
                d.election_timeout_min_ms,
                d.election_timeout_max_ms
            ),
            (16, 150, 1000, 2000)
        );
        assert_eq!(
            (d.snapshot_every, d.keep_after_snapshot, d.max_batch_ops),
            (5000, 500, 1024)
        );
        assert_eq!(
            (d.lease_check_ms, d.lease_grace_ms, d.rebalance_interval_ms),
            (500, 10_000, 2000)
        );
        let s = check(&d).unwrap();
        assert_eq!(s.listen, "127.0.0.1:5290".parse().unwrap());
        assert_eq!(s.advertise, "127.0.0.1:5290");
        assert!(s.initial_members.is_empty());
        let r = RegistryConfig {
            node_id: 2,
            advertise: "reg-1.reg:5290".into(),
            initial_members: vec![
                "1=reg-0.reg:5290".into(),
                " 2 = reg-1.reg:5290".into(),
                "3=[::1]:5290".into(),
            ],
            ..RegistryConfig::default()
        };
        let s = check(&r).unwrap();
        assert_eq!(s.advertise, "reg-1.reg:5290");
        assert_eq!(
            s.initial_members.get(&3).map(String::as_str),
            Some("[::1]:5290")
        );
        let node = r.node_config(&s, Path::new("/d"));
        assert_eq!(node.data_dir, PathBuf::from("/d/registry"));
        assert_eq!(node.initial_members.len(), 3);
        assert_eq!(node.election_timeout.1, Duration::from_secs(2));
    }

    #[test]
    fn every_error_is_reported() {
        let r = RegistryConfig {
            listen: "nowhere".into(),
            advertise: "no-port".into(),
            node_id: 0,
            initial_members: vec!["1=a:1".into(), "1=b:2".into(), "x".into()],
            shards: 0,
            heartbeat_ms: 3000,
            election_timeout_min_ms: 2000,
            election_timeout_max_ms: 2000,
            ..RegistryConfig::default()
        };
        let errors = check(&r).unwrap_err().join("\n");
        for want in [
            "registry.listen:",
            "registry.advertise:",
            "registry.node_id:",
            "registry.initial_members[1]: member id 1 is listed more than once",
            "registry.initial_members[2]:",
            "registry.initial_members: does not list this node",
            "registry.shards:",
            "registry.election_timeout_max_ms:",
            "registry.heartbeat_ms:",
        ] {
            assert!(errors.contains(want), "missing {want} in\n{errors}");
        }
    }
}
