//! A TLS server stream over a plain [`TcpStream`], on rustls's unbuffered API, that holds no
//! buffer while the connection is idle.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB incoming buffer for the life of every
//! connection; [`UnbufferedServerConnection`] leaves buffering to the caller. Here:
//!
//! - **reading** waits for the socket to become readable, then borrows a buffer from
//!   [`super::pool`], reads, and lets rustls decrypt in it; each record's plaintext goes
//!   straight to the caller's sink (the framer, which keeps only a partial element). The
//!   buffer goes back to the pool at once, unless a record is still incomplete: then the
//!   connection keeps it until the rest arrives.
//! - **writing** encrypts at most one record's worth of plaintext (16 KiB) at a time into a
//!   borrowed buffer and writes it; the buffer is kept only while the socket does not take
//!   everything, so memory per connection stays within one record however much is written.
//! - **closing** sends `close_notify`, then shuts the TCP write side (as tokio-rustls did).
//! - what rustls must send on its own (the handshake flights, TLS 1.3 session tickets, a
//!   `KeyUpdate` answer, a fatal alert) is encoded into the same outgoing buffer and written
//!   in order before anything else.
//!
//! Every buffer is bounded: one record (pool buffers), or while a handshake message that spans
//! records is joined, rustls's own limit on handshake messages (64 KiB) plus a record.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::capture::{self, Captured};
use super::pool;

/// Plaintext encrypted per record: the TLS maximum fragment (RFC 8446 §5.1), whose record
/// always fits a pool buffer.
const MAX_PLAINTEXT: usize = 16 * 1024;

/// The most ciphertext held for one incoming message: rustls refuses handshake messages over
/// 64 KiB, and joins one that spans records in place, so the whole of it stays in the buffer.
const MAX_INCOMING: usize = 0x1_0000 + pool::BUF_LEN;

/// The most ciphertext rustls may ask to encode at once (a handshake flight record).
const MAX_OUTGOING: usize = MAX_INCOMING;

/// Where a round of [`TlsStream::process`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The handshake waits for more bytes from the peer.
    NeedInput,
    /// Nothing left to do until more bytes arrive or the caller sends.
    Ready,
    /// Both sides sent `close_notify`.
    Closed,
}

/// What to encrypt when rustls is ready for application data.
#[derive(Clone, Copy)]
enum Emit<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// A server-side TLS stream (see the module documentation).
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read but not yet processed: only part of a record (or of a handshake
    /// message). `None` whenever everything read was processed.
    incoming: Option<Vec<u8>>,
    /// Ciphertext not yet written, from `written` on. `None` when everything was written.
    outgoing: Option<Vec<u8>>,
    written: usize,
    /// Plaintext decrypted while no reader was there to take it (a record that came with the
    /// handshake's last flight); the next read delivers it first.
    unread: Vec<u8>,
    /// The peer's `close_notify` was received.
    peer_closed: bool,
    /// Our `close_notify` was queued.
    close_sent: bool,
    /// The end of the stream was reported to the reader.
    eof: bool,
    /// A TLS error ended the connection: rustls is not called again.
    broken: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("version", &self.conn.protocol_version())
            .field("incoming", &self.incoming.as_ref().map(Vec::len))
            .field("outgoing", &self.outgoing.as_ref().map(Vec::len))
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

fn invalid(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "the TLS connection failed")
}

/// Runs `encode` (a rustls encoder that fails with the size it needs) into the spare capacity
/// of `out`, growing it up to `MAX_OUTGOING` if that is too small.
fn encode_into<E>(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needed: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    loop {
        let room = out.capacity() - start;
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(error) => {
                out.truncate(start);
                match needed(&error) {
                    Some(size) if size > room && start + size <= MAX_OUTGOING => {
                        out.reserve(size);
                    }
                    _ => return Err(error),
                }
            }
        }
    }
}

