//! Key strings are what members and users paste (§6): a grant a member shares, a tree key
//! from a backup, a dictionary beside the keys, an identity or public id, a passphrase-locked
//! secret, and the pins a client reads back from its state file. Arbitrary text, and
//! arbitrary bytes under a valid checksum of each type (so the fuzzer reaches the field
//! decoders behind bech32m), must parse to a value or a typed error, never panic; whatever
//! parses must print to a string that parses to the same value, and a parsed grant, tree key
//! or dictionary must go into a keyring (already holding a tree) without panicking.
#![no_main]

use std::str::FromStr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use whispeer_protocol::text::hrp;
use whispeer_protocol::*;

/// Every key-string type prefix; the first input byte picks one.
const HRPS: [&str; 7] = [
    hrp::TREE,
    hrp::GRANT,
    hrp::SECRET,
    hrp::PUBLIC_ID,
    hrp::SENDER,
    hrp::LOCKED,
    hrp::DICT,
];

/// Data bytes that stay below the long code length (4,096 characters with prefix and
/// checksum) of every type.
const MAX_DATA: usize = 2_000;

/// A keyring that already holds a tree (pinned admin), as a member's would when a grant
/// string arrives.
fn keyring() -> Keyring {
    static TREE: OnceLock<TreeKey> = OnceLock::new();
    let tk = TREE.get_or_init(|| {
        TreeKey::from_parts(TreeId([1; 16]), 0, "fuzz", [2; 32], [3; 32]).expect("fixture")
    });
    let mut kr = Keyring::new();
    kr.add_tree_key_at(tk, 0).expect("fixture tree");
    kr
}

fn parse_all(s: &str) {
    if let Ok(t) = TreeKey::from_key_string(s) {
        let again = TreeKey::from_key_string(&t.to_key_string()).expect("printed tree key parses");
        assert_eq!(*again.to_key_string(), *t.to_key_string());
        let _ = keyring().add_tree_key_at(&t, 1);
    }
    if let Ok(g) = Grant::from_key_string(s) {
        let printed = g.to_key_string();
        let again = Grant::from_key_string(&printed).expect("printed grant parses");
        assert_eq!(*again.to_key_string(), *printed);
        let mut kr = keyring();
        let _ = kr.add_grant_at(g, 1);
    }
    if let Ok(d) = Dictionary::from_key_string(s) {
        let again =
            Dictionary::from_key_string(&d.to_key_string()).expect("printed dictionary parses");
        assert_eq!(again.id(), d.id());
        assert_eq!(again.as_bytes(), d.as_bytes());
        let mut kr = keyring();
        let _ = kr.add_dictionary(d);
    }
    if let Ok(i) = Identity::from_secret_string(s) {
        let again =
            Identity::from_secret_string(&i.to_secret_string()).expect("printed identity parses");
        assert_eq!(again.public_id(), i.public_id());
    }
    if let Ok(p) = PublicId::from_str(s) {
        assert_eq!(
            PublicId::from_str(&p.to_string()).expect("printed public id parses"),
            p
        );
    }
    if let Ok(k) = SenderId::from_str(s) {
        assert_eq!(
            SenderId::from_str(&k.to_string()).expect("printed sender id parses"),
            k
        );
    }
    // Never derives with more than the small parameters forced below (or refuses).
    let _ = locked::unlock_secret_string(s, b"fuzz");
}

fuzz_target!(|data: &[u8]| {
    // As text, as pasted.
    if let Ok(s) = std::str::from_utf8(data) {
        parse_all(s);
    }
    // As the data of a string with a valid checksum.
    if let Some((&k, rest)) = data.split_first() {
        let prefix = HRPS[k as usize % HRPS.len()];
        let mut body = rest[..rest.len().min(MAX_DATA)].to_vec();
        if prefix == hrp::LOCKED && body.len() >= 13 {
            // Argon2id at m = 8 KiB, t = 1, p = 1: the fuzzer explores the rest of the
            // header and the ciphertext, not the cost of a large derivation.
            body[1..5].copy_from_slice(&8u32.to_be_bytes());
            body[5..9].copy_from_slice(&1u32.to_be_bytes());
            body[9..13].copy_from_slice(&1u32.to_be_bytes());
        }
        let s = if prefix == hrp::DICT {
            text::encode_long(prefix, &body)
        } else {
            text::encode(prefix, &body)
        };
        parse_all(&s);
    }
    // As a state file's pins: what imports exports to bytes that import the same way.
    let mut kr = Keyring::new();
    if kr.import_pins(data).is_ok() {
        let out = kr.export_pins();
        let mut again = Keyring::new();
        again.import_pins(&out).expect("exported pins import");
        assert_eq!(again.export_pins(), out);
    }
});
