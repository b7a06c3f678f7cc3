//! Messages held back from subscriptions that had room for them: what they lose, and when
//! to tell them.
//!
//! The client core holds a message back from every subscription the relay routed it to when
//! an at-least-once one of them has no room or awaits an earlier sequence (PROTOCOL §3.5.5
//! "Order"; `Delivery::HeldBack`): nothing is delivered or acknowledged, so the relay sends
//! it again — to the subscription that caused it, from its store, once the relay resumes
//! it. Its neighbours on the connection that were *denied* the message with it get that
//! copy too when it is live-kind; but a message the store does not keep (a QoS 0 publish on
//! a relay that keeps QoS 0 live-only) never comes again, and a neighbour that does not
//! acknowledge has no redelivery of its own. Without this table such a neighbour lost the
//! message and its application never heard of it (only `CoreStats::held_back` /
//! `held_for_order` counted the hold).
//!
//! An entry is made only for a message no subscription was handed yet (a later copy held
//! back again denies nothing to those that had it). It lives until every subscription it
//! was denied to was handed a later copy of its sequence (delivered, or told lost for want
//! of room; such a copy passes the client-wide dedup for it: [`Withheld::is_owed`]), or
//! until every subscription that caused it had its copy (a redelivery, for one the relay
//! did not pause), ended its catch-up — the relay's `Gap` naming that subscription comes
//! after the catch-up's last message (§3.3.11) — or went away: the sequence is then not
//! coming again and each subscription still denied it that does not acknowledge has lost
//! it ([`Withheld::take_lost`]: the engine reports them as `Event::Dropped`, the
//! application's `Lagged`); one that acknowledges waits for its own redelivery. A relay
//! that resumes a subscription without a named `Gap` (nothing it skipped was unstored)
//! sends every skipped message again, which settles its entries. `tests/mixed_load.rs`
//! found the redelivery, dedup and later-copy cases. Bounded: past [`MAX_WITHHELD`] sequences the
//! oldest is forgotten unreported — while a subscription is paused with a long backlog its
//! neighbours' copies are held back by the thousand and most come again with the catch-up,
//! so reporting them lost would tell of losses that are not.

use std::collections::BTreeMap;

use whispeer_protocol::KeyId;

use super::receive::Digest;
use super::LocalSubId;

/// Most held-back sequences tracked (~100 bytes each); past it the oldest is forgotten
/// without a report (see the module docs).
pub(crate) const MAX_WITHHELD: usize = if cfg!(test) { 8 } else { 4096 };

#[derive(Debug)]
struct Entry {
    /// The key id of the envelope (a named `Gap` ends one relay subscription: one key id).
    key: KeyId,
    /// The at-least-once subscriptions it was held back for (no room, or awaiting an
    /// earlier sequence).
    causes: Vec<LocalSubId>,
    /// The other subscriptions the relay routed it to, not handed a copy since, each with
    /// whether it acknowledges (reported lost on a reconnect only if not: the relay may
    /// still redeliver to one that acknowledges).
    denied: Vec<(LocalSubId, bool)>,
    /// The message's dedup digest (`None`: it did not open): a later copy is owed only if
    /// it is the same message — a relay reusing the sequence for another envelope gets no
    /// exception from the dedup window.
    digest: Option<Digest>,
    /// Causes that never had the message either (held back at its first sight, or their
    /// own history copy held back after a neighbour's delivered it): their later copy
    /// passes the client-wide dedup for them ([`Withheld::is_owed`]).
    owed: Vec<LocalSubId>,
    /// Causes whose own copy was held back (the relay sent it for them and tracks it until
    /// acked): the end of their catch-up does not end their wait, the redelivery does.
    sent: Vec<LocalSubId>,
}

