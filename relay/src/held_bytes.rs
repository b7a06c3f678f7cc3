//! A byte bound on what queued work holds in memory.
//!
//! A queue bounded by its count alone holds that many items of any size: 65,536 queued
//! envelopes of up to `max_frame` each are GiBs while their consumer (a disk, NATS) lags.
//! Each queued item carries a [`Held`] taken from the queue's [`ByteLimit`] and gives its
//! bytes back when dropped — answered, failed or discarded alike, so nothing leaks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The bytes held by one queue's items, and their bound.
#[derive(Debug)]
pub(crate) struct ByteLimit {
    held: AtomicU64,
    /// 0 = no bound.
    limit: u64,
}

impl ByteLimit {
    /// A bound of `limit` bytes (0 = none).
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU64::new(0),
            limit,
        })
    }

    /// Takes `n` bytes unless they would pass the bound; an item larger than the bound goes
    /// in when nothing else is held (so no item is refused forever).
    pub(crate) fn take(self: &Arc<Self>, n: u64) -> Option<Held> {
        let limit = self.limit;
        self.held
            .fetch_update(Relaxed, Relaxed, |held| {
                (limit == 0 || held == 0 || held + n <= limit).then_some(held + n)
            })
            .ok()?;
        Some(Held {
            limit: self.clone(),
            n,
        })
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }
}

/// Bytes one queued item holds; given back when it drops.
#[derive(Debug)]
pub(crate) struct Held {
    limit: Arc<ByteLimit>,
    n: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.limit.held.fetch_sub(self.n, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_within_the_bound_and_gives_back_on_drop() {
        let l = ByteLimit::new(100);
        let a = l.take(60).expect("fits");
        assert!(l.take(50).is_none(), "60 + 50 > 100");
        let b = l.take(40).expect("60 + 40 fits");
        assert_eq!(l.held(), 100);
        drop(a);
        assert_eq!(l.held(), 40);
        drop(b);
        let big = l.take(500).expect("alone, a larger item goes in");
        assert!(l.take(1).is_none());
        drop(big);
        assert_eq!(l.held(), 0);
        let unbounded = ByteLimit::new(0);
        let _x = unbounded.take(u64::MAX / 4).expect("no bound");
        let _y = unbounded.take(u64::MAX / 4).expect("no bound");
    }
}
