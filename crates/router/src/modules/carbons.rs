//! Message Carbons (XEP-0280), the router's part: a session enables (§4) or disables (§5)
//! carbons with an IQ set; the router then copies the chat messages its account sends
//! and receives to it (`crate::im`, called from the routing table). Only `type='chat'`
//! messages are copied (§6.1's first rule), not those marked `<private/>` (§8) or
//! `no-copy` (XEP-0334).

use async_trait::async_trait;
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request};
use crate::stanza::IqType;

/// The XEP-0280 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Carbons;

#[async_trait]
impl Module for Carbons {
    fn name(&self) -> &'static str {
        "carbons"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::CARBONS]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        ns == ns::CARBONS && matches!(target, IqTarget::OwnAccount | IqTarget::Account(_))
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if let IqTarget::Account(bare) = ctx.target
            && *bare != ctx.from.to_bare()
        {
            return IqResult::Error(StanzaError::new(StanzaErrorCondition::Forbidden));
        }
        if iq.kind != IqType::Set {
            return bad_request("carbons are enabled or disabled with a set");
        }
        let on = match iq.name {
            "enable" => true,
            "disable" => false,
            _ => return bad_request("the carbons payloads are <enable/> and <disable/>"),
        };
        if ctx.services.im.set_carbons(ctx.services, ctx.from, on) {
            IqResult::Result(None)
        } else {
            IqResult::Error(StanzaError::new(StanzaErrorCondition::ResourceConstraint))
        }
    }
}
