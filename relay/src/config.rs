//! Relay configuration: every setting, its default, TOML (de)serialisation, validation, and
//! the commented TOML that `whispeer-relay generate-config` prints.
//!
//! Precedence is decided by the binary: defaults, then the TOML file, then `WHISPEER_*`
//! environment variables and flags (clap gives flags priority over env). This module only
//! knows the shape and the rules, so tests and embedders can build a [`Config`] directly.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use whispeer_protocol::limits::{DEFAULT_MAX_FRAME, MAX_FRAME_CEILING, MAX_LEVELS};

/// Why a configuration could not be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent with another one.
    #[error("invalid setting {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A listener address, or "off". Written in TOML as `"127.0.0.1:7480"`, `"off"` or `""`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl ListenAddr {
    /// A listener that is not started.
    pub const OFF: ListenAddr = ListenAddr(None);
    /// Listen on `addr` (port 0 picks a free port).
    pub fn on(addr: SocketAddr) -> Self {
        Self(Some(addr))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("off"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return Ok(ListenAddr::OFF);
        }
        s.parse::<SocketAddr>()
            .map(ListenAddr::on)
            .map_err(|e| format!("{s:?} is not IP:PORT or \"off\": {e}"))
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What to do with a subscriber whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Drop the oldest queued message, count it, and tell the client with a `Gap` frame.
    #[default]
    Drop,
    /// Send `Err(SlowConsumer)` and close the connection.
    Disconnect,
}

impl fmt::Display for SlowConsumerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlowConsumerPolicy::Drop => "drop",
            SlowConsumerPolicy::Disconnect => "disconnect",
        })
    }
}

impl FromStr for SlowConsumerPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "drop" => Ok(SlowConsumerPolicy::Drop),
            "disconnect" => Ok(SlowConsumerPolicy::Disconnect),
            other => Err(format!("{other:?} is not \"drop\" or \"disconnect\"")),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not \"text\" or \"json\"")),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener addresses.
    pub listen: ListenConfig,
    /// Certificate and key for the `wss` and `tls` listeners.
    pub tls: TlsConfig,
    /// Limits that protect the relay and other clients from one client.
    pub limits: Limits,
    /// Per-connection outbound queue and slow-consumer policy.
    pub queue: QueueConfig,
    /// Heartbeats, idle and shutdown timeouts.
    pub timeouts: Timeouts,
    /// Logging (used by the binary).
    pub log: LogConfig,
    /// The message store: kind, file, retention, dedup window.
    pub store: StoreConfig,
    /// At-least-once delivery to subscribers: ack timeout, unacknowledged limit.
    pub delivery: DeliveryConfig,
    /// Relay accounts (admission) and the admin token.
    pub auth: AuthConfig,
}

/// Whether clients must authenticate with a relay account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone who can connect may use the relay (fine on loopback; warned about elsewhere).
    #[default]
    Off,
    /// Every connection must prove an account (Ed25519 challenge or bearer token).
    Required,
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::Off => "off",
            AuthMode::Required => "required",
        })
    }
}

impl FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(AuthMode::Off),
            "required" => Ok(AuthMode::Required),
            other => Err(format!("{other:?} is not \"off\" or \"required\"")),
        }
    }
}

/// Relay accounts and the admin token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `off` or `required`.
    pub mode: AuthMode,
    /// The account list (TOML, edited by `whispeer-relay account`); reloaded on change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accounts: Option<PathBuf>,
    /// Append-only file of key-id claims and durable owners (absent: kept in memory only;
    /// `serve` puts it beside the SQLite store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<PathBuf>,
    /// Most key ids one group of accounts may claim.
    pub max_claims_per_group: usize,
    /// How often the account file is checked for changes, in milliseconds.
    pub reload_ms: u64,
    /// Bearer token for the admin port: needed for detail in `/status` (key ids), and for
    /// everything but `/healthz` when the admin port is bound off loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Off,
            accounts: None,
            state: None,
            max_claims_per_group: 10_000,
            reload_ms: 1_000,
            admin_token: None,
        }
    }
}

