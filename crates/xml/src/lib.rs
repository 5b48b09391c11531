//! The XML layer of Starling: stream framing and writing, with no I/O.
//!
//! placeholder: framing lands next.

pub mod escape;
