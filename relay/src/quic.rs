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
/// connections at a fixed 512 KiB: 5 GiB).
///
/// Every connection starts at [`RECEIVE_WINDOW_MIN`], the floor (the handshake's grant,
/// which every connection gets regardless), and its window follows its use: every
/// [`REBALANCE_EVERY`], a connection the relay read at least half its window from since its
/// last rebalance (busy) has it doubled, up to its fair share — the floor plus the total
/// divided by the busy connections, at most [`RECEIVE_WINDOW_MAX`] — as far as the total
/// has room; one that was not (idle) has it halved, down to the floor. The total bounds
/// what the holds add above their floors (the floors are granted anyway). Windows used to
/// be shared out by the open connections, each taking its share at once and keeping it:
/// idle connections (a subscriber sends almost nothing) held the total for life — 512 idle
/// connections kept every later connection at the floor (~320 KB/s at 100 ms RTT) with
/// almost nothing buffered — and with the floors counted in the total, 8,192 connections
/// at the floor left nothing to grow into. A window is per round trip and the judgement
/// per second, so a connection the relay reads as fast as its client sends (up to 2 s RTT)
/// is busy at any window, the floor included.
///
/// Credit QUIC granted cannot be taken back: a window that shrinks (quinn's
/// `set_receive_window`) still lets the client send what it was granted, and quinn gives
/// no new credit until the relay has read the difference (its "shrink debt"). So a
/// connection's hold is its window plus that debt, and the debt goes only as the relay
/// reads (counted by [`Counted`]): a connection that was busy and went quiet keeps its
/// unused credit as debt until it sends it. What the holds add up to bounds what the
/// clients may have sent unread: at most the total plus the floor per open connection.
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
    /// Those busy at their last rebalance (the fair share divides the total among them).
    busy: u64,
    /// Their holds (window plus shrink debt), together: at least the floor each, and
    /// within the total plus the floor each.
    assigned: u64,
    /// Their shrink debts, together (part of `assigned`).
    debt: u64,
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
    /// Counted in [`Receiving::busy`].
    busy: bool,
}

