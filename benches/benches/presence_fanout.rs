//! One presence update from a user whose roster holds 1,000 online contacts: the time the
//! router takes to fan it out, and the bytes it costs, on the link to the edges and on the
//! edges' sockets.
//!
//! `cargo bench -p starling-benches --bench presence_fanout` prints, before criterion's timing,
//! the bytes per update for 1 and for 10 edges. The edges here are counting stand-ins: they
//! do what a real edge does with a delivery (stamp `to` per recipient into a write buffer) and
//! count, so the time is the router's plus the edge's per-recipient write work, without
//! sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use starling_cluster::{EdgeLink, Edges, LinkError, ToEdge, ToRouter};
use starling_registry::{LocalRegistry, SessionRecord, SessionRegistry};
use starling_router::{Router, RouterDeps, Settings};
use starling_store::{BareUser, RedbStore, RosterItem, Store};
use starling_xml::Element;
use tokio_util::sync::CancellationToken;

const CONTACTS: usize = 1000;
const DOMAIN: &str = "example.org";

/// What the edges received, summed over all of them.
#[derive(Default)]
struct Counters {
    /// `Deliver` messages on the router → edge links.
    messages: AtomicU64,
    /// Payload bytes on those links (each message carries the stanza once).
    link_bytes: AtomicU64,
    /// Recipients written to.
    recipients: AtomicU64,
    /// Bytes the edges write to client sockets (the stanza with `to` stamped per recipient).
    socket_bytes: AtomicU64,
    notify: tokio::sync::Notify,
}

struct CountingEdge {
    counters: Arc<Counters>,
}

#[async_trait]
impl EdgeLink for CountingEdge {
    async fn send(&self, msg: ToEdge) -> Result<(), LinkError> {
        if let ToEdge::Deliver {
            recipients,
            stanza,
            stamp_to,
        } = msg
        {
            let c = &self.counters;
            c.messages.fetch_add(1, Ordering::Relaxed);
            c.link_bytes
                .fetch_add(stanza.raw().len() as u64, Ordering::Relaxed);
            let mut out = Vec::with_capacity(stanza.raw().len() + 64);
            let mut written = 0u64;
            for r in &recipients {
                out.clear();
                if stamp_to {
                    stanza.write_with_addresses(&mut out, Some(r.as_str()), None);
                } else {
                    out.extend_from_slice(stanza.raw());
                }
                written += out.len() as u64;
            }
            c.socket_bytes.fetch_add(written, Ordering::Relaxed);
            c.recipients
                .fetch_add(recipients.len() as u64, Ordering::Relaxed);
            c.notify.notify_one();
        }
        Ok(())
    }
}

struct Setup {
    rt: tokio::runtime::Runtime,
    link: Arc<dyn starling_cluster::RouterLink>,
    counters: Arc<Counters>,
    user: starling_xmpp::FullJid,
    cancel: CancellationToken,
    workers: tokio::task::JoinSet<()>,
}

fn stanza(xml: &str) -> Element {
    Element::parse(Bytes::from(xml.to_owned()), "jabber:client").expect("bench stanza parses")
}

