//! Native seal/open throughput for 1 KiB, the same configurations and payload as
//! `client-wasm/bench/seal_open.mjs` measures in Node (wasm). Prints one JSON line per mode.
//!
//! ```sh
//! cargo run --release -p whispeer-tests --example seal_open_native
//! ```

use std::time::{Duration, Instant};

use rand::rngs::OsRng;
use whispeer_protocol::{
    Compression, Identity, Keyring, MessageId, Opener, Outgoing, Padding, SealOptions, Sealer,
    Topic, TreeKey,
};
use whispeer_tests::bench_payload;

fn main() {
    let size: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    // Milliseconds per operation and mode (the wasm bench passes its own, default 1000).
    let per_op = Duration::from_millis(
        std::env::args()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000),
    );
    let tk = TreeKey::generate_with("bench", &mut OsRng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = Identity::generate_with(&mut OsRng);
    let topic = Topic::new("sensor/kitchen/temp").unwrap();
    let key = kr.topic_key(&topic).unwrap();
    let data = bench_payload(size);
    // Signing: 0 none, 1 one signature per message, 2 batch signing (the clients' default:
    // one signature per run of 64, PROTOCOL §4.14).
    let modes: [(&str, Compression, u8); 4] = [
        ("plain", Compression::None, 0),
        ("signed", Compression::None, 1),
        ("batch-signed", Compression::None, 2),
        ("zstd3+signed", Compression::Zstd(3), 1),
    ];
    for (mode, compression, signing) in modes {
        let opts = SealOptions {
            compression,
            padding: Padding::Padme,
            ..SealOptions::default()
        };
        let mut sealer = Sealer::new();
        let mut opener = Opener::new();
        let mut n = 0u64;
        let mut envs = Vec::new();
        let start = Instant::now();
        while start.elapsed() < per_op {
            let out = || Outgoing {
                payload: &data,
                content_type: "application/cbor",
                msg_id: MessageId::random(&mut OsRng),
                ts_ms: 1,
            };
            if signing == 2 {
                let prepared: Vec<_> = (0..64)
                    .map(|_| sealer.prepare(&key, &out(), &opts).unwrap())
                    .collect();
                for env in sealer.seal_batch(&prepared, &id, &mut OsRng).unwrap() {
                    if envs.len() < 10_048 {
                        envs.push(env);
                    }
                    n += 1;
                }
                continue;
            }
            for _ in 0..100 {
                let env = sealer
                    .seal(
                        &key,
                        &out(),
                        &opts,
                        (signing == 1).then_some(&id),
                        &mut OsRng,
                    )
                    .unwrap();
                if envs.len() < 10_000 {
                    envs.push(env);
                }
                n += 1;
            }
        }
        let seal_rate = n as f64 / start.elapsed().as_secs_f64();
        let mut m = 0u64;
        let start = Instant::now();
        'outer: loop {
            for env in &envs {
                let o = opener.open(&kr, env, 1).unwrap();
                std::hint::black_box(o);
                m += 1;
                if m % 100 == 0 && start.elapsed() >= per_op {
                    break 'outer;
                }
            }
        }
        let open_rate = m as f64 / start.elapsed().as_secs_f64();
        println!(
            "{{\"runtime\":\"native\",\"mode\":\"{mode}\",\"size\":{size},\"seal_per_s\":{seal_rate:.0},\"open_per_s\":{open_rate:.0}}}"
        );
    }
}
