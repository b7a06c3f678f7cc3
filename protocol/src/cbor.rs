//! A thin, bounded layer over `ciborium-ll` for the frame codec: definite lengths only, no
//! tags, every length checked against a limit *before* anything is allocated.
//!
//! Decoding borrows byte strings out of the input [`Bytes`] without copying, so a published
//! envelope reaches every subscriber as the same allocation.

use std::ops::Range;

use bytes::Bytes;
use ciborium_io::Write;
use ciborium_ll::{simple, Decoder, Encoder, Header};

use crate::error::DecodeError;
use crate::limits::{MAX_CBOR_DEPTH, MAX_CBOR_ITEMS};

pub(crate) struct Reader<'a> {
    /// Decodes `input[base..]`: a string's content is skipped by starting a new decoder
    /// after it, not read through (a 1 KiB envelope was copied into a scratch buffer just
    /// to move past it).
    dec: Decoder<&'a [u8]>,
    base: usize,
    input: &'a Bytes,
}

fn cbor_err(offset: usize, reason: &'static str) -> DecodeError {
    DecodeError::Cbor { offset, reason }
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a Bytes) -> Self {
        Self {
            dec: Decoder::from(&input[..]),
            base: 0,
            input,
        }
    }

    pub(crate) fn offset(&mut self) -> usize {
        self.base + self.dec.offset()
    }

    pub(crate) fn remaining(&mut self) -> usize {
        self.input.len() - self.offset()
    }

    pub(crate) fn header(&mut self) -> Result<Header, DecodeError> {
        let off = self.offset();
        match self.dec.pull() {
            Ok(Header::Tag(_)) => Err(cbor_err(off, "tags are not allowed")),
            Ok(
                Header::Bytes(None) | Header::Text(None) | Header::Array(None) | Header::Map(None),
            ) => Err(cbor_err(off, "indefinite lengths are not allowed")),
            Ok(h) => Ok(h),
            Err(ciborium_ll::Error::Io(_)) => Err(DecodeError::Truncated {
                what: "CBOR item",
                needed: 1,
            }),
            Err(ciborium_ll::Error::Syntax(o)) => Err(cbor_err(self.base + o, "malformed item")),
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
        // Called right after a string header was pulled: the decoder holds no pushed-back
        // header, so a new one over the rest of the input continues exactly where reading
        // through the content would have.
        let end = start + len;
        self.dec = Decoder::from(&self.input[end..]);
        self.base = end;
        Ok(start..end)
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
                    });
                }
                let r = self.advance(len)?;
                Ok(self.input.slice(r))
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
    enc: Encoder<&'a mut Vec<u8>>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            enc: Encoder::from(out),
        }
    }
    fn push(&mut self, h: Header) {
        self.enc.push(h).expect("writing to a Vec cannot fail");
    }
    pub(crate) fn map(&mut self, n: usize) {
        self.push(Header::Map(Some(n)));
    }
    pub(crate) fn array(&mut self, n: usize) {
        self.push(Header::Array(Some(n)));
    }
    pub(crate) fn uint(&mut self, v: u64) {
        self.push(Header::Positive(v));
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.push(Header::Simple(if v { simple::TRUE } else { simple::FALSE }));
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.push(Header::Bytes(Some(b.len())));
        self.enc.write_all(b).expect("writing to a Vec cannot fail");
    }
    pub(crate) fn text(&mut self, s: &str) {
        self.push(Header::Text(Some(s.len())));
        self.enc
            .write_all(s.as_bytes())
            .expect("writing to a Vec cannot fail");
    }
}
