//! The edge's metrics, named in one place (all through the `metrics` facade; the binary
//! installs the exporter).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `starling_edge_connections` | gauge | `listener` (`starttls`, `direct_tls`) |
//! | `starling_edge_sessions` | gauge | |
//! | `starling_edge_bytes_received_total`, `starling_edge_bytes_sent_total` | counter | |
//! | `starling_edge_stanzas_received_total`, `starling_edge_stanzas_sent_total` | counter | |
//! | `starling_edge_stream_errors_total` | counter | `condition` |
//! | `starling_edge_limit_violations_total` | counter | `kind` |
//! | `starling_auth_total` | counter | `mechanism`, `outcome` |
//! | `starling_edge_registrations_total` | counter | `outcome` |
//! | `starling_edge_binds_total` | counter | `outcome` |
//! | `starling_edge_undeliverable_total` | counter | |
//! | `starling_edge_dropped_on_close_total` | counter | |
//! | `starling_sm_resumptions_total` | counter | `outcome` (`resumed`, `took_over`, `not_found`, `expired`, `too_high`, `error`) |
//! | `starling_sm_unacked_stanzas` | gauge | (XEP-0198 unacked queue depth, all sessions) |
//! | `starling_sm_enabled_total` | counter | `resume` (`true`, `false`) |
//! | `starling_csi_inactive_streams` | gauge | (streams whose client indicated `<inactive/>`, XEP-0352) |
//! | `starling_csi_held_presences` | gauge | (presences held for inactive clients, all sessions) |
//! | `starling_csi_presences_total` | counter | `outcome` (`held`, `superseded`, `written`, `handed_over`, `discarded`) |
//! | `starling_csi_flushes_total` | counter | `reason` (`active`, `contact`, `full`) |
//!
//! TLS handshake failures are counted by the `tls` module
//! (`starling_tls_handshake_failures_total`).

/// A local limit was hit (`kind`: `rate`, `stanza_size`, `connections_per_ip`, `preauth_timeout`,
/// `outbound_queue`, `auth_throttle`, `registration_throttle`, `table_full`, `auth_attempts`,
/// `sm_unacked`, `csi_held`).
pub(crate) fn limit_violation(kind: &'static str) {
    ::metrics::counter!("starling_edge_limit_violations_total", "kind" => kind).increment(1);
}

/// A stream was closed with a stream error we sent.
pub(crate) fn stream_error(condition: &'static str) {
    ::metrics::counter!("starling_edge_stream_errors_total", "condition" => condition).increment(1);
}

/// A SASL exchange ended.
pub(crate) fn auth(mechanism: &'static str, outcome: &'static str) {
    ::metrics::counter!("starling_auth_total", "mechanism" => mechanism, "outcome" => outcome)
        .increment(1);
}

/// An in-band registration attempt ended.
pub(crate) fn registration(outcome: &'static str) {
    ::metrics::counter!("starling_edge_registrations_total", "outcome" => outcome).increment(1);
}

/// A resource bind ended.
pub(crate) fn bind(outcome: &'static str) {
    ::metrics::counter!("starling_edge_binds_total", "outcome" => outcome).increment(1);
}

/// Open connections, per listener kind.
pub(crate) fn connections(listener: &'static str, delta: f64) {
    ::metrics::gauge!("starling_edge_connections", "listener" => listener).increment(delta);
}

/// Bound sessions.
pub(crate) fn sessions(delta: f64) {
    ::metrics::gauge!("starling_edge_sessions").increment(delta);
}

/// The counters touched for every stanza and every read and write, registered once per edge
/// (in its [`crate::machine::StreamConfig`]) so the hot path increments a handle instead of
/// looking the metric up in the recorder's registry each time.
#[derive(Debug, Clone)]
pub(crate) struct Hot {
    /// Bytes read from clients.
    pub(crate) bytes_received: ::metrics::Counter,
    /// Bytes written to clients.
    pub(crate) bytes_sent: ::metrics::Counter,
    /// Stanzas received from bound sessions.
    pub(crate) stanzas_received: ::metrics::Counter,
    /// Stanzas written to bound sessions.
    pub(crate) stanzas_sent: ::metrics::Counter,
}

impl Hot {
    /// Registers the counters with the installed recorder (a no-op recorder when none is).
    pub(crate) fn register() -> Hot {
        Hot {
            bytes_received: ::metrics::counter!("starling_edge_bytes_received_total"),
            bytes_sent: ::metrics::counter!("starling_edge_bytes_sent_total"),
            stanzas_received: ::metrics::counter!("starling_edge_stanzas_received_total"),
            stanzas_sent: ::metrics::counter!("starling_edge_stanzas_sent_total"),
        }
    }
}

/// A delivery found no session here and went back to the router.
pub(crate) fn undeliverable() {
    ::metrics::counter!("starling_edge_undeliverable_total").increment(1);
}

/// Queued stanzas that could not be written before a session closed.
pub(crate) fn dropped_on_close(n: usize) {
    ::metrics::counter!("starling_edge_dropped_on_close_total").increment(n as u64);
}

/// A resumption attempt ended (XEP-0198 §5).
pub(crate) fn sm_resumption(outcome: &'static str) {
    ::metrics::counter!("starling_sm_resumptions_total", "outcome" => outcome).increment(1);
}

/// Stream management was enabled on a session.
pub(crate) fn sm_enabled(resume: bool) {
    let resume = if resume { "true" } else { "false" };
    ::metrics::counter!("starling_sm_enabled_total", "resume" => resume).increment(1);
}

/// Change of the number of unacknowledged stanzas held by all sessions.
pub(crate) fn sm_unacked(delta: f64) {
    ::metrics::gauge!("starling_sm_unacked_stanzas").increment(delta);
}

/// Change of the number of streams whose client is inactive (XEP-0352).
pub(crate) fn csi_inactive_streams(delta: f64) {
    ::metrics::gauge!("starling_csi_inactive_streams").increment(delta);
}

/// Change of the number of presences held for inactive clients.
pub(crate) fn csi_held(delta: f64) {
    ::metrics::gauge!("starling_csi_held_presences").increment(delta);
}

/// Presences that CSI held, replaced by a newer one, wrote, handed to a resumption or
/// dropped with their session.
pub(crate) fn csi_presences(outcome: &'static str, n: u64) {
    ::metrics::counter!("starling_csi_presences_total", "outcome" => outcome).increment(n);
}

/// A flush of held presences: the client became active, a stanza from the same contact
/// passed, or the buffer was full.
pub(crate) fn csi_flush(reason: &'static str) {
    ::metrics::counter!("starling_csi_flushes_total", "reason" => reason).increment(1);
}
