//! The random number generator: `rand`'s thread-local CSPRNG (ChaCha, seeded and
//! periodically reseeded from the OS source — `crypto.getRandomValues` or Node's
//! `randomFillSync`). Asking the JS source for every nonce costs more than sealing.

use rand_core::{CryptoRng, RngCore};

/// A handle to the thread-local CSPRNG (`rand::thread_rng()`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rng;

impl RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        rand::thread_rng().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        rand::thread_rng().next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand::thread_rng().fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        rand::thread_rng().try_fill_bytes(dest)
    }
}

impl CryptoRng for Rng {}
