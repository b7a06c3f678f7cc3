//! `pub` and `sub`: JSON values in, one JSON line per message out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// Most bytes of one stdin line `pub` reads (a JSON value: the relay takes frames of 1 MiB
/// by default, so this is far beyond any publishable one).
const MAX_STDIN_LINE: u64 = 64 << 20;
use whispeer::cbor_scan;
use whispeer::protocol::{Provenance, Qos};
use whispeer::{
    Client, Identity, Keyring, Message, PublishOptions, Replay, SubscribeError, SubscribeOptions,
    TlsRoot, Topic, TopicFilter,
};

use crate::io::{self, DictArgs, IdentityArgs, KeyArgs};
use crate::usage;

/// How to reach the relay.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Relay URL: ws://, wss://, tcp://, tls:// or quic://HOST:PORT. Several, comma-separated
    /// (`--relay ws://a:7070,tcp://b:7481`), fail over in order: the first that answers is
    /// used; when its connection is lost the client moves to the next at once (round robin,
    /// backing off only after a full round), resubscribing and re-sending unacknowledged
    /// QoS 1/2 messages.
    #[arg(long, env = "WHISPEER_RELAY", value_name = "URL[,URL...]")]
    pub relay: String,
    /// Also trust the certificates in this PEM file (e.g. a relay's self-signed one) for
    /// wss:// and tls://.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Accept exactly the relay certificate with this SHA-256 fingerprint (64 hex digits,
    /// as printed by `whispeer-relay tls generate`) for wss:// and tls://; repeatable.
    #[arg(
        long,
        env = "WHISPEER_TLS_PIN",
        value_name = "SHA256HEX",
        value_delimiter = ','
    )]
    pub tls_pin: Vec<String>,
    /// Seconds the first connection may take.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Relay account key file (from `whispeer-relay account add NAME --key-out FILE`), for
    /// relays with auth = required. Not the identity that signs messages.
    #[arg(
        long,
        env = "WHISPEER_AUTH_KEY",
        value_name = "FILE",
        conflicts_with = "auth_token"
    )]
    pub auth_key: Option<PathBuf>,
    /// Relay account bearer token (from `whispeer-relay account add NAME --token`).
    #[arg(
        long,
        env = "WHISPEER_AUTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<String>,
    /// With --auth-key: sign in only to relays that ask for a sign-in bound to their name
    /// (relays with auth.names); any other relay fails the connection. Without it the key
    /// also signs the legacy form for relays that do not ask, which a relay passing their
    /// challenge on could use to sign in there as this account (PROTOCOL §3.5.6).
    #[arg(long)]
    pub require_bound_auth: bool,
}

