//! Persistence, replay and delivery guarantees against real SQLite files: QoS 1 `PubAck`
//! after commit, replay from a sequence / a time / the last N with a gap-free hand-over to
//! live, retention (count, bytes, age with an injected clock), retained values, publish-id
//! dedup (also across a relay restart and under induced reconnects), durable
//! subscriptions that resume, damaged and foreign store files, and 100,000 QoS 1 publishes
//! across two SIGKILLs of the real binary with zero acknowledged messages lost.
//!
//! Every wait is on an event (a frame, a file, a process exit), bounded by `TIMEOUT`.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use whispeer_protocol::frame::{
    features, msg_flags, pub_flags, Ack, Hello, Msg, Pub, Replay, ReplayDone, Sub, PROTOCOL_VERSION,
};
use whispeer_protocol::{codec, Envelope, Frame, FrameDecoder, Qos, TokenPattern};
use whispeer_relay::admin::{http_get, Status};
use whispeer_relay::config::StoreKind;
use whispeer_relay::store::SqliteStore;
use whispeer_relay::{Config, Relay};

const ALL_FEATURES: u64 = features::AT_LEAST_ONCE
    | features::EXACTLY_ONCE
    | features::RETAIN
    | features::REPLAY
    | features::DURABLE;

/// An envelope on `[key(k), tok(level)]` told apart by `i` ([`index_of`]), `body` bytes.
fn indexed(k: u8, level: u8, i: u64, body: usize) -> Envelope {
    indexed_on(key(k), level, i, body)
}

