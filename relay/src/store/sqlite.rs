//! The SQLite store: WAL mode, group commit on a dedicated writer thread, reads and WAL
//! checkpoints on their own connections.
//!
//! `append` (under a routing shard's lock; other shards append concurrently) never waits on
//! a disk: it checks the quotas against in-memory usage counters, assigns the sequence and
//! queues the write in one step under the queue lock (so sequence order is queue order); a
//! full queue is answered with a retryable `Busy`. Nor does it wait on the writer or do work that grows
//! with a flood: the write queue is a list of fixed-size blocks the writer takes whole (the
//! queue lock is held for pointer moves), and the in-memory index is sharded, so growing it
//! rehashes 1/64 of it at a time. A durable's floor moved by an `Ack` is not queued: the
//! newest floor per durable waits merged (`Queue::floors`), written once per writer turn. The writer thread takes everything queued (up to
//! `max_batch` operations) and commits it in ONE transaction, applies retention, then runs
//! the `when_durable` callbacks whose sequence is committed — that is where `PubAck` for
//! QoS ≥ 1 is sent from. The WAL is never checkpointed on the commit path
//! (`wal_autocheckpoint = 0`): a background thread runs PASSIVE checkpoints on its own
//! connection; only a WAL past [`WAL_LIMIT`] (commits back to back) is checkpointed and
//! truncated by the writer between two commits. History, replay and retained reads run on a reader connection, by integer
//! key id (`msgs(kid, seq)`, `retained(kid)`): a key id the store never saw is a map miss
//! that touches no row.
//!
//! QoS 0 messages are routed live and not stored unless `store_qos0` is set (a retained
//! QoS 0 value is still kept as the path's retained value).
//!
//! Usage is counted per tenant (account or source address) and in total: stored bytes (a
//! message's share of the file's pages, [`disk_bytes`]) and messages, retained values,
//! durable names and distinct paths; at a limit `append` answers `QuotaExceeded` and
//! nothing is queued.
//!
//! Below `min_free_bytes` of free space on the file's file system (measured after each
//! writer turn), publishes that need the store are refused (`StorageFull`) before SQLite
//! meets a full disk. A failed commit (disk full, I/O error) is not permanent: the batch
//! and everything queued behind it are refused to their publishers (`StorageFull` for a
//! full disk), the store refuses new writes while it retries a tiny probe transaction
//! every `retry_ms` (with `min_free_bytes`, only once that much is free), and when the
//! probe commits it reloads its counters from the file and resumes by itself. Live QoS 0
//! routing is untouched throughout.
//!
//! Messages are fanned out live before they are committed, so a sequence a subscriber saw
//! must never be handed out again after a crash: the high-water mark of assigned sequences
//! is persisted at every commit (and every [`PERSIST_EVERY`] live-only sequences), and
//! after an unclean stop the store skips `queue + max_batch + 2 * PERSIST_EVERY + 1`.
//!
//! The file carries `application_id` [`APP_ID`], `user_version` [`SCHEMA_VERSION`] and a
//! schema marker row; an existing file that lacks them, or fails `PRAGMA quick_check`, is
//! refused at start with a clear error and left untouched. An exclusive SQLite lock on the
//! sidecar file `<store>-lock` keeps a second relay off the same store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use whispeer_protocol::frame::{pub_flags, Replay};
use whispeer_protocol::{Envelope, KeyId, Qos, TokenPattern};

use super::quota::{Need, Usage};
use super::sharded::Sharded;
use super::{
    path_bytes, Accepted, Append, Claim, DurableKey, OnDurable, OnSequenced, PathStatus, ReadChunk,
    ReadPlan, RetentionStatus, Sequenced, Store, StoreError, StoreMetrics, StoreStatus, Stored,
    Tenant, BATCH_BUCKETS, COMMIT_BUCKETS,
};
use crate::config::{StoreConfig, SyncMode};
use crate::ids::Seq;

/// SQLite `application_id` of a whispeer relay store ("WHSP").
pub const APP_ID: i64 = 0x5748_5350;
/// SQLite `user_version`: the schema version this relay reads and writes.
pub const SCHEMA_VERSION: i64 = 2;
/// The `meta` row `schema` of a whispeer relay store.
pub const SCHEMA_MARKER: &str = "whispeer-relay-store/2";
/// Rows per history read chunk.
const READ_CHUNK: usize = 1024;
/// Live-only sequences between two persisted high-water marks.
pub const PERSIST_EVERY: u64 = 65_536;
/// Rows per step of the age sweep.
const SWEEP_CHUNK: i64 = 4096;

/// Page size of every store (set when a file or memory store is created).
const PAGE_SIZE: u64 = 16_384;
/// A stored row's record besides its envelope: the record header (column types, the
/// envelope's length) and the key, path and tenant ids, time, flags (and sequence).
const RECORD_BYTES: u64 = 32;
/// A row's cell besides its record: the record's length and the rowid (varints), the
/// 2-byte cell pointer.
const CELL_BYTES: u64 = 12;
/// A row's two index entries (`msgs_kid`, `msgs_pid`; a retained value's `retained_kid`,
/// `retained_ts`): about 16 bytes each, in index pages filled about two thirds (entries
/// arrive in key id order, not the index's).
const INDEX_BYTES: u64 = 48;

/// What a stored envelope of `len` bytes takes in the store file, as the byte quotas count
/// it (`tenant_max_bytes`, `total_max_bytes`): its row's share of the table page it is in,
/// its overflow pages, and its index entries. Rows are appended in sequence order, so a
/// table page holds as many whole rows as fit and the rest of it stays empty: envelopes a
/// little over half a page take a page each (2× their size), a 160-byte envelope about
/// 250 bytes. The page arithmetic is SQLite's (`btreeParseCellAdjustSizeForOverflow`: a
/// payload over `usable − 35` keeps `min_local` bytes, or up to `usable − 35`, in the
/// table page and the rest in overflow pages of `usable − 4`). Measured against real files
/// in `store_hostile::the_bytes_the_quotas_count_cover_the_store_files_size`.
pub(crate) fn disk_bytes(len: u64) -> u64 {
    let max_local = PAGE_SIZE - 35;
    let min_local = (PAGE_SIZE - 12) * 32 / 255 - 23;
    let overflow_room = PAGE_SIZE - 4;
    let payload = len.saturating_add(RECORD_BYTES);
    let (local, overflow) = if payload <= max_local {
        (payload, 0)
    } else {
        let keep = min_local + (payload - min_local) % overflow_room;
        let local = if keep <= max_local { keep } else { min_local };
        // (The cell then also holds the first overflow page's number.)
        (local + 4, (payload - local).div_ceil(overflow_room))
    };
    let per_page = ((PAGE_SIZE - 8) / (local + CELL_BYTES)).max(1);
    PAGE_SIZE
        .div_ceil(per_page)
        .saturating_add(overflow.saturating_mul(PAGE_SIZE))
        .saturating_add(INDEX_BYTES)
}

/// The WAL's size past which the writer checkpoints it into the file and truncates it
/// between two commits (`Shared::bound_wal`); also where SQLite cuts it back to when
/// it restarts (`journal_size_limit`).
const WAL_LIMIT: u64 = 64 << 20;

/// How long the writer's WAL truncation waits for readers (`Shared::bound_wal`).
const WAL_TRUNCATE_WAIT: Duration = Duration::from_millis(50);

/// Wall-clock source in Unix milliseconds (injectable for tests of age retention).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

enum Op {
    Tenant {
        tid: i64,
        key: Vec<u8>,
    },
    Key {
        kid: i64,
        key_id: [u8; 16],
    },
    Path {
        pid: i64,
        kid: i64,
        tid: i64,
        path: Vec<u8>,
    },
    Msg {
        seq: u64,
        pid: i64,
        kid: i64,
        tid: i64,
        ts: u64,
        flags: u64,
        env: Bytes,
    },
    Retain {
        pid: i64,
        kid: i64,
        tid: i64,
        seq: u64,
        ts: u64,
        env: Bytes,
    },
    Dedup {
        /// The publishing tenant: publish ids are remembered per tenant.
        tid: i64,
        pid: [u8; 16],
        seq: u64,
        ts: u64,
    },
    Durable {
        key_id: [u8; 16],
        name: String,
        floor: u64,
        tid: i64,
        /// For a new row: unheld since this Unix ms (None: held).
        idle: Option<u64>,
    },
    /// A durable was taken (None) or given back (since when, Unix ms).
    DurableIdle {
        key_id: [u8; 16],
        name: String,
        idle: Option<u64>,
    },
    DurableDelete {
        key_id: [u8; 16],
        name: String,
    },
}

impl Op {
    /// Envelope bytes this operation holds in memory until it is committed.
    fn env_bytes(&self) -> u64 {
        match self {
            Op::Msg { env, .. } | Op::Retain { env, .. } => env.len() as u64,
            _ => 0,
        }
    }

    /// What this operation's envelope takes on disk ([`disk_bytes`]; 0 without one): what
    /// the free-space reserve's estimate counts.
    fn disk_bytes(&self) -> u64 {
        match self.env_bytes() {
            0 => 0,
            len => disk_bytes(len),
        }
    }

    /// The tenant whose write this is, with the messages and bytes it queues.
    fn queued(&self) -> Option<(i64, Queued)> {
        match self {
            Op::Msg { tid, env, .. } => Some((
                *tid,
                Queued {
                    msgs: 1,
                    bytes: env.len() as u64,
                },
            )),
            Op::Retain { tid, env, .. } => Some((
                *tid,
                Queued {
                    msgs: 0,
                    bytes: env.len() as u64,
                },
            )),
            _ => None,
        }
    }
}

/// What `ops` queue per tenant (a few entries: summed off the queue lock).
fn per_tenant<'a>(ops: impl Iterator<Item = &'a Op>) -> HashMap<i64, Queued> {
    let mut m: HashMap<i64, Queued> = HashMap::new();
    for (tid, q) in ops.filter_map(Op::queued) {
        let t = m.entry(tid).or_default();
        t.msgs += q.msgs;
        t.bytes += q.bytes;
    }
    m
}

// `Queued`: messages and envelope bytes one tenant has waiting for the writer (queued, or
// in the batch being committed).
use crate::held_bytes::Queued;

/// Operations per block of the write queue.
const BLOCK: usize = 1024;
/// Emptied blocks kept for reuse.
const SPARE_BLOCKS: usize = 16;

#[derive(Default)]
struct Queue {
    /// Queued operations, oldest first, in blocks of at most [`BLOCK`]: a push appends to
    /// the last block and the writer takes whole blocks, so neither ever copies or
    /// reallocates the queue while holding its lock (`append` pushes under the routing
    /// lock; a queue of 65,536 messages in one `Vec` cost multi-millisecond reallocations
    /// and a `split_off` copy of everything behind each batch, with the lock held).
    blocks: VecDeque<Vec<Op>>,
    /// Operations in `blocks`.
    len: usize,
    /// Emptied blocks the writer gives back, so pushes rarely allocate.
    spare: Vec<Vec<Op>>,
    /// Operations ever pushed, and ever taken by the writer (or dropped): queue positions.
    pushed: u64,
    taken: u64,
    /// Durable floors to write, the newest per durable (an acknowledgement that moves a
    /// durable's floor): merged here, not queued. One `Ack{seqs:[s]}` per replayed message
    /// queued one UPSERT each, uncounted by the queue's bounds, so a few addresses acking
    /// at their ack rate grew the queue without bound while the disk lagged (and QoS >= 1
    /// `PubAck`s waited behind it): now what waits is one entry per durable, bounded by
    /// the durables quota, and the writer writes each durable once per turn. A floor is
    /// written (an `UPDATE` of the durable's row, never an insert) only once the writer
    /// has taken the operation that creates its row (`after`, the creation's position),
    /// so it never lands before it; a deletion removes the durable's entry under the queue
    /// lock as it queues its `DELETE`, and a creation removes any stale one as it queues
    /// its `INSERT`, so a floor update never resurrects a deleted durable nor moves the
    /// floor of one created again under its name.
    floors: HashMap<DurableKey, PendingFloor>,
    /// The highest `after` in `floors` (all of them are taken at once when the writer has
    /// taken that far).
    floors_after: u64,
    msgs: usize,
    /// Envelope bytes in `blocks` (history and retained copies), bounded by
    /// `queue_bytes`.
    bytes: u64,
    /// What the same envelopes take on disk ([`disk_bytes`]), for the free-space reserve.
    disk: u64,
    /// What each tenant has waiting (queued or being committed): a tenant over the bounds
    /// is refused only beyond its fair share, so one tenant's flood never refuses another.
    by_tenant: HashMap<i64, Queued>,
    waiters: Vec<(u64, OnDurable)>,
    closed: bool,
    /// The writer is committing a batch taken from `ops`.
    inflight: bool,
    /// The writer holds waiters it has not resolved yet: a new waiter, even for a sequence
    /// already committed, queues behind them, so `PubAck`s stay in sequence order.
    resolving: bool,
    /// Highest live-only sequence not yet covered by `committed`.
    mark: u64,
    /// The high-water mark should be persisted.
    persist: bool,
    /// Next live-only sequence at which `persist` is raised.
    persist_at: u64,
}

/// A durable's newest floor waiting for the writer ([`Queue::floors`]).
#[derive(Debug, Clone, Copy)]
struct PendingFloor {
    floor: u64,
    /// The queue position of the operation creating the durable's row: written once the
    /// writer has taken it.
    after: u64,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nothing waits for the writer: no operation, floor or waiter.
    fn is_idle(&self) -> bool {
        self.is_empty() && self.floors.is_empty() && self.waiters.is_empty()
    }

    /// Records `floor` as durable `key`'s newest floor (replacing one still waiting).
    fn merge_floor(&mut self, key: &DurableKey, floor: u64, after: u64) {
        let p = PendingFloor { floor, after };
        match self.floors.get_mut(key) {
            Some(f) => *f = p,
            None => {
                self.floors.insert(key.clone(), p);
            }
        }
        self.floors_after = self.floors_after.max(after);
    }

    /// Takes the floors the writer may write now: those whose durable's creating
    /// operation it has taken (all of them, without a pass over the map, unless a
    /// creation is still queued).
    fn take_floors(&mut self) -> HashMap<DurableKey, PendingFloor> {
        if self.floors_after <= self.taken {
            self.floors_after = 0;
            return std::mem::take(&mut self.floors);
        }
        let taken = self.taken;
        let (ready, wait): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut self.floors)
            .into_iter()
            .partition(|(_, f)| f.after <= taken);
        self.floors_after = wait.values().map(|f| f.after).max().unwrap_or(0);
        self.floors = wait;
        ready
    }

    fn push(&mut self, ops: impl IntoIterator<Item = Op>) {
        for op in ops {
            self.bytes += op.env_bytes();
            self.disk += op.disk_bytes();
            if let Some((tid, q)) = op.queued() {
                let t = self.by_tenant.entry(tid).or_default();
                t.msgs += q.msgs;
                t.bytes += q.bytes;
            }
            match self.blocks.back_mut() {
                Some(b) if b.len() < BLOCK => b.push(op),
                _ => {
                    let mut b = self
                        .spare
                        .pop()
                        .unwrap_or_else(|| Vec::with_capacity(BLOCK));
                    b.push(op);
                    self.blocks.push_back(b);
                }
            }
            self.len += 1;
            self.pushed += 1;
        }
    }

    /// Takes up to `max` operations (at least one), oldest first, as whole blocks while
    /// they fit; only a `max` below the first block's length splits it (copying at most
    /// `max` operations).
    fn take(&mut self, max: usize) -> Vec<Vec<Op>> {
        let max = max.max(1);
        let mut out = Vec::new();
        let mut n = 0;
        while let Some(front) = self.blocks.front_mut() {
            if front.len() <= max - n {
                n += front.len();
                out.extend(self.blocks.pop_front());
            } else {
                if n == 0 {
                    out.push(front.drain(..max).collect());
                    n = max;
                }
                break;
            }
        }
        self.len -= n;
        self.taken += n as u64;
        out
    }

    /// Empties the queue; the operations are returned to be dropped off the lock.
    fn clear(&mut self) -> VecDeque<Vec<Op>> {
        self.len = 0;
        self.taken = self.pushed;
        self.floors.clear();
        self.floors_after = 0;
        // Only what is dropped here: a batch the writer holds gives its bytes back itself.
        let dropped: u64 = self.blocks.iter().flatten().map(Op::env_bytes).sum();
        self.bytes = self.bytes.saturating_sub(dropped);
        let dropped: u64 = self.blocks.iter().flatten().map(Op::disk_bytes).sum();
        self.disk = self.disk.saturating_sub(dropped);
        let blocks = std::mem::take(&mut self.blocks);
        self.release(per_tenant(blocks.iter().flatten()));
        blocks
    }

    /// Takes what tenants had waiting (committed or dropped now) off `by_tenant`.
    fn release(&mut self, done: impl IntoIterator<Item = (i64, Queued)>) {
        for (tid, q) in done {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.by_tenant.entry(tid) {
                let t = e.get_mut();
                t.msgs = t.msgs.saturating_sub(q.msgs);
                t.bytes = t.bytes.saturating_sub(q.bytes);
                if *t == Queued::default() {
                    e.remove();
                }
            }
        }
    }

    /// Whether tenant `tid` may queue `add` more. Within the bounds (`queue` messages,
    /// `queue_bytes` bytes; 0 = none) anyone may; beyond them (the disk lags) only a tenant
    /// holding less than its fair share — the bounds divided among the tenants with writes
    /// waiting — so a flooding tenant fills the queue and gets `busy`, while another tenant's
    /// publish is still taken. What waits stays below twice the bounds.
    fn admits(&self, tid: Option<i64>, add: Queued, queue: usize, queue_bytes: u64) -> bool {
        let all = Queued {
            msgs: self.msgs,
            bytes: self.bytes,
        };
        let mine = tid
            .and_then(|t| self.by_tenant.get(&t).copied())
            .unwrap_or_default();
        let tenants = self.by_tenant.len() + usize::from(mine == Queued::default());
        crate::held_bytes::fair_admits(all, mine, tenants, add, queue, queue_bytes)
    }

    /// Gives emptied blocks back for reuse (at most [`SPARE_BLOCKS`] are kept).
    fn recycle(&mut self, blocks: &mut Vec<Vec<Op>>) {
        while self.spare.len() < SPARE_BLOCKS {
            match blocks.pop() {
                Some(b) if b.is_empty() && b.capacity() == BLOCK => self.spare.push(b),
                Some(_) => {}
                None => break,
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PathStat {
    pid: i64,
    kid: i64,
    /// The tenant whose distinct-path quota holds the path: its creator, until the
    /// creator has no data left there while another tenant has (then that tenant).
    owner: i64,
    count: u64,
    bytes: u64,
    first_seq: u64,
    last_seq: u64,
    /// The retained value: its tenant, size and sequence.
    retained: Option<(i64, u64, u64)>,
}

/// A durable subscription as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DurableStat {
    floor: u64,
    /// The tenant whose durable-name quota it counts against.
    tid: i64,
    /// Held by no subscription since this Unix ms (None: held now). Persisted (column
    /// `idle`), so the idle time of `store.durable_idle_ms` survives a restart.
    idle_since: Option<u64>,
    /// The queue position ([`Queue::pushed`]) of the operation that creates its row (0:
    /// the row was in the file when the index was loaded): a floor update is written only
    /// once the writer has taken that operation ([`Queue::floors`]).
    created_at: u64,
}

#[derive(Debug, Clone, Copy)]
struct KeyStat {
    kid: i64,
    paths: u64,
    /// Sequence of the last message or retained value queued for this key id: a history
    /// read of the key id waits for this one only (`Store::when_readable`).
    last_write: u64,
}

/// What the store knows in memory: ids and usage (never envelopes).
#[derive(Default)]
struct Index {
    // Sharded: they grow with what anyone publishes, in `append`.
    paths: Sharded<Vec<u8>, PathStat>,
    by_pid: Sharded<i64, Vec<u8>>,
    keys: Sharded<[u8; 16], KeyStat>,
    tenants: Sharded<Vec<u8>, i64>,
    usage: Sharded<i64, Usage>,
    /// Messages kept per (path id, tenant id), entries at zero removed: whether a path's
    /// owner still has data there, and so when the path moves to an heir. (Counting the
    /// heir's rows in SQL scanned the whole path on every owner change, in the writer — a
    /// member with many accounts, one message each at the front of a long path, made every
    /// trim scan it: review finding.)
    path_tenant_msgs: Sharded<(i64, i64), u64>,
    /// All tenants' usage; its bytes are [`disk_bytes`], what the byte quotas count.
    total: Usage,
    /// The envelope bytes kept (history and retained values), for `/status`.
    envelope_bytes: u64,
    durables: HashMap<DurableKey, DurableStat>,
    /// Durables per key id ([`Store::holds_key_id`]).
    durable_keys: HashMap<[u8; 16], u32>,
    /// Durable names a subscription holds now (taken before the durable may exist), with
    /// how many holds each has. The relay gives a name to one connection at a time, but a
    /// release may reach the store after the next holder's hold: a count (not a set) keeps
    /// such a late release from taking the newer hold with it (review F1).
    held: HashMap<DurableKey, u32>,
    next_pid: i64,
    next_kid: i64,
    next_tid: i64,
}

impl Index {
    fn usage(&mut self, tid: i64) -> &mut Usage {
        self.usage.entry(tid).or_default()
    }

    /// Messages of tenant `tid` kept on path `pid`.
    fn path_tenant_msgs(&self, pid: i64, tid: i64) -> u64 {
        self.path_tenant_msgs.get(&(pid, tid)).copied().unwrap_or(0)
    }

    /// `n` more messages of tenant `tid` kept on path `pid`.
    fn add_path_tenant_msgs(&mut self, pid: i64, tid: i64, n: u64) {
        *self.path_tenant_msgs.entry((pid, tid)).or_default() += n;
    }

    /// `n` messages of tenant `tid` on path `pid` deleted.
    fn sub_path_tenant_msgs(&mut self, pid: i64, tid: i64, n: u64) {
        if let Some(c) = self.path_tenant_msgs.get_mut(&(pid, tid)) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.path_tenant_msgs.remove(&(pid, tid));
            }
        }
    }

    /// Adds a durable to the index (not to the quotas).
    fn add_durable(&mut self, key: DurableKey, d: DurableStat) {
        let k = *key.key_id.as_bytes();
        if self.durables.insert(key, d).is_none() {
            *self.durable_keys.entry(k).or_default() += 1;
        }
    }

    /// Removes a durable from the index and gives its count back to the quotas.
    fn forget_durable(&mut self, key: &DurableKey) -> bool {
        let Some(d) = self.durables.remove(key) else {
            return false;
        };
        let k = key.key_id.as_bytes();
        if let Some(n) = self.durable_keys.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                self.durable_keys.remove(k);
            }
        }
        let u = self.usage(d.tid);
        u.durables = u.durables.saturating_sub(1);
        self.total.durables = self.total.durables.saturating_sub(1);
        true
    }

    /// Removes every durable not held by a subscription for `idle_ms` (0: none) at `now`.
    fn expire_durables(&mut self, now: u64, idle_ms: u64) -> Vec<DurableKey> {
        if idle_ms == 0 {
            return Vec::new();
        }
        let gone: Vec<DurableKey> = self
            .durables
            .iter()
            .filter(|(k, d)| {
                !self.held.contains_key(*k)
                    && d.idle_since
                        .is_some_and(|t| now >= t.saturating_add(idle_ms))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.forget_durable(k);
        }
        gone
    }

    /// Removes a path with nothing stored; returns its pid and, when it was the key id's
    /// last path, the key's kid.
    fn drop_path(&mut self, path: &[u8]) -> Option<(i64, Option<i64>)> {
        let st = self.paths.remove(path)?;
        self.by_pid.remove(&st.pid);
        let u = self.usage(st.owner);
        u.paths = u.paths.saturating_sub(1);
        self.total.paths = self.total.paths.saturating_sub(1);
        let mut gone_kid = None;
        if let Ok(k) = <[u8; 16]>::try_from(&path[..16.min(path.len())]) {
            if let Some(ks) = self.keys.get_mut(&k) {
                ks.paths = ks.paths.saturating_sub(1);
                if ks.paths == 0 {
                    gone_kid = Some(ks.kid);
                    self.keys.remove(&k);
                }
            }
        }
        Some((st.pid, gone_kid))
    }
}

