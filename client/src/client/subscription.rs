//! [`Subscription`]: a stream of typed messages over the driver's per-subscription channel.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::shared::{Command, Item, Message};
use crate::core::connection::AckToken;
use crate::core::{self, LocalSubId, Received};
use crate::error::{DeleteError, ReceiveError};
use crate::tag::{self, TypeTag};

/// A stream of typed messages; unsubscribes when dropped.
pub struct Subscription<T> {
    pub(super) rx: mpsc::UnboundedReceiver<Item>,
    /// Messages lost while the subscription had no credit (reported before the next message).
    pub(super) lag: Arc<AtomicU64>,
    /// The relay ended it: what is still buffered is skipped up to [`Item::Ended`].
    pub(super) ended: Arc<AtomicBool>,
    pub(super) id: LocalSubId,
    pub(super) cmd: mpsc::UnboundedSender<Command>,
    pub(super) decode: Decode<T>,
    /// The client's count of `ReceiveError::TypeMismatch`.
    pub(super) mismatches: Arc<AtomicU64>,
    pub(super) _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

impl<T> Subscription<T> {
    /// Ends this durable subscription and deletes its durable at the relay — its name,
    /// position and owner — so the name no longer counts against the relay's durable quota
    /// (PROTOCOL §3.3.4, `Unsub.delete`). Resolves once the relay has processed it.
    ///
    /// Refused without sending anything (the subscription goes on) when it is not durable
    /// ([`DeleteError::NotDurable`]), when the client is not connected
    /// ([`DeleteError::Disconnected`]) or when the relay does not grant `DURABLE_DELETE`
    /// ([`DeleteError::Unsupported`]: an older relay would keep the durable). A relay
    /// refusal is [`DeleteError::Rejected`]; once sent, the subscription ends either way
    /// (its stream then ends: `None`).
    pub async fn delete_durable(&mut self) -> Result<(), DeleteError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.cmd
            .send(Command::DeleteDurable { id: self.id, done })
            .map_err(|_| DeleteError::Closed)?;
        rx.await.map_err(|_| DeleteError::Closed)?
    }

    /// The next message, or `None` once the client is closed. At most once, a
    /// `ReceiveError::Lagged(n)` says `n` messages were lost here; the stream goes on.
    ///
    /// The message is taken (and, at least once, acknowledged) as it is handed over: use
    /// [`Subscription::next_message_unacked`] to acknowledge it only once it was handled.
    pub async fn next_message(&mut self) -> Option<Result<Message<T>, ReceiveError>> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The next message, not acknowledged yet: [`Unacked::ack`] takes it once the app has
    /// handled it (written it out, stored it...) — only then is its credit returned and,
    /// on an at-least-once (QoS ≥ 1) or durable subscription, its relay sequence
    /// acknowledged and, with QoS 2 or [`Persistence`](crate::Persistence), its dedup
    /// entry recorded. `None` once the client is closed; errors as
    /// [`Subscription::next_message`] (a message that could not be decoded is taken and
    /// acknowledged as it is reported: nothing could handle it later).
    ///
    /// An [`Unacked`] dropped without [`Unacked::ack`] sends nothing: the message stays
    /// delivered and untaken, and is never acknowledged. While this subscription lives it
    /// is not handed over again (copies the relay sends again are passed as duplicates of
    /// the untaken one); it keeps one message of the subscription's credit, and the acks
    /// of the messages after it on this subscription wait behind it (acks leave in relay
    /// order). Once the [`Subscription`] is dropped (or the client closed), what it never
    /// took is released: a durable subscription gets it again from the relay when it is
    /// resumed — by this client subscribing again with the same name, or by the next run
    /// of the program after this one failed to handle it. At most once (QoS 0) nothing
    /// delivers it again.
    ///
    /// ```no_run
    /// # async fn demo(client: whispeer::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::io::Write;
    /// use whispeer::protocol::Qos;
    /// use whispeer::SubscribeOptions;
    /// let opts = SubscribeOptions::new()
    ///     .qos(Qos::AtLeastOnce)
    ///     .durable("jobs");
    /// let mut sub = client.subscribe_bytes_with_options("jobs/#", opts).await?;
    /// let mut out = std::io::stdout().lock();
    /// while let Some(next) = sub.next_message_unacked().await {
    ///     let Ok(msg) = next else { continue }; // lost or undecodable: reported, taken
    ///     // Not written (a closed pipe, a full disk): not acknowledged, so the next run
    ///     // that resumes the durable "jobs" gets it again.
    ///     out.write_all(&msg.value)?;
    ///     out.flush()?;
    ///     msg.ack();
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next_message_unacked(&mut self) -> Option<Result<Unacked<T>, ReceiveError>> {
        let next = std::future::poll_fn(|cx| self.poll_taken(cx, false)).await?;
        Some(next.map(|(message, token)| Unacked {
            message,
            token,
            cmd: self.cmd.clone(),
        }))
    }

    fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message<T>, ReceiveError>>> {
        self.poll_taken(cx, true)
            .map(|next| next.map(|r| r.map(|(m, _)| m)))
    }

    /// The next message and its token; `ack_now`: taken (the token sent) at once.
    fn poll_taken(&mut self, cx: &mut Context<'_>, ack_now: bool) -> Poll<Option<Taken<T>>> {
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
            if self.ended.load(Ordering::Acquire) && !matches!(item, Item::Ended(_)) {
                // Released by the engine when the relay ended the subscription: the
                // relay delivers it again on the durable's next resume.
                continue;
            }
            return Poll::Ready(Some(match item {
                Item::Msg(r, token) => {
                    let m = to_message(r, self.decode);
                    if let Err(ReceiveError::TypeMismatch { .. }) = &m {
                        self.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    if ack_now || m.is_err() {
                        // Taken: the credit goes back (and, at least once, the ack may
                        // leave). An undecodable one is taken as it is reported.
                        let _ = self.cmd.send(Command::Ack(token));
                    }
                    m.map(|m| (m, token))
                }
                Item::Lagged(n) => match n.saturating_add(self.lag.swap(0, Ordering::AcqRel)) {
                    // A wake-up whose loss was already reported.
                    0 => continue,
                    lost => Err(ReceiveError::Lagged(lost)),
                },
                Item::Hidden(token) => {
                    let _ = self.cmd.send(Command::Ack(token));
                    continue;
                }
                Item::Ended(why) => Err(why),
            }));
        }
    }
}

/// A message handed over with the token that takes it (or why there is none).
type Taken<T> = Result<(Message<T>, AckToken), ReceiveError>;

/// A message taken with [`Subscription::next_message_unacked`] and not acknowledged yet:
/// [`Unacked::ack`] acknowledges it; dropped without, nothing is sent and it is never
/// acknowledged — a durable subscription gets it again when resumed (see
/// [`Subscription::next_message_unacked`]). Derefs to the [`Message`].
#[must_use = "dropped without `ack`, the message is not acknowledged"]
pub struct Unacked<T> {
    message: Message<T>,
    token: AckToken,
    cmd: mpsc::UnboundedSender<Command>,
}

impl<T> Unacked<T> {
    /// The message.
    pub fn message(&self) -> &Message<T> {
        &self.message
    }

    /// Takes the message: its credit goes back and, at least once, its ack may leave (in
    /// relay order, as [`Subscription::next_message`]'s do). Returns the message. Does
    /// nothing more once the client is closed.
    pub fn ack(self) -> Message<T> {
        let _ = self.cmd.send(Command::Ack(self.token));
        self.message
    }
}

