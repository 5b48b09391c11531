//! Service discovery for the server (XEP-0030): `disco#info` (§3.1) answers the identity
//! `server/im` (§3.1, the XMPP Registrar's category list) and the features of every
//! registered module; `disco#items` (§4.1) answers an empty list until the server hosts
//! components. The one `node` known (§3.2) is the server's entity capabilities node
//! `node#ver` (XEP-0115 §6.2), answered by disco#info with the same identities and features
//! the verification string was computed from; any other node is `item-not-found`.

use async_trait::async_trait;
use bytes::Bytes;
use starling_xml::writer::XmlWriter;
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, get_only};
use crate::Settings;
use crate::caps::Identity;
use crate::stanza::IqType;

/// The XEP-0030 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disco;

const FEATURES: &[&str] = &[ns::DISCO_INFO, ns::DISCO_ITEMS];

/// The identities disco#info answers for the server: one, `server/im` with the software name.
pub fn identities(settings: &Settings) -> Vec<Identity> {
    vec![Identity {
        category: "server".to_owned(),
        type_: "im".to_owned(),
        lang: None,
        name: Some(settings.name.clone()),
    }]
}

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
        let node = payload.attr("node");
        if let Some(node) = node
            && !(iq.ns == ns::DISCO_INFO && node == ctx.caps.disco_node())
        {
            return IqResult::Error(StanzaError::new(StanzaErrorCondition::ItemNotFound));
        }
        let mut out = Vec::with_capacity(128 + 48 * ctx.features.len());
        let mut w = XmlWriter::new(&mut out);
        w.start("query").attr("xmlns", iq.ns).attr_opt("node", node);
        if iq.ns == ns::DISCO_INFO {
            for identity in identities(&ctx.services.settings) {
                w.start("identity")
                    .attr("category", &identity.category)
                    .attr("type", &identity.type_)
                    .attr_opt("xml:lang", identity.lang.as_deref())
                    .attr_opt("name", identity.name.as_deref())
                    .empty();
            }
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
