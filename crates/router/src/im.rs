//! Instant messaging and presence (RFC 6121): subscriptions (§3, the state machine in
//! [`crate::subscription`]), presence broadcast, probes and directed presence (§4), roster
//! pushes (§2.1.6) and offline messages (§8.5.2.1.1, XEP-0160, XEP-0203 stamps).
//!
//! A probe of a contact with no available resource (§4.3.2) is answered with the contact's
//! last unavailable presence, stamped with a XEP-0203 `<delay/>` of when it was received: the
//! broadcast `unavailable` of an account's last available resource (sent by the client, or
//! written by the server when the session ended) is kept in the store
//! ([`starling_store::PresenceStore`]); an account that never had one gets no answer, which
//! §4.3.2 allows.
//!
//! What the router keeps in memory is a cache it may lose: per session, whether it is
//! available, whether it asked for the roster, and whom it sent directed presence to.
//! Availability and the last presence of every resource live in the registry
//! ([`SessionRegistry::set_presence`]); rosters and offline messages in the store. Sessions
//! are reached only through the edges, a broadcast travelling once per edge with its
//! recipient list (`stamp_to`: the edge writes each recipient's `to`).
//!
//! **Invariant:** a read-modify-write of one user's roster item holds that user's roster
//! lock (one of [`ROSTER_LOCKS`] stripes) and never another one, so two workers changing
//! both ends of a subscription cannot lose an update or deadlock. (In a cluster the same
//! guarantee needs the store to compare-and-set; this lock covers one router process.)
//!
//! Only contacts on served domains are reached; presence for other domains waits for
//! server-to-server routing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quick_xml::events::Event;
use starling_registry::{NodeId, SessionRecord};
use starling_store::{BareUser, LastPresence, RosterItem, StoreError};
use starling_xml::Element;
use starling_xml::writer::XmlWriter;
use starling_xmpp::jid::{self, BareJid, FullJid, Jid};
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};
use time::OffsetDateTime;

use crate::metrics::{IM_EVENTS_TOTAL, Outcome};
use crate::modules::Services;
use crate::modules::time::xep0082_datetime;
use crate::subscription::{self, SubKind, Subscription};
use starling_cluster::ToEdge;

/// How many stripes of roster locks there are.
pub(crate) const ROSTER_LOCKS: usize = 64;

fn count(event: &'static str, n: u64) {
    metrics::counter!(IM_EVENTS_TOTAL, "event" => event).increment(n);
}

/// The cached state of one session.
#[derive(Debug, Default, Clone)]
struct SessionState {
    available: bool,
    roster_requested: bool,
    blocklist_requested: bool,
    /// Entities sent directed available presence (RFC 6121 §4.6), as sent.
    directed: Vec<Jid>,
}

/// The router's IM state: the session cache and the roster locks.
pub(crate) struct Im {
    domains: HashSet<String>,
    sessions: Mutex<HashMap<FullJid, SessionState>>,
    roster_locks: Vec<tokio::sync::Mutex<()>>,
    push_ids: AtomicU64,
    /// The sessions that enabled carbons (XEP-0280), by account.
    carbons: Mutex<HashMap<BareJid, Vec<FullJid>>>,
    /// Blocklists (XEP-0191) by account, read through from the store.
    blocklists: Mutex<HashMap<BareJid, Arc<Vec<Jid>>>>,
}

/// The private-storage key of an account's blocklist (a namespace clients cannot use,
/// see `modules::private::RESERVED`): one JID per line.
const BLOCKLIST_KEY: &str = "urn:starling:blocklist";

/// Whether a blocklist item matches an entity (XEP-0191 §3.4, after XEP-0016 §2.1): a full
/// JID item matches that resource, a bare JID item the account and all its resources, a
/// domain item everything at that domain.
pub(crate) fn jid_matches(item: &Jid, who: &Jid) -> bool {
    if item.resource().is_some() {
        return item == who;
    }
    if item.node().is_some() {
        return item.to_bare() == who.to_bare();
    }
    item.domain() == who.domain()
}

impl std::fmt::Debug for Im {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Im").finish_non_exhaustive()
    }
}

/// A roster item with its parsed contact and subscription.
#[derive(Debug, Clone)]
pub(crate) struct Contact {
    pub(crate) jid: BareJid,
    pub(crate) sub: Subscription,
}

/// Marks an item that exists only to keep a contact's pending request (RFC 6121 §3.1.3:
/// the user did not put the contact in the roster, so it is not shown).
const HIDDEN: &str = "+hidden";

pub(crate) fn is_hidden(item: &RosterItem) -> bool {
    item.subscription.ends_with(HIDDEN)
}

pub(crate) fn sub_of(item: &RosterItem) -> Subscription {
    Subscription::from_stored(&item.subscription, item.ask)
}

pub(crate) fn user_of(bare: &BareJid) -> Option<BareUser> {
    bare.node()
        .map(|n| BareUser::new(bare.domain().as_str(), n.as_str()))
}

fn parse_client(xml: Vec<u8>) -> Option<Element> {
    match Element::parse(Bytes::from(xml), ns::JABBER_CLIENT) {
        Ok(el) => Some(el),
        Err(e) => {
            tracing::error!(error = %e, "unwritable server-built stanza");
            None
        }
    }
}

/// `<presence type='…' from='…' to='…'/>`.
fn presence(type_: Option<&str>, from: &str, to: Option<&str>) -> Option<Element> {
    let mut out = Vec::with_capacity(96);
    XmlWriter::new(&mut out)
        .start("presence")
        .attr_opt("type", type_)
        .attr("from", from)
        .attr_opt("to", to)
        .empty();
    parse_client(out)
}

/// Writes a roster `<item/>` (RFC 6121 §2.1.2); `None` for the subscription writes
/// `subscription='remove'`.
pub(crate) fn write_item(out: &mut Vec<u8>, item: &RosterItem, sub: Option<Subscription>) {
    let mut w = XmlWriter::new(out);
    w.start("item").attr("jid", &item.jid);
    w.attr_opt("name", item.name.as_deref());
    match sub {
        Some(sub) => {
            w.attr("subscription", sub.state().attribute());
            if sub.state().pending_out() {
                w.attr("ask", "subscribe");
            }
            if sub.preapproved() {
                w.attr("approved", "true");
            }
        }
        None => {
            w.attr("subscription", "remove");
        }
    }
    if item.groups.is_empty() || sub.is_none() {
        w.empty();
    } else {
        for g in &item.groups {
            w.text_element("group", g);
        }
        w.end("item");
    }
}

