//! Relay configuration: every setting, its default, TOML (de)serialisation, validation, and
//! the commented TOML that `whispeer-relay generate-config` prints.
//!
//! Each setting is declared once, as a field of a section struct: serde makes it a TOML key,
//! clap (`#[arg(long, env)]`) a flag and a `WHISPEER_*` variable, its doc comment is both the
//! flag's help and its comment in `generate-config` and the README table. Precedence:
//! defaults, then the TOML file, then environment variables, then flags
//! ([`Config::for_serve`] with [`Overrides`]; clap gives flags priority over env). Tests and
//! embedders can build a [`Config`] directly.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use std::collections::HashMap;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
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
    /// A flag or environment variable could not be applied.
    #[error("invalid flag or environment variable: {0}")]
    Args(String),
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
    /// Drop the oldest queued QoS 0 message, count it, and tell the client with a `Gap`
    /// frame (QoS >= 1 subscriptions pause at a full queue instead).
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
///
/// Every setting is declared once, on the section structs below: the field name is its TOML
/// key, `#[arg(long, env)]` its flag and `WHISPEER_*` variable, its doc comment both the
/// flag's help and the comment `generate-config` prints, and `Default` its default. The
/// sections are listed once more in [`SECTIONS`] (a test checks the two agree).
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
    /// Runtime threads: the main runtime's workers and the light runtime's.
    pub runtime: RuntimeConfig,
    /// The message store: kind, file, retention, dedup window.
    pub store: StoreConfig,
    /// At-least-once delivery to subscribers: ack timeout, unacknowledged limit.
    pub delivery: DeliveryConfig,
    /// Relay accounts (admission) and the admin token.
    pub auth: AuthConfig,
    /// Relays sharing live routing through core NATS.
    pub cluster: ClusterConfig,
}

/// A section of the configuration: its TOML table name, how clap learns its settings, and
/// how parsed flags/env vars update it.
#[derive(Clone, Copy)]
pub struct Section {
    /// The TOML table (`[limits]`).
    pub name: &'static str,
    /// Its heading in `serve --help`.
    heading: &'static str,
    augment: fn(Command) -> Command,
    update: fn(&mut Config, &ArgMatches) -> Result<(), clap::Error>,
}

impl fmt::Debug for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Section").field("name", &self.name).finish()
    }
}

impl Section {
    /// The section's settings as clap arguments (flag, env var, help), in declaration order;
    /// the command's `about` is the section's doc comment.
    pub fn command(&self) -> Command {
        (self.augment)(Command::new(self.name))
    }
}

macro_rules! sections {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// Every section of [`Config`], in file order.
        pub const SECTIONS: &[Section] = &[$(Section {
            name: stringify!($field),
            heading: concat!("Settings [", stringify!($field), "]"),
            augment: <$ty as Args>::augment_args_for_update,
            update: |c, m| c.$field.update_from_arg_matches(m),
        }),*];
    };
}

sections!(
    listen: ListenConfig,
    tls: TlsConfig,
    limits: Limits,
    queue: QueueConfig,
    timeouts: Timeouts,
    log: LogConfig,
    runtime: RuntimeConfig,
    store: StoreConfig,
    delivery: DeliveryConfig,
    auth: AuthConfig,
    cluster: ClusterConfig,
);

/// The TOML key of a setting: its clap id, or the part after the dot of an id spelled
/// `section.key` (for keys that appear in two sections).
pub fn toml_key(arg: &Arg) -> &str {
    let id = arg.get_id().as_str();
    id.rsplit('.').next().unwrap_or(id)
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
///
/// A relay for people who do not trust each other runs with `mode = "required"`; see
/// relay/README.md "Accounts".
#[derive(Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// "off": anyone who can connect may use the relay (fine on loopback; a non-loopback
    /// listener without auth prints a loud warning). "required": every connection proves a
    /// relay account (Ed25519 challenge or bearer token) and key ids are claimed by the
    /// first account's group. `required` without `accounts` refuses to start.
    #[arg(long = "auth", env = "WHISPEER_AUTH")]
    pub mode: AuthMode,
    /// The account list (TOML), edited by `whispeer-relay account add|list|remove` and
    /// reloaded when it changes or on SIGHUP. Unreadable or invalid at start: the relay
    /// refuses to start; on a reload the previous list stays in force (logged at error,
    /// gauge whispeer_relay_account_list_valid 0), less the accounts, keys and tokens the
    /// invalid text no longer names when it is still TOML (once the same text is read
    /// twice, reload_ms apart: a file may be read mid-write). A valid list read from the
    /// file applies what it adds at once, but what it revokes (an account removed or
    /// reduced, a key or token no longer listed) only once a read at least reload_ms
    /// later still revokes it (within two reload periods; edits elsewhere do not delay
    /// it; a file cut short and restored revokes nothing); SIGHUP applies a valid list in
    /// full at once.
    #[arg(long, env = "WHISPEER_ACCOUNTS", value_name = "whispeer-accounts.toml")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accounts: Option<PathBuf>,
    /// This relay's names as clients dial it: `host` (any port) or `host:port`, an IPv6
    /// address in brackets (--auth-name repeatable, or comma separated). Set, every
    /// account-key sign-in must be bound to one of them (PROTOCOL §3.5.6): the Challenge
    /// asks for it, and an Auth naming no relay or another relay gets Err(auth_failed), so
    /// a relay passing this relay's challenge on to a client that uses the same account key
    /// with both cannot sign in here as that client. List every name clients dial (each DNS
    /// name, an address, a proxy's name in front); clients must know relay binding. Empty:
    /// sign-ins are not bound and that forwarding is possible (the relay warns at start
    /// when the account list has account keys).
    #[arg(
        long = "auth-name",
        env = "WHISPEER_AUTH_NAMES",
        value_delimiter = ',',
        value_name = "relay.example.com[:443]"
    )]
    pub names: Vec<String>,
    /// Append-only file of key-id claims and durable owners (rewritten compactly when dead lines outnumber live ones). serve default: the store path
    /// with ".auth" appended (kept in memory when the store is not sqlite).
    #[arg(
        long = "auth-state",
        env = "WHISPEER_AUTH_STATE",
        value_name = "whispeer-relay.db.auth"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<PathBuf>,
    /// Most key ids one group of accounts may claim; the request that would claim one more
    /// gets Err(quota_exceeded).
    #[arg(long = "max-claims", env = "WHISPEER_MAX_CLAIMS")]
    pub max_claims_per_group: usize,
    /// Most of its group's key-id claims one account may make, when other accounts share
    /// its group (an account alone in its group is bounded by max_claims_per_group only).
    /// At it, the account's own longest-unused claim lapses for its new key id as
    /// claim_idle_ms allows, or its request gets Err(quota_exceeded). A quarter of
    /// max_claims_per_group: one member — even one with only `subscribe`, holding junk key
    /// ids with live subscriptions, which never lapse — cannot fill its group's quota
    /// alone (four would have to), and a member still has thousands of key ids in use at
    /// once (one per conversation and epoch; its unused ones are recycled). Lower it with
    /// max_claims_per_group (at or above it, the relay warns at start: no protection). The
    /// refusal tells the account whether it holds the most of the group's claims itself;
    /// an info line names the account that does.
    #[arg(
        long = "max-claims-per-account",
        env = "WHISPEER_MAX_CLAIMS_PER_ACCOUNT"
    )]
    pub max_claims_per_account: usize,
    /// A group at max_claims_per_group that asks for a new key id gets its longest-unused
    /// claim released instead, once that claim has been unused here for this many
    /// milliseconds: no subscription or durable on it, nothing stored under it, no publish
    /// or subscribe on it (0 = never release; a cluster never releases). 7 days, like
    /// store.durable_idle_ms: an idle durable keeps its key id claimed until the store
    /// deletes it anyway, and members offline for a week do not come back to a key id
    /// taken by another group; junk key ids no longer subscribed to wait that long, or an
    /// operator runs `whispeer-relay claims release` (held ones never lapse: see
    /// max_claims_per_account). Idle times survive
    /// restarts; no claim lapses within an hour of a start (or claim_idle_ms, if shorter),
    /// while subscribers come back.
    #[arg(long = "claim-idle-ms", env = "WHISPEER_CLAIM_IDLE_MS")]
    pub claim_idle_ms: u64,
    /// How often the account file is checked for changes, in milliseconds. Also how long
    /// a revocation read from the file waits for its confirming read: a valid list's
    /// removal or reduction applies at the first read at least this long after it was
    /// first read that still makes it (so one to two reload periods), an invalid list's
    /// once the same text is read again this long after (a file may be read mid-write or
    /// cut short).
    #[arg(long = "accounts-reload-ms", env = "WHISPEER_ACCOUNTS_RELOAD_MS")]
    pub reload_ms: u64,
    /// Bearer token for the admin port (Authorization: Bearer ...): /status shows key ids
    /// only with it; required (at least 16 characters) when the admin port is not on
    /// loopback, or the relay refuses to start.
    #[arg(
        long,
        env = "WHISPEER_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
}

/// A secret in a `Debug` output (`BrokerOptions` prints its relay `Config`): set or not, and
/// its length, never its value.
struct Redacted<'a>(&'a Option<String>);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(s) => write!(f, "Some(<redacted, {} characters>)", s.chars().count()),
            None => f.write_str("None"),
        }
    }
}

/// NATS URLs with their user information (`user:password@`) redacted.
struct RedactedUrls<'a>(&'a [String]);

impl std::fmt::Debug for RedactedUrls<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| {
                let rest = u.find("://").map_or(0, |i| i + 3);
                match u[rest..]
                    .split(['/', '?', '#'])
                    .next()
                    .and_then(|a| a.rfind('@'))
                {
                    Some(at) => format!("{}<redacted>{}", &u[..rest], &u[rest + at..]),
                    None => u.clone(),
                }
            }))
            .finish()
    }
}

// `Debug` redacts `admin_token` (not said in the struct's doc comment: that is the
// section's text in `generate-config` and the README's settings table).
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured: a field added to the struct must be added here (compile error).
        let AuthConfig {
            mode,
            accounts,
            names,
            state,
            max_claims_per_group,
            max_claims_per_account,
            claim_idle_ms,
            reload_ms,
            admin_token,
        } = self;
        f.debug_struct("AuthConfig")
            .field("mode", mode)
            .field("accounts", accounts)
            .field("names", names)
            .field("state", state)
            .field("max_claims_per_group", max_claims_per_group)
            .field("max_claims_per_account", max_claims_per_account)
            .field("claim_idle_ms", claim_idle_ms)
            .field("reload_ms", reload_ms)
            .field("admin_token", &Redacted(admin_token))
            .finish()
    }
}

// `Debug` redacts `password`, `token` and a URL's user information
// (`nats://user:password@host`).
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ClusterConfig {
            urls,
            subject_prefix,
            name,
            credentials,
            user,
            password,
            token,
            tls_ca,
            tls_cert,
            tls_key,
            queue,
            queue_bytes,
            receive_bytes,
            subscription_capacity,
            store,
            stream,
            replicas,
            durable_lease_ms,
            shared_accounts,
        } = self;
        f.debug_struct("ClusterConfig")
            .field("urls", &RedactedUrls(urls))
            .field("subject_prefix", subject_prefix)
            .field("name", name)
            .field("credentials", credentials)
            .field("user", user)
            .field("password", &Redacted(password))
            .field("token", &Redacted(token))
            .field("tls_ca", tls_ca)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("queue", queue)
            .field("queue_bytes", queue_bytes)
            .field("receive_bytes", receive_bytes)
            .field("subscription_capacity", subscription_capacity)
            .field("store", store)
            .field("stream", stream)
            .field("replicas", replicas)
            .field("durable_lease_ms", durable_lease_ms)
            .field("shared_accounts", shared_accounts)
            .finish()
    }
}

