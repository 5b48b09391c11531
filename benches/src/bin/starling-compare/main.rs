//! `starling-compare`: Starling, Prosody and ejabberd side by side on this machine, in one run
//! and back to back. See `benches/README.md` ("benches/compare").
//!
//! For each server in turn: write its configuration into a private directory, start it,
//! register the accounts through XEP-0077, then run `starling-load` (a sibling binary) for
//! `connect` (RSS per idle session), a `chat` ramp (the highest rate with p99 under the
//! bound) and `login-storm` (logins per second at a fixed concurrency), reading the server's
//! RSS and CPU time from `/proc` over each measured phase; stop it; then print one table.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use starling_benches::compare::packages;
use starling_benches::compare::ramp::{self, Bounds, Search};
use starling_benches::compare::servers::{self, Kind, Layout, Running};
use starling_benches::compare::summary::{
    self, ChatResult, ChatStep, ConnectResult, ServerResult, StormResult,
};
use starling_benches::load::limits;
use starling_benches::load::stats::Report;

#[derive(Debug, Parser)]
#[command(
    name = "starling-compare",
    version,
    about = "Starling, Prosody and ejabberd side by side: RSS per idle session, sustained \
             messages/s with p99, CPU per message, login-storm logins/s"
)]
struct Cli {
    /// Servers to run, in this order (comma-separated): starling, prosody, ejabberd.
    #[arg(
        long,
        default_value = "starling,prosody,ejabberd",
        value_delimiter = ','
    )]
    servers: Vec<String>,
    /// Scenarios to run (comma-separated): connect, chat, login-storm.
    #[arg(
        long,
        default_value = "connect,chat,login-storm",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// connect: idle TLS sessions held.
    #[arg(long, default_value_t = 10_000)]
    sessions: u64,
    /// connect: logins started per second (low enough for every server to keep up: the
    /// figure is memory, not login speed).
    #[arg(long, default_value_t = 200.0)]
    connect_rate: f64,
    /// connect: seconds the sessions are held before the RSS is read.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// chat: pairs of sessions.
    #[arg(long, default_value_t = 50)]
    pairs: u64,
    /// chat: seconds of sending per ramp step.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    /// chat: the ramp's first rate (messages/s, all pairs together).
    #[arg(long, default_value_t = 2000.0)]
    start_rate: f64,
    /// chat: the ramp never goes above this rate.
    #[arg(long, default_value_t = 512_000.0)]
    max_rate: f64,
    /// chat: a step is sustained when its end-to-end p99 is at most this (and nothing is lost).
    #[arg(long, default_value_t = 50.0)]
    p99_ms: f64,
    /// chat: bisection stops when the failing rate is within this fraction of the passing one.
    #[arg(long, default_value_t = 0.1)]
    precision: f64,
    /// chat: message body length in bytes.
    #[arg(long, default_value_t = 64)]
    body_size: usize,
    /// login-storm: logins in flight at once (a closed loop: each finished login starts the
    /// next).
    #[arg(long, default_value_t = 32)]
    storm_concurrency: usize,
    /// login-storm: seconds.
    #[arg(long, default_value_t = 10.0)]
    storm_secs: f64,
    /// login-storm: accounts cycled through.
    #[arg(long, default_value_t = 200)]
    storm_users: u64,
    /// How TLS starts: starttls or direct (XEP-0368).
    #[arg(long, default_value = "starttls")]
    tls: String,
    /// SASL mechanism the generator insists on, the same for every server.
    #[arg(long, default_value = "scram-sha-256")]
    mechanism: String,
    /// Source addresses of the generator's connections.
    #[arg(long, default_value = "127.0.1.1-127.0.60.254")]
    source: String,
    /// Worker threads of the generator (default: one per core).
    #[arg(long)]
    load_threads: Option<usize>,
    /// First of the loopback ports used: each server gets three from base + 10 × its index.
    #[arg(long, default_value_t = 25_200)]
    port_base: u16,
    /// Directory for configurations, data, logs and reports (default: a new one in /tmp,
    /// removed at the end unless --keep).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the working directory.
    #[arg(long)]
    keep: bool,
    /// Also write every result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The starling binary (default: next to this one).
    #[arg(long)]
    starling_bin: Option<PathBuf>,
    /// The starling-load binary (default: next to this one).
    #[arg(long)]
    load_bin: Option<PathBuf>,
    /// Fail instead of installing Prosody or ejabberd when missing.
    #[arg(long)]
    no_install: bool,
    /// Print each starling-load command line.
    #[arg(long)]
    verbose: bool,
    /// Scheduling priority (nice value) of this run, inherited by the servers and the
    /// generator, so that other work on the machine disturbs the measurements less. Lowering
    /// it below 0 needs root; 0 leaves it as it is.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
    /// CPUs every server runs on, as a `taskset -c` list (e.g. `0`): with `--load-cpus` on
    /// the others, the servers and the generator stop competing for the same cores, so the
    /// generator's own cost no longer caps a server's figure. Default: anywhere.
    #[arg(long)]
    server_cpus: Option<String>,
    /// CPUs the generator runs on (e.g. `1`); see `--server-cpus`.
    #[arg(long)]
    load_cpus: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Connect,
    Chat,
    Storm,
}

