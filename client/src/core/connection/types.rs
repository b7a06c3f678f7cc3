//! The engine's vocabulary: time, ids, what the driver must do, what the app learns, and
//! how the engine is configured.

use std::sync::Arc;

use bytes::Bytes;
use whispeer_protocol::{ErrorCode, Qos};

use super::auth::AccountAuth;
use super::rng::Backoff;
use crate::core::acks::SlotId;
use crate::core::receive::ReceiveConfig;
use crate::core::{CoreStats, LocalSubId, Received};
use crate::error::{PublishError, SubscribeError};

/// The time, from the driver. `mono_ms` (never going back; the engine clamps it) drives
/// every deadline; `unix_ms` dates key epochs, replay positions and the receiver checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (any origin).
    pub mono_ms: u64,
    /// Unix time in milliseconds.
    pub unix_ms: u64,
}

impl Now {
    /// A time.
    pub fn new(mono_ms: u64, unix_ms: u64) -> Self {
        Now { mono_ms, unix_ms }
    }
}

/// Identifies one socket the engine asked for ([`Transmit::Dial`]); inputs naming an older
/// socket are ignored.
pub type ConnId = u64;

/// A flush: answered by [`Event::Flushed`] or [`Event::FlushFailed`].
pub type FlushId = u64;

/// The 128-bit id of a publish that waits for the relay's `PubAck` (random, from the seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublishId(pub [u8; 16]);

/// What the driver must do, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Write this frame (without transport framing) to the current socket.
    Frame(Bytes),
    /// Open a socket to the relay and report it with `handle_connected(id)` or
    /// `handle_disconnected(id)`.
    Dial(ConnId),
    /// Close this socket (after writing every frame queued before).
    Hangup(ConnId),
}

/// Names a delivered slot when the app takes it ([`Engine::ack`](super::Engine::ack)). Handed out with every
/// [`Event::Message`] and [`Event::Placeholder`], at most once and at least once alike: it
/// also returns the subscription's credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pub(super) sub: LocalSubId,
    pub(super) slot: Option<SlotId>,
}

impl AckToken {
    /// The subscription it was delivered to.
    pub fn sub(&self) -> LocalSubId {
        self.sub
    }
    /// Whether taking it acks a relay sequence (at-least-once or durable subscription).
    pub fn acks(&self) -> bool {
        self.slot.is_some()
    }
}

/// Options of one publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PubOptions {
    /// Keep as the topic's retained value.
    pub retain: bool,
    /// Delivery guarantee asked of the relay; QoS ≥ 1 is kept and re-sent (same id) until
    /// the relay's `PubAck`.
    pub qos: Qos,
    /// Wants a `PubAck` (implied by QoS ≥ 1).
    pub ack: bool,
}

impl PubOptions {
    /// Fire and forget.
    pub fn new() -> Self {
        Self::default()
    }
    /// With this QoS.
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }
    /// As the retained value.
    pub fn retain(mut self, yes: bool) -> Self {
        self.retain = yes;
        self
    }
    /// Waiting for the relay's `PubAck`.
    pub fn ack(mut self, yes: bool) -> Self {
        self.ack = yes;
        self
    }
}

/// Why a connection ended (or a dial failed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disconnect {
    /// The driver reported it (socket error, EOF, dial failure).
    Transport(String),
    /// No connection or handshake within the connect timeout.
    Timeout,
    /// The relay refused the handshake (`Err` or `Close` before `Welcome`).
    Rejected {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
    /// The handshake went wrong (unexpected frame, version, no account key for a challenge).
    Handshake(String),
    /// The client would not sign the relay's `Challenge`: its sign-in could not be bound
    /// to the relay's name (PROTOCOL §3.5.6).
    AuthNotBound(AuthNotBound),
    /// A fatal `Err` from the relay.
    Fatal {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
    /// The relay closed the connection (`Close`), e.g. shutting down.
    RelayClosed {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
    /// The relay did not answer pings.
    HeartbeatTimeout,
    /// The relay sent bytes that are not a frame.
    BadFrame(String),
}

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disconnect::Transport(why) => write!(f, "{why}"),
            Disconnect::Timeout => f.write_str("relay did not answer within the connect timeout"),
            Disconnect::Rejected { code, message } => {
                write!(
                    f,
                    "relay refused the connection: {message} ({})",
                    code.name()
                )
            }
            Disconnect::Handshake(why) => write!(f, "handshake failed: {why}"),
            Disconnect::AuthNotBound(why) => write!(f, "handshake failed: {why}"),
            Disconnect::Fatal { code, message } => {
                write!(f, "relay error: {message} ({})", code.name())
            }
            Disconnect::RelayClosed { code, message } => {
                write!(
                    f,
                    "relay closed the connection: {message} ({})",
                    code.name()
                )
            }
            Disconnect::HeartbeatTimeout => f.write_str("relay stopped answering pings"),
            Disconnect::BadFrame(why) => write!(f, "relay sent an invalid frame: {why}"),
        }
    }
}

