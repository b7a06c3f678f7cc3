//! Seal and open throughput at 64 B, 1 KiB and 64 KiB, with and without compression and
//! signature, beside the raw cost of each primitive measured in the same run:
//!
//! ```sh
//! cargo bench -p whispeer-protocol --bench seal_open
//! ```
//!
//! Payloads are CBOR-like records (compressible, like real application data).
//!
//! The `codecs/*` groups (issue 11) seal + open realistic JSON at 1 KiB and 64 KiB for every
//! suite × codec ({xchacha, aes-gcm} × {none, zstd:3, lz4}) with bytes/s throughput, and
//! print each codec's compression ratio first:
//!
//! ```sh
//! cargo bench -p whispeer-protocol --bench seal_open -- codecs
//! ```

use std::hint::black_box;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use whispeer_protocol::*;

fn payload(size: usize) -> Vec<u8> {
    // {"id": n, "celsius": 21.n, "room": "kitchen"} records, like a CBOR array of structs.
    let mut v = Vec::with_capacity(size);
    let mut n = 0u32;
    while v.len() < size {
        v.extend_from_slice(b"\xa3\x62id\x1a");
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(b"\x67celsius\xfa");
        v.extend_from_slice(&(21.0f32 + (n % 10) as f32 / 10.0).to_be_bytes());
        v.extend_from_slice(b"\x64room\x67kitchen");
        n += 1;
    }
    v.truncate(size);
    v
}

const SIZES: [(usize, &str); 3] = [(64, "64B"), (1024, "1KiB"), (65536, "64KiB")];

