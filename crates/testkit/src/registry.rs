//! [`RegistryCluster`]: N `starling registry` processes on distinct loopback addresses
//! (`127.0.B.1`, `127.0.B.2`, ... with `B` chosen per cluster) and free ports, each with its
//! own data directory and configuration file, bootstrapped from one initial member list.
//!
//! Readiness of a node: `<data_dir>/run/registry.json` written and `/readyz` answering 200.
//! Cluster state is read from each node's `/metrics` (`starling_registry_shard_leader`,
//! `..._shard_term`, `..._shard_applied_index`, `..._sessions`), so the harness needs no
//! registry client of its own. Nodes can be killed (SIGKILL), paused (SIGSTOP) and resumed,
//! terminated, restarted on the same addresses with or without their data, and new nodes
//! (started with no initial members, to be added with `starling registry members add`) can
//! join. Every wait polls against a deadline; dropping the cluster kills every process.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::process::{self, process_state};
use crate::server::log_tail;
use crate::{HarnessError, Metrics, http_get, paths, starling_binary};

const POLL: Duration = Duration::from_millis(20);
const TAIL_LINES: usize = 40;

/// Test timings and sizes of a cluster; the defaults keep elections well under a second.
#[derive(Debug, Clone)]
pub struct RegistryClusterBuilder {
    nodes: usize,
    shards: u32,
    heartbeat_ms: u64,
    election_ms: (u64, u64),
    snapshot_every: u64,
    keep_after_snapshot: u64,
    rebalance_interval_ms: u64,
    extra: Vec<(String, toml::Value)>,
    ready_timeout: Duration,
    log_level: String,
}

impl Default for RegistryClusterBuilder {
    fn default() -> Self {
        RegistryClusterBuilder {
            nodes: 3,
            shards: 4,
            heartbeat_ms: 50,
            election_ms: (300, 600),
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            rebalance_interval_ms: 300,
            extra: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            log_level: std::env::var("STARLING_TEST_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".to_owned()),
        }
    }
}

impl RegistryClusterBuilder {
    /// Number of initial members (default 3).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// `registry.shards` (default 4).
    pub fn shards(mut self, n: u32) -> Self {
        self.shards = n;
        self
    }

    /// `registry.election_timeout_min_ms` / `_max_ms` (default 300 / 600).
    pub fn election_timeout_ms(mut self, min: u64, max: u64) -> Self {
        self.election_ms = (min, max);
        self
    }

    /// `registry.snapshot_every` and `keep_after_snapshot`.
    pub fn snapshots(mut self, every: u64, keep: u64) -> Self {
        self.snapshot_every = every;
        self.keep_after_snapshot = keep;
        self
    }

    /// `registry.rebalance_interval_ms` (default 300; 0 turns leader spreading off).
    pub fn rebalance_interval_ms(mut self, ms: u64) -> Self {
        self.rebalance_interval_ms = ms;
        self
    }

    /// Any other `[registry]` key.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.extra.push((key.to_owned(), value.into()));
        self
    }

    /// Starts every member at once and waits until each is ready and every shard has a
    /// leader.
    pub fn start(self) -> Result<RegistryCluster, HarnessError> {
        let binary = starling_binary()?;
        let root = paths::unique_dir("registry")?;
        let block = address_block();
        let mut nodes = Vec::new();
        for i in 0..self.nodes {
            let id = i as u64 + 1;
            nodes.push(RegistryProcess::allocate(&root, block, id)?);
        }
        let members: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect();
        let mut cluster = RegistryCluster {
            binary,
            root,
            block,
            settings: self,
            nodes,
            keep: false,
        };
        for i in 0..cluster.nodes.len() {
            let text = cluster.config_text(&cluster.nodes[i], &members);
            cluster.nodes[i].write_config(&text)?;
        }
        // All members of a new cluster start before any is waited for: a member that
        // initialises a shard cannot have a leader (nor be ready) until a majority is up.
        let (binary, timeout) = (cluster.binary.clone(), cluster.settings.ready_timeout);
        for node in &mut cluster.nodes {
            if let Err(e) = node.launch(&binary) {
                cluster.keep = true;
                return Err(e);
            }
        }
        for node in &mut cluster.nodes {
            let run_file = node.run_file();
            if let Err(e) = node.wait_ready(&run_file, timeout) {
                cluster.keep = true;
                return Err(e);
            }
        }
        cluster.wait_leaders(cluster.settings.ready_timeout)?;
        Ok(cluster)
    }
}

