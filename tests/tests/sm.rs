//! Stream Management (XEP-0198) against the real binary (issue 5, "Show"): TCP connections
//! cut without `</stream:stream>` while stanzas are in flight in both directions, then resumed
//! (§5) with nothing lost, nothing duplicated and `h` exact on both sides (§4); a resumption
//! that comes too late (`<failed><item-not-found/>`, §5) with the unacknowledged messages found
//! in offline storage and the unacknowledged IQ bounced to its sender (XEP-0198 §5, RFC 6121
//! §8.5.3.2); slixmpp's xep_0198 plugin and tokio-xmpp 6's `StanzaStream` as independent
//! clients that resume on their own. Each test starts its own server.

mod common;

use std::time::{Duration, Instant};

use common::tokio_xmpp::{PinnedServer, Transport};
use common::{PASSWORD, WAIT, register};
use serde_json::{Value, json};
use starling_system_tests::{PyArgs, PyProcess, unique_user};
use starling_testkit::{AuthOutcome, Features, RawClient, StreamEvent, TestServer, ns, to_xml};
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::stanzastream::{Event, StanzaStream, StreamEvent as TxStreamEvent};
use tokio_xmpp::xmlstream::Timeouts;

/// XEP-0198 version 3.
const SM: &str = "urn:xmpp:sm:3";
/// XEP-0203.
const DELAY: &str = "urn:xmpp:delay";

/// The gauge of stanzas written to SM sessions and not yet acknowledged (edge metrics).
const UNACKED_GAUGE: &str = "starling_sm_unacked_stanzas";
/// Resumption outcomes (edge metrics).
const RESUMPTIONS: &str = "starling_sm_resumptions_total";

fn user_jid(server: &TestServer, user: &str) -> String {
    format!("{user}@{}", server.domain())
}

/// A metric's value (0 when the server has not created it yet).
fn metric(server: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    server
        .metric(name, labels)
        .unwrap_or_else(|e| panic!("scraping /metrics: {e}"))
        .unwrap_or(0.0)
}

/// Successful resumptions: of a detached session, or of one whose old connection was still
/// open (the server may not have seen the cut yet).
fn resumptions(server: &TestServer) -> f64 {
    metric(server, RESUMPTIONS, &[("outcome", "resumed")])
        + metric(server, RESUMPTIONS, &[("outcome", "took_over")])
}