impl AuthConfig {
    /// What the claim limits cannot keep of their promise (logged at start): a
    /// `max_claims_per_account` at or above `max_claims_per_group` lets one member fill
    /// its group's claims.
    pub fn claim_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.mode == AuthMode::Required
            && self.max_claims_per_account >= self.max_claims_per_group
        {
            out.push(format!(
                "auth.max_claims_per_account ({}) is not below auth.max_claims_per_group \
                 ({}): one member of a shared group can claim all of its key ids and keep \
                 them with live subscriptions; a quarter of max_claims_per_group is the default \
                 ratio",
                self.max_claims_per_account, self.max_claims_per_group
            ));
        }
        out
    }
}

impl AuthConfig {
    /// `names` in canonical form (`whispeer_protocol::relay_name::entry`), what a bound
    /// `Auth`'s relay name is compared with; the first entry that is none is the error.
    pub fn relay_names(&self) -> Result<Vec<String>, String> {
        self.names
            .iter()
            .map(|n| {
                whispeer_protocol::relay_name::entry(n).map_err(|why| {
                    format!(
                        "{n:?} is not a relay name ({why}): write host or host:port, \
                         e.g. relay.example.com or [2001:db8::1]:443"
                    )
                })
            })
            .collect()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Off,
            accounts: None,
            names: Vec::new(),
            state: None,
            max_claims_per_group: 10_000,
            max_claims_per_account: 2_500,
            claim_idle_ms: 7 * 24 * 3600 * 1000,
            reload_ms: 1_000,
            admin_token: None,
        }
    }
}

/// Relays sharing live routing through core NATS (off while `urls` is empty).
///
/// Each relay publishes the envelopes its clients publish to NATS (subject
/// `<subject_prefix>.<key id hex>.<token hex>…`) and subscribes on NATS only for the filters
/// its own clients hold. NATS sees what a relay sees: tokens, sizes, timing. See
/// docs/DEPLOY.md.
#[derive(Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs, comma separated (give every server of the NATS cluster: the relay
    /// reconnects to another one when its server goes away). Empty: no cluster.
    #[arg(
        long = "cluster",
        env = "WHISPEER_CLUSTER",
        value_delimiter = ',',
        value_name = "nats://h1:4222,nats://h2:4222"
    )]
    pub urls: Vec<String>,
    /// Subject prefix of every envelope on NATS; relays that share routing use the same one.
    #[arg(long = "cluster-prefix", env = "WHISPEER_CLUSTER_PREFIX")]
    pub subject_prefix: String,
    /// This relay's connection name on NATS (shown by the NATS monitoring endpoints).
    #[arg(
        long = "cluster-name",
        env = "WHISPEER_CLUSTER_NAME",
        value_name = "relay-1"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// NATS credentials file (`.creds`: a user JWT and NKey seed).
    #[arg(
        long = "cluster-credentials",
        env = "WHISPEER_CLUSTER_CREDENTIALS",
        value_name = "relay.creds"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
    /// NATS user name (with `password`).
    #[arg(
        long = "cluster-user",
        env = "WHISPEER_CLUSTER_USER",
        value_name = "relay"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// NATS password (with `user`).
    #[arg(
        long = "cluster-password",
        env = "WHISPEER_CLUSTER_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// NATS authentication token.
    #[arg(
        long = "cluster-token",
        env = "WHISPEER_CLUSTER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM file of CA certificates the NATS servers' certificates are checked against;
    /// setting it requires TLS to NATS.
    #[arg(
        long = "cluster-ca",
        env = "WHISPEER_CLUSTER_CA",
        value_name = "nats-ca.pem"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for NATS (mutual TLS, with `tls_key`).
    #[arg(
        long = "cluster-cert",
        env = "WHISPEER_CLUSTER_CERT",
        value_name = "relay-cert.pem"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[arg(
        long = "cluster-key",
        env = "WHISPEER_CLUSTER_KEY",
        value_name = "relay-key.pem"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Envelopes waiting to be published to NATS. When NATS is slow or unreachable the
    /// queue fills and further envelopes are routed locally only, counted in
    /// whispeer_relay_cluster_forward_dropped_total (QoS 0 loss across relays, reported to
    /// the other relays' subscribers in a Gap). The bound is shared among tenants: beyond
    /// it a tenant holding less than its fair share (this bound divided among the tenants
    /// with envelopes waiting) is still queued, so one tenant's flood never drops another's
    /// forwards; never past twice the bound; a lone tenant gets it all.
    #[arg(
        id = "cluster.queue",
        long = "cluster-queue",
        env = "WHISPEER_CLUSTER_QUEUE"
    )]
    pub queue: usize,
    /// Envelope bytes waiting to be published to NATS (0 = bounded by count only): in the
    /// queue and in the NATS client's own buffer, until the client has written them to
    /// its socket (by count alone 65,536 queued plus 2,048 buffered large envelopes could
    /// wait). Beyond it further envelopes are routed locally only and counted the same way.
    /// Shared among tenants as `queue` is (a tenant under its fair share is queued beyond
    /// it, never past twice the bound).
    #[arg(
        id = "cluster.queue_bytes",
        long = "cluster-queue-bytes",
        env = "WHISPEER_CLUSTER_QUEUE_BYTES"
    )]
    pub queue_bytes: u64,
    /// Envelope bytes received from NATS and not yet routed (0 = unbounded): when this
    /// relay falls behind what other relays send it, beyond this bound envelopes from NATS
    /// are dropped, counted in whispeer_relay_cluster_receive_dropped_total and reported in
    /// a Gap to each connection with a matching subscription (QoS 0 loss across relays),
    /// instead of waiting in memory. Shared among the tenants the forwards name (their
    /// Wsp-Tenant header; forwards without one share one part) like the forward queue: a
    /// tenant under its fair share is still taken beyond it, never past twice the bound, so
    /// one tenant's burst does not drop the envelopes of everyone behind it. The queue
    /// also holds at most 65,536 envelopes, shared the same way.
    #[arg(
        id = "cluster.receive_bytes",
        long = "cluster-receive-bytes",
        env = "WHISPEER_CLUSTER_RECEIVE_BYTES"
    )]
    pub receive_bytes: u64,
    /// Messages the NATS client buffers per subscription before this relay's reader moves
    /// them into the receive queue (at least 1). The client's connection task reads until
    /// its socket is empty or its scheduling budget (128 reads of up to 64 KiB) is spent
    /// before a reader runs: up to 8 MiB at once, 65,536 envelopes of 128 bytes. What
    /// overflows this buffer the client drops; each drop is counted in
    /// whispeer_relay_cluster_receive_dropped_total and reported in a Gap to the
    /// connections subscribed with that filter (the client reports drops through a
    /// bounded event channel, so in a burst some go uncounted).
    #[arg(
        id = "cluster.subscription_capacity",
        long = "cluster-subscription-capacity",
        env = "WHISPEER_CLUSTER_SUBSCRIPTION_CAPACITY"
    )]
    pub subscription_capacity: usize,
    /// Where a clustered relay keeps messages: "local" (its own [store]; sequence numbers
    /// per relay, QoS >= 1 does not cross relays) or "jetstream" (one JetStream stream
    /// numbers and keeps every stored message for the whole cluster: the same sequences,
    /// history, retained values and durables on every relay; [store] kind is not used).
    #[arg(
        id = "cluster.store",
        long = "cluster-store",
        env = "WHISPEER_CLUSTER_STORE"
    )]
    pub store: ClusterStore,
    /// JetStream stream of stored messages (store "jetstream"); retained values live in
    /// the stream `<stream>_RETAINED`, durable positions in the stream `<stream>_DURABLE`
    /// and holds on durable names in `<stream>_LEASES`. Relays that share one numbering
    /// use the same name.
    #[arg(long = "cluster-stream", env = "WHISPEER_CLUSTER_STREAM")]
    pub stream: String,
    /// JetStream replicas of the streams the relays create (1 to 5; 3 on a three-node NATS
    /// cluster survives the loss of one node).
    #[arg(long = "cluster-replicas", env = "WHISPEER_CLUSTER_REPLICAS")]
    pub replicas: usize,
    /// Store "jetstream": how long a relay's hold on a durable subscription name lasts
    /// without renewal (ms; renewed every third of it, in the stream `<stream>_LEASES`).
    /// While a connection at one relay holds a durable, a Sub for it at another relay gets
    /// Err(busy) (retryable); a hold its relay stopped renewing (dead, frozen, cut off from NATS)
    /// can be taken once this has passed, and a relay that cannot renew ends its own
    /// holder's subscription before then. 300 to 600000.
    #[arg(
        id = "cluster.durable_lease_ms",
        long = "cluster-durable-lease-ms",
        env = "WHISPEER_CLUSTER_DURABLE_LEASE_MS"
    )]
    pub durable_lease_ms: u64,
    /// Store "jetstream": the relay-account list is the cluster's, kept in the stream
    /// `<stream>_ACCOUNTS` (`whispeer-relay account add|list|remove --config` with this
    /// set edits it there) instead of each relay's `auth.accounts` file; every relay
    /// follows its changes at once and closes the connections of removed accounts.
    #[arg(
        id = "cluster.shared_accounts",
        long = "cluster-shared-accounts",
        env = "WHISPEER_CLUSTER_SHARED_ACCOUNTS",
        action = ArgAction::Set
    )]
    pub shared_accounts: bool,
}

/// Where a clustered relay keeps messages (`[cluster] store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterStore {
    /// The relay's own `[store]`; NATS carries live routing only.
    #[default]
    Local,
    /// JetStream numbers and keeps stored messages for every relay of the cluster.
    Jetstream,
}

impl fmt::Display for ClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterStore::Local => "local",
            ClusterStore::Jetstream => "jetstream",
        })
    }
}

impl FromStr for ClusterStore {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" => Ok(ClusterStore::Local),
            "jetstream" => Ok(ClusterStore::Jetstream),
            other => Err(format!("{other:?} is not \"local\" or \"jetstream\"")),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            subject_prefix: "wsp".into(),
            name: None,
            credentials: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            queue: 65_536,
            queue_bytes: 64 << 20,
            receive_bytes: 64 << 20,
            subscription_capacity: 65_536,
            store: ClusterStore::Local,
            stream: "WSP".into(),
            replicas: 1,
            durable_lease_ms: 6_000,
            shared_accounts: false,
        }
    }
}

