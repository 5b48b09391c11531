//! The router's runtime: N worker tasks, each with a bounded queue, and the link edges send
//! through. A message goes to the worker chosen by the bare JID of its subject, so one
//! user's stanzas are processed one after another, in the order the edge sent them
//! (RFC 6120 §10.1).
//!
//! **Invariant:** all messages about one bare JID pass through one worker queue.
//!
//! A full queue makes the link's `send` wait: backpressure onto the edge, never loss.
//! Cancellation stops the intake; each worker then drains what is queued (for at most
//! `drain_timeout`, after which the rest is counted as dropped) and ends.
//!
//! Besides the link, one task listens to the registry's bulk removals
//! ([`SessionRegistry::node_removals`]: an edge's lease expired, or its node was removed) and
//! queues each removed session on its user's worker like a session end, so its contacts get
//! `unavailable` in order with everything else about that user.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use starling_cluster::{Edges, LinkError, RouterLink, ToRouter};
use starling_registry::{NodeRemoved, SessionRecord, SessionRegistry};
use starling_store::Store;
use tokio::sync::broadcast;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::{QUEUE_DEPTH, SESSION_EVENTS_TOTAL};
use crate::modules::{self, Module, ModuleSet, Services};
use crate::routing::Core;
use crate::stanza::bare_part;
use crate::{RouterError, Settings};

/// What the router depends on.
pub struct RouterDeps {
    /// Accounts and per-user data.
    pub store: Arc<dyn Store>,
    /// Where sessions are; the only source of that knowledge.
    pub registry: Arc<dyn SessionRegistry>,
    /// The links to the edges; the only way to reach a session.
    pub edges: Arc<Edges>,
}

impl std::fmt::Debug for RouterDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterDeps")
            .field("edges", &self.edges)
            .finish_non_exhaustive()
    }
}

/// A router, built and not yet running: take its [`link`](Router::link) for the edges,
/// then [`run`](Router::run) it.
pub struct Router {
    core: Arc<Core>,
    link: Arc<ShardedLink>,
    receivers: Vec<mpsc::Receiver<Job>>,
    drain_timeout: Duration,
    /// The registry's bulk removals, if it reports them.
    removals: Option<broadcast::Receiver<Arc<NodeRemoved>>>,
}

/// What a worker processes: a message from an edge, or a session the registry removed in
/// bulk.
#[derive(Debug)]
pub(crate) enum Job {
    /// From an edge, through the link.
    Link(ToRouter),
    /// Removed with its node (lease expiry, node removal): it ended without its edge
    /// saying so.
    Removed(SessionRecord),
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("workers", &self.receivers.len())
            .field("modules", self.core.modules())
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router with the default modules ([`modules::default_modules`]).
    pub fn new(settings: Settings, deps: RouterDeps) -> Result<Self, RouterError> {
        Self::with_modules(settings, deps, modules::default_modules())
    }

    /// A router with the given modules, in this order (the first that handles an IQ
    /// answers it; disco lists their features in this order).
    pub fn with_modules(
        settings: Settings,
        deps: RouterDeps,
        modules: Vec<Arc<dyn Module>>,
    ) -> Result<Self, RouterError> {
        if settings.domains.is_empty() {
            return Err(RouterError::NoDomains);
        }
        if settings.workers == 0 {
            return Err(RouterError::NoWorkers);
        }
        if settings.queue_per_worker == 0 {
            return Err(RouterError::EmptyQueue);
        }
        let mut domains = HashSet::with_capacity(settings.domains.len());
        for domain in &settings.domains {
            let parsed = starling_xmpp::jid::parse_domain(domain).map_err(|source| {
                RouterError::InvalidDomain {
                    domain: domain.clone(),
                    source,
                }
            })?;
            domains.insert(parsed.as_str().to_owned());
        }
        let mut queues = Vec::with_capacity(settings.workers);
        let mut receivers = Vec::with_capacity(settings.workers);
        for worker in 0..settings.workers {
            let (tx, rx) = mpsc::channel(settings.queue_per_worker);
            let label: Arc<str> = Arc::from(worker.to_string());
            queues.push(Queue {
                tx,
                depth: metrics::gauge!(QUEUE_DEPTH, "worker" => label.clone()),
                label,
            });
            receivers.push(rx);
        }
        let drain_timeout = settings.drain_timeout;
        let removals = deps.registry.node_removals();
        let services = Services {
            store: deps.store,
            registry: deps.registry,
            edges: deps.edges,
            settings,
            im: crate::im::Im::new(domains.clone()),
        };
        let core = Core::new(services, ModuleSet::new(modules), domains);
        Ok(Router {
            core: Arc::new(core),
            link: Arc::new(ShardedLink { queues }),
            receivers,
            drain_timeout,
            removals,
        })
    }

    /// The link edges send to this router through.
    pub fn link(&self) -> Arc<dyn RouterLink> {
        self.link.clone()
    }

    /// The disco features of the registered modules.
    pub fn features(&self) -> &[&'static str] {
        self.core.modules().features()
    }

    /// The server's entity capabilities (XEP-0115), computed from exactly what disco#info
    /// answers (identities and the features above), for the edge's `<c/>` stream feature.
    pub fn caps(&self) -> &crate::caps::Caps {
        self.core.caps()
    }

