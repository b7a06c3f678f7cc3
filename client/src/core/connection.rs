//! The sans-IO connection engine (`../shared/ENGINE.md`): the whole client side of the
//! relay protocol — handshake, subscriptions and their resume positions, the QoS 1/2 outbox,
//! publish ids and acks, the ack queue, heartbeats, backoff and flush — as a state machine
//! with no clock, socket, task or OS randomness, in the style of quinn-proto.
//!
//! - **In**: [`Engine::handle_connected`], [`Engine::handle_frame`],
//!   [`Engine::handle_disconnected`], [`Engine::handle_timeout`] and the app's commands
//!   ([`Engine::publish`], [`Engine::subscribe`], [`Engine::ack`], [`Engine::flush`]...),
//!   each with the time ([`Now`]).
//! - **Out**: [`Engine::poll_transmit`] (frames to write, sockets to dial or close, in
//!   order), [`Engine::poll_timeout`] (the next deadline) and [`Engine::poll_event`].
//!   After every input or command the driver drains them in that order.
//!
//! The engine is a **session** that outlives sockets: subscriptions, the outbox and the
//! dedup window survive reconnects; the handshake, heartbeat, ack queue and flushes belong
//! to one socket. The engine decides when to dial; the driver reports what happened. The
//! same inputs, times and seed give the same outputs (no `HashMap` decides any order).

mod auth;
mod outbox;
mod rng;
mod sealing;
mod types;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use whispeer_protocol::frame::{self, Ack, Close, ErrFrame, Msg, Ping, Pong, Unsub};
use whispeer_protocol::{
    Envelope, ErrorCode, Frame, Keyring, OpenError, Prepared, Qos, TopicFilter,
};

pub use auth::AccountAuth;
pub use rng::{Backoff, SeededRng};
pub use sealing::BATCH_MAX_BYTES;
pub use types::{
    AckToken, AuthNotBound, ConnId, Disconnect, EngineConfig, EngineStats, Event, FlushId, Now,
    PubOptions, PublishFailure, PublishId, SubscribeFailure, Transmit,
};

use super::acks::{AckQueue, SlotId};
use super::batching::{SealDone, SealJob};
use super::jobs::{OpenDone, OpenJob, Unsealed};
use super::receive;
use super::{ClientCore, Delivery, LocalSubId, SeqSpace, SubscribeOptions};
use crate::error::{DeleteError, PublishError, SubscribeError};
pub use outbox::kept_frame_check;
use outbox::Outbox;
use sealing::{Meta, Sealing, Unit};

/// Most sequences in one `Ack` frame (the relay's limit).
pub const MAX_ACKS_PER_FRAME: usize = 4096;

/// The connection phase.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Dialing {
        conn: ConnId,
        deadline: u64,
    },
    Handshaking {
        conn: ConnId,
        deadline: u64,
        /// A `Challenge` was answered: one per connection (see `handshake_frame`).
        answered: bool,
    },
    Live {
        conn: ConnId,
        heartbeat_ms: u64,
        ping_at: u64,
        unanswered: u32,
    },
    Backoff {
        retry_at: u64,
    },
    Closed,
}

/// Per local subscription: its credit and whether the relay expects acks.
#[derive(Debug)]
struct SubState {
    acking: bool,
    /// Delivered and not yet taken at most (its own capacity, else the client's).
    capacity: u64,
    /// Delivered (messages and placeholders) and not yet taken.
    outstanding: u64,
    /// Of those, the numbered ones with a slot to take (at least once): each unacknowledged
    /// at the relay, so at `capacity` (its `Sub.credit`) the relay has it paused.
    numbered: u64,
    /// Relay subscriptions still waiting for `SubOk` (`None`: confirmed).
    waiting: Option<BTreeSet<u64>>,
    /// Messages handed to it and not taken yet, by slot: held ones
    /// (`Delivery::Deliver::held`, `true`), released untaken when it goes away (and owed
    /// to its durable, if it has one); and, for a durable one, copies of messages that
    /// counted as delivered at once (`false`), owed to its durable until it takes them.
    untaken: HashMap<SlotId, (receive::Digest, bool)>,
    /// Its durable name.
    durable: Option<String>,
}

/// A frame of the live socket waiting for the opens before it (deferred opening).
#[derive(Debug)]
enum Parked {
    /// A `Msg` whose envelope an [`OpenJob`] is opening (`None` until it answers).
    Msg(Box<Msg>, Option<Box<Result<Unsealed, OpenError>>>),
    /// Any other frame: handled once everything before it is.
    Frame(Frame),
}

/// Deferred opening: the live socket's frames in arrival order from the first one still
/// waiting for its open, keyed by arrival number (a `Msg`'s number is its job id), and the
/// jobs not yet taken by the driver.
///
/// Arrival numbers are consecutive, so the frames are a ring (the front is number
/// `next - frames.len()`): a `BTreeMap` here shifted the rest of a leaf on every removal
/// from the front (~1.4 % of a bench subscriber's CPU in `memmove`).
#[derive(Debug, Default)]
struct Parking {
    frames: VecDeque<Parked>,
    jobs: VecDeque<OpenJob>,
    next: u64,
}

impl Parking {
    /// The frame with arrival number `id`, if still parked.
    fn get_mut(&mut self, id: u64) -> Option<&mut Parked> {
        let first = self.next - self.frames.len() as u64;
        let i = usize::try_from(id.checked_sub(first)?).ok()?;
        self.frames.get_mut(i)
    }

    /// Parks `p` as the next arrival; its number.
    fn push(&mut self, p: Parked) -> u64 {
        let id = self.next;
        self.next += 1;
        self.frames.push_back(p);
        id
    }
}

/// The shortest heartbeat interval the engine takes from a relay's `Welcome`.
pub const MIN_HEARTBEAT_MS: u64 = 1_000;
/// The longest heartbeat interval the engine takes from a relay's `Welcome`.
pub const MAX_HEARTBEAT_MS: u64 = 300_000;

/// Ack-queue entries allowed beyond twice the at-least-once subscriptions' credit
/// ([`Engine::ack_slot_bound`]).
const ACK_SLOT_SLACK: usize = 65_536;

/// The connection engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    core: ClientCore,
    rng: SeededRng,
    phase: Phase,
    /// Failed attempts in a row since the last connection that stayed live for
    /// `backoff.max_ms` (each dial and each lost connection counts one, whichever relay it
    /// was). Not reset by a `Welcome` alone: a relay that greets and then drops every
    /// connection would otherwise be redialled at the first backoff step (or, with several
    /// relays, at once) forever, each time resubscribing and re-sending every kept publish.
    attempt: u32,
    /// When the live connection counts as stable (its `Welcome` plus `backoff.max_ms`): lost
    /// after that, the attempts start again from 0.
    stable_at: Option<u64>,
    /// The relay address (index into the driver's list) the current or next dial goes to.
    relay: usize,
    /// The last dial asked for and its relay (what [`Engine::dial_relay`] answers).
    dialed: (ConnId, usize),
    ever_live: bool,
    next_conn: ConnId,
    last_mono: u64,
    out: Outbox,
    events: VecDeque<Event>,
    subs: BTreeMap<LocalSubId, SubState>,
    acks: AckQueue,
    ack_at: Option<u64>,
    flushes: BTreeSet<u64>,
    next_nonce: u64,
    stats: EngineStats,
    /// The current (or last) relay's `Welcome.max_frame`: publishes over it are refused.
    relay_max_frame: usize,
    /// Kept publishes the relay refused with a retryable code: retries so far, and when the
    /// next re-send is due (`None`: sent again, waiting for the answer).
    retries: BTreeMap<PublishId, (u32, Option<u64>)>,
    /// Durable resumes the relay refused with `not_allowed` (the name is held elsewhere: a
    /// connection of the previous relay not yet timed out, or its cluster hold not yet
    /// lapsed), by relay subscription id: refusals in a row, and when the next `Sub` is due.
    sub_retries: BTreeMap<u64, (u32, Option<u64>)>,
    /// Frames waiting for their (or earlier) envelopes to open (`open_ahead > 0`).
    parked: Parking,
    /// Batch signing: prepared publishes queued and cut into seal jobs, re-ordered by job
    /// id (`sealing`), with the sealed publishes, flushes and a close issued behind them.
    sealing: Sealing,
    /// `close()` was called and waits behind publishes still being sealed.
    closing: bool,
    /// QoS ≥ 1 publishes put in the outbox since the driver last asked
    /// ([`Engine::poll_kept`]): to persist before any of their frames leaves.
    kept_new: VecDeque<(PublishId, u64, Bytes)>,
    /// The feature bits the current (or last) relay granted in `Welcome`.
    relay_features: u64,
    /// Durable deletions sent and not yet answered, by the flush that follows them: the
    /// relay subscription ids deleted and the first `Err` the relay sent for one of them.
    deletes: BTreeMap<FlushId, PendingDelete>,
    /// By message digest, the durable subscriptions holding a copy of it untaken, with
    /// the copy's slot (one message can come as several copies: a live one, a replayed
    /// one another subscription asked for). When any subscription takes a copy, the
    /// window holds the message as delivered, and each durable subscription of another
    /// name still holding a copy is owed it ([`ClientCore::dedup_co_held`]): saved, so a
    /// crash before that durable takes it does not lose it. An entry goes with its copy
    /// (taken, or its subscription gone).
    durable_copies:
        HashMap<receive::Digest, Vec<(LocalSubId, SlotId)>, foldhash::fast::RandomState>,
}