/// Which store the relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite file: durable (WAL, group commit). The `serve` default.
    Sqlite,
    /// SQLite in memory: history, retention, QoS and replay, lost on restart. The library
    /// default (an embedded relay writes no files unless asked).
    Memory,
    /// No store: sequence numbers only, live fan-out; no QoS ≥ 1, replay or retained values.
    None,
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Memory => "memory",
            StoreKind::None => "none",
        })
    }
}

impl FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sqlite" => Ok(StoreKind::Sqlite),
            "memory" => Ok(StoreKind::Memory),
            "none" => Ok(StoreKind::None),
            other => Err(format!(
                "{other:?} is not \"sqlite\", \"memory\" or \"none\""
            )),
        }
    }
}

/// SQLite `synchronous` setting for the store file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync at every commit: an acknowledged message survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a process crash, not power loss.
    Normal,
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncMode::Full => "full",
            SyncMode::Normal => "normal",
        })
    }
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" => Ok(SyncMode::Full),
            "normal" => Ok(SyncMode::Normal),
            other => Err(format!("{other:?} is not \"full\" or \"normal\"")),
        }
    }
}

/// The message store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite`, `memory` or `none`; absent: `sqlite` for `serve`, `memory` for the library.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<StoreKind>,
    /// The SQLite file (kind `sqlite`).
    pub path: PathBuf,
    /// `full` (fsync per commit) or `normal` (fsync per checkpoint).
    pub sync: SyncMode,
    /// Messages queued for the writer thread; beyond it a publish that needs the store is
    /// answered `Err(busy)` (retryable).
    pub queue: usize,
    /// Most operations per transaction.
    pub max_batch: usize,
    /// Per path: most messages kept (0 = unlimited).
    pub max_messages: u64,
    /// Per path: most envelope bytes kept (0 = unlimited).
    pub max_bytes: u64,
    /// Per path: oldest message kept, in milliseconds (0 = unlimited).
    pub max_age_ms: u64,
    /// How long a QoS 2 publish id is remembered for dedup, in milliseconds.
    pub dedup_window_ms: u64,
    /// Most publish ids remembered for dedup.
    pub dedup_max: usize,
    // --- Store quotas and policy (issue 10). A tenant is the relay account when accounts
    // are on, else the source address. 0 = unlimited. At a limit the publisher gets
    // Err(quota_exceeded) naming its publish id.
    /// Keep QoS 0 messages in history too (`false`: QoS 0 is live-only; retained QoS 0
    /// values are kept as retained values either way).
    pub store_qos0: bool,
    /// Retained values older than this many milliseconds are deleted (0 = kept until
    /// replaced).
    pub retained_max_age_ms: u64,
    /// Per tenant: most stored envelope bytes (history plus retained values).
    pub tenant_max_bytes: u64,
    /// Per tenant: most stored messages.
    pub tenant_max_messages: u64,
    /// Per tenant: most retained values.
    pub tenant_max_retained: u64,
    /// Per tenant: most durable subscription names.
    pub tenant_max_durables: u64,
    /// Per tenant: most distinct token paths with stored data.
    pub tenant_max_paths: u64,
    /// All tenants: most stored envelope bytes.
    pub total_max_bytes: u64,
    /// All tenants: most stored messages.
    pub total_max_messages: u64,
    /// All tenants: most retained values.
    pub total_max_retained: u64,
    /// All tenants: most durable subscription names.
    pub total_max_durables: u64,
    /// All tenants: most distinct token paths with stored data.
    pub total_max_paths: u64,
    /// While the disk is full (or a commit failed), how often the store retries, in ms.
    pub retry_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: None,
            path: PathBuf::from("whispeer-relay.db"),
            sync: SyncMode::Full,
            queue: 65_536,
            max_batch: 16_384,
            max_messages: 0,
            max_bytes: 0,
            max_age_ms: 7 * 24 * 3600 * 1000,
            dedup_window_ms: 120_000,
            dedup_max: 1_000_000,
            store_qos0: false,
            retained_max_age_ms: 0,
            tenant_max_bytes: 256 << 20,
            tenant_max_messages: 1_000_000,
            tenant_max_retained: 10_000,
            tenant_max_durables: 1_000,
            tenant_max_paths: 10_000,
            total_max_bytes: 8 << 30,
            total_max_messages: 50_000_000,
            total_max_retained: 1_000_000,
            total_max_durables: 100_000,
            total_max_paths: 1_000_000,
            retry_ms: 500,
        }
    }
}