impl ClusterConfig {
    /// Whether the relay joins a cluster.
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }

    /// Whether stored messages live in JetStream (a cluster with `store = "jetstream"`).
    pub fn jetstream(&self) -> bool {
        self.enabled() && self.store == ClusterStore::Jetstream
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

/// The message store: kind, file, retention per token path, dedup window and quotas.
///
/// Quotas: a tenant is the relay account (accounts on) or the source address (accounts
/// off); 0 = unlimited. At a quota the publisher gets Err(quota_exceeded) (not fatal, names
/// the publish id or sub id) and other tenants are untouched. Bytes count history plus
/// retained values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// "sqlite" (durable file, the serve default), "memory" (same features, lost on
    /// restart; the library default) or "none" (live fan-out only: a QoS >= 1 Pub gets
    /// Err(store_failed), a Sub for history Err(not_allowed)).
    #[arg(long = "store", env = "WHISPEER_STORE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<StoreKind>,
    /// The SQLite file (kind sqlite; created if missing; a foreign or damaged file fails at
    /// start).
    #[arg(long = "store-path", env = "WHISPEER_STORE_PATH")]
    pub path: PathBuf,
    /// "full": fsync per commit (survives power loss); "normal": fsync per checkpoint
    /// (survives a process crash).
    #[arg(long = "store-sync", env = "WHISPEER_STORE_SYNC")]
    pub sync: SyncMode,
    /// Messages queued for the writer thread; beyond it a publish that needs the store is
    /// answered Err(busy) (retryable, names the publish id) — unless its tenant holds less
    /// than its fair share (this bound divided among the tenants with writes waiting), so one
    /// tenant's flood never refuses another's publish; never past twice the bound.
    #[arg(long = "store-queue", env = "WHISPEER_STORE_QUEUE")]
    pub queue: usize,
    /// Envelope bytes queued for the writer thread (0 = bounded by count only): while
    /// the disk lags, what waits for it is held in memory, and `queue` alone would let
    /// 65,536 large envelopes (GiBs) wait. Beyond it a publish that needs the store is
    /// answered Err(busy) (retryable); a message larger than the bound is queued when
    /// nothing else waits.
    #[arg(long = "store-queue-bytes", env = "WHISPEER_STORE_QUEUE_BYTES")]
    pub queue_bytes: u64,
    /// Most operations per transaction (group commit).
    #[arg(long = "store-max-batch", env = "WHISPEER_STORE_MAX_BATCH")]
    pub max_batch: usize,
    /// Retention per token path: most messages kept (0 = unlimited); the oldest are
    /// deleted.
    #[arg(long = "retention-messages", env = "WHISPEER_RETENTION_MESSAGES")]
    pub max_messages: u64,
    /// Retention per token path: most envelope bytes kept (0 = unlimited).
    #[arg(
        id = "store.max_bytes",
        long = "retention-bytes",
        env = "WHISPEER_RETENTION_BYTES"
    )]
    pub max_bytes: u64,
    /// Retention per token path: oldest message kept, in milliseconds (0 = unlimited).
    #[arg(long = "retention-age-ms", env = "WHISPEER_RETENTION_AGE_MS")]
    pub max_age_ms: u64,
    /// How long a QoS 2 publish id is remembered for exactly-once dedup, in milliseconds.
    #[arg(long, env = "WHISPEER_DEDUP_WINDOW_MS")]
    pub dedup_window_ms: u64,
    /// Most publish ids remembered for dedup. Ids are kept per tenant (one tenant's ids
    /// never answer another's publish). The bound is exact: over it, the tenant holding
    /// the most ids gives back its own oldest (of equal counts, the tenant the store
    /// numbered last), whoever published. So a tenant holding at most `dedup_max / T` ids
    /// (T: tenants with ids in the window) never loses one: a tenant filling the window
    /// leaves every other its share.
    #[arg(long, env = "WHISPEER_DEDUP_MAX")]
    pub dedup_max: usize,
    /// Keep QoS 0 messages in history too (false: QoS 0 is live-only; retained QoS 0 values
    /// are kept as retained values either way).
    #[arg(long, env = "WHISPEER_STORE_QOS0", action = ArgAction::Set)]
    pub store_qos0: bool,
    /// Retained values older than this many milliseconds are deleted (0 = kept until
    /// replaced).
    #[arg(long, env = "WHISPEER_RETAINED_MAX_AGE_MS")]
    pub retained_max_age_ms: u64,
    /// Per tenant: most stored bytes (history plus retained values). The SQLite store
    /// counts each envelope with its share of the file's pages: 1.0-2x its size.
    #[arg(long, env = "WHISPEER_TENANT_MAX_BYTES")]
    pub tenant_max_bytes: u64,
    /// Per tenant: most stored messages.
    #[arg(long, env = "WHISPEER_TENANT_MAX_MESSAGES")]
    pub tenant_max_messages: u64,
    /// Per tenant: most retained values (replacing one is free).
    #[arg(long, env = "WHISPEER_TENANT_MAX_RETAINED")]
    pub tenant_max_retained: u64,
    /// Per tenant: most durable subscription names (the Sub gets Err(quota_exceeded)).
    #[arg(long, env = "WHISPEER_TENANT_MAX_DURABLES")]
    pub tenant_max_durables: u64,
    /// A durable subscription no subscription has held for this many milliseconds is
    /// deleted — its name, position and owner — and no longer counts against the durable
    /// quotas (0 = kept until its owner deletes it). The idle time survives restarts.
    #[arg(long, env = "WHISPEER_DURABLE_IDLE_MS")]
    pub durable_idle_ms: u64,
    /// Cluster JetStream store only: how long the deletion marker of a deleted durable
    /// subscription stays in the durable stream, in milliseconds, before a relay's sweep
    /// purges it (at least 1). Every relay learns of the deletion from the marker: keep it
    /// above the longest time a relay may be cut off from NATS, or that relay counts the
    /// durable against the durable quotas until its idle sweep or a restart. Relays sweep
    /// every quarter of this or of durable_idle_ms, whichever is shorter (100 ms to 60 s).
    /// The shortest keep time among the cluster's relays applies to all (each relay's sweep
    /// purges every marker older than its own); below a minute the relay warns at start.
    #[arg(long, env = "WHISPEER_DURABLE_MARKER_KEEP_MS")]
    pub durable_marker_keep_ms: u64,
    /// Per tenant: most distinct token paths with stored data.
    #[arg(long, env = "WHISPEER_TENANT_MAX_PATHS")]
    pub tenant_max_paths: u64,
    /// All tenants: most stored bytes, counted as for tenant_max_bytes (with SQLite: the
    /// pages the messages and retained values take in the store file; not its WAL).
    #[arg(long, env = "WHISPEER_TOTAL_MAX_BYTES")]
    pub total_max_bytes: u64,
    /// All tenants: most stored messages.
    #[arg(long, env = "WHISPEER_TOTAL_MAX_MESSAGES")]
    pub total_max_messages: u64,
    /// All tenants: most retained values.
    #[arg(long, env = "WHISPEER_TOTAL_MAX_RETAINED")]
    pub total_max_retained: u64,
    /// All tenants: most durable subscription names.
    #[arg(long, env = "WHISPEER_TOTAL_MAX_DURABLES")]
    pub total_max_durables: u64,
    /// All tenants: most distinct token paths with stored data.
    #[arg(long, env = "WHISPEER_TOTAL_MAX_PATHS")]
    pub total_max_paths: u64,
    /// The reserve: the last this-many percent of each all-tenant limit above (0..=90) is
    /// kept for tenants holding little. Past the rest, a write is accepted only from a
    /// tenant that holds at most its share of the reserve (reserve / reserve_tenants)
    /// after it; a tenant holding more gets Err(quota_exceeded) naming the reserve
    /// (counted in whispeer_relay_store_quota_reserve_rejections_total). So a few tenants
    /// that filled the store (a flood from a few addresses or accounts) never leave the
    /// others nothing, and below the reserve nothing is set aside for idle tenants. 0 = no
    /// reserve (the totals are first-come).
    #[arg(long, env = "WHISPEER_RESERVE_PERCENT", value_parser = clap::value_parser!(u8).range(0..=90))]
    pub reserve_percent: u8,
    /// How many tenants the reserve is divided among: each may hold up to reserve /
    /// reserve_tenants and still write into it (at least 1). With auth required, the
    /// number of relay accounts guarantees every account its share; without auth a
    /// tenant is a source address, and this many addresses can use the reserve up.
    #[arg(long, env = "WHISPEER_RESERVE_TENANTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub reserve_tenants: u64,
    /// While the disk is full (or a commit failed), publishes needing the store get
    /// Err(storage_full) (retryable) and the store retries every this many milliseconds,
    /// resuming by itself when space frees.
    #[arg(long = "store-retry-ms", env = "WHISPEER_STORE_RETRY_MS")]
    pub retry_ms: u64,
    /// Bytes the file system holding the store file must keep free (sqlite only; 0 = no
    /// reserve), counting the store file's own free pages (left by retention and expiry;
    /// the file reuses them before it grows) as free. Below it, publishes that need the store get Err(storage_full) (retryable)
    /// before SQLite meets a full disk: the WAL grows beyond what the quotas count while
    /// publishes stream in. A store whose commit did meet a full disk resumes only once
    /// this much is free again. Shown in /status (state "low_disk", disk_free_bytes),
    /// counted in whispeer_relay_store_low_disk_rejections_total, logged when it starts
    /// and ends. Keep it above one batch of the write queue (queue_bytes); lower both on a
    /// small disk.
    #[arg(long = "store-min-free-bytes", env = "WHISPEER_STORE_MIN_FREE_BYTES")]
    pub min_free_bytes: u64,
    /// How much lower the store's writer and checkpoint threads run than the routing
    /// threads (a Linux nice increment, 0..=19; 0 = the same priority; no effect on other
    /// systems). A trade-off for a CPU-bound relay: higher, live routing wins over durable
    /// writes (an honest client's p99 beside a stored flood roughly halves) but QoS >= 1
    /// throughput drops (at 3, about half with sync=full on a busy 2-core machine).
    #[arg(long = "store-thread-nice", env = "WHISPEER_STORE_THREAD_NICE", value_parser = clap::value_parser!(u8).range(0..=19))]
    pub thread_nice: u8,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: None,
            path: PathBuf::from("whispeer-relay.db"),
            sync: SyncMode::Full,
            queue: 65_536,
            queue_bytes: 64 << 20,
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
            durable_idle_ms: 7 * 24 * 3600 * 1000,
            durable_marker_keep_ms: 24 * 3600 * 1000,
            tenant_max_paths: 10_000,
            total_max_bytes: 8 << 30,
            total_max_messages: 50_000_000,
            total_max_retained: 1_000_000,
            total_max_durables: 100_000,
            total_max_paths: 1_000_000,
            reserve_percent: 10,
            reserve_tenants: 100,
            retry_ms: 500,
            min_free_bytes: 256 << 20,
            thread_nice: 0,
        }
    }
}

/// At-least-once delivery to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// A delivered QoS >= 1 message not acknowledged within this many milliseconds is sent
    /// again (flagged REDELIVERED).
    #[arg(long, env = "WHISPEER_ACK_TIMEOUT_MS")]
    pub ack_timeout_ms: u64,
    /// Most unacknowledged messages in flight per QoS >= 1 subscription, and the default
    /// credit of a Sub without one (a Sub's credit is capped to it). Beyond it delivery of
    /// that subscription pauses, the messages wait in the store and follow, in order, as
    /// acks free credit; the connection is not closed.
    #[arg(long, env = "WHISPEER_MAX_UNACKED")]
    pub max_unacked: usize,
    /// Most bytes of unacknowledged envelopes per subscription; beyond it delivery pauses
    /// like at max_unacked.
    #[arg(long, env = "WHISPEER_MAX_UNACKED_BYTES")]
    pub max_unacked_bytes: usize,
    /// Most bytes of unacknowledged envelopes over all QoS >= 1 subscriptions of one
    /// connection (max_unacked_bytes bounds one, and a connection may hold
    /// max_subscriptions of them: a client that reads but never acks made the relay keep
    /// GiBs). Beyond it delivery of its subscriptions pauses like at max_unacked (one
    /// message always goes when the connection has nothing unacknowledged).
    #[arg(long, env = "WHISPEER_CONNECTION_UNACKED_BYTES")]
    pub connection_unacked_bytes: usize,
    /// Most bytes of unacknowledged envelopes over all QoS >= 1 subscriptions of all
    /// connections together; 0 = unlimited. A QoS 0 message delivered to a QoS >= 1
    /// subscription is kept only there, for redelivery (the store does not keep it), so
    /// without it one address's connections that read but never ack held
    /// connection_unacked_bytes each (256 × 64 MiB = 16 GiB). Up to half of it goes to whoever
    /// asks; beyond half, only to a source address (an IPv6 network of addr_ipv6_prefix)
    /// holding less than its fair share of that half (half / addresses holding unacknowledged
    /// bytes), and within it to a connection holding less than its share of the address's;
    /// never beyond the whole. Over it a subscription pauses like at max_unacked: stored
    /// messages wait in the store and follow once acks free bytes; unstored QoS 0 ones are
    /// counted (whispeer_relay_credit_lost_total) and reported to it in a Gap. When the whole
    /// is spent and an address under its share asks, the relay takes room back from the
    /// address holding the most, never the asking one nor one at or under its share: first
    /// it forgets that address's unacknowledged deliveries of QoS 0 messages the store does
    /// not keep (sent already; only their redelivery is given up;
    /// whispeer_relay_unacked_qos0_forgotten_total), and only if that is not enough it
    /// closes (slow_consumer) the connection holding the most bytes there. Gauge
    /// whispeer_relay_unacked_bytes; whispeer_relay_unacked_budget_pauses_total.
    #[arg(long, env = "WHISPEER_TOTAL_UNACKED_BYTES")]
    pub total_unacked_bytes: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 30_000,
            max_unacked: 4_096,
            max_unacked_bytes: 16 << 20,
            connection_unacked_bytes: 64 << 20,
            total_unacked_bytes: 1 << 30,
        }
    }
}

