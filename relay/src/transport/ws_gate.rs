//! Size rules for WebSocket messages *before* tungstenite buffers them: the handshake cap
//! (`HANDSHAKE_MAX_FRAME` until `Welcome`) and the relay-wide large-frame budget
//! ([`frame_budget`](super::frame_budget)), which the length-prefixed transports apply at
//! the prefix.
//!
//! tungstenite collects a message (all its fragments) in its own buffer up to `max_frame`,
//! and its limits cannot change after the upgrade. So a [`Follower`] under it (in
//! [`ReadAhead`](super::read_ahead::ReadAhead)) looks at the client's bytes as they pass —
//! the HTTP upgrade request up to its blank line, then each WebSocket frame header
//! (RFC 6455 §5.2: length, mask) and payload — and interprets nothing else. Once a
//! message's data frames pass [`FREE`] bytes, no more is read until the budget covers the
//! message (backpressure); the budget goes back when its last frame has passed. A
//! single-frame message takes its length, a fragmented one `max_frame`, once: no connection
//! ever waits while holding part of the budget. Before admission, a message over the
//! handshake cap fails the read, and [`WsGate::refused`] tells the source to answer
//! `frame_too_large`.
//!
//! At most one read of tungstenite's (its read-buffer size) of a payload passes before the
//! payload's header is judged.
//!
//! **Turns.** The reader loop (`conn::read_loop`) lets other connections run after
//! every few frames or KiB it handles, but it only sees whole messages: tungstenite parses
//! a message's non-final fragments, and control frames between them, without returning
//! anything, and reads on while bytes are buffered. A client sending a message as a long
//! run of tiny (even empty) fragments — 6 bytes each, never growing the message, so no
//! size limit applies — had one poll of its connection parse megabytes of frames while
//! every other task on that worker waited. So the follower counts the frames (and their
//! bytes) that end no message since the task last let others run; past the reader
//! loop's per-turn bounds it makes the next read yield (pending, the task woken at once
//! and queued behind the others). A message's last frame starts the count again (the
//! reader loop counts the message itself), as does a read that finds nothing (the task
//! waits anyway). RFC 6455 lets fragments be any size, so nothing is refused: such a
//! message only advances a turn at a time: at most about 16 frames (`FRAMES_PER_TURN`,
//! plus one 512-byte read of tungstenite's) or 16 KiB (`BYTES_PER_TURN`) per turn.
//!
//! **Pings.** tungstenite answers every ping with a pong it queues in its write buffer,
//! and when the socket refuses the write it puts the pong back and reads on: a client that
//! sent pings and never read grew that buffer to its bound (128 KiB + `max_frame` + 64 KiB,
//! a 2 MiB allocation) on every connection, before Hello (review, session 44: ~300 MiB
//! from one address). The follower counts the client's pings (opcode 9 headers): more
//! than [`PINGS_BEFORE_WELCOME`] before admission, or more than [`PINGS_UNANSWERED`] read
//! since tungstenite last wrote out its whole write buffer (it flushes the stream only
//! then: [`Follower::flushed`]), fail the read; the source answers `malformed` with the
//! reason ([`WsGate::failed`]). So a client's unanswered pongs hold at most ~4 KiB (plus
//! one read of pings, 85 at most) of the relay's memory. The relay's own clients send no
//! WebSocket pings at all (browsers cannot; the Rust and wasm clients ping with the
//! protocol's `Ping` frame), and other clients' keepalive pings come seconds apart.
//!
//! **Ping rate.** A client that reads its pongs is not stopped by that count, and each
//! empty ping (6 bytes) cost the relay a pong's write syscall and TCP segment (tungstenite
//! writes each pong at its next read; `TCP_NODELAY`): ~175,000 per MiB of pings, so a few
//! MB/s of them kept a relay core busy, before Hello too (review finding, Medium). So the
//! follower also holds the client's pings to [`PINGS_PER_SEC`] with bursts of
//! [`PING_BURST`] (a token bucket, as a theoretical arrival time, charged at each ping's
//! header): a read ends at the header of the ping that goes over
//! ([`Follower::passable`]), and the next read waits until the bucket has refilled
//! ([`Follower::poll_pings`]: backpressure through the socket, never a close; the gate is
//! [`stalled`](WsGate::stalled) meanwhile, so the idle timer does not count the wait as
//! the client's). Pongs (the answers to the relay's own keepalive pings) are not charged.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

use whispeer_protocol::limits::HANDSHAKE_MAX_FRAME;

use super::frame_budget::{FrameBudget, Lease, FREE};
use super::ws::KEEP_AT_LEAST;
use crate::conn::{BYTES_PER_TURN, FRAMES_PER_TURN};

/// What the gate under a WebSocket and its frame source share.
#[derive(Debug)]
pub struct WsGate {
    budget: Option<Arc<FrameBudget>>,
    /// The source address whose share of the budget the connection draws on.
    addr: IpAddr,
    admitted: AtomicBool,
    stalled: AtomicBool,
    /// Reads are paused for the client's ping rate ([`Follower::poll_pings`]).
    pings_paused: AtomicBool,
    /// A message has begun and not ended (its first fragment read, not its last).
    partial: AtomicBool,
    /// Size of a message refused (0: none): before admission over the handshake cap, or
    /// a fragmented one over `max_frame`.
    refused: AtomicUsize,
    /// Why the follower failed the read, when the client broke a rule of its own (its
    /// pings): the source answers it as a malformed stream.
    failed: OnceLock<String>,
    /// tungstenite has read from the stream since [`WsGate::take_read`] last cleared this
    /// (see `ws::own_frame`).
    read: AtomicBool,
}

impl WsGate {
    /// A gate drawing on `budget` (`None`: unlimited), within the share of source address
    /// `addr`.
    pub fn new(budget: Option<Arc<FrameBudget>>, addr: IpAddr) -> Arc<Self> {
        Arc::new(Self {
            budget,
            addr,
            admitted: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            pings_paused: AtomicBool::new(false),
            partial: AtomicBool::new(false),
            refused: AtomicUsize::new(0),
            failed: OnceLock::new(),
            read: AtomicBool::new(false),
        })
    }

    /// Whether tungstenite has read from the stream since the last call: it has then
    /// handled the frames it had and made room in its read buffer for more (see
    /// `ws::own_frame`).
    pub fn take_read(&self) -> bool {
        self.read.swap(false, Relaxed)
    }

    /// Why the follower failed the read, if it failed it for the client's pings.
    pub fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Whether a message is in progress: control frames may come between its fragments
    /// (RFC 6455), but they do not make a client that is sending a message slowly alive —
    /// a partial frame never resets the idle timer, or a client holding a fragmented
    /// message's budget could keep it for ever with a ping now and then.
    pub fn partial(&self) -> bool {
        self.partial.load(Relaxed)
    }

    /// The client is admitted: messages up to `max_frame` (tungstenite's own limit).
    pub fn admit(&self) {
        self.admitted.store(true, Relaxed);
    }