/// Polls `/metrics` until `name{labels}` satisfies `wanted` (a real condition, not a sleep).
async fn wait_metric(
    server: &TestServer,
    name: &str,
    labels: &[(&str, &str)],
    wanted: impl Fn(f64) -> bool,
    what: &str,
) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(server, name, labels);
        if wanted(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {name}{labels:?} is still {value}\n--- server log ---\n{}",
            server.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Connects, negotiates STARTTLS and SCRAM-SHA-256, restarts the stream: ready for `<bind/>`
/// or `<resume/>`. Returns the features of the authenticated stream.
async fn authenticate(server: &TestServer, user: &str) -> (RawClient, Features) {
    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap_or_else(|e| panic!("connecting: {e}"));
    client.open_stream().await.expect("stream header");
    client.starttls().await.expect("STARTTLS");
    match client.auth_scram_sha256(user, PASSWORD).await {
        Ok(AuthOutcome::Success) => {}
        other => panic!("SCRAM-SHA-256 for {user}: {other:?}"),
    }
    let features = client
        .open_stream()
        .await
        .expect("the authenticated stream");
    (client, features)
}

/// A bound session with XEP-0198 enabled with resumption; returns the client, its full JID and
/// the `<enabled/>` element.
async fn login_sm(server: &TestServer, user: &str) -> (RawClient, String, Element) {
    let (mut client, features) = authenticate(server, user).await;
    assert!(
        features.0.has_child("sm", SM),
        "no <sm xmlns='{SM}'/> feature after authentication (XEP-0198 §2): {}",
        to_xml(&features.0)
    );
    let jid = client.bind(None).await.expect("bind");
    client
        .send(&format!("<enable xmlns='{SM}' resume='true'/>"))
        .await
        .expect("sending <enable/>");
    let enabled = client
        .expect_element("<enabled/>")
        .await
        .expect("<enabled/>");
    assert!(enabled.is("enabled", SM), "got {}", to_xml(&enabled));
    assert!(
        matches!(enabled.attr("resume"), Some("true" | "1")),
        "resumption not granted: {}",
        to_xml(&enabled)
    );
    assert!(
        enabled.attr("id").is_some_and(|id| !id.is_empty()),
        "no resumption id: {}",
        to_xml(&enabled)
    );
    (client, jid, enabled)
}

async fn login_plain(server: &TestServer, user: &str) -> (RawClient, String) {
    RawClient::login(server.starttls_addr(), server.domain(), user, PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("login {user}: {e}"))
}

async fn send_chat(client: &mut RawClient, to: &str, body: &str) {
    client
        .send(&format!(
            "<message type='chat' to='{to}' id='{body}'><body>{body}</body></message>"
        ))
        .await
        .unwrap_or_else(|e| panic!("sending {body}: {e}"));
}

fn body(e: &Element) -> Option<String> {
    e.get_child("body", ns::CLIENT).map(Element::text)
}

/// The next top-level element, failing on the end of the stream.
async fn next_element(client: &mut RawClient, what: &str) -> Element {
    match client.next_event().await {
        Ok(StreamEvent::Element(e)) => e,
        Ok(other) => panic!("waiting for {what}: got {other:?}"),
        Err(e) => panic!("waiting for {what}: {e}"),
    }
}

/// Reads until messages with exactly `bodies` (in any order) arrived; returns every element
/// read, in order. Fails on an unexpected or repeated message.
async fn read_messages(client: &mut RawClient, bodies: &[String]) -> Vec<Element> {
    let mut missing: Vec<&String> = bodies.iter().collect();
    let mut read = Vec::new();
    while !missing.is_empty() {
        let e = next_element(client, &format!("messages {missing:?}")).await;
        if e.is("message", ns::CLIENT) {
            let b = body(&e).unwrap_or_default();
            let at = missing.iter().position(|m| **m == b);
            assert!(
                at.is_some(),
                "unexpected or duplicated message {} (still missing {missing:?})",
                to_xml(&e)
            );
            if let Some(at) = at {
                missing.remove(at);
            }
        }
        read.push(e);
    }
    read
}

fn bodies(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|n| format!("{prefix}{n}")).collect()
}

/// Sends `<r/>` and returns the `h` of the server's `<a/>`, skipping `<r/>` requests from the
/// server (answered with `answer_h` when given).
async fn request_ack(client: &mut RawClient, answer_h: Option<u32>) -> u32 {
    client
        .send(&format!("<r xmlns='{SM}'/>"))
        .await
        .expect("sending <r/>");
    loop {
        let e = next_element(client, "<a/>").await;
        if e.is("r", SM) {
            if let Some(h) = answer_h {
                client
                    .send(&format!("<a xmlns='{SM}' h='{h}'/>"))
                    .await
                    .expect("sending <a/>");
            }
            continue;
        }
        assert!(e.is("a", SM), "expected <a/>, got {}", to_xml(&e));
        return e
            .attr("h")
            .and_then(|h| h.parse().ok())
            .unwrap_or_else(|| panic!("<a/> without a valid h: {}", to_xml(&e)));
    }
}

