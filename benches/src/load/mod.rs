//! The load generator behind `starling-load`: a standard XMPP client engine (RFC 6120
//! streams, STARTTLS and XEP-0368 direct TLS, SASL SCRAM/PLAIN, resource binding, XEP-0077
//! registration, XEP-0199 ping answers), the scenarios, and the report.
//!
//! It speaks only standard protocol, so it measures Prosody, ejabberd or any other compliant
//! server as well as Starling. It never targets anything but the address it is given; the
//! tests and the documentation use loopback only.

pub mod accounts;
pub mod client;
pub mod limits;
pub mod meter;
pub mod sasl;
pub mod scenario;
pub mod stats;
