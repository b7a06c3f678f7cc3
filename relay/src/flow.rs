//! Flow control of QoS ≥ 1 subscriptions: at-least-once tracking with a credit.
//!
//! A subscription may have at most `credit` messages (and `max_bytes` of envelopes)
//! delivered and not yet acknowledged. When a message arrives beyond that, delivery of
//! that subscription *pauses*: the message and every later one stay in the store, nothing
//! is queued for it, and no other subscription, `PubAck` or heartbeat of the connection is
//! held up. When acks free credit, a catch-up task ([`catch_up`]) reads the skipped
//! messages from the store and sends them in sequence order as credit allows; once it has
//! sent everything the live path skipped, it resumes live delivery under the routing lock
//! (see `Router::resume_live`), so there is no gap and no duplicate.
//!
//! The credit check and the pause happen under one lock with the ack that frees credit, so
//! a pause is always followed by a catch-up once credit frees.
//!
//! A catch-up reserves room for each chunk before it reads it, as history senders do
//! (`Outbound::reserve_read`): the reservation counts like queued bytes (the connection's
//! queue room and the relay-wide budget) until the chunk's messages are queued. So a
//! connection's catch-ups together hold at most `queue.max_bytes` and one chunk, however
//! many of its subscriptions pause. (Each used to read its chunk — up to 1 MiB and the
//! envelope crossing it — after checking for room only, and keep the unsent rest,
//! uncounted, while the client did not ack: 1,000 paused subscriptions of one connection
//! held 1–2 GiB.)
//!
//! A catch-up (and a QoS ≥ 1 history, `replay`) reads no more than its credit allows at
//! the time ([`Tracking::allowance`]: messages and bytes, within a chunk and what the
//! relay-wide budget of unacknowledged bytes lets its connection take), queues it, and
//! waits for credit before it reserves and reads again, holding nothing meanwhile: a
//! subscription whose client does not ack holds no reservation and no message read, so it
//! never holds up the connection's other senders (retained values, histories, catch-ups)
//! beyond the bytes it queued, and each read goes on where the previous one ended (no
//! chunk is read again: a JetStream read keeps its consumer). Only a message larger than
//! the byte allowance is read alone and dropped, then read again once there is credit
//! for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use whispeer_protocol::frame::ErrFrame;
use whispeer_protocol::{codec, Envelope, ErrorCode, Frame, TokenPattern};

use crate::ids::Seq;
use crate::metrics::Metrics;
use crate::outbound::ReadHold;
use crate::relay::Shared;
use crate::router::{msg_frame, own_copy_frame, Target};
use crate::store::{
    Admission, DurableKey, ReadLimit, ReadPlan, StoreError, Tenant, READ_CHUNK_BYTES,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The relay-wide budget of unacknowledged envelope bytes (`delivery.total_unacked_bytes`),
/// shared by source address (the connection's first [`Tenant`]: its address, or its IPv6
/// network) and, within an address, by connection.
///
/// `connection_unacked_bytes` bounds one connection only, and a QoS 0 message delivered to
/// a QoS ≥ 1 subscription is kept nowhere else (the store does not keep it, so no store
/// quota applies; once written it leaves the outbound budget): 256 connections of one
/// address that read but never ack held 64 MiB each, 16 GiB per address.
///
/// The rule ([`BudgetShare::verdict`]) is the queues' fair share with half the budget as
/// its bounds: up to half, anyone's delivery is taken (honest load never gets near it);
/// beyond half, only an address holding less than its share of that half (half / addresses
/// holding unacknowledged bytes; an address holding nothing is always under it), and within
/// it only a connection holding less than its share of the address's (the address's share /
/// its connections holding bytes; a connection holding nothing may take one); and within
/// the whole budget. A subscription refused pauses as without credit
/// ([`Tracking::deliver_live`]): stored messages wait in the store, and unstored ones are
/// counted and reported in a `Gap` when its delivery resumes.
///
/// The whole budget can fill while every address is at or under its share: shares shrink
/// as addresses join, and what an address took under a larger share stays. (At the
/// default: one address's non-acking connections take the first half, a second address
/// its share of a quarter, a third ~171 MiB, a fourth the rest — and every other address,
/// holding nothing, was refused for good.) No rule over what is held can avoid that
/// without reserving room per address, and addresses are many. So room is taken back
/// instead ([`UnackedBudget::reclaim`]), from the address holding most, when an address
/// under its share (and a connection under its share of it) is refused only because the
/// whole budget is spent:
///
/// 1. First, gently ([`UnackedBudget::forget`]): its connections' unacknowledged QoS 0
///    deliveries that the store does not keep — the room a non-acking QoS 0 flood holds,
///    kept only for a redelivery that at-most-once does not owe — are forgotten, the
///    connection holding most of them first, until what is missing is freed. Each one is
///    counted (`whispeer_relay_unacked_qos0_forgotten_total`). It was sent (or is queued
///    to be: the outbound queue is untouched), so no `Gap` is told — a `Gap` counts `Msg`
///    frames dropped, and the client has these; what it loses is only a redelivery after a
///    reconnect, which QoS 0 never promised. An `Ack` of it later is of an unknown
///    sequence (ignored). No connection is closed, so an honest connection sharing
///    the flood's address keeps its connection and its stored messages in flight. The
///    bytes are freed at once, so the refused message is taken in the same step.
/// 2. Only if that did not free enough: the connection holding most of that address is
///    closed as a slow consumer (fatal `Err(slow_consumer)`, counted in
///    `whispeer_relay_slow_consumer_disconnects_total`), then the next, until what closing
///    connections still hold covers the message. Its stored messages stay in the store
///    (redelivered when it subscribes again); its unstored QoS 0 ones go with it
///    (at-most-once).
///
/// That address is over its share whenever this happens: the whole budget (2 × half) minus
/// the message is held, the asker holds less than half / n of it, so one of the other
/// n − 1 addresses holds more than (2·half − len − half/n) / (n − 1), which is more than
/// half / n for any message smaller than half the budget — so an honest address (under its
/// share) is never the one whose deliveries are forgotten or whose connection is closed,
/// and its refused message is delivered at once when forgetting freed the room, else once
/// the closed connection's bytes are freed (its pause is retried at each redelivery tick
/// and credit wait, ≤ 1 s). Each refusal costs the flood its unstored deliveries, or a
/// connection, which it must open again (and fill again) through the per-address
/// connection limits.
///
/// Forgetting runs on the asker's delivery, under its subscription's lock (and perhaps
/// its shard's routing lock), while the deliveries are owned by the victim's subscriptions:
/// each victim subscription's lock is only tried ([`Tracking::forget_unstored`]); one taken
/// at that moment (being delivered to or acked) is skipped — waiting could wait on a
/// delivery that is itself taking room back — and what it holds is left to the next step.
/// Bytes forgotten leave `used` before [`UnackedBudget::close_heaviest`] measures what is
/// missing, and bytes of connections already closing count as on their way back, so
/// neither step takes more than the message needs (but whole connections at a time).
///
/// The check and the addition are separate steps (each under its subscription's lock, not
/// a relay-wide one): routers delivering on several shards at once may each pass it, so
/// the bound may be exceeded by one message per concurrently routing shard.
pub(crate) struct UnackedBudget {
    /// Bytes (0 = unlimited).
    max: u64,
    /// The bytes held, relay-wide, are `metrics.unacked_bytes` (the gauge).
    metrics: Arc<Metrics>,
    /// Addresses holding bytes.
    busy: AtomicUsize,
    /// Each address with a connection, by its tenant (removed with its last connection).
    by: Mutex<HashMap<Tenant, Place>>,
    /// The next [`BudgetShare::key`].
    next_key: AtomicU64,
}

impl std::fmt::Debug for UnackedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnackedBudget")
            .field("max", &self.max)
            .field("used", &self.used())
            .finish()
    }
}

