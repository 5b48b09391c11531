//! Routing a chat message through the router, as `starling serve` runs it: the edge's
//! `ToRouter::Stanza` on the router's in-process link, a worker chosen by the sender's bare
//! JID, the registry lookup of the recipient, and the `ToEdge::Deliver` on the in-process link
//! to the edge holding it (here a counting stand-in that writes the stanza into a buffer).
//!
//! Two addressings (RFC 6121 §8.5): to a full JID (`bob@example.org/device`, delivered to that
//! resource as it is) and to a bare JID (`bob@example.org`, delivered to the user's available
//! resource with the highest non-negative priority: here two are online, one with priority
//! 5). Each iteration sends a batch of messages from 100 senders and waits until every one was
//! delivered, so criterion's elements/s is the router's throughput on the bench's two worker
//! threads.
//!
//! `cargo bench -p starling-benches --bench routing`

mod support;

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use starling_cluster::{RouterLink, ToRouter};
use starling_xml::Element;
use starling_xmpp::FullJid;
use support::{Counters, DOMAIN, World, credentials, full, runtime, stanza};

/// Messages per iteration.
const BATCH: usize = 1000;
/// Distinct senders, so the batch spreads over the router's workers as real traffic does.
const SENDERS: usize = 100;

struct Setup {
    rt: tokio::runtime::Runtime,
    link: Arc<dyn RouterLink>,
    counters: Arc<Counters>,
    senders: Vec<FullJid>,
}

fn setup() -> Setup {
    let rt = runtime();
    let world = World::new(1);
    let counters = world.counters.clone();
    let (link, senders) = rt.block_on(async {
        let creds = credentials();
        world.account("bob", &creds).await;
        let mut senders = Vec::new();
        for i in 0..SENDERS {
            world.account(&format!("alice{i}"), &creds).await;
            let jid = full(&format!("alice{i}@{DOMAIN}/phone"));
            world
                .online(&jid, 0, &format!("a{i}"), Some("<presence/>"))
                .await;
            senders.push(jid);
        }
        let device = full(&format!("bob@{DOMAIN}/device"));
        let laptop = full(&format!("bob@{DOMAIN}/laptop"));
        world
            .online(
                &device,
                0,
                "b1",
                Some("<presence><priority>5</priority></presence>"),
            )
            .await;
        world.online(&laptop, 0, "b2", Some("<presence/>")).await;
        let (link, _cancel, workers) = world.start();
        // The router runs until the process ends with the bench.
        std::mem::forget(workers);
        for jid in senders.iter().chain([&device, &laptop]) {
            link.send(ToRouter::SessionStarted { jid: jid.clone() })
                .await
                .expect("started");
        }
        (link, senders)
    });
    Setup {
        rt,
        link,
        counters,
        senders,
    }
}

/// The stanzas of one batch, `from` stamped as the edge does, sender by sender in turn.
fn batch(senders: &[FullJid], to: &str) -> Vec<(FullJid, Element)> {
    (0..BATCH)
        .map(|i| {
            let from = senders[i % senders.len()].clone();
            let xml = format!(
                "<message from='{from}' to='{to}' type='chat' id='m{i}'>\
                 <body>On my way, see you at the north entrance in ten minutes.</body></message>"
            );
            (from, stanza(&xml))
        })
        .collect()
}

impl Setup {
    fn send_batch(&self, stanzas: &[(FullJid, Element)]) {
        self.rt.block_on(async {
            let target = self.counters.snapshot()[2] + stanzas.len() as u64;
            for (from, st) in stanzas {
                self.link
                    .send(ToRouter::Stanza {
                        from: from.clone(),
                        stanza: st.clone(),
                    })
                    .await
                    .expect("send");
            }
            self.counters.wait_recipients(target).await;
        });
    }
}

fn routing(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("route-message");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, to) in [
        ("full-jid", format!("bob@{DOMAIN}/device")),
        ("bare-jid", format!("bob@{DOMAIN}")),
    ] {
        let stanzas = batch(&s.senders, &to);
        // One batch first: every message must reach exactly one resource, or the bench hangs
        // here rather than measuring something else.
        let before = s.counters.snapshot();
        s.send_batch(&stanzas);
        let after = s.counters.snapshot();
        assert_eq!(
            after[0] - before[0],
            BATCH as u64,
            "{name}: one delivery per message"
        );
        group.bench_with_input(BenchmarkId::new(name, BATCH), &stanzas, |b, st| {
            b.iter(|| s.send_batch(st))
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
