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

/// The QUIC send windows of all connections, reserved from `limits.quic_send_window_total`.
///
/// quinn keeps in the relay's own memory what the relay wrote to a connection's stream
/// and the client has not acknowledged, up to the connection's send window — outside the
/// outbound budget (`queue.total_max_bytes`, which counts what waits in the relay's
/// queues), and, unlike TCP's kernel buffers, under no system-wide limit. A client that
/// subscribes and never reads pins its whole window: 10,000 such connections at quinn's
/// default held 100 GB, at a fixed 2 MiB 20 GiB. Each connection reserves its window when
/// its handshake completes — [`SEND_WINDOW_MAX`] while the total has room, then what is
/// left, at least [`SEND_WINDOW_MIN`] — and gives it back when it closes: all windows
/// together stay within the total plus the floor per connection.
#[derive(Debug)]
pub(crate) struct SendWindows {
    /// 0 = unlimited: every connection gets [`SEND_WINDOW_MAX`].
    total: u64,
    reserved: AtomicU64,
}

/// A connection's reserved send window, given back when dropped.
#[derive(Debug)]
pub(crate) struct WindowHold {
    windows: Arc<SendWindows>,
    /// The window, in bytes.
    pub(crate) bytes: u64,
}

impl Drop for WindowHold {
    fn drop(&mut self) {
        self.windows.reserved.fetch_sub(self.bytes, Relaxed);
    }
}

impl SendWindows {
    pub(crate) fn new(total: u64) -> Arc<Self> {
        Arc::new(SendWindows {
            total,
            reserved: AtomicU64::new(0),
        })
    }

    /// Reserves one connection's window.
    pub(crate) fn reserve(self: &Arc<Self>) -> WindowHold {
        let mut cur = self.reserved.load(Relaxed);
        loop {
            let bytes = if self.total == 0 {
                SEND_WINDOW_MAX
            } else {
                self.total
                    .saturating_sub(cur)
                    .clamp(SEND_WINDOW_MIN, SEND_WINDOW_MAX)
            };
            match self
                .reserved
                .compare_exchange_weak(cur, cur + bytes, Relaxed, Relaxed)
            {
                Ok(_) => {
                    return WindowHold {
                        windows: self.clone(),
                        bytes,
                    }
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The windows' Prometheus lines.
    pub(crate) fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP whispeer_relay_quic_send_window_bytes Send windows reserved by open QUIC connections (what quinn may hold unacknowledged for them; limits.quic_send_window_total).\n\
             # TYPE whispeer_relay_quic_send_window_bytes gauge\n\
             whispeer_relay_quic_send_window_bytes {}",
            self.reserved.load(Relaxed)
        );
        o
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
        let window = shared.quic_windows.reserve();
        connection.set_send_window(window.bytes);
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
    drop(slot);
    drop(window);
}
