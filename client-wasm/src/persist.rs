//! The npm package's saved client state: the bytes the JS driver keeps in a file (Node) or
//! IndexedDB (browsers), encoded and checked here so no protocol logic lives in JS.
//!
//! The state is what the Rust client keeps in its SQLite file (`client/src/persist.rs`):
//! the QoS ≥ 1 outbox (sealed `Pub` frames with their publish ids, until `PubAck`), the
//! receive-dedup window (`(tree, sender, msg_id)` and expiry), the retained high-water
//! marks (`BLAKE3(tree id ‖ topic)`, timestamp, msg_id), the pinned tree admins
//! (`Keyring::export_pins`) and when epochs were superseded (`Keyring::superseded_epochs`).
//! Only ciphertext frames, ids and hashes: no plaintext, no topic names.
//!
//! Format: an append-only log. `MAGIC` (8 bytes: `wspjs` + NUL + version 2 + `\n`), then
//! records `len: u32 BE ‖ !len: u32 BE (its bitwise complement) ‖ body (len bytes) ‖
//! BLAKE3-derived 4-byte check of the body`. Version 1 (still read; a log is rewritten as
//! version 2 at the first start) had no `!len`. Body: a kind byte, then
//! - `1` keep: publish id (16) ‖ order (u64 BE) ‖ `Pub` frame (rest; a record whose frame is
//!   not a QoS ≥ 1 `Pub` of that publish id is skipped and counted, `Saved::refused_kept`);
//! - `2` acked: publish id (16);
//! - `3` seen: tree (16) ‖ sender or zeros (32) ‖ msg_id (16) ‖ expires unix ms (u64 BE);
//! - `4` retained: key (32) ‖ timestamp ms (u64 BE) ‖ msg_id (16);
//! - `5` pins: `Keyring::export_pins` bytes (rest; replaces earlier pins);
//! - `6` seen digest: the 16-byte digest the receiver's window holds of a `3` entry
//!   (`receive::Digest`, little-endian) ‖ expires unix ms (u64 BE) — what a snapshot
//!   writes, since the window keeps digests, not full keys;
//! - `7` forgot: the window's `forgot_upto` (u64 BE, Unix ms; `Guard::forgot_upto`) — the
//!   latest expiry among dedup entries a full window forgot for room; a snapshot writes it
//!   so a compacted state still refuses what they covered (the largest one read wins);
//! - `8` owed: dedup digest (16, little-endian) ‖ durable name (rest, UTF-8) — a message a
//!   subscription of that durable went away without taking while the window holds it as
//!   delivered (`ClientCore::dedup_untaken`): its next resume still gets it;
//! - `9` paid: digest (16) ‖ durable name — that durable took it;
//! - `10` owed forgotten: durable name — the durable was deleted;
//! - `11` superseded: tree (16) ‖ epoch (u64 BE) ‖ Unix ms (u64 BE) — when that epoch was
//!   superseded (`Keyring::superseded_epochs`; the earliest read wins), restored into the
//!   keyring at start so a restart does not restart the previous epoch's grace.
//!
//! Read in order, later records win. A last record cut short or failing its check is a
//! write torn by a crash and is ignored (the driver writes a record before it reports
//! what it covers, so nothing reported depends on it); anything else that does not parse
//! is a [`StateError`] — and the client does not start (`STATE`): never with an empty
//! dedup window in place of one it could not read. The length's complement is what tells
//! the two apart when a length is damaged: in version 1 a length changed in the middle of
//! the log to point past its end read as a torn last record, and everything after it was
//! dropped — dedup entries included (adversarial review, clients). Now a record header
//! whose two halves disagree is corruption wherever it is; a whole header is never what
//! a torn write leaves (it writes a prefix of the bytes). The driver compacts (rewrites
//! the log as a snapshot) at start and when the log has grown.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use whispeer::core::receive::{Change, DedupKey, Digest, RetainedKey};
use whispeer_protocol::TreeId;

/// The first bytes of a state log (format version 2).
pub const MAGIC: &[u8; 8] = b"wspjs\x00\x02\n";
/// The oldest format version read (records without the length's complement).
const FIRST_VERSION: u8 = 1;

const KEEP: u8 = 1;
const ACKED: u8 = 2;
const SEEN: u8 = 3;
const RETAINED: u8 = 4;
const PINS: u8 = 5;
const SEEN_DIGEST: u8 = 6;
const FORGOT: u8 = 7;
const OWED: u8 = 8;
const PAID: u8 = 9;
const OWED_FORGOTTEN: u8 = 10;
const SUPERSEDED: u8 = 11;

/// Largest record body accepted (a `Pub` frame is far smaller).
const MAX_BODY: usize = 64 << 20;