impl ConnArgs {
    /// The relay URLs of `--relay`, in order.
    pub fn urls(&self) -> Vec<String> {
        self.relay
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Checks the URLs before any key work, so typos fail fast.
    pub fn check(&self) -> Result<()> {
        let urls = self.urls();
        if urls.is_empty() {
            usage!("--relay needs a URL (ws://, wss://, tcp://, tls:// or quic://)");
        }
        for url in &urls {
            if !url.contains("://") {
                usage!(
                    "relay URL '{url}' needs a scheme: ws://, wss://, tcp://, tls:// or quic://"
                );
            }
            whispeer::Endpoint::parse(url)?;
        }
        Ok(())
    }

    /// The relay account secret of `--auth-key FILE` (the file read once, and refused when
    /// group or others may write it) or `--auth-token`, if any.
    pub fn auth_secret(&self) -> Result<Option<AuthSecret>> {
        if let Some(path) = &self.auth_key {
            let text = zeroize::Zeroizing::new(io::read_secret_file(path)?);
            // Checked here, so an error names the file.
            whispeer::RelayAuth::parse_key(&text)
                .with_context(|| format!("invalid relay account key in {}", path.display()))?;
            return Ok(Some(AuthSecret::Key(text)));
        }
        Ok(self
            .auth_token
            .as_deref()
            .map(|t| AuthSecret::Token(zeroize::Zeroizing::new(t.trim().to_owned()))))
    }

    /// The `--tls-pin` fingerprints.
    pub fn pins(&self) -> Result<Vec<whispeer::TlsPin>> {
        self.tls_pin
            .iter()
            .map(|p| whispeer::TlsPin::sha256_hex(p).map_err(anyhow::Error::from))
            .collect()
    }

    /// Connects with these keys, identity and seal options.
    pub async fn connect(
        &self,
        keyring: Keyring,
        identity: Option<Identity>,
        seal: Option<&SealArgs>,
    ) -> Result<Client> {
        self.connect_owned(keyring, identity, seal, None).await
    }

    /// [`Self::connect`], with the key durable-subscription owner secrets derive from.
    pub async fn connect_owned(
        &self,
        keyring: Keyring,
        identity: Option<Identity>,
        seal: Option<&SealArgs>,
        owner: Option<whispeer::DurableOwner>,
    ) -> Result<Client> {
        self.check()?;
        let mut b = Client::builder()
            .with(whispeer::Relays::new(self.urls())) // any scheme, in failover order
            .with(whispeer::Encryption::with_keyring(keyring))
            .connect_timeout(secs(self.connect_timeout)?)
            .require_bound_auth(self.require_bound_auth);
        if let Some(c) = seal.and_then(|s| s.compress) {
            b = b.with(c);
        }
        if let Some(s) = seal.and_then(|s| s.suite) {
            b = b.with(s);
        }
        if let Some(id) = identity {
            b = b.with(id);
        }
        if let Some(o) = owner {
            b = b.with(o);
        }
        if let Some(auth) = self.auth_secret()? {
            b = b.with(auth.relay_auth()?);
        }
        if let Some(ca) = &self.ca {
            b = b.with(
                TlsRoot::pem_file(ca).with_context(|| format!("cannot read {}", ca.display()))?,
            );
        }
        for pin in self.pins()? {
            b = b.with(pin);
        }
        b.connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.relay))
    }
}

/// A relay account secret as given: an account key file's text, or a bearer token.
#[derive(Clone)]
pub enum AuthSecret {
    /// The text of an account key file (`wsp_acct_sk_…`).
    Key(zeroize::Zeroizing<String>),
    /// A bearer token.
    Token(zeroize::Zeroizing<String>),
}

impl AuthSecret {
    /// The client's relay authentication.
    pub fn relay_auth(&self) -> Result<whispeer::RelayAuth> {
        Ok(match self {
            AuthSecret::Key(text) => whispeer::RelayAuth::parse_key(text)?,
            AuthSecret::Token(t) => whispeer::RelayAuth::token(t.as_str()),
        })
    }
}

/// Most seconds a timeout or duration may be (about 31 years): beyond, `Duration` or a
/// deadline (`Instant` + it) would overflow — a panic, where the user gets a usage error.
const MAX_SECS: f64 = 1e9;

/// A non-negative number of seconds, at most [`MAX_SECS`].
pub fn secs(s: f64) -> Result<Duration> {
    if !s.is_finite() || s < 0.0 {
        usage!("{s} is not a number of seconds");
    }
    if s > MAX_SECS {
        usage!("{s} seconds is too long (at most {MAX_SECS})");
    }
    Ok(Duration::from_secs_f64(s))
}

/// How a publisher seals: compression and AEAD suite (receivers open every codec and suite).
#[derive(Debug, Clone, Copy, Args)]
pub struct SealArgs {
    /// Payload compression: `none`, `zstd` (level 3, the default), `zstd:N` (level N,
    /// 1-22), `lz4` (cheaper in CPU, a worse ratio) or `zstd-dict:ID[:N]` (a dictionary
    /// the keys hold; `--dict FILE` picks it by file instead). A payload that does not
    /// shrink is sent uncompressed.
    #[arg(long, value_name = "none|zstd|lz4", value_parser = parse_compress)]
    pub compress: Option<whispeer::Compression>,
    /// AEAD suite: `xchacha` (XChaCha20-Poly1305, the default) or `aes-gcm` (AES-256-GCM,
    /// faster on CPUs with AES instructions).
    #[arg(long, value_name = "xchacha|aes-gcm", value_parser = parse_suite)]
    pub suite: Option<whispeer::CipherSuite>,
}