/// On SIGINT or SIGTERM, kills the servers and the generator this run started, then exits:
/// nothing of the run outlives it.
fn stop_everything_on_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("signal runtime")?;
    std::thread::spawn(move || {
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("interrupted: stopping the servers and the generator");
            servers::kill_all_started();
            std::process::exit(130);
        })
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    stop_everything_on_signal()?;
    let kinds = cli
        .servers
        .iter()
        .map(|s| Kind::from_name(s).with_context(|| format!("unknown server {s}")))
        .collect::<anyhow::Result<Vec<Kind>>>()?;
    let scenarios = cli
        .scenarios
        .iter()
        .map(|s| match s.trim() {
            "connect" => Ok(Scenario::Connect),
            "chat" => Ok(Scenario::Chat),
            "login-storm" | "storm" => Ok(Scenario::Storm),
            other => bail!("unknown scenario {other}"),
        })
        .collect::<anyhow::Result<Vec<Scenario>>>()?;
    if !matches!(cli.tls.as_str(), "starttls" | "direct") {
        bail!("--tls must be starttls or direct");
    }
    let here = std::env::current_exe().context("locating this executable")?;
    let sibling = |name: &str| here.with_file_name(name);
    let starling_bin = cli
        .starling_bin
        .clone()
        .unwrap_or_else(|| sibling("starling"));
    let load_bin = cli
        .load_bin
        .clone()
        .unwrap_or_else(|| sibling("starling-load"));
    for (bin, what) in [(&load_bin, "starling-load"), (&starling_bin, "starling")] {
        if (what == "starling-load" || kinds.contains(&Kind::Starling)) && !bin.is_file() {
            bail!(
                "{what} not found at {}; build it (cargo build --release -p starling \
                 -p starling-benches) or give its path",
                bin.display()
            );
        }
    }

    let niceness = if cli.nice == 0 {
        "unchanged".to_owned()
    } else {
        let current = rustix::process::getpriority_process(None).unwrap_or(0);
        match rustix::process::nice(cli.nice - current) {
            Ok(now) => now.to_string(),
            Err(e) => {
                eprintln!("warning: cannot set the nice value to {}: {e}", cli.nice);
                format!("{current} (setting {} failed)", cli.nice)
            }
        }
    };
    let nofile = limits::raise_nofile();
    let nofile_limit = nofile.limit().min(1 << 20);
    let needed = cli.sessions + 64;
    if needed > nofile_limit {
        eprintln!(
            "warning: {} sessions need about {needed} descriptors per process, the limit is \
             {nofile_limit}",
            cli.sessions
        );
    }
    let foreign: Vec<&str> = kinds.iter().filter_map(|k| k.package()).collect();
    if cli.no_install {
        if let Some(p) = foreign
            .iter()
            .find(|p| packages::installed_version(p).is_none())
        {
            bail!("{p} is not installed (and --no-install was given)");
        }
    } else {
        packages::ensure(&foreign)?;
    }
    for k in &kinds {
        if let Some(user) = k.system_user()
            && !packages::processes_of(user).is_empty()
        {
            eprintln!(
                "warning: processes of the {user} user are running (a system service?); they \
                 share the machine with this run"
            );
        }
    }

    let (work, remove_work) = match &cli.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("starling-compare-{}", std::process::id())),
            !cli.keep,
        ),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    set_mode(&work, 0o755)?;
    let (cert_pem, key_pem) = certificate("localhost")?;
    let ca = work.join("ca.pem");
    std::fs::write(&ca, &cert_pem)?;

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "starling-compare: {} on {cores} cores; load average {}; nice {niceness}; working in {}",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        loadavg_text(),
        work.display()
    );
    let mut targets = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let base = cli.port_base.saturating_add(10 * i as u16);
        let dir = work.join(kind.name());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cert.pem"), &cert_pem)?;
        std::fs::write(dir.join("key.pem"), &key_pem)?;
        set_mode(&dir.join("key.pem"), 0o600)?;
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        targets.push(Target {
            layout: Layout {
                kind,
                dir: dir.clone(),
                domain: "localhost".to_owned(),
                starttls: SocketAddr::new(ip, base),
                direct_tls: SocketAddr::new(ip, base + 1),
                aux: SocketAddr::new(ip, base + 2),
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
                nofile: nofile_limit,
                cpus: cli.server_cpus.clone(),
            },
            result: ServerResult::new(kind),
            usable: true,
        });
    }
    let run = Run {
        cli: &cli,
        load_bin: &load_bin,
        ca: &ca,
        starling_bin: &starling_bin,
    };
    run.all(&mut targets, &scenarios);
    let results: Vec<ServerResult> = targets.into_iter().map(|t| t.result).collect();

    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(
        out,
        "{} on this machine ({cores} cores), one run, servers measured back to back; \
         connect {} sessions over {} with {}, chat {} pairs with {}-byte bodies to full JIDs \
         ({} s steps, p99 <= {} ms, nothing lost), login-storm {} in flight for {} s; \
         a fresh server process for each scenario, chat and login-storm stepped through the \
         servers in turn; nice {niceness}; CPUs: servers {}, generator {}",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(" / "),
        cli.sessions,
        cli.tls,
        cli.mechanism.to_uppercase(),
        cli.pairs,
        cli.body_size,
        cli.step_secs,
        cli.p99_ms,
        cli.storm_concurrency,
        cli.storm_secs,
        cli.server_cpus.as_deref().unwrap_or("any"),
        cli.load_cpus.as_deref().unwrap_or("any")
    )?;
    summary::write_table(&mut out, &results)?;
    for r in &results {
        writeln!(out, "{}: measured {}", r.kind.name(), r.processes)?;
    }
    out.flush()?;
    if let Some(path) = &cli.json {
        let json = serde_json::json!({
            "machine": {
                "cores": cores,
                "server_cpus": cli.server_cpus,
                "load_cpus": cli.load_cpus,
            },
            "results": results,
            "targets": summary::targets(&results),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if remove_work {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!(
            "configurations, logs and reports kept in {}",
            work.display()
        );
    }
    Ok(())
}

/// One server of the run: where it lives and what was found.
struct Target {
    layout: Layout,
    result: ServerResult,
    /// False once it failed to start or to take its accounts: later phases skip it.
    usable: bool,
}

struct Run<'a> {
    cli: &'a Cli,
    load_bin: &'a Path,
    ca: &'a Path,
    starling_bin: &'a Path,
}

impl Run<'_> {
    /// Runs every phase. Accounts and `connect` go server by server (memory does not depend
    /// on what else runs); `chat` and `login-storm` have all servers up at once and step
    /// through them in turn, so that each stage of one server is measured right beside the
    /// same stage of the others, under the same conditions of the shared machine.
    fn all(&self, targets: &mut [Target], scenarios: &[Scenario]) {
        for t in targets.iter_mut() {
            t.result.version = self.version(t.layout.kind);
            eprintln!("[{}] {}", t.layout.kind.name(), t.result.version);
            if let Some(mut s) = self.start(t) {
                let registered = self.register(&s);
                s.stop();
                if let Err(e) = registered {
                    t.result.problems.push(format!("{e:#}"));
                    t.usable = false;
                }
            }
        }
        if scenarios.contains(&Scenario::Connect) {
            for t in targets.iter_mut().filter(|t| t.usable) {
                if let Some(mut s) = self.start(t) {
                    settle();
                    let outcome = self.connect(&s);
                    s.stop();
                    match outcome {
                        Ok(c) => t.result.connect = Some(c),
                        Err(e) => t.result.problems.push(format!("{e:#}")),
                    }
                }
            }
        }
        if scenarios.contains(&Scenario::Chat) {
            self.chat_all(targets);
        }
        if scenarios.contains(&Scenario::Storm) {
            let mut up = self.start_all(targets);
            settle();
            for (i, s) in &mut up {
                match self.storm(s) {
                    Ok(st) => targets[*i].result.storm = Some(st),
                    Err(e) => targets[*i].result.problems.push(format!("{e:#}")),
                }
                settle_short();
            }
            for (_, s) in &mut up {
                s.stop();
            }
        }
    }

    fn version(&self, kind: Kind) -> String {
        match kind.package() {
            Some(p) => packages::installed_version(p).unwrap_or_default(),
            None => Command::new(self.starling_bin)
                .arg("--version")
                .output()
                .map(|o| {
                    let v = String::from_utf8_lossy(&o.stdout);
                    v.split_whitespace().last().unwrap_or("").to_owned()
                })
                .unwrap_or_default(),
        }
    }

    /// Starts a fresh server process for `t` over its data; a failure is a problem of `t`
    /// and makes it unusable.
    fn start(&self, t: &mut Target) -> Option<Running> {
        match servers::start(&t.layout, self.starling_bin, Duration::from_secs(90)) {
            Ok(s) => {
                if t.result.processes.is_empty() {
                    t.result.processes = describe(&s);
                }
                Some(s)
            }
            Err(e) => {
                t.result.problems.push(format!("start: {e:#}"));
                t.usable = false;
                None
            }
        }
    }

    /// Starts every usable server: (index in `targets`, process).
    fn start_all(&self, targets: &mut [Target]) -> Vec<(usize, Running)> {
        let mut up = Vec::new();
        for (i, t) in targets.iter_mut().enumerate() {
            if t.usable
                && let Some(s) = self.start(t)
            {
                up.push((i, s));
            }
        }
        up
    }

    /// The chat ramps of all servers, stepped in turn: the first step of each, then the
    /// second of each, and so on; each server's search goes its own way.
    fn chat_all(&self, targets: &mut [Target]) {
        let cli = self.cli;
        let bounds = Bounds {
            start: cli.start_rate,
            max: cli.max_rate,
            min: 10.0,
            precision: cli.precision,
            max_steps: 20,
        };
        let mut up: Vec<(usize, Running, Search<ChatStep>)> = self
            .start_all(targets)
            .into_iter()
            .map(|(i, s)| (i, s, Search::new(bounds)))
            .collect();
        settle();
        loop {
            let mut ran = false;
            for (i, s, search) in &mut up {
                let Some(rate) = search.next_rate() else {
                    continue;
                };
                ran = true;
                match self.chat_step(s, rate, search.steps().len() + 1) {
                    Ok(step) => search.record(step.passed, step),
                    Err(e) => {
                        targets[*i]
                            .result
                            .problems
                            .push(format!("the chat ramp stopped: {e:#}"));
                        search.stop();
                    }
                }
            }
            if !ran {
                break;
            }
        }
        for (i, mut s, search) in up {
            s.stop();
            let best = ramp::best(search.steps()).map(|s| s.outcome.clone());
            targets[i].result.chat = Some(ChatResult {
                steps: search.into_steps().into_iter().map(|s| s.outcome).collect(),
                best,
            });
        }
    }

    /// One chat step at `rate`. A step that fails is run once more before it counts as
    /// failed: the machine is shared, and a burst of other work only ever adds latency.
    /// Every server gets the same second chance.
    fn chat_step(&self, s: &Running, rate: f64, number: usize) -> anyhow::Result<ChatStep> {
        let cli = self.cli;
        let name = s.layout().kind.name();
        let mut step = ChatStep::default();
        for attempt in 1..=2 {
            let rep = self.load(
                s,
                &format!("chat-{number}-{attempt}"),
                &[
                    "chat",
                    "--pairs",
                    &cli.pairs.to_string(),
                    "--msg-rate",
                    &rate.to_string(),
                    "--duration",
                    &cli.step_secs.to_string(),
                    "--rate",
                    "500",
                    "--body-size",
                    &cli.body_size.to_string(),
                ],
            )?;
            step = judge_chat_step(&rep, rate, cli.step_secs, cli.p99_ms, cli.pairs);
            step.attempt = attempt;
            eprintln!(
                "[{name}] chat {rate:.0}/s (try {attempt}): sent {} received {} p50 {:.2} ms \
                 p99 {:.2} ms, CPU server {:.2} s generator {:.2} s over {:.1} s, load \
                 {:.2} -> {}",
                step.sent,
                step.received,
                step.p50_ms,
                step.p99_ms,
                step.server_cpu_secs,
                step.generator_cpu_secs,
                step.secs,
                step.loadavg[1],
                if step.passed {
                    "sustained".to_owned()
                } else {
                    format!("not sustained ({})", step.why)
                }
            );
            settle_short();
            if step.passed {
                break;
            }
        }
        Ok(step)
    }

    /// Creates every account the scenarios use (XEP-0077).
    fn register(&self, s: &Running) -> anyhow::Result<()> {
        let cli = self.cli;
        let users = cli.sessions.max(cli.pairs * 2).max(cli.storm_users).max(1);
        let t = std::time::Instant::now();
        self.exec(
            s,
            "register",
            &[
                "--register",
                "--register-concurrency",
                "32",
                "register",
                "--users",
                &users.to_string(),
            ],
        )?;
        eprintln!(
            "[{}] {users} accounts registered in {:.1} s",
            s.layout().kind.name(),
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn connect(&self, s: &Running) -> anyhow::Result<ConnectResult> {
        let cli = self.cli;
        let rep = self.load(
            s,
            "connect",
            &[
                "connect",
                "--sessions",
                &cli.sessions.to_string(),
                "--rate",
                &cli.connect_rate.to_string(),
                "--hold",
                &cli.hold.to_string(),
            ],
        )?;
        let m = &rep.measured;
        let rss_start: u64 = m.processes.iter().map(|p| p.rss_start_kib).sum();
        let rss_end: u64 = m.processes.iter().map(|p| p.rss_end_kib).sum();
        let held = rep.sessions_held;
        let c = ConnectResult {
            sessions: cli.sessions,
            held,
            rss_start_kib: rss_start,
            rss_end_kib: rss_end,
            rss_per_session_kib: if held > 0 {
                rss_end.saturating_sub(rss_start) as f64 / held as f64
            } else {
                0.0
            },
            login_rate: rep.login_rate_per_sec,
            errors: rep.errors.clone(),
            loadavg: [m.loadavg_start[0], m.loadavg_end[0]],
        };
        eprintln!(
            "[{}] connect: {held}/{} held, RSS {} -> {} KiB = {:.2} KiB per session, \
             {:.0} logins/s, errors {:?}, load {:.2}",
            s.layout().kind.name(),
            cli.sessions,
            rss_start,
            rss_end,
            c.rss_per_session_kib,
            c.login_rate,
            c.errors,
            c.loadavg[1]
        );
        if held < cli.sessions {
            bail!(
                "connect held only {held} of {} sessions (errors {:?})",
                cli.sessions,
                rep.errors
            );
        }
        Ok(c)
    }

    fn storm(&self, s: &Running) -> anyhow::Result<StormResult> {
        let cli = self.cli;
        let rep = self.load(
            s,
            "login-storm",
            &[
                "login-storm",
                "--rate",
                "0",
                "--duration",
                &cli.storm_secs.to_string(),
                "--users",
                &cli.storm_users.to_string(),
                "--max-inflight",
                &cli.storm_concurrency.to_string(),
            ],
        )?;
        let m = &rep.measured;
        let st = StormResult {
            logins_per_sec: rep.login_rate_per_sec,
            ok: rep.logins_ok,
            failed: rep.logins_failed,
            p99_ms: rep.login_latency.p99_ms,
            server_cpu_secs: m.processes.iter().map(|p| p.cpu_secs).sum(),
            generator_cpu_secs: m.generator.cpu_secs,
            secs: m.secs,
            errors: rep.errors.clone(),
            loadavg: [m.loadavg_start[0], m.loadavg_end[0]],
        };
        eprintln!(
            "[{}] login-storm: {} ok {} failed, {:.0} logins/s, p99 {:.1} ms, CPU server \
             {:.2} s generator {:.2} s over {:.1} s, errors {:?}, load {:.2}",
            s.layout().kind.name(),
            st.ok,
            st.failed,
            st.logins_per_sec,
            st.p99_ms,
            st.server_cpu_secs,
            st.generator_cpu_secs,
            st.secs,
            st.errors,
            st.loadavg[1]
        );
        Ok(st)
    }

    /// Runs starling-load against `s` with the common flags and `args`; its JSON report.
    fn load(&self, s: &Running, name: &str, args: &[&str]) -> anyhow::Result<Report> {
        let json = self.exec(s, name, args)?;
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("reading {}", json.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))
    }

    /// Runs starling-load; the path of the JSON report it wrote. Its output goes to
    /// `NAME.out` in the server's directory, after the command line.
    fn exec(&self, s: &Running, name: &str, args: &[&str]) -> anyhow::Result<PathBuf> {
        let cli = self.cli;
        let l = s.layout();
        let addr = if cli.tls == "direct" {
            l.direct_tls
        } else {
            l.starttls
        };
        let json = l.dir.join(format!("{name}.json"));
        let mut cmd = servers::pinned(cli.load_cpus.as_deref(), self.load_bin);
        cmd.arg("--server")
            .arg(addr.to_string())
            .arg("--domain")
            .arg(&l.domain)
            .arg("--tls")
            .arg(&cli.tls)
            .arg("--ca")
            .arg(self.ca)
            .arg("--source")
            .arg(&cli.source)
            .arg("--mechanism")
            .arg(&cli.mechanism)
            .arg("--timeout")
            .arg("60")
            .arg("--quiet")
            .arg("--json")
            .arg(&json);
        for pid in &s.measured {
            cmd.arg("--watch-pid").arg(pid.to_string());
        }
        if let Some(n) = cli.load_threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd.args(args);
        let line = format!("{cmd:?}");
        if cli.verbose {
            eprintln!("+ {line}");
        }
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.load_bin.display()))?;
        let pid = child.id();
        servers::track(pid);
        let out = child.wait_with_output();
        servers::untrack(pid);
        let out = out.with_context(|| format!("running {}", self.load_bin.display()))?;
        let log = l.dir.join(format!("{name}.out"));
        let mut text = format!("{line}\n\n").into_bytes();
        text.extend_from_slice(&out.stdout);
        text.extend_from_slice(&out.stderr);
        let _ = std::fs::write(&log, text);
        if !out.status.success() {
            bail!(
                "{name} against {} failed ({}): {}\nserver log:\n{}",
                l.kind.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                servers::tail(&l.log_path(), 20)
            );
        }
        Ok(json)
    }
}

