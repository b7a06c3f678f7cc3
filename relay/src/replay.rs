//! The history task of a replaying subscription: waits until the store holds everything
//! up to the boundary, reads matching stored messages in chunks off the runtime, queues
//! them (`Msg` with `REPLAYED`) paced by the connection's queue, then releases the
//! subscription's gate (see `router`).

use std::sync::Arc;
use std::time::Instant;

use whispeer_protocol::frame::{msg_flags, ErrFrame, Replay, ReplayDone};
use whispeer_protocol::{codec, Frame, TokenPattern};

use crate::ids::Seq;
use crate::relay::Shared;
use crate::router::{history_frame, Target};
use crate::store::{Admission, StoreError, Tenant};

/// Sends history for `target` and opens its gate. `done_frame`: send `ReplayDone`. The
/// reads run in `tenant`'s turn on the store-reader thread (a full tenant queue fails the
/// history with the retryable `busy`).
pub(crate) async fn history(
    shared: Arc<Shared>,
    tenant: Tenant,
    target: Arc<Target>,
    pattern: TokenPattern,
    replay: Replay,
    boundary: Seq,
    done_frame: bool,
) {
    let sub_id = target.sub.0;
    let count = match send(&shared, &tenant, &target, pattern.clone(), replay, boundary).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(conn = %target.conn, sub_id, error = %e, "history read failed");
            shared.metrics.error_sent(e.code());
            target
                .out
                .push_control(codec::encode_prefixed(&Frame::Err(ErrFrame {
                    code: e.code(),
                    message: format!("history unavailable: {e}"),
                    fatal: false,
                    sub_id: Some(sub_id),
                    publish_id: None,
                })));
            0
        }
    };
    let done = done_frame.then(|| done(sub_id, boundary, count));
    open_gate(&shared, &tenant, &target, &pattern, done).await;
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
    let mut count = 0u64;
    let store = shared.router.store().clone();
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
    // In chunks, each queued whole and paced like history: a pattern may match many large
    // retained values, and a subscriber that does not read holds what was queued.
    let read = async {
        rx.await
            .map_err(|_| StoreError::Unavailable("store closed".into()))??;
        let mut from = 0;
        while from <= boundary.0 {
            if target.is_cancelled() || target.out.is_closing() {
                break;
            }
            let chunk = {
                let (store, pattern) = (store.clone(), pattern.clone());
                crate::store::read_off_runtime(&tenant, Admission::Capped, move || {
                    store.retained(&pattern, from, boundary)
                })
                .await?
            };
            for m in chunk.msgs {
                target.out.push_history(history_frame(
                    m.seq.0,
                    &m.envelope,
                    msg_flags::RETAINED,
                    target.sub.0,
                ));
                count += 1;
            }
            from = chunk.next;
            wait_room(&target).await;
        }
        Ok::<_, StoreError>(())
    };
    match read.await {
        Ok(()) => {}
        Err(e) => {
            tracing::warn!(conn = %target.conn, sub_id = target.sub.0, error = %e, "retained read failed");
            shared.metrics.error_sent(e.code());
            target
                .out
                .push_control(codec::encode_prefixed(&Frame::Err(ErrFrame {
                    code: e.code(),
                    message: format!("retained values unavailable: {e}"),
                    fatal: false,
                    sub_id: Some(target.sub.0),
                    publish_id: None,
                })));
        }
    }
    open_gate(
        &shared,
        &tenant,
        &target,
        &pattern,
        done_frame.then(|| done(target.sub.0, boundary, count)),
    )
    .await;
}

/// The `ReplayDone` frame that ends subscription `sub_id`'s history.
fn done(sub_id: u64, boundary: Seq, count: u64) -> bytes::Bytes {
    codec::encode_prefixed(&Frame::ReplayDone(ReplayDone {
        sub_id,
        seq: boundary.0,
        count,
    }))
}

async fn send(
    shared: &Arc<Shared>,
    tenant: &Tenant,
    target: &Arc<Target>,
    pattern: TokenPattern,
    replay: Replay,
    boundary: Seq,
) -> Result<u64, StoreError> {
    let store = shared.router.store().clone();
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
    rx.await
        .map_err(|_| StoreError::Unavailable("store closed".into()))??;
    let pattern = Arc::new(pattern);
    let plan = {
        let (store, pattern) = (store.clone(), pattern.clone());
        crate::store::read_off_runtime(tenant, Admission::Capped, move || {
            store.plan(&pattern, replay, boundary)
        })
        .await?
    };
    let plan = Arc::new(plan);
    let mut from = plan.start;
    let mut count = 0u64;
    while from <= boundary.0 {
        if target.is_cancelled() || target.out.is_closing() {
            return Ok(count);
        }
        let chunk = {
            let (store, pattern, plan) = (store.clone(), pattern.clone(), plan.clone());
            // One chunk per read job: a long replay takes many turns of the reader thread.
            crate::store::read_off_runtime(tenant, Admission::Capped, move || {
                store.read(&pattern, &plan, from, boundary)
            })
            .await?
        };
        let n = chunk.msgs.len() as u64;
        for m in chunk.msgs {
            if let Some(t) = &target.track {
                // Flow control: wait for credit (acks) instead of overrunning the client.
                while !t.try_deliver(m.seq.0, &m.envelope, Instant::now()) {
                    if target.is_cancelled() || target.out.is_closing() {
                        return Ok(count);
                    }
                    t.wait_credit(m.envelope.len(), std::time::Duration::from_millis(500))
                        .await;
                }
            }
            target.out.push_history(history_frame(
                m.seq.0,
                &m.envelope,
                msg_flags::REPLAYED,
                target.sub.0,
            ));
        }
        count += n;
        if let Some(t) = &target.track {
            t.history_at(chunk.next.saturating_sub(1).min(boundary.0));
        }
        shared.metrics.replayed(n);
        from = chunk.next;
        wait_room(target).await;
    }
    Ok(count)
}

/// Paces a history or retained-value sender after a chunk: waits until the subscriber's
/// queue has room (half empty, and within its share of the relay-wide budget).
async fn wait_room(target: &Target) {
    if !target.out.room() {
        tracing::debug!(conn = %target.conn, sub_id = target.sub.0, "history waits for room in the queue");
    }
    target.out.wait_room().await;
}
