//! Logs and metrics for the whole process: the `tracing` subscriber (text or JSON lines on
//! standard error) and the Prometheus recorder behind the `metrics` facade, with a few
//! process-level series (build info, start time, uptime, readiness).

use std::io::IsTerminal;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global `tracing` subscriber.
///
/// The filter is `--log-level` when given, else `RUST_LOG` when set, else `log.level` (from
/// the file or `STARLING_LOG__LEVEL`). Output goes to standard error so that command output on
/// standard output stays clean.
pub(crate) fn init_tracing(log: &LogConfig, level_from_cli: bool) -> anyhow::Result<()> {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (filter, bad_rust_log) = match rust_log {
        Some(directives) if !level_from_cli => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::try_new(&log.level)?, Some(e.to_string())),
        },
        _ => (EnvFilter::try_new(&log.level)?, None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .flatten_event(true)
            .try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    if let Some(e) = bad_rust_log {
        tracing::warn!(error = %e, "RUST_LOG is not a valid filter; using log.level");
    }
    Ok(())
}

/// The Prometheus recorder's handle and the process-level series.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    handle: PrometheusHandle,
    started: Instant,
}

impl Metrics {
    /// Installs the global recorder (once per process) and records the build info and start
    /// time.
    pub(crate) fn install() -> anyhow::Result<Metrics> {
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .context("cannot install the metrics recorder")?;
        describe();
        let metrics = Metrics::with_handle(handle);
        metrics.record_process_info();
        Ok(metrics)
    }

    /// Wraps a handle without installing anything (tests use a local recorder).
    pub(crate) fn with_handle(handle: PrometheusHandle) -> Metrics {
        Metrics {
            handle,
            started: Instant::now(),
        }
    }

    fn record_process_info(&self) {
        metrics::gauge!(
            "starling_build_info",
            "version" => env!("CARGO_PKG_VERSION"),
        )
        .set(1.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!("starling_start_time_seconds").set(now);
    }

    /// The Prometheus text exposition, with the uptime brought up to date.
    pub(crate) fn render(&self) -> String {
        metrics::gauge!("starling_uptime_seconds").set(self.started.elapsed().as_secs_f64());
        self.handle.render()
    }

    /// Periodic maintenance the recorder needs (drains histogram buckets so they stay
    /// bounded); called every few seconds by the admin task.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn describe() {
    metrics::describe_gauge!(
        "starling_build_info",
        "Always 1; the `version` label is the running build."
    );
    metrics::describe_gauge!(
        "starling_start_time_seconds",
        metrics::Unit::Seconds,
        "When the process started, in seconds since the Unix epoch."
    );
    metrics::describe_gauge!(
        "starling_uptime_seconds",
        metrics::Unit::Seconds,
        "Seconds since the process started."
    );
    metrics::describe_gauge!(
        "starling_ready",
        "1 while every listener is bound and the store is open, 0 before and during shutdown."
    );
    metrics::describe_counter!(
        "starling_admin_requests_total",
        "Requests to the admin HTTP endpoint, by path."
    );
}
