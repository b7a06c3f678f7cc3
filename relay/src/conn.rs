//! Drives one connection over any transport: the reader loop feeding the [`Session`], the
//! writer task draining the [`Outbound`] queue in coalesced batches, timeouts, and the
//! orderly end (drain with a deadline, then close).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{sleep_until, Instant};
use whispeer_protocol::frame::Gap;
use whispeer_protocol::{codec, Frame};

use crate::handshakes::Ticket;
use crate::ids::TransportKind;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::rate::AddrSlot;
use crate::relay::Shared;
use crate::session::{Flow, Session};
use crate::transport::{FrameSink, FrameSource, Inbound};

/// Serves one connection until it ends. Never panics on client input; returns when both
/// directions are finished (or the drain deadline passed). `since`: when its transport
/// handshake began (TLS, WebSocket upgrade, QUIC) — `hello_ms` counts from then, once for
/// the whole handshake, not again per phase; `None`: now. Returns the connection's address
/// slot: a transport whose connection outlives its frames (QUIC's drain) keeps it counted
/// against its source address's caps until the connection is gone.
pub(crate) async fn serve<Src: FrameSource, Snk: FrameSink>(
    shared: Arc<Shared>,
    mut source: Src,
    sink: Snk,
    transport: TransportKind,
    peer: Option<SocketAddr>,
    slot: Option<AddrSlot>,
    since: Option<Instant>,
) -> Option<AddrSlot> {
    let cfg = &shared.config;
    let out = Arc::new(Outbound::new(
        cfg.queue.capacity,
        cfg.queue.max_bytes,
        cfg.queue.slow_consumer,
        shared.budget.clone(),
    ));
    // A connection with no address slot (served by an embedder, `RelayHandle::serve`)
    // counts for the eviction's fair share in its peer's network, as a listener's does;
    // in-process ones (no peer) share one.
    let ticket = slot.as_ref().map(|s| s.ticket().clone()).or_else(|| {
        peer.map(|p| {
            let net = shared.addr_table.network_of(p.ip());
            shared
                .handshakes
                .ticket(Some(net), std::time::Instant::now())
        })
    });
    let (conn, admitted, ticket) =
        shared
            .registry
            .register(&out, cfg.limits.max_connections, ticket);
    let _registration = shared.registry.guard(conn, admitted, ticket.clone());
    let keepalive = match transport {
        TransportKind::Ws | TransportKind::Wss => cfg.timeouts.heartbeat(),
        _ => None,
    };
    // Beside the reader: on the light runtime it moves when the reader does (`hop`).
    let mut writer = crate::hop::spawn(write_loop(
        sink,
        out.clone(),
        shared.metrics.clone(),
        keepalive,
    ));
    let started = since.unwrap_or_else(Instant::now);
    let mut session = Session::new(
        shared.clone(),
        conn,
        transport,
        peer,
        out.clone(),
        started.into_std(),
        slot,
    );
    session.set_ticket(ticket.clone());

    let mut source_closed = false;
    if !admitted {
        session.refuse_over_limit();
    } else if ticket.is_evicted() {
        // Evicted during its transport handshake (a newer connection took its place).
        session.evicted();
    } else {
        source_closed = read_loop(&shared, &mut source, &mut session, &out, started, &ticket).await;
    }
    // No new messages for this connection from here on.
    session.finish();

    // Drain: let the writer send what is queued (ending with the Err/Close frame that
    // explains the close), and keep reading and discarding input meanwhile so the kernel
    // does not answer unread bytes with a reset that could destroy those last frames.
    // An evicted connection — evicted before the drain or during it (one not yet welcomed
    // stays evictable while it drains: after a Hello timeout, a refused Hello, any fatal
    // Err before Welcome) — gets no more than `EVICTED_CLOSE` from its eviction: its place
    // already went to a newer one and its socket lingers beyond `max_connections` (up to
    // `handshakes::ceiling`), so it is closed then, whether or not its peer closed — a
    // stranger that never reads nor closes must not keep each evicted socket for the
    // whole drain. Nor for the rest of that second once its `Err` is written: a peer that
    // never closes would hold each evicted socket the whole second, and enough evictions
    // a second (16 from one address with `max_connections` 100) filled the lingering
    // places up to the ceiling, where everyone is refused — honest newcomers too. So once
    // its writer is done, what it has sent that is readable now is discarded (no reset
    // for unread bytes to destroy the `Err` on its way) and it is closed; `EVICTED_CLOSE`
    // bounds the writer. Until then it is read, as any drain.
    let evicted_close = crate::handshakes::EVICTED_CLOSE.min(cfg.timeouts.drain());
    let mut evicted = ticket.is_evicted();
    let deadline = sleep_until(
        Instant::now()
            + if evicted {
                evicted_close
            } else {
                cfg.timeouts.drain()
            },
    );
    tokio::pin!(deadline);
    let eviction = ticket.evicted();
    tokio::pin!(eviction);
    let mut writer_done = false;
    while !(writer_done && source_closed) {
        if writer_done && evicted {
            discard_readable(&mut source);
            break;
        }
        tokio::select! {
            _ = &mut writer, if !writer_done => writer_done = true,
            ev = source.recv(), if !source_closed => {
                if matches!(ev, Inbound::Closed) {
                    source_closed = true;
                }
            }
            () = &mut eviction, if !evicted => {
                evicted = true;
                let sooner = Instant::now() + evicted_close;
                if sooner < deadline.deadline() {
                    deadline.as_mut().reset(sooner);
                }
            }
            () = &mut deadline => break,
        }
    }
    if !writer_done {
        writer.abort();
    }
    session.take_slot()
}

