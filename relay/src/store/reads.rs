//! Store reads off the async runtime, served fairly between tenants.
//!
//! Every history, replay, retained and catch-up read of the process runs on ONE long-lived
//! reader thread (a store has one reader connection, so running reads one at a time loses
//! nothing; `spawn_blocking` per read woke a pool thread per replaying `Sub`, and under a
//! `Sub` flood the pool's threads spent their time contending on the pool's own lock).
//!
//! The thread's queue is fair per [`Tenant`] (the connection's account, or its source
//! address): each tenant has its own FIFO of reads, and the thread serves the tenants with
//! reads queued round-robin, ONE read per tenant per turn. A tenant flooding replaying
//! `Sub`s therefore lengthens its own queue only: another tenant's read waits for at most
//! one read of each other tenant with reads queued (plus the read running when it was
//! queued), never for the flood's backlog.
//!
//! Memory is bounded per tenant: at most [`MAX_QUEUED_READS_PER_TENANT`] history and
//! retained reads queued; past that the read is refused at once with the retryable
//! [`StoreError::Busy`] (the `Sub` gets a non-fatal `Err(busy)` naming its sub id) and
//! counted (`whispeer_relay_store_read_busy_rejections_total`). A catch-up read (a paused
//! QoS ≥ 1 subscription working off what it skipped, [`Admission::Always`]) is never
//! refused: at most one is queued per tracked subscription, so the subscription limits
//! bound them, and an aborted catch-up would resend what it already sent.
//!
//! A read job is short: a history read examines at most one chunk of rows (the SQLite
//! store's `READ_CHUNK`, 1,024 rows; JetStream's `CHUNK`; either ends after
//! [`READ_CHUNK_BYTES`](super::READ_CHUNK_BYTES) of envelopes) and the task asks for the next
//! chunk only after queueing the previous one, so a long replay takes many turns, not one.
//! A retained read is chunked the same way (by sequence, ending after
//! `READ_CHUNK_BYTES`). Not chunked: a `LastN` plan (one lookup per path of the key id,
//! bounded by the path quotas).
//!
//! A panicking read fails its own caller (its reply is dropped, the caller sees
//! [`StoreError::Unavailable`]), never the thread every later read needs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use super::{StoreError, Tenant};

/// A store read to run on the reader thread.
type ReadJob = Box<dyn FnOnce() + Send>;

/// Most history and retained reads one tenant may have queued on the reader thread; more
/// are refused with [`StoreError::Busy`]. Each replaying `Sub` queues one read at a time,
/// so an honest tenant reaches this only with over a thousand replays starting at once.
pub const MAX_QUEUED_READS_PER_TENANT: usize = 1024;

/// Whether a read may be refused when its tenant's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Refused with [`StoreError::Busy`] past [`MAX_QUEUED_READS_PER_TENANT`] (history,
    /// replay, retained).
    Capped,
    /// Always queued (catch-up reads: at most one per tracked subscription).
    Always,
}

/// The reader thread's counters (process-wide: every relay of the process shares it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadQueueStatus {
    /// Reads queued, all tenants (not counting the one running).
    pub queued: u64,
    /// Tenants with reads queued.
    pub tenants: u64,
    /// Reads started since the process started.
    pub served: u64,
    /// Reads refused because their tenant had [`MAX_QUEUED_READS_PER_TENANT`] queued.
    pub refused: u64,
}

#[derive(Default)]
struct Queues {
    /// Each tenant's reads, oldest first; a tenant is here only while it has some.
    by_tenant: HashMap<Tenant, VecDeque<ReadJob>>,
    /// Whose turn it is: every tenant of `by_tenant` once, the next to serve first.
    turns: VecDeque<Tenant>,
    queued: usize,
}