/// The `<priority/>` of a presence (RFC 6121 §4.7.2.3): 0 when absent or not a number in
/// -128..=127.
pub(crate) fn priority_of(stanza: &Element) -> i8 {
    let inner = stanza.inner();
    let Ok(text) = std::str::from_utf8(&inner) else {
        return 0;
    };
    let mut reader = quick_xml::Reader::from_str(text);
    let mut depth = 0usize;
    let mut in_priority = false;
    let mut value = String::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(s)) => {
                in_priority = depth == 0 && s.local_name().as_ref() == "priority";
                depth += 1;
            }
            Ok(Event::End(_)) => {
                if in_priority {
                    break;
                }
                depth = depth.saturating_sub(1);
            }
            Ok(Event::Text(t)) if in_priority => {
                value.push_str(&t.xml10_content());
            }
            Ok(Event::Eof) | Err(_) => return 0,
            _ => {}
        }
    }
    value.trim().parse::<i8>().unwrap_or(0)
}

/// The message with an XEP-0203 `<delay/>` appended: when and by whom it was stored.
pub(crate) fn with_delay(stanza: &Element, domain: &str, now: OffsetDateTime) -> Bytes {
    let raw = stanza.raw();
    let mut delay = Vec::with_capacity(96);
    XmlWriter::new(&mut delay)
        .start("delay")
        .attr("xmlns", ns::DELAY)
        .attr("from", domain)
        .attr("stamp", &xep0082_datetime(now))
        .empty();
    let mut out = Vec::with_capacity(raw.len() + delay.len() + 16);
    if stanza.is_empty_tag() {
        let head = raw.strip_suffix(b"/>").unwrap_or(raw);
        out.extend_from_slice(head);
        out.push(b'>');
        out.extend_from_slice(&delay);
        XmlWriter::new(&mut out).end(stanza.qname());
    } else {
        let at = raw.len() - end_tag_len(raw);
        out.extend_from_slice(raw.get(..at).unwrap_or(raw));
        out.extend_from_slice(&delay);
        out.extend_from_slice(raw.get(at..).unwrap_or_default());
    }
    Bytes::from(out)
}

