//! Message Delivery Receipts (XEP-0184): nothing for the server to do but pass `<request/>`
//! and `<received/>` through untouched, which routing does for every payload. The module
//! exists so disco lists the feature, as stream management's QoS story relies on it
//! (receipts confirm delivery end to end, XEP-0198 hop by hop).

use async_trait::async_trait;
use starling_xmpp::ns;

use super::Module;

/// The XEP-0184 module: a disco feature, no IQ handling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Receipts;

#[async_trait]
impl Module for Receipts {
    fn name(&self) -> &'static str {
        "receipts"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::RECEIPTS]
    }
}
