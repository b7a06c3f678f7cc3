//! Transport framing for byte streams (TCP, TLS): each frame is preceded by its length as a
//! big-endian `u32`. WebSocket needs no such prefix: one binary message is one frame.
//!
//! [`FrameDecoder`] is incremental: feed it whatever a read returned (half a prefix, many
//! frames at once) and pull complete frames out. A declared length above the limit is
//! rejected as soon as the 4 prefix bytes arrive, before any buffer grows for it.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::limits::MAX_FRAME_CEILING;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// The most [`FrameDecoder::next_frame`] reserves ahead for a frame whose bytes have not
/// arrived yet.
pub const RESERVE_AHEAD: usize = 64 << 10;

/// Incremental decoder of length-prefixed frames.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    buf: BytesMut,
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `max_frame` bytes (capped at 64 MiB).
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.min(MAX_FRAME_CEILING),
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// The configured limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the limit (capped at 64 MiB) for the frames not yet returned: a relay reads
    /// the handshake with [`HANDSHAKE_MAX_FRAME`](crate::limits::HANDSHAKE_MAX_FRAME) and
    /// raises the limit to its `max_frame` once the client is admitted.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(MAX_FRAME_CEILING);
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The internal buffer, to read into directly (e.g. `AsyncReadExt::read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether a whole frame is buffered ([`next_frame`](Self::next_frame) returns without
    /// more input; an invalid length counts as nothing buffered).
    pub fn has_frame(&self) -> bool {
        self.pending_len()
            .is_some_and(|n| self.buf.len() - LEN_PREFIX >= n)
    }

    /// The declared length of the frame being received, once its 4-byte prefix is
    /// buffered (whatever the limit: [`next_frame`](Self::next_frame) judges it).
    pub fn pending_len(&self) -> Option<usize> {
        let p = self.buf.get(..LEN_PREFIX)?;
        Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize)
    }

    /// The next complete frame's bytes (without prefix), `None` if more input is needed, or
    /// an error for a declared length of zero or above the limit. After an error the stream
    /// is unusable: close it.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max_frame {
            return Err(DecodeError::TooLarge {
                what: "frame",
                len,
                max: self.max_frame,
            });
        }
        if len == 0 {
            return Err(DecodeError::Truncated {
                what: "frame",
                needed: 1,
            });
        }
        if self.buf.len() < LEN_PREFIX + len {
            // Reserve what this frame still needs, up to `RESERVE_AHEAD`: a declared length
            // is only a claim (a relay's 10,000 connections each declaring `max_frame` and
            // sending nothing more would otherwise hold 10 GiB of address space before any
            // budget covered them). Larger frames grow as their bytes arrive, or the caller
            // reserves the rest once it has accounted for them.
            self.buf
                .reserve((LEN_PREFIX + len - self.buf.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Like [`next_frame`](Self::next_frame), then decodes the frame.
    pub fn next_decoded(&mut self) -> Result<Option<Frame>, DecodeError> {
        match self.next_frame()? {
            Some(b) => Frame::decode(&b).map(Some),
            None => Ok(None),
        }
    }
}

/// Appends `frame` with its length prefix.
pub fn write_prefixed(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// Encodes `frame` with its length prefix into one buffer.
pub fn encode_prefixed(frame: &Frame) -> Bytes {
    let mut out = Vec::with_capacity(LEN_PREFIX + frame.size_hint());
    out.extend_from_slice(&[0u8; LEN_PREFIX]);
    frame.encode(&mut out);
    let len = (out.len() - LEN_PREFIX) as u32;
    out[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding (transport #13): a declared length reserved the whole frame before
    /// any of it arrived (and before the relay's frame budget covered it).
    #[test]
    fn a_declared_length_reserves_at_most_reserve_ahead() {
        let mut d = FrameDecoder::new(16 << 20);
        d.buffer_mut()
            .extend_from_slice(&(8u32 << 20).to_be_bytes());
        assert!(d.next_frame().unwrap().is_none());
        assert!(
            d.buffer_mut().capacity() <= LEN_PREFIX + RESERVE_AHEAD + 64,
            "{} bytes reserved for a frame that has not arrived",
            d.buffer_mut().capacity()
        );
    }
    use crate::frame::{Frame, Ping};

    /// The handshake cap must admit every valid `Hello`: the largest one (every field at
    /// its limit, the longest CBOR encodings) decodes and fits, with room to spare.
    #[test]
    fn the_largest_valid_hello_fits_the_handshake_cap() {
        use crate::frame::{Hello, MAX_AUTH_LEN, MAX_OFFERED_VERSIONS};
        use crate::limits::{HANDSHAKE_MAX_FRAME, MAX_TEXT_LEN};
        let hello = Frame::Hello(Hello {
            versions: vec![u64::MAX; MAX_OFFERED_VERSIONS],
            features: u64::MAX,
            client: Some("\u{10FFFF}".repeat(MAX_TEXT_LEN / 4)),
            auth: Some(Bytes::from(vec![0xff; MAX_AUTH_LEN])),
            account: Some([0xff; 32]),
        });
        let wire = encode_prefixed(&hello);
        let mut d = FrameDecoder::new(HANDSHAKE_MAX_FRAME);
        d.push(&wire);
        let back = d.next_decoded().expect("within the cap").expect("complete");
        assert_eq!(back, hello);
        assert!(
            wire.len() - LEN_PREFIX <= HANDSHAKE_MAX_FRAME / 2 + 512,
            "{}",
            wire.len()
        );
    }

    #[test]
    fn a_raised_limit_admits_what_the_handshake_cap_refused() {
        use crate::limits::HANDSHAKE_MAX_FRAME;
        let big = (HANDSHAKE_MAX_FRAME as u32 + 1).to_be_bytes();
        let mut d = FrameDecoder::new(HANDSHAKE_MAX_FRAME);
        d.push(&big);
        assert!(matches!(d.next_frame(), Err(DecodeError::TooLarge { .. })));
        let mut d = FrameDecoder::new(HANDSHAKE_MAX_FRAME);
        d.set_max_frame(1 << 20);
        d.push(&big);
        assert_eq!(d.next_frame().unwrap(), None, "waits for the body");
        d.set_max_frame(usize::MAX);
        assert_eq!(d.max_frame(), MAX_FRAME_CEILING);
    }

    #[test]
    fn byte_by_byte_and_many_per_read() {
        let mut stream = Vec::new();
        for n in 0..5u64 {
            stream.extend_from_slice(&encode_prefixed(&Frame::Ping(Ping { nonce: n })));
        }
        // One byte at a time.
        let mut d = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            // `has_frame` says exactly when the next call returns a frame.
            while d.has_frame() {
                got.push(d.next_decoded().unwrap().expect("a whole frame"));
            }
            assert_eq!(d.next_decoded().unwrap(), None);
        }
        assert_eq!(got.len(), 5);
        // All at once.
        let mut d = FrameDecoder::new(1024);
        d.push(&stream);
        let mut n = 0;
        while d.next_decoded().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 5);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_prefix_rejected_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::TooLarge {
                len: 4294967295,
                ..
            })
        ));
        assert!(d.buffer_mut().capacity() < 1 << 20);
        let mut d = FrameDecoder::new(1024);
        d.push(&[0, 0, 4, 1]);
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::TooLarge { len: 1025, .. })
        ));
        let mut d = FrameDecoder::new(1024);
        d.push(&[0, 0, 0, 0]);
        assert!(d.next_frame().is_err());
    }
}
