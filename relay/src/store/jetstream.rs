//! The cluster store: JetStream numbers and keeps stored messages for every relay.
//!
//! With `[cluster] store = "jetstream"` every relay of a cluster uses one JetStream stream
//! (`[cluster] stream`, default `WSP`, subjects `<prefix>.>`), so a sequence means the same
//! on every relay:
//!
//! - **Publishing.** [`append`](Store::append) (under a routing shard's lock, never waiting)
//!   queues the envelope for the stream — subject `<prefix>.<key id hex>.<token hex>…`,
//!   header `Nats-Msg-Id` for QoS 2 — and answers [`Accepted::Pending`]. The publish is not
//!   routed then: one task publishes the queue in order, another awaits JetStream's acks in
//!   order; the stream's ack carries the sequence, and only then does the publisher get its
//!   `PubAck` ([`Store::when_sequenced`]). A duplicate `Nats-Msg-Id` inside the stream's
//!   duplicate window is answered with the original's sequence (QoS 2 dedup across relays).
//! - **Live delivery** on every relay, the accepting one included, comes from the stream:
//!   one pull consumer per relay reads it in sequence order (two requests of at most
//!   2 MiB outstanding, so a relay that falls behind holds little) and hands each message to
//!   the router ([`Store::take_sequenced`]), which makes it [`last_seq`](Store::last_seq)
//!   under the routing lock ([`Store::advance`]) and fans it out with that sequence.
//! - **QoS 0 the retention policy does not keep** (`store_qos0 = false`) is not numbered:
//!   [`Accepted::Live`] with sequence 0, routed at once and carried to the other relays by
//!   core NATS (the bridge, on `<prefix>_live.…`). It cannot be resumed.
//! - **History** (replay, catch-up) is read back from the stream by a pull consumer
//!   filtered on the key id, from a start sequence, one bounded fetch per chunk; **retained values** live in a second
//!   stream (`<stream>_RETAINED`, subjects `<prefix>_retained.>`, one message per subject)
//!   carrying the original's sequence in header `Wsp-Seq`; **durable floors** live in a
//!   third stream (`<stream>_DURABLE`, subjects `<prefix>_durable.<key>`, one message per
//!   durable), kept in memory from an ordered read of it and written behind — a deleted
//!   durable's record is replaced by a deletion marker (header `Wsp-Deleted`), and a
//!   sweep deletes durables idle past `store.durable_idle_ms` that nobody holds and purges
//!   markers older than `store.durable_marker_keep_ms` (see [`sweep`]); **holds on
//!   durable names** (one holder per durable in the cluster) are leases in a fourth
//!   stream (`<stream>_LEASES`, see [`lease`]); **key-id claims** of relay accounts are
//!   records in a fifth (`<stream>_CLAIMS`, one per key id, written once: the first group
//!   to claim a key id holds it at every relay).
//! - **Sequence space.** `Welcome.seq_space` is derived from the stream's name and creation
//!   time, the same on every relay, and new when the stream is recreated.
//!
//! JetStream unreachable: publishes that need the store get `Err(store_failed)` (retryable)
//! while live routing of QoS 0 goes on. The relay sees here what it sees anyway — tokens,
//! sizes, flags, publish ids — and never opens an envelope.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use whispeer_protocol::frame::{pub_flags, Replay};
use whispeer_protocol::{Envelope, KeyId, Qos, TokenPattern};

pub mod accounts;
mod lease;
mod ledger;

use ledger::{Ledger, Limits, Tag};

use super::quota::Need;
use super::{
    path_bytes, Accepted, Append, Claim, DurableKey, HoldLost, OnDurable, OnSequenced, ReadChunk,
    ReadPlan, RetentionStatus, Sequenced, Store, StoreError, StoreMetrics, StoreStatus, Stored,
    Tenant,
};
use crate::config::{ClusterConfig, StoreConfig};
use crate::held_bytes::{FairLimit, Share};
use crate::ids::Seq;

/// Header carrying a retained value's original sequence.
const SEQ_HEADER: &str = "Wsp-Seq";
/// Header carrying the publish flags (absent = 0).
const FLAGS_HEADER: &str = "Wsp-Flags";
/// Header carrying the publishing tenant's tag (hex of [`Tenant::tag`]): what every relay's
/// usage ledger counts a stored message, retained value or durable name against (and, on
/// the cluster bridge, what a relay charges another relay's forward to).
pub(crate) const TENANT_HEADER: &str = "Wsp-Tenant";
/// Header of a durable record: a keyed hash of the durable's owner (`Account::owner`: the
/// account's id, or the name of a legacy entry; or the `Sub.owner` secret's hash), so every
/// relay enforces it and NATS learns no name.
const OWNER_HEADER: &str = "Wsp-Owner";
/// Header carrying the writing relay's origin and write id (`<origin hex>.<id>`): the
/// ordered read of the relay that wrote a message ends its in-flight quota count (see
/// [`ledger`]).
const WRITE_HEADER: &str = "Wsp-Write";
/// Header of a durable's deletion marker (value `1`, empty payload): the durable was deleted
/// (by its holder, or idle past `store.durable_idle_ms`); it replaces the durable's record.
const DELETED_HEADER: &str = "Wsp-Deleted";
/// Most idle durables one sweep deletes (the next sweep goes on).
const SWEEP_BATCH: usize = 256;
/// Header JetStream puts on a headers-only delivery: the payload's size.
const SIZE_HEADER: &str = "Nats-Msg-Size";
/// Most messages one history read returns.
const CHUNK: usize = 1024;
/// How long a history or retained read may take before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Numbered messages waiting for the router.
const FEED: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream {what}: {e}"))
}

/// The subject prefix of live-only (unnumbered) envelopes on core NATS, outside the
/// stream's `<prefix>.>`.
pub fn live_prefix(prefix: &str) -> String {
    format!("{prefix}_live")
}

fn retained_prefix(prefix: &str) -> String {
    format!("{prefix}_retained")
}

fn durable_prefix(prefix: &str) -> String {
    format!("{prefix}_durable")
}

fn claim_prefix(prefix: &str) -> String {
    format!("{prefix}_claim")
}

/// What a key-id claim record holds: a keyed hash of the accounts group (NATS learns no
/// group name; equal groups give equal tags on every relay).
fn group_tag(group: &str) -> String {
    hex::encode(keyed_tag(
        b"whispeer-relay/v2/jetstream-claim-group\0",
        group.as_bytes(),
    ))
}

/// 16 bytes of SHA-256 over a context string (its own for each kind of tag) and `data`.
fn keyed_tag(context: &[u8], data: &[u8]) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(context);
    h.update(data);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&h.finalize()[..16]);
    tag
}

/// The subject prefix, inside the stream, of retained-only values (QoS 0 + `RETAIN` when
/// `store_qos0` is off): numbered by the stream like every stored publish, but outside
/// every history read's filter (`<prefix>.<key id>.>`: a key id is 32 hex digits, never
/// `r`), so history holds exactly what SQLite's does. Each is a message of the stream,
/// charged to its tenant (see [`ledger::RETAINED_ONLY_KEEP`]).
fn retained_only_prefix(prefix: &str) -> String {
    format!("{prefix}.r")
}

/// A tenant as the stream and NATS see it ([`Tenant::tag`]: a keyed hash of its store key).
fn tenant_tag(t: &Tenant) -> Tag {
    t.tag()
}

/// Whether NATS subject `subject` matches filter `filter` (`*` one token, `>` the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The owner as a durable record carries it (hex of a keyed hash).
fn owner_tag(owner: &str) -> String {
    hex::encode(keyed_tag(
        b"whispeer-relay/v2/jetstream-durable-owner\0",
        owner.as_bytes(),
    ))
}

/// A durable this relay is about to create: whose it will be, for how long that is
/// reserved, and how many `Sub`s of that owner are on their way to create it.
#[derive(Debug)]
struct Creating {
    /// The owner tag its record will carry.
    owner: Option<String>,
    /// Until when another owner's `Sub` for the name is answered `busy`.
    until: std::time::Instant,
    /// `Sub`s of this owner between `durable_owner` and `set_durable` (one that fails in
    /// between, refused the name or the hold, or at its read, is told to the store:
    /// `durable_abandoned`, `durable_for`; otherwise the entry expires).
    pending: u32,
}

/// A durable record as read from the durable stream.
#[derive(Debug, Clone, Default)]
struct DurableRecord {
    floor: Option<u64>,
    owner: Option<String>,
    tenant: Tag,
    /// Its stream sequence (0: not read from the stream).
    seq: u64,
    /// When the stream received it, ms since the epoch.
    ts: u64,
    /// A deletion marker (header `Wsp-Deleted`): the durable is gone.
    deleted: bool,
}

impl DurableRecord {
    fn of(h: Option<&HeaderMap>, payload: &[u8], seq: u64, ts: u64) -> Self {
        DurableRecord {
            floor: std::str::from_utf8(payload)
                .ok()
                .and_then(|v| v.parse::<u64>().ok()),
            owner: h
                .and_then(|h| h.get(OWNER_HEADER))
                .map(|v| v.as_str().to_string()),
            tenant: header_tag(h),
            seq,
            ts,
            deleted: h.is_some_and(|h| h.get(DELETED_HEADER).is_some()),
        }
    }
}

/// What this relay knows of a durable's newest record: its stream sequence (the condition
/// of a deletion or a refresh), when it was written (ms since the epoch: the idle clock),
/// its floor (what a refresh rewrites) and its tenant.
#[derive(Debug, Clone, Copy)]
struct RecordMeta {
    seq: u64,
    ts: u64,
    floor: Option<u64>,
    tenant: Tag,
}

/// A durable's owner as this relay knows it.
#[derive(Debug, Clone)]
struct Owner {
    /// Its owner tag (header `Wsp-Owner`).
    tag: String,
    /// The stream sequence of the record it was read from or written with — or, noted here
    /// and not written yet (`local`), of the newest record known then: a newer record with
    /// no owner, or a deletion marker, says it is not the durable's any more.
    seq: u64,
    /// Noted here (an adoption: `durable_owner`'s first owner of an owner-less durable) and
    /// not written yet: a newer owner-less record (a floor of another relay's) keeps it,
    /// since its next floor here writes it.
    local: bool,
}

impl DurableRecord {
    /// A record read directly from the durable stream.
    fn read(m: &jetstream::message::StreamMessage) -> Self {
        let ts = (m.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        Self::of(Some(&m.headers), &m.payload, m.sequence, ts)
    }
}

/// The tenant tag a message header names ([`ledger::NO_TAG`] when absent or malformed).
fn header_tag(h: Option<&HeaderMap>) -> Tag {
    let mut tag = ledger::NO_TAG;
    if let Some(v) = h.and_then(|h| h.get(TENANT_HEADER)) {
        if hex::decode_to_slice(v.as_str(), &mut tag).is_err() {
            tag = ledger::NO_TAG;
        }
    }
    tag
}

/// The write id of a message this relay run (`origin`) wrote, from its `Wsp-Write` header.
fn own_write(h: Option<&HeaderMap>, origin: &str) -> Option<u64> {
    let v = h?.get(WRITE_HEADER)?;
    let (o, id) = v.as_str().split_once('.')?;
    (o == origin).then(|| id.parse().ok()).flatten()
}

fn header_u64(h: Option<&HeaderMap>, name: &str) -> Option<u64> {
    h.and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse::<u64>().ok())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The durable writer's test hold ([`JetStreamStore::hold_durable_writer`]): it runs, it is
/// to stop before its next floor, it waits there.
const WRITER_RUNS: u8 = 0;
const WRITER_HELD: u8 = 1;
const WRITER_PARKED: u8 = 2;
/// How long a history read's consumer is kept for its next chunk.
const CURSOR_IDLE: Duration = Duration::from_secs(30);
/// Most durable creations remembered between a `Sub`'s owner check and its creation;
/// beyond, a `Sub` creating another name is answered `busy`.
const PENDING_CREATIONS: usize = 4096;
/// How long a creation keeps the name for its owner: far longer than a `Sub` takes from its
/// owner check to the creation (a hold, a read and a write, each given up after 5 s), so
/// no `Sub` of its owner on its way loses it; then an entry left behind (by a caller that
/// never said it gave up) stops refusing other owners.
const CREATION_TTL: Duration = Duration::from_secs(60);
/// Retained values read at once by one retained lookup.
const RETAINED_READS: usize = 32;
/// Most history consumers kept between chunks.
const MAX_CURSORS: usize = 64;

/// How long a history fetch may stay silent before it counts as finished (a fetch whose
/// byte allowance was used up exactly may end without a status message).
const FETCH_QUIET: Duration = Duration::from_secs(2);

/// A history read's consumer, kept between the chunks of one read. It holds no messages
/// between chunks: each chunk is fetched with a request bounded in messages and bytes, so
/// a replay that waits for its subscriber to read (possibly forever) holds nothing here.
/// (async-nats's ordered consumer asks for 500 messages at a time, of any size, and keeps
/// asking: what it had fetched ahead stayed in this relay's memory — up to 500 envelopes
/// per parked read.)
struct Cursor {
    consumer: consumer::PullConsumer,
    /// The consumer sequence its next delivery must carry: a message lost between the
    /// server and this relay (AckNone: never redelivered) shows as a jump.
    next: u64,
    at: std::time::Instant,
    /// Where its consumer is deleted when the cursor goes (see `Drop`).
    js: jetstream::Context,
    rt: tokio::runtime::Handle,
}

/// A history read's consumer is deleted once its read is over: at its end, on an error,
/// or when its cursor is dropped between chunks (idle, or beyond [`MAX_CURSORS`]). The
/// server would delete it only after `CURSOR_IDLE * 2` without a request, so a client
/// replaying in a loop left one consumer per read on the NATS servers (review finding F6).
/// The deletion goes behind (the read does not wait for it).
impl Drop for Cursor {
    fn drop(&mut self) {
        let info = self.consumer.cached_info();
        let (name, stream) = (info.name.clone(), info.stream_name.clone());
        let js = self.js.clone();
        self.rt.spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                tracing::debug!(error = %e, "cluster store: a history consumer was not deleted");
            }
        });
    }
}

/// Checks that a delivery of a read without acks (AckNone: never redelivered) is the one
/// `due` (its consumer sequence) and moves `due` on: a message lost between the server and
/// this relay shows as a jump, and fails the read instead of leaving a silent gap.
fn in_order(delivered: u64, due: &mut u64) -> Result<(), String> {
    if delivered != *due {
        return Err(format!(
            "delivery {delivered} arrived where {due} was due (a message was lost on the way)"
        ));
    }
    *due += 1;
    Ok(())
}

