//! Typed topics ([`TypedTopic`]: one type per topic, enforced) and callback subscription
//! handles ([`SubscriptionHandle`]).

use std::borrow::Borrow;
use std::future::Future;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;
use whispeer_protocol::Topic;

use super::handle::Client;
use super::shared::{Message, PublishOptions};
use super::subscription::{decode_typed, Subscription};
use crate::core::SubscribeOptions;
use crate::error::{PublishError, ReceiveError, SubscribeError};
use crate::tag::{self, TypeTag};

/// A callback subscription: the callback runs on its own task until this is dropped (which
/// unsubscribes) or the client closes.
#[derive(Debug)]
#[must_use = "dropping the handle unsubscribes"]
pub struct SubscriptionHandle {
    task: JoinHandle<()>,
}

impl SubscriptionHandle {
    /// Runs `f` for every message of `sub` on a new task. Errors are logged and skipped
    /// (type mismatches are also counted, by the subscription).
    pub(crate) fn spawn<T, F>(mut sub: Subscription<T>, mut f: F) -> Self
    where
        T: Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        SubscriptionHandle {
            task: tokio::spawn(async move {
                while let Some(m) = sub.next_message().await {
                    match m {
                        Ok(m) => f(m),
                        Err(e) => skip(&e),
                    }
                }
            }),
        }
    }

    /// [`SubscriptionHandle::spawn`] with an async callback, awaited before the next message.
    pub(crate) fn spawn_async<T, F, Fut>(mut sub: Subscription<T>, mut f: F) -> Self
    where
        T: Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        SubscriptionHandle {
            task: tokio::spawn(async move {
                while let Some(m) = sub.next_message().await {
                    match m {
                        Ok(m) => f(m).await,
                        Err(e) => skip(&e),
                    }
                }
            }),
        }
    }

    /// Unsubscribes (the same as dropping it).
    pub fn unsubscribe(self) {}

    /// Whether the callback task has ended (the client closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn skip(e: &ReceiveError) {
    // The error quotes the message's topic and content type, chosen by its publisher.
    tracing::warn!(error = %crate::printable::Printable(e), "skipping message");
}

/// A topic that carries one type, `T` (tag `T::TAG`): [`TypedTopic::publish`] takes only
/// `T` and sends it tagged; its subscriptions give only `T` — a message of another type
/// (another tag, or untagged) is a `ReceiveError::TypeMismatch`, counted in
/// `ClientStats::type_mismatches` and never handed to a callback. Made by
/// [`Client::topic`] or `Broker::topic`, which also register it: an untyped publish of
/// another type on the topic is refused with `PublishError::TypeMismatch`.
pub struct TypedTopic<T> {
    client: Client,
    topic: Topic,
    content_type: String,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> std::fmt::Debug for TypedTopic<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedTopic")
            .field("topic", &self.topic.as_str())
            .field("content_type", &self.content_type)
            .finish()
    }
}

impl<T> Clone for TypedTopic<T> {
    fn clone(&self) -> Self {
        TypedTopic {
            client: self.client.clone(),
            topic: self.topic.clone(),
            content_type: self.content_type.clone(),
            _t: PhantomData,
        }
    }
}

