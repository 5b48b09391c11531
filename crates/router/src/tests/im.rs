//! RFC 6121 through the whole router: subscriptions, presence, roster, offline messages.
//! Sessions are bound in the registry and announced with `SessionStarted`, as an edge does;
//! they become available only by sending presence.

use super::*;
use crate::modules::default_modules;
use starling_store::{OfflineStore, PresenceStore, RosterItem, RosterStore};

/// One delivery seen on an edge.
#[derive(Debug)]
struct Seen {
    to: Vec<String>,
    stanza: Element,
    stamp_to: bool,
}

impl Seen {
    fn text(&self) -> &str {
        text(&self.stanza)
    }
    fn type_(&self) -> Option<String> {
        self.stanza.stanza_type().map(|t| t.into_owned())
    }
    fn from(&self) -> Option<String> {
        self.stanza.from().map(|t| t.into_owned())
    }
}

fn seen(msg: ToEdge) -> Seen {
    match msg {
        ToEdge::Deliver {
            recipients,
            stanza,
            stamp_to,
        } => Seen {
            to: recipients.iter().map(|j| j.to_string()).collect(),
            stanza,
            stamp_to,
        },
        other => panic!("expected a delivery, got {other:?}"),
    }
}

impl Harness {
    async fn im() -> Self {
        Self::with(settings(), default_modules()).await
    }

    /// Binds a session and tells the router, as the edge does.
    async fn login(&self, jid: &str, node: &str) -> FullJid {
        let full = self.bind(jid, node, None).await;
        self.link
            .send(ToRouter::SessionStarted { jid: full.clone() })
            .await
            .unwrap();
        full
    }

    /// Unbinds a session and tells the router, as the edge does.
    async fn logout(&self, jid: &FullJid) {
        let stream = format!("s-{jid}");
        self.registry.unbind(jid, &stream).await.unwrap();
        self.link
            .send(ToRouter::SessionEnded {
                jid: jid.clone(),
                reason: starling_cluster::EndReason::ConnectionLost,
            })
            .await
            .unwrap();
    }

    /// Waits until everything `from` sent is processed (a ping answered on `edge`), and
    /// returns what both edges received meanwhile, ping result left out.
    async fn settle(&mut self, from: &str, edge: u8) -> (Vec<Seen>, Vec<Seen>) {
        self.send(
            from,
            "<iq type='get' id='settle' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .await;
        let mut on_edge = Vec::new();
        loop {
            let s = seen(self.next(edge).await);
            if s.stanza.id().as_deref() == Some("settle") {
                break;
            }
            on_edge.push(s);
        }
        let mut other = Vec::new();
        while let Ok(m) = self.rx(if edge == 1 { 2 } else { 1 }).try_recv() {
            other.push(seen(m));
        }
        if edge == 1 {
            (on_edge, other)
        } else {
            (other, on_edge)
        }
    }

    async fn item(&self, user: &str, contact: &str) -> Option<RosterItem> {
        self.store
            .roster_item(&BareUser::new(DOMAIN, user), contact)
            .await
            .unwrap()
    }
}

/// The `<item/>` attribute `name` in a roster push or result.
fn attr<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let at = xml.find(&format!(" {name}='"))? + name.len() + 3;
    let rest = xml.get(at..)?;
    rest.get(..rest.find('\'')?)
}

fn pushes(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter()
        .filter(|s| s.stanza.name() == "iq" && s.type_().as_deref() == Some("set"))
        .collect()
}

fn presences<'a>(seen: &'a [Seen], type_: Option<&str>) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.stanza.name() == "presence" && s.type_().as_deref() == type_)
        .collect()
}

const J: &str = "juliet@example.org/balcony";
const R: &str = "romeo@example.org/garden";

/// Both log in on different edges, fetch the roster and send initial presence.
async fn two_online(h: &mut Harness) {
    h.login(J, "e1").await;
    h.login(R, "e2").await;
    for (who, edge) in [(J, 1), (R, 2)] {
        h.send(
            who,
            "<iq type='get' id='r0'><query xmlns='jabber:iq:roster'/></iq>",
        )
        .await;
        h.send(who, "<presence><priority>1</priority></presence>")
            .await;
        h.settle(who, edge).await;
    }
}

