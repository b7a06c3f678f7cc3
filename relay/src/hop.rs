//! Light connections on their own runtime; a connection that floods moves to the main one.
//!
//! Why: while floods saturate the relay, a quiet connection's tasks wait in the run queues
//! of the same worker threads behind every flooder's turn, its socket's readiness waits for
//! a busy worker to poll the reactor, and those threads are the busy ones the kernel
//! schedules last. The relay therefore runs the connections of addresses with few
//! connections on a small *light* runtime ([`Light`]: `runtime.light_workers` threads, its
//! own reactor, asleep most of the time) and moves a connection to the main runtime once
//! it shows it is heavy:
//! - its reader fills [`HOP_AFTER`] turns in a row (16 frames or 16 KiB each, see
//!   `conn::read_loop`), or its writer [`HOP_AFTER`] batches of that size in a row (a
//!   subscriber that is always behind);
//! - it hits a rate limit or a refusal pause (its reads pause: `conn::read_loop`);
//! - its publishes' routing walks cost [`WALK_TOKENS_TO_MOVE`] publish rate tokens beyond
//!   their own (`rate::walk_tokens`: one per 64 subscription index nodes visited). Frames
//!   and bytes do not show that work: a publisher pacing expensive publishes (tens of
//!   thousands of nodes each, under the routing shard's lock) never fills a turn nor hits
//!   its rate, and would stay beside the quiet clients this runtime is for.
//!
//! An address that opened or holds more than a client's few connections (churn, a
//! connection flood) starts its new connections on the main runtime
//! ([`AddrSlot::busy`](crate::rate::AddrSlot::busy)). So a saturated light runtime sheds
//! load by itself: its connections' input piles up, their turns fill, and they move.
//! Measured with the hostile bench (relay README, *The light runtime*).
//!
//! How a task moves: tokio sockets and timers stay usable from any runtime once created
//! (the socket stays registered with the light runtime's reactor, which then only relays
//! its readiness), and a boxed `Send` future may be polled by another task between two
//! polls. [`Hop`] owns a connection task's future and polls it inside a task-local
//! [`Scope`]; [`request`] marks the scope moved, and each `Hop` of the scope (the reader's
//! and the writer's), seeing the mark after a poll that returned `Pending`, spawns a task
//! on the main runtime that goes on polling the same future (its wakers are taken anew at
//! that poll). A moved task is a plain task: it never moves back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{AbortHandle, Abortable};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// Full turns (or full writer batches) in a row after which a connection on the light
/// runtime moves to the main one. A client at a steady 1,000 msg/s of 1 KiB never fills
/// one turn; a flood fills every turn.
pub(crate) const HOP_AFTER: u32 = 8;

/// Publish rate tokens charged for routing walks (beyond each publish's own; see
/// `rate::walk_tokens`) after which a connection on the light runtime moves to the main
/// one: [`HOP_AFTER`] full turns' worth of publishes (`conn::FRAMES_PER_TURN` each), so a
/// connection whose walks cost what 8 turns of plain publishes cost is as heavy as one
/// that read 8 full turns. Counted over the connection's life, never reset by waiting
/// (a paced publisher waits before every frame): 8,192 nodes walked, ~50 µs (release,
/// `cargo bench -p whispeer-relay --bench walk`); one publish on the reviewer's
/// construction (41,359 nodes, 646 tokens) moves its connection at once. Honest publishes
/// (under 64 nodes) add nothing.
pub(crate) const WALK_TOKENS_TO_MOVE: u64 = HOP_AFTER as u64 * crate::conn::FRAMES_PER_TURN as u64;

/// The light runtime: started by `Relay::run` when `runtime.light_workers > 0`, shut down
/// in the background when dropped (its connections have drained by then, or are cut like
/// the main runtime's at the drain deadline).
pub(crate) struct Light {
    rt: Option<Runtime>,
    full: Arc<AtomicBool>,
}

/// Where to start connections on the light runtime, and whether it is full.
#[derive(Clone)]
pub(crate) struct LightHandle {
    handle: Handle,
    full: Arc<AtomicBool>,
}

impl LightHandle {
    /// The runtime to spawn a new connection on.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Whether its threads were busy `runtime.light_busy_percent` of the last [`WATCH_EVERY`]: new
    /// connections then start on the main runtime, so many connections that each stay light
    /// (thousands of devices at a few messages a second) cannot make one thread the relay's
    /// limit while the main runtime's are idle.
    pub(crate) fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }
}

