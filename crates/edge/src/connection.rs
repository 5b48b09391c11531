//! One client connection: the task that owns the socket, reads, writes and runs the
//! negotiation [`Machine`], with the timers and limits of RFC 6120 §4.6 (keepalives, idle
//! peers) and §13.12 (rate and size limits).
//!
//! One task per connection does everything in one `select!` loop: reading, writing queued
//! stanzas, timers, shutdown. Nothing is buffered while the connection is idle:
//! - a plain-text read borrows a stack buffer for the duration of one poll; a TLS read borrows
//!   a buffer from the TLS pool and gives it back before the poll ends, unless a record is
//!   still incomplete ([`crate::tls::TlsStream`], rustls's unbuffered API). Either way the
//!   bytes go straight to the framer, which frees its own buffer when it holds no partial
//!   element;
//! - the output buffer is dropped after every flush, and TLS encrypts it record by record into
//!   a pooled buffer that goes back once written;
//! - the outbound queue allocates only while it holds stanzas.
//!
//! Timers (one sleep, set to the earliest deadline):
//! - pre-authentication: `preauth_timeout` after accept, the stream is closed with
//!   `policy-violation` (§4.9.3.14: a local policy, not a dead peer, so not
//!   `connection-timeout`), reason `Timeout`;
//! - idle: no byte read for `idle_timeout`: `connection-timeout` (§4.9.3.4), reason `Timeout`;
//! - keepalive: nothing written for `keepalive_interval` while a stream is open: one space
//!   (§4.6.1 whitespace keepalive);
//! - stream management (XEP-0198 §4): `<r/>` `sm_ack_every` after the last one while
//!   stanzas are unacknowledged.
//!
//! Stream management's session lifetime (XEP-0198 §5) is here too: when a resumable session's
//! connection is lost (no `</stream:stream>`), [`Conn::finish`] detaches the session into its
//! handle and spawns a waiter that ends it after `sm_max_resume_secs` unless a new connection
//! takes it over with `<resume/>`. A session that ends without resumption hands every
//! unacknowledged and queued stanza back to the router as `Undeliverable`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use starling_cluster::{EndReason, LinkError, RouterLink, ToRouter};
use starling_registry::{BindOutcome as RegistryBind, NodeId, SessionRecord, SessionRegistry};
use starling_sasl::{
    ChannelBindingInfo, CredentialsError, HashAlgo, SaslFailureReason, Step, derive_credentials,
    new_salt,
};
use starling_store::{BareUser, Store, StoreError};
use starling_xml::Framer;
use starling_xmpp::{
    FullJid, StanzaError, StanzaErrorCondition, StreamError, StreamErrorCondition,
};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::limits::{ConnectionGuard, TokenBucket};
use crate::machine::{Action, BindOutcome, Machine, RegisterOutcome, StreamConfig};
use crate::metrics;
use crate::session::{Detach, Drained, SessionHandle, SessionTable, TakeOver};
use crate::settings::Settings;
use crate::sm::{Outbound, ResumptionState};
use crate::tls::{Alpn, TlsManager, TlsStream};

/// Bytes read per poll, from a buffer that lives only on the stack of that poll.
const READ_CHUNK: usize = 8192;
/// How long a closing connection keeps reading (and discarding) input.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// How much input a closing connection discards at most.
const LINGER_BYTES: usize = 256 * 1024;

/// Connection ids, the owners of sessions (see `session`).
static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) cfg: Arc<StreamConfig>,
    pub(crate) settings: Settings,
    pub(crate) node: NodeId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<dyn SessionRegistry>,
    pub(crate) router: Arc<dyn RouterLink>,
    pub(crate) tls: Arc<TlsManager>,
    pub(crate) sessions: Arc<SessionTable>,
    /// Recently expired resumable sessions, so a late `<resume/>` learns its `h`.
    pub(crate) expired: crate::session::ExpiredSessions,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node)
            .field("domains", &self.cfg.domains)
            .finish_non_exhaustive()
    }
}

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// Plain text first, STARTTLS (RFC 6120 §5).
    StartTls,
    /// TLS first (XEP-0368).
    DirectTls,
}

impl ListenerKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            ListenerKind::StartTls => "starttls",
            ListenerKind::DirectTls => "direct_tls",
        }
    }
}

/// The transport under the stream: TCP, or TLS over TCP (boxed: rustls's state is large and
/// only TLS connections pay for it).
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
    /// Between taking the TCP stream for STARTTLS and getting it back wrapped.
    Gone,
}

