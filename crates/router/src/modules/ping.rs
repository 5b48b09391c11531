//! XMPP Ping (XEP-0199) addressed to the server (§4.2, client-to-server ping): an empty
//! `result` answers a `<ping/>` get.

use async_trait::async_trait;
use starling_xmpp::ns;

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, get_only};
use crate::stanza::IqType;

/// The XEP-0199 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ping;

#[async_trait]
impl Module for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::PING]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        super::is_server_level(target) && ns == ns::PING
    }

    async fn handle_iq(&self, _ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if iq.kind != IqType::Get {
            return get_only();
        }
        if iq.name != "ping" {
            return bad_request("the ping payload is <ping/>");
        }
        IqResult::Result(None)
    }
}
