//! Writes the known-answer vectors in `protocol/tests/vectors/` from fixed seeds:
//!
//! ```sh
//! cargo run -p whispeer-protocol --example gen_vectors
//! ```
//!
//! Files named `ok_*` must be accepted with exactly the expected output; files named
//! `fail_*` must be rejected. `protocol/tests/vectors.rs` checks every file, and
//! `docs/PROTOCOL.md` describes the format.

#[path = "../tests/common/fixed_rng.rs"]
mod fixed_rng;

use std::path::Path;

use bytes::Bytes;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use fixed_rng::FixedRng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde_json::{json, Value};
use whispeer_protocol::codec::write_prefixed;
use whispeer_protocol::envelope_header::{OFF_N, TAG_LEN};
use whispeer_protocol::frame::*;
use whispeer_protocol::kdf::{kh, tag, xof};
use whispeer_protocol::*;

const NOW: u64 = 1_700_000_000_000;

fn hx(b: &[u8]) -> String {
    hex::encode(b)
}

fn write(dir: &Path, name: &str, mut v: Value) {
    v["name"] = json!(name);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
}

fn tree(epoch: u64, root: u8) -> TreeKey {
    TreeKey::from_parts(TreeId([0x11; 16]), epoch, "home", [root; 32], [0x33; 32]).unwrap()
}

fn alice() -> Identity {
    Identity::from_seeds(&[0x44; 32], &[0x55; 32])
}

fn t(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

struct Case<'a> {
    topic: &'a str,
    content_type: &'a str,
    payload: Vec<u8>,
    compression: Compression,
    padding: Padding,
    signed: bool,
    suite: Suite,
}

fn seal_case(rng: &mut impl RngCore, c: &Case<'_>) -> (Envelope, Value) {
    seal_case_with(rng, c, None)
}

/// [`seal_case`] with a keyring that also holds `dict` (codec 3).
fn seal_case_with(
    rng: &mut impl RngCore,
    c: &Case<'_>,
    dict: Option<&Dictionary>,
) -> (Envelope, Value) {
    let tk = tree(0, 0x22);
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    if let Some(d) = dict {
        kr.add_dictionary(d.clone());
    }
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    let mut msg_id = [0u8; 16];
    rng.fill_bytes(&mut msg_id);
    let id = alice();
    let signer = c.signed.then_some(&id);
    let key = kr.topic_key(&t(c.topic)).unwrap();
    let out = Outgoing {
        payload: &c.payload,
        content_type: c.content_type,
        msg_id: MessageId(msg_id),
        ts_ms: NOW,
    };
    let opts = SealOptions {
        compression: c.compression,
        padding: c.padding,
        suite: c.suite,
    };
    let env = Sealer::new()
        .seal(&key, &out, &opts, signer, &mut FixedRng::new(&nonce))
        .unwrap();
    let compression = c.compression.to_string();
    let padding = match c.padding {
        Padding::None => "none",
        Padding::Padme => "padme",
    };
    let mut v = json!({
        "kind": "envelope",
        "keys": [{"key": tk.to_key_string().as_str(), "added_ms": 0}],
        "grace_ms": keyring::DEFAULT_EPOCH_GRACE_MS,
        "now_ms": NOW,
        "live": true,
        "seal": {
            "topic": c.topic,
            "content_type": c.content_type,
            "payload": hx(&c.payload),
            "msg_id": hx(&msg_id),
            "ts_ms": NOW,
            "compression": compression,
            "padding": padding,
            "signer": signer.map(|s| s.to_secret_string().to_string()),
            "nonce": hx(&nonce),
        },
        "envelope": hx(env.as_bytes()),
        "expect": {
            "topic": c.topic,
            "sender": signer.map(|s| s.sender_id().to_string()),
            "msg_id": hx(&msg_id),
            "ts_ms": NOW,
            "content_type": c.content_type,
            "payload": hx(&c.payload),
            "tree_id": tk.tree_id().to_string(),
            "epoch": 0,
            "provenance": "admin-signed",
        },
    });
    if c.suite != Suite::XChaCha20Poly1305 {
        // Absent = suite 1, so the vectors written before suite 3 keep their bytes.
        v["seal"]["suite"] = json!(c.suite.name());
    }
    (env, v)
}

fn fail_env(dir: &Path, name: &str, what: &str, base: &Value, bytes: &[u8]) {
    let mut v = base.clone();
    v["description"] = json!(what);
    v["envelope"] = json!(hx(bytes));
    v["expect"] = json!("error");
    v.as_object_mut().unwrap().remove("seal");
    write(dir, name, v);
}

/// Decrypts the body of `env` (the generator holds the keys), lets `f` change the plaintext,
/// and re-encrypts: a validly encrypted envelope whose inside is wrong.
fn reseal_body(env: &Envelope, topic: &str, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    reseal_in(&tree(0, 0x22), env, topic, f)
}

/// `gen_vectors --spec`: prints the values of the worked examples in PROTOCOL.md §4.12 and
/// §5.12 instead of writing vectors.
fn spec_examples() {
    let tk = TreeKey::from_parts(
        TreeId(core::array::from_fn(|i| i as u8)),
        0,
        "home",
        [0x11; 32],
        [0x22; 32],
    )
    .unwrap();
    let ek = tk.cert().keys().clone();
    println!("key_id {}", hx(ek.key_id().as_bytes()));
    println!("admin {}", hx(&tk.admin().to_bytes()));
    let topic = t("sensor/kitchen/temp");
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let key = kr.topic_key(&topic).unwrap();
    let id = Identity::from_seeds(&[0x33; 32], &[0x34; 32]);
    let payload = hex::decode("a16474656d70f94d60").unwrap();
    let out = Outgoing {
        payload: &payload,
        content_type: "application/cbor",
        msg_id: MessageId([0x55; 16]),
        ts_ms: 1_700_000_000_000,
    };
    let nonce = hex::decode("7848b5d711bc9883996317a3f9c90269d56771005d540a19").unwrap();
    let env = Sealer::new()
        .seal(
            &key,
            &out,
            &SealOptions {
                compression: Compression::None,
                padding: Padding::Padme,
                suite: Suite::XChaCha20Poly1305,
            },
            Some(&id),
            &mut FixedRng::new(&nonce),
        )
        .unwrap();
    let b = env.as_bytes();
    println!("envelope_len {}", b.len());
    println!("envelope {}", hx(b));
    let hl = env.header().len();
    println!("sealed_name {}", hx(env.sealed_name()));
    println!("body_ct {}", hx(&b[hl..b.len() - 16]));
    println!("body_tag {}", hx(&b[b.len() - 16..]));
    let g = tk.grant_all();
    let mk = g.message_key(&topic).unwrap();
    let mut x = [0u8; 64];
    xof(mk.as_bytes(), tag::BODY, &[env.nonce()], &mut x);
    let cipher = XChaCha20Poly1305::new((&x[..32]).into());
    let ct = env.ciphertext();
    let (c, tg) = ct.split_at(ct.len() - TAG_LEN);
    let mut body = c.to_vec();
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(env.nonce()),
            env.header(),
            &mut body,
            Tag::from_slice(tg),
        )
        .unwrap();
    println!("sig {}", hx(&body[33..97]));
    let mut m = b"whispeer/v2/msg-sig\0".to_vec();
    m.extend_from_slice(&tk.tree_id().0);
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&(topic.as_str().len() as u16).to_be_bytes());
    m.extend_from_slice(topic.as_str().as_bytes());
    m.extend_from_slice(&[0x55; 16]);
    m.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
    m.extend_from_slice(&16u16.to_be_bytes());
    m.extend_from_slice(b"application/cbor");
    m.push(0);
    m.push(1);
    m.extend_from_slice(blake3::hash(&payload).as_bytes());
    println!("sig_input_len {}", m.len());
    println!("sig_input {}", hx(&m));
    println!("grant_all {}", g.to_key_string().as_str());
    println!("grant_commit_all {}", hx(&g.key_commitment()));

    // §5.9: the passphrase example at the default parameters.
    let (name, pass) = ("family", b"correct horse battery staple");
    let pp = PassphraseParams::default();
    let pt = TreeKey::from_passphrase(name, pass, pp).unwrap();
    let mut salt_in = pt.tree_id().0.to_vec();
    salt_in.extend_from_slice(&(name.len() as u16).to_be_bytes());
    salt_in.extend_from_slice(name.as_bytes());
    let salt = blake3::derive_key("whispeer v1 passphrase salt", &salt_in);
    let params = argon2::Params::new(pp.m_kib, pp.t, pp.p, Some(64)).unwrap();
    let mut ph = [0u8; 64];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(pass, &salt, &mut ph)
        .unwrap();
    println!("passphrase_params m={} t={} p={}", pp.m_kib, pp.t, pp.p);
    println!("passphrase_tree_id {}", pt.tree_id());
    println!("passphrase_salt {}", hx(&salt));
    println!("passphrase_out {}", hx(&ph));
    println!(
        "passphrase_key_id {}",
        hx(pt.cert().keys().key_id().as_bytes())
    );
}

