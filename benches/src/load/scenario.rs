//! The scenarios: `connect` (idle sessions), `chat` (pairs exchanging stamped messages),
//! `presence` (presence broadcast to roster contacts, RFC 6121 §4), `login-storm` (login and
//! log out at a rate), and account creation through XEP-0077 ahead of any of them.
//!
//! Every loop is bounded in count and time: ramps are paced against a start instant, phases
//! end at deadlines, and the tasks of a phase are awaited (then aborted) before the report.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use starling_xml::Element;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::load::client::{Account, Drained, LoadError, Session, Target, error_condition};
use crate::load::meter::Meter;
use crate::load::stats::{Report, Stats, now_micros};

/// What every scenario shares.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Where to connect.
    pub target: Arc<Target>,
    /// What is counted.
    pub stats: Arc<Stats>,
    /// The accounts, one per simulated device.
    pub accounts: Arc<Vec<Arc<Account>>>,
    /// Resource prefix for bound sessions.
    pub resource: String,
    /// The open-file limit (for the report).
    pub nofile: u64,
    /// Server processes whose RSS and CPU time are measured over the scenario's phase.
    pub watch: Arc<Vec<u32>>,
}

/// Prints a progress line to stderr every second until dropped.
#[derive(Debug)]
pub struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Progress {
    /// Starts the progress line (or nothing when `quiet`).
    pub fn start(stats: Arc<Stats>, quiet: bool) -> Self {
        if quiet {
            return Progress(None);
        }
        let start = Instant::now();
        Progress(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("{}", stats.progress_line(start.elapsed()));
            }
        })))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Sleeps until the `i`th event of a ramp at `rate` per second that began at `start`.
async fn pace(start: tokio::time::Instant, i: u64, rate: f64) {
    if rate > 0.0 && rate.is_finite() {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
    }
}

/// Polls `done` every 10 ms until it holds or `deadline` passes; whether it held.
async fn wait_for(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits every task of `set` until `deadline`, then aborts the rest.
async fn join_all<T: 'static>(set: &mut JoinSet<T>, deadline: Instant) -> Vec<T> {
    let mut out = Vec::with_capacity(set.len());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, set.join_next()).await {
            Ok(Some(Ok(v))) => out.push(v),
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                break;
            }
        }
    }
    out
}

/// Creates `accounts` through in-band registration with at most `concurrency` at once.
/// Accounts that exist already count as created. Fails when any registration fails.
pub async fn register_all(ctx: &Ctx, concurrency: usize) -> Result<(), String> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for account in ctx.accounts.iter().cloned() {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let target = ctx.target.clone();
        let stats = ctx.stats.clone();
        set.spawn(async move {
            let _permit = permit;
            match target.register(&account).await {
                Ok(true) => {
                    stats.registered.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Ok(false) => {
                    stats.register_existing.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err(format!("{}: {e}", account.user)),
            }
        });
    }
    let deadline = Instant::now() + ctx.target.step_timeout * 4 + Duration::from_secs(60);
    let results = join_all(&mut set, deadline).await;
    let finished = results.len();
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed
        .iter()
        .any(|f| f.contains("resource-constraint") || f.contains("not-allowed"))
    {
        eprintln!(
            "hint: servers throttle in-band registrations per client address (Starling and \
             ejabberd by default); spread them with --source 127.0.0.2-127.0.1.255"
        );
    }
    if finished != ctx.accounts.len() {
        return Err(format!(
            "{} of {} registrations did not finish in time",
            ctx.accounts.len() - finished,
            ctx.accounts.len()
        ));
    }
    match failed.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} of {} registrations failed, first: {first}",
            failed.len(),
            ctx.accounts.len()
        )),
    }
}

