//! The frame codec's CBOR: definite lengths only, no tags, every length checked against a
//! limit *before* anything is allocated. Item heads are read and written here directly
//! (a head is one byte and 0–8 argument bytes) — the same results as `ciborium-ll`, which
//! the tests compare against for every head byte and which still decodes floats.
//!
//! Decoding borrows byte strings out of the input [`Bytes`] without copying, so a published
//! envelope reaches every subscriber as the same allocation — unless a string is less than
//! half of its input: then it is copied (`Reader::share`).

use std::ops::Range;

use bytes::Bytes;
use ciborium_ll::{simple, Decoder, Header};

use crate::error::DecodeError;
use crate::limits::{MAX_CBOR_DEPTH, MAX_CBOR_ITEMS};

pub(crate) struct Reader<'a> {
    /// Where the next item starts in `input`: a string's content is skipped by moving past
    /// it, never read through (a 1 KiB envelope was once copied into a scratch buffer just
    /// to move past it).
    pos: usize,
    input: &'a Bytes,
}

fn cbor_err(offset: usize, reason: &'static str) -> DecodeError {
    DecodeError::Cbor { offset, reason }
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a Bytes) -> Self {
        Self { pos: 0, input }
    }

    pub(crate) fn offset(&mut self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&mut self) -> usize {
        self.input.len() - self.offset()
    }

    /// The next item's head. Decoded here from the input (the head is one byte plus 0–8
    /// argument bytes): `ciborium-ll`'s reader pulls it a byte at a time through its `Read`
    /// trait and a title conversion, and was ~9 % of the relay's CPU routing 1 KiB messages
    /// (`perf`). Floats, which no frame holds, still go through `ciborium-ll`; every result
    /// and error is the same as its (`header_ciborium`, compared for every head byte in the
    /// tests).
    #[inline]
    pub(crate) fn header(&mut self) -> Result<Header, DecodeError> {
        // One-byte heads (map keys, small integers, short lengths: most heads of a frame)
        // inline; the rest out of line (callgrind, relay 1→1: `header` was ~57
        // instructions a call, nine calls per routed `Pub`).
        if let Some(&first) = self.input.get(self.pos) {
            let info = first & 0x1f;
            if info < 24 {
                let arg = u64::from(info);
                let h = match first >> 5 {
                    0 => Header::Positive(arg),
                    1 => Header::Negative(arg),
                    2 => Header::Bytes(Some(usize::from(info))),
                    3 => Header::Text(Some(usize::from(info))),
                    4 => Header::Array(Some(usize::from(info))),
                    5 => Header::Map(Some(usize::from(info))),
                    7 => Header::Simple(info),
                    // Tags: refused by the general path.
                    _ => return self.header_general(),
                };
                self.pos += 1;
                return Ok(h);
            }
        }
        self.header_general()
    }

    /// [`header`](Self::header) for every head (the one-byte ones included).
    #[inline(never)]
    fn header_general(&mut self) -> Result<Header, DecodeError> {
        let off = self.offset();
        let input: &[u8] = &self.input[off..];
        let truncated = DecodeError::Truncated {
            what: "CBOR item",
            needed: 1,
        };
        let Some(&first) = input.first() else {
            return Err(truncated);
        };
        let (major, info) = (first >> 5, first & 0x1f);
        let n = match info {
            0..=23 | 31 => 0,
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err(cbor_err(off, "malformed item")),
        };
        if major == 7 && (25..=27).contains(&info) {
            return self.header_ciborium();
        }
        let Some(arg) = input.get(1..1 + n) else {
            return Err(truncated);
        };
        let arg = match info {
            0..=23 => u64::from(info),
            _ => arg.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)),
        };
        let size = || usize::try_from(arg).map_err(|_| cbor_err(off, "malformed item"));
        let h = match (major, info) {
            (2..=5, 31) => return Err(cbor_err(off, "indefinite lengths are not allowed")),
            (7, 31) => Header::Break,
            (_, 31) => return Err(cbor_err(off, "malformed item")),
            (0, _) => Header::Positive(arg),
            (1, _) => Header::Negative(arg),
            (2, _) => Header::Bytes(Some(size()?)),
            (3, _) => Header::Text(Some(size()?)),
            (4, _) => Header::Array(Some(size()?)),
            (5, _) => Header::Map(Some(size()?)),
            (6, _) => return Err(cbor_err(off, "tags are not allowed")),
            _ => Header::Simple(arg as u8),
        };
        self.pos = off + 1 + n;
        Ok(h)
    }

    /// [`header`](Self::header) through `ciborium-ll` (floats; and the reference the fast
    /// path is tested against).
    fn header_ciborium(&mut self) -> Result<Header, DecodeError> {
        let off = self.offset();
        let mut dec = Decoder::from(&self.input[off..]);
        let pulled = dec.pull();
        if pulled.is_ok() {
            self.pos = off + dec.offset();
        }
        match pulled {
            Ok(Header::Tag(_)) => Err(cbor_err(off, "tags are not allowed")),
            Ok(
                Header::Bytes(None) | Header::Text(None) | Header::Array(None) | Header::Map(None),
            ) => Err(cbor_err(off, "indefinite lengths are not allowed")),
            Ok(h) => Ok(h),
            Err(ciborium_ll::Error::Io(_)) => Err(DecodeError::Truncated {
                what: "CBOR item",
                needed: 1,
            }),
            Err(ciborium_ll::Error::Syntax(o)) => Err(cbor_err(off + o, "malformed item")),
        }
    }

    /// Advances over `len` content bytes (already bounds-checked) and returns their range.
    fn advance(&mut self, len: usize) -> Result<Range<usize>, DecodeError> {
        let start = self.offset();
        if len > self.input.len() - start {
            return Err(DecodeError::Truncated {
                what: "CBOR string",
                needed: len - (self.input.len() - start),
            });
        }
        let end = start + len;
        self.pos = end;
        Ok(start..end)
    }

    /// Bytes `r` of the input, shared when they are at least half of it, else copied:
    /// **a byte string decoded from a frame keeps at most twice its length allocated beyond
    /// what the frame itself keeps** (with the frame decoder's bound, at most 4 times its
    /// length). An envelope is almost all of its `Pub`, so it is shared; but a `Pub` may
    /// carry a small envelope and 60 KiB under a key the decoder skips, and the envelope,
    /// which the relay may keep for long and counts by its own length, then kept all of it.
    fn share(&self, r: Range<usize>) -> Bytes {
        if 2 * r.len() >= self.input.len() {
            self.input.slice(r)
        } else {
            Bytes::copy_from_slice(&self.input[r])
        }
    }

    /// The next `len` raw content bytes (after a string header was pulled), shared.
    pub(crate) fn raw(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        let r = self.advance(len)?;
        Ok(self.input.slice(r))
    }

    pub(crate) fn map_len(
        &mut self,
        frame: &'static str,
        field: &'static str,
    ) -> Result<usize, DecodeError> {
        match self.header()? {
            Header::Map(Some(n)) if n <= MAX_CBOR_ITEMS => Ok(n),
            Header::Map(Some(n)) => Err(DecodeError::TooLarge {
                what: "CBOR map",
                len: n,
                max: MAX_CBOR_ITEMS,
                unit: "entries",
            }),
            _ => Err(DecodeError::InvalidField {
                frame,
                field,
                reason: "expected a CBOR map",
            }),
        }
    }

    pub(crate) fn uint(
        &mut self,
        frame: &'static str,
        field: &'static str,
    ) -> Result<u64, DecodeError> {
        match self.header()? {
            Header::Positive(v) => Ok(v),
            _ => Err(DecodeError::InvalidField {
                frame,
                field,
                reason: "expected an unsigned integer",
            }),
        }
    }

    pub(crate) fn bool(
        &mut self,
        frame: &'static str,
        field: &'static str,
    ) -> Result<bool, DecodeError> {
        match self.header()? {
            Header::Simple(simple::TRUE) => Ok(true),
            Header::Simple(simple::FALSE) => Ok(false),
            _ => Err(DecodeError::InvalidField {
                frame,
                field,
                reason: "expected a boolean",
            }),
        }
    }

    /// A byte string of at most `max` bytes, shared with the input.
    pub(crate) fn bytes(
        &mut self,
        frame: &'static str,
        field: &'static str,
        max: usize,
    ) -> Result<Bytes, DecodeError> {
        match self.header()? {
            Header::Bytes(Some(len)) => {
                if len > max {
                    return Err(DecodeError::TooLarge {
                        what: field,
                        len,
                        max,
                        unit: "bytes",
                    });
                }
                let r = self.advance(len)?;
                Ok(self.share(r))
            }
            _ => Err(DecodeError::InvalidField {
                frame,
                field,
                reason: "expected a byte string",
            }),
        }
    }

    pub(crate) fn bytes16(
        &mut self,
        frame: &'static str,
        field: &'static str,
    ) -> Result<[u8; 16], DecodeError> {
        self.bytes_n(frame, field)
    }

    /// A byte string of exactly `N` bytes.
    pub(crate) fn bytes_n<const N: usize>(
        &mut self,
        frame: &'static str,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(frame, field, N)?;
        b[..].try_into().map_err(|_| DecodeError::InvalidField {
            frame,
            field,
            reason: "wrong byte-string length",
        })
    }

    pub(crate) fn text(
        &mut self,
        frame: &'static str,
        field: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        match self.header()? {
            Header::Text(Some(len)) => {
                if len > max {
                    return Err(DecodeError::TooLarge {
                        what: field,
                        len,
                        max,
                        unit: "bytes",
                    });
                }
                let r = self.advance(len)?;
                String::from_utf8(self.input[r].to_vec()).map_err(|_| DecodeError::InvalidField {
                    frame,
                    field,
                    reason: "text is not UTF-8",
                })
            }
            _ => Err(DecodeError::InvalidField {
                frame,
                field,
                reason: "expected a text string",
            }),
        }
    }

    pub(crate) fn array_len(
        &mut self,
        frame: &'static str,
        field: &'static str,
        max: usize,
    ) -> Result<usize, DecodeError> {
        match self.header()? {
            Header::Array(Some(n)) if n <= max => Ok(n),
            Header::Array(Some(n)) => Err(DecodeError::TooLarge {
                what: field,
                len: n,
                max,
                unit: "elements",
            }),
            _ => Err(DecodeError::InvalidField {
                frame,
                field,
                reason: "expected an array",
            }),
        }
    }

    /// Skips one complete item (an unknown field's value), bounded in depth and size.
    pub(crate) fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        let off = self.offset();
        if depth > MAX_CBOR_DEPTH {
            return Err(cbor_err(off, "nesting too deep"));
        }
        match self.header()? {
            Header::Positive(_) | Header::Negative(_) | Header::Float(_) | Header::Simple(_) => {
                Ok(())
            }
            Header::Break => Err(cbor_err(off, "unexpected break")),
            Header::Bytes(Some(len)) | Header::Text(Some(len)) => {
                let rem = self.remaining();
                if len > rem {
                    return Err(DecodeError::Truncated {
                        what: "CBOR string",
                        needed: len - rem,
                    });
                }
                self.advance(len).map(|_| ())
            }
            Header::Array(Some(n)) => {
                if n > MAX_CBOR_ITEMS {
                    return Err(DecodeError::TooLarge {
                        what: "CBOR array",
                        len: n,
                        max: MAX_CBOR_ITEMS,
                        unit: "elements",
                    });
                }
                (0..n).try_for_each(|_| self.skip(depth + 1))
            }
            Header::Map(Some(n)) => {
                if n > MAX_CBOR_ITEMS {
                    return Err(DecodeError::TooLarge {
                        what: "CBOR map",
                        len: n,
                        max: MAX_CBOR_ITEMS,
                        unit: "entries",
                    });
                }
                (0..2 * n).try_for_each(|_| self.skip(depth + 1))
            }
            _ => Err(cbor_err(off, "unsupported item")),
        }
    }
}

