//! Batch signing in the engine: prepared publishes queue here in publish order, are cut into
//! [`SealJob`]s by the [`BatchPolicy`] (at most N messages, or once the oldest waited the
//! window), and wait — with any sealed publish, flush or close issued after them — until
//! their job answers. Units leave in id order only, so frames leave in publish order
//! whatever order the jobs finish in (the same park-and-reorder as `core::jobs` on the
//! receiving side).

use std::collections::{BTreeMap, VecDeque};

use whispeer_protocol::{BatchPolicy, Envelope, Prepared, Qos, SealError};

use super::types::{FlushId, PubOptions, PublishId};
use crate::core::batching::{prepared_weight, SealDone, SealJob};

/// Most bytes (by [`prepared_weight`]) of publishes in one seal job, whatever the message
/// cap: a batch is sealed whole before its first frame leaves, so 256 large messages would
/// hold the first back for all of their sealing. A full batch of 256 × 1 KiB is ~420 KiB;
/// of 16 KiB messages the cap cuts at ~64 (the message cap before wave 2 session 22); one
/// publish larger than the cap goes alone.
pub const BATCH_MAX_BYTES: usize = 1 << 20;

/// What a queued publish carries to its release: its options, its id, its backlog bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    pub(super) o: PubOptions,
    pub(super) pid: Option<PublishId>,
    pub(super) weight: usize,
}

impl Meta {
    fn kept(&self) -> bool {
        self.o.qos != Qos::AtMostOnce && self.pid.is_some()
    }
}

/// Something that must leave after everything published before it.
#[derive(Debug)]
pub(super) enum Unit {
    /// A cut batch: its publishes, and the job's results once it answered.
    Batch {
        metas: Vec<Meta>,
        results: Option<Vec<Result<Envelope, SealError>>>,
    },
    /// A publish sealed whole by the caller, behind publishes still being sealed.
    Sealed(Envelope, Meta),
    /// A flush issued behind publishes still being sealed.
    Flush(FlushId),
    /// A close issued behind publishes still being sealed.
    Close,
}

/// The engine's publish pipeline (see the module documentation).
#[derive(Debug)]
pub(super) struct Sealing {
    policy: BatchPolicy,
    /// Most jobs handed out and not answered (at least 1).
    ahead: usize,
    queue: Vec<(Prepared, Meta)>,
    /// Bytes (weights) of the publishes in `queue`.
    queued: usize,
    /// When the oldest queued publish arrived (monotonic ms).
    since: Option<u64>,
    units: BTreeMap<u64, Unit>,
    jobs: VecDeque<SealJob>,
    /// Jobs cut and not answered (queued in `jobs` or out with the driver).
    out: usize,
    next: u64,
    /// Backlog bytes of every publish queued or in a unit.
    bytes: usize,
    /// QoS ≥ 1 publishes queued or in a unit (already unacknowledged).
    kept: usize,
    /// Steady-stream batching ([`TRICKLE_LONE`]): on, and its state.
    trickle: bool,
    /// The millisecond of the last lone cut, and how many lone cuts it saw.
    lone_tick: u64,
    lone_in_tick: u32,
    /// A steady stream was seen until this millisecond: a lone publish waits for company.
    trickle_until: u64,
    /// The queue's lone publish was held for company (its cut, once two, keeps the mode).
    held: bool,
}

/// Lone cuts within one millisecond that mark a steady stream (≥ ~6,000 publishes a
/// second, one at a time). Then each lone publish waits — at most to the end of the
/// millisecond it came in — for the next, and the two share a signature: a steady stream
/// at 10k msg/s otherwise pays a signature and, at every receiver, a verification per
/// message (SPEED-HISTORY, session 55). Bursts (several queued at a cut) and sparse
/// publishes are cut as before.
const TRICKLE_LONE: u32 = 6;

/// Publishes a steady stream's batch waits for (at most to the end of the millisecond its
/// first came in).
const TRICKLE_BATCH: usize = 3;

/// How long (ms) the steady-stream mode lasts after the cut that set or renewed it.
const TRICKLE_KEEP_MS: u64 = 2;

