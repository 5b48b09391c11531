//! `starling-load`: the XMPP load generator. See `benches/README.md` for usage.
//!
//! Startup only: parses the command line, raises the open-file limit, prepares accounts
//! (XEP-0077 registration or a file), runs one scenario from `starling_benches::load`, and
//! prints the report as a table (stdout) and optionally as JSON.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rustls_pki_types::ServerName;
use starling_benches::load::client::{Account, Target, TlsMode, tls_config};
use starling_benches::load::sasl::Mechanism;
use starling_benches::load::scenario::{
    self, ChatOpts, ConnectOpts, Ctx, PresenceOpts, Progress, StormOpts,
};
use starling_benches::load::stats::{Report, Stats};
use starling_benches::load::{accounts, limits};

/// Most source addresses a `--source` range may name.
const MAX_SOURCES: usize = 65_536;

#[derive(Debug, Parser)]
#[command(
    name = "starling-load",
    version,
    about = "XMPP load generator for any compliant server"
)]
struct Cli {
    /// Server address (host:port) of the STARTTLS or direct TLS listener.
    #[arg(long, global = true, default_value = "127.0.0.1:5222")]
    server: String,
    /// XMPP domain of the accounts (stream `to`).
    #[arg(long, global = true, default_value = "localhost")]
    domain: String,
    /// How TLS starts: `starttls` (RFC 6120 §5) or `direct` (XEP-0368, ALPN xmpp-client).
    #[arg(long, global = true, value_enum, default_value = "starttls")]
    tls: TlsMode,
    /// Accept any server certificate (development certificates).
    #[arg(long, global = true)]
    insecure: bool,
    /// PEM file of the CA (or self-signed certificate) to trust.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Name to check the certificate against (default: the domain).
    #[arg(long, global = true)]
    tls_name: Option<String>,
    /// Source addresses, round-robin: `127.0.0.1`, `127.0.0.2-127.0.0.200`, comma lists.
    #[arg(long, global = true)]
    source: Option<String>,
    /// SASL mechanism: scram-sha-256, scram-sha-1 or plain (default: best SCRAM offered).
    #[arg(long, global = true)]
    mechanism: Option<String>,
    /// Create the accounts first through in-band registration (XEP-0077).
    #[arg(long, global = true)]
    register: bool,
    /// Registrations in flight at once.
    #[arg(long, global = true, default_value_t = 16)]
    register_concurrency: usize,
    /// File of `jid password` lines instead of generated accounts.
    #[arg(long, global = true)]
    accounts: Option<PathBuf>,
    /// Localpart prefix of generated accounts: PREFIX0, PREFIX1...
    #[arg(long, global = true, default_value = "load")]
    user_prefix: String,
    /// Index of the first generated account.
    #[arg(long, global = true, default_value_t = 0)]
    first_index: u64,
    /// Password of generated accounts.
    #[arg(long, global = true, default_value = "load-password")]
    password: String,
    /// Resource prefix of bound sessions.
    #[arg(long, global = true, default_value = "load")]
    resource: String,
    /// Do not send initial presence after binding.
    #[arg(long, global = true)]
    no_presence: bool,
    /// Deadline of each negotiation step, seconds.
    #[arg(long, global = true, default_value_t = 30.0)]
    timeout: f64,
    /// Write the report as JSON to this file (`-`: stdout).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, global = true)]
    quiet: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Measure this process's RSS and CPU time over the scenario's phase (repeatable): the
    /// server's pid.
    #[arg(long = "watch-pid", global = true)]
    watch_pids: Vec<u32>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Only create accounts (with --register) and exit.
    Register {
        /// Accounts to create.
        #[arg(long, default_value_t = 100)]
        users: u64,
    },
    /// N sessions logged in and idle, ramped at --rate, held for --hold seconds.
    Connect {
        /// Sessions.
        #[arg(long, default_value_t = 100)]
        sessions: u64,
        /// Logins started per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds to hold the sessions once all are up.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
    },
    /// Pairs exchanging stamped messages at a total --msg-rate; end-to-end latency.
    Chat {
        /// Pairs of sessions (2 × pairs accounts).
        #[arg(long, default_value_t = 50)]
        pairs: u64,
        /// Messages per second, all sessions together.
        #[arg(long, default_value_t = 1000.0)]
        msg_rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Logins started per second before sending.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Message body length in bytes.
        #[arg(long, default_value_t = 64)]
        body_size: usize,
    },
    /// Users with rosters of K contacts changing presence (needs roster support).
    Presence {
        /// Users.
        #[arg(long, default_value_t = 100)]
        users: u64,
        /// Contacts per user.
        #[arg(long, default_value_t = 10)]
        contacts: usize,
        /// Presence changes per second, all users together.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds of presence changes.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Logins started per second before the changes.
        #[arg(long, default_value_t = 200.0)]
        login_rate: f64,
    },
    /// Log in and out at --rate for --duration seconds, cycling through --users accounts.
    LoginStorm {
        /// Logins started per second; 0: as fast as --max-inflight allows (a closed loop).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds of storm.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Accounts cycled through.
        #[arg(long, default_value_t = 100)]
        users: u64,
        /// Logins in flight (TCP connect to bound resource) at most.
        #[arg(long, default_value_t = 2000)]
        max_inflight: usize,
    },
}

impl Scenario {
    fn accounts_needed(&self) -> u64 {
        match self {
            Scenario::Register { users } => *users,
            Scenario::Connect { sessions, .. } => *sessions,
            Scenario::Chat { pairs, .. } => pairs.saturating_mul(2),
            Scenario::Presence { users, .. } => *users,
            Scenario::LoginStorm { users, .. } => *users,
        }
    }

