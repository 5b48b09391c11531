//! Shared inputs for Starling's benchmarks.
//!
//! The criterion benches live in `benches/benches/`; this library holds what they share, such
//! as the realistic stanza mix the framing bench parses. Nothing here runs on the server.

pub mod corpus;
