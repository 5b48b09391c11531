//! Roster management (RFC 6121 §2) with roster versioning (XEP-0237 §2-§4).
//!
//! - get (§2.1.3, §2.2): the whole roster with `ver`; with a `ver` equal to the current one
//!   (XEP-0237 §4.1) an empty result, the client's copy being up to date. The session then
//!   receives roster pushes (it is "interested", §2.1.6).
//! - set (§2.3): adds or updates one item's `name` and groups; its `subscription` (other
//!   than `remove`) and `ask` are ignored (§2.1.2.5, §2.3.2), the server owning them.
//! - remove (§2.5): cancels the subscription both ways (§2.5.2) and pushes the removal.
//!
//! Errors (§2.1.5, §2.3.3, §2.5.3): another account's roster is `forbidden`; not exactly one
//! item, a missing or invalid `jid`, or a duplicate group is `bad-request`; a name or group
//! over the configured length, an empty group or too many groups is `not-acceptable`; an
//! item for the user's own JID is `not-allowed`; a new item beyond the roster limit is
//! `resource-constraint`; removing an absent item is `item-not-found`.

use async_trait::async_trait;
use bytes::Bytes;
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, XmlVersion};
use starling_store::RosterItem;
use starling_xml::writer::XmlWriter;
use starling_xmpp::jid;
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request};
use crate::im::{is_hidden, sub_of, user_of, write_item};
use crate::stanza::IqType;

/// The RFC 6121 roster module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Roster;

/// One `<item/>` of a roster query, as the client sent it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ItemRequest {
    jid: Option<String>,
    name: Option<String>,
    subscription: Option<String>,
    groups: Vec<String>,
}

/// A `<query xmlns='jabber:iq:roster'/>`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Query {
    ver: Option<String>,
    items: Vec<ItemRequest>,
}

