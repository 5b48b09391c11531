//! Routing-table tests: a real router (workers, queues, modules) over a `LocalRegistry`, an
//! in-memory redb store and two fake edges made of channel links.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use starling_cluster::{Edges, RouterLink, ToEdge, ToRouter, channel_link};
use starling_registry::{LocalRegistry, SessionRecord, SessionRegistry};
use starling_sasl::{HashAlgo, derive_credentials, verify_plain_password};
use starling_store::{AccountStore, BareUser, OfflineStore, RedbStore};
use starling_xml::Element;
use starling_xmpp::jid::parse_full;
use starling_xmpp::{FullJid, StreamErrorCondition};
use tokio::sync::mpsc::Receiver;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::modules::{self, Disco, Module, Ping};
use crate::router::shard;
use crate::{Router, RouterDeps, RouterError, Settings};

const DOMAIN: &str = "example.org";
const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

fn settings() -> Settings {
    Settings {
        domains: vec![DOMAIN.to_owned()],
        workers: 4,
        queue_per_worker: 64,
        scram_iterations: 64,
        ..Settings::default()
    }
}

fn el(xml: &str) -> Element {
    Element::parse(Bytes::from(xml.to_owned()), "jabber:client").unwrap()
}

fn text(el: &Element) -> &str {
    std::str::from_utf8(el.raw()).unwrap()
}

/// The stanza error condition inside an error reply.
fn condition(el: &Element) -> String {
    assert_eq!(el.stanza_type().as_deref(), Some("error"), "{}", text(el));
    let raw = text(el);
    let at = raw
        .find(&format!(" xmlns='{STANZAS_NS}'"))
        .unwrap_or_else(|| panic!("no condition in {raw}"));
    let start = raw[..at].rfind('<').unwrap() + 1;
    raw[start..at].to_owned()
}

struct Harness {
    link: Arc<dyn RouterLink>,
    registry: Arc<LocalRegistry>,
    store: Arc<RedbStore>,
    e1: Receiver<ToEdge>,
    e2: Receiver<ToEdge>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    /// The router's entity capabilities.
    caps: crate::caps::Caps,
}

impl Harness {
    async fn new() -> Self {
        Self::with(settings(), modules::default_modules()).await
    }

    async fn with(settings: Settings, modules: Vec<Arc<dyn Module>>) -> Self {
        let store = Arc::new(RedbStore::open_in_memory().unwrap());
        let registry = Arc::new(LocalRegistry::default());
        let edges = Arc::new(Edges::new());
        let (l1, e1) = channel_link::<ToEdge>(4096);
        let (l2, e2) = channel_link::<ToEdge>(4096);
        edges.insert(Arc::from("e1"), Arc::new(l1));
        edges.insert(Arc::from("e2"), Arc::new(l2));
        for user in ["juliet", "romeo", "nurse"] {
            let salt = [7u8; 16];
            let creds = HashAlgo::ALL
                .iter()
                .map(|&h| derive_credentials(h, &format!("pw-{user}"), &salt, 16).unwrap())
                .collect();
            store
                .create(&BareUser::new(DOMAIN, user), creds)
                .await
                .unwrap();
        }
        let deps = RouterDeps {
            store: store.clone(),
            registry: registry.clone(),
            edges,
        };
        let router = Router::with_modules(settings, deps, modules).unwrap();
        let caps = router.caps().clone();
        let link = router.link();
        let cancel = CancellationToken::new();
        let tasks = router.run(cancel.clone());
        Harness {
            link,
            registry,
            store,
            e1,
            e2,
            cancel,
            tasks,
            caps,
        }
    }

    /// Binds a session; `priority` set means it has sent available presence.
    async fn bind(&self, jid: &str, node: &str, priority: Option<i8>) -> FullJid {
        let full = parse_full(jid).unwrap();
        let stream = format!("s-{jid}");
        let record = SessionRecord::new(full.clone(), Arc::from(node), Arc::from(stream.as_str()));
        self.registry.bind(record).await.unwrap();
        if let Some(p) = priority {
            self.registry
                .set_presence(&full, &stream, p, Some(Bytes::from_static(b"<presence/>")))
                .await
                .unwrap();
        }
        full
    }

