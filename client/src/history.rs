//! [`LocalHistory`]: a plugin that keeps the decrypted messages of chosen topics in a local
//! SQLite file, queryable by topic filter and time range.
//!
//! It runs where the keys are — the relay only ever stores ciphertext — so the file holds
//! **plaintext**: keep it where you would keep the keys (it is created with mode 0600 on
//! Unix). Each message is kept once (by tree, sender and message id), however often it is
//! delivered or replayed, with the tree and epoch whose key opened it and the provenance of
//! that key's grant. A client may hold grants of several trees whose topics overlap (each
//! subscription is bound to one tree, PROTOCOL §4.11): [`LocalHistory::query_in`] reads
//! one tree's messages only, as a subscription bound to it would have received them.
//!
//! What is kept is bounded ([`Retention`]): by default the last 100,000 messages and 256 MiB
//! of payloads, the oldest received evicted first — any member may publish on a kept topic,
//! up to 16 MiB a message. [`LocalHistory::query`] returns every match, so at most that
//! much; [`LocalHistory::query_limited`] returns at most a given number.
//!
//! ```no_run
//! # async fn demo(broker: whispeer::Broker) -> Result<(), Box<dyn std::error::Error>> {
//! use whispeer::history::LocalHistory;
//! let history = LocalHistory::open("./history.sqlite", ["sensor/#"])?;
//! // `.with(history.clone())` on a client or broker builder, then later:
//! let last_hour = history.query("sensor/+/temp", whispeer::now_ms() - 3_600_000..)?;
//! for m in &last_hour {
//!     let celsius: f64 = m.decode()?;
//!     println!("{} {} {celsius}", m.timestamp_ms, m.topic);
//! }
//! # Ok(()) }
//! ```

use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};
use serde::de::DeserializeOwned;
use thiserror::Error;
use whispeer_protocol::{Provenance, Scope, SenderId, Topic, TopicError, TopicFilter, TreeId};

use crate::core::Received;
use crate::error::ReceiveError;
use crate::plugin::{Plugin, Verdict};

/// `application_id` of a local history file ("wsph").
const APPLICATION_ID: i64 = 0x7773_7068;

/// Why the local history could not be opened or read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// A topic filter is invalid.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The SQLite file could not be opened, created or read.
    #[error("local history {path}: {reason}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        reason: String,
    },
}

/// A message kept by [`LocalHistory`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// The topic.
    pub topic: String,
    /// The sender's timestamp, Unix milliseconds (what time ranges select on).
    pub timestamp_ms: u64,
    /// The verified sender, `None` for unsigned messages.
    pub sender: Option<SenderId>,
    /// The content type (a type tag for typed topics).
    pub content_type: String,
    /// The decrypted payload.
    pub payload: Vec<u8>,
    /// The tree whose key opened it.
    pub tree_id: TreeId,
    /// The key epoch it was sealed under (`None`: kept by a version that did not record
    /// it).
    pub epoch: Option<u64>,
    /// How the grant whose key opened it was held (`None`: kept by a version that did not
    /// record it).
    pub provenance: Option<Provenance>,
}

impl HistoryEntry {
    /// Decodes a CBOR payload (plain or tagged) as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ReceiveError> {
        if !crate::tag::is_cbor(&self.content_type) {
            return Err(ReceiveError::ContentType {
                expected: crate::tag::CBOR,
                found: self.content_type.clone(),
            });
        }
        ciborium::from_reader(&self.payload[..]).map_err(|e| ReceiveError::Decode {
            topic: self.topic.clone(),
            reason: e.to_string(),
            source: Some(Arc::new(e)),
        })
    }
}

/// How much a [`LocalHistory`] keeps: at most `max_messages` messages and `max_bytes` bytes
/// of payloads. Past either, the messages received first are deleted (the order they were
/// kept in, not their timestamps, which their senders chose); a message whose payload alone
/// is over `max_bytes` is not kept. [`Retention::default`] is what [`LocalHistory::open`]
/// uses: [`Retention::DEFAULT_MAX_MESSAGES`] and [`Retention::DEFAULT_MAX_BYTES`].
///
/// The bound is kept by the handles of one [`LocalHistory::open`] (and their clones):
/// messages another process writes to the same file are counted from the next open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    max_messages: u64,
    max_bytes: u64,
}

