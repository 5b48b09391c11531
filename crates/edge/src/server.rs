//! The edge as the binary sees it: construction from settings and dependencies, binding the
//! listeners, the accept loop, and graceful shutdown (RFC 6120 §4.9.3.20 `system-shutdown`).
//!
//! Every task has an owner: connection tasks live in the accept loop's `JoinSet`, the
//! forwarder of undeliverable stanzas is awaited by `serve`. On cancellation the loop stops
//! accepting (listeners are dropped), every connection writes `<system-shutdown/>` and closes,
//! and `serve` waits up to `shutdown_grace` before aborting what is left.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use starling_cluster::{EdgeLink, RouterLink, ToRouter};
use starling_registry::{NodeId, SessionRegistry};
use starling_sasl::SaslServer;
use starling_store::Store;
use starling_xml::Limits;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connection::{self, ListenerKind, Shared};
use crate::error::EdgeError;
use crate::limits::{ConnectionCounter, MAX_TRACKED_KEYS, WindowCounter, canonical_ip};
use crate::machine::StreamConfig;
use crate::session::{LocalEdgeLink, SessionTable};
use crate::settings::Settings;
use crate::sm::SmLimits;
use crate::tls::{TlsError, TlsManager};

/// Capacity of the queue of undeliverable stanzas on their way back to the router. When it
/// is full, the router's `EdgeLink::send` waits (backpressure).
const UNDELIVERABLE_QUEUE: usize = 1024;

/// What the edge needs from the rest of the process.
pub struct EdgeDeps {
    /// This node's name, recorded with every session in the registry.
    pub node: NodeId,
    /// The served domains (normalised when the edge binds; an invalid one is an error).
    pub domains: Vec<String>,
    /// Accounts (SASL credentials, in-band registration).
    pub store: Arc<dyn Store>,
    /// Where bound sessions are recorded.
    pub registry: Arc<dyn SessionRegistry>,
    /// Where stanzas and session events go.
    pub router: Arc<dyn RouterLink>,
    /// Certificates and server configurations.
    pub tls: Arc<TlsManager>,
    /// Key for the SASL fake salts of unknown users (stable across restarts and nodes).
    pub sasl_secret: [u8; 32],
}

impl std::fmt::Debug for EdgeDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeDeps")
            .field("node", &self.node)
            .field("domains", &self.domains)
            .finish_non_exhaustive()
    }
}

