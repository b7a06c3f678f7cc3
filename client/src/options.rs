//! The client's settings, [`ClientBuilder`], and the engines that fill them in: each
//! `.with(...)` adds one capability, in the seed's style (connecting is `client::builder`'s):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use whispeer::{Client, Compression, Encryption, Keyring, WebSocket};
//! let keyring = Keyring::new();
//! let client = Client::builder()
//!     .with(WebSocket::new("ws://127.0.0.1:7070"))
//!     .with(Compression::zstd(3))
//!     .with(Encryption::with_keyring(keyring))
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use whispeer_protocol::{
    Grant, Identity, KeyError, Keyring, Padding as PadMode, SealOptions, SenderId, TopicFilter,
    TreeKey,
};

use crate::core::receive::ReceiveConfig;
use crate::core::SealPolicy;
use crate::plugin::Plugins;
use crate::transport::TlsSettings;

/// Configures and connects a [`Client`](crate::Client); add engines with [`ClientBuilder::with`].
#[derive(Debug)]
pub struct ClientBuilder {
    /// The relay URLs in the order they are tried (every transport engine appends one;
    /// [`Relays`] appends several). See [`Relays`] for failover.
    pub(crate) urls: Vec<String>,
    #[cfg(feature = "in-process")]
    pub(crate) in_process: Option<whispeer_relay::RelayHandle>,
    pub(crate) tls: TlsSettings,
    pub(crate) keyring: Keyring,
    pub(crate) identity: Option<Identity>,
    pub(crate) policy: SealPolicy,
    /// The [`TopicOptions`] sealing rules as given (what each sets), behind
    /// `policy.per_topic`: what a rule leaves unset is the client-wide setting as finally
    /// configured ([`ClientBuilder::resolve_topic_rules`]), whatever the order of `with`.
    pub(crate) topic_rules: Vec<TopicSealRule>,
    pub(crate) reconnect: Reconnect,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) outbox_bytes: usize,
    pub(crate) kept_bytes: usize,
    pub(crate) publish_buffer: usize,
    /// Seal jobs on the worker threads at once (`None`: by core count and
    /// `WHISPEER_SEAL_AHEAD`; 0: inline on the connection task).
    pub(crate) seal_jobs: Option<usize>,
    /// Steady-stream batching (`None`: `WHISPEER_STEADY_BATCHING`, off by default).
    pub(crate) steady_batching: Option<bool>,
    pub(crate) sub_capacity: usize,
    pub(crate) name: String,
    pub(crate) plugins: Plugins,
    pub(crate) receive: ReceiveConfig,
    /// The client state file (`Persistence`).
    #[cfg(feature = "persistence")]
    pub(crate) state_file: Option<std::path::PathBuf>,
    /// The relay account sent in `Hello` (key or bearer token).
    pub(crate) relay_auth: Option<RelayAuth>,
    /// Sign in with the account key only when the relay asks for a relay-bound signature.
    pub(crate) require_bound_auth: bool,
    pub(crate) durable_owner: Option<zeroize::Zeroizing<[u8; 32]>>,
    /// Key strings given to `Encryption` that did not parse (`connect` fails with it).
    pub(crate) key_error: Option<KeyError>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            urls: Vec::new(),
            #[cfg(feature = "in-process")]
            in_process: None,
            tls: TlsSettings::default(),
            keyring: Keyring::new(),
            identity: None,
            policy: SealPolicy::default(),
            topic_rules: Vec::new(),
            reconnect: Reconnect::default(),
            connect_timeout: Duration::from_secs(10),
            max_frame: whispeer_protocol::limits::DEFAULT_MAX_FRAME,
            outbox_bytes: 8 * 1024 * 1024,
            kept_bytes: 64 * 1024 * 1024,
            publish_buffer: 4 * 1024 * 1024,
            seal_jobs: None,
            steady_batching: None,
            sub_capacity: 65_536,
            name: format!("whispeer-rs/{}", env!("CARGO_PKG_VERSION")),
            plugins: Plugins::default(),
            receive: ReceiveConfig::default(),
            #[cfg(feature = "persistence")]
            state_file: None,
            relay_auth: None,
            require_bound_auth: false,
            durable_owner: None,
            key_error: None,
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

    /// Re-derives every [`TopicOptions`] sealing rule in `policy.per_topic` from what it
    /// sets and the client-wide settings as they are now: called whenever either changes,
    /// so a rule inherits the client's compression, padding and suite whether it was added
    /// before or after them (a rule naming only a suite never turns compression back on for
    /// a client that turned it off, PROTOCOL §11).
    pub(crate) fn resolve_topic_rules(&mut self) {
        let default = self.policy.default;
        for r in &self.topic_rules {
            if let Some((f, o)) = self.policy.per_topic.get_mut(r.index) {
                if *f == r.filter {
                    *o = r.resolve(default);
                }
            }
        }
    }

    /// Sets a client-wide sealing default and re-derives the per-topic rules from it.
    fn set_seal_default(&mut self, set: impl FnOnce(&mut SealOptions)) {
        set(&mut self.policy.default);
        self.resolve_topic_rules();
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
    /// Bytes of QoS ≥ 1 publishes kept until the relay's `PubAck` (re-sent with the same
    /// publish id after every reconnect; default 64 MiB). Beyond it a new QoS ≥ 1 publish
    /// fails with `PublishError::BufferFull`; the ones kept stay kept.
    pub fn unacked_publish_buffer(mut self, bytes: usize) -> Self {
        self.kept_bytes = bytes.max(1);
        self
    }
    /// Bytes of publishes the connection may have still to write before `publish` waits
    /// (default 4 MiB): backpressure, so a tight publish loop runs at the speed of the
    /// link and memory stays bounded; nothing is dropped. See [`Client::queued_bytes`].
    ///
    /// [`Client::queued_bytes`]: crate::Client::queued_bytes
    pub fn publish_buffer(mut self, bytes: usize) -> Self {
        self.publish_buffer = bytes.max(1);
        self
    }
    /// Batch signing: how many seal jobs (one batch each: seal every message, one
    /// signature) may run on the worker threads at once; 0 seals on the connection task
    /// (one core). By default 2 with more than two cores, else 0 — on two cores the
    /// hand-off gained nothing measurable (`WHISPEER_SEAL_AHEAD` overrides the default).
    /// Frames leave in publish order either way.
    pub fn seal_jobs(mut self, n: usize) -> Self {
        self.seal_jobs = Some(n);
        self
    }
    /// Batch signing of a steady stream (off by default; `WHISPEER_STEADY_BATCHING=1`
    /// turns it on where this is not called): while lone publishes come at about 6,000 a
    /// second or more, each waits — at most to the end of the millisecond it came in — for
    /// up to two more, and they share one signature (and one verification at every
    /// receiver). At 10k msg/s, 1 KiB, on two cores it took the batch-signed p99 from 5–15
    /// ms to 2.1–3.2 ms and the CPU per message down by 15–25 %; at moderate steady rates
    /// (3.5–5k msg/s) it roughly doubles the median latency (≈ 0.2 → 0.5 ms) for less CPU.
    /// Bursts and sparse publishes are cut as without it (client README, "Steady streams").
    pub fn steady_batching(mut self, on: bool) -> Self {
        self.steady_batching = Some(on);
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
    /// subscription asks for `older_history` (default 7 days). The window costs about 95
    /// bytes of memory per message delivered within it (a 16-byte digest, its expiry and
    /// the table around them): at 1,000 msg/s, ~57 GB for 7 days — a high-rate subscriber
    /// that needs less replay protection sets a shorter horizon.
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
    /// Most messages the dedup window remembers (default 4 million, ~380 MB at most). At
    /// the limit the oldest are forgotten and history dated before the oldest one still
    /// remembered is refused (counted as `refused.before_window`) unless a subscription
    /// asks for `older_history`: a bounded memory, never a message delivered twice.
    ///
    /// It bounds the retained high-water marks too (one per topic a message was accepted
    /// on, 83–165 bytes each): past it the oldest are evicted (`refused.marks_evicted`;
    /// such a topic loses its rollback check) and remembered in a fixed table of
    /// `messages / 2` evicted topics (8.5 bytes per message of the capacity, allocated at
    /// the first eviction), so an evicted topic's old value is never delivered twice. A
    /// topic never evicted gets its current value however old, unless more than
    /// `messages / 4` topics were evicted within the horizon: then the table's buckets
    /// overflow, and old retained values on other topics start to be held to the
    /// window's start (see `ReceiveConfig::max_entries` for the rates).
    pub fn dedup_capacity(mut self, messages: usize) -> Self {
        self.receive.max_entries = messages.max(1);
        self
    }
    /// Largest payload a received message may decompress to (default 16 MiB, the most a
    /// default publisher seals, so no honest message is refused). A message over it is
    /// refused (counted in `rejected`) from its declared size, before anything is
    /// allocated for it. Only messages that pass every receiver check are decompressed (a
    /// duplicate or a replay never is), but zstd stores 16 MiB of zeros in about 1 KiB:
    /// one such message accepted costs every subscriber the full payload in memory. A
    /// subscriber that expects small messages sets this lower.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.receive.max_payload = bytes;
        self
    }
    /// With a relay account key ([`RelayAuth::key`]): sign in only to relays that ask for
    /// a sign-in bound to their name (PROTOCOL §3.5.6) — a relay that does not (it sets no
    /// `auth.names`, or predates relay binding) fails the connection with
    /// [`ConnectError::AuthNotBound`](crate::ConnectError::AuthNotBound) instead of getting
    /// the legacy signature. Default off.
    ///
    /// Whatever this says, the client signs the name of the relay it dialed whenever a
    /// relay asks, and a relay with `auth.names` refuses a signature made for another name:
    /// a relay passing that relay's challenge on gets nothing it can use there. A relay
    /// *without* names takes any sign-in, forwarded ones too; this option keeps the account
    /// key away from such relays, at the price of not connecting to them at all.
    pub fn require_bound_auth(mut self, yes: bool) -> Self {
        self.require_bound_auth = yes;
        self
    }
}

