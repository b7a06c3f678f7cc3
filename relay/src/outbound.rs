//! The bounded outbound queue every connection has, between the router (many producers)
//! and the connection's writer task (one consumer).
//!
//! Frames are stored already encoded *with* their 4-byte length prefix: the stream writer
//! copies them as they are and WebSocket/in-process writers take `frame.slice(4..)`, so a
//! message encoded once reaches every transport without re-encoding. The writer takes the
//! whole queue at once, which is what lets it coalesce many frames into one write.
//!
//! Only `Msg` frames count against the capacity (in messages and in bytes, whichever is
//! reached first) and are subject to the slow-consumer policy; control frames (`SubOk`, `Pong`, `Err`, …) are never dropped, but a client that
//! provokes more than `capacity` of them without reading is disconnected.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use whispeer_protocol::frame::ErrFrame;
use whispeer_protocol::{codec, ErrorCode, Frame};

use crate::config::SlowConsumerPolicy;

#[derive(Debug)]
struct Item {
    frame: Bytes,
    is_msg: bool,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Item>,
    msgs: usize,
    /// Bytes of the queued `Msg` frames.
    msg_bytes: usize,
    controls: usize,
    /// Messages dropped since the writer last took a batch (becomes a `Gap` frame).
    dropped: u64,
    /// No more frames are accepted; the writer drains what is queued and closes.
    closing: bool,
}

/// Result of offering a message to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued.
    Queued,
    /// Queued after dropping the oldest queued message (policy `drop`).
    DroppedOldest,
    /// The queue was full and the connection is now being closed (policy `disconnect`).
    Disconnected,
    /// The connection is already closing; the message was not queued.
    Closed,
}

/// What the writer found when it took a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Messages dropped before this batch; the writer sends `Gap` first.
    pub(crate) dropped: u64,
    /// The queue is closing and this batch emptied it: write it, then close the transport.
    pub(crate) last: bool,
}

/// A connection's outbound queue.
#[derive(Debug)]
pub(crate) struct Outbound {
    state: Mutex<State>,
    notify: Notify,
    capacity: usize,
    max_bytes: usize,
    policy: SlowConsumerPolicy,
    closing: watch::Sender<bool>,
    /// Notified whenever the writer takes a batch (history senders wait for room).
    drained: Notify,
}

fn fatal_err(code: ErrorCode, message: &str) -> Bytes {
    codec::encode_prefixed(&Frame::Err(ErrFrame {
        code,
        message: message.into(),
        fatal: true,
        sub_id: None,
        publish_id: None,
    }))
}

