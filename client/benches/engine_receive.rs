//! What a subscriber's engine costs per delivered message beside opening alone: the client's
//! own work (routing, the receiver checks and dedup window, ack bookkeeping, events) rather
//! than its cryptography. One thread, no socket, no scheduler, no relay: the engine opens
//! inline (`open_ahead = 0`, the wasm client's mode), so `engine − open` is the engine.
//!
//! ```sh
//! cargo bench -p whispeer --bench engine_receive
//! ```
//!
//! Each iteration feeds [`N`] sealed 1 KiB messages on one topic (relay sequences 1..=N) to
//! a fresh live engine with one at-most-once subscription (`whispeer bench`'s) and takes
//! every event; the baseline opens the same envelopes with a fresh [`Opener`] (a batch's
//! signature is verified once per iteration in both). A fresh engine's dedup window is
//! small, so `engine-window-500k` (unsigned and batch) first restores 500,000 entries of
//! other messages, as a long-running subscriber's window holds. Prints the figures per
//! message after the runs.

#[path = "../tests/support/live_engine.rs"]
mod live_engine;

use std::sync::RwLock;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand_chacha::rand_core::SeedableRng;
use whispeer::core::connection::{ConnId, Engine, EngineConfig, Now};
use whispeer::core::{self, SealPolicy, SubscribeOptions};
use whispeer::protocol::frame::Msg;
use whispeer::protocol::seal::{Outgoing, SealOptions};
use whispeer::protocol::TreeId;
use whispeer::protocol::{Envelope, Frame, MessageId, Opener, Sealer};
use whispeer::{Identity, Keyring, Topic, TreeKey};

/// Messages per iteration.
const N: usize = 4096;
/// Payload bytes (`whispeer bench --size 1024`).
const SIZE: usize = 1024;

const NOW: Now = Now {
    mono_ms: 1_000,
    unix_ms: 1_800_000_000_000,
};

fn keyring() -> Keyring {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(42);
    let tk = TreeKey::generate_with("bench", &mut rng).expect("tree");
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).expect("tree key");
    kr
}

/// A live engine subscribed to `t/#` (at most once), and its connection.
fn live() -> (Engine, ConnId) {
    let mut cfg = EngineConfig::default();
    cfg.open_ahead = 0;
    let (eng, c, _) = live_engine::live_engine(cfg, keyring(), "t/#", SubscribeOptions::new(), NOW);
    (eng, c)
}

/// A payload like `whispeer bench`'s: 16 bytes that differ per message, then filler that
/// zstd shrinks no more than the bench's does.
fn payload(i: usize, rng: &mut impl rand_chacha::rand_core::RngCore) -> Vec<u8> {
    let mut p = vec![0u8; SIZE];
    rng.fill_bytes(&mut p);
    p[..8].copy_from_slice(&(i as u64).to_be_bytes());
    p
}

/// `N` envelopes on `t/x`: unsigned, batch-signed (windows of 256) or signed one by one.
fn envelopes(mode: &str) -> Vec<Envelope> {
    let kr = RwLock::new(keyring());
    let id = Identity::generate_with(&mut rand_chacha::ChaCha20Rng::seed_from_u64(7));
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
    let mut sealer = Sealer::new();
    let topic = Topic::new("t/x").expect("topic");
    if mode == "batch" {
        // One signature per run of `max_messages` (256), as a busy publisher's batches.
        let mut batch = core::batching::PublishBatch::new(core::DEFAULT_BATCH);
        for i in 0..N {
            let p = payload(i, &mut rng);
            let (prep, _) = core::prepare_publish_in(
                &kr,
                None,
                &SealPolicy::default(),
                &mut sealer,
                &topic,
                core::OCTETS,
                &p,
                NOW.unix_ms,
                &mut rng,
            )
            .expect("prepare");
            batch.push(prep, i, 0);
        }
        return batch
            .seal_all(&mut sealer, &id, &mut rng)
            .into_iter()
            .map(|(e, _)| e.expect("batch seals"))
            .collect();
    }
    let key = kr
        .read()
        .expect("keyring")
        .topic_key(&topic)
        .expect("topic key");
    let signer = (mode == "signed").then_some(&id);
    (0..N)
        .map(|i| {
            let p = payload(i, &mut rng);
            let mut msg_id = [0u8; 16];
            msg_id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            let out = Outgoing {
                payload: &p,
                content_type: core::OCTETS,
                msg_id: MessageId(msg_id),
                ts_ms: NOW.unix_ms,
            };
            sealer
                .seal(&key, &out, &SealOptions::default(), signer, &mut rng)
                .expect("seal")
        })
        .collect()
}