fn parse_compress(s: &str) -> Result<whispeer::Compression, String> {
    whispeer::Compression::from_name(s).ok_or_else(|| {
        format!("'{s}': expected none, zstd, zstd:LEVEL (1-22), lz4 or zstd-dict:ID[:LEVEL]")
    })
}

fn parse_suite(s: &str) -> Result<whispeer::CipherSuite, String> {
    whispeer::CipherSuite::from_name(s).ok_or_else(|| format!("'{s}': expected xchacha or aes-gcm"))
}

#[derive(Debug, Args)]
pub struct PubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    seal: SealArgs,
    #[command(flatten)]
    dict: DictArgs,
    /// The topic (no wildcards), e.g. sensor/kitchen/temp.
    topic: String,
    /// A JSON value to publish; without it each line of stdin is one JSON value.
    json: Option<String>,
    /// Publish the JSON argument this many times (default 1), or at most this many lines
    /// of stdin.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Delivery: 0 at most once, 1 at least once, 2 exactly once (1 and 2 wait for the
    /// relay's acknowledgement of each message).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Keep as the topic's retained value on the relay.
    #[arg(long)]
    retain: bool,
    /// Seal with the key of this tree (32 hex digits, as `whispeer key show` prints it):
    /// needed when keys of two trees cover the topic.
    #[arg(long, value_name = "TREE_ID", value_parser = io::parse_tree_id)]
    tree: Option<whispeer::protocol::TreeId>,
    #[command(flatten)]
    keys: KeyArgs,
    /// Sign with this identity (else WHISPEER_IDENTITY; without either, messages are
    /// unsigned and subscribers see "sender": null).
    #[command(flatten)]
    identity: IdentityArgs,
}

fn parse_json(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| anyhow::anyhow!("invalid JSON: {e}"))
}