    /// Sends a stanza as the edge would: `from` stamped with the session's full JID.
    async fn send(&self, from: &str, xml: &str) {
        let from = parse_full(from).unwrap();
        let stanza = el(xml);
        let stamped = Element::parse(
            stanza.with_addresses(None, Some(from.as_str())),
            "jabber:client",
        )
        .unwrap();
        self.link
            .send(ToRouter::Stanza {
                from,
                stanza: stamped,
            })
            .await
            .unwrap();
    }

    /// Sends a server ping from `from` and waits for its result on `edge`: every stanza
    /// `from` sent before has then been fully processed.
    async fn probe(&mut self, from: &str, edge: u8) {
        self.send(
            from,
            "<iq type='get' id='probe' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .await;
        let (_, reply) = self.delivery(edge).await;
        assert_eq!(reply.id().as_deref(), Some("probe"), "{}", text(&reply));
    }

    fn rx(&mut self, edge: u8) -> &mut Receiver<ToEdge> {
        if edge == 1 {
            &mut self.e1
        } else {
            &mut self.e2
        }
    }

    async fn next(&mut self, edge: u8) -> ToEdge {
        tokio::time::timeout(Duration::from_secs(10), self.rx(edge).recv())
            .await
            .expect("nothing reached the edge")
            .expect("edge link closed")
    }

    async fn delivery(&mut self, edge: u8) -> (Vec<String>, Element) {
        match self.next(edge).await {
            ToEdge::Deliver {
                recipients,
                stanza,
                stamp_to,
            } => {
                assert!(!stamp_to);
                (recipients.iter().map(|j| j.to_string()).collect(), stanza)
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// Asserts both edges have nothing queued (call after a probe).
    fn assert_quiet(&mut self) {
        assert!(self.e1.try_recv().is_err(), "unexpected message on e1");
        assert!(self.e2.try_recv().is_err(), "unexpected message on e2");
    }
}

#[tokio::test]
async fn message_to_a_bound_full_jid_is_delivered() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e2", Some(0)).await;
    h.bind("romeo@example.org/orchard", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<message to='romeo@example.org/orchard' type='chat' id='m1'><body>hi</body></message>",
    )
    .await;
    let (to, stanza) = h.delivery(1).await;
    assert_eq!(to, ["romeo@example.org/orchard"]);
    assert_eq!(stanza.from().as_deref(), Some("juliet@example.org/home"));
    assert_eq!(stanza.id().as_deref(), Some("m1"));
    assert!(text(&stanza).contains("<body>hi</body>"));
    // Presence and IQs to a bound full JID are delivered too.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='i1' to='romeo@example.org/orchard'><query xmlns='urn:x'/></iq>",
    )
    .await;
    let (to, stanza) = h.delivery(1).await;
    assert_eq!(
        (to[0].as_str(), stanza.id().as_deref()),
        ("romeo@example.org/orchard", Some("i1"))
    );
}

#[tokio::test]
async fn unbound_full_jid_falls_back_to_the_bare_jid() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e2", Some(0)).await;
    h.bind("romeo@example.org/orchard", "e1", Some(1)).await;
    h.send(
        "juliet@example.org/home",
        "<message to='romeo@example.org/gone' id='m1'><body>hi</body></message>",
    )
    .await;
    let (to, stanza) = h.delivery(1).await;
    assert_eq!(to, ["romeo@example.org/orchard"]);
    // The stanza keeps the address it was sent to.
    assert_eq!(stanza.to().as_deref(), Some("romeo@example.org/gone"));

    // An IQ to a resource that is not there: service-unavailable.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='i1' to='romeo@example.org/gone'><query xmlns='urn:x'/></iq>",
    )
    .await;
    let (to, reply) = h.delivery(2).await;
    assert_eq!(to, ["juliet@example.org/home"]);
    assert_eq!(condition(&reply), "service-unavailable");
    assert_eq!(reply.from().as_deref(), Some("romeo@example.org/gone"));
    assert_eq!(reply.id().as_deref(), Some("i1"));