/// When the stream received a message, in ms since the epoch.
fn published_ms(info: &jetstream::message::Info<'_>) -> u64 {
    (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

/// What one history fetch brought.
enum Fetched {
    /// In stream order (none: nothing was pending).
    Messages(Vec<FetchedMsg>),
    /// The next message is larger than the byte allowance.
    TooLarge,
}

/// One message of a history fetch.
struct FetchedMsg {
    seq: u64,
    /// Received by the stream, ms since the epoch.
    ts: u64,
    /// Messages the consumer still has after this one.
    pending: u64,
    bytes: usize,
    envelope: Result<Envelope, whispeer_protocol::DecodeError>,
}

/// One publish on its way to the stream.
struct Job {
    ticket: u64,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    /// The retained stream's subject, for a `RETAIN` publish.
    retain: Option<String>,
    /// The ledger's write id of this publish (its quota usage in flight).
    write: u64,
    /// Its tenant: publishes are answered in order per tenant ([`ack_loop`]).
    tag: Tag,
    /// Its place and bytes in [`Inner::queued`] until the job is dropped (answered or
    /// failed): while NATS lags, the publish and ack queues would otherwise hold any
    /// number of envelopes of any size.
    _held: Share<Tag>,
}

enum Slot {
    Done(Result<Accepted, StoreError>),
    Waiting(OnSequenced),
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
    live_only: AtomicU64,
    busy: AtomicU64,
    rows_read: AtomicU64,
    /// Retained writes followed by a confirming write ([`write_retained`]).
    retained_confirms: AtomicU64,
    /// Retained values written again: an older value's write had landed after them.
    retained_repairs: AtomicU64,
    quota: crate::store::quota::Refusals,
}

struct Inner {
    rt: tokio::runtime::Handle,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    retained_stream: String,
    prefix: String,
    space: [u8; 16],
    last: AtomicU64,
    jobs: mpsc::Sender<Job>,
    /// Queued jobs and their envelope bytes, bounded by `store.queue` and
    /// `store.queue_bytes` and shared fairly among tenants ([`FairLimit`]).
    queued: Arc<FairLimit<Tag>>,
    /// `true` holds retained writes before they start ([`JetStreamStore::hold_retained_writes`]).
    retained_held: tokio::sync::watch::Sender<bool>,
    /// Whether conditional writes are confirmed (nats-server before 2.9.21), and the
    /// tests' hold on them ([`lease::WriteConfirms`]).
    confirms: Arc<lease::WriteConfirms>,
    next_ticket: AtomicU64,
    slots: Mutex<HashMap<u64, Slot>>,
    feed: Mutex<Option<mpsc::Receiver<Sequenced>>>,
    store_qos0: bool,
    retention: RetentionStatus,
    /// The durable-floor stream (a direct read on each durable `Sub`).
    durable_stream: stream::Stream,
    /// Durable floors by key, as the durable stream's reader reports them (and this relay
    /// wrote them).
    durables: Mutex<HashMap<String, u64>>,
    /// Floors to write to the durable stream (write-behind), with the tenant tag.
    dirty: Mutex<HashMap<String, (u64, Tag)>>,
    /// Floors the writer took from `dirty` and has not had acknowledged yet.
    flushing: Mutex<HashMap<String, u64>>,
    /// Told after each write of the writer (a deletion waits for the durable's).
    flushed: Notify,
    /// The newest live record of each durable, as read or written here.
    records: Mutex<HashMap<String, RecordMeta>>,
    /// Deletion markers in the durable stream: (stream sequence, ms received), by key.
    gone: Mutex<HashMap<String, (u64, u64)>>,
    /// Durable names seen by this relay's `Sub`s, by key (the stream holds only hashes):
    /// what [`Store::take_gone`] can name.
    names: Mutex<HashMap<String, DurableKey>>,
    /// Where deleted durables are told ([`Store::take_gone`]), once taken.
    gone_tx: Mutex<Option<mpsc::UnboundedSender<DurableKey>>>,
    /// `store.durable_idle_ms` (0: durables never idle out).
    idle_ms: u64,
    /// `store.durable_marker_keep_ms`: how long a deletion marker stays in the durable
    /// stream (every relay's ordered read of it learns the deletion from it) before a
    /// relay's sweep purges it.
    marker_keep_ms: u64,
    /// Durable owners as the durable stream holds them (or as adopted here), by durable key.
    owners: Mutex<HashMap<String, Owner>>,
    /// `true` holds the background read of the durable stream before its next record
    /// ([`JetStreamStore::hold_durable_reader`]).
    reader_held: tokio::sync::watch::Sender<bool>,
    /// [`WRITER_HELD`] holds the durable writer before it publishes a floor it took
    /// ([`JetStreamStore::hold_durable_writer`]); [`WRITER_PARKED`] once it waits there.
    writer_held: tokio::sync::watch::Sender<u8>,
    /// The owner tag of the `Sub` that read a durable as new under its hold
    /// ([`Store::durable_for`]), by durable key: what its creation (`set_durable`, right
    /// after) writes — that `Sub`'s owner, not whichever owner's `Sub` noted the name in
    /// [`Inner::creating`] (or none, when it was checked against a durable deleted since).
    creators: Mutex<HashMap<String, Option<String>>>,
    /// Durables this relay is about to create, by durable key (key id and name hash): the
    /// owner the first `Sub` named (from its `durable_owner` to its creating `set_durable`).
    creating: Mutex<HashMap<String, Creating>>,
    /// Durables this relay just created: their next floor (the `Sub`'s boundary, right
    /// after the creation) is written at once too, not behind.
    fresh: Mutex<std::collections::HashSet<String>>,
    flush: Arc<Notify>,
    counters: Counters,
    /// Usage per tenant, from the ordered read of the stream (see [`ledger`]).
    ledger: Mutex<Ledger>,
    /// Purges of the older values of this relay's retained-only values, queued when the
    /// stream acknowledges each ([`retained_only_purge`]): one per subject, merged.
    superseding: Mutex<Purges>,
    /// History reads between chunks, by (filter, next sequence).
    cursors: Mutex<HashMap<(String, u64), Cursor>>,
    /// This relay's holds on durable names (one holder per durable in the cluster).
    leases: Arc<lease::Leases>,
    /// This relay run's random id in the `Wsp-Write` header of its writes.
    origin: String,
    /// Key-id claims of relay accounts (one record per key id, written once).
    claim_stream: stream::Stream,
    /// Claims read or written by this relay: key id hex → group tag (claims never move).
    claims: Mutex<HashMap<String, String>>,
}

/// The JetStream-backed store (`[cluster] store = "jetstream"`).
pub struct JetStreamStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("stream", &self.inner.stream)
            .field("last", &self.inner.last.load(Relaxed))
            .finish_non_exhaustive()
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn limit(v: u64) -> i64 {
    if v == 0 {
        -1
    } else {
        i64::try_from(v).unwrap_or(i64::MAX)
    }
}

impl JetStreamStore {
    /// Connects, creates (or finds) the stream, the retained stream and the durable stream,
    /// and starts the publishing, acknowledging, live-reading and durable tasks on the
    /// current runtime. Waits (retrying) until JetStream answers: the relay cannot name its
    /// sequence space before.
    pub async fn open(cluster: &ClusterConfig, config: &StoreConfig) -> Result<Self, StoreError> {
        let client = crate::cluster::connect_plain(cluster)
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let prefix = cluster.subject_prefix.clone();
        let name = cluster.stream.clone();
        let retained_name = format!("{name}_RETAINED");
        let durable_name = format!("{name}_DURABLE");
        let main_cfg = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            max_messages_per_subject: limit(config.max_messages),
            max_age: ms(config.max_age_ms),
            max_bytes: limit(config.total_max_bytes),
            max_messages: limit(config.total_max_messages),
            discard: stream::DiscardPolicy::New,
            duplicate_window: ms(config.dedup_window_ms.max(1)),
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            allow_direct: true,
            ..Default::default()
        };
        let retained_cfg = stream::Config {
            name: retained_name.clone(),
            subjects: vec![format!("{}.>", retained_prefix(&prefix))],
            max_messages_per_subject: 1,
            max_age: ms(config.retained_max_age_ms),
            max_messages: limit(config.total_max_retained),
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        // Durable floors: one message per durable (the last floor): a key-value store made
        // of a plain stream (async-nats 0.51's KV API did not parse nats-server 2.9's
        // answers when creating a bucket).
        let durable_cfg = stream::Config {
            name: durable_name.clone(),
            subjects: vec![format!("{}.>", durable_prefix(&prefix))],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        // Key-id claims of relay accounts: one message per key id, written once (the first
        // group to use a key id holds it in the whole cluster).
        let claim_cfg = stream::Config {
            name: format!("{name}_CLAIMS"),
            subjects: vec![format!("{}.>", claim_prefix(&prefix))],
            max_messages_per_subject: 1,
            // Written once: the stream itself refuses a second record of a key id, as
            // every replica applies it — the first writer wins even where nats-server's
            // check of `Nats-Expected-Last-Subject-Sequence` lets two racing writes pass
            // (before 2.9.21, nats-server issue 4320).
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        // Durable holds: one lease message per durable (see `lease`). Old released or
        // lapsed records go after a day.
        let lease_cfg = stream::Config {
            name: format!("{name}_LEASES"),
            subjects: vec![format!("{}.>", lease::lease_prefix(&prefix))],
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(24 * 3600),
            storage: stream::StorageType::File,
            num_replicas: cluster.replicas,
            ..Default::default()
        };
        let mut attempt = 0u32;
        let (mut main, durables, lease_stream, claim_stream) = loop {
            let r = async {
                let main = js
                    .get_or_create_stream(main_cfg.clone())
                    .await
                    .map_err(|e| unavailable("stream", e))?;
                js.get_or_create_stream(retained_cfg.clone())
                    .await
                    .map_err(|e| unavailable("retained stream", e))?;
                let durables = js
                    .get_or_create_stream(durable_cfg.clone())
                    .await
                    .map_err(|e| unavailable("durable stream", e))?;
                let leases = js
                    .get_or_create_stream(lease_cfg.clone())
                    .await
                    .map_err(|e| unavailable("durable lease stream", e))?;
                let mut claims = js
                    .get_or_create_stream(claim_cfg.clone())
                    .await
                    .map_err(|e| unavailable("claim stream", e))?;
                // A stream made by an older relay: refusing second records is set on it
                // (if NATS refuses the change, claims rely on the conditional write alone:
                // said, not fatal).
                let c = &claims.cached_info().config;
                if c.discard != claim_cfg.discard || !c.discard_new_per_subject {
                    match js.update_stream(claim_cfg.clone()).await {
                        Ok(_) => {
                            claims = js
                                .get_stream(&claim_cfg.name)
                                .await
                                .map_err(|e| unavailable("claim stream", e))?;
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            "cluster store: the claims stream could not be set to refuse a second record of a key id; two relays claiming one key id at the same moment rely on the conditional write alone"
                        ),
                    }
                }
                Ok::<_, StoreError>((main, durables, leases, claims))
            }
            .await;
            match r {
                Ok(v) => break v,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cluster store: JetStream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8))))
                        .await;
                }
            }
        };
        // Replicated streams, or a clustered server (whose streams go through its cluster
        // even with one replica).
        let info = client.server_info();
        let unchecked = needs_confirms(&info, cluster.replicas);
        let server = info.version;
        let confirms = Arc::new(lease::WriteConfirms::new(unchecked));
        if unchecked {
            tracing::warn!(
                nats_server = %server,
                "cluster store: this nats-server checks Nats-Expected-Last-Subject-Sequence only against the writes it has applied (nats-server issue 4320, fixed in 2.9.21): two relays writing one subject at once can both pass. The relay confirms retained writes that may have raced and settles each durable hold it takes (one more write and read each); key-id claims are refused by their stream after the first. Use nats-server 2.9.21 or later to spare that cost."
            );
        }
        let info = main
            .info()
            .await
            .map_err(|e| unavailable("stream info", e))?
            .clone();
        let space = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(b"whispeer-relay/v2/jetstream-seq-space\0");
            h.update(name.as_bytes());
            h.update([0]);
            h.update(info.created.unix_timestamp_nanos().to_be_bytes());
            let d = h.finalize();
            let mut s = [0u8; 16];
            s.copy_from_slice(&d[..16]);
            s
        };
        let last = info.state.last_sequence;
        // Usage per tenant: what the stream holds now, before the relay takes a publish.
        let mut attempt = 0u32;
        let (ledger, retained_stream) = loop {
            let mut ledger = Ledger::new(Limits::of(config));
            let r = async {
                let retained = js
                    .get_stream(&retained_name)
                    .await
                    .map_err(|e| unavailable("retained stream", e))?;
                load_ledger(&mut ledger, &retained, &main, &prefix, last).await?;
                Ok::<_, StoreError>(retained)
            }
            .await;
            match r {
                Ok(retained) => break (ledger, retained),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cluster store: usage not read yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8))))
                        .await;
                }
            }
        };
        let prefix_for_leases = prefix.clone();
        // Bounded by `queued` (never past twice `store.queue`): the channels never fill.
        let (jobs_tx, jobs_rx) = mpsc::channel(config.queue.max(1).saturating_mul(2));
        let (feed_tx, feed_rx) = mpsc::channel(FEED);
        let inner = Arc::new(Inner {
            rt: tokio::runtime::Handle::current(),
            client,
            js: js.clone(),
            stream: name,
            retained_stream: retained_name,
            prefix,
            space,
            last: AtomicU64::new(last),
            jobs: jobs_tx,
            queued: FairLimit::new(config.queue.max(1), config.queue_bytes),
            retained_held: tokio::sync::watch::Sender::new(false),
            confirms: confirms.clone(),
            next_ticket: AtomicU64::new(1),
            slots: Mutex::new(HashMap::new()),
            feed: Mutex::new(Some(feed_rx)),
            store_qos0: config.store_qos0,
            retention: RetentionStatus {
                max_messages: config.max_messages,
                max_bytes: 0,
                max_age_ms: config.max_age_ms,
            },
            durable_stream: durables.clone(),
            durables: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashMap::new()),
            flushing: Mutex::new(HashMap::new()),
            flushed: Notify::new(),
            records: Mutex::new(HashMap::new()),
            gone: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            gone_tx: Mutex::new(None),
            idle_ms: config.durable_idle_ms,
            marker_keep_ms: config.durable_marker_keep_ms,
            owners: Mutex::new(HashMap::new()),
            reader_held: tokio::sync::watch::Sender::new(false),
            writer_held: tokio::sync::watch::Sender::new(WRITER_RUNS),
            creators: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashMap::new()),
            fresh: Mutex::new(std::collections::HashSet::new()),
            flush: Arc::new(Notify::new()),
            counters: Counters::default(),
            ledger: Mutex::new(ledger),
            superseding: Mutex::new(Purges::default()),
            cursors: Mutex::new(HashMap::new()),
            claim_stream,
            claims: Mutex::new(HashMap::new()),
            origin: {
                let mut id = [0u8; 8];
                getrandom::getrandom(&mut id).expect("OS random number generator");
                hex::encode(id)
            },
            leases: Arc::new(lease::Leases::new(
                Duration::from_millis(cluster.durable_lease_ms),
                &prefix_for_leases,
                js.clone(),
                lease_stream,
                confirms,
            )),
        });
        tokio::spawn(lease::renew_loop(
            Arc::downgrade(&inner.leases),
            Duration::from_millis(cluster.durable_lease_ms),
        ));
        // Durable floors: what the stream holds now, then every change, kept in memory.
        tokio::spawn(durable_watch(
            Arc::downgrade(&inner),
            durables,
            format!("{}.", durable_prefix(&inner.prefix)),
            inner.reader_held.subscribe(),
        ));
        tokio::spawn(durable_writer(Arc::downgrade(&inner), inner.flush.clone()));
        tokio::spawn(durable_sweep(Arc::downgrade(&inner)));
        let (acks_tx, acks_rx) = mpsc::channel(config.queue.max(1).saturating_mul(2));
        tokio::spawn(publish_loop(js.clone(), jobs_rx, acks_tx));
        tokio::spawn(ack_loop(
            Arc::downgrade(&inner),
            js,
            retained_stream,
            acks_rx,
        ));
        // Named after the relay (`[cluster] name`) so an operator can tell whose it is.
        let described = match &cluster.name {
            Some(name) => format!("{LIVE_DESCRIPTION}: {name}"),
            None => LIVE_DESCRIPTION.to_string(),
        };
        tokio::spawn(retained_only_purge(Arc::downgrade(&inner), main.clone()));
        tokio::spawn(live_loop(
            Arc::downgrade(&inner),
            main,
            last,
            feed_tx,
            described,
        ));
        tracing::info!(
            stream = %inner.stream,
            last_seq = last,
            "cluster store: JetStream stream ready"
        );
        Ok(Self { inner })
    }

    fn resolve(inner: &Inner, ticket: u64, r: Result<Accepted, StoreError>) {
        match &r {
            Ok(Accepted::Duplicate(_)) => {
                inner.counters.duplicates.fetch_add(1, Relaxed);
            }
            Ok(_) => {
                inner.counters.appends.fetch_add(1, Relaxed);
            }
            Err(_) => {
                inner.counters.failures.fetch_add(1, Relaxed);
            }
        }
        let waiting = {
            let mut slots = lock(&inner.slots);
            match slots.remove(&ticket) {
                Some(Slot::Waiting(done)) => Some(done),
                _ => {
                    slots.insert(ticket, Slot::Done(r.clone()));
                    None
                }
            }
        };
        if let Some(done) = waiting {
            done(r);
        }
    }

    /// Blocks the calling (non-runtime) thread on a JetStream read.
    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(StoreError::Unavailable(
                "a JetStream read was called on the async runtime".into(),
            ));
        }
        self.inner.rt.block_on(async {
            tokio::time::timeout(READ_TIMEOUT, f)
                .await
                .map_err(|_| StoreError::Unavailable("JetStream read timed out".into()))?
        })
    }

    /// Reads the stream's messages of `key_id` in `from..=upto` (at most `max`), calling
    /// `each(seq, received ms, envelope)`; returns the last sequence looked at. A read of
    /// several chunks goes on with the consumer its previous chunk left (kept under the
    /// next sequence it will deliver), not a new consumer per chunk.
    ///
    /// `limit`: most messages `each` keeps (it answers whether it kept one; fetches ask for
    /// no more than it may still keep, so nothing is consumed past the chunk's end) and most
    /// bytes fetched (the first message apart).
    async fn scan(
        &self,
        key_id: &KeyId,
        from: u64,
        upto: u64,
        max: usize,
        limit: super::ReadLimit,
        mut each: impl FnMut(u64, u64, Envelope) -> bool,
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        if from > upto {
            return Ok(upto);
        }
        let filter = format!("{}.{}.>", inner.prefix, key_id);
        let kept = lock(&inner.cursors).remove(&(filter.clone(), from));
        let mut cur = match kept {
            Some(c) => c,
            None => {
                let stream = inner
                    .js
                    .get_stream_no_info(&inner.stream)
                    .await
                    .map_err(|e| unavailable("stream", e))?;
                // The server forgets an abandoned read after twice `CURSOR_IDLE` (kept
                // here for `CURSOR_IDLE` at most).
                let cfg = read_config(filter.clone(), from, CURSOR_IDLE * 2);
                let consumer = stream
                    .create_consumer(cfg)
                    .await
                    .map_err(|e| unavailable("history consumer", e))?;
                let cur = Cursor {
                    consumer,
                    next: 1,
                    at: std::time::Instant::now(),
                    js: inner.js.clone(),
                    rt: inner.rt.clone(),
                };
                if cur.consumer.cached_info().num_pending == 0 {
                    return Ok(upto);
                }
                cur
            }
        };
        let (mut n, mut bytes) = (0, 0);
        let mut last = from.saturating_sub(1);
        let max_bytes = limit.bytes.min(super::READ_CHUNK_BYTES);
        let mut keep = limit.msgs.max(1);
        loop {
            // Asks for what the chunk has room for, so nothing is fetched ahead; a chunk
            // holds at least one message, asked for alone when it exceeds the room.
            let room = max_bytes.saturating_sub(bytes);
            let fetched = self
                .fetch(&mut cur, (max - n).min(keep), Some(room))
                .await?;
            let got = match fetched {
                Fetched::Messages(msgs) => msgs,
                Fetched::TooLarge if n == 0 => match self.fetch(&mut cur, 1, None).await? {
                    Fetched::Messages(msgs) => msgs,
                    Fetched::TooLarge => Vec::new(),
                },
                Fetched::TooLarge => Vec::new(),
            };
            let Some(tail) = got.last() else {
                if n == 0 {
                    // Nothing was pending after all (deleted or aged out meanwhile).
                    return Ok(upto);
                }
                break;
            };
            let done = tail.pending == 0;
            for m in got {
                if m.seq > upto {
                    return Ok(upto);
                }
                inner.counters.rows_read.fetch_add(1, Relaxed);
                bytes += m.bytes;
                last = m.seq;
                if let Ok(env) = m.envelope {
                    if each(m.seq, m.ts, env) {
                        keep -= 1;
                    }
                }
                n += 1;
            }
            if done || last == upto {
                return Ok(upto);
            }
            if n >= max || bytes >= max_bytes || keep == 0 {
                break;
            }
        }
        // The next chunk starts after `last`: keep the consumer for it.
        cur.at = std::time::Instant::now();
        // (Cursors dropped here — idle ones, or this one beyond the bound — delete their
        // consumers.)
        let mut cursors = lock(&inner.cursors);
        cursors.retain(|_, c| c.at.elapsed() < CURSOR_IDLE);
        if cursors.len() < MAX_CURSORS {
            cursors.insert((filter, last + 1), cur);
        }
        Ok(last)
    }

    /// One fetch of at most `count` messages and (when given) about `room` bytes from a
    /// history consumer, read to its end: the server sends nothing more for it afterwards.
    async fn fetch(
        &self,
        cur: &mut Cursor,
        count: usize,
        room: Option<usize>,
    ) -> Result<Fetched, StoreError> {
        let mut req = cur.consumer.fetch().max_messages(count.max(1));
        if let Some(room) = room {
            req = req.max_bytes(room.max(1));
        }
        let mut batch = req
            .messages()
            .await
            .map_err(|e| unavailable("history fetch", e))?;
        let mut out = Vec::new();
        loop {
            let m = match tokio::time::timeout(FETCH_QUIET, batch.next()).await {
                Ok(Some(Ok(m))) => m,
                // The fetch ended: count reached, nothing more pending, or its time up.
                Ok(None) | Err(_) => break,
                // A status ends the fetch: with a byte allowance, the next message did not
                // fit ("409 Message Size Exceeds MaxBytes").
                Ok(Some(Err(e))) => {
                    if out.is_empty() && room.is_some() {
                        return Ok(Fetched::TooLarge);
                    }
                    if out.is_empty() {
                        return Err(unavailable("history fetch", e));
                    }
                    break;
                }
            };
            let info = m.info().map_err(|e| unavailable("history read", e))?;
            in_order(info.consumer_sequence, &mut cur.next)
                .map_err(|e| unavailable("history read", e))?;
            let seq = info.stream_sequence;
            let pending = info.pending;
            let ts = published_ms(&info);
            out.push(FetchedMsg {
                seq,
                ts,
                pending,
                bytes: m.message.payload.len(),
                envelope: Envelope::from_bytes(m.message.payload.clone()),
            });
        }
        Ok(Fetched::Messages(out))
    }

    /// Runs `f` to completion from a synchronous store call on the runtime (a durable
    /// `Sub`: rare, bounded by `limit`). `None` off the multi-threaded runtime (in-process
    /// uses): the caller falls back to what this relay knows.
    fn on_runtime<T: Send>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, StoreError>> + Send,
    ) -> Option<Result<T, StoreError>> {
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if flavor.ok() != Some(tokio::runtime::RuntimeFlavor::MultiThread) {
            return None;
        }
        let rt = self.inner.rt.clone();
        Some(tokio::task::block_in_place(|| {
            rt.block_on(async move {
                tokio::time::timeout(limit, f)
                    .await
                    .unwrap_or_else(|_| Err(StoreError::Unavailable("JetStream timed out".into())))
            })
        }))
    }

    /// Holds (`true`) or lets go on (`false`) this store's background read of the durable
    /// stream: while held it applies no record — a relay whose reader is behind the stream,
    /// which a `Sub` must not depend on (it reads the durable's record directly). For tests
    /// that drive a `Sub`'s store steps in an exact interleaving; a relay never holds it.
    #[doc(hidden)]
    pub fn hold_durable_reader(&self, held: bool) {
        self.inner.reader_held.send_replace(held);
    }

    /// Holds (`true`) or lets go on (`false`) this store's durable writer right before it
    /// publishes each floor it took (the floor is in flight meanwhile: a release or a
    /// deletion here waits for it) — a floor write slow to reach NATS. For tests, as
    /// [`hold_durable_reader`](Self::hold_durable_reader); a relay never holds it.
    #[doc(hidden)]
    pub fn hold_durable_writer(&self, held: bool) {
        let state = if held { WRITER_HELD } else { WRITER_RUNS };
        self.inner.writer_held.send_replace(state);
    }

    /// Holds (`true`) or lets go on (`false`) this store's retained writes before they
    /// start (a retained write slow to reach NATS), while the stream's acknowledgements go
    /// on. For tests, as [`hold_durable_reader`](Self::hold_durable_reader); a relay never
    /// holds it.
    #[doc(hidden)]
    pub fn hold_retained_writes(&self, held: bool) {
        self.inner.retained_held.send_replace(held);
    }

    /// Holds (`true`) or lets go on (`false`) this store's conditional writes between the
    /// write and its confirmation (a retained value's confirming write, a durable hold's
    /// settling read: [`write_retained`], [`lease::WriteConfirms`]) — where a racing write
    /// may land. For tests; a relay never holds it.
    #[doc(hidden)]
    pub fn hold_write_confirms(&self, held: bool) {
        self.inner.confirms.hold(held);
    }

    /// The number of writes waiting, held, before their confirmation. For tests.
    #[doc(hidden)]
    pub fn write_confirms_parked(&self) -> tokio::sync::watch::Receiver<u32> {
        self.inner.confirms.parked()
    }

    /// Confirms conditional writes (`true`) as on a nats-server before 2.9.21, whatever
    /// the server (the relay decides by the server's version at start). For tests.
    #[doc(hidden)]
    pub fn confirm_writes(&self, on: bool) {
        self.inner.confirms.set(on);
    }

    /// Waits until the durable writer, held ([`hold_durable_writer`](Self::hold_durable_writer)),
    /// waits with a floor it took (in flight). For tests.
    #[doc(hidden)]
    pub async fn durable_writer_parked(&self) {
        let mut rx = self.inner.writer_held.subscribe();
        let _ = rx.wait_for(|s| *s == WRITER_PARKED).await;
    }

    /// The durable's record in the durable stream, read directly: another relay may have
    /// written it an instant ago (its reader here may not have it yet).
    fn fetch_durable(&self, k: &str) -> Result<Option<DurableRecord>, StoreError> {
        let inner = &self.inner;
        let subject = format!("{}.{k}", durable_prefix(&inner.prefix));
        let stream = inner.durable_stream.clone();
        let r = self.on_runtime(Duration::from_secs(5), async move {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => Ok(Some(DurableRecord::read(&m))),
                Err(e) => {
                    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
                    match e.kind() {
                        K::NoMessageFound => Ok(None),
                        _ => Err(unavailable("durable read", e)),
                    }
                }
            }
        });
        match r {
            Some(r) => r,
            None => Ok(lock(&inner.durables).get(k).map(|f| DurableRecord {
                floor: Some(*f),
                owner: lock(&inner.owners).get(k).map(|o| o.tag.clone()),
                ..DurableRecord::default()
            })),
        }
    }

    /// The durable's live record, read directly ([`fetch_durable`](Self::fetch_durable)),
    /// with what it says applied here: none or a deletion marker — the durable is gone
    /// (deleted at another relay; this relay's reader may not have the marker yet), so this
    /// relay forgets it (floor, owner, its count in the ledger) unless a floor of its own
    /// is still on its way to the stream.
    fn read_durable(&self, k: &str) -> Result<Option<DurableRecord>, StoreError> {
        let inner = &self.inner;
        match self.fetch_durable(k)? {
            Some(rec) if !rec.deleted => {
                // Its owner (and tenant) taken from the record read now, not only from the
                // background reader (see `note_record`).
                if rec.seq > 0 {
                    note_record(inner, k, &rec);
                }
                Ok(Some(rec))
            }
            Some(marker) => {
                lock(&inner.dirty).remove(k);
                gone_here(inner, k, Some((marker.seq, marker.ts)), false);
                Ok(None)
            }
            None => {
                if pending_floor(inner, k).is_none() {
                    gone_here(inner, k, None, false);
                }
                Ok(None)
            }
        }
    }

    /// Writes a new durable's first record — floor, tenant, owner — only if the durable
    /// stream has none for it (`Nats-Expected-Last-Subject-Sequence: 0`): of two relays
    /// creating one name at once, one wins and the other's `Sub` fails (retryable).
    fn create_durable(&self, k: &str, floor: u64, tag: &Tag) -> Result<(), StoreError> {
        let inner = &self.inner;
        // The owner of the `Sub` that read the name as new under its hold (`durable_for`);
        // else (a caller that did not say) the owner noted when the name was found new.
        // The entry goes once the durable is created.
        let noted = lock(&inner.creators).remove(k);
        let owner = match noted {
            Some(o) => o,
            None => lock(&inner.creating).get(k).and_then(|c| c.owner.clone()),
        };
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, hex::encode(tag).as_str());
        if let Some(o) = &owner {
            h.insert(OWNER_HEADER, o.as_str());
        }
        // Over the deletion marker of an earlier durable of the name, if the `Sub`'s read
        // found one (a marker purged meanwhile fails the write: the `Sub` is retried).
        let after = lock(&inner.gone).get(k).map_or(0, |g| g.0);
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            after.to_string().as_str(),
        );
        let subject = format!("{}.{k}", durable_prefix(&inner.prefix));
        let js = inner.js.clone();
        let payload = Bytes::from(floor.to_string());
        let written = self.inner.clone();
        let (key, tenant, wrote_owner) = (k.to_string(), *tag, owner.clone());
        let r = self.on_runtime(Duration::from_secs(5), async move {
            let ack = js
                .publish_with_headers(subject, h, payload)
                .await
                .map_err(|e| unavailable("durable create", e))?;
            match ack.await {
                Ok(a) => {
                    lock(&written.creating).remove(&key);
                    // Its owner noted once it is the durable's (a creation that lost to
                    // another relay's leaves none behind); the marker it went over goes.
                    wrote_record(&written, &key, a.sequence, floor, &tenant, wrote_owner);
                    Ok(())
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    creation_done(&written, &key);
                    Err(StoreError::Unavailable(
                        "the durable subscription was created on another relay meanwhile; \
                         subscribe again"
                            .into(),
                    ))
                }
                Err(e) => {
                    creation_done(&written, &key);
                    Err(unavailable("durable create", e))
                }
            }
        });
        match r {
            Some(r) => r,
            None => {
                lock(&inner.creating).remove(k);
                // Off the multi-threaded runtime: written behind, as every later floor (with
                // the owner, noted here until then).
                if let Some(o) = owner {
                    adopt_here(inner, k, o);
                }
                // Its first floor is written over the marker it goes over (or into the
                // empty subject): floors are written over the record known here.
                let meta = RecordMeta {
                    seq: after,
                    ts: now_ms(),
                    floor: Some(floor),
                    tenant: *tag,
                };
                lock(&inner.records).insert(k.to_string(), meta);
                lock(&inner.dirty).insert(k.to_string(), (floor, *tag));
                inner.flush.notify_one();
                Ok(())
            }
        }
    }

    /// Writes a durable's floor now (waiting for JetStream), with its tenant and owner,
    /// conditionally as every floor ([`write_floor`]).
    fn write_durable_now(&self, k: &str, floor: u64, tag: &Tag) -> Result<(), StoreError> {
        let inner = &self.inner;
        let (written, key, tenant) = (self.inner.clone(), k.to_string(), *tag);
        let r = self.on_runtime(Duration::from_secs(5), async move {
            match write_floor(&written, &key, floor, &tenant).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => {
                    tracing::debug!("cluster store: durable floor dropped (deleted meanwhile)");
                    Ok(())
                }
                Err(e) => Err(unavailable("durable write", e)),
            }
        });
        match r {
            Some(r) => r,
            None => {
                lock(&inner.dirty).insert(k.to_string(), (floor, *tag));
                inner.flush.notify_one();
                Ok(())
            }
        }
    }

    /// A durable's floor, read directly (see [`Store::durable`]); with `check` (the owner
    /// tag of the `Sub` reading it under its hold, [`Store::durable_for`]) checked against
    /// the durable's owner ([`owner_finds`](Self::owner_finds)).
    fn floor_of(
        &self,
        key: &DurableKey,
        check: Option<Option<String>>,
    ) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        let k = Self::durable_key(key);
        // The stream's record (read directly), or this relay's floor still on its way
        // there: not what the reader reported earlier, which may be of a durable of the
        // name deleted meanwhile.
        let pending = pending_floor(inner, &k);
        let read = self.read_durable(&k);
        if let (Err(_), Some(want)) = (&read, &check) {
            // This `Sub` fails here: not on its way to create the name any more.
            self.creator_gives_up(&k, want);
        }
        let fetched = match read? {
            Some(rec) => {
                if let Some(want) = &check {
                    self.owner_finds(key, &k, &rec, want)?;
                }
                // Known from now on (a later floor write is not a creation).
                lock(&inner.ledger).add_durable(&k, &rec.tenant);
                rec.floor
            }
            None => None,
        };
        let floor = match (pending, fetched) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        match floor {
            Some(f) => {
                lock(&inner.durables).insert(k.clone(), f);
                lock(&inner.names).insert(k, key.clone());
            }
            // New: its creation, right after (`set_durable`), carries this `Sub`'s owner.
            None => {
                if let Some(want) = check {
                    let mut c = lock(&inner.creators);
                    if c.len() >= PENDING_CREATIONS {
                        c.clear();
                    }
                    c.insert(k, want);
                }
            }
        }
        Ok(floor)
    }

    /// A `Sub` of owner `want` (its tag) reads the durable under the cluster hold
    /// ([`Store::durable_for`]) and finds `rec`: it resumes it only if it may — the
    /// durable's owner, or owner-less (adopted, as `durable_owner` would) — else
    /// `NotAllowed`. Its owner check (`durable_owner`) came before the hold: the durable
    /// it found then (or found new) may have been deleted and created again by another
    /// owner since, at any relay; under the hold it cannot change any more.
    fn owner_finds(
        &self,
        key: &DurableKey,
        k: &str,
        rec: &DurableRecord,
        want: &Option<String>,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        // It creates nothing now (if it was noted as on its way to).
        self.creator_gives_up(k, want);
        let have = rec
            .owner
            .clone()
            .or_else(|| lock(&inner.owners).get(k).map(|o| o.tag.clone()));
        match (have, want) {
            (Some(h), Some(w)) if h == *w => Ok(()),
            (Some(_), _) => Err(not_yours(key)),
            (None, None) => Ok(()),
            (None, Some(w)) => {
                adopt_here(inner, k, w.clone());
                Ok(())
            }
        }
    }

    /// A `Sub` of owner `want` (its tag) that passed `durable_owner` is not on its way to
    /// create durable `k` (any more): if the name is noted here as being created for that
    /// owner ([`Creating`]), one `Sub` fewer is — the entry goes with the last one, so a
    /// `Sub` that failed (the name or the hold refused, a read) does not keep other
    /// owners' `Sub`s `busy` until the entry expires.
    fn creator_gives_up(&self, k: &str, want: &Option<String>) {
        let now = std::time::Instant::now();
        let mut creating = lock(&self.inner.creating);
        if let Some(c) = creating.get_mut(k) {
            if c.until > now && c.owner == *want {
                c.pending = c.pending.saturating_sub(1);
                if c.pending == 0 {
                    creating.remove(k);
                }
            }
        }
    }

    fn durable_key(key: &DurableKey) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(key.name.as_bytes());
        format!("{}.{}", key.key_id, hex::encode(&h[..16]))
    }
}

