//! Connections not yet admitted past `Hello`, oldest first: the ones a new connection may
//! evict when the relay is full (`limits.max_connections`).
//!
//! Two gates count connections against `max_connections`: the [`AddrTable`] from accept
//! (every socket connection, its transport handshake included) and the `Registry` from
//! `conn::serve` (every connection with a session, in-process ones included). Each keeps a
//! queue here of the connections it counts that have not yet been welcomed; when it is
//! full it evicts the oldest of its queue instead of refusing the newcomer, and refuses
//! only when its queue is empty (every place is held by an admitted session). An evicted
//! connection stops counting at once in both gates (its places become *lingering*: still
//! held until it has closed, but not counted as full), so the newcomer gets its place
//! while the evicted one closes. Its per-address and per-network places stay held until it
//! has closed: an evicting stranger still pays every cap.
//!
//! Every operation is O(log n) in the connections waiting (a `BTreeMap` by age): a flood
//! of new connections costs the relay no scan of the table per accept.
//!
//! Lock order: the [`AddrTable`]'s or the `Registry`'s lock, then this one; never the
//! other way round.
//!
//! [`AddrTable`]: crate::rate::AddrTable

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Why an evicted connection is closed (its `Err(too_many_connections)` message).
pub(crate) const EVICTED: &str =
    "relay full: handshake evicted (a newer connection took the place of this one, which had not completed its Hello; max_connections)";

/// A unit is not held in this gate.
const NONE: u8 = 0;
/// A unit is held and counted against the gate's limit.
const COUNTED: u8 = 1;
/// A unit is held by an evicted connection: not counted against the limit any more.
const LINGERING: u8 = 2;

/// One connection's place in the queues, shared by its tasks and the gates.
#[derive(Debug)]
pub(crate) struct Ticket {
    seq: u64,
    evicted: AtomicBool,
    /// Welcomed: left the queues for good (no eviction any more).
    passed: AtomicBool,
    notify: Notify,
    /// Its unit in the [`AddrTable`](crate::rate::AddrTable) and in the `Registry`
    /// ([`NONE`], [`COUNTED`], [`LINGERING`]); changed under the [`Handshakes`] lock only.
    table: AtomicU8,
    registry: AtomicU8,
}

impl Ticket {
    /// Whether the connection was evicted.
    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Relaxed)
    }

    /// Completes when the connection is evicted (at once if it already was).
    pub(crate) async fn evicted(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_evicted() {
                return;
            }
            notified.await;
        }
    }
}

/// The queues of the two gates.
#[derive(Debug)]
pub(crate) struct Handshakes {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Connections the address table counts that are not yet welcomed, by age.
    table: BTreeMap<u64, Arc<Ticket>>,
    /// Connections the registry counts that are not yet welcomed, by age.
    registry: BTreeMap<u64, Arc<Ticket>>,
    /// Units held by evicted connections (not counted against the limit).
    table_lingering: usize,
    registry_lingering: usize,
}

/// Which gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Table,
    Registry,
}

impl Handshakes {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection's ticket (in no queue yet).
    pub(crate) fn ticket(&self) -> Arc<Ticket> {
        let mut s = self.lock();
        s.next += 1;
        Arc::new(Ticket {
            seq: s.next,
            evicted: AtomicBool::new(false),
            passed: AtomicBool::new(false),
            notify: Notify::new(),
            table: AtomicU8::new(NONE),
            registry: AtomicU8::new(NONE),
        })
    }

    /// Units of `gate` held by evicted connections, not counted against the limit.
    pub(crate) fn lingering(&self, gate: Gate) -> usize {
        let s = self.lock();
        match gate {
            Gate::Table => s.table_lingering,
            Gate::Registry => s.registry_lingering,
        }
    }

    /// `gate` counts `t` from now (called under the gate's lock); it waits in the gate's
    /// queue until welcomed. An already evicted connection's unit lingers at once.
    pub(crate) fn enter(&self, gate: Gate, t: &Arc<Ticket>) {
        let mut s = self.lock();
        let s = &mut *s;
        let (unit, queue, lingering) = s.gate(gate, t);
        if t.is_evicted() {
            unit.store(LINGERING, Relaxed);
            *lingering += 1;
        } else {
            unit.store(COUNTED, Relaxed);
            if !t.passed.load(Relaxed) {
                queue.insert(t.seq, t.clone());
            }
        }
    }