/// At-least-once delivery to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// A delivered QoS ≥ 1 message not acknowledged within this time is sent again.
    pub ack_timeout_ms: u64,
    /// Most unacknowledged messages in flight per subscription, and the default credit of
    /// a `Sub` without one. Beyond it delivery pauses (messages wait in the store) until
    /// acks free credit; the connection is not closed.
    pub max_unacked: usize,
    /// Most bytes of unacknowledged envelopes held per subscription; beyond it delivery
    /// pauses like at `max_unacked`.
    pub max_unacked_bytes: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 30_000,
            max_unacked: 4_096,
            max_unacked_bytes: 16 << 20,
        }
    }
}

impl DeliveryConfig {
    /// `ack_timeout_ms` as a duration.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

/// Listener addresses; each may be "off" and each may use port 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// Plain WebSocket.
    pub ws: ListenAddr,
    /// Length-prefixed TCP.
    pub tcp: ListenAddr,
    /// WebSocket over TLS (needs `[tls]`).
    pub wss: ListenAddr,
    /// Length-prefixed TCP over TLS (needs `[tls]`).
    pub tls: ListenAddr,
    /// Admin HTTP: `/metrics`, `/status`, `/healthz`.
    pub admin: ListenAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        let local = |port| ListenAddr::on(SocketAddr::from(([127, 0, 0, 1], port)));
        Self {
            ws: local(7480),
            tcp: local(7481),
            wss: ListenAddr::OFF,
            tls: ListenAddr::OFF,
            admin: local(7482),
        }
    }
}

/// PEM files for TLS listeners.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// Limits. Size and count limits answer a typed `Err` frame and close the connection; rate
/// limits pause reading the connection instead (backpressure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, in bytes (TCP length prefix, WebSocket message).
    pub max_frame: usize,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Most levels in a subscription filter (at most the protocol's 32).
    pub max_filter_depth: usize,
    /// Sustained publishes per second per connection (token bucket rate; 0 = unlimited).
    pub publish_rate: u32,
    /// Burst of publishes per connection (token bucket size).
    pub publish_burst: u32,
    /// Most connections from one source IP address, TLS/WebSocket handshakes included.
    pub max_connections_per_addr: usize,
    /// Sustained `Sub`/`Unsub` requests per second per connection (a `Sub` that replays
    /// history costs `replay_cost`); 0 = unlimited. Over it, reads pause.
    pub sub_rate: u32,
    /// Burst of `Sub`/`Unsub` requests per connection.
    pub sub_burst: u32,
    /// Tokens a `Sub` asking for history (replay or a durable resume) costs.
    pub replay_cost: u32,
    /// Sustained `Ack` frames per second per connection; 0 = unlimited.
    pub ack_rate: u32,
    /// Burst of `Ack` frames per connection.
    pub ack_burst: u32,
    /// Publishes per second shared by all connections of one source address; 0 = unlimited.
    pub addr_publish_rate: u32,
    /// Burst of publishes per source address.
    pub addr_publish_burst: u32,
    /// `Sub`/`Unsub` requests per second shared by one source address; 0 = unlimited.
    pub addr_sub_rate: u32,
    /// Burst of `Sub`/`Unsub` requests per source address.
    pub addr_sub_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            max_subscriptions: 1_000,
            max_filter_depth: MAX_LEVELS,
            publish_rate: 10_000,
            publish_burst: 20_000,
            max_connections_per_addr: 256,
            sub_rate: 200,
            sub_burst: 10_000,
            replay_cost: 10,
            ack_rate: 20_000,
            ack_burst: 40_000,
            addr_publish_rate: 50_000,
            addr_publish_burst: 100_000,
            addr_sub_rate: 2_000,
            addr_sub_burst: 20_000,
        }
    }
}