/// Something the builder can be given with `.with(...)`.
pub trait Engine {
    /// Applies this engine to the builder.
    fn apply(self, b: &mut ClientBuilder);
    /// Applies this engine to a broker's builder: by default to its embedded client; the
    /// transports (serve there), `Persistence` (relay history and client outbox in one
    /// directory) and `Encryption` (the broker's keys) mean more on a broker.
    #[doc(hidden)]
    fn apply_broker(self, b: &mut BrokerSetup)
    where
        Self: Sized,
    {
        self.apply(&mut b.client);
    }
}

/// What a broker's `.with(...)` collected (see [`Engine::apply_broker`]).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct BrokerSetup {
    /// The embedded client's settings (and those of `connect_client`).
    pub(crate) client: ClientBuilder,
    /// Also serve WebSocket there (`http://`, `ws://` URL or `host:port`).
    pub(crate) serve_ws: Option<String>,
    /// Also serve length-prefixed TCP there (`tcp://` URL or `host:port`).
    pub(crate) serve_tcp: Option<String>,
    /// Also serve QUIC there (`quic://` URL or `host:port`).
    pub(crate) serve_quic: Option<String>,
    /// The directory of the relay's history, the client's outbox and the key file.
    #[cfg_attr(not(feature = "in-process"), allow(dead_code))]
    pub(crate) store_dir: Option<std::path::PathBuf>,
    /// The broker's keys (default: a fresh tree).
    pub(crate) encryption: Option<Encryption>,
}

