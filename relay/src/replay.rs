//! The history task of a replaying subscription: waits until the store holds everything
//! up to the boundary, reads matching stored messages in chunks off the runtime, queues
//! them (`Msg` with `REPLAYED`) paced by the connection's queue, then releases the
//! subscription's gate (see `router`).
//!
//! Before each read — the first one too — a sender reserves room for the chunk in the
//! connection's queue ([`Outbound::reserve_read`](crate::outbound::Outbound::reserve_read)):
//! the reservation counts like queued bytes until the chunk is queued, so all the senders
//! of a connection together hold at most `queue.max_bytes` and one chunk, within the
//! relay-wide budget. A QoS ≥ 1 sender reads no more than its credit allows and waits for
//! credit before it reserves and reads again, holding nothing (see `flow`). A sender whose
//! subscription is replaced or unsubscribed stops at once, and drops a chunk that was
//! being read meanwhile. (Each sender used to queue a chunk, up to ~2 MiB, before it
//! waited for room: a stranger's `Sub` flood on a connection that reads nothing held a
//! chunk per `Sub`.)

use std::sync::Arc;
use std::time::Instant;

use whispeer_protocol::frame::{msg_flags, ErrFrame, Replay, ReplayDone};
use whispeer_protocol::{codec, Frame, TokenPattern};

use crate::ids::Seq;
use crate::outbound::ReadHold;
use crate::relay::Shared;
use crate::router::{history_frame, Target};
use crate::store::{Admission, ReadLimit, ReadPlan, Store, StoreError, Tenant, READ_CHUNK_BYTES};

/// The history a `Sub` asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    /// Its replay.
    pub(crate) replay: Replay,
    /// `x` of its `Replay::FromSeq(x)` when it asked for retained values too and was
    /// granted `RETAINED_BEFORE`: the retained values below `x` come first.
    pub(crate) retained_before: Option<u64>,
}

/// Sends history for `target` — with `retained_before` (`x` of a `Replay::FromSeq(x)`,
/// granted `RETAINED_BEFORE`) the retained values older than `x` first — and opens its
/// gate. `done_frame`: send `ReplayDone` (its count covers both). The
/// reads run in `tenant`'s turn on the store-reader thread (a full tenant queue fails the
/// history with the retryable `busy`).
pub(crate) async fn history(
    shared: Arc<Shared>,
    tenant: Tenant,
    target: Arc<Target>,
    pattern: TokenPattern,
    asked: Asked,
    boundary: Seq,
    done_frame: bool,
) {
    let Asked {
        replay,
        retained_before,
    } = asked;
    let sub_id = target.sub.0;
    tracing::debug!(conn = %target.conn, sub_id, ?replay, ?retained_before, boundary = boundary.0,
        "history starts");
    let mut count = 0;
    // Granted `RETAINED_BEFORE` (with `Replay::FromSeq(x)`): the retained values older
    // than `x` first — the newer ones are in the history itself.
    if let Some(x) = retained_before {
        let before = Seq(x.saturating_sub(1).min(boundary.0));
        match send_retained(&shared, &tenant, &target, &pattern, before).await {
            Ok(n) => count += n,
            Err(e) => report(&shared, &target, &e, "retained values"),
        }
    }
    if !gone(&target) {
        match send(&shared, &tenant, &target, pattern.clone(), replay, boundary).await {
            Ok(n) => count += n,
            Err(e) => report(&shared, &target, &e, "history"),
        }
    }
    let done = done_frame.then(|| done(sub_id, boundary, count));
    open_gate(&shared, &tenant, &target, &pattern, done).await;
    tracing::debug!(conn = %target.conn, sub_id, count, "history sender ended");
}

/// A history or retained-value read failed: the subscription goes on live, and its client
/// is told with a non-fatal `Err` naming it.
fn report(shared: &Shared, target: &Target, e: &StoreError, what: &str) {
    tracing::warn!(conn = %target.conn, sub_id = target.sub.0, error = %e, "{what} read failed");
    shared.metrics.error_sent(e.code());
    target
        .out
        .push_control(codec::encode_prefixed(&Frame::Err(ErrFrame {
            code: e.code(),
            message: format!("{what} unavailable: {e}"),
            fatal: false,
            sub_id: Some(target.sub.0),
            publish_id: None,
        })));
}

