//! The receiver checks of PROTOCOL §4.11, runtime-free: what a client refuses even when the
//! envelope opens and verifies.
//!
//! - **Dedup** of `(tree, sender, msg_id)` across every subscription of the client, for a
//!   time horizon (default 7 days, the relay's default retention). Entries expire by time;
//!   the window is bounded ([`ReceiveConfig::max_entries`]), and one at its bound forgets
//!   the entries that expire first *and moves its start past them*, so a flood of new
//!   messages can shorten the window (counted) but never make a forgotten one deliverable.
//! - **Horizon**: a message dated before `now − horizon` is refused (it could no longer be
//!   recognised as a duplicate) unless the subscription asked for older history.
//! - **Clock skew**: a message dated more than the allowed skew into the future is refused;
//!   a *live* message (not replayed, redelivered or retained) dated more than the skew into
//!   the past is refused too. Replayed history is accepted within the horizon (and deduped).
//! - **Retained values never move backwards** per `(tree, topic)`: a retained value older
//!   than the newest message this client accepted for that topic (live, history or
//!   retained) is refused, and one already delivered is a duplicate like any other (the
//!   client core shows it again only to a new subscription that asked for retained
//!   values, once). The relay sets the `RETAINED` flag outside the seal, so it must not
//!   buy a message more than that. A mark is the message that set it — its dedup identity
//!   (tree, sender, id), not its date and id alone: another sender's message copying both
//!   is refused as no newer. The marks are kept for the horizon, like dedup entries, and
//!   bounded like them ([`ReceiveConfig::max_entries`] marks): past the bound the oldest
//!   go (counted) into a fixed table of evicted topics, and a retained value on such a
//!   topic dated at or before its evicted mark is held to the window's start — an evicted
//!   mark's topic can be rolled back within the window's reach, but no message is
//!   accepted twice, and a topic never evicted keeps getting its current value.
//! - **Publisher policy** per topic or subtree: `require_signed` and an `allow_senders` list.
//!
//! The state that must survive a restart (dedup entries, retained high-water marks) is
//! reported as [`Change`]s for the driver to persist and handed back with
//! [`Guard::restore_seen`] / [`Guard::restore_retained`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use whispeer_protocol::limits::DEFAULT_MAX_PAYLOAD;
use whispeer_protocol::{frame::msg_flags, SenderId, Topic, TopicFilter, TreeId};

/// Default dedup horizon: 7 days (the relay's default retention).
pub const DEFAULT_HORIZON_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Default allowed clock skew: 5 minutes.
pub const DEFAULT_MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// Default most messages the dedup window remembers: 4 million, about 380 MB at most (95
/// bytes each). Reached only above ~6.6 msg/s sustained over the 7-day horizon; beyond it
/// the window keeps the newest and refuses history dated before the oldest it still holds
/// (see [`ReceiveConfig::max_entries`]).
pub const DEFAULT_MAX_ENTRIES: usize = 4_000_000;

/// Who may publish on a topic or subtree, as far as this receiver is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SenderPolicy {
    /// Refuse unsigned messages.
    pub require_signed: bool,
    /// Accept only these senders (implies signed). `None`: anyone holding the key.
    pub allow_senders: Option<Vec<SenderId>>,
}

impl SenderPolicy {
    /// No restriction.
    pub fn new() -> Self {
        Self::default()
    }
    /// Refuse unsigned messages.
    pub fn require_signed(mut self) -> Self {
        self.require_signed = true;
        self
    }
    /// Accept only these senders (added to any already listed).
    pub fn allow_senders(mut self, senders: impl IntoIterator<Item = SenderId>) -> Self {
        self.allow_senders
            .get_or_insert_with(Vec::new)
            .extend(senders);
        self
    }
}

/// The receiver's limits: horizon, skew and per-topic publisher policies.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiveConfig {
    /// How long a `(tree, sender, msg_id)` is remembered; older messages are refused unless
    /// a subscription asks for older history.
    pub horizon_ms: u64,
    /// Allowed clock difference between a sender and this client.
    pub max_skew_ms: u64,
    /// Most messages the dedup window remembers. Memory is ~95 bytes per message
    /// remembered, and a subscriber busy enough (or a member flooding a topic it reads)
    /// would otherwise fill the whole horizon's worth: at 1,000 msg/s, 57 GB for 7 days.
    /// At the limit the entries that expire first are forgotten and the window's start
    /// moves up past them: a message dated before it is refused
    /// ([`Refusal::BeforeWindow`], counted) unless a subscription asked for older history
    /// — so a forgotten message can never be delivered twice; the horizon just becomes
    /// shorter under load. Live messages (dated within the skew) pass unless the window
    /// holds less than the skew's worth of traffic.
    ///
    /// It bounds the retained high-water marks too (one per topic a message was accepted
    /// on; 83–165 bytes each with the table's slack, so up to ~610 MB at the default for a
    /// member flooding millions of topics): past it the oldest marks (by date) are evicted,
    /// counted in [`RefusedStats::marks_evicted`]. An evicted mark's topic loses its
    /// rollback check — an older retained value the window does not refuse may be
    /// accepted — and its retained values dated at or before the evicted mark are held to
    /// the window's start like other messages, so none is accepted twice. Evicted topics
    /// are remembered in a fixed table of `max_entries / 2` entries (at least 512), 8.5
    /// bytes per `max_entries` (34 MB at the default), allocated at the first eviction. A
    /// topic never evicted is judged as if nothing were (its current value passes however
    /// old) unless its buckets in the table overflowed: measured, that never happens with
    /// up to `max_entries / 4` topics evicted within the horizon, for 0.06 % of topics at
    /// `3 × max_entries / 8`, about half at `max_entries / 2` (only for values older than
    /// the median eviction date) and all past `max_entries` — a flood of topics degrades
    /// to holding every old retained value to the window's start, in the same memory.
    pub max_entries: usize,
    /// Largest payload a delivered message may decompress to (bytes). Default
    /// [`DEFAULT_MAX_PAYLOAD`] (16 MiB), what a default publisher may seal, so no honest
    /// message is refused. A message over it is refused (counted in `rejected`) from its
    /// declared size, before anything is allocated for it; its id is remembered, so a
    /// replay of it costs nothing more. Only messages that pass every other check are
    /// decompressed at all (never a duplicate), but one accepted message whose small
    /// envelope claims a payload up to this size costs every subscriber that much memory:
    /// a subscriber that expects small messages lowers it.
    pub max_payload: usize,
    /// Publisher policies; every rule whose filter matches a topic applies.
    pub policies: Vec<(TopicFilter, SenderPolicy)>,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            horizon_ms: DEFAULT_HORIZON_MS,
            max_skew_ms: DEFAULT_MAX_SKEW_MS,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_payload: DEFAULT_MAX_PAYLOAD,
            policies: Vec::new(),
        }
    }
}

/// Why an opened message was refused. Never shown to the app as a message; counted in
/// [`RefusedStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// `(tree, sender, msg_id)` already delivered within the horizon.
    Duplicate,
    /// Dated before the horizon and no subscription asked for older history.
    BeforeHorizon,
    /// Dated before the oldest message the dedup window still remembers, after it reached
    /// [`ReceiveConfig::max_entries`] (it might be one it forgot), and no subscription
    /// asked for older history.
    BeforeWindow,
    /// Dated beyond the allowed skew into the future.
    Future,
    /// A live message dated more than the allowed skew in the past.
    StaleLive,
    /// A retained value older than one already accepted for its topic.
    RetainedRollback,
    /// Unsigned where the topic requires a signature.
    Unsigned,
    /// Signed by a sender not on the topic's publisher list.
    UnlistedSender,
}

/// Refusals by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusedStats {
    /// Dated before the horizon.
    pub before_horizon: u64,
    /// Dated before the start of a dedup window shortened by its capacity.
    pub before_window: u64,
    /// Dated too far in the future.
    pub future: u64,
    /// Live but too old.
    pub stale_live: u64,
    /// Retained value rolled back.
    pub retained_rollback: u64,
    /// Unsigned where a signature is required.
    pub unsigned: u64,
    /// Sender not on the publisher list.
    pub unlisted_sender: u64,
    /// Restored state dated later than any run of this client could have written it (a
    /// dedup expiry or window start past `now + horizon + 2 × skew`, a retained mark past
    /// `now + skew`), clamped to that bound when loaded (see
    /// [`Guard::restore_forgot_upto`]). Not a refusal of a message: counted here to be seen.
    pub restored_future: u64,
    /// Retained high-water marks evicted, oldest first, when the table was at its bound
    /// ([`ReceiveConfig::max_entries`] marks). Not a refusal of a message: counted here to
    /// be seen, like `before_window` for the dedup window's forgotten entries.
    pub marks_evicted: u64,
}

/// `(tree, sender or zeros, msg_id)`.
pub type DedupKey = (TreeId, [u8; 32], [u8; 16]);

/// Key of the retained high-water mark of one topic: `BLAKE3(tree id ‖ topic)` (the state
/// file holds no topic names).
pub type RetainedKey = [u8; 32];

/// A change to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// Remember `key` until `expires_ms`.
    Seen {
        /// The dedup key.
        key: DedupKey,
        /// Unix ms after which it may be forgotten.
        expires_ms: u64,
    },
    /// The newest retained value of a topic. Dated 0: the mark was evicted (a tombstone: a
    /// driver keeping a table by key may drop it). Under [`MARKS_FLOOR_KEY`]: the marks
    /// floor; under a key starting with 19 `0xff` bytes, a row of the evicted-topic table
    /// (see [`Guard::restore_retained`]); all load back as what they are.
    Retained {
        /// Which topic.
        key: RetainedKey,
        /// Its timestamp.
        ts_ms: u64,
        /// Its message id.
        msg_id: [u8; 16],
    },
    /// Durable `durable` is owed message `digest` (a subscription of it went away without
    /// taking it while the window holds it as delivered; see `ClientCore::dedup_untaken`).
    Owed {
        /// The durable's name.
        durable: String,
        /// The message's dedup digest.
        digest: Digest,
    },
    /// Durable `durable` took owed message `digest`: no longer owed.
    Paid {
        /// The durable's name.
        durable: String,
        /// The message's dedup digest.
        digest: Digest,
    },
    /// Durable `durable` was deleted: it is owed nothing.
    OwedForgotten {
        /// The durable's name.
        durable: String,
    },
}

/// What the checks need to know about one opened message.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The tree it was sealed under.
    pub tree: TreeId,
    /// The topic.
    pub topic: &'a Topic,
    /// The verified sender.
    pub sender: Option<SenderId>,
    /// The sender's message id.
    pub msg_id: [u8; 16],
    /// The sender's timestamp.
    pub ts_ms: u64,
    /// The `Msg` flags.
    pub flags: u64,
    /// Whether a matching subscription asked for history older than the horizon.
    pub allow_old: bool,
    /// Its [`digest`] and [`retained_key`] if computed already ([`keys_of`]: an open job
    /// computes them on its worker thread, off the connection's); else the checks do.
    pub keys: Option<(Digest, RetainedKey)>,
}

/// An accepted message, to [`Guard::commit`] once it is actually delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    key: DedupKey,
    digest: Digest,
    expires_ms: u64,
    /// The topic's high-water mark this message sets if it is the newest.
    mark: (RetainedKey, u64, [u8; 16]),
    /// Accepted although the window's start passed its date: a held message every holder
    /// let go (`Guard::released`).
    released: bool,
}

impl Accepted {
    /// Its dedup digest (what the window keeps).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Its topic's [`retained_key`].
    pub fn retained_key(&self) -> RetainedKey {
        self.mark.0
    }

    /// Whether it was accepted only as a released held message the window's start had
    /// passed: it is held to the horizon, not to the window's start (see
    /// [`Guard::window_start_ms`]).
    pub fn released(&self) -> bool {
        self.released
    }
}

/// The receiver's persisted state at one time ([`Guard::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// Dedup entries: digest and expiry (Unix ms), by expiry.
    pub seen: Vec<(Digest, u64)>,
    /// Retained high-water marks: key, timestamp, message id (no particular order), at
    /// most [`ReceiveConfig::max_entries`] (twice that if taken after a restore before
    /// any check or expiry, see [`Guard::restore_retained`]), and if marks were evicted
    /// the evicted-topic table's rows (at most `max_entries / 2 + max_entries / 16`, at
    /// least 576) and the floors under [`MARKS_FLOOR_KEY`] (and the legacy row, see
    /// [`Guard::restore_retained`]).
    pub retained: Vec<(RetainedKey, u64, [u8; 16])>,
    /// The latest expiry among dedup entries forgotten for room (0: none; see
    /// [`Guard::forgot_upto`]). Without it a restored window would accept again what the
    /// full window had forgotten.
    pub forgot_upto: u64,
}

/// The receiver-side state: dedup window and retained high-water marks.
#[derive(Debug)]
pub struct Guard {
    cfg: ReceiveConfig,
    seen: Window,
    /// Per `(tree, topic)`: the newest message accepted, kept for the horizon (plus skew)
    /// after its date.
    retained: HashMap<RetainedKey, Mark, Seeded>,
    /// Per `(tree, topic)` whose mark a held message moved ([`Guard::hold`]) past what
    /// the saved state holds: the saved mark — the newest of the topic's messages
    /// delivered for good (taken, committed or restored), `None`: none yet. The journal
    /// and [`Guard::snapshot`] save that, never a held message's mark: a held message is
    /// not saved (a crash forgets it, so the relay's redelivery — or its retained value
    /// sent to the restarted client — must be accepted), and a saved mark of its date and
    /// id would refuse it as a rollback (a restored mark has no digest to recognise its
    /// own message; review finding: the topic's current value, unread at a crash, was
    /// never shown after the restart). Only topics with such a mark have an entry (a
    /// held or released message is the newest of its topic), gone with the topic's mark
    /// or once a message as new as the mark is delivered for good.
    saved_marks: HashMap<RetainedKey, Option<(u64, [u8; 16])>, Seeded>,
    /// When expired marks are next swept (Unix ms).
    next_mark_sweep: u64,
    /// The newest date among marks evicted for room (0: none; see `Guard::evict_marks`).
    /// Which topics it covers is in `evicted`, so here it applies to none: it is saved
    /// as the mark of [`MARKS_FLOOR_KEY`] (with [`MARKS_FLOOR_TABLE`]) for a client
    /// without the table, which applies it to every topic.
    marks_floor: u64,
    /// A floor for every topic: restored from a state whose evicted-key table had another
    /// size (`max_entries` changed) or from this row of a previous run (see
    /// [`EVICTED_LEGACY`]); which topics it covers is unknown, so a retained value on any
    /// topic dated at most this (or `foreign_floor`) is held to the window's start, until
    /// it passes the horizon.
    legacy_floor: u64,
    /// The [`MARKS_FLOOR_KEY`] row restored last if a client without the evicted-key
    /// table wrote it (9727dd3: message id zeros), else 0: a floor for every topic like
    /// `legacy_floor`. Saved as part of that.
    foreign_floor: u64,
    /// Which topics' marks were evicted, with their dates (see [`Evicted`]): a retained
    /// value on such a topic dated at most its date is held to the window's start.
    evicted: Evicted,
    /// Restored values not yet held to the bounds of the first time seen after them
    /// ([`Guard::settle_restored`]).
    unsettled: bool,
    stats: RefusedStats,
    journal: Vec<Change>,
    /// Accepted messages handed to at-least-once subscriptions that none of them took yet
    /// ([`Guard::hold`]), with how many still may: in the window (a copy meanwhile is a
    /// duplicate) but not in the journal or a snapshot, so a crash forgets them, and
    /// [`Guard::release`] forgets them once no holder is left — the relay delivers what
    /// was never acknowledged again, and that copy must be accepted (at least once).
    held: HashMap<Digest, (Accepted, usize), Seeded>,
    /// Held messages every holder let go ([`Guard::release`]), oldest first, at most
    /// [`MAX_RELEASED`]: the relay's redelivery of one is accepted even when the window's
    /// start ([`Guard::forgot_upto`]) has passed its date meanwhile — a full window moves
    /// its start past messages that sat untaken in a slow subscription's queue, and
    /// refusing their redelivery as `BeforeWindow` would lose them. Forgotten once
    /// accepted again. In memory only (a restarted client's window starts from its file).
    released: Released,
}

