//! A TCP proxy between clients and a relay whose live connections can all be cut at once
//! (both directions, abruptly), to induce reconnects at chosen moments, which can swallow
//! what clients send (reporting each swallowed read), and which can stall: stop reading
//! what clients send (a link to the relay that carries nothing until resumed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

pub struct KillerProxy {
    pub addr: SocketAddr,
    pub kill: Arc<Notify>,
    /// While set, bytes from clients are swallowed (the relay never sees them).
    pub blackhole: Arc<AtomicBool>,
    /// The size of each swallowed read.
    pub swallowed: mpsc::UnboundedReceiver<usize>,
    /// While true, bytes from clients are not read (they wait in the sockets' buffers,
    /// then in the client); see [`KillerProxy::stall`].
    stalled: Arc<watch::Sender<bool>>,
    /// While set (a proxy from [`KillerProxy::start_framed`] only), a connection passes the
    /// relay's frames up to and including its next `SubOk`, and none after it: to its client
    /// the relay confirmed a subscription and then fell silent (until a cut).
    pub hold_after_sub_ok: Arc<AtomicBool>,
}

impl KillerProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_with(upstream, false).await
    }

    /// [`KillerProxy::start`], passing the relay's frames whole (parsed by their length
    /// prefix), so that [`KillerProxy::hold_after_sub_ok`] works.
    pub async fn start_framed(upstream: SocketAddr) -> Self {
        Self::start_with(upstream, true).await
    }

    async fn start_with(upstream: SocketAddr, framed: bool) -> Self {
        let hold_after_sub_ok = Arc::new(AtomicBool::new(false));
        let hold = hold_after_sub_ok.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let kill = Arc::new(Notify::new());
        let blackhole = Arc::new(AtomicBool::new(false));
        let (tx, swallowed) = mpsc::unbounded_channel();
        let stalled = Arc::new(watch::Sender::new(false));
        let (hole, k, stall) = (blackhole.clone(), kill.clone(), stalled.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(relay) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (hole, k, tx, hold) = (hole.clone(), k.clone(), tx.clone(), hold.clone());
                let mut gate = stall.subscribe();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut rr, mut rw) = relay.into_split();
                    let upstream = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            if gate.wait_for(|stalled| !*stalled).await.is_err() {
                                return;
                            }
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            // Stalled while this read waited: hold what it got too, so a
                            // stall stops everything sent after it, not all but one read.
                            if gate.wait_for(|stalled| !*stalled).await.is_err() {
                                return;
                            }
                            if hole.load(Ordering::SeqCst) {
                                let _ = tx.send(n);
                            } else if rw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Dropping both halves of both sockets cuts the connection.
                    tokio::select! {
                        _ = upstream => {}
                        _ = async {
                            if framed {
                                downstream_framed(&mut rr, &mut cw, &hold).await;
                            } else {
                                let _ = tokio::io::copy(&mut rr, &mut cw).await;
                            }
                        } => {}
                        _ = k.notified() => {}
                    }
                });
            }
        });
        KillerProxy {
            addr,
            kill,
            blackhole,
            swallowed,
            stalled,
            hold_after_sub_ok,
        }
    }

    /// Stops (`true`) or resumes (`false`) reading what clients send.
    pub fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }

    pub fn cut_all(&self) {
        self.kill.notify_waiters();
    }
}

/// Copies the relay's bytes to the client frame by frame (4-byte big-endian length prefix,
/// PROTOCOL §3.1); while `hold` is set, nothing after a `SubOk` is passed on.
async fn downstream_framed(
    rr: &mut tokio::net::tcp::OwnedReadHalf,
    cw: &mut tokio::net::tcp::OwnedWriteHalf,
    hold: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut holding = false;
    loop {
        let n = rr.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        if holding {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        let mut whole = 0;
        while pending.len() - whole >= 4 {
            let len = u32::from_be_bytes(pending[whole..whole + 4].try_into().unwrap()) as usize;
            let end = whole + 4 + len;
            if pending.len() < end {
                break;
            }
            let frame = bytes::Bytes::copy_from_slice(&pending[whole + 4..end]);
            whole = end;
            if hold.load(Ordering::SeqCst)
                && matches!(
                    whispeer::protocol::Frame::decode(&frame),
                    Ok(whispeer::protocol::Frame::SubOk(_))
                )
            {
                holding = true;
                break;
            }
        }
        if cw.write_all(&pending[..whole]).await.is_err() {
            return;
        }
        pending.drain(..whole);
    }
}
