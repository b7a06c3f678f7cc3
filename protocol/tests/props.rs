//! Property tests: frame and envelope round trips, the incremental decoder under arbitrary
//! chunking, seal/open round trips, and filter matching on tokens against a straightforward
//! reference matcher on names. Decoders must never panic on arbitrary bytes. Trust:
//! narrowing then adding never contradicts, and a contradicting grant is always refused (or
//! dropped when the verified grant arrives second).

use bytes::Bytes;
use proptest::prelude::*;
use rand_chacha::rand_core::SeedableRng;
use whispeer_protocol::codec::write_prefixed;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::frame::*;
use whispeer_protocol::*;

fn arb_token() -> impl Strategy<Value = TopicToken> {
    any::<[u8; 16]>().prop_map(TopicToken::from_bytes)
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 24]>(),
        prop::collection::vec(arb_token(), 1..=8),
        0usize..4,
        prop::collection::vec(any::<u8>(), 16..200),
        any::<bool>(),
    )
        .prop_map(|(kid, nonce, toks, name_blocks, ct, aes)| {
            let h = HeaderFields {
                flags: 0,
                key_id: KeyId::from_bytes(kid),
                nonce,
                commit: [7; 32],
                tokens: &toks,
            };
            let name_len = 16 + 32 * (name_blocks + 1);
            let mut b = Vec::new();
            let suite = if aes {
                Suite::Aes256Gcm
            } else {
                Suite::XChaCha20Poly1305
            };
            h.write_prefix_in(suite, name_len, &mut b);
            b.extend(std::iter::repeat_n(0x5a, name_len));
            b.extend_from_slice(&ct);
            Envelope::from_slice(&b).unwrap()
        })
}

fn arb_pattern() -> impl Strategy<Value = TokenPattern> {
    let elem = prop_oneof![
        arb_token().prop_map(PatternElem::Token),
        Just(PatternElem::One)
    ];
    (
        any::<[u8; 16]>(),
        prop::collection::vec(elem, 1..=8),
        any::<bool>(),
    )
        .prop_map(|(k, mut e, rest)| {
            if rest {
                *e.last_mut().unwrap() = PatternElem::Rest;
            }
            TokenPattern::new(KeyId::from_bytes(k), e).unwrap()
        })
}

fn arb_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ✓é/_-]{0,40}"
}

