//! The Rust client through a real relay on real sockets: typed round trips over WS and TCP
//! (and across them), wildcards, keys and rejection, sender identity, tampering in flight,
//! callbacks, flush and close. (Relay restart is in `restart.rs`: it reuses ports, so it runs
//! in its own test process where no other test can take them.)

mod support;

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use whispeer::{
    ConnectionState, Encryption, PublishOptions, ReceiveError, Scope, Signing, SubscribeError, Tcp,
    Topic,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    room: String,
    celsius: f64,
    tags: Vec<String>,
    raw: serde_bytes_like::Bytes,
    count: u64,
    delta: i64,
}

mod serde_bytes_like {
    //! A byte string that serializes as a CBOR byte string (not an array of integers).
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    #[derive(Debug, Clone, PartialEq)]
    pub struct Bytes(pub Vec<u8>);
    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }
    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

fn reading(n: u64) -> Reading {
    Reading {
        room: "kitchen".into(),
        celsius: 21.5 + n as f64,
        tags: vec!["a".into(), "ü".into()],
        raw: serde_bytes_like::Bytes(vec![0, 1, 2, 255]),
        count: u64::MAX - n,
        delta: -(n as i64),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_round_trip_across_ws_and_tcp() {
    let relay = TestRelay::start().await;
    let t = tree("home");
    let alice = identity();
    let alice_id = alice.sender_id();
    let sub_client = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let pub_client = tcp_client(&relay.tcp_url(), keyring_with(&t), alice).await;

    let mut structs = sub_client
        .subscribe::<Reading>("sensor/+/reading")
        .await
        .unwrap();
    let mut floats = sub_client.subscribe::<f64>("sensor/+/temp").await.unwrap();
    let mut maps = sub_client
        .subscribe::<BTreeMap<String, i64>>("config")
        .await
        .unwrap();
    let mut strings = sub_client.subscribe::<String>("chat/#").await.unwrap();

    for n in 0..3 {
        pub_client
            .publish("sensor/kitchen/reading", &reading(n))
            .await
            .unwrap();
    }
    pub_client
        .publish("sensor/garage/temp", &-3.25f64)
        .await
        .unwrap();
    let map: BTreeMap<String, i64> = [("a".to_string(), -1), ("b".to_string(), i64::MAX)].into();
    pub_client.publish("config", &map).await.unwrap();
    pub_client.publish("chat/room/1", "héllo").await.unwrap();

    for n in 0..3 {
        let m = within("struct", structs.next()).await.unwrap().unwrap();
        assert_eq!(m.value, reading(n));
        assert_eq!(m.topic.as_str(), "sensor/kitchen/reading");
        assert_eq!(m.sender, Some(alice_id), "sender is verified");
        assert_eq!(m.content_type, "application/cbor");
    }
    assert_eq!(
        within("float", floats.next()).await.unwrap().unwrap().value,
        -3.25
    );
    assert_eq!(
        within("map", maps.next()).await.unwrap().unwrap().value,
        map
    );
    assert_eq!(
        within("string", strings.next())
            .await
            .unwrap()
            .unwrap()
            .value,
        "héllo"
    );

    // The other direction: TCP subscriber, WS publisher.
    let mut back = pub_client.subscribe::<String>("reply").await.unwrap();
    sub_client.publish("reply", "ack").await.unwrap();
    assert_eq!(
        within("reply", back.next()).await.unwrap().unwrap().value,
        "ack"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_deliver_exactly_the_matching_topics() {
    let relay = TestRelay::start().await;
    let t = tree("home");
    let c = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let p = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let mut plus = c.subscribe::<String>("sensor/+/temp").await.unwrap();
    let mut hash = c.subscribe::<String>("sensor/#").await.unwrap();
    let mut exact = c.subscribe::<String>("sensor/kitchen").await.unwrap();

    for topic in [
        "sensor/kitchen/temp",
        "sensor/kitchen",
        "sensor/garage/temp/extra",
        "other/kitchen/temp",
        "sensor/garage/temp",
    ] {
        p.publish(topic, topic).await.unwrap();
    }
    let mut seen_plus = Vec::new();
    for _ in 0..2 {
        seen_plus.push(within("plus", plus.next()).await.unwrap().unwrap().value);
    }
    assert_eq!(seen_plus, ["sensor/kitchen/temp", "sensor/garage/temp"]);
    let mut seen_hash = Vec::new();
    for _ in 0..4 {
        seen_hash.push(within("hash", hash.next()).await.unwrap().unwrap().value);
    }
    assert_eq!(
        seen_hash,
        [
            "sensor/kitchen/temp",
            "sensor/kitchen",
            "sensor/garage/temp/extra",
            "sensor/garage/temp"
        ]
    );
    // `exact` got only its topic: the next message after it is the sentinel.
    assert_eq!(
        within("exact", exact.next()).await.unwrap().unwrap().value,
        "sensor/kitchen"
    );
    p.publish("sensor/kitchen", "sentinel").await.unwrap();
    assert_eq!(
        within("exact sentinel", exact.next())
            .await
            .unwrap()
            .unwrap()
            .value,
        "sentinel"
    );
    relay.stop().await;
}

/// A subscription's retained values come before its live messages, in order, although
/// another subscription of the same client gets those live messages meanwhile: live `Msg`s
/// name no subscription, and the relay holds the new subscription's back until its
/// retained values are sent (`SubOk.history`, then `ReplayDone`). Taken as they came, the
/// live messages published right after `subscribe` returned reached `sensor/#` through
/// `sensor/+/temp` before its retained values and before the ones only it matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_values_come_before_live_messages_another_subscription_shares() {
    let relay = TestRelay::start().await;
    let t = tree("order");
    let c = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let p = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    const RETAINED: usize = 400;
    let filler = "x".repeat(2048);
    for i in 0..RETAINED {
        let o = PublishOptions::default().retain();
        let o = if i + 1 == RETAINED { o.ack() } else { o };
        p.publish_with(&format!("sensor/r{i}"), &format!("r{i} {filler}"), o)
            .await
            .unwrap();
    }
    let mut plus = c.subscribe::<String>("sensor/+/temp").await.unwrap();
    let mut hash = c.subscribe::<String>("sensor/#").await.unwrap();
    // Live at once, while `sensor/#`'s retained values are on their way: every other one
    // matches `sensor/+/temp` too.
    let topics = |i: usize| {
        if i % 2 == 0 {
            "sensor/a/temp"
        } else {
            "sensor/b"
        }
    };
    for i in 0..40 {
        p.publish(topics(i), &format!("l{i}")).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..RETAINED + 40 {
        let m = within("sensor/#", hash.next()).await.unwrap().unwrap();
        seen.push((m.retained, m.value.split(' ').next().unwrap().to_owned()));
    }
    let (retained, live) = seen.split_at(RETAINED);
    assert!(
        retained.iter().all(|(r, _)| *r),
        "a live message before the retained values ended: {:?}",
        live.iter().filter(|(r, _)| *r).take(3).collect::<Vec<_>>()
    );
    let live: Vec<&str> = live.iter().map(|(_, v)| v.as_str()).collect();
    let want: Vec<String> = (0..40).map(|i| format!("l{i}")).collect();
    assert_eq!(live, want, "live messages in publish order");
    for i in (0..40).step_by(2) {
        let m = within("sensor/+/temp", plus.next()).await.unwrap().unwrap();
        assert_eq!(m.value, format!("l{i}"));
    }
    // Nothing twice: the next on each is a sentinel.
    p.publish("sensor/a/temp", "end").await.unwrap();
    assert_eq!(
        within("end", plus.next()).await.unwrap().unwrap().value,
        "end"
    );
    assert_eq!(
        within("end", hash.next()).await.unwrap().unwrap().value,
        "end"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_key_nothing_is_seen_and_rejections_are_counted() {
    let relay = TestRelay::start().await;
    let t = tree("home");
    let full = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    // Bob holds only sensor/garage/#.
    let mut bob_keys = whispeer::Keyring::new();
    bob_keys
        .add_grant_at(
            t.grant(&Scope::Subtree(Topic::new("sensor/garage").unwrap())),
            whispeer::now_ms(),
        )
        .unwrap();
    let bob = ws_client(&relay.ws_url(), bob_keys, identity()).await;
    // A filter bob's grants cannot cover is refused locally.
    assert!(matches!(
        bob.subscribe::<String>("chat/#").await,
        Err(SubscribeError::NoKey { .. })
    ));
    // sensor/# intersects his grant: the relay delivers everything under it, bob opens only
    // what his grant covers.
    let mut sub = bob.subscribe::<String>("sensor/#").await.unwrap();
    full.publish("sensor/kitchen/temp", "secret").await.unwrap();
    full.publish("sensor/garage/door", "open").await.unwrap();
    let m = within("garage", sub.next()).await.unwrap().unwrap();
    assert_eq!(m.value, "open");
    assert_eq!(
        bob.stats().core.rejected,
        1,
        "the kitchen message was rejected and counted"
    );

    // Another tree entirely cannot even subscribe.
    let eve = ws_client(&relay.ws_url(), keyring_with(&tree("home")), identity()).await;
    let mut eve_sub = eve.subscribe::<String>("sensor/#").await.unwrap();
    full.publish("sensor/garage/door", "closed").await.unwrap();
    eve.flush().await.unwrap();
    assert_eq!(
        within("bob", sub.next()).await.unwrap().unwrap().value,
        "closed"
    );
    // Different tree → different key id → the relay never routes it to eve.
    eve.publish("sensor/garage/door", "eve's own")
        .await
        .unwrap();
    assert_eq!(
        within("eve", eve_sub.next()).await.unwrap().unwrap().value,
        "eve's own"
    );
    assert_eq!(eve.stats().core.rejected, 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_messages_have_no_sender_and_wrong_types_are_typed_errors() {
    let relay = TestRelay::start().await;
    let t = tree("home");
    let anon = whispeer::Client::builder()
        .with(whispeer::WebSocket::new(relay.ws_url()))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(identity())
        .with(Signing::off())
        .connect()
        .await
        .unwrap();
    let c = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let mut sub = c.subscribe::<u32>("n").await.unwrap();
    anon.publish("n", &7u32).await.unwrap();
    let m = within("unsigned", sub.next()).await.unwrap().unwrap();
    assert_eq!((m.value, m.sender), (7, None));
    anon.publish("n", "not a number").await.unwrap();
    let e = within("decode error", sub.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ReceiveError::Decode { .. }), "{e}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "keeps the decoder's error"
    );
    anon.publish_bytes("n", "text/plain", b"raw").await.unwrap();
    assert!(matches!(
        within("content type", sub.next()).await.unwrap(),
        Err(ReceiveError::ContentType { .. })
    ));
    let mut raw = c.subscribe_bytes("r").await.unwrap();
    anon.publish_bytes("r", "text/plain", b"raw").await.unwrap();
    let m = within("raw", raw.next()).await.unwrap().unwrap();
    assert_eq!(
        (m.value.as_slice(), m.content_type.as_str()),
        (&b"raw"[..], "text/plain")
    );
    relay.stop().await;
}

/// A TCP proxy that flips one byte inside the envelope of the first `Msg` frame it forwards
/// from relay to client; everything else passes untouched.
async fn tampering_proxy(relay: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let upstream = tokio::net::TcpStream::connect(relay).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut uw).await;
        });
        let mut dec = whispeer::protocol::FrameDecoder::new(1 << 20);
        let mut tampered = false;
        loop {
            dec.reserve_read(64 * 1024);
            if ur.read_buf(dec.buffer_mut()).await.unwrap_or(0) == 0 {
                return;
            }
            while let Some(raw) = dec.next_frame().unwrap() {
                let mut bytes = raw.to_vec();
                if !tampered {
                    if let Ok(whispeer::protocol::Frame::Msg(_)) =
                        whispeer::protocol::Frame::decode(&raw)
                    {
                        let i = bytes.len() - 20; // inside the body ciphertext
                        bytes[i] ^= 0x40;
                        tampered = true;
                    }
                }
                cw.write_all(&(bytes.len() as u32).to_be_bytes())
                    .await
                    .unwrap();
                cw.write_all(&bytes).await.unwrap();
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_altered_in_flight_is_rejected() {
    let relay = TestRelay::start().await;
    let t = tree("home");
    let proxy = tampering_proxy(relay.addrs.tcp.unwrap()).await;
    let victim = whispeer::Client::builder()
        .with(Tcp::new(proxy.to_string()))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(identity())
        .connect()
        .await
        .unwrap();
    let publisher = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let mut sub = victim.subscribe::<String>("x").await.unwrap();
    publisher.publish("x", "first (tampered)").await.unwrap();
    publisher.publish("x", "second").await.unwrap();
    let m = within("second", sub.next()).await.unwrap().unwrap();
    assert_eq!(
        m.value, "second",
        "the altered message never reaches the app"
    );
    assert_eq!(victim.stats().core.rejected, 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_flush_acks_and_close() {
    let relay = TestRelay::start().await;
    let t = tree("home");
    let c = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tx2 = tx.clone();
    let _h1 = c
        .on::<u32, _>("cb/sync", move |m| tx.send(("sync", m.value)).unwrap())
        .await
        .unwrap();
    let _h2 = c
        .on_async::<u32, _, _>("cb/async", move |m| {
            let tx = tx2.clone();
            async move {
                tx.send(("async", m.value)).unwrap();
            }
        })
        .await
        .unwrap();
    c.publish("cb/sync", &1u32).await.unwrap();
    c.publish("cb/async", &2u32).await.unwrap();
    let mut got = vec![
        within("cb", rx.recv()).await.unwrap(),
        within("cb", rx.recv()).await.unwrap(),
    ];
    got.sort();
    assert_eq!(got, [("async", 2), ("sync", 1)]);

    // publish_with ack waits for the relay's PubAck.
    c.publish_with("acked", &1u32, PublishOptions::default().ack())
        .await
        .unwrap();
    c.publish_batch("batch", &[1u32, 2, 3]).await.unwrap();
    c.flush().await.unwrap();

    let mut sub = c.subscribe::<u32>("end").await.unwrap();
    c.close().await;
    assert_eq!(c.state(), ConnectionState::Closed);
    assert!(
        within("stream end", sub.next()).await.is_none(),
        "subscriptions end on close"
    );
    assert!(c.publish("end", &1u32).await.is_err());
    relay.stop().await;
}

/// A burst far larger than what the connection task takes per wake-up (256 frames) arrives
/// complete and in order: nothing is lost at the batch boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_burst_is_delivered_completely_in_order() {
    const N: u32 = 5_000;
    let relay = TestRelay::start().await;
    let t = tree("burst");
    let sub_client = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    let mut sub = sub_client.subscribe::<u32>("burst").await.unwrap();
    let p = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    let values: Vec<u32> = (0..N).collect();
    for chunk in values.chunks(1_000) {
        p.publish_batch("burst", chunk).await.unwrap();
    }
    p.flush().await.unwrap();
    for want in 0..N {
        let m = within("every message", sub.next()).await.unwrap().unwrap();
        assert_eq!(m.value, want);
    }
    assert_eq!(sub_client.stats().core.relay_gaps, 0);
    relay.stop().await;
}

/// Clearing a retained value (PROTOCOL §4.11): nobody is handed the clear, a later
/// subscriber gets no retained value, and the relay cannot bring the cleared one back (the
/// clear's date raised the receiver's retained mark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_retained_value_reaches_nobody() {
    let relay = TestRelay::start().await;
    let t = tree("clear");
    let a = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    a.publish_with(
        "state/door",
        "open",
        whispeer::PublishOptions::default().retain().ack(),
    )
    .await
    .unwrap();
    let live = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let mut sub = live.subscribe::<String>("state/+").await.unwrap();
    let first = within("the retained value", sub.next_message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.value.as_str(), first.retained), ("open", true));
    a.clear_retained("state/door").await.unwrap();
    // The live subscriber is not handed the clear: the next thing it gets is the marker.
    a.publish("state/marker", "after").await.unwrap();
    let next = within("the marker", sub.next_message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.value, "after");
    assert_eq!(next.topic.as_str(), "state/marker");
    // A later subscriber gets no retained value for the door (only the marker's, which
    // is not retained, so nothing) — its first message is a fresh publish.
    let later = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let mut sub2 = later.subscribe::<String>("state/+").await.unwrap();
    a.publish("state/marker", "fresh").await.unwrap();
    let m = within("the fresh marker", sub2.next_message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.value.as_str(), m.retained), ("fresh", false));
    assert_eq!(later.stats().core.delivered, 1);
}

/// The client announces at most 16 KiB segments, whatever the server does: on loopback
/// (MTU 65536) a receive window below one 64 KiB segment stalls Linux senders for the 200 ms
/// persist timer. A plain listener (no cap of its own) sees the client's cap in the segment
/// size it may send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_caps_the_segment_size_it_announces() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for ws in [false, true] {
        let url = format!("{}://{addr}", if ws { "ws" } else { "tcp" });
        let b = whispeer::Client::builder();
        let b = if ws {
            b.with(whispeer::WebSocket::new(url.clone()))
        } else {
            b.with(Tcp::new(url.clone()))
        };
        let dialing = tokio::spawn(
            b.with(Encryption::with_keyring(keyring_with(&tree("mss"))))
                .connect(),
        );
        let (server_side, _) = listener.accept().await.unwrap();
        let mss = socket2::SockRef::from(&server_side).tcp_mss().unwrap();
        assert!(
            mss <= 16 * 1024,
            "{url}: the server may send {mss}-byte segments"
        );
        dialing.abort();
    }
}