/// How often [`Light::watch`] samples the light runtime's busy time.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Light {
    /// Starts `workers` threads named `whispeer-light`; `None` for 0.
    pub(crate) fn start(workers: u16) -> std::io::Result<Option<Self>> {
        if workers == 0 {
            return Ok(None);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(workers))
            .thread_name("whispeer-light")
            .enable_all()
            .build()?;
        Ok(Some(Light {
            rt: Some(rt),
            full: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Where to spawn connections.
    pub(crate) fn handle(&self) -> LightHandle {
        LightHandle {
            handle: self
                .rt
                .as_ref()
                .expect("running until dropped")
                .handle()
                .clone(),
            full: self.full.clone(),
        }
    }

    /// Keeps [`LightHandle::is_full`] current: every [`WATCH_EVERY`], the share of the time
    /// its worker threads were busy (tokio's per-worker busy time). Run on the main runtime
    /// (a full light runtime would run its own watcher late) and sets the
    /// `whispeer_relay_light_busy_percent` gauge; ends with the runtime.
    /// `full_at_percent` is `runtime.light_busy_percent`; 0 never counts as full.
    pub(crate) fn watch(
        &self,
        gauge: Arc<Metrics>,
        full_at_percent: u8,
    ) -> impl Future<Output = ()> + Send + 'static {
        let handle = self.handle();
        let metrics = handle.handle.metrics();
        async move {
            let busy = || -> std::time::Duration {
                (0..metrics.num_workers())
                    .map(|w| metrics.worker_total_busy_duration(w))
                    .sum()
            };
            let (mut at, mut was) = (tokio::time::Instant::now(), busy());
            let mut tick = tokio::time::interval(WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (now, is) = (tokio::time::Instant::now(), busy());
                let span = now.duration_since(at).as_secs_f64() * metrics.num_workers() as f64;
                let share = is.saturating_sub(was).as_secs_f64() / span.max(1e-9);
                let full = full_at_percent > 0 && share * 100.0 >= f64::from(full_at_percent);
                if handle.full.swap(full, Ordering::Relaxed) != full {
                    tracing::debug!(share, full, "light runtime load");
                }
                // After the flag: a gauge read shows a sample the accept loop already uses.
                gauge.set_light_busy(share);
                (at, was) = (now, is);
            }
        }
    }
}

impl Drop for Light {
    fn drop(&mut self) {
        // Never blocks: `run` may end inside the caller's runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One connection's tasks on the light runtime: whether they move (once set, for good),
/// where to, and where a move is counted (once, when asked).
#[derive(Clone)]
struct Scope {
    moved: Arc<AtomicBool>,
    main: Handle,
    metrics: Arc<Metrics>,
}

tokio::task_local! {
    /// Set while a [`Hop`] on the light runtime polls a connection's task.
    static SCOPE: Scope;
}

/// Why a connection moves to the main runtime (`whispeer_relay_light_moves_total`'s
/// `cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Its reader handled [`HOP_AFTER`] full turns without waiting for the socket.
    Reading = 0,
    /// Its writer wrote [`HOP_AFTER`] turns' worth without its queue running empty.
    Writing = 1,
    /// Its reads paused at a rate limit or after a refused publish.
    Limited = 2,
    /// Its publishes' routing walks cost [`WALK_TOKENS_TO_MOVE`] rate tokens.
    Walking = 3,
}

impl Cause {
    /// Every cause, in metric order.
    pub(crate) const ALL: [Cause; 4] = [
        Cause::Reading,
        Cause::Writing,
        Cause::Limited,
        Cause::Walking,
    ];

    /// The metric label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cause::Reading => "reading",
            Cause::Writing => "writing",
            Cause::Limited => "limited",
            Cause::Walking => "walking",
        }
    }
}

/// Asks to move the calling connection (its reader and its writer) to the main runtime,
/// for `cause` (counted at the first ask); true if it runs on the light runtime. The calling task moves when its poll next
/// returns `Pending` (the caller yields or waits), the connection's other task at the end
/// of its next poll.
pub(crate) fn request(cause: Cause) -> bool {
    SCOPE
        .try_with(|s| {
            if !s.moved.swap(true, Ordering::AcqRel) {
                s.metrics.light_moved(cause);
            }
        })
        .is_ok()
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection's task on the light runtime, ready to move to the main one.
pub(crate) struct Hop {
    fut: Option<Task>,
    scope: Scope,
}

impl Hop {
    /// `fut` (a new connection) to spawn on the light runtime: it moves to `main` once it
    /// asks ([`request`]). Counted as started light.
    pub(crate) fn new(
        fut: impl Future<Output = ()> + Send + 'static,
        main: Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.light_started();
        Hop {
            fut: Some(Box::pin(fut)),
            scope: Scope {
                moved: Arc::new(AtomicBool::new(false)),
                main,
                metrics,
            },
        }
    }
}

impl Future for Hop {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(());
        };
        let polled = SCOPE.sync_scope(this.scope.clone(), || fut.as_mut().poll(cx));
        if polled.is_ready() {
            this.fut = None;
            return Poll::Ready(());
        }
        if this.scope.moved.load(Ordering::Acquire) {
            if let Some(fut) = this.fut.take() {
                // Outside the scope: once moved, the task stays on main.
                this.scope.main.spawn(fut);
            }
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A connection's task started with [`spawn`]: resolves when the task ends, on whichever
/// runtime it ended.
pub(crate) struct Spawned {
    done: oneshot::Receiver<()>,
    abort: AbortHandle,
}

impl Spawned {
    /// Stops the task (at its next poll, wherever it runs).
    pub(crate) fn abort(&self) {
        self.abort.abort();
    }
}

impl Future for Spawned {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Sent at the end, or dropped with the task (aborted, or its runtime shut down).
        Pin::new(&mut self.done).poll(cx).map(|_| ())
    }
}

/// Spawns a connection's companion task (its writer) beside the caller: on the light
/// runtime in the caller's scope, so it moves when the connection does; elsewhere a
/// plain task.
pub(crate) fn spawn(fut: impl Future<Output = ()> + Send + 'static) -> Spawned {
    let (tx, done) = oneshot::channel();
    let (abort, reg) = AbortHandle::new_pair();
    let task = async move {
        let _ = Abortable::new(fut, reg).await;
        let _ = tx.send(());
    };
    match SCOPE.try_with(Scope::clone) {
        Ok(scope) => {
            tokio::spawn(Hop {
                fut: Some(Box::pin(task)),
                scope,
            });
        }
        Err(_) => {
            tokio::spawn(task);
        }
    }
    Spawned { done, abort }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(name: &str) -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap()
    }

    fn thread() -> String {
        std::thread::current().name().unwrap_or("").to_owned()
    }

    /// A connection that asks moves to the main runtime with its companion task, and a
    /// timer made before the move still fires after it; one that never asks stays, and
    /// so does its companion. Each move of a connection is counted once.
    #[test]
    fn a_task_that_asks_moves_to_the_main_runtime_with_its_companion() {
        let light = runtime("light");
        let main = runtime("main");
        let metrics = Arc::new(Metrics::new());
        for ask in [true, false] {
            let (tx, rx) = std::sync::mpsc::channel();
            let fut = async move {
                let (to_companion, mut companion_go) = tokio::sync::mpsc::unbounded_channel();
                let companion_tx = tx.clone();
                let companion = spawn(async move {
                    companion_go.recv().await;
                    companion_tx.send(("companion", thread())).unwrap();
                });
                tx.send(("before", thread())).unwrap();
                let timer = tokio::time::sleep(std::time::Duration::from_millis(5));
                if ask {
                    assert!(request(Cause::Reading), "on the light runtime");
                    tokio::task::yield_now().await;
                    assert!(!request(Cause::Reading), "moved: no second move");
                }
                timer.await;
                tx.send(("after", thread())).unwrap();
                to_companion.send(()).unwrap();
                companion.await;
            };
            light.spawn(Hop::new(fut, main.handle().clone(), metrics.clone()));
            let mut seen: Vec<(&str, String)> = (0..3).map(|_| rx.recv().unwrap()).collect();
            seen.sort();
            let moved = if ask { "main" } else { "light" };
            assert_eq!(
                seen,
                [
                    ("after", moved.to_owned()),
                    ("before", "light".to_owned()),
                    ("companion", moved.to_owned()),
                ]
            );
        }
        assert!(!request(Cause::Reading), "no move outside a Hop");
        let text = metrics.render_prometheus(0);
        assert!(
            text.contains("whispeer_relay_light_started_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("whispeer_relay_light_moves_total{cause=\"reading\"} 1\n"),
            "{text}"
        );
    }

    /// The watcher calls the light runtime full while its thread is kept busy, and not
    /// full again once it idles.
    #[test]
    fn the_light_runtime_counts_as_full_while_its_thread_is_busy() {
        let light = Light::start(1).unwrap().unwrap();
        let handle = light.handle();
        let main = runtime("main");
        let metrics = Arc::new(Metrics::new());
        main.spawn(light.watch(metrics.clone(), 75));
        let busy = || {
            let text = metrics.render_prometheus(0);
            text.lines()
                .find_map(|l| l.strip_prefix("whispeer_relay_light_busy_percent "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("the gauge")
        };
        let wait_for = |want: bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while handle.is_full() != want {
                assert!(std::time::Instant::now() < deadline, "never full = {want}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let spin = stop.clone();
        // A task that computes in 200 µs slices and yields between them (as connections
        // do: tokio counts busy time between scheduler maintenances): the light thread is
        // busy until told to stop.
        handle.handle().spawn(async move {
            while !spin.load(Ordering::Relaxed) {
                let slice = std::time::Instant::now();
                while slice.elapsed() < std::time::Duration::from_micros(200) {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        });
        wait_for(true);
        assert!(busy() >= 75, "{}", busy());
        stop.store(true, Ordering::Relaxed);
        wait_for(false);
        assert!(busy() < 75, "{}", busy());
    }

    /// Aborting a companion that moved stops it on the main runtime, and its handle
    /// resolves.
    #[test]
    fn an_aborted_companion_ends_wherever_it_runs() {
        let light = runtime("light");
        let main = runtime("main");
        let (tx, rx) = std::sync::mpsc::channel();
        let fut = async move {
            let companion = spawn(std::future::pending::<()>());
            assert!(request(Cause::Writing));
            tokio::task::yield_now().await;
            companion.abort();
            companion.await;
            tx.send(thread()).unwrap();
        };
        light.spawn(Hop::new(
            fut,
            main.handle().clone(),
            Arc::new(Metrics::new()),
        ));
        assert_eq!(rx.recv().unwrap(), "main");
    }
}
