//! Instant messaging and presence with two independent client libraries (issue 4, "Show"):
//! tokio-xmpp 6 (Rust) and slixmpp (Python, `tests/python/im_peer.py`, driven by JSON
//! commands). Subscriptions to `both` and their cancellation with roster pushes (RFC 6121
//! §2.1.6, §3.1-§3.3), presence broadcast and probes and the unavailable presence sent when a
//! session ends cleanly or its connection is lost (§4.2-§4.5), offline messages with
//! XEP-0203 stamps and offline subscription requests (§3.1.3, §8.5.2, XEP-0160), bare-JID
//! message delivery by priority (§8.5.2.1.1), Message Carbons (XEP-0280), the Blocking
//! Command (XEP-0191), Client State Indication (XEP-0352: presence held while inactive, the
//! latest per contact, flushed on active), the server's entity capabilities (XEP-0115, its
//! `ver` checked by both libraries' own hashing) and the answer to a probe of an offline
//! contact (§4.3.2). Each test starts its own server. (Unavailable presence for sessions the
//! registry removes in bulk needs an edge that goes away without the rest of the server,
//! which `starling serve` cannot do; `crates/router/tests/lease_expiry.rs` shows it over the
//! Raft registry.)
//!
//! Absence is never shown by waiting: a stanza that must not reach a session is followed by a
//! marker that must, sent after it on the same ordered path (the router keeps one sender's
//! stanzas in order); when the marker arrives, the earlier stanza must not have.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::tokio_xmpp::{PinnedServer, Transport, TxClient, TxStream};
use common::{PASSWORD, WAIT, register};
use serde_json::{Value, json};
use starling_system_tests::{PyArgs, PyProcess, unique_user};
use starling_testkit::{RawClient, TestServer};
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::presence::{Presence, Show, Type as PresenceType};

const ROSTER_NS: &str = "jabber:iq:roster";
const BLOCKING_NS: &str = "urn:xmpp:blocking";
const CARBONS_NS: &str = "urn:xmpp:carbons:2";
const FORWARD_NS: &str = "urn:xmpp:forward:0";
const DELAY_NS: &str = "urn:xmpp:delay";
const CLIENT_NS: &str = "jabber:client";
const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const CSI_NS: &str = "urn:xmpp:csi:0";
const CAPS_NS: &str = "http://jabber.org/protocol/caps";

fn start_server() -> TestServer {
    TestServer::builder()
        .log_level("debug")
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A roster item as the server wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    jid: String,
    subscription: String,
    ask: Option<String>,
}

impl Row {
    fn new(jid: &str, subscription: &str, ask: Option<&str>) -> Row {
        Row {
            jid: jid.to_owned(),
            subscription: subscription.to_owned(),
            ask: ask.map(str::to_owned),
        }
    }
}

