//! A read-ahead buffer under tungstenite. Its own read buffer is kept at 1 KiB
//! ([`WS_READ_BUFFER`](super::ws::WS_READ_BUFFER)) so idle WebSocket connections cost little,
//! but tungstenite reads at most that much per call: a stream of 1 KiB messages took two
//! `recvfrom` calls per message (relay CPU per delivered message over WS 6.3 µs against
//! 4.2 µs over TCP). This wrapper reads like the TCP source does — a reservation that
//! starts at 2 KiB and doubles while reads fill it, up to 64 KiB — and serves
//! tungstenite's small reads from it. It reads ahead only while a connection streams (a
//! read filled what tungstenite asked for, so more is likely waiting) and reads straight
//! into tungstenite's buffer otherwise (under a WebSocket's follower, never: there every
//! read goes through the buffer, so the follower sees bytes before tungstenite does and
//! can end a read at a large message's header, `Follower::passable`); while the socket
//! has nothing to read it holds no buffer, so an idle connection allocates nothing here.

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
        // tungstenite reads: it has made room in its buffer (`ws::own_frame`).
        follower.reading();
        // A message's fragments past a turn's worth without an event: yield first.
        if follower.poll_turn(cx).is_pending() {
            return Poll::Pending;
        }
        // Every ping read so far is handled: too many of their pongs unwritten, stop.
        follower.check_pongs()?;
        // Over the ping rate: wait until the bucket refills (the gate stalled meanwhile).
        if follower.poll_pings(cx).is_pending() {
            follower.new_turn();
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
        // Under a follower every byte passes through the buffer, where the follower sees
        // it before tungstenite does (`Follower::passable`).
        if this.buf.is_empty() && !this.streaming && this.follower.is_none() {
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
        let mut n = this.buf.len().min(out.remaining());
        if let Some(f) = &this.follower {
            n = f.passable(&this.buf[..n]);
        }
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

    /// tungstenite flushes the stream only once its write buffer is written out: the
    /// follower's pongs owed are then written.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if let (Poll::Ready(Ok(())), Some(f)) = (&r, this.follower.as_mut()) {
            f.flushed();
        }
        r
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

    /// tungstenite (the relay's configuration) over a follower, a client sending 125-byte
    /// pings on a 4 KiB pipe: the server's stream and the client's writing and, when
    /// `reads`, reading, `pings` pings. Returns the pings the server read and how its
    /// stream ended (the error, and the reason the follower gave if it failed the read).
    async fn ping_flood(
        pings: usize,
        reads: bool,
        interval: std::time::Duration,
    ) -> (usize, Option<String>) {
        use crate::transport::ws_gate::{Follower, WsGate};
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::{protocol::Role, Message};
        let (server, client) = tokio::io::duplex(4096);
        let gate = WsGate::new(None, std::net::Ipv4Addr::LOCALHOST.into());
        gate.admit();
        let mut follower = Follower::new(gate.clone(), 1 << 20);
        // The ping rate (tested on its own) would make the flood take minutes.
        follower.set_ping_interval(interval);
        follower
            .follow(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        let io = ReadAhead::new(server).following(follower);
        let config = crate::transport::ws::ws_config(1 << 20);
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
                .await;
        let (mut rx, mut tx) = tokio::io::split(client);
        let ping: Vec<u8> = [0x89u8, 0x80 | 125, 1, 2, 3, 4]
            .into_iter()
            .chain(std::iter::repeat_n(0u8, 125))
            .collect();
        let writer = tokio::spawn(async move {
            for _ in 0..pings {
                if tx.write_all(&ping).await.is_err() {
                    return;
                }
            }
            // Closed, so that the server's stream ends once it has read every ping.
            let _ = tx.shutdown().await;
            std::future::pending::<()>().await;
        });
        let reader = reads.then(|| {
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while rx.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            })
        });
        let mut read = 0;
        let end = loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_))) => read += 1,
                Some(Ok(other)) => panic!("not sent: {other:?}"),
                Some(Err(e)) => break Some(format!("{e} / {:?}", gate.failed())),
                None => break None,
            }
        };
        writer.abort();
        if let Some(r) = reader {
            r.abort();
        }
        (read, end)
    }

    /// A client that floods pings and never reads has its read failed once its pongs stop
    /// draining (about 4 KiB of them), not when tungstenite's write buffer reaches its bound
    /// (~1.2 MiB, kept for the connection's life: it read on past it); one that reads its
    /// pongs is never stopped.
    #[tokio::test]
    async fn a_ping_flood_that_never_reads_fails_within_a_few_kib_of_pongs() {
        let (read, end) = ping_flood(20_000, false, std::time::Duration::ZERO).await;
        let end = end.expect("the flood was stopped");
        assert!(end.contains("does not read"), "{end}");
        // 4 KiB of pipe, 32 unwritten pongs, one 512-byte read of pings.
        assert!(read < 4096 / 127 + 32 + 8, "{read} pings read");
        // (Its stream ends as the client's: without a close handshake.)
        let (read, end) = ping_flood(20_000, true, std::time::Duration::ZERO).await;
        assert_eq!(read, 20_000, "a client reading its pongs: {end:?}");
        assert!(end.is_none_or(|e| e.ends_with("/ None")));
    }

    /// A client that reads its pongs is held to the ping rate by waiting, never by a close:
    /// every ping is answered, paced (here at one per 2 ms past the burst).
    #[tokio::test]
    async fn a_reading_ping_flood_is_paced_not_closed() {
        use crate::transport::ws_gate::PING_BURST;
        let interval = std::time::Duration::from_millis(2);
        let started = std::time::Instant::now();
        let (read, end) = ping_flood(300, true, interval).await;
        let took = started.elapsed();
        assert_eq!(read, 300, "{end:?}");
        assert!(end.is_none_or(|e| e.ends_with("/ None")));
        let least = interval * (300 - PING_BURST - 1);
        assert!(took >= least, "{took:?} < {least:?}");
    }
}