/// Why saved state cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateError {
    /// Not a whispeer state log (another file, or another program's data).
    #[error("not a whispeer client state (wrong header: {0})")]
    Foreign(String),
    /// A state log written by a newer release (a higher format version than this one
    /// reads). Nothing is written to it: the driver compacts a state only once it loaded.
    #[error("client state written by a newer release of whispeer (format version {version}, this release reads up to {supported}); not modified")]
    Newer {
        /// The log's format version (its header's seventh byte).
        version: u8,
        /// The highest this release reads.
        supported: u8,
    },
    /// A record in the middle does not parse or fails its check.
    #[error("corrupt client state at byte {offset}: {reason}")]
    Corrupt {
        /// Where the bad record starts.
        offset: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Saved state, replayed from a log.
#[derive(Debug, Default)]
pub struct Saved {
    /// Kept publishes by id: `(order, Pub frame)`.
    pub outbox: BTreeMap<[u8; 16], (u64, Bytes)>,
    /// Dedup entries and their expiry (not expired when loaded), in log order.
    pub seen: Vec<(DedupKey, u64)>,
    /// Dedup entries saved as digests (a snapshot's) and their expiry (not expired when
    /// loaded), in log order.
    pub seen_digests: Vec<(Digest, u64)>,
    /// Retained high-water marks in log order (`Guard::restore_retained` keeps the newest
    /// of each key).
    pub retained: Vec<(RetainedKey, u64, [u8; 16])>,
    /// The last pins saved.
    pub pins: Option<Vec<u8>>,
    /// The largest `forgot_upto` saved (0: none).
    pub forgot_upto: u64,
    /// Messages owed to durables (`8` records not paid or forgotten since), by name.
    pub owed: OwedRows,
    /// When epochs were superseded, by (tree, epoch): the earliest time read.
    pub superseded: BTreeMap<(TreeId, u64), u64>,
    /// Bytes of a torn last record that were ignored.
    pub torn: usize,
    /// `1` keep records skipped because their frame is not a QoS ≥ 1 `Pub` of their own
    /// publish id (or their order is one no run reaches). The state is not authenticated,
    /// and a kept frame is sent on the client's relay session after every handshake, so
    /// such a record must never reach the outbox (review session 27, F2).
    ///
    /// Skipped and counted rather than refusing the whole state as
    /// [`StateError::Corrupt`]: a refused state makes `Client.connect` fail until the user
    /// deletes it, losing every genuine kept publish and the dedup window with it (so
    /// duplicates are delivered again). One record that passed its check but is not a kept
    /// publish is better dropped alone; it is also left out of the next snapshot, since the
    /// snapshot is written from what was loaded. `Outbox::restore` in the Rust client
    /// applies the same rule, so the Rust SQLite state is covered too.
    pub refused_kept: usize,
}

/// What a `1` keep record must hold: the engine's own rule (`Outbox::restore`), a `Pub`
/// frame with QoS ≥ 1 whose publish id is the record's, at an order a run can reach.
fn kept_frame_ok(pid: &[u8; 16], order: u64, frame: &Bytes) -> bool {
    whispeer::core::connection::kept_frame_check(
        &whispeer::core::connection::PublishId(*pid),
        order,
        frame,
    )
    .is_ok()
}

fn check(body: &[u8]) -> [u8; 4] {
    let h = blake3::Hasher::new_derive_key("whispeer js client state record")
        .update(body)
        .finalize();
    let mut c = [0u8; 4];
    c.copy_from_slice(&h.as_bytes()[..4]);
    c
}

fn record(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&(!len).to_be_bytes());
    let start = out.len();
    for p in parts {
        out.extend_from_slice(p);
    }
    let c = check(&out[start..]);
    out.extend_from_slice(&c);
}

/// Appends a kept publish.
pub fn keep(out: &mut Vec<u8>, pid: &[u8; 16], order: u64, frame: &[u8]) {
    record(out, &[&[KEEP], pid, &order.to_be_bytes(), frame]);
}

/// Appends an acknowledged (or refused) publish.
pub fn acked(out: &mut Vec<u8>, pid: &[u8; 16]) {
    record(out, &[&[ACKED], pid]);
}

/// Appends pins.
pub fn pins(out: &mut Vec<u8>, bytes: &[u8]) {
    record(out, &[&[PINS], bytes]);
}

/// Appends a dedup entry held as its digest (a snapshot's).
pub fn seen_digest(out: &mut Vec<u8>, d: Digest, expires_ms: u64) {
    record(
        out,
        &[&[SEEN_DIGEST], &d.to_le_bytes(), &expires_ms.to_be_bytes()],
    );
}

/// Appends when epoch `epoch` of `tree` was superseded (Unix ms).
pub fn superseded(out: &mut Vec<u8>, tree: &TreeId, epoch: u64, at_ms: u64) {
    record(
        out,
        &[
            &[SUPERSEDED],
            &tree.0,
            &epoch.to_be_bytes(),
            &at_ms.to_be_bytes(),
        ],
    );
}

/// Appends every supersede time of a keyring (`Keyring::superseded_epochs`).
pub fn superseded_all(out: &mut Vec<u8>, rows: &[(TreeId, u64, u64)]) {
    for (tree, epoch, at) in rows {
        superseded(out, tree, *epoch, *at);
    }
}

/// Appends a message owed to durable `durable`.
pub fn owed(out: &mut Vec<u8>, durable: &str, d: Digest) {
    record(out, &[&[OWED], &d.to_le_bytes(), durable.as_bytes()]);
}

/// Appends the window's `forgot_upto` (nothing when 0).
pub fn forgot_upto(out: &mut Vec<u8>, t: u64) {
    if t > 0 {
        record(out, &[&[FORGOT], &t.to_be_bytes()]);
    }
}

