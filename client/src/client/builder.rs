//! [`ClientBuilder`]: configures a client, connects it (the first connection must succeed)
//! and starts the driver task over the connection engine.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::rngs::OsRng;
use rand::RngCore;
use tokio::sync::{mpsc, oneshot, watch};
use whispeer_protocol::{Identity, Keyring};

use super::driver::Driver;
use super::handle::Client;
use super::shared::{now_ms, ClientStats, ConnectionState, Inner};
use crate::core::connection::{Backoff, Engine as ConnEngine, EngineConfig, Now};
use crate::core::receive::ReceiveConfig;
use crate::core::SealPolicy;
use crate::error::ConnectError;
use crate::options::{Engine, Reconnect};
use crate::plugin::Plugins;
use crate::transport::{Dialer, Endpoint, TlsSettings};

/// Configures and connects a [`Client`]; add engines with [`ClientBuilder::with`].
#[derive(Debug)]
pub struct ClientBuilder {
    pub(crate) url: Option<String>,
    #[cfg(feature = "in-process")]
    pub(crate) in_process: Option<whispeer_relay::RelayHandle>,
    pub(crate) tls: TlsSettings,
    pub(crate) keyring: Keyring,
    pub(crate) identity: Option<Identity>,
    pub(crate) policy: SealPolicy,
    pub(crate) reconnect: Reconnect,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) outbox_bytes: usize,
    pub(crate) sub_capacity: usize,
    pub(crate) name: String,
    pub(crate) plugins: Plugins,
    pub(crate) receive: ReceiveConfig,
    #[cfg(feature = "persistence")]
    pub(crate) persistence: Option<crate::persist::Persistence>,
    /// The relay account sent in `Hello` (key or bearer token).
    pub(crate) relay_auth: Option<crate::options::RelayAuth>,
    pub(crate) durable_owner: Option<zeroize::Zeroizing<[u8; 32]>>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            url: None,
            #[cfg(feature = "in-process")]
            in_process: None,
            tls: TlsSettings::default(),
            keyring: Keyring::new(),
            identity: None,
            policy: SealPolicy::default(),
            reconnect: Reconnect::default(),
            connect_timeout: Duration::from_secs(10),
            max_frame: whispeer_protocol::limits::DEFAULT_MAX_FRAME,
            outbox_bytes: 8 * 1024 * 1024,
            sub_capacity: 65_536,
            name: format!("whispeer-rs/{}", env!("CARGO_PKG_VERSION")),
            plugins: Plugins::default(),
            receive: ReceiveConfig::default(),
            #[cfg(feature = "persistence")]
            persistence: None,
            relay_auth: None,
            durable_owner: None,
        }
    }
}

