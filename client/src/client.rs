//! The tokio client: a cheap, cloneable handle over one background connection task (like
//! async-nats). Publishing seals in the caller's task (so many tasks seal in parallel);
//! the connection task owns the socket, the subscriptions and the reconnect loop.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_core::Stream;
use rand::rngs::OsRng;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use whispeer_protocol::frame::{Ack, Close, Ping, Pong};
use whispeer_protocol::{
    ErrorCode, Frame, Grant, Identity, Keyring, MessageId, Qos, Sealer, SenderId, Topic,
    TopicFilter,
};

use crate::core::acks::{AckQueue, SlotId};
use crate::core::receive::ReceiveConfig;
use crate::core::{
    self, ClientCore, CoreStats, Delivery, LocalSubId, Received, SealPolicy, SubscribeOptions,
};
use crate::error::{ConnectError, FlushError, PublishError, ReceiveError, SubscribeError};
use crate::options::{Engine, Reconnect};
use crate::plugin::{Outgoing, Plugins, Verdict};
use crate::transport::{self, Connection, Dialer, Endpoint, Incoming, TlsSettings};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

thread_local! {
    // One sealer per thread: keeps a zstd context for reuse without a shared lock.
    static SEALER: RefCell<Sealer> = RefCell::new(Sealer::new());
}

/// The connection's state, observable with [`Client::state_changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected and handshaken.
    Connected,
    /// Lost; trying again (attempt number, from 1).
    Reconnecting(u32),
    /// Closed by [`Client::close`] or after the reconnect policy gave up.
    Closed,
}

/// Options of one publish.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions {
    /// Keep as the retained value of the topic on the relay.
    pub retain: bool,
    /// Wait until the relay acknowledges the message (`PubAck`). Implied by QoS 1 and 2.
    pub ack: bool,
    /// Delivery guarantee requested from the relay. With at least once (1) the publish
    /// returns only once the relay's store holds the message, and is re-sent after a
    /// reconnect until it does; exactly once (2) adds the relay's publish-id dedup, so a
    /// re-send is never stored or delivered twice.
    pub qos: Qos,
    /// Seal with the key of this tree. Needed when grants of two trees cover the topic
    /// (a publish without it then fails with an error naming both trees); otherwise the one
    /// tree covering the topic seals.
    pub tree: Option<whispeer_protocol::TreeId>,
}

impl PublishOptions {
    /// At least once: returns the relay sequence once the message is stored.
    pub fn at_least_once() -> Self {
        PublishOptions {
            qos: Qos::AtLeastOnce,
            ack: true,
            ..Default::default()
        }
    }
    /// Exactly once (effectively): at least once plus relay-side dedup of re-sends.
    pub fn exactly_once() -> Self {
        PublishOptions {
            qos: Qos::ExactlyOnce,
            ack: true,
            ..Default::default()
        }
    }
    /// Also keep the message as the topic's retained value.
    pub fn retain(mut self) -> Self {
        self.retain = true;
        self
    }
    /// Seals with the key of this tree (see [`PublishOptions::tree`]).
    pub fn tree(mut self, tree: whispeer_protocol::TreeId) -> Self {
        self.tree = Some(tree);
        self
    }
}

/// A message delivered to a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<T> {
    /// The topic it was published on.
    pub topic: Topic,
    /// The verified sender, `None` for unsigned messages.
    pub sender: Option<SenderId>,
    /// The sender's message id.
    pub id: MessageId,
    /// The sender's timestamp, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The relay's sequence number (0 when the relay did not store it).
    pub seq: u64,
    /// Whether this is the topic's retained value, delivered on subscribe.
    pub retained: bool,
    /// The content type the sender declared.
    pub content_type: String,
    /// The tree whose key opened it.
    pub tree_id: whispeer_protocol::TreeId,
    /// The key epoch it was sealed under.
    pub epoch: u64,
    /// How the grant whose key opened it is held: [`Provenance::AdminSigned`],
    /// [`Provenance::Derived`] (re-derived from a broader verified grant) or
    /// [`Provenance::Delegated`] (narrowed and handed on by that identity, unverifiable).
    ///
    /// [`Provenance::AdminSigned`]: whispeer_protocol::Provenance::AdminSigned
    /// [`Provenance::Derived`]: whispeer_protocol::Provenance::Derived
    /// [`Provenance::Delegated`]: whispeer_protocol::Provenance::Delegated
    pub provenance: whispeer_protocol::Provenance,
    /// The value.
    pub value: T,
}

/// What a subscription's buffer holds.
#[derive(Debug)]
enum Item {
    /// A message, with its ack-queue slot when the relay expects an ack.
    Msg(Arc<Received>, Option<SlotId>),
    /// At most once: messages lost (relay gap) before what follows.
    Lagged(u64),
    /// At least once: an envelope routed here that the app never sees (did not open, was
    /// refused, a duplicate, dropped by a plugin, or opened for another subscription). The
    /// stream takes it silently, so its ack leaves when the app reaches it, exactly as a
    /// message's would.
    Hidden(SlotId),
}

/// Where the relay's `PubAck` (its sequence number) for one publish is reported.
type AckReply = oneshot::Sender<Result<u64, PublishError>>;
/// Where a subscription learns that the relay confirmed it.
type SubReady = oneshot::Sender<Result<(), SubscribeError>>;

enum Command {
    Send {
        frames: Vec<Bytes>,
        ack: Option<([u8; 16], AckReply)>,
        /// QoS ≥ 1: keep the frame and re-send it after a reconnect until acknowledged.
        keep: bool,
    },
    /// The app took a message of an at-least-once subscription: its ack-queue slot.
    Ack {
        slot: SlotId,
        sub: LocalSubId,
    },
    Subscribe {
        id: LocalSubId,
        filter: TopicFilter,
        opts: SubscribeOptions,
        tx: mpsc::Sender<Item>,
        lag: Arc<AtomicU64>,
        ready: oneshot::Sender<Result<(), SubscribeError>>,
    },
    Unsubscribe {
        id: LocalSubId,
    },
    Resubscribe,
    Flush(oneshot::Sender<Result<(), FlushError>>),
    Close(oneshot::Sender<()>),
}

