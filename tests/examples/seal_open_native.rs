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
    let tk = TreeKey::generate_with("bench", &mut OsRng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = Identity::generate_with(&mut OsRng);
    let topic = Topic::new("sensor/kitchen/temp").unwrap();
    let key = kr.topic_key(&topic).unwrap();
    let data = bench_payload(size);
    let modes: [(&str, Compression, bool); 3] = [
        ("plain", Compression::None, false),
        ("signed", Compression::None, true),
        ("zstd3+signed", Compression::Zstd(3), true),
    ];
    for (mode, compression, signed) in modes {
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
        while start.elapsed() < Duration::from_secs(1) {
            for _ in 0..100 {
                let out = Outgoing {
                    payload: &data,
                    content_type: "application/cbor",
                    msg_id: MessageId::random(&mut OsRng),
                    ts_ms: 1,
                };
                let env = sealer
                    .seal(&key, &out, &opts, signed.then_some(&id), &mut OsRng)
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
                if m % 100 == 0 && start.elapsed() >= Duration::from_secs(1) {
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