fn rows_of_json(items: Option<&Value>) -> Vec<Row> {
    items
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|i| Row {
                    jid: i["jid"].as_str().unwrap_or_default().to_owned(),
                    subscription: i["subscription"].as_str().unwrap_or("none").to_owned(),
                    ask: i["ask"].as_str().map(str::to_owned),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn rows_of_query(query: &Element) -> Vec<Row> {
    query
        .children()
        .filter(|c| c.is("item", ROSTER_NS))
        .map(|i| Row {
            jid: i.attr("jid").unwrap_or_default().to_owned(),
            subscription: i.attr("subscription").unwrap_or("none").to_owned(),
            ask: i.attr("ask").map(str::to_owned),
        })
        .collect()
}

/// Whether `from` (a stanza's `from`) is `who`: the same full JID when `who` has a resource,
/// the same bare JID otherwise.
fn from_is(from: &str, who: &str) -> bool {
    if who.contains('/') {
        from == who
    } else {
        from.split('/').next() == Some(who)
    }
}

/// What the subscription tests need of either client.
trait ImClient {
    fn bare(&self) -> String;
    fn full(&self) -> String;
    /// Sends a subscription presence (`subscribe`, `subscribed`, `unsubscribe`,
    /// `unsubscribed`) to a bare JID.
    async fn sub(&mut self, to: &str, kind: &str);
    /// Waits for a roster push carrying `expected`.
    async fn expect_push(&mut self, expected: Row);
    /// Waits for a presence of type `kind` (`available` for none) from `from`.
    async fn expect_presence(&mut self, from: &str, kind: &str);
    /// A fresh roster get.
    async fn roster(&mut self) -> Vec<Row>;
    /// Available presence with a status text (RFC 6121 §4.7.2.2).
    async fn status(&mut self, text: &str);
    /// Sends a chat message.
    async fn chat(&mut self, to: &str, body: &str);
}

/// A slixmpp session in `im_peer.py`.
struct Sli {
    py: PyProcess,
    full: String,
}

impl Sli {
    /// Logs in as `jid` (bare, or full to choose the resource) over STARTTLS, fetches the
    /// roster and sends available presence unless `extra` says otherwise.
    async fn start(server: &TestServer, jid: &str, extra: &[&str]) -> Sli {
        let args = PyArgs::starttls(server, jid, PASSWORD);
        let mut py = PyProcess::spawn_interactive("im_peer.py", &args, extra)
            .unwrap_or_else(|e| panic!("{e}"));
        let online = py
            .expect_event("online", WAIT, |v| {
                v["event"] == "online" || v.get("ok").is_some()
            })
            .await
            .unwrap_or_else(|e| panic!("slixmpp {jid} did not come online: {e}"));
        let full = online["jid"]
            .as_str()
            .unwrap_or_else(|| panic!("slixmpp {jid} failed: {online}\n{}", py.stderr_tail()))
            .to_owned();
        let mut sli = Sli { py, full };
        // The initial presence has been routed before anyone else acts on this session
        // (otherwise a message racing it may be stored offline, see the report on issue 4).
        sli.barrier().await;
        sli
    }

    async fn expect(&mut self, what: &str, pred: impl FnMut(&Value) -> bool) -> Value {
        match self.py.expect_event(what, WAIT, pred).await {
            Ok(v) => v,
            Err(e) => panic!("slixmpp {}: {e}", self.full),
        }
    }

    /// Runs a command and returns its reply (which must not be an error).
    async fn cmd(&mut self, command: Value) -> Value {
        let name = command["cmd"].clone();
        self.py
            .command(&command)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let reply = self
            .expect(&format!("the reply to {command}"), |v| v["reply"] == name)
            .await;
        assert!(
            reply.get("error").is_none(),
            "slixmpp command {command} failed: {reply}"
        );
        reply
    }

    /// Waits for a message whose body is `body`.
    async fn expect_body(&mut self, body: &str) -> Value {
        self.expect(&format!("a message {body:?}"), |v| {
            v["event"] == "message" && v["body"] == body
        })
        .await
    }

    /// Whether a message with `body` was received and set aside.
    fn saw_body(&self, body: &str) -> bool {
        self.py
            .backlog()
            .any(|v| v["event"] == "message" && v["body"] == body)
    }

    /// A round trip through the router on this account's path: everything sent before has
    /// been routed when it returns.
    async fn barrier(&mut self) {
        self.cmd(json!({"cmd": "roster"})).await;
    }
}

impl ImClient for Sli {
    fn bare(&self) -> String {
        self.full.split('/').next().unwrap_or_default().to_owned()
    }

    fn full(&self) -> String {
        self.full.clone()
    }

    async fn sub(&mut self, to: &str, kind: &str) {
        self.cmd(json!({"cmd": "sub", "to": to, "type": kind}))
            .await;
    }

    async fn expect_push(&mut self, expected: Row) {
        let what = format!("a roster push of {expected:?}");
        self.expect(&what, |v| {
            v["event"] == "roster_push" && rows_of_json(v.get("items")).contains(&expected)
        })
        .await;
    }

    async fn expect_presence(&mut self, from: &str, kind: &str) {
        let what = format!("presence {kind} from {from}");
        self.expect(&what, |v| {
            v["event"] == "presence"
                && v["type"] == kind
                && v["from"].as_str().is_some_and(|f| from_is(f, from))
        })
        .await;
    }

    async fn roster(&mut self) -> Vec<Row> {
        let reply = self.cmd(json!({"cmd": "roster"})).await;
        rows_of_json(reply.get("items"))
    }

    async fn status(&mut self, text: &str) {
        self.cmd(json!({"cmd": "presence", "status": text})).await;
    }

    async fn chat(&mut self, to: &str, body: &str) {
        self.cmd(json!({"cmd": "message", "to": to, "body": body}))
            .await;
    }
}

/// A tokio-xmpp session: stanzas not yet wanted are kept in order, roster and blocklist
/// pushes are acknowledged as they arrive (RFC 6121 §2.1.6).
struct Tx {
    client: TxClient,
    backlog: VecDeque<Stanza>,
    next_id: u32,
}

impl Tx {
    /// Logs in as `bare` over STARTTLS, fetches the roster, and sends available presence
    /// with `priority` unless it is `None`.
    async fn login(server: &TestServer, bare: &str, priority: Option<i8>) -> Tx {
        let jid: BareJid = bare.parse().unwrap_or_else(|e| panic!("{bare}: {e}"));
        let client = TxClient::connect(
            server.starttls_addr(),
            Transport::StartTls,
            server.cert(),
            &jid,
            PASSWORD,
        )
        .await
        .unwrap_or_else(|e| panic!("tokio-xmpp login as {bare}: {e}"));
        let mut tx = Tx {
            client,
            backlog: VecDeque::new(),
            next_id: 0,
        };
        tx.roster().await;
        if let Some(p) = priority {
            tx.presence(p, None).await;
            tx.barrier().await;
        }
        tx
    }

    async fn presence(&mut self, priority: i8, show: Option<Show>) {
        let mut p = Presence::available().with_priority(priority);
        p.show = show;
        self.client.send(p).await;
    }

    async fn read(&mut self, timeout: Duration) -> Result<Stanza, String> {
        let stanza = self.client.next_stanza(timeout).await?;
        if let Stanza::Iq(Iq::Set {
            from, id, payload, ..
        }) = &stanza
            && (payload.ns() == ROSTER_NS || payload.ns() == BLOCKING_NS)
        {
            let ack = Iq::Result {
                from: None,
                to: from.clone(),
                id: id.clone(),
                payload: None,
            };
            self.client.send(ack).await;
        }
        Ok(stanza)
    }

    async fn expect(&mut self, what: &str, mut pred: impl FnMut(&Stanza) -> bool) -> Stanza {
        if let Some(at) = self.backlog.iter().position(&mut pred)
            && let Some(found) = self.backlog.remove(at)
        {
            return found;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Ok(s) if pred(&s) => return s,
                Ok(s) => self.backlog.push_back(s),
                Err(e) => panic!(
                    "tokio-xmpp {} waiting for {what}: {e}; other stanzas: {:#?}",
                    self.client.jid(),
                    self.backlog
                ),
            }
        }
    }

    /// Sends an IQ (its id is set here) and waits for the result payload or the error.
    async fn iq(&mut self, iq: Iq) -> Result<Option<Element>, String> {
        self.next_id += 1;
        let id = format!("im{}", self.next_id);
        let iq = match iq {
            Iq::Get {
                from, to, payload, ..
            } => Iq::Get {
                from,
                to,
                id: id.clone(),
                payload,
            },
            Iq::Set {
                from, to, payload, ..
            } => Iq::Set {
                from,
                to,
                id: id.clone(),
                payload,
            },
            other => other,
        };
        self.client.send(iq).await;
        let answer = self
            .expect(&format!("the answer to IQ {id}"), |s| match s {
                Stanza::Iq(Iq::Result { id: got, .. } | Iq::Error { id: got, .. }) => *got == id,
                _ => false,
            })
            .await;
        match answer {
            Stanza::Iq(Iq::Result { payload, .. }) => Ok(payload),
            Stanza::Iq(Iq::Error { error, .. }) => Err(format!("{error:?}")),
            other => Err(format!("not an IQ answer: {other:?}")),
        }
    }

    async fn iq_set(&mut self, payload: Element) -> Result<Option<Element>, String> {
        self.iq(Iq::Set {
            from: None,
            to: None,
            id: String::new(),
            payload,
        })
        .await
    }

    /// A round trip through the router on this account's path.
    async fn barrier(&mut self) {
        self.roster().await;
    }

    async fn send_chat(&mut self, to: &str, body: &str) {
        let to: Jid = to.parse().unwrap_or_else(|e| panic!("{to}: {e}"));
        let message = Message::chat(to).with_body(Default::default(), body.to_owned());
        self.client.send(message).await;
    }

    async fn expect_body(&mut self, body: &str) -> Message {
        let what = format!("a message {body:?}");
        match self
            .expect(
                &what,
                |s| matches!(s, Stanza::Message(m) if m.bodies.values().any(|b| b == body)),
            )
            .await
        {
            Stanza::Message(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn saw_body(&self, body: &str) -> bool {
        self.backlog
            .iter()
            .any(|s| matches!(s, Stanza::Message(m) if m.bodies.values().any(|b| b == body)))
    }

    async fn close(self) {
        self.client.close().await;
    }
}

fn presence_kind(t: &PresenceType) -> &'static str {
    match t {
        PresenceType::None => "available",
        PresenceType::Error => "error",
        PresenceType::Probe => "probe",
        PresenceType::Subscribe => "subscribe",
        PresenceType::Subscribed => "subscribed",
        PresenceType::Unavailable => "unavailable",
        PresenceType::Unsubscribe => "unsubscribe",
        PresenceType::Unsubscribed => "unsubscribed",
    }
}

fn presence_type(kind: &str) -> PresenceType {
    match kind {
        "subscribe" => PresenceType::Subscribe,
        "subscribed" => PresenceType::Subscribed,
        "unsubscribe" => PresenceType::Unsubscribe,
        "unsubscribed" => PresenceType::Unsubscribed,
        "unavailable" => PresenceType::Unavailable,
        other => panic!("no presence type {other}"),
    }
}

impl ImClient for Tx {
    fn bare(&self) -> String {
        self.client.jid().to_bare().to_string()
    }

    fn full(&self) -> String {
        self.client.jid().to_string()
    }

    async fn sub(&mut self, to: &str, kind: &str) {
        let to: BareJid = to.parse().unwrap_or_else(|e| panic!("{to}: {e}"));
        self.client
            .send(Presence::new(presence_type(kind)).with_to(to))
            .await;
    }

    async fn expect_push(&mut self, expected: Row) {
        let what = format!("a roster push of {expected:?}");
        self.expect(&what, |s| {
            matches!(s, Stanza::Iq(Iq::Set { payload, .. })
                if payload.is("query", ROSTER_NS) && rows_of_query(payload).contains(&expected))
        })
        .await;
    }

    async fn expect_presence(&mut self, from: &str, kind: &str) {
        let what = format!("presence {kind} from {from}");
        self.expect(&what, |s| {
            matches!(s, Stanza::Presence(p)
                if presence_kind(&p.type_) == kind
                    && p.from.as_ref().is_some_and(|f| from_is(f.as_str(), from)))
        })
        .await;
    }

    async fn roster(&mut self) -> Vec<Row> {
        let query = Element::builder("query", ROSTER_NS).build();
        let payload = self
            .iq(Iq::Get {
                from: None,
                to: None,
                id: String::new(),
                payload: query,
            })
            .await
            .unwrap_or_else(|e| panic!("roster get: {e}"))
            .unwrap_or_else(|| panic!("an empty roster result"));
        rows_of_query(&payload)
    }

    async fn status(&mut self, text: &str) {
        let mut p = Presence::available();
        p.set_status("", text);
        self.client.send(p).await;
    }

    async fn chat(&mut self, to: &str, body: &str) {
        self.send_chat(to, body).await;
    }
}

/// `x` subscribes to `y` and `y` approves; then `y` subscribes to `x` and `x` approves
/// (RFC 6121 §3.1). Each step is checked by its roster pushes on both sides, the
/// subscription presence delivered, and the presence the new subscriber receives at once
/// (§3.1.5, §3.1.6). Both must be online with available presence.
async fn handshake_to_both(x: &mut impl ImClient, y: &mut impl ImClient) {
    let (xb, yb) = (x.bare(), y.bare());
    x.sub(&yb, "subscribe").await;
    x.expect_push(Row::new(&yb, "none", Some("subscribe")))
        .await;
    y.expect_presence(&xb, "subscribe").await;

    y.sub(&xb, "subscribed").await;
    y.expect_push(Row::new(&xb, "from", None)).await;
    x.expect_push(Row::new(&yb, "to", None)).await;
    x.expect_presence(&yb, "subscribed").await;
    x.expect_presence(&y.full(), "available").await;

    y.sub(&xb, "subscribe").await;
    y.expect_push(Row::new(&xb, "from", Some("subscribe")))
        .await;
    x.expect_presence(&yb, "subscribe").await;

    x.sub(&yb, "subscribed").await;
    x.expect_push(Row::new(&yb, "both", None)).await;
    y.expect_push(Row::new(&xb, "both", None)).await;
    y.expect_presence(&xb, "subscribed").await;
    y.expect_presence(&x.full(), "available").await;

    let of = |rows: Vec<Row>, jid: &str| -> Vec<Row> {
        rows.into_iter().filter(|r| r.jid == jid).collect()
    };
    assert_eq!(of(x.roster().await, &yb), vec![Row::new(&yb, "both", None)]);
    assert_eq!(of(y.roster().await, &xb), vec![Row::new(&xb, "both", None)]);
}

/// Cancels a `both` subscription from both ends with `kind` (`unsubscribe`: each stops its
/// own subscription, RFC 6121 §3.3; `unsubscribed`: each revokes the other's, §3.2), `x`
/// first. Checks the pushes, the presence delivered, the unavailable presence the server
/// sends on the side that loses a subscription, and the final rosters (items kept, `none`).
async fn cancel_both(x: &mut impl ImClient, y: &mut impl ImClient, kind: &str) {
    let (xb, yb) = (x.bare(), y.bare());
    let (x_keeps, y_keeps) = match kind {
        "unsubscribe" => ("from", "to"),
        "unsubscribed" => ("to", "from"),
        other => panic!("{other} cancels nothing"),
    };
    x.sub(&yb, kind).await;
    x.expect_push(Row::new(&yb, x_keeps, None)).await;
    y.expect_push(Row::new(&xb, y_keeps, None)).await;
    y.expect_presence(&xb, kind).await;
    if kind == "unsubscribe" {
        // §3.3.3: the user no longer sees the contact.
        x.expect_presence(&y.full(), "unavailable").await;
    } else {
        // §3.2.3: the contact no longer sees the user.
        y.expect_presence(&x.full(), "unavailable").await;
    }

    y.sub(&xb, kind).await;
    y.expect_push(Row::new(&xb, "none", None)).await;
    x.expect_push(Row::new(&yb, "none", None)).await;
    x.expect_presence(&yb, kind).await;
    if kind == "unsubscribe" {
        y.expect_presence(&x.full(), "unavailable").await;
    } else {
        x.expect_presence(&y.full(), "unavailable").await;
    }

    assert_eq!(x.roster().await, vec![Row::new(&yb, "none", None)]);
    assert_eq!(y.roster().await, vec![Row::new(&xb, "none", None)]);
}

/// A server, a slixmpp session and a tokio-xmpp session of two new accounts, both online.
async fn sli_and_tx(server: &TestServer) -> (Sli, Tx) {
    let alice = register(server, &unique_user("alice")).await;
    let bob = register(server, &unique_user("bob")).await;
    let sli = Sli::start(server, &alice, &[]).await;
    let tx = Tx::login(server, &bob, Some(0)).await;
    (sli, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_asks_first_both_subscribe_to_both_then_unsubscribe() {
    let server = start_server();
    let (mut sli, mut tx) = sli_and_tx(&server).await;
    handshake_to_both(&mut sli, &mut tx).await;
    cancel_both(&mut sli, &mut tx, "unsubscribe").await;
    tx.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_asks_first_both_subscribe_to_both_then_unsubscribed() {
    let server = start_server();
    let (mut sli, mut tx) = sli_and_tx(&server).await;
    handshake_to_both(&mut tx, &mut sli).await;
    cancel_both(&mut tx, &mut sli, "unsubscribed").await;
    tx.close().await;
}

/// Presence between mutual contacts (RFC 6121 §4.2-§4.5): initial presence is broadcast and
/// probes are answered, a change is broadcast, and the contact sees `unavailable` when a
/// session ends with `</stream:stream>` (slixmpp, tokio-xmpp), when slixmpp's TCP connection
/// is aborted, and when a raw client's socket is dropped without closing the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_seen_and_unavailable_follows_close_and_connection_loss() {
    let server = start_server();
    let (mut sli, mut tx) = sli_and_tx(&server).await;
    handshake_to_both(&mut sli, &mut tx).await;
    let alice = sli.bare();
    let bob_full = tx.full();

    // A presence change is broadcast to the contact.
    tx.presence(0, Some(Show::Away)).await;
    sli.expect(&format!("away from {bob_full}"), |v| {
        v["event"] == "presence" && v["from"] == bob_full.as_str() && v["show"] == "away"
    })
    .await;

    // Clean close of a slixmpp session.
    let first = sli.full();
    sli.cmd(json!({"cmd": "disconnect"})).await;
    tx.expect_presence(&first, "unavailable").await;

    // A new slixmpp session: broadcast to bob, and bob's presence probed for it.
    let mut sli = Sli::start(&server, &alice, &["--priority", "3"]).await;
    let second = sli.full();
    match tx
        .expect(&format!("available from {second}"), |s| {
            matches!(s, Stanza::Presence(p) if p.type_ == PresenceType::None
                && p.from.as_ref().is_some_and(|f| f.as_str() == second))
        })
        .await
    {
        Stanza::Presence(p) => assert_eq!(p.priority.0, 3, "{p:?}"),
        other => panic!("{other:?}"),
    }
    let probed = sli
        .expect(&format!("bob's presence {bob_full}"), |v| {
            v["event"] == "presence" && v["from"] == bob_full.as_str() && v["type"] == "available"
        })
        .await;
    assert_eq!(
        probed["show"], "away",
        "the probe answer is the last presence"
    );

    // Connection loss: slixmpp aborts its transport (no </stream:stream>, no TLS close).
    sli.cmd(json!({"cmd": "abort"})).await;
    tx.expect_presence(&second, "unavailable").await;

    // Connection loss of a raw client: its socket is dropped mid-stream.
    let user = alice.split('@').next().unwrap_or_default();
    let (mut raw, raw_jid) =
        RawClient::login(server.starttls_addr(), server.domain(), user, PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("raw login: {e}"));
    raw.send("<presence/>").await.expect("raw presence");
    tx.expect_presence(&raw_jid, "available").await;
    drop(raw);
    tx.expect_presence(&raw_jid, "unavailable").await;

    // Clean close of the tokio-xmpp session, seen by a third slixmpp session.
    let mut sli = Sli::start(&server, &alice, &[]).await;
    sli.expect_presence(&bob_full, "available").await;
    tx.close().await;
    sli.expect_presence(&bob_full, "unavailable").await;
}

fn delay_of(m: &Message) -> Option<String> {
    m.payloads
        .iter()
        .find(|p| p.is("delay", DELAY_NS))
        .and_then(|d| d.attr("stamp").map(str::to_owned))
}

/// Messages and subscription requests sent to an offline account are stored and delivered
/// when it next sends available presence (RFC 6121 §3.1.3, §8.5.2.1.1; XEP-0160), messages
/// with an XEP-0203 `<delay/>` from the server's domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_and_subscription_requests_arrive_at_next_login() {
    let server = start_server();
    let alice = register(&server, &unique_user("alice")).await;
    let bob = register(&server, &unique_user("bob")).await;
    let carol = register(&server, &unique_user("carol")).await;

    // tokio-xmpp bob writes to and asks offline alice (slixmpp).
    let mut tx = Tx::login(&server, &bob, Some(0)).await;
    tx.send_chat(&alice, "sent while you were away").await;
    tx.sub(&alice, "subscribe").await;
    tx.barrier().await;
    tx.expect_push(Row::new(&alice, "none", Some("subscribe")))
        .await;

    let mut sli = Sli::start(&server, &alice, &[]).await;
    let got = sli.expect_body("sent while you were away").await;
    assert!(
        got["from"].as_str().is_some_and(|f| from_is(f, &bob)),
        "{got}"
    );
    assert_eq!(got["type"], "chat", "{got}");
    assert!(got["delay"].as_str().is_some(), "no <delay/>: {got}");
    sli.expect_presence(&bob, "subscribe").await;

    // slixmpp alice writes to and asks offline carol (tokio-xmpp).
    sli.cmd(json!({"cmd": "message", "to": carol, "body": "for carol, later"}))
        .await;
    sli.sub(&carol, "subscribe").await;
    sli.barrier().await;
    let mut carol_tx = Tx::login(&server, &carol, Some(0)).await;
    let m = carol_tx.expect_body("for carol, later").await;
    assert_eq!(m.type_, MessageType::Chat);
    assert_eq!(
        m.from.as_ref().map(Jid::to_bare).map(|b| b.to_string()),
        Some(alice.clone())
    );
    let delay = m
        .payloads
        .iter()
        .find(|p| p.is("delay", DELAY_NS))
        .unwrap_or_else(|| panic!("no <delay/> in {m:?}"));
    assert_eq!(delay.attr("from"), Some(server.domain()), "{m:?}");
    assert!(delay_of(&m).is_some());
    carol_tx.expect_presence(&alice, "subscribe").await;

    // Delivered once: a new slixmpp session (no stream management) does not get the
    // message again.
    sli.cmd(json!({"cmd": "disconnect"})).await;
    let mut again = Sli::start(&server, &alice, &[]).await;
    tx.send_chat(&alice, "marker").await;
    again.expect_body("marker").await;
    assert!(
        !again.saw_body("sent while you were away"),
        "delivered twice: {:?}",
        again.py.backlog().collect::<Vec<_>>()
    );
    carol_tx.close().await;
    tx.close().await;
}

/// XEP-0198 §5 (at least once): tokio-xmpp enables stream management, reads a message from
/// offline storage and closes its stream cleanly without acknowledging it (the XEP
/// recommends an `<a/>` before closing). The server treats the unacknowledged message like
/// one to an unavailable resource: the next session gets it again, keeping the stamp of its
/// first storage (one `<delay/>`, checked in the router's unit tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_offline_message_is_redelivered_after_a_clean_close() {
    let server = start_server();
    let alice = register(&server, &unique_user("alice")).await;
    let carol = register(&server, &unique_user("carol")).await;
    let mut tx = Tx::login(&server, &alice, Some(0)).await;
    tx.send_chat(&carol, "for carol, later").await;
    tx.barrier().await;
    let mut carol_tx = Tx::login(&server, &carol, Some(0)).await;
    carol_tx.expect_body("for carol, later").await;
    carol_tx.close().await;
    let mut again = Tx::login(&server, &carol, Some(0)).await;
    tx.send_chat(&carol, "marker").await;
    again.expect_body("marker").await;
    assert!(
        again.saw_body("for carol, later"),
        "not redelivered: {:#?}",
        again.backlog
    );
    again.close().await;
    tx.close().await;
}

/// A message to the bare JID reaches the available resources of the highest non-negative
/// priority only, and all of them when they tie (RFC 6121 §8.5.2.1.1). One resource is
/// slixmpp, the other tokio-xmpp; the sender is a second tokio-xmpp session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_jid_messages_go_to_the_highest_priority_or_to_all_that_tie() {
    let server = start_server();
    let alice = register(&server, &unique_user("alice")).await;
    let bob = register(&server, &unique_user("bob")).await;
    let mut sli = Sli::start(&server, &format!("{alice}/sli"), &["--priority", "5"]).await;
    let mut atx = Tx::login(&server, &alice, Some(1)).await;
    let mut btx = Tx::login(&server, &bob, Some(0)).await;

    // slixmpp (5) over tokio-xmpp (1).
    btx.send_chat(&alice, "to the highest").await;
    btx.send_chat(&atx.full(), "marker one").await;
    let got = sli.expect_body("to the highest").await;
    assert_eq!(got["type"], "chat", "{got}");
    atx.expect_body("marker one").await;
    assert!(!atx.saw_body("to the highest"), "the lower priority got it");

    // tokio-xmpp (10) over slixmpp (5).
    atx.presence(10, None).await;
    atx.barrier().await;
    btx.send_chat(&alice, "now to tokio-xmpp").await;
    btx.send_chat(&sli.full(), "marker two").await;
    atx.expect_body("now to tokio-xmpp").await;
    sli.expect_body("marker two").await;
    assert!(
        !sli.saw_body("now to tokio-xmpp"),
        "the lower priority got it"
    );

    // Equal priorities: both.
    sli.cmd(json!({"cmd": "presence", "priority": 10})).await;
    sli.barrier().await;
    btx.send_chat(&alice, "to both").await;
    atx.expect_body("to both").await;
    sli.expect_body("to both").await;

    btx.close().await;
    atx.close().await;
}

/// Message Carbons (XEP-0280) between a slixmpp and a tokio-xmpp resource of one account:
/// each enables carbons; a chat message one of them receives is copied to the other as
/// `<received/>` (§6), one it sends is copied as `<sent/>` (§7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carbons_copy_messages_between_two_resources() {
    let server = start_server();
    let alice = register(&server, &unique_user("alice")).await;
    let bob = register(&server, &unique_user("bob")).await;
    let mut sli = Sli::start(&server, &format!("{alice}/sli"), &["--carbons"]).await;
    let mut atx = Tx::login(&server, &alice, Some(0)).await;
    let enabled = atx
        .iq_set(Element::builder("enable", CARBONS_NS).build())
        .await;
    assert!(enabled.is_ok(), "carbons enable: {enabled:?}");
    let mut btx = Tx::login(&server, &bob, Some(0)).await;

    // Received by tokio-xmpp, copied to slixmpp.
    btx.send_chat(&atx.full(), "for tokio-xmpp").await;
    atx.expect_body("for tokio-xmpp").await;
    let copy = sli
        .expect("a received carbon", |v| {
            v["event"] == "message" && v["carbon"]["direction"] == "received"
        })
        .await;
    assert_eq!(
        copy["from"],
        alice.as_str(),
        "carbons come from the bare JID: {copy}"
    );
    assert_eq!(copy["carbon"]["body"], "for tokio-xmpp", "{copy}");
    assert!(
        copy["carbon"]["from"]
            .as_str()
            .is_some_and(|f| from_is(f, &bob)),
        "{copy}"
    );

    // Sent by slixmpp, copied to tokio-xmpp.
    sli.cmd(json!({"cmd": "message", "to": btx.full(), "body": "from slixmpp"}))
        .await;
    btx.expect_body("from slixmpp").await;
    let copy = atx
        .expect("a sent carbon", |s| {
            matches!(s, Stanza::Message(m) if m.payloads.iter().any(|p| p.is("sent", CARBONS_NS)))
        })
        .await;
    let Stanza::Message(copy) = copy else {
        panic!("{copy:?}")
    };
    assert_eq!(
        copy.from.as_ref().map(|f| f.to_string()),
        Some(alice.clone())
    );
    let inner = copy
        .payloads
        .iter()
        .find(|p| p.is("sent", CARBONS_NS))
        .and_then(|s| s.get_child("forwarded", FORWARD_NS))
        .and_then(|f| f.get_child("message", CLIENT_NS))
        .unwrap_or_else(|| panic!("no forwarded message in {copy:?}"));
    assert_eq!(inner.attr("to"), Some(btx.full().as_str()));
    assert_eq!(
        inner.get_child("body", CLIENT_NS).map(Element::text),
        Some("from slixmpp".to_owned())
    );

    btx.close().await;
    atx.close().await;
}

/// Blocking Command (XEP-0191) with slixmpp blocking a tokio-xmpp contact: the blocklist
/// push (§3.3), the blocked contact sees the user go unavailable and gets an error for its
/// messages, the user's own messages to it are refused with `<blocked/>` (§3.4); after
/// unblocking, presence and messages pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_and_unblock() {
    let server = start_server();
    let alice = register(&server, &unique_user("alice")).await;
    let bob = register(&server, &unique_user("bob")).await;
    let mut sli = Sli::start(&server, &alice, &["--blocklist"]).await;
    let mut tx = Tx::login(&server, &bob, Some(0)).await;
    handshake_to_both(&mut sli, &mut tx).await;
    let alice_full = sli.full();

    sli.cmd(json!({"cmd": "block", "jids": [bob]})).await;
    let push = sli
        .expect("a block push", |v| {
            v["event"] == "blocklist_push" && v["action"] == "block"
        })
        .await;
    assert_eq!(push["jids"], json!([bob]), "{push}");
    assert_eq!(
        sli.cmd(json!({"cmd": "blocklist"})).await["jids"],
        json!([bob])
    );
    tx.expect_presence(&alice_full, "unavailable").await;

    // The blocked contact's message is refused, and not delivered.
    tx.send_chat(&alice, "while blocked").await;
    // §3.4: an error, which SHOULD be <service-unavailable/> (the user appears offline).
    match tx
        .expect(
            "an error for the blocked message",
            |s| matches!(s, Stanza::Message(m) if m.type_ == MessageType::Error),
        )
        .await
    {
        Stanza::Message(m) => {
            let condition = m
                .payloads
                .iter()
                .find(|p| p.is("error", CLIENT_NS))
                .and_then(|e| e.children().find(|c| c.ns() == STANZAS_NS))
                .map(|c| c.name().to_owned());
            assert_eq!(condition.as_deref(), Some("service-unavailable"), "{m:?}");
        }
        other => panic!("{other:?}"),
    }
    // The user's message to the blocked contact is refused with <blocked/>.
    sli.cmd(json!({"cmd": "message", "to": bob, "body": "to the blocked"}))
        .await;
    let refused = sli
        .expect("an error for a message to a blocked contact", |v| {
            v["event"] == "message" && v["type"] == "error"
        })
        .await;
    assert_eq!(refused["condition"], "not-acceptable", "{refused}");

    sli.cmd(json!({"cmd": "unblock", "jids": [bob]})).await;
    sli.expect("an unblock push", |v| {
        v["event"] == "blocklist_push" && v["action"] == "unblock"
    })
    .await;
    tx.expect_presence(&alice_full, "available").await;
    tx.send_chat(&alice, "after unblocking").await;
    sli.expect_body("after unblocking").await;
    assert!(
        !sli.saw_body("while blocked"),
        "a blocked message was delivered"
    );
    assert!(
        !tx.saw_body("to the blocked"),
        "a refused message was delivered"
    );
    tx.close().await;
}