impl DeliveryConfig {
    /// `ack_timeout_ms` as a duration.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

/// Listener addresses: IP:PORT, port 0 picks a free port, "off" disables a listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// Plain WebSocket (ws://): binary messages, one frame each.
    #[arg(long, env = "WHISPEER_WS")]
    pub ws: ListenAddr,
    /// Length-prefixed TCP (u32 big-endian length, then the frame).
    #[arg(long, env = "WHISPEER_TCP")]
    pub tcp: ListenAddr,
    /// WebSocket over TLS (wss://); needs [tls].
    #[arg(long, env = "WHISPEER_WSS")]
    pub wss: ListenAddr,
    /// Length-prefixed TCP over TLS (tls://); needs [tls].
    #[arg(long, env = "WHISPEER_TLS")]
    pub tls: ListenAddr,
    /// QUIC (quic://, a UDP port): one bidirectional stream of length-prefixed frames, TLS
    /// 1.3, connection migration; needs [tls].
    #[arg(long, env = "WHISPEER_QUIC")]
    pub quic: ListenAddr,
    /// Admin HTTP: /metrics (Prometheus), /status (JSON), /healthz. Off loopback it needs
    /// auth.admin_token.
    #[arg(long, env = "WHISPEER_ADMIN")]
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
            quic: ListenAddr::OFF,
            admin: local(7482),
        }
    }
}

/// PEM files for the wss, tls and quic listeners (`whispeer-relay tls generate` writes a pair).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    #[arg(long = "tls-cert", env = "WHISPEER_TLS_CERT", value_name = "relay.crt")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", env = "WHISPEER_TLS_KEY", value_name = "relay.key")]
    pub key: Option<PathBuf>,
}

/// Limits that protect the relay and other clients from one client.
///
/// Size and count limits answer a typed Err frame and close that connection. Rate limits
/// never disconnect: over a rate, the relay stops reading that connection until its bucket
/// refills (its idle timer is suspended meanwhile), so the client is slowed down and loses
/// nothing. 0 = unlimited for every rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, in bytes (TCP length prefix, WebSocket message); larger:
    /// fatal Err(frame_too_large). Before Welcome, frames are capped at 4 KiB (Hello and Auth
    /// are smaller), so a stranger cannot park a partial max_frame.
    #[arg(long, env = "WHISPEER_MAX_FRAME")]
    pub max_frame: usize,
    /// Bytes of frames over 64 KiB that all connections together may be receiving at once
    /// (a partial frame is held in memory until complete, and does not reset the idle
    /// timer). A large frame takes its size when its length arrives (a fragmented WebSocket
    /// message: max_frame) and gives it back when complete; when the budget is spent the
    /// connection is not read until it frees (backpressure, idle timer suspended;
    /// whispeer_relay_frame_budget_waits_total); frames up to 64 KiB never wait. At least
    /// max_frame; 0 = unlimited.
    #[arg(long, env = "WHISPEER_LARGE_FRAME_BUDGET")]
    pub large_frame_budget: usize,
    /// Bytes of send windows all QUIC connections share: what quinn may hold in the relay's
    /// memory, written and not yet acknowledged by the client (TCP keeps it in kernel
    /// buffers). Each connection's window is this divided by the open QUIC connections, at
    /// most 2 MiB and at least 64 KiB (slower, never refused), set again every second as
    /// connections open and close (whispeer_relay_quic_send_window_bytes). 0 = unlimited
    /// (2 MiB each).
    #[arg(long, env = "WHISPEER_QUIC_SEND_WINDOW_TOTAL")]
    pub quic_send_window_total: u64,
    /// Bytes of receive windows all QUIC connections share above their 32 KiB floors: what
    /// clients may send that quinn holds in the relay's memory until the relay reads it
    /// (TCP keeps it in kernel buffers) — the relay stops reading a connection over its
    /// publish rate, so each can fill its window. Every connection starts at the floor
    /// (slower, never refused) and its window follows its use, set every second: doubled
    /// while the relay reads at least half of it a second, up to the floor plus this divided
    /// by the busy connections (at most 512 KiB) and only out of what the others leave;
    /// halved down to the floor while not. Credit granted before a window shrank counts
    /// until the relay reads it (whispeer_relay_quic_receive_window_bytes). 0 = unlimited
    /// (512 KiB each).
    #[arg(long, env = "WHISPEER_QUIC_RECEIVE_WINDOW_TOTAL")]
    pub quic_receive_window_total: u64,
    /// Most concurrent client connections, handshakes included. When the relay is full a
    /// new connection may evict one not yet welcomed (in its TLS/WebSocket/QUIC handshake
    /// or waiting for its Hello; closed with Err(too_many_connections) "relay full:
    /// handshake evicted" when it is far enough for one): the oldest of the network (as
    /// network_ipv4_prefix / network_ipv6_prefix) holding the most unwelcomed places, and
    /// only one older than min(2 s, hello_ms / 2) — else the newcomer is refused. The
    /// evictor pays every other cap and must be within its addr_connect_rate (else refused,
    /// charged, and banned for churn as on a full relay); evictions take tokens of an
    /// eviction bucket of its network (with a network cap; 8 × addr_connect_rate, apart
    /// from the bucket of refusals at the caps whose debt bans a network), and beyond it
    /// they are refused as on a full relay (never banning the network). So an honest
    /// handshake is evicted only once that old, only while its
    /// network holds the most unwelcomed places, and only after max_connections − W newer
    /// unwelcomed connections arrived (W: welcomed sessions). Welcomed sessions are never
    /// evicted: with none to evict the newcomer is refused (fatal Err(too_many_connections)
    /// on TCP; other listeners close the socket). With auth off (the default) any stranger
    /// that sends a Hello is a welcomed session: keeping strangers from holding every place
    /// needs auth.mode = "required" (otherwise only the per-address and per-network caps
    /// limit them). Evicted connections are closed within 1 s of their eviction (also one
    /// evicted while it drains after a fatal Err before Welcome), and the relay holds at
    /// most max_connections + max(max_connections / 8, 16) client sockets, evicted ones
    /// still closing included (beyond it newcomers are refused), plus at most 64 refused TCP
    /// connections being told why (the rest are closed unanswered): the open-file limit
    /// must allow that, the admin port's 256 sockets and 64 more (the relay warns at
    /// start otherwise). Counted in whispeer_relay_handshakes_evicted_total.
    #[arg(long, env = "WHISPEER_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Most subscriptions one connection may hold (fatal Err(too_many_subscriptions)).
    #[arg(long, env = "WHISPEER_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: usize,
    /// Most subscriptions one tenant may hold over all its connections: the relay account
    /// with auth required, else the source address (IPv6 by addr_ipv6_prefix). Over it a
    /// Sub gets a non-fatal Err(too_many_subscriptions); 0 = unlimited.
    #[arg(long, env = "WHISPEER_TENANT_MAX_SUBSCRIPTIONS")]
    pub tenant_max_subscriptions: usize,
    /// Most memory one tenant's subscription filters may cost the relay, in bytes, each
    /// counted as 512 + 544 per level (what an unshared filter costs the routing index:
    /// 32 MiB is ~10,000 filters of 4 levels or ~1,900 of 32); over it a Sub gets a
    /// non-fatal Err(too_many_subscriptions); 0 = unlimited.
    #[arg(long, env = "WHISPEER_TENANT_SUBSCRIPTION_BYTES")]
    pub tenant_subscription_bytes: usize,
    /// Most subscriptions the relay holds in all (non-fatal Err(too_many_subscriptions)
    /// beyond); 0 = unlimited.
    #[arg(long, env = "WHISPEER_MAX_TOTAL_SUBSCRIPTIONS")]
    pub max_total_subscriptions: usize,
    /// Most memory all subscription filters may cost, counted as for
    /// tenant_subscription_bytes; 0 = unlimited.
    #[arg(long, env = "WHISPEER_TOTAL_SUBSCRIPTION_BYTES")]
    pub total_subscription_bytes: usize,
    /// The subscription reserve: the last this-many percent of max_total_subscriptions and
    /// of total_subscription_bytes (0..=90) is kept for tenants holding few. Past the
    /// rest, a Sub is taken only from a tenant that holds at most its share of the reserve
    /// (reserve / subscription_reserve_tenants) after it; a tenant holding more gets a
    /// non-fatal Err(too_many_subscriptions) naming the reserve. So a few tenants that
    /// filled the totals (32 at the default caps: accounts, or /64s of one IPv6 /48 with
    /// auth off) never lock the others out, and below the reserve nothing is set aside for
    /// idle tenants. 0 = no reserve (the totals are first-come).
    #[arg(long, env = "WHISPEER_SUBSCRIPTION_RESERVE_PERCENT", value_parser = clap::value_parser!(u8).range(0..=90))]
    pub subscription_reserve_percent: u8,
    /// How many tenants the subscription reserve is divided among: each may hold up to
    /// reserve / subscription_reserve_tenants (of the count and of the bytes; a byte share
    /// is raised to one 1-level filter, and a share too small to use is warned about at
    /// start) and still subscribe into it (at least 1). With auth required, the number of relay accounts
    /// guarantees every account its share; without auth a tenant is a source address, and
    /// this many addresses can use the reserve up.
    #[arg(long, env = "WHISPEER_SUBSCRIPTION_RESERVE_TENANTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub subscription_reserve_tenants: u64,
    /// Most levels in a subscription filter, 1..=32 (fatal Err(invalid_filter)).
    #[arg(long, env = "WHISPEER_MAX_FILTER_DEPTH")]
    pub max_filter_depth: usize,
    /// Sustained publishes per second per connection (token bucket rate).
    #[arg(long, env = "WHISPEER_PUBLISH_RATE")]
    pub publish_rate: u32,
    /// Burst of publishes per connection (token bucket size).
    #[arg(long, env = "WHISPEER_PUBLISH_BURST")]
    pub publish_burst: u32,
    /// Most connections from one source IP address, TLS/WebSocket handshakes included; over
    /// it the tcp listener answers Err(too_many_connections), the others close the socket.
    /// Behind a reverse proxy every client has the proxy's address: raise it there.
    #[arg(long, env = "WHISPEER_MAX_CONNECTIONS_PER_ADDR")]
    pub max_connections_per_addr: usize,
    /// Most connections from one network, TLS/WebSocket handshakes included: the IPv4 /24
    /// or IPv6 /48 (network_ipv4_prefix, network_ipv6_prefix) around the source address,
    /// over all its addresses. Without it one IPv6 customer (a /48 is 65,536 sources of
    /// max_connections_per_addr each) or 40 addresses of one IPv4 network could hold every
    /// place; the default (max_connections / 8) takes 8 networks to fill the relay. Over it
    /// the same refusal as max_connections_per_addr ("… per network …"). Many honest hosts
    /// can share a network (a carrier-grade NAT pool, a campus): raise it with
    /// max_connections, or further (0 = no network cap) if one network really brings that
    /// many clients. Connects refused at this cap or max_connections_per_addr also count
    /// against their network's connect bucket, 8 × addr_connect_rate and
    /// addr_connect_burst (400/s, burst 2,048 by default): a network whose refusals run
    /// faster (one /48 rotating its /64s, each with a fresh bucket) is churning as a whole
    /// — its connects closed unanswered and the network banned at accept
    /// (addr_churn_ban_secs). Refusals at max_connections (the relay full: no network's
    /// doing) never count against a network, and with 0 no network is ever charged or
    /// banned (single churning addresses still are).
    #[arg(long, env = "WHISPEER_MAX_CONNECTIONS_PER_NETWORK")]
    pub max_connections_per_network: usize,
    /// Leading bits of an IPv4 source address that max_connections_per_network counts by
    /// (8..=32).
    #[arg(long, env = "WHISPEER_NETWORK_IPV4_PREFIX")]
    pub network_ipv4_prefix: u8,
    /// Leading bits of an IPv6 source address that max_connections_per_network counts by
    /// (16..=128; a network is never smaller than addr_ipv6_prefix, the shorter applies):
    /// 48 is one site, what one customer can get (a free tunnel broker hands out /48s).
    #[arg(long, env = "WHISPEER_NETWORK_IPV6_PREFIX")]
    pub network_ipv6_prefix: u8,
    /// Sustained Sub/Unsub requests per second per connection (a Sub that replays history
    /// or resumes a durable costs replay_cost).
    #[arg(long, env = "WHISPEER_SUB_RATE")]
    pub sub_rate: u32,
    /// Burst of Sub/Unsub requests per connection.
    #[arg(long, env = "WHISPEER_SUB_BURST")]
    pub sub_burst: u32,
    /// Tokens a Sub asking for history (replay or a durable resume) costs.
    #[arg(long, env = "WHISPEER_REPLAY_COST")]
    pub replay_cost: u32,
    /// Sustained Ack frames per second per connection (Ping, Pong and Err frames count as
    /// Acks here). Over it the connection is read more slowly (backpressure, nothing
    /// refused).
    #[arg(long, env = "WHISPEER_ACK_RATE")]
    pub ack_rate: u32,
    /// Burst of Ack (and Ping, Pong, Err) frames per connection.
    #[arg(long, env = "WHISPEER_ACK_BURST")]
    pub ack_burst: u32,
    /// Publishes per second shared by all connections of one source address (reconnecting
    /// does not reset it).
    #[arg(long, env = "WHISPEER_ADDR_PUBLISH_RATE")]
    pub addr_publish_rate: u32,
    /// Burst of publishes per source address.
    #[arg(long, env = "WHISPEER_ADDR_PUBLISH_BURST")]
    pub addr_publish_burst: u32,
    /// Leading bits of an IPv6 source address that every per-address limit and quota
    /// counts by (32..=128): a host usually holds a whole /64 and can use any address in
    /// it, so 64 makes one such host one source. IPv4 addresses count singly.
    #[arg(long, env = "WHISPEER_ADDR_IPV6_PREFIX")]
    pub addr_ipv6_prefix: u8,
    /// New connections per second from one source address. Over it a connection is still
    /// accepted, but its handshake waits until the address's bucket refills (connection
    /// churn costs the relay a bounded rate of handshakes; nothing is refused for it).
    #[arg(long, env = "WHISPEER_ADDR_CONNECT_RATE")]
    pub addr_connect_rate: u32,
    /// Burst of new connections per source address (connections arriving at once before
    /// any waits). A network (network_ipv4_prefix, network_ipv6_prefix) has 8 times this
    /// burst and addr_connect_rate for its refused connects: beyond, it is churning as a
    /// whole (see max_connections_per_network).
    #[arg(long, env = "WHISPEER_ADDR_CONNECT_BURST")]
    pub addr_connect_burst: u32,
    /// Longest ban, in seconds, of a churning source address (one at max_connections_per_addr
    /// and over addr_connect_rate that keeps connecting): its new TCP connections are dropped
    /// by the kernel before accept (a socket filter on the listeners; Linux), for 1 s, then
    /// twice as long each time it churns again soon after, up to this. Its open connections
    /// are untouched, and a client's connect made meanwhile completes when the ban ends (as
    /// after packet loss). A network whose many addresses are refused at their caps faster
    /// than 8 × addr_connect_rate together (see max_connections_per_network; never when
    /// that is 0, nor for the relay being full) is banned the same way,
    /// at accept (the socket filter holds addresses, not networks). 0 = no bans (such
    /// connections are accepted and closed).
    #[arg(long, env = "WHISPEER_ADDR_CHURN_BAN_SECS")]
    pub addr_churn_ban_secs: u32,
    /// Sub/Unsub requests per second shared by one source address.
    #[arg(long, env = "WHISPEER_ADDR_SUB_RATE")]
    pub addr_sub_rate: u32,
    /// Burst of Sub/Unsub requests per source address.
    #[arg(long, env = "WHISPEER_ADDR_SUB_BURST")]
    pub addr_sub_burst: u32,
    /// Ack frames per second shared by one source address (Ping, Pong and Err frames count
    /// as Acks here).
    #[arg(long, env = "WHISPEER_ADDR_ACK_RATE")]
    pub addr_ack_rate: u32,
    /// Burst of Ack (and Ping, Pong, Err) frames per source address.
    #[arg(long, env = "WHISPEER_ADDR_ACK_BURST")]
    pub addr_ack_burst: u32,
    /// Publishes per second shared by all connections of one relay account (auth on), from
    /// any address.
    #[arg(long, env = "WHISPEER_ACCOUNT_PUBLISH_RATE")]
    pub account_publish_rate: u32,
    /// Burst of publishes per relay account.
    #[arg(long, env = "WHISPEER_ACCOUNT_PUBLISH_BURST")]
    pub account_publish_burst: u32,
    /// Sub/Unsub requests per second shared by one relay account (a replaying Sub costs
    /// replay_cost).
    #[arg(long, env = "WHISPEER_ACCOUNT_SUB_RATE")]
    pub account_sub_rate: u32,
    /// Burst of Sub/Unsub requests per relay account.
    #[arg(long, env = "WHISPEER_ACCOUNT_SUB_BURST")]
    pub account_sub_burst: u32,
    /// Ack (and Ping, Pong, Err) frames per second shared by one relay account.
    #[arg(long, env = "WHISPEER_ACCOUNT_ACK_RATE")]
    pub account_ack_rate: u32,
    /// Burst of Ack (and Ping, Pong, Err) frames per relay account.
    #[arg(long, env = "WHISPEER_ACCOUNT_ACK_BURST")]
    pub account_ack_burst: u32,
    /// Envelope bytes per second that publishes from one source address may store
    /// (history and retained values; 0 = unlimited). Over it the address's connections are
    /// read more slowly (backpressure, nothing refused): a storing flood costs the relay's
    /// writer CPU that live routing for everyone else needs.
    #[arg(long, env = "WHISPEER_ADDR_STORE_RATE")]
    pub addr_store_rate: u32,
    /// Burst of stored envelope bytes per source address.
    #[arg(long, env = "WHISPEER_ADDR_STORE_BURST")]
    pub addr_store_burst: u32,
    /// Envelope bytes per second that one relay account may store (0 = unlimited).
    #[arg(long, env = "WHISPEER_ACCOUNT_STORE_RATE")]
    pub account_store_rate: u32,
    /// Burst of stored envelope bytes per relay account.
    #[arg(long, env = "WHISPEER_ACCOUNT_STORE_BURST")]
    pub account_store_burst: u32,
}

