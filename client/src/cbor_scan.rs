//! A CBOR value bounded before it is decoded.
//!
//! A delivered payload is up to `max_payload` (16 MiB by default) whatever it was compressed
//! from, and a decoder builds one value per data item: `9f 80 80 … ff`, an array of 16.7
//! million empty arrays, is a few KiB compressed and some 64 bytes of `ciborium::Value` per
//! payload byte decoded — more as JS values (review F5, and the npm receiver after it).
//! [`scan`] walks the bytes without allocating, counting data items and nesting and stopping
//! at the first item past a [`Budget`]; only then is the value decoded. The CLI (`whispeer
//! sub` printing JSON) and the npm package (`msg.value`, `decodeValue`) scan with their own
//! budgets.

/// How large a CBOR value may be to be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Most data items: array elements, map keys and values, tags and their content, string
    /// chunks, and the top item itself.
    pub max_items: u64,
    /// Deepest nesting: the top item is at depth 0, what an array, map or tag holds one
    /// deeper.
    pub max_depth: u32,
}

/// What [`scan`] found in a value within its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Data items counted (at least the nodes of the decoded tree).
    pub items: u64,
    /// A bound from above on the JSON text the CLI prints for the value: `to_json`, written
    /// by serde_json, with every character that acts on a terminal escaped as `\uXXXX`.
    /// Non-text map keys are written as their JSON text, escaped, which doubles at each
    /// level: 40 maps nested as keys are a few hundred bytes of CBOR and terabytes of JSON.
    pub json_len: u64,
}

/// Why a value is not decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanError {
    /// Not well-formed CBOR (truncated, a reserved head, a misplaced break…).
    Malformed(&'static str),
    /// More data items than [`Budget::max_items`].
    TooManyItems(u64),
    /// Nested deeper than [`Budget::max_depth`].
    TooDeep(u32),
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Malformed(why) => f.write_str(why),
            ScanError::TooManyItems(n) => write!(f, "more than {n} CBOR data items"),
            ScanError::TooDeep(n) => write!(f, "nested deeper than {n}"),
        }
    }
}

impl std::error::Error for ScanError {}

/// Walks the first CBOR data item of `cbor` (as a decoder reads one value, bytes after it
/// are not looked at) within `budget`, allocating nothing.
pub fn scan(cbor: &[u8], budget: Budget) -> Result<Scanned, ScanError> {
    let mut s = Scan {
        b: cbor,
        pos: 0,
        items: 0,
        budget,
    };
    let json_len = s.item(0)?;
    Ok(Scanned {
        items: s.items,
        json_len,
    })
}

struct Scan<'a> {
    b: &'a [u8],
    pos: usize,
    items: u64,
    budget: Budget,
}

