//! Transports: where frames come from and go to. The connection logic is generic over a
//! [`FrameSource`] and a [`FrameSink`], so WebSocket, length-prefixed streams (TCP, TLS)
//! and in-process channels share one implementation of the protocol.
//!
//! - [`stream`] — u32-BE length-prefixed frames over any byte stream (TCP, TLS).
//! - [`ws`] — one binary WebSocket message per frame.
//! - [`channel`] — in-process `mpsc` channels of frame bytes (embedded relay, no sockets).
//! - [`read_ahead`] — large socket reads under tungstenite's small ones.

pub mod channel;
pub mod frame_budget;
pub mod read_ahead;
pub mod stream;
pub mod ws;
pub mod ws_gate;

use std::future::Future;
use std::io;

use bytes::Bytes;
use whispeer_protocol::FrameDecoder;

/// How much to reserve for the next socket read: reads start small (idle connections keep
/// little memory) and double while reads fill the space, for streaming publishers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadHint(usize);

impl ReadHint {
    /// Smallest reservation.
    pub(crate) const MIN: usize = 2 * 1024;
    /// Largest reservation.
    pub(crate) const MAX: usize = 64 * 1024;

    pub(crate) fn new() -> Self {
        ReadHint(Self::MIN)
    }

    /// A read of `n` bytes into `spare` bytes of room: double when it filled them, halve
    /// otherwise.
    fn update(&mut self, n: usize, spare: usize) {
        self.0 = if n >= spare {
            (self.0 * 2).min(Self::MAX)
        } else {
            (self.0 / 2).max(Self::MIN)
        };
    }

    /// Reads from `reader` into `buf` after reserving the hint, and adapts the hint to how
    /// much came. While nothing can be read, an empty `buf` gives its reservation back: an
    /// idle connection holds no read buffer (~2 KiB of RSS each).
    pub(crate) fn poll_read<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        cx: &mut std::task::Context<'_>,
        buf: &mut impl ReadBuffer,
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        buf.reserve_for_read(self.0);
        let buf = buf.bytes_mut();
        let spare = buf.capacity() - buf.len();
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(reader), cx, buf) {
            Poll::Pending => {
                if buf.is_empty() {
                    *buf = bytes::BytesMut::new();
                }
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                self.update(n, spare);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

/// A buffer socket reads go into: a plain `BytesMut`, or a [`FrameDecoder`]'s, which makes
/// room itself (it keeps track of its allocation, so that frames it cuts out of it keep at
/// most twice their length alive: [`FrameDecoder::next_frame`]).
pub(crate) trait ReadBuffer {
    /// Makes room for `n` more bytes (the decoder may make less, but never none).
    fn reserve_for_read(&mut self, n: usize);
    /// The buffer to read into.
    fn bytes_mut(&mut self) -> &mut bytes::BytesMut;
}

impl ReadBuffer for bytes::BytesMut {
    fn reserve_for_read(&mut self, n: usize) {
        self.reserve(n);
    }
    fn bytes_mut(&mut self) -> &mut bytes::BytesMut {
        self
    }
}

impl ReadBuffer for FrameDecoder {
    fn reserve_for_read(&mut self, n: usize) {
        self.reserve_read(n);
    }
    fn bytes_mut(&mut self) -> &mut bytes::BytesMut {
        self.buffer_mut()
    }
}

/// What a transport read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Inbound {
    /// One complete frame (without transport framing).
    Frame(Bytes),
    /// Transport-level liveness (a WebSocket ping or pong): resets the idle timer.
    Alive,
    /// A WebSocket text message (the protocol is binary-only).
    Text,
    /// A frame larger than `max_frame` was announced or received.
    TooLarge {
        /// Declared or received size.
        len: usize,
    },
    /// The transport framing itself is broken (e.g. a zero length prefix).
    Invalid(String),
    /// The peer closed the stream or it failed; nothing more will be read.
    Closed,
}

/// A stream of inbound frames.
pub trait FrameSource: Send + 'static {
    /// The next event. After `Closed`, keeps returning `Closed`.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;
    /// The client is admitted (`Welcome` sent): frames up to `max_frame` from now on.
    /// Until then a source refuses frames over
    /// [`HANDSHAKE_MAX_FRAME`](whispeer_protocol::limits::HANDSHAKE_MAX_FRAME) before
    /// buffering them, so a stranger cannot park a partial `max_frame` in the relay's
    /// memory for the hello timeout.
    fn admitted(&mut self);
    /// Whether the last `recv` was waiting for relay-side budget rather than for the peer
    /// ([`frame_budget`]): the idle timer does not count that time against the client.
    fn stalled(&self) -> bool;
    /// Whether the next `recv` returns a frame already buffered, without waiting. The reader
    /// delays waking subscribers' writers while this holds (within a turn); `false`, the
    /// default, wakes them after every frame.
    fn ready(&self) -> bool {
        false
    }
}

/// Where outbound frames are written. Frames are handed over *with* their 4-byte length
/// prefix (see `outbound`); message-oriented transports send `frame.slice(4..)`.
pub trait FrameSink: Send + 'static {
    /// Writes a batch of frames and flushes once.
    fn send(&mut self, frames: &[Bytes]) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends a transport-level keepalive if the transport has one (WebSocket ping).
    fn keepalive(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the write side (WebSocket close frame, TLS close_notify, TCP FIN).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}