/// Whether the stanza carries the `<delay/>` this server writes when it stores a message.
fn has_own_delay(raw: &[u8], domain: &str) -> bool {
    let mut needle = Vec::with_capacity(64);
    XmlWriter::new(&mut needle)
        .start("delay")
        .attr("xmlns", ns::DELAY)
        .attr("from", domain);
    raw.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Writes a stanza with an explicit `xmlns='jabber:client'` on its start tag, so that it
/// keeps its namespace inside a wrapper of another namespace (XEP-0297 §4).
fn write_in_client_ns(out: &mut Vec<u8>, stanza: &Element) {
    let raw = stanza.raw();
    let start_tag_len = raw.len() - stanza.inner().len() - end_tag_len_of(stanza);
    let start_tag = raw.get(..start_tag_len).unwrap_or(raw);
    let declared = start_tag.windows(6).any(|w| w == b"xmlns=");
    let name_end = stanza.qname().len() + 1;
    if declared || stanza.qname().contains(':') {
        out.extend_from_slice(raw);
        return;
    }
    out.extend_from_slice(raw.get(..name_end).unwrap_or_default());
    out.extend_from_slice(b" xmlns='jabber:client'");
    out.extend_from_slice(raw.get(name_end..).unwrap_or_default());
}

fn end_tag_len_of(stanza: &Element) -> usize {
    if stanza.is_empty_tag() {
        0
    } else {
        end_tag_len(stanza.raw())
    }
}

/// Length of the end tag `</…>` at the end of `raw`.
fn end_tag_len(raw: &[u8]) -> usize {
    raw.windows(2)
        .rposition(|w| w == b"</")
        .map_or(0, |at| raw.len() - at)
}

/// Groups `sessions` by edge and hands `stanza` to each edge once; returns how many
/// sessions it reached.
pub(crate) async fn deliver(
    svc: &Services,
    sessions: &[&SessionRecord],
    stanza: &Element,
    stamp_to: bool,
) -> usize {
    let mut by_node: Vec<(&NodeId, Vec<FullJid>)> = Vec::new();
    for s in sessions {
        match by_node.iter_mut().find(|(node, _)| **node == s.node) {
            Some((_, jids)) => {
                if !jids.contains(&s.jid) {
                    jids.push(s.jid.clone());
                }
            }
            None => by_node.push((&s.node, vec![s.jid.clone()])),
        }
    }
    let mut reached = 0;
    for (node, recipients) in by_node {
        let Some(link) = svc.edges.get(node) else {
            tracing::warn!(node = %node, "no link to the edge holding the session");
            continue;
        };
        let n = recipients.len();
        let msg = ToEdge::Deliver {
            recipients,
            stanza: stanza.clone(),
            stamp_to,
        };
        match link.send(msg).await {
            Ok(()) => reached += n,
            Err(e) => tracing::warn!(node = %node, error = %e, "edge link refused a delivery"),
        }
    }
    reached
}

impl Im {
    pub(crate) fn new(domains: HashSet<String>) -> Self {
        Im {
            domains,
            sessions: Mutex::new(HashMap::new()),
            roster_locks: (0..ROSTER_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            push_ids: AtomicU64::new(0),
            blocklists: Mutex::new(HashMap::new()),
            carbons: Mutex::new(HashMap::new()),
        }
    }

    fn is_local(&self, jid: &Jid) -> bool {
        jid.node().is_some() && self.domains.contains(jid.domain().as_str())
    }

    pub(crate) fn lock_for(&self, user: &BareJid) -> &tokio::sync::Mutex<()> {
        let i = crate::router::shard(user.as_str(), self.roster_locks.len());
        // `shard` is below the length, which is not zero.
        &self.roster_locks[i % self.roster_locks.len()]
    }

    fn with_session<T>(&self, f: impl FnOnce(&mut HashMap<FullJid, SessionState>) -> T) -> T {
        let mut map = match self.sessions.lock() {
            Ok(m) => m,
            // A panic elsewhere cannot leave the map inconsistent: every change is one
            // insert or remove.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut map)
    }

    /// A session started: track it (not available, no roster requested).
    pub(crate) fn session_started(&self, svc: &Services, jid: &FullJid) {
        let limit = svc.settings.max_tracked_sessions;
        let tracked = self.with_session(|m| {
            if m.len() >= limit && !m.contains_key(jid) {
                return false;
            }
            m.insert(jid.clone(), SessionState::default());
            true
        });
        if !tracked {
            count("untracked_session", 1);
        }
    }

    /// The session asked for the roster: it now gets roster pushes (RFC 6121 §2.1.6).
    pub(crate) fn roster_requested(&self, jid: &FullJid) {
        self.with_session(|m| {
            if let Some(s) = m.get_mut(jid) {
                s.roster_requested = true;
            }
        });
    }

    /// Enables or disables carbons for a session (XEP-0280 §4, §5); `false` when the
    /// session could not be tracked (too many sessions with carbons).
    pub(crate) fn set_carbons(&self, svc: &Services, jid: &FullJid, on: bool) -> bool {
        let mut map = self.carbons.lock().unwrap_or_else(|p| p.into_inner());
        let bare = jid.to_bare();
        if on {
            if map.len() >= svc.settings.max_tracked_sessions && !map.contains_key(&bare) {
                return false;
            }
            let list = map.entry(bare).or_default();
            if !list.contains(jid) {
                list.push(jid.clone());
            }
        } else if let Some(list) = map.get_mut(&bare) {
            list.retain(|j| j != jid);
            if list.is_empty() {
                map.remove(&bare);
            }
        }
        true
    }

    /// Copies a chat message to `owner`'s carbons-enabled resources other than `exclude`
    /// (XEP-0280 §6 received, §7 sent): wrapped in `<received/>` or `<sent/>` and
    /// `<forwarded/>` (XEP-0297), from the owner's bare JID, one delivery per edge. A
    /// message that mentions the carbons namespace itself (`<private/>`, or a carbon) or
    /// carries the `no-copy` hint (XEP-0334) is not copied.
    pub(crate) async fn carbons(
        &self,
        svc: &Services,
        owner: &BareJid,
        exclude: &[FullJid],
        stanza: &Element,
        direction: &str,
    ) {
        let enabled: Vec<FullJid> = {
            let map = self.carbons.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(owner) {
                Some(list) => list
                    .iter()
                    .filter(|j| !exclude.contains(j))
                    .cloned()
                    .collect(),
                None => return,
            }
        };
        if enabled.is_empty() {
            return;
        }
        let raw = stanza.raw();
        let mentions = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        if mentions(ns::CARBONS.as_bytes()) || mentions(b"no-copy") {
            return;
        }
        let Ok(sessions) = svc.registry.sessions(owner).await else {
            return;
        };
        let targets: Vec<&SessionRecord> = sessions
            .iter()
            .filter(|s| enabled.contains(&s.jid))
            .collect();
        if targets.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(raw.len() + 192);
        XmlWriter::new(&mut out)
            .start("message")
            .attr("from", owner.as_str())
            .attr("type", "chat")
            .start(direction)
            .attr("xmlns", ns::CARBONS)
            .start("forwarded")
            .attr("xmlns", ns::FORWARD)
            .raw(b"");
        write_in_client_ns(&mut out, stanza);
        XmlWriter::new(&mut out)
            .end("forwarded")
            .end(direction)
            .end("message");
        if let Some(carbon) = parse_client(out) {
            let n = deliver(svc, &targets, &carbon, true).await;
            count("carbon", n as u64);
        }
    }

    /// The session asked for the blocklist: it now gets blocklist pushes (XEP-0191 §3.3).
    pub(crate) fn blocklist_requested(&self, jid: &FullJid) {
        self.with_session(|m| {
            if let Some(s) = m.get_mut(jid) {
                s.blocklist_requested = true;
            }
        });
    }

    fn cached_blocklist(&self, user: &BareJid) -> Option<Arc<Vec<Jid>>> {
        let map = self.blocklists.lock().unwrap_or_else(|p| p.into_inner());
        map.get(user).cloned()
    }

    fn cache_blocklist(&self, svc: &Services, user: &BareJid, list: Arc<Vec<Jid>>) {
        let mut map = self.blocklists.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= svc.settings.max_tracked_sessions && !map.contains_key(user) {
            // Full: start over rather than grow; entries are re-read from the store.
            map.clear();
            count("blocklist_cache_cleared", 1);
        }
        map.insert(user.clone(), list);
    }

    /// The blocklist of a local account (empty for anyone else, or when unreadable).
    pub(crate) async fn blocklist(&self, svc: &Services, user: &BareJid) -> Arc<Vec<Jid>> {
        if let Some(list) = self.cached_blocklist(user) {
            return list;
        }
        let Some(u) = user_of(user).filter(|_| self.is_local(user)) else {
            return Arc::new(Vec::new());
        };
        let list = match svc.store.private_xml(&u, BLOCKLIST_KEY).await {
            Ok(Some(raw)) => std::str::from_utf8(&raw)
                .unwrap_or("")
                .lines()
                .filter_map(|l| jid::parse(l).ok())
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "blocklist unreadable");
                return Arc::new(Vec::new());
            }
        };
        let list = Arc::new(list);
        self.cache_blocklist(svc, user, list.clone());
        list
    }

    /// Whether `user` blocks `who`.
    pub(crate) async fn blocks(&self, svc: &Services, user: &BareJid, who: &Jid) -> bool {
        if jid::same_bare(user, who) {
            return false;
        }
        self.blocklist(svc, user)
            .await
            .iter()
            .any(|item| jid_matches(item, who))
    }

    /// Either of two accounts blocks the other: no presence passes between them.
    async fn cut_off(&self, svc: &Services, a: &Jid, b: &Jid) -> bool {
        self.blocks(svc, &a.to_bare(), b).await || self.blocks(svc, &b.to_bare(), a).await
    }

    /// Changes a blocklist under the account's lock: `block` adds `items`, otherwise
    /// they are removed (all of them when `items` is empty). Returns the items actually
    /// added or removed. `Err(None)` is the list limit.
    pub(crate) async fn change_blocklist(
        &self,
        svc: &Services,
        user: &BareJid,
        block: bool,
        items: &[Jid],
    ) -> Result<Vec<Jid>, Option<StoreError>> {
        let Some(u) = user_of(user) else {
            return Err(Some(StoreError::NotFound));
        };
        let guard = self.lock_for(user).lock().await;
        let mut list = (*self.blocklist(svc, user).await).clone();
        let changed: Vec<Jid> = if block {
            let new: Vec<Jid> =
                items
                    .iter()
                    .filter(|j| !list.contains(j))
                    .fold(Vec::new(), |mut acc, j| {
                        if !acc.contains(j) {
                            acc.push(j.clone());
                        }
                        acc
                    });
            if list.len() + new.len() > svc.settings.max_blocklist_items {
                return Err(None);
            }
            list.extend(new.iter().cloned());
            new
        } else if items.is_empty() {
            std::mem::take(&mut list)
        } else {
            let gone: Vec<Jid> = list.iter().filter(|j| items.contains(j)).cloned().collect();
            list.retain(|j| !items.contains(j));
            gone
        };
        if changed.is_empty() {
            return Ok(changed);
        }
        let mut raw = String::new();
        for j in &list {
            raw.push_str(j.as_str());
            raw.push('\n');
        }
        svc.store
            .set_private_xml(&u, BLOCKLIST_KEY, Bytes::from(raw))
            .await
            .map_err(Some)?;
        self.cache_blocklist(svc, user, Arc::new(list));
        drop(guard);
        Ok(changed)
    }

    /// A blocklist push (XEP-0191 §3.3, §3.4) to the resources that asked for the list.
    pub(crate) async fn push_blocklist(&self, svc: &Services, user: &BareJid, payload: &[u8]) {
        let Ok(sessions) = svc.registry.sessions(user).await else {
            return;
        };
        let interested: Vec<&SessionRecord> = self.with_session(|m| {
            sessions
                .iter()
                .filter(|s| m.get(&s.jid).is_some_and(|st| st.blocklist_requested))
                .collect()
        });
        if interested.is_empty() {
            return;
        }
        let id = format!("push{}", self.push_ids.fetch_add(1, Ordering::Relaxed));
        let mut out = Vec::with_capacity(128 + payload.len());
        XmlWriter::new(&mut out)
            .start("iq")
            .attr("type", "set")
            .attr("id", &id)
            .attr("from", user.as_str())
            .raw(payload)
            .end("iq");
        if let Some(iq) = parse_client(out) {
            deliver(svc, &interested, &iq, true).await;
        }
    }

    /// After a block: the blocked account stops seeing the user (XEP-0191 §3.3); after an
    /// unblock: a contact subscribed to the user sees the user's presence again.
    pub(crate) async fn after_block_change(
        &self,
        svc: &Services,
        user: &BareJid,
        jid: &Jid,
        blocked: bool,
    ) {
        if jid.node().is_none() || !self.is_local(jid) {
            return;
        }
        let contact = jid.to_bare();
        if blocked {
            let targets: Vec<SessionRecord> = match jid.try_as_full() {
                Ok(full) => svc
                    .registry
                    .session(full)
                    .await
                    .ok()
                    .flatten()
                    .into_iter()
                    .collect(),
                Err(_) => self.available(svc, &contact).await,
            };
            let refs: Vec<&SessionRecord> = targets.iter().collect();
            if refs.is_empty() {
                return;
            }
            for s in self.available(svc, user).await {
                if let Some(p) = presence(Some("unavailable"), s.jid.as_str(), None) {
                    deliver(svc, &refs, &p, true).await;
                }
            }
        } else {
            let subscribed = self
                .contacts(svc, user)
                .await
                .iter()
                .any(|c| c.jid == contact && c.sub.state().has_from());
            if subscribed {
                self.presence_of_to(svc, user, &contact).await;
            }
        }
    }

    /// A session ended for any reason (RFC 6121 §4.5.2): unavailable to its contacts and
    /// own resources if it was available (or unknown), and to whoever got its directed
    /// presence.
    pub(crate) async fn session_ended(&self, svc: &Services, jid: &FullJid) {
        self.set_carbons(svc, jid, false);
        let state = self.with_session(|m| m.remove(jid));
        let was_available = state.as_ref().is_none_or(|s| s.available);
        let directed = state.map(|s| s.directed).unwrap_or_default();
        let Some(stanza) = presence(Some("unavailable"), jid.as_str(), None) else {
            return;
        };
        self.broadcast_unavailable(svc, jid, &stanza, was_available, directed)
            .await;
    }

    /// Unavailable for a session that is gone while its full JID is bound again by a new
    /// session: broadcast as if it had been available, leaving the cached state (the new
    /// session's) alone.
    pub(crate) async fn unavailable_of_gone(&self, svc: &Services, jid: &FullJid) {
        let Some(stanza) = presence(Some("unavailable"), jid.as_str(), None) else {
            return;
        };
        self.broadcast_unavailable(svc, jid, &stanza, true, Vec::new())
            .await;
    }

    /// The user's roster as contacts; an unreadable roster is empty (logged).
    async fn contacts(&self, svc: &Services, user: &BareJid) -> Vec<Contact> {
        let Some(u) = user_of(user) else {
            return Vec::new();
        };
        match svc.store.roster(&u).await {
            Ok(r) => r
                .items
                .iter()
                .filter_map(|item| {
                    let jid = jid::parse_bare(&item.jid).ok()?;
                    Some(Contact {
                        jid,
                        sub: sub_of(item),
                    })
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, user = %user, "roster unreadable");
                Vec::new()
            }
        }
    }

    /// The available sessions of a local account.
    async fn available(&self, svc: &Services, bare: &BareJid) -> Vec<SessionRecord> {
        if !self.is_local(bare) {
            return Vec::new();
        }
        match svc.registry.sessions(bare).await {
            Ok(s) => s.into_iter().filter(SessionRecord::is_available).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup failed");
                Vec::new()
            }
        }
    }

    /// Outbound presence from a session (RFC 6121 §3, §4). `to` is a local account's JID
    /// (bare or full), or `None` for a broadcast.
    pub(crate) async fn presence(
        &self,
        svc: &Services,
        from: &FullJid,
        stanza: &Element,
        to: Option<Jid>,
    ) -> Outcome {
        let type_ = stanza.stanza_type();
        let type_ = type_.as_deref();
        match (type_, to) {
            (None, None) => self.available_presence(svc, from, stanza).await,
            (Some("unavailable"), None) => self.unavailable_presence(svc, from, stanza).await,
            (Some(t), Some(to)) if SubKind::parse(t).is_some() => {
                let kind = SubKind::parse(t).unwrap_or(SubKind::Subscribe);
                self.outbound_subscription(svc, from, kind, to.to_bare(), stanza)
                    .await
            }
            (Some("probe"), Some(to)) => self.client_probe(svc, from, &to.to_bare()).await,
            (None | Some("unavailable"), Some(to)) => {
                self.directed(svc, from, stanza, to, type_.is_none()).await
            }
            (Some("error"), Some(to)) => match to.try_into_full() {
                Ok(full) => match svc.registry.session(&full).await {
                    Ok(Some(r)) if deliver(svc, &[&r], stanza, false).await > 0 => {
                        Outcome::Delivered
                    }
                    _ => Outcome::Dropped("presence error for a resource that is gone"),
                },
                Err(_) => Outcome::Dropped("presence error to a bare JID"),
            },
            (_, None) => Outcome::Dropped("presence of this type needs a 'to'"),
            (Some(_), Some(_)) => Outcome::Dropped("unknown presence type"),
        }
    }

    /// Available presence without `to` (§4.2, §4.4): recorded in the registry, broadcast
    /// to contacts with `from`/`both` and to the user's own available resources; the
    /// first one (initial presence) also probes contacts with `to`/`both` (answered from
    /// the registry) and delivers pending subscription requests; any with a non-negative
    /// priority delivers stored offline messages.
    async fn available_presence(
        &self,
        svc: &Services,
        from: &FullJid,
        stanza: &Element,
    ) -> Outcome {
        let record = match svc.registry.session(from).await {
            Ok(Some(r)) => r,
            Ok(None) => return Outcome::Dropped("presence from a session the registry lost"),
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup failed");
                return Outcome::Dropped("registry unavailable");
            }
        };
        let initial = !record.is_available();
        let priority = priority_of(stanza);
        if let Err(e) = svc
            .registry
            .set_presence(
                from,
                &record.stream_id,
                priority,
                Some(stanza.raw().clone()),
            )
            .await
        {
            tracing::warn!(error = %e, "presence not recorded");
        }
        self.with_session(|m| {
            if let Some(s) = m.get_mut(from) {
                s.available = true;
            }
        });
        let user = from.to_bare();
        let contacts = self.contacts(svc, &user).await;
        let mut targets = self.available(svc, &user).await;
        let me = Jid::from(from.clone());
        for c in contacts.iter().filter(|c| c.sub.state().has_from()) {
            if !self.cut_off(svc, &me, &Jid::from(c.jid.clone())).await {
                targets.extend(self.available(svc, &c.jid).await);
            }
        }
        let refs: Vec<&SessionRecord> = targets.iter().collect();
        let reached = deliver(svc, &refs, stanza, true).await;
        count("broadcast", 1);
        if initial {
            self.probe_contacts(svc, from, &contacts).await;
            self.pending_requests(svc, from, &user).await;
        }
        if priority >= 0 {
            self.deliver_offline(svc, from, &record).await;
        }
        if reached > 0 {
            Outcome::Delivered
        } else {
            Outcome::Handled
        }
    }

    /// Answers the probes of initial presence (§4.3.2) from the registry: the last
    /// presence of every available resource of each contact the user is subscribed to.
    async fn probe_contacts(&self, svc: &Services, from: &FullJid, contacts: &[Contact]) {
        let Ok(Some(me)) = svc.registry.session(from).await else {
            return;
        };
        let who = Jid::from(from.clone());
        for c in contacts.iter().filter(|c| c.sub.state().has_to()) {
            if self.cut_off(svc, &who, &Jid::from(c.jid.clone())).await {
                continue;
            }
            self.answer_probe(svc, &c.jid, &me).await;
        }
    }

    /// A probe of `contact` for the session `me` (§4.3.2): the last presence of each of its
    /// available resources, or, with none, its last unavailable presence.
    async fn answer_probe(&self, svc: &Services, contact: &BareJid, me: &SessionRecord) {
        let available = self.available(svc, contact).await;
        if available.is_empty() {
            self.send_last_unavailable(svc, contact, me).await;
        }
        for s in available {
            self.send_last_presence(svc, &s, me).await;
        }
    }

    /// Sends the last presence of `of` to `to`.
    async fn send_last_presence(&self, svc: &Services, of: &SessionRecord, to: &SessionRecord) {
        let Some(raw) = of.presence.clone() else {
            return;
        };
        match Element::parse(raw, ns::JABBER_CLIENT) {
            Ok(p) => {
                let p = match p.from() {
                    Some(_) => p,
                    None => match Element::parse(
                        p.with_addresses(None, Some(of.jid.as_str())),
                        ns::JABBER_CLIENT,
                    ) {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                deliver(svc, &[to], &p, true).await;
                count("probe_answered", 1);
            }
            Err(e) => tracing::warn!(error = %e, jid = %of.jid, "stored presence unreadable"),
        }
    }

    /// Delivers the subscription requests that waited for the user (§3.1.3) to the
    /// resource that just became available.
    async fn pending_requests(&self, svc: &Services, to: &FullJid, user: &BareJid) {
        let Some(u) = user_of(user) else { return };
        let Ok(roster) = svc.store.roster(&u).await else {
            return;
        };
        for item in roster
            .items
            .iter()
            .filter(|i| sub_of(i).state().pending_in())
        {
            if let Some(p) = presence(Some("subscribe"), &item.jid, Some(user.as_str())) {
                self.send_to_full(svc, to, &p).await;
            }
        }
    }

    /// Closes the race between storing a message (on the sender's worker) and the
    /// recipient's first available presence (on the recipient's worker, which flushes the
    /// offline queue): after storing, if the account has an available resource with a
    /// non-negative priority by now, the queue is flushed to the best one. Popping the queue
    /// is atomic, so the two flushes never deliver a message twice.
    pub(crate) async fn flush_if_online(&self, svc: &Services, bare: &BareJid) {
        let Ok(sessions) = svc.registry.sessions(bare).await else {
            return;
        };
        if let Some(best) = sessions
            .iter()
            .filter(|s| s.is_available() && s.priority >= 0)
            .max_by_key(|s| s.priority)
        {
            self.deliver_offline(svc, &best.jid, best).await;
        }
    }

    /// Stored offline messages, oldest first, to a resource that became available with a
    /// non-negative priority (XEP-0160 §3). A message that cannot be handed to the edge
    /// is stored again.
    async fn deliver_offline(&self, svc: &Services, to: &FullJid, record: &SessionRecord) {
        let Some(u) = user_of(&to.to_bare()) else {
            return;
        };
        match svc.store.count_offline(&u).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "offline count failed");
                return;
            }
        }
        let stored = match svc.store.pop_offline(&u).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "offline messages unreadable");
                return;
            }
        };
        for raw in stored {
            let delivered = match Element::parse(raw.clone(), ns::JABBER_CLIENT) {
                Ok(m) => deliver(svc, &[record], &m, false).await > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "stored message unreadable; dropped");
                    continue;
                }
            };
            if delivered {
                count("offline_delivered", 1);
            } else if let Err(e) = svc.store.push_offline(&u, raw, u64::MAX).await {
                tracing::warn!(error = %e, "an offline message could not be stored again");
            }
        }
    }

    /// Unavailable presence without `to` (§4.5): recorded, broadcast like available
    /// presence, and sent to directed-presence recipients (§4.6.3).
    async fn unavailable_presence(
        &self,
        svc: &Services,
        from: &FullJid,
        stanza: &Element,
    ) -> Outcome {
        let record = svc.registry.session(from).await.ok().flatten();
        let was_available = record.as_ref().is_some_and(SessionRecord::is_available);
        if let Some(r) = &record
            && let Err(e) = svc.registry.set_presence(from, &r.stream_id, 0, None).await
        {
            tracing::warn!(error = %e, "presence not recorded");
        }
        let directed = self.with_session(|m| match m.get_mut(from) {
            Some(s) => {
                s.available = false;
                std::mem::take(&mut s.directed)
            }
            None => Vec::new(),
        });
        self.broadcast_unavailable(svc, from, stanza, was_available, directed)
            .await;
        Outcome::Handled
    }

    async fn broadcast_unavailable(
        &self,
        svc: &Services,
        from: &FullJid,
        stanza: &Element,
        was_available: bool,
        directed: Vec<Jid>,
    ) {
        let user = from.to_bare();
        let contacts = self.contacts(svc, &user).await;
        let mut targets: Vec<SessionRecord> = Vec::new();
        let mut covered: HashSet<BareJid> = HashSet::new();
        let mut last_resource = false;
        if was_available {
            let own: Vec<SessionRecord> = self
                .available(svc, &user)
                .await
                .into_iter()
                .filter(|s| s.jid != *from)
                .collect();
            last_resource = own.is_empty();
            targets.extend(own);
            let me = Jid::from(from.clone());
            for c in contacts.iter().filter(|c| c.sub.state().has_from()) {
                covered.insert(c.jid.clone());
                if !self.cut_off(svc, &me, &Jid::from(c.jid.clone())).await {
                    targets.extend(self.available(svc, &c.jid).await);
                }
            }
            count("broadcast", 1);
        }
        let refs: Vec<&SessionRecord> = targets.iter().collect();
        deliver(svc, &refs, stanza, true).await;
        if last_resource {
            self.remember_unavailable(svc, from, stanza).await;
        }
        for to in directed {
            if covered.contains(&to.to_bare()) {
                continue;
            }
            let Some(p) = presence(Some("unavailable"), from.as_str(), Some(to.as_str())) else {
                continue;
            };
            self.to_jid(svc, &to, &p).await;
        }
    }

    /// Keeps the unavailable presence the account's last available resource broadcast, for
    /// probes while none is available (§4.3.2).
    async fn remember_unavailable(&self, svc: &Services, from: &FullJid, stanza: &Element) {
        let user = from.to_bare();
        let Some(u) = user_of(&user) else { return };
        let stamp_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let last = LastPresence {
            stanza: stanza.raw().clone(),
            stamp_ms: u64::try_from(stamp_ms).unwrap_or(0),
        };
        match svc.store.set_last_unavailable(&u, last).await {
            Ok(()) => {}
            // Removed meanwhile: nothing to answer for.
            Err(StoreError::NotFound) => {}
            Err(e) => tracing::warn!(error = %e, user = %user, "last presence not stored"),
        }
    }

    /// Answers a probe of `contact`, which has no available resource, for the session `to`:
    /// its last unavailable presence with a `<delay/>` (§4.3.2, XEP-0203), if one is known.
    async fn send_last_unavailable(&self, svc: &Services, contact: &BareJid, to: &SessionRecord) {
        let Some(u) = user_of(contact).filter(|_| self.is_local(contact)) else {
            return;
        };
        let last = match svc.store.last_unavailable(&u).await {
            Ok(Some(last)) => last,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, contact = %contact, "last presence unreadable");
                return;
            }
        };
        let stored = match Element::parse(last.stanza, ns::JABBER_CLIENT) {
            Ok(p) if p.name() == "presence" => p,
            Ok(_) | Err(_) => {
                tracing::warn!(contact = %contact, "stored last presence is not a presence");
                return;
            }
        };
        let nanos = i128::from(last.stamp_ms) * 1_000_000;
        let when =
            OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let stamped = with_delay(&stored, contact.domain().as_str(), when);
        if let Ok(p) = Element::parse(stamped, ns::JABBER_CLIENT) {
            deliver(svc, &[to], &p, true).await;
            count("probe_answered_unavailable", 1);
        }
    }

    /// Directed presence (§4.6): delivered to the full JID, or to every available resource
    /// of the bare JID; an available one is remembered so that it is undone at the end.
    async fn directed(
        &self,
        svc: &Services,
        from: &FullJid,
        stanza: &Element,
        to: Jid,
        available: bool,
    ) -> Outcome {
        let limit = svc.settings.max_directed_presence;
        let remembered = self.with_session(|m| {
            let Some(s) = m.get_mut(from) else {
                return true;
            };
            if available {
                if s.directed.contains(&to) {
                    return true;
                }
                if s.directed.len() >= limit {
                    return false;
                }
                s.directed.push(to.clone());
            } else {
                s.directed.retain(|j| *j != to);
            }
            true
        });
        if !remembered {
            count("directed_not_remembered", 1);
        }
        if self.to_jid(svc, &to, stanza).await > 0 {
            Outcome::Delivered
        } else {
            Outcome::Dropped("directed presence found no available resource")
        }
    }

    /// Hands a presence to a full JID (if bound) or to every available resource of a
    /// bare JID.
    async fn to_jid(&self, svc: &Services, to: &Jid, stanza: &Element) -> usize {
        match to.try_as_full() {
            Ok(full) => self.send_to_full(svc, full, stanza).await,
            Err(_) => {
                let bare = to.to_bare();
                let targets = self.available(svc, &bare).await;
                let refs: Vec<&SessionRecord> = targets.iter().collect();
                deliver(svc, &refs, stanza, false).await
            }
        }
    }

    async fn send_to_full(&self, svc: &Services, to: &FullJid, stanza: &Element) -> usize {
        match svc.registry.session(to).await {
            Ok(Some(r)) => deliver(svc, &[&r], stanza, false).await,
            _ => 0,
        }
    }

    /// A probe sent by a client (§4.3): answered only if the user is subscribed to the
    /// contact's presence.
    async fn client_probe(&self, svc: &Services, from: &FullJid, contact: &BareJid) -> Outcome {
        let subscribed = self
            .contacts(svc, &from.to_bare())
            .await
            .iter()
            .any(|c| c.jid == *contact && c.sub.state().has_to());
        if !subscribed {
            return Outcome::Dropped("probe without a subscription");
        }
        let Ok(Some(me)) = svc.registry.session(from).await else {
            return Outcome::Dropped("probe from a session the registry lost");
        };
        self.answer_probe(svc, contact, &me).await;
        Outcome::Handled
    }

    /// Applies a transition to `owner`'s item for `contact` under the owner's roster lock,
    /// stores it and pushes it; returns the subscription before and after.
    async fn transition<T>(
        &self,
        svc: &Services,
        owner: &BareJid,
        contact: &BareJid,
        step: impl FnOnce(Subscription) -> (Subscription, T),
    ) -> Result<(Subscription, Subscription, T), StoreError> {
        let Some(u) = user_of(owner) else {
            return Err(StoreError::NotFound);
        };
        let guard = self.lock_for(owner).lock().await;
        let item = svc.store.roster_item(&u, contact.as_str()).await?;
        let before = item.as_ref().map_or(Subscription::NONE, sub_of);
        let (after, extra) = step(before);
        if after == before {
            drop(guard);
            return Ok((before, after, extra));
        }
        let existed = item.is_some();
        if !existed && svc.store.roster(&u).await?.items.len() >= svc.settings.max_roster_items {
            // A full roster takes no new item, not even a stranger's request (which would
            // otherwise let anyone grow it without bound).
            count("roster_full", 1);
            return Err(StoreError::QuotaExceeded);
        }
        let hidden_before = item.as_ref().is_none_or(is_hidden);
        let is_pending_only = after.state() == subscription::SubState::NonePendingIn;
        let (stored, ask) = after.to_stored();
        let mut item = item.unwrap_or(RosterItem {
            jid: contact.as_str().to_owned(),
            name: None,
            subscription: String::new(),
            ask: false,
            groups: Vec::new(),
        });
        let push = if hidden_before && after == Subscription::NONE {
            // A request nobody put in the roster is gone: so is its item.
            if existed {
                svc.store.remove_roster_item(&u, contact.as_str()).await?;
            }
            None
        } else {
            let hidden = hidden_before && is_pending_only;
            item.subscription = if hidden {
                format!("{stored}{HIDDEN}")
            } else {
                stored
            };
            item.ask = ask;
            let version = svc.store.set_roster_item(&u, item.clone()).await?;
            (!hidden).then_some((version, item))
        };
        drop(guard);
        count("subscription", 1);
        if let Some((version, item)) = push {
            self.push(svc, owner, &item, Some(after), version).await;
        }
        Ok((before, after, extra))
    }

    /// A roster push (§2.1.6) of one item to every interested resource of `owner`: the
    /// available ones and those that asked for the roster. `sub: None` pushes a removal.
    pub(crate) async fn push(
        &self,
        svc: &Services,
        owner: &BareJid,
        item: &RosterItem,
        sub: Option<Subscription>,
        version: u64,
    ) {
        let sessions = match svc.registry.sessions(owner).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup failed");
                return;
            }
        };
        let interested: Vec<&SessionRecord> = self.with_session(|m| {
            sessions
                .iter()
                .filter(|s| s.is_available() || m.get(&s.jid).is_some_and(|st| st.roster_requested))
                .collect()
        });
        if interested.is_empty() {
            return;
        }
        let id = format!("push{}", self.push_ids.fetch_add(1, Ordering::Relaxed));
        let mut out = Vec::with_capacity(256);
        XmlWriter::new(&mut out)
            .start("iq")
            .attr("type", "set")
            .attr("id", &id)
            .attr("from", owner.as_str())
            .start("query")
            .attr("xmlns", ns::ROSTER)
            .attr("ver", &version.to_string())
            .raw(b"");
        write_item(&mut out, item, sub);
        XmlWriter::new(&mut out).end("query").end("iq");
        if let Some(iq) = parse_client(out) {
            let n = deliver(svc, &interested, &iq, true).await;
            count("roster_push", n as u64);
        }
    }

    /// Outbound subscription stanza from a user's session (A.2), then its processing at the
    /// contact (A.3) when it is routed.
    async fn outbound_subscription(
        &self,
        svc: &Services,
        from: &FullJid,
        kind: SubKind,
        contact: BareJid,
        stanza: &Element,
    ) -> Outcome {
        let user = from.to_bare();
        if contact == user {
            return Outcome::Dropped("subscription to oneself");
        }
        let result = self
            .transition(svc, &user, &contact, |s| {
                let o = subscription::outbound(s, kind);
                (o.next, o.route)
            })
            .await;
        let (before, after, route) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "roster update failed");
                return Outcome::Dropped("roster update failed");
            }
        };
        if !route {
            return Outcome::Handled;
        }
        // §3.1.2: the server stamps the bare JIDs on a routed subscription stanza.
        let routed = match Element::parse(
            stanza.with_addresses(Some(contact.as_str()), Some(user.as_str())),
            ns::JABBER_CLIENT,
        ) {
            Ok(r) => r,
            Err(_) => return Outcome::Dropped("unwritable subscription stanza"),
        };
        Box::pin(self.inbound_subscription(svc, &user, &contact, kind, &routed)).await;
        let (had_from, has_from) = (before.state().has_from(), after.state().has_from());
        if kind == SubKind::Subscribed && !had_from && has_from {
            // §3.1.5: the contact now receives the user's presence.
            self.presence_of_to(svc, &user, &contact).await;
        }
        if kind == SubKind::Unsubscribed && had_from && !has_from {
            // §3.2.2: and no longer does.
            self.unavailable_of_to(svc, &user, &contact).await;
        }
        Outcome::Delivered
    }

    /// A subscription stanza from `sender` arriving for local `user` (A.3): state change,
    /// push, delivery (or keeping a request for later), and the server's answers.
    async fn inbound_subscription(
        &self,
        svc: &Services,
        sender: &BareJid,
        user: &BareJid,
        kind: SubKind,
        stanza: &Element,
    ) {
        if !self.is_local(user) {
            return;
        }
        let exists = match user_of(user) {
            Some(u) => svc.store.exists(&u).await.unwrap_or(false),
            None => false,
        };
        if !exists {
            // RFC 6121 §8.5.1: a request to nobody is answered `unsubscribed`; the rest
            // is ignored.
            if kind == SubKind::Subscribe
                && let Some(reply) =
                    presence(Some("unsubscribed"), user.as_str(), Some(sender.as_str()))
            {
                Box::pin(self.inbound_subscription(
                    svc,
                    user,
                    sender,
                    SubKind::Unsubscribed,
                    &reply,
                ))
                .await;
            }
            return;
        }
        let result = self
            .transition(svc, user, sender, |s| {
                let i = subscription::inbound(s, kind);
                (i.next, (i.deliver, i.auto_subscribed))
            })
            .await;
        let (before, after, (deliver_it, auto)) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "roster update failed");
                return;
            }
        };
        if deliver_it {
            let targets = self.available(svc, user).await;
            let refs: Vec<&SessionRecord> = targets.iter().collect();
            deliver(svc, &refs, stanza, false).await;
        }
        if auto {
            if let Some(reply) = presence(Some("subscribed"), user.as_str(), Some(sender.as_str()))
            {
                Box::pin(self.inbound_subscription(svc, user, sender, SubKind::Subscribed, &reply))
                    .await;
            }
            self.presence_of_to(svc, user, sender).await;
        }
        if kind == SubKind::Unsubscribe && before.state().has_from() && !after.state().has_from() {
            // §3.3.3: the contact no longer receives the user's presence.
            self.unavailable_of_to(svc, user, sender).await;
        }
    }

    /// The last presence of each available resource of `of`, to the available resources
    /// of `to`.
    async fn presence_of_to(&self, svc: &Services, of: &BareJid, to: &BareJid) {
        let targets = self.available(svc, to).await;
        for s in self.available(svc, of).await {
            for t in &targets {
                self.send_last_presence(svc, &s, t).await;
            }
        }
    }

    /// Unavailable from each available resource of `of`, to the available resources of
    /// `to`.
    async fn unavailable_of_to(&self, svc: &Services, of: &BareJid, to: &BareJid) {
        let targets = self.available(svc, to).await;
        let refs: Vec<&SessionRecord> = targets.iter().collect();
        if refs.is_empty() {
            return;
        }
        for s in self.available(svc, of).await {
            if let Some(p) = presence(Some("unavailable"), s.jid.as_str(), None) {
                deliver(svc, &refs, &p, true).await;
            }
        }
    }

    /// Cancels both directions of a subscription for a removed roster item (RFC 6121
    /// §2.5.2), as if the user had sent `unsubscribe` and `unsubscribed`.
    pub(crate) async fn cancel_both(
        &self,
        svc: &Services,
        user: &BareJid,
        contact: &BareJid,
        was: Subscription,
    ) {
        let s = was.state();
        if (s.has_to() || s.pending_out())
            && let Some(p) = presence(Some("unsubscribe"), user.as_str(), Some(contact.as_str()))
        {
            Box::pin(self.inbound_subscription(svc, user, contact, SubKind::Unsubscribe, &p)).await;
        }
        if s.has_from() || s.pending_in() {
            if let Some(p) = presence(Some("unsubscribed"), user.as_str(), Some(contact.as_str())) {
                Box::pin(self.inbound_subscription(svc, user, contact, SubKind::Unsubscribed, &p))
                    .await;
            }
            if s.has_from() {
                self.unavailable_of_to(svc, user, contact).await;
            }
        }
    }

    /// A chat or normal message for an account with no resource to take it: stored with a
    /// `<delay/>` within the quota (XEP-0160 §3, XEP-0203). `Err` carries the condition to
    /// bounce with.
    pub(crate) async fn store_offline(
        &self,
        svc: &Services,
        bare: &BareJid,
        stanza: &Element,
    ) -> Result<(), StanzaError> {
        let Some(u) = user_of(bare) else {
            return Err(StanzaError::new(StanzaErrorCondition::ServiceUnavailable));
        };
        let domain = bare.domain().as_str();
        // A stanza coming back unacknowledged (XEP-0198 §5) after it was already stored once
        // keeps its first stamp: the time it originally failed (XEP-0203), not a second one.
        let stamped = if has_own_delay(stanza.raw(), domain) {
            stanza.raw().clone()
        } else {
            with_delay(stanza, domain, OffsetDateTime::now_utc())
        };
        match svc
            .store
            .push_offline(&u, stamped, svc.settings.offline_quota)
            .await
        {
            Ok(()) => {
                count("offline_stored", 1);
                Ok(())
            }
            Err(e) => {
                count("offline_refused", 1);
                let condition = match e {
                    StoreError::QuotaExceeded | StoreError::NotFound => {
                        StanzaErrorCondition::ServiceUnavailable
                    }
                    _ => {
                        tracing::warn!(error = %e, "offline storage failed");
                        StanzaErrorCondition::InternalServerError
                    }
                };
                Err(StanzaError::new(condition))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        Element::parse(Bytes::from(xml.to_owned()), ns::JABBER_CLIENT).unwrap()
    }

    #[test]
    fn priority_is_read_from_the_direct_child() {
        assert_eq!(priority_of(&el("<presence/>")), 0);
        assert_eq!(
            priority_of(&el("<presence><priority>5</priority></presence>")),
            5
        );
        assert_eq!(
            priority_of(&el(
                "<presence><show>dnd</show><priority> -128 </priority></presence>"
            )),
            -128
        );
        // Out of range or not a number: 0.
        assert_eq!(
            priority_of(&el("<presence><priority>128</priority></presence>")),
            0
        );
        assert_eq!(
            priority_of(&el("<presence><priority>high</priority></presence>")),
            0
        );
        // A deeper <priority/> is someone else's.
        assert_eq!(
            priority_of(&el(
                "<presence><x xmlns='urn:x'><priority>9</priority></x></presence>"
            )),
            0
        );
    }

    #[test]
    fn a_stored_stamp_is_recognised_and_not_doubled() {
        let now = OffsetDateTime::from_unix_timestamp(0).unwrap();
        let once = with_delay(&el("<message to='a@b'><body>x</body></message>"), "b", now);
        assert!(has_own_delay(&once, "b"));
        assert!(!has_own_delay(&once, "c"));
        assert!(!has_own_delay(
            b"<message to='a@b'><body>x</body></message>",
            "b"
        ));
    }

    #[test]
    fn delay_is_appended_as_the_last_child() {
        let now = OffsetDateTime::from_unix_timestamp(1_000_000_000).unwrap();
        let out = with_delay(
            &el("<message to='a@b' id='1'><body>x</body></message>"),
            "b",
            now,
        );
        assert_eq!(
            &out[..],
            b"<message to='a@b' id='1'><body>x</body><delay xmlns='urn:xmpp:delay' from='b' \
              stamp='2001-09-09T01:46:40.000Z'/></message>"
        );
        let out = with_delay(&el("<message to='a@b'/>"), "b", now);
        let parsed = Element::parse(out, ns::JABBER_CLIENT).unwrap();
        assert_eq!(parsed.first_child(), Some(("delay", ns::DELAY)));
        assert!(parsed.raw().ends_with(b"</message>"));
    }

    #[test]
    fn roster_items_are_written_per_rfc_6121_2_1_2() {
        let item = RosterItem {
            jid: "a@b".into(),
            name: Some("A'".into()),
            subscription: "none+in".into(),
            ask: true,
            groups: vec!["g<1".into()],
        };
        let mut out = Vec::new();
        write_item(&mut out, &item, Some(sub_of(&item)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<item jid='a@b' name='A&apos;' subscription='none' ask='subscribe'>\
             <group>g&lt;1</group></item>"
        );
        let mut out = Vec::new();
        write_item(&mut out, &item, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<item jid='a@b' name='A&apos;' subscription='remove'/>"
        );
    }
}