    fn sockets_needed(&self) -> u64 {
        match self {
            Scenario::LoginStorm { max_inflight, .. } => *max_inflight as u64,
            other => other.accounts_needed(),
        }
    }
}

fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().with_context(|| format!("source {a}"))?;
            let b: Ipv4Addr = b.trim().parse().with_context(|| format!("source {b}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || (b - a) as usize >= MAX_SOURCES {
                bail!("source range {part} is empty or longer than {MAX_SOURCES}");
            }
            out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
        } else {
            out.push(part.parse().with_context(|| format!("source {part}"))?);
        }
        if out.len() > MAX_SOURCES {
            bail!("more than {MAX_SOURCES} source addresses");
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("starting the runtime")?;
    let code = rt.block_on(run(cli))?;
    // Tasks still parked on sockets are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let nofile = limits::raise_nofile();
    eprintln!(
        "open files: soft limit {} -> {}{}",
        nofile
            .before
            .map_or("unlimited".to_owned(), |v| v.to_string()),
        nofile
            .after
            .map_or("unlimited".to_owned(), |v| v.to_string()),
        nofile
            .error
            .as_ref()
            .map(|e| format!(" (raising failed: {e})"))
            .unwrap_or_default()
    );
    let needed = cli.scenario.sockets_needed().saturating_add(32);
    if needed > nofile.limit() {
        eprintln!(
            "warning: this run needs about {needed} file descriptors but the limit is {}; \
             connections past it will fail with `connect` errors",
            nofile.limit()
        );
    }

    let addr: SocketAddr = tokio::net::lookup_host(&cli.server)
        .await
        .with_context(|| format!("resolving {}", cli.server))?
        .next()
        .with_context(|| format!("{} resolves to no address", cli.server))?;
    let mechanism = match cli.mechanism.as_deref() {
        None => None,
        Some(m) => Some(Mechanism::from_name(m).with_context(|| format!("unknown mechanism {m}"))?),
    };
    let tls = tls_config(cli.ca.as_deref(), cli.insecure, cli.tls).map_err(anyhow::Error::msg)?;
    let name = cli.tls_name.clone().unwrap_or_else(|| cli.domain.clone());
    let tls_name =
        ServerName::try_from(name.clone()).with_context(|| format!("TLS name {name}"))?;
    let sources = match &cli.source {
        Some(spec) => parse_sources(spec)?,
        None => Vec::new(),
    };
    let step_timeout = Duration::try_from_secs_f64(cli.timeout).context("--timeout")?;
    let target = Arc::new(Target::new(
        addr,
        cli.domain.clone(),
        cli.tls,
        tls_name,
        tokio_rustls::TlsConnector::from(tls),
        sources,
        step_timeout,
        mechanism,
        !cli.no_presence,
    ));

    let want = cli.scenario.accounts_needed();
    let list: Vec<Account> = match &cli.accounts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut all = accounts::parse_file(&text, &cli.domain).map_err(anyhow::Error::msg)?;
            if (all.len() as u64) < want {
                bail!(
                    "{} holds {} accounts, the scenario needs {want}",
                    path.display(),
                    all.len()
                );
            }
            all.truncate(want as usize);
            all
        }
        None => accounts::generated(&cli.user_prefix, cli.first_index, want, &cli.password),
    };
    let stats = Arc::new(Stats::default());
    let ctx = Ctx {
        target,
        stats: stats.clone(),
        accounts: Arc::new(list.into_iter().map(Arc::new).collect()),
        resource: cli.resource.clone(),
        nofile: nofile.limit(),
        watch: Arc::new(cli.watch_pids.clone()),
    };

    if cli.register {
        let t = std::time::Instant::now();
        scenario::register_all(&ctx, cli.register_concurrency)
            .await
            .map_err(anyhow::Error::msg)?;
        eprintln!(
            "registered {} accounts ({} existed) in {:.2} s",
            stats.registered.load(std::sync::atomic::Ordering::Relaxed),
            stats
                .register_existing
                .load(std::sync::atomic::Ordering::Relaxed),
            t.elapsed().as_secs_f64()
        );
    }

    let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO);
    let progress = Progress::start(stats.clone(), cli.quiet);
    let report: Report = match cli.scenario {
        Scenario::Register { .. } => return Ok(0),
        Scenario::Connect {
            sessions,
            rate,
            hold,
        } => {
            scenario::connect(
                &ctx,
                ConnectOpts {
                    sessions,
                    rate,
                    hold: secs(hold),
                },
            )
            .await
        }
        Scenario::Chat {
            pairs,
            msg_rate,
            duration,
            rate,
            body_size,
        } => {
            scenario::chat(
                &ctx,
                ChatOpts {
                    pairs,
                    msg_rate,
                    duration: secs(duration),
                    rate,
                    body_size,
                },
            )
            .await
        }
        Scenario::Presence {
            contacts,
            rate,
            duration,
            login_rate,
            ..
        } => {
            match scenario::presence(
                &ctx,
                PresenceOpts {
                    contacts,
                    rate,
                    duration: secs(duration),
                    login_rate,
                },
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    drop(progress);
                    eprintln!("presence: {e}");
                    return Ok(2);
                }
            }
        }
        Scenario::LoginStorm {
            rate,
            duration,
            max_inflight,
            ..
        } => {
            scenario::login_storm(
                &ctx,
                StormOpts {
                    rate,
                    duration: secs(duration),
                    max_inflight,
                },
            )
            .await
        }
    };
    drop(progress);

    let mut out = std::io::stdout().lock();
    report.write_table(&mut out)?;
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report)?;
        if path.as_os_str() == "-" {
            writeln!(out, "{json}")?;
        } else {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    out.flush()?;
    Ok(0)
}