    // Headline, groupchat, error messages and presence to it are dropped silently.
    for xml in [
        "<message type='headline' to='romeo@example.org/gone'/>",
        "<message type='groupchat' to='romeo@example.org/gone'/>",
        "<message type='error' to='romeo@example.org/gone'/>",
        "<presence to='romeo@example.org/gone'/>",
        "<iq type='result' id='r' to='romeo@example.org/gone'/>",
    ] {
        h.send("juliet@example.org/home", xml).await;
    }
    h.probe("juliet@example.org/home", 2).await;
    h.assert_quiet();
}

#[tokio::test]
async fn bare_jid_messages_follow_priorities() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e2", Some(0)).await;
    h.bind("romeo@example.org/a", "e1", Some(5)).await;
    let b = h.bind("romeo@example.org/b", "e2", Some(5)).await;
    h.bind("romeo@example.org/c", "e1", Some(1)).await;
    h.bind("romeo@example.org/neg", "e1", Some(-1)).await;
    h.bind("romeo@example.org/quiet", "e1", None).await;

    // A tie at the top: both get it, one delivery per edge.
    h.send(
        "juliet@example.org/home",
        "<message type='chat' to='romeo@example.org' id='t'/>",
    )
    .await;
    assert_eq!(h.delivery(1).await.0, ["romeo@example.org/a"]);
    assert_eq!(h.delivery(2).await.0, ["romeo@example.org/b"]);

    // Headline: every non-negative available resource.
    h.send(
        "juliet@example.org/home",
        "<message type='headline' to='romeo@example.org'/>",
    )
    .await;
    assert_eq!(
        h.delivery(1).await.0,
        ["romeo@example.org/a", "romeo@example.org/c"]
    );
    assert_eq!(h.delivery(2).await.0, ["romeo@example.org/b"]);

    // The highest priority wins alone.
    h.registry
        .set_presence(
            &b,
            "s-romeo@example.org/b",
            7,
            Some(Bytes::from_static(b"<presence/>")),
        )
        .await
        .unwrap();
    h.send(
        "juliet@example.org/home",
        "<message to='romeo@example.org' id='n'/>",
    )
    .await;
    let (to, stanza) = h.delivery(2).await;
    assert_eq!(to, ["romeo@example.org/b"]);
    assert_eq!(stanza.id().as_deref(), Some("n"));
    h.probe("juliet@example.org/home", 2).await;
    h.assert_quiet();

    // Only negative-priority or unavailable resources: nobody takes it, so it is stored
    // offline (RFC 6121 §8.5.2.2.1, §4.7.2.3).
    h.bind("nurse@example.org/neg", "e1", Some(-5)).await;
    h.bind("nurse@example.org/quiet", "e1", None).await;
    h.send(
        "juliet@example.org/home",
        "<message type='chat' to='nurse@example.org' id='x'/>",
    )
    .await;
    h.probe("juliet@example.org/home", 2).await;
    h.assert_quiet();
    let nurse = BareUser::new(DOMAIN, "nurse");
    assert_eq!(h.store.count_offline(&nurse).await.unwrap(), 1);

    // Groupchat to a bare JID is never delivered (RFC 6121 §8.5.2.1.1).
    h.send(
        "juliet@example.org/home",
        "<message type='groupchat' to='romeo@example.org'/>",
    )
    .await;
    assert_eq!(condition(&h.delivery(2).await.1), "service-unavailable");
}

#[tokio::test]
async fn message_without_to_goes_to_the_senders_own_resources() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(1)).await;
    h.bind("juliet@example.org/work", "e2", Some(3)).await;
    h.send(
        "juliet@example.org/home",
        "<message id='self'><body>note</body></message>",
    )
    .await;
    let (to, stanza) = h.delivery(2).await;
    assert_eq!(to, ["juliet@example.org/work"]);
    assert_eq!(stanza.id().as_deref(), Some("self"));
}

