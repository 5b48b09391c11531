//! Shared code of Starling's benchmarks, and the load generator.
//!
//! The criterion benches live in `benches/benches/`; [`corpus`] holds the realistic stanza mix
//! they parse. [`load`] is the engine of the `starling-load` binary, a standard XMPP client
//! that drives any compliant server. [`procfs`] reads the memory and CPU time of processes
//! from `/proc`, for the generator's reports and the `starling-compare` side-by-side run.
//! Nothing here runs inside the server; the load generator must never send traffic anywhere
//! but the server address it is given.

pub mod compare;
pub mod corpus;
pub mod load;
pub mod procfs;
