//! The store: where a publish is accepted, numbered, kept, and read back.
//!
//! The router calls [`Store::append`] under its routing lock, right before it fans the
//! message out, so sequence numbers are assigned in ONE place and every subscriber sees them
//! in increasing order. `append` must therefore be quick: a durable implementation queues
//! the write and commits it on its own thread (group commit), and reports durability
//! through [`Store::when_durable`] — that is what gates `PubAck` for QoS ≥ 1. A failure is
//! reported to the publisher as `Err(StoreFailed)` and the message is not delivered.
//!
//! Implementations:
//! - [`SqliteStore`] — SQLite (WAL, group commit on a writer thread), on a file (durable,
//!   the `serve` default) or in memory (same behaviour, nothing survives a restart).
//! - [`LiveStore`] — numbers messages and keeps nothing (live fan-out only; grants no
//!   delivery features).
//!
//! A store only ever sees what the relay can already see: the token path, sizes, flags,
//! publish ids, times, and the opaque envelope bytes.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use whispeer_protocol::frame::Replay;
use whispeer_protocol::{Envelope, KeyId, Qos, TokenPath, TokenPattern};

use crate::ids::Seq;

mod sqlite;

pub use sqlite::SqliteStore;

/// Why a store refused a message or could not be opened.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot take messages right now.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store file could not be opened or is not a usable whispeer store.
    #[error("{0}")]
    Open(String),
}

/// What the router hands the store: metadata plus the opaque envelope.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The route read from the envelope header.
    pub path: &'a TokenPath,
    /// The envelope exactly as published (opaque; a store keeps bytes, never opens them).
    pub envelope: &'a Envelope,
    /// The `Pub` frame's flags (`pub_flags`).
    pub flags: u64,
    /// The `Pub` frame's QoS.
    pub qos: Qos,
    /// The `Pub` frame's publish id, if any.
    pub publish_id: Option<[u8; 16]>,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A new message with this sequence: deliver it.
    New(Seq),
    /// A duplicate publish id inside the dedup window: the original's sequence. Not stored
    /// again and not delivered again.
    Duplicate(Seq),
}

/// Called once a sequence is durable (or the store failed).
pub type OnDurable = Box<dyn FnOnce(Result<(), StoreError>) + Send + 'static>;

/// A stored message read back.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its relay sequence.
    pub seq: Seq,
    /// The envelope as published.
    pub envelope: Envelope,
}

/// A resolved replay request: which stored messages a history read returns.
#[derive(Debug, Clone, Default)]
pub struct ReadPlan {
    /// First sequence to look at.
    pub start: u64,
    /// Only messages received at or after this Unix time (ms).
    pub since_ms: Option<u64>,
    /// Per path (raw bytes): the first sequence to return (`LastN`).
    pub path_starts: Option<HashMap<Vec<u8>, u64>>,
}

impl ReadPlan {
    /// Whether a stored message passes the plan's filters (the pattern is checked apart).
    pub fn admits(&self, seq: u64, path: &[u8], ts_ms: u64) -> bool {
        if seq < self.start {
            return false;
        }
        if let Some(since) = self.since_ms {
            if ts_ms < since {
                return false;
            }
        }
        match &self.path_starts {
            Some(starts) => starts.get(path).is_some_and(|s| seq >= *s),
            None => true,
        }
    }
}

/// One chunk of a history read.
#[derive(Debug, Clone, Default)]
pub struct ReadChunk {
    /// Matching messages, in sequence order.
    pub msgs: Vec<Stored>,
    /// Where the next chunk starts (past `upto` when the read is complete).
    pub next: u64,
}

/// A durable subscription's identity: the filter's key id (so trees never collide) and
/// the client-chosen name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DurableKey {
    /// The key id of the subscription's filter.
    pub key_id: KeyId,
    /// The name from `Sub.durable`.
    pub name: String,
}

/// Retention limits, per token path (0 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RetentionStatus {
    /// Most messages kept per path.
    pub max_messages: u64,
    /// Most envelope bytes kept per path.
    pub max_bytes: u64,
    /// Oldest message kept, in milliseconds.
    pub max_age_ms: u64,
}

/// One token path in `/status` (opaque: hex of key id and tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStatus {
    /// Key id and tokens, hex, 32 characters per element.
    pub path: String,
    /// Messages kept.
    pub messages: u64,
    /// Envelope bytes kept.
    pub bytes: u64,
    /// Oldest kept sequence.
    pub first_seq: u64,
    /// Newest kept sequence.
    pub last_seq: u64,
}

/// The store part of `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StoreStatus {
    /// `sqlite`, `memory` or `none`.
    pub kind: String,
    /// The database file (sqlite only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Database file + WAL size in bytes (sqlite only).
    pub file_bytes: u64,
    /// Retention limits per path.
    pub retention: RetentionStatus,
    /// Last sequence assigned.
    pub last_seq: u64,
    /// Last sequence committed.
    pub committed_seq: u64,
    /// Messages kept, all paths.
    pub messages: u64,
    /// Envelope bytes kept, all paths.
    pub bytes: u64,
    /// Paths with messages.
    pub path_count: u64,
    /// The largest paths (by bytes), at most 100.
    pub paths: Vec<PathStatus>,
    /// Retained values kept.
    pub retained: u64,
    /// Durable subscriptions known.
    pub durables: u64,
    /// Publish ids in the dedup window.
    pub dedup_entries: u64,
}