impl Limits {
    /// Most client sockets the relay holds for `max_connections`: that many connections
    /// plus the evicted ones still closing (`max_connections / 8`, at least 16) — beyond
    /// them newcomers are refused, whatever could be evicted — plus the refused plain TCP
    /// connections being told why (64 at most at once, each for 1 s at most; beyond, they
    /// are closed unanswered).
    pub fn connection_ceiling(max_connections: usize) -> usize {
        crate::handshakes::ceiling(max_connections)
            .saturating_add(crate::handshakes::REFUSAL_ANSWERS)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            tenant_max_subscriptions: 10_000,
            tenant_subscription_bytes: 32 << 20,
            max_total_subscriptions: 500_000,
            total_subscription_bytes: 1 << 30,
            subscription_reserve_percent: 10,
            subscription_reserve_tenants: 100,
            large_frame_budget: 256 << 20,
            quic_send_window_total: 512 << 20,
            quic_receive_window_total: 256 << 20,
            max_connections: 10_000,
            max_subscriptions: 1_000,
            max_filter_depth: MAX_LEVELS,
            publish_rate: 10_000,
            publish_burst: 20_000,
            max_connections_per_addr: 256,
            max_connections_per_network: 1_250,
            network_ipv4_prefix: 24,
            network_ipv6_prefix: 48,
            sub_rate: 200,
            sub_burst: 10_000,
            replay_cost: 10,
            ack_rate: 20_000,
            ack_burst: 40_000,
            addr_publish_rate: 50_000,
            addr_publish_burst: 100_000,
            addr_ipv6_prefix: 64,
            addr_connect_rate: 50,
            addr_connect_burst: 256,
            addr_churn_ban_secs: 60,
            addr_sub_rate: 2_000,
            addr_sub_burst: 20_000,
            addr_ack_rate: 100_000,
            addr_ack_burst: 200_000,
            account_publish_rate: 50_000,
            account_publish_burst: 100_000,
            account_sub_rate: 2_000,
            account_sub_burst: 20_000,
            account_ack_rate: 100_000,
            account_ack_burst: 200_000,
            addr_store_rate: 0,
            addr_store_burst: 16 << 20,
            account_store_rate: 0,
            account_store_burst: 16 << 20,
        }
    }
}

/// The bounded outbound queue every connection has.
///
/// Only Msg frames count; control frames (replies) are never dropped: once half of
/// `capacity` of them are queued and not taken by its writer the relay stops reading the
/// connection until the writer takes them (the client is slowed, not disconnected;
/// whispeer_relay_outbound_reply_pauses_total). A PubAck the store still owes counts only
/// once queued (a store stall leaves the connection read: its Pings answered); owed PubAcks
/// are bounded by the store's queue (`store.queue`), not by `capacity`. A connection so
/// paused whose writer writes no bytes for `idle_ms` (progress counts per slice of at most
/// 64 KiB, not per batch), or one with more than `capacity` unread replies (owed PubAcks
/// aside), is closed with fatal Err(slow_consumer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Messages a connection may have queued before the slow-consumer policy applies.
    #[arg(long = "queue-capacity", env = "WHISPEER_QUEUE_CAPACITY")]
    pub capacity: usize,
    /// "drop": drop the oldest queued QoS 0 message (the new one when only QoS >= 1 ones
    /// are queued) and send a Gap frame with the count; queued QoS 0 messages give way to
    /// QoS >= 1 ones, and QoS >= 1 subscriptions pause at a queue full of QoS >= 1
    /// messages (theirs wait in the store and follow in order);
    /// "disconnect": send fatal Err(slow_consumer) and close (whatever the message's QoS).
    #[arg(long, env = "WHISPEER_SLOW_CONSUMER")]
    pub slow_consumer: SlowConsumerPolicy,
    /// Bytes of messages a connection may have queued before the slow-consumer policy
    /// applies (whichever of capacity and max_bytes is reached first).
    #[arg(
        id = "queue.max_bytes",
        long = "queue-max-bytes",
        env = "WHISPEER_QUEUE_MAX_BYTES"
    )]
    pub max_bytes: usize,
    /// Bytes of messages queued (or being written) for all connections together; 0 =
    /// unlimited. Beyond it, a connection holding more than its fair share (this budget /
    /// connections with messages queued) — the slowest consumers — gets no more QoS 0
    /// messages: each one is counted (whispeer_relay_outbound_budget_dropped_total) and
    /// reported to it in a Gap. Its QoS >= 1 subscriptions pause instead, as without
    /// credit: their messages wait in the store and follow in order once it reads
    /// (whispeer_relay_outbound_budget_pauses_total).
    #[arg(
        id = "queue.total_max_bytes",
        long = "queue-total-max-bytes",
        env = "WHISPEER_QUEUE_TOTAL_MAX_BYTES"
    )]
    pub total_max_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 4096,
            slow_consumer: SlowConsumerPolicy::Drop,
            max_bytes: 8 << 20,
            total_max_bytes: 512 << 20,
        }
    }
}

