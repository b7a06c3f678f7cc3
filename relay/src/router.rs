//! The router: the subscription index and the store behind the routing locks.
//!
//! A lock around "assign the sequence, then queue to every match" is what makes relay
//! sequence numbers reach every subscriber in increasing order, and makes `SubOk.seq`
//! exact: every message with a larger sequence is matched against the new subscription.
//! Every pattern names one key id, so no subscription ever matches messages of two key
//! ids: the index is split into [`SHARDS`] shards by a keyed hash of the key id, each
//! behind its own routing lock, and publishes on different shards route in parallel. The
//! store numbers messages from one counter (so sequences stay unique and, within a shard,
//! increasing in routing order). Before the split, a flood on invented key ids held the
//! one lock most of the time; a flooder preempted inside it stalled every tenant's publish
//! for a scheduler slice (tens of ms on two busy cores). Now another tenant waits only
//! when its key id shares the flooder's shard at that moment.
//!
//! The critical section is short — a store append (in-memory checks and a queued write,
//! never a disk wait: a full store queue is answered `Busy`), one encode of the `Msg`
//! frame, a trie walk and non-blocking queue offers — and never waits on a socket or a
//! disk. Retained values and history are read from the store off this lock.
//!
//! A subscription that replays history starts *gated*: it is in the index at once (so no
//! live message can slip between history and live), but its live messages are buffered on
//! the subscription while the history task sends stored messages up to the boundary
//! (`SubOk.seq`); then [`Router::release`] sends the buffer — all with larger sequences —
//! and opens the gate. No gap, no duplicate.
//!
//! In a cluster (see `crate::cluster`) the router also keeps the refcount of distinct
//! filters under the same lock — so the NATS bridge sees subscribe/unsubscribe transitions
//! in the order they happened — and offers every local publish to the bridge's bounded
//! queue (a non-blocking offer, so NATS never stalls local routing). Envelopes from other
//! relays enter through [`Router::publish_remote`]: numbered, stored and fanned out like a
//! local publish, never forwarded again.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;
use whispeer_protocol::frame::{Gap, Msg};
use whispeer_protocol::limits::MAX_ACKS_PER_FRAME;
use whispeer_protocol::{codec, Envelope, Frame, KeyId, Qos, TokenPath, TokenPattern};

use crate::cluster::{Interest, Link};
pub(crate) use crate::flow::Tracking;
use crate::flow::{Delivery, Paused};
use crate::ids::{ConnId, Seq, SubId};
use crate::index::SubIndex;
use crate::metrics::Metrics;
use crate::outbound::{Offer, Outbound, Room};
use crate::store::{Accepted, Append, Sequenced, Store, StoreError, Tenant};

/// The subscriptions one routed message goes to, inline for up to eight: a `Vec` cost two
/// heap allocations per routed message (targets, wake-ups).
type Targets<'a> = SmallVec<[&'a Arc<Target>; 8]>;

/// What one routed message's offers to its connections came to.
#[derive(Default)]
struct OfferCounts {
    delivered: usize,
    dropped: u64,
}

impl OfferCounts {
    /// Offers `frame` to `t`'s connection (its writer woken later, from `wake`).
    fn offer<'a>(
        &mut self,
        t: &'a Arc<Target>,
        frame: &Bytes,
        droppable: bool,
        wake: &mut Targets<'a>,
        metrics: &Metrics,
    ) {
        let (offer, needs_wake) = t.out.offer_msg_unwoken(frame, droppable);
        if needs_wake {
            wake.push(t);
        }
        match offer {
            Offer::Queued => self.delivered += 1,
            Offer::DroppedOldest(n) => {
                self.delivered += 1;
                self.dropped += n;
            }
            Offer::Dropped(n) => self.dropped += n,
            Offer::Disconnected => metrics.slow_consumer_disconnect(),
            Offer::Closed | Offer::OverBudget => {}
        }
    }
}

/// Tells each connection among `targets` (once, however many of its subscriptions are
/// there) that `n` messages for it were lost, in its next `Gap`.
fn add_dropped_once(targets: &mut Targets<'_>, n: u64) {
    targets.sort_unstable_by_key(|t| t.conn);
    targets.dedup_by_key(|t| t.conn);
    for t in targets.iter() {
        t.out.add_dropped(n);
    }
}

/// Outbound queues that routing made non-empty, for the caller to wake once it is done
/// routing what it has at hand: a publisher's reader wakes each subscriber's writer once
/// per turn of frames rather than once per message. Woken per message, the writer (on the
/// other core) took one or two frames per write, and the subscriber read them one or two
/// at a time (relay/README.md "Writers woken once per turn").
pub(crate) type Wakes = Vec<Arc<Outbound>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encodes a `Msg` frame (length-prefixed): live and redelivered ones name no subscription.
pub(crate) fn msg_frame(seq: u64, envelope: &Envelope, flags: u64) -> Bytes {
    encode_msg(seq, envelope, flags, None)
}