pub async fn publish(a: PubArgs) -> Result<ExitCode> {
    a.conn.check()?;
    // Everything that can be checked locally is checked before connecting.
    let topic = Topic::new(a.topic.as_str()).with_context(|| format!("topic '{}'", a.topic))?;
    let value = a.json.as_deref().map(parse_json).transpose()?;
    let keys = a.keys.require()?;
    let mut keyring = io::keyring(&keys)?;
    let mut seal = a.seal;
    let dicts = a.dict.load()?;
    // A key file's dictionaries serve its keys' trees; `--dict` ones every tree.
    a.keys.add_dictionaries_to(&mut keyring)?;
    for d in dicts.iter().cloned() {
        keyring.add_dictionary(d);
    }
    // `--dict FILE`: compress with the (first) dictionary, at the --compress zstd level.
    if let Some(d) = dicts.first() {
        let level = match seal.compress.map(|c| c.into_inner()) {
            None => 3,
            Some(whispeer::protocol::Compression::Zstd(l))
            | Some(whispeer::protocol::Compression::ZstdDict { level: l, .. }) => l,
            Some(other) => {
                usage!("--dict compresses with zstd; it cannot be combined with --compress {other}")
            }
        };
        seal.compress = Some(whispeer::Compression::zstd_dict(level, d));
    }
    if let Some(whispeer::protocol::Compression::ZstdDict { dict, .. }) =
        seal.compress.map(|c| c.into_inner())
    {
        if keyring.dictionary(&dict).is_none() {
            usage!("--compress names dictionary {dict}, which the keys do not hold (add its wsdict1… string to the key file, or --dict FILE)");
        }
    }
    match a.tree {
        Some(t) => keyring.grant_in(t, &topic),
        None => keyring.grant_for(&topic),
    }
    .context("cannot publish with the given keys")?;
    let identity = a.identity.load()?;
    if identity.is_none() {
        tracing::info!("no identity: publishing unsigned messages");
    }
    let client = a.conn.connect(keyring, identity, Some(&seal)).await?;
    let qos = Qos::from_u64(a.qos.into()).expect("0..=2");
    let mut opts = PublishOptions::default().qos(qos);
    if a.retain {
        opts = opts.retain();
    }
    if let Some(t) = a.tree {
        opts = opts.tree(t);
    }
    // A QoS 0 publish returns before it is sent: one dropped here (over the relay's
    // max_frame...) or refused by the relay is only counted. Compared after the flush.
    let before = client.stats();
    let mut sent = 0u64;
    let result: Result<()> = async {
        match value {
            Some(v) => {
                for _ in 0..a.count.unwrap_or(1) {
                    client.publish_with(topic.as_str(), &v, opts).await?;
                    sent += 1;
                }
            }
            None => {
                let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
                let mut buf = Vec::new();
                let mut n = 0u64;
                while a.count.is_none_or(|c| sent < c) {
                    // One line, read no further than the bound: a producer writing without
                    // a newline took memory until the process was killed.
                    buf.clear();
                    let read = (&mut stdin)
                        .take(MAX_STDIN_LINE + 1)
                        .read_until(b'\n', &mut buf)
                        .await
                        .context("reading stdin")?;
                    if read == 0 {
                        break;
                    }
                    n += 1;
                    if buf.len() as u64 > MAX_STDIN_LINE {
                        anyhow::bail!(
                            "stdin line {n} is longer than {MAX_STDIN_LINE} bytes: one JSON \
                             value a line"
                        );
                    }
                    let line = std::str::from_utf8(&buf)
                        .with_context(|| format!("stdin line {n} is not text (UTF-8)"))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v = parse_json(line).with_context(|| format!("stdin line {n}"))?;
                    client.publish_with(topic.as_str(), &v, opts).await?;
                    sent += 1;
                }
            }
        }
        Ok(())
    }
    .await;
    // Whatever was published goes out before we exit, even after an error.
    let flushed = client.flush().await;
    // Counted before the flush is answered: everything published before it is settled.
    let after = client.stats();
    client.close().await;
    result?;
    flushed.context("the relay did not confirm the messages")?;
    let dropped = after.outbox_drops.saturating_sub(before.outbox_drops);
    let refused = after
        .publish_refusals
        .saturating_sub(before.publish_refusals);
    let unsealed = after.seal_failures.saturating_sub(before.seal_failures);
    let lost = dropped + refused + unsealed;
    if lost > 0 {
        let mut why = Vec::new();
        if dropped > 0 {
            why.push(format!(
                "{dropped} dropped unsent (over the relay's max_frame, or the reconnect buffer full)"
            ));
        }
        if refused > 0 {
            why.push(format!("{refused} refused by the relay"));
        }
        if unsealed > 0 {
            why.push(format!("{unsealed} could not be sealed"));
        }
        anyhow::bail!(
            "{lost} of {sent} messages were not published: {}",
            why.join(", ")
        );
    }
    tracing::info!(sent, topic = %topic, "published");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct SubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    dict: DictArgs,
    /// The filter: `+` matches one level, `#` the rest, e.g. sensor/+/temp or sensor/#.
    filter: String,
    /// Exit (0) after this many messages.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after SECS seconds: with --count, fewer messages by then is an error (exit 1);
    /// without it, the end of a normal run (exit 0).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Do not print the `ready:` line on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Start with the relay's history from this relay sequence (0: everything kept).
    #[arg(long, value_name = "SEQ", conflicts_with_all = ["since", "last"])]
    from: Option<u64>,
    /// Start with the history since TIME: Unix milliseconds, or a duration ago such as
    /// 90s, 15m, 2h, 7d.
    #[arg(long, value_name = "TIME", conflicts_with = "last")]
    since: Option<String>,
    /// Start with the last N stored messages of each matching topic.
    #[arg(long, value_name = "N")]
    last: Option<u64>,
    /// Delivery: 0 at most once, 1 at least once (each printed message is acknowledged;
    /// unacknowledged ones are redelivered), 2 exactly once (1 + duplicates dropped).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// A durable subscription: the relay remembers the position under this name and a
    /// later `sub --durable NAME` resumes right after the last acknowledged message.
    #[arg(long, value_name = "NAME")]
    durable: Option<String>,
    /// With --durable: delete that durable subscription at the relay (its name, position
    /// and owner; what it kept is dropped) and exit without printing messages.
    #[arg(long, requires = "durable")]
    delete: bool,
    /// Receive only messages of this tree (32 hex digits, as `whispeer key show` prints
    /// it): needed when keys of two trees cover the filter. Without it the subscription
    /// binds to the one tree whose keys overlap the filter.
    #[arg(long, value_name = "TREE_ID", value_parser = io::parse_tree_id)]
    tree: Option<whispeer::protocol::TreeId>,
    #[command(flatten)]
    keys: KeyArgs,
}