impl Io {
    /// Reads once, handing the (decrypted) bytes to `sink`; 0 at the end of the stream. Plain
    /// TCP reads into a buffer that lives only on the stack of this poll; TLS borrows one from
    /// the pool (see `tls::TlsStream`).
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(tcp) => {
                let mut buf = [0u8; READ_CHUNK];
                let mut read = ReadBuf::new(&mut buf);
                ready!(Pin::new(tcp).poll_read(cx, &mut read))?;
                sink(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Io::Tls(tls) => tls.poll_read(cx, sink),
            Io::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    /// Writes all of `data` (encrypted on TLS).
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Io::Plain(tcp) => tcp.write_all(data).await,
            Io::Tls(tls) => tls.write_all(data).await,
            Io::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Whether TLS has ciphertext of its own waiting (a session ticket, a key update).
    fn has_pending_output(&self) -> bool {
        matches!(self, Io::Tls(tls) if tls.has_pending_output())
    }

    /// Writes what TLS has waiting.
    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Tls(tls) => tls.flush().await,
            Io::Plain(_) | Io::Gone => Ok(()),
        }
    }

    /// TLS `close_notify`, then TCP FIN.
    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(tcp) => tcp.shutdown().await,
            Io::Tls(tls) => tls.shutdown().await,
            Io::Gone => Ok(()),
        }
    }
}

/// The task of one accepted connection: serves it until it closes or the edge shuts down.
///
/// Everything the task keeps lives in one [`Conn`], built here before the future exists, so
/// the future holds each piece of state once (an `async fn` would also keep its arguments)
/// and awaits only `Conn`'s methods, whose own states are small or boxed.
pub(crate) fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    cancel: CancellationToken,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> + Send + 'static {
    let span = tracing::info_span!(
        "c2s",
        peer = %peer,
        listener = kind.label(),
        stream_id = tracing::field::Empty,
        jid = tracing::field::Empty,
    );
    metrics::connections(kind.label(), 1.0);
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let machine = Machine::new(
        shared.cfg.clone(),
        crate::limits::canonical_ip(peer.ip()),
        None,
    );
    let framer = machine.framer();
    let burst = shared.settings.rate_burst_bytes;
    let mut conn = Conn {
        preauth_deadline: started + shared.settings.preauth_timeout,
        shared,
        io: Io::Plain(tcp),
        framer,
        machine,
        out: Vec::new(),
        handle: None,
        bucket: TokenBucket::new(burst, started.into_std()),
        last_read: started,
        last_write: started,
        ended: None,
        id: CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
        cancel,
        _guard: guard,
        kind,
    };
    async move {
        conn.serve().await;
        metrics::connections(conn.kind.label(), -1.0);
    }
    .instrument(span)
}

/// Runs a TLS handshake (boxed: the handshake's state is large and short-lived) within the
/// deadline. Failures are counted and logged, and the connection is dropped.
async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    alpn: Alpn,
    deadline: Instant,
    kind: ListenerKind,
) -> Option<(Box<TlsStream>, ChannelBindingInfo)> {
    let accept = Box::pin(shared.tls.accept(tcp, alpn));
    match timeout_at(deadline, accept).await {
        Ok(Ok((stream, cb))) => Some((Box::new(stream), cb)),
        Ok(Err(error)) => {
            crate::tls::record_handshake_failure();
            tracing::info!(%error, listener = kind.label(), "TLS handshake failed");
            None
        }
        Err(_) => {
            crate::tls::record_handshake_failure();
            tracing::info!(listener = kind.label(), "TLS handshake timed out");
            None
        }
    }
}

/// Whether the loop goes on.
enum Flow {
    Continue,
    Stop,
}

enum Event {
    Shutdown,
    Outbox,
    Read(io::Result<usize>),
    Timer,
}

/// What to do with an action, decided without awaiting.
enum Next<'a> {
    Continue,
    /// The router's future for a stanza, and the stanza's bytes for an error reply.
    Send(
        Pin<Box<dyn Future<Output = Result<(), LinkError>> + Send + 'a>>,
        Option<bytes::Bytes>,
    ),
    /// Anything else, boxed: rare, and large.
    Rare(Box<Action>),
}

fn next(shared: &Shared, action: Action) -> Next<'_> {
    match action {
        Action::Continue => Next::Continue,
        Action::Route(msg) => {
            let raw = match &msg {
                ToRouter::Stanza { stanza, .. } => Some(stanza.raw().clone()),
                _ => None,
            };
            Next::Send(shared.router.send(msg), raw)
        }
        other => Next::Rare(Box::new(other)),
    }
}

struct Conn {
    shared: Arc<Shared>,
    io: Io,
    framer: Framer,
    machine: Machine,
    out: Vec<u8>,
    /// Set once a resource is bound.
    handle: Option<Arc<SessionHandle>>,
    bucket: TokenBucket,
    last_read: Instant,
    last_write: Instant,
    preauth_deadline: Instant,
    /// Why the connection ended, once it has.
    ended: Option<EndReason>,
    /// This connection's id: the owner of the session it holds.
    id: u64,
    /// The edge's shutdown.
    cancel: CancellationToken,
    /// This connection's place in the per-address count, released with the connection.
    _guard: ConnectionGuard,
    kind: ListenerKind,
}