/// Picks the `B` of `127.0.B.x` for a new cluster: different for clusters of one process and,
/// most likely, of concurrent test processes.
fn address_block() -> u8 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let seed = std::process::id().wrapping_mul(31).wrapping_add(n * 7);
    // 127.0.0.x and 127.0.1.x are left to the other harnesses.
    u8::try_from(seed % 250 + 2).unwrap_or(2)
}

/// A free port on `ip` (bound and released; the kernel does not hand it out again at once).
fn free_port(ip: IpAddr) -> Result<u16, HarnessError> {
    let l = TcpListener::bind((ip, 0))
        .map_err(|e| HarnessError::io(format!("finding a free port on {ip}"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("reading a bound port", e))
}

#[derive(Debug, Deserialize)]
struct RunFile {
    registry: SocketAddr,
    admin: SocketAddr,
}

/// One `starling registry` process.
#[derive(Debug)]
pub struct RegistryProcess {
    id: u64,
    addr: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl RegistryProcess {
    fn allocate(root: &Path, block: u8, id: u64) -> Result<RegistryProcess, HarnessError> {
        let host = u8::try_from(id % 250).unwrap_or(1).max(1);
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, block, host));
        let addr = SocketAddr::new(ip, free_port(ip)?);
        let admin = SocketAddr::new(ip, free_port(ip)?);
        let dir = root.join(format!("node{id}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        Ok(RegistryProcess {
            id,
            addr,
            admin,
            config_path: dir.join("starling.toml"),
            log_path: dir.join("starling.log"),
            dir,
            child: None,
            starts: 0,
        })
    }

    fn write_config(&self, text: &str) -> Result<(), HarnessError> {
        std::fs::write(&self.config_path, text)
            .map_err(|e| HarnessError::io(format!("writing {}", self.config_path.display()), e))
    }

    /// The member id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The gRPC address (`IP:port`) clients and peers use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The node's data directory (`server.data_dir`; the registry's files are in
    /// `registry/`).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The captured log of every start.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id, while it runs (or is paused).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive and not stopped.
    pub fn is_running(&mut self) -> bool {
        let alive = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)));
        alive
            && self
                .pid()
                .and_then(process_state)
                .is_some_and(|s| s != 'T' && s != 't')
    }

    /// A fresh scrape of `/metrics`.
    pub fn metrics(&self) -> Result<Metrics, HarnessError> {
        let r = http_get(self.admin, "/metrics", Duration::from_secs(2))?;
        if r.status != 200 {
            return Err(HarnessError::Http(format!(
                "/metrics answered {}",
                r.status
            )));
        }
        Metrics::parse(&r.text()).map_err(HarnessError::Http)
    }

    fn run_file(&self) -> PathBuf {
        self.dir.join("run").join("registry.json")
    }

    /// Starts the process and waits until it is ready.
    fn spawn(&mut self, binary: &Path, timeout: Duration) -> Result<(), HarnessError> {
        self.launch(binary)?;
        let run_file = self.run_file();
        self.wait_ready(&run_file, timeout)
    }

    /// Starts the process without waiting for it.
    fn launch(&mut self, binary: &Path) -> Result<(), HarnessError> {
        let run_file = self.run_file();
        let _ = std::fs::remove_file(&run_file);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log_path.display()), e))?;
        std::io::Write::write_all(
            &mut log,
            format!("===== testkit: start #{} =====\n", self.starts).as_bytes(),
        )
        .map_err(|e| HarnessError::io("writing the log banner", e))?;
        let stderr = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating the log file", e))?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("registry")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STARLING_") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .map_err(|e| HarnessError::io(format!("starting {}", binary.display()), e))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, run_file: &Path, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut missing = "run/registry.json was never written".to_owned();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(self.not_ready(timeout, format!("the process exited: {status}")));
            }
            if let Ok(bytes) = std::fs::read(run_file) {
                match serde_json::from_slice::<RunFile>(&bytes) {
                    Ok(run) if run.registry == self.addr && run.admin == self.admin => {
                        match http_get(self.admin, "/readyz", Duration::from_secs(2)) {
                            Ok(r) if r.status == 200 => return Ok(()),
                            Ok(r) => missing = format!("/readyz answered {}", r.status),
                            Err(e) => missing = format!("/readyz: {e}"),
                        }
                    }
                    Ok(run) => {
                        return Err(self.not_ready(
                            timeout,
                            format!(
                                "registry.json names {run:?}, not {} / {}",
                                self.addr, self.admin
                            ),
                        ));
                    }
                    Err(e) => missing = format!("registry.json does not parse: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(timeout, missing));
            }
            std::thread::sleep(POLL);
        }
    }

    fn not_ready(&self, timeout: Duration, reason: String) -> HarnessError {
        process::failed(
            &self.log_path,
            timeout,
            format!("registry node {}: {reason}", self.id),
        )
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> Result<ExitStatus, HarnessError> {
        process::kill(&mut self.child)
    }

    /// SIGTERM, and wait for the exit (at most 15 s, then SIGKILL and an error).
    pub fn terminate(&mut self) -> Result<ExitStatus, HarnessError> {
        process::terminate(&mut self.child, Duration::from_secs(15), &self.log_path)
    }

    /// SIGSTOP, and wait until the kernel reports the process stopped.
    pub fn pause(&mut self) -> Result<(), HarnessError> {
        process::pause(self.child.as_ref(), &self.log_path)
    }

    /// SIGCONT, and wait until it runs again.
    pub fn resume(&mut self) -> Result<(), HarnessError> {
        process::resume(self.child.as_ref(), &self.log_path)
    }

    /// The leader of `shard` as this node reports it (`None`: no leader known, or no answer).
    pub fn leader_of(&self, shard: u32) -> Option<u64> {
        let m = self.metrics().ok()?;
        let s = shard.to_string();
        let id = m.metric("starling_registry_shard_leader", &[("shard", &s)])?;
        (id >= 1.0).then_some(id as u64)
    }
}

