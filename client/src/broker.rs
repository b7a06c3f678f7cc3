//! In-process mode: the relay embedded in this process, with keys ready.
//!
//! For single-process apps and tests a [`Broker`] is the whole system in one value: an
//! embedded `whispeer-relay` (the same code as the server, no sockets unless asked), a tree
//! key, and clients that connect to it over channels. Encryption and compression stay on —
//! messages are sealed and opened exactly as over the network, so code moves to a real relay
//! by changing one line. Optional WebSocket and TCP listeners let other processes (a browser,
//! the CLI) join the same broker. Messages are kept in memory (QoS 1/2, replay, retained
//! values) or, with [`BrokerBuilder::persistence`], in a SQLite file.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use futures_util::StreamExt;
//! let broker = whispeer::Broker::start().await?; // in process, zstd + encryption on
//! let alice = broker.client().await?;
//! let bob = broker.client().await?;
//! let mut inbox = bob.subscribe::<String>("chat/#").await?;
//! alice.publish("chat/lobby", "hello").await?;
//! assert_eq!(inbox.next().await.unwrap()?.value, "hello");
//! # Ok(()) }
//! ```

use std::net::SocketAddr;

use rand::rngs::OsRng;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use whispeer_protocol::{Identity, KeyError, Keyring, PassphraseParams, TreeKey};
use whispeer_relay::config::{ListenAddr, StoreKind};
use whispeer_relay::{BoundAddrs, Config, Listeners, Relay, RelayError, RelayHandle};

use crate::client::{now_ms, Client};
use crate::error::ConnectError;
use crate::options::ClientBuilder;
use crate::options::{Compression, Encryption, InProcess};

/// Why a broker could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The embedded relay could not bind or build.
    #[error("embedded relay: {0}")]
    Relay(#[from] RelayError),
    /// The tree key could not be made or loaded.
    #[error("broker keys: {0}")]
    Keys(#[from] KeyError),
}

/// Configures a [`Broker`].
#[derive(Debug)]
pub struct BrokerBuilder {
    config: Config,
    tree: Option<TreeKey>,
    compression: Compression,
}

impl Default for BrokerBuilder {
    fn default() -> Self {
        let mut config = Config::default();
        config.listen.ws = ListenAddr::OFF;
        config.listen.tcp = ListenAddr::OFF;
        config.listen.admin = ListenAddr::OFF;
        config.store.kind = Some(StoreKind::Memory);
        BrokerBuilder {
            config,
            tree: None,
            compression: Compression::zstd(3),
        }
    }
}

impl BrokerBuilder {
    /// Also listen for WebSocket clients (browsers, other processes); port 0 picks one.
    pub fn websocket(mut self, addr: SocketAddr) -> Self {
        self.config.listen.ws = ListenAddr::on(addr);
        self
    }
    /// Also listen for length-prefixed TCP clients; port 0 picks one.
    pub fn tcp(mut self, addr: SocketAddr) -> Self {
        self.config.listen.tcp = ListenAddr::on(addr);
        self
    }
    /// Also serve `/metrics`, `/status` and `/healthz`.
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.config.listen.admin = ListenAddr::on(addr);
        self
    }
    /// Use this tree key instead of a fresh random one (e.g. shared with other processes).
    pub fn tree_key(mut self, tree: TreeKey) -> Self {
        self.tree = Some(tree);
        self
    }
    /// Derive the tree key from a passphrase (Argon2id; every party with the same tree
    /// name and passphrase gets the same key).
    pub fn passphrase(self, tree: &str, passphrase: &str) -> Result<Self, BrokerError> {
        let key =
            TreeKey::from_passphrase(tree, passphrase.as_bytes(), PassphraseParams::default())?;
        Ok(self.tree_key(key))
    }
    /// The compression its clients use (default zstd level 3).
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }
    /// Keep messages in a SQLite file (WAL, group commit): at-least-once publishes, replay,
    /// retained values and durable subscriptions survive a restart. Without it the broker
    /// keeps them in memory only.
    pub fn persistence(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.store.kind = Some(StoreKind::Sqlite);
        self.config.store.path = path.into();
        self
    }
    /// Full relay configuration (limits, queues, timeouts); listeners from it are honoured.
    pub fn relay_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Starts the embedded relay (must be called inside a tokio runtime).
    pub async fn start(self) -> Result<Broker, BrokerError> {
        let tree = match self.tree {
            Some(t) => t,
            None => TreeKey::generate("broker", &mut OsRng)?,
        };
        let listeners = Listeners::bind(&self.config).await?;
        let relay = Relay::builder(self.config).listeners(listeners).build()?;
        let addrs = relay.addrs();
        let handle = relay.handle();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(relay.run(async {
            let _ = stop_rx.await;
        }));
        Ok(Broker {
            handle,
            addrs,
            tree,
            compression: self.compression,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// An embedded relay plus a tree key: see the [module docs](self).
#[derive(Debug)]
pub struct Broker {
    handle: RelayHandle,
    addrs: BoundAddrs,
    tree: TreeKey,
    compression: Compression,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RelayError>>>,
}

impl Broker {
    /// An in-process broker with a fresh random tree key, zstd and encryption on.
    pub async fn start() -> Result<Broker, BrokerError> {
        BrokerBuilder::default().start().await
    }

    /// A broker with options: listeners, a given key or passphrase, compression.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// A new client with its own fresh identity and the broker's keys.
    pub async fn client(&self) -> Result<Client, ConnectError> {
        self.client_builder()
            .with(Identity::generate(&mut OsRng))
            .connect()
            .await
    }

    /// A builder already set up for this broker (in-process transport, keys, compression);
    /// add an identity or other engines, then `connect()`.
    pub fn client_builder(&self) -> ClientBuilder {
        let mut keys = Keyring::new();
        keys.add_tree_key(&self.tree, now_ms())
            .expect("a broker's own tree key is valid");
        Client::builder()
            .with(InProcess::new(self.handle.clone()))
            .with(Encryption::new(keys))
            .with(self.compression)
    }

    /// The tree key (give it to other processes so they can join).
    pub fn tree_key(&self) -> &TreeKey {
        &self.tree
    }

    /// `ws://…` when a WebSocket listener was asked for.
    pub fn ws_url(&self) -> Option<String> {
        self.addrs.ws.map(|a| format!("ws://{a}"))
    }

    /// `tcp://…` when a TCP listener was asked for.
    pub fn tcp_url(&self) -> Option<String> {
        self.addrs.tcp.map(|a| format!("tcp://{a}"))
    }

    /// The embedded relay (metrics, status).
    pub fn relay(&self) -> &RelayHandle {
        &self.handle
    }

    /// Shuts the relay down gracefully and waits for it.
    pub async fn shutdown(mut self) -> Result<(), RelayError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}