/// Judges one chat step: sustained when every login worked, the generator offered at least
/// 95% of the rate, every message arrived, nothing else went wrong, and p99 is in bound.
fn judge_chat_step(rep: &Report, rate: f64, secs: f64, p99_ms: f64, pairs: u64) -> ChatStep {
    let m = &rep.measured;
    let mut why = Vec::new();
    if rep.logins_ok < pairs * 2 {
        why.push(format!("{} of {} logins", rep.logins_ok, pairs * 2));
    }
    let offered = rate * secs;
    if (rep.sent as f64) < offered * 0.95 {
        why.push(format!(
            "only {:.0}% of the rate offered",
            rep.sent as f64 * 100.0 / offered.max(1.0)
        ));
    }
    if rep.received < rep.sent {
        why.push(format!("{} lost", rep.sent - rep.received));
    }
    let others: Vec<String> = rep
        .errors
        .iter()
        .filter(|(k, _)| k.as_str() != "message-lost")
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    if !others.is_empty() {
        why.push(format!("errors {}", others.join(", ")));
    }
    if rep.e2e_latency.p99_ms > p99_ms {
        why.push(format!(
            "p99 {:.1} ms > {p99_ms} ms",
            rep.e2e_latency.p99_ms
        ));
    }
    ChatStep {
        rate,
        passed: why.is_empty(),
        why: why.join("; "),
        sent: rep.sent,
        received: rep.received,
        p50_ms: rep.e2e_latency.p50_ms,
        p99_ms: rep.e2e_latency.p99_ms,
        secs: m.secs,
        server_cpu_secs: m.processes.iter().map(|p| p.cpu_secs).sum(),
        generator_cpu_secs: m.generator.cpu_secs,
        loadavg: [m.loadavg_start[0], m.loadavg_end[0]],
        attempt: 1,
    }
}

