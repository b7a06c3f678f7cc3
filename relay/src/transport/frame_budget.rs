//! The relay-wide budget of large frames being received (`limits.large_frame_budget`).
//!
//! A frame is buffered whole before it is handled, and a partial frame does not reset the
//! idle timer: without a budget, every connection could park one partial `max_frame`
//! (1 MiB by default) for `idle_ms` — 256 MiB from one source address at the default
//! per-address cap, 10 GiB at the global one. With it, a frame over [`FREE`] draws its
//! declared size from the budget when its length prefix arrives (over WebSocket, see
//! [`ws_gate`](super::ws_gate)) and gives it back when the frame is complete; while the
//! budget cannot cover it the connection is not read (backpressure, its idle timer
//! suspended), and frames up to [`FREE`] never wait. The memory held for partial frames
//! stays under the budget plus [`FREE`] per connection.
//!
//! **Shares.** A declared length costs the client four bytes, so one source address with
//! many connections could otherwise announce large frames, never finish them, and hold the
//! whole budget until its idle timeouts — every other client's large frames waiting behind
//! it. So a source address may claim (hold, or queue for) at most its share of the budget:
//! the budget divided by the number of addresses claiming or waiting for budget *plus
//! one* — room is always left for one more address, so an address alone takes half, and a
//! newcomer finds budget free however long the others' partial frames take. An address
//! claiming nothing may always take one frame (a frame up to `max_frame` always fits,
//! whatever the share). An address over its share waits — its connections are not read,
//! as above — and its frames claim in the order they came, one at a time, so the wait
//! costs O(1) per frame. The share is a bound on one address, not a reservation: with
//! enough addresses the budget is still spent, and then frames wait in the order they came.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Frames up to this size never take budget (almost every frame is far smaller).
pub const FREE: usize = 64 * 1024;

/// The budget, shared by every connection.
#[derive(Debug)]
pub struct FrameBudget {
    max: usize,
    bytes: Arc<Semaphore>,
    /// Times a frame had to wait for budget.
    waits: AtomicU64,
    /// The source addresses claiming or waiting for budget.
    holders: Mutex<HashMap<IpAddr, Holder>>,
    /// Woken when an address stops claiming budget: every other address's share grows.
    grown: Notify,
}

/// One source address's part of the budget.
#[derive(Debug)]
struct Holder {
    /// Bytes its frames hold or are queued for.
    claimed: usize,
    /// Its frames waiting to claim.
    takers: usize,
    /// Its frames claim one at a time, in the order they came.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Woken when its claim shrinks (only the frame whose turn it is waits on it).
    freed: Arc<Notify>,
}

impl Holder {
    fn idle(&self) -> bool {
        self.claimed == 0 && self.takers == 0
    }
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
                holders: Mutex::new(HashMap::new()),
                grown: Notify::new(),
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