/// Most `recv` calls [`discard_readable`] makes: each handles at most one socket read or
/// one frame of at most `HANDSHAKE_MAX_FRAME` (an evicted connection was never welcomed),
/// so an evicted peer that keeps sending costs the relay a bounded amount before its close.
const DISCARD_MAX: usize = 256;

/// Reads and discards what `source` has ready now, without waiting, until it would wait
/// or ends (at most [`DISCARD_MAX`] events): closing a socket with unread input makes the
/// kernel send a reset, which can destroy the last frames on their way to the peer.
fn discard_readable<Src: FrameSource>(source: &mut Src) {
    use futures_util::FutureExt;
    for _ in 0..DISCARD_MAX {
        match source.recv().now_or_never() {
            None | Some(Inbound::Closed) => return,
            Some(_) => {}
        }
    }
}

/// Frames one connection handles before it lets other tasks run. (Over WebSocket, the
/// frames that end no message — fragments, pings between them — never reach this loop:
/// the follower under tungstenite holds them to the same bounds, see
/// [`ws_gate`](crate::transport::ws_gate).)
pub(crate) const FRAMES_PER_TURN: usize = 16;
/// Bytes of frames one connection handles before it lets other tasks run (a frame larger
/// than this is handled alone in its turn). A turn costs the relay about what its bytes
/// cost to decode, copy and store, so a connection of 4 KiB frames gets 4 per turn, one of
/// 1 KiB frames still 16.
pub(crate) const BYTES_PER_TURN: usize = 16 << 10;

