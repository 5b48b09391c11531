//! The routing table: where one stanza goes, for one node (RFC 6120 §10, RFC 6121 §8).
//!
//! | `to`                          | message                               | presence          | iq get/set                       |
//! |-------------------------------|---------------------------------------|-------------------|----------------------------------|
//! | absent (§10.3)                | as to the sender's bare JID           | broadcast (im)    | server modules for the account   |
//! | served domain (§10.4)         | chat/normal: `service-unavailable`    | dropped           | server modules                   |
//! | other domain (§10.4.3)        | `remote-server-not-found`             | same              | same                             |
//! | bare JID (RFC 6121 §8.5.2)    | see [`crate::select`]; none: offline  | im (§3, §4.6)     | modules for accounts, else `service-unavailable` |
//! | full JID, bound (§8.5.3.1)    | delivered                             | im (§3, §4.6)     | delivered                        |
//! | full JID, unbound (§8.5.3.2)  | chat/normal: as to the bare JID       | dropped           | `service-unavailable`            |
//!
//! A message to an account that does not exist, or with no resource to take it, gets
//! `service-unavailable` (§8.5.1, §8.5.2.2: one answer, so presence is not leaked). IQ
//! results and errors are never answered, and no error is ever answered with an error
//! (RFC 6120 §8.3.1). An `Undeliverable` from an edge takes the unbound-full-JID row,
//! leaving out the session that vanished.
//!
//! Sessions are found only through the [`SessionRegistry`] and reached only through
//! [`Edges`], so this code does not care whether a session is in this process.
//!
//! Presence to accounts (broadcast, directed, subscriptions: RFC 6121 §3, §4) and offline
//! storage ([`Core::no_available_resource`], XEP-0160) are done by `crate::im`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use starling_cluster::{EdgeLink, EndReason, ToEdge, ToRouter};
use starling_registry::SessionRecord;
use starling_store::BareUser;
use starling_xml::Element;
use starling_xmpp::jid::{self, BareJid, FullJid, Jid};
use starling_xmpp::{StanzaError, StanzaErrorCondition, StreamErrorCondition};
use tracing::Instrument;

use crate::caps::Caps;
use crate::metrics::{
    IQ_HANDLER_SECONDS, Outcome, SESSION_EVENTS_TOTAL, STANZAS_TOTAL, StanzaCounters,
};
use crate::modules::{IqContext, IqRequest, IqResult, IqTarget, ModuleSet, Services};
use crate::router::Job;
use crate::select::message_recipients;
use crate::stanza::{self, IqType, MessageType, StanzaKind};

/// Where a stanza's `to` points.
#[derive(Debug)]
enum Dest {
    /// No `to` (RFC 6120 §10.3).
    NoTo,
    /// A served domain, with or without a resource.
    Server(Jid),
    /// A domain this server does not serve.
    Remote(Jid),
    /// `localpart@served-domain`.
    Bare(BareJid),
    /// `localpart@served-domain/resource`.
    Full(FullJid),
}

/// The router's shared state: services, modules, served domains.
pub(crate) struct Core {
    services: Services,
    modules: ModuleSet,
    /// The server's entity capabilities (XEP-0115), from what disco#info answers.
    caps: Caps,
    /// The served domains, normalised.
    domains: HashSet<String>,
    /// The per-stanza outcome counters, registered once.
    counters: StanzaCounters,
}

impl Core {
    pub(crate) fn new(services: Services, modules: ModuleSet, domains: HashSet<String>) -> Self {
        let identities = crate::modules::identities(&services.settings);
        let caps = Caps::new(&identities, modules.features(), &[]);
        Core {
            services,
            modules,
            caps,
            domains,
            counters: StanzaCounters::register(),
        }
    }

    pub(crate) fn modules(&self) -> &ModuleSet {
        &self.modules
    }

    pub(crate) fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Processes one job of a worker.
    pub(crate) async fn handle(&self, job: Job) {
        match job {
            Job::Link(msg) => self.handle_link(msg).await,
            Job::Removed(record) => self.session_removed(record).await,
        }
    }