#[tokio::test]
async fn subscription_handshake_to_both_from_both_sides_and_cancellation() {
    let mut h = Harness::im().await;
    two_online(&mut h).await;

    // Juliet asks Romeo (RFC 6121 §3.1).
    h.send(
        J,
        "<presence type='subscribe' to='romeo@example.org' id='s1'/>",
    )
    .await;
    let (e1, e2) = h.settle(J, 1).await;
    let p = pushes(&e1);
    assert_eq!(p.len(), 1, "{e1:?}");
    assert_eq!(attr(p[0].text(), "jid"), Some("romeo@example.org"));
    assert_eq!(attr(p[0].text(), "subscription"), Some("none"));
    assert_eq!(attr(p[0].text(), "ask"), Some("subscribe"));
    assert!(p[0].stamp_to && p[0].to == [J]);
    let req = presences(&e2, Some("subscribe"));
    assert_eq!(req.len(), 1, "{e2:?}");
    assert_eq!(req[0].from().as_deref(), Some("juliet@example.org"));
    assert_eq!(req[0].to, [R]);
    assert!(
        pushes(&e2).is_empty(),
        "a request alone is not a roster item"
    );

    // Romeo approves.
    h.send(R, "<presence type='subscribed' to='juliet@example.org'/>")
        .await;
    let (e1, e2) = h.settle(R, 2).await;
    let p = pushes(&e2);
    assert_eq!(p.len(), 1, "{e2:?}");
    assert_eq!(attr(p[0].text(), "subscription"), Some("from"));
    let p = pushes(&e1);
    assert_eq!(p.len(), 1, "{e1:?}");
    assert_eq!(attr(p[0].text(), "subscription"), Some("to"));
    assert_eq!(attr(p[0].text(), "ask"), None);
    assert_eq!(presences(&e1, Some("subscribed")).len(), 1);
    // §3.1.5: and Juliet now sees Romeo.
    let avail = presences(&e1, None);
    assert_eq!(avail.len(), 1, "{e1:?}");
    assert_eq!(avail[0].from().as_deref(), Some(R));

    // Romeo asks back, Juliet approves: both.
    h.send(R, "<presence type='subscribe' to='juliet@example.org'/>")
        .await;
    let (e1, _) = h.settle(R, 2).await;
    assert_eq!(presences(&e1, Some("subscribe")).len(), 1, "{e1:?}");
    h.send(J, "<presence type='subscribed' to='romeo@example.org'/>")
        .await;
    let (_, e2) = h.settle(J, 1).await;
    assert_eq!(presences(&e2, None)[0].from().as_deref(), Some(J));
    assert_eq!(
        h.item("juliet", "romeo@example.org")
            .await
            .unwrap()
            .subscription,
        "both"
    );
    assert_eq!(
        h.item("romeo", "juliet@example.org")
            .await
            .unwrap()
            .subscription,
        "both"
    );

    // Juliet unsubscribes from Romeo's presence (§3.3): she sees him go unavailable.
    h.send(J, "<presence type='unsubscribe' to='romeo@example.org'/>")
        .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert_eq!(presences(&e2, Some("unsubscribe")).len(), 1, "{e2:?}");
    let gone = presences(&e1, Some("unavailable"));
    assert_eq!(gone.len(), 1, "{e1:?}");
    assert_eq!(gone[0].from().as_deref(), Some(R));
    assert_eq!(
        h.item("juliet", "romeo@example.org")
            .await
            .unwrap()
            .subscription,
        "from"
    );
    assert_eq!(
        h.item("romeo", "juliet@example.org")
            .await
            .unwrap()
            .subscription,
        "to"
    );

    // Juliet cancels Romeo's subscription (§3.2): he sees her go unavailable.
    h.send(J, "<presence type='unsubscribed' to='romeo@example.org'/>")
        .await;
    let (_, e2) = h.settle(J, 1).await;
    assert_eq!(presences(&e2, Some("unsubscribed")).len(), 1, "{e2:?}");
    assert_eq!(
        presences(&e2, Some("unavailable"))[0].from().as_deref(),
        Some(J)
    );
    assert_eq!(
        h.item("juliet", "romeo@example.org")
            .await
            .unwrap()
            .subscription,
        "none"
    );
    assert_eq!(
        h.item("romeo", "juliet@example.org")
            .await
            .unwrap()
            .subscription,
        "none"
    );

    // Now presence reaches nobody but the sender's own resources.
    h.send(J, "<presence><show>away</show></presence>").await;
    let (e1, e2) = h.settle(J, 1).await;
    assert!(e2.is_empty(), "{e2:?}");
    assert_eq!(presences(&e1, None)[0].to, [J]);
}

#[tokio::test]
async fn a_request_waits_for_an_offline_contact_and_pre_approval_answers_for_the_user() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    h.send(J, "<presence type='subscribe' to='romeo@example.org'/>")
        .await;
    h.settle(J, 1).await;
    // Kept as "pending in", hidden from Romeo's roster.
    let kept = h.item("romeo", "juliet@example.org").await.unwrap();
    assert_eq!(kept.subscription, "none+in+hidden");

    h.login(R, "e2").await;
    h.send(
        R,
        "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>",
    )
    .await;
    let (_, e2) = h.settle(R, 2).await;
    let result = e2
        .iter()
        .find(|s| s.stanza.id().as_deref() == Some("r"))
        .unwrap();
    assert!(!result.text().contains("<item"), "{}", result.text());
    // At his initial presence he gets the request.
    h.send(R, "<presence/>").await;
    let (_, e2) = h.settle(R, 2).await;
    let req = presences(&e2, Some("subscribe"));
    assert_eq!(req.len(), 1, "{e2:?}");
    assert_eq!(req[0].from().as_deref(), Some("juliet@example.org"));

    // He denies it: the hidden item goes away, Juliet's ask is cleared.
    h.send(R, "<presence type='unsubscribed' to='juliet@example.org'/>")
        .await;
    let (e1, _) = h.settle(R, 2).await;
    assert_eq!(presences(&e1, Some("unsubscribed")).len(), 1, "{e1:?}");
    assert!(h.item("romeo", "juliet@example.org").await.is_none());
    let j = h.item("juliet", "romeo@example.org").await.unwrap();
    assert_eq!((j.subscription.as_str(), j.ask), ("none", false));

    // Pre-approval (§3.4): Romeo approves before Juliet asks; her request is answered by
    // the server and never shown to him.
    h.send(R, "<presence type='subscribed' to='juliet@example.org'/>")
        .await;
    let (e1, e2) = h.settle(R, 2).await;
    assert!(e1.is_empty(), "a pre-approval is not routed: {e1:?}");
    assert_eq!(attr(pushes(&e2)[0].text(), "approved"), Some("true"));
    h.send(J, "<presence type='subscribe' to='juliet@example.org'/>")
        .await;
    h.send(J, "<presence type='subscribe' to='romeo@example.org'/>")
        .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert!(presences(&e2, Some("subscribe")).is_empty(), "{e2:?}");
    assert_eq!(presences(&e1, Some("subscribed")).len(), 1, "{e1:?}");
    assert_eq!(presences(&e1, None)[0].from().as_deref(), Some(R));
    assert_eq!(
        h.item("romeo", "juliet@example.org")
            .await
            .unwrap()
            .subscription,
        "from"
    );
    assert_eq!(
        h.item("juliet", "romeo@example.org")
            .await
            .unwrap()
            .subscription,
        "to"
    );
}