async fn publish_loop(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<Job>,
    acks: mpsc::Sender<(
        Job,
        Result<jetstream::context::PublishAckFuture, StoreError>,
    )>,
) {
    while let Some(job) = rx.recv().await {
        let r = js
            .publish_with_headers(
                job.subject.clone(),
                job.headers.clone(),
                job.payload.clone(),
            )
            .await
            .map_err(|e| unavailable("publish", e));
        if acks.send((job, r)).await.is_err() {
            return;
        }
    }
}

/// Publishes a barrier record on `subject` and waits for its acknowledgement: in a stream
/// of a nats-server before 2.9.21 it comes after every write that passed the
/// `Nats-Expected-Last-Subject-Sequence` check at the same time as one acknowledged before
/// it (that write was proposed before this one was applied), so a read from the stream's
/// leader afterwards sees the racing writes (used to settle durable holds and account-list
/// edits).
pub(crate) async fn barrier(js: &jetstream::Context, subject: String) -> Result<(), String> {
    js.publish(subject, Bytes::from_static(b"barrier"))
        .await
        .map_err(|e| e.to_string())?
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Whether conditional writes need confirming on the server `info` describes: one that
/// does not check writes in flight ([`checks_in_flight_writes`]) whose streams go through
/// its cluster (replicated, or a clustered server).
pub(crate) fn needs_confirms(info: &async_nats::ServerInfo, replicas: usize) -> bool {
    (replicas > 1 || info.cluster.is_some()) && !checks_in_flight_writes(&info.version)
}

/// Whether nats-server `version` checks `Nats-Expected-Last-Subject-Sequence` against
/// writes proposed to a clustered stream and not yet applied (nats-server issue 4320, fixed
/// in 2.9.21). A version it cannot read is taken as fixed (no warning on a guess).
fn checks_in_flight_writes(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().ok());
    match (
        parts.next().flatten(),
        parts.next().flatten(),
        parts.next().flatten(),
    ) {
        (Some(major), Some(minor), Some(patch)) => (major, minor, patch) >= (2, 9, 21),
        _ => true,
    }
}

