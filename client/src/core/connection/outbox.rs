//! What the engine holds to send: the transmit queue (frames, dials and hang-ups in the
//! order the driver must act on them), the QoS ≥ 1 outbox (kept with its publish id until
//! `PubAck`, re-sent with the same id after every reconnect) and the QoS 0 offline buffer
//! (capped in bytes).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use whispeer_protocol::{Frame, Qos};

use super::{ConnId, PublishId, Transmit};

/// Why a queued frame is there: decides what happens to it when the connection drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Control frame (Sub, Ack, Ping...): meaningless on the next connection; dropped.
    Control,
    /// A QoS 0 publish: back to the offline buffer, in order, if not yet written.
    Pub0(Option<PublishId>),
    /// A kept QoS ≥ 1 publish: the outbox re-sends it anyway.
    Kept,
}

#[derive(Debug, Default)]
pub(super) struct Outbox {
    queue: VecDeque<(Transmit, Kind)>,
    queued_bytes: usize,
    kept: BTreeMap<u64, (PublishId, Bytes)>,
    kept_index: BTreeMap<PublishId, u64>,
    next_order: u64,
    kept_bytes: usize,
    offline: VecDeque<(Bytes, Option<PublishId>)>,
    offline_bytes: usize,
    /// QoS 0 publishes waiting for a `PubAck`, wherever they are.
    ack0: BTreeSet<PublishId>,
    /// Those of `ack0` already handed to the driver on the current connection.
    written0: BTreeSet<PublishId>,
    /// Saved kept publishes refused by [`Outbox::restore`] (not a QoS ≥ 1 `Pub` of their
    /// own publish id, or an impossible order).
    restore_refused: u64,
}

/// The largest saved order [`Outbox::restore`] takes. Orders count the publishes ever kept
/// (from 0), so no run gets near it; a larger one (u64::MAX from a tampered file) would
/// leave later publishes no distinct order to take.
const MAX_ORDER: u64 = u64::MAX / 2;

/// Whether `frame` (saved with `order`) is what `Outbox::keep` keeps for `pid`: a `Pub`
/// frame with QoS ≥ 1 and publish id `pid`, at an order up to `MAX_ORDER` (`u64::MAX / 2`); else why not.
/// A loader of saved state may check its records with it before the engine does.
pub fn kept_frame_check(pid: &PublishId, order: u64, frame: &Bytes) -> Result<(), &'static str> {
    if order > MAX_ORDER {
        return Err("an order no run reaches");
    }
    match Frame::decode(frame) {
        Ok(Frame::Pub(p)) if p.qos == Qos::AtMostOnce => Err("a QoS 0 Pub frame"),
        Ok(Frame::Pub(p)) if p.publish_id != Some(pid.0) => {
            Err("a Pub frame with another publish id")
        }
        Ok(Frame::Pub(_)) => Ok(()),
        Ok(_) => Err("not a Pub frame"),
        Err(_) => Err("not a frame"),
    }
}

impl Outbox {
    fn push(&mut self, t: Transmit, kind: Kind) {
        if let Transmit::Frame(b) = &t {
            self.queued_bytes += b.len();
        }
        self.queue.push_back((t, kind));
    }

    pub(super) fn control(&mut self, frame: Bytes) {
        self.push(Transmit::Frame(frame), Kind::Control);
    }

    pub(super) fn dial(&mut self, c: ConnId) {
        self.push(Transmit::Dial(c), Kind::Control);
    }

    pub(super) fn hangup(&mut self, c: ConnId) {
        self.push(Transmit::Hangup(c), Kind::Control);
    }

    /// The next thing for the driver to do.
    pub(super) fn pop(&mut self) -> Option<Transmit> {
        let (t, kind) = self.queue.pop_front()?;
        if let Transmit::Frame(b) = &t {
            self.queued_bytes -= b.len();
        }
        if let Kind::Pub0(Some(pid)) = kind {
            self.written0.insert(pid);
        }
        Some(t)
    }

    /// Bytes of frames queued and not yet taken by the driver.
    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Keeps a QoS ≥ 1 publish; queues it at once when `live`.
    pub(super) fn keep(&mut self, pid: PublishId, frame: Bytes, live: bool) -> u64 {
        let order = self.next_order;
        self.insert_kept(pid, order, frame.clone());
        if live {
            self.push(Transmit::Frame(frame), Kind::Kept);
        }
        order
    }

