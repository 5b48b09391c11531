//! The side-by-side comparison behind `benches/compare` (`starling-compare`): Starling,
//! Prosody and ejabberd started in turn from private directories with equivalent
//! configurations ([`servers`]), the foreign ones from Debian's packages ([`packages`]),
//! driven by `starling-load` with the same scenarios, the chat rate found by a ramp
//! ([`ramp`]), and one table of the results with Starling's targets ([`summary`]).
//!
//! It measures; it never asserts a timing. Everything it starts listens on loopback only and
//! is stopped before it returns.

pub mod packages;
pub mod ramp;
pub mod servers;
pub mod summary;