impl Retention {
    /// Messages kept by default: 100,000.
    pub const DEFAULT_MAX_MESSAGES: u64 = 100_000;
    /// Bytes of payloads kept by default: 256 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

    /// No bound at all: every message is kept until you delete the file (the behaviour
    /// before retention existed; any member of a kept topic can then fill the disk).
    pub fn unlimited() -> Self {
        Retention {
            max_messages: u64::MAX,
            max_bytes: u64::MAX,
        }
    }

    /// At most `n` messages.
    pub fn max_messages(mut self, n: u64) -> Self {
        self.max_messages = n;
        self
    }

    /// At most `bytes` bytes of payloads.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The bound on messages.
    pub fn messages(&self) -> u64 {
        self.max_messages
    }

    /// The bound on bytes of payloads.
    pub fn bytes(&self) -> u64 {
        self.max_bytes
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_messages: Self::DEFAULT_MAX_MESSAGES,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

/// The connection and what it holds (kept to [`Retention`]).
struct Store {
    conn: Connection,
    /// Messages in the file.
    count: u64,
    /// Bytes of payloads in the file.
    bytes: u64,
}

/// Keeps the decrypted messages of chosen topics in a local SQLite file; add it to a client
/// or broker with `.with(history.clone())` and query the clone you kept.
#[derive(Clone)]
pub struct LocalHistory {
    store: Arc<Mutex<Store>>,
    filters: Arc<Vec<TopicFilter>>,
    path: PathBuf,
    retention: Retention,
}

impl std::fmt::Debug for LocalHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHistory")
            .field("path", &self.path)
            .field("filters", &self.filters)
            .field("retention", &self.retention)
            .finish()
    }
}

impl LocalHistory {
    /// Opens (or creates) the file at `path`, keeping messages on topics matching any of
    /// `filters` (e.g. `["sensor/#", "chat/lobby"]`), within [`Retention::default`].
    pub fn open<S: AsRef<str>>(
        path: impl AsRef<Path>,
        filters: impl IntoIterator<Item = S>,
    ) -> Result<Self, HistoryError> {
        Self::open_with(path, filters, Retention::default())
    }