impl Conn {
    /// Direct TLS (XEP-0368) starts with the handshake; then the stream.
    async fn serve(&mut self) {
        if self.kind == ListenerKind::DirectTls {
            let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
                return;
            };
            let cancel = self.cancel.clone();
            let handshake = handshake(
                &self.shared,
                tcp,
                Alpn::XmppClient,
                self.preauth_deadline,
                self.kind,
            );
            let handshake = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                result = handshake => result,
            };
            let Some((tls, cb)) = handshake else {
                return;
            };
            self.io = Io::Tls(tls);
            self.machine.tls_established(cb);
        }
        self.run().await;
    }

    async fn run(&mut self) {
        let cancel = self.cancel.clone();
        loop {
            if let Flow::Stop = self.process_frames().await {
                break;
            }
            if (!self.out.is_empty() || self.io.has_pending_output()) && self.flush().await.is_err()
            {
                self.ended = Some(EndReason::ConnectionLost);
                break;
            }
            let deadline = self.next_deadline();
            let handle = self.handle.as_deref();
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => Event::Shutdown,
                _ = wait_outbox(handle) => Event::Outbox,
                read = read_into(&mut self.io, &mut self.framer) => Event::Read(read),
                _ = tokio::time::sleep_until(deadline) => Event::Timer,
            };
            let flow = match event {
                Event::Shutdown => {
                    let action = self.machine.close_with(
                        StreamError::new(StreamErrorCondition::SystemShutdown),
                        EndReason::Shutdown,
                        &mut self.out,
                    );
                    Box::pin(self.perform_rare(action)).await
                }
                Event::Outbox => self.drain_outbox().await,
                Event::Read(read) => self.on_read(read).await,
                Event::Timer => self.on_timer().await,
            };
            if let Flow::Stop = flow {
                break;
            }
        }
        Box::pin(self.finish()).await;
    }

    fn next_deadline(&self) -> Instant {
        let settings = &self.shared.settings;
        let mut deadline = self.last_read + settings.idle_timeout;
        if !self.machine.is_authenticated() {
            deadline = deadline.min(self.preauth_deadline);
        }
        if self.machine.is_stream_open() {
            deadline = deadline.min(self.last_write + settings.keepalive_interval);
        }
        if let Some(sm) = self.machine.sm_deadline() {
            deadline = deadline.min(Instant::from_std(sm));
        }
        deadline
    }

    async fn on_read(&mut self, read: io::Result<usize>) -> Flow {
        match read {
            Ok(0) | Err(_) => {
                // The connection dropped without `</stream:stream>`.
                self.ended = Some(EndReason::ConnectionLost);
                Flow::Stop
            }
            Ok(n) => {
                self.shared.cfg.hot.bytes_received.increment(n as u64);
                let now = Instant::now();
                self.last_read = now;
                let settings = &self.shared.settings;
                let (rate, burst) = (settings.rate_bytes_per_sec, settings.rate_burst_bytes);
                if !self.bucket.take(n, rate, burst, now.into_std()) {
                    metrics::limit_violation("rate");
                    tracing::info!(rate, burst, "read rate limit exceeded");
                    let action = self.machine.close_with(
                        StreamError::new(StreamErrorCondition::PolicyViolation)
                            .with_text("rate limit exceeded"),
                        EndReason::StreamError(StreamErrorCondition::PolicyViolation),
                        &mut self.out,
                    );
                    return Box::pin(self.perform_rare(action)).await;
                }
                Flow::Continue
            }
        }
    }

    async fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        let settings = &self.shared.settings;
        if !self.machine.is_authenticated() && now >= self.preauth_deadline {
            metrics::limit_violation("preauth_timeout");
            tracing::info!("not authenticated in time");
            let action = self.machine.close_with(
                StreamError::new(StreamErrorCondition::PolicyViolation)
                    .with_text("authentication took too long"),
                EndReason::Timeout,
                &mut self.out,
            );
            return Box::pin(self.perform_rare(action)).await;
        }
        if now >= self.last_read + settings.idle_timeout {
            tracing::info!("idle timeout");
            let action = self.machine.close_with(
                StreamError::new(StreamErrorCondition::ConnectionTimeout),
                EndReason::Timeout,
                &mut self.out,
            );
            return Box::pin(self.perform_rare(action)).await;
        }
        self.machine.on_sm_timer(now.into_std(), &mut self.out);
        if self.out.is_empty()
            && self.machine.is_stream_open()
            && now >= self.last_write + settings.keepalive_interval
        {
            self.out.push(b' ');
        }
        Flow::Continue
    }

    /// Feeds every complete frame to the machine and carries out what it asks.
    async fn process_frames(&mut self) -> Flow {
        loop {
            let action = match self.framer.next_frame() {
                Ok(Some(frame)) => {
                    let header = matches!(frame, starling_xml::Frame::StreamOpen(_));
                    let action =
                        self.machine
                            .on_frame(frame, std::time::Instant::now(), &mut self.out);
                    if header {
                        let id = self.machine.stream_id();
                        Span::current().record("stream_id", tracing::field::display(id));
                    }
                    action
                }
                Ok(None) => return Flow::Continue,
                Err(error) => {
                    tracing::info!(%error, "stream refused by the framer");
                    self.machine.on_frame_error(&error, &mut self.out)
                }
            };
            // Only `Next` (small) and the router's boxed future live across the awaits below.
            let shared = self.shared.clone();
            match next(&shared, action) {
                Next::Continue => {}
                Next::Send(send, raw) => {
                    if let Err(error) = send.await {
                        self.route_failed(error, raw);
                    }
                }
                Next::Rare(action) => {
                    if let Flow::Stop = Box::pin(self.perform_rare(*action)).await {
                        return Flow::Stop;
                    }
                }
            }
        }
    }

    /// Sends a stanza to the router. Written so that only the router's boxed future and the
    /// stanza's bytes live across the await: this runs inside every connection's task, whose
    /// size every idle session pays.
    async fn route(&mut self, msg: ToRouter) {
        let raw = match &msg {
            ToRouter::Stanza { stanza, .. } => Some(stanza.raw().clone()),
            _ => None,
        };
        let router = self.shared.router.clone();
        let sent = router.send(msg).await;
        if let Err(error) = sent {
            self.route_failed(error, raw);
        }
    }

    /// The router refused a stanza: the sender gets an error for it (RFC 6120 §8.3).
    fn route_failed(&mut self, error: LinkError, raw: Option<bytes::Bytes>) {
        tracing::warn!(%error, "router did not take a stanza");
        let condition = match error {
            LinkError::Overloaded => StanzaErrorCondition::ResourceConstraint,
            LinkError::Closed => StanzaErrorCondition::ServiceUnavailable,
        };
        let stanza = raw.and_then(|raw| {
            starling_xml::Element::parse(raw, starling_xmpp::ns::JABBER_CLIENT).ok()
        });
        if let Some(stanza) = stanza {
            self.machine
                .bounce(&stanza, StanzaError::new(condition), &mut self.out);
        }
    }

    /// Carries out an action other than routing, and those that follow from it. Called boxed
    /// (`Box::pin(self.perform_rare(..))`): negotiation and closing are rare, and their state
    /// would otherwise weigh on every idle connection's task.
    async fn perform_rare(&mut self, mut action: Action) -> Flow {
        loop {
            let now = std::time::Instant::now();
            action = match action {
                Action::Continue => return Flow::Continue,
                Action::StartTls => return self.start_tls().await,
                Action::Restart => {
                    self.framer.reset();
                    return Flow::Continue;
                }
                Action::LookupCredentials { user, hash } => {
                    let found = lookup(&*self.shared.store, &user, hash).await;
                    self.machine.on_credentials(found, now, &mut self.out)
                }
                Action::VerifyPlain { need, credentials } => {
                    let step =
                        tokio::task::spawn_blocking(move || need.with_credentials(credentials))
                            .await
                            .unwrap_or(Step::Failure {
                                reason: SaslFailureReason::TemporaryAuthFailure,
                                detail: "verification task failed",
                            });
                    self.machine.on_sasl_step(step, now, &mut self.out)
                }
                Action::Register { user, password } => {
                    let outcome = register(&self.shared, user, password).await;
                    self.machine.on_registered(outcome, &mut self.out)
                }
                Action::Bind { jid } => {
                    let outcome = self.bind(jid).await;
                    let bound = outcome == BindOutcome::Bound;
                    let next = self.machine.on_bind(outcome, &mut self.out);
                    if bound && let Some(jid) = self.machine.bound_jid() {
                        let msg = ToRouter::SessionStarted { jid: jid.clone() };
                        if let Err(error) = self.shared.router.send(msg).await {
                            tracing::warn!(%error, "router did not take SessionStarted");
                        }
                    }
                    next
                }
                Action::Route(msg) => {
                    self.route(msg).await;
                    Action::Continue
                }
                Action::RecordResumption { jid, stream_id, id } => {
                    let recorded = self
                        .shared
                        .registry
                        .set_resumption(&jid, &stream_id, Some(id))
                        .await;
                    let recorded = match recorded {
                        Ok(matched) => matched,
                        Err(error) => {
                            tracing::warn!(%error, "recording the resumption id failed");
                            false
                        }
                    };
                    self.machine.on_resumption_recorded(recorded, &mut self.out)
                }
                Action::Resume { account, previd } => {
                    let found = self.resume(&account, &previd).await;
                    let found = match found {
                        Ok((state, handle)) => {
                            Span::current().record("jid", tracing::field::display(&state.jid));
                            self.handle = Some(handle);
                            Ok(state)
                        }
                        Err(h) => Err(h),
                    };
                    let action = self.machine.on_resume(found, now, &mut self.out);
                    if let Some(handle) = &self.handle {
                        // Whatever was delivered during the takeover.
                        handle.wake();
                    }
                    action
                }
                Action::Close(reason) => {
                    self.ended = Some(reason);
                    self.hand_over_early();
                    self.close().await;
                    return Flow::Stop;
                }
            };
        }
    }

    async fn start_tls(&mut self) -> Flow {
        if self.flush().await.is_err() {
            self.ended = Some(EndReason::ConnectionLost);
            return Flow::Stop;
        }
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            self.ended = Some(EndReason::ConnectionLost);
            return Flow::Stop;
        };
        let deadline = self.preauth_deadline;
        match handshake(
            &self.shared,
            tcp,
            Alpn::None,
            deadline,
            ListenerKind::StartTls,
        )
        .await
        {
            Some((tls, cb)) => {
                self.io = Io::Tls(tls);
                // RFC 6120 §5.4.3.3: nothing received before TLS is kept.
                self.framer = self.machine.framer();
                self.machine.tls_established(cb);
                Flow::Continue
            }
            None => {
                self.ended = Some(EndReason::ConnectionLost);
                Flow::Stop
            }
        }
    }

    /// Binds in the session table first (so deliveries that follow the registry write find
    /// the session), then in the registry; undoes the table change if the registry refuses.
    async fn bind(&mut self, jid: FullJid) -> BindOutcome {
        let shared = self.shared.clone();
        let stream_id = self.machine.stream_id().clone();
        let handle = Arc::new(SessionHandle::new(stream_id.clone(), self.id));
        let previous = shared.sessions.insert(jid.clone(), handle.clone());
        let record = SessionRecord::new(jid.clone(), shared.node.clone(), stream_id);
        match shared.registry.bind(record).await {
            Ok(outcome) => {
                let replaced = previous.is_some() || matches!(outcome, RegistryBind::Replaced(_));
                if let Some(previous) = previous {
                    // RFC 6120 §7.7.2.2: the new session wins; the old one gets <conflict/>.
                    previous.close(StreamErrorCondition::Conflict, EndReason::Replaced);
                }
                if let RegistryBind::Replaced(old) = &outcome
                    && old.node != shared.node
                {
                    // No edge-to-edge path yet: the router learns of the replacement below
                    // and is the one that can reach the other edge.
                    tracing::warn!(
                        %jid,
                        node = %old.node,
                        "resource was bound on another edge; that session is not closed from here"
                    );
                }
                if replaced {
                    // Sent before SessionStarted, so the router never sees the new session
                    // end. The replaced connection itself stays silent about it.
                    let msg = ToRouter::SessionEnded {
                        jid: jid.clone(),
                        reason: EndReason::Replaced,
                    };
                    if let Err(error) = shared.router.send(msg).await {
                        tracing::warn!(%error, "router did not take SessionEnded");
                    }
                }
                metrics::sessions(1.0);
                Span::current().record("jid", tracing::field::display(&jid));
                tracing::info!(%jid, "resource bound");
                self.handle = Some(handle);
                BindOutcome::Bound
            }
            Err(error) => {
                tracing::info!(%error, %jid, "bind refused");
                match previous {
                    Some(previous) => {
                        shared.sessions.insert(jid, previous);
                    }
                    None => {
                        shared.sessions.remove_if(&jid, &handle);
                    }
                }
                BindOutcome::Failed(error)
            }
        }
    }

    /// Writes what the router queued for this session, then closes if asked to.
    async fn drain_outbox(&mut self) -> Flow {
        // Written without awaiting, so no stanza is held across an await of this task.
        match self.write_outbox() {
            Some(action) => Box::pin(self.perform_rare(action)).await,
            None => Flow::Continue,
        }
    }

    /// Takes the outbox and writes its stanzas into the output buffer; returns the close to
    /// carry out when the session must end.
    fn write_outbox(&mut self) -> Option<Action> {
        let handle = self.handle.clone()?;
        let drained = handle.take();
        if drained.handover {
            // XEP-0198 §5: the session was resumed on another connection.
            tracing::info!("session resumed elsewhere: closing this stream");
            return Some(self.machine.close_with(
                StreamError::new(StreamErrorCondition::Conflict),
                EndReason::Replaced,
                &mut self.out,
            ));
        }
        let now = std::time::Instant::now();
        let mut queue = drained.queue.into_iter();
        let mut sent: u64 = 0;
        while self.machine.bound_jid().is_some() && !self.machine.is_closed() {
            let Some(item) = queue.next() else { break };
            tracing::debug!(name = item.stanza.name(), "stanza out");
            sent += 1;
            let action = self.machine.on_outbound(item, now, &mut self.out);
            if let Action::Close(_) = action {
                handle.requeue_front(queue);
                self.shared.cfg.hot.stanzas_sent.increment(sent);
                return Some(action);
            }
        }
        self.shared.cfg.hot.stanzas_sent.increment(sent);
        // Not written (the stream is not open for them): back, for the router at the end.
        handle.requeue_front(queue);
        drained.close.map(|close| {
            self.machine.close_with(
                StreamError::new(close.condition),
                close.reason,
                &mut self.out,
            )
        })
    }

    async fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        if out.is_empty() && !self.io.has_pending_output() {
            return Ok(());
        }
        let deadline = Instant::now() + self.shared.settings.write_timeout;
        let io = &mut self.io;
        let written = timeout_at(deadline, async {
            io.flush().await?;
            io.write_all(&out).await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.shared.cfg.hot.bytes_sent.increment(out.len() as u64);
                self.last_write = Instant::now();
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => {
                tracing::info!("write timed out");
                Err(io::ErrorKind::TimedOut.into())
            }
        }
    }

    /// Flushes the last bytes and shuts the transport down (TLS close_notify, TCP FIN), then
    /// briefly reads and discards what the client still sends: closing a socket with unread
    /// input makes the kernel send a reset, which can destroy the error just written before
    /// the client reads it.
    async fn close(&mut self) {
        if self.flush().await.is_err() {
            return;
        }
        let deadline = Instant::now() + self.shared.settings.write_timeout;
        if !matches!(timeout_at(deadline, self.io.shutdown()).await, Ok(Ok(()))) {
            return;
        }
        let linger = Instant::now() + LINGER;
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            match timeout_at(linger, discard(&mut self.io)).await {
                Ok(Ok(n)) if n > 0 => discarded += n,
                _ => break,
            }
        }
    }

    /// After the connection ended: a resumable session whose connection was lost is
    /// detached (XEP-0198 §5); a session resumed elsewhere is handed over; any other leaves
    /// the table and the registry, its unacknowledged and queued stanzas go back to the
    /// router, and the router hears why it ended.
    async fn finish(&mut self) {
        let reason = self.ended.take().unwrap_or(EndReason::ConnectionLost);
        if let EndReason::StreamError(condition) = &reason {
            tracing::info!(
                condition = condition.as_str(),
                "stream closed with an error"
            );
        } else {
            tracing::debug!(?reason, "connection ended");
        }
        let (Some(handle), Some(jid)) = (self.handle.take(), self.machine.bound_jid().cloned())
        else {
            return;
        };
        let shared = self.shared.clone();
        let sm = self.machine.take_sm();
        let lost = matches!(reason, EndReason::ConnectionLost | EndReason::Timeout);
        let mut held = VecDeque::new();
        if let Some(sm) = sm {
            match sm.into_resumption(jid.clone()) {
                Ok(state) if !handle.is_owner(self.id) => {
                    // Resumed on another connection, which waits for this state.
                    match handle.hand_over(state) {
                        None => {
                            metrics::sessions(-1.0);
                            tracing::debug!("session handed over");
                            return;
                        }
                        Some(state) => held.extend(state.into_stanzas()),
                    }
                }
                Ok(state) if lost => match handle.detach(self.id, state) {
                    Detach::Detached => {
                        metrics::sessions(-1.0);
                        tracing::info!(%jid, "connection lost: session kept for resumption");
                        let deadline = Instant::now()
                            + std::time::Duration::from_secs(u64::from(
                                shared.settings.sm_max_resume_secs,
                            ));
                        let span = Span::current();
                        tokio::spawn(
                            wait_detached(
                                shared,
                                handle,
                                jid,
                                self.id,
                                deadline,
                                self.cancel.clone(),
                            )
                            .instrument(span),
                        );
                        return;
                    }
                    Detach::HandedOver => {
                        metrics::sessions(-1.0);
                        return;
                    }
                    Detach::End(state) => held.extend(state.into_stanzas()),
                },
                Ok(state) => held.extend(state.into_stanzas()),
                Err(mut sm) => held.extend(sm.take_unacked()),
            }
        }
        metrics::sessions(-1.0);
        end_session(&shared, &jid, &handle, reason, held).await;
    }

    /// A connection closing because its session was resumed elsewhere hands the session over
    /// before the close's linger, so the resuming client does not wait for it. If the
    /// resuming connection is gone, the state stays here for [`Conn::finish`].
    fn hand_over_early(&mut self) {
        let Some(handle) = self.handle.clone() else {
            return;
        };
        if handle.is_owner(self.id) {
            return;
        }
        let (Some(jid), Some(sm)) = (self.machine.bound_jid().cloned(), self.machine.take_sm())
        else {
            return;
        };
        match sm.into_resumption(jid) {
            Ok(state) => match handle.hand_over(state) {
                None => {
                    self.handle = None;
                    metrics::sessions(-1.0);
                    tracing::debug!("session handed over");
                }
                Some(state) => {
                    // The resuming connection is gone: the session stays here, with the
                    // presences CSI still held, so `finish` hands them on with the rest.
                    let (mut sm, pending) =
                        crate::sm::Sm::from_resumption(state, std::time::Instant::now());
                    if !pending.is_empty() {
                        sm.held = Some(Box::new(pending));
                    }
                    self.machine.restore_sm(sm);
                }
            },
            Err(sm) => self.machine.restore_sm(sm),
        }
    }

    /// `<resume/>` (XEP-0198 §5): finds the session through the registry (by account and
    /// id), checks it is held here, and takes it over. `Err` carries the `h` to report.
    async fn resume(
        &mut self,
        account: &starling_xmpp::BareJid,
        previd: &str,
    ) -> Result<(ResumptionState, Arc<SessionHandle>), Option<u32>> {
        let shared = self.shared.clone();
        let record = match shared.registry.session_by_resumption(account, previd).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                metrics::sm_resumption("not_found");
                tracing::info!(%account, "resumption id unknown or expired");
                return Err(shared.expired.h(account, previd));
            }
            Err(error) => {
                metrics::sm_resumption("error");
                tracing::warn!(%error, "resumption lookup failed");
                return Err(None);
            }
        };
        let handle = shared
            .sessions
            .get(&record.jid)
            .filter(|h| record.node == shared.node && h.stream_id == record.stream_id);
        let Some(handle) = handle else {
            // Held by another edge (not supported yet) or already gone.
            metrics::sm_resumption("not_found");
            tracing::info!(jid = %record.jid, node = %record.node, "session to resume is not here");
            return Err(None);
        };
        if record.jid.to_bare() != *account {
            metrics::sm_resumption("not_found");
            return Err(None);
        }
        let mut state = match handle.take_over(self.id) {
            TakeOver::Detached(state) => {
                metrics::sm_resumption("resumed");
                state
            }
            TakeOver::Live(rx) => {
                let deadline = Instant::now() + shared.settings.write_timeout;
                match timeout_at(deadline, rx).await {
                    Ok(Ok(state)) => {
                        metrics::sm_resumption("took_over");
                        state
                    }
                    _ => {
                        metrics::sm_resumption("error");
                        tracing::warn!("the old connection did not hand the session over");
                        return Err(None);
                    }
                }
            }
            TakeOver::Gone => {
                metrics::sm_resumption("not_found");
                return Err(None);
            }
        };
        if *state.id != *previd {
            // The registry and the session disagree; nothing to resume safely. The state
            // goes back to the router rather than vanishing.
            metrics::sm_resumption("error");
            let held = state.into_stanzas().collect();
            end_session(&shared, &record.jid, &handle, EndReason::Timeout, held).await;
            return Err(None);
        }
        // Stanzas delivered while the takeover ran.
        let Drained { queue, .. } = handle.take();
        state.pending.extend(queue);
        metrics::sessions(1.0);
        Ok((state, handle))
    }
}

