//! Builds the roles of the all-in-one node (TLS certificates, router, edge), converts the
//! configuration into each role's plain `Settings`, and starts them as owned tasks.
//!
//! Shutdown order: the edge stops first (stops accepting, closes every stream with
//! `<system-shutdown/>`, and reports each ended session to the router); only when it is done
//! is the router cancelled, so those last session events still reach it and it drains its
//! queues. Everything is in the caller's `JoinSet`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use starling_cluster::Edges;
use starling_edge::tls::{CertFiles, TlsManager, TlsSettings};
use starling_edge::{AuthSettings, Edge, EdgeDeps, RegistrationSettings};
use starling_registry::{NodeId, SessionRegistry};
use starling_router::{Router, RouterDeps};
use starling_store::Store;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{Checked, RegistrationMode};
use crate::runfiles::SECRET_LEN;

/// How long the edge waits for streams to close after the shutdown signal.
pub(crate) const EDGE_GRACE: Duration = Duration::from_secs(10);
/// How long the router keeps draining its queues once the edge is done.
pub(crate) const ROUTER_DRAIN: Duration = Duration::from_secs(5);

/// What the roles share.
pub(crate) struct Deps {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<dyn SessionRegistry>,
    pub(crate) edges: Arc<Edges>,
    pub(crate) node: NodeId,
    pub(crate) secret: [u8; SECRET_LEN],
}

/// The running roles: their bound addresses and the handle signals act on.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) c2s_starttls: Vec<SocketAddr>,
    pub(crate) c2s_direct_tls: Vec<SocketAddr>,
    edge: Edge,
}

