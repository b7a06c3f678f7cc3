//! In-process transport: frames as `Bytes` over tokio channels, for an embedded relay
//! (the client's in-process mode and tests) with no sockets involved.

use std::io;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{FrameSink, FrameSource, Inbound};

/// Frames sent by the in-process client.
#[derive(Debug)]
pub struct ChannelSource {
    rx: mpsc::Receiver<Bytes>,
    max_frame: usize,
    admitted: bool,
}

impl ChannelSource {
    /// Reads from `rx`, enforcing the handshake cap and then `max_frame` like the socket
    /// transports do (the frame already sits in memory here: this only keeps the rules the
    /// same).
    pub fn new(rx: mpsc::Receiver<Bytes>, max_frame: usize) -> Self {
        Self {
            rx,
            max_frame,
            admitted: false,
        }
    }

    fn limit(&self) -> usize {
        if self.admitted {
            self.max_frame
        } else {
            self.max_frame
                .min(whispeer_protocol::limits::HANDSHAKE_MAX_FRAME)
        }
    }
}

impl FrameSource for ChannelSource {
    fn admitted(&mut self) {
        self.admitted = true;
    }

    /// In-process frames arrive whole: nothing waits for budget.
    fn stalled(&self) -> bool {
        false
    }

    async fn recv(&mut self) -> Inbound {
        match self.rx.recv().await {
            None => Inbound::Closed,
            Some(f) if f.len() > self.limit() => Inbound::TooLarge { len: f.len() },
            Some(f) if f.is_empty() => Inbound::Invalid("empty frame".into()),
            Some(f) => Inbound::Frame(f),
        }
    }
}

/// Frames for the in-process client (without length prefix).
#[derive(Debug)]
pub struct ChannelSink {
    tx: mpsc::Sender<Bytes>,
}

impl ChannelSink {
    /// Writes to `tx`.
    pub fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self { tx }
    }
}

impl FrameSink for ChannelSink {
    async fn send(&mut self, frames: &[Bytes]) -> io::Result<()> {
        for f in frames {
            self.tx
                .send(f.slice(whispeer_protocol::codec::LEN_PREFIX..))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }

    async fn keepalive(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn close(&mut self) {}
}