/// `--since`: Unix milliseconds, or a duration ago (`90s`, `15m`, `2h`, `7d`).
fn since_ms(s: &str, now_ms: u64) -> Result<u64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("--since {s:?}: expected Unix milliseconds or a duration like 15m")
    })?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("--since {s:?}: unit must be ms, s, m, h or d"),
    };
    Ok(now_ms.saturating_sub(n.saturating_mul(ms)))
}

impl SubArgs {
    fn options(&self) -> Result<SubscribeOptions> {
        let mut o = SubscribeOptions::new().qos(Qos::from_u64(self.qos.into()).expect("0..=2"));
        if let Some(seq) = self.from {
            o = o.replay(Replay::FromSeq(seq));
        }
        if let Some(t) = &self.since {
            o = o.replay(Replay::SinceMs(since_ms(t, whispeer::now_ms())?));
        }
        if let Some(n) = self.last {
            o = o.replay(Replay::LastN(n));
        }
        if let Some(name) = &self.durable {
            o = o.durable(name.clone());
        }
        if let Some(t) = self.tree {
            o = o.tree(t);
        }
        Ok(o)
    }
}

/// One printed message (field order is part of the output contract: new keys go last).
#[derive(Serialize)]
struct Line<'a> {
    topic: &'a str,
    sender: Option<String>,
    seq: u64,
    id: String,
    ts: u64,
    data: serde_json::Value,
    /// The tree whose key opened it (32 hex digits).
    tree: String,
    /// The key epoch it was sealed under.
    epoch: u64,
    /// How the grant that opened it is held (see [`provenance_json`]).
    provenance: serde_json::Value,
}

/// A grant's provenance as the npm package shows it: `{"kind":"admin-signed"}`,
/// `{"kind":"derived","from":SCOPE}` or `{"kind":"delegated","by":SENDER_ID}`.
fn provenance_json(p: &Provenance) -> serde_json::Value {
    use serde_json::json;
    match p {
        Provenance::AdminSigned => json!({ "kind": "admin-signed" }),
        Provenance::Derived { from } => json!({ "kind": "derived", "from": from.to_string() }),
        Provenance::Delegated { by } => json!({ "kind": "delegated", "by": by.to_string() }),
        // A kind this build does not know: named, never dropped.
        #[allow(unreachable_patterns)]
        other => json!({ "kind": other.to_string() }),
    }
}

/// The most data items (array elements, map keys and values, tags, string chunks) a CBOR or
/// JSON payload may hold to be printed as JSON: a delivered payload is up to `max_payload`
/// (16 MiB) whatever it was compressed from, and each one-byte item costs some 64 bytes as
/// a decoded tree (review F5). Over it the message is skipped with a warning.
pub const MAX_JSON_ITEMS: u64 = 1 << 20;
/// The most JSON text a CBOR payload may turn into (estimated from above before decoding):
/// non-text map keys are written as escaped JSON text, which doubles at each level.
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// How deep CBOR may nest (ciborium's own limit).
const MAX_CBOR_DEPTH: u32 = 256;