/// The edge role. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct Edge {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    deps_domains: Vec<String>,
    shared: Arc<Shared>,
    link: Arc<LocalEdgeLink>,
    undeliverable: parking_lot::Mutex<Option<mpsc::Receiver<ToRouter>>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("node", &self.inner.shared.node)
            .field("domains", &self.inner.deps_domains)
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// An edge with these settings and dependencies. Nothing is bound or spawned yet.
    pub fn new(settings: Settings, deps: EdgeDeps) -> Edge {
        let domains = normalise_domains(&deps.domains).unwrap_or_default();
        let window = Duration::from_secs(60);
        let cfg = Arc::new(StreamConfig {
            domains,
            require_tls: settings.require_tls,
            auth: settings.auth.clone(),
            registration: settings.registration.clone(),
            sasl: SaslServer::new(deps.sasl_secret.to_vec())
                .with_fake_iterations(settings.auth.scram_iterations),
            limits: Limits {
                max_element_size: settings.max_stanza_size,
                ..Limits::default()
            },
            auth_failures_ip: WindowCounter::new(window, MAX_TRACKED_KEYS),
            auth_failures_account: WindowCounter::new(window, MAX_TRACKED_KEYS),
            registrations_ip: WindowCounter::new(window, MAX_TRACKED_KEYS),
            sm: SmLimits::from_settings(&settings),
            csi_max_held: settings.csi_max_held.max(1),
            caps: settings.caps.as_ref().map(crate::machine::caps_feature),
            hot: crate::metrics::Hot::register(),
        });
        let sessions = Arc::new(SessionTable::default());
        let (tx, rx) = mpsc::channel(UNDELIVERABLE_QUEUE);
        let link = Arc::new(LocalEdgeLink {
            sessions: sessions.clone(),
            undeliverable: tx,
            queue_limit: settings.outbound_queue_stanzas.max(1),
            sm: SmLimits::from_settings(&settings),
        });
        let shared = Arc::new(Shared {
            cfg,
            settings: settings.clone(),
            node: deps.node,
            store: deps.store,
            registry: deps.registry,
            router: deps.router,
            tls: deps.tls,
            sessions,
            expired: crate::session::ExpiredSessions::default(),
        });
        Edge {
            inner: Arc::new(Inner {
                settings,
                deps_domains: deps.domains,
                shared,
                link,
                undeliverable: parking_lot::Mutex::new(Some(rx)),
            }),
        }
    }

    /// The link the router delivers through.
    pub fn link(&self) -> Arc<dyn EdgeLink> {
        self.inner.link.clone()
    }

    /// Reloads the certificates now (e.g. on SIGHUP); `true` if they changed. New
    /// connections use the new ones; established ones keep theirs.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        self.inner.shared.tls.reload()
    }

    /// The state shared by connection tasks, for tests that build one directly.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.inner.shared.clone()
    }

    /// Number of bound sessions on this edge.
    pub fn session_count(&self) -> usize {
        self.inner.shared.sessions.len()
    }

    /// Binds every listener and reports the actual addresses (port 0 becomes a real port).
    /// Must be called from within a Tokio runtime, and only once.
    pub fn bind(&self) -> Result<BoundEdge, EdgeError> {
        let inner = &self.inner;
        if normalise_domains(&inner.deps_domains)?.is_empty() {
            return Err(EdgeError::NoDomains);
        }
        let undeliverable = inner
            .undeliverable
            .lock()
            .take()
            .ok_or(EdgeError::AlreadyBound)?;
        let mut listeners = Vec::new();
        let mut starttls_addrs = Vec::new();
        let mut direct_tls_addrs = Vec::new();
        for (addrs, kind, bound) in [
            (
                &inner.settings.listen_starttls,
                ListenerKind::StartTls,
                &mut starttls_addrs,
            ),
            (
                &inner.settings.listen_direct_tls,
                ListenerKind::DirectTls,
                &mut direct_tls_addrs,
            ),
        ] {
            for addr in addrs {
                let listener = listen(*addr)?;
                let local = listener.local_addr().map_err(|source| EdgeError::Bind {
                    addr: *addr,
                    source,
                })?;
                tracing::info!(addr = %local, listener = kind.label(), "listening");
                bound.push(local);
                listeners.push((listener, kind));
            }
        }
        Ok(BoundEdge {
            shared: inner.shared.clone(),
            listeners,
            starttls_addrs,
            direct_tls_addrs,
            undeliverable,
        })
    }
}

/// Normalises the configured domains (RFC 7622 §3.2).
fn normalise_domains(domains: &[String]) -> Result<Vec<Arc<str>>, EdgeError> {
    domains
        .iter()
        .map(|d| {
            starling_xmpp::jid::parse_domain(d)
                .map(|d| Arc::from(d.as_str()))
                .map_err(|_| EdgeError::InvalidDomain(d.clone()))
        })
        .collect()
}

/// Creates a listening socket: address reuse, dual-stack on an unspecified IPv6 address.
fn listen(addr: SocketAddr) -> Result<TcpListener, EdgeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let fail = |source| EdgeError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Best effort: some systems refuse dual-stack sockets.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(1024).map_err(fail)?;
    TcpListener::from_std(socket.into()).map_err(fail)
}

/// An edge whose listeners are bound; [`BoundEdge::serve`] runs it.
pub struct BoundEdge {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, ListenerKind)>,
    starttls_addrs: Vec<SocketAddr>,
    direct_tls_addrs: Vec<SocketAddr>,
    undeliverable: mpsc::Receiver<ToRouter>,
}

