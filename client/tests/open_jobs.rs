//! Deferred opening (`core::jobs`): the engine hands envelopes out as open jobs, the
//! results come back in any order, and messages, acks and control frames still come out in
//! relay order; an engine with `open_ahead = 0` (the wasm client's mode) opens inline.

#[path = "support/live_engine.rs"]
mod live_engine;

use std::sync::RwLock;

use rand_chacha::rand_core::SeedableRng;
use whispeer::core::connection::{Engine, EngineConfig, Event, Now, Transmit};
use whispeer::core::{self, SealPolicy, SubscribeOptions};
use whispeer::protocol::frame::{Msg, Pong};
use whispeer::protocol::{Frame, Opener, Qos, Sealer};
use whispeer::{Identity, Keyring, Topic, TreeKey};

const NOW: Now = Now {
    mono_ms: 1_000,
    unix_ms: 1_800_000_000_000,
};

fn keyring() -> Keyring {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(42);
    let tk = TreeKey::generate_with("jobs", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    kr
}

/// A live engine with one at-least-once subscription on `t/#`; returns it, its socket and
/// the relay id of the subscription.
fn live(open_ahead: usize) -> (Engine, u64, u64) {
    let mut cfg = EngineConfig::default();
    cfg.open_ahead = open_ahead;
    let opts = SubscribeOptions::new().qos(Qos::AtLeastOnce);
    live_engine::live_engine(cfg, keyring(), "t/#", opts, NOW)
}

/// `n` batch-signed messages on `t/x`, payloads "0".."n-1", relay seqs 1..=n.
fn msgs(n: usize) -> Vec<Msg> {
    let kr = RwLock::new(keyring());
    let id = Identity::generate_with(&mut rand_chacha::ChaCha20Rng::seed_from_u64(7));
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
    let mut sealer = Sealer::new();
    let mut batch = core::batching::PublishBatch::new(core::DEFAULT_BATCH);
    for i in 0..n {
        let (p, _) = core::prepare_publish_in(
            &kr,
            None,
            &SealPolicy::default(),
            &mut sealer,
            &Topic::new("t/x").unwrap(),
            core::OCTETS,
            i.to_string().as_bytes(),
            NOW.unix_ms,
            &mut rng,
        )
        .unwrap();
        batch.push(p, i, 0);
    }
    batch
        .seal_all(&mut sealer, &id, &mut rng)
        .into_iter()
        .map(|(env, i)| live_engine::live_msg(i as u64 + 1, env.unwrap()))
        .collect()
}

/// Events as text: `m:<payload>` for a message, `flushed` for a flush.
fn drain_events(eng: &mut Engine, taken: &mut Vec<String>) {
    while let Some(e) = eng.poll_event() {
        match e {
            Event::Message { msg, token, .. } => {
                taken.push(format!("m:{}", String::from_utf8_lossy(&msg.payload)));
                eng.ack(token, NOW);
            }
            Event::Flushed { .. } => taken.push("flushed".into()),
            other => taken.push(format!("{other:?}")),
        }
    }
}

fn acked(eng: &mut Engine) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Some(t) = eng.poll_transmit() {
        if let Transmit::Frame(b) = t {
            if let Ok(Frame::Ack(a)) = Frame::decode(&b) {
                seqs.extend(a.seqs);
            }
        }
    }
    seqs
}

#[test]
fn jobs_finishing_out_of_order_deliver_in_relay_order_with_control_frames_between() {
    let (mut eng, c, _) = live(64);
    let flush = eng.flush(NOW);
    let ms = msgs(40);
    // 20 messages, the flush's Pong, 20 more: the Pong must come out between them.
    for m in &ms[..20] {
        eng.handle_decoded(c, Frame::Msg(m.clone()), NOW);
    }
    eng.handle_decoded(c, Frame::Pong(Pong { nonce: flush }), NOW);
    for m in &ms[20..] {
        eng.handle_decoded(c, Frame::Msg(m.clone()), NOW);
    }
    assert_eq!(eng.parked(), 41);
    let mut jobs = Vec::new();
    while let Some(j) = eng.poll_open_job() {
        jobs.push(j);
    }
    assert_eq!(jobs.len(), 40);
    // Run on two "workers", finishing in a scrambled order: odd ids last, backwards.
    let (mut a, mut b) = (Opener::new(), Opener::new());
    let mut done: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            let o = if j.id() % 2 == 0 { &mut a } else { &mut b };
            j.run(o)
        })
        .collect();
    done.sort_by_key(|d| (d.id() % 2 == 1, std::cmp::Reverse(d.id())));
    let mut taken = Vec::new();
    let mut seqs = Vec::new();
    for d in done {
        eng.handle_opened(d, NOW);
        drain_events(&mut eng, &mut taken);
        seqs.extend(acked(&mut eng));
    }
    let mut want: Vec<String> = (0..20).map(|i| format!("m:{i}")).collect();
    want.push("flushed".into());
    want.extend((20..40).map(|i| format!("m:{i}")));
    assert_eq!(taken, want);
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "acks in relay order");
    assert_eq!(eng.parked(), 0);
    let stats = eng.stats().core;
    assert_eq!(stats.delivered, 40);
    // One batch of 40: one verification, 39 hits, shared by both openers.
    assert_eq!(stats.batch_root_hits + stats.batch_root_races, 39);
}