impl Sealing {
    pub(super) fn new(policy: BatchPolicy, ahead: usize, trickle: bool) -> Self {
        Sealing {
            trickle,
            lone_tick: 0,
            lone_in_tick: 0,
            trickle_until: 0,
            held: false,
            policy,
            ahead: ahead.max(1),
            queue: Vec::new(),
            queued: 0,
            since: None,
            units: BTreeMap::new(),
            jobs: VecDeque::new(),
            out: 0,
            next: 0,
            bytes: 0,
            kept: 0,
        }
    }

    fn max(&self) -> usize {
        self.policy.max_messages.clamp(1, 4096) as usize
    }

    /// How many queued publishes the next batch takes: at most [`Sealing::max`], and no
    /// more than [`BATCH_MAX_BYTES`] of them (at least one).
    fn take(&self) -> usize {
        let mut bytes = 0;
        let mut n = 0;
        for (_, m) in self.queue.iter().take(self.max()) {
            if n > 0 && bytes + m.weight > BATCH_MAX_BYTES {
                break;
            }
            bytes += m.weight;
            n += 1;
        }
        n
    }

    /// Whether the queue holds a whole batch (by count or by bytes).
    fn full(&self) -> bool {
        self.queue.len() >= self.max() || self.queued > BATCH_MAX_BYTES
    }

