//! WebSocket transport: one binary message is one frame. Text messages are a protocol
//! violation; ping/pong count as liveness; a message above `max_frame` is refused by
//! tungstenite before it is buffered (its size limits are set from `max_frame`).

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use whispeer_protocol::codec::LEN_PREFIX;

use super::ws_gate::WsGate;
use super::{FrameSink, FrameSource, Inbound};

/// Bytes tungstenite reads per `read` call. Its read buffer is allocated at this size and
/// zero-filled on every read, so it is resident for every connection: the default (128 KiB)
/// made an idle WebSocket connection cost ~126 KiB of relay RSS. Larger frames still
/// arrive whole (the buffer grows to the frame's length, and a large message leaves it
/// with the relay: see `WsSource::own_frame`); the socket itself is read in
/// large reads by [`ReadAhead`](super::read_ahead::ReadAhead) underneath, so tungstenite's
/// reads are copies out of memory: 512 B instead of 1 KiB saved 0.5 KiB per idle connection
/// and cost nothing measurable (relay CPU per 1 KiB or 16 KiB WebSocket message unchanged).
pub const WS_READ_BUFFER: usize = 512;

/// Bytes tungstenite gathers before writing to the socket. Its write buffer is a `Vec`
/// it empties with `drain` and never shrinks: it keeps, for the connection's life, the most
/// it ever held — this plus one frame ([`WS_FRAGMENT`]) plus a pong. 32 KiB still writes
/// in large `write` calls (tungstenite's default, 128 KiB, kept 128 KiB plus the largest
/// message sent).
pub const WS_WRITE_BUFFER: usize = 32 * 1024;

/// The largest WebSocket frame the relay sends: a larger message goes out as a binary
/// frame and continuation frames of this size (RFC 6455 §5.4; every client reassembles
/// them: tungstenite, browsers, Node's `ws`), so tungstenite's write buffer, which takes
/// each frame whole, never holds more than [`WS_WRITE_BUFFER`] plus this (before, it grew
/// to the largest message sent, and kept it), and a partial write moves at most that much.
pub const WS_FRAGMENT: usize = 32 * 1024;

/// Messages received of at least this many bytes are kept in the allocation tungstenite
/// read them into; smaller ones are copied (see `own_frame`).
pub const KEEP_AT_LEAST: usize = 4 * 1024;

/// The tungstenite configuration for a relay with this `max_frame`.
///
/// The write buffer is bounded: tungstenite answers every ping with a pong it queues in
/// that buffer whatever the socket does, and by default the buffer has no limit — a client
/// that sends pings and never reads grew the relay's memory at its upload rate (on TCP the
/// protocol's `Ping` goes through the outbound queue, which closes such a client after
/// `queue.capacity` unread replies). The relay's own writes never hold more than the
/// buffer plus one frame of at most [`WS_FRAGMENT`] (the sink waits for the socket before
/// the next). The bound does
/// not stop a ping flood by itself: at it tungstenite keeps the pong back and reads on,
/// the buffer (a 2 MiB allocation by then) kept. The follower under tungstenite stops the
/// flood long before (at ~4 KiB of unwritten pongs, see
/// [`ws_gate`](super::ws_gate)); this bound is the last line.
pub fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_WRITE_BUFFER + max_frame + 64 * 1024)
}

/// Splits an accepted WebSocket into a frame source and sink; `gate` is the one the
/// stream's [`Gated`](super::ws_gate::Gated) layer reports to.
pub fn split<S>(ws: WebSocketStream<S>, gate: Arc<WsGate>) -> (WsSource<S>, WsSink<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    (
        WsSource {
            stream,
            closed: false,
            gate,
            pinned: None,
        },
        WsSink { sink },
    )
}

/// Reads binary messages as frames.
#[derive(Debug)]
pub struct WsSource<S> {
    stream: SplitStream<WebSocketStream<S>>,
    closed: bool,
    gate: Arc<WsGate>,
    /// The last large message handed over, held until tungstenite has read again (see
    /// `own_frame`).
    pinned: Option<Bytes>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> FrameSource for WsSource<S> {
    /// tungstenite's own limit stays `max_frame`; the gate under it stops enforcing the
    /// handshake cap.
    fn admitted(&mut self) {
        self.gate.admit();
    }

    fn stalled(&self) -> bool {
        self.gate.stalled()
    }

    async fn recv(&mut self) -> Inbound {
        loop {
            if self.closed {
                return Inbound::Closed;
            }
            let item = std::future::poll_fn(|cx| {
                let item = self.stream.poll_next_unpin(cx);
                // tungstenite read again: it left the pinned message's allocation (see
                // `own_frame`).
                if self.pinned.is_some() && self.gate.take_read() {
                    self.pinned = None;
                }
                item
            })
            .await;
            let Some(item) = item else {
                self.closed = true;
                return Inbound::Closed;
            };
            return match item {
                Ok(Message::Binary(b)) if b.is_empty() => Inbound::Invalid("empty message".into()),
                Ok(Message::Binary(b)) => Inbound::Frame(self.own_frame(b)),
                Ok(Message::Text(_)) => Inbound::Text,
                // Between a message's fragments a ping is no sign of life (see
                // `WsGate::partial`).
                Ok(Message::Ping(_) | Message::Pong(_)) if self.gate.partial() => continue,
                Ok(Message::Ping(_) | Message::Pong(_)) => Inbound::Alive,
                Ok(Message::Frame(_)) => continue,
                Ok(Message::Close(_)) => {
                    self.closed = true;
                    Inbound::Closed
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. })) => {
                    self.closed = true;
                    Inbound::TooLarge { len: size }
                }
                Err(WsError::Protocol(p)) => {
                    self.closed = true;
                    Inbound::Invalid(p.to_string())
                }
                Err(_) => {
                    self.closed = true;
                    match (self.gate.refused(), self.gate.failed()) {
                        (Some(len), _) => Inbound::TooLarge { len },
                        (None, Some(why)) => Inbound::Invalid(why.to_owned()),
                        (None, None) => Inbound::Closed,
                    }
                }
            };
        }
    }
}

