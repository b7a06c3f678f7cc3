//! The worker threads that run the engine's jobs (`core::jobs`) off the connection task:
//! one pool per process, one thread per core (at most [`MAX_WORKERS`]), shared by every
//! client, so a subscriber opens on every core while its driver only moves frames.
//!
//! Plain `std::thread`s over one job queue rather than `spawn_blocking`: a job is a few
//! microseconds, far below what a blocking-pool hand-off costs, and the threads keep their
//! per-thread state (an `Opener`'s zstd context and decoded sender keys) warm. The queue is
//! bounded by the engines (`open_ahead` open jobs and `seal_ahead` seal jobs per client at
//! most), not here.

use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc::UnboundedSender;
use whispeer_protocol::{Identity, Opener, Sealer};

use crate::core::batching::{SealDone, SealJob};
use crate::core::jobs::{OpenDone, OpenJob};

/// Most worker threads, whatever the core count.
pub(super) const MAX_WORKERS: usize = 8;

type Task = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Shared by every client of the process: its own payload cap is not used, each
    /// [`OpenJob`] decompresses under its client's (`ClientBuilder::max_payload`).
    static OPENER: RefCell<Opener> = RefCell::new(Opener::new());
    static SEALER: RefCell<Sealer> = RefCell::new(Sealer::new());
}

/// Cores available to this process (1 when unknown), asked once: on Linux
/// `available_parallelism` reads the cgroup files (`openat`, `read`) on every call, and
/// `open_all` runs for every backlog the driver hands out — measured with `whispeer bench`
/// (TCP, 1 KiB, unsigned) it was 4.6 % of the clients' CPU, about 0.9 µs per message.
pub(super) fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn queue() -> &'static Mutex<Sender<Task>> {
    static POOL: OnceLock<Mutex<Sender<Task>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..cores().clamp(1, MAX_WORKERS) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("whispeer-open-{i}"))
                .spawn(move || work(&rx));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a worker thread");
            }
        }
        Mutex::new(tx)
    })
}

fn work(rx: &Mutex<Receiver<Task>>) {
    loop {
        let task = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        match task {
            Ok(t) => t(),
            Err(_) => return,
        }
    }
}

/// The fewest opens worth a worker's wake-up: a futex wake and the result's channel
/// round trip cost about as much as opening a few 1 KiB messages, so a small burst goes to
/// one worker rather than one job per thread.
const MIN_CHUNK: usize = 4;

/// Open results a worker sends to the driver at once (after the first of a run).
const RESULTS_PER_SEND: usize = 8;

/// Opens `jobs` on the workers and sends each result to `done` (the driver's channel) as
/// it finishes. The jobs are cut into contiguous runs — one per worker, each at least
/// [`MIN_CHUNK`] long — so a burst costs one wake-up per worker, not one per message.
/// Without a worker (none could start) they open here.
pub(super) fn open_all(mut jobs: Vec<OpenJob>, done: &UnboundedSender<Vec<OpenDone>>) {
    let workers = cores().clamp(1, MAX_WORKERS);
    let runs = jobs.len().div_ceil(MIN_CHUNK).clamp(1, workers);
    let per = jobs.len().div_ceil(runs);
    while !jobs.is_empty() {
        let rest = jobs.split_off(per.min(jobs.len()));
        let run = std::mem::replace(&mut jobs, rest);
        let tx = done.clone();
        let task: Task = Box::new(move || {
            OPENER.with(|o| {
                let mut o = o.borrow_mut();
                // The first result at once (it may be the one the driver waits for to
                // release what is behind it), then the rest in groups: each send may
                // wake the driver, a futex call and a context switch.
                let mut out = Vec::new();
                for (i, job) in run.into_iter().enumerate() {
                    out.push(job.run(&mut o));
                    if i == 0 || out.len() >= RESULTS_PER_SEND {
                        let _ = tx.send(std::mem::take(&mut out));
                    }
                }
                if !out.is_empty() {
                    let _ = tx.send(out);
                }
            })
        });
        let sent = queue().lock().unwrap_or_else(|p| p.into_inner()).send(task);
        if let Err(e) = sent {
            (e.0)();
        }
    }
}

/// Signs and seals `job` on a worker with `signer` and sends the result to `done` (the
/// driver's channel). Without a worker it seals here. Salts and nonces come from the
/// worker's CSPRNG (ChaCha12, reseeded from the OS).
pub(super) fn seal(job: SealJob, signer: Arc<Identity>, done: &UnboundedSender<SealDone>) {
    let tx = done.clone();
    let task: Task = Box::new(move || {
        let r = SEALER.with(|s| job.run(&signer, &mut s.borrow_mut(), &mut rand::thread_rng()));
        let _ = tx.send(r);
    });
    let sent = queue().lock().unwrap_or_else(|p| p.into_inner()).send(task);
    if let Err(e) = sent {
        (e.0)();
    }
}
