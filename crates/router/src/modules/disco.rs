//! Service discovery for the server (XEP-0030): `disco#info` (§3.1) answers the identity
//! `server/im` (§3.1, the XMPP Registrar's category list) and the features of every
//! registered module; `disco#items` (§4.1) answers an empty list until the server hosts
//! components. A `node` (§3.2, §4.2) is not known here: `item-not-found`.

use async_trait::async_trait;
use bytes::Bytes;
use starling_xml::writer::XmlWriter;
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, get_only};
use crate::stanza::IqType;

/// The XEP-0030 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disco;

const FEATURES: &[&str] = &[ns::DISCO_INFO, ns::DISCO_ITEMS];

#[async_trait]
impl Module for Disco {
    fn name(&self) -> &'static str {
        "disco"
    }

    fn features(&self) -> &[&'static str] {
        FEATURES
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        super::is_server_level(target) && (ns == ns::DISCO_INFO || ns == ns::DISCO_ITEMS)
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if iq.kind != IqType::Get {
            return get_only();
        }
        if iq.name != "query" {
            return bad_request("the disco payload is <query/>");
        }
        let payload = match iq.payload() {
            Ok(p) => p,
            Err(e) => return bad_request(&e.to_string()),
        };
        if payload.attr("node").is_some() {
            return IqResult::Error(StanzaError::new(StanzaErrorCondition::ItemNotFound));
        }
        let mut out = Vec::with_capacity(128 + 48 * ctx.features.len());
        let mut w = XmlWriter::new(&mut out);
        w.start("query").attr("xmlns", iq.ns);
        if iq.ns == ns::DISCO_INFO {
            w.start("identity")
                .attr("category", "server")
                .attr("type", "im")
                .attr("name", &ctx.services.settings.name)
                .empty();
            for feature in ctx.features {
                w.start("feature").attr("var", feature).empty();
            }
            w.end("query");
        } else {
            w.empty();
        }
        IqResult::Result(Some(Bytes::from(out)))
    }
}