fn main() {
    if std::env::args().any(|a| a == "--spec") {
        spec_examples();
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0x5eed);

    // --- Key schedule ---
    let tk = tree(0, 0x22);
    let all = tk.grant_all();
    let ek = tk.cert().keys().clone();
    let topics = [
        "sensor",
        "sensor/kitchen",
        "sensor/kitchen/temp",
        "a/bc",
        "ab/c",
        "ünï/cødé",
    ];
    write(
        &dir,
        "ok_keys_derivation",
        json!({
            "kind": "keys",
            "description": "tree key parts -> key id, tokens, message keys, grant strings",
            "tree": {"tree_id": hx(&[0x11; 16]), "epoch": 0, "name": "home", "root": hx(&[0x22; 32]), "admin_seed": hx(&[0x33; 32])},
            "expect": {
                "tree_key": tk.to_key_string().as_str(),
                "admin": tk.admin().to_string(),
                "key_id": hx(ek.key_id().as_bytes()),
                "tokens": topics.iter().map(|s| json!({"topic": s, "tokens": ek.tokens(&t(s)).iter().map(|x| hx(x.as_bytes())).collect::<Vec<_>>()})).collect::<Vec<_>>(),
                "message_keys": topics.iter().map(|s| json!({"topic": s, "key": hx(all.message_key(&t(s)).unwrap().as_bytes())})).collect::<Vec<_>>(),
                "grants": [
                    {"scope": "#", "key_string": all.to_key_string().as_str()},
                    {"scope": "sensor/kitchen/#", "key_string": tk.grant(&Scope::Subtree(t("sensor/kitchen"))).to_key_string().as_str()},
                    {"scope": "sensor/kitchen/temp", "key_string": tk.grant(&Scope::Topic(t("sensor/kitchen/temp"))).to_key_string().as_str()},
                ],
                "filters": [
                    {"filter": "sensor/+/temp", "pattern": pattern_json(&ek.compile(&TopicFilter::new("sensor/+/temp").unwrap()))},
                    {"filter": "sensor/#", "pattern": pattern_json(&ek.compile(&TopicFilter::new("sensor/#").unwrap()))},
                ],
            },
        }),
    );

    // --- Passphrase ---
    let p = PassphraseParams::default();
    let pt = TreeKey::from_passphrase("family", b"correct horse battery staple", p).unwrap();
    write(
        &dir,
        "ok_passphrase",
        json!({
            "kind": "passphrase",
            "description": "Argon2id (default parameters) from a tree name and passphrase",
            "tree_name": "family",
            "passphrase": "correct horse battery staple",
            "params": {"m_kib": p.m_kib, "t": p.t, "p": p.p},
            "expect": {
                "tree_id": pt.tree_id().to_string(),
                "tree_key": pt.to_key_string().as_str(),
                "key_id": hx(pt.cert().keys().key_id().as_bytes()),
                "admin": pt.admin().to_string(),
            },
        }),
    );
    let rp = PassphraseParams {
        m_kib: 1024,
        t: 1,
        p: 1,
    };
    let rt = TreeKey::from_passphrase_in_realm_any_params(
        "family",
        "acme",
        b"correct horse battery staple",
        rp,
    )
    .unwrap();
    write(
        &dir,
        "ok_passphrase_realm",
        json!({
            "kind": "passphrase",
            "description": "the same name and passphrase in the realm 'acme' (small Argon2id parameters)",
            "tree_name": "family",
            "realm": "acme",
            "passphrase": "correct horse battery staple",
            "params": {"m_kib": rp.m_kib, "t": rp.t, "p": rp.p},
            "expect": {
                "tree_id": rt.tree_id().to_string(),
                "tree_key": rt.to_key_string().as_str(),
                "key_id": hx(rt.cert().keys().key_id().as_bytes()),
                "admin": rt.admin().to_string(),
            },
        }),
    );

    // --- Envelopes ---
    let reading = {
        // CBOR {"celsius": 21.5, "room": "kitchen"} repeated in an array of 8.
        let one = hex::decode("a26763656c73697573f94d6064726f6f6d676b69746368656e").unwrap();
        let mut v = vec![0x88];
        for _ in 0..8 {
            v.extend_from_slice(&one);
        }
        v
    };
    let kib: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let cases = [
        (
            "ok_envelope_signed_zstd_padme",
            Case {
                topic: "sensor/kitchen/temp",
                content_type: "application/cbor",
                payload: reading.clone(),
                compression: Compression::Zstd(3),
                padding: Padding::Padme,
                signed: true,
                suite: Suite::XChaCha20Poly1305,
            },
        ),
        (
            "ok_envelope_unsigned_plain",
            Case {
                topic: "sensor/kitchen/temp",
                content_type: "text/plain",
                payload: b"hello".to_vec(),
                compression: Compression::None,
                padding: Padding::None,
                signed: false,
                suite: Suite::XChaCha20Poly1305,
            },
        ),
        (
            "ok_envelope_signed_1k_plain_padme",
            Case {
                topic: "chat/room/general",
                content_type: "application/octet-stream",
                payload: kib,
                compression: Compression::Zstd(1),
                padding: Padding::Padme,
                signed: true,
                suite: Suite::XChaCha20Poly1305,
            },
        ),
        (
            "ok_envelope_empty_payload",
            Case {
                topic: "x",
                content_type: "",
                payload: vec![],
                compression: Compression::Zstd(3),
                padding: Padding::Padme,
                signed: true,
                suite: Suite::XChaCha20Poly1305,
            },
        ),
    ];
    let mut base = None;
    for (name, c) in &cases {
        let (env, v) = seal_case(&mut rng, c);
        if base.is_none() {
            base = Some((env, v.clone()));
        }
        write(&dir, name, v);
    }
    let (env, bv) = base.unwrap();
    let e = env.as_bytes().to_vec();
    let n = env.levels();
    let len_off = OFF_N + 1 + 16 * n;
    let flip = |i: usize| {
        let mut b = e.clone();
        b[i] ^= 0x01;
        b
    };
    for (name, what, i) in [
        (
            "fail_envelope_flip_version",
            "bit flipped in the version byte",
            0,
        ),
        (
            "fail_envelope_flip_suite",
            "bit flipped in the suite byte",
            1,
        ),
        (
            "fail_envelope_flip_flags",
            "bit flipped in the flags byte",
            2,
        ),
        ("fail_envelope_flip_key_id", "bit flipped in the key id", 3),
        ("fail_envelope_flip_nonce", "bit flipped in the nonce", 19),
        (
            "fail_envelope_flip_commit",
            "bit flipped in the key commitment",
            43,
        ),
        (
            "fail_envelope_flip_token_count",
            "bit flipped in the token count",
            OFF_N,
        ),
        (
            "fail_envelope_flip_token",
            "bit flipped in the first token",
            OFF_N + 1,
        ),
        (
            "fail_envelope_flip_last_token",
            "bit flipped in the last token",
            len_off - 1,
        ),
        (
            "fail_envelope_flip_name_len",
            "bit flipped in the sealed-name length",
            len_off + 1,
        ),
        (
            "fail_envelope_flip_sealed_name",
            "bit flipped in the sealed name",
            len_off + 2,
        ),
        (
            "fail_envelope_flip_name_tag",
            "bit flipped in the sealed name's tag",
            env.header().len() - 1,
        ),
        (
            "fail_envelope_flip_ciphertext",
            "bit flipped in the body ciphertext",
            env.header().len() + 5,
        ),
        (
            "fail_envelope_flip_body_tag",
            "bit flipped in the body tag",
            e.len() - 1,
        ),
    ] {
        fail_env(&dir, name, what, &bv, &flip(i));
    }
    fail_env(
        &dir,
        "fail_envelope_truncated",
        "last byte removed",
        &bv,
        &e[..e.len() - 1],
    );
    fail_env(
        &dir,
        "fail_envelope_truncated_header",
        "cut inside the header",
        &bv,
        &e[..60],
    );
    fail_env(&dir, "fail_envelope_empty", "no bytes at all", &bv, &[]);
    let mut swapped = e.clone();
    let (a, b) = (OFF_N + 1, OFF_N + 17);
    for k in 0..16 {
        swapped.swap(a + k, b + k);
    }
    fail_env(
        &dir,
        "fail_envelope_swapped_tokens",
        "first two tokens swapped",
        &bv,
        &swapped,
    );
    let bad_sig = reseal_body(&env, "sensor/kitchen/temp", |b| b[1 + 32 + 10] ^= 1);
    fail_env(
        &dir,
        "fail_envelope_bad_signature",
        "validly encrypted body whose signature is wrong",
        &bv,
        &bad_sig,
    );
    let other_pk = Identity::from_seeds(&[0x99; 32], &[0x98; 32])
        .sender_id()
        .to_bytes();
    let wrong_signer = reseal_body(&env, "sensor/kitchen/temp", |b| {
        b[1..33].copy_from_slice(&other_pk)
    });
    fail_env(
        &dir,
        "fail_envelope_wrong_sender_key",
        "sender key replaced by another valid key",
        &bv,
        &wrong_signer,
    );
    let bad_pad = reseal_body(&env, "sensor/kitchen/temp", |b| *b.last_mut().unwrap() = 1);
    fail_env(
        &dir,
        "fail_envelope_nonzero_padding",
        "padding byte not zero",
        &bv,
        &bad_pad,
    );

    let mut v = bv.clone();
    let other =
        TreeKey::from_parts(TreeId([0x12; 16]), 0, "other", [0x23; 32], [0x34; 32]).unwrap();
    v["keys"] = json!([{"key": other.to_key_string().as_str(), "added_ms": 0}]);
    fail_env(
        &dir,
        "fail_envelope_wrong_key",
        "receiver holds only another tree",
        &v,
        &e,
    );
    let mut v = bv.clone();
    v["keys"] = json!([{"key": tree(1, 0x24).to_key_string().as_str(), "added_ms": 0}]);
    fail_env(
        &dir,
        "fail_envelope_wrong_epoch",
        "receiver holds only epoch 1 of the tree",
        &v,
        &e,
    );
    let mut v = bv.clone();
    v["keys"] = json!([
        {"key": tree(0, 0x22).to_key_string().as_str(), "added_ms": 0},
        {"key": tree(1, 0x24).with_prev_cutoff(NOW + 1).to_key_string().as_str(), "added_ms": NOW - 10_000},
    ]);
    v["grace_ms"] = json!(5_000);
    fail_env(
        &dir,
        "fail_envelope_epoch_past_grace",
        "epoch 0 after epoch 1 arrived and the grace period ended",
        &v,
        &e,
    );
    let mut v = bv.clone();
    v["keys"] = json!([
        {"key": tree(0, 0x22).to_key_string().as_str(), "added_ms": 0},
        {"key": tree(1, 0x24).with_prev_cutoff(NOW + 1).to_key_string().as_str(), "added_ms": NOW - 1_000},
    ]);
    v["grace_ms"] = json!(5_000);
    v["description"] =
        json!("epoch 0 still accepted within the grace period after epoch 1 arrived");
    v.as_object_mut().unwrap().remove("seal"); // a new seal would use epoch 1
    write(&dir, "ok_envelope_previous_epoch_in_grace", v);
    let mut v = bv.clone();
    v["keys"] = json!([{"grant": tk.grant(&Scope::Subtree(t("sensor/garage"))).to_key_string().as_str(), "added_ms": 0}]);
    fail_env(
        &dir,
        "fail_envelope_out_of_scope",
        "receiver holds only a sibling subtree grant",
        &v,
        &e,
    );
    let mut v = bv.clone();
    v["keys"] = json!([{"grant": tk.grant(&Scope::Subtree(t("sensor/kitchen"))).to_key_string().as_str(), "added_ms": 0}]);
    v["description"] = json!("a subtree grant opens a topic below it");
    v.as_object_mut().unwrap().remove("seal");
    write(&dir, "ok_envelope_subtree_grant", v);

    // --- Frames (TCP stream with length prefixes) ---
    let pattern = ek.compile(&TopicFilter::new("sensor/+/temp").unwrap());
    let frames = vec![
        Frame::Hello(Hello {
            versions: vec![2],
            features: features::AT_LEAST_ONCE | features::RETAIN,
            client: Some("whispeer-rs/0.1".into()),
            auth: None,
            account: None,
        }),
        Frame::Welcome(Welcome {
            version: 2,
            features: features::AT_LEAST_ONCE,
            max_frame: 1 << 20,
            session: [0xab; 16],
            relay: Some("whispeer-relay/0.1".into()),
            heartbeat_ms: 30_000,
            seq_space: Some([0x5e; 16]),
        }),
        Frame::Sub(Sub {
            sub_id: 1,
            pattern: pattern.clone(),
            qos: Qos::AtLeastOnce,
            durable: Some("kitchen-display".into()),
            replay: Some(Replay::LastN(10)),
            retained: true,
            credit: None,
            owner: None,
        }),
        Frame::SubOk(SubOk {
            sub_id: 1,
            seq: 41,
            history: None,
        }),
        Frame::Pub(Pub {
            envelope: env.clone(),
            flags: pub_flags::ACK | pub_flags::RETAIN,
            publish_id: Some([0xcd; 16]),
            qos: Qos::AtLeastOnce,
        }),
        Frame::PubAck(PubAck {
            publish_id: [0xcd; 16],
            seq: 42,
        }),
        Frame::Msg(Msg {
            paused: None,
            sub_id: None,
            seq: 42,
            envelope: env.clone(),
            flags: 0,
        }),
        Frame::Ack(Ack { seqs: vec![42] }),
        // A live copy for a neighbour naming two paused subscriptions, then the first
        // one's catch-up copy (live flags, naming it).
        Frame::Msg(Msg {
            paused: Some(vec![1, 300]),
            sub_id: None,
            seq: 43,
            envelope: env.clone(),
            flags: 0,
        }),
        Frame::Msg(Msg {
            paused: None,
            sub_id: Some(1),
            seq: 43,
            envelope: env.clone(),
            flags: 0,
        }),
        Frame::Gap(Gap {
            dropped: 3,
            sub_id: None,
        }),
        Frame::Gap(Gap {
            dropped: 2,
            sub_id: Some(1),
        }),
        Frame::Ping(Ping { nonce: 7 }),
        Frame::Pong(Pong { nonce: 7 }),
        Frame::Unsub(Unsub {
            sub_id: 1,
            delete: None,
        }),
        Frame::Err(ErrFrame {
            code: ErrorCode::RateLimited,
            message: "publish rate exceeded".into(),
            fatal: true,
            sub_id: None,
            publish_id: None,
        }),
        Frame::Close(Close {
            code: ErrorCode::ShuttingDown,
            message: "relay shutting down".into(),
        }),
        Frame::ReplayDone(ReplayDone {
            sub_id: 1,
            seq: 41,
            count: 10,
        }),
    ];
    let mut stream = Vec::new();
    let mut each = Vec::new();
    for f in &frames {
        let b = f.to_bytes();
        each.push(json!({"type": f.name(), "cbor": hx(&b)}));
        write_prefixed(&b, &mut stream);
    }
    write(
        &dir,
        "ok_frames_session",
        json!({"kind": "frames", "description": "every frame type, length-prefixed as on TCP", "max_frame": 1 << 20, "stream": hx(&stream), "expect": each}),
    );
    // `reason` is a substring of the Rust decoder's error message, so each vector is known
    // to fail for the reason it names (other implementations may word errors differently).
    let fail_frame = |name: &str, what: &str, reason: &str, stream: Vec<u8>| {
        write(
            &dir,
            name,
            json!({"kind": "frames", "description": what, "max_frame": 1 << 20, "stream": hx(&stream), "expect": "error", "reason": reason}),
        );
    };
    let prefixed = |body: &[u8]| {
        let mut s = Vec::new();
        write_prefixed(body, &mut s);
        s
    };
    fail_frame(
        "fail_frame_length_4gib",
        "length prefix of 4 GiB",
        "exceeds the limit",
        vec![0xff, 0xff, 0xff, 0xff, 0xa0],
    );
    fail_frame(
        "fail_frame_oversized",
        "length prefix one byte over max_frame",
        "exceeds the limit",
        ((1u32 << 20) + 1).to_be_bytes().to_vec(),
    );
    fail_frame(
        "fail_frame_zero_length",
        "length prefix of zero",
        "truncated",
        vec![0, 0, 0, 0],
    );
    fail_frame(
        "fail_frame_unknown_type",
        "frame type 99",
        "unknown frame type 99",
        prefixed(&[0xa1, 0x00, 0x18, 0x63]),
    );
    fail_frame(
        "fail_frame_not_a_map",
        "top-level array",
        "expected a CBOR map",
        prefixed(&[0x82, 0x00, 0x0b]),
    );
    fail_frame(
        "fail_frame_type_not_first",
        "key 1 before key 0",
        "must come first",
        prefixed(&[0xa2, 0x01, 0x05, 0x00, 0x0b]),
    );
    fail_frame(
        "fail_frame_duplicate_key",
        "Ping with key 1 twice",
        "duplicate field 1",
        prefixed(&[0xa3, 0x00, 0x0b, 0x01, 0x05, 0x01, 0x06]),
    );
    fail_frame(
        "fail_frame_indefinite_map",
        "indefinite-length map",
        "indefinite lengths",
        prefixed(&[0xbf, 0x00, 0x0b, 0xff]),
    );
    fail_frame(
        "fail_frame_trailing_bytes",
        "a byte after the map",
        "trailing bytes",
        prefixed(&[0xa2, 0x00, 0x0b, 0x01, 0x05, 0x00]),
    );
    fail_frame(
        "fail_frame_invalid_cbor",
        "reserved additional info 28",
        "invalid CBOR",
        prefixed(&[0xbc]),
    );
    fail_frame(
        "fail_frame_truncated_body",
        "map declares 2 entries, has 1",
        "truncated",
        prefixed(&[0xa2, 0x00, 0x0b]),
    );
    fail_frame(
        "fail_frame_tag",
        "tagged value",
        "tags are not allowed",
        prefixed(&[0xa2, 0x00, 0x0b, 0x01, 0xc1, 0x05]),
    );
    fail_frame(
        "fail_frame_bad_qos",
        "Pub with qos 3",
        "must be 0, 1 or 2",
        {
            let mut b = Frame::Pub(Pub {
                envelope: env.clone(),
                flags: 0,
                publish_id: None,
                qos: Qos::AtMostOnce,
            })
            .to_bytes()
            .to_vec();
            *b.last_mut().unwrap() = 3;
            prefixed(&b)
        },
    );
    fail_frame(
        "fail_frame_pub_bad_envelope",
        "Pub whose envelope has version 1 (the format before the trusted-key change)",
        "unsupported envelope version 1",
        {
            let mut bad = e.clone();
            bad[0] = 1;
            let mut b = Vec::new();
            b.extend_from_slice(&[0xa3, 0x00, 0x06, 0x01, 0x59]);
            b.extend_from_slice(&(bad.len() as u16).to_be_bytes());
            b.extend_from_slice(&bad);
            b.extend_from_slice(&[0x02, 0x00]);
            prefixed(&b)
        },
    );
    fail_frame(
        "fail_frame_pub_ack_without_id",
        "Pub asking for an ack without a publish id",
        "missing field publish_id",
        {
            let b = Frame::Pub(Pub {
                envelope: env.clone(),
                flags: pub_flags::ACK,
                publish_id: None,
                qos: Qos::AtMostOnce,
            })
            .to_bytes();
            prefixed(&b)
        },
    );
    fail_frame(
        "fail_frame_sub_hash_not_last",
        "Sub filter [#, +]",
        "may only be the last level",
        {
            let mut b = vec![0xa4, 0x00, 0x03, 0x01, 0x01, 0x02, 0x50];
            b.extend_from_slice(ek.key_id().as_bytes());
            b.extend_from_slice(&[0x03, 0x82, 0x02, 0x01]);
            prefixed(&b)
        },
    );
    fail_frame(
        "fail_frame_sub_too_deep",
        "Sub filter with 33 levels",
        "filter of 33 elements exceeds",
        {
            let mut b = vec![0xa4, 0x00, 0x03, 0x01, 0x01, 0x02, 0x50];
            b.extend_from_slice(ek.key_id().as_bytes());
            b.extend_from_slice(&[0x03, 0x98, 33]);
            b.extend(std::iter::repeat_n(0x01, 33));
            prefixed(&b)
        },
    );
    let _ = Bytes::new();

    // --- Trust (issue 9): each attack refused ---
    trust_vectors(&dir, &tk, &env, &bv);

    // --- Invites ---
    let bob = Identity::from_seeds(&[0x66; 32], &[0x77; 32]);
    let eve = Identity::from_seeds(&[0x88; 32], &[0x89; 32]);
    let g = tk.grant(&Scope::Subtree(t("sensor")));
    let expiry = NOW + 86_400_000;
    let inv = Invite::seal(&g, &alice(), &bob.public_id(), expiry, &mut rng).unwrap();
    let iv = |recipient: &Identity, now: u64, invite: &str, expect: Value, what: &str| json!({"kind": "invite", "description": what, "recipient": recipient.to_secret_string().as_str(), "now_ms": now, "invite": invite, "expect": expect});
    write(
        &dir,
        "ok_invite",
        iv(
            &bob,
            NOW,
            &inv,
            json!({"scope": "sensor/#", "inviter": alice().sender_id().to_string(), "expiry_ms": expiry, "key_id": hx(ek.key_id().as_bytes())}),
            "grant for sensor/# sealed to bob",
        ),
    );
    write(
        &dir,
        "fail_invite_wrong_recipient",
        iv(
            &eve,
            NOW,
            &inv,
            json!("error"),
            "eve cannot open bob's invite",
        ),
    );
    write(
        &dir,
        "fail_invite_expired",
        iv(
            &bob,
            expiry + 1,
            &inv,
            json!("error"),
            "opened after expiry",
        ),
    );
    let raw = whispeer_protocol::text::decode(whispeer_protocol::text::hrp::INVITE, &inv).unwrap();
    let mut tampered = raw.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    let tampered = whispeer_protocol::text::encode(whispeer_protocol::text::hrp::INVITE, &tampered);
    write(
        &dir,
        "fail_invite_tampered",
        iv(
            &bob,
            NOW,
            &tampered,
            json!("error"),
            "one ciphertext bit flipped (valid checksum)",
        ),
    );

    // --- Batch signatures (sig_scheme 2, issue 11): own RNG, so earlier vectors keep
    // their bytes ---
    batch_vectors(&dir);

    // --- LZ4 (codec 2) and AES-256-GCM (suite 3), issue 11: own RNG as well ---
    codec_suite_vectors(&dir);
    dict_vectors(&dir);
    invite_dict_vectors(&dir);

    // --- Relay accounts: relay-bound sign-ins and relay names (no RNG) ---
    relay_auth_vectors(&dir);

    let count = std::fs::read_dir(&dir).unwrap().count();
    println!("wrote {count} vectors to {}", dir.display());
}