/// The store-reader queue: per-tenant FIFOs served round-robin, one read per tenant per
/// turn, by one thread ([`reads`] is the process's).
pub struct ReadQueue {
    queues: Mutex<Queues>,
    ready: Condvar,
    per_tenant: usize,
    served: AtomicU64,
    refused: AtomicU64,
    /// Bumped on every push and pop, so a caller can wait for the queue to change.
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for ReadQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadQueue")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Queues>) -> MutexGuard<'_, Queues> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReadQueue {
    fn new(per_tenant: usize) -> Self {
        ReadQueue {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
            per_tenant: per_tenant.max(1),
            served: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// Queues `job` at the end of `tenant`'s FIFO (a tenant with nothing queued joins the
    /// end of the round). Refused with [`StoreError::Busy`] when `admission` is
    /// [`Admission::Capped`] and the tenant already has its maximum queued.
    fn push(&self, tenant: &Tenant, admission: Admission, job: ReadJob) -> Result<(), StoreError> {
        {
            let mut g = lock(&self.queues);
            let q = &mut *g;
            match q.by_tenant.get_mut(tenant) {
                Some(jobs) => {
                    if admission == Admission::Capped && jobs.len() >= self.per_tenant {
                        drop(g);
                        self.refused.fetch_add(1, Relaxed);
                        return Err(StoreError::Busy(format!(
                            "this tenant has {} store reads queued; retry later",
                            self.per_tenant
                        )));
                    }
                    jobs.push_back(job);
                }
                None => {
                    q.by_tenant.insert(tenant.clone(), VecDeque::from([job]));
                    q.turns.push_back(tenant.clone());
                }
            }
            q.queued += 1;
        }
        self.ready.notify_one();
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Blocks until a read is queued, then takes the oldest read of the tenant whose turn
    /// it is; that tenant goes to the end of the round if it has more.
    fn pop(&self) -> ReadJob {
        let mut g = lock(&self.queues);
        loop {
            let q = &mut *g;
            if let Some(tenant) = q.turns.pop_front() {
                let Some(jobs) = q.by_tenant.get_mut(&tenant) else {
                    continue;
                };
                let job = jobs.pop_front();
                if jobs.is_empty() {
                    q.by_tenant.remove(&tenant);
                } else {
                    q.turns.push_back(tenant);
                }
                if let Some(job) = job {
                    q.queued -= 1;
                    drop(g);
                    self.changes.send_modify(|n| *n = n.wrapping_add(1));
                    return job;
                }
                continue;
            }
            g = self.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The reader thread's loop: runs reads one at a time, forever.
    fn serve(&self) {
        loop {
            let job = self.pop();
            self.served.fetch_add(1, Relaxed);
            // A panicking read fails its own caller (its reply is dropped), not the thread
            // every later read needs.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }

    /// Counters now.
    pub fn status(&self) -> ReadQueueStatus {
        let (queued, tenants) = {
            let q = lock(&self.queues);
            (q.queued as u64, q.by_tenant.len() as u64)
        };
        ReadQueueStatus {
            queued,
            tenants,
            served: self.served.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }

    /// Reads `tenant` has queued now.
    pub fn queued_for(&self, tenant: &Tenant) -> usize {
        lock(&self.queues)
            .by_tenant
            .get(tenant)
            .map_or(0, VecDeque::len)
    }

    /// Changes whenever a read is queued or taken (to wait on a queue state without
    /// polling).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Starts a reader thread serving a new queue.
fn start(per_tenant: usize) -> Arc<ReadQueue> {
    let queue = Arc::new(ReadQueue::new(per_tenant));
    let served = queue.clone();
    std::thread::Builder::new()
        .name("whispeer-reads".into())
        .spawn(move || served.serve())
        .expect("spawn the store reader thread");
    queue
}

/// The process's one store-reader queue (its thread starts on first use).
pub fn reads() -> &'static ReadQueue {
    static READS: OnceLock<Arc<ReadQueue>> = OnceLock::new();
    READS.get_or_init(|| start(MAX_QUEUED_READS_PER_TENANT))
}

/// Runs a store read for `tenant` on the store-reader thread (off the runtime, in the
/// tenant's turn) and awaits its result.
pub(crate) async fn read_off_runtime<T: Send + 'static>(
    tenant: &Tenant,
    admission: Admission,
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    run_on(reads(), tenant, admission, read).await
}

async fn run_on<T: Send + 'static>(
    queue: &ReadQueue,
    tenant: &Tenant,
    admission: Admission,
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    queue.push(
        tenant,
        admission,
        Box::new(move || {
            let _ = tx.send(read());
        }),
    )?;
    rx.await
        .map_err(|_| StoreError::Unavailable("a store read failed".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::mpsc;

    fn tenant(n: u8) -> Tenant {
        Tenant::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
    }

    /// A queue whose thread is stopped in a gate job (tenant 0) until the returned sender
    /// sends or drops, so everything queued meanwhile is ordered by the queue alone.
    fn gated(per_tenant: usize) -> (Arc<ReadQueue>, mpsc::Sender<()>) {
        let q = start(per_tenant);
        let (entered_tx, entered) = mpsc::channel();
        let (open, gate) = mpsc::channel::<()>();
        q.push(
            &tenant(0),
            Admission::Capped,
            Box::new(move || {
                entered_tx.send(()).unwrap();
                let _ = gate.recv();
            }),
        )
        .unwrap();
        // The gate runs (nothing is queued behind it yet).
        entered.recv().unwrap();
        assert_eq!(q.status().queued, 0);
        (q, open)
    }

    /// A job that reports `tag` when it runs.
    fn report(done: &mpsc::Sender<(u8, usize)>, tag: (u8, usize)) -> ReadJob {
        let done = done.clone();
        Box::new(move || done.send(tag).unwrap())
    }

    #[test]
    fn one_read_of_another_tenant_waits_for_at_most_one_of_a_flood() {
        let (q, open) = gated(usize::MAX);
        let (done, ran) = mpsc::channel();
        for i in 0..1000 {
            q.push(&tenant(1), Admission::Capped, report(&done, (1, i)))
                .unwrap();
        }
        q.push(&tenant(2), Admission::Capped, report(&done, (2, 0)))
            .unwrap();
        assert_eq!(q.status().queued, 1001);
        assert_eq!(q.status().tenants, 2);
        open.send(()).unwrap();
        let order: Vec<(u8, usize)> = (0..1001).map(|_| ran.recv().unwrap()).collect();
        let b = order.iter().position(|t| *t == (2, 0)).unwrap();
        assert!(
            b <= 2,
            "tenant 2's read ran after {b} of tenant 1's: {:?}",
            &order[..=b]
        );
        assert_eq!(b, 1, "exactly one of the flood first (it was queued first)");
        // The flood itself stays in order.
        let flood: Vec<usize> = order.iter().filter(|t| t.0 == 1).map(|t| t.1).collect();
        assert_eq!(flood, (0..1000).collect::<Vec<_>>());
        // Everything ran (the gate, 1,000 + 1): counted once each, the queue is empty.
        assert_eq!(q.queued_for(&tenant(1)), 0);
        let s = q.status();
        assert_eq!((s.queued, s.tenants, s.refused), (0, 0, 0));
    }

    #[test]
    fn three_tenants_take_turns_one_read_each() {
        let (q, open) = gated(usize::MAX);
        let (done, ran) = mpsc::channel();
        // Queued unevenly and in bursts: tenant 1 first with 3, then 2 with 4, then 3 with 2.
        for (t, n) in [(1u8, 3usize), (2, 4), (3, 2)] {
            for i in 0..n {
                q.push(&tenant(t), Admission::Capped, report(&done, (t, i)))
                    .unwrap();
            }
        }
        open.send(()).unwrap();
        let order: Vec<(u8, usize)> = (0..9).map(|_| ran.recv().unwrap()).collect();
        assert_eq!(
            order,
            vec![
                (1, 0),
                (2, 0),
                (3, 0),
                (1, 1),
                (2, 1),
                (3, 1),
                (1, 2),
                (2, 2),
                (2, 3)
            ]
        );
    }

    #[test]
    fn a_tenant_past_its_cap_is_refused_busy_and_others_are_not() {
        let (q, open) = gated(4);
        let (done, ran) = mpsc::channel();
        for i in 0..4 {
            q.push(&tenant(1), Admission::Capped, report(&done, (1, i)))
                .unwrap();
        }
        let refused = q
            .push(&tenant(1), Admission::Capped, report(&done, (1, 99)))
            .unwrap_err();
        assert!(matches!(refused, StoreError::Busy(_)), "{refused:?}");
        assert_eq!(refused.code(), whispeer_protocol::ErrorCode::Busy);
        assert_eq!(q.status().refused, 1);
        // A catch-up read is never refused; another tenant has its own cap.
        q.push(&tenant(1), Admission::Always, report(&done, (1, 4)))
            .unwrap();
        for i in 0..4 {
            q.push(&tenant(2), Admission::Capped, report(&done, (2, i)))
                .unwrap();
        }
        assert_eq!(q.queued_for(&tenant(1)), 5);
        assert_eq!(q.queued_for(&tenant(2)), 4);
        open.send(()).unwrap();
        let mut order: Vec<(u8, usize)> = (0..9).map(|_| ran.recv().unwrap()).collect();
        order.sort_unstable();
        assert!(!order.contains(&(1, 99)), "the refused read never runs");
        // Once its queue drained the tenant may queue again.
        let (q1, ran1) = mpsc::channel();
        q.push(&tenant(1), Admission::Capped, report(&q1, (1, 5)))
            .unwrap();
        assert_eq!(ran1.recv().unwrap(), (1, 5));
        assert_eq!(q.status().refused, 1);
    }

    #[test]
    fn a_panicking_read_fails_its_caller_and_the_thread_goes_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let q = start(8);
        rt.block_on(async {
            let r: Result<(), StoreError> =
                run_on(&q, &tenant(1), Admission::Capped, || panic!("a bad read")).await;
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
            let r = run_on(&q, &tenant(1), Admission::Capped, || Ok(7)).await;
            assert_eq!(r.unwrap(), 7);
        });
        assert_eq!(q.status().served, 2);
    }
}