    /// A session the registry removed with its node (RFC 6121 §4.5.2: unavailable whatever
    /// the reason), unless the client has bound the same resource again since: then the
    /// cached state of that JID is the new session's, and an `unavailable` for the old one
    /// is sent only while the new one has sent no presence of its own.
    async fn session_removed(&self, record: SessionRecord) {
        metrics::counter!(SESSION_EVENTS_TOTAL, "event" => "removed").increment(1);
        tracing::debug!(jid = %record.jid, node = %record.node, "session removed with its node");
        if let Ok(Some(current)) = self.services.registry.session(&record.jid).await
            && current.stream_id != record.stream_id
        {
            if !current.is_available() {
                self.services
                    .im
                    .unavailable_of_gone(&self.services, &record.jid)
                    .await;
            }
            return;
        }
        let reason = EndReason::ConnectionLost;
        for module in self.modules.iter() {
            module
                .session_ended(&self.services, &record.jid, &reason)
                .await;
        }
    }

    /// Processes one message from an edge.
    async fn handle_link(&self, msg: ToRouter) {
        match msg {
            ToRouter::Stanza { from, stanza } => self.stanza(from, stanza).await,
            ToRouter::Undeliverable { recipient, stanza } => {
                self.undeliverable(recipient, stanza).await
            }
            ToRouter::SessionStarted { jid } => {
                metrics::counter!(SESSION_EVENTS_TOTAL, "event" => "started").increment(1);
                tracing::debug!(jid = %jid, "session started");
                for module in self.modules.iter() {
                    module.session_started(&self.services, &jid).await;
                }
            }
            ToRouter::SessionEnded { jid, reason } => {
                metrics::counter!(SESSION_EVENTS_TOTAL, "event" => "ended").increment(1);
                tracing::debug!(jid = %jid, ?reason, "session ended");
                for module in self.modules.iter() {
                    module.session_ended(&self.services, &jid, &reason).await;
                }
            }
        }
    }

    /// Counts a job that was never handled (dropped at shutdown).
    pub(crate) fn record_unhandled(job: &Job) {
        let kind = match job {
            Job::Link(ToRouter::Stanza { stanza, .. } | ToRouter::Undeliverable { stanza, .. }) => {
                StanzaKind::of(stanza).map_or("other", StanzaKind::name)
            }
            Job::Link(ToRouter::SessionStarted { .. } | ToRouter::SessionEnded { .. })
            | Job::Removed(_) => "session",
        };
        Outcome::Dropped("shutdown").record(kind);
    }

    async fn stanza(&self, from: FullJid, stanza: Element) {
        let Some(kind) = StanzaKind::of(&stanza) else {
            tracing::debug!(from = %from, name = stanza.name(), "not a stanza; dropped");
            metrics::counter!(STANZAS_TOTAL, "kind" => "other", "outcome" => "dropped")
                .increment(1);
            return;
        };
        let span = tracing::debug_span!(
            "stanza",
            from = %from,
            to = ?stanza.to(),
            kind = kind.name(),
            id = ?stanza.id(),
        );
        let outcome = self
            .route(&from, &stanza, kind)
            .instrument(span.clone())
            .await;
        span.in_scope(|| tracing::debug!(?outcome, "routed"));
        outcome.record_in(kind.name(), &self.counters);
        // XEP-0280 §7: sent carbons of a chat message that left for someone else.
        if kind == StanzaKind::Message(MessageType::Chat)
            && matches!(outcome, Outcome::Delivered | Outcome::Handled)
            && let Some(to) = stanza.to().and_then(|t| jid::parse(&t).ok())
            && !jid::same_bare(&to, &from)
        {
            let owner = from.to_bare();
            self.services
                .im
                .carbons(
                    &self.services,
                    &owner,
                    std::slice::from_ref(&from),
                    &stanza,
                    "sent",
                )
                .await;
        }
    }

    async fn undeliverable(&self, recipient: FullJid, stanza: Element) {
        let Some(kind) = StanzaKind::of(&stanza) else {
            metrics::counter!(STANZAS_TOTAL, "kind" => "other", "outcome" => "dropped")
                .increment(1);
            return;
        };
        let span = tracing::debug_span!(
            "undeliverable",
            recipient = %recipient,
            from = ?stanza.from(),
            kind = kind.name(),
            id = ?stanza.id(),
        );
        let outcome = async {
            let Some(sender) = stanza.from().and_then(|f| jid::parse(&f).ok()) else {
                return Outcome::Dropped("undeliverable stanza without a sender");
            };
            if sender.as_str() == recipient.to_bare().as_str() {
                // Roster and blocklist pushes and carbons come from the account's own bare
                // JID and concern only the session that is gone.
                return Outcome::Dropped("a copy for a session that is gone");
            }
            let reply_from = stanza
                .to()
                .and_then(|t| jid::parse(&t).ok())
                .map_or_else(|| recipient.as_str().to_owned(), |j| j.as_str().to_owned());
            self.fallback_full(&sender, &stanza, kind, &recipient, true, &reply_from)
                .await
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| tracing::debug!(?outcome, "fallback applied"));
        outcome.record_in(kind.name(), &self.counters);
    }

