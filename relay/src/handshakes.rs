//! Connections not yet admitted past `Hello`: the ones a new connection may evict when the
//! relay is full (`limits.max_connections`).
//!
//! Two gates count connections against `max_connections`: the [`AddrTable`] from accept
//! (every socket connection, its transport handshake included) and the `Registry` from
//! `conn::serve` (every connection with a session, in-process ones included). Each keeps a
//! queue here of the connections it counts that have not yet been welcomed; when it is
//! full it may evict one of its queue instead of refusing the newcomer ([`Guard::admission`]):
//!
//! * **Fair share.** The victim is the oldest unwelcomed connection of the *network* (the
//!   IPv4 /24 or IPv6 /48 of `max_connections_per_network`, `network_ipv4_prefix`,
//!   `network_ipv6_prefix`) holding the most unwelcomed places (ties: the network whose
//!   oldest is oldest). A network's places are counted once for both gates (its
//!   connections in either queue), so they agree on who holds the most; each evicts from
//!   the connections it counts. A stranger flooding from one network mostly evicts its own
//!   connections; an honest handshake is evicted only while its network holds the most.
//! * **Grace.** A connection younger than [`grace`] (`min(2 s, hello_ms / 2)`) is never
//!   evicted: when the chosen victim is that young the newcomer is refused instead, as a
//!   full relay refused everyone before eviction existed. So a handshake always gets that
//!   long, and holding places against newcomers means renewing them within it.
//! * **Ceiling.** Evicted connections keep their socket until they have closed (told why
//!   within [`EVICTED_CLOSE`]); their places *linger*, not counted as full. Nothing else
//!   caps them, so both gates refuse any newcomer once they count [`ceiling`]
//!   (`max_connections` + max(max_connections / 8, 16)) places, lingering included: the
//!   relay never holds more client sockets than that, however fast newcomers evict.
//! * Only when every counted place is a welcomed session (never evicted) is the newcomer
//!   refused for that reason alone.
//!
//! The address table also requires the evictor to be within its address's connect rate
//! and takes a token of its network's eviction bucket for the eviction (with a network
//! cap: 8 × the address connect rate and burst, apart from the bucket of the network's
//! refusals at the caps, whose debt bans the network; `rate::AddrTable::admit`): a flood
//! of evictions is refused, charged and banned like a flood into a full relay — by
//! address, never the network as a whole (a full relay is no doing of a network's: beyond
//! its bucket a newcomer is refused as `Global`, and evictions never bring the network's
//! refusals nearer a ban).
//!
//! An evicted connection is given [`EVICTED_CLOSE`] from its eviction, also when that
//! comes during its drain (one not yet welcomed stays in the queues while it drains after
//! a fatal `Err` before `Welcome`: the drain is then cut short).
//!
//! Every operation is O(log n) in the connections waiting (ordered maps by age and by
//! network size): a flood of new connections costs the relay no scan per accept.
//!
//! Lock order: the [`AddrTable`]'s or the `Registry`'s lock, then this one; never the
//! other way round.
//!
//! [`AddrTable`]: crate::rate::AddrTable

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Why an evicted connection is closed (its `Err(too_many_connections)` message).
pub(crate) const EVICTED: &str =
    "relay full: handshake evicted (a newer connection took the place of this one, which had not completed its Hello; max_connections)";

/// Places beyond `max_connections` held by evicted connections still closing, at least.
pub(crate) const LINGER_MIN: usize = 16;

/// Most places a gate holds, lingering (evicted, still closing) ones included:
/// `max_connections` plus an eighth of it (at least [`LINGER_MIN`]). Past it a newcomer is
/// refused, even while some place could be evicted: the relay's client sockets stay under
/// it however fast newcomers evict (an evicted connection whose peer never closes keeps its
/// socket up to [`EVICTED_CLOSE`]).
pub(crate) fn ceiling(max_connections: usize) -> usize {
    max_connections.saturating_add((max_connections / 8).max(LINGER_MIN))
}