/// XEP-0191 §3.5: a message to a blocked JID is refused with `<not-acceptable/>` carrying
/// the `<blocked xmlns='urn:xmpp:blocking:errors'/>` application condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_blocked_jid_is_refused_with_the_blocked_condition() {
    let server = start_server();
    let alice = register(&server, &unique_user("alice")).await;
    let bob = register(&server, &unique_user("bob")).await;
    let mut sli = Sli::start(&server, &alice, &[]).await;
    sli.cmd(json!({"cmd": "block", "jids": [bob]})).await;
    sli.cmd(json!({"cmd": "message", "to": bob, "body": "to the blocked"}))
        .await;
    let refused = sli
        .expect("an error for a message to a blocked contact", |v| {
            v["event"] == "message" && v["type"] == "error"
        })
        .await;
    assert_eq!(refused["condition"], "not-acceptable", "{refused}");
    assert_eq!(
        refused["app"], "{urn:xmpp:blocking:errors}blocked",
        "{refused}"
    );
}

// ---------------------------------------------------------------------------------------------
// Client State Indication (XEP-0352), the server's entity capabilities (XEP-0115) and the
// answer to a probe of a contact that is offline (RFC 6121 §4.3.2).
//
// Holding is shown without waiting, like absence above: the contacts' presences are routed
// (their own round trip returns), then the inactive client's own round trip returns after
// whatever was queued for it; what it has not received by then is held.