/// Decrypts the body of `env` sealed in `tk` on `topic`, lets `f` change it, re-encrypts.
/// Works for both suites, written from §4.3 with the cipher crates directly (not through
/// the library's `aead` module), so the vectors check the library rather than echo it.
fn reseal_in(tk: &TreeKey, env: &Envelope, topic: &str, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mk = tk.grant_all().message_key(&t(topic)).unwrap();
    let mut x = [0u8; 64];
    let aes = env.suite() == 3;
    let suite_part: &[u8] = if aes { &[3] } else { &[] };
    xof(mk.as_bytes(), tag::BODY, &[env.nonce(), suite_part], &mut x);
    let ct = env.ciphertext();
    let (c, tg) = ct.split_at(ct.len() - TAG_LEN);
    let mut body = c.to_vec();
    let tag = if aes {
        use aes_gcm::{Aes256Gcm, Nonce};
        let cipher = Aes256Gcm::new((&x[..32]).into());
        let n = Nonce::from_slice(&env.nonce()[..12]);
        cipher
            .decrypt_in_place_detached(n, env.header(), &mut body, Tag::from_slice(tg))
            .unwrap();
        f(&mut body);
        cipher
            .encrypt_in_place_detached(n, env.header(), &mut body)
            .unwrap()
    } else {
        let cipher = XChaCha20Poly1305::new((&x[..32]).into());
        cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(env.nonce()),
                env.header(),
                &mut body,
                Tag::from_slice(tg),
            )
            .unwrap();
        f(&mut body);
        cipher
            .encrypt_in_place_detached(XNonce::from_slice(env.nonce()), env.header(), &mut body)
            .unwrap()
    };
    let mut out = env.header().to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}

/// Body offsets of a scheme-2 body (§4.14).
const B_COUNT: usize = 97;
const B_INDEX: usize = 101;
const B_PATH_LEN: usize = 137;
const B_PATH: usize = 138;

