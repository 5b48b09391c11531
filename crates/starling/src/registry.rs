//! `starling registry`: one node of the replicated, sharded session registry, and
//! `starling registry members ...`, the operator's view and control of its membership.
//!
//! The node: the admin endpoint comes up first (`/healthz`; `/readyz` 503), then the
//! registry node opens its redb file under `registry.data_dir`, starts every shard and the
//! gRPC server on `registry.listen`, and bootstraps the shards it initialises when
//! `registry.initial_members` is set (idempotent: every member of a new cluster may start at
//! once, and a restarted or wiped member never founds a second cluster). It then writes
//! `<server.data_dir>/run/registry.json` (`{"registry": "IP:PORT", "admin": "IP:PORT"}`) and
//! reports ready while every shard it belongs to knows its leader. SIGINT or SIGTERM stop it
//! (readiness 503, every shard shut down, the database closed); a second signal exits at once.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use starling_registry::{ClientConfig, RegistryClient, RegistryNode};
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, Readiness};
use crate::cli::{MembersAction, MembersArgs};
use crate::config::Checked;
use crate::runfiles;
use crate::telemetry::Metrics;

/// The run file naming the bound addresses, in `<server.data_dir>/run/`.
pub(crate) const REGISTRY_RUN_FILE: &str = "registry.json";
/// How often readiness follows the shards' leaders.
const READINESS_POLL: Duration = Duration::from_millis(100);
/// How long the node gets to stop after the signal before the process exits anyway.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs a registry node until SIGINT or SIGTERM.
pub(crate) async fn run(checked: Checked, metrics: Metrics) -> anyhow::Result<()> {
    let config = &checked.config;
    let server_dir = config.server.data_dir.clone();
    runfiles::create_private_dir(&server_dir)
        .with_context(|| format!("cannot create the data directory {}", server_dir.display()))?;
    let node_config = config
        .registry
        .node_config(&checked.registry, &config.server.data_dir);
    runfiles::create_private_dir(&node_config.data_dir).with_context(|| {
        format!(
            "cannot create the registry directory {}",
            node_config.data_dir.display()
        )
    })?;
    runfiles::remove_run_file(&server_dir, REGISTRY_RUN_FILE)?;

    let admin = admin::start(checked.admin, metrics).await?;

    let outcome = serve_node(node_config, &server_dir, admin.addr, &admin.readiness).await;
    admin.stop(Duration::from_secs(2)).await;
    if let Err(e) = runfiles::remove_run_file(&server_dir, REGISTRY_RUN_FILE) {
        tracing::warn!(error = %e, "cannot remove the registry run file");
    }
    outcome?;
    tracing::info!("stopped");
    Ok(())
}

async fn serve_node(
    node_config: starling_registry::NodeConfig,
    server_dir: &std::path::Path,
    admin_addr: SocketAddr,
    readiness: &Readiness,
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let node = RegistryNode::start(node_config, None)
        .await
        .context("cannot start the registry node")?;
    let json = serde_json::json!({
        "registry": node.local_addr().to_string(),
        "admin": admin_addr.to_string(),
    });
    let path = runfiles::write_run_file(server_dir, REGISTRY_RUN_FILE, &json.to_string())?;
    tracing::info!(
        run_file = %path.display(),
        registry = %node.local_addr(),
        admin = %admin_addr,
        node_id = node.id(),
        shards = node.shard_count(),
        "registry node listening"
    );
    let mut poll = tokio::time::interval(READINESS_POLL);
    loop {
        tokio::select! {
            _ = poll.tick() => {
                let ready = node.leaders_known();
                if ready != readiness.is_ready() {
                    tracing::info!(ready, "registry readiness changed");
                }
                readiness.set(ready);
            }
            _ = interrupt.recv() => {
                tracing::info!(signal = "SIGINT", "shutting down");
                break;
            }
            _ = terminate.recv() => {
                tracing::info!(signal = "SIGTERM", "shutting down");
                break;
            }
        }
    }
    readiness.set(false);
    tokio::select! {
        () = node.shutdown() => Ok(()),
        () = tokio::time::sleep(STOP_GRACE) => {
            anyhow::bail!("the registry node did not stop within {STOP_GRACE:?}")
        }
        _ = interrupt.recv() => anyhow::bail!("second signal; stopping now"),
        _ = terminate.recv() => anyhow::bail!("second signal; stopping now"),
    }
}

/// `starling registry members ...`.
pub(crate) async fn members(
    args: MembersArgs,
    checked: &Checked,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let seeds = if args.seeds.is_empty() {
        let mut seeds = vec![checked.registry.advertise.clone()];
        for addr in checked.registry.initial_members.values() {
            if !seeds.contains(addr) {
                seeds.push(addr.clone());
            }
        }
        seeds
    } else {
        args.seeds.clone()
    };
    let mut cfg = ClientConfig::new(seeds.clone());
    cfg.membership_deadline = Duration::from_secs(args.timeout.max(1));
    let client = RegistryClient::connect(cfg)
        .await
        .with_context(|| format!("no registry member answered (tried {})", seeds.join(", ")))?;
    match args.action {
        MembersAction::List => {
            let status = client.members().await?;
            write_status(&status, out)?;
        }
        MembersAction::Add { id, addr } => {
            client
                .add_member(id, &addr)
                .await
                .with_context(|| format!("adding member {id} ({addr})"))?;
            writeln!(out, "member {id} ({addr}) is a voter of every shard")?;
        }
        MembersAction::Remove { id } => {
            client
                .remove_member(id)
                .await
                .with_context(|| format!("removing member {id}"))?;
            writeln!(out, "member {id} removed from every shard")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The `members list` table, and how many shards each member leads.
fn write_status(
    status: &starling_registry::pb::MembersResponse,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let ids = |m: &[starling_registry::pb::Member]| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.iter()
                .map(|m| format!("{}={}", m.id, m.addr))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    writeln!(
        out,
        "as seen by member {} ({} shards)",
        status.node_id,
        status.shards.len()
    )?;
    writeln!(
        out,
        "{:<6} {:<7} {:<6} {:<10} {:<10} voters / learners",
        "shard", "leader", "term", "last_log", "applied"
    )?;
    let mut led: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for s in &status.shards {
        let leader = s.leader.map_or("-".to_owned(), |l| l.to_string());
        if let Some(l) = s.leader {
            *led.entry(l).or_default() += 1;
        }
        writeln!(
            out,
            "{:<6} {:<7} {:<6} {:<10} {:<10} {} / {}",
            s.shard,
            leader,
            s.term,
            s.last_log_index,
            s.applied_index,
            ids(&s.voters),
            ids(&s.learners)
        )?;
    }
    let spread: Vec<String> = led.iter().map(|(id, n)| format!("{id}: {n}")).collect();
    writeln!(out, "shards led: {}", spread.join(", "))
}
