//! Length-prefixed frames over a byte stream (TCP or TLS): u32 big-endian length, then the
//! frame. Reading uses the protocol crate's [`FrameDecoder`], which rejects an oversized
//! prefix as soon as its 4 bytes arrive, before any buffer grows for it.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use whispeer_protocol::limits::HANDSHAKE_MAX_FRAME;
use whispeer_protocol::{DecodeError, FrameDecoder};

use super::frame_budget::{FrameBudget, Lease, FREE};
use super::{FrameSink, FrameSource, Inbound, ReadHint};

/// Bytes gathered before one `write` call; large enough to amortise syscalls, small
/// enough to keep per-connection memory bounded.
const WRITE_CHUNK: usize = 64 * 1024;

/// Reads length-prefixed frames.
pub struct StreamSource<R> {
    reader: R,
    decoder: FrameDecoder,
    /// The framing broke: later reads discard input until EOF, so the connection can end
    /// with a FIN (and our last frames arrive) instead of a reset caused by unread bytes.
    broken: bool,
    closed: bool,
    read_hint: ReadHint,
    /// The limit once the client is admitted (the handshake's is smaller).
    max_frame: usize,
    /// The relay-wide budget of large frames in progress (`None`: unlimited), and the
    /// source address whose share this connection's frames draw on.
    budget: Option<(Arc<FrameBudget>, IpAddr)>,
    /// The budget taken for the frame being received.
    held: Option<Lease>,
    /// Budget being taken for the frame whose length has arrived: kept when `recv` is
    /// cancelled (the reader polls timers too), so the frame keeps its place in line.
    taking: Option<Pin<Box<dyn Future<Output = Option<Lease>> + Send>>>,
    /// Waiting for budget: the relay, not the client, is holding this connection up.
    waiting: bool,
}

impl<R> std::fmt::Debug for StreamSource<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource")
            .field("broken", &self.broken)
            .field("closed", &self.closed)
            .field("max_frame", &self.max_frame)
            .field("held", &self.held)
            .field("waiting", &self.waiting)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> StreamSource<R> {
    /// Frames from `reader`: at most [`HANDSHAKE_MAX_FRAME`] bytes until
    /// [`FrameSource::admitted`], then at most `max_frame`.
    pub fn new(reader: R, max_frame: usize) -> Self {
        let mut decoder = FrameDecoder::new(max_frame.min(HANDSHAKE_MAX_FRAME));
        // The decoder preallocates 8 KiB; with 10,000 idle connections that is 80 MiB, so
        // start empty and grow on demand instead.
        *decoder.buffer_mut() = bytes::BytesMut::new();
        Self {
            reader,
            decoder,
            broken: false,
            closed: false,
            read_hint: ReadHint::new(),
            max_frame,
            budget: None,
            held: None,
            taking: None,
            waiting: false,
        }
    }

    /// Frames over [`FREE`](super::frame_budget::FREE) draw on `budget` while they arrive,
    /// within the share of source address `addr` (the connection's, as the per-address
    /// limits count it).
    pub fn with_budget(mut self, budget: Option<Arc<FrameBudget>>, addr: IpAddr) -> Self {
        self.budget = budget.map(|b| (b, addr));
        self
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> FrameSource for StreamSource<R> {
    async fn recv(&mut self) -> Inbound {
        loop {
            if self.closed {
                return Inbound::Closed;
            }
            if self.broken {
                let buf = self.decoder.buffer_mut();
                buf.clear();
                buf.reserve(ReadHint::MIN);
                match self.reader.read_buf(buf).await {
                    Ok(0) | Err(_) => self.closed = true,
                    Ok(_) => {}
                }
                continue;
            }
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    // Complete: its budget goes back (the frame is handled at once; what it
                    // becomes is bounded by the queues' own byte limits).
                    self.held = None;
                    return Inbound::Frame(frame);
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return match e {
                        DecodeError::TooLarge { len, .. } => Inbound::TooLarge { len },
                        other => Inbound::Invalid(other.to_string()),
                    };
                }
            }
            if self.held.is_none() {
                let len = self.decoder.pending_len().unwrap_or(0);
                if let Some((budget, addr)) = self.budget.as_ref().filter(|_| len > FREE) {
                    // Before reading the body of a large frame: cover it, or stop reading.
                    let taking = self.taking.get_or_insert_with(|| {
                        let (budget, addr) = (budget.clone(), *addr);
                        Box::pin(async move { budget.take(addr, len).await })
                    });
                    self.waiting = true;
                    self.held = taking.await;
                    self.taking = None;
                    self.waiting = false;
                    // Covered now: the rest of the frame in one allocation (the decoder
                    // reserves at most `RESERVE_AHEAD` on a bare declared length), which
                    // the frame then fills: it is not copied (`FrameDecoder::next_frame`).
                    let need = (whispeer_protocol::codec::LEN_PREFIX + len)
                        .saturating_sub(self.decoder.buffered());
                    self.decoder.reserve(need);
                }
            }
            // Idle, this holds no read buffer (10,000 idle connections: 20 MiB less).
            let (reader, decoder, hint) =
                (&mut self.reader, &mut self.decoder, &mut self.read_hint);
            let read = std::future::poll_fn(|cx| hint.poll_read(reader, cx, decoder)).await;
            if matches!(read, Ok(0) | Err(_)) {
                // A partial frame at EOF is a truncated stream: nothing to answer.
                self.closed = true;
                return Inbound::Closed;
            }
        }
    }

    fn admitted(&mut self) {
        self.decoder.set_max_frame(self.max_frame);
    }

    fn stalled(&self) -> bool {
        self.waiting
    }

    fn ready(&self) -> bool {
        !self.closed && !self.broken && self.decoder.has_frame()
    }
}

