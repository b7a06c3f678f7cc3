//! One holder per durable name across the cluster: a lease per durable in the stream
//! `<stream>_LEASES` (subjects `<prefix>_lease.<durable key>`, one message per subject).
//!
//! - **Take.** A relay whose connection subscribes to a durable reads the durable's lease
//!   record directly. A live record of another holder (another relay, or an earlier run of
//!   this one) refuses the `Sub` with `Err(not_allowed)`; no record, a released one (empty
//!   payload) or an expired one — its NATS timestamp plus its TTL is past — is replaced,
//!   conditionally on the sequence read (`Nats-Expected-Last-Subject-Sequence`): of two
//!   relays taking one lease at once, one wins and the other `Sub` is refused.
//! - **Renew.** Every third of the TTL the relay rewrites each lease it holds, again
//!   conditionally on the sequence it last wrote.
//! - **Release.** When the subscription or its connection ends, and on graceful shutdown,
//!   the relay writes an empty record (conditionally: never over a lease another relay took).
//! - **Loss.** A renewal refused because the record moved (another relay took the lease)
//!   ends the local holder's subscription at once; renewals that fail (NATS lost) end it
//!   once half the TTL has passed since the last renewal that succeeded, and at the latest
//!   five sixths of the TTL after it (checked before each renewal), so the holder stops
//!   before another relay may take the lease (TTL after the record's NATS timestamp, which
//!   is later than the renewal's send time). A relay frozen (SIGSTOP) past the TTL ends its
//!   holder first thing when it runs again.
//!
//! - **Settle** (on nats-server before 2.9.21 with replicas). Such a server checks
//!   `Nats-Expected-Last-Subject-Sequence` only against writes it has applied (nats-server
//!   issue 4320): two relays taking one lease at the same moment can both pass. So after
//!   its write a relay writes a record of its own elsewhere in the stream (a barrier: it
//!   comes after every write that passed the check with its own), then reads the lease
//!   again from the stream's leader: a record after its own means another relay's write
//!   landed last — that relay holds the lease and this `Sub` is refused. Both relays read
//!   the same last record, so exactly one holds. Cost: one more write and read per take.
//!
//! A record is `<holder> <ttl ms>` where `<holder>` is this relay run's random id and a
//! counter per hold; the TTL is the holder's (`[cluster] durable_lease_ms`), so relays
//! configured differently still agree on when a lease expires. Expiry compares the
//! taking relay's clock with the NATS server's timestamp: clocks must agree within a small
//! part of the TTL (NTP).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use super::{lock, unavailable};
use crate::store::{DurableKey, HoldLost, StoreError};

/// Confirmations of conditional writes, made on a nats-server that checks them only
/// against the writes it has applied (before 2.9.21: nats-server issue 4320) with
/// replicated streams: a durable hold's settling read ([`Leases::take`]) and a retained
/// value's confirming write (`write_retained`). Tests can hold them between the write and
/// its confirmation, where a racing write may land.
pub(crate) struct WriteConfirms {
    on: std::sync::atomic::AtomicBool,
    held: tokio::sync::watch::Sender<bool>,
    parked: tokio::sync::watch::Sender<u32>,
}