/// The bounded outbound queue every connection has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Messages a connection may have queued before the slow-consumer policy applies.
    pub capacity: usize,
    /// `drop` (oldest, with a `Gap` frame) or `disconnect`.
    pub slow_consumer: SlowConsumerPolicy,
    /// Bytes of messages a connection may have queued before the slow-consumer policy
    /// applies (whichever of `capacity` and `max_bytes` is reached first).
    pub max_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 4096,
            slow_consumer: SlowConsumerPolicy::Drop,
            max_bytes: 8 << 20,
        }
    }
}

/// Timeouts, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time a new connection has to complete its transport handshake and send `Hello`.
    pub hello_ms: u64,
    /// Heartbeat interval announced in `Welcome` (and the WebSocket ping interval).
    pub heartbeat_ms: u64,
    /// A connection with no inbound traffic for this long is closed (`IdleTimeout`).
    pub idle_ms: u64,
    /// On shutdown or a fatal error, how long queued frames may take to drain.
    pub drain_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            hello_ms: 10_000,
            heartbeat_ms: 15_000,
            idle_ms: 45_000,
            drain_ms: 5_000,
        }
    }
}

impl Timeouts {
    /// `hello_ms` as a duration.
    pub fn hello(&self) -> Duration {
        Duration::from_millis(self.hello_ms)
    }
    /// `heartbeat_ms` as a duration (`None` when 0).
    pub fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat_ms > 0).then(|| Duration::from_millis(self.heartbeat_ms))
    }
    /// `idle_ms` as a duration.
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
    /// `drain_ms` as a duration.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}

