//! Client plugins: code that runs where the keys are, on plaintext.
//!
//! The relay's plugins see only metadata; a client plugin sees each value before it is
//! sealed and after it is opened, so it can transform, validate, drop, log or count
//! messages. Plugins run in the order they were added with `.with(plugin)`:
//! `on_publish` in the publishing task (before sealing), `on_message` once per received
//! message (before it is fanned out to subscriptions), `on_subscribe` before a filter is
//! sent to the relay. Built in: [`Logging`], [`Metrics`], [`TypeEnforcement`], the
//! example transform [`Transform`], and (feature `persistence`)
//! [`LocalHistory`](crate::history::LocalHistory).
//!
//! ```
//! use whispeer::plugin::{Plugin, Outgoing, PluginError};
//! /// Refuses to publish payloads over 4 KiB.
//! struct SizeGuard;
//! impl Plugin for SizeGuard {
//!     fn name(&self) -> &str { "size-guard" }
//!     fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
//!         if msg.payload.len() > 4096 {
//!             return Err(PluginError::new(self.name(), "payload over 4 KiB"));
//!         }
//!         Ok(())
//!     }
//! }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use whispeer_protocol::{Topic, TopicFilter};

use crate::core::Received;
use crate::printable::Printable;

pub use crate::error::PluginError;

/// A message about to be sealed: plugins may change the content type and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outgoing {
    /// The topic (fixed: changing it would change the key and tokens).
    pub topic: Topic,
    /// The content type (`application/cbor` for typed publishes).
    pub content_type: String,
    /// The serialized payload.
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// A message (e.g. to test a plugin's `on_publish`).
    pub fn new(topic: Topic, content_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Outgoing {
            topic,
            content_type: content_type.into(),
            payload: payload.into(),
        }
    }
}

/// What to do with a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it (possibly transformed).
    Deliver,
    /// Drop it; counted in `ClientStats::plugin_drops`.
    Drop,
}

/// A client plugin; every method has a pass-through default.
pub trait Plugin: Send + Sync + 'static {
    /// A short name for errors and logs.
    fn name(&self) -> &str;
    /// Before a message is sealed; may transform it or refuse (the publish fails).
    fn on_publish(&self, _msg: &mut Outgoing) -> Result<(), PluginError> {
        Ok(())
    }
    /// After a message was opened and verified; may transform it or drop it.
    fn on_message(&self, _msg: &mut Received) -> Verdict {
        Verdict::Deliver
    }
    /// Before a subscription is made; may refuse (the subscribe fails).
    fn on_subscribe(&self, _filter: &TopicFilter) -> Result<(), PluginError> {
        Ok(())
    }
}

/// The earlier name of [`Plugin`].
pub use self::Plugin as ClientPlugin;

/// The plugins of one client, in order.
#[derive(Clone, Default)]
pub struct Plugins(Vec<Arc<dyn Plugin>>);

impl fmt::Debug for Plugins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|p| p.name()))
            .finish()
    }
}

impl Plugins {
    /// Adds a plugin at the end.
    pub fn push(&mut self, p: Arc<dyn Plugin>) {
        self.0.push(p);
    }
    /// Whether there are none (the fast path skips all plugin work).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Runs every `on_publish` in order; the first refusal wins.
    pub fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        self.0.iter().try_for_each(|p| p.on_publish(msg))
    }
    /// Runs every `on_message` in order until one drops the message.
    pub fn on_message(&self, msg: &mut Received) -> Verdict {
        for p in &self.0 {
            if p.on_message(msg) == Verdict::Drop {
                return Verdict::Drop;
            }
        }
        Verdict::Deliver
    }
    /// Runs every `on_subscribe` in order; the first refusal wins.
    pub fn on_subscribe(&self, filter: &TopicFilter) -> Result<(), PluginError> {
        self.0.iter().try_for_each(|p| p.on_subscribe(filter))
    }
}