/// One tenant's ids in the dedup window: how many are live, and (lazily) which, oldest
/// first, with their times.
type TenantIds = (usize, VecDeque<([u8; 16], u64)>);

/// A remembered publish id: the publishing tenant's store id and the id. Keyed by tenant,
/// so one tenant's ids neither push another's out nor answer another's publish.
type DedupKey = (i64, [u8; 16]);

/// The QoS 2 dedup window: publish ids per tenant, for `dedup_window_ms`, at most
/// `dedup_max` in all. Over that bound the tenant holding the most ids (of equal counts,
/// the one with the highest store id) gives back its own oldest id, whoever published:
/// a tenant holding no more than `dedup_max / T` ids (T: the tenants with ids in the
/// window) never loses one, so one tenant filling the window leaves every other its
/// share (review F2: before, the publisher gave back its own oldest, and a tenant that
/// filled the window left the others one id each). The queues are lazy (an entry
/// another path removed is skipped when met) and compacted once they hold mostly such
/// entries.
#[derive(Default)]
struct Dedup {
    map: Sharded<DedupKey, (u64, u64)>,
    /// Every id in insertion (= time) order, for the window.
    order: VecDeque<(DedupKey, u64)>,
    /// Per tenant: its live count and its ids in insertion order.
    tenants: HashMap<i64, TenantIds>,
    /// `(live count, tenant)` of every tenant with ids: the largest holder is the last.
    by_count: std::collections::BTreeSet<(usize, i64)>,
}

impl Dedup {
    fn live(&self, k: &DedupKey, ts: u64) -> bool {
        self.map.get(k).is_some_and(|(_, t)| *t == ts)
    }

    /// Removes `k` if it is the entry of time `ts`.
    fn remove(&mut self, k: &DedupKey, ts: u64) -> bool {
        if !self.live(k, ts) {
            return false;
        }
        self.map.remove(k);
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.tenants.entry(k.0) {
            let n = e.get().0;
            self.by_count.remove(&(n, k.0));
            e.get_mut().0 = n.saturating_sub(1);
            if n <= 1 {
                e.remove();
            } else {
                self.by_count.insert((n - 1, k.0));
            }
        }
        true
    }

    fn get(&self, tid: Option<i64>, pid: &[u8; 16]) -> Option<u64> {
        self.map.get(&(tid?, *pid)).map(|(seq, _)| *seq)
    }

    fn prune(&mut self, now: u64, window: u64) {
        while let Some((k, ts)) = self.order.front().copied() {
            if ts.saturating_add(window) >= now {
                break;
            }
            self.order.pop_front();
            self.remove(&k, ts);
        }
    }

    fn insert(&mut self, tid: i64, pid: [u8; 16], seq: u64, ts: u64, max: usize) {
        let k = (tid, pid);
        if let Some((_, old)) = self.map.get(&k).copied() {
            self.remove(&k, old);
        }
        self.map.insert(k, (seq, ts));
        self.order.push_back((k, ts));
        let mine = self.tenants.entry(tid).or_default();
        self.by_count.remove(&(mine.0, tid));
        mine.0 += 1;
        mine.1.push_back((pid, ts));
        self.by_count.insert((mine.0, tid));
        let max = max.max(1);
        while self.map.len() > max {
            // The largest holder's oldest id makes room.
            let Some(&(_, top)) = self.by_count.last() else {
                break;
            };
            let mut removed = false;
            while let Some((p, t)) = self.tenants.get_mut(&top).and_then(|m| m.1.pop_front()) {
                if self.remove(&(top, p), t) {
                    removed = true;
                    break;
                }
            }
            if !removed {
                break;
            }
        }
        // Compaction of entries removed elsewhere (amortised: each pass at least halves).
        let live = self.map.len();
        if self.order.len() > 2 * live + 1024 {
            let map = &self.map;
            self.order
                .retain(|(k, t)| map.get(k).is_some_and(|(_, x)| x == t));
        }
        if let Some(m) = self.tenants.get_mut(&tid) {
            if m.1.len() > 2 * m.0 + 64 {
                let map = &self.map;
                m.1.retain(|(p, t)| map.get(&(tid, *p)).is_some_and(|(_, x)| x == t));
            }
        }
    }
}

/// The `dedup` table's key of a remembered id: the tenant's store id (8 bytes, big
/// endian), then the publish id. Rows of 16 bytes (relays before ids were per tenant) are
/// not read back.
fn dedup_row_key(tid: i64, pid: &[u8; 16]) -> Vec<u8> {
    [&tid.to_be_bytes()[..], &pid[..]].concat()
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    duplicates: AtomicU64,
    commits: AtomicU64,
    trimmed: AtomicU64,
    batch: [AtomicU64; BATCH_BUCKETS.len()],
    batch_sum: AtomicU64,
    commit: [AtomicU64; COMMIT_BUCKETS.len()],
    commit_nanos: AtomicU64,
    quota: super::quota::Refusals,
    full: AtomicU64,
    low_disk: AtomicU64,
    busy: AtomicU64,
    commit_failures: AtomicU64,
    live_only: AtomicU64,
    checkpoints: AtomicU64,
    wal_truncations: AtomicU64,
    /// WAL truncations a reader kept from completing (internal: tests).
    wal_truncation_busy: AtomicU64,
    rows_read: AtomicU64,
}

/// Why the store is refusing writes (cleared by itself once a probe commit succeeds).
#[derive(Debug, Clone)]
enum Down {
    Full(String),
    Failed(String),
}

impl Down {
    fn error(&self) -> StoreError {
        match self {
            Down::Full(m) => StoreError::StorageFull(format!(
                "{m}; the relay retries by itself, publish again later"
            )),
            Down::Failed(m) => StoreError::Unavailable(format!("{m}; the relay retries by itself")),
        }
    }
}

struct Shared {
    kind: &'static str,
    file: Option<PathBuf>,
    cfg: StoreConfig,
    /// The quota limits of `cfg`, with its reserve worked out.
    limits: super::quota::Limits,
    clock: Clock,
    /// The writer's connection (also the reader of a memory store).
    conn: Mutex<Connection>,
    /// A separate reader (file stores): history reads never wait for a commit.
    reader: Option<Mutex<Connection>>,
    last: AtomicU64,
    committed: AtomicU64,
    /// The sequence-space id (`meta` row `seq_space`, 32 hex digits): drawn when the store
    /// is created, kept with its numbers.
    space: [u8; 16],
    queue: Mutex<Queue>,
    work: Condvar,
    idx: Mutex<Index>,
    dedup: Mutex<Dedup>,
    down: Mutex<Option<Down>>,
    /// Free bytes the store can write into, as the writer last measured them: the store
    /// file's file system's free space plus the file's free pages (`u64::MAX`: not known —
    /// a memory store, or no `statvfs`).
    free: AtomicU64,
    /// The file system's own free space, as last measured (`u64::MAX`: not known): the WAL
    /// grows into it, never into the file's free pages.
    fs_free: AtomicU64,
    /// Writer turns `bound_wal` still skips after a truncation a reader kept from
    /// completing, and the length of the last such pause (8 turns, doubling up to 64;
    /// back to 0 after a truncation).
    wal_skip: AtomicU64,
    wal_backoff: AtomicU64,
    /// The writer connection's busy timeout (ms; 5 s), restored after a WAL truncation.
    busy_ms: AtomicU64,
    /// Whether the last measurement was below `min_free_bytes` (logged on each change).
    low: AtomicBool,
    /// Sequence ranges dropped by a failed commit: never acknowledged as durable.
    lost: Mutex<VecDeque<(u64, u64)>>,
    stop_checkpointer: AtomicBool,
    checkpoint_wake: (Mutex<bool>, Condvar),
    /// Held by the background checkpointer during its PASSIVE checkpoint, and by
    /// `bound_wal` during its truncation: SQLite answers a TRUNCATE checkpoint that meets
    /// another checkpoint with SQLITE_BUSY at once, so under a flood the writer's
    /// truncations kept colliding with the checkpointer's (which runs every 50 ms) and the
    /// WAL passed twice its limit (test `store_hostile::the_wal_stays_bounded_during_a_flood`,
    /// 147 MB under load). Past the limit the writer waits for a running checkpoint to end.
    checkpointing: Mutex<()>,
    m: Counters,
    /// Bumped after every turn of the writer (a commit, a sweep, a failure, a recovery
    /// probe): see [`SqliteStore::changes`].
    changes: tokio::sync::watch::Sender<u64>,
    /// Where durables deleted for idleness are announced ([`Store::take_gone`]), once
    /// taken; until then they wait in `gone_backlog` (only those deleted at start: later
    /// ones are not kept for a receiver nobody took).
    gone: Mutex<Option<tokio::sync::mpsc::UnboundedSender<DurableKey>>>,
    gone_backlog: Mutex<Vec<DurableKey>>,
    /// Tests: run once by the writer's sweep after it expired idle durables (index and
    /// queue let go), before it deletes their rows.
    #[cfg(test)]
    after_expiry: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lowers the calling thread's scheduling priority by `by` nice steps (`store.thread_nice`,
/// default 0): on Linux, nice is per thread, so the routing workers keep theirs. Measured
/// (relay/README.md "Hostile clients"): beside a stored publish flood the honest client's
/// p99 went from 35–64 ms to 19–31 ms with the store threads 15 steps lower, but durable
/// publishes/s fell by half even at 3 steps, hence off by default.
fn lower_priority(by: u8) {
    #[cfg(target_os = "linux")]
    if by > 0 {
        let now = rustix::process::getpriority_process(None).unwrap_or(0);
        let to = (now + i32::from(by)).min(19);
        if let Err(e) = rustix::process::setpriority_process(None, to) {
            tracing::debug!(error = %e, "could not lower the store thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = by;
}

/// SQLite-backed store (file or memory). See the module docs.
pub struct SqliteStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    _lock_file: Mutex<Option<Connection>>,
}

impl SqliteStore {
    /// What a kept envelope of `len` bytes counts against the byte quotas
    /// (`tenant_max_bytes`, `total_max_bytes`): its share of the file's pages (`disk_bytes`).
    pub fn quota_bytes_of(len: u64) -> u64 {
        disk_bytes(len)
    }

    /// A counter bumped after every turn of the store's writer — a group commit, a
    /// retention sweep, a failed commit, a recovery probe — so a caller can wait for the
    /// store's [`status`](Store::status) to change (`wait_for`) instead of polling it.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// What waits for the writer now, not counting the batch it is committing: the
    /// operations queued, and the durable floors waiting merged (one per durable). For
    /// tests; a relay never needs it.
    #[doc(hidden)]
    pub fn queued_writes(&self) -> (usize, usize) {
        let q = lock(&self.shared.queue);
        (q.len, q.floors.len())
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("kind", &self.shared.kind)
            .field("file", &self.shared.file)
            .field("last", &self.shared.last.load(Relaxed))
            .finish_non_exhaustive()
    }
}

fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            format!("is not an SQLite database or its header is damaged ({e})")
        }
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked) => {
            format!("is in use by another process, probably another relay ({e})")
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => format!("is damaged ({e})"),
        _ if is_symlink(e) => {
            "is a symbolic link, or its directory part holds one: refused, not followed".into()
        }
        _ => e.to_string(),
    }
}

/// A refusal of an open with `SQLITE_OPEN_NOFOLLOW` ([`SqliteStore::open_file_nofollow`]).
fn is_symlink(e: &rusqlite::Error) -> bool {
    e.sqlite_error()
        .is_some_and(|f| f.extended_code == rusqlite::ffi::SQLITE_CANTOPEN_SYMLINK)
}

fn validate(conn: &Connection) -> Result<(), String> {
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| describe(&e))?;
    if app != APP_ID {
        return Err(format!(
            "is not a whispeer relay store (SQLite application_id {app:#x}, expected \
             {APP_ID:#x}); refusing to use it — point store.path at a new file or at a relay store"
        ));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| describe(&e))?;
    if version != SCHEMA_VERSION {
        return Err(format!(
            "has store schema version {version}; this relay reads version {SCHEMA_VERSION}"
        ));
    }
    let marker: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| format!("has no readable schema marker: {}", describe(&e)))?;
    if marker.as_deref() != Some(SCHEMA_MARKER) {
        return Err(format!(
            "has schema marker {marker:?}, expected {SCHEMA_MARKER:?}: not a whispeer relay store"
        ));
    }
    let mut st = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| describe(&e))?;
    let report: Vec<String> = st
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| format!("failed PRAGMA quick_check: {}", describe(&e)))?;
    if report != ["ok"] {
        let first: Vec<_> = report.into_iter().take(5).collect();
        return Err(format!(
            "is damaged: PRAGMA quick_check reported: {}",
            first.join("; ")
        ));
    }
    Ok(())
}

fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "BEGIN;
         PRAGMA application_id = {APP_ID};
         PRAGMA user_version = {SCHEMA_VERSION};
         CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
         INSERT INTO meta VALUES ('schema', '{SCHEMA_MARKER}'), ('last_seq', '0'), ('clean', '1');
         CREATE TABLE tenants(id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE);
         CREATE TABLE keys(id INTEGER PRIMARY KEY, key_id BLOB NOT NULL UNIQUE);
         CREATE TABLE paths(id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE,
                            kid INTEGER NOT NULL, tid INTEGER NOT NULL);
         CREATE INDEX paths_kid ON paths(kid);
         CREATE TABLE msgs(seq INTEGER PRIMARY KEY, kid INTEGER NOT NULL, pid INTEGER NOT NULL,
                           tid INTEGER NOT NULL, ts INTEGER NOT NULL, flags INTEGER NOT NULL,
                           env BLOB NOT NULL);
         CREATE INDEX msgs_kid ON msgs(kid, seq);
         CREATE INDEX msgs_pid ON msgs(pid, seq);
         CREATE TABLE retained(pid INTEGER PRIMARY KEY, kid INTEGER NOT NULL,
                               tid INTEGER NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
                               env BLOB NOT NULL);
         CREATE INDEX retained_kid ON retained(kid, seq);
         CREATE INDEX retained_ts ON retained(ts);
         CREATE TABLE durables(key_id BLOB NOT NULL, name TEXT NOT NULL, floor INTEGER NOT NULL,
                               tid INTEGER NOT NULL, idle INTEGER, PRIMARY KEY (key_id, name));
         CREATE TABLE dedup(pid BLOB PRIMARY KEY, seq INTEGER NOT NULL, ts INTEGER NOT NULL);
         COMMIT;"
    ))
}

/// Brings a store written by an older relay up to date without changing its schema
/// version (older relays still read it): the `durables.idle` column (Unix ms since when no
/// subscription holds the durable; NULL: held, or not known — counted from the start).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_idle = conn
        .prepare("SELECT 1 FROM pragma_table_info('durables') WHERE name = 'idle'")?
        .exists([])?;
    if !has_idle {
        conn.execute_batch("ALTER TABLE durables ADD COLUMN idle INTEGER")?;
    }
    Ok(())
}

/// Throughput settings. No automatic checkpoint on the commit path (a background thread
/// checkpoints); the WAL is cut back to 64 MiB when it restarts; the page cache holds the
/// hot part of the tables and indexes.
fn tune(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
    conn.pragma_update(None, "cache_size", -65536)?;
    Ok(())
}

/// Whether an SQLite error means the disk (or the file size limit) is full.
fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull))
        || e.to_string().contains("No space left")
}

/// Counters and ids read back from the file (at start, and after a failed commit).
struct Loaded {
    idx: Index,
    dedup: Dedup,
}