/// Keeps a detached session (XEP-0198 §5) until `deadline`, a takeover, an overflow or
/// shutdown; if it is not resumed, it ends: every held stanza goes back to the router.
async fn wait_detached(
    shared: Arc<Shared>,
    handle: Arc<SessionHandle>,
    jid: FullJid,
    owner: u64,
    deadline: Instant,
    cancel: CancellationToken,
) {
    let reason = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break EndReason::Shutdown,
            _ = handle.notified() => match handle.detached_should_end(owner) {
                // Resumed: pass on the wake-up this task consumed.
                None => {
                    handle.wake();
                    return;
                }
                Some(Some(reason)) => break reason,
                Some(None) => {}
            },
            _ = tokio::time::sleep_until(deadline) => break EndReason::Timeout,
        }
    };
    let Some((state, queue)) = handle.end_detached(owner) else {
        handle.wake();
        return;
    };
    metrics::sm_resumption("expired");
    tracing::info!(%jid, ?reason, "detached session ended without resumption");
    shared.expired.record(&state.id, &jid, state.inbound);
    let held = state.into_stanzas().chain(queue).collect();
    end_session(&shared, &jid, &handle, reason, held).await;
}

/// The end of a session: it leaves the table and the registry, the router hears why (unless
/// it was replaced by a new bind, which the router already knows), then every stanza the
/// session held (unacknowledged, then queued) goes back as `Undeliverable`, so the router can
/// bounce, redirect or store it (XEP-0198 §5, RFC 6121 §8).
async fn end_session(
    shared: &Shared,
    jid: &FullJid,
    handle: &Arc<SessionHandle>,
    reason: EndReason,
    mut held: VecDeque<Outbound>,
) {
    shared.sessions.remove_if(jid, handle);
    let (queue, close) = handle.close_out();
    held.extend(queue);
    if let Err(error) = shared.registry.unbind(jid, &handle.stream_id).await {
        tracing::warn!(%error, %jid, "registry unbind failed");
    }
    let replaced = matches!(
        close,
        Some(crate::session::CloseRequest {
            reason: EndReason::Replaced,
            ..
        })
    ) || reason == EndReason::Replaced;
    if !replaced {
        let msg = ToRouter::SessionEnded {
            jid: jid.clone(),
            reason,
        };
        if let Err(error) = shared.router.send(msg).await {
            tracing::warn!(%error, "router did not take SessionEnded");
        }
    }
    let mut dropped = 0;
    for item in held {
        metrics::undeliverable();
        let msg = ToRouter::Undeliverable {
            recipient: jid.clone(),
            stanza: item.stanza,
        };
        if shared.router.send(msg).await.is_err() {
            dropped += 1;
        }
    }
    if dropped > 0 {
        metrics::dropped_on_close(dropped);
        tracing::warn!(dropped, "queued stanzas lost: the router is gone");
    }
}

