//! The ack queue: one slot per delivered relay sequence, whatever became of the envelope.
//! A slot is either handed to subscriptions that must take it (at least once), or a
//! placeholder (did not open, refused, duplicate, dropped by a plugin) that the app never
//! sees. Each slot belongs to the subscriptions the relay routed it to (matched on the
//! envelope's routing tokens, which the relay sees too, so the client can attribute even an
//! envelope it cannot open; a history message naming its subscription belongs to that one
//! alone, `ClientCore::route_acking`). Per subscription, acks leave only for the **released prefix**:
//! a slot leaves once it is taken or a placeholder and every earlier slot of each of its
//! subscriptions has left. So a placeholder leaves with its neighbours and the Ack stream
//! (order and batching) says nothing about which envelopes opened (PROTOCOL §4.10), while
//! a subscription whose app stopped reading never holds back the acks of another one.
//!
//! A slot no subscription took (held back for want of credit, or its subscriptions went
//! away before taking it) is released **unlisted**: never acked, so the relay delivers it
//! again — nothing is acked that the app did not take. A held-back slot still waiting its
//! turn when the relay's copy of that sequence comes for every subscription it was routed
//! to (a catch-up from the store, a redelivery) leaves like a placeholder instead: that
//! copy, once taken, is acked ([`AckQueue::deliver`]).
//!
//! An `Ack` names a sequence, and the relay frees it for **every** at-least-once
//! subscription of the connection (PROTOCOL §3.5). One relay sequence can take several
//! slots (a live copy handed to one subscription, a replayed copy of it another passed as
//! a duplicate), so acks are per sequence: a sequence is acked once every slot of it is
//! released, and only if none was released unlisted — a copy one subscription passed
//! never acknowledges what another has not taken yet.
//!
//! A subscription can also be **owed** a sequence before it has a slot of it: a live
//! message the relay holds back for a subscription still in its history (PROTOCOL §3.5.5
//! "Hand-over beside other subscriptions") reaches the client for a neighbour at once,
//! and the relay's own copy for the first one follows after its `ReplayDone`. An `Ack` of
//! the neighbour's copy that reached the relay after that copy was sent would free it
//! too, before it was taken: so the sequence is not acked while it is owed
//! ([`AckQueue::owe`]). The debt passes to the owed subscription's own slot of the
//! sequence when it comes (acked once that one is released, like any slot), and is
//! cancelled when the subscription goes away ([`AckQueue::drop_sub`]) or its relay
//! subscriptions are replaced ([`AckQueue::forgive_owed`], a key refresh), or the
//! connection drops ([`AckQueue::clear`]: its acks never go out on another connection).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use super::LocalSubId;

/// Identifies one slot (increasing for the life of the queue).
pub type SlotId = u64;

#[derive(Debug)]
struct Slot {
    seq: u64,
    /// The subscriptions the relay routed it to (their order binds it).
    routed: Vec<LocalSubId>,
    /// Subscriptions that were handed the message and have not taken it yet.
    waiting: Vec<LocalSubId>,
    /// Acked when released (false: released unlisted).
    listed: bool,
    /// At least one subscription took it.
    taken: bool,
}

/// Slots in relay-sequence order per subscription.
#[derive(Debug, Default)]
pub struct AckQueue {
    slots: BTreeMap<SlotId, Slot>,
    queues: HashMap<LocalSubId, VecDeque<SlotId>>,
    next: SlotId,
    ready: Vec<u64>,
    /// Per relay sequence (> 0): its slots not yet released plus the subscriptions it is
    /// owed to (`owed`), and whether one was released unlisted (then it is never acked).
    seqs: HashMap<u64, (usize, bool)>,
    /// Per subscription: the sequences it is owed its own copy of and has no slot of yet
    /// ([`AckQueue::owe`]); each counts in `seqs` like a slot not yet released.
    owed: HashMap<LocalSubId, HashSet<u64>>,
    /// Per relay sequence: its held-back slots ([`AckQueue::held_back`]) not yet released,
    /// unlisted until a copy of it comes for every subscription they were routed to (see
    /// [`AckQueue::deliver`]).
    held: HashMap<u64, Vec<SlotId>>,
    /// Per (subscription, relay sequence > 0): how many slots of it that subscription was
    /// handed and has not taken ([`AckQueue::holds`]).
    handed: HashMap<(LocalSubId, u64), u32>,
}

