//! The admin HTTP endpoint (axum, HTTP/1.1): `GET /healthz` (the process runs), `GET /readyz`
//! (every listener is bound and the store is open; 503 before that and during shutdown) and
//! `GET /metrics` (Prometheus text exposition format 0.0.4).
//!
//! It is the last thing to stop: while the rest of the server drains, `/readyz` keeps
//! answering 503 so a load balancer stops sending clients here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// How often the metrics recorder's upkeep runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Whether the server is ready for clients. Starts not ready.
#[derive(Debug, Default)]
pub(crate) struct Readiness(AtomicBool);

impl Readiness {
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
        metrics::gauge!("starling_ready").set(if ready { 1.0 } else { 0.0 });
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    metrics: Metrics,
}

fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    metrics::counter!("starling_admin_requests_total", "path" => "/healthz").increment(1);
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    metrics::counter!("starling_admin_requests_total", "path" => "/readyz").increment(1);
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    metrics::counter!("starling_admin_requests_total", "path" => "/metrics").increment(1);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// The admin endpoint running as its own task: started before everything else, so
/// `/healthz` answers (and `/readyz` says 503) while the rest starts, and stopped last.
#[derive(Debug)]
pub(crate) struct AdminEndpoint {
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) addr: std::net::SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds `addr` and serves the endpoint, not ready yet.
pub(crate) async fn start(
    addr: std::net::SocketAddr,
    metrics: Metrics,
) -> anyhow::Result<AdminEndpoint> {
    use anyhow::Context;
    let readiness = Arc::new(Readiness::default());
    readiness.set(false);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the admin listener on {addr}"))?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve(listener, readiness.clone(), metrics, cancel.clone()));
    tracing::info!(%addr, "admin endpoint listening");
    Ok(AdminEndpoint {
        readiness,
        addr,
        cancel,
        task,
    })
}

impl AdminEndpoint {
    /// Stops the endpoint, giving its connections `grace` to close.
    pub(crate) async fn stop(mut self, grace: Duration) {
        self.readiness.set(false);
        self.cancel.cancel();
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin endpoint failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "admin task failed"),
            Err(_) => self.task.abort(),
        }
    }
}

/// Serves the admin endpoint on an already bound listener until `cancel` fires, running the
/// recorder's upkeep meanwhile.
pub(crate) async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    metrics: Metrics,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = {
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => metrics.upkeep(),
                }
            }
        }
    };
    let server = axum::serve(listener, app(AdminState { readiness, metrics }))
        .with_graceful_shutdown(cancel.cancelled_owned());
    let (result, ()) = tokio::join!(server.into_future(), upkeep);
    result
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One HTTP/1.0 request; the status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("starling_test_total", "k" => "v").increment(3);
        });
        let readiness = Arc::new(Readiness::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            readiness.clone(),
            Metrics::with_handle(handle),
            cancel.clone(),
        ));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(get(addr, "/readyz").await, (503, "not ready\n".into()));
        readiness.set(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("starling_test_total{k=\"v\"} 3"),
            "metrics body: {body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
        readiness.set(false);
        assert_eq!(get(addr, "/readyz").await.0, 503);

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
