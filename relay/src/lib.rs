//! # whispeer-relay
//!
//! The blind relay of whispeer: it routes sealed envelopes by opaque topic tokens and never
//! holds a key, opens an envelope, or sees a topic name or a sender. It depends on
//! `whispeer-protocol` *without* its `keys` feature, so it cannot contain code that handles
//! keys or plaintext.
//!
//! Entry points: [`run`] (bound [`Listeners`], a [`Config`], a shutdown future — the
//! testable core of the `whispeer-relay serve` binary) and [`Relay`] (builder with plugins
//! and a store; [`RelayHandle::connect_in_process`] for an embedded relay without sockets).
//!
//! ## Module map
//! - [`config`] — every setting, defaults, TOML, validation, `generate-config` text.
//! - [`ids`] — newtypes: [`ConnId`], [`SubId`], [`Seq`], [`TransportKind`].
//! - [`index`] — the subscription trie (key id → token levels, `+`/`#` branches).
//! - [`store`] — where publishes are accepted, numbered and kept: the `Store` trait,
//!   `SqliteStore` (file or memory; WAL, group commit, retention, retained values, durable
//!   positions, publish-id dedup) and `LiveStore` (numbers only).
//! - `router` — index + store behind routing locks (64 shards by key id); encodes each
//!   `Msg` once, fans out;
//!   gated (buffered) subscriptions while history is sent; at-least-once tracking.
//! - `flow` — flow control of QoS ≥ 1 subscriptions: credit, pause, catch-up from the store.
//! - `replay` — the history task of a replaying or resuming subscription.
//! - `outbound` — per-connection bounded queue, slow-consumer policy, batch takes.
//! - `session` — the per-connection protocol state machine (sans I/O).
//! - `sub_quota` — subscriptions held per tenant (account or source address) and in all.
//! - `handshakes` — connections not yet past `Hello`, oldest first: a newcomer to a full
//!   relay evicts the oldest instead of being refused (both connection gates).
//! - `conn` — drives a session over a transport: reader, coalescing writer, timeouts, drain.
//! - `hop` — the light runtime: quiet connections run apart from floods; a connection that
//!   floods, falls behind or hits a limit moves to the main runtime.
//! - [`transport`] — frame sources/sinks: length-prefixed streams, WebSocket, channels.
//! - [`tls`] — rustls (ring) acceptor from PEM files; the QUIC server configuration.
//! - `quic` — the QUIC listener: one stream of length-prefixed frames per connection.
//! - [`plugin`] — metadata-only hooks; logging and metrics plugins.
//! - [`metrics`] — counters, routing histogram, Prometheus text.
//! - [`cluster`] — relays sharing live routing through core NATS: token paths as subjects,
//!   interest-based NATS subscriptions, forwarding queue, once-per-client dedup.
//! - [`accounts`] — relay accounts, rights, key-id claims, durable owners, hot reload.
//! - [`admin`] — `/metrics`, `/status`, `/healthz`; a GET client for `status`.
//! - `held_bytes` — byte bounds on queued work (store and NATS queues).
//! - `rate` — token buckets (rate limits by backpressure) and the per-address connection table.
//! - `syn_ban` — churning source addresses banned before accept (a BPF filter on the listeners).
//! - [`logging`] — tracing-subscriber setup for the binary (text or JSON).
//! - [`error`] — [`RelayError`].
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod cluster;
pub mod config;
mod conn;
pub mod error;
mod flow;
mod handshakes;
mod held_bytes;
mod hop;
pub mod ids;
pub mod index;
pub mod logging;
pub mod metrics;
mod outbound;
pub mod plugin;
mod quic;
mod rate;
mod relay;
mod replay;
mod router;
mod session;
pub mod store;
mod sub_quota;
mod syn_ban;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use error::RelayError;
pub use ids::{ConnId, Seq, SubId, TransportKind};
pub use relay::{run, BoundAddrs, Listeners, Relay, RelayBuilder, RelayHandle, LISTEN_MSS};
pub use whispeer_protocol as protocol;

/// Envelopes for unit tests: a well-formed header over fixed ciphertext.
#[cfg(test)]
pub(crate) mod test_envelope {
    use bytes::Bytes;
    use whispeer_protocol::envelope_header::HeaderFields;
    use whispeer_protocol::{Envelope, KeyId, TopicToken};

    /// An envelope of key id `[k; 16]` whose tokens are `[t; 16]` for each `t` of `levels`.
    pub(crate) fn envelope(k: u8, levels: &[u8]) -> Envelope {
        let tokens: Vec<TopicToken> = levels
            .iter()
            .map(|t| TopicToken::from_bytes([*t; 16]))
            .collect();
        let mut out = Vec::new();
        HeaderFields {
            flags: 0,
            key_id: KeyId::from_bytes([k; 16]),
            nonce: [0; 24],
            commit: [0; 32],
            tokens: &tokens,
        }
        .write_prefix(48, &mut out);
        out.extend_from_slice(&[1; 64]);
        Envelope::from_bytes(Bytes::from(out)).unwrap()
    }
}
