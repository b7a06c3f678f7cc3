//! Relays whose store is the cluster's JetStream stream (`--cluster-store jetstream`): a
//! real three-node nats-server cluster (JetStream, R3) and real `whispeer-relay` processes.
//! One numbering for the whole cluster: the same sequences on every relay, `PubAck` only
//! once JetStream has the message, history, retained values and durables served by any
//! relay. Every wait is on an event (a frame, a log line, a bucket update), none on time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use bytes::Bytes;
use common::nats::{numbered_sized, NatsCluster};
use common::*;
use futures_util::StreamExt;
use whispeer_protocol::frame::{msg_flags, pub_flags, Ack, Msg, Pub, Replay, Sub};
use whispeer_protocol::{Envelope, Frame, Qos, TokenPattern};

/// An envelope on `[key(k), tok(levels)…]` told apart by `n` (in its nonce).
fn numbered(k: u8, levels: &[u8], n: u32) -> Envelope {
    numbered_sized(k, levels, n, 32)
}

/// The `n` an envelope of [`numbered`] carries.
fn number(env: &Envelope) -> u32 {
    // Header prefix: version, suite, flags, key id (16), then the nonce.
    let nonce = &env.as_bytes()[3 + 16..];
    u32::from_be_bytes(nonce[..4].try_into().unwrap())
}