fn arb_qos() -> impl Strategy<Value = Qos> {
    prop_oneof![
        Just(Qos::AtMostOnce),
        Just(Qos::AtLeastOnce),
        Just(Qos::ExactlyOnce)
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let replay = prop_oneof![
        any::<u64>().prop_map(Replay::FromSeq),
        any::<u64>().prop_map(Replay::SinceMs),
        any::<u64>().prop_map(Replay::LastN)
    ];
    prop_oneof![
        (
            prop::collection::vec(any::<u64>(), 1..=8),
            any::<u64>(),
            prop::option::of(arb_text()),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            prop::option::of(any::<[u8; 32]>())
        )
            .prop_map(
                |(versions, features, client, auth, account)| Frame::Hello(Hello {
                    versions,
                    features,
                    client,
                    auth: auth.map(Bytes::from),
                    account
                })
            ),
        (any::<[u8; 32]>(), prop::option::of(any::<bool>()))
            .prop_map(|(nonce, bound)| Frame::Challenge(Challenge { nonce, bound })),
        (
            prop::collection::vec(any::<u8>(), 64),
            prop::option::of("[a-z0-9.:\\[\\]✓-]{1,80}")
        )
            .prop_map(|(s, relay)| Frame::Auth(Auth {
                sig: s.try_into().unwrap(),
                relay
            })),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            prop::option::of(arb_text()),
            any::<u64>(),
            prop::option::of(any::<[u8; 16]>())
        )
            .prop_map(
                |(version, features, max_frame, session, relay, heartbeat_ms, seq_space)| {
                    Frame::Welcome(Welcome {
                        version,
                        features,
                        max_frame,
                        session,
                        relay,
                        heartbeat_ms,
                        seq_space,
                    })
                }
            ),
        (
            any::<u64>(),
            arb_pattern(),
            arb_qos(),
            prop::option::of(arb_text()),
            prop::option::of(replay),
            any::<bool>(),
            prop::option::of(any::<u64>()),
            prop::option::of(prop::collection::vec(any::<u8>(), 16..=64))
        )
            .prop_map(
                |(sub_id, pattern, qos, durable, replay, retained, credit, owner)| Frame::Sub(
                    Sub {
                        sub_id,
                        pattern,
                        qos,
                        durable,
                        replay,
                        retained,
                        credit,
                        owner: owner.map(Bytes::from)
                    }
                )
            ),
        (any::<u64>(), proptest::option::of(any::<bool>()))
            .prop_map(|(sub_id, delete)| Frame::Unsub(Unsub { sub_id, delete })),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(sub_id, seq, history)| Frame::SubOk(SubOk {
                sub_id,
                seq,
                history
            })),
        (
            arb_envelope(),
            0u64..2,
            prop::option::of(any::<[u8; 16]>()),
            arb_qos()
        )
            .prop_map(|(envelope, retain, pid, qos)| {
                let flags = retain | if pid.is_some() { pub_flags::ACK } else { 0 };
                Frame::Pub(Pub {
                    envelope,
                    flags,
                    publish_id: pid,
                    qos,
                })
            }),
        (
            any::<u64>(),
            arb_envelope(),
            0u64..8,
            any::<Option<u64>>(),
            proptest::option::of(proptest::collection::vec(any::<u64>(), 0..4)),
        )
            .prop_map(|(seq, envelope, flags, sub_id, paused)| Frame::Msg(Msg {
                paused,
                sub_id,
                seq,
                envelope,
                flags
            })),
        prop::collection::vec(any::<u64>(), 0..50).prop_map(|seqs| Frame::Ack(Ack { seqs })),
        (any::<[u8; 16]>(), any::<u64>())
            .prop_map(|(publish_id, seq)| Frame::PubAck(PubAck { publish_id, seq })),
        (
            1u16..40,
            arb_text(),
            any::<bool>(),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<[u8; 16]>())
        )
            .prop_map(
                |(c, message, fatal, sub_id, publish_id)| Frame::Err(ErrFrame {
                    code: ErrorCode::from_u16(c),
                    message,
                    fatal,
                    sub_id,
                    publish_id
                })
            ),
        any::<u64>().prop_map(|nonce| Frame::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Frame::Pong(Pong { nonce })),
        (any::<u64>(), proptest::option::of(any::<u64>()))
            .prop_map(|(dropped, sub_id)| Frame::Gap(Gap { dropped, sub_id })),
        (1u16..40, arb_text()).prop_map(|(c, message)| Frame::Close(Close {
            code: ErrorCode::from_u16(c),
            message
        })),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(sub_id, seq, count)| {
            Frame::ReplayDone(ReplayDone { sub_id, seq, count })
        }),
    ]
}

/// The obvious matcher on names, level by level, MQTT semantics.
fn reference_match(filter: &[&str], topic: &[&str]) -> bool {
    match (filter.first(), topic.first()) {
        (Some(&"#"), _) => true,
        (None, None) => true,
        (Some(&"+"), Some(_)) => reference_match(&filter[1..], &topic[1..]),
        (Some(f), Some(t)) if f == t => reference_match(&filter[1..], &topic[1..]),
        _ => false,
    }
}

fn arb_topic() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "ab"]), 1..6)
}