/// Writes CBOR in the deterministic form of RFC 8949 §4.2.1 (shortest integers, definite
/// lengths); map keys are written in ascending order by the frame encoder.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }
    /// An item's head in its shortest form (written here: `ciborium-ll`'s encoder goes
    /// through a title conversion and its `Write` trait per head; the tests check the bytes
    /// are the same as its).
    #[inline]
    fn head(&mut self, major: u8, v: u64) {
        let m = major << 5;
        match v {
            0..=23 => self.out.push(m | v as u8),
            24..=0xff => self.out.extend_from_slice(&[m | 24, v as u8]),
            0x100..=0xffff => {
                self.out.push(m | 25);
                self.out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.out.push(m | 26);
                self.out.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                self.out.push(m | 27);
                self.out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
    pub(crate) fn map(&mut self, n: usize) {
        self.head(5, n as u64);
    }
    pub(crate) fn array(&mut self, n: usize) {
        self.head(4, n as u64);
    }
    pub(crate) fn uint(&mut self, v: u64) {
        self.head(0, v);
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.head(7, u64::from(if v { simple::TRUE } else { simple::FALSE }));
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.head(2, b.len() as u64);
        self.out.extend_from_slice(b);
    }
    pub(crate) fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium_ll::Encoder;

    /// Heads with their argument bytes cut at every length, and every head byte.
    fn samples() -> Vec<Vec<u8>> {
        let tails: [&[u8]; 5] = [&[], &[0x00], &[0xff, 0x01], &[0x80; 4], &[0x7f; 9]];
        let mut out = Vec::new();
        for b in 0..=255u8 {
            for t in tails {
                let mut v = vec![b];
                v.extend_from_slice(t);
                out.push(v);
            }
        }
        out
    }

    #[test]
    fn heads_decode_as_ciborium_decodes_them() {
        for input in samples() {
            let input = Bytes::from(input);
            let (mut fast, mut reference) = (Reader::new(&input), Reader::new(&input));
            let got = fast.header();
            let want = reference.header_ciborium();
            let same = match (&got, &want) {
                // NaN != NaN: compare floats by their bits.
                (Ok(Header::Float(a)), Ok(Header::Float(b))) => a.to_bits() == b.to_bits(),
                _ => got == want,
            };
            assert!(same, "{input:02x?}: {got:?} vs {want:?}");
            if got.is_ok() {
                assert_eq!(fast.offset(), reference.offset(), "{input:02x?}");
                // The next head is read from where this one ended.
                assert_eq!(fast.header(), reference.header_ciborium(), "{input:02x?}");
            }
        }
    }

    #[test]
    fn heads_encode_as_ciborium_encodes_them() {
        let values = [
            0u64,
            1,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX,
        ];
        for v in values {
            for (major, h) in [
                (0, Header::Positive(v)),
                (2, Header::Bytes(Some(v as usize))),
                (3, Header::Text(Some(v as usize))),
                (4, Header::Array(Some(v as usize))),
                (5, Header::Map(Some(v as usize))),
            ] {
                if usize::try_from(v).is_err() && major != 0 {
                    continue;
                }
                let mut ours = Vec::new();
                Writer::new(&mut ours).head(major, v);
                let mut theirs = Vec::new();
                Encoder::from(&mut theirs).push(h).unwrap();
                assert_eq!(ours, theirs, "major {major}, {v}");
            }
        }
        for b in [true, false] {
            let mut ours = Vec::new();
            Writer::new(&mut ours).bool(b);
            let mut theirs = Vec::new();
            let s = if b { simple::TRUE } else { simple::FALSE };
            Encoder::from(&mut theirs).push(Header::Simple(s)).unwrap();
            assert_eq!(ours, theirs);
        }
    }
}
