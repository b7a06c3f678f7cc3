//! Newtypes for the relay's domain values, so a connection id is never mistaken for a
//! subscription id or a sequence number.

use std::fmt;

use serde::Serialize;

/// A connection, numbered by the relay in accept order (never reused while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// A subscription id as chosen by the client in `Sub` (unique per connection only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SubId(pub u64);

/// A relay sequence number: strictly increasing across every message the relay accepts.
/// `Seq(0)` means "nothing assigned yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub struct Seq(pub u64);

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Plain WebSocket (`ws://`).
    Ws,
    /// WebSocket over TLS (`wss://`).
    Wss,
    /// Length-prefixed TCP (`tcp://`).
    Tcp,
    /// Length-prefixed TCP over TLS (`tls://`).
    Tls,
    /// An in-process channel pair (embedded relay, no sockets).
    InProcess,
    /// One QUIC stream of length-prefixed frames (`quic://`).
    Quic,
}

impl TransportKind {
    /// Every kind, in the order metrics list them.
    pub const ALL: [TransportKind; 6] = [
        TransportKind::Ws,
        TransportKind::Wss,
        TransportKind::Tcp,
        TransportKind::Tls,
        TransportKind::InProcess,
        TransportKind::Quic,
    ];

    /// Stable lowercase name (metrics label, logs).
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::InProcess => "in_process",
            TransportKind::Quic => "quic",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