/// Waits for the session's outbox, or forever before a resource is bound.
async fn wait_outbox(handle: Option<&SessionHandle>) {
    match handle {
        Some(handle) => handle.notified().await,
        None => std::future::pending().await,
    }
}

/// Reads once and throws the bytes away.
fn discard(io: &mut Io) -> impl Future<Output = io::Result<usize>> + '_ {
    poll_fn(move |cx| io.poll_read(cx, &mut |_| {}))
}

/// Reads once and feeds the framer; no buffer outlives the poll (see [`Io::poll_read`]).
fn read_into<'a>(
    io: &'a mut Io,
    framer: &'a mut Framer,
) -> impl Future<Output = io::Result<usize>> + 'a {
    poll_fn(move |cx| io.poll_read(cx, &mut |bytes| framer.feed(bytes)))
}

async fn lookup(
    store: &dyn Store,
    user: &BareUser,
    hash: HashAlgo,
) -> Result<Option<starling_sasl::ScramCredentials>, StoreError> {
    store.credentials(user, hash).await
}

/// Derives credentials for every hash (PBKDF2, on a blocking thread) and creates the account.
async fn register(shared: &Shared, user: BareUser, password: String) -> RegisterOutcome {
    let iterations = shared.cfg.auth.scram_iterations;
    let derived = tokio::task::spawn_blocking(move || {
        HashAlgo::ALL
            .into_iter()
            .map(|hash| {
                let salt = new_salt()?;
                derive_credentials(hash, &password, &salt, iterations)
            })
            .collect::<Result<Vec<_>, CredentialsError>>()
    })
    .await;
    let credentials = match derived {
        Ok(Ok(credentials)) => credentials,
        Ok(Err(CredentialsError::InvalidPassword)) => return RegisterOutcome::InvalidPassword,
        Ok(Err(error)) => {
            tracing::warn!(%error, "deriving credentials failed");
            return RegisterOutcome::Failed;
        }
        Err(error) => {
            tracing::warn!(%error, "credentials task failed");
            return RegisterOutcome::Failed;
        }
    };
    match shared.store.create(&user, credentials).await {
        Ok(()) => {
            tracing::info!(%user, "account registered in-band");
            RegisterOutcome::Created
        }
        Err(StoreError::Conflict) => RegisterOutcome::Conflict,
        Err(error) => {
            tracing::warn!(%error, "creating the account failed");
            RegisterOutcome::Failed
        }
    }
}

