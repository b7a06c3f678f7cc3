//! Ratio and speed of the body codecs on realistic JSON: zstd level 3 without and with a
//! trained dictionary (codec 3), and LZ4, per message as the sealer compresses them.
//!
//! ```sh
//! cargo run --release -p whispeer-protocol --example dict_bench
//! ```
//!
//! Two corpora of 1,000 messages each from fixed seeds (200 B – 2 KiB): sensor telemetry and
//! chat. Each dictionary is trained on 1,000 *other* messages of the same kind (what
//! `whispeer dict train` on yesterday's traffic gives), then every codec compresses and
//! decompresses each test message on its own with a reused context, best of 5 rounds. The
//! ratio is the sum of the original sizes over the sum of the stored payload sizes (codec 3
//! includes its 16-byte dictionary id).

use std::time::Instant;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use whispeer_protocol::compress::{
    decompress_dict, lz4_compress, lz4_decompress, zstd_dict_compress_once, CODEC_ZSTD_DICT,
};
use whispeer_protocol::{Dictionaries, Dictionary};

const N: usize = 1000;
const ROUNDS: usize = 5;

fn pick<'a>(rng: &mut ChaCha20Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.next_u32() as usize % xs.len()]
}

/// Telemetry: a device's reading with a variable-length batch of samples.
fn telemetry(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let rooms = [
        "kitchen", "garage", "attic", "bedroom", "hall", "office", "basement",
    ];
    let kinds = ["temperature", "humidity", "co2", "pressure", "lux"];
    (0..N)
        .map(|i| {
            let n = 1 + rng.next_u32() as usize % 24;
            let samples: Vec<String> = (0..n)
                .map(|j| {
                    format!(
                        r#"{{"t":{},"kind":"{}","value":{}.{:02},"unit":"{}"}}"#,
                        1_764_500_000_000u64 + (i * 1000 + j * 50) as u64,
                        pick(&mut rng, &kinds),
                        rng.next_u32() % 1000,
                        rng.next_u32() % 100,
                        pick(&mut rng, &["C", "%", "ppm", "hPa", "lx"]),
                    )
                })
                .collect();
            format!(
                r#"{{"device":"th-{:05}","site":"plant-{}","room":"{}","firmware":"2.{}.{}","battery":{},"rssi":-{},"status":"{}","samples":[{}]}}"#,
                rng.next_u32() % 100_000,
                rng.next_u32() % 8,
                pick(&mut rng, &rooms),
                rng.next_u32() % 5,
                rng.next_u32() % 20,
                rng.next_u32() % 101,
                40 + rng.next_u32() % 60,
                pick(&mut rng, &["ok", "ok", "ok", "degraded", "calibrating"]),
                samples.join(",")
            )
            .into_bytes()
        })
        .collect()
}

/// Chat: a message event with a text of varying length and some metadata.
fn chat(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let words = [
        "the",
        "build",
        "is",
        "green",
        "again",
        "can",
        "you",
        "review",
        "my",
        "pull",
        "request",
        "before",
        "lunch",
        "deploy",
        "tomorrow",
        "morning",
        "thanks",
        "looks",
        "good",
        "to",
        "me",
        "I",
        "think",
        "we",
        "should",
        "rotate",
        "keys",
        "after",
        "the",
        "meeting",
        "where",
        "is",
        "the",
        "dashboard",
        "link",
        "relay",
        "latency",
        "dropped",
    ];
    let users = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
    (0..N)
        .map(|i| {
            let n = 8 + rng.next_u32() as usize % 260;
            let text: Vec<&str> = (0..n).map(|_| pick(&mut rng, &words)).collect();
            let reactions = rng.next_u32() % 4;
            format!(
                r#"{{"type":"message","id":"m-{:08x}","channel":"{}","from":{{"user":"{}","display":"{}","device":"{}"}},"sent_at":"2026-11-30T{:02}:{:02}:{:02}.{:03}Z","text":"{}","reply_to":{},"mentions":[{}],"reactions":{reactions},"edited":false}}"#,
                rng.next_u32(),
                pick(&mut rng, &["#general", "#ops", "#random", "#release"]),
                pick(&mut rng, &users),
                pick(&mut rng, &users).to_uppercase(),
                pick(&mut rng, &["web", "ios", "android", "cli"]),
                i % 24,
                i % 60,
                (i * 7) % 60,
                rng.next_u32() % 1000,
                text.join(" "),
                if rng.next_u32() % 3 == 0 {
                    format!("\"m-{:08x}\"", rng.next_u32())
                } else {
                    "null".into()
                },
                if rng.next_u32() % 4 == 0 {
                    format!("\"{}\"", pick(&mut rng, &users))
                } else {
                    String::new()
                },
            )
            .into_bytes()
        })
        .collect()
}

