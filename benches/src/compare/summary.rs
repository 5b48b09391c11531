//! What the comparison found, per server and scenario, and the one table it prints: RSS per
//! idle session, the highest chat rate sustained with its p99, server CPU seconds per 100k
//! messages, login-storm logins per second, and Starling's ratios to the targets of issue 6.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::compare::servers::Kind;

/// `connect`: memory of idle sessions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectResult {
    /// Sessions asked for.
    pub sessions: u64,
    /// Sessions still up when the RSS was read.
    pub held: u64,
    /// Server RSS before the first login (accounts registered, settled), KiB.
    pub rss_start_kib: u64,
    /// Server RSS with every session held, KiB.
    pub rss_end_kib: u64,
    /// `(end - start) / held`, KiB.
    pub rss_per_session_kib: f64,
    /// Logins per second over the ramp.
    pub login_rate: f64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// 1-minute load average at the start and the end.
    pub loadavg: [f64; 2],
}

/// One step of the chat ramp.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatStep {
    /// Messages per second offered.
    pub rate: f64,
    /// Whether it was sustained.
    pub passed: bool,
    /// Why not (empty when passed).
    pub why: String,
    /// Messages sent.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// End-to-end p50, ms.
    pub p50_ms: f64,
    /// End-to-end p99, ms.
    pub p99_ms: f64,
    /// Wall seconds of the measured phase (first message to last received).
    pub secs: f64,
    /// Server CPU seconds over that phase.
    pub server_cpu_secs: f64,
    /// Generator CPU seconds over that phase.
    pub generator_cpu_secs: f64,
    /// 1-minute load average at the start and the end.
    pub loadavg: [f64; 2],
    /// Which try this was (a failed step is run a second time).
    pub attempt: u32,
}

impl ChatStep {
    /// Server CPU seconds per 100,000 messages received.
    pub fn server_cpu_per_100k(&self) -> f64 {
        per_100k(self.server_cpu_secs, self.received)
    }

    /// Generator CPU seconds per 100,000 messages received.
    pub fn generator_cpu_per_100k(&self) -> f64 {
        per_100k(self.generator_cpu_secs, self.received)
    }
}

fn per_100k(secs: f64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        secs * 100_000.0 / n as f64
    }
}

/// `chat`: every ramp step and the best one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatResult {
    /// Steps in the order run.
    pub steps: Vec<ChatStep>,
    /// The passing step with the highest rate.
    pub best: Option<ChatStep>,
}

/// `login-storm`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormResult {
    /// Logins completed per second.
    pub logins_per_sec: f64,
    /// Logins completed.
    pub ok: u64,
    /// Logins failed.
    pub failed: u64,
    /// Login latency p99, ms.
    pub p99_ms: f64,
    /// Server CPU seconds over the storm.
    pub server_cpu_secs: f64,
    /// Generator CPU seconds over the storm.
    pub generator_cpu_secs: f64,
    /// Wall seconds.
    pub secs: f64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// 1-minute load average at the start and the end.
    pub loadavg: [f64; 2],
}

/// Everything measured for one server.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResult {
    /// Which server.
    pub kind: Kind,
    /// Its version.
    pub version: String,
    /// What was counted as its memory and CPU.
    pub processes: String,
    /// `connect`, if run and successful.
    pub connect: Option<ConnectResult>,
    /// `chat`, if run.
    pub chat: Option<ChatResult>,
    /// `login-storm`, if run and successful.
    pub storm: Option<StormResult>,
    /// What went wrong, in order.
    pub problems: Vec<String>,
}

impl ServerResult {
    /// An empty result for `kind`.
    pub fn new(kind: Kind) -> Self {
        ServerResult {
            kind,
            version: String::new(),
            processes: String::new(),
            connect: None,
            chat: None,
            storm: None,
            problems: Vec::new(),
        }
    }

    fn best_chat(&self) -> Option<&ChatStep> {
        self.chat.as_ref().and_then(|c| c.best.as_ref())
    }
}

/// A target of issue 6: Starling's figure against another server's.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// What is compared.
    pub what: String,
    /// The other server.
    pub against: Kind,
    /// Starling's figure divided by the other's.
    pub ratio: f64,
    /// The bound on the ratio.
    pub target: f64,
    /// `true`: the ratio must be at most the target (memory); `false`: at least (rates).
    pub at_most: bool,
    /// Whether it is met.
    pub met: bool,
}

