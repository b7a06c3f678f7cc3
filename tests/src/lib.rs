//! Cross-crate tests live here once the relay and client exist (issues 3–6).
#![forbid(unsafe_code)]