// ---------------------------------------------------------------------------------------------
// Raw client: exact h in both directions across a cut and a resumption

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_after_a_cut_has_exact_h_and_retransmits_exactly_the_unacked() {
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let alice_user = unique_user("smh");
    let bob_user = unique_user("smb");
    register(&server, &alice_user).await;
    register(&server, &bob_user).await;

    let (mut alice, alice_full, enabled) = login_sm(&server, &alice_user).await;
    let previd = enabled.attr("id").unwrap_or_default().to_owned();
    let (mut bob, bob_full) = login_plain(&server, &bob_user).await;

    // Client → server: 6 stanzas, acknowledged exactly; 2 more, not acknowledged.
    let a_first = bodies("a", 1..=6);
    for b in &a_first {
        send_chat(&mut alice, &bob_full, b).await;
    }
    assert_eq!(request_ack(&mut alice, None).await, 6, "server's h after 6");
    for b in bodies("a", 7..=8) {
        send_chat(&mut alice, &bob_full, &b).await;
    }
    // The server handled all 8: bob has them (so the `h` of <resumed/> must be 8).
    read_messages(&mut bob, &bodies("a", 1..=8)).await;

    // Server → client: 7 messages; alice handles 4, acknowledges 2 of them explicitly.
    for b in bodies("b", 1..=7) {
        send_chat(&mut bob, &alice_full, &b).await;
    }
    let mut handled = 0u32;
    let mut server_requests = 0;
    while handled < 4 {
        let e = next_element(&mut alice, "bob's messages").await;
        if e.is("r", SM) {
            server_requests += 1;
            continue;
        }
        assert!(e.is("message", ns::CLIENT), "got {}", to_xml(&e));
        handled += 1;
        assert_eq!(body(&e), Some(format!("b{handled}")), "in order");
    }
    alice
        .send(&format!("<a xmlns='{SM}' h='2'/>"))
        .await
        .expect("<a h='2'/>");
    // Cut: the socket is dropped with b5…b7 (and maybe a <r/>) unread, no </stream:stream>.
    drop(alice);

    // While the session waits for its client: one more message, queued for it.
    send_chat(&mut bob, &alice_full, "b8").await;

    // Resume on a new connection, claiming the 4 handled (b1…b4).
    let (mut alice, features) = authenticate(&server, &alice_user).await;
    assert!(features.0.has_child("sm", SM), "{}", to_xml(&features.0));
    alice
        .send(&format!("<resume xmlns='{SM}' previd='{previd}' h='4'/>"))
        .await
        .expect("sending <resume/>");
    let resumed = next_element(&mut alice, "<resumed/>").await;
    assert!(resumed.is("resumed", SM), "got {}", to_xml(&resumed));
    assert_eq!(resumed.attr("previd"), Some(previd.as_str()));
    assert_eq!(
        resumed.attr("h"),
        Some("8"),
        "<resumed h/> must count the 8 stanzas the server received: {}",
        to_xml(&resumed)
    );

    // Retransmitted: exactly b5, b6, b7 (not acknowledged by h=4), then b8 (queued while
    // detached), in order, each once, addressed to the same full JID.
    let mut got = Vec::new();
    while got.len() < 4 {
        let e = next_element(&mut alice, "the unacknowledged messages").await;
        if e.is("r", SM) {
            continue;
        }
        assert!(e.is("message", ns::CLIENT), "got {}", to_xml(&e));
        assert_eq!(e.attr("to"), Some(alice_full.as_str()), "{}", to_xml(&e));
        got.push(body(&e).unwrap_or_default());
    }
    assert_eq!(got, bodies("b", 5..=8));

    // The session goes on with the same counters: alice has handled 8, the server sent 8;
    // alice's 8 stanzas plus one more are counted by the server.
    alice
        .send(&format!("<a xmlns='{SM}' h='8'/>"))
        .await
        .expect("<a h='8'/>");
    assert_eq!(request_ack(&mut alice, Some(8)).await, 8);
    send_chat(&mut alice, &bob_full, "a9").await;
    assert_eq!(request_ack(&mut alice, Some(8)).await, 9);
    read_messages(&mut bob, &["a9".to_owned()]).await;
    // Nothing duplicated on bob's side: a ping round trip after a9 shows no extra message.
    bob.ping(None).await.expect("bob's ping");
    wait_metric(
        &server,
        UNACKED_GAUGE,
        &[],
        |v| v == 0.0,
        "alice acknowledged all 8",
    )
    .await;
    assert_eq!(resumptions(&server), 1.0);
    eprintln!("server <r/> requests seen before the cut: {server_requests}");
    alice.close().await.expect("clean close");
    bob.close().await.expect("clean close");
}

