//! `starling serve`: the all-in-one node. Opens the store, loads the server secret, builds the
//! in-memory session registry, the router and the edge, binds every listener, writes
//! `run/listeners.json`, then reports ready and serves until SIGINT or SIGTERM.
//!
//! Shutdown is structured (one `CancellationToken`, every task owned by a `JoinSet`):
//! `/readyz` turns 503, the token is cancelled, the edge closes every stream with
//! `<system-shutdown/>` (RFC 6120 §4.9.3.22) and the router drains its queues, all within
//! [`SHUTDOWN_GRACE`]; then the admin endpoint stops and the process exits 0. A second signal
//! during the drain stops at once. SIGHUP reloads the TLS certificates.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use starling_cluster::Edges;
use starling_registry::{LocalRegistry, NodeId, SessionRegistry};
use starling_store::Store;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::Checked;
use crate::runfiles::{self, Listeners};
use crate::telemetry::Metrics;
use crate::users::{self, STORE_FILE, UserError};

/// How long the edge and router together get to finish after the shutdown signal: the edge's
/// grace, then the router's drain, plus a margin.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(
    crate::wiring::EDGE_GRACE.as_secs() + crate::wiring::ROUTER_DRAIN.as_secs() + 5,
);
/// How long the admin endpoint gets to close its connections at the very end.
const ADMIN_GRACE: Duration = Duration::from_secs(2);

/// A role's task: its name and how it ended.
type RoleTasks = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Runs the server until a shutdown signal; `Err` when startup fails or a role fails while
/// running.
pub(crate) async fn run(checked: Checked, metrics: Metrics) -> anyhow::Result<()> {
    let config = &checked.config;
    let data_dir = config.server.data_dir.clone();
    runfiles::create_private_dir(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;

    // The store's lock is the instance lock: nothing in the data directory is touched before
    // it is held, so a second server on the same directory changes nothing of the first's.
    let store_path = data_dir.join(STORE_FILE);
    let store = match users::open(&store_path, true).await {
        Ok(store) => store,
        Err(UserError::Locked(path)) => bail!(
            "the store {} is in use by another process (another `starling serve` or a \
             `starling user` command with the same data directory)",
            path.display()
        ),
        Err(e) => return Err(e).context("cannot open the store"),
    };
    tracing::info!(path = %store_path.display(), "store open");
    runfiles::remove_listeners(&data_dir)?;
    let secret = runfiles::load_or_create_secret(&data_dir)?;
    let store: Arc<dyn Store> = Arc::new(store);
    let registry: Arc<dyn SessionRegistry> = Arc::new(LocalRegistry::default());
    let edges = Arc::new(Edges::new());
    let node: NodeId = Arc::from(config.server.node_name.as_str());

    // The admin endpoint comes up first, so `/healthz` answers (and `/readyz` says 503) while
    // the rest starts.
    let admin = admin::start(checked.admin, metrics).await?;
    let (readiness, admin_addr) = (admin.readiness.clone(), admin.addr);

    let cancel = CancellationToken::new();
    let mut tasks: RoleTasks = JoinSet::new();
    let started = crate::wiring::start(
        &checked,
        crate::wiring::Deps {
            // The process keeps its own handle too, so the store file stays open (and locked
            // against `starling user`) until the very end.
            store: store.clone(),
            registry,
            edges,
            node,
            secret,
        },
        &cancel,
        &mut tasks,
    )
    .await;

    // From here on every path, failed or not, goes through the same shutdown below, so no
    // task outlives this function.
    let outcome = match started {
        Ok(roles) => {
            let listeners = Listeners {
                c2s_starttls: roles.c2s_starttls.clone(),
                c2s_direct_tls: roles.c2s_direct_tls.clone(),
                admin: admin_addr,
            };
            match runfiles::write_listeners(&data_dir, &listeners) {
                Ok(path) => {
                    readiness.set(true);
                    tracing::info!(
                        listeners = %path.display(),
                        c2s_starttls = ?listeners.c2s_starttls,
                        c2s_direct_tls = ?listeners.c2s_direct_tls,
                        admin = %admin_addr,
                        domains = ?config.server.domains,
                        "ready"
                    );
                    wait_for_shutdown(&roles, &mut tasks).await
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };

    readiness.set(false);
    cancel.cancel();
    let drained = drain(&mut tasks).await;

    admin.stop(ADMIN_GRACE).await;
    drop(store);
    if let Err(e) = runfiles::remove_listeners(&data_dir) {
        tracing::warn!(error = %e, "cannot remove the listeners file");
    }
    outcome?;
    drained?;
    tracing::info!("stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM (`Ok`) or for a role to end on its own (`Err`: roles only end
/// when cancelled). Reloads TLS on SIGHUP meanwhile.
async fn wait_for_shutdown(
    roles: &crate::wiring::Running,
    tasks: &mut RoleTasks,
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => {
                tracing::info!(signal = "SIGINT", "shutting down");
                return Ok(());
            }
            _ = terminate.recv() => {
                tracing::info!(signal = "SIGTERM", "shutting down");
                return Ok(());
            }
            _ = hangup.recv() => {
                tracing::info!(signal = "SIGHUP", "reloading TLS certificates");
                roles.reload_tls().await;
            }
            Some(ended) = tasks.join_next() => {
                let (role, result) = match ended {
                    Ok(ended) => ended,
                    Err(e) => ("a role", Err(anyhow::anyhow!("task failed: {e}"))),
                };
                return match result {
                    Ok(()) => Err(anyhow::anyhow!("{role} stopped unexpectedly")),
                    Err(e) => Err(e.context(format!("{role} failed"))),
                };
            }
        }
    }
}

/// Waits up to [`SHUTDOWN_GRACE`] for every role to finish; a second SIGINT/SIGTERM or the end
/// of the grace period aborts what is left.
async fn drain(tasks: &mut RoleTasks) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(deadline);
    let mut failed = None;
    loop {
        tokio::select! {
            ended = tasks.join_next() => match ended {
                None => break,
                Some(Ok((role, Ok(())))) => tracing::debug!(role, "stopped"),
                Some(Ok((role, Err(e)))) => {
                    tracing::error!(role, error = %e, "failed while stopping");
                    failed.get_or_insert(e.context(format!("{role} failed while stopping")));
                }
                Some(Err(e)) => tracing::error!(error = %e, "task failed while stopping"),
            },
            () = &mut deadline => {
                tracing::warn!(
                    grace_secs = SHUTDOWN_GRACE.as_secs(),
                    remaining = tasks.len(),
                    "grace period over; stopping the rest now"
                );
                tasks.abort_all();
                break;
            }
            _ = interrupt.recv() => {
                tracing::warn!(remaining = tasks.len(), "second signal; stopping now");
                tasks.abort_all();
                break;
            }
            _ = terminate.recv() => {
                tracing::warn!(remaining = tasks.len(), "second signal; stopping now");
                tasks.abort_all();
                break;
            }
        }
    }
    // Aborted tasks still have to be reaped, so nothing outlives this function.
    while tasks.join_next().await.is_some() {}
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