/// The client that tells the server its state, in the CSI scenario.
trait CsiClient {
    /// The session's full JID.
    fn me(&self) -> String;
    /// Sends `<inactive/>` (`true`) or `<active/>`.
    async fn indicate(&mut self, inactive: bool);
    /// A round trip through the server on this stream: what was delivered to the session
    /// before has been received when it returns.
    async fn round_trip(&mut self);
    /// The statuses of the presences from `bare` received and set aside so far, in order.
    fn statuses_from(&self, bare: &str) -> Vec<String>;
    async fn expect_chat(&mut self, body: &str);
    async fn expect_subscribe(&mut self, from: &str);
    async fn expect_status(&mut self, status: &str);
}

impl CsiClient for Sli {
    fn me(&self) -> String {
        self.full.clone()
    }

    async fn indicate(&mut self, inactive: bool) {
        // slixmpp sends the nonza only because the server advertised <csi/>.
        let state = if inactive { "inactive" } else { "active" };
        self.cmd(json!({"cmd": "csi", "state": state})).await;
    }

    async fn round_trip(&mut self) {
        self.barrier().await;
    }

    fn statuses_from(&self, bare: &str) -> Vec<String> {
        self.py
            .backlog()
            .filter(|v| {
                v["event"] == "presence" && v["from"].as_str().is_some_and(|f| from_is(f, bare))
            })
            .filter_map(|v| v["status"].as_str().map(str::to_owned))
            .collect()
    }

