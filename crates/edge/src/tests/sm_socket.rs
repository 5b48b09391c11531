//! XEP-0198 over real sockets: connections cut without `</stream:stream>` (the client's socket
//! is dropped) with stanzas in flight both ways, then resumed; resumption too late; resumption
//! while the old connection is still open; sessions that end without resumption.

use super::*;

/// `<enable resume='true'/>` on a bound session; returns the resumption id.
async fn enable_resumption<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>) -> String {
    c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    let enabled = c.until("/>").await;
    assert!(enabled.contains("resume='true'"), "{enabled}");
    let id = enabled
        .split("id='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no id in {enabled}"))
        .to_owned();
    assert_eq!(id.len(), 22, "{enabled}");
    id
}

fn message(to: &str, id: &str) -> String {
    format!("<message to='{to}' id='{id}'><body>{id}</body></message>")
}

fn count(haystack: &str, id: &str) -> usize {
    haystack.matches(&format!("id='{id}'")).count()
}

impl Server {
    /// Waits until the session of `jid` is detached (its connection was seen to die).
    async fn wait_detached(&self, jid: &str) {
        let jid = starling_xmpp::jid::parse_full(jid).unwrap();
        let sessions = self.edge.shared().sessions.clone();
        let waited = tokio::time::timeout(WAIT, async {
            while !sessions.get(&jid).is_some_and(|h| h.is_detached()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{jid} was not detached");
    }
}

impl TestRouter {
    async fn wait_undeliverable(&self, ids: &[&str]) {
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                {
                    let got = self.undeliverable.lock();
                    if ids.iter().all(|id| got.iter().any(|g| g == id)) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "undeliverable {ids:?} not all seen: {:?}",
            self.undeliverable.lock()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_then_resume_loses_and_duplicates_nothing() {
    let server = start(|_| {}).await;
    let mut alice = server.session("alice", "phone").await;
    let mut bob = server.session("bob", "pc").await;
    let id = enable_resumption(&mut alice).await;

    // Server → alice: three, of which alice handled (and acks) two.
    for n in 1..=3 {
        bob.send(&message("alice@localhost/phone", &format!("b{n}")))
            .await;
    }
    let got = alice.until("id='b3'").await;
    assert_eq!((count(&got, "b1"), count(&got, "b2")), (1, 1));
    alice.send("<a xmlns='urn:xmpp:sm:3' h='2'/>").await;

    // Alice → server: two whole stanzas and half of a third, then the cable is cut.
    alice
        .send(&format!(
            "{}{}<message to='bob@localhost/pc' id='a3'><bo",
            message("bob@localhost/pc", "a1"),
            message("bob@localhost/pc", "a2")
        ))
        .await;
    drop(alice);
    let got = bob.until("id='a2'").await;
    assert_eq!((count(&got, "a1"), count(&got, "a2")), (1, 1));
    server.wait_detached("alice@localhost/phone").await;

    // Delivered while alice is away.
    for n in 4..=5 {
        bob.send(&message("alice@localhost/phone", &format!("b{n}")))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.edge.session_count(), 2, "the session is kept");

    let (mut alice, features) = server.login("alice").await;
    assert!(
        features.contains("<sm xmlns='urn:xmpp:sm:3'/>"),
        "{features}"
    );
    alice
        .send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='2'/>"
        ))
        .await;
    let resumed = alice.until("/>").await;
    assert_eq!(
        resumed,
        format!("<resumed xmlns='urn:xmpp:sm:3' previd='{id}' h='2'/>"),
        "the server handled a1 and a2, not the cut a3"
    );
    let got = alice.until("id='b5'").await;
    let got = got + &alice.until("</message>").await;
    for (stanza, times) in [("b1", 0), ("b2", 0), ("b3", 1), ("b4", 1), ("b5", 1)] {
        assert_eq!(count(&got, stanza), times, "{stanza} in {got}");
    }
    assert!(got.contains("to='alice@localhost/phone'"), "{got}");
    // Alice resends what the server did not count.
    alice.send(&message("bob@localhost/pc", "a3")).await;
    let got = bob.until("id='a3'").await;
    assert_eq!(count(&got, "a1") + count(&got, "a2"), 0, "{got}");
    alice.send("<r xmlns='urn:xmpp:sm:3'/>").await;
    let ack = alice.until("<a xmlns='urn:xmpp:sm:3' h='3'/>").await;
    assert!(!ack.contains("stream:error"), "{ack}");
    // Alice has handled all five: an exact ack is accepted, the stream goes on.
    alice.send("<a xmlns='urn:xmpp:sm:3' h='5'/>").await;
    bob.send(&message("alice@localhost/phone", "b6")).await;
    let got = alice.until("id='b6'").await;
    assert!(!got.contains("stream:error"), "{got}");
    assert_eq!(server.edge.session_count(), 2);
    assert!(server.router.undeliverable.lock().is_empty());
    let events = server.router.events.lock().clone();
    assert!(
        !events.iter().any(|e| e.starts_with("ended alice")),
        "the session never ended: {events:?}"
    );
    // The server's count is exact too: six sent in all (b1..b6), which an ack one too
    // high reveals.
    alice.send("<a xmlns='urn:xmpp:sm:3' h='7'/>").await;
    let rest = alice.rest().await;
    assert!(
        rest.contains("<handled-count-too-high xmlns='urn:xmpp:sm:3' h='7' send-count='6'/>"),
        "{rest}"
    );
    server.router.wait_undeliverable(&["b6"]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_too_late_fails_and_hands_stanzas_back() {
    let server = start(|s| s.sm_max_resume_secs = 1).await;
    let mut alice = server.session("alice", "phone").await;
    let mut bob = server.session("bob", "pc").await;
    let id = enable_resumption(&mut alice).await;
    for n in 1..=2 {
        bob.send(&message("alice@localhost/phone", &format!("b{n}")))
            .await;
    }
    alice.until("id='b2'").await;
    drop(alice);
    server.wait_detached("alice@localhost/phone").await;
    bob.send(&message("alice@localhost/phone", "b3")).await;
    server
        .router
        .wait_for("ended alice@localhost/phone Timeout")
        .await;
    server.router.wait_undeliverable(&["b1", "b2", "b3"]).await;
    assert_eq!(server.router.undeliverable.lock().len(), 3, "each once");
    assert_eq!(server.edge.session_count(), 1);

    let (mut alice, _) = server.login("alice").await;
    alice
        .send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='2'/>"
        ))
        .await;
    let failed = alice.until("</failed>").await;
    assert!(
        failed.contains(
            "<failed xmlns='urn:xmpp:sm:3' h='0'><item-not-found \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
        ),
        "the h of the expired session is known: {failed}"
    );
    // An id that never existed: no h.
    alice
        .send("<resume xmlns='urn:xmpp:sm:3' previd='AAAAAAAAAAAAAAAAAAAAAA' h='0'/>")
        .await;
    let failed = alice.until("</failed>").await;
    assert!(
        failed.contains("<failed xmlns='urn:xmpp:sm:3'><item-not-found"),
        "{failed}"
    );
    // The client binds a fresh session on the same stream.
    assert_eq!(bind(&mut alice, "phone").await, "alice@localhost/phone");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_while_the_old_connection_is_open_closes_it_with_conflict() {
    let server = start(|_| {}).await;
    let mut old = server.session("alice", "phone").await;
    let mut bob = server.session("bob", "pc").await;
    let id = enable_resumption(&mut old).await;
    bob.send(&message("alice@localhost/phone", "b1")).await;
    old.until("id='b1'").await;
    old.send(&message("bob@localhost/pc", "a1")).await;
    bob.until("id='a1'").await;

    let (mut new, _) = server.login("alice").await;
    new.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
    ))
    .await;
    let resumed = new.until("/>").await;
    assert_eq!(
        resumed,
        format!("<resumed xmlns='urn:xmpp:sm:3' previd='{id}' h='1'/>")
    );
    let got = new.until("id='b1'").await;
    assert!(!got.contains("stream:error"), "{got}");
    let rest = old.rest().await;
    assert!(stream_error(&rest, "conflict"), "{rest}");

    bob.send(&message("alice@localhost/phone", "b2")).await;
    new.until("id='b2'").await;
    new.send("<a xmlns='urn:xmpp:sm:3' h='2'/>").await;
    new.send(&message("bob@localhost/pc", "a2")).await;
    bob.until("id='a2'").await;
    assert_eq!(server.edge.session_count(), 2);
    assert_eq!(server.registry.count().await.unwrap(), 2);
    let events = server.router.events.lock().clone();
    assert!(
        !events.iter().any(|e| e.starts_with("ended alice")),
        "{events:?}"
    );
    assert!(server.router.undeliverable.lock().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_resumption_hand_unacked_stanzas_back() {
    let server = start(|_| {}).await;
    let mut bob = server.session("bob", "pc").await;

    // Stream management without resumption, connection cut: unacked stanzas go back.
    let mut alice = server.session("alice", "sm").await;
    alice.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
    alice.until("<enabled xmlns='urn:xmpp:sm:3'/>").await;
    for n in 1..=3 {
        bob.send(&message("alice@localhost/sm", &format!("s{n}")))
            .await;
    }
    alice.until("id='s3'").await;
    alice.send("<a xmlns='urn:xmpp:sm:3' h='1'/>").await;
    alice.send("<r xmlns='urn:xmpp:sm:3'/>").await;
    alice.until("<a xmlns='urn:xmpp:sm:3' h='0'/>").await;
    drop(alice);
    server
        .router
        .wait_for("ended alice@localhost/sm ConnectionLost")
        .await;
    server.router.wait_undeliverable(&["s2", "s3"]).await;
    assert!(
        !server.router.undeliverable.lock().iter().any(|i| i == "s1"),
        "s1 was acknowledged"
    );

    // Resumable, but closed cleanly: nothing is kept, everything unacked goes back.
    let mut carol = server.session("alice", "clean").await;
    enable_resumption(&mut carol).await;
    bob.send(&message("alice@localhost/clean", "c1")).await;
    carol.until("id='c1'").await;
    carol.send("</stream:stream>").await;
    carol.rest().await;
    server
        .router
        .wait_for("ended alice@localhost/clean Closed")
        .await;
    server.router.wait_undeliverable(&["c1"]).await;
    assert_eq!(server.edge.session_count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_requests_acks_every_n_stanzas_and_bounds_the_queue() {
    let server = start(|s| {
        s.sm_ack_every_stanzas = 2;
        s.sm_max_unacked_stanzas = 4;
    })
    .await;
    let mut alice = server.session("alice", "phone").await;
    let mut bob = server.session("bob", "pc").await;
    alice.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
    alice.until("<enabled xmlns='urn:xmpp:sm:3'/>").await;
    for n in 1..=2 {
        bob.send(&message("alice@localhost/phone", &format!("q{n}")))
            .await;
    }
    let got = alice.until("<r xmlns='urn:xmpp:sm:3'/>").await;
    assert_eq!(count(&got, "q1") + count(&got, "q2"), 2, "{got}");
    // Alice never acks: the fifth unacked stanza closes the stream.
    for n in 3..=5 {
        bob.send(&message("alice@localhost/phone", &format!("q{n}")))
            .await;
    }
    let rest = alice.rest().await;
    assert!(stream_error(&rest, "policy-violation"), "{rest}");
    server
        .router
        .wait_undeliverable(&["q1", "q2", "q3", "q4", "q5"])
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_queue_overflow_ends_the_session_and_hands_everything_back() {
    let server = start(|s| s.sm_max_unacked_stanzas = 3).await;
    let mut alice = server.session("alice", "phone").await;
    let mut bob = server.session("bob", "pc").await;
    enable_resumption(&mut alice).await;
    for n in 1..=2 {
        bob.send(&message("alice@localhost/phone", &format!("d{n}")))
            .await;
    }
    alice.until("id='d2'").await;
    drop(alice);
    server.wait_detached("alice@localhost/phone").await;
    bob.send(&message("alice@localhost/phone", "d3")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.router.undeliverable.lock().is_empty(), "d3 is held");
    bob.send(&message("alice@localhost/phone", "d4")).await;
    server
        .router
        .wait_undeliverable(&["d1", "d2", "d3", "d4"])
        .await;
    server
        .router
        .wait_for("ended alice@localhost/phone StreamError(PolicyViolation)")
        .await;
    assert_eq!(server.router.undeliverable.lock().len(), 4, "each once");
    assert_eq!(server.edge.session_count(), 1);
    server.stop().await;
}
