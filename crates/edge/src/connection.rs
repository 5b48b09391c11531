//! One client connection: the task that owns the socket, reads, writes and runs the
//! negotiation [`Machine`], with the timers and limits of RFC 6120 §4.6 (keepalives, idle
//! peers) and §13.12 (rate and size limits).
//!
//! One task per connection does everything in one `select!` loop: reading, writing queued
//! stanzas, timers, shutdown. Nothing is buffered while the connection is idle: each read
//! borrows a stack buffer for the duration of one poll and hands the bytes to the framer
//! (which frees its own buffer when it holds no partial element); the output buffer is dropped
//! after every flush; the outbound queue allocates only while it holds stanzas.
//!
//! Timers (one sleep, set to the earliest deadline):
//! - pre-authentication: `preauth_timeout` after accept, the stream is closed with
//!   `policy-violation` (§4.9.3.14: a local policy, not a dead peer, so not
//!   `connection-timeout`), reason `Timeout`;
//! - idle: no byte read for `idle_timeout`: `connection-timeout` (§4.9.3.4), reason `Timeout`;
//! - keepalive: nothing written for `keepalive_interval` while a stream is open: one space
//!   (§4.6.1 whitespace keepalive).

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::limits::{ConnectionGuard, TokenBucket};
use crate::machine::{Action, BindOutcome, Machine, RegisterOutcome, StreamConfig};
use crate::metrics;
use crate::session::{SessionHandle, SessionTable};
use crate::settings::Settings;
use crate::tls::{Alpn, TlsManager};

/// Bytes read per poll, from a buffer that lives only on the stack of that poll.
const READ_CHUNK: usize = 8192;
/// How long a closing connection keeps reading (and discarding) input.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// How much input a closing connection discards at most.
const LINGER_BYTES: usize = 256 * 1024;

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
    Tls(Box<TlsStream<TcpStream>>),
    /// Between taking the TCP stream for STARTTLS and getting it back wrapped.
    Gone,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// Serves one accepted connection until it closes or the edge shuts down.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    cancel: CancellationToken,
    guard: ConnectionGuard,
) {
    let span = tracing::info_span!(
        "c2s",
        peer = %peer,
        listener = kind.label(),
        stream_id = tracing::field::Empty,
        jid = tracing::field::Empty,
    );
    metrics::connections(kind.label(), 1.0);
    serve(shared, tcp, peer, kind, cancel)
        .instrument(span)
        .await;
    metrics::connections(kind.label(), -1.0);
    drop(guard);
}

async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    cancel: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let preauth_deadline = started + shared.settings.preauth_timeout;
    let (io, direct_tls) = match kind {
        ListenerKind::StartTls => (Io::Plain(tcp), None),
        ListenerKind::DirectTls => {
            let handshake = handshake(&shared, tcp, Alpn::XmppClient, preauth_deadline, kind);
            let handshake = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                result = handshake => result,
            };
            match handshake {
                Some((tls, cb)) => (Io::Tls(tls), Some(cb)),
                None => return,
            }
        }
    };
    let machine = Machine::new(
        shared.cfg.clone(),
        crate::limits::canonical_ip(peer.ip()),
        direct_tls,
    );
    let framer = machine.framer();
    let burst = shared.settings.rate_burst_bytes;
    let mut conn = Conn {
        shared,
        io,
        framer,
        machine,
        out: Vec::new(),
        handle: None,
        bucket: TokenBucket::new(burst, started.into_std()),
        last_read: started,
        last_write: started,
        preauth_deadline,
        ended: None,
    };
    conn.run(cancel).await;
}

/// Runs a TLS handshake (boxed: the handshake's state is large and short-lived) within the
/// deadline. Failures are counted and logged, and the connection is dropped.
async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    alpn: Alpn,
    deadline: Instant,
    kind: ListenerKind,
) -> Option<(Box<TlsStream<TcpStream>>, ChannelBindingInfo)> {
    let acceptor = TlsAcceptor::from(shared.tls.server_config(alpn));
    let accept = Box::pin(acceptor.accept(tcp));
    match timeout_at(deadline, accept).await {
        Ok(Ok(stream)) => {
            let cb = shared.tls.channel_binding(stream.get_ref().1);
            Some((Box::new(stream), cb))
        }
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
}

impl Conn {
    async fn run(&mut self, cancel: CancellationToken) {
        loop {
            if let Flow::Stop = self.process_frames().await {
                break;
            }
            if !self.out.is_empty() && self.flush().await.is_err() {
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
                metrics::bytes_received(n);
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
        if self.machine.is_stream_open() && now >= self.last_write + settings.keepalive_interval {
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
                Action::Close(reason) => {
                    self.ended = Some(reason);
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
        let handle = Arc::new(SessionHandle::new(stream_id.clone()));
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
        let Some(handle) = &self.handle else {
            return Flow::Continue;
        };
        let (queue, close) = handle.take();
        if let Some(jid) = self.machine.bound_jid() {
            let count = queue.len();
            for item in queue {
                tracing::debug!(name = item.stanza.name(), "stanza out");
                if item.stamp_to {
                    item.stanza
                        .write_with_addresses(&mut self.out, Some(jid.as_str()), None);
                } else {
                    self.out.extend_from_slice(item.stanza.raw());
                }
            }
            metrics::stanzas_sent(count);
        }
        if let Some(close) = close {
            let action = self.machine.close_with(
                StreamError::new(close.condition),
                close.reason,
                &mut self.out,
            );
            return Box::pin(self.perform_rare(action)).await;
        }
        Flow::Continue
    }

    async fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        if out.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.shared.settings.write_timeout;
        let io = &mut self.io;
        let written = timeout_at(deadline, async {
            io.write_all(&out).await?;
            io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                metrics::bytes_sent(out.len());
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

    /// After the connection ended: the session leaves the table and the registry, stanzas
    /// still queued go back to the router, and the router hears why the session ended.
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
        shared.sessions.remove_if(&jid, &handle);
        metrics::sessions(-1.0);
        let (queue, close) = handle.take();
        if let Err(error) = shared.registry.unbind(&jid, &handle.stream_id).await {
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
        for item in queue {
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
    poll_fn(move |cx| {
        let mut buf = [0u8; 4096];
        let mut read = ReadBuf::new(&mut buf);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    })
}

/// Reads once into a buffer that exists only during the poll, and feeds the framer.
fn read_into<'a>(
    io: &'a mut Io,
    framer: &'a mut Framer,
) -> impl Future<Output = io::Result<usize>> + 'a {
    poll_fn(move |cx| {
        let mut buf = [0u8; READ_CHUNK];
        let mut read = ReadBuf::new(&mut buf);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        let filled = read.filled();
        framer.feed(filled);
        Poll::Ready(Ok(filled.len()))
    })
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