/// Longest a connection is protected from eviction after it was admitted.
pub(crate) const GRACE_MAX: Duration = Duration::from_secs(2);

/// How young a connection is never evicted: `min(2 s, hello_ms / 2)`. Long enough for an
/// honest TLS/WebSocket handshake and `Hello` on a slow link; short enough that a stranger
/// holding places must renew each of them five times per `hello_ms` (defaults) to keep
/// newcomers out, where it used to renew them once.
pub(crate) fn grace(hello: Duration) -> Duration {
    GRACE_MAX.min(hello / 2)
}

/// How long an evicted connection is given to be told why (its `Err` written; over QUIC
/// delivered too) before its socket is closed, whether or not its peer closed: no drain.
/// Over TCP and WebSocket it is closed as soon as its `Err` is written (what it sent that
/// is readable then discarded first), not when this runs out: a peer that never closes
/// does not keep an evicted socket for the whole of it.
pub(crate) const EVICTED_CLOSE: Duration = Duration::from_secs(1);

/// Most refused plain TCP connections being told why at once (`Err(too_many_connections)`
/// at the global or per-address cap, each given up to [`EVICTED_CLOSE`]): beyond, a
/// refused connection is closed unanswered. Those sockets count in no gate, so without a
/// cap a full relay held about its accept rate × 1 s more of them.
pub(crate) const REFUSAL_ANSWERS: usize = 64;

/// A unit is not held in this gate.
const NONE: u8 = 0;
/// A unit is held and counted against the gate's limit.
const COUNTED: u8 = 1;
/// A unit is held by an evicted connection: not counted against the limit any more.
const LINGERING: u8 = 2;

/// The network a connection counts in for the fair share (`None`: in-process).
type Net = Option<IpAddr>;

/// One connection's place in the queues, shared by its tasks and the gates.
#[derive(Debug)]
pub(crate) struct Ticket {
    seq: u64,
    net: Net,
    /// When it was admitted (the grace period runs from here).
    born: Instant,
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
    next: AtomicU64,
    grace: Duration,
    /// Nanoseconds added to the clock the grace is judged by ([`Handshakes::advance`]):
    /// tests age connections past their grace without sleeping. Always 0 in a relay.
    skew: AtomicU64,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Inner {
    table: Queue,
    registry: Queue,
    /// Each network's unwelcomed connections in either queue: the fair share both gates
    /// rank networks by. One count for both, so the gates agree on who holds the most: a
    /// connection the table admitted (evicting one of its network) counts before it
    /// reaches the registry, and one evicted stops counting in both at once — the
    /// registry's own queue alone under-counted a flooding network while its newcomers
    /// were on their way, and could tie it with an honest client's network.
    waiting: HashMap<Net, usize>,
}

/// Where a network ranks in a [`Queue`]: how many unwelcomed places it holds relay-wide
/// ([`Inner::waiting`]), then its oldest here (`Reverse(seq)`: the oldest ranks higher).
type Rank = (usize, Reverse<u64>, Net);

/// One gate's unwelcomed connections, by age and by network.
#[derive(Debug, Default)]
struct Queue {
    by_seq: BTreeMap<u64, Arc<Ticket>>,
    /// Each network's unwelcomed connections here, by age, and its key in `rank`.
    by_net: HashMap<Net, (BTreeSet<u64>, Option<Rank>)>,
    /// Networks by [`Rank`]: the victim's network is the last.
    rank: BTreeSet<Rank>,
    /// Units held by evicted connections (not counted against the limit).
    lingering: usize,
}

impl Queue {
    fn contains(&self, t: &Ticket) -> bool {
        self.by_seq.contains_key(&t.seq)
    }

    /// Adds `t` (its network re-ranked by the caller); false if it was here.
    fn insert(&mut self, t: &Arc<Ticket>) -> bool {
        if self.by_seq.insert(t.seq, t.clone()).is_some() {
            return false;
        }
        self.by_net.entry(t.net).or_default().0.insert(t.seq);
        true
    }