fn setup(edges_count: usize) -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let counters = Arc::new(Counters::default());
    let (link, user, cancel, workers) = rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open_in_memory().expect("store"));
        let registry: Arc<dyn SessionRegistry> = Arc::new(LocalRegistry::new(8));
        let edges = Arc::new(Edges::new());
        for e in 0..edges_count {
            edges.insert(
                Arc::from(format!("edge-{e}")),
                Arc::new(CountingEdge {
                    counters: counters.clone(),
                }),
            );
        }
        let creds = starling_sasl::derive_credentials(
            starling_sasl::HashAlgo::Sha256,
            "bench",
            &starling_sasl::new_salt().expect("salt"),
            4096,
        )
        .expect("credentials");
        let user_bare = BareUser::new(DOMAIN, "user");
        store
            .create(&user_bare, vec![creds.clone()])
            .await
            .expect("user account");
        for i in 0..CONTACTS {
            let contact = BareUser::new(DOMAIN, format!("contact{i}"));
            store
                .create(&contact, vec![creds.clone()])
                .await
                .expect("contact account");
            let both = |jid: String| RosterItem {
                jid,
                name: None,
                subscription: "both".to_owned(),
                ask: false,
                groups: Vec::new(),
            };
            store
                .set_roster_item(&user_bare, both(format!("contact{i}@{DOMAIN}")))
                .await
                .expect("roster item");
            store
                .set_roster_item(&contact, both(format!("user@{DOMAIN}")))
                .await
                .expect("item");
            let jid = starling_xmpp::jid::parse_full(&format!("contact{i}@{DOMAIN}/device"))
                .expect("jid");
            let node: Arc<str> = Arc::from(format!("edge-{}", i % edges_count));
            registry
                .bind(SessionRecord::new(
                    jid.clone(),
                    node,
                    Arc::from(format!("s{i}")),
                ))
                .await
                .expect("bind");
            registry
                .set_presence(
                    &jid,
                    &format!("s{i}"),
                    0,
                    Some(Bytes::from_static(b"<presence/>")),
                )
                .await
                .expect("presence");
        }
        let user = starling_xmpp::jid::parse_full(&format!("user@{DOMAIN}/phone")).expect("jid");
        registry
            .bind(SessionRecord::new(
                user.clone(),
                Arc::from("edge-0"),
                Arc::from("su"),
            ))
            .await
            .expect("bind user");
        let settings = Settings {
            domains: vec![DOMAIN.to_owned()],
            ..Settings::default()
        };
        let router = Router::new(
            settings,
            RouterDeps {
                store,
                registry,
                edges,
            },
        )
        .expect("router");
        let link = router.link();
        let cancel = CancellationToken::new();
        let workers = router.run(cancel.clone());
        link.send(ToRouter::SessionStarted { jid: user.clone() })
            .await
            .expect("started");
        (link, user, cancel, workers)
    });
    Setup {
        rt,
        link,
        counters,
        user,
        cancel,
        workers,
    }
}

impl Setup {
    /// Sends one presence and waits until at least `recipients` more recipients were written.
    fn presence(&self, xml: &str, recipients: u64) {
        self.rt.block_on(async {
            let target = self.counters.recipients.load(Ordering::Relaxed) + recipients;
            self.link
                .send(ToRouter::Stanza {
                    from: self.user.clone(),
                    stanza: stanza(xml),
                })
                .await
                .expect("send");
            while self.counters.recipients.load(Ordering::Relaxed) < target {
                let notified = self.counters.notify.notified();
                if self.counters.recipients.load(Ordering::Relaxed) >= target {
                    break;
                }
                notified.await;
            }
        });
    }

    /// Waits until nothing more arrives for a while, so counts taken after are exact.
    fn settle(&self) {
        let mut last = self.snapshot();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = self.snapshot();
            if now == last {
                return;
            }
            last = now;
        }
    }

    fn snapshot(&self) -> [u64; 4] {
        let c = &self.counters;
        [
            c.messages.load(Ordering::Relaxed),
            c.link_bytes.load(Ordering::Relaxed),
            c.recipients.load(Ordering::Relaxed),
            c.socket_bytes.load(Ordering::Relaxed),
        ]
    }
}

const UPDATE: &str = "<presence><show>away</show><status>Battery at 40%, sleeping</status>\
    <priority>5</priority><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' \
    node='https://starling.example/caps' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/></presence>";

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("presence-update-1000-contacts");
    group.sample_size(30);
    for edges in [1usize, 10] {
        let s = setup(edges);
        // Initial presence: probes and broadcast; then one update to measure the bytes.
        s.presence("<presence/>", CONTACTS as u64);
        s.settle();
        let before = s.snapshot();
        s.presence(UPDATE, CONTACTS as u64);
        s.settle();
        let after = s.snapshot();
        eprintln!(
            "{edges} edge(s), one presence update to {CONTACTS} online contacts: \
             {} router->edge messages, {} bytes on the links, {} recipients, \
             {} bytes written to client sockets ({} bytes of stanza)",
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
            after[3] - before[3],
            UPDATE.len(),
        );
        group.bench_with_input(BenchmarkId::new("edges", edges), &edges, |b, _| {
            b.iter(|| s.presence(UPDATE, CONTACTS as u64))
        });
        s.cancel.cancel();
        let Setup {
            rt, mut workers, ..
        } = s;
        rt.block_on(async { while workers.join_next().await.is_some() {} });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