/// Reads until the session asks to close, the queue closes elsewhere, the relay shuts
/// down, or a timeout fires. Returns whether the source reached its end.
async fn read_loop<Src: FrameSource>(
    shared: &Shared,
    source: &mut Src,
    session: &mut Session,
    out: &Outbound,
    started: Instant,
    ticket: &Ticket,
) -> bool {
    let t = &shared.config.timeouts;
    let (hello, idle) = (t.hello(), t.idle());
    let mut closing = out.closing_signal();
    let mut shutdown = shared.shutdown.subscribe();
    // Created once and kept pinned: re-creating them per frame would re-register wakers
    // (a lock each) on every iteration of the hot loop.
    let closing = closing.wait_for(|c| *c);
    let shutdown = shutdown.wait_for(|s| *s);
    // Until welcomed, a newer connection may evict this one when the relay is full.
    let evicted = ticket.evicted();
    tokio::pin!(closing, shutdown, evicted);
    let mut last_in = started;
    let deadline = sleep_until(started + hello);
    tokio::pin!(deadline);
    // Redelivery of unacknowledged QoS >= 1 messages, checked a few times per ack timeout.
    let period = (shared.config.delivery.ack_timeout() / 4)
        .clamp(Duration::from_millis(5), Duration::from_secs(1));
    let mut redeliver = tokio::time::interval(period);
    redeliver.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut this_turn, mut turn_bytes) = (0usize, 0usize);
    // Full turns since the reader last waited for its socket: a connection on the light
    // runtime that floods moves to the main one after `hop::HOP_AFTER` of them (`hop`).
    // Only a wait ends the run, not a turn cut short at a partial frame: a flood's reads
    // end mid-frame as often as not.
    let (mut full_turns, mut waited) = (0u32, false);
    // Publish rate tokens charged for routing walks so far (`hop::WALK_TOKENS_TO_MOVE`).
    let mut walk_tokens = 0u64;
    // The time read for the last frame of an unbroken run of buffered frames (fast path).
    let mut run_clock: Option<Instant> = None;
    // Durable names whose cluster-wide hold the store lost (JetStream): the session ends
    // those subscriptions. The session makes the channel at its first durable subscription
    // and keeps a sender, so once taken this never ends early.
    let mut hold_lost = None;
    // The account list's reloads: the account lost a right or changed group, and the
    // session ends the subscriptions that no longer hold (taken after an authenticated
    // Welcome; a reload that revokes the credential closes the queue instead).
    let mut rights_changed = None;
    // Not reading because the connection's replies back up (`Outbound::replies_backed_up`):
    // the idle timer waits meanwhile, and the writer must move instead — `stall` is the
    // bytes it had written and when that count last moved. Only its progress counts, not
    // whether it holds a batch: a WebSocket writer blocked in its keepalive `Ping` (the
    // socket full, its last batch written) holds none, and the replies queued behind it
    // were never taken. Paused means the writer has not taken the replies, so it is blocked
    // on the socket: a peer that closes (a reset, with those bytes unread) fails its write,
    // and the queue's closing ends this loop at once.
    let mut paused = false;
    let mut stall = (0u64, started);
    // Whether the timer was re-armed for `idle_ms` once the session opened: armed for the
    // Hello deadline until then, it would otherwise first look at idleness at that deadline
    // — an `idle_ms` shorter than `hello_ms` was not applied before it (review: idle 1.5 s,
    // hello 10 s, closed after 10 s "for no traffic for 1500 ms").
    let mut idle_armed = false;
    loop {
        // Fairness: one read can hold dozens of frames, and tokio only charges its
        // cooperative budget per read, so a flooding connection could handle thousands of
        // frames before another task runs. Every frame costs a unit of the task's budget,
        // and every few frames — or every few KiB, whichever comes first — it yields
        // outright: the worst a flooder can do to everyone else is one short turn per
        // round. Counting bytes matters: every other connection waits a whole round of
        // the flooders' turns, and with 25 connections flooding 4 KiB publishes, 16 frames
        // a turn made that round 10–24 ms on two cores (the hostile bench's honest client
        // waited that long for its frames to be read; 16 KiB a turn cut it by half).
        this_turn += 1;
        let turn_over = this_turn > FRAMES_PER_TURN || turn_bytes >= BYTES_PER_TURN;
        // Subscribers' writers are woken once per turn, or as soon as the next frame is
        // not already buffered (the reader may wait for the socket): they then take the
        // turn's frames in one write (see `router::Wakes`).
        // Whether a whole frame is buffered (the next `recv` returns at once); nothing
        // below changes that before the frame is taken.
        let ready = source.ready();
        // Replies back up (the client's writer is blocked and it keeps asking): stop reading
        // until the writer takes them, so the client is slowed through the transport instead
        // of being disconnected at `queue.capacity` unread replies.
        if out.replies_backed_up() != paused {
            paused = !paused;
            if paused {
                out.count_reply_pause();
                stall = (out.write_progress(), Instant::now());
            } else {
                last_in = Instant::now();
            }
        }
        if turn_over || !ready || paused {
            session.flush_wakes();
        }
        if turn_over {
            run_clock = None;
            this_turn = 0;
            turn_bytes = 0;
            full_turns = full_turns.saturating_add(1);
            if full_turns == crate::hop::HOP_AFTER {
                // The yield below is where the task moves.
                crate::hop::request(crate::hop::Cause::Reading);
            }
            tokio::task::yield_now().await;
        } else {
            tokio::task::consume_budget().await;
        }
        // Within a turn, a frame already buffered is taken without polling the other
        // events (closing, shutdown, timers: each a watch or timer poll, ~400 instructions
        // a frame — callgrind, relay 1→1); they are polled at least once per turn.
        if !turn_over && ready && !paused {
            let ev = source.recv().await;
            // The clock as read for the frame before, in this same run of buffered frames
            // within one turn (usually microseconds ago; up to a scheduler round when the
            // cooperative budget yielded in between — every use of it fails safe: buckets
            // refill less, pauses keep their debt, the idle timer only runs early): a clock
            // read per frame was ~1 % of the relay's CPU routing 1 KiB publishes.
            let at = run_clock.take();
            if let Some(closed) = inbound(ev, source, session, &mut turn_bytes, &mut last_in, at) {
                return closed;
            }
            run_clock = Some(last_in);
        } else {
            run_clock = None;
            tokio::select! {
                biased;
                _ = &mut closing => {
                    session.closed_elsewhere();
                    return false;
                }
                _ = &mut shutdown => {
                    session.shutting_down();
                    return false;
                }
                _ = &mut evicted, if !session.is_open() => {
                    session.evicted();
                    return false;
                }
                // Before the source: a client whose bytes never stop (WebSocket pings need
                // no Hello) kept `recv` ready on every poll, and a biased select never got
                // to the timer, so its Hello deadline never came.
                _ = &mut deadline => {
                    let now = Instant::now();
                    if source.stalled() {
                        // Waiting for the relay's frame budget is not the client's idleness.
                        last_in = now;
                    }
                    let stuck = paused && session.is_open();
                    let due = if stuck {
                        // Not read meanwhile: not the client's idleness either. The last
                        // resort is a writer that writes nothing in `idle_ms` (a peer that
                        // reads nothing): closed as a slow consumer — whatever the writer is
                        // blocked in, a batch or its keepalive (test
                        // outbound_hostile::a_websocket_writer_blocked_in_its_keepalive_is_closed_when_replies_back_up).
                        last_in = now;
                        let done = out.write_progress();
                        if done != stall.0 {
                            stall = (done, now);
                        }
                        stall.1 + idle
                    } else if session.is_open() {
                        last_in + idle
                    } else {
                        started + hello
                    };
                    if now >= due {
                        if stuck {
                            shared.metrics.slow_consumer_disconnect();
                            out.close_unread_replies(t.idle_ms);
                            session.closed_elsewhere();
                        } else {
                            session.timed_out();
                        }
                        return false;
                    }
                    deadline.as_mut().reset(due);
                }
                _ = redeliver.tick(), if session.tracks() => {
                    if session.tick(Instant::now().into_std()) == Flow::Close {
                        return false;
                    }
                }
                Some((key, generation)) = recv_or_pending(&mut hold_lost) => {
                    if session.hold_lost(key, generation) == Flow::Close {
                        return false;
                    }
                }
                Some(()) = notice_or_pending(&mut rights_changed) => {
                    if session.rights_changed() == Flow::Close {
                        return false;
                    }
                }
                // The writer took the replies that backed up: read again.
                () = out.wait_replies(), if paused => {}
                // Last: a connection whose next frame is always there (a pipelining
                // client) would otherwise never reach the branches after it — its
                // redeliveries, the resumption of its paused subscriptions, the end of
                // subscriptions a reload took the rights of (test
                // hostile_flow::a_connection_that_never_stops_sending_still_gets_its_redeliveries).
                ev = noting_wait(source.recv(), &mut waited), if !paused => {
                    if std::mem::take(&mut waited) {
                        full_turns = 0;
                    }
                    if let Some(closed) = inbound(ev, source, session, &mut turn_bytes, &mut last_in, None) {
                        return closed;
                    }
                }
            }
        }
        if !idle_armed && session.is_open() {
            idle_armed = true;
            let due = last_in + idle;
            if due < deadline.deadline() {
                deadline.as_mut().reset(due);
            }
        }
        // Routing walks the session charged for (`rate::walk_tokens`): work frames and bytes
        // do not show. Counted in the turn, so a connection whose publishes are expensive to
        // match yields as often as one sending that many plain publishes; and counted over
        // the connection's life for the light runtime (`hop::WALK_TOKENS_TO_MOVE`), since a
        // paced expensive publisher never fills a turn.
        let walked = session.take_walk_tokens();
        if walked > 0 {
            this_turn = this_turn.saturating_add(usize::try_from(walked).unwrap_or(usize::MAX));
            walk_tokens = walk_tokens.saturating_add(walked);
            if walk_tokens >= crate::hop::WALK_TOKENS_TO_MOVE {
                // Moves at the turn's yield (the turn is over) or the next wait.
                crate::hop::request(crate::hop::Cause::Walking);
            }
        }
        if hold_lost.is_none() {
            hold_lost = session.take_hold_lost();
        }
        if rights_changed.is_none() {
            rights_changed = session.take_rights_changed();
        }
        while let Some(line) = session.deferred_line() {
            run_clock = None; // waited: read the clock again
            session.flush_wakes();
            // A claim this request made (or needs) is being synced by the auth-state
            // writer thread: stop reading until it is on disk, then answer the request.
            if let Some(mut durable) = shared.accounts.durable() {
                let synced = durable.wait_for(|n| *n >= line);
                if !unless_closed(session, closing.as_mut(), shutdown.as_mut(), synced).await {
                    return false;
                }
            }
            if session.resume_deferred() == Flow::Close {
                return false;
            }
        }
        // Over a rate limit: stop reading until the bucket refills (backpressure through
        // the socket), with the idle timer suspended meanwhile.
        if let Some(until) = session.take_pause() {
            // A connection over a limit is no light one: it waits (below) on the main
            // runtime, where it goes on once refilled (`hop`).
            crate::hop::request(crate::hop::Cause::Limited);
            run_clock = None;
            session.flush_wakes();
            shared.metrics.throttled();
            let refilled = sleep_until(Instant::from_std(until));
            if !unless_closed(session, closing.as_mut(), shutdown.as_mut(), refilled).await {
                return false;
            }
            last_in = Instant::now();
        }
    }
}