/// Writes a retained value (`payload`, of stream sequence `seq`, by tenant header value
/// `tenant`) to the retained stream unless a value with a higher stream sequence is there
/// already: the stream's order decides, not the order in which relays write
/// (`Nats-Expected-Last-Subject-Sequence` makes the check and the write one step; a lost
/// race re-reads and tries again).
///
/// **Confirmed when a race was possible.** nats-server before 2.9.21 checks that header
/// against the messages it has applied, not against those proposed to the stream's
/// replicas and not yet applied (nats-server issue 4320): in a clustered stream two
/// relays writing one subject at once can both pass the check, and the one that lands
/// last stays — an older value over a newer one. A write proposed after this one's
/// acknowledgement comes after every write that passed the check before this one was
/// applied, so when such a write may exist — the ordered read knows a retained value of
/// the path between the one read before writing and `seq`, or cannot tell
/// ([`Ledger::retained_race_possible`]) — one more checked write of the same value follows (an
/// older value found there first is replaced: counted as a repair). A newer value found
/// there ends it: its writer confirms its own.
async fn write_retained(
    js: &jetstream::Context,
    retained: &stream::Stream,
    subject: &str,
    payload: &Bytes,
    tenant: Option<&str>,
    seq: u64,
    confirm: &Confirm,
) -> Result<(), StoreError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    // The retained stream's sequence of the first write, once a confirming write is due.
    let mut confirming: Option<u64> = None;
    for _ in 0..16 {
        let (expect, seen) = match retained.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let seen = header_u64(Some(&m.headers), SEQ_HEADER).unwrap_or(0);
                if seen > seq || (seen == seq && confirming != Some(m.sequence)) {
                    return Ok(());
                }
                if seen < seq && confirming.is_some() {
                    confirm.count(|c| &c.retained_repairs);
                }
                (m.sequence, seen)
            }
            Err(e) if e.kind() == K::NoMessageFound => (0, 0),
            Err(e) => return Err(unavailable("retained read", e)),
        };
        let mut h = HeaderMap::new();
        h.insert(SEQ_HEADER, seq.to_string().as_str());
        if let Some(t) = tenant {
            h.insert(TENANT_HEADER, t);
        }
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expect.to_string().as_str(),
        );
        let r = js
            .publish_with_headers(subject.to_string(), h, payload.clone())
            .await
            .map_err(|e| unavailable("retained publish", e))?
            .await;
        match r {
            Ok(ack) => {
                if confirming.is_some() || !confirm.needed(seen, seq) {
                    return Ok(());
                }
                confirming = Some(ack.sequence);
                confirm.count(|c| &c.retained_confirms);
                confirm.held().await;
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
            Err(e) => return Err(unavailable("retained publish ack", e)),
        }
    }
    Err(StoreError::Busy(
        "the retained value is being replaced on other relays; publish again".into(),
    ))
}

/// What a retained write asks after it landed ([`write_retained`]): whether a write of an
/// older value of its path may still land after it.
struct Confirm {
    inner: std::sync::Weak<Inner>,
    /// The path (the ledger's key): the subject without the retained prefix.
    path: String,
}

impl Confirm {
    /// Whether a retained value of the path lies between `seen` (the value read before
    /// writing) and `seq` in stream order, or the ordered read cannot tell.
    fn needed(&self, seen: u64, seq: u64) -> bool {
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        if !inner.confirms.on() {
            return false;
        }
        let possible = lock(&inner.ledger).retained_race_possible(&self.path, seen, seq);
        possible
    }

    fn count(&self, which: impl Fn(&Counters) -> &AtomicU64) {
        if let Some(inner) = self.inner.upgrade() {
            which(&inner.counters).fetch_add(1, Relaxed);
        }
    }

    /// Waits while a test holds confirmations ([`JetStreamStore::hold_write_confirms`]).
    async fn held(&self) {
        let confirms = self.inner.upgrade().map(|i| i.confirms.clone());
        if let Some(c) = confirms {
            c.gate().await;
        }
    }
}

/// Purges of older retained-only values waiting or failed, by subject (review finding F-A):
/// each acknowledged retained-only value of this relay queues the purge of its subject's
/// older values (everything below its sequence) [`ledger::RETAINED_ONLY_KEEP`] later; the
/// values of a subject that come meanwhile merge into one purge (the highest sequence, the
/// earliest time). Bounded: past [`MAX_PURGES`] subjects a retained-only publish on another
/// subject is answered `busy` (backpressure; a queued purge is never dropped).
#[derive(Default)]
struct Purges {
    due: HashMap<String, Purge>,
}

struct Purge {
    /// Everything of the subject below this sequence goes.
    below: u64,
    /// Not before (`RETAINED_ONLY_KEEP` after the acknowledgement, or a failed try's backoff).
    at: std::time::Instant,
    /// Failed tries so far (the backoff doubles, up to [`PURGE_BACKOFF_MAX`]).
    tries: u32,
}

impl Purges {
    /// Queues the purge of `subject` below `below` at `at` (merged with one queued).
    fn add(&mut self, subject: String, below: u64, at: std::time::Instant, tries: u32) {
        let p = self
            .due
            .entry(subject)
            .or_insert(Purge { below, at, tries });
        p.below = p.below.max(below);
        p.at = p.at.min(at);
        p.tries = p.tries.max(tries);
    }

    /// Takes the purges due at `now`.
    fn take_due(&mut self, now: std::time::Instant) -> Vec<(String, u64, u32)> {
        let mut out = Vec::new();
        self.due.retain(|subject, p| {
            if p.at > now {
                return true;
            }
            out.push((subject.clone(), p.below, p.tries));
            false
        });
        out
    }
}

/// Subjects with a purge queued ([`Purges`]) past which retained-only publishes of other
/// subjects are answered `busy`.
const MAX_PURGES: usize = 65_536;
/// Purges running at once.
const PURGES_AT_ONCE: usize = 16;
/// Longest wait before a failed purge is tried again.
const PURGE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The stream acknowledged retained-only value `seq` of `subject` (written by this relay):
/// its subject's older values are purged [`ledger::RETAINED_ONLY_KEEP`] from now.
fn queue_purge(inner: &Inner, subject: &str, seq: u64) {
    let at = std::time::Instant::now() + ledger::RETAINED_ONLY_KEEP;
    lock(&inner.superseding).add(subject.to_string(), seq, at, 0);
}

/// Purges the older values of each subject queued in [`Purges`] once due: only the newest
/// of a path stays. Not `Nats-Rollup: sub` at the write: that purges them at once, before a
/// relay whose ordered read is a little behind has routed them live. At most
/// [`PURGES_AT_ONCE`] at a time; a failed purge is queued again with a backoff; a confirmed
/// one gives the older values' charge back in the ledger (`Ledger::purged`: the ledger
/// never counts less than the stream holds of this relay's values).
async fn retained_only_purge(inner: std::sync::Weak<Inner>, main: stream::Stream) {
    use futures_util::StreamExt as _;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (due, prefix) = {
            let Some(i) = inner.upgrade() else { return };
            let due = lock(&i.superseding).take_due(std::time::Instant::now());
            (due, retained_only_prefix(&i.prefix))
        };
        if due.is_empty() {
            continue;
        }
        let main = &main;
        let mut runs =
            futures_util::stream::iter(due.into_iter().map(|(subject, below, tries)| async move {
                // Everything of the subject below `below`: the newest value stays.
                let r = main.purge().filter(subject.clone()).sequence(below).await;
                (subject, below, tries, r)
            }))
            .buffer_unordered(PURGES_AT_ONCE);
        while let Some((subject, below, tries, r)) = runs.next().await {
            let Some(i) = inner.upgrade() else { return };
            match r {
                Ok(_) => {
                    let path = subject
                        .strip_prefix(&prefix)
                        .and_then(|r| r.strip_prefix('.'))
                        .unwrap_or(&subject);
                    lock(&i.ledger).purged(path, below);
                }
                Err(e) => {
                    let wait = Duration::from_millis(250)
                        .saturating_mul(1 << tries.min(7))
                        .min(PURGE_BACKOFF_MAX);
                    if tries == 0 {
                        tracing::info!(error = %e, "cluster store: older retained-only values not purged; tried again");
                    } else {
                        tracing::debug!(error = %e, tries, "cluster store: older retained-only values not purged; tried again");
                    }
                    lock(&i.superseding).add(
                        subject,
                        below,
                        std::time::Instant::now() + wait,
                        tries + 1,
                    );
                }
            }
        }
    }
}

/// Retained writes in flight at once (each two JetStream round trips or more), taken in
/// turn by the tenants with writes waiting.
const RETAINED_WRITES: usize = 32;

/// A publish the stream has acknowledged (or failed), waiting to be answered: each
/// tenant's are answered in stream order, so a connection's `PubAck`s keep sequence order.
struct Answer {
    job: Job,
    /// Its place in the order the stream acknowledged publishes (tickets are drawn before
    /// the publish queue, so two connections of one tenant may queue theirs out of ticket
    /// order).
    order: u64,
    /// Its stream sequence (0 when it failed).
    seq: u64,
    /// `None` while its retained value is being written.
    out: Option<Result<Accepted, StoreError>>,
}

/// The newest value of one retained subject waiting to be written, and the publishes
/// (tenant, [`Answer::order`]) answered once it is — older values of the subject waiting with it
/// included: the newer value replaces them, as it would once written.
struct Want {
    seq: u64,
    payload: Bytes,
    /// The `Wsp-Tenant` header of the publish whose value it is.
    tenant: Option<String>,
    waiters: Vec<(Tag, u64)>,
}

/// One retained subject with a write in flight or waiting.
#[derive(Default)]
struct PathWrite {
    running: bool,
    next: Option<Want>,
}

type RetainedWrite = std::pin::Pin<
    Box<dyn std::future::Future<Output = (String, Want, Result<(), StoreError>)> + Send>,
>;

/// What the acknowledging task keeps: publishes waiting for their answer per tenant, and
/// the retained writes. A retained write is two JetStream round trips or more; made in the
/// ordered acknowledgement path, every `PubAck` behind it waited for it, so a `RETAIN`
/// flood made every other tenant's publishes wait behind up to 65,536 of them (review
/// finding F3). Now the writes run beside the acknowledgements, at most
/// [`RETAINED_WRITES`] at once, the tenants with writes waiting taking turns; one subject
/// has one write in flight, and the values of a subject that come meanwhile are written
/// as one (the newest), so the retained stream still only moves to higher sequences. A
/// tenant's answers still wait for its own earlier retained writes (in order per tenant),
/// never for another tenant's.
#[derive(Default)]
struct Answering {
    pending: HashMap<Tag, VecDeque<Answer>>,
    paths: HashMap<String, PathWrite>,
    /// Subjects with a value waiting and no write in flight, by the tenant of the value's
    /// first publish; `turns` holds those tenants in turn.
    ready: HashMap<Tag, VecDeque<String>>,
    turns: VecDeque<Tag>,
    writes: futures_util::stream::FuturesUnordered<RetainedWrite>,
}

impl Answering {
    /// A retained value to write (a newer one for the subject may come before it starts).
    fn want(&mut self, subject: String, want: Want) {
        let p = self.paths.entry(subject.clone()).or_default();
        match &mut p.next {
            Some(n) => {
                if want.seq > n.seq {
                    n.seq = want.seq;
                    n.payload = want.payload;
                    n.tenant = want.tenant;
                }
                n.waiters.extend(want.waiters);
            }
            None => {
                let by = want.waiters[0].0;
                p.next = Some(want);
                if !p.running {
                    self.ready_for(by, subject);
                }
            }
        }
    }

    fn ready_for(&mut self, by: Tag, subject: String) {
        let q = self.ready.entry(by).or_default();
        if q.is_empty() {
            self.turns.push_back(by);
        }
        q.push_back(subject);
    }

    /// Starts waiting writes while fewer than [`RETAINED_WRITES`] are in flight, one per
    /// tenant in turn.
    fn start(
        &mut self,
        js: &jetstream::Context,
        retained: &stream::Stream,
        held: &tokio::sync::watch::Sender<bool>,
        inner: &std::sync::Weak<Inner>,
        retained_prefix: &str,
    ) {
        while self.writes.len() < RETAINED_WRITES {
            let Some(by) = self.turns.pop_front() else {
                return;
            };
            let Some(q) = self.ready.get_mut(&by) else {
                continue;
            };
            let subject = q.pop_front();
            if q.is_empty() {
                self.ready.remove(&by);
            } else {
                self.turns.push_back(by);
            }
            let Some(subject) = subject else { continue };
            let Some(p) = self.paths.get_mut(&subject) else {
                continue;
            };
            let Some(want) = p.next.take() else { continue };
            p.running = true;
            let (js, retained, mut held) = (js.clone(), retained.clone(), held.subscribe());
            let confirm = Confirm {
                inner: inner.clone(),
                path: subject
                    .strip_prefix(retained_prefix)
                    .and_then(|p| p.strip_prefix('.'))
                    .unwrap_or(&subject)
                    .to_string(),
            };
            self.writes.push(Box::pin(async move {
                // Held by a test ([`JetStreamStore::hold_retained_writes`]).
                let _ = held.wait_for(|h| !*h).await;
                let r = write_retained(
                    &js,
                    &retained,
                    &subject,
                    &want.payload,
                    want.tenant.as_deref(),
                    want.seq,
                    &confirm,
                )
                .await;
                (subject, want, r)
            }));
        }
    }

