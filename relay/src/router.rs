//! The router: the subscription index and the store behind one routing lock.
//!
//! One lock around "assign the sequence, then queue to every match" is what makes relay
//! sequence numbers reach every subscriber in increasing order, and makes `SubOk.seq`
//! exact: every message with a larger sequence is matched against the new subscription.
//! The critical section is short — a store append, one encode of the `Msg` frame, a trie
//! walk and non-blocking queue offers — and never waits on a socket.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use whispeer_protocol::frame::Msg;
use whispeer_protocol::{codec, Envelope, Frame, TokenPath, TokenPattern};

use crate::ids::{ConnId, Seq, SubId};
use crate::index::SubIndex;
use crate::metrics::Metrics;
use crate::outbound::{Offer, Outbound};
use crate::store::{Append, Store, StoreError};

#[derive(Debug)]
struct Core {
    index: SubIndex<Arc<Outbound>>,
    store: Arc<dyn Store>,
}

/// Subscriptions, sequence assignment and fan-out.
#[derive(Debug)]
pub(crate) struct Router {
    core: Mutex<Core>,
    metrics: Arc<Metrics>,
}

impl Router {
    pub(crate) fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            core: Mutex::new(Core {
                index: SubIndex::new(),
                store,
            }),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Index and store updates are each completed before any call that could panic, so a
        // poisoned lock still guards a consistent index.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a subscription and queues its `SubOk` (built by `reply` from the current last
    /// sequence) under the routing lock, so the `SubOk` precedes every message it matches.
    pub(crate) fn subscribe(
        &self,
        pattern: &TokenPattern,
        conn: ConnId,
        sub: SubId,
        out: &Arc<Outbound>,
        reply: impl FnOnce(Seq) -> Bytes,
    ) -> Offer {
        let mut core = self.lock();
        let seq = core.store.last_seq();
        let offer = out.push_control(reply(seq));
        if offer == Offer::Queued {
            core.index.insert(pattern, conn, sub, out.clone());
            self.metrics.subscribed();
        }
        offer
    }

    /// Removes one subscription; returns whether it existed.
    pub(crate) fn unsubscribe(&self, pattern: &TokenPattern, conn: ConnId, sub: SubId) -> bool {
        let removed = self.lock().index.remove(pattern, conn, sub);
        if removed {
            self.metrics.unsubscribed(1);
        }
        removed
    }

    /// Removes every subscription of a closing connection.
    pub(crate) fn unsubscribe_all<'a>(
        &self,
        conn: ConnId,
        subs: impl IntoIterator<Item = (SubId, &'a TokenPattern)>,
    ) {
        let mut core = self.lock();
        let mut n = 0;
        for (sub, pattern) in subs {
            n += core.index.remove(pattern, conn, sub) as usize;
        }
        drop(core);
        self.metrics.unsubscribed(n);
    }

    /// Accepts a publish: assigns its sequence, encodes one `Msg` frame and offers the same
    /// bytes to every matching connection (once per connection, however many of its
    /// subscriptions match). Returns the sequence.
    pub(crate) fn publish(
        &self,
        envelope: &Envelope,
        path: &TokenPath,
        flags: u64,
    ) -> Result<Seq, StoreError> {
        let start = Instant::now();
        let core = self.lock();
        let seq = core.store.append(Append {
            path,
            envelope,
            flags,
        })?;
        let frame = codec::encode_prefixed(&Frame::Msg(Msg {
            seq: seq.0,
            envelope: envelope.clone(),
            flags: 0,
        }));
        let mut targets: Vec<(ConnId, &Arc<Outbound>)> = Vec::new();
        core.index
            .for_each_match(path, |conn, out| targets.push((conn, out)));
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|(c, _)| *c);
            targets.dedup_by_key(|(c, _)| *c);
        }
        let (mut delivered, mut dropped) = (0, 0);
        for (_, out) in &targets {
            match out.offer_msg(&frame) {
                Offer::Queued => delivered += 1,
                Offer::DroppedOldest => {
                    delivered += 1;
                    dropped += 1;
                }
                Offer::Disconnected => self.metrics.slow_consumer_disconnect(),
                Offer::Closed => {}
            }
        }
        drop(targets);
        drop(core);
        self.metrics.published();
        self.metrics.delivered(delivered);
        if dropped > 0 {
            self.metrics.dropped(dropped);
        }
        self.metrics.routed(start.elapsed());
        Ok(seq)
    }

    /// The last sequence assigned.
    pub(crate) fn last_seq(&self) -> Seq {
        self.lock().store.last_seq()
    }
}
