//! Invite plaintexts (§7) after the HPKE layer, which anyone can seal to a recipient: raw
//! bytes as a format-2 or format-3 plaintext, and arbitrary bytes as the dictionary section
//! of a format-3 plaintext correctly signed by an inviter (so the section reaches the
//! dictionary checks after the signature). Opening must fail with a typed error or accept a
//! well-formed invite, never panic; whatever it accepts carries distinct dictionaries in
//! ascending id order, each with the id of its bytes.
#![no_main]

use std::sync::OnceLock;

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use whispeer_protocol::*;

struct Fixture {
    me: PublicId,
    grant: Grant,
    grant_bytes: Vec<u8>,
    inviter: SigningKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tk = TreeKey::from_parts(TreeId([1; 16]), 0, "fuzz", [2; 32], [3; 32]).unwrap();
        let grant = tk.grant(&Scope::Subtree(Topic::new("sensor").unwrap()));
        let grant_bytes = text::decode(text::hrp::GRANT, &grant.to_key_string()).unwrap();
        Fixture {
            me: Identity::from_seeds(&[4; 32], &[5; 32]).public_id(),
            grant,
            grant_bytes,
            inviter: SigningKey::from_bytes(&[6; 32]),
        }
    })
}

/// A format-3 plaintext carrying `section` as its dictionaries, signed as §7 says.
fn signed_format_3(f: &Fixture, section: &[u8]) -> Vec<u8> {
    let expiry = u64::MAX;
    let mut m = b"whispeer/v2/invite3\0".to_vec();
    m.extend_from_slice(&f.me.sender_id().to_bytes());
    m.extend_from_slice(f.me.x25519());
    m.extend_from_slice(&f.grant.epoch_keys().tree_id().0);
    m.extend_from_slice(&f.grant.epoch_keys().epoch().to_be_bytes());
    let scope = f.grant.scope().to_string();
    m.extend_from_slice(&(scope.len() as u16).to_be_bytes());
    m.extend_from_slice(scope.as_bytes());
    m.extend_from_slice(&expiry.to_be_bytes());
    m.extend_from_slice(blake3::hash(&f.grant_bytes).as_bytes());
    m.extend_from_slice(blake3::hash(section).as_bytes());
    let mut pt = vec![3];
    pt.extend_from_slice(f.inviter.verifying_key().as_bytes());
    pt.extend_from_slice(&expiry.to_be_bytes());
    pt.extend_from_slice(&f.inviter.sign(&m).to_bytes());
    pt.extend_from_slice(&(f.grant_bytes.len() as u16).to_be_bytes());
    pt.extend_from_slice(&f.grant_bytes);
    pt.extend_from_slice(section);
    pt
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let opened = match mode % 3 {
        0 => Invite::open_plaintext(2, rest, &f.me, 0),
        1 => Invite::open_plaintext(3, rest, &f.me, 0),
        _ => Invite::open_plaintext(3, &signed_format_3(f, rest), &f.me, 0),
    };
    if let Ok(inv) = opened {
        for w in inv.dictionaries.windows(2) {
            assert!(w[0].id() < w[1].id(), "dictionaries not strictly ascending");
        }
        for d in &inv.dictionaries {
            assert_eq!(d.id(), DictId::of(d.as_bytes()));
        }
    }
});