/// `fut`, noting in `waited` whether it had to wait (returned `Pending` at least once).
async fn noting_wait<F: Future>(fut: F, waited: &mut bool) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        let r = fut.as_mut().poll(cx);
        *waited |= r.is_pending();
        r
    })
    .await
}

/// Hands one event from the source to the session: `Some(closed)` when the session asks
/// to close (`closed`: the source reached its end). `at`: the time to use, when the caller
/// read the clock within this turn already; otherwise it is read here.
fn inbound<Src: FrameSource>(
    ev: Inbound,
    source: &mut Src,
    session: &mut Session,
    turn_bytes: &mut usize,
    last_in: &mut Instant,
    at: Option<Instant>,
) -> Option<bool> {
    if let Inbound::Frame(b) = &ev {
        *turn_bytes += b.len();
    }
    let closed = matches!(ev, Inbound::Closed);
    *last_in = at.unwrap_or_else(Instant::now);
    let was_open = session.is_open();
    if session.on_inbound(ev, last_in.into_std()) == Flow::Close {
        return Some(closed);
    }
    if !was_open && session.is_open() {
        source.admitted();
    }
    None
}

/// The next value of `rx`, or never while there is no receiver yet.
async fn recv_or_pending<T>(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next notice on `rx`, or never while there is no receiver yet.
async fn notice_or_pending(rx: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for `until`, unless the connection starts closing or the relay shuts down first:
/// then tells the session and returns false.
async fn unless_closed<C: Future, S: Future>(
    session: &mut Session,
    closing: Pin<&mut C>,
    shutdown: Pin<&mut S>,
    until: impl Future,
) -> bool {
    tokio::select! {
        biased;
        _ = closing => {
            session.closed_elsewhere();
            false
        }
        _ = shutdown => {
            session.shutting_down();
            false
        }
        _ = until => true,
    }
}

/// The most bytes of a batch the writer hands the sink at once (a frame larger goes alone):
/// its progress ([`Outbound::wrote`]) moves at least this often while the peer reads, so a
/// reader paused for replies does not take a large batch on a slow link for a stalled one
/// (an 8 MiB batch takes 45 s at ~1.5 Mbit/s; a slice, 64 KiB, at ~12 kbit/s).
pub(crate) const WRITE_SLICE: usize = 64 << 10;

/// Writes `frames` in slices of at most [`WRITE_SLICE`] bytes (whole frames), noting each
/// slice written in `out`'s progress. A batch within one slice is one `send`, as before.
async fn send_in_slices<Snk: FrameSink>(
    sink: &mut Snk,
    frames: &[Bytes],
    out: &Outbound,
) -> std::io::Result<()> {
    let mut at = 0;
    while at < frames.len() {
        let (mut end, mut bytes) = (at + 1, frames[at].len());
        while end < frames.len() && bytes + frames[end].len() <= WRITE_SLICE {
            bytes += frames[end].len();
            end += 1;
        }
        sink.send(&frames[at..end]).await?;
        out.wrote(bytes);
        at = end;
    }
    Ok(())
}

/// Drains the queue into the sink, one coalesced write per batch (in slices of at most
/// [`WRITE_SLICE`] bytes), sending `Gap` before a
/// batch that follows dropped messages, and transport keepalives when idle.
async fn write_loop<Snk: FrameSink>(
    mut sink: Snk,
    out: Arc<Outbound>,
    metrics: Arc<Metrics>,
    keepalive: Option<Duration>,
) {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut ticker = keepalive.map(|d| tokio::time::interval_at(Instant::now() + d, d));
    // Frames and bytes written since the queue last ran empty: a writer that stays behind
    // for `hop::HOP_AFTER` turns' worth of them (a heavy subscriber) moves its connection
    // off the light runtime, as a reader that fills its turns does (`hop`).
    let (mut behind_frames, mut behind_bytes) = (0usize, 0usize);
    loop {
        let taken = out.take(&mut batch);
        if taken.dropped > 0 {
            let gap = codec::encode_prefixed(&Frame::Gap(Gap {
                dropped: taken.dropped,
                sub_id: None,
            }));
            batch.insert(0, gap);
        }
        if !batch.is_empty() {
            let bytes = batch.iter().map(Bytes::len).sum();
            let hop = crate::hop::HOP_AFTER as usize;
            let was_behind =
                behind_frames >= hop * FRAMES_PER_TURN || behind_bytes >= hop * BYTES_PER_TURN;
            behind_frames += batch.len();
            behind_bytes += bytes;
            if !was_behind
                && (behind_frames >= hop * FRAMES_PER_TURN || behind_bytes >= hop * BYTES_PER_TURN)
            {
                crate::hop::request(crate::hop::Cause::Writing);
            }
            let sent = send_in_slices(&mut sink, &batch, &out).await;
            // Until here the batch counted against the relay-wide outbound budget.
            out.written(taken.msg_bytes);
            if sent.is_err() {
                break;
            }
            metrics.frames_out(batch.len(), bytes);
            batch.clear();
            if batch.capacity() > 4096 {
                batch.shrink_to(64);
            }
            if !taken.last {
                continue;
            }
        }
        if taken.last {
            sink.close().await;
            return;
        }
        // Caught up: the queue ran empty.
        (behind_frames, behind_bytes) = (0, 0);
        match ticker.as_mut() {
            Some(t) => {
                tokio::select! {
                    _ = out.wait() => {}
                    _ = t.tick() => {
                        if sink.keepalive().await.is_err() {
                            break;
                        }
                    }
                }
            }
            None => out.wait().await,
        }
        // Woken by the first frame queued: let the task that queued it (a publisher's
        // reader, routing a whole read) go on queueing before taking the batch.
        tokio::task::yield_now().await;
    }
    // The peer is gone: stop the reader too.
    out.close_with(None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::outbound::Budget;
    use tokio::sync::{mpsc, Semaphore};

    /// A sink that reports each `send`'s bytes and then waits for the test's permit: a
    /// peer that reads as the test says.
    struct Paced {
        calls: mpsc::UnboundedSender<usize>,
        go: Arc<Semaphore>,
    }

    impl FrameSink for Paced {
        async fn send(&mut self, frames: &[Bytes]) -> std::io::Result<()> {
            let _ = self.calls.send(frames.iter().map(Bytes::len).sum());
            self.go.acquire().await.expect("open").forget();
            Ok(())
        }
        async fn keepalive(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        async fn close(&mut self) {}
    }

    /// The writer's progress (what the last-resort close of a connection paused for its
    /// replies watches) moves in bytes, a slice of at most `WRITE_SLICE` at a time, within
    /// a batch: a 512 KiB batch to a slow peer shows progress after its first 64 KiB, not
    /// only once all of it is written (before, an 8 MiB batch on a link under ~1.5 Mbit/s
    /// showed none for over 45 s, and a subscriber there with replies backed up was closed
    /// as a slow consumer).
    #[tokio::test]
    async fn outbound_write_progress_moves_in_bytes_within_a_batch() {
        const FRAME: usize = 32 << 10;
        const FRAMES: usize = 16;
        let out = Arc::new(Outbound::new(
            4096,
            64 << 20,
            SlowConsumerPolicy::Drop,
            Arc::new(Budget::new(0)),
        ));
        for _ in 0..FRAMES {
            out.push_history(Bytes::from(vec![0; FRAME]));
        }
        let (tx, mut calls) = mpsc::unbounded_channel();
        let go = Arc::new(Semaphore::new(0));
        let sink = Paced {
            calls: tx,
            go: go.clone(),
        };
        let writer = tokio::spawn(write_loop(
            sink,
            out.clone(),
            Arc::new(Metrics::new()),
            None,
        ));
        let first = calls.recv().await.expect("a send");
        assert!(
            first <= WRITE_SLICE,
            "the first send is a slice of the {} KiB batch: {first} bytes",
            (FRAMES * FRAME) >> 10
        );
        assert_eq!(out.write_progress(), 0, "nothing written yet");
        go.add_permits(1);
        let second = calls.recv().await.expect("the next slice");
        assert_eq!(
            out.write_progress(),
            first as u64,
            "progress while the batch is still being written"
        );
        go.add_permits(FRAMES);
        let mut total = first + second;
        while total < FRAMES * FRAME {
            total += calls.recv().await.expect("the rest");
        }
        assert_eq!(total, FRAMES * FRAME, "every byte, once");
        writer.abort();
    }
}