    /// A retained write ended: its publishes get `r` — unless it failed and a newer value
    /// of the subject waits, which answers them once written (it replaces theirs). Returns
    /// the tenants whose answers may go on.
    fn written(&mut self, subject: String, want: Want, r: Result<(), StoreError>) -> Vec<Tag> {
        let mut touched = Vec::new();
        let Some(p) = self.paths.get_mut(&subject) else {
            return touched;
        };
        p.running = false;
        match (&r, &mut p.next) {
            (Err(_), Some(n)) => {
                let mut w = want.waiters;
                w.append(&mut n.waiters);
                n.waiters = w;
            }
            _ => {
                for (tag, order) in want.waiters {
                    let Some(q) = self.pending.get_mut(&tag) else {
                        continue;
                    };
                    if let Ok(i) = q.binary_search_by_key(&order, |a| a.order) {
                        let seq = q[i].seq;
                        q[i].out = Some(r.clone().map(|()| Accepted::New(Seq(seq))));
                        if !touched.contains(&tag) {
                            touched.push(tag);
                        }
                    }
                }
            }
        }
        match p.next.as_ref().map(|n| n.waiters[0].0) {
            Some(by) => self.ready_for(by, subject),
            None => {
                self.paths.remove(&subject);
            }
        }
        touched
    }

    /// The answers of `tag` that are ready, in order (up to the first still waiting).
    fn take_ready(&mut self, tag: &Tag) -> Vec<Answer> {
        let Some(q) = self.pending.get_mut(tag) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while q.front().is_some_and(|a| a.out.is_some()) {
            out.extend(q.pop_front());
        }
        if q.is_empty() {
            self.pending.remove(tag);
        }
        out
    }
}

/// Answers one publish: its quota usage in flight ends, and its publisher hears.
fn answer(inner: &Inner, a: Answer) {
    let Answer { job, out, .. } = a;
    let Some(out) = out else { return };
    let seq = match &out {
        Ok(Accepted::New(s)) => Some(s.0),
        _ => None,
    };
    lock(&inner.ledger).finish(job.write, seq);
    // Its bytes leave `store.queue_bytes` before the publisher hears: one holding its
    // PubAck is never refused `busy` for what it held.
    let ticket = job.ticket;
    drop(job);
    JetStreamStore::resolve(inner, ticket, out);
}

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<jetstream::publish::PublishAck, StoreError>> + Send,
    >,
>;

async fn ack_loop(
    inner: std::sync::Weak<Inner>,
    js: jetstream::Context,
    retained: stream::Stream,
    mut rx: mpsc::Receiver<(
        Job,
        Result<jetstream::context::PublishAckFuture, StoreError>,
    )>,
) {
    let Some((held, rp)) = inner
        .upgrade()
        .map(|i| (i.retained_held.clone(), retained_prefix(&i.prefix)))
    else {
        return;
    };
    let mut a = Answering::default();
    // The publish whose stream ack is awaited now (acks come in publish order).
    let mut head: Option<(Job, AckFuture)> = None;
    let mut order = 0u64;
    loop {
        a.start(&js, &retained, &held, &inner, &rp);
        let touched = tokio::select! {
            biased;
            Some((subject, want, r)) = a.writes.next(), if !a.writes.is_empty() => {
                a.written(subject, want, r)
            }
            acked = async { head.as_mut().expect("awaited only when set").1.as_mut().await },
                if head.is_some() =>
            {
                let Some((job, _)) = head.take() else { continue };
                let tag = job.tag;
                order += 1;
                // A retained-only value in the stream: its subject's older values are purged
                // from now on (not once its retained write, which may lag, is done).
                if let (Ok(ack), Some(i)) = (&acked, inner.upgrade()) {
                    if !ack.duplicate
                        && job.retain.is_some()
                        && is_retained_only(&i.prefix, &job.subject)
                    {
                        queue_purge(&i, &job.subject, ack.sequence);
                    }
                }
                let (seq, out) = match acked {
                    Err(e) => (0, Some(Err(e))),
                    Ok(ack) if ack.duplicate => {
                        (0, Some(Ok(Accepted::Duplicate(Seq(ack.sequence)))))
                    }
                    Ok(ack) => match &job.retain {
                        None => (ack.sequence, Some(Ok(Accepted::New(Seq(ack.sequence))))),
                        Some(subject) => {
                            a.want(
                                subject.clone(),
                                Want {
                                    seq: ack.sequence,
                                    payload: job.payload.clone(),
                                    tenant: job
                                        .headers
                                        .get(TENANT_HEADER)
                                        .map(|t| t.as_str().to_string()),
                                    waiters: vec![(tag, order)],
                                },
                            );
                            (ack.sequence, None)
                        }
                    },
                };
                a.pending
                    .entry(tag)
                    .or_default()
                    .push_back(Answer {
                        job,
                        order,
                        seq,
                        out,
                    });
                vec![tag]
            }
            item = rx.recv(), if head.is_none() => {
                let Some((job, r)) = item else { return };
                let ack: AckFuture = Box::pin(async move {
                    r?.await.map_err(|e| unavailable("publish ack", e))
                });
                head = Some((job, ack));
                Vec::new()
            }
        };
        if touched.is_empty() {
            continue;
        }
        let Some(inner) = inner.upgrade() else { return };
        for tag in touched {
            for ready in a.take_ready(&tag) {
                answer(&inner, ready);
            }
        }
    }
}

/// Reads the claim record at `subject`, creating it with `tag` (if given) when there is
/// none (written only if the subject is still empty: of relays claiming at once, the
/// stream's order decides). Returns the holding group's tag and whether this call wrote it;
/// `None` when there is none and no `tag` to write.
async fn write_claim(
    js: &jetstream::Context,
    stream: &stream::Stream,
    subject: String,
    tag: Option<String>,
) -> Result<Option<(String, bool)>, StoreError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    for _ in 0..4 {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => {
                return Ok(Some((
                    String::from_utf8_lossy(&m.payload).into_owned(),
                    false,
                )))
            }
            Err(e) if e.kind() == K::NoMessageFound => {}
            Err(e) => return Err(unavailable("claim read", e)),
        }
        let Some(tag) = &tag else { return Ok(None) };
        let mut h = HeaderMap::new();
        h.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let r = js
            .publish_with_headers(subject.clone(), h, Bytes::from(tag.clone()))
            .await
            .map_err(|e| unavailable("claim write", e))?
            .await;
        match r {
            Ok(_) => return Ok(Some((tag.clone(), true))),
            // Another relay wrote it in between: read it.
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
            // Refused by the stream (a record is there: one write per key id) when a racing
            // write passed the check too; else NATS failed.
            Err(e) => match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => {
                    return Ok(Some((
                        String::from_utf8_lossy(&m.payload).into_owned(),
                        false,
                    )))
                }
                Err(_) => return Err(unavailable("claim write ack", e)),
            },
        }
    }
    Err(StoreError::Busy(
        "the key id is being claimed at other relays; retry".into(),
    ))
}

/// Fills the usage ledger from what the streams hold at start: the retained stream's values
/// (headers only), then the main stream up to `last` in order (headers only: sizes come
/// from `Nats-Msg-Size`). Bounded by the streams' sizes; a relay takes no publish before.
async fn load_ledger(
    ledger: &mut Ledger,
    retained: &stream::Stream,
    main: &stream::Stream,
    prefix: &str,
    last: u64,
) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let rp = format!("{}.", retained_prefix(prefix));
    scan_headers(
        retained,
        consumer::pull::OrderedConfig {
            // nats-server 2.9 wants a filter with `LastPerSubject`.
            filter_subject: format!("{rp}>"),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            headers_only: true,
            ..Default::default()
        },
        "retained usage read",
        |m, _seq, ts| {
            let h = m.headers.as_ref();
            if let (Some(path), Some(seq)) = (
                m.subject.as_str().strip_prefix(&rp),
                header_u64(h, SEQ_HEADER),
            ) {
                let size = header_u64(h, SIZE_HEADER).unwrap_or(0);
                ledger.apply_retained(seq, ts, path, &header_tag(h), size);
            }
            true
        },
    )
    .await?;
    if last > 0 {
        scan_headers(
            main,
            consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                headers_only: true,
                ..Default::default()
            },
            "usage read",
            |m, seq, ts| {
                if seq > last {
                    return false;
                }
                let h = m.headers.as_ref();
                let size = header_u64(h, SIZE_HEADER).unwrap_or(0);
                // A relay starting has written nothing yet: no write of its own to settle.
                apply_stream_message(ledger, prefix, "", m.subject.as_str(), seq, ts, h, size);
                seq < last
            },
        )
        .await?;
    }
    ledger.expire(now_ms());
    let t = ledger.total();
    tracing::info!(
        messages = t.msgs,
        bytes = t.bytes,
        retained = t.retained,
        tenants = ledger.tenants(),
        ms = started.elapsed().as_millis() as u64,
        "cluster store: usage per tenant read from the streams"
    );
    Ok(())
}

