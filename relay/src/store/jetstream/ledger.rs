//! Per-tenant usage of the JetStream store, kept by every relay from the ordered read of the
//! stream.
//!
//! JetStream enforces only stream-wide limits; the per-tenant quotas of `[store]` need
//! usage per tenant, and every relay must agree on it so a tenant cannot get more by
//! moving to another relay. So nothing is counted where a publish is accepted: each stored
//! message carries its tenant's tag (header `Wsp-Tenant`), and every relay applies every
//! message of the stream, in stream order, to this ledger — the same sequence of updates
//! on every relay, hence the same counts (up to where each relay has read). Retention is
//! modelled the way JetStream applies it (most messages per subject, oldest first; age),
//! so the counts go down when the stream forgets a message without any relay being told.
//!
//! What a relay has handed to the stream and not yet read back is counted as in flight
//! for its tenant, so a burst at one relay cannot overrun a quota before its messages come
//! back. Each such write carries this relay's write id (header `Wsp-Write`), so the
//! ordered read that applies it also ends its in-flight count — whether the stream's ack
//! reached this relay before or after: a write is never counted twice (applied and in
//! flight), which would refuse a publish one early at exactly a quota. Bursts at *several* relays at once can pass a quota by what is in flight at the
//! others (documented; bounded by the publish queues).
//!
//! Memory: one small entry per stored message (sequence, time, tenant, size) and one per
//! path; no envelope bytes, no names.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::store::quota::{Need, Usage};
use crate::store::StoreError;

/// A tenant as the stream sees it: 16 bytes of a keyed hash of [`crate::store::Tenant::key`]
/// (the account hash, or the source address — which NATS must not learn in clear).
pub type Tag = [u8; 16];

/// The tag of messages without a tenant header (written by an older relay): counted in
/// the totals only.
pub const NO_TAG: Tag = [0; 16];

/// One stored message (or retained value) as the ledger counts it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    ts_ms: u64,
    tenant: u32,
    size: u64,
}

#[derive(Debug, Default)]
struct PathUse {
    /// The tenant that made the path exist (its distinct-path quota holds it).
    owner: u32,
    kept: VecDeque<Entry>,
    retained: Option<Entry>,
    /// The retained value `retained` replaced in stream order (0: none), `None` when not
    /// known (`retained` was read from the retained stream at start): what a retained
    /// write asks to learn whether a write of an older value may land after it
    /// ([`Ledger::retained_race_possible`]).
    retained_prev: Option<u64>,
    /// Retained-only values (QoS 0 + `RETAIN`) still in the stream under `r.<path>`, oldest
    /// first: each is a stream message until a newer one's purge, the per-subject limit or
    /// the age limit removes it, charged to its tenant like a kept message meanwhile.
    retained_only: VecDeque<Entry>,
}

/// How long a retained-only value stays in the stream once a newer one of its path is
/// there: the relay that wrote the newer one purges the older ones this long after its
/// acknowledgement (`Nats-Rollup` would purge them at once, before a relay whose ordered
/// read is a little behind has routed them live).
pub const RETAINED_ONLY_KEEP: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the ledger counts the older values of a newer one, from when this relay read
/// it (its stream time, or this relay's clock when later: a relay clock ahead of NATS does
/// not release them early): past their purge by the relay that wrote it (which waits
/// [`RETAINED_ONLY_KEEP`] from the acknowledgement, then a round trip). Those of a newer
/// one this relay wrote are counted until then and until its own purge is confirmed
/// ([`Ledger::purged`]), however late: never less than the stream holds of them, and no
/// less than other relays count them.
pub const RETAINED_ONLY_COUNTED: std::time::Duration = std::time::Duration::from_secs(15);

/// What a refused write was refused by.
pub(crate) use crate::store::quota::Scope as Refused;

/// Retention and quota limits the ledger applies (from `[store]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages kept per path (the stream's per-subject limit).
    pub max_messages: u64,
    /// Oldest message kept (ms).
    pub max_age_ms: u64,
    /// Oldest retained value kept (ms).
    pub retained_max_age_ms: u64,
    /// The quota limits (per tenant, all tenants, the reserve).
    pub quota: crate::store::quota::Limits,
}

impl Limits {
    /// The limits of a store configuration.
    pub fn of(c: &crate::config::StoreConfig) -> Self {
        Limits {
            max_messages: c.max_messages,
            max_age_ms: c.max_age_ms,
            retained_max_age_ms: c.retained_max_age_ms,
            quota: crate::store::quota::Limits::of(c),
        }
    }
}