async fn timed_login(ctx: &Ctx, account: &Account, resource: &str) -> Option<Session> {
    ctx.stats.connects.fetch_add(1, Ordering::Relaxed);
    let t = Instant::now();
    match ctx.target.login(account, resource).await {
        Ok(s) => {
            ctx.stats.login(t.elapsed());
            ctx.stats.mechanism(s.mechanism.name());
            ctx.stats.logins_ok.fetch_add(1, Ordering::Relaxed);
            Some(s)
        }
        Err(e) => {
            ctx.stats.error(&e.kind());
            ctx.stats.logins_failed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn report(
    ctx: &Ctx,
    scenario: &str,
    target: u64,
    duration: Duration,
    login_phase: Duration,
) -> Report {
    let s = &ctx.stats;
    let secs = duration.as_secs_f64().max(1e-9);
    let login_secs = login_phase.as_secs_f64().max(1e-9);
    let logins_ok = s.logins_ok.load(Ordering::Relaxed);
    let received = s.received.load(Ordering::Relaxed);
    Report {
        scenario: scenario.to_owned(),
        server: ctx.target.addr.to_string(),
        tls: format!("{:?}", ctx.target.tls).to_lowercase(),
        mechanism: match s.mechanisms() {
            used if used.is_empty() => "none".to_owned(),
            used => used,
        },
        nofile_limit: ctx.nofile,
        duration_secs: duration.as_secs_f64(),
        target,
        logins_ok,
        logins_failed: s.logins_failed.load(Ordering::Relaxed),
        sessions_held: 0,
        login_rate_per_sec: logins_ok as f64 / login_secs,
        login_latency: s.login_latency(),
        sent: s.sent.load(Ordering::Relaxed),
        received,
        receive_rate_per_sec: received as f64 / secs,
        e2e_latency: s.e2e_latency(),
        errors: s.errors(),
        measured: Default::default(),
    }
}

/// Handles one drained batch: `Err` ends the session and is counted.
fn count_end(stats: &Stats, r: Result<Drained, LoadError>) -> bool {
    match r {
        Ok(Drained::Open) => false,
        Ok(Drained::Closed) => {
            stats.error("closed");
            true
        }
        Err(e) => {
            stats.error(&e.kind());
            true
        }
    }
}

/// Keeps a session open, answering pings, until `stop` changes.
async fn idle(mut s: Session, mut stop: watch::Receiver<bool>, stats: Arc<Stats>, wait: Duration) {
    loop {
        tokio::select! {
            r = s.readable() => {
                if let Err(e) = r {
                    stats.error(&LoadError::Io(e).kind());
                    return;
                }
                if count_end(&stats, s.drain(|_| {}).await) {
                    return;
                }
            }
            _ = stop.changed() => break,
        }
    }
    s.close(wait).await;
}

/// Parameters of `connect`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOpts {
    /// Sessions to open.
    pub sessions: u64,
    /// Logins started per second.
    pub rate: f64,
    /// Seconds to hold the sessions after the ramp.
    pub hold: Duration,
}

/// `connect`: log `sessions` in at `rate`, hold them idle, close them.
pub async fn connect(ctx: &Ctx, opts: ConnectOpts) -> Report {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();
    let meter = Meter::start(&ctx.watch);
    let start = tokio::time::Instant::now();
    let wait = ctx.target.step_timeout;
    for i in 0..opts.sessions {
        pace(start, i, opts.rate).await;
        let Some(account) = ctx.accounts.get(i as usize).cloned() else {
            break;
        };
        let ctx2 = ctx.clone();
        let stop = stop_rx.clone();
        set.spawn(async move {
            let resource = format!("{}{i}", ctx2.resource);
            if let Some(s) = timed_login(&ctx2, &account, &resource).await {
                ctx2.stats.sessions_up.fetch_add(1, Ordering::Relaxed);
                idle(s, stop, ctx2.stats.clone(), wait).await;
                ctx2.stats.sessions_up.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
    let stats = ctx.stats.clone();
    let n = opts.sessions;
    let all_done = move || {
        stats.logins_ok.load(Ordering::Relaxed) + stats.logins_failed.load(Ordering::Relaxed) >= n
    };
    wait_for(Instant::now() + wait * 4, all_done).await;
    let ramp = start.elapsed();
    tokio::time::sleep(opts.hold).await;
    let held = ctx.stats.sessions_up.load(Ordering::Relaxed);
    // The window ends with the sessions still held: its RSS is the servers' with them all.
    let measured = meter.finish();
    let _ = stop_tx.send(true);
    join_all(&mut set, Instant::now() + wait * 2).await;
    let mut r = report(ctx, "connect", opts.sessions, ramp, ramp);
    r.sessions_held = held;
    r.measured = measured;
    r
}

/// Parameters of `chat`.
#[derive(Debug, Clone, Copy)]
pub struct ChatOpts {
    /// Pairs of sessions.
    pub pairs: u64,
    /// Total messages per second over all sessions.
    pub msg_rate: f64,
    /// Seconds of sending.
    pub duration: Duration,
    /// Logins started per second before the sending begins.
    pub rate: f64,
    /// Body length in bytes.
    pub body_size: usize,
}

/// Builds a stamped chat message: the id carries the sequence number and the send time.
pub fn chat_message(to: &str, seq: u64, sent_micros: u64, body_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + to.len() + body_size);
    let mut w = starling_xml::writer::XmlWriter::new(&mut out);
    let id = format!("ld-{seq}-{sent_micros}");
    let mut body = format!("starling-load message {seq} ");
    while body.len() < body_size {
        body.push('x');
    }
    w.start("message")
        .attr("to", to)
        .attr("type", "chat")
        .attr("id", &id);
    w.text_element("body", &body).end("message");
    out
}

/// The send time of a stamped message or presence id (`ld-SEQ-MICROS`).
pub fn stamp_of(id: &str) -> Option<u64> {
    let rest = id.strip_prefix("ld-")?;
    let (_seq, micros) = rest.split_once('-')?;
    micros.parse().ok()
}

fn on_chat_stanza(stats: &Stats, el: &Element) {
    if el.name() != "message" {
        return;
    }
    if el.stanza_type().as_deref() == Some("error") {
        stats.error(&format!(
            "message-error:{}",
            error_condition(el).unwrap_or_else(|| "undefined-condition".to_owned())
        ));
        return;
    }
    if let Some(sent) = el.id().as_deref().and_then(stamp_of) {
        stats.delivered(sent);
    }
}

/// `chat`: log `2 × pairs` sessions in, then each sends to its partner so that the total is
/// `msg_rate`; after `duration`, sending stops and every message in flight is awaited.
pub async fn chat(ctx: &Ctx, opts: ChatOpts) -> Report {
    let n = opts.pairs * 2;
    let start = Instant::now();
    let sessions = login_all(ctx, n, opts.rate).await;
    let wait = ctx.target.step_timeout;
    let login_phase = start.elapsed();
    let mut pairs = Vec::new();
    let mut it = sessions.into_iter();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        if let (Some(a), Some(b)) = (a, b) {
            pairs.push((a, b));
        }
    }
    let senders = (pairs.len() * 2) as f64;
    let period = if senders > 0.0 && opts.msg_rate > 0.0 {
        Duration::from_secs_f64(senders / opts.msg_rate)
    } else {
        Duration::from_secs(3600)
    };
    let (send_stop_tx, send_stop_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();
    let meter = Meter::start(&ctx.watch);
    let t0 = tokio::time::Instant::now();
    let mut k = 0u32;
    for (a, b) in pairs {
        let (ja, jb) = (a.jid.clone(), b.jid.clone());
        for (s, partner) in [(a, jb), (b, ja)] {
            // Stagger the senders across one period so the load is smooth.
            let offset = period.mul_f64(f64::from(k) / senders.max(1.0));
            k += 1;
            let stats = ctx.stats.clone();
            let (send_stop, stop) = (send_stop_rx.clone(), stop_rx.clone());
            let body_size = opts.body_size;
            set.spawn(chat_session(
                s,
                partner,
                t0 + offset,
                period,
                send_stop,
                stop,
                stats,
                body_size,
                wait,
            ));
        }
    }
    ctx.stats.sessions_up.store(k.into(), Ordering::Relaxed);
    tokio::time::sleep(opts.duration).await;
    let _ = send_stop_tx.send(true);
    let send_phase = t0.elapsed();
    let stats = ctx.stats.clone();
    // Every message sent must arrive; give the tail up to ten seconds.
    tokio::time::sleep(Duration::from_millis(20)).await;
    wait_for(Instant::now() + Duration::from_secs(10), || {
        stats.received.load(Ordering::Relaxed) >= stats.sent.load(Ordering::Relaxed)
    })
    .await;
    // From the first message to the last one received: the CPU every message cost.
    let measured = meter.finish();
    let _ = stop_tx.send(true);
    join_all(&mut set, Instant::now() + wait * 2).await;
    ctx.stats.sessions_up.store(0, Ordering::Relaxed);
    let lost = ctx
        .stats
        .sent
        .load(Ordering::Relaxed)
        .saturating_sub(ctx.stats.received.load(Ordering::Relaxed));
    for _ in 0..lost.min(1) {
        ctx.stats.error("message-lost");
    }
    let mut r = report(ctx, "chat", n, send_phase, login_phase);
    if lost > 0 {
        r.errors.insert("message-lost".to_owned(), lost);
    }
    r.measured = measured;
    r
}

#[allow(clippy::too_many_arguments)]
async fn chat_session(
    mut s: Session,
    partner: String,
    first: tokio::time::Instant,
    period: Duration,
    mut send_stop: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
    body_size: usize,
    wait: Duration,
) {
    // Stanzas that arrived with the end of the negotiation.
    let st = stats.clone();
    if count_end(&stats, s.drain(move |el| on_chat_stanza(&st, el)).await) {
        return;
    }
    // A sender that fell behind (its task ran late) catches up rather than lowering the rate
    // for good: the load stays open-loop at the rate asked for, and a server that cannot take
    // it shows as messages sent short of the target or as latency, not as a quieter test.
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sending = true;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            r = s.readable() => {
                if let Err(e) = r {
                    stats.error(&LoadError::Io(e).kind());
                    return;
                }
                let st = stats.clone();
                if count_end(&stats, s.drain(move |el| on_chat_stanza(&st, el)).await) {
                    return;
                }
            }
            _ = tick.tick(), if sending => {
                let msg = chat_message(&partner, seq, now_micros(), body_size);
                seq += 1;
                if let Err(e) = s.send(&msg).await {
                    stats.error(&e.kind());
                    return;
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = send_stop.changed(), if sending => sending = false,
            _ = stop.changed() => break,
        }
    }
    s.close(wait).await;
}

/// Parameters of `login-storm`.
#[derive(Debug, Clone, Copy)]
pub struct StormOpts {
    /// Logins started per second.
    pub rate: f64,
    /// Seconds of storm.
    pub duration: Duration,
    /// Logins in flight (connecting to bound) at most; backpressure on the ramp beyond that.
    pub max_inflight: usize,
}

/// How long a login-storm session waits for the server's `</stream:stream>` before it shuts
/// the connection down: bounds the connections that are closing at once.
const STORM_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// `login-storm`: log in and out at `rate` for `duration`, cycling through the accounts. A
/// `rate` of 0 starts a login whenever one of the `max_inflight` slots is free (a closed
/// loop, which measures the most logins per second at that concurrency).
pub async fn login_storm(ctx: &Ctx, opts: StormOpts) -> Report {
    let sem = Arc::new(Semaphore::new(opts.max_inflight.max(1)));
    let mut set = JoinSet::new();
    let meter = Meter::start(&ctx.watch);
    let start = tokio::time::Instant::now();
    let wait = ctx.target.step_timeout;
    let users = ctx.accounts.len().max(1);
    let mut i = 0u64;
    while start.elapsed() < opts.duration {
        pace(start, i, opts.rate).await;
        if start.elapsed() >= opts.duration {
            break;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let Some(account) = ctx.accounts.get(i as usize % users).cloned() else {
            break;
        };
        let ctx2 = ctx.clone();
        set.spawn(async move {
            let resource = format!("{}storm{i}", ctx2.resource);
            let session = timed_login(&ctx2, &account, &resource).await;
            // A login is in flight until it is bound; the close that follows does not hold
            // a slot, so a server slow to answer `</stream:stream>` is not charged for it
            // in logins per second (its CPU time for the close is still in the window).
            drop(permit);
            if let Some(s) = session {
                s.close(wait.min(STORM_CLOSE_WAIT)).await;
            }
        });
        i += 1;
        // Reap finished tasks so the set stays as small as what is in flight.
        while set.try_join_next().is_some() {}
    }
    join_all(&mut set, Instant::now() + wait * 2).await;
    let elapsed = start.elapsed();
    let mut r = report(ctx, "login-storm", i, elapsed, elapsed);
    r.measured = meter.finish();
    r
}

/// Parameters of `presence`.
#[derive(Debug, Clone, Copy)]
pub struct PresenceOpts {
    /// Contacts per user.
    pub contacts: usize,
    /// Presence changes per second, total.
    pub rate: f64,
    /// Seconds of presence changes.
    pub duration: Duration,
    /// Logins started per second before the changes.
    pub login_rate: f64,
}

/// Sends an IQ and waits for its answer (other stanzas are dropped).
async fn request(
    s: &mut Session,
    iq: &[u8],
    id: &str,
    wait: Duration,
) -> Result<Element, LoadError> {
    s.send(iq).await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::time::timeout_at(deadline, s.readable())
            .await
            .map_err(|_| LoadError::Timeout("awaiting an iq answer"))?
            .map_err(LoadError::Io)?;
        let mut found = None;
        let state = s
            .drain(|el| {
                if el.name() == "iq" && el.id().as_deref() == Some(id) {
                    found = Some(el.clone());
                }
            })
            .await?;
        if let Some(el) = found {
            return Ok(el);
        }
        if state == Drained::Closed {
            return Err(LoadError::Closed);
        }
    }
}

/// Logs in `n` sessions paced at `rate`; the slot of a failed login is `None`.
async fn login_all(ctx: &Ctx, n: u64, rate: f64) -> Vec<Option<Session>> {
    let mut logins = JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0..n {
        pace(start, i, rate).await;
        let Some(account) = ctx.accounts.get(i as usize).cloned() else {
            break;
        };
        let ctx2 = ctx.clone();
        logins.spawn(async move {
            let resource = format!("{}{i}", ctx2.resource);
            (i, timed_login(&ctx2, &account, &resource).await)
        });
    }
    let mut sessions: Vec<Option<Session>> = (0..n).map(|_| None).collect();
    let deadline = Instant::now() + ctx.target.step_timeout * 4;
    for (i, s) in join_all(&mut logins, deadline).await {
        if let Some(slot) = sessions.get_mut(i as usize) {
            *slot = s;
        }
    }
    sessions
}

fn bare(jid: &str) -> &str {
    jid.split('/').next().unwrap_or(jid)
}

/// What a presence session counts besides [`Stats`].
#[derive(Debug, Default)]
struct PresenceCounts {
    /// `subscribed` answers received by subscribers.
    subscribed: std::sync::atomic::AtomicU64,
    /// Subscriptions requested (those the roster did not hold already).
    expected: std::sync::atomic::AtomicU64,
    /// Sessions that got their roster and sent their requests.
    ready: std::sync::atomic::AtomicU64,
}

/// The `(jid, subscription)` of each `<item/>` of a roster result (RFC 6121 §2.1.2).
pub fn roster_items(raw: &str) -> Vec<(String, String)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let i = tag.find(&format!(" {name}="))?;
        let rest = tag.get(i + name.len() + 2..)?;
        let quote = rest.chars().next()?;
        let rest = rest.get(1..)?;
        let end = rest.find(quote)?;
        Some(
            rest.get(..end)?
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        )
    };
    raw.split("<item")
        .skip(1)
        .filter_map(|chunk| {
            let tag = chunk.get(..chunk.find('>')?)?;
            let jid = attr(tag, "jid")?;
            let sub = attr(tag, "subscription").unwrap_or_else(|| "none".to_owned());
            Some((jid, sub))
        })
        .collect()
}

/// Handles one inbound stanza of the presence scenario, appending replies to `out`.
fn on_presence_stanza(
    stats: &Stats,
    counts: &PresenceCounts,
    own: &str,
    contacts: &[String],
    el: &Element,
    out: &mut Vec<u8>,
) {
    if el.name() == "iq" && el.id().as_deref() == Some("roster1") {
        // Subscribe to the contacts the roster does not already give us presence of.
        let items = roster_items(std::str::from_utf8(el.raw()).unwrap_or(""));
        let mut missing = 0;
        for c in contacts {
            let have = items
                .iter()
                .any(|(jid, sub)| jid == c && (sub == "to" || sub == "both"));
            if !have {
                missing += 1;
                starling_xml::writer::XmlWriter::new(out)
                    .start("presence")
                    .attr("to", c)
                    .attr("type", "subscribe")
                    .empty();
            }
        }
        counts.expected.fetch_add(missing, Ordering::Relaxed);
        counts.ready.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if el.name() != "presence" {
        return;
    }
    let from = el.from().map(|f| f.into_owned()).unwrap_or_default();
    match el.stanza_type().as_deref() {
        // A contact asks for our presence: approve (RFC 6121 §3.1.4).
        Some("subscribe") => {
            starling_xml::writer::XmlWriter::new(out)
                .start("presence")
                .attr("to", bare(&from))
                .attr("type", "subscribed")
                .empty();
        }
        Some("subscribed") => {
            counts.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        Some("error") => stats.error(&format!(
            "presence-error:{}",
            error_condition(el).unwrap_or_else(|| "undefined-condition".to_owned())
        )),
        None => {
            if bare(&from) != own
                && let Some(sent) = crate::load::client::child_text(el, "status")
                    .as_deref()
                    .and_then(stamp_of)
            {
                stats.delivered(sent);
            }
        }
        _ => {}
    }
}

#[allow(clippy::too_many_arguments)]
async fn presence_session(
    mut s: Session,
    contacts: Vec<String>,
    first: tokio::time::Instant,
    period: Duration,
    mut change: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
    counts: Arc<PresenceCounts>,
    wait: Duration,
) {
    let own = bare(&s.jid).to_owned();
    // Requesting the roster makes this an interested resource (RFC 6121 §2.1.1), which is
    // what gets subscription approvals and roster pushes delivered, as real clients do; the
    // subscription requests follow its result.
    let roster_get = b"<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>";
    if let Err(e) = s.send(roster_get).await {
        stats.error(&e.kind());
        return;
    }
    // Presence changes begin when `change` flips to true, and end when it flips back.
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changing = false;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            r = s.readable() => {
                if let Err(e) = r {
                    stats.error(&LoadError::Io(e).kind());
                    return;
                }
                let mut replies = Vec::new();
                let (st, ct) = (stats.clone(), counts.clone());
                let r = s
                    .drain(|el| on_presence_stanza(&st, &ct, &own, &contacts, el, &mut replies))
                    .await;
                if count_end(&stats, r) {
                    return;
                }
                if !replies.is_empty() && let Err(e) = s.send(&replies).await {
                    stats.error(&e.kind());
                    return;
                }
            }
            _ = tick.tick(), if changing => {
                let mut p = Vec::with_capacity(128);
                let show = if seq.is_multiple_of(2) { "away" } else { "chat" };
                starling_xml::writer::XmlWriter::new(&mut p)
                    .start("presence")
                    .text_element("show", show)
                    .text_element("status", &format!("ld-{seq}-{}", now_micros()))
                    .end("presence");
                seq += 1;
                if let Err(e) = s.send(&p).await {
                    stats.error(&e.kind());
                    return;
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            r = change.changed() => {
                changing = r.is_ok() && *change.borrow();
                if changing {
                    tick.reset_at(tokio::time::Instant::now().max(first));
                }
            }
            _ = stop.changed() => break,
        }
    }
    s.close(wait).await;
}

/// `presence`: first checks that the server manages rosters (RFC 6121 §2); without that the
/// scenario cannot build subscriptions and is refused with the server's answer. Then every
/// user subscribes to its next `contacts` users (who approve, RFC 6121 §3.1), and the users
/// change presence at a total `rate`; each change stamped in `<status/>` is measured at every
/// subscriber it reaches (RFC 6121 §4.4.2).
pub async fn presence(ctx: &Ctx, opts: PresenceOpts) -> Result<Report, String> {
    let wait = ctx.target.step_timeout;
    let account = ctx
        .accounts
        .first()
        .cloned()
        .ok_or("presence needs at least one account")?;
    let mut s = ctx
        .target
        .login(&account, &format!("{}probe", ctx.resource))
        .await
        .map_err(|e| format!("probe login failed: {e}"))?;
    let answer = request(
        &mut s,
        b"<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>",
        "roster1",
        wait,
    )
    .await;
    s.close(wait).await;
    let answer = answer.map_err(|e| format!("roster request failed: {e}"))?;
    if answer.stanza_type().as_deref() != Some("result") {
        return Err(format!(
            "the server answered the roster request (jabber:iq:roster, RFC 6121 §2.1.3) with \
             '{}': it has no roster management, so the presence scenario cannot run against it",
            error_condition(&answer).unwrap_or_else(|| "an error".to_owned())
        ));
    }
    let n = ctx.accounts.len() as u64;
    let k = opts.contacts.min(ctx.accounts.len().saturating_sub(1));
    let login_start = Instant::now();
    let sessions = login_all(ctx, n, opts.login_rate).await;
    let login_phase = login_start.elapsed();
    let jids: Vec<Option<String>> = sessions
        .iter()
        .map(|s| s.as_ref().map(|s| bare(&s.jid).to_owned()))
        .collect();
    let live = jids.iter().filter(|j| j.is_some()).count().max(1);
    let period = Duration::from_secs_f64(live as f64 / opts.rate.max(1e-3));
    let (change_tx, change_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let counts = Arc::new(PresenceCounts::default());
    let mut set = JoinSet::new();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut subscribers_of = vec![0u64; jids.len()];
    for (i, s) in sessions.into_iter().enumerate() {
        let Some(s) = s else { continue };
        let contacts: Vec<String> = (1..=k)
            .filter_map(|d| {
                let j = (i + d) % jids.len();
                let jid = jids.get(j)?.clone()?;
                if let Some(c) = subscribers_of.get_mut(j) {
                    *c += 1;
                }
                Some(jid)
            })
            .collect();
        let offset = period.mul_f64(i as f64 / live as f64);
        set.spawn(presence_session(
            s,
            contacts,
            t0 + offset,
            period,
            change_rx.clone(),
            stop_rx.clone(),
            ctx.stats.clone(),
            counts.clone(),
            wait,
        ));
    }
    ctx.stats
        .sessions_up
        .store(set.len() as u64, Ordering::Relaxed);
    let sessions_live = set.len() as u64;
    let subscribed = {
        let counts = counts.clone();
        wait_for(Instant::now() + wait, move || {
            counts.ready.load(Ordering::Relaxed) >= sessions_live
                && counts.subscribed.load(Ordering::Relaxed)
                    >= counts.expected.load(Ordering::Relaxed)
        })
        .await
    };
    if !subscribed {
        ctx.stats.error("subscription-incomplete");
        eprintln!(
            "presence: {} of {} subscriptions approved in time ({} of {sessions_live} rosters)",
            counts.subscribed.load(Ordering::Relaxed),
            counts.expected.load(Ordering::Relaxed),
            counts.ready.load(Ordering::Relaxed),
        );
    }
    let meter = Meter::start(&ctx.watch);
    let _ = change_tx.send(true);
    let t1 = Instant::now();
    tokio::time::sleep(opts.duration).await;
    let _ = change_tx.send(false);
    let change_phase = t1.elapsed();
    // Each change reaches every subscriber of its sender: K on average.
    let per_change = if live > 0 {
        subscribers_of.iter().sum::<u64>() as f64 / live as f64
    } else {
        0.0
    };
    let stats = ctx.stats.clone();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let expected = move || (stats.sent.load(Ordering::Relaxed) as f64 * per_change).round() as u64;
    let expected_now = expected.clone();
    let stats = ctx.stats.clone();
    wait_for(Instant::now() + Duration::from_secs(10), move || {
        stats.received.load(Ordering::Relaxed) >= expected_now()
    })
    .await;
    let measured = meter.finish();
    let _ = stop_tx.send(true);
    join_all(&mut set, Instant::now() + wait * 2).await;
    ctx.stats.sessions_up.store(0, Ordering::Relaxed);
    let mut r = report(ctx, "presence", n, change_phase, login_phase);
    let lost = expected().saturating_sub(r.received);
    if lost > 0 {
        r.errors.insert("presence-lost".to_owned(), lost);
    }
    r.measured = measured;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let msg = chat_message("b@example.test/r", 7, 123_456, 40);
        let text = String::from_utf8(msg).unwrap();
        assert!(text.starts_with("<message to='b@example.test/r' type='chat' id='ld-7-123456'>"));
        assert!(text.contains("<body>starling-load message 7 xxx"));
        assert_eq!(stamp_of("ld-7-123456"), Some(123_456));
        assert_eq!(stamp_of("ld-7"), None);
        assert_eq!(stamp_of("other-7-1"), None);
    }

    #[test]
    fn reads_roster_items() {
        let items = roster_items(
            "<iq type='result' id='roster1'><query xmlns='jabber:iq:roster' ver='1'>\
             <item jid='a@x' subscription='to'/><item subscription=\"both\" jid=\"b@x\" name='B'>\
             <group>G</group></item><item jid='c@x'/></query></iq>",
        );
        assert_eq!(
            items,
            vec![
                ("a@x".to_owned(), "to".to_owned()),
                ("b@x".to_owned(), "both".to_owned()),
                ("c@x".to_owned(), "none".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn pace_spreads_events() {
        let start = tokio::time::Instant::now();
        pace(start, 0, 1000.0).await;
        pace(start, 20, 1000.0).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