/// An address's entry in the [`UnackedBudget`]: its counts and its connections.
#[derive(Debug)]
struct Place {
    addr: Arc<AddrUnacked>,
    /// Its connections' [`BudgetShare`]s alive (by key), kept under the map's lock (not
    /// the `Arc`'s strong count: a share's own reference drops after its `drop` ran, so two
    /// last connections closing at once each saw the other's and the entry leaked). Each
    /// is its connection's counts, once made ([`ConnUnacked::new`]), for [`UnackedBudget::reclaim`].
    conns: HashMap<u64, Weak<ConnUnacked>>,
}

/// What one address holds of the [`UnackedBudget`].
#[derive(Debug, Default)]
pub(crate) struct AddrUnacked {
    bytes: AtomicU64,
    /// Its connections holding bytes.
    busy: AtomicUsize,
}

/// Closes a connection as a slow consumer (the budget takes its room back).
pub(crate) type Evict = Box<dyn Fn() + Send + Sync>;

/// A connection's place in the [`UnackedBudget`]: its address's counts, given back (the
/// address forgotten with its last connection) when dropped.
pub(crate) struct BudgetShare {
    budget: Arc<UnackedBudget>,
    tenant: Tenant,
    addr: Arc<AddrUnacked>,
    key: u64,
    /// Closes the connection when the budget takes its room back.
    evict: Evict,
}

impl std::fmt::Debug for BudgetShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetShare")
            .field("tenant", &self.tenant)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        let mut by = lock(&self.budget.by);
        if let Some(place) = by.get_mut(&self.tenant) {
            place.conns.remove(&self.key);
            if place.conns.is_empty() {
                by.remove(&self.tenant);
            }
        }
    }
}

/// What the budget says to a connection asking for more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Yes,
    /// Its address (or it, within the address) holds its share.
    No,
    /// Under its share, but the whole budget is spent: room is taken back
    /// ([`UnackedBudget::reclaim`]).
    Full,
}

impl BudgetShare {
    /// Whether this connection, holding `conn` bytes, may take `len` more: the fair share
    /// over half the budget, within the whole (see [`UnackedBudget`]).
    fn verdict(&self, conn: usize, len: usize) -> Verdict {
        let b = &self.budget;
        if b.max == 0 {
            return Verdict::Yes;
        }
        let (len, conn) = (len as u64, conn as u64);
        let half = (b.max / 2).max(1);
        let used = b.used();
        if used + len <= half {
            // Within half: anyone.
            return Verdict::Yes;
        }
        let mine = self.addr.bytes.load(Relaxed);
        let addrs = (b.busy.load(Relaxed) + usize::from(mine == 0)).max(1) as u64;
        // A share never rounds down to 0.
        let share = (half / addrs).max(1);
        let conns = (self.addr.busy.load(Relaxed) + usize::from(conn == 0)).max(1) as u64;
        let conn_share = (share / conns).max(1);
        if !(mine == 0 || mine + len <= share) || !(conn == 0 || conn + len <= conn_share) {
            return Verdict::No;
        }
        if used == 0 || used + len <= b.max {
            Verdict::Yes
        } else {
            Verdict::Full
        }
    }

    /// The most bytes [`verdict`](Self::verdict) lets this connection, holding `conn`,
    /// take now (`u64::MAX`: no bound); a catch-up reads no more (see
    /// [`Tracking::allowance`]). Takes room back, as [`admits`](Self::admits) does, when
    /// only the whole budget leaves it none (and then answers for what it freed at once:
    /// forgotten QoS 0 deliveries).
    fn room(&self, conn: usize) -> u64 {
        match self.room_now(conn) {
            (_, true) => {
                self.budget.reclaim(&self.tenant, 1);
                self.room_now(conn).0
            }
            (room, false) => room,
        }
    }

    /// [`room`](Self::room) without taking room back, and whether the whole budget alone
    /// leaves this connection (under its shares) none.
    fn room_now(&self, conn: usize) -> (u64, bool) {
        let b = &self.budget;
        if b.max == 0 {
            return (u64::MAX, false);
        }
        let conn = conn as u64;
        let half = (b.max / 2).max(1);
        let used = b.used();
        let within = half.saturating_sub(used);
        let mine = self.addr.bytes.load(Relaxed);
        let addrs = (b.busy.load(Relaxed) + usize::from(mine == 0)).max(1) as u64;
        let share = (half / addrs).max(1);
        let conns = (self.addr.busy.load(Relaxed) + usize::from(conn == 0)).max(1) as u64;
        let conn_share = (share / conns).max(1);
        let addr_room = if mine == 0 {
            u64::MAX
        } else {
            share.saturating_sub(mine)
        };
        let conn_room = if conn == 0 {
            u64::MAX
        } else {
            conn_share.saturating_sub(conn)
        };
        let whole = if used == 0 {
            u64::MAX
        } else {
            b.max.saturating_sub(used)
        };
        let full = within == 0 && whole == 0 && addr_room > 0 && conn_room > 0;
        (within.max(addr_room.min(conn_room).min(whole)), full)
    }

    /// [`verdict`](Self::verdict), taking room back when the whole budget refuses a
    /// connection under its share: what forgetting unstored QoS 0 deliveries freed is
    /// taken at once; what closing connections free comes later (the refused subscription
    /// pauses and retries).
    fn admits(&self, conn: usize, len: usize) -> bool {
        match self.verdict(conn, len) {
            Verdict::Yes => true,
            Verdict::No => false,
            Verdict::Full => {
                self.budget.reclaim(&self.tenant, len);
                self.verdict(conn, len) == Verdict::Yes
            }
        }
    }
}