/// A running registry cluster. Dropping it kills every node and removes the directories
/// (kept when `STARLING_KEEP_TEST_DATA` is set or the test is failing, with the logs' tails
/// printed).
#[derive(Debug)]
pub struct RegistryCluster {
    binary: PathBuf,
    root: PathBuf,
    block: u8,
    settings: RegistryClusterBuilder,
    nodes: Vec<RegistryProcess>,
    keep: bool,
}

impl RegistryCluster {
    /// A builder with the test defaults: 3 nodes, 4 shards, elections in 300–600 ms.
    pub fn builder() -> RegistryClusterBuilder {
        RegistryClusterBuilder::default()
    }

    fn config_text(&self, node: &RegistryProcess, members: &[String]) -> String {
        let s = &self.settings;
        let mut registry = toml::Table::new();
        let mut put = |k: &str, v: toml::Value| {
            registry.insert(k.to_owned(), v);
        };
        let int = |v: u64| toml::Value::Integer(i64::try_from(v).unwrap_or(i64::MAX));
        put("listen", toml::Value::String(node.addr.to_string()));
        put("node_id", int(node.id));
        put(
            "initial_members",
            toml::Value::Array(members.iter().cloned().map(toml::Value::String).collect()),
        );
        put("shards", int(u64::from(s.shards)));
        put("heartbeat_ms", int(s.heartbeat_ms));
        put("election_timeout_min_ms", int(s.election_ms.0));
        put("election_timeout_max_ms", int(s.election_ms.1));
        put("snapshot_every", int(s.snapshot_every));
        put("keep_after_snapshot", int(s.keep_after_snapshot));
        put("lease_check_ms", int(50));
        put("lease_grace_ms", int(300));
        put("rebalance_interval_ms", int(s.rebalance_interval_ms));
        for (k, v) in &s.extra {
            put(k, v.clone());
        }
        let mut root = toml::Table::new();
        let mut server = toml::Table::new();
        server.insert(
            "data_dir".into(),
            toml::Value::String(node.dir.display().to_string()),
        );
        let mut admin = toml::Table::new();
        admin.insert("listen".into(), toml::Value::String(node.admin.to_string()));
        let mut log = toml::Table::new();
        log.insert("level".into(), toml::Value::String(s.log_level.clone()));
        root.insert("server".into(), toml::Value::Table(server));
        root.insert("registry".into(), toml::Value::Table(registry));
        root.insert("admin".into(), toml::Value::Table(admin));
        root.insert("log".into(), toml::Value::Table(log));
        toml::to_string(&root).unwrap_or_default()
    }

