//! Private XML storage (XEP-0049): one XML fragment per (account, namespace), read with
//! `get` (the stored fragment, or the empty element sent when there is none, §2.2) and
//! replaced with `set` (§2.1). Only the account itself reaches its data: anything
//! addressed to another account is `forbidden` (§3). A query holds exactly one child
//! element, not in a `jabber:` namespace (§2.3: `not-acceptable`); a fragment larger
//! than the configured limit is `not-acceptable` too.

use async_trait::async_trait;
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, payload_element};
use crate::im::user_of;
use crate::stanza::IqType;

/// The XEP-0049 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Private;

/// The namespace prefix the server keeps for itself among private keys (XEP-0049 §2.3
/// reserves `jabber:`; Starling also keeps `urn:starling:` for its own records).
pub(crate) const RESERVED: &[&str] = &["jabber:", "urn:starling:"];

fn error(condition: StanzaErrorCondition, text: &str) -> IqResult {
    IqResult::Error(StanzaError::new(condition).with_text(text))
}

#[async_trait]
impl Module for Private {
    fn name(&self) -> &'static str {
        "private"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::PRIVATE]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        ns == ns::PRIVATE && matches!(target, IqTarget::OwnAccount | IqTarget::Account(_))
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        let own = ctx.from.to_bare();
        if let IqTarget::Account(bare) = ctx.target
            && *bare != own
        {
            return error(
                StanzaErrorCondition::Forbidden,
                "private data belongs to its own account",
            );
        }
        if iq.name != "query" {
            return bad_request("the private storage payload is <query/>");
        }
        let query = match payload_element(iq, ns::JABBER_CLIENT) {
            Ok(q) => q,
            Err(e) => return e,
        };
        let inner = query.inner();
        let trimmed = inner.trim_ascii();
        if trimmed.is_empty() {
            return error(
                StanzaErrorCondition::NotAcceptable,
                "the query holds no element",
            );
        }
        let start = inner.len() - inner.trim_ascii_start().len();
        let child = match starling_xml::Element::parse(
            inner.slice(start..start + trimmed.len()),
            ns::PRIVATE,
        ) {
            Ok(c) => c,
            Err(_) => {
                return error(
                    StanzaErrorCondition::NotAcceptable,
                    "the query holds exactly one element",
                );
            }
        };
        let key = child.ns().to_owned();
        if key == ns::PRIVATE || RESERVED.iter().any(|r| key.starts_with(r)) {
            return error(
                StanzaErrorCondition::NotAcceptable,
                "this namespace cannot be stored",
            );
        }
        let Some(user) = user_of(&own) else {
            return bad_request("no account");
        };
        let store = &ctx.services.store;
        let stored = match iq.kind {
            IqType::Get => match store.private_xml(&user, &key).await {
                Ok(found) => found.unwrap_or_else(|| child.raw().clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "private store failed");
                    return error(StanzaErrorCondition::InternalServerError, "storage failed");
                }
            },
            IqType::Set => {
                if child.raw().len() > ctx.services.settings.max_private_bytes {
                    return error(
                        StanzaErrorCondition::NotAcceptable,
                        "the fragment is too large",
                    );
                }
                if let Err(e) = store
                    .set_private_xml(&user, &key, child.raw().clone())
                    .await
                {
                    tracing::warn!(error = %e, "private store failed");
                    return error(StanzaErrorCondition::InternalServerError, "storage failed");
                }
                return IqResult::Result(None);
            }
            IqType::Result | IqType::Error => return bad_request("not a request"),
        };
        let mut out = Vec::with_capacity(stored.len() + 48);
        starling_xml::writer::XmlWriter::new(&mut out)
            .start("query")
            .attr("xmlns", ns::PRIVATE)
            .raw(&stored)
            .end("query");
        IqResult::Result(Some(bytes::Bytes::from(out)))
    }
}