/// A topic's retained high-water mark: the newest message accepted for it — its date and
/// id (the order of [`newer`]) and which message it is (review of session 28, F3: a mark
/// compared by date and id alone let another member's message copying both pass as the one
/// that set it, a duplicate shown to a new retained subscription).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    ts_ms: u64,
    msg_id: [u8; 16],
    /// The message's dedup [`digest`] (little-endian bytes): only that message is the
    /// mark's own duplicate. Zeros: unknown — a mark restored from a state file, which
    /// keeps date and id only (its format is unchanged); see `Guard::check_inner`.
    digest: [u8; 16],
}

impl Mark {
    /// Whether the mark is known to be message `d`'s.
    fn is(&self, d: Digest) -> bool {
        self.digest != [0; 16] && self.digest == d.to_le_bytes()
    }
}

/// Entries per bucket of [`Evicted`]: 8 entries of 16 bytes, two cache lines.
const EVICTED_PER_BUCKET: usize = 8;

/// Fewest buckets of [`Evicted`] (512 entries, ~8.7 KB), for small bounds.
const EVICTED_MIN_BUCKETS: usize = 64;

/// Most buckets of [`Evicted`] (2²⁴ entries, 285 MB: the table for `max_entries` 33.5
/// million; a larger bound, which a window of that size costs gigabytes for anyway, gets
/// no larger table). Also what a forged state file's row can make a client allocate.
const EVICTED_MAX_BUCKETS: usize = 1 << 21;

/// Which topics' retained high-water marks were evicted for room, and the newest date of
/// each (review of 9727dd3, B1: one floor for every topic held a never-seen topic's old
/// current value to the window's start, so a new retained subscription to more topics
/// than the bound missed some of their values). A fixed table, allocated at the first
/// eviction: `max_entries / 2` entries (at least 512) in buckets of
/// [`EVICTED_PER_BUCKET`], each key with two candidate buckets (the one with more room
/// takes it). An entry is a key's 64-bit id (the first 8 bytes of its
/// [`retained_key`], 0: free) and the newest date among its evicted marks. When both of a
/// key's buckets are full, the oldest entry of the two (or the new one) is folded into
/// its bucket's floor, which then covers every key with that bucket among its two.
///
/// It never misses an evicted key: a key's entry only ever moves up in date or is folded
/// into a floor that is at least its date, and goes only once its date is past the
/// horizon (every value it covers is refused as older). It may cover a key never evicted
/// — one whose two buckets include a floor (a full table), or whose 64-bit id equals an
/// entry's (2⁻⁶⁴ per entry compared, 16 at most) — and then only holds that topic's
/// retained values dated at or before the floor to the window's start, as before the
/// table. Memory: 16 bytes per entry and 8 per bucket, 8.5 bytes per `max_entries`
/// (34 MB at the default 4 million), once a mark was evicted.
#[derive(Debug, Default)]
struct Evicted {
    /// `(id, date)` per entry, bucket after bucket; `(0, 0)`: free.
    entries: Vec<(u64, u64)>,
    /// Per bucket: the newest date among entries folded out of it (0: none).
    floors: Vec<u64>,
}

/// Rows of [`Evicted`] in the saved state, as marks of keys no topic has: the first 19
/// bytes 0xff, then [`EVICTED_ENTRY`] or [`EVICTED_FLOOR`], the table's bucket count
/// (u32 big-endian: a table of another size re-inserts entries and takes floors as
/// [`Guard`]'s legacy floor) and the entry's or bucket's index (u64 big-endian). An entry
/// row is dated its date, its message id the key's id (8 bytes little-endian, then
/// zeros); a floor row is dated the floor. Every change is journaled as the row's new
/// value (before the tombstone of the mark whose eviction made it), and a row's date is
/// its content's newest: a driver pruning rows dated before the horizon prunes only what
/// has expired.
const EVICTED_ROW_PREFIX: [u8; 19] = [0xff; 19];
const EVICTED_ENTRY: u8 = 1;
const EVICTED_FLOOR: u8 = 2;
/// The row (bucket count and index 0) of [`Guard`]'s floor for every topic (see
/// `Guard::legacy_floor`), dated that floor.
const EVICTED_LEGACY: u8 = 3;

/// The message id of [`MARKS_FLOOR_KEY`]'s row when written by a client with the
/// evicted-key table, which holds which topics it covers (so it applies to no topic
/// there; a client without the table, 9727dd3, applies it to all). Zeros: written by a
/// client without the table, so it applies to every topic (see
/// [`Guard::restore_retained`]).
pub const MARKS_FLOOR_TABLE: [u8; 16] = *b"whispeer evicted";

/// The key of row `index` of `kind` in a table of `buckets` buckets.
fn evicted_row(kind: u8, buckets: usize, index: usize) -> RetainedKey {
    let mut k = [0u8; 32];
    k[..19].copy_from_slice(&EVICTED_ROW_PREFIX);
    k[19] = kind;
    k[20..24].copy_from_slice(&(buckets as u32).to_be_bytes());
    k[24..].copy_from_slice(&(index as u64).to_be_bytes());
    k
}

/// A topic's 64-bit id in [`Evicted`] (never 0, which marks a free entry).
fn evicted_id(rk: &RetainedKey) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&rk[..8]);
    u64::from_le_bytes(b).max(1)
}

impl Evicted {
    /// Buckets of a table for `max_entries`.
    fn buckets_for(max_entries: usize) -> usize {
        (max_entries / 2)
            .div_ceil(EVICTED_PER_BUCKET)
            .clamp(EVICTED_MIN_BUCKETS, EVICTED_MAX_BUCKETS)
    }

    fn buckets(&self) -> usize {
        self.floors.len()
    }

    /// The most rows a table for `max_entries` saves (entries and bucket floors).
    #[cfg(test)]
    fn max_rows(max_entries: usize) -> usize {
        Self::buckets_for(max_entries) * (EVICTED_PER_BUCKET + 1)
    }

    fn allocate(&mut self, buckets: usize) {
        if self.floors.is_empty() {
            self.entries = vec![(0, 0); buckets * EVICTED_PER_BUCKET];
            self.floors = vec![0; buckets];
        }
    }

    /// Key `id`'s two buckets.
    fn pair(&self, id: u64) -> [usize; 2] {
        let n = self.buckets() as u64;
        let at = |x: u64| (((x & 0xffff_ffff) * n) >> 32) as usize;
        [at(id), at(id >> 32)]
    }

    fn slots(b: usize) -> std::ops::Range<usize> {
        b * EVICTED_PER_BUCKET..(b + 1) * EVICTED_PER_BUCKET
    }

    /// The newest date the table holds for key `id`: retained values dated at most this
    /// may be ones whose mark was evicted (0: none).
    fn floor_of(&self, id: u64) -> u64 {
        if self.floors.is_empty() {
            return 0;
        }
        let mut f = 0;
        for b in self.pair(id) {
            f = f.max(self.floors[b]);
            for &(e, date) in &self.entries[Self::slots(b)] {
                if e == id {
                    f = f.max(date);
                }
            }
        }
        f
    }

    /// Records key `id` evicted with its mark dated `date`; the rows it changed (entry
    /// indices, and a bucket whose floor rose) go to `changed`.
    fn insert(&mut self, id: u64, date: u64, changed: &mut Vec<(u8, usize)>) {
        let pair = self.pair(id);
        // Its entry already: the newer date.
        for b in pair {
            for i in Self::slots(b) {
                if self.entries[i].0 == id {
                    if self.entries[i].1 < date {
                        self.entries[i].1 = date;
                        changed.push((EVICTED_ENTRY, i));
                    }
                    return;
                }
            }
        }
        // A free entry in the bucket with more room.
        let free = |b: usize| Self::slots(b).filter(|&i| self.entries[i].0 == 0).count();
        let (f0, f1) = (free(pair[0]), free(pair[1]));
        let b = if f1 > f0 { pair[1] } else { pair[0] };
        if f0.max(f1) > 0 {
            let i = Self::slots(b)
                .find(|&i| self.entries[i].0 == 0)
                .expect("a free entry");
            self.entries[i] = (id, date);
            changed.push((EVICTED_ENTRY, i));
            return;
        }
        // Both full: the oldest of their entries and the new one is folded into its
        // bucket's floor (the one with the lower floor for the new one), the new one
        // taking the folded one's place.
        let oldest = pair
            .iter()
            .flat_map(|&b| Self::slots(b))
            .min_by_key(|&i| self.entries[i].1)
            .expect("full buckets");
        if self.entries[oldest].1 < date {
            let b = oldest / EVICTED_PER_BUCKET;
            self.floors[b] = self.floors[b].max(self.entries[oldest].1);
            self.entries[oldest] = (id, date);
            changed.push((EVICTED_FLOOR, b));
            changed.push((EVICTED_ENTRY, oldest));
        } else {
            let b = *pair
                .iter()
                .min_by_key(|&&b| self.floors[b])
                .expect("two buckets");
            if self.floors[b] < date {
                self.floors[b] = date;
                changed.push((EVICTED_FLOOR, b));
            }
        }
    }

    /// Forgets entries and floors dated before `before` (past the horizon).
    fn expire(&mut self, before: u64) {
        for e in &mut self.entries {
            if e.0 != 0 && e.1 < before {
                *e = (0, 0);
            }
        }
        for f in &mut self.floors {
            if *f < before {
                *f = 0;
            }
        }
    }

    /// Brings every date later than `max` down to `max`; how many moved.
    fn clamp(&mut self, max: u64) -> u64 {
        let mut n = 0;
        for d in self
            .entries
            .iter_mut()
            .filter(|e| e.0 != 0)
            .map(|e| &mut e.1)
            .chain(self.floors.iter_mut())
        {
            if *d > max {
                *d = max;
                n += 1;
            }
        }
        n
    }

    /// The saved row of `(kind, index)`.
    fn row(&self, (kind, index): (u8, usize)) -> (RetainedKey, u64, [u8; 16]) {
        let key = evicted_row(kind, self.buckets(), index);
        if kind == EVICTED_ENTRY {
            let (id, date) = self.entries[index];
            let mut msg_id = [0u8; 16];
            msg_id[..8].copy_from_slice(&id.to_le_bytes());
            (key, date, msg_id)
        } else {
            (key, self.floors[index], [0; 16])
        }
    }

    /// Every row in use.
    fn rows(&self) -> impl Iterator<Item = (RetainedKey, u64, [u8; 16])> + '_ {
        let entries = (0..self.entries.len())
            .filter(|&i| self.entries[i].0 != 0)
            .map(|i| (EVICTED_ENTRY, i));
        let floors = (0..self.floors.len())
            .filter(|&b| self.floors[b] != 0)
            .map(|b| (EVICTED_FLOOR, b));
        entries.chain(floors).map(|r| self.row(r))
    }
}

/// Released held messages (see `Guard::released`): each digest with the number of its
/// release, and the releases oldest first — an entry of the order whose number is not the
/// digest's current one is stale (accepted since, or released again later).
#[derive(Debug, Default)]
struct Released {
    order: VecDeque<(Digest, u64)>,
    current: HashMap<Digest, u64, Seeded>,
    next: u64,
}

impl Released {
    fn insert(&mut self, d: Digest) {
        self.next += 1;
        self.current.insert(d, self.next);
        self.order.push_back((d, self.next));
        while self.order.len() > MAX_RELEASED {
            if let Some((old, n)) = self.order.pop_front() {
                if self.current.get(&old) == Some(&n) {
                    self.current.remove(&old);
                }
            }
        }
    }
}

/// Most released held messages [`Guard`] remembers (about 50 bytes each).
const MAX_RELEASED: usize = 65_536;

/// The key under which the state holds [`Guard`]'s marks floor (the newest date among
/// retained marks evicted for room) as if it were a mark, for a client without the
/// evicted-topic table (9727dd3) which applies it to every topic: no topic's
/// [`retained_key`] is all `0xff` (that would be a BLAKE3 preimage), and a client that
/// predates the floor loads it as the mark of a topic that does not exist. A saved mark dated 0 is an
/// evicted mark's tombstone (no honest mark is dated 0): loading skips it.
pub const MARKS_FLOOR_KEY: RetainedKey = [0xff; 32];

/// How often expired high-water marks are swept (a scan of all marks).
const MARK_SWEEP_MS: u64 = 60_000;

/// What the dedup window holds of a [`DedupKey`]: the first 128 bits of
/// `BLAKE3-derive_key("whispeer client dedup digest", tree ‖ sender ‖ msg_id)`. 16 bytes
/// instead of 64 in both the set and the expiry index — a window holds one entry per message
/// for a whole horizon (7 days by default), so its size is the subscriber's memory. Two keys
/// colliding would drop the later message as a duplicate; making one collide with someone
/// else's message is a second preimage of a 128-bit hash, out of reach (and two of one's
/// own messages colliding only drops one's own).
pub type Digest = u128;

const DIGEST_CONTEXT: &str = "whispeer client dedup digest";

/// The digest the window holds for `key`.
pub fn digest(key: &DedupKey) -> Digest {
    use blake3::hazmat::HasherExt;
    // The context string hashed once, not per message (the same derive_key output).
    static CONTEXT: std::sync::OnceLock<blake3::hazmat::ContextKey> = std::sync::OnceLock::new();
    let ctx = CONTEXT.get_or_init(|| blake3::hazmat::hash_derive_key_context(DIGEST_CONTEXT));
    let mut h = blake3::Hasher::new_from_context_key(ctx);
    h.update(&key.0 .0);
    h.update(&key.1);
    h.update(&key.2);
    let mut d = [0u8; 16];
    h.finalize_xof().fill(&mut d);
    u128::from_le_bytes(d)
}

/// Shards of the dedup set, by the digest's top bits: a hash table grows by moving every
/// entry to a table twice the size in one go, which for one table of a long-running
/// subscriber's window (millions of entries) stalls the connection for that long — measured
/// with `whispeer bench --rate 10000`: latency spikes of 10–30 ms exactly when the one table
/// passed 14,336 and 28,672 entries (⅞ of 2¹⁴ and 2¹⁵). Split 1024 ways, a growth moves
/// 1/1024 of the window (an empty shard costs 48 bytes).
const SHARDS: usize = 1024;

type Shard = HashMap<Digest, u64, Seeded>;

/// The hasher of the receiver's maps keyed by BLAKE3 outputs (digests, retained keys): a
/// per-process random seed keeps their buckets unpredictable, and the keys are uniform
/// already, so SipHash's extra rounds bought nothing (it was ~1.8 % of a bench
/// subscriber's samples, one or two mark lookups per message).
type Seeded = foldhash::fast::RandomState;

/// The dedup window: digests with their expiry time, sharded, and indexed by expiry.
#[derive(Debug)]
struct Window {
    /// Seeded foldhash rather than SipHash: the keys are already uniform 128-bit digests,
    /// and SipHash was ~0.8 µs of three lookups per message.
    shards: Vec<Shard>,
    /// The digests by expiry time (Unix ms), each bucket in insertion order. Nearly every
    /// new entry expires at or after the last one (its date or now, plus the horizon), so an
    /// insert is a push onto the last bucket: measured with `whispeer bench`, a
    /// `BTreeSet<(u64, DedupKey)>` of 72-byte keys cost ~1 % of a subscriber's CPU in
    /// inserts alone.
    expiry: BTreeMap<u64, Vec<Digest>>,
    len: usize,
    /// The latest expiry time among entries forgotten for room (0: none): every forgotten
    /// message was dated at most this minus the horizon and skew.
    forgot_upto: u64,
}

impl Window {
    fn new() -> Self {
        Window {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            expiry: BTreeMap::new(),
            len: 0,
            forgot_upto: 0,
        }
    }

    fn shard(&self, d: Digest) -> &Shard {
        &self.shards[(d >> 118) as usize % SHARDS]
    }

    fn shard_mut(&mut self, d: Digest) -> &mut Shard {
        &mut self.shards[(d >> 118) as usize % SHARDS]
    }

    fn contains(&self, d: Digest) -> bool {
        self.shard(d).contains_key(&d)
    }

