//! What the handle, its subscriptions and the driver task share: the commands the handle
//! sends, the items a subscription receives, the state and counters the driver publishes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use whispeer_protocol::{
    Envelope, Identity, Keyring, MessageId, Qos, SenderId, Topic, TopicFilter,
};

use crate::core::connection::{AckToken, PubOptions};
use crate::core::{CoreStats, LocalSubId, Received, SealPolicy, SubscribeOptions};
use crate::error::{FlushError, PublishError, ReceiveError, SubscribeError};
use crate::plugin::Plugins;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The connection's state, observable with [`crate::Client::state_changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected and handshaken.
    Connected,
    /// Lost; trying again (attempt number, from 1).
    Reconnecting(u32),
    /// Closed by [`crate::Client::close`] or after the reconnect policy gave up.
    Closed,
}

/// Options of one publish: [`PublishOptions::default`] (at most once, no ack), or
/// [`PublishOptions::at_least_once`] / [`PublishOptions::exactly_once`], refined with the
/// builder methods.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
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
    /// With this QoS (QoS ≥ 1 implies waiting for the `PubAck`).
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }
    /// Waits for the relay's `PubAck` (and returns its sequence) even at QoS 0.
    pub fn ack(mut self) -> Self {
        self.ack = true;
        self
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
    /// What the engine needs to know.
    pub(crate) fn engine(&self) -> PubOptions {
        PubOptions::new()
            .qos(self.qos)
            .retain(self.retain)
            .ack(self.ack)
    }
    /// Whether the publish waits for the relay's `PubAck`.
    pub(crate) fn waits(&self) -> bool {
        self.ack || self.qos != Qos::AtMostOnce
    }
}

/// A message delivered to a subscription.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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

/// Counters of a client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// From the core: delivered, rejected (could not open), duplicates, relay gaps.
    pub core: CoreStats,
    /// Messages dropped because a subscription's buffer was full (the app is too slow): at
    /// most once, or an unnumbered message (live-only with the cluster's JetStream store,
    /// which nothing sends again) for any subscription.
    pub slow_subscriber_drops: u64,
    /// QoS 0 publishes (without [`PublishOptions::ack`]) dropped without being sent:
    /// the reconnect buffer was full, the publish is over the relay's `max_frame`, or the
    /// client closed before sending it. Their `publish` had returned `Ok`; each is logged.
    pub outbox_drops: u64,
    /// QoS 0 publishes (without [`PublishOptions::ack`]) the relay refused (a non-fatal
    /// `Err` naming no request: rights, a plugin, a full store...). Their `publish` had
    /// returned `Ok`; each is logged (ten a minute at warn, the rest at debug).
    pub publish_refusals: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Messages a client plugin dropped.
    pub plugin_drops: u64,
    /// QoS ≥ 1 publishes waiting for the relay's `PubAck` (re-sent after a reconnect).
    /// With [`Persistence`](crate::Persistence) each is in the saved outbox before it
    /// counts here.
    pub unacked_publishes: u64,
    /// QoS ≥ 1 publishes still waiting for their batch-signing seal job (not yet kept nor
    /// saved); each moves to `unacked_publishes` once sealed.
    pub sealing_publishes: u64,
    /// Re-sends of QoS ≥ 1 publishes the relay refused with a retryable code (`busy`,
    /// `storage_full`...), after a backoff, with the same publish id.
    pub publish_retries: u64,
    /// Messages a typed subscription refused because they carry another type (or none):
    /// `ReceiveError::TypeMismatch`, never given to a callback.
    pub type_mismatches: u64,
    /// Publishes their batch-signing seal job could not seal (never sent; a publish that
    /// waits for its `PubAck` fails with `PublishError::Seal`).
    pub seal_failures: u64,
    /// Saved kept publishes skipped at start and never sent (with
    /// [`Persistence`](crate::Persistence)): not a QoS ≥ 1 `Pub` frame of the publish id
    /// they were saved under — a tampered or corrupt state file.
    pub restore_refused: u64,
    /// State file writes that failed (with [`Persistence`](crate::Persistence)): a full
    /// disk, another process holding the file's lock past the 5 s wait. Each is logged at
    /// error; what it held is kept in memory and written with the next write (tried again
    /// after 100 ms, doubling to 5 s), and acks wait for it meanwhile. Every failed try
    /// counts; a count that keeps growing means the file cannot be written.
    pub state_write_failures: u64,
}