    /// The nodes, in id order (node `i` has id `i + 1`).
    pub fn nodes(&self) -> &[RegistryProcess] {
        &self.nodes
    }

    /// Node `i` (id `i + 1`), for process control.
    pub fn node(&mut self, i: usize) -> &mut RegistryProcess {
        &mut self.nodes[i]
    }

    /// The index of the node with member id `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Every node's gRPC address, the seeds for a client.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    /// `registry.shards`.
    pub fn shard_count(&self) -> u32 {
        self.settings.shards
    }

    /// The indexes of the nodes that run (not killed, not paused).
    fn running(&mut self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_running())
            .collect()
    }

    /// What every running node reports as each shard's leader, if they all agree on a running
    /// node: shard → leader id.
    pub fn leaders(&mut self) -> Option<BTreeMap<u32, u64>> {
        let running = self.running();
        let ids: Vec<u64> = running.iter().map(|i| self.nodes[*i].id).collect();
        let mut out = BTreeMap::new();
        let scrapes: Vec<Metrics> = running
            .iter()
            .map(|i| self.nodes[*i].metrics())
            .collect::<Result<_, _>>()
            .ok()?;
        for shard in 0..self.settings.shards {
            let label = shard.to_string();
            let seen: Vec<Option<f64>> = scrapes
                .iter()
                .map(|m| m.metric("starling_registry_shard_leader", &[("shard", &label)]))
                .collect();
            let first = seen.first().copied().flatten()?;
            if first < 1.0 || seen.iter().any(|s| *s != Some(first)) {
                return None;
            }
            let id = first as u64;
            if !ids.contains(&id) {
                return None;
            }
            out.insert(shard, id);
        }
        Some(out)
    }

    /// Waits until every shard has a leader that all running nodes agree on; returns it.
    pub fn wait_leaders(&mut self, timeout: Duration) -> Result<BTreeMap<u32, u64>, HarnessError> {
        self.wait_for("every shard to have one agreed leader", timeout, |c| {
            c.leaders()
        })
    }

    /// Polls `f` until it returns `Some`, or fails after `timeout` with the nodes' log tails.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                let tails: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "--- node {} ({}) ---\n{}",
                            n.id,
                            n.log_path.display(),
                            log_tail(&n.log_path, 15)
                        )
                    })
                    .collect();
                return Err(HarnessError::NotReady {
                    timeout,
                    reason: format!("waiting for {what}"),
                    log: self.root.clone(),
                    tail: tails.join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `i` has applied, in every shard, the leader's applied index as it was
    /// when the wait began, and holds the same number of sessions as the leader.
    pub fn wait_caught_up(&mut self, i: usize, timeout: Duration) -> Result<(), HarnessError> {
        let shards = self.settings.shards;
        let target: BTreeMap<u32, f64> = self.wait_for("leaders", timeout, |c| {
            let leaders = c.leaders()?;
            let mut target = BTreeMap::new();
            for (shard, id) in leaders {
                let leader = c.index_of(id)?;
                let m = c.nodes[leader].metrics().ok()?;
                let label = shard.to_string();
                target.insert(
                    shard,
                    m.metric(
                        "starling_registry_shard_applied_index",
                        &[("shard", &label)],
                    )?,
                );
            }
            Some(target)
        })?;
        self.wait_for(&format!("node {} to catch up", i + 1), timeout, |c| {
            let mine = c.nodes[i].metrics().ok()?;
            let leaders = c.leaders()?;
            for shard in 0..shards {
                let label = shard.to_string();
                let l = [("shard", label.as_str())];
                let applied = mine.metric("starling_registry_shard_applied_index", &l)?;
                if applied < *target.get(&shard)? {
                    return None;
                }
                let leader = c.index_of(*leaders.get(&shard)?)?;
                let theirs = c.nodes[leader].metrics().ok()?;
                let count = |m: &Metrics| m.metric("starling_registry_sessions", &l).unwrap_or(0.0);
                if count(&mine) != count(&theirs) {
                    return None;
                }
            }
            Some(())
        })
    }

    /// Starts node `i` again on the same addresses; `wipe` deletes its registry data first
    /// (it then catches up from the others, by snapshot when their logs were compacted).
    pub fn restart(&mut self, i: usize, wipe: bool) -> Result<(), HarnessError> {
        if self.nodes[i].child.is_some() {
            self.nodes[i].terminate()?;
        }
        if wipe {
            let dir = self.nodes[i].dir.join("registry");
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HarnessError::io(format!("removing {}", dir.display()), e)),
            }
        }
        let (binary, timeout) = (self.binary.clone(), self.settings.ready_timeout);
        self.nodes[i].spawn(&binary, timeout)
    }

    /// Starts a new node with the next free id and no initial members: it waits to be added
    /// (`members add`). Returns its index.
    pub fn add_node(&mut self) -> Result<usize, HarnessError> {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let node = RegistryProcess::allocate(&self.root, self.block, id)?;
        let text = self.config_text(&node, &[]);
        node.write_config(&text)?;
        self.nodes.push(node);
        let i = self.nodes.len() - 1;
        let (binary, timeout) = (self.binary.clone(), self.settings.ready_timeout);
        self.nodes[i].spawn(&binary, timeout)?;
        Ok(i)
    }

    /// Runs `starling registry members ARGS --seed <every running node>` and returns its
    /// output.
    pub fn members_cli(&mut self, args: &[&str]) -> Result<Output, HarnessError> {
        let seeds: Vec<String> = self
            .running()
            .iter()
            .map(|i| self.nodes[*i].addr.to_string())
            .collect();
        let mut command = Command::new(&self.binary);
        command.args(["registry", "members"]).args(args);
        for s in &seeds {
            command.args(["--seed", s]);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STARLING_") {
                command.env_remove(key);
            }
        }
        command
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| HarnessError::io("running starling registry members", e))
    }
}

impl Drop for RegistryCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!(
                    "\n===== registry node {} log: {} =====\n{}",
                    n.id,
                    n.log_path.display(),
                    log_tail(&n.log_path, TAIL_LINES)
                );
            }
            eprintln!("registry cluster data kept in {}", self.root.display());
        } else if self.keep || std::env::var_os("STARLING_KEEP_TEST_DATA").is_some() {
            eprintln!("registry cluster data kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