/// Opens the subscription's gate (`Router::release`). A QoS ≥ 1 subscription whose gate
/// spilled (its live messages stayed in the store) is paused where it spilled: its
/// catch-up starts here if it has credit, else the ack that frees credit starts it.
async fn open_gate(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    target: &Arc<Target>,
    pattern: &TokenPattern,
    done: Option<bytes::Bytes>,
) {
    shared.router.release(target, done).await;
    if target.track.as_ref().is_some_and(|t| t.claim_catch_up()) {
        tokio::spawn(crate::flow::catch_up(
            shared.clone(),
            tenant.clone(),
            target.clone(),
            pattern.clone(),
        ));
    }
}

/// Sends the retained values of the paths `target` matches (sequence up to the boundary)
/// and opens its gate; newer values arrive live from the gate buffer. The read runs in
/// `tenant`'s turn on the store-reader thread. `done_frame` (`HISTORY_END` granted): end
/// them with `ReplayDone`, as a replay.
pub(crate) async fn retained(
    shared: Arc<Shared>,
    tenant: Tenant,
    target: Arc<Target>,
    pattern: TokenPattern,
    boundary: Seq,
    done_frame: bool,
) {
    let count = send_retained(&shared, &tenant, &target, &pattern, boundary)
        .await
        .unwrap_or_else(|e| {
            report(&shared, &target, &e, "retained values");
            0
        });
    open_gate(
        &shared,
        &tenant,
        &target,
        &pattern,
        done_frame.then(|| done(target.sub.0, boundary, count)),
    )
    .await;
    tracing::debug!(conn = %target.conn, sub_id = target.sub.0, count, "history sender ended");
}

/// Sends the retained values of the paths `target` matches whose sequence is at most
/// `boundary`, in sequence order, under the subscription's credit; returns how many.
async fn send_retained(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    target: &Arc<Target>,
    pattern: &TokenPattern,
    boundary: Seq,
) -> Result<u64, StoreError> {
    let store = shared.router.store().clone();
    if !readable(&store, target, pattern, boundary).await? {
        return Ok(0);
    }
    let pattern = Arc::new(pattern.clone());
    send_chunks(
        shared,
        tenant,
        target,
        &pattern,
        Source::Retained,
        0,
        boundary,
    )
    .await
}

/// The `ReplayDone` frame that ends subscription `sub_id`'s history.
fn done(sub_id: u64, boundary: Seq, count: u64) -> bytes::Bytes {
    codec::encode_prefixed(&Frame::ReplayDone(ReplayDone {
        sub_id,
        seq: boundary.0,
        count,
    }))
}

/// Sends the history `replay` asks for, up to `boundary`; returns how many messages.
async fn send(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    target: &Arc<Target>,
    pattern: TokenPattern,
    replay: Replay,
    boundary: Seq,
) -> Result<u64, StoreError> {
    let store = shared.router.store().clone();
    if !readable(&store, target, &pattern, boundary).await? {
        return Ok(0);
    }
    let pattern = Arc::new(pattern);
    let plan = {
        let (store, pattern) = (store.clone(), pattern.clone());
        crate::store::read_off_runtime(tenant, Admission::Capped, move || {
            store.plan(&pattern, replay, boundary)
        })
        .await?
    };
    let start = plan.start;
    let source = Source::History(Arc::new(plan));
    send_chunks(shared, tenant, target, &pattern, source, start, boundary).await
}

/// What a sender reads from the store.
#[derive(Clone)]
enum Source {
    /// A replay's history, by its plan (`REPLAYED`).
    History(Arc<ReadPlan>),
    /// The retained values (`RETAINED`).
    Retained,
}

