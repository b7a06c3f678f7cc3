//! The QUIC listener (`quic://`): each QUIC connection carries one bidirectional stream of
//! length-prefixed frames, exactly the bytes of the `tcp` listener, under TLS 1.3 (see
//! [`crate::tls::quic_server`]). QUIC adds connection migration — a client whose address
//! changes keeps its connection and its subscriptions — and no head-of-line blocking at
//! the TCP level on lossy links.
//!
//! Admission is the same as for TCP: a connection counts against its source address and
//! the global cap from its first packet, handshake included; one over a cap is refused
//! before any cryptography (QUIC `CONNECTION_REFUSED`). Unlike a TCP handshake, a QUIC
//! Initial proves nothing about its source address (UDP is trivially spoofed), so an
//! attempt from an address not yet validated is answered with a stateless Retry first
//! (RFC 9000 §8.1): only a client that receives at that address comes back with the token,
//! and only then is the address counted — spoofed Initials cannot fill an honest
//! address's places, the global cap, or get it banned for churn. One round trip more per
//! connection.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::conn;
use crate::ids::TransportKind;
use crate::rate::AddrSlot;
use crate::relay::Shared;
use crate::transport::stream::{StreamSink, StreamSource};

/// The largest send window a QUIC connection gets (quinn's default is 10 MB): at 50 ms RTT
/// one connection still moves ~40 MB/s.
pub(crate) const SEND_WINDOW_MAX: u64 = 2 << 20;
/// The smallest: granted even when `limits.quic_send_window_total` is spent (~1.3 MB/s at
/// 50 ms RTT), so a connection is slowed, never refused.
pub(crate) const SEND_WINDOW_MIN: u64 = 64 << 10;

/// How often an open QUIC connection's send window is set again to the fair share.
const REBALANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The QUIC send windows of all connections, shared out of `limits.quic_send_window_total`.
///
/// quinn keeps in the relay's own memory what the relay wrote to a connection's stream
/// and the client has not acknowledged, up to the connection's send window — outside the
/// outbound budget (`queue.total_max_bytes`, which counts what waits in the relay's
/// queues), and, unlike TCP's kernel buffers, under no system-wide limit. A client that
/// subscribes and never reads pins its whole window: 10,000 such connections at quinn's
/// default held 100 GB, at a fixed 2 MiB 20 GiB. Every connection gets the fair share —
/// the total divided by the open connections, between [`SEND_WINDOW_MIN`] and
/// [`SEND_WINDOW_MAX`] — when its handshake completes and again every
/// [`REBALANCE_EVERY`], so the windows grow back as connections close and shrink as more
/// open: together within the total (plus the floor per connection, and for a second after
/// a connection opens).
#[derive(Debug)]
pub(crate) struct SendWindows {
    /// 0 = unlimited: every connection gets [`SEND_WINDOW_MAX`].
    total: u64,
    /// Open connections holding a window.
    live: AtomicU64,
    /// Their windows, together.
    assigned: AtomicU64,
}

/// A connection's send window, given back when dropped.
#[derive(Debug)]
pub(crate) struct WindowHold {
    windows: Arc<SendWindows>,
    /// The window, in bytes.
    bytes: AtomicU64,
}

impl Drop for WindowHold {
    fn drop(&mut self) {
        self.windows.live.fetch_sub(1, Relaxed);
        self.windows
            .assigned
            .fetch_sub(self.bytes.load(Relaxed), Relaxed);
    }
}

impl WindowHold {
    /// The window, in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// The fair share now, if it is not the window this connection has (then it has it).
    pub(crate) fn rebalance(&self) -> Option<u64> {
        let w = self.windows.fair();
        let old = self.bytes.swap(w, Relaxed);
        if old == w {
            return None;
        }
        if w > old {
            self.windows.assigned.fetch_add(w - old, Relaxed);
        } else {
            self.windows.assigned.fetch_sub(old - w, Relaxed);
        }
        Some(w)
    }
}

impl SendWindows {
    pub(crate) fn new(total: u64) -> Arc<Self> {
        Arc::new(SendWindows {
            total,
            live: AtomicU64::new(0),
            assigned: AtomicU64::new(0),
        })
    }

    /// A connection's fair share with the connections open now.
    fn fair(&self) -> u64 {
        if self.total == 0 {
            return SEND_WINDOW_MAX;
        }
        (self.total / self.live.load(Relaxed).max(1)).clamp(SEND_WINDOW_MIN, SEND_WINDOW_MAX)
    }

