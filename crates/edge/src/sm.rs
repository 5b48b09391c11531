//! Stream Management (XEP-0198): the per-session counters and unacknowledged queue, and the
//! one value that carries a session from a dead connection to the one resuming it.
//!
//! Implements the bookkeeping of XEP-0198 §4 (acks: `h` counts stanzas only — `<message/>`,
//! `<presence/>`, `<iq/>` — and wraps at 2^32, so all arithmetic is `u32` wrapping; an ack
//! above what was sent is `handled-count-too-high`) and the state of §5 (resumption). The
//! protocol elements themselves are read and written by `machine`; the detached waiting and
//! the handover between connections are in `connection` and `session`.
//!
//! [`ResumptionState`] is everything a resumption needs (identity, counters, unacked stanzas)
//! in one value with a documented byte encoding ([`ResumptionState::encode`]), so a later
//! version can move it to another edge.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_xml::Element;
use starling_xmpp::FullJid;
use starling_xmpp::jid;

use crate::metrics;
use crate::settings::Settings;

/// The XEP-0198 namespace (version 3).
pub(crate) const NS: &str = "urn:xmpp:sm:3";

/// A stanza on its way to one session: queued by the router, or written and not yet acked.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The stanza as the router sent it.
    pub stanza: Element,
    /// Whether `to` is set to the session's full JID while writing.
    pub stamp_to: bool,
}

impl Outbound {
    /// Bytes it weighs against `sm_max_unacked_bytes`.
    pub(crate) fn weight(&self) -> usize {
        self.stanza.raw().len()
    }
}

/// The stream-management limits, from [`Settings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SmLimits {
    pub(crate) max_resume_secs: u32,
    pub(crate) ack_every_stanzas: u32,
    pub(crate) ack_every: Duration,
    pub(crate) max_unacked_stanzas: usize,
    pub(crate) max_unacked_bytes: usize,
}

impl SmLimits {
    pub(crate) fn from_settings(s: &Settings) -> Self {
        SmLimits {
            max_resume_secs: s.sm_max_resume_secs,
            ack_every_stanzas: s.sm_ack_every_stanzas.max(1),
            ack_every: s.sm_ack_every.max(Duration::from_millis(10)),
            max_unacked_stanzas: s.sm_max_unacked_stanzas.max(1),
            max_unacked_bytes: s.sm_max_unacked_bytes.max(1),
        }
    }

    /// Whether a queue of `count` stanzas and `bytes` bytes can take one of `weight` more.
    pub(crate) fn fits(&self, count: usize, bytes: usize, weight: usize) -> bool {
        count < self.max_unacked_stanzas && bytes.saturating_add(weight) <= self.max_unacked_bytes
    }
}

/// An ack claimed more than was sent (XEP-0198 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooHigh {
    pub(crate) h: u32,
    pub(crate) sent: u32,
}

/// The stream-management state of one session while a connection holds it.
#[derive(Debug)]
pub(crate) struct Sm {
    /// Stanzas received from the client and handled, mod 2^32.
    pub(crate) inbound: u32,
    /// The last `h` the client acknowledged.
    pub(crate) acked: u32,
    /// Written and not acknowledged, oldest first.
    pub(crate) unacked: VecDeque<Outbound>,
    pub(crate) unacked_bytes: usize,
    /// Outbound stanzas since the last `<r/>` we sent.
    pub(crate) since_request: u32,
    /// When we last sent `<r/>` (or the queue stopped being empty).
    pub(crate) last_request: Instant,
    /// The resumption id, when resumption is enabled.
    pub(crate) resumption: Option<Arc<str>>,
    /// The stream id the session was bound on (its identity in the registry).
    pub(crate) session_stream_id: Arc<str>,
    /// The time of the connection's last input, for stanzas the edge writes itself.
    pub(crate) last_input: Instant,
    /// Presences Client State Indication (XEP-0352) still held when the connection ended:
    /// never written, they become the first of the resumed session's `pending` (boxed: most
    /// sessions never have any, and `Sm` lives as long as the session: 8 bytes, not 32).
    #[allow(clippy::box_collection)]
    pub(crate) held: Option<Box<VecDeque<Outbound>>>,
}