/// Logs every publish, message and subscription (topics, sizes, content types — never
/// payloads) at one level. Works out of the box: [`Logging::new`] (and `default()`, at
/// `INFO`) installs a `tracing` fmt subscriber on stderr showing that level and above when
/// the program has none (with feature `tokio-runtime`), and otherwise emits `tracing`
/// events to the program's subscriber; [`Logging::to_writer`] writes lines to a writer of
/// your choice instead, without `tracing`. Topics and filters are written with control
/// and bidi characters escaped (`\u{1b}`, `\n`, …) and content types quoted and escaped:
/// whoever publishes chooses them, and a line must neither act on a terminal nor forge
/// another line.
#[derive(Clone)]
pub struct Logging {
    level: tracing::Level,
    writer: Option<Arc<std::sync::Mutex<Box<dyn std::io::Write + Send>>>>,
}

impl fmt::Debug for Logging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logging")
            .field("level", &self.level)
            .field("own_writer", &self.writer.is_some())
            .finish()
    }
}

impl Default for Logging {
    fn default() -> Self {
        Logging::new(tracing::Level::INFO)
    }
}

impl Logging {
    /// Logs at `level` through `tracing`, installing a fmt subscriber (stderr, `level` and
    /// above) if the program has not set one.
    pub fn new(level: tracing::Level) -> Self {
        #[cfg(feature = "tokio-runtime")]
        if !tracing::dispatcher::has_been_set() {
            // Another thread may win the race: then its subscriber is used, also fine.
            let _ = tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::stderr)
                .with_target(false)
                .try_init();
        }
        Logging {
            level,
            writer: None,
        }
    }

    /// Writes one line per event to `w` (e.g. a file or `std::io::stdout()`), without
    /// `tracing`; `level` is written at the start of each line.
    pub fn to_writer(level: tracing::Level, w: impl std::io::Write + Send + 'static) -> Self {
        Logging {
            level,
            writer: Some(Arc::new(std::sync::Mutex::new(Box::new(w)))),
        }
    }

    /// The level events are logged at.
    pub fn level(&self) -> tracing::Level {
        self.level
    }

    fn emit(&self, line: fmt::Arguments<'_>) {
        use std::io::Write as _;
        use tracing::Level;
        match &self.writer {
            Some(w) => {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(w, "{} whispeer: {line}", self.level);
                let _ = w.flush();
            }
            None => match self.level {
                Level::ERROR => tracing::error!("{line}"),
                Level::WARN => tracing::warn!("{line}"),
                Level::INFO => tracing::info!("{line}"),
                Level::DEBUG => tracing::debug!("{line}"),
                _ => tracing::trace!("{line}"),
            },
        }
    }
}

impl Plugin for Logging {
    fn name(&self) -> &str {
        "logging"
    }
    fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        self.emit(format_args!(
            "publish topic={} bytes={} content_type={:?}",
            Printable(&msg.topic),
            msg.payload.len(),
            msg.content_type
        ));
        Ok(())
    }
    fn on_message(&self, msg: &mut Received) -> Verdict {
        self.emit(format_args!(
            "message topic={} bytes={} seq={} signed={} content_type={:?}",
            Printable(&msg.topic),
            msg.payload.len(),
            msg.seq,
            msg.sender.is_some(),
            msg.content_type
        ));
        Verdict::Deliver
    }
    fn on_subscribe(&self, filter: &TopicFilter) -> Result<(), PluginError> {
        self.emit(format_args!("subscribe filter={}", Printable(filter)));
        Ok(())
    }
}

