//! The relay-wide budget of large frames being received (`limits.large_frame_budget`).
//!
//! A frame is buffered whole before it is handled, and a partial frame does not reset the
//! idle timer: without a budget, every connection could park one partial `max_frame`
//! (1 MiB by default) for `idle_ms` — 256 MiB from one source address at the default
//! per-address cap, 10 GiB at the global one. With it, a frame over [`FREE`] draws its
//! declared size from the budget when its length prefix arrives (over WebSocket, see
//! [`ws_gate`](super::ws_gate)) and gives it back when the frame is complete; while the budget cannot cover it the connection is not read
//! (backpressure, its idle timer suspended), and frames up to [`FREE`] never wait. The
//! memory held for partial frames stays under the budget plus [`FREE`] per connection.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Frames up to this size never take budget (almost every frame is far smaller).
pub const FREE: usize = 64 * 1024;

/// The budget, shared by every connection.
#[derive(Debug)]
pub struct FrameBudget {
    max: usize,
    bytes: Arc<Semaphore>,
    /// Times a frame had to wait for budget.
    waits: AtomicU64,
}

impl FrameBudget {
    /// `max` bytes of large frames in progress at once (0 = unlimited: no budget).
    pub fn new(max: usize) -> Option<Arc<Self>> {
        (max > 0).then(|| {
            let max = max.min(Semaphore::MAX_PERMITS);
            Arc::new(Self {
                max,
                bytes: Arc::new(Semaphore::new(max)),
                waits: AtomicU64::new(0),
            })
        })
    }

    /// Times a frame waited for budget so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Relaxed)
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The Prometheus lines of `budget` (zeros when unlimited).
    pub fn render_prometheus(budget: Option<&Self>) -> String {
        let (used, waits) = budget.map_or((0, 0), |b| (b.max - b.available(), b.waits()));
        format!(
            "# HELP whispeer_relay_frame_budget_bytes Bytes of large frames (over 64 KiB) being received, all connections (limits.large_frame_budget).\n\
             # TYPE whispeer_relay_frame_budget_bytes gauge\n\
             whispeer_relay_frame_budget_bytes {used}\n\
             # HELP whispeer_relay_frame_budget_waits_total Times a connection stopped being read until the large-frame budget could cover its next frame (backpressure).\n\
             # TYPE whispeer_relay_frame_budget_waits_total counter\n\
             whispeer_relay_frame_budget_waits_total {waits}\n"
        )
    }

    /// Budget for a frame of `len` bytes (`None` when it is small enough to need none);
    /// waits while the budget cannot cover it. Cancel-safe: nothing is held until it
    /// returns. `len` must not exceed the budget (the configuration checks
    /// `large_frame_budget >= max_frame`).
    pub async fn take(self: &Arc<Self>, len: usize) -> Option<OwnedSemaphorePermit> {
        if len <= FREE {
            return None;
        }
        self.take_exact(len).await
    }

    /// `n` bytes of budget whatever their size (a WebSocket message past [`FREE`] takes
    /// each further fragment's length); waits like [`take`](Self::take).
    pub async fn take_exact(self: &Arc<Self>, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if let Ok(p) = self.bytes.clone().try_acquire_many_owned(n) {
            return Some(p);
        }
        self.waits.fetch_add(1, Relaxed);
        // The semaphore is never closed.
        self.bytes.clone().acquire_many_owned(n).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn small_frames_take_nothing_and_large_ones_wait_for_the_budget() {
        let b = FrameBudget::new(3 * FREE).expect("a budget");
        assert!(b.take(FREE).await.is_none());
        let first = b.take(2 * FREE).await.expect("taken");
        assert_eq!(b.available(), FREE);
        // A second large frame cannot be covered: it waits, and counts as a wait.
        let mut second = Box::pin(b.take(2 * FREE));
        assert!(second.as_mut().now_or_never().is_none());
        assert_eq!(b.waits(), 1);
        // Small frames still go through.
        assert!(b.take(100).await.is_none());
        drop(first);
        let second = second.await.expect("taken once the first is done");
        assert_eq!(b.available(), FREE);
        drop(second);
        assert_eq!(b.available(), 3 * FREE);
        assert!(FrameBudget::new(0).is_none(), "0 = unlimited");
    }
}