    /// Spawns the workers (and the listener of the registry's bulk removals) on the current
    /// runtime. They run until `cancel` fires (or every link is dropped), drain their queues,
    /// and end; the set completes when all have.
    pub fn run(self, cancel: CancellationToken) -> JoinSet<()> {
        let mut set = JoinSet::new();
        if let Some(removals) = self.removals {
            set.spawn(listen_removals(removals, self.link.clone(), cancel.clone()));
        }
        for (rx, queue) in self.receivers.into_iter().zip(self.link.queues.iter()) {
            let worker = Worker {
                core: self.core.clone(),
                label: queue.label.clone(),
                depth: queue.depth.clone(),
                drain_timeout: self.drain_timeout,
            };
            set.spawn(worker.run(rx, cancel.clone()));
        }
        set
    }
}

/// Queues every session of each bulk removal on its user's worker, until `cancel` fires or
/// the registry stops reporting. Falling behind the registry's buffer loses the oldest
/// removals: counted and logged, since those sessions' contacts miss their `unavailable`.
async fn listen_removals(
    mut removals: broadcast::Receiver<Arc<NodeRemoved>>,
    link: Arc<ShardedLink>,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            event = removals.recv() => event,
        };
        match event {
            Ok(removal) => {
                tracing::info!(
                    node = %removal.node,
                    sessions = removal.sessions.len(),
                    "the registry removed a node's sessions: broadcasting unavailable"
                );
                for record in &removal.sessions {
                    if link.queue(Job::Removed(record.clone())).await.is_err() {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                metrics::counter!(SESSION_EVENTS_TOTAL, "event" => "removals_missed")
                    .increment(missed);
                tracing::warn!(
                    missed,
                    "fell behind the registry's bulk removals; some unavailable presence is lost"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// One worker's queue, as the link sees it.
struct Queue {
    tx: mpsc::Sender<Job>,
    /// The `worker` label of the queue-depth gauge.
    label: Arc<str>,
    /// The queue-depth gauge, registered once (the hot path only sets it).
    depth: metrics::Gauge,
}

impl Queue {
    fn report_depth(&self) {
        let depth = self.tx.max_capacity() - self.tx.capacity();
        self.depth.set(depth as f64);
    }
}

/// The router's [`RouterLink`]: picks the worker by the subject's bare JID.
struct ShardedLink {
    queues: Vec<Queue>,
}

impl std::fmt::Debug for ShardedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedLink")
            .field("workers", &self.queues.len())
            .finish()
    }
}

/// The JID whose bare part decides the worker: the sender of a stanza, the session of a
/// session event or removal, the recipient of an undeliverable stanza.
fn subject(job: &Job) -> &str {
    match job {
        Job::Link(ToRouter::Stanza { from, .. }) => from.as_str(),
        Job::Link(ToRouter::SessionStarted { jid } | ToRouter::SessionEnded { jid, .. }) => {
            jid.as_str()
        }
        Job::Link(ToRouter::Undeliverable { recipient, .. }) => recipient.as_str(),
        Job::Removed(record) => record.jid.as_str(),
    }
}

impl ShardedLink {
    /// Queues a job on the worker of its subject's bare JID (waiting while it is full).
    async fn queue(&self, job: Job) -> Result<(), LinkError> {
        let index = shard(bare_part(subject(&job)), self.queues.len());
        let Some(queue) = self.queues.get(index) else {
            return Err(LinkError::Closed);
        };
        queue.tx.send(job).await.map_err(|_| LinkError::Closed)?;
        queue.report_depth();
        Ok(())
    }
}

/// The worker for a bare JID among `n`.
pub(crate) fn shard(bare: &str, n: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    bare.hash(&mut hasher);
    // The remainder is below `n`, which is a usize.
    (hasher.finish() % n.max(1) as u64) as usize
}

#[async_trait]
impl RouterLink for ShardedLink {
    async fn send(&self, msg: ToRouter) -> Result<(), LinkError> {
        self.queue(Job::Link(msg)).await
    }
}

struct Worker {
    core: Arc<Core>,
    label: Arc<str>,
    depth: metrics::Gauge,
    drain_timeout: Duration,
}

impl Worker {
    fn report_depth(&self, rx: &mpsc::Receiver<Job>) {
        self.depth.set(rx.len() as f64);
    }

    async fn run(self, mut rx: mpsc::Receiver<Job>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        self.report_depth(&rx);
                        self.core.handle(msg).await;
                    }
                    // Every link is gone: nothing more can arrive.
                    None => return,
                },
            }
        }
        // Refuse new messages, then finish what was accepted.
        rx.close();
        let drain = async {
            while let Some(msg) = rx.recv().await {
                self.report_depth(&rx);
                self.core.handle(msg).await;
            }
        };
        if tokio::time::timeout(self.drain_timeout, drain)
            .await
            .is_err()
        {
            let mut lost = 0usize;
            while let Ok(msg) = rx.try_recv() {
                Core::record_unhandled(&msg);
                lost += 1;
            }
            tracing::warn!(worker = %self.label, lost, "drain timed out; queued messages dropped");
        }
        self.report_depth(&rx);
        tracing::debug!(worker = %self.label, "router worker stopped");
    }
}