/// Refuses a connection over the per-address limit without reading from it. On a STARTTLS
/// listener a stream header, `<policy-violation/>` and the close are written in one
/// non-blocking write (they fit any socket buffer), so a client sees why; on a direct-TLS
/// listener the connection is just closed, since answering would cost a handshake.
pub(crate) fn refuse(tcp: TcpStream, kind: ListenerKind, domain: Option<&str>, ip: IpAddr) {
    metrics::limit_violation("connections_per_ip");
    tracing::info!(%ip, listener = kind.label(), "too many connections from this address");
    if kind == ListenerKind::StartTls {
        let mut out = Vec::with_capacity(320);
        starling_xml::writer::write_stream_open(
            &mut out,
            &starling_xml::writer::StreamOpen {
                content_ns: starling_xmpp::ns::JABBER_CLIENT,
                from: domain,
                id: Some(&crate::machine::random_id()),
                lang: Some("en"),
                ..Default::default()
            },
        );
        StreamError::new(StreamErrorCondition::PolicyViolation)
            .with_text("too many connections from your address")
            .write_xml(&mut out);
        starling_xml::writer::write_stream_close(&mut out);
        metrics::stream_error("policy-violation");
        let _ = tcp.try_write(&out);
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    //! Builds a connection future without running it, for the size test.

    use super::*;

    /// The future of one connection task, as spawned.
    pub(crate) fn connection_future(
        shared: Arc<Shared>,
        tcp: TcpStream,
        peer: SocketAddr,
        guard: ConnectionGuard,
    ) -> impl Future<Output = ()> {
        run(
            shared,
            tcp,
            peer,
            ListenerKind::StartTls,
            CancellationToken::new(),
            guard,
        )
    }
}