/// Why a payload is not turned into JSON.
#[derive(Debug, PartialEq)]
pub enum Unprintable {
    /// Not well-formed CBOR.
    Malformed(&'static str),
    /// Well-formed, but past [`MAX_JSON_ITEMS`], [`MAX_JSON_BYTES`] or the nesting limit.
    TooLarge(String),
}

impl std::fmt::Display for Unprintable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unprintable::Malformed(why) => write!(f, "undecodable CBOR: {why}"),
            Unprintable::TooLarge(why) => write!(f, "too large to print as JSON: {why}"),
        }
    }
}

impl std::error::Error for Unprintable {}

/// Checks that `cbor` may be turned into JSON within [`MAX_JSON_ITEMS`] and
/// [`MAX_JSON_BYTES`], before anything is decoded (the library's [`cbor_scan`]).
pub fn cbor_printable(cbor: &[u8]) -> Result<(), Unprintable> {
    let budget = cbor_scan::Budget {
        max_items: MAX_JSON_ITEMS,
        max_depth: MAX_CBOR_DEPTH,
    };
    let est = match cbor_scan::scan(cbor, budget) {
        Ok(s) => s.json_len,
        Err(cbor_scan::ScanError::Malformed(why)) => return Err(Unprintable::Malformed(why)),
        Err(e) => return Err(Unprintable::TooLarge(e.to_string())),
    };
    if est > MAX_JSON_BYTES {
        return Err(Unprintable::TooLarge(format!(
            "about {est} bytes of JSON, over {MAX_JSON_BYTES}"
        )));
    }
    Ok(())
}

/// Checks that a JSON document holds at most [`MAX_JSON_ITEMS`] values (counted from above
/// by its brackets, commas and colons outside strings), before it is parsed.
pub fn json_printable_size(json: &[u8]) -> Result<(), Unprintable> {
    let (mut items, mut in_str, mut esc) = (1u64, false, false);
    for &c in json {
        if in_str {
            match c {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'[' | b'{' | b',' | b':' => items += 1,
                _ => {}
            }
        }
    }
    if items > MAX_JSON_ITEMS {
        return Err(Unprintable::TooLarge(format!(
            "more than {MAX_JSON_ITEMS} JSON values"
        )));
    }
    Ok(())
}

fn payload_json(m: &Message<Vec<u8>>) -> Result<serde_json::Value> {
    let ct = m.content_type.as_str();
    let base = ct.split(';').next().unwrap_or("").trim();
    match base {
        "application/cbor" => {
            // Bounded first: the decoded trees cost far more than the bytes (review F5).
            cbor_printable(&m.value)?;
            let v: ciborium::Value = ciborium::from_reader(&m.value[..])
                .map_err(|e| anyhow::anyhow!("undecodable CBOR: {e}"))?;
            Ok(cbor_scan::to_json(v))
        }
        "application/json" => {
            json_printable_size(&m.value)?;
            Ok(serde_json::from_slice(&m.value)?)
        }
        _ => Ok(match std::str::from_utf8(&m.value) {
            Ok(s) => serde_json::Value::String(s.to_owned()),
            Err(_) => serde_json::Value::String(hex::encode(&m.value)),
        }),
    }
}