/// One type per topic, for every publish and message of a client: topics matching a rule
/// must carry its type tag (see [`crate::TypeTag`]). A publish of anything else is refused
/// (`PublishError::Plugin`); a message of anything else is dropped (counted here in
/// [`TypeEnforcement::refused`] and in `ClientStats::plugin_drops`), never delivered. The
/// first matching rule wins. Unlike `topic::<T>()`, it also covers the untyped
/// `publish_bytes` and subscriptions of every kind.
#[derive(Debug, Default, Clone)]
pub struct TypeEnforcement {
    rules: Arc<Vec<(TopicFilter, String)>>,
    refused: Arc<AtomicU64>,
}

impl TypeEnforcement {
    /// No rules yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Topics matching `filter` carry `T`.
    pub fn topic<T: crate::TypeTag>(
        self,
        filter: &str,
    ) -> Result<Self, whispeer_protocol::TopicError> {
        self.tag(filter, T::TAG)
    }
    /// Topics matching `filter` carry the type tagged `tag` (as JS declares it).
    pub fn tag(mut self, filter: &str, tag: &str) -> Result<Self, whispeer_protocol::TopicError> {
        let f = TopicFilter::new(filter)?;
        Arc::make_mut(&mut self.rules).push((f, tag.to_owned()));
        Ok(self)
    }
    /// Messages dropped because they carried another type.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    fn expected(&self, topic: &Topic) -> Option<&str> {
        self.rules
            .iter()
            .find(|(f, _)| f.matches(topic))
            .map(|(_, t)| t.as_str())
    }
}

