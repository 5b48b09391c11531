//! `registry-bench`: durable writes per second and their latency against a Starling registry
//! cluster (session binds through `RegistryClient`) or an etcd cluster (KV `Put`), with the
//! same ~200-byte records and the same client concurrency, so `benches/registry-compare` can
//! print them side by side.
//!
//! - `bind`: `--concurrency` tasks share one `RegistryClient` (as the tasks of one edge do)
//!   and each binds a fresh full JID at a time; the record is the protobuf `Session` the
//!   registry stores (JID, edge, stream id, a presence stanza), about 200 bytes.
//! - `put`: the same tasks `Put` the same encoded record under the JID as the key into etcd,
//!   over one HTTP/2 connection per endpoint, tasks spread round-robin over the endpoints (as
//!   etcd's own client balances). The etcd messages are written here from etcd's API reference
//!   (`etcdserverpb.KV/Put`; only the fields used).
//! - `fill`: registers `--sessions` sessions as fast as `--concurrency` allows (for the
//!   1M-session scale run), then prints what it took.
//!
//! Each run prints one JSON line on stdout: target, concurrency, acknowledged operations,
//! seconds, ops/s, p50/p99/max latency in ms, errors. Latencies are recorded per operation
//! after the warm-up, acknowledged operations only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use prost::Message;
use starling_registry::{ClientConfig, RegistryClient, SessionRecord, SessionRegistry, pb};

#[derive(Debug, Parser)]
#[command(name = "registry-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Session binds against a Starling registry cluster.
    Bind(Load),
    /// KV puts of the same records against an etcd cluster.
    Put(Load),
    /// Registers N sessions (for the scale run) and reports the time taken.
    Fill(Fill),
}

#[derive(Debug, Args)]
struct Load {
    /// `host:port` of every member.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Operations in flight (one per task).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Distinguishes the keys of several runs against one cluster.
    #[arg(long, default_value = "r")]
    prefix: String,
    /// A label for the report (e.g. the shard count).
    #[arg(long, default_value = "")]
    label: String,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Debug, Args)]
struct Fill {
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Sessions to register.
    #[arg(long, default_value_t = 1_000_000)]
    sessions: u64,
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// The presence stanza stored with every session: a typical small available presence.
const PRESENCE: &[u8] = b"<presence><show>chat</show><status>online</status><priority>5</priority><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='x'/></presence>";

/// The record of session `i` of task `task`.
fn record(prefix: &str, task: usize, i: u64) -> SessionRecord {
    let jid = format!("dev-{prefix}-{task}-{i}@bench.example/device");
    let jid = match starling_xmpp::jid::parse_full(&jid) {
        Ok(j) => j,
        Err(e) => unreachable!("generated JID {jid} is valid: {e}"),
    };
    let mut r = SessionRecord::new(
        jid,
        Arc::from("edge-bench-1"),
        Arc::from(format!("{task:04x}{i:012x}").as_str()),
    );
    r.priority = 5;
    r.presence = Some(Bytes::from_static(PRESENCE));
    r
}

/// The same record as the registry stores it, for etcd.
fn encoded(r: &SessionRecord) -> (Vec<u8>, Vec<u8>) {
    let s = pb::Session {
        jid: r.jid.to_string(),
        node: r.node.to_string(),
        stream_id: r.stream_id.to_string(),
        priority: i32::from(r.priority),
        presence: r.presence.clone(),
        resumption: None,
    };
    (s.jid.clone().into_bytes(), s.encode_to_vec())
}

/// etcd's `PutRequest` (api/etcdserverpb/rpc.proto): key = 1, value = 2.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// etcd's `ResponseHeader`: cluster_id = 1, member_id = 2, revision = 3, raft_term = 4.
#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
    #[prost(uint64, tag = "2")]
    member_id: u64,
    #[prost(int64, tag = "3")]
    revision: i64,
    #[prost(uint64, tag = "4")]
    raft_term: u64,
}

/// etcd's `PutResponse`: header = 1 (prev_kv, 2, is not asked for).
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone)]
struct Etcd {
    channels: Vec<tonic::transport::Channel>,
}