/// Several relays to fail over between, tried in order: `ws://`, `wss://`, `tcp://`,
/// `tls://` and `quic://` URLs may be mixed. A bare `host:port` means `ws://` only on a
/// loopback host; elsewhere `connect` refuses it — write `wss://` (TLS) or `ws://` /
/// `tcp://` for plaintext ([`Relays::urls`]).
///
/// Plaintext (`ws://`, `tcp://`) to a host other than loopback with a relay account
/// ([`RelayAuth`]) logs a warning (`tracing`) once per URL at `connect`:
/// the bearer token, or the account key's sign-in, crosses the network in the clear, and so
/// does all metadata.
///
/// Every transport engine ([`WebSocket`], [`Tcp`], [`Quic`]) *appends* its URL, so
/// `.with(WebSocket::new(a)).with(Tcp::new(b))` is the same list as
/// `.with(Relays::new([a, "tcp://b"]))`; a single one is the one relay it always was.
///
/// The client connects to the first relay that answers: `connect` tries each in turn and
/// fails only when every one failed (with the error of the last).
/// When a connection is lost it moves at once to the next URL, round robin; only after a
/// full round of failures does it wait, with the [`Reconnect`] backoff (whose
/// `max_attempts` then counts rounds). On every new connection it resubscribes and re-sends
/// the unacknowledged QoS ≥ 1 publishes with their ids, as a reconnect to the same relay
/// does. Subscriptions resume after the last relay sequence seen only on a relay of the
/// same sequence space (`Welcome.seq_space`: the same store, or a cluster sharing one);
/// elsewhere they start again as first asked, and the dedup window drops what was already
/// delivered. [`Client::relay_url`](crate::Client::relay_url) tells which relay is in use.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use whispeer::{Client, Relays};
/// let client = Client::builder()
///     .with(Relays::new(["ws://relay-a:7070", "tcp://relay-b:7481"]))
///     .connect()
///     .await?;
/// println!("connected to {}", client.relay_url());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Relays(pub(crate) Vec<String>);
impl Relays {
    /// These URLs, in order.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Relays(urls.into_iter().map(Into::into).collect())
    }
    /// A comma-separated list (`"ws://a:7070,tcp://b:7481"`), as the CLI's `--relay`
    /// takes; blanks around entries and empty entries are ignored. Each entry needs its
    /// scheme unless its host is loopback (see [`Relays::urls`]).
    pub fn parse_list(list: &str) -> Self {
        Relays(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }
    /// The URLs, as they will be dialed.
    ///
    /// An address without a scheme is `ws://` only on a loopback host (`localhost`,
    /// 127.0.0.0/8, `::1`): `127.0.0.1:7070` dials `ws://127.0.0.1:7070`. Anywhere else it
    /// is kept as given and `connect` refuses it
    /// ([`ConnectError::InvalidUrl`](crate::ConnectError::InvalidUrl), saying to write
    /// `wss://` for TLS or `ws://` / `tcp://` for plaintext): `relay.example:443` read as
    /// `ws://` sent the relay account's token and all metadata in cleartext to anyone on the
    /// path.
    pub fn urls(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|u| {
                if u.contains("://") || !crate::transport::scheme_less_is_loopback(u) {
                    u.clone()
                } else {
                    format!("ws://{u}")
                }
            })
            .collect()
    }
}
impl Engine for Relays {
    fn apply(self, b: &mut ClientBuilder) {
        b.urls.extend(self.urls());
    }
}

/// Connect over WebSocket (`ws://` or `wss://`).
#[derive(Debug, Clone)]
pub struct WebSocket(pub(crate) String);
impl WebSocket {
    /// A WebSocket URL.
    pub fn new(url: impl Into<String>) -> Self {
        WebSocket(url.into())
    }
}
impl Engine for WebSocket {
    fn apply(self, b: &mut ClientBuilder) {
        b.urls.push(self.0);
    }
    fn apply_broker(self, b: &mut BrokerSetup) {
        b.serve_ws = Some(self.0);
    }
}

/// Connect over length-prefixed TCP (`host:port`, `tcp://host:port` or `tls://host:port`).
#[derive(Debug, Clone)]
pub struct Tcp(pub(crate) String);
impl Tcp {
    /// An address or URL.
    pub fn new(addr: impl Into<String>) -> Self {
        Tcp(addr.into())
    }
}
impl Engine for Tcp {
    fn apply(self, b: &mut ClientBuilder) {
        let a = self.0;
        b.urls.push(if a.contains("://") {
            a
        } else {
            format!("tcp://{a}")
        });
    }
    fn apply_broker(self, b: &mut BrokerSetup) {
        b.serve_tcp = Some(self.0);
    }
}

/// Connect over QUIC (`quic://host:port`, or `host:port`): one stream of length-prefixed
/// frames, TLS 1.3 with the same roots and pins as `tls://` ([`TlsRoot`], [`TlsPin`]), and
/// connection migration — the connection survives a change of the client's address.
#[derive(Debug, Clone)]
pub struct Quic(pub(crate) String);
impl Quic {
    /// An address or URL.
    pub fn new(addr: impl Into<String>) -> Self {
        Quic(addr.into())
    }
}
impl Engine for Quic {
    fn apply(self, b: &mut ClientBuilder) {
        let a = self.0;
        b.urls.push(if a.contains("://") {
            a
        } else {
            format!("quic://{a}")
        });
    }
    fn apply_broker(self, b: &mut BrokerSetup) {
        b.serve_quic = Some(self.0);
    }
}