    /// The most one source address may claim while `active` addresses (itself included)
    /// claim or wait for budget: room is left for one more.
    fn share(&self, active: usize) -> usize {
        self.max / (active + 1)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Holder>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the frame's wait (once per frame) and says why.
    fn waiting(&self, waited: &mut bool, addr: IpAddr, n: usize, why: &'static str) {
        if !*waited {
            *waited = true;
            self.waits.fetch_add(1, Relaxed);
            tracing::debug!(bytes = n, %addr, why, "large frame waits for budget");
        }
    }

    /// `addr` claims `bytes` less: wakes its next frame, and forgets the address once it
    /// claims nothing (every other share grows).
    fn release(&self, addr: IpAddr, bytes: usize, taker: bool) {
        let forgotten = {
            let mut h = self.lock();
            let Some(e) = h.get_mut(&addr) else {
                return;
            };
            e.claimed = e.claimed.saturating_sub(bytes);
            if taker {
                e.takers = e.takers.saturating_sub(1);
            }
            if bytes > 0 {
                e.freed.notify_one();
            }
            e.idle() && h.remove(&addr).is_some()
        };
        if forgotten {
            self.grown.notify_waiters();
        }
    }

    /// The Prometheus lines of `budget` (zeros when unlimited).
    pub fn render_prometheus(budget: Option<&Self>) -> String {
        let (used, waits) = budget.map_or((0, 0), |b| (b.max - b.available(), b.waits()));
        format!(
            "# HELP whispeer_relay_frame_budget_bytes Bytes of large frames (over 64 KiB) being received, all connections (limits.large_frame_budget).\n\
             # TYPE whispeer_relay_frame_budget_bytes gauge\n\
             whispeer_relay_frame_budget_bytes {used}\n\
             # HELP whispeer_relay_frame_budget_waits_total Times a connection stopped being read until the large-frame budget could cover its next frame, or its source address was over its share of it (backpressure).\n\
             # TYPE whispeer_relay_frame_budget_waits_total counter\n\
             whispeer_relay_frame_budget_waits_total {waits}\n"
        )
    }

    /// `n` bytes of budget for one frame from source address `addr` (callers ask only for
    /// frames over [`FREE`]); waits while the address is over its share (see the module
    /// documentation) or the budget cannot cover it. Cancel-safe: nothing is held or
    /// claimed once the future is dropped. `n` must not exceed the budget (the
    /// configuration checks `large_frame_budget >= max_frame`).
    pub async fn take(self: &Arc<Self>, addr: IpAddr, n: usize) -> Option<Lease> {
        let permits = u32::try_from(n).unwrap_or(u32::MAX);
        let mut waited = false;
        // From here the address counts as waiting for budget (the others' shares shrink).
        let (turn, freed) = {
            let mut h = self.lock();
            let e = h.entry(addr).or_insert_with(|| Holder {
                claimed: 0,
                takers: 0,
                turn: Arc::new(tokio::sync::Mutex::new(())),
                freed: Arc::new(Notify::new()),
            });
            e.takers += 1;
            (e.turn.clone(), e.freed.clone())
        };
        let mut taker = Taker {
            budget: self,
            addr,
            armed: true,
        };
        let turn = match turn.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                self.waiting(
                    &mut waited,
                    addr,
                    n,
                    "its address's earlier frames go first",
                );
                turn.lock_owned().await
            }
        };
        let claim = loop {
            let grown = self.grown.notified();
            tokio::pin!(grown);
            {
                let mut h = self.lock();
                let share = self.share(h.len());
                let e = h.get_mut(&addr).expect("counted until claimed");
                if e.claimed == 0 || e.claimed + n <= share {
                    e.claimed += n;
                    e.takers -= 1;
                    taker.armed = false;
                    break Claim {
                        budget: self.clone(),
                        addr,
                        bytes: n,
                    };
                }
                // Woken when the address's claim shrinks, or the share grows (registered
                // before the lock goes, so a change after this check is not missed).
                grown.as_mut().enable();
                self.waiting(&mut waited, addr, n, "its address holds its share");
            }
            tokio::select! {
                _ = &mut grown => {}
                _ = freed.notified() => {}
            }
        };
        drop(turn);
        let permit = match self.bytes.clone().try_acquire_many_owned(permits) {
            Ok(p) => p,
            Err(_) => {
                self.waiting(&mut waited, addr, n, "the budget is spent");
                // The semaphore is never closed.
                self.bytes.clone().acquire_many_owned(permits).await.ok()?
            }
        };
        tracing::debug!(bytes = n, %addr, "large frame took budget");
        Some(Lease {
            permit: Some(permit),
            claim: Some(claim),
        })
    }
}

/// A frame waiting to claim: uncounted if dropped before it claims.
struct Taker<'a> {
    budget: &'a FrameBudget,
    addr: IpAddr,
    armed: bool,
}

impl Drop for Taker<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.budget.release(self.addr, 0, true);
        }
    }
}

/// What one frame claimed of its address's share (held, or queued for).
#[derive(Debug)]
struct Claim {
    budget: Arc<FrameBudget>,
    addr: IpAddr,
    bytes: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget.release(self.addr, self.bytes, false);
    }
}