/// The subscriptions a held-back copy was held back for ([`Withheld::hold`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldFor<'a> {
    /// The at-least-once subscriptions it was held back for.
    pub causes: &'a [LocalSubId],
    /// Those of them that never had the message.
    pub owed: &'a [LocalSubId],
    /// Those of them the relay sent this copy for (their own: it comes again as a
    /// redelivery, whatever their catch-up does).
    pub sent: &'a [LocalSubId],
}

/// The table (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Withheld {
    by_seq: BTreeMap<u64, Entry>,
    /// Losses found and not yet taken, per subscription.
    lost: BTreeMap<LocalSubId, u64>,
}

impl Withheld {
    /// Nothing tracked (the per-message check is then one branch).
    pub(crate) fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// Sequence `seq` (key id `key`) was held back for `held.causes`, of which `owed` never
    /// had the message and `sent` were sent this copy as their own (it comes again as a
    /// redelivery, whatever their catch-up does); `denied` (with whether each
    /// acknowledges) were routed it too and got nothing.
    pub(crate) fn hold(
        &mut self,
        seq: u64,
        key: KeyId,
        digest: Option<Digest>,
        held: HeldFor<'_>,
        denied: impl IntoIterator<Item = (LocalSubId, bool)>,
    ) {
        let HeldFor { causes, owed, sent } = held;
        let mut denied = denied.into_iter().peekable();
        if seq == 0
            || (denied.peek().is_none() && owed.is_empty() && !self.by_seq.contains_key(&seq))
        {
            return;
        }
        let e = self.by_seq.entry(seq).or_insert_with(|| Entry {
            key,
            digest,
            causes: Vec::new(),
            denied: Vec::new(),
            owed: Vec::new(),
            sent: Vec::new(),
        });
        for c in causes {
            if !e.causes.contains(c) {
                e.causes.push(*c);
            }
        }
        for c in sent {
            if !e.sent.contains(c) {
                e.sent.push(*c);
            }
        }
        // One held back for itself now awaits its own copy: not denied, still owed it.
        for (d, _) in &e.denied {
            if causes.contains(d) && !e.owed.contains(d) {
                e.owed.push(*d);
            }
        }
        e.denied.retain(|(d, _)| !causes.contains(d));
        for o in owed {
            if !e.owed.contains(o) {
                e.owed.push(*o);
            }
        }
        for (d, acking) in denied {
            if !e.denied.iter().any(|(x, _)| *x == d) && !e.causes.contains(&d) {
                e.denied.push((d, acking));
            }
        }
        if e.denied.is_empty() && e.owed.is_empty() {
            self.by_seq.remove(&seq);
        }
        while self.by_seq.len() > MAX_WITHHELD {
            self.by_seq.pop_first();
        }
    }

    /// A later copy of `seq` was not held back: `got` were handed it (or told it was lost
    /// to them: no room), `eligible` are those it was a copy for (every subscription it
    /// was routed to, but a redelivery only those that acknowledge and take one, as
    /// `deliver` decides). Those in `got` have it now; the causes among `got` or `eligible`
    /// await it no more. When no cause is left the sequence is not coming again: it is
    /// lost to the subscriptions still denied it that do not acknowledge. One that does
    /// stays tracked — the relay redelivers what it never acked, and that copy, a
    /// duplicate in the client-wide window, must still reach it ([`Withheld::is_owed`]).
    ///
    /// That is how a cause the relay never paused ends: sent the message and, holding it
    /// back, never acking it, it gets it again as a redelivery, which a subscription that
    /// does not acknowledge never takes (found by `tests/mixed_load.rs`: such a neighbour
    /// lost it silently).
    pub(crate) fn handled(&mut self, seq: u64, got: &[LocalSubId], eligible: &[LocalSubId]) {
        let Some(e) = self.by_seq.get_mut(&seq) else {
            return;
        };
        e.denied.retain(|(d, _)| !got.contains(d));
        e.owed.retain(|o| !got.contains(o));
        e.causes
            .retain(|c| !got.contains(c) && !eligible.contains(c));
        self.settle(seq);
    }