/// Default payload compression for every topic (per-topic rules override it).
#[derive(Debug, Clone, Copy)]
pub struct Compression(pub(crate) whispeer_protocol::Compression);
impl Compression {
    /// zstd at level 3 (the default).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::zstd(3)
    }
    /// zstd at `level` (1–22; 3 is a good default).
    pub fn zstd(level: i32) -> Self {
        Compression(whispeer_protocol::Compression::Zstd(level))
    }
    /// No compression (each message's exact size is then visible to the relay unless padded).
    pub fn none() -> Self {
        Compression(whispeer_protocol::Compression::None)
    }
    /// LZ4 (`codec` 2): several times cheaper than zstd in CPU, a worse ratio; for
    /// high-rate topics where the sealer's CPU matters more than bytes on the wire.
    pub fn lz4() -> Self {
        Compression(whispeer_protocol::Compression::Lz4)
    }
    /// zstd at `level` with a dictionary (`codec` 3, PROTOCOL §4.6.1): small messages that
    /// share structure (JSON telemetry, chat) compress several times better. The keyring
    /// must hold the dictionary — pass its `wsdict1…` string with the keys
    /// ([`Encryption::with_keys`]) or add it to the [`Keyring`]
    /// ([`Keyring::add_dictionary`]) — else publishing fails with
    /// `SealError::MissingDictionary`. Receivers need it too: share it as keys are shared;
    /// one without it counts the message as refused and logs the dictionary id it lacks.
    pub fn zstd_dict(level: i32, dict: &whispeer_protocol::Dictionary) -> Self {
        Compression(whispeer_protocol::Compression::ZstdDict {
            level,
            dict: dict.id(),
        })
    }
    /// The protocol's value.
    pub fn into_inner(self) -> whispeer_protocol::Compression {
        self.0
    }
    /// Parses `none`, `zstd` (level 3), `zstd:N`, `lz4` or `zstd-dict:ID[:N]` (the CLI's
    /// `--compress`).
    pub fn from_name(s: &str) -> Option<Self> {
        whispeer_protocol::Compression::from_name(s).map(Compression)
    }
}
impl Engine for Compression {
    fn apply(self, b: &mut ClientBuilder) {
        b.set_seal_default(|d| d.compression = self.0);
    }
}

/// Default AEAD suite of the envelopes this client seals (per-topic rules override it,
/// [`TopicOptions::suite`]). Receivers open every suite whatever this says.
#[derive(Debug, Clone, Copy)]
pub struct CipherSuite(pub(crate) whispeer_protocol::Suite);
impl CipherSuite {
    /// XChaCha20-Poly1305 (suite 1, the default): constant time on every CPU.
    pub fn xchacha() -> Self {
        CipherSuite(whispeer_protocol::Suite::XChaCha20Poly1305)
    }
    /// AES-256-GCM (suite 3): faster on CPUs with AES and carry-less multiply
    /// instructions (x86-64 with AES-NI, ARMv8 with the crypto extensions).
    pub fn aes_gcm() -> Self {
        CipherSuite(whispeer_protocol::Suite::Aes256Gcm)
    }
    /// Parses `xchacha` or `aes-gcm` (the CLI's `--suite`).
    pub fn from_name(s: &str) -> Option<Self> {
        whispeer_protocol::Suite::from_name(s).map(CipherSuite)
    }
    /// The protocol's value.
    pub fn into_inner(self) -> whispeer_protocol::Suite {
        self.0
    }
}
impl Engine for CipherSuite {
    fn apply(self, b: &mut ClientBuilder) {
        b.set_seal_default(|d| d.suite = self.0);
    }
}

/// Default length hiding for every topic.
#[derive(Debug, Clone, Copy)]
pub struct Padding(pub(crate) PadMode);
impl Padding {
    /// Padmé buckets (the default).
    pub fn padme() -> Self {
        Padding(PadMode::Padme)
    }
    /// Exact lengths.
    pub fn none() -> Self {
        Padding(PadMode::None)
    }
    /// The protocol's value.
    pub fn into_inner(self) -> PadMode {
        self.0
    }
}
impl Engine for Padding {
    fn apply(self, b: &mut ClientBuilder) {
        b.set_seal_default(|d| d.padding = self.0);
    }
}

/// The keys: a fresh tree ([`Encryption::new`]), key strings ([`Encryption::with_keys`])
/// or a [`Keyring`] of grants ([`Encryption::with_keyring`]).
#[derive(Debug)]
pub struct Encryption(pub(crate) EncryptionKeys);

/// Where an [`Encryption`] engine's keys come from.
#[derive(Debug)]
pub(crate) enum EncryptionKeys {
    /// A fresh random tree key (a broker keeps it, with persistence, in its key file).
    Fresh,
    /// Parsed key strings (`wstree1…` tree keys, `wskey1…` grants).
    Keys(Vec<AnyKey>),
    /// A ready keyring.
    Keyring(Keyring),
}

/// A parsed key string: a tree admin key or a grant.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a handful of keys per process
pub(crate) enum AnyKey {
    Tree(TreeKey),
    Grant(Grant),
    /// A zstd dictionary (`wsdict1…`): content that travels with the keys.
    Dict(whispeer_protocol::Dictionary),
}

