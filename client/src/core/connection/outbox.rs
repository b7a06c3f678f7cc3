//! What the engine holds to send: the transmit queue (frames, dials and hang-ups in the
//! order the driver must act on them), the QoS ≥ 1 outbox (kept with its publish id until
//! `PubAck`, re-sent with the same id after every reconnect) and the QoS 0 offline buffer
//! (capped in bytes).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

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
        self.restore(pid, order, frame.clone());
        if live {
            self.push(Transmit::Frame(frame), Kind::Kept);
        }
        order
    }

    /// A publish a previous run kept (same id, same order).
    pub(super) fn restore(&mut self, pid: PublishId, order: u64, frame: Bytes) {
        if self.kept_index.contains_key(&pid) {
            return;
        }
        self.next_order = self.next_order.max(order + 1);
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
