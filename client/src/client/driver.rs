//! The tokio driver of the connection engine: it only moves bytes and runs the engine's one
//! timer. Every protocol decision (handshake, resubscription, outbox, acks, heartbeat,
//! backoff, flush) is the engine's (`core::connection`).
//!
//! Each turn drains the engine in order — transmits, then the deadline, then events — and
//! then waits for one of: a frame or a close from the socket, the dial it asked for, an app
//! command, the timer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::pool;
use super::shared::{
    now_ms, AckReply, Backlog, ClientStats, Command, ConnectionState, FlushReply, Inbox, Item,
    Outbound, PublishReq, SubReady,
};
use crate::core::batching::SealDone;
use crate::core::connection::{
    AckToken, ConnId, Disconnect, Engine, Event, FlushId, Now, PublishFailure, PublishId,
    SubscribeFailure, Transmit,
};
use crate::core::jobs::OpenDone;
use crate::core::{LocalSubId, Received};
use crate::error::{ConnectError, FlushError, PublishError, ReceiveError};
use crate::plugin::{Plugins, Verdict};
use crate::printable::Printable;
use crate::transport::{Connection, Dialer, FrameWriter, Incoming, Reader};

/// Frames handled per wake-up before the driver looks at commands and timers again.
const READ_BATCH: usize = 256;

/// What the builder hands the driver.
pub(super) struct Parts {
    pub(super) eng: Engine,
    pub(super) epoch: Instant,
    /// One per relay, in the order the engine goes round them.
    pub(super) dialers: Vec<Dialer>,
    /// The URL of the relay in use, for `Client::relay_url`.
    pub(super) relay: watch::Sender<String>,
    pub(super) max_frame: usize,
    pub(super) connect_timeout: Duration,
    pub(super) cmd_rx: mpsc::UnboundedReceiver<Command>,
    pub(super) state: watch::Sender<ConnectionState>,
    pub(super) stats: watch::Sender<ClientStats>,
    pub(super) plugins: Plugins,
    /// Publish backpressure, shared with the handle.
    pub(super) backlog: Arc<Backlog>,
    /// The outcome of the first connection, for `connect()`.
    pub(super) first: oneshot::Sender<Result<(), ConnectError>>,
    /// Publishes, queued by the handles (the driver takes them all at once).
    pub(super) inbox: Arc<Inbox>,
    /// The identity that signs batches, when publishes arrive prepared.
    pub(super) signer: Option<Arc<whispeer_protocol::Identity>>,
    /// Seal jobs run on the driver task (one core) rather than on the worker threads.
    pub(super) seal_inline: bool,
    #[cfg(feature = "persistence")]
    pub(super) saved: Option<crate::persist::Store>,
}

/// A subscription's side of the driver.
struct Sink {
    tx: mpsc::UnboundedSender<Item>,
    /// At most once: messages lost for want of credit, reported before the next message.
    lag: Arc<AtomicU64>,
    /// Set when the relay ended the subscription: the stream skips what it still buffers.
    ended: Arc<std::sync::atomic::AtomicBool>,
    ready: Option<SubReady>,
}

/// The open socket.
struct Live {
    id: ConnId,
    writer: FrameWriter,
    incoming: Reader,
}

/// Frames waiting behind the current one from which their opens go to the worker pool
/// (see [`Engine::handle_decoded_more`]). Measured at a paced 10k msg/s, 1 KiB: handing
/// every small burst to the pool cost the subscriber ~1.8× the CPU of opening inline and
/// ~0.15 ms of p50 latency.
const PARALLEL_BACKLOG: usize = 32;

pub(super) struct Driver {
    p: Parts,
    first: Option<oneshot::Sender<Result<(), ConnectError>>>,
    sinks: BTreeMap<LocalSubId, Sink>,
    acks: HashMap<PublishId, AckReply>,
    flushes: HashMap<FlushId, FlushReply>,
    /// Durable deletions waiting for the relay's answer, by their flush.
    deletes: HashMap<FlushId, oneshot::Sender<Result<(), crate::error::DeleteError>>>,
    closing: Vec<oneshot::Sender<()>>,
    plugin_drops: u64,
    /// The last message the plugins saw and what they made of it.
    plugin_memo: Option<(Arc<Received>, Option<Arc<Received>>)>,
    /// Credit drops whose lag the subscriptions already hold (the counter never runs ahead
    /// of the `Lagged` report a reader can see).
    slow_drops: u64,
    conn: Option<Live>,
    dialing: Option<(ConnId, JoinHandle<Result<Connection, ConnectError>>)>,
    /// The error of the last failed dial (a typed `ConnectError` for `connect()`).
    dial_error: Option<ConnectError>,
    /// Backlog bytes of publishes handed to the engine, released once it has written them
    /// (what still waits for a seal job stays counted).
    handed: usize,
    /// Seals inline (`seal_inline`), with this thread's compression context.
    sealer: whispeer_protocol::Sealer,
    /// Seal jobs' results from the worker threads.
    sealed_tx: mpsc::UnboundedSender<SealDone>,
    sealed_rx: mpsc::UnboundedReceiver<SealDone>,
    /// Publishes taken from the inbox (reused).
    taken: Vec<PublishReq>,
    /// Open jobs' results from the worker threads (deferred opening).
    opened_tx: mpsc::UnboundedSender<Vec<OpenDone>>,
    opened_rx: mpsc::UnboundedReceiver<Vec<OpenDone>>,
    /// How many relay errors are logged at warn ([`LogBudget`]).
    relay_errors: LogBudget,
    /// How many dropped QoS 0 publishes are logged at warn ([`LogBudget`]).
    publish_drops: LogBudget,
    /// `Ack` frames held while receiver state is not saved (a state file write failed):
    /// sent once a write succeeds, on the connection they were made for ([`HeldAcks`]).
    held: HeldAcks,
}