impl<T> std::ops::Deref for Unacked<T> {
    type Target = Message<T>;
    fn deref(&self) -> &Message<T> {
        &self.message
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Unacked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unacked")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// Decodes a received message into the subscriber's type. Handed the `Received` itself
/// (mutably) so a decoder may take its payload instead of copying it ([`decode_raw`]).
pub(super) type Decode<T> = fn(&mut Received) -> Result<T, ReceiveError>;

/// The app's message. When this subscription is the message's only holder (one
/// subscription matched it, no plugin memo keeps it) its topic, content type and payload
/// move into the `Message`; otherwise they are copied as before. A subscriber that only
/// looks at part of a payload then never pulls the rest into its cache, and a message
/// costs no allocation here (measured in docs/SPEED-HISTORY.md, wave 2 session 52).
fn to_message<T>(r: Arc<Received>, decode: Decode<T>) -> Result<Message<T>, ReceiveError> {
    let mut r = Arc::try_unwrap(r).unwrap_or_else(|shared| (*shared).clone());
    let value = decode(&mut r)?;
    Ok(Message {
        topic: r.topic,
        sender: r.sender,
        id: r.msg_id,
        timestamp_ms: r.ts_ms,
        seq: r.seq,
        retained: r.retained,
        content_type: r.content_type,
        tree_id: r.tree_id,
        epoch: r.epoch,
        provenance: r.provenance,
        value,
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

pub(super) fn decode_cbor<T: DeserializeOwned>(r: &mut Received) -> Result<T, ReceiveError> {
    if !tag::is_cbor(&r.content_type) {
        return Err(ReceiveError::ContentType {
            expected: core::CBOR,
            found: r.content_type.clone(),
        });
    }
    cbor_value(r)
}

/// A typed topic's decoder: only messages tagged with `T::TAG`; anything else (another
/// tag, untagged CBOR, other content) is a `TypeMismatch`, never decoded.
pub(super) fn decode_typed<T: DeserializeOwned + TypeTag>(
    r: &mut Received,
) -> Result<T, ReceiveError> {
    if tag::tag_of(&r.content_type) != Some(T::TAG) {
        return Err(ReceiveError::TypeMismatch {
            topic: r.topic.to_string(),
            expected: T::TAG,
            found: r.content_type.clone(),
        });
    }
    cbor_value(r)
}

fn cbor_value<T: DeserializeOwned>(r: &Received) -> Result<T, ReceiveError> {
    ciborium::from_reader(&r.payload[..]).map_err(|e| ReceiveError::Decode {
        topic: r.topic.to_string(),
        reason: e.to_string(),
        source: Some(std::sync::Arc::new(e)),
    })
}

/// The payload as it came: taken out of the `Received` (no copy when nothing else holds
/// its bytes; `Vec::from(Bytes)` copies only a shared buffer).
pub(super) fn decode_raw(r: &mut Received) -> Result<Vec<u8>, ReceiveError> {
    Ok(Vec::from(std::mem::take(&mut r.payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use whispeer_protocol::{MessageId, Provenance, Topic, TreeId};

    fn received(payload: &[u8]) -> Received {
        // The opened body as an open job hands it over: a vector longer than the payload
        // was cut to it (capacity beyond its length).
        let mut body = Vec::with_capacity(payload.len() + 64);
        body.extend_from_slice(payload);
        Received {
            topic: Topic::new("t/x").unwrap(),
            sender: None,
            msg_id: MessageId([7; 16]),
            ts_ms: 1,
            seq: 1,
            content_type: "application/octet-stream".into(),
            payload: Bytes::from(body),
            retained: false,
            tree_id: TreeId([1; 16]),
            epoch: 0,
            provenance: Provenance::AdminSigned,
        }
    }

    /// Held by one subscription only, a message's payload is handed over, not copied (its
    /// bytes stay where the open left them); shared by two, each gets its own copy.
    #[test]
    fn a_payload_only_one_subscription_holds_moves_into_the_message() {
        let r = Arc::new(received(&[5; 1024]));
        let at = r.payload.as_ptr();
        let m = to_message(r, decode_raw).expect("decodes");
        assert_eq!(m.value, vec![5; 1024]);
        assert_eq!(m.value.as_ptr(), at, "moved, not copied");
        assert_eq!(m.topic.as_str(), "t/x");

        let r = Arc::new(received(&[6; 1024]));
        let other = r.clone();
        let m = to_message(r, decode_raw).expect("decodes");
        assert_eq!(m.value, vec![6; 1024]);
        assert_ne!(m.value.as_ptr(), other.payload.as_ptr(), "shared: copied");
        assert_eq!(
            &other.payload[..],
            &[6; 1024][..],
            "the other holder keeps it"
        );
    }
}
