//! vcard-temp (XEP-0054): a user's own vCard is read and replaced with `get`/`set` without
//! `to` (or to the own bare JID, §3.1, §3.2); another account's vCard is read with a `get`
//! to its bare JID (§3.3). An account without a vCard answers an empty `<vCard/>` (§3.1
//! allows it, and clients treat it as "none"). Only the account itself may `set`
//! (`forbidden`); a vCard larger than the configured limit is `not-acceptable`.

use async_trait::async_trait;
use bytes::Bytes;
use starling_xmpp::{StanzaError, StanzaErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, payload_element};
use crate::im::user_of;
use crate::stanza::IqType;

/// The XEP-0054 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vcard;

const EMPTY: &[u8] = b"<vCard xmlns='vcard-temp'/>";

fn internal(e: impl std::fmt::Display) -> IqResult {
    tracing::warn!(error = %e, "vcard store failed");
    IqResult::Error(StanzaError::new(StanzaErrorCondition::InternalServerError))
}

#[async_trait]
impl Module for Vcard {
    fn name(&self) -> &'static str {
        "vcard"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::VCARD]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        ns == ns::VCARD && matches!(target, IqTarget::OwnAccount | IqTarget::Account(_))
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if iq.name != "vCard" {
            return bad_request("the vcard-temp payload is <vCard/>");
        }
        let own = ctx.from.to_bare();
        let owner = match ctx.target {
            IqTarget::Account(bare) => bare.clone(),
            _ => own.clone(),
        };
        let Some(user) = user_of(&owner) else {
            return bad_request("no account");
        };
        let store = &ctx.services.store;
        match iq.kind {
            IqType::Get => match store.vcard(&user).await {
                Ok(Some(v)) => IqResult::Result(Some(v)),
                Ok(None) => IqResult::Result(Some(Bytes::from_static(EMPTY))),
                Err(e) => internal(e),
            },
            IqType::Set => {
                if owner != own {
                    return IqResult::Error(
                        StanzaError::new(StanzaErrorCondition::Forbidden)
                            .with_text("only the account itself may publish its vCard"),
                    );
                }
                let vcard = match payload_element(iq, ns::JABBER_CLIENT) {
                    Ok(v) => v,
                    Err(e) => return e,
                };
                if vcard.raw().len() > ctx.services.settings.max_vcard_bytes {
                    return IqResult::Error(
                        StanzaError::new(StanzaErrorCondition::NotAcceptable)
                            .with_text("the vCard is too large"),
                    );
                }
                match store.set_vcard(&user, vcard.into_raw()).await {
                    Ok(()) => IqResult::Result(None),
                    Err(e) => internal(e),
                }
            }
            IqType::Result | IqType::Error => bad_request("not a request"),
        }
    }
}