impl Scan<'_> {
    fn byte(&mut self) -> Result<u8, ScanError> {
        let b = *self
            .b
            .get(self.pos)
            .ok_or(ScanError::Malformed("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    /// Major type and argument of the next item (`None`: indefinite length).
    fn head(&mut self) -> Result<(u8, u8, Option<u64>), ScanError> {
        let b = self.byte()?;
        let (major, info) = (b >> 5, b & 0x1f);
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let n = 1usize << (info - 24);
                let mut v = 0u64;
                for _ in 0..n {
                    v = v << 8 | u64::from(self.byte()?);
                }
                Some(v)
            }
            31 => None,
            _ => return Err(ScanError::Malformed("reserved additional information")),
        };
        Ok((major, info, arg))
    }

    fn count(&mut self) -> Result<(), ScanError> {
        self.items += 1;
        if self.items > self.budget.max_items {
            return Err(ScanError::TooManyItems(self.budget.max_items));
        }
        Ok(())
    }

    /// JSON bytes a string's `len` bytes starting here become, at most (hex for bytes; for
    /// text, escapes by serde_json and then for the terminal).
    fn string(&mut self, major: u8, len: u64) -> Result<u64, ScanError> {
        if len > self.left() {
            return Err(ScanError::Malformed("truncated string"));
        }
        let s = &self.b[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Ok(if major == 2 {
            2 * len
        } else {
            s.iter()
                .map(|&c| match c {
                    b'"' | b'\\' | 0..=0x1f | 0x7f => 6,
                    0x80.. => 3,
                    _ => 1,
                })
                .sum()
        })
    }

    /// Walks one item; returns the bound on its JSON text.
    fn item(&mut self, depth: u32) -> Result<u64, ScanError> {
        self.count()?;
        if depth > self.budget.max_depth {
            return Err(ScanError::TooDeep(self.budget.max_depth));
        }
        let (major, info, arg) = self.head()?;
        Ok(match (major, arg) {
            // "-18446744073709551616", as a JSON string.
            (0 | 1, Some(_)) => 23,
            (0 | 1, None) => return Err(ScanError::Malformed("indefinite integer")),
            (2 | 3, Some(len)) => self.string(major, len)?.saturating_add(2),
            (2 | 3, None) => {
                let mut est = 2u64;
                loop {
                    if self.b.get(self.pos) == Some(&0xff) {
                        self.pos += 1;
                        break est;
                    }
                    self.count()?;
                    match self.head()? {
                        (m, _, Some(len)) if m == major => {
                            est = est.saturating_add(self.string(major, len)?)
                        }
                        _ => return Err(ScanError::Malformed("bad string chunk")),
                    }
                }
            }
            (4 | 5, n) => {
                let per = if major == 4 { 1 } else { 2 };
                if n.is_some_and(|n| n.saturating_mul(per) > self.left()) {
                    return Err(ScanError::Malformed("truncated array or map"));
                }
                let mut est = 2u64;
                let mut i = 0u64;
                loop {
                    match n {
                        Some(n) if i == n => break est,
                        None if self.b.get(self.pos) == Some(&0xff) => {
                            self.pos += 1;
                            break est;
                        }
                        _ => {}
                    }
                    if major == 5 {
                        // A key that is not text is written as its JSON text, escaped.
                        let text = self.b.get(self.pos).is_some_and(|b| b >> 5 == 3);
                        let k = self.item(depth + 1)?;
                        let k = if text {
                            k
                        } else {
                            k.saturating_mul(2).saturating_add(2)
                        };
                        est = est.saturating_add(k).saturating_add(1);
                    }
                    est = est.saturating_add(self.item(depth + 1)?).saturating_add(1);
                    i += 1;
                }
            }
            // A bignum (tags 2 and 3) of up to 16 bytes decodes as an integer, printed as
            // up to 39 digits, a sign and quotes: more than its hex for short byte strings.
            (6, Some(2 | 3)) => self.item(depth + 1)?.max(42),
            (6, Some(_)) => self.item(depth + 1)?,
            (6, None) => return Err(ScanError::Malformed("indefinite tag")),
            (7, _) if info == 31 => return Err(ScanError::Malformed("unexpected break")),
            // Simple values and floats ("-1.7976931348623157e308").
            (7, _) => 24,
            _ => unreachable!("three-bit major type"),
        })
    }
}

/// CBOR (what every whispeer client publishes) as JSON, as the CLI prints it: byte strings
/// become hex strings, tags are dropped, integers beyond 64 bits become decimal strings,
/// non-text map keys are written as their JSON text. [`Scanned::json_len`] bounds its text.
#[cfg(feature = "tokio-runtime")]
pub fn to_json(v: ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::Value as J;
    match v {
        C::Null => J::Null,
        C::Bool(b) => J::Bool(b),
        C::Integer(i) => {
            let i = i128::from(i);
            if let Ok(u) = u64::try_from(i) {
                J::from(u)
            } else if let Ok(s) = i64::try_from(i) {
                J::from(s)
            } else {
                J::String(i.to_string())
            }
        }
        C::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        C::Bytes(b) => J::String(hex::encode(&b)),
        C::Text(s) => J::String(s),
        C::Tag(_, inner) => to_json(*inner),
        C::Array(a) => J::Array(a.into_iter().map(to_json).collect()),
        C::Map(m) => J::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let k = match to_json(k) {
                        J::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, to_json(v))
                })
                .collect(),
        ),
        _ => J::Null,
    }
}

