//! Arbitrary bytes as an envelope, and arbitrary mutations of a valid one: parsing and
//! opening must fail with the opaque error (or, for the untouched envelope, succeed), never
//! panic, and never decompress beyond the cap.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use whispeer_protocol::*;

struct Fixture {
    keyring: Keyring,
    valid: Vec<u8>,
    /// A batch-signed (`sig_scheme = 2`) envelope, so mutations reach the batch parser.
    batch: Vec<u8>,
    /// Suite 3 (AES-256-GCM) with an LZ4 payload (`codec = 2`).
    aes_lz4: Vec<u8>,
    /// A zstd-with-dictionary payload (`codec = 3`), the dictionary held by the keyring.
    dict: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tk = TreeKey::from_parts(TreeId([1; 16]), 0, "fuzz", [2; 32], [3; 32]).unwrap();
        let mut keyring = Keyring::new();
        keyring.add_tree_key_at(&tk, 0).unwrap();
        let dict = Dictionary::new(b"{\"celsius\": 20.0, \"room\": \"garage\"}".repeat(3)).unwrap();
        let dict_id = dict.id();
        keyring.add_dictionary(dict);
        let id = Identity::from_seeds(&[4; 32], &[5; 32]);
        let topic = Topic::new("sensor/kitchen/temp").unwrap();
        let key = keyring.topic_key(&topic).unwrap();
        let payload = b"{\"celsius\": 21.5, \"room\": \"kitchen\"}".repeat(4);
        let out = Outgoing {
            payload: &payload,
            content_type: "application/json",
            msg_id: MessageId([6; 16]),
            ts_ms: 7,
        };
        let mut rng = rand::rngs::OsRng;
        let env = Sealer::new()
            .seal(&key, &out, &SealOptions::default(), Some(&id), &mut rng)
            .unwrap();
        let mut sealer = Sealer::new();
        let prepared: Vec<_> = (0..3u8)
            .map(|i| {
                let out = Outgoing {
                    msg_id: MessageId([i; 16]),
                    ..out
                };
                sealer.prepare(&key, &out, &SealOptions::default()).unwrap()
            })
            .collect();
        let batch = sealer.seal_batch(&prepared, &id, &mut rng).unwrap();
        let aes_lz4 = SealOptions {
            compression: Compression::Lz4,
            suite: Suite::Aes256Gcm,
            ..SealOptions::default()
        };
        let aes_lz4 = sealer
            .seal(&key, &out, &aes_lz4, Some(&id), &mut rng)
            .unwrap();
        let with_dict = SealOptions {
            compression: Compression::ZstdDict {
                level: 3,
                dict: dict_id,
            },
            ..SealOptions::default()
        };
        let key = keyring.topic_key(&topic).unwrap();
        let dict = sealer
            .seal(&key, &out, &with_dict, Some(&id), &mut rng)
            .unwrap();
        Fixture {
            keyring,
            valid: env.as_bytes().to_vec(),
            batch: batch[2].as_bytes().to_vec(),
            aes_lz4: aes_lz4.as_bytes().to_vec(),
            dict: dict.as_bytes().to_vec(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut opener = Opener::with_max_payload(1 << 16);
    // Raw bytes as an envelope.
    if let Ok(env) = Envelope::from_slice(data) {
        let _ = opener.open(&f.keyring, &env, 0);
    }
    // The valid envelope with the input XORed over it.
    if data.is_empty() {
        return;
    }
    // The first input byte picks the per-message-signed, the batch-signed, the
    // AES-GCM + LZ4 or the zstd-with-dictionary envelope.
    let base = match data[0] % 4 {
        0 => &f.valid,
        1 => &f.batch,
        2 => &f.aes_lz4,
        _ => &f.dict,
    };
    let mut b = base.clone();
    for (i, x) in data.iter().enumerate().skip(1) {
        let j = (i * 131) % b.len();
        b[j] ^= x;
    }
    if let Ok(env) = Envelope::from_slice(&b) {
        let r = opener.open(&f.keyring, &env, 0);
        if &b != base {
            assert!(r.is_err(), "a modified envelope opened");
        }
    }
});