    /// Reads are paused by the relay: for budget, or for the client's ping rate (a read
    /// paused is no idleness of the client's) — but not while a message is in progress:
    /// there its pings are no sign of life either ([`WsGate::partial`]), or a client
    /// holding a fragmented message's budget could keep it for ever by pinging over the
    /// rate.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Relaxed) || (self.pings_paused.load(Relaxed) && !self.partial())
    }

    /// The size of the message refused before admission, if one was.
    pub fn refused(&self) -> Option<usize> {
        Some(self.refused.load(Relaxed)).filter(|n| *n > 0)
    }
}

/// Where in the upgrade request's lines, delimited as tungstenite's parser (httparse)
/// does — the two must agree on the request's last byte, or the follower would read the
/// client's frames out of step: empty lines before the request line are skipped, a line
/// ends with `\n` or `\r\n`, and the first empty line after it ends the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Before the request line (empty lines so far).
    Leading,
    /// Inside a line.
    In,
    /// At the start of a line.
    Start,
    /// At the start of a line, after a `\r`.
    StartCr,
}

/// Where the follower is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// The HTTP upgrade request, where in its lines.
    Http(Line),
    /// A frame header: its bytes so far.
    Header { have: usize },
    /// A payload: bytes left, whether the message ends with this frame, and whether its
    /// bytes count toward the turn (a frame that ends no message and is no event: a
    /// non-final fragment, or a control frame between fragments).
    Payload {
        left: u64,
        last: bool,
        counted: bool,
    },
}

type Taking = Pin<Box<dyn Future<Output = Option<Lease>> + Send>>;

/// The most parsing the upgrade request may cost tungstenite, in bytes parsed: it parses
/// the whole request again after every read (up to 512 reads and 64 KiB by its own
/// limits), so a client sending its request in small pieces made one connection cost ~17 MB
/// of parsing (review, session 43) — 256 connections per address, every `hello_ms`.
/// Counted as tungstenite parses: after each read, all the request's bytes so far — so the
/// count grows with the square of the pieces. 2 MiB lets every request tungstenite itself
/// takes (≤ 64 KiB) through when it arrives in full 1,460-byte segments (45 segments,
/// ~1.5 MB counted), and a 45 KB one in minimum 536-byte segments; an honest request of a
/// few KiB in a few segments counts a few KiB. A dribbler is stopped at ~8 times less
/// parsing than tungstenite's own limits allow.
pub(crate) const UPGRADE_PARSE_MAX: usize = 2 << 20;

/// The longest upgrade request taken, in bytes (counted up to its blank line). tungstenite
/// takes up to
/// 64 KiB, held until `hello_ms` — where TCP holds at most 4 KiB before `Welcome` (review
/// finding); a browser's request, cookies included, is a few KiB at most.
pub(crate) const UPGRADE_MAX: usize = 16 * 1024;

/// Pings a client may send before it is admitted (see the module documentation).
pub(crate) const PINGS_BEFORE_WELCOME: u32 = 16;

/// Pings a client may send while the pongs it is owed are not written (tungstenite has not
/// written out its write buffer since): 32 pongs of at most 127 bytes, 4 KiB.
pub(crate) const PINGS_UNANSWERED: u32 = 32;

/// The pings per second a client's pings are held to, over its bursts (see the module
/// documentation). Honest clients send none (keepalives seconds apart at most).
pub(crate) const PINGS_PER_SEC: u32 = 10;

/// The pings a client may send at once before [`PINGS_PER_SEC`] applies.
pub(crate) const PING_BURST: u32 = 50;

/// Follows the client's bytes on a WebSocket connection and holds its messages to the
/// gate's rules ([`ReadAhead`](super::read_ahead::ReadAhead) calls it on every read).
pub struct Follower {
    gate: Arc<WsGate>,
    at: At,
    header: [u8; 14],
    /// Data payload bytes of the message in progress, frames seen so far.
    message: u64,
    /// Budget held for the message in progress (taken at most once per message).
    held: Option<Lease>,
    /// The message in progress has taken (or is taking) its budget.
    covered: bool,
    /// The relay's `max_frame` (tungstenite's message limit).
    max_frame: usize,
    /// Budget being taken for the payload about to pass.
    taking: Option<Taking>,
    /// Frames that end no message, and their bytes, passed since the task last let others
    /// run (see the module documentation).
    turn_frames: usize,
    turn_bytes: usize,
    /// Reads made to yield so far.
    yields: u64,
    /// The upgrade request's bytes so far, and what tungstenite has parsed of them in all
    /// (see [`UPGRADE_PARSE_MAX`]).
    upgrade_bytes: usize,
    upgrade_parsed: usize,
    /// The upgrade request's own bytes so far (at most [`UPGRADE_MAX`]).
    upgrade_len: usize,
    /// [`UPGRADE_PARSE_MAX`] (tests that compare splits lift it: it depends on them).
    upgrade_parse_max: usize,
    /// Pings read before admission.
    pings_before_welcome: u32,
    /// [`PINGS_BEFORE_WELCOME`] (tests that compare with tungstenite lift it).
    pings_before_welcome_max: u32,
    /// Pings read since tungstenite last wrote out its whole write buffer.
    pings_unanswered: u32,
    /// The client's pings: [`PINGS_PER_SEC`], bursts of [`PING_BURST`] (the relay's
    /// rate buckets; tests that flood lift it).
    pings: crate::rate::TokenBucket,
    /// When the bucket is out of the debt the last ping put it in: the next read waits
    /// until then (`None`: not in debt).
    ping_wake: Option<Instant>,
    /// The wait until the bucket is out of debt.
    ping_sleep: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("at", &self.at)
            .field("message", &self.message)
            .field("held", &self.held.is_some())
            .field("turn_frames", &self.turn_frames)
            .field("turn_bytes", &self.turn_bytes)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Follows the client's bytes from the first byte of its upgrade request.
    pub fn new(gate: Arc<WsGate>, max_frame: usize) -> Self {
        Self {
            gate,
            covered: false,
            max_frame,
            at: At::Http(Line::Leading),
            header: [0; 14],
            message: 0,
            held: None,
            taking: None,
            turn_frames: 0,
            turn_bytes: 0,
            yields: 0,
            upgrade_bytes: 0,
            upgrade_parsed: 0,
            upgrade_len: 0,
            upgrade_parse_max: UPGRADE_PARSE_MAX,
            pings_before_welcome: 0,
            pings_before_welcome_max: PINGS_BEFORE_WELCOME,
            pings_unanswered: 0,
            pings: crate::rate::TokenBucket::new(
                PINGS_PER_SEC,
                PING_BURST,
                std::time::Instant::now(),
            ),
            ping_wake: None,
            ping_sleep: None,
        }
    }

    /// Sets the interval between pings (tests: [`PINGS_PER_SEC`] would make a flood slow).
    #[cfg(test)]
    pub(crate) fn set_ping_interval(&mut self, interval: std::time::Duration) {
        // Zero: unlimited (the bucket's rate 0).
        let rate = std::time::Duration::from_secs(1)
            .as_nanos()
            .checked_div(interval.as_nanos())
            .map_or(0, |r| u32::try_from(r).unwrap_or(u32::MAX));
        self.pings = crate::rate::TokenBucket::new(rate, PING_BURST, std::time::Instant::now());
    }