/// The usage ledger (one per relay, behind a mutex).
#[derive(Debug)]
pub struct Ledger {
    limits: Limits,
    tags: HashMap<Tag, u32>,
    usage: Vec<Usage>,
    total: Usage,
    /// By path key (the subject's hex path, key id first: a key id's paths are a range).
    paths: BTreeMap<Arc<str>, PathUse>,
    /// Kept messages in stream order, for age-based expiry.
    aged: VecDeque<(u64, u64, Arc<str>)>,
    /// Retained values in stream order, for age-based expiry.
    retained_aged: VecDeque<(u64, u64, Arc<str>)>,
    /// Retained-only values in stream order, for age-based expiry.
    retained_only_aged: VecDeque<(u64, u64, Arc<str>)>,
    /// Paths with older retained-only values than a newer one: (when they are taken as
    /// purged, ms; the newer one's sequence, below which they go; path; whether this relay
    /// wrote the newer one, so its purge must be confirmed too), in stream order.
    superseded: VecDeque<(u64, u64, Arc<str>, bool)>,
    /// This relay's purges confirmed ([`purged`](Self::purged)) and not yet taken by a
    /// superseded entry due: path → the sequence below which its values are gone.
    confirmed: HashMap<Arc<str>, u64>,
    /// This relay's superseded entries due whose purge is not confirmed yet: path → the
    /// sequence below which its values go once it is.
    unconfirmed: HashMap<Arc<str>, u64>,
    /// The latest time `expire` was given (this relay's clock, ms).
    local_ms: u64,
    /// The highest stream sequence applied.
    applied: u64,
    /// This relay's writes handed to the stream and not yet read back, per tenant.
    in_flight: HashMap<u32, Usage>,
    in_flight_total: Usage,
    /// Writes handed to the stream, not yet acknowledged nor read back: write id →
    /// (tenant, need).
    writes: HashMap<u64, (u32, Need)>,
    next_write: u64,
    /// Publishes acknowledged by the stream but not yet read back: sequence → (tenant, need).
    awaiting: BTreeMap<u64, (u32, Need)>,
    /// Durable names, by durable key: their tenant.
    durables: HashMap<String, u32>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(limits: Limits) -> Self {
        let mut l = Ledger {
            limits,
            tags: HashMap::new(),
            usage: Vec::new(),
            total: Usage::default(),
            paths: BTreeMap::new(),
            aged: VecDeque::new(),
            retained_aged: VecDeque::new(),
            retained_only_aged: VecDeque::new(),
            superseded: VecDeque::new(),
            confirmed: HashMap::new(),
            unconfirmed: HashMap::new(),
            local_ms: 0,
            applied: 0,
            in_flight: HashMap::new(),
            in_flight_total: Usage::default(),
            writes: HashMap::new(),
            next_write: 1,
            awaiting: BTreeMap::new(),
            durables: HashMap::new(),
        };
        l.tenant(&NO_TAG);
        l
    }

    /// The tenant index of a tag (interned).
    pub fn tenant(&mut self, tag: &Tag) -> u32 {
        if let Some(t) = self.tags.get(tag) {
            return *t;
        }
        let t = u32::try_from(self.usage.len()).unwrap_or(u32::MAX);
        self.tags.insert(*tag, t);
        self.usage.push(Usage::default());
        t
    }

    fn usage_mut(&mut self, t: u32) -> &mut Usage {
        let i = t as usize;
        if i >= self.usage.len() {
            self.usage.resize(i + 1, Usage::default());
        }
        &mut self.usage[i]
    }

    /// Tenants with stored data.
    pub fn tenants(&self) -> u64 {
        self.usage
            .iter()
            .filter(|u| **u != Usage::default())
            .count() as u64
    }

    /// Totals over all tenants.
    pub fn total(&self) -> Usage {
        self.total
    }