/// Writes length-prefixed frames, coalescing a batch into few large writes.
#[derive(Debug)]
pub struct StreamSink<W> {
    writer: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> StreamSink<W> {
    /// Writes to `writer`.
    pub fn new(writer: W) -> Self {
        Self {
            writer,
            buf: Vec::new(),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> StreamSink<W> {
    /// Writes `frames` from their own buffers, up to [`MAX_IOV`] of them per `writev`:
    /// gathering them into one buffer first was a copy of every byte sent (~3.5 % of the
    /// relay's CPU fanning 1 KiB messages out to 4 subscribers).
    async fn send_vectored(&mut self, frames: &[Bytes]) -> io::Result<()> {
        let mut first = 0; // the first frame not wholly written
        let mut done = 0; // bytes of frames[first] written
        while first < frames.len() {
            if frames[first].len() == done {
                // Nothing (left) to write of this frame: an empty frame, or a window of
                // only empty slices, would make `writev` return 0.
                first += 1;
                done = 0;
                continue;
            }
            let mut iov = [io::IoSlice::new(&[]); MAX_IOV];
            let mut used = 0;
            for (slot, f) in iov.iter_mut().zip(&frames[first..]) {
                let from = if used == 0 { done } else { 0 };
                *slot = io::IoSlice::new(&f[from..]);
                used += 1;
            }
            let mut n = self.writer.write_vectored(&iov[..used]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let rest = frames[first].len() - done;
                if n < rest {
                    done += n;
                    break;
                }
                n -= rest;
                first += 1;
                done = 0;
            }
        }
        self.writer.flush().await
    }
}

/// Most frames handed to one `writev` (Linux takes up to 1,024).
const MAX_IOV: usize = 64;

impl<W: AsyncWrite + Unpin + Send + 'static> FrameSink for StreamSink<W> {
    async fn send(&mut self, frames: &[Bytes]) -> io::Result<()> {
        if self.writer.is_write_vectored() {
            return self.send_vectored(frames).await;
        }
        for f in frames {
            if f.len() >= WRITE_CHUNK {
                if !self.buf.is_empty() {
                    self.writer.write_all(&self.buf).await?;
                    self.buf.clear();
                }
                self.writer.write_all(f).await?;
                continue;
            }
            self.buf.extend_from_slice(f);
            if self.buf.len() >= WRITE_CHUNK {
                self.writer.write_all(&self.buf).await?;
                self.buf.clear();
            }
        }
        if !self.buf.is_empty() {
            self.writer.write_all(&self.buf).await?;
            self.buf.clear();
        }
        if self.buf.capacity() > 2 * WRITE_CHUNK {
            self.buf.shrink_to(WRITE_CHUNK);
        }
        self.writer.flush().await
    }

    async fn keepalive(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn close(&mut self) {
        let _ = self.writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A batch larger than the socket takes at once goes out through several partial
    /// `writev`s (more frames than one call carries, frames cut mid-way, empty ones among
    /// them) and arrives byte for byte, in order, over a real TCP connection.
    #[tokio::test]
    async fn vectored_writes_resume_after_partial_writes() {
        // Small socket buffers at both ends: writes end mid-frame.
        let l = tokio::net::TcpSocket::new_v4().unwrap();
        l.set_recv_buffer_size(4096).unwrap();
        l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = l.listen(8).unwrap();
        let addr = listener.local_addr().unwrap();
        let c = tokio::net::TcpSocket::new_v4().unwrap();
        c.set_send_buffer_size(4096).unwrap();
        let (sender, accepted) = tokio::join!(c.connect(addr), listener.accept());
        let mut reader = accepted.unwrap().0;
        let (_r, w) = sender.unwrap().into_split();
        let mut sink = StreamSink::new(w);
        assert!(sink.writer.is_write_vectored(), "TCP writes are vectored");
        // 300 frames of 0..=9,000 bytes (~1.3 MiB, beyond a loopback socket's buffers, so
        // the writer waits for the reader mid-batch), each byte naming its frame and place.
        let frames: Vec<Bytes> = (0..300u32)
            .map(|i| {
                let len = if i % 7 == 3 { 0 } else { (i * 7_919) % 9_001 };
                Bytes::from((0..len).map(|j| (i * 31 + j) as u8).collect::<Vec<u8>>())
            })
            .collect();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert!(want.len() > 1 << 20);
        let read = tokio::spawn(async move {
            let mut got = vec![0u8; want.len()];
            let mut at = 0;
            while at < got.len() {
                // Small reads: the writer sees its socket fill up many times.
                let end = (at + 3_000).min(got.len());
                let n = reader.read(&mut got[at..end]).await.unwrap();
                assert!(n > 0, "connection closed after {at} bytes");
                at += n;
            }
            assert!(got == want, "the bytes arrived changed or out of order");
        });
        let both = async {
            // Empty frames alone, more than one writev's worth of them, write nothing and
            // succeed.
            sink.send(&vec![Bytes::new(); 3 * MAX_IOV]).await.unwrap();
            sink.send(&frames).await.unwrap();
            read.await.unwrap();
        };
        // A lost or repeated byte leaves the reader waiting: fail instead of hanging.
        tokio::time::timeout(std::time::Duration::from_secs(30), both)
            .await
            .expect("the reader got all the bytes within 30 s");
    }

    /// Waiting for input holds no read buffer; frames still arrive whole afterwards, and a
    /// partial frame is kept across the wait.
    #[tokio::test]
    async fn an_idle_source_holds_no_read_buffer() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let mut src = StreamSource::new(a, 1 << 20);
        assert!(src.recv().now_or_never().is_none(), "nothing to read yet");
        assert_eq!(
            src.decoder.buffer_mut().capacity(),
            0,
            "idle: no reservation"
        );
        // Half a frame: kept while waiting for the rest.
        b.write_all(&[0, 0, 0, 3, 7]).await.unwrap();
        assert!(src.recv().now_or_never().is_none());
        assert!(
            src.decoder.buffer_mut().capacity() > 0,
            "a partial frame is kept"
        );
        b.write_all(&[8, 9]).await.unwrap();
        match src.recv().await {
            Inbound::Frame(f) => assert_eq!(&f[..], &[7, 8, 9]),
            other => panic!("expected a frame, got {other:?}"),
        }
        assert!(src.recv().now_or_never().is_none());
        assert_eq!(src.decoder.buffer_mut().capacity(), 0, "idle again");
    }
}