    /// Remembers `d` until `expires_ms` unless it is already held; whether it was new.
    fn insert_new(&mut self, d: Digest, expires_ms: u64) -> bool {
        match self.shard_mut(d).entry(d) {
            std::collections::hash_map::Entry::Occupied(_) => return false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(expires_ms);
            }
        }
        self.len += 1;
        self.push_expiry(d, expires_ms);
        true
    }

    fn push_expiry(&mut self, d: Digest, expires_ms: u64) {
        match self.expiry.last_entry() {
            Some(mut last) if *last.key() == expires_ms => last.get_mut().push(d),
            Some(mut last) if *last.key() < expires_ms => {
                // The last bucket is done (time moved on): give back what its growth
                // over-allocated, ~45 % of it at 70 messages per millisecond.
                last.get_mut().shrink_to_fit();
                self.expiry.entry(expires_ms).or_default().push(d);
            }
            _ => self.expiry.entry(expires_ms).or_default().push(d),
        }
    }

    /// Remembers `d` until `expires_ms`; the later time wins when it is already held (a
    /// restored entry met again).
    fn insert(&mut self, d: Digest, expires_ms: u64) {
        match self.shard_mut(d).entry(d) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(expires_ms);
                self.len += 1;
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let old = *o.get();
                if old >= expires_ms {
                    return;
                }
                o.insert(expires_ms);
                // Only a restored entry meets an older one of itself: rare, so a scan.
                if let Some(bucket) = self.expiry.get_mut(&old) {
                    bucket.retain(|k| *k != d);
                    if bucket.is_empty() {
                        self.expiry.remove(&old);
                    }
                }
            }
        }
        self.push_expiry(d, expires_ms);
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some(first) = self.expiry.first_entry() {
            if *first.key() > now_ms {
                break;
            }
            self.forget_first();
        }
    }

    /// Forgets `d` (a held message no subscription took: [`Guard::release`]).
    fn forget(&mut self, d: Digest) {
        let Some(exp) = self.shard_mut(d).remove(&d) else {
            return;
        };
        self.len -= 1;
        if let Some(bucket) = self.expiry.get_mut(&exp) {
            bucket.retain(|k| *k != d);
            if bucket.is_empty() {
                self.expiry.remove(&exp);
            }
        }
    }

    /// Forgets the bucket that expires first; its time.
    fn forget_first(&mut self) -> Option<u64> {
        let (at, ds) = self.expiry.pop_first()?;
        for d in ds {
            if self.shard_mut(d).remove(&d).is_some() {
                self.len -= 1;
            }
        }
        Some(at)
    }

    /// Brings every expiry later than `max` down to `max` (restored state, see
    /// `Guard::settle_restored`); how many moved.
    fn clamp_expiry(&mut self, max: u64) -> u64 {
        let Some(after) = max.checked_add(1) else {
            return 0;
        };
        let later = self.expiry.split_off(&after);
        let mut n = 0;
        for d in later.into_values().flatten() {
            if let Some(exp) = self.shard_mut(d).get_mut(&d) {
                *exp = max;
            }
            self.push_expiry(d, max);
            n += 1;
        }
        n
    }

    /// Forgets the entries that expire first until at most `max` remain (whole buckets:
    /// at most a millisecond's worth more), moving the window's start past them.
    fn make_room(&mut self, max: usize) {
        while self.len > max {
            match self.forget_first() {
                Some(at) => self.forgot_upto = self.forgot_upto.max(at),
                None => break,
            }
        }
    }
}

/// The dedup key of a candidate.
pub fn dedup_key(c: &Candidate<'_>) -> DedupKey {
    key_of(c.tree, c.sender.as_ref(), c.msg_id)
}

/// The dedup key of a message of `tree` from `sender` (zeros: unsigned) with id `msg_id`.
pub fn key_of(tree: TreeId, sender: Option<&SenderId>, msg_id: [u8; 16]) -> DedupKey {
    (
        tree,
        sender.map(|s| s.to_bytes()).unwrap_or([0; 32]),
        msg_id,
    )
}

/// A message's dedup [`digest`] and its topic's [`retained_key`], both BLAKE3: computed
/// once per message, by an open job on its worker thread where there is one.
pub fn keys_of(
    tree: &TreeId,
    sender: Option<&SenderId>,
    msg_id: &[u8; 16],
    topic: &Topic,
) -> (Digest, RetainedKey) {
    let key = (
        *tree,
        sender.map(|s| s.to_bytes()).unwrap_or([0; 32]),
        *msg_id,
    );
    (digest(&key), retained_key(tree, topic))
}

/// The key of `(tree, topic)`'s high-water mark:
/// `BLAKE3-derive_key("whispeer client retained high-water mark", tree ‖ topic)`.
pub fn retained_key(tree: &TreeId, topic: &Topic) -> RetainedKey {
    use blake3::hazmat::HasherExt;
    // Computed for every message (each moves its topic's mark): the context hashed once.
    static CONTEXT: std::sync::OnceLock<blake3::hazmat::ContextKey> = std::sync::OnceLock::new();
    let ctx = CONTEXT.get_or_init(|| {
        blake3::hazmat::hash_derive_key_context("whispeer client retained high-water mark")
    });
    let mut h = blake3::Hasher::new_from_context_key(ctx);
    h.update(&tree.0);
    h.update(topic.as_str().as_bytes());
    *h.finalize().as_bytes()
}

/// Whether message `(ts, id)` is newer than mark `(mts, mid)` (the same total order the
/// rollback check uses: by time, then by id).
fn newer(ts: u64, id: &[u8; 16], mts: u64, mid: &[u8; 16]) -> bool {
    ts > mts || (ts == mts && id > mid)
}

impl Guard {
    /// Empty state with these limits.
    pub fn new(cfg: ReceiveConfig) -> Self {
        Guard {
            cfg,
            seen: Window::new(),
            retained: HashMap::default(),
            saved_marks: HashMap::default(),
            next_mark_sweep: 0,
            marks_floor: 0,
            legacy_floor: 0,
            foreign_floor: 0,
            evicted: Evicted::default(),
            unsettled: false,
            stats: RefusedStats::default(),
            journal: Vec::new(),
            held: HashMap::default(),
            released: Default::default(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &ReceiveConfig {
        &self.cfg
    }

    /// Whether `key` is in the dedup window.
    pub fn is_seen(&self, key: &DedupKey) -> bool {
        self.seen.contains(digest(key))
    }

    /// Whether the message of digest `d` is in the dedup window (delivered, or held for
    /// subscriptions that must take it).
    pub fn is_seen_digest(&self, d: Digest) -> bool {
        self.seen.contains(d)
    }

    /// Refusals so far (duplicates are counted by the caller).
    pub fn stats(&self) -> &RefusedStats {
        &self.stats
    }

    /// Dedup entries held now.
    pub fn seen_len(&self) -> usize {
        self.seen.len
    }

    /// Loads a persisted dedup entry (ignored once expired; an expiry later than this
    /// client could have set by `now_ms` is clamped, see [`Guard::restore_forgot_upto`]).
    pub fn restore_seen(&mut self, key: DedupKey, expires_ms: u64, now_ms: u64) {
        self.restore_digest(digest(&key), expires_ms, now_ms);
    }

    /// The latest dedup expiry (and window start) an honest run can have written by
    /// `now_ms`: an entry expires at `max(ts, then) + horizon + skew` with `ts <= then +
    /// skew` and `then <= now`.
    fn latest_expiry(&self, now_ms: u64) -> u64 {
        now_ms
            .saturating_add(self.cfg.horizon_ms)
            .saturating_add(self.cfg.max_skew_ms.saturating_mul(2))
    }

    /// The bounds restored dates are held to at `now_ms`: the latest dedup expiry and
    /// window start ([`Guard::forgot_upto`]), and the latest retained mark. A driver that
    /// keeps the state in a file may bring the file down to them too.
    pub fn restored_bounds(&self, now_ms: u64) -> (u64, u64) {
        (
            self.latest_expiry(now_ms),
            now_ms.saturating_add(self.cfg.max_skew_ms),
        )
    }

    /// Holds everything restored since the last call to the bounds of `now_ms` (review of
    /// session 27, F1): whoever can write the state file (or a browser's storage) must not
    /// be able to push the window's start, a dedup expiry or a retained mark into the
    /// future, where it would refuse — and so acknowledge and drop — every message, or
    /// every retained value of a topic, for good (compaction would keep it). Clamped, a
    /// forged window start can still refuse messages dated up to the load time plus the
    /// skew (the state is not authenticated at rest, PROTOCOL §8.1), never later ones.
    fn settle_restored(&mut self, now_ms: u64) {
        if !std::mem::take(&mut self.unsettled) {
            return;
        }
        let (max, newest) = self.restored_bounds(now_ms);
        let mut n = self.seen.clamp_expiry(max);
        if self.seen.forgot_upto > max {
            self.seen.forgot_upto = max;
            n += 1;
        }
        for m in self.retained.values_mut() {
            if m.ts_ms > newest {
                m.ts_ms = newest;
                n += 1;
            }
        }
        for f in [
            &mut self.marks_floor,
            &mut self.legacy_floor,
            &mut self.foreign_floor,
        ] {
            if *f > newest {
                *f = newest;
                n += 1;
            }
        }
        n += self.evicted.clamp(newest);
        self.stats.restored_future += n;
        // Restored marks past the bound go now that the table is whole (journaled, so
        // the saved state follows the bound).
        self.evict_marks(true);
    }

    /// The latest expiry time among dedup entries forgotten for room (0: none). Every
    /// message dated at most this minus the horizon and skew may be one of them and is
    /// refused (unless a subscription asked for older history). A driver that keeps the
    /// window in a file keeps this too (or keeps every entry until it expires): a window
    /// restored without it would accept those messages again.
    pub fn forgot_upto(&self) -> u64 {
        self.seen.forgot_upto
    }

    /// Loads a persisted [`Guard::forgot_upto`] (the later time wins). Restored state is
    /// not trusted with dates: before the next check, expiry or snapshot, a window start or
    /// dedup expiry later than `now + horizon + 2 × skew` and a retained mark later than
    /// `now + skew` are brought down to those bounds (no honest run writes later ones;
    /// counted in [`RefusedStats::restored_future`]).
    pub fn restore_forgot_upto(&mut self, t: u64) {
        self.seen.forgot_upto = self.seen.forgot_upto.max(t);
        self.unsettled = true;
    }

    /// Loads a persisted retained high-water mark (a date in the future is clamped, see
    /// [`Guard::restore_forgot_upto`]). The state file keeps a mark's date and id, not
    /// which message set it: a restored mark refuses every retained value not newer than
    /// it, and counts as a duplicate only the message the dedup window still holds (see
    /// [`Guard::check`]).
    ///
    /// The marks are bounded like the window ([`ReceiveConfig::max_entries`]): restoring
    /// more evicts the oldest (see [`RefusedStats::marks_evicted`]) once the state is
    /// loaded — at the next check or expiry, journaled — and while loading only past
    /// twice the bound. A mark dated 0 (an evicted mark's tombstone) removes the key's
    /// mark: a log replayed in order holds the marks its run held. The rows of the
    /// evicted-key table (keys starting with 19 bytes 0xff, see `Evicted`) load back into
    /// it (an entry row that replaces another key's entry inserts that key again unless a
    /// floor covers it); a table saved with another size (`max_entries` changed) has its
    /// entries inserted again and its bucket floors taken as a floor for every topic. The floor saved under [`MARKS_FLOOR_KEY`]
    /// applies to no topic if the row says the table holds its topics
    /// ([`MARKS_FLOOR_TABLE`]); written by a client without the table (message id zeros),
    /// it applies to every topic until it passes the horizon — which topics it covers was
    /// not saved. Rows of one key load in the order they were saved (the last one wins).
    pub fn restore_retained(&mut self, key: RetainedKey, ts_ms: u64, msg_id: [u8; 16]) {
        if ts_ms == 0 {
            // A tombstone: the mark was evicted (its table row came before it) — so that a
            // log replayed in order holds what the run that wrote it held, and evicts no
            // mark that run kept (review of af8162f).
            self.retained.remove(&key);
            self.saved_marks.remove(&key);
            return;
        }
        self.unsettled = true;
        if key == MARKS_FLOOR_KEY {
            self.marks_floor = self.marks_floor.max(ts_ms);
            // Written by this client (after its legacy row) or by one without the table
            // (since): the last one saved says which.
            self.foreign_floor = if msg_id == MARKS_FLOOR_TABLE {
                0
            } else {
                self.foreign_floor.max(ts_ms)
            };
            return;
        }
        if key[..19] == EVICTED_ROW_PREFIX
            && matches!(key[19], EVICTED_ENTRY | EVICTED_FLOOR | EVICTED_LEGACY)
        {
            self.restore_evicted(&key, ts_ms, msg_id);
            return;
        }
        let m = Mark {
            ts_ms,
            msg_id,
            digest: [0; 16],
        };
        let e = self.retained.entry(key).or_insert(m);
        if newer(ts_ms, &msg_id, e.ts_ms, &e.msg_id) {
            *e = m;
        }
        // Evicted once the whole state is loaded (`Guard::settle_restored`), into the
        // table as restored; before that only past twice the bound, which holds the memory
        // a state file can take (review of af8162f: evicted as each mark loaded, the
        // oldest of a replayed log went to table entries that its later rows overwrote).
        if self.retained.len() > self.max_marks().saturating_mul(2) {
            self.evict_marks(false);
        }
    }

    /// Loads a row of the evicted-key table (see [`Guard::restore_retained`]).
    fn restore_evicted(&mut self, key: &RetainedKey, ts_ms: u64, msg_id: [u8; 16]) {
        let mut b = [0u8; 4];
        b.copy_from_slice(&key[20..24]);
        let saved = u32::from_be_bytes(b) as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[24..]);
        let index = u64::from_be_bytes(b);
        b.copy_from_slice(&msg_id[..8]);
        let id = u64::from_le_bytes(b);
        let buckets = Evicted::buckets_for(self.cfg.max_entries);
        self.evicted.allocate(buckets);
        let same = saved == buckets;
        match key[19] {
            EVICTED_ENTRY if id == 0 => {}
            EVICTED_ENTRY if same && index < self.evicted.entries.len() as u64 => {
                // The row's last saved value (an entry taken over by another key is
                // saved again under the same row). The key it displaces is inserted
                // again unless a floor covers it already: the run that saved the row
                // folded it into a floor (whose row may come later), or forgot it past
                // the horizon, but a key this load put there itself — a mark evicted
                // while loading — was never in that run's table (review of af8162f).
                let e = &mut self.evicted.entries[index as usize];
                let old = *e;
                *e = if old.0 == id {
                    (id, old.1.max(ts_ms))
                } else {
                    (id, ts_ms)
                };
                if old.0 != 0 && old.0 != id && self.evicted.floor_of(old.0) < old.1 {
                    self.evicted.insert(old.0, old.1, &mut Vec::new());
                }
            }
            EVICTED_ENTRY => self.evicted.insert(id, ts_ms, &mut Vec::new()),
            EVICTED_FLOOR if same && index < buckets as u64 => {
                let f = &mut self.evicted.floors[index as usize];
                *f = (*f).max(ts_ms);
            }
            // A floor of a table of another size (which topics it covers is not known
            // here), or the floor for every topic.
            _ => self.legacy_floor = self.legacy_floor.max(ts_ms),
        }
    }

    /// The newest date at or before which a retained value on topic `rk` may be one
    /// whose mark was evicted (0: none): held to the window's start.
    fn evicted_floor(&self, rk: &RetainedKey) -> u64 {
        self.legacy().max(self.evicted.floor_of(evicted_id(rk)))
    }

    /// The floor for every topic (see `Guard::legacy_floor`).
    fn legacy(&self) -> u64 {
        self.legacy_floor.max(self.foreign_floor)
    }

    /// The saved rows of the floors (dates at most `newest`): the floor for every topic
    /// under [`EVICTED_LEGACY`] if there is one, then [`MARKS_FLOOR_KEY`]'s (the newest
    /// evicted date or that floor, for a client without the table; marked
    /// [`MARKS_FLOOR_TABLE`]: this client reads its legacy row instead).
    fn floor_rows(&self, newest: u64) -> impl Iterator<Item = (RetainedKey, u64, [u8; 16])> {
        let legacy = self.legacy().min(newest);
        let floor = self.marks_floor.max(legacy).min(newest);
        let legacy = (legacy > 0).then_some((evicted_row(EVICTED_LEGACY, 0, 0), legacy, [0; 16]));
        legacy
            .into_iter()
            .chain((floor > 0).then_some((MARKS_FLOOR_KEY, floor, MARKS_FLOOR_TABLE)))
    }

    /// The most retained high-water marks held: [`ReceiveConfig::max_entries`], as many
    /// as the dedup window holds messages.
    fn max_marks(&self) -> usize {
        self.cfg.max_entries.max(1)
    }

    /// Review of session 28, F2: the marks were unbounded — a member with a grant for
    /// `p/#` publishing one message on each of millions of topics `p/<random>` grew every
    /// subscriber's memory and state by one mark each, for the horizon. Past
    /// [`Guard::max_marks`] the oldest marks (by date) go — a few more than needed
    /// (1/64 of the bound), so that the scan that finds them (every mark) is rare — and
    /// each goes into the evicted-key table (`Evicted`) with its date: a retained value on
    /// its topic dated at most that is held to the window's start (it may be the evicted
    /// mark's message: the mark no longer refuses it as a duplicate), and the window
    /// refuses it while it holds it. Review of 9727dd3 (B1): that rule held every topic,
    /// one floor for all — a new retained subscription to more topics than the bound, sent
    /// their values in topic order, missed the old values of topics never evicted. What an
    /// evicted mark gives up is the rollback check of its topic: a retained value older
    /// than its last one but within the window's reach is accepted (or, delivered before,
    /// shown again to a new subscription) — never delivered twice. Counted in
    /// [`RefusedStats::marks_evicted`]; `journal`: the table's changed rows, then the
    /// tombstones (the mark dated 0; after the rows, so a saved state cut short never has
    /// a tombstone without its row) and the floor row go to the journal, so a saved table
    /// follows the bound.
    fn evict_marks(&mut self, journal: bool) {
        let cap = self.max_marks();
        let len = self.retained.len();
        if len <= cap {
            return;
        }
        let n = len - cap + cap / 64;
        let mut dates: Vec<u64> = self.retained.values().map(|m| m.ts_ms).collect();
        let (below, &mut cut, _) = dates.select_nth_unstable(n - 1);
        let mut at_cut = n - below.iter().filter(|&&t| t < cut).count();
        drop(dates);
        let mut gone = Vec::with_capacity(n);
        let saved = &mut self.saved_marks;
        self.retained.retain(|k, m| {
            let evict = m.ts_ms < cut || (m.ts_ms == cut && at_cut > 0);
            if m.ts_ms == cut && evict {
                at_cut -= 1;
            }
            if evict {
                // A mark a held message moved goes into the table with the date saved for
                // its topic (`saved_marks`; none saved, none), as the journal and snapshot
                // hold it: with the held message's date, after a crash the relay's copy
                // of that message (never taken) was held to the window's start — refused
                // `BeforeWindow` by a full window — and the tombstone deleted the saved mark.
                let ts = if saved.is_empty() {
                    Some(m.ts_ms)
                } else {
                    saved
                        .remove(k)
                        .unwrap_or(Some((m.ts_ms, m.msg_id)))
                        .map(|(ts, _)| ts)
                };
                gone.push((*k, ts));
            }
            !evict
        });
        self.marks_floor = self.marks_floor.max(cut);
        self.stats.marks_evicted += n as u64;
        self.evicted
            .allocate(Evicted::buckets_for(self.cfg.max_entries));
        let mut changed = Vec::new();
        for &(k, ts) in &gone {
            if let Some(ts) = ts {
                self.evicted.insert(evicted_id(&k), ts, &mut changed);
            }
        }
        if journal {
            changed.sort_unstable();
            changed.dedup();
            for r in changed {
                let (key, ts_ms, msg_id) = self.evicted.row(r);
                self.journal.push(Change::Retained { key, ts_ms, msg_id });
            }
            self.journal
                .extend(gone.into_iter().map(|(key, _)| Change::Retained {
                    key,
                    ts_ms: 0,
                    msg_id: [0; 16],
                }));
            for (key, ts_ms, msg_id) in self.floor_rows(u64::MAX) {
                self.journal.push(Change::Retained { key, ts_ms, msg_id });
            }
        }
    }

    /// Loads a dedup entry saved as its digest (a [`Snapshot`]; ignored once expired; an
    /// expiry later than this client could have set by `now_ms` is clamped, see
    /// [`Guard::restore_forgot_upto`]).
    pub fn restore_digest(&mut self, d: Digest, expires_ms: u64, now_ms: u64) {
        if expires_ms > now_ms {
            let max = self.latest_expiry(now_ms);
            if expires_ms > max {
                self.stats.restored_future += 1;
            }
            self.seen.insert(d, expires_ms.min(max));
            self.seen.make_room(self.cfg.max_entries);
        }
    }

    /// The whole persisted state at `now_ms` (what a compacted state file holds): the dedup
    /// entries not expired, as digests by expiry — the window keeps no full keys, see
    /// [`Digest`] — and every retained high-water mark. Dates restored from a state file
    /// are written back within the bounds of [`Guard::restore_forgot_upto`] even before
    /// the first check has settled them, so compaction never keeps a forged future.
    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let (max, newest) = self.restored_bounds(now_ms);
        let after = now_ms
            .checked_add(1)
            .map_or(self.seen.expiry.range(0..0), |t| {
                self.seen.expiry.range(t..)
            });
        Snapshot {
            // Held messages no subscription took yet are left out: after a restart the
            // relay's redelivery of them must be accepted.
            seen: after
                .flat_map(|(&exp, ds)| ds.iter().map(move |&d| (d, exp.min(max))))
                .filter(|(d, _)| !self.held.contains_key(d))
                .collect(),
            // A mark a held message moved is saved as it was before (`saved_marks`).
            retained: self
                .retained
                .iter()
                .filter_map(|(k, m)| match self.saved_marks.get(k) {
                    None => Some((*k, m.ts_ms, m.msg_id)),
                    Some(saved) => saved.map(|(ts, id)| (*k, ts, id)),
                })
                .map(|(k, ts, id)| (k, ts.min(newest), id))
                .chain(
                    self.evicted
                        .rows()
                        .map(|(k, ts, id)| (k, ts.min(newest), id)),
                )
                .chain(self.floor_rows(newest))
                .collect(),
            forgot_upto: self.seen.forgot_upto.min(max),
        }
    }

    /// Changes since the last call, for the driver to persist.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.journal)
    }