impl AnyKey {
    pub(crate) fn parse(s: &str) -> Result<AnyKey, KeyError> {
        let s = s.trim();
        let lower = s.get(..7).unwrap_or(s).to_ascii_lowercase();
        if lower.starts_with("wstree1") {
            Ok(AnyKey::Tree(TreeKey::from_key_string(s)?))
        } else if lower.starts_with("wsdict1") {
            Ok(AnyKey::Dict(
                whispeer_protocol::Dictionary::from_key_string(s)?,
            ))
        } else {
            Ok(AnyKey::Grant(Grant::from_key_string(s)?))
        }
    }
    /// Adds `keys` to `ring`, their dictionaries (`wsdict1…`) for the trees of the tree
    /// keys and grants among them (PROTOCOL §4.6.1: a key file's dictionaries serve its
    /// keys' trees, so a member of another tree cannot make her messages read them); for
    /// every tree only when the list holds no tree key or grant.
    pub(crate) fn add_all(
        keys: &[AnyKey],
        ring: &mut Keyring,
        now_ms: u64,
    ) -> Result<(), KeyError> {
        let mut trees = Vec::new();
        for k in keys {
            let tree = match k {
                AnyKey::Tree(t) => {
                    ring.add_tree_key_at(t, now_ms)?;
                    t.tree_id()
                }
                AnyKey::Grant(g) => {
                    ring.add_grant_at(g.clone(), now_ms)?;
                    g.cert().keys().tree_id()
                }
                AnyKey::Dict(_) => continue,
            };
            if !trees.contains(&tree) {
                trees.push(tree);
            }
        }
        for k in keys {
            if let AnyKey::Dict(d) = k {
                if trees.is_empty() {
                    ring.try_add_dictionary(d.clone())?;
                }
                for t in &trees {
                    ring.add_dictionary_for(*t, d.clone())?;
                }
            }
        }
        Ok(())
    }
    /// The string to share: a grant of the whole tree for a tree key (not the admin key).
    #[cfg_attr(not(feature = "in-process"), allow(dead_code))]
    pub(crate) fn share_string(&self) -> zeroize::Zeroizing<String> {
        match self {
            AnyKey::Tree(t) => t.grant_all().to_key_string(),
            AnyKey::Grant(g) => g.to_key_string(),
            AnyKey::Dict(d) => d.to_key_string(),
        }
    }
}

impl Encryption {
    /// A fresh random tree key. On a [`Broker`](crate::Broker), `broker.keys()` gives the
    /// key strings to share; with persistence the key is kept in the broker's key file.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Encryption(EncryptionKeys::Fresh)
    }
    /// Existing key strings: tree keys (`wstree1…`), grants (`wskey1…`) and zstd
    /// dictionaries (`wsdict1…`), e.g. what another broker's `keys()` returned.
    pub fn with_keys<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Result<Self, KeyError> {
        let keys = keys
            .into_iter()
            .map(|k| AnyKey::parse(k.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Encryption(EncryptionKeys::Keys(keys)))
    }
    /// Use this keyring.
    pub fn with_keyring(keyring: Keyring) -> Self {
        Encryption(EncryptionKeys::Keyring(keyring))
    }
    /// Resolves to a keyring (generating a fresh tree key if asked) and the parsed keys.
    pub(crate) fn resolve(self, now_ms: u64) -> Result<(Keyring, Vec<AnyKey>), KeyError> {
        match self.0 {
            EncryptionKeys::Keyring(k) => Ok((k, Vec::new())),
            EncryptionKeys::Fresh => {
                let tree = TreeKey::generate("default")?;
                let keys = vec![AnyKey::Tree(tree)];
                let mut ring = Keyring::new();
                AnyKey::add_all(&keys, &mut ring, now_ms)?;
                Ok((ring, keys))
            }
            EncryptionKeys::Keys(keys) => {
                let mut ring = Keyring::new();
                AnyKey::add_all(&keys, &mut ring, now_ms)?;
                Ok((ring, keys))
            }
        }
    }
}
impl Engine for Encryption {
    fn apply(self, b: &mut ClientBuilder) {
        match self.resolve(crate::client::now_ms()) {
            Ok((ring, _)) => b.keyring = ring,
            Err(e) => b.key_error = Some(e),
        }
    }
    fn apply_broker(self, b: &mut BrokerSetup) {
        b.encryption = Some(self);
    }
}

impl Engine for Identity {
    fn apply(self, b: &mut ClientBuilder) {
        b.identity = Some(self);
    }
}