/// `Ack` frames held back while the state file lacks dedup entries they may cover (with
/// `Persistence`, after a failed write): an `Ack` that left before its message was saved
/// as seen lets the relay forget the message while a restarted client would accept a
/// replay or re-post of it again. A flush's `Ping` waits behind them (a flush resolves
/// once the acks of what the app took before it have left). Bounded: held longer than
/// [`HeldAcks::MAX_WAIT`] or covering [`HeldAcks::MAX_SEQS`] sequences, they are sent
/// anyway (logged at error): a state file that cannot be written for good must not stop
/// acknowledging. Both bounds come well before the relay's: its ack timeout (30 s by
/// default) redelivers what is unacknowledged, and its credit (4,096 messages per
/// subscription by default) stops a subscription whose acks wait.
#[derive(Debug, Default)]
struct HeldAcks {
    conn: Option<ConnId>,
    frames: Vec<bytes::Bytes>,
    /// Sequences the held `Ack`s cover.
    seqs: usize,
    since: Option<std::time::Instant>,
}

impl HeldAcks {
    const MAX_WAIT: Duration = Duration::from_secs(10);
    const MAX_SEQS: usize = 4096;

    fn hold(&mut self, conn: ConnId, b: bytes::Bytes) {
        if self.conn != Some(conn) {
            // Those of a connection gone are void: the relay delivers them again.
            self.frames.clear();
            self.seqs = 0;
            self.conn = Some(conn);
        }
        if self.frames.is_empty() {
            self.since = Some(std::time::Instant::now());
        }
        self.seqs += ack_seqs(&b);
        self.frames.push(b);
    }

    /// Whether frames of connection `conn` are held (later acks and flush pings queue
    /// behind them).
    fn holds(&self, conn: ConnId) -> bool {
        self.conn == Some(conn) && !self.frames.is_empty()
    }

    /// Held past the bound.
    fn overdue(&self) -> bool {
        self.seqs >= Self::MAX_SEQS || self.since.is_some_and(|t| t.elapsed() >= Self::MAX_WAIT)
    }

    /// When the held frames reach [`HeldAcks::MAX_WAIT`] (none held: never).
    fn deadline(&self) -> Option<std::time::Instant> {
        self.since
            .filter(|_| !self.frames.is_empty())
            .map(|t| t + Self::MAX_WAIT)
    }

    /// Takes the held frames (the bound starts again).
    fn take(&mut self) -> Vec<bytes::Bytes> {
        self.seqs = 0;
        self.since = None;
        std::mem::take(&mut self.frames)
    }
}

/// Whether an encoded frame is an `Ack` (a map of two entries whose key 0 is the type).
fn is_ack(b: &[u8]) -> bool {
    b.starts_with(&[0xa2, 0x00, whispeer_protocol::frame::frame_type::ACK as u8])
}

/// Whether an encoded frame is a flush's `Ping` (a heartbeat's nonce is 0).
fn is_flush_ping(b: &[u8]) -> bool {
    b.starts_with(&[
        0xa2,
        0x00,
        whispeer_protocol::frame::frame_type::PING as u8,
        0x01,
    ]) && b.get(4).is_some_and(|&n| n != 0)
}

/// How many sequences an encoded `Ack` covers (its array's length, key 1; 1 if unreadable).
fn ack_seqs(b: &[u8]) -> usize {
    match b.get(3..) {
        Some([0x01, h, rest @ ..]) if h & 0xe0 == 0x80 => match (h & 0x1f, rest) {
            (n @ 0..=23, _) => n as usize,
            (24, [n, ..]) => *n as usize,
            (25, [a, b, ..]) => u16::from_be_bytes([*a, *b]) as usize,
            (26, [a, b, c, d, ..]) => u32::from_be_bytes([*a, *b, *c, *d]) as usize,
            _ => 1,
        },
        _ => 1,
    }
}

/// At most [`LogBudget::PER_MINUTE`] relay errors a minute are logged at warn — a relay
/// can send `Err` frames without end, and a log written synchronously would hold the
/// connection task — the rest at debug, counted in one warn line when the minute is over.
#[derive(Debug, Default)]
struct LogBudget {
    start: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    const PER_MINUTE: u32 = 10;

    /// At `now`: whether this one is logged at warn, and how many the minute that just
    /// ended left out (to say once).
    fn take(&mut self, now: std::time::Instant) -> (bool, u64) {
        let mut ended = 0;
        if self
            .start
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(60))
        {
            ended = std::mem::take(&mut self.suppressed);
            (self.start, self.logged) = (Some(now), 0);
        }
        if self.logged < Self::PER_MINUTE {
            self.logged += 1;
            (true, ended)
        } else {
            self.suppressed += 1;
            (false, ended)
        }
    }
}

impl Driver {
    /// A relay's `Err` text, logged printable within the relay-error budget (ten a minute
    /// at warn, the rest at debug: a relay can send them without end); `what` says what
    /// it answered.
    fn log_relay_err(
        &mut self,
        what: &'static str,
        code: whispeer_protocol::ErrorCode,
        message: &str,
    ) {
        let (warn, left_out) = self.relay_errors.take(std::time::Instant::now());
        if left_out > 0 {
            tracing::warn!(left_out, "relay errors in the last minute not logged");
        }
        if warn {
            tracing::warn!(code = code.name(), message = %Printable(message), "{what}");
        } else {
            tracing::debug!(code = code.name(), message = %Printable(message), "{what}");
        }
    }