/// The targets, for the servers that have both figures.
pub fn targets(results: &[ServerResult]) -> Vec<TargetCheck> {
    let find = |k: Kind| results.iter().find(|r| r.kind == k);
    let Some(st) = find(Kind::Starling) else {
        return Vec::new();
    };
    let rss = |r: &ServerResult| r.connect.as_ref().map(|c| c.rss_per_session_kib);
    let rate = |r: &ServerResult| r.best_chat().map(|s| s.rate);
    let logins = |r: &ServerResult| r.storm.as_ref().map(|s| s.logins_per_sec);
    type Figure = fn(&ServerResult) -> Option<f64>;
    let rows: [(&str, Figure, Kind, f64, bool); 5] = [
        ("RSS per idle TLS session", rss, Kind::Ejabberd, 0.25, true),
        ("RSS per idle TLS session", rss, Kind::Prosody, 0.25, true),
        ("sustained messages/s", rate, Kind::Ejabberd, 3.0, false),
        ("sustained messages/s", rate, Kind::Prosody, 5.0, false),
        ("login-storm logins/s", logins, Kind::Ejabberd, 5.0, false),
    ];
    rows.iter()
        .filter_map(|&(what, fig, against, target, at_most)| {
            let mine = fig(st)?;
            let theirs = fig(find(against)?)?;
            if theirs <= 0.0 {
                return None;
            }
            let ratio = mine / theirs;
            let met = if at_most {
                ratio <= target
            } else {
                ratio >= target
            };
            Some(TargetCheck {
                what: what.to_owned(),
                against,
                ratio,
                target,
                at_most,
                met,
            })
        })
        .collect()
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.decimals$}"))
}

/// Writes the comparison table, the targets, and any problems.
pub fn write_table(out: &mut impl Write, results: &[ServerResult]) -> std::io::Result<()> {
    write!(out, "{:<38}", "")?;
    for r in results {
        write!(out, " {:>12}", r.kind.name())?;
    }
    writeln!(out)?;
    type Row<'a> = (&'a str, Box<dyn Fn(&ServerResult) -> String + 'a>);
    let rows: Vec<Row<'_>> = vec![
        ("version", Box::new(|r| r.version.clone())),
        (
            "RSS per idle TLS session (KiB)",
            Box::new(|r| cell(r.connect.as_ref().map(|c| c.rss_per_session_kib), 2)),
        ),
        (
            "  sessions held / asked",
            Box::new(|r| {
                r.connect
                    .as_ref()
                    .map_or("-".to_owned(), |c| format!("{}/{}", c.held, c.sessions))
            }),
        ),
        (
            "  server RSS with them (MiB)",
            Box::new(|r| cell(r.connect.as_ref().map(|c| c.rss_end_kib as f64 / 1024.0), 1)),
        ),
        (
            "chat messages/s sustained, p99<=bound",
            Box::new(|r| cell(r.best_chat().map(|s| s.rate), 0)),
        ),
        (
            "  p99 at that rate (ms)",
            Box::new(|r| cell(r.best_chat().map(|s| s.p99_ms), 2)),
        ),
        (
            "  server CPU s per 100k messages",
            Box::new(|r| cell(r.best_chat().map(ChatStep::server_cpu_per_100k), 2)),
        ),
        (
            "  generator CPU s per 100k messages",
            Box::new(|r| cell(r.best_chat().map(ChatStep::generator_cpu_per_100k), 2)),
        ),
        (
            "login-storm logins/s",
            Box::new(|r| cell(r.storm.as_ref().map(|s| s.logins_per_sec), 0)),
        ),
        (
            "  p99 login (ms)",
            Box::new(|r| cell(r.storm.as_ref().map(|s| s.p99_ms), 1)),
        ),
        (
            "  server CPU ms per login",
            Box::new(|r| {
                cell(
                    r.storm
                        .as_ref()
                        .filter(|s| s.ok > 0)
                        .map(|s| s.server_cpu_secs * 1000.0 / s.ok as f64),
                    2,
                )
            }),
        ),
        (
            "load average (1 min) connect",
            Box::new(|r| {
                r.connect
                    .as_ref()
                    .map_or("-".to_owned(), |c| loads(c.loadavg))
            }),
        ),
        (
            "load average (1 min) chat best step",
            Box::new(|r| r.best_chat().map_or("-".to_owned(), |c| loads(c.loadavg))),
        ),
        (
            "load average (1 min) login-storm",
            Box::new(|r| {
                r.storm
                    .as_ref()
                    .map_or("-".to_owned(), |c| loads(c.loadavg))
            }),
        ),
    ];
    for (name, f) in &rows {
        write!(out, "{name:<38}")?;
        for r in results {
            write!(out, " {:>12}", f(r))?;
        }
        writeln!(out)?;
    }
    let checks = targets(results);
    if !checks.is_empty() {
        writeln!(out)?;
        writeln!(out, "targets for Starling, measured in this run:")?;
        for c in &checks {
            let bound = if c.at_most { "<=" } else { ">=" };
            let verdict = if c.met {
                "met".to_owned()
            } else if c.at_most {
                format!(
                    "NOT met: {:.0}% over the bound",
                    (c.ratio / c.target - 1.0) * 100.0
                )
            } else {
                format!(
                    "NOT met: {:.0}% short (x{:.2} of the x{:.1} wanted)",
                    (1.0 - c.ratio / c.target) * 100.0,
                    c.ratio,
                    c.target
                )
            };
            writeln!(
                out,
                "  {:<26} vs {:<9} x{:<7.2} (target {bound} x{}) {verdict}",
                c.what,
                c.against.name(),
                c.ratio,
                c.target
            )?;
        }
    }
    for r in results {
        for p in &r.problems {
            writeln!(out, "problem ({}): {p}", r.kind.name())?;
        }
    }
    Ok(())
}

