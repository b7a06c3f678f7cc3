//! Relay plugins: hooks that see metadata only — connection info, token paths and
//! patterns, sizes — and never envelope bytes (the info types do not carry them).
//!
//! A hook may reject: `on_connect` rejection closes the connection with
//! `Err(NotAllowed, fatal)`; `on_subscribe`/`on_publish` rejections answer that one request
//! with a non-fatal `Err(NotAllowed)` carrying its `sub_id`/`publish_id`.
//! Hooks run inline on the connection's task, so they must be quick and must not block.
//! Logging ([`LoggingPlugin`]) and metrics ([`MetricsPlugin`]) are plugins themselves.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use whispeer_protocol::{Qos, TokenPath, TokenPattern};

use crate::ids::{ConnId, SubId, TransportKind};
use crate::metrics::Metrics;

/// A plugin's refusal, with a reason sent to the client (keep it free of secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

/// The result of a hook.
pub type Verdict = Result<(), Rejection>;

/// Who connected, after a successful `Hello`.
#[derive(Debug, Clone)]
pub struct ConnectInfo<'a> {
    /// The relay's id for the connection.
    pub conn: ConnId,
    /// The listener it came through.
    pub transport: TransportKind,
    /// Remote address (`None` in process).
    pub peer: Option<SocketAddr>,
    /// Negotiated protocol version.
    pub version: u64,
    /// Optional client software name from `Hello`.
    pub client: Option<&'a str>,
    /// Whether `Hello` carried an auth blob (its content is not shown to plugins yet).
    pub has_auth: bool,
    /// Whether the connection signed in to a relay account the relay verified
    /// (`auth.mode = required`: a bearer token it knows, or an answered challenge); a
    /// stranger's connection is not (`has_auth` says only that `Hello` carried a token).
    pub authenticated: bool,
}

/// A subscription request.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeInfo<'a> {
    /// The connection.
    pub conn: ConnId,
    /// The client's id for the subscription.
    pub sub_id: SubId,
    /// The filter (key id + tokens and wildcards).
    pub pattern: &'a TokenPattern,
    /// Delivery guarantee asked for.
    pub qos: Qos,
}

/// A publish request: the route and size, never the envelope bytes.
#[derive(Debug, Clone, Copy)]
pub struct PublishInfo<'a> {
    /// The connection.
    pub conn: ConnId,
    /// The route read from the envelope header.
    pub path: &'a TokenPath,
    /// Envelope size in bytes.
    pub size: usize,
    /// `Pub` flags.
    pub flags: u64,
    /// Delivery guarantee asked for.
    pub qos: Qos,
}

/// A connection that ended.
#[derive(Debug, Clone, Copy)]
pub struct DisconnectInfo<'a> {
    /// The connection.
    pub conn: ConnId,
    /// The listener it came through.
    pub transport: TransportKind,
    /// Remote address.
    pub peer: Option<SocketAddr>,
    /// Whether this plugin's own `on_connect` ran and accepted the connection: `Hello`
    /// completed and no plugin before it in the chain rejected it. False for connections
    /// that never completed `Hello`, for the plugin that rejected one and for every plugin
    /// after it (whose `on_connect` never ran) — so a plugin that counts on an accepted
    /// connect and uncounts on a greeted disconnect stays balanced.
    pub greeted: bool,
    /// Why it ended, for logs.
    pub reason: &'a str,
    /// Whether it had signed in to a relay account ([`ConnectInfo::authenticated`]).
    pub authenticated: bool,
}

/// Hooks into the relay's connection lifecycle. Every method has a permissive default.
pub trait Plugin: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// After `Hello`; rejecting closes the connection.
    fn on_connect(&self, _info: &ConnectInfo<'_>) -> Verdict {
        Ok(())
    }
    /// Before a subscription becomes active.
    fn on_subscribe(&self, _info: &SubscribeInfo<'_>) -> Verdict {
        Ok(())
    }
    /// Before a publish is accepted and routed.
    fn on_publish(&self, _info: &PublishInfo<'_>) -> Verdict {
        Ok(())
    }
    /// After a connection ended: called once per connection on every plugin (also for
    /// connections that never completed `Hello`, or that a plugin rejected), with
    /// [`DisconnectInfo::greeted`] true only for the plugins whose `on_connect` accepted
    /// it — a plugin rejecting in `on_connect`, and the plugins after it, see `false`.
    fn on_disconnect(&self, _info: &DisconnectInfo<'_>) {}
}

/// The plugin chain: hooks run in order; the first rejection wins.
#[derive(Debug, Clone, Default)]
pub struct Plugins(Vec<Arc<dyn Plugin>>);

