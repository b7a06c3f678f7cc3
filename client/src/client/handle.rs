//! The [`Client`] handle: cheap to clone, seals in the caller's task (so many tasks seal in
//! parallel) and hands sealed envelopes and subscriptions to the driver task.

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use whispeer_protocol::{Grant, Sealer, SenderId, Topic, TopicFilter};

use super::shared::{
    now_ms, ClientStats, Command, ConnectionState, Inner, Message, Outbound, PublishOptions,
    PublishReq,
};
use super::subscription::{decode_cbor, decode_raw, Subscription};
use crate::core::{self, SubscribeOptions};
use crate::error::{FlushError, PublishError, SubscribeError};
use crate::plugin::Outgoing;

thread_local! {
    // One sealer per thread: keeps a zstd context for reuse without a shared lock.
    static SEALER: RefCell<Sealer> = RefCell::new(Sealer::new());
}

/// A connected client. Clone it freely: every clone shares the one connection.
#[derive(Clone, Debug)]
pub struct Client {
    pub(super) inner: Arc<Inner>,
}

/// Serializes a value as CBOR, the format every whispeer client (Rust and JS) uses.
pub fn to_cbor<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, PublishError> {
    let mut buf = Vec::with_capacity(128);
    ciborium::into_writer(value, &mut buf).map_err(PublishError::Encode)?;
    Ok(buf)
}

/// `T`'s name without leading references (`&MyData` publishes a `MyData`).
fn rust_type_name<T: ?Sized>() -> &'static str {
    std::any::type_name::<T>().trim_start_matches('&')
}