/// The live `Msg` frame for one connection: the shared encoding (made once, for the first
/// connection that takes it), or — when some of that connection's subscriptions matching
/// it are paused — its own, naming them (`Msg.paused`).
fn conn_frame(
    encoded: &mut Option<Bytes>,
    encode: &impl Fn() -> Bytes,
    paused: &[u64],
    seq: u64,
    envelope: &Envelope,
) -> Bytes {
    if paused.is_empty() || seq == 0 {
        return encoded.get_or_insert_with(encode).clone();
    }
    codec::encode_prefixed(&Frame::Msg(Msg {
        seq,
        envelope: envelope.clone(),
        flags: 0,
        sub_id: None,
        paused: Some(paused.to_vec()),
    }))
}

/// Names paused subscription `t` in its connection's copy, if its client asked for named
/// copies (at most what a `Msg` may carry, [`MAX_ACKS_PER_FRAME`]: past that a client
/// hands the copy to the rest as before this was named — out of order for them, never
/// lost).
fn name_paused(paused: &mut SmallVec<[u64; 2]>, t: &Target) {
    if t.named && paused.len() < MAX_ACKS_PER_FRAME {
        paused.push(t.sub.0);
    }
}

/// The frame of a copy for `target` alone outside its history (its catch-up, or a live
/// message held back during its history, PROTOCOL §3.5.5): live flags, naming it if its
/// client asked for named copies; else the live frame (`unnamed`: one already encoded, or
/// a new encoding).
pub(crate) fn own_copy_frame(
    seq: u64,
    envelope: &Envelope,
    target: &Target,
    unnamed: impl FnOnce() -> Bytes,
) -> Bytes {
    if target.named {
        encode_msg(seq, envelope, 0, Some(target.sub.0))
    } else {
        unnamed()
    }
}

/// Encodes a history `Msg` (replayed or retained) for subscription `sub_id`.
pub(crate) fn history_frame(seq: u64, envelope: &Envelope, flags: u64, sub_id: u64) -> Bytes {
    encode_msg(seq, envelope, flags, Some(sub_id))
}

fn encode_msg(seq: u64, envelope: &Envelope, flags: u64, sub_id: Option<u64>) -> Bytes {
    codec::encode_prefixed(&Frame::Msg(Msg {
        paused: None,
        sub_id,
        seq,
        envelope: envelope.clone(),
        flags,
    }))
}

/// Live messages held back while a subscription's history (or retained values) is sent.
///
/// The buffer is bounded in messages (`gate_limit`) and in bytes: its frames are held in
/// the connection's outbound account ([`Outbound::hold_gated`]: all gates of a connection
/// together within `queue.max_bytes`, and the relay-wide budget), because a subscriber
/// that never reads (or never acks, with a small credit) keeps its history from ending, and
/// everything published meanwhile would otherwise pile up here. Beyond the bound a QoS 0
/// subscription loses its oldest held-back messages (counted, `Gap`); a QoS ≥ 1 one
/// *spills*: from that message on nothing more is held, the messages wait in the store,
/// and when the gate opens delivery is paused there so the catch-up sends them in order.
#[derive(Debug, Default)]
struct Gate {
    /// Live messages held back: sequence, envelope, `Msg` frame, kept in history.
    buf: VecDeque<(u64, Envelope, Bytes, bool)>,
    dropped: u64,
    /// Bytes of the frames in `buf`, held in the connection's outbound account.
    bytes: usize,
    /// A QoS ≥ 1 subscription's buffer was full: the first message not held, the highest
    /// since, and how many of those the store does not keep.
    spill: Option<Paused>,
}

/// One subscription as the index holds it.
#[derive(Debug)]
pub(crate) struct Target {
    /// The routing shard of the subscription's key id.
    shard: usize,
    pub(crate) conn: ConnId,
    pub(crate) sub: SubId,
    pub(crate) out: Arc<Outbound>,
    pub(crate) track: Option<Arc<Tracking>>,
    /// Its client asked for addressed copies (`features::NAMED_COPIES`).
    pub(crate) named: bool,
    gated: AtomicBool,
    gate: Mutex<Option<Gate>>,
    cancelled: AtomicBool,
    /// Woken when the subscription is cancelled (its history sender stops at once).
    stop: tokio::sync::Notify,
    gate_limit: usize,
}

impl Drop for Target {
    fn drop(&mut self) {
        let gate = self.gate.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = gate.take() {
            self.out.free_gated(g.bytes);
        }
    }
}

