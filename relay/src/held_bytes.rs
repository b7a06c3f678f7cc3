//! Bounds on what queued work holds in memory, shared fairly among tenants.
//!
//! A queue bounded by its count alone holds that many items of any size: 65,536 queued
//! envelopes of up to `max_frame` each are GiBs while their consumer (a disk, NATS) lags.
//! Each queued item carries a [`Share`] taken from the queue's [`FairLimit`] and gives its
//! place and bytes back when dropped — answered, failed or discarded alike, so nothing
//! leaks. A queue many tenants share is shared fairly under contention ([`fair_admits`]):
//! one tenant filling it does not refuse the others.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Items and bytes waiting in a queue (all of them, or one tenant's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Queued {
    pub(crate) msgs: usize,
    pub(crate) bytes: u64,
}

/// The fair-share rule of a queue that tenants share (the SQLite store's write queue, the
/// JetStream store's publish queue, the cluster bridge's forward and receive queues): may a
/// tenant holding `mine` add `add` to a queue holding `all`, with `tenants` tenants holding
/// something (the asker counted)? Within the bounds (`msgs` items; `bytes` bytes, 0 = no
/// byte bound) anyone may; beyond them only a tenant holding less than its fair share — the
/// bounds divided among those tenants — so one tenant's flood fills the queue and is
/// refused while another tenant's item is still taken. What waits stays below twice the
/// bounds. A lone tenant gets exactly the bounds; an item larger than the byte bound goes
/// in when its tenant (or, within the bounds, the queue) holds nothing.
pub(crate) fn fair_admits(
    all: Queued,
    mine: Queued,
    tenants: usize,
    add: Queued,
    msgs: usize,
    bytes: u64,
) -> bool {
    let fits = |msgs: usize, bytes: u64, held: Queued| {
        held.msgs + add.msgs <= msgs
            && (bytes == 0 || held.bytes == 0 || held.bytes + add.bytes <= bytes)
    };
    if fits(msgs, bytes, all) {
        return true;
    }
    let n = tenants.max(1);
    // A byte share never rounds down to 0, which `fits` reads as "no bound".
    let share_bytes = if bytes == 0 {
        0
    } else {
        (bytes / n as u64).max(1)
    };
    fits(msgs / n, share_bytes, mine) && fits(msgs.saturating_mul(2), bytes.saturating_mul(2), all)
}

/// A queue's bounds (`msgs` items, `bytes` bytes) shared fairly among tenants
/// ([`fair_admits`]): what each tenant holds, taken by [`take`](Self::take) and given back
/// when its [`Share`] drops — answered, failed or discarded alike.
#[derive(Debug)]
pub(crate) struct FairLimit<K> {
    state: Mutex<FairState<K>>,
    msgs: usize,
    /// 0 = no byte bound.
    bytes: u64,
}

#[derive(Debug)]
struct FairState<K> {
    all: Queued,
    /// Tenants holding something (entries at zero are removed).
    by: HashMap<K, Queued>,
}

impl<K: Hash + Eq + Clone> FairLimit<K> {
    /// Bounds of `msgs` items and `bytes` bytes (0 = none).
    pub(crate) fn new(msgs: usize, bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(FairState {
                all: Queued::default(),
                by: HashMap::new(),
            }),
            msgs,
            bytes,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FairState<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one item of `n` bytes for tenant `who`, if [`fair_admits`] lets it in.
    pub(crate) fn take(self: &Arc<Self>, who: &K, n: u64) -> Option<Share<K>> {
        let add = Queued { msgs: 1, bytes: n };
        let mut s = self.state();
        let mine = s.by.get(who).copied().unwrap_or_default();
        let tenants = s.by.len() + usize::from(mine == Queued::default());
        if !fair_admits(s.all, mine, tenants, add, self.msgs, self.bytes) {
            return None;
        }
        s.all.msgs += 1;
        s.all.bytes += n;
        let t = s.by.entry(who.clone()).or_default();
        t.msgs += 1;
        t.bytes += n;
        drop(s);
        Some(Share {
            limit: self.clone(),
            who: who.clone(),
            n,
        })
    }

    /// What the queue holds now.
    pub(crate) fn held(&self) -> Queued {
        self.state().all
    }

    /// Tenants holding something now.
    #[cfg(test)]
    pub(crate) fn tenants(&self) -> usize {
        self.state().by.len()
    }
}

/// One item a tenant holds in a [`FairLimit`]; given back when it drops.
pub(crate) struct Share<K: Hash + Eq + Clone> {
    limit: Arc<FairLimit<K>>,
    who: K,
    n: u64,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Share<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share").field("bytes", &self.n).finish()
    }
}

impl<K: Hash + Eq + Clone> Drop for Share<K> {
    fn drop(&mut self) {
        let mut s = self.limit.state();
        s.all.msgs = s.all.msgs.saturating_sub(1);
        s.all.bytes = s.all.bytes.saturating_sub(self.n);
        if let std::collections::hash_map::Entry::Occupied(mut e) = s.by.entry(self.who.clone()) {
            let t = e.get_mut();
            t.msgs = t.msgs.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(self.n);
            if *t == Queued::default() {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fair_limit_lets_a_lone_tenant_fill_it_and_another_in_beyond_it() {
        let l = FairLimit::new(100, 100);
        // A lone tenant: exactly the bounds.
        let a: Vec<_> = (0..10).map(|_| l.take(&1, 10).expect("fits")).collect();
        assert!(l.take(&1, 10).is_none(), "tenant 1 filled the bytes");
        // Another tenant, holding nothing: under its share (half) while the queue is full.
        let b: Vec<_> = (0..5).map(|_| l.take(&2, 10).expect("its share")).collect();
        assert!(
            l.take(&2, 10).is_none(),
            "tenant 2 at its share (50 of 100)"
        );
        assert!(l.take(&1, 10).is_none(), "tenant 1 over its share");
        assert_eq!(
            l.held(),
            Queued {
                msgs: 15,
                bytes: 150
            }
        );
        // A third holds nothing: a share of 33 bytes, its first item goes in.
        let c = l.take(&3, 10).expect("a third tenant");
        assert_eq!(l.tenants(), 3);
        drop(a);
        assert_eq!(l.tenants(), 2, "tenant 1 gave everything back");
        assert_eq!(l.held(), Queued { msgs: 6, bytes: 60 });
        drop((b, c));
        assert_eq!(l.held(), Queued::default());
        assert_eq!(l.tenants(), 0);
        // The count bound alone: 4 items.
        let l = FairLimit::new(4, 0);
        let _a: Vec<_> = (0..4).map(|_| l.take(&1, 1 << 30).expect("fits")).collect();
        assert!(l.take(&1, 1).is_none());
        let _b = (
            l.take(&2, 1).expect("a share of 2"),
            l.take(&2, 1).expect("2 of 2"),
        );
        assert!(l.take(&2, 1).is_none());
        // Never past twice the bounds, however many tenants ask.
        let _c = l.take(&3, 1).expect("a share of 1");
        let _d = l.take(&4, 1).expect("a share of 1, 8 in all");
        assert!(l.take(&5, 1).is_none(), "8 of 4: twice the bound");
    }
}