impl Running {
    /// Reloads the TLS certificates (SIGHUP). File reads and key generation block, so this runs
    /// on the blocking pool; a failure keeps the current certificates and is logged.
    pub(crate) async fn reload_tls(&self) {
        let edge = self.edge.clone();
        match tokio::task::spawn_blocking(move || edge.reload_tls()).await {
            Ok(Ok(true)) => tracing::info!("TLS certificates reloaded"),
            Ok(Ok(false)) => tracing::info!("TLS certificates unchanged"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the current certificates")
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
    }
}

/// The edge's settings from `[c2s]`, `[auth]` and `[registration]`.
pub(crate) fn edge_settings(checked: &Checked) -> starling_edge::Settings {
    let c = &checked.config;
    let mode = |m: RegistrationMode| match m {
        RegistrationMode::Open => starling_edge::RegistrationMode::Open,
        RegistrationMode::Closed => starling_edge::RegistrationMode::Closed,
        RegistrationMode::Loopback => starling_edge::RegistrationMode::Loopback,
    };
    starling_edge::Settings {
        listen_starttls: checked.c2s_starttls.clone(),
        listen_direct_tls: checked.c2s_direct_tls.clone(),
        require_tls: c.c2s.require_tls,
        max_stanza_size: usize::try_from(c.c2s.max_stanza_size).unwrap_or(usize::MAX),
        max_connections_per_ip: c.c2s.max_connections_per_ip,
        preauth_timeout: Duration::from_secs(c.c2s.preauth_timeout_secs),
        idle_timeout: Duration::from_secs(c.c2s.idle_timeout_secs),
        keepalive_interval: Duration::from_secs(c.c2s.keepalive_interval_secs),
        rate_bytes_per_sec: c.c2s.rate_bytes_per_sec,
        rate_burst_bytes: c.c2s.rate_burst_bytes,
        outbound_queue_stanzas: usize::try_from(c.c2s.outbound_queue_stanzas).unwrap_or(usize::MAX),
        sm_max_resume_secs: c.c2s.sm_max_resume_secs,
        sm_ack_every_stanzas: c.c2s.sm_ack_every_stanzas,
        sm_ack_every: Duration::from_secs(c.c2s.sm_ack_every_secs),
        sm_max_unacked_stanzas: usize::try_from(c.c2s.sm_max_unacked_stanzas).unwrap_or(usize::MAX),
        sm_max_unacked_bytes: usize::try_from(c.c2s.sm_max_unacked_bytes).unwrap_or(usize::MAX),
        csi_max_held: usize::try_from(c.c2s.csi_max_held).unwrap_or(usize::MAX),
        shutdown_grace: EDGE_GRACE,
        auth: AuthSettings {
            scram_iterations: c.auth.scram_iterations,
            failures_per_minute_per_ip: c.auth.failures_per_minute_per_ip,
            failures_per_minute_per_account: c.auth.failures_per_minute_per_account,
            ..AuthSettings::default()
        },
        registration: RegistrationSettings {
            mode: mode(c.registration.mode),
            hosts: c
                .registration
                .hosts
                .iter()
                .map(|(host, m)| (host.clone(), mode(*m)))
                .collect(),
            per_minute_per_ip: c.registration.per_minute_per_ip,
        },
        ..starling_edge::Settings::default()
    }
}

/// The certificates' settings from `[tls]`.
pub(crate) fn tls_settings(checked: &Checked) -> TlsSettings {
    let c = &checked.config;
    TlsSettings {
        certificates: c
            .tls
            .certificates
            .iter()
            .map(|p| CertFiles {
                cert: p.cert.clone(),
                key: p.key.clone(),
            })
            .collect(),
        data_dir: c.server.data_dir.clone(),
        domains: c.server.domains.clone(),
        reload_check: Duration::from_secs(c.tls.reload_check_secs),
    }
}

/// The router's settings from `[server]` and `[auth]`.
pub(crate) fn router_settings(checked: &Checked) -> starling_router::Settings {
    let c = &checked.config;
    starling_router::Settings {
        domains: c.server.domains.clone(),
        scram_iterations: c.auth.scram_iterations,
        drain_timeout: ROUTER_DRAIN,
        ..starling_router::Settings::default()
    }
}

/// Loads the certificates, builds router and edge, binds the client listeners and starts every
/// task into `tasks`. Returns once everything is bound.
pub(crate) async fn start(
    checked: &Checked,
    deps: Deps,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>,
) -> anyhow::Result<Running> {
    let config = &checked.config;

    let tls_settings = tls_settings(checked);
    let tls = tokio::task::spawn_blocking(move || TlsManager::load(tls_settings))
        .await
        .context("certificate loading task failed")?
        .context("cannot load the TLS certificates")?;
    if let Some(path) = tls.generated_cert_path() {
        tracing::info!(cert = %path.display(), "using a generated self-signed certificate");
    }

    let router = Router::new(
        router_settings(checked),
        RouterDeps {
            store: deps.store.clone(),
            registry: deps.registry.clone(),
            edges: deps.edges.clone(),
        },
    )
    .context("cannot build the router")?;

    // XEP-0115 §6.3: the edge advertises what the router's disco#info answers.
    let caps = router.caps();
    let edge_settings = starling_edge::Settings {
        caps: Some(starling_edge::ServerCaps {
            hash: starling_router::caps::HASH.to_owned(),
            node: caps.node.clone(),
            ver: caps.ver.clone(),
        }),
        ..edge_settings(checked)
    };
    let edge = Edge::new(
        edge_settings,
        EdgeDeps {
            node: deps.node.clone(),
            domains: config.server.domains.clone(),
            store: deps.store,
            registry: deps.registry,
            router: router.link(),
            tls: tls.clone(),
            sasl_secret: deps.secret,
        },
    );
    deps.edges.insert(deps.node.clone(), edge.link());
    let bound = edge.bind().context("cannot start the client listeners")?;
    let c2s_starttls = bound.starttls_addrs().to_vec();
    let c2s_direct_tls = bound.direct_tls_addrs().to_vec();

    // The router outlives the edge (see the module docs): its own token, cancelled when the
    // edge has finished, whichever way it finished.
    let router_cancel = CancellationToken::new();
    let mut workers = router.run(router_cancel.clone());
    tasks.spawn(async move {
        let mut result = Ok(());
        while let Some(joined) = workers.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "router worker failed");
                result = Err(anyhow::anyhow!("a router worker failed: {e}"));
            }
        }
        ("router", result)
    });

    let edge_cancel = cancel.clone();
    let edges = deps.edges.clone();
    let node = deps.node.clone();
    tasks.spawn(async move {
        let result = bound.serve(edge_cancel).await;
        edges.remove(&node);
        router_cancel.cancel();
        ("edge", result.context("the edge failed"))
    });

    let watcher = AbortOnDropHandle::new(tls.spawn_watcher(cancel.clone()));
    tasks.spawn(async move {
        let result = watcher
            .await
            .map_err(|e| anyhow::anyhow!("the certificate watcher failed: {e}"));
        ("certificate watcher", result)
    });

    Ok(Running {
        c2s_starttls,
        c2s_direct_tls,
        edge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Sources, resolve};

    #[test]
    fn settings_carry_the_configuration() {
        let sources = Sources {
            env: vec![
                (
                    "STARLING_SERVER__DOMAINS".into(),
                    "a.example,b.example".into(),
                ),
                ("STARLING_C2S__REQUIRE_TLS".into(), "false".into()),
                ("STARLING_C2S__MAX_STANZA_SIZE".into(), "1000".into()),
                ("STARLING_C2S__MAX_CONNECTIONS_PER_IP".into(), "7".into()),
                ("STARLING_C2S__PREAUTH_TIMEOUT_SECS".into(), "3".into()),
                ("STARLING_C2S__IDLE_TIMEOUT_SECS".into(), "4".into()),
                ("STARLING_C2S__KEEPALIVE_INTERVAL_SECS".into(), "5".into()),
                ("STARLING_C2S__RATE_BYTES_PER_SEC".into(), "6".into()),
                ("STARLING_C2S__RATE_BURST_BYTES".into(), "8".into()),
                ("STARLING_C2S__OUTBOUND_QUEUE_STANZAS".into(), "9".into()),
                ("STARLING_C2S__CSI_MAX_HELD".into(), "10".into()),
                ("STARLING_AUTH__SCRAM_ITERATIONS".into(), "5000".into()),
                (
                    "STARLING_AUTH__FAILURES_PER_MINUTE_PER_IP".into(),
                    "11".into(),
                ),
                (
                    "STARLING_AUTH__FAILURES_PER_MINUTE_PER_ACCOUNT".into(),
                    "12".into(),
                ),
                ("STARLING_REGISTRATION__MODE".into(), "open".into()),
                (
                    "STARLING_REGISTRATION__HOSTS".into(),
                    r#"{ "b.example" = "closed" }"#.into(),
                ),
                ("STARLING_TLS__RELOAD_CHECK_SECS".into(), "13".into()),
            ],
            ..Sources::default()
        };
        let checked = resolve(&sources).unwrap();

        let e = edge_settings(&checked);
        assert_eq!(e.listen_starttls, checked.c2s_starttls);
        assert_eq!(e.listen_direct_tls, checked.c2s_direct_tls);
        assert!(!e.require_tls);
        assert_eq!(e.max_stanza_size, 1000);
        assert_eq!(e.max_connections_per_ip, 7);
        assert_eq!(e.preauth_timeout, Duration::from_secs(3));
        assert_eq!(e.idle_timeout, Duration::from_secs(4));
        assert_eq!(e.keepalive_interval, Duration::from_secs(5));
        assert_eq!((e.rate_bytes_per_sec, e.rate_burst_bytes), (6, 8));
        assert_eq!(e.outbound_queue_stanzas, 9);
        assert_eq!(e.csi_max_held, 10);
        assert_eq!(e.auth.scram_iterations, 5000);
        assert_eq!(e.auth.failures_per_minute_per_ip, 11);
        assert_eq!(e.auth.failures_per_minute_per_account, 12);
        assert_eq!(e.registration.mode, starling_edge::RegistrationMode::Open);
        assert_eq!(
            e.registration.mode_for("b.example"),
            starling_edge::RegistrationMode::Closed
        );
        assert_eq!(e.shutdown_grace, EDGE_GRACE);

        let t = tls_settings(&checked);
        assert!(t.certificates.is_empty());
        assert_eq!(t.domains, vec!["a.example", "b.example"]);
        assert_eq!(t.data_dir, checked.config.server.data_dir);
        assert_eq!(t.reload_check, Duration::from_secs(13));

        let r = router_settings(&checked);
        assert_eq!(r.domains, vec!["a.example", "b.example"]);
        assert_eq!(r.scram_iterations, 5000);
        assert_eq!(r.drain_timeout, ROUTER_DRAIN);
    }
}