impl Drop for ReceiveHold {
    fn drop(&mut self) {
        let held = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut w = self.windows.lock();
        w.live -= 1;
        w.busy -= u64::from(held.busy);
        w.debt -= held.debt;
        w.assigned -= held.window + held.debt;
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

    /// A busy connection's fair share with `busy` busy connections: the floor and its part
    /// of the total.
    fn fair(&self, busy: u64) -> u64 {
        if self.total == 0 {
            return RECEIVE_WINDOW_MAX;
        }
        RECEIVE_WINDOW_MIN
            .saturating_add(self.total / busy.max(1))
            .min(RECEIVE_WINDOW_MAX)
    }

    /// How far a hold of `from` may grow towards `to` with `r`'s holds as they are: the
    /// total bounds the holds above the floors.
    fn grant(&self, r: &Receiving, from: u64, to: u64) -> u64 {
        if to <= from {
            return from;
        }
        if self.total == 0 {
            return to;
        }
        let above = r.assigned.saturating_sub(r.live * RECEIVE_WINDOW_MIN);
        from + (to - from).min(self.total.saturating_sub(above))
    }

    /// One more connection's window, after its handshake: the floor the handshake granted,
    /// or with no total [`RECEIVE_WINDOW_MAX`].
    pub(crate) fn reserve(self: &Arc<Self>) -> ReceiveHold {
        let window = if self.total == 0 {
            RECEIVE_WINDOW_MAX
        } else {
            RECEIVE_WINDOW_MIN
        };
        let mut r = self.lock();
        r.live += 1;
        r.assigned += window;
        drop(r);
        ReceiveHold {
            windows: self.clone(),
            read: Arc::new(AtomicU64::new(0)),
            state: Mutex::new(Held {
                window,
                debt: 0,
                read_seen: 0,
                busy: false,
            }),
        }
    }

    /// The holds of open connections, together (the gauge).
    #[cfg(test)]
    fn assigned(&self) -> u64 {
        self.lock().assigned
    }

    /// The windows' Prometheus lines.
    pub(crate) fn render_prometheus(&self) -> String {
        let r = self.lock();
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP whispeer_relay_quic_receive_window_bytes Receive windows of open QUIC connections, together, with credit granted before a window shrank and not yet read (what clients may have sent that quinn holds unread; limits.quic_receive_window_total).\n\
             # TYPE whispeer_relay_quic_receive_window_bytes gauge\n\
             whispeer_relay_quic_receive_window_bytes {}\n\
             # HELP whispeer_relay_quic_receive_window_debt_bytes Of whispeer_relay_quic_receive_window_bytes, the credit granted before a window shrank and not yet read.\n\
             # TYPE whispeer_relay_quic_receive_window_debt_bytes gauge\n\
             whispeer_relay_quic_receive_window_debt_bytes {}\n\
             # HELP whispeer_relay_quic_receive_windows_busy Open QUIC connections the relay read at least half their receive window from in their last second (their windows grow).\n\
             # TYPE whispeer_relay_quic_receive_windows_busy gauge\n\
             whispeer_relay_quic_receive_windows_busy {}",
            r.assigned, r.debt, r.busy
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

    /// The window this connection's use since its last rebalance earns (see
    /// [`ReceiveWindows`]), if it is not the one it has (then it has it).
    pub(crate) fn rebalance(&self) -> Option<u64> {
        let mut held = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = self.windows.lock();
        // What was read since pays back debt first (quinn gave no credit for it).
        let read = self.read.load(Relaxed);
        let since = read.saturating_sub(held.read_seen);
        let paid = since.min(held.debt);
        held.read_seen = read;
        held.debt -= paid;
        r.debt -= paid;
        r.assigned -= paid;
        if self.windows.total == 0 {
            return None;
        }
        let old = held.window;
        // Busy: read at least half the window it had (a connection at the floor can be,
        // many times over: its window is per round trip, this is per second).
        let busy = since >= old / 2;
        if busy != held.busy {
            if busy {
                r.busy += 1;
            } else {
                r.busy -= 1;
            }
            held.busy = busy;
        }
        let fair = self.windows.fair(r.busy);
        let target = if busy {
            old.saturating_mul(2).min(fair)
        } else {
            (old / 2).clamp(RECEIVE_WINDOW_MIN, fair)
        };
        if target < old {
            // Shrinks: the credit already granted stays with the client until read.
            held.debt += old - target;
            r.debt += old - target;
            held.window = target;
        } else {
            let window = self.windows.grant(&r, old, target);
            r.assigned += window - old;
            held.window = window;
        }
        (held.window != old).then_some(held.window)
    }

    /// Whether the connection was busy at its last rebalance.
    fn busy(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).busy
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

/// Sets `connection`'s send window to its fair share and its receive window to what its
/// use earns (see [`ReceiveWindows`]) every [`REBALANCE_EVERY`] until it closes (or the
/// task is aborted).
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
                tracing::debug!(
                    peer = %connection.remote_address(),
                    listener = "quic",
                    receive_window = receive.bytes(),
                    busy = receive.busy(),
                    "connection windows rebalanced"
                );
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
                // No stream to send an `Err` on before the handshake: refused at the QUIC
                // level (CONNECTION_REFUSED), counted as unanswered.
                shared.metrics.refused_unanswered();
                incoming.refuse();
            }
        }
    }
}