fn loads(l: [f64; 2]) -> String {
    format!("{:.2}-{:.2}", l[0], l[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(kind: Kind, rss: f64, rate: f64, logins: f64) -> ServerResult {
        let mut r = ServerResult::new(kind);
        r.connect = Some(ConnectResult {
            rss_per_session_kib: rss,
            ..ConnectResult::default()
        });
        let step = ChatStep {
            rate,
            passed: true,
            received: 200_000,
            server_cpu_secs: 3.0,
            ..ChatStep::default()
        };
        r.chat = Some(ChatResult {
            steps: vec![step.clone()],
            best: Some(step),
        });
        r.storm = Some(StormResult {
            logins_per_sec: logins,
            ..StormResult::default()
        });
        r
    }

    #[test]
    fn checks_each_target_and_prints_the_table() {
        let results = vec![
            result(Kind::Starling, 4.0, 30_000.0, 1000.0),
            result(Kind::Prosody, 40.0, 5_000.0, 100.0),
            result(Kind::Ejabberd, 12.0, 12_000.0, 250.0),
        ];
        let t = targets(&results);
        assert_eq!(t.len(), 5);
        let by = |what: &str, k: Kind| {
            t.iter()
                .find(|c| c.what.starts_with(what) && c.against == k)
                .unwrap()
                .clone()
        };
        assert!(!by("RSS", Kind::Ejabberd).met); // 4/12 = 0.33 > 0.25
        assert!(by("RSS", Kind::Prosody).met);
        assert!(!by("sustained", Kind::Ejabberd).met); // 2.5 < 3
        assert!(by("sustained", Kind::Prosody).met); // 6
        assert!(!by("login", Kind::Ejabberd).met); // 4 < 5
        let mut out = Vec::new();
        write_table(&mut out, &results).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("RSS per idle TLS session (KiB)"), "{text}");
        assert!(text.contains("1.50"), "CPU per 100k: {text}");
        assert!(text.contains("NOT met: 17% short"), "{text}");
        assert!(text.contains("NOT met: 33% over the bound"), "{text}");
    }

    #[test]
    fn missing_figures_give_no_target() {
        let mut st = result(Kind::Starling, 4.0, 30_000.0, 1000.0);
        st.storm = None;
        let t = targets(&[st, result(Kind::Ejabberd, 12.0, 12_000.0, 250.0)]);
        assert_eq!(t.len(), 2);
    }
}