fn batch_vectors(dir: &Path) {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0xba7c);
    let tk = tree(0, 0x22);
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = alice();
    // Five messages (not a power of two), four topics, mixed options.
    let msgs: [(&str, &[u8], Compression, Padding); 5] = [
        (
            "sensor/kitchen/temp",
            b"\xa1\x64temp\xf9\x4d\x60",
            Compression::None,
            Padding::Padme,
        ),
        (
            "sensor/kitchen/humidity",
            b"\xa1\x63hum\x18\x2d",
            Compression::None,
            Padding::Padme,
        ),
        (
            "sensor/garage/door",
            b"open",
            Compression::None,
            Padding::None,
        ),
        (
            "chat/general",
            &[b'x'; 300],
            Compression::Zstd(3),
            Padding::Padme,
        ),
        (
            "sensor/kitchen/temp",
            b"\xa1\x64temp\xf9\x4d\x80",
            Compression::None,
            Padding::None,
        ),
    ];
    let mut sealer = Sealer::new();
    let mut prepared = Vec::new();
    let mut inputs = Vec::new();
    for (i, (topic, payload, compression, padding)) in msgs.iter().enumerate() {
        let mut msg_id = [0u8; 16];
        rng.fill_bytes(&mut msg_id);
        let ts = NOW + i as u64;
        let out = Outgoing {
            payload,
            content_type: "application/cbor",
            msg_id: MessageId(msg_id),
            ts_ms: ts,
        };
        let opts = SealOptions {
            compression: *compression,
            padding: *padding,
            suite: Suite::XChaCha20Poly1305,
        };
        let key = kr.topic_key(&t(topic)).unwrap();
        prepared.push(sealer.prepare(&key, &out, &opts).unwrap());
        inputs.push((msg_id, ts));
    }
    let mut salts = vec![0u8; 32 * msgs.len()];
    rng.fill_bytes(&mut salts);
    let mut b = BatchSigner::new(BatchPolicy::default());
    let mut srng = FixedRng::new(&salts);
    for p in &prepared {
        b.push(p, 0, &mut srng).unwrap();
    }
    let proofs = b.sign(&id).unwrap();
    let root = proofs[0].root(prepared[0].sig_input()).unwrap();
    let mut envs = Vec::new();
    let mut items = Vec::new();
    for (i, ((p, proof), (topic, payload, compression, padding))) in
        prepared.iter().zip(&proofs).zip(&msgs).enumerate()
    {
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let env = sealer
            .seal_prepared(p, Signing::Batch(proof), &mut FixedRng::new(&nonce))
            .unwrap();
        let grant = tk.grant(&Scope::Topic(t(topic)));
        items.push(json!({
            "topic": topic,
            "content_type": "application/cbor",
            "payload": hx(payload),
            "msg_id": hx(&inputs[i].0),
            "ts_ms": inputs[i].1,
            "compression": compression.to_string(),
            "padding": match padding { Padding::None => "none", Padding::Padme => "padme" },
            "salt": hx(proof.salt()),
            "nonce": hx(&nonce),
            "index": i,
            "path": proof.path().iter().map(|h| hx(h)).collect::<Vec<_>>(),
            "grant": grant.to_key_string().as_str(),
            "envelope": hx(env.as_bytes()),
        }));
        envs.push(env);
    }
    write(
        dir,
        "ok_batch_five_messages",
        json!({
            "kind": "batch",
            "description": "five messages on four topics signed as one batch (count 5, not a power of two); each envelope opens alone with a grant for its topic only",
            "keys": [{"key": tk.to_key_string().as_str(), "added_ms": 0}],
            "grace_ms": keyring::DEFAULT_EPOCH_GRACE_MS,
            "now_ms": NOW,
            "signer": id.to_secret_string().as_str(),
            "messages": items,
            "expect": {
                "sender": id.sender_id().to_string(),
                "count": msgs.len(),
                "root": hx(&root),
                "signature": hx(&proofs[0].signature()),
            },
        }),
    );

    // Fail vectors: a validly encrypted body whose batch proof is wrong, each with the
    // typed reason `check_body` reports (the opener itself stays opaque).
    let base = |topic: &str, keys: Value| {
        json!({
            "kind": "envelope",
            "keys": keys,
            "grace_ms": keyring::DEFAULT_EPOCH_GRACE_MS,
            "now_ms": NOW,
            "live": true,
            "check_body": {"topic": topic},
        })
    };
    let tree_keys = json!([{"key": tk.to_key_string().as_str(), "added_ms": 0}]);
    let fail = |name: &str, what: &str, i: usize, reason: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let topic = msgs[i].0;
        let bytes = reseal_in(&tk, &envs[i], topic, f);
        let mut v = base(topic, tree_keys.clone());
        v["reason"] = json!(reason);
        fail_env(dir, name, what, &v, &bytes);
    };
    fail(
        "fail_envelope_batch_wrong_path",
        "message 1 of the batch: one bit of its first path sibling flipped",
        1,
        "signature does not verify",
        &|b| b[B_PATH + 5] ^= 0x01,
    );
    fail(
        "fail_envelope_batch_reordered_leaves",
        "message 0 claims leaf index 1 (same path length): the leaves reordered",
        0,
        "signature does not verify",
        &|b| b[B_INDEX..B_INDEX + 4].copy_from_slice(&1u32.to_be_bytes()),
    );
    fail(
        "fail_envelope_batch_count_changed",
        "message 0 (index 0 of 5, path length 3) claims count 6, which implies the same path length",
        0,
        "signature does not verify",
        &|b| b[B_COUNT..B_COUNT + 4].copy_from_slice(&6u32.to_be_bytes()),
    );
    fail(
        "fail_envelope_batch_count_out_of_range",
        "batch count 4097 (the limit is 4096)",
        4,
        "batch count 4097",
        &|b| b[B_COUNT..B_COUNT + 4].copy_from_slice(&4097u32.to_be_bytes()),
    );
    fail(
        "fail_envelope_batch_count_zero",
        "batch count 0",
        4,
        "batch count 0",
        &|b| b[B_COUNT..B_COUNT + 4].copy_from_slice(&0u32.to_be_bytes()),
    );
    fail(
        "fail_envelope_batch_index_out_of_range",
        "leaf index 5 in a batch of 5",
        4,
        "batch index 5 not below count 5",
        &|b| b[B_INDEX..B_INDEX + 4].copy_from_slice(&5u32.to_be_bytes()),
    );
    fail(
        "fail_envelope_batch_path_too_long",
        "leaf 4 of 5 needs a path of 1; it carries 2 (an extra sibling, unpadded body)",
        4,
        "batch path length 2, expected 1",
        &|b| {
            b[B_PATH_LEN] = 2;
            b.splice(B_PATH + 32..B_PATH + 32, [0x5a; 32]);
        },
    );
    fail(
        "fail_envelope_batch_path_too_short",
        "leaf 2 of 5 needs a path of 3; it carries 0",
        2,
        "batch path length 0, expected 3",
        &|b| {
            b[B_PATH_LEN] = 0;
            b.drain(B_PATH..B_PATH + 96);
        },
    );
    // Root reuse across trees and epochs: message 0's body (proof for tree A, epoch 0) moved
    // into an envelope of tree B (or of epoch 1 of tree A), validly encrypted there.
    let body0 = {
        let mut body = Vec::new();
        reseal_in(&tk, &envs[0], msgs[0].0, |b| body = b.clone());
        body
    };
    for (name, what, other) in [
        (
            "fail_envelope_batch_root_reuse_across_trees",
            "a batch proof signed for tree A, its body re-encrypted under tree B's key",
            TreeKey::from_parts(TreeId([0x12; 16]), 0, "other", [0x23; 32], [0x33; 32]).unwrap(),
        ),
        (
            "fail_envelope_batch_root_reuse_across_epochs",
            "a batch proof signed for epoch 0, its body re-encrypted under epoch 1 of the same tree",
            tree(1, 0x24),
        ),
    ] {
        let mut okr = Keyring::new();
        okr.add_tree_key_at(&other, 0).unwrap();
        let key = okr.topic_key(&t(msgs[0].0)).unwrap();
        let carrier = Sealer::new()
            .seal(
                &key,
                &Outgoing { payload: b"carrier", content_type: "", msg_id: MessageId([0; 16]), ts_ms: NOW },
                &SealOptions::default(),
                None,
                &mut rng,
            )
            .unwrap();
        let bytes = reseal_in(&other, &carrier, msgs[0].0, |b| *b = body0.clone());
        let mut v = base(
            msgs[0].0,
            json!([{"key": other.to_key_string().as_str(), "added_ms": 0}]),
        );
        v["reason"] = json!("signature does not verify");
        fail_env(dir, name, what, &v, &bytes);
    }
}