impl Sm {
    pub(crate) fn new(session_stream_id: Arc<str>, now: Instant) -> Self {
        Sm {
            inbound: 0,
            acked: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            since_request: 0,
            last_request: now,
            resumption: None,
            session_stream_id,
            last_input: now,
            held: None,
        }
    }

    /// Stanzas sent since enabling, mod 2^32.
    pub(crate) fn sent(&self) -> u32 {
        // The queue is bounded far below 2^32, so the truncation never happens.
        self.acked.wrapping_add(self.unacked.len() as u32)
    }

    /// Records a written stanza.
    pub(crate) fn push(&mut self, item: Outbound, now: Instant) {
        if self.unacked.is_empty() {
            self.last_request = now;
        }
        self.unacked_bytes = self.unacked_bytes.saturating_add(item.weight());
        self.unacked.push_back(item);
        metrics::sm_unacked(1.0);
    }

    /// The client handled `h` stanzas in all: drops what that acknowledges.
    pub(crate) fn ack(&mut self, h: u32) -> Result<usize, TooHigh> {
        let delta = usize::try_from(h.wrapping_sub(self.acked)).unwrap_or(usize::MAX);
        if delta > self.unacked.len() {
            return Err(TooHigh {
                h,
                sent: self.sent(),
            });
        }
        for item in self.unacked.drain(..delta) {
            self.unacked_bytes = self.unacked_bytes.saturating_sub(item.weight());
        }
        metrics::sm_unacked(-(delta as f64));
        self.acked = h;
        Ok(delta)
    }

    /// Empties the queue (the stanzas leave the session: undeliverable, or handed over).
    pub(crate) fn take_unacked(&mut self) -> VecDeque<Outbound> {
        metrics::sm_unacked(-(self.unacked.len() as f64));
        self.unacked_bytes = 0;
        std::mem::take(&mut self.unacked)
    }

    /// The state to hand over, when resumption is enabled.
    pub(crate) fn into_resumption(
        mut self: Box<Self>,
        jid: FullJid,
    ) -> Result<ResumptionState, Box<Self>> {
        let Some(id) = self.resumption.clone() else {
            return Err(self);
        };
        let unacked = self.take_unacked();
        Ok(ResumptionState {
            id,
            jid,
            stream_id: self.session_stream_id.clone(),
            inbound: self.inbound,
            acked: self.acked,
            unacked,
            pending: self.held.take().map(|held| *held).unwrap_or_default(),
        })
    }

    /// Takes a handed-over session back into a connection; returns the stanzas still to
    /// write for the first time.
    pub(crate) fn from_resumption(
        state: ResumptionState,
        now: Instant,
    ) -> (Self, VecDeque<Outbound>) {
        let mut sm = Sm::new(state.stream_id, now);
        sm.inbound = state.inbound;
        sm.acked = state.acked;
        sm.resumption = Some(state.id);
        // The gauge counts what connections hold; a held state is not counted.
        metrics::sm_unacked(state.unacked.len() as f64);
        sm.unacked_bytes = state.unacked.iter().map(Outbound::weight).sum();
        sm.unacked = state.unacked;
        (sm, state.pending)
    }
}

/// A resumable session between connections (XEP-0198 §5): its identity, counters and
/// unacknowledged stanzas, oldest first.
#[derive(Debug, Clone)]
pub struct ResumptionState {
    /// The resumption id given to the client in `<enabled id='…'/>`.
    pub id: Arc<str>,
    /// The bound full JID.
    pub jid: FullJid,
    /// The id of the stream the resource was bound on (the session's id in the registry).
    pub stream_id: Arc<str>,
    /// Stanzas handled from the client, mod 2^32 (`h` of `<resumed/>`).
    pub inbound: u32,
    /// The last `h` the client acknowledged.
    pub acked: u32,
    /// Stanzas sent after `acked`, not acknowledged, oldest first.
    pub unacked: VecDeque<Outbound>,
    /// Stanzas delivered while no connection held the session (never written), oldest
    /// first; they follow `unacked`.
    pub pending: VecDeque<Outbound>,
}