/// Appends a receiver-state change.
pub fn change(out: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Seen { key, expires_ms } => record(
            out,
            &[
                &[SEEN],
                &key.0 .0,
                &key.1,
                &key.2,
                &expires_ms.to_be_bytes(),
            ],
        ),
        Change::Retained { key, ts_ms, msg_id } => {
            record(out, &[&[RETAINED], key, &ts_ms.to_be_bytes(), msg_id])
        }
        Change::Owed { durable, digest } => owed(out, durable, *digest),
        Change::Paid { durable, digest } => {
            record(out, &[&[PAID], &digest.to_le_bytes(), durable.as_bytes()])
        }
        Change::OwedForgotten { durable } => record(out, &[&[OWED_FORGOTTEN], durable.as_bytes()]),
        // A change kind this format does not know yet: not persisted (the Rust state
        // file would not hold it either).
        _ => {}
    }
}

/// What the state holds as owed to durables (`8` records not paid or forgotten since), by
/// durable name: the rows of the Rust client's `owed` table. The engine keeps in memory at
/// most its bound of owed messages (`ClientCore::restore_owed`); the rest stay saved for a
/// later process, as the Rust file keeps them, so a snapshot writes these rows, not only
/// the engine's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OwedRows(pub BTreeMap<String, BTreeSet<Digest>>);

impl OwedRows {
    /// Applies a receiver-state change as the Rust file does (`Owed` inserts, `Paid`
    /// deletes, `OwedForgotten` deletes the durable's rows; others do nothing).
    pub fn apply(&mut self, c: &Change) {
        match c {
            Change::Owed { durable, digest } => {
                self.0.entry(durable.clone()).or_default().insert(*digest);
            }
            Change::Paid { durable, digest } => {
                if let Some(o) = self.0.get_mut(durable) {
                    o.remove(digest);
                    if o.is_empty() {
                        self.0.remove(durable);
                    }
                }
            }
            Change::OwedForgotten { durable } => {
                self.0.remove(durable);
            }
            _ => {}
        }
    }

    /// Appends a `8` owed record per row.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, ds) in &self.0 {
            for d in ds {
                owed(out, name, *d);
            }
        }
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.0.values().map(BTreeSet::len).sum()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn u64_at(b: &[u8]) -> u64 {
    u64::from_be_bytes(arr(b))
}

