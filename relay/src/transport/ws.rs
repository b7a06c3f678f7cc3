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
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use whispeer_protocol::codec::LEN_PREFIX;

use super::ws_gate::WsGate;
use super::{FrameSink, FrameSource, Inbound};

/// Bytes tungstenite reads per `read` call. Its read buffer is allocated at this size and
/// zero-filled on every read, so it is resident for every connection: the default (128 KiB)
/// made an idle WebSocket connection cost ~126 KiB of relay RSS. Larger frames still
/// arrive whole (the buffer grows to the frame's length); the socket itself is read in
/// large reads by [`ReadAhead`](super::read_ahead::ReadAhead) underneath, so tungstenite's
/// reads are copies out of memory: 512 B instead of 1 KiB saved 0.5 KiB per idle connection
/// and cost nothing measurable (relay CPU per 1 KiB or 16 KiB WebSocket message unchanged).
pub const WS_READ_BUFFER: usize = 512;

/// Bytes tungstenite gathers before writing to the socket (its default).
const WS_WRITE_BUFFER: usize = 128 * 1024;

/// The tungstenite configuration for a relay with this `max_frame`.
///
/// The write buffer is bounded: tungstenite answers every ping with a pong it queues in
/// that buffer whatever the socket does, and by default the buffer has no limit — a client
/// that sends pings and never reads grew the relay's memory at its upload rate (on TCP the
/// protocol's `Ping` goes through the outbound queue, which closes such a client after
/// `queue.capacity` unread replies). The relay's own writes never hold more than the
/// buffer plus one frame (the sink waits for the socket before the next). The bound does
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
            let Some(item) = self.stream.next().await else {
                self.closed = true;
                return Inbound::Closed;
            };
            return match item {
                Ok(Message::Binary(b)) if b.is_empty() => Inbound::Invalid("empty message".into()),
                // Copied: see `own_frame`.
                Ok(Message::Binary(b)) => Inbound::Frame(own_frame(b)),
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

/// A message's bytes in an allocation of their own: **a frame read over WebSocket keeps
/// exactly its length allocated** (the allocator's rounding aside), however long the relay
/// keeps it (an envelope unacknowledged, queued, stored).
///
/// tungstenite cuts a message out of its read buffer without a copy, and that buffer is
/// not ours: it grows to the largest message received and is reused in place for the next
/// ones (so a small message can sit in an allocation left by a large one), and nothing
/// tells how large the allocation behind a message is. Shared, a 200-byte `Pub` read
/// after a 60 KiB message the relay drops (a `Pong`, a publish nobody subscribes to) kept
/// the 64 KiB buffer alive for as long as the relay held its envelope, ~300 times what
/// every limit counts. So every message is copied: one `memcpy` per message received (a
/// pass over the bytes like the unmasking tungstenite has just made), none per delivery.
/// Over TCP, TLS and QUIC the frame decoder knows its buffer and copies only frames that
/// are less than half of it (`FrameDecoder::next_frame`).
fn own_frame(b: Bytes) -> Bytes {
    Bytes::copy_from_slice(&b)
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
            self.sink
                .feed(Message::Binary(f.slice(LEN_PREFIX..)))
                .await
                .map_err(io_err)?;
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