    /// `gate` stops counting `t`: its connection ended (called under the gate's lock, as
    /// the gate takes its unit off its count).
    pub(crate) fn leave(&self, gate: Gate, t: &Arc<Ticket>) {
        let mut s = self.lock();
        let s = &mut *s;
        let (unit, queue, lingering) = s.gate(gate, t);
        queue.remove(&t.seq);
        if unit.swap(NONE, Relaxed) == LINGERING {
            *lingering -= 1;
        }
    }

    /// The connection was welcomed: it leaves the queues and is never evicted. False if it
    /// was evicted first (it must then close, not be welcomed).
    pub(crate) fn pass(&self, t: &Arc<Ticket>) -> bool {
        let mut s = self.lock();
        if t.is_evicted() {
            return false;
        }
        t.passed.store(true, Relaxed);
        s.table.remove(&t.seq);
        s.registry.remove(&t.seq);
        true
    }

    /// Whether `gate` has a connection it could evict.
    pub(crate) fn can_evict(&self, gate: Gate) -> bool {
        let s = self.lock();
        match gate {
            Gate::Table => !s.table.is_empty(),
            Gate::Registry => !s.registry.is_empty(),
        }
    }

    /// Evicts the oldest connection `gate` counts that is not yet welcomed: it stops
    /// counting in both gates and is told to close. False if there is none. Called under
    /// the gate's lock, with the newcomer taking the place.
    pub(crate) fn evict_oldest(&self, gate: Gate) -> bool {
        let mut s = self.lock();
        let s = &mut *s;
        let oldest = match gate {
            Gate::Table => s.table.pop_first(),
            Gate::Registry => s.registry.pop_first(),
        };
        let Some((seq, t)) = oldest else {
            return false;
        };
        s.table.remove(&seq);
        s.registry.remove(&seq);
        t.evicted.store(true, Relaxed);
        if t.table
            .compare_exchange(COUNTED, LINGERING, Relaxed, Relaxed)
            .is_ok()
        {
            s.table_lingering += 1;
        }
        if t.registry
            .compare_exchange(COUNTED, LINGERING, Relaxed, Relaxed)
            .is_ok()
        {
            s.registry_lingering += 1;
        }
        t.notify.notify_waiters();
        self.metrics.handshake_evicted();
        true
    }
}

impl Inner {
    fn gate<'a>(
        &'a mut self,
        gate: Gate,
        t: &'a Ticket,
    ) -> (
        &'a AtomicU8,
        &'a mut BTreeMap<u64, Arc<Ticket>>,
        &'a mut usize,
    ) {
        match gate {
            Gate::Table => (&t.table, &mut self.table, &mut self.table_lingering),
            Gate::Registry => (
                &t.registry,
                &mut self.registry,
                &mut self.registry_lingering,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unwelcomed_is_evicted_and_stops_counting_in_both_gates() {
        let h = Handshakes::new(Arc::new(Metrics::new()));
        let (a, b, c) = (h.ticket(), h.ticket(), h.ticket());
        for t in [&a, &b, &c] {
            h.enter(Gate::Table, t);
        }
        h.enter(Gate::Registry, &a);
        assert!(h.pass(&b), "b is welcomed: never evicted");
        assert!(h.evict_oldest(Gate::Table));
        assert!(a.is_evicted() && !b.is_evicted() && !c.is_evicted());
        assert_eq!(h.lingering(Gate::Table), 1);
        assert_eq!(h.lingering(Gate::Registry), 1, "a was registered too");
        assert!(!h.can_evict(Gate::Registry));
        assert!(h.evict_oldest(Gate::Table), "then c");
        assert!(c.is_evicted());
        assert!(!h.evict_oldest(Gate::Table), "b is admitted: none left");
        assert!(!h.pass(&c), "an evicted connection is not welcomed");
        h.leave(Gate::Table, &a);
        h.leave(Gate::Registry, &a);
        h.leave(Gate::Table, &b);
        h.leave(Gate::Table, &c);
        assert_eq!(
            (h.lingering(Gate::Table), h.lingering(Gate::Registry)),
            (0, 0)
        );
    }
}
