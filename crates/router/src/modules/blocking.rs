//! Blocking Command (XEP-0191): the blocklist is read with `<blocklist/>` (§3.2), changed
//! with `<block/>` (§3.3) and `<unblock/>` (§3.4, all items when it has none), and each
//! change is pushed to the account's resources that have read the list. Enforcement is in
//! the router's table (stanzas between an account and an entity it blocks: §3.5, §3.6)
//! and in presence broadcast (`crate::im`).
//!
//! Errors: another account's list is `forbidden`; a `<block/>` without items or an item
//! without a valid `jid` is `bad-request` (§3.3); more than the configured number of
//! items is `resource-constraint`. The list is kept in the account's private storage
//! under a key clients cannot use.

use async_trait::async_trait;
use bytes::Bytes;
use quick_xml::events::Event;
use quick_xml::{NsReader, XmlVersion};
use starling_xml::writer::XmlWriter;
use starling_xmpp::jid::{self, Jid};
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request};
use crate::stanza::IqType;

/// The XEP-0191 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Blocking;

/// The `jid` of every `<item/>` directly inside the payload element.
fn item_jids(inner: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(inner).map_err(|e| e.to_string())?;
    let mut reader = NsReader::from_str(text);
    // 0 outside the payload, 1 directly inside it.
    let mut depth = 0usize;
    let mut out = Vec::new();
    loop {
        let event = reader.read_event().map_err(|e| e.to_string())?;
        let (start, opens) = match &event {
            Event::Start(s) => (s, true),
            Event::Empty(s) => (s, false),
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        if depth == 1 && start.local_name().as_ref() == "item" {
            let mut jid = None;
            for a in start.attributes() {
                let a = a.map_err(|e| e.to_string())?;
                if a.key.as_ref() == "jid" {
                    let v = a
                        .normalized_value(XmlVersion::Implicit1_0)
                        .map_err(|e| e.to_string())?;
                    jid = Some(v.into_owned());
                }
            }
            out.push(jid.ok_or("an item without a 'jid'")?);
        }
        if opens {
            depth += 1;
        }
    }
    Ok(out)
}

fn write_items(out: &mut Vec<u8>, name: &str, items: &[Jid]) {
    let mut w = XmlWriter::new(out);
    w.start(name).attr("xmlns", ns::BLOCKING);
    if items.is_empty() {
        w.empty();
        return;
    }
    for j in items {
        w.start("item").attr("jid", j.as_str()).empty();
    }
    w.end(name);
}

#[async_trait]
impl Module for Blocking {
    fn name(&self) -> &'static str {
        "blocking"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::BLOCKING]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        ns == ns::BLOCKING && matches!(target, IqTarget::OwnAccount | IqTarget::Account(_))
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        let user = ctx.from.to_bare();
        if let IqTarget::Account(bare) = ctx.target
            && *bare != user
        {
            return IqResult::Error(
                StanzaError::new(StanzaErrorCondition::Forbidden)
                    .with_text("a blocklist belongs to its own account"),
            );
        }
        let svc = ctx.services;
        let jids = match item_jids(&iq.stanza.inner()) {
            Ok(j) => j,
            Err(e) => return bad_request(&e),
        };
        let mut items = Vec::with_capacity(jids.len());
        for j in &jids {
            match jid::parse(j) {
                Ok(j) => items.push(j),
                Err(_) => return bad_request("an item's 'jid' is not a JID"),
            }
        }
        match (iq.kind, iq.name) {
            (IqType::Get, "blocklist") => {
                svc.im.blocklist_requested(ctx.from);
                let list = svc.im.blocklist(svc, &user).await;
                let mut out = Vec::with_capacity(64 + 48 * list.len());
                write_items(&mut out, "blocklist", &list);
                IqResult::Result(Some(Bytes::from(out)))
            }
            (IqType::Set, name @ ("block" | "unblock")) => {
                let block = name == "block";
                if block && items.is_empty() {
                    return bad_request("a block names at least one JID");
                }
                let changed = match svc.im.change_blocklist(svc, &user, block, &items).await {
                    Ok(c) => c,
                    Err(None) => {
                        return IqResult::Error(
                            StanzaError::new(StanzaErrorCondition::ResourceConstraint)
                                .with_text("the blocklist is full"),
                        );
                    }
                    Err(Some(e)) => {
                        tracing::warn!(error = %e, "blocklist store failed");
                        return IqResult::Error(StanzaError::new(
                            StanzaErrorCondition::InternalServerError,
                        ));
                    }
                };
                if !changed.is_empty() {
                    // An unblock of everything pushes an empty <unblock/> (§3.4).
                    let pushed: &[Jid] = if !block && items.is_empty() {
                        &[]
                    } else {
                        &changed
                    };
                    let mut payload = Vec::with_capacity(64 + 48 * pushed.len());
                    write_items(&mut payload, name, pushed);
                    svc.im.push_blocklist(svc, &user, &payload).await;
                    for j in &changed {
                        svc.im.after_block_change(svc, &user, j, block).await;
                    }
                }
                IqResult::Result(None)
            }
            (IqType::Get | IqType::Set, _) => {
                bad_request("the blocking payloads are <blocklist/>, <block/> and <unblock/>")
            }
            (IqType::Result | IqType::Error, _) => bad_request("not a request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_item_jids_one_level_deep() {
        assert_eq!(
            item_jids(
                b"<block xmlns='urn:xmpp:blocking'><item jid='a@b'/><item jid='c&amp;d'>\
                  <item jid='deep'/></item></block>"
            )
            .unwrap(),
            ["a@b", "c&d"]
        );
        assert!(
            item_jids(b"<unblock xmlns='urn:xmpp:blocking'/>")
                .unwrap()
                .is_empty()
        );
        assert!(item_jids(b"<block xmlns='urn:xmpp:blocking'><item/></block>").is_err());
    }
}
