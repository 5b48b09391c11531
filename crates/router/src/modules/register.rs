//! In-band registration (XEP-0077) for an authenticated account; registration of new
//! accounts happens on the edge before authentication.
//!
//! - `get` (§3.1, "already registered" case): `<registered/>` and the username; the
//!   password is never stored, so never returned.
//! - `set` with `<username/>` and `<password/>` (§3.3): a password change. New SCRAM
//!   credentials for every hash are derived on a blocking thread, each with a fresh salt;
//!   an empty or SASLprep-refused password changes nothing (`not-acceptable`).
//! - `set` with `<remove/>` (§3.2): the account and all of its data are deleted, the
//!   result is sent, and then every session of the account is closed with the stream
//!   error `<not-authorized/>`.
//!
//! Data forms (§5 extensibility) are not offered: a `set` without the plain fields is a
//! `bad-request`. Only the sender's own account on its own domain can be changed.

use async_trait::async_trait;
use bytes::Bytes;
use starling_sasl::{HashAlgo, ScramCredentials, derive_credentials, new_salt};
use starling_store::{BareUser, StoreError};
use starling_xml::writer::XmlWriter;
use starling_xmpp::{StanzaError, StanzaErrorCondition, StreamErrorCondition, ns};

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request};
use crate::stanza::IqType;

/// The XEP-0077 module (post-authentication part).
#[derive(Debug, Clone, Copy, Default)]
pub struct Register;

fn error(condition: StanzaErrorCondition, text: &str) -> IqResult {
    IqResult::Error(StanzaError::new(condition).with_text(text))
}

fn store_error(e: &StoreError) -> IqResult {
    match e {
        StoreError::NotFound => error(
            StanzaErrorCondition::RegistrationRequired,
            "the account does not exist",
        ),
        StoreError::InvalidInput(_) => error(
            StanzaErrorCondition::BadRequest,
            "the request cannot be stored",
        ),
        _ => {
            tracing::warn!(error = %e, "store failed during in-band registration");
            IqResult::Error(StanzaError::new(StanzaErrorCondition::InternalServerError))
        }
    }
}

#[async_trait]
impl Module for Register {
    fn name(&self) -> &'static str {
        "register"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::REGISTER]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        super::is_server_level(target) && ns == ns::REGISTER
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if iq.name != "query" {
            return bad_request("the registration payload is <query/>");
        }
        let localpart = match ctx.from.node() {
            Some(node) if ctx.from.domain().as_str() == ctx.domain => node.as_str(),
            _ => {
                return error(
                    StanzaErrorCondition::NotAllowed,
                    "only the sender's own account can be managed in-band",
                );
            }
        };
        let payload = match iq.payload() {
            Ok(p) => p,
            Err(e) => return bad_request(&e.to_string()),
        };
        let user = BareUser::new(ctx.domain, localpart);
        match iq.kind {
            IqType::Get => {
                let mut out = Vec::with_capacity(96);
                XmlWriter::new(&mut out)
                    .start("query")
                    .attr("xmlns", ns::REGISTER)
                    .start("registered")
                    .empty()
                    .text_element("username", localpart)
                    .end("query");
                IqResult::Result(Some(Bytes::from(out)))
            }
            _ if payload.child("remove").is_some() => {
                if payload.children.len() != 1 {
                    return bad_request("<remove/> must be the only child of <query/>");
                }
                match ctx.services.store.delete(&user).await {
                    Ok(()) => {
                        tracing::info!(account = %user, "account removed in-band");
                        IqResult::ResultThenClose {
                            payload: None,
                            account: ctx.from.to_bare(),
                            condition: StreamErrorCondition::NotAuthorized,
                        }
                    }
                    Err(e) => store_error(&e),
                }
            }
            _ => {
                let (Some(username), Some(password)) =
                    (payload.child("username"), payload.child("password"))
                else {
                    return bad_request("a password change needs <username/> and <password/>");
                };
                if !same_localpart(&username.text, ctx.domain, localpart) {
                    return bad_request("<username/> is not the sender's account");
                }
                let password = password.text.clone();
                let iterations = ctx.services.settings.scram_iterations;
                let derived =
                    tokio::task::spawn_blocking(move || derive_all(&password, iterations)).await;
                let credentials = match derived {
                    Ok(Ok(c)) => c,
                    Ok(Err(starling_sasl::CredentialsError::InvalidPassword)) => {
                        return error(
                            StanzaErrorCondition::NotAcceptable,
                            "the password is empty or not allowed",
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "deriving credentials failed");
                        return IqResult::Error(StanzaError::new(
                            StanzaErrorCondition::InternalServerError,
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "credential derivation task failed");
                        return IqResult::Error(StanzaError::new(
                            StanzaErrorCondition::InternalServerError,
                        ));
                    }
                };
                match ctx.services.store.set_credentials(&user, credentials).await {
                    Ok(()) => {
                        tracing::info!(account = %user, "password changed in-band");
                        IqResult::Result(None)
                    }
                    Err(e) => store_error(&e),
                }
            }
        }
    }
}

/// Whether `username` names `localpart` once normalised as a JID localpart would be.
fn same_localpart(username: &str, domain: &str, localpart: &str) -> bool {
    if username.is_empty() || username.contains(['@', '/']) {
        return false;
    }
    let mut candidate = String::with_capacity(username.len() + 1 + domain.len());
    candidate.push_str(username);
    candidate.push('@');
    candidate.push_str(domain);
    match starling_xmpp::jid::parse_bare(&candidate) {
        Ok(jid) => jid.node().map(|n| n.as_str()) == Some(localpart),
        Err(_) => false,
    }
}

/// SCRAM credentials for every hash, each with its own salt. Runs PBKDF2 three times.
fn derive_all(
    password: &str,
    iterations: u32,
) -> Result<Vec<ScramCredentials>, starling_sasl::CredentialsError> {
    HashAlgo::ALL
        .iter()
        .map(|&hash| derive_credentials(hash, password, &new_salt()?, iterations))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_is_compared_normalised() {
        assert!(same_localpart("juliet", "example.org", "juliet"));
        assert!(same_localpart("Juliet", "example.org", "juliet"));
        assert!(!same_localpart("romeo", "example.org", "juliet"));
        assert!(!same_localpart(
            "juliet@example.org",
            "example.org",
            "juliet"
        ));
        assert!(!same_localpart("", "example.org", "juliet"));
    }
}