    /// One more connection's window: its fair share.
    pub(crate) fn reserve(self: &Arc<Self>) -> WindowHold {
        self.live.fetch_add(1, Relaxed);
        let bytes = self.fair();
        self.assigned.fetch_add(bytes, Relaxed);
        WindowHold {
            windows: self.clone(),
            bytes: AtomicU64::new(bytes),
        }
    }

    /// The windows' Prometheus lines.
    pub(crate) fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP whispeer_relay_quic_send_window_bytes Send windows of open QUIC connections, together (what quinn may hold unacknowledged for them; limits.quic_send_window_total).\n\
             # TYPE whispeer_relay_quic_send_window_bytes gauge\n\
             whispeer_relay_quic_send_window_bytes {}",
            self.assigned.load(Relaxed)
        );
        o
    }
}

/// The largest receive window a QUIC connection gets (also its stream's window).
pub(crate) const RECEIVE_WINDOW_MAX: u64 = crate::tls::QUIC_RECEIVE_WINDOW as u64;
/// The smallest: what the handshake grants every connection, and what one keeps when
/// `limits.quic_receive_window_total` is spent.
pub(crate) const RECEIVE_WINDOW_MIN: u64 = crate::tls::QUIC_RECEIVE_WINDOW_MIN as u64;

/// The QUIC receive windows of all connections, shared out of
/// `limits.quic_receive_window_total`.
///
/// quinn keeps in the relay's own memory what a client sent and the relay has not read, up
/// to the connection's receive window — and the relay stops reading a connection over its
/// publish rate or waiting for an auth-state sync, so every such connection can hold its
/// whole window; unlike TCP's kernel buffers, under no system-wide limit (10,000
/// connections at a fixed 512 KiB: 5 GiB). Every connection starts at
/// [`RECEIVE_WINDOW_MIN`] (the handshake's grant) and is given its fair share — the total
/// divided by the open connections, at most [`RECEIVE_WINDOW_MAX`] — after its handshake
/// and every [`REBALANCE_EVERY`], but only out of what the others leave of the total.
///
/// Credit QUIC granted cannot be taken back: a window that shrinks (quinn's
/// `set_receive_window`) still lets the client send what it was granted, and quinn gives
/// no new credit until the relay has read the difference (its "shrink debt"). So a
/// connection's hold is its window plus that debt, and shrinks only as the relay reads
/// (counted by [`Counted`]): what the holds add up to bounds what the clients may have
/// sent unread — within the total, plus the floor per connection.
#[derive(Debug)]
pub(crate) struct ReceiveWindows {
    /// 0 = unlimited: every connection gets [`RECEIVE_WINDOW_MAX`].
    total: u64,
    state: Mutex<Receiving>,
}

/// [`ReceiveWindows`]' counts.
#[derive(Debug, Default)]
struct Receiving {
    /// Open connections holding a window.
    live: u64,
    /// Their holds (window plus shrink debt), together.
    assigned: u64,
}

/// A connection's receive window, given back when dropped.
#[derive(Debug)]
pub(crate) struct ReceiveHold {
    windows: Arc<ReceiveWindows>,
    /// Bytes the relay has read from the connection's stream (the credit quinn gives back).
    read: Arc<AtomicU64>,
    state: Mutex<Held>,
}

/// A [`ReceiveHold`]'s window.
#[derive(Debug)]
struct Held {
    /// The window quinn has (`set_receive_window`).
    window: u64,
    /// Credit granted beyond `window` that reads have not yet paid back.
    debt: u64,
    /// `read` when last seen.
    read_seen: u64,
}

impl Drop for ReceiveHold {
    fn drop(&mut self) {
        let held = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut w = self.windows.lock();
        w.live -= 1;
        w.assigned = w.assigned.saturating_sub(held.window + held.debt);
    }
}