impl WriteConfirms {
    pub(super) fn new(on: bool) -> Self {
        Self {
            on: std::sync::atomic::AtomicBool::new(on),
            held: tokio::sync::watch::Sender::new(false),
            parked: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(super) fn on(&self) -> bool {
        self.on.load(Relaxed)
    }

    pub(super) fn set(&self, on: bool) {
        self.on.store(on, Relaxed);
    }

    pub(super) fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    pub(super) fn parked(&self) -> tokio::sync::watch::Receiver<u32> {
        self.parked.subscribe()
    }

    /// Waits while a test holds confirmations, counted in [`parked`](Self::parked).
    pub(super) async fn gate(&self) {
        let mut held = self.held.subscribe();
        if !*held.borrow() {
            return;
        }
        self.parked.send_modify(|n| *n += 1);
        let _ = held.wait_for(|h| !*h).await;
        self.parked.send_modify(|n| *n -= 1);
    }
}

/// A lease subject's last record ([`Leases::last_record`]).
struct LastRecord {
    seq: u64,
    /// The holder it names and the milliseconds its hold has left (≤ 0: lapsed).
    hold: Option<(String, i128)>,
}

/// A lease this relay holds.
struct Held {
    key: DurableKey,
    /// The stream sequence of this relay's last record (the next write's condition).
    seq: u64,
    /// When the last renewal that succeeded was sent.
    renewed: Instant,
    /// The record's holder field.
    holder: String,
    lost: HoldLost,
    /// Given back ([`begin_release`](Leases::begin_release)): still renewed and still held
    /// for this relay's floors of the durable on their way to NATS, until
    /// [`finish_release`](Leases::finish_release); its loss ends no subscription.
    releasing: bool,
}

/// The leases of one relay.
pub(super) struct Leases {
    /// This relay run's id (random): its records name it.
    relay_id: String,
    ttl: Duration,
    /// `<prefix>_lease`.
    prefix: String,
    js: jetstream::Context,
    stream: stream::Stream,
    held: Mutex<HashMap<String, Held>>,
    next: AtomicU64,
    confirms: std::sync::Arc<WriteConfirms>,
}

/// The lease stream's subject prefix.
pub(super) fn lease_prefix(prefix: &str) -> String {
    format!("{prefix}_lease")
}

fn wall_ms() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i128)
        .unwrap_or(0)
}

fn expected(seq: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        seq.to_string().as_str(),
    );
    h
}

/// Why a conditional write failed.
enum WriteError {
    /// The record moved (another writer in between).
    Moved,
    Failed(String),
}

