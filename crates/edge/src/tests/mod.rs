//! Tests that need more than one module: a SCRAM client, and socket tests over 127.0.0.1.

pub(crate) mod scram;
mod socket;