impl ReceiveWindows {
    pub(crate) fn new(total: u64) -> Arc<Self> {
        Arc::new(ReceiveWindows {
            total,
            state: Mutex::new(Receiving::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Receiving> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection's fair share with `live` connections open.
    fn fair(&self, live: u64) -> u64 {
        if self.total == 0 {
            return RECEIVE_WINDOW_MAX;
        }
        (self.total / live.max(1)).clamp(RECEIVE_WINDOW_MIN, RECEIVE_WINDOW_MAX)
    }

    /// How far a hold of `from` may grow towards `to` with `r`'s holds as they are.
    fn grant(&self, r: &Receiving, from: u64, to: u64) -> u64 {
        if to <= from {
            return from;
        }
        if self.total == 0 {
            return to;
        }
        from + (to - from).min(self.total.saturating_sub(r.assigned))
    }

    /// One more connection's window, after its handshake (which granted
    /// [`RECEIVE_WINDOW_MIN`]): its fair share, as far as the total has room.
    pub(crate) fn reserve(self: &Arc<Self>) -> ReceiveHold {
        let mut r = self.lock();
        r.live += 1;
        let fair = self.fair(r.live);
        // The floor counts even when the total is spent (it is granted regardless).
        let window = self.grant(&r, 0, fair).max(RECEIVE_WINDOW_MIN);
        r.assigned += window;
        drop(r);
        ReceiveHold {
            windows: self.clone(),
            read: Arc::new(AtomicU64::new(0)),
            state: Mutex::new(Held {
                window,
                debt: 0,
                read_seen: 0,
            }),
        }
    }

    /// The holds of open connections, together (the gauge).
    pub(crate) fn assigned(&self) -> u64 {
        self.lock().assigned
    }

    /// The windows' Prometheus lines.
    pub(crate) fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP whispeer_relay_quic_receive_window_bytes Receive windows of open QUIC connections, together (what clients may have sent that quinn holds unread; limits.quic_receive_window_total).\n\
             # TYPE whispeer_relay_quic_receive_window_bytes gauge\n\
             whispeer_relay_quic_receive_window_bytes {}",
            self.assigned()
        );
        o
    }
}

impl ReceiveHold {
    /// The window, in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).window
    }

    /// Counts what is read from `recv` against this hold's debt.
    pub(crate) fn counted<R>(&self, recv: R) -> Counted<R> {
        Counted {
            inner: recv,
            read: self.read.clone(),
        }
    }

    /// The fair share now (or as much of it as the total has room for), if it is not the
    /// window this connection has (then it has it).
    pub(crate) fn rebalance(&self) -> Option<u64> {
        let mut held = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = self.windows.lock();
        // What was read since paid back debt (quinn gave no credit for it).
        let read = self.read.load(Relaxed);
        let paid = read.saturating_sub(held.read_seen).min(held.debt);
        held.read_seen = read;
        held.debt -= paid;
        r.assigned -= paid;
        let fair = self.windows.fair(r.live);
        let old = held.window;
        if fair < old {
            // Shrinks: the credit already granted stays with the client until read.
            held.debt += old - fair;
            held.window = fair;
        } else {
            let window = self.windows.grant(&r, old, fair);
            r.assigned += window - old;
            held.window = window;
        }
        (held.window != old).then_some(held.window)
    }
}

/// A QUIC receive stream whose reads are counted (see [`ReceiveHold`]).
#[derive(Debug)]
pub(crate) struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Relaxed);
        }
        r
    }
}

/// Sets `connection`'s send and receive windows to their fair shares every
/// [`REBALANCE_EVERY`] until it closes (or the task is aborted).
async fn rebalance(
    connection: quinn::Connection,
    window: Arc<WindowHold>,
    receive: Arc<ReceiveHold>,
) {
    let mut tick = tokio::time::interval(REBALANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = connection.closed() => return,
            _ = tick.tick() => {
                if let Some(w) = window.rebalance() {
                    connection.set_send_window(w);
                }
                if let Some(w) = receive.rebalance() {
                    connection.set_receive_window(receive_varint(w));
                }
                tracing::debug!(listener = "quic", "connection windows rebalanced");
            }
        }
    }
}

/// Accepts QUIC connections until the task is aborted (relay shutdown).
pub(crate) async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        // A source address banned for churn (`limits.addr_churn_ban_secs`): no socket
        // filter covers UDP, so its attempts are dropped here, before a Retry or any
        // state, unanswered like its SYNs on the TCP listeners (its client retries, and
        // gets in once the ban ends). Its open connections are untouched.
        if shared.addr_table.banned(incoming.remote_address().ip()) {
            incoming.ignore();
            continue;
        }
        if !incoming.remote_address_validated() && incoming.may_retry() {
            shared.metrics.quic_retry();
            // Stateless: nothing is kept for it. (`retry` fails only when a Retry is not
            // allowed, which `may_retry` ruled out.)
            let _ = incoming.retry();
            continue;
        }
        let peer = incoming.remote_address();
        match shared.addr_table.admit(peer.ip()) {
            Ok(slot) => {
                tokio::spawn(handshake(shared.clone(), incoming, slot));
            }
            Err(why) => {
                crate::relay::refused(&shared, TransportKind::Quic, &why, peer.ip());
                incoming.refuse();
            }
        }
    }
}