    async fn expect_chat(&mut self, body: &str) {
        self.expect_body(body).await;
    }

    async fn expect_subscribe(&mut self, from: &str) {
        self.expect_presence(from, "subscribe").await;
    }

    async fn expect_status(&mut self, status: &str) {
        self.expect(status, |v| {
            v["event"] == "presence" && v["status"] == status
        })
        .await;
    }
}

/// A tokio-xmpp session on tokio-xmpp's XML stream, which can send nonzas.
struct TxCsi(TxStream);

impl TxCsi {
    async fn expect(&mut self, what: &str, pred: impl FnMut(&Stanza) -> bool) {
        if let Err(e) = self.0.expect(what, pred).await {
            panic!("{e}");
        }
    }
}

impl CsiClient for TxCsi {
    fn me(&self) -> String {
        self.0.jid().to_string()
    }

    async fn indicate(&mut self, inactive: bool) {
        self.0.indicate(inactive).await.unwrap();
    }

    async fn round_trip(&mut self) {
        self.0.barrier().await.unwrap();
    }

    fn statuses_from(&self, bare: &str) -> Vec<String> {
        self.0
            .backlog()
            .filter_map(|s| match s {
                Stanza::Presence(p)
                    if p.from.as_ref().is_some_and(|f| from_is(f.as_str(), bare)) =>
                {
                    p.statuses.values().next().cloned()
                }
                _ => None,
            })
            .collect()
    }

