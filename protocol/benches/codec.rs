//! Frame codec throughput: what a relay does per routed 1 KiB message — decode a `Pub`
//! frame off the wire, encode the `Msg` frame a subscriber gets — and a `Hello`-sized map
//! of small fields:
//!
//! ```sh
//! cargo bench -p whispeer-protocol --features keys --bench codec
//! ```

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::OsRng;
use whispeer_protocol::frame::{pub_flags, Msg, Pub};
use whispeer_protocol::*;

fn codec(c: &mut Criterion) {
    let mut rng = OsRng;
    let tk = TreeKey::generate_with("bench", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let key = kr
        .topic_key(&Topic::new("sensor/kitchen/temp").unwrap())
        .unwrap();
    let payload = vec![0x5a; 1024];
    let out = Outgoing {
        payload: &payload,
        content_type: "application/cbor",
        msg_id: MessageId([1; 16]),
        ts_ms: 1,
    };
    let opts = SealOptions {
        compression: Compression::None,
        padding: Padding::Padme,
        suite: Suite::XChaCha20Poly1305,
    };
    let envelope = Sealer::new()
        .seal(&key, &out, &opts, None, &mut rng)
        .unwrap();

    let pub_frame = Frame::Pub(Pub {
        envelope: envelope.clone(),
        flags: pub_flags::ACK,
        publish_id: Some([7; 16]),
        qos: Qos::AtLeastOnce,
    });
    let wire: Bytes = codec::encode_prefixed(&pub_frame);
    let msg = Frame::Msg(Msg {
        paused: None,
        seq: 123_456_789,
        envelope,
        flags: 0,
        sub_id: None,
    });

    let mut g = c.benchmark_group("codec/1KiB");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode Pub", |b| {
        let mut dec = codec::FrameDecoder::new(1 << 20);
        b.iter(|| {
            dec.push(&wire);
            black_box(dec.next_decoded().unwrap().unwrap())
        })
    });
    g.bench_function("encode Msg", |b| {
        b.iter(|| black_box(codec::encode_prefixed(black_box(&msg))))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