impl std::fmt::Debug for BoundEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundEdge")
            .field("starttls", &self.starttls_addrs)
            .field("direct_tls", &self.direct_tls_addrs)
            .finish_non_exhaustive()
    }
}

impl BoundEdge {
    /// The bound STARTTLS (5222-style) addresses.
    pub fn starttls_addrs(&self) -> &[SocketAddr] {
        &self.starttls_addrs
    }

    /// The bound direct-TLS (5223-style) addresses.
    pub fn direct_tls_addrs(&self) -> &[SocketAddr] {
        &self.direct_tls_addrs
    }

    /// Accepts and serves connections until `cancel` fires, then closes every stream with
    /// `<system-shutdown/>` and returns once they are gone (or `shutdown_grace` has passed
    /// and the rest were aborted).
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), EdgeError> {
        let BoundEdge {
            shared,
            listeners,
            undeliverable,
            ..
        } = self;
        let forwarder_stop = CancellationToken::new();
        // In a JoinSet so that dropping `serve` early aborts it too.
        let mut forwarder = JoinSet::new();
        forwarder.spawn(forward_undeliverable(
            undeliverable,
            shared.router.clone(),
            forwarder_stop.clone(),
        ));
        // The certificate watcher (a no-op with a zero `reload_check`), stopped with the edge.
        let watcher_stop = cancel.child_token();
        let watcher = shared.tls.spawn_watcher(watcher_stop.clone());
        let connections_cancel = cancel.child_token();
        let mut tasks = JoinSet::new();
        let counter = Arc::new(ConnectionCounter::default());
        let default_domain = shared.cfg.domains.first().cloned();
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(error) = joined
                        && error.is_panic()
                    {
                        tracing::error!(%error, "connection task panicked");
                    }
                }
                accepted = accept_any(&listeners) => {
                    let (kind, accepted) = accepted;
                    let (tcp, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of descriptors and the like: pause instead of spinning.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let ip = canonical_ip(peer.ip());
                    match counter.try_open(ip, shared.settings.max_connections_per_ip) {
                        Some(guard) => {
                            tasks.spawn(connection::run(
                                shared.clone(),
                                tcp,
                                peer,
                                kind,
                                connections_cancel.clone(),
                                guard,
                            ));
                        }
                        None => connection::refuse(tcp, kind, default_domain.as_deref(), ip),
                    }
                }
            }
        }
        drop(listeners);
        tracing::info!(connections = tasks.len(), "edge shutting down");
        connections_cancel.cancel();
        let grace = shared.settings.shutdown_grace;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "shutdown grace period over: aborting the remaining connections"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        watcher_stop.cancel();
        if let Err(error) = watcher.await {
            tracing::error!(%error, "certificate watcher failed");
        }
        forwarder_stop.cancel();
        while let Some(joined) = forwarder.join_next().await {
            if let Err(error) = joined {
                tracing::error!(%error, "undeliverable forwarder failed");
            }
        }
        tracing::info!("edge stopped");
        Ok(())
    }
}

/// The next connection from any listener.
async fn accept_any(
    listeners: &[(TcpListener, ListenerKind)],
) -> (ListenerKind, std::io::Result<(TcpStream, SocketAddr)>) {
    if listeners.is_empty() {
        return std::future::pending().await;
    }
    poll_fn(|cx| {
        for (listener, kind) in listeners {
            if let Poll::Ready(result) = listener.poll_accept(cx) {
                return Poll::Ready((*kind, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// Sends undeliverable stanzas back to the router, one at a time, until stopped; what is
/// queued at that moment is still sent.
async fn forward_undeliverable(
    mut rx: mpsc::Receiver<ToRouter>,
    router: Arc<dyn RouterLink>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            msg = rx.recv() => msg,
            _ = stop.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(msg) = msg else {
            return;
        };
        if let Err(error) = router.send(msg).await {
            crate::metrics::dropped_on_close(1);
            tracing::warn!(%error, "router did not take an undeliverable stanza");
        }
    }
}
