//! The bounded outbound queue every connection has, between the router (many producers)
//! and the connection's writer task (one consumer).
//!
//! Frames are stored already encoded *with* their 4-byte length prefix: the stream writer
//! copies them as they are and WebSocket/in-process writers take `frame.slice(4..)`, so a
//! message encoded once reaches every transport without re-encoding. The writer takes the
//! whole queue at once, which is what lets it coalesce many frames into one write.
//!
//! Only `Msg` frames count against the capacity (in messages and in bytes, whichever is
//! reached first) and are subject to the slow-consumer policy — policy `drop` drops only
//! QoS 0 messages, which give way to QoS ≥ 1 ones; a QoS ≥ 1 subscription pauses at a
//! queue full of QoS ≥ 1 messages ([`Outbound::room_for`]) and its messages wait in the
//! store; control frames (`SubOk`,
//! `Pong`, `Err`, …) are never dropped. Replies back up when a client's writer is blocked
//! (it reads nothing, or slowly): once half the capacity of them are queued and not taken
//! by the writer, the connection's reader stops reading it until the writer takes them
//! ([`Outbound::replies_backed_up`]) — the client is slowed down through TCP, not
//! disconnected. Replies the store still owes (a `PubAck` waiting for a commit,
//! [`Outbound::owe_reply`]) do not count until queued: the writer is not what holds them. A
//! connection that provokes more than `capacity` of them without reading is still
//! disconnected (the reader's pause keeps that to frames that answer many times, and
//! replies from elsewhere); owed replies, bounded by the store's own queue, are not held
//! to that cap.
//!
//! All queues share one relay-wide [`Budget`] of message bytes, counted from queueing until
//! the writer has written them (the batch a writer holds while a non-reading peer blocks
//! its socket counts too). Over the budget, a connection holding more than its fair share
//! (budget / connections with bytes queued) — the slowest consumers — gets no more QoS 0
//! messages: each one not queued is counted and reported to it in a `Gap`. Its QoS ≥ 1
//! subscriptions are never dropped from: the router pauses them as if out of credit
//! ([`Outbound::over_budget`]), their messages wait in the store, and the catch-up sends
//! them once the connection is back within its share ([`Outbound::reserve_read`]).
//!
//! History, retained-value and catch-up senders reserve room for a chunk before they read
//! it ([`Outbound::reserve_read`]): the reservation counts like queued bytes until the
//! chunk is queued, so a connection's history and catch-ups hold at most `max_bytes` and
//! one chunk however many subscriptions ask for it at once.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use whispeer_protocol::frame::ErrFrame;
use whispeer_protocol::{codec, ErrorCode, Frame};

use crate::config::SlowConsumerPolicy;

/// The relay-wide budget of queued outbound message bytes (`queue.total_max_bytes`).
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    /// Message bytes queued or being written, all connections.
    used: AtomicUsize,
    /// Connections with message bytes queued or being written.
    busy: AtomicUsize,
    /// QoS 0 messages not queued because of the budget.
    dropped: AtomicU64,
    /// QoS >= 1 subscriptions paused because of the budget (their messages wait in the
    /// store).
    paused: AtomicU64,
    /// QoS >= 1 subscriptions paused because their connection's queue was full.
    full_paused: AtomicU64,
    /// Times a connection's reader stopped reading because its replies backed up.
    reply_paused: AtomicU64,
}

impl Budget {
    /// `max` bytes for all connections together (0 = unlimited).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max: if max == 0 { usize::MAX } else { max },
            used: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            paused: AtomicU64::new(0),
            full_paused: AtomicU64::new(0),
            reply_paused: AtomicU64::new(0),
        }
    }

    /// Whether `len` more bytes on a connection holding `held` would exceed both the budget
    /// and the connection's fair share of it.
    fn refuses(&self, held: usize, len: usize) -> bool {
        if self.used.load(Relaxed).saturating_add(len) <= self.max {
            return false;
        }
        let share = self.max / self.busy.load(Relaxed).max(1);
        held > 0 && held + len > share
    }

    fn add(&self, held_before: usize, len: usize) {
        self.used.fetch_add(len, Relaxed);
        if held_before == 0 && len > 0 {
            self.busy.fetch_add(1, Relaxed);
        }
    }

    fn sub(&self, held_after: usize, len: usize) {
        if len == 0 {
            return;
        }
        self.used.fetch_sub(len, Relaxed);
        if held_after == 0 {
            self.busy.fetch_sub(1, Relaxed);
        }
    }

    /// Message bytes queued or being written, all connections.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// The budget's Prometheus lines.
    pub(crate) fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP whispeer_relay_outbound_bytes Message bytes queued for clients or being written, all connections.\n\
             # TYPE whispeer_relay_outbound_bytes gauge\n\
             whispeer_relay_outbound_bytes {}\n\
             # HELP whispeer_relay_outbound_budget_dropped_total QoS 0 messages not queued for a slow connection because the relay-wide outbound budget was exhausted (reported in a Gap).\n\
             # TYPE whispeer_relay_outbound_budget_dropped_total counter\n\
             whispeer_relay_outbound_budget_dropped_total {}\n\
             # HELP whispeer_relay_outbound_budget_pauses_total QoS >= 1 subscriptions paused because the relay-wide outbound budget was exhausted (their messages wait in the store).\n\
             # TYPE whispeer_relay_outbound_budget_pauses_total counter\n\
             whispeer_relay_outbound_budget_pauses_total {}\n\
             # HELP whispeer_relay_outbound_full_pauses_total QoS >= 1 subscriptions paused because their connection's outbound queue was full of QoS >= 1 messages (their messages wait in the store and follow in order).\n\
             # TYPE whispeer_relay_outbound_full_pauses_total counter\n\
             whispeer_relay_outbound_full_pauses_total {}\n\
             # HELP whispeer_relay_outbound_reply_pauses_total Times a connection was not read because its unread replies backed up (half of queue.capacity queued and not taken by its writer): the client is slowed down, not disconnected.\n\
             # TYPE whispeer_relay_outbound_reply_pauses_total counter\n\
             whispeer_relay_outbound_reply_pauses_total {}",
            self.used(),
            self.dropped.load(Relaxed),
            self.paused.load(Relaxed),
            self.full_paused.load(Relaxed),
            self.reply_paused.load(Relaxed)
        );
        o
    }
}

/// A queued frame that is never dropped: a control frame or a QoS >= 1 message (live,
/// history or redelivered) — the subscriber would see a `Gap` for a message it must get.
#[derive(Debug)]
struct Item {
    frame: Bytes,
    is_msg: bool,
    /// Its place in the queue's order ([`State::next`]), among the QoS 0 messages'.
    seq: u64,
}