    /// A publish a previous run kept (same id, same order), as saved state gives it back
    /// (the Rust client's SQLite file, the npm client's log). Returns whether it was taken.
    ///
    /// Saved state is not authenticated (whoever can write the file or the IndexedDB
    /// database can add a record with a valid check), and every kept frame goes out on the
    /// client's authenticated relay session after each handshake (`go_live`). So the bytes
    /// must be what [`Outbox::keep`] would have kept for `pid`: a `Pub` frame with QoS ≥ 1
    /// whose publish id is `pid`, at an order a run can reach. Anything else is skipped,
    /// logged and counted ([`Outbox::restore_refused`]), never sent: a `Sub`, `Unsub` or
    /// `Close` (sent under credentials the writer never saw), a `Pub` of another id (the
    /// `PubAck` of `pid` never settles it: re-sent after every reconnect), a QoS 0 `Pub`.
    /// One bad record costs only itself: the rest of the state still loads. (Review
    /// session 27, F2.)
    pub(super) fn restore(&mut self, pid: PublishId, order: u64, frame: Bytes) -> bool {
        // Two records of one order (review 27b, C1): the second would replace the first in
        // `kept` while both stayed counted in `kept_index`/`kept_bytes` for good.
        let taken = self.kept.contains_key(&order) && !self.kept_index.contains_key(&pid);
        let check = if taken {
            Err("an order another saved publish has")
        } else {
            kept_frame_check(&pid, order, &frame)
        };
        if let Err(why) = check {
            self.restore_refused += 1;
            tracing::warn!(
                publish_id = ?pid,
                order,
                len = frame.len(),
                why,
                "a saved kept publish is not one: skipped, not sent"
            );
            return false;
        }
        self.insert_kept(pid, order, frame);
        true
    }

    /// Saved kept publishes [`Outbox::restore`] skipped.
    pub(super) fn restore_refused(&self) -> u64 {
        self.restore_refused
    }

    fn insert_kept(&mut self, pid: PublishId, order: u64, frame: Bytes) {
        if self.kept_index.contains_key(&pid) {
            return;
        }
        // A saved order of u64::MAX (no honest run gets there) must not overflow.
        self.next_order = self.next_order.max(order.saturating_add(1));
        self.kept_bytes += frame.len();
        self.kept.insert(order, (pid, frame));
        self.kept_index.insert(pid, order);
    }