impl Target {
    /// Holds a live message back in the open gate (see [`Gate`]). Returns how many
    /// messages that dropped (counted in the relay's metric at once by the caller, so a
    /// subscriber that never reads — whose gate may never open — shows its losses; its
    /// `Gap` follows when the gate opens).
    fn hold_back(
        &self,
        gate: &mut Gate,
        seq: u64,
        envelope: &Envelope,
        frame: Bytes,
        stored: bool,
    ) -> u64 {
        if let Some(p) = gate.spill.as_mut() {
            if stored {
                p.missed_max = p.missed_max.max(seq);
            } else {
                p.lost += 1;
            }
            return 0;
        }
        let len = frame.len();
        let mut dropped = 0;
        loop {
            if gate.buf.len() < self.gate_limit && self.out.hold_gated(len) {
                gate.bytes += len;
                gate.buf.push_back((seq, envelope.clone(), frame, stored));
                break;
            }
            if self.track.is_some() {
                if seq == 0 {
                    // Unnumbered (live-only with the JetStream store): it cannot wait in
                    // the store, and the held-back messages before it must not go.
                    dropped += 1;
                } else {
                    gate.spill = Some(Paused {
                        next: seq,
                        missed_max: seq,
                        lost: u64::from(!stored),
                        stored: 0,
                    });
                }
                break;
            }
            // QoS 0: the oldest held-back message goes, counted for a Gap.
            dropped += 1;
            match gate.buf.pop_front() {
                Some((.., old, _)) => {
                    gate.bytes -= old.len();
                    self.out.free_gated(old.len());
                }
                None => break,
            }
        }
        gate.dropped += dropped;
        dropped
    }

    /// Opens the gate: what it still holds is given back to the connection's account.
    fn open_gate(&self, g: &mut Option<Gate>) {
        if let Some(gate) = g.take() {
            self.out.free_gated(gate.bytes);
        }
        self.gated.store(false, Ordering::Relaxed);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The subscription was replaced or unsubscribed: its history sender stops.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.stop.notify_waiters();
    }

    /// Resolves once the subscription is cancelled (a history sender waiting for room or
    /// for the store must not wait on after it: a `Sub` replacing one whose sender waits
    /// would add another).
    pub(crate) async fn cancelled(&self) {
        loop {
            let stop = self.stop.notified();
            tokio::pin!(stop);
            stop.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            stop.await;
        }
    }
}

/// Where a routed message's sequence comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// A local publish: the store numbers it (or queues it for the cluster stream).
    Local,
    /// From another relay over core NATS (phase 1): this relay's store numbers it.
    Remote,
    /// Live-only from another relay with the JetStream store: not numbered (seq 0).
    Unnumbered,
    /// Numbered by the cluster stream; kept in history (false: a retained-only value).
    Sequenced(Seq, bool),
}

/// How a subscription starts.
#[derive(Debug)]
pub(crate) struct SubStart {
    /// The client asked for addressed copies (`NAMED_COPIES`): its catch-up copies name
    /// it, and its connection's live copies name it while it is paused.
    pub(crate) named: bool,
    /// At-least-once tracking (QoS ≥ 1 or durable).
    pub(crate) track: Option<Arc<Tracking>>,
    /// History follows (the subscription starts gated).
    pub(crate) replay: bool,
    /// Send retained values of matching paths before live messages (read off the routing
    /// lock by [`crate::replay::retained`]; the subscription starts gated).
    pub(crate) retained: bool,
    /// Most live messages buffered while history is sent (oldest dropped beyond).
    pub(crate) gate_limit: usize,
}

/// Routing shards (a power of two is not needed: the key id hash is taken modulo).
pub(crate) const SHARDS: usize = 64;

/// The subscriptions of the key ids of one shard.
#[derive(Debug, Default)]
struct Core {
    index: SubIndex<Arc<Target>>,
    /// Local subscriptions per distinct filter (kept only in a cluster): the bridge holds
    /// NATS subscriptions for the filters with a count above zero.
    interest: HashMap<TokenPattern, usize>,
}

impl Core {
    fn interest_add(&mut self, cluster: Option<&Link>, pattern: &TokenPattern) {
        let Some(link) = cluster else { return };
        let n = self.interest.entry(pattern.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            link.interest(Interest::Add(pattern.clone()));
        }
    }

    fn interest_remove(&mut self, cluster: Option<&Link>, pattern: &TokenPattern) {
        let Some(link) = cluster else { return };
        if let Some(n) = self.interest.get_mut(pattern) {
            *n -= 1;
            if *n == 0 {
                self.interest.remove(pattern);
                link.interest(Interest::Remove(pattern.clone()));
            }
        }
    }
}