/// Reads a stream once with an ordered consumer (`config`), handing each message with its
/// stream sequence and publish time (Unix ms) to `each` until it returns false or nothing
/// is pending; `what` names the read in errors.
async fn scan_headers(
    stream: &stream::Stream,
    config: consumer::pull::OrderedConfig,
    what: &str,
    mut each: impl FnMut(&jetstream::Message, u64, u64) -> bool,
) -> Result<(), StoreError> {
    let c = stream
        .create_consumer(config)
        .await
        .map_err(|e| unavailable(what, e))?;
    if c.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut msgs = c.messages().await.map_err(|e| unavailable(what, e))?;
    while let Some(m) = msgs.next().await {
        let m = m.map_err(|e| unavailable(what, e))?;
        let info = m.info().map_err(|e| unavailable(what, e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let ts = published_ms(&info);
        if !each(&m, seq, ts) || pending == 0 {
            break;
        }
    }
    Ok(())
}

/// Whether `subject` is a retained-only value's (`<prefix>.r.<path>`).
fn is_retained_only(prefix: &str, subject: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|r| r.starts_with(".r."))
}

/// Applies one message of the main stream to the ledger; returns whether it is kept in
/// history (false: a retained-only value) or `None` for a subject outside the layout.
#[allow(clippy::too_many_arguments)]
fn apply_stream_message(
    ledger: &mut Ledger,
    prefix: &str,
    origin: &str,
    subject: &str,
    seq: u64,
    ts: u64,
    h: Option<&HeaderMap>,
    size: u64,
) -> Option<bool> {
    let flags = header_u64(h, FLAGS_HEADER).unwrap_or(0);
    let retain = flags & pub_flags::RETAIN != 0;
    let Some(rest) = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
    else {
        ledger.advance(seq);
        return None;
    };
    let (path, kept) = match rest.strip_prefix("r.") {
        Some(path) => (path, false),
        None => (rest, true),
    };
    let own = own_write(h, origin);
    ledger.apply(seq, ts, path, &header_tag(h), size, kept, retain, own);
    Some(kept)
}

/// An ordered read of `stream` (of `filter`'s subjects, or all) from sequence `start`
/// (the account records: small, written by operators).
async fn read_from(
    stream: &stream::Stream,
    filter: Option<String>,
    start: u64,
) -> Result<consumer::pull::Ordered, String> {
    let cfg = consumer::pull::OrderedConfig {
        filter_subject: filter.unwrap_or_default(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start,
        },
        ..Default::default()
    };
    match stream.create_consumer(cfg).await {
        Ok(c) => c.messages().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The consumer of one of this relay's reads of the stream (`filter`: its subjects, empty:
/// all), from sequence `start`: no acks (a delivery lost on the way shows as a jump in the
/// consumer sequence, and fails the read), one replica in memory (a read's cursor: losing
/// it fails the read, which is retried), forgotten by the server after `idle` without a
/// request.
fn read_config(filter: String, start: u64, idle: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        filter_subject: filter,
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        },
        ack_policy: consumer::AckPolicy::None,
        inactive_threshold: idle,
        num_replicas: 1,
        memory_storage: true,
        ..Default::default()
    }
}

/// Messages and bytes one pull request of the live read asks for. Two requests are
/// outstanding at a time (the second queued at the server behind the first, so the read
/// never waits a round trip between them): while the router falls behind, at most about
/// twice this waits in this relay. (async-nats's ordered consumer asked for 500 messages
/// of any size and kept asking: up to 500 envelopes of up to `max_frame` each.)
const LIVE_BATCH: usize = 4096;
const LIVE_BYTES: usize = 2 << 20;
/// How long a live pull request waits at the server for messages before it ends.
const LIVE_EXPIRES: Duration = Duration::from_secs(5);
/// The server deletes the live read's consumer after this long without a request (a relay
/// frozen that long re-creates it from where it was).
const LIVE_IDLE: Duration = Duration::from_secs(60);
/// How often the server says a waiting live request is alive (a status message).
const LIVE_HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the live read is re-created (its consumer's server died, or does
/// not answer): an idle read still hears a heartbeat every `LIVE_HEARTBEAT`.
const LIVE_SILENT: Duration = Duration::from_secs(5);
/// The live read's consumer's description (then `: <[cluster] name>`), so an operator (and
/// the tests) can tell it from history reads.
const LIVE_DESCRIPTION: &str = "whispeer-relay live read";

/// Reads the whole stream in order from `last + 1`, forever (re-created after errors),
/// applying each message to the usage ledger, then feeding it to the router.
async fn live_loop(
    inner: std::sync::Weak<Inner>,
    stream: stream::Stream,
    last: u64,
    feed: mpsc::Sender<Sequenced>,
    described: String,
) {
    let mut next = last + 1;
    let mut failures = 0u32;
    loop {
        let from = next;
        match live_read(&inner, &stream, &mut next, &feed, &described).await {
            Ok(()) => return,
            Err(e) if next == from => {
                tracing::warn!(error = %e, "cluster store: cannot read the stream")
            }
            Err(e) => tracing::debug!(error = %e, "cluster store: live read restarts"),
        }
        if feed.is_closed() {
            return;
        }
        failures = if next > from { 1 } else { failures + 1 };
        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
    }
}

/// One live read: a pull consumer from `next`, two bounded requests outstanding, each
/// message handed on in order. `Ok` when the relay is shutting down; `Err` (re-create the
/// consumer from `next`) on any failure, including a delivery lost on the way (AckNone:
/// never redelivered, seen as a jump in the consumer sequence).
async fn live_read(
    inner: &std::sync::Weak<Inner>,
    stream: &stream::Stream,
    next: &mut u64,
    feed: &mpsc::Sender<Sequenced>,
    described: &str,
) -> Result<(), String> {
    let cfg = consumer::pull::Config {
        description: Some(described.into()),
        ..read_config(String::new(), *next, LIVE_IDLE)
    };
    let consumer = stream
        .create_consumer(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let r = live_requests(inner, &consumer, next, feed).await;
    if r.is_err() {
        // Its successor starts where it stopped at once; the server would keep the old
        // one for `LIVE_IDLE` (deleting it can take the API's timeout when its server died).
        let (stream, name) = (stream.clone(), consumer.cached_info().name.clone());
        tokio::spawn(async move {
            if let Err(e) = stream.delete_consumer(&name).await {
                tracing::debug!(error = %e, "cluster store: old live read not deleted");
            }
        });
    }
    r
}

/// The requests and deliveries of one live read's consumer (see [`live_read`]).
///
/// All requests reply under one wildcard subscription, so deliveries arrive in the
/// consumer's order although the server spreads them over the waiting requests. A data
/// message does not say which request it answers: it is charged to the oldest open one.
/// That keeps what the server may still send at or below what the open requests have
/// left here (at most `2 × LIVE_BYTES`), whichever request it really answered. A request
/// is closed by its status (408, 409), by the messages and bytes charged to it, or at its
/// expiry (a request whose bytes were used up exactly may end without a status).
async fn live_requests(
    inner: &std::sync::Weak<Inner>,
    consumer: &consumer::PullConsumer,
    next: &mut u64,
    feed: &mpsc::Sender<Sequenced>,
) -> Result<(), String> {
    struct Open {
        id: u64,
        msgs: usize,
        bytes: Option<usize>,
        ends: tokio::time::Instant,
    }
    let (client, context) = match inner.upgrade() {
        Some(i) => (i.client.clone(), i.js.clone()),
        None => return Ok(()),
    };
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| e.to_string())?;
    let mut open: VecDeque<Open> = VecDeque::new();
    let mut ids = 0u64;
    // "Message Size Exceeds MaxBytes" twice without a delivery between: the next message
    // is larger than a request's bytes; it is asked for alone.
    let mut refused_in_a_row = 0u32;
    let mut due = 1u64;
    // When the server last sent this read anything (a message or a status).
    let mut heard = tokio::time::Instant::now();
    loop {
        while open.len() < 2 {
            ids += 1;
            let alone = refused_in_a_row >= 2;
            let req = Open {
                id: ids,
                msgs: if alone { 1 } else { LIVE_BATCH },
                bytes: (!alone).then_some(LIVE_BYTES),
                ends: tokio::time::Instant::now() + LIVE_EXPIRES + Duration::from_secs(1),
            };
            let batch = consumer::pull::BatchConfig {
                batch: req.msgs,
                max_bytes: req.bytes.unwrap_or(0),
                expires: Some(LIVE_EXPIRES),
                idle_heartbeat: LIVE_HEARTBEAT,
                ..Default::default()
            };
            consumer
                .request_batch(batch, format!("{inbox}.{ids}").into())
                .await
                .map_err(|e| e.to_string())?;
            open.push_back(req);
            // One request alone is enough: the one after it is a normal one again.
            refused_in_a_row = refused_in_a_row.min(1);
        }
        let first_end = open.iter().map(|r| r.ends).min().expect("open requests");
        let m = tokio::select! {
            // What has arrived first: a read that waited on the router is not silence.
            biased;
            m = sub.next() => m.ok_or("the live read's subscription ended")?,
            () = tokio::time::sleep_until(first_end.min(heard + LIVE_SILENT)) => {
                let now = tokio::time::Instant::now();
                if now >= heard + LIVE_SILENT {
                    // Not even a request's timeout: the consumer is gone (its server died)
                    // or the server does not answer.
                    return Err("the live read's consumer does not answer".into());
                }
                open.retain(|r| r.ends > now);
                continue;
            }
        };
        heard = tokio::time::Instant::now();
        if let Some(status) = m.status.filter(|s| *s != async_nats::StatusCode::OK) {
            let id = m.subject.as_str().rsplit('.').next();
            let id = id.and_then(|s| s.parse::<u64>().ok());
            let what = m.description.unwrap_or_default();
            match status {
                async_nats::StatusCode::IDLE_HEARTBEAT => continue,
                async_nats::StatusCode::TIMEOUT | async_nats::StatusCode::NOT_FOUND => {}
                _ if what.contains("Message Size Exceeds MaxBytes") => refused_in_a_row += 1,
                _ if what.contains("Batch Completed") => {}
                _ => return Err(format!("live request ended: {status} {what}")),
            }
            open.retain(|r| Some(r.id) != id);
            continue;
        }
        if let Some(r) = open.front_mut() {
            r.msgs = r.msgs.saturating_sub(1);
            r.bytes = r.bytes.map(|b| b.saturating_sub(m.length));
            if r.msgs == 0 || r.bytes.is_some_and(|b| b <= LIVE_BYTES / 16) {
                open.pop_front();
            }
        }
        refused_in_a_row = 0;
        let m = jetstream::Message {
            message: m,
            context: context.clone(),
        };
        let info = m.info().map_err(|e| e.to_string())?;
        in_order(info.consumer_sequence, &mut due)?;
        let seq = info.stream_sequence;
        if seq < *next {
            continue;
        }
        *next = seq + 1;
        let h = m.headers.as_ref();
        let flags = header_u64(h, FLAGS_HEADER).unwrap_or(0);
        let ts = published_ms(&info);
        let kept = {
            let Some(i) = inner.upgrade() else {
                return Ok(());
            };
            let mut l = lock(&i.ledger);
            apply_stream_message(
                &mut l,
                &i.prefix,
                &i.origin,
                m.subject.as_str(),
                seq,
                ts,
                h,
                m.payload.len() as u64,
            )
        };
        let Some(kept) = kept else { continue };
        let Ok(envelope) = Envelope::from_bytes(m.payload.clone()) else {
            tracing::debug!(seq, "cluster store: a stream message is no envelope");
            continue;
        };
        let s = Sequenced {
            seq: Seq(seq),
            envelope,
            flags,
            kept,
        };
        if feed.send(s).await.is_err() {
            return Ok(());
        }
    }
}

/// Records what this relay learned of a durable's live record (read from the stream,
/// directly or by the background reader, or written here), if it is the newest it knows —
/// `false` for an older one, which says nothing any more: it may be of a durable of the
/// name deleted since (a relay whose reader is behind reads the deleted durable's records
/// after the new one's), and its floor, owner or tenant taken then went into the new
/// durable (its floor rewritten by `touch_record`, the deleted one's owner enforced).
///
/// The newest record decides the owner — every floor carries its owner (`Wsp-Owner`), so
/// one without is of a durable that has none, unless this relay adopted it and has not
/// written that yet ([`Owner::local`]) — and which tenant the durable counts for in the
/// ledger (moved when another tenant created the name again, or wrote its floor).
fn note_record(inner: &Inner, k: &str, rec: &DurableRecord) -> bool {
    {
        let mut r = lock(&inner.records);
        if r.get(k).is_some_and(|m| rec.seq < m.seq) {
            return false;
        }
        r.insert(
            k.to_string(),
            RecordMeta {
                seq: rec.seq,
                ts: rec.ts,
                floor: rec.floor,
                tenant: rec.tenant,
            },
        );
        // Under the records lock: a newer record applied at once (a direct read, the
        // reader) cannot have its owner or tenant overwritten by this one's.
        let mut o = lock(&inner.owners);
        match &rec.owner {
            Some(tag) => {
                let read = Owner {
                    tag: tag.clone(),
                    seq: rec.seq,
                    local: false,
                };
                o.insert(k.to_string(), read);
            }
            None => {
                if o.get(k).is_some_and(|o| !o.local && o.seq < rec.seq) {
                    o.remove(k);
                }
            }
        }
        drop(o);
        lock(&inner.ledger).count_durable(k, &rec.tenant);
    }
    let mut g = lock(&inner.gone);
    if g.get(k).is_some_and(|m| m.0 < rec.seq) {
        g.remove(k);
    }
    true
}

/// Records a durable record this relay wrote (stream sequence `seq`, written now, with
/// `floor`, `tenant` and `owner`).
fn wrote_record(inner: &Inner, k: &str, seq: u64, floor: u64, tenant: &Tag, owner: Option<String>) {
    let rec = DurableRecord {
        floor: Some(floor),
        owner,
        tenant: *tenant,
        seq,
        ts: now_ms(),
        deleted: false,
    };
    note_record(inner, k, &rec);
}

/// A deletion marker (stream sequence `marker`) of a durable this relay knows a newer
/// record of (created again after it): the owner it learned before the marker — read from
/// a record of the deleted durable, or adopted on one — was the deleted durable's.
fn forget_before(inner: &Inner, k: &str, marker: u64) {
    let mut o = lock(&inner.owners);
    if o.get(k).is_some_and(|o| o.seq < marker) {
        o.remove(k);
    }
}

/// A floor of this relay's on its way to the durable stream (queued or being written).
fn pending_floor(inner: &Inner, k: &str) -> Option<u64> {
    let queued = lock(&inner.dirty).get(k).map(|d| d.0);
    queued.or_else(|| lock(&inner.flushing).get(k).copied())
}

/// One `Sub` noted in [`Inner::creating`] as on its way to create durable `k` is not any
/// more (refused for the quota, its creation failed, or it found the durable): the entry
/// goes with the last of them.
fn creation_done(inner: &Inner, k: &str) {
    let mut creating = lock(&inner.creating);
    if let Some(c) = creating.get_mut(k) {
        c.pending = c.pending.saturating_sub(1);
        if c.pending == 0 {
            creating.remove(k);
        }
    }
}

/// Notes `owner` as the owner of owner-less durable `k` (adopted by its first `Sub` naming
/// one): written with the durable's next floor here.
fn adopt_here(inner: &Inner, k: &str, owner: String) {
    let seq = lock(&inner.records).get(k).map_or(0, |m| m.seq);
    let adopted = Owner {
        tag: owner,
        seq,
        local: true,
    };
    lock(&inner.owners).insert(k.to_string(), adopted);
}

/// A durable's owner check refused: another owner's.
fn not_yours(key: &DurableKey) -> StoreError {
    StoreError::NotAllowed(format!(
        "durable subscription {:?} belongs to someone else",
        key.name
    ))
}

/// Another owner's `Sub` is on its way to create the durable here (retryable).
fn being_created(key: &DurableKey) -> StoreError {
    StoreError::Busy(format!(
        "durable subscription {:?} is being created by another subscriber; try again",
        key.name
    ))
}

/// Forgets a deleted durable here — floor, owner, record, queued floor, its count in the
/// ledger — and keeps its deletion marker (`marker`: stream sequence and time; `None`: the
/// durable stream holds nothing of it). `report`: tells [`Store::take_gone`]'s receiver
/// (when this relay knows the name).
fn gone_here(inner: &Inner, k: &str, marker: Option<(u64, u64)>, report: bool) {
    lock(&inner.durables).remove(k);
    lock(&inner.owners).remove(k);
    lock(&inner.records).remove(k);
    lock(&inner.fresh).remove(k);
    lock(&inner.ledger).remove_durable(k);
    {
        let mut g = lock(&inner.gone);
        match marker {
            Some(m) => {
                lock(&inner.dirty).remove(k);
                let e = g.entry(k.to_string()).or_insert(m);
                if m.0 >= e.0 {
                    *e = m;
                }
            }
            None => {
                g.remove(k);
            }
        }
    }
    let name = lock(&inner.names).remove(k);
    if let (true, Some(name)) = (report, name) {
        if let Some(tx) = lock(&inner.gone_tx).as_ref() {
            let _ = tx.send(name);
        }
    }
}

/// Writes the deletion marker of the durable at `subject` over its record `after` (only if
/// that is still its last record): its stream sequence, or `None` when another record was
/// written in between.
async fn write_marker(
    js: &jetstream::Context,
    subject: &str,
    after: u64,
) -> Result<Option<u64>, StoreError> {
    let mut h = HeaderMap::new();
    h.insert(DELETED_HEADER, "1");
    h.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        after.to_string().as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_string(), h, Bytes::new())
        .await
        .map_err(|e| unavailable("durable delete", e))?
        .await;
    match ack {
        Ok(a) => Ok(Some(a.sequence)),
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => Ok(None),
        Err(e) => Err(unavailable("durable delete", e)),
    }
}

/// Deletes durable `k`'s record (its holder asked): waits for a floor of it this relay is
/// writing, then writes the deletion marker over the record it reads (again if a floor
/// landed in between). Returns whether there was a durable, and the marker now there.
async fn delete_record(inner: &Inner, k: &str) -> Result<(bool, Option<(u64, u64)>), StoreError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    // Written after the marker, a floor taken by the writer would bring the durable back.
    loop {
        let flushed = inner.flushed.notified();
        if !lock(&inner.flushing).contains_key(k) {
            break;
        }
        flushed.await;
    }
    let subject = format!("{}.{k}", durable_prefix(&inner.prefix));
    for _ in 0..8 {
        let m = match inner
            .durable_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == K::NoMessageFound => return Ok((false, None)),
            Err(e) => return Err(unavailable("durable read", e)),
        };
        let rec = DurableRecord::read(&m);
        if rec.deleted {
            return Ok((false, Some((rec.seq, rec.ts))));
        }
        if let Some(seq) = write_marker(&inner.js, &subject, rec.seq).await? {
            return Ok((true, Some((seq, now_ms()))));
        }
    }
    Err(StoreError::Busy(
        "the durable subscription's record keeps changing; try again".into(),
    ))
}

/// Rewrites durable `k`'s record as it is (floor, tenant, owner), only over the record this
/// relay knows last: its time is the durable's idle clock, so a durable held here is
/// rewritten now and then (and when released), which no sweep could mistake for idle.
async fn touch_record(inner: &Inner, k: &str) {
    // The floor of the record it is written over, not the in-memory one: a floor this
    // relay has on its way goes by itself, and the in-memory one may be higher for no
    // good reason (a floor read earlier of a durable of the name deleted since).
    let Some(meta) = lock(&inner.records).get(k).copied() else {
        return;
    };
    let Some(floor) = meta.floor else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(TENANT_HEADER, hex::encode(meta.tenant).as_str());
    let owner = lock(&inner.owners).get(k).map(|o| o.tag.clone());
    if let Some(o) = &owner {
        h.insert(OWNER_HEADER, o.as_str());
    }
    h.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        meta.seq.to_string().as_str(),
    );
    let subject = format!("{}.{k}", durable_prefix(&inner.prefix));
    let r = match inner
        .js
        .publish_with_headers(subject, h, Bytes::from(floor.to_string()))
        .await
    {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match r {
        Ok(a) => wrote_record(inner, k, a.sequence, floor, &meta.tenant, owner),
        // A floor landed in between (a newer time anyway), or NATS failed: the next
        // sweep tries again.
        Err(e) => tracing::debug!(error = %e, "cluster store: durable record not refreshed"),
    }
}

/// Runs [`sweep`] while the store lives: every quarter of `store.durable_idle_ms` or of
/// `store.durable_marker_keep_ms`, whichever is shorter (at least 100 ms, at most a
/// minute; the keep time alone when durables never idle out: deletion markers still go).
async fn durable_sweep(inner: std::sync::Weak<Inner>) {
    let Some(every) = inner
        .upgrade()
        .map(|i| sweep_every(i.idle_ms, i.marker_keep_ms))
    else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(i) = inner.upgrade() else { return };
        if tokio::time::timeout(Duration::from_secs(60), sweep(&i))
            .await
            .is_err()
        {
            tracing::debug!("cluster store: durable sweep timed out (the next one goes on)");
        }
    }
}

/// How often [`durable_sweep`] sweeps: a quarter of the shorter of `idle_ms` (0: never
/// idle, not counted) and `keep_ms` (the marker keep time), 100 ms to 60 s.
fn sweep_every(idle_ms: u64, keep_ms: u64) -> Duration {
    let shortest = match idle_ms {
        0 => keep_ms,
        idle => idle.min(keep_ms),
    };
    Duration::from_millis((shortest / 4).clamp(100, 60_000))
}