impl ClientBuilder {
    /// Adds an engine (transport, keys, identity, compression, padding, per-topic options,
    /// reconnect policy, TLS roots).
    pub fn with(mut self, engine: impl Engine) -> Self {
        engine.apply(&mut self);
        self
    }
    /// How long the first connection may take.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// Bytes of publishes kept while disconnected (default 8 MiB).
    pub fn reconnect_buffer(mut self, bytes: usize) -> Self {
        self.outbox_bytes = bytes;
        self
    }
    /// Messages buffered per subscription (default 65,536). At most once: a full buffer
    /// loses new messages (counted, and the stream yields `ReceiveError::Lagged`). At least
    /// once: it is the subscription's credit (`Sub.credit`), and nothing beyond it is acked.
    pub fn subscription_capacity(mut self, n: usize) -> Self {
        self.sub_capacity = n.max(1);
        self
    }
    /// How long delivered `(tree, sender, msg_id)`s are remembered across every
    /// subscription (and, with `Persistence`, restarts); older messages are refused unless a
    /// subscription asks for `older_history` (default 7 days).
    pub fn replay_horizon(mut self, d: Duration) -> Self {
        self.receive.horizon_ms = d.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }
    /// The allowed clock difference with senders (default 5 minutes): live messages dated
    /// further in the past, and any message dated further in the future, are refused.
    pub fn clock_skew(mut self, d: Duration) -> Self {
        self.receive.max_skew_ms = d.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    fn dialer(&self) -> Result<Dialer, ConnectError> {
        #[cfg(feature = "in-process")]
        if let Some(relay) = &self.in_process {
            return Ok(Dialer::InProcess(relay.clone()));
        }
        let url = self.url.as_deref().ok_or(ConnectError::NoTransport)?;
        Ok(Dialer::Net {
            ep: Endpoint::parse(url)?,
            tls: self.tls.clone(),
        })
    }

    /// Connects (the first attempt must succeed) and starts the background task.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let dialer = self.dialer()?;
        #[allow(unused_mut)]
        let mut keyring = self.keyring;
        #[cfg(feature = "persistence")]
        let saved = match &self.persistence {
            Some(p) => Some(crate::persist::Store::open(&p.path)?),
            None => None,
        };
        // The admins pinned by earlier runs: a grant of the builder's keyring signed by
        // another admin of a pinned tree fails here (`AdminMismatch`), and so does any later
        // one. The merged pins are saved at once.
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            if let Some(bytes) = st.pins()? {
                keyring.import_pins(&bytes)?;
            }
            st.save_pins(&keyring.export_pins());
        }
        let keyring = Arc::new(RwLock::new(keyring));
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        #[allow(unused_mut)]
        let mut cfg = EngineConfig {
            client_name: self.name,
            auth: self.relay_auth.map(|a| a.0),
            connect_timeout_ms: ms(self.connect_timeout),
            backoff: Backoff::new(
                ms(self.reconnect.initial),
                ms(self.reconnect.max),
                self.reconnect.max_attempts,
            ),
            offline_bytes: self.outbox_bytes,
            sub_capacity: self.sub_capacity as u64,
            receive: self.receive,
            // Durable owner secrets: from the identity (a restarted client keeps its
            // durables), else random for this client's lifetime.
            owner_key: Some(match (self.durable_owner, &self.identity) {
                (Some(k), _) => k,
                (None, Some(i)) => i.derive_secret("whispeer v2 durable owner"),
                (None, None) => {
                    let mut k = zeroize::Zeroizing::new([0u8; 32]);
                    OsRng.fill_bytes(&mut k[..]);
                    k
                }
            }),
            ..EngineConfig::default()
        };
        // Publishes a previous run kept but never saw acknowledged: re-sent first.
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            cfg.restored = st
                .outbox()
                .into_iter()
                .map(|(pid, ord, frame)| (crate::core::connection::PublishId(pid), ord, frame))
                .collect();
        }
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let epoch = tokio::time::Instant::now();
        #[allow(unused_mut)]
        let mut eng = ConnEngine::new(cfg, keyring.clone(), seed, Now::new(0, now_ms()));
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            st.restore(eng.core_mut().guard_mut(), now_ms());
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(ConnectionState::Reconnecting(0));
        let (stats_tx, stats) = watch::channel(ClientStats::default());
        let (first_tx, first_rx) = oneshot::channel();
        let driver = Driver::new(super::driver::Parts {
            eng,
            epoch,
            dialer,
            max_frame: self.max_frame,
            connect_timeout: self.connect_timeout,
            cmd_rx,
            state: state_tx,
            stats: stats_tx,
            plugins: self.plugins.clone(),
            first: first_tx,
            #[cfg(feature = "persistence")]
            saved,
        });
        tokio::spawn(driver.run());
        first_rx
            .await
            .map_err(|_| ConnectError::Handshake("the connection task stopped".into()))??;
        Ok(Client {
            inner: Arc::new(Inner {
                cmd: cmd_tx,
                keyring,
                identity: self.identity,
                policy: self.policy,
                state: state_rx,
                stats,
                next_id: AtomicU64::new(1),
                plugins: self.plugins,
            }),
        })
    }
}

impl Client {
    /// A builder; add a transport, keys and an identity with `.with(...)`.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects to `url` (`ws://`, `wss://`, `tcp://`, `tls://`) with these keys and identity,
    /// zstd level 3 and Padmé padding.
    pub async fn connect(
        url: &str,
        keyring: Keyring,
        identity: Identity,
    ) -> Result<Client, ConnectError> {
        ClientBuilder {
            url: Some(url.to_owned()),
            keyring,
            identity: Some(identity),
            ..ClientBuilder::default()
        }
        .connect()
        .await
    }
}