/// The queue is two queues in one order: the frames it never drops ([`State::items`]) and
/// the QoS 0 messages policy `drop` may drop ([`State::qos0`]), each frame numbered as it
/// is queued; the writer takes both merged in that order. So the oldest QoS 0 message —
/// the one dropped for a newer one — is always at the front of its queue: dropping it is
/// O(1) however many QoS >= 1 messages are queued before it (it was a scan of the whole
/// queue and a removal from its middle, under the routing lock, for every QoS 0 message
/// offered to a queue full of QoS >= 1 ones and a few QoS 0 ones).
#[derive(Debug, Default)]
struct State {
    items: VecDeque<Item>,
    /// Queued QoS 0 messages, oldest first, with their place in the order.
    qos0: VecDeque<(u64, Bytes)>,
    /// The number the next frame queued gets.
    next: u64,
    msgs: usize,
    /// Bytes of the queued QoS 0 messages.
    droppable_bytes: usize,
    /// Bytes of the queued `Msg` frames.
    msg_bytes: usize,
    /// Bytes of `Msg` frames the writer took and has not finished writing.
    inflight: usize,
    /// Bytes of live messages the connection's gated subscriptions hold back
    /// ([`Outbound::hold_gated`]).
    gated: usize,
    /// Bytes history and retained-value senders reserved for a read, or read and not yet
    /// queued ([`Outbound::reserve_read`]).
    reading: usize,
    /// Control frames queued and not taken, but owed replies: at `capacity` of them the
    /// connection is closed ([`Outbound::push_control`]).
    controls: usize,
    /// Owed replies ([`Outbound::owe_reply`]) queued and not taken: they count towards the
    /// reader's pause, not the cap.
    acks: usize,
    /// Messages dropped since the writer last took a batch (becomes a `Gap` frame).
    dropped: u64,
    /// No more frames are accepted; the writer drains what is queued and closes.
    closing: bool,
    /// The session finished (its subscriptions and durable names given back): only then
    /// may the writer end the connection, so a client that sees it end and resumes at once
    /// finds its durable free ([`Outbound::seal`]).
    sealed: bool,
    /// Queued frames looked at to drop QoS 0 messages (tests count the work per offer).
    #[cfg(test)]
    inspected: usize,
}

/// Result of offering a message to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued.
    Queued,
    /// Queued after dropping this many of the oldest queued QoS 0 messages (policy `drop`).
    DroppedOldest(u64),
    /// Not queued (policy `drop`): the queue is full of QoS >= 1 messages, which are never
    /// dropped, and this QoS 0 one is (counted; the client gets a `Gap`); this many
    /// messages dropped in all (it, and older QoS 0 ones while the queue was over its
    /// bounds).
    Dropped(u64),
    /// The queue was full and the connection is now being closed (policy `disconnect`).
    Disconnected,
    /// The connection is already closing; the message was not queued.
    Closed,
    /// Not queued: the relay-wide budget is exhausted and this connection holds more than
    /// its share (counted; the client gets a `Gap`).
    OverBudget,
}

/// Whether a QoS >= 1 delivery may be queued ([`Outbound::room_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    Yes,
    /// The connection's queue is at its limit.
    Full,
    /// The relay-wide budget is exhausted and the connection holds more than its share.
    OverBudget,
}

/// What the writer found when it took a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Messages dropped before this batch; the writer sends `Gap` first.
    pub(crate) dropped: u64,
    /// The queue is closing and this batch emptied it: write it, then close the transport.
    pub(crate) last: bool,
    /// Message bytes in the batch: give them back with [`Outbound::written`].
    pub(crate) msg_bytes: usize,
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
    budget: Arc<Budget>,
    /// Replies queued and not taken reach half the capacity: the reader stops reading
    /// ([`replies_backed_up`](Self::replies_backed_up)); kept under the lock, read without.
    backed_up: AtomicBool,
    /// Bytes the writer has written ([`wrote`](Self::wrote)).
    progress: AtomicU64,
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

impl State {
    /// Queued QoS 0 messages (the ones policy `drop` may drop).
    fn droppables(&self) -> usize {
        self.qos0.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.qos0.is_empty()
    }

    /// Queues a frame that is never dropped.
    fn push_kept(&mut self, frame: Bytes, is_msg: bool) {
        let seq = self.next;
        self.next += 1;
        self.items.push_back(Item { frame, is_msg, seq });
    }

    fn held(&self) -> usize {
        self.queued_held() + self.reading + self.gated
    }

    /// Message bytes queued or being written, without the gates' held-back bytes: what
    /// the writer can drain. A history or catch-up sender waits on this, never on the
    /// gates — a gate empties only once its history is sent, so counting it there could
    /// wait forever.
    fn queued_held(&self) -> usize {
        self.msg_bytes + self.inflight
    }
}

