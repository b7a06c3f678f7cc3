//! JS values ↔ CBOR, compatible with what Rust's serde + ciborium write and read.
//!
//! | JS | CBOR | Rust (serde) |
//! | --- | --- | --- |
//! | `null`, `undefined` | null | `()`, `Option::None` |
//! | `boolean` | bool | `bool` |
//! | `number`, a safe integer | integer | `u8`…`u64`, `i8`…`i64` |
//! | `number`, otherwise (or `float(x)`) | float | `f32`, `f64` |
//! | `bigint` | integer, or bignum (tag 2/3) beyond 64 bits | `u64`, `i64`, `u128`, `i128` |
//! | `string` | text | `String`, `char`, unit enum variants |
//! | `Uint8Array`, `ArrayBuffer`, `DataView` | bytes | `serde_bytes::ByteBuf`, `Vec<u8>` (reads bytes) |
//! | `Array` | array | `Vec<T>`, tuples, arrays |
//! | plain object | map with text keys | structs, `HashMap<String, T>` |
//! | `Map` | map with any keys | `HashMap<K, V>`, `BTreeMap<K, V>` |
//! | `Date` | epoch time (tag 1): integer seconds, or float seconds with milliseconds | `ciborium::tag::Required<f64, 1>`, or the number after untagging |
//!
//! Refused with a `TypeError` naming the type (never silently encoded as `{}` or an index
//! map): functions, symbols, `Set`, `WeakMap`, `WeakSet`, `Promise`, `RegExp`, an invalid
//! `Date`, and typed arrays other than `Uint8Array` (convert them to bytes or an `Array`).
//!
//! Decoding: integers in ±(2^53−1) become `number`, larger ones `bigint`; bignums become
//! `bigint`; a map whose keys are all text becomes a plain object, any other map a `Map`;
//! tag 1 (epoch time) becomes a `Date`; other tags are unwrapped.
//!
//! Nesting: arrays, maps (objects, `Map`s) and tags (`Date`, bignums) are levels, at most
//! `MAX_DEPTH` (128) of them around a value, in both directions (the levels ciborium's
//! recursion limit counts): a number in 128 arrays is written and read, a `Date` in 128 is
//! refused (`ENCODE` writing it, `DECODE` reading it). A value of more than [`MAX_ITEMS`]
//! data items, or nested deeper, is refused (`DECODE`) before anything is built: see
//! [`MAX_ITEMS`].