/// Timeouts, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time a new connection has to complete its transport handshake and send Hello (and,
    /// when the relay challenges it, its Auth): counted once, from the handshake's start.
    #[arg(long, env = "WHISPEER_HELLO_MS")]
    pub hello_ms: u64,
    /// Heartbeat interval announced in Welcome, also the WebSocket ping interval; 0 = none.
    /// Must be below idle_ms.
    #[arg(long, env = "WHISPEER_HEARTBEAT_MS")]
    pub heartbeat_ms: u64,
    /// A connection with no inbound traffic for this long gets fatal Err(idle_timeout).
    #[arg(long, env = "WHISPEER_IDLE_MS")]
    pub idle_ms: u64,
    /// On shutdown or a fatal error, how long queued frames may take to drain.
    #[arg(long, env = "WHISPEER_DRAIN_MS")]
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

/// Logging (applied by the binary; the library only emits `tracing` events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// RUST_LOG-style filter, e.g. "info" or "whispeer_relay=debug" (RUST_LOG is used when
    /// neither the flag nor WHISPEER_LOG is set).
    #[arg(long = "log", env = "WHISPEER_LOG")]
    pub filter: String,
    /// "text" or "json" (one object per line).
    #[arg(long = "log-format", env = "WHISPEER_LOG_FORMAT")]
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