/// Subscriptions, sequence assignment and fan-out.
#[derive(Debug)]
pub(crate) struct Router {
    shards: Box<[Mutex<Core>]>,
    /// Keyed, so nobody can aim invented key ids at another tenant's shard.
    pick: RandomState,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// The NATS bridge's queues, in a cluster.
    cluster: Option<Link>,
    /// The store numbers messages elsewhere (the JetStream stream).
    sequenced: bool,
    /// Walks of this relay's own publishes that the stream numbered, matched with their
    /// publishers' debts ([`Router::owe_walk`]).
    debts: Mutex<WalkDebts>,
    /// The relay-wide budget of unacknowledged bytes (`delivery.total_unacked_bytes`),
    /// made by the first connection that asks ([`Router::unacked_budget`]).
    unacked: std::sync::OnceLock<Arc<crate::flow::UnackedBudget>>,
}

/// A session's routing walks not charged yet: publish rate tokens
/// ([`crate::rate::walk_tokens`]) that the routing of its publishes the JetStream stream
/// numbered added after the publish was handled (the walk runs when the message comes back
/// from the stream). The session takes them before its next frame
/// ([`crate::session::Session::on_inbound`]) and charges them as it charges a walk it made
/// itself.
pub(crate) type WalkDebt = Arc<std::sync::atomic::AtomicU64>;

/// Stream sequences this relay routed (or was told it will) further back than this from the
/// last one routed are forgotten: a publish whose acknowledgement came that late goes
/// uncharged, and the map stays bounded (`Walked` entries of other relays' publishes are
/// never claimed).
const DEBT_WINDOW: u64 = 1 << 16;

/// The two halves of a pending publish's walk charge, whichever comes first: the stream's
/// acknowledgement (the publisher's debt, by sequence) or the routing of the numbered
/// message (its walk's tokens). Only walks that cost tokens are kept.
#[derive(Debug, Default)]
struct WalkDebts {
    by_seq: std::collections::BTreeMap<u64, Owed>,
    /// The last sequence [`Router::publish_sequenced`] routed.
    routed: u64,
}

#[derive(Debug)]
enum Owed {
    /// Acknowledged to this publisher, not yet routed.
    To(WalkDebt),
    /// Routed: these tokens, publisher unknown yet (or another relay's).
    Walked(u64),
}

impl WalkDebts {
    fn forget_old(&mut self) {
        let keep = self.routed.saturating_sub(DEBT_WINDOW);
        if self
            .by_seq
            .first_key_value()
            .is_some_and(|(s, _)| *s < keep)
        {
            self.by_seq = self.by_seq.split_off(&keep);
        }
        while self.by_seq.len() as u64 > DEBT_WINDOW {
            self.by_seq.pop_first();
        }
    }
}