/// One sweep of the durables (see PROTOCOL.md, JetStream layout): refreshes the records of
/// durables held here; deletes durables whose record is older than `durable_idle_ms` and
/// that nobody holds (taking their lease for the moment, so no `Sub` anywhere holds one
/// meanwhile); purges deletion markers older than `durable_marker_keep_ms`.
async fn sweep(i: &Arc<Inner>) {
    let idle = i.idle_ms;
    let keep = i.marker_keep_ms;
    let now = now_ms();
    if idle > 0 {
        let refresh = (idle / 4).clamp(1, 3_600_000);
        for k in i.leases.held_keys() {
            let stale = lock(&i.records)
                .get(&k)
                .is_some_and(|m| m.ts.saturating_add(refresh) <= now);
            if stale {
                touch_record(i, &k).await;
            }
        }
        let idle_keys: Vec<String> = lock(&i.records)
            .iter()
            .filter(|(_, m)| m.ts.saturating_add(idle) <= now)
            .map(|(k, _)| k.clone())
            .take(SWEEP_BATCH)
            .collect();
        for k in idle_keys {
            if !i.leases.holds(&k) && pending_floor(i, &k).is_none() {
                expire(i, &k).await;
            }
        }
    }
    let old: Vec<(String, u64)> = lock(&i.gone)
        .iter()
        .filter(|(_, g)| g.1.saturating_add(keep) <= now)
        .map(|(k, g)| (k.clone(), g.0))
        .take(SWEEP_BATCH)
        .collect();
    for (k, seq) in old {
        // Only the marker (and anything older): a record written after it stays.
        let subject = format!("{}.{k}", durable_prefix(&i.prefix));
        match i
            .durable_stream
            .purge()
            .filter(subject)
            .sequence(seq + 1)
            .await
        {
            Ok(_) => {
                let mut g = lock(&i.gone);
                if g.get(&k).is_some_and(|g| g.0 == seq) {
                    g.remove(&k);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cluster store: deletion marker not purged"),
        }
    }
}

/// Deletes durable `k` if it is still idle and nobody holds it (see [`sweep`]).
async fn expire(i: &Arc<Inner>, k: &str) {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    let lease = match i.leases.take_briefly(k).await {
        Ok(Some(seq)) => seq,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "cluster store: idle durable not taken (next sweep)");
            return;
        }
    };
    let subject = format!("{}.{k}", durable_prefix(&i.prefix));
    let r = async {
        let m = match i
            .durable_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == K::NoMessageFound => {
                if pending_floor(i, k).is_none() {
                    gone_here(i, k, None, true);
                }
                return Ok(());
            }
            Err(e) => return Err(unavailable("durable read", e)),
        };
        let rec = DurableRecord::read(&m);
        if rec.deleted {
            gone_here(i, k, Some((rec.seq, rec.ts)), true);
        } else if rec.ts.saturating_add(i.idle_ms) > now_ms() {
            note_record(i, k, &rec); // used meanwhile
        } else if let Some(seq) = write_marker(&i.js, &subject, rec.seq).await? {
            tracing::debug!(idle_ms = i.idle_ms, "cluster store: idle durable deleted");
            gone_here(i, k, Some((seq, now_ms())), true);
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "cluster store: idle durable not deleted (next sweep)");
    }
    i.leases.release(k, lease).await;
}

/// Keeps the in-memory durable floors in step with the durable stream (its current
/// contents, then every change), re-reading it after errors.
async fn durable_watch(
    inner: std::sync::Weak<Inner>,
    stream: stream::Stream,
    prefix: String,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let cfg = consumer::pull::OrderedConfig {
            // nats-server 2.9 wants a filter with `LastPerSubject` (without one the
            // watch never started there).
            filter_subject: format!("{prefix}>"),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        };
        if let Ok(c) = stream.create_consumer(cfg).await {
            if let Ok(mut msgs) = c.messages().await {
                while let Some(Ok(m)) = msgs.next().await {
                    if *held.borrow() && held.wait_for(|h| !*h).await.is_err() {
                        return; // the store is gone
                    }
                    let Some(i) = inner.upgrade() else { return };
                    failures = 0;
                    let Some(key) = m.subject.as_str().strip_prefix(&prefix) else {
                        continue;
                    };
                    let Ok((seq, ts)) = m
                        .info()
                        .map(|info| (info.stream_sequence, published_ms(&info)))
                    else {
                        continue;
                    };
                    let rec = DurableRecord::of(m.headers.as_ref(), &m.payload, seq, ts);
                    if rec.deleted {
                        // Deleted (here or at another relay), unless this relay knows a
                        // newer record of the name (created again after the marker): then
                        // only what it learned of the deleted durable goes.
                        let newer = lock(&i.records).get(key).is_some_and(|r| r.seq > seq);
                        if newer {
                            forget_before(&i, key, seq);
                        } else {
                            gone_here(&i, key, Some((seq, ts)), true);
                        }
                        continue;
                    }
                    let Some(floor) = rec.floor else {
                        continue;
                    };
                    // A record older than a deletion this relay knows of is no durable, nor
                    // is one older than a record it knows (read directly, or written here):
                    // the first check before the second, as a creation notes its record
                    // before it drops the marker it went over.
                    if lock(&i.gone).get(key).is_some_and(|g| g.0 > seq) {
                        continue;
                    }
                    if !note_record(&i, key, &rec) {
                        continue;
                    }
                    let mut d = lock(&i.durables);
                    let known = d.len();
                    let e = d.entry(key.to_string()).or_insert(floor);
                    *e = (*e).max(floor);
                    if d.len() > known {
                        tracing::debug!(durables = d.len(), "cluster store: durable record read");
                    }
                }
            }
        }
        if inner.strong_count() == 0 {
            return;
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
    }
}

/// Writes floor `floor` of durable `k` (tenant `tag`, with the owner known here) over the
/// newest record this relay knows of it (`Nats-Expected-Last-Subject-Sequence`), as
/// deletions, refreshes and lease writes are: a floor that reaches NATS after another
/// relay's deletion marker (issued before it — its write slow, its relay's hold lapsed or
/// given back after the 5 s wait for it) fails instead of bringing the deleted durable
/// back, floor and owner, for every relay reading the stream. When the record moved, it is
/// read again and the floor written over it only while this relay holds the durable and
/// the record is live and not another owner's (its own refresh in between); otherwise —
/// a marker, nothing, the name held elsewhere — the floor is dropped: `Ok(None)`. "Holds"
/// includes a hold being given back ([`lease::Leases::begin_release`]): the subscription's
/// last floors are what its release waits for. A floor is never written over a record
/// with a higher one (a floor written meanwhile, e.g. by [`JetStreamStore::write_durable_now`]):
/// that record stands, `Ok(Some(its sequence))`.
async fn write_floor(inner: &Inner, k: &str, floor: u64, tag: &Tag) -> Result<Option<u64>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    let subject = format!("{}.{k}", durable_prefix(&inner.prefix));
    let owner = lock(&inner.owners).get(k).map(|o| o.tag.clone());
    // No record known: the durable was forgotten here (deleted): only into an empty subject.
    let known = lock(&inner.records).get(k).copied();
    let mut after = known.map_or(0, |m| m.seq);
    let mut newer = known.and_then(|m| m.floor);
    for _ in 0..4 {
        // Monotonic: never below the floor of the record it would replace.
        if newer.is_some_and(|n| n > floor) {
            return Ok(Some(after));
        }
        let mut h = HeaderMap::new();
        h.insert(TENANT_HEADER, hex::encode(tag).as_str());
        if let Some(o) = &owner {
            h.insert(OWNER_HEADER, o.as_str());
        }
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            after.to_string().as_str(),
        );
        let ack = inner
            .js
            .publish_with_headers(subject.clone(), h, Bytes::from(floor.to_string()))
            .await
            .map_err(|e| e.to_string())?
            .await;
        match ack {
            Ok(a) => {
                wrote_record(inner, k, a.sequence, floor, tag, owner);
                return Ok(Some(a.sequence));
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
            Err(e) => return Err(e.to_string()),
        }
        let rec = match inner
            .durable_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => DurableRecord::read(&m),
            Err(e) if e.kind() == K::NoMessageFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let ours = rec.owner.is_none() || rec.owner == owner;
        if rec.deleted || !ours || !inner.leases.holds(k) {
            return Ok(None);
        }
        note_record(inner, k, &rec);
        after = rec.seq;
        newer = rec.floor;
    }
    Err("the durable's record kept changing (4 attempts)".into())
}

async fn durable_writer(inner: std::sync::Weak<Inner>, flush: Arc<Notify>) {
    let Some(mut held) = inner.upgrade().map(|i| i.writer_held.subscribe()) else {
        return;
    };
    loop {
        let notified = flush.notified();
        let Some(i) = inner.upgrade() else { return };
        let batch: Vec<(String, (u64, Tag))> = lock(&i.dirty).drain().collect();
        lock(&i.flushing).extend(batch.iter().map(|(k, (v, _))| (k.clone(), *v)));
        drop(i);
        for (k, (v, tag)) in batch {
            if *held.borrow() != WRITER_RUNS {
                if let Some(i) = inner.upgrade() {
                    i.writer_held.send_if_modified(|s| {
                        let park = *s == WRITER_HELD;
                        if park {
                            *s = WRITER_PARKED;
                        }
                        park
                    });
                }
                if held.wait_for(|h| *h == WRITER_RUNS).await.is_err() {
                    return; // the store is gone
                }
            }
            let Some(i) = inner.upgrade() else { return };
            match write_floor(&i, &k, v, &tag).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::debug!("cluster store: durable floor dropped (deleted meanwhile)")
                }
                Err(e) => tracing::warn!(error = %e, "cluster store: durable floor not written"),
            }
            let mut f = lock(&i.flushing);
            if f.get(&k) == Some(&v) {
                f.remove(&k);
            }
            drop(f);
            // A deletion waiting for this durable's write goes on.
            i.flushed.notify_waiters();
        }
        notified.await;
    }
}

impl Store for JetStreamStore {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn features(&self) -> u64 {
        super::KEEPING_FEATURES | whispeer_protocol::frame::features::DURABLE_DELETE
    }

