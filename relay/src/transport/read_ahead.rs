//! A read-ahead buffer under tungstenite. Its own read buffer is kept at 1 KiB
//! ([`WS_READ_BUFFER`](super::ws::WS_READ_BUFFER)) so idle WebSocket connections cost little,
//! but tungstenite reads at most that much per call: a stream of 1 KiB messages took two
//! `recvfrom` calls per message (relay CPU per delivered message over WS 6.3 µs against
//! 4.2 µs over TCP). This wrapper reads like the TCP source does — a reservation that
//! starts at 2 KiB and doubles while reads fill it, up to 64 KiB — and serves
//! tungstenite's small reads from it. It reads ahead only while a connection streams (a
//! read filled what tungstenite asked for, so more is likely waiting) and reads straight
//! into tungstenite's buffer otherwise; while the socket has nothing to read it holds no
//! buffer, so an idle connection allocates nothing here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ws_gate::Follower;
use super::ReadHint;

/// `inner` with reads served from a buffer filled by large reads.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
    hint: ReadHint,
    /// The last direct read filled the caller's buffer: read ahead next time.
    streaming: bool,
    /// Holds a WebSocket client's messages to the size rules (`None`: bytes pass as read).
    follower: Option<Follower>,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            hint: ReadHint::new(),
            streaming: false,
            follower: None,
        }
    }

    /// Every byte read is shown to `follower` first, and reads wait while it waits for
    /// budget.
    pub fn following(mut self, follower: Follower) -> Self {
        self.follower = Some(follower);
        self
    }

    /// Whether the follower still counts the bytes as the upgrade request. Checked once
    /// tungstenite has accepted it: then the two disagree on where the frames begin, and
    /// the connection is not served (its sizes could not be followed).
    pub fn upgrade_unfinished(&self) -> bool {
        self.follower.as_ref().is_some_and(Follower::in_upgrade)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(follower) = this.follower.as_mut() else {
            return this.poll_read_ahead(cx, out);
        };
        // A message's fragments past a turn's worth without an event: yield first.
        if follower.poll_turn(cx).is_pending() {
            return Poll::Pending;
        }
        if follower.poll_budget(cx).is_pending() {
            follower.new_turn();
            return Poll::Pending;
        }
        let before = out.filled().len();
        let r = this.poll_read_ahead(cx, out);
        if let Some(f) = this.follower.as_mut() {
            match &r {
                Poll::Ready(Ok(())) => f.follow(&out.filled()[before..])?,
                // Nothing to read: the task waits, others run.
                Poll::Pending => f.new_turn(),
                Poll::Ready(Err(_)) => {}
            }
        }
        r
    }
}

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    fn poll_read_ahead(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if this.buf.is_empty() && !this.streaming {
            let want = out.remaining();
            let before = out.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, out);
            if let Poll::Ready(Ok(())) = r {
                this.streaming = want > 0 && out.filled().len() - before == want;
            }
            return r;
        }
        if this.buf.is_empty() {
            match this.hint.poll_read(&mut this.inner, cx, &mut this.buf) {
                Poll::Pending => {
                    // Drained (the reservation is given back): read directly again until
                    // the connection streams.
                    this.streaming = false;
                    this.hint = ReadHint::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                // End of stream: `out` stays unfilled, which is how EOF reads.
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every byte arrives in order through reads of any size, EOF reads as EOF, writes pass
    /// through, and an idle wait holds no buffer.
    #[tokio::test]
    async fn reads_whole_stream_in_small_reads_and_holds_nothing_while_idle() {
        let (a, mut b) = tokio::io::duplex(256 * 1024);
        let mut r = ReadAhead::new(a);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            b.write_all(&sent).await.unwrap();
            let mut back = [0u8; 5];
            b.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"hello");
            b.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        let mut ahead = false;
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            ahead |= r.buf.capacity() > 0;
        }
        assert_eq!(got, data);
        assert!(ahead, "a streaming connection reads ahead");
        r.write_all(b"hello").await.unwrap();
        r.flush().await.unwrap();
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0, "EOF reads as EOF");
        writer.await.unwrap();
        assert_eq!(r.buf.capacity(), 0);

        // Waiting on an empty socket holds no reservation.
        let (a, _keep) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(a);
        let pending = futures_util::FutureExt::now_or_never(r.read(&mut chunk));
        assert!(pending.is_none());
        assert_eq!(r.buf.capacity(), 0);
    }
}