impl<S> WsSource<S> {
    /// A message received, in an allocation that holds little more than its bytes:
    /// **a message of at least [`KEEP_AT_LEAST`] bytes keeps the allocation tungstenite read
    /// it into, which it fills (plus at most a few KiB where tungstenite's buffer already
    /// had room for it); a smaller one is copied into one of exactly its length** — however
    /// long the relay keeps it (an envelope unacknowledged, queued, stored) — and
    /// tungstenite's read buffer keeps only what small messages needed.
    ///
    /// tungstenite reads into a `BytesMut` and cuts each message out of it
    /// (`split_to(len)` + `freeze`, no copy); when it next makes room (`reserve`) and is the
    /// only holder of its allocation, it takes the whole allocation back and reuses it. So
    /// a message that was only ever shared made tungstenite's buffer keep the largest
    /// message received for the connection's life (~1 MiB per idle connection after one
    /// 1 MiB publish), and a small message cut out of a large buffer kept that buffer alive
    /// as long as the relay held the message (a 200-byte `Pub` after a 60 KiB message
    /// pinned 64 KiB). Now:
    ///
    /// - Small messages are copied (one `memcpy`, a pass like the unmasking tungstenite
    ///   has just made): they hold nothing of tungstenite's buffer.
    /// - A large message's header reaches tungstenite with none of its payload behind it
    ///   (the follower ends the read there: `Follower::passable`), so tungstenite makes
    ///   room for exactly its payload, and the message cut out leaves no room in that
    ///   allocation. The source keeps a clone of the message until tungstenite reads again
    ///   (`WsGate::take_read`): it makes room before every read, and while the allocation
    ///   is shared `bytes` gives it a new one (of its small original capacity: `reserve` on
    ///   a shared `BytesMut` allocates `max(needed, original capacity)`, the original
    ///   capacity capped at 64 KiB and here the handshake's few KiB) instead of taking the
    ///   message's back. The message's allocation is then the relay's alone and is freed
    ///   when the relay drops the message.
    ///
    /// A fragmented message is gathered by tungstenite in a `Vec` of its own (up to twice
    /// its length, by doubling; over TCP a frame kept uncopied may hold up to twice its
    /// length too, `FrameDecoder::next_frame`). Its fragments still pass through the read
    /// buffer, which may keep the largest fragment's size (see relay/README.md, "WebSocket
    /// buffers").
    fn own_frame(&mut self, b: Bytes) -> Bytes {
        if b.len() < KEEP_AT_LEAST {
            return Bytes::copy_from_slice(&b);
        }
        self.pinned = Some(b.clone());
        self.gate.take_read();
        b
    }
}

/// Writes frames as binary messages: `feed` each, `flush` once per batch.
#[derive(Debug)]
pub struct WsSink<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

fn io_err(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> FrameSink for WsSink<S> {
    async fn send(&mut self, frames: &[Bytes]) -> io::Result<()> {
        for f in frames {
            let body = f.slice(LEN_PREFIX..);
            if body.len() <= WS_FRAGMENT {
                self.sink
                    .feed(Message::Binary(body))
                    .await
                    .map_err(io_err)?;
                continue;
            }
            // Fragmented (see `WS_FRAGMENT`): a binary frame, then continuation frames, the
            // last one final. tungstenite writes `Message::Frame` as given (unmasked, as a
            // server's frames are); a pong it owes may go between them (RFC 6455 §5.4).
            let mut at = 0;
            while at < body.len() {
                let end = (at + WS_FRAGMENT).min(body.len());
                let opcode = OpCode::Data(if at == 0 {
                    OpData::Binary
                } else {
                    OpData::Continue
                });
                let frame = Frame::message(body.slice(at..end), opcode, end == body.len());
                self.sink
                    .feed(Message::Frame(frame))
                    .await
                    .map_err(io_err)?;
                at = end;
            }
        }
        self.sink.flush().await.map_err(io_err)
    }

    async fn keepalive(&mut self) -> io::Result<()> {
        self.sink
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(io_err)
    }

    async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}