impl<T> TypedTopic<T>
where
    T: TypeTag + Serialize + DeserializeOwned + Send + 'static,
{
    /// The topic's name.
    pub fn name(&self) -> &str {
        self.topic.as_str()
    }

    /// Publishes a `T` (by value or by reference), tagged with `T::TAG`.
    pub async fn publish(&self, value: impl Borrow<T>) -> Result<(), PublishError> {
        self.publish_with(value, PublishOptions::default())
            .await
            .map(|_| ())
    }

    /// [`TypedTopic::publish`] with options; returns the relay sequence with `ack`.
    pub async fn publish_with(
        &self,
        value: impl Borrow<T>,
        opts: PublishOptions,
    ) -> Result<u64, PublishError> {
        let payload = super::handle::to_cbor(value.borrow())?;
        self.client
            .publish_bytes_with(self.topic.as_str(), &self.content_type, &payload, opts)
            .await
    }

    /// A stream of the topic's `T`s (drop it to unsubscribe).
    pub async fn stream(&self) -> Result<Subscription<T>, SubscribeError> {
        self.stream_with_options(SubscribeOptions::default()).await
    }

    /// A stream with options (replay, durable name, QoS, retained values).
    pub async fn stream_with_options(
        &self,
        opts: SubscribeOptions,
    ) -> Result<Subscription<T>, SubscribeError> {
        self.client
            .subscribe_inner(self.topic.as_str(), opts, decode_typed::<T>)
            .await
    }

    /// Calls `f` with every `T` on the topic until the handle is dropped.
    pub async fn subscribe<F>(&self, f: F) -> Result<SubscriptionHandle, SubscribeError>
    where
        F: FnMut(Message<T>) + Send + 'static,
    {
        self.subscribe_with_options(SubscribeOptions::default(), f)
            .await
    }

    /// [`TypedTopic::subscribe`] with options (replay, durable name, QoS, retained values,
    /// and the tree: `SubscribeOptions::new().tree(id)` when two trees cover the topic).
    pub async fn subscribe_with_options<F>(
        &self,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        F: FnMut(Message<T>) + Send + 'static,
    {
        Ok(SubscriptionHandle::spawn(
            self.stream_with_options(opts).await?,
            f,
        ))
    }

    /// Like [`TypedTopic::subscribe`] with an async callback.
    pub async fn subscribe_async<F, Fut>(&self, f: F) -> Result<SubscriptionHandle, SubscribeError>
    where
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        self.subscribe_async_with_options(SubscribeOptions::default(), f)
            .await
    }

    /// [`TypedTopic::subscribe_async`] with options (see
    /// [`TypedTopic::subscribe_with_options`]).
    pub async fn subscribe_async_with_options<F, Fut>(
        &self,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        Ok(SubscriptionHandle::spawn_async(
            self.stream_with_options(opts).await?,
            f,
        ))
    }
}

impl Client {
    /// A typed topic carrying `T` only (see [`TypedTopic`]); registers it on this client,
    /// so an untyped publish of another type on it is refused. A topic registered with
    /// another tag, an invalid topic name or an unusable tag fail with a typed error.
    pub fn topic<T>(&self, topic: &str) -> Result<TypedTopic<T>, PublishError>
    where
        T: TypeTag + Serialize + DeserializeOwned + Send + 'static,
    {
        tag::check_tag(T::TAG).map_err(PublishError::TypeTag)?;
        let t = Topic::new(topic)?;
        self.register_type::<T>(topic, T::TAG)?;
        Ok(TypedTopic {
            client: self.clone(),
            topic: t,
            content_type: tag::content_type(T::TAG),
            _t: PhantomData,
        })
    }

    /// Calls `f` for every message on `filter` until the handle is dropped (unsubscribes);
    /// decode errors are logged and skipped.
    pub async fn subscribe_callback<T, F>(
        &self,
        filter: &str,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        self.subscribe_callback_with_options(filter, SubscribeOptions::default(), f)
            .await
    }

    /// [`Client::subscribe_callback`] with options (replay, durable name, QoS, retained
    /// values, and the tree: `SubscribeOptions::new().tree(id)` when keys of two trees
    /// cover `filter`, where the plain call fails with `KeyError::AmbiguousTree`).
    pub async fn subscribe_callback_with_options<T, F>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) + Send + 'static,
    {
        Ok(SubscriptionHandle::spawn(
            self.subscribe_with_options::<T>(filter, opts).await?,
            f,
        ))
    }

    /// [`Client::subscribe_callback`] with an async callback.
    pub async fn subscribe_async<T, F, Fut>(
        &self,
        filter: &str,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        self.subscribe_async_with_options(filter, SubscribeOptions::default(), f)
            .await
    }

    /// [`Client::subscribe_async`] with options (see
    /// [`Client::subscribe_callback_with_options`]).
    pub async fn subscribe_async_with_options<T, F, Fut>(
        &self,
        filter: &str,
        opts: SubscribeOptions,
        f: F,
    ) -> Result<SubscriptionHandle, SubscribeError>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Message<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        Ok(SubscriptionHandle::spawn_async(
            self.subscribe_with_options::<T>(filter, opts).await?,
            f,
        ))
    }
}