impl Plugins {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a plugin.
    pub fn push(&mut self, p: Arc<dyn Plugin>) {
        self.0.push(p);
    }
    /// Names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|p| p.name()).collect()
    }

    fn first_rejection(
        &self,
        f: impl Fn(&dyn Plugin) -> Verdict,
    ) -> Result<(), (&'static str, Rejection)> {
        for p in &self.0 {
            f(p.as_ref()).map_err(|r| (p.name(), r))?;
        }
        Ok(())
    }

    /// Runs `on_connect` in order until a plugin rejects. Counts in `accepted` the plugins
    /// that accepted, as each does (all of them, or the index of the one that rejected, or
    /// of one that panicked — the count survives the unwind, so the session's drop still
    /// gives those plugins their greeted disconnect): pass it to
    /// [`disconnect`](Self::disconnect).
    pub(crate) fn connect(
        &self,
        i: &ConnectInfo<'_>,
        accepted: &mut usize,
    ) -> Result<(), (&'static str, Rejection)> {
        for (n, p) in self.0.iter().enumerate() {
            p.on_connect(i).map_err(|r| (p.name(), r))?;
            *accepted = n + 1;
        }
        Ok(())
    }
    pub(crate) fn subscribe(&self, i: &SubscribeInfo<'_>) -> Result<(), (&'static str, Rejection)> {
        self.first_rejection(|p| p.on_subscribe(i))
    }
    pub(crate) fn publish(&self, i: &PublishInfo<'_>) -> Result<(), (&'static str, Rejection)> {
        self.first_rejection(|p| p.on_publish(i))
    }
    /// Runs `on_disconnect` on every plugin; `greeted` only for the first `accepted` (the
    /// plugins whose `on_connect` accepted the connection, as [`connect`](Self::connect)
    /// counted them; 0 if it never ran).
    pub(crate) fn disconnect(&self, i: &DisconnectInfo<'_>, accepted: usize) {
        for (n, p) in self.0.iter().enumerate() {
            p.on_disconnect(&DisconnectInfo {
                greeted: i.greeted && n < accepted,
                ..*i
            });
        }
    }
}

/// The longest `client` name (from `Hello`, up to 1 KiB) shown in a log line, in chars.
pub const LOG_CLIENT_CHARS: usize = 64;

/// A client's name as logged: its first [`LOG_CLIENT_CHARS`] chars, "…" if there were more,
/// and U+FFFD for every char a log would show escaped (control and format chars), so the
/// field is at most ~260 bytes however the log format escapes it.
fn client_for_log(name: &str) -> Cow<'_, str> {
    let plain = |c: char| matches!(c, '"' | '\\' | '\'') || c.escape_debug().nth(1).is_none();
    let mut chars = name.char_indices();
    let cut = chars.nth(LOG_CLIENT_CHARS).map(|(at, _)| at);
    let head = &name[..cut.unwrap_or(name.len())];
    if cut.is_none() && head.chars().all(plain) {
        return Cow::Borrowed(head);
    }
    let mut out: String = head
        .chars()
        .map(|c| if plain(c) { c } else { '\u{FFFD}' })
        .collect();
    if cut.is_some() {
        out.push('…');
    }
    Cow::Owned(out)
}

/// Logs lifecycle events with `tracing`: connects and disconnects at `info` — those of
/// connections without a relay account bounded relay-wide ([`crate::logging`]: a stranger
/// makes them by connecting; a signed-in connection's are always written), the client's
/// name cut to [`LOG_CLIENT_CHARS`] —, subscriptions at `debug`, publishes at `trace` —
/// key ids, level counts and sizes only.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoggingPlugin;

impl Plugin for LoggingPlugin {
    fn name(&self) -> &'static str {
        "logging"
    }
    fn on_connect(&self, i: &ConnectInfo<'_>) -> Verdict {
        if crate::logging::conn_line(i.authenticated) {
            let client = i.client.map_or(Cow::Borrowed("-"), client_for_log);
            tracing::info!(target: crate::logging::CONN_LINES_TARGET, conn = %i.conn,
                transport = %i.transport, peer = ?i.peer, version = i.version,
                client = &*client, account = i.authenticated, "client connected");
        }
        Ok(())
    }
    fn on_subscribe(&self, i: &SubscribeInfo<'_>) -> Verdict {
        tracing::debug!(conn = %i.conn, sub_id = i.sub_id.0, key_id = %i.pattern.key_id(),
            levels = i.pattern.elems().len(), exact = i.pattern.is_exact(), "subscribe");
        Ok(())
    }
    fn on_publish(&self, i: &PublishInfo<'_>) -> Verdict {
        tracing::trace!(conn = %i.conn, key_id = %i.path.key_id(),
            levels = i.path.tokens().len(), size = i.size, flags = i.flags, "publish");
        Ok(())
    }
    fn on_disconnect(&self, i: &DisconnectInfo<'_>) {
        if i.greeted {
            if crate::logging::conn_line(i.authenticated) {
                tracing::info!(target: crate::logging::CONN_LINES_TARGET, conn = %i.conn,
                    transport = %i.transport, peer = ?i.peer, reason = i.reason,
                    account = i.authenticated, "client disconnected");
            }
        } else {
            tracing::debug!(conn = %i.conn, transport = %i.transport, peer = ?i.peer,
                reason = i.reason, "connection closed before Hello");
        }
    }
}