/// A durable deletion waiting for its flush: the relay subscription ids deleted, the
/// first refusal the relay sent for one of them, and the durable's name (what it is owed
/// is forgotten only once the relay confirmed the deletion).
type PendingDelete = (Vec<u64>, Option<(ErrorCode, String)>, Option<String>);

impl Engine {
    /// An engine over a shared keyring; it asks for its first socket at once.
    pub fn new(
        mut cfg: EngineConfig,
        keyring: Arc<RwLock<Keyring>>,
        seed: [u8; 32],
        now: Now,
    ) -> Self {
        let mut core = ClientCore::with_config(keyring, cfg.receive.clone());
        core.set_credit(Some(cfg.sub_capacity));
        if let Some(k) = cfg.owner_key.take() {
            core.set_owner_key(k);
        }
        let mut out = Outbox::default();
        for (pid, order, frame) in std::mem::take(&mut cfg.restored) {
            out.restore(pid, order, frame);
        }
        let sealing = Sealing::new(cfg.batch, cfg.seal_ahead, cfg.trickle);
        let mut e = Engine {
            sealing,
            closing: false,
            kept_new: VecDeque::new(),
            cfg,
            core,
            rng: SeededRng::new(&seed),
            phase: Phase::Closed,
            attempt: 0,
            stable_at: None,
            relay: 0,
            dialed: (0, 0),
            ever_live: false,
            next_conn: 1,
            last_mono: now.mono_ms,
            out,
            events: VecDeque::new(),
            subs: BTreeMap::new(),
            acks: AckQueue::new(),
            ack_at: None,
            flushes: BTreeSet::new(),
            next_nonce: 1,
            stats: EngineStats::default(),
            relay_max_frame: usize::MAX,
            retries: BTreeMap::new(),
            sub_retries: BTreeMap::new(),
            parked: Parking::default(),
            relay_features: 0,
            deletes: BTreeMap::new(),
            durable_copies: HashMap::default(),
        };
        e.dial(now.mono_ms);
        e.sync_unacked();
        e
    }

    /// The runtime-free core (subscriptions, receiver state), e.g. to restore the dedup
    /// window or read the resume positions.
    pub fn core(&self) -> &ClientCore {
        &self.core
    }

    /// Mutable access to the core (restoring persisted receiver state).
    pub fn core_mut(&mut self) -> &mut ClientCore {
        &mut self.core
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.core = self.core.stats();
        s.restore_refused = self.out.restore_refused();
        s
    }