impl Outbound {
    pub(crate) fn new(capacity: usize, max_bytes: usize, policy: SlowConsumerPolicy) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            capacity,
            max_bytes: max_bytes.max(1),
            policy,
            closing: watch::Sender::new(false),
            drained: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // mutation is a single push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages queued before the slow-consumer policy applies.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Offers a message frame (prefixed). Never blocks.
    pub(crate) fn offer_msg(&self, frame: &Bytes) -> Offer {
        let mut s = self.lock();
        if s.closing {
            return Offer::Closed;
        }
        let mut outcome = Offer::Queued;
        let full = |s: &State| {
            s.msgs >= self.capacity || (s.msgs > 0 && s.msg_bytes + frame.len() > self.max_bytes)
        };
        if full(&s) {
            match self.policy {
                SlowConsumerPolicy::Drop => {
                    // Drop the oldest messages until this one fits (it always fits alone).
                    while full(&s) {
                        let Some(i) = s.items.iter().position(|it| it.is_msg) else {
                            break;
                        };
                        if let Some(it) = s.items.remove(i) {
                            s.msgs -= 1;
                            s.msg_bytes -= it.frame.len();
                        }
                        s.dropped += 1;
                    }
                    outcome = Offer::DroppedOldest;
                }
                SlowConsumerPolicy::Disconnect => {
                    self.begin_close_locked(
                        &mut s,
                        Some(fatal_err(
                            ErrorCode::SlowConsumer,
                            "outbound queue full: the connection did not keep up",
                        )),
                        true,
                    );
                    return Offer::Disconnected;
                }
            }
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(Item {
            frame: frame.clone(),
            is_msg: true,
        });
        s.msgs += 1;
        s.msg_bytes += frame.len();
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
        outcome
    }

    /// Queues a history message (prefixed) regardless of the capacity: the history sender
    /// paces itself with [`wait_room`](Self::wait_room) instead of being dropped.
    pub(crate) fn push_history(&self, frame: Bytes) -> Offer {
        let mut s = self.lock();
        if s.closing {
            return Offer::Closed;
        }
        let was_empty = s.items.is_empty();
        s.msg_bytes += frame.len();
        s.items.push_back(Item {
            frame,
            is_msg: true,
        });
        s.msgs += 1;
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
        Offer::Queued
    }

    /// Waits until at most half the capacity (messages and bytes) is queued (or the queue is
    /// closing).
    pub(crate) async fn wait_room(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let s = self.lock();
                if s.closing || (s.msgs <= self.capacity / 2 && s.msg_bytes <= self.max_bytes / 2) {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Counts messages dropped elsewhere for this connection (reported with the next `Gap`).
    pub(crate) fn add_dropped(&self, n: u64) {
        let mut s = self.lock();
        s.dropped += n;
        drop(s);
        self.notify.notify_one();
    }

    /// Closes as a slow consumer: discards queued messages and queues `last`.
    pub(crate) fn close_discarding(&self, last: Bytes) {
        let mut s = self.lock();
        if !s.closing {
            self.begin_close_locked(&mut s, Some(last), true);
        }
    }

    /// Queues a control frame (prefixed). Returns `Offer::Disconnected` when the client
    /// provoked more unread control frames than the capacity, `Offer::Closed` when closing.
    pub(crate) fn push_control(&self, frame: Bytes) -> Offer {
        let mut s = self.lock();
        if s.closing {
            return Offer::Closed;
        }
        if s.controls >= self.capacity {
            self.begin_close_locked(
                &mut s,
                Some(fatal_err(
                    ErrorCode::SlowConsumer,
                    "too many unread replies: the connection did not keep up",
                )),
                true,
            );
            return Offer::Disconnected;
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(Item {
            frame,
            is_msg: false,
        });
        s.controls += 1;
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
        Offer::Queued
    }

    /// Stops accepting frames; queues `last` (if any) after what is queued, so the writer
    /// sends everything and then closes. Returns false if the queue was already closing.
    pub(crate) fn close_with(&self, last: Option<Bytes>) -> bool {
        let mut s = self.lock();
        if s.closing {
            return false;
        }
        self.begin_close_locked(&mut s, last, false);
        true
    }

    fn begin_close_locked(&self, s: &mut State, last: Option<Bytes>, discard_msgs: bool) {
        if discard_msgs {
            s.items.retain(|it| !it.is_msg);
            s.msgs = 0;
            s.msg_bytes = 0;
            s.dropped = 0;
        }
        if let Some(frame) = last {
            s.items.push_back(Item {
                frame,
                is_msg: false,
            });
        }
        s.closing = true;
        self.closing.send_replace(true);
        self.notify.notify_one();
        self.drained.notify_waiters();
    }

    /// True once closing began.
    pub(crate) fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// A receiver that turns `true` when closing begins.
    pub(crate) fn closing_signal(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Moves every queued frame into `into` (in order).
    pub(crate) fn take(&self, into: &mut Vec<Bytes>) -> Batch {
        let mut s = self.lock();
        into.extend(s.items.drain(..).map(|it| it.frame));
        s.msgs = 0;
        s.msg_bytes = 0;
        s.controls = 0;
        let dropped = std::mem::take(&mut s.dropped);
        let last = s.closing;
        drop(s);
        self.drained.notify_waiters();
        Batch { dropped, last }
    }

    /// Waits until something may have been queued (or closing began).
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Frames currently queued (for tests and status).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.lock().items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn drop_policy_drops_oldest_message_and_counts() {
        let q = Outbound::new(2, usize::MAX, SlowConsumerPolicy::Drop);
        assert_eq!(q.push_control(b(0)), Offer::Queued);
        assert_eq!(q.offer_msg(&b(1)), Offer::Queued);
        assert_eq!(q.offer_msg(&b(2)), Offer::Queued);
        assert_eq!(q.offer_msg(&b(3)), Offer::DroppedOldest);
        let mut out = Vec::new();
        let batch = q.take(&mut out);
        assert_eq!(batch.dropped, 1);
        assert!(!batch.last);
        assert_eq!(out, vec![b(0), b(2), b(3)]);
    }

    #[test]
    fn byte_bound_drops_oldest_until_the_new_message_fits() {
        let q = Outbound::new(100, 10, SlowConsumerPolicy::Drop);
        let m = |n: u8, len: usize| Bytes::from(vec![n; len]);
        assert_eq!(q.offer_msg(&m(1, 4)), Offer::Queued);
        assert_eq!(q.offer_msg(&m(2, 4)), Offer::Queued);
        assert_eq!(q.offer_msg(&m(3, 6)), Offer::DroppedOldest);
        // A message larger than the bound alone is still queued (never starved).
        assert_eq!(q.offer_msg(&m(4, 20)), Offer::DroppedOldest);
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out).dropped, 3);
        assert_eq!(out, vec![m(4, 20)]);
    }

    #[test]
    fn disconnect_policy_discards_messages_and_closes() {
        let q = Outbound::new(1, usize::MAX, SlowConsumerPolicy::Disconnect);
        q.push_control(b(0));
        q.offer_msg(&b(1));
        assert_eq!(q.offer_msg(&b(2)), Offer::Disconnected);
        assert!(q.is_closing());
        assert_eq!(q.offer_msg(&b(3)), Offer::Closed);
        let mut out = Vec::new();
        assert!(q.take(&mut out).last);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], b(0));
        let err = Frame::decode(&out[1].slice(4..)).unwrap();
        assert!(matches!(err, Frame::Err(e) if e.code == ErrorCode::SlowConsumer && e.fatal));
        assert_eq!(q.queued(), 0);
    }
}