fn load(conn: &Connection, cfg: &StoreConfig, now: u64) -> Result<Loaded, String> {
    let err = |e: rusqlite::Error| describe(&e);
    // Path and key id rows a publish left without its message: the batch that created them
    // committed and the one with the message did not (a full disk, with a backlog, splits a
    // publish across two batches), or the relay stopped between them. Nothing refers to
    // them, and they were not loaded: the next publish to that path inserted them again and
    // its whole batch (every tenant's writes in it) failed on the UNIQUE constraint, reload
    // after reload, across restarts. Best effort: left for the next load if this fails.
    if let Err(e) = conn.execute_batch(
        "DELETE FROM paths WHERE NOT EXISTS (SELECT 1 FROM msgs WHERE msgs.pid = paths.id)
                           AND NOT EXISTS (SELECT 1 FROM retained WHERE retained.pid = paths.id);
         DELETE FROM keys WHERE NOT EXISTS (SELECT 1 FROM paths WHERE paths.kid = keys.id);",
    ) {
        tracing::warn!(error = %describe(&e), "store: rows without messages not removed");
    }
    let mut idx = Index::default();
    {
        let mut st = conn.prepare("SELECT id, key FROM tenants").map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let id: i64 = r.get(0).map_err(err)?;
            idx.tenants.insert(r.get(1).map_err(err)?, id);
            idx.next_tid = idx.next_tid.max(id);
        }
    }
    let mut kids: HashMap<i64, [u8; 16]> = HashMap::new();
    {
        let mut st = conn.prepare("SELECT id, key_id FROM keys").map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let id: i64 = r.get(0).map_err(err)?;
            let k: Vec<u8> = r.get(1).map_err(err)?;
            let k = <[u8; 16]>::try_from(k.as_slice())
                .map_err(|_| "is damaged: a key id is not 16 bytes".to_string())?;
            kids.insert(id, k);
            idx.next_kid = idx.next_kid.max(id);
        }
    }
    let mut all_paths: HashMap<i64, (Vec<u8>, i64, i64)> = HashMap::new();
    {
        let mut st = conn
            .prepare("SELECT id, path, kid, tid FROM paths")
            .map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let id: i64 = r.get(0).map_err(err)?;
            all_paths.insert(
                id,
                (
                    r.get(1).map_err(err)?,
                    r.get(2).map_err(err)?,
                    r.get(3).map_err(err)?,
                ),
            );
            idx.next_pid = idx.next_pid.max(id);
        }
    }
    let path_stat = |idx: &mut Index, pid: i64| -> Option<Vec<u8>> {
        if let Some(p) = idx.by_pid.get(&pid) {
            return Some(p.clone());
        }
        let (path, kid, owner) = all_paths.get(&pid)?.clone();
        idx.paths.insert(
            path.clone(),
            PathStat {
                pid,
                kid,
                owner,
                count: 0,
                bytes: 0,
                first_seq: 0,
                last_seq: 0,
                retained: None,
            },
        );
        idx.by_pid.insert(pid, path.clone());
        Some(path)
    };
    {
        let mut st = conn
            .prepare(
                "SELECT pid, tid, length(env), count(*), min(seq), max(seq)
                 FROM msgs GROUP BY pid, tid, length(env)",
            )
            .map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let pid: i64 = r.get(0).map_err(err)?;
            let tid: i64 = r.get(1).map_err(err)?;
            let len = r.get::<_, i64>(2).map_err(err)? as u64;
            let n = r.get::<_, i64>(3).map_err(err)? as u64;
            let (b, cost) = (len * n, disk_bytes(len) * n);
            let lo = r.get::<_, i64>(4).map_err(err)? as u64;
            let hi = r.get::<_, i64>(5).map_err(err)? as u64;
            let Some(path) = path_stat(&mut idx, pid) else {
                return Err(format!("is damaged: messages of unknown path id {pid}"));
            };
            idx.add_path_tenant_msgs(pid, tid, n);
            if let Some(st) = idx.paths.get_mut(&path) {
                st.first_seq = if st.count == 0 {
                    lo
                } else {
                    st.first_seq.min(lo)
                };
                st.last_seq = st.last_seq.max(hi);
                st.count += n;
                st.bytes += b;
            }
            let u = idx.usage(tid);
            u.msgs += n;
            u.bytes += cost;
            idx.total.msgs += n;
            idx.total.bytes += cost;
            idx.envelope_bytes += b;
        }
    }
    {
        let mut st = conn
            .prepare("SELECT pid, tid, length(env), seq FROM retained")
            .map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let pid: i64 = r.get(0).map_err(err)?;
            let tid: i64 = r.get(1).map_err(err)?;
            let b = r.get::<_, i64>(2).map_err(err)? as u64;
            let seq = r.get::<_, i64>(3).map_err(err)? as u64;
            let Some(path) = path_stat(&mut idx, pid) else {
                return Err(format!(
                    "is damaged: a retained value of unknown path id {pid}"
                ));
            };
            if let Some(st) = idx.paths.get_mut(&path) {
                st.retained = Some((tid, b, seq));
            }
            let u = idx.usage(tid);
            u.retained += 1;
            u.bytes += disk_bytes(b);
            idx.total.retained += 1;
            idx.total.bytes += disk_bytes(b);
            idx.envelope_bytes += b;
        }
    }
    // Distinct paths and key ids in use.
    let live: Vec<(i64, i64)> = idx.paths.values().map(|s| (s.owner, s.kid)).collect();
    for (owner, kid) in live {
        idx.usage(owner).paths += 1;
        idx.total.paths += 1;
        if let Some(k) = kids.get(&kid) {
            idx.keys
                .entry(*k)
                .or_insert(KeyStat {
                    kid,
                    paths: 0,
                    last_write: 0,
                })
                .paths += 1;
        }
    }
    {
        let mut st = conn
            .prepare("SELECT key_id, name, floor, tid, idle FROM durables")
            .map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let key_id: Vec<u8> = r.get(0).map_err(err)?;
            let key_id = KeyId::from_slice(&key_id)
                .map_err(|e| format!("is damaged: a durable key id is invalid ({e})"))?;
            let name: String = r.get(1).map_err(err)?;
            let floor = r.get::<_, i64>(2).map_err(err)? as u64;
            let tid: i64 = r.get(3).map_err(err)?;
            // Unknown (held when the relay stopped, or an older relay's row): idle from now.
            let idle = r.get::<_, Option<i64>>(4).map_err(err)?;
            idx.add_durable(
                DurableKey { key_id, name },
                DurableStat {
                    floor,
                    tid,
                    idle_since: Some(idle.map_or(now, |t| t.max(0) as u64)),
                    created_at: 0,
                },
            );
            idx.usage(tid).durables += 1;
            idx.total.durables += 1;
        }
    }
    idx.next_pid += 1;
    idx.next_kid += 1;
    idx.next_tid += 1;
    let mut dedup = Dedup::default();
    {
        let mut st = conn
            .prepare("SELECT pid, seq, ts FROM dedup WHERE ts >= ?1 ORDER BY ts")
            .map_err(err)?;
        let since = now.saturating_sub(cfg.dedup_window_ms) as i64;
        let mut rows = st.query([since]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let key: Vec<u8> = r.get(0).map_err(err)?;
            if key.len() != 24 {
                continue;
            }
            let (t, p) = key.split_at(8);
            let (Ok(tid), Ok(pid)) = (<[u8; 8]>::try_from(t), <[u8; 16]>::try_from(p)) else {
                continue;
            };
            dedup.insert(
                i64::from_be_bytes(tid),
                pid,
                r.get::<_, i64>(1).map_err(err)? as u64,
                r.get::<_, i64>(2).map_err(err)? as u64,
                cfg.dedup_max,
            );
        }
    }
    Ok(Loaded { idx, dedup })
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

/// The store's sequence-space id, drawn and saved the first time (a store written before
/// ids existed gets one on its next start: its numbers go on, so later positions match).
fn seq_space(conn: &Connection) -> rusqlite::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    if let Some(h) = meta(conn, "seq_space")? {
        if hex::decode_to_slice(h.trim(), &mut id).is_ok() {
            return Ok(id);
        }
    }
    let id = crate::store::new_seq_space();
    set_meta(conn, "seq_space", &hex::encode(id))?;
    Ok(id)
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(drop)
}

/// At start: one warning when the stored bytes exceed `tenant_max_bytes` (naming how many
/// tenants do) or `total_max_bytes`. Since the byte quotas count what a message takes in
/// the file (its pages, [`disk_bytes`]) rather than its envelope, a store written by an
/// older relay is counted at up to ~2× (small or just-over-half-page envelopes): tenants
/// near their limit get `quota_exceeded` right after the upgrade, until retention brings
/// them under (review F-D).
fn warn_over_byte_quotas(idx: &Index, cfg: &StoreConfig) {
    let tenant_max = cfg.tenant_max_bytes;
    let over = if tenant_max > 0 {
        idx.usage.values().filter(|u| u.bytes > tenant_max).count()
    } else {
        0
    };
    let (total, total_max) = (idx.total.bytes, cfg.total_max_bytes);
    let total_over = total_max > 0 && total > total_max;
    if over == 0 && !total_over {
        return;
    }
    tracing::warn!(
        tenants_over = over,
        tenant_max_bytes = tenant_max,
        total_bytes = total,
        total_max_bytes = total_max,
        "store: {over} tenant(s) hold more than store.tenant_max_bytes ({tenant_max}) and the \
         store holds {total} of store.total_max_bytes ({total_max}), as the byte quotas count \
         (what a message takes in the file's pages: up to about twice its envelope for small \
         envelopes; a store written by a relay that counted envelopes is counted higher now): \
         their stored publishes are refused (quota_exceeded) until retention brings them \
         under; raise the limits to keep accepting them (relay/README.md, \"What a stored \
         byte costs\")"
    );
}

/// Free bytes of the file system holding `p` for this process (`f_bavail`: what an
/// unprivileged writer may still use).
fn free_space(p: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::fs::statvfs(p)
            .ok()
            .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        None
    }
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The WAL file of the store file `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-lock");
    PathBuf::from(p)
}

impl SqliteStore {
    /// What `/status` shows of this store besides its counts (file, retention, sequences,
    /// state); the counts zero, for [`Store::status`] and [`Store::status_counts`] to fill.
    fn status_frame(&self) -> StoreStatus {
        let s = &self.shared;
        let file_bytes = s
            .file
            .as_ref()
            .map_or(0, |f| file_size(f) + file_size(&wal_path(f)));
        StoreStatus {
            kind: s.kind.into(),
            file: s.file.as_ref().map(|f| f.display().to_string()),
            file_bytes,
            retention: RetentionStatus {
                max_messages: s.cfg.max_messages,
                max_bytes: s.cfg.max_bytes,
                max_age_ms: s.cfg.max_age_ms,
            },
            last_seq: s.last.load(Relaxed),
            committed_seq: s.committed.load(Relaxed),
            dedup_entries: lock(&s.dedup).map.len() as u64,
            state: match s.down() {
                None if s.low.load(Relaxed) => "low_disk".into(),
                None => "ok".into(),
                Some(Down::Full(_)) => "storage_full".into(),
                Some(Down::Failed(_)) => "unavailable".into(),
            },
            disk_free_bytes: Some(s.free.load(Relaxed)).filter(|f| *f != u64::MAX),
            min_free_bytes: if s.file.is_some() {
                s.cfg.min_free_bytes
            } else {
                0
            },
            ..StoreStatus::default()
        }
    }

    /// Opens (or creates) the store file `config.path`. An existing file must be a
    /// whispeer relay store that passes `PRAGMA quick_check`.
    pub fn open_file(config: StoreConfig) -> Result<Self, StoreError> {
        Self::open_file_with_clock(config, system_clock())
    }

    /// [`open_file`](Self::open_file) with an injected wall clock (Unix ms).
    pub fn open_file_with_clock(config: StoreConfig, clock: Clock) -> Result<Self, StoreError> {
        Self::open_file_as(config, clock, OpenFlags::empty())
    }

    /// [`open_file`](Self::open_file), refusing symbolic links: every connection to the
    /// store file and to its `-lock` (the writer, the reader, the checkpointer) is opened
    /// with `SQLITE_OPEN_NOFOLLOW`, so a symbolic link at the path, or in its directory
    /// part, when SQLite opens it is refused ([`StoreError::Open`]: `store file … is a
    /// symbolic link …`) and its target neither read, written nor created. SQLite opens
    /// the `-wal` and `-shm` with `O_NOFOLLOW` itself. For a caller that checked the file
    /// first (the `whispeer` Broker's guard): a link swapped in after the check is not
    /// followed. Pass a path whose directory part is already resolved. `open_file` (the
    /// `whispeer-relay` CLI) follows links: an operator may link the store elsewhere.
    pub fn open_file_nofollow(config: StoreConfig) -> Result<Self, StoreError> {
        Self::open_file_as(config, system_clock(), OpenFlags::SQLITE_OPEN_NOFOLLOW)
    }

    /// The open: `nofollow` is empty or `SQLITE_OPEN_NOFOLLOW`, added to every connection.
    fn open_file_as(
        config: StoreConfig,
        clock: Clock,
        nofollow: OpenFlags,
    ) -> Result<Self, StoreError> {
        let path = config.path.clone();
        let fail =
            |what: String| StoreError::Open(format!("store file {}: {what}", path.display()));
        // A second relay on the same store is kept off by an exclusive lock held for the
        // store's lifetime on a small sidecar SQLite file (`locking_mode = EXCLUSIVE` keeps
        // the lock after the first write).
        let lock_file = (|| -> rusqlite::Result<Connection> {
            let c = Connection::open_with_flags(lock_path(&path), OpenFlags::default() | nofollow)?;
            c.busy_timeout(Duration::ZERO)?;
            c.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            c.execute_batch(
                "BEGIN EXCLUSIVE;
                 CREATE TABLE IF NOT EXISTS lock(x INTEGER);
                 DELETE FROM lock;
                 COMMIT;",
            )?;
            Ok(c)
        })()
        .map_err(|e| match describe(&e) {
            // The link is the lock file's: named.
            d if is_symlink(&e) => {
                fail(format!("its lock file {} {d}", lock_path(&path).display()))
            }
            d => fail(d),
        })?;
        let existed = file_size(&path) > 0;
        let conn = Connection::open_with_flags(&path, OpenFlags::default() | nofollow)
            .map_err(|e| fail(describe(&e)))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| fail(describe(&e)))?;
        if existed {
            validate(&conn).map_err(fail)?;
        } else {
            // 16 KiB pages hold several 1 KiB envelopes each; set before the file exists.
            conn.pragma_update(None, "page_size", 16384)
                .map_err(|e| fail(describe(&e)))?;
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| fail(describe(&e)))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(format!("cannot switch to WAL mode (got {mode})")));
        }
        let sync = match config.sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(|e| fail(describe(&e)))?;
        tune(&conn).map_err(|e| fail(describe(&e)))?;
        if !existed {
            init_schema(&conn).map_err(|e| fail(format!("cannot create the schema: {e}")))?;
        }
        let side = || -> rusqlite::Result<Connection> {
            let c = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | nofollow,
            )?;
            c.busy_timeout(Duration::from_secs(5))?;
            c.pragma_update(None, "wal_autocheckpoint", 0)?;
            Ok(c)
        };
        let reader = side().map_err(|e| fail(describe(&e)))?;
        reader
            .pragma_update(None, "cache_size", -16384)
            .map_err(|e| fail(describe(&e)))?;
        let checkpointer = side().map_err(|e| fail(describe(&e)))?;
        Self::start(
            conn,
            Some(reader),
            Some(checkpointer),
            config.clone(),
            "sqlite",
            Some(path.clone()),
            clock,
            Some(lock_file),
        )
        .map_err(fail)
    }

    /// An in-memory store with the same behaviour (nothing survives the process).
    pub fn open_memory(config: StoreConfig) -> Result<Self, StoreError> {
        Self::open_memory_with_clock(config, system_clock())
    }

    /// [`open_memory`](Self::open_memory) with an injected wall clock (Unix ms).
    pub fn open_memory_with_clock(config: StoreConfig, clock: Clock) -> Result<Self, StoreError> {
        let fail = |what: String| StoreError::Open(format!("memory store: {what}"));
        let conn = Connection::open_in_memory().map_err(|e| fail(e.to_string()))?;
        conn.pragma_update(None, "page_size", 16384)
            .and_then(|_| tune(&conn))
            .map_err(|e| fail(e.to_string()))?;
        init_schema(&conn).map_err(|e| fail(e.to_string()))?;
        Self::start(conn, None, None, config, "memory", None, clock, None).map_err(fail)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        conn: Connection,
        reader: Option<Connection>,
        checkpointer: Option<Connection>,
        cfg: StoreConfig,
        kind: &'static str,
        file: Option<PathBuf>,
        clock: Clock,
        lock_file: Option<Connection>,
    ) -> Result<Self, String> {
        let now = clock();
        let err = |e: rusqlite::Error| describe(&e);
        let stored_last: u64 = meta(&conn, "last_seq")
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let max_seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM msgs", [], |r| r.get(0))
            .map_err(err)?;
        let clean = meta(&conn, "clean").map_err(err)?.as_deref() == Some("1");
        let mut last = stored_last.max(max_seq as u64);
        if !clean {
            // Sequences past the persisted mark may have been delivered live before the
            // crash: queued writes, one batch, and live-only sequences between two marks.
            last += (cfg.queue + cfg.max_batch) as u64 + 2 * PERSIST_EVERY + 1;
        }
        set_meta(&conn, "last_seq", &last.to_string()).map_err(err)?;
        set_meta(&conn, "clean", "0").map_err(err)?;
        let space = seq_space(&conn).map_err(err)?;
        migrate(&conn).map_err(err)?;
        let Loaded { mut idx, dedup } = load(&conn, &cfg, now)?;
        warn_over_byte_quotas(&idx, &cfg);
        // Durables idle past `durable_idle_ms` while the relay was down go before the first
        // `Sub` can count them against a quota.
        let expired = idx.expire_durables(now, cfg.durable_idle_ms);
        for k in &expired {
            conn.execute(
                "DELETE FROM durables WHERE key_id = ?1 AND name = ?2",
                params![&k.key_id.as_bytes()[..], &k.name],
            )
            .map_err(err)?;
        }

        let shared = Arc::new(Shared {
            kind,
            file,
            limits: super::quota::Limits::of(&cfg),
            cfg,
            clock,
            conn: Mutex::new(conn),
            reader: reader.map(Mutex::new),
            last: AtomicU64::new(last),
            committed: AtomicU64::new(last),
            space,
            queue: Mutex::new(Queue {
                persist_at: last + PERSIST_EVERY,
                ..Queue::default()
            }),
            work: Condvar::new(),
            idx: Mutex::new(idx),
            dedup: Mutex::new(dedup),
            down: Mutex::new(None),
            free: AtomicU64::new(u64::MAX),
            fs_free: AtomicU64::new(u64::MAX),
            wal_skip: AtomicU64::new(0),
            wal_backoff: AtomicU64::new(0),
            busy_ms: AtomicU64::new(5000),
            low: AtomicBool::new(false),
            lost: Mutex::new(VecDeque::new()),
            stop_checkpointer: AtomicBool::new(false),
            checkpoint_wake: (Mutex::new(false), Condvar::new()),
            checkpointing: Mutex::new(()),
            m: Counters::default(),
            changes: tokio::sync::watch::Sender::new(0),
            gone: Mutex::new(None),
            gone_backlog: Mutex::new(expired),
            #[cfg(test)]
            after_expiry: Mutex::new(None),
        });
        shared.measure_disk();
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("whispeer-store".into())
            .spawn(move || s.writer_loop())
            .map_err(|e| format!("cannot start the writer thread: {e}"))?;
        let checkpointer = match checkpointer {
            Some(c) => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("whispeer-checkpoint".into())
                        .spawn(move || s.checkpoint_loop(c))
                        .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?,
                )
            }
            None => None,
        };
        Ok(Self {
            shared,
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(checkpointer),
            _lock_file: Mutex::new(lock_file),
        })
    }
}

/// Rows deleted by one commit's retention, per path and per tenant.
#[derive(Default)]
struct Deltas {
    /// pid → (messages, bytes, new first sequence).
    paths: HashMap<i64, (u64, u64, u64)>,
    /// tid → (messages, bytes as the quotas count them: [`disk_bytes`]).
    tenants: HashMap<i64, (u64, u64)>,
    /// Envelope bytes of the messages deleted.
    envelope_bytes: u64,
    /// Expired retained values: (pid, tid, bytes, seq).
    retained: Vec<(i64, i64, u64, u64)>,
    /// (pid, tid) → messages deleted.
    by_path_tenant: HashMap<(i64, i64), u64>,
}

impl Deltas {
    fn msg(&mut self, pid: i64, tid: i64, seq: u64, bytes: u64) {
        let p = self.paths.entry(pid).or_insert((0, 0, 0));
        p.0 += 1;
        p.1 += bytes;
        p.2 = p.2.max(seq + 1);
        let t = self.tenants.entry(tid).or_insert((0, 0));
        t.0 += 1;
        t.1 += disk_bytes(bytes);
        self.envelope_bytes += bytes;
        *self.by_path_tenant.entry((pid, tid)).or_default() += 1;
    }
}

impl Shared {
    fn down(&self) -> Option<Down> {
        lock(&self.down).clone()
    }