    fn classify(&self, to: Jid) -> Dest {
        if !self.domains.contains(to.domain().as_str()) {
            return Dest::Remote(to);
        }
        if to.node().is_none() {
            return Dest::Server(to);
        }
        match to.try_into_full() {
            Ok(full) => Dest::Full(full),
            Err(bare) => Dest::Bare(bare),
        }
    }

    /// The routing table (see the module doc).
    async fn route(&self, from: &FullJid, stanza: &Element, kind: StanzaKind) -> Outcome {
        let sender: &Jid = from;
        let dest = match stanza.to() {
            None => Dest::NoTo,
            Some(to) => match jid::parse(&to) {
                Ok(to) => self.classify(to),
                Err(e) => {
                    let domain = from.domain().as_str().to_owned();
                    return self
                        .bounce(sender, stanza, kind, &domain, StanzaError::from(e))
                        .await;
                }
            },
        };
        if kind == StanzaKind::Iq(None) {
            let reply_from = match &dest {
                Dest::NoTo => from.to_bare().as_str().to_owned(),
                Dest::Server(j) | Dest::Remote(j) => j.as_str().to_owned(),
                Dest::Bare(j) => j.as_str().to_owned(),
                Dest::Full(j) => j.as_str().to_owned(),
            };
            let error = StanzaError::new(StanzaErrorCondition::BadRequest)
                .with_text("an IQ's type is get, set, result or error");
            return self.bounce(sender, stanza, kind, &reply_from, error).await;
        }
        if let Some(outcome) = self.blocked(from, stanza, kind, &dest).await {
            return outcome;
        }
        match dest {
            Dest::NoTo => {
                let bare = from.to_bare();
                match kind {
                    // RFC 6120 §10.3.1: as if addressed to the sender's bare JID.
                    StanzaKind::Message(t) => {
                        self.message_to_bare(sender, stanza, t, &bare, None, bare.as_str())
                            .await
                    }
                    // RFC 6121 §4.2, §4.4, §4.5: broadcast.
                    StanzaKind::Presence { .. } => {
                        self.services
                            .im
                            .presence(&self.services, from, stanza, None)
                            .await
                    }
                    StanzaKind::Iq(Some(t)) if t.is_request() => {
                        let domain = from.domain().as_str().to_owned();
                        self.server_iq(
                            from,
                            stanza,
                            t,
                            IqTarget::OwnAccount,
                            &domain,
                            bare.as_str(),
                        )
                        .await
                    }
                    StanzaKind::Iq(_) => Outcome::Dropped("IQ response without a recipient"),
                }
            }
            Dest::Server(to) => match kind {
                StanzaKind::Iq(Some(t)) if t.is_request() => {
                    let domain = to.domain().as_str().to_owned();
                    self.server_iq(from, stanza, t, IqTarget::Server, &domain, to.as_str())
                        .await
                }
                StanzaKind::Iq(_) => Outcome::Dropped("IQ response to the server"),
                StanzaKind::Message(MessageType::Chat | MessageType::Normal) => {
                    let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
                    self.bounce(sender, stanza, kind, to.as_str(), error).await
                }
                StanzaKind::Message(_) => Outcome::Dropped("message to the server"),
                // Probes come from the server itself, never from a client (RFC 6121 §4.3).
                StanzaKind::Presence { .. } => Outcome::Dropped("presence to the server"),
            },
            Dest::Remote(to) => {
                // No server-to-server routing yet (RFC 6120 §10.4.3).
                let error = StanzaError::new(StanzaErrorCondition::RemoteServerNotFound);
                self.bounce(sender, stanza, kind, to.as_str(), error).await
            }
            Dest::Bare(to) => match kind {
                StanzaKind::Message(t) => {
                    self.message_to_bare(sender, stanza, t, &to, None, to.as_str())
                        .await
                }
                // Subscriptions (RFC 6121 §3) and directed presence (§4.6).
                StanzaKind::Presence { .. } => {
                    let to = Jid::from(to);
                    self.services
                        .im
                        .presence(&self.services, from, stanza, Some(to))
                        .await
                }
                StanzaKind::Iq(Some(t)) if t.is_request() => {
                    let domain = to.domain().as_str().to_owned();
                    let reply_from = to.as_str().to_owned();
                    self.server_iq(from, stanza, t, IqTarget::Account(to), &domain, &reply_from)
                        .await
                }
                StanzaKind::Iq(_) => Outcome::Dropped("IQ response to a bare JID"),
            },
            // Subscriptions to a full JID are handled as to its bare JID (RFC 6121 §3.1.1),
            // directed presence is remembered (§4.6).
            Dest::Full(to) if matches!(kind, StanzaKind::Presence { .. }) => {
                let to = Jid::from(to);
                self.services
                    .im
                    .presence(&self.services, from, stanza, Some(to))
                    .await
            }
            Dest::Full(to) => match self.services.registry.session(&to).await {
                Ok(Some(record)) => {
                    if self.deliver(&[&record], stanza).await > 0 {
                        if kind == StanzaKind::Message(MessageType::Chat)
                            && !jid::same_bare(from, &to)
                        {
                            // XEP-0280 §6: received carbons to the account's other resources.
                            let owner = to.to_bare();
                            self.services
                                .im
                                .carbons(
                                    &self.services,
                                    &owner,
                                    std::slice::from_ref(&to),
                                    stanza,
                                    "received",
                                )
                                .await;
                        }
                        Outcome::Delivered
                    } else {
                        self.fallback_full(sender, stanza, kind, &to, true, to.as_str())
                            .await
                    }
                }
                Ok(None) => {
                    self.fallback_full(sender, stanza, kind, &to, false, to.as_str())
                        .await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry lookup failed");
                    let error = StanzaError::new(StanzaErrorCondition::InternalServerError);
                    self.bounce(sender, stanza, kind, to.as_str(), error).await
                }
            },
        }
    }