// Defined with the error it travels in (`error` must not import `core`: import_graph).
pub use crate::error::AuthNotBound;

/// Why a publish that waited for a `PubAck` has none.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishFailure {
    /// The relay refused it (`Err` naming its publish id).
    Rejected {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
    /// QoS 0: the connection dropped after it was written and before its `PubAck`.
    NotAcknowledged,
    /// The engine closed first. A QoS ≥ 1 publish may still be re-sent by a later run that
    /// restores it (keep it persisted).
    Closed,
    /// Its seal job could not seal it (batch signing): it was never sent.
    Seal(whispeer_protocol::SealError),
    /// Sealed, but the outbox (QoS ≥ 1 `kept_bytes`, or the offline buffer) was full: it
    /// was never sent.
    BufferFull(usize),
}

impl From<PublishFailure> for PublishError {
    fn from(f: PublishFailure) -> Self {
        match f {
            PublishFailure::Rejected { code, message } => PublishError::Rejected { code, message },
            PublishFailure::NotAcknowledged => PublishError::NotAcknowledged,
            PublishFailure::Closed => PublishError::Closed,
            PublishFailure::Seal(e) => PublishError::Seal(e),
            PublishFailure::BufferFull(n) => PublishError::BufferFull(n),
        }
    }
}

/// Why a subscription the app asked for will not be confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscribeFailure {
    /// The relay refused it (`Err` naming one of its relay subscriptions before `SubOk`).
    Rejected {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
    },
    /// The engine closed first.
    Closed,
}

impl From<SubscribeFailure> for SubscribeError {
    fn from(f: SubscribeFailure) -> Self {
        match f {
            SubscribeFailure::Rejected { code, message } => {
                SubscribeError::Rejected { code, message }
            }
            SubscribeFailure::Closed => SubscribeError::Closed,
        }
    }
}

/// What the app learns, in order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Handshake done; subscriptions and kept publishes are being re-sent.
    Connected {
        /// The relay's session id.
        session: [u8; 16],
        /// The heartbeat interval in use.
        heartbeat_ms: u64,
        /// Which relay address (index into the driver's list, from 0) this connection uses.
        relay: usize,
    },
    /// The connection (or a dial) failed. `retry_at` (monotonic ms) is when the engine dials
    /// again; `None`: it gave up and [`Event::Closed`] follows.
    Disconnected {
        /// Why.
        reason: Disconnect,
        /// Failed attempts in a row, over every relay: 1 after a connection that stayed
        /// live for the backoff's `max_ms` dropped; a connection lost sooner (a relay that
        /// greets and then drops it) counts one more, so the backoff keeps growing.
        attempt: u32,
        /// When the next dial is due (now, when it moves on to the next relay of a round).
        retry_at: Option<u64>,
    },
    /// Closed for good ([`Engine::close`](super::Engine::close), or the backoff gave up). Nothing follows.
    Closed,
    /// A message for subscription `sub`; hand it to the app and call [`Engine::ack`](super::Engine::ack) with
    /// `token` once it is taken.
    Message {
        /// The subscription.
        sub: LocalSubId,
        /// The opened message (shared by every subscription it went to).
        msg: Arc<Received>,
        /// To pass to [`Engine::ack`](super::Engine::ack).
        token: AckToken,
    },
    /// A delivered sequence of at-least-once subscription `sub` that holds nothing for the
    /// app (did not open, refused, duplicate). Pass it through the subscription's channel
    /// silently and [`Engine::ack`](super::Engine::ack) it when the app gets there (or at once): acks leave in
    /// relay order whatever the outcome, so their timing never shows what opened.
    Placeholder {
        /// The subscription.
        sub: LocalSubId,
        /// To pass to [`Engine::ack`](super::Engine::ack).
        token: AckToken,
    },
    /// The relay dropped `dropped` messages: for this connection (slow consumer), and `subs`
    /// are the at-most-once subscriptions that may have lost some; or for the one
    /// subscription in `subs` its `Gap` named (skipped while paused, not kept by the store),
    /// acknowledging or not.
    Gap {
        /// How many.
        dropped: u64,
        /// The subscriptions that may have lost them.
        subs: Vec<LocalSubId>,
    },
    /// `n` messages for `sub` were dropped: because it had no credit left (the app is not
    /// taking them; counted in `slow_subscriber_drops`) — at most once, or at least once
    /// for an unnumbered message (sequence 0, which nothing sends again); or, for any
    /// subscription, because they were held back from it for another subscription on the
    /// connection (its room or its order) and do not come again (`CoreStats::withheld_lost`).
    Dropped {
        /// The subscription.
        sub: LocalSubId,
        /// How many.
        n: u64,
    },
    /// The history of `sub` ends at `seq`; what follows is live.
    ReplayDone {
        /// The subscription.
        sub: LocalSubId,
        /// The boundary.
        seq: u64,
    },
    /// The relay confirmed every relay subscription of `sub` (live messages published from
    /// now on are delivered).
    SubscribeOk {
        /// The subscription.
        sub: LocalSubId,
    },
    /// `sub` will not be confirmed — or, confirmed and durable, it was refused on a resume
    /// (a reconnect, a failover) with a code retrying cannot change, such as `not_allowed`
    /// for a durable owned by someone else at the relay now used; the engine forgot it.
    /// (Refused with a retryable code, such as `busy` for a name held elsewhere for now, a
    /// durable is asked for again with the reconnect backoff instead.)
    SubscribeErr {
        /// The subscription.
        sub: LocalSubId,
        /// Why.
        error: SubscribeFailure,
    },
    /// The relay has publish `pid` (sequence `seq`, 0 when not stored).
    PubAck {
        /// The publish.
        pid: PublishId,
        /// The relay sequence.
        seq: u64,
    },
    /// Publish `pid` has no `PubAck` and never will.
    PublishFailed {
        /// The publish.
        pid: PublishId,
        /// Why.
        reason: PublishFailure,
    },
    /// The relay processed everything sent before flush `id`.
    Flushed {
        /// The flush.
        id: FlushId,
    },
    /// Flush `id` cannot complete (not connected, or the connection dropped).
    FlushFailed {
        /// The flush.
        id: FlushId,
    },
    /// The relay processed the deletion of a durable subscription
    /// ([`crate::core::connection::Engine::delete_durable`], answered through its flush `id`; a lost
    /// connection answers [`Event::FlushFailed`] instead): `error` is the relay's refusal,
    /// if it sent one.
    DurableDeleted {
        /// The deletion's flush.
        id: FlushId,
        /// The relay's `Err` code and message, `None` when it deleted the durable.
        error: Option<(ErrorCode, String)>,
    },
    /// The relay refused a QoS 0 publish nobody waits for (no `ack`): a non-fatal `Err`
    /// naming no subscription and no publish (counted in
    /// [`EngineStats::publish_refusals`]). The message was not published.
    PublishRefused {
        /// The relay's code.
        code: ErrorCode,
        /// The relay's detail (its text: print it escaped).
        message: String,
    },
    /// A non-fatal `Err` from the relay; `sub` when it names a confirmed subscription.
    RelayError {
        /// Its code.
        code: ErrorCode,
        /// Its detail.
        message: String,
        /// The subscription concerned, if any.
        sub: Option<LocalSubId>,
    },
}

