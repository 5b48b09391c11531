//! Presence at the ends of a session (RFC 6121 §4): a bound resource is tracked from its
//! start, and when it ends, for any reason (clean close, connection loss, timeout,
//! conflict, shutdown), its contacts and the account's other resources receive
//! `unavailable` (§4.5.2) and so does whoever got its directed presence (§4.6.3). The
//! presence stanzas themselves are routed by the router's table (see `crate::im`).

use async_trait::async_trait;
use starling_cluster::EndReason;
use starling_xmpp::FullJid;

use super::{Module, Services};

/// The session hooks of RFC 6121 presence.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presence;

#[async_trait]
impl Module for Presence {
    fn name(&self) -> &'static str {
        "presence"
    }

    fn features(&self) -> &[&'static str] {
        &[]
    }

    async fn session_started(&self, services: &Services, jid: &FullJid) {
        services.im.session_started(services, jid);
    }

    async fn session_ended(&self, services: &Services, jid: &FullJid, _reason: &EndReason) {
        services.im.session_ended(services, jid).await;
    }
}