#[tokio::test]
async fn a_request_to_nobody_is_answered_unsubscribed() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    h.send(J, "<presence type='subscribe' to='ghost@example.org'/>")
        .await;
    let (e1, _) = h.settle(J, 1).await;
    let no = presences(&e1, Some("unsubscribed"));
    assert_eq!(no.len(), 1, "{e1:?}");
    assert_eq!(no[0].from().as_deref(), Some("ghost@example.org"));
    let item = h.item("juliet", "ghost@example.org").await.unwrap();
    assert_eq!((item.subscription.as_str(), item.ask), ("none", false));
}

/// Juliet and Romeo subscribed both ways in the store, before anyone logs in.
async fn mutual(h: &Harness) {
    for (user, contact) in [
        ("juliet", "romeo@example.org"),
        ("romeo", "juliet@example.org"),
    ] {
        h.store
            .set_roster_item(
                &BareUser::new(DOMAIN, user),
                RosterItem {
                    jid: contact.to_owned(),
                    name: None,
                    subscription: "both".to_owned(),
                    ask: false,
                    groups: vec![],
                },
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn presence_is_broadcast_probed_and_unavailable_on_session_end() {
    let mut h = Harness::im().await;
    mutual(&h).await;
    let j2 = "juliet@example.org/kitchen";
    h.login(J, "e1").await;
    h.login(j2, "e1").await;
    h.send(J, "<presence><status>here</status></presence>")
        .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert!(e2.is_empty());
    // Only to her own available resources (the sender itself), not to the one that
    // sent no presence yet.
    assert_eq!(presences(&e1, None)[0].to, [J]);

    h.send(j2, "<presence/>").await;
    h.settle(j2, 1).await;

    // Romeo comes online: his presence goes to both of Juliet's resources in one message
    // for edge e1 (DESIGN.md "Fan-out"), and his initial presence is answered with hers.
    let romeo = h.login(R, "e2").await;
    h.send(R, "<presence><priority>3</priority></presence>")
        .await;
    let (e1, e2) = h.settle(R, 2).await;
    let b = presences(&e1, None);
    assert_eq!(b.len(), 1, "{e1:?}");
    let mut to = b[0].to.clone();
    to.sort();
    assert_eq!(to, [J, j2]);
    assert!(b[0].stamp_to);
    let answers: Vec<_> = presences(&e2, None)
        .iter()
        .filter_map(|s| s.from())
        .collect();
    assert!(
        answers.contains(&J.to_owned()) && answers.contains(&j2.to_owned()),
        "{answers:?}"
    );
    assert!(
        text(
            &presences(&e2, None)
                .iter()
                .find(|s| s.from().as_deref() == Some(J))
                .unwrap()
                .stanza
        )
        .contains("here")
    );
    assert_eq!(
        h.registry.session(&romeo).await.unwrap().unwrap().priority,
        3
    );

    // Romeo's connection drops: Juliet's resources see him unavailable.
    h.bind("romeo@example.org/ping", "e1", None).await;
    h.logout(&romeo).await;
    // Romeo's stanzas pass the worker his session end went through.
    let (e1, _) = h.settle("romeo@example.org/ping", 1).await;
    let gone = presences(&e1, Some("unavailable"));
    assert_eq!(gone.len(), 1, "{e1:?}");
    assert_eq!(gone[0].from().as_deref(), Some(R));
    assert_eq!(gone[0].to.len(), 2);
}

#[tokio::test]
async fn directed_presence_is_undone_on_unavailable() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    let nurse = h.login("nurse@example.org/hall", "e2").await;
    h.send("nurse@example.org/hall", "<presence/>").await;
    h.settle("nurse@example.org/hall", 2).await;
    h.send(J, "<presence/>").await;
    h.send(J, "<presence to='nurse@example.org'/>").await;
    let (_, e2) = h.settle(J, 1).await;
    assert_eq!(presences(&e2, None)[0].to, [nurse.to_string()]);
    h.send(J, "<presence type='unavailable'/>").await;
    let (_, e2) = h.settle(J, 1).await;
    let gone = presences(&e2, Some("unavailable"));
    assert_eq!(gone.len(), 1, "{e2:?}");
    assert_eq!(gone[0].from().as_deref(), Some(J));
}

#[tokio::test]
async fn offline_messages_wait_for_a_non_negative_available_presence() {
    let s = Settings {
        offline_quota: 2,
        ..settings()
    };
    let mut h = Harness::with(s, default_modules()).await;
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    h.send(
        J,
        "<message type='chat' to='romeo@example.org' id='o1'><body>one</body></message>",
    )
    .await;
    h.send(J, "<message to='romeo@example.org' id='o2'/>").await;
    h.send(
        J,
        "<message type='headline' to='romeo@example.org' id='h'/>",
    )
    .await;
    // Over the quota: service-unavailable (XEP-0160 §3).
    h.send(J, "<message type='chat' to='romeo@example.org' id='o3'/>")
        .await;
    let (e1, _) = h.settle(J, 1).await;
    assert_eq!(e1.len(), 2, "{e1:?}");
    let bounce = e1
        .iter()
        .find(|s| s.stanza.id().as_deref() == Some("o3"))
        .unwrap();
    assert_eq!(condition(&bounce.stanza), "service-unavailable");
    let romeo_user = BareUser::new(DOMAIN, "romeo");
    assert_eq!(h.store.count_offline(&romeo_user).await.unwrap(), 2);

    // A negative priority does not take them (RFC 6121 §4.7.2.3).
    h.login(R, "e2").await;
    h.send(R, "<presence><priority>-1</priority></presence>")
        .await;
    let (_, e2) = h.settle(R, 2).await;
    assert!(e2.iter().all(|s| s.stanza.name() != "message"), "{e2:?}");
    // A non-negative one does, oldest first, stamped with XEP-0203 delay.
    h.send(R, "<presence><priority>0</priority></presence>")
        .await;
    let (_, e2) = h.settle(R, 2).await;
    let msgs: Vec<_> = e2.iter().filter(|s| s.stanza.name() == "message").collect();
    assert_eq!(msgs.len(), 2, "{e2:?}");
    assert_eq!(msgs[0].stanza.id().as_deref(), Some("o1"));
    assert_eq!(msgs[1].stanza.id().as_deref(), Some("o2"));
    assert_eq!(msgs[0].to, [R]);
    assert!(
        msgs[0]
            .text()
            .contains("<body>one</body><delay xmlns='urn:xmpp:delay' from='example.org' stamp='"),
        "{}",
        msgs[0].text()
    );
    assert!(msgs[1].text().ends_with("</message>"), "{}", msgs[1].text());
    assert_eq!(h.store.count_offline(&romeo_user).await.unwrap(), 0);
}

#[tokio::test]
async fn roster_get_set_remove_pushes_versions_and_limits() {
    let s = Settings {
        max_roster_items: 2,
        max_roster_name_bytes: 8,
        ..settings()
    };
    let mut h = Harness::with(s, default_modules()).await;
    let work = "juliet@example.org/work";
    h.login(J, "e1").await;
    h.login(work, "e1").await;
    h.send(
        J,
        "<iq type='get' id='g0'><query xmlns='jabber:iq:roster'/></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    assert!(e1[0].text().contains("ver='0'"), "{}", e1[0].text());

    h.send(
        J,
        "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='nurse@example.org' \
         name='Nurse' subscription='both'><group>Staff</group><group>Verona</group></item>\
         </query></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    let p = pushes(&e1);
    // Only the resource that asked for the roster is interested (work sent neither
    // presence nor a roster get).
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].to, [J]);
    assert_eq!(attr(p[0].text(), "ver"), Some("1"));
    assert_eq!(
        attr(p[0].text(), "subscription"),
        Some("none"),
        "the client's subscription is ignored"
    );
    assert!(
        p[0].text()
            .contains("<group>Staff</group><group>Verona</group>")
    );
    assert!(
        e1.iter()
            .any(|s| s.stanza.id().as_deref() == Some("s1")
                && s.type_().as_deref() == Some("result"))
    );

    // XEP-0237: up to date → empty result; stale → the whole roster.
    h.send(
        J,
        "<iq type='get' id='g1'><query xmlns='jabber:iq:roster' ver='1'/></iq>",
    )
    .await;
    h.send(
        J,
        "<iq type='get' id='g2'><query xmlns='jabber:iq:roster' ver='0'/></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    assert!(e1[0].stanza.first_child().is_none(), "{}", e1[0].text());
    assert!(
        e1[1]
            .text()
            .contains("<item jid='nurse@example.org' name='Nurse' subscription='none'>"),
        "{}",
        e1[1].text()
    );

    let bad = [
        (
            "<item jid='a@example.org'/><item jid='b@example.org'/>",
            "bad-request",
        ),
        (
            "<item jid='a@example.org'><group>x</group><group>x</group></item>",
            "bad-request",
        ),
        ("<item/>", "bad-request"),
        (
            "<item jid='a@example.org' name='much too long'/>",
            "not-acceptable",
        ),
        (
            "<item jid='a@example.org'><group/></item>",
            "not-acceptable",
        ),
        ("<item jid='juliet@example.org'/>", "not-allowed"),
        (
            "<item jid='a@example.org' subscription='remove'/>",
            "item-not-found",
        ),
    ];
    for (item, cond) in bad {
        h.send(
            J,
            &format!("<iq type='set' id='b'><query xmlns='jabber:iq:roster'>{item}</query></iq>"),
        )
        .await;
        let (e1, _) = h.settle(J, 1).await;
        assert_eq!(e1.len(), 1, "{item}: {e1:?}");
        assert_eq!(condition(&e1[0].stanza), cond, "{item}");
    }
    h.send(
        J,
        "<iq type='get' id='f' to='romeo@example.org'><query xmlns='jabber:iq:roster'/></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    assert_eq!(condition(&e1[0].stanza), "forbidden");

    // The limit: a second item fits, a third does not; updating an item still works.
    for (jid, want) in [
        ("a@example.org", None),
        ("b@example.org", Some("resource-constraint")),
        ("nurse@example.org", None),
    ] {
        h.send(J, &format!("<iq type='set' id='l'><query xmlns='jabber:iq:roster'><item jid='{jid}'/></query></iq>"))
            .await;
        let (e1, _) = h.settle(J, 1).await;
        let reply = e1
            .iter()
            .find(|s| s.stanza.id().as_deref() == Some("l"))
            .unwrap();
        match want {
            None => assert_eq!(reply.type_().as_deref(), Some("result"), "{jid}"),
            Some(c) => assert_eq!(condition(&reply.stanza), c, "{jid}"),
        }
    }

    // Remove: a push with subscription='remove'.
    h.send(J, "<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='a@example.org' subscription='remove'/></query></iq>")
        .await;
    let (e1, _) = h.settle(J, 1).await;
    let p = pushes(&e1);
    assert_eq!(attr(p[0].text(), "subscription"), Some("remove"));
    assert!(h.item("juliet", "a@example.org").await.is_none());
}

#[tokio::test]
async fn removing_a_contact_cancels_the_subscription_both_ways() {
    let mut h = Harness::im().await;
    mutual(&h).await;
    two_online(&mut h).await;
    h.send(J, "<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='romeo@example.org' subscription='remove'/></query></iq>")
        .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert_eq!(attr(pushes(&e1)[0].text(), "subscription"), Some("remove"));
    assert_eq!(presences(&e2, Some("unsubscribe")).len(), 1, "{e2:?}");
    assert_eq!(presences(&e2, Some("unsubscribed")).len(), 1, "{e2:?}");
    // Romeo no longer sees Juliet, and his roster says so.
    assert_eq!(
        presences(&e2, Some("unavailable"))[0].from().as_deref(),
        Some(J)
    );
    let p = pushes(&e2);
    assert_eq!(attr(p.last().unwrap().text(), "subscription"), Some("none"));
    assert_eq!(
        h.item("romeo", "juliet@example.org")
            .await
            .unwrap()
            .subscription,
        "none"
    );
    assert!(h.item("juliet", "romeo@example.org").await.is_none());
}

#[tokio::test]
async fn bare_jid_messages_follow_the_priority_of_sent_presence() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    let (a, b, c) = (
        "romeo@example.org/a",
        "romeo@example.org/b",
        "romeo@example.org/c",
    );
    for (who, prio) in [(a, "2"), (b, "2"), (c, "-1")] {
        h.login(who, "e2").await;
        h.send(
            who,
            &format!("<presence><priority>{prio}</priority></presence>"),
        )
        .await;
    }
    h.settle(a, 2).await;
    // Equal top priorities: both (RFC 6121 §8.5.2.1.1); never the negative one.
    h.send(J, "<message type='chat' to='romeo@example.org' id='m1'/>")
        .await;
    let (_, e2) = h.settle(J, 1).await;
    let mut to = e2[0].to.clone();
    to.sort();
    assert_eq!(to, [a, b]);
    // B raises its priority: it alone gets the next one.
    h.send(b, "<presence><priority>3</priority></presence>")
        .await;
    h.settle(b, 2).await;
    h.send(J, "<message type='chat' to='romeo@example.org' id='m2'/>")
        .await;
    let (_, e2) = h.settle(J, 1).await;
    assert_eq!(e2[0].to, [b]);
    // Only the negative one left available: stored offline.
    for who in [a, b] {
        h.send(who, "<presence type='unavailable'/>").await;
    }
    h.settle(a, 2).await;
    h.send(J, "<message type='chat' to='romeo@example.org' id='m3'/>")
        .await;
    let (_, e2) = h.settle(J, 1).await;
    assert!(e2.iter().all(|s| s.stanza.name() != "message"), "{e2:?}");
    let romeo = BareUser::new(DOMAIN, "romeo");
    assert_eq!(h.store.count_offline(&romeo).await.unwrap(), 1);
}

#[tokio::test]
async fn a_full_roster_takes_no_strangers_request() {
    let s = Settings {
        max_roster_items: 1,
        ..settings()
    };
    let mut h = Harness::with(s, default_modules()).await;
    h.login(J, "e1").await;
    h.send(J, "<presence type='subscribe' to='romeo@example.org'/>")
        .await;
    h.settle(J, 1).await;
    h.login("nurse@example.org/hall", "e2").await;
    h.send(
        "nurse@example.org/hall",
        "<presence type='subscribe' to='romeo@example.org'/>",
    )
    .await;
    h.settle("nurse@example.org/hall", 2).await;
    assert!(h.item("romeo", "juliet@example.org").await.is_some());
    assert!(h.item("romeo", "nurse@example.org").await.is_none());
}

#[tokio::test]
async fn vcard_temp_get_set_and_others_read_only() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    h.send(J, "<iq type='get' id='v0'><vCard xmlns='vcard-temp'/></iq>")
        .await;
    h.send(
        J,
        "<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Juliet Capulet</FN></vCard></iq>",
    )
    .await;
    h.send(J, "<iq type='get' id='v2'><vCard xmlns='vcard-temp'/></iq>")
        .await;
    let (e1, _) = h.settle(J, 1).await;
    assert!(
        e1[0].text().contains("<vCard xmlns='vcard-temp'/>"),
        "{}",
        e1[0].text()
    );
    assert_eq!(e1[1].type_().as_deref(), Some("result"));
    assert!(
        e1[2].text().contains("<FN>Juliet Capulet</FN>"),
        "{}",
        e1[2].text()
    );

    // Romeo reads it at her bare JID, and may not write it.
    h.login(R, "e2").await;
    h.send(
        R,
        "<iq type='get' id='v3' to='juliet@example.org'><vCard xmlns='vcard-temp'/></iq>",
    )
    .await;
    h.send(
        R,
        "<iq type='set' id='v4' to='juliet@example.org'><vCard xmlns='vcard-temp'/></iq>",
    )
    .await;
    let (_, e2) = h.settle(R, 2).await;
    assert!(e2[0].text().contains("Juliet Capulet"));
    assert_eq!(e2[0].from().as_deref(), Some("juliet@example.org"));
    assert_eq!(condition(&e2[1].stanza), "forbidden");
}

#[tokio::test]
async fn private_xml_storage_by_namespace() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    h.send(
        J,
        "<iq type='get' id='p0'><query xmlns='jabber:iq:private'><prefs xmlns='x:p'/></query></iq>",
    )
    .await;
    h.send(
        J,
        "<iq type='set' id='p1'><query xmlns='jabber:iq:private'><prefs xmlns='x:p'><a>1</a></prefs></query></iq>",
    )
    .await;
    h.send(
        J,
        "<iq type='get' id='p2'><query xmlns='jabber:iq:private'><prefs xmlns='x:p'/></query></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    assert!(
        e1[0]
            .text()
            .contains("<query xmlns='jabber:iq:private'><prefs xmlns='x:p'/></query>"),
        "{}",
        e1[0].text()
    );
    assert_eq!(e1[1].type_().as_deref(), Some("result"));
    assert!(
        e1[2].text().contains("<prefs xmlns='x:p'><a>1</a></prefs>"),
        "{}",
        e1[2].text()
    );

    let bad = [
        ("<query xmlns='jabber:iq:private'/>", "not-acceptable", ""),
        (
            "<query xmlns='jabber:iq:private'><a xmlns='jabber:x'/></query>",
            "not-acceptable",
            "",
        ),
        (
            "<query xmlns='jabber:iq:private'><a xmlns='x:a'/><b xmlns='x:b'/></query>",
            "not-acceptable",
            "",
        ),
        (
            "<query xmlns='jabber:iq:private'><a xmlns='x:a'/></query>",
            "forbidden",
            " to='romeo@example.org'",
        ),
    ];
    for (q, cond, to) in bad {
        h.send(J, &format!("<iq type='get' id='b'{to}>{q}</iq>"))
            .await;
        let (e1, _) = h.settle(J, 1).await;
        assert_eq!(condition(&e1[0].stanza), cond, "{q}");
    }
}

#[tokio::test]
async fn block_and_unblock() {
    let mut h = Harness::im().await;
    mutual(&h).await;
    two_online(&mut h).await;
    h.send(
        J,
        "<iq type='get' id='bl0'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
    )
    .await;
    h.send(
        J,
        "<iq type='set' id='bl1'><block xmlns='urn:xmpp:blocking'><item jid='romeo@example.org'/></block></iq>",
    )
    .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert_eq!(e1[0].text().matches("<item").count(), 0, "{}", e1[0].text());
    let push = pushes(&e1);
    assert_eq!(push.len(), 1, "{e1:?}");
    assert!(
        push[0]
            .text()
            .contains("<block xmlns='urn:xmpp:blocking'><item jid='romeo@example.org'/></block>")
    );
    // Romeo stops seeing Juliet.
    assert_eq!(
        presences(&e2, Some("unavailable"))[0].from().as_deref(),
        Some(J)
    );

    // Nothing passes either way; presence neither.
    h.send(R, "<message type='chat' to='juliet@example.org' id='m1'/>")
        .await;
    h.send(R, "<presence><show>chat</show></presence>").await;
    let (e1, e2) = h.settle(R, 2).await;
    assert!(e1.is_empty(), "{e1:?}");
    let err = e2
        .iter()
        .find(|s| s.stanza.id().as_deref() == Some("m1"))
        .unwrap();
    assert_eq!(condition(&err.stanza), "service-unavailable");
    h.send(
        J,
        "<message type='chat' to='romeo@example.org/garden' id='m2'/>",
    )
    .await;
    h.send(J, "<presence><show>away</show></presence>").await;
    let (e1, e2) = h.settle(J, 1).await;
    assert!(e2.is_empty(), "{e2:?}");
    let err = e1
        .iter()
        .find(|s| s.stanza.id().as_deref() == Some("m2"))
        .unwrap();
    assert_eq!(condition(&err.stanza), "not-acceptable");
    h.send(
        J,
        "<iq type='get' id='bl2'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    assert!(e1[0].text().contains("<item jid='romeo@example.org'/>"));

    // Unblock everything: an empty <unblock/> push, and Romeo sees Juliet again.
    h.send(
        J,
        "<iq type='set' id='bl3'><unblock xmlns='urn:xmpp:blocking'/></iq>",
    )
    .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert!(
        pushes(&e1)[0]
            .text()
            .contains("<unblock xmlns='urn:xmpp:blocking'/>")
    );
    assert_eq!(presences(&e2, None)[0].from().as_deref(), Some(J));
    h.send(J, "<message type='chat' to='romeo@example.org' id='m3'/>")
        .await;
    let (_, e2) = h.settle(J, 1).await;
    assert_eq!(e2[0].stanza.id().as_deref(), Some("m3"));

    // A block needs items; another account's list is not ours.
    h.send(
        J,
        "<iq type='set' id='bl4'><block xmlns='urn:xmpp:blocking'/></iq>",
    )
    .await;
    h.send(
        J,
        "<iq type='get' id='bl5' to='romeo@example.org'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
    )
    .await;
    let (e1, _) = h.settle(J, 1).await;
    assert_eq!(condition(&e1[0].stanza), "bad-request");
    assert_eq!(condition(&e1[1].stanza), "forbidden");
}

#[tokio::test]
async fn carbons_between_two_resources() {
    let mut h = Harness::im().await;
    let kitchen = "juliet@example.org/kitchen";
    h.login(J, "e1").await;
    h.login(kitchen, "e1").await;
    h.login(R, "e2").await;
    for who in [J, kitchen, R] {
        h.send(who, "<presence/>").await;
    }
    for who in [J, kitchen] {
        h.send(
            who,
            "<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
        )
        .await;
    }
    h.settle(J, 1).await;
    h.settle(kitchen, 1).await;

    // Received: Romeo writes to the balcony; the kitchen gets a copy.
    h.send(
        R,
        "<message type='chat' to='juliet@example.org/balcony' id='c1'><body>hi</body></message>",
    )
    .await;
    let (e1, _) = h.settle(R, 2).await;
    assert_eq!(e1.len(), 2, "{e1:?}");
    assert_eq!(e1[0].to, [J]);
    let carbon = &e1[1];
    assert_eq!(carbon.to, [kitchen]);
    assert!(carbon.stamp_to);
    assert_eq!(carbon.from().as_deref(), Some("juliet@example.org"));
    assert!(
        carbon.text().contains(
            "<received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>\
             <message xmlns='jabber:client' from='romeo@example.org/garden' type='chat' \
             to='juliet@example.org/balcony' id='c1'><body>hi</body></message>"
        ),
        "{}",
        carbon.text()
    );

    // Sent: the balcony answers; the kitchen gets a copy, Romeo the message.
    h.send(
        J,
        "<message type='chat' to='romeo@example.org' id='c2'><body>ho</body></message>",
    )
    .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert_eq!(e2.len(), 1);
    assert_eq!(e1.len(), 1, "{e1:?}");
    assert_eq!(e1[0].to, [kitchen]);
    assert!(e1[0].text().contains("<sent xmlns='urn:xmpp:carbons:2'>"));

    // Private messages and the other types are not copied; after disable, nothing is.
    h.send(J, "<message type='chat' to='romeo@example.org' id='c3'><body>p</body><private xmlns='urn:xmpp:carbons:2'/></message>")
        .await;
    h.send(J, "<message type='normal' to='romeo@example.org' id='c4'/>")
        .await;
    let (e1, e2) = h.settle(J, 1).await;
    assert!(e1.is_empty(), "{e1:?}");
    assert_eq!(e2.len(), 2);
    h.send(
        kitchen,
        "<iq type='set' id='d'><disable xmlns='urn:xmpp:carbons:2'/></iq>",
    )
    .await;
    h.settle(kitchen, 1).await;
    h.send(J, "<message type='chat' to='romeo@example.org' id='c5'/>")
        .await;
    let (e1, _) = h.settle(J, 1).await;
    assert!(e1.is_empty(), "{e1:?}");
}

#[tokio::test]
async fn an_undeliverable_server_copy_is_dropped_not_rerouted() {
    let mut h = Harness::im().await;
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    h.settle(J, 1).await;
    let gone = parse_full("juliet@example.org/kitchen").unwrap();
    let carbon = el(
        "<message from='juliet@example.org' type='chat'><received xmlns='urn:xmpp:carbons:2'/></message>",
    );
    h.link
        .send(ToRouter::Undeliverable {
            recipient: gone,
            stanza: carbon,
        })
        .await
        .unwrap();
    h.bind("juliet@example.org/ping", "e1", None).await;
    let (e1, _) = h.settle("juliet@example.org/ping", 1).await;
    assert!(e1.is_empty(), "{e1:?}");
    let juliet = BareUser::new(DOMAIN, "juliet");
    assert_eq!(h.store.count_offline(&juliet).await.unwrap(), 0);
}

#[tokio::test]
async fn sessions_removed_with_their_node_get_unavailable_broadcast() {
    let mut h = Harness::im().await;
    mutual(&h).await;
    let nurse = "nurse@example.org/hall";
    for who in [J, nurse] {
        h.login(who, "e1").await;
        h.send(who, "<presence/>").await;
        h.settle(who, 1).await;
    }
    h.login(R, "e2").await;
    h.send(R, "<presence/>").await;
    h.send(R, "<presence to='nurse@example.org/hall'/>").await;
    h.settle(R, 2).await;
    while h.e1.try_recv().is_ok() {}

    // Edge e2 goes away (its lease expired, say): the registry removes its sessions in bulk
    // and nobody sends SessionEnded.
    let removed = h.registry.remove_node("e2").await.unwrap();
    assert_eq!(removed.len(), 1);
    let mut gone = Vec::new();
    while gone.len() < 2 {
        let s = seen(h.next(1).await);
        assert_eq!(s.type_().as_deref(), Some("unavailable"), "{}", s.text());
        assert_eq!(s.from().as_deref(), Some(R));
        gone.push(s);
    }
    // To Juliet as a contact (stamped per recipient), to the nurse as directed presence.
    let contact = gone.iter().find(|s| s.stamp_to).expect("the broadcast");
    assert_eq!(contact.to, [J]);
    let directed = gone.iter().find(|s| !s.stamp_to).expect("the directed one");
    assert_eq!(directed.to, [nurse]);
    // Once: nothing else follows on Romeo's worker.
    h.bind("romeo@example.org/ping", "e1", None).await;
    let (e1, _) = h.settle("romeo@example.org/ping", 1).await;
    assert!(presences(&e1, Some("unavailable")).is_empty(), "{e1:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_removed_session_whose_resource_was_bound_again_leaves_the_new_one_alone() {
    let mut h = Harness::im().await;
    mutual(&h).await;
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    h.settle(J, 1).await;
    h.login(R, "e2").await;
    h.send(R, "<presence/>").await;
    h.settle(R, 2).await;
    while h.e1.try_recv().is_ok() {}
    // Removed and bound again (the client reconnected through e1) before the router hears
    // of the removal: nothing yields in between on this single-threaded runtime.
    h.registry.remove_node("e2").await.unwrap();
    let again = SessionRecord::new(parse_full(R).unwrap(), Arc::from("e1"), Arc::from("s-new"));
    h.registry.bind(again).await.unwrap();
    // The new session has sent no presence yet: Juliet learns the old one is gone.
    let s = seen(h.next(1).await);
    assert_eq!(
        (s.type_().as_deref(), s.from().as_deref()),
        (Some("unavailable"), Some(R))
    );
    // The new session's presence then goes out as usual.
    h.send(R, "<presence><status>back</status></presence>")
        .await;
    let (e1, _) = h.settle(R, 1).await;
    let back = presences(&e1, None);
    assert!(
        back.iter()
            .any(|s| s.to.contains(&J.to_owned()) && s.text().contains("back")),
        "{e1:?}"
    );
}

fn delay_stamp(s: &Seen) -> Option<String> {
    let raw = s.text();
    let at = raw.find("<delay xmlns='urn:xmpp:delay' from='example.org' stamp='")?;
    let rest = &raw[at + 56..];
    Some(rest[..rest.find('\'')?].to_owned())
}

#[tokio::test]
async fn a_probe_of_a_contact_with_no_resource_gets_its_last_unavailable_with_a_delay() {
    let mut h = Harness::im().await;
    mutual(&h).await;
    // A contact the user is subscribed to who never had a presence: no answer (§4.3.2).
    h.store
        .set_roster_item(
            &BareUser::new(DOMAIN, "juliet"),
            RosterItem {
                jid: "nurse@example.org".to_owned(),
                name: None,
                subscription: "to".to_owned(),
                ask: false,
                groups: vec![],
            },
        )
        .await
        .unwrap();
    // Romeo leaves with a status; his other resource was gone already.
    let r2 = "romeo@example.org/car";
    for who in [R, r2] {
        h.login(who, "e2").await;
        h.send(who, "<presence/>").await;
        h.settle(who, 2).await;
    }
    h.send(
        r2,
        "<presence type='unavailable'><status>parking</status></presence>",
    )
    .await;
    h.settle(r2, 2).await;
    let romeo = BareUser::new(DOMAIN, "romeo");
    assert_eq!(
        h.store.last_unavailable(&romeo).await.unwrap(),
        None,
        "not the last resource"
    );
    h.send(
        R,
        "<presence type='unavailable'><status>gone fishing</status></presence>",
    )
    .await;
    h.settle(R, 2).await;
    assert!(h.store.last_unavailable(&romeo).await.unwrap().is_some());

    // Juliet's initial presence probes both contacts.
    h.login(J, "e1").await;
    h.send(J, "<presence/>").await;
    let (e1, _) = h.settle(J, 1).await;
    let answers = presences(&e1, Some("unavailable"));
    assert_eq!(answers.len(), 1, "{e1:?}");
    let answer = answers[0];
    assert_eq!(answer.from().as_deref(), Some(R));
    assert_eq!(answer.to, [J]);
    assert!(
        answer.text().contains("<status>gone fishing</status>"),
        "{}",
        answer.text()
    );
    let stamp = delay_stamp(answer).unwrap_or_else(|| panic!("no delay: {}", answer.text()));
    assert!(stamp.ends_with('Z') && stamp.len() == 24, "{stamp}");
    assert!(
        !e1.iter()
            .any(|s| s.from().is_some_and(|f| f.starts_with("nurse@"))),
        "{e1:?}"
    );

    // A session that ends leaves the unavailable the server wrote for it; a client's own
    // probe is answered with that.
    h.login(r2, "e2").await;
    h.send(r2, "<presence/>").await;
    h.settle(r2, 2).await;
    h.logout(&parse_full(r2).unwrap()).await;
    h.bind("romeo@example.org/ping", "e1", None).await;
    h.settle("romeo@example.org/ping", 1).await;
    h.send(J, "<presence type='probe' to='romeo@example.org'/>")
        .await;
    let (e1, _) = h.settle(J, 1).await;
    let answers = presences(&e1, Some("unavailable"));
    assert_eq!(answers.len(), 1, "{e1:?}");
    assert_eq!(answers[0].from().as_deref(), Some(r2));
    assert!(
        !answers[0].text().contains("status"),
        "{}",
        answers[0].text()
    );
    assert!(delay_stamp(answers[0]).is_some());
}