impl Etcd {
    async fn connect(endpoints: &[String]) -> anyhow::Result<Etcd> {
        let mut channels = Vec::new();
        for e in endpoints {
            let c = tonic::transport::Endpoint::from_shared(format!("http://{e}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to etcd at {e}"))?;
            channels.push(c);
        }
        Ok(Etcd { channels })
    }

    async fn put(&self, task: usize, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<i64> {
        let channel = self
            .channels
            .get(task % self.channels.len().max(1))
            .cloned()
            .context("no etcd endpoint")?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
        let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
        let resp = grpc
            .unary(tonic::Request::new(PutRequest { key, value }), path, codec)
            .await?;
        Ok(resp.into_inner().header.map_or(0, |h| h.revision))
    }
}

#[derive(Debug, Default)]
struct Totals {
    ok: AtomicU64,
    errors: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 120_000_000, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("fixed histogram bounds are valid: {e}"),
    }
}

async fn load(target: &'static str, args: Load) -> anyhow::Result<()> {
    let registry = if target == "starling" {
        let mut cfg = ClientConfig::new(args.endpoints.clone());
        cfg.max_per_account = 0;
        cfg.deadline = Duration::from_secs(10);
        Some(RegistryClient::connect(cfg).await?)
    } else {
        None
    };
    let etcd = if target == "etcd" {
        Some(Etcd::connect(&args.endpoints).await?)
    } else {
        None
    };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Totals::default());
    let mut tasks = Vec::new();
    for task in 0..args.concurrency.max(1) {
        let (registry, etcd, totals, stop) =
            (registry.clone(), etcd.clone(), totals.clone(), stop.clone());
        let prefix = args.prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = record(&prefix, task, i);
                i += 1;
                let began = Instant::now();
                let ok = if let Some(reg) = &registry {
                    reg.bind(r).await.is_ok()
                } else if let Some(etcd) = &etcd {
                    let (k, v) = encoded(&r);
                    etcd.put(task, k, v).await.is_ok()
                } else {
                    false
                };
                let done = Instant::now();
                if began < measure_from || done > end {
                    continue;
                }
                if ok {
                    totals.ok.fetch_add(1, Ordering::Relaxed);
                    let us =
                        u64::try_from(done.duration_since(began).as_micros()).unwrap_or(u64::MAX);
                    let _ = h.record(us.max(1));
                } else {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            h
        }));
    }
    tokio::time::sleep_until(end.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = histogram();
    for t in tasks {
        let h = t.await?;
        all.add(&h)?;
    }
    let secs = args.duration as f64;
    let ok = totals.ok.load(Ordering::Relaxed);
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let sample = encoded(&record(&args.prefix, 0, 0));
    let report = serde_json::json!({
        "target": target,
        "label": args.label,
        "concurrency": args.concurrency,
        "record_bytes": sample.0.len() + sample.1.len(),
        "ops": ok,
        "secs": secs,
        "ops_per_sec": (ok as f64 / secs).round(),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": all.max() as f64 / 1000.0,
        "errors": totals.errors.load(Ordering::Relaxed),
    });
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, format!("{report}\n").as_bytes())?;
    Ok(())
}

async fn fill(args: Fill) -> anyhow::Result<()> {
    let mut cfg = ClientConfig::new(args.endpoints.clone());
    cfg.max_per_account = 0;
    cfg.deadline = Duration::from_secs(30);
    let client = RegistryClient::connect(cfg).await?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, next, errors) = (client.clone(), next.clone(), errors.clone());
        let total = args.sessions;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                if client.bind(record("fill", 0, i)).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let count = client.count().await?;
    let report = serde_json::json!({
        "sessions": args.sessions,
        "registered": count,
        "errors": errors.load(Ordering::Relaxed),
        "secs": (secs * 10.0).round() / 10.0,
        "binds_per_sec": (args.sessions as f64 / secs).round(),
    });
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, format!("{report}\n").as_bytes())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Cmd::Bind(a) | Cmd::Put(a) => a.threads,
        Cmd::Fill(f) => f.threads,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Cmd::Bind(a) => load("starling", a).await,
            Cmd::Put(a) => load("etcd", a).await,
            Cmd::Fill(f) => fill(f).await,
        }
    })
}