    /// Removes `t` (its network re-ranked by the caller); false if it was not here.
    fn remove(&mut self, t: &Ticket) -> bool {
        if self.by_seq.remove(&t.seq).is_none() {
            return false;
        }
        if let Some((set, _)) = self.by_net.get_mut(&t.net) {
            set.remove(&t.seq);
        }
        true
    }

    /// Ranks `net` anew: it holds `waiting` unwelcomed places relay-wide.
    fn rerank(&mut self, net: Net, waiting: usize) {
        let Some((set, key)) = self.by_net.get_mut(&net) else {
            return;
        };
        if let Some(old) = key.take() {
            self.rank.remove(&old);
        }
        match set.first() {
            Some(&first) => {
                let new = (waiting, Reverse(first), net);
                self.rank.insert(new);
                *key = Some(new);
            }
            None => {
                self.by_net.remove(&net);
            }
        }
    }

    /// The fair-share victim: the oldest connection of the network holding the most.
    fn victim(&self) -> Option<&Arc<Ticket>> {
        let &(_, Reverse(seq), _) = self.rank.last()?;
        self.by_seq.get(&seq)
    }
}

/// Which gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Table,
    Registry,
}

/// What a newcomer to a gate meets ([`Guard::admission`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A place is free.
    Admit,
    /// Full: it may take this connection's place ([`Guard::evict`]).
    Evict(Arc<Ticket>),
    /// Full, none to evict (every place a welcomed session, or the victim within its
    /// grace), or at the [`ceiling`]: refused.
    Refuse,
}

impl PartialEq for Ticket {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}
impl Eq for Ticket {}

impl Handshakes {
    /// `grace`: how young a connection is never evicted ([`grace`]).
    pub(crate) fn new(metrics: Arc<Metrics>, grace: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            next: AtomicU64::new(0),
            grace,
            skew: AtomicU64::new(0),
            metrics,
        }
    }

    /// The queues, locked: one gate's decision and its changes under one lock.
    pub(crate) fn lock(&self) -> Guard<'_> {
        Guard {
            inner: self.inner.lock().unwrap_or_else(|p| p.into_inner()),
            h: self,
        }
    }

    /// Test hook: the grace is judged as if `by` more had passed for every connection
    /// admitted so far (and none for the ones admitted after): a test ages handshakes past
    /// their grace at once instead of sleeping, which a loaded machine could stretch past
    /// their `hello_ms` ([`RelayHandle::age_handshakes`](crate::RelayHandle::age_handshakes)).
    pub(crate) fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.skew.fetch_add(nanos, Relaxed);
    }

    /// `t` on the clock the grace is judged by ([`Handshakes::advance`]).
    fn clock(&self, t: Instant) -> Instant {
        t + Duration::from_nanos(self.skew.load(Relaxed))
    }

    /// A new connection's ticket (in no queue yet), admitted at `born` from network `net`.
    pub(crate) fn ticket(&self, net: Option<IpAddr>, born: Instant) -> Arc<Ticket> {
        Arc::new(Ticket {
            seq: self.next.fetch_add(1, Relaxed) + 1,
            net,
            born: self.clock(born),
            evicted: AtomicBool::new(false),
            passed: AtomicBool::new(false),
            notify: Notify::new(),
            table: AtomicU8::new(NONE),
            registry: AtomicU8::new(NONE),
        })
    }

    /// `gate` stops counting `t`: its connection ended (called under the gate's lock, as
    /// the gate takes its unit off its count).
    pub(crate) fn leave(&self, gate: Gate, t: &Arc<Ticket>) {
        let mut g = self.lock();
        g.inner.remove(gate, t);
        if t.unit(gate).swap(NONE, Relaxed) == LINGERING {
            g.inner.queue(gate).lingering -= 1;
        }
    }

    /// The connection was welcomed: it leaves the queues and is never evicted. False if it
    /// was evicted first (it must then close, not be welcomed).
    pub(crate) fn pass(&self, t: &Arc<Ticket>) -> bool {
        let mut g = self.lock();
        if t.is_evicted() {
            return false;
        }
        t.passed.store(true, Relaxed);
        g.inner.remove(Gate::Table, t);
        g.inner.remove(Gate::Registry, t);
        true
    }

    /// Units of `gate` held by evicted connections, not counted against the limit.
    #[cfg(test)]
    pub(crate) fn lingering(&self, gate: Gate) -> usize {
        self.lock().lingering(gate)
    }
}

