//! Fault tests of the replicated registry with real processes: three `starling registry`
//! nodes on 127.0.B.x (started by `starling_testkit::RegistryCluster`), a `RegistryClient`
//! driving a workload whose every operation is recorded, and the history checker
//! (`starling_testkit::history`): after the faults every acknowledged write must be present
//! and reads must have been linearizable. Elections take 300–600 ms here, so each test runs
//! in seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use starling_registry::shard::{bare_of, shard_of};
use starling_registry::{ClientConfig, ReadMode, RegistryClient, SessionRecord, SessionRegistry};
use starling_testkit::RegistryCluster;
use starling_testkit::history::{History, RunningWorkload, Workload};

const WAIT: Duration = Duration::from_secs(30);

fn full(s: &str) -> starling_xmpp::FullJid {
    starling_xmpp::jid::parse_full(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn rec(jid: &str, stream: &str) -> SessionRecord {
    SessionRecord::new(full(jid), Arc::from("edge-1"), Arc::from(stream))
}

/// The harness polls with blocking sleeps; keep them off the workload's runtime threads.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn connect(c: &RegistryCluster) -> RegistryClient {
    let mut cfg = ClientConfig::new(c.addrs());
    cfg.deadline = Duration::from_secs(10);
    cfg.attempt_timeout = Duration::from_millis(500);
    cfg.backoff = (Duration::from_millis(10), Duration::from_millis(200));
    cfg.reads = ReadMode::Linearizable;
    RegistryClient::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Six writers binding keys (one write at a time), two readers reading them linearizably.
fn workload(client: &RegistryClient) -> RunningWorkload {
    let (w, r) = (client.clone(), client.clone());
    Workload {
        writers: 6,
        readers: 2,
        values_per_key: 5,
    }
    .start(
        move |key, value| {
            let w = w.clone();
            async move { w.bind(rec(&key, &value)).await.is_ok() }
        },
        move |key| {
            let r = r.clone();
            async move {
                r.session(&full(&key))
                    .await
                    .ok()
                    .map(|s| s.map(|s| s.stream_id.to_string()))
            }
        },
    )
}

/// Reads every key's final value linearizably and checks the history.
async fn check(client: &RegistryClient, history: &History) {
    let stats = history
        .check_reading(|key| async move {
            let s = client
                .session(&full(&key))
                .await
                .map_err(|e| e.to_string())?;
            Ok(s.map(|s| s.stream_id.to_string()))
        })
        .await
        .unwrap_or_else(|e| panic!("history: {e}"));
    assert!(stats.acknowledged > 100, "{stats:?}");
    assert!(stats.reads > 50, "{stats:?}");
}

/// A 2-shard cluster under the workload for 1.5 s, and the index of shard 0's leader.
async fn under_load() -> (RegistryCluster, RegistryClient, RunningWorkload, usize) {
    let mut c = RegistryCluster::builder()
        .shards(2)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let client = connect(&c).await;
    let load = workload(&client);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leaders = blocking(|| c.wait_leaders(WAIT)).unwrap_or_else(|e| panic!("{e}"));
    let victim = c.index_of(leaders[&0]).expect("leader is a node");
    (c, client, load, victim)
}

fn in_shard(key: &str, shard: u32, shards: u32) -> bool {
    shard_of(bare_of(key), shards) == shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_shard_leader_under_write_load_loses_no_acknowledged_write() {
    let (mut c, client, load, victim) = under_load().await;
    let shards = c.shard_count();
    let killed_at = Instant::now();
    c.node(victim).kill().unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let resumed = load.acknowledged(|w| w.invoke > killed_at && in_shard(&w.key, 0, shards));
    let history = load.stop().await;
    assert!(
        resumed > 10,
        "only {resumed} writes to shard 0 after the kill"
    );
    let leaders = blocking(|| c.wait_leaders(WAIT)).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(c.index_of(leaders[&0]), Some(victim));
    check(&client, &history).await;

    // Back with its data: it catches up with what it missed.
    blocking(|| {
        c.restart(victim, false)?;
        c.wait_caught_up(victim, WAIT)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_longer_than_the_election_timeout_is_replaced_and_rejoins() {
    let (mut c, client, load, victim) = under_load().await;
    let shards = c.shard_count();
    let paused_at = Instant::now();
    c.node(victim).pause().unwrap_or_else(|e| panic!("{e}"));
    // Six times the longest election timeout.
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let resumed_at = Instant::now();
    // Shard 0 elected another leader and took writes while its old leader was stopped.
    let during = load.acknowledged(|w| {
        w.invoke > paused_at && w.complete < resumed_at && in_shard(&w.key, 0, shards)
    });
    c.node(victim).resume().unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history = load.stop().await;
    assert!(
        during > 5,
        "only {during} writes to shard 0 during the pause"
    );
    blocking(|| c.wait_caught_up(victim, WAIT)).unwrap_or_else(|e| panic!("{e}"));
    check(&client, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_with_its_data_and_by_snapshot_without_it() {
    let mut c = RegistryCluster::builder()
        .shards(2)
        .snapshots(20, 5)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let client = connect(&c).await;
    let bind = |i: usize| {
        let client = client.clone();
        async move {
            client
                .bind(rec(&format!("u{i}@x/r"), &format!("s{i}")))
                .await
                .unwrap_or_else(|e| panic!("bind {i}: {e}"));
        }
    };
    for i in 0..30 {
        bind(i).await;
    }
    let victim = 2;
    c.node(victim).kill().unwrap_or_else(|e| panic!("{e}"));
    // One write at a time: one entry each, so the logs pass snapshots and are compacted.
    for i in 30..90 {
        bind(i).await;
    }
    blocking(|| {
        c.restart(victim, false)?;
        c.wait_caught_up(victim, WAIT)
    })
    .unwrap_or_else(|e| panic!("{e}"));

    c.node(victim).kill().unwrap_or_else(|e| panic!("{e}"));
    for i in 90..150 {
        bind(i).await;
    }
    blocking(|| {
        c.restart(victim, true)?;
        c.wait_caught_up(victim, WAIT)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let m = c.nodes()[victim]
        .metrics()
        .unwrap_or_else(|e| panic!("{e}"));
    let installed = m
        .metric("starling_registry_snapshots_installed_total", &[])
        .unwrap_or(0.0);
    assert!(installed >= 1.0, "the wiped node installed no snapshot");
    assert_eq!(m.metric("starling_registry_sessions", &[]), Some(150.0));
    assert_eq!(client.count().await, Ok(150));
    let s = client
        .session(&full("u149@x/r"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("u149 bound");
    assert_eq!(&*s.stream_id, "s149");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_replaced_by_cli_and_leaders_spread_over_the_new_members() {
    let mut c = RegistryCluster::builder()
        .shards(3)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let client = connect(&c).await;
    for i in 0..20 {
        client
            .bind(rec(&format!("u{i}@x/r"), "s"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    c.node(2).kill().unwrap_or_else(|e| panic!("{e}"));
    let out = blocking(|| c.members_cli(&["remove", "3"])).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "members remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = blocking(|| c.add_node()).unwrap_or_else(|e| panic!("{e}"));
    let addr = c.nodes()[new].addr().to_string();
    let out = blocking(|| c.members_cli(&["add", "4", &addr])).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "members add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = blocking(|| c.members_cli(&["list"])).unwrap_or_else(|e| panic!("{e}"));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "members list: {listing}");
    let rows: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with(|ch: char| ch.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 3, "{listing}");
    for row in rows {
        assert!(row.contains("4=") && !row.contains("3="), "{listing}");
    }
    // Shard s prefers voter s % 3 of [1, 2, 4]: one shard each once the leaders moved.
    let spread = blocking(|| {
        c.wait_for("leaders spread over 1, 2 and 4", WAIT, |c| {
            let leaders = c.leaders()?;
            let want = [(0, 1), (1, 2), (2, 4)].into_iter().collect();
            (leaders == want).then_some(leaders)
        })
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spread.len(), 3);
    blocking(|| c.wait_caught_up(new, WAIT)).unwrap_or_else(|e| panic!("{e}"));
    client
        .bind(rec("after@x/r", "s"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(client.count().await, Ok(21));
}