/// The fields of a grant written by hand from PROTOCOL.md §5.7 and §6.3 (not through the
/// library), so the generator can write what an attacker would: any key, any flags, any
/// signer. `main` checks it reproduces the library's bytes for honest input.
#[derive(Clone, Copy)]
struct RawGrant<'a> {
    tree_id: [u8; 16],
    epoch: u64,
    flags: u8,
    name: &'a str,
    admin_seed: [u8; 32],
    r: [u8; 32],
    n: [u8; 32],
    prev_cutoff_ms: u64,
    not_after_ms: u64,
    scope: (u8, &'a str),
    key: [u8; 32],
    /// `None`: admin-signed; `Some((parent, narrower seed))`: narrowed.
    narrowed: Option<((u8, &'a str), [u8; 32])>,
}

fn put_lp(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

impl RawGrant<'_> {
    fn epoch_keys(tree_id: [u8; 16], epoch: u64, root: [u8; 32]) -> ([u8; 32], [u8; 32], [u8; 32]) {
        let b = kh(&root, tag::BASE, &[&tree_id, &epoch.to_be_bytes()]);
        let r = *kh(b.as_bytes(), tag::ROUTING, &[]).as_bytes();
        let n = *kh(b.as_bytes(), tag::NAME, &[]).as_bytes();
        let s = *kh(b.as_bytes(), tag::SUBTREE_ROOT, &[]).as_bytes();
        (r, n, s)
    }
    fn key_string(&self) -> String {
        use ed25519_dalek::{Signer, SigningKey};
        let admin = SigningKey::from_bytes(&self.admin_seed);
        let mut cert = Vec::new();
        cert.extend_from_slice(&self.tree_id);
        cert.extend_from_slice(&self.epoch.to_be_bytes());
        cert.push(self.flags);
        put_lp(&mut cert, self.name.as_bytes());
        cert.extend_from_slice(admin.verifying_key().as_bytes());
        cert.extend_from_slice(&self.r);
        cert.extend_from_slice(&self.n);
        cert.extend_from_slice(&self.prev_cutoff_ms.to_be_bytes());
        cert.extend_from_slice(&self.not_after_ms.to_be_bytes());
        let mut m = b"whispeer/v2/epoch-cert\0".to_vec();
        m.extend_from_slice(&cert);
        let cert_sig = admin.sign(&m);
        let commit = kh(&self.key, tag::GRANT_COMMIT, &[]);
        let mut fields = Vec::new();
        fields.extend_from_slice(&self.tree_id);
        fields.extend_from_slice(&self.epoch.to_be_bytes());
        fields.push(self.scope.0);
        put_lp(&mut fields, self.scope.1.as_bytes());
        fields.extend_from_slice(commit.as_bytes());
        let mut out = vec![2u8];
        out.extend_from_slice(&cert);
        out.extend_from_slice(&cert_sig.to_bytes());
        out.push(self.scope.0);
        put_lp(&mut out, self.scope.1.as_bytes());
        out.extend_from_slice(&self.key);
        match self.narrowed {
            None => {
                let mut m = b"whispeer/v2/grant\0".to_vec();
                m.extend_from_slice(&fields);
                out.push(1);
                out.extend_from_slice(&admin.sign(&m).to_bytes());
            }
            Some(((pk, pp), by_seed)) => {
                let by = SigningKey::from_bytes(&by_seed);
                let mut m = b"whispeer/v2/grant-narrow\0".to_vec();
                m.extend_from_slice(&fields);
                m.push(pk);
                put_lp(&mut m, pp.as_bytes());
                out.push(2);
                out.push(pk);
                put_lp(&mut out, pp.as_bytes());
                out.extend_from_slice(by.verifying_key().as_bytes());
                out.extend_from_slice(&by.sign(&m).to_bytes());
            }
        }
        whispeer_protocol::text::encode(whispeer_protocol::text::hrp::GRANT, &out)
    }
}

fn keyring_vector(
    dir: &Path,
    name: &str,
    what: &str,
    steps: Vec<Value>,
    expect: Value,
    reason: Option<&str>,
) {
    let mut v = json!({"kind": "keyring", "description": what, "grace_ms": keyring::DEFAULT_EPOCH_GRACE_MS, "steps": steps, "expect": expect});
    if let Some(r) = reason {
        v["reason"] = json!(r);
    }
    write(dir, name, v);
}

fn trust_vectors(dir: &Path, tk: &TreeKey, env: &Envelope, bv: &Value) {
    let tree_id = [0x11; 16];
    let (r, n, s_root) = RawGrant::epoch_keys(tree_id, 0, [0x22; 32]);
    let honest = RawGrant {
        tree_id,
        epoch: 0,
        flags: 0,
        name: "home",
        admin_seed: [0x33; 32],
        r,
        n,
        prev_cutoff_ms: 0,
        not_after_ms: u64::MAX,
        scope: (0, ""),
        key: s_root,
        narrowed: None,
    };
    // The hand-written layout is the library's layout.
    assert_eq!(honest.key_string(), tk.grant_all().to_key_string().as_str());
    let alice_seed = [0x44; 32];
    let sensor = tk.grant(&Scope::Subtree(t("sensor")));
    let honest_narrow = sensor
        .narrow(&t("sensor/kitchen/temp"), true, &alice())
        .unwrap();
    let forged = RawGrant {
        scope: (2, "sensor/kitchen/temp"),
        key: [0x66; 32],
        narrowed: Some(((1, "sensor"), alice_seed)),
        ..RawGrant {
            ..honest_ref(&honest)
        }
    };
    let step = |k: &str, g: &str, at: u64| json!({k: g, "added_ms": at});
    keyring_vector(
        dir,
        "fail_keyring_forged_topic_grant_under_subtree",
        "holding the admin-signed sensor/#, a member's exact-topic grant for sensor/kitchen/temp with a key she chose (validly signed by her) is refused",
        vec![step("grant", &sensor.to_key_string(), 0), step("grant", &forged.key_string(), 1)],
        json!("error"),
        Some("contradicts the key derived from the held grant for 'sensor/#'"),
    );
    keyring_vector(
        dir,
        "ok_keyring_narrowed_grant_derived",
        "an honest narrowing by alice of a held admin-signed grant is derived and checked",
        vec![
            step("grant", &sensor.to_key_string(), 0),
            step("grant", &honest_narrow.to_key_string(), 1),
        ],
        json!({"held": [
            {"scope": "sensor/#", "provenance": "admin-signed"},
            {"scope": "sensor/kitchen/temp", "provenance": "derived from 'sensor/#'"},
        ]}),
        None,
    );
    keyring_vector(
        dir,
        "ok_keyring_delegated_grant",
        "a narrowed grant nothing held can confirm is delegated by its narrower",
        vec![step("grant", &honest_narrow.to_key_string(), 0)],
        json!({"held": [
            {"scope": "sensor/kitchen/temp", "provenance": format!("delegated by {}", alice().sender_id())},
        ]}),
        None,
    );
    keyring_vector(
        dir,
        "ok_keyring_forged_grant_dropped_by_verified_broader",
        "a forged delegated grant held first is dropped when the admin-signed sensor/# arrives",
        vec![
            step("grant", &forged.key_string(), 0),
            step("grant", &sensor.to_key_string(), 1),
        ],
        json!({"held": [{"scope": "sensor/#", "provenance": "admin-signed"}]}),
        None,
    );
    // A narrowing of a forged (delegated) subtree grant is as unverified as the forgery,
    // whichever arrives first: `derived` comes from a verified held grant only.
    let forged_kitchen = RawGrant {
        scope: (1, "sensor/kitchen"),
        key: [0x66; 32],
        narrowed: Some(((1, "sensor"), alice_seed)),
        ..honest_ref(&honest)
    };
    let kitchen_temp = Grant::from_key_string(&forged_kitchen.key_string())
        .unwrap()
        .narrow(&t("sensor/kitchen/temp"), true, &alice())
        .unwrap();
    let both_delegated = json!({"held": [
        {"scope": "sensor/kitchen/#", "provenance": format!("delegated by {}", alice().sender_id())},
        {"scope": "sensor/kitchen/temp", "provenance": format!("delegated by {}", alice().sender_id())},
    ]});
    keyring_vector(
        dir,
        "ok_keyring_narrowing_of_delegated_stays_delegated",
        "alice's forged sensor/kitchen/# (a key she chose), then her narrowing of it to sensor/kitchen/temp: both delegated by her, neither derived",
        vec![
            step("grant", &forged_kitchen.key_string(), 0),
            step("grant", &kitchen_temp.to_key_string(), 1),
        ],
        both_delegated.clone(),
        None,
    );
    keyring_vector(
        dir,
        "ok_keyring_delegated_broader_confirms_nothing",
        "alice's narrowing to sensor/kitchen/temp, then her forged sensor/kitchen/# it derives from: a delegated grant confirms nothing, both stay delegated by her",
        vec![
            step("grant", &kitchen_temp.to_key_string(), 0),
            step("grant", &forged_kitchen.key_string(), 1),
        ],
        both_delegated,
        None,
    );
    // A second tree copying R and N.
    let copy_same_id = RawGrant {
        admin_seed: [0x35; 32],
        ..honest_ref(&honest)
    };
    keyring_vector(
        dir,
        "fail_keyring_second_tree_claims_key_id",
        "a certificate copying the tree id, R and N under another admin cannot take the key id",
        vec![
            step("key", &tk.to_key_string(), 0),
            step("grant", &copy_same_id.key_string(), 1),
        ],
        json!("error"),
        Some("signed by a different admin"),
    );
    let copy_other_id = RawGrant {
        tree_id: [0x12; 16],
        admin_seed: [0x35; 32],
        ..honest_ref(&honest)
    };
    let mut v = bv.clone();
    v["keys"] = json!([
        {"key": tk.to_key_string().as_str(), "added_ms": 0},
        {"grant": copy_other_id.key_string(), "added_ms": 1},
    ]);
    v["description"] = json!("another tree copying R and N gets another key id: the envelope still opens as the first tree's");
    v.as_object_mut().unwrap().remove("seal");
    write(dir, "ok_envelope_second_tree_copying_rn", v);
    // A grant with a bad admin signature (valid checksum).
    let mut raw = whispeer_protocol::text::decode(
        whispeer_protocol::text::hrp::GRANT,
        &sensor.to_key_string(),
    )
    .unwrap();
    *raw.last_mut().unwrap() ^= 1;
    let bad = whispeer_protocol::text::encode(whispeer_protocol::text::hrp::GRANT, &raw);
    keyring_vector(
        dir,
        "fail_keyring_grant_bad_admin_signature",
        "an admin-signed grant whose signature does not verify",
        vec![step("grant", &bad, 0)],
        json!("error"),
        Some("bad signature on grant (admin)"),
    );
    // An epoch signed by a non-admin.
    let other_admin = TreeKey::from_parts(TreeId(tree_id), 1, "home", [0x24; 32], [0x35; 32])
        .unwrap()
        .with_prev_cutoff(NOW);
    keyring_vector(
        dir,
        "fail_keyring_epoch_signed_by_non_admin",
        "epoch 1 of the tree signed by another key than the pinned admin",
        vec![
            step("key", &tk.to_key_string(), 0),
            step("key", &other_admin.to_key_string(), 1),
        ],
        json!("error"),
        Some("signed by a different admin"),
    );
    // Epoch 1 of a passphrase tree.
    let fast = PassphraseParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    let pt = TreeKey::from_passphrase_in_realm_any_params(
        "family",
        "",
        b"correct horse battery staple",
        fast,
    )
    .unwrap();
    let pt_raw =
        whispeer_protocol::text::decode(whispeer_protocol::text::hrp::TREE, &pt.to_key_string())
            .unwrap();
    let pt_seed: [u8; 32] = pt_raw[58..90].try_into().unwrap();
    let (pr, pn, ps) = RawGrant::epoch_keys(pt.tree_id().0, 1, [0x77; 32]);
    let flagged = RawGrant {
        tree_id: pt.tree_id().0,
        epoch: 1,
        flags: 1,
        name: "family",
        admin_seed: pt_seed,
        r: pr,
        n: pn,
        prev_cutoff_ms: NOW,
        not_after_ms: u64::MAX,
        scope: (0, ""),
        key: ps,
        narrowed: None,
    };
    keyring_vector(
        dir,
        "fail_keyring_passphrase_epoch_1",
        "a member who knows the passphrase signs epoch 1 of the passphrase tree (marked as such)",
        vec![
            step("key", &pt.to_key_string(), 0),
            step("grant", &flagged.key_string(), 1),
        ],
        json!("error"),
        Some("passphrase tree"),
    );
    let unflagged = RawGrant {
        flags: 0,
        ..honest_ref(&flagged)
    };
    keyring_vector(
        dir,
        "fail_keyring_passphrase_epoch_1_unmarked",
        "the same epoch 1 without the passphrase flag: refused by the pinned flag",
        vec![
            step("key", &pt.to_key_string(), 0),
            step("grant", &unflagged.key_string(), 1),
        ],
        json!("error"),
        Some("passphrase flag differs"),
    );
    // An end on the passphrase tree's own epoch 0, signed by a member with the admin key
    // she derived: it would cut every other member off (§5.9).
    let pt_root: [u8; 32] = pt_raw[26..58].try_into().unwrap();
    let (er, en, es) = RawGrant::epoch_keys(pt.tree_id().0, 0, pt_root);
    let ended = RawGrant {
        epoch: 0,
        r: er,
        n: en,
        prev_cutoff_ms: 0,
        not_after_ms: 1,
        key: es,
        ..honest_ref(&flagged)
    };
    keyring_vector(
        dir,
        "fail_keyring_passphrase_not_after",
        "a member who knows the passphrase signs epoch 0 of the passphrase tree with an end",
        vec![
            step("key", &pt.to_key_string(), 0),
            step("grant", &ended.key_string(), 1),
        ],
        json!("error"),
        Some("a passphrase tree has no end"),
    );
    // Rotation cutoff.
    let e = env.as_bytes().to_vec();
    let cut = |cutoff: u64, added: u64, grace: u64, live: bool| {
        let mut v = bv.clone();
        v["keys"] = json!([
            {"key": tree(0, 0x22).to_key_string().as_str(), "added_ms": 0},
            {"key": tree(1, 0x24).with_prev_cutoff(cutoff).to_key_string().as_str(), "added_ms": added},
        ]);
        v["grace_ms"] = json!(grace);
        v["live"] = json!(live);
        v.as_object_mut().unwrap().remove("seal");
        v
    };
    fail_env(
        dir,
        "fail_envelope_previous_epoch_after_cutoff",
        "live, within the grace period, but dated (NOW) at the rotation cutoff: a removed member's message",
        &cut(NOW, NOW - 1_000, 5_000, true),
        &e,
    );
    fail_env(
        dir,
        "fail_envelope_previous_epoch_history_after_cutoff",
        "from history, dated at the rotation cutoff",
        &cut(NOW, NOW - 1_000, 5_000, false),
        &e,
    );
    let mut v = cut(NOW + 1, NOW - 10_000_000, 5_000, false);
    v["description"] =
        json!("from history long after the grace period: dated before the cutoff, accepted");
    write(dir, "ok_envelope_previous_epoch_history_before_cutoff", v);
    let mut v = bv.clone();
    v["keys"] = json!([{"key": tree(0, 0x22).with_not_after(Some(NOW - 1)).unwrap().to_key_string().as_str(), "added_ms": 0}]);
    fail_env(
        dir,
        "fail_envelope_after_not_after",
        "dated after its epoch's not_after_ms",
        &v,
        &e,
    );
    // The signed (scheme 1) body of the base envelope with its scheme byte changed to 2, the
    // batch signature (written when scheme 2 was reserved; its bytes are kept): what follows
    // the byte is not a batch proof.
    let batch = reseal_body(env, "sensor/kitchen/temp", |b| b[0] = 2);
    fail_env(
        dir,
        "fail_envelope_batch_signature_scheme",
        "a signed body whose signature scheme byte was changed from 1 to 2 (batch signature): refused as a malformed scheme-2 body (the msg_id bytes read as a batch count of 4076490357, out of range)",
        bv,
        &batch,
    );
    // A version-1 envelope.
    let mut v1 = e.clone();
    v1[0] = 1;
    let mut v = bv.clone();
    v["reason"] = json!("unsupported envelope version 1");
    fail_env(
        dir,
        "fail_envelope_v1",
        "envelope version 1 (the format before the trusted-key change)",
        &v,
        &v1,
    );
}

fn honest_ref<'a>(g: &RawGrant<'a>) -> RawGrant<'a> {
    *g
}