/// Replays a log. `now_ms` (unix) drops expired dedup entries.
pub fn load(bytes: &[u8], now_ms: u64) -> Result<Saved, StateError> {
    let mut s = Saved::default();
    if bytes.is_empty() {
        return Ok(s);
    }
    // `wspjs` NUL, then the format version: a later one is a newer release's log (said as
    // such — it was "not a whispeer client state").
    if bytes.len() > 6 && bytes[..6] == MAGIC[..6] && bytes[6] > MAGIC[6] {
        return Err(StateError::Newer {
            version: bytes[6],
            supported: MAGIC[6],
        });
    }
    let known = |v: u8| (FIRST_VERSION..=MAGIC[6]).contains(&v);
    if bytes.len() < MAGIC.len()
        || bytes[..6] != MAGIC[..6]
        || !known(bytes[6])
        || bytes[7] != MAGIC[7]
    {
        let n = bytes.len().min(MAGIC.len());
        let shown: String = bytes[..n]
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() {
                    (b as char).to_string()
                } else {
                    format!("\\x{b:02x}")
                }
            })
            .collect();
        return Err(StateError::Foreign(shown));
    }
    // The order of each kept publish (to refuse a second record of one order without a
    // scan of the outbox per record: a log may hold hundreds of thousands).
    let mut orders: HashMap<u64, [u8; 16]> = HashMap::new();
    // Where each dedup entry already is in `s.seen` / `s.seen_digests`: a log repeats one
    // (its date moved on), and restoring every copy re-dated an entry in the window once
    // per copy — a scan of its old date's bucket each, quadratic in a crafted log.
    let mut seen_at: HashMap<DedupKey, usize> = HashMap::new();
    let mut digest_at: HashMap<Digest, usize> = HashMap::new();
    // The record header: the length, and from version 2 its complement.
    let head = if bytes[6] == FIRST_VERSION { 4 } else { 8 };
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let corrupt = |reason| StateError::Corrupt { offset: at, reason };
        if rest.len() < head {
            s.torn = rest.len();
            break;
        }
        let n = u32::from_be_bytes(arr(rest));
        if head == 8 && u32::from_be_bytes(arr(&rest[4..])) != !n {
            return Err(corrupt("record length damaged"));
        }
        let len = n as usize;
        if len > MAX_BODY {
            return Err(corrupt("record length out of range"));
        }
        let end = head + len + 4;
        if rest.len() < end {
            s.torn = rest.len();
            break;
        }
        let body = &rest[head..head + len];
        if check(body) != rest[head + len..end] {
            if rest.len() == end {
                s.torn = rest.len();
                break;
            }
            return Err(corrupt("record check failed"));
        }
        let (&kind, f) = body.split_first().ok_or_else(|| corrupt("empty record"))?;
        match (kind, f.len()) {
            (KEEP, n) if n >= 24 => {
                let (pid, order) = (arr(f), u64_at(&f[16..]));
                let frame = Bytes::copy_from_slice(&f[24..]);
                // An order another kept publish has (review 27b, C1): the engine would refuse
                // it at every start, and snapshots would keep it.
                let taken = orders.get(&order).is_some_and(|p| *p != pid);
                if !taken && kept_frame_ok(&pid, order, &frame) {
                    if let Some((old, _)) = s.outbox.insert(pid, (order, frame)) {
                        orders.remove(&old);
                    }
                    orders.insert(order, pid);
                } else {
                    // Skipped, not Corrupt: see `Saved::refused_kept`. A later ACKED of
                    // the same id finds nothing to remove, which is fine.
                    s.refused_kept += 1;
                }
            }
            (ACKED, 16) => {
                if let Some((order, _)) = s.outbox.remove(&arr::<16>(f)) {
                    orders.remove(&order);
                }
            }
            (SEEN, 72) => {
                let key = (TreeId(arr(f)), arr(&f[16..]), arr(&f[48..]));
                let exp = u64_at(&f[64..]);
                if exp > now_ms {
                    match seen_at.get(&key) {
                        Some(&i) => s.seen[i].1 = s.seen[i].1.max(exp),
                        None => {
                            seen_at.insert(key, s.seen.len());
                            s.seen.push((key, exp));
                        }
                    }
                }
            }
            (SEEN_DIGEST, 24) => {
                let exp = u64_at(&f[16..]);
                if exp > now_ms {
                    let d = Digest::from_le_bytes(arr(f));
                    match digest_at.get(&d) {
                        Some(&i) => s.seen_digests[i].1 = s.seen_digests[i].1.max(exp),
                        None => {
                            digest_at.insert(d, s.seen_digests.len());
                            s.seen_digests.push((d, exp));
                        }
                    }
                }
            }
            (RETAINED, 56) => {
                s.retained.push((arr(f), u64_at(&f[32..]), arr(&f[40..])));
            }
            (PINS, _) => s.pins = Some(f.to_vec()),
            (FORGOT, 8) => s.forgot_upto = s.forgot_upto.max(u64_at(f)),
            (OWED | PAID, n) if n >= 16 => {
                let d = Digest::from_le_bytes(arr(f));
                let name = std::str::from_utf8(&f[16..])
                    .map_err(|_| corrupt("durable name is not UTF-8"))?;
                let durable = name.to_owned();
                s.owed.apply(&if kind == OWED {
                    Change::Owed { durable, digest: d }
                } else {
                    Change::Paid { durable, digest: d }
                });
            }
            (OWED_FORGOTTEN, _) => {
                let name =
                    std::str::from_utf8(f).map_err(|_| corrupt("durable name is not UTF-8"))?;
                s.owed.0.remove(name);
            }
            (SUPERSEDED, 32) => {
                let key = (TreeId(arr(f)), u64_at(&f[16..]));
                let t = u64_at(&f[24..]);
                let v = s.superseded.entry(key).or_insert(t);
                *v = (*v).min(t);
            }
            (
                KEEP | ACKED | SEEN | SEEN_DIGEST | RETAINED | FORGOT | OWED | PAID | SUPERSEDED,
                _,
            ) => return Err(corrupt("record of the wrong size")),
            _ => return Err(corrupt("unknown record kind (written by a newer version?)")),
        }
        at += end;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use whispeer_protocol::frame::{Close, ErrorCode, Unsub};
    use whispeer_protocol::{Frame, Qos};
    use whispeer_protocol::{Keyring, MessageId, Outgoing, SealOptions, Sealer, Topic, TreeKey};

    /// A genuine `Pub` frame for `pid` with `qos`, as the engine keeps it.
    fn pub_frame(pid: [u8; 16], qos: Qos) -> Bytes {
        let tk = TreeKey::generate_with("p", &mut OsRng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let key = kr.topic_key(&Topic::new("a/b").unwrap()).unwrap();
        let out = Outgoing {
            payload: b"x",
            content_type: "application/octet-stream",
            msg_id: MessageId::random(&mut OsRng),
            ts_ms: 1_000,
        };
        let env = Sealer::new()
            .seal(&key, &out, &SealOptions::default(), None, &mut OsRng)
            .unwrap();
        whispeer::core::pub_frame(env, Some(pid), false, qos).to_bytes()
    }

    fn sample() -> Vec<u8> {
        sample_with(&pub_frame([2; 16], Qos::AtLeastOnce))
    }

    fn sample_with(frame2: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        keep(&mut b, &[1; 16], 1, &pub_frame([1; 16], Qos::AtLeastOnce));
        keep(&mut b, &[2; 16], 2, frame2);
        acked(&mut b, &[1; 16]);
        change(
            &mut b,
            &Change::Seen {
                key: (TreeId([1; 16]), [2; 32], [3; 16]),
                expires_ms: 1_000,
            },
        );
        change(
            &mut b,
            &Change::Seen {
                key: (TreeId([1; 16]), [2; 32], [4; 16]),
                expires_ms: 10,
            },
        );
        change(
            &mut b,
            &Change::Retained {
                key: [7; 32],
                ts_ms: 50,
                msg_id: [8; 16],
            },
        );
        change(
            &mut b,
            &Change::Retained {
                key: [7; 32],
                ts_ms: 40,
                msg_id: [9; 16],
            },
        );
        pins(&mut b, b"\x01old");
        pins(&mut b, b"\x01new");
        b
    }

    #[test]
    fn a_log_replays_to_the_state_it_recorded() {
        let frame2 = pub_frame([2; 16], Qos::ExactlyOnce);
        let s = load(&sample_with(&frame2), 100).unwrap();
        assert_eq!(s.outbox.len(), 1, "the acked publish is gone");
        assert_eq!(s.outbox[&[2; 16]], (2, frame2));
        assert_eq!(s.refused_kept, 0);
        assert_eq!(
            s.seen,
            [((TreeId([1; 16]), [2; 32], [3; 16]), 1_000)],
            "the expired entry is dropped"
        );
        assert_eq!(s.retained, [([7; 32], 50, [8; 16]), ([7; 32], 40, [9; 16])]);
        // Imported into the receiver state, the newest mark wins.
        let mut g = whispeer::core::receive::Guard::new(Default::default());
        for &(k, ts, id) in &s.retained {
            g.restore_retained(k, ts, id);
        }
        assert_eq!(
            g.snapshot(0).retained,
            [([7; 32], 50, [8; 16])],
            "never rolled back"
        );
        assert_eq!(s.pins.as_deref(), Some(&b"\x01new"[..]));
        assert_eq!(s.torn, 0);
        assert!(
            load(&[], 0).unwrap().outbox.is_empty(),
            "empty: a new state"
        );
    }

    #[test]
    fn a_torn_last_record_is_ignored_but_corruption_inside_is_refused() {
        let full = sample();
        let whole = load(&full, 100).unwrap();
        // Every cut inside the last record: the rest loads, the torn bytes are counted.
        let mut last = MAGIC.to_vec();
        pins(&mut last, b"\x01new");
        let last_len = last.len() - MAGIC.len();
        for cut in 1..last_len {
            let s = load(&full[..full.len() - cut], 100).unwrap();
            assert_eq!(s.torn, last_len - cut);
            assert_eq!(s.pins.as_deref(), Some(&b"\x01old"[..]));
            assert_eq!(s.outbox, whole.outbox);
        }
        // A flipped byte in the last record: torn; in an earlier one: corrupt.
        let mut b = full.clone();
        let n = b.len();
        b[n - 6] ^= 1;
        assert_eq!(load(&b, 100).unwrap().torn, last_len);
        let mut b = full.clone();
        b[MAGIC.len() + 8 + 6] ^= 1;
        let e = load(&b, 100).unwrap_err();
        assert_eq!(
            e,
            StateError::Corrupt {
                offset: MAGIC.len(),
                reason: "record check failed"
            }
        );
        assert!(
            e.to_string().contains("corrupt client state at byte 8"),
            "{e}"
        );
        // An unknown kind in the middle.
        let mut b = MAGIC.to_vec();
        record(&mut b, &[&[99], b"x"]);
        pins(&mut b, b"\x01");
        assert!(matches!(
            load(&b, 0),
            Err(StateError::Corrupt { offset: 8, .. })
        ));
    }

    /// Adversarial review (clients), finding 1 for the npm log: a record length changed in
    /// the middle of the log so that it runs past the end read as a torn last record, and
    /// everything after it — dedup entries too — was dropped without an error (only the
    /// count of "torn" bytes said anything). The length's complement in the record header
    /// (format version 2) makes that corruption; a torn tail still loads as before.
    #[test]
    fn a_record_length_damaged_in_the_middle_is_corruption_not_a_torn_tail() {
        let mut b = MAGIC.to_vec();
        let entry = |i: u8| Change::Seen {
            key: (TreeId([1; 16]), [2; 32], [i; 16]),
            expires_ms: 1_000,
        };
        change(&mut b, &entry(1));
        let second = b.len();
        for i in 2..10 {
            change(&mut b, &entry(i));
        }
        assert_eq!(load(&b, 0).unwrap().seen.len(), 9);
        // The second record's length now claims more than the log holds (its high byte hit).
        for (byte, x) in [(0, 0x01), (1, 0x10), (2, 0x04)] {
            let mut d = b.clone();
            d[second + byte] ^= x;
            assert!(
                u32::from_be_bytes(arr(&d[second..])) as usize > d.len() - second,
                "runs past the end"
            );
            assert_eq!(
                load(&d, 0).unwrap_err(),
                StateError::Corrupt {
                    offset: second,
                    reason: "record length damaged"
                },
                "byte {byte}"
            );
        }
        // Its complement damaged instead: the same.
        let mut d = b.clone();
        d[second + 5] ^= 0x40;
        assert!(matches!(
            load(&d, 0),
            Err(StateError::Corrupt {
                reason: "record length damaged",
                ..
            })
        ));
        // A torn tail is what it was: every cut inside the last record loads the rest.
        let last = b.len() - (8 + 73 + 4);
        for cut in last + 1..b.len() {
            let s = load(&b[..cut], 0).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!((s.seen.len(), s.torn), (8, cut - last));
        }
    }

    /// A log of format version 1 (no length complement; what the previous release wrote)
    /// still loads, a torn last record included; the driver then rewrites it as version 2.
    #[test]
    fn a_log_of_format_version_1_still_loads() {
        let v1 = |b: &[u8]| -> Vec<u8> {
            // Drop each record's complement.
            let mut out = b"wspjs\x00\x01\n".to_vec();
            let mut at = MAGIC.len();
            while at < b.len() {
                let len = u32::from_be_bytes(arr(&b[at..])) as usize;
                out.extend_from_slice(&b[at..at + 4]);
                out.extend_from_slice(&b[at + 8..at + 8 + len + 4]);
                at += 8 + len + 4;
            }
            out
        };
        let frame2 = pub_frame([2; 16], Qos::ExactlyOnce);
        let now = load(&sample_with(&frame2), 100).unwrap();
        let old = v1(&sample_with(&frame2));
        let then = load(&old, 100).unwrap();
        assert_eq!(
            (
                &then.outbox,
                &then.seen,
                &then.retained,
                &then.pins,
                then.torn
            ),
            (&now.outbox, &now.seen, &now.retained, &now.pins, 0)
        );
        let torn = load(&old[..old.len() - 3], 100).unwrap();
        assert_eq!(torn.pins.as_deref(), Some(&b"\x01old"[..]));
        assert!(torn.torn > 0);
    }

    /// Supersede times load as the earliest of each (tree, epoch); a record of the wrong
    /// size is corruption.
    #[test]
    fn supersede_times_load_as_the_earliest_of_each_epoch() {
        let mut b = MAGIC.to_vec();
        superseded(&mut b, &TreeId([1; 16]), 0, 5_000);
        superseded(&mut b, &TreeId([1; 16]), 0, 7_000);
        superseded_all(
            &mut b,
            &[(TreeId([1; 16]), 1, 9_000), (TreeId([2; 16]), 0, 3)],
        );
        superseded(&mut b, &TreeId([1; 16]), 1, 8_000);
        let s = load(&b, 0).unwrap();
        assert_eq!(
            s.superseded.into_iter().collect::<Vec<_>>(),
            [
                ((TreeId([1; 16]), 0), 5_000),
                ((TreeId([1; 16]), 1), 8_000),
                ((TreeId([2; 16]), 0), 3)
            ]
        );
        let mut bad = MAGIC.to_vec();
        record(&mut bad, &[&[SUPERSEDED], &[0; 31]]);
        pins(&mut bad, b"\x01");
        assert!(matches!(
            load(&bad, 0),
            Err(StateError::Corrupt {
                reason: "record of the wrong size",
                ..
            })
        ));
    }

    #[test]
    fn foreign_bytes_are_refused() {
        for bad in [&b"SQLite format 3\x00"[..], b"{\"a\":1}", b"wsp"] {
            let e = load(bad, 0).unwrap_err();
            assert!(matches!(e, StateError::Foreign(_)), "{bad:?}: {e}");
            assert!(e.to_string().contains("not a whispeer client state"), "{e}");
        }
    }

    /// A log of a later format version is a newer release's, said as such (it was "not
    /// a whispeer client state").
    #[test]
    fn a_log_of_a_newer_format_version_is_said_to_be_a_newer_releases() {
        let mut b = sample();
        b[6] = 3;
        let e = load(&b, 0).unwrap_err();
        assert_eq!(
            e,
            StateError::Newer {
                version: 3,
                supported: 2
            }
        );
        assert_eq!(
            e.to_string(),
            "client state written by a newer release of whispeer (format version 3, this \
             release reads up to 2); not modified"
        );
        // Only the header counts: a bare header of version 200 too.
        assert!(matches!(
            load(b"wspjs\x00\xc8\n", 0),
            Err(StateError::Newer { version: 200, .. })
        ));
        // An older or unknown version byte is no newer release's: foreign.
        assert!(matches!(
            load(b"wspjs\x00\x00\n", 0),
            Err(StateError::Foreign(_))
        ));
    }

    #[test]
    fn a_snapshot_keeps_digests_and_loads_back_into_the_window() {
        use whispeer::core::receive::{digest, Guard};
        let key = (TreeId([1; 16]), [2; 32], [3; 16]);
        let mut g = Guard::new(Default::default());
        g.restore_seen(key, 1_000, 0);
        let mut b = MAGIC.to_vec();
        for (d, exp) in g.snapshot(0).seen {
            seen_digest(&mut b, d, exp);
        }
        seen_digest(&mut b, 7, 10);
        let s = load(&b, 100).unwrap();
        assert_eq!(
            s.seen_digests,
            [(digest(&key), 1_000)],
            "the expired one is dropped"
        );
        let mut h = Guard::new(Default::default());
        for (d, exp) in s.seen_digests {
            h.restore_digest(d, exp, 100);
        }
        assert!(h.is_seen(&key));
        assert_eq!(s.forgot_upto, 0);
        // A full window's start survives a compaction: 20 entries in a window of 10.
        let mut cfg = whispeer::core::receive::ReceiveConfig::default();
        cfg.max_entries = 10;
        let mut full = Guard::new(cfg);
        for i in 0..20u8 {
            full.restore_seen((TreeId([1; 16]), [2; 32], [i; 16]), 1_000 + u64::from(i), 0);
        }
        let snap = full.snapshot(0);
        let mut b = MAGIC.to_vec();
        for (d, exp) in snap.seen {
            seen_digest(&mut b, d, exp);
        }
        forgot_upto(&mut b, snap.forgot_upto);
        let s = load(&b, 0).unwrap();
        assert_eq!(s.forgot_upto, full.forgot_upto());
        assert!(s.forgot_upto > 0);
        let mut bad = MAGIC.to_vec();
        record(&mut bad, &[&[SEEN_DIGEST], &[0; 20]]);
        record(&mut bad, &[&[PINS], b"x"]);
        assert!(matches!(load(&bad, 0), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn an_acknowledged_publish_frees_its_order_and_a_repeated_one_keeps_its_place() {
        let (a, b) = (
            pub_frame([1; 16], Qos::AtLeastOnce),
            pub_frame([2; 16], Qos::AtLeastOnce),
        );
        let mut log = MAGIC.to_vec();
        keep(&mut log, &[1; 16], 1, &a);
        acked(&mut log, &[1; 16]);
        keep(&mut log, &[2; 16], 1, &b);
        // The same publish saved again (at another order) gives its old order up.
        keep(&mut log, &[2; 16], 3, &b);
        keep(&mut log, &[1; 16], 1, &a);
        let s = load(&log, 0).unwrap();
        assert_eq!(s.refused_kept, 0);
        assert_eq!(s.outbox[&[2; 16]].0, 3);
        assert_eq!(s.outbox[&[1; 16]].0, 1);
    }

    #[test]
    fn a_kept_record_must_be_a_pub_frame_with_its_own_publish_id() {
        let good = pub_frame([1; 16], Qos::AtLeastOnce);
        let bad: [(&str, [u8; 16], u64, Bytes); 7] = [
            (
                "a Close frame",
                [2; 16],
                2,
                Frame::Close(Close {
                    code: ErrorCode::Malformed,
                    message: "bye".into(),
                })
                .to_bytes(),
            ),
            (
                "an Unsub frame",
                [3; 16],
                3,
                Frame::Unsub(Unsub {
                    sub_id: 1,
                    delete: Some(true),
                })
                .to_bytes(),
            ),
            ("no frame", [4; 16], 4, Bytes::from_static(b"frame-4")),
            (
                "a Pub of another publish id",
                [5; 16],
                5,
                pub_frame([6; 16], Qos::AtLeastOnce),
            ),
            (
                "a QoS 0 Pub",
                [7; 16],
                7,
                pub_frame([7; 16], Qos::AtMostOnce),
            ),
            (
                "an order no run reaches",
                [8; 16],
                u64::MAX,
                pub_frame([8; 16], Qos::AtLeastOnce),
            ),
            (
                "the order of another kept publish",
                [9; 16],
                1,
                pub_frame([9; 16], Qos::AtLeastOnce),
            ),
        ];
        for (what, pid, order, frame) in &bad {
            let mut b = MAGIC.to_vec();
            keep(&mut b, &[1; 16], 1, &good);
            keep(&mut b, pid, *order, frame);
            pins(&mut b, b"\x01p");
            let s = load(&b, 0).unwrap_or_else(|e| panic!("{what}: the state loads ({e})"));
            assert_eq!(s.refused_kept, 1, "{what}");
            assert!(
                !s.outbox.contains_key(pid),
                "{what}: skipped, never restored"
            );
            assert_eq!(
                s.outbox[&[1; 16]],
                (1, good.clone()),
                "{what}: the rest loads"
            );
            assert_eq!(s.pins.as_deref(), Some(&b"\x01p"[..]), "{what}");
        }
    }

    /// Owed, paid and forgotten records replay to what is still owed, by durable name; a
    /// name that is not UTF-8 is corruption, not a torn write.
    #[test]
    fn owed_records_replay_to_what_is_still_owed() {
        let mut b = MAGIC.to_vec();
        let owe = |b: &mut Vec<u8>, n: &str, d: Digest| {
            change(
                b,
                &Change::Owed {
                    durable: n.into(),
                    digest: d,
                },
            )
        };
        owe(&mut b, "a", 1);
        owe(&mut b, "a", 2);
        owe(&mut b, "b", 3);
        owe(&mut b, "c", 4);
        change(
            &mut b,
            &Change::Paid {
                durable: "a".into(),
                digest: 1,
            },
        );
        change(
            &mut b,
            &Change::Paid {
                durable: "c".into(),
                digest: 4,
            },
        );
        change(
            &mut b,
            &Change::OwedForgotten {
                durable: "b".into(),
            },
        );
        owed(&mut b, "é", 5);
        let s = load(&b, 0).unwrap();
        let got: Vec<(String, Vec<Digest>)> = s
            .owed
            .0
            .into_iter()
            .map(|(n, ds)| (n, ds.into_iter().collect()))
            .collect();
        assert_eq!(got, vec![("a".into(), vec![2]), ("é".into(), vec![5])]);

        let mut bad = MAGIC.to_vec();
        record(&mut bad, &[&[OWED], &7u128.to_le_bytes(), &[0xff, 0xfe]]);
        owe(&mut bad, "a", 1);
        assert!(matches!(load(&bad, 0), Err(StateError::Corrupt { .. })));
        let mut short = MAGIC.to_vec();
        record(&mut short, &[&[PAID], &[1, 2, 3]]);
        owe(&mut short, "a", 1);
        assert!(matches!(load(&short, 0), Err(StateError::Corrupt { .. })));
    }

    /// A log that repeats its dedup entries (dates moving on, or crafted: each digest
    /// twice) loads each once, at its latest date: restoring every copy re-dated the entry
    /// in the window per copy, quadratic in such a log.
    #[test]
    fn repeated_dedup_entries_load_once_at_their_latest_date() {
        let mut b = MAGIC.to_vec();
        for round in 0..2u64 {
            for i in 0..1000u128 {
                seen_digest(&mut b, i, 10_000 + round);
            }
        }
        let s = load(&b, 5).unwrap();
        assert_eq!(s.seen_digests.len(), 1000);
        assert!(s.seen_digests.iter().all(|(_, e)| *e == 10_001));
    }

    /// Genuine kept frames for publish ids `[1; 16]` and `[2; 16]`, sealed once.
    fn kept_frames() -> &'static [Bytes; 2] {
        static F: std::sync::OnceLock<[Bytes; 2]> = std::sync::OnceLock::new();
        F.get_or_init(|| {
            [
                pub_frame([1; 16], Qos::AtLeastOnce),
                pub_frame([2; 16], Qos::ExactlyOnce),
            ]
        })
    }

    /// A record of each kind, from proptest's choices.
    fn any_record() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let t = prop_oneof![any::<u64>(), 0u64..2_000];
        prop_oneof![
            (0usize..2, 0u64..4).prop_map(|(i, order)| {
                let mut b = Vec::new();
                keep(&mut b, &[i as u8 + 1; 16], order, &kept_frames()[i]);
                b
            }),
            (0u8..3).prop_map(|i| {
                let mut b = Vec::new();
                acked(&mut b, &[i + 1; 16]);
                b
            }),
            (any::<[u8; 2]>(), t.clone()).prop_map(|(k, expires_ms)| {
                let mut b = Vec::new();
                let key = (TreeId([k[0] % 2; 16]), [k[1] % 2; 32], [k[1]; 16]);
                change(&mut b, &Change::Seen { key, expires_ms });
                b
            }),
            (any::<u8>(), t.clone(), any::<u8>()).prop_map(|(k, ts_ms, id)| {
                let mut b = Vec::new();
                let (key, msg_id) = ([k % 3; 32], [id; 16]);
                change(&mut b, &Change::Retained { key, ts_ms, msg_id });
                b
            }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|p| {
                let mut b = Vec::new();
                pins(&mut b, &p);
                b
            }),
            (0u128..8, t.clone()).prop_map(|(d, exp)| {
                let mut b = Vec::new();
                seen_digest(&mut b, d, exp);
                b
            }),
            t.clone().prop_map(|x| {
                let mut b = Vec::new();
                forgot_upto(&mut b, x);
                b
            }),
            (0u8..2, 0u64..3, t).prop_map(|(tree, epoch, at)| {
                let mut b = Vec::new();
                superseded(&mut b, &TreeId([tree; 16]), epoch, at);
                b
            }),
            (0u8..3, "[a-cé]{0,3}", 0u128..4).prop_map(|(k, durable, digest)| {
                let mut b = Vec::new();
                change(
                    &mut b,
                    &match k {
                        0 => Change::Owed { durable, digest },
                        1 => Change::Paid { durable, digest },
                        _ => Change::OwedForgotten { durable },
                    },
                );
                b
            }),
        ]
    }

    /// Every field of two loaded states is the same.
    fn same(a: &Saved, b: &Saved) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prop_assert_eq;
        prop_assert_eq!(&a.outbox, &b.outbox);
        prop_assert_eq!(&a.seen, &b.seen);
        prop_assert_eq!(&a.seen_digests, &b.seen_digests);
        prop_assert_eq!(&a.retained, &b.retained);
        prop_assert_eq!(&a.pins, &b.pins);
        prop_assert_eq!(a.forgot_upto, b.forgot_upto);
        prop_assert_eq!(&a.owed, &b.owed);
        prop_assert_eq!(&a.superseded, &b.superseded);
        prop_assert_eq!(a.refused_kept, b.refused_kept);
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(300))]

        /// A valid log cut anywhere (a crash during any write) loads as the records before
        /// the cut, the rest reported as torn bytes — or, cut inside its 8-byte header, is
        /// refused as foreign (empty: a new state). A byte changed anywhere never panics.
        #[test]
        fn a_truncated_log_loads_the_records_before_the_cut(
            records in proptest::collection::vec(any_record(), 0..24),
            now in proptest::prop_oneof![proptest::strategy::Just(0u64), 0u64..2_000],
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            flip in proptest::prelude::any::<(proptest::sample::Index, u8)>(),
        ) {
            use proptest::{prop_assert, prop_assert_eq};
            let mut log = MAGIC.to_vec();
            let mut ends = vec![log.len()];
            for r in &records {
                log.extend_from_slice(r);
                ends.push(log.len());
            }
            let whole = load(&log, now).unwrap();
            prop_assert_eq!(whole.torn, 0);
            // Every cut of this log, and one at random on a longer run.
            let cuts: Vec<usize> = if log.len() <= 400 {
                (0..=log.len()).collect()
            } else {
                vec![cut.index(log.len() + 1), log.len() - 1, MAGIC.len() + 3]
            };
            for cut in cuts {
                let got = load(&log[..cut], now);
                if cut == 0 {
                    prop_assert!(got.unwrap().outbox.is_empty());
                    continue;
                }
                if cut < MAGIC.len() {
                    prop_assert!(matches!(got, Err(StateError::Foreign(_))), "{:?}", got);
                    continue;
                }
                let got = got.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
                let whole_records = ends.iter().filter(|&&e| e <= cut).count() - 1;
                let prefix_end = ends[whole_records];
                prop_assert_eq!(got.torn, cut - prefix_end, "cut at {}", cut);
                let prefix = load(&log[..prefix_end], now).unwrap();
                same(&got, &prefix)?;
            }
            if !log.is_empty() {
                let (at, x) = flip;
                let mut bad = log.clone();
                let i = at.index(bad.len());
                bad[i] ^= x.max(1);
                let got = load(&bad, now);
                if let Ok(s) = &got {
                    // A change past the header is either the torn last record or a record
                    // whose check still holds (never: the body changed, the check did not).
                    prop_assert!(i < MAGIC.len() || s.torn > 0 || records.is_empty(), "{}", i);
                }
                // A change in any record but the last — its length included — is refused,
                // never taken for a torn tail (everything after it dropped).
                if i >= MAGIC.len() && records.len() >= 2 && i < ends[records.len() - 1] {
                    prop_assert!(got.is_err(), "byte {} changed: {:?}", i, got.map(|s| s.torn));
                }
            }
        }
    }
}