    /// Entry `seq` after a change: without causes, lost to those denied it that do not
    /// acknowledge; gone once nobody is denied it.
    fn settle(&mut self, seq: u64) {
        let Some(e) = self.by_seq.get_mut(&seq) else {
            return;
        };
        if e.causes.is_empty() {
            for (d, _) in e.denied.iter().filter(|(_, acking)| !acking) {
                *self.lost.entry(*d).or_default() += 1;
            }
            e.denied.retain(|(_, acking)| *acking);
        }
        if e.denied.is_empty() && e.owed.is_empty() {
            self.by_seq.remove(&seq);
        }
    }

    /// The relay ended the catch-up of subscription `cause` for key id `key` (its named
    /// `Gap`), or `cause` went away (`key` `None`: every key id): what it alone held back
    /// is not coming again — but for the copies of its own held back (`Entry::sent`),
    /// which the relay redelivers after its catch-up as before it.
    pub(crate) fn cause_done(&mut self, cause: LocalSubId, key: Option<KeyId>) {
        let mut touched = Vec::new();
        for (seq, e) in &mut self.by_seq {
            if key.is_some_and(|k| k != e.key || e.sent.contains(&cause)) {
                continue;
            }
            e.sent.retain(|c| *c != cause);
            e.causes.retain(|c| *c != cause);
            // Its catch-up ended (or it went away): nothing more comes for it.
            e.owed.retain(|o| *o != cause);
            touched.push(*seq);
        }
        for seq in touched {
            self.settle(seq);
        }
    }

    /// Subscription `id` is gone: nothing more is lost to it, and what it alone caused is
    /// lost to the others.
    pub(crate) fn forget(&mut self, id: LocalSubId) {
        self.lost.remove(&id);
        for e in self.by_seq.values_mut() {
            e.denied.retain(|(d, _)| *d != id);
        }
        // No longer a cause or owed anything; entries left for nobody go (`settle`).
        self.cause_done(id, None);
    }

    /// The connection ended: nothing held back on it comes again on it. Lost to the
    /// subscriptions that do not acknowledge; one that does may still be sent it again (a
    /// durable's resume), so it is not told.
    ///
    /// Returns the messages still owed to subscriptions that acknowledge (their digests):
    /// a resumed history brings them again, as duplicates in the client-wide window by
    /// then if another subscription took them, yet still theirs.
    pub(crate) fn connection_lost(&mut self) -> Vec<(LocalSubId, Digest)> {
        let mut owed = Vec::new();
        for (_, e) in std::mem::take(&mut self.by_seq) {
            for (d, acking) in &e.denied {
                if *acking {
                    owed.extend(e.digest.map(|g| (*d, g)));
                } else {
                    *self.lost.entry(*d).or_default() += 1;
                }
            }
            for o in &e.owed {
                owed.extend(e.digest.map(|g| (*o, g)));
            }
        }
        owed
    }

    /// Whether sequence `seq` was held back from `id` (for another subscription, or for
    /// itself when it never had the message) and no copy reached `id` since: a later copy
    /// is then new to `id`, even when the client-wide dedup window has it as delivered
    /// (another subscription took it meanwhile, say as a redelivery or from its history).
    /// Only for the message of digest `d` that was held back under that sequence.
    pub(crate) fn is_owed(&self, seq: u64, id: LocalSubId, d: Digest) -> bool {
        self.by_seq.get(&seq).is_some_and(|e| {
            e.digest == Some(d) && (e.denied.iter().any(|(x, _)| *x == id) || e.owed.contains(&id))
        })
    }

    /// Whether losses are waiting for [`Withheld::take_lost`].
    pub(crate) fn has_lost(&self) -> bool {
        !self.lost.is_empty()
    }

