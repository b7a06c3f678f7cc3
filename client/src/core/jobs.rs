//! Work the engine hands out so a driver can spread it over cores: opening delivered
//! envelopes (AEAD, body parse, signature or batch-proof check, decompression) is most of a
//! subscriber's CPU, and done on the connection task it caps a subscriber at one core.
//!
//! A job is a pure function over owned bytes and the key material it needs (the shared
//! keyring, the shared cache of verified batch roots): no clock, no socket, no thread of its
//! own, so the engine stays sans-IO and builds for `wasm32-unknown-unknown`. A driver with
//! threads runs jobs on a small pool ([`OpenJob::run`] on any thread, with that thread's
//! [`Opener`]) and hands each result back with
//! [`Engine::handle_opened`](super::connection::Engine::handle_opened); the engine
//! re-orders by the job id, so events, acks and control frames still leave in relay order.
//! A driver without threads never sees a job: an engine with `open_ahead = 0` (the default)
//! opens inline, exactly as before.
//!
//! The verified-root cache is shared ([`SharedRoots`]), so a batch signature still costs one
//! verification per subscriber. Two workers that meet the same new root at once both verify
//! it; the second is counted in [`CoreStats::batch_root_races`](super::CoreStats).

use std::sync::{Arc, RwLock};

use whispeer_protocol::frame::{self, Msg};
use whispeer_protocol::{Envelope, Keyring, OpenError, Opened, Opener, SharedRoots};

/// Whether a `Msg` with these flags was delivered live. History (replayed, redelivered,
/// retained) opens with `live = false`: a message of a superseded epoch is then accepted if
/// dated before the rotation cutoff, whatever the grace; a live one must also arrive within
/// the grace (PROTOCOL §4.11).
pub fn is_live(flags: u64) -> bool {
    flags
        & (frame::msg_flags::REPLAYED | frame::msg_flags::REDELIVERED | frame::msg_flags::RETAINED)
        == 0
}

/// One delivered envelope to open, from [`Engine::poll_open_job`](super::connection::Engine::poll_open_job).
#[derive(Debug)]
pub struct OpenJob {
    id: u64,
    envelope: Envelope,
    unix_ms: u64,
    live: bool,
    keyring: Arc<RwLock<Keyring>>,
    roots: SharedRoots,
}

/// What became of an [`OpenJob`]: give it back to the engine that handed the job out.
#[derive(Debug)]
pub struct OpenDone {
    pub(crate) id: u64,
    pub(crate) result: Result<Opened, OpenError>,
}

impl OpenDone {
    /// The id of the job it answers.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl OpenJob {
    pub(crate) fn new(
        id: u64,
        msg: &Msg,
        unix_ms: u64,
        keyring: Arc<RwLock<Keyring>>,
        roots: SharedRoots,
    ) -> Self {
        OpenJob {
            id,
            envelope: msg.envelope.clone(),
            unix_ms,
            live: is_live(msg.flags),
            keyring,
            roots,
        }
    }

    /// The job's id (increasing in relay order).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Opens the envelope with `opener` (keep one per thread: it holds a zstd context and
    /// the decoded sender keys). Any thread; the keyring is only read.
    pub fn run(self, opener: &mut Opener) -> OpenDone {
        let result = {
            let kr = self.keyring.read().unwrap_or_else(|p| p.into_inner());
            opener.open_shared(&kr, &self.envelope, self.unix_ms, self.live, &self.roots)
        };
        OpenDone {
            id: self.id,
            result,
        }
    }
}