fn describe(s: &Running) -> String {
    s.measured
        .iter()
        .map(|&p| {
            let name = starling_benches::procfs::Proc::Pid(p)
                .name()
                .unwrap_or_default();
            format!("{name} (pid {p})")
        })
        .collect::<Vec<_>>()
        .join(", ")
        + " (RSS from /proc/PID/status VmRSS, CPU from /proc/PID/stat utime+stime)"
}

fn loadavg_text() -> String {
    starling_benches::procfs::loadavg()
        .map(|l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Lets the server finish closing sessions and collect garbage before the next phase.
fn settle() {
    std::thread::sleep(Duration::from_secs(5));
}

fn settle_short() {
    std::thread::sleep(Duration::from_secs(2));
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// A self-signed ECDSA P-256 certificate for `domain`, shared by every server of the run:
/// (certificate PEM, PKCS#8 key PEM).
fn certificate(domain: &str) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the key")?;
    let mut params =
        rcgen::CertificateParams::new(vec![domain.to_owned()]).context("certificate names")?;
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, domain);
    params.distinguished_name = name;
    // Valid from yesterday for 30 days: ejabberd arms a timer for the expiry and fails to
    // start when it lies beyond what an Erlang timer holds (rcgen's default is year 4096).
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sent: u64, received: u64, p99: f64, errors: serde_json::Value) -> Report {
        let latency = serde_json::json!({ "count": received, "mean_ms": 1.0, "p50_ms": 1.0,
            "p90_ms": 1.0, "p99_ms": p99, "p999_ms": p99, "max_ms": p99 });
        serde_json::from_value(serde_json::json!({
            "scenario": "chat", "server": "127.0.0.1:1", "tls": "starttls",
            "mechanism": "SCRAM-SHA-256", "nofile_limit": 1, "duration_secs": 10.0,
            "target": 4, "logins_ok": 4, "logins_failed": 0, "sessions_held": 0,
            "login_rate_per_sec": 1.0, "login_latency": latency, "sent": sent,
            "received": received, "receive_rate_per_sec": 1.0,
            "e2e_latency": latency,
            "errors": errors,
            "measured": { "secs": 10.0, "processes": [{ "pid": 1, "name": "s",
                "rss_start_kib": 1, "rss_end_kib": 2, "cpu_secs": 3.0 }],
                "generator": { "pid": 2, "name": "g", "rss_start_kib": 1,
                "rss_end_kib": 2, "cpu_secs": 1.5 },
                "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 2.0, 2.0] }
        }))
        .unwrap()
    }

    #[test]
    fn judges_chat_steps() {
        let ok = judge_chat_step(
            &report(1000, 1000, 12.0, serde_json::json!({})),
            100.0,
            10.0,
            50.0,
            2,
        );
        assert!(ok.passed, "{}", ok.why);
        assert_eq!(ok.server_cpu_secs, 3.0);
        assert_eq!(ok.loadavg, [1.0, 2.0]);
        let slow = judge_chat_step(
            &report(1000, 1000, 80.0, serde_json::json!({})),
            100.0,
            10.0,
            50.0,
            2,
        );
        assert!(!slow.passed);
        assert!(slow.why.contains("p99 80.0 ms"), "{}", slow.why);
        let short = judge_chat_step(
            &report(900, 890, 1.0, serde_json::json!({"message-lost": 10})),
            100.0,
            10.0,
            50.0,
            2,
        );
        assert!(short.why.contains("only 90%"), "{}", short.why);
        assert!(short.why.contains("10 lost"), "{}", short.why);
        assert!(
            !short.why.contains("errors"),
            "message-lost is counted once: {}",
            short.why
        );
    }
}