fn arb_filter() -> impl Strategy<Value = Vec<&'static str>> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "ab", "+"]), 1..6),
        any::<bool>(),
    )
        .prop_map(|(mut f, hash)| {
            if hash {
                f.push("#");
            }
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_roundtrip(f in arb_frame()) {
        let b = f.to_bytes();
        prop_assert_eq!(Frame::decode(&b).unwrap(), f);
    }

    /// A relay name is canonical once made: normalizing it again changes nothing, it splits
    /// back into its host and port, and an IPv6 host still names the same address.
    #[test]
    fn relay_names_are_canonical(
        host in prop_oneof![
            "[a-zA-Z0-9_-]{1,20}(\\.[a-zA-Z][a-zA-Z0-9-]{0,10}){0,3}\\.?",
            any::<[u8; 4]>().prop_map(|a| std::net::Ipv4Addr::from(a).to_string()),
            any::<[u16; 8]>().prop_map(|a| std::net::Ipv6Addr::from(a).to_string()),
            (0u8..3, any::<u16>()).prop_map(|(i, x)| {
                let mut s = [0u16; 8];
                s[i as usize * 3] = x;
                format!("[{}]", std::net::Ipv6Addr::from(s))
            }),
        ],
        port in any::<u16>(),
    ) {
        let Ok(n) = relay_name::name(&host, port) else {
            // Only a name that ends in a number (`a.1`) is refused by these strategies.
            let last = host.trim_end_matches('.').rsplit('.').next().unwrap();
            prop_assert!(last.bytes().all(|b| b.is_ascii_digit())
                || last.to_ascii_lowercase().starts_with("0x"), "{host}");
            return Ok(());
        };
        prop_assert!(relay_name::is_canonical(&n), "{n}");
        let (h, p) = relay_name::split(&n).unwrap();
        prop_assert_eq!(p, port);
        prop_assert_eq!(relay_name::host(h).unwrap(), h);
        if let Some(inner) = h.strip_prefix('[') {
            let a: std::net::Ipv6Addr = inner.trim_end_matches(']').parse().unwrap();
            let given: std::net::Ipv6Addr =
                host.trim_start_matches('[').trim_end_matches(']').parse().unwrap();
            prop_assert_eq!(a, given);
        }
    }

    #[test]
    fn stream_decoder_any_chunking(frames in prop::collection::vec(arb_frame(), 1..8), cuts in prop::collection::vec(1usize..300, 1..20)) {
        let mut stream = Vec::new();
        for f in &frames {
            write_prefixed(&f.to_bytes(), &mut stream);
        }
        let mut d = FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            d.push(&rest[..n]);
            rest = &rest[n..];
            i += 1;
            while let Some(f) = d.next_decoded().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn frame_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(&Bytes::from(bytes.clone()));
        let mut d = FrameDecoder::new(4096);
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_decoded() {}
    }

    #[test]
    fn mutated_frames_never_panic(f in arb_frame(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut b = f.to_bytes().to_vec();
        for (i, x) in flips {
            let i = i.index(b.len());
            b[i] ^= x;
        }
        let _ = Frame::decode(&Bytes::from(b));
    }

    #[test]
    fn decompression_never_panics(
        codec in 0u8..4,
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max in 0usize..(1 << 16),
    ) {
        if let Ok(out) = whispeer_protocol::compress::decompress(codec, &bytes, max) {
            prop_assert!(out.len() <= max);
        }
    }

    #[test]
    fn dictionary_decompression_never_panics(
        dict_bytes in prop::collection::vec(any::<u8>(), 8..256),
        data in prop::collection::vec(0u8..4, 0..2048),
        at in any::<prop::sample::Index>(),
        x in 1u8..=255,
        max in 0usize..(1 << 16),
    ) {
        use whispeer_protocol::compress::{decompress_dict, CODEC_ZSTD_DICT};
        let d = Dictionary::new(dict_bytes).unwrap();
        let mut set = Dictionaries::new();
        set.insert(d.clone());
        // Round trip through a real sealer-side frame.
        let mut c = whispeer_protocol::compress::zstd_dict_compress_once(&d, 3, &data).unwrap();
        prop_assert_eq!(&decompress_dict(CODEC_ZSTD_DICT, &c, data.len(), &set).unwrap(), &data);
        // Any changed byte: refused, or within the cap; never a panic.
        let i = at.index(c.len());
        c[i] ^= x;
        if let Ok(out) = decompress_dict(CODEC_ZSTD_DICT, &c, max, &set) {
            prop_assert!(out.len() <= max);
        }
    }

    #[test]
    fn lz4_roundtrips_and_a_changed_byte_never_panics(
        data in prop::collection::vec(0u8..4, 0..2048),
        at in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        use whispeer_protocol::compress::{lz4_compress, lz4_decompress};
        let c = lz4_compress(&data).unwrap();
        prop_assert_eq!(&lz4_decompress(&c, data.len()).unwrap(), &data);
        let mut bad = c.clone();
        let i = at.index(bad.len());
        bad[i] ^= x;
        if let Ok(out) = lz4_decompress(&bad, 1 << 16) {
            prop_assert_eq!(out.len() as u64, u64::from(u32::from_be_bytes(bad[..4].try_into().unwrap())));
        }
    }

    #[test]
    fn envelope_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = Envelope::from_slice(&bytes);
    }

    #[test]
    fn filter_tokens_match_like_names(f in arb_filter(), t in arb_topic()) {
        let tk = TreeKey::from_parts(TreeId([1; 16]), 0, "p", [2; 32], [3; 32]).unwrap();
        let ek = tk.cert().keys().clone();
        let filter = TopicFilter::new(f.join("/")).unwrap();
        let topic = Topic::new(t.join("/")).unwrap();
        let want = reference_match(&f, &t);
        prop_assert_eq!(filter.matches(&topic), want);
        prop_assert_eq!(ek.compile(&filter).matches(&ek.token_path(&topic)), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_open_roundtrip(
        chunk in prop::collection::vec(any::<u8>(), 0..1024),
        repeat in 1usize..5,
        topic in arb_topic(),
        codec in 0u8..4,
        aes in any::<bool>(),
        pad in any::<bool>(),
        sign in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate_with("p", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let id = Identity::generate_with(&mut rng);
        let topic = Topic::new(topic.join("/")).unwrap();
        // Repeated chunks, so zstd and LZ4 really compress some of the cases (codec × suite).
        let payload = chunk.repeat(repeat);
        // Codec 3: a raw-content dictionary made of the chunk itself, held by the keyring.
        let dict = Dictionary::new(if chunk.len() >= 8 { chunk.clone() } else { b"whispeer-dictionary".to_vec() }).unwrap();
        kr.add_dictionary(dict.clone());
        let zd = Compression::ZstdDict { level: 3, dict: dict.id() };
        let opts = SealOptions {
            compression: [Compression::None, Compression::Zstd(3), Compression::Lz4, zd][codec as usize],
            padding: if pad { Padding::Padme } else { Padding::None },
            suite: if aes { Suite::Aes256Gcm } else { Suite::XChaCha20Poly1305 },
        };
        let out = Outgoing { payload: &payload, content_type: "application/x-test", msg_id: MessageId::random(&mut rng), ts_ms: seed };
        let env = Sealer::new().seal(&kr.topic_key(&topic).unwrap(), &out, &opts, sign.then_some(&id), &mut rng).unwrap();
        let o = Opener::new().open(&kr, &env, 0).unwrap();
        prop_assert_eq!(&o.payload, &payload);
        prop_assert_eq!(&o.topic, &topic);
        prop_assert_eq!(o.sender, sign.then(|| id.sender_id()));
        prop_assert_eq!(o.ts_ms, seed);
        prop_assert_eq!(env.cipher_suite(), opts.suite);
        // Without the dictionary, a codec-3 message is the one typed failure; any other
        // opens as before.
        let mut without = Keyring::new();
        without.add_tree_key_at(&tk, 0).unwrap();
        match Opener::new().open(&without, &env, 0) {
            Ok(o) => prop_assert_eq!(&o.payload, &payload),
            Err(e) => {
                prop_assert_eq!(codec, 3);
                prop_assert_eq!(e.missing_dictionary(), Some(dict.id()));
            }
        }
        // The relay sees the same path the keyholder computes.
        prop_assert_eq!(env.token_path(), kr.grant_for(&topic).unwrap().epoch_keys().token_path(&topic));
    }

    #[test]
    fn opener_never_panics_on_mutations(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), seed in any::<u64>()) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate_with("p", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let topic = Topic::new("a/b/c").unwrap();
        let out = Outgoing { payload: b"payload", content_type: "t", msg_id: MessageId([1; 16]), ts_ms: 0 };
        let env = Sealer::new().seal(&kr.topic_key(&topic).unwrap(), &out, &SealOptions::default(), None, &mut rng).unwrap();
        let mut b = env.as_bytes().to_vec();
        for (i, x) in flips {
            let i = i.index(b.len());
            b[i] ^= x.max(1);
        }
        if b[..] == env.as_bytes()[..] {
            return Ok(()); // the flips cancelled out
        }
        if let Ok(e) = Envelope::from_slice(&b) {
            prop_assert!(Opener::new().open(&kr, &e, 0).is_err());
        }
    }
}

// ---- Trust: narrowing never contradicts; contradictions are always refused ----

/// A chain of scopes from the whole tree down along `segs`: Tree, Subtree(s0), Subtree(s0/s1),
/// …, and (when `exact`) Topic(full path).
fn scope_chain(segs: &[String], exact: bool) -> Vec<Scope> {
    let mut out = vec![Scope::Tree];
    for i in 1..=segs.len() {
        out.push(Scope::Subtree(Topic::new(segs[..i].join("/")).unwrap()));
    }
    if exact {
        out.push(Scope::Topic(Topic::new(segs.join("/")).unwrap()));
    }
    out
}

fn scope_topic(s: &Scope) -> (Topic, bool) {
    match s {
        Scope::Subtree(p) => (p.clone(), false),
        Scope::Topic(t) => (t.clone(), true),
        Scope::Tree => unreachable!("the chain starts below the tree"),
    }
}

/// Re-keys a narrowed grant with `key` and re-signs it as its narrower `by_seed` would: a
/// validly signed grant whose key is a lie (written from PROTOCOL.md §5.7 and §6.3).
fn forge_key(g: &Grant, by_seed: &[u8; 32], key: [u8; 32]) -> Grant {
    use ed25519_dalek::{Signer, SigningKey};
    let parent = g.narrowed_from().expect("a narrowed grant").clone();
    let mut raw =
        whispeer_protocol::text::decode(whispeer_protocol::text::hrp::GRANT, &g.to_key_string())
            .unwrap();
    let tail = 1 + 1 + 2 + parent.path().len() + 32 + 64;
    let key_off = raw.len() - tail - 32;
    raw[key_off..key_off + 32].copy_from_slice(&key);
    let mut m = b"whispeer/v2/grant-narrow\0".to_vec();
    m.extend_from_slice(&g.epoch_keys().tree_id().0);
    m.extend_from_slice(&g.epoch_keys().epoch().to_be_bytes());
    m.push(g.scope().kind_byte());
    m.extend_from_slice(&(g.scope().path().len() as u16).to_be_bytes());
    m.extend_from_slice(g.scope().path().as_bytes());
    m.extend_from_slice(
        whispeer_protocol::kdf::kh(&key, whispeer_protocol::kdf::tag::GRANT_COMMIT, &[]).as_bytes(),
    );
    m.push(parent.kind_byte());
    m.extend_from_slice(&(parent.path().len() as u16).to_be_bytes());
    m.extend_from_slice(parent.path().as_bytes());
    let sig = SigningKey::from_bytes(by_seed).sign(&m);
    let n = raw.len();
    raw[n - 64..].copy_from_slice(&sig.to_bytes());
    Grant::from_key_string(&whispeer_protocol::text::encode(
        whispeer_protocol::text::hrp::GRANT,
        &raw,
    ))
    .expect("a validly signed forgery parses")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn narrowing_then_adding_never_contradicts(
        segs in prop::collection::vec("[a-c]{1,2}", 1..4),
        exact in any::<bool>(),
        with_root in any::<bool>(),
        order in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate_with("p", &mut rng).unwrap();
        let chain = scope_chain(&segs, exact);
        // Each step narrowed from the previous one by a different member.
        let mut grants = vec![tk.grant_all()];
        for s in &chain[1..] {
            let by = Identity::generate_with(&mut rng);
            let (t, ex) = scope_topic(s);
            let g = grants.last().unwrap().narrow(&t, ex, &by).unwrap();
            grants.push(g);
        }
        if !with_root {
            grants.remove(0);
        }
        let k = order.index(grants.len());
        grants.rotate_left(k);
        let mut kr = Keyring::new();
        for g in &grants {
            let added = kr.add_grant_report_at(g.clone(), 0);
            prop_assert!(added.is_ok(), "{:?}", added);
            prop_assert!(added.unwrap().dropped.is_empty());
        }
        let n = kr.held_grants().count();
        prop_assert_eq!(n, grants.len());
        if with_root {
            // Everything is verified: admin-signed or derived from a held grant.
            for (_, p) in kr.held_grants() {
                prop_assert!(p.is_verified(), "{}", p);
            }
        }
    }

    #[test]
    fn contradictions_are_always_refused(
        segs in prop::collection::vec("[a-c]{1,2}", 1..4),
        exact in any::<bool>(),
        pick in any::<prop::sample::Index>(),
        lie in any::<[u8; 32]>(),
        forged_first in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate_with("p", &mut rng).unwrap();
        let chain = scope_chain(&segs, exact);
        let seed_m = [7u8; 32];
        let mallory = Identity::from_seeds(&seed_m, &[8; 32]);
        // Mallory narrows the admin's grant for the parent and lies about the key.
        let i = 1 + pick.index(chain.len() - 1);
        let parent = tk.grant(&chain[i - 1]);
        let (t, ex) = scope_topic(&chain[i]);
        let honest = parent.narrow(&t, ex, &mallory).unwrap();
        let forged = forge_key(&honest, &seed_m, lie);
        prop_assume!(forged.key_commitment() != honest.key_commitment());
        // The verified grant covering it: the admin's grant for any broader scope.
        let j = pick.index(i);
        let verified = tk.grant(&chain[j]);
        let mut kr = Keyring::new();
        if forged_first {
            kr.add_grant_at(forged, 0).unwrap();
            let added = kr.add_grant_report_at(verified, 1).unwrap();
            prop_assert_eq!(added.dropped.len(), 1);
            prop_assert_eq!(&added.dropped[0].scope, &chain[i]);
            prop_assert_eq!(kr.held_grants().count(), 1);
        } else {
            kr.add_grant_at(verified, 0).unwrap();
            let err = kr.add_grant_at(forged, 1).unwrap_err();
            let is_contradiction = matches!(err, KeyError::Contradicts { .. });
            prop_assert!(is_contradiction, "{}", err);
        }
        // Either way the keyring seals the topic under the tree's real key.
        let (t, _) = scope_topic(&chain[i]);
        let mut s = Sealer::new();
        let env = s.seal(&kr.topic_key(&t).unwrap(), &Outgoing { payload: b"x", content_type: "", msg_id: MessageId([1; 16]), ts_ms: 0 }, &SealOptions::default(), None, &mut rng).unwrap();
        let mut full = Keyring::new();
        full.add_tree_key_at(&tk, 0).unwrap();
        prop_assert!(Opener::new().open(&full, &env, 0).is_ok());
    }
}

// ---- Batch signatures (sig_scheme 2) ----

fn batch_fixture(n: usize, seed: u64) -> (Keyring, TreeKey, Identity, Vec<Prepared>) {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let tk = TreeKey::generate_with("b", &mut rng).unwrap();
    let mut kr = Keyring::new();
    kr.add_tree_key_at(&tk, 0).unwrap();
    let id = Identity::generate_with(&mut rng);
    let mut sealer = Sealer::new();
    let prepared = (0..n)
        .map(|i| {
            let topic = Topic::new(format!("t/{}", i % 7)).unwrap();
            let payload = vec![i as u8; i * 3];
            let out = Outgoing {
                payload: &payload,
                content_type: "c",
                msg_id: MessageId::random(&mut rng),
                ts_ms: i as u64,
            };
            sealer
                .prepare(
                    &kr.topic_key(&topic).unwrap(),
                    &out,
                    &SealOptions::default(),
                )
                .unwrap()
        })
        .collect();
    (kr, tk, id, prepared)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any batch of 1..=64 messages: every message opens alone (its own opener, a keyring
    /// holding only its topic) with the right sender; a shared opener verifies once.
    #[test]
    fn batch_every_message_opens_alone(n in 1usize..=64, seed in any::<u64>()) {
        let (kr, tk, id, prepared) = batch_fixture(n, seed);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 1);
        let envs = Sealer::new().seal_batch(&prepared, &id, &mut rng).unwrap();
        let mut shared = Opener::new();
        for (p, e) in prepared.iter().zip(&envs) {
            let mut one = Keyring::new();
            one.add_grant_at(tk.grant(&Scope::Topic(p.topic().clone())), 0).unwrap();
            let o = Opener::new().open(&one, e, 0).unwrap();
            prop_assert_eq!(o.sender, Some(id.sender_id()));
            prop_assert_eq!(&o.topic, p.topic());
            prop_assert_eq!(shared.open(&kr, e, 0).unwrap().sender, Some(id.sender_id()));
        }
        prop_assert_eq!(shared.verified_roots().len(), 1);
        prop_assert_eq!(shared.verified_roots().hits(), n as u64 - 1);
    }

    /// Any single-bit change in a proof (sender, signature, count, index, salt, path length,
    /// path) or in the signed fields fails, cold and with the batch's root already cached.
    #[test]
    fn batch_any_bit_flip_fails_cold_and_cached(
        n in 1usize..=64,
        pick in any::<prop::sample::Index>(),
        bit in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let (_kr, tk, id, prepared) = batch_fixture(n, seed);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 2);
        let mut b = BatchSigner::new(BatchPolicy { max_messages: 64, max_wait_us: 0 });
        for p in &prepared {
            b.push(p, 0, &mut rng).unwrap();
        }
        let proofs = b.sign(&id).unwrap();
        let j = pick.index(n);
        let (tree, epoch) = (tk.tree_id(), tk.epoch());
        let mut warm = VerifiedRoots::default();
        // Warm the cache with every honest proof.
        for (p, pr) in prepared.iter().zip(&proofs) {
            prop_assert_eq!(pr.verify(&tree, epoch, p.sig_input(), Some(&mut warm)), Ok(id.sender_id()));
        }
        let mut enc = Vec::new();
        proofs[j].write(&mut enc);
        let input = prepared[j].sig_input().to_vec();
        let total_bits = (enc.len() + input.len()) * 8;
        let k = bit.index(total_bits);
        let (mut enc2, mut input2) = (enc.clone(), input.clone());
        if k < enc.len() * 8 {
            enc2[k / 8] ^= 1 << (k % 8);
        } else {
            let k = k - enc.len() * 8;
            input2[k / 8] ^= 1 << (k % 8);
        }
        match BatchProof::parse(&enc2) {
            Err(_) => {}
            Ok((pr, _rest)) => {
                let cold = pr.verify(&tree, epoch, &input2, None);
                let cached = pr.verify(&tree, epoch, &input2, Some(&mut warm));
                prop_assert!(cold.is_err(), "cold verify accepted bit {}", k);
                prop_assert_eq!(cached.is_err(), cold.is_err());
            }
        }
        // The honest proof under another epoch never verifies, cached or not.
        prop_assert!(proofs[j].verify(&tree, epoch + 1, &input, Some(&mut warm)).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// An invite carries any set of dictionaries (format 3; none: format 2): opening gives
    /// the grant and exactly the distinct dictionaries by ascending id, and a keyring that
    /// accepts it holds them all. Any bit flipped in the string's data (re-encoded with a
    /// valid checksum) is refused, and opening never panics on it.
    #[test]
    fn invite_dictionaries_roundtrip_and_bit_flips(
        raw in prop::collection::vec(prop::collection::vec(any::<u8>(), 8..600), 0..5),
        dup in any::<prop::sample::Index>(),
        bit in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate_with("props", &mut rng).unwrap();
        let grant = tk.grant(&Scope::Subtree(Topic::new("a/b").unwrap()));
        let (alice, bob) = (Identity::generate_with(&mut rng), Identity::generate_with(&mut rng));
        let mut dicts: Vec<Dictionary> = raw.into_iter().filter_map(|b| Dictionary::new(b).ok()).collect();
        if !dicts.is_empty() {
            let again = dicts[dup.index(dicts.len())].clone();
            dicts.push(again);
        }
        let inv = Invite::seal_with_dictionaries(&grant, &dicts, &alice, &bob.public_id(), 10, &mut rng).unwrap();
        let got = Invite::open(&inv, &bob, 10).unwrap();
        prop_assert_eq!(got.inviter, alice.sender_id());
        prop_assert_eq!(got.grant.to_key_string(), grant.to_key_string());
        let mut want = dicts.clone();
        want.sort_by_key(|d| d.id());
        want.dedup_by_key(|d| d.id());
        prop_assert_eq!(&got.dictionaries, &want);
        let mut kr = Keyring::new();
        kr.accept_invite_at(&got, 10).unwrap();
        prop_assert_eq!(kr.dictionaries().len(), want.len());

        let mut b = text::decode_invite(&inv).unwrap();
        let k = bit.index(b.len() * 8);
        b[k / 8] ^= 1 << (k % 8);
        let flipped = text::encode_invite(&b).unwrap();
        prop_assert!(Invite::open(&flipped, &bob, 10).is_err(), "bit {} flipped opened", k);
    }
}
