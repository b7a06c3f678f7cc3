//! whispeer relay — not built yet (see issue 3).
#![forbid(unsafe_code)]
pub use whispeer_protocol as protocol;