/// Reads `source` from sequence `from` up to `boundary` in chunks and queues it, flagged
/// and naming the subscription; returns how many messages it queued. In chunks, each queued
/// whole and paced by the connection's queue: a pattern may match much, and a subscriber
/// that does not read holds what was queued. A QoS ≥ 1 subscription gets them under its
/// credit: each is in flight until acknowledged (redelivered if it is not), and the sender
/// waits for credit before it reserves and reads again, holding nothing (see `flow`), so a
/// client that does not ack holds up none of the connection's other senders. (Retained
/// values sent untracked beyond the credit were held back by the client for a redelivery
/// that never came.)
async fn send_chunks(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    target: &Arc<Target>,
    pattern: &Arc<TokenPattern>,
    source: Source,
    mut from: u64,
    boundary: Seq,
) -> Result<u64, StoreError> {
    let store = shared.router.store().clone();
    let (flag, what) = match source {
        Source::History(_) => (msg_flags::REPLAYED, "history"),
        Source::Retained => (msg_flags::RETAINED, "retained values"),
    };
    let mut count = 0u64;
    while from <= boundary.0 {
        if let Some(t) = &target.track {
            if !t.wait_allowance(target, None, what).await {
                break;
            }
        }
        let Some(mut hold) = read_turn(target).await else {
            break;
        };
        let limit = match &target.track {
            Some(t) => match t.allowance() {
                Some(limit) => limit,
                None => continue,
            },
            None => ReadLimit::CHUNK,
        };
        let chunk = {
            let (store, pattern, source) = (store.clone(), pattern.clone(), source.clone());
            // One chunk per read job: a long replay takes many turns of the reader thread.
            crate::store::read_off_runtime(tenant, Admission::Capped, move || match &source {
                Source::History(plan) => store.read_limited(&pattern, plan, from, boundary, limit),
                Source::Retained => store.retained_limited(&pattern, from, boundary, limit),
            })
            .await?
        };
        // Replaced, unsubscribed or closing during the read: the chunk goes.
        if gone(target) {
            break;
        }
        hold.resize(chunk.msgs.iter().map(|m| m.envelope.len()).sum());
        let mut n = 0u64;
        // A message the credit does not take after all (larger than the byte allowance, or
        // the connection's other subscriptions took its unacknowledged bytes): the rest is
        // dropped and read again from it once there is credit for it.
        let mut refused = None;
        for m in chunk.msgs {
            if let Some(t) = &target.track {
                if !t.try_deliver(m.seq.0, &m.envelope, Instant::now()) {
                    refused = Some((m.seq.0, m.envelope.len()));
                    break;
                }
            }
            let frame = history_frame(m.seq.0, &m.envelope, flag, target.sub.0);
            hold.push(frame, m.envelope.len());
            n += 1;
        }
        drop(hold);
        count += n;
        let next = refused.map_or(chunk.next, |(seq, _)| seq);
        if let Source::History(_) = source {
            if let Some(t) = &target.track {
                t.history_at(next.saturating_sub(1).min(boundary.0));
            }
            shared.metrics.replayed(n);
        }
        if let (Some((_, len)), Some(t)) = (refused, &target.track) {
            if !t.wait_allowance(target, Some(len), what).await {
                break;
            }
        }
        from = next;
    }
    Ok(count)
}

/// The subscription was replaced or unsubscribed, or its connection is closing.
fn gone(target: &Target) -> bool {
    target.is_cancelled() || target.out.is_closing()
}

/// Waits until the store holds every write of `pattern`'s key id up to `boundary`; false
/// when the subscription was cancelled first.
async fn readable(
    store: &Arc<dyn Store>,
    target: &Target,
    pattern: &TokenPattern,
    boundary: Seq,
) -> Result<bool, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Only this key id's queued writes must reach the file first: other tenants' backlog
    // never holds back this subscription (its live messages wait behind the gate).
    store.when_readable(
        pattern.key_id(),
        boundary,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    tokio::select! {
        r = rx => {
            r.map_err(|_| StoreError::Unavailable("store closed".into()))??;
            Ok(!target.is_cancelled())
        }
        () = target.cancelled() => Ok(false),
    }
}

/// Paces a history or retained-value sender before each read: waits until the
/// subscriber's queue has room for a chunk (see
/// [`Outbound::reserve_read`](crate::outbound::Outbound::reserve_read)) and reserves it.
/// `None` when the subscription is cancelled or the connection closes first.
async fn read_turn(target: &Target) -> Option<ReadHold> {
    if gone(target) {
        return None;
    }
    if !target.out.read_room(READ_CHUNK_BYTES) {
        tracing::debug!(conn = %target.conn, sub_id = target.sub.0, "history waits for room in the queue");
    }
    tokio::select! {
        hold = target.out.reserve_read(READ_CHUNK_BYTES) => hold.filter(|_| !target.is_cancelled()),
        () = target.cancelled() => None,
    }
}