    /// Measures the free space the store can write into (file stores): the free space of
    /// the store file's file system plus the file's own free pages (`freelist_count ×
    /// page_size`: pages retention and expiry gave back, which the file reuses before it
    /// grows — there is no auto_vacuum, so they never return to the file system), keeps it
    /// for `append`'s reserve check and `/status`, and logs when it falls below
    /// `min_free_bytes` or comes back. Without the free pages, a store file that itself ate
    /// into the reserve stayed `low_disk` for good however much expired (test
    /// `store_hostile::expired_messages_make_room_inside_the_file_for_new_ones`). The
    /// WAL's room comes back to the file system instead: on an idle turn while space is low
    /// `bound_wal` truncates it. Called by the writer after every turn (a commit, or an idle
    /// second) and before each recovery attempt. Returns it (`None`: not known).
    fn measure_disk(&self) -> Option<u64> {
        // (A memory store keeps "not known", set at the start.)
        let file = self.file.as_deref()?;
        let fs = free_space(file);
        self.fs_free.store(fs.unwrap_or(u64::MAX), Relaxed);
        let free = fs.map(|f| f.saturating_add(self.free_pages()));
        self.free.store(free.unwrap_or(u64::MAX), Relaxed);
        let min = self.cfg.min_free_bytes;
        let low = free.is_some_and(|f| f < min);
        if self.low.swap(low, Relaxed) != low {
            let file = file.display();
            let free = free.unwrap_or(0);
            if low {
                tracing::warn!(
                    free,
                    min_free_bytes = min,
                    "store: the file system holding {file} has {free} bytes free (with the \
                     file's free pages), below store.min_free_bytes ({min}): publishes that \
                     need the store are refused (storage_full, retryable) until space frees"
                );
            } else {
                tracing::info!(
                    free,
                    min_free_bytes = min,
                    "store: the file system holding {file} has {free} bytes free again: \
                     publishes are stored"
                );
            }
        }
        free
    }

    /// Bytes of the store file's free pages (0 if they cannot be read).
    fn free_pages(&self) -> u64 {
        let conn = lock(&self.conn);
        let q = |p: &str| conn.query_row(p, [], |r| r.get::<_, i64>(0));
        match (q("PRAGMA freelist_count"), q("PRAGMA page_size")) {
            (Ok(n), Ok(size)) => (n.max(0) as u64).saturating_mul(size.max(0) as u64),
            _ => 0,
        }
    }

    /// Checkpoints the WAL into the file and truncates it (`wal_checkpoint(TRUNCATE)`, on
    /// the writer's connection, between two commits: publishes wait in the queue meanwhile)
    /// when it has grown past [`WAL_LIMIT`], and on an idle turn (`idle`: nothing
    /// committed) while free space is below `min_free_bytes` or the disk is full, so the room
    /// it holds comes back. With commits back to back the background PASSIVE checkpoint
    /// copies pages but never catches up with the WAL's end, so the WAL never restarted: it
    /// grew with a flood (8× its envelopes for 160-byte ones; test
    /// `store_hostile::the_wal_stays_bounded_during_a_flood`). If a reader holds an old
    /// snapshot beyond [`WAL_TRUNCATE_WAIT`] the checkpoint gives up, and the writer skips
    /// the next 8 turns (doubling up to 64) before it tries again.
    fn bound_wal(&self, idle: bool) {
        let Some(file) = self.file.as_deref() else {
            return;
        };
        let wal = file_size(&wal_path(file));
        // (The file system's own free space too: the free space `low` counts includes the
        // file's free pages, which the WAL cannot grow into.)
        let short = self.low.load(Relaxed)
            || self.down().is_some()
            || self.fs_free.load(Relaxed) < self.cfg.min_free_bytes;
        if wal <= WAL_LIMIT && !(idle && short && wal > 0) {
            return;
        }
        // After a truncation a reader kept from completing, the next few turns do not
        // try (`wal_backoff`) — until the WAL is half as large again as the limit: past it
        // every turn tries (50 ms at most each), since a flood under load grew it past
        // twice the limit while the writer skipped its turns (the busy truncations then
        // were the background checkpoint's, not a reader's).
        let skip = self.wal_skip.load(Relaxed);
        if skip > 0 && wal <= WAL_LIMIT + WAL_LIMIT / 2 {
            self.wal_skip.store(skip - 1, Relaxed);
            return;
        }
        let r = {
            // Past the limit, after the background checkpoint running now (one pass over
            // a WAL near the limit); an idle truncation does not wait for it.
            let _ckpt = if wal > WAL_LIMIT {
                lock(&self.checkpointing)
            } else {
                match self.checkpointing.try_lock() {
                    Ok(g) => g,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return,
                }
            };
            // A short wait for readers, not the writer's 5 s: a reader holding an old
            // snapshot made every writer turn block 5 s while the WAL was past the limit —
            // one commit per 5 s (review F-G).
            let conn = lock(&self.conn);
            let _ = conn.busy_timeout(WAL_TRUNCATE_WAIT);
            let r = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
            let _ = conn.busy_timeout(Duration::from_millis(self.busy_ms.load(Relaxed)));
            r
        };
        match r {
            Ok(0) => {
                self.m.wal_truncations.fetch_add(1, Relaxed);
                self.wal_backoff.store(0, Relaxed);
                tracing::debug!(wal, "store: WAL checkpointed and truncated");
                self.measure_disk();
            }
            r => {
                self.m.wal_truncation_busy.fetch_add(1, Relaxed);
                let turns = (self.wal_backoff.load(Relaxed) * 2).clamp(8, 64);
                self.wal_backoff.store(turns, Relaxed);
                self.wal_skip.store(turns, Relaxed);
                match r {
                    Err(e) => tracing::debug!(error = %e, wal, "store: WAL truncation failed"),
                    _ => tracing::debug!(wal, turns, "store: WAL truncation waits for a reader"),
                }
            }
        }
    }

    /// Refuses a write of envelopes taking `add` bytes on disk ([`disk_bytes`]) when the
    /// file system would keep less than `min_free_bytes` once everything queued is
    /// written: free space as last measured (with the file's free pages), less twice what
    /// the queued and new envelopes take on disk (each page is written to the WAL, then
    /// copied into the file; counting envelope bytes, an 8.3 KB envelope alone in its
    /// 16 KiB page was counted at a quarter of what it writes) — or when the file system's own free
    /// space would not hold that much (the WAL's copy cannot go into the file's free
    /// pages). Called under the queue lock.
    fn check_free(&self, q: &Queue, add: u64) -> Result<(), StoreError> {
        let min = self.cfg.min_free_bytes;
        let free = self.free.load(Relaxed);
        if min == 0 || free == u64::MAX {
            return Ok(());
        }
        let need = q.disk.saturating_add(add).saturating_mul(2);
        if free.saturating_sub(need) >= min && self.fs_free.load(Relaxed) >= need {
            return Ok(());
        }
        self.m.low_disk.fetch_add(1, Relaxed);
        Err(StoreError::StorageFull(format!(
            "the relay's disk has {free} bytes free ({need} more are on their way to it) and \
             keeps {min} free (store.min_free_bytes); the relay retries by itself, publish \
             again later"
        )))
    }

    /// Tells the relay (if it took [`Store::take_gone`]) which durables are gone.
    fn announce_gone(&self, keys: Vec<DurableKey>) {
        if let Some(tx) = lock(&self.gone).as_ref() {
            for k in keys {
                let _ = tx.send(k);
            }
        }
    }

    /// Numbers a message and queues its operations in one step under the queue lock (the
    /// `seq: 0` fields of its `Msg`, `Retain` and `Dedup` operations are set to the new
    /// sequence). Appends on different key ids run concurrently (the router locks per key
    /// id shard), so sequence order must be queue order — the committed mark assumes every
    /// sequence below a committed one was queued before it — and a live-only append reads
    /// the queue in the same critical section. Returns the sequence.
    fn enqueue(&self, mut ops: Vec<Op>, msgs: usize) -> u64 {
        let q = lock(&self.queue);
        let seq = self.last.load(Relaxed) + 1;
        self.last.store(seq, Relaxed);
        for op in &mut ops {
            match op {
                Op::Msg { seq: s, .. } | Op::Retain { seq: s, .. } | Op::Dedup { seq: s, .. } => {
                    *s = seq
                }
                _ => {}
            }
        }
        self.push_locked(q, ops, msgs);
        seq
    }

    /// Queues `ops` (`msgs` of them messages) and wakes the writer if it was idle.
    fn push_locked(
        &self,
        mut q: MutexGuard<'_, Queue>,
        ops: impl IntoIterator<Item = Op>,
        msgs: usize,
    ) {
        let was_empty = q.is_idle();
        q.push(ops);
        q.msgs += msgs;
        drop(q);
        if was_empty {
            self.work.notify_one();
        }
    }

    /// Records durable `key`'s newest floor for the writer ([`Queue::floors`]: merged with
    /// one still waiting, never queued) and wakes the writer if it was idle. Called under
    /// the index lock (index, then queue), like [`push_locked`](Self::push_locked).
    fn merge_floor_locked(
        &self,
        mut q: MutexGuard<'_, Queue>,
        key: &DurableKey,
        floor: u64,
        after: u64,
    ) {
        let was_empty = q.is_idle();
        q.merge_floor(key, floor, after);
        drop(q);
        if was_empty {
            self.work.notify_one();
        }
    }

    /// Records sequences `lo..=hi` as dropped (an empty range records nothing): never
    /// acknowledged as durable. A range that meets the last one extends it, so a store
    /// that stays down (the writer drops what is queued turn after turn) does not push
    /// older ranges out of the bounded list.
    fn lose(&self, lo: u64, hi: u64) {
        if lo > hi {
            return;
        }
        let mut lost = lock(&self.lost);
        match lost.back_mut() {
            Some(last) if last.0 <= lo && lo <= last.1.saturating_add(1) => {
                last.1 = last.1.max(hi);
            }
            _ => lost.push_back((lo, hi)),
        }
        while lost.len() > 64 {
            lost.pop_front();
        }
    }

    /// Whether `seq` was dropped by a failed commit.
    fn is_lost(&self, seq: u64) -> bool {
        lock(&self.lost)
            .iter()
            .any(|(lo, hi)| *lo <= seq && seq <= *hi)
    }

    fn resolve(&self, held: &mut Vec<(u64, OnDurable)>) {
        let down = self.down();
        let committed = self.committed.load(Relaxed);
        let mut keep = Vec::new();
        for (seq, done) in held.drain(..) {
            if seq <= committed && !self.is_lost(seq) {
                done(Ok(()));
            } else if self.is_lost(seq) {
                done(Err(down.clone().map_or_else(
                    || {
                        StoreError::StorageFull(
                            "the message was not stored (the store failed meanwhile); \
                             publish again"
                                .into(),
                        )
                    },
                    |d| d.error(),
                )));
            } else if let Some(d) = &down {
                done(Err(d.error()));
            } else {
                keep.push((seq, done));
            }
        }
        *held = keep;
    }