    /// Blocking (XEP-0191 §3.5, §3.6) between the sender and a local account it addresses:
    /// from a blocked entity, messages and IQ requests get `service-unavailable` (as if
    /// the account were not there) and everything else is dropped; to an entity the sender
    /// blocks, messages and IQ requests get `not-acceptable` and presence is dropped.
    async fn blocked(
        &self,
        from: &FullJid,
        stanza: &Element,
        kind: StanzaKind,
        dest: &Dest,
    ) -> Option<Outcome> {
        let target: &Jid = match dest {
            Dest::Bare(b) => b,
            Dest::Full(f) => f,
            _ => return None,
        };
        let sender: &Jid = from;
        let im = &self.services.im;
        let answers = matches!(kind, StanzaKind::Message(_))
            || matches!(kind, StanzaKind::Iq(Some(t)) if t.is_request());
        if im.blocks(&self.services, &target.to_bare(), sender).await {
            if !answers {
                return Some(Outcome::Dropped("from an entity the recipient blocks"));
            }
            let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
            return Some(
                self.bounce(sender, stanza, kind, target.as_str(), error)
                    .await,
            );
        }
        if im.blocks(&self.services, &from.to_bare(), target).await {
            if !answers {
                return Some(Outcome::Dropped("to an entity the sender blocks"));
            }
            let error = StanzaError::new(StanzaErrorCondition::NotAcceptable)
                .with_text("you have blocked this entity (XEP-0191)")
                .with_type(starling_xmpp::StanzaErrorType::Cancel)
                .with_app("blocked", "urn:xmpp:blocking:errors");
            return Some(
                self.bounce(sender, stanza, kind, target.as_str(), error)
                    .await,
            );
        }
        None
    }

    /// A stanza for a full JID that has no session (RFC 6121 §8.5.3.2); `vanished` says the
    /// session was there but could not be reached, so it is left out of any fallback.
    async fn fallback_full(
        &self,
        sender: &Jid,
        stanza: &Element,
        kind: StanzaKind,
        recipient: &FullJid,
        vanished: bool,
        reply_from: &str,
    ) -> Outcome {
        match kind {
            // §8.5.3.2.1: chat and normal go to the bare JID.
            StanzaKind::Message(t @ (MessageType::Chat | MessageType::Normal)) => {
                let exclude = vanished.then_some(recipient);
                let bare = recipient.to_bare();
                self.message_to_bare(sender, stanza, t, &bare, exclude, reply_from)
                    .await
            }
            // §8.5.3.2.1: groupchat and headline may be ignored; error must be.
            StanzaKind::Message(_) => Outcome::Dropped("message for a resource that is gone"),
            // §8.5.3.2.2: presence the router sent to a full JID is directed or a probe
            // answer (subscription stanzas go to bare JIDs), so it is ignored.
            StanzaKind::Presence { .. } => Outcome::Dropped("presence for a resource that is gone"),
            // §8.5.3.2.3 (RFC 6120 §10.5.3.2).
            StanzaKind::Iq(_) => {
                let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
                self.bounce(sender, stanza, kind, reply_from, error).await
            }
        }
    }