#[test]
fn open_ahead_caps_parking_and_a_disconnect_opens_the_rest_inline() {
    let (mut eng, c, _) = live(8);
    let ms = msgs(8);
    for m in &ms {
        assert!(eng.wants_read());
        eng.handle_decoded(c, Frame::Msg(m.clone()), NOW);
    }
    assert!(!eng.wants_read(), "8 parked: read no more");
    // Only the first job is answered; then the socket closes: what arrived before the
    // close is still delivered, in order, and the late results are ignored.
    let mut jobs: Vec<_> = std::iter::from_fn(|| eng.poll_open_job()).collect();
    let first = jobs.remove(0).run(&mut Opener::new());
    eng.handle_opened(first, NOW);
    let mut taken = Vec::new();
    drain_events(&mut eng, &mut taken);
    assert_eq!(taken, vec!["m:0".to_string()]);
    eng.handle_disconnected(c, "reset", NOW);
    taken.clear();
    drain_events(&mut eng, &mut taken);
    let msgs_taken: Vec<&String> = taken.iter().filter(|t| t.starts_with("m:")).collect();
    assert_eq!(
        msgs_taken,
        (1..8)
            .map(|i| format!("m:{i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    for j in jobs {
        eng.handle_opened(j.run(&mut Opener::new()), NOW);
    }
    assert!(eng.poll_event().is_none(), "late results are ignored");
    assert_eq!(eng.stats().core.delivered, 8);
}

#[test]
fn inline_mode_hands_out_no_jobs_and_delivers_at_once() {
    let (mut eng, c, _) = live(0);
    let ms = msgs(5);
    let mut taken = Vec::new();
    for m in &ms {
        eng.handle_decoded(c, Frame::Msg(m.clone()), NOW);
        assert!(eng.poll_open_job().is_none());
        assert!(eng.wants_read());
        drain_events(&mut eng, &mut taken);
    }
    assert_eq!(taken, (0..5).map(|i| format!("m:{i}")).collect::<Vec<_>>());
    assert_eq!(acked(&mut eng), vec![1, 2, 3, 4, 5]);
    assert_eq!(eng.stats().core.batch_root_hits, 4);
}

#[test]
fn a_message_with_nothing_waiting_opens_inline_and_a_burst_parks_in_order() {
    let (mut eng, c, _) = live(64);
    let ms = msgs(4);
    let mut taken = Vec::new();
    // Alone (nothing parked, nothing behind it): opened at once, no job.
    eng.handle_decoded_more(c, Frame::Msg(ms[0].clone()), NOW, false);
    assert!(eng.poll_open_job().is_none());
    assert_eq!(eng.parked(), 0);
    drain_events(&mut eng, &mut taken);
    assert_eq!(taken, vec!["m:0".to_string()]);
    // A burst: the first with more behind it parks; the last, though nothing is behind
    // it, parks too (it must not overtake the parked one).
    eng.handle_decoded_more(c, Frame::Msg(ms[1].clone()), NOW, true);
    eng.handle_decoded_more(c, Frame::Msg(ms[2].clone()), NOW, true);
    eng.handle_decoded_more(c, Frame::Msg(ms[3].clone()), NOW, false);
    assert_eq!(eng.parked(), 3);
    let jobs: Vec<_> = std::iter::from_fn(|| eng.poll_open_job()).collect();
    assert_eq!(jobs.len(), 3);
    for j in jobs.into_iter().rev() {
        eng.handle_opened(j.run(&mut Opener::new()), NOW);
    }
    drain_events(&mut eng, &mut taken);
    assert_eq!(taken, (0..4).map(|i| format!("m:{i}")).collect::<Vec<_>>());
    assert_eq!(acked(&mut eng), vec![1, 2, 3, 4]);
}