struct Row {
    name: String,
    stored: usize,
    comp_us: f64,
    decomp_us: f64,
}

fn best<F: FnMut() -> usize>(mut f: F) -> (usize, f64) {
    let mut best = f64::MAX;
    let mut out = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (out, best * 1e6 / N as f64)
}

fn measure(msgs: &[Vec<u8>], train: &[Vec<u8>], dict_sizes: &[usize]) -> Vec<Row> {
    let mut rows = Vec::new();
    // zstd 3, no dictionary.
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let (stored, comp_us) = best(|| msgs.iter().map(|m| c.compress(m).unwrap().len()).sum());
    let frames: Vec<Vec<u8>> = msgs.iter().map(|m| c.compress(m).unwrap()).collect();
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    let (_, decomp_us) = best(|| {
        frames
            .iter()
            .zip(msgs)
            .map(|(f, m)| d.decompress(f, m.len()).unwrap().len())
            .sum()
    });
    rows.push(Row {
        name: "zstd 3".into(),
        stored,
        comp_us,
        decomp_us,
    });
    // zstd 3 with dictionaries of several sizes (codec 3, as the Sealer writes it).
    for &size in dict_sizes {
        let dict = Dictionary::new(zstd::dict::from_samples(train, size).unwrap()).unwrap();
        let mut c = zstd::bulk::Compressor::with_dictionary(3, dict.as_bytes()).unwrap();
        c.set_parameter(zstd::stream::raw::CParameter::DictIdFlag(false))
            .unwrap();
        let (stored, comp_us) =
            best(|| msgs.iter().map(|m| 16 + c.compress(m).unwrap().len()).sum());
        let payloads: Vec<Vec<u8>> = msgs
            .iter()
            .map(|m| zstd_dict_compress_once(&dict, 3, m).unwrap())
            .collect();
        let mut set = Dictionaries::new();
        set.insert(dict.clone());
        // Through the receiver's path (one context per dictionary, reused).
        let _ = decompress_dict(CODEC_ZSTD_DICT, &payloads[0], 1 << 20, &set).unwrap();
        let mut dd = zstd::bulk::Decompressor::with_dictionary(dict.as_bytes()).unwrap();
        let (_, decomp_us) = best(|| {
            payloads
                .iter()
                .zip(msgs)
                .map(|(p, m)| dd.decompress(&p[16..], m.len()).unwrap().len())
                .sum()
        });
        rows.push(Row {
            name: format!("zstd 3 + {} KiB dictionary", dict.len().div_ceil(1024)),
            stored,
            comp_us,
            decomp_us,
        });
    }
    // LZ4 block (codec 2).
    let (stored, comp_us) = best(|| msgs.iter().map(|m| lz4_compress(m).unwrap().len()).sum());
    let blocks: Vec<Vec<u8>> = msgs.iter().map(|m| lz4_compress(m).unwrap()).collect();
    let (_, decomp_us) = best(|| {
        blocks
            .iter()
            .map(|b| lz4_decompress(b, 1 << 20).unwrap().len())
            .sum()
    });
    rows.push(Row {
        name: "LZ4".into(),
        stored,
        comp_us,
        decomp_us,
    });
    rows
}

fn main() {
    for (name, test, train) in [
        ("telemetry JSON", telemetry(1), telemetry(2)),
        ("chat JSON", chat(3), chat(4)),
    ] {
        let total: usize = test.iter().map(Vec::len).sum();
        let (min, max) = (
            test.iter().map(Vec::len).min().unwrap(),
            test.iter().map(Vec::len).max().unwrap(),
        );
        println!(
            "\n{name}: {N} messages, {min}–{max} B, mean {} B (dictionaries trained on {N} other messages)\n",
            total / N
        );
        println!("| codec | ratio | mean stored size | compress µs/msg | decompress µs/msg |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for r in measure(&test, &train, &[4 * 1024, 16 * 1024, 64 * 1024]) {
            println!(
                "| {} | {:.2} | {} B | {:.2} | {:.2} |",
                r.name,
                total as f64 / r.stored as f64,
                r.stored / N,
                r.comp_us,
                r.decomp_us
            );
        }
    }
}