    /// A message for an account's bare JID (RFC 6121 §8.5.2).
    async fn message_to_bare(
        &self,
        sender: &Jid,
        stanza: &Element,
        t: MessageType,
        bare: &BareJid,
        exclude: Option<&FullJid>,
        reply_from: &str,
    ) -> Outcome {
        let kind = StanzaKind::Message(t);
        match t {
            MessageType::Error => return Outcome::Dropped("error message for a bare JID"),
            // §8.5.2.1.1 and §8.5.2.2.1: never delivered to a bare JID.
            MessageType::Groupchat => {
                let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
                return self.bounce(sender, stanza, kind, reply_from, error).await;
            }
            MessageType::Chat | MessageType::Normal | MessageType::Headline => {}
        }
        let sessions = match self.services.registry.sessions(bare).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup failed");
                let error = StanzaError::new(StanzaErrorCondition::InternalServerError);
                return self.bounce(sender, stanza, kind, reply_from, error).await;
            }
        };
        let chosen = message_recipients(&sessions, t, exclude);
        if !chosen.is_empty() && self.deliver(&chosen, stanza).await > 0 {
            if t == MessageType::Chat && sender.to_bare() != *bare {
                // XEP-0280 §6: received carbons to the resources that did not get it.
                let got: Vec<FullJid> = chosen.iter().map(|s| s.jid.clone()).collect();
                self.services
                    .im
                    .carbons(&self.services, bare, &got, stanza, "received")
                    .await;
            }
            return Outcome::Delivered;
        }
        self.no_available_resource(sender, stanza, t, bare, reply_from)
            .await
    }

    /// A message for an account with no resource to take it (RFC 6121 §8.5.2.2.1), or for
    /// an account that does not exist (§8.5.1): the same answer, so that presence is not
    /// leaked.
    async fn no_available_resource(
        &self,
        sender: &Jid,
        stanza: &Element,
        t: MessageType,
        bare: &BareJid,
        reply_from: &str,
    ) -> Outcome {
        let kind = StanzaKind::Message(t);
        if t == MessageType::Headline {
            return Outcome::Dropped("headline with no resource to take it");
        }
        let unavailable = || StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
        match self.account_exists(bare).await {
            Ok(true) => {}
            Ok(false) => {
                return self
                    .bounce(sender, stanza, kind, reply_from, unavailable())
                    .await;
            }
            Err(()) => {
                let error = StanzaError::new(StanzaErrorCondition::InternalServerError);
                return self.bounce(sender, stanza, kind, reply_from, error).await;
            }
        }
        // RFC 6121 §8.5.2.2.1, XEP-0160: chat and normal messages are stored within the
        // account's quota; the sender learns only of a refusal.
        match self
            .services
            .im
            .store_offline(&self.services, bare, stanza)
            .await
        {
            Ok(()) => {
                self.services.im.flush_if_online(&self.services, bare).await;
                Outcome::Handled
            }
            Err(error) => self.bounce(sender, stanza, kind, reply_from, error).await,
        }
    }

    /// Whether a local account exists; `Err` when the store could not say.
    async fn account_exists(&self, bare: &BareJid) -> Result<bool, ()> {
        let Some(node) = bare.node() else {
            return Ok(false);
        };
        let user = BareUser::new(bare.domain().as_str(), node.as_str());
        self.services.store.exists(&user).await.map_err(|e| {
            tracing::warn!(error = %e, "store lookup failed");
        })
    }

    /// An IQ request the server answers (RFC 6120 §10.3.3, §10.4, §10.5.3.2) through the
    /// first module that handles its payload's namespace; `service-unavailable` when none
    /// does (§8.3.3.19).
    async fn server_iq(
        &self,
        from: &FullJid,
        stanza: &Element,
        t: IqType,
        target: IqTarget,
        domain: &str,
        reply_from: &str,
    ) -> Outcome {
        let kind = StanzaKind::Iq(Some(t));
        let Some((name, ns)) = stanza.first_child() else {
            let error = StanzaError::new(StanzaErrorCondition::BadRequest)
                .with_text("an IQ request carries exactly one payload");
            return self.bounce(from, stanza, kind, reply_from, error).await;
        };
        let Some(module) = self.modules.for_iq(&target, ns) else {
            let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
            return self.bounce(from, stanza, kind, reply_from, error).await;
        };
        if let IqTarget::Account(bare) = &target {
            // §8.5.1: an account that does not exist answers nothing but this.
            if *bare != from.to_bare() && self.account_exists(bare).await != Ok(true) {
                let error = StanzaError::new(StanzaErrorCondition::ServiceUnavailable);
                return self.bounce(from, stanza, kind, reply_from, error).await;
            }
        }
        let ctx = IqContext {
            services: &self.services,
            features: self.modules.features(),
            caps: &self.caps,
            from,
            target: &target,
            domain,
        };
        let request = IqRequest {
            kind: t,
            stanza,
            name,
            ns,
        };
        let started = Instant::now();
        let result = module.handle_iq(&ctx, &request).await;
        metrics::histogram!(IQ_HANDLER_SECONDS, "module" => module.name())
            .record(started.elapsed().as_secs_f64());
        let (payload, close) = match result {
            IqResult::Error(error) => {
                return self.bounce(from, stanza, kind, reply_from, error).await;
            }
            IqResult::Result(payload) => (payload, None),
            IqResult::ResultThenClose {
                payload,
                account,
                condition,
            } => (payload, Some((account, condition))),
        };
        match stanza::iq_result(
            stanza.id().as_deref(),
            reply_from,
            from.as_str(),
            payload.as_deref(),
        ) {
            Ok(reply) => {
                if !self.send_to_full(from, reply).await {
                    tracing::debug!("the IQ result found no session to go to");
                }
            }
            Err(e) => tracing::error!(error = %e, module = module.name(), "unwritable IQ result"),
        }
        if let Some((account, condition)) = close {
            self.close_sessions(&account, condition).await;
        }
        Outcome::Handled
    }

    /// Sends an error reply for `stanza` to `sender` (RFC 6120 §8.3.1), unless the stanza
    /// must not be answered with one.
    async fn bounce(
        &self,
        sender: &Jid,
        stanza: &Element,
        kind: StanzaKind,
        reply_from: &str,
        error: StanzaError,
    ) -> Outcome {
        if !kind.may_answer_with_error() {
            return Outcome::Dropped("errors and IQ responses are never answered with an error");
        }
        let Ok(to) = sender.try_as_full() else {
            return Outcome::Dropped("the sender is not a session to bounce to");
        };
        let reply = match stanza::error_reply(
            kind.name(),
            stanza.id().as_deref(),
            reply_from,
            to.as_str(),
            &error,
        ) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::error!(error = %e, "unwritable error reply");
                return Outcome::Dropped("error reply could not be written");
            }
        };
        if !self.send_to_full(to, reply).await {
            tracing::debug!("the error reply found no session to go to");
        }
        Outcome::Error(error.condition)
    }

    /// Delivers a server-built stanza to one session; whether it reached its edge.
    async fn send_to_full(&self, to: &FullJid, stanza: Element) -> bool {
        match self.services.registry.session(to).await {
            Ok(Some(record)) => self.deliver(&[&record], &stanza).await > 0,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup failed");
                false
            }
        }
    }

    /// Hands `stanza` to the edges of `sessions`, one message per edge carrying the payload
    /// once; returns how many sessions it reached.
    async fn deliver(&self, sessions: &[&SessionRecord], stanza: &Element) -> usize {
        crate::im::deliver(&self.services, sessions, stanza, false).await
    }

    /// Closes every session of `account` with a stream error (XEP-0077 §3.2).
    async fn close_sessions(&self, account: &BareJid, condition: StreamErrorCondition) {
        let sessions = match self.services.registry.sessions(account).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, account = %account, "cannot list sessions to close");
                return;
            }
        };
        for s in sessions {
            let Some(link): Option<Arc<dyn EdgeLink>> = self.services.edges.get(&s.node) else {
                tracing::warn!(node = %s.node, "no link to the edge holding the session");
                continue;
            };
            let msg = ToEdge::Close {
                jid: s.jid.clone(),
                condition: condition.clone(),
            };
            if let Err(e) = link.send(msg).await {
                tracing::warn!(node = %s.node, error = %e, "edge link refused a close");
            }
        }
    }
}