/// Completes the QUIC handshake and waits for the client's stream (both within
/// `hello_ms`), then serves the connection and lets its last frames reach the client.
async fn handshake(shared: Arc<Shared>, incoming: quinn::Incoming, slot: AddrSlot) {
    if !crate::relay::connect_wait(&shared, &slot).await {
        return;
    }
    let peer = incoming.remote_address();
    // One deadline for the handshake, the stream and the Hello (see `conn::serve`).
    let since = tokio::time::Instant::now();
    let opened = tokio::time::timeout_at(since + shared.config.timeouts.hello(), async {
        let connection = incoming
            .await
            .map_err(|e| format!("QUIC handshake failed: {e}"))?;
        let (send, recv) = connection
            .accept_bi()
            .await
            .map_err(|e| format!("no stream opened: {e}"))?;
        // One stream per connection: none more, where a client could park unread bytes
        // (the first one's end would otherwise grant another).
        connection.set_max_concurrent_bi_streams(0u32.into());
        // Its send window, from the relay-wide total (before anything is sent on it).
        let window = Arc::new(shared.quic_windows.reserve());
        connection.set_send_window(window.bytes());
        // And its receive window: the handshake granted the floor; now its share.
        let receive = Arc::new(shared.quic_receive_windows.reserve());
        connection.set_receive_window(receive_varint(receive.bytes()));
        Ok::<_, String>((connection, send, recv, window, receive))
    })
    .await
    .map_err(|_| "QUIC handshake timed out".to_string())
    .and_then(|r| r);
    let (connection, send, recv, window, receive) = match opened {
        Ok(x) => x,
        Err(why) => {
            tracing::debug!(%peer, listener = "quic", %why, "connection dropped during handshake");
            return;
        }
    };
    let max = shared.config.limits.max_frame;
    let rebalancer = tokio::spawn(rebalance(
        connection.clone(),
        window.clone(),
        receive.clone(),
    ));
    let slot = conn::serve(
        shared.clone(),
        StreamSource::new(receive.counted(recv), max)
            .with_budget(shared.frame_budget.clone(), slot.addr()),
        StreamSink::new(send),
        TransportKind::Quic,
        Some(peer),
        Some(slot),
        Some(since),
    )
    .await;
    // The stream is finished (our last frames are queued in QUIC): give the client the
    // drain time to read them and close, rather than cutting them off by closing now.
    // Still counted against its address (`slot`) meanwhile: a client that keeps the
    // connection open past its session must not open more beside it than its caps allow.
    let _ = tokio::time::timeout(shared.config.timeouts.drain(), connection.closed()).await;
    connection.close(0u32.into(), b"done");
    rebalancer.abort();
    let _ = rebalancer.await;
    drop(slot);
    drop(window);
    drop(receive);
}

/// A receive window as quinn takes it (at most [`RECEIVE_WINDOW_MAX`]: always fits).
fn receive_varint(w: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(w).unwrap_or(quinn::VarInt::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = RECEIVE_WINDOW_MIN;
    const MAX: u64 = RECEIVE_WINDOW_MAX;

    /// Receive windows are granted only out of what the total has left (plus the floor),
    /// and a shrunk window keeps counting the credit the client still has until the relay
    /// has read it.
    #[test]
    fn receive_windows_stay_within_the_total_and_count_credit_until_read() {
        let w = ReceiveWindows::new(2 * MAX);
        let a = w.reserve();
        let b = w.reserve();
        assert_eq!((a.bytes(), b.bytes()), (MAX, MAX));
        // The total is spent: the third gets the floor, though its fair share is 2/3 MAX.
        let c = w.reserve();
        assert_eq!(c.bytes(), MIN);
        assert_eq!(w.assigned(), 2 * MAX + MIN);
        // a shrinks to its fair share, but its client may still send its granted MAX:
        // nothing is freed for c.
        assert_eq!(a.rebalance(), Some(2 * MAX / 3));
        assert_eq!(c.rebalance(), None);
        assert_eq!(w.assigned(), 2 * MAX + MIN);
        // The relay reads a's buffer: the debt is paid, and c grows into the room.
        a.read.fetch_add(MAX, Relaxed);
        assert_eq!(a.rebalance(), None);
        assert_eq!(w.assigned(), 2 * MAX / 3 + MAX + MIN);
        assert_eq!(c.rebalance(), Some(2 * MAX - 2 * MAX / 3 - MAX));
        assert_eq!(w.assigned(), 2 * MAX);
        drop((a, b, c));
        assert_eq!(w.assigned(), 0);
        // 0 = unlimited.
        let u = ReceiveWindows::new(0);
        let holds: Vec<_> = (0..10).map(|_| u.reserve()).collect();
        assert!(holds.iter().all(|h| h.bytes() == MAX));
    }
}