impl Client {
    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        *self.inner.state.borrow()
    }

    /// The URL of the relay of the current connection (the last one while reconnecting):
    /// with several relays ([`Relays`](crate::Relays)), the one failover moved to.
    pub fn relay_url(&self) -> String {
        self.inner.relay.borrow().clone()
    }

    /// A receiver woken when the client connects to another relay.
    pub fn relay_changes(&self) -> watch::Receiver<String> {
        self.inner.relay.clone()
    }

    /// A receiver of connection state changes.
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Bytes of publishes handed to the connection and not yet written to the socket (nor
    /// put in the offline or outbox buffers): at most the
    /// [`publish_buffer`](crate::ClientBuilder::publish_buffer) high-water mark plus one
    /// message, since `publish` waits above it.
    pub fn queued_bytes(&self) -> usize {
        self.inner.backlog.bytes()
    }

    /// Counters: delivered, rejected, duplicates, drops, reconnects.
    pub fn stats(&self) -> ClientStats {
        let mut s = self.inner.stats.borrow().clone();
        s.type_mismatches = self.inner.type_mismatches.load(Ordering::Relaxed);
        s
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
            .add_grant(grant)?;
        let _ = self.inner.cmd.send(Command::Resubscribe);
        Ok(())
    }

    /// Accepts an opened invite at run time, as `Keyring::accept_invite` does: adds its
    /// grant, then the zstd dictionaries it carries (PROTOCOL §7), and re-subscribes so
    /// existing subscriptions cover the grant. A refused grant adds nothing, nor does an
    /// ignored one (its epoch is older than every epoch held of its tree): use
    /// [`Client::accept_invite_outcome`] to learn which. Decide whether you trust
    /// `invite.inviter` first.
    pub fn accept_invite(
        &self,
        invite: &whispeer_protocol::Invite,
    ) -> Result<(), whispeer_protocol::KeyError> {
        self.accept_invite_outcome(invite).map(|_| ())
    }

    /// [`Client::accept_invite`], returning what it did: whether the grant is held
    /// ([`Accepted::is_accepted`](whispeer_protocol::Accepted::is_accepted); if not,
    /// `ignored` says why and nothing was added), its provenance, the dictionaries added and
    /// the grants it dropped.
    pub fn accept_invite_outcome(
        &self,
        invite: &whispeer_protocol::Invite,
    ) -> Result<whispeer_protocol::Accepted, whispeer_protocol::KeyError> {
        let out = self
            .inner
            .keyring
            .write()
            .expect("keyring lock")
            .accept_invite(invite)?;
        if out.is_accepted() {
            let _ = self.inner.cmd.send(Command::Resubscribe);
        }
        Ok(out)
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

    /// Seals a publish whole, or — when batch-signing — prepares it for the driver's batch.
    /// Message ids and nonces come from the thread's CSPRNG (ChaCha12 reseeded from the OS),
    /// not a `getrandom` system call per message.
    fn seal(
        &self,
        tree: Option<whispeer_protocol::TreeId>,
        topic: &Topic,
        content_type: &str,
        payload: &[u8],
    ) -> Result<Outbound, PublishError> {
        let i = &self.inner;
        SEALER.with(|s| {
            let s = &mut s.borrow_mut();
            if i.policy.batches(i.identity.as_ref()).is_some() {
                core::prepare_publish_in(
                    &i.keyring,
                    tree,
                    &i.policy,
                    s,
                    topic,
                    content_type,
                    payload,
                    now_ms(),
                    &mut rand::thread_rng(),
                )
                .map(|(p, _)| Outbound::Prepared(Box::new(p)))
            } else {
                core::seal_publish_in(
                    &i.keyring,
                    tree,
                    i.identity.as_ref(),
                    &i.policy,
                    s,
                    topic,
                    content_type,
                    payload,
                    now_ms(),
                    &mut rand::thread_rng(),
                )
                .map(|(env, _)| Outbound::Sealed(env))
            }
        })
    }

    /// Runs the plugins' `on_publish` (which may transform the message), then seals.
    fn seal_with_plugins(
        &self,
        tree: Option<whispeer_protocol::TreeId>,
        topic: Topic,
        content_type: &str,
        payload: &[u8],
    ) -> Result<Outbound, PublishError> {
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

    /// Hands a sealed envelope to the driver; waits for the `PubAck` when the publish does.
    async fn send(&self, envelope: Outbound, opts: PublishOptions) -> Result<u64, PublishError> {
        let cmd = &self.inner.cmd;
        // Backpressure: wait while the driver has a high-water mark's worth to write.
        let reserved = envelope.wire_len();
        let backlog = &self.inner.backlog;
        if !backlog.reserve(reserved, || cmd.is_closed()).await {
            return Err(PublishError::Closed);
        }
        let (reply, rx) = match opts.waits() {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let req = PublishReq {
            envelope,
            opts: opts.engine(),
            reply,
            reserved,
        };
        // Appended to the engine's queue: the driver wakes only when it was empty.
        if self.inner.inbox.push(req).is_err() {
            backlog.release(reserved);
            return Err(PublishError::Closed);
        }
        match rx {
            Some(rx) => rx.await.map_err(|_| PublishError::Closed)?,
            None => Ok(0),
        }
    }

    /// Publishes a typed value (serde → CBOR) on `topic`. Returns once the message is handed
    /// to the connection; use [`Client::flush`] or [`Client::publish_with`] (`ack`) to know
    /// the relay has it. Waits (backpressure) while the connection has more than
    /// [`ClientBuilder::publish_buffer`](crate::ClientBuilder::publish_buffer) bytes of
    /// publishes still to write, so a tight loop goes at the speed of the link.
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
        let content_type = self.content_type_for::<T>(topic)?;
        let payload = to_cbor(value)?;
        self.publish_bytes_with(topic, &content_type, &payload, opts)
            .await
    }

    /// The content type of a serde publish of `T` on `topic`: plain CBOR, or on a typed
    /// topic (`Client::topic`) its tag when `T` is its type, else `TypeMismatch`.
    fn content_type_for<T: ?Sized>(&self, topic: &str) -> Result<Cow<'static, str>, PublishError> {
        let Some((tag, name)) = self.inner.types.get(topic) else {
            return Ok(Cow::Borrowed(core::CBOR));
        };
        let given = rust_type_name::<T>();
        if given == name {
            Ok(Cow::Owned(crate::tag::content_type(tag)))
        } else {
            Err(PublishError::TypeMismatch {
                topic: topic.to_owned(),
                expected: tag.to_owned(),
                found: given.to_owned(),
            })
        }
    }

    /// On a typed topic only its tag's content type may be published.
    fn check_content_type(&self, topic: &str, content_type: &str) -> Result<(), PublishError> {
        match self.inner.types.get(topic) {
            Some((tag, _)) if crate::tag::tag_of(content_type) != Some(tag) => {
                Err(PublishError::TypeMismatch {
                    topic: topic.to_owned(),
                    expected: tag.to_owned(),
                    found: content_type.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Registers `topic` as carrying `T` (tag `tag`); another registration fails.
    pub(super) fn register_type<T: ?Sized>(
        &self,
        topic: &str,
        tag: &'static str,
    ) -> Result<(), PublishError> {
        self.inner
            .types
            .register(topic, tag, rust_type_name::<T>())
            .map_err(|t| PublishError::TypeMismatch {
                topic: topic.to_owned(),
                expected: t.to_owned(),
                found: tag.to_owned(),
            })
    }

    /// Publishes raw bytes with a content type of your choice.
    pub async fn publish_bytes(
        &self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        self.publish_bytes_with(topic, content_type, payload, PublishOptions::default())
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
        self.check_content_type(topic, content_type)?;
        let topic = Topic::new(topic)?;
        let env = self.seal_with_plugins(opts.tree, topic, content_type, payload)?;
        self.send(env, opts).await
    }

    /// Clears `topic`'s retained value: publishes a sealed, signed, empty *clear* with
    /// `RETAIN` (PROTOCOL §4.11) that replaces the value on the relay, and waits for the
    /// relay's acknowledgement (returns its sequence). Subscribers from then on get no
    /// retained value for the topic; receivers never hand a clear to the application (a
    /// live subscriber sees nothing), and its date raises their retained high-water mark,
    /// so the relay cannot bring the old value back. The relay cannot tell a clear from any
    /// other retained publish (it keeps the clear in the topic's retained slot).
    pub async fn clear_retained(&self, topic: &str) -> Result<u64, PublishError> {
        self.clear_retained_with(topic, PublishOptions::default())
            .await
    }

    /// [`Client::clear_retained`] with options (QoS, tree; `retain` and `ack` are implied).
    pub async fn clear_retained_with(
        &self,
        topic: &str,
        opts: PublishOptions,
    ) -> Result<u64, PublishError> {
        let topic = Topic::new(topic)?;
        // Not through the plugins: a transform must not turn the clear into a value, and a
        // typed topic's retained value can be cleared like any other.
        let env = self.seal(opts.tree, &topic, crate::core::CLEAR_RETAINED, &[])?;
        let opts = PublishOptions {
            retain: true,
            ack: true,
            ..opts
        };
        self.send(env, opts).await
    }

    /// Publishes many values on one topic as one write (sealed individually: each message is
    /// still opened and verified alone).
    pub async fn publish_batch<T: Serialize>(
        &self,
        topic: &str,
        values: &[T],
    ) -> Result<(), PublishError> {
        let content_type = self.content_type_for::<T>(topic)?;
        let topic = Topic::new(topic)?;
        let mut envs = Vec::with_capacity(values.len());
        for v in values {
            envs.push(self.seal_with_plugins(None, topic.clone(), &content_type, &to_cbor(v)?)?);
        }
        for env in envs {
            self.send(env, PublishOptions::default()).await?;
        }
        Ok(())
    }

    pub(super) async fn subscribe_inner<T>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        decode: super::subscription::Decode<T>,
    ) -> Result<Subscription<T>, SubscribeError> {
        let filter = TopicFilter::new(filter)?;
        self.inner.plugins.on_subscribe(&filter)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Unbounded: the engine bounds what is delivered and not taken (the credit).
        let (tx, rx) = mpsc::unbounded_channel();
        let lag = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::Subscribe {
                id,
                filter,
                opts,
                tx,
                lag: lag.clone(),
                ended: ended.clone(),
                ready: ready_tx,
            })
            .map_err(|_| SubscribeError::Closed)?;
        let sub = Subscription {
            rx,
            lag,
            ended,
            id,
            cmd: self.inner.cmd.clone(),
            decode,
            mismatches: self.inner.type_mismatches.clone(),
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
        f: F,
    ) -> Result<tokio::task::JoinHandle<()>, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        self.on_with_options(filter, SubscribeOptions::default(), f)
            .await
    }

    /// [`Client::on`] with options (replay, durable name, QoS, retained values, and the
    /// tree: `SubscribeOptions::new().tree(id)` when keys of two trees cover `filter`).
    pub async fn on_with_options<T, F>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        mut f: F,
    ) -> Result<tokio::task::JoinHandle<()>, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        let mut sub = self.subscribe_with_options::<T>(filter, opts).await?;
        Ok(tokio::spawn(async move {
            while let Some(m) = sub.next_message().await {
                match m {
                    Ok(m) => f(m),
                    Err(e) => tracing::warn!(
                        error = %crate::printable::Printable(&e),
                        "skipping message"
                    ),
                }
            }
        }))
    }

    /// Like [`Client::on`] with an async callback (awaited before the next message).
    pub async fn on_async<T, F, Fut>(
        &self,
        filter: &str,
        f: F,
    ) -> Result<tokio::task::JoinHandle<()>, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        self.on_async_with_options(filter, SubscribeOptions::default(), f)
            .await
    }

    /// [`Client::on_async`] with options (see [`Client::on_with_options`]).
    pub async fn on_async_with_options<T, F, Fut>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        mut f: F,
    ) -> Result<tokio::task::JoinHandle<()>, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut sub = self.subscribe_with_options::<T>(filter, opts).await?;
        Ok(tokio::spawn(async move {
            while let Some(m) = sub.next_message().await {
                match m {
                    Ok(m) => f(m).await,
                    Err(e) => tracing::warn!(
                        error = %crate::printable::Printable(&e),
                        "skipping message"
                    ),
                }
            }
        }))
    }

    /// Waits until the relay has processed everything sent before (a Ping/Pong round trip),
    /// the acks of what the app took included: with [`Persistence`](crate::Persistence),
    /// acks held while a failed state file write is unsaved leave first (the `Ping` waits
    /// behind them, at most 10 s).
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::Flush(tx))
            .map_err(|_| FlushError::Closed)?;
        rx.await.map_err(|_| FlushError::Closed)?
    }

    /// Flushes, says goodbye to the relay and stops the connection task. Subscriptions end.
    /// The flush waits at most the connect timeout: a relay that never answers it does not
    /// keep `close` from ending.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(self.inner.close_flush, self.flush()).await;
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}