impl Outbound {
    pub(crate) fn new(
        capacity: usize,
        max_bytes: usize,
        policy: SlowConsumerPolicy,
        budget: Arc<Budget>,
    ) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            capacity,
            max_bytes: max_bytes.max(1),
            policy,
            closing: watch::Sender::new(false),
            drained: Notify::new(),
            budget,
            backed_up: AtomicBool::new(false),
            progress: AtomicU64::new(0),
        }
    }

    /// Replies queued and not taken at which the reader stops reading: half the capacity.
    fn reply_pause(&self) -> usize {
        (self.capacity / 2).max(1)
    }

    /// Sets [`backed_up`](Self::backed_up) from `s`.
    fn note_replies(&self, s: &State) {
        let backed_up = !s.closing && s.controls + s.acks >= self.reply_pause();
        self.backed_up.store(backed_up, Relaxed);
    }

    /// Whether the connection's replies back up: queued ones the writer has not taken
    /// reach half the capacity. The reader then stops reading the connection (backpressure through the
    /// transport) until the writer takes them ([`wait_replies`](Self::wait_replies)): a
    /// client whose writer is blocked — it does not read, or is slow — and pipelines
    /// requests is slowed down instead of being disconnected when `capacity` replies are
    /// unread. One atomic load (the reader asks before every frame).
    pub(crate) fn replies_backed_up(&self) -> bool {
        self.backed_up.load(Relaxed)
    }

    /// Waits until the replies no longer back up (or the queue is closing).
    pub(crate) async fn wait_replies(&self) {
        self.wait_until(|s| s.closing || s.controls + s.acks < self.reply_pause())
            .await
    }

    /// The writer's progress: bytes it has written. A reader paused for replies closes the
    /// connection when this does not move for a long time (the last resort against a peer
    /// that never reads), whatever the writer waits in meanwhile. Counted per slice the
    /// writer writes (`conn::WRITE_SLICE`), not per batch: a large batch to a slow link
    /// moves it all along.
    pub(crate) fn write_progress(&self) -> u64 {
        self.progress.load(Relaxed)
    }

    /// The writer wrote `n` more bytes.
    pub(crate) fn wrote(&self, n: usize) {
        self.progress.fetch_add(n as u64, Relaxed);
    }

    /// A reply the connection will queue later (a `PubAck` once the store has the
    /// message). It does not count towards the reader's pause until it is queued: while the
    /// store holds it, the writer is not what is slow, and a reader paused for it stopped
    /// answering `Ping`s and seeing the peer's close while the store stalled. Once queued it
    /// counts like any reply, but not towards the `capacity` cap: replies owed are bounded by
    /// the store's own queue (`store.queue`, `Busy` beyond), and a stalled store answers
    /// them all at once.
    pub(crate) fn owe_reply(self: &Arc<Self>) -> Reply {
        Reply { out: self.clone() }
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

    /// Offers a message frame (prefixed). Never blocks. `droppable`: a QoS 0 delivery, which
    /// the relay-wide budget may refuse for a slow connection (counted, `Gap`).
    pub(crate) fn offer_msg(&self, frame: &Bytes, droppable: bool) -> Offer {
        let (offer, wake) = self.offer_msg_unwoken(frame, droppable);
        if wake {
            self.wake();
        }
        offer
    }

    /// [`offer_msg`](Self::offer_msg) without waking the writer; `true` when the caller
    /// must [`wake`](Self::wake) it. The router counts a delivery before the writer can
    /// send it, so `/status` never shows fewer messages out than a subscriber received.
    pub(crate) fn offer_msg_unwoken(&self, frame: &Bytes, droppable: bool) -> (Offer, bool) {
        let mut s = self.lock();
        if s.closing {
            return (Offer::Closed, false);
        }
        if droppable && self.budget.refuses(s.held(), frame.len()) {
            s.dropped += 1;
            self.budget.dropped.fetch_add(1, Relaxed);
            return (Offer::OverBudget, false);
        }
        let mut outcome = Offer::Queued;
        if self.is_full(&s, frame.len()) {
            match self.policy {
                SlowConsumerPolicy::Drop => {
                    // A QoS 0 message that would not fit even with every queued QoS 0 one
                    // gone is the one dropped: evicting them for it lost them too. Only
                    // while the queue is over its bounds without it (history is queued
                    // past them) do the oldest QoS 0 messages go.
                    let (kept_msgs, kept_bytes) = self.kept(&s);
                    let mut evicted = 0;
                    if droppable && self.full_with(kept_msgs, kept_bytes, frame.len()) {
                        while s.droppables() > 0
                            && self.over_bounds(&s)
                            && self.evict_oldest_droppable(&mut s)
                        {
                            evicted += 1;
                        }
                        s.dropped += 1;
                        return (Offer::Dropped(evicted + 1), false);
                    }
                    // Drop the oldest QoS 0 messages until this one fits (it always fits
                    // alone). QoS >= 1 messages stay: the router and redeliveries ask
                    // `room_for` first, so a QoS >= 1 one meets a queue full of them only
                    // in a race with another producer, and is queued past the bound (its
                    // subscription's unacked limits bound it).
                    while s.droppables() > 0
                        && self.is_full(&s, frame.len())
                        && self.evict_oldest_droppable(&mut s)
                    {
                        evicted += 1;
                        outcome = Offer::DroppedOldest(evicted);
                    }
                    if droppable && self.is_full(&s, frame.len()) {
                        s.dropped += 1;
                        return (Offer::Dropped(evicted + 1), false);
                    }
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
                    return (Offer::Disconnected, false);
                }
            }
        }
        let was_empty = s.is_empty();
        if droppable {
            let seq = s.next;
            s.next += 1;
            s.qos0.push_back((seq, frame.clone()));
            s.droppable_bytes += frame.len();
        } else {
            s.push_kept(frame.clone(), true);
        }
        s.msgs += 1;
        self.budget.add(s.held(), frame.len());
        s.msg_bytes += frame.len();
        (outcome, was_empty)
    }

    /// Drops the oldest queued QoS 0 message (counted for the next `Gap`); false if there
    /// was none. O(1): it is the front of [`State::qos0`].
    fn evict_oldest_droppable(&self, s: &mut State) -> bool {
        let Some((_, frame)) = s.qos0.pop_front() else {
            return false;
        };
        #[cfg(test)]
        {
            s.inspected += 1;
        }
        s.msgs -= 1;
        s.droppable_bytes -= frame.len();
        s.msg_bytes -= frame.len();
        self.budget.sub(s.held(), frame.len());
        s.dropped += 1;
        true
    }

    /// Whether the queue holds more than its bounds allow (a single message of any size
    /// is within them).
    fn over_bounds(&self, s: &State) -> bool {
        s.msgs > self.capacity || (s.msgs > 1 && s.msg_bytes > self.max_bytes)
    }

    /// Whether a message of `len` bytes meets the slow-consumer policy: `capacity` messages
    /// queued, or `max_bytes` with it (a message always fits an empty queue).
    fn is_full(&self, s: &State, len: usize) -> bool {
        self.full_with(s.msgs, s.msg_bytes, len)
    }

    /// Whether `msgs` messages of `bytes` leave no room for one of `len` bytes.
    fn full_with(&self, msgs: usize, bytes: usize, len: usize) -> bool {
        msgs >= self.capacity || (msgs > 0 && bytes + len > self.max_bytes)
    }

    /// The queued messages (count, bytes) that count against the queue for a QoS >= 1
    /// message: with policy `drop` only the ones it may not drop — queued QoS 0 messages
    /// give way to it (they are dropped to make room), so a QoS 0 flood the client cannot
    /// keep up with does not hold its QoS >= 1 subscriptions back; with `disconnect`, all.
    fn kept(&self, s: &State) -> (usize, usize) {
        match self.policy {
            SlowConsumerPolicy::Drop => (s.msgs - s.droppables(), s.msg_bytes - s.droppable_bytes),
            SlowConsumerPolicy::Disconnect => (s.msgs, s.msg_bytes),
        }
    }

    /// Whether a QoS >= 1 delivery of `len` bytes may be queued now. `Full` (policy `drop`):
    /// the queue is at its limit with messages it may not drop (the subscriber does not keep
    /// up; under `disconnect` such a delivery is offered and closes the connection, as any
    /// message at a full queue does);
    /// `OverBudget`: the relay-wide budget refuses it ([`over_budget`](Self::over_budget)).
    /// Either way the router pauses the subscription as if out of credit and its messages
    /// wait in the store; the catch-up sends them in order once the queue has room
    /// ([`wait_room`](Self::wait_room)).
    pub(crate) fn room_for(&self, len: usize) -> Room {
        if self.over_budget(len) {
            return Room::OverBudget;
        }
        if self.policy == SlowConsumerPolicy::Drop {
            let (msgs, bytes) = self.kept(&self.lock());
            if self.full_with(msgs, bytes, len) {
                return Room::Full;
            }
        }
        Room::Yes
    }

    /// Wakes the writer (after [`offer_msg_unwoken`](Self::offer_msg_unwoken) said so).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Whether a message of `len` bytes would go over the relay-wide budget while this
    /// connection holds more than its share (a QoS >= 1 delivery then waits in the store).
    pub(crate) fn over_budget(&self, len: usize) -> bool {
        // The common case, within the budget, takes no lock.
        if self.budget.used.load(Relaxed).saturating_add(len) <= self.budget.max {
            return false;
        }
        let held = self.lock().held();
        self.budget.refuses(held, len)
    }

    /// Holds `len` bytes of a gated subscription's buffer (live messages held back while
    /// its history or retained values are sent) in this connection's account: all gates of
    /// the connection together within `max_bytes` (apart from the queue) and, like queued
    /// messages, within the relay-wide budget or the connection's share of it. False when
    /// they do not fit; the first message always fits while the gates hold nothing.
    pub(crate) fn hold_gated(&self, len: usize) -> bool {
        let mut s = self.lock();
        let held = s.held();
        if s.gated > 0 && (s.gated + len > self.max_bytes || self.budget.refuses(held, len)) {
            return false;
        }
        s.gated += len;
        self.budget.add(held, len);
        true
    }

    /// Gives back `len` bytes taken by [`hold_gated`](Self::hold_gated).
    pub(crate) fn free_gated(&self, len: usize) {
        if len == 0 {
            return;
        }
        let mut s = self.lock();
        let n = len.min(s.gated);
        s.gated -= n;
        self.budget.sub(s.held(), n);
    }

    /// Counts a QoS >= 1 subscription paused by a full queue.
    pub(crate) fn count_full_pause(&self) {
        self.budget.full_paused.fetch_add(1, Relaxed);
    }

    /// Counts a reader paused because the connection's replies backed up.
    pub(crate) fn count_reply_pause(&self) {
        self.budget.reply_paused.fetch_add(1, Relaxed);
    }

    /// Closes the connection as a slow consumer whose replies went unwritten for `ms`
    /// milliseconds while its reader was paused for them (the last resort: its writer did
    /// not finish a batch in that time).
    pub(crate) fn close_unread_replies(&self, ms: u64) {
        self.close_discarding(fatal_err(
            ErrorCode::SlowConsumer,
            &format!("replies unread for {ms} ms: the connection did not keep up"),
        ));
    }

    /// Counts a QoS >= 1 subscription paused by the budget.
    pub(crate) fn count_budget_pause(&self) {
        self.budget.paused.fetch_add(1, Relaxed);
    }

    /// Appends a message frame that is never dropped (history, retained values, catch-up)
    /// and wakes the writer if the queue was empty. `released` bytes of a read reservation
    /// become the frame's: added before they leave, so the connection stays busy in the
    /// budget throughout.
    fn enqueue_msg(&self, mut s: std::sync::MutexGuard<'_, State>, frame: Bytes, released: usize) {
        let was_empty = s.is_empty();
        self.budget.add(s.held(), frame.len());
        s.msg_bytes += frame.len();
        s.reading -= released;
        self.budget.sub(s.held(), released);
        s.push_kept(frame, true);
        s.msgs += 1;
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Queues a history message (prefixed) regardless of the capacity: the history sender
    /// paces itself with [`wait_room`](Self::wait_room) instead of being dropped.
    pub(crate) fn push_history(&self, frame: Bytes) -> Offer {
        let s = self.lock();
        if s.closing {
            return Offer::Closed;
        }
        self.enqueue_msg(s, frame, 0);
        Offer::Queued
    }

    /// Waits until a history, retained-value or catch-up sender may read its next chunk and
    /// reserves `len` bytes for it (the chunk's size at most, but for the message that
    /// crosses it): the reservation counts like queued bytes — in this connection's room and
    /// in the relay-wide budget — from before the read until its messages are queued
    /// ([`ReadHold::push`]) or the [`ReadHold`] is dropped. There is room when, with what
    /// the other senders of the connection reserved, at most half the queue is used and at
    /// most `max_bytes` with the batch the writer holds, and the relay-wide budget takes
    /// `len` more (or the connection holds nothing). So a connection's history and
    /// catch-ups — however many subscriptions ask for them at once — hold at most
    /// `max_bytes` and one chunk. `None` once closing.
    ///
    /// Reserved before the read, not after the chunk is queued: each sender read a chunk
    /// and queued it before it waited, so a `Sub` flood on a connection that reads nothing
    /// held a chunk (up to 2 MiB) per `Sub`.
    pub(crate) async fn reserve_read(self: &Arc<Self>, len: usize) -> Option<ReadHold> {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let mut s = self.lock();
                if s.closing {
                    return None;
                }
                if self.has_read_room(&s, len) {
                    self.budget.add(s.held(), len);
                    s.reading += len;
                    return Some(ReadHold {
                        out: self.clone(),
                        len,
                    });
                }
            }
            drained.await;
        }
    }

    /// Whether [`reserve_read`](Self::reserve_read) would return at once.
    pub(crate) fn read_room(&self, len: usize) -> bool {
        let s = self.lock();
        s.closing || self.has_read_room(&s, len)
    }

    fn has_read_room(&self, s: &State, len: usize) -> bool {
        let (msgs, bytes) = self.kept(s);
        msgs <= self.capacity / 2
            && bytes + s.reading <= self.max_bytes / 2
            && bytes + s.inflight + s.reading <= self.max_bytes
            && !self.budget.refuses(s.queued_held() + s.reading, len)
    }

    /// Gives back what is left of a reservation.
    fn free_read(&self, len: usize) {
        if len == 0 {
            return;
        }
        let mut s = self.lock();
        let n = len.min(s.reading);
        s.reading -= n;
        self.budget.sub(s.held(), n);
        drop(s);
        self.drained.notify_waiters();
    }

    /// Waits until at most half the capacity (messages and bytes) is queued — with policy
    /// `drop`, of the messages it may not drop ([`kept`](Self::kept)) — at most `max_bytes`
    /// with the batch the writer holds, and the connection is not over its share of the
    /// relay-wide budget (or the queue is closing).
    pub(crate) async fn wait_room(&self) {
        self.wait_until(|s| self.has_room(s)).await
    }

    /// Whether [`wait_room`](Self::wait_room) would return at once.
    #[cfg(test)]
    pub(crate) fn room(&self) -> bool {
        self.has_room(&self.lock())
    }

    fn has_room(&self, s: &State) -> bool {
        let (msgs, bytes) = self.kept(s);
        // The batch its writer holds counts too: a writer blocked on a client that reads
        // nothing holds the last chunk taken (up to 1 MiB of history), and the queue behind
        // it is empty — without it, every chunk pushed there is taken and the next pushed.
        msgs <= self.capacity / 2
            && bytes <= self.max_bytes / 2
            && bytes + s.inflight <= self.max_bytes
            && !self.budget.refuses(s.queued_held(), 0)
    }

    async fn wait_until(&self, ready: impl Fn(&State) -> bool) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let s = self.lock();
                if s.closing || ready(&s) {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Counts messages dropped elsewhere for this connection (reported with the next `Gap`).
    pub(crate) fn add_dropped(&self, n: u64) {
        let mut s = self.lock();
        // Saturating: `n` may come from another relay (a loss notice over NATS).
        s.dropped = s.dropped.saturating_add(n);
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
        let was_empty = s.is_empty();
        s.push_kept(frame, false);
        s.controls += 1;
        self.note_replies(&s);
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
            s.qos0.clear();
            s.msgs = 0;
            s.droppable_bytes = 0;
            let freed = std::mem::take(&mut s.msg_bytes);
            self.budget.sub(s.held(), freed);
            s.dropped = 0;
        }
        if let Some(frame) = last {
            s.push_kept(frame, false);
        }
        s.closing = true;
        self.note_replies(s);
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
        // Both queues, merged in the order their frames were queued.
        let State { items, qos0, .. } = &mut *s;
        let mut qos0 = qos0.drain(..).peekable();
        for it in items.drain(..) {
            while let Some((_, f)) = qos0.next_if(|(seq, _)| *seq < it.seq) {
                into.push(f);
            }
            into.push(it.frame);
        }
        into.extend(qos0.map(|(_, f)| f));
        (s.msgs, s.droppable_bytes) = (0, 0);
        let msg_bytes = std::mem::take(&mut s.msg_bytes);
        s.inflight += msg_bytes;
        s.controls = 0;
        s.acks = 0;
        self.note_replies(&s);
        let dropped = std::mem::take(&mut s.dropped);
        let last = s.closing && s.sealed;
        drop(s);
        self.drained.notify_waiters();
        Batch {
            dropped,
            last,
            msg_bytes,
        }
    }

    /// The writer finished writing (or gave up on) a batch of `msg_bytes` message bytes.
    pub(crate) fn written(&self, msg_bytes: usize) {
        let mut s = self.lock();
        let n = msg_bytes.min(s.inflight);
        s.inflight -= n;
        self.budget.sub(s.held(), n);
        drop(s);
        self.drained.notify_waiters();
    }

    /// The session is done with the connection: once closing too, the writer's batch that
    /// empties the queue is its last ([`Batch::last`]). Before, the writer sends what is
    /// queued and waits.
    pub(crate) fn seal(&self) {
        self.lock().sealed = true;
        self.notify.notify_one();
    }

    /// Waits until something may have been queued (or closing began, or the session
    /// sealed the queue).
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Frames currently queued (for tests and status).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        let s = self.lock();
        s.items.len() + s.qos0.len()
    }
}