    /// Forgets the changes since the last call (a driver that persists nothing), keeping
    /// the journal's buffer: taking it instead left an empty one to regrow for every batch
    /// of deliveries (1.2 % of a bench subscriber's CPU).
    pub fn clear_changes(&mut self) {
        self.journal.clear();
    }

    /// Whether a message dated `ts_ms` may be one the window forgot for room.
    fn forgotten(&self, ts_ms: u64) -> bool {
        self.seen.forgot_upto > 0
            && ts_ms
                .saturating_add(self.cfg.horizon_ms)
                .saturating_add(self.cfg.max_skew_ms)
                <= self.seen.forgot_upto
    }

    /// The oldest date (Unix ms) the dedup window still covers at `now_ms`: the horizon's
    /// start, or later once the window reached [`ReceiveConfig::max_entries`]. Older
    /// messages go only to subscriptions that asked for older history.
    pub fn window_start_ms(&self, now_ms: u64) -> u64 {
        let horizon = now_ms.saturating_sub(self.cfg.horizon_ms);
        if self.seen.forgot_upto == 0 {
            return horizon;
        }
        let forgot = self
            .seen
            .forgot_upto
            .min(self.latest_expiry(now_ms))
            .saturating_sub(self.cfg.horizon_ms)
            .saturating_sub(self.cfg.max_skew_ms)
            .saturating_add(1);
        horizon.max(forgot)
    }

    /// Forgets dedup entries whose time is up (and, now and then, high-water marks dated
    /// before the horizon: a message that old is refused unless a subscription asked for
    /// older history, which gives up replay protection past the horizon anyway).
    pub fn expire(&mut self, now_ms: u64) {
        self.settle_restored(now_ms);
        self.seen.expire(now_ms);
        if now_ms >= self.next_mark_sweep {
            self.next_mark_sweep = now_ms.saturating_add(MARK_SWEEP_MS);
            let keep = self.cfg.horizon_ms.saturating_add(self.cfg.max_skew_ms);
            self.retained
                .retain(|_, m| m.ts_ms.saturating_add(keep) > now_ms);
            let marks = &self.retained;
            self.saved_marks.retain(|k, _| marks.contains_key(k));
            // Every value they cover is before the horizon now.
            let before = now_ms.saturating_sub(keep).saturating_add(1);
            self.evicted.expire(before);
            for f in [
                &mut self.marks_floor,
                &mut self.legacy_floor,
                &mut self.foreign_floor,
            ] {
                if *f < before {
                    *f = 0;
                }
            }
        }
    }

    /// High-water marks held now.
    pub fn marks_len(&self) -> usize {
        self.retained.len()
    }

    /// Runs every check; on success returns what [`Guard::commit`] records.
    pub fn check(&mut self, c: &Candidate<'_>, now_ms: u64) -> Result<Accepted, Refusal> {
        self.settle_restored(now_ms);
        let r = self.check_inner(c, now_ms);
        if let Err(why) = r {
            let s = &mut self.stats;
            match why {
                Refusal::Duplicate => {}
                Refusal::BeforeHorizon => s.before_horizon += 1,
                Refusal::BeforeWindow => s.before_window += 1,
                Refusal::Future => s.future += 1,
                Refusal::StaleLive => s.stale_live += 1,
                Refusal::RetainedRollback => s.retained_rollback += 1,
                Refusal::Unsigned => s.unsigned += 1,
                Refusal::UnlistedSender => s.unlisted_sender += 1,
            }
        }
        r
    }

    fn check_inner(&mut self, c: &Candidate<'_>, now_ms: u64) -> Result<Accepted, Refusal> {
        // Publisher policy first: it does not depend on time.
        for (filter, p) in &self.cfg.policies {
            if !filter.matches(c.topic) {
                continue;
            }
            if (p.require_signed || p.allow_senders.is_some()) && c.sender.is_none() {
                return Err(Refusal::Unsigned);
            }
            if let (Some(list), Some(s)) = (&p.allow_senders, &c.sender) {
                if !list.contains(s) {
                    return Err(Refusal::UnlistedSender);
                }
            }
        }
        let skew = self.cfg.max_skew_ms;
        if c.ts_ms > now_ms.saturating_add(skew) {
            return Err(Refusal::Future);
        }
        let retained = c.flags & msg_flags::RETAINED != 0;
        let live =
            c.flags & (msg_flags::RETAINED | msg_flags::REDELIVERED | msg_flags::REPLAYED) == 0;
        if live && c.ts_ms < now_ms.saturating_sub(skew) {
            return Err(Refusal::StaleLive);
        }
        if !c.allow_old && c.ts_ms < now_ms.saturating_sub(self.cfg.horizon_ms) {
            return Err(Refusal::BeforeHorizon);
        }
        let key = dedup_key(c);
        // Remembered at least a horizon from now (and from its date): once forgotten, the
        // horizon check refuses it.
        let expires_ms = c
            .ts_ms
            .max(now_ms)
            .saturating_add(self.cfg.horizon_ms)
            .saturating_add(skew);
        let (d, rk) = c
            .keys
            .unwrap_or_else(|| (digest(&key), retained_key(&c.tree, c.topic)));
        if retained {
            // A retained value is the topic's current value: never one older than the
            // newest message accepted for the topic, live or retained (the relay sets the
            // flag, and anyone may re-post a captured envelope with `RETAIN`).
            if let Some(m) = self.retained.get(&rk) {
                if newer(m.ts_ms, &m.msg_id, c.ts_ms, &c.msg_id) {
                    return Err(Refusal::RetainedRollback);
                }
                if (m.ts_ms, m.msg_id) == (c.ts_ms, c.msg_id) {
                    // The very message that set the mark (only `commit` sets it):
                    // delivered, even once its dedup entry is gone to make room (the
                    // window's start does not hold retained values back, so nothing else
                    // would refuse it).
                    if m.is(d) {
                        return Err(Refusal::Duplicate);
                    }
                    // The mark's date and id but not known to be its message: another
                    // sender's message copying both (anyone who can write the topic can
                    // sign one), or a mark restored without its digest. A message the
                    // window holds is a duplicate (below); any other is no newer than the
                    // mark, and never passes as the message that set it.
                    if !self.seen.contains(d) {
                        return Err(Refusal::RetainedRollback);
                    }
                }
            }
        }
        let mut released = false;
        if !c.allow_old
            && self.forgotten(c.ts_ms)
            && (!retained || c.ts_ms <= self.evicted_floor(&rk))
        {
            // Retained values are not held to the window's start: the high-water mark
            // already keeps them from moving backwards, and the current value may be old —
            // unless dated at most the date its topic's evicted mark had (the evicted-key
            // table's, see `Guard::evict_marks`): it may be that mark's message.
            if !self.released.current.contains_key(&d) {
                return Err(Refusal::BeforeWindow);
            }
            released = true;
        }
        if self.seen.contains(d) {
            // Retained or not: showing the current value again to a new subscription is
            // the client core's decision (per subscription, once), not the window's.
            return Err(Refusal::Duplicate);
        }
        Ok(Accepted {
            key,
            digest: d,
            expires_ms,
            mark: (rk, c.ts_ms, c.msg_id),
            released,
        })
    }

    /// Records an accepted message's id only, not its date (its topic's high-water mark
    /// stays where it is): for an authentic message that was not delivered after all (its
    /// payload is over the cap or does not decompress), so a replay of it is a duplicate
    /// instead of costing its decompression again.
    pub fn remember(&mut self, a: Accepted) {
        if self.seen.insert_new(a.digest, a.expires_ms) {
            self.seen.make_room(self.cfg.max_entries);
            self.journal.push(Change::Seen {
                key: a.key,
                expires_ms: a.expires_ms,
            });
        }
    }

    /// Records an accepted message as delivered.
    pub fn commit(&mut self, a: Accepted) {
        self.apply(&a);
        self.journal_of(&a);
    }

    /// Records an accepted message as delivered in memory only, for subscriptions that
    /// must take it (at least once): a copy of it is a duplicate from now on, but the
    /// journal learns of it only at [`Guard::settle`] (one took it), and [`Guard::release`]
    /// by each of the `holders` [`Guard::hold_by`] counts forgets it again.
    ///
    /// A window at its capacity (`max_entries`) forgets its oldest entries, held ones too,
    /// and moves its start past them; a message forgotten so while held and then released
    /// untaken is still accepted when it comes again (`released`), where any other message
    /// that old is refused (`BeforeWindow`). After a restart that exception is gone: a
    /// window full enough to forget a message while it waits in a queue (millions within
    /// the horizon) is a limit of the persisted state too.
    pub fn hold(&mut self, a: Accepted) {
        let (rk, ts, id) = a.mark;
        let before = self.retained.get(&rk).map(|m| (m.ts_ms, m.msg_id));
        self.apply(&a);
        // Moved the mark: the saved one stays where it was until a message this new is
        // delivered for good (`Guard::journal_of`).
        let moved = before.is_none_or(|(mts, mid)| newer(ts, &id, mts, &mid));
        if moved && self.retained.contains_key(&rk) {
            self.saved_marks.entry(rk).or_insert(before);
        }
        // Held already (forgotten for room meanwhile, and accepted again): its holders stay.
        self.held.entry(a.digest).or_insert((a, 0));
    }

    /// `n` more subscriptions hold the message `d` untaken (a held message's history
    /// copy handed to another subscription counts too). Settled at once when nothing
    /// holds it.
    pub fn hold_by(&mut self, d: Digest, n: usize) {
        match self.held.get_mut(&d) {
            Some((_, holders)) if *holders + n > 0 => *holders += n,
            Some(_) => self.settle(d),
            None => {}
        }
    }

    /// Whether message `d` is held: handed to subscriptions, taken by none yet.
    pub fn is_held(&self, d: Digest) -> bool {
        self.held.contains_key(&d)
    }

    /// Whether the window holds message `d` as delivered or held (a restored owed message
    /// counts only while it does: once forgotten, its redelivery is accepted or refused by
    /// its date like any other).
    pub fn remembers(&self, d: Digest) -> bool {
        self.seen.contains(d)
    }

    /// A subscription took held message `d`: it is delivered for good (journalled).
    pub fn settle(&mut self, d: Digest) {
        if let Some((a, _)) = self.held.remove(&d) {
            self.journal_of(&a);
        }
    }

    /// A subscription that held message `d` went away without taking it: once none is
    /// left, the window forgets it (its topic's high-water mark stays: a retained copy is
    /// shown again per subscription, see the client core).
    pub fn release(&mut self, d: Digest) {
        let Some((_, holders)) = self.held.get_mut(&d) else {
            return;
        };
        *holders = holders.saturating_sub(1);
        if *holders == 0 {
            self.held.remove(&d);
            self.seen.forget(d);
            self.released.insert(d);
        }
    }

