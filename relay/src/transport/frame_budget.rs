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

    /// `n` bytes of budget for one frame (callers ask only for frames over [`FREE`]);
    /// waits while the budget cannot cover it. Cancel-safe: nothing is held until it
    /// returns. `n` must not exceed the budget (the configuration checks
    /// `large_frame_budget >= max_frame`).
    pub async fn take(self: &Arc<Self>, n: usize) -> Option<Lease> {
        let permits = u32::try_from(n).unwrap_or(u32::MAX);
        let permit = match self.bytes.clone().try_acquire_many_owned(permits) {
            Ok(p) => p,
            Err(_) => {
                self.waits.fetch_add(1, Relaxed);
                tracing::debug!(bytes = n, "large frame waits for budget");
                // The semaphore is never closed.
                self.bytes.clone().acquire_many_owned(permits).await.ok()?
            }
        };
        tracing::debug!(bytes = n, "large frame took budget");
        Some(Lease {
            permit: Some(permit),
            bytes: n,
        })
    }
}

/// Budget held for one frame, given back when dropped (the frame complete, or its
/// connection gone).
#[derive(Debug)]
pub struct Lease {
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Given back first, then said: whoever reads the log line sees the budget back.
        drop(self.permit.take());
        tracing::debug!(bytes = self.bytes, "large frame budget given back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn large_frames_wait_for_the_budget_and_give_it_back() {
        let b = FrameBudget::new(3 * FREE).expect("a budget");
        let first = b.take(2 * FREE).await.expect("taken");
        assert_eq!(b.available(), FREE);
        // A second large frame cannot be covered: it waits, and counts as a wait.
        let mut second = Box::pin(b.take(2 * FREE));
        assert!(second.as_mut().now_or_never().is_none());
        assert_eq!(b.waits(), 1);
        drop(first);
        let second = second.await.expect("taken once the first is done");
        assert_eq!(b.available(), FREE);
        drop(second);
        assert_eq!(b.available(), 3 * FREE);
        assert!(FrameBudget::new(0).is_none(), "0 = unlimited");
    }
}
