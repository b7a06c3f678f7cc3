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
//!
//! Decompression waits for the receiver checks ([`Unsealed`]): a payload is decompressed
//! only for a message that will be delivered, never for a duplicate or a refused one (a
//! replayed envelope of 1 KiB that decompresses to 16 MiB would otherwise cost every
//! subscriber 16 MiB again per replay). A job still decompresses at once what is within a
//! small multiple of its envelope's size ([`decompresses_early`]), so the common case keeps
//! its parallelism and a duplicate costs at most that much.

use std::sync::{Arc, RwLock};

use whispeer_protocol::frame::{self, Msg};
use whispeer_protocol::seal::Authentic;
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

/// Payloads an open job decompresses whatever their envelope's size, when within the cap.
pub const EARLY_MIN: u64 = 16 * 1024;
/// Beyond [`EARLY_MIN`], an open job decompresses a payload of at most this many times its
/// envelope's size; larger ones wait for the receiver checks.
pub const EARLY_RATIO: u64 = 16;

/// Whether an open job decompresses `a` (of an envelope of `envelope_len` bytes) at once
/// rather than after the receiver checks: its declared size is within `max_payload` and
/// within [`EARLY_MIN`] or [`EARLY_RATIO`] times the envelope. What a duplicate can cost
/// is then proportional to its size on the wire, never the cap. A payload stored
/// uncompressed never: there is nothing to do but hand the decrypted body over.
pub fn decompresses_early(a: &Authentic, envelope_len: usize, max_payload: usize) -> bool {
    if !a.compressed() {
        return false;
    }
    let bound = EARLY_MIN.max((envelope_len as u64).saturating_mul(EARLY_RATIO));
    a.declared_len()
        .is_some_and(|n| n <= bound && n <= max_payload as u64)
}

/// An envelope that opened (decrypted, its topic, date and signature verified), its payload
/// decompressed already (by an [`OpenJob`], within [`decompresses_early`]) or not yet: the
/// core decompresses it after the receiver checks, and only when it delivers it.
#[derive(Debug)]
pub struct Unsealed {
    pub(crate) auth: Authentic,
    /// The payload decompressed early (or the failure of that), under the client's cap —
    /// or, stored uncompressed, cut out of the body (`plain`).
    pub(crate) payload: Option<Result<Vec<u8>, OpenError>>,
    /// `payload` was stored uncompressed: taken, not decompressed (the core counts it in
    /// [`super::CoreStats::decompressed`] when it delivers it, as if it finished it).
    pub(crate) plain: bool,
    /// Its dedup digest and retained key, computed by the open job (`receive::keys_of`).
    pub(crate) keys: Option<(super::receive::Digest, super::receive::RetainedKey)>,
}

impl Unsealed {
    /// Authenticated, nothing decompressed yet.
    pub fn new(auth: Authentic) -> Self {
        Unsealed {
            auth,
            payload: None,
            plain: false,
            keys: None,
        }
    }

    /// What was authenticated (topic, sender, id, date...).
    pub fn authentic(&self) -> &Authentic {
        &self.auth
    }

    /// Whether the payload was decompressed already (one stored uncompressed and taken
    /// out of its body by the open job counts as not).
    pub fn decompressed(&self) -> bool {
        self.payload.is_some() && !self.plain
    }

    /// The whole message, decompressing under `max_payload` with `opener` if not done yet.
    pub fn open(
        self,
        opener: &mut Opener,
        keyring: &Keyring,
        max_payload: usize,
    ) -> Result<Opened, OpenError> {
        match self.payload {
            Some(p) => Ok(self.auth.into_opened(p?)),
            None => opener.finish(keyring, self.auth, max_payload),
        }
    }
}

/// One delivered envelope to open, from [`Engine::poll_open_job`](super::connection::Engine::poll_open_job).
#[derive(Debug)]
pub struct OpenJob {
    id: u64,
    envelope: Envelope,
    unix_ms: u64,
    live: bool,
    /// The client's cap on a decompressed payload.
    max_payload: usize,
    keyring: Arc<RwLock<Keyring>>,
    roots: SharedRoots,
}

/// What became of an [`OpenJob`]: give it back to the engine that handed the job out.
#[derive(Debug)]
pub struct OpenDone {
    pub(crate) id: u64,
    pub(crate) result: Result<Unsealed, OpenError>,
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
        max_payload: usize,
        keyring: Arc<RwLock<Keyring>>,
        roots: SharedRoots,
    ) -> Self {
        OpenJob {
            id,
            envelope: msg.envelope.clone(),
            unix_ms,
            live: is_live(msg.flags),
            max_payload,
            keyring,
            roots,
        }
    }

    /// The job's id (increasing in relay order).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Opens the envelope with `opener` (keep one per thread: it holds a zstd context and
    /// the decoded sender keys). Any thread; the keyring is only read. The payload is
    /// decompressed here only within [`decompresses_early`], under the client's cap (not
    /// `opener`'s own).
    pub fn run(self, opener: &mut Opener) -> OpenDone {
        let result = {
            let kr = self.keyring.read().unwrap_or_else(|p| p.into_inner());
            let env = &self.envelope;
            opener
                .authenticate_shared(&kr, env, self.unix_ms, self.live, &self.roots)
                .map(|mut auth| {
                    // Stored uncompressed: the payload is cut out of the body here, where
                    // the decryption left it in this core's cache (on the connection's
                    // thread the move touched cold memory: ~4 % of a busy subscriber's
                    // runtime samples).
                    let plain = auth.take_payload_if_uncompressed(self.max_payload);
                    let is_plain = plain.is_some();
                    let payload = plain.or_else(|| {
                        decompresses_early(&auth, env.as_bytes().len(), self.max_payload)
                            .then(|| opener.decompress(&kr, &auth, self.max_payload))
                    });
                    // Hashed here, on the worker, not on the connection's thread.
                    let keys = Some(super::receive::keys_of(
                        &auth.tree_id,
                        auth.sender.as_ref(),
                        &auth.msg_id.0,
                        &auth.topic,
                    ));
                    Unsealed {
                        auth,
                        payload,
                        plain: is_plain,
                        keys,
                    }
                })
        };
        OpenDone {
            id: self.id,
            result,
        }
    }
}