struct Inner {
    cmd: mpsc::UnboundedSender<Command>,
    keyring: Arc<RwLock<Keyring>>,
    identity: Option<Identity>,
    policy: SealPolicy,
    state: watch::Receiver<ConnectionState>,
    stats: watch::Receiver<ClientStats>,
    next_id: AtomicU64,
    sub_capacity: usize,
    plugins: Plugins,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

/// Counters of a client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientStats {
    /// From the core: delivered, rejected (could not open), duplicates, relay gaps.
    pub core: CoreStats,
    /// Messages dropped because a subscription's buffer was full (the app is too slow).
    pub slow_subscriber_drops: u64,
    /// Publishes dropped because the reconnect buffer was full.
    pub outbox_drops: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Messages a client plugin dropped.
    pub plugin_drops: u64,
    /// QoS ≥ 1 publishes waiting for the relay's `PubAck` (re-sent after a reconnect).
    pub unacked_publishes: u64,
}

/// A connected client. Clone it freely: every clone shares the one connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

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
        let (conn, heartbeat) = open(
            &dialer,
            self.max_frame,
            self.connect_timeout,
            &self.name,
            self.relay_auth.as_ref(),
        )
        .await?;
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
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connected);
        let (stats_tx, stats) = watch::channel(ClientStats::default());
        let mut core = ClientCore::with_config(keyring.clone(), self.receive);
        core.set_credit(Some(self.sub_capacity as u64));
        // Durable owner secrets: from the identity (a restarted client keeps its durables),
        // else random for this client's lifetime.
        core.set_owner_key(match (self.durable_owner, &self.identity) {
            (Some(k), _) => k,
            (None, Some(i)) => i.derive_secret("whispeer v2 durable owner"),
            (None, None) => {
                let mut k = zeroize::Zeroizing::new([0u8; 32]);
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k[..]);
                k
            }
        });
        #[cfg(feature = "persistence")]
        if let Some(st) = &saved {
            st.restore(core.guard_mut(), now_ms());
        }
        #[allow(unused_mut)]
        let mut driver = Driver {
            dialer,
            max_frame: self.max_frame,
            connect_timeout: self.connect_timeout,
            name: self.name,
            relay_auth: self.relay_auth,
            reconnect: self.reconnect,
            outbox_limit: self.outbox_bytes,
            cmd_rx,
            core,
            sinks: HashMap::new(),
            acks: HashMap::new(),
            flushes: HashMap::new(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            state: state_tx,
            stats: stats_tx,
            next_nonce: 1,
            plugins: self.plugins.clone(),
            inflight: HashMap::new(),
            next_inflight: 0,
            ack_queue: AckQueue::new(),
            #[cfg(feature = "persistence")]
            saved,
        };
        // Publishes a previous run kept but never saw acknowledged: re-sent first.
        #[cfg(feature = "persistence")]
        if let Some(st) = &driver.saved {
            for (pid, ord, frame) in st.outbox() {
                driver.inflight.insert(pid, (ord, frame));
                driver.next_inflight = driver.next_inflight.max(ord + 1);
            }
        }
        tokio::spawn(driver.run(conn, heartbeat));
        Ok(Client {
            inner: Arc::new(Inner {
                cmd: cmd_tx,
                keyring,
                identity: self.identity,
                policy: self.policy,
                state: state_rx,
                stats,
                next_id: AtomicU64::new(1),
                sub_capacity: self.sub_capacity,
                plugins: self.plugins,
            }),
        })
    }
}

/// A stream of typed messages; unsubscribes when dropped.
pub struct Subscription<T> {
    rx: mpsc::Receiver<Item>,
    /// Messages lost while the buffer was full (reported before the next message).
    lag: Arc<AtomicU64>,
    id: LocalSubId,
    cmd: mpsc::UnboundedSender<Command>,
    decode: fn(&Received) -> Result<T, ReceiveError>,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

impl<T> Subscription<T> {
    /// The next message, or `None` once the client is closed. At most once, a
    /// `ReceiveError::Lagged(n)` says `n` messages were lost here; the stream goes on.
    pub async fn next_message(&mut self) -> Option<Result<Message<T>, ReceiveError>> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message<T>, ReceiveError>>> {
        loop {
            let polled = self.rx.poll_recv(cx);
            if polled.is_pending() {
                // Everything buffered was taken: report losses that came after it.
                let lost = self.lag.swap(0, Ordering::AcqRel);
                if lost > 0 {
                    return Poll::Ready(Some(Err(ReceiveError::Lagged(lost))));
                }
            }
            let item = match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(item)) => item,
            };
            return Poll::Ready(Some(match item {
                Item::Msg(r, slot) => {
                    if let Some(slot) = slot {
                        let _ = self.cmd.send(Command::Ack { slot, sub: self.id });
                    }
                    to_message(&r, self.decode)
                }
                Item::Lagged(n) => {
                    Err(ReceiveError::Lagged(n + self.lag.swap(0, Ordering::AcqRel)))
                }
                Item::Hidden(slot) => {
                    let _ = self.cmd.send(Command::Ack { slot, sub: self.id });
                    continue;
                }
            }));
        }
    }
}

fn to_message<T>(
    r: &Received,
    decode: fn(&Received) -> Result<T, ReceiveError>,
) -> Result<Message<T>, ReceiveError> {
    Ok(Message {
        topic: r.topic.clone(),
        sender: r.sender,
        id: r.msg_id,
        timestamp_ms: r.ts_ms,
        seq: r.seq,
        retained: r.retained,
        content_type: r.content_type.clone(),
        tree_id: r.tree_id,
        epoch: r.epoch,
        provenance: r.provenance.clone(),
        value: decode(r)?,
    })
}