impl UnackedBudget {
    /// `max` bytes for all connections together (0 = unlimited), counted in `metrics`.
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            max: max as u64,
            metrics,
            busy: AtomicUsize::new(0),
            by: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
        })
    }

    /// A connection from `tenant` joins (its address's place, made if it has none);
    /// `evict` closes it as a slow consumer ([`reclaim`](Self::reclaim)).
    pub(crate) fn share(self: &Arc<Self>, tenant: Tenant, evict: Evict) -> BudgetShare {
        let key = self.next_key.fetch_add(1, Relaxed);
        let addr = {
            let mut by = lock(&self.by);
            let place = by.entry(tenant.clone()).or_insert_with(|| Place {
                addr: Arc::default(),
                conns: HashMap::new(),
            });
            place.conns.insert(key, Weak::new());
            place.addr.clone()
        };
        BudgetShare {
            budget: self.clone(),
            tenant,
            addr,
            key,
            evict,
        }
    }

    /// Bytes held, relay-wide.
    pub(crate) fn used(&self) -> u64 {
        self.metrics.unacked_bytes.load(Relaxed)
    }

    /// Takes room back for `len` bytes that an address under its share (`asker`) was
    /// refused for lack of it (see [`UnackedBudget`]), from the address holding most (never
    /// the asker's, nor an address at or under its share): first by forgetting its
    /// connections' unstored QoS 0 deliveries ([`forget`](Self::forget), freed at once);
    /// then, if that was not enough, by closing, as slow consumers, the connections holding
    /// most of it, until what the closing connections still hold covers what is missing
    /// (their bytes are freed as their sessions end).
    fn reclaim(&self, asker: &Tenant, len: usize) {
        self.forget(asker, len);
        self.close_heaviest(asker, len);
    }

    /// The gentle step of [`reclaim`](Self::reclaim): forgets the unacknowledged QoS 0
    /// deliveries the store does not keep (held only for a redelivery at-most-once does
    /// not owe) of the connections of the addresses holding most — heaviest address first,
    /// and in it the connection holding most of them — until what is missing is freed.
    /// Each one forgotten is counted (it was sent: no `Gap`)
    /// ([`ConnUnacked::forget_unstored`]); no connection is closed. Returns the bytes freed.
    fn forget(&self, asker: &Tenant, len: usize) -> u64 {
        let (mut addrs, share, pending) = self.candidates(asker);
        let need = (self.used() + len as u64).saturating_sub(self.max);
        let mut freed = 0u64;
        while pending + freed < need {
            // The heaviest address over its share with a connection holding unstored
            // QoS 0 deliveries not yet forgotten.
            let Some((held, conns)) = addrs
                .iter_mut()
                .filter(|(held, conns)| *held > share && !conns.is_empty())
                .max_by_key(|(held, _)| *held)
            else {
                break;
            };
            let i = (0..conns.len())
                .max_by_key(|&i| conns[i].unstored.load(Relaxed))
                .expect("not empty");
            let c = conns.swap_remove(i);
            if c.evicted.load(Relaxed) || c.unstored.load(Relaxed) == 0 {
                continue;
            }
            let n = c.forget_unstored() as u64;
            freed += n;
            *held = held.saturating_sub(n);
        }
        // The upgraded counts drop outside the lock (as in `close_heaviest`).
        drop(addrs);
        freed
    }

    /// Each address but `asker`'s: what it holds less what its closing connections hold
    /// (on its way back), and its connections (alive); the address share over half the
    /// budget; and what all closing connections hold. The counts are upgraded under the
    /// map's lock but the caller drops them after it (the last one drops its share, which
    /// takes the lock).
    #[allow(clippy::type_complexity)]
    fn candidates(&self, asker: &Tenant) -> (Vec<(u64, Vec<Arc<ConnUnacked>>)>, u64, u64) {
        let by = lock(&self.by);
        let half = (self.max / 2).max(1);
        let share = half / (self.busy.load(Relaxed).max(1) as u64);
        let mut pending = 0u64;
        let mut addrs = Vec::new();
        let mut asker_conns = Vec::new();
        for (tenant, place) in by.iter() {
            let conns: Vec<_> = place.conns.values().filter_map(Weak::upgrade).collect();
            let closing: u64 = conns
                .iter()
                .filter(|c| c.evicted.load(Relaxed))
                .map(|c| c.used.load(Relaxed) as u64)
                .sum();
            pending += closing;
            if tenant == asker {
                asker_conns = conns;
            } else {
                let held = place.addr.bytes.load(Relaxed).saturating_sub(closing);
                addrs.push((held, conns));
            }
        }
        drop(by);
        drop(asker_conns);
        (addrs, share, pending)
    }

    /// The harsh step of [`reclaim`](Self::reclaim), when forgetting did not free enough:
    /// closes, as slow consumers, the connections holding most of the address holding most
    /// until what the closing connections still hold covers what is missing.
    fn close_heaviest(&self, asker: &Tenant, len: usize) {
        let mut victims = Vec::new();
        {
            let (mut addrs, share, mut pending) = self.candidates(asker);
            let need = (self.used() + len as u64).saturating_sub(self.max);
            while pending < need {
                let Some((held, conns)) = addrs.iter_mut().max_by_key(|(held, _)| *held) else {
                    break;
                };
                if *held <= share {
                    break;
                }
                let Some(c) = conns
                    .iter()
                    .filter(|c| !c.evicted.load(Relaxed))
                    .max_by_key(|c| c.used.load(Relaxed))
                    .filter(|c| c.used.load(Relaxed) > 0)
                    .cloned()
                else {
                    *held = 0;
                    continue;
                };
                let n = c.used.load(Relaxed) as u64;
                c.evicted.store(true, Relaxed);
                pending += n;
                *held = held.saturating_sub(n);
                victims.push(c);
            }
            drop(addrs);
        }
        for c in victims {
            if let Some(b) = &c.budget {
                tracing::info!(tenant = ?b.tenant, held = c.used.load(Relaxed),
                    "closing a connection as a slow consumer: the relay-wide budget of \
                     unacknowledged bytes is spent and its address holds the most");
                (b.evict)();
            }
        }
    }

    fn add(&self, addr: &AddrUnacked, conn_before: usize, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        self.metrics.unacked_bytes.fetch_add(n, Relaxed);
        if addr.bytes.fetch_add(n, Relaxed) == 0 {
            self.busy.fetch_add(1, Relaxed);
        }
        if conn_before == 0 {
            addr.busy.fetch_add(1, Relaxed);
        }
    }

    fn sub(&self, addr: &AddrUnacked, conn_after: usize, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        self.metrics.unacked_bytes.fetch_sub(n, Relaxed);
        if addr.bytes.fetch_sub(n, Relaxed) == n {
            self.busy.fetch_sub(1, Relaxed);
        }
        if conn_after == 0 {
            addr.busy.fetch_sub(1, Relaxed);
        }
    }
}

/// Unacknowledged envelope bytes of all at-least-once subscriptions of one connection,
/// bounded by `delivery.connection_unacked_bytes`: `max_unacked_bytes` bounds one
/// subscription, and a connection may hold `max_subscriptions` of them, so a client that
/// reads but never acks made the relay keep 16 MiB per subscription, GiBs per connection.
///
/// It also indexes the connection's unacknowledged deliveries by sequence ([`Held`]), so an
/// `Ack` touches only the subscriptions that hold one of its sequences: applied to every
/// subscription, one frame of 4096 sequences over 1000 subscriptions cost 4 million map
/// look-ups under 1000 locks, for one token of the ack rate.
#[derive(Debug)]
pub(crate) struct ConnUnacked {
    used: AtomicUsize,
    max: usize,
    /// Notified when an ack (or a subscription's end) frees bytes.
    freed: Notify,
    /// Which subscription holds which sequence, and which paused. Taken after a
    /// subscription's own lock, never before it.
    held: Mutex<Held>,
    /// The next [`Tracking::id`].
    next_id: AtomicU64,
    /// Its place in the relay-wide budget (none: unbounded, as in some tests).
    budget: Option<BudgetShare>,
    /// Closed by the budget to take its room back ([`UnackedBudget::reclaim`]): what it
    /// still holds is on its way back.
    evicted: AtomicBool,
    /// Of `used`, the bytes of QoS 0 deliveries the store does not keep: what the budget
    /// may take back without closing the connection ([`ConnUnacked::forget_unstored`]).
    unstored: AtomicUsize,
}

/// The connection's unacknowledged deliveries, by sequence, and its paused subscriptions
/// (by [`Tracking::id`]), kept by each subscription's tracking as it changes.
#[derive(Debug, Default)]
struct Held {
    /// (sequence, tracking id) of every delivery not yet acknowledged.
    by_seq: BTreeSet<(u64, u64)>,
    /// Subscriptions whose delivery paused since the last ack that freed bytes: that ack
    /// may give them room (see `Session::on_ack`).
    paused: BTreeSet<u64>,
    /// Every tracking of the connection alive (ended ones too: they hold their bytes until
    /// dropped), by id, for [`ConnUnacked::forget_unstored`].
    tracks: HashMap<u64, Weak<Tracking>>,
}