fn pid(i: u64) -> [u8; 16] {
    let mut p = [0xa5; 16];
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

fn publish(env: Envelope, qos: Qos, id: Option<[u8; 16]>, retain: bool) -> Frame {
    Frame::Pub(Pub {
        envelope: env,
        flags: if id.is_some() { pub_flags::ACK } else { 0 }
            | if retain { pub_flags::RETAIN } else { 0 },
        publish_id: id,
        qos,
    })
}

fn sub(
    sub_id: u64,
    p: TokenPattern,
    qos: Qos,
    durable: Option<&str>,
    replay: Option<Replay>,
) -> Frame {
    Frame::Sub(Sub {
        sub_id,
        pattern: p,
        qos,
        durable: durable.map(String::from),
        replay,
        retained: false,
        credit: None,
        owner: None,
    })
}

async fn greeted(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::tcp(addr).await;
    let w = c.hello_with(ALL_FEATURES).await;
    assert_eq!(w.features, ALL_FEATURES, "store features granted");
    c
}

/// Publishes with `ACK` and waits for every `PubAck`; returns publish index → seq.
async fn publish_acked(c: &mut Client, envs: &[(u64, Envelope)], qos: Qos) -> HashMap<u64, u64> {
    for (i, e) in envs {
        c.send(&publish(e.clone(), qos, Some(pid(*i)), false)).await;
    }
    let mut acks = HashMap::new();
    while acks.len() < envs.len() {
        match c.recv().await {
            Frame::PubAck(a) => {
                acks.insert(
                    u64::from_le_bytes(a.publish_id[..8].try_into().unwrap()),
                    a.seq,
                );
            }
            Frame::Msg(_) => {}
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    acks
}

/// Subscribes with replay and collects the history up to `ReplayDone`.
async fn history(
    c: &mut Client,
    sub_id: u64,
    p: TokenPattern,
    replay: Replay,
) -> (u64, Vec<Msg>, ReplayDone) {
    c.send(&sub(sub_id, p, Qos::AtMostOnce, None, Some(replay)))
        .await;
    let boundary = match c.recv().await {
        Frame::SubOk(s) => s.seq,
        other => panic!("expected SubOk, got {other:?}"),
    };
    let mut msgs = Vec::new();
    loop {
        match c.recv().await {
            Frame::Msg(m) => {
                assert!(
                    m.flags & msg_flags::REPLAYED != 0,
                    "history is flagged REPLAYED"
                );
                msgs.push(m)
            }
            Frame::ReplayDone(d) => {
                assert_eq!(d.sub_id, sub_id);
                assert_eq!(d.seq, boundary);
                assert_eq!(d.count, msgs.len() as u64);
                return (boundary, msgs, d);
            }
            other => panic!("expected history, got {other:?}"),
        }
    }
}

fn file_config(path: &Path) -> Config {
    let mut c = Config::ephemeral();
    c.store.kind = Some(StoreKind::Sqlite);
    c.store.path = path.to_owned();
    // No free-space reserve: these tests must not depend on TMPDIR's free space.
    c.store.min_free_bytes = 0;
    c
}

#[tokio::test]
async fn qos1_puback_after_commit_then_replay_from_seq_last_n_and_since() {
    let dir = temp_dir("replay");
    let mut config = file_config(&dir.join("s.db"));
    config.listen.ws = whispeer_relay::config::ListenAddr::OFF;
    // An injected clock: messages 0..10 at t=1000, 10..20 at t=2000.
    let now = Arc::new(AtomicU64::new(1000));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    let store = SqliteStore::open_file_with_clock(config.store.clone(), clock).unwrap();
    let listeners = whispeer_relay::Listeners::bind(&config).await.unwrap();
    let relay = TestRelay::run(
        Relay::builder(config)
            .listeners(listeners)
            .store(Arc::new(store))
            .build()
            .unwrap(),
    );
    let mut p = greeted(relay.tcp()).await;
    let a: Vec<_> = (0..10)
        .map(|i| (i, indexed(1, (i % 2) as u8, i, 100)))
        .collect();
    let acks_a = publish_acked(&mut p, &a, Qos::AtLeastOnce).await;
    now.store(2000, Ordering::SeqCst);
    let b: Vec<_> = (10..20)
        .map(|i| (i, indexed(1, (i % 2) as u8, i, 100)))
        .collect();
    let acks_b = publish_acked(&mut p, &b, Qos::AtLeastOnce).await;
    let seq_of = |i: u64| acks_a.get(&i).or(acks_b.get(&i)).copied().unwrap();
    // Sequences follow publish order.
    for i in 1..20 {
        assert_eq!(seq_of(i), seq_of(i - 1) + 1);
    }
    let all = pattern(1, &[], true);
    let mut s = greeted(relay.tcp()).await;

    let (boundary, msgs, _) = history(&mut s, 1, all.clone(), Replay::FromSeq(0)).await;
    assert_eq!(boundary, seq_of(19));
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, (0..20).collect::<Vec<_>>(), "everything, in order");

    let (_, msgs, _) = history(&mut s, 2, all.clone(), Replay::FromSeq(seq_of(15))).await;
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, vec![15, 16, 17, 18, 19], "from a sequence, inclusive");

    // Last N is per path: paths 0 and 1 each give their last 3.
    let (_, msgs, _) = history(&mut s, 3, all.clone(), Replay::LastN(3)).await;
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, vec![14, 15, 16, 17, 18, 19]);
    let (_, msgs, _) = history(&mut s, 4, exact(1, &[1]), Replay::LastN(2)).await;
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, vec![17, 19], "a filter restricts the paths");

    let (_, msgs, _) = history(&mut s, 5, all.clone(), Replay::SinceMs(2000)).await;
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, (10..20).collect::<Vec<_>>(), "since a time");
    let (_, msgs, _) = history(&mut s, 6, all.clone(), Replay::SinceMs(2001)).await;
    assert!(msgs.is_empty());
    let (_, msgs, _) = history(&mut s, 7, pattern(2, &[], true), Replay::FromSeq(0)).await;
    assert!(msgs.is_empty(), "another key id has no history");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_to_live_handover_has_no_gap_and_no_duplicate_while_publishing() {
    let dir = temp_dir("handover");
    let mut config = file_config(&dir.join("s.db"));
    // Room for everything, so the slow-consumer policy never interferes with the check.
    config.queue.capacity = 32_768;
    // QoS 0 history is kept only when the retention policy says so.
    config.store.store_qos0 = true;
    let relay = TestRelay::start(config).await;
    const N: u64 = 20_000;
    let addr = relay.tcp();
    let (first_acked_tx, first_acked) = tokio::sync::oneshot::channel();
    let publisher = tokio::spawn(async move {
        let mut p = greeted(addr).await;
        let mut tx = Some(first_acked_tx);
        for i in 0..N {
            p.send(&publish(indexed(1, 1, i, 64), Qos::AtMostOnce, None, false))
                .await;
            if i == 2_000 {
                // A ping round trip: everything before it was accepted.
                p.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 1 }))
                    .await;
                loop {
                    if let Frame::Pong(_) = p.recv().await {
                        break;
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
        p
    });
    first_acked.await.unwrap();
    // Subscribe from the beginning while the publisher keeps going.
    let mut s = greeted(relay.tcp()).await;
    s.send(&sub(
        1,
        exact(1, &[1]),
        Qos::AtMostOnce,
        None,
        Some(Replay::FromSeq(0)),
    ))
    .await;
    let boundary = match s.recv().await {
        Frame::SubOk(ok) => ok.seq,
        other => panic!("expected SubOk, got {other:?}"),
    };
    assert!(
        (2_001..=N).contains(&boundary),
        "boundary {boundary} mid-stream"
    );
    let mut next = 0u64;
    let mut done_seen = false;
    let mut last_seq = 0;
    while next < N {
        match s.recv().await {
            Frame::Msg(m) => {
                assert_eq!(index_of(&m.envelope), next, "no gap, no duplicate");
                assert!(m.seq > last_seq);
                last_seq = m.seq;
                let replayed = m.flags & msg_flags::REPLAYED != 0;
                assert_eq!(
                    replayed,
                    m.seq <= boundary,
                    "history up to the boundary, then live"
                );
                assert_eq!(replayed, !done_seen);
                next += 1;
            }
            Frame::ReplayDone(d) => {
                assert_eq!(d.seq, boundary);
                assert_eq!(d.count, next);
                assert_eq!(last_seq, boundary);
                done_seen = true;
            }
            Frame::Gap(g) => panic!("dropped {} messages", g.dropped),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(done_seen);
    publisher.await.unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn retention_by_count_bytes_and_age_and_retained_values() {
    let dir = temp_dir("retention");
    let mut config = file_config(&dir.join("s.db"));
    config.store.max_messages = 5;
    config.store.max_bytes = 4 * 300;
    config.store.max_age_ms = 10_000;
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    let store = SqliteStore::open_file_with_clock(config.store.clone(), clock).unwrap();
    let listeners = whispeer_relay::Listeners::bind(&config).await.unwrap();
    let relay = TestRelay::run(
        Relay::builder(config)
            .listeners(listeners)
            .store(Arc::new(store))
            .build()
            .unwrap(),
    );
    let mut p = greeted(relay.tcp()).await;
    // Path 1: 12 small messages -> the count limit keeps the last 5.
    let small: Vec<_> = (0..12).map(|i| (i, indexed(1, 1, i, 32))).collect();
    publish_acked(&mut p, &small, Qos::AtLeastOnce).await;
    // Path 2: 6 messages of about 300 bytes -> the byte limit keeps fewer than 5.
    let big: Vec<_> = (100..106)
        .map(|i| (i, indexed(1, 2, i, 300 - 112)))
        .collect();
    publish_acked(&mut p, &big, Qos::AtLeastOnce).await;
    let mut s = greeted(relay.tcp()).await;
    let (_, msgs, _) = history(&mut s, 1, exact(1, &[1]), Replay::FromSeq(0)).await;
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, vec![7, 8, 9, 10, 11], "count limit");
    let (_, msgs, _) = history(&mut s, 2, exact(1, &[2]), Replay::FromSeq(0)).await;
    let total: usize = msgs.iter().map(|m| m.envelope.len()).sum();
    assert!(total <= 4 * 300, "byte limit: {total}");
    assert_eq!(
        msgs.iter()
            .map(|m| index_of(&m.envelope))
            .collect::<Vec<_>>(),
        (106 - msgs.len() as u64..106).collect::<Vec<_>>(),
        "the newest survive"
    );
    assert!(msgs.len() >= 3);

    // Age: 11 s later one publish on path 3 triggers the sweep (in the same commit as its
    // PubAck); paths 1 and 2 expire, path 3 keeps its fresh message.
    now.fetch_add(11_000, Ordering::SeqCst);
    publish_acked(&mut p, &[(200, indexed(1, 3, 200, 32))], Qos::AtLeastOnce).await;
    let (_, msgs, _) = history(&mut s, 3, pattern(1, &[], true), Replay::FromSeq(0)).await;
    let got: Vec<u64> = msgs.iter().map(|m| index_of(&m.envelope)).collect();
    assert_eq!(got, vec![200], "age limit");
    let st = relay.handle.status().store;
    assert_eq!(st.messages, 1);
    assert_eq!(st.path_count, 1);

    // Retained values: the last RETAIN publish per exact path, sent on subscribe with the
    // RETAINED flag, then live.
    for (i, lvl) in [(300u64, 5u8), (301, 5), (302, 6)] {
        p.send(&publish(
            indexed(1, lvl, i, 32),
            Qos::AtLeastOnce,
            Some(pid(i)),
            true,
        ))
        .await;
    }
    p.send(&publish(
        indexed(1, 5, 303, 32),
        Qos::AtLeastOnce,
        Some(pid(303)),
        false,
    ))
    .await;
    for _ in 0..4 {
        assert!(matches!(p.recv().await, Frame::PubAck(_)));
    }
    let mut r = greeted(relay.tcp()).await;
    r.send(&Frame::Sub(Sub {
        sub_id: 9,
        pattern: pattern(1, &[None], false),
        qos: Qos::AtMostOnce,
        durable: None,
        replay: None,
        retained: true,
        credit: None,
        owner: None,
    }))
    .await;
    assert!(matches!(r.recv().await, Frame::SubOk(_)));
    let mut retained = Vec::new();
    for _ in 0..2 {
        let m = r.expect_msg().await;
        assert_eq!(m.flags, msg_flags::RETAINED);
        retained.push(index_of(&m.envelope));
    }
    assert_eq!(
        retained,
        vec![301, 302],
        "latest retained per path, in sequence order"
    );
    p.send(&publish(
        indexed(1, 6, 304, 32),
        Qos::AtMostOnce,
        None,
        false,
    ))
    .await;
    let live = r.expect_msg().await;
    assert_eq!((index_of(&live.envelope), live.flags), (304, 0));
    assert_eq!(relay.handle.status().store.retained, 2);
    relay.stop().await;
}

#[tokio::test]
async fn exactly_once_publish_ids_dedup_under_induced_reconnects() {
    let dir = temp_dir("dedup");
    let relay = TestRelay::start(file_config(&dir.join("s.db"))).await;
    const N: u64 = 3_000;
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut sent_on_conn;
    let mut reconnects = 0;
    let mut next = 0u64;
    while acked.len() < N as usize {
        let mut c = greeted(relay.tcp()).await;
        sent_on_conn = 0;
        // Re-send everything not yet acknowledged (same publish ids), then new ones; drop
        // the connection every 300 publishes without waiting for the acks.
        let mut resend: Vec<u64> = (0..next).filter(|i| !acked.contains_key(i)).collect();
        while sent_on_conn < 300 && next < N {
            resend.push(next);
            next += 1;
            sent_on_conn += 1;
        }
        for i in &resend {
            c.send(&publish(
                indexed(1, 1, *i, 64),
                Qos::ExactlyOnce,
                Some(pid(*i)),
                false,
            ))
            .await;
        }
        // Read roughly half the acks, then cut the connection.
        let want = if next < N {
            resend.len() / 2
        } else {
            resend.len()
        };
        let mut got = 0;
        while got < want {
            if let Frame::PubAck(a) = c.recv().await {
                let i = u64::from_le_bytes(a.publish_id[..8].try_into().unwrap());
                if let Some(prev) = acked.insert(i, a.seq) {
                    assert_eq!(prev, a.seq, "a duplicate gets the original's sequence");
                }
                got += 1;
            }
        }
        drop(c);
        reconnects += 1;
    }
    assert!(reconnects >= 10);
    // Each publish is stored exactly once, under the sequence its PubAck named.
    let mut s = greeted(relay.tcp()).await;
    let (_, msgs, _) = history(&mut s, 1, exact(1, &[1]), Replay::FromSeq(0)).await;
    let mut seen = HashSet::new();
    for m in &msgs {
        let i = index_of(&m.envelope);
        assert!(seen.insert(i), "message {i} stored twice");
        assert_eq!(acked[&i], m.seq);
    }
    assert_eq!(seen.len() as u64, N);
    let st = relay.handle.status().store;
    assert_eq!(st.messages, N);
    assert!(st.dedup_entries >= N);
    relay.stop().await;
}

fn relay_args<'a>(db: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--store-path", db];
    v.extend_from_slice(extra);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_subscriber_resumes_after_its_connection_and_the_relay_die() {
    let dir = temp_dir("durable");
    let db = dir.join("s.db");
    let db_s = db.to_str().unwrap();
    let mut relay = BinRelay::start(&relay_args(db_s, &[]));
    let mut p = greeted(relay.tcp()).await;
    let envs: Vec<_> = (0..1000).map(|i| (i, indexed(1, 1, i, 64))).collect();
    // The durable is created before anything is published: it starts at the boundary.
    let mut s = greeted(relay.tcp()).await;
    s.send(&sub(1, exact(1, &[1]), Qos::AtLeastOnce, Some("d1"), None))
        .await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let acks = publish_acked(&mut p, &envs, Qos::AtLeastOnce).await;
    // Receive 400 and ack them, then receive more without acking and die mid-stream.
    for i in 0..600u64 {
        let m = s.expect_msg().await;
        assert_eq!(index_of(&m.envelope), i);
        if i < 400 {
            s.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
        }
    }
    // A ping round trip: the relay has processed the acks.
    s.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 5 }))
        .await;
    while !matches!(s.recv().await, Frame::Pong(_)) {}
    // The connection ends without a Close (its unacked messages still queued). The relay
    // gives the durable name back before it closes its side, so the end of stream here is
    // the event after which a resume finds the name free.
    s.shutdown_write().await;
    s.drain_to_end().await;
    // Resume: everything after the acknowledged floor, nothing before it.
    let mut s = greeted(relay.tcp()).await;
    s.send(&sub(1, exact(1, &[1]), Qos::AtLeastOnce, Some("d1"), None))
        .await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let mut expect = 400u64;
    let mut acked_upto = 0;
    loop {
        match s.recv().await {
            Frame::Msg(m) => {
                assert_eq!(
                    index_of(&m.envelope),
                    expect,
                    "resumes at the floor, in order"
                );
                assert_eq!(m.seq, acks[&expect]);
                if expect < 800 {
                    s.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
                    acked_upto = expect;
                }
                expect += 1;
            }
            Frame::ReplayDone(d) => {
                assert_eq!(d.count, 600);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(expect, 1000);
    s.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 6 }))
        .await;
    while !matches!(s.recv().await, Frame::Pong(_)) {}
    // Kill the relay with SIGKILL, restart on the same file: the durable resumes from its
    // persisted floor (write-behind, so possibly a little earlier: at least once), never
    // later — nothing unacknowledged is skipped.
    relay.child.kill().unwrap();
    let _ = relay.child.wait();
    drop(s);
    let relay2 = BinRelay::start(&relay_args(db_s, &[]));
    let mut s = greeted(relay2.tcp()).await;
    s.send(&sub(1, exact(1, &[1]), Qos::AtLeastOnce, Some("d1"), None))
        .await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let mut first = None;
    let mut seen = BTreeSet::new();
    loop {
        match s.recv().await {
            Frame::Msg(m) => {
                let i = index_of(&m.envelope);
                first.get_or_insert(i);
                seen.insert(i);
            }
            Frame::ReplayDone(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let first = first.expect("unacknowledged messages are redelivered");
    assert!(
        first <= acked_upto + 1,
        "resumed at {first}, floor was {acked_upto}"
    );
    assert_eq!(
        seen,
        (first..1000).collect::<BTreeSet<_>>(),
        "every unacknowledged message, once, in order"
    );
    // A second connection cannot take a durable name that is in use.
    let mut other = greeted(relay2.tcp()).await;
    other
        .send(&sub(2, exact(1, &[1]), Qos::AtLeastOnce, Some("d1"), None))
        .await;
    let e = other.expect_err().await;
    assert_eq!(
        e.code,
        whispeer_protocol::ErrorCode::Busy,
        "retryable: {e:?}"
    );
    assert!(!e.fatal);
}

#[tokio::test]
async fn unacknowledged_messages_are_redelivered_after_the_ack_timeout() {
    let dir = temp_dir("redeliver");
    let mut config = file_config(&dir.join("s.db"));
    config.delivery.ack_timeout_ms = 50;
    let relay = TestRelay::start(config).await;
    let mut s = greeted(relay.tcp()).await;
    s.send(&sub(1, exact(1, &[1]), Qos::AtLeastOnce, None, None))
        .await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let mut p = greeted(relay.tcp()).await;
    publish_acked(
        &mut p,
        &[(1, indexed(1, 1, 1, 32)), (2, indexed(1, 1, 2, 32))],
        Qos::AtLeastOnce,
    )
    .await;
    let m1 = s.expect_msg().await;
    let m2 = s.expect_msg().await;
    assert_eq!(m1.flags, 0);
    s.send(&Frame::Ack(Ack { seqs: vec![m1.seq] })).await;
    // The unacknowledged one comes back, flagged REDELIVERED. (On a loaded machine the
    // 50 ms timeout can pass before the relay reads the ack of m1: a redelivery of m1
    // queued before that is allowed, and nothing of m1 follows it.)
    let again = loop {
        let m = s.expect_msg().await;
        if m.seq == m1.seq {
            assert_eq!(m.flags, msg_flags::REDELIVERED);
            continue;
        }
        break m;
    };
    assert_eq!(again.seq, m2.seq);
    assert_eq!(again.flags, msg_flags::REDELIVERED);
    s.send(&Frame::Ack(Ack { seqs: vec![m2.seq] })).await;
    // After the ack, nothing more: a ping round trip spans several ack timeouts' worth of
    // ticks only if we wait, so publish one more and expect exactly that next.
    publish_acked(&mut p, &[(3, indexed(1, 1, 3, 32))], Qos::AtLeastOnce).await;
    loop {
        let m = s.expect_msg().await;
        if m.seq == m2.seq {
            // A redelivery already queued before the ack arrived is allowed.
            continue;
        }
        assert_eq!(index_of(&m.envelope), 3);
        break;
    }
    relay.stop().await;
}

fn serve_output(db: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
        .args([
            "serve",
            "--ws",
            "off",
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--store-path",
        ])
        .arg(db)
        .env("WHISPEER_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test]
async fn damaged_foreign_and_garbage_store_files_fail_at_start() {
    let dir = temp_dir("damaged");
    // Foreign: a valid SQLite database of some other application.
    let foreign = dir.join("foreign.db");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let before = std::fs::read(&foreign).unwrap();
    let out = serve_output(&foreign);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not a whispeer relay store"), "{err}");
    assert_eq!(
        std::fs::read(&foreign).unwrap(),
        before,
        "a foreign file is left untouched"
    );

    // Garbage: not SQLite at all.
    let garbage = dir.join("garbage.db");
    std::fs::write(&garbage, vec![0x42; 8192]).unwrap();
    let out = serve_output(&garbage);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not an SQLite database"), "{err}");

    // Damaged: a real store with data, cleanly closed, then pages overwritten.
    let db = dir.join("store.db");
    {
        let db_s = db.to_str().unwrap();
        let mut relay = BinRelay::start(&relay_args(db_s, &[]));
        let mut p = greeted(relay.tcp()).await;
        let envs: Vec<_> = (0..300)
            .map(|i| (i, indexed(1, (i % 7) as u8, i, 400)))
            .collect();
        publish_acked(&mut p, &envs, Qos::AtLeastOnce).await;
        relay.sigterm();
        let status = tokio::task::spawn_blocking(move || relay.wait_exit())
            .await
            .unwrap();
        assert!(status.success());
    }
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8 * 4096, "store has pages: {}", bytes.len());
    for b in &mut bytes[4096 * 3..4096 * 6] {
        *b = 0xff;
    }
    std::fs::write(&db, &bytes).unwrap();
    let out = serve_output(&db);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is damaged"), "{err}");
    assert!(err.contains(db.to_str().unwrap()), "names the file: {err}");
}

#[tokio::test]
async fn status_and_metrics_show_the_store() {
    let dir = temp_dir("status");
    let db = dir.join("s.db");
    let relay = BinRelay::start(&relay_args(
        db.to_str().unwrap(),
        // Per-path detail (key ids) in /status needs the admin token.
        &[
            "--retention-messages",
            "1000",
            "--admin-token",
            "status-test-admin-token",
        ],
    ));
    let mut p = greeted(relay.tcp()).await;
    let envs: Vec<_> = (0..50)
        .map(|i| (i, indexed(1, 1 + (i % 2) as u8, i, 100)))
        .collect();
    publish_acked(&mut p, &envs, Qos::AtLeastOnce).await;
    let mut s = greeted(relay.tcp()).await;
    history(&mut s, 1, pattern(1, &[], true), Replay::FromSeq(0)).await;
    let admin = relay.admin().to_string();
    let status: Status = serde_json::from_slice(
        &whispeer_relay::admin::http_get_auth(&admin, "/status", Some("status-test-admin-token"))
            .await
            .unwrap(),
    )
    .unwrap();
    let st = &status.store;
    assert_eq!(st.kind, "sqlite");
    assert!(st.file_bytes > 0);
    assert_eq!(st.retention.max_messages, 1000);
    assert_eq!(st.messages, 50);
    assert_eq!(st.path_count, 2);
    let path1 = format!("{}{}", "01".repeat(16), "01".repeat(16));
    let p1 = st
        .paths
        .iter()
        .find(|p| p.path == path1)
        .expect("path listed as hex");
    assert_eq!(p1.messages, 25);
    let text = String::from_utf8(http_get(&admin, "/metrics").await.unwrap().to_vec()).unwrap();
    for name in [
        "whispeer_relay_store_appends_total 50",
        "whispeer_relay_replayed_messages_total 50",
        "whispeer_relay_store_commit_seconds_bucket",
        "whispeer_relay_store_commit_batch_size_count",
        "whispeer_relay_store_info{kind=\"sqlite\"} 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
            .args(["status", "--admin", &format!("http://{admin}")])
            .args(["--admin-token", "status-test-admin-token"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("store        sqlite"), "{text}");
    assert!(text.contains("50 messages"), "{text}");
    assert!(text.contains(&path1[..40]), "{text}");
}

/// A raw windowed QoS 1 publisher over one TCP connection.
struct RawConn {
    io: TcpStream,
    dec: FrameDecoder,
}

impl RawConn {
    async fn open(addr: std::net::SocketAddr) -> std::io::Result<Self> {
        let io = TcpStream::connect(addr).await?;
        io.set_nodelay(true)?;
        let mut c = Self {
            io,
            dec: FrameDecoder::new(1 << 24),
        };
        c.write(&codec::encode_prefixed(&Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            features: ALL_FEATURES,
            client: None,
            auth: None,
            account: None,
        })))
        .await?;
        match c.next().await? {
            Frame::Welcome(_) => Ok(c),
            other => Err(std::io::Error::other(format!(
                "expected Welcome: {other:?}"
            ))),
        }
    }

    async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.io.write_all(b).await
    }

    async fn next(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some(f) = self.dec.next_frame().map_err(std::io::Error::other)? {
                return Frame::decode(&f).map_err(std::io::Error::other);
            }
            let buf = self.dec.buffer_mut();
            buf.reserve(256 * 1024);
            let n = tokio::time::timeout(TIMEOUT, self.io.read_buf(buf))
                .await
                .map_err(|_| std::io::Error::other("timed out"))??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twice_while_publishing_100k_qos1_loses_nothing_acknowledged() {
    const N: u64 = 100_000;
    const WINDOW: usize = 2_048;
    let dir = temp_dir("crash");
    let db = dir.join("crash.db");
    let db_s = db.to_str().unwrap().to_owned();
    let start = |db: String| {
        tokio::task::spawn_blocking(move || {
            BinRelay::start(&["--store-path", &db, "--publish-rate", "0"])
        })
    };
    let mut relay = start(db_s.clone()).await.unwrap();
    let envs: Vec<Bytes> = (0..N)
        .map(|i| {
            codec::encode_prefixed(&publish(
                indexed(9, 1, i, 200),
                Qos::AtLeastOnce,
                Some(pid(i)),
                false,
            ))
        })
        .collect();
    let mut acked: Vec<Option<u64>> = vec![None; N as usize];
    let mut acked_n = 0u64;
    let mut next_new = 0u64;
    let mut unacked: BTreeSet<u64> = BTreeSet::new();
    let mut kills = 0;
    let mut connections = 0;
    let mut acks_total = 0u64;
    let kill_at = [N / 3, 2 * N / 3];
    'conn: while acked_n < N {
        let mut c = match RawConn::open(relay.tcp()).await {
            Ok(c) => c,
            Err(e) => panic!("relay unreachable after restart: {e}"),
        };
        connections += 1;
        // Everything sent on a dead connection without a PubAck is sent again.
        let mut queue: Vec<u64> = unacked.iter().copied().collect();
        let mut inflight: HashSet<u64> = HashSet::new();
        loop {
            let mut buf = Vec::new();
            while inflight.len() < WINDOW {
                let i = if let Some(i) = queue.pop() {
                    i
                } else if next_new < N {
                    next_new += 1;
                    next_new - 1
                } else {
                    break;
                };
                unacked.insert(i);
                inflight.insert(i);
                buf.extend_from_slice(&envs[i as usize]);
            }
            if !buf.is_empty() && c.write(&buf).await.is_err() {
                continue 'conn;
            }
            if inflight.is_empty() {
                break 'conn;
            }
            let f = match c.next().await {
                Ok(f) => f,
                Err(_) => continue 'conn,
            };
            match f {
                Frame::PubAck(a) => {
                    let i = u64::from_le_bytes(a.publish_id[..8].try_into().unwrap());
                    acks_total += 1;
                    inflight.remove(&i);
                    unacked.remove(&i);
                    if acked[i as usize].is_none() {
                        acked_n += 1;
                    }
                    acked[i as usize] = Some(a.seq);
                }
                other => panic!("unexpected {other:?}"),
            }
            if kills < kill_at.len() && acked_n >= kill_at[kills] {
                // SIGKILL mid-stream: the window is full of unacknowledged publishes.
                relay.child.kill().unwrap();
                let _ = relay.child.wait();
                kills += 1;
                relay = start(db_s.clone()).await.unwrap();
                continue 'conn;
            }
        }
    }
    assert_eq!(kills, 2);
    assert_eq!(acked_n, N);
    // Replay everything from the start and check every acknowledged message is there.
    let mut c = RawConn::open(relay.tcp()).await.unwrap();
    c.write(&codec::encode_prefixed(&sub(
        1,
        pattern(9, &[], true),
        Qos::AtMostOnce,
        None,
        Some(Replay::FromSeq(0)),
    )))
    .await
    .unwrap();
    let mut by_seq: HashMap<u64, u64> = HashMap::new();
    let mut stored_copies = 0u64;
    loop {
        match c.next().await.unwrap() {
            Frame::SubOk(_) => {}
            Frame::Msg(m) => {
                by_seq.insert(m.seq, index_of(&m.envelope));
                stored_copies += 1;
            }
            Frame::ReplayDone(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut lost = 0;
    for (i, seq) in acked.iter().enumerate() {
        let seq = seq.expect("acked");
        if by_seq.get(&seq) != Some(&(i as u64)) {
            lost += 1;
        }
    }
    let distinct: HashSet<u64> = by_seq.values().copied().collect();
    eprintln!(
        "crash test: {N} messages, {acks_total} PubAcks ({acked_n} distinct), {kills} SIGKILLs, \
         {connections} connections, {stored_copies} stored copies ({} duplicates from \
         re-sends), {} distinct stored, lost {lost}",
        stored_copies - distinct.len() as u64,
        distinct.len()
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(distinct.len() as u64, N);
    // ~250 MB of database and WAL: not left for the next binary's sweep.
    let _ = std::fs::remove_dir_all(&dir);
}

/// PROTOCOL §3.5.5 "Retained values", `RETAINED_BEFORE` (§3.4.6): a `Sub` asking for
/// retained values and a replay from sequence `x` gets, from a relay that granted it, the
/// retained values older than `x` (flag `RETAINED`, in sequence order) and then the history
/// from `x` (`REPLAYED`), ended by one `ReplayDone` counting both — what a client resuming an
/// at-least-once subscription cut during its retained values needs (before, it started
/// live again and lost what was stored meanwhile). A client not granted it gets the history
/// alone (retained values are ignored next to a replay, as before). At QoS 1 with credit 1
/// both parts go under the credit: one message per ack, in that order.
#[tokio::test]
async fn retained_values_before_a_resume_point_then_its_history_in_one_hand_over() {
    let dir = temp_dir("retained-before");
    let relay = TestRelay::start(file_config(&dir.join("s.db"))).await;
    let mut p = greeted(relay.tcp()).await;
    // (index, level, retain): levels 5 and 6 have retained values before the resume point,
    // level 7 one after it; 3 and 5 are plain messages.
    let plan = [
        (1u64, 5u8, true),
        (2, 6, true),
        (3, 5, false),
        (4, 7, true),
        (5, 5, false),
    ];
    let mut seqs = HashMap::new();
    for (i, lvl, retain) in plan {
        p.send(&publish(
            indexed(1, lvl, i, 32),
            Qos::AtLeastOnce,
            Some(pid(i)),
            retain,
        ))
        .await;
        match p.recv().await {
            Frame::PubAck(a) => seqs.insert(i, a.seq),
            other => panic!("expected PubAck, got {other:?}"),
        };
    }
    let x = seqs[&3];
    let asked = features::HISTORY_END | features::RETAINED_BEFORE;
    for (granted, qos) in [
        (true, Qos::AtMostOnce),
        (true, Qos::AtLeastOnce),
        (false, Qos::AtLeastOnce),
    ] {
        let mut s = Client::tcp(relay.tcp()).await;
        let offer = ALL_FEATURES | features::HISTORY_END | if granted { asked } else { 0 };
        let w = s.hello_with(offer).await;
        assert_eq!(w.features & asked, offer & asked, "granted as offered");
        s.send(&Frame::Sub(Sub {
            sub_id: 7,
            pattern: pattern(1, &[None], false),
            qos,
            durable: None,
            replay: Some(Replay::FromSeq(x)),
            retained: true,
            credit: (qos == Qos::AtLeastOnce).then_some(1),
            owner: None,
        }))
        .await;
        let boundary = match s.recv().await {
            Frame::SubOk(ok) => {
                assert_eq!(ok.history, Some(true), "a hand-over follows");
                ok.seq
            }
            other => panic!("expected SubOk, got {other:?}"),
        };
        let mut got = Vec::new();
        let done = loop {
            match s.recv().await {
                Frame::Msg(m) => {
                    assert_eq!(m.sub_id, Some(7), "history names its subscription");
                    got.push((index_of(&m.envelope), m.flags));
                    if qos == Qos::AtLeastOnce {
                        s.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
                    }
                }
                Frame::ReplayDone(d) => break d,
                other => panic!("expected history, got {other:?}"),
            }
        };
        let history = [
            (3, msg_flags::REPLAYED),
            (4, msg_flags::REPLAYED),
            (5, msg_flags::REPLAYED),
        ];
        let want: Vec<(u64, u64)> = if granted {
            [(1, msg_flags::RETAINED), (2, msg_flags::RETAINED)]
                .into_iter()
                .chain(history)
                .collect()
        } else {
            history.to_vec()
        };
        assert_eq!(got, want, "granted {granted}, {qos:?}");
        assert_eq!(
            (done.sub_id, done.seq, done.count),
            (7, boundary, want.len() as u64)
        );
    }
    relay.stop().await;
}