    pub(super) fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }

    /// Whether `pid` is a kept publish still waiting for its `PubAck`.
    pub(super) fn is_kept(&self, pid: &PublishId) -> bool {
        self.kept_index.contains_key(pid)
    }

    /// Queues a kept publish again (a retry after a retryable refusal), same id.
    pub(super) fn resend(&mut self, pid: &PublishId) {
        if let Some((_, f)) = self.kept_index.get(pid).and_then(|o| self.kept.get(o)) {
            let f = f.clone();
            self.push(Transmit::Frame(f), Kind::Kept);
        }
    }

    pub(super) fn kept_len(&self) -> usize {
        self.kept.len()
    }

    /// The frame and order of a kept publish (to persist it).
    pub(super) fn kept_entry(&self, pid: &PublishId) -> Option<(u64, Bytes)> {
        let order = *self.kept_index.get(pid)?;
        self.kept.get(&order).map(|(_, f)| (order, f.clone()))
    }

    /// A QoS 0 publish while live.
    pub(super) fn send0(&mut self, frame: Bytes, pid: Option<PublishId>) {
        if let Some(p) = pid {
            self.ack0.insert(p);
        }
        self.push(Transmit::Frame(frame), Kind::Pub0(pid));
    }

    /// A QoS 0 publish while offline: buffered unless over `cap` bytes.
    pub(super) fn buffer0(&mut self, frame: Bytes, pid: Option<PublishId>, cap: usize) -> bool {
        if self.offline_bytes + frame.len() > cap {
            return false;
        }
        if let Some(p) = pid {
            self.ack0.insert(p);
        }
        self.offline_bytes += frame.len();
        self.offline.push_back((frame, pid));
        true
    }

    /// The relay acknowledged or refused `pid`: whether it was waiting (kept, or QoS 0
    /// with an ack).
    pub(super) fn settle(&mut self, pid: &PublishId) -> bool {
        if let Some(order) = self.kept_index.remove(pid) {
            if let Some((_, f)) = self.kept.remove(&order) {
                self.kept_bytes -= f.len();
            }
            return true;
        }
        self.written0.remove(pid);
        self.ack0.remove(pid)
    }

    /// Handshake done: every kept publish in order, then the offline buffer. A publish
    /// whose frame is over the relay's `max_frame` is taken out instead of sent (the relay
    /// would close the connection on it, and a kept one would be re-sent after every
    /// reconnect — a poison publish): returned as (kept ones, QoS 0 ones), for the engine
    /// to fail.
    pub(super) fn go_live(&mut self, max_frame: usize) -> (Vec<PublishId>, Vec<Option<PublishId>>) {
        let over: Vec<(u64, PublishId)> = self
            .kept
            .iter()
            .filter(|(_, (_, f))| f.len() > max_frame)
            .map(|(o, (p, _))| (*o, *p))
            .collect();
        for (o, p) in &over {
            if let Some((_, f)) = self.kept.remove(o) {
                self.kept_bytes -= f.len();
            }
            self.kept_index.remove(p);
        }
        let kept: Vec<Bytes> = self.kept.values().map(|(_, f)| f.clone()).collect();
        for f in kept {
            self.push(Transmit::Frame(f), Kind::Kept);
        }
        self.offline_bytes = 0;
        let mut over0 = Vec::new();
        while let Some((f, pid)) = self.offline.pop_front() {
            if f.len() > max_frame {
                if let Some(p) = &pid {
                    self.ack0.remove(p);
                }
                over0.push(pid);
                continue;
            }
            self.push(Transmit::Frame(f), Kind::Pub0(pid));
        }
        (over.into_iter().map(|(_, p)| p).collect(), over0)
    }

    /// The connection dropped: frames not yet written are dropped, except QoS 0 publishes,
    /// which go back to the front of the offline buffer in order (they may exceed its cap:
    /// they were accepted). Returns the QoS 0 publishes written and never acknowledged.
    pub(super) fn lost(&mut self) -> Vec<PublishId> {
        let mut back = Vec::new();
        let mut keep = VecDeque::new();
        for (t, kind) in self.queue.drain(..) {
            match (t, kind) {
                (Transmit::Frame(f), Kind::Pub0(pid)) => back.push((f, pid)),
                (Transmit::Frame(_), _) => {}
                (t, k) => keep.push_back((t, k)),
            }
        }
        self.queue = keep;
        self.queued_bytes = 0;
        for (f, pid) in back.into_iter().rev() {
            self.offline_bytes += f.len();
            self.offline.push_front((f, pid));
        }
        let failed: Vec<PublishId> = std::mem::take(&mut self.written0).into_iter().collect();
        for p in &failed {
            self.ack0.remove(p);
        }
        failed
    }

    /// The engine closed: every publish still waiting for an outcome (kept ones first, in
    /// order), and the number of buffered QoS 0 publishes without an ack that never left.
    /// The transmit queue stays: what is queued is written before the `Close` frame.
    pub(super) fn close(&mut self) -> (Vec<PublishId>, u64) {
        let mut pids: Vec<PublishId> = self.kept.values().map(|(p, _)| *p).collect();
        pids.extend(self.ack0.iter().copied());
        let unsent = self.offline.iter().filter(|(_, pid)| pid.is_none()).count() as u64;
        self.kept.clear();
        self.kept_index.clear();
        self.kept_bytes = 0;
        self.offline.clear();
        self.offline_bytes = 0;
        self.ack0.clear();
        self.written0.clear();
        (pids, unsent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use whispeer_protocol::frame::{Close, ErrorCode, Unsub};
    use whispeer_protocol::{Keyring, MessageId, Outgoing, SealOptions, Sealer, Topic, TreeKey};

    /// A genuine `Pub` frame for `pid` with `qos`, as the engine builds it.
    fn pub_frame(pid: [u8; 16], qos: Qos) -> Bytes {
        let tk = TreeKey::generate_with("o", &mut OsRng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let key = kr.topic_key(&Topic::new("a/b").unwrap()).unwrap();
        let out = Outgoing {
            payload: b"x",
            content_type: "application/octet-stream",
            msg_id: MessageId::random(&mut OsRng),
            ts_ms: 1_000,
        };
        let env = Sealer::new()
            .seal(&key, &out, &SealOptions::default(), None, &mut OsRng)
            .unwrap();
        crate::core::pub_frame(env, Some(pid), false, qos).to_bytes()
    }

    /// Every frame `go_live` queues.
    fn sent(o: &mut Outbox) -> Vec<Bytes> {
        o.go_live(usize::MAX);
        std::iter::from_fn(|| o.pop())
            .filter_map(|t| match t {
                Transmit::Frame(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_restored_record_that_is_not_its_own_kept_pub_is_never_sent() {
        let pid = PublishId([1; 16]);
        let good = pub_frame(pid.0, Qos::AtLeastOnce);
        let not_pub = [
            Frame::Close(Close {
                code: ErrorCode::Malformed,
                message: "bye".into(),
            })
            .to_bytes(),
            Frame::Unsub(Unsub {
                sub_id: 1,
                delete: Some(true),
            })
            .to_bytes(),
            Bytes::from_static(b"not a frame at all"),
        ];
        let mut o = Outbox::default();
        for (i, f) in not_pub.iter().enumerate() {
            assert!(!o.restore(PublishId([10 + i as u8; 16]), i as u64, f.clone()));
        }
        // A genuine Pub of another publish id: its PubAck would never settle this record,
        // so it would be re-sent after every reconnect.
        let other = pub_frame([2; 16], Qos::AtLeastOnce);
        assert!(!o.restore(pid, 10, other));
        // A QoS 0 Pub is never kept.
        let qos0 = pub_frame([3; 16], Qos::AtMostOnce);
        assert!(!o.restore(PublishId([3; 16]), 11, qos0));
        assert_eq!(o.restore_refused(), 5);
        assert_eq!((o.kept_len(), o.kept_bytes()), (0, 0));
        assert!(sent(&mut o).is_empty(), "nothing refused goes out");
        // The genuine record still loads next to them, and is the only one sent.
        let mut o = Outbox::default();
        for (i, f) in not_pub.iter().enumerate() {
            o.restore(PublishId([10 + i as u8; 16]), i as u64, f.clone());
        }
        assert!(o.restore(pid, 12, good.clone()));
        assert!(o.is_kept(&pid));
        assert_eq!(sent(&mut o), [good]);
    }

    #[test]
    fn a_restored_order_of_u64_max_does_not_overflow() {
        let mut o = Outbox::default();
        let a = PublishId([1; 16]);
        // Refused (no honest run gets there), without a panic.
        assert!(!o.restore(a, u64::MAX, pub_frame(a.0, Qos::ExactlyOnce)));
        assert!(!o.is_kept(&a));
        // The largest order taken still leaves room: later publishes keep distinct orders.
        let b = PublishId([2; 16]);
        assert!(o.restore(b, MAX_ORDER, pub_frame(b.0, Qos::AtLeastOnce)));
        let c = o.keep(
            PublishId([3; 16]),
            pub_frame([3; 16], Qos::AtLeastOnce),
            false,
        );
        let d = o.keep(
            PublishId([4; 16]),
            pub_frame([4; 16], Qos::AtLeastOnce),
            false,
        );
        assert_eq!((c, d), (MAX_ORDER + 1, MAX_ORDER + 2));
        assert_eq!(o.kept_len(), 3);
    }

    /// Review 27b, C1: a second saved record with an order another one has is refused;
    /// before, it replaced the first in the order map while both stayed counted (the first
    /// never sent nor settled, its bytes held against the outbox's bound for good).
    #[test]
    fn two_saved_publishes_of_one_order_keep_only_the_first() {
        let mut o = Outbox::default();
        let (a, b) = (PublishId([1; 16]), PublishId([2; 16]));
        let fa = pub_frame(a.0, Qos::AtLeastOnce);
        assert!(o.restore(a, 5, fa.clone()));
        assert!(!o.restore(b, 5, pub_frame(b.0, Qos::AtLeastOnce)));
        assert!(!o.is_kept(&b));
        assert_eq!(o.kept_bytes(), fa.len());
        assert_eq!(sent(&mut o), vec![fa]);
        // The same record twice is no conflict (loaded once).
        assert!(o.restore(a, 5, pub_frame(a.0, Qos::AtLeastOnce)));
        assert_eq!(o.restore_refused(), 1);
    }
}