/// Dedup entries a long-running subscriber's window holds (hours of traffic): restored into
/// the engine before the timed part of the `engine-window-500k` runs, so the window's
/// lookups and inserts miss the caches as they do in a real subscriber.
const WARM_WINDOW: usize = 500_000;

/// Feeds `msgs` to a fresh live engine `iters` times, taking every event, after restoring
/// `window` dedup entries of other messages (not timed); the time of the feeding.
fn time_engine(msgs: &[Msg], iters: u64, window: usize) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let (mut eng, conn) = live();
        let guard = eng.core_mut().guard_mut();
        for i in 0..window {
            let mut id = [0xA5u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let key = (TreeId([9; 16]), [7; 32], id);
            guard.restore_seen(key, NOW.unix_ms + 3_600_000, NOW.unix_ms);
        }
        let t = Instant::now();
        let mut got = 0;
        for m in msgs {
            eng.handle_decoded(conn, Frame::Msg(m.clone()), NOW);
            while let Some(e) = eng.poll_event() {
                got += matches!(e, whispeer::core::connection::Event::Message { .. }) as usize;
                black_box(e);
            }
        }
        while eng.poll_transmit().is_some() {}
        total += t.elapsed();
        assert_eq!(got, msgs.len(), "every message delivered");
    }
    total
}

fn receive(c: &mut Criterion) {
    let kr = keyring();
    let mut per_msg = Vec::new();
    for mode in ["unsigned", "batch", "signed"] {
        let envs = envelopes(mode);
        let msgs: Vec<Msg> = envs
            .iter()
            .enumerate()
            .map(|(i, e)| live_engine::live_msg(i as u64 + 1, e.clone()))
            .collect();
        let mut g = c.benchmark_group(format!("receive/{mode}"));
        g.throughput(Throughput::Elements(N as u64));
        g.sample_size(if mode == "signed" { 10 } else { 20 });
        let mut open_t = (Duration::ZERO, 0u64);
        g.bench_function("open", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut opener = Opener::new();
                    let t = Instant::now();
                    for e in &envs {
                        black_box(opener.open(&kr, e, NOW.unix_ms).expect("opens"));
                    }
                    total += t.elapsed();
                }
                open_t.0 += total;
                open_t.1 += iters;
                total
            })
        });
        let mut eng_t = (Duration::ZERO, 0u64);
        g.bench_function("engine", |b| {
            b.iter_custom(|iters| {
                let total = time_engine(&msgs, iters, 0);
                eng_t.0 += total;
                eng_t.1 += iters;
                total
            })
        });
        let mut warm_t = (Duration::ZERO, 0u64);
        if mode != "signed" {
            g.bench_function("engine-window-500k", |b| {
                b.iter_custom(|iters| {
                    let total = time_engine(&msgs, iters, WARM_WINDOW);
                    warm_t.0 += total;
                    warm_t.1 += iters;
                    total
                })
            });
        }
        g.finish();
        let us = |(d, n): (Duration, u64)| d.as_secs_f64() * 1e6 / (n.max(1) as f64 * N as f64);
        per_msg.push((mode, us(open_t), us(eng_t), us(warm_t)));
    }
    println!(
        "\nper delivered message (mean over every iteration criterion ran, its warm-up included):"
    );
    println!(
        "| signing | open alone µs | engine µs | engine − open µs | engine, 500k-entry window µs |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (mode, o, e, w) in per_msg {
        let w = if w > 0.0 {
            format!("{w:.2}")
        } else {
            "–".into()
        };
        println!("| {mode} | {o:.2} | {e:.2} | {:.2} | {w} |", e - o);
    }
}

criterion_group!(benches, receive);
criterion_main!(benches);