/// How the engine behaves. Durations in milliseconds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Client software name sent in `Hello`.
    pub client_name: String,
    /// The relay account presented in `Hello`.
    pub auth: Option<AccountAuth>,
    /// How long a dial, then the handshake, may take.
    pub connect_timeout_ms: u64,
    /// Reconnect policy, applied per full round over the relays (its `max_attempts`
    /// counts rounds).
    pub backoff: Backoff,
    /// How many relay addresses the driver can dial (at least 1). The engine goes round
    /// them in order, moving to the next after every failure (the first connection too),
    /// and tells the driver which to dial ([`Engine::dial_relay`](super::Engine::dial_relay)).
    pub relays: usize,
    /// The relay name (`host:port`, [`whispeer_protocol::relay_name`]) of each address, in
    /// the same order: what a relay-bound `Auth` signs on a connection to it (PROTOCOL
    /// §3.5.6). `None` (or an index past the end): that address has none — a relay asking
    /// for a bound sign-in there fails the handshake ([`AuthNotBound::NoName`]). A name
    /// that is not canonical counts as none.
    pub relay_names: Vec<Option<String>>,
    /// Sign only bound: a `Challenge` that does not ask for a relay-bound signature fails
    /// the handshake ([`AuthNotBound::NotOffered`]) instead of being answered with the
    /// legacy form. Off by default (relays without `auth.names` keep working).
    pub require_bound_auth: bool,
    /// Whether a failed first connection is retried (true) or ends the engine (false: the
    /// first `Disconnected` has `retry_at: None`).
    pub retry_first_connect: bool,
    /// Bytes of QoS 0 publishes kept while disconnected; beyond it `publish` fails with
    /// `BufferFull` (and `outbox_drops` counts it).
    pub offline_bytes: usize,
    /// Bytes of QoS ≥ 1 publishes kept until acknowledged; beyond it `publish` fails with
    /// `BufferFull`.
    pub kept_bytes: usize,
    /// Messages delivered to a subscription and not yet taken (its credit, also sent as
    /// `Sub.credit` for at-least-once subscriptions).
    pub sub_capacity: u64,
    /// Acks of the released prefix leave within this delay (or at once when 4,096 are
    /// ready); 0: with the next `poll_transmit`, one `Ack` for all an input released.
    pub ack_delay_ms: u64,
    /// Heartbeat when the relay asks for none.
    pub default_heartbeat_ms: u64,
    /// Pings left unanswered before the connection counts as dead.
    pub max_unanswered_pings: u32,
    /// Receiver checks (dedup horizon, skew, publisher policies).
    pub receive: ReceiveConfig,
    /// Key of durable owner secrets.
    pub owner_key: Option<zeroize::Zeroizing<[u8; 32]>>,
    /// Kept publishes of a previous run `(id, order, Pub frame)`: re-sent first, same ids.
    pub restored: Vec<(PublishId, u64, Bytes)>,
    /// How often one QoS ≥ 1 publish refused with a retryable code
    /// ([`ErrorCode::is_retryable`]: `busy`, `storage_full`...) is re-sent, same publish id,
    /// after the reconnect backoff's delay for each retry, before it fails with the relay's
    /// code. 0: it fails at once.
    pub publish_retries: u32,
    /// Deferred opening (`core::jobs`): most frames of the current socket parked while
    /// their envelopes are opened by [`OpenJob`](crate::core::jobs::OpenJob)s the driver
    /// runs elsewhere; `wants_read()` is false at the cap. 0 (the default, and always in
    /// the wasm client): every envelope opens inline in `handle_frame`.
    pub open_ahead: usize,
    /// Batch signing's window ([`Engine::publish_prepared`](super::Engine::publish_prepared)):
    /// at most `max_messages` per seal job, and a queue waits at most `max_wait_us`
    /// (rounded up to whole milliseconds; 0: cut whatever is queued when the driver asks).
    pub batch: whispeer_protocol::BatchPolicy,
    /// Most seal jobs out at once (at least 1). While they run, publishes queue up and the
    /// next batch grows by itself. A driver without threads runs each job at once.
    pub seal_ahead: usize,
    /// Steady-stream batching (with `batch.max_wait_us = 0`): while lone batch-signed
    /// publishes come at ≥ ~3,000 a second, each waits — at most to the end of the
    /// millisecond it came in — for the next, and the two share a signature. Needs a
    /// driver that honours [`Engine::poll_timeout`](super::Engine::poll_timeout) to the
    /// millisecond (the Rust client's: `ClientBuilder::steady_batching`; off by default).
    pub trickle: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            client_name: format!("whispeer-rs/{}", env!("CARGO_PKG_VERSION")),
            auth: None,
            connect_timeout_ms: 10_000,
            backoff: Backoff::default(),
            relays: 1,
            relay_names: Vec::new(),
            require_bound_auth: false,
            retry_first_connect: false,
            offline_bytes: 8 * 1024 * 1024,
            kept_bytes: 64 * 1024 * 1024,
            sub_capacity: 65_536,
            ack_delay_ms: 0,
            default_heartbeat_ms: 30_000,
            max_unanswered_pings: 2,
            receive: ReceiveConfig::default(),
            owner_key: None,
            restored: Vec::new(),
            publish_retries: 8,
            open_ahead: 0,
            batch: crate::core::DEFAULT_BATCH,
            seal_ahead: 1,
            trickle: false,
        }
    }
}