/// The locked queues ([`Handshakes::lock`]).
pub(crate) struct Guard<'a> {
    inner: MutexGuard<'a, Inner>,
    h: &'a Handshakes,
}

impl Guard<'_> {
    /// Units of `gate` held by evicted connections, not counted against the limit.
    pub(crate) fn lingering(&self, gate: Gate) -> usize {
        match gate {
            Gate::Table => self.inner.table.lingering,
            Gate::Registry => self.inner.registry.lingering,
        }
    }

    /// What a newcomer to `gate` meets at `now`, the gate holding `held` places (lingering
    /// ones included) of `max` (see the module doc: the ceiling, then the count without
    /// lingering places, then the fair-share victim and its grace).
    pub(crate) fn admission(&self, gate: Gate, held: usize, max: usize, now: Instant) -> Admission {
        if held >= ceiling(max) {
            return Admission::Refuse;
        }
        if held.saturating_sub(self.lingering(gate)) < max {
            return Admission::Admit;
        }
        let queue = match gate {
            Gate::Table => &self.inner.table,
            Gate::Registry => &self.inner.registry,
        };
        let now = self.h.clock(now);
        match queue.victim() {
            Some(v) if now.saturating_duration_since(v.born) >= self.h.grace => {
                Admission::Evict(v.clone())
            }
            _ => Admission::Refuse,
        }
    }

    /// Evicts `t` (an [`Admission::Evict`] victim, under the same lock): it stops counting
    /// in both gates and is told to close.
    pub(crate) fn evict(&mut self, t: &Arc<Ticket>) {
        self.inner.remove(Gate::Table, t);
        self.inner.remove(Gate::Registry, t);
        let inner = &mut *self.inner;
        t.evicted.store(true, Relaxed);
        if t.table
            .compare_exchange(COUNTED, LINGERING, Relaxed, Relaxed)
            .is_ok()
        {
            inner.table.lingering += 1;
        }
        if t.registry
            .compare_exchange(COUNTED, LINGERING, Relaxed, Relaxed)
            .is_ok()
        {
            inner.registry.lingering += 1;
        }
        t.notify.notify_waiters();
        self.h.metrics.handshake_evicted();
    }

    /// `gate` counts `t` from now (called under the gate's lock); it waits in the gate's
    /// queue until welcomed. An already evicted connection's unit lingers at once.
    pub(crate) fn enter(&mut self, gate: Gate, t: &Arc<Ticket>) {
        if t.is_evicted() {
            t.unit(gate).store(LINGERING, Relaxed);
            self.inner.queue(gate).lingering += 1;
        } else {
            t.unit(gate).store(COUNTED, Relaxed);
            if !t.passed.load(Relaxed) {
                self.inner.insert(gate, t);
            }
        }
    }
}

impl Ticket {
    /// Its unit in `gate`.
    fn unit(&self, gate: Gate) -> &AtomicU8 {
        match gate {
            Gate::Table => &self.table,
            Gate::Registry => &self.registry,
        }
    }
}

impl Inner {
    fn queue(&mut self, gate: Gate) -> &mut Queue {
        match gate {
            Gate::Table => &mut self.table,
            Gate::Registry => &mut self.registry,
        }
    }

    fn waits(&self, t: &Ticket) -> bool {
        self.table.contains(t) || self.registry.contains(t)
    }