impl TlsStream {
    /// Runs the server side of a handshake on `tcp`. On success the stream is established and
    /// `Captured` holds what channel binding needs. The caller bounds it in time. On failure
    /// the alert rustls chose is sent (best effort) before the error is returned.
    pub(super) async fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
    ) -> io::Result<(TlsStream, Captured)> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: None,
            outgoing: None,
            written: 0,
            unread: Vec::new(),
            peer_closed: false,
            close_sent: false,
            eof: false,
            broken: false,
        };
        let mut captured = Captured::default();
        loop {
            let mut unread = std::mem::take(&mut stream.unread);
            let round = capture::during(&mut captured, || {
                stream.process(Emit::Nothing, &mut |plain| unread.extend_from_slice(plain))
            });
            stream.unread = unread;
            let progress = match round {
                Ok((progress, _)) => progress,
                Err(error) => return Err(stream.fail(error)),
            };
            stream.send().await?;
            if !stream.conn.is_handshaking() {
                break;
            }
            if progress == Progress::Closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            stream.read_more().await?;
        }
        stream.release_incoming();
        Ok((stream, captured))
    }

    /// The negotiated protocol version.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The negotiated cipher suite.
    pub fn negotiated_cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.conn.negotiated_cipher_suite()
    }

    /// Whether ciphertext waits to be written ([`TlsStream::flush`] writes it).
    pub fn has_pending_output(&self) -> bool {
        self.outgoing.is_some()
    }

    /// Whether the connection holds a buffer now (an incomplete record, unwritten ciphertext
    /// or undelivered plaintext). An idle connection holds none.
    pub fn holds_buffers(&self) -> bool {
        self.incoming.is_some() || self.outgoing.is_some() || self.unread.capacity() > 0
    }

    /// Reads and decrypts what the socket has, handing each record's plaintext to `sink`.
    /// Ready with the number of plaintext bytes handed over, or 0 at the end of the stream
    /// (the peer's `close_notify`, or TCP end of file).
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Poll<io::Result<usize>> {
        if !self.unread.is_empty() {
            let unread = std::mem::take(&mut self.unread);
            sink(&unread);
            return Poll::Ready(Ok(unread.len()));
        }
        if self.eof {
            return Poll::Ready(Ok(0));
        }
        if self.broken {
            return Poll::Ready(Err(broken()));
        }
        loop {
            let delivered = match self.process(Emit::Nothing, sink) {
                Ok((_, delivered)) => delivered,
                Err(error) => return Poll::Ready(Err(self.fail(error))),
            };
            self.release_incoming();
            // A ticket or a KeyUpdate answer rustls produced while reading: sent now if the
            // socket takes it, else by the caller's next flush.
            self.try_send()?;
            if delivered > 0 {
                return Poll::Ready(Ok(delivered));
            }
            if self.peer_closed {
                self.eof = true;
                return Poll::Ready(Ok(0));
            }
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.read_some() {
                Ok(0) => {
                    self.eof = true;
                    self.release_incoming();
                    return Poll::Ready(Ok(0));
                }
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }

    /// Encrypts and writes all of `data`, one record at a time.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.send().await?;
        while !data.is_empty() {
            let n = data.len().min(MAX_PLAINTEXT);
            self.encrypt(Emit::Data(&data[..n]))?;
            data = &data[n..];
            self.send().await?;
        }
        Ok(())
    }

    /// Writes whatever ciphertext is pending.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.send().await
    }

    /// Sends `close_notify` (once) and shuts the TCP write side. Reading still works, until
    /// the peer closes too.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.send().await?;
        if !self.close_sent {
            self.close_sent = true;
            self.encrypt(Emit::CloseNotify)?;
            self.send().await?;
        }
        self.tcp.shutdown().await
    }

    /// Brings rustls to the point where it accepts application data and encrypts `what`,
    /// after whatever rustls had to send first.
    fn encrypt(&mut self, what: Emit<'_>) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        let mut unread = std::mem::take(&mut self.unread);
        let round = self.process(what, &mut |plain| unread.extend_from_slice(plain));
        self.unread = unread;
        match round {
            Ok((Progress::Ready, _)) => Ok(()),
            Ok((Progress::Closed, _)) => Err(io::ErrorKind::BrokenPipe.into()),
            Ok((Progress::NeedInput, _)) => Err(io::ErrorKind::NotConnected.into()),
            Err(error) => Err(self.fail(error)),
        }
    }

    /// Lets rustls process the held ciphertext until it needs more input or is ready for
    /// application data, handing plaintext to `sink` and collecting what it must send in
    /// `outgoing`; at that point `what` is encrypted. Returns where it stopped and how many
    /// plaintext bytes went to `sink`.
    fn process(
        &mut self,
        what: Emit<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(Progress, usize), rustls::Error> {
        let mut delivered = 0;
        loop {
            let incoming: &mut [u8] = match &mut self.incoming {
                Some(buf) => buf.as_mut_slice(),
                None => &mut [],
            };
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(incoming);
            let step = match state {
                Err(error) => Err(error),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                delivered += record.payload.len();
                                sink(record.payload);
                            }
                            Err(error) => {
                                failed = Some(error);
                                break;
                            }
                        }
                    }
                    failed.map_or(Ok(None), Err)
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    let out = self.outgoing.get_or_insert_with(pool::take);
                    match encode_into(
                        out,
                        |buf| encode.encode(buf),
                        |e| match e {
                            EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            }) => Some(*required_size),
                            _ => None,
                        },
                    ) {
                        Ok(()) | Err(EncodeError::AlreadyEncoded) => Ok(None),
                        Err(error) => Err(rustls::Error::General(error.to_string())),
                    }
                }
                // The bytes are in `outgoing`, written by the caller before anything else.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Progress::NeedInput)),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => Ok(Some(Progress::Closed)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let out = match what {
                        Emit::Nothing => None,
                        _ => Some(self.outgoing.get_or_insert_with(pool::take)),
                    };
                    let needed = |e: &EncryptError| match e {
                        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                            Some(*required_size)
                        }
                        _ => None,
                    };
                    let encrypted = match (what, out) {
                        (Emit::Data(data), Some(out)) => {
                            encode_into(out, |buf| traffic.encrypt(data, buf), needed)
                        }
                        (Emit::CloseNotify, Some(out)) => {
                            encode_into(out, |buf| traffic.queue_close_notify(buf), needed)
                        }
                        _ => Ok(()),
                    };
                    match encrypted {
                        Ok(()) => Ok(Some(Progress::Ready)),
                        Err(error) => Err(rustls::Error::General(error.to_string())),
                    }
                }
                // Early data is never accepted (the configurations leave it off).
                Ok(_) => Err(rustls::Error::General(
                    "unexpected TLS connection state".to_owned(),
                )),
            };
            if discard > 0
                && let Some(buf) = &mut self.incoming
            {
                buf.drain(..discard.min(buf.len()));
            }
            match step {
                Ok(None) => {}
                Ok(Some(progress)) => return Ok((progress, delivered)),
                Err(error) => return Err(error),
            }
        }
    }

    /// After a TLS error: encodes the alert rustls queued for it and writes it if the socket
    /// takes it at once. Returns the error for the caller.
    fn fail(&mut self, error: rustls::Error) -> io::Error {
        self.broken = true;
        // Only what rustls queued is taken (it comes out before any input is looked at): the
        // input that failed must not be processed again.
        while self.conn.wants_write() {
            let incoming: &mut [u8] = match &mut self.incoming {
                Some(buf) => buf.as_mut_slice(),
                None => &mut [],
            };
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(incoming);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else {
                break;
            };
            let out = self.outgoing.get_or_insert_with(pool::take);
            if encode_into(out, |buf| encode.encode(buf), |_| None).is_err() {
                break;
            }
        }
        let _ = self.try_send();
        self.release_incoming();
        if let Some(out) = self.outgoing.take() {
            pool::give(out);
        }
        invalid(error)
    }

    /// Reads what the socket has into the incoming buffer (borrowed if none is held).
    fn read_some(&mut self) -> io::Result<usize> {
        let buf = self.incoming.get_or_insert_with(pool::take);
        if buf.len() == buf.capacity() {
            if buf.capacity() >= MAX_INCOMING {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS message too large",
                ));
            }
            buf.reserve(pool::BUF_LEN);
        }
        let read = self.tcp.try_read_buf(buf);
        self.release_incoming();
        read
    }

    /// Waits until the socket has bytes and reads them (during the handshake).
    async fn read_more(&mut self) -> io::Result<()> {
        loop {
            self.tcp.readable().await?;
            match self.read_some() {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Writes held ciphertext as far as the socket takes it without waiting; `true` when none
    /// is left (its buffer is back in the pool).
    fn try_send(&mut self) -> io::Result<bool> {
        while let Some(out) = &self.outgoing {
            let len = out.len();
            match self.tcp.try_write(&out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    if self.written >= len {
                        self.written = 0;
                        if let Some(out) = self.outgoing.take() {
                            pool::give(out);
                        }
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }

    /// Writes all held ciphertext. Poll-based, so the future that waits for the socket adds
    /// nothing to the connection task's size.
    async fn send(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send(cx)).await
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.try_send()? {
            ready!(self.tcp.poll_write_ready(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Gives the incoming buffer back when it holds nothing.
    fn release_incoming(&mut self) {
        if self.incoming.as_ref().is_some_and(Vec::is_empty)
            && let Some(buf) = self.incoming.take()
        {
            pool::give(buf);
        }
    }
}
