//! # whispeer — end-to-end encrypted publish/subscribe
//!
//! Clients hold every key and seal each message locally (serde → CBOR → zstd → pad →
//! Ed25519 → XChaCha20-Poly1305); the relay only routes ciphertext by keyed topic tokens.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use whispeer::{Client, Identity, Keyring, TreeKey};
//! use futures_util::StreamExt;
//! let tree = TreeKey::generate("home")?;
//! let mut keys = Keyring::new();
//! keys.add_tree_key(&tree)?;
//! let me = Identity::generate();
//! let client = Client::connect("ws://127.0.0.1:7070", keys, me).await?;
//! let mut sub = client.subscribe::<f64>("sensor/+/temp").await?;
//! client.publish("sensor/kitchen/temp", &21.5).await?;
//! let msg = sub.next().await.unwrap()?;
//! println!("{} from {:?}: {}", msg.topic, msg.sender, msg.value);
//! # Ok(()) }
//! ```
//!
//! ## Module map
//! - [`core`] — the runtime-free client core (subscriptions, open once / fan out, dedup),
//!   shared with the WebAssembly client, and its sans-IO connection engine
//!   ([`core::connection::Engine`]: handshake, resubscription, outbox, acks, heartbeat,
//!   backoff, flush) that the tokio driver runs.
//! - [`error`] — `ConnectError`, `PublishError`, `SubscribeError`, `ReceiveError`.
//! - `client` — the tokio client, split by role: the [`Client`] handle, connecting,
//!   [`Subscription`] streams, and the driver task that moves bytes between the socket and
//!   the engine (feature `tokio-runtime`).
//! - `options` — the client's settings, [`ClientBuilder`], and the engines that fill them
//!   in: [`WebSocket`], [`Tcp`], [`Compression`], [`Padding`], [`Encryption`], [`Signing`],
//!   [`TopicOptions`], [`Reconnect`], [`TlsRoot`].
//!
//! Modules import downwards only (`client` → `options`/`persist` → `transport`/`plugin` →
//! `core` → `error`); `tests/import_graph.rs` fails on an import circle.
//! - `transport` — `ws://`, `wss://`, `tcp://`, `tls://` connections, and the in-process
//!   channel to an embedded relay.
//! - [`plugin`] — the [`Plugin`] trait (run on plaintext, where the keys are) and the
//!   built-ins [`Logging`], [`Metrics`], [`TypeEnforcement`], [`Transform`]; any plugin is an
//!   engine (`.with(plugin)`).
//! - [`cbor_scan`] — a CBOR value's data items and nesting counted before it is decoded (a
//!   16 MiB payload of one-byte items decodes to gigabytes); the CLI and the npm package
//!   scan with their own budgets.
//! - [`printable`] — text others chose (topics, content types, relay messages) made safe for
//!   a log line or a terminal; the library's logs and the CLI use the one rule.
//! - [`tag`] — [`TypeTag`] (derive it with `#[derive(TypeTag)] #[whispeer(type = "…")]`,
//!   from `whispeer-derive` under `client/derive`) and how a tag rides in the content type;
//!   `client::typed` has [`TypedTopic`] (`client.topic::<T>(name)`, one type per topic) and
//!   callback [`SubscriptionHandle`]s.
//! - `persist` — `Persistence::sqlite(path)`: the outbox and durable dedup window survive a
//!   client restart (feature `persistence`).
//! - `history` — the [`LocalHistory`] plugin: decrypted messages of
//!   chosen topics in a local SQLite file, queried by filter and time (feature
//!   `persistence`).
//! - `broker` — in-process mode: [`Broker`], an embedded relay, its keys and a connected
//!   client behind one builder (`Broker::builder(BrokerOptions::default()).with(…)`,
//!   `Broker::build_default*`); on a broker `WebSocket`/`Tcp` serve, `Persistence` is one
//!   directory (history, outbox, 0600 key file), `Encryption::new()` a fresh tree (feature
//!   `in-process`).
#![forbid(unsafe_code)]

/// The repository README's Rust examples, compiled (and run unless `no_run`) by
/// `cargo test -p whispeer --features in-process --doc`.
#[cfg(all(doctest, feature = "in-process"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The client README's Rust examples, compiled by the doc tests too.
#[cfg(all(doctest, feature = "in-process"))]
#[doc = include_str!("../README.md")]
pub struct ClientReadmeDoctests;

pub mod cbor_scan;
pub mod core;
pub mod error;
pub mod plugin;
pub mod printable;
pub mod tag;

#[cfg(feature = "in-process")]
pub mod broker;
#[cfg(feature = "tokio-runtime")]
mod client;
#[cfg(feature = "persistence")]
pub mod history;
#[cfg(feature = "tokio-runtime")]
mod options;
#[cfg(feature = "persistence")]
pub mod persist;
#[cfg(feature = "tokio-runtime")]
mod transport;

pub use crate::core::connection::AuthNotBound;
pub use crate::core::SubscribeOptions;
pub use error::{
    ConnectError, DeleteError, FlushError, PublishError, ReceiveError, SubscribeError,
};
pub use whispeer_protocol as protocol;
pub use whispeer_protocol::{
    frame::Replay, Grant, Identity, Invite, Keyring, PassphraseParams, PublicId, Scope, SenderId,
    Topic, TopicFilter, TreeKey,
};

#[cfg(feature = "in-process")]
pub use broker::{Broker, BrokerBuilder, BrokerError, BrokerOptions, PersistenceType};
#[cfg(feature = "tokio-runtime")]
pub use client::{
    now_ms, to_cbor, Client, ClientStats, ConnectionState, Message, PublishOptions, Subscription,
    SubscriptionHandle, TypedTopic, Unacked,
};
#[cfg(feature = "persistence")]
pub use history::{HistoryEntry, HistoryError, LocalHistory};
#[cfg(feature = "in-process")]
pub use options::InProcess;
#[cfg(feature = "tokio-runtime")]
pub use options::{
    CipherSuite, ClientBuilder, Compression, Encryption, Engine, Padding, Quic, Reconnect, Relays,
    Signing, Tcp, TlsPin, TlsPinError, TlsRoot, TopicOptions, WebSocket,
};
#[cfg(feature = "tokio-runtime")]
pub use options::{DurableOwner, RelayAuth, RelayAuthError, ACCOUNT_KEY_PREFIX};
#[cfg(feature = "persistence")]
pub use persist::{PersistError, Persistence};
pub use plugin::{Logging, Metrics, MetricsSnapshot, Plugin, Transform, TypeEnforcement};
pub use tag::TypeTag;
/// The level of [`Logging`] (`tracing::Level`).
pub use tracing::Level as LogLevel;
#[cfg(feature = "tokio-runtime")]
pub use transport::{Endpoint, TlsSettings};
/// `#[derive(TypeTag)]` with `#[whispeer(type = "myapp.MyData/v1")]`.
pub use whispeer_derive::TypeTag;
pub use whispeer_protocol::frame::Qos;