    pub(super) fn new(mut p: Parts) -> Self {
        let (tx, _) = oneshot::channel();
        let first = std::mem::replace(&mut p.first, tx);
        let (opened_tx, opened_rx) = mpsc::unbounded_channel();
        let (sealed_tx, sealed_rx) = mpsc::unbounded_channel();
        Driver {
            handed: 0,
            sealer: whispeer_protocol::Sealer::new(),
            sealed_tx,
            sealed_rx,
            taken: Vec::new(),
            opened_tx,
            opened_rx,
            p,
            first: Some(first),
            sinks: BTreeMap::new(),
            acks: HashMap::new(),
            flushes: HashMap::new(),
            deletes: HashMap::new(),
            closing: Vec::new(),
            plugin_drops: 0,
            plugin_memo: None,
            slow_drops: 0,
            conn: None,
            dialing: None,
            dial_error: None,
            relay_errors: LogBudget::default(),
            publish_drops: LogBudget::default(),
            held: HeldAcks::default(),
        }
    }

    fn now(&self) -> Now {
        let mono = self.p.epoch.elapsed().as_millis();
        Now::new(u64::try_from(mono).unwrap_or(u64::MAX), now_ms())
    }

    /// Hands everything the handles queued to the engine, in publish order.
    fn take_inbox(&mut self) {
        let mut taken = std::mem::take(&mut self.taken);
        self.p.inbox.take(&mut taken);
        for r in taken.drain(..) {
            self.submit(r);
        }
        self.taken = taken;
    }

    /// One publish into the engine: sealed ones go to the outbox (behind any still being
    /// sealed), prepared ones to the batch queue.
    fn submit(&mut self, r: PublishReq) {
        let now = self.now();
        // Released once the engine has written it (`transmit`).
        self.handed += r.reserved;
        let res = match r.envelope {
            Outbound::Sealed(env) => self.p.eng.publish(env, r.opts, now),
            Outbound::Prepared(p) => self.p.eng.publish_prepared(*p, r.opts, now),
        };
        match res {
            // A kept publish is saved (`save_kept`) before its frame is written and before
            // the stats count it.
            Ok(Some(pid)) => {
                if let Some(reply) = r.reply {
                    self.acks.insert(pid, reply);
                }
            }
            Ok(None) => {
                if let Some(reply) = r.reply {
                    let _ = reply.send(Ok(0));
                }
            }
            Err(e) => match r.reply {
                Some(reply) => {
                    let _ = reply.send(Err(e));
                }
                // A QoS 0 publish nobody waits for (the engine counted it in
                // `outbox_drops`): said, or its loss would go unnoticed.
                None => {
                    let (warn, left_out) = self.publish_drops.take(std::time::Instant::now());
                    if left_out > 0 {
                        tracing::warn!(
                            left_out,
                            "dropped QoS 0 publishes in the last minute not logged"
                        );
                    }
                    if warn {
                        tracing::warn!(error = %Printable(&e), "a QoS 0 publish was dropped");
                    } else {
                        tracing::debug!(error = %Printable(&e), "a QoS 0 publish was dropped");
                    }
                }
            },
        }
    }

    fn instant(&self, deadline: Option<u64>) -> Instant {
        match deadline {
            Some(ms) => self.p.epoch + Duration::from_millis(ms),
            None => Instant::now() + Duration::from_secs(86_400),
        }
    }