/// What a subscription's channel holds.
#[derive(Debug)]
pub(crate) enum Item {
    /// A message and the token that returns its credit (and acks it, at least once).
    Msg(Arc<Received>, AckToken),
    /// At most once: messages lost (relay gap or no credit) before what follows.
    Lagged(u64),
    /// At least once: an envelope routed here that the app never sees (did not open, was
    /// refused, a duplicate, dropped by a plugin, or opened for another subscription). The
    /// stream takes it silently, so its ack leaves when the app reaches it, exactly as a
    /// message's would.
    Hidden(AckToken),
    /// The relay ended this subscription (a durable refused for good on a resume): the
    /// stream yields this error, then ends. Messages still buffered before it are not
    /// yielded: the engine released them when the relay ended the subscription (never
    /// acked, not remembered as seen), so the relay delivers them again when the durable
    /// is resumed — taken now, they would come twice.
    Ended(ReceiveError),
}

/// Where the relay's `PubAck` (its sequence number) for one publish is reported.
pub(crate) type AckReply = oneshot::Sender<Result<u64, PublishError>>;
/// Where a subscription learns that the relay confirmed it.
pub(crate) type SubReady = oneshot::Sender<Result<(), SubscribeError>>;
/// Where a flush learns its outcome.
pub(crate) type FlushReply = oneshot::Sender<Result<(), FlushError>>;

/// A publish on its way to the driver: a sealed envelope, or one prepared for the batch
/// signature; `reply` when the publish waits for its `PubAck`; `reserved`: its bytes in the
/// [`Backlog`], released once the driver has written it.
pub(crate) struct PublishReq {
    pub(crate) envelope: Outbound,
    pub(crate) opts: PubOptions,
    pub(crate) reply: Option<AckReply>,
    pub(crate) reserved: usize,
}

/// The publish queue in front of the engine: a publish appends here (no channel round trip
/// and no driver wake per message) and wakes the driver only when the queue goes from empty
/// to non-empty or fills a batch; the driver takes everything queued at once and hands it
/// to the engine in order. Bounded by the [`Backlog`] (a publish reserves first).
#[derive(Debug)]
pub(crate) struct Inbox {
    q: std::sync::Mutex<InboxState>,
    wake: Notify,
    /// Wake the driver every this many queued publishes (a batch).
    batch: usize,
}

#[derive(Debug, Default)]
struct InboxState {
    items: Vec<PublishReq>,
    closed: bool,
}

impl Inbox {
    pub(crate) fn new(batch: usize) -> Self {
        Inbox {
            q: Default::default(),
            wake: Notify::new(),
            batch: batch.max(1),
        }
    }

