//! whispeer client SDK — not built yet (see issue 4). The protocol crate it will drive is
//! re-exported so applications can already seal and open envelopes.
#![forbid(unsafe_code)]
pub use whispeer_protocol as protocol;