/// A byte string that is not a [`ResumptionState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The version byte is not 1.
    #[error("unknown resumption state version {0}")]
    Version(u8),
    /// The bytes end early or a length is out of range.
    #[error("truncated resumption state")]
    Truncated,
    /// A field does not hold what it should (text, JID, stanza).
    #[error("invalid resumption state field: {0}")]
    Invalid(&'static str),
}

const VERSION: u8 = 1;

impl ResumptionState {
    /// Stanzas and bytes held (`unacked` and `pending`).
    pub fn weight(&self) -> (usize, usize) {
        let all = self.unacked.iter().chain(&self.pending);
        let bytes = all.map(Outbound::weight).sum();
        (self.unacked.len() + self.pending.len(), bytes)
    }

    /// Every stanza held, oldest first (for the router when the session ends).
    pub fn into_stanzas(self) -> impl Iterator<Item = Outbound> {
        self.unacked.into_iter().chain(self.pending)
    }

    /// The byte encoding (version 1). Integers are big-endian; a `str` is a `u32` length then
    /// UTF-8 bytes:
    ///
    /// ```text
    /// u8 version = 1
    /// str id, str jid, str stream_id
    /// u32 inbound, u32 acked
    /// u32 count, then count × { u8 flags (bit 0: stamp_to), u32 length, stanza XML }  (unacked)
    /// u32 count, then the same for `pending`
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let all = self.unacked.iter().chain(&self.pending);
        let stanzas: usize = all.map(|o| 5 + o.weight()).sum();
        let mut out = Vec::with_capacity(
            32 + self.id.len() + self.jid.as_str().len() + self.stream_id.len() + stanzas,
        );
        out.push(VERSION);
        for s in [&*self.id, self.jid.as_str(), &*self.stream_id] {
            put_bytes(&mut out, s.as_bytes());
        }
        out.extend_from_slice(&self.inbound.to_be_bytes());
        out.extend_from_slice(&self.acked.to_be_bytes());
        for queue in [&self.unacked, &self.pending] {
            put_len(&mut out, queue.len());
            for item in queue {
                out.push(u8::from(item.stamp_to));
                put_bytes(&mut out, item.stanza.raw());
            }
        }
        out
    }

    /// Reads [`ResumptionState::encode`]'s output; never panics on bad input.
    pub fn decode(mut input: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut input;
        let version = take_u8(r)?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let id = take_str(r, "id")?;
        let jid = jid::parse_full(take_str(r, "jid")?).map_err(|_| DecodeError::Invalid("jid"))?;
        let stream_id = take_str(r, "stream_id")?;
        let (id, stream_id) = (Arc::from(id), Arc::from(stream_id));
        let inbound = take_u32(r)?;
        let acked = take_u32(r)?;
        let unacked = take_queue(r)?;
        let pending = take_queue(r)?;
        if !r.is_empty() {
            return Err(DecodeError::Invalid("trailing bytes"));
        }
        Ok(ResumptionState {
            id,
            jid,
            stream_id,
            inbound,
            acked,
            unacked,
            pending,
        })
    }
}

fn take_queue(r: &mut &[u8]) -> Result<VecDeque<Outbound>, DecodeError> {
    let count = take_u32(r)?;
    let mut queue = VecDeque::new();
    for _ in 0..count {
        let flags = take_u8(r)?;
        let raw = take_bytes(r)?;
        let stanza = Element::parse(
            Bytes::copy_from_slice(raw),
            starling_xmpp::ns::JABBER_CLIENT,
        )
        .map_err(|_| DecodeError::Invalid("stanza"))?;
        queue.push_back(Outbound {
            stanza,
            stamp_to: flags & 1 == 1,
        });
    }
    Ok(queue)
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn take_u8(r: &mut &[u8]) -> Result<u8, DecodeError> {
    let (&b, rest) = r.split_first().ok_or(DecodeError::Truncated)?;
    *r = rest;
    Ok(b)
}

fn take_u32(r: &mut &[u8]) -> Result<u32, DecodeError> {
    let (head, rest) = r.split_first_chunk::<4>().ok_or(DecodeError::Truncated)?;
    *r = rest;
    Ok(u32::from_be_bytes(*head))
}

fn take_bytes<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let len = usize::try_from(take_u32(r)?).map_err(|_| DecodeError::Truncated)?;
    if r.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (head, rest) = r.split_at(len);
    *r = rest;
    Ok(head)
}