    /// [`LocalHistory::open`] keeping at most what `retention` allows. A file holding more
    /// (kept before, or with a larger bound) is cut down to it when the next message is
    /// kept.
    pub fn open_with<S: AsRef<str>>(
        path: impl AsRef<Path>,
        filters: impl IntoIterator<Item = S>,
        retention: Retention,
    ) -> Result<Self, HistoryError> {
        let path = path.as_ref().to_owned();
        let filters = filters
            .into_iter()
            .map(|f| TopicFilter::new(f.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let err = |e: rusqlite::Error| HistoryError::Store {
            path: path.clone(),
            reason: e.to_string(),
        };
        // Unix: created owner-only (0600, whatever the umask; the file holds plaintext), and
        // a symbolic link, a file not regular, another user's or one writable by others is
        // refused, as the client state file is (`persist::guard`).
        #[cfg(unix)]
        let conn = {
            let file = crate::persist::guard::prepare(&path).map_err(|r| {
                let (p, reason) = match r {
                    crate::persist::guard::Refused::Unsafe(p, why) => {
                        (p, format!("{why}; refusing to use it"))
                    }
                    crate::persist::guard::Refused::Io(p, e) => (p, e.to_string()),
                };
                HistoryError::Store { path: p, reason }
            })?;
            Connection::open_with_flags(
                &file,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
            )
            .map_err(err)?
        };
        #[cfg(not(unix))]
        let conn = Connection::open(&path).map_err(err)?;
        let app: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(err)?;
        if app != 0 && app != APPLICATION_ID {
            return Err(HistoryError::Store {
                path,
                reason: format!("not a whispeer local history (application_id {app:#x})"),
            });
        }
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID};
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS messages (
                 tree BLOB NOT NULL, sender BLOB NOT NULL, msg_id BLOB NOT NULL,
                 topic TEXT NOT NULL, ts INTEGER NOT NULL,
                 content_type TEXT NOT NULL, payload BLOB NOT NULL,
                 UNIQUE (tree, sender, msg_id));
             CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts);"
        ))
        .map_err(err)?;
        // Files written before epochs and provenance were kept gain the columns (NULL for
        // the messages already there).
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('messages')")
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(err)?;
        for (name, ty) in [
            ("epoch", "INTEGER"),
            ("prov", "TEXT"),
            ("prov_detail", "TEXT"),
        ] {
            if !columns.iter().any(|c| c == name) {
                conn.execute_batch(&format!("ALTER TABLE messages ADD COLUMN {name} {ty}"))
                    .map_err(err)?;
            }
        }
        // `length` of a blob reads its size, not its content.
        let (count, bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        Ok(LocalHistory {
            store: Arc::new(Mutex::new(Store {
                conn,
                count: u64::try_from(count).unwrap_or(0),
                bytes: u64::try_from(bytes).unwrap_or(0),
            })),
            filters: Arc::new(filters),
            path,
            retention,
        })
    }

    /// What this history keeps at most.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The messages on topics matching `filter` whose sender timestamp is in `range`
    /// (Unix milliseconds; `..` for all), oldest first — of every tree: with grants of
    /// several trees overlapping `filter`, use [`LocalHistory::query_in`] (or check each
    /// entry's `tree_id`), as another tree's admin can write on the same topic names.
    ///
    /// Every match, read into memory: at most what the [`Retention`] keeps (by default
    /// 100,000 messages, 256 MiB of payloads). [`LocalHistory::query_limited`] reads at
    /// most a given number.
    pub fn query(
        &self,
        filter: &str,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.query_where(None, filter, range, usize::MAX)
    }

    /// [`LocalHistory::query`] returning at most the first `limit` matches (oldest first).
    pub fn query_limited(
        &self,
        filter: &str,
        range: impl RangeBounds<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.query_where(None, filter, range, limit)
    }

    /// [`LocalHistory::query`] restricted to the messages tree `tree_id`'s key opened.
    pub fn query_in(
        &self,
        tree_id: TreeId,
        filter: &str,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.query_where(Some(tree_id), filter, range, usize::MAX)
    }

    /// [`LocalHistory::query_in`] returning at most the first `limit` matches.
    pub fn query_in_limited(
        &self,
        tree_id: TreeId,
        filter: &str,
        range: impl RangeBounds<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.query_where(Some(tree_id), filter, range, limit)
    }

    fn query_where(
        &self,
        tree_id: Option<TreeId>,
        filter: &str,
        range: impl RangeBounds<u64>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let filter = TopicFilter::new(filter)?;
        let lo = match range.start_bound() {
            Bound::Included(v) => *v,
            Bound::Excluded(v) => v.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(v) => *v,
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(v) => v - 1,
            Bound::Unbounded => u64::MAX,
        };
        let err = |e: rusqlite::Error| HistoryError::Store {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = store
            .conn
            .prepare_cached(
                "SELECT topic, ts, sender, content_type, payload, tree, epoch, prov, prov_detail
                 FROM messages
                 WHERE ts >= ?1 AND ts <= ?2 AND (?3 IS NULL OR tree = ?3)
                 ORDER BY ts, rowid",
            )
            .map_err(err)?;
        let tree_param = tree_id.map(|t| t.0.to_vec());
        let rows = st
            .query_map(params![to_i64(lo), to_i64(hi), tree_param], |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ),
                    (
                        r.get::<_, Vec<u8>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                        r.get::<_, Option<String>>(8)?,
                    ),
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let ((topic, ts, sender, content_type, payload), (tree, epoch, prov, detail)) =
                row.map_err(err)?;
            let Ok(tree) = <[u8; 16]>::try_from(tree.as_slice()) else {
                continue; // not written by this plugin
            };
            let matches = Topic::new(topic.as_str()).is_ok_and(|t| filter.matches(&t));
            if !matches {
                continue;
            }
            // Unsigned messages are kept with an empty sender (unique with their id).
            let sender = <[u8; 32]>::try_from(sender.as_slice())
                .ok()
                .and_then(|b| SenderId::from_bytes(&b).ok());
            out.push(HistoryEntry {
                topic,
                timestamp_ms: u64::try_from(ts).unwrap_or(0),
                sender,
                content_type,
                payload,
                tree_id: TreeId(tree),
                epoch: epoch.and_then(|e| u64::try_from(e).ok()),
                provenance: prov.and_then(|k| provenance_from(&k, detail.as_deref())),
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn keep(&self, msg: &Received) -> Result<(), rusqlite::Error> {
        let size = msg.payload.len() as u64;
        if size > self.retention.max_bytes || self.retention.max_messages == 0 {
            tracing::warn!(
                path = %self.path.display(),
                size,
                "local history: a message larger than the retention bound is not kept"
            );
            return Ok(());
        }
        let (prov_kind, prov_detail) = provenance_columns(&msg.provenance);
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let added = store
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO messages
                 (tree, sender, msg_id, topic, ts, content_type, payload, epoch, prov, prov_detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                &msg.tree_id.0[..],
                msg.sender
                    .map(|s| s.to_bytes().to_vec())
                    .unwrap_or_default(),
                &msg.msg_id.0[..],
                msg.topic.as_str(),
                to_i64(msg.ts_ms),
                &msg.content_type,
                &msg.payload[..],
                to_i64(msg.epoch),
                prov_kind,
                prov_detail,
            ])?;
        if added > 0 {
            store.count += 1;
            store.bytes += size;
        }
        self.evict(&mut store)
    }

    /// Deletes the messages kept first until the file is within the retention bound.
    fn evict(&self, store: &mut Store) -> Result<(), rusqlite::Error> {
        let Retention {
            max_messages,
            max_bytes,
        } = self.retention;
        if store.count <= max_messages && store.bytes <= max_bytes {
            return Ok(());
        }
        let (mut count, mut bytes) = (store.count, store.bytes);
        let mut last = None;
        {
            let mut st = store
                .conn
                .prepare_cached("SELECT rowid, length(payload) FROM messages ORDER BY rowid")?;
            let mut rows = st.query([])?;
            while count > max_messages || bytes > max_bytes {
                let Some(r) = rows.next()? else { break };
                last = Some(r.get::<_, i64>(0)?);
                count = count.saturating_sub(1);
                bytes = bytes.saturating_sub(u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0));
            }
        }
        if let Some(last) = last {
            store
                .conn
                .prepare_cached("DELETE FROM messages WHERE rowid <= ?1")?
                .execute([last])?;
        }
        (store.count, store.bytes) = (count, bytes);
        Ok(())
    }
}

/// A provenance as kept: its kind and, for derived and delegated grants, the scope or the
/// sender id as text.
fn provenance_columns(p: &Provenance) -> (&'static str, Option<String>) {
    match p {
        Provenance::AdminSigned => ("admin-signed", None),
        Provenance::Derived { from } => ("derived", Some(from.to_string())),
        Provenance::Delegated { by } => ("delegated", Some(by.to_string())),
        // A kind this build does not know: its description, read back as unknown.
        #[allow(unreachable_patterns)]
        other => ("other", Some(other.to_string())),
    }
}

/// The provenance kept as `kind` and `detail` (`None`: a kind or detail this build cannot
/// read).
fn provenance_from(kind: &str, detail: Option<&str>) -> Option<Provenance> {
    match (kind, detail) {
        ("admin-signed", _) => Some(Provenance::AdminSigned),
        ("derived", Some(d)) => {
            let from = if d == "#" {
                Scope::Tree
            } else if let Some(p) = d.strip_suffix("/#") {
                Scope::Subtree(Topic::new(p).ok()?)
            } else {
                Scope::Topic(Topic::new(d).ok()?)
            };
            Some(Provenance::Derived { from })
        }
        ("delegated", Some(d)) => Some(Provenance::Delegated {
            by: d.parse().ok()?,
        }),
        _ => None,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Plugin for LocalHistory {
    fn name(&self) -> &str {
        "local-history"
    }
    fn on_message(&self, msg: &mut Received) -> Verdict {
        if self.filters.iter().any(|f| f.matches(&msg.topic)) {
            if let Err(e) = self.keep(msg) {
                // Never lose a delivery because the local copy failed.
                tracing::warn!(path = %self.path.display(), error = %e, "local history: cannot keep message");
            }
        }
        Verdict::Deliver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whispeer_protocol::MessageId;

    /// The history file (plaintext) is created 0600 and, like the client state file, is
    /// not opened through a symbolic link nor used when writable by others (security
    /// review: it was created 0600 but then opened following links, anyone's file as is).
    #[cfg(unix)]
    #[test]
    fn the_history_file_is_owner_only_and_no_symbolic_link_is_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.db");
        drop(LocalHistory::open(&p, ["#"]).unwrap());
        let mode = |f: &Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let before = std::fs::read(&p).unwrap();
        let e = LocalHistory::open(&link, ["#"]).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o660)).unwrap();
        let e = LocalHistory::open(&p, ["#"]).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
    }

    fn received(tree: u8, epoch: u64, topic: &str, id: u8, provenance: Provenance) -> Received {
        Received {
            topic: Topic::new(topic).unwrap(),
            sender: None,
            msg_id: MessageId([id; 16]),
            ts_ms: 1_000 + u64::from(id),
            seq: 0,
            content_type: crate::core::OCTETS.into(),
            payload: bytes::Bytes::from(vec![id]),
            retained: false,
            tree_id: TreeId([tree; 16]),
            epoch,
            provenance,
        }
    }

    /// Entries carry the tree, epoch and provenance of the key that opened them, and a
    /// query can be restricted to one tree: another tree's admin writing on the same topic
    /// names does not show in it.
    #[test]
    fn entries_carry_their_tree_and_a_query_reads_one_tree() {
        let dir = tempfile::tempdir().unwrap();
        let h = LocalHistory::open(dir.path().join("h.sqlite"), ["alerts/#"]).unwrap();
        let derived = Provenance::Derived {
            from: Scope::Subtree(Topic::new("alerts").unwrap()),
        };
        let by = crate::Identity::generate().sender_id();
        for mut m in [
            received(1, 3, "alerts/fire", 1, derived.clone()),
            received(2, 0, "alerts/fire", 2, Provenance::AdminSigned),
            received(2, 0, "alerts/x", 3, Provenance::Delegated { by }),
        ] {
            h.on_message(&mut m);
        }
        assert_eq!(h.query("alerts/#", ..).unwrap().len(), 3);
        let a = h.query_in(TreeId([1; 16]), "alerts/#", ..).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            (
                a[0].tree_id,
                a[0].epoch,
                a[0].provenance.clone(),
                a[0].payload.clone()
            ),
            (TreeId([1; 16]), Some(3), Some(derived), vec![1])
        );
        let b = h.query_in(TreeId([2; 16]), "alerts/#", ..).unwrap();
        assert_eq!(
            b.iter()
                .map(|e| (e.payload[0], e.provenance.clone()))
                .collect::<Vec<_>>(),
            [
                (2, Some(Provenance::AdminSigned)),
                (3, Some(Provenance::Delegated { by }))
            ]
        );
        assert!(h.query_in(TreeId([9; 16]), "#", ..).unwrap().is_empty());
    }

    /// A message numbered `n` (its id and timestamp), with `len` payload bytes.
    fn numbered(n: u32, ts_ms: u64, len: usize) -> Received {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        let mut m = received(1, 0, "flood/x", 0, Provenance::AdminSigned);
        m.msg_id = MessageId(id);
        m.ts_ms = ts_ms;
        m.payload = bytes::Bytes::from(vec![n as u8; len]);
        m
    }

    fn ids(entries: &[HistoryEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.timestamp_ms).collect()
    }

    /// `open` keeps at most 100,000 messages by default, deleting the oldest received:
    /// a member flooding a kept topic cannot fill the disk (review F6; before, every
    /// message was kept).
    #[test]
    fn the_default_retention_bounds_what_open_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let h = LocalHistory::open(dir.path().join("h.sqlite"), ["#"]).unwrap();
        let n = 100_000u32;
        for i in 0..n + 5 {
            h.on_message(&mut numbered(i, u64::from(i), 1));
        }
        let all = h.query("#", ..).unwrap();
        assert_eq!(all.len(), n as usize);
        assert_eq!(all[0].timestamp_ms, 5, "the five received first are gone");
        assert_eq!(all.last().unwrap().timestamp_ms, u64::from(n + 4));
    }

    /// Retention by messages and by bytes, oldest received first whatever the timestamps
    /// say; a message over the byte bound alone is not kept; a reopened file keeps its
    /// count.
    #[test]
    fn retention_evicts_the_oldest_received_by_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let r = Retention::default().max_messages(3);
        assert_eq!((r.messages(), r.bytes()), (3, Retention::DEFAULT_MAX_BYTES));
        let h = LocalHistory::open_with(&path, ["#"], r).unwrap();
        assert_eq!(h.retention(), r);
        // The first claims a timestamp far in the future: still the first to go.
        h.on_message(&mut numbered(0, u64::MAX / 2, 1));
        for i in 1..5 {
            h.on_message(&mut numbered(i, u64::from(i), 1));
        }
        // A message delivered again is kept once and counted once.
        h.on_message(&mut numbered(4, 4, 1));
        assert_eq!(ids(&h.query("#", ..).unwrap()), [2, 3, 4]);
        drop(h);
        let h = LocalHistory::open_with(&path, ["#"], r).unwrap();
        h.on_message(&mut numbered(5, 5, 1));
        assert_eq!(ids(&h.query("#", ..).unwrap()), [3, 4, 5]);
        drop(h);

        // By bytes: 10 bytes hold two messages of 4.
        let r = Retention::unlimited().max_bytes(10);
        let h = LocalHistory::open_with(dir.path().join("b.sqlite"), ["#"], r).unwrap();
        for i in 0..4 {
            h.on_message(&mut numbered(i, u64::from(i), 4));
        }
        assert_eq!(ids(&h.query("#", ..).unwrap()), [2, 3]);
        h.on_message(&mut numbered(9, 9, 11));
        assert_eq!(
            ids(&h.query("#", ..).unwrap()),
            [2, 3],
            "11 bytes: not kept"
        );
        h.on_message(&mut numbered(10, 10, 10));
        assert_eq!(ids(&h.query("#", ..).unwrap()), [10]);
        // A smaller bound cuts an existing file down at the next message.
        drop(h);
        let r = Retention::unlimited().max_messages(1);
        let h = LocalHistory::open_with(&path, ["#"], r).unwrap();
        assert_eq!(h.query("#", ..).unwrap().len(), 3);
        h.on_message(&mut numbered(6, 6, 1));
        assert_eq!(ids(&h.query("#", ..).unwrap()), [6]);
    }

    /// `query_limited` reads at most `limit` matches, oldest first, skipping the rows the
    /// filter does not match.
    #[test]
    fn query_limited_returns_at_most_limit_matches() {
        let dir = tempfile::tempdir().unwrap();
        let h = LocalHistory::open(dir.path().join("h.sqlite"), ["#"]).unwrap();
        for (i, topic) in ["a/x", "b/x", "a/y", "a/z", "b/y"].iter().enumerate() {
            let mut m = numbered(i as u32, i as u64, 1);
            m.topic = Topic::new(*topic).unwrap();
            h.on_message(&mut m);
        }
        assert_eq!(ids(&h.query_limited("a/#", .., 2).unwrap()), [0, 2]);
        assert_eq!(ids(&h.query_limited("a/#", 1.., 10).unwrap()), [2, 3]);
        assert!(h.query_limited("#", .., 0).unwrap().is_empty());
        let t = TreeId([1; 16]);
        assert_eq!(ids(&h.query_in_limited(t, "b/#", .., 1).unwrap()), [1]);
        assert!(h
            .query_in_limited(TreeId([2; 16]), "#", .., 5)
            .unwrap()
            .is_empty());
        assert_eq!(h.query("#", ..).unwrap().len(), 5, "query: every match");
    }

    /// A file written before epochs and provenance were kept gains the columns; its old
    /// messages read back with their tree and no epoch or provenance.
    #[test]
    fn an_older_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID};
                 CREATE TABLE messages (
                     tree BLOB NOT NULL, sender BLOB NOT NULL, msg_id BLOB NOT NULL,
                     topic TEXT NOT NULL, ts INTEGER NOT NULL,
                     content_type TEXT NOT NULL, payload BLOB NOT NULL,
                     UNIQUE (tree, sender, msg_id));
                 INSERT INTO messages VALUES
                     (x'07070707070707070707070707070707', x'', x'01', 'a/b', 5,
                      'application/octet-stream', x'2a');"
            ))
            .unwrap();
        }
        let h = LocalHistory::open(&path, ["#"]).unwrap();
        let old = h.query_in(TreeId([7; 16]), "#", ..).unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!((old[0].epoch, old[0].provenance.clone()), (None, None));
        h.on_message(&mut received(7, 1, "a/c", 4, Provenance::AdminSigned));
        drop(h);
        // Opened again: no second migration, both rows there.
        let h = LocalHistory::open(&path, ["#"]).unwrap();
        let all = h.query_in(TreeId([7; 16]), "#", ..).unwrap();
        assert_eq!(
            all.iter().map(|e| e.epoch).collect::<Vec<_>>(),
            [None, Some(1)]
        );
    }
}