impl Leases {
    pub(super) fn new(
        ttl: Duration,
        prefix: &str,
        js: jetstream::Context,
        stream: stream::Stream,
        confirms: std::sync::Arc<WriteConfirms>,
    ) -> Self {
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).expect("OS random number generator");
        Self {
            relay_id: hex::encode(id),
            ttl,
            prefix: lease_prefix(prefix),
            js,
            stream,
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            confirms,
        }
    }

    fn subject(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }

    /// Writes a record for `k` if the subject's last sequence is still `seq`: the new
    /// sequence.
    async fn write(&self, k: &str, seq: u64, payload: Bytes) -> Result<u64, WriteError> {
        let ack = self
            .js
            .publish_with_headers(self.subject(k), expected(seq), payload)
            .await
            .map_err(|e| WriteError::Failed(e.to_string()))?;
        match ack.await {
            Ok(a) => Ok(a.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(WriteError::Moved)
            }
            Err(e) => Err(WriteError::Failed(e.to_string())),
        }
    }

    /// Whether this relay's record of `k` at stream sequence `seq` is the lease's last one
    /// once every write that passed the check with it has landed (see the module docs,
    /// "Settle"); `true` at once where the server checks writes in flight.
    async fn settled(&self, k: &str, seq: u64) -> Result<bool, String> {
        if !self.confirms.on() {
            return Ok(true);
        }
        self.confirms.gate().await;
        super::barrier(
            &self.js,
            format!("{}.barrier.{}", self.prefix, self.relay_id),
        )
        .await?;
        let last = self.last_record(k).await.map_err(|e| e.to_string())?;
        Ok(last.seq == seq)
    }

    fn record(&self, holder: &str) -> Bytes {
        Bytes::from(format!("{holder} {}", self.ttl.as_millis()))
    }

    /// Takes the lease of durable `k` (see the module docs).
    pub(super) async fn take(
        &self,
        k: &str,
        key: &DurableKey,
        lost: &HoldLost,
    ) -> Result<(), StoreError> {
        let last = self
            .last_record(k)
            .await
            .map_err(|e| unavailable("durable hold read", e))?;
        if let Some((holder, left)) = &last.hold {
            let ours = holder.split(':').next().is_some_and(|r| r == self.relay_id);
            if !ours && *left > 0 {
                return Err(StoreError::Held(format!(
                    "durable subscription {:?} is active at another relay (its hold \
                     lapses within {} ms unless renewed)",
                    key.name, left
                )));
            }
        }
        let last = last.seq;
        let holder = format!("{}:{}", self.relay_id, self.next.fetch_add(1, Relaxed));
        let sent = Instant::now();
        match self.write(k, last, self.record(&holder)).await {
            Ok(seq) => {
                match self.settled(k, seq).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(StoreError::Held(format!(
                            "durable subscription {:?} was just taken at another relay",
                            key.name
                        )))
                    }
                    Err(e) => return Err(unavailable("durable hold settle", e)),
                }
                lock(&self.held).insert(
                    k.to_string(),
                    Held {
                        key: key.clone(),
                        seq,
                        renewed: sent,
                        holder,
                        lost: lost.clone(),
                        releasing: false,
                    },
                );
                Ok(())
            }
            Err(WriteError::Moved) => Err(StoreError::Held(format!(
                "durable subscription {:?} was just taken at another relay",
                key.name
            ))),
            Err(WriteError::Failed(e)) => Err(unavailable("durable hold write", e)),
        }
    }

    /// The last record of `k` as [`hold`](Self::hold) and [`take_briefly`](Self::take_briefly)
    /// read it: its sequence (0: none) and, when it names a holder, the holder and the
    /// milliseconds left before that hold lapses (its NATS time plus its TTL; ≤ 0: lapsed).
    async fn last_record(&self, k: &str) -> Result<LastRecord, stream::LastRawMessageError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(k))
            .await
        {
            Ok(m) => {
                let text = String::from_utf8_lossy(&m.payload);
                let mut parts = text.split_whitespace();
                let hold = match (
                    parts.next(),
                    parts.next().and_then(|v| v.parse::<u64>().ok()),
                ) {
                    (Some(holder), Some(ttl_ms)) => {
                        let stamped = m.time.unix_timestamp_nanos() / 1_000_000;
                        Some((holder.to_owned(), stamped + i128::from(ttl_ms) - wall_ms()))
                    }
                    _ => None,
                };
                Ok(LastRecord {
                    seq: m.sequence,
                    hold,
                })
            }
            Err(e) if matches!(e.kind(), K::NoMessageFound) => {
                Ok(LastRecord { seq: 0, hold: None })
            }
            Err(e) => Err(e),
        }
    }

    /// The durables this relay holds (their keys).
    pub(super) fn held_keys(&self) -> Vec<String> {
        lock(&self.held).keys().cloned().collect()
    }

    /// Whether this relay holds `k` (also while it gives it back: its last floors go on).
    pub(super) fn holds(&self, k: &str) -> bool {
        lock(&self.held).contains_key(k)
    }

    /// Takes the lease of `k` for a moment, for the idle sweep to delete the durable while
    /// no subscription can hold it: `Some(seq)` (the record to release over, with
    /// [`release`](Self::release)) when nobody holds it, `None` when a live record is there
    /// — of any relay, this one included — or another writer got in first. Its holder is
    /// `<relay run id>.sweep:<counter>`: a `Sub` at this relay meanwhile does not take it
    /// as its own earlier run's (it is refused `busy`, as at any other relay). Not renewed:
    /// released right after, or lapsing after the TTL.
    pub(super) async fn take_briefly(&self, k: &str) -> Result<Option<u64>, String> {
        let last = self.last_record(k).await.map_err(|e| e.to_string())?;
        if last.hold.as_ref().is_some_and(|(_, left)| *left > 0) {
            return Ok(None);
        }
        let last = last.seq;
        let holder = format!(
            "{}.sweep:{}",
            self.relay_id,
            self.next.fetch_add(1, Relaxed)
        );
        match self.write(k, last, self.record(&holder)).await {
            Ok(seq) => Ok(self.settled(k, seq).await?.then_some(seq)),
            Err(WriteError::Moved) => Ok(None),
            Err(WriteError::Failed(e)) => Err(e),
        }
    }

    /// Starts giving `k` back: its holder (for [`finish_release`](Self::finish_release)),
    /// if this relay held it. Until then it still holds `k` ([`holds`](Self::holds)) and
    /// renews it: the subscription's last floors, on their way to NATS, are written as
    /// the holder's (conditionally on the record), not dropped as another relay's.
    pub(super) fn begin_release(&self, k: &str) -> Option<String> {
        let mut held = lock(&self.held);
        let h = held.get_mut(k).filter(|h| !h.releasing)?;
        h.releasing = true;
        Some(h.holder.clone())
    }

    /// Stops holding `k` given back as `holder`: the record to write the release over (its
    /// condition), unless it was lost or taken again here meanwhile.
    pub(super) fn finish_release(&self, k: &str, holder: &str) -> Option<u64> {
        let mut held = lock(&self.held);
        if !held
            .get(k)
            .is_some_and(|h| h.releasing && h.holder == holder)
        {
            return None;
        }
        held.remove(k).map(|h| h.seq)
    }

    /// Writes the released (empty) record of `k` over this relay's record `seq`.
    pub(super) async fn release(&self, k: &str, seq: u64) {
        match self.write(k, seq, Bytes::new()).await {
            Ok(_) | Err(WriteError::Moved) => {}
            Err(WriteError::Failed(e)) => {
                tracing::debug!(error = %e, "cluster store: durable hold not released (it lapses)");
            }
        }
    }

    /// Releases every lease this relay holds (graceful shutdown).
    pub(super) async fn release_all(&self) {
        let all: Vec<(String, u64)> = lock(&self.held).drain().map(|(k, h)| (k, h.seq)).collect();
        for (k, seq) in all {
            self.release(&k, seq).await;
        }
    }

    fn end(&self, k: &str, why: &str) {
        if let Some(h) = lock(&self.held).remove(k) {
            if h.releasing {
                // Its subscription is over: only its last floors are dropped now.
                tracing::debug!(why, "cluster store: durable hold lost while given back");
                return;
            }
            tracing::warn!(durable = ?h.key.name, why, "cluster store: durable hold lost");
            h.lost.notify(h.key);
        }
    }

    /// One round of renewals (see the module docs).
    async fn renew(&self) {
        let ttl = self.ttl;
        let now = Instant::now();
        let mut due = Vec::new();
        let mut late = Vec::new();
        for (k, h) in lock(&self.held).iter() {
            if now >= h.renewed + ttl * 5 / 6 {
                late.push(k.clone());
            } else {
                due.push((k.clone(), h.seq, self.record(&h.holder)));
            }
        }
        for k in late {
            self.end(&k, "not renewed in time");
        }
        let sent = Instant::now();
        let writes = due.into_iter().map(|(k, seq, rec)| async move {
            let r = tokio::time::timeout(ttl / 6, self.write(&k, seq, rec))
                .await
                .unwrap_or_else(|_| Err(WriteError::Failed("timed out".into())));
            (k, seq, r)
        });
        for (k, seq, r) in futures_util::future::join_all(writes).await {
            match r {
                Ok(new) => {
                    if let Some(h) = lock(&self.held).get_mut(&k) {
                        if h.seq == seq {
                            h.seq = new;
                            h.renewed = sent;
                        }
                    }
                }
                Err(WriteError::Moved) => {
                    let mine = lock(&self.held).get(&k).is_some_and(|h| h.seq == seq);
                    if mine {
                        self.end(&k, "taken at another relay");
                    }
                }
                Err(WriteError::Failed(e)) => {
                    let lapsing = lock(&self.held)
                        .get(&k)
                        .is_some_and(|h| h.seq == seq && Instant::now() >= h.renewed + ttl / 2);
                    if lapsing {
                        tracing::warn!(error = %e, "cluster store: durable hold not renewed");
                        self.end(&k, "not renewed in time");
                    }
                }
            }
        }
    }
}

/// Renews the relay's leases every third of the TTL while the store lives.
pub(super) async fn renew_loop(leases: std::sync::Weak<Leases>, ttl: Duration) {
    let mut every = tokio::time::interval(ttl / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(l) = leases.upgrade() else { return };
        l.renew().await;
    }
}