    /// Whether handshaken and live.
    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live { .. })
    }

    /// Whether closed for good.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Bytes of frames queued for the driver and not yet taken, and of publishes queued
    /// for (or in) a seal job ([`Engine::sealing_bytes`]) (backpressure: a driver stops
    /// accepting publishes above its high-water mark).
    pub fn queued_bytes(&self) -> usize {
        self.out.queued_bytes() + self.sealing.bytes()
    }

    /// Backlog bytes of the publishes waiting to be sealed: queued for a batch, in a seal
    /// job, or behind one ([`crate::core::batching::prepared_weight`] each, a sealed
    /// envelope's length).
    pub fn sealing_bytes(&self) -> usize {
        self.sealing.bytes()
    }

    /// The frame and order of a kept QoS ≥ 1 publish still in the outbox.
    pub fn kept_publish(&self, pid: &PublishId) -> Option<(u64, Bytes)> {
        self.out.kept_entry(pid)
    }

    /// The next QoS ≥ 1 publish put in the outbox (kept until acknowledged): its id, order
    /// and `Pub` frame — a sealed publish as soon as [`Engine::publish`] (or
    /// [`Engine::publish_as`]) returns, a prepared one once its seal job is handed back
    /// ([`Engine::handle_sealed`]). A driver with persistence saves every one **before it
    /// takes the next [`Engine::poll_transmit`]** (the frame may be the next transmit) and
    /// before it reports [`EngineStats::unacked_publishes`], so a publish is in the saved
    /// outbox before it counts as unacknowledged and before any of it leaves the process.
    /// The entry stays valid after the engine closed (a kept publish stays saved for the
    /// next run). Drivers without persistence drain it too (it is not bounded otherwise).
    pub fn poll_kept(&mut self) -> Option<(PublishId, u64, Bytes)> {
        self.kept_new.pop_front()
    }

    fn clamp(&mut self, now: Now) -> u64 {
        self.last_mono = self.last_mono.max(now.mono_ms);
        self.last_mono
    }

    fn conn(&self) -> Option<ConnId> {
        match self.phase {
            Phase::Dialing { conn, .. }
            | Phase::Handshaking { conn, .. }
            | Phase::Live { conn, .. } => Some(conn),
            _ => None,
        }
    }

    fn emit(&mut self, e: Event) {
        self.events.push_back(e);
    }

    fn send(&mut self, f: Frame) {
        self.out.control(f.to_bytes());
    }

    fn sync_unacked(&mut self) {
        // A QoS ≥ 1 publish waiting for its seal job is not yet kept (nor saved): counted
        // apart until it is in the outbox.
        self.stats.unacked_publishes = self.out.kept_len() as u64;
        self.stats.sealing_publishes = self.sealing.kept() as u64;
    }

    /// The relay address (an index into the list the driver was given, `0..relays`) that
    /// dial `conn` must open: the driver asks when it takes a [`Transmit::Dial`].
    pub fn dial_relay(&self, conn: ConnId) -> usize {
        if self.dialed.0 == conn {
            self.dialed.1
        } else {
            self.relay
        }
    }

    /// The relay address the current connection (or the next dial) uses.
    pub fn relay(&self) -> usize {
        self.relay
    }

    fn dial(&mut self, mono: u64) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.dialed = (conn, self.relay);
        self.out.dial(conn);
        self.phase = Phase::Dialing {
            conn,
            deadline: mono.saturating_add(self.cfg.connect_timeout_ms),
        };
    }

    // ---- inputs from the driver ------------------------------------------------------

    /// Socket `c` is open: the handshake starts (`Hello`).
    pub fn handle_connected(&mut self, c: ConnId, now: Now) {
        let mono = self.clamp(now);
        match self.phase {
            Phase::Dialing { conn, .. } if conn == c => {
                let mut hello = ClientCore::hello(&self.cfg.client_name);
                if let (Some(a), Frame::Hello(h)) = (&self.cfg.auth, &mut hello) {
                    a.fill_hello(h);
                }
                self.send(hello);
                self.phase = Phase::Handshaking {
                    conn,
                    deadline: mono.saturating_add(self.cfg.connect_timeout_ms),
                    answered: false,
                };
            }
            // A socket the engine no longer wants.
            _ => self.out.hangup(c),
        }
    }

    /// Socket `c` closed or failed (or its dial did).
    pub fn handle_disconnected(&mut self, c: ConnId, why: &str, now: Now) {
        let mono = self.clamp(now);
        if self.conn() == Some(c) {
            // What arrived before the socket closed is handled first, as inline.
            self.open_parked_inline(now);
            if self.conn() == Some(c) {
                self.lose(Disconnect::Transport(why.to_owned()), false, mono);
            }
        }
    }

    /// One frame from socket `c` (transport framing removed).
    pub fn handle_frame(&mut self, c: ConnId, bytes: &Bytes, now: Now) {
        if self.conn() != Some(c) {
            return;
        }
        match Frame::decode(bytes) {
            Ok(f) => self.handle_decoded(c, f, now),
            Err(e) => {
                let mono = self.clamp(now);
                self.lose(Disconnect::BadFrame(e.to_string()), true, mono);
            }
        }
    }

    /// One frame from socket `c`, already decoded by the transport. With `open_ahead > 0`
    /// a `Msg` always becomes an [`OpenJob`]; drivers that know whether more frames are
    /// already waiting call [`Engine::handle_decoded_more`] instead.
    pub fn handle_decoded(&mut self, c: ConnId, f: Frame, now: Now) {
        self.handle_decoded_more(c, f, now, true)
    }

    /// [`Engine::handle_decoded`], told whether the transport already holds more frames
    /// (`more_waiting`). A `Msg` that arrives with nothing parked and nothing behind it is
    /// opened here at once: handing it to a worker would add a thread wake-up and a
    /// channel round trip to its latency and CPU for no parallelism. Only when frames queue
    /// up (a burst, or a reader faster than this task) do they become open jobs, so the
    /// pool serves throughput and a paced stream keeps the inline path's latency.
    pub fn handle_decoded_more(&mut self, c: ConnId, f: Frame, now: Now, more_waiting: bool) {
        let mono = self.clamp(now);
        match self.phase {
            Phase::Handshaking { conn, .. } if conn == c => self.handshake_frame(f, mono, now),
            Phase::Live { conn, .. } if conn == c => {
                if let Phase::Live { unanswered, .. } = &mut self.phase {
                    *unanswered = 0; // the relay is alive
                }
                if self.cfg.open_ahead > 0
                    && (!self.parked.frames.is_empty()
                        || (more_waiting && matches!(f, Frame::Msg(_))))
                {
                    self.park(f, now);
                } else {
                    self.live_frame(f, mono, now);
                }
            }
            _ => {}
        }
    }

    /// Time passed: deadlines that are due fire (an early or repeated call does nothing).
    pub fn handle_timeout(&mut self, now: Now) {
        let mono = self.clamp(now);
        match self.phase.clone() {
            Phase::Dialing { deadline, .. } | Phase::Handshaking { deadline, .. }
                if mono >= deadline =>
            {
                self.lose(Disconnect::Timeout, true, mono);
            }
            Phase::Backoff { retry_at } if mono >= retry_at => self.dial(mono),
            Phase::Live {
                heartbeat_ms,
                ping_at,
                unanswered,
                ..
            } => {
                if self.ack_at.is_some_and(|t| mono >= t) {
                    self.send_acks(true);
                }
                self.resend_due(mono);
                self.resubscribe_due(mono);
                if mono >= ping_at {
                    if unanswered >= self.cfg.max_unanswered_pings {
                        self.open_parked_inline(now);
                        if self.is_live() {
                            self.lose(Disconnect::HeartbeatTimeout, true, mono);
                        }
                        return;
                    }
                    self.send(Frame::Ping(Ping { nonce: 0 }));
                    if let Phase::Live {
                        ping_at,
                        unanswered,
                        ..
                    } = &mut self.phase
                    {
                        *unanswered += 1;
                        *ping_at = mono.saturating_add(heartbeat_ms);
                    }
                }
            }
            _ => {}
        }
    }

    // ---- outputs -----------------------------------------------------------------------

    /// The next frame to write, socket to dial or socket to close.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.cfg.ack_delay_ms == 0 && self.acks.has_ready() && self.is_live() {
            self.send_acks(true);
        }
        self.out.pop()
    }

    /// The next deadline (monotonic ms), if any: call [`Engine::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<u64> {
        let conn = self.conn_timeout();
        match (conn, self.sealing.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) if self.phase != Phase::Closed => a.or(b),
            _ => None,
        }
    }

    fn conn_timeout(&self) -> Option<u64> {
        match &self.phase {
            Phase::Dialing { deadline, .. } | Phase::Handshaking { deadline, .. } => {
                Some(*deadline)
            }
            Phase::Backoff { retry_at } => Some(*retry_at),
            Phase::Live { ping_at, .. } => {
                let retry = self
                    .retries
                    .values()
                    .chain(self.sub_retries.values())
                    .filter_map(|(_, due)| *due)
                    .min();
                Some(
                    [self.ack_at, retry]
                        .into_iter()
                        .flatten()
                        .fold(*ping_at, u64::min),
                )
            }
            Phase::Closed => None,
        }
    }

    /// The next event for the app.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next envelope to open elsewhere (deferred opening, `open_ahead > 0`): run it
    /// ([`OpenJob::run`], any thread) and hand the result to [`Engine::handle_opened`].
    pub fn poll_open_job(&mut self) -> Option<OpenJob> {
        self.parked.jobs.pop_front()
    }

    /// Whether the driver should read more frames: false while `open_ahead` frames wait
    /// for their opens (like rustls's `wants_read`), so parked work stays bounded.
    pub fn wants_read(&self) -> bool {
        self.cfg.open_ahead == 0 || self.parked.frames.len() < self.cfg.open_ahead
    }

    /// Envelopes handed out as [`OpenJob`]s and not answered yet, parked frames behind them
    /// included.
    pub fn parked(&self) -> usize {
        self.parked.frames.len()
    }

    /// An [`OpenJob`] finished, in any order: the frames before the first still unopened
    /// one are handled now, in relay order. A result for a frame no longer parked (opened
    /// inline at a disconnect, or of a socket gone) is ignored.
    pub fn handle_opened(&mut self, done: OpenDone, now: Now) {
        self.clamp(now);
        if let Some(Parked::Msg(_, slot @ None)) = self.parked.get_mut(done.id) {
            *slot = Some(Box::new(done.result));
            self.release_parked(now);
        }
    }

    /// The next batch of prepared publishes to sign and seal elsewhere
    /// ([`SealJob::run`], any thread): at most `batch.max_messages`, cut once full or due
    /// (no window: whatever is queued), at most `seal_ahead` (at least 1) out at a time.
    /// Hand the result to [`Engine::handle_sealed`]. A driver without threads runs each
    /// job at once (the wasm client, and `seal_ahead = 0`).
    pub fn poll_seal_job(&mut self, now: Now) -> Option<SealJob> {
        let mono = self.clamp(now);
        if self.phase == Phase::Closed {
            return None;
        }
        self.sealing.poll_job(mono)
    }

    /// A [`SealJob`] finished, in any order: the publishes (and the sealed publishes,
    /// flushes and close behind them) before the first job still out are handed on in
    /// publish order. A publish that could not be sealed fails
    /// ([`PublishFailure::Seal`] when it has an id; counted in
    /// [`EngineStats::seal_failures`]). An answer to no waiting job is ignored.
    pub fn handle_sealed(&mut self, done: SealDone, now: Now) {
        self.clamp(now);
        if self.sealing.answer(done) {
            self.release_sealed(now);
            self.sync_unacked();
        }
    }

    /// Hands on the units whose turn it is.
    fn release_sealed(&mut self, now: Now) {
        while let Some(u) = self.sealing.pop_ready() {
            match u {
                Unit::Batch { metas, results } => {
                    for (m, r) in metas.into_iter().zip(results.unwrap_or_default()) {
                        self.hand_sealed(m, r, now);
                    }
                }
                Unit::Sealed(env, m) => self.hand_sealed(m, Ok(env), now),
                Unit::Flush(id) => self.do_flush(id),
                Unit::Close => {
                    self.do_close(now);
                    return;
                }
            }
        }
    }

    /// One publish out of the seal pipeline, into the outbox (or failed).
    fn hand_sealed(
        &mut self,
        m: Meta,
        r: Result<Envelope, whispeer_protocol::SealError>,
        now: Now,
    ) {
        let reason = match r {
            // A kept one is reported by `poll_kept` (to persist before its frame leaves).
            Ok(env) => match self.publish_as(env, m.o, m.pid, now) {
                Ok(()) => return,
                Err(PublishError::BufferFull(n)) => PublishFailure::BufferFull(n),
                Err(PublishError::Rejected { code, message }) => {
                    PublishFailure::Rejected { code, message }
                }
                Err(_) => PublishFailure::Closed,
            },
            Err(e) => {
                self.stats.seal_failures += 1;
                tracing::warn!(error = %e, "a publish could not be sealed");
                PublishFailure::Seal(e)
            }
        };
        match m.pid {
            Some(pid) => self.emit(Event::PublishFailed { pid, reason }),
            // A QoS 0 publish's caller was answered when it was queued: its loss is counted.
            // (`publish_as` counted it in `outbox_drops`.)
            None => {
                if let PublishFailure::Rejected { message, .. } = &reason {
                    tracing::warn!(
                        reason = %crate::printable::Printable(message),
                        "a QoS 0 publish was dropped"
                    );
                }
            }
        }
    }

    // ---- commands ----------------------------------------------------------------------

    /// Publishes a message prepared for its batch signature
    /// ([`crate::core::prepare_publish_in`]): queued, in publish order with every other
    /// publish, until a [`SealJob`] signs and seals it. Returns the publish id when the
    /// publish waits for a `PubAck`; [`Event::PubAck`] or [`Event::PublishFailed`] follows
    /// exactly once (a seal failure included); a QoS ≥ 1 publish counts in
    /// [`EngineStats::sealing_publishes`] until it is in the outbox, then in
    /// [`EngineStats::unacked_publishes`] and [`Engine::poll_kept`] reports it (to persist).
    pub fn publish_prepared(
        &mut self,
        prepared: Prepared,
        o: PubOptions,
        now: Now,
    ) -> Result<Option<PublishId>, PublishError> {
        let mono = self.clamp(now);
        if self.phase == Phase::Closed || self.closing {
            return Err(PublishError::Closed);
        }
        if o.qos != Qos::AtMostOnce {
            let w = super::batching::prepared_weight(&prepared);
            if self.out.kept_bytes() + self.sealing.bytes() + w > self.cfg.kept_bytes {
                return Err(PublishError::BufferFull(self.cfg.kept_bytes));
            }
        }
        let pid = self.publish_id(&o);
        self.sealing.push(prepared, o, pid, mono);
        self.sync_unacked();
        Ok(pid)
    }

    /// Publishes a sealed envelope. Returns the publish id when the publish waits for a
    /// `PubAck` ([`Event::PubAck`] or [`Event::PublishFailed`] follows, exactly once).
    /// QoS ≥ 1 is kept and re-sent with the same id after every reconnect until
    /// acknowledged; QoS 0 is buffered while disconnected, up to `offline_bytes`.
    pub fn publish(
        &mut self,
        envelope: Envelope,
        o: PubOptions,
        now: Now,
    ) -> Result<Option<PublishId>, PublishError> {
        self.clamp(now);
        if self.phase == Phase::Closed || self.closing {
            return Err(PublishError::Closed);
        }
        let pid = self.publish_id(&o);
        if self.sealing.busy() {
            // Behind publishes still being sealed: it leaves after them.
            let weight = envelope.as_bytes().len();
            self.sealing
                .push_unit(Unit::Sealed(envelope, Meta { o, pid, weight }));
            self.sync_unacked();
            self.release_sealed(now);
            return Ok(pid);
        }
        self.publish_as(envelope, o, pid, now).map(|()| pid)
    }

    /// The publish id a publish with `o` gets (QoS ≥ 1 or `ack`), drawn before its envelope
    /// exists — a batch-signed publish learns its id when it is queued for the batch, and
    /// [`Engine::publish_as`] hands the envelope over once the batch is signed.
    pub fn publish_id(&mut self, o: &PubOptions) -> Option<PublishId> {
        (o.ack || o.qos != Qos::AtMostOnce).then(|| {
            let mut id = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut self.rng, &mut id);
            PublishId(id)
        })
    }

    /// [`Engine::publish`] with the id drawn by [`Engine::publish_id`] for the same `o`.
    pub fn publish_as(
        &mut self,
        envelope: Envelope,
        o: PubOptions,
        pid: Option<PublishId>,
        now: Now,
    ) -> Result<(), PublishError> {
        self.clamp(now);
        if self.phase == Phase::Closed {
            return Err(PublishError::Closed);
        }
        let kept = o.qos != Qos::AtMostOnce;
        let frame = super::pub_frame(envelope, pid.map(|p| p.0), o.retain, o.qos).to_bytes();
        let live = self.is_live();
        // Over the relay's limit the relay would close the connection, and a kept publish
        // would go again after every reconnect: refused here with the relay's own code.
        // (While not live the limit is checked when the next relay says its own.)
        if live && frame.len() > self.relay_max_frame {
            if pid.is_none() {
                // Nobody waits for it (QoS 0): counted here, whoever drops the error.
                self.stats.outbox_drops += 1;
            }
            return Err(PublishError::Rejected {
                code: ErrorCode::FrameTooLarge,
                message: format!(
                    "the {}-byte publish frame is over this relay's max_frame ({} bytes)",
                    frame.len(),
                    self.relay_max_frame
                ),
            });
        }
        match pid {
            Some(p) if kept => {
                if self.out.kept_bytes() + frame.len() > self.cfg.kept_bytes {
                    return Err(PublishError::BufferFull(self.cfg.kept_bytes));
                }
                let order = self.out.keep(p, frame.clone(), live);
                self.kept_new.push_back((p, order, frame));
                self.sync_unacked();
            }
            _ if live => self.out.send0(frame, pid),
            _ => {
                if !self.out.buffer0(frame, pid, self.cfg.offline_bytes) {
                    self.stats.outbox_drops += 1;
                    return Err(PublishError::BufferFull(self.cfg.offline_bytes));
                }
            }
        }
        Ok(())
    }

    /// Subscribes local subscription `id` (the driver picks unique ids). Fails at once when
    /// no key covers the filter; otherwise [`Event::SubscribeOk`] or
    /// [`Event::SubscribeErr`] follows, exactly once — across reconnects too (a subscribe
    /// pending when the connection drops is sent again on the next one).
    pub fn subscribe(
        &mut self,
        id: LocalSubId,
        filter: TopicFilter,
        opts: SubscribeOptions,
        now: Now,
    ) -> Result<(), SubscribeError> {
        self.clamp(now);
        if self.phase == Phase::Closed {
            return Err(SubscribeError::Closed);
        }
        if self.subs.contains_key(&id) {
            self.unsubscribe(id);
        }
        let acking = opts.acking();
        let capacity = opts.capacity.unwrap_or(self.cfg.sub_capacity);
        let durable = opts.durable.clone();
        let frames = self
            .core
            .subscribe_with_options(id, filter, opts, now.unix_ms)?;
        let waiting: BTreeSet<u64> = self.core.relay_ids(id).iter().copied().collect();
        self.subs.insert(
            id,
            SubState {
                acking,
                capacity,
                outstanding: 0,
                numbered: 0,
                waiting: Some(waiting),
                untaken: HashMap::new(),
                durable,
            },
        );
        // Offline, the frames are dropped: `Welcome` re-sends every subscription.
        if self.is_live() {
            for f in frames {
                self.send(f);
            }
        }
        Ok(())
    }

    /// Drops a subscription; what it never took is not acked (the relay delivers it again
    /// to a later subscription).
    pub fn unsubscribe(&mut self, id: LocalSubId) {
        let frames = self.core.unsubscribe(id);
        if self.is_live() {
            for f in frames {
                self.send(f);
            }
        }
        self.drop_sub(id);
    }

    /// Ends durable subscription `id` and asks the relay to delete its durable (name,
    /// position, owner: `Unsub` with `delete`, PROTOCOL §3.3.4), then flushes: the answer
    /// is [`Event::DurableDeleted`] with that flush id (or [`Event::FlushFailed`] if the
    /// connection drops first). Refused at once — the subscription is kept — when not
    /// connected, when the relay did not grant `DURABLE_DELETE` (an older relay would
    /// ignore the request and keep the durable), or when `id` is not durable.
    pub fn delete_durable(&mut self, id: LocalSubId, now: Now) -> Result<FlushId, DeleteError> {
        self.clamp(now);
        if !self.is_live() {
            return Err(DeleteError::Disconnected);
        }
        if self.relay_features & frame::features::DURABLE_DELETE == 0 {
            return Err(DeleteError::Unsupported);
        }
        if !self.core.is_durable(id) {
            return Err(DeleteError::NotDurable);
        }
        let mut rids = Vec::new();
        for f in self.core.unsubscribe(id) {
            if let Frame::Unsub(mut u) = f {
                u.delete = Some(true);
                rids.push(u.sub_id);
                self.send(Frame::Unsub(u));
            }
        }
        let name = self.subs.get(&id).and_then(|s| s.durable.clone());
        self.drop_sub(id);
        let fid = self.flush(now);
        self.deletes.insert(fid, (rids, None, name));
        Ok(fid)
    }

    /// Forgets local subscription `id`: what it never took is not acked, and its held
    /// messages are released (the relay's redelivery of them is accepted again).
    fn drop_sub(&mut self, id: LocalSubId) {
        if let Some(s) = self.subs.remove(&id) {
            for (slot, (d, held)) in s.untaken {
                match (held, &s.durable) {
                    (true, durable) => self.core.dedup_untaken(d, durable.as_deref()),
                    (false, Some(n)) => self.core.dedup_owe(d, n),
                    (false, None) => {}
                }
                if s.durable.is_some() {
                    self.forget_copy(d, id, slot);
                }
            }
        }
        self.acks.drop_sub(id);
        self.queue_acks();
        // What it alone held back from its neighbours is not coming again.
        self.report_withheld();
    }

    /// Tells each subscription of the messages held back from it for another one that will
    /// not come again (`ClientCore::take_withheld_lost`), as messages dropped for it: the
    /// application's `Lagged`.
    fn report_withheld(&mut self) {
        for (sub, n) in self.core.take_withheld_lost() {
            if self.subs.contains_key(&sub) {
                self.emit(Event::Dropped { sub, n });
            }
        }
    }

    /// Forgives the acks owed to subscriptions for copies a relay named them paused in
    /// that will not come (`ClientCore::take_forgiven`): each sequence is acked once
    /// nothing else holds it.
    fn forgive_paused(&mut self) {
        let forgiven = self.core.take_forgiven();
        if forgiven.is_empty() {
            return;
        }
        for (sub, seq) in forgiven {
            self.acks.forgive_one(sub, seq);
        }
        // Released now (a `Gap` releases nothing else): scheduled like any released ack.
        self.queue_acks();
    }

    /// Forgets durable subscription `sub`'s copy of message `d` in `slot`.
    fn forget_copy(&mut self, d: receive::Digest, sub: LocalSubId, slot: SlotId) {
        if let Some(copies) = self.durable_copies.get_mut(&d) {
            copies.retain(|c| *c != (sub, slot));
            if copies.is_empty() {
                self.durable_copies.remove(&d);
            }
        }
    }

    /// The app took a delivered message or placeholder.
    pub fn ack(&mut self, token: AckToken, now: Now) {
        self.clamp(now);
        let mut taken = None;
        if let Some(s) = self.subs.get_mut(&token.sub) {
            s.outstanding = s.outstanding.saturating_sub(1);
            if token.slot.is_some() {
                s.numbered = s.numbered.saturating_sub(1);
            }
            if let Some(slot) = token.slot {
                if let Some((d, _)) = s.untaken.remove(&slot) {
                    self.core.dedup_taken(d, s.durable.as_deref());
                    taken = Some((slot, d));
                }
            }
        }
        // Taken here while durable subscriptions of other names still hold a copy: owed
        // to them (the window holds it as delivered now).
        if let Some((slot, d)) = taken.filter(|_| !self.durable_copies.is_empty()) {
            self.forget_copy(d, token.sub, slot);
            let taker = self.subs.get(&token.sub).and_then(|s| s.durable.as_deref());
            for (h, _) in self.durable_copies.get(&d).into_iter().flatten() {
                if let Some(n) = self.subs.get(h).and_then(|t| t.durable.as_deref()) {
                    if Some(n) != taker {
                        self.core.dedup_co_held(d, n);
                    }
                }
            }
        }
        if let Some(slot) = token.slot {
            self.acks.taken(slot, token.sub);
        }
        self.queue_acks();
    }

    /// Asks the relay to confirm it processed everything sent before (a `Ping` nonce),
    /// pending acks included (they leave first).
    pub fn flush(&mut self, now: Now) -> FlushId {
        self.clamp(now);
        let id = self.next_nonce;
        self.next_nonce += 1;
        if self.sealing.busy() && self.phase != Phase::Closed {
            // After the publishes still being sealed.
            self.sealing.push_unit(Unit::Flush(id));
            self.release_sealed(now);
        } else {
            self.do_flush(id);
        }
        id
    }

    fn do_flush(&mut self, id: FlushId) {
        if self.is_live() {
            // Acks of what the app took are part of "everything sent before".
            self.send_acks(true);
            self.flushes.insert(id);
            self.send(Frame::Ping(Ping { nonce: id }));
        } else {
            self.emit(Event::FlushFailed { id });
        }
    }

    /// Keys changed (a grant was added): every subscription is re-made with the keyring as
    /// it is now (new epochs included), resuming where it was.
    pub fn refresh_keys(&mut self, now: Now) {
        self.clamp(now);
        if !self.is_live() {
            return; // the next `Welcome` subscribes with the keys of then
        }
        let ids: Vec<LocalSubId> = self.subs.keys().copied().collect();
        // Every relay subscription is replaced: the copies the relay held back for them
        // (PROTOCOL §3.5.5 "Hand-over") never come, so what they were owed is no longer (a
        // neighbour's ack of it leaves now, as on unsubscribe).
        for &id in &ids {
            self.acks.forgive_owed(id);
        }
        // Acks that can leave go before the `Unsub`s: the relay settles an ack through the
        // subscriptions holding the sequence, and once they are gone it ignores the ack
        // (a durable neighbour's position would not advance; redelivered on resume). So
        // also before the new `Sub`s: after them, one could free a copy a resumed
        // subscription (a durable's history) is sent again, before it is taken.
        self.send_acks(true);
        for id in ids {
            let old: Vec<u64> = self.core.relay_ids(id).to_vec();
            for sub_id in old {
                self.send(Frame::Unsub(Unsub {
                    sub_id,
                    delete: None,
                }));
            }
        }
        self.resubscribe(now);
    }

    /// Closes for good: pending acks and a `Close` frame are written, then the socket is
    /// closed. Every publish, subscribe and flush still waiting fails (`Closed`), then
    /// [`Event::Closed`].
    pub fn close(&mut self, now: Now) {
        self.clamp(now);
        if self.phase == Phase::Closed || self.closing {
            return;
        }
        if self.sealing.busy() {
            // Publishes still being sealed go first (the driver keeps running the jobs).
            self.closing = true;
            self.sealing.push_unit(Unit::Close);
            self.release_sealed(now);
            return;
        }
        self.do_close(now);
    }

    fn do_close(&mut self, now: Now) {
        // Frames that arrived before the close are handled first, as inline.
        self.open_parked_inline(now);
        match self.phase {
            Phase::Live { conn, .. } | Phase::Handshaking { conn, .. } => {
                self.send_acks(true);
                self.send(Frame::Close(Close {
                    code: ErrorCode::Other(0),
                    message: "client closing".into(),
                }));
                self.out.hangup(conn);
            }
            Phase::Dialing { conn, .. } => self.out.hangup(conn),
            Phase::Backoff { .. } => {}
            Phase::Closed => return,
        }
        self.shut();
    }

    // ---- internals ---------------------------------------------------------------------

    /// Parks a frame of the live socket: a `Msg` becomes an [`OpenJob`]; anything else
    /// waits behind the opens before it.
    fn park(&mut self, f: Frame, now: Now) {
        match f {
            Frame::Msg(m) => {
                let id = self.parked.next;
                let kr = self.core.keyring().clone();
                let roots = self.core.roots().clone();
                let max = self.core.max_payload();
                let job = OpenJob::new(id, &m, now.unix_ms, max, kr, roots);
                self.parked.jobs.push_back(job);
                self.parked.push(Parked::Msg(Box::new(m), None));
            }
            f => {
                self.parked.push(Parked::Frame(f));
                self.release_parked(now);
            }
        }
    }

    /// Handles the parked frames up to the first envelope still being opened.
    fn release_parked(&mut self, now: Now) {
        loop {
            match self.parked.frames.front() {
                None | Some(Parked::Msg(_, None)) => return,
                Some(_) => {}
            }
            let Some(p) = self.parked.frames.pop_front() else {
                return;
            };
            let live = self.is_live();
            match p {
                Parked::Msg(m, Some(opened)) if live => self.on_msg_opened(&m, *opened, now),
                Parked::Frame(f) if live => self.live_frame(f, self.last_mono, now),
                _ => {}
            }
            if !self.is_live() {
                // The frame ended the connection: what came after it is never handled
                // (as inline, where frames of a socket gone are ignored).
                self.clear_parked();
                return;
            }
        }
    }

    /// Opens every parked envelope here, then handles the parked frames: before a
    /// disconnect or a close, what arrived is handled as it would have been inline.
    fn open_parked_inline(&mut self, now: Now) {
        if self.parked.frames.is_empty() {
            return;
        }
        self.parked.jobs.clear();
        for p in self.parked.frames.iter_mut() {
            if let Parked::Msg(m, slot @ None) = p {
                *slot = Some(Box::new(self.core.open(m, now.unix_ms)));
            }
        }
        self.release_parked(now);
    }

    /// Forgets every parked frame and job (their socket is gone); late results are ignored.
    fn clear_parked(&mut self) {
        self.parked.frames.clear();
        self.parked.jobs.clear();
    }

    fn handshake_frame(&mut self, f: Frame, mono: u64, now: Now) {
        match f {
            Frame::Welcome(w) => {
                if w.version != frame::PROTOCOL_VERSION {
                    let why = format!("relay chose protocol version {}", w.version);
                    self.lose(Disconnect::Handshake(why), true, mono);
                    return;
                }
                // The relay's interval, within bounds: 1 ms had the client send a thousand
                // Pings a second, u64::MAX turned its dead-relay detection off.
                let heartbeat_ms = if w.heartbeat_ms == 0 {
                    self.cfg.default_heartbeat_ms
                } else {
                    w.heartbeat_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS)
                };
                let Some(conn) = self.conn() else { return };
                // Resume positions are relay sequence numbers: they hold only in the space
                // they came from. A relay naming no space is its own (same address only).
                let space = match w.seq_space {
                    Some(id) => SeqSpace::Named(id),
                    None => SeqSpace::Unnamed(self.relay),
                };
                self.core.enter_seq_space(space);
                self.relay_features = w.features;
                self.core.relay_features(w.features);
                self.phase = Phase::Live {
                    conn,
                    heartbeat_ms,
                    ping_at: mono.saturating_add(heartbeat_ms),
                    unanswered: 0,
                };
                if self.ever_live {
                    self.stats.reconnects += 1;
                }
                self.ever_live = true;
                self.stable_at = Some(mono.saturating_add(self.cfg.backoff.max_ms));
                // Subscriptions first, then the kept publishes in order, then the offline
                // buffer.
                self.resubscribe(now);
                self.relay_max_frame = usize::try_from(w.max_frame).unwrap_or(usize::MAX);
                let (over, over0) = self.out.go_live(self.relay_max_frame);
                let reason = |max| PublishFailure::Rejected {
                    code: ErrorCode::FrameTooLarge,
                    message: format!("the publish is over this relay's max_frame ({max} bytes)"),
                };
                for pid in over {
                    self.retries.remove(&pid);
                    let reason = reason(self.relay_max_frame);
                    self.emit(Event::PublishFailed { pid, reason });
                }
                let mut unheard = 0u64;
                for pid in over0 {
                    self.stats.outbox_drops += 1;
                    match pid {
                        Some(pid) => {
                            let reason = reason(self.relay_max_frame);
                            self.emit(Event::PublishFailed { pid, reason });
                        }
                        None => unheard += 1,
                    }
                }
                if unheard > 0 {
                    // Their `publish` returned when they were buffered: said (once a
                    // connection), or their loss would go unnoticed.
                    tracing::warn!(
                        dropped = unheard,
                        "QoS 0 publishes buffered while disconnected were dropped: over this \
                         relay's max_frame ({} bytes)",
                        self.relay_max_frame
                    );
                }
                self.sync_unacked();
                self.emit(Event::Connected {
                    session: w.session,
                    heartbeat_ms,
                    relay: self.relay,
                });
            }
            // One answer per connection: a relay asking again would have the account key
            // sign whatever nonces it likes (another relay's challenges, relayed — an
            // Ed25519 signature each, until the connect timeout).
            Frame::Challenge(_)
                if matches!(self.phase, Phase::Handshaking { answered: true, .. }) =>
            {
                let why = "the relay sent a second Challenge";
                self.lose(Disconnect::Handshake(why.into()), true, mono);
            }
            Frame::Challenge(c) => {
                // The name of the address this connection dialed (PROTOCOL §3.5.6): what a
                // bound sign-in signs, so a relay passing another's challenge on gets a
                // signature for its own name only.
                let conn = self.conn().unwrap_or(0);
                let name = self
                    .cfg
                    .relay_names
                    .get(self.dial_relay(conn))
                    .cloned()
                    .flatten()
                    .filter(|n| whispeer_protocol::relay_name::is_canonical(n));
                let bound = c.bound == Some(true);
                let refuse = match (bound, &name) {
                    (false, _) if self.cfg.require_bound_auth => Some(AuthNotBound::NotOffered {
                        relay: name.clone(),
                    }),
                    (true, None) => Some(AuthNotBound::NoName),
                    _ => None,
                };
                let relay = name.as_deref().filter(|_| bound);
                let key = self.cfg.auth.as_ref().filter(|a| a.public_key().is_some());
                match (key, refuse) {
                    (None, _) => {
                        let why = "the relay sent a Challenge but no account key is configured";
                        self.lose(Disconnect::Handshake(why.into()), true, mono);
                    }
                    (Some(_), Some(why)) => self.lose(Disconnect::AuthNotBound(why), true, mono),
                    (Some(key), None) => {
                        // A key always answers; a canonical name is 1 to 255 bytes.
                        if let Some(auth) = key.answer(&c.nonce, relay) {
                            if let Phase::Handshaking { answered, .. } = &mut self.phase {
                                *answered = true;
                            }
                            self.send(Frame::Auth(auth));
                        }
                    }
                }
            }
            Frame::Err(e) => {
                let (code, message) = (e.code, e.message);
                self.lose(Disconnect::Rejected { code, message }, true, mono);
            }
            Frame::Close(c) => {
                let (code, message) = (c.code, c.message);
                self.lose(Disconnect::Rejected { code, message }, true, mono);
            }
            _ => {}
        }
    }

    fn live_frame(&mut self, f: Frame, mono: u64, now: Now) {
        match f {
            Frame::Msg(m) => self.on_msg(&m, now),
            Frame::SubOk(ok) => {
                tracing::debug!(sub_id = ok.sub_id, seq = ok.seq, history = ?ok.history, "SubOk");
                self.core
                    .sub_confirmed(ok.sub_id, ok.seq, ok.history == Some(true));
                self.sub_ok(ok.sub_id)
            }
            Frame::PubAck(a) => {
                let pid = PublishId(a.publish_id);
                self.retries.remove(&pid);
                if self.out.settle(&pid) {
                    self.sync_unacked();
                    self.emit(Event::PubAck { pid, seq: a.seq });
                }
            }
            Frame::Pong(p) if self.flushes.remove(&p.nonce) => {
                match self.deletes.remove(&p.nonce) {
                    Some((_, error, name)) => {
                        // Deleted: it is owed nothing any more (refused, or never answered,
                        // it still exists and its next resume gets what it is owed).
                        if let (None, Some(n)) = (&error, name) {
                            self.core.forget_owed(&n);
                        }
                        self.emit(Event::DurableDeleted { id: p.nonce, error })
                    }
                    None => self.emit(Event::Flushed { id: p.nonce }),
                }
            }
            Frame::Ping(p) => self.send(Frame::Pong(Pong { nonce: p.nonce })),
            Frame::ReplayDone(d) => {
                tracing::debug!(sub_id = d.sub_id, seq = d.seq, "ReplayDone");
                if let Some(sub) = self.core.local_for(d.sub_id) {
                    // Only a replay's end is the application's (retained values end too).
                    if self.core.replay_done(d.sub_id, d.seq) {
                        self.emit(Event::ReplayDone { sub, seq: d.seq });
                    }
                    // What its history was still to bring is not coming: no longer owed.
                    self.forgive_paused();
                }
            }
            Frame::Gap(g) => {
                self.core.on_gap(g.dropped);
                // Naming a subscription: its own loss (skipped while the relay had it paused
                // and not kept by the store), acknowledging or not. Otherwise a count for
                // the connection, which only subscriptions that do not acknowledge — or
                // that were routed unnumbered messages, which the relay drops alike — can
                // have lost to: theirs to hear.
                let subs = match g.sub_id {
                    Some(rid) => {
                        self.core.lost_while_paused(rid);
                        self.report_withheld();
                        self.forgive_paused();
                        self.core.local_for(rid).into_iter().collect()
                    }
                    None => self
                        .subs
                        .keys()
                        .copied()
                        .filter(|id| self.core.hears_connection_gaps(*id))
                        .collect(),
                };
                self.emit(Event::Gap {
                    dropped: g.dropped,
                    subs,
                });
            }
            Frame::Err(e) => self.on_err(e, mono),
            Frame::Close(c) => {
                let (code, message) = (c.code, c.message);
                self.lose(Disconnect::RelayClosed { code, message }, true, mono);
            }
            _ => {} // not for a client (or a late handshake frame): ignored
        }
    }

    fn on_err(&mut self, e: ErrFrame, mono: u64) {
        let mut named = false;
        if let Some(p) = e.publish_id {
            let pid = PublishId(p);
            if e.code.is_retryable() && self.retry_later(pid, mono) {
                named = true;
            } else if self.out.settle(&pid) {
                self.retries.remove(&pid);
                named = true;
                self.sync_unacked();
                let reason = PublishFailure::Rejected {
                    code: e.code,
                    message: e.message.clone(),
                };
                self.emit(Event::PublishFailed { pid, reason });
            }
        }
        let mut sub = None;
        if let Some(rid) = e.sub_id {
            // The answer to a durable deletion: kept for its flush.
            if let Some((_, err, _)) = self.deletes.values_mut().find(|(r, ..)| r.contains(&rid)) {
                if err.is_none() {
                    *err = Some((e.code, e.message.clone()));
                }
                named = true;
            }
        }
        if let Some(rid) = e.sub_id {
            if let Some(local) = self.core.local_for(rid) {
                let confirmed = self.subs.get(&local).is_some_and(|s| s.waiting.is_none());
                let durable = self.core.is_durable(local);
                // A confirmed durable subscription refused on a resume (a reconnect, a
                // failover) with a code retrying cannot change (its owner differs at this
                // relay, the relay keeps no store, a quota): it ends, with that error.
                let ends = confirmed && durable && !e.fatal && !e.code.is_retryable();
                if !confirmed || ends {
                    // Refused before it was confirmed (the subscribe fails), or a confirmed
                    // durable ends: forgotten either way.
                    named = true;
                    for f in self.core.unsubscribe(local) {
                        if !matches!(&f, Frame::Unsub(u) if u.sub_id == rid) {
                            self.send(f);
                        }
                    }
                    self.drop_sub(local);
                    let error = SubscribeFailure::Rejected {
                        code: e.code,
                        message: e.message.clone(),
                    };
                    self.emit(Event::SubscribeErr { sub: local, error });
                } else {
                    sub = Some(local);
                    // A confirmed durable subscription refused on a resume with a
                    // retryable code: its name is held elsewhere for now (`busy`) — by the
                    // old connection until the relay sees it gone, or at another relay of
                    // a cluster until that hold is released or lapses — or the store is
                    // unreachable for now. Asked again with the reconnect backoff; the
                    // error is reported once per streak.
                    if !e.fatal && durable && e.code.is_retryable() {
                        let attempts = self.sub_retries.get(&rid).map_or(0, |r| r.0);
                        let delay = self.cfg.backoff.delay_ms(attempts, &mut self.rng);
                        self.sub_retries
                            .insert(rid, (attempts + 1, Some(mono.saturating_add(delay))));
                        named = attempts > 0;
                    }
                }
            }
        }
        if e.fatal {
            let (code, message) = (e.code, e.message);
            self.lose(Disconnect::Fatal { code, message }, true, mono);
        } else if e.sub_id.is_none() && e.publish_id.is_none() {
            // Every other request names itself (PROTOCOL §3.5.2): the answer to a QoS 0
            // `Pub` without a publish id (nobody waits for it).
            self.stats.publish_refusals += 1;
            self.emit(Event::PublishRefused {
                code: e.code,
                message: e.message,
            });
        } else if !named {
            self.emit(Event::RelayError {
                code: e.code,
                message: e.message,
                sub,
            });
        }
    }

    /// A kept (QoS ≥ 1) publish refused with a retryable code (`busy`, `storage_full`...):
    /// re-sent with the same publish id after the reconnect backoff's delay for its attempt,
    /// up to `publish_retries` times. False when it is not kept (QoS 0 has nothing to
    /// re-send) or out of retries: it fails with the relay's code.
    fn retry_later(&mut self, pid: PublishId, mono: u64) -> bool {
        if !self.out.is_kept(&pid) {
            return false;
        }
        let (attempts, due) = self.retries.entry(pid).or_insert((0, None));
        if *attempts >= self.cfg.publish_retries {
            return false;
        }
        let delay = self.cfg.backoff.delay_ms(*attempts, &mut self.rng);
        *attempts += 1;
        *due = Some(mono.saturating_add(delay));
        self.stats.publish_retries += 1;
        true
    }

    /// Sends again the refused durable resumes whose retry is due.
    fn resubscribe_due(&mut self, mono: u64) {
        let due: Vec<u64> = self
            .sub_retries
            .iter()
            .filter(|(_, (_, d))| d.is_some_and(|d| mono >= d))
            .map(|(rid, _)| *rid)
            .collect();
        for rid in due {
            match self.core.resubscribe_durable(rid) {
                Some(f) => {
                    if let Some(r) = self.sub_retries.get_mut(&rid) {
                        r.1 = None;
                    }
                    self.send(f);
                }
                None => {
                    self.sub_retries.remove(&rid);
                }
            }
        }
    }

    /// Re-sends the refused publishes whose retry is due.
    fn resend_due(&mut self, mono: u64) {
        for (pid, (_, due)) in self.retries.iter_mut() {
            if due.is_some_and(|d| mono >= d) {
                *due = None;
                self.out.resend(pid);
            }
        }
    }

    fn sub_ok(&mut self, relay_id: u64) {
        self.sub_retries.remove(&relay_id);
        let Some(local) = self.core.local_for(relay_id) else {
            return;
        };
        let Some(s) = self.subs.get_mut(&local) else {
            return;
        };
        if let Some(w) = &mut s.waiting {
            w.remove(&relay_id);
            if w.is_empty() {
                s.waiting = None;
                self.emit(Event::SubscribeOk { sub: local });
            }
        }
    }

    /// Sends `Sub` for every subscription (after `Welcome` or a key change); subscriptions
    /// not yet confirmed wait for the new relay ids.
    fn resubscribe(&mut self, now: Now) {
        for f in self.core.resubscribe_all(now.unix_ms) {
            if let Frame::Sub(s) = &f {
                // Where each subscription resumes decides what it gets again: the first
                // thing to know when one misses messages across a reconnect.
                tracing::debug!(sub_id = s.sub_id, local = ?self.core.local_for(s.sub_id),
                    replay = ?s.replay, "resubscribing");
            }
            self.send(f);
        }
        for (id, s) in self.subs.iter_mut() {
            if s.waiting.is_some() {
                s.waiting = Some(self.core.relay_ids(*id).iter().copied().collect());
            }
        }
    }

    /// One delivered `Msg`: the core opens it and runs the receiver checks; every outcome
    /// for an at-least-once subscription takes a slot of the ack queue, so acks leave in
    /// relay order whatever became of the envelope.
    /// The most messages waiting in the ack queue (held back, or delivered and not taken)
    /// before the relay is known to ignore the credit: twice the credit of every
    /// at-least-once subscription, plus [`ACK_SLOT_SLACK`] for at-most-once neighbours'
    /// placeholders and redeliveries in flight.
    fn ack_slot_bound(&self) -> usize {
        let credit: u64 = self
            .subs
            .values()
            .filter(|s| s.acking)
            .map(|s| s.capacity)
            .fold(0, u64::saturating_add);
        usize::try_from(credit.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .saturating_add(ACK_SLOT_SLACK)
    }

    fn on_msg(&mut self, m: &Msg, now: Now) {
        let opened = self.core.open(m, now.unix_ms);
        self.on_msg_opened(m, opened, now);
    }

    /// [`Engine::on_msg`] for an envelope opened already (inline or by an [`OpenJob`]).
    fn on_msg_opened(&mut self, m: &Msg, opened: Result<Unsealed, OpenError>, now: Now) {
        let routed = if m.seq > 0 {
            self.core.route_acking(m)
        } else {
            Vec::new()
        };
        // A live message held back for subscriptions still in their history: owed to each
        // of them, so a neighbour's slot of it does not ack it before they took their own
        // copy (PROTOCOL §3.5.5). Owed first: a neighbour's slot may be released at once.
        if m.seq > 0 {
            for sub in self.core.held_back_acking(m) {
                self.acks.owe(m.seq, sub);
            }
        }
        let (subs, acks) = (&self.subs, &self.acks);
        // Room, or it holds this sequence already (one copy, untaken): then this copy is a
        // duplicate whose placeholder waits behind it, and the sequence is acked once both
        // are taken. Held back, the copy left it unacknowledged — the relay's credit spent
        // until its ack timeout, as when its catch-up sends a message the subscription took
        // from a neighbour's live copy while its ack was on the way.
        let room = |id: LocalSubId| {
            subs.get(&id)
                .is_some_and(|s| s.outstanding < s.capacity || acks.holds(id, m.seq) == 1)
        };
        let delivery = self.core.receive_opened(m, opened, now.unix_ms, &room);
        // Neighbours of a catch-up copy whose own copy follows: owed before this copy's
        // slot can be released.
        for (sub, seq) in self.core.take_owing() {
            self.acks.owe(seq, sub);
        }
        // A copy that reached every subscription a message was held back for ends what it
        // was held back from the others (`withheld`): told now, before what follows.
        self.report_withheld();
        self.forgive_paused();
        let (msg, targets, held, digest) = match delivery {
            Delivery::Deliver {
                msg,
                targets,
                lagged,
                held,
                digest,
            } => {
                for sub in lagged {
                    // An unnumbered message for an at-least-once subscription holding its
                    // whole credit of numbered ones: the relay has it paused, skipped it
                    // and counts it in the Gap naming it (sent when it resumes) — told
                    // there, not twice.
                    let paused = m.seq == 0
                        && self
                            .subs
                            .get(&sub)
                            .is_some_and(|s| s.acking && s.numbered >= s.capacity);
                    if !paused {
                        self.stats.slow_subscriber_drops += 1;
                        self.emit(Event::Dropped { sub, n: 1 });
                    }
                }
                (Some(msg), targets, held, digest)
            }
            Delivery::HeldBack => {
                // No credit on an at-least-once subscription: never acked, redelivered.
                if !routed.is_empty() {
                    if m.sub_id.is_some() {
                        // A copy naming its subscription (its catch-up, history, hand-over
                        // or retained value) goes to it alone; others take their own copies
                        // of the sequence, whose acks would free this one at the relay
                        // before it came again: owed to it until it does (it comes again as
                        // a redelivery: the relay tracks it). Found for history copies by
                        // `tests/mixed_load.rs` with cuts: the held-back slot, released at
                        // once, no longer kept the neighbour's later copy from acking it.
                        for sub in &routed {
                            self.acks.owe(m.seq, *sub);
                        }
                    } else {
                        self.acks.held_back(m.seq, &routed);
                    }
                    // Debts are bounded too: a hand-over's by what its subscription
                    // remembers held back (`MAX_HELD` each), these by the credit.
                    let owed_bound = self
                        .ack_slot_bound()
                        .saturating_add(crate::core::MAX_HELD.saturating_mul(self.subs.len()));
                    if self.acks.pending() > self.ack_slot_bound()
                        || self.acks.owed_len() > owed_bound
                    {
                        // Only a relay ignoring the credit gets here (an honest one has at
                        // most each subscription's credit unacknowledged): every message it
                        // sends past it waits in the ack queue behind the untaken one.
                        // Hung up, the queue goes; the relay redelivers what is unacked.
                        let why = format!(
                            "the relay sent past the subscriptions' credit ({} messages \
                             waiting for an ack)",
                            self.acks.pending()
                        );
                        self.lose(Disconnect::BadFrame(why), true, self.last_mono);
                        return;
                    }
                    self.queue_acks();
                }
                return;
            }
            _ => (None, Vec::new(), None, None),
        };
        // Every at-least-once subscription routed here (or handed it) must take its slot.
        let mut slot_subs: Vec<LocalSubId> = Vec::new();
        if m.seq > 0 {
            slot_subs.extend(routed.iter().copied());
            for t in &targets {
                if self.subs.get(t).is_some_and(|s| s.acking) && !slot_subs.contains(t) {
                    slot_subs.push(*t);
                }
            }
        }
        let slot =
            (!slot_subs.is_empty()).then(|| self.acks.deliver(m.seq, &routed, slot_subs.clone()));
        let mut holders = 0;
        // Durable copies of a message that counts as delivered at once: owed until taken.
        let mut owed_now = Vec::new();
        for &sub in &targets {
            let slot = if slot_subs.contains(&sub) { slot } else { None };
            if let (Some(s), Some(slot)) = (self.subs.get_mut(&sub), slot) {
                // A held copy; or a durable's copy of a message delivered at once.
                let copy = match (held, digest, &s.durable) {
                    (Some(d), ..) => {
                        holders += 1;
                        Some((d, true))
                    }
                    (None, Some(d), Some(n)) => {
                        owed_now.push(n.clone());
                        Some((d, false))
                    }
                    _ => None,
                };
                if let Some((d, is_held)) = copy {
                    s.untaken.insert(slot, (d, is_held));
                    if s.durable.is_some() {
                        self.durable_copies.entry(d).or_default().push((sub, slot));
                    }
                }
            }
            if let Some(s) = self.subs.get_mut(&sub) {
                s.outstanding += 1;
                s.numbered += u64::from(slot.is_some());
            }
            let msg = msg.clone().expect("targets come with a message");
            let token = AckToken { sub, slot };
            self.emit(Event::Message { sub, msg, token });
        }
        for sub in slot_subs.into_iter().filter(|s| !targets.contains(s)) {
            if let Some(s) = self.subs.get_mut(&sub) {
                s.outstanding += 1;
                s.numbered += 1;
            }
            let token = AckToken { sub, slot };
            self.emit(Event::Placeholder { sub, token });
        }
        if let Some(d) = held {
            self.core.dedup_hold(d, holders);
        }
        if let Some(d) = digest {
            for n in owed_now {
                self.core.dedup_co_held(d, &n);
            }
        }
        self.queue_acks();
    }

    /// Acks released since the last call: 4,096 go at once; fewer wait for `ack_delay`
    /// (0: for the next `poll_transmit`, so what one drain released leaves as one `Ack`).
    fn queue_acks(&mut self) {
        if !self.is_live() || !self.acks.has_ready() {
            return;
        }
        if self.acks.ready_len() >= MAX_ACKS_PER_FRAME {
            self.send_acks(false);
        }
        if self.cfg.ack_delay_ms > 0 && self.acks.has_ready() && self.ack_at.is_none() {
            self.ack_at = Some(self.last_mono.saturating_add(self.cfg.ack_delay_ms));
        }
    }

    /// Sends full `Ack` frames of 4,096, and the rest too when `all`.
    fn send_acks(&mut self, all: bool) {
        let ready = self.acks.take_ready();
        let mut chunks = ready.chunks(MAX_ACKS_PER_FRAME).peekable();
        let mut rest = Vec::new();
        while let Some(c) = chunks.next() {
            if !all && c.len() < MAX_ACKS_PER_FRAME && chunks.peek().is_none() {
                rest = c.to_vec();
                break;
            }
            self.send(Frame::Ack(Ack { seqs: c.to_vec() }));
        }
        self.acks.put_back(rest);
        if !self.acks.has_ready() {
            self.ack_at = None;
        }
    }

    /// The current socket is gone (or must go: `hangup`). Per-socket state resets; the
    /// engine backs off, or gives up.
    fn lose(&mut self, reason: Disconnect, hangup: bool, mono: u64) {
        let Some(conn) = self.conn() else { return };
        self.clear_parked();
        self.core.connection_lost();
        self.report_withheld();
        for pid in self.out.lost() {
            let reason = PublishFailure::NotAcknowledged;
            self.emit(Event::PublishFailed { pid, reason });
        }
        if hangup {
            self.out.hangup(conn);
        }
        // The relay redelivers what was not acked; every kept publish, refused ones included,
        // is sent again on the next connection.
        self.acks.clear();
        self.ack_at = None;
        self.retries.clear();
        self.sub_retries.clear();
        for id in std::mem::take(&mut self.flushes) {
            self.emit(Event::FlushFailed { id });
        }
        self.deletes.clear();
        if self.stable_at.take().is_some_and(|at| mono >= at) {
            self.attempt = 0;
        }
        self.attempt = self.attempt.saturating_add(1);
        // Round robin over the relays: every failure moves on to the next address at once;
        // only a full round of failures (every address tried once, the lost connection
        // counting as its relay's try) backs off, and the give-up rules count rounds.
        // One relay: every failure is a full round, as before.
        let n = self.cfg.relays.max(1);
        self.relay = (self.relay + 1) % n;
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if self.attempt % n != 0 {
            self.dial(mono);
            self.emit(Event::Disconnected {
                reason,
                attempt: self.attempt,
                retry_at: Some(mono),
            });
            return;
        }
        let rounds = self.attempt / n;
        let give_up = (!self.ever_live && !self.cfg.retry_first_connect)
            || self.cfg.backoff.max_attempts.is_some_and(|m| rounds > m);
        if give_up {
            self.emit(Event::Disconnected {
                reason,
                attempt: self.attempt,
                retry_at: None,
            });
            self.shut();
            return;
        }
        let delay = self.cfg.backoff.delay_ms(rounds - 1, &mut self.rng);
        let retry_at = mono.saturating_add(delay);
        self.phase = Phase::Backoff { retry_at };
        self.emit(Event::Disconnected {
            reason,
            attempt: self.attempt,
            retry_at: Some(retry_at),
        });
    }

    /// Closed for good: everything still waiting fails.
    fn shut(&mut self) {
        self.phase = Phase::Closed;
        self.closing = false;
        self.clear_parked();
        self.acks.clear();
        self.ack_at = None;
        self.retries.clear();
        self.sub_retries.clear();
        let (pids, unsent) = self.out.close();
        self.stats.outbox_drops += unsent;
        for pid in pids {
            let reason = PublishFailure::Closed;
            self.emit(Event::PublishFailed { pid, reason });
        }
        // Publishes (and flushes) still waiting for their seal jobs: never sent.
        let (pids, flushes, unsent_sealing) = self.sealing.clear();
        self.stats.outbox_drops += unsent_sealing;
        if unsent + unsent_sealing > 0 {
            // Their `publish` returned `Ok` (QoS 0, nobody waits): said, or their loss
            // would go unnoticed (`flush` before closing sends them).
            tracing::warn!(
                dropped = unsent + unsent_sealing,
                "QoS 0 publishes not sent before the client closed were dropped"
            );
        }
        for pid in pids {
            let reason = PublishFailure::Closed;
            self.emit(Event::PublishFailed { pid, reason });
        }
        for id in flushes {
            self.emit(Event::FlushFailed { id });
        }
        self.sync_unacked();
        let pending: Vec<LocalSubId> = self
            .subs
            .iter()
            .filter(|(_, s)| s.waiting.is_some())
            .map(|(id, _)| *id)
            .collect();
        for sub in pending {
            self.drop_sub(sub);
            let error = SubscribeFailure::Closed;
            self.emit(Event::SubscribeErr { sub, error });
        }
        for id in std::mem::take(&mut self.flushes) {
            self.emit(Event::FlushFailed { id });
        }
        self.deletes.clear();
        self.emit(Event::Closed);
    }
}