    /// Ready when the client's pings are within their rate; pending (the gate stalled)
    /// until the bucket is out of debt otherwise (see the module documentation).
    pub fn poll_pings(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(until) = self.ping_wake else {
            return Poll::Ready(());
        };
        if Instant::now() < until {
            let sleep = self
                .ping_sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                self.gate.pings_paused.store(true, Relaxed);
                return Poll::Pending;
            }
        }
        self.ping_wake = None;
        self.ping_sleep = None;
        self.gate.pings_paused.store(false, Relaxed);
        Poll::Ready(())
    }

    /// tungstenite wrote out its whole write buffer (it flushes the stream only then): every
    /// pong owed so far is on its way.
    pub fn flushed(&mut self) {
        self.pings_unanswered = 0;
    }

    /// Before a read (tungstenite reads only when the frames it has are handled, each ping
    /// answered — its pong written or left in the write buffer): `Err` when more than
    /// [`PINGS_UNANSWERED`] pings were read since the buffer was last written out.
    pub fn check_pongs(&self) -> io::Result<()> {
        if self.pings_unanswered > PINGS_UNANSWERED {
            return Err(self.fail(format!(
                "{} WebSocket pings while the relay could not write their pongs (the client \
                 does not read); at most {PINGS_UNANSWERED}",
                self.pings_unanswered
            )));
        }
        Ok(())
    }

    /// The read fails for the client's pings: `why` is what the source answers.
    fn fail(&self, why: String) -> io::Error {
        let _ = self.gate.failed.set(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// A ping's header: counted (see the module documentation).
    fn on_ping(&mut self) -> io::Result<()> {
        self.pings_unanswered = self.pings_unanswered.saturating_add(1);
        if let Some(pause) = self.pings.take(1.0, std::time::Instant::now()) {
            self.ping_wake = Some(Instant::now() + pause);
        }
        if !self.gate.admitted.load(Relaxed) {
            self.pings_before_welcome += 1;
            if self.pings_before_welcome > self.pings_before_welcome_max {
                return Err(self.fail(format!(
                    "more than {PINGS_BEFORE_WELCOME} WebSocket pings before Welcome"
                )));
            }
        }
        Ok(())
    }

    /// Reads made to yield so far (a message's frames passed the per-turn bounds without
    /// an event).
    pub fn yields(&self) -> u64 {
        self.yields
    }

    /// Others have run (or are about to): the count of the turn starts again.
    pub fn new_turn(&mut self) {
        self.turn_frames = 0;
        self.turn_bytes = 0;
    }

    /// Pending (the task woken at once: it yields) when the frames passed since the task
    /// last let others run are past the reader loop's per-turn bounds, and no message
    /// ended among them; ready otherwise.
    pub fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.turn_frames > FRAMES_PER_TURN || self.turn_bytes > BYTES_PER_TURN {
            self.new_turn();
            self.yields += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    /// The header's full length once its first two bytes are known.
    fn header_len(&self) -> usize {
        header_len(&self.header)
    }

    /// A complete header: the payload's length, and what the message now needs.
    fn on_header(&mut self) -> io::Result<()> {
        let len = payload_len(&self.header);
        let opcode = self.header[0] & 0x0f;
        let fin = self.header[0] & 0x80 != 0;
        if opcode == 9 {
            self.on_ping()?;
        }
        // Control frames (8..) are small and may come between a message's fragments.
        let data = opcode < 8;
        if data {
            self.message = self.message.saturating_add(len);
            self.gate.partial.store(true, Relaxed);
            if self.message > self.max_frame as u64 {
                // tungstenite refuses a message over `max_frame` only once its fragments
                // add up past it — after buffering the whole last fragment (up to
                // `max_frame` more, outside the budget). Refused here at its header.
                let n = usize::try_from(self.message).unwrap_or(usize::MAX);
                self.gate.refused.store(n, Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a message over max_frame",
                ));
            }
            let admitted = self.gate.admitted.load(Relaxed);
            if !admitted && self.message > HANDSHAKE_MAX_FRAME as u64 {
                let n = usize::try_from(self.message).unwrap_or(usize::MAX);
                self.gate.refused.store(n, Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a message over the handshake cap before Welcome",
                ));
            }
            // Past FREE the message takes budget once, all it will need: a single frame
            // its length, a fragmented message the most it may become (`max_frame`), so
            // no connection ever holds part of the budget while waiting for more (two of
            // them could then wait on each other forever). Over `max_frame`, tungstenite
            // refuses the message: nothing to take.
            let whole = fin && self.message == len;
            if self.message > FREE as u64 && !self.covered && self.message <= self.max_frame as u64
            {
                if let Some(budget) = self.gate.budget.clone() {
                    let n = if whole {
                        self.message as usize
                    } else {
                        self.max_frame
                    };
                    let addr = self.gate.addr;
                    self.taking = Some(Box::pin(async move { budget.take(addr, n).await }));
                }
                self.covered = true;
            }
        }
        // A frame that ends no message (a non-final fragment, a control frame between
        // fragments) is never an event for the reader loop: it counts toward the turn
        // here. (A control frame outside a message is an event: counted there.)
        let counted = if data { !fin } else { self.gate.partial() };
        if counted {
            self.turn_frames += 1;
            self.turn_bytes = self.turn_bytes.saturating_add(self.header_len());
        }
        self.at = At::Payload {
            left: len,
            last: data && fin,
            counted,
        };
        if len == 0 {
            self.payload_done();
        }
        Ok(())
    }

    fn payload_done(&mut self) {
        if let At::Payload { last: true, .. } = self.at {
            // The whole message has passed: its budget goes back, and budget still being
            // taken for it is not needed any more (one large read can carry a header and
            // all its payload before the taking is polled).
            self.message = 0;
            self.covered = false;
            self.held = None;
            self.taking = None;
            self.gate.stalled.store(false, Relaxed);
            self.gate.partial.store(false, Relaxed);
            // The message becomes an event: the reader loop counts it from here.
            self.new_turn();
        }
        self.at = At::Header { have: 0 };
    }

    /// tungstenite reads from the stream (see [`WsGate::take_read`]).
    pub fn reading(&self) {
        self.gate.read.store(true, Relaxed);
    }

    /// How many of `ahead`, the stream's next bytes, one read may pass to tungstenite: up
    /// to the end of the upgrade request or of the next header of a single-frame binary
    /// message of at least [`KEEP_AT_LEAST`] bytes, or all of them. tungstenite then parses
    /// such a header with none of its payload buffered behind it, so it makes room for
    /// exactly the payload: the message it cuts out fills its allocation to the end, and
    /// what tungstenite reads next goes into a new one (see `ws::own_frame`).
    ///
    /// A read also ends just after the header of a ping that puts the ping bucket in debt
    /// (the next read then waits: [`Follower::poll_pings`]), so tungstenite answers at most
    /// one ping over the rate.
    pub fn passable(&self, ahead: &[u8]) -> usize {
        let (mut at, mut header) = (self.at, self.header);
        let mut i = 0;
        // The bucket as the pings in `ahead` leave it (the clock read at the first).
        // The ping bucket as it would be after the pings ahead (a copy: charged for real
        // when tungstenite reads them, `on_ping`).
        let mut pings: Option<(crate::rate::TokenBucket, std::time::Instant)> = None;
        while i < ahead.len() {
            match at {
                At::Http(line) => {
                    at = next_line(line, ahead[i]);
                    i += 1;
                    if !matches!(at, At::Http(_)) {
                        return i;
                    }
                }
                At::Header { have } => {
                    let need = if have < 2 { 2 } else { header_len(&header) };
                    let n = (need - have).min(ahead.len() - i);
                    header[have..have + n].copy_from_slice(&ahead[i..i + n]);
                    i += n;
                    let have = have + n;
                    at = At::Header { have };
                    if have >= 2 && have == header_len(&header) {
                        let len = payload_len(&header);
                        // FIN, binary.
                        if header[0] & 0x8f == 0x82 && len >= KEEP_AT_LEAST as u64 {
                            return i;
                        }
                        if header[0] & 0x0f == 9 {
                            let (bucket, now) = pings.get_or_insert_with(|| {
                                (self.pings.clone(), std::time::Instant::now())
                            });
                            if bucket.take(1.0, *now).is_some() {
                                return i;
                            }
                        }
                        at = At::Payload {
                            left: len,
                            last: false,
                            counted: false,
                        };
                        if len == 0 {
                            at = At::Header { have: 0 };
                        }
                    }
                }
                At::Payload { left, .. } => {
                    let n = left.min((ahead.len() - i) as u64);
                    i += n as usize;
                    at = if n == left {
                        At::Header { have: 0 }
                    } else {
                        At::Payload {
                            left: left - n,
                            last: false,
                            counted: false,
                        }
                    };
                }
            }
        }
        ahead.len()
    }

    /// Whether the upgrade request has not ended yet by this follower's count: after
    /// tungstenite accepted it, that means the two disagree, and the connection must go.
    pub fn in_upgrade(&self) -> bool {
        matches!(self.at, At::Http(_))
    }

    /// Follows `bytes` just read; `Err` when a message breaks the handshake cap.
    pub fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.in_upgrade() && !bytes.is_empty() {
            // tungstenite parses the request from its first byte after this read.
            self.upgrade_bytes = self.upgrade_bytes.saturating_add(bytes.len());
            self.upgrade_parsed = self.upgrade_parsed.saturating_add(self.upgrade_bytes);
            if self.upgrade_parsed > self.upgrade_parse_max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the WebSocket upgrade request arrived in too many pieces \
                         ({} bytes so far, {} parsed; at most {})",
                        self.upgrade_bytes, self.upgrade_parsed, self.upgrade_parse_max
                    ),
                ));
            }
        }
        while !bytes.is_empty() {
            match self.at {
                At::Http(line) => {
                    self.at = next_line(line, bytes[0]);
                    bytes = &bytes[1..];
                    self.upgrade_len += 1;
                    if self.upgrade_len > UPGRADE_MAX {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("a WebSocket upgrade request over {UPGRADE_MAX} bytes"),
                        ));
                    }
                }
                At::Header { have } => {
                    let need = if have < 2 { 2 } else { self.header_len() };
                    let n = (need - have).min(bytes.len());
                    self.header[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    let have = have + n;
                    self.at = At::Header { have };
                    if have >= 2 && have == self.header_len() {
                        self.on_header()?;
                    }
                }
                At::Payload {
                    left,
                    last,
                    counted,
                } => {
                    let n = (bytes.len() as u64).min(left);
                    bytes = &bytes[n as usize..];
                    if counted {
                        self.turn_bytes = self.turn_bytes.saturating_add(n as usize);
                    }
                    self.at = At::Payload {
                        left: left - n,
                        last,
                        counted,
                    };
                    if left == n {
                        self.payload_done();
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where the follower is after byte `b` of the upgrade request, at `line` before it.
fn next_line(line: Line, b: u8) -> At {
    match (line, b) {
        (Line::Leading, b'\r' | b'\n') => At::Http(Line::Leading),
        (Line::Start | Line::StartCr, b'\n') => At::Header { have: 0 },
        (Line::Start, b'\r') => At::Http(Line::StartCr),
        (_, b'\n') => At::Http(Line::Start),
        _ => At::Http(Line::In),
    }
}

/// A frame header's full length once its first two bytes are known.
fn header_len(header: &[u8; 14]) -> usize {
    let ext = match header[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if header[1] & 0x80 != 0 { 4 } else { 0 }
}

/// A complete frame header's payload length.
fn payload_len(header: &[u8; 14]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
        n => u64::from(n),
    }
}

impl Follower {
    /// Ready when the payload about to pass is covered by the budget (or needs none);
    /// pending while the budget cannot cover it (the gate says it is stalled meanwhile).
    pub fn poll_budget(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(taking) = self.taking.as_mut() {
            match taking.as_mut().poll(cx) {
                Poll::Pending => {
                    self.gate.stalled.store(true, Relaxed);
                    return Poll::Pending;
                }
                Poll::Ready(p) => {
                    self.gate.stalled.store(false, Relaxed);
                    self.taking = None;
                    self.held = p;
                }
            }
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker_ref;

    const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";
    const ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    /// Pings past the burst: a read ends just after the header of the ping that puts the
    /// bucket in debt ([`PING_BURST`] + 1 pass at once), and the next read waits about one
    /// interval; pongs are not charged.
    #[tokio::test]
    async fn a_read_ends_at_the_ping_over_the_rate_and_the_next_waits() {
        let gate = WsGate::new(None, ADDR);
        gate.admit();
        let mut f = Follower::new(gate.clone(), 1 << 20);
        f.follow(UPGRADE).unwrap();
        let ping = [0x89u8, 0x80, 1, 2, 3, 4];
        let pong = [0x8au8, 0x80, 1, 2, 3, 4];
        let pongs: Vec<u8> = pong.iter().copied().cycle().take(6 * 100).collect();
        assert_eq!(f.passable(&pongs), pongs.len());
        f.follow(&pongs).unwrap();
        let pings: Vec<u8> = ping.iter().copied().cycle().take(6 * 100).collect();
        let n = f.passable(&pings);
        assert_eq!(n, 6 * (PING_BURST as usize + 1));
        f.follow(&pings[..n]).unwrap();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(f.poll_pings(&mut cx).is_pending());
        assert!(gate.stalled(), "a paused read is reported stalled");
        let started = Instant::now();
        std::future::poll_fn(|cx| f.poll_pings(cx)).await;
        let waited = started.elapsed();
        assert!(!gate.stalled());
        let interval = std::time::Duration::from_secs(1) / PINGS_PER_SEC;
        assert!(
            waited >= interval / 2 && waited < interval * 5,
            "{waited:?}"
        );
        // One more ping then goes over again.
        assert_eq!(f.passable(&pings[n..]), 6);

        // Paused between a message's fragments: not stalled (its pings are no sign of
        // life there, and a paused read must not suspend its idle timer).
        let gate = WsGate::new(None, ADDR);
        gate.admit();
        let mut f = Follower::new(gate.clone(), 1 << 20);
        f.follow(UPGRADE).unwrap();
        f.follow(&[0x02, 0x80, 1, 2, 3, 4]).unwrap();
        f.follow(&pings).unwrap();
        assert!(gate.partial());
        assert!(f.poll_pings(&mut cx).is_pending());
        assert!(!gate.stalled());
    }

    /// The request ends where httparse ends it: leading empty lines skipped, `\n` or
    /// `\r\n` line ends, the first empty line. A follower that ended it elsewhere would
    /// read the frames out of step (a client could hide a large frame's header in what
    /// the follower takes for a payload).
    #[test]
    fn the_upgrade_request_ends_where_httparse_ends_it() {
        for req in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\nHost: x\r\n\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let parsed = httparse::Request::new(&mut headers).parse(req).unwrap();
            assert_eq!(parsed, httparse::Status::Complete(req.len()), "{req:?}");
            for step in [1, 2, 5, req.len()] {
                let mut f = Follower::new(WsGate::new(None, ADDR), 1 << 20);
                let (last, head) = req.split_last().unwrap();
                for piece in head.chunks(step) {
                    f.follow(piece).unwrap();
                }
                assert!(f.in_upgrade(), "{req:?}: not before its last byte");
                f.follow(&[*last]).unwrap();
                assert!(!f.in_upgrade(), "{req:?}: ended at its last byte");
            }
        }
    }

    /// An upgrade request dribbled in small pieces is refused once tungstenite would have
    /// parsed [`UPGRADE_PARSE_MAX`] bytes of it (it parses the whole request after every
    /// read); the same request in a few pieces passes, and so does one of 16 KiB (all that
    /// the follower takes) in 1,460-byte segments.
    #[test]
    fn an_upgrade_request_in_many_small_pieces_is_refused() {
        let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: ".to_vec();
        big.resize(UPGRADE_MAX - 4, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        for (req, step) in [(&big[..], 1460), (UPGRADE, 1), (&big[..], 4096)] {
            let mut f = Follower::new(WsGate::new(None, ADDR), 1 << 20);
            for piece in req.chunks(step) {
                f.follow(piece).unwrap();
            }
            assert!(!f.in_upgrade());
        }
        // 32-byte pieces of a request with long headers: refused before its end.
        let mut f = Follower::new(WsGate::new(None, ADDR), 1 << 20);
        let mut refused = None;
        for (i, piece) in big.chunks(32).enumerate() {
            if let Err(e) = f.follow(piece) {
                refused = Some((i, e));
                break;
            }
        }
        let (i, e) = refused.expect("a dribbled request is refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("too many pieces"), "{e}");
        // Σ 32·k for k ≤ n passes 2 MiB at n ≈ 362 pieces (11.6 KB).
        assert!((350..375).contains(&i), "refused at piece {i}");
    }

    /// An upgrade request over [`UPGRADE_MAX`] is refused as its bytes pass (tungstenite
    /// would take up to 64 KiB and hold it until `hello_ms`), in large pieces too.
    #[test]
    fn an_upgrade_request_over_16_kib_is_refused() {
        let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: ".to_vec();
        big.resize(UPGRADE_MAX + 1 - 4, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        let mut f = Follower::new(WsGate::new(None, ADDR), 1 << 20);
        let e = big
            .chunks(4096)
            .find_map(|piece| f.follow(piece).err())
            .expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("over 16384 bytes"), "{e}");
    }

    /// A client frame header (masked, as clients must send) for `len` payload bytes.
    fn header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut h = vec![u8::from(fin) << 7 | opcode];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=0xffff => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, len);
        f.resize(f.len() + len, 0xab);
        f
    }

    /// Feeds `bytes` in pieces of `step`, taking budget whenever the follower asks.
    fn feed(f: &mut Follower, bytes: &[u8], step: usize) -> io::Result<()> {
        let mut cx = Context::from_waker(noop_waker_ref());
        for piece in bytes.chunks(step) {
            assert!(f.poll_budget(&mut cx).is_ready(), "budget available");
            f.follow(piece)?;
        }
        Ok(())
    }

    fn admitted(budget: usize) -> (Arc<WsGate>, Option<Arc<FrameBudget>>) {
        let b = FrameBudget::new(budget);
        let gate = WsGate::new(b.clone(), ADDR);
        gate.admit();
        (gate, b)
    }

    /// An admitted follower with a budget of `budget` bytes, and its stream so far (the
    /// upgrade request).
    fn following(budget: usize) -> (Arc<FrameBudget>, Follower, Vec<u8>) {
        let (gate, b) = admitted(budget);
        (
            b.expect("a budget"),
            Follower::new(gate, 1 << 20),
            UPGRADE.to_vec(),
        )
    }

    /// Headers of every length form, masked, split anywhere: small messages take nothing;
    /// a single large frame takes exactly its length while it passes and gives it back
    /// when done; control frames between fragments do not count.
    #[test]
    fn follows_every_header_form_in_any_split_and_takes_budget_only_for_large_messages() {
        for step in [1, 3, 7, 500, 1 << 20] {
            let (budget, mut f, mut stream) = following(1 << 20);
            stream.extend(frame(true, 2, 100)); // 7-bit length
            stream.extend(frame(true, 2, 1000)); // 16-bit length
            stream.extend(frame(false, 2, 30_000)); // a fragmented message of 60,000...
            stream.extend(frame(true, 9, 4)); // ...with a ping between its fragments
            stream.extend(frame(true, 0, 30_000));
            feed(&mut f, &stream, step).unwrap();
            assert_eq!(
                budget.available(),
                1 << 20,
                "nothing over FREE: nothing taken"
            );
            assert_eq!(f.at, At::Header { have: 0 });

            // A 100 KiB single frame (the 64-bit length form): its header makes the
            // follower take its exact length.
            let big = 100 * 1024;
            let f2 = frame(true, 2, big);
            let cut = header(true, 2, big).len() + 10;
            feed(&mut f, &f2[..cut], step.min(cut)).unwrap();
            let mut cx = Context::from_waker(noop_waker_ref());
            assert!(f.poll_budget(&mut cx).is_ready());
            assert_eq!(
                budget.available(),
                (1 << 20) - big,
                "its length, while it passes"
            );
            feed(&mut f, &f2[cut..], step).unwrap();
            assert_eq!(budget.available(), 1 << 20, "given back at its end");
        }
    }

    /// A fragmented message past FREE reserves max_frame once (later fragments take
    /// nothing more), and gives it back at its last fragment.
    #[test]
    fn a_fragmented_large_message_reserves_max_frame_once() {
        let (budget, mut f, mut stream) = following(4 << 20);
        for _ in 0..4 {
            stream.extend(frame(
                false,
                if stream.len() == UPGRADE.len() { 2 } else { 0 },
                40_000,
            ));
        }
        feed(&mut f, &stream, 4096).unwrap();
        assert_eq!(budget.available(), (4 << 20) - (1 << 20));
        feed(&mut f, &frame(true, 0, 10), 4096).unwrap();
        assert_eq!(budget.available(), 4 << 20);
    }

    /// A read passes up to the end of the upgrade request and of each header of a
    /// single-frame binary message of at least `KEEP_AT_LEAST` bytes, and no further;
    /// every other byte passes as read, wherever the read began.
    #[test]
    fn a_read_ends_at_a_large_messages_header() {
        let (_, mut f, _) = following(1 << 20);
        f.at = At::Http(Line::Leading);
        let mut stream = UPGRADE.to_vec();
        let small = frame(true, 2, 100);
        let big_header = header(true, 2, KEEP_AT_LEAST);
        stream.extend(&small);
        stream.extend(frame(false, 2, KEEP_AT_LEAST)); // a fragment: no cut
        stream.extend(frame(true, 0, 10));
        stream.extend(frame(true, 2, KEEP_AT_LEAST));
        stream.extend(frame(true, 2, 10));
        let big_end = UPGRADE.len()
            + small.len()
            + header(false, 2, KEEP_AT_LEAST).len()
            + KEEP_AT_LEAST
            + header(true, 0, 10).len()
            + 10
            + big_header.len();
        // Passed in reads of at most `step`, each as far as `passable` lets it.
        for step in [1, 3, 100, 1 << 20] {
            f = Follower::new(f.gate.clone(), 1 << 20);
            let mut ends = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let ahead = &stream[at..(at + step).min(stream.len())];
                let n = f.passable(ahead);
                assert!(n > 0);
                f.follow(&ahead[..n]).unwrap();
                at += n;
                if n < ahead.len() {
                    ends.push(at);
                }
            }
            if step > big_header.len() {
                assert_eq!(ends, [UPGRADE.len(), big_end], "step {step}");
            }
            assert!(!f.in_upgrade());
        }
    }

    /// Before admission a message over the handshake cap fails the read at its header (a
    /// fragmented one when its fragments add up to more), and the gate records its size.
    #[test]
    fn before_admission_a_message_over_the_handshake_cap_is_refused_at_its_header() {
        let gate = WsGate::new(None, ADDR);
        let mut f = Follower::new(gate.clone(), 1 << 20);
        let mut stream = UPGRADE.to_vec();
        stream.extend(frame(true, 2, 3000)); // a Hello-sized message: fine
        stream.extend(header(true, 2, 1 << 20)); // no payload sent: refused anyway
        let e = feed(&mut f, &stream, 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(gate.refused(), Some(1 << 20));

        let gate = WsGate::new(None, ADDR);
        let mut f = Follower::new(gate.clone(), 1 << 20);
        let mut stream = UPGRADE.to_vec();
        stream.extend(frame(false, 2, 3000));
        stream.extend(header(true, 0, 2000));
        assert!(feed(&mut f, &stream, 64).is_err());
        assert_eq!(gate.refused(), Some(5000));

        // Admitted, the same message passes (tungstenite's max_frame is the limit then).
        let (gate, _) = admitted(0);
        let mut f = Follower::new(gate.clone(), 1 << 20);
        let mut stream = UPGRADE.to_vec();
        stream.extend(frame(true, 2, 200_000));
        feed(&mut f, &stream, 4096).unwrap();
        assert_eq!(gate.refused(), None);

        // A fragmented message whose fragments add up past max_frame is refused at the
        // header that takes it over (tungstenite would first buffer that whole fragment,
        // outside the budget), and a message in progress is visible as partial (pings
        // between its fragments are no sign of life).
        let (gate, _) = admitted(0);
        let mut f = Follower::new(gate.clone(), 1 << 20);
        let mut stream = UPGRADE.to_vec();
        stream.extend(frame(false, 2, 10));
        feed(&mut f, &stream, 4096).unwrap();
        assert!(gate.partial());
        feed(&mut f, &frame(true, 9, 4), 4096).unwrap();
        assert!(gate.partial(), "a ping between fragments");
        feed(&mut f, &frame(true, 0, 5), 4096).unwrap();
        assert!(!gate.partial());
        feed(&mut f, &frame(false, 2, 1), 4096).unwrap();
        let e = feed(&mut f, &header(false, 0, 1 << 20), 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(gate.refused(), Some((1 << 20) + 1));
    }

    /// A message whose header and whole payload pass in one read needs no budget any
    /// more: the taking started at its header is dropped, nothing stays held.
    #[test]
    fn a_message_passed_whole_in_one_read_keeps_no_budget() {
        let (budget, mut f, mut stream) = following(1 << 20);
        stream.extend(frame(true, 2, 200_000));
        f.follow(&stream).unwrap();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(f.poll_budget(&mut cx).is_ready());
        assert_eq!(budget.available(), 1 << 20);
        assert!(f.held.is_none());
    }

    /// Frames that end no message count toward the turn: past FRAMES_PER_TURN of them (or
    /// BYTES_PER_TURN of their bytes) the next read yields — pending, with the task woken
    /// at once — and the count starts again; a message's end, or a read that finds
    /// nothing, starts it again too. Whole messages, and pings outside a message, are the
    /// reader loop's to count (they are events): they never make a read yield here.
    #[test]
    fn frames_that_end_no_message_yield_every_turn() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl futures_util::task::ArcWake for Count {
            fn wake_by_ref(me: &Arc<Self>) {
                me.0.fetch_add(1, Relaxed);
            }
        }
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures_util::task::waker(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let (gate, _) = admitted(0);
        let mut f = Follower::new(gate, 1 << 20);
        f.follow(UPGRADE).unwrap();
        // Whole messages and pings outside a message, many of them: never a yield.
        for _ in 0..1000 {
            f.follow(&frame(true, 2, 10)).unwrap();
            f.follow(&frame(true, 9, 0)).unwrap();
        }
        assert!(f.poll_turn(&mut cx).is_ready());
        // A message begun, then empty continuations: a yield once past FRAMES_PER_TURN.
        f.follow(&frame(false, 2, 1)).unwrap();
        for _ in 0..FRAMES_PER_TURN - 1 {
            f.follow(&frame(false, 0, 0)).unwrap();
        }
        assert!(f.poll_turn(&mut cx).is_ready(), "a turn's worth");
        f.follow(&frame(false, 0, 0)).unwrap();
        assert!(f.poll_turn(&mut cx).is_pending(), "past it");
        assert_eq!((woken.0.load(Relaxed), f.yields()), (1, 1), "woken at once");
        assert!(f.poll_turn(&mut cx).is_ready(), "the next turn");
        // 100,000 of them: a yield per turn.
        let mut yields = 0;
        for _ in 0..100_000 {
            f.follow(&frame(false, 0, 0)).unwrap();
            if f.poll_turn(&mut cx).is_pending() {
                yields += 1;
            }
        }
        assert_eq!(yields, 100_000 / (FRAMES_PER_TURN + 1));
        // Pings between the fragments count too.
        f.new_turn();
        for _ in 0..=FRAMES_PER_TURN {
            f.follow(&frame(true, 9, 4)).unwrap();
        }
        assert!(f.poll_turn(&mut cx).is_pending());
        // The message's end starts the count again.
        f.follow(&frame(false, 0, 0)).unwrap();
        f.follow(&frame(true, 0, 3)).unwrap();
        assert!(f.poll_turn(&mut cx).is_ready());
        // Large non-final fragments count by their bytes: 2 of 10,000 bytes are past
        // BYTES_PER_TURN; a final fragment of any size is the message's (an event).
        f.follow(&frame(false, 2, 10_000)).unwrap();
        assert!(f.poll_turn(&mut cx).is_ready());
        f.follow(&frame(false, 0, 10_000)).unwrap();
        assert!(f.poll_turn(&mut cx).is_pending());
        f.follow(&frame(true, 0, 60_000)).unwrap();
        assert!(f.poll_turn(&mut cx).is_ready());
    }

    /// Before Welcome a client may send [`PINGS_BEFORE_WELCOME`] pings; the next fails the
    /// read, with the reason in the gate (not a refused size). Admitted, pings are not
    /// counted so (only against their unwritten pongs, see `check_pongs`).
    #[test]
    fn more_than_16_pings_before_welcome_fail_the_read() {
        let mut f = Follower::new(WsGate::new(None, ADDR), 1 << 20);
        f.follow(UPGRADE).unwrap();
        // Pongs and data between them do not count.
        f.follow(&frame(true, 10, 4)).unwrap();
        f.follow(&frame(true, 2, 40)).unwrap();
        for _ in 0..PINGS_BEFORE_WELCOME {
            f.follow(&frame(true, 9, 0)).unwrap();
            f.flushed();
        }
        let e = f.follow(&frame(true, 9, 125)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            f.gate.failed().unwrap().contains("pings before Welcome"),
            "{e}"
        );
        assert_eq!(f.gate.refused(), None);

        let (gate, _) = admitted(1 << 20);
        let mut f = Follower::new(gate.clone(), 1 << 20);
        f.follow(UPGRADE).unwrap();
        for _ in 0..1000 {
            f.follow(&frame(true, 9, 125)).unwrap();
            f.check_pongs().unwrap();
            f.flushed();
        }
        assert_eq!(gate.failed(), None);
    }

    /// Pings read since tungstenite last wrote out its write buffer: up to
    /// [`PINGS_UNANSWERED`] pass; past that the next read fails; a flush starts again.
    #[test]
    fn pings_whose_pongs_are_not_written_fail_the_next_read() {
        let (gate, _) = admitted(1 << 20);
        let mut f = Follower::new(gate.clone(), 1 << 20);
        f.follow(UPGRADE).unwrap();
        let pings: Vec<u8> = (0..PINGS_UNANSWERED)
            .flat_map(|_| frame(true, 9, 1))
            .collect();
        f.follow(&pings).unwrap();
        f.check_pongs().unwrap();
        f.flushed();
        f.follow(&pings).unwrap();
        f.check_pongs().unwrap();
        f.follow(&frame(true, 9, 0)).unwrap();
        let e = f.check_pongs().unwrap_err();
        assert!(e.to_string().contains("does not read"), "{e}");
        assert_eq!(gate.failed(), Some(e.to_string().as_str()));
    }

    /// While the budget cannot cover a message, the follower is pending and the gate says
    /// stalled; once budget frees it is ready again.
    #[test]
    fn a_message_the_budget_cannot_cover_waits_and_says_stalled() {
        let (gate, budget) = admitted(1 << 20);
        let budget = budget.unwrap();
        let mut f = Follower::new(gate.clone(), 1 << 20);
        let hold = futures_util::FutureExt::now_or_never(budget.take(OTHER, 1 << 20))
            .unwrap()
            .unwrap();
        let mut stream = UPGRADE.to_vec();
        stream.extend(header(true, 2, 200_000));
        f.follow(&stream).unwrap();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(f.poll_budget(&mut cx).is_pending());
        assert!(gate.stalled());
        drop(hold);
        assert!(f.poll_budget(&mut cx).is_ready());
        assert!(!gate.stalled());
        assert_eq!(budget.available(), (1 << 20) - 200_000);
    }

    /// What the follower makes of a stream, frame by frame: a data message ended (its
    /// size), or a control frame ended (its opcode and size).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Message(u64),
        Control(u8, u64),
    }

    /// The follower's view of frame ends, read from its own state (its parsed header, where
    /// it is in the stream, its message size) while it is fed so that it stops at every
    /// frame's end: byte by byte through headers, a payload up to its last byte at once.
    /// Checks on the way that it refuses a data frame's header exactly when the message's
    /// data frames, summed independently, pass the cap (`max_frame`, and before admission
    /// the handshake cap), and that its message size and `partial` agree with that sum.
    #[derive(Debug, Default)]
    struct Watch {
        events: Vec<Event>,
        /// Data bytes of the message in progress (declared lengths, summed here).
        total: u64,
        /// The frame whose payload is passing: opcode, fin, length.
        frame: Option<(u8, bool, u64)>,
    }

    impl Watch {
        fn feed(&mut self, f: &mut Follower, mut bytes: &[u8]) -> io::Result<()> {
            let cap = if f.gate.admitted.load(Relaxed) {
                f.max_frame as u64
            } else {
                (f.max_frame as u64).min(HANDSHAKE_MAX_FRAME as u64)
            };
            while !bytes.is_empty() {
                let n = match f.at {
                    At::Payload { left, .. } if left > 1 => (left - 1).min(bytes.len() as u64),
                    _ => 1,
                } as usize;
                let before = f.at;
                let r = f.follow(&bytes[..n]);
                bytes = &bytes[n..];
                let header_done = matches!(before, At::Header { .. })
                    && (r.is_err() || matches!(f.at, At::Payload { .. } | At::Header { have: 0 }));
                let mut frame_done = matches!(before, At::Payload { left: 1, .. });
                if header_done {
                    let h = f.header;
                    let len = match h[1] & 0x7f {
                        126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                        127 => u64::from_be_bytes(h[2..10].try_into().unwrap()),
                        n => u64::from(n),
                    };
                    let (opcode, fin) = (h[0] & 0x0f, h[0] & 0x80 != 0);
                    if opcode < 8 {
                        self.total = self.total.saturating_add(len);
                        assert_eq!(
                            r.is_err(),
                            self.total > cap,
                            "refused iff the message passes the cap ({} of {cap})",
                            self.total
                        );
                    } else {
                        assert!(r.is_ok(), "control frames are never refused");
                    }
                    r?;
                    if opcode < 8 && len > 0 {
                        assert_eq!(f.message, self.total, "its message size");
                    }
                    self.frame = Some((opcode, fin, len));
                    frame_done = len == 0;
                } else {
                    r?;
                }
                if frame_done {
                    assert_eq!(f.at, At::Header { have: 0 });
                    let (opcode, fin, len) = self.frame.take().expect("a frame ended");
                    if opcode >= 8 {
                        self.events.push(Event::Control(opcode, len));
                    } else if fin {
                        self.events.push(Event::Message(self.total));
                        self.total = 0;
                        assert_eq!(f.message, 0);
                        assert!(!f.gate.partial(), "a message ended");
                    } else {
                        assert!(f.gate.partial(), "a message in progress");
                    }
                }
            }
            Ok(())
        }
    }

    /// Feeds `bytes` to two followers: one in the pieces `splits` cuts (cycled), the other
    /// through a [`Watch`] — in step, piece by piece, their states the same after each.
    /// Returns the watch and whether the stream was refused.
    fn follow_both(
        gate: impl Fn() -> Arc<WsGate>,
        max_frame: usize,
        bytes: &[u8],
        splits: &[usize],
    ) -> (Watch, bool) {
        let (mut a, mut b) = (
            Follower::new(gate(), max_frame),
            Follower::new(gate(), max_frame),
        );
        // The upgrade's parse cap depends on the split by nature (tested on its own); the
        // ping count before Welcome is tested on its own.
        a.upgrade_parse_max = usize::MAX;
        b.upgrade_parse_max = usize::MAX;
        a.pings_before_welcome_max = u32::MAX;
        b.pings_before_welcome_max = u32::MAX;
        let mut w = Watch::default();
        let (mut at, mut i) = (0, 0);
        while at < bytes.len() {
            let n = splits[i % splits.len()].min(bytes.len() - at);
            i += 1;
            let piece = &bytes[at..at + n];
            at += n;
            let (ra, rb) = (a.follow(piece), w.feed(&mut b, piece));
            assert_eq!(ra.is_err(), rb.is_err(), "refused in either split alike");
            if ra.is_err() {
                assert_eq!(a.gate.refused(), b.gate.refused());
                assert!(a.gate.refused().unwrap() > 0);
                return (w, true);
            }
            assert_eq!(
                (a.at, a.message, a.covered, a.turn_frames, a.turn_bytes),
                (b.at, b.message, b.covered, b.turn_frames, b.turn_bytes),
                "the same state after {at} bytes whatever the split"
            );
            assert_eq!(a.gate.partial(), b.gate.partial());
        }
        (w, false)
    }

    /// A client frame: header (length in its shortest form, or `wide`r: 1 at least 16
    /// bits, 2 at 64 bits), mask, masked payload of `len` bytes of `fill`.
    fn masked(fin: bool, opcode: u8, len: usize, wide: u8, mask: [u8; 4], fill: u8) -> Vec<u8> {
        let mut h = vec![u8::from(fin) << 7 | opcode];
        if len <= 125 && wide == 0 {
            h.push(0x80 | len as u8);
        } else if len <= 0xffff && wide < 2 {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&(len as u64).to_be_bytes());
        }
        h.extend_from_slice(&mask);
        h.extend((0..len).map(|i| fill ^ mask[i % 4]));
        h
    }

    /// What tungstenite (the relay's configuration of it, `ws_config`) reads from the same
    /// frames as a server: its messages and control frames, and whether it stopped on a
    /// message over its limits.
    fn tungstenite_reads(frames: &[u8], max_frame: usize) -> (Vec<Event>, bool) {
        use tokio_tungstenite::tungstenite::{error::Error, protocol::Role, Message, WebSocket};
        struct Src<'a>(&'a [u8]);
        impl io::Read for Src<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.read(buf)
            }
        }
        impl io::Write for Src<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let config = super::super::ws::ws_config(max_frame);
        let mut ws = WebSocket::from_raw_socket(Src(frames), Role::Server, Some(config));
        let mut events = Vec::new();
        loop {
            match ws.read() {
                Ok(Message::Binary(b)) => events.push(Event::Message(b.len() as u64)),
                Ok(Message::Text(t)) => events.push(Event::Message(t.len() as u64)),
                Ok(Message::Ping(p)) => events.push(Event::Control(9, p.len() as u64)),
                Ok(Message::Pong(p)) => events.push(Event::Control(10, p.len() as u64)),
                Ok(other) => panic!("not sent: {other:?}"),
                Err(Error::Capacity(_)) => return (events, true),
                Err(Error::Io(_) | Error::Protocol(_) | Error::ConnectionClosed) => {
                    return (events, false)
                }
                Err(e) => panic!("tungstenite: {e}"),
            }
        }
    }

    /// A fragment: its length, header form, mask, and the pings (true) or pongs after it.
    type Fragment = (usize, u8, [u8; 4], Vec<(bool, usize)>);

    fn fragment() -> impl proptest::strategy::Strategy<Value = Fragment> {
        use proptest::prelude::*;
        (
            prop_oneof![6 => 0usize..200, 1 => 100usize..70_000],
            0u8..3,
            any::<[u8; 4]>(),
            proptest::collection::vec((any::<bool>(), 0usize..=125), 0..3),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1000))]

        /// Valid client frame sequences — messages of random sizes, masked, fragmented,
        /// with pings and pongs between fragments and messages, lengths in every header
        /// form — split anywhere: the follower's view of where messages and control frames
        /// end, and of their sizes, is tungstenite's own, and it refuses a stream exactly
        /// when tungstenite stops on a message over `max_frame` (at the header that takes
        /// the message over, so before tungstenite's next event).
        #[test]
        fn the_follower_sees_the_messages_tungstenite_reads(
            messages in proptest::collection::vec(
                (proptest::bool::ANY, proptest::collection::vec(fragment(), 1..4)),
                0..8,
            ),
            cap in (proptest::bool::ANY, proptest::prelude::any::<proptest::sample::Index>(), -1i64..=1),
            splits in proptest::prop_oneof![
                proptest::collection::vec(1usize..8, 1..20),
                proptest::collection::vec(1usize..5000, 1..20),
            ],
        ) {
            // max_frame: 1 MiB (all pass), or one of the messages' sizes, one less or more
            // — at least 125 (tungstenite holds control frames to max_frame too, and the
            // relay's is far larger).
            let sizes: Vec<u64> = messages
                .iter()
                .map(|(_, frags)| frags.iter().map(|f| f.0 as u64).sum())
                .collect();
            let max_frame = match cap {
                (false, i, d) if !sizes.is_empty() => (*i.get(&sizes) as i64 + d).max(125) as usize,
                _ => 1 << 20,
            };
            let mut frames = Vec::new();
            for (text, frags) in &messages {
                for (i, (len, wide, mask, controls)) in frags.iter().enumerate() {
                    let opcode = match (i, text) {
                        (0, true) => 1,
                        (0, false) => 2,
                        _ => 0,
                    };
                    frames.extend(masked(i + 1 == frags.len(), opcode, *len, *wide, *mask, b'a'));
                    for &(ping, n) in controls {
                        frames.extend(masked(true, if ping { 9 } else { 10 }, n, 0, *mask, 0));
                    }
                }
            }
            let (theirs, too_large) = tungstenite_reads(&frames, max_frame);
            let mut stream = UPGRADE.to_vec();
            stream.extend_from_slice(&frames);
            let admitted = || {
                let g = WsGate::new(None, ADDR);
                g.admit();
                g
            };
            let (ours, refused) = follow_both(admitted, max_frame, &stream, &splits);
            proptest::prop_assert_eq!(&ours.events, &theirs);
            proptest::prop_assert_eq!(refused, too_large);
        }

        /// Arbitrary bytes (after an upgrade request, or from the first byte), split
        /// anywhere, admitted or not, with any `max_frame`: the follower never panics,
        /// its state does not depend on the split, and it never lets a data frame's header
        /// pass when the message's frames declare more than the cap (checked by `Watch`).
        #[test]
        fn arbitrary_bytes_never_pass_a_frame_over_the_cap(
            upgrade in proptest::bool::ANY,
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(vec![0x00, 0x01, 0x02, 0x09, 0x80, 0x81, 0x82, 0x89, 0x7e, 0x7f, 0xfe, 0xff]),
                ],
                0..2000,
            ),
            admit in proptest::bool::ANY,
            max_frame in proptest::prop_oneof![0usize..300, 0usize..70_000, proptest::strategy::Just(1usize << 20)],
            splits in proptest::collection::vec(1usize..64, 1..20),
        ) {
            let mut stream = if upgrade { UPGRADE.to_vec() } else { Vec::new() };
            stream.extend_from_slice(&bytes);
            let gate = || {
                let g = WsGate::new(None, ADDR);
                if admit {
                    g.admit();
                }
                g
            };
            follow_both(gate, max_frame, &stream, &splits);
        }
    }
}
