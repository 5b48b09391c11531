//! One presence update from a user whose roster holds 1,000 online contacts: the time the
//! router takes to fan it out, and the bytes it costs, on the link to the edges and on the
//! edges' sockets.
//!
//! `cargo bench -p starling-benches --bench presence_fanout` prints, before criterion's timing,
//! the bytes per update for 1 and for 10 edges. The edges here are counting stand-ins: they
//! do what a real edge does with a delivery (stamp `to` per recipient into a write buffer) and
//! count, so the time is the router's plus the edge's per-recipient write work, without
//! sockets.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use starling_cluster::ToRouter;
use starling_store::RosterItem;
use support::{Counters, DOMAIN, World, credentials, full, runtime, stanza};
use tokio_util::sync::CancellationToken;

const CONTACTS: usize = 1000;

struct Setup {
    rt: tokio::runtime::Runtime,
    link: Arc<dyn starling_cluster::RouterLink>,
    counters: Arc<Counters>,
    user: starling_xmpp::FullJid,
    cancel: CancellationToken,
    workers: tokio::task::JoinSet<()>,
}

fn both(jid: String) -> RosterItem {
    RosterItem {
        jid,
        name: None,
        subscription: "both".to_owned(),
        ask: false,
        groups: Vec::new(),
    }
}

fn setup(edges_count: usize) -> Setup {
    let rt = runtime();
    let world = World::new(edges_count);
    let counters = world.counters.clone();
    let (link, user, cancel, workers) = rt.block_on(async {
        let creds = credentials();
        let user_bare = world.account("user", &creds).await;
        for i in 0..CONTACTS {
            let contact = world.account(&format!("contact{i}"), &creds).await;
            world
                .store
                .set_roster_item(&user_bare, both(format!("contact{i}@{DOMAIN}")))
                .await
                .expect("roster item");
            world
                .store
                .set_roster_item(&contact, both(format!("user@{DOMAIN}")))
                .await
                .expect("item");
            let jid = full(&format!("contact{i}@{DOMAIN}/device"));
            world
                .online(&jid, i % edges_count, &format!("s{i}"), Some("<presence/>"))
                .await;
        }
        let user = full(&format!("user@{DOMAIN}/phone"));
        world.online(&user, 0, "su", None).await;
        let (link, cancel, workers) = world.start();
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
            self.counters.wait_recipients(target).await;
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
        self.counters.snapshot()
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