    /// Whether anything waits (then a sealed publish, flush or close must queue behind).
    pub(super) fn busy(&self) -> bool {
        !self.queue.is_empty() || !self.units.is_empty()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn kept(&self) -> usize {
        self.kept
    }

    /// Queues a prepared publish; true when the queue went from empty to non-empty or
    /// filled a batch (the moments a driver needs waking).
    pub(super) fn push(
        &mut self,
        p: Prepared,
        o: PubOptions,
        pid: Option<PublishId>,
        mono: u64,
    ) -> bool {
        let meta = Meta {
            o,
            pid,
            weight: prepared_weight(&p),
        };
        self.bytes += meta.weight;
        self.kept += usize::from(meta.kept());
        self.since.get_or_insert(mono);
        let was_full = self.full();
        self.queued += meta.weight;
        self.queue.push((p, meta));
        self.queue.len() == 1 || self.queue.len() % self.max() == 0 || (self.full() && !was_full)
    }

    /// Queues `u` behind everything before it (the queue is cut first, whatever the cap).
    pub(super) fn push_unit(&mut self, u: Unit) {
        self.cut_all();
        self.held = false;
        if let Unit::Sealed(_, m) = &u {
            self.bytes += m.weight;
            self.kept += usize::from(m.kept());
        }
        let id = self.next;
        self.next += 1;
        self.units.insert(id, u);
    }

    /// When the queue is due by time (a positive window, or a lone publish waiting for
    /// company in a steady stream: the end of its millisecond).
    pub(super) fn deadline(&self) -> Option<u64> {
        if self.out >= self.ahead {
            return None;
        }
        if self.policy.max_wait_us == 0 {
            return self
                .since
                .filter(|_| self.waits_for_company())
                .map(|s| s + 1);
        }
        let wait_ms = self.policy.max_wait_us.div_ceil(1000);
        self.since.map(|s| s.saturating_add(wait_ms))
    }

    /// The next job to run: cuts one batch when fewer than `ahead` jobs are out and the
    /// queue is full or due (with no window: whatever is queued).
    pub(super) fn poll_job(&mut self, mono: u64) -> Option<SealJob> {
        if self.jobs.is_empty() && self.out < self.ahead && !self.queue.is_empty() {
            let due = self.since.is_some_and(|s| {
                mono.saturating_sub(s).saturating_mul(1000) >= self.policy.max_wait_us
            });
            let hold = self.waits_for_company() && self.since == Some(mono);
            if hold {
                self.held = true;
            } else if self.full() || due {
                let n = self.take();
                self.cut(n);
                self.note_cut(n, mono);
            }
        }
        self.jobs.pop_front()
    }

    /// Whether the queue is one lone publish of a steady stream (see [`TRICKLE_LONE`]).
    fn waits_for_company(&self) -> bool {
        self.trickle
            && self.policy.max_wait_us == 0
            && self.queue.len() < TRICKLE_BATCH
            && self.since.is_some_and(|s| s < self.trickle_until)
    }

    /// Keeps the steady-stream state after a cut of `n` at `mono`: lone cuts counted per
    /// millisecond set it, a held publish cut with its company renews it, any other batch
    /// (a burst queued by itself) ends it.
    fn note_cut(&mut self, n: usize, mono: u64) {
        if !self.trickle {
            return;
        }
        let held = std::mem::take(&mut self.held);
        if n == 1 {
            if self.lone_tick == mono {
                self.lone_in_tick += 1;
            } else {
                (self.lone_tick, self.lone_in_tick) = (mono, 1);
            }
            if self.lone_in_tick >= TRICKLE_LONE {
                self.trickle_until = mono + TRICKLE_KEEP_MS;
            }
        } else if held && n <= TRICKLE_BATCH {
            self.trickle_until = mono + TRICKLE_KEEP_MS;
        } else {
            self.trickle_until = 0;
        }
    }

    fn cut_all(&mut self) {
        while !self.queue.is_empty() {
            self.cut(self.take());
        }
    }

    /// Cuts the first `n` queued publishes into a unit and its job.
    fn cut(&mut self, n: usize) {
        let n = n.min(self.queue.len());
        if n == 0 {
            return;
        }
        let rest = self.queue.split_off(n);
        let batch = std::mem::replace(&mut self.queue, rest);
        self.queued -= batch.iter().map(|(_, m)| m.weight).sum::<usize>();
        self.since = if self.queue.is_empty() {
            None
        } else {
            self.since
        };
        let id = self.next;
        self.next += 1;
        let (msgs, metas): (Vec<Prepared>, Vec<Meta>) = batch.into_iter().unzip();
        self.units.insert(
            id,
            Unit::Batch {
                metas,
                results: None,
            },
        );
        self.jobs.push_back(SealJob {
            id,
            msgs,
            policy: self.policy,
        });
        self.out += 1;
    }

    /// A job answered: true when it was one still waiting (a stale or malformed answer is
    /// ignored; a short answer fails the missing publishes).
    pub(super) fn answer(&mut self, done: SealDone) -> bool {
        match self.units.get_mut(&done.id) {
            Some(Unit::Batch {
                metas,
                results: r @ None,
            }) => {
                let mut results = done.results;
                results.truncate(metas.len());
                // An answer short of messages (a broken runner): the missing ones failed.
                results.resize_with(metas.len(), || Err(SealError::BatchEmpty));
                *r = Some(results);
                self.out = self.out.saturating_sub(1);
                true
            }
            _ => false,
        }
    }

    /// The next unit that may leave (everything before it has).
    pub(super) fn pop_ready(&mut self) -> Option<Unit> {
        match self.units.first_key_value() {
            None | Some((_, Unit::Batch { results: None, .. })) => return None,
            Some(_) => {}
        }
        let (_, u) = self.units.pop_first()?;
        match &u {
            Unit::Batch { metas, .. } => {
                for m in metas {
                    self.release(m);
                }
            }
            Unit::Sealed(_, m) => self.release(m),
            _ => {}
        }
        Some(u)
    }

    fn release(&mut self, m: &Meta) {
        self.bytes = self.bytes.saturating_sub(m.weight);
        self.kept = self.kept.saturating_sub(usize::from(m.kept()));
    }

    /// Forgets everything (closed for good): the publishes with an id and the flushes that
    /// were waiting, in order, and how many publishes without an id were dropped.
    pub(super) fn clear(&mut self) -> (Vec<PublishId>, Vec<FlushId>, u64) {
        let (mut pids, mut flushes, mut dropped) = (Vec::new(), Vec::new(), 0u64);
        let mut meta = |m: &Meta| match m.pid {
            Some(p) => pids.push(p),
            None => dropped += 1,
        };
        for (_, u) in std::mem::take(&mut self.units) {
            match u {
                Unit::Batch { metas, .. } => metas.iter().for_each(&mut meta),
                Unit::Sealed(_, m) => meta(&m),
                Unit::Flush(id) => flushes.push(id),
                Unit::Close => {}
            }
        }
        for (_, m) in std::mem::take(&mut self.queue) {
            meta(&m);
        }
        self.jobs.clear();
        self.since = None;
        self.out = 0;
        self.bytes = 0;
        self.kept = 0;
        (pids, flushes, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::batching::tests::{prepare, setup};
    use whispeer_protocol::Keyring;

    fn prepared(kr: &Keyring) -> Prepared {
        prepare(kr, "t", 0)
    }

    fn keyring() -> Keyring {
        setup().0
    }

    fn sealing(trickle: bool) -> Sealing {
        let policy = BatchPolicy {
            max_messages: 256,
            max_wait_us: 0,
        };
        Sealing::new(policy, 2, trickle)
    }

    /// Pushes one publish at `mono` and runs what the driver would: the job cut (its size)
    /// answered at once, or `None` while the publish waits.
    fn publish(s: &mut Sealing, kr: &Keyring, mono: u64) -> Option<usize> {
        s.push(prepared(kr), PubOptions::default(), None, mono);
        cut(s, mono)
    }

    fn cut(s: &mut Sealing, mono: u64) -> Option<usize> {
        let job = s.poll_job(mono)?;
        let n = job.msgs.len();
        assert!(s.answer(SealDone {
            id: job.id,
            results: Vec::new(),
        }));
        while s.pop_ready().is_some() {}
        Some(n)
    }

    /// A steady stream (lone publishes, six or more in a millisecond) is signed in threes:
    /// a lone publish waits for two more, at most to the end of its millisecond (the
    /// deadline the driver wakes at); a burst (several queued at a cut) ends the mode.
    #[test]
    fn a_steady_stream_of_lone_publishes_batches_in_threes_and_a_burst_ends_it() {
        let kr = keyring();
        let mut s = sealing(true);
        for _ in 0..TRICKLE_LONE {
            assert_eq!(publish(&mut s, &kr, 5), Some(1), "lone, cut at once");
        }
        assert_eq!(publish(&mut s, &kr, 5), None, "held for company");
        assert_eq!(
            s.deadline(),
            Some(6),
            "at most to the end of its millisecond"
        );
        assert_eq!(publish(&mut s, &kr, 5), None);
        assert_eq!(
            publish(&mut s, &kr, 5),
            Some(3),
            "the three share a signature"
        );
        // The mode goes on; the stream stops: the lone one leaves the next millisecond.
        assert_eq!(publish(&mut s, &kr, 6), None);
        assert_eq!(cut(&mut s, 6), None, "still its millisecond");
        assert_eq!(cut(&mut s, 7), Some(1), "due at the deadline");
        // Set again, then a burst queued by itself ends it: its tail is not held.
        for _ in 0..TRICKLE_LONE {
            assert_eq!(publish(&mut s, &kr, 9), Some(1));
        }
        for _ in 0..4 {
            s.push(prepared(&kr), PubOptions::default(), None, 9);
        }
        assert_eq!(cut(&mut s, 9), Some(4));
        assert_eq!(
            publish(&mut s, &kr, 9),
            Some(1),
            "after a burst: cut at once"
        );
        assert_eq!(s.deadline(), None);
    }

    /// Sparse lone publishes (fewer than six a millisecond), and an engine without the
    /// mode (the wasm client), cut every publish at once.
    #[test]
    fn sparse_publishes_and_an_engine_without_the_mode_cut_at_once() {
        let kr = keyring();
        let mut s = sealing(true);
        for ms in [1, 1, 1, 1, 1, 2, 3, 3, 5, 6, 6, 6, 6] {
            assert_eq!(publish(&mut s, &kr, ms), Some(1), "at {ms}");
        }
        let mut off = sealing(false);
        for _ in 0..8 {
            assert_eq!(publish(&mut off, &kr, 9), Some(1));
        }
        assert_eq!(off.deadline(), None);
    }
}