/// Properties of the scan over arbitrary and generated CBOR.
#[cfg(test)]
mod tests {
    use super::{scan, Budget, ScanError};
    use ciborium::Value as C;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    /// The CLI's budget (`whispeer sub`): a million items, ciborium's own nesting limit.
    const BUDGET: Budget = Budget {
        max_items: 1 << 20,
        max_depth: 256,
    };

    /// Nodes and nesting (containers and tags around the deepest leaf) of a decoded tree.
    fn shape(v: &C) -> (u64, u32) {
        let kids: Vec<&C> = match v {
            C::Array(a) => a.iter().collect(),
            C::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
            C::Tag(_, v) => vec![&**v],
            _ => return (1, 0),
        };
        kids.into_iter()
            .map(shape)
            .fold((1, 1), |(n, d), (kn, kd)| (n + kn, d.max(kd + 1)))
    }

    /// The longest the CLI's terminal escaping can make serde_json's text: it writes a
    /// character that acts on a terminal (DEL, C1, bidi and separators: all in the Basic
    /// Multilingual Plane, C0 is escaped by serde_json already) as `\uXXXX`, six bytes, and
    /// leaves every other character as it is.
    #[cfg(feature = "tokio-runtime")]
    fn printed_len_bound(json: &str) -> u64 {
        json.chars()
            .map(|c| match c {
                '\u{7f}'..='\u{ffff}' => 6,
                c => c.len_utf8() as u64,
            })
            .sum()
    }

    /// Whatever the scan accepts decodes (if it decodes) within its budget: no more items
    /// than it counted (so at most `max_items`), no deeper than `max_depth`, and printed JSON
    /// text no longer than its estimate.
    fn scan_bounds(bytes: &[u8]) -> Result<(), TestCaseError> {
        let Ok(s) = scan(bytes, BUDGET) else {
            return Ok(());
        };
        prop_assert!(s.items <= BUDGET.max_items);
        let Ok(v) = ciborium::from_reader::<C, _>(bytes) else {
            return Ok(());
        };
        let (nodes, depth) = shape(&v);
        prop_assert!(nodes <= s.items, "{} nodes, {} counted", nodes, s.items);
        prop_assert!(depth <= BUDGET.max_depth, "nested {}", depth);
        #[cfg(feature = "tokio-runtime")]
        {
            let text = serde_json::to_string(&super::to_json(v)).unwrap();
            let printed = printed_len_bound(&text);
            prop_assert!(
                printed <= s.json_len,
                "{} bytes of JSON, estimated {}: {}",
                printed,
                s.json_len,
                text
            );
        }
        Ok(())
    }

    fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        match n {
            0..=23 => out.push(m | n as u8),
            24..=0xff => out.extend([m | 24, n as u8]),
            0x100..=0xffff => {
                out.push(m | 25);
                out.extend((n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(m | 26);
                out.extend((n as u32).to_be_bytes());
            }
            _ => {
                out.push(m | 27);
                out.extend(n.to_be_bytes());
            }
        }
    }

    /// An encoder independent of ciborium's: strings, arrays and maps of definite or
    /// indefinite length (strings in chunks) as `indef` says, floats in 64 bits.
    fn encode(v: &C, out: &mut Vec<u8>, indef: &mut impl FnMut() -> bool) {
        match v {
            C::Null => out.push(0xf6),
            C::Bool(b) => out.push(if *b { 0xf5 } else { 0xf4 }),
            C::Integer(i) => match i128::from(*i) {
                i if i >= 0 => head(out, 0, i as u64),
                i => head(out, 1, (-1 - i) as u64),
            },
            C::Float(f) => {
                out.push(0xfb);
                out.extend(f.to_bits().to_be_bytes());
            }
            C::Bytes(b) if indef() => {
                out.push(0x5f);
                for c in b.chunks(3) {
                    head(out, 2, c.len() as u64);
                    out.extend(c);
                }
                out.push(0xff);
            }
            C::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend(b);
            }
            C::Text(s) if indef() => {
                out.push(0x7f);
                let chars: Vec<char> = s.chars().collect();
                for c in chars.chunks(2) {
                    let c: String = c.iter().collect();
                    head(out, 3, c.len() as u64);
                    out.extend(c.as_bytes());
                }
                out.push(0xff);
            }
            C::Text(s) => {
                head(out, 3, s.len() as u64);
                out.extend(s.as_bytes());
            }
            C::Array(a) => {
                let open = indef();
                if open {
                    out.push(0x9f);
                } else {
                    head(out, 4, a.len() as u64);
                }
                for x in a {
                    encode(x, out, indef);
                }
                if open {
                    out.push(0xff);
                }
            }
            C::Map(m) => {
                let open = indef();
                if open {
                    out.push(0xbf);
                } else {
                    head(out, 5, m.len() as u64);
                }
                for (k, x) in m {
                    encode(k, out, indef);
                    encode(x, out, indef);
                }
                if open {
                    out.push(0xff);
                }
            }
            C::Tag(t, x) => {
                head(out, 6, *t);
                encode(x, out, indef);
            }
            other => unreachable!("not generated: {other:?}"),
        }
    }

