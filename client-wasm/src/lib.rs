//! # whispeer for WebAssembly
//!
//! wasm-bindgen bindings over the Rust client core (`whispeer::core`) and
//! `whispeer-protocol`: keys, identities, invites, sealing and opening, frames. The npm
//! package's JS (`client-wasm/js/`) only moves these bytes over a WebSocket and runs the
//! timers; nothing about messages is implemented twice.
//!
//! - [`keys`] — `Identity`, `TreeKey`, `Grant`, `Keyring`, `sealInvite`, `openInvite`.
//! - [`client`] — `ClientCore`: keys, identity, sealing and opening.
//! - [`engine`] — `Engine`: the connection engine (handshake, QoS, acks, replay, backoff).
//! - [`persist`] — the saved state (outbox, dedup window, retained marks, pins) as a log.
//! - [`value`] — JS values ↔ CBOR (serde-compatible; the mapping is in the README).

pub mod client;
pub mod engine;
mod error;
pub mod keys;
pub mod persist;
mod rng;
pub mod value;

use wasm_bindgen::prelude::*;

pub use client::ClientCore;
pub use engine::Engine;
pub use keys::{open_invite, seal_invite, Grant, Identity, Keyring, OpenedInvite, TreeKey};

/// Unix time in milliseconds (the JS clock).
pub(crate) fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() as u64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Encodes a JS value as CBOR (the bytes a Rust `ciborium::from_reader` reads).
#[wasm_bindgen(js_name = encodeValue)]
pub fn encode_value(value: &JsValue) -> Result<Vec<u8>, JsValue> {
    value::encode(value)
}

/// Decodes CBOR bytes to a JS value.
#[wasm_bindgen(js_name = decodeValue)]
pub fn decode_value(bytes: &[u8]) -> Result<JsValue, JsValue> {
    value::decode(bytes)
}

/// A typed topic's checks, in the Rust client's order (`Client::topic`): `tag` must be
/// usable (1 to 128 bytes of printable ASCII without quotes, backslashes or spaces; else
/// `INVALID_OPTION`), `topic` a topic (else `INVALID_TOPIC`). Returns the content type its
/// messages carry, `application/cbor; type="<tag>"` (the bytes of `whispeer::tag`).
#[wasm_bindgen(js_name = typedTopic)]
pub fn typed_topic(topic: &str, tag: &str) -> Result<String, JsValue> {
    whispeer::tag::check_tag(tag).map_err(|e| error::js_error("INVALID_OPTION", &e))?;
    whispeer_protocol::Topic::new(topic).map_err(error::topic_error)?;
    Ok(whispeer::tag::content_type(tag))
}

/// The module's memory (`js/message.js` reads opened messages from it).
#[wasm_bindgen(js_name = wasmMemory)]
pub fn wasm_memory() -> JsValue {
    wasm_bindgen::memory()
}

/// The crate version.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}