    async fn expect_chat(&mut self, body: &str) {
        self.expect(
            body,
            |s| matches!(s, Stanza::Message(m) if m.bodies.values().any(|b| b == body)),
        )
        .await;
    }

    async fn expect_subscribe(&mut self, from: &str) {
        self.expect("a subscription request", |s| {
            matches!(s, Stanza::Presence(p) if p.type_ == PresenceType::Subscribe
                && p.from.as_ref().is_some_and(|f| from_is(f.as_str(), from)))
        })
        .await;
    }

    async fn expect_status(&mut self, status: &str) {
        self.expect(
            status,
            |s| matches!(s, Stanza::Presence(p) if p.statuses.values().any(|t| t == status)),
        )
        .await;
    }
}

/// A counter or gauge of the server's `/metrics`, 0 when absent.
fn metric(server: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    server
        .fetch_metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e}"))
        .metric(name, labels)
        .unwrap_or(0.0)
}

/// XEP-0352 with `a` inactive, subscribed both ways to `b` and `c`: presence changes of both
/// are held, the latest per contact; a message from `b` passes at once, after `b`'s latest
/// presence, and so does `d`'s subscription request, while `c`'s presence stays held; on
/// `<active/>` only `c`'s latest is written, before anything that follows; then presence
/// flows at once again. The server counts three presences superseded and two written from
/// the buffer.
async fn csi_scenario(
    server: &TestServer,
    a: &mut impl CsiClient,
    b: &mut impl ImClient,
    c: &mut impl ImClient,
    d: &mut impl ImClient,
) {
    let (bb, cb) = (b.bare(), c.bare());
    a.indicate(true).await;
    a.round_trip().await;
    for s in ["b1", "b2", "b3"] {
        b.status(s).await;
    }
    b.roster().await;
    for s in ["c1", "c2"] {
        c.status(s).await;
    }
    c.roster().await;
    a.round_trip().await;
    assert!(
        a.statuses_from(&bb).is_empty(),
        "{:?}",
        a.statuses_from(&bb)
    );
    assert!(
        a.statuses_from(&cb).is_empty(),
        "{:?}",
        a.statuses_from(&cb)
    );

    b.chat(&a.me(), "while inactive").await;
    a.expect_chat("while inactive").await;
    assert_eq!(a.statuses_from(&bb), ["b3"]);
    assert!(a.statuses_from(&cb).is_empty());
    let a_bare = a.me().split('/').next().unwrap_or_default().to_owned();
    d.sub(&a_bare, "subscribe").await;
    a.expect_subscribe(&d.bare()).await;
    a.round_trip().await;
    assert!(a.statuses_from(&cb).is_empty());

    a.indicate(false).await;
    a.round_trip().await;
    assert_eq!(a.statuses_from(&cb), ["c2"]);
    assert_eq!(a.statuses_from(&bb), ["b3"], "nothing written twice");
    c.status("c3").await;
    a.expect_status("c3").await;

    let total = "starling_csi_presences_total";
    assert_eq!(metric(server, total, &[("outcome", "held")]), 5.0);
    assert_eq!(metric(server, total, &[("outcome", "superseded")]), 3.0);
    assert_eq!(metric(server, total, &[("outcome", "written")]), 2.0);
    assert_eq!(metric(server, "starling_csi_inactive_streams", &[]), 0.0);
    assert_eq!(metric(server, "starling_csi_held_presences", &[]), 0.0);
}