    /// Queues a publish; gives it back once the driver is gone.
    pub(crate) fn push(&self, r: PublishReq) -> Result<(), PublishReq> {
        let n = {
            let mut q = self.q.lock().unwrap_or_else(|p| p.into_inner());
            if q.closed {
                return Err(r);
            }
            q.items.push(r);
            q.items.len()
        };
        if n == 1 || n % self.batch == 0 {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves everything queued into `into` (in publish order).
    pub(crate) fn take(&self, into: &mut Vec<PublishReq>) {
        let mut q = self.q.lock().unwrap_or_else(|p| p.into_inner());
        if into.is_empty() {
            std::mem::swap(&mut q.items, into);
        } else {
            into.append(&mut q.items);
        }
    }

    /// Resolves once a publish was queued since the last wake (maybe already taken).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// The driver stopped: later pushes fail; returns what was still queued.
    pub(crate) fn close(&self) -> Vec<PublishReq> {
        let mut q = self.q.lock().unwrap_or_else(|p| p.into_inner());
        q.closed = true;
        std::mem::take(&mut q.items)
    }
}

impl std::fmt::Debug for PublishReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishReq")
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

/// What the handle asks of the driver task (publishes go through the [`Inbox`]).
pub(crate) enum Command {
    /// The app took a delivered message.
    Ack(AckToken),
    Subscribe {
        id: LocalSubId,
        filter: TopicFilter,
        opts: SubscribeOptions,
        tx: mpsc::UnboundedSender<Item>,
        lag: Arc<AtomicU64>,
        /// Set by the driver when the relay ends the subscription (see [`Item::Ended`]).
        ended: Arc<std::sync::atomic::AtomicBool>,
        ready: SubReady,
    },
    Unsubscribe {
        id: LocalSubId,
    },
    /// End a durable subscription and delete its durable at the relay.
    DeleteDurable {
        id: LocalSubId,
        done: oneshot::Sender<Result<(), crate::error::DeleteError>>,
    },
    /// Keys changed: re-make every subscription.
    Resubscribe,
    Flush(FlushReply),
    Close(oneshot::Sender<()>),
}

/// A publish on its way to the driver.
pub(crate) enum Outbound {
    /// Sealed whole (unsigned or signed alone) in the publishing task.
    Sealed(Envelope),
    /// Prepared in the publishing task; the driver signs it with the rest of its batch and
    /// seals it ([`crate::core::batching`]).
    Prepared(Box<whispeer_protocol::Prepared>),
}

impl Outbound {
    /// The bytes it will take on the wire, near enough for backpressure.
    pub(crate) fn wire_len(&self) -> usize {
        match self {
            Outbound::Sealed(e) => e.as_bytes().len(),
            Outbound::Prepared(p) => crate::core::batching::prepared_weight(p),
        }
    }
}

/// What every clone of a [`crate::Client`] shares.
pub(crate) struct Inner {
    pub(crate) cmd: mpsc::UnboundedSender<Command>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) keyring: Arc<RwLock<Keyring>>,
    pub(crate) identity: Option<Identity>,
    pub(crate) policy: SealPolicy,
    pub(crate) state: watch::Receiver<ConnectionState>,
    /// The URL of the relay in use (or being tried first).
    pub(crate) relay: watch::Receiver<String>,
    pub(crate) stats: watch::Receiver<ClientStats>,
    pub(crate) next_id: std::sync::atomic::AtomicU64,
    pub(crate) plugins: Plugins,
    pub(crate) backlog: Arc<Backlog>,
    /// Typed topics (`Client::topic`): topic → (tag, Rust type name).
    pub(crate) types: TypedTopics,
    /// Messages typed subscriptions refused as another type.
    pub(crate) type_mismatches: Arc<std::sync::atomic::AtomicU64>,
    /// How long `close` waits for its flush (the connect timeout): a relay that keeps
    /// sending but never answers the flush's `Ping` stays alive (any frame counts as a
    /// heartbeat), and `close` must end anyway.
    pub(crate) close_flush: std::time::Duration,
}

/// Publish backpressure: the bytes of publishes handed to the driver and not yet written
/// to the socket (or put in the engine's offline or outbox buffers, which have their own
/// caps and fail with `BufferFull`). `publish` waits while they are at the high-water mark
/// ([`crate::ClientBuilder::publish_buffer`]), so a tight publish loop runs at the speed of
/// the link instead of queueing without limit; nothing is dropped. The backlog never holds
/// more than the mark plus one message.
#[derive(Debug)]
pub(crate) struct Backlog {
    bytes: AtomicUsize,
    high_water: usize,
    drained: Notify,
}

impl Backlog {
    pub(crate) fn new(high_water: usize) -> Self {
        Backlog {
            bytes: AtomicUsize::new(0),
            high_water: high_water.max(1),
            drained: Notify::new(),
        }
    }