fn xml_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Reads a roster query: `ver`, and each item with its attributes and groups.
fn parse_query(inner: &[u8]) -> Result<Query, String> {
    let text = std::str::from_utf8(inner).map_err(xml_err)?;
    let mut reader = NsReader::from_str(text);
    let mut query = Query::default();
    // 0 outside the query, 1 inside it, 2 inside an item, 3 inside a group.
    let mut depth = 0usize;
    let mut in_group = false;
    loop {
        let (resolved, event) = reader.read_resolved_event().map_err(xml_err)?;
        let in_roster_ns = matches!(&resolved, ResolveResult::Bound(n) if n.as_ref() == ns::ROSTER)
            || matches!(resolved, ResolveResult::Unbound | ResolveResult::Unknown(_));
        match event {
            Event::Start(ref s) | Event::Empty(ref s) => {
                let empty = matches!(event, Event::Empty(_));
                let local = s.local_name();
                match depth {
                    0 => {
                        for a in s.attributes() {
                            let a = a.map_err(xml_err)?;
                            if a.key.local_name().as_ref() == "ver" {
                                let v = a
                                    .normalized_value(XmlVersion::Implicit1_0)
                                    .map_err(xml_err)?;
                                query.ver = Some(v.into_owned());
                            }
                        }
                    }
                    1 if local.as_ref() == "item" && in_roster_ns => {
                        let mut item = ItemRequest::default();
                        for a in s.attributes() {
                            let a = a.map_err(xml_err)?;
                            let v = a
                                .normalized_value(XmlVersion::Implicit1_0)
                                .map_err(xml_err)?
                                .into_owned();
                            match a.key.as_ref() {
                                "jid" => item.jid = Some(v),
                                "name" => item.name = Some(v),
                                "subscription" => item.subscription = Some(v),
                                _ => {}
                            }
                        }
                        query.items.push(item);
                    }
                    2 if local.as_ref() == "group" && in_roster_ns => {
                        if let Some(item) = query.items.last_mut() {
                            item.groups.push(String::new());
                        }
                        in_group = !empty;
                    }
                    _ => {}
                }
                if !empty {
                    depth += 1;
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if depth < 3 {
                    in_group = false;
                }
            }
            Event::Text(t) if in_group && depth == 3 => {
                let t = t.xml10_content();
                push_group_text(&mut query, &t);
            }
            Event::CData(t) if in_group && depth == 3 => {
                let t = t.xml10_content();
                push_group_text(&mut query, &t);
            }
            Event::GeneralRef(r) if in_group && depth == 3 => {
                let c = match r.resolve_char_ref().map_err(xml_err)? {
                    Some(c) => c,
                    None => match r.as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        _ => return Err("unknown entity".into()),
                    },
                };
                push_group_text(&mut query, c.encode_utf8(&mut [0u8; 4]));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(query)
}

fn push_group_text(query: &mut Query, text: &str) {
    if let Some(g) = query.items.last_mut().and_then(|i| i.groups.last_mut()) {
        g.push_str(text);
    }
}

fn error(condition: StanzaErrorCondition, text: &str) -> IqResult {
    IqResult::Error(StanzaError::new(condition).with_text(text))
}

fn internal(e: impl std::fmt::Display) -> IqResult {
    tracing::warn!(error = %e, "roster store failed");
    IqResult::Error(StanzaError::new(StanzaErrorCondition::InternalServerError))
}

#[async_trait]
impl Module for Roster {
    fn name(&self) -> &'static str {
        "roster"
    }

    fn features(&self) -> &[&'static str] {
        // Roster versioning is a stream feature (XEP-0237 §2.1) the edge advertises; the
        // roster itself has no disco feature.
        &[]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        ns == ns::ROSTER && matches!(target, IqTarget::OwnAccount | IqTarget::Account(_))
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        let user = ctx.from.to_bare();
        if let IqTarget::Account(bare) = ctx.target
            && *bare != user
        {
            return error(
                StanzaErrorCondition::Forbidden,
                "a roster belongs to its own account",
            );
        }
        if iq.name != "query" {
            return bad_request("the roster payload is <query/>");
        }
        let query = match parse_query(&iq.stanza.inner()) {
            Ok(q) => q,
            Err(e) => return bad_request(&e),
        };
        let Some(u) = user_of(&user) else {
            return bad_request("no account");
        };
        let svc = ctx.services;
        match iq.kind {
            IqType::Get => {
                svc.im.roster_requested(ctx.from);
                let roster = match svc.store.roster(&u).await {
                    Ok(r) => r,
                    Err(e) => return internal(e),
                };
                let ver = roster.version.to_string();
                if query.ver.as_deref() == Some(ver.as_str()) {
                    // XEP-0237 §4.1: up to date; changes will come as pushes.
                    return IqResult::Result(None);
                }
                let mut out = Vec::with_capacity(64 + 96 * roster.items.len());
                XmlWriter::new(&mut out)
                    .start("query")
                    .attr("xmlns", ns::ROSTER)
                    .attr("ver", &ver)
                    .raw(b"");
                for item in roster.items.iter().filter(|i| !is_hidden(i)) {
                    write_item(&mut out, item, Some(sub_of(item)));
                }
                XmlWriter::new(&mut out).end("query");
                IqResult::Result(Some(Bytes::from(out)))
            }
            IqType::Set => self.set(ctx, query, &user, &u).await,
            IqType::Result | IqType::Error => bad_request("not a request"),
        }
    }
}

impl Roster {
    async fn set(
        &self,
        ctx: &IqContext<'_>,
        query: Query,
        user: &starling_xmpp::BareJid,
        u: &starling_store::BareUser,
    ) -> IqResult {
        let svc = ctx.services;
        let settings = &svc.settings;
        let mut items = query.items;
        let (Some(req), true) = (items.pop(), items.is_empty()) else {
            return bad_request("a roster set carries exactly one item");
        };
        let Some(jid_text) = req.jid.as_deref() else {
            return bad_request("a roster item needs a 'jid'");
        };
        let contact = match jid::parse(jid_text) {
            Ok(j) => j.to_bare(),
            Err(_) => return bad_request("the item's 'jid' is not a JID"),
        };
        if contact == *user {
            return error(
                StanzaErrorCondition::NotAllowed,
                "the roster cannot hold its own account",
            );
        }
        if req.subscription.as_deref() == Some("remove") {
            // The item is read and removed under the account's roster lock (see `crate::im`).
            let guard = svc.im.lock_for(user).lock().await;
            let existing = match svc.store.roster_item(u, contact.as_str()).await {
                Ok(i) => i,
                Err(e) => return internal(e),
            };
            let Some(item) = existing.filter(|i| !is_hidden(i)) else {
                return error(StanzaErrorCondition::ItemNotFound, "no such roster item");
            };
            let version = match svc.store.remove_roster_item(u, contact.as_str()).await {
                Ok(v) => v,
                Err(e) => return internal(e),
            };
            drop(guard);
            svc.im.push(svc, user, &item, None, version).await;
            svc.im.cancel_both(svc, user, &contact, sub_of(&item)).await;
            return IqResult::Result(None);
        }
        if let Some(name) = &req.name
            && name.len() > settings.max_roster_name_bytes
        {
            return error(StanzaErrorCondition::NotAcceptable, "the name is too long");
        }
        if req.groups.len() > settings.max_roster_groups {
            return error(StanzaErrorCondition::NotAcceptable, "too many groups");
        }
        for (i, g) in req.groups.iter().enumerate() {
            if g.is_empty() {
                return error(StanzaErrorCondition::NotAcceptable, "an empty group");
            }
            if g.len() > settings.max_roster_group_bytes {
                return error(
                    StanzaErrorCondition::NotAcceptable,
                    "a group name is too long",
                );
            }
            if req.groups.get(..i).is_some_and(|before| before.contains(g)) {
                return bad_request("a duplicate group");
            }
        }
        // Read and written under the account's roster lock, so a subscription change made
        // meanwhile by another worker is not overwritten.
        let guard = svc.im.lock_for(user).lock().await;
        let roster = match svc.store.roster(u).await {
            Ok(r) => r,
            Err(e) => return internal(e),
        };
        let existing = roster.items.iter().find(|i| i.jid == contact.as_str());
        if existing.is_none() && roster.items.len() >= settings.max_roster_items {
            return error(
                StanzaErrorCondition::ResourceConstraint,
                "the roster is full",
            );
        }
        let (subscription, ask) = match existing {
            // A hidden item becomes visible, its pending request kept.
            Some(i) => (i.subscription.trim_end_matches("+hidden").to_owned(), i.ask),
            None => ("none".to_owned(), false),
        };
        let item = RosterItem {
            jid: contact.as_str().to_owned(),
            name: req.name.filter(|n| !n.is_empty()),
            subscription,
            ask,
            groups: req.groups,
        };
        let version = match svc.store.set_roster_item(u, item.clone()).await {
            Ok(v) => v,
            Err(e) => return internal(e),
        };
        drop(guard);
        svc.im
            .push(svc, user, &item, Some(sub_of(&item)), version)
            .await;
        IqResult::Result(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_items_groups_and_ver() {
        let q = parse_query(
            b"<query xmlns='jabber:iq:roster' ver='7'><item jid='a@b' name='A &amp; co' \
              subscription='both'><group>x&lt;y</group><group><![CDATA[z]]></group>\
              <group/></item></query>",
        )
        .unwrap();
        assert_eq!(q.ver.as_deref(), Some("7"));
        assert_eq!(q.items.len(), 1);
        let i = &q.items[0];
        assert_eq!(i.jid.as_deref(), Some("a@b"));
        assert_eq!(i.name.as_deref(), Some("A & co"));
        assert_eq!(i.subscription.as_deref(), Some("both"));
        assert_eq!(i.groups, ["x<y", "z", ""]);
        let q = parse_query(b"<query xmlns='jabber:iq:roster'/>").unwrap();
        assert!(q.ver.is_none() && q.items.is_empty());
        let q = parse_query(
            b"<query xmlns='jabber:iq:roster'><item jid='a@b'/><item jid='c@d'/></query>",
        )
        .unwrap();
        assert_eq!(q.items.len(), 2);
    }
}