/// Logging settings (applied by the binary; the library only emits `tracing` events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter, e.g. `info` or `whispeer_relay=debug`.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Reads and parses a TOML file (missing keys take their defaults).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The defaults of `whispeer-relay serve` (and of `generate-config`): the library
    /// defaults with the durable SQLite store.
    pub fn serve_default() -> Self {
        let mut c = Self::default();
        c.store.kind = Some(StoreKind::Sqlite);
        c
    }

    /// A configuration for tests and embedding: every listener on 127.0.0.1 port 0 except
    /// the TLS ones, which stay off.
    pub fn ephemeral() -> Self {
        let any = ListenAddr::on(SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            listen: ListenConfig {
                ws: any,
                tcp: any,
                wss: ListenAddr::OFF,
                tls: ListenAddr::OFF,
                admin: any,
            },
            store: StoreConfig {
                kind: Some(StoreKind::Memory),
                ..StoreConfig::default()
            },
            ..Self::default()
        }
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let l = &self.limits;
        if l.max_frame < 64 || l.max_frame > MAX_FRAME_CEILING {
            return invalid(
                "limits.max_frame",
                format!("{} is outside 64..={MAX_FRAME_CEILING}", l.max_frame),
            );
        }
        if l.max_filter_depth == 0 || l.max_filter_depth > MAX_LEVELS {
            return invalid(
                "limits.max_filter_depth",
                format!("{} is outside 1..={MAX_LEVELS}", l.max_filter_depth),
            );
        }
        if l.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1".into());
        }
        if l.publish_rate > 0 && l.publish_burst == 0 {
            return invalid(
                "limits.publish_burst",
                "must be at least 1 when publish_rate is set".into(),
            );
        }
        if self.queue.capacity == 0 || self.queue.max_bytes == 0 {
            return invalid("queue", "capacity and max_bytes must be at least 1".into());
        }
        if l.max_connections_per_addr == 0 {
            return invalid(
                "limits.max_connections_per_addr",
                "must be at least 1".into(),
            );
        }
        for (field, rate, burst) in [
            ("limits.sub_burst", l.sub_rate, l.sub_burst),
            ("limits.ack_burst", l.ack_rate, l.ack_burst),
            (
                "limits.addr_publish_burst",
                l.addr_publish_rate,
                l.addr_publish_burst,
            ),
            ("limits.addr_sub_burst", l.addr_sub_rate, l.addr_sub_burst),
        ] {
            if rate > 0 && burst == 0 {
                return invalid(field, "must be at least 1 when its rate is set".into());
            }
        }
        if self.delivery.max_unacked_bytes == 0 {
            return invalid("delivery.max_unacked_bytes", "must be positive".into());
        }
        let t = &self.timeouts;
        if t.hello_ms == 0 || t.idle_ms == 0 {
            return invalid("timeouts", "hello_ms and idle_ms must be positive".into());
        }
        if t.heartbeat_ms > 0 && t.heartbeat_ms >= t.idle_ms {
            return invalid(
                "timeouts.heartbeat_ms",
                format!(
                    "{} must be below idle_ms ({}) or clients time out between heartbeats",
                    t.heartbeat_ms, t.idle_ms
                ),
            );
        }
        let st = &self.store;
        if st.queue == 0 || st.max_batch == 0 {
            return invalid("store", "queue and max_batch must be at least 1".into());
        }
        if st.retry_ms == 0 {
            return invalid("store.retry_ms", "must be at least 1".into());
        }
        if st.kind == Some(StoreKind::Sqlite) && st.path.as_os_str().is_empty() {
            return invalid("store.path", "a sqlite store needs a file".into());
        }
        if self.delivery.ack_timeout_ms == 0 || self.delivery.max_unacked == 0 {
            return invalid(
                "delivery",
                "ack_timeout_ms and max_unacked must be positive".into(),
            );
        }
        let a = &self.auth;
        if a.mode == AuthMode::Required
            && a.accounts.as_ref().is_none_or(|p| p.as_os_str().is_empty())
        {
            return invalid(
                "auth.accounts",
                "auth = required needs an account file (whispeer-relay account add creates one)"
                    .into(),
            );
        }
        if a.reload_ms == 0 || a.max_claims_per_group == 0 {
            return invalid(
                "auth",
                "reload_ms and max_claims_per_group must be positive".into(),
            );
        }
        if let Some(t) = &a.admin_token {
            if t.len() < 16 {
                return invalid(
                    "auth.admin_token",
                    "use at least 16 characters (e.g. a whispeer-relay account add --token)".into(),
                );
            }
        }
        if let Some(admin) = self.listen.admin.0 {
            if !admin.ip().is_loopback() && a.admin_token.is_none() {
                return invalid(
                    "auth.admin_token",
                    format!(
                        "the admin port {admin} is not on loopback: set an admin token \
                         (WHISPEER_ADMIN_TOKEN) or bind it to 127.0.0.1"
                    ),
                );
            }
        }
        let wants_tls = self.listen.wss.0.is_some() || self.listen.tls.0.is_some();
        if wants_tls && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return invalid(
                "tls",
                "the wss and tls listeners need tls.cert and tls.key".into(),
            );
        }
        Ok(())
    }

    /// The commented TOML printed by `generate-config`: every setting with its default.
    pub fn commented_toml() -> String {
        let d = Config::default();
        let l = &d.limits;
        let t = &d.timeouts;
        format!(
            r#"# whispeer-relay configuration. Every setting is shown with its default.
# Precedence: built-in defaults < this file < WHISPEER_* environment variables < flags.

[listen]
# Addresses as IP:PORT; port 0 picks a free port; "off" disables a listener.
# Plain WebSocket (ws://). Binary messages, one frame each.      env WHISPEER_WS
ws = "{ws}"
# Length-prefixed TCP (u32 big-endian length, then the frame).   env WHISPEER_TCP
tcp = "{tcp}"
# WebSocket over TLS (wss://); needs [tls].                       env WHISPEER_WSS
wss = "{wss}"
# Length-prefixed TCP over TLS (tls://); needs [tls].             env WHISPEER_TLS
tls = "{tls}"
# Admin HTTP: /metrics (Prometheus), /status (JSON), /healthz.    env WHISPEER_ADMIN
admin = "{admin}"

[tls]
# PEM certificate chain (leaf first) and private key for wss/tls.
# env WHISPEER_TLS_CERT, WHISPEER_TLS_KEY
# cert = "/etc/whispeer/relay.crt"
# key = "/etc/whispeer/relay.key"

[limits]
# Size and count limits: a violation gets a typed Err frame, then that connection is closed.
# Rate limits slow the connection down instead (see below).
# Largest frame in bytes (TCP length prefix / WebSocket message). env WHISPEER_MAX_FRAME
max_frame = {max_frame}
# Most concurrent client connections.                      env WHISPEER_MAX_CONNECTIONS
max_connections = {max_connections}
# Most subscriptions per connection.                       env WHISPEER_MAX_SUBSCRIPTIONS
max_subscriptions = {max_subscriptions}
# Most levels in a filter (1..=32).                        env WHISPEER_MAX_FILTER_DEPTH
max_filter_depth = {max_filter_depth}
# Publishes per second per connection, token bucket; 0 = unlimited. env WHISPEER_PUBLISH_RATE
publish_rate = {publish_rate}
# Token bucket size (burst).                               env WHISPEER_PUBLISH_BURST
publish_burst = {publish_burst}
# Rate limits never disconnect: over a rate, the relay stops reading that connection until
# its bucket refills (its idle timer is suspended meanwhile), so the client is slowed down.
# Most connections from one source IP, handshakes included; over it the TCP listener
# answers Err(too_many_connections), the others close the socket. Behind a reverse proxy
# every client has the proxy's address: raise it there. env WHISPEER_MAX_CONNECTIONS_PER_ADDR
max_connections_per_addr = {max_connections_per_addr}
# Sub/Unsub requests per second per connection, and burst; 0 = unlimited. env WHISPEER_SUB_RATE
sub_rate = {sub_rate}
sub_burst = {sub_burst}
# Tokens a Sub that asks for history (replay or durable resume) costs.
replay_cost = {replay_cost}
# Ack frames per second per connection, and burst; 0 = unlimited. env WHISPEER_ACK_RATE
ack_rate = {ack_rate}
ack_burst = {ack_burst}
# Shared by all connections of one source IP (reconnecting does not reset them); 0 = unlimited.
# env WHISPEER_ADDR_PUBLISH_RATE, WHISPEER_ADDR_SUB_RATE
addr_publish_rate = {addr_publish_rate}
addr_publish_burst = {addr_publish_burst}
addr_sub_rate = {addr_sub_rate}
addr_sub_burst = {addr_sub_burst}

[queue]
# Messages queued per connection before the slow-consumer policy applies. env WHISPEER_QUEUE_CAPACITY
capacity = {capacity}
# "drop": drop the oldest queued message and send a Gap frame with the count;
# "disconnect": send Err(SlowConsumer) and close.          env WHISPEER_SLOW_CONSUMER
slow_consumer = "{policy}"
# Bytes of queued messages per connection before the slow-consumer policy applies. env WHISPEER_QUEUE_MAX_BYTES
max_bytes = {queue_max_bytes}

[timeouts]
# Milliseconds to finish the transport handshake and send Hello. env WHISPEER_HELLO_MS
hello_ms = {hello_ms}
# Heartbeat announced in Welcome; also the WebSocket ping interval; 0 = none. env WHISPEER_HEARTBEAT_MS
heartbeat_ms = {heartbeat_ms}
# Close connections with no inbound traffic for this long.  env WHISPEER_IDLE_MS
idle_ms = {idle_ms}
# On shutdown, how long queued frames may take to drain.    env WHISPEER_DRAIN_MS
drain_ms = {drain_ms}

[store]
# "sqlite" (durable file, the serve default), "memory" (same features, lost on restart)
# or "none" (live fan-out only: no QoS >= 1, replay or retained values). env WHISPEER_STORE
kind = "sqlite"
# The SQLite file (created if missing; a foreign or damaged file fails at start). env WHISPEER_STORE_PATH
path = "{store_path}"
# "full": fsync per commit (survives power loss); "normal": survives a crash. env WHISPEER_STORE_SYNC
sync = "{store_sync}"
# Messages queued for the writer thread; beyond, Err(busy) (retryable). env WHISPEER_STORE_QUEUE
queue = {store_queue}
# Most operations per transaction (group commit).          env WHISPEER_STORE_MAX_BATCH
max_batch = {store_max_batch}
# Retention per token path; 0 = unlimited.
# Most messages.                                            env WHISPEER_RETENTION_MESSAGES
max_messages = {max_messages}
# Most envelope bytes.                                      env WHISPEER_RETENTION_BYTES
max_bytes = {max_bytes}
# Oldest message, in milliseconds.                          env WHISPEER_RETENTION_AGE_MS
max_age_ms = {max_age_ms}
# How long a QoS 2 publish id is remembered (exactly-once dedup). env WHISPEER_DEDUP_WINDOW_MS
dedup_window_ms = {dedup_window_ms}
# Most publish ids remembered.                              env WHISPEER_DEDUP_MAX
dedup_max = {dedup_max}
# Keep QoS 0 messages in history (false: QoS 0 is live-only; retained QoS 0 values are kept).
store_qos0 = {store_qos0}
# Retained values older than this many ms are deleted; 0 = kept until replaced.
retained_max_age_ms = {retained_max_age_ms}
# Quotas. A tenant is the relay account (accounts on) or the source address (accounts off).
# 0 = unlimited. At a limit the publisher gets Err(quota_exceeded) (not fatal, names the
# publish id); other tenants are untouched. Bytes count history plus retained values.
tenant_max_bytes = {tenant_max_bytes}
tenant_max_messages = {tenant_max_messages}
tenant_max_retained = {tenant_max_retained}
tenant_max_durables = {tenant_max_durables}
tenant_max_paths = {tenant_max_paths}
total_max_bytes = {total_max_bytes}
total_max_messages = {total_max_messages}
total_max_retained = {total_max_retained}
total_max_durables = {total_max_durables}
total_max_paths = {total_max_paths}
# While the disk is full, publishes needing the store get Err(storage_full) (retryable) and
# the store retries every this many ms, resuming by itself when space frees.
retry_ms = {store_retry_ms}

[delivery]
# Unacknowledged QoS >= 1 deliveries are sent again after this many ms. env WHISPEER_ACK_TIMEOUT_MS
ack_timeout_ms = {ack_timeout_ms}
# Most unacknowledged messages in flight per QoS >= 1 subscription, and the default credit
# of a Sub without one (a Sub's credit is capped to it). Beyond it delivery of that
# subscription pauses, the messages wait in the store and follow, in order, as acks free
# credit; other subscriptions are not affected.             env WHISPEER_MAX_UNACKED
max_unacked = {max_unacked}
# Most bytes of unacknowledged envelopes per subscription (pauses like max_unacked). env WHISPEER_MAX_UNACKED_BYTES
max_unacked_bytes = {max_unacked_bytes}

[auth]
# "off": anyone who can connect may use the relay (fine on loopback; a non-loopback
# listener without auth prints a loud warning). "required": every connection proves a
# relay account (Ed25519 challenge or bearer token); key ids are claimed by the first
# account's group. See relay/README.md "Accounts".                  env WHISPEER_AUTH
mode = "{auth_mode}"
# The account list (TOML), edited by `whispeer-relay account add|list|remove` and reloaded
# when it changes or on SIGHUP.                                      env WHISPEER_ACCOUNTS
# accounts = "whispeer-accounts.toml"
# Append-only file of key-id claims and durable owners. serve default: the store path
# with ".auth" appended (in memory when the store is not sqlite).   env WHISPEER_AUTH_STATE
# state = "whispeer-relay.db.auth"
# Most key ids one group of accounts may claim (Err quota_exceeded). env WHISPEER_MAX_CLAIMS
max_claims_per_group = {max_claims}
# How often the account file is checked for changes, in ms.        env WHISPEER_ACCOUNTS_RELOAD_MS
reload_ms = {reload_ms}
# Bearer token for the admin port (Authorization: Bearer ...): /status shows key ids only
# with it; required when the admin port is not on loopback.        env WHISPEER_ADMIN_TOKEN
# admin_token = "..."

[log]
# RUST_LOG-style filter (RUST_LOG also works).              env WHISPEER_LOG
filter = "{filter}"
# "text" or "json".                                         env WHISPEER_LOG_FORMAT
format = "{format}"
"#,
            ws = d.listen.ws,
            tcp = d.listen.tcp,
            wss = d.listen.wss,
            tls = d.listen.tls,
            admin = d.listen.admin,
            max_frame = l.max_frame,
            max_connections = l.max_connections,
            max_subscriptions = l.max_subscriptions,
            max_filter_depth = l.max_filter_depth,
            publish_rate = l.publish_rate,
            publish_burst = l.publish_burst,
            max_connections_per_addr = l.max_connections_per_addr,
            sub_rate = l.sub_rate,
            sub_burst = l.sub_burst,
            replay_cost = l.replay_cost,
            ack_rate = l.ack_rate,
            ack_burst = l.ack_burst,
            addr_publish_rate = l.addr_publish_rate,
            addr_publish_burst = l.addr_publish_burst,
            addr_sub_rate = l.addr_sub_rate,
            addr_sub_burst = l.addr_sub_burst,
            queue_max_bytes = d.queue.max_bytes,
            capacity = d.queue.capacity,
            policy = d.queue.slow_consumer,
            hello_ms = t.hello_ms,
            heartbeat_ms = t.heartbeat_ms,
            idle_ms = t.idle_ms,
            drain_ms = t.drain_ms,
            store_path = d.store.path.display(),
            store_sync = d.store.sync,
            store_queue = d.store.queue,
            store_max_batch = d.store.max_batch,
            max_messages = d.store.max_messages,
            max_bytes = d.store.max_bytes,
            max_age_ms = d.store.max_age_ms,
            dedup_window_ms = d.store.dedup_window_ms,
            dedup_max = d.store.dedup_max,
            store_qos0 = d.store.store_qos0,
            retained_max_age_ms = d.store.retained_max_age_ms,
            tenant_max_bytes = d.store.tenant_max_bytes,
            tenant_max_messages = d.store.tenant_max_messages,
            tenant_max_retained = d.store.tenant_max_retained,
            tenant_max_durables = d.store.tenant_max_durables,
            tenant_max_paths = d.store.tenant_max_paths,
            total_max_bytes = d.store.total_max_bytes,
            total_max_messages = d.store.total_max_messages,
            total_max_retained = d.store.total_max_retained,
            total_max_durables = d.store.total_max_durables,
            total_max_paths = d.store.total_max_paths,
            store_retry_ms = d.store.retry_ms,
            ack_timeout_ms = d.delivery.ack_timeout_ms,
            max_unacked = d.delivery.max_unacked,
            max_unacked_bytes = d.delivery.max_unacked_bytes,
            auth_mode = d.auth.mode,
            max_claims = d.auth.max_claims_per_group,
            reload_ms = d.auth.reload_ms,
            filter = d.log.filter,
            format = match d.log.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_config_parses_back_to_the_defaults() {
        let text = Config::commented_toml();
        let parsed = Config::from_toml(&text).unwrap();
        assert_eq!(parsed, Config::serve_default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn partial_files_keep_defaults_and_unknown_keys_fail() {
        let c = Config::from_toml("[limits]\nmax_frame = 4096\n[listen]\nws = \"off\"\n").unwrap();
        assert_eq!(c.limits.max_frame, 4096);
        assert_eq!(c.listen.ws, ListenAddr::OFF);
        assert_eq!(c.listen.tcp, ListenConfig::default().tcp);
        assert!(Config::from_toml("[limits]\nmax_frames = 1\n").is_err());
        assert!(Config::from_toml("[listen]\nws = \"nowhere\"\n").is_err());
    }

    #[test]
    fn validation_rules() {
        let mut c = Config::default();
        c.limits.max_filter_depth = 33;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.listen.wss = "127.0.0.1:0".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.timeouts.heartbeat_ms = c.timeouts.idle_ms;
        assert!(c.validate().is_err());
    }
}