    /// Applies one message of the stream, in stream order: `kept` in history (else a
    /// retained-only value), `retain` as the path's retained value; `own` is the write id
    /// when this relay wrote it (its in-flight count ends here). A sequence at or below
    /// one applied already is ignored (a re-read after a reconnect).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        seq: u64,
        ts_ms: u64,
        path: &str,
        tag: &Tag,
        size: u64,
        kept: bool,
        retain: bool,
        own: Option<u64>,
    ) {
        if seq <= self.applied {
            return;
        }
        self.advance(seq);
        if let Some((t, need)) = own.and_then(|id| self.writes.remove(&id)) {
            self.settle(t, &need);
        }
        let tenant = self.tenant(tag);
        let e = Entry {
            seq,
            ts_ms,
            tenant,
            size,
        };
        let key = self.path_key(path, tenant);
        if kept {
            self.add_entry(tenant, size, 1, 0);
            let max = self.limits.max_messages;
            let mut trimmed = None;
            if let Some(p) = self.paths.get_mut(&key) {
                p.kept.push_back(e);
                if max > 0 && p.kept.len() as u64 > max {
                    trimmed = p.kept.pop_front();
                }
            }
            if let Some(old) = trimmed {
                self.remove_entry(old.tenant, old.size, 1, 0);
            }
            if self.limits.max_age_ms > 0 {
                self.aged.push_back((ts_ms, seq, key.clone()));
            }
        } else {
            // A retained-only value: a message of the stream (`r.<path>`) like a kept one,
            // under the same per-subject and age limits; the older ones of its path are
            // purged `RETAINED_ONLY_KEEP` after it (counted `RETAINED_ONLY_COUNTED`).
            self.add_entry(tenant, size, 1, 0);
            let max = self.limits.max_messages;
            let (mut trimmed, mut older) = (None, false);
            if let Some(p) = self.paths.get_mut(&key) {
                older = !p.retained_only.is_empty();
                p.retained_only.push_back(e);
                if max > 0 && p.retained_only.len() as u64 > max {
                    trimmed = p.retained_only.pop_front();
                }
            }
            if let Some(old) = trimmed {
                self.remove_entry(old.tenant, old.size, 1, 0);
            }
            // Counted for `RETAINED_ONLY_COUNTED` from now; this relay's own until its
            // purge is confirmed (`purged`) too.
            if older {
                let due = ts_ms
                    .max(self.local_ms)
                    .saturating_add(RETAINED_ONLY_COUNTED.as_millis() as u64);
                self.superseded
                    .push_back((due, seq, key.clone(), own.is_some()));
            }
            if self.limits.max_age_ms > 0 {
                self.retained_only_aged.push_back((ts_ms, seq, key.clone()));
            }
        }
        if retain {
            self.set_retained(&key, e, true);
        }
        self.drop_if_empty(&key);
    }

    /// The ordered read has reached `seq` (also past messages it could not apply, or never
    /// saw because retention deleted them first): this relay's writes up to it are no
    /// longer in flight — counted by `apply`, or gone.
    pub fn advance(&mut self, seq: u64) {
        self.applied = self.applied.max(seq);
        let later = self.awaiting.split_off(&(self.applied + 1));
        let done = std::mem::replace(&mut self.awaiting, later);
        for (_, (t, need)) in done {
            self.settle(t, &need);
        }
    }

    /// Applies a retained value read from the retained stream at start (its original
    /// sequence and time): kept unless the path already has a newer one.
    pub fn apply_retained(&mut self, seq: u64, ts_ms: u64, path: &str, tag: &Tag, size: u64) {
        let tenant = self.tenant(tag);
        let key = self.path_key(path, tenant);
        self.set_retained(
            &key,
            Entry {
                seq,
                ts_ms,
                tenant,
                size,
            },
            false,
        );
        self.drop_if_empty(&key);
    }

    /// Whether a write of an older retained value of `path` may land after this relay's
    /// write of value `seq`, which read value `seen` (0: none) before writing: the ordered
    /// read knows a value of the path between the two, or cannot tell (it has not reached
    /// `seq`, or the value before it was read at start). A newer value known here ends
    /// it: the newer value's writer confirms its own write ([`write_retained`]).
    ///
    /// [`write_retained`]: super::write_retained
    pub fn retained_race_possible(&self, path: &str, seen: u64, seq: u64) -> bool {
        let Some(p) = self.paths.get(path) else {
            return true;
        };
        match p.retained {
            Some(e) if e.seq > seq => false,
            Some(e) if e.seq == seq => p.retained_prev.is_none_or(|prev| prev > seen),
            _ => true,
        }
    }

    /// The path's key, creating the path (owned by `tenant`) when new.
    fn path_key(&mut self, path: &str, tenant: u32) -> Arc<str> {
        if let Some((k, _)) = self.paths.get_key_value(path) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(path);
        self.paths.insert(
            k.clone(),
            PathUse {
                owner: tenant,
                ..PathUse::default()
            },
        );
        self.usage_mut(tenant).paths += 1;
        self.total.paths += 1;
        k
    }

    /// `in_order`: `e` comes from the ordered read of the stream (so the value it replaces
    /// is the one before it), not from the retained stream at start.
    fn set_retained(&mut self, key: &Arc<str>, e: Entry, in_order: bool) {
        let Some(p) = self.paths.get_mut(key) else {
            return;
        };
        if p.retained.is_some_and(|old| old.seq >= e.seq) {
            return;
        }
        let old = p.retained.replace(e);
        p.retained_prev = in_order.then(|| old.map_or(0, |o| o.seq));
        if let Some(old) = old {
            self.remove_entry(old.tenant, old.size, 0, 1);
        }
        self.add_entry(e.tenant, e.size, 0, 1);
        if self.limits.retained_max_age_ms > 0 {
            self.retained_aged.push_back((e.ts_ms, e.seq, key.clone()));
        }
    }

    fn add_entry(&mut self, t: u32, size: u64, msgs: u64, retained: u64) {
        let n = Need {
            bytes: size,
            msgs,
            retained,
            ..Need::default()
        };
        self.usage_mut(t).add(&n);
        self.total.add(&n);
    }

    fn remove_entry(&mut self, t: u32, size: u64, msgs: u64, retained: u64) {
        let n = Need {
            bytes: size,
            msgs,
            retained,
            ..Need::default()
        };
        self.usage_mut(t).sub(&n);
        self.total.sub(&n);
    }

    fn drop_if_empty(&mut self, key: &Arc<str>) {
        let empty = self.paths.get(key).is_some_and(|p| {
            p.kept.is_empty() && p.retained.is_none() && p.retained_only.is_empty()
        });
        if empty {
            self.confirmed.remove(key);
            self.unconfirmed.remove(key);
            if let Some(p) = self.paths.remove(key) {
                let u = self.usage_mut(p.owner);
                u.paths = u.paths.saturating_sub(1);
                self.total.paths = self.total.paths.saturating_sub(1);
            }
        }
    }

    /// This relay purged the retained-only values of `path` below `below` from the stream
    /// (confirmed): their charge ends.
    pub fn purged(&mut self, path: &str, below: u64) {
        let Some(key) = self.paths.get_key_value(path).map(|(k, _)| k.clone()) else {
            return;
        };
        if let Some(waiting) = self.unconfirmed.get(&key).copied() {
            self.drop_retained_only_below(&key, waiting.min(below));
            if below >= waiting {
                self.unconfirmed.remove(&key);
            }
        }
        // For the entries not due yet (the usual case: the purge runs before the timer).
        if self.paths.contains_key(&key) {
            let c = self.confirmed.entry(key).or_insert(below);
            *c = (*c).max(below);
        }
    }

    /// Forgets the retained-only values of `key` below sequence `below`.
    fn drop_retained_only_below(&mut self, key: &Arc<str>, below: u64) {
        let mut gone = Vec::new();
        if let Some(p) = self.paths.get_mut(key) {
            while p.retained_only.front().is_some_and(|e| e.seq < below) {
                gone.extend(p.retained_only.pop_front());
            }
        }
        for e in &gone {
            self.remove_entry(e.tenant, e.size, 1, 0);
        }
        if !gone.is_empty() {
            self.drop_if_empty(key);
        }
    }

    /// Forgets what the stream's age limits have deleted by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        self.local_ms = self.local_ms.max(now_ms);
        let max = self.limits.max_age_ms;
        while let Some((ts, seq, key)) = self.aged.front().cloned().filter(|_| max > 0) {
            if ts.saturating_add(max) > now_ms {
                break;
            }
            self.aged.pop_front();
            let front = self
                .paths
                .get_mut(&key)
                .filter(|p| p.kept.front().is_some_and(|e| e.seq == seq))
                .and_then(|p| p.kept.pop_front());
            if let Some(e) = front {
                self.remove_entry(e.tenant, e.size, 1, 0);
                self.drop_if_empty(&key);
            }
        }
        while let Some((ts, seq, key)) =
            self.retained_only_aged.front().cloned().filter(|_| max > 0)
        {
            if ts.saturating_add(max) > now_ms {
                break;
            }
            self.retained_only_aged.pop_front();
            let front = self
                .paths
                .get_mut(&key)
                .filter(|p| p.retained_only.front().is_some_and(|e| e.seq == seq))
                .and_then(|p| p.retained_only.pop_front());
            if let Some(e) = front {
                self.remove_entry(e.tenant, e.size, 1, 0);
                self.drop_if_empty(&key);
            }
        }
        while let Some((due, below, key, own)) = self.superseded.front().cloned() {
            if due > now_ms {
                break;
            }
            self.superseded.pop_front();
            if !own {
                self.drop_retained_only_below(&key, below);
                continue;
            }
            let c = self.confirmed.get(&key).copied().unwrap_or(0);
            self.drop_retained_only_below(&key, below.min(c));
            if c <= below {
                self.confirmed.remove(&key);
            }
            if c < below {
                let w = self.unconfirmed.entry(key).or_insert(below);
                *w = (*w).max(below);
            }
        }
        let max = self.limits.retained_max_age_ms;
        while let Some((ts, seq, key)) = self.retained_aged.front().cloned().filter(|_| max > 0) {
            if ts.saturating_add(max) > now_ms {
                break;
            }
            self.retained_aged.pop_front();
            let gone = self
                .paths
                .get_mut(&key)
                .filter(|p| p.retained.is_some_and(|e| e.seq == seq))
                .and_then(|p| p.retained.take());
            if let Some(e) = gone {
                self.remove_entry(e.tenant, e.size, 0, 1);
                self.drop_if_empty(&key);
            }
        }
    }

    /// What a publish on `path` of `size` bytes would add: one stream message (kept in
    /// history, or a retained-only value), and the retained value when `retain`.
    pub fn need(&self, path: &str, size: u64, kept: bool, retain: bool) -> Need {
        let p = self.paths.get(path);
        let stored = kept || retain;
        Need {
            bytes: if stored { size } else { 0 } + if retain { size } else { 0 },
            msgs: stored as u64,
            retained: (retain && p.is_none_or(|p| p.retained.is_none())) as u64,
            durables: 0,
            paths: p.is_none() as u64,
        }
    }

    /// [`need`](Self::need) for a publish by `tag`: replacing its own retained value adds
    /// only what the new value is larger (the stream drops the old one), as in the SQLite
    /// store (review 28 finding 2). The new value's message in the stream is charged
    /// whole, a retained-only one too (review finding F1: the stream holds it, and the
    /// replaced one's for [`RETAINED_ONLY_COUNTED`]), so past the reserve's line a tenant
    /// above its share no longer updates its state topics: with SQLite it does.
    pub fn need_for(&self, tag: &Tag, path: &str, size: u64, kept: bool, retain: bool) -> Need {
        let mut n = self.need(path, size, kept, retain);
        let mine = self.tags.get(tag).copied();
        let own_old = self
            .paths
            .get(path)
            .and_then(|p| p.retained)
            .filter(|e| retain && Some(e.tenant) == mine);
        if let Some(old) = own_old {
            n.bytes = n.bytes.saturating_sub(size) + size.saturating_sub(old.size);
        }
        n
    }

    /// Checks `need` for `tag` against the quotas, counting this relay's writes in flight.
    pub fn check(&self, tag: &Tag, need: &Need) -> Result<(), (Refused, StoreError)> {
        let (u, total) = self.held(tag);
        crate::store::quota::check(&u, &total, need, &self.limits.quota)
    }

    /// [`check`](Self::check), then the transfer a retained publish on `path` makes when it
    /// replaces another tenant's value: that tenant's count falls and `tag`'s grows by one
    /// (the total stays), so it is held to `tag`'s retained quota and, past the reserve's
    /// line, to its share ([`check_transfer`](crate::store::quota::check_transfer)).
    pub fn check_publish(
        &self,
        tag: &Tag,
        path: &str,
        retain: bool,
        need: &Need,
    ) -> Result<(), (Refused, StoreError)> {
        self.check(tag, need)?;
        let mine = self.tags.get(tag).copied();
        let takeover = retain
            && self
                .paths
                .get(path)
                .and_then(|p| p.retained)
                .is_some_and(|e| Some(e.tenant) != mine);
        if !takeover {
            return Ok(());
        }
        let moved = Need {
            retained: 1,
            ..Need::default()
        };
        let (u, total) = self.held(tag);
        crate::store::quota::check_transfer(
            &u.plus(need),
            &total.plus(need),
            &moved,
            &self.limits.quota,
        )
    }

    /// What `tag` holds and what all tenants hold, with this relay's writes in flight.
    fn held(&self, tag: &Tag) -> (Usage, Usage) {
        let t = self.tags.get(tag).copied();
        let mut u = t
            .and_then(|t| self.usage.get(t as usize).copied())
            .unwrap_or_default();
        if let Some(f) = t.and_then(|t| self.in_flight.get(&t)) {
            u.add(f);
        }
        (u, self.total.plus(&self.in_flight_total))
    }

    /// Counts a write handed to the stream as in flight; returns its write id (to send
    /// with it, and to [`Ledger::finish`] it).
    pub fn begin(&mut self, tag: &Tag, need: &Need) -> u64 {
        let t = self.tenant(tag);
        self.in_flight.entry(t).or_default().add(need);
        self.in_flight_total.add(need);
        let id = self.next_write;
        self.next_write += 1;
        self.writes.insert(id, (t, *need));
        id
    }

    /// The stream answered write `id`: `Some(seq)` when it took it under that sequence
    /// (it stays counted until the ordered read applies it), `None` when it failed or was
    /// a duplicate. A write the ordered read has applied already is not settled again.
    pub fn finish(&mut self, id: u64, seq: Option<u64>) {
        let Some((t, need)) = self.writes.remove(&id) else {
            return;
        };
        match seq {
            Some(s) if s > self.applied => {
                self.awaiting.insert(s, (t, need));
            }
            _ => self.settle(t, &need),
        }
    }

    fn settle(&mut self, t: u32, need: &Need) {
        if let Some(f) = self.in_flight.get_mut(&t) {
            f.sub(need);
            if *f == Usage::default() {
                self.in_flight.remove(&t);
            }
        }
        self.in_flight_total.sub(need);
    }

    /// Whether a durable name is known.
    pub fn has_durable(&self, key: &str) -> bool {
        self.durables.contains_key(key)
    }

    /// Records a durable name for `tag` (known names are not counted again).
    pub fn add_durable(&mut self, key: &str, tag: &Tag) {
        if self.durables.contains_key(key) {
            return;
        }
        let t = self.tenant(tag);
        self.durables.insert(key.to_string(), t);
        self.usage_mut(t).durables += 1;
        self.total.durables += 1;
    }

    /// Counts a durable name for `tag`, the tenant of its newest record: known for another
    /// tenant (the name deleted and created again by another, which a relay behind learns
    /// from the new record before the old one's deletion marker, or a floor written by
    /// another tenant's `Sub`), its count moves to `tag`; every relay counts it for the
    /// tenant its newest record names, as one started afterwards does.
    pub fn count_durable(&mut self, key: &str, tag: &Tag) {
        let t = self.tenant(tag);
        if self.durables.get(key) != Some(&t) {
            self.remove_durable(key);
            self.add_durable(key, tag);
        }
    }

    /// Forgets a deleted durable name: its count goes back to its tenant (and the total).
    pub fn remove_durable(&mut self, key: &str) {
        if let Some(t) = self.durables.remove(key) {
            let u = self.usage_mut(t);
            u.durables = u.durables.saturating_sub(1);
            self.total.durables = self.total.durables.saturating_sub(1);
        }
    }

    /// The number of durable names known.
    pub fn durable_count(&self) -> u64 {
        self.durables.len() as u64
    }

    /// The retained values of paths whose key starts with `prefix` (a key id's paths):
    /// (path key, original sequence), in key order.
    pub fn retained_under(&self, prefix: &str) -> Vec<(Arc<str>, u64)> {
        self.under(prefix)
            .filter_map(|(k, p)| p.retained.map(|e| (k.clone(), e.seq)))
            .collect()
    }

    /// `LastN` without reading the stream: for each kept path under `prefix` (a key id
    /// and a dot) that `matches`, the sequence of its `n`-th last message up to `upto`.
    pub fn last_n_starts(
        &self,
        prefix: &str,
        matches: impl Fn(&str) -> bool,
        n: u64,
        upto: u64,
    ) -> Vec<(Arc<str>, u64)> {
        if n == 0 {
            return Vec::new();
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.under(prefix)
            .filter(|(k, _)| matches(k))
            .filter_map(|(k, p)| {
                let end = p.kept.partition_point(|e| e.seq <= upto);
                (end > 0).then(|| (k.clone(), p.kept[end - n.min(end)].seq))
            })
            .collect()
    }

    /// `SinceMs` without reading the stream: the first sequence (up to `upto`) of a kept
    /// message at or after `since_ms` on a path under `prefix` that `matches`.
    pub fn first_since(
        &self,
        prefix: &str,
        matches: impl Fn(&str) -> bool,
        since_ms: u64,
        upto: u64,
    ) -> Option<u64> {
        self.under(prefix)
            .filter(|(k, _)| matches(k))
            .filter_map(|(_, p)| {
                // Times follow sequences within a path (one stream, one clock).
                let i = p.kept.partition_point(|e| e.ts_ms < since_ms);
                p.kept.get(i).map(|e| e.seq).filter(|s| *s <= upto)
            })
            .min()
    }

    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a Arc<str>, &'a PathUse)> {
        self.paths
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// A tenant's usage.
    #[cfg(test)]
    pub fn usage_of(&self, tag: &Tag) -> Usage {
        self.tags
            .get(tag)
            .and_then(|t| self.usage.get(*t as usize).copied())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_messages: 2,
            max_age_ms: 1000,
            retained_max_age_ms: 0,
            quota: crate::store::quota::Limits {
                tenant: [0, 3, 1, 0, 0],
                total: [0; 5],
                common: [0; 5],
                share: [0; 5],
            },
        }
    }

    /// A retained write may have raced an older value's write when the ordered read knows
    /// a value of the path between the one the write read and its own, or cannot tell;
    /// not once a newer value is known (its writer confirms).
    #[test]
    fn a_retained_race_is_possible_only_past_a_value_the_write_did_not_read() {
        let mut l = Ledger::new(limits());
        let t = [1u8; 16];
        l.apply(5, 1, "k.p", &t, 10, true, true, None);
        assert!(!l.retained_race_possible("k.p", 0, 5), "the first value");
        assert!(
            l.retained_race_possible("k.p", 0, 7),
            "not read that far yet"
        );
        l.apply(7, 2, "k.p", &t, 10, true, true, None);
        assert!(l.retained_race_possible("k.p", 0, 7), "5 was not read");
        assert!(!l.retained_race_possible("k.p", 5, 7));
        assert!(!l.retained_race_possible("k.p", 0, 5), "7 is newer");
        l.apply_retained(9, 3, "k.q", &t, 10);
        assert!(
            l.retained_race_possible("k.q", 8, 9),
            "read at start: unknown"
        );
        assert!(l.retained_race_possible("k.r", 0, 1), "no such path yet");
    }

    proptest::proptest! {
        /// Against a model: a write of the path's newest retained value `seq` that read
        /// `seen` may have raced exactly when a retained value of the path lies strictly
        /// between them in stream order (other paths' messages and plain messages of the
        /// path in between change nothing).
        #[test]
        fn a_retained_race_is_possible_exactly_past_a_value_not_read(
            steps in proptest::collection::vec((0u8..3, proptest::bool::ANY), 1..40),
            pick in 0usize..64,
        ) {
            let mut l = Ledger::new(limits());
            let t = [1u8; 16];
            let mut retained = Vec::new();
            for (i, (path, retain)) in steps.iter().enumerate() {
                let seq = i as u64 + 1;
                let path = ["k.p", "k.q", "k.r"][*path as usize];
                l.apply(seq, seq, path, &t, 10, true, *retain, None);
                if *retain && path == "k.p" {
                    retained.push(seq);
                }
            }
            let Some(&newest) = retained.last() else { return Ok(()) };
            // What the write read: nothing, or any value of the path (newer ones included:
            // then nothing lies between).
            let seen = if pick % (retained.len() + 1) == 0 {
                0
            } else {
                retained[pick % (retained.len() + 1) - 1]
            };
            let between = retained.iter().any(|v| *v > seen && *v < newest);
            proptest::prop_assert_eq!(l.retained_race_possible("k.p", seen, newest), between);
        }
    }

    /// The reserve counts writes in flight like stored ones: a tenant whose writes have
    /// not come back from the stream yet cannot slip past the line with them.
    #[test]
    fn the_reserve_counts_writes_in_flight() {
        let c = crate::config::StoreConfig {
            tenant_max_messages: 0,
            total_max_messages: 10,
            reserve_percent: 20,
            reserve_tenants: 2,
            ..Default::default()
        };
        let mut l = Ledger::new(Limits::of(&c));
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let mut ids = Vec::new();
        for i in 0..8 {
            let n = l.need(&format!("k.a{i}"), 10, true, false);
            l.check(&a, &n).unwrap();
            ids.push(l.begin(&a, &n));
        }
        let n = l.need("k.a9", 10, true, false);
        assert_eq!(l.check(&a, &n).unwrap_err().0, Refused::Reserve);
        // Back from the stream: the same.
        for (seq, id) in ids.into_iter().enumerate() {
            l.finish(id, Some(seq as u64 + 1));
            l.apply(
                seq as u64 + 1,
                0,
                &format!("k.a{seq}"),
                &a,
                10,
                true,
                false,
                None,
            );
        }
        assert_eq!(l.check(&a, &n).unwrap_err().0, Refused::Reserve);
        // Another tenant has its share (1), in flight too.
        let n = l.need("k.b1", 10, true, false);
        l.check(&b, &n).unwrap();
        l.begin(&b, &n);
        let n = l.need("k.b2", 10, true, false);
        assert_eq!(l.check(&b, &n).unwrap_err().0, Refused::Reserve);
    }

    /// A ledger under `c` where one tenant holds 8 retained values of 10 bytes
    /// (`k.b0`…`k.b7`): with the tests' totals, the reserve's line. Returns it, that
    /// tenant's tag and another's.
    fn big_at_the_line(c: &crate::config::StoreConfig) -> (Ledger, Tag, Tag) {
        let mut l = Ledger::new(Limits::of(c));
        let (big, small) = ([1u8; 16], [2u8; 16]);
        for i in 0..8u64 {
            l.apply(i + 1, 0, &format!("k.b{i}"), &big, 10, false, true, None);
        }
        (l, big, small)
    }

    /// Replacing one's own retained value is charged what the value adds, besides the new
    /// value's message in the stream (kept, or a retained-only value: review finding F1,
    /// the stream holds it); another tenant's value, or a new one, is charged whole.
    #[test]
    fn replacing_ones_own_retained_value_is_charged_what_it_adds() {
        let c = crate::config::StoreConfig {
            tenant_max_bytes: 0,
            total_max_bytes: 200,
            reserve_percent: 20,
            reserve_tenants: 2,
            ..Default::default()
        };
        // 8 values and their 8 messages in the stream: 160 bytes, the line.
        let (l, big, small) = big_at_the_line(&c);
        let n = l.need_for(&big, "k.b0", 10, false, true);
        assert_eq!(
            (n.msgs, n.bytes),
            (1, 10),
            "its message; the value adds nothing"
        );
        let n = l.need_for(&big, "k.b0", 12, false, true);
        assert_eq!(n.bytes, 14, "a larger value adds the difference");
        assert_eq!(
            l.check_publish(&big, "k.b0", true, &n).unwrap_err().0,
            Refused::Reserve,
            "past the line, its message is refused to a tenant above its share"
        );
        let n = l.need_for(&small, "k.b0", 10, false, true);
        assert_eq!(n.bytes, 20);
        assert!(l.check_publish(&small, "k.b0", true, &n).is_ok());
        assert_eq!(l.need_for(&big, "k.new", 10, false, true).bytes, 20);
        assert_eq!(
            l.need_for(&big, "k.b1", 10, true, true).bytes,
            10,
            "kept: whole"
        );
    }

    /// Review 28 finding 1: taking over another tenant's retained value is held to the
    /// taker's retained quota and, past the reserve's line, to its share.
    #[test]
    fn a_retained_takeover_is_checked_as_a_transfer() {
        let c = crate::config::StoreConfig {
            tenant_max_retained: 0,
            total_max_retained: 10,
            reserve_percent: 20,
            reserve_tenants: 2,
            ..Default::default()
        };
        let (mut l, big, small) = big_at_the_line(&c);
        l.apply(9, 0, "k.s", &small, 10, false, true, None);
        let n = l.need("k.s", 10, false, true);
        assert_eq!(n.retained, 0, "replacing a value adds none to the total");
        assert_eq!(
            l.check_publish(&big, "k.s", true, &n).unwrap_err().0,
            Refused::Reserve
        );
        // Replacing its own value is free, for either tenant.
        assert!(l.check_publish(&small, "k.s", true, &n).is_ok());
        let own = l.need("k.b0", 10, false, true);
        assert!(l.check_publish(&big, "k.b0", true, &own).is_ok());
        // And the taker's own retained quota holds (it did not before).
        let mut capped = Ledger::new(Limits::of(&crate::config::StoreConfig {
            tenant_max_retained: 1,
            ..Default::default()
        }));
        capped.apply(1, 0, "k.x", &big, 10, false, true, None);
        capped.apply(2, 0, "k.y", &small, 10, false, true, None);
        let n = capped.need("k.y", 10, false, true);
        assert_eq!(
            capped.check_publish(&big, "k.y", true, &n).unwrap_err().0,
            Refused::Tenant
        );
    }

    #[test]
    fn counts_follow_the_stream_and_its_retention() {
        let mut l = Ledger::new(limits());
        let a = [1u8; 16];
        for seq in 1..=3 {
            l.apply(seq, 10 * seq, "k.p", &a, 100, true, false, None);
        }
        let u = l.usage_of(&a);
        assert_eq!(
            (u.msgs, u.bytes, u.paths),
            (2, 200, 1),
            "per-subject limit 2"
        );
        l.apply(2, 0, "k.p", &a, 100, true, false, None);
        assert_eq!(l.usage_of(&a).msgs, 2, "a re-read sequence is ignored");
        l.expire(1025);
        assert_eq!(l.usage_of(&a).msgs, 1, "seq 2 (ts 20) aged out");
        l.expire(2000);
        assert_eq!(l.usage_of(&a), Usage::default(), "the path is gone too");
    }

    #[test]
    fn in_flight_writes_count_until_read_back() {
        let mut l = Ledger::new(limits());
        let a = [1u8; 16];
        let n = l.need("k.p", 10, true, false);
        let mut ids = Vec::new();
        for _ in 0..3 {
            l.check(&a, &n).unwrap();
            ids.push(l.begin(&a, &n));
        }
        assert_eq!(l.check(&a, &n).unwrap_err().0, Refused::Tenant);
        l.finish(ids[0], None);
        l.check(&a, &n).unwrap();
        l.finish(ids[1], Some(7));
        l.apply(7, 0, "k.q", &a, 10, true, false, None);
        let r = l.need("k.r", 10, true, true);
        assert!(l.check(&a, &r).is_ok());
        l.apply(8, 0, "k.r", &a, 10, false, true, None);
        let r = l.need("k.r", 10, false, true);
        assert_eq!(r.retained, 0, "replacing a retained value adds no value");
        assert_eq!(
            l.check(&a, &r).unwrap_err().0,
            Refused::Tenant,
            "but its message in the stream counts: 3 held (k.q, k.r, one in flight)"
        );
        let s = l.need("k.s", 10, false, true);
        assert_eq!(
            l.check(&a, &s).unwrap_err().0,
            Refused::Tenant,
            "one retained value per tenant"
        );
        assert_eq!(l.retained_under("k."), vec![(Arc::from("k.r"), 8)]);
        l.apply(9, 50, "k.q", &a, 10, true, false, None);
        l.apply(10, 60, "k.q", &a, 10, true, false, None);
        let all = |_: &str| true;
        assert_eq!(
            l.last_n_starts("k.", all, 1, 10),
            vec![(Arc::from("k.q"), 10)]
        );
        assert_eq!(
            l.last_n_starts("k.", all, 5, 9),
            vec![(Arc::from("k.q"), 9)],
            "seq 7 went with the per-path limit (2)"
        );
        assert_eq!(l.first_since("k.", all, 55, 10), Some(10));
        assert_eq!(l.first_since("k.", all, 55, 9), None);

        // A write the ordered read never sees (retention deleted it first) stops being in
        // flight once the read passes its sequence.
        let before = l.in_flight_total;
        let n = l.need("k.z", 10, true, false);
        let id = l.begin(&a, &n);
        l.finish(id, Some(20));
        assert_eq!(l.in_flight_total.msgs, before.msgs + 1);
        l.apply(21, 70, "k.q", &a, 10, true, false, None);
        assert_eq!(l.in_flight_total, before);
    }

    /// The ordered read can apply a write before the stream's ack reaches the relay that
    /// wrote it: counted once (usage), not also in flight — else a publish exactly at a
    /// quota was refused one early while the acks were on their way.
    #[test]
    fn a_write_read_back_before_its_ack_counts_once() {
        let mut l = Ledger::new(limits());
        let a = [1u8; 16];
        let n = l.need("k.p", 10, true, false);
        let ids: Vec<u64> = (0..3)
            .map(|_| {
                l.check(&a, &n).unwrap();
                l.begin(&a, &n)
            })
            .collect();
        // All three come back through the ordered read before any ack.
        for (i, id) in ids.iter().enumerate() {
            l.apply(
                i as u64 + 1,
                0,
                &format!("k.p{i}"),
                &a,
                10,
                true,
                false,
                Some(*id),
            );
        }
        assert_eq!(l.usage_of(&a).msgs, 3);
        assert_eq!(
            l.in_flight_total,
            Usage::default(),
            "nothing left in flight"
        );
        // The late acks change nothing.
        for (i, id) in ids.iter().enumerate() {
            l.finish(*id, Some(i as u64 + 1));
        }
        assert_eq!(l.in_flight_total, Usage::default());
        assert_eq!(l.usage_of(&a).msgs, 3);
        // A write id of another relay's (or an unknown one) settles nothing here.
        let n = l.need("k.x", 10, true, false);
        let id = l.begin(&a, &n);
        l.apply(9, 0, "k.x2", &[2u8; 16], 10, true, false, Some(id + 100));
        assert_eq!(l.in_flight_total.msgs, 1);
        l.finish(id, None);
        assert_eq!(l.in_flight_total, Usage::default());
    }

    #[test]
    fn a_removed_durable_gives_its_count_back() {
        let mut l = Ledger::new(limits());
        let (a, b) = ([1u8; 16], [2u8; 16]);
        l.add_durable("k.d1", &a);
        l.add_durable("k.d1", &a);
        l.add_durable("k.d2", &b);
        assert_eq!((l.usage_of(&a).durables, l.total().durables), (1, 2));
        l.remove_durable("k.d1");
        l.remove_durable("k.d1");
        l.remove_durable("k.unknown");
        assert_eq!(l.usage_of(&a).durables, 0, "given back once");
        assert_eq!((l.usage_of(&b).durables, l.total().durables), (1, 1));
        assert!(!l.has_durable("k.d1") && l.durable_count() == 1);
    }

    #[test]
    fn a_durable_counts_for_the_tenant_of_its_newest_record() {
        let mut l = Ledger::new(limits());
        let (a, b) = ([1u8; 16], [2u8; 16]);
        l.count_durable("k.d", &a);
        l.count_durable("k.d", &a);
        assert_eq!((l.usage_of(&a).durables, l.total().durables), (1, 1));
        l.count_durable("k.d", &b);
        assert_eq!(
            (l.usage_of(&a).durables, l.usage_of(&b).durables),
            (0, 1),
            "moved"
        );
        assert_eq!((l.total().durables, l.durable_count()), (1, 1));
    }

    /// Review finding F1: a retained-only value is a message of the stream until it is
    /// purged (older ones of its path, counted `RETAINED_ONLY_COUNTED` after a newer one), trimmed by
    /// the per-subject limit or aged out: its tenant is charged one message and its size
    /// for it meanwhile, besides the retained value itself.
    #[test]
    fn retained_only_values_count_as_stream_messages_until_purged() {
        let mut l = Ledger::new(Limits {
            max_messages: 0,
            max_age_ms: 0,
            ..limits()
        });
        let a = [1u8; 16];
        let n = l.need("k.r", 100, false, true);
        assert_eq!((n.msgs, n.bytes, n.retained), (1, 200, 1));
        for seq in 1..=5 {
            l.apply(seq, 1000 + seq, "k.r", &a, 100, false, true, None);
        }
        let u = l.usage_of(&a);
        assert_eq!(
            (u.msgs, u.bytes, u.retained),
            (5, 600, 1),
            "five copies in the stream"
        );
        let keep = RETAINED_ONLY_COUNTED.as_millis() as u64;
        l.expire(1002 + keep);
        assert_eq!(l.usage_of(&a).msgs, 4, "the first purged with the second's");
        l.expire(1005 + keep);
        let u = l.usage_of(&a);
        assert_eq!(
            (u.msgs, u.bytes, u.retained, u.paths),
            (1, 200, 1, 1),
            "the newest stays"
        );
        let mut capped = Ledger::new(limits());
        for seq in 1..=3 {
            capped.apply(seq, 0, "k.r", &a, 10, false, true, None);
        }
        assert_eq!(capped.usage_of(&a).msgs, 2, "per-subject limit 2");
    }

    /// Review finding F-A: the older values of a retained-only value this relay wrote stay
    /// charged until its purge is confirmed, however late (not on a timer alone: a lagging
    /// or failed purge left copies in the stream nobody was charged for), and no shorter
    /// than another relay counts them (`RETAINED_ONLY_COUNTED` after this relay read the
    /// newer one, by this relay's clock when it is ahead of the stream's).
    #[test]
    fn own_retained_only_values_are_released_when_their_purge_is_confirmed() {
        let mut l = Ledger::new(Limits {
            max_messages: 0,
            max_age_ms: 0,
            ..limits()
        });
        let a = [1u8; 16];
        let keep = RETAINED_ONLY_COUNTED.as_millis() as u64;
        for seq in 1..=3 {
            l.apply(seq, 1000 + seq, "k.r", &a, 100, false, true, Some(seq));
        }
        l.expire(1_000_000);
        assert_eq!(l.usage_of(&a).msgs, 3, "no purge confirmed: all counted");
        l.purged("k.r", 3);
        assert_eq!(l.usage_of(&a).msgs, 1, "purged below 3: the newest stays");
        // Confirmed before its timer: counted until the timer (as other relays do).
        l.apply(4, 1_000_004, "k.r", &a, 100, false, true, Some(4));
        l.purged("k.r", 4);
        assert_eq!(l.usage_of(&a).msgs, 2, "counted until its timer");
        l.expire(1_000_004 + keep);
        assert_eq!(l.usage_of(&a).msgs, 1, "timer and confirmation: released");
        // Another relay's value: from this relay's clock (ahead of the stream's).
        l.apply(5, 1005, "k.r", &a, 100, false, true, None);
        l.expire(1005 + keep);
        assert_eq!(l.usage_of(&a).msgs, 2, "not released by the stream's time");
        l.expire(1_000_004 + 2 * keep);
        assert_eq!(l.usage_of(&a).msgs, 1, "released from this relay's time");
    }
}
