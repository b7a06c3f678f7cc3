//! Batch signing on the publish path (PROTOCOL §4.14), shared by the tokio driver and the
//! WebAssembly engine.
//!
//! The app's tasks *prepare* each publish (key lookup, compression, the §4.8 signature
//! input) where they run, so that work spreads over the cores; the engine
//! ([`Engine::publish_prepared`](super::connection::Engine::publish_prepared)) queues the
//! prepared messages in publish order and cuts them into [`SealJob`]s: one Ed25519
//! signature covers the Merkle root of a job's messages and each is sealed with its own
//! inclusion proof — a receiver of one topic of the batch verifies its message alone, and
//! caches the root so the rest of the batch costs no further signature check. A driver runs
//! the jobs on worker threads (tokio) or at once (wasm, inline mode); the engine re-orders
//! the results by job id, so frames leave in publish order.
//!
//! The window is *opportunistic* by default ([`BatchPolicy`] `max_wait_us = 0`): the engine
//! cuts whatever is queued each time the driver asks for a job, so a message never waits for
//! a timer — a publisher at a gentle rate gets batches of one (the per-message cost and
//! latency), a tight loop fills batches by itself while the previous jobs are being signed
//! (at most `seal_ahead` out at once). A positive `max_wait_us` trades that latency for
//! larger batches at moderate rates. [`PublishBatch`] is the same batching over a plain
//! list, for callers without an engine.

use rand_core::CryptoRngCore;
use whispeer_protocol::{
    BatchPolicy, BatchSigner, Envelope, Identity, Prepared, SealError, Sealer, Signing,
};

/// Publishes prepared and not yet signed, each with the caller's `M` (what to do with the
/// envelope: options, a reply), in publish order.
#[derive(Debug)]
pub struct PublishBatch<M> {
    policy: BatchPolicy,
    pending: Vec<(Prepared, M)>,
    /// When the oldest pending message arrived (µs, the caller's clock).
    first_us: Option<u64>,
    /// Payload bytes pending (what the batch will put on the wire, near enough).
    bytes: usize,
}

impl<M> PublishBatch<M> {
    /// An empty batch with `policy` (`max_messages` is clamped to 1..=4096 when signing).
    pub fn new(policy: BatchPolicy) -> Self {
        PublishBatch {
            policy,
            pending: Vec::new(),
            first_us: None,
            bytes: 0,
        }
    }

    /// Queues a prepared message at `now_us`.
    pub fn push(&mut self, msg: Prepared, meta: M, now_us: u64) {
        self.first_us.get_or_insert(now_us);
        self.bytes += msg.payload_len();
        self.pending.push((msg, meta));
    }

    /// Payload bytes of the messages waiting (backpressure counts them as queued).
    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }

    /// The caller's data of each waiting message, in publish order.
    pub fn pending(&self) -> impl Iterator<Item = &M> {
        self.pending.iter().map(|(_, m)| m)
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether to sign now: a full batch waits, or the oldest has waited `max_wait_us`.
    pub fn due(&self, now_us: u64) -> bool {
        self.pending.len() >= self.policy.max_messages.max(1) as usize
            || self
                .first_us
                .is_some_and(|f| now_us.saturating_sub(f) >= self.policy.max_wait_us)
    }

    /// When the pending messages become due by time (`None` when nothing waits).
    pub fn deadline_us(&self) -> Option<u64> {
        self.first_us
            .map(|f| f.saturating_add(self.policy.max_wait_us))
    }

    /// Signs and seals everything pending, in order: one signature per run of at most
    /// `max_messages` messages of one (tree, epoch) — a batch never spans two (§4.14).
    /// Returns each message's envelope (or why it could not be sealed) with its `M`.
    pub fn seal_all(
        &mut self,
        sealer: &mut Sealer,
        signer: &Identity,
        rng: &mut impl CryptoRngCore,
    ) -> Vec<(Result<Envelope, SealError>, M)> {
        self.first_us = None;
        self.bytes = 0;
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(pending.len());
        let mut run: Vec<(Prepared, M)> = Vec::new();
        let mut signer_batch = BatchSigner::new(self.policy);
        for (msg, meta) in pending {
            match signer_batch.push(&msg, 0, rng) {
                Ok(_) => run.push((msg, meta)),
                Err(SealError::BatchTreeEpoch | SealError::BatchFull(_)) => {
                    let full = std::mem::replace(&mut signer_batch, BatchSigner::new(self.policy));
                    seal_run(
                        full,
                        std::mem::take(&mut run),
                        sealer,
                        signer,
                        rng,
                        &mut out,
                    );
                    match signer_batch.push(&msg, 0, rng) {
                        Ok(_) => run.push((msg, meta)),
                        Err(e) => out.push((Err(e), meta)),
                    }
                }
                Err(e) => out.push((Err(e), meta)),
            }
        }
        seal_run(signer_batch, run, sealer, signer, rng, &mut out);
        out
    }
}

/// The backlog bytes a prepared publish counts for until it is sealed and written: its
/// payload plus the header, proof (a path of up to 12 hashes) and tag — well under 1 KiB.
/// The tokio handle reserves exactly this, and the engine counts it while the publish
/// waits for its seal job.
pub fn prepared_weight(p: &Prepared) -> usize {
    p.payload_len() + 640
}