/// Budget held for one frame, given back when dropped (the frame complete, or its
/// connection gone).
#[derive(Debug)]
pub struct Lease {
    permit: Option<OwnedSemaphorePermit>,
    claim: Option<Claim>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Given back first, then said: whoever reads the log line sees the budget back.
        drop(self.permit.take());
        if let Some(claim) = self.claim.take() {
            let bytes = claim.bytes;
            drop(claim);
            tracing::debug!(bytes, "large frame budget given back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 3));

    fn holders(b: &FrameBudget) -> usize {
        b.lock().len()
    }

    #[tokio::test]
    async fn large_frames_wait_for_the_budget_and_give_it_back() {
        let b = FrameBudget::new(3 * FREE).expect("a budget");
        let first = b.take(A, 2 * FREE).await.expect("taken");
        assert_eq!(b.available(), FREE);
        // A second large frame (another address's: within its share) cannot be covered:
        // it waits, and counts as a wait.
        let mut second = Box::pin(b.take(B, 2 * FREE));
        assert!(second.as_mut().now_or_never().is_none());
        assert_eq!(b.waits(), 1);
        drop(first);
        let second = second.await.expect("taken once the first is done");
        assert_eq!(b.available(), FREE);
        drop(second);
        assert_eq!(b.available(), 3 * FREE);
        assert_eq!(holders(&b), 0, "nothing claimed: no address remembered");
        assert!(FrameBudget::new(0).is_none(), "0 = unlimited");
    }

    /// One address alone claims at most half the budget (room for one more address), so
    /// another address's frame is covered at once however long the first one's partial
    /// frames take; an address over its share waits until its own frames give budget
    /// back, and its frames claim in the order they came.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share() {
        let b = FrameBudget::new(1200).expect("a budget");
        // Alone, A's share is 600: one frame of 400 and a second would be 800.
        let a1 = b.take(A, 400).now_or_never().unwrap().unwrap();
        let mut a2 = Box::pin(b.take(A, 400));
        assert!(
            a2.as_mut().now_or_never().is_none(),
            "over its share: waits"
        );
        assert_eq!(b.waits(), 1);
        // A third frame of A's waits behind the second (counted once).
        let mut a3 = Box::pin(b.take(A, 300));
        assert!(a3.as_mut().now_or_never().is_none());
        assert!(a3.as_mut().now_or_never().is_none());
        assert_eq!(b.waits(), 2);
        // B claims nothing yet: covered at once, out of the 800 A left free.
        let b1 = b.take(B, 700).now_or_never().unwrap().unwrap();
        assert_eq!(b.available(), 100);
        assert_eq!(b.waits(), 2);
        // B's frame done: A's share grows back to 600, still not enough for 800.
        drop(b1);
        assert!(a2.as_mut().now_or_never().is_none());
        // A's first frame done: its second claims (alone, nothing claimed: always fits).
        drop(a1);
        let a2 = a2.now_or_never().unwrap().unwrap();
        // ...and its third, 400 + 300 > 600, waits for it.
        assert!(a3.as_mut().now_or_never().is_none());
        drop(a2);
        let a3 = a3.now_or_never().unwrap().unwrap();
        assert_eq!(b.available(), 900);
        drop(a3);
        assert_eq!((b.available(), holders(&b)), (1200, 0));
    }

    /// A frame from an address that claims nothing always fits its share (a single frame
    /// up to the whole budget), and the shares shrink as addresses arrive: with A and B
    /// claiming, C's share is a quarter.
    #[tokio::test]
    async fn shares_shrink_as_addresses_arrive_and_a_first_frame_always_fits() {
        let b = FrameBudget::new(1200).expect("a budget");
        let whole = b.take(A, 1200).now_or_never().unwrap().unwrap();
        drop(whole);
        let a = b.take(A, 200).now_or_never().unwrap().unwrap();
        let bb = b.take(B, 200).now_or_never().unwrap().unwrap();
        let c1 = b.take(C, 300).now_or_never().unwrap().unwrap();
        // C: 300 + 100 > 1200 / 4.
        let mut c2 = Box::pin(b.take(C, 100));
        assert!(c2.as_mut().now_or_never().is_none());
        // A leaves: two addresses claim, C's share is 1200 / 3 = 400 and its second frame
        // fits.
        drop(a);
        let c2 = c2.now_or_never().unwrap().unwrap();
        drop((bb, c1, c2));
        assert_eq!((b.available(), holders(&b)), (1200, 0));
    }

    /// Dropping a frame's take at any point (waiting for its turn, over its share, or for
    /// the budget) leaves nothing claimed or counted.
    #[tokio::test]
    async fn a_cancelled_take_leaves_nothing_behind() {
        let b = FrameBudget::new(1000).expect("a budget");
        let a1 = b.take(A, 500).now_or_never().unwrap().unwrap();
        let mut over_share = Box::pin(b.take(A, 100));
        assert!(over_share.as_mut().now_or_never().is_none());
        let mut behind = Box::pin(b.take(A, 100));
        assert!(behind.as_mut().now_or_never().is_none());
        let b1 = b.take(B, 500).now_or_never().unwrap().unwrap();
        // C's first frame fits its share but not the budget.
        let mut no_budget = Box::pin(b.take(C, 300));
        assert!(no_budget.as_mut().now_or_never().is_none());
        drop((over_share, behind, no_budget));
        {
            let h = b.lock();
            assert_eq!(h.len(), 2, "C forgotten");
            assert_eq!((h[&A].claimed, h[&A].takers), (500, 0));
        }
        drop((a1, b1));
        assert_eq!((b.available(), holders(&b)), (1000, 0));
    }
}