#[tokio::test]
async fn unknown_account_gets_service_unavailable() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e2", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<message type='chat' to='nobody@example.org' id='u1'><body>?</body></message>",
    )
    .await;
    let (to, reply) = h.delivery(2).await;
    assert_eq!(to, ["juliet@example.org/home"]);
    assert_eq!(reply.name(), "message");
    assert_eq!(condition(&reply), "service-unavailable");
    assert_eq!(reply.from().as_deref(), Some("nobody@example.org"));
    assert_eq!(reply.to().as_deref(), Some("juliet@example.org/home"));
    assert_eq!(reply.id().as_deref(), Some("u1"));
    assert!(
        !text(&reply).contains("<body>"),
        "the payload is not echoed"
    );

    // The same for a full JID of an unknown account, and for an IQ to its bare JID.
    h.send(
        "juliet@example.org/home",
        "<message to='nobody@example.org/x' id='u2'/>",
    )
    .await;
    assert_eq!(condition(&h.delivery(2).await.1), "service-unavailable");
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='u3' to='nobody@example.org'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(2).await.1), "service-unavailable");

    // An error is never answered with an error.
    h.send(
        "juliet@example.org/home",
        "<message type='error' to='nobody@example.org'/>",
    )
    .await;
    h.probe("juliet@example.org/home", 2).await;
    h.assert_quiet();
}

#[tokio::test]
async fn remote_domain_gets_remote_server_not_found() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<message to='someone@elsewhere.net' id='r1'><body>hi</body></message>",
    )
    .await;
    let (to, reply) = h.delivery(1).await;
    assert_eq!(to, ["juliet@example.org/home"]);
    assert_eq!(condition(&reply), "remote-server-not-found");
    assert_eq!(reply.from().as_deref(), Some("someone@elsewhere.net"));
    // A malformed address gets jid-malformed from the sender's own server.
    h.send("juliet@example.org/home", "<message to='a@b@c' id='r2'/>")
        .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(condition(&reply), "jid-malformed");
    assert_eq!(reply.from().as_deref(), Some("example.org"));
}

#[tokio::test]
async fn ping_is_answered_with_and_without_to() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='p1' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    let (to, reply) = h.delivery(1).await;
    assert_eq!(to, ["juliet@example.org/home"]);
    assert_eq!(reply.stanza_type().as_deref(), Some("result"));
    assert_eq!(reply.id().as_deref(), Some("p1"));
    assert_eq!(reply.from().as_deref(), Some("example.org"));
    assert_eq!(reply.to().as_deref(), Some("juliet@example.org/home"));
    assert!(reply.first_child().is_none());
    // Without `to`, answered on behalf of the account (RFC 6120 §8.1.2.1: from the bare JID).
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(reply.stanza_type().as_deref(), Some("result"));
    assert_eq!(reply.id().as_deref(), Some("p2"));
    assert_eq!(reply.from().as_deref(), Some("juliet@example.org"));
    // A `set` is not defined for ping.
    h.send(
        "juliet@example.org/home",
        "<iq type='set' id='p3' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "not-allowed");
}

#[tokio::test]
async fn version_answers_name_and_version_and_os_only_when_set() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='v1' to='example.org'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(
        text(&reply),
        format!(
            "<iq type='result' id='v1' from='example.org' to='juliet@example.org/home'>\
             <query xmlns='jabber:iq:version'><name>Starling</name><version>{}</version>\
             </query></iq>",
            env!("CARGO_PKG_VERSION")
        )
    );

    let mut with_os = settings();
    with_os.os = Some("Plan 9".to_owned());
    let mut h = Harness::with(with_os, modules::default_modules()).await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='v2'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    assert!(text(&h.delivery(1).await.1).contains("<os>Plan 9</os>"));
}

#[tokio::test]
async fn time_answers_xep_0082_formats() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='t1' to='example.org'><time xmlns='urn:xmpp:time'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(reply.first_child(), Some(("time", "urn:xmpp:time")));
    let raw = text(&reply);
    assert!(raw.contains("<tzo>+00:00</tzo>"), "{raw}");
    let utc = raw
        .split_once("<utc>")
        .and_then(|(_, rest)| rest.split_once("</utc>"))
        .map(|(utc, _)| utc)
        .unwrap();
    // CCYY-MM-DDThh:mm:ss.sssZ
    assert_eq!(utc.len(), 24, "{utc}");
    for (i, c) in utc.char_indices() {
        let expected = match i {
            4 | 7 => '-',
            10 => 'T',
            13 | 16 => ':',
            19 => '.',
            23 => 'Z',
            _ => '0',
        };
        if expected == '0' {
            assert!(c.is_ascii_digit(), "{utc}");
        } else {
            assert_eq!(c, expected, "{utc}");
        }
    }
    let year: i32 = utc[..4].parse().unwrap();
    assert!(year >= 2024);
}