/// A reply the connection owes ([`Outbound::owe_reply`]): [`send`](Self::send) queues it;
/// dropped unsent, nothing is queued.
#[derive(Debug)]
pub(crate) struct Reply {
    out: Arc<Outbound>,
}

impl Reply {
    /// Queues the reply (prefixed) as [`Outbound::push_control`] does, but past the
    /// `capacity` cap (see [`Outbound::owe_reply`]). `Offer::Closed` when closing.
    pub(crate) fn send(self, frame: Bytes) -> Offer {
        let out = &self.out;
        let mut s = out.lock();
        if s.closing {
            return Offer::Closed;
        }
        let was_empty = s.is_empty();
        s.push_kept(frame, false);
        s.acks += 1;
        out.note_replies(&s);
        drop(s);
        if was_empty {
            out.notify.notify_one();
        }
        Offer::Queued
    }
}

/// Bytes a history or retained-value sender reserved in its connection's queue for a read
/// ([`Outbound::reserve_read`]); what is not queued is given back when it is dropped.
#[derive(Debug)]
pub(crate) struct ReadHold {
    out: Arc<Outbound>,
    len: usize,
}

impl ReadHold {
    /// The read returned `len` bytes: the reservation becomes that.
    pub(crate) fn resize(&mut self, len: usize) {
        let out = &self.out;
        let mut s = out.lock();
        if len > self.len {
            let more = len - self.len;
            out.budget.add(s.held(), more);
            s.reading += more;
        } else {
            let less = (self.len - len).min(s.reading);
            s.reading -= less;
            out.budget.sub(s.held(), less);
        }
        self.len = len;
        drop(s);
        out.drained.notify_waiters();
    }