    pub(super) async fn run(mut self) {
        let sleep = tokio::time::sleep_until(self.instant(None));
        tokio::pin!(sleep);
        let mut armed: Option<u64> = None;
        let inbox = self.p.inbox.clone();
        loop {
            // 0. Publishes the handles queued go to the engine; its seal and open jobs to
            //    the workers (or, sealing inline, run here).
            self.take_inbox();
            self.dispatch_jobs();
            // 1. Transmit (acks released by the events below come back round here) —
            //    after the receiver state the app's takes settled is saved: an ack leaves
            //    only once the message it is for is persisted as seen.
            self.persist_changes();
            self.transmit().await;
            // 2. Events (receiver state saved and counters current before the app sees a
            //    message); then anything they queued.
            self.sync_stats();
            if self.deliver_events() {
                return;
            }
            self.transmit().await;
            // 3. The one timer, re-armed only when the deadline changed.
            let dl = self.p.eng.poll_timeout();
            if dl != armed {
                armed = dl;
                sleep.as_mut().reset(self.instant(dl));
            }
            self.sync_stats();
            let retry = self.retry_at();
            tokio::select! {
                () = inbox.woken() => self.take_inbox(),
                inc = recv(&mut self.conn), if self.p.eng.wants_read() => self.on_incoming(inc),
                Some(done) = self.opened_rx.recv() => self.on_opened(done),
                Some(done) = self.sealed_rx.recv() => self.on_sealed(done),
                d = dialed(&mut self.dialing) => self.on_dialed(d),
                cmd = self.p.cmd_rx.recv() => match cmd {
                    Some(cmd) => {
                        // One reading of the clocks for the batch (two system clock reads
                        // per command were ~2 % of a bench subscriber's samples).
                        let now = self.now();
                        self.apply(cmd, now);
                        // Batch whatever else is ready into the same turn.
                        for _ in 0..READ_BATCH {
                            match self.p.cmd_rx.try_recv() {
                                Ok(cmd) => self.apply(cmd, now),
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone: close politely (kept publishes stay saved).
                    None => {
                        self.take_inbox();
                        let now = self.now();
                        self.p.eng.close(now);
                    }
                },
                // A failed state file write is tried again (the loop's top writes).
                () = until(retry) => {}
                _ = &mut sleep => {
                    armed = None;
                    let now = self.now();
                    self.p.eng.handle_timeout(now);
                }
            }
        }
    }

    /// Hands the engine's open jobs to the worker threads, and its seal jobs too (or runs
    /// them here, sealing inline).
    fn dispatch_jobs(&mut self) {
        let jobs: Vec<_> = std::iter::from_fn(|| self.p.eng.poll_open_job()).collect();
        if !jobs.is_empty() {
            pool::open_all(jobs, &self.opened_tx);
        }
        let now = self.now();
        while let Some(job) = self.p.eng.poll_seal_job(now) {
            match &self.p.signer {
                Some(signer) if self.p.seal_inline => {
                    // A user-space CSPRNG (ChaCha12, reseeded from the OS): salts and
                    // nonces for a whole batch without a `getrandom` system call each.
                    let done = job.run(signer, &mut self.sealer, &mut rand::thread_rng());
                    self.p.eng.handle_sealed(done, now);
                }
                Some(signer) => pool::seal(job, signer.clone(), &self.sealed_tx),
                // Prepared publishes come only with an identity: never here.
                None => {
                    let done = job.fail(whispeer_protocol::SealError::BatchEmpty);
                    self.p.eng.handle_sealed(done, now);
                }
            }
        }
    }

    /// Seal jobs finished (in any order): the engine hands their publishes on in publish
    /// order.
    fn on_sealed(&mut self, first: SealDone) {
        let now = self.now();
        self.p.eng.handle_sealed(first, now);
        while let Ok(done) = self.sealed_rx.try_recv() {
            self.p.eng.handle_sealed(done, now);
        }
    }

    /// Open jobs finished (in any order): the engine releases what is complete in relay
    /// order.
    fn on_opened(&mut self, first: Vec<OpenDone>) {
        let now = self.now();
        for done in first {
            self.p.eng.handle_opened(done, now);
        }
        while let Ok(more) = self.opened_rx.try_recv() {
            for done in more {
                self.p.eng.handle_opened(done, now);
            }
        }
    }

    /// Writes, dials and hangs up as the engine says.
    async fn transmit(&mut self) {
        let mut wrote = false;
        // Acks held for a failed state file write go once it is written (or overdue).
        if !self.held.frames.is_empty() && (!self.acks_wait() || self.held.overdue()) {
            if self.acks_wait() {
                tracing::error!(frames = self.held.frames.len(), seqs = self.held.seqs,
                    waited_ms = self.held.since.map_or(0, |t| t.elapsed().as_millis() as u64),
                    "acks sent though the state file still lacks what they cover (it cannot be written)");
            }
            let held = self.held.take();
            if self.conn.as_ref().map(|c| c.id) == self.held.conn {
                for b in held {
                    wrote = self.write_frame(b).await;
                    if !wrote {
                        break;
                    }
                }
            }
        }
        loop {
            // Kept publishes are saved before any frame of theirs leaves.
            self.save_kept();
            let Some(t) = self.p.eng.poll_transmit() else {
                break;
            };
            match t {
                Transmit::Frame(b) => {
                    let Some(id) = self.conn.as_ref().map(|c| c.id) else {
                        continue;
                    };
                    // Acks wait while receiver state is unsaved; later acks and a
                    // flush's ping queue behind those held (in order).
                    let ack = is_ack(&b);
                    if (ack && self.acks_wait())
                        || (self.held.holds(id) && (ack || is_flush_ping(&b)))
                    {
                        self.held.hold(id, b);
                        continue;
                    }
                    wrote = self.write_frame(b).await;
                }
                Transmit::Dial(id) => {
                    let d = self.dialer(id).clone();
                    let (max_frame, timeout) = (self.p.max_frame, self.p.connect_timeout);
                    let task = tokio::spawn(async move { d.dial(max_frame, timeout).await });
                    if let Some((_, old)) = self.dialing.replace((id, task)) {
                        old.abort();
                    }
                }
                Transmit::Hangup(id) => {
                    if self.conn.as_ref().is_some_and(|c| c.id == id) {
                        let mut c = self.conn.take().expect("checked");
                        // What was sent goes first — within the stall limit: a relay that
                        // reads nothing does not hold the hangup (nor `close`).
                        let _ = tokio::time::timeout(self.p.connect_timeout, async {
                            let _ = c.writer.flush().await;
                            c.writer.close().await;
                        })
                        .await;
                        wrote = false;
                    } else if self.dialing.as_ref().is_some_and(|(d, _)| *d == id) {
                        if let Some((_, task)) = self.dialing.take() {
                            task.abort();
                        }
                    }
                }
            }
        }
        if wrote {
            if let Some(c) = &mut self.conn {
                let stall = self.p.connect_timeout;
                match within_stall(stall, c.writer.flush()).await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => self.lost(e.to_string()),
                    None => self.lost(stalled(stall)),
                }
            }
        }
        // The engine's queue is empty: every publish handed over so far is written (or in
        // its offline or outbox buffer), except those still waiting to be sealed;
        // publishers waiting at the high-water mark go on.
        let still = self.p.eng.sealing_bytes().min(self.handed);
        self.p.backlog.release(self.handed - still);
        self.handed = still;
    }

    /// Writes a frame to the open socket; false if the connection was lost doing so.
    async fn write_frame(&mut self, b: bytes::Bytes) -> bool {
        let Some(c) = &mut self.conn else {
            return false;
        };
        let stall = self.p.connect_timeout;
        match within_stall(stall, c.writer.write(b)).await {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                self.lost(e.to_string());
                false
            }
            None => {
                self.lost(stalled(stall));
                false
            }
        }
    }

    /// Whether acks wait for the state file (receiver state a failed write left unsaved).
    fn acks_wait(&self) -> bool {
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            return !st.is_saved();
        }
        false
    }