/// How messages are signed with the identity (default: batch signatures, when an identity
/// is set).
///
/// - [`Signing::on`] / [`Signing::batched`]: one Ed25519 signature per batch of publishes
///   over a Merkle root, each message carrying its inclusion proof (`sig_scheme` 2, PROTOCOL
///   §4.14). Every message still verifies alone — a subscriber of one topic of the batch
///   needs nothing from the others — and a receiver checks each batch's signature once. A
///   publisher at a gentle rate gets batches of one; a busy one fills them by itself.
/// - [`Signing::per_message`]: one signature per message (`sig_scheme` 1), as before
///   batches existed: about 3× the CPU per message for the sender and the receivers.
/// - [`Signing::off`]: unsigned (any key holder could have written them).
#[derive(Debug, Clone, Copy)]
pub struct Signing(pub(crate) Option<Option<whispeer_protocol::BatchPolicy>>);
impl Signing {
    /// Sign every message, in batches with the default window (up to 256 messages, no added
    /// wait: whatever is pending when the connection task runs).
    pub fn on() -> Self {
        Signing(Some(Some(crate::core::DEFAULT_BATCH)))
    }
    /// Sign in batches of at most `max_messages` (1..=4096, and at most
    /// [`BATCH_MAX_BYTES`](crate::core::connection::BATCH_MAX_BYTES) of publishes), waiting at most `max_wait` after
    /// a batch's first message for more (zero: never wait; a longer wait makes larger
    /// batches at moderate rates and adds up to that much latency).
    pub fn batched(max_messages: u32, max_wait: Duration) -> Self {
        Signing(Some(Some(whispeer_protocol::BatchPolicy {
            max_messages: max_messages.clamp(1, 4096),
            max_wait_us: u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX),
        })))
    }
    /// One signature per message (`sig_scheme` 1).
    pub fn per_message() -> Self {
        Signing(Some(None))
    }
    /// Send unsigned messages (any key holder could have written them).
    pub fn off() -> Self {
        Signing(None)
    }
}
impl Engine for Signing {
    fn apply(self, b: &mut ClientBuilder) {
        b.policy.sign = self.0.is_some();
        if let Some(batch) = self.0 {
            b.policy.batch = batch;
        }
    }
}

/// Options for topics matching a filter (first matching rule wins). What a rule does not
/// set — compression, padding, suite — is the client-wide setting ([`Compression`],
/// [`Padding`], [`CipherSuite`]) as finally configured, whether those come before or after
/// the rule in the builder; [`TopicOptions::seal_options`] sets all three.
#[derive(Debug, Clone)]
pub struct TopicOptions {
    filter: TopicFilter,
    opts: Option<SealOptions>,
    compression: Option<whispeer_protocol::Compression>,
    padding: Option<PadMode>,
    suite: Option<whispeer_protocol::Suite>,
    senders: Option<crate::core::receive::SenderPolicy>,
}
impl TopicOptions {
    /// Rules for topics matching `filter` (panics on an invalid filter literal; use
    /// [`TopicOptions::try_new`] for user input).
    pub fn new(filter: &str) -> Self {
        Self::try_new(filter).expect("valid topic filter")
    }
    /// Rules for topics matching `filter`.
    pub fn try_new(filter: &str) -> Result<Self, whispeer_protocol::TopicError> {
        Ok(TopicOptions {
            filter: TopicFilter::new(filter)?,
            opts: None,
            compression: None,
            padding: None,
            suite: None,
            senders: None,
        })
    }
    /// Compression for these topics.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = Some(c.0);
        self
    }
    /// Padding for these topics.
    pub fn padding(mut self, p: Padding) -> Self {
        self.padding = Some(p.0);
        self
    }
    /// AEAD suite for these topics.
    pub fn suite(mut self, s: CipherSuite) -> Self {
        self.suite = Some(s.0);
        self
    }
    /// Explicit sealing options.
    pub fn seal_options(mut self, o: SealOptions) -> Self {
        self.opts = Some(o);
        self
    }
    /// Refuse unsigned messages on these topics (counted in
    /// `stats().core.refused.unsigned`, never shown to the app).
    pub fn require_signed(mut self) -> Self {
        self.senders = Some(self.senders.take().unwrap_or_default().require_signed());
        self
    }
    /// Accept messages on these topics only from these senders (signed by one of them;
    /// others are counted in `stats().core.refused`, never shown to the app).
    pub fn allow_senders(mut self, senders: impl IntoIterator<Item = SenderId>) -> Self {
        self.senders = Some(
            self.senders
                .take()
                .unwrap_or_default()
                .allow_senders(senders),
        );
        self
    }
}
impl Engine for TopicOptions {
    fn apply(self, b: &mut ClientBuilder) {
        if let Some(p) = self.senders {
            b.receive.policies.push((self.filter.clone(), p));
        }
        if self.opts.is_none()
            && self.compression.is_none()
            && self.padding.is_none()
            && self.suite.is_none()
        {
            return; // receive rules only: no sealing rule shadows later ones
        }
        let rule = TopicSealRule {
            index: b.policy.per_topic.len(),
            filter: self.filter,
            opts: self.opts,
            compression: self.compression,
            padding: self.padding,
            suite: self.suite,
        };
        b.policy
            .per_topic
            .push((rule.filter.clone(), rule.resolve(b.policy.default)));
        b.topic_rules.push(rule);
    }
}

/// One [`TopicOptions`] sealing rule as given: at `index` of `policy.per_topic`.
#[derive(Debug, Clone)]
pub(crate) struct TopicSealRule {
    index: usize,
    filter: TopicFilter,
    opts: Option<SealOptions>,
    compression: Option<whispeer_protocol::Compression>,
    padding: Option<PadMode>,
    suite: Option<whispeer_protocol::Suite>,
}

impl TopicSealRule {
    /// The rule's options over the client-wide `default`.
    fn resolve(&self, default: SealOptions) -> SealOptions {
        let mut o = self.opts.unwrap_or(default);
        if let Some(c) = self.compression {
            o.compression = c;
        }
        if let Some(p) = self.padding {
            o.padding = p;
        }
        if let Some(s) = self.suite {
            o.suite = s;
        }
        o
    }
}

/// Reconnect policy: exponential backoff with equal jitter (the delay before attempt `n` is
/// uniform in `[d/2, d]`, `d = min(max, initial·2ⁿ)`; the engine's
/// [`Backoff`](crate::core::connection::Backoff), with jitter from its seed).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Reconnect {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never). With several
    /// relays ([`Relays`]) an attempt is a full round over them: the next relay is tried
    /// at once, the delay comes only after every one failed.
    pub max_attempts: Option<u32>,
}
impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}
impl Reconnect {
    /// Backoff from `initial` doubling up to `max`, never giving up.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Reconnect {
            initial,
            max,
            max_attempts: None,
        }
    }
    /// Gives up after `n` failed attempts in a row (the client then closes).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}
