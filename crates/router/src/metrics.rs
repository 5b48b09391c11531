//! The router's metrics. Names start with `starling_router_`:
//!
//! - `starling_router_stanzas_total{kind, outcome}`: one increment per stanza the router
//!   took from a queue; `kind` is `message`, `presence`, `iq` or `other` (`session` for
//!   session events dropped at shutdown), `outcome` is
//!   `delivered` (handed to an edge), `handled` (answered by a server module),
//!   `error:<condition>` (an error went back to the sender) or `dropped` (ignored as the
//!   RFCs ask, or lost to a link failure; the trace says which).
//! - `starling_router_queue_depth{worker}`: messages waiting in each worker's queue.
//! - `starling_router_iq_handler_seconds{module}`: time spent in a module's IQ handler.
//! - `starling_router_session_events_total{event}`: session events: `started`, `ended` (from
//!   the edge), `removed` (a session the registry removed with its node, e.g. after the
//!   edge's lease expired), `removals_missed` (bulk removals lost because the router fell
//!   behind the registry's buffer; their contacts get no `unavailable`).
//! - `starling_router_im_events_total{event}`: RFC 6121 work: `broadcast` (a presence
//!   broadcast), `probe_answered`, `probe_answered_unavailable` (a probe of a contact with no
//!   available resource answered with its last unavailable presence, RFC 6121 §4.3.2),
//!   `subscription` (a roster item's subscription changed),
//!   `roster_push` (per resource), `offline_stored`, `offline_delivered`,
//!   `carbon` (per copy, XEP-0280), `offline_refused` (quota or store failure), `roster_full` (a subscription stanza
//!   would have added an item to a full roster; it is dropped), `untracked_session` (the session cache
//!   was full), `directed_not_remembered` (a session's directed-presence list was full).

use starling_xmpp::StanzaErrorCondition;

/// The counter of routed stanzas.
pub const STANZAS_TOTAL: &str = "starling_router_stanzas_total";
/// The gauge of queued messages per worker.
pub const QUEUE_DEPTH: &str = "starling_router_queue_depth";
/// The histogram of IQ handler latency per module.
pub const IQ_HANDLER_SECONDS: &str = "starling_router_iq_handler_seconds";
/// The counter of session events.
pub const SESSION_EVENTS_TOTAL: &str = "starling_router_session_events_total";

/// The counter of RFC 6121 events (see the module doc).
pub const IM_EVENTS_TOTAL: &str = "starling_router_im_events_total";

/// What became of one stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handed to the edge(s) of its recipient(s).
    Delivered,
    /// Answered by a server module.
    Handled,
    /// Bounced to the sender with this condition.
    Error(StanzaErrorCondition),
    /// Not delivered and not answered; the reason is for the trace.
    Dropped(&'static str),
}

/// The stanza kinds whose outcome counters [`StanzaCounters`] holds.
const KINDS: [&str; 4] = ["message", "presence", "iq", "other"];

/// The `starling_router_stanzas_total` series of every kind with outcome `delivered`,
/// `handled` and `dropped`, registered once per router, so routing a stanza increments a
/// handle instead of looking the series up in the recorder (errors, rare, still look up).
pub(crate) struct StanzaCounters {
    table: [[metrics::Counter; 3]; KINDS.len()],
}

impl std::fmt::Debug for StanzaCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StanzaCounters").finish_non_exhaustive()
    }
}

impl StanzaCounters {
    /// Registers the series with the installed recorder.
    pub(crate) fn register() -> StanzaCounters {
        StanzaCounters {
            table: KINDS.map(|kind| {
                ["delivered", "handled", "dropped"].map(|outcome| {
                    metrics::counter!(STANZAS_TOTAL, "kind" => kind, "outcome" => outcome)
                })
            }),
        }
    }
}

impl Outcome {
    /// Counts the outcome of a stanza of `kind` through the handles of `counters`.
    pub(crate) fn record_in(&self, kind: &'static str, counters: &StanzaCounters) {
        let column = match self {
            Outcome::Delivered => 0,
            Outcome::Handled => 1,
            Outcome::Dropped(_) => 2,
            Outcome::Error(_) => return self.record(kind),
        };
        match KINDS.iter().position(|k| *k == kind) {
            Some(row) => counters.table[row][column].increment(1),
            None => self.record(kind),
        }
    }

    /// Counts the outcome of a stanza of `kind`.
    pub(crate) fn record(&self, kind: &'static str) {
        match self {
            Outcome::Delivered => {
                metrics::counter!(STANZAS_TOTAL, "kind" => kind, "outcome" => "delivered")
                    .increment(1)
            }
            Outcome::Handled => {
                metrics::counter!(STANZAS_TOTAL, "kind" => kind, "outcome" => "handled")
                    .increment(1)
            }
            Outcome::Dropped(_) => {
                metrics::counter!(STANZAS_TOTAL, "kind" => kind, "outcome" => "dropped")
                    .increment(1)
            }
            // Errors are off the hot path, so the label may be built here.
            Outcome::Error(condition) => metrics::counter!(
                STANZAS_TOTAL,
                "kind" => kind,
                "outcome" => format!("error:{}", condition.as_str())
            )
            .increment(1),
        }
    }
}