// ---------------------------------------------------------------------------------------------
// Too late: item-not-found, offline storage, IQ bounced

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_too_late_fails_and_unacked_stanzas_go_offline_or_bounce() {
    let server = TestServer::builder()
        .set("c2s", "sm_max_resume_secs", 2i64)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let alice_user = unique_user("sml");
    let bob_user = unique_user("smm");
    register(&server, &alice_user).await;
    register(&server, &bob_user).await;

    let (mut alice, alice_full, enabled) = login_sm(&server, &alice_user).await;
    assert_eq!(
        enabled.attr("max"),
        Some("2"),
        "max advertises the configured resumption time: {}",
        to_xml(&enabled)
    );
    let previd = enabled.attr("id").unwrap_or_default().to_owned();
    let (mut bob, _bob_full) = login_plain(&server, &bob_user).await;

    // Three chat messages and one IQ request reach alice, who never acknowledges them.
    let chats = bodies("late", 1..=3);
    for b in &chats {
        send_chat(&mut bob, &alice_full, b).await;
    }
    bob.send(&format!(
        "<iq type='get' to='{alice_full}' id='late-iq'><query xmlns='jabber:iq:version'/></iq>"
    ))
    .await
    .expect("sending the IQ");
    let mut seen = 0;
    while seen < 4 {
        let e = next_element(&mut alice, "bob's stanzas").await;
        if e.is("message", ns::CLIENT) || e.is("iq", ns::CLIENT) {
            seen += 1;
        }
    }
    assert_eq!(metric(&server, UNACKED_GAUGE, &[]), 4.0, "4 unacknowledged");
    drop(alice);
    let cut = Instant::now();

    // The session is kept 2 s, then ends: the server counts it expired.
    wait_metric(
        &server,
        RESUMPTIONS,
        &[("outcome", "expired")],
        |v| v >= 1.0,
        "the detached session should expire after sm_max_resume_secs",
    )
    .await;
    assert!(
        cut.elapsed() >= Duration::from_millis(1900),
        "expired after only {:?}",
        cut.elapsed()
    );

    // The IQ comes back to bob as an error (RFC 6120 §8.3.1; RFC 6121 §8.5.3.2.2).
    let bounce = loop {
        let e = next_element(&mut bob, "the IQ bounce").await;
        if e.is("iq", ns::CLIENT) && e.attr("id") == Some("late-iq") {
            break e;
        }
    };
    assert_eq!(bounce.attr("type"), Some("error"), "{}", to_xml(&bounce));
    let condition = bounce
        .get_child("error", ns::CLIENT)
        .and_then(|err| err.children().find(|c| c.ns() == ns::STANZAS))
        .map(|c| c.name().to_owned());
    assert_eq!(
        condition.as_deref(),
        Some("service-unavailable"),
        "{}",
        to_xml(&bounce)
    );

    // A late <resume/>: <failed><item-not-found/></failed> (XEP-0198 §5).
    let (mut alice, _) = authenticate(&server, &alice_user).await;
    alice
        .send(&format!("<resume xmlns='{SM}' previd='{previd}' h='4'/>"))
        .await
        .expect("sending <resume/>");
    let failed = next_element(&mut alice, "<failed/>").await;
    assert!(failed.is("failed", SM), "got {}", to_xml(&failed));
    assert!(
        failed.has_child("item-not-found", ns::STANZAS),
        "{}",
        to_xml(&failed)
    );
    if let Some(h) = failed.attr("h") {
        assert_eq!(h, "0", "alice sent no stanza: {}", to_xml(&failed));
    }
    eprintln!("late resume answered: {}", to_xml(&failed));

    // The same stream may bind a new resource (§5); initial presence brings the three chat
    // messages back from offline storage, each once, with a delay stamp (XEP-0160, XEP-0203);
    // the IQ is not among them.
    let new_full = alice.bind(None).await.expect("bind after <failed/>");
    assert!(new_full.starts_with(&format!("{}/", user_jid(&server, &alice_user))));
    alice.send("<presence/>").await.expect("initial presence");
    let read = read_messages(&mut alice, &chats).await;
    for e in read.iter().filter(|e| e.is("message", ns::CLIENT)) {
        assert!(e.has_child("delay", DELAY), "no delay stamp: {}", to_xml(e));
        assert_eq!(
            e.attr("from").map(|f| f.split('/').next().unwrap_or(f)),
            Some(user_jid(&server, &bob_user).as_str()),
            "{}",
            to_xml(e)
        );
    }
    assert!(
        !read.iter().any(|e| e.is("iq", ns::CLIENT)),
        "the IQ must not be stored"
    );
    // Nothing more: a ping round trip shows no duplicate.
    alice.ping(None).await.expect("ping after offline delivery");
    alice.close().await.expect("clean close");
    bob.close().await.expect("clean close");
}