    /// Nested arrays, maps (keys of any kind) and tags of integers of the whole CBOR range,
    /// floats, byte strings and text (escapes, controls, bidi, astral).
    fn value() -> impl Strategy<Value = C> {
        let leaf = prop_oneof![
            Just(C::Null),
            any::<bool>().prop_map(C::Bool),
            any::<i64>().prop_map(|i| C::Integer(i.into())),
            any::<u64>().prop_map(|i| C::Integer(i.into())),
            any::<u64>().prop_map(|n| C::Integer((-1 - i128::from(n)).try_into().unwrap())),
            any::<f64>().prop_map(C::Float),
            prop::collection::vec(any::<u8>(), 0..24).prop_map(C::Bytes),
            any::<String>().prop_map(C::Text),
            "[\"\\\\\u{0}-\u{1f}\u{7f}-\u{9f}\u{202e}\u{1f600}a]{0,12}".prop_map(C::Text),
        ];
        leaf.prop_recursive(8, 256, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(C::Array),
                prop::collection::vec((inner.clone(), inner.clone()), 0..5).prop_map(C::Map),
                // (Not 2 or 3: ciborium reads a bignum tag's bytes as an integer.)
                (4u64..=u64::MAX, inner).prop_map(|(t, v)| C::Tag(t, Box::new(v))),
            ]
        })
    }

    /// Bytes that look like CBOR often: heads of every kind and breaks among any bytes.
    fn cborish() -> impl Strategy<Value = Vec<u8>> {
        let b = prop_oneof![
            any::<u8>(),
            prop::sample::select(vec![
                0x5f, 0x7f, 0x9f, 0xbf, 0xff, 0x80, 0x81, 0x82, 0xa0, 0xa1, 0xa2, 0x40, 0x41, 0x60,
                0x61, 0x62, 0x18, 0x19, 0x1b, 0x38, 0x3b, 0xc0, 0xc2, 0xd8, 0xf4, 0xf6, 0xf7, 0xf8,
                0xf9, 0xfa, 0xfb, b'"', b'\\', 0x7f, 0xc2, 0x85,
            ]),
        ];
        prop::collection::vec(b, 0..300)
    }

    /// The budget is exact: `max_items` items (string chunks and tags among them) pass, one
    /// more does not; `max_depth` levels pass, one more does not.
    #[test]
    fn the_budget_is_exact() {
        let b = |max_items, max_depth| Budget {
            max_items,
            max_depth,
        };
        // An array of 9 empty arrays: 10 items, depth 1.
        let mut arr = vec![0x89];
        arr.extend([0x80; 9]);
        assert_eq!(scan(&arr, b(10, 1)).map(|s| s.items), Ok(10));
        assert_eq!(scan(&arr, b(9, 1)), Err(ScanError::TooManyItems(9)));
        assert_eq!(scan(&arr, b(10, 0)), Err(ScanError::TooDeep(0)));
        // Text in 2 chunks (3 items), a tag around it (4).
        let chunked = [0xc6, 0x7f, 0x61, b'a', 0x61, b'b', 0xff];
        assert_eq!(scan(&chunked, b(4, 1)).map(|s| s.items), Ok(4));
        assert_eq!(scan(&chunked, b(3, 1)), Err(ScanError::TooManyItems(3)));
        // 5 arrays nested: depth 4 for the innermost.
        let nested = [0x81, 0x81, 0x81, 0x81, 0x80];
        assert!(scan(&nested, b(5, 4)).is_ok());
        assert_eq!(scan(&nested, b(5, 3)), Err(ScanError::TooDeep(3)));
        // The bomb (one item a byte, indefinite length) stops at the budget, its end unread.
        let mut bomb = vec![0x9f];
        bomb.extend([0x80; 1000]);
        assert_eq!(scan(&bomb, b(100, 8)), Err(ScanError::TooManyItems(100)));
        bomb.push(0xff);
        assert_eq!(scan(&bomb, b(1001, 8)).map(|s| s.items), Ok(1001));
        // Malformed: truncated, a length past the end, a lone break, reserved info.
        for bad in [
            &[0x82, 0x01][..],
            &[0x5a, 0xff, 0xff, 0xff, 0xff],
            &[0xff],
            &[0x1c],
            &[],
        ] {
            assert!(
                matches!(scan(bad, BUDGET), Err(ScanError::Malformed(_))),
                "{bad:02x?}"
            );
        }
    }

    /// Bignums (tags 2 and 3) print as decimal integers, longer than their bytes' hex: every
    /// length up to past u128, smallest and largest values (CI found `c2 47 24 00…`: 7 bytes
    /// printed as 17 digits, estimated 16).
    #[test]
    fn bignums_are_estimated_as_their_decimal_text() {
        for tag in [0xc2u8, 0xc3] {
            for len in 0..=20u8 {
                for fill in [0x00u8, 0x24, 0xff] {
                    let mut b = vec![tag, 0x40 | len];
                    b.extend(std::iter::repeat_n(fill, len.into()));
                    scan_bounds(&b).unwrap_or_else(|e| panic!("{b:02x?}: {e}"));
                }
            }
        }
        scan_bounds(&[194, 71, 36, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes: the scan never panics, and what it accepts decodes within its
        /// budget.
        #[test]
        fn arbitrary_bytes_are_scanned_within_budget(
            bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..300), cborish()],
        ) {
            scan_bounds(&bytes)?;
        }

        /// Valid CBOR within the budget (ciborium's encoding and an independent one with
        /// indefinite lengths) is accepted, and decodes within the estimate; cut short or
        /// with a byte changed, it is still scanned within budget.
        #[test]
        fn valid_cbor_within_budget_is_accepted(
            v in value(),
            mask in any::<u64>(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut theirs = Vec::new();
            ciborium::into_writer(&v, &mut theirs).unwrap();
            let mut bit = 0;
            let mut ours = Vec::new();
            encode(&v, &mut ours, &mut || {
                bit += 1;
                mask >> (bit % 64) & 1 == 1
            });
            for bytes in [&theirs, &ours] {
                prop_assert!(scan(bytes, BUDGET).is_ok(), "{:02x?}", bytes);
                let back: Result<C, _> = ciborium::from_reader(&bytes[..]);
                prop_assert!(back.is_ok(), "ciborium reads it back: {:?}", back);
                scan_bounds(bytes)?;
                let i = at.index(bytes.len());
                scan_bounds(&bytes[..i])?;
                let mut changed = bytes.clone();
                changed[i] = byte;
                scan_bounds(&changed)?;
            }
        }
    }
}
