//! Errors thrown to JS: `Error` objects with `name = "WhispeerError"` and a stable `code`.

use wasm_bindgen::prelude::*;
use whispeer::{PublishError, SubscribeError};
use whispeer_protocol::{InviteError, KeyError, TopicError};

/// A JS `Error` with a `code` property (`INVALID_TOPIC`, `NO_KEY`, `KEY`, `ENCODE`,
/// `DECODE`, `SEAL`, `INVITE`, `PROTOCOL`, `BUFFER_FULL`, `CLOSED`, `NOT_ACKNOWLEDGED`,
/// `INVALID_OPTION`, or a relay error code such as `not_allowed`).
pub fn js_error(code: &str, message: &str) -> JsValue {
    let e = js_sys::Error::new(message);
    e.set_name("WhispeerError");
    let _ = js_sys::Reflect::set(&e, &"code".into(), &code.into());
    e.into()
}

/// The code of a key error.
fn key_code(e: &KeyError) -> &'static str {
    match e {
        KeyError::NoKeyForTopic { .. } => "NO_KEY",
        KeyError::Topic(_) => "INVALID_TOPIC",
        _ => "KEY",
    }
}

pub fn key_error(e: KeyError) -> JsValue {
    let err = js_error(key_code(&e), &e.to_string());
    // A stable name for the refusals callers act on (the message is for people).
    if matches!(e, KeyError::Contradicts { .. }) {
        let _ = js_sys::Reflect::set(&err, &"reason".into(), &"contradicts".into());
    }
    err
}

pub fn topic_error(e: TopicError) -> JsValue {
    js_error("INVALID_TOPIC", &e.to_string())
}

pub fn invite_error(e: InviteError) -> JsValue {
    let code = match &e {
        InviteError::Key(k) => key_code(k),
        _ => "INVITE",
    };
    js_error(code, &e.to_string())
}

pub fn publish_error(e: PublishError) -> JsValue {
    let code = match &e {
        PublishError::Topic(_) => "INVALID_TOPIC",
        PublishError::Key(k) => key_code(k),
        PublishError::Encode(_) => "ENCODE",
        PublishError::BufferFull(_) => "BUFFER_FULL",
        PublishError::Closed => "CLOSED",
        PublishError::NotAcknowledged => "NOT_ACKNOWLEDGED",
        PublishError::Rejected { code, .. } => code.name(),
        _ => "SEAL",
    };
    js_error(code, &e.to_string())
}

pub fn subscribe_error(e: SubscribeError) -> JsValue {
    let code = match &e {
        SubscribeError::Topic(_) => "INVALID_TOPIC",
        SubscribeError::NoKey { .. } => "NO_KEY",
        // `AmbiguousTree`: grants of several trees overlap the filter (as for a publish).
        SubscribeError::Key(k) => key_code(k),
        SubscribeError::Closed => "CLOSED",
        SubscribeError::Rejected { code, .. } => code.name(),
        _ => "SUBSCRIBE",
    };
    js_error(code, &e.to_string())
}
