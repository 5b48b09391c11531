//! Entity Capabilities (XEP-0115) for the server: the module that says so. §7: an entity
//! that supports the protocol advertises `http://jabber.org/protocol/caps` in disco#info.
//! The verification string itself is computed by [`crate::caps`] from the features of all
//! registered modules (this one included), the disco module answers its `node#ver`, and the
//! edge advertises it as the `<c/>` stream feature (§6.3).

use async_trait::async_trait;
use starling_xmpp::ns;

use super::Module;

/// The XEP-0115 module (no IQ of its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct EntityCaps;

const FEATURES: &[&str] = &[ns::CAPS];

#[async_trait]
impl Module for EntityCaps {
    fn name(&self) -> &'static str {
        "caps"
    }

    fn features(&self) -> &[&'static str] {
        FEATURES
    }
}