/// Counters of an engine.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// From the core: delivered, rejected, duplicates, relay gaps, refusals, held back.
    pub core: CoreStats,
    /// At most once: messages dropped because a subscription had no credit left.
    pub slow_subscriber_drops: u64,
    /// QoS 0 publishes (without `ack`: nobody waits for them) refused here (offline buffer
    /// full, over the relay's `max_frame`) or never sent (closed).
    pub outbox_drops: u64,
    /// QoS 0 publishes (without `ack`) the relay refused: a non-fatal `Err` naming no
    /// subscription and no publish — the relay's answer to a `Pub` that carries no
    /// publish id ([`Event::PublishRefused`]).
    pub publish_refusals: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// QoS ≥ 1 publishes in the outbox (reported by
    /// [`Engine::poll_kept`](super::Engine::poll_kept), saved with persistence) waiting for
    /// their `PubAck`.
    pub unacked_publishes: u64,
    /// QoS ≥ 1 publishes still waiting for their seal job (batch signing): not yet kept;
    /// they move to `unacked_publishes` once sealed.
    pub sealing_publishes: u64,
    /// Re-sends of QoS ≥ 1 publishes the relay refused with a retryable code.
    pub publish_retries: u64,
    /// Publishes their seal job could not seal (never sent).
    pub seal_failures: u64,
    /// Saved kept publishes skipped at start, never sent: not a QoS ≥ 1 `Pub` frame of the
    /// publish id they were saved under (tampered or corrupt state; review of session 27,
    /// F2).
    pub restore_refused: u64,
}
