//! whispeer for WebAssembly — not built yet (see issue 6).
#![forbid(unsafe_code)]
pub use whispeer_protocol as protocol;
