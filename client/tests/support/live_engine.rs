//! A live connection engine without a socket, for tests and benches that drive it with
//! frames: dialed, connected, welcomed, one subscription confirmed, and nothing left to
//! transmit or report. Standalone (only the `whispeer` crate): `client/benches` include it
//! by path.

use std::sync::{Arc, RwLock};

use whispeer::core::connection::{ConnId, Engine, EngineConfig, Now, Transmit};
use whispeer::core::SubscribeOptions;
use whispeer::protocol::frame::{self, SubOk};
use whispeer::protocol::{Frame, TopicFilter};
use whispeer::Keyring;

/// An engine with `cfg` and `keyring`, live on its first connection, with subscription 1 on
/// `filter` (`opts`) confirmed by the relay at sequence 0: the engine, its connection and
/// the relay id of the subscription.
pub fn live_engine(
    cfg: EngineConfig,
    keyring: Keyring,
    filter: &str,
    opts: SubscribeOptions,
    now: Now,
) -> (Engine, ConnId, u64) {
    let mut eng = Engine::new(cfg, Arc::new(RwLock::new(keyring)), [3; 32], now);
    let Some(Transmit::Dial(c)) = eng.poll_transmit() else {
        panic!("the engine dials first")
    };
    eng.handle_connected(c, now);
    eng.handle_decoded(
        c,
        Frame::Welcome(frame::Welcome {
            version: frame::PROTOCOL_VERSION,
            features: 0,
            max_frame: 1 << 20,
            session: [1; 16],
            relay: None,
            heartbeat_ms: 60_000,
            seq_space: None,
        }),
        now,
    );
    eng.subscribe(1, TopicFilter::new(filter).expect("filter"), opts, now)
        .expect("subscribe");
    let rid = eng.core().relay_ids(1)[0];
    eng.handle_decoded(
        c,
        Frame::SubOk(SubOk {
            sub_id: rid,
            seq: 0,
            history: None,
        }),
        now,
    );
    while eng.poll_transmit().is_some() {}
    while eng.poll_event().is_some() {}
    (eng, c, rid)
}

/// A live `Msg` (no flags, no subscription named) carrying `envelope` at relay sequence
/// `seq`, as the relay routes a publish.
pub fn live_msg(seq: u64, envelope: whispeer::protocol::Envelope) -> frame::Msg {
    frame::Msg {
        paused: None,
        sub_id: None,
        seq,
        envelope,
        flags: 0,
    }
}