fn modes() -> [(&'static str, Compression, bool); 4] {
    [
        ("plain", Compression::None, false),
        ("zstd1", Compression::Zstd(1), false),
        ("signed", Compression::None, true),
        ("zstd1+signed", Compression::Zstd(1), true),
    ]
}

fn seal_open(c: &mut Criterion) {
    let mut rng = OsRng;
    let tk = TreeKey::generate_with("bench", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = Identity::generate_with(&mut rng);
    let topic = Topic::new("sensor/kitchen/temp").unwrap();
    let key = kr.topic_key(&topic).unwrap();

    for (size, label) in SIZES {
        let data = payload(size);
        let mut g = c.benchmark_group(format!("seal/{label}"));
        g.throughput(Throughput::Elements(1));
        for (mode, compression, signed) in modes() {
            let opts = SealOptions {
                compression,
                padding: Padding::Padme,
                suite: Suite::XChaCha20Poly1305,
            };
            let mut sealer = Sealer::new();
            g.bench_function(BenchmarkId::from_parameter(mode), |b| {
                b.iter(|| {
                    let out = Outgoing {
                        payload: &data,
                        content_type: "application/cbor",
                        msg_id: MessageId([1; 16]),
                        ts_ms: 1,
                    };
                    black_box(
                        sealer
                            .seal(&key, &out, &opts, signed.then_some(&id), &mut rng)
                            .unwrap(),
                    )
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("open/{label}"));
        g.throughput(Throughput::Elements(1));
        for (mode, compression, signed) in modes() {
            let opts = SealOptions {
                compression,
                padding: Padding::Padme,
                suite: Suite::XChaCha20Poly1305,
            };
            let out = Outgoing {
                payload: &data,
                content_type: "application/cbor",
                msg_id: MessageId([1; 16]),
                ts_ms: 1,
            };
            let env = Sealer::new()
                .seal(&key, &out, &opts, signed.then_some(&id), &mut rng)
                .unwrap();
            let mut opener = Opener::new();
            g.bench_function(BenchmarkId::from_parameter(mode), |b| {
                b.iter(|| black_box(opener.open(&kr, &env, 0).unwrap()))
            });
        }
        g.finish();
    }
}

fn raw_primitives(c: &mut Criterion) {
    let data = payload(1024);
    let mut g = c.benchmark_group("raw/1KiB");
    g.throughput(Throughput::Elements(1));
    let cipher = XChaCha20Poly1305::new(&[7u8; 32].into());
    let nonce = XNonce::from([9u8; 24]);
    g.bench_function("xchacha20poly1305_seal", |b| {
        let mut buf = data.clone();
        b.iter(|| {
            black_box(
                cipher
                    .encrypt_in_place_detached(&nonce, b"header", &mut buf)
                    .unwrap(),
            )
        })
    });
    for level in [1, 3] {
        let mut z = zstd::bulk::Compressor::new(level).unwrap();
        g.bench_function(format!("zstd{level}_compress_reused_ctx"), |b| {
            b.iter(|| black_box(z.compress(&data).unwrap()))
        });
    }
    let compressed = zstd::bulk::compress(&data, 1).unwrap();
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    g.bench_function("zstd_decompress", |b| {
        b.iter(|| black_box(d.decompress(&compressed, 1024).unwrap()))
    });
    let sk = SigningKey::from_bytes(&[5u8; 32]);
    let vk = sk.verifying_key();
    let sig = sk.sign(&data[..200]);
    g.bench_function("ed25519_sign", |b| {
        b.iter(|| black_box(sk.sign(&data[..200])))
    });
    g.bench_function("ed25519_verify_strict", |b| {
        b.iter(|| black_box(vk.verify_strict(&data[..200], &sig).is_ok()))
    });
    g.bench_function("blake3_hash", |b| b.iter(|| black_box(blake3::hash(&data))));
    g.finish();
}

/// Batch signatures (`sig_scheme = 2`) at batch size 64 beside per-message signatures, 1 KiB
/// uncompressed: the cost per message of sealing the whole batch (prepare, one signature,
/// 64 seals), and of opening all 64 with one opener (one verification, 63 cache hits).
fn batch(c: &mut Criterion) {
    const N: usize = 64;
    let mut rng = OsRng;
    let tk = TreeKey::generate_with("bench", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = Identity::generate_with(&mut rng);
    let key = kr
        .topic_key(&Topic::new("sensor/kitchen/temp").unwrap())
        .unwrap();
    let data = payload(1024);
    let opts = SealOptions {
        compression: Compression::None,
        padding: Padding::Padme,
        suite: Suite::XChaCha20Poly1305,
    };
    let out = |i: usize| Outgoing {
        payload: &data,
        content_type: "application/cbor",
        msg_id: MessageId([i as u8; 16]),
        ts_ms: 1,
    };
    let mut g = c.benchmark_group("batch64/1KiB");
    g.throughput(Throughput::Elements(N as u64));
    let mut sealer = Sealer::new();
    g.bench_function("seal_unsigned", |b| {
        b.iter(|| {
            for i in 0..N {
                black_box(sealer.seal(&key, &out(i), &opts, None, &mut rng).unwrap());
            }
        })
    });
    g.bench_function("seal_per_message_signed", |b| {
        b.iter(|| {
            for i in 0..N {
                black_box(
                    sealer
                        .seal(&key, &out(i), &opts, Some(&id), &mut rng)
                        .unwrap(),
                );
            }
        })
    });
    g.bench_function("seal_batch_signed", |b| {
        b.iter(|| {
            let prepared: Vec<_> = (0..N)
                .map(|i| sealer.prepare(&key, &out(i), &opts).unwrap())
                .collect();
            black_box(sealer.seal_batch(&prepared, &id, &mut rng).unwrap())
        })
    });
    let single: Vec<_> = (0..N)
        .map(|i| {
            sealer
                .seal(&key, &out(i), &opts, Some(&id), &mut rng)
                .unwrap()
        })
        .collect();
    let prepared: Vec<_> = (0..N)
        .map(|i| sealer.prepare(&key, &out(i), &opts).unwrap())
        .collect();
    let batched = sealer.seal_batch(&prepared, &id, &mut rng).unwrap();
    let unsigned: Vec<_> = (0..N)
        .map(|i| sealer.seal(&key, &out(i), &opts, None, &mut rng).unwrap())
        .collect();
    g.bench_function("open_unsigned", |b| {
        let mut opener = Opener::new();
        b.iter(|| {
            for e in &unsigned {
                black_box(opener.open(&kr, e, 0).unwrap());
            }
        })
    });
    g.bench_function("open_per_message_signed", |b| {
        let mut opener = Opener::new();
        b.iter(|| {
            for e in &single {
                black_box(opener.open(&kr, e, 0).unwrap());
            }
        })
    });
    g.bench_function("open_batch_signed_cold_cache", |b| {
        b.iter(|| {
            // A fresh cache per batch: one verification per 64 messages.
            let mut opener = Opener::new();
            for e in &batched {
                black_box(opener.open(&kr, e, 0).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, seal_open, raw_primitives, batch, codecs);
criterion_main!(benches);

/// Realistic JSON telemetry: an array of records with varying numbers and a few strings.
fn json_payload(size: usize) -> Vec<u8> {
    let rooms = ["kitchen", "garage", "attic", "living-room", "bedroom"];
    let mut v = b"[".to_vec();
    let mut n = 0u32;
    while v.len() < size {
        let r = rooms[(n as usize * 7) % rooms.len()];
        let rec = format!(
            r#"{{"id":{},"ts":{},"room":"{}","celsius":{}.{},"humidity":{},"battery":{},"ok":{}}},"#,
            n,
            1_700_000_000_000u64 + u64::from(n) * 1013,
            r,
            15 + n.wrapping_mul(2_654_435_761) % 15,
            n.wrapping_mul(40_503) % 10,
            30 + n.wrapping_mul(97) % 50,
            100 - n % 37,
            n % 11 != 0
        );
        v.extend_from_slice(rec.as_bytes());
        n += 1;
    }
    v.truncate(size);
    v
}

/// Seal + open of one message per iteration for each suite × codec, signed (the default
/// for a topic), throughput in payload bytes. Criterion reports MiB/s; the ratios are
/// printed up front (stored payload / original).
fn codecs(c: &mut Criterion) {
    let mut rng = OsRng;
    let tk = TreeKey::generate_with("bench", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = Identity::generate_with(&mut rng);
    let key = kr
        .topic_key(&Topic::new("sensor/kitchen/temp").unwrap())
        .unwrap();
    let codecs = [
        ("none", Compression::None),
        ("zstd3", Compression::Zstd(3)),
        ("lz4", Compression::Lz4),
    ];
    for (size, label) in [(1024, "1KiB"), (65536, "64KiB")] {
        let data = json_payload(size);
        let out = Outgoing {
            payload: &data,
            content_type: "application/json",
            msg_id: MessageId([1; 16]),
            ts_ms: 1,
        };
        let mut sealer = Sealer::new();
        for (name, compression) in codecs {
            let opts = SealOptions {
                compression,
                ..SealOptions::default()
            };
            let p = sealer.prepare(&key, &out, &opts).unwrap();
            println!(
                "ratio {label} {name}: {} -> {} bytes ({:.3})",
                size,
                p.payload_len(),
                p.payload_len() as f64 / size as f64
            );
        }
        let mut g = c.benchmark_group(format!("codecs/{label}"));
        g.throughput(Throughput::Bytes(size as u64));
        for suite in Suite::ALL {
            for (name, compression) in codecs {
                let opts = SealOptions {
                    compression,
                    padding: Padding::Padme,
                    suite,
                };
                let mut opener = Opener::new();
                g.bench_function(format!("{suite}+{name}/seal+open"), |b| {
                    b.iter(|| {
                        let env = sealer.seal(&key, &out, &opts, Some(&id), &mut rng).unwrap();
                        black_box(opener.open(&kr, &env, 0).unwrap())
                    })
                });
            }
        }
        g.finish();
        // The primitives alone at this size: each AEAD, each codec both ways.
        let mut g = c.benchmark_group(format!("codecs-raw/{label}"));
        g.throughput(Throughput::Bytes(size as u64));
        let nonce = [9u8; 24];
        for suite in Suite::ALL {
            let mut buf = data.clone();
            g.bench_function(format!("{suite}_seal"), |b| {
                b.iter(|| {
                    black_box(aead::seal_detached(
                        suite, &[7; 32], &nonce, b"hdr", &mut buf,
                    ))
                })
            });
        }
        let mut z = zstd::bulk::Compressor::new(3).unwrap();
        let zc = z.compress(&data).unwrap();
        g.bench_function("zstd3_compress", |b| {
            b.iter(|| black_box(z.compress(&data).unwrap()))
        });
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        g.bench_function("zstd_decompress", |b| {
            b.iter(|| black_box(d.decompress(&zc, size).unwrap()))
        });
        let lc = compress::lz4_compress(&data).unwrap();
        g.bench_function("lz4_compress", |b| {
            b.iter(|| black_box(compress::lz4_compress(&data).unwrap()))
        });
        g.bench_function("lz4_decompress", |b| {
            b.iter(|| black_box(compress::lz4_decompress(&lc, size).unwrap()))
        });
        g.finish();
    }
}