fn pattern_json(p: &TokenPattern) -> Value {
    json!({
        "key_id": hx(p.key_id().as_bytes()),
        "elems": p.elems().iter().map(|e| match e {
            PatternElem::Token(t) => json!(hx(t.as_bytes())),
            PatternElem::One => json!("+"),
            PatternElem::Rest => json!("#"),
        }).collect::<Vec<_>>(),
    })
}

/// `ok_*` vectors for LZ4 and AES-256-GCM (alone and together), and the `fail_*` vectors
/// for a lying LZ4 size, a broken LZ4 block, a tampered GCM tag and a rewritten suite byte.
fn codec_suite_vectors(dir: &Path) {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0x1a4c);
    // Realistic JSON: what an LZ4 topic would carry.
    let json_payload = br#"[{"room":"kitchen","celsius":21.5,"humidity":41,"ok":true},{"room":"garage","celsius":12.25,"humidity":63,"ok":true},{"room":"attic","celsius":27.0,"humidity":35,"ok":false}]"#.to_vec();
    assert!(
        whispeer_protocol::compress::lz4_compress(&json_payload)
            .unwrap()
            .len()
            < json_payload.len(),
        "the LZ4 vectors really carry codec 2"
    );
    let case = |compression, padding, signed, suite| Case {
        topic: "sensor/kitchen/temp",
        content_type: "application/json",
        payload: json_payload.clone(),
        compression,
        padding,
        signed,
        suite,
    };
    let cases = [
        (
            "ok_envelope_lz4_signed_padme",
            case(
                Compression::Lz4,
                Padding::Padme,
                true,
                Suite::XChaCha20Poly1305,
            ),
        ),
        (
            "ok_envelope_aes_gcm_signed_zstd_padme",
            case(Compression::Zstd(3), Padding::Padme, true, Suite::Aes256Gcm),
        ),
        (
            "ok_envelope_aes_gcm_lz4_unsigned_plain",
            case(Compression::Lz4, Padding::None, false, Suite::Aes256Gcm),
        ),
        (
            "ok_envelope_aes_gcm_plain_signed",
            case(Compression::None, Padding::Padme, true, Suite::Aes256Gcm),
        ),
    ];
    let mut sealed = Vec::new();
    for (name, c) in &cases {
        let (env, v) = seal_case(&mut rng, c);
        write(dir, name, v.clone());
        sealed.push((env, v));
    }
    let (x_env, x_v) = &sealed[0]; // suite 1, LZ4, signed
    let (a_env, a_v) = &sealed[2]; // suite 3, LZ4, unsigned, no padding
    let topic = "sensor/kitchen/temp";
    let tk = tree(0, 0x22);
    let with_byte = |env: &Envelope, i: usize, b: u8| {
        let mut v = env.as_bytes().to_vec();
        v[i] = b;
        v
    };
    let xor_last = |env: &Envelope| {
        let mut v = env.as_bytes().to_vec();
        *v.last_mut().unwrap() ^= 0x01;
        v
    };
    let suite_reason = |v: &Value, r: &str| {
        let mut v = v.clone();
        v["reason"] = json!(r);
        v
    };
    fail_env(
        dir,
        "fail_envelope_aes_gcm_flip_body_tag",
        "suite 3: bit flipped in the body's GCM tag",
        a_v,
        &xor_last(a_env),
    );
    let name_tag = a_env.header().len() - 1;
    fail_env(
        dir,
        "fail_envelope_aes_gcm_flip_name_tag",
        "suite 3: bit flipped in the sealed name's GCM tag",
        a_v,
        &with_byte(a_env, name_tag, a_env.as_bytes()[name_tag] ^ 0x01),
    );
    fail_env(
        dir,
        "fail_envelope_suite_1_to_3",
        "suite byte rewritten from 1 to 3: parses, but the commitment (derived with the suite) and the AD differ",
        x_v,
        &with_byte(x_env, 1, 3),
    );
    fail_env(
        dir,
        "fail_envelope_suite_3_to_1",
        "suite byte rewritten from 3 to 1: parses, but the commitment and the AD differ",
        a_v,
        &with_byte(a_env, 1, 1),
    );
    fail_env(
        dir,
        "fail_envelope_suite_2_reserved",
        "suite 2 is reserved (forward-secret suite): refused by the parser",
        &suite_reason(a_v, "unsupported cipher suite 2"),
        &with_byte(a_env, 1, 2),
    );
    fail_env(
        dir,
        "fail_envelope_unknown_suite",
        "suite 4 is unknown: refused by the parser",
        &suite_reason(a_v, "unsupported cipher suite 4"),
        &with_byte(a_env, 1, 4),
    );

    // LZ4 payloads that lie, inside a validly encrypted unsigned body (so the failure is
    // the decompression of §4.6, step 10 of §4.10): the checker names the typed reason.
    let lz4_fail = |name: &str, what: &str, reason: &str, f: &dyn Fn(&[u8]) -> Vec<u8>| {
        let bytes = reseal_in(&tk, a_env, topic, |body| {
            // Unsigned, no padding: sig_scheme ‖ msg_id ‖ ts ‖ lp(ct) ‖ codec ‖ pad ‖ len ‖ payload.
            let ct_len = u16::from_be_bytes([body[25], body[26]]) as usize;
            let codec_off = 27 + ct_len;
            assert_eq!(body[codec_off], 2, "codec 2");
            let payload = f(&body[codec_off + 6..]);
            body.truncate(codec_off + 2);
            body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            body.extend_from_slice(&payload);
        });
        let mut v = a_v.clone();
        v["reason"] = json!(reason);
        v["check_body"] = json!({"topic": topic});
        fail_env(dir, name, what, &v, &bytes);
    };
    let set_size = |p: &[u8], n: u32| {
        let mut p = p.to_vec();
        p[..4].copy_from_slice(&n.to_be_bytes());
        p
    };
    let real = json_payload.len() as u32;
    lz4_fail(
        "fail_envelope_lz4_declared_above_cap",
        "LZ4 size prefix declares 16 MiB + 1 (the default cap is 16 MiB): refused before allocating",
        "exceeds the decompression cap",
        &|p| set_size(p, (16 << 20) + 1),
    );
    lz4_fail(
        "fail_envelope_lz4_declared_too_large",
        "LZ4 size prefix one more than the block decodes to",
        "does not decompress",
        &|p| set_size(p, real + 1),
    );
    lz4_fail(
        "fail_envelope_lz4_declared_too_small",
        "LZ4 size prefix one less than the block decodes to",
        "does not decompress",
        &|p| set_size(p, real - 1),
    );
    lz4_fail(
        "fail_envelope_lz4_truncated_block",
        "LZ4 block cut short by 3 bytes (payload_len adjusted)",
        "does not decompress",
        &|p| p[..p.len() - 3].to_vec(),
    );
    lz4_fail(
        "fail_envelope_lz4_no_size_prefix",
        "codec 2 payload of 3 bytes: shorter than its size prefix",
        "does not decompress",
        &|p| p[..3].to_vec(),
    );
}

/// Realistic telemetry JSON (fixed seed), for training and the codec-3 vectors.
fn telemetry_samples(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let rooms = ["kitchen", "garage", "attic", "bedroom", "hall", "office"];
    (0..n)
        .map(|i| {
            let r = rooms[(rng.next_u32() as usize) % rooms.len()];
            let c = 15.0 + (rng.next_u32() % 1500) as f64 / 100.0;
            let h = 30 + rng.next_u32() % 40;
            format!(
                r#"{{"device":"th-{:04}","room":"{r}","seq":{i},"ts":"2026-11-30T12:{:02}:{:02}Z","celsius":{c:.2},"humidity":{h},"battery":{},"firmware":"2.4.1","ok":{}}}"#,
                rng.next_u32() % 10000,
                i % 60,
                (i * 7) % 60,
                rng.next_u32() % 101,
                rng.next_u32() % 10 != 0,
            )
            .into_bytes()
        })
        .collect()
}

/// A zstd-format dictionary's bytes with garbage entropy tables (bytes 8..64 set to 0xff):
/// zstd cannot load it.
fn broken_entropy_tables(d: &Dictionary) -> Vec<u8> {
    assert!(d.is_zstd_format());
    let mut broken = d.as_bytes().to_vec();
    broken[8..64].fill(0xff);
    broken
}