impl Engine for Reconnect {
    fn apply(self, b: &mut ClientBuilder) {
        b.reconnect = self;
    }
}

/// Trust an extra root certificate (PEM file) for `wss://` and `tls://`, e.g. a relay's
/// self-signed certificate.
#[derive(Debug, Clone)]
pub struct TlsRoot(pub(crate) Vec<rustls_pki_types::CertificateDer<'static>>);
impl TlsRoot {
    /// Reads every certificate in a PEM file.
    pub fn pem_file(path: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path.as_ref())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(TlsRoot(certs))
    }
}
impl Engine for TlsRoot {
    fn apply(self, b: &mut ClientBuilder) {
        b.tls.extra_roots.extend(self.0);
    }
}

/// Connect to a relay embedded in this process (no sockets): frames travel over channels.
/// [`crate::Broker`] sets this up for you.
#[cfg(feature = "in-process")]
#[derive(Debug, Clone)]
pub struct InProcess(pub(crate) whispeer_relay::RelayHandle);
#[cfg(feature = "in-process")]
impl InProcess {
    /// A handle of a built relay (`Relay::handle`).
    pub fn new(relay: whispeer_relay::RelayHandle) -> Self {
        InProcess(relay)
    }
}
#[cfg(feature = "in-process")]
impl Engine for InProcess {
    fn apply(self, b: &mut ClientBuilder) {
        b.in_process = Some(self.0);
    }
}

/// Any [`Plugin`](crate::plugin::Plugin) is an engine: `.with(Metrics::new())`,
/// `.with(MyPlugin)`; plugins run in the order added.
impl<P: crate::plugin::Plugin> Engine for P {
    fn apply(self, b: &mut ClientBuilder) {
        b.plugins.push(std::sync::Arc::new(self));
    }
}

/// Pin a relay's TLS certificate by its SHA-256 fingerprint (as printed by
/// `whispeer-relay tls generate`) for `wss://` and `tls://`: the relay must present exactly
/// that certificate; certificate authorities are not consulted. Several pins may be given
/// (e.g. the current and the next certificate during a rotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPin(pub(crate) [u8; 32]);
impl TlsPin {
    /// Parses 64 hex digits; colons (as in `openssl x509 -fingerprint`) and spaces are
    /// ignored, and a `sha256:` / `SHA256:` prefix is accepted.
    pub fn sha256_hex(s: &str) -> Result<Self, TlsPinError> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let digits: Vec<u8> = t
            .bytes()
            .filter(|b| *b != b':' && !b.is_ascii_whitespace())
            .collect();
        if digits.len() != 64 {
            return Err(TlsPinError(format!(
                "a SHA-256 fingerprint has 64 hex digits, {:?} has {}",
                s,
                digits.len()
            )));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out)
            .map_err(|_| TlsPinError(format!("{s:?} is not hexadecimal")))?;
        Ok(TlsPin(out))
    }

    /// The fingerprint of a certificate (DER).
    pub fn of_cert_der(der: &[u8]) -> Self {
        TlsPin(crate::transport::cert_sha256(der))
    }
}
impl Engine for TlsPin {
    fn apply(self, b: &mut ClientBuilder) {
        b.tls.pins.push(self.0);
    }
}

/// A `--tls-pin` value that is not a SHA-256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid TLS pin: {0}")]
pub struct TlsPinError(String);

/// The key a client derives its durable-subscription owner secrets from (`Sub.owner`,
/// PROTOCOL §3.3.3). By default it is derived from the client's [`Identity`] (so a restarted
/// client with the same identity keeps its durables) or random when there is none. Set it
/// to share durables between processes that hold the same secret — the CLI derives it from
/// the key strings it was given, so anyone holding those keys may resume the durable and
/// nobody else (a stranger who only learned the key id from the relay) can.
#[derive(Clone)]
pub struct DurableOwner(zeroize::Zeroizing<[u8; 32]>);

impl DurableOwner {
    /// From 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        DurableOwner(zeroize::Zeroizing::new(secret))
    }
    /// Derived from any secret material: `BLAKE3-derive_key("whispeer v2 durable owner from
    /// material", material)`.
    pub fn derive_from(material: &[u8]) -> Self {
        DurableOwner(zeroize::Zeroizing::new(blake3::derive_key(
            "whispeer v2 durable owner from material",
            material,
        )))
    }
}

impl std::fmt::Debug for DurableOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DurableOwner(..)")
    }
}

impl Engine for DurableOwner {
    fn apply(self, b: &mut ClientBuilder) {
        b.durable_owner = Some(self.0);
    }
}

/// A relay account: proves the right to use a relay that runs with `auth = required`.
///
/// Separate from the [`Identity`] that signs messages (the relay never links the two): an
/// Ed25519 account key answers the relay's challenge, or a bearer token (for services) is
/// sent in `Hello`. `whispeer-relay account add NAME --key-out FILE` writes the key file
/// [`RelayAuth::key_file`] reads; `--token` prints a token.
#[derive(Clone)]
pub struct RelayAuth(pub(crate) crate::core::connection::AccountAuth);

/// Prefix of an account key file (`wsp_acct_sk_` + 64 hex characters).
pub const ACCOUNT_KEY_PREFIX: &str = "wsp_acct_sk_";