    /// State file writes that failed so far.
    fn state_write_failures(&self) -> u64 {
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            return st.write_failures();
        }
        0
    }

    /// When a failed state file write is to be tried again, or held acks reach their time
    /// bound (the driver wakes for it: they left only at its next wake after the bound,
    /// up to a write retry's 5 s later).
    fn retry_at(&self) -> Option<std::time::Instant> {
        let held = self.held.deadline();
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            return match (st.retry_at(), held) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        held
    }

    /// The dialer of dial `id` (the engine picks the relay).
    fn dialer(&self, id: ConnId) -> &Dialer {
        &self.p.dialers[self.p.eng.dial_relay(id) % self.p.dialers.len()]
    }

    /// The URL of the relay in use (or last tried).
    fn describe(&self) -> &str {
        self.p.dialers[self.p.eng.relay() % self.p.dialers.len()].describe()
    }

    /// The socket failed under us (or stopped taking what we write).
    fn lost(&mut self, why: String) {
        if let Some(c) = self.conn.take() {
            let now = self.now();
            self.p.eng.handle_disconnected(c.id, &why, now);
        }
    }

    fn on_incoming(&mut self, first: Option<Incoming>) {
        let Some(id) = self.conn.as_ref().map(|c| c.id) else {
            return;
        };
        // Commands already queued go first: credit the app returned before these frames
        // arrived must count for them (a bounded batch, so frames are never starved).
        // One reading of the clocks for the whole batch.
        let now = self.now();
        for _ in 0..READ_BATCH {
            match self.p.cmd_rx.try_recv() {
                Ok(cmd) => self.apply(cmd, now),
                Err(_) => break,
            }
        }
        let mut next = first;
        for n in 0..READ_BATCH {
            match next {
                Some(Incoming::Frame(f)) => {
                    // A backlog behind this frame means opening inline would fall behind:
                    // hand the opens to the workers. A few frames together (a paced
                    // publisher's tick) open here, cheaper than waking a thread for them.
                    let more = self
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.incoming.len() >= PARALLEL_BACKLOG);
                    self.p.eng.handle_decoded_more(id, f, now, more)
                }
                Some(Incoming::Closed(why)) => return self.lost(why),
                None => return self.lost("reader stopped".into()),
            }
            if n + 1 == READ_BATCH || !self.p.eng.wants_read() {
                break; // the rest waits for the next turn, still queued
            }
            match self.conn.as_mut().and_then(|c| c.incoming.try_recv()) {
                Some(i) => next = Some(i),
                None => break,
            }
        }
    }

    fn on_dialed(&mut self, (id, r): (ConnId, Result<Connection, ConnectError>)) {
        let now = self.now();
        match r {
            Ok(c) => {
                // A later relay's handshake failure must not be reported as an earlier
                // relay's dial error.
                self.dial_error = None;
                self.conn = Some(Live {
                    id,
                    writer: c.writer,
                    incoming: c.incoming,
                });
                self.p.eng.handle_connected(id, now);
            }
            Err(e) => {
                tracing::debug!(relay = %self.dialer(id).describe(), error = %e, "dial failed");
                let why = e.to_string();
                self.dial_error = Some(e);
                self.p.eng.handle_disconnected(id, &why, now);
            }
        }
    }

    fn apply(&mut self, cmd: Command, now: Now) {
        match cmd {
            Command::Ack(token) => self.p.eng.ack(token, now),
            Command::Subscribe {
                id,
                filter,
                opts,
                tx,
                lag,
                ended,
                ready,
            } => match self.p.eng.subscribe(id, filter, opts, now) {
                Ok(()) => {
                    let ready = Some(ready);
                    let sink = Sink {
                        tx,
                        lag,
                        ended,
                        ready,
                    };
                    self.sinks.insert(id, sink);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
            Command::Unsubscribe { id } => {
                self.p.eng.unsubscribe(id);
                self.sinks.remove(&id);
            }
            Command::DeleteDurable { id, done } => {
                // Publishes queued before go first (as for a flush).
                self.take_inbox();
                let now = self.now();
                match self.p.eng.delete_durable(id, now) {
                    Ok(fid) => {
                        self.sinks.remove(&id);
                        self.deletes.insert(fid, done);
                    }
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
            Command::Resubscribe => {
                self.save_keys();
                self.p.eng.refresh_keys(now);
            }
            Command::Flush(tx) => {
                // Publishes queued before the flush go first.
                self.take_inbox();
                let now = self.now();
                let id = self.p.eng.flush(now);
                self.flushes.insert(id, tx);
            }
            Command::Close(done) => {
                self.take_inbox();
                // A failed write is tried once more now, so that the acks it holds back
                // leave before the `Close` (still failing, they go with the connection:
                // the relay delivers their messages again).
                #[cfg(feature = "persistence")]
                if let Some(st) = &self.p.saved {
                    if !self.held.frames.is_empty() {
                        st.try_now();
                    }
                }
                self.persist_changes();
                let now = self.now();
                self.closing.push(done);
                self.p.eng.close(now);
            }
        }
    }

    /// Hands the engine's events on; true once the engine closed for good.
    fn deliver_events(&mut self) -> bool {
        // The receiver state changes of every path that handled messages since the last
        // turn — frames, finished opens, and what a disconnect, a timeout or a close
        // handled inline — are written before the app sees any of them (and so before any
        // ack of them: acks leave only once the app took what they are for).
        self.persist_changes();
        while let Some(e) = self.p.eng.poll_event() {
            match e {
                Event::Connected { relay, .. } => {
                    self.dial_error = None;
                    let url = self.p.dialers[relay % self.p.dialers.len()].describe();
                    self.p.relay.send_if_modified(|cur| {
                        let changed = cur != url;
                        if changed {
                            tracing::info!(relay = %url, "connected to another relay");
                            url.clone_into(cur);
                        }
                        changed
                    });
                    let _ = self.p.state.send(ConnectionState::Connected);
                    if let Some(f) = self.first.take() {
                        let _ = f.send(Ok(()));
                    }
                }
                Event::Disconnected {
                    reason,
                    attempt,
                    retry_at,
                } => {
                    tracing::info!(next_relay = %self.describe(), reason = %Printable(&reason), attempt,
                        retrying = retry_at.is_some(), "connection lost");
                    if retry_at.is_some() {
                        let _ = self.p.state.send(ConnectionState::Reconnecting(attempt));
                    } else if let Some(f) = self.first.take() {
                        let _ = f.send(Err(self.connect_error(reason)));
                    }
                }
                Event::Closed => {
                    self.finish();
                    return true;
                }
                Event::Message { sub, msg, token } => {
                    let Some(msg) = self.plugged(msg) else {
                        // Dropped by a plugin: a hidden placeholder, in order.
                        self.hide(sub, token);
                        continue;
                    };
                    let Some(s) = self.sinks.get(&sub) else {
                        continue;
                    };
                    // Report what was lost before this message, in order.
                    let lost = s.lag.swap(0, Ordering::AcqRel);
                    if lost > 0 {
                        let _ = s.tx.send(Item::Lagged(lost));
                    }
                    // A dropped subscription's Unsubscribe is on its way: what it never took
                    // is then released unacked (the relay delivers it again).
                    let _ = s.tx.send(Item::Msg(msg, token));
                }
                Event::Placeholder { sub, token } => self.hide(sub, token),
                Event::Gap { dropped, subs } => {
                    // The relay's loss notices fold into the same count as the client's own
                    // drops: one wake-up per report, whatever number of `Gap`s (a relay
                    // sending them without end queued an item per Gap per subscription).
                    for sub in subs {
                        if let Some(s) = self.sinks.get(&sub) {
                            if add_lag(&s.lag, dropped) {
                                let _ = s.tx.send(Item::Lagged(0));
                            }
                        }
                    }
                }
                Event::Dropped { sub, n } => {
                    if let Some(s) = self.sinks.get(&sub) {
                        // The first loss since the last report also queues a wake-up, so a
                        // reader waiting on an empty stream learns of it now, not only when
                        // (if ever) another message arrives. One marker per report: bounded.
                        if add_lag(&s.lag, n) {
                            let _ = s.tx.send(Item::Lagged(0));
                        }
                    }
                    self.slow_drops = self.slow_drops.saturating_add(n);
                }
                Event::SubscribeOk { sub } => {
                    if let Some(r) = self.sinks.get_mut(&sub).and_then(|s| s.ready.take()) {
                        let _ = r.send(Ok(()));
                    }
                }
                Event::SubscribeErr { sub, error } => {
                    if let Some(s) = self.sinks.remove(&sub) {
                        match s.ready {
                            Some(r) => {
                                let _ = r.send(Err(error.into()));
                            }
                            // Confirmed before: the stream ends with the relay's reason.
                            None => {
                                if let SubscribeFailure::Rejected { code, message } = error {
                                    let why = ReceiveError::Ended { code, message };
                                    tracing::warn!(why = %Printable(&why), "subscription ended by the relay");
                                    // What the stream still buffers was released (not
                                    // taken): skipped, so it is not delivered twice.
                                    s.ended.store(true, Ordering::Release);
                                    let _ = s.tx.send(Item::Ended(why));
                                }
                            }
                        }
                    }
                }
                Event::PubAck { pid, seq } => {
                    self.settled(&pid);
                    if let Some(r) = self.acks.remove(&pid) {
                        let _ = r.send(Ok(seq));
                    }
                }
                Event::PublishFailed { pid, reason } => {
                    // A kept publish the engine gave up on at close stays saved: a later
                    // run re-sends it.
                    if reason != PublishFailure::Closed {
                        self.settled(&pid);
                    }
                    if let Some(r) = self.acks.remove(&pid) {
                        let _ = r.send(Err(PublishError::from(reason)));
                    } else if reason != PublishFailure::Closed {
                        // Nobody waits for it: a kept publish restored from the state file
                        // (an earlier run's). Said once, or its loss would go unnoticed.
                        tracing::warn!(
                            publish_id = %hex::encode(pid.0),
                            error = %Printable(PublishError::from(reason)),
                            "a publish restored from the state file failed; it is not sent again"
                        );
                    }
                }
                Event::Flushed { id } => {
                    if let Some(r) = self.flushes.remove(&id) {
                        let _ = r.send(Ok(()));
                    }
                }
                Event::FlushFailed { id } => {
                    if let Some(r) = self.flushes.remove(&id) {
                        let _ = r.send(Err(FlushError::Disconnected));
                    }
                    if let Some(r) = self.deletes.remove(&id) {
                        let _ = r.send(Err(crate::error::DeleteError::Disconnected));
                    }
                }
                Event::DurableDeleted { id, error } => {
                    if let Some(r) = self.deletes.remove(&id) {
                        let _ = r.send(match error {
                            None => Ok(()),
                            Some((code, message)) => {
                                Err(crate::error::DeleteError::Rejected { code, message })
                            }
                        });
                    }
                }
                Event::PublishRefused { code, message } => {
                    // Counted (`publish_refusals`): its `publish` returned long ago.
                    self.log_relay_err("the relay refused a QoS 0 publish", code, &message);
                }
                Event::RelayError { code, message, .. } => {
                    self.log_relay_err("relay error", code, &message);
                }
                Event::ReplayDone { .. } => {}
            }
        }
        false
    }

    /// Runs the plugins on a delivered message, once however many subscriptions it goes to
    /// (the engine hands them out one after another); `None`: a plugin dropped it.
    fn plugged(&mut self, msg: Arc<Received>) -> Option<Arc<Received>> {
        if self.p.plugins.is_empty() {
            return Some(msg);
        }
        if let Some((orig, out)) = &self.plugin_memo {
            if Arc::ptr_eq(orig, &msg) {
                return out.clone();
            }
        }
        let mut m = msg.clone();
        let out = if self.p.plugins.on_message(Arc::make_mut(&mut m)) == Verdict::Drop {
            self.plugin_drops += 1;
            self.sync_stats(); // before the app sees what follows
            None
        } else {
            Some(m)
        };
        self.plugin_memo = Some((msg, out.clone()));
        out
    }

    /// A slot the app never sees: it waits in the subscription's stream, which takes it
    /// silently, so its ack leaves when the app reaches it (ack timing follows reading,
    /// never the outcome of opening: PROTOCOL §4.10).
    fn hide(&self, sub: LocalSubId, token: AckToken) {
        if let Some(s) = self.sinks.get(&sub) {
            let _ = s.tx.send(Item::Hidden(token));
        }
    }

    /// The first connection failed: the typed error for `connect()`.
    fn connect_error(&mut self, reason: Disconnect) -> ConnectError {
        if let Some(e) = self.dial_error.take() {
            return e;
        }
        match reason {
            Disconnect::Timeout => ConnectError::Timeout(self.p.connect_timeout),
            Disconnect::Rejected { code, message } => ConnectError::Rejected { code, message },
            Disconnect::Handshake(why) | Disconnect::Transport(why) => ConnectError::Handshake(why),
            Disconnect::AuthNotBound(why) => ConnectError::AuthNotBound(why),
            other => ConnectError::Handshake(other.to_string()),
        }
    }

    fn finish(&mut self) {
        // A write that failed is tried once more, whatever its retry time: what it holds
        // is lost with the process otherwise.
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            st.try_now();
        }
        self.persist_changes();
        // Refuse new commands before anyone learns the client is closed: a `publish` after
        // `close()` returned must fail, not land in a queue nobody reads.
        self.p.cmd_rx.close();
        // Publishes queued after the close: their waiters learn it (`Closed`).
        let late = self.p.inbox.close();
        self.p
            .backlog
            .release(late.iter().map(|r| r.reserved).sum::<usize>() + self.handed);
        self.handed = 0;
        drop(late);
        self.p.backlog.close();
        if let Some((_, task)) = self.dialing.take() {
            task.abort();
        }
        let _ = self.p.state.send(ConnectionState::Closed);
        self.sinks.clear(); // ends every Subscription stream
        self.sync_stats();
        for done in self.closing.drain(..) {
            let _ = done.send(());
        }
        // Commands that raced the close: their senders drop (Closed).
        while let Ok(cmd) = self.p.cmd_rx.try_recv() {
            if let Command::Close(done) = cmd {
                let _ = done.send(());
            }
        }
    }

    fn sync_stats(&mut self) {
        // A publish counts as unacknowledged only once it is saved.
        self.save_kept();
        let e = self.p.eng.stats();
        let next = ClientStats {
            core: e.core,
            slow_subscriber_drops: self.slow_drops,
            outbox_drops: e.outbox_drops,
            publish_refusals: e.publish_refusals,
            reconnects: e.reconnects,
            plugin_drops: self.plugin_drops,
            unacked_publishes: e.unacked_publishes,
            sealing_publishes: e.sealing_publishes,
            publish_retries: e.publish_retries,
            type_mismatches: 0, // counted by the subscriptions; `Client::stats` adds it
            seal_failures: e.seal_failures,
            restore_refused: e.restore_refused,
            state_write_failures: self.state_write_failures(),
        };
        self.p.stats.send_if_modified(|s| {
            if *s == next {
                return false;
            }
            *s = next;
            true
        });
    }

    /// Saves (with `Persistence`) the publishes the engine kept since the last call: called
    /// before every `poll_transmit` and before the stats are published, so a QoS ≥ 1
    /// publish is in the saved outbox before any of its frame is written and before it
    /// counts as unacknowledged (a crash after either cannot lose it).
    fn save_kept(&mut self) {
        while let Some((pid, order, frame)) = self.p.eng.poll_kept() {
            #[cfg(feature = "persistence")]
            if let Some(st) = &self.p.saved {
                st.keep(&pid.0, order, &frame);
            }
            let _ = (pid, order, frame);
        }
    }

    /// The relay acknowledged (or refused) a publish: no longer saved.
    fn settled(&self, pid: &PublishId) {
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            st.acked(&pid.0);
        }
        let _ = pid;
    }

    /// Writes the receiver state changes (dedup entries, retained marks) to the state file,
    /// before the app sees the messages and before acks leave: called at the start of
    /// [`Driver::deliver_events`] and before the turn's first transmit, whatever produced
    /// them (an at-least-once message is recorded once the app took it).
    ///
    /// A failed write is held and written with the next one ([`crate::persist::Store::save`]);
    /// meanwhile acks wait ([`HeldAcks`]).
    fn persist_changes(&mut self) {
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            let changes = self.p.eng.core_mut().take_changes();
            let core = self.p.eng.core();
            let cfg = core.guard().config();
            let keep = cfg.horizon_ms.saturating_add(cfg.max_skew_ms);
            let now = now_ms();
            st.save(
                changes,
                now,
                now.saturating_sub(keep),
                cfg.max_entries,
                || {
                    let snap = core.guard().snapshot(now);
                    Some(crate::persist::Repair {
                        retained: snap.retained,
                        forgot_upto: snap.forgot_upto,
                        owed: core.owed_snapshot(),
                    })
                },
            );
            return;
        }
        self.p.eng.core_mut().clear_changes();
    }

    /// A grant was added at run time: saves the keyring's pins (a new tree pins its admin)
    /// and when its epochs were superseded (a new epoch starts the previous one's grace).
    fn save_keys(&self) {
        #[cfg(feature = "persistence")]
        if let Some(st) = &self.p.saved {
            let kr = self.p.eng.core().keyring().read().expect("keyring lock");
            st.save_pins(&kr.export_pins());
            st.save_superseded(&kr.superseded_epochs());
        }
    }
}