    fn append(&self, m: Append<'_>) -> Result<Accepted, StoreError> {
        let inner = &self.inner;
        let retain = m.flags & pub_flags::RETAIN != 0;
        let kept = m.qos != Qos::AtMostOnce || inner.store_qos0;
        if !kept && !retain {
            inner.counters.live_only.fetch_add(1, Relaxed);
            return Ok(Accepted::Live(Seq(0)));
        }
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            inner.counters.failures.fetch_add(1, Relaxed);
            return Err(StoreError::Unavailable(
                "JetStream is unreachable; retry".into(),
            ));
        }
        let path = m.path;
        // A retained-only value is numbered by the stream but kept outside history.
        let subject = if kept {
            crate::cluster::path_subject(&inner.prefix, path)
        } else {
            crate::cluster::path_subject(&retained_only_prefix(&inner.prefix), path)
        };
        let tag = tenant_tag(m.tenant);
        let size = m.envelope.as_bytes().len() as u64;
        // The purges of replaced retained-only values are bounded: past the bound a new
        // subject waits (`busy`, retryable) rather than leaving copies in the stream.
        if !kept {
            let p = lock(&inner.superseding);
            if p.due.len() >= MAX_PURGES && !p.due.contains_key(&subject) {
                inner.counters.busy.fetch_add(1, Relaxed);
                return Err(StoreError::Busy(format!(
                    "{} subjects wait for their older retained values to be purged; publish again shortly",
                    p.due.len()
                )));
            }
        }
        // Beyond the bounds only a tenant under its fair share is queued: one tenant's
        // flood gets `busy`, not every other tenant's stored publish with it.
        let Some(held) = inner.queued.take(&tag, size) else {
            inner.counters.busy.fetch_add(1, Relaxed);
            let q = inner.queued.held();
            return Err(StoreError::Busy(format!(
                "{} publishes ({} bytes) wait for JetStream; publish again shortly",
                q.msgs, q.bytes
            )));
        };
        let write = {
            let key = crate::cluster::path_subject("", path);
            let key = key.strip_prefix('.').unwrap_or(&key);
            let mut l = lock(&inner.ledger);
            l.expire(now_ms());
            let need = l.need_for(&tag, key, size, kept, retain);
            if let Err((by, e)) = l.check_publish(&tag, key, retain, &need) {
                inner.counters.quota.count(by);
                return Err(e);
            }
            l.begin(&tag, &need)
        };
        let mut headers = HeaderMap::new();
        headers.insert(TENANT_HEADER, hex::encode(tag).as_str());
        headers.insert(WRITE_HEADER, format!("{}.{write}", inner.origin).as_str());
        if m.flags != 0 {
            headers.insert(FLAGS_HEADER, m.flags.to_string().as_str());
        }
        if let (Qos::ExactlyOnce, Some(id)) = (m.qos, m.publish_id) {
            let scoped = match m.tenant {
                Tenant::Account(a) => format!("{}-{}", hex::encode(&a[..8]), hex::encode(id)),
                _ => hex::encode(id),
            };
            headers.insert(async_nats::header::NATS_MESSAGE_ID, scoped.as_str());
        }
        let ticket = inner.next_ticket.fetch_add(1, Relaxed);
        let job = Job {
            ticket,
            subject,
            headers,
            payload: m.envelope.as_bytes().clone(),
            retain: retain
                .then(|| crate::cluster::path_subject(&retained_prefix(&inner.prefix), path)),
            write,
            tag,
            _held: held,
        };
        match inner.jobs.try_send(job) {
            Ok(()) => Ok(Accepted::Pending(ticket)),
            Err(mpsc::error::TrySendError::Full(_)) => {
                lock(&inner.ledger).finish(write, None);
                inner.counters.busy.fetch_add(1, Relaxed);
                Err(StoreError::Busy(
                    "the JetStream publish queue is full".into(),
                ))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                lock(&inner.ledger).finish(write, None);
                Err(StoreError::Unavailable(
                    "the JetStream publisher stopped".into(),
                ))
            }
        }
    }

    fn last_seq(&self) -> Seq {
        Seq(self.inner.last.load(Relaxed))
    }

    fn seq_space(&self) -> [u8; 16] {
        self.inner.space
    }

    fn when_durable(&self, _seq: Seq, done: OnDurable) {
        // Every numbered message came back from the stream: it is stored there.
        done(Ok(()))
    }

    fn when_sequenced(&self, ticket: u64, done: OnSequenced) {
        let ready = {
            let mut slots = lock(&self.inner.slots);
            match slots.remove(&ticket) {
                Some(Slot::Done(r)) => Some(r),
                _ => {
                    slots.insert(ticket, Slot::Waiting(done));
                    return;
                }
            }
        };
        if let Some(r) = ready {
            done(r);
        }
    }

    fn advance(&self, seq: Seq) {
        self.inner.last.fetch_max(seq.0, Relaxed);
    }

    fn take_sequenced(&self) -> Option<mpsc::Receiver<Sequenced>> {
        lock(&self.inner.feed).take()
    }

    fn when_readable(&self, _key_id: &KeyId, _upto: Seq, done: OnDurable) {
        // A sequence is assigned only to what the stream holds already.
        done(Ok(()))
    }

    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: Seq,
    ) -> Result<ReadPlan, StoreError> {
        // `SinceMs` and `LastN` are answered from the usage ledger (each kept message's
        // sequence and time per path, from the ordered read): no scan of the key id's
        // history. The read then starts at the plan's sequence.
        let prefix = format!("{}.", pattern.key_id());
        let filters = crate::cluster::pattern_subjects("x", pattern);
        let matches = |k: &str| {
            let s = format!("x.{k}");
            filters.iter().any(|f| subject_matches(f, &s))
        };
        match replay {
            Replay::FromSeq(s) => Ok(ReadPlan {
                start: s,
                ..ReadPlan::default()
            }),
            Replay::SinceMs(t) => {
                let first = lock(&self.inner.ledger).first_since(&prefix, matches, t, upto.0);
                Ok(ReadPlan {
                    start: first.unwrap_or(upto.0 + 1),
                    since_ms: Some(t),
                    path_starts: None,
                })
            }
            Replay::LastN(n) => {
                let starts = lock(&self.inner.ledger).last_n_starts(&prefix, matches, n, upto.0);
                let starts = starts
                    .into_iter()
                    .filter_map(|(k, seq)| {
                        let mut raw = Vec::with_capacity(16 * 4);
                        for part in k.split('.') {
                            raw.extend_from_slice(&hex::decode(part).ok()?);
                        }
                        Some((raw, seq))
                    })
                    .collect::<HashMap<_, _>>();
                Ok(ReadPlan::per_path(starts, upto))
            }
        }
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
        let from = from.max(plan.start);
        let mut msgs = Vec::new();
        let scan = self.scan(
            pattern.key_id(),
            from,
            upto.0,
            CHUNK,
            limit,
            |seq, ts, env| {
                let path = env.token_path();
                let kept = pattern.matches(&path) && plan.admits(seq, &path_bytes(&path), ts);
                if kept {
                    msgs.push(Stored {
                        seq: Seq(seq),
                        envelope: env,
                    });
                }
                kept
            },
        );
        let last = self.block(scan)?;
        Ok(ReadChunk {
            msgs,
            next: last.saturating_add(1),
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

    /// Reads no further than `limit`: at most `limit.msgs` paths are read, and a value past
    /// its bytes ends the chunk. A QoS ≥ 1 subscription asks for what its credit takes;
    /// cutting a whole chunk instead read up to a chunk's worth of values (one NATS request
    /// each) for every credit window — with credit 1, every remaining value once per
    /// acknowledgement.
    fn retained_limited(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: Seq,
        limit: super::ReadLimit,
    ) -> Result<ReadChunk, StoreError> {
        let inner = &self.inner;
        let rp = retained_prefix(&inner.prefix);
        // Which paths have a retained value, and its sequence, as the ordered read of the
        // stream decided it (the highest sequence wins), up to `upto` — which this relay
        // has read, so its ledger has it. No consumer: one direct read per path.
        // Which of them the pattern matches is checked in sequence order, and only until
        // the message cap is reached (the subject match is the costly part per value).
        let mut in_range: Vec<(Arc<str>, u64)> = lock(&inner.ledger)
            .retained_under(&format!("{}.", pattern.key_id()))
            .into_iter()
            .filter(|(_, seq)| (from..=upto.0).contains(seq))
            .collect();
        in_range.sort_unstable_by_key(|(_, seq)| *seq);
        let filters = crate::cluster::pattern_subjects("x", pattern);
        let cap = limit.msgs.max(1);
        let mut current: Vec<(String, u64)> = Vec::new();
        // Paths past the message cap are not read: the chunk ends before the first of them.
        let mut past_cap = None;
        for (k, seq) in in_range {
            if current.len() == cap {
                past_cap = Some(seq);
                break;
            }
            let subject = format!("x.{k}");
            if filters.iter().any(|f| subject_matches(f, &subject)) {
                current.push((k.to_string(), seq));
            }
        }
        let done = ReadChunk {
            msgs: Vec::new(),
            next: upto.0 + 1,
        };
        if current.is_empty() {
            return Ok(done);
        }
        self.block(async {
            let kept = inner
                .js
                .get_stream_no_info(&inner.retained_stream)
                .await
                .map_err(|e| unavailable("retained stream", e))?;
            let main = inner
                .js
                .get_stream_no_info(&inner.stream)
                .await
                .map_err(|e| unavailable("stream", e))?;
            // One path's value: the retained stream's when it is the current one, else the
            // message itself from the main stream (the accepting relay's write is on its
            // way, or lost a race it is retrying).
            let one = |key: String, seq: u64| {
                let (kept, main, rp) = (&kept, &main, &rp);
                async move {
                    inner.counters.rows_read.fetch_add(1, Relaxed);
                    let subject = format!("{rp}.{key}");
                    let stored = match kept.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => header_u64(Some(&m.headers), SEQ_HEADER)
                            .filter(|s| *s == seq)
                            .map(|_| m.payload),
                        Err(e) => {
                            use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
                            if e.kind() != K::NoMessageFound {
                                return Err(unavailable("retained read", e));
                            }
                            None
                        }
                    };
                    let payload = match stored {
                        Some(p) => Some(p),
                        None => match main.get_raw_message(seq).await {
                            Ok(m) => Some(m.payload),
                            Err(e) => {
                                tracing::debug!(error = %e, seq, "cluster store: retained value gone");
                                None
                            }
                        },
                    };
                    Ok(payload
                        .and_then(|p| Envelope::from_bytes(p).ok())
                        .filter(|env| pattern.matches(&env.token_path()))
                        .map(|env| Stored {
                            seq: Seq(seq),
                            envelope: env,
                        }))
                }
            };
            // Many paths: several direct reads in flight at once (within READ_TIMEOUT), in
            // sequence order; the chunk ends after READ_CHUNK_BYTES of envelopes.
            let mut reads = futures_util::stream::iter(current)
                .map(|(key, seq)| async move { (seq, one(key, seq).await) })
                .buffered(RETAINED_READS);
            let (mut msgs, mut bytes) = (Vec::new(), 0usize);
            while let Some((seq, r)) = reads.next().await {
                if let Some(s) = r? {
                    let len = s.envelope.len();
                    if !limit.takes(msgs.len(), bytes, len) {
                        // Over the byte allowance: read again from it next time.
                        return Ok(ReadChunk { msgs, next: seq });
                    }
                    bytes += len;
                    msgs.push(s);
                }
                if bytes >= super::READ_CHUNK_BYTES {
                    return Ok(ReadChunk {
                        msgs,
                        next: seq + 1,
                    });
                }
            }
            Ok(match past_cap {
                Some(next) => ReadChunk { msgs, next },
                None => ReadChunk { msgs, ..done },
            })
        })
    }

    fn durable(&self, key: &DurableKey) -> Result<Option<u64>, StoreError> {
        self.floor_of(key, None)
    }

    fn durable_for(
        &self,
        key: &DurableKey,
        owner: Option<&str>,
    ) -> Result<Option<u64>, StoreError> {
        self.floor_of(key, Some(owner.map(owner_tag)))
    }

    fn durable_abandoned(&self, key: &DurableKey, owner: Option<&str>) {
        let k = Self::durable_key(key);
        self.creator_gives_up(&k, &owner.map(owner_tag));
    }

    fn delete_durable(&self, key: &DurableKey) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let k = Self::durable_key(key);
        // The caller holds the name: no floor of it is queued after this one, dropped.
        lock(&inner.dirty).remove(&k);
        let (i, kk) = (inner.clone(), k.clone());
        let r = match self.on_runtime(Duration::from_secs(10), async move {
            delete_record(&i, &kk).await
        }) {
            Some(r) => r,
            None if tokio::runtime::Handle::try_current().is_err() => {
                self.block(delete_record(inner, &k))
            }
            None => Err(StoreError::Unavailable(
                "the JetStream store deletes durables on the multi-threaded runtime only".into(),
            )),
        };
        let (existed, marker) = r?;
        gone_here(inner, &k, marker, false);
        Ok(existed)
    }

    fn take_gone(&self) -> Option<mpsc::UnboundedReceiver<DurableKey>> {
        let mut slot = lock(&self.inner.gone_tx);
        if slot.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        *slot = Some(tx);
        Some(rx)
    }

    fn durable_owner(&self, key: &DurableKey, owner: Option<&str>) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let k = Self::durable_key(key);
        let want = owner.map(owner_tag);
        let have = match self.read_durable(&k)? {
            None if !lock(&inner.durables).contains_key(&k) => {
                // New: the owner goes into the record `set_durable` creates. The name is
                // reserved for the first owner on its way to create it: another owner's
                // `Sub` meanwhile is `busy` (retryable) and changes nothing — keyed by name
                // alone, the last one's owner was written into the first one's creation.
                let now = std::time::Instant::now();
                let mut creating = lock(&inner.creating);
                match creating.get_mut(&k) {
                    Some(c) if c.until > now && c.owner != want => {
                        return Err(being_created(key));
                    }
                    Some(c) if c.until > now => {
                        c.until = now + CREATION_TTL;
                        c.pending = c.pending.saturating_add(1);
                        return Ok(true);
                    }
                    _ => {}
                }
                if creating.len() >= PENDING_CREATIONS {
                    // Entries of `Sub`s that failed before creating (a hold, a read) expire;
                    // one in flight is never dropped (its durable would be created with no
                    // owner, for anyone to adopt).
                    creating.retain(|_, c| c.until > now);
                    if creating.len() >= PENDING_CREATIONS {
                        return Err(StoreError::Busy(
                            "too many durable subscriptions are being created; try again".into(),
                        ));
                    }
                }
                creating.insert(
                    k,
                    Creating {
                        owner: want,
                        until: now + CREATION_TTL,
                        pending: 1,
                    },
                );
                return Ok(true);
            }
            rec => rec
                .and_then(|r| r.owner)
                .or_else(|| lock(&inner.owners).get(&k).map(|o| o.tag.clone())),
        };
        let adopt = match (have, &want) {
            (Some(h), Some(w)) if h == *w => false,
            (Some(_), _) => return Err(not_yours(key)),
            (None, None) => false,
            (None, Some(_)) => true,
        };
        // The durable exists, and this `Sub` may have it — also while a `Sub` of another
        // owner that found the name new here is on its way to create it (or failed on its
        // way, its entry left until it expires): each `Sub`'s read under its hold checks
        // its own owner (`durable_for`), so the durable's owner is not kept `busy` here.
        if let (true, Some(w)) = (adopt, want) {
            // A durable created without an owner is adopted by the first one to name
            // one (as the auth-state file does); written with its next floor.
            adopt_here(inner, &k, w);
        }
        Ok(true)
    }

    fn claim_key(&self, key_id: &KeyId, group: &str, create: bool) -> Result<Claim, StoreError> {
        let want = group_tag(group);
        let k = hex::encode(key_id.as_bytes());
        let known = lock(&self.inner.claims).get(&k).cloned();
        let (have, new) = match known {
            Some(have) => (have, false),
            None => {
                let subject = format!("{}.{k}", claim_prefix(&self.inner.prefix));
                let (js, stream) = (self.inner.js.clone(), self.inner.claim_stream.clone());
                let tag = want.clone();
                let r = self.on_runtime(Duration::from_secs(5), async move {
                    write_claim(&js, &stream, subject, create.then_some(tag)).await
                });
                // Off the multi-threaded runtime (in-process uses): the relay's own claims.
                let Some(r) = r else {
                    return Ok(Claim::NotShared);
                };
                let Some((have, new)) = r? else {
                    return Ok(Claim::Unclaimed);
                };
                lock(&self.inner.claims).insert(k, have.clone());
                (have, new)
            }
        };
        Ok(if have == want {
            Claim::Ours { new }
        } else {
            Claim::Others
        })
    }

    fn hold_durable(&self, key: &DurableKey, lost: &HoldLost) -> Result<(), StoreError> {
        let k = Self::durable_key(key);
        let leases = self.inner.leases.clone();
        let lost = lost.clone();
        let key = key.clone();
        let r = self.on_runtime(Duration::from_secs(5), async move {
            leases.take(&k, &key, &lost).await
        });
        // Off the multi-threaded runtime (in-process uses): the relay's own rule only.
        r.unwrap_or(Ok(()))
    }

    fn release_hold(&self, key: &DurableKey) {
        let k = Self::durable_key(key);
        // Held until its floors are in the stream: a floor whose conditional write meets a
        // record changed meanwhile is written again over it as the holder's (while the
        // hold was forgotten at once, it was dropped: duplicates on resume).
        if let Some(holder) = self.inner.leases.begin_release(&k) {
            // The record's time is the idle clock: rewritten at the release (before the
            // hold is given back, so no sweep can take the name in between).
            let touch = self.inner.idle_ms > 0 && lock(&self.inner.records).contains_key(&k);
            let inner = self.inner.clone();
            self.inner.rt.spawn(async move {
                // The hold goes back once this relay's floors of the durable are in the
                // stream (or after 5 s: a floor landing after another relay's holder
                // deleted the durable then fails, conditional on the record it replaces).
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let flushed = inner.flushed.notified();
                        if pending_floor(&inner, &k).is_none() {
                            break;
                        }
                        flushed.await;
                    }
                })
                .await;
                if touch && inner.leases.holds(&k) {
                    let _ = tokio::time::timeout(Duration::from_secs(5), touch_record(&inner, &k))
                        .await;
                }
                // Not when lost, or taken again here, meanwhile.
                if let Some(seq) = inner.leases.finish_release(&k, &holder) {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), inner.leases.release(&k, seq))
                            .await;
                }
            });
        }
    }

    fn set_durable(&self, key: &DurableKey, floor: u64, tenant: &Tenant) -> Result<(), StoreError> {
        let k = Self::durable_key(key);
        let tag = tenant_tag(tenant);
        {
            // A new name counts against the tenant's durable quota, as with SQLite; the
            // ledger learns every relay's names from the durable stream.
            let mut l = lock(&self.inner.ledger);
            if !l.has_durable(&k) && !lock(&self.inner.durables).contains_key(&k) {
                let need = Need {
                    durables: 1,
                    ..Need::default()
                };
                if let Err((by, e)) = l.check(&tag, &need) {
                    self.inner.counters.quota.count(by);
                    drop(l);
                    // This `Sub` is not creating it any more; another of its owner may.
                    lock(&self.inner.creators).remove(&k);
                    creation_done(&self.inner, &k);
                    return Err(e);
                }
                // Counted as in flight until it is created (or not): the creation waits
                // for NATS with the ledger unlocked, and concurrent `Sub`s creating other
                // names for this tenant must see it meanwhile (review 28 finding 4: they
                // all passed the check together, past every durable quota).
                let pending = l.begin(&tag, &need);
                drop(l);
                // Created before the `SubOk`, not written behind: a client that moves to
                // another relay at once finds it there (with its owner).
                let created = self.create_durable(&k, floor, &tag);
                {
                    let mut l = lock(&self.inner.ledger);
                    l.finish(pending, None);
                    if created.is_ok() {
                        l.add_durable(&k, &tag);
                    }
                }
                created?;
                let mut fresh = lock(&self.inner.fresh);
                if fresh.len() >= PENDING_CREATIONS {
                    fresh.clear();
                }
                fresh.insert(k.clone());
                drop(fresh);
                lock(&self.inner.names).insert(k.clone(), key.clone());
                let mut d = lock(&self.inner.durables);
                let e = d.entry(k).or_insert(floor);
                *e = (*e).max(floor);
                return Ok(());
            }
        }
        {
            let mut d = lock(&self.inner.durables);
            let e = d.entry(k.clone()).or_insert(floor);
            *e = (*e).max(floor);
        }
        if lock(&self.inner.fresh).remove(&k) {
            return self.write_durable_now(&k, floor, &tag);
        }
        lock(&self.inner.dirty).insert(k, (floor, tag));
        self.inner.flush.notify_one();
        Ok(())
    }

    fn status(&self) -> StoreStatus {
        let inner = &self.inner;
        let last = inner.last.load(Relaxed);
        let connected = inner.client.connection_state() == async_nats::connection::State::Connected;
        let (total, tenants, durables) = {
            let mut l = lock(&inner.ledger);
            l.expire(now_ms());
            (l.total(), l.tenants(), l.durable_count())
        };
        StoreStatus {
            kind: self.kind().into(),
            retention: inner.retention,
            last_seq: last,
            committed_seq: last,
            durables: durables.max(lock(&inner.durables).len() as u64),
            messages: total.msgs,
            bytes: total.bytes,
            path_count: total.paths,
            retained: total.retained,
            tenants,
            state: if connected { "ok" } else { "unavailable" }.into(),
            ..StoreStatus::default()
        }
    }

    fn metrics(&self) -> StoreMetrics {
        let c = &self.inner.counters;
        StoreMetrics {
            appends: c.appends.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            commit_failures: c.failures.load(Relaxed),
            live_only: c.live_only.load(Relaxed),
            busy_rejections: c.busy.load(Relaxed),
            rows_read: c.rows_read.load(Relaxed),
            retained_confirms: c.retained_confirms.load(Relaxed),
            retained_repairs: c.retained_repairs.load(Relaxed),
            quota_tenant_rejections: c.quota.get().0,
            quota_global_rejections: c.quota.get().1,
            quota_reserve_rejections: c.quota.get().2,
            ..StoreMetrics::default()
        }
    }

    fn close(&self) {
        self.inner.flush.notify_one();
        // Graceful shutdown: the holds this relay still has are given back (called off the
        // runtime, from the blocking pool).
        let leases = self.inner.leases.clone();
        let (done, released) = std::sync::mpsc::channel::<()>();
        self.inner.rt.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), leases.release_all()).await;
            let _ = done.send(());
        });
        // Waits unless this thread is the only one that could run the release.
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if flavor.ok() != Some(tokio::runtime::RuntimeFlavor::CurrentThread) {
            let _ = released.recv_timeout(Duration::from_secs(3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nats-server issue 4320 was fixed in 2.9.21: older versions get the startup warning.
    #[test]
    fn versions_before_2_9_21_do_not_check_writes_in_flight() {
        for v in ["2.9.10", "2.9.20", "2.8.4", "1.4.1"] {
            assert!(!checks_in_flight_writes(v), "{v}");
        }
        for v in [
            "2.9.21",
            "2.10.0",
            "2.10.0-beta.1",
            "2.11.3",
            "3.0.0",
            "",
            "dev",
        ] {
            assert!(checks_in_flight_writes(v), "{v}");
        }
    }

    /// The sweep follows the shorter of the idle time and the marker keep time (a short
    /// keep time is purged in time even when durables never idle out), 100 ms to 60 s.
    #[test]
    fn the_sweep_interval_follows_the_shorter_of_idle_and_keep() {
        let day = 24 * 3600 * 1000;
        assert_eq!(sweep_every(7 * day, day), Duration::from_secs(60));
        assert_eq!(sweep_every(0, day), Duration::from_secs(60));
        assert_eq!(sweep_every(0, 2_000), Duration::from_millis(500));
        assert_eq!(sweep_every(1_500, day), Duration::from_millis(375));
        assert_eq!(sweep_every(day, 1_000), Duration::from_millis(250));
        assert_eq!(sweep_every(0, 1), Duration::from_millis(100));
    }
}