/// Counts connections, subscriptions and accepted publishes into [`Metrics`]. Wire-level
/// counters (bytes, frames, deliveries, drops, errors, routing latency) are recorded by
/// the transport and router directly, because no hook sees them.
#[derive(Debug, Clone)]
pub struct MetricsPlugin {
    metrics: Arc<Metrics>,
}

impl MetricsPlugin {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl Plugin for MetricsPlugin {
    fn name(&self) -> &'static str {
        "metrics"
    }
    fn on_connect(&self, i: &ConnectInfo<'_>) -> Verdict {
        self.metrics.connection_opened(i.transport);
        Ok(())
    }
    fn on_disconnect(&self, i: &DisconnectInfo<'_>) {
        if i.greeted {
            self.metrics.connection_closed(i.transport);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` under a text subscriber with `filter`; what it logged.
    fn logged(filter: &str, f: impl FnOnce()) -> String {
        crate::logging::captured(filter, f)
    }

    fn connect(n: u64, client: &str, authenticated: bool) -> ConnectInfo<'_> {
        ConnectInfo {
            conn: ConnId(n),
            transport: TransportKind::Tcp,
            peer: Some(([192, 0, 2, 1], 40_000).into()),
            version: 1,
            client: Some(client),
            has_auth: true,
            authenticated,
        }
    }

    /// A stranger's connections exhaust the relay-wide bucket of connection lines (60
    /// connects, a burst of 50), yet a client signed in to a relay account gets its
    /// "client connected" and "client disconnected" lines written: only anonymous
    /// connections share the bucket (one bucket for all used to hide every client's lines
    /// behind a stranger's 5 a second).
    #[test]
    fn a_strangers_flood_does_not_hide_a_signed_in_clients_lines() {
        let log = logged("info", || {
            for n in 0..60 {
                LoggingPlugin
                    .on_connect(&connect(n, "stranger", false))
                    .unwrap();
            }
            LoggingPlugin
                .on_connect(&connect(60, "alice-app", true))
                .unwrap();
            LoggingPlugin.on_disconnect(&DisconnectInfo {
                conn: ConnId(60),
                transport: TransportKind::Tcp,
                peer: None,
                greeted: true,
                reason: "closed by the client",
                authenticated: true,
            });
        });
        let strangers = log
            .lines()
            .filter(|l| l.contains("client connected") && l.contains("stranger"))
            .count();
        assert!(
            strangers < 60,
            "the bucket was not exhausted: {strangers} lines"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("client connected") && l.contains("alice-app")),
            "{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("client disconnected") && l.contains("conn=c60")),
            "{log}"
        );
    }

    /// The "suppressed" summary has the connection lines' own target: a filter keeping
    /// only those keeps it.
    #[test]
    fn the_suppressed_summary_has_the_connection_lines_target() {
        let log = logged("warn,whispeer_relay::plugin=info", || {
            LoggingPlugin
                .on_connect(&connect(1, "alice-app", true))
                .unwrap();
            crate::logging::write_summary(7, 10);
        });
        assert!(log.contains("client connected"), "{log:?}");
        assert!(
            log.contains("7 connection log lines suppressed in the last 10 s"),
            "{log:?}"
        );
    }

    /// A client's name is logged cut to 64 chars, with U+FFFD for what a log would escape:
    /// at most ~260 bytes escaped, however long or hostile the name (`Hello` allows 1 KiB).
    #[test]
    fn client_names_are_cut_and_cleaned_for_the_log() {
        assert_eq!(
            client_for_log("whispeer-cli 1.0 \"x\""),
            "whispeer-cli 1.0 \"x\""
        );
        assert_eq!(
            client_for_log("a\nb\x1b[31m\u{202e}"),
            "a\u{fffd}b\u{fffd}[31m\u{fffd}"
        );
        let long = "\x7f".repeat(1024);
        let long = client_for_log(&long);
        assert_eq!(long, format!("{}…", "\u{fffd}".repeat(64)));
        for hostile in ["\x7f", "\"", "\u{10ffff}", "\u{301}", "é"] {
            let name = hostile.repeat(1024);
            let logged = client_for_log(&name);
            assert_eq!(logged.chars().count(), LOG_CLIENT_CHARS + 1, "{hostile:?}");
            assert!(
                format!("{logged:?}").len() <= 260,
                "{hostile:?}: {logged:?}"
            );
        }
    }
}
