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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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

/// Sets `connection`'s send window to the fair share every [`REBALANCE_EVERY`] until it
/// closes (or the task is aborted).
async fn rebalance(connection: quinn::Connection, window: Arc<WindowHold>) {
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
        Ok::<_, String>((connection, send, recv, window))
    })
    .await
    .map_err(|_| "QUIC handshake timed out".to_string())
    .and_then(|r| r);
    let (connection, send, recv, window) = match opened {
        Ok(x) => x,
        Err(why) => {
            tracing::debug!(%peer, listener = "quic", %why, "connection dropped during handshake");
            return;
        }
    };
    let max = shared.config.limits.max_frame;
    let rebalancer = tokio::spawn(rebalance(connection.clone(), window.clone()));
    let slot = conn::serve(
        shared.clone(),
        StreamSource::new(recv, max).with_budget(shared.frame_budget.clone(), slot.addr()),
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
}