    /// Bytes handed to the driver and not yet written.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Takes `n` bytes once the backlog is under the high-water mark (a message larger than
    /// the mark goes when it is). False, without taking anything, once `closed()` says the
    /// driver is gone.
    pub(crate) async fn reserve(&self, n: usize, closed: impl Fn() -> bool) -> bool {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the check: a release between the check and the wait wakes it.
            drained.as_mut().enable();
            let mut cur = self.bytes.load(Ordering::Acquire);
            while cur < self.high_water {
                match self.bytes.compare_exchange_weak(
                    cur,
                    cur + n,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return true,
                    Err(now) => cur = now,
                }
            }
            if closed() {
                return false;
            }
            drained.await;
        }
    }

    /// `n` reserved bytes were written (or will never be): waiting publishers go on.
    pub(crate) fn release(&self, n: usize) {
        if n > 0 {
            self.bytes.fetch_sub(n, Ordering::AcqRel);
            self.drained.notify_waiters();
        }
    }

    /// The driver stopped: waiting publishers wake and find the client closed.
    pub(crate) fn close(&self) {
        self.drained.notify_waiters();
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

/// The typed topics of a client (`Client::topic`): topic → (tag, Rust type name). Every
/// publish asks it; until a topic is typed the answer is one atomic load, not a lock and a
/// hash of the topic.
#[derive(Debug, Default)]
pub(crate) struct TypedTopics {
    any: std::sync::atomic::AtomicBool,
    map: std::sync::Mutex<std::collections::HashMap<String, (&'static str, &'static str)>>,
}

impl TypedTopics {
    /// `topic`'s tag and Rust type name, if it is typed.
    pub(crate) fn get(&self, topic: &str) -> Option<(&'static str, &'static str)> {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(topic).copied()
    }

    /// Types `topic` as `(tag, name)` unless it carries another tag already (that tag).
    pub(crate) fn register(
        &self,
        topic: &str,
        tag: &'static str,
        name: &'static str,
    ) -> Result<(), &'static str> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(topic) {
            Some((t, _)) if *t != tag => Err(t),
            _ => {
                map.insert(topic.to_owned(), (tag, name));
                self.any.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::Backlog;

    #[test]
    fn publishers_wait_at_the_high_water_mark_until_bytes_are_written() {
        let b = Backlog::new(16);
        let open = || false;
        assert_eq!(b.reserve(10, open).now_or_never(), Some(true));
        // Under the mark: admitted, even though it ends above it.
        assert_eq!(b.reserve(10, open).now_or_never(), Some(true));
        assert_eq!(b.bytes(), 20);
        let waiting = b.reserve(10, open);
        tokio::pin!(waiting);
        assert_eq!(waiting.as_mut().now_or_never(), None, "at the mark: waits");
        b.release(3);
        assert_eq!(
            waiting.as_mut().now_or_never(),
            None,
            "17 is still at the mark"
        );
        b.release(10);
        assert_eq!(waiting.as_mut().now_or_never(), Some(true));
        assert_eq!(b.bytes(), 17);
    }

    #[test]
    fn a_waiting_publisher_learns_the_client_closed() {
        let b = Backlog::new(4);
        assert_eq!(b.reserve(8, || false).now_or_never(), Some(true));
        let closed = std::sync::atomic::AtomicBool::new(false);
        let waiting = b.reserve(1, || closed.load(std::sync::atomic::Ordering::Acquire));
        tokio::pin!(waiting);
        assert_eq!(waiting.as_mut().now_or_never(), None);
        closed.store(true, std::sync::atomic::Ordering::Release);
        b.close();
        assert_eq!(waiting.as_mut().now_or_never(), Some(false));
        assert_eq!(b.bytes(), 8, "nothing taken");
    }
}