/// Completes the QUIC handshake and waits for the client's stream (both within
/// `hello_ms`), then serves the connection and lets its last frames reach the client.
async fn handshake(shared: Arc<Shared>, incoming: quinn::Incoming, slot: AddrSlot) {
    if crate::relay::unless_evicted(slot.ticket(), crate::relay::connect_wait(&shared, &slot)).await
        != Ok(true)
    {
        return;
    }
    let peer = incoming.remote_address();
    // One deadline for the handshake, the stream and the Hello (see `conn::serve`).
    let since = tokio::time::Instant::now();
    let ticket = slot.ticket().clone();
    let opened = crate::relay::unless_evicted(
        &ticket,
        tokio::time::timeout_at(since + shared.config.timeouts.hello(), async {
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
            // And its receive window: the floor the handshake granted, to grow with use.
            let receive = Arc::new(shared.quic_receive_windows.reserve());
            connection.set_receive_window(receive_varint(receive.bytes()));
            Ok::<_, String>((connection, send, recv, window, receive))
        }),
    )
    .await
    .and_then(|r| r.map_err(|_| "QUIC handshake timed out".to_string()))
    .and_then(|r| r);
    let (connection, send, recv, window, receive) = match opened {
        Ok(x) => x,
        Err(why) => {
            // Escaped (`?`): quinn's errors carry the peer's close reason as it came.
            tracing::debug!(%peer, listener = "quic", ?why, "connection dropped during handshake");
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
    // An evicted connection (its place taken by a newer one, its socket lingering beyond
    // `max_connections`) gets `EVICTED_CLOSE` only, not the drain — also when it is
    // evicted during the drain (one not yet welcomed stays evictable: after a Hello
    // timeout, a refused Hello): the drain is then cut to `EVICTED_CLOSE` from the
    // eviction, if that is sooner.
    let evicted_close = crate::handshakes::EVICTED_CLOSE.min(shared.config.timeouts.drain());
    let drain = if ticket.is_evicted() {
        evicted_close
    } else {
        shared.config.timeouts.drain()
    };
    let _ = tokio::time::timeout(drain, async {
        tokio::select! {
            _ = connection.closed() => {}
            () = ticket.evicted() => {
                let _ = tokio::time::timeout(evicted_close, connection.closed()).await;
            }
        }
    })
    .await;
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

    /// Windows follow use: a connection starts at the floor, doubles while the relay reads
    /// at least half its window between rebalances (up to the floor plus its part of the
    /// total among busy connections, and only out of what the total has left above the
    /// floors), halves while idle; a shrunk window keeps counting the credit the client still
    /// has until the relay has read it.
    #[test]
    fn receive_windows_follow_use_within_the_total_and_count_credit_until_read() {
        // Room above the floors for two windows at the max.
        let total = 2 * (MAX - MIN);
        let w = ReceiveWindows::new(total);
        // Idle connections hold the floor, however many came first, and never grow.
        let idle: Vec<_> = (0..3).map(|_| w.reserve()).collect();
        let a = w.reserve();
        let b = w.reserve();
        for h in idle.iter().chain([&a, &b]) {
            assert_eq!(h.bytes(), MIN);
            assert_eq!(h.rebalance(), None);
        }
        assert_eq!(w.assigned(), 5 * MIN);
        // a is read its window every second: it doubles up to the max (the only busy
        // connection: its fair share is the floor plus the whole total).
        let mut sizes = Vec::new();
        for _ in 0..6 {
            a.read.fetch_add(a.bytes(), Relaxed);
            sizes.extend(a.rebalance());
        }
        assert_eq!(sizes, [2 * MIN, 4 * MIN, 8 * MIN, MAX]);
        assert_eq!(MAX, 16 * MIN);
        // Less than half its window read: not busy, no growth.
        b.read.fetch_add(MIN / 2 - 1, Relaxed);
        assert_eq!(b.rebalance(), None);
        // Both busy: b grows to its fair share (the floor plus half the total: the max).
        for _ in 0..4 {
            for h in [&a, &b] {
                h.read.fetch_add(h.bytes(), Relaxed);
                h.rebalance();
            }
        }
        assert_eq!((a.bytes(), b.bytes()), (MAX, MAX));
        assert_eq!(w.assigned(), total + 5 * MIN);
        assert_eq!(w.lock().busy, 2);
        // The total is spent: a third busy connection stays at the floor...
        let c = &idle[0];
        c.read.fetch_add(MIN, Relaxed);
        assert_eq!(c.rebalance(), None);
        // ...and so while a goes idle: it halves, but its client may still send its
        // granted MAX: nothing is freed for c.
        assert_eq!(a.rebalance(), Some(MAX / 2));
        assert_eq!(w.lock().debt, MAX / 2);
        c.read.fetch_add(MIN, Relaxed);
        assert_eq!(c.rebalance(), None);
        assert_eq!(w.assigned(), total + 5 * MIN);
        // Idle, a goes on halving to the floor, all of it debt while its client sends
        // nothing.
        assert_eq!(a.rebalance(), Some(MAX / 4));
        assert_eq!(a.rebalance(), Some(MAX / 8));
        assert_eq!(a.rebalance(), Some(MIN));
        assert_eq!(a.rebalance(), None);
        assert_eq!(w.lock().debt, MAX - MIN);
        assert_eq!(w.assigned(), total + 5 * MIN);
        // Its client sends its credit and the relay reads it: the debt is paid, and that
        // was use: a is busy again and doubles.
        a.read.fetch_add(MAX - MIN, Relaxed);
        assert_eq!(a.rebalance(), Some(2 * MIN));
        assert_eq!(w.lock().debt, 0);
        assert_eq!(w.assigned(), MAX + 5 * MIN);
        // c grows into the room, up to its share with three busy (a, b, c): the floor plus
        // a third of the total.
        for want in [2 * MIN, 4 * MIN, 8 * MIN, MIN + total / 3] {
            c.read.fetch_add(c.bytes(), Relaxed);
            assert_eq!(c.rebalance(), Some(want));
        }
        assert_eq!(w.assigned(), MAX + 15 * MIN);
        drop((a, b, idle));
        assert_eq!(w.assigned(), 0);
        let r = w.lock();
        assert_eq!((r.busy, r.debt, r.live), (0, 0, 0));
        drop(r);
        // 0 = unlimited: the max at once, kept.
        let u = ReceiveWindows::new(0);
        let holds: Vec<_> = (0..10).map(|_| u.reserve()).collect();
        assert!(holds
            .iter()
            .all(|h| h.bytes() == MAX && h.rebalance().is_none()));
    }

    /// quinn's connection-level flow control as `set_receive_window` and reads drive it
    /// (quinn-proto's `StreamsState`): the credit given, and the shrink debt it keeps.
    #[derive(Default)]
    struct Quinn {
        window: u64,
        max_data: u64,
        debt: u64,
        read: u64,
    }

    impl Quinn {
        fn new(window: u64) -> Self {
            Quinn {
                window,
                max_data: window,
                ..Quinn::default()
            }
        }

        fn set_receive_window(&mut self, w: u64) {
            if w > self.window {
                self.max_data += w - self.window;
            } else {
                self.debt += self.window - w;
            }
            self.window = w;
        }

        fn read(&mut self, n: u64) {
            self.read += n;
            let paid = n.min(self.debt);
            self.debt -= paid;
            self.max_data += n - paid;
        }

        /// What the client may have sent that the relay has not read.
        fn unread(&self) -> u64 {
            self.max_data - self.read
        }
    }

    /// Whatever connections open, close, send and go quiet, and whenever they rebalance:
    /// what each client may have sent unread (its credit, as quinn counts it) stays within
    /// its hold, and the holds together within the total plus the floor per open
    /// connection.
    #[test]
    fn receive_holds_cover_the_credit_and_stay_within_the_total_plus_the_floors() {
        for total in [0, 3 * MIN, MAX, 5 * MAX + 7] {
            let w = ReceiveWindows::new(total);
            let mut conns: Vec<(ReceiveHold, Quinn)> = Vec::new();
            // xorshift64: the same steps every run.
            let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ total;
            let mut next = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            for _ in 0..50_000 {
                match next(10) {
                    0 if conns.len() < 40 => {
                        let h = w.reserve();
                        let q = Quinn::new(h.bytes());
                        conns.push((h, q));
                    }
                    1 if !conns.is_empty() => {
                        let i = next(conns.len() as u64) as usize;
                        conns.swap_remove(i);
                    }
                    2..=5 if !conns.is_empty() => {
                        // The relay reads some of what the client sent (up to its credit).
                        let i = next(conns.len() as u64) as usize;
                        let (h, q) = &mut conns[i];
                        let n = match next(3) {
                            0 => 0,
                            1 => next(q.unread() + 1),
                            _ => q.unread(),
                        };
                        q.read(n);
                        h.read.fetch_add(n, Relaxed);
                    }
                    _ if !conns.is_empty() => {
                        let i = next(conns.len() as u64) as usize;
                        let (h, q) = &mut conns[i];
                        if let Some(win) = h.rebalance() {
                            q.set_receive_window(win);
                        }
                    }
                    _ => {}
                }
                let mut sum = 0;
                for (h, q) in &conns {
                    let held = h.state.lock().unwrap();
                    assert!(held.window >= MIN.min(MAX) && held.window <= MAX);
                    assert!(
                        q.unread() <= held.window + held.debt,
                        "credit {} over the hold {} + {}",
                        q.unread(),
                        held.window,
                        held.debt
                    );
                    sum += held.window + held.debt;
                }
                let r = w.lock();
                assert_eq!(r.assigned, sum);
                assert_eq!(r.live, conns.len() as u64);
                if total > 0 {
                    assert!(
                        sum <= total + r.live * MIN,
                        "holds {sum} over the total {total} + {} floors",
                        r.live
                    );
                }
            }
            drop(conns);
            assert_eq!(w.assigned(), 0);
        }
    }
}
