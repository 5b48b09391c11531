//! Registry clusters of 3 nodes in one process, over real gRPC on 127.0.0.1, each node with
//! its own redb directory: the client API, leader failover under load with a history
//! checker, restarts with and without data, lease expiry with the watch stream, membership.
//! (Multi-process tests with kill -9 and SIGSTOP run through the `starling` binary.)

mod harness;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{Cluster, Opts, full, rec};
use starling_registry::shard::shard_of;
use starling_registry::{
    BindOutcome, ClientConfig, ReadMode, RegistryClient, RegistryError, SessionRegistry, pb,
};
use starling_testkit::history::Workload;

/// Bare JIDs `prefix{i}@x` that fall in `shard` of `shards`.
fn bares_in(shard: u32, shards: u32, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}@x"))
        .filter(|b| shard_of(b, shards) == shard)
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_lookup_unbind_through_the_client() {
    let c = Cluster::start("basic", 3, Opts::default()).await;
    // Each shard's designated initialiser campaigned first: leaders are spread.
    let leaders: BTreeSet<usize> = (0..4).map(|s| c.leader_index(s)).collect();
    assert_eq!(leaders.len(), 3, "leaders not spread: {leaders:?}");

    let client = c.client(ReadMode::Linearizable).await;
    assert_eq!(client.shard_count(), 4);
    assert_eq!(
        client.bind(rec("a@x/1", "e1", "s1")).await,
        Ok(BindOutcome::Bound)
    );
    assert_eq!(
        client.bind(rec("a@x/2", "e1", "s2")).await,
        Ok(BindOutcome::Bound)
    );
    assert_eq!(
        client.bind(rec("b@x/1", "e2", "s9")).await,
        Ok(BindOutcome::Bound)
    );
    let a1 = full("a@x/1");
    let s = client.session(&a1).await.unwrap().unwrap();
    assert_eq!((&*s.node, &*s.stream_id), ("e1", "s1"));

    let presence = Bytes::from_static(b"<presence><priority>5</priority></presence>");
    client
        .set_presence(&a1, "s1", 5, Some(presence.clone()))
        .await
        .unwrap();
    assert_eq!(
        client
            .set_resumption(&a1, "s1", Some(Arc::from("r-1")))
            .await,
        Ok(true)
    );
    assert_eq!(
        client
            .set_resumption(&a1, "zz", Some(Arc::from("r-2")))
            .await,
        Ok(false)
    );
    let bare = a1.to_bare();
    let by_r = client
        .session_by_resumption(&bare, "r-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_r.jid, a1);
    assert_eq!(by_r.presence, Some(presence));
    assert_eq!(by_r.priority, 5);
    assert_eq!(client.sessions(&bare).await.unwrap().len(), 2);

    // A new session on the same resource replaces the old one, which is handed back.
    match client.bind(rec("a@x/1", "e2", "s3")).await.unwrap() {
        BindOutcome::Replaced(old) => {
            assert_eq!(&*old.stream_id, "s1");
            assert_eq!(old.resumption.as_deref(), Some("r-1"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.unbind(&a1, "s1").await, Ok(false));
    assert_eq!(client.unbind(&a1, "s3").await, Ok(true));
    assert_eq!(client.count().await, Ok(2));

    // The per-account limit.
    let mut cfg = ClientConfig::new(c.addrs());
    cfg.max_per_account = 2;
    let limited = RegistryClient::connect(cfg).await.unwrap();
    assert_eq!(
        limited.bind(rec("a@x/3", "e1", "s4")).await,
        Ok(BindOutcome::Bound)
    );
    assert_eq!(
        limited.bind(rec("a@x/4", "e1", "s5")).await,
        Err(RegistryError::LimitReached)
    );

    // Removing a node removes its sessions in every shard.
    let mut removed: Vec<String> = client
        .remove_node("e1")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.jid.to_string())
        .collect();
    removed.sort();
    assert_eq!(removed, ["a@x/2", "a@x/3"]);
    assert_eq!(client.count().await, Ok(1));

    // Every replica applied the same state.
    let s = client.shard_of(&bare);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts: Vec<_> = (0..3).map(|i| c.node(i).local_count(s)).collect();
        if counts.iter().all(|n| *n == counts[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas differ: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writers bind keys one write at a time, readers read them linearizably; the leader of a
/// shard is stopped in the middle. Writes must resume and the history must check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_under_write_load_keeps_a_linearizable_history() {
    let shards = 2;
    let mut c = Cluster::start(
        "failover",
        3,
        Opts {
            shards,
            ..Opts::default()
        },
    )
    .await;
    let client = c.client(ReadMode::Linearizable).await;
    let (w, r) = (client.clone(), client.clone());
    let workload = Workload {
        writers: 6,
        readers: 2,
        values_per_key: 5,
    }
    .start(
        move |key, value| {
            let w = w.clone();
            async move { w.bind(rec(&key, "e1", &value)).await.is_ok() }
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
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = c.leader_index(0);
    let killed_at = Instant::now();
    c.stop(victim).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // Writes to the failed-over shard were acknowledged after the kill.
    let resumed = workload.acknowledged(|w| {
        w.invoke > killed_at + Duration::from_millis(100)
            && shard_of(starling_registry::shard::bare_of(&w.key), shards) == 0
    });
    let history = workload.stop().await;
    c.wait_leaders().await;
    assert_ne!(c.leader_index(0), victim);
    assert!(resumed > 10, "only {resumed} writes after the failover");

    let stats = history
        .check_reading(|key| {
            let client = client.clone();
            async move {
                let s = client
                    .session(&full(&key))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(s.map(|s| s.stream_id.to_string()))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("history: {e}"));
    assert!(stats.acknowledged > 100, "{stats:?}");
    assert!(stats.reads > 50, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_and_the_cluster_restarts_from_disk() {
    let mut c = Cluster::start("restart", 3, Opts::default()).await;
    let client = c.client(ReadMode::Linearizable).await;
    for i in 0..40 {
        client
            .bind(rec(&format!("u{i}@x/r"), "e1", &format!("s{i}")))
            .await
            .unwrap();
    }
    c.stop(2).await;
    c.wait_leaders().await;
    for i in 40..80 {
        client
            .bind(rec(&format!("u{i}@x/r"), "e1", &format!("s{i}")))
            .await
            .unwrap();
    }
    c.restart(2, false).await;
    c.wait_caught_up(2).await;

    // Every node down, then up again from its files.
    c.restart_all_from_disk().await;
    let client = c.client(ReadMode::Linearizable).await;
    assert_eq!(client.count().await, Ok(80));
    let s = client.session(&full("u77@x/r")).await.unwrap().unwrap();
    assert_eq!(&*s.stream_id, "s77");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_catches_up_by_snapshot() {
    let mut c = Cluster::start(
        "wipe",
        3,
        Opts {
            shards: 2,
            snapshot_every: 20,
            keep_after_snapshot: 5,
        },
    )
    .await;
    let client = c.client(ReadMode::Linearizable).await;
    let victim = 2;
    for i in 0..30 {
        client
            .bind(rec(&format!("u{i}@x/r"), "e1", &format!("s{i}")))
            .await
            .unwrap();
    }
    c.stop(victim).await;
    c.wait_leaders().await;
    // One write at a time: one entry each, so the logs pass several snapshots and are purged.
    for i in 30..120 {
        client
            .bind(rec(&format!("u{i}@x/r"), "e1", &format!("s{i}")))
            .await
            .unwrap();
    }
    for s in 0..2 {
        let leader = c.node(c.leader_index(s));
        assert!(
            leader.snapshot_index(s).is_some(),
            "shard {s} has no snapshot"
        );
    }
    c.restart(victim, true).await;
    c.wait_caught_up(victim).await;
    for s in 0..2 {
        assert!(
            c.node(victim).snapshot_index(s).is_some(),
            "shard {s} caught up without a snapshot"
        );
    }
    let total: usize = (0..2).filter_map(|s| c.node(victim).local_count(s)).sum();
    assert_eq!(total, 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_restarts_from_its_snapshot_files_after_the_logs_were_purged() {
    let mut c = Cluster::start(
        "snapfiles",
        3,
        Opts {
            shards: 2,
            snapshot_every: 20,
            keep_after_snapshot: 5,
        },
    )
    .await;
    let client = c.client(ReadMode::Linearizable).await;
    // One write at a time: one entry each, so every node passes several snapshots.
    for i in 0..120 {
        client
            .bind(rec(&format!("u{i}@x/r"), "e1", &format!("s{i}")))
            .await
            .unwrap();
    }
    for i in 0..10 {
        assert_eq!(
            client
                .unbind(&full(&format!("u{i}@x/r")), &format!("s{i}"))
                .await,
            Ok(true)
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for n in 0..3 {
        for s in 0..2 {
            while c.node(n).snapshot_index(s).is_none_or(|i| i < 40) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {n} shard {s}: no snapshot"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let file = c.configs[n]
                .data_dir
                .join("snapshots")
                .join(format!("shard-{s}.snap"));
            assert!(file.is_file(), "{} missing", file.display());
        }
    }

    c.restart_all_from_disk().await;
    let client = c.client(ReadMode::Linearizable).await;
    assert_eq!(client.count().await, Ok(110));
    assert_eq!(client.session(&full("u3@x/r")).await, Ok(None));
    let s = client.session(&full("u117@x/r")).await.unwrap().unwrap();
    assert_eq!(&*s.stream_id, "s117");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_a_nodes_sessions_in_one_entry_and_the_watch_reports_it() {
    let shards = 2;
    let c = Cluster::start(
        "lease",
        3,
        Opts {
            shards,
            ..Opts::default()
        },
    )
    .await;
    let client = c.client(ReadMode::Cached).await;
    let in0 = bares_in(0, shards, "u", 4);
    let in1 = bares_in(1, shards, "u", 1);
    client
        .heartbeat("edge-a", Duration::from_secs(600))
        .await
        .unwrap();
    client
        .heartbeat("edge-b", Duration::from_secs(600))
        .await
        .unwrap();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addrs()[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = pb::registry_client::RegistryClient::new(channel)
        .watch(pb::WatchRequest { shards: vec![0] })
        .await
        .unwrap()
        .into_inner();

    for b in &in0[..3] {
        client
            .bind(rec(&format!("{b}/r"), "edge-a", "s"))
            .await
            .unwrap();
    }
    client
        .bind(rec(&format!("{}/r", in1[0]), "edge-a", "s"))
        .await
        .unwrap();
    client
        .bind(rec(&format!("{}/r", in0[3]), "edge-b", "s"))
        .await
        .unwrap();
    // Fill the cache through a read, then let the watch keep it.
    let bare0 = starling_xmpp::jid::parse_bare(&in0[0]).unwrap();
    assert_eq!(client.sessions(&bare0).await.unwrap().len(), 1);
    // edge-a stops: its last heartbeat gives it a lease that ends at once.
    client
        .heartbeat("edge-a", Duration::from_millis(1))
        .await
        .unwrap();

    let expired = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = watch.message().await.unwrap().unwrap();
            if e.changes.iter().any(|c| c.expired_node.is_some()) {
                return e;
            }
        }
    })
    .await
    .expect("no expiry on the watch stream");
    // One committed entry removed all three sessions of edge-a in shard 0.
    let mut bares: Vec<&str> = expired.changes.iter().map(|c| c.bare.as_str()).collect();
    bares.sort();
    let mut want: Vec<&str> = in0[..3].iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(bares, want);
    for ch in &expired.changes {
        assert_eq!(ch.expired_node.as_deref(), Some("edge-a"));
        assert_eq!(ch.removed.len(), 1);
        assert!(ch.sessions.is_empty());
    }
    // The cached lookup follows the watch; the linearizable one agrees.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.sessions(&bare0).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "cache not updated by the watch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        client
            .sessions_linearizable(&bare0)
            .await
            .unwrap()
            .is_empty()
    );
    // Shard 1 expired edge-a too; edge-b's session survives.
    let bare1 = starling_xmpp::jid::parse_bare(&in1[0]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client
        .sessions_linearizable(&bare1)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "shard 1 did not expire edge-a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bare_b = starling_xmpp::jid::parse_bare(&in0[3]).unwrap();
    assert_eq!(
        client.sessions_linearizable(&bare_b).await.unwrap().len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_as_learner_then_voter_and_leave() {
    let mut c = Cluster::start(
        "members",
        3,
        Opts {
            shards: 2,
            ..Opts::default()
        },
    )
    .await;
    let client = c.client(ReadMode::Linearizable).await;
    client.bind(rec("a@x/1", "e1", "s1")).await.unwrap();

    // A fourth node, started with no initial members, joins.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = c.configs[0].clone();
    cfg.id = 4;
    cfg.listen = addr;
    cfg.advertise = addr.to_string();
    cfg.data_dir = c.configs[0].data_dir.with_file_name("node4");
    cfg.initial_members.clear();
    c.configs.push(cfg.clone());
    c.nodes.push(Some(
        starling_registry::RegistryNode::start(cfg, Some(listener))
            .await
            .unwrap(),
    ));
    client.add_member(4, &addr.to_string()).await.unwrap();
    wait_members(
        &client,
        |s| s.voters.iter().map(|m| m.id).collect(),
        &[1, 2, 3, 4],
    )
    .await;
    c.wait_caught_up(3).await;

    client.remove_member(4).await.unwrap();
    wait_members(
        &client,
        |s| s.voters.iter().chain(&s.learners).map(|m| m.id).collect(),
        &[1, 2, 3],
    )
    .await;
    c.stop(3).await;
    assert_eq!(client.count().await, Ok(1));
}

/// Waits until every shard's membership, as the first member sees it, is `want`.
async fn wait_members(
    client: &RegistryClient,
    ids: impl Fn(&pb::ShardStatus) -> Vec<u64>,
    want: &[u64],
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.members().await.unwrap();
        if status.shards.iter().all(|s| ids(s) == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "membership never became {want:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A failed node's shards move to the others; once it is back and caught up, the leaders
/// hand its preferred shards back (shard `s` prefers member `s % 3 + 1`), so the spread is
/// even again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_return_to_their_preferred_node_after_a_failover() {
    let shards = 6;
    let mut c = Cluster::start(
        "rebalance",
        3,
        Opts {
            shards,
            ..Opts::default()
        },
    )
    .await;
    let client = c.client(ReadMode::Linearizable).await;
    client.bind(rec("a@x/1", "e1", "s1")).await.unwrap();
    c.stop(0).await;
    c.wait_leaders().await;
    for s in 0..shards {
        assert_ne!(c.leader_index(s), 0);
    }
    // Writes while node 1 is down, so it has to catch up before it can lead again.
    for i in 0..20 {
        client
            .bind(rec(&format!("u{i}@x/r"), "e1", &format!("s{i}")))
            .await
            .unwrap();
    }
    c.restart(0, false).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.wait_leaders().await;
        let leaders: Vec<usize> = (0..shards).map(|s| c.leader_index(s)).collect();
        let want: Vec<usize> = (0..shards).map(|s| s as usize % 3).collect();
        if leaders == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaders {leaders:?}, preferred {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was lost in the hand-overs.
    assert_eq!(client.count().await, Ok(21));
}