/// One cut batch of prepared publishes to sign and seal elsewhere, from
/// [`Engine::poll_seal_job`](super::connection::Engine::poll_seal_job): seal each message,
/// build the Merkle batch, one Ed25519 signature per run of one (tree, epoch). A pure
/// function over owned bytes and the key material the runner passes in (the identity, a
/// [`Sealer`] and a CSPRNG of its thread): no clock, no socket, so the engine stays sans-IO.
/// Hand the result back with
/// [`Engine::handle_sealed`](super::connection::Engine::handle_sealed), in any order: the
/// engine re-orders by job id, so frames leave in publish order.
#[derive(Debug)]
pub struct SealJob {
    pub(crate) id: u64,
    pub(crate) msgs: Vec<Prepared>,
    pub(crate) policy: BatchPolicy,
}

/// What became of a [`SealJob`]: one result per message, in the job's order.
#[derive(Debug)]
pub struct SealDone {
    pub(crate) id: u64,
    pub(crate) results: Vec<Result<Envelope, SealError>>,
}

impl SealDone {
    /// The id of the job it answers.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl SealJob {
    /// The job's id (increasing in publish order).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Messages in the job.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether the job holds no message (never, for a job the engine hands out).
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Signs and seals the job's messages with `signer` (any thread; keep one `sealer` per
    /// thread). A batch never spans two (tree, epoch) pairs: a job of several is split into
    /// runs, one signature each (PROTOCOL §4.14).
    pub fn run(
        self,
        signer: &Identity,
        sealer: &mut Sealer,
        rng: &mut impl CryptoRngCore,
    ) -> SealDone {
        let mut batch = PublishBatch::new(self.policy);
        for m in self.msgs {
            batch.push(m, (), 0);
        }
        let results = batch
            .seal_all(sealer, signer, rng)
            .into_iter()
            .map(|(r, ())| r)
            .collect();
        SealDone {
            id: self.id,
            results,
        }
    }

    /// Answers the job without sealing: every message fails with `error` (a runner that
    /// cannot sign, e.g. no identity any more).
    pub fn fail(self, error: SealError) -> SealDone {
        SealDone {
            id: self.id,
            results: self.msgs.iter().map(|_| Err(error.clone())).collect(),
        }
    }
}

fn seal_run<M>(
    batch: BatchSigner,
    run: Vec<(Prepared, M)>,
    sealer: &mut Sealer,
    signer: &Identity,
    rng: &mut impl CryptoRngCore,
    out: &mut Vec<(Result<Envelope, SealError>, M)>,
) {
    if run.is_empty() {
        return;
    }
    match batch.sign(signer) {
        Ok(proofs) => {
            for ((msg, meta), proof) in run.into_iter().zip(&proofs) {
                out.push((sealer.seal_prepared(&msg, Signing::Batch(proof), rng), meta));
            }
        }
        Err(e) => {
            for (_, meta) in run {
                out.push((Err(e.clone()), meta));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand_core::OsRng;
    use whispeer_protocol::{Keyring, MessageId, Opener, Outgoing, SealOptions, Topic, TreeKey};

    pub(crate) fn setup() -> (Keyring, Identity) {
        let tk = TreeKey::generate_with("b", &mut OsRng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        (kr, Identity::generate_with(&mut OsRng))
    }

    pub(crate) fn prepare(kr: &Keyring, topic: &str, i: u32) -> Prepared {
        let key = kr.topic_key(&Topic::new(topic).unwrap()).unwrap();
        let payload = i.to_be_bytes();
        let out = Outgoing {
            payload: &payload,
            content_type: "application/octet-stream",
            msg_id: MessageId::random(&mut OsRng),
            ts_ms: 1_000 + u64::from(i),
        };
        Sealer::new()
            .prepare(&key, &out, &SealOptions::default())
            .unwrap()
    }

    #[test]
    fn opportunistic_by_default_and_due_when_full_or_late() {
        let (kr, _) = setup();
        let mut b = PublishBatch::new(BatchPolicy {
            max_messages: 3,
            max_wait_us: 100,
        });
        assert!(!b.due(0));
        assert_eq!(b.deadline_us(), None);
        b.push(prepare(&kr, "a", 0), (), 10);
        assert!(!b.due(50));
        assert_eq!(b.deadline_us(), Some(110));
        assert!(b.due(110));
        b.push(prepare(&kr, "a", 1), (), 20);
        b.push(prepare(&kr, "a", 2), (), 30);
        assert!(b.due(30), "full");
        let z = PublishBatch::<()>::new(BatchPolicy {
            max_messages: 64,
            max_wait_us: 0,
        });
        assert!(!z.due(5), "nothing pending is never due");
    }

    #[test]
    fn seals_in_order_splitting_runs_and_each_opens_alone() {
        let (kr, id) = setup();
        let mut b = PublishBatch::new(BatchPolicy {
            max_messages: 4,
            max_wait_us: 0,
        });
        for i in 0..10u32 {
            let topic = if i % 2 == 0 { "x/even" } else { "x/odd" };
            b.push(prepare(&kr, topic, i), i, 0);
        }
        let out = b.seal_all(&mut Sealer::new(), &id, &mut OsRng);
        assert!(b.is_empty());
        assert_eq!(
            out.iter().map(|(_, m)| *m).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        let mut opener = Opener::new();
        for (env, i) in out {
            let opened = opener.open(&kr, &env.unwrap(), 0).unwrap();
            assert_eq!(opened.payload, i.to_be_bytes());
            assert_eq!(opened.sender, Some(id.sender_id()));
        }
        // 10 messages in runs of at most 4: three signatures, the rest cache hits.
        assert_eq!(opener.verified_roots().hits(), 7);
    }
}