/// Why an account key could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayAuthError {
    /// The file could not be read.
    #[error("cannot read account key {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The text is not an account key.
    #[error("not a relay account key: expected {ACCOUNT_KEY_PREFIX} and 64 hex characters (from `whispeer-relay account add NAME --key-out FILE`)")]
    Format,
}

impl RelayAuth {
    /// An Ed25519 account key.
    pub fn key(key: ed25519_dalek::SigningKey) -> Self {
        RelayAuth(crate::core::connection::AccountAuth::Key(
            std::sync::Arc::new(key),
        ))
    }

    /// Parses an account key string (`wsp_acct_sk_…`).
    pub fn parse_key(text: &str) -> Result<Self, RelayAuthError> {
        let hex_part = text
            .trim()
            .strip_prefix(ACCOUNT_KEY_PREFIX)
            .ok_or(RelayAuthError::Format)?;
        if hex_part.len() != 64 {
            return Err(RelayAuthError::Format);
        }
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_part, &mut seed[..]).map_err(|_| RelayAuthError::Format)?;
        Ok(Self::key(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// Reads an account key file.
    pub fn key_file(path: impl AsRef<std::path::Path>) -> Result<Self, RelayAuthError> {
        let path = path.as_ref();
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            RelayAuthError::Io {
                path: path.to_owned(),
                source,
            }
        })?);
        Self::parse_key(&text)
    }

    /// A bearer token.
    pub fn token(token: impl Into<String>) -> Self {
        RelayAuth(crate::core::connection::AccountAuth::Token(
            zeroize::Zeroizing::new(token.into()),
        ))
    }

    /// The account's public key (what `whispeer-relay account add --public-key` takes).
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.0.public_key()
    }
}

impl std::fmt::Debug for RelayAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayAuth({:?})", self.0)
    }
}

impl Engine for RelayAuth {
    fn apply(self, b: &mut ClientBuilder) {
        b.relay_auth = Some(self);
    }
}

#[cfg(test)]
mod seal_choice_tests {
    use super::*;
    use whispeer_protocol::{Suite, Topic};

    /// B5 (as the npm client's 38e951a): a rule inherits what it does not set from the
    /// client-wide settings as finally configured, whatever the order of `with` — a rule
    /// naming only a suite (or padding) never turns compression back on for a client that
    /// turned it off; a rule naming compression keeps it; `seal_options` sets everything.
    #[test]
    fn a_topic_rule_inherits_the_final_client_settings_in_either_order() {
        use whispeer_protocol::Compression as C;
        let rules = || {
            [
                TopicOptions::new("a/#").suite(CipherSuite::aes_gcm()),
                TopicOptions::new("b/#").padding(Padding::padme()),
                TopicOptions::new("z/#").compression(Compression::lz4()),
                TopicOptions::new("s/#").seal_options(SealOptions::default()),
                TopicOptions::new("r/#").require_signed(),
            ]
        };
        let settings = |b: ClientBuilder| {
            b.with(Compression::none())
                .with(Padding::none())
                .with(CipherSuite::aes_gcm())
        };
        let before = rules()
            .into_iter()
            .fold(settings(ClientBuilder::default()), ClientBuilder::with);
        let after = settings(
            rules()
                .into_iter()
                .fold(ClientBuilder::default(), ClientBuilder::with),
        );
        for b in [&before, &after] {
            let t = |s: &str| b.policy.for_topic(&Topic::new(s).unwrap());
            assert_eq!(t("a/x").compression, C::None, "a suite-only rule");
            assert_eq!(t("a/x").padding, PadMode::None);
            assert_eq!(t("a/x").suite, Suite::Aes256Gcm);
            assert_eq!(t("b/x").compression, C::None, "a padding-only rule");
            assert_eq!(t("b/x").padding, PadMode::Padme);
            assert_eq!(t("b/x").suite, Suite::Aes256Gcm);
            assert_eq!(t("z/x").compression, C::Lz4, "named: kept");
            assert_eq!(t("z/x").padding, PadMode::None);
            assert_eq!(
                t("s/x"),
                SealOptions::default(),
                "explicit options: all set"
            );
            assert_eq!(t("r/x").compression, C::None, "no sealing rule");
            assert_eq!(t("q"), b.policy.default);
        }
        assert_eq!(before.policy.per_topic, after.policy.per_topic);
    }

    /// The sealer chooses codec and suite per topic: a default, then the first matching
    /// [`TopicOptions`] rule (which keeps the default's other fields).
    #[test]
    fn suite_and_lz4_per_topic() {
        let b = ClientBuilder::default()
            .with(Compression::zstd(5))
            .with(CipherSuite::aes_gcm())
            .with(TopicOptions::new("fast/#").compression(Compression::lz4()))
            .with(TopicOptions::new("legacy/#").suite(CipherSuite::xchacha()));
        let t = |s: &str| b.policy.for_topic(&Topic::new(s).unwrap());
        assert_eq!(t("a").suite, Suite::Aes256Gcm);
        assert_eq!(t("a").compression, whispeer_protocol::Compression::Zstd(5));
        assert_eq!(t("fast/x").compression, whispeer_protocol::Compression::Lz4);
        assert_eq!(t("fast/x").suite, Suite::Aes256Gcm);
        assert_eq!(t("legacy/y").suite, Suite::XChaCha20Poly1305);
        assert_eq!(
            t("legacy/y").compression,
            whispeer_protocol::Compression::Zstd(5)
        );
        assert!(Compression::from_name("lz4").is_some());
        assert!(CipherSuite::from_name("aes-gcm").is_some());
        assert!(CipherSuite::from_name("des").is_none());
    }
}
