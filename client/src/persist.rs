//! Client persistence: what must survive a client restart for at-least-once and
//! exactly-once to hold end to end.
//!
//! `Persistence::sqlite(path)` in the builder keeps, in one SQLite file (WAL):
//! - the **outbox**: every QoS ≥ 1 publish (the sealed `Pub` frame, publish id included)
//!   until the relay's `PubAck`; a restarted client re-sends them first, with the same
//!   publish ids, so the relay's dedup window recognises exactly-once re-sends;
//! - the **dedup window** of durable subscriptions: which `(tree, sender, msg_id)` each
//!   durable name already delivered, so a message redelivered after a crash (the relay's
//!   durable floor is at least once) is not delivered to the app twice.
//!
//! Durable *positions* live on the relay (the durable floor, persisted there); the client
//! resumes them by name. Only ciphertext frames and ids are written, never plaintext.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::options::Engine;
use crate::ClientBuilder;

/// `application_id` of a whispeer client state file ("wspc").
const APPLICATION_ID: i64 = 0x7773_7063;
const SCHEMA_VERSION: i64 = 1;

/// Why the client state file could not be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PersistError {
    /// SQLite failed (I/O, corruption, locked).
    #[error("client state file {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is a SQLite database of something else, or a newer schema.
    #[error("client state file {path} is not a whispeer client state file ({reason}); refusing to touch it")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
}

/// Where a client keeps its outbox and dedup window; give it to the builder with `.with(...)`.
#[derive(Debug, Clone)]
pub struct Persistence {
    pub(crate) path: PathBuf,
}

impl Persistence {
    /// A SQLite file (created if missing).
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Persistence { path: path.into() }
    }
}

impl Engine for Persistence {
    fn apply(self, b: &mut ClientBuilder) {
        b.persistence = Some(self);
    }
}

/// The open state file (used by the connection task only).
#[derive(Debug)]
pub(crate) struct Store {
    db: Connection,
    path: PathBuf,
    /// Entries kept per durable name in the dedup window.
    dedup_cap: i64,
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Store, PersistError> {
        let err = |source| PersistError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(err)?;
        let app: i64 = db
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(err)?;
        let version: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        let tables: i64 = db
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(err)?;
        let foreign = |reason: String| PersistError::Foreign {
            path: path.to_owned(),
            reason,
        };
        if app == 0 && tables == 0 {
            db.execute_batch(&format!(
                "PRAGMA journal_mode = WAL;
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};
                 CREATE TABLE outbox (pid BLOB PRIMARY KEY, ord INTEGER NOT NULL, frame BLOB NOT NULL);
                 CREATE TABLE dedup (name TEXT NOT NULL, key BLOB NOT NULL, ord INTEGER NOT NULL,
                                     PRIMARY KEY (name, key));
                 CREATE INDEX dedup_ord ON dedup (name, ord);"
            ))
            .map_err(err)?;
        } else if app != APPLICATION_ID {
            return Err(foreign(format!("application_id is {app:#x}")));
        } else if version != SCHEMA_VERSION {
            return Err(foreign(format!(
                "schema version {version}, expected {SCHEMA_VERSION}"
            )));
        }
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .map_err(err)?;
        Ok(Store {
            db,
            path: path.to_owned(),
            dedup_cap: 100_000,
        })
    }

    fn warn(&self, what: &str, e: rusqlite::Error) {
        tracing::error!(file = %self.path.display(), error = %e, "client state: {what} failed");
    }

    /// The unacknowledged publishes, oldest first.
    pub(crate) fn outbox(&self) -> Vec<([u8; 16], u64, Bytes)> {
        let load = || -> rusqlite::Result<Vec<([u8; 16], u64, Bytes)>> {
            let mut st = self
                .db
                .prepare("SELECT pid, ord, frame FROM outbox ORDER BY ord")?;
            let rows = st.query_map([], |r| {
                let pid: Vec<u8> = r.get(0)?;
                let ord: i64 = r.get(1)?;
                let frame: Vec<u8> = r.get(2)?;
                Ok((pid, ord, frame))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (pid, ord, frame) = row?;
                if let Ok(pid) = <[u8; 16]>::try_from(pid.as_slice()) {
                    out.push((pid, ord as u64, Bytes::from(frame)));
                }
            }
            Ok(out)
        };
        load().unwrap_or_else(|e| {
            self.warn("reading the outbox", e);
            Vec::new()
        })
    }

    pub(crate) fn keep(&self, pid: &[u8; 16], ord: u64, frame: &[u8]) {
        if let Err(e) = self.db.execute(
            "INSERT OR REPLACE INTO outbox (pid, ord, frame) VALUES (?1, ?2, ?3)",
            params![&pid[..], ord as i64, frame],
        ) {
            self.warn("keeping a publish", e);
        }
    }

    pub(crate) fn acked(&self, pid: &[u8; 16]) {
        if let Err(e) = self
            .db
            .execute("DELETE FROM outbox WHERE pid = ?1", params![&pid[..]])
        {
            self.warn("clearing a publish", e);
        }
    }

    /// True if `key` is new for the durable subscription `name` (and remembers it).
    pub(crate) fn first_delivery(&self, name: &str, key: &[u8]) -> bool {
        let run = || -> rusqlite::Result<bool> {
            let seen: Option<i64> = self
                .db
                .query_row(
                    "SELECT 1 FROM dedup WHERE name = ?1 AND key = ?2",
                    params![name, key],
                    |r| r.get(0),
                )
                .optional()?;
            if seen.is_some() {
                return Ok(false);
            }
            let ord: i64 = self.db.query_row(
                "SELECT coalesce(max(ord), 0) + 1 FROM dedup WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )?;
            self.db.execute(
                "INSERT INTO dedup (name, key, ord) VALUES (?1, ?2, ?3)",
                params![name, key, ord],
            )?;
            if ord % 1024 == 0 {
                self.db.execute(
                    "DELETE FROM dedup WHERE name = ?1 AND ord <= ?2",
                    params![name, ord - self.dedup_cap],
                )?;
            }
            Ok(true)
        };
        run().unwrap_or_else(|e| {
            self.warn("the dedup window", e);
            true // deliver: at least once beats losing a message
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_and_dedup_survive_reopening_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        {
            let s = Store::open(&p).unwrap();
            s.keep(&[1; 16], 1, b"frame-1");
            s.keep(&[2; 16], 2, b"frame-2");
            s.acked(&[1; 16]);
            assert!(s.first_delivery("billing", b"k1"));
            assert!(!s.first_delivery("billing", b"k1"));
            assert!(s.first_delivery("other", b"k1"), "per durable name");
        }
        let s = Store::open(&p).unwrap();
        let out = s.outbox();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].0, out[0].1, &out[0].2[..]),
            ([2; 16], 2, &b"frame-2"[..])
        );
        assert!(!s.first_delivery("billing", b"k1"));

        let foreign = dir.path().join("foreign.db");
        let db = Connection::open(&foreign).unwrap();
        db.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(db);
        let e = Store::open(&foreign).unwrap_err();
        assert!(matches!(e, PersistError::Foreign { .. }), "{e}");
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let e = Store::open(&garbage).unwrap_err();
        assert!(e.to_string().contains("garbage.db"), "{e}");
    }
}