fn features_of(reply: &Element) -> Vec<String> {
    text(reply)
        .split("<feature var='")
        .skip(1)
        .map(|s| s.split_once('\'').unwrap().0.to_owned())
        .collect()
}

/// Juliet's disco#`kind` (`info` or `items`) query of the server's `node`, and its answer.
async fn disco_node(h: &mut Harness, id: &str, kind: &str, node: &str) -> Element {
    h.send(
        "juliet@example.org/home",
        &format!(
            "<iq type='get' id='{id}' to='example.org'>\
             <query xmlns='http://jabber.org/protocol/disco#{kind}' node='{node}'/></iq>"
        ),
    )
    .await;
    h.delivery(1).await.1
}

#[tokio::test]
async fn disco_lists_exactly_the_registered_features() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='d1' to='example.org'>\
         <query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert!(
        text(&reply).contains("<identity category='server' type='im' name='Starling'/>"),
        "{}",
        text(&reply)
    );
    assert_eq!(
        features_of(&reply),
        [
            "http://jabber.org/protocol/disco#info",
            "http://jabber.org/protocol/disco#items",
            "jabber:iq:version",
            "urn:xmpp:ping",
            "urn:xmpp:time",
            "jabber:iq:register",
            "vcard-temp",
            "jabber:iq:private",
            "urn:xmpp:blocking",
            "urn:xmpp:carbons:2",
            "urn:xmpp:receipts",
            "http://jabber.org/protocol/caps",
        ]
    );
    // XEP-0115 §6.2: the caps node answers the same, with the node echoed; its `ver` is the
    // hash of exactly those identities and features (§5.1).
    let plain = text(&reply).to_owned();
    let node = h.caps.disco_node();
    let with_node = disco_node(&mut h, "d1n", "info", &node).await;
    assert_eq!(
        text(&with_node)
            .replace(&format!(" node='{node}'"), "")
            .replace("d1n", "d1"),
        plain
    );
    let features = features_of(&with_node);
    let features: Vec<&str> = features.iter().map(String::as_str).collect();
    let expected =
        crate::caps::verification_string(&modules::identities(&settings()), &features, &[]);
    assert_eq!(h.caps.ver, expected);
    assert_eq!(h.caps.node, crate::caps::NODE);
    // Items of the caps node: it is no items node (§6.2).
    let items = disco_node(&mut h, "d1i", "items", &node).await;
    assert_eq!(condition(&items), "item-not-found");
    // Items: none yet.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='d2' to='example.org'>\
         <query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert!(text(&reply).contains("<query xmlns='http://jabber.org/protocol/disco#items'/>"));
    // An unknown node.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='d3' to='example.org'>\
         <query xmlns='http://jabber.org/protocol/disco#info' node='x'/></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "item-not-found");

    // With fewer modules, disco advertises fewer features and the rest is unavailable.
    let fewer: Vec<Arc<dyn Module>> = vec![Arc::new(Disco), Arc::new(Ping)];
    let mut h = Harness::with(settings(), fewer).await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='d4'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    )
    .await;
    assert_eq!(
        features_of(&h.delivery(1).await.1),
        [
            "http://jabber.org/protocol/disco#info",
            "http://jabber.org/protocol/disco#items",
            "urn:xmpp:ping",
        ]
    );
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='d5' to='example.org'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "service-unavailable");
}