    fn writer_loop(self: Arc<Self>) {
        lower_priority(self.cfg.thread_nice);
        let mut held: Vec<(u64, OnDurable)> = Vec::new();
        let mut last_sweep = 0u64;
        loop {
            if self.down().is_some() {
                self.try_recover();
            }
            let down = self.down().is_some();
            let (ops, floors, mark, persist, closed) = {
                let mut q = lock(&self.queue);
                let wait = Duration::from_millis(if down { self.cfg.retry_ms } else { 1000 });
                while q.is_idle() && q.mark == 0 && !q.persist && !q.closed {
                    let (g, t) = self
                        .work
                        .wait_timeout(q, wait)
                        .unwrap_or_else(|p| p.into_inner());
                    q = g;
                    if t.timed_out() {
                        break;
                    }
                }
                // Whole blocks and the waiter list change hands: nothing here is copied
                // or counted per operation, so a push under the routing lock never waits
                // for more than a few pointer moves.
                let ops = q.take(self.cfg.max_batch);
                // The durables' newest floors, each written once in this batch (after
                // the operations, which hold the creation of every row they update).
                let floors = q.take_floors();
                if held.is_empty() {
                    std::mem::swap(&mut held, &mut q.waiters);
                } else {
                    held.append(&mut q.waiters);
                }
                q.resolving = !held.is_empty();
                let mark = if q.is_empty() {
                    std::mem::take(&mut q.mark)
                } else {
                    0
                };
                let persist = std::mem::take(&mut q.persist);
                q.inflight = !ops.is_empty();
                let closed = q.closed && q.is_empty() && q.floors.is_empty();
                (ops, floors, mark, persist, closed)
            };
            let mut ops = ops;
            let count: usize = ops.iter().map(Vec::len).sum();
            // What this turn writes: the operations and the floors.
            let writes = count + floors.len();
            // Messages leave the count when taken; their bytes when dropped below, so what
            // the writer holds in memory while a commit waits on the disk stays bounded.
            let (n, bytes, disk) = ops.iter().flatten().fold((0, 0, 0), |(n, b, d), o| {
                (
                    n + matches!(o, Op::Msg { .. }) as usize,
                    b + o.env_bytes(),
                    d + o.disk_bytes(),
                )
            });
            if n > 0 {
                let mut q = lock(&self.queue);
                q.msgs = q.msgs.saturating_sub(n);
            }
            let now = (self.clock)();
            let ages = self.cfg.max_age_ms > 0
                || self.cfg.retained_max_age_ms > 0
                || self.cfg.durable_idle_ms > 0;
            let sweep = ages && now >= last_sweep + 1000;
            if down {
                // Refused while down; anything queued anyway is dropped, and lost exactly
                // as what `fail` dropped (its waiters fail). `append` checks `down` before
                // it queues, so a write can be queued after `fail` emptied the queue; left
                // out of `lost`, its sequence would fall under `committed` (raised to
                // `mark` here, or by the next live-only append) and `when_durable` would
                // answer Ok — a `PubAck` for a message never stored. (Re-checking `down`
                // in `enqueue` would not do: `append` has counted the write in the index
                // by then.) Nothing commits while down, so every sequence assigned so far
                // and not committed is lost; `try_recover` starts after them.
                let mut q = lock(&self.queue);
                q.inflight = false;
                if count > 0 {
                    let hi = self.last.load(Relaxed);
                    self.lose(self.committed.load(Relaxed) + 1, hi);
                    self.committed.fetch_max(hi, Relaxed);
                }
                self.committed.fetch_max(mark, Relaxed);
                drop(q);
            } else if writes > 0 || sweep || persist {
                if sweep {
                    last_sweep = now;
                }
                let started = Instant::now();
                match self.commit(&ops, &floors, now, sweep) {
                    Ok(top) => {
                        if writes > 0 {
                            self.observe(writes, started.elapsed());
                        }
                        let mut q = lock(&self.queue);
                        self.committed
                            .fetch_max(top.unwrap_or(0).max(mark), Relaxed);
                        q.inflight = false;
                        drop(q);
                        if writes > 0 {
                            let (m, cv) = &self.checkpoint_wake;
                            *lock(m) = true;
                            cv.notify_one();
                        }
                    }
                    Err(e) => self.fail(&e, &mut held),
                }
            } else {
                let q = lock(&self.queue);
                self.committed.fetch_max(mark, Relaxed);
                drop(q);
            }
            // Measured before the batch leaves the queue's bytes: until then `check_free`
            // counts it as still on its way, against a free figure without it (review F-F).
            self.measure_disk();
            // The committed operations are dropped here, off the queue lock; their blocks
            // go back for reuse.
            let done = per_tenant(ops.iter().flatten());
            ops.iter_mut().for_each(Vec::clear);
            {
                let mut q = lock(&self.queue);
                q.bytes = q.bytes.saturating_sub(bytes);
                q.disk = q.disk.saturating_sub(disk);
                q.release(done);
                q.recycle(&mut ops);
            }
            // Acknowledged only once their bytes have left the queue's bounds: a publisher
            // that has its PubAcks is never refused `busy` for what they held (test
            // `store_hostile::the_write_queue_is_bounded_in_bytes_while_the_writer_is_stuck`
            // saw its big publish after the acks refused for 4 acknowledged envelopes).
            self.resolve(&mut held);
            lock(&self.queue).resolving = !held.is_empty();
            drop(floors);
            self.bound_wal(writes == 0);
            self.changes.send_modify(|n| *n += 1);
            if closed {
                break;
            }
        }
        for (_, done) in held.drain(..) {
            done(Err(StoreError::Unavailable("store closed".into())));
        }
        if self.down().is_none() {
            let conn = lock(&self.conn);
            let last = self.last.load(Relaxed).to_string();
            let r = set_meta(&conn, "last_seq", &last)
                .and_then(|_| set_meta(&conn, "clean", "1"))
                .and_then(|_| {
                    if self.file.is_some() {
                        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = r {
                tracing::warn!(error = %e, "store close: could not mark a clean shutdown");
            }
        }
    }

    /// A commit failed: refuse writes until a probe commits, drop everything queued.
    fn fail(&self, e: &rusqlite::Error, held: &mut Vec<(u64, OnDurable)>) {
        let down = if is_full(e) {
            Down::Full(format!("the relay's disk is full ({e})"))
        } else {
            Down::Failed(format!("store commit failed ({e})"))
        };
        tracing::warn!(error = %e, "store commit failed; refusing writes until it recovers");
        self.m.commit_failures.fetch_add(1, Relaxed);
        *lock(&self.down) = Some(down);
        let mut q = lock(&self.queue);
        let hi = self.last.load(Relaxed);
        let lo = self.committed.load(Relaxed) + 1;
        let dropped = q.clear();
        q.msgs = 0;
        q.mark = 0;
        q.inflight = false;
        held.append(&mut q.waiters);
        self.lose(lo, hi);
        self.committed.fetch_max(hi, Relaxed);
        drop(q);
        drop(dropped);
    }

    /// While down: commits a tiny probe; on success reloads the counters from the file
    /// (whatever was queued when the commit failed is gone) and resumes.
    ///
    /// With `min_free_bytes`, not before that much is free: a one-row probe fits in room a
    /// batch does not (WAL frames and free pages the file system already gave SQLite), so
    /// on a disk that stayed full the store resumed, reloaded its counters with a full
    /// scan, failed its next commit and went down again, over and over (test
    /// `store_hostile::a_full_disk_does_not_flap_and_recovers_with_every_acknowledged_message`).
    ///
    /// The file system's own free space must reach it, not counting the file's free pages
    /// (which `low_disk` counts, f62019e): a failed commit leaves free pages behind, and
    /// counting them let the store resume on a disk that stayed full — the flap again
    /// (the same test, under load).
    fn try_recover(&self) {
        let min = self.cfg.min_free_bytes;
        if min > 0
            && self
                .measure_disk()
                .is_some_and(|free| free < min || self.fs_free.load(Relaxed) < min)
        {
            return;
        }
        let now = (self.clock)();
        let conn = lock(&self.conn);
        let probe = (|| -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'last_seq'",
                [self.last.load(Relaxed).to_string()],
            )?;
            tx.commit()
        })();
        if let Err(e) = probe {
            let d = if is_full(&e) {
                Down::Full(format!("the relay's disk is full ({e})"))
            } else {
                Down::Failed(format!("store commit failed ({e})"))
            };
            *lock(&self.down) = Some(d);
            return;
        }
        let loaded = match load(&conn, &self.cfg, now) {
            Ok(l) => l,
            Err(e) => {
                *lock(&self.down) = Some(Down::Failed(format!("store reload failed: {e}")));
                return;
            }
        };
        drop(conn);
        // One section under the index lock (then the queue's, then the dedup map's:
        // `append`'s order): the writes queued while down are dropped, and the index and
        // the dedup ids are swapped for the file's, all at once. An `append` that passed
        // its `down` check before the failure does all of its part — queue its write,
        // count it in the index, remember its publish id — under the index lock, so it
        // falls wholly before the section (its write dropped, its counts and id gone with
        // the old index) or wholly after (kept and counted). Swapped at different moments,
        // an append between them was counted in the new index, or its publish id kept,
        // for a write then dropped — a retry with that id answered as a duplicate of a
        // message never stored, until the dedup window passed (review finding).
        let mut idx = lock(&self.idx);
        let mut q = lock(&self.queue);
        let hi = self.last.load(Relaxed);
        let lo = self.committed.load(Relaxed) + 1;
        self.lose(lo, hi);
        let dropped = q.clear();
        q.msgs = 0;
        q.mark = 0;
        self.committed.fetch_max(hi, Relaxed);
        // What the index knew of holds and idle times is newer than the file.
        let mut new = loaded.idx;
        for (k, d) in new.durables.iter_mut() {
            d.idle_since = if idx.held.contains_key(k) {
                None
            } else {
                idx.durables
                    .get(k)
                    .and_then(|o| o.idle_since)
                    .or(d.idle_since)
            };
        }
        new.held = std::mem::take(&mut idx.held);
        *idx = new;
        *lock(&self.dedup) = loaded.dedup;
        *lock(&self.down) = None;
        drop(q);
        drop(idx);
        drop(dropped);
        tracing::info!("store resumed: commits succeed again");
    }

    fn checkpoint_loop(self: Arc<Self>, conn: Connection) {
        lower_priority(self.cfg.thread_nice);
        let (m, cv) = &self.checkpoint_wake;
        loop {
            {
                let g = lock(m);
                let (mut g, _) = cv
                    .wait_timeout_while(g, Duration::from_millis(1000), |woken| {
                        !*woken && !self.stop_checkpointer.load(Relaxed)
                    })
                    .unwrap_or_else(|p| p.into_inner());
                *g = false;
            }
            if self.stop_checkpointer.load(Relaxed) {
                break;
            }
            let r = {
                let _ckpt = lock(&self.checkpointing);
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            };
            match r {
                Ok(()) => {
                    self.m.checkpoints.fetch_add(1, Relaxed);
                }
                Err(e) => tracing::debug!(error = %e, "background checkpoint"),
            }
            // At most one checkpoint per 50 ms: commits between are folded in.
            let g = lock(m);
            let _ = cv
                .wait_timeout_while(g, Duration::from_millis(50), |_| {
                    !self.stop_checkpointer.load(Relaxed)
                })
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn observe(&self, batch: usize, d: Duration) {
        self.m.commits.fetch_add(1, Relaxed);
        self.m.batch_sum.fetch_add(batch as u64, Relaxed);
        if let Some(i) = BATCH_BUCKETS.iter().position(|b| batch as f64 <= *b) {
            self.m.batch[i].fetch_add(1, Relaxed);
        }
        let s = d.as_secs_f64();
        if let Some(i) = COMMIT_BUCKETS.iter().position(|b| s <= *b) {
            self.m.commit[i].fetch_add(1, Relaxed);
        }
        self.m
            .commit_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// One transaction: the queued operations, retention, the high-water mark. Returns the
    /// highest message sequence written.
    fn commit(
        &self,
        ops: &[Vec<Op>],
        floors: &HashMap<DurableKey, PendingFloor>,
        now: u64,
        sweep: bool,
    ) -> rusqlite::Result<Option<u64>> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        let mut touched: HashSet<i64> = HashSet::new();
        // Paths whose retained value this batch set (perhaps over another tenant's).
        let mut retained_touched: HashSet<i64> = HashSet::new();
        let mut top = None;
        // Durables this batch deletes (`Unsub` with delete): announced once committed, so
        // their owners go only with them (a failed commit reloads them, owners kept).
        let mut deleted: Vec<DurableKey> = Vec::new();
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO msgs(seq, kid, pid, tid, ts, flags, env)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for op in ops.iter().flatten() {
                match op {
                    Op::Tenant { tid, key } => {
                        tx.prepare_cached("INSERT INTO tenants(id, key) VALUES (?1, ?2)")?
                            .execute(params![tid, key])?;
                    }
                    Op::Key { kid, key_id } => {
                        tx.prepare_cached("INSERT INTO keys(id, key_id) VALUES (?1, ?2)")?
                            .execute(params![kid, &key_id[..]])?;
                    }
                    Op::Path {
                        pid,
                        kid,
                        tid,
                        path,
                    } => {
                        tx.prepare_cached(
                            "INSERT INTO paths(id, path, kid, tid) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![pid, path, kid, tid])?;
                    }
                    Op::Msg {
                        seq,
                        pid,
                        kid,
                        tid,
                        ts,
                        flags,
                        env,
                    } => {
                        ins.execute(params![
                            *seq as i64,
                            kid,
                            pid,
                            tid,
                            *ts as i64,
                            *flags as i64,
                            &env[..]
                        ])?;
                        touched.insert(*pid);
                        top = top.max(Some(*seq));
                    }
                    Op::Retain {
                        pid,
                        kid,
                        tid,
                        seq,
                        ts,
                        env,
                    } => {
                        retained_touched.insert(*pid);
                        tx.prepare_cached(
                            "INSERT INTO retained(pid, kid, tid, seq, ts, env)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                             ON CONFLICT(pid) DO UPDATE SET kid = excluded.kid,
                             tid = excluded.tid, seq = excluded.seq, ts = excluded.ts,
                             env = excluded.env",
                        )?
                        .execute(params![
                            pid,
                            kid,
                            tid,
                            *seq as i64,
                            *ts as i64,
                            &env[..]
                        ])?;
                        top = top.max(Some(*seq));
                    }
                    Op::Dedup { tid, pid, seq, ts } => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO dedup(pid, seq, ts) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![
                            dedup_row_key(*tid, pid),
                            *seq as i64,
                            *ts as i64
                        ])?;
                    }
                    Op::Durable {
                        key_id,
                        name,
                        floor,
                        tid,
                        idle,
                    } => {
                        tx.prepare_cached(
                            "INSERT INTO durables(key_id, name, floor, tid, idle)
                             VALUES (?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT(key_id, name) DO UPDATE SET floor = excluded.floor",
                        )?
                        .execute(params![
                            &key_id[..],
                            name,
                            *floor as i64,
                            tid,
                            idle.map(|t| t as i64)
                        ])?;
                    }
                    Op::DurableIdle { key_id, name, idle } => {
                        tx.prepare_cached(
                            "UPDATE durables SET idle = ?3 WHERE key_id = ?1 AND name = ?2",
                        )?
                        .execute(params![
                            &key_id[..],
                            name,
                            idle.map(|t| t as i64)
                        ])?;
                    }
                    Op::DurableDelete { key_id, name } => {
                        tx.prepare_cached("DELETE FROM durables WHERE key_id = ?1 AND name = ?2")?
                            .execute(params![&key_id[..], name])?;
                        deleted.push(DurableKey {
                            key_id: KeyId::from_bytes(*key_id),
                            name: name.clone(),
                        });
                    }
                }
            }
        }
        // The durables' newest floors ([`Queue::floors`]): an update of a row the
        // operations above (or an earlier batch) created; a row deleted meanwhile stays
        // deleted (its deletion took its floor out of the map besides).
        if !floors.is_empty() {
            let mut upd = tx
                .prepare_cached("UPDATE durables SET floor = ?3 WHERE key_id = ?1 AND name = ?2")?;
            for (k, f) in floors {
                upd.execute(params![&k.key_id.as_bytes()[..], &k.name, f.floor as i64])?;
            }
        }
        let mut d = Deltas::default();
        // Per-path limits, for the paths this batch wrote to.
        let (max_n, max_b) = (self.cfg.max_messages, self.cfg.max_bytes);
        if (max_n > 0 || max_b > 0) && !touched.is_empty() {
            let over: Vec<(i64, u64, u64)> = {
                let idx = lock(&self.idx);
                touched
                    .iter()
                    .filter_map(|pid| {
                        let st = idx.paths.get(idx.by_pid.get(pid)?)?;
                        let o = (max_n > 0 && st.count > max_n) || (max_b > 0 && st.bytes > max_b);
                        o.then_some((*pid, st.count, st.bytes))
                    })
                    .collect()
            };
            for (pid, mut count, mut bytes) in over {
                let mut cut = None;
                {
                    let mut sel = tx.prepare_cached(
                        "SELECT seq, length(env), tid FROM msgs WHERE pid = ?1 ORDER BY seq",
                    )?;
                    let mut rows = sel.query(params![pid])?;
                    while let Some(r) = rows.next()? {
                        if !((max_n > 0 && count > max_n) || (max_b > 0 && bytes > max_b))
                            || count == 0
                        {
                            break;
                        }
                        let seq = r.get::<_, i64>(0)? as u64;
                        let b = r.get::<_, i64>(1)? as u64;
                        d.msg(pid, r.get(2)?, seq, b);
                        count -= 1;
                        bytes = bytes.saturating_sub(b);
                        cut = Some(seq);
                    }
                }
                if let Some(cut) = cut {
                    tx.prepare_cached("DELETE FROM msgs WHERE pid = ?1 AND seq <= ?2")?
                        .execute(params![pid, cut as i64])?;
                }
            }
        }
        if sweep && self.cfg.max_age_ms > 0 {
            // Oldest first by sequence, a bounded number of rows per sweep.
            let cutoff = now.saturating_sub(self.cfg.max_age_ms);
            let mut cut = None;
            'chunks: for _ in 0..16 {
                let from = cut.map_or(0, |c: u64| c + 1) as i64;
                let mut sel = tx.prepare_cached(
                    "SELECT seq, pid, tid, ts, length(env) FROM msgs WHERE seq >= ?1
                     ORDER BY seq LIMIT ?2",
                )?;
                let mut rows = sel.query(params![from, SWEEP_CHUNK])?;
                let mut n = 0;
                while let Some(r) = rows.next()? {
                    n += 1;
                    if (r.get::<_, i64>(3)? as u64) >= cutoff {
                        break 'chunks;
                    }
                    let seq = r.get::<_, i64>(0)? as u64;
                    d.msg(r.get(1)?, r.get(2)?, seq, r.get::<_, i64>(4)? as u64);
                    cut = Some(seq);
                }
                if n < SWEEP_CHUNK {
                    break;
                }
            }
            if let Some(cut) = cut {
                tx.prepare_cached("DELETE FROM msgs WHERE seq <= ?1")?
                    .execute(params![cut as i64])?;
            }
        }
        if sweep && self.cfg.retained_max_age_ms > 0 {
            let cutoff = now.saturating_sub(self.cfg.retained_max_age_ms) as i64;
            {
                let mut sel = tx.prepare_cached(
                    "SELECT pid, tid, length(env), seq FROM retained WHERE ts < ?1 LIMIT 65536",
                )?;
                let mut rows = sel.query(params![cutoff])?;
                while let Some(r) = rows.next()? {
                    d.retained.push((
                        r.get(0)?,
                        r.get(1)?,
                        r.get::<_, i64>(2)? as u64,
                        r.get::<_, i64>(3)? as u64,
                    ));
                }
            }
            let mut del = tx.prepare_cached("DELETE FROM retained WHERE pid = ?1 AND seq = ?2")?;
            for (pid, _, _, seq) in &d.retained {
                del.execute(params![pid, *seq as i64])?;
            }
        }
        if sweep {
            tx.prepare_cached("DELETE FROM dedup WHERE ts < ?1")?
                .execute(params![now.saturating_sub(self.cfg.dedup_window_ms) as i64])?;
        }
        // Durables no subscription held for `durable_idle_ms`: gone from the index now (a
        // failed commit reloads it from the file), announced once committed. Their floors
        // waiting, if any, are for rows deleted here: removed in the same critical section
        // (index, then queue, the order of `set_durable`). Removed after the index lock
        // was let go, a `set_durable` creating the name again and an `Ack` between the
        // two steps had the new durable's floor removed instead — its row written with the
        // creation's floor, acknowledged messages delivered again after a restart.
        let expired = if sweep {
            let mut idx = lock(&self.idx);
            let expired = idx.expire_durables(now, self.cfg.durable_idle_ms);
            if !expired.is_empty() {
                let mut q = lock(&self.queue);
                for k in &expired {
                    q.floors.remove(k);
                }
            }
            expired
        } else {
            Vec::new()
        };
        #[cfg(test)]
        if !expired.is_empty() {
            if let Some(mut hook) = lock(&self.after_expiry).take() {
                hook();
            }
        }
        for k in &expired {
            tx.prepare_cached("DELETE FROM durables WHERE key_id = ?1 AND name = ?2")?
                .execute(params![&k.key_id.as_bytes()[..], &k.name])?;
        }
        // Apply the deletions to the counters; forget paths with nothing left.
        let mut gone: Vec<(i64, Option<i64>)> = Vec::new();
        let mut trimmed = 0;
        if !d.paths.is_empty() || !d.retained.is_empty() {
            let mut idx = lock(&self.idx);
            let mut candidates = Vec::new();
            for (pid, (n, b, first)) in &d.paths {
                trimmed += n;
                let Some(path) = idx.by_pid.get(pid).cloned() else {
                    continue;
                };
                if let Some(st) = idx.paths.get_mut(&path) {
                    st.count = st.count.saturating_sub(*n);
                    st.bytes = st.bytes.saturating_sub(*b);
                    st.first_seq = st.first_seq.max(*first);
                }
                candidates.push(path);
            }
            for (&(pid, tid), &n) in &d.by_path_tenant {
                idx.sub_path_tenant_msgs(pid, tid, n);
            }
            for (tid, (n, b)) in &d.tenants {
                let u = idx.usage(*tid);
                u.msgs = u.msgs.saturating_sub(*n);
                u.bytes = u.bytes.saturating_sub(*b);
                idx.total.msgs = idx.total.msgs.saturating_sub(*n);
                idx.total.bytes = idx.total.bytes.saturating_sub(*b);
            }
            idx.envelope_bytes = idx.envelope_bytes.saturating_sub(d.envelope_bytes);
            for (pid, tid, b, seq) in &d.retained {
                let Some(path) = idx.by_pid.get(pid).cloned() else {
                    continue;
                };
                let same = idx
                    .paths
                    .get(&path)
                    .and_then(|st| st.retained)
                    .is_some_and(|(_, _, s)| s == *seq);
                if same {
                    if let Some(st) = idx.paths.get_mut(&path) {
                        st.retained = None;
                    }
                    let u = idx.usage(*tid);
                    u.retained = u.retained.saturating_sub(1);
                    u.bytes = u.bytes.saturating_sub(disk_bytes(*b));
                    idx.total.retained = idx.total.retained.saturating_sub(1);
                    idx.total.bytes = idx.total.bytes.saturating_sub(disk_bytes(*b));
                    idx.envelope_bytes = idx.envelope_bytes.saturating_sub(*b);
                    candidates.push(path);
                }
            }
            for path in candidates {
                let empty = idx
                    .paths
                    .get(&path)
                    .is_some_and(|st| st.count == 0 && st.retained.is_none());
                if empty {
                    if let Some(g) = idx.drop_path(&path) {
                        gone.push(g);
                    }
                }
            }
        }
        // A path whose owner has no data left there while another tenant has counts
        // against that tenant from now on: against the tenant of the retained value, else
        // the tenant of the oldest message (another tenant's retained value kept a path
        // on the victim's distinct-path quota for good).
        let check: Vec<i64> = d
            .paths
            .keys()
            .chain(d.retained.iter().map(|r| &r.0))
            .chain(retained_touched.iter())
            .copied()
            .collect::<HashSet<i64>>()
            .into_iter()
            .collect();
        let orphaned: Vec<(i64, i64, Option<i64>)> = if check.is_empty() {
            Vec::new()
        } else {
            let idx = lock(&self.idx);
            check
                .into_iter()
                .filter_map(|pid| {
                    let st = idx.paths.get(idx.by_pid.get(&pid)?)?;
                    let held = st.count > 0 || st.retained.is_some();
                    let owners = idx.path_tenant_msgs(pid, st.owner) > 0
                        || st.retained.is_some_and(|r| r.0 == st.owner);
                    (held && !owners).then_some((pid, st.owner, st.retained.map(|r| r.0)))
                })
                .collect()
        };
        for (pid, old, retained_by) in orphaned {
            let heir = match retained_by {
                Some(t) => Some(t),
                None => tx
                    .prepare_cached("SELECT tid FROM msgs WHERE pid = ?1 ORDER BY seq LIMIT 1")?
                    .query_row(params![pid], |r| r.get::<_, i64>(0))
                    .optional()?,
            };
            let Some(heir) = heir.filter(|h| *h != old) else {
                continue;
            };
            let moved = {
                let mut idx = lock(&self.idx);
                let Some(path) = idx.by_pid.get(&pid).cloned() else {
                    continue;
                };
                match idx.paths.get_mut(&path) {
                    Some(st) if st.owner == old => {
                        st.owner = heir;
                        let u = idx.usage(old);
                        u.paths = u.paths.saturating_sub(1);
                        idx.usage(heir).paths += 1;
                        true
                    }
                    _ => false,
                }
            };
            if moved {
                tx.prepare_cached("UPDATE paths SET tid = ?2 WHERE id = ?1")?
                    .execute(params![pid, heir])?;
            }
        }
        for (pid, kid) in gone {
            tx.prepare_cached("DELETE FROM paths WHERE id = ?1")?
                .execute(params![pid])?;
            if let Some(kid) = kid {
                tx.prepare_cached("DELETE FROM keys WHERE id = ?1")?
                    .execute(params![kid])?;
            }
        }
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'last_seq'")?
            .execute(params![self.last.load(Relaxed).to_string()])?;
        tx.commit()?;
        if trimmed > 0 {
            self.m.trimmed.fetch_add(trimmed, Relaxed);
        }
        if !expired.is_empty() {
            tracing::debug!(
                durables = expired.len(),
                "store: durables idle past durable_idle_ms deleted"
            );
        }
        deleted.extend(expired);
        if !deleted.is_empty() {
            self.announce_gone(deleted);
        }
        Ok(top)
    }
}

impl Shared {
    /// Refuses a write that would pass a tenant or global limit, or reach into the
    /// reserve for a tenant holding more than its share ([`check`](super::quota::check)).
    fn check_quota(&self, idx: &Index, tid: Option<i64>, n: &Need) -> Result<(), StoreError> {
        let tenant = tid
            .and_then(|t| idx.usage.get(&t).copied())
            .unwrap_or_default();
        super::quota::check(&tenant, &idx.total, n, &self.limits).map_err(|(scope, e)| {
            self.m.quota.count(scope);
            e
        })
    }

    /// The tenant's id, allocating one (and queuing its row) when new.
    fn tenant_id(idx: &mut Index, tenant: &Tenant, ops: &mut Vec<Op>) -> i64 {
        let key = tenant.key();
        if let Some(t) = idx.tenants.get(&key) {
            return *t;
        }
        let tid = idx.next_tid;
        idx.next_tid += 1;
        idx.tenants.insert(key.clone(), tid);
        ops.push(Op::Tenant { tid, key });
        tid
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => lock(r),
            None => lock(&self.conn),
        }
    }