/// Codec 3 (zstd with a dictionary, §4.6.1) and `wsdict` strings (§6.4).
fn dict_vectors(dir: &Path) {
    let samples = telemetry_samples(400, 0xd1c7);
    let trained = zstd::dict::from_samples(&samples, 4096).expect("training");
    let dict = Dictionary::new(trained).unwrap();
    assert!(dict.is_zstd_format());
    let dict_str = dict.to_key_string().to_string();
    let payload = telemetry_samples(1, 0x5eed).remove(0);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0xd1c8);
    let level3 = Compression::ZstdDict {
        level: 3,
        dict: dict.id(),
    };
    let mut cases = Vec::new();
    for (name, suite, padding, signed) in [
        (
            "ok_envelope_zstd_dict_signed_padme",
            Suite::XChaCha20Poly1305,
            Padding::Padme,
            true,
        ),
        (
            "ok_envelope_zstd_dict_aes_gcm_unsigned_plain",
            Suite::Aes256Gcm,
            Padding::None,
            false,
        ),
    ] {
        let c = Case {
            topic: "sensor/kitchen/temp",
            content_type: "application/json",
            payload: payload.clone(),
            compression: level3,
            padding,
            signed,
            suite,
        };
        let (env, mut v) = seal_case_with(&mut rng, &c, Some(&dict));
        v["dictionaries"] = json!([dict_str.as_str()]);
        write(dir, name, v.clone());
        cases.push((env, v));
    }
    let (s_env, s_v) = &cases[0];
    let (u_env, u_v) = &cases[1];
    let topic = "sensor/kitchen/temp";
    let tk = tree(0, 0x22);

    // The receiver does not hold the dictionary: the body opens and verifies, and the
    // failure is the one typed error (§4.10 step 10).
    let mut v = s_v.clone();
    v.as_object_mut().unwrap().remove("dictionaries");
    v["reason"] = json!(format!("needs zstd dictionary {}", dict.id()));
    fail_env(
        dir,
        "fail_envelope_zstd_dict_missing",
        "codec 3 names a dictionary the receiver does not hold: reported as such (the AEAD and the signature passed)",
        &v,
        s_env.as_bytes(),
    );
    // Another dictionary held, not the one named.
    let other = Dictionary::new(b"{\"unrelated\":\"dictionary content\"}".repeat(8)).unwrap();
    let mut v = s_v.clone();
    v["dictionaries"] = json!([other.to_key_string().as_str()]);
    v["reason"] = json!(format!("needs zstd dictionary {}", dict.id()));
    fail_env(
        dir,
        "fail_envelope_zstd_dict_other_dictionary_held",
        "codec 3 names dictionary A; the receiver holds only dictionary B",
        &v,
        s_env.as_bytes(),
    );

    // Payloads that lie, inside a validly encrypted unsigned body (checker: typed reason).
    let dict_fail = |name: &str, what: &str, reason: &str, f: &dyn Fn(&[u8]) -> Vec<u8>| {
        let bytes = reseal_in(&tk, u_env, topic, |body| {
            let ct_len = u16::from_be_bytes([body[25], body[26]]) as usize;
            let codec_off = 27 + ct_len;
            assert_eq!(body[codec_off], 3, "codec 3");
            let payload = f(&body[codec_off + 6..]);
            body.truncate(codec_off + 2);
            body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            body.extend_from_slice(&payload);
        });
        let mut v = u_v.clone();
        v["reason"] = json!(reason);
        v["check_body"] = json!({"topic": topic});
        fail_env(dir, name, what, &v, &bytes);
    };
    let with_frame = |frame: Vec<u8>| {
        let mut p = dict.id().0.to_vec();
        p.extend_from_slice(&frame);
        p
    };
    let mut bomb = zstd::bulk::Compressor::with_dictionary(3, dict.as_bytes()).unwrap();
    bomb.set_parameter(zstd::stream::raw::CParameter::DictIdFlag(false))
        .unwrap();
    let bomb_frame = bomb.compress(&vec![0u8; (16 << 20) + 1]).unwrap();
    dict_fail(
        "fail_envelope_zstd_dict_declared_above_cap",
        "codec 3 frame declaring 16 MiB + 1 (the default cap is 16 MiB): refused before allocating",
        "exceeds the decompression cap",
        &|_| with_frame(bomb_frame.clone()),
    );
    let mut with_id = zstd::bulk::Compressor::with_dictionary(3, dict.as_bytes()).unwrap();
    with_id
        .set_parameter(zstd::stream::raw::CParameter::DictIdFlag(true))
        .unwrap();
    let id_frame = with_id.compress(&payload).unwrap();
    assert_ne!(id_frame[4] & 3, 0, "the frame carries a Dictionary_ID");
    dict_fail(
        "fail_envelope_zstd_dict_frame_has_dictionary_id",
        "codec 3 frame with a Dictionary_ID field (senders MUST omit it): refused",
        "carries a Dictionary_ID field",
        &|_| with_frame(id_frame.clone()),
    );
    dict_fail(
        "fail_envelope_zstd_dict_short_payload",
        "codec 3 payload of 10 bytes: shorter than the dictionary id",
        "shorter than its dictionary id",
        &|p| p[..10].to_vec(),
    );
    dict_fail(
        "fail_envelope_zstd_dict_truncated_frame",
        "codec 3 frame cut short by 3 bytes",
        "does not decompress",
        &|p| p[..p.len() - 3].to_vec(),
    );
    dict_fail(
        "fail_envelope_zstd_dict_no_content_size",
        "codec 3 frame without Frame_Content_Size",
        "without content size",
        &|_| {
            // A streaming encoder that pledges no size writes no Frame_Content_Size.
            let mut out = Vec::new();
            {
                let mut e =
                    zstd::stream::Encoder::with_dictionary(&mut out, 3, dict.as_bytes()).unwrap();
                e.set_parameter(zstd::stream::raw::CParameter::DictIdFlag(false))
                    .unwrap();
                std::io::Write::write_all(&mut e, &payload).unwrap();
                e.finish().unwrap();
            }
            assert!(zstd::zstd_safe::get_frame_content_size(&out)
                .unwrap()
                .is_none());
            with_frame(out)
        },
    );

    // Dictionary strings (§6.4).
    write(
        dir,
        "ok_dictionary_trained",
        json!({
            "kind": "dictionary",
            "string": dict_str.as_str(),
            "expect": {"id": dict.id().to_string(), "len": dict.len(), "zstd_format": true},
        }),
    );
    let raw = Dictionary::new(samples[..4].concat()).unwrap();
    write(
        dir,
        "ok_dictionary_raw_content",
        json!({
            "kind": "dictionary",
            "string": raw.to_key_string().as_str(),
            "expect": {"id": raw.id().to_string(), "len": raw.len(), "zstd_format": false},
        }),
    );
    let dict_fail_str = |name: &str, what: &str, reason: &str, bytes: Vec<u8>| {
        write(
            dir,
            name,
            json!({
                "kind": "dictionary",
                "description": what,
                "string": text::encode_long(text::hrp::DICT, &bytes),
                "expect": "error",
                "reason": reason,
            }),
        );
    };
    let layout = |format: u8, id: &[u8], bytes: &[u8]| {
        let mut b = vec![format];
        b.extend_from_slice(id);
        b.extend_from_slice(bytes);
        b
    };
    let mut wrong_id = dict.id().0;
    wrong_id[0] ^= 1;
    dict_fail_str(
        "fail_dictionary_id_mismatch",
        "the id does not match the dictionary bytes",
        "does not match",
        layout(1, &wrong_id, dict.as_bytes()),
    );
    dict_fail_str(
        "fail_dictionary_format_2",
        "format byte 2 (unknown)",
        "format version 2",
        layout(2, &dict.id().0, dict.as_bytes()),
    );
    let big: Vec<u8> = (0..112 * 1024 + 1).map(|i| (i * 31 % 251) as u8).collect();
    dict_fail_str(
        "fail_dictionary_too_large",
        "112 KiB + 1 bytes",
        "exceeds the limit",
        layout(1, &DictId::of(&big).0, &big),
    );
    dict_fail_str(
        "fail_dictionary_too_short",
        "7 bytes",
        "at least 8",
        layout(1, &DictId::of(b"1234567").0, b"1234567"),
    );
    let broken = broken_entropy_tables(&dict);
    dict_fail_str(
        "fail_dictionary_broken_entropy_tables",
        "zstd-format dictionary whose entropy tables are garbage",
        "cannot use these bytes",
        layout(1, &DictId::of(&broken).0, &broken),
    );
}

/// An invite written by hand from §7 (not through the library): the plaintext of `inner`
/// format, the inviter's Ed25519 signature (`signed`: the dictionary section the signature
/// covers, `None` for format 2), and the HPKE seal with `seed`'s RNG, under the string
/// format byte `outer`.
struct HandInvite<'a> {
    outer: u8,
    inner: u8,
    grant: &'a Grant,
    expiry: u64,
    dicts: Vec<u8>,
    signed: Option<Vec<u8>>,
}

impl HandInvite<'_> {
    fn seal(&self, inviter_seed: &[u8; 32], recipient: &PublicId, seed: u64) -> String {
        use ed25519_dalek::{Signer, SigningKey};
        use hpke::{Deserializable, Serializable};
        type Kem = hpke::kem::X25519HkdfSha256;
        let inviter = SigningKey::from_bytes(inviter_seed);
        let gb = text::decode(text::hrp::GRANT, &self.grant.to_key_string()).unwrap();
        let ctx: &[u8] = match self.signed {
            None => b"whispeer/v2/invite\0",
            Some(_) => b"whispeer/v2/invite3\0",
        };
        let mut m = ctx.to_vec();
        m.extend_from_slice(&recipient.sender_id().to_bytes());
        m.extend_from_slice(recipient.x25519());
        m.extend_from_slice(&self.grant.epoch_keys().tree_id().0);
        m.extend_from_slice(&self.grant.epoch_keys().epoch().to_be_bytes());
        let scope = self.grant.scope().to_string();
        m.extend_from_slice(&(scope.len() as u16).to_be_bytes());
        m.extend_from_slice(scope.as_bytes());
        m.extend_from_slice(&self.expiry.to_be_bytes());
        m.extend_from_slice(blake3::hash(&gb).as_bytes());
        if let Some(d) = &self.signed {
            m.extend_from_slice(blake3::hash(d).as_bytes());
        }
        let sig = inviter.sign(&m);
        let mut pt = vec![self.inner];
        pt.extend_from_slice(inviter.verifying_key().as_bytes());
        pt.extend_from_slice(&self.expiry.to_be_bytes());
        pt.extend_from_slice(&sig.to_bytes());
        if self.inner == 3 {
            pt.extend_from_slice(&(gb.len() as u16).to_be_bytes());
        }
        pt.extend_from_slice(&gb);
        pt.extend_from_slice(&self.dicts);
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient.x25519()).unwrap();
        let (enc, ct) =
            hpke::single_shot_seal::<hpke::aead::ChaCha20Poly1305, hpke::kdf::HkdfSha256, Kem, _>(
                &hpke::OpModeS::Base,
                &pk,
                b"whispeer/v2/invite",
                &pt,
                recipient.x25519(),
                &mut rand_chacha::ChaCha20Rng::seed_from_u64(seed),
            )
            .unwrap();
        let mut out = vec![self.outer];
        out.extend_from_slice(&enc.to_bytes());
        out.extend_from_slice(&ct);
        text::encode_invite(&out).unwrap()
    }
}

/// A format-3 dictionary section: `u8 n ‖ (id ‖ u32be len ‖ D)*`, entries as given.
fn dict_section(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = vec![entries.len() as u8];
    for (id, d) in entries {
        b.extend_from_slice(id);
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
    }
    b
}

