//! Cross-crate tests and tools: the interop value set shared by the Rust, Node and Chromium
//! interop tests (`Sample`), used by the `interop_peer` binary.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// A nested struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inner {
    /// A flag.
    pub ok: bool,
    /// Present for even `i`.
    pub note: Option<String>,
}

/// Every serde enum shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Kind {
    /// Unit variant (a string in CBOR).
    Unit,
    /// Newtype variant (`{"New": n}`).
    New(u8),
    /// Struct variant (`{"Struct": {"x": n}}`).
    Struct {
        /// A small negative number.
        x: i8,
    },
}

/// The interop value: structs and maps, byte strings, big and negative integers, floats,
/// enums, tuples, options. `expected(i)` is mirrored by `sample(i)` in
/// `client-wasm/test/shared/sample.js`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Index.
    pub i: u32,
    /// Text.
    pub name: String,
    /// A float (never whole).
    pub temp: f64,
    /// A negative integer.
    pub neg: i64,
    /// Beyond 64 bits: a CBOR bignum (JS `bigint`).
    pub big: u128,
    /// Beyond 2^53: a CBOR integer that JS reads as `bigint`.
    pub small_big: u64,
    /// Below -2^64: a negative bignum.
    pub neg_big: i128,
    /// A byte string (JS `Uint8Array`).
    pub raw: ByteBuf,
    /// An array.
    pub list: Vec<u16>,
    /// A map with text keys (JS object).
    pub tags: BTreeMap<String, i32>,
    /// A map with integer keys (JS `Map`).
    pub by_id: BTreeMap<u32, String>,
    /// A nested struct.
    pub nested: Inner,
    /// An enum.
    pub kind: Kind,
    /// A tuple (CBOR array).
    pub tuple: (u8, String),
    /// Always `None` (CBOR null).
    pub nothing: Option<u8>,
    /// Compressible text, so zstd really runs.
    pub blob: String,
}

impl Sample {
    /// The `i`-th value.
    pub fn expected(i: u32) -> Sample {
        let even = i % 2 == 0;
        Sample {
            i,
            name: format!("sample {i}"),
            temp: 21.5 + f64::from(i),
            neg: -1000 - i64::from(i),
            big: (1u128 << 100) + u128::from(i),
            small_big: (1u64 << 60) + u64::from(i),
            neg_big: -(1i128 << 70) - i128::from(i),
            raw: ByteBuf::from(vec![0, 1, 2, 255, i as u8]),
            list: vec![1, 2, 3, i as u16],
            tags: BTreeMap::from([("a".to_owned(), -1), ("b".to_owned(), i as i32)]),
            by_id: BTreeMap::from([(1, "one".to_owned()), (2, "two".to_owned())]),
            nested: Inner {
                ok: even,
                note: even.then(|| "even".to_owned()),
            },
            kind: match i % 3 {
                0 => Kind::Unit,
                1 => Kind::New(i as u8),
                _ => Kind::Struct { x: -5 },
            },
            tuple: (7, "seven".to_owned()),
            nothing: None,
            blob: "whispeer ".repeat(40),
        }
    }
}

/// The benchmark payload: CBOR-like records, as in `protocol/benches/seal_open.rs`
/// (mirrored in `client-wasm/bench/seal_open.mjs`).
pub fn bench_payload(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    let mut n = 0u32;
    while v.len() < size {
        v.extend_from_slice(b"\xa3\x62id\x1a");
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(b"\x67celsius\xfa");
        v.extend_from_slice(&(21.0f32 + (n % 10) as f32 / 10.0).to_be_bytes());
        v.extend_from_slice(b"\x64room\x67kitchen");
        n += 1;
    }
    v.truncate(size);
    v
}