    /// `t` waits in `gate`'s queue; its network counts it once, in however many queues.
    fn insert(&mut self, gate: Gate, t: &Arc<Ticket>) {
        let before = self.waits(t);
        if self.queue(gate).insert(t) && !before {
            *self.waiting.entry(t.net).or_insert(0) += 1;
        }
        self.rerank(t.net);
    }

    /// `t` leaves `gate`'s queue; its network stops counting it once it is in neither.
    fn remove(&mut self, gate: Gate, t: &Ticket) {
        if !self.queue(gate).remove(t) {
            return;
        }
        if !self.waits(t) {
            if let Some(n) = self.waiting.get_mut(&t.net) {
                *n -= 1;
                if *n == 0 {
                    self.waiting.remove(&t.net);
                }
            }
        }
        self.rerank(t.net);
    }

    fn rerank(&mut self, net: Net) {
        let waiting = self.waiting.get(&net).copied().unwrap_or(0);
        self.table.rerank(net, waiting);
        self.registry.rerank(net, waiting);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Net {
        Some(s.parse().unwrap())
    }

    /// The victim is evicted in both gates at once: it stops counting (its units linger)
    /// and leaves both queues; a welcomed connection is never a victim; an evicted one is
    /// not welcomed.
    #[test]
    fn an_evicted_connection_stops_counting_in_both_gates() {
        let h = Handshakes::new(Arc::new(Metrics::new()), Duration::ZERO);
        let t0 = Instant::now();
        let (a, b, c) = (
            h.ticket(net("10.0.0.0"), t0),
            h.ticket(net("10.0.1.0"), t0),
            h.ticket(net("10.0.2.0"), t0),
        );
        let mut g = h.lock();
        for t in [&a, &b, &c] {
            g.enter(Gate::Table, t);
        }
        g.enter(Gate::Registry, &a);
        drop(g);
        assert!(h.pass(&b), "b is welcomed: never evicted");
        let mut g = h.lock();
        assert_eq!(g.admission(Gate::Table, 2, 3, t0), Admission::Admit);
        assert_eq!(
            g.admission(Gate::Table, 3, 3, t0),
            Admission::Evict(a.clone())
        );
        g.evict(&a);
        assert!(a.is_evicted() && !b.is_evicted() && !c.is_evicted());
        assert_eq!(
            (g.lingering(Gate::Table), g.lingering(Gate::Registry)),
            (1, 1)
        );
        assert_eq!(g.admission(Gate::Registry, 1, 1, t0), Admission::Admit);
        assert_eq!(
            g.admission(Gate::Table, 4, 3, t0),
            Admission::Evict(c.clone())
        );
        g.evict(&c);
        assert_eq!(
            g.admission(Gate::Table, 5, 3, t0),
            Admission::Refuse,
            "b alone, welcomed"
        );
        drop(g);
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

    /// Fair share: the victim is the oldest of the network holding the most unwelcomed
    /// places (ties: the one whose oldest is oldest), never one within its grace period
    /// (the newcomer is refused instead); and nothing is evicted at the ceiling.
    #[test]
    fn the_victim_is_the_oldest_of_the_largest_network_past_its_grace() {
        let grace = Duration::from_secs(2);
        let h = Handshakes::new(Arc::new(Metrics::new()), grace);
        let t0 = Instant::now();
        let honest = h.ticket(net("192.0.2.0"), t0);
        let flood: Vec<_> = (0..3)
            .map(|i| h.ticket(net("10.0.0.0"), t0 + Duration::from_millis(i)))
            .collect();
        let mut g = h.lock();
        g.enter(Gate::Table, &honest);
        for t in &flood {
            g.enter(Gate::Table, t);
        }
        let later = t0 + Duration::from_secs(3);
        // The honest handshake is the oldest, but 10.0.0.0 holds the most.
        assert_eq!(
            g.admission(Gate::Table, 4, 4, later),
            Admission::Evict(flood[0].clone())
        );
        g.evict(&flood[0]);
        assert_eq!(
            g.admission(Gate::Table, 5, 4, later),
            Admission::Evict(flood[1].clone())
        );
        g.evict(&flood[1]);
        // One each: the tie goes to the network whose oldest is oldest.
        assert_eq!(
            g.admission(Gate::Table, 6, 4, later),
            Admission::Evict(honest.clone())
        );
        // Within the grace: refused, nothing evicted.
        assert_eq!(
            g.admission(Gate::Table, 6, 4, t0 + Duration::from_secs(1)),
            Admission::Refuse
        );
        // At the ceiling (4 + 16), lingering places included: refused.
        assert_eq!(ceiling(4), 20);
        assert_eq!(ceiling(10_000), 11_250);
        assert_eq!(g.admission(Gate::Table, 20, 4, later), Admission::Refuse);
        assert_eq!(super::grace(Duration::from_secs(10)), GRACE_MAX);
        assert_eq!(
            super::grace(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
    }

    /// Both gates rank networks by their unwelcomed connections in either queue: a
    /// connection the table admitted counts for its network in the registry's choice
    /// before it registers (fails without: the registry saw the flood's network and the
    /// honest one tied at one each, and evicted the honest handshake, the older).
    #[test]
    fn both_gates_rank_networks_by_their_connections_in_either_queue() {
        let h = Handshakes::new(Arc::new(Metrics::new()), Duration::ZERO);
        let t0 = Instant::now();
        let honest = h.ticket(net("192.0.2.1"), t0);
        let flood: Vec<_> = (0..4).map(|_| h.ticket(net("10.0.0.9"), t0)).collect();
        let mut g = h.lock();
        g.enter(Gate::Table, &honest);
        g.enter(Gate::Registry, &honest);
        g.enter(Gate::Table, &flood[0]);
        g.enter(Gate::Registry, &flood[0]);
        // The table admitted two more of the flood (evicting one of it, say): not yet in
        // the registry.
        g.enter(Gate::Table, &flood[1]);
        g.enter(Gate::Table, &flood[2]);
        assert_eq!(
            g.admission(Gate::Registry, 2, 2, t0),
            Admission::Evict(flood[0].clone()),
            "the flood's network holds 3, the honest one 1"
        );
        // The table evicts the flood's oldest for its newcomer under one lock: the
        // network's count stays 3 for both gates.
        g.evict(&flood[0]);
        g.enter(Gate::Table, &flood[3]);
        g.enter(Gate::Registry, &flood[1]);
        // (flood[0]'s places linger: held, not counted.)
        assert_eq!(
            g.admission(Gate::Registry, 3, 2, t0),
            Admission::Evict(flood[1].clone())
        );
        assert_eq!(
            g.admission(Gate::Table, 5, 4, t0),
            Admission::Evict(flood[1].clone())
        );
        drop(g);
        // Connections that end stop counting once out of both queues.
        h.leave(Gate::Registry, &flood[1]);
        h.leave(Gate::Table, &flood[2]);
        h.leave(Gate::Table, &flood[3]);
        let g = h.lock();
        assert_eq!(
            g.admission(Gate::Table, 3, 2, t0),
            Admission::Evict(honest.clone()),
            "one each: the tie goes to the oldest"
        );
        assert_eq!(g.inner.waiting.get(&net("10.0.0.9")), Some(&1));
        drop(g);
        h.leave(Gate::Table, &flood[1]);
        h.leave(Gate::Table, &flood[0]);
        h.leave(Gate::Registry, &flood[0]);
        assert!(h.pass(&honest));
        let g = h.lock();
        assert!(g.inner.waiting.is_empty());
        assert!(g.inner.table.rank.is_empty() && g.inner.registry.rank.is_empty());
        assert!(g.inner.table.by_net.is_empty() && g.inner.registry.by_net.is_empty());
        assert_eq!(
            (g.lingering(Gate::Table), g.lingering(Gate::Registry)),
            (0, 0)
        );
    }
}