impl<T> Stream for Subscription<T> {
    type Item = Result<Message<T>, ReceiveError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_item(cx)
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Unsubscribe { id: self.id });
    }
}

fn decode_cbor<T: DeserializeOwned>(r: &Received) -> Result<T, ReceiveError> {
    if r.content_type != core::CBOR {
        return Err(ReceiveError::ContentType {
            expected: core::CBOR,
            found: r.content_type.clone(),
        });
    }
    ciborium::from_reader(&r.payload[..]).map_err(|e| ReceiveError::Decode {
        topic: r.topic.to_string(),
        reason: e.to_string(),
    })
}

fn decode_raw(r: &Received) -> Result<Vec<u8>, ReceiveError> {
    Ok(r.payload.to_vec())
}

/// Serializes a value as CBOR, the format every whispeer client (Rust and JS) uses.
pub fn to_cbor<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, PublishError> {
    let mut buf = Vec::with_capacity(128);
    ciborium::into_writer(value, &mut buf).map_err(|e| PublishError::Encode(e.to_string()))?;
    Ok(buf)
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

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        *self.inner.state.borrow()
    }

    /// A receiver of connection state changes.
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Counters: delivered, rejected, duplicates, drops, reconnects.
    pub fn stats(&self) -> ClientStats {
        self.inner.stats.borrow().clone()
    }

    /// A receiver woken whenever the counters change (wait on it instead of polling
    /// [`Client::stats`]).
    pub fn stats_changes(&self) -> watch::Receiver<ClientStats> {
        self.inner.stats.clone()
    }

    /// The sender id of this client's identity.
    pub fn sender_id(&self) -> Option<SenderId> {
        self.inner.identity.as_ref().map(|i| i.sender_id())
    }

    /// Adds a grant at run time (e.g. a new epoch after a rotation) and re-subscribes so
    /// existing subscriptions cover it.
    pub fn add_grant(&self, grant: Grant) -> Result<(), whispeer_protocol::KeyError> {
        self.inner
            .keyring
            .write()
            .expect("keyring lock")
            .add_grant(grant, now_ms())?;
        let _ = self.inner.cmd.send(Command::Resubscribe);
        Ok(())
    }

    /// Lets this client seal with the delegated grant(s) for `scope` in `tree` (every held
    /// epoch): a grant narrowed and handed on by someone the keyring cannot verify opens
    /// messages but seals only after this opt-in. Admin-signed and derived grants seal
    /// anyway. Fails when no grant for that scope is held.
    pub fn allow_sealing(
        &self,
        tree: whispeer_protocol::TreeId,
        scope: &whispeer_protocol::Scope,
    ) -> Result<(), whispeer_protocol::KeyError> {
        self.inner
            .keyring
            .write()
            .expect("keyring lock")
            .allow_sealing(tree, scope)
    }

    /// The provenance of the grant for `scope` held in the newest epoch of `tree`.
    pub fn provenance(
        &self,
        tree: whispeer_protocol::TreeId,
        scope: &whispeer_protocol::Scope,
    ) -> Option<whispeer_protocol::Provenance> {
        self.inner
            .keyring
            .read()
            .expect("keyring lock")
            .provenance(tree, scope)
            .cloned()
    }

    fn seal(
        &self,
        tree: Option<whispeer_protocol::TreeId>,
        topic: &Topic,
        content_type: &str,
        payload: &[u8],
    ) -> Result<whispeer_protocol::Envelope, PublishError> {
        let i = &self.inner;
        SEALER.with(|s| {
            core::seal_publish_in(
                &i.keyring,
                tree,
                i.identity.as_ref(),
                &i.policy,
                &mut s.borrow_mut(),
                topic,
                content_type,
                payload,
                now_ms(),
                &mut OsRng,
            )
            .map(|(env, _)| env)
        })
    }

    /// Runs the plugins' `on_publish` (which may transform the message), then seals.
    fn seal_with_plugins(
        &self,
        tree: Option<whispeer_protocol::TreeId>,
        topic: Topic,
        content_type: &str,
        payload: &[u8],
    ) -> Result<whispeer_protocol::Envelope, PublishError> {
        if self.inner.plugins.is_empty() {
            return self.seal(tree, &topic, content_type, payload);
        }
        let mut out = Outgoing {
            topic,
            content_type: content_type.to_owned(),
            payload: payload.to_vec(),
        };
        self.inner.plugins.on_publish(&mut out)?;
        self.seal(tree, &out.topic, &out.content_type, &out.payload)
    }

    async fn send(
        &self,
        frames: Vec<Bytes>,
        ack: Option<[u8; 16]>,
        keep: bool,
    ) -> Result<u64, PublishError> {
        match ack {
            None => {
                self.inner
                    .cmd
                    .send(Command::Send {
                        frames,
                        ack: None,
                        keep: false,
                    })
                    .map_err(|_| PublishError::Closed)?;
                Ok(0)
            }
            Some(id) => {
                let (tx, rx) = oneshot::channel();
                self.inner
                    .cmd
                    .send(Command::Send {
                        frames,
                        ack: Some((id, tx)),
                        keep,
                    })
                    .map_err(|_| PublishError::Closed)?;
                rx.await.map_err(|_| PublishError::Closed)?
            }
        }
    }

    /// Publishes a typed value (serde → CBOR) on `topic`. Returns once the message is handed
    /// to the connection; use [`Client::flush`] or [`Client::publish_with`] (`ack`) to know
    /// the relay has it.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<(), PublishError> {
        self.publish_with(topic, value, PublishOptions::default())
            .await
            .map(|_| ())
    }

    /// Publishes with options; with `ack` it waits for the relay's `PubAck` and returns the
    /// relay sequence.
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        opts: PublishOptions,
    ) -> Result<u64, PublishError> {
        let payload = to_cbor(value)?;
        self.publish_raw(topic, core::CBOR, &payload, opts).await
    }

    /// Publishes raw bytes with a content type of your choice.
    pub async fn publish_bytes(
        &self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        self.publish_raw(topic, content_type, payload, PublishOptions::default())
            .await
            .map(|_| ())
    }

    /// Publishes raw bytes with a content type of your choice and options (retain, QoS,
    /// tree); with `ack` it waits for the relay's `PubAck` and returns the relay sequence.
    pub async fn publish_bytes_with(
        &self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
        opts: PublishOptions,
    ) -> Result<u64, PublishError> {
        self.publish_raw(topic, content_type, payload, opts).await
    }

    async fn publish_raw(
        &self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
        opts: PublishOptions,
    ) -> Result<u64, PublishError> {
        let topic = Topic::new(topic)?;
        let env = self.seal_with_plugins(opts.tree, topic, content_type, payload)?;
        let keep = opts.qos != Qos::AtMostOnce;
        let pid = (opts.ack || keep).then(|| OsRng.gen::<[u8; 16]>());
        let frame = core::pub_frame(env, pid, opts.retain, opts.qos).to_bytes();
        self.send(vec![frame], pid, keep).await
    }

    /// Publishes many values on one topic as one write (sealed individually: each message is
    /// still opened and verified alone).
    pub async fn publish_batch<T: Serialize>(
        &self,
        topic: &str,
        values: &[T],
    ) -> Result<(), PublishError> {
        let topic = Topic::new(topic)?;
        let mut frames = Vec::with_capacity(values.len());
        for v in values {
            let env = self.seal_with_plugins(None, topic.clone(), core::CBOR, &to_cbor(v)?)?;
            frames.push(core::pub_frame(env, None, false, Qos::AtMostOnce).to_bytes());
        }
        self.send(frames, None, false).await.map(|_| ())
    }

    async fn subscribe_inner<T>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        decode: fn(&Received) -> Result<T, ReceiveError>,
    ) -> Result<Subscription<T>, SubscribeError> {
        let filter = TopicFilter::new(filter)?;
        self.inner.plugins.on_subscribe(&filter)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.inner.sub_capacity);
        let lag = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::Subscribe {
                id,
                filter,
                opts,
                tx,
                lag: lag.clone(),
                ready: ready_tx,
            })
            .map_err(|_| SubscribeError::Closed)?;
        let sub = Subscription {
            rx,
            lag,
            id,
            cmd: self.inner.cmd.clone(),
            decode,
            _t: PhantomData,
        };
        ready_rx.await.map_err(|_| SubscribeError::Closed)??;
        Ok(sub)
    }

    /// Subscribes to a filter (`+` one level, `#` the rest) and decodes each message as `T`.
    /// Returns once the relay has confirmed the subscription: messages published after this
    /// returns are delivered.
    pub async fn subscribe<T: DeserializeOwned>(
        &self,
        filter: &str,
    ) -> Result<Subscription<T>, SubscribeError> {
        self.subscribe_inner(filter, SubscribeOptions::default(), decode_cbor::<T>)
            .await
    }

    /// Subscribes with options: replay from the relay's history (a sequence, a time, the
    /// last N), a durable name, QoS, retained values. After a reconnect every subscription
    /// resumes after the last relay sequence it received.
    pub async fn subscribe_with_options<T: DeserializeOwned>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscription<T>, SubscribeError> {
        self.subscribe_inner(filter, opts, decode_cbor::<T>).await
    }

    /// Raw payloads with options (replay, durable name, QoS, retained).
    pub async fn subscribe_bytes_with_options(
        &self,
        filter: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscription<Vec<u8>>, SubscribeError> {
        self.subscribe_inner(filter, opts, decode_raw).await
    }

    /// Subscribes to raw payloads (any content type).
    pub async fn subscribe_bytes(
        &self,
        filter: &str,
    ) -> Result<Subscription<Vec<u8>>, SubscribeError> {
        self.subscribe_inner(filter, SubscribeOptions::default(), decode_raw)
            .await
    }

    /// Calls `f` for every message on `filter` (decode errors are logged and skipped) until
    /// the returned handle is aborted or the client closes.
    pub async fn on<T, F>(
        &self,
        filter: &str,
        mut f: F,
    ) -> Result<tokio::task::JoinHandle<()>, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        let mut sub = self.subscribe::<T>(filter).await?;
        Ok(tokio::spawn(async move {
            while let Some(m) = sub.next_message().await {
                match m {
                    Ok(m) => f(m),
                    Err(e) => tracing::warn!(error = %e, "skipping message"),
                }
            }
        }))
    }

    /// Like [`Client::on`] with an async callback (awaited before the next message).
    pub async fn on_async<T, F, Fut>(
        &self,
        filter: &str,
        mut f: F,
    ) -> Result<tokio::task::JoinHandle<()>, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut sub = self.subscribe::<T>(filter).await?;
        Ok(tokio::spawn(async move {
            while let Some(m) = sub.next_message().await {
                match m {
                    Ok(m) => f(m).await,
                    Err(e) => tracing::warn!(error = %e, "skipping message"),
                }
            }
        }))
    }

    /// Waits until the relay has processed everything sent before (a Ping/Pong round trip).
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::Flush(tx))
            .map_err(|_| FlushError::Closed)?;
        rx.await.map_err(|_| FlushError::Closed)?
    }

    /// Flushes, says goodbye to the relay and stops the connection task. Subscriptions end.
    pub async fn close(&self) {
        let _ = self.flush().await;
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Connects and performs the Hello/Welcome handshake (with the relay account's
/// Challenge/Auth round when `auth` holds a key); returns the heartbeat interval.
async fn open(
    dialer: &Dialer,
    max_frame: usize,
    timeout: Duration,
    name: &str,
    auth: Option<&crate::options::RelayAuth>,
) -> Result<(Connection, Duration), ConnectError> {
    let mut conn = dialer.dial(max_frame, timeout).await?;
    let io = |e: std::io::Error| ConnectError::Io {
        addr: dialer.describe().to_owned(),
        source: e,
    };
    let mut hello = ClientCore::hello(name);
    if let (Some(a), Frame::Hello(h)) = (auth, &mut hello) {
        a.fill_hello(h);
    }
    conn.writer.write(hello.to_bytes()).await.map_err(io)?;
    conn.writer.flush().await.map_err(io)?;
    let welcome = tokio::time::timeout(timeout, async {
        loop {
            match conn.incoming.recv().await {
                Some(Incoming::Frame(Frame::Welcome(w))) => return Ok(w),
                Some(Incoming::Frame(Frame::Challenge(c))) => {
                    let Some(sig) = auth.and_then(|a| a.answer(&c.nonce)) else {
                        return Err(ConnectError::Handshake(
                            "the relay sent a Challenge but no account key is configured".into(),
                        ));
                    };
                    conn.writer.write(sig.to_bytes()).await.map_err(io)?;
                    conn.writer.flush().await.map_err(io)?;
                }
                Some(Incoming::Frame(Frame::Err(e))) => {
                    return Err(ConnectError::Rejected {
                        code: e.code,
                        message: e.message,
                    })
                }
                Some(Incoming::Frame(Frame::Close(c))) => {
                    return Err(ConnectError::Rejected {
                        code: c.code,
                        message: c.message,
                    })
                }
                Some(Incoming::Frame(_)) => continue,
                Some(Incoming::Closed(why)) => return Err(ConnectError::Handshake(why)),
                None => return Err(ConnectError::Handshake("connection closed".into())),
            }
        }
    })
    .await
    .map_err(|_| ConnectError::Timeout(timeout))??;
    Ok((conn, Duration::from_millis(welcome.heartbeat_ms)))
}

struct Sink {
    tx: mpsc::Sender<Item>,
    /// At most once: messages lost while `tx` was full.
    lag: Arc<AtomicU64>,
    ready: Option<(SubReady, HashSet<u64>)>,
    /// At least once or durable: the relay expects `Ack`s for what it delivers.
    acking: bool,
}

struct Driver {
    dialer: Dialer,
    max_frame: usize,
    connect_timeout: Duration,
    name: String,
    relay_auth: Option<crate::options::RelayAuth>,
    reconnect: Reconnect,
    outbox_limit: usize,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    core: ClientCore,
    sinks: HashMap<LocalSubId, Sink>,
    acks: HashMap<[u8; 16], oneshot::Sender<Result<u64, PublishError>>>,
    flushes: HashMap<u64, oneshot::Sender<Result<(), FlushError>>>,
    outbox: VecDeque<Bytes>,
    outbox_bytes: usize,
    state: watch::Sender<ConnectionState>,
    /// The counters; every change wakes `Client::stats_changes` receivers.
    stats: watch::Sender<ClientStats>,
    next_nonce: u64,
    plugins: Plugins,
    /// QoS ≥ 1 publishes not yet acknowledged, re-sent in order after a reconnect.
    inflight: HashMap<[u8; 16], (u64, Bytes)>,
    next_inflight: u64,
    /// One slot per delivered sequence, in order; acks leave for its released prefix.
    ack_queue: AckQueue,
    /// The client state file (outbox, dedup window, retained marks), with `Persistence`.
    #[cfg(feature = "persistence")]
    saved: Option<crate::persist::Store>,
}

enum Exit {
    Closed(Option<oneshot::Sender<()>>),
    Lost(String),
}

impl Driver {
    fn keep_inflight(&mut self, id: [u8; 16], frames: &[Bytes]) {
        if let Some(f) = frames.first() {
            #[cfg(feature = "persistence")]
            if let Some(st) = &self.saved {
                st.keep(&id, self.next_inflight, f);
            }
            self.inflight.insert(id, (self.next_inflight, f.clone()));
            self.next_inflight += 1;
            let n = self.inflight.len() as u64;
            self.stats.send_modify(|st| st.unacked_publishes = n);
        }
    }

    /// The relay acknowledged (or refused) a kept publish: forget it.
    fn done_inflight(&mut self, id: &[u8; 16]) {
        if self.inflight.remove(id).is_some() {
            #[cfg(feature = "persistence")]
            if let Some(st) = &self.saved {
                st.acked(id);
            }
            let n = self.inflight.len() as u64;
            self.stats.send_modify(|st| st.unacked_publishes = n);
        }
    }

    /// Writes the receiver state changes (dedup entries, retained marks) to the state file.
    fn persist_changes(&mut self) {
        let changes = self.core.take_changes();
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.saved {
            st.record(&changes, now_ms());
        }
        let _ = changes;
    }

    /// A grant was added at run time: saves the keyring's pins (a new tree pins its admin).
    fn save_pins(&self) {
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.saved {
            st.save_pins(
                &self
                    .core
                    .keyring()
                    .read()
                    .expect("keyring lock")
                    .export_pins(),
            );
        }
    }

    fn sync_stats(&self) {
        let (core, n) = (self.core.stats(), self.inflight.len() as u64);
        self.stats.send_modify(|st| {
            st.core = core;
            st.unacked_publishes = n;
        });
    }

    async fn run(mut self, first: Connection, heartbeat: Duration) {
        let mut conn = Some((first, heartbeat));
        loop {
            let (c, hb) = match conn.take() {
                Some(c) => c,
                None => match self.reconnect_loop().await {
                    Some(c) => c,
                    None => break,
                },
            };
            match self.serve(c, hb).await {
                Exit::Closed(done) => {
                    self.finish();
                    if let Some(d) = done {
                        let _ = d.send(());
                    }
                    return;
                }
                Exit::Lost(why) => {
                    tracing::info!(relay = %self.dialer.describe(), reason = %why, "connection lost; reconnecting");
                    for (_, tx) in self.flushes.drain() {
                        let _ = tx.send(Err(FlushError::Disconnected));
                    }
                    // QoS ≥ 1 publishes stay pending: they are re-sent once reconnected.
                    let lost: Vec<[u8; 16]> = self
                        .acks
                        .keys()
                        .filter(|pid| !self.inflight.contains_key(*pid))
                        .copied()
                        .collect();
                    for pid in lost {
                        if let Some(tx) = self.acks.remove(&pid) {
                            let _ = tx.send(Err(PublishError::NotAcknowledged));
                        }
                    }
                    // Unacknowledged deliveries are redelivered by the relay.
                    self.ack_queue.clear();
                }
            }
        }
        self.finish();
    }

    fn finish(&mut self) {
        // Refuse new commands before anyone learns the client is closed: a `publish` after
        // `close()` returned must fail, not land in a queue nobody reads.
        self.cmd_rx.close();
        let _ = self.state.send(ConnectionState::Closed);
        self.sinks.clear(); // ends every Subscription stream
        self.sync_stats();
    }

    /// Reconnects with backoff while still taking commands (publishes are buffered).
    async fn reconnect_loop(&mut self) -> Option<(Connection, Duration)> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let _ = self.state.send(ConnectionState::Reconnecting(attempt));
            if self.reconnect.max_attempts.is_some_and(|m| attempt > m) {
                return None;
            }
            let delay = self.reconnect.delay(attempt - 1, OsRng.gen::<f64>());
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.cmd_rx.recv() => match cmd {
                        None => return None,
                        Some(Command::Close(done)) => {
                            let _ = done.send(());
                            return None;
                        }
                        Some(cmd) => self.offline(cmd),
                    },
                }
            }
            match open(
                &self.dialer,
                self.max_frame,
                self.connect_timeout,
                &self.name,
                self.relay_auth.as_ref(),
            )
            .await
            {
                Ok(c) => {
                    self.stats.send_modify(|st| st.reconnects += 1);
                    return Some(c);
                }
                Err(e) => tracing::debug!(error = %e, attempt, "reconnect failed"),
            }
        }
    }

    /// Handles a command while disconnected.
    fn offline(&mut self, cmd: Command) {
        match cmd {
            Command::Send {
                frames,
                ack: Some((id, tx)),
                keep: true,
            } => {
                // Sent with the other unacknowledged publishes once reconnected.
                self.keep_inflight(id, &frames);
                self.acks.insert(id, tx);
            }
            Command::Send { frames, ack, .. } => {
                let len: usize = frames.iter().map(|f| f.len()).sum();
                if self.outbox_bytes + len > self.outbox_limit {
                    self.stats
                        .send_modify(|st| st.outbox_drops += frames.len() as u64);
                    if let Some((_, tx)) = ack {
                        let _ = tx.send(Err(PublishError::BufferFull(self.outbox_limit)));
                    }
                    return;
                }
                self.outbox_bytes += len;
                self.outbox.extend(frames);
                if let Some((id, tx)) = ack {
                    self.acks.insert(id, tx);
                }
            }
            Command::Subscribe {
                id,
                filter,
                opts,
                tx,
                lag,
                ready,
            } => match self
                .core
                .subscribe_with_options(id, filter, opts.clone(), now_ms())
            {
                Ok(_) => {
                    // Sent with every other subscription once reconnected.
                    self.sinks.insert(
                        id,
                        Sink {
                            tx,
                            lag,
                            ready: None,
                            acking: opts.acking(),
                        },
                    );
                    let _ = ready.send(Ok(()));
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
            Command::Unsubscribe { id } => {
                self.core.unsubscribe(id);
                self.sinks.remove(&id);
                self.ack_queue.drop_sub(id);
            }
            Command::Resubscribe => self.save_pins(),
            // The relay redelivers what was not acknowledged on the old connection.
            Command::Ack { .. } => {}
            Command::Flush(tx) => {
                let _ = tx.send(Err(FlushError::Disconnected));
            }
            Command::Close(_) => unreachable!("handled by the caller"),
        }
    }

    async fn serve(&mut self, conn: Connection, heartbeat: Duration) -> Exit {
        let Connection {
            mut writer,
            mut incoming,
        } = conn;
        // Re-establish every subscription, then send what was buffered while offline.
        let mut pending: Vec<Bytes> = self
            .core
            .resubscribe_all(now_ms())
            .iter()
            .map(Frame::to_bytes)
            .collect();
        let mut inflight: Vec<&(u64, Bytes)> = self.inflight.values().collect();
        inflight.sort_by_key(|(order, _)| *order);
        pending.extend(inflight.into_iter().map(|(_, f)| f.clone()));
        pending.extend(self.outbox.drain(..));
        self.outbox_bytes = 0;
        for f in pending {
            if let Err(e) = writer.write(f).await {
                return Exit::Lost(e.to_string());
            }
        }
        if let Err(e) = writer.flush().await {
            return Exit::Lost(e.to_string());
        }
        let _ = self.state.send(ConnectionState::Connected);
        let mut tick = tokio::time::interval(if heartbeat.is_zero() {
            Duration::from_secs(30)
        } else {
            heartbeat
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut unanswered_pings = 0u32;
        loop {
            let mut out: Vec<Bytes> = Vec::new();
            tokio::select! {
                cmd = self.cmd_rx.recv() => {
                    let Some(cmd) = cmd else { writer.close().await; return Exit::Closed(None) };
                    if let Some(exit) = self.online(cmd, &mut out) { let _ = flush_all(&mut writer, out).await; writer.close().await; return exit; }
                    // Batch whatever else is ready into the same flush.
                    for _ in 0..256 {
                        match self.cmd_rx.try_recv() {
                            Ok(cmd) => if let Some(exit) = self.online(cmd, &mut out) { let _ = flush_all(&mut writer, out).await; writer.close().await; return exit; },
                            Err(_) => break,
                        }
                    }
                }
                inc = incoming.recv() => {
                    // Handle up to 256 frames per wake-up; each one fetched is handled.
                    let mut next = inc;
                    for n in 0..256 {
                        match next {
                            Some(Incoming::Frame(f)) => {
                                if matches!(f, Frame::Pong(_)) { unanswered_pings = 0; }
                                if let Some(why) = self.on_frame(f, &mut out) { return Exit::Lost(why); }
                            }
                            Some(Incoming::Closed(why)) => return Exit::Lost(why),
                            None => return Exit::Lost("reader stopped".into()),
                        }
                        if n == 255 {
                            break; // the rest waits for the next wake-up, still queued
                        }
                        match incoming.try_recv() {
                            Ok(i) => next = Some(i),
                            Err(_) => break,
                        }
                    }
                    self.sync_stats();
                }
                _ = tick.tick() => {
                    if unanswered_pings >= 2 {
                        return Exit::Lost("relay stopped answering pings".into());
                    }
                    unanswered_pings += 1;
                    out.push(Frame::Ping(Ping { nonce: 0 }).to_bytes());
                }
            }
            if self.ack_queue.has_ready() {
                // The released prefix of the ack queue, in relay-sequence order.
                for chunk in self.ack_queue.take_ready().chunks(4096) {
                    out.push(
                        Frame::Ack(Ack {
                            seqs: chunk.to_vec(),
                        })
                        .to_bytes(),
                    );
                }
            }
            if !out.is_empty() {
                if let Err(e) = flush_all(&mut writer, out).await {
                    return Exit::Lost(e.to_string());
                }
            }
        }
    }

    /// Handles a command while connected; frames to send go to `out`.
    fn online(&mut self, cmd: Command, out: &mut Vec<Bytes>) -> Option<Exit> {
        match cmd {
            Command::Send { frames, ack, keep } => {
                if let (Some((id, _)), true) = (&ack, keep) {
                    self.keep_inflight(*id, &frames);
                }
                out.extend(frames);
                if let Some((id, tx)) = ack {
                    self.acks.insert(id, tx);
                }
            }
            Command::Ack { slot, sub } => self.ack_queue.taken(slot, sub),
            Command::Subscribe {
                id,
                filter,
                opts,
                tx,
                lag,
                ready,
            } => match self
                .core
                .subscribe_with_options(id, filter, opts.clone(), now_ms())
            {
                Ok(frames) => {
                    let ids: HashSet<u64> = self.core.relay_ids(id).iter().copied().collect();
                    out.extend(frames.iter().map(Frame::to_bytes));
                    self.sinks.insert(
                        id,
                        Sink {
                            tx,
                            lag,
                            ready: Some((ready, ids)),
                            acking: opts.acking(),
                        },
                    );
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
            Command::Unsubscribe { id } => {
                out.extend(self.core.unsubscribe(id).iter().map(Frame::to_bytes));
                self.sinks.remove(&id);
                self.ack_queue.drop_sub(id);
            }
            Command::Resubscribe => {
                self.save_pins();
                // Drop the old relay subscriptions, then subscribe with the current keys.
                let ids: Vec<LocalSubId> = self.sinks.keys().copied().collect();
                for id in &ids {
                    out.extend(self.core.relay_ids(*id).iter().map(|r| {
                        Frame::Unsub(whispeer_protocol::frame::Unsub { sub_id: *r }).to_bytes()
                    }));
                }
                out.extend(
                    self.core
                        .resubscribe_all(now_ms())
                        .iter()
                        .map(Frame::to_bytes),
                );
            }
            Command::Flush(tx) => {
                let nonce = self.next_nonce;
                self.next_nonce += 1;
                self.flushes.insert(nonce, tx);
                out.push(Frame::Ping(Ping { nonce }).to_bytes());
            }
            Command::Close(done) => {
                out.push(
                    Frame::Close(Close {
                        code: ErrorCode::Other(0),
                        message: "client closing".into(),
                    })
                    .to_bytes(),
                );
                return Some(Exit::Closed(Some(done)));
            }
        }
        None
    }

    /// One delivered message: the core decides (open, checks, room); every outcome takes
    /// one slot of the ack queue when the relay expects acks, so acks leave in relay order
    /// whatever became of the envelope (no key oracle).
    ///
    /// Every at-least-once subscription the relay routed the envelope to gets exactly one
    /// item for its slot: the message when it opened and matched, otherwise a hidden
    /// placeholder that its stream consumes silently. So a slot is released when the app
    /// reaches it in its stream whatever became of the envelope, and the timing of the acks
    /// follows the app's reading, never the outcome of opening (PROTOCOL §4.10).
    fn on_msg(&mut self, m: &whispeer_protocol::frame::Msg) {
        let sinks = &self.sinks;
        // At most once, a pending lag report goes first, so it needs a slot too.
        let room = |id: LocalSubId| {
            sinks.get(&id).is_some_and(|s| {
                let lag_first = !s.acking && s.lag.load(Ordering::Acquire) > 0;
                s.tx.capacity() > usize::from(lag_first)
            })
        };
        let routed = if m.seq > 0 {
            self.core.route_acking(m)
        } else {
            Vec::new()
        };
        let delivery = self.core.receive_with(m, now_ms(), &room);
        self.persist_changes();
        let (r, targets, lagged) = match delivery {
            Delivery::Deliver {
                msg,
                targets,
                lagged,
            } => (msg, targets, lagged),
            Delivery::HeldBack => {
                if !routed.is_empty() {
                    self.ack_queue.held_back(m.seq, &routed);
                }
                self.sync_stats();
                return;
            }
            _ => {
                self.sync_stats();
                self.hand_out(m.seq, &routed, None, &[]);
                return;
            }
        };
        if !lagged.is_empty() {
            // The subscription's lag first: whoever sees the counter move (a test, a
            // dashboard) must then find the loss in the stream too.
            for id in &lagged {
                if let Some(s) = self.sinks.get(id) {
                    s.lag.fetch_add(1, Ordering::AcqRel);
                }
            }
            self.stats
                .send_modify(|st| st.slow_subscriber_drops += lagged.len() as u64);
        }
        let mut r = r;
        if !targets.is_empty() && !self.plugins.is_empty() {
            let rm = Arc::make_mut(&mut r);
            if self.plugins.on_message(rm) == Verdict::Drop {
                self.stats.send_modify(|st| st.plugin_drops += 1);
                self.sync_stats();
                self.hand_out(m.seq, &routed, None, &[]);
                return;
            }
        }
        self.sync_stats(); // counters are current before the app sees the message
        self.hand_out(m.seq, &routed, Some(&r), &targets);
    }

    /// Hands one delivered envelope to the subscriptions: `msg` to `targets`, and a hidden
    /// placeholder to every other at-least-once subscription in `routed` (one item per
    /// routed subscription, whatever the envelope's fate); takes its ack-queue slot.
    fn hand_out(
        &mut self,
        seq: u64,
        routed: &[LocalSubId],
        msg: Option<&Arc<Received>>,
        targets: &[LocalSubId],
    ) {
        let acking = |id: &LocalSubId| self.sinks.get(id).is_some_and(|s| s.acking);
        // Routed subscriptions without room (never when the relay honours the credit) or
        // without a sink do not wait: their part of the slot is released with it.
        let hidden: Vec<LocalSubId> = routed
            .iter()
            .copied()
            .filter(|id| !targets.contains(id) && acking(id))
            .filter(|id| self.sinks.get(id).is_some_and(|s| s.tx.capacity() > 0))
            .collect();
        let mut waiting: Vec<LocalSubId> = targets.iter().copied().filter(acking).collect();
        waiting.extend(hidden.iter().copied());
        let slot = if seq == 0 || routed.is_empty() && waiting.is_empty() {
            None
        } else if waiting.is_empty() {
            self.ack_queue.placeholder(seq, routed);
            None
        } else {
            Some(self.ack_queue.deliver(seq, routed, waiting))
        };
        let mut failed = Vec::new();
        if let Some(r) = msg {
            for t in targets {
                let Some(s) = self.sinks.get(t) else { continue };
                if !s.acking {
                    // Report what was lost before this message, in order.
                    let lost = s.lag.swap(0, Ordering::AcqRel);
                    if lost > 0 && s.tx.try_send(Item::Lagged(lost)).is_err() {
                        s.lag.fetch_add(lost, Ordering::AcqRel);
                    }
                }
                let item = Item::Msg(r.clone(), if s.acking { slot } else { None });
                if s.tx.try_send(item).is_err() && s.acking {
                    // Checked for room just before: only a closed subscription gets here.
                    failed.push(*t);
                }
            }
        }
        if let Some(slot) = slot {
            for h in &hidden {
                let sent = self
                    .sinks
                    .get(h)
                    .is_some_and(|s| s.tx.try_send(Item::Hidden(slot)).is_ok());
                if !sent {
                    failed.push(*h);
                }
            }
        }
        for t in failed {
            self.ack_queue.drop_sub(t);
        }
    }

    /// Handles a frame from the relay; returns a reason when the connection must be dropped.
    fn on_frame(&mut self, f: Frame, out: &mut Vec<Bytes>) -> Option<String> {
        match f {
            Frame::Msg(m) => self.on_msg(&m),
            Frame::SubOk(ok) => {
                if let Some(local) = self.core.local_for(ok.sub_id) {
                    if let Some(sink) = self.sinks.get_mut(&local) {
                        if let Some((_, ids)) = &mut sink.ready {
                            ids.remove(&ok.sub_id);
                            if ids.is_empty() {
                                if let Some((tx, _)) = sink.ready.take() {
                                    let _ = tx.send(Ok(()));
                                }
                            }
                        }
                    }
                }
            }
            Frame::PubAck(a) => {
                self.done_inflight(&a.publish_id);
                if let Some(tx) = self.acks.remove(&a.publish_id) {
                    let _ = tx.send(Ok(a.seq));
                }
            }
            Frame::Pong(p) => {
                if let Some(tx) = self.flushes.remove(&p.nonce) {
                    let _ = tx.send(Ok(()));
                }
            }
            Frame::Ping(p) => out.push(Frame::Pong(Pong { nonce: p.nonce }).to_bytes()),
            Frame::ReplayDone(d) => self.core.replay_done(d.sub_id),
            Frame::Gap(g) => {
                // The relay dropped messages for this connection (at most once): every
                // at-most-once subscription learns it, in order with its messages.
                self.core.on_gap(g.dropped);
                for s in self.sinks.values().filter(|s| !s.acking) {
                    if s.tx.try_send(Item::Lagged(g.dropped)).is_err() {
                        s.lag.fetch_add(g.dropped, Ordering::AcqRel);
                    }
                }
            }
            Frame::Err(e) => {
                tracing::warn!(code = e.code.name(), message = %e.message, fatal = e.fatal, "relay error");
                if let Some(pid) = e.publish_id {
                    self.done_inflight(&pid);
                    if let Some(tx) = self.acks.remove(&pid) {
                        let _ = tx.send(Err(PublishError::Rejected {
                            code: e.code,
                            message: e.message.clone(),
                        }));
                    }
                }
                if let Some(sid) = e.sub_id {
                    if let Some(local) = self.core.local_for(sid) {
                        if let Some(sink) = self.sinks.get_mut(&local) {
                            if let Some((tx, _)) = sink.ready.take() {
                                let _ = tx.send(Err(SubscribeError::Rejected {
                                    code: e.code,
                                    message: e.message.clone(),
                                }));
                            }
                        }
                    }
                }
                if e.fatal {
                    return Some(format!("relay error: {} ({})", e.message, e.code.name()));
                }
            }
            Frame::Close(c) => {
                return Some(format!(
                    "relay closed the connection: {} ({})",
                    c.message,
                    c.code.name()
                ))
            }
            other => tracing::debug!(frame = other.name(), "ignoring unexpected frame"),
        }
        None
    }
}

async fn flush_all(w: &mut transport::FrameWriter, frames: Vec<Bytes>) -> std::io::Result<()> {
    for f in frames {
        w.write(f).await?;
    }
    w.flush().await
}