/// Runtime threads: the binary's main runtime (the library runs on its caller's) and the
/// relay's light runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads that run connections (0 = one per core; tokio's TOKIO_WORKER_THREADS
    /// applies then). Fewer than the cores keeps a connection's reads and its subscribers'
    /// writes on fewer cores: on a 2-core machine shared with other busy processes, 1 cut
    /// the relay's CPU per fan-out delivery from 0.76–1.65 µs to a steady ~0.9 µs
    /// (relay README, "Workers"). Store, reader and checkpoint threads are not counted.
    #[arg(long = "workers", env = "WHISPEER_WORKERS", value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub workers: u16,
    /// Threads of the relay's light runtime, where TCP, TLS and WebSocket connections
    /// from addresses with few connections start (while it is under light_busy_percent busy), and run
    /// while they stay light; one that floods (8 full turns read without waiting), falls
    /// behind as a subscriber or hits a rate limit moves to the main runtime, so quiet
    /// clients do not wait behind floods (relay README, "The light runtime"). 0 = off:
    /// every connection on the main runtime.
    #[arg(long = "light-workers", env = "WHISPEER_LIGHT_WORKERS", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub light_workers: u16,
    /// The busy share (percent of the light threads' time over each 100 ms) at which the
    /// light runtime counts as full: new connections then start on the main runtime, so
    /// many steady light clients cannot make the light threads the relay's limit while the
    /// main workers idle. 0 = never full (every eligible connection starts light).
    #[arg(long = "light-busy-percent", env = "WHISPEER_LIGHT_BUSY_PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub light_busy_percent: u8,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            light_workers: 1,
            light_busy_percent: 75,
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
                quic: ListenAddr::OFF,
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
    /// What the store reserve's settings cannot keep of their promise (logged at start):
    /// a total too small to have a reserve, a reserve smaller than `reserve_tenants`
    /// (shares round up to 1, so fewer tenants are sure of theirs), a byte share too small
    /// for a retained publish of the largest frame (it counts twice). Empty when sound.
    ///
    /// Likewise for the subscription reserve (`limits.subscription_reserve_percent`): a
    /// total too small for one, a count reserve smaller than
    /// `limits.subscription_reserve_tenants`, a byte share below one 1-level filter
    /// (raised to one by the quota, so fewer tenants are sure of theirs; before, no tenant
    /// could ever use the reserve).
    pub fn reserve_warnings(&self) -> Vec<String> {
        let mut out = self.store_reserve_warnings();
        out.extend(self.subscription_reserve_warnings());
        out
    }

    /// What an acknowledgement survives, where it is less than the operator may assume.
    /// With the JetStream store a `PubAck` follows JetStream's publish ack; with one replica
    /// that is one nats-server holding the message in its page cache — nats-server fsyncs
    /// every 2 minutes by default (`jetstream { sync_interval }`), so a power loss or kernel
    /// crash of that host can lose what was acknowledged. The relay cannot read the
    /// server's `sync_interval`, so one replica is always warned about.
    pub fn durability_warnings(&self) -> Vec<String> {
        let c = &self.cluster;
        let mut out = Vec::new();
        if !c.urls.is_empty() && c.store == ClusterStore::Jetstream && c.replicas == 1 {
            out.push(
                "cluster.store = \"jetstream\" with cluster.replicas = 1: a PubAck then means \
                 one nats-server has the message, which by default it fsyncs only every 2 \
                 minutes; acknowledged messages survive a power loss of that host only with \
                 `sync_interval: always` in its jetstream block, or with replicas = 3 on a \
                 three-node NATS cluster (docs/DEPLOY.md §2.4)"
                    .to_owned(),
            );
        }
        out
    }

    fn subscription_reserve_warnings(&self) -> Vec<String> {
        let l = &self.limits;
        let pct = l.subscription_reserve_percent as u128;
        let tenants = l.subscription_reserve_tenants.max(1) as u128;
        let mut out = Vec::new();
        if pct == 0 {
            return out;
        }
        let one = crate::sub_quota::cost(1) as u128;
        for (name, total, least) in [
            ("max_total_subscriptions", l.max_total_subscriptions, 1),
            ("total_subscription_bytes", l.total_subscription_bytes, one),
        ] {
            let (total, what) = (
                total as u128,
                if least == 1 { "subscriptions" } else { "bytes" },
            );
            if total == 0 {
                continue;
            }
            let reserve = total * pct / 100;
            if reserve < least {
                out.push(format!(
                    "limits.{name} ({total}) is too small for a subscription reserve of \
                     {pct} % (limits.subscription_reserve_percent): it is first-come"
                ));
            } else if reserve / tenants < least {
                out.push(format!(
                    "a tenant's share of the limits.{name} reserve ({} {what}: {reserve} / \
                     limits.subscription_reserve_tenants {tenants}) is below one 1-level \
                     subscription ({least} {what}): each share is raised to it, so only {} \
                     tenants are sure of theirs",
                    reserve / tenants,
                    reserve / least
                ));
            }
        }
        out
    }

    fn store_reserve_warnings(&self) -> Vec<String> {
        let c = &self.store;
        if c.reserve_percent == 0 {
            return Vec::new();
        }
        let names = [
            "total_max_bytes",
            "total_max_messages",
            "total_max_retained",
            "total_max_durables",
            "total_max_paths",
        ];
        let l = crate::store::quota::Limits::of(c);
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (total, reserve) = (l.total[i], l.total[i] - l.common[i]);
            if total == 0 {
                continue;
            }
            if reserve == 0 {
                out.push(format!(
                    "store.{name} ({total}) is too small for a reserve of {} %: it is first-come",
                    c.reserve_percent
                ));
            } else if reserve < c.reserve_tenants {
                out.push(format!(
                    "the reserve of store.{name} ({reserve}) is smaller than \
                     store.reserve_tenants ({}): each share rounds up to 1, so only {reserve} \
                     tenants are sure of theirs",
                    c.reserve_tenants
                ));
            }
        }
        let frame = self.limits.max_frame as u64;
        if l.share[0] > 0 && l.share[0] < 2 * frame {
            out.push(format!(
                "a tenant's share of the store.total_max_bytes reserve ({} bytes) is below \
                 twice limits.max_frame ({frame}): a retained publish of the largest envelope \
                 counts twice and cannot use the reserve",
                l.share[0]
            ));
        }
        out
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let l = &self.limits;
        if l.max_frame < 64 || l.max_frame > MAX_FRAME_CEILING {
            return invalid(
                "limits.max_frame",
                format!("{} is outside 64..={MAX_FRAME_CEILING}", l.max_frame),
            );
        }
        if l.large_frame_budget != 0 && l.large_frame_budget < l.max_frame {
            return invalid(
                "limits.large_frame_budget",
                format!(
                    "{} is below max_frame ({}): a largest frame could never be received \
                     (0 = unlimited)",
                    l.large_frame_budget, l.max_frame
                ),
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
        if self.store.reserve_percent > 90 {
            return invalid(
                "store.reserve_percent",
                format!("must be 0..=90, got {}", self.store.reserve_percent),
            );
        }
        if self.store.reserve_tenants == 0 {
            return invalid("store.reserve_tenants", "must be at least 1".into());
        }
        if l.subscription_reserve_percent > 90 {
            return invalid(
                "limits.subscription_reserve_percent",
                format!("must be 0..=90, got {}", l.subscription_reserve_percent),
            );
        }
        if l.subscription_reserve_tenants == 0 {
            return invalid(
                "limits.subscription_reserve_tenants",
                "must be at least 1".into(),
            );
        }
        if self.queue.capacity == 0 || self.queue.max_bytes == 0 {
            return invalid("queue", "capacity and max_bytes must be at least 1".into());
        }
        if !(32..=128).contains(&l.addr_ipv6_prefix) {
            return invalid(
                "limits.addr_ipv6_prefix",
                format!("must be 32..=128, got {}", l.addr_ipv6_prefix),
            );
        }
        if l.max_connections_per_addr == 0 {
            return invalid(
                "limits.max_connections_per_addr",
                "must be at least 1".into(),
            );
        }
        if !(8..=32).contains(&l.network_ipv4_prefix) {
            return invalid(
                "limits.network_ipv4_prefix",
                format!("must be 8..=32, got {}", l.network_ipv4_prefix),
            );
        }
        if !(16..=128).contains(&l.network_ipv6_prefix) {
            return invalid(
                "limits.network_ipv6_prefix",
                format!("must be 16..=128, got {}", l.network_ipv6_prefix),
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
            (
                "limits.addr_connect_burst",
                l.addr_connect_rate,
                l.addr_connect_burst,
            ),
            ("limits.addr_sub_burst", l.addr_sub_rate, l.addr_sub_burst),
            ("limits.addr_ack_burst", l.addr_ack_rate, l.addr_ack_burst),
            (
                "limits.account_publish_burst",
                l.account_publish_rate,
                l.account_publish_burst,
            ),
            (
                "limits.account_sub_burst",
                l.account_sub_rate,
                l.account_sub_burst,
            ),
            (
                "limits.account_ack_burst",
                l.account_ack_rate,
                l.account_ack_burst,
            ),
            (
                "limits.addr_store_burst",
                l.addr_store_rate,
                l.addr_store_burst,
            ),
            (
                "limits.account_store_burst",
                l.account_store_rate,
                l.account_store_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return invalid(field, "must be at least 1 when its rate is set".into());
            }
        }
        if self.delivery.max_unacked_bytes == 0 {
            return invalid("delivery.max_unacked_bytes", "must be positive".into());
        }
        if self.delivery.connection_unacked_bytes == 0 {
            return invalid(
                "delivery.connection_unacked_bytes",
                "must be positive".into(),
            );
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
        if st.durable_marker_keep_ms == 0 {
            return invalid(
                "store.durable_marker_keep_ms",
                "must be at least 1: a deletion marker purged at once could be missed by \
                 another relay's read of the durable stream"
                    .into(),
            );
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
        let c = &self.cluster;
        if c.enabled() {
            if c.urls.iter().any(|u| u.trim().is_empty()) {
                return invalid("cluster.urls", "an empty NATS URL".into());
            }
            let p = &c.subject_prefix;
            if p.is_empty()
                || p.split('.').any(|t| t.is_empty())
                || p.contains(|ch: char| ch.is_whitespace() || ch == '*' || ch == '>')
            {
                return invalid(
                    "cluster.subject_prefix",
                    format!("{p:?} is not a NATS subject without wildcards"),
                );
            }
            if c.user.is_some() != c.password.is_some() {
                return invalid("cluster.user", "user and password go together".into());
            }
            if c.tls_cert.is_some() != c.tls_key.is_some() {
                return invalid(
                    "cluster.tls_cert",
                    "tls_cert and tls_key go together".into(),
                );
            }
            if c.queue == 0 {
                return invalid("cluster.queue", "must be at least 1".into());
            }
            if c.subscription_capacity == 0 {
                return invalid("cluster.subscription_capacity", "must be at least 1".into());
            }
            if c.store == ClusterStore::Jetstream {
                if c.stream.is_empty()
                    || !c
                        .stream
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
                {
                    return invalid(
                        "cluster.stream",
                        format!(
                            "{:?} is not a JetStream stream name ([A-Za-z0-9_-]+)",
                            c.stream
                        ),
                    );
                }
                if !(1..=5).contains(&c.replicas) {
                    return invalid("cluster.replicas", "must be 1 to 5".into());
                }
                if !(300..=600_000).contains(&c.durable_lease_ms) {
                    return invalid("cluster.durable_lease_ms", "must be 300 to 600000".into());
                }
            }
        }
        if c.shared_accounts && !self.cluster.jetstream() {
            return invalid(
                "cluster.shared_accounts",
                "needs the cluster's JetStream store (cluster.urls and cluster.store = \"jetstream\")"
                    .into(),
            );
        }
        let a = &self.auth;
        if a.mode == AuthMode::Required
            && !c.shared_accounts
            && a.accounts.as_ref().is_none_or(|p| p.as_os_str().is_empty())
        {
            return invalid(
                "auth.accounts",
                "auth = required needs an account file (whispeer-relay account add creates one)"
                    .into(),
            );
        }
        if a.reload_ms == 0 || a.max_claims_per_group == 0 || a.max_claims_per_account == 0 {
            return invalid(
                "auth",
                "reload_ms, max_claims_per_group and max_claims_per_account must be positive"
                    .into(),
            );
        }
        if let Some(t) = &a.admin_token {
            // Compared trimmed (admin.rs): its length too.
            if t.trim().len() < 16 {
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
        if let Err(e) = a.relay_names() {
            return invalid("auth.names", e);
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
}

/// The settings given as flags or `WHISPEER_*` environment variables, for every section of
/// [`Config`] (flatten it into a clap command; [`Config::for_serve`] applies it over the
/// file). Only what was given is applied, so precedence is defaults < file < env < flags.
/// Its `Debug` names the settings given, not their values (secrets among them).
#[derive(Clone, Default)]
pub struct Overrides(ArgMatches);

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Overrides")
            .field(&self.0.ids().map(|i| i.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

/// The settings that hold secrets, by flag: [`Overrides::secrets_on_command_line`].
const SECRET_FLAGS: [&str; 3] = ["--admin-token", "--cluster-password", "--cluster-token"];

impl Overrides {
    /// Updates `config` with every setting given as a flag or environment variable.
    pub fn apply(&self, config: &mut Config) -> Result<(), ConfigError> {
        for s in SECTIONS {
            (s.update)(config, &self.0).map_err(|e| ConfigError::Args(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether the setting with this clap id (its TOML key, or `section.key`) was given.
    pub fn given(&self, id: &str) -> bool {
        self.0.contains_id(id)
    }

    /// One warning per secret setting (`--admin-token`, `--cluster-password`,
    /// `--cluster-token`) given on the command line rather than in its environment variable
    /// or the configuration file: other users of the host see a process's arguments (`ps`,
    /// `/proc/PID/cmdline`) and shells keep them in their history. The binary logs them at
    /// start, as the client does for `--auth-token`. They name the flag and where to put
    /// the secret instead, never its value.
    pub fn secrets_on_command_line(&self) -> Vec<String> {
        settings()
            .into_iter()
            .filter(|s| SECRET_FLAGS.contains(&s.flag.as_str()))
            .filter(|s| {
                self.0.try_contains_id(&s.id).unwrap_or(false)
                    && self.0.value_source(&s.id) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|s| {
                format!(
                    "{} puts a secret on the command line, where other users can see it \
                     (ps, /proc/PID/cmdline, shell history); prefer {} or `{}` in [{}] of \
                     the configuration file (mode 0600)",
                    s.flag, s.env, s.key, s.section
                )
            })
            .collect()
    }
}

impl Args for Overrides {
    fn augment_args(cmd: Command) -> Command {
        // The sections' doc comments would become the command's about: keep the caller's.
        let about = cmd.get_about().cloned();
        let long_about = cmd.get_long_about().cloned();
        let defaults: HashMap<String, String> = settings()
            .into_iter()
            .filter_map(|s| Some((s.id, s.default?)))
            .collect();
        let mut cmd = cmd;
        for s in SECTIONS {
            cmd = (s.augment)(cmd.next_help_heading(s.heading));
        }
        cmd = cmd.mut_args(|a| match defaults.get(a.get_id().as_str()) {
            Some(d) if a.get_help().is_some() => {
                let help = format!(
                    "{} [default: {d}]",
                    a.get_help().map(|h| h.to_string()).unwrap_or_default()
                );
                a.help(help)
            }
            _ => a,
        });
        cmd = match about {
            Some(a) => cmd.about(a),
            None => cmd.about(None::<&'static str>),
        };
        match long_about {
            Some(a) => cmd.long_about(a),
            None => cmd.long_about(None::<&'static str>),
        }
        .next_help_heading(None::<&'static str>)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for Overrides {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self(m.clone()))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = m.clone();
        Ok(())
    }
}

/// One setting as the operator sees it (for `generate-config` and the README table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The TOML table.
    pub section: &'static str,
    /// The TOML key.
    pub key: String,
    /// The clap id (the key, or `section.key`).
    pub id: String,
    /// `--flag`.
    pub flag: String,
    /// `WHISPEER_*`.
    pub env: String,
    /// The `serve` default as TOML, `None` when unset.
    pub default: Option<String>,
    /// The doc comment.
    pub help: String,
    /// An example for an unset value.
    pub example: String,
}

/// Every setting in file order, with its default as `whispeer-relay serve` has it.
pub fn settings() -> Vec<Setting> {
    let values = toml::Value::try_from(Config::serve_default()).unwrap_or_else(|_| {
        // Unreachable: every section serializes (a test parses the result back).
        toml::Value::Table(Default::default())
    });
    let mut out = Vec::new();
    for s in SECTIONS {
        let cmd = s.command();
        let table = values.get(s.name);
        for arg in cmd.get_arguments() {
            let key = toml_key(arg).to_string();
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            out.push(Setting {
                section: s.name,
                default: table.and_then(|t| t.get(&key)).map(|v| v.to_string()),
                id: arg.get_id().to_string(),
                key,
                flag: arg.get_long().map(|l| format!("--{l}")).unwrap_or_default(),
                env: arg
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                help: sentence(&help),
                example: arg
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// Ends a help text with a full stop (clap drops the one of a one-sentence help).
fn sentence(s: &str) -> String {
    let s = s.trim();
    if s.ends_with(['.', ':']) || s.is_empty() {
        s.to_string()
    } else {
        format!("{s}.")
    }
}

/// Appends `text` as `# ` comment lines of at most ~90 columns.
fn push_comment(out: &mut String, text: &str) {
    for para in text.split("\n\n") {
        let mut line = String::from("#");
        for word in para.split_whitespace() {
            if line.len() + 1 + word.len() > 90 && line.len() > 1 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
}

impl Config {
    /// The configuration of `whispeer-relay serve`: the defaults, then the TOML file, then
    /// the environment variables and flags in `args`; then the `serve` rules (a SQLite store
    /// unless told otherwise, `RUST_LOG` when no log filter was given, the claims file
    /// beside the store) and validation.
    pub fn for_serve(file: Option<&Path>, args: &Overrides) -> Result<Self, ConfigError> {
        let mut c = match file {
            Some(path) => Config::from_file(path)?,
            None => Config::serve_default(),
        };
        // `serve` keeps messages in a durable SQLite file unless told otherwise.
        c.store.kind.get_or_insert(StoreKind::Sqlite);
        args.apply(&mut c)?;
        if !args.given("filter") {
            if let Some(f) = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()) {
                c.log.filter = f;
            }
        }
        // Claims and durable owners live beside a durable store unless placed elsewhere.
        if c.auth.state.is_none() && c.store.kind == Some(StoreKind::Sqlite) {
            let mut p = c.store.path.as_os_str().to_owned();
            p.push(".auth");
            c.auth.state = Some(PathBuf::from(p));
        }
        c.validate()?;
        Ok(c)
    }

    /// The commented TOML printed by `generate-config`: every setting with its default, its
    /// doc comment, flag and environment variable.
    pub fn commented_toml() -> String {
        let mut out = String::from(
            "# whispeer-relay configuration. Every setting is shown with its default.\n\
             # Precedence: built-in defaults < this file < WHISPEER_* environment variables < flags.\n",
        );
        let all = settings();
        for s in SECTIONS {
            out.push_str(&format!("\n[{}]\n", s.name));
            let cmd = s.command();
            if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
                push_comment(&mut out, &sentence(&about.to_string()));
            }
            for st in all.iter().filter(|st| st.section == s.name) {
                out.push('\n');
                push_comment(&mut out, &st.help);
                out.push_str(&format!("# flag {}, env {}\n", st.flag, st.env));
                match &st.default {
                    Some(v) => out.push_str(&format!("{} = {v}\n", st.key)),
                    None => out.push_str(&format!("# {} = \"{}\"\n", st.key, st.example)),
                }
            }
        }
        out
    }

    /// The settings as a Markdown table (the one in relay/README.md; a test compares them).
    pub fn settings_markdown() -> String {
        let cell = |s: &str| {
            s.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace('|', "\\|")
        };
        let mut out = String::from(
            "| setting | flag / env | default | meaning |\n| --- | --- | --- | --- |\n",
        );
        let all = settings();
        for s in SECTIONS {
            let cmd = s.command();
            if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
                let about = sentence(&about.to_string());
                out.push_str(&format!("| **`[{}]`** | | | {} |\n", s.name, cell(&about)));
            }
            for st in all.iter().filter(|st| st.section == s.name) {
                let default = st.default.as_deref().unwrap_or("unset");
                out.push_str(&format!(
                    "| `[{}] {}` | `{}` `{}` | `{}` | {} |\n",
                    st.section,
                    st.key,
                    st.flag,
                    st.env,
                    default,
                    cell(&st.help)
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Debug` of the configuration (printed by `BrokerOptions`' `Debug`, and by anyone's
    /// `{:?}` of a `Config`) shows whether a secret is set and its length, never its value:
    /// the admin token, the NATS password and token, and a NATS URL's user information.
    /// Serialization is unchanged (`--print-config` redacts on its own; a written file
    /// keeps them).
    #[test]
    fn debug_redacts_the_secrets() {
        let mut c = Config::default();
        c.auth.admin_token = Some("admin-secret-0123456789".into());
        c.cluster.password = Some("nats-password-xyz".into());
        c.cluster.token = Some("nats-token-xyz".into());
        c.cluster.user = Some("relay".into());
        c.cluster.urls = vec![
            "nats://relay:url-pass-xyz@h1:4222".into(),
            "tls://h2:4222/x@y".into(),
        ];
        for shown in [format!("{c:?}"), format!("{c:#?}")] {
            for secret in [
                "admin-secret",
                "nats-password",
                "nats-token",
                "url-pass",
                "relay:",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("<redacted, 23 characters>"), "{shown}");
            assert!(shown.contains("nats://<redacted>@h1:4222"), "{shown}");
            assert!(shown.contains("tls://h2:4222/x@y"), "{shown}");
            assert!(shown.contains("max_claims_per_group"), "{shown}");
        }
        let mut none = Config::default();
        none.auth.admin_token = None;
        assert!(format!("{none:?}").contains("admin_token: None"));
        let toml = toml::to_string(&c).unwrap();
        assert!(toml.contains("admin-secret-0123456789"), "{toml}");
        assert_eq!(Config::from_toml(&toml).unwrap(), c);
    }

    /// A secret setting given as a flag is named in a warning (the binary logs them at
    /// start), with the environment variable to use instead and not the value; one from
    /// the environment or the file is not; `Debug` of the overrides shows no value.
    #[test]
    fn secrets_given_as_flags_are_warned_about() {
        let o = parse(&[
            "--admin-token",
            "admin-secret-0123456789",
            "--cluster-token",
            "nats-token-xyz",
            "--max-frame",
            "2048",
        ])
        .unwrap();
        let w = o.secrets_on_command_line();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("--admin-token") && w[0].contains("WHISPEER_ADMIN_TOKEN"),
            "{w:?}"
        );
        assert!(
            w[1].contains("--cluster-token") && w[1].contains("WHISPEER_CLUSTER_TOKEN"),
            "{w:?}"
        );
        let all = format!("{w:?} {o:?}");
        assert!(
            !all.contains("admin-secret") && !all.contains("nats-token-xyz"),
            "{all}"
        );
        assert!(parse(&["--max-frame", "2048"])
            .unwrap()
            .secrets_on_command_line()
            .is_empty());
        assert!(Overrides::default().secrets_on_command_line().is_empty());
    }

    #[test]
    fn generated_config_parses_back_to_the_defaults() {
        let text = Config::commented_toml();
        let parsed = Config::from_toml(&text).unwrap();
        assert_eq!(parsed, Config::serve_default());
        Config::default().validate().unwrap();
    }

    /// The serve command's settings, parsed from `args` as clap would.
    fn parse(args: &[&str]) -> Result<Overrides, clap::Error> {
        let cmd = Overrides::augment_args(Command::new("serve").no_binary_name(true));
        let m = cmd.try_get_matches_from(args)?;
        Overrides::from_arg_matches(&m)
    }

    #[test]
    fn the_command_is_well_formed_and_covers_every_key() {
        Overrides::augment_args(Command::new("serve")).debug_assert();
        // Every key the TOML file has is a setting with a flag and an env var, and back.
        let values = toml::Value::try_from(Config::serve_default()).unwrap();
        let all = settings();
        for (section, table) in values.as_table().unwrap() {
            for key in table.as_table().unwrap().keys() {
                assert!(
                    all.iter().any(|s| s.section == section && &s.key == key),
                    "[{section}] {key} has no flag"
                );
            }
        }
        let fields = [
            "listen", "tls", "limits", "queue", "timeouts", "log", "runtime", "store", "delivery",
            "auth", "cluster",
        ];
        assert_eq!(SECTIONS.iter().map(|s| s.name).collect::<Vec<_>>(), fields);
        for s in &all {
            assert!(
                s.flag.starts_with("--") && s.env.starts_with("WHISPEER_"),
                "{s:?}"
            );
            assert!(!s.help.is_empty(), "{s:?} has no doc comment");
            // Every key parses back from the generated TOML line (also the unset ones).
            let line = format!(
                "[{}]\n{} = {}\n",
                s.section,
                s.key,
                s.default
                    .clone()
                    .unwrap_or_else(|| format!("{:?}", s.example))
            );
            Config::from_toml(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn flags_override_the_file_and_only_given_flags_do() {
        let dir = std::env::temp_dir().join(format!("wsp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            "[limits]\npublish_rate = 5\nsub_rate = 6\n[store]\nstore_qos0 = true\n\
             tenant_max_bytes = 77\n",
        )
        .unwrap();
        // Quota settings, once TOML-only, are flags now; a bool takes a value.
        let o = parse(&[
            "--sub-rate",
            "9",
            "--tenant-max-paths",
            "3",
            "--store-path",
            "db",
        ])
        .unwrap();
        let c = Config::for_serve(Some(&file), &o).unwrap();
        assert_eq!(c.limits.publish_rate, 5, "from the file");
        assert_eq!(c.limits.sub_rate, 9, "the flag wins over the file");
        assert!(
            c.store.store_qos0,
            "a bool not given keeps the file's value"
        );
        assert_eq!(c.store.tenant_max_bytes, 77);
        assert_eq!(c.store.tenant_max_paths, 3);
        assert_eq!(
            c.store.kind,
            Some(StoreKind::Sqlite),
            "serve's default store"
        );
        assert_eq!(c.auth.state.as_deref(), Some(Path::new("db.auth")));
        let o = parse(&["--store-qos0", "false"]).unwrap();
        assert!(!Config::for_serve(Some(&file), &o).unwrap().store.store_qos0);
        // Bad values are typed errors: clap's at parse time, ConfigError::Invalid after.
        assert!(parse(&["--max-frame", "lots"]).is_err());
        let o = parse(&["--max-filter-depth", "40"]).unwrap();
        assert!(matches!(
            Config::for_serve(None, &o),
            Err(ConfigError::Invalid {
                field: "limits.max_filter_depth",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_readme_table_is_the_generated_one() {
        let readme = include_str!("../README.md");
        let begin = "<!-- settings:begin -->\n";
        let end = "<!-- settings:end -->";
        let a = readme.find(begin).expect("README has the settings markers") + begin.len();
        let b = readme[a..].find(end).expect("settings end marker") + a;
        assert!(
            readme[a..b] == Config::settings_markdown(),
            "relay/README.md's settings table differs from the code: replace it with \
             `whispeer-relay generate-config --markdown`"
        );
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
    fn the_reserve_settings_warn_where_they_cannot_keep_their_promise() {
        assert_eq!(Config::default().reserve_warnings(), Vec::<String>::new());
        let mut c = Config::default();
        c.store.total_max_durables = 500; // reserve 50 < 100 tenants
        c.store.total_max_retained = 9; // reserve 0
        c.store.total_max_bytes = 1 << 30; // share 1 MiB < 2 × max_frame
        let w = c.reserve_warnings();
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].contains("total_max_retained (9) is too small"),
            "{}",
            w[0]
        );
        assert!(w[1].contains("only 50 tenants"), "{}", w[1]);
        assert!(w[2].contains("twice limits.max_frame"), "{}", w[2]);
        c.store.reserve_percent = 0;
        assert!(c.reserve_warnings().is_empty());
    }

    /// Review finding (Low-Medium): with the JetStream store and one replica a `PubAck` does
    /// not survive a power loss under nats-server's default fsync interval; the relay says so
    /// at start (the SQLite store's default `sync = full` needs no warning).
    #[test]
    fn one_jetstream_replica_is_warned_about() {
        assert!(Config::default().durability_warnings().is_empty());
        let mut c = Config::from_toml(
            "[cluster]\nurls = [\"nats://127.0.0.1:4222\"]\nstore = \"jetstream\"\n",
        )
        .unwrap();
        let w = c.durability_warnings();
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(w[0].contains("sync_interval: always"), "{}", w[0]);
        c.cluster.replicas = 3;
        assert!(c.durability_warnings().is_empty());
        c.cluster.replicas = 1;
        c.cluster.store = ClusterStore::Local;
        assert!(c.durability_warnings().is_empty());
    }

    /// Review finding (Low): a subscription reserve whose byte share is below one 1-level
    /// filter could never be used, silently; now warned (the quota raises the share).
    #[test]
    fn the_subscription_reserve_settings_warn_where_a_share_is_unusable() {
        let mut c = Config::default();
        c.store.reserve_percent = 0;
        assert!(c.reserve_warnings().is_empty(), "the defaults are sound");
        // 1 MiB total: a reserve of 104,857 bytes among 100 tenants, 1,048 bytes each.
        c.limits.total_subscription_bytes = 1 << 20;
        let w = c.reserve_warnings();
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].contains("limits.total_subscription_bytes reserve (1048 bytes")
                && w[0].contains("limits.subscription_reserve_tenants 100")
                && w[0].contains("only 99 tenants"),
            "{}",
            w[0]
        );
        // Too small for a reserve at all; a count reserve below the tenants.
        c.limits.total_subscription_bytes = 10_000;
        c.limits.max_total_subscriptions = 500;
        let w = c.reserve_warnings();
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w[0].contains("only 50 tenants"), "{}", w[0]);
        assert!(w[1].contains("(10000) is too small"), "{}", w[1]);
        c.limits.subscription_reserve_percent = 0;
        assert!(c.reserve_warnings().is_empty());
    }

    #[test]
    fn validation_rules() {
        let mut c = Config::default();
        c.store.reserve_percent = 91;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.subscription_reserve_percent = 91;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.subscription_reserve_tenants = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.store.reserve_tenants = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.max_filter_depth = 33;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.listen.wss = "127.0.0.1:0".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.timeouts.heartbeat_ms = c.timeouts.idle_ms;
        assert!(c.validate().is_err());
        for (prefix, ok) in [(31, false), (32, true), (128, true), (129, false)] {
            let mut c = Config::default();
            c.limits.addr_ipv6_prefix = prefix;
            assert_eq!(c.validate().is_ok(), ok, "addr_ipv6_prefix {prefix}");
        }
        for (v4, v6, ok) in [
            (24, 48, true),
            (8, 16, true),
            (32, 128, true),
            (7, 48, false),
            (33, 48, false),
            (24, 15, false),
            (24, 129, false),
        ] {
            let mut c = Config::default();
            c.limits.network_ipv4_prefix = v4;
            c.limits.network_ipv6_prefix = v6;
            assert_eq!(c.validate().is_ok(), ok, "network prefixes /{v4} /{v6}");
        }
        // A deletion marker is kept at least 1 ms (0 would purge it before other relays
        // may have read it).
        for (keep, ok) in [(0, false), (1, true), (86_400_000, true)] {
            let mut c = Config::default();
            c.store.durable_marker_keep_ms = keep;
            assert_eq!(c.validate().is_ok(), ok, "durable_marker_keep_ms {keep}");
        }
        // A frame budget must hold the largest frame (or be 0 = unlimited).
        let max = Limits::default().max_frame;
        for (budget, ok) in [(0, true), (max - 1, false), (max, true)] {
            let mut c = Config::default();
            c.limits.large_frame_budget = budget;
            assert_eq!(c.validate().is_ok(), ok, "large_frame_budget {budget}");
        }
    }
}
