//! The XML layer of Starling: stream framing and writing, with no I/O.
//!
//! Bytes from a socket go into a [`Framer`]; out come the stream header, each top-level
//! element as its exact raw bytes (`bytes::Bytes`) with a parsed envelope (name, namespace,
//! `to`, `from`, `type`, `id`, `xml:lang`, first child), and the stream close. Nothing here
//! builds a DOM: routing reads the envelope, and writers copy the raw bytes, rewriting only
//! the start tag where addresses must be stamped.
//!
//! This crate must never do I/O, allocate per byte, or accept input RFC 6120 §11 forbids:
//! every refusal maps to the stream error condition the stream must be closed with.
//!
//! On the stanza path it is the first step on the edge (bytes → frames) and the last one
//! (frames → bytes), and the router uses the same envelope to decide where a stanza goes.

mod element;
mod error;
pub mod escape;
mod framer;
pub mod ns;
pub mod writer;

pub use element::Element;
pub use error::{Condition, FrameError};
pub use framer::{Frame, Framer, Limits, StreamHeader};