fn relay_args(urls: &str, name: &str) -> Vec<String> {
    [
        "--cluster",
        urls,
        "--cluster-name",
        name,
        "--cluster-store",
        "jetstream",
        "--cluster-replicas",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_relay(urls: &str, name: &str) -> BinRelay {
    let args = relay_args(urls, name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    BinRelay::start(&args)
}

/// NATS and `n` relays. `None` (test skipped) without nats-server.
struct Setup {
    relays: Vec<BinRelay>,
    nats: NatsCluster,
}

impl Setup {
    fn start(n: usize) -> Option<Self> {
        let Some(nats) = NatsCluster::start(3) else {
            eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
            return None;
        };
        let urls = nats.urls();
        let relays = (0..n)
            .map(|i| start_relay(&urls, &format!("relay-{i}")))
            .collect();
        Some(Self { relays, nats })
    }
}

async fn connect(addr: SocketAddr) -> (Client, [u8; 16]) {
    let mut c = Client::tcp(addr).await;
    let w = c.hello().await;
    (
        c,
        w.seq_space
            .expect("a JetStream relay names its sequence space"),
    )
}

fn sub(sub_id: u64, pattern: TokenPattern, qos: Qos) -> Sub {
    Sub {
        sub_id,
        pattern,
        qos,
        durable: None,
        replay: None,
        retained: false,
        credit: None,
        owner: None,
    }
}

async fn subscribe(c: &mut Client, s: Sub) -> u64 {
    let id = s.sub_id;
    c.send(&Frame::Sub(s)).await;
    loop {
        match c.recv().await {
            Frame::SubOk(ok) if ok.sub_id == id => return ok.seq,
            Frame::Msg(_) => {}
            other => panic!("expected SubOk, got {other:?}"),
        }
    }
}

fn pub_frame(env: Envelope, qos: Qos, id: u32, retain: bool) -> Frame {
    let mut publish_id = [0u8; 16];
    publish_id[..4].copy_from_slice(&id.to_be_bytes());
    publish_id[4] = 0xaa;
    Frame::Pub(Pub {
        envelope: env,
        flags: pub_flags::ACK | if retain { pub_flags::RETAIN } else { 0 },
        publish_id: Some(publish_id),
        qos,
    })
}

fn id_of(publish_id: &[u8; 16]) -> u32 {
    u32::from_be_bytes(publish_id[..4].try_into().unwrap())
}

/// Publishes and waits for each `PubAck`: the acknowledged sequence per number.
async fn publish_acked(
    c: &mut Client,
    envs: &[(u32, Envelope)],
    qos: Qos,
    retain: bool,
) -> Vec<u64> {
    for (n, e) in envs {
        c.send(&pub_frame(e.clone(), qos, *n, retain)).await;
    }
    let mut seqs = BTreeMap::new();
    while seqs.len() < envs.len() {
        match c.recv().await {
            Frame::PubAck(a) => {
                seqs.insert(id_of(&a.publish_id), a.seq);
            }
            Frame::Msg(_) => {}
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    envs.iter().map(|(n, _)| seqs[n]).collect()
}

/// Reads `Msg`s until one with sequence `>= upto`; returns them.
async fn read_until(c: &mut Client, upto: u64) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        match c.recv().await {
            Frame::Msg(m) => {
                let done = m.seq >= upto;
                out.push(m);
                if done {
                    return out;
                }
            }
            Frame::ReplayDone(_) | Frame::PubAck(_) => {}
            other => panic!("expected Msg, got {other:?}"),
        }
    }
}

/// Slice 1: a QoS 1 publisher at A; subscribers at A, B and C see the same messages with
/// the same sequences, which are the ones in A's `PubAck`s; every relay names one space.
#[tokio::test]
async fn stream_sequence_is_the_relay_sequence_on_every_relay() {
    let Some(s) = Setup::start(3) else { return };
    let mut subs = Vec::new();
    let mut spaces = HashSet::new();
    for r in &s.relays {
        let (mut c, space) = connect(r.tcp()).await;
        spaces.insert(space);
        subscribe(&mut c, sub(1, pattern(1, &[], true), Qos::AtLeastOnce)).await;
        subs.push(c);
    }
    let (mut publ, space) = connect(s.relays[0].tcp()).await;
    spaces.insert(space);
    assert_eq!(spaces.len(), 1, "every relay names the same sequence space");

    let envs: Vec<(u32, Envelope)> = (0..100)
        .map(|i| (i, numbered(1, &[1 + (i % 3) as u8], i)))
        .collect();
    let acked = publish_acked(&mut publ, &envs, Qos::AtLeastOnce, false).await;
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "PubAcks in sequence order: {acked:?}"
    );
    let last = *acked.last().unwrap();
    for (i, c) in subs.iter_mut().enumerate() {
        let got = read_until(c, last).await;
        let seen: Vec<(u64, u32)> = got.iter().map(|m| (m.seq, number(&m.envelope))).collect();
        let want: Vec<(u64, u32)> = acked
            .iter()
            .copied()
            .zip(envs.iter().map(|e| e.0))
            .collect();
        assert_eq!(
            seen, want,
            "relay {i}: the acknowledged sequences, in order"
        );
        c.send(&Frame::Ack(Ack {
            seqs: acked.clone(),
        }))
        .await;
    }
}

/// Slice 1: QoS 1 publishing at A while A is SIGKILLed; the publisher moves to B and
/// re-sends what has no `PubAck`; a subscriber of A resumes at C from its last sequence.
/// No acknowledged message is lost, and sequences go on increasing across relays.
#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let Some(mut s) = Setup::start(3) else { return };
    let total: u32 = 400;
    let (mut sub_a, space_a) = connect(s.relays[0].tcp()).await;
    subscribe(&mut sub_a, sub(1, pattern(2, &[], true), Qos::AtLeastOnce)).await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let envs: Vec<Envelope> = (0..total).map(|i| numbered(2, &[1], i)).collect();

    // Send everything at once; kill A once 100 are acknowledged (an event, not a delay).
    for (i, e) in envs.iter().enumerate() {
        publ.send(&pub_frame(e.clone(), Qos::AtLeastOnce, i as u32, false))
            .await;
    }
    let mut acked: BTreeMap<u32, u64> = BTreeMap::new();
    let mut seen_a: Vec<Msg> = Vec::new();
    while acked.len() < 100 {
        match publ.recv().await {
            Frame::PubAck(a) => {
                acked.insert(id_of(&a.publish_id), a.seq);
            }
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    s.relays[0].child.kill().unwrap(); // SIGKILL
    let _ = s.relays[0].child.wait();
    // Whatever else reached the publisher and the subscriber before the connection broke.
    while let Read::Frame(b) = publ.read().await {
        if let Frame::PubAck(a) = Frame::decode(&b).unwrap() {
            acked.insert(id_of(&a.publish_id), a.seq);
        }
    }
    while let Read::Frame(b) = sub_a.read().await {
        if let Frame::Msg(m) = Frame::decode(&b).unwrap() {
            seen_a.push(m);
        }
    }
    let acked_before = acked.len();

    // The publisher fails over to B and re-sends every publish it has no PubAck for.
    let (mut publ, space_b) = connect(s.relays[1].tcp()).await;
    assert_eq!(space_a, space_b, "one sequence space across the failover");
    let unacked: Vec<(u32, Envelope)> = (0..total)
        .filter(|i| !acked.contains_key(i))
        .map(|i| (i, envs[i as usize].clone()))
        .collect();
    let again = publish_acked(&mut publ, &unacked, Qos::AtLeastOnce, false).await;
    for ((n, _), seq) in unacked.iter().zip(again) {
        acked.insert(*n, seq);
    }
    assert_eq!(acked.len(), total as usize);
    let max_seq = *acked.values().max().unwrap();

    // The subscriber of A resumes at C from its last sequence.
    let last_a = seen_a.iter().map(|m| m.seq).max().unwrap_or(0);
    let (mut sub_c, _) = connect(s.relays[2].tcp()).await;
    let mut resume = sub(1, pattern(2, &[], true), Qos::AtLeastOnce);
    resume.replay = Some(Replay::FromSeq(last_a + 1));
    subscribe(&mut sub_c, resume).await;
    let rest = read_until(&mut sub_c, max_seq).await;
    let mut prev = 0;
    for m in seen_a.iter().chain(rest.iter()) {
        assert!(m.seq > prev, "sequences increase across the failover");
        prev = m.seq;
    }
    let got: HashSet<u32> = seen_a
        .iter()
        .chain(rest.iter())
        .map(|m| number(&m.envelope))
        .collect();
    let lost: Vec<u32> = acked.keys().filter(|n| !got.contains(n)).copied().collect();
    assert!(lost.is_empty(), "acknowledged messages lost: {lost:?}");
    eprintln!(
        "failover: {acked_before} acknowledged before the kill, {} re-sent, {} seen at A, {} \
         resumed at C",
        total as usize - acked_before,
        seen_a.len(),
        rest.len()
    );
}

/// Slice 2: history and retained values served by a relay that started after the publish.
#[tokio::test]
async fn replay_and_retained_from_a_relay_that_did_not_see_the_publish() {
    let Some(mut s) = Setup::start(1) else { return };
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let plain: Vec<(u32, Envelope)> = (0..20).map(|i| (i, numbered(3, &[1], i))).collect();
    let plain_seqs = publish_acked(&mut publ, &plain, Qos::AtLeastOnce, false).await;
    let kept: Vec<(u32, Envelope)> = vec![
        (100, numbered(3, &[2], 100)),
        (101, numbered(3, &[3], 101)),
        (102, numbered(3, &[2], 102)),
    ];
    let kept_seqs = publish_acked(&mut publ, &kept, Qos::AtLeastOnce, true).await;

    let late = start_relay(&s.nats.urls(), "late");
    s.relays.push(late);
    let (mut c, _) = connect(s.relays[1].tcp()).await;
    let mut r = sub(1, pattern(3, &[], true), Qos::AtMostOnce);
    r.retained = true;
    let boundary = subscribe(&mut c, r).await;
    assert!(
        boundary >= kept_seqs[2],
        "the late relay knows the stream's last sequence"
    );
    // Retained: the last value of paths 2 and 3, with their own sequences, in order.
    let m1 = c.expect_msg().await;
    let m2 = c.expect_msg().await;
    assert_eq!(
        [
            (m1.seq, number(&m1.envelope)),
            (m2.seq, number(&m2.envelope))
        ],
        [(kept_seqs[1], 101), (kept_seqs[2], 102)]
    );
    assert!(m1.flags & msg_flags::RETAINED != 0);

    let mut r = sub(2, pattern(3, &[Some(1)], false), Qos::AtLeastOnce);
    r.replay = Some(Replay::FromSeq(1));
    subscribe(&mut c, r).await;
    let got = read_until(&mut c, *plain_seqs.last().unwrap()).await;
    let got: Vec<(u64, u32)> = got.iter().map(|m| (m.seq, number(&m.envelope))).collect();
    let want: Vec<(u64, u32)> = plain_seqs.iter().copied().zip(0..20).collect();
    assert_eq!(got, want, "the history, with the original sequences");
}

/// Slice 3: a durable subscription resumes on another relay after its relay dies, from the
/// position it acknowledged.
#[tokio::test]
async fn durable_resumes_on_another_relay_after_its_relay_dies() {
    let Some(mut s) = Setup::start(2) else { return };
    // Watch the durable stream: the acknowledged floor reaching it is the event to wait on.
    let nc = async_nats::connect(s.nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let floors = js.get_stream("WSP_DURABLE").await.unwrap();
    let mut watch = floors
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();

    let (mut c, _) = connect(s.relays[0].tcp()).await;
    let mut d = sub(1, pattern(4, &[], true), Qos::AtLeastOnce);
    d.durable = Some("d1".into());
    d.owner = Some(Bytes::from(vec![9u8; 16]));
    subscribe(&mut c, d.clone()).await;
    let (mut publ, _) = connect(s.relays[1].tcp()).await;
    let envs: Vec<(u32, Envelope)> = (0..10).map(|i| (i, numbered(4, &[1], i))).collect();
    let seqs = publish_acked(&mut publ, &envs, Qos::AtLeastOnce, false).await;
    let got = read_until(&mut c, seqs[9]).await;
    assert_eq!(got.len(), 10);
    c.send(&Frame::Ack(Ack {
        seqs: seqs[..5].to_vec(),
    }))
    .await;
    let floor = seqs[4].to_string();
    loop {
        let e = watch.next().await.expect("durable stream").unwrap();
        if e.payload == floor.as_bytes() {
            break;
        }
    }
    s.relays[0].child.kill().unwrap();
    let _ = s.relays[0].child.wait();

    let (mut c, _) = connect(s.relays[1].tcp()).await;
    d.replay = Some(Replay::FromSeq(1)); // ignored: the durable resumes from its floor
    subscribe(&mut c, d).await;
    let got = read_until(&mut c, seqs[9]).await;
    let got: Vec<(u64, u32)> = got.iter().map(|m| (m.seq, number(&m.envelope))).collect();
    let want: Vec<(u64, u32)> = seqs[5..].iter().copied().zip(5..10).collect();
    assert_eq!(got, want, "the unacknowledged rest, from the floor");
}

/// Slice 4: QoS 2 dedup across relays through `Nats-Msg-Id`: a re-send at another relay
/// gets the original sequence and is delivered once.
#[tokio::test]
async fn qos2_resend_at_another_relay_is_deduplicated() {
    let Some(s) = Setup::start(2) else { return };
    let (mut watcher, _) = connect(s.relays[1].tcp()).await;
    subscribe(&mut watcher, sub(1, pattern(5, &[], true), Qos::AtMostOnce)).await;
    let env = numbered(5, &[1], 1);
    let (mut a, _) = connect(s.relays[0].tcp()).await;
    let first = publish_acked(&mut a, &[(1, env.clone())], Qos::ExactlyOnce, false).await;
    let (mut b, _) = connect(s.relays[1].tcp()).await;
    let again = publish_acked(&mut b, &[(1, env.clone())], Qos::ExactlyOnce, false).await;
    assert_eq!(
        first, again,
        "the duplicate is answered with the original sequence"
    );
    let marker = numbered(5, &[1], 2);
    let m = publish_acked(&mut b, &[(2, marker)], Qos::ExactlyOnce, false).await;
    let got = read_until(&mut watcher, m[0]).await;
    let got: Vec<u32> = got.iter().map(|m| number(&m.envelope)).collect();
    assert_eq!(got, vec![1, 2], "delivered once, then the marker");
}

/// JetStream unreachable: a publish that needs the store gets the retryable
/// `Err(store_failed)` naming it, and live-only QoS 0 routing goes on (unnumbered).
#[tokio::test]
async fn without_jetstream_stored_publishes_fail_and_live_routing_goes_on() {
    let Some(mut s) = Setup::start(1) else { return };
    let (mut sub_c, _) = connect(s.relays[0].tcp()).await;
    subscribe(&mut sub_c, sub(1, pattern(6, &[], true), Qos::AtLeastOnce)).await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let stored = publish_acked(
        &mut publ,
        &[(1, numbered(6, &[1], 1))],
        Qos::AtLeastOnce,
        false,
    )
    .await;
    let m = sub_c.expect_msg().await;
    assert_eq!((m.seq, number(&m.envelope)), (stored[0], 1));

    for n in &mut s.nats.nodes {
        n.kill();
    }
    publ.send(&pub_frame(numbered(6, &[1], 2), Qos::AtLeastOnce, 2, false))
        .await;
    let e = publ.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::StoreFailed, "{e:?}");
    assert!(!e.fatal);
    assert_eq!(e.publish_id.map(|p| id_of(&p)), Some(2));

    // QoS 0 the store does not keep: routed at once, unnumbered, to the QoS 1 subscriber.
    publ.send(&Frame::Pub(Pub {
        envelope: numbered(6, &[1], 3),
        flags: 0,
        publish_id: None,
        qos: Qos::AtMostOnce,
    }))
    .await;
    let m = sub_c.expect_msg().await;
    assert_eq!(
        (m.seq, number(&m.envelope)),
        (0, 3),
        "live-only, sequence 0"
    );
}