/// Sleeps until `t` (pending forever without one).
async fn until(t: Option<std::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// The next item of the open socket's reader (pending forever without a socket).
async fn recv(conn: &mut Option<Live>) -> Option<Incoming> {
    match conn {
        Some(c) => c.incoming.recv().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the dial in progress (pending forever without one).
async fn dialed(
    dialing: &mut Option<(ConnId, JoinHandle<Result<Connection, ConnectError>>)>,
) -> (ConnId, Result<Connection, ConnectError>) {
    let Some((id, task)) = dialing else {
        return std::future::pending().await;
    };
    let id = *id;
    let r = match task.await {
        Ok(r) => r,
        Err(e) => Err(ConnectError::Handshake(format!("dial task failed: {e}"))),
    };
    *dialing = None;
    (id, r)
}

/// `f`'s output, or `None` if it is not done within `limit`. The timer (a clock read and a
/// timer entry) is set up only for a write that does not complete at once: nearly every
/// frame goes into the writer's buffer on the first poll, on the publish path.
async fn within_stall<F: std::future::Future>(limit: Duration, f: F) -> Option<F::Output> {
    use futures_util::FutureExt;
    let mut f = std::pin::pin!(f);
    if let Some(out) = f.as_mut().now_or_never() {
        return Some(out);
    }
    tokio::time::timeout(limit, f).await.ok()
}

/// Why a connection whose writes stalled is given up. While a write waits, the connection
/// task does nothing else — no reads, no heartbeat, no commands — so a relay that stops
/// reading (while it makes the client answer its `Ping`s, say) would hold the connection,
/// and `close`, forever: a frame (or a flush) that the socket has not taken within the
/// connect timeout ends the connection, and the engine reconnects with its backoff.
fn stalled(limit: Duration) -> String {
    format!(
        "the relay took nothing written for {} ms (write stalled)",
        limit.as_millis()
    )
}

/// Adds `n` lost messages to a subscription's unreported count (saturating: the relay
/// chooses a `Gap`'s count); whether this starts a report (the count was 0, `n` is not),
/// so the caller queues its one wake-up.
fn add_lag(lag: &AtomicU64, n: u64) -> bool {
    let before = lag
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
            Some(l.saturating_add(n))
        })
        .unwrap_or_else(|l| l);
    before == 0 && n > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_errors_are_logged_ten_a_minute_and_the_rest_counted() {
        let t0 = std::time::Instant::now();
        let mut b = LogBudget::default();
        let warned: Vec<bool> = (0..25).map(|_| b.take(t0).0).collect();
        assert_eq!(warned.iter().filter(|w| **w).count(), 10);
        assert!(warned[..10].iter().all(|w| *w), "the first ten");
        // A minute on: logged again, and the 15 left out are said once.
        assert_eq!(b.take(t0 + Duration::from_secs(60)), (true, 15));
        assert_eq!(b.take(t0 + Duration::from_secs(61)), (true, 0));
    }

    /// Review finding (6): held acks are bounded by the sequences they cover (the relay's
    /// credit counts messages), not by frames; a flush's ping is told from a heartbeat's.
    #[test]
    fn held_acks_count_sequences_and_flush_pings_are_told_apart() {
        use whispeer_protocol::frame::{Ack, Frame, Ping};
        for n in [1usize, 23, 24, 255, 256, 4096] {
            let f = Frame::Ack(Ack {
                seqs: (1..=n as u64).map(|s| s * 1_000_003).collect(),
            })
            .to_bytes();
            assert!(is_ack(&f));
            assert_eq!(ack_seqs(&f), n);
        }
        assert!(is_flush_ping(&Frame::Ping(Ping { nonce: 7 }).to_bytes()));
        assert!(!is_flush_ping(&Frame::Ping(Ping { nonce: 0 }).to_bytes()));
        assert!(!is_ack(&Frame::Ping(Ping { nonce: 7 }).to_bytes()));
        let mut h = HeldAcks::default();
        let big = Frame::Ack(Ack {
            seqs: (1..=4000).collect(),
        })
        .to_bytes();
        h.hold(ConnId::default(), big);
        assert!(!h.overdue());
        h.hold(
            ConnId::default(),
            Frame::Ack(Ack {
                seqs: (4001..=4096).collect(),
            })
            .to_bytes(),
        );
        assert!(h.overdue(), "4,096 sequences held: sent anyway");
        assert_eq!(h.take().len(), 2);
        assert!(!h.overdue());
    }
}
