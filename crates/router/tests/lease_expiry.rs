//! The router over the Raft registry: when an edge's lease expires, the registry removes its
//! sessions in one committed entry, the watch stream reports them (`expired_node`), and the
//! router broadcasts `unavailable` for each (RFC 6121 §4.5.2), as for a session that ended.
//! Everything is real: a one-member registry node over gRPC on 127.0.0.1 with its redb log,
//! the registry client in cached mode, the router's workers, an in-memory redb store; the
//! two edges are channel links.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use starling_cluster::{EdgeLink, Edges, RouterLink, ToEdge, ToRouter, channel_link};
use starling_registry::{
    ClientConfig, NodeConfig, ReadMode, RegistryClient, RegistryNode, SessionRecord,
    SessionRegistry,
};
use starling_router::{Router, RouterDeps, Settings};
use starling_sasl::{HashAlgo, derive_credentials};
use starling_store::{AccountStore, BareUser, RedbStore, RosterItem, RosterStore};
use starling_xml::Element;
use starling_xmpp::FullJid;
use starling_xmpp::jid::parse_full;
use tokio::net::TcpListener;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "example.org";
const J: &str = "juliet@example.org/balcony";
const R: &str = "romeo@example.org/garden";
const WAIT: Duration = Duration::from_secs(15);

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn registry(dir: &TempDir) -> (RegistryNode, RegistryClient) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut c = NodeConfig::new(1, addr, addr.to_string(), dir.0.join("node1"));
    c.shards = 2;
    c.initial_members = BTreeMap::from([(1, addr.to_string())]);
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = (Duration::from_millis(300), Duration::from_millis(600));
    c.lease_check = Duration::from_millis(50);
    c.lease_grace = Duration::from_millis(300);
    let node = RegistryNode::start(c, Some(listener)).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while (0..2).any(|s| node.leader_of(s).is_none()) {
        assert!(tokio::time::Instant::now() < deadline, "no leaders");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cfg = ClientConfig::new(vec![addr.to_string()]);
    cfg.reads = ReadMode::Cached;
    cfg.deadline = Duration::from_secs(10);
    let client = RegistryClient::connect(cfg).await.unwrap();
    (node, client)
}

async fn store() -> Arc<RedbStore> {
    let store = Arc::new(RedbStore::open_in_memory().unwrap());
    for (user, contact) in [
        ("juliet", "romeo@example.org"),
        ("romeo", "juliet@example.org"),
    ] {
        let u = BareUser::new(DOMAIN, user);
        let creds = HashAlgo::ALL
            .iter()
            .map(|&h| derive_credentials(h, "pw", &[7u8; 16], 16).unwrap())
            .collect();
        store.create(&u, creds).await.unwrap();
        let item = RosterItem {
            jid: contact.to_owned(),
            name: None,
            subscription: "both".to_owned(),
            ask: false,
            groups: vec![],
        };
        store.set_roster_item(&u, item).await.unwrap();
    }
    store
}

fn full(s: &str) -> FullJid {
    parse_full(s).unwrap()
}

/// Sends a stanza as an edge does: `from` stamped with the session.
async fn send(link: &dyn RouterLink, from: &str, xml: &str) {
    let stanza = Element::parse(Bytes::from(xml.to_owned()), "jabber:client").unwrap();
    let stanza = Element::parse(stanza.with_addresses(None, Some(from)), "jabber:client").unwrap();
    link.send(ToRouter::Stanza {
        from: full(from),
        stanza,
    })
    .await
    .unwrap();
}

/// The next stanza delivered on an edge, with its recipients.
async fn delivered(rx: &mut Receiver<ToEdge>) -> (Vec<String>, Element) {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(ToEdge::Deliver {
            recipients, stanza, ..
        })) => (recipients.iter().map(|j| j.to_string()).collect(), stanza),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Binds `jid` on `node` in the registry and tells the router, as an edge does.
async fn login(registry: &RegistryClient, link: &dyn RouterLink, jid: &str, node: &str) {
    let record = SessionRecord::new(full(jid), Arc::from(node), Arc::from(format!("s-{jid}")));
    registry.bind(record).await.unwrap();
    link.send(ToRouter::SessionStarted { jid: full(jid) })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_lease_expires_has_its_sessions_announced_unavailable() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = TempDir(std::env::temp_dir().join(format!(
        "starling-router-lease-{}-{nanos}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (node, client) = registry(&dir).await;
    let registry = Arc::new(client);
    let mut removals = registry
        .node_removals()
        .expect("cached reads watch the registry");

    // The watch stream connects in the background: a throwaway edge's expiry shows when it
    // reports (the router hears of it too, for an account that does not exist).
    let mut attempt = 0;
    loop {
        attempt += 1;
        assert!(
            attempt <= 20,
            "the registry's watch never reported an expiry"
        );
        let warm = format!("warm@example.org/{attempt}");
        registry
            .heartbeat("warm", Duration::from_secs(600))
            .await
            .unwrap();
        let record = SessionRecord::new(full(&warm), Arc::from("warm"), Arc::from("s"));
        registry.bind(record).await.unwrap();
        registry
            .heartbeat("warm", Duration::from_millis(1))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(2), removals.recv()).await {
            Ok(Ok(r)) if &*r.node == "warm" => break,
            _ => continue,
        }
    }

    let edges = Arc::new(Edges::new());
    let (l1, mut e1) = channel_link::<ToEdge>(1024);
    let (l2, _e2) = channel_link::<ToEdge>(1024);
    edges.insert(Arc::from("e1"), Arc::new(l1) as Arc<dyn EdgeLink>);
    edges.insert(Arc::from("e2"), Arc::new(l2) as Arc<dyn EdgeLink>);
    let settings = Settings {
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        ..Settings::default()
    };
    let router = Router::new(
        settings,
        RouterDeps {
            store: store().await,
            registry: registry.clone(),
            edges,
        },
    )
    .unwrap();
    let link = router.link();
    let cancel = CancellationToken::new();
    let mut tasks = router.run(cancel.clone());

    for name in ["e1", "e2"] {
        registry
            .heartbeat(name, Duration::from_secs(600))
            .await
            .unwrap();
    }
    login(&registry, &*link, J, "e1").await;
    send(&*link, J, "<presence/>").await;
    login(&registry, &*link, R, "e2").await;
    send(&*link, R, "<presence/>").await;
    // Juliet sees Romeo come online (his presence, after her own reflected one).
    loop {
        let (to, stanza) = delivered(&mut e1).await;
        if stanza.from().as_deref() == Some(R) && stanza.stanza_type().is_none() {
            assert_eq!(to, [J]);
            break;
        }
    }

    // Edge e2 stops renewing: its lease runs out and the registry drops Romeo.
    registry
        .heartbeat("e2", Duration::from_millis(1))
        .await
        .unwrap();
    loop {
        let (to, stanza) = delivered(&mut e1).await;
        if stanza.from().as_deref() == Some(R) {
            if stanza.stanza_type().is_none() {
                continue;
            }
            assert_eq!(stanza.stanza_type().as_deref(), Some("unavailable"));
            assert_eq!(to, [J]);
            break;
        }
    }
    assert!(
        registry.session(&full(R)).await.unwrap().is_none(),
        "the registry removed the session"
    );

    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    node.shutdown().await;
}