/// Invites that carry zstd dictionaries (format 3, §7).
fn invite_dict_vectors(dir: &Path) {
    let tk = tree(0, 0x22);
    let g = tk.grant(&Scope::Subtree(t("sensor")));
    let ek = g.epoch_keys().clone();
    let bob = Identity::from_seeds(&[0x66; 32], &[0x77; 32]);
    let eve = Identity::from_seeds(&[0x88; 32], &[0x89; 32]);
    let expiry = NOW + 86_400_000;
    let samples = telemetry_samples(200, 0x1a7e);
    let trained =
        Dictionary::new(zstd::dict::from_samples(&samples, 1024).expect("training")).unwrap();
    assert!(trained.is_zstd_format());
    let raw = Dictionary::new(samples[0].clone()).unwrap();
    let mut both = [trained.clone(), raw.clone()];
    both.sort_by_key(|d| d.id());
    let ids: Vec<String> = both.iter().map(|d| d.id().to_string()).collect();
    let both_ids: Vec<[u8; 16]> = both.iter().map(|d| d.id().0).collect();
    let entries: Vec<(&[u8], &[u8])> = both_ids
        .iter()
        .zip(&both)
        .map(|(id, d)| (&id[..], d.as_bytes()))
        .collect();
    let section = dict_section(&entries);
    const SEED: u64 = 0x1a71;

    // The library's format-3 invite, and the same written by hand from §7: byte for byte.
    let inv = Invite::seal_with_dictionaries(
        &g,
        &[raw.clone(), trained.clone(), raw.clone()],
        &alice(),
        &bob.public_id(),
        expiry,
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(SEED),
    )
    .unwrap();
    let hand = |outer: u8, inner: u8, dicts: Vec<u8>, signed: Option<Vec<u8>>| {
        HandInvite {
            outer,
            inner,
            grant: &g,
            expiry,
            dicts,
            signed,
        }
        .seal(&[0x44; 32], &bob.public_id(), SEED)
    };
    assert_eq!(
        hand(3, 3, section.clone(), Some(section.clone())),
        inv,
        "the hand-written format 3 (§7) is what the library seals"
    );
    assert_eq!(
        hand(2, 2, Vec::new(), None),
        Invite::seal(
            &g,
            &alice(),
            &bob.public_id(),
            expiry,
            &mut rand_chacha::ChaCha20Rng::seed_from_u64(SEED)
        )
        .unwrap(),
        "the hand-written format 2 (§7) is what the library seals"
    );
    let iv = |recipient: &Identity, now: u64, invite: &str, expect: Value, what: &str| json!({"kind": "invite", "description": what, "recipient": recipient.to_secret_string().as_str(), "now_ms": now, "invite": invite, "expect": expect});
    write(
        dir,
        "ok_invite_dictionaries",
        iv(
            &bob,
            NOW,
            &inv,
            json!({"scope": "sensor/#", "inviter": alice().sender_id().to_string(), "expiry_ms": expiry, "key_id": hx(ek.key_id().as_bytes()), "dictionaries": ids}),
            "format 3: grant for sensor/# and two dictionaries (one zstd-format, one raw content) sealed to bob",
        ),
    );
    write(
        dir,
        "fail_invite_dictionaries_wrong_recipient",
        iv(
            &eve,
            NOW,
            &inv,
            json!("error"),
            "eve cannot open bob's format-3 invite",
        ),
    );
    let fail = |name: &str, what: &str, reason: &str, invite: String| {
        let mut v = iv(&bob, NOW, &invite, json!("error"), what);
        v["reason"] = json!(reason);
        write(dir, name, v);
    };
    let signed = |dicts: Vec<u8>| hand(3, 3, dicts.clone(), Some(dicts));
    let mut wrong_id = both[0].id().0;
    wrong_id[15] ^= 1;
    fail(
        "fail_invite_dictionary_id_mismatch",
        "format 3, correctly signed, whose first dictionary id does not match its bytes",
        "id does not match its bytes",
        signed(dict_section(&[
            (&wrong_id, both[0].as_bytes()),
            (&both[1].id().0, both[1].as_bytes()),
        ])),
    );
    fail(
        "fail_invite_dictionaries_descending",
        "format 3, correctly signed, with the dictionaries in descending id order",
        "ascending",
        signed(dict_section(&[entries[1], entries[0]])),
    );
    fail(
        "fail_invite_dictionaries_duplicate",
        "format 3, correctly signed, with the same dictionary twice",
        "ascending",
        signed(dict_section(&[entries[0], entries[0]])),
    );
    fail(
        "fail_invite_dictionaries_none",
        "format 3, correctly signed, with n = 0",
        "no dictionary",
        signed(vec![0]),
    );
    fail(
        "fail_invite_dictionary_too_short",
        "format 3, correctly signed, with a 7-byte dictionary",
        "7 bytes",
        signed(dict_section(&[(&DictId::of(b"1234567").0, b"1234567")])),
    );
    let mut trailing = section.clone();
    trailing.push(0);
    fail(
        "fail_invite_dictionaries_trailing_bytes",
        "format 3, correctly signed, with a byte after the last dictionary",
        "trailing bytes",
        signed(trailing),
    );
    let mut truncated = section.clone();
    truncated.truncate(section.len() - 1);
    fail(
        "fail_invite_dictionaries_truncated",
        "format 3, correctly signed, whose last dictionary is one byte short of its length",
        "too short",
        signed(truncated),
    );
    let broken = broken_entropy_tables(&trained);
    fail(
        "fail_invite_dictionary_broken_entropy_tables",
        "format 3, correctly signed, carrying a zstd-format dictionary whose entropy tables are garbage (its id matches)",
        "cannot use these bytes",
        signed(dict_section(&[(&DictId::of(&broken).0, &broken)])),
    );
    let other = Dictionary::new(b"{\"unrelated\":\"dictionary content\"}".repeat(8)).unwrap();
    fail(
        "fail_invite_dictionaries_not_signed",
        "format 3 whose signature covers other dictionaries than it carries",
        "signature does not verify",
        hand(
            3,
            3,
            section.clone(),
            Some(dict_section(&[(&other.id().0, other.as_bytes())])),
        ),
    );
    fail(
        "fail_invite_dictionaries_signed_as_format_2",
        "format 3 plaintext signed with the format-2 context and fields (no dictionary hash)",
        "signature does not verify",
        hand(3, 3, section.clone(), None),
    );
    fail(
        "fail_invite_format_3_string_2",
        "a format-3 plaintext under string format byte 2 (the unauthenticated byte rewritten)",
        "could not be opened",
        hand(2, 3, section.clone(), Some(section.clone())),
    );
    fail(
        "fail_invite_format_2_string_3",
        "a format-2 plaintext under string format byte 3",
        "could not be opened",
        hand(3, 2, Vec::new(), None),
    );
    fail(
        "fail_invite_format_4",
        "string format byte 4 (unknown)",
        "version 4",
        hand(4, 3, section.clone(), Some(section.clone())),
    );
    let mut v = iv(
        &bob,
        expiry + 1,
        &inv,
        json!("error"),
        "format 3 opened after expiry",
    );
    v["reason"] = json!("expired");
    write(dir, "fail_invite_dictionaries_expired", v);
}

/// Relay-account sign-ins (PROTOCOL §3.3.14, §3.3.15, §3.5.6): the `Challenge` and `Auth`
/// frames, the relay's own names (`auth.names`), and what the signature covers; and the
/// relay names of URLs, list entries and their matching.
fn relay_auth_vectors(dir: &Path) {
    use ed25519_dalek::{Signer, SigningKey};
    let sk = SigningKey::from_bytes(&[0x61; 32]);
    let account = sk.verifying_key().to_bytes();
    let nonce = [0x4e; 32];
    let home = "relay.example.com:443";
    let evil = "evil.example:443";
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let case = |name: &str,
                what: &str,
                relay_names: &[&str],
                relay: Option<&str>,
                signed: Vec<u8>,
                fail: Option<&str>| {
        let challenge = Frame::Challenge(Challenge {
            nonce,
            bound: (!relay_names.is_empty()).then_some(true),
        });
        let auth = Auth {
            sig: sk.sign(&signed).to_bytes(),
            relay: relay.map(str::to_owned),
        };
        let mut v = json!({
            "kind": "relay_auth",
            "description": what,
            "account_seed": hx(&[0x61; 32]),
            "account": hx(&account),
            "nonce": hx(&nonce),
            "relay_names": names(relay_names),
            "challenge": hx(&challenge.to_bytes()),
            "auth": hx(&Frame::Auth(auth.clone()).to_bytes()),
        });
        match fail {
            None => {
                assert_eq!(auth.sig_input(&nonce, &account), signed);
                v["expect"] = json!({"sig_input": hx(&signed), "relay": relay});
            }
            Some(reason) => {
                v["expect"] = json!("error");
                v["reason"] = json!(reason);
            }
        }
        write(dir, name, v);
    };
    let bound = |name: &str| auth_bound_sig_input(&nonce, &account, name).unwrap();
    let legacy = auth_sig_input(&nonce, &account);
    case(
        "ok_relay_auth_bound",
        "a relay with auth.names = [\"relay.example.com\"] asks for a bound sign-in; the \
         client dialed wss://relay.example.com and signs that name (any port matches a \
         host-only entry)",
        &["relay.example.com"],
        Some(home),
        bound(home),
        None,
    );
    let v6 = "[2001:db8::1]:8443";
    case(
        "ok_relay_auth_bound_ipv6_port",
        "an entry with a port matches that port only; an IPv6 host in brackets",
        &["[2001:db8::1]:8443"],
        Some(v6),
        bound(v6),
        None,
    );
    case(
        "ok_relay_auth_legacy",
        "a relay without names: a Challenge without bound, the legacy signature",
        &[],
        None,
        legacy.clone(),
        None,
    );
    case(
        "ok_relay_auth_bound_without_names",
        "a relay without names verifies a bound sign-in over the name it carries (it has \
         nothing to compare it to)",
        &[],
        Some(home),
        bound(home),
        None,
    );
    case(
        "fail_relay_auth_wrong_name",
        "the forwarding attack: the client dialed evil.example, which passed \
         relay.example.com's challenge on; the signature is good but names evil.example",
        &["relay.example.com"],
        Some(evil),
        bound(evil),
        Some("not this relay's"),
    );
    let other_port = "relay.example.com:8443";
    case(
        "fail_relay_auth_wrong_port",
        "an entry with a port matches no other port",
        &["relay.example.com:443"],
        Some(other_port),
        bound(other_port),
        Some("not this relay's"),
    );
    case(
        "fail_relay_auth_legacy_under_bound",
        "a relay with names refuses the legacy form (a good legacy signature, no relay name)",
        &["relay.example.com"],
        None,
        legacy.clone(),
        Some("names no relay"),
    );
    case(
        "fail_relay_auth_name_rewritten",
        "signed for evil.example, with Auth.relay rewritten to this relay's name",
        &["relay.example.com"],
        Some(home),
        bound(evil),
        Some("bad signature"),
    );
    let mut wrong_context = bound(home);
    wrong_context.splice(..AUTH_BOUND_CONTEXT.len(), AUTH_CONTEXT.iter().copied());
    case(
        "fail_relay_auth_wrong_context",
        "the bound fields signed under the legacy context string",
        &["relay.example.com"],
        Some(home),
        wrong_context,
        Some("bad signature"),
    );
    case(
        "fail_relay_auth_legacy_input_with_name",
        "Auth.relay present over a signature of the legacy input",
        &["relay.example.com"],
        Some(home),
        legacy,
        Some("bad signature"),
    );

    // Relay names: of URLs (what a client signs), of list entries (what a relay keeps),
    // and which names an entry matches.
    let urls = [
        (
            "wss://Relay.Example.COM/ws",
            "relay.example.com:443",
            Some(("Relay.Example.COM", 443)),
        ),
        (
            "ws://relay.example.com",
            "relay.example.com:80",
            Some(("relay.example.com", 80)),
        ),
        (
            "ws://127.0.0.1:7070",
            "127.0.0.1:7070",
            Some(("127.0.0.1", 7070)),
        ),
        ("ws://127.1:7070", "127.0.0.1:7070", None),
        (
            "wss://[2001:DB8:0:0:0:0:0:1]:8443/",
            "[2001:db8::1]:8443",
            Some(("[2001:DB8:0:0:0:0:0:1]", 8443)),
        ),
        (
            "ws://[::ffff:192.0.2.1]",
            "[::ffff:c000:201]:80",
            Some(("[::ffff:192.0.2.1]", 80)),
        ),
        ("wss://bücher.example", "xn--bcher-kva.example:443", None),
        (
            "wss://relay.example.com.:443",
            "relay.example.com.:443",
            Some(("relay.example.com.", 443)),
        ),
        (
            "tcp://Relay.Example.com",
            "relay.example.com:7481",
            Some(("Relay.Example.com", 7481)),
        ),
        (
            "tls://relay.example.com:7443",
            "relay.example.com:7443",
            Some(("relay.example.com", 7443)),
        ),
        ("quic://[::1]:7444", "[::1]:7444", Some(("[::1]", 7444))),
    ];
    let entries = [
        ("Relay.Example.COM", "relay.example.com"),
        ("relay.example.com:443", "relay.example.com:443"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
        ("[2001:db8::1]:8443", "[2001:db8::1]:8443"),
    ];
    let matching = [
        (vec!["relay.example.com"], "relay.example.com:443", true),
        (vec!["relay.example.com"], "relay.example.com:7481", true),
        (
            vec!["relay.example.com:443"],
            "relay.example.com:8443",
            false,
        ),
        (
            vec!["relay.example.com"],
            "sub.relay.example.com:443",
            false,
        ),
        (vec!["relay.example.com"], "relay.example.com.:443", false),
        (vec!["[2001:db8::1]"], "[2001:db8::1]:443", true),
        (vec!["relay.example.com", "[::1]:7070"], "[::1]:7070", true),
    ];
    for (e, c) in entries {
        assert_eq!(relay_name::entry(e).as_deref(), Ok(c));
    }
    for (n, name, m) in &matching {
        assert_eq!(relay_name::matches(&names(n), name), *m, "{name}");
    }
    write(
        dir,
        "ok_relay_names",
        json!({
            "kind": "relay_names",
            "description": "relay names (PROTOCOL §3.5.6): of URLs as a client dials them \
                (`host`/`port`, where present: the host as the URL writes it and the port \
                dialed, from which the name follows without a URL parser — no international \
                name, no IPv4 shorthand), of auth.names entries, and which names an entry \
                matches",
            "urls": urls.iter().map(|(u, n, hp)| {
                let mut v = json!({"url": u, "name": n});
                if let Some((h, p)) = hp {
                    assert_eq!(relay_name::name(h, *p).as_deref(), Ok(*n));
                    v["host"] = json!(h);
                    v["port"] = json!(p);
                }
                v
            }).collect::<Vec<_>>(),
            "entries": entries.iter().map(|(e, c)| json!({"entry": e, "canonical": c})).collect::<Vec<_>>(),
            "matching": matching.iter().map(|(n, name, m)| json!({"names": n, "name": name, "matches": m})).collect::<Vec<_>>(),
        }),
    );
}