    fn apply(&mut self, a: &Accepted) {
        // Accepted again: no longer an exception (its place in the order goes with the
        // order's bound).
        if !self.released.current.is_empty() {
            self.released.current.remove(&a.digest);
        }
        if self.seen.insert_new(a.digest, a.expires_ms) {
            self.seen.make_room(self.cfg.max_entries);
        }
        let (rk, ts, id) = a.mark;
        let mark = Mark {
            ts_ms: ts,
            msg_id: id,
            digest: a.digest.to_le_bytes(),
        };
        match self.retained.get_mut(&rk) {
            Some(m) if !newer(ts, &id, m.ts_ms, &m.msg_id) => {}
            Some(m) => *m = mark,
            None => {
                self.retained.insert(rk, mark);
                self.evict_marks(true);
            }
        }
    }

    /// The journal entries of a message delivered for good: its dedup entry, and its
    /// topic's saved mark — the newest of this message and the topic's messages delivered
    /// for good before (a newer one taken first: a saved mark never moves backwards, and
    /// a driver keeping a table by key keeps the last one). Never a held message's mark
    /// (see `Guard::saved_marks`): saved, it would refuse that message's retained value
    /// after a restart although no subscription took it. Once the saved mark reaches the
    /// topic's mark in memory, the two are one again.
    fn journal_of(&mut self, a: &Accepted) {
        self.journal.push(Change::Seen {
            key: a.key,
            expires_ms: a.expires_ms,
        });
        let (rk, ts, id) = a.mark;
        let Some(&m) = self.retained.get(&rk) else {
            return;
        };
        let (ts_ms, msg_id) = match self.saved_marks.get_mut(&rk) {
            None => (m.ts_ms, m.msg_id),
            Some(saved) => {
                let s = match *saved {
                    Some((sts, sid)) if !newer(ts, &id, sts, &sid) => (sts, sid),
                    _ => (ts, id),
                };
                if newer(m.ts_ms, &m.msg_id, s.0, &s.1) {
                    *saved = Some(s);
                    s
                } else {
                    self.saved_marks.remove(&rk);
                    (m.ts_ms, m.msg_id)
                }
            }
        };
        self.journal.push(Change::Retained {
            key: rk,
            ts_ms,
            msg_id,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;
    use whispeer_protocol::Identity;

    /// Digests are persisted (the state file's dedup window): the precomputed context key
    /// gives exactly BLAKE3's derive_key mode with the context string.
    #[test]
    fn the_dedup_digest_is_derive_key_of_tree_sender_and_id() {
        let key: DedupKey = (TreeId([3; 16]), [4; 32], [5; 16]);
        let mut h = blake3::Hasher::new_derive_key("whispeer client dedup digest");
        h.update(&[3; 16]).update(&[4; 32]).update(&[5; 16]);
        let mut d = [0u8; 16];
        h.finalize_xof().fill(&mut d);
        assert_eq!(digest(&key), u128::from_le_bytes(d));
        assert_ne!(digest(&(TreeId([3; 16]), [4; 32], [6; 16])), digest(&key));
    }

    /// The retained mark's key is saved in client state (PROTOCOL §4.11): pinned to
    /// BLAKE3-derive_key("whispeer client retained high-water mark", tree_id ‖ topic) as
    /// the plain API computes it (the code uses a precomputed context key), so a change to
    /// its derivation cannot silently orphan every saved mark.
    #[test]
    fn the_retained_key_is_derive_key_of_tree_and_topic() {
        let t = Topic::new("a/b").unwrap();
        let mut h = blake3::Hasher::new_derive_key("whispeer client retained high-water mark");
        h.update(&[3; 16]).update(b"a/b");
        assert_eq!(retained_key(&TreeId([3; 16]), &t), *h.finalize().as_bytes());
        assert_ne!(
            retained_key(&TreeId([4; 16]), &t),
            retained_key(&TreeId([3; 16]), &t)
        );
    }

    const NOW: u64 = 1_800_000_000_000;

    /// What an open job computes on its worker is what the checks would compute.
    #[test]
    fn precomputed_keys_are_the_digest_and_the_retained_key() {
        let t = Topic::new("a/b").unwrap();
        let c = cand(&t, 5, NOW, 0);
        assert_eq!(
            keys_of(&c.tree, c.sender.as_ref(), &c.msg_id, c.topic),
            (digest(&dedup_key(&c)), retained_key(&c.tree, &t))
        );
    }

    fn cand<'a>(topic: &'a Topic, id: u8, ts: u64, flags: u64) -> Candidate<'a> {
        Candidate {
            tree: TreeId([1; 16]),
            topic,
            sender: None,
            msg_id: [id; 16],
            ts_ms: ts,
            flags,
            allow_old: false,
            keys: None,
        }
    }

    /// A held message (handed to at-least-once subscriptions, taken by none yet) is a
    /// duplicate while held, but neither journalled nor in a snapshot (a crash forgets it);
    /// settled by a take it is journalled; released by its last holder it is forgotten, so
    /// the relay's redelivery is accepted again.
    #[test]
    fn held_messages_are_persisted_only_once_taken_and_forgotten_when_dropped() {
        let t = Topic::new("a/b").unwrap();
        let mut g = Guard::new(ReceiveConfig::default());
        let a = g.check(&cand(&t, 1, NOW, 0), NOW).unwrap();
        let d = a.digest();
        g.hold(a);
        g.hold_by(d, 2);
        assert_eq!(
            g.check(&cand(&t, 1, NOW, msg_flags::REDELIVERED), NOW)
                .unwrap_err(),
            Refusal::Duplicate
        );
        assert!(g.take_changes().is_empty(), "nothing journalled while held");
        assert!(g.snapshot(NOW).seen.is_empty(), "nor in a snapshot");
        g.release(d);
        assert!(g.is_held(d), "one holder is left");
        g.release(d);
        assert!(!g.is_held(d));
        let again = g.check(&cand(&t, 1, NOW, msg_flags::REDELIVERED), NOW);
        assert!(again.is_ok(), "dropped untaken: accepted again: {again:?}");

        // Taken by one holder: journalled (entry and mark) and kept after the other drops.
        let a = again.unwrap();
        let d = a.digest();
        g.hold(a);
        g.hold_by(d, 2);
        g.settle(d);
        let changes = g.take_changes();
        assert!(matches!(changes[0], Change::Seen { .. }), "{changes:?}");
        assert!(matches!(changes[1], Change::Retained { .. }), "{changes:?}");
        g.release(d);
        assert_eq!(
            g.check(&cand(&t, 1, NOW, msg_flags::REDELIVERED), NOW)
                .unwrap_err(),
            Refusal::Duplicate
        );
        assert_eq!(g.snapshot(NOW).seen.len(), 1);

        // Held by nobody at all: delivered at once.
        let b = g.check(&cand(&t, 2, NOW, 0), NOW).unwrap();
        let db = b.digest();
        g.hold(b);
        g.hold_by(db, 0);
        assert!(!g.is_held(db));
        assert_eq!(g.take_changes().len(), 2);
        assert_eq!(g.seen_len(), 2);
    }

    /// Review finding: a held message that sat untaken while a full window forgot it for
    /// room (its start moving past the message's date) and was then let go by every
    /// holder is accepted when the relay delivers it again — not refused `BeforeWindow`
    /// (lost). Once accepted again it is a duplicate like any other.
    #[test]
    fn a_released_message_the_full_window_forgot_is_accepted_again() {
        let t = Topic::new("a/b").unwrap();
        let mut g = Guard::new(ReceiveConfig {
            max_entries: 4,
            ..ReceiveConfig::default()
        });
        let held = g.check(&cand(&t, 1, NOW, 0), NOW).unwrap();
        let d = held.digest();
        g.hold(held);
        g.hold_by(d, 1);
        for id in 2..12 {
            let a = g.check(&cand(&t, id, NOW + u64::from(id), 0), NOW).unwrap();
            g.commit(a);
        }
        let again = cand(&t, 1, NOW, msg_flags::REDELIVERED);
        assert_eq!(
            g.check(&again, NOW).unwrap_err(),
            Refusal::BeforeWindow,
            "forgotten for room while held"
        );
        g.release(d);
        let a = g.check(&again, NOW).expect("released: accepted again");
        g.commit(a);
        assert!(g.check(&again, NOW).is_err(), "then a duplicate");
        // Another message that old, never held, is still refused.
        assert_eq!(
            g.check(&cand(&t, 99, NOW, msg_flags::REDELIVERED), NOW)
                .unwrap_err(),
            Refusal::BeforeWindow
        );
    }

    /// Two messages of a topic held: the journal records the mark of what was taken —
    /// never a held message's, which would refuse that message after a restart (see
    /// `a_value_held_untaken_at_a_crash_is_accepted_after_the_restart`) — and never moves
    /// it backwards: the newer taken first, taking the older one journals the newer's.
    #[test]
    fn a_taken_message_journals_the_newest_taken_mark_of_its_topic() {
        let t = Topic::new("a/b").unwrap();
        let marks = |changes: Vec<Change>| -> Vec<(u64, [u8; 16])> {
            changes
                .into_iter()
                .filter_map(|c| match c {
                    Change::Retained { ts_ms, msg_id, .. } => Some((ts_ms, msg_id)),
                    _ => None,
                })
                .collect()
        };
        let mut g = Guard::new(ReceiveConfig::default());
        let m1 = g.check(&cand(&t, 1, NOW, 0), NOW).unwrap();
        let d1 = m1.digest();
        g.hold(m1);
        g.hold_by(d1, 1);
        let m2 = g.check(&cand(&t, 2, NOW + 5, 0), NOW).unwrap();
        let d2 = m2.digest();
        g.hold(m2);
        g.hold_by(d2, 1);
        g.settle(d1);
        assert_eq!(marks(g.take_changes()), vec![(NOW, [1; 16])]);
        let snap = g.snapshot(NOW);
        assert_eq!(
            snap.retained,
            vec![(retained_key(&TreeId([1; 16]), &t), NOW, [1; 16])]
        );
        // Memory still refuses what is older than the held one.
        let between = cand(&t, 9, NOW + 2, msg_flags::RETAINED);
        assert_eq!(
            g.check(&between, NOW).unwrap_err(),
            Refusal::RetainedRollback
        );
        g.settle(d2);
        assert_eq!(marks(g.take_changes()), vec![(NOW + 5, [2; 16])]);
        assert_eq!(g.snapshot(NOW).retained[0].1, NOW + 5);
        // A second hold of a held message keeps its holders (it is not reset to none).
        let m3 = g.check(&cand(&t, 3, NOW + 6, 0), NOW).unwrap();
        let d3 = m3.digest();
        g.hold(m3);
        g.hold_by(d3, 1);
        g.hold(m3);
        g.release(d3);
        assert!(!g.is_held(d3), "one holder, released once");
        assert_eq!(g.snapshot(NOW).retained[0].1, NOW + 5, "released untaken");
        // Newer taken first: taking the older one journals the newer's mark.
        let m4 = g.check(&cand(&t, 4, NOW + 7, 0), NOW).unwrap();
        let m5 = g.check(&cand(&t, 5, NOW + 8, 0), NOW).unwrap();
        let (d4, d5) = (m4.digest(), m5.digest());
        for (m, d) in [(m4, d4), (m5, d5)] {
            g.hold(m);
            g.hold_by(d, 1);
        }
        g.settle(d5);
        g.settle(d4);
        assert_eq!(
            marks(g.take_changes()),
            vec![(NOW + 8, [5; 16]), (NOW + 8, [5; 16])]
        );
        assert_eq!(g.snapshot(NOW).retained[0].1, NOW + 8);
    }

    /// Review finding: a retained value still held untaken at a crash was refused after
    /// the restart and never shown. The publisher sets m0 then m (both live, held by a
    /// QoS 1 subscription); the app takes m0 only; the process dies. The saved state —
    /// journal or snapshot — holds m0's entry and mark, not m's mark (which, restored
    /// without m's digest, refused m as a rollback): the relay's retained m is the
    /// topic's current value to the restarted client. m0 stays a duplicate, and a
    /// re-posted older value is still refused as a rollback.
    #[test]
    fn a_value_held_untaken_at_a_crash_is_accepted_after_the_restart() {
        let t = Topic::new("a/b").unwrap();
        let mut g = Guard::new(ReceiveConfig::default());
        let old = g.check(&cand(&t, 7, NOW - 10, 0), NOW).unwrap();
        g.commit(old);
        let m0 = g.check(&cand(&t, 1, NOW, 0), NOW).unwrap();
        let m = g.check(&cand(&t, 2, NOW + 5, 0), NOW).unwrap();
        let (d0, d) = (m0.digest(), m.digest());
        for (a, d) in [(m0, d0), (m, d)] {
            g.hold(a);
            g.hold_by(d, 1);
        }
        g.settle(d0);
        let changes = g.take_changes();
        let snap = g.snapshot(NOW);
        // Restored from the journal (replayed in order, as the state file keeps it) and
        // from a snapshot (a compacted file).
        let from_journal = |mut h: Guard| {
            for c in &changes {
                match *c {
                    Change::Seen { key, expires_ms } => h.restore_seen(key, expires_ms, NOW),
                    Change::Retained { key, ts_ms, msg_id } => {
                        h.restore_retained(key, ts_ms, msg_id)
                    }
                    _ => {}
                }
            }
            h
        };
        let from_snapshot = |mut h: Guard| {
            for &(dg, exp) in &snap.seen {
                h.restore_digest(dg, exp, NOW);
            }
            for &(rk, ts, id) in &snap.retained {
                h.restore_retained(rk, ts, id);
            }
            h.restore_forgot_upto(snap.forgot_upto);
            h
        };
        for (how, mut h) in [
            (
                "journal",
                from_journal(Guard::new(ReceiveConfig::default())),
            ),
            (
                "snapshot",
                from_snapshot(Guard::new(ReceiveConfig::default())),
            ),
        ] {
            assert_eq!(
                h.check(&cand(&t, 1, NOW, msg_flags::RETAINED), NOW + 1)
                    .unwrap_err(),
                Refusal::Duplicate,
                "{how}: m0 was taken"
            );
            assert_eq!(
                h.check(&cand(&t, 7, NOW - 10, msg_flags::RETAINED), NOW + 1)
                    .unwrap_err(),
                Refusal::RetainedRollback,
                "{how}: an older value re-posted"
            );
            let a = h
                .check(&cand(&t, 2, NOW + 5, msg_flags::RETAINED), NOW + 1)
                .unwrap_or_else(|e| panic!("{how}: m, held untaken at the crash: {e:?}"));
            h.commit(a);
            assert_eq!(h.stats().retained_rollback, 1, "{how}");
            assert_eq!(
                h.check(&cand(&t, 2, NOW + 5, msg_flags::RETAINED), NOW + 1)
                    .unwrap_err(),
                Refusal::Duplicate,
                "{how}: then delivered"
            );
        }
    }

    #[test]
    fn dedup_horizon_skew_and_expiry_by_time() {
        let t = Topic::new("a/b").unwrap();
        let mut g = Guard::new(ReceiveConfig::default());
        let a = g.check(&cand(&t, 1, NOW, 0), NOW).unwrap();
        g.commit(a);
        assert_eq!(
            g.check(&cand(&t, 1, NOW, msg_flags::REPLAYED), NOW + 1000),
            Err(Refusal::Duplicate)
        );
        // Live and stale; replayed and within the horizon is fine.
        let old = NOW - DEFAULT_MAX_SKEW_MS - 1;
        assert_eq!(g.check(&cand(&t, 2, old, 0), NOW), Err(Refusal::StaleLive));
        assert!(g.check(&cand(&t, 2, old, msg_flags::REPLAYED), NOW).is_ok());
        // Future beyond the skew, whatever the flags.
        let fut = NOW + DEFAULT_MAX_SKEW_MS + 1;
        assert_eq!(
            g.check(&cand(&t, 3, fut, msg_flags::REPLAYED), NOW),
            Err(Refusal::Future)
        );
        // Before the horizon: refused unless asked for.
        let ancient = NOW - DEFAULT_HORIZON_MS - 1;
        assert_eq!(
            g.check(&cand(&t, 4, ancient, msg_flags::REPLAYED), NOW),
            Err(Refusal::BeforeHorizon)
        );
        let mut c = cand(&t, 4, ancient, msg_flags::REPLAYED);
        c.allow_old = true;
        assert!(g.check(&c, NOW).is_ok());
        // A flood of new ids does not push the first one out: only time does.
        for i in 0..=255u8 {
            if let Ok(a) = g.check(&cand(&t, i, NOW, 0), NOW) {
                g.commit(a);
            }
        }
        g.expire(NOW + DEFAULT_HORIZON_MS);
        assert_eq!(
            g.check(&cand(&t, 1, NOW, msg_flags::REPLAYED), NOW + 1),
            Err(Refusal::Duplicate)
        );
        let later = NOW + DEFAULT_HORIZON_MS + DEFAULT_MAX_SKEW_MS + 1;
        g.expire(later);
        assert_eq!(g.seen_len(), 0);
        assert_eq!(
            g.check(&cand(&t, 1, NOW, msg_flags::REPLAYED), later),
            Err(Refusal::BeforeHorizon),
            "forgotten entries are refused by the horizon"
        );
        assert_eq!(g.stats().stale_live, 1);
        assert_eq!(g.stats().future, 1);
    }

    #[test]
    fn retained_never_moves_backwards_and_policies_apply() {
        let t = Topic::new("cfg/x").unwrap();
        let mut g = Guard::new(ReceiveConfig::default());
        let r = msg_flags::RETAINED;
        let a = g.check(&cand(&t, 5, NOW - 10_000, r), NOW).unwrap();
        g.commit(a);
        // Same value again: a duplicate (the core shows it to a new subscription, once).
        // An older one: refused.
        assert_eq!(
            g.check(&cand(&t, 5, NOW - 10_000, r), NOW),
            Err(Refusal::Duplicate)
        );
        assert_eq!(
            g.check(&cand(&t, 6, NOW - 20_000, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        assert_eq!(
            g.check(&cand(&t, 7, NOW + DEFAULT_MAX_SKEW_MS + 1, r), NOW),
            Err(Refusal::Future),
            "no one can pin a topic with a far-future value"
        );
        let changes = g.take_changes();
        let mut h = Guard::new(ReceiveConfig::default());
        for c in changes {
            match c {
                Change::Seen { key, expires_ms } => h.restore_seen(key, expires_ms, NOW),
                Change::Retained { key, ts_ms, msg_id } => h.restore_retained(key, ts_ms, msg_id),
                other => panic!("the guard journals no {other:?}"),
            }
        }
        assert_eq!(
            h.check(&cand(&t, 6, NOW - 20_000, r), NOW),
            Err(Refusal::RetainedRollback),
            "the high-water mark survives a restart"
        );
        assert_eq!(
            h.seen_len(),
            g.seen_len(),
            "the journal restores the window"
        );
        assert!(h.is_seen(&dedup_key(&cand(&t, 5, NOW - 10_000, r))));
        let snap = g.snapshot(NOW);
        assert_eq!(
            (snap.seen.len(), snap.retained.len()),
            (1, 1),
            "one dedup entry, one retained mark: {snap:?}"
        );
        assert_eq!(
            h.snapshot(NOW),
            snap,
            "a snapshot holds what the journal held"
        );
        let mut k = Guard::new(ReceiveConfig::default());
        for &(d, exp) in &snap.seen {
            k.restore_digest(d, exp, NOW);
        }
        for &(rk, ts, id) in &snap.retained {
            k.restore_retained(rk, ts, id);
        }
        assert_eq!(k.snapshot(NOW), snap, "and restores to itself");
        assert_eq!(
            k.check(&cand(&t, 6, NOW - 20_000, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        assert!(k.is_seen(&dedup_key(&cand(&t, 5, NOW - 10_000, r))));
        assert!(
            g.snapshot(u64::MAX).seen.is_empty(),
            "expired dedup entries are left out"
        );

        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let (alice, eve) = (
            Identity::generate_with(&mut rng),
            Identity::generate_with(&mut rng),
        );
        let mut cfg = ReceiveConfig::default();
        cfg.policies.push((
            TopicFilter::new("ctl/#").unwrap(),
            SenderPolicy::new().allow_senders([alice.sender_id()]),
        ));
        cfg.policies.push((
            TopicFilter::new("signed").unwrap(),
            SenderPolicy::new().require_signed(),
        ));
        let mut g = Guard::new(cfg);
        let ctl = Topic::new("ctl/door").unwrap();
        let mut c = cand(&ctl, 1, NOW, 0);
        assert_eq!(g.check(&c, NOW), Err(Refusal::Unsigned));
        c.sender = Some(eve.sender_id());
        assert_eq!(g.check(&c, NOW), Err(Refusal::UnlistedSender));
        c.sender = Some(alice.sender_id());
        assert!(g.check(&c, NOW).is_ok());
        let s = Topic::new("signed").unwrap();
        assert_eq!(g.check(&cand(&s, 1, NOW, 0), NOW), Err(Refusal::Unsigned));
        let other = Topic::new("free").unwrap();
        assert!(g.check(&cand(&other, 1, NOW, 0), NOW).is_ok());
        assert_eq!(g.stats().unsigned, 2);
        assert_eq!(g.stats().unlisted_sender, 1);
    }

    #[test]
    fn the_window_tells_trees_senders_and_ids_apart_and_expires_every_shard() {
        let t = Topic::new("a").unwrap();
        let mut g = Guard::new(ReceiveConfig::default());
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let (alice, bob) = (
            Identity::generate_with(&mut rng),
            Identity::generate_with(&mut rng),
        );
        let mut c = cand(&t, 1, NOW, 0);
        let a = g.check(&c, NOW).unwrap();
        g.commit(a);
        // The same id from another sender or in another tree is another message.
        c.sender = Some(alice.sender_id());
        let a = g.check(&c, NOW).unwrap();
        g.commit(a);
        c.sender = Some(bob.sender_id());
        let a = g.check(&c, NOW).unwrap();
        g.commit(a);
        c.tree = TreeId([2; 16]);
        let a = g.check(&c, NOW).unwrap();
        g.commit(a);
        assert_eq!(g.check(&c, NOW), Err(Refusal::Duplicate));
        assert_eq!(g.seen_len(), 4);
        // Enough entries to land in every shard, over two expiry times.
        let mut ids = Vec::new();
        for i in 0..20_000u32 {
            let mut c = cand(&t, 0, NOW, 0);
            c.msg_id[..4].copy_from_slice(&i.to_be_bytes());
            let at = if i % 2 == 0 { NOW } else { NOW + 1 };
            let a = g.check(&c, at).unwrap();
            g.commit(a);
            ids.push(c.msg_id);
        }
        assert!(g.seen.shards.iter().all(|s| !s.is_empty()));
        let later = |d: u64| NOW + d + DEFAULT_HORIZON_MS + DEFAULT_MAX_SKEW_MS;
        g.expire(later(0));
        assert_eq!(
            g.seen_len(),
            10_000,
            "only the entries of the first time are gone"
        );
        let mut c = cand(&t, 0, NOW, msg_flags::REPLAYED);
        c.msg_id = ids[1];
        c.allow_old = true;
        assert_eq!(g.check(&c, later(0)), Err(Refusal::Duplicate));
        g.expire(later(1));
        assert_eq!(g.seen_len(), 0);
        assert_eq!(g.seen.shards.iter().map(HashMap::len).sum::<usize>(), 0);
        assert!(
            g.check(&c, later(1)).is_ok(),
            "forgotten: only the horizon refuses it"
        );
    }

    /// A topic's high-water mark is per tree (§4.11: retained ordering is per subscription,
    /// and a subscription is bound to one tree): a newer message on the same topic name in
    /// another tree — whose admin anyone holding both may be — neither refuses this tree's
    /// next retained value nor lets an older one of it through.
    #[test]
    fn a_retained_mark_is_per_tree() {
        let r = msg_flags::RETAINED;
        let mode = Topic::new("cfg/mode").unwrap();
        let in_tree = |tree: u8, id: u8, ts: u64, flags: u64| {
            let mut c = cand(&mode, id, ts, flags);
            c.tree = TreeId([tree; 16]);
            c
        };
        let mut g = Guard::new(ReceiveConfig::default());
        let a = g.check(&in_tree(1, 1, NOW - 2000, 0), NOW).unwrap();
        g.commit(a);
        // Another tree's message on the same name, newer than anything of tree 1.
        let a = g.check(&in_tree(2, 2, NOW, 0), NOW).unwrap();
        g.commit(a);
        assert_eq!(g.marks_len(), 2, "one mark per (tree, topic)");
        assert_eq!(
            g.check(&in_tree(1, 4, NOW - 3000, r), NOW),
            Err(Refusal::RetainedRollback),
            "older than tree 1's own mark"
        );
        let a = g
            .check(&in_tree(1, 3, NOW - 1000, r), NOW)
            .expect("newer than tree 1's mark: not held to tree 2's");
        g.commit(a);
        assert_eq!(
            g.check(&in_tree(2, 5, NOW - 500, r), NOW),
            Err(Refusal::RetainedRollback),
            "and tree 2's mark is its own"
        );
    }

    /// Two messages of one millisecond are ordered by id (the total order of the rollback
    /// check): once the larger id was accepted, a retained value of the same date with a
    /// smaller id is a rollback, and one with a still larger id is new.
    #[test]
    fn a_retained_value_of_the_marks_millisecond_is_ordered_by_id() {
        let r = msg_flags::RETAINED;
        let t = Topic::new("cfg/mode").unwrap();
        let mut g = Guard::new(ReceiveConfig::default());
        let a = g.check(&cand(&t, 5, NOW, 0), NOW).unwrap();
        g.commit(a);
        assert_eq!(
            g.check(&cand(&t, 4, NOW, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        assert!(g.check(&cand(&t, 6, NOW, r), NOW).is_ok());
    }

    #[test]
    fn a_restored_entry_keeps_its_latest_expiry() {
        let t = Topic::new("a").unwrap();
        let key = dedup_key(&cand(&t, 7, NOW, 0));
        let mut g = Guard::new(ReceiveConfig::default());
        g.restore_seen(key, NOW + 10, NOW);
        g.restore_seen(key, NOW + 20, NOW);
        g.restore_seen(key, NOW + 15, NOW);
        assert_eq!(g.seen_len(), 1);
        g.expire(NOW + 15);
        assert!(g.is_seen(&key), "the later time holds");
        g.expire(NOW + 20);
        assert!(!g.is_seen(&key));
        assert_eq!(g.seen_len(), 0);
        g.restore_seen(key, NOW, NOW);
        assert_eq!(g.seen_len(), 0, "an expired entry is not restored");
    }

    /// The relay sets `RETAINED` outside the seal, and anyone who saw an envelope may
    /// re-post it with `RETAIN`: the flag must not make a delivered message new again, nor
    /// bring back an older one once a newer one was accepted live.
    #[test]
    fn the_retained_flag_neither_replays_nor_rolls_back_what_was_delivered_live() {
        let r = msg_flags::RETAINED;
        let mut g = Guard::new(ReceiveConfig::default());
        let door = Topic::new("ctl/door").unwrap();
        let a = g.check(&cand(&door, 1, NOW, 0), NOW).unwrap();
        g.commit(a);
        assert_eq!(
            g.check(&cand(&door, 1, NOW, r), NOW + 1000),
            Err(Refusal::Duplicate),
            "delivered live, then flagged retained"
        );
        let mode = Topic::new("cfg/mode").unwrap();
        for (id, ts) in [(11, NOW - 2000), (12, NOW - 1000)] {
            let a = g.check(&cand(&mode, id, ts, 0), NOW).unwrap();
            g.commit(a);
        }
        assert_eq!(
            g.check(&cand(&mode, 11, NOW - 2000, r), NOW),
            Err(Refusal::RetainedRollback),
            "v1 after v2 was delivered live"
        );
        // Across a restart too: the marks are journaled.
        let mut h = Guard::new(ReceiveConfig::default());
        for c in g.take_changes() {
            match c {
                Change::Seen { key, expires_ms } => h.restore_seen(key, expires_ms, NOW),
                Change::Retained { key, ts_ms, msg_id } => h.restore_retained(key, ts_ms, msg_id),
                other => panic!("the guard journals no {other:?}"),
            }
        }
        assert_eq!(
            h.check(&cand(&mode, 11, NOW - 2000, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        // A newer retained value is new; the marks go once the horizon is past.
        let a = h.check(&cand(&mode, 13, NOW - 500, r), NOW).expect("newer");
        h.commit(a);
        assert_eq!(h.marks_len(), 2);
        h.expire(NOW);
        assert_eq!(h.marks_len(), 2);
        h.expire(NOW + DEFAULT_HORIZON_MS + DEFAULT_MAX_SKEW_MS + 1);
        assert_eq!(h.marks_len(), 0);
    }

    #[test]
    fn a_full_window_forgets_the_oldest_and_refuses_what_it_might_have_forgotten() {
        let t = Topic::new("busy").unwrap();
        let cfg = ReceiveConfig {
            max_entries: 100,
            ..ReceiveConfig::default()
        };
        let mut g = Guard::new(cfg);
        let msg = |i: u32, ts: u64, flags: u64| {
            let mut c = cand(&t, 0, ts, flags);
            c.msg_id[..4].copy_from_slice(&i.to_be_bytes());
            c
        };
        for i in 0..100 {
            let a = g.check(&msg(i, NOW, 0), NOW).unwrap();
            g.commit(a);
        }
        assert_eq!(g.window_start_ms(NOW), NOW - DEFAULT_HORIZON_MS);
        // 100 more, 10 ms later: the first 100 (the earliest expiry) make room.
        for i in 100..200 {
            let a = g.check(&msg(i, NOW + 10, 0), NOW + 10).unwrap();
            g.commit(a);
            assert!(g.seen_len() <= 100, "never more than the capacity");
        }
        assert_eq!(g.seen_len(), 100);
        let now = NOW + 20;
        assert_eq!(g.window_start_ms(now), NOW + 1);
        // A replay of a forgotten message is refused, never delivered again.
        assert_eq!(
            g.check(&msg(0, NOW, msg_flags::REPLAYED), now),
            Err(Refusal::BeforeWindow)
        );
        assert_eq!(g.stats().before_window, 1);
        // What it still remembers is a duplicate; new messages pass, live or replayed.
        assert_eq!(
            g.check(&msg(150, NOW + 10, msg_flags::REPLAYED), now),
            Err(Refusal::Duplicate)
        );
        assert!(g.check(&msg(500, now, 0), now).is_ok());
        assert!(g
            .check(&msg(501, NOW + 1, msg_flags::REPLAYED), now)
            .is_ok());
        // A subscription that asked for older history still gets it (as beyond the horizon).
        let mut old = msg(0, NOW, msg_flags::REPLAYED);
        old.allow_old = true;
        assert!(g.check(&old, now).is_ok());
        // A retained value is held to its high-water mark, not to the window's start (on a
        // topic of its own: every message moved "busy"'s mark).
        let quiet = Topic::new("quiet").unwrap();
        let r = cand(&quiet, 7, NOW - 60_000, msg_flags::RETAINED);
        assert!(g.check(&r, now).is_ok());
        assert_eq!(
            g.check(&msg(7, NOW - 60_000, msg_flags::RETAINED), now),
            Err(Refusal::RetainedRollback),
            "older than the newest message accepted on its topic"
        );
        // Restoring more than the capacity keeps the newest.
        let mut h = Guard::new(ReceiveConfig {
            max_entries: 10,
            ..ReceiveConfig::default()
        });
        for i in 0..50u32 {
            h.restore_seen(dedup_key(&msg(i, NOW, 0)), NOW + u64::from(i), NOW);
        }
        assert_eq!(h.seen_len(), 10);
        // A window restored from a snapshot keeps what the full one had forgotten: a replay
        // of message 0 is still refused (it was accepted again when the snapshot carried
        // only the entries).
        let snap = g.snapshot(now);
        assert_eq!(snap.forgot_upto, g.forgot_upto());
        assert!(snap.forgot_upto > 0);
        let mut k = Guard::new(ReceiveConfig {
            max_entries: 100,
            ..ReceiveConfig::default()
        });
        for &(d, exp) in &snap.seen {
            k.restore_digest(d, exp, now);
        }
        k.restore_forgot_upto(snap.forgot_upto);
        assert_eq!(
            k.check(&msg(0, NOW, msg_flags::REPLAYED), now),
            Err(Refusal::BeforeWindow),
            "a forgotten message stays refused after a restore"
        );
        let back = k.snapshot(now);
        assert_eq!((back.seen, back.forgot_upto), (snap.seen, snap.forgot_upto));
        assert!(h.is_seen(&dedup_key(&msg(49, NOW, 0))));
        assert!(!h.is_seen(&dedup_key(&msg(39, NOW, 0))));
    }

    /// A retained value is not held to the window's start: once a full window dropped the
    /// entry of the message that set its topic's high-water mark, that message flagged
    /// `RETAINED` is still a duplicate (the mark equals it), not a new value.
    #[test]
    fn the_message_that_set_the_mark_is_a_duplicate_after_the_window_forgot_it() {
        let (p, q) = (Topic::new("p").unwrap(), Topic::new("q").unwrap());
        let mut g = Guard::new(ReceiveConfig {
            max_entries: 2,
            ..ReceiveConfig::default()
        });
        let a = g.check(&cand(&q, 1, NOW, 0), NOW).unwrap();
        g.commit(a);
        for (i, id) in [2u8, 3, 4].into_iter().enumerate() {
            let now = NOW + 1 + i as u64;
            let a = g.check(&cand(&p, id, now, 0), now).unwrap();
            g.commit(a);
        }
        let now = NOW + 10;
        assert!(
            !g.is_seen(&dedup_key(&cand(&q, 1, NOW, 0))),
            "entry dropped"
        );
        assert_eq!(
            g.check(&cand(&q, 1, NOW, msg_flags::RETAINED), now),
            Err(Refusal::Duplicate)
        );
        // A newer retained value of the topic is still accepted.
        assert!(g
            .check(&cand(&q, 5, NOW + 1, msg_flags::RETAINED), now)
            .is_ok());
    }

    /// Review of session 28, F3: the mark is the message that set it — tree, sender and id
    /// — not its date and id alone. Another sender's message copying both, flagged
    /// retained, is no newer than the mark (refused), never its duplicate; a mark restored
    /// from a state file (date and id only) counts as a duplicate only the message the
    /// window still holds.
    #[test]
    fn a_copy_of_the_marks_date_and_id_from_another_sender_is_not_its_duplicate() {
        let t = Topic::new("a/x").unwrap();
        let r = msg_flags::RETAINED;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(28);
        let (alice, mallory) = (
            Identity::generate_with(&mut rng),
            Identity::generate_with(&mut rng),
        );
        let from = |who: &Identity, flags| {
            let mut c = cand(&t, 1, NOW, flags);
            c.sender = Some(who.sender_id());
            c
        };
        let mut g = Guard::new(ReceiveConfig::default());
        let a = g.check(&from(&alice, 0), NOW).unwrap();
        g.commit(a);
        assert_eq!(g.check(&from(&alice, r), NOW), Err(Refusal::Duplicate));
        assert_eq!(
            g.check(&from(&mallory, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        assert_eq!(g.stats().retained_rollback, 1);
        // Restored: the mark alone (its entry gone) cannot tell Alice's from a copy.
        let mut h = Guard::new(ReceiveConfig::default());
        h.restore_retained(retained_key(&TreeId([1; 16]), &t), NOW, [1; 16]);
        assert_eq!(
            h.check(&from(&mallory, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        assert_eq!(
            h.check(&from(&alice, r), NOW),
            Err(Refusal::RetainedRollback)
        );
        h.restore_seen(dedup_key(&from(&alice, 0)), NOW + DEFAULT_HORIZON_MS, NOW);
        assert_eq!(h.check(&from(&alice, r), NOW), Err(Refusal::Duplicate));
        assert_eq!(
            h.check(&from(&mallory, r), NOW),
            Err(Refusal::RetainedRollback)
        );
    }

    /// Review of session 28, F2: one high-water mark per topic, kept for the horizon, with
    /// no bound — a member with a grant for `p/#` publishing once on each of millions of
    /// topics grew every subscriber's memory and state file. The marks are bounded like the
    /// window (`max_entries`), the oldest evicted (counted); what the journal and a
    /// snapshot restore stays within the bound, and a state table keyed by topic (SQLite)
    /// is brought back to it by the tombstones. An evicted mark's message is still never
    /// accepted twice: retained values dated before the marks floor are held to the
    /// window's start.
    #[test]
    fn the_retained_marks_are_bounded_in_memory_and_in_saved_state() {
        let cap = 100;
        let cfg = ReceiveConfig {
            max_entries: cap,
            ..ReceiveConfig::default()
        };
        let mut g = Guard::new(cfg.clone());
        let topics: Vec<Topic> = (0..10_000)
            .map(|i| Topic::new(format!("p/{i}")).unwrap())
            .collect();
        let msg = |i: usize, flags: u64| {
            let mut c = cand(&topics[i], 0, NOW + i as u64, flags);
            c.msg_id[..4].copy_from_slice(&(i as u32).to_be_bytes());
            c
        };
        let mut journal = Vec::new();
        for i in 0..topics.len() {
            let a = g.check(&msg(i, 0), NOW + i as u64).expect("a new topic");
            g.commit(a);
            assert!(g.marks_len() <= cap, "never more marks than the bound");
            journal.extend(g.take_changes());
        }
        let now = NOW + topics.len() as u64;
        assert!(g.marks_len() >= cap - cap / 64 - 1);
        assert_eq!(
            g.stats().marks_evicted,
            (topics.len() - g.marks_len()) as u64
        );
        // The newest marks stay: the last topic's value cannot be rolled back.
        let last = topics.len() - 1;
        let mut older = msg(last, msg_flags::RETAINED);
        older.ts_ms -= 1;
        older.msg_id[15] = 1;
        assert_eq!(g.check(&older, now), Err(Refusal::RetainedRollback));
        assert_eq!(
            g.check(&msg(last, msg_flags::RETAINED), now),
            Err(Refusal::Duplicate)
        );
        // An evicted mark's message, its entry forgotten too, is not accepted again.
        assert_eq!(
            g.check(&msg(0, msg_flags::RETAINED), now),
            Err(Refusal::BeforeWindow)
        );
        // A retained value newer than the floor, on a topic never seen, still passes.
        let fresh = Topic::new("q/new").unwrap();
        assert!(g
            .check(&cand(&fresh, 9, now, msg_flags::RETAINED), now)
            .is_ok());

        let restore = |changes: &[Change]| {
            let mut h = Guard::new(cfg.clone());
            for c in changes {
                match *c {
                    Change::Seen { key, expires_ms } => h.restore_seen(key, expires_ms, now),
                    Change::Retained { key, ts_ms, msg_id } => {
                        h.restore_retained(key, ts_ms, msg_id)
                    }
                    ref other => panic!("the guard journals no {other:?}"),
                }
            }
            h
        };
        // Restored from the whole journal: within the bound, and as refusing.
        let h = restore(&journal);
        assert!(h.marks_len() <= cap);
        let mut h = h;
        assert_eq!(
            h.check(&msg(0, msg_flags::RETAINED), now),
            Err(Refusal::BeforeWindow)
        );
        assert_eq!(h.check(&older, now), Err(Refusal::RetainedRollback));
        // A table keyed by topic (what SQLite keeps): the tombstones (dated 0) and the
        // marks dated before the horizon are pruned; what is left is the bound, the
        // evicted-key table's rows (fixed) and the floor.
        let rows = cap + Evicted::max_rows(cap) + 1;
        let mut table = HashMap::<RetainedKey, (u64, [u8; 16])>::new();
        for c in &journal {
            if let Change::Retained { key, ts_ms, msg_id } = *c {
                table.insert(key, (ts_ms, msg_id));
            }
        }
        table.retain(|_, (ts, _)| *ts > 0);
        assert!(table.len() <= rows, "{} rows", table.len());
        assert!(table.contains_key(&MARKS_FLOOR_KEY));
        // A snapshot holds the marks and the floor, and restores to itself.
        let snap = g.snapshot(now);
        assert!(snap.retained.len() <= rows);
        let mut k = Guard::new(cfg.clone());
        for &(rk, ts, id) in &snap.retained {
            k.restore_retained(rk, ts, id);
        }
        for &(d, exp) in &snap.seen {
            k.restore_digest(d, exp, now);
        }
        k.restore_forgot_upto(snap.forgot_upto);
        let sorted = |mut v: Vec<(RetainedKey, u64, [u8; 16])>| {
            v.sort();
            v
        };
        assert_eq!(
            sorted(k.snapshot(now).retained),
            sorted(snap.retained.clone())
        );
        assert_eq!(
            k.check(&msg(0, msg_flags::RETAINED), now),
            Err(Refusal::BeforeWindow)
        );
        // Restoring more marks than the bound keeps the newest.
        let mut many = Guard::new(cfg.clone());
        for i in 0..1_000u32 {
            let t = Topic::new(format!("r/{i}")).unwrap();
            many.restore_retained(
                retained_key(&TreeId([1; 16]), &t),
                NOW + u64::from(i),
                [1; 16],
            );
        }
        assert!(
            many.marks_len() <= 2 * cap,
            "loading: at most twice the bound"
        );
        many.expire(NOW + 1_000);
        assert!(many.marks_len() <= cap);
        let newest = Topic::new("r/999").unwrap();
        assert_eq!(
            many.check(&cand(&newest, 0, NOW, msg_flags::RETAINED), NOW + 1_000),
            Err(Refusal::RetainedRollback),
            "the newest restored mark is kept"
        );
    }

    /// Review of 9727dd3 (B1): the marks floor applied to every topic. With a bound of 2 the
    /// relay sends a new retained subscription its topics' values in topic order: A (100),
    /// B (300), C (200) — C makes the window forget A and evicts A's mark — then D (50) on a
    /// fourth topic, never seen: D is the topic's current value and must be delivered. It
    /// was refused `BeforeWindow` (50 is at or before the floor, 100). A's own message
    /// coming back is still refused.
    #[test]
    fn a_retained_value_on_a_topic_whose_mark_was_never_evicted_is_not_held_to_the_window() {
        let mut g = Guard::new(ReceiveConfig {
            max_entries: 2,
            ..ReceiveConfig::default()
        });
        let topics: Vec<Topic> = ["a/a", "a/b", "a/c", "a/d"]
            .iter()
            .map(|t| Topic::new(*t).unwrap())
            .collect();
        let base = NOW - 1_000_000;
        let value =
            |i: usize, at: u64| cand(&topics[i], i as u8 + 1, base + at, msg_flags::RETAINED);
        for (i, at) in [(0, 100), (1, 300), (2, 200)] {
            let a = g
                .check(&value(i, at), NOW)
                .expect("a topic's current value");
            g.commit(a);
        }
        assert!(g.stats().marks_evicted >= 1, "A's mark is evicted");
        assert!(g.forgotten(base + 100), "the window forgot A");
        assert!(
            g.check(&value(3, 50), NOW).is_ok(),
            "D: a never-evicted topic's retained value"
        );
        assert_eq!(
            g.check(&value(0, 100), NOW),
            Err(Refusal::BeforeWindow),
            "A's message, its mark and entry gone, is not accepted twice"
        );
    }

    /// Review finding (5, b62efe4): a topic whose mark a held message m moved, evicted for
    /// room, went into the evicted-key table with m's date — in the journal and the
    /// snapshot — and its tombstone deleted the saved mark (m0's). After a crash with a
    /// full window the relay's m (never taken) was held to the window's start and refused
    /// `BeforeWindow`. Now the table gets the saved date (m0's); a topic with no saved
    /// mark gets no row.
    #[test]
    fn an_evicted_mark_a_held_message_moved_is_saved_with_the_saved_date() {
        let cfg = ReceiveConfig {
            max_entries: 2,
            ..ReceiveConfig::default()
        };
        let mut g = Guard::new(cfg.clone());
        let topics: Vec<Topic> = ["a/a", "a/b", "a/c", "a/n"]
            .iter()
            .map(|t| Topic::new(*t).unwrap())
            .collect();
        let base = NOW - 1_000_000;
        let rk = |i: usize| retained_key(&TreeId([1; 16]), &topics[i]);
        let value =
            |i: usize, id: u8, at: u64| cand(&topics[i], id, base + at, msg_flags::RETAINED);
        // a/a: m0 taken, then m held untaken; a/n: a held message and no saved mark.
        let m0 = g.check(&value(0, 1, 100), NOW).unwrap();
        g.commit(m0);
        let held = |g: &mut Guard, a: Accepted| {
            let d = a.digest();
            g.hold(a);
            g.hold_by(d, 1);
        };
        let m = g.check(&value(0, 2, 150), NOW).unwrap();
        held(&mut g, m);
        let n = g.check(&value(3, 3, 120), NOW).unwrap();
        held(&mut g, n);
        // Two newer topics: a/n's and a/a's marks are evicted for room.
        for (i, id, at) in [(1, 4, 300), (2, 5, 200)] {
            let a = g.check(&value(i, id, at), NOW).unwrap();
            g.commit(a);
        }
        assert!(!g.retained.contains_key(&rk(0)), "a/a's mark is evicted");
        assert!(!g.retained.contains_key(&rk(3)), "a/n's mark is evicted");
        let journal = g.take_changes();
        let snap = g.snapshot(NOW);
        let mut from_snapshot = Guard::new(cfg.clone());
        for &(dg, exp) in &snap.seen {
            from_snapshot.restore_digest(dg, exp, NOW);
        }
        for &(k, ts, id) in &snap.retained {
            from_snapshot.restore_retained(k, ts, id);
        }
        from_snapshot.restore_forgot_upto(snap.forgot_upto);
        for (how, h) in [
            ("journal", replayed(&cfg, &journal, NOW)),
            ("snapshot", from_snapshot),
        ] {
            assert_eq!(
                h.evicted_floor(&rk(0)),
                base + 100,
                "{how}: m0's date is saved"
            );
            assert!(
                h.evicted_floor(&rk(3)) < base + 120,
                "{how}: nothing saved for a/n"
            );
        }
        assert_eq!(g.evicted_floor(&rk(0)), base + 100);
    }

    /// Replays `journal` in order into a new guard with `cfg` (as the npm state log and a
    /// keyed SQLite table are loaded).
    fn replayed(cfg: &ReceiveConfig, journal: &[Change], now: u64) -> Guard {
        let mut h = Guard::new(cfg.clone());
        for c in journal {
            match *c {
                Change::Seen { key, expires_ms } => h.restore_seen(key, expires_ms, now),
                Change::Retained { key, ts_ms, msg_id } => h.restore_retained(key, ts_ms, msg_id),
                ref other => panic!("the guard journals no {other:?}"),
            }
        }
        h
    }

    /// Whether `g` holds topic `rk`'s mark at `ts` or later, or covers its evicted mark.
    fn covers(g: &Guard, rk: &RetainedKey, ts: u64) -> bool {
        g.retained.get(rk).is_some_and(|m| m.ts_ms >= ts) || g.evicted_floor(rk) >= ts
    }

    /// Review of af8162f: loading skipped the tombstones of evicted marks and evicted as
    /// each mark loaded, so a log replayed in order held marks its run had evicted, went
    /// over the bound earlier and evicted marks its run still held (a tie at the cut broken
    /// in another order, a smaller bound) into table entries that the log's later rows
    /// overwrote: neither mark nor entry left, the relay's re-sent retained value of such a
    /// topic, forgotten by the window, was delivered a second time. 200 topics in batches
    /// of 16 dated alike through a bound of 64, the window then flushed: replayed at the
    /// same bound (ties broken in each map's own order) and at half the bound, every topic
    /// is covered and no message accepted again.
    #[test]
    fn a_replayed_log_covers_every_key_its_run_evicted_and_every_mark_it_held() {
        let cap = 64;
        let cfg = |max_entries| ReceiveConfig {
            max_entries,
            ..ReceiveConfig::default()
        };
        let topics: Vec<Topic> = (0..200)
            .map(|i| Topic::new(format!("e/{i}")).unwrap())
            .collect();
        let base = NOW - 1_000_000;
        let msg = |i: usize| {
            let mut c = cand(
                &topics[i],
                0,
                base + (i / 16) as u64 * 1_000,
                msg_flags::RETAINED,
            );
            c.msg_id[..4].copy_from_slice(&(i as u32).to_be_bytes());
            c
        };
        let filler = Topic::new("f").unwrap();
        let mut g = Guard::new(cfg(cap));
        let mut journal = Vec::new();
        let mut accepted = Vec::new();
        for i in 0..topics.len() {
            if let Ok(a) = g.check(&msg(i), NOW + i as u64) {
                g.commit(a);
                accepted.push(i);
            }
            journal.extend(g.take_changes());
        }
        assert!(accepted.len() > 190, "{} accepted", accepted.len());
        // The window forgets every topic's message (one topic: one mark).
        for j in 0..100u64 {
            let now = NOW + 200 + j;
            let mut c = cand(&filler, 1, now, 0);
            c.msg_id[..8].copy_from_slice(&j.to_be_bytes());
            let a = g.check(&c, now).expect("a live message");
            g.commit(a);
            journal.extend(g.take_changes());
        }
        let now = NOW + 400;
        let tree = TreeId([1; 16]);
        let key = |i: usize| retained_key(&tree, &topics[i]);
        for &i in &accepted {
            assert!(
                covers(&g, &key(i), msg(i).ts_ms),
                "the run covers topic {i}"
            );
            assert!(!g.seen.contains(digest(&dedup_key(&msg(i)))));
        }
        let mut runs: Vec<_> = (0..8).map(|_| ("the same bound", cfg(cap))).collect();
        runs.push(("half the bound", cfg(cap / 2)));
        for (what, c) in runs {
            let mut h = replayed(&c, &journal, now);
            h.restore_forgot_upto(g.forgot_upto());
            h.expire(now);
            assert!(h.marks_len() <= c.max_entries);
            for &i in &accepted {
                assert!(
                    covers(&h, &key(i), msg(i).ts_ms),
                    "replayed at {what}: topic {i} neither held nor covered"
                );
                assert!(
                    h.check(&msg(i), now).is_err(),
                    "replayed at {what}: message {i} accepted twice"
                );
            }
        }
    }

    /// The evicted-key table never misses an evicted key (its date or later covers it,
    /// whatever the load), and covers a key never evicted only once buckets overflow:
    /// the false-positive rates of the documentation, measured (`--nocapture` prints
    /// them). `max_entries` 64,000: 4,000 buckets, 32,000 entries.
    #[test]
    fn the_evicted_key_table_covers_every_evicted_key_and_few_others() {
        let cap = 64_000;
        let id = |p: &str, i: usize| {
            evicted_id(&retained_key(
                &TreeId([1; 16]),
                &Topic::new(format!("{p}/{i}")).unwrap(),
            ))
        };
        let probes: Vec<u64> = (0..100_000).map(|i| id("never", i)).collect();
        // (load, most never-evicted keys covered, most covered at or after the middle
        // date): measured 0 / 0, 0.055 % / 0, 49.7 % / 0, 100 % / 54.9 %.
        for (load, most, most_mid) in [
            (0.5, 0.0, 0.0),
            (0.75, 0.002, 0.0),
            (1.0, 0.6, 0.001),
            (2.0, 1.0, 0.65),
        ] {
            let mut t = Evicted::default();
            t.allocate(Evicted::buckets_for(cap));
            let n = (t.entries.len() as f64 * load) as usize;
            let mut changed = Vec::new();
            // Dated in eviction order (oldest marks first), as `Guard::evict_marks` does.
            for i in 0..n {
                t.insert(id("evicted", i), NOW + i as u64, &mut changed);
            }
            for i in 0..n {
                assert!(
                    t.floor_of(id("evicted", i)) >= NOW + i as u64,
                    "evicted key {i} missed"
                );
            }
            let covered = probes.iter().filter(|&&p| t.floor_of(p) > 0).count();
            // Covered at or after the middle of the evicted dates: the share of a retained
            // value dated in the middle of the evictions that is held to the window.
            let mid = probes
                .iter()
                .filter(|&&p| t.floor_of(p) >= NOW + n as u64 / 2)
                .count();
            let rate = covered as f64 / probes.len() as f64;
            let mid = mid as f64 / probes.len() as f64;
            println!(
                "load {load}: {n} evicted keys, never-evicted keys covered: {:.4} % \
                 (at or after the middle date: {:.4} %)",
                rate * 100.0,
                mid * 100.0
            );
            assert!(rate <= most, "load {load}: {rate}");
            assert!(mid <= most_mid, "load {load}: at or after the middle {mid}");
        }
    }

    proptest::proptest! {
        /// Whatever the capacity and the order of arrivals, a message accepted once is never
        /// accepted again (the window forgets only what its moved start then refuses), and
        /// the window never holds more than its capacity. Re-posts come live, replayed or
        /// retained: a retained value is not held to the window's start, so the topic's
        /// high-water mark must refuse the very message that set it once its entry is gone.
        #[test]
        fn no_message_is_accepted_twice_whatever_the_capacity(
            cap in 1usize..40,
            events in proptest::collection::vec((0u32..60, 0u64..4_000, 0u64..3, 0usize..3), 1..400),
        ) {
            let t = Topic::new("p").unwrap();
            let mut g = Guard::new(ReceiveConfig { max_entries: cap, ..ReceiveConfig::default() });
            let mut now = NOW;
            let mut sent_at = std::collections::HashMap::new();
            let mut delivered = std::collections::HashSet::new();
            for (id, age, step, kind) in events {
                now += step;
                // A message keeps the date it was first sent with; re-posts reuse it.
                let ts = *sent_at.entry(id).or_insert(now.saturating_sub(age));
                let flags = [0, msg_flags::REPLAYED, msg_flags::RETAINED][kind];
                let mut c = cand(&t, 0, ts, flags);
                c.msg_id[..4].copy_from_slice(&id.to_be_bytes());
                if let Ok(a) = g.check(&c, now) {
                    proptest::prop_assert!(delivered.insert(id), "message {} accepted twice", id);
                    g.commit(a);
                }
                proptest::prop_assert!(g.seen_len() <= cap);
            }
        }

        /// The same over several topics, so that the marks table (bounded like the window)
        /// evicts marks too: an evicted mark's message is never accepted again, and the
        /// marks never exceed the bound. Review of 9727dd3 (B1): a retained value on a
        /// topic never seen before, however old (within the horizon), is accepted — the
        /// rule that refuses an evicted mark's message must not hold it to the window's
        /// start. Both across restarts too, from a snapshot or from the journal replayed
        /// (the Rust file's rows, the npm log's records).
        #[test]
        fn no_message_is_accepted_twice_when_marks_are_evicted(
            cap in 1usize..12,
            events in proptest::collection::vec(
                (0u32..60, 0usize..8, 0u64..4_000, 0u64..3, 0usize..6), 1..400),
        ) {
            let topics: Vec<Topic> =
                (0..8).map(|i| Topic::new(format!("p/{i}")).unwrap()).collect();
            let cfg = ReceiveConfig { max_entries: cap, ..ReceiveConfig::default() };
            let mut g = Guard::new(cfg.clone());
            let mut now = NOW;
            let mut first = std::collections::HashMap::new();
            let mut delivered = std::collections::HashSet::new();
            let mut journal = Vec::new();
            let mut fresh = 0u32;
            for (id, topic, age, step, kind) in events {
                now += step;
                journal.extend(g.take_changes());
                match kind {
                    3 => {
                        // A topic never seen: its current value, dated up to 4 s ago.
                        fresh += 1;
                        let t = Topic::new(format!("q/{fresh}")).unwrap();
                        let mut c = cand(&t, 0, now.saturating_sub(age), msg_flags::RETAINED);
                        c.msg_id[..4].copy_from_slice(&(1_000 + fresh).to_be_bytes());
                        let a = g.check(&c, now);
                        proptest::prop_assert!(a.is_ok(), "a never-seen topic's value: {:?}", a);
                        g.commit(a.unwrap());
                    }
                    4 => {
                        // Restarted from a snapshot.
                        let snap = g.snapshot(now);
                        g = Guard::new(cfg.clone());
                        for (d, exp) in snap.seen {
                            g.restore_digest(d, exp, now);
                        }
                        for (k, ts, id) in snap.retained {
                            g.restore_retained(k, ts, id);
                        }
                        g.restore_forgot_upto(snap.forgot_upto);
                    }
                    5 => {
                        // Restarted from the journal, replayed in order.
                        let forgot = g.forgot_upto();
                        g = Guard::new(cfg.clone());
                        for c in &journal {
                            match *c {
                                Change::Seen { key, expires_ms } => {
                                    g.restore_seen(key, expires_ms, now)
                                }
                                Change::Retained { key, ts_ms, msg_id } => {
                                    g.restore_retained(key, ts_ms, msg_id)
                                }
                                _ => {}
                            }
                        }
                        g.restore_forgot_upto(forgot);
                    }
                    _ => {
                        // A message keeps its topic and date; re-posts reuse them.
                        let (t, ts) = *first.entry(id).or_insert((topic, now.saturating_sub(age)));
                        let flags = [0, msg_flags::REPLAYED, msg_flags::RETAINED][kind];
                        let mut c = cand(&topics[t], 0, ts, flags);
                        c.msg_id[..4].copy_from_slice(&id.to_be_bytes());
                        if let Ok(a) = g.check(&c, now) {
                            proptest::prop_assert!(delivered.insert(id), "message {} accepted twice", id);
                            g.commit(a);
                        }
                    }
                }
                // Restored marks past the bound go at the next check.
                let bound = if kind >= 4 { 2 * cap } else { cap };
                proptest::prop_assert!(g.marks_len() <= bound);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Review of af8162f: the same with an evicted-key table of more than 64 buckets
        /// that overflows (entries folded into bucket floors), dates out of order and tied
        /// at the eviction cut, the table and marks swept past the horizon (a pause) and
        /// restarts interleaved with the flood — from the journal replayed in order (at
        /// the same bound, or a smaller one: a table of another size), with a sweep, or from
        /// a snapshot. Messages already delivered are re-sent throughout (retained, live,
        /// replayed) and all of them once more at the end: none is accepted twice.
        #[test]
        fn no_message_is_accepted_twice_when_a_full_evicted_key_table_is_replayed(
            cap in 1_025usize..1_100,
            tie in proptest::sample::select(vec![1u64, 20, 300, 2_000]),
            seed in proptest::prelude::any::<u64>(),
            pause in proptest::option::of(0usize..500),
            restarts in proptest::collection::vec((0usize..2_300, 0usize..4), 0..4),
        ) {
            let mut cfg = ReceiveConfig {
                max_entries: cap,
                horizon_ms: 20_000,
                max_skew_ms: 1_000,
                ..ReceiveConfig::default()
            };
            let n = cap + 1_200;
            let topics: Vec<Topic> =
                (0..n).map(|i| Topic::new(format!("p/{i}")).unwrap()).collect();
            let mix = |i: u64| {
                let mut x = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x ^= x >> 29;
                x.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 16
            };
            let mut g = Guard::new(cfg.clone());
            let mut now = NOW;
            let mut sent: Vec<(usize, u64)> = Vec::new();
            let mut delivered = std::collections::HashSet::new();
            let mut journal = Vec::new();
            let mut folded = false;
            let fail = |e: String| proptest::test_runner::TestCaseError::fail(e);
            let send = |g: &mut Guard, i: usize, ts: u64, flags: u64, now: u64,
                        delivered: &mut std::collections::HashSet<usize>|
             -> Result<(), String> {
                let mut c = cand(&topics[i], 0, ts, flags);
                c.msg_id[..4].copy_from_slice(&(i as u32).to_be_bytes());
                if let Ok(a) = g.check(&c, now) {
                    if !delivered.insert(i) {
                        return Err(format!("message {i} accepted twice"));
                    }
                    g.commit(a);
                }
                Ok(())
            };
            for i in 0..n {
                now += 10;
                if pause == Some(i) {
                    now += cfg.horizon_ms + cfg.max_skew_ms;
                }
                g.expire(now);
                // Dated up to 4 s ago, rounded down to `tie`: ties at the cut.
                let ts = now.saturating_sub(mix(i as u64) % 4_000) / tie * tie;
                let flags = [0, msg_flags::RETAINED][(mix(i as u64 + 1) % 2) as usize];
                let flags = if flags == 0 && ts + cfg.max_skew_ms < now {
                    msg_flags::REPLAYED
                } else {
                    flags
                };
                send(&mut g, i, ts, flags, now, &mut delivered).map_err(fail)?;
                sent.push((i, ts));
                // An earlier message again.
                let (j, tj) = sent[(mix(i as u64 + 2) as usize) % sent.len()];
                let again =
                    [0, msg_flags::REPLAYED, msg_flags::RETAINED][(mix(i as u64 + 3) % 3) as usize];
                send(&mut g, j, tj, again, now, &mut delivered).map_err(fail)?;
                journal.extend(g.take_changes());
                if i % 64 == 0 {
                    folded |= g.evicted.floors.iter().any(|&f| f > 0);
                }
                for &(_, kind) in restarts.iter().filter(|&&(at, _)| at == i) {
                    folded |= g.evicted.floors.iter().any(|&f| f > 0);
                    let forgot = g.forgot_upto();
                    g = match kind {
                        0..=2 => {
                            if kind == 2 {
                                // Loaded with a smaller bound: a table of another size.
                                cfg.max_entries = cap * 3 / 4;
                            }
                            let mut h = replayed(&cfg, &journal, now);
                            if kind == 1 {
                                h.expire(now);
                            }
                            h
                        }
                        _ => {
                            let snap = g.snapshot(now);
                            let mut h = Guard::new(cfg.clone());
                            for (d, exp) in snap.seen {
                                h.restore_digest(d, exp, now);
                            }
                            for (k, ts, id) in snap.retained {
                                h.restore_retained(k, ts, id);
                            }
                            h
                        }
                    };
                    g.restore_forgot_upto(forgot);
                }
                proptest::prop_assert!(g.marks_len() <= 2 * g.cfg.max_entries);
            }
            folded |= g.evicted.floors.iter().any(|&f| f > 0);
            proptest::prop_assert!(folded, "the table overflowed");
            now += 10;
            for &(i, ts) in &sent {
                send(&mut g, i, ts, msg_flags::RETAINED, now, &mut delivered).map_err(fail)?;
            }
            proptest::prop_assert!(g.marks_len() <= g.cfg.max_entries);
        }
    }

    /// Review of session 27, F1: saved state is not trusted with dates. A window start, a
    /// dedup expiry or a retained mark far in the future (one 17-byte record in a state
    /// file) made every later message `BeforeWindow` — acknowledged and dropped — and every
    /// retained value of the topic a rollback, for good (compaction wrote them back). Now
    /// they are held to what an honest run can have written by the load time: messages
    /// dated after the load time plus the skew are accepted, and snapshots carry the bound.
    #[test]
    fn a_restored_window_cannot_start_in_the_future() {
        let t = Topic::new("a/b").unwrap();
        let cfg = ReceiveConfig::default();
        let bound = NOW + cfg.horizon_ms + 2 * cfg.max_skew_ms;
        let mut g = Guard::new(cfg.clone());
        g.restore_forgot_upto(u64::MAX);
        g.restore_retained(retained_key(&TreeId([1; 16]), &t), u64::MAX, [9; 16]);
        g.restore_digest(7, u64::MAX, NOW);
        // Written back within the bounds, before any check settled them.
        let snap = g.snapshot(NOW);
        assert_eq!(snap.forgot_upto, bound);
        assert_eq!(snap.seen, vec![(7, bound)]);
        assert_eq!(snap.retained[0].1, NOW + cfg.max_skew_ms);
        // Dated up to the load time plus the skew: still refused as possibly forgotten (a
        // state writer keeps that much; the state is not authenticated at rest).
        assert_eq!(
            g.check(&cand(&t, 1, NOW, 0), NOW),
            Err(Refusal::BeforeWindow)
        );
        // Later messages pass, live and retained, once the skew has gone by.
        let later = NOW + cfg.max_skew_ms + 1;
        let a = g.check(&cand(&t, 2, later, 0), later).unwrap();
        g.commit(a);
        let r = cand(&t, 3, later + 1, msg_flags::RETAINED);
        assert!(
            g.check(&r, later + 1).is_ok(),
            "retained value after the bound"
        );
        assert_eq!(g.forgot_upto(), bound);
        assert_eq!(g.stats().restored_future, 3);
        // An honest state is untouched.
        let mut h = Guard::new(cfg.clone());
        h.restore_forgot_upto(NOW - 1);
        h.restore_digest(8, NOW + 1_000, NOW);
        assert!(h.check(&cand(&t, 4, NOW, 0), NOW).is_ok());
        assert_eq!(h.forgot_upto(), NOW - 1);
        assert_eq!(h.snapshot(NOW).seen, vec![(8, NOW + 1_000)]);
        assert_eq!(h.stats().restored_future, 0);
    }
}