impl ConnUnacked {
    /// At most `max` bytes, and what `budget` (the relay-wide one) admits.
    pub(crate) fn new(max: usize, budget: Option<BudgetShare>) -> Arc<Self> {
        Arc::new_cyclic(|me| {
            if let Some(b) = &budget {
                if let Some(place) = lock(&b.budget.by).get_mut(&b.tenant) {
                    place.conns.insert(b.key, me.clone());
                }
            }
            Self {
                used: AtomicUsize::new(0),
                max: max.max(1),
                freed: Notify::new(),
                held: Mutex::new(Held::default()),
                next_id: AtomicU64::new(1),
                budget,
                evicted: AtomicBool::new(false),
                unstored: AtomicUsize::new(0),
            }
        })
    }

    /// Which subscriptions hold which of `seqs` (each counted once): (tracking id, sequence)
    /// pairs, ordered by id then sequence. Costs a look-up per distinct sequence plus one
    /// per pair found: an ack of sequences nobody holds touches no subscription.
    pub(crate) fn holders(&self, seqs: &[u64]) -> Vec<(u64, u64)> {
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        seqs.dedup();
        let mut found = Vec::new();
        {
            let held = lock(&self.held);
            if held.by_seq.is_empty() {
                return found;
            }
            for s in seqs {
                found.extend(
                    held.by_seq
                        .range((s, 0)..=(s, u64::MAX))
                        .map(|&(s, id)| (id, s)),
                );
            }
        }
        found.sort_unstable();
        found
    }

    /// The subscriptions that paused since the last call (tracking ids).
    pub(crate) fn take_paused(&self) -> BTreeSet<u64> {
        std::mem::take(&mut lock(&self.held).paused)
    }

    /// Forgets every unacknowledged delivery of its subscriptions that the store does not
    /// keep (QoS 0: no redelivery is owed), as the relay-wide budget takes its room back
    /// ([`UnackedBudget::reclaim`]): counted in
    /// `whispeer_relay_unacked_qos0_forgotten_total` (no `Gap`: they were sent). Called
    /// from another connection's delivery, under that subscription's lock: a subscription
    /// of this one whose lock is taken right now is skipped (waiting for it could wait on
    /// a delivery that is itself taking room back). Returns the bytes freed.
    fn forget_unstored(&self) -> usize {
        let tracks: Vec<Weak<Tracking>> = lock(&self.held).tracks.values().cloned().collect();
        let (mut msgs, mut bytes) = (0u64, 0usize);
        for t in tracks {
            // Dropped here, outside the index's lock (a last reference's drop takes it).
            if let Some(t) = t.upgrade() {
                let (m, b) = t.forget_unstored();
                msgs += m;
                bytes += b;
            }
        }
        if msgs > 0 {
            if let Some(b) = &self.budget {
                b.budget.metrics.unacked_qos0_forgotten(msgs);
                tracing::debug!(tenant = ?b.tenant, msgs, bytes,
                    "forgot unacknowledged QoS 0 deliveries: the relay-wide budget of \
                     unacknowledged bytes is spent and their address holds the most");
            }
        }
        bytes
    }

    /// Whether `len` more bytes fit: in the connection's bound (always while nothing is
    /// unacknowledged) and in the relay-wide budget's share ([`BudgetShare::admits`]).
    fn fits(&self, len: usize) -> bool {
        let used = self.used.load(Relaxed);
        (used == 0 || used + len <= self.max) && self.budget_admits(used, len)
    }

    fn budget_admits(&self, used: usize, len: usize) -> bool {
        self.budget.as_ref().is_none_or(|b| b.admits(used, len))
    }

    /// Whether the relay-wide budget (not the connection's own bound) refuses `len` more
    /// (asking only: takes no room back).
    fn over_budget(&self, len: usize) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|b| b.verdict(self.used.load(Relaxed), len) != Verdict::Yes)
    }

    fn add(&self, n: usize) {
        let before = self.used.fetch_add(n, Relaxed);
        if let Some(b) = &self.budget {
            b.budget.add(&b.addr, before, n);
        }
    }

    fn sub(&self, n: usize) {
        if n > 0 {
            let before = self.used.fetch_sub(n, Relaxed);
            if let Some(b) = &self.budget {
                b.budget.sub(&b.addr, before - n, n);
            }
            self.freed.notify_waiters();
        }
    }
}

/// Delivery paused for lack of credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Paused {
    /// First sequence not delivered (it and later matching messages wait in the store).
    pub(crate) next: u64,
    /// Highest sequence the live path skipped for this subscription.
    pub(crate) missed_max: u64,
    /// Messages skipped that the store does not keep (QoS 0 without `store_qos0`): the
    /// catch-up cannot send them, so they are counted and reported with a `Gap` when live
    /// delivery resumes.
    pub(crate) lost: u64,
    /// Messages the live path skipped that the store keeps: the catch-up sends each, unless
    /// the store dropped it meanwhile (retention: age, count or bytes) — the shortfall is
    /// lost to this subscription too and reported with `lost` (without it the subscription
    /// never heard of them, and a client owing that sequence to it held its ack for good).
    /// Zero when the pause began elsewhere (a spilled hand-over): then nothing is inferred.
    pub(crate) stored: u64,
}

/// A delivery not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    env: Envelope,
    /// Its redelivery deadline.
    due: Instant,
    /// The store keeps it (else it is a QoS 0 message held only here, which the budget may
    /// forget: [`ConnUnacked::forget_unstored`]).
    stored: bool,
}

#[derive(Debug)]
struct TrackInner {
    /// Delivered, not yet acknowledged, by sequence.
    unacked: BTreeMap<u64, Unacked>,
    /// Bytes of the envelopes in `unacked`.
    unacked_bytes: usize,
    /// Of them, the bytes of those the store does not keep.
    unstored_bytes: usize,
    /// Highest sequence handed to the connection for this subscription.
    delivered_max: u64,
    /// While history is being sent: the floor may not pass this (history not yet sent).
    cap: Option<u64>,
    /// Last floor reported.
    floor: u64,
    /// Live delivery is paused (no credit); the catch-up task resumes it.
    paused: Option<Paused>,
    /// A catch-up task runs (or was asked for).
    catching_up: bool,
    /// The subscription ended ([`Tracking::end`]): it is out of the connection's index.
    ended: bool,
}

/// What an `Ack` did to a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct AckOutcome {
    /// It freed at least one delivery.
    pub(crate) freed: bool,
    /// The new acknowledged floor, when it moved.
    pub(crate) floor: Option<u64>,
    /// Delivery is paused, credit is free again and no catch-up runs: start one.
    pub(crate) catch_up: bool,
}

/// At-least-once state of one QoS ≥ 1 (or durable) subscription: what is in flight, the
/// acknowledged floor (every matching message up to it is acknowledged) and the credit.
#[derive(Debug)]
pub(crate) struct Tracking {
    inner: Mutex<TrackInner>,
    /// Its id in the connection's index ([`ConnUnacked::holders`]), unique per connection.
    pub(crate) id: u64,
    pub(crate) durable: Option<DurableKey>,
    timeout: Duration,
    credit: usize,
    max_bytes: usize,
    freed: Notify,
    /// The connection's unacknowledged bytes, shared by its subscriptions.
    conn: Arc<ConnUnacked>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        let t = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        self.conn.unstored.fetch_sub(t.unstored_bytes, Relaxed);
        self.conn.sub(t.unacked_bytes);
        if !t.ended {
            unindex(&self.conn, self.id, t);
        }
        lock(&self.conn.held).tracks.remove(&self.id);
    }
}