    /// Losses found since the last call: (subscription, how many).
    pub(crate) fn take_lost(&mut self) -> Vec<(LocalSubId, u64)> {
        std::mem::take(&mut self.lost).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: KeyId = KeyId::from_bytes([1; 16]);
    const K2: KeyId = KeyId::from_bytes([2; 16]);
    const D: Digest = 7;

    fn held<'a>(causes: &'a [LocalSubId], owed: &'a [LocalSubId]) -> HeldFor<'a> {
        HeldFor {
            causes,
            owed,
            sent: &[],
        }
    }

    fn denied(ids: &[LocalSubId]) -> Vec<(LocalSubId, bool)> {
        ids.iter().map(|i| (*i, false)).collect()
    }

    /// Held back for 1, denied to 2: a later copy handed to 2 settles it; otherwise the
    /// end of 1's catch-up makes it a loss of 2's.
    #[test]
    fn a_denied_subscription_loses_what_the_catch_up_did_not_bring() {
        let mut w = Withheld::default();
        w.hold(5, K, Some(D), held(&[1], &[]), denied(&[2]));
        w.hold(6, K, Some(D), held(&[1], &[]), denied(&[2]));
        w.hold(7, K, Some(D), held(&[1], &[]), denied(&[2, 3]));
        // The catch-up's copy of 5 reached 2; a redelivered copy of 7 was for 1 and 3
        // only (2 takes none): 7 comes to 2 no more.
        w.handled(5, &[1, 2], &[1, 2]);
        assert!(w.take_lost().is_empty());
        w.handled(7, &[1, 3], &[1, 3]);
        assert_eq!(w.take_lost(), vec![(2, 1)], "7 never reached 2");
        w.cause_done(1, Some(K));
        assert_eq!(w.take_lost(), vec![(2, 1)], "nor did 6");
        assert!(w.is_empty());
    }

    /// A cause the relay never paused gets the message again as a redelivery, which only
    /// subscriptions that acknowledge take: once every cause had its copy, the sequence is
    /// lost to the others denied it that do not acknowledge; one that does stays denied
    /// (its own redelivery, a duplicate by then, must reach it) until a copy reaches it.
    #[test]
    fn a_redelivery_that_reaches_every_cause_ends_the_wait() {
        let mut w = Withheld::default();
        w.hold(
            5,
            K,
            Some(D),
            held(&[1, 4], &[]),
            vec![(2, false), (3, true)],
        );
        w.handled(5, &[1], &[1]);
        assert!(w.take_lost().is_empty(), "4 may still bring it");
        // 4 had it already (a duplicate for it: handed nothing, but a copy for it).
        w.handled(5, &[], &[4]);
        assert_eq!(w.take_lost(), vec![(2, 1)]);
        assert!(w.is_owed(5, 3, D) && !w.is_owed(5, 2, D));
        w.handled(5, &[3], &[1, 3, 4]);
        assert!(w.is_empty(), "3 got its copy");
        assert!(w.take_lost().is_empty());
    }

    /// Owed is per message: a relay that sends another envelope under the held-back
    /// sequence gets no exception from the dedup window for it.
    #[test]
    fn owed_only_for_the_message_held_back() {
        let mut w = Withheld::default();
        w.hold(5, K, Some(D), held(&[1], &[1]), denied(&[2]));
        assert!(w.is_owed(5, 1, D) && w.is_owed(5, 2, D));
        assert!(!w.is_owed(5, 1, D + 1) && !w.is_owed(5, 2, D + 1));
        assert!(!w.is_owed(6, 2, D));
    }

    /// A copy that is not handed to a denied subscription (refused, say) does not settle
    /// it; only causes that had their copy stop waiting.
    #[test]
    fn only_a_copy_handed_over_settles_a_denied_subscription() {
        let mut w = Withheld::default();
        w.hold(5, K, Some(D), held(&[1], &[]), denied(&[2]));
        w.handled(5, &[], &[2]);
        assert!(w.is_owed(5, 2, D), "routed a copy, handed nothing");
        assert!(w.take_lost().is_empty(), "1 may still bring it");
        w.handled(5, &[1], &[1, 2]);
        assert_eq!(w.take_lost(), vec![(2, 1)]);
        assert!(w.is_empty());
    }

    /// Two causes: lost only once both catch-ups ended; another key id's end changes
    /// nothing.
    #[test]
    fn every_cause_must_end_and_only_for_its_key_id() {
        let mut w = Withheld::default();
        w.hold(5, K, Some(D), held(&[1], &[]), denied(&[3]));
        w.hold(5, K, Some(D), held(&[2], &[]), denied(&[3]));
        w.cause_done(1, Some(K2));
        w.cause_done(1, Some(K));
        assert!(w.take_lost().is_empty(), "2 may still bring it");
        w.cause_done(2, Some(K));
        assert_eq!(w.take_lost(), vec![(3, 1)]);
    }

    /// A subscription held back for itself later is not denied; one that goes away is
    /// told nothing and ends what it caused; a reconnect tells only those that do not
    /// acknowledge; past the bound the oldest is forgotten unreported; sequence 0 is never
    /// tracked.
    /// A cause whose own copy was held back (the relay sent it for that one) still awaits
    /// its redelivery after the `Gap` ending its catch-up: the copy stays owed to it, and
    /// the others denied it are not told of a loss until that copy came.
    #[test]
    fn a_gap_does_not_end_the_wait_for_a_copy_sent_as_the_causes_own() {
        let mut w = Withheld::default();
        let sent = HeldFor {
            causes: &[1],
            owed: &[1],
            sent: &[1],
        };
        w.hold(5, K, Some(D), sent, denied(&[2]));
        w.cause_done(1, Some(K));
        assert!(w.is_owed(5, 1, D), "its redelivery is still its own");
        assert!(w.take_lost().is_empty());
        // The redelivery reaches 1 (2 takes no redelivery): lost to 2 now.
        w.handled(5, &[1], &[1]);
        assert_eq!(w.take_lost(), vec![(2, 1)]);
        assert!(!w.is_owed(5, 1, D));
        // Gone, it awaits nothing.
        w.hold(6, K, Some(D), sent, denied(&[2]));
        w.forget(1);
        assert!(!w.is_owed(6, 1, D));
        assert_eq!(w.take_lost(), vec![(2, 1)]);
    }

    #[test]
    fn causes_gone_subscriptions_reconnects_and_the_bound() {
        let mut w = Withheld::default();
        w.hold(5, K, Some(D), held(&[1], &[]), denied(&[2]));
        w.hold(5, K, Some(D), held(&[2], &[]), std::iter::empty());
        w.cause_done(1, Some(K));
        assert!(w.take_lost().is_empty(), "2 awaits its own copy now");
        w.hold(6, K, Some(D), held(&[1], &[]), denied(&[2, 3]));
        w.forget(2);
        w.forget(1);
        assert_eq!(w.take_lost(), vec![(3, 1)]);
        w.hold(7, K, Some(D), held(&[1], &[]), vec![(2, false), (3, true)]);
        // 3 acknowledges: still owed it, carried to its resumed history.
        assert_eq!(w.connection_lost(), vec![(3, D)]);
        assert_eq!(w.take_lost(), vec![(2, 1)]);
        w.hold(0, K, Some(D), held(&[1], &[]), denied(&[2]));
        assert!(w.is_empty());
        for seq in 1..=MAX_WITHHELD as u64 + 2 {
            w.hold(seq, K, Some(D), held(&[1], &[]), denied(&[2]));
        }
        assert!(
            w.take_lost().is_empty(),
            "the two oldest forgotten, not reported"
        );
        assert_eq!(w.by_seq.len(), MAX_WITHHELD);
        assert!(!w.by_seq.contains_key(&2) && w.by_seq.contains_key(&3));
    }
}