// ---------------------------------------------------------------------------------------------
// slixmpp (xep_0198) resumes on its own after a reset, with traffic both ways

struct Sli {
    py: PyProcess,
    jid: String,
    sm_id: String,
}

impl Sli {
    async fn start(server: &TestServer, bare: &str) -> Sli {
        let args = PyArgs::starttls(server, bare, PASSWORD);
        let mut py = PyProcess::spawn_interactive("sm_peer.py", &args, &["--timeout", "30"])
            .unwrap_or_else(|e| panic!("{e}"));
        let online = py
            .expect_event("online", WAIT, |v| v["event"] == "online")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(online["resume"], json!(true), "{online}");
        Sli {
            py,
            jid: online["jid"].as_str().unwrap_or_default().to_owned(),
            sm_id: online["sm_id"].as_str().unwrap_or_default().to_owned(),
        }
    }

    async fn expect(&mut self, what: &str, pred: impl FnMut(&Value) -> bool) -> Value {
        match self.py.expect_event(what, WAIT, pred).await {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    async fn cmd(&mut self, command: Value) -> Value {
        let name = command["cmd"].clone();
        self.py
            .command(&command)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let reply = self
            .expect(&format!("reply to {command}"), |v| v["reply"] == name)
            .await;
        assert!(reply.get("error").is_none(), "{command} failed: {reply}");
        reply
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_resumes_after_a_reset_with_nothing_lost_or_duplicated() {
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let alice_bare = register(&server, &unique_user("sls")).await;
    let bob_user = unique_user("slb");
    register(&server, &bob_user).await;

    let mut alice = Sli::start(&server, &alice_bare).await;
    assert!(!alice.sm_id.is_empty(), "no resumption id");
    let (mut bob, bob_full) = login_plain(&server, &bob_user).await;
    let alice_full = alice.jid.clone();

    // alice → bob: a1…a7, all handled by the server (bob has them). slixmpp asks for an ack
    // after every 5th stanza, so at least a6 and a7 are unacknowledged on its side.
    alice
        .cmd(json!({"cmd": "send", "to": bob_full, "prefix": "a", "first": 1, "count": 7}))
        .await;
    read_messages(&mut bob, &bodies("a", 1..=7)).await;

    // bob → alice: b1…b3 read and handled by slixmpp.
    for b in bodies("b", 1..=3) {
        send_chat(&mut bob, &alice_full, &b).await;
    }
    for b in bodies("b", 1..=3) {
        alice
            .expect(&format!("message {b}"), |v| {
                v["event"] == "message" && v["body"] == b.as_str()
            })
            .await;
    }

    // slixmpp stops reading: b4…b8 are written by the server and stay unread in its socket.
    alice.cmd(json!({"cmd": "pause"})).await;
    let before = metric(&server, UNACKED_GAUGE, &[]);
    for b in bodies("b", 4..=8) {
        send_chat(&mut bob, &alice_full, &b).await;
    }
    wait_metric(
        &server,
        UNACKED_GAUGE,
        &[],
        |v| v >= before + 5.0,
        "the server should have written b4…b8 to alice",
    )
    .await;

    // The cut: a8…a10 are queued by slixmpp and the TCP connection is reset at once (RST,
    // unread data discarded, no </stream:stream>); slixmpp reconnects and resumes.
    let cut = alice
        .cmd(json!({"cmd": "cut", "to": bob_full, "prefix": "a", "first": 8, "count": 3}))
        .await;
    let unacked_at_cut = strings(&cut["unacked"]);
    assert!(
        unacked_at_cut.contains(&"a7".to_owned()),
        "slixmpp had a7 unacknowledged at the cut: {cut}"
    );
    assert_eq!(cut["handled"], json!(3), "slixmpp handled b1…b3: {cut}");

    // While alice is away: b9, b10.
    for b in bodies("b", 9..=10) {
        send_chat(&mut bob, &alice_full, &b).await;
    }

    let resumed = alice
        .expect("session_resumed", |v| v["event"] == "resumed")
        .await;
    assert_eq!(resumed["previd"], json!(alice.sm_id), "{resumed}");
    // The server received a1…a7 and nothing after the cut.
    assert_eq!(resumed["h"], json!(7), "<resumed h/>: {resumed}");
    assert_eq!(
        strings(&resumed["resent"]),
        bodies("a", 8..=10),
        "slixmpp resends exactly what h did not count"
    );

    // After the resumption: a11 and b11.
    alice
        .cmd(json!({"cmd": "send", "to": bob_full, "prefix": "a", "first": 11, "count": 1}))
        .await;
    send_chat(&mut bob, &alice_full, "b11").await;

    // Everything arrives exactly once each way.
    read_messages(&mut bob, &bodies("a", 8..=11)).await;
    // b1…b3 were consumed above: b4…b11 arrive in the order bob sent them (the server
    // retransmits the unacknowledged, then what was queued while alice was away).
    let mut order = Vec::new();
    while order.len() < 8 {
        let v = alice
            .expect("bob's messages b4…b11", |v| v["event"] == "message")
            .await;
        order.push(v["body"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(order, bodies("b", 4..=11), "each once, in order");
    // Exact h both ways, and no stray stanza: after an <a/> exchange with the server, the
    // server counts every stanza slixmpp sent, slixmpp counts every one the server sent, and
    // nothing is left unacknowledged on either side.
    let sync = alice.cmd(json!({"cmd": "sync"})).await;
    assert_eq!(sync["server_h"], json!(11), "server's h = a1…a11: {sync}");
    assert_eq!(sync["seq"], json!(11), "slixmpp's count: {sync}");
    assert_eq!(sync["handled"], json!(11), "slixmpp handled b1…b11: {sync}");
    assert!(strings(&sync["unacked"]).is_empty(), "{sync}");
    wait_metric(
        &server,
        UNACKED_GAUGE,
        &[],
        |v| v == 0.0,
        "slixmpp acknowledged all 11",
    )
    .await;
    // Any message line left over (read while waiting for something else) is a duplicate.
    let extra: Vec<&Value> = alice
        .py
        .backlog()
        .filter(|v| v["event"] == "message")
        .collect();
    assert!(
        extra.is_empty(),
        "duplicated or unexpected messages: {extra:?}"
    );
    bob.ping(None).await.expect("bob's ping");
    assert_eq!(resumptions(&server), 1.0);
    alice
        .py
        .finish(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    bob.close().await.expect("clean close");
}

// ---------------------------------------------------------------------------------------------
// tokio-xmpp (StanzaStream) resumes on its own after the network path dies

/// A TCP relay to the server whose live connections the test can kill at once, as a dying
/// network path (NAT, mobile link) does: both sockets are dropped, bytes in the relay are lost,
/// and neither end gets a `</stream:stream>`.
struct CutProxy {
    addr: std::net::SocketAddr,
    live: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream: std::net::SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tasks, count) = (live.clone(), accepted.clone());
        let acceptor = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let relay = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                if let Ok(mut tasks) = tasks.lock() {
                    tasks.push(relay.abort_handle());
                }
            }
        });
        CutProxy {
            addr,
            live,
            accepted,
            acceptor,
        }
    }

    /// Kills every relayed connection; returns how many there were.
    fn cut(&self) -> usize {
        let mut tasks = self.live.lock().expect("relay list");
        let n = tasks.iter().filter(|t| !t.is_finished()).count();
        for task in tasks.drain(..) {
            task.abort();
        }
        n
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.acceptor.abort();
    }
}

fn chat_body(stanza: &Stanza) -> Option<String> {
    match stanza {
        Stanza::Message(m) => m.bodies.values().next().cloned(),
        _ => None,
    }
}

async fn tx_send_chat(stream: &StanzaStream, to: &str, body: &str) {
    let to: Jid = to.parse().expect("a JID");
    let mut message = Message::chat(to).with_body(Default::default(), body.to_owned());
    message.id = Some(tokio_xmpp::parsers::message::Id(body.to_owned()));
    stream.send(Box::new(message.into())).await;
}

/// Reads the StanzaStream until every body in `wanted` arrived once, recording stream events;
/// fails on a repeated or unexpected message.
async fn tx_collect(stream: &mut StanzaStream, wanted: &[String], events: &mut Vec<String>) {
    use futures_util::StreamExt;
    let mut missing: Vec<&String> = wanted.iter().collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !missing.is_empty() {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        match next {
            Err(_) => panic!("tokio-xmpp: still missing {missing:?}; events {events:?}"),
            Ok(None) => panic!("tokio-xmpp: the stream ended; missing {missing:?}"),
            Ok(Some(Event::Stream(e))) => events.push(format!("{e:?}")),
            Ok(Some(Event::Stanza(s))) => {
                if let Some(b) = chat_body(&s) {
                    let at = missing.iter().position(|m| **m == b);
                    assert!(
                        at.is_some(),
                        "tokio-xmpp got unexpected or duplicated {b} (missing {missing:?})"
                    );
                    if let Some(at) = at {
                        missing.remove(at);
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_resumes_after_the_network_path_dies() {
    use futures_util::StreamExt;
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let alice_bare = register(&server, &unique_user("txs")).await;
    let bob_user = unique_user("txb");
    register(&server, &bob_user).await;
    let proxy = CutProxy::start(server.starttls_addr()).await;

    // tokio-xmpp's own reconnecting client: it enables XEP-0198 with resumption when offered.
    let connector = PinnedServer::new(proxy.addr, Transport::StartTls, server.cert());
    let mut alice = StanzaStream::new_c2s(
        connector,
        alice_bare.parse::<Jid>().expect("JID"),
        PASSWORD.to_owned(),
        Timeouts::tight(),
        16,
    );
    let alice_full = tokio::time::timeout(WAIT, async {
        loop {
            match alice.next().await {
                Some(Event::Stream(TxStreamEvent::Reset { bound_jid, .. })) => break bound_jid,
                Some(_) => continue,
                None => panic!("tokio-xmpp's stream ended before binding"),
            }
        }
    })
    .await
    .expect("tokio-xmpp bound within the wait")
    .to_string();
    wait_metric(
        &server,
        "starling_sm_enabled_total",
        &[("resume", "true")],
        |v| v >= 1.0,
        "tokio-xmpp should enable stream management with resumption",
    )
    .await;
    let (mut bob, bob_full) = login_plain(&server, &bob_user).await;

    // Traffic both ways before the cut.
    for b in bodies("a", 1..=3) {
        tx_send_chat(&alice, &bob_full, &b).await;
    }
    read_messages(&mut bob, &bodies("a", 1..=3)).await;
    for b in bodies("b", 1..=3) {
        send_chat(&mut bob, &alice_full, &b).await;
    }
    let mut events = Vec::new();
    tx_collect(&mut alice, &bodies("b", 1..=3), &mut events).await;

    // In flight both ways when the path dies: b4…b6 from the server, a4…a6 from alice.
    for b in bodies("b", 4..=6) {
        send_chat(&mut bob, &alice_full, &b).await;
    }
    for b in bodies("a", 4..=6) {
        tx_send_chat(&alice, &bob_full, &b).await;
    }
    assert_eq!(proxy.cut(), 1, "one relayed connection to cut");
    // While alice is away.
    send_chat(&mut bob, &alice_full, "b7").await;
    tx_send_chat(&alice, &bob_full, "a7").await;

    tx_collect(&mut alice, &bodies("b", 4..=7), &mut events).await;
    read_messages(&mut bob, &bodies("a", 4..=7)).await;
    // Markers sent last flush out any duplicate before them (each direction is in order).
    send_chat(&mut bob, &alice_full, "b8").await;
    tx_send_chat(&alice, &bob_full, "a8").await;
    tx_collect(&mut alice, &["b8".to_owned()], &mut events).await;
    read_messages(&mut bob, &["a8".to_owned()]).await;

    assert!(
        events.iter().any(|e| e == "Resumed"),
        "tokio-xmpp did not resume: {events:?}"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("Reset")),
        "tokio-xmpp started a new session instead of resuming: {events:?}"
    );
    assert!(proxy.accepted() >= 2, "tokio-xmpp reconnected");
    assert_eq!(resumptions(&server), 1.0);
    alice.close().await;
    bob.close().await.expect("clean close");
}