pub async fn subscribe(a: SubArgs) -> Result<ExitCode> {
    a.conn.check()?;
    let filter =
        TopicFilter::new(a.filter.as_str()).with_context(|| format!("filter '{}'", a.filter))?;
    let timeout = a.timeout.map(secs).transpose()?;
    let opts = a.options()?;
    let keys = a.keys.require()?;
    let mut keyring = io::keyring(&keys)?;
    // A key file's dictionaries serve its keys' trees; `--dict` ones every tree.
    a.keys.add_dictionaries_to(&mut keyring)?;
    for d in a.dict.load()? {
        keyring.add_dictionary(d);
    }
    // A durable belongs to whoever holds these keys: a later `sub --durable` with the same
    // keys resumes it; a stranger who only learned the key id from the relay cannot.
    let mut material = a.keys.texts()?;
    material.retain(|s| !io::is_dict_string(s));
    material.sort();
    let material = zeroize::Zeroizing::new(material.join("\n"));
    let owner = whispeer::DurableOwner::derive_from(material.as_bytes());
    let client = a
        .conn
        .connect_owned(keyring, None, None, Some(owner))
        .await?;
    let mut sub = match client
        .subscribe_bytes_with_options(filter.as_str(), opts)
        .await
    {
        Ok(s) => s,
        Err(e @ (SubscribeError::NoKey { .. } | SubscribeError::Key(_))) => {
            return Err(anyhow::Error::new(e).context("cannot subscribe with the given keys"))
        }
        Err(e) => return Err(anyhow::Error::new(e).context("subscribe failed")),
    };
    if a.delete {
        let name = a.durable.as_deref().unwrap_or_default();
        sub.delete_durable()
            .await
            .with_context(|| format!("cannot delete durable subscription '{name}'"))?;
        if !a.quiet {
            eprintln!(
                "deleted: durable subscription '{name}' on {}",
                client.relay_url()
            );
        }
        client.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    if !a.quiet {
        eprintln!(
            "ready: subscribed to '{}' on {}",
            a.filter,
            client.relay_url()
        );
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut got = 0u64;
    // With several relays: a line on stderr each time failover moves to another one.
    let mut relay = client.relay_changes();
    relay.mark_unchanged();
    let outcome: Result<()> = loop {
        if a.count.is_some_and(|c| got >= c) {
            break Ok(());
        }
        let next = async {
            // Acknowledged only once printed (below): a message whose line was not
            // written is delivered again (to the next `sub --durable` of the name).
            match deadline {
                Some(d) => tokio::time::timeout_at(d, sub.next_message_unacked())
                    .await
                    .ok(),
                None => Some(sub.next_message_unacked().await),
            }
        };
        let next = tokio::select! {
            m = next => m,
            Ok(()) = relay.changed() => {
                let url = relay.borrow_and_update().clone();
                if !a.quiet {
                    eprintln!("relay: now on {url}");
                }
                continue;
            }
        };
        let m = match next {
            None => {
                // The deadline passed.
                break match a.count {
                    Some(c) => Err(anyhow::anyhow!(
                        "timed out after {}s: received {got} of {c} messages",
                        a.timeout.unwrap_or_default()
                    )),
                    None => Ok(()),
                };
            }
            Some(None) => break Err(anyhow::anyhow!("the connection to the relay closed")),
            Some(Some(Err(e))) => {
                io::warn(format!("skipping a message: {e}"));
                continue;
            }
            Some(Some(Ok(m))) => m,
        };
        let data = match payload_json(&m) {
            Ok(d) => d,
            Err(e) => {
                // The topic is any member's choice: `warn` escapes control characters.
                let topic = m.topic.as_str();
                io::warn(format!("skipping a message on {topic}: {e:#}"));
                // Skipped for good (it cannot be printed): taken.
                m.ack();
                continue;
            }
        };
        let line = Line {
            topic: m.topic.as_str(),
            sender: m.sender.map(|s| s.to_string()),
            seq: m.seq,
            id: m.id.to_string(),
            ts: m.timestamp_ms,
            data,
            tree: m.tree_id.to_string(),
            epoch: m.epoch,
            provenance: provenance_json(&m.provenance),
        };
        let text = serde_json::to_string(&line)?;
        // Topics and payloads are any member's choice: no raw C1, DEL or bidi controls on
        // the terminal (the JSON reads back the same).
        match io::println_flush(&io::json_printable(&text)) {
            Ok(()) => {
                // Written and flushed: now it is acknowledged.
                m.ack();
                got += 1;
            }
            // Not written: not acknowledged (dropped with `m`).
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    drop(sub);
    client.close().await;
    outcome?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn since_accepts_millis_and_durations_ago() {
        assert_eq!(
            super::since_ms("1700000000000", 5).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(super::since_ms("15m", 1_000_000).unwrap(), 100_000);
        assert_eq!(super::since_ms("2h", 1).unwrap(), 0);
        assert!(super::since_ms("5 weeks", 1).is_err());
        assert!(super::since_ms("m", 1).is_err());
    }

    #[test]
    fn cbor_is_bounded_before_it_is_decoded() {
        use super::{cbor_printable, json_printable_size, Unprintable, MAX_JSON_ITEMS};
        let cbor = |v: &ciborium::Value| {
            let mut b = Vec::new();
            ciborium::into_writer(v, &mut b).unwrap();
            b
        };
        // What clients publish passes, and converts as before.
        use ciborium::Value as C;
        let v = C::Map(vec![
            (C::Text("temp".into()), C::Float(21.5)),
            (
                C::Text("tags".into()),
                C::Array(vec![C::Text("a".into()), C::Text("b".into())]),
            ),
            (C::Integer(7.into()), C::Bytes(vec![0, 0xff])),
            (C::Text("n".into()), C::Integer((-3).into())),
            (C::Text("x".into()), C::Null),
        ]);
        assert_eq!(cbor_printable(&cbor(&v)), Ok(()));
        assert_eq!(
            whispeer::cbor_scan::to_json(v),
            serde_json::json!({"temp": 21.5, "tags": ["a", "b"], "7": "00ff", "n": -3, "x": null})
        );
        // Indefinite lengths: text in chunks, an array up to its break.
        assert_eq!(
            cbor_printable(&[0x9f, 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0x01, 0xff]),
            Ok(())
        );
        // One item per byte, past the cap: refused before anything is built.
        let n = MAX_JSON_ITEMS as usize;
        let mut bomb = vec![0x80u8; n + 2];
        bomb[0] = 0x9f;
        bomb[n + 1] = 0xff;
        assert!(matches!(
            cbor_printable(&bomb),
            Err(Unprintable::TooLarge(_))
        ));
        let mut fits = vec![0x80u8; n + 1];
        fits[0] = 0x9f;
        fits[n] = 0xff;
        assert_eq!(cbor_printable(&fits), Ok(()));
        // Non-text keys are written as escaped JSON text, which doubles at each level: 40
        // maps nested as keys are a few hundred bytes of CBOR and terabytes of JSON.
        let mut v = ciborium::Value::Text("\"".into());
        for _ in 0..40 {
            v = ciborium::Value::Map(vec![(v, ciborium::Value::Null)]);
        }
        let b = cbor(&v);
        assert!(b.len() < 200, "{}", b.len());
        assert!(matches!(cbor_printable(&b), Err(Unprintable::TooLarge(_))));
        // Malformed: truncated, a length past the end, a lone break, reserved info.
        for bad in [
            &[0x82, 0x01][..],
            &[0x5a, 0xff, 0xff, 0xff, 0xff],
            &[0xff],
            &[0x1c],
        ] {
            assert!(
                matches!(cbor_printable(bad), Err(Unprintable::Malformed(_))),
                "{bad:02x?}"
            );
        }
        // JSON: counted by its structure, strings aside.
        assert_eq!(
            json_printable_size(br#"{"a": [1, 2, "x,y[{:"], "b\"[": {}}"#),
            Ok(())
        );
        let many = format!("[{}0]", "0,".repeat(n));
        assert!(matches!(
            json_printable_size(many.as_bytes()),
            Err(Unprintable::TooLarge(_))
        ));
    }

    #[test]
    fn provenance_prints_as_the_npm_package_shows_it() {
        use serde_json::json;
        use whispeer::protocol::{Provenance, Scope};
        let j = super::provenance_json;
        assert_eq!(
            j(&Provenance::AdminSigned),
            json!({ "kind": "admin-signed" })
        );
        let from = Scope::Subtree(whispeer::Topic::new("a/b").unwrap());
        assert_eq!(
            j(&Provenance::Derived { from }),
            json!({ "kind": "derived", "from": "a/b/#" })
        );
        let by = whispeer::Identity::generate().sender_id();
        assert_eq!(
            j(&Provenance::Delegated { by }),
            json!({ "kind": "delegated", "by": by.to_string() })
        );
    }
}