use ciborium::value::{Integer, Value};
use js_sys::{Array, ArrayBuffer, BigInt, DataView, Date, Map, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use whispeer::cbor_scan;

use crate::error::js_error;

/// Nesting limit for both directions (the protocol's CBOR decoder bounds depth too).
const MAX_DEPTH: usize = 128;
/// The most CBOR data items (array elements, map keys and values, tags, string chunks, the
/// value itself) a value may hold to be decoded; past it `decode` fails with `DECODE`
/// before building anything ([`whispeer::cbor_scan`]).
///
/// A received payload is up to `maxPayload` (16 MiB) whatever it was compressed from (16 MiB
/// of `80` seals to an 878-byte envelope), one item a byte at worst, and an item costs far
/// more than its byte. Measured in Node 20 for 2^20 one-byte items: 65 MiB more wasm memory
/// (the `ciborium::Value` tree, some 64 bytes an item, which wasm never gives back), 8 MiB
/// (integers) to 192 MiB (empty `Uint8Array`s) of JS heap, 0.25 to 1.1 s on the event loop;
/// the whole 16 MiB bomb ran Node out of its 4 GB heap after three minutes. At 2^18: 17 MiB
/// of wasm memory (about the largest payload itself), at most 48 MiB of JS heap, 0.1 to
/// 0.2 s — and a quarter of a million values, far beyond the records apps publish. Refusing
/// the bomb costs 25 ms (the scan). A larger value is still delivered: its bytes are in
/// `payload`, for a streaming CBOR decoder in JS. No option: whoever needs more needs a
/// decoder that does not build the whole tree in wasm, not a larger budget.
pub const MAX_ITEMS: u64 = 1 << 18;
const MAX_SAFE: i128 = 9_007_199_254_740_991;

/// The marker property of `float(x)` wrappers (created by the JS layer).
const FLOAT_MARKER: &str = "__whispeerFloat";

fn type_error(msg: String) -> JsValue {
    js_error("ENCODE", &msg)
}

/// Encodes a JS value as CBOR bytes.
pub fn encode(v: &JsValue) -> Result<Vec<u8>, JsValue> {
    let value = to_value(v, 0)?;
    let mut out = Vec::with_capacity(64);
    ciborium::into_writer(&value, &mut out).map_err(|e| type_error(e.to_string()))?;
    Ok(out)
}

/// Decodes CBOR bytes to a JS value, after checking it is within [`MAX_ITEMS`] and
/// `MAX_DEPTH`.
pub fn decode(bytes: &[u8]) -> Result<JsValue, JsValue> {
    // The depth rule of `to_value` (what this package writes): arrays, maps and tags at
    // depths 0 to 127, and what they hold at depth 128 at most — a number in 128 arrays, a
    // Date (a tag) in 127. The scan counts every item, leaves too (the top one at depth 0):
    // it passes leaves at depth 128 and refuses anything at 129; ciborium's recursion limit
    // (arrays, maps and tags only) refuses a 129th container or tag, which the scan let by
    // when it is empty or holds no more than a leaf: refused alike, with the scan's words.
    let budget = cbor_scan::Budget {
        max_items: MAX_ITEMS,
        max_depth: MAX_DEPTH as u32,
    };
    let too_deep = |e: cbor_scan::ScanError| {
        js_error("DECODE", &format!("CBOR value too large to decode: {e}"))
    };
    cbor_scan::scan(bytes, budget).map_err(|e| match e {
        cbor_scan::ScanError::Malformed(_) => js_error("DECODE", &format!("invalid CBOR: {e}")),
        _ => too_deep(e),
    })?;
    let value: Value =
        ciborium::de::from_reader_with_recursion_limit(bytes, MAX_DEPTH).map_err(|e| match e {
            ciborium::de::Error::RecursionLimitExceeded => {
                too_deep(cbor_scan::ScanError::TooDeep(MAX_DEPTH as u32))
            }
            e => js_error("DECODE", &format!("invalid CBOR: {e}")),
        })?;
    from_value(&value)
}

fn bigint_to_value(b: &BigInt) -> Result<Value, JsValue> {
    let hex: String = b
        .to_string(16)
        .map_err(|_| type_error("bigint".into()))?
        .into();
    // toString(16) of a negative bigint has a leading '-'.
    let negative = hex.starts_with('-');
    let digits = hex.trim_start_matches('-');
    if digits.len() <= 32 {
        let mag = u128::from_str_radix(digits, 16).map_err(|e| type_error(e.to_string()))?;
        let n = i128::try_from(mag)
            .ok()
            .map(|m| if negative { -m } else { m });
        if let Some(i) = n.and_then(|n| Integer::try_from(n).ok()) {
            return Ok(Value::Integer(i));
        }
    }
    // A bignum: tag 2 carries n, tag 3 carries -1 - n, as big-endian bytes.
    if negative {
        let m = &BigInt::from(-1i32) - b;
        let hex: String = m
            .to_string(16)
            .map_err(|_| type_error("bigint".into()))?
            .into();
        Ok(Value::Tag(3, Box::new(Value::Bytes(hex_bytes(&hex)?))))
    } else {
        Ok(Value::Tag(2, Box::new(Value::Bytes(hex_bytes(digits)?))))
    }
}

fn hex_bytes(digits: &str) -> Result<Vec<u8>, JsValue> {
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_owned()
    };
    hex::decode(padded).map_err(|e| type_error(e.to_string()))
}