/// Registers one account per prefix; returns their bare JIDs.
async fn accounts<const N: usize>(server: &TestServer, prefixes: [&str; N]) -> [String; N] {
    let mut out = [const { String::new() }; N];
    for (jid, prefix) in out.iter_mut().zip(prefixes) {
        *jid = register(server, &unique_user(prefix)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_inactive_gets_only_the_latest_presence_per_contact_and_messages_at_once() {
    let server = start_server();
    let [a, b, c, d] = accounts(&server, ["csia", "csib", "csic", "csid"]).await;
    let mut sa = Sli::start(&server, &a, &[]).await;
    let mut tb = Tx::login(&server, &b, Some(0)).await;
    let mut tc = Tx::login(&server, &c, Some(0)).await;
    let mut td = Tx::login(&server, &d, Some(0)).await;
    handshake_to_both(&mut sa, &mut tb).await;
    handshake_to_both(&mut sa, &mut tc).await;
    csi_scenario(&server, &mut sa, &mut tb, &mut tc, &mut td).await;
    for t in [tb, tc, td] {
        t.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_inactive_gets_only_the_latest_presence_per_contact_and_messages_at_once() {
    let server = start_server();
    let [a, b, c, d] = accounts(&server, ["csia", "csib", "csic", "csid"]).await;
    let mut sb = Sli::start(&server, &b, &[]).await;
    let mut sc = Sli::start(&server, &c, &[]).await;
    let mut sd = Sli::start(&server, &d, &[]).await;
    // The subscriptions are made with tokio-xmpp's StanzaStream first; the session that
    // indicates its state then logs in on tokio-xmpp's XML stream, which can send nonzas.
    let mut setup = Tx::login(&server, &a, Some(0)).await;
    handshake_to_both(&mut setup, &mut sb).await;
    handshake_to_both(&mut setup, &mut sc).await;
    setup.close().await;
    let mut ta = TxCsi(tx_stream(&server, &a).await);
    let features = ta.0.features();
    assert!(
        features.others.iter().any(|e| e.is("csi", CSI_NS)),
        "no <csi/> in {features:?}"
    );
    ta.0.send(Presence::available()).await.unwrap();
    // The answers to the initial presence's probes arrive while the client is active.
    ta.round_trip().await;
    csi_scenario(&server, &mut ta, &mut sb, &mut sc, &mut sd).await;
    ta.0.close().await;
}

/// A tokio-xmpp XML-stream session of `bare` over STARTTLS.
async fn tx_stream(server: &TestServer, bare: &str) -> TxStream {
    let jid: BareJid = bare.parse().unwrap_or_else(|e| panic!("{bare}: {e}"));
    let pinned = PinnedServer::new(server.starttls_addr(), Transport::StartTls, server.cert());
    TxStream::connect(pinned, &jid, PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("tokio-xmpp stream login as {bare}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_caps_ver_is_validated_by_slixmpp_and_recomputed_by_tokio_xmpp() {
    use tokio_xmpp::parsers::caps::{Caps, compute_disco, hash_caps, query_caps};
    use tokio_xmpp::parsers::hashes::Algo;

    let server = start_server();
    let [a, b] = accounts(&server, ["capsa", "capsb"]).await;
    // slixmpp's XEP-0115 plugin handles the <c/> stream feature by itself: it asks for
    // disco#info of node#ver and accepts the ver only if its own hash of the answer matches.
    let mut sa = Sli::start(&server, &a, &["--caps"]).await;
    let reply = sa.cmd(json!({"cmd": "server_caps"})).await;
    let advertised = &reply["advertised"];
    let ver = advertised["ver"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(advertised["hash"], "sha-1", "{reply}");
    assert_eq!(
        reply["validated"].as_str(),
        Some(ver),
        "slixmpp did not validate: {reply}"
    );
    assert_eq!(
        reply["computed"].as_str(),
        Some(ver),
        "plain disco#info differs: {reply}"
    );

    // tokio-xmpp (xmpp-parsers' caps) recomputes it from the node's disco#info and the
    // plain one.
    let mut tb = tx_stream(&server, &b).await;
    let c = tb
        .features()
        .others
        .iter()
        .find(|e| e.is("c", CAPS_NS))
        .cloned()
        .unwrap_or_else(|| panic!("no <c/> in {:?}", tb.features()));
    let caps = Caps::try_from(c).unwrap_or_else(|e| panic!("bad <c/>: {e:?}"));
    assert_eq!(caps.hash, Algo::Sha_1);
    assert_eq!(Some(caps.node.as_str()), advertised["node"].as_str());
    let node = format!("{}#{ver}", caps.node);
    let info = tb.disco_info_server(Some(node.clone())).await.unwrap();
    assert_eq!(info.node.as_deref(), Some(node.as_str()));
    assert!(info.features.contains(CAPS_NS), "{info:?}");
    let plain = tb.disco_info_server(None).await.unwrap();
    for answer in [&info, &plain] {
        let hash = hash_caps(&compute_disco(answer), Algo::Sha_1).unwrap();
        assert_eq!(hash.hash, caps.ver, "{answer:?}");
    }
    // xmpp-parsers' own node#ver (its Base64 of the decoded ver) is the one slixmpp saw.
    assert_eq!(query_caps(caps).node.as_deref(), Some(node.as_str()));
    tb.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_of_an_offline_contact_is_answered_with_its_last_unavailable_presence() {
    let server = start_server();
    let [a, b] = accounts(&server, ["proba", "probb"]).await;
    let mut sa = Sli::start(&server, &a, &[]).await;
    let mut tb = Tx::login(&server, &b, Some(0)).await;
    handshake_to_both(&mut sa, &mut tb).await;
    // B leaves with a status, and A logs in again later.
    let mut gone = Presence::new(PresenceType::Unavailable);
    gone.set_status("", "gone fishing");
    tb.client.send(gone).await;
    sa.expect_presence(&tb.full(), "unavailable").await;
    tb.close().await;
    sa.cmd(json!({"cmd": "disconnect"})).await;

    // slixmpp's initial presence probes B: the answer is B's last unavailable, stamped.
    let mut sa = Sli::start(&server, &a, &[]).await;
    let answer = sa
        .expect("B's last presence", |v| {
            v["event"] == "presence"
                && v["type"] == "unavailable"
                && v["from"].as_str().is_some_and(|f| from_is(f, &b))
        })
        .await;
    assert_eq!(answer["status"], "gone fishing", "{answer}");
    assert!(answer["delay"].is_string(), "no <delay/>: {answer}");

    // B comes back and its connection ends: the unavailable the server wrote for it is the
    // answer to tokio-xmpp's probe now.
    let tb = Tx::login(&server, &b, Some(0)).await;
    sa.expect_presence(&tb.full(), "available").await;
    tb.close().await;
    sa.expect_presence(&b, "unavailable").await;
    let mut ta = Tx::login(&server, &a, Some(0)).await;
    let p = ta
        .expect("B's last presence", |s| {
            matches!(s, Stanza::Presence(p) if p.type_ == PresenceType::Unavailable
                && p.from.as_ref().is_some_and(|f| from_is(f.as_str(), &b)))
        })
        .await;
    let Stanza::Presence(p) = p else {
        unreachable!()
    };
    assert!(p.statuses.is_empty(), "{p:?}");
    assert!(
        p.payloads.iter().any(|e| e.is("delay", DELAY_NS)),
        "no <delay/>: {p:?}"
    );
    ta.close().await;
}
