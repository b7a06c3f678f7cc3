//! Transport framing for byte streams (TCP, TLS): each frame is preceded by its length as a
//! big-endian `u32`. WebSocket needs no such prefix: one binary message is one frame.
//!
//! [`FrameDecoder`] is incremental: feed it whatever a read returned (half a prefix, many
//! frames at once) and pull complete frames out. A declared length above the limit is
//! rejected as soon as the 4 prefix bytes arrive, before any buffer grows for it.
//!
//! A frame keeps at most twice its length alive ([`FrameDecoder::next_frame`]): what the
//! relay keeps of a frame (an envelope waiting for an ack, in a queue, in a replay's
//! buffer) is counted by its length, so a 200-byte frame cut out of a 64 KiB read buffer
//! must not keep the whole buffer alive.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::limits::MAX_FRAME_CEILING;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// The most [`FrameDecoder::next_frame`] reserves ahead for a frame whose bytes have not
/// arrived yet.
pub const RESERVE_AHEAD: usize = 64 << 10;

/// The most a read allocation grows to on a stream of small frames (see
/// [`FrameDecoder::reserve_read`]).
pub const READ_ALLOC_MAX: usize = 256 << 10;

/// Incremental decoder of length-prefixed frames.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    buf: BytesMut,
    /// The allocation `buf` lives in, when the decoder made it: its start address and size.
    /// `None` once `buf` may live elsewhere (grown or replaced through
    /// [`buffer_mut`](Self::buffer_mut)): its size is unknown, so every frame is copied.
    alloc: Option<(usize, usize)>,
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `max_frame` bytes (capped at 64 MiB).
    pub fn new(max_frame: usize) -> Self {
        let mut d = Self {
            max_frame: max_frame.min(MAX_FRAME_CEILING),
            buf: BytesMut::new(),
            alloc: None,
        };
        d.reserve(8 * 1024);
        d
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
        self.reserve(data.len());
        self.buf.extend_from_slice(data);
    }

    /// The internal buffer, to read into directly (e.g. `AsyncReadExt::read_buf`). Make room
    /// with [`reserve`](Self::reserve), not `BytesMut::reserve`: an allocation the decoder
    /// did not make has an unknown size, and every frame cut out of it is copied.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Makes room for at least `additional` more bytes in [`buffer_mut`](Self::buffer_mut):
    /// in place when the buffer's allocation has room (moving the unread bytes to its start
    /// when no frame still shares it), else in a new allocation of known size.
    pub fn reserve(&mut self, additional: usize) {
        self.make_room(additional, false);
    }

    /// Like [`reserve`](Self::reserve), for a read of up to `additional` bytes: while a
    /// frame that will share the buffer (see [`next_frame`](Self::next_frame)) is being
    /// received and its remaining bytes fit, it makes no more room — growing the buffer
    /// would move the frame so far into a larger allocation (a copy, and a frame that then
    /// no longer fills its allocation). The read then ends at the frame's end, or earlier.
    /// Otherwise at least `additional` bytes of room.
    pub fn reserve_read(&mut self, additional: usize) {
        self.make_room(additional, true);
    }

    fn make_room(&mut self, additional: usize, read: bool) {
        let spare = self.buf.capacity() - self.buf.len();
        if spare >= additional {
            return;
        }
        let size = self.allocation();
        let pending = self.pending_len().filter(|&n| n > 0 && n <= self.max_frame);
        if let (true, Some(size), Some(n)) = (read, size, pending) {
            let rest = (LEN_PREFIX + n).saturating_sub(self.buf.len());
            if rest > 0 && rest <= spare && 2 * n >= size {
                return;
            }
        }
        if size.is_some() && self.buf.try_reclaim(additional) {
            return;
        }
        let mut want = self.buf.len() + additional;
        if let Some(n) = pending {
            // A frame arriving in pieces grows its buffer geometrically (relative to the
            // bytes that arrived: a declared length is only a claim), never past its end.
            want = want.max((2 * self.buf.len()).min(LEN_PREFIX + n));
        }
        if let (true, Some(size)) = (read, size) {
            if pending.is_none_or(|n| 2 * n < size) {
                // A stream of small frames: the read allocation doubles (up to
                // `READ_ALLOC_MAX`), as `BytesMut::reserve` did, so that it is reclaimed in
                // place from then on. Sized to exactly the unread bytes plus one read, it
                // was too small to reclaim after almost every read: a fresh allocation per
                // read, and reads of at most 64 KiB — a relay fanning 1 KiB publishes out
                // to 4 subscribers delivered ~25 % fewer a second (session 43,
                // `cargo bench -p whispeer-relay --bench load -- --only "1->4"`).
                want = want.max((2 * size).min(READ_ALLOC_MAX));
            }
        }
        let mut fresh = BytesMut::with_capacity(want);
        fresh.extend_from_slice(&self.buf);
        self.alloc = Some((fresh.as_ptr() as usize, fresh.capacity()));
        self.buf = fresh;
    }

    /// The size of the allocation `buf` lives in, if the decoder made it.
    fn allocation(&mut self) -> Option<usize> {
        let (start, size) = self.alloc?;
        let at = self.buf.as_ptr() as usize;
        if at >= start && at + self.buf.capacity() <= start + size {
            Some(size)
        } else {
            // Grown or replaced behind the decoder's back.
            self.alloc = None;
            None
        }
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
    ///
    /// **Memory bound: a returned frame keeps at most twice its length allocated**, however
    /// long it is kept. A frame shares the read buffer's allocation only when it is at least
    /// half of it (a large frame, read into an allocation made for it: no copy); any other
    /// frame is copied into its own allocation of its length. Sharing a buffer keeps all of
    /// it alive while any frame cut out of it lives: a 200-byte `Pub` read together with
    /// 64 KiB of frames the relay drops (a ping flood, publishes nobody subscribes to) kept
    /// 64 KiB alive for as long as the relay held its envelope (unacknowledged, queued,
    /// stored), ~300 times what every limit counts. The copy is one `memcpy` of the frame
    /// per frame received (the frame then reaches every subscriber as that one allocation);
    /// an allocation the decoder did not make (see [`buffer_mut`](Self::buffer_mut)) counts
    /// as unknown, and its frames are all copied.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        let Some(len) = self.complete_len()? else {
            return Ok(None);
        };
        let shared = self.allocation().is_some_and(|size| 2 * len >= size);
        self.buf.advance(LEN_PREFIX);
        if shared {
            return Ok(Some(self.buf.split_to(len).freeze()));
        }
        // Copied without splitting: the buffer stays the sole owner of its allocation and
        // reuses it in place.
        let frame = Bytes::copy_from_slice(&self.buf[..len]);
        self.buf.advance(len);
        Ok(Some(frame))
    }

    /// Like [`next_frame`](Self::next_frame), for a reader that does not keep the frame:
    /// `f` reads it in place, in the read buffer (no copy, no allocation, whatever its size),
    /// and what `f` returns is returned. Frames `f` must keep are copied by `f` (or read
    /// with `next_frame`, which bounds what a kept frame holds alive).
    pub fn with_next_frame<R>(
        &mut self,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, DecodeError> {
        let Some(len) = self.complete_len()? else {
            return Ok(None);
        };
        let out = f(&self.buf[LEN_PREFIX..LEN_PREFIX + len]);
        self.buf.advance(LEN_PREFIX + len);
        Ok(Some(out))
    }

    /// The length of the next frame once all of it is buffered; `None` (room reserved for
    /// the rest) while it is not; an error for a length of zero or above the limit.
    fn complete_len(&mut self) -> Result<Option<usize>, DecodeError> {
        let Some(len) = self.pending_len() else {
            return Ok(None);
        };
        if len > self.max_frame {
            return Err(DecodeError::TooLarge {
                what: "frame",
                len,
                max: self.max_frame,
                unit: "bytes",
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
            self.reserve((LEN_PREFIX + len - self.buf.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        Ok(Some(len))
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

    /// Encodes `{0: Pong, 9: h'00…'}`: a `Pong` of `len` bytes with the padding under a key
    /// the decoder skips (a frame the relay reads and drops).
    fn padded_pong(len: usize) -> Vec<u8> {
        let mut f = vec![0xa2, 0x00, 0x0c, 0x09, 0x5a];
        f.extend_from_slice(&(len as u32 - 9).to_be_bytes());
        f.resize(len, 0);
        assert!(matches!(
            Frame::decode(&Bytes::from(f.clone())),
            Ok(Frame::Pong(_))
        ));
        let mut out = Vec::new();
        write_prefixed(&f, &mut out);
        out
    }

    fn inside(b: &[u8], start: usize, size: usize) -> bool {
        let p = b.as_ptr() as usize;
        p >= start && p < start + size
    }

    /// Review finding (pinned buffers): a 200-byte frame cut out of a 64 KiB read buffer
    /// shared it, so keeping the frame kept 64 KiB. Read as the relay reads (a reservation,
    /// then one read of everything the peer wrote at once): the small frame is copied, out
    /// of the buffer's allocation, and owns an allocation of exactly its length; the large
    /// one, most of the buffer, shares it (no copy).
    #[test]
    fn a_small_frame_does_not_share_a_large_buffer() {
        let small = encode_prefixed(&Frame::Ping(Ping { nonce: 7 }));
        let mut wire = padded_pong(60_000);
        wire.extend_from_slice(&small);
        let mut d = FrameDecoder::new(1 << 20);
        d.reserve(RESERVE_AHEAD);
        d.buffer_mut().extend_from_slice(&wire);
        let start = d.buffer_mut().as_ptr() as usize;
        let size = d.buffer_mut().capacity();
        assert!(size >= wire.len());
        let large = d.next_frame().unwrap().expect("the pong");
        assert_eq!(large.len(), 60_000);
        assert!(inside(&large, start, size), "the large frame is not copied");
        let frame = d.next_frame().unwrap().expect("the ping");
        assert_eq!(frame.len(), small.len() - LEN_PREFIX);
        assert!(
            !inside(&frame, start, size),
            "the small frame shares the {size}-byte read buffer"
        );
        drop(d);
        drop(large);
        let own = frame.try_into_mut().expect("no other owner");
        assert_eq!(
            own.capacity(),
            small.len() - LEN_PREFIX,
            "its own allocation"
        );
    }

    /// The same through `push` and small reads: frames arriving a few bytes at a time
    /// and together, of every size around the buffer's, each either copied or at least
    /// half of the allocation it shares.
    #[test]
    fn every_frame_is_copied_or_half_of_its_allocation() {
        let mut wire = Vec::new();
        let mut lens = Vec::new();
        for (i, len) in [
            20usize,
            70_000,
            9,
            300,
            40_000,
            33_000,
            5,
            1 << 17,
            64,
            3000,
        ]
        .iter()
        .cycle()
        .take(60)
        .enumerate()
        {
            let len = len + i;
            let body: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
            write_prefixed(&body, &mut wire);
            lens.push(len);
        }
        for chunk in [1usize, 7, 1000, 4096, 65_536, 200_000] {
            let mut d = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.reserve_read(piece.len().min(RESERVE_AHEAD));
                d.push(piece);
                loop {
                    let before = d.alloc;
                    let Some(f) = d.next_frame().unwrap() else {
                        break;
                    };
                    // Cut out of the buffer's allocation: at least half of it. Else copied.
                    if let Some((_, size)) = before.filter(|&(s, n)| inside(&f, s, n)) {
                        assert!(2 * f.len() >= size, "{} bytes share {size}", f.len());
                    }
                    got.push(f);
                }
            }
            assert_eq!(got.iter().map(Bytes::len).collect::<Vec<_>>(), lens);
            for (i, f) in got.iter().enumerate() {
                assert!(f.iter().enumerate().all(|(j, b)| *b == (i + j) as u8));
            }
        }
    }

    /// `with_next_frame` reads the frames `next_frame` returns, in order, from the same
    /// pieces, and refuses the same lengths.
    #[test]
    fn frames_read_in_place_are_the_frames_returned() {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (i, len) in [1usize, 300, 70_000, 9, 1 << 17, 64]
            .iter()
            .cycle()
            .take(24)
            .enumerate()
        {
            let body: Vec<u8> = (0..len + i).map(|j| (i * 7 + j) as u8).collect();
            write_prefixed(&body, &mut wire);
            want.push(body);
        }
        for chunk in [1usize, 1000, 65_536, 300_000] {
            let mut d = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.reserve_read(piece.len().min(RESERVE_AHEAD));
                d.push(piece);
                while let Some(f) = d.with_next_frame(<[u8]>::to_vec).unwrap() {
                    got.push(f);
                }
            }
            assert!(got == want, "pieces of {chunk}");
            assert_eq!(d.buffered(), 0);
        }
        let mut d = FrameDecoder::new(16);
        d.push(&17u32.to_be_bytes());
        assert!(matches!(
            d.with_next_frame(|_| ()),
            Err(DecodeError::TooLarge { len: 17, .. })
        ));
        let mut d = FrameDecoder::new(16);
        d.push(&0u32.to_be_bytes());
        assert!(matches!(
            d.with_next_frame(|_| ()),
            Err(DecodeError::Truncated { .. })
        ));
    }

    /// A `Pub` can be large while its envelope is small (60 KiB under a key the decoder
    /// skips): the envelope, which the relay keeps and counts by its own length, is copied
    /// out of the frame then; an envelope that is most of its frame (every real `Pub`)
    /// shares it.
    #[test]
    fn a_small_envelope_does_not_share_a_large_frame() {
        use crate::envelope_header::HeaderFields;
        use crate::frame::Pub;
        use crate::{Envelope, KeyId, TopicToken};
        let mut env = Vec::new();
        HeaderFields {
            flags: 0,
            key_id: KeyId::from_bytes([1; 16]),
            nonce: [7; 24],
            commit: [8; 32],
            tokens: &[TopicToken::from_bytes([2; 16])],
        }
        .write_prefix(48, &mut env);
        env.resize(env.len() + 48 + 64, 0x5a);
        let envelope = Envelope::from_bytes(Bytes::from(env)).unwrap();
        let plain = encode_prefixed(&Frame::Pub(Pub {
            envelope: envelope.clone(),
            flags: 0,
            publish_id: None,
            qos: crate::Qos::AtMostOnce,
        }))
        .slice(LEN_PREFIX..);
        // The same map with one more entry: 9 => 60,000 bytes.
        let mut padded = plain.to_vec();
        assert!((0xa1..0xb7).contains(&padded[0]), "a small map");
        padded[0] += 1;
        padded.extend_from_slice(&[0x09, 0x5a]);
        padded.extend_from_slice(&60_000u32.to_be_bytes());
        padded.resize(padded.len() + 60_000, 0);
        for (frame, shared) in [(plain, true), (Bytes::from(padded), false)] {
            let Frame::Pub(p) = Frame::decode(&frame).unwrap() else {
                panic!("a Pub");
            };
            assert_eq!(p.envelope, envelope);
            let at = p.envelope.as_bytes().as_ptr() as usize;
            let within =
                at >= frame.as_ptr() as usize && at < frame.as_ptr() as usize + frame.len();
            assert_eq!(
                within,
                shared,
                "{} bytes of {}",
                p.envelope.as_bytes().len(),
                frame.len()
            );
        }
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