fn to_value(v: &JsValue, depth: usize) -> Result<Value, JsValue> {
    if depth > MAX_DEPTH {
        return Err(type_error(format!("value nested deeper than {MAX_DEPTH}")));
    }
    if v.is_null() || v.is_undefined() {
        return Ok(Value::Null);
    }
    if let Some(b) = v.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = v.as_f64() {
        if n.fract() == 0.0 && n.abs() <= MAX_SAFE as f64 && !(n == 0.0 && n.is_sign_negative()) {
            return Ok(Value::Integer(Integer::from(n as i64)));
        }
        return Ok(Value::Float(n));
    }
    if let Some(s) = v.as_string() {
        return Ok(Value::Text(s));
    }
    // Arrays, objects, Maps and tags (a Date, a bignum) are levels, as the decoder counts
    // them: none at depth `MAX_DEPTH`, where only what such a level holds may be.
    let level_too_deep = || type_error(format!("value nested deeper than {MAX_DEPTH}"));
    if v.is_bigint() {
        let value = bigint_to_value(v.unchecked_ref::<BigInt>())?;
        if depth >= MAX_DEPTH && matches!(value, Value::Tag(..)) {
            return Err(level_too_deep());
        }
        return Ok(value);
    }
    if let Some(u) = v.dyn_ref::<Uint8Array>() {
        return Ok(Value::Bytes(u.to_vec()));
    }
    if let Some(b) = v.dyn_ref::<ArrayBuffer>() {
        return Ok(Value::Bytes(Uint8Array::new(b).to_vec()));
    }
    if let Some(d) = v.dyn_ref::<DataView>() {
        let u = Uint8Array::new_with_byte_offset_and_length(
            &d.buffer(),
            d.byte_offset() as u32,
            d.byte_length() as u32,
        );
        return Ok(Value::Bytes(u.to_vec()));
    }
    if let Some(d) = v.dyn_ref::<Date>() {
        if depth >= MAX_DEPTH {
            return Err(level_too_deep());
        }
        let ms = d.get_time();
        if !ms.is_finite() {
            return Err(type_error("cannot encode an invalid Date as CBOR".into()));
        }
        let secs = if ms % 1000.0 == 0.0 && (ms / 1000.0).abs() <= MAX_SAFE as f64 {
            Value::Integer(Integer::from((ms / 1000.0) as i64))
        } else {
            Value::Float(ms / 1000.0)
        };
        return Ok(Value::Tag(1, Box::new(secs)));
    }
    if ArrayBuffer::is_view(v) {
        // Uint8Array and DataView were taken above: any other view would be encoded as
        // an index map, which no reader expects.
        return Err(type_error(format!(
            "cannot encode a {} as CBOR: convert it to a Uint8Array (bytes) or an Array",
            constructor_name(v)
        )));
    }
    if v.is_instance_of::<js_sys::Set>()
        || v.is_instance_of::<js_sys::WeakMap>()
        || v.is_instance_of::<js_sys::WeakSet>()
        || v.is_instance_of::<js_sys::Promise>()
        || v.is_instance_of::<js_sys::RegExp>()
    {
        let hint = if v.is_instance_of::<js_sys::Set>() {
            ": use an Array"
        } else {
            ""
        };
        return Err(type_error(format!(
            "cannot encode a {} as CBOR{hint}",
            constructor_name(v)
        )));
    }
    if Array::is_array(v) {
        if depth >= MAX_DEPTH {
            return Err(level_too_deep());
        }
        let a: &Array = v.unchecked_ref();
        let mut out = Vec::with_capacity(a.length() as usize);
        for item in a.iter() {
            out.push(to_value(&item, depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    if let Some(m) = v.dyn_ref::<Map>() {
        if depth >= MAX_DEPTH {
            return Err(level_too_deep());
        }
        let mut out = Vec::with_capacity(m.size() as usize);
        let mut err = None;
        m.for_each(&mut |value, key| {
            if err.is_some() {
                return;
            }
            match (to_value(&key, depth + 1), to_value(&value, depth + 1)) {
                (Ok(k), Ok(v)) => out.push((k, v)),
                (Err(e), _) | (_, Err(e)) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        return Ok(Value::Map(out));
    }
    if v.is_function() || v.is_symbol() {
        return Err(type_error(format!(
            "cannot encode a {} as CBOR",
            v.js_typeof().as_string().unwrap_or_default()
        )));
    }
    if v.is_object() {
        let o: &Object = v.unchecked_ref();
        // `float(x)` from the JS layer: always a CBOR float, for Rust f32/f64 fields.
        let marker = Reflect::get(o, &JsValue::from_str(FLOAT_MARKER)).unwrap_or_default();
        if let Some(f) = marker.as_f64() {
            return Ok(Value::Float(f));
        }
        if depth >= MAX_DEPTH {
            return Err(level_too_deep());
        }
        let mut out = Vec::new();
        for entry in Object::entries(o).iter() {
            let pair: Array = entry.unchecked_into();
            let value = pair.get(1);
            if value.is_undefined() {
                continue; // like JSON: absent field (serde reads a missing Option as None)
            }
            let key = pair.get(0).as_string().unwrap_or_default();
            out.push((Value::Text(key), to_value(&value, depth + 1)?));
        }
        return Ok(Value::Map(out));
    }
    Err(type_error("cannot encode this value as CBOR".into()))
}

/// The name of a value's constructor, for error messages.
fn constructor_name(v: &JsValue) -> String {
    Reflect::get(v, &JsValue::from_str("constructor"))
        .ok()
        .and_then(|c| Reflect::get(&c, &JsValue::from_str("name")).ok())
        .and_then(|n| n.as_string())
        .unwrap_or_else(|| "value of this type".into())
}

fn int_to_js(n: i128) -> JsValue {
    if (-MAX_SAFE..=MAX_SAFE).contains(&n) {
        JsValue::from_f64(n as f64)
    } else {
        JsValue::from(BigInt::from(n))
    }
}

fn bignum_to_js(bytes: &[u8], negative: bool) -> Result<JsValue, JsValue> {
    let mut hex = String::with_capacity(2 + bytes.len() * 2);
    hex.push_str("0x0");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    let n = BigInt::new(&JsValue::from_str(&hex))?;
    if negative {
        let minus_one = BigInt::from(-1i32);
        Ok(JsValue::from(&minus_one - &n))
    } else {
        Ok(JsValue::from(n))
    }
}

fn from_value(v: &Value) -> Result<JsValue, JsValue> {
    Ok(match v {
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_bool(*b),
        Value::Integer(i) => int_to_js(i128::from(*i)),
        Value::Float(f) => JsValue::from_f64(*f),
        Value::Text(s) => JsValue::from_str(s),
        Value::Bytes(b) => Uint8Array::from(&b[..]).into(),
        Value::Array(items) => {
            let a = Array::new_with_length(items.len() as u32);
            for (i, item) in items.iter().enumerate() {
                a.set(i as u32, from_value(item)?);
            }
            a.into()
        }
        Value::Map(entries) => {
            if entries.iter().all(|(k, _)| matches!(k, Value::Text(_))) {
                // Object.fromEntries defines own data properties (a "__proto__" key stays a
                // plain key and cannot change the prototype).
                let pairs = Array::new_with_length(entries.len() as u32);
                for (i, (k, val)) in entries.iter().enumerate() {
                    pairs.set(
                        i as u32,
                        Array::of2(&from_value(k)?, &from_value(val)?).into(),
                    );
                }
                Object::from_entries(&pairs)?.into()
            } else {
                let m = Map::new();
                for (k, val) in entries {
                    m.set(&from_value(k)?, &from_value(val)?);
                }
                m.into()
            }
        }
        Value::Tag(2, inner) | Value::Tag(3, inner) if matches!(**inner, Value::Bytes(_)) => {
            let Value::Bytes(b) = &**inner else {
                unreachable!()
            };
            bignum_to_js(b, matches!(v, Value::Tag(3, _)))?
        }
        Value::Tag(1, inner) if matches!(**inner, Value::Integer(_) | Value::Float(_)) => {
            let secs = match &**inner {
                Value::Integer(i) => i128::from(*i) as f64,
                Value::Float(f) => *f,
                _ => unreachable!(),
            };
            Date::new(&JsValue::from_f64(secs * 1000.0)).into()
        }
        Value::Tag(_, inner) => from_value(inner)?,
        _ => JsValue::UNDEFINED,
    })
}
