//! Property tests: frame and envelope round trips, the incremental decoder under arbitrary
//! chunking, seal/open round trips, and filter matching on tokens against a straightforward
//! reference matcher on names. Decoders must never panic on arbitrary bytes.

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
    )
        .prop_map(|(kid, nonce, toks, name_blocks, ct)| {
            let h = HeaderFields {
                flags: 0,
                key_id: KeyId::from_bytes(kid),
                nonce,
                commit: [7; 32],
                tokens: &toks,
            };
            let name_len = 16 + 32 * (name_blocks + 1);
            let mut b = Vec::new();
            h.write_prefix(name_len, &mut b);
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
        any::<[u8; 32]>().prop_map(|nonce| Frame::Challenge(Challenge { nonce })),
        prop::collection::vec(any::<u8>(), 64).prop_map(|s| Frame::Auth(Auth {
            sig: s.try_into().unwrap()
        })),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            prop::option::of(arb_text()),
            any::<u64>()
        )
            .prop_map(
                |(version, features, max_frame, session, relay, heartbeat_ms)| Frame::Welcome(
                    Welcome {
                        version,
                        features,
                        max_frame,
                        session,
                        relay,
                        heartbeat_ms
                    }
                )
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
        any::<u64>().prop_map(|sub_id| Frame::Unsub(Unsub { sub_id })),
        (any::<u64>(), any::<u64>()).prop_map(|(sub_id, seq)| Frame::SubOk(SubOk { sub_id, seq })),
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
        (any::<u64>(), arb_envelope(), 0u64..8).prop_map(|(seq, envelope, flags)| Frame::Msg(
            Msg {
                seq,
                envelope,
                flags
            }
        )),
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
        any::<u64>().prop_map(|dropped| Frame::Gap(Gap { dropped })),
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
        payload in prop::collection::vec(any::<u8>(), 0..4096),
        topic in arb_topic(),
        compress in any::<bool>(),
        pad in any::<bool>(),
        sign in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate("p", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key(&tk, 0).unwrap();
        let id = Identity::generate(&mut rng);
        let topic = Topic::new(topic.join("/")).unwrap();
        let opts = SealOptions {
            compression: if compress { Compression::Zstd(3) } else { Compression::None },
            padding: if pad { Padding::Padme } else { Padding::None },
        };
        let out = Outgoing { payload: &payload, content_type: "application/x-test", msg_id: MessageId::random(&mut rng), ts_ms: seed };
        let env = Sealer::new().seal(&kr.topic_key(&topic).unwrap(), &out, &opts, sign.then_some(&id), &mut rng).unwrap();
        let o = Opener::new().open(&kr, &env, 0).unwrap();
        prop_assert_eq!(&o.payload, &payload);
        prop_assert_eq!(&o.topic, &topic);
        prop_assert_eq!(o.sender, sign.then(|| id.sender_id()));
        prop_assert_eq!(o.ts_ms, seed);
        // The relay sees the same path the keyholder computes.
        prop_assert_eq!(env.token_path(), kr.grant_for(&topic).unwrap().epoch_keys().token_path(&topic));
    }

    #[test]
    fn opener_never_panics_on_mutations(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), seed in any::<u64>()) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate("p", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key(&tk, 0).unwrap();
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
