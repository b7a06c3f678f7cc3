//! The ack queue: one slot per delivered relay sequence, in arrival (relay-sequence) order,
//! whatever became of the envelope. A slot is either handed to subscriptions that must take
//! it (at least once), or a placeholder (did not open, refused, duplicate, dropped by a
//! plugin) that the app never sees. Acks leave only for the **released prefix**: head slots
//! that are taken or placeholders. So a placeholder leaves with its neighbours and the Ack
//! stream (order and batching) says nothing about which envelopes opened (PROTOCOL §4.10).
//!
//! A slot no subscription took (held back for want of credit, or its subscriptions went
//! away before taking it) is released **unlisted**: never acked, so the relay delivers it
//! again — nothing is acked that the app did not take.

use std::collections::VecDeque;

use super::LocalSubId;

/// Identifies one slot (increasing for the life of the queue).
pub type SlotId = u64;

#[derive(Debug)]
struct Slot {
    id: SlotId,
    seq: u64,
    /// Subscriptions that were handed the message and have not taken it yet.
    waiting: Vec<LocalSubId>,
    /// Acked when released (false: released unlisted).
    listed: bool,
    /// At least one subscription took it.
    taken: bool,
}

/// Slots in relay-sequence order.
#[derive(Debug, Default)]
pub struct AckQueue {
    slots: VecDeque<Slot>,
    next: SlotId,
    ready: Vec<u64>,
}

impl AckQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// A message handed to `waiting` subscriptions (acked once all took it).
    pub fn deliver(&mut self, seq: u64, waiting: Vec<LocalSubId>) -> SlotId {
        let listed = !waiting.is_empty();
        self.push(seq, waiting, listed)
    }

    /// A placeholder: acked in order with its neighbours.
    pub fn placeholder(&mut self, seq: u64) -> SlotId {
        self.push(seq, Vec::new(), true)
    }

    /// A message held back (no credit): released in order, never acked.
    pub fn held_back(&mut self, seq: u64) -> SlotId {
        self.push(seq, Vec::new(), false)
    }

    fn push(&mut self, seq: u64, waiting: Vec<LocalSubId>, listed: bool) -> SlotId {
        let id = self.next;
        self.next += 1;
        self.slots.push_back(Slot {
            id,
            seq,
            waiting,
            listed,
            taken: false,
        });
        self.release();
        id
    }

    /// Subscription `sub` took the message of `slot`.
    pub fn taken(&mut self, slot: SlotId, sub: LocalSubId) {
        if let Ok(i) = self.slots.binary_search_by_key(&slot, |s| s.id) {
            let s = &mut self.slots[i];
            if let Some(p) = s.waiting.iter().position(|w| *w == sub) {
                s.waiting.swap_remove(p);
                s.taken = true;
            }
            self.release();
        }
    }

    /// Subscription `sub` went away: what it never took is released unlisted unless
    /// another subscription took it.
    pub fn drop_sub(&mut self, sub: LocalSubId) {
        for s in self.slots.iter_mut() {
            if let Some(p) = s.waiting.iter().position(|w| *w == sub) {
                s.waiting.swap_remove(p);
                if s.waiting.is_empty() && !s.taken {
                    s.listed = false;
                }
            }
        }
        self.release();
    }

    fn release(&mut self) {
        while self.slots.front().is_some_and(|s| s.waiting.is_empty()) {
            if let Some(s) = self.slots.pop_front() {
                if s.listed && s.seq > 0 {
                    self.ready.push(s.seq);
                }
            }
        }
    }

    /// Sequences released since the last call, in order, to send as `Ack` frames.
    pub fn take_ready(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.ready)
    }

    /// Whether acks are waiting to leave.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Slots not yet released.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }

    /// The connection dropped: the relay redelivers everything unacknowledged.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.ready.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_leave_in_order_with_their_neighbours() {
        let mut q = AckQueue::new();
        let a = q.deliver(1, vec![7]);
        q.placeholder(2);
        let c = q.deliver(3, vec![7, 8]);
        q.placeholder(4);
        assert!(
            q.take_ready().is_empty(),
            "nothing before the head is taken"
        );
        q.taken(a, 7);
        assert_eq!(q.take_ready(), vec![1, 2]);
        q.taken(c, 7);
        assert!(q.take_ready().is_empty());
        q.taken(c, 8);
        assert_eq!(q.take_ready(), vec![3, 4]);
    }

    #[test]
    fn held_back_and_untaken_slots_are_never_acked() {
        let mut q = AckQueue::new();
        q.held_back(1);
        let b = q.deliver(2, vec![1, 2]);
        let c = q.deliver(3, vec![1]);
        q.placeholder(4);
        q.taken(b, 2);
        q.drop_sub(1);
        assert_eq!(q.take_ready(), vec![2, 4], "3 was never taken: not acked");
        q.taken(c, 1); // stale: ignored
        assert_eq!(q.pending(), 0);
    }
}