/// Takes subscription `id`'s deliveries and pause out of the connection's index.
fn unindex(conn: &ConnUnacked, id: u64, t: &TrackInner) {
    let mut held = lock(&conn.held);
    for seq in t.unacked.keys() {
        held.by_seq.remove(&(*seq, id));
    }
    held.paused.remove(&id);
}

impl TrackInner {
    fn has_credit(&self, credit: usize, max_bytes: usize, len: usize, conn: &ConnUnacked) -> bool {
        (self.unacked.is_empty()
            || (self.unacked.len() < credit && self.unacked_bytes + len <= max_bytes))
            && conn.fits(len)
    }

    /// Records a delivery of subscription `id` (indexed by sequence for the acks);
    /// `stored`: the store keeps it.
    fn insert(
        &mut self,
        id: u64,
        seq: u64,
        (env, stored): (&Envelope, bool),
        due: Instant,
        conn: &ConnUnacked,
    ) {
        let entry = Unacked {
            env: env.clone(),
            due,
            stored,
        };
        match self.unacked.insert(seq, entry) {
            Some(old) => {
                self.unacked_bytes -= old.env.len();
                if !old.stored {
                    self.unstored_bytes -= old.env.len();
                    conn.unstored.fetch_sub(old.env.len(), Relaxed);
                }
                conn.sub(old.env.len());
            }
            None if !self.ended => {
                lock(&conn.held).by_seq.insert((seq, id));
            }
            None => {}
        }
        self.unacked_bytes += env.len();
        if !stored {
            self.unstored_bytes += env.len();
            conn.unstored.fetch_add(env.len(), Relaxed);
        }
        conn.add(env.len());
        self.delivered_max = self.delivered_max.max(seq);
    }

    /// Pauses delivery of subscription `id`, noted for the next ack that frees bytes.
    fn set_paused(&mut self, id: u64, p: Paused, conn: &ConnUnacked) {
        self.paused = Some(p);
        if !self.ended {
            lock(&conn.held).paused.insert(id);
        }
    }
}

