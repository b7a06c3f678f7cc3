//! Seeded randomness and the reconnect backoff policy. The engine never asks the OS for
//! randomness: publish ids and backoff jitter come from a seed the driver passes in (from
//! the OS RNG in production, a constant in tests), so the same inputs give the same outputs.

use rand_core::{CryptoRng, RngCore};

/// A deterministic CSPRNG: the BLAKE3 extendable output keyed with the seed (a PRF in
/// counter mode). Unpredictable to anyone without the seed.
#[derive(Clone)]
pub struct SeededRng(blake3::OutputReader);

impl SeededRng {
    /// The stream of `seed`.
    pub fn new(seed: &[u8; 32]) -> Self {
        let mut h = blake3::Hasher::new_keyed(seed);
        h.update(b"whispeer/v2/engine-rng");
        SeededRng(h.finalize_xof())
    }

    /// A uniform value in `0..=max` (rejection sampling: no modulo bias).
    pub fn up_to(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        let n = max + 1;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

impl std::fmt::Debug for SeededRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeededRng(..)")
    }
}

impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

impl CryptoRng for SeededRng {}

/// The one reconnect policy: exponential backoff with equal jitter. The delay before
/// attempt `n` (0-based) is uniform in `[d/2, d]` with `d = min(max, initial·2ⁿ)`, in whole
/// milliseconds (integer arithmetic, so every driver computes the same deadlines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// First delay (ms).
    pub initial_ms: u64,
    /// Largest delay (ms).
    pub max_ms: u64,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 50,
            max_ms: 5_000,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// A policy.
    pub fn new(initial_ms: u64, max_ms: u64, max_attempts: Option<u32>) -> Self {
        Backoff {
            initial_ms,
            max_ms,
            max_attempts,
        }
    }

    /// The delay before attempt `attempt` (0-based), jittered with `rng`.
    pub fn delay_ms(&self, attempt: u32, rng: &mut SeededRng) -> u64 {
        let d = self
            .initial_ms
            .saturating_mul(1u64 << attempt.min(16))
            .min(self.max_ms);
        let half = d / 2;
        half + rng.up_to(d - half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_delays_within_bounds() {
        let (mut a, mut b) = (SeededRng::new(&[7; 32]), SeededRng::new(&[7; 32]));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(SeededRng::new(&[8; 32]).next_u64(), a.next_u64());
        let p = Backoff::new(100, 1_000, None);
        for attempt in 0..20 {
            let d = p.delay_ms(attempt, &mut a);
            let full = (100u64 << attempt.min(16)).min(1_000);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d}");
        }
    }
}