/// Store counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreMetrics {
    /// Messages appended.
    pub appends: u64,
    /// Duplicate publishes answered from the dedup window.
    pub duplicates: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Messages deleted by retention.
    pub trimmed: u64,
    /// Commit batch sizes: cumulative counts per bucket of [`BATCH_BUCKETS`], then count, sum.
    pub batch_buckets: Vec<u64>,
    /// Operations committed in all batches.
    pub batch_sum: u64,
    /// Commit latency: cumulative counts per bucket of [`COMMIT_BUCKETS`].
    pub commit_buckets: Vec<u64>,
    /// Total commit time, seconds.
    pub commit_seconds_sum: f64,
}

/// Upper bounds of the commit batch size histogram.
pub const BATCH_BUCKETS: [f64; 9] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
];
/// Upper bounds of the commit latency histogram, in seconds.
pub const COMMIT_BUCKETS: [f64; 12] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 1e-1, 1.0,
];

/// Accepts published messages, assigns their relay sequence numbers, keeps history,
/// retained values, durable positions and the publish-id dedup window.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// `sqlite`, `memory` or `none`.
    fn kind(&self) -> &'static str;
    /// Feature bits (`whispeer_protocol::frame::features`) this store supports.
    fn features(&self) -> u64 {
        0
    }
    /// Accepts one message (called under the routing lock): returns its sequence, strictly
    /// greater than every earlier one, or the original's for a duplicate publish id.
    fn append(&self, msg: Append<'_>) -> Result<Accepted, StoreError>;
    /// The last sequence assigned (`Seq(0)` before the first message).
    fn last_seq(&self) -> Seq;
    /// Runs `done` once every message up to `seq` is durable (immediately if it is).
    fn when_durable(&self, seq: Seq, done: OnDurable) {
        let _ = seq;
        done(Ok(()))
    }
    /// Resolves a replay request against what is stored, for messages up to `upto`.
    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: Seq,
    ) -> Result<ReadPlan, StoreError> {
        let _ = (pattern, replay);
        Ok(ReadPlan {
            start: upto.0 + 1,
            ..ReadPlan::default()
        })
    }
    /// Reads matching stored messages with sequence in `from..=upto` (a chunk; call again
    /// from `next` until `next > upto`). Blocking: call off the async runtime.
    fn read(
        &self,
        pattern: &TokenPattern,
        plan: &ReadPlan,
        from: u64,
        upto: Seq,
    ) -> Result<ReadChunk, StoreError> {
        let _ = (pattern, plan, from);
        Ok(ReadChunk {
            msgs: Vec::new(),
            next: upto.0 + 1,
        })
    }
    /// Retained values of every path the pattern matches, in sequence order.
    fn retained(&self, pattern: &TokenPattern) -> Vec<Stored> {
        let _ = pattern;
        Vec::new()
    }
    /// A durable subscription's acknowledged floor (every matching message up to it is
    /// acknowledged), if the durable exists.
    fn durable(&self, key: &DurableKey) -> Option<u64> {
        let _ = key;
        None
    }
    /// Records a durable subscription's floor (created if new; persisted write-behind).
    fn set_durable(&self, key: &DurableKey, floor: u64) {
        let _ = (key, floor);
    }
    /// `/status` details.
    fn status(&self) -> StoreStatus {
        StoreStatus {
            kind: self.kind().into(),
            last_seq: self.last_seq().0,
            committed_seq: self.last_seq().0,
            ..StoreStatus::default()
        }
    }
    /// `/metrics` counters.
    fn metrics(&self) -> StoreMetrics {
        StoreMetrics::default()
    }
    /// Flushes everything queued and closes (clean shutdown). Idempotent.
    fn close(&self) {}
}

/// Live fan-out only: assigns sequence numbers and keeps nothing (`store.kind = "none"`).
#[derive(Debug, Default)]
pub struct LiveStore {
    last: std::sync::atomic::AtomicU64,
}

impl LiveStore {
    /// A store starting at sequence 0.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for LiveStore {
    fn kind(&self) -> &'static str {
        "none"
    }

    fn append(&self, _msg: Append<'_>) -> Result<Accepted, StoreError> {
        use std::sync::atomic::Ordering;
        Ok(Accepted::New(Seq(self
            .last
            .fetch_add(1, Ordering::Relaxed)
            + 1)))
    }

    fn last_seq(&self) -> Seq {
        Seq(self.last.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The raw bytes of a token path: key id, then each token (16 bytes each).
pub fn path_bytes(path: &TokenPath) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 * (1 + path.tokens().len()));
    v.extend_from_slice(path.key_id().as_bytes());
    for t in path.tokens() {
        v.extend_from_slice(t.as_bytes());
    }
    v
}

/// Opens the store a configuration asks for (`default_kind` when it names none).
pub fn open(
    config: &crate::config::StoreConfig,
    default_kind: crate::config::StoreKind,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    use crate::config::StoreKind;
    Ok(match config.kind.unwrap_or(default_kind) {
        StoreKind::None => std::sync::Arc::new(LiveStore::new()),
        StoreKind::Memory => std::sync::Arc::new(SqliteStore::open_memory(config.clone())?),
        StoreKind::Sqlite => std::sync::Arc::new(SqliteStore::open_file(config.clone())?),
    })
}