impl Plugin for TypeEnforcement {
    fn name(&self) -> &str {
        "type-enforcement"
    }
    fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        match self.expected(&msg.topic) {
            Some(tag) if crate::tag::tag_of(&msg.content_type) != Some(tag) => {
                Err(PluginError::new(
                    self.name(),
                    format!(
                        "topic {} carries type {tag:?}, not {:?}",
                        msg.topic, msg.content_type
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
    fn on_message(&self, msg: &mut Received) -> Verdict {
        match self.expected(&msg.topic) {
            Some(tag) if crate::tag::tag_of(&msg.content_type) != Some(tag) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    topic = %Printable(&msg.topic),
                    expected = tag,
                    found = %Printable(&msg.content_type),
                    "type mismatch; dropping message"
                );
                Verdict::Drop
            }
            _ => Verdict::Deliver,
        }
    }
}

/// Counts publishes, messages, subscriptions and plaintext bytes. Clone it before adding
/// it to a builder and read the counters with [`Metrics::snapshot`].
#[derive(Debug, Default, Clone)]
pub struct Metrics(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    published_bytes: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    subscriptions: AtomicU64,
}

/// A reading of [`Metrics`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Messages published (before sealing).
    pub published: u64,
    /// Plaintext payload bytes published.
    pub published_bytes: u64,
    /// Messages received (opened and verified).
    pub received: u64,
    /// Plaintext payload bytes received.
    pub received_bytes: u64,
    /// Subscriptions made.
    pub subscriptions: u64,
}

impl Metrics {
    /// New counters at zero.
    pub fn new() -> Self {
        Self::default()
    }
    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let c = &self.0;
        MetricsSnapshot {
            published: c.published.load(Ordering::Relaxed),
            published_bytes: c.published_bytes.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            received_bytes: c.received_bytes.load(Ordering::Relaxed),
            subscriptions: c.subscriptions.load(Ordering::Relaxed),
        }
    }
}

impl Plugin for Metrics {
    fn name(&self) -> &str {
        "metrics"
    }
    fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        self.0.published.fetch_add(1, Ordering::Relaxed);
        self.0
            .published_bytes
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn on_message(&self, msg: &mut Received) -> Verdict {
        self.0.received.fetch_add(1, Ordering::Relaxed);
        self.0
            .received_bytes
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        Verdict::Deliver
    }
    fn on_subscribe(&self, _filter: &TopicFilter) -> Result<(), PluginError> {
        self.0.subscriptions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

type MapFn = dyn Fn(&Topic, &str, Vec<u8>) -> Result<Vec<u8>, String> + Send + Sync;

/// The example transform: a pair of payload functions, one applied before sealing and its
/// inverse after opening, for messages of one content type. Typical uses: an
/// application-level schema version wrapper, field redaction, or a custom codec. A failed
/// outgoing map refuses the publish; a failed incoming map drops the message.
pub struct Transform {
    name: String,
    content_type: String,
    outgoing: Box<MapFn>,
    incoming: Box<MapFn>,
}

impl fmt::Debug for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transform")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

impl Transform {
    /// A transform of payloads with `content_type` (e.g. `application/cbor`).
    pub fn new<O, I>(name: &str, content_type: &str, outgoing: O, incoming: I) -> Self
    where
        O: Fn(&Topic, &str, Vec<u8>) -> Result<Vec<u8>, String> + Send + Sync + 'static,
        I: Fn(&Topic, &str, Vec<u8>) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        Transform {
            name: name.to_owned(),
            content_type: content_type.to_owned(),
            outgoing: Box::new(outgoing),
            incoming: Box::new(incoming),
        }
    }
}

impl Plugin for Transform {
    fn name(&self) -> &str {
        &self.name
    }
    fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        if msg.content_type != self.content_type {
            return Ok(());
        }
        let p = std::mem::take(&mut msg.payload);
        msg.payload = (self.outgoing)(&msg.topic, &msg.content_type, p)
            .map_err(|e| PluginError::new(&self.name, e))?;
        Ok(())
    }
    fn on_message(&self, msg: &mut Received) -> Verdict {
        if msg.content_type != self.content_type {
            return Verdict::Deliver;
        }
        match (self.incoming)(&msg.topic, &msg.content_type, msg.payload.to_vec()) {
            Ok(p) => {
                msg.payload = p.into();
                Verdict::Deliver
            }
            Err(e) => {
                tracing::warn!(
                    plugin = %self.name,
                    topic = %Printable(&msg.topic),
                    error = %Printable(&e),
                    "transform failed; dropping message"
                );
                Verdict::Drop
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_run_in_order_and_refusals_stop_the_chain() {
        let mut ps = Plugins::default();
        let m = Metrics::new();
        ps.push(Arc::new(m.clone()));
        ps.push(Arc::new(Transform::new(
            "rev",
            "text/plain",
            |_, _, mut p| {
                p.reverse();
                Ok(p)
            },
            |_, _, p| {
                if p.is_empty() {
                    Err("empty".into())
                } else {
                    Ok(p.into_iter().rev().collect())
                }
            },
        )));
        let topic = Topic::new("a/b").unwrap();
        let mut out = Outgoing {
            topic: topic.clone(),
            content_type: "text/plain".into(),
            payload: b"abc".to_vec(),
        };
        ps.on_publish(&mut out).unwrap();
        assert_eq!(out.payload, b"cba");
        let mut other = Outgoing {
            content_type: "application/cbor".into(),
            ..out.clone()
        };
        ps.on_publish(&mut other).unwrap();
        assert_eq!(other.payload, b"cba", "other content types pass untouched");
        assert_eq!(m.snapshot().published, 2);
        assert_eq!(m.snapshot().published_bytes, 6);

        let mut r = Received {
            topic,
            sender: None,
            msg_id: whispeer_protocol::MessageId([0; 16]),
            ts_ms: 0,
            seq: 1,
            content_type: "text/plain".into(),
            payload: bytes::Bytes::from_static(b"cba"),
            retained: false,
            tree_id: whispeer_protocol::TreeId([0; 16]),
            epoch: 0,
            provenance: whispeer_protocol::Provenance::AdminSigned,
        };
        assert_eq!(ps.on_message(&mut r), Verdict::Deliver);
        assert_eq!(&r.payload[..], b"abc");
        r.payload = bytes::Bytes::new();
        assert_eq!(ps.on_message(&mut r), Verdict::Drop);
        assert_eq!(m.snapshot().received, 2);
    }
}
