//! Shared by the router benches (`routing`, `presence_fanout`): a real router with the
//! embedded store and the in-process registry, as `starling serve` builds them, behind its
//! in-process link, and counting stand-ins for the edges.
//!
//! A stand-in does what an edge does with a delivery that costs CPU (stamp `to` per recipient
//! into a write buffer when asked) and counts, without sockets, so a bench times the router's
//! work plus that write. Each bench binary includes this module and uses part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use starling_cluster::{EdgeLink, Edges, LinkError, RouterLink, ToEdge};
use starling_registry::{LocalRegistry, SessionRecord, SessionRegistry};
use starling_router::{Router, RouterDeps, Settings};
use starling_sasl::ScramCredentials;
use starling_store::{BareUser, RedbStore, Store};
use starling_xml::Element;
use starling_xmpp::FullJid;
use tokio_util::sync::CancellationToken;

/// The domain every bench serves.
pub(crate) const DOMAIN: &str = "example.org";

/// What the edges received, summed over all of them.
#[derive(Default)]
pub(crate) struct Counters {
    /// `Deliver` messages on the router → edge links.
    pub(crate) messages: AtomicU64,
    /// Payload bytes on those links (each message carries the stanza once).
    pub(crate) link_bytes: AtomicU64,
    /// Recipients written to.
    pub(crate) recipients: AtomicU64,
    /// Bytes the edges write to client sockets (the stanza with `to` stamped per recipient).
    pub(crate) socket_bytes: AtomicU64,
    notify: tokio::sync::Notify,
}

impl Counters {
    /// Waits until at least `target` recipients were written in all.
    pub(crate) async fn wait_recipients(&self, target: u64) {
        while self.recipients.load(Ordering::Relaxed) < target {
            let notified = self.notify.notified();
            if self.recipients.load(Ordering::Relaxed) >= target {
                break;
            }
            notified.await;
        }
    }

    /// The four counters, in field order.
    pub(crate) fn snapshot(&self) -> [u64; 4] {
        [
            self.messages.load(Ordering::Relaxed),
            self.link_bytes.load(Ordering::Relaxed),
            self.recipients.load(Ordering::Relaxed),
            self.socket_bytes.load(Ordering::Relaxed),
        ]
    }
}

/// An edge stand-in that counts into shared [`Counters`].
pub(crate) struct CountingEdge {
    /// Where it counts.
    pub(crate) counters: Arc<Counters>,
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

/// Parses a stanza as the edge frames it.
pub(crate) fn stanza(xml: &str) -> Element {
    Element::parse(Bytes::from(xml.to_owned()), "jabber:client").expect("bench stanza parses")
}

/// A full JID.
pub(crate) fn full(s: &str) -> FullJid {
    starling_xmpp::jid::parse_full(s).expect("bench JID")
}

/// SCRAM-SHA-256 credentials for accounts (4096 iterations, derived once).
pub(crate) fn credentials() -> ScramCredentials {
    starling_sasl::derive_credentials(
        starling_sasl::HashAlgo::Sha256,
        "bench",
        &starling_sasl::new_salt().expect("salt"),
        4096,
    )
    .expect("credentials")
}

/// A two-worker runtime, the size of the development machine.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The store, registry and edge directory a router is built on; fill them, then [`World::start`].
pub(crate) struct World {
    /// The embedded store, in memory.
    pub(crate) store: Arc<dyn Store>,
    /// The in-process session registry.
    pub(crate) registry: Arc<dyn SessionRegistry>,
    /// Edge stand-ins `edge-0`.. `edge-{n-1}`, all counting into `counters`.
    pub(crate) edges: Arc<Edges>,
    /// What the edges counted.
    pub(crate) counters: Arc<Counters>,
}

impl World {
    /// An empty store and registry, and `edges` counting edge stand-ins.
    pub(crate) fn new(edges_count: usize) -> Self {
        let counters = Arc::new(Counters::default());
        let edges = Arc::new(Edges::new());
        for e in 0..edges_count {
            edges.insert(
                Arc::from(format!("edge-{e}")),
                Arc::new(CountingEdge {
                    counters: counters.clone(),
                }),
            );
        }
        World {
            store: Arc::new(RedbStore::open_in_memory().expect("store")),
            registry: Arc::new(LocalRegistry::new(8)),
            edges,
            counters,
        }
    }

    /// Creates the account `local@DOMAIN`.
    pub(crate) async fn account(&self, local: &str, creds: &ScramCredentials) -> BareUser {
        let user = BareUser::new(DOMAIN, local);
        self.store
            .create(&user, vec![creds.clone()])
            .await
            .expect("account");
        user
    }

    /// Binds `jid` on edge `edge` (stream id `stream`) and records `presence` for it, as the
    /// edge and the router do for a session that sent initial presence.
    pub(crate) async fn online(
        &self,
        jid: &FullJid,
        edge: usize,
        stream: &str,
        presence: Option<&str>,
    ) {
        let node: Arc<str> = Arc::from(format!("edge-{edge}"));
        self.registry
            .bind(SessionRecord::new(jid.clone(), node, Arc::from(stream)))
            .await
            .expect("bind");
        if let Some(p) = presence {
            self.registry
                .set_presence(jid, stream, 0, Some(Bytes::from(p.to_owned())))
                .await
                .expect("presence");
        }
    }

    /// Builds the router over this world and starts its workers: its in-process link (the one
    /// `serve` hands the edge), the token that stops it and its workers.
    pub(crate) fn start(
        &self,
    ) -> (
        Arc<dyn RouterLink>,
        CancellationToken,
        tokio::task::JoinSet<()>,
    ) {
        let settings = Settings {
            domains: vec![DOMAIN.to_owned()],
            ..Settings::default()
        };
        let router = Router::new(
            settings,
            RouterDeps {
                store: self.store.clone(),
                registry: self.registry.clone(),
                edges: self.edges.clone(),
            },
        )
        .expect("router");
        let link = router.link();
        let cancel = CancellationToken::new();
        let workers = router.run(cancel.clone());
        (link, cancel, workers)
    }
}
