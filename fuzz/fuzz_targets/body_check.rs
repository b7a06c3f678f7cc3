//! A body plaintext is what a member holding a topic key can make every receiver parse: any
//! bytes under a valid seal (§4.10 steps 8 and 9). Parsing it and verifying its sender —
//! one Ed25519 signature, or a batch proof and its inclusion path — must return a sender, no
//! sender, or a typed error, never panic and never allocate by a declared length. The first
//! input byte picks the start: the raw input, or a scheme byte and a valid sender key before
//! it (so the fuzzer spends its time past the point decoding, in the signature, proof,
//! field and padding checks).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use whispeer_protocol::seal::check_body;
use whispeer_protocol::*;

struct Fixture {
    topic: Topic,
    pk: [u8; 32],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        topic: Topic::new("sensor/kitchen").expect("topic"),
        pk: Identity::from_seeds(&[4; 32], &[5; 32])
            .sender_id()
            .to_bytes(),
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let tree = TreeId([1; 16]);
    let _ = check_body(&tree, 0, &f.topic, data);
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let mut body = Vec::with_capacity(rest.len() + 33);
    match pick % 3 {
        // Unsigned: the fields alone.
        0 => body.push(0),
        // One signature by a valid key: 64 signature bytes, then the fields.
        1 => {
            body.push(1);
            body.extend_from_slice(&f.pk);
        }
        // A batch proof by a valid key: signature, count, index, salt, path length and
        // path, then the fields.
        _ => {
            body.push(2);
            body.extend_from_slice(&f.pk);
        }
    }
    body.extend_from_slice(rest);
    let _ = check_body(&tree, 0, &f.topic, &body);
});