impl Tracking {
    /// `credit`: most unacknowledged messages (at least 1); `max_bytes`: most
    /// unacknowledged envelope bytes (one message is always allowed); `conn`: the
    /// connection's unacknowledged bytes, shared by its subscriptions.
    pub(crate) fn new(
        floor: u64,
        gated: bool,
        durable: Option<DurableKey>,
        timeout: Duration,
        credit: usize,
        max_bytes: usize,
        conn: Arc<ConnUnacked>,
    ) -> Arc<Self> {
        let id = conn.next_id.fetch_add(1, Relaxed);
        Arc::new_cyclic(|me| {
            lock(&conn.held).tracks.insert(id, me.clone());
            Self::made(id, floor, gated, durable, timeout, credit, max_bytes, conn)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn made(
        id: u64,
        floor: u64,
        gated: bool,
        durable: Option<DurableKey>,
        timeout: Duration,
        credit: usize,
        max_bytes: usize,
        conn: Arc<ConnUnacked>,
    ) -> Self {
        Self {
            inner: Mutex::new(TrackInner {
                unacked: BTreeMap::new(),
                unacked_bytes: 0,
                unstored_bytes: 0,
                delivered_max: floor,
                cap: gated.then_some(floor),
                floor,
                paused: None,
                catching_up: false,
                ended: false,
            }),
            id,
            durable,
            timeout,
            credit: credit.max(1),
            max_bytes: max_bytes.max(1),
            freed: Notify::new(),
            conn,
        }
    }

    /// The live path (under the routing lock): records a delivery if there is credit;
    /// otherwise delivery pauses (or stays paused) and the message waits in the store.
    /// `stored`: the store keeps the message in history (else a pause loses it, counted).
    /// `room`: the connection may queue it (false over the relay-wide outbound budget:
    /// delivery pauses as without credit, and the message waits in the store).
    pub(crate) fn deliver_live(
        &self,
        seq: u64,
        env: &Envelope,
        stored: bool,
        room: bool,
        now: Instant,
    ) -> Delivery {
        let mut t = lock(&self.inner);
        if let Some(p) = t.paused.as_mut() {
            if stored {
                p.missed_max = p.missed_max.max(seq);
                p.stored += 1;
            } else {
                p.lost += 1;
            }
            return Delivery::Skipped;
        }
        if room
            && (t.unacked.contains_key(&seq)
                || t.has_credit(self.credit, self.max_bytes, env.len(), &self.conn))
        {
            t.insert(self.id, seq, (env, stored), now + self.timeout, &self.conn);
            return Delivery::Send;
        }
        let p = Paused {
            next: seq,
            missed_max: seq,
            lost: u64::from(!stored),
            stored: u64::from(stored),
        };
        t.set_paused(self.id, p, &self.conn);
        Delivery::Paused
    }

    /// An unnumbered live message (sequence 0: live-only with the JetStream store): sent
    /// without tracking (there is nothing to acknowledge), unless delivery is paused — then
    /// it is skipped and counted for the `Gap` sent when delivery resumes.
    pub(crate) fn unnumbered(&self) -> bool {
        let mut t = lock(&self.inner);
        match t.paused.as_mut() {
            Some(p) => {
                p.lost += 1;
                false
            }
            None => true,
        }
    }

    /// A paused subscription with credit and no catch-up running (it paused for the
    /// relay-wide budget, so no ack will start one): marks a catch-up as started.
    pub(crate) fn claim_catch_up(&self) -> bool {
        let mut t = lock(&self.inner);
        if t.paused.is_some() && !t.catching_up && t.unacked.len() < self.credit {
            t.catching_up = true;
            true
        } else {
            false
        }
    }

    /// History and catch-up: records a delivery if there is credit (ignoring a pause, which
    /// is what the caller is working off); false when there is none.
    pub(crate) fn try_deliver(&self, seq: u64, env: &Envelope, now: Instant) -> bool {
        let mut t = lock(&self.inner);
        if t.unacked.contains_key(&seq)
            || t.has_credit(self.credit, self.max_bytes, env.len(), &self.conn)
        {
            // Read from the store: it keeps it.
            t.insert(self.id, seq, (env, true), now + self.timeout, &self.conn);
            true
        } else {
            false
        }
    }

    /// Like [`try_deliver`](Self::try_deliver), but when there is no credit pauses delivery
    /// at `seq` (with `missed_max` skipped so far) in the same step, so the ack that frees
    /// credit starts the catch-up. Used when live messages buffered during history are
    /// handed over; `stored`: the store keeps this one (else it is a QoS 0 message the
    /// relay-wide budget may forget, as on the live path); `lost`: how many of the
    /// messages from `seq` on the store does not keep.
    pub(crate) fn deliver_or_pause(
        &self,
        seq: u64,
        env: &Envelope,
        stored: bool,
        missed_max: u64,
        lost: u64,
        now: Instant,
    ) -> bool {
        let mut t = lock(&self.inner);
        if t.unacked.contains_key(&seq)
            || t.has_credit(self.credit, self.max_bytes, env.len(), &self.conn)
        {
            t.insert(self.id, seq, (env, stored), now + self.timeout, &self.conn);
            return true;
        }
        let p = Paused {
            next: seq,
            missed_max: missed_max.max(seq),
            lost,
            stored: 0,
        };
        t.set_paused(self.id, p, &self.conn);
        false
    }

    /// Whether the relay-wide budget of unacknowledged bytes refuses `len` more bytes of
    /// this connection now (what paused it, when credit did not).
    pub(crate) fn over_budget(&self, len: usize) -> bool {
        self.conn.over_budget(len)
    }

    /// Whether there is credit for a message of `len` bytes now.
    pub(crate) fn has_credit(&self, len: usize) -> bool {
        lock(&self.inner).has_credit(self.credit, self.max_bytes, len, &self.conn)
    }

    /// What the credit allows now, as a read limit (capped by a chunk): a QoS ≥ 1 history
    /// or catch-up reads no more than it may send at once, so it holds nothing while it
    /// waits for credit. `None` without credit for another message. A message larger than
    /// the byte allowance is still read alone (its size is unknown before the read): the
    /// sender drops it when there is no credit for it, and reads it again once there is.
    pub(crate) fn allowance(&self) -> Option<ReadLimit> {
        let t = lock(&self.inner);
        let msgs = self.credit.saturating_sub(t.unacked.len());
        let conn_used = self.conn.used.load(Relaxed);
        // What the relay-wide budget lets the connection take now: reading more only to
        // be refused it cost a re-read of the chunk (up to 1 MiB on the one store-reader
        // thread) per message admitted near a full budget.
        let budget = self
            .conn
            .budget
            .as_ref()
            .map_or(u64::MAX, |b| b.room(conn_used));
        let bytes = (self.conn.max.saturating_sub(conn_used))
            .min(self.max_bytes.saturating_sub(t.unacked_bytes))
            .min(usize::try_from(budget).unwrap_or(usize::MAX));
        // With nothing unacknowledged one message is allowed whatever its size (the read
        // returns the first message whatever its size), if the budget has room at all.
        let free = t.unacked.is_empty() && conn_used == 0 && budget > 0;
        (msgs > 0 && (bytes > 0 || free)).then_some(ReadLimit { msgs, bytes })
    }

    /// Waits until there is credit for another message ([`allowance`](Self::allowance)) —
    /// or, given its size, for that message — or `target` is cancelled; false when the
    /// subscription or its connection is gone. Holds nothing meanwhile.
    pub(crate) async fn wait_allowance(
        &self,
        target: &Target,
        len: Option<usize>,
        sender: &str,
    ) -> bool {
        let ready = |t: &Self| match len {
            Some(len) => t.has_credit(len),
            None => t.allowance().is_some(),
        };
        let mut logged = false;
        loop {
            if target.is_cancelled() || target.out.is_closing() {
                return false;
            }
            if ready(self) {
                return true;
            }
            if !logged {
                logged = true;
                tracing::debug!(conn = %target.conn, sub_id = target.sub.0,
                    "{sender} waits for credit");
            }
            tokio::select! {
                () = self.wait_credit(len.unwrap_or(1), CREDIT_WAIT) => {}
                () = target.cancelled() => {}
            }
        }
    }

    /// Waits until an ack (of this subscription, or of another one of the connection) may
    /// have freed credit for a message of `len` bytes, or `limit` passed.
    pub(crate) async fn wait_credit(&self, len: usize, limit: Duration) {
        let freed = self.freed.notified();
        let conn_freed = self.conn.freed.notified();
        tokio::pin!(freed, conn_freed);
        freed.as_mut().enable();
        conn_freed.as_mut().enable();
        {
            let t = lock(&self.inner);
            if t.has_credit(self.credit, self.max_bytes, len, &self.conn) {
                return;
            }
        }
        let _ = tokio::time::timeout(limit, async {
            tokio::select! {
                _ = freed => {}
                _ = conn_freed => {}
            }
        })
        .await;
    }

    /// Pauses delivery as `p` says (a gate that spilled opens: the messages from `p.next`
    /// on wait in the store); the caller starts the catch-up if there is credit
    /// ([`claim_catch_up`](Self::claim_catch_up)), else the ack that frees credit does.
    pub(crate) fn pause(&self, p: Paused) {
        let mut t = lock(&self.inner);
        let p = match t.paused {
            Some(q) => Paused {
                next: q.next.min(p.next),
                missed_max: q.missed_max.max(p.missed_max),
                lost: q.lost + p.lost,
                // Begun elsewhere too: the catch-up also sends what no count holds.
                stored: 0,
            },
            None => Paused { stored: 0, ..p },
        };
        t.set_paused(self.id, p, &self.conn);
    }

    /// The pause, if delivery is paused.
    pub(crate) fn paused(&self) -> Option<Paused> {
        lock(&self.inner).paused
    }

    /// The catch-up read up to `upto`: resumes live delivery if nothing later was skipped
    /// (called under the routing lock, so no live message can be skipped meanwhile).
    /// Returns `None` when still paused, else how many skipped messages the store did not
    /// keep (lost to this subscription: the caller reports them with a `Gap`) — also those
    /// it kept and dropped before the catch-up, which `sent` messages in all.
    pub(crate) fn resume_if_caught_up(&self, upto: u64, sent: u64) -> Option<u64> {
        let mut t = lock(&self.inner);
        match t.paused {
            Some(p) if p.missed_max > upto => {
                t.paused = Some(Paused {
                    next: upto + 1,
                    ..p
                });
                None
            }
            p => {
                t.paused = None;
                t.catching_up = false;
                Some(p.map_or(0, |p| p.lost + p.stored.saturating_sub(sent)))
            }
        }
    }

    /// The subscription ended: its deliveries leave the connection's index (no ack reaches
    /// it any more), though tasks may hold it a while longer.
    pub(crate) fn end(&self) {
        let mut t = lock(&self.inner);
        if !t.ended {
            t.ended = true;
            unindex(&self.conn, self.id, &t);
        }
    }

    /// The catch-up task stopped (the subscription ended).
    pub(crate) fn stop_catching_up(&self) {
        lock(&self.inner).catching_up = false;
    }

    /// Starts a non-replaying subscription at the boundary.
    pub(crate) fn start_at(&self, boundary: u64) {
        let mut t = lock(&self.inner);
        t.delivered_max = t.delivered_max.max(boundary);
        t.floor = t.floor.max(boundary);
    }

    /// History was sent up to `seq`.
    pub(crate) fn history_at(&self, seq: u64) {
        let mut t = lock(&self.inner);
        if let Some(c) = t.cap.as_mut() {
            *c = (*c).max(seq);
        }
        if t.paused.is_none() {
            t.delivered_max = t.delivered_max.max(seq);
        }
    }

    /// History is complete.
    pub(crate) fn history_done(&self) {
        lock(&self.inner).cap = None;
    }

    fn compute_floor(t: &TrackInner) -> u64 {
        let mut f = match t.unacked.keys().next() {
            Some(first) => first - 1,
            None => t.delivered_max,
        };
        if let Some(c) = t.cap {
            f = f.min(c);
        }
        if let Some(p) = t.paused {
            f = f.min(p.next.saturating_sub(1));
        }
        f.max(t.floor)
    }

    /// The acknowledged floor now.
    pub(crate) fn floor(&self) -> u64 {
        let t = lock(&self.inner);
        Self::compute_floor(&t)
    }

    /// Applies acknowledgements (the connection's index says which subscriptions hold
    /// which sequences: see [`ConnUnacked::holders`]).
    pub(crate) fn ack(&self, seqs: &[u64]) -> AckOutcome {
        let mut t = lock(&self.inner);
        if self.remove_unacked(&mut t, seqs.iter().copied()).0 == 0 {
            return AckOutcome::default();
        }
        let mut outcome = AckOutcome {
            freed: true,
            ..AckOutcome::default()
        };
        let f = Self::compute_floor(&t);
        if f > t.floor {
            t.floor = f;
            outcome.floor = Some(f);
        }
        if t.paused.is_some() && !t.catching_up && t.unacked.len() < self.credit {
            t.catching_up = true;
            outcome.catch_up = true;
        }
        drop(t);
        self.freed.notify_waiters();
        outcome
    }

    /// Unacknowledged deliveries past their deadline (at most `limit`); their deadlines
    /// are pushed out by the ack timeout.
    pub(crate) fn due(&self, now: Instant, limit: usize) -> Vec<(u64, Envelope)> {
        let mut t = lock(&self.inner);
        let timeout = self.timeout;
        t.unacked
            .iter_mut()
            .filter(|(_, u)| u.due <= now)
            .take(limit)
            .map(|(seq, u)| {
                u.due = now + timeout;
                (*seq, u.env.clone())
            })
            .collect()
    }

    /// Forgets its unacknowledged deliveries the store does not keep (see
    /// [`ConnUnacked::forget_unstored`]), unless its lock is taken right now: how many, and
    /// their bytes. Its floor may pass them (they are not in the store to redeliver), and
    /// the credit they free lets a paused delivery resume (the session's tick starts it).
    fn forget_unstored(&self) -> (u64, usize) {
        let mut t = match self.inner.try_lock() {
            Ok(t) => t,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return (0, 0),
        };
        if t.unstored_bytes == 0 {
            return (0, 0);
        }
        let seqs: Vec<u64> = t
            .unacked
            .iter()
            .filter(|(_, u)| !u.stored)
            .map(|(seq, _)| *seq)
            .collect();
        let (n, bytes) = self.remove_unacked(&mut t, seqs);
        drop(t);
        self.freed.notify_waiters();
        (n as u64, bytes)
    }

    /// Takes `seqs` out of its unacknowledged deliveries (those it holds) with their bytes
    /// (the subscription's, the unstored ones', the connection's) and their index entries,
    /// for an `Ack` and for [`Tracking::forget_unstored`] alike: how many, and their bytes.
    fn remove_unacked(
        &self,
        t: &mut TrackInner,
        seqs: impl IntoIterator<Item = u64>,
    ) -> (usize, usize) {
        let (mut freed, mut unstored) = (0, 0);
        let mut removed = Vec::new();
        for s in seqs {
            if let Some(u) = t.unacked.remove(&s) {
                freed += u.env.len();
                if !u.stored {
                    unstored += u.env.len();
                }
                removed.push(s);
            }
        }
        if removed.is_empty() {
            return (0, 0);
        }
        t.unacked_bytes -= freed;
        if unstored > 0 {
            t.unstored_bytes -= unstored;
            self.conn.unstored.fetch_sub(unstored, Relaxed);
        }
        if !t.ended {
            let mut held = lock(&self.conn.held);
            for s in &removed {
                held.by_seq.remove(&(*s, self.id));
            }
        }
        // Once per call (an Ack frame): it wakes the connection's other waiters for credit.
        self.conn.sub(freed);
        (removed.len(), freed)
    }

    /// How many messages are unacknowledged.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.inner).unacked.len()
    }
}

/// What the live path does with a message for a tracked subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queue it (recorded as in flight).
    Send,
    /// No credit: delivery paused at this message (it waits in the store).
    Paused,
    /// Delivery was already paused: it waits in the store.
    Skipped,
}

/// Sends, in sequence order and as credit allows, the messages a paused subscription
/// skipped, reading them from the store (in `tenant`'s turn on the store-reader thread,
/// never refused: at most one catch-up runs per subscription); then resumes its live
/// delivery.
pub(crate) async fn catch_up(
    shared: Arc<Shared>,
    tenant: Tenant,
    target: Arc<Target>,
    pattern: TokenPattern,
) {
    let Some(track) = target.track.clone() else {
        return;
    };
    let pattern = Arc::new(pattern);
    // Resumed: live delivery took over and the catching-up mark was cleared under the
    // routing lock; clearing it again here could let a second catch-up start beside a
    // newer one (duplicates).
    let result = run(&shared, &tenant, &target, &track, &pattern).await;
    if let Err(e) = &result {
        tracing::warn!(conn = %target.conn, sub_id = target.sub.0, error = %e,
            "catch-up read failed");
        shared.metrics.error_sent(ErrorCode::StoreFailed);
        target
            .out
            .close_discarding(codec::encode_prefixed(&Frame::Err(ErrFrame {
                code: ErrorCode::StoreFailed,
                message: format!("delivery from the store failed: {e}"),
                fatal: true,
                sub_id: Some(target.sub.0),
                publish_id: None,
            })));
    }
    if !matches!(result, Ok(true)) {
        track.stop_catching_up();
    }
}

async fn run(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    target: &Arc<Target>,
    track: &Arc<crate::flow::Tracking>,
    pattern: &Arc<TokenPattern>,
) -> Result<bool, StoreError> {
    let store = shared.router.store().clone();
    let gone = || target.is_cancelled() || target.out.is_closing();
    // Sent by this catch-up in all (what the store still had of the skipped messages).
    let mut sent_total = 0u64;
    loop {
        let Some(paused) = track.paused() else {
            return Ok(false);
        };
        let upto = Seq(paused.missed_max);
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.when_durable(
            upto,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await
            .map_err(|_| StoreError::Unavailable("store closed".into()))??;
        let plan = Arc::new(ReadPlan {
            start: paused.next,
            ..ReadPlan::default()
        });
        let mut from = paused.next;
        while from <= upto.0 {
            // Credit first, holding nothing: a subscription whose client does not ack
            // holds no reservation and no messages read, so it never holds up the
            // connection's other senders.
            if !track.wait_allowance(target, None, "catch-up").await {
                return Ok(false);
            }
            // Room for the chunk, reserved before the read (in this connection's queue and
            // in the relay-wide budget).
            let Some(mut hold) = read_turn(target).await else {
                return Ok(false);
            };
            // What the credit allows now (it only grows while this catch-up waits: no
            // other sender delivers to this subscription meanwhile).
            let Some(limit) = track.allowance() else {
                continue;
            };
            let chunk = {
                let (store, pattern, plan) = (store.clone(), pattern.clone(), plan.clone());
                crate::store::read_off_runtime(tenant, Admission::Always, move || {
                    store.read_limited(&pattern, &plan, from, upto, limit)
                })
                .await?
            };
            if gone() {
                return Ok(false);
            }
            hold.resize(chunk.msgs.iter().map(|m| m.envelope.len()).sum());
            let mut sent = 0u64;
            // A message the credit does not take after all (larger than the byte allowance,
            // or the connection's other subscriptions took its unacknowledged bytes): the
            // rest is dropped and read again from it once there is credit for it.
            let mut refused = None;
            for m in chunk.msgs {
                if !track.try_deliver(m.seq.0, &m.envelope, Instant::now()) {
                    refused = Some((m.seq.0, m.envelope.len()));
                    break;
                }
                // Named: it is this subscription's alone. Unnamed, a neighbour on the
                // connection matching it took it too — one the relay had paused as well,
                // before its own catch-up's earlier messages (found by
                // `client/tests/mixed_load.rs`).
                let frame = own_copy_frame(m.seq.0, &m.envelope, target, || {
                    msg_frame(m.seq.0, &m.envelope, 0)
                });
                hold.push(frame, m.envelope.len());
                sent += 1;
                if target.out.is_closing() {
                    return Ok(false);
                }
            }
            shared.metrics.delivered(sent as usize);
            sent_total += sent;
            drop(hold);
            match refused {
                None => from = chunk.next,
                Some((seq, len)) => {
                    if !track.wait_allowance(target, Some(len), "catch-up").await {
                        return Ok(false);
                    }
                    from = seq;
                }
            }
        }
        if shared.router.resume_live(target, upto.0, sent_total) {
            return Ok(true);
        }
    }
}

/// The period at which a wait for credit re-checks (an ack of another subscription of the
/// connection may free the connection's unacknowledged bytes without waking it).
const CREDIT_WAIT: Duration = Duration::from_millis(500);

/// Waits until the subscriber's queue has room for a chunk and reserves it
/// ([`Outbound::reserve_read`](crate::outbound::Outbound::reserve_read), as history
/// senders do): however many of a connection's subscriptions catch up at once, their reads
/// hold at most `queue.max_bytes` and one chunk. `None` when the subscription is cancelled
/// or the connection closes first.
async fn read_turn(target: &Target) -> Option<ReadHold> {
    if target.is_cancelled() || target.out.is_closing() {
        return None;
    }
    let reserve = target.out.reserve_read(READ_CHUNK_BYTES);
    tokio::pin!(reserve);
    let hold = tokio::select! {
        biased;
        hold = &mut reserve => hold,
        () = std::future::ready(()) => {
            tracing::debug!(conn = %target.conn, sub_id = target.sub.0,
                "catch-up waits for room in the queue");
            tokio::select! {
                hold = reserve => hold,
                () = target.cancelled() => None,
            }
        }
    };
    hold.filter(|_| !target.is_cancelled())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(ip: &str) -> Tenant {
        Tenant::from_peer(Some(format!("{ip}:1").parse().unwrap()), 64)
    }

    /// Review finding 3: an address's entry was removed when its `Arc`'s strong count was 2
    /// (the map's and the dropping share's), checked before the share's own reference
    /// dropped: two last connections closing at once each saw 3 and the entry stayed until
    /// the address connected again. Here another reference is alive while both shares drop
    /// (what the other closing connection's is, in the race): the entry still goes.
    #[test]
    fn an_address_is_forgotten_with_its_last_connection_whatever_else_holds_its_counts() {
        let budget = UnackedBudget::new(1 << 20, Arc::new(Metrics::default()));
        let a = budget.share(tenant("192.0.2.1"), Box::new(|| {}));
        let b = budget.share(tenant("192.0.2.1"), Box::new(|| {}));
        let other = budget.share(tenant("192.0.2.2"), Box::new(|| {}));
        assert_eq!(lock(&budget.by).len(), 2);
        let alive = a.addr.clone();
        drop(a);
        assert_eq!(
            lock(&budget.by).len(),
            2,
            "one connection of the address left"
        );
        drop(b);
        assert_eq!(
            lock(&budget.by).len(),
            1,
            "the address's last connection closed"
        );
        drop(alive);
        drop(other);
        assert!(lock(&budget.by).is_empty());
    }

    /// The budget's gentle step (`UnackedBudget::forget`) takes room back from the address
    /// holding most, and only its unstored QoS 0 deliveries: here B (8 deliveries) is over
    /// its share, and so is A (4); E, a newcomer under its share, finds the budget spent.
    /// B's unstored deliveries are forgotten, its stored one is kept, A, C and D keep all
    /// theirs, and nobody is closed. (The hostile_flow test over real sockets shows that
    /// something was forgotten and nobody closed; this one that it was the heaviest's.)
    #[test]
    fn a_spent_budget_forgets_the_unstored_deliveries_of_the_heaviest_address_only() {
        let env = crate::test_envelope::envelope(1, &[1]);
        let e = env.len();
        let metrics = Arc::new(Metrics::default());
        let budget = UnackedBudget::new(16 * e, metrics.clone());
        let closed = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let conn = |ip: &str| {
            let closed = closed.clone();
            let share = budget.share(
                tenant(ip),
                Box::new(move || {
                    closed.fetch_add(1, Relaxed);
                }),
            );
            let conn = ConnUnacked::new(1 << 20, Some(share));
            let track = Tracking::new(
                0,
                false,
                None,
                Duration::from_secs(60),
                1 << 10,
                1 << 20,
                conn.clone(),
            );
            (conn, track)
        };
        // Each address takes what the budget gives it, in turn: B all of the first half
        // (its first delivery one the store keeps), then A, C and D their shares.
        let mut seq = 0;
        let mut fill = |track: &Tracking, first_stored: bool| {
            let mut n = 0;
            loop {
                seq += 1;
                let stored = first_stored && n == 0;
                match track.deliver_live(seq, &env, stored, true, now) {
                    Delivery::Send => n += 1,
                    _ => return n,
                }
            }
        };
        let held: Vec<_> = ["192.0.2.2", "192.0.2.1", "192.0.2.3", "192.0.2.4"]
            .into_iter()
            .map(conn)
            .collect();
        let taken: Vec<usize> = held
            .iter()
            .enumerate()
            .map(|(i, (_, t))| fill(t, i == 0))
            .collect();
        assert_eq!(taken, [8, 4, 2, 2], "B, A, C, D");
        assert_eq!(budget.used(), 16 * e as u64, "the budget is spent");
        assert_eq!(closed.load(Relaxed), 0);

        let (asker, track) = conn("192.0.2.5");
        assert_eq!(
            track.deliver_live(100, &env, false, true, now),
            Delivery::Send,
            "room taken back for the newcomer at once"
        );
        let used: Vec<usize> = held.iter().map(|(c, _)| c.used.load(Relaxed) / e).collect();
        assert_eq!(
            used,
            [1, 4, 2, 2],
            "B kept only its stored delivery; A, C, D all theirs"
        );
        assert_eq!(asker.used.load(Relaxed), e);
        assert_eq!(closed.load(Relaxed), 0, "nobody closed");
        assert_eq!(budget.used(), 10 * e as u64);
    }

    /// Live messages handed over after a subscription's history (`Router::release`) are
    /// recorded as the store keeps them or not, as on the live path: an unstored QoS 0 one
    /// can be forgotten by the budget. They were all recorded as stored, so a connection
    /// holding them could only be closed to take that room back.
    #[test]
    fn unstored_messages_handed_over_after_history_can_be_forgotten() {
        let env = crate::test_envelope::envelope(1, &[1]);
        let metrics = Arc::new(Metrics::default());
        let budget = UnackedBudget::new(1 << 20, metrics);
        let conn = ConnUnacked::new(
            1 << 20,
            Some(budget.share(tenant("192.0.2.1"), Box::new(|| {}))),
        );
        let track = Tracking::new(
            0,
            true,
            None,
            Duration::from_secs(60),
            16,
            1 << 20,
            conn.clone(),
        );
        let now = Instant::now();
        assert!(track.deliver_or_pause(1, &env, true, 2, 0, now));
        assert!(track.deliver_or_pause(2, &env, false, 2, 0, now));
        assert_eq!(conn.used.load(Relaxed), 2 * env.len());
        assert_eq!(conn.forget_unstored(), env.len(), "the unstored one only");
        assert_eq!(conn.used.load(Relaxed), env.len());
    }
}