    /// Queues a message of the chunk read: `held` bytes of the reservation (its envelope)
    /// become `frame`'s queued bytes. Nothing is queued once closing (the bytes are given
    /// back all the same).
    pub(crate) fn push(&mut self, frame: Bytes, held: usize) {
        let out = &self.out;
        let mut s = out.lock();
        let held = held.min(self.len).min(s.reading);
        self.len -= held;
        if s.closing {
            s.reading -= held;
            out.budget.sub(s.held(), held);
            return;
        }
        out.enqueue_msg(s, frame, held);
    }
}

impl Drop for ReadHold {
    fn drop(&mut self) {
        self.out.free_read(std::mem::take(&mut self.len));
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let held = s.held();
        self.budget.sub(0, held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize, max_bytes: usize, policy: SlowConsumerPolicy) -> Outbound {
        Outbound::new(capacity, max_bytes, policy, Arc::new(Budget::new(0)))
    }

    #[test]
    fn the_relay_budget_refuses_qos0_to_the_slowest_and_frees_on_write() {
        let budget = Arc::new(Budget::new(100));
        let q = |_| Outbound::new(1000, 1000, SlowConsumerPolicy::Drop, budget.clone());
        let (slow, fast) = (q(0), q(1));
        let m = |len: usize| Bytes::from(vec![0; len]);
        for _ in 0..9 {
            assert_eq!(slow.offer_msg(&m(10), true), Offer::Queued);
        }
        assert_eq!(fast.offer_msg(&m(10), true), Offer::Queued);
        assert_eq!(budget.used(), 100);
        // Over budget: the slow connection (90 bytes, share 50) gets no more QoS 0 ...
        assert_eq!(slow.offer_msg(&m(10), true), Offer::OverBudget);
        // ... while QoS >= 1 deliveries are still queued (credit bounds them).
        assert_eq!(slow.offer_msg(&m(10), false), Offer::Queued);
        // The fast one (10 bytes, under its share) still gets messages.
        assert_eq!(fast.offer_msg(&m(10), true), Offer::Queued);
        // A batch taken by the writer still counts until it is written.
        let mut out = Vec::new();
        let b = slow.take(&mut out);
        assert_eq!(b.dropped, 1, "the refused message becomes a Gap");
        assert_eq!(budget.used(), 120);
        slow.written(b.msg_bytes);
        assert_eq!(budget.used(), 20);
        assert_eq!(slow.offer_msg(&m(10), true), Offer::Queued);
        drop(fast);
        assert_eq!(
            budget.used(),
            10,
            "a closed connection gives its bytes back"
        );
    }

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn drop_policy_drops_oldest_message_and_counts() {
        let q = queue(2, usize::MAX, SlowConsumerPolicy::Drop);
        assert_eq!(q.push_control(b(0)), Offer::Queued);
        assert_eq!(q.offer_msg(&b(1), true), Offer::Queued);
        assert_eq!(q.offer_msg(&b(2), true), Offer::Queued);
        assert_eq!(q.offer_msg(&b(3), true), Offer::DroppedOldest(1));
        let mut out = Vec::new();
        let batch = q.take(&mut out);
        assert_eq!(batch.dropped, 1);
        assert!(!batch.last);
        assert_eq!(out, vec![b(0), b(2), b(3)]);
    }

    #[test]
    fn byte_bound_drops_oldest_until_the_new_message_fits() {
        let q = queue(100, 10, SlowConsumerPolicy::Drop);
        let m = |n: u8, len: usize| Bytes::from(vec![n; len]);
        assert_eq!(q.offer_msg(&m(1, 4), true), Offer::Queued);
        assert_eq!(q.offer_msg(&m(2, 4), true), Offer::Queued);
        assert_eq!(q.offer_msg(&m(3, 6), true), Offer::DroppedOldest(1));
        // A message larger than the bound alone is still queued (never starved); the
        // offer says how many went for it.
        assert_eq!(q.offer_msg(&m(4, 20), true), Offer::DroppedOldest(2));
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out).dropped, 3);
        assert_eq!(out, vec![m(4, 20)]);
    }

    /// Policy `drop` never drops a QoS >= 1 message: it drops the oldest QoS 0 ones (past
    /// the QoS 1 messages before them), and a QoS 0 message offered to a queue full of
    /// QoS >= 1 ones is the one dropped; a QoS >= 1 message (a redelivery) is queued past
    /// the bound, which its subscription's unacked limits bound instead.
    #[test]
    fn drop_policy_drops_only_qos0_messages() {
        let q = queue(3, usize::MAX, SlowConsumerPolicy::Drop);
        assert_eq!(q.offer_msg(&b(1), false), Offer::Queued);
        assert_eq!(q.offer_msg(&b(2), true), Offer::Queued);
        assert_eq!(q.offer_msg(&b(3), false), Offer::Queued);
        assert_eq!(q.offer_msg(&b(4), true), Offer::DroppedOldest(1));
        assert_eq!(q.offer_msg(&b(5), true), Offer::DroppedOldest(1));
        // Full, but with one QoS 0 message: it gives way to a QoS 1 one.
        assert_eq!(q.room_for(1), Room::Yes);
        assert_eq!(q.offer_msg(&b(6), false), Offer::DroppedOldest(1));
        assert_eq!(q.room_for(1), Room::Full);
        assert_eq!(
            q.offer_msg(&b(7), false),
            Offer::Queued,
            "QoS 1 over the bound"
        );
        assert_eq!(q.offer_msg(&b(8), true), Offer::Dropped(1));
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out).dropped, 4);
        assert_eq!(out, vec![b(1), b(3), b(6), b(7)]);
        assert_eq!(q.room_for(1), Room::Yes);
        // The byte bound the same way.
        let q = queue(100, 10, SlowConsumerPolicy::Drop);
        let m = |n: u8, len: usize| Bytes::from(vec![n; len]);
        assert_eq!(q.offer_msg(&m(1, 8), false), Offer::Queued);
        assert_eq!(q.room_for(4), Room::Full);
        assert_eq!(q.offer_msg(&m(2, 4), true), Offer::Dropped(1));
        assert_eq!(q.take(&mut out).dropped, 1);
        // A QoS 0 message that would not fit even without the queued QoS 0 ones is dropped
        // alone: they stay (evicting them first dropped two where one had to go).
        let q = queue(100, 10, SlowConsumerPolicy::Drop);
        assert_eq!(q.offer_msg(&m(1, 8), false), Offer::Queued);
        assert_eq!(q.offer_msg(&m(2, 1), true), Offer::Queued);
        assert_eq!(q.offer_msg(&m(3, 4), true), Offer::Dropped(1));
        out.clear();
        assert_eq!(q.take(&mut out).dropped, 1);
        assert_eq!(out, vec![m(1, 8), m(2, 1)]);
    }

    /// Dropping the oldest QoS 0 message looks at one queued frame, however many QoS >= 1
    /// messages are queued before it: a subscriber that reads nothing with 3,000 QoS 1
    /// messages queued and a QoS 0 flood on another subscription cost a scan of the 3,000
    /// (and a removal from the queue's middle) for every QoS 0 message routed to it, under
    /// the routing lock. Which message goes, the offers' counts and the `Gap` are as they
    /// were: the oldest QoS 0 one, one per offer, all of them in the next `Gap`.
    #[test]
    fn dropping_the_oldest_qos0_message_is_o1_behind_many_qos1_ones() {
        const CAPACITY: usize = 4096;
        const KEPT: u32 = 3000;
        const FLOOD: u32 = 2000;
        let q = queue(CAPACITY, usize::MAX, SlowConsumerPolicy::Drop);
        let m = |n: u32| Bytes::from(n.to_be_bytes().to_vec());
        q.push_control(m(0));
        for n in 1..=KEPT {
            assert_eq!(q.offer_msg(&m(n), false), Offer::Queued);
        }
        let qos0 = (CAPACITY as u32 - KEPT) + FLOOD;
        let mut worst = 0;
        for n in KEPT + 1..=KEPT + qos0 {
            let before = q.lock().inspected;
            let offer = q.offer_msg(&m(n), true);
            worst = worst.max(q.lock().inspected - before);
            if n <= CAPACITY as u32 {
                assert_eq!(offer, Offer::Queued);
            } else {
                assert_eq!(offer, Offer::DroppedOldest(1), "message {n}");
            }
        }
        assert_eq!(worst, 1, "frames looked at to drop one QoS 0 message");
        // The oldest QoS 0 messages went, the QoS 1 ones and the newest QoS 0 ones stay, in
        // order; the `Gap` counts every one dropped.
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out).dropped, u64::from(FLOOD));
        let expected: Vec<_> = (0..=KEPT)
            .chain(KEPT + 1 + FLOOD..=KEPT + qos0)
            .map(m)
            .collect();
        assert_eq!(out.len(), expected.len());
        assert!(
            out == expected,
            "the oldest QoS 0 messages dropped, the rest in order"
        );
    }

    /// Queued QoS 0 messages do not hold QoS >= 1 deliveries back under policy `drop` (they
    /// are dropped for them); under `disconnect` a QoS >= 1 delivery at a full queue closes
    /// the connection like any other (nothing pauses, nothing is dropped).
    #[test]
    fn qos0_messages_give_way_to_qos1_only_under_the_drop_policy() {
        let q = queue(2, usize::MAX, SlowConsumerPolicy::Drop);
        q.offer_msg(&b(1), true);
        q.offer_msg(&b(2), true);
        assert_eq!(q.room_for(1), Room::Yes);
        assert!(q.room());
        assert_eq!(q.offer_msg(&b(3), false), Offer::DroppedOldest(1));
        let q = queue(2, usize::MAX, SlowConsumerPolicy::Disconnect);
        q.offer_msg(&b(1), true);
        q.offer_msg(&b(2), true);
        assert_eq!(q.room_for(1), Room::Yes, "offered, and the offer closes");
        assert!(!q.room());
        assert_eq!(q.offer_msg(&b(3), false), Offer::Disconnected);
    }

    /// History senders wait for room counting the batch the writer holds: a writer blocked
    /// on a client that reads nothing keeps them from pushing chunk after chunk.
    #[test]
    fn room_for_history_counts_the_batch_being_written() {
        let q = queue(100, 100, SlowConsumerPolicy::Drop);
        q.push_history(Bytes::from(vec![0; 60]));
        let mut out = Vec::new();
        let batch = q.take(&mut out);
        assert!(q.room(), "60 bytes being written, none queued");
        q.push_history(Bytes::from(vec![0; 50]));
        assert!(!q.room(), "50 queued (half the queue) and 60 being written");
        q.written(batch.msg_bytes);
        assert!(q.room());
    }

    /// A history read reserves room before it reads: a second sender of the connection
    /// waits while the first one's chunk is reserved, queued or being written; the
    /// reservation counts in the relay-wide budget, becomes queued bytes as its messages
    /// are queued, and what is left is given back when it is dropped.
    #[tokio::test]
    async fn history_reads_reserve_room_before_they_read() {
        let budget = Arc::new(Budget::new(0));
        let q = Arc::new(Outbound::new(
            100,
            100,
            SlowConsumerPolicy::Drop,
            budget.clone(),
        ));
        let mut first = q.reserve_read(1000).await.expect("room: nothing held");
        assert_eq!(budget.used(), 1000);
        assert!(!q.read_room(1000), "a chunk is reserved");
        first.resize(300);
        assert_eq!(budget.used(), 300);
        first.push(Bytes::from(vec![0; 110]), 100);
        assert_eq!(budget.used(), 310);
        assert_eq!(q.queued(), 1);
        assert!(!q.read_room(1000), "queued and reserved");
        drop(first);
        assert_eq!(budget.used(), 110, "the rest given back");
        assert!(!q.read_room(1000), "110 bytes queued, over half the queue");
        let mut out = Vec::new();
        let batch = q.take(&mut out);
        assert!(!q.read_room(1000), "110 bytes being written");
        let second = {
            let q = q.clone();
            tokio::spawn(async move { q.reserve_read(1000).await.map(|h| h.len) })
        };
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        q.written(batch.msg_bytes);
        assert_eq!(second.await.unwrap(), Some(1000));
        assert_eq!(budget.used(), 0, "a dropped reservation is given back");
        q.close_with(None);
        assert!(q.reserve_read(1000).await.is_none(), "closing");
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A live delivery (QoS 0 when droppable) of this many bytes.
        Offer(bool, usize),
        /// A history message of this many bytes.
        History(usize),
        /// The writer takes the queue (and, when true, finishes writing it at once).
        Take(bool),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (any::<bool>(), 4usize..40).prop_map(|(d, n)| Op::Offer(d, n)),
            1 => (4usize..40).prop_map(Op::History),
            1 => any::<bool>().prop_map(Op::Take),
        ]
    }

    proptest::proptest! {
        /// Random offers, history pushes and takes under policy `drop`: the queue's counters
        /// (messages, QoS 0 messages and their bytes, bytes being written) and the budget
        /// always match what it holds; every QoS >= 1 message reaches the writer, in order;
        /// every QoS 0 message reaches it or is counted once in a `Gap`; and after an offer
        /// that leaves QoS 0 messages queued, the queue is within its bounds (they are what
        /// gives way).
        #[test]
        fn the_drop_policy_keeps_its_counts_and_every_qos1_message(
            capacity in 1usize..8,
            max_bytes in 16usize..120,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let budget = Arc::new(Budget::new(0));
            let q = Outbound::new(capacity, max_bytes, SlowConsumerPolicy::Drop, budget.clone());
            let (mut kept, mut qos0, mut taken, mut gaps) = (Vec::new(), 0u64, Vec::new(), 0u64);
            let mut next = 0u32;
            let mut frame = |len: usize| {
                next += 1;
                let mut v = vec![0u8; len];
                v[..4].copy_from_slice(&next.to_be_bytes());
                Bytes::from(v)
            };
            let mut inflight = 0;
            // What the offers said they dropped (the router counts it in the metric).
            let mut reported = 0u64;
            for op in ops {
                let offered = matches!(op, Op::Offer(..));
                match op {
                    Op::Offer(droppable, len) => {
                        let f = frame(len);
                        let offer = q.offer_msg(&f, droppable);
                        if let Offer::Dropped(n) | Offer::DroppedOldest(n) = offer {
                            reported += n;
                        }
                        if droppable {
                            qos0 += 1;
                        } else {
                            proptest::prop_assert!(matches!(offer, Offer::Queued | Offer::DroppedOldest(_)));
                            kept.push(f);
                        }
                    }
                    Op::History(len) => {
                        let f = frame(len);
                        q.push_history(f.clone());
                        kept.push(f);
                    }
                    Op::Take(written) => {
                        let mut out = Vec::new();
                        let b = q.take(&mut out);
                        gaps += b.dropped;
                        inflight += b.msg_bytes;
                        taken.extend(out);
                        if written {
                            q.written(inflight);
                            inflight = 0;
                        }
                    }
                }
                let s = q.lock();
                let kept: Vec<_> = s.items.iter().filter(|it| it.is_msg).collect();
                proptest::prop_assert_eq!(s.msgs, kept.len() + s.qos0.len());
                proptest::prop_assert_eq!(
                    s.droppable_bytes,
                    s.qos0.iter().map(|(_, f)| f.len()).sum::<usize>()
                );
                proptest::prop_assert_eq!(
                    s.msg_bytes,
                    kept.iter().map(|it| it.frame.len()).sum::<usize>() + s.droppable_bytes
                );
                // Each queue in the order its frames were queued.
                proptest::prop_assert!(s.items.iter().zip(s.items.iter().skip(1)).all(|(a, b)| a.seq < b.seq));
                proptest::prop_assert!(s.qos0.iter().zip(s.qos0.iter().skip(1)).all(|(a, b)| a.0 < b.0));
                proptest::prop_assert_eq!(s.inflight, inflight);
                proptest::prop_assert_eq!(budget.used(), s.msg_bytes + s.inflight);
                // After an offer (history is paced by its sender instead).
                if offered && s.droppables() > 0 {
                    proptest::prop_assert!(s.msgs <= capacity);
                    proptest::prop_assert!(s.msgs == 1 || s.msg_bytes <= max_bytes);
                }
            }
            let mut out = Vec::new();
            gaps += q.take(&mut out).dropped;
            taken.extend(out);
            let ids = |v: &[Bytes]| v.iter().map(|f| f[..4].to_vec()).collect::<Vec<_>>();
            let kept_ids = ids(&kept);
            let taken_kept: Vec<_> = ids(&taken).into_iter().filter(|id| kept_ids.contains(id)).collect();
            proptest::prop_assert_eq!(taken_kept, kept_ids, "every QoS >= 1 message, in order");
            // Every frame (QoS 0 ones too) in the order it was queued.
            let all = ids(&taken);
            proptest::prop_assert!(all.windows(2).all(|w| w[0] < w[1]), "in queue order");
            proptest::prop_assert_eq!(taken.len() as u64 - kept.len() as u64 + gaps, qos0);
            proptest::prop_assert_eq!(reported, gaps, "the offers report every drop");
        }
    }

    /// A loss count from elsewhere (another relay's notice over NATS) cannot overflow the
    /// `Gap` count (it panicked in debug builds, under the queue's lock).
    #[test]
    fn loss_counts_saturate() {
        let q = queue(4, usize::MAX, SlowConsumerPolicy::Drop);
        q.add_dropped(u64::MAX);
        q.add_dropped(u64::MAX);
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out).dropped, u64::MAX);
    }

    /// Replies the store owes (`PubAck`s waiting for a commit) do not pause the reader
    /// while owed: a store stall with thousands of them left the connection unread — its
    /// `Ping`s unanswered, its close unseen — while its writer was idle. Queued and not
    /// taken they do, like any reply; and however many land at once they are not held to
    /// the `capacity` cap (the store's queue bounds them), which still applies to the
    /// replies the reader's own frames queue.
    #[test]
    fn owed_replies_pause_the_reader_only_once_queued_and_skip_the_cap() {
        let q = Arc::new(queue(4, usize::MAX, SlowConsumerPolicy::Drop));
        let owed: Vec<_> = (0..10).map(|_| q.owe_reply()).collect();
        assert!(
            !q.replies_backed_up(),
            "owed: the store holds them, not the writer"
        );
        for r in owed {
            assert_eq!(r.send(b(1)), Offer::Queued);
        }
        assert!(q.replies_backed_up(), "queued and not taken");
        assert!(
            !q.is_closing(),
            "10 owed replies at once, capacity 4: not closed"
        );
        let mut out = Vec::new();
        q.take(&mut out);
        assert_eq!(out.len(), 10);
        assert!(!q.replies_backed_up(), "taken");
        q.push_control(b(2));
        q.push_control(b(2));
        assert!(q.replies_backed_up(), "half the capacity queued");
        let sent = q.owe_reply().send(b(1));
        assert_eq!(sent, Offer::Queued);
        q.push_control(b(2));
        q.push_control(b(2));
        assert_eq!(
            q.push_control(b(3)),
            Offer::Disconnected,
            "the reader's own: capped"
        );
        drop(q.owe_reply());
        assert_eq!(q.owe_reply().send(b(1)), Offer::Closed);
    }

    #[test]
    fn disconnect_policy_discards_messages_and_closes() {
        let q = queue(1, usize::MAX, SlowConsumerPolicy::Disconnect);
        q.push_control(b(0));
        q.offer_msg(&b(1), true);
        assert_eq!(q.offer_msg(&b(2), true), Offer::Disconnected);
        assert!(q.is_closing());
        assert_eq!(q.offer_msg(&b(3), true), Offer::Closed);
        let mut out = Vec::new();
        assert!(!q.take(&mut out).last, "the session has not sealed it yet");
        q.seal();
        assert!(q.take(&mut out).last);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], b(0));
        let err = Frame::decode(&out[1].slice(4..)).unwrap();
        assert!(matches!(err, Frame::Err(e) if e.code == ErrorCode::SlowConsumer && e.fatal));
        assert_eq!(q.queued(), 0);
    }
}