impl AckQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// A message routed to `routed` and handed to `waiting` (acked once all took it).
    ///
    /// A copy of a sequence held back earlier whose held-back slot is still waiting its
    /// turn (behind untaken slots): the relay sent it again (its catch-up, a redelivery),
    /// and once every subscription that slot was routed to has this one too, the held-back
    /// slot no longer keeps the sequence from being acked — it leaves in order like a
    /// placeholder, and the sequence is acked once this copy is taken. Released unlisted,
    /// it kept the relay's copy unacknowledged, its credit spent, until the ack timeout.
    pub fn deliver(&mut self, seq: u64, routed: &[LocalSubId], waiting: Vec<LocalSubId>) -> SlotId {
        let listed = !waiting.is_empty();
        self.push(seq, routed, waiting, listed)
    }

    /// A placeholder: acked in order with its neighbours.
    pub fn placeholder(&mut self, seq: u64, routed: &[LocalSubId]) -> SlotId {
        self.push(seq, routed, Vec::new(), true)
    }

    /// A message held back (no credit): released in order, never acked.
    pub fn held_back(&mut self, seq: u64, routed: &[LocalSubId]) -> SlotId {
        self.push(seq, routed, Vec::new(), false)
    }

    /// Subscription `sub` is owed its own copy of sequence `seq` (the relay held back a
    /// live message for it, PROTOCOL §3.5.5): `seq` is not acked — whatever other slots of
    /// it are released — until `sub` has a slot of it that is released too, or goes away.
    /// Owing it again is nothing new. The caller bounds how many a subscription is owed:
    /// the core owes only sequences its `skipped` map remembers, which takes every
    /// held-back sequence at first sight (new, duplicate, unopenable or held back for
    /// room alike) and holds at most its bound (`MAX_GOT`).
    pub fn owe(&mut self, seq: u64, sub: LocalSubId) {
        if seq > 0 && self.owed.entry(sub).or_default().insert(seq) {
            self.seqs.entry(seq).or_insert((0, false)).0 += 1;
        }
    }

    /// How many slots of sequence `seq` (> 0) subscription `sub` was handed and has not
    /// taken yet. One: another copy of that sequence is one it holds already (the relay's
    /// catch-up or redelivery of a message it has not read yet), and its placeholder behind
    /// it needs no room of its own — held back for want of room, that copy kept the
    /// sequence unacknowledged (the relay's credit spent) until the ack timeout. One such
    /// placeholder per sequence at most, so what it holds stays within twice its room.
    pub fn holds(&self, sub: LocalSubId, seq: u64) -> u32 {
        if seq == 0 {
            return 0;
        }
        self.handed.get(&(sub, seq)).copied().unwrap_or(0)
    }

    /// `sub`'s untaken slot of `seq` is gone (taken, or `sub` went away).
    fn unhand(&mut self, sub: LocalSubId, seq: u64) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.handed.entry((sub, seq)) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Sequences owed to subscriptions, all told.
    pub fn owed_len(&self) -> usize {
        self.owed.values().map(HashSet::len).sum()
    }

    /// Cancels one debt of `seq` (its subscription went away): acked now if that was the
    /// last thing holding it and no slot of it was released unlisted.
    fn forgive(&mut self, seq: u64) {
        self.settle(seq, true);
    }

    /// One slot of `seq` (or a debt of it) is released, `listed` or not.
    fn settle(&mut self, seq: u64, listed: bool) {
        if let Some(e) = self.seqs.get_mut(&seq) {
            e.0 -= 1;
            e.1 |= !listed;
            if e.0 == 0 {
                let unlisted = e.1;
                self.seqs.remove(&seq);
                if !unlisted {
                    self.ready.push(seq);
                }
            }
        }
    }

    fn push(
        &mut self,
        seq: u64,
        routed: &[LocalSubId],
        waiting: Vec<LocalSubId>,
        listed: bool,
    ) -> SlotId {
        let id = self.next;
        self.next += 1;
        let mut all: Vec<LocalSubId> = routed.to_vec();
        for w in &waiting {
            if !all.contains(w) {
                all.push(*w);
            }
        }
        if seq > 0 {
            for w in &waiting {
                *self.handed.entry((*w, seq)).or_insert(0) += 1;
            }
            if listed {
                // A copy for everyone an earlier held-back slot of it was routed to.
                if let Some(ids) = self.held.get_mut(&seq) {
                    let slots = &mut self.slots;
                    ids.retain(|h| match slots.get_mut(h) {
                        Some(s) if s.routed.iter().all(|r| all.contains(r)) => {
                            s.listed = true;
                            false
                        }
                        Some(_) => true,
                        None => false,
                    });
                    if ids.is_empty() {
                        self.held.remove(&seq);
                    }
                }
            } else if waiting.is_empty() {
                self.held.entry(seq).or_default().push(id);
            }
        }
        // A subscription owed `seq` that this slot is its own copy for: the debt becomes
        // this slot (counted in `seqs` already).
        let mut paid = false;
        for r in &all {
            self.queues.entry(*r).or_default().push_back(id);
            if let Some(o) = self.owed.get_mut(r) {
                if o.remove(&seq) {
                    if o.is_empty() {
                        self.owed.remove(r);
                    }
                    if paid {
                        self.forgive(seq); // two owed ones share this slot: one count
                    }
                    paid = true;
                }
            }
        }
        if seq > 0 && !paid {
            self.seqs.entry(seq).or_insert((0, false)).0 += 1;
        }
        self.slots.insert(
            id,
            Slot {
                seq,
                routed: all,
                waiting,
                listed,
                taken: false,
            },
        );
        self.release_from(vec![id]);
        id
    }

    /// Subscription `sub` took the message of `slot`.
    pub fn taken(&mut self, slot: SlotId, sub: LocalSubId) {
        if let Some(s) = self.slots.get_mut(&slot) {
            let mut unhand = None;
            if let Some(p) = s.waiting.iter().position(|w| *w == sub) {
                s.waiting.swap_remove(p);
                s.taken = true;
                unhand = Some(s.seq);
            }
            if let Some(seq) = unhand.filter(|q| *q > 0) {
                self.unhand(sub, seq);
            }
            self.release_from(vec![slot]);
        }
    }

    /// Subscription `sub` went away: a slot it was handed and never took is released
    /// unlisted, even one another subscription took — and with it its sequence (see the
    /// module docs): acked, the relay would free it for this one too, and a durable that
    /// resumes later would never get it. Unacked, the relay delivers it again.
    /// What it was owed and never got a slot of is no longer owed: acked once nothing
    /// else holds it.
    pub fn drop_sub(&mut self, sub: LocalSubId) {
        self.forgive_owed(sub);
        let Some(q) = self.queues.remove(&sub) else {
            return;
        };
        let mut check = Vec::new();
        let mut untaken = Vec::new();
        for id in q {
            if let Some(s) = self.slots.get_mut(&id) {
                s.routed.retain(|r| *r != sub);
                if let Some(p) = s.waiting.iter().position(|w| *w == sub) {
                    s.waiting.swap_remove(p);
                    s.listed = false;
                    untaken.push(s.seq);
                }
                check.push(id);
            }
        }
        for seq in untaken.into_iter().filter(|s| *s > 0) {
            self.unhand(sub, seq);
        }
        self.release_from(check);
    }

    /// Subscription `sub` is owed nothing any more (its relay subscriptions were replaced:
    /// the relay's copies held back for them never come): each sequence it was owed is
    /// acked once nothing else holds it. Its slots stay (the app may still take them).
    pub fn forgive_owed(&mut self, sub: LocalSubId) {
        let mut owed: Vec<u64> = self.owed.remove(&sub).into_iter().flatten().collect();
        owed.sort_unstable();
        for seq in owed {
            self.forgive(seq);
        }
    }

    /// Subscription `sub` is no longer owed `seq` (the relay's copy will not come): acked
    /// once nothing else holds it. Nothing if it was not owed (its copy came already).
    pub fn forgive_one(&mut self, sub: LocalSubId, seq: u64) {
        let Some(o) = self.owed.get_mut(&sub) else {
            return;
        };
        if o.remove(&seq) {
            if o.is_empty() {
                self.owed.remove(&sub);
            }
            self.forgive(seq);
        }
    }

    /// Releases every slot that can go, starting from `check`.
    fn release_from(&mut self, mut check: Vec<SlotId>) {
        while let Some(id) = check.pop() {
            let Some(s) = self.slots.get(&id) else {
                continue;
            };
            let at_heads = s
                .routed
                .iter()
                .all(|r| self.queues.get(r).and_then(|q| q.front()) == Some(&id));
            if !s.waiting.is_empty() || !at_heads {
                continue;
            }
            let s = self.slots.remove(&id).expect("present");
            if !s.listed {
                if let Some(ids) = self.held.get_mut(&s.seq) {
                    ids.retain(|h| *h != id);
                    if ids.is_empty() {
                        self.held.remove(&s.seq);
                    }
                }
            }
            self.settle(s.seq, s.listed);
            for r in &s.routed {
                if let Some(q) = self.queues.get_mut(r) {
                    q.pop_front();
                    if let Some(next) = q.front() {
                        check.push(*next);
                    }
                }
            }
        }
    }

    /// Sequences released since the last call, to send as `Ack` frames.
    pub fn take_ready(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.ready)
    }

    /// Whether acks are waiting to leave.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// How many acks are waiting to leave.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Returns sequences taken with [`AckQueue::take_ready`] and not sent yet (they go
    /// first next time, in order).
    pub fn put_back(&mut self, mut seqs: Vec<u64>) {
        seqs.append(&mut self.ready);
        self.ready = seqs;
    }

    /// Slots not yet released.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }

    /// The connection dropped: the relay redelivers everything unacknowledged. Debts go
    /// too: an ack held for one is never sent on another connection (sequences are acked
    /// per connection).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.queues.clear();
        self.ready.clear();
        self.seqs.clear();
        self.owed.clear();
        self.held.clear();
        self.handed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_leave_in_order_with_their_neighbours() {
        let mut q = AckQueue::new();
        let a = q.deliver(1, &[7], vec![7]);
        q.placeholder(2, &[7]);
        let c = q.deliver(3, &[7, 8], vec![7, 8]);
        q.placeholder(4, &[7, 8]);
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
    fn a_stalled_subscription_does_not_hold_back_another() {
        let mut q = AckQueue::new();
        let _slow = q.deliver(1, &[1], vec![1]);
        let fast = q.deliver(2, &[2], vec![2]);
        q.placeholder(3, &[1]);
        q.placeholder(4, &[2]);
        q.taken(fast, 2);
        assert_eq!(q.take_ready(), vec![2, 4]);
        assert_eq!(q.pending(), 2, "1 and the placeholder behind it wait");
    }

    /// A sequence one subscription never took is not acked through another slot of it —
    /// another subscription's placeholder (a replayed copy it passed) or its taking of the
    /// same message: the ack would free it for the first one too.
    #[test]
    fn a_sequence_a_dropped_subscription_never_took_is_not_acked_through_another_slot() {
        let mut q = AckQueue::new();
        // Sub 1 is handed seq 7 (slot a); sub 2 later passes a placeholder of seq 7 (b).
        let a = q.deliver(7, &[1], vec![1]);
        let b = q.deliver(7, &[1, 2], vec![1, 2]);
        q.taken(b, 2);
        q.drop_sub(1);
        assert!(q.take_ready().is_empty(), "seq 7 was never taken by sub 1");
        let _ = a;
        // Both handed one slot: one takes it, the other goes away untaken.
        let c = q.deliver(8, &[2, 3], vec![2, 3]);
        q.taken(c, 2);
        q.drop_sub(3);
        assert!(q.take_ready().is_empty(), "seq 8 was never taken by sub 3");
        // Taken by everyone it was handed to: acked as before.
        let d = q.deliver(9, &[2], vec![2]);
        q.taken(d, 2);
        assert_eq!(q.take_ready(), vec![9]);
    }

    /// Review finding: one subscription holds a live copy of sequence 5 untaken while
    /// another passes a replayed copy of it (a duplicate for that one): the placeholder
    /// does not ack 5 — the relay would free it for the first subscription too. Acked once
    /// the first one takes it; never if it goes away untaken.
    #[test]
    fn a_copy_one_subscription_passed_does_not_ack_what_another_holds() {
        let mut q = AckQueue::new();
        let live = q.deliver(5, &[1], vec![1]);
        q.placeholder(5, &[2]);
        assert!(q.take_ready().is_empty(), "sub 1 has not taken 5");
        q.taken(live, 1);
        assert_eq!(q.take_ready(), vec![5]);
        let live = q.deliver(6, &[1], vec![1]);
        q.placeholder(6, &[2]);
        q.drop_sub(1);
        assert!(q.take_ready().is_empty(), "6 went away untaken");
        let _ = live;
        assert_eq!(q.pending(), 0);
        assert!(q.seqs.is_empty());
    }

    /// Review finding: sequence 5 is owed to sub 2 (the relay held the live message back
    /// for it during its history) while sub 1 takes it: not acked until sub 2's own copy
    /// is released too — once. Owed to two subscriptions sharing one slot of the copy, it
    /// counts once. Forgiven when the owed subscription goes away; gone with the
    /// connection, never acked on the next.
    #[test]
    fn a_sequence_owed_to_a_subscription_waits_for_its_own_copy() {
        let mut q = AckQueue::new();
        q.owe(5, 2);
        q.owe(5, 2); // again (a redelivery held back too): nothing new
        let a = q.deliver(5, &[1], vec![1]);
        q.taken(a, 1);
        assert!(q.take_ready().is_empty(), "5 is owed to sub 2");
        assert_eq!(q.owed_len(), 1);
        let b = q.deliver(5, &[1, 2], vec![1, 2]);
        assert_eq!(q.owed_len(), 0, "the debt is that slot now");
        q.taken(b, 1);
        assert!(q.take_ready().is_empty(), "sub 2 has not taken its copy");
        q.taken(b, 2);
        assert_eq!(q.take_ready(), vec![5]);
        assert!(q.seqs.is_empty());

        // Two owed subscriptions, one slot for both.
        q.owe(6, 2);
        q.owe(6, 3);
        q.placeholder(6, &[1]);
        let c = q.deliver(6, &[2, 3], vec![2, 3]);
        q.taken(c, 2);
        assert!(q.take_ready().is_empty());
        q.taken(c, 3);
        assert_eq!(q.take_ready(), vec![6]);

        // Forgiven: the owed subscription went away before its copy came.
        q.owe(7, 2);
        q.placeholder(7, &[1]);
        assert!(q.take_ready().is_empty());
        q.drop_sub(2);
        assert_eq!(q.take_ready(), vec![7]);

        // Held back (no credit) when its copy came: never acked on this connection.
        q.owe(8, 3);
        q.placeholder(8, &[1]);
        q.held_back(8, &[3]);
        assert!(q.take_ready().is_empty());

        // The connection dropped: nothing owed is acked on the next one.
        q.owe(9, 3);
        q.placeholder(9, &[1]);
        q.clear();
        assert_eq!(q.owed_len(), 0);
        let d = q.deliver(9, &[3], vec![3]);
        q.taken(d, 3);
        assert_eq!(
            q.take_ready(),
            vec![9],
            "the new connection's own copy, once"
        );
        assert_eq!(q.pending(), 0);
        assert!(q.seqs.is_empty());
    }

    /// B4: the owed subscription's relay subscriptions are replaced (a key refresh): its
    /// debts are forgiven (the neighbour's ack leaves), its slots stay — what it was handed
    /// and takes later is still acked.
    #[test]
    fn forgiving_a_subscriptions_debts_keeps_its_slots() {
        let mut q = AckQueue::new();
        let h = q.deliver(3, &[2], vec![2]);
        q.owe(5, 2);
        let a = q.deliver(5, &[1], vec![1]);
        q.taken(a, 1);
        assert!(q.take_ready().is_empty(), "5 is owed to sub 2");
        q.forgive_owed(2);
        assert_eq!(q.owed_len(), 0);
        assert_eq!(q.take_ready(), vec![5]);
        q.taken(h, 2);
        assert_eq!(q.take_ready(), vec![3], "its slot stayed");
        assert!(q.seqs.is_empty());
    }

    /// The relay's copy of a sequence held back behind an untaken slot (its catch-up from
    /// the store, once acks freed credit) comes while the held-back slot still waits its
    /// turn: taken, it is acked — the held-back slot leaves like a placeholder. Released
    /// unlisted, it kept the sequence unacked (the relay's credit spent until its ack
    /// timeout). A copy for fewer subscriptions than the held-back slot's does not lift it.
    #[test]
    fn a_copy_of_a_held_back_sequence_taken_by_all_it_was_routed_to_is_acked() {
        let mut q = AckQueue::new();
        let first = q.deliver(1, &[1], vec![1]);
        q.held_back(2, &[1]);
        let again = q.deliver(2, &[1], vec![1]);
        q.taken(first, 1);
        assert_eq!(q.take_ready(), vec![1]);
        q.taken(again, 1);
        assert_eq!(q.take_ready(), vec![2]);
        assert!(q.held.is_empty());

        // Routed to two, the copy for one of them only (its history): not acked.
        let first = q.deliver(3, &[1], vec![1]);
        q.held_back(4, &[1, 2]);
        let other = q.deliver(4, &[2], vec![2]);
        q.taken(other, 2);
        q.taken(first, 1);
        assert_eq!(q.take_ready(), vec![3]);
        assert_eq!(q.pending(), 0);
        assert!(q.seqs.is_empty());
        assert!(q.held.is_empty());
    }

    /// What a subscription holds untaken, by sequence: until it takes it, or goes away.
    #[test]
    fn a_subscription_holds_what_it_was_handed_until_it_takes_it() {
        let mut q = AckQueue::new();
        let a = q.deliver(5, &[1, 2], vec![1, 2]);
        q.placeholder(6, &[1]);
        q.held_back(7, &[1]);
        let b = q.deliver(5, &[1], vec![1]);
        assert_eq!((q.holds(1, 5), q.holds(2, 5)), (2, 1));
        assert_eq!((q.holds(1, 6), q.holds(1, 7), q.holds(3, 5)), (0, 0, 0));
        q.taken(a, 1);
        q.taken(b, 1);
        assert_eq!((q.holds(1, 5), q.holds(2, 5)), (0, 1));
        q.drop_sub(2);
        assert!(q.handed.is_empty());
        q.deliver(8, &[1], vec![1]);
        q.clear();
        assert!(q.handed.is_empty() && q.held.is_empty());
    }

    #[test]
    fn held_back_and_untaken_slots_are_never_acked() {
        let mut q = AckQueue::new();
        q.held_back(1, &[1, 2]);
        let b = q.deliver(2, &[1, 2], vec![1, 2]);
        let c = q.deliver(3, &[1], vec![1]);
        q.placeholder(4, &[1, 2]);
        q.taken(b, 2);
        q.drop_sub(1);
        assert_eq!(
            q.take_ready(),
            vec![4],
            "2 and 3 were never taken by sub 1 (2 only by sub 2): not acked"
        );
        q.taken(c, 1); // stale: ignored
        assert_eq!(q.pending(), 0);
    }
}