    fn kid_of(&self, pattern: &TokenPattern) -> Option<i64> {
        lock(&self.idx)
            .keys
            .get(pattern.key_id().as_bytes())
            .map(|k| k.kid)
    }
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        self.shared.kind
    }

    fn features(&self) -> u64 {
        super::KEEPING_FEATURES | whispeer_protocol::frame::features::DURABLE_DELETE
    }

    fn append(&self, m: Append<'_>) -> Result<Accepted, StoreError> {
        let s = &self.shared;
        let retain = m.flags & pub_flags::RETAIN != 0;
        let keep = m.qos != Qos::AtMostOnce || s.cfg.store_qos0;
        let dedup_id = match (m.qos, m.publish_id) {
            (Qos::ExactlyOnce, Some(pid)) => Some(pid),
            _ => None,
        };
        if !keep && !retain && dedup_id.is_none() {
            // Live only: a sequence, nothing stored, nothing queued. Numbered under the
            // queue lock, like a stored message (see `enqueue`).
            let mut q = lock(&s.queue);
            let seq = s.last.load(Relaxed) + 1;
            s.last.store(seq, Relaxed);
            if q.is_empty() && !q.inflight {
                s.committed.fetch_max(seq, Relaxed);
            } else {
                q.mark = seq;
            }
            if seq >= q.persist_at {
                q.persist = true;
                q.persist_at = seq + PERSIST_EVERY;
                drop(q);
                s.work.notify_one();
            }
            s.m.live_only.fetch_add(1, Relaxed);
            return Ok(Accepted::Live(Seq(seq)));
        }
        if let Some(d) = s.down() {
            if matches!(d, Down::Full(_)) {
                s.m.full.fetch_add(1, Relaxed);
            }
            return Err(d.error());
        }
        let now = (s.clock)();
        if let Some(pid) = dedup_id {
            // The publisher's own ids only (a tenant new to the store has none).
            let tid = lock(&s.idx).tenants.get(&m.tenant.key()).copied();
            let mut d = lock(&s.dedup);
            d.prune(now, s.cfg.dedup_window_ms);
            if let Some(seq) = d.get(tid, &pid) {
                s.m.duplicates.fetch_add(1, Relaxed);
                return Ok(Accepted::Duplicate(Seq(seq)));
            }
        }
        {
            let q = lock(&s.queue);
            if q.closed {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
        }
        let path = path_bytes(m.path);
        let env = m.envelope.as_bytes().clone();
        let size = env.len() as u64;
        let mut ops = Vec::with_capacity(2);
        let mut idx = lock(&s.idx);
        let known_tid = idx.tenants.get(&m.tenant.key()).copied();
        let existing = idx.paths.get(&path).copied();
        let old_retained = existing.and_then(|p| p.retained);
        // Replacing one's own retained value adds only what the new value is larger (the
        // old one's bytes go back at once, below): charged gross, a tenant above its share
        // of the reserve could not update its own state topics once the store passed the
        // reserve's line (review 28 finding 2).
        let cost = disk_bytes(size);
        let retained_bytes = match old_retained {
            Some((otid, ob, _)) if Some(otid) == known_tid => cost.saturating_sub(disk_bytes(ob)),
            _ => cost,
        };
        let need = Need {
            bytes: if keep { cost } else { 0 } + if retain { retained_bytes } else { 0 },
            msgs: keep as u64,
            retained: (retain && old_retained.is_none()) as u64,
            durables: 0,
            paths: existing.is_none() as u64,
        };
        s.check_quota(&idx, known_tid, &need)?;
        if retain && old_retained.is_some_and(|(otid, _, _)| Some(otid) != known_tid) {
            // Taking over another tenant's retained value: the relay's total is unchanged,
            // but this tenant's count grows by one (free, a tenant at its quota went on
            // taking over values past it), and the path with it when its owner has nothing
            // else there. Past the reserve's line that is a transfer into the reserve
            // ([`check_transfer`](super::quota::check_transfer)): a small tenant writing
            // values there for a big one to take over would fill it for a few tenants.
            let mine = known_tid
                .and_then(|t| idx.usage.get(&t).copied())
                .unwrap_or_default();
            let moved = Need {
                retained: 1,
                paths: existing.is_some_and(|p| {
                    Some(p.owner) != known_tid && idx.path_tenant_msgs(p.pid, p.owner) == 0
                }) as u64,
                ..Need::default()
            };
            let after = (mine.plus(&need), idx.total.plus(&need));
            if let Err((scope, e)) =
                super::quota::check_transfer(&after.0, &after.1, &moved, &s.limits)
            {
                s.m.quota.count(scope);
                return Err(e);
            }
        }
        {
            // The write queue's bounds, with a fair share per tenant (`Queue::admits`).
            let q = lock(&s.queue);
            let add = Queued {
                msgs: keep as usize,
                bytes: (u64::from(keep) + u64::from(retain)) * size,
            };
            if !q.admits(known_tid, add, s.cfg.queue, s.cfg.queue_bytes) {
                s.m.busy.fetch_add(1, Relaxed);
                return Err(StoreError::Busy(format!(
                    "{} messages ({} bytes) wait for the disk; publish again shortly",
                    q.msgs, q.bytes
                )));
            }
            s.check_free(&q, (u64::from(keep) + u64::from(retain)) * disk_bytes(size))?;
        }
        let tid = Shared::tenant_id(&mut idx, m.tenant, &mut ops);
        let key: [u8; 16] = *m.path.key_id().as_bytes();
        // A new path (and maybe a new key id) is registered first; its sequence fields are
        // set below, once the message is numbered, while `idx` is still held.
        let (pid, kid) = match existing {
            Some(st) => (st.pid, st.kid),
            None => {
                let kid = match idx.keys.get_mut(&key) {
                    Some(k) => {
                        k.paths += 1;
                        k.kid
                    }
                    None => {
                        let kid = idx.next_kid;
                        idx.next_kid += 1;
                        idx.keys.insert(
                            key,
                            KeyStat {
                                kid,
                                paths: 1,
                                last_write: 0,
                            },
                        );
                        ops.push(Op::Key { kid, key_id: key });
                        kid
                    }
                };
                let pid = idx.next_pid;
                idx.next_pid += 1;
                idx.paths.insert(
                    path.clone(),
                    PathStat {
                        pid,
                        kid,
                        owner: tid,
                        count: 0,
                        bytes: 0,
                        first_seq: 0,
                        last_seq: 0,
                        retained: None,
                    },
                );
                idx.by_pid.insert(pid, path.clone());
                idx.usage(tid).paths += 1;
                idx.total.paths += 1;
                ops.push(Op::Path {
                    pid,
                    kid,
                    tid,
                    path: path.clone(),
                });
                (pid, kid)
            }
        };
        if retain {
            ops.push(Op::Retain {
                pid,
                kid,
                tid,
                seq: 0,
                ts: now,
                env: env.clone(),
            });
        }
        if let Some(pid) = dedup_id {
            ops.push(Op::Dedup {
                tid,
                pid,
                seq: 0,
                ts: now,
            });
        }
        if keep {
            ops.push(Op::Msg {
                seq: 0,
                pid,
                kid,
                tid,
                ts: now,
                flags: m.flags,
                env,
            });
        }
        let seq = s.enqueue(ops, keep as usize);
        // Here `keep || retain` holds (QoS 2 is always kept): the key id was written.
        if let Some(k) = idx.keys.get_mut(&key) {
            k.last_write = seq;
        }
        if existing.is_none() {
            if let Some(st) = idx.paths.get_mut(&path) {
                st.first_seq = seq;
                st.last_seq = seq;
            }
        }
        if retain {
            if let Some((otid, ob, _)) = old_retained {
                let u = idx.usage(otid);
                u.retained = u.retained.saturating_sub(1);
                u.bytes = u.bytes.saturating_sub(disk_bytes(ob));
                idx.total.retained = idx.total.retained.saturating_sub(1);
                idx.total.bytes = idx.total.bytes.saturating_sub(disk_bytes(ob));
                idx.envelope_bytes = idx.envelope_bytes.saturating_sub(ob);
            }
            let u = idx.usage(tid);
            u.retained += 1;
            u.bytes += cost;
            idx.total.retained += 1;
            idx.total.bytes += cost;
            idx.envelope_bytes += size;
            if let Some(st) = idx.paths.get_mut(&path) {
                st.retained = Some((tid, size, seq));
            }
        }
        if keep {
            let u = idx.usage(tid);
            u.msgs += 1;
            u.bytes += cost;
            idx.total.msgs += 1;
            idx.total.bytes += cost;
            idx.envelope_bytes += size;
            idx.add_path_tenant_msgs(pid, tid, 1);
            if let Some(st) = idx.paths.get_mut(&path) {
                if st.count == 0 {
                    st.first_seq = seq;
                }
                st.count += 1;
                st.bytes += size;
                st.last_seq = seq;
            }
        }
        // Remembered under the index lock, as the write was queued and counted: a recovery
        // (`try_recover`) swaps all three at once.
        if let Some(pid) = dedup_id {
            lock(&s.dedup).insert(tid, pid, seq, now, s.cfg.dedup_max);
        }
        drop(idx);
        s.m.appends.fetch_add(1, Relaxed);
        Ok(if keep {
            Accepted::New(Seq(seq))
        } else {
            Accepted::Live(Seq(seq))
        })
    }

    fn last_seq(&self) -> Seq {
        Seq(self.shared.last.load(Relaxed))
    }

    fn seq_space(&self) -> [u8; 16] {
        self.shared.space
    }

    fn when_durable(&self, seq: Seq, done: OnDurable) {
        let s = &self.shared;
        let mut q = lock(&s.queue);
        if s.is_lost(seq.0) {
            drop(q);
            return done(Err(s.down().map_or_else(
                || StoreError::StorageFull("the message was not stored; publish again".into()),
                |d| d.error(),
            )));
        }
        if seq.0 <= s.committed.load(Relaxed) && !q.resolving {
            drop(q);
            return done(Ok(()));
        }
        if let Some(d) = s.down() {
            drop(q);
            return done(Err(d.error()));
        }
        if q.closed {
            drop(q);
            return done(Err(StoreError::Unavailable("the store is closed".into())));
        }
        let was_empty = q.is_empty() && q.waiters.is_empty();
        q.waiters.push((seq.0, done));
        drop(q);
        if was_empty {
            s.work.notify_one();
        }
    }

    fn when_sequenced(&self, _: u64, done: OnSequenced) {
        done(Err(StoreError::Unsupported(
            "the SQLite store numbers its messages itself".into(),
        )))
    }

    fn advance(&self, _: Seq) {}

    fn take_sequenced(&self) -> Option<tokio::sync::mpsc::Receiver<Sequenced>> {
        None
    }

    fn when_readable(&self, key_id: &KeyId, upto: Seq, done: OnDurable) {
        let s = &self.shared;
        let barrier = lock(&s.idx)
            .keys
            .get(key_id.as_bytes())
            .map_or(0, |k| k.last_write)
            .min(upto.0);
        // Committed (or dropped by a failed commit, which a read simply does not see).
        if barrier <= s.committed.load(Relaxed) {
            return done(Ok(()));
        }
        self.when_durable(Seq(barrier), done);
    }

    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: Seq,
    ) -> Result<ReadPlan, StoreError> {
        let err = |e: rusqlite::Error| StoreError::Unavailable(format!("history read: {e}"));
        let none = ReadPlan {
            start: upto.0 + 1,
            ..ReadPlan::default()
        };
        // A key id the store never saw: a map miss, no row is read.
        let Some(kid) = self.shared.kid_of(pattern) else {
            return Ok(none);
        };
        Ok(match replay {
            Replay::FromSeq(s) => ReadPlan {
                start: s,
                ..ReadPlan::default()
            },
            Replay::SinceMs(t) => {
                let conn = self.shared.reader();
                let first: Option<i64> = conn
                    .prepare_cached("SELECT min(seq) FROM msgs WHERE kid = ?1 AND ts >= ?2")
                    .and_then(|mut st| st.query_row(params![kid, t as i64], |r| r.get(0)))
                    .map_err(err)?;
                ReadPlan {
                    start: first.map_or(upto.0 + 1, |f| f as u64),
                    since_ms: Some(t),
                    path_starts: None,
                }
            }
            Replay::LastN(n) => {
                let conn = self.shared.reader();
                let mut candidates: Vec<(i64, Vec<u8>)> = Vec::new();
                {
                    let mut st = conn
                        .prepare_cached("SELECT id, path FROM paths WHERE kid = ?1")
                        .map_err(err)?;
                    let mut rows = st.query(params![kid]).map_err(err)?;
                    while let Some(r) = rows.next().map_err(err)? {
                        let p: Vec<u8> = r.get(1).map_err(err)?;
                        if path_matches(pattern, &p) {
                            candidates.push((r.get(0).map_err(err)?, p));
                        }
                    }
                }
                let mut starts = HashMap::new();
                if n > 0 {
                    let mut st = conn
                        .prepare_cached(
                            "SELECT seq FROM msgs WHERE pid = ?1 AND seq <= ?2
                             ORDER BY seq DESC LIMIT 1 OFFSET ?3",
                        )
                        .map_err(err)?;
                    for (pid, p) in candidates {
                        let s: Option<i64> = st
                            .query_row(
                                params![pid, upto.0 as i64, (n - 1).min(i64::MAX as u64) as i64],
                                |r| r.get(0),
                            )
                            .optional()
                            .map_err(err)?;
                        starts.insert(p, s.map_or(0, |s| s as u64));
                    }
                }
                ReadPlan::per_path(starts, upto)
            }
        })
    }

    fn read(
        &self,
        pattern: &TokenPattern,
        plan: &ReadPlan,
        from: u64,
        upto: Seq,
    ) -> Result<ReadChunk, StoreError> {
        self.read_limited(pattern, plan, from, upto, super::ReadLimit::CHUNK)
    }

    fn read_limited(
        &self,
        pattern: &TokenPattern,
        plan: &ReadPlan,
        from: u64,
        upto: Seq,
        limit: super::ReadLimit,
    ) -> Result<ReadChunk, StoreError> {
        let err = |e: rusqlite::Error| StoreError::Unavailable(format!("history read: {e}"));
        let from = from.max(plan.start);
        let done = ReadChunk {
            msgs: Vec::new(),
            next: upto.0 + 1,
        };
        if from > upto.0 {
            return Ok(done);
        }
        let Some(kid) = self.shared.kid_of(pattern) else {
            return Ok(done);
        };
        let conn = self.shared.reader();
        let mut st = conn
            .prepare_cached(
                "SELECT m.seq, p.path, m.ts, m.env FROM msgs m JOIN paths p ON p.id = m.pid
                 WHERE m.kid = ?1 AND m.seq >= ?2 AND m.seq <= ?3 ORDER BY m.seq LIMIT ?4",
            )
            .map_err(err)?;
        let mut rows = st
            .query(params![kid, from as i64, upto.0 as i64, READ_CHUNK as i64])
            .map_err(err)?;
        let (mut n, mut last, mut bytes) = (0usize, from, 0usize);
        // Envelope bytes of the messages returned, for `limit`.
        let mut taken = 0usize;
        let mut msgs = Vec::new();
        // The chunk ends at `limit`: where the next one starts, and whether a row past the
        // byte limit was read for it.
        let (mut cut, mut over) = (None, 0usize);
        while let Some(r) = rows.next().map_err(err)? {
            if bytes >= super::READ_CHUNK_BYTES {
                break; // the next chunk starts at this row
            }
            let seq = r.get::<_, i64>(0).map_err(err)? as u64;
            let path = r.get_ref(1).map_err(err)?.as_blob().map_err(|e| {
                StoreError::Unavailable(format!("history read: bad path column: {e}"))
            })?;
            let ts = r.get::<_, i64>(2).map_err(err)? as u64;
            if !plan.admits(seq, path, ts) || !path_matches(pattern, path) {
                n += 1;
                last = seq;
                continue;
            }
            let env = r.get_ref(3).map_err(err)?.as_blob().map_err(|e| {
                StoreError::Unavailable(format!("history read: bad envelope column: {e}"))
            })?;
            if !limit.takes(msgs.len(), taken, env.len()) {
                cut = Some(seq);
                over = 1;
                break;
            }
            n += 1;
            last = seq;
            bytes += env.len();
            taken += env.len();
            match Envelope::from_bytes(Bytes::copy_from_slice(env)) {
                Ok(envelope) => msgs.push(Stored {
                    seq: Seq(seq),
                    envelope,
                }),
                Err(e) => {
                    tracing::warn!(seq, error = %e, "skipping a stored envelope that does not parse")
                }
            }
            if msgs.len() >= limit.msgs {
                cut = Some(seq + 1);
                break;
            }
        }
        // A row past the byte limit was read too (and is read again by the next chunk).
        self.shared
            .m
            .rows_read
            .fetch_add((n + over) as u64, Relaxed);
        if let Some(seq) = cut {
            return Ok(ReadChunk { msgs, next: seq });
        }
        Ok(ReadChunk {
            msgs,
            next: if n < READ_CHUNK && bytes < super::READ_CHUNK_BYTES {
                upto.0 + 1
            } else {
                last + 1
            },
        })
    }

    fn retained(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: Seq,
    ) -> Result<ReadChunk, StoreError> {
        self.retained_limited(pattern, from, upto, super::ReadLimit::CHUNK)
    }

    fn retained_limited(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: Seq,
        limit: super::ReadLimit,
    ) -> Result<ReadChunk, StoreError> {
        let err = |e: rusqlite::Error| StoreError::Unavailable(format!("retained read: {e}"));
        let done = ReadChunk {
            msgs: Vec::new(),
            next: upto.0 + 1,
        };
        let Some(kid) = self.shared.kid_of(pattern) else {
            return Ok(done);
        };
        let conn = self.shared.reader();
        let mut st = conn
            .prepare_cached(
                "SELECT r.seq, p.path, r.env FROM retained r JOIN paths p ON p.id = r.pid
                 WHERE r.kid = ?1 AND r.seq >= ?4 AND r.seq <= ?2 AND r.ts >= ?3
                 ORDER BY r.seq",
            )
            .map_err(err)?;
        // Expired values are never sent, even before the sweep deleted them.
        let cutoff = match self.shared.cfg.retained_max_age_ms {
            0 => 0,
            age => (self.shared.clock)().saturating_sub(age),
        };
        let mut rows = st
            .query(params![kid, upto.0 as i64, cutoff as i64, from as i64])
            .map_err(err)?;
        let (mut v, mut bytes) = (Vec::new(), 0usize);
        while let Some(r) = rows.next().map_err(err)? {
            self.shared.m.rows_read.fetch_add(1, Relaxed);
            let seq = r.get::<_, i64>(0).map_err(err)? as u64;
            let path: Vec<u8> = r.get(1).map_err(err)?;
            if !path_matches(pattern, &path) {
                continue;
            }
            let env: Vec<u8> = r.get(2).map_err(err)?;
            // Beyond what the credit takes now: the next read starts at this value.
            if !limit.takes(v.len(), bytes, env.len()) {
                return Ok(ReadChunk { msgs: v, next: seq });
            }
            bytes += env.len();
            match Envelope::from_bytes(Bytes::from(env)) {
                Ok(envelope) => v.push(Stored {
                    seq: Seq(seq),
                    envelope,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a retained envelope that does not parse")
                }
            }
            if bytes >= super::READ_CHUNK_BYTES {
                return Ok(ReadChunk {
                    msgs: v,
                    next: seq + 1,
                });
            }
        }
        Ok(ReadChunk { msgs: v, ..done })
    }

    fn durable(&self, key: &DurableKey) -> Result<Option<u64>, StoreError> {
        Ok(lock(&self.shared.idx).durables.get(key).map(|d| d.floor))
    }

    fn hold_durable(&self, key: &DurableKey, _: &super::HoldLost) -> Result<(), StoreError> {
        // One relay per file: the hold is the relay's own; here it stops the idle clock.
        // The idle op is queued under the index lock (index, then queue: `append`'s
        // order), so the file sees holds and releases in the order the index did.
        let s = &self.shared;
        let mut idx = lock(&s.idx);
        *idx.held.entry(key.clone()).or_insert(0) += 1;
        if let Some(d) = idx.durables.get_mut(key) {
            if d.idle_since.take().is_some() {
                s.push_locked(
                    lock(&s.queue),
                    [Op::DurableIdle {
                        key_id: *key.key_id.as_bytes(),
                        name: key.name.clone(),
                        idle: None,
                    }],
                    0,
                );
            }
        }
        Ok(())
    }

    fn release_hold(&self, key: &DurableKey) {
        let s = &self.shared;
        let now = (s.clock)();
        let mut idx = lock(&s.idx);
        match idx.held.get_mut(key) {
            // Another hold is still there (this release came late): still held.
            Some(n) if *n > 1 => {
                *n -= 1;
                return;
            }
            Some(_) => {
                idx.held.remove(key);
            }
            // Not held (nothing to give back).
            None => return,
        }
        if let Some(d) = idx.durables.get_mut(key) {
            d.idle_since = Some(now);
            s.push_locked(
                lock(&s.queue),
                [Op::DurableIdle {
                    key_id: *key.key_id.as_bytes(),
                    name: key.name.clone(),
                    idle: Some(now),
                }],
                0,
            );
        }
    }

    fn delete_durable(&self, key: &DurableKey) -> Result<bool, StoreError> {
        let s = &self.shared;
        if let Some(d) = s.down() {
            return Err(d.error());
        }
        // Queued under the index lock (index, then queue), like `append`: a recovery
        // (`try_recover`) falls wholly before (the deletion dropped with the old index) or
        // wholly after it.
        let mut idx = lock(&s.idx);
        if !idx.forget_durable(key) {
            return Ok(false);
        }
        // Its floor waiting for the writer goes with it: written after the deletion, the
        // update would find no row, but one of a durable created again under the name
        // (queued behind the deletion) would have its floor moved.
        let mut q = lock(&s.queue);
        q.floors.remove(key);
        s.push_locked(
            q,
            [Op::DurableDelete {
                key_id: *key.key_id.as_bytes(),
                name: key.name.clone(),
            }],
            0,
        );
        drop(idx);
        Ok(true)
    }

    fn take_gone(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<DurableKey>> {
        let s = &self.shared;
        let mut slot = lock(&s.gone);
        if slot.is_some() {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for k in std::mem::take(&mut *lock(&s.gone_backlog)) {
            let _ = tx.send(k);
        }
        *slot = Some(tx);
        Some(rx)
    }

    fn durable_owner(&self, _: &DurableKey, _: Option<&str>) -> Result<bool, StoreError> {
        // One relay per file: the relay's auth-state file keeps owners.
        Ok(false)
    }

    fn claim_key(&self, _: &KeyId, _: &str, _: bool) -> Result<Claim, StoreError> {
        // One relay per file: the relay's auth-state file keeps claims.
        Ok(Claim::NotShared)
    }

    fn holds_key_id(&self, key_id: &KeyId) -> Result<bool, StoreError> {
        // The index knows without a query: a key id has an entry in `keys` while a path
        // under it holds a message or a retained value (also one still queued for the
        // disk; dropped by the sweep that deletes its last), and durables are counted.
        let idx = lock(&self.shared.idx);
        let k = key_id.as_bytes();
        Ok(idx.keys.get(k).is_some() || idx.durable_keys.contains_key(k))
    }

    fn set_durable(&self, key: &DurableKey, floor: u64, tenant: &Tenant) -> Result<(), StoreError> {
        let s = &self.shared;
        if let Some(d) = s.down() {
            return Err(d.error());
        }
        let mut ops = Vec::with_capacity(2);
        let now = (s.clock)();
        // Queued under the index lock (index, then queue), like `append`: a recovery
        // (`try_recover`) falls wholly before or wholly after it.
        let mut idx = lock(&s.idx);
        if let Some(d) = idx.durables.get_mut(key) {
            if d.floor == floor {
                return Ok(());
            }
            // A floor update (an `Ack`): merged with the one waiting, if any.
            d.floor = floor;
            let after = d.created_at;
            s.merge_floor_locked(lock(&s.queue), key, floor, after);
            return Ok(());
        }
        let known = idx.tenants.get(&tenant.key()).copied();
        s.check_quota(
            &idx,
            known,
            &Need {
                durables: 1,
                ..Need::default()
            },
        )?;
        let tid = Shared::tenant_id(&mut idx, tenant, &mut ops);
        let idle_since = (!idx.held.contains_key(key)).then_some(now);
        ops.push(Op::Durable {
            key_id: *key.key_id.as_bytes(),
            name: key.name.clone(),
            floor,
            tid,
            idle: idle_since,
        });
        let mut q = lock(&s.queue);
        // A floor still waiting for an earlier durable of this name (one the idle sweep
        // deleted): not this one's.
        q.floors.remove(key);
        let created_at = q.pushed + ops.len() as u64;
        idx.add_durable(
            key.clone(),
            DurableStat {
                floor,
                tid,
                idle_since,
                created_at,
            },
        );
        idx.usage(tid).durables += 1;
        idx.total.durables += 1;
        s.push_locked(q, ops, 0);
        drop(idx);
        Ok(())
    }

    fn status(&self) -> StoreStatus {
        let s = &self.shared;
        // One pass over the paths with a bounded heap, taking the index lock once per shard
        // (publishes wait on this lock: a store of a million paths would otherwise stall
        // routing for the whole pass). Counts are of a moving store, as on any live status.
        let (mut messages, mut bytes, mut path_count, mut tenants) = (0, 0, 0u64, 0u64);
        // (bytes, path, messages, first_seq, last_seq), smallest on top.
        type Entry = (u64, Vec<u8>, u64, u64, u64);
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<Entry>> =
            std::collections::BinaryHeap::with_capacity(101);
        for i in 0..super::sharded::SHARDS {
            let idx = lock(&s.idx);
            for (p, st) in idx.paths.shard_iter(i) {
                if st.count == 0 {
                    continue;
                }
                messages += st.count;
                bytes += st.bytes;
                path_count += 1;
                let smallest = heap.peek().map(|std::cmp::Reverse(e)| e.0);
                if heap.len() < 100 || smallest.is_some_and(|b| st.bytes > b) {
                    heap.push(std::cmp::Reverse((
                        st.bytes,
                        p.clone(),
                        st.count,
                        st.first_seq,
                        st.last_seq,
                    )));
                    if heap.len() > 100 {
                        heap.pop();
                    }
                }
            }
            tenants += idx
                .usage
                .shard_iter(i)
                .filter(|(_, u)| **u != Usage::default())
                .count() as u64;
        }
        let mut top: Vec<Entry> = heap.into_iter().map(|std::cmp::Reverse(e)| e).collect();
        top.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let list = top
            .into_iter()
            .map(|(bytes, p, messages, first_seq, last_seq)| PathStatus {
                path: hex::encode(p),
                messages,
                bytes,
                first_seq,
                last_seq,
            })
            .collect();
        let (retained, durables, quota_bytes) = {
            let idx = lock(&s.idx);
            (
                idx.total.retained,
                idx.durables.len() as u64,
                idx.total.bytes,
            )
        };
        StoreStatus {
            messages,
            bytes,
            quota_bytes,
            path_count,
            paths: list,
            retained,
            durables,
            tenants,
            ..self.status_frame()
        }
    }

    /// The counts from the running totals, without a pass over the paths (a caller
    /// without the admin token may see counts only): O(tenants), not O(paths).
    fn status_counts(&self) -> StoreStatus {
        let s = &self.shared;
        let mut tenants = 0u64;
        for i in 0..super::sharded::SHARDS {
            let idx = lock(&s.idx);
            tenants += idx
                .usage
                .shard_iter(i)
                .filter(|(_, u)| **u != Usage::default())
                .count() as u64;
        }
        let (total, durables, envelope_bytes) = {
            let idx = lock(&s.idx);
            (idx.total, idx.durables.len() as u64, idx.envelope_bytes)
        };
        StoreStatus {
            messages: total.msgs,
            bytes: envelope_bytes,
            quota_bytes: total.bytes,
            path_count: total.paths,
            paths: Vec::new(),
            retained: total.retained,
            durables,
            tenants,
            ..self.status_frame()
        }
    }

    fn metrics(&self) -> StoreMetrics {
        let m = &self.shared.m;
        let cumulative = |a: &[AtomicU64]| {
            let mut c = 0;
            a.iter()
                .map(|x| {
                    c += x.load(Relaxed);
                    c
                })
                .collect()
        };
        StoreMetrics {
            appends: m.appends.load(Relaxed),
            duplicates: m.duplicates.load(Relaxed),
            commits: m.commits.load(Relaxed),
            trimmed: m.trimmed.load(Relaxed),
            batch_buckets: cumulative(&m.batch),
            batch_sum: m.batch_sum.load(Relaxed),
            commit_buckets: cumulative(&m.commit),
            commit_seconds_sum: m.commit_nanos.load(Relaxed) as f64 / 1e9,
            quota_tenant_rejections: m.quota.get().0,
            quota_global_rejections: m.quota.get().1,
            quota_reserve_rejections: m.quota.get().2,
            storage_full_rejections: m.full.load(Relaxed),
            low_disk_rejections: m.low_disk.load(Relaxed),
            disk_free_bytes: Some(self.shared.free.load(Relaxed)).filter(|f| *f != u64::MAX),
            busy_rejections: m.busy.load(Relaxed),
            commit_failures: m.commit_failures.load(Relaxed),
            live_only: m.live_only.load(Relaxed),
            checkpoints: m.checkpoints.load(Relaxed),
            wal_truncations: m.wal_truncations.load(Relaxed),
            rows_read: m.rows_read.load(Relaxed),
            ..StoreMetrics::default()
        }
    }

    fn close(&self) {
        {
            let mut q = lock(&self.shared.queue);
            q.closed = true;
        }
        self.shared.stop_checkpointer.store(true, Relaxed);
        {
            let (m, cv) = &self.shared.checkpoint_wake;
            *lock(m) = true;
            cv.notify_all();
        }
        if let Some(h) = lock(&self.checkpointer).take() {
            let _ = h.join();
        }
        self.shared.work.notify_all();
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether a pattern matches a raw path (key id + tokens).
fn path_matches(pattern: &TokenPattern, path: &[u8]) -> bool {
    if path.len() < 32 || path.len() % 16 != 0 || &path[..16] != pattern.key_id().as_bytes() {
        return false;
    }
    let Ok(key) = KeyId::from_slice(&path[..16]) else {
        return false;
    };
    let tokens: Result<Vec<_>, _> = path[16..]
        .chunks(16)
        .map(whispeer_protocol::TopicToken::from_slice)
        .collect();
    match tokens.and_then(|t| whispeer_protocol::TokenPath::new(key, t)) {
        Ok(p) => pattern.matches(&p),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg_op(tid: i64, len: usize) -> Op {
        Op::Msg {
            seq: 0,
            pid: 1,
            kid: 1,
            tid,
            ts: 0,
            flags: 0,
            env: Bytes::from(vec![0; len]),
        }
    }

    /// A scratch folder for a file store: `wsp-{name}-{pid}` under the temp dir, emptied
    /// when made and removed when dropped (resolved, so a link in TMPDIR is not in its path).
    struct StoreDir(std::path::PathBuf);

    impl StoreDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("wsp-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            StoreDir(std::fs::canonicalize(&dir).unwrap())
        }

        fn path(&self) -> &std::path::Path {
            &self.0
        }

        /// A store file in it, not dependent on TMPDIR's free space.
        fn cfg(&self) -> StoreConfig {
            StoreConfig {
                path: self.0.join("s.db"),
                min_free_bytes: 0,
                ..StoreConfig::default()
            }
        }
    }

    impl Drop for StoreDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A clock the test moves: it reads the returned milliseconds, 1,000,000 at first.
    fn test_clock() -> (Arc<AtomicU64>, Clock) {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Relaxed))
        };
        (now, clock)
    }

    /// The durable `name` under one key id.
    fn durable_key(name: &str) -> DurableKey {
        DurableKey {
            key_id: KeyId::from_bytes([7; 16]),
            name: name.into(),
        }
    }

    /// The floor of the durable `d` in the store's file (read on its connection).
    fn floor_on_disk(s: &SqliteStore) -> Option<i64> {
        lock(&s.shared.conn)
            .query_row("SELECT floor FROM durables WHERE name = 'd'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .unwrap()
    }

    /// Appends `env` at its own path for `tenant`, without flags or publish id.
    fn append(
        s: &SqliteStore,
        env: &Envelope,
        qos: Qos,
        tenant: &Tenant,
    ) -> Result<Accepted, StoreError> {
        s.append(Append {
            path: &env.token_path(),
            envelope: env,
            flags: 0,
            qos,
            publish_id: None,
            tenant,
        })
    }

    /// Appends `env` at least once for `tenant`: the sequence number it is kept under.
    fn kept(s: &SqliteStore, env: &Envelope, tenant: &Tenant) -> u64 {
        match append(s, env, Qos::AtLeastOnce, tenant) {
            Ok(Accepted::New(Seq(seq))) => seq,
            other => panic!("not kept: {other:?}"),
        }
    }

    /// Finding (review F-G): past [`WAL_LIMIT`] the writer truncates the WAL after each
    /// turn; it ran `wal_checkpoint(TRUNCATE)` with the writer's 5 s busy timeout, so a
    /// reader holding an old snapshot made every turn block 5 s — one commit per 5 s. Now
    /// it waits 50 ms and, after a busy result, skips the next 8 turns (doubling up to 64).
    /// A second connection holds a read transaction from before a 70 MiB flood: the WAL
    /// stays past the limit, and over 32 commits (each waited for) the writer tries to
    /// truncate it at most 4 times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_holding_a_snapshot_does_not_hold_up_every_commit() {
        let dir = StoreDir::new("wal-reader");
        let cfg = StoreConfig {
            tenant_max_bytes: 0,
            total_max_bytes: 0,
            ..dir.cfg()
        };
        let db = cfg.path.clone();
        let s = SqliteStore::open_file(cfg).unwrap();
        let small = crate::test_envelope::envelope(1, &[2]);
        let big = {
            let mut b = small.as_bytes().to_vec();
            b.extend(std::iter::repeat_n(1u8, 1 << 20));
            Envelope::from_bytes(Bytes::from(b)).unwrap()
        };
        let first = kept(&s, &small, &Tenant::Local);
        durable_answer(&s, first).await.unwrap();
        let reader = Connection::open(&db).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM msgs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        let mut last = first;
        let mut i = 0;
        while i < 70 {
            match append(&s, &big, Qos::AtLeastOnce, &Tenant::Local) {
                Ok(Accepted::New(Seq(seq))) => {
                    last = seq;
                    i += 1;
                }
                // The queue is full: wait for what it holds.
                Err(StoreError::Busy(_)) => durable_answer(&s, last).await.unwrap(),
                other => panic!("{other:?}"),
            }
        }
        durable_answer(&s, last).await.unwrap();
        let wal = file_size(&wal_path(&db));
        assert!(wal > WAL_LIMIT, "the WAL is {wal} bytes");
        let (commits, tries) = (
            s.shared.m.commits.load(Relaxed),
            s.shared.m.wal_truncation_busy.load(Relaxed),
        );
        for _ in 0..32 {
            let seq = kept(&s, &small, &Tenant::Local);
            durable_answer(&s, seq).await.unwrap();
        }
        let commits = s.shared.m.commits.load(Relaxed) - commits;
        let tries = s.shared.m.wal_truncation_busy.load(Relaxed) - tries;
        assert!(commits >= 32, "{commits} commits");
        assert!(
            tries <= 4,
            "{tries} truncations tried over {commits} commits"
        );
        drop(reader);
        s.close();
    }

    /// Finding (review F-D): the byte quotas now count pages, so a store written under
    /// the old count is counted higher at its next start, silently over its limits. A
    /// store reopened with limits below what it holds logs one warning naming the number
    /// of tenants over `tenant_max_bytes` and both limits; within the limits, none.
    #[tokio::test]
    async fn a_store_reopened_over_its_byte_limits_says_so_once() {
        use std::io::Write;
        #[derive(Clone, Default)]
        struct Log(Arc<Mutex<Vec<u8>>>);
        impl Write for Log {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dir = StoreDir::new("over-quota");
        let cfg = dir.cfg();
        let s = SqliteStore::open_file(cfg.clone()).unwrap();
        let mut last = 0;
        for t in 1..=3u8 {
            let env = crate::test_envelope::envelope(t, &[2]);
            for _ in 0..10 {
                last = kept(&s, &env, &Tenant::Account([t; 32]));
            }
        }
        durable_answer(&s, last).await.unwrap();
        let per_tenant = s.status_counts().quota_bytes / 3;
        s.close();
        drop(s);
        let reopen = |cfg: StoreConfig| {
            let log = Log::default();
            let sub = tracing_subscriber::fmt()
                .with_writer({
                    let log = log.clone();
                    move || log.clone()
                })
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(sub, || {
                let s = SqliteStore::open_file(cfg).unwrap();
                s.close();
            });
            let text = String::from_utf8(lock(&log.0).clone()).unwrap();
            text.lines()
                .filter(|l| l.contains("store.tenant_max_bytes"))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reopen(cfg.clone()),
            Vec::<String>::new(),
            "within the limits"
        );
        let lines = reopen(StoreConfig {
            tenant_max_bytes: per_tenant - 1,
            total_max_bytes: 3 * per_tenant - 1,
            ..cfg.clone()
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("3 tenant(s)")
                && lines[0].contains(&format!("({})", per_tenant - 1))
                && lines[0].contains(&format!("({})", 3 * per_tenant - 1)),
            "{lines:?}"
        );
    }

    /// Finding (review F-F): the free-space estimate counted twice the envelope bytes, but
    /// an 8,300-byte envelope takes a 16 KiB page of its own, written to the WAL and then
    /// the file: four times its size. The estimate now counts twice what the quotas count
    /// ([`disk_bytes`]). With 33,200 bytes above the reserve — what the old estimate
    /// needed for two such envelopes — one fits (2 × 16,432 bytes) and, with it queued, a
    /// second does not.
    #[test]
    fn the_free_space_estimate_counts_the_pages_an_envelope_takes() {
        let s = SqliteStore::open_memory(StoreConfig {
            min_free_bytes: 1 << 20,
            ..StoreConfig::default()
        })
        .unwrap();
        let sh = &s.shared;
        sh.free.store((1 << 20) + 4 * 8_300, Relaxed);
        sh.fs_free.store((1 << 20) + 4 * 8_300, Relaxed);
        let op = msg_op(1, 8_300);
        assert!(disk_bytes(8_300) > PAGE_SIZE);
        let mut q = Queue::default();
        assert!(sh.check_free(&q, op.disk_bytes()).is_ok());
        q.push([msg_op(1, 8_300)]);
        let r = sh.check_free(&q, op.disk_bytes());
        assert!(matches!(r, Err(StoreError::StorageFull(_))), "{r:?}");
        drop(q.clear());
        assert_eq!(q.disk, 0);
        s.close();
    }

    /// Over the write queue's bounds, a tenant is refused only beyond its fair share (the
    /// bounds over the tenants with writes waiting), and nothing passes twice the bounds;
    /// what is committed or dropped gives its share back.
    #[test]
    fn the_write_queue_admits_each_tenant_its_fair_share() {
        let one = Queued { msgs: 1, bytes: 10 };
        let mut q = Queue::default();
        q.push((0..4).map(|_| msg_op(1, 10)));
        q.msgs = 4;
        assert!(!q.admits(Some(1), one, 4, 0), "tenant 1 filled 4 messages");
        assert!(q.admits(Some(2), one, 4, 0), "tenant 2 holds nothing");
        assert!(q.admits(None, one, 4, 0), "a new tenant holds nothing");
        q.push([msg_op(2, 10), msg_op(2, 10)]);
        q.msgs = 6;
        assert!(
            !q.admits(Some(2), one, 4, 0),
            "tenant 2 at its share (4 / 2)"
        );
        assert!(q.admits(None, one, 4, 0), "a third tenant: a share of 1");
        q.push([msg_op(3, 10), msg_op(4, 10)]);
        q.msgs = 8;
        assert!(!q.admits(None, one, 4, 0), "never past twice the bound");
        // Bytes: the same rule.
        assert!(!q.admits(Some(1), Queued { msgs: 0, bytes: 10 }, 100, 50));
        assert!(q.admits(Some(5), Queued { msgs: 0, bytes: 10 }, 100, 50));
        let done = per_tenant(q.clear().iter().flatten());
        assert!(q.by_tenant.is_empty(), "{:?}", q.by_tenant);
        assert_eq!(done[&1], Queued { msgs: 4, bytes: 40 });
        // Four tenants holding a byte each over a 3-byte bound: a share rounds down to 0
        // bytes, which must still be a bound (not "none"), though 5 <= 2 x 3.
        let mut q = Queue::default();
        q.push((1..=4).map(|t| msg_op(t, 1)));
        q.msgs = 4;
        assert!(!q.admits(Some(1), Queued { msgs: 0, bytes: 1 }, 100, 3));
    }
    use crate::store::LiveStore;

    fn dedup_op(i: u64) -> Op {
        Op::Dedup {
            tid: 1,
            pid: [0; 16],
            seq: i,
            ts: 0,
        }
    }

    fn seqs(blocks: &[Vec<Op>]) -> Vec<u64> {
        blocks
            .iter()
            .flatten()
            .map(|o| match o {
                Op::Dedup { seq, .. } => *seq,
                _ => unreachable!(),
            })
            .collect()
    }

    /// The writer takes queued operations as whole blocks, oldest first, up to the batch
    /// size: the blocks a push filled are handed over, not copied (their buffers are the
    /// same), so neither the push under the routing lock nor the writer's take copies the
    /// queue while holding its lock, however long it is. Emptied blocks come back for
    /// pushes to reuse.
    #[test]
    fn the_write_queue_hands_over_whole_blocks_in_order() {
        let mut q = Queue::default();
        let n = 5 * BLOCK as u64 + 7;
        q.push((0..n).map(dedup_op));
        assert_eq!(q.len, n as usize);
        let buffers: Vec<*const Op> = q.blocks.iter().map(|b| b.as_ptr()).collect();
        assert_eq!(buffers.len(), 6);
        // A batch of 2.5 blocks: two whole blocks, the third is not split.
        let batch = q.take(2 * BLOCK + BLOCK / 2);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].as_ptr(), buffers[0]);
        assert_eq!(batch[1].as_ptr(), buffers[1]);
        assert_eq!(seqs(&batch), (0..2 * BLOCK as u64).collect::<Vec<_>>());
        // The rest follows in order, however the batches fall.
        let mut rest = Vec::new();
        while !q.is_empty() {
            let b = q.take(2 * BLOCK);
            assert!(!b.is_empty() && b.iter().map(Vec::len).sum::<usize>() <= 2 * BLOCK);
            rest.extend(seqs(&b));
        }
        assert_eq!(rest, (2 * BLOCK as u64..n).collect::<Vec<_>>());
        // A batch smaller than a block takes exactly that many (the front of one block).
        q.push((0..10).map(dedup_op));
        assert_eq!(seqs(&q.take(3)), vec![0, 1, 2]);
        assert_eq!(seqs(&q.take(1)), vec![3]);
        assert_eq!(q.len, 6);
        // Emptied blocks are reused by later pushes.
        let mut batch = batch;
        batch.iter_mut().for_each(Vec::clear);
        q.recycle(&mut batch);
        assert_eq!(q.spare.len(), 2);
        q.push((0..2 * BLOCK as u64).map(dedup_op));
        assert!(q
            .blocks
            .iter()
            .any(|b| b.as_ptr() == buffers[0] || b.as_ptr() == buffers[1]));
        assert_eq!(q.clear().iter().map(Vec::len).sum::<usize>(), 6 + 2 * BLOCK);
        assert!(q.is_empty());
    }

    /// Durable floors wait merged, one per durable, and are handed to the writer only
    /// once it has taken the operation creating their durable's row (`after`): all at once
    /// when it has taken that far, else those it may write; a cleared queue drops them.
    #[test]
    fn the_write_queue_merges_durable_floors_and_hands_them_over_after_their_creation() {
        let floors = |m: HashMap<DurableKey, PendingFloor>| {
            let mut v: Vec<(String, u64)> = m.into_iter().map(|(k, f)| (k.name, f.floor)).collect();
            v.sort();
            v
        };
        let mut q = Queue::default();
        q.push((0..3).map(dedup_op));
        for f in 1..=1000 {
            q.merge_floor(&durable_key("new"), f, 2);
            q.merge_floor(&durable_key("old"), f + 1, 0);
        }
        assert_eq!(q.floors.len(), 2, "one floor per durable");
        assert!(!q.is_empty() && !q.is_idle());
        q.take(1);
        assert_eq!(floors(q.take_floors()), vec![("old".into(), 1001)]);
        assert_eq!(
            q.floors.len(),
            1,
            "\"new\" waits for its creation (position 2)"
        );
        q.take(1);
        assert_eq!(floors(q.take_floors()), vec![("new".into(), 1000)]);
        assert!(q.floors.is_empty() && q.floors_after == 0);
        q.merge_floor(&durable_key("new"), 5, 2);
        q.clear();
        assert!(q.floors.is_empty() && q.is_idle());
    }

    /// A floor update of a durable whose creation is still queued behind a batch the
    /// writer cut (`max_batch` 1, the writer stalled on the connection meanwhile) is
    /// written after the creation: written before, its `UPDATE` found no row and the
    /// creation's `INSERT` then kept the first floor.
    #[tokio::test]
    async fn a_merged_floor_is_written_after_its_durables_creation() {
        let s = SqliteStore::open_memory(StoreConfig {
            max_batch: 1,
            ..StoreConfig::default()
        })
        .unwrap();
        let k = durable_key("d");
        let env = crate::test_envelope::envelope(1, &[2]);
        let mut changes = s.changes();
        let conn = lock(&s.shared.conn);
        // A publish's operations (tenant, key id, path, message) queue ahead of the
        // creation; the writer takes one per turn.
        append(&s, &env, Qos::AtLeastOnce, &Tenant::Local).unwrap();
        s.set_durable(&k, 0, &Tenant::Local).unwrap();
        for f in 1..=10 {
            s.set_durable(&k, f, &Tenant::Local).unwrap();
        }
        assert_eq!(s.queued_writes().1, 1);
        drop(conn);
        let floor = || floor_on_disk(&s);
        tokio::time::timeout(
            Duration::from_secs(30),
            changes.wait_for(|_| s.queued_writes() == (0, 0) && floor() == Some(10)),
        )
        .await
        .unwrap_or_else(|_| panic!("the floor on disk stayed {:?}", floor()))
        .unwrap();
        assert_eq!(s.durable(&k).unwrap(), Some(10));
    }

    fn plan_of(conn: &Connection, sql: &str) -> String {
        let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows: Vec<String> = st
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.join(" | ")
    }

    /// A file store keeps its sequence-space id across restarts (its numbers go on); a
    /// memory or `none` store numbers afresh, so each draws its own.
    #[test]
    fn seq_space_survives_a_restart_of_a_file_store_only() {
        let dir = StoreDir::new("space");
        let cfg = dir.cfg();
        let a = SqliteStore::open_file(cfg.clone()).unwrap();
        let first = a.seq_space();
        a.close();
        drop(a);
        let b = SqliteStore::open_file(cfg).unwrap();
        assert_eq!(b.seq_space(), first, "reopened file store");
        b.close();
        let m1 = SqliteStore::open_memory(StoreConfig::default()).unwrap();
        let m2 = SqliteStore::open_memory(StoreConfig::default()).unwrap();
        assert_ne!(m1.seq_space(), m2.seq_space());
        assert_ne!(m1.seq_space(), first);
        assert_ne!(LiveStore::new().seq_space(), LiveStore::new().seq_space());
    }

    #[test]
    fn history_retained_and_since_reads_use_the_key_id_indexes() {
        let conn = Connection::open_in_memory().unwrap();
        init_schema(&conn).unwrap();
        let read = plan_of(
            &conn,
            "SELECT m.seq, p.path, m.ts, m.env FROM msgs m JOIN paths p ON p.id = m.pid
             WHERE m.kid = 1 AND m.seq >= 1 AND m.seq <= 9 ORDER BY m.seq LIMIT 10",
        );
        assert!(read.contains("USING INDEX msgs_kid"), "{read}");
        assert!(!read.contains("SCAN m"), "{read}");
        let since = plan_of(&conn, "SELECT min(seq) FROM msgs WHERE kid = 1 AND ts >= 5");
        assert!(since.contains("msgs_kid"), "{since}");
        let retained = plan_of(
            &conn,
            "SELECT r.seq, p.path, r.env FROM retained r JOIN paths p ON p.id = r.pid
             WHERE r.kid = 1 AND r.seq >= 3 AND r.seq <= 9 AND r.ts >= 0 ORDER BY r.seq",
        );
        assert!(retained.contains("retained_kid"), "{retained}");
        let last_n = plan_of(
            &conn,
            "SELECT seq FROM msgs WHERE pid = 1 AND seq <= 9 ORDER BY seq DESC LIMIT 1 OFFSET 2",
        );
        assert!(last_n.contains("msgs_pid"), "{last_n}");
    }

    /// Review F1: a release that reaches the store after the next holder's hold (the relay
    /// gives a name to one connection at a time, but the old holder's release may come
    /// late) leaves the durable held: idle expiry does not take it, neither while running
    /// (the writer's sweep) nor at the next open (the file's idle state).
    #[test]
    fn a_late_release_does_not_make_a_held_durable_idle() {
        let dir = StoreDir::new("late-release");
        let cfg = StoreConfig {
            durable_idle_ms: 10_000,
            ..dir.cfg()
        };
        let (now, clock) = test_clock();
        let (d, control) = (durable_key("d"), durable_key("control"));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let lost = crate::store::HoldLost::new(tx, 1);
        let s = SqliteStore::open_file_with_clock(cfg.clone(), clock.clone()).unwrap();
        s.set_durable(&d, 0, &Tenant::Local).unwrap();
        // `control` is never held: its expiry shows that a sweep ran.
        s.set_durable(&control, 0, &Tenant::Local).unwrap();
        s.hold_durable(&d, &lost).unwrap(); // A
        s.hold_durable(&d, &lost).unwrap(); // B, before A's release reached the store
        s.release_hold(&d); // A's late release
        now.fetch_add(20_000, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.durable(&control).unwrap().is_some() {
            assert!(Instant::now() < deadline, "no idle sweep ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.durable(&d).unwrap(), Some(0), "B holds it: not idle");
        s.close();
        drop(s);
        // Reopened later (B's connection never released it before the stop): the file
        // says held, so its idle time starts at the open.
        now.fetch_add(20_000, Relaxed);
        let s = SqliteStore::open_file_with_clock(cfg, clock).unwrap();
        assert_eq!(
            s.durable(&d).unwrap(),
            Some(0),
            "held when the relay stopped"
        );
        s.close();
    }

    /// Review (f1b806a): the idle sweep expired durables under the index lock and removed
    /// their waiting floors later, under the queue lock alone. A `set_durable` creating the
    /// name again and an `Ack` moving the new durable's floor, both between the two steps,
    /// had that floor removed: the row was written with the creation's floor, and after a
    /// restart the acknowledged messages came again. Now both happen in one critical
    /// section; the hook runs the two calls right after it (before the fix, between them).
    #[tokio::test]
    async fn a_durable_created_again_as_the_sweep_expires_it_keeps_its_acked_floor() {
        let dir = StoreDir::new("expiry-floor");
        let cfg = StoreConfig {
            durable_idle_ms: 10_000,
            ..dir.cfg()
        };
        let (now, clock) = test_clock();
        let k = durable_key("d");
        let s = SqliteStore::open_file_with_clock(cfg.clone(), clock.clone()).unwrap();
        s.set_durable(&k, 0, &Tenant::Local).unwrap();
        wait_until(&s, "the durable written", || s.queued_writes() == (0, 0)).await;
        // The writer's next sweep expires `d` and stops in the hook until told to go on.
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let mut reached_tx = Some(reached_tx);
        *lock(&s.shared.after_expiry) = Some(Box::new(move || {
            if let Some(t) = reached_tx.take() {
                let _ = t.send(());
            }
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
        }));
        now.fetch_add(20_000, Relaxed);
        tokio::time::timeout(Duration::from_secs(30), reached)
            .await
            .expect("no sweep expired the durable")
            .unwrap();
        assert_eq!(s.durable(&k).unwrap(), None, "expired");
        // Subscribed again under the name (created at 0), then an Ack moves it to 5.
        s.set_durable(&k, 0, &Tenant::Local).unwrap();
        s.set_durable(&k, 5, &Tenant::Local).unwrap();
        go.send(()).unwrap();
        let floor = || floor_on_disk(&s);
        wait_until(&s, "the new durable written", || {
            s.queued_writes() == (0, 0) && floor().is_some()
        })
        .await;
        assert_eq!(floor(), Some(5), "the floor on disk");
        s.close();
        drop(s);
        let s = SqliteStore::open_file_with_clock(cfg, clock).unwrap();
        assert_eq!(s.durable(&k).unwrap(), Some(5), "after a restart");
        s.close();
    }

    /// Waits (bounded) until `f` holds, re-checking after each turn of the store's writer.
    async fn wait_until(s: &SqliteStore, what: &str, mut f: impl FnMut() -> bool) {
        let mut changes = s.changes();
        tokio::time::timeout(Duration::from_secs(30), changes.wait_for(|_| f()))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("store open");
    }

    /// What `when_durable(seq)` answers (bounded).
    async fn durable_answer(s: &SqliteStore, seq: u64) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.when_durable(
            Seq(seq),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("when_durable never answered")
            .expect("the callback was dropped")
    }

    /// `append` checks `down`, then queues: a failed commit can empty the queue between
    /// the two steps, and the write is queued behind it. The writer drops it (the recovery
    /// probe fails too, the store is still down), and it is lost like everything `fail`
    /// dropped: `when_durable` never answers Ok for it — a `PubAck` for a message never
    /// stored — neither while the store is down (after a live-only message raised
    /// `committed` past it) nor once the store has recovered.
    #[tokio::test]
    async fn a_write_queued_as_the_store_goes_down_is_never_acknowledged() {
        let dir = StoreDir::new("race-down");
        let cfg = StoreConfig {
            retry_ms: 10,
            ..dir.cfg()
        };
        let db = cfg.path.clone();
        let s = SqliteStore::open_file(cfg).unwrap();
        // Commits and probes fail at once on the held lock (not after the busy timeout).
        lock(&s.shared.conn).busy_timeout(Duration::ZERO).unwrap();
        s.shared.busy_ms.store(0, Relaxed);
        let env = crate::test_envelope::envelope(1, &[2]);
        let publish = |qos| append(&s, &env, qos, &Tenant::Local).unwrap();
        // SQLite's write lock is held by another connection: the next commit fails.
        let holder = Connection::open(&db).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let Accepted::New(Seq(first)) = publish(Qos::AtLeastOnce) else {
            panic!("not kept")
        };
        wait_until(&s, "the failed commit", || s.shared.down().is_some()).await;
        assert!(durable_answer(&s, first).await.is_err());
        // An append that found the store up queues its write only now (its two steps,
        // with `fail` between them), then a live-only message is numbered.
        let raced = s.shared.enqueue(vec![msg_op(1, 64)], 1);
        let Accepted::Live(Seq(live)) = publish(Qos::AtMostOnce) else {
            panic!("QoS 0 is live only")
        };
        assert!(raced < live);
        wait_until(&s, "the writer's turn while down", || {
            let q = lock(&s.shared.queue);
            q.is_empty() && !q.inflight && s.shared.committed.load(Relaxed) >= live
        })
        .await;
        assert!(
            s.shared.down().is_some(),
            "the probe commits despite the lock"
        );
        let r = durable_answer(&s, raced).await;
        assert!(r.is_err(), "a dropped write answered durable: {r:?}");
        // The lock goes: the store recovers, and the dropped write stays lost.
        holder.execute_batch("COMMIT").unwrap();
        drop(holder);
        wait_until(&s, "the recovery", || s.shared.down().is_none()).await;
        let r = durable_answer(&s, raced).await;
        assert!(r.is_err(), "after the recovery: {r:?}");
        let Accepted::New(Seq(next)) = publish(Qos::AtLeastOnce) else {
            panic!("not kept")
        };
        let r = durable_answer(&s, next).await;
        assert!(r.is_ok(), "a write after the recovery: {r:?}");
        s.close();
    }

    /// The Broker's open ([`SqliteStore::open_file_nofollow`]) refuses a symbolic link put
    /// at the store path, or at its `-lock`, after the Broker's guard checked the files
    /// (the swap made here before the open, deterministically), and neither creates nor
    /// opens its target; the CLI's `open_file` still follows one (an operator's link).
    #[cfg(unix)]
    #[tokio::test]
    async fn the_nofollow_open_refuses_a_symbolic_link_at_the_store_or_its_lock() {
        use std::os::unix::fs::symlink;
        // Resolved: NOFOLLOW refuses a link anywhere in the path (a TMPDIR link too).
        let dir = StoreDir::new("nofollow");
        let cfg = dir.cfg();
        let lock = lock_path(&cfg.path);
        let (target, lock_target) = (
            dir.path().join("elsewhere.db"),
            dir.path().join("elsewhere-lock"),
        );
        symlink(&target, &cfg.path).unwrap();
        let e = SqliteStore::open_file_nofollow(cfg.clone())
            .expect_err("a symbolic link at the store path is refused");
        let shown = format!("store file {}: is a symbolic link", cfg.path.display());
        assert!(
            matches!(&e, StoreError::Open(m) if m.starts_with(&shown)),
            "{e}"
        );
        assert!(!target.exists(), "nothing created through the link");

        std::fs::remove_file(&cfg.path).unwrap();
        std::fs::remove_file(&lock).unwrap(); // the lock is taken first: left by the refusal
        symlink(&lock_target, &lock).unwrap();
        let e = SqliteStore::open_file_nofollow(cfg.clone())
            .expect_err("a symbolic link at the lock file is refused");
        let shown = format!("its lock file {} is a symbolic link", lock.display());
        assert!(
            matches!(&e, StoreError::Open(m) if m.contains(&shown)),
            "{e}"
        );
        assert!(!lock_target.exists(), "nothing created through the link");
        assert!(
            !cfg.path.exists(),
            "the store is not opened past a refused lock"
        );

        // Without links the store opens; the CLI's open follows an operator's link.
        std::fs::remove_file(&lock).unwrap();
        SqliteStore::open_file_nofollow(cfg.clone())
            .unwrap()
            .close();
        std::fs::rename(&cfg.path, &target).unwrap();
        symlink(&target, &cfg.path).unwrap();
        SqliteStore::open_file(cfg.clone()).unwrap().close();
        assert!(std::fs::symlink_metadata(&cfg.path)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    /// Review finding: a path whose owner's messages are all trimmed moves to the tenant
    /// of its oldest message, whose count there used to come from a `count(*)` over the
    /// path's rows in the writer (every trim scanned a long path when tenants with one
    /// message each took turns at its front). The counts now come from the index: after
    /// many owner changes (twenty tenants, a path keeping three messages, the owner's last
    /// one trimmed on almost every commit) the index equals one loaded from the file.
    #[tokio::test]
    async fn owner_changes_keep_the_index_equal_to_the_file() {
        let dir = StoreDir::new("heirs");
        let cfg = StoreConfig {
            max_messages: 3,
            ..dir.cfg()
        };
        let s = SqliteStore::open_file(cfg.clone()).unwrap();
        let env = crate::test_envelope::envelope(1, &[2]);
        let other = crate::test_envelope::envelope(1, &[3]);
        let mut last = 0;
        for round in 0..3u8 {
            for t in 1..=20u8 {
                // Mostly one message per tenant at a time; every fifth tenant two, and
                // every seventh one on a second path as well.
                let tenant = Tenant::Account([t; 32]);
                let n = if t % 5 == 0 { 2 } else { 1 };
                let mut targets = vec![&env; n];
                if (t + round) % 7 == 0 {
                    targets.push(&other);
                }
                for e in targets {
                    last = kept(&s, e, &tenant);
                }
            }
            durable_answer(&s, last).await.unwrap();
        }
        let loaded = load(&lock(&s.shared.conn), &cfg, 0).unwrap().idx;
        let idx = lock(&s.shared.idx);
        let paths = |i: &Index| {
            let mut v: Vec<(Vec<u8>, i64, u64, u64, u64)> = i
                .paths
                .iter()
                .map(|(k, st)| {
                    let own = i.path_tenant_msgs(st.pid, st.owner);
                    (k.clone(), st.owner, own, st.count, st.bytes)
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(paths(&idx), paths(&loaded));
        assert_eq!(paths(&idx).len(), 2);
        // Not only consistent: each path counts against a tenant that still has data there
        // (the creators' messages were trimmed long ago).
        for (_, st) in idx.paths.iter() {
            assert!(
                idx.path_tenant_msgs(st.pid, st.owner) > 0,
                "owner {}",
                st.owner
            );
        }
        let counts = |i: &Index| {
            let mut v: Vec<((i64, i64), u64)> =
                i.path_tenant_msgs.iter().map(|(k, n)| (*k, *n)).collect();
            v.sort();
            v
        };
        assert_eq!(counts(&idx), counts(&loaded));
        assert_eq!(counts(&idx).iter().map(|(_, n)| n).sum::<u64>(), 6);
        let usage = |i: &Index| {
            let mut v: Vec<(i64, Usage)> = i
                .usage
                .iter()
                .filter(|(_, u)| **u != Usage::default())
                .map(|(k, u)| (*k, *u))
                .collect();
            v.sort_by_key(|(k, _)| *k);
            v
        };
        assert_eq!(usage(&idx), usage(&loaded));
        assert_eq!(idx.total, loaded.total);
        assert_eq!(idx.envelope_bytes, loaded.envelope_bytes);
        drop(idx);
        s.close();
    }

    #[test]
    fn the_none_store_says_it_keeps_nothing() {
        let s = LiveStore::new();
        let p = TokenPattern::new(
            KeyId::from_bytes([1; 16]),
            vec![whispeer_protocol::PatternElem::Rest],
        )
        .unwrap();
        assert!(matches!(
            s.retained(&p, 0, Seq(0)),
            Err(StoreError::Unsupported(_))
        ));
        assert!(matches!(
            s.plan(&p, Replay::FromSeq(0), Seq(0)),
            Err(StoreError::Unsupported(_))
        ));
        let k = DurableKey {
            key_id: KeyId::from_bytes([1; 16]),
            name: "d".into(),
        };
        assert!(matches!(s.durable(&k), Err(StoreError::Unsupported(_))));
        assert!(matches!(
            s.set_durable(&k, 1, &Tenant::Local),
            Err(StoreError::Unsupported(_))
        ));
    }

    #[test]
    fn tenants_fold_v4_mapped_addresses_and_group_ipv6_by_prefix() {
        let t = |a: &str, prefix| Tenant::from_peer(Some(a.parse().unwrap()), prefix);
        assert_eq!(t("10.1.2.3:5", 64), t("[::ffff:10.1.2.3]:6", 64));
        assert_ne!(t("10.1.2.3:5", 64).key(), t("10.1.2.4:5", 64).key());
        // One /64: one tenant, whatever the interface id; the next /64 is another.
        assert_eq!(
            t("[2001:db8:0:1::1]:5", 64),
            t("[2001:db8:0:1:ffff::9]:6", 64)
        );
        assert_ne!(t("[2001:db8:0:1::1]:5", 64), t("[2001:db8:0:2::1]:5", 64));
        // The prefix is the operator's: /128 counts single addresses, /48 whole sites.
        assert_ne!(t("[2001:db8:0:1::1]:5", 128), t("[2001:db8:0:1::2]:5", 128));
        assert_eq!(t("[2001:db8:0:1::1]:5", 48), t("[2001:db8:0:2::1]:5", 48));
        assert_eq!(Tenant::from_peer(None, 64), Tenant::Local);
        assert_ne!(Tenant::Account([0; 32]).key(), Tenant::Local.key());
    }

    #[test]
    fn quota_checks_name_the_first_limit_hit() {
        use crate::store::quota::over;
        let u = Usage {
            bytes: 90,
            msgs: 9,
            ..Usage::default()
        };
        let n = Need {
            bytes: 20,
            msgs: 1,
            ..Need::default()
        };
        assert_eq!(
            over(&u, &n, [100, 10, 0, 0, 0]),
            Some(("stored bytes", 100))
        );
        assert_eq!(over(&u, &n, [0, 10, 0, 0, 0]), None, "9 + 1 <= 10");
        assert_eq!(over(&u, &n, [0, 9, 0, 0, 0]), Some(("stored messages", 9)));
        assert_eq!(over(&u, &n, [0, 0, 0, 0, 0]), None, "0 = unlimited");
    }
}