#[tokio::test]
async fn other_server_iqs() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    // Unknown namespace.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='x1' to='example.org'><query xmlns='urn:unknown'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(condition(&reply), "service-unavailable");
    assert_eq!(reply.from().as_deref(), Some("example.org"));
    // No payload, or a type that does not exist.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='x2' to='example.org'/>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "bad-request");
    h.send(
        "juliet@example.org/home",
        "<iq type='fetch' id='x3' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "bad-request");
    // An IQ to the bare JID of an existing account: no module answers it yet.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='x4' to='romeo@example.org'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(condition(&reply), "service-unavailable");
    assert_eq!(reply.from().as_deref(), Some("romeo@example.org"));
    // A chat message to the server.
    h.send(
        "juliet@example.org/home",
        "<message type='chat' to='example.org' id='x5'/>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "service-unavailable");
    // Results and errors to the server are dropped.
    h.send(
        "juliet@example.org/home",
        "<iq type='result' id='x6' to='example.org'/>",
    )
    .await;
    h.send(
        "juliet@example.org/home",
        "<iq type='error' id='x7' to='example.org'><error type='cancel'/></iq>",
    )
    .await;
    h.send("juliet@example.org/home", "<iq type='result' id='x8'/>")
        .await;
    h.probe("juliet@example.org/home", 1).await;
    h.assert_quiet();
}

#[tokio::test]
async fn register_get_and_password_change() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='g'><query xmlns='jabber:iq:register'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert!(
        text(&reply).contains(
            "<query xmlns='jabber:iq:register'><registered/><username>juliet</username></query>"
        ),
        "{}",
        text(&reply)
    );

    h.send(
        "juliet@example.org/home",
        "<iq type='set' id='c1' to='example.org'><query xmlns='jabber:iq:register'>\
         <username>juliet</username><password>n&amp;w-secret</password></query></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(
        reply.stanza_type().as_deref(),
        Some("result"),
        "{}",
        text(&reply)
    );
    let user = BareUser::new(DOMAIN, "juliet");
    for hash in HashAlgo::ALL {
        let creds = h.store.credentials(&user, hash).await.unwrap().unwrap();
        assert_eq!(creds.iterations, 64);
        assert!(verify_plain_password(&creds, "n&w-secret"), "{hash:?}");
        assert!(!verify_plain_password(&creds, "pw-juliet"));
    }

    // Someone else's username, or an empty password: refused, password unchanged.
    h.send(
        "juliet@example.org/home",
        "<iq type='set' id='c2'><query xmlns='jabber:iq:register'>\
         <username>romeo</username><password>x</password></query></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "bad-request");
    h.send(
        "juliet@example.org/home",
        "<iq type='set' id='c3'><query xmlns='jabber:iq:register'>\
         <username>juliet</username><password/></query></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "not-acceptable");
    let creds = h
        .store
        .credentials(&user, HashAlgo::Sha256)
        .await
        .unwrap()
        .unwrap();
    assert!(verify_plain_password(&creds, "n&w-secret"));
}

#[tokio::test]
async fn register_remove_deletes_the_account_and_closes_its_sessions() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.bind("juliet@example.org/work", "e2", Some(0)).await;
    // <remove/> with company is a bad request.
    h.send(
        "juliet@example.org/home",
        "<iq type='set' id='r0'><query xmlns='jabber:iq:register'><remove/>\
         <username>juliet</username></query></iq>",
    )
    .await;
    assert_eq!(condition(&h.delivery(1).await.1), "bad-request");

    h.send(
        "juliet@example.org/home",
        "<iq type='set' id='r1'><query xmlns='jabber:iq:register'><remove/></query></iq>",
    )
    .await;
    // The result first, then the close, on the requesting session's edge.
    let (to, reply) = h.delivery(1).await;
    assert_eq!(to, ["juliet@example.org/home"]);
    assert_eq!(reply.stanza_type().as_deref(), Some("result"));
    assert_eq!(reply.id().as_deref(), Some("r1"));
    match h.next(1).await {
        ToEdge::Close { jid, condition } => {
            assert_eq!(jid.as_str(), "juliet@example.org/home");
            assert_eq!(condition, StreamErrorCondition::NotAuthorized);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    match h.next(2).await {
        ToEdge::Close { jid, condition } => {
            assert_eq!(jid.as_str(), "juliet@example.org/work");
            assert_eq!(condition, StreamErrorCondition::NotAuthorized);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(
        !h.store
            .exists(&BareUser::new(DOMAIN, "juliet"))
            .await
            .unwrap()
    );
    assert!(
        h.store
            .exists(&BareUser::new(DOMAIN, "romeo"))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn undeliverable_falls_back_like_an_unbound_full_jid() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    let gone = parse_full("romeo@example.org/orchard").unwrap();
    let stanza = el("<message type='chat' from='juliet@example.org/home' \
         to='romeo@example.org/orchard' id='u1'><body>hi</body></message>");
    h.link
        .send(ToRouter::Undeliverable {
            recipient: gone.clone(),
            stanza: stanza.clone(),
        })
        .await
        .unwrap();
    // No other resource: stored offline for the account, no error.
    h.probe("juliet@example.org/home", 1).await;
    h.assert_quiet();
    let romeo = BareUser::new(DOMAIN, "romeo");
    assert_eq!(h.store.count_offline(&romeo).await.unwrap(), 1);

    // An IQ: service-unavailable too.
    let iq = el(
        "<iq type='get' from='juliet@example.org/home' to='romeo@example.org/orchard' \
         id='u2'><query xmlns='urn:x'/></iq>",
    );
    h.link
        .send(ToRouter::Undeliverable {
            recipient: gone.clone(),
            stanza: iq,
        })
        .await
        .unwrap();
    assert_eq!(condition(&h.delivery(1).await.1), "service-unavailable");

    // Another resource is available: the message goes there, never back to the one the
    // edge reported gone even if the registry still lists it.
    h.bind("romeo@example.org/orchard", "e2", Some(9)).await;
    h.bind("romeo@example.org/balcony", "e2", Some(1)).await;
    h.link
        .send(ToRouter::Undeliverable {
            recipient: gone,
            stanza,
        })
        .await
        .unwrap();
    let (to, stanza) = h.delivery(2).await;
    assert_eq!(to, ["romeo@example.org/balcony"]);
    assert_eq!(stanza.id().as_deref(), Some("u1"));
}

#[tokio::test]
async fn an_edge_link_failure_is_treated_as_undeliverable() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    // romeo's session sits on an edge this router has no link to.
    h.bind("romeo@example.org/orchard", "e9", Some(0)).await;
    h.send(
        "juliet@example.org/home",
        "<message type='chat' to='romeo@example.org/orchard' id='l1'/>",
    )
    .await;
    // Falls back to the bare JID, which has no other resource: stored offline.
    h.probe("juliet@example.org/home", 1).await;
    h.assert_quiet();
    let romeo = BareUser::new(DOMAIN, "romeo");
    assert_eq!(h.store.count_offline(&romeo).await.unwrap(), 1);
}

#[tokio::test]
async fn one_senders_stanzas_arrive_in_order() {
    let mut s = settings();
    s.workers = 4;
    s.queue_per_worker = 8;
    let mut h = Harness::with(s, modules::default_modules()).await;
    h.bind("juliet@example.org/home", "e2", Some(0)).await;
    h.bind("romeo@example.org/orchard", "e1", Some(0)).await;
    let link = h.link.clone();
    let sender = tokio::spawn(async move {
        let from = parse_full("juliet@example.org/home").unwrap();
        for i in 0..1000 {
            let stanza = el(&format!(
                "<message from='juliet@example.org/home' to='romeo@example.org/orchard' \
                 id='{i}'/>"
            ));
            link.send(ToRouter::Stanza {
                from: from.clone(),
                stanza,
            })
            .await
            .unwrap();
        }
    });
    for i in 0..1000 {
        let (_, stanza) = h.delivery(1).await;
        assert_eq!(stanza.id().as_deref(), Some(i.to_string().as_str()));
    }
    sender.await.unwrap();
}

#[tokio::test]
async fn a_full_queue_applies_backpressure_and_cancel_drains() {
    let store = Arc::new(RedbStore::open_in_memory().unwrap());
    let registry = Arc::new(LocalRegistry::default());
    let edges = Arc::new(Edges::new());
    let (l1, mut e1) = channel_link::<ToEdge>(16);
    edges.insert(Arc::from("e1"), Arc::new(l1));
    let romeo = parse_full("romeo@example.org/orchard").unwrap();
    registry
        .bind(SessionRecord::new(
            romeo.clone(),
            Arc::from("e1"),
            Arc::from("s"),
        ))
        .await
        .unwrap();
    let mut s = settings();
    s.workers = 1;
    s.queue_per_worker = 2;
    let router = Router::new(
        s,
        RouterDeps {
            store,
            registry,
            edges,
        },
    )
    .unwrap();
    let link = router.link();
    let msg = |i: u32| ToRouter::Stanza {
        from: parse_full("juliet@example.org/home").unwrap(),
        stanza: el(&format!(
            "<message to='romeo@example.org/orchard' id='{i}'/>"
        )),
    };
    link.send(msg(0)).await.unwrap();
    link.send(msg(1)).await.unwrap();
    // The queue is full and nobody is running: the third send waits.
    let third = tokio::time::timeout(Duration::from_millis(100), link.send(msg(2))).await;
    assert!(third.is_err(), "a full queue must make send wait");

    // Cancelled before it even starts: the workers still drain what was accepted.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let mut tasks = router.run(cancel);
    while tasks.join_next().await.is_some() {}
    for i in 0..2 {
        let Some(ToEdge::Deliver { stanza, .. }) = e1.recv().await else {
            panic!("expected a delivery");
        };
        assert_eq!(stanza.id().as_deref(), Some(i.to_string().as_str()));
    }
    // After shutdown the link refuses.
    assert_eq!(
        link.send(msg(3)).await,
        Err(starling_cluster::LinkError::Closed)
    );
}

#[tokio::test]
async fn shutdown_stops_the_workers() {
    let mut h = Harness::new().await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.probe("juliet@example.org/home", 1).await;
    h.cancel.cancel();
    while let Some(res) = h.tasks.join_next().await {
        res.unwrap();
    }
}

#[tokio::test]
async fn session_events_are_accepted() {
    let mut h = Harness::new().await;
    let jid = h.bind("juliet@example.org/home", "e1", Some(0)).await;
    h.link
        .send(ToRouter::SessionStarted { jid: jid.clone() })
        .await
        .unwrap();
    h.link
        .send(ToRouter::SessionEnded {
            jid,
            reason: starling_cluster::EndReason::Closed,
        })
        .await
        .unwrap();
    h.probe("juliet@example.org/home", 1).await;
    h.assert_quiet();
}

#[test]
fn sharding_is_by_bare_jid() {
    let a = shard(crate::stanza::bare_part("juliet@example.org/home"), 8);
    let b = shard(crate::stanza::bare_part("juliet@example.org/work/x"), 8);
    assert_eq!(a, b);
    assert!(a < 8);
    assert_eq!(shard("anything", 1), 0);
    // Different users spread over the workers.
    let used: std::collections::HashSet<usize> = (0..64)
        .map(|i| shard(&format!("user{i}@example.org"), 8))
        .collect();
    assert!(used.len() > 4);
}

#[test]
fn construction_checks_the_settings() {
    let deps = || RouterDeps {
        store: Arc::new(RedbStore::open_in_memory().unwrap()),
        registry: Arc::new(LocalRegistry::default()),
        edges: Arc::new(Edges::new()),
    };
    let with = |f: fn(&mut Settings)| {
        let mut s = settings();
        f(&mut s);
        Router::new(s, deps()).map(|_| ()).unwrap_err()
    };
    assert_eq!(with(|s| s.domains.clear()), RouterError::NoDomains);
    assert!(matches!(
        with(|s| s.domains = vec!["bad domain@x".into()]),
        RouterError::InvalidDomain { .. }
    ));
    assert_eq!(with(|s| s.workers = 0), RouterError::NoWorkers);
    assert_eq!(with(|s| s.queue_per_worker = 0), RouterError::EmptyQueue);
}

#[tokio::test]
async fn served_domains_are_normalised() {
    let mut s = settings();
    s.domains = vec!["EXAMPLE.org.".into()];
    let mut h = Harness::with(s, modules::default_modules()).await;
    h.bind("juliet@example.org/home", "e1", Some(0)).await;
    // Both spellings name the served domain; the reply comes from the normalised one.
    h.send(
        "juliet@example.org/home",
        "<iq type='get' id='n1' to='Example.ORG'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    let (_, reply) = h.delivery(1).await;
    assert_eq!(reply.stanza_type().as_deref(), Some("result"));
    assert_eq!(reply.from().as_deref(), Some("example.org"));
    h.probe("juliet@example.org/home", 1).await;
}

mod im;