impl Router {
    pub(crate) fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, cluster: Option<Link>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Core::default())).collect(),
            pick: RandomState::new(),
            sequenced: store.kind() == "jetstream",
            store,
            metrics,
            cluster,
            debts: Mutex::default(),
            unacked: std::sync::OnceLock::new(),
        }
    }

    /// The relay-wide budget of unacknowledged bytes, of `max` bytes (the relay's
    /// `delivery.total_unacked_bytes`: the first caller's `max` makes it).
    pub(crate) fn unacked_budget(&self, max: usize) -> &Arc<crate::flow::UnackedBudget> {
        self.unacked
            .get_or_init(|| crate::flow::UnackedBudget::new(max, self.metrics.clone()))
    }

    fn shard_of(&self, key_id: &KeyId) -> usize {
        (self.pick.hash_one(key_id) % SHARDS as u64) as usize
    }

    /// The routing lock of shard `i`.
    fn lock(&self, i: usize) -> MutexGuard<'_, Core> {
        // Index and store updates are each completed before any call that could panic, so a
        // poisoned lock still guards a consistent index.
        lock(&self.shards[i])
    }

    /// The store.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Adds a subscription and queues its `SubOk` (built by `reply` from the boundary, the
    /// current last sequence) under the routing lock, so the `SubOk` precedes every message
    /// it matches. Retained values follow the `SubOk` when asked for. Returns the offer
    /// outcome, the index entry and the boundary.
    pub(crate) fn subscribe(
        &self,
        pattern: &TokenPattern,
        conn: ConnId,
        sub: SubId,
        out: &Arc<Outbound>,
        start: SubStart,
        reply: impl FnOnce(Seq) -> Bytes,
    ) -> (Offer, Arc<Target>, Seq) {
        let shard = self.shard_of(pattern.key_id());
        let mut core = self.lock(shard);
        // Every message of this shard numbered later is matched against the new
        // subscription (numbered under this lock); those of other shards never match it.
        let seq = self.store.last_seq();
        // Retained values are read from the store off this lock, like history: the
        // subscription starts gated and its live messages wait behind them.
        let gated = start.replay || start.retained;
        let target = Arc::new(Target {
            shard,
            conn,
            sub,
            out: out.clone(),
            track: start.track,
            named: start.named,
            gated: AtomicBool::new(gated),
            gate: Mutex::new(gated.then(Gate::default)),
            cancelled: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            gate_limit: start.gate_limit,
        });
        let offer = out.push_control(reply(seq));
        if offer == Offer::Queued {
            if !start.replay {
                if let Some(t) = &target.track {
                    t.start_at(seq.0);
                }
            }
            core.index.insert(pattern, conn, sub, target.clone());
            core.interest_add(self.cluster.as_ref(), pattern);
            self.metrics.subscribed();
        }
        (offer, target, seq)
    }

    /// Ends a replaying subscription's history: queues `done` (if any), then the live
    /// messages buffered meanwhile — in steps of half the queue, paced like history, while
    /// newer live messages keep joining the buffer — and opens the gate once the buffer is
    /// empty, under the routing lock, so no live message can pass a buffered one.
    pub(crate) async fn release(&self, target: &Target, done: Option<Bytes>) {
        let step = (target.out.capacity() / 2).max(1);
        let mut done = done;
        loop {
            {
                let _core = self.lock(target.shard);
                let mut g = lock(&target.gate);
                let Some(gate) = g.as_mut() else { return };
                if target.is_cancelled() {
                    target.open_gate(&mut g);
                    return;
                }
                if let Some(d) = done.take() {
                    target.out.push_control(d);
                }
                if gate.dropped > 0 {
                    // Counted in the metric when dropped (`hold_back`); told now.
                    target.out.add_dropped(gate.dropped);
                    gate.dropped = 0;
                }
                let n = gate.buf.len().min(step);
                let spill = gate.spill;
                let last = gate
                    .buf
                    .iter()
                    .map(|(seq, ..)| *seq)
                    .chain(spill.map(|p| p.missed_max))
                    .max()
                    .unwrap_or(0);
                let spill_lost = spill.map_or(0, |p| p.lost);
                let now = Instant::now();
                let mut paused = false;
                let mut sent = 0;
                for (seq, env, frame, stored) in gate.buf.iter().take(n) {
                    // Out of credit: the rest waits in the store (what the store does not
                    // keep is counted and reported with a Gap when delivery resumes); the
                    // ack that frees credit starts the catch-up (see `flow`).
                    if let (Some(t), true) = (&target.track, *seq == 0) {
                        if !t.unnumbered() {
                            sent += 1;
                            continue;
                        }
                    } else if let Some(t) = &target.track {
                        let unstored = || gate.buf.iter().skip(sent).filter(|m| !m.3).count();
                        let lost = unstored() as u64 + spill_lost;
                        if !t.deliver_or_pause(*seq, env, *stored, last, lost, now) {
                            self.metrics.credit_paused();
                            paused = true;
                            break;
                        }
                    }
                    // Named, as a catch-up's copy is, for a client that asked: this
                    // subscription's alone (the frame held is the shared live one).
                    target
                        .out
                        .push_history(own_copy_frame(*seq, env, target, || frame.clone()));
                    sent += 1;
                }
                // Sent frames now count in the queue; the rest of a paused buffer (and a
                // spill) waits in the store.
                let mut freed: usize = gate.buf.drain(..sent).map(|m| m.2.len()).sum();
                if paused {
                    freed += gate.buf.drain(..).map(|m| m.2.len()).sum::<usize>();
                    gate.spill = None;
                }
                gate.bytes -= freed;
                target.out.free_gated(freed);
                if gate.buf.is_empty() {
                    let spill = gate.spill.take();
                    target.open_gate(&mut g);
                    if let Some(t) = &target.track {
                        if let Some(p) = spill {
                            t.pause(p);
                            self.metrics.credit_paused();
                        }
                        t.history_done();
                    }
                    return;
                }
            }
            target.out.wait_room().await;
            if target.out.is_closing() {
                return;
            }
        }
    }

    /// A paused subscription's catch-up has sent everything up to `upto`: under the routing
    /// lock, resumes live delivery unless a later message was skipped meanwhile.
    /// Messages the store did not keep, skipped while paused, are reported with a `Gap`.
    pub(crate) fn resume_live(&self, target: &Target, upto: u64, sent: u64) -> bool {
        let _core = self.lock(target.shard);
        let Some(t) = &target.track else {
            return true;
        };
        match t.resume_if_caught_up(upto, sent) {
            None => false,
            Some(lost) => {
                if lost > 0 {
                    // Counted before the Gap is queued: whoever reads the Gap then finds
                    // the loss in the metrics too.
                    self.metrics.credit_lost(lost);
                    // Told to the subscription that lost them (a `Gap` naming it), after
                    // the last message its catch-up queued: a client cannot tell from a
                    // count for the whole connection which of its subscriptions lost
                    // messages, and hands such a count only to those that do not
                    // acknowledge, so this one's app would never hear of them.
                    let _ = target
                        .out
                        .push_control(codec::encode_prefixed(&Frame::Gap(Gap {
                            dropped: lost,
                            sub_id: Some(target.sub.0),
                        })));
                }
                true
            }
        }
    }

    /// Removes one subscription; returns whether it existed.
    pub(crate) fn unsubscribe(&self, pattern: &TokenPattern, conn: ConnId, sub: SubId) -> bool {
        let mut core = self.lock(self.shard_of(pattern.key_id()));
        let removed = core.index.remove_value(pattern, conn, sub);
        if removed.is_some() {
            core.interest_remove(self.cluster.as_ref(), pattern);
        }
        drop(core);
        let existed = removed.is_some();
        if let Some(t) = removed {
            t.cancel();
            self.metrics.unsubscribed(1);
        }
        existed
    }

    /// Removes every subscription of a closing connection.
    pub(crate) fn unsubscribe_all<'a>(
        &self,
        conn: ConnId,
        subs: impl IntoIterator<Item = (SubId, &'a TokenPattern)>,
    ) {
        let mut n = 0;
        for (sub, pattern) in subs {
            let mut core = self.lock(self.shard_of(pattern.key_id()));
            if let Some(t) = core.index.remove_value(pattern, conn, sub) {
                core.interest_remove(self.cluster.as_ref(), pattern);
                t.cancel();
                n += 1;
            }
        }
        self.metrics.unsubscribed(n);
    }

    /// Accepts a publish: assigns its sequence, encodes one `Msg` frame and offers the same
    /// bytes to every matching connection (once per connection, however many of its
    /// subscriptions match). A duplicate publish id (QoS 2) is neither stored nor routed.
    /// In a cluster the envelope is also offered to the NATS bridge. The writers it queued
    /// frames for are added to `wakes` for the caller to wake, and the index nodes its
    /// match walk visited to `walked` (0 when it was not routed here: a duplicate, one
    /// pending in the cluster stream, a refusal), for the caller to charge to the
    /// publisher ([`crate::rate::walk_tokens`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn publish(
        &self,
        envelope: &Envelope,
        path: &TokenPath,
        flags: u64,
        qos: Qos,
        publish_id: Option<[u8; 16]>,
        tenant: &Tenant,
        wakes: &mut Wakes,
        walked: &mut usize,
    ) -> Result<Accepted, StoreError> {
        self.route(
            envelope,
            path,
            flags,
            qos,
            publish_id,
            tenant,
            Numbering::Local,
            Some(wakes),
            walked,
        )
    }

    /// Routes an envelope another relay accepted (it came through NATS): numbered by this
    /// relay's store, stored per its policy and fanned out like a local publish, but not
    /// forwarded again. QoS is lowered to 0 when this relay has no store for more. It counts
    /// against `tenant`, its publisher as the forward names it ([`Tenant::Remote`]; a relay
    /// that names none: [`Tenant::Local`]), so one tenant at its quota here refuses only its
    /// own. With the JetStream store only live-only envelopes come this way: routed
    /// unnumbered (seq 0).
    pub(crate) fn publish_remote(
        &self,
        envelope: &Envelope,
        path: &TokenPath,
        flags: u64,
        qos: Qos,
        tenant: &Tenant,
    ) -> Result<Accepted, StoreError> {
        if self.sequenced {
            return self.route(
                envelope,
                path,
                flags,
                Qos::AtMostOnce,
                None,
                &Tenant::Local,
                Numbering::Unnumbered,
                None,
                &mut 0,
            );
        }
        let qos = if self.store.features() & whispeer_protocol::frame::features::AT_LEAST_ONCE == 0
        {
            Qos::AtMostOnce
        } else {
            qos
        };
        self.route(
            envelope,
            path,
            flags,
            qos,
            None,
            tenant,
            Numbering::Remote,
            None,
            &mut 0,
        )
    }

    /// An envelope from another relay that this relay dropped before routing it (over
    /// `cluster.receive_bytes`): each connection with a matching subscription is told in
    /// its next `Gap`, as when its own queue drops a message — QoS 0 loss is visible to
    /// whom it happened, not only in a metric.
    pub(crate) fn lost_remote(&self, path: &TokenPath, n: u64) {
        let core = self.lock(self.shard_of(path.key_id()));
        let mut targets: Targets<'_> = SmallVec::new();
        let visited = core.index.for_each_match(path, |_, t| targets.push(t));
        add_dropped_once(&mut targets, n);
        drop(targets);
        drop(core);
        self.metrics.walked(visited);
    }

    /// Envelopes for the filter `pattern` that the NATS client dropped (its buffer for that
    /// subscription overflowed) before this relay saw them, so their paths are unknown:
    /// each connection with a subscription of exactly that filter — the ones the NATS
    /// subscription exists for — is told in its next `Gap`.
    pub(crate) fn lost_filter(&self, pattern: &TokenPattern, n: u64) {
        let core = self.lock(self.shard_of(pattern.key_id()));
        let mut targets: Targets<'_> = SmallVec::new();
        core.index
            .for_each_with_filter(pattern, |_, t| targets.push(t));
        add_dropped_once(&mut targets, n);
    }

    /// Envelopes to paths of `key_id` that another relay could not forward, paths unknown
    /// (a key-wide loss notice: their publisher was past its share of the sending relay's
    /// path records): each connection with a subscription of that key id is told in its
    /// next `Gap`.
    pub(crate) fn lost_key(&self, key_id: &KeyId, n: u64) {
        let core = self.lock(self.shard_of(key_id));
        let mut targets: Targets<'_> = SmallVec::new();
        core.index.for_each_in_key(key_id, |_, t| targets.push(t));
        add_dropped_once(&mut targets, n);
    }

    /// Routes a message the store numbered elsewhere (the cluster's JetStream stream), in
    /// sequence order: it becomes the last sequence and is fanned out with its sequence.
    ///
    /// Its walk is charged to its publisher when it was published at this relay: the
    /// publisher's session named its debt for that sequence ([`owe_walk`](Self::owe_walk),
    /// on the stream's acknowledgement), before or after this routing.
    pub(crate) fn publish_sequenced(&self, m: &Sequenced) -> Result<Accepted, StoreError> {
        let path = m.envelope.token_path();
        let mut walked = 0;
        let r = self.route(
            &m.envelope,
            &path,
            m.flags,
            Qos::AtLeastOnce,
            None,
            &Tenant::Local,
            Numbering::Sequenced(m.seq, m.kept),
            None,
            &mut walked,
        );
        let tokens = crate::rate::walk_tokens(walked);
        let mut d = lock(&self.debts);
        d.routed = d.routed.max(m.seq.0);
        match d.by_seq.remove(&m.seq.0) {
            Some(Owed::To(debt)) => {
                debt.fetch_add(tokens, Ordering::Relaxed);
            }
            _ if tokens > 0 => {
                d.by_seq.insert(m.seq.0, Owed::Walked(tokens));
                d.forget_old();
            }
            _ => {}
        }
        r
    }

    /// A publish at this relay that the stream numbered `seq` (its acknowledgement): the
    /// tokens of its routing walk here ([`publish_sequenced`](Self::publish_sequenced)) go
    /// to `debt`, its publisher's — now if it was routed already, else once it is.
    pub(crate) fn owe_walk(&self, seq: Seq, debt: &WalkDebt) {
        let mut d = lock(&self.debts);
        match d.by_seq.remove(&seq.0) {
            Some(Owed::Walked(tokens)) => {
                debt.fetch_add(tokens, Ordering::Relaxed);
            }
            // Routed already with a walk that cost nothing (or forgotten).
            _ if seq.0 <= d.routed => {}
            _ => {
                d.by_seq.insert(seq.0, Owed::To(debt.clone()));
                d.forget_old();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        envelope: &Envelope,
        path: &TokenPath,
        flags: u64,
        qos: Qos,
        publish_id: Option<[u8; 16]>,
        tenant: &Tenant,
        numbering: Numbering,
        wakes: Option<&mut Wakes>,
        walked: &mut usize,
    ) -> Result<Accepted, StoreError> {
        let start = Instant::now();
        let core = self.lock(self.shard_of(path.key_id()));
        let accepted = match numbering {
            Numbering::Local | Numbering::Remote => self.store.append(Append {
                path,
                envelope,
                flags,
                qos,
                publish_id,
                tenant,
            })?,
            Numbering::Unnumbered => Accepted::Live(Seq(0)),
            Numbering::Sequenced(seq, kept) => {
                self.store.advance(seq);
                if kept {
                    Accepted::New(seq)
                } else {
                    Accepted::Live(seq)
                }
            }
        };
        let (seq, stored) = match accepted {
            Accepted::New(seq) => (seq, true),
            Accepted::Live(seq) => (seq, false),
            // Pending: routed when it comes back numbered from the stream.
            Accepted::Duplicate(_) | Accepted::Pending(_) => return Ok(accepted),
        };
        if numbering == Numbering::Local {
            // Under the shard's lock, so each key id's envelopes reach NATS in
            // relay-sequence order; a non-blocking offer (a full queue is counted, never
            // waited on).
            if let Some(link) = &self.cluster {
                link.forward(envelope, flags, qos, tenant);
            }
        }
        // On the stack for a few subscribers (the common case): two allocations per routed
        // message fewer (callgrind, 1→1: see `Targets`).
        let mut targets: Targets<'_> = SmallVec::new();
        let visited = core.index.for_each_match(path, |_, t| targets.push(t));
        *walked = visited;
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|t| t.conn);
        }
        // Encoded once, for the first subscriber that takes it: a publish nobody
        // subscribed to (a flood on invented key ids) costs no copy of its envelope here.
        let mut encoded: Option<Bytes> = None;
        let encode = || msg_frame(seq.0, envelope, 0);
        let mut counts = OfferCounts::default();
        // One frame per connection, offered once all of its matching subscriptions were
        // seen (they are sorted by connection): droppable only if none of them tracks it.
        // Decided by the first one alone, a QoS 0 subscription matched before a QoS >= 1
        // one on the same connection made the QoS >= 1 one's message droppable — dropped
        // at a full queue, a Gap for a message it must get.
        let mut pending: Option<(&Arc<Target>, bool)> = None;
        // The connection's subscriptions this message matches whose delivery is paused:
        // named in its copy for the others (`Msg.paused`), so the client does not hand
        // that copy to them — theirs follows in their catch-up, in order (PROTOCOL §3.5.5
        // "Paused beside other subscriptions"). Empty nearly always.
        let mut paused: SmallVec<[u64; 2]> = SmallVec::new();
        let mut conn = None;
        let mut wake: Targets<'_> = SmallVec::new();
        for t in &targets {
            if conn != Some(t.conn) {
                // Every subscription of the previous connection seen: its frame goes.
                if let Some((p, d)) = pending.take() {
                    let frame = conn_frame(&mut encoded, &encode, &paused, seq.0, envelope);
                    counts.offer(p, &frame, d, &mut wake, &self.metrics);
                }
                paused.clear();
                conn = Some(t.conn);
            }
            if t.gated.load(Ordering::Relaxed) {
                let mut g = lock(&t.gate);
                if let Some(gate) = g.as_mut() {
                    let frame = encoded.get_or_insert_with(encode).clone();
                    let dropped = t.hold_back(gate, seq.0, envelope, frame, stored);
                    if dropped > 0 {
                        self.metrics.dropped(dropped);
                    }
                    continue;
                }
            }
            if let (Some(tr), true) = (&t.track, seq.0 == 0) {
                // Unnumbered (live-only with the JetStream store): nothing to acknowledge
                // or catch up on; skipped (and counted for a Gap) while paused.
                if !tr.unnumbered() {
                    continue;
                }
            } else if let Some(tr) = &t.track {
                // Without credit, or over the relay-wide outbound budget, the message
                // waits in the store (see `flow`).
                // A full queue pauses it too: a QoS >= 1 message is never dropped from a
                // queue (the subscriber would see a Gap for a message it must get).
                let len = encoded.get_or_insert_with(encode).len();
                let room = t.out.room_for(len);
                match tr.deliver_live(seq.0, envelope, stored, room == Room::Yes, start) {
                    Delivery::Send => {}
                    Delivery::Paused => {
                        match room {
                            Room::Yes if tr.over_budget(envelope.len()) => {
                                self.metrics.unacked_budget_paused();
                            }
                            Room::Yes => self.metrics.credit_paused(),
                            Room::Full => t.out.count_full_pause(),
                            Room::OverBudget => t.out.count_budget_pause(),
                        }
                        name_paused(&mut paused, t);
                        continue;
                    }
                    Delivery::Skipped => {
                        name_paused(&mut paused, t);
                        continue;
                    }
                }
            }
            // QoS 0 may be refused by the relay-wide budget and dropped at a full queue;
            // QoS >= 1 is bounded by credit. An unnumbered message (live-only, sequence 0)
            // to a QoS >= 1 subscription is tracked by nothing: droppable like QoS 0.
            let droppable = t.track.is_none() || seq.0 == 0;
            match &mut pending {
                Some((_, d)) => *d &= droppable,
                None => pending = Some((t, droppable)),
            }
        }
        if let Some((p, d)) = pending {
            let frame = conn_frame(&mut encoded, &encode, &paused, seq.0, envelope);
            counts.offer(p, &frame, d, &mut wake, &self.metrics);
        }
        let OfferCounts { delivered, dropped } = counts;
        // Counted before any writer can send them.
        self.metrics.published();
        self.metrics.delivered(delivered);
        if dropped > 0 {
            self.metrics.dropped(dropped);
        }
        match wakes {
            Some(w) => w.extend(wake.into_iter().map(|t| t.out.clone())),
            None => wake.into_iter().for_each(|t| t.out.wake()),
        }
        drop(targets);
        drop(core);
        self.metrics.routed(start.elapsed());
        self.metrics.walked(visited);
        Ok(accepted)
    }

    /// The last sequence assigned.
    pub(crate) fn last_seq(&self) -> Seq {
        self.store.last_seq()
    }
}