fn take_str<'a>(r: &mut &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(take_bytes(r)?).map_err(|_| DecodeError::Invalid(field))
}

/// A resumption id: 128 random bits, base64url without padding (XEP-0198 §5 asks that it
/// reveal nothing; it is also looked up only within the authenticated account).
pub(crate) fn resumption_id() -> Option<Arc<str>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut raw = [0u8; 16];
    // Without the OS random source there is no unguessable id: no resumption then.
    getrandom::fill(&mut raw).ok()?;
    let mut s = String::with_capacity(22);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for b in raw {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            s.push(char::from(ALPHABET[((acc >> bits) & 63) as usize]));
        }
    }
    if bits > 0 {
        s.push(char::from(ALPHABET[((acc << (6 - bits)) & 63) as usize]));
    }
    Some(Arc::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u32) -> Outbound {
        Outbound {
            stanza: Element::parse(
                Bytes::from(format!("<message id='m{n}'><body>{n}</body></message>")),
                "jabber:client",
            )
            .unwrap(),
            stamp_to: n.is_multiple_of(2),
        }
    }

    #[test]
    fn ack_counts_wrap_at_2_pow_32() {
        let now = Instant::now();
        let mut sm = Sm::new(Arc::from("s"), now);
        sm.acked = u32::MAX - 1;
        for n in 0..4 {
            sm.push(message(n), now);
        }
        assert_eq!(sm.sent(), 2, "MAX-1 + 4 wraps to 2");
        assert_eq!(sm.ack(u32::MAX), Ok(1));
        assert_eq!(sm.ack(1), Ok(2), "MAX → 1 acks two across the wrap");
        assert_eq!(sm.unacked.len(), 1);
        assert_eq!(sm.unacked[0].stanza.id().as_deref(), Some("m3"));
        assert_eq!(sm.ack(3), Err(TooHigh { h: 3, sent: 2 }));
        assert_eq!(sm.ack(2), Ok(1));
        assert_eq!((sm.unacked.len(), sm.unacked_bytes), (0, 0));
        assert_eq!(sm.ack(2), Ok(0), "a repeated ack is harmless");
    }

    #[test]
    fn resumption_state_round_trips_and_rejects_garbage() {
        let state = ResumptionState {
            id: Arc::from("abc"),
            jid: jid::parse_full("juliet@example.org/balcony").unwrap(),
            stream_id: Arc::from("s1"),
            inbound: u32::MAX,
            acked: 7,
            unacked: (0..3).map(message).collect(),
            pending: (3..5).map(message).collect(),
        };
        let bytes = state.encode();
        assert_eq!(bytes[0], 1);
        let back = ResumptionState::decode(&bytes).unwrap();
        assert_eq!(back.id, state.id);
        assert_eq!(back.jid, state.jid);
        assert_eq!(back.stream_id, state.stream_id);
        assert_eq!((back.inbound, back.acked), (u32::MAX, 7));
        assert_eq!((back.unacked.len(), back.pending.len()), (3, 2));
        let all = back.unacked.iter().chain(&back.pending);
        for (a, b) in all.zip(state.unacked.iter().chain(&state.pending)) {
            assert_eq!(a.stanza.raw(), b.stanza.raw());
            assert_eq!(a.stamp_to, b.stamp_to);
        }
        assert_eq!(back.weight(), state.weight());
        for cut in 0..bytes.len() {
            assert!(
                ResumptionState::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            ResumptionState::decode(&bad),
            Err(DecodeError::Version(9))
        ));
    }

    #[test]
    fn resumption_ids_are_128_bit_base64url() {
        let a = resumption_id().unwrap();
        let b = resumption_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
