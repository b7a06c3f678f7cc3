//! Relays whose store is the cluster's JetStream stream (`--cluster-store jetstream`): a
//! real three-node nats-server cluster (JetStream, R3) and real `whispeer-relay` processes.
//! One numbering for the whole cluster: the same sequences on every relay, `PubAck` only
//! once JetStream has the message, history, retained values and durables served by any
//! relay. Every wait is on an event (a frame, a log line, a bucket update), none on time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use bytes::Bytes;
use common::nats::{jetstream_relay_args, numbered_sized, stream_consumers, NatsCluster};
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

fn start_relay(urls: &str, name: &str) -> BinRelay {
    let args = jetstream_relay_args(urls, name);
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

/// The durable-hold stream (`WSP_LEASES`) read in order from now on: holds taken,
/// renewed and released (an empty record), as the relays write them.
async fn lease_watch(nats: &NatsCluster) -> async_nats::jetstream::consumer::pull::Ordered {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let leases = js.get_stream("WSP_LEASES").await.unwrap();
    leases
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap()
}

/// Waits until a relay writes a released (empty) hold record.
async fn wait_released(watch: &mut async_nats::jetstream::consumer::pull::Ordered) {
    loop {
        let m = watch.next().await.expect("lease stream").unwrap();
        if m.payload.is_empty() {
            return;
        }
    }
}

/// The newest hold record of the cluster (one durable held in the test): its NATS
/// timestamp (Unix ms) and the TTL it names (ms). Barrier records (`….barrier.<relay>`,
/// written after a take on a nats-server before 2.9.21) are not holds.
async fn newest_hold(nats: &NatsCluster) -> (i128, u64) {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let leases = js.get_stream("WSP_LEASES").await.unwrap();
    let mut all = leases
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut newest = None;
    loop {
        let m = all.next().await.expect("a hold record").unwrap();
        let info = m.info().unwrap();
        if !m.subject.contains(".barrier.") {
            let stamped = info.published.unix_timestamp_nanos() / 1_000_000;
            newest = Some((stamped, String::from_utf8(m.payload.to_vec()).unwrap()));
        }
        if info.pending == 0 {
            break;
        }
    }
    let (stamped, text) = newest.expect("a hold record");
    let ttl = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a live hold record, got {text:?}"));
    (stamped, ttl)
}

fn wall_ms() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i128
}

/// Sends `d` until the relay answers `SubOk`; every refusal must be the cluster hold of
/// another relay, and the wait before the next try is the rest of that hold as the
/// refusal names it. Returns the refusals seen.
async fn subscribe_when_the_hold_lapses(c: &mut Client, d: Sub) -> u32 {
    let mut refused = 0;
    loop {
        c.send(&Frame::Sub(d.clone())).await;
        match c.recv().await {
            Frame::SubOk(ok) if ok.sub_id == d.sub_id => return refused,
            Frame::Err(e) => {
                assert_eq!(e.code, whispeer_protocol::ErrorCode::Busy, "{e:?}");
                assert!(e.message.contains("at another relay"), "{e:?}");
                refused += 1;
                let left: u64 = e
                    .message
                    .split("within ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("the refusal names the hold's rest: {e:?}"));
                tokio::time::sleep(std::time::Duration::from_millis(left)).await;
            }
            other => panic!("expected SubOk or Err, got {other:?}"),
        }
    }
}

/// Slice 3: a durable subscription resumes on another relay after its relay dies, from the
/// position it acknowledged — once the dead relay's hold on the name has lapsed (its TTL,
/// short here, after its last renewal), and not before.
#[tokio::test]
async fn durable_resumes_on_another_relay_after_its_relay_dies() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let urls = nats.urls();
    let ttl = ["--cluster-durable-lease-ms", "1500"];
    let mut a = start_relay_with(&urls, "relay-0", &ttl);
    let b = start_relay_with(&urls, "relay-1", &ttl);
    // Watch the durable stream: the acknowledged floor reaching it is the event to wait on.
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let floors = js.get_stream("WSP_DURABLE").await.unwrap();
    let mut watch = floors
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();

    let (mut c, _) = connect(a.tcp()).await;
    let mut d = sub(1, pattern(4, &[], true), Qos::AtLeastOnce);
    d.durable = Some("d1".into());
    d.owner = Some(Bytes::from(vec![9u8; 16]));
    subscribe(&mut c, d.clone()).await;
    let (mut publ, _) = connect(b.tcp()).await;
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
    a.child.kill().unwrap();
    let _ = a.child.wait();
    // The dead relay's last renewal: nobody may take the name before it lapses.
    let (stamped, hold_ttl) = newest_hold(&nats).await;
    assert_eq!(hold_ttl, 1500, "the holder's TTL is in its record");

    let (mut c, _) = connect(b.tcp()).await;
    d.replay = Some(Replay::FromSeq(1)); // ignored: the durable resumes from its floor
    let refused = subscribe_when_the_hold_lapses(&mut c, d).await;
    let at = wall_ms();
    assert!(
        at >= stamped + i128::from(hold_ttl),
        "taken {} ms before the dead relay's hold lapsed ({refused} refusals)",
        stamped + i128::from(hold_ttl) - at
    );
    let got = read_until(&mut c, seqs[9]).await;
    let got: Vec<(u64, u32)> = got.iter().map(|m| (m.seq, number(&m.envelope))).collect();
    let want: Vec<(u64, u32)> = seqs[5..].iter().copied().zip(5..10).collect();
    assert_eq!(got, want, "the unacknowledged rest, from the floor");
}

/// One holder per durable name in the whole cluster: while a connection at relay A holds
/// it, a `Sub` for it at relay B gets the non-fatal, retryable `Err(busy)` one relay gives a
/// second connection; once A's holder unsubscribes (or its connection ends) B's `Sub`
/// succeeds — and then holds it against A in turn.
#[tokio::test]
async fn a_durable_held_at_one_relay_is_refused_at_another_until_released() {
    let Some(s) = Setup::start(2) else { return };
    let mut leases = lease_watch(&s.nats).await;
    let (mut a, _) = connect(s.relays[0].tcp()).await;
    let mut d = sub(1, pattern(14, &[], true), Qos::AtLeastOnce);
    d.durable = Some("one".into());
    d.owner = Some(Bytes::from(vec![7u8; 16]));
    subscribe(&mut a, d.clone()).await;

    let (mut b, _) = connect(s.relays[1].tcp()).await;
    b.send(&Frame::Sub(d.clone())).await;
    let e = b.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::Busy, "{e:?}");
    assert!(!e.fatal, "{e:?}");
    assert_eq!(e.sub_id, Some(1));
    assert!(e.message.contains("active at another relay"), "{e:?}");

    // The holder at A unsubscribes: A releases the hold, then B may take it.
    a.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
        sub_id: 1,
        delete: None,
    }))
    .await;
    wait_released(&mut leases).await;
    subscribe(&mut b, d.clone()).await;

    // Now A is the other relay; B's connection ends, and A may take it back.
    a.send(&Frame::Sub(d.clone())).await;
    let e = a.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::Busy, "{e:?}");
    assert!(e.message.contains("active at another relay"), "{e:?}");
    drop(b);
    wait_released(&mut leases).await;
    subscribe(&mut a, d).await;
}

/// A relay frozen (SIGSTOP) past its hold's TTL lost it: another relay takes the name, and
/// when the frozen relay runs again it ends its own holder's subscription with a non-fatal
/// `Err(busy)` naming it, instead of delivering beside the new holder.
#[tokio::test]
async fn a_frozen_holder_ends_its_subscription_when_it_wakes_after_losing_the_hold() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let urls = nats.urls();
    let ttl = ["--cluster-durable-lease-ms", "1000"];
    let a = start_relay_with(&urls, "relay-0", &ttl);
    let b = start_relay_with(&urls, "relay-1", &ttl);
    let (mut old, _) = connect(a.tcp()).await;
    let mut d = sub(3, pattern(15, &[], true), Qos::AtLeastOnce);
    d.durable = Some("frozen".into());
    subscribe(&mut old, d.clone()).await;

    a.signal("STOP");
    let (mut new, _) = connect(b.tcp()).await;
    subscribe_when_the_hold_lapses(&mut new, d).await;
    a.signal("CONT");
    let e = loop {
        match old.recv().await {
            Frame::Err(e) => break e,
            Frame::Msg(_) | Frame::Ping(_) => {}
            other => panic!("expected Err, got {other:?}"),
        }
    };
    assert_eq!(e.code, whispeer_protocol::ErrorCode::Busy, "{e:?}");
    assert!(!e.fatal, "{e:?}");
    assert_eq!(e.sub_id, Some(3));
    assert!(e.message.contains("could not keep its hold"), "{e:?}");
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
///
/// The nodes are killed one after another, so the relay may reconnect to a node not yet
/// killed in between: a relay that reconnects tells its subscribers in a `Gap` (it cannot
/// know what other relays published while it was away, review finding F5). A `Gap` before
/// the live-only message is taken only when the relay did reconnect.
#[tokio::test]
async fn without_jetstream_stored_publishes_fail_and_live_routing_goes_on() {
    let Some(mut s) = Setup::start(1) else { return };
    let admin = s.relays[0].admin();
    let (mut sub_c, _) = connect(s.relays[0].tcp()).await;
    subscribe(&mut sub_c, sub(1, pattern(6, &[], true), Qos::AtLeastOnce)).await;
    // The first connection counted (its event may come after the relay is ready).
    wait_metric(admin, "whispeer_relay_cluster_connects_total", 1).await;
    let connects = metric(admin, "whispeer_relay_cluster_connects_total").await;
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
    let m = loop {
        match sub_c.recv().await {
            Frame::Msg(m) => break m,
            Frame::Gap(g) => {
                assert_eq!(g.dropped, 1, "a reconnection is reported as one loss");
                // Honest only after a reconnection (the metric may trail the client's own
                // count, which the interest keeper also reads: waited for).
                wait_metric(admin, "whispeer_relay_cluster_connects_total", connects + 1).await;
            }
            other => panic!("expected Msg, got {other:?}"),
        }
    };
    assert_eq!(
        (m.seq, number(&m.envelope)),
        (0, 3),
        "live-only, sequence 0"
    );
}

/// NATS, a JetStream relay with a 256 KiB outbound queue, a QoS 1 subscriber of key id `k`
/// with a 4 KiB receive buffer that reads nothing yet, and a publisher. `None` (test
/// skipped) without nats-server.
async fn stalled_qos1_subscriber(k: u8) -> Option<(NatsCluster, BinRelay, Client, Client)> {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return None;
    };
    let a = start_relay_with(&nats.urls(), "relay-a", &["--queue-max-bytes", "262144"]);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = Client::over_stream(Box::new(sock.connect(a.tcp()).await.unwrap()));
    s.hello().await;
    subscribe(&mut s, sub(1, pattern(k, &[], true), Qos::AtLeastOnce)).await;
    let (p, _) = connect(a.tcp()).await;
    Some((nats, a, s, p))
}

/// Live-only QoS 0 messages (unnumbered: the JetStream store does not keep them) to a QoS 1
/// subscriber that does not read are bounded by its outbound queue like any QoS 0 delivery
/// (policy `drop`, counted in a `Gap`): nothing tracks them, so nothing else would bound
/// them. A QoS 1 message after them still arrives.
#[tokio::test]
async fn unnumbered_messages_to_a_stalled_qos1_subscriber_are_bounded_by_its_queue() {
    // 10 MB: more than the socket buffers take (up to 4 MiB send buffer on Linux).
    const N: u32 = 2_500;
    let Some((_nats, a, mut s, mut p)) = stalled_qos1_subscriber(10).await else {
        return;
    };
    for n in 1..=N {
        p.send(&Frame::Pub(Pub {
            envelope: numbered_sized(10, &[1], n, 4096),
            flags: 0,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
        .await;
    }
    // Acknowledged after the QoS 0 publishes before it were routed.
    let last = publish_acked(
        &mut p,
        &[(0, numbered(10, &[1], 0))],
        Qos::AtLeastOnce,
        false,
    )
    .await;
    let queued = metric(a.admin(), "whispeer_relay_outbound_bytes").await;
    assert!(
        queued <= 2 * 262_144,
        "{queued} bytes queued for a stalled subscriber with a 256 KiB queue"
    );
    let (mut live, mut dropped) = (0, 0);
    loop {
        match s.recv().await {
            Frame::Msg(m) if m.seq == last[0] => break,
            Frame::Msg(m) => {
                assert_eq!(m.seq, 0, "live-only");
                live += 1;
            }
            Frame::Gap(g) => dropped += g.dropped,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(dropped > 0, "{live} of {N} delivered and none dropped");
    assert_eq!(
        live + dropped,
        u64::from(N),
        "each one delivered or counted"
    );
}

/// A QoS 1 subscriber that falls behind its outbound queue on a JetStream relay pauses
/// (nothing is dropped from the queue) and catches up from the stream: 10 MB published to
/// it while it reads nothing, then every message arrives in order, once, without a `Gap`.
#[tokio::test]
async fn a_stalled_qos1_subscriber_catches_up_from_the_stream_without_a_gap() {
    const N: u32 = 2_500;
    let Some((_nats, a, mut s, mut p)) = stalled_qos1_subscriber(11).await else {
        return;
    };
    let envs: Vec<_> = (1..=N)
        .map(|n| (n, numbered_sized(11, &[1], n, 4096)))
        .collect();
    let seqs = publish_acked(&mut p, &envs, Qos::AtLeastOnce, false).await;
    // Acknowledged once stored; routed to the subscriber meanwhile or just after (a loaded
    // machine saw the counter still at 0 here once): its queue fills, as it reads nothing.
    wait_metric(a.admin(), "whispeer_relay_outbound_full_pauses_total", 1).await;
    let mut got = Vec::new();
    while got.len() < N as usize {
        match s.recv().await {
            Frame::Msg(m) => {
                s.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
                got.push((m.seq, number(&m.envelope)));
            }
            other => panic!("after {} messages: unexpected {other:?}", got.len()),
        }
    }
    let want: Vec<_> = seqs.iter().copied().zip(1..=N).collect();
    assert_eq!(got, want, "every message in order, once");
}

/// NATS and a JetStream relay whose publish queue holds `queue_bytes` of envelopes
/// (`--store-queue-bytes`) while JetStream does not answer. `None` (test skipped) without
/// nats-server.
fn publish_queue_relay(queue_bytes: &str) -> Option<(NatsCluster, BinRelay)> {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return None;
    };
    let a = start_relay_with(
        &nats.urls(),
        "relay-a",
        &["--store-queue-bytes", queue_bytes],
    );
    Some((nats, a))
}

/// One stored publish of key id `k` from `c`, then every nats-server frozen (SIGSTOP): the
/// stream is up and the relay's publisher is warm before JetStream stops answering.
async fn warm_then_freeze(nats: &NatsCluster, clients: &mut [&mut Client], k: &[u8]) {
    for (c, &k) in clients.iter_mut().zip(k) {
        publish_acked(c, &[(0, numbered(k, &[1], 0))], Qos::AtLeastOnce, false).await;
    }
    for n in &nats.nodes {
        n.signal("STOP");
    }
}

/// Sends `c` an 8 KiB QoS 1 publish of key id `k` with publish id `n`, then a ping: whether
/// it was answered the retryable `busy` (for `n`) before the pong. Nothing else may come:
/// nothing is acknowledged while NATS is frozen.
async fn busy_or_queued(c: &mut Client, k: u8, n: u32) -> bool {
    c.send(&pub_frame(
        numbered_sized(k, &[1], n, 8 << 10),
        Qos::AtLeastOnce,
        n,
        false,
    ))
    .await;
    c.send(&Frame::Ping(whispeer_protocol::frame::Ping {
        nonce: n.into(),
    }))
    .await;
    let mut busy = false;
    loop {
        match c.recv().await {
            Frame::Pong(g) if g.nonce == u64::from(n) => return busy,
            Frame::Err(e) => {
                assert_eq!(e.code, whispeer_protocol::ErrorCode::Busy, "{e:?}");
                assert!(!e.fatal && e.code.is_retryable(), "{e:?}");
                assert_eq!(e.publish_id.map(|p| id_of(&p)), Some(n));
                busy = true;
            }
            other => panic!("nothing is acknowledged while NATS is frozen: {other:?}"),
        }
    }
}

/// 8 KiB QoS 1 publishes of key id `k` from `c`, publish ids 1, 2, …, until one is `busy`:
/// the ids queued before it.
async fn fill_until_busy(c: &mut Client, k: u8) -> Vec<u32> {
    let mut queued = Vec::new();
    for n in 1u32.. {
        if busy_or_queued(c, k, n).await {
            break;
        }
        queued.push(n);
    }
    queued
}

/// Every nats-server running again (SIGCONT).
fn thaw(nats: &NatsCluster) {
    for n in &nats.nodes {
        n.signal("CONT");
    }
}

/// Reads `c`'s acknowledgements (pings aside) until there are as many as `queued`: each
/// once, and exactly the publish ids of `queued`.
async fn expect_all_acked(c: &mut Client, queued: Vec<u32>) {
    let mut acked = HashSet::new();
    while acked.len() < queued.len() {
        match c.recv().await {
            Frame::PubAck(a) => assert!(acked.insert(id_of(&a.publish_id))),
            Frame::Ping(_) => {}
            other => panic!("expected PubAck, got {other:?}"),
        }
    }
    assert_eq!(acked, queued.into_iter().collect());
}

/// While JetStream does not answer, what waits for it is held in the relay's memory: the
/// publish queue is bounded in envelope bytes (`--store-queue-bytes`), not only by its
/// 65,536 jobs. With every NATS node frozen, 8 KiB QoS 1 publishes fill a 64 KiB bound
/// after exactly 64 KiB / size of them, then get the retryable `Err(busy)`; when NATS wakes
/// every queued one is acknowledged.
#[tokio::test]
async fn the_jetstream_publish_queue_is_bounded_in_bytes_while_nats_is_frozen() {
    let Some((nats, a)) = publish_queue_relay("65536") else {
        return;
    };
    let (mut p, _) = connect(a.tcp()).await;
    warm_then_freeze(&nats, &mut [&mut p], &[9]).await;
    let each = numbered_sized(9, &[1], 1, 8 << 10).as_bytes().len();
    let queued = fill_until_busy(&mut p, 9).await;
    assert_eq!(queued.len(), (64 << 10) / each, "{each}-byte envelopes");
    thaw(&nats);
    expect_all_acked(&mut p, queued).await;
}

/// The JetStream publish queue is shared fairly among tenants (review finding F3), as the
/// SQLite store's write queue is: with every nats-server frozen (SIGSTOP) one tenant
/// (127.0.0.1) fills `store.queue_bytes` (1 MiB) with QoS 1 publishes until it gets
/// `busy`; another tenant's (127.0.0.2) QoS 1 publish is still queued — it holds nothing,
/// under its share — and acknowledged once NATS runs again, while the first tenant, over
/// its share, is still refused. Before, the one shared bound answered it `busy` too.
#[tokio::test]
async fn a_tenant_filling_the_jetstream_publish_queue_leaves_room_for_another_tenant() {
    let Some((nats, a)) = publish_queue_relay("1048576") else {
        return;
    };
    let mut hog = Client::tcp_from(a.tcp(), "127.0.0.1").await;
    hog.hello().await;
    let mut honest = Client::tcp_from(a.tcp(), "127.0.0.2").await;
    honest.hello().await;
    warm_then_freeze(&nats, &mut [&mut hog, &mut honest], &[9, 8]).await;
    let queued = fill_until_busy(&mut hog, 9).await;
    eprintln!("the first tenant queued {} x 8 KiB", queued.len());
    assert!(
        !busy_or_queued(&mut honest, 8, 1).await,
        "the other tenant's publish is queued, not refused"
    );
    // The first tenant is still over its share.
    let over = queued.len() as u32 + 1_000;
    assert!(
        busy_or_queued(&mut hog, 9, over).await,
        "the first tenant is refused"
    );
    thaw(&nats);
    match honest.recv().await {
        Frame::PubAck(a) => assert_eq!(id_of(&a.publish_id), 1),
        other => panic!("expected the other tenant's PubAck, got {other:?}"),
    }
    expect_all_acked(&mut hog, queued).await;
}

/// Retained writes (two JetStream round trips each) no longer hold up other tenants'
/// acknowledgements (review finding F3): driven at the store with its retained writes held
/// (`hold_retained_writes`, a write slow to reach NATS), a tenant's 200 QoS 1 + `RETAIN`
/// publishes wait, while another tenant's plain publish made after them is acknowledged.
/// A tenant's own answers keep their order: its plain publish after its own retained one
/// waits for it (a third tenant's answer, made after both, is the event that the stream
/// acknowledged them), and follows it once the writes go on. Three values of one path
/// written while held leave the newest in the retained stream. Before, the writes ran one
/// by one in the ordered acknowledgement path: the other tenant's answer waited behind
/// all 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_writes_do_not_hold_up_other_tenants_acknowledgements() {
    use whispeer_relay::store::{Accepted, Append, Store, StoreError, Tenant};
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let store = open_store(&nats.urls(), "relay-a").await;
    store.hold_retained_writes(true);
    type Answered = (&'static str, u32, Result<Accepted, StoreError>);
    async fn next(answers: &mut tokio::sync::mpsc::UnboundedReceiver<Answered>) -> Answered {
        tokio::time::timeout(TIMEOUT, answers.recv())
            .await
            .expect("an answer in time")
            .expect("answers")
    }
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel::<Answered>();
    let publish = |who: &'static str, env: Envelope, n: u32, retain: bool| {
        let tenant = Tenant::Address(
            match who {
                "flood" => "10.0.0.1",
                "honest" => "10.0.0.2",
                _ => "10.0.0.3",
            }
            .parse()
            .unwrap(),
        );
        let path = env.token_path();
        let accepted = store
            .append(Append {
                path: &path,
                envelope: &env,
                flags: if retain { pub_flags::RETAIN } else { 0 },
                qos: Qos::AtLeastOnce,
                publish_id: None,
                tenant: &tenant,
            })
            .expect("queued");
        let Accepted::Pending(ticket) = accepted else {
            panic!("a stored publish waits for the stream: {accepted:?}");
        };
        let tx = tx.clone();
        store.when_sequenced(ticket, Box::new(move |r| drop(tx.send((who, n, r)))));
    };
    for n in 0..200 {
        publish("flood", numbered(51, &[n as u8], n), n, true);
    }
    // Three values of one path, written as one once the writes go on.
    for n in 200..203 {
        publish("flood", numbered(51, &[250], n), n, true);
    }
    publish("honest", numbered(52, &[1], 1), 1, false);
    let (who, n, r) = next(&mut answers).await;
    assert_eq!(
        (who, n),
        ("honest", 1),
        "the other tenant is answered first"
    );
    assert!(matches!(r, Ok(Accepted::New(_))), "{r:?}");
    // The honest tenant's own retained publish, then a plain one: in order.
    publish("honest", numbered(52, &[2], 2), 2, true);
    publish("honest", numbered(52, &[3], 3), 3, false);
    publish("third", numbered(53, &[1], 1), 1, false);
    let (who, n, r) = next(&mut answers).await;
    assert_eq!(
        (who, n),
        ("third", 1),
        "the plain publish waits behind its tenant's retained one"
    );
    assert!(matches!(r, Ok(Accepted::New(_))), "{r:?}");
    assert!(answers.is_empty(), "nothing else answered while held");
    store.hold_retained_writes(false);
    let mut flood = HashSet::new();
    let mut honest = Vec::new();
    let mut newest = 0;
    while flood.len() < 203 || honest.len() < 2 {
        let (who, n, r) = next(&mut answers).await;
        let Ok(Accepted::New(seq)) = r else {
            panic!("{who} {n}: {r:?}");
        };
        match who {
            "flood" => assert!(flood.insert(n)),
            "honest" => honest.push(n),
            other => panic!("unexpected {other} {n}"),
        }
        if (who, n) == ("flood", 202) {
            newest = seq.0;
        }
    }
    assert_eq!(honest, [2, 3], "the tenant's answers in order");
    let js = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await.unwrap());
    let rs = js.get_stream("WSP_RETAINED").await.unwrap();
    let subject = format!("wsp_retained.{}.{}", key(51), tok(250));
    let m = rs.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(
        m.headers.get("Wsp-Seq").map(|v| v.as_str().to_string()),
        Some(newest.to_string()),
        "the newest of the path's three values"
    );
}

fn start_relay_with(urls: &str, name: &str, extra: &[&str]) -> BinRelay {
    let mut args = jetstream_relay_args(urls, name);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    BinRelay::start(&args)
}

/// [`start_relay_with`], logging the JetStream store at debug level (its "durable record
/// read" lines are the events tests wait for) with the log readable by `wait_log`.
fn start_logged_relay_with(urls: &str, name: &str, extra: &[&str]) -> BinRelay {
    let mut args = jetstream_relay_args(urls, name);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--log", "warn,whispeer_relay::store::jetstream=debug"].map(String::from));
    BinRelay::start_logged(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Per-tenant quotas with the JetStream store: usage is counted by every relay from the
/// ordered read of the stream (header `Wsp-Tenant`), so a tenant at its quota through
/// relay A is refused at relay B — and at a relay started afterwards, which reads the
/// usage back from the stream — with the same `Err(quota_exceeded)` and metric as SQLite.
#[tokio::test]
async fn tenant_quota_counts_the_whole_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let quota = ["--tenant-max-messages", "5"];
    let a = start_relay_with(&urls, "relay-a", &quota);
    let b = start_relay_with(&urls, "relay-b", &quota);
    // B reading the five messages is the event that its ledger has counted them (a
    // message is applied to the ledger before it is routed).
    let (mut watch, _) = connect(b.tcp()).await;
    subscribe(&mut watch, sub(1, pattern(7, &[], true), Qos::AtMostOnce)).await;
    let (mut pa, _) = connect(a.tcp()).await;
    // Pipelined: the ordered read may apply a write before its stream ack comes back; it
    // must count once, or the fifth is refused one early (ledger `Wsp-Write` ids).
    let envs: Vec<(u32, Envelope)> = (0..5).map(|i| (i, numbered(7, &[1], i))).collect();
    let seqs = publish_acked(&mut pa, &envs, Qos::AtLeastOnce, false).await;
    read_until(&mut watch, seqs[4]).await;

    let (mut pb, _) = connect(b.tcp()).await;
    pb.send(&pub_frame(numbered(7, &[2], 5), Qos::AtLeastOnce, 5, false))
        .await;
    let e = pb.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");
    assert!(!e.fatal);
    assert_eq!(e.publish_id.map(|p| id_of(&p)), Some(5));
    assert!(e.message.contains("stored messages quota (5)"), "{e:?}");
    assert_eq!(
        metric(
            b.admin(),
            "whispeer_relay_store_quota_tenant_rejections_total"
        )
        .await,
        1
    );
    // A at its own quota too (its in-flight and read-back counts agree).
    pa.send(&pub_frame(numbered(7, &[1], 6), Qos::AtLeastOnce, 6, false))
        .await;
    assert_eq!(
        pa.expect_err().await.code,
        whispeer_protocol::ErrorCode::QuotaExceeded
    );

    // A relay started now reads the usage back from the stream.
    let c = start_relay_with(&urls, "relay-c", &quota);
    let (mut pc, _) = connect(c.tcp()).await;
    pc.send(&pub_frame(numbered(7, &[3], 7), Qos::AtLeastOnce, 7, false))
        .await;
    assert_eq!(
        pc.expect_err().await.code,
        whispeer_protocol::ErrorCode::QuotaExceeded
    );
}

/// Publishes live-only QoS 0 probes on `[key(k), 9]` from `publ` until `watch` gets one:
/// the event that `watch`'s relay's NATS interest reached the publisher's NATS server.
/// The probes `watch` reads later are told apart by their number (`u32::MAX`).
async fn sync_live_interest(publ: &mut Client, watch: &mut Client, k: u8) {
    let probe = numbered(k, &[9], u32::MAX);
    loop {
        publ.send(&Frame::Pub(Pub {
            envelope: probe.clone(),
            flags: 0,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
        .await;
        // Pacing of the probes, not a wait for a result: the wait is on the probe.
        if let Ok(m) =
            tokio::time::timeout(std::time::Duration::from_millis(50), watch.expect_msg()).await
        {
            assert_eq!(number(&m.envelope), u32::MAX);
            return;
        }
    }
}

/// A relay stopped gracefully forwards what it accepted: live-only QoS 0 envelopes still
/// in its queue to NATS when SIGTERM arrives (NATS is frozen meanwhile, so the queue is
/// full of them) are published once NATS answers again, within the drain deadline, and
/// reach the other relay's subscriber.
#[tokio::test]
async fn graceful_shutdown_drains_the_forward_queue() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    // Both relays on one server: the burst goes from A to B without a route between NATS
    // servers, whose at-most-once forwarding after every node was SIGSTOPped is NATS's
    // business, not the drain's (the JetStream stream stays R3 on all three).
    let urls = nats.nodes[0].url();
    // B queues the whole burst for its subscriber if this test's reader is starved (a
    // loaded machine): the test is about A's drain, not B's slow-consumer policy.
    let b = start_relay_with(
        &urls,
        "relay-b",
        &[
            "--queue-capacity",
            "65536",
            "--queue-max-bytes",
            "134217728",
        ],
    );
    let mut args = jetstream_relay_args(&urls, "relay-a");
    args.extend(["--log".to_string(), "info".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = BinRelay::start_logged(&args);
    let (mut watch, _) = connect(b.tcp()).await;
    subscribe(&mut watch, sub(1, pattern(8, &[], true), Qos::AtMostOnce)).await;
    let (mut publ, _) = connect(a.tcp()).await;
    sync_live_interest(&mut publ, &mut watch, 8).await;

    // More than the NATS client's own command buffer (2,048) holds: the rest waits in the
    // relay's forward queue. B's subscriber reads as they come (B's queue for it stays
    // short).
    let total = 20000u32;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < total as usize {
            // A stall ends the read with what came (the assertion below says how much and
            // why, from B's counters and the NATS server's log).
            let Ok(read) = tokio::time::timeout(TIMEOUT / 2, watch.read()).await else {
                break;
            };
            let Read::Frame(b) = read else {
                panic!("after {} messages: {read:?}", got.len());
            };
            let f = Frame::decode(&b).expect("decodable");
            let Frame::Msg(m) = f else {
                panic!("after {} messages: expected Msg, got {f:?}", got.len());
            };
            let n = number(&m.envelope);
            if n != u32::MAX {
                assert_eq!(m.seq, 0, "live-only");
                got.push(n);
            }
        }
        got
    });
    for n in &nats.nodes {
        n.signal("STOP");
    }
    for i in 0..total {
        publ.send(&Frame::Pub(Pub {
            envelope: numbered_sized(8, &[1], i, 1024),
            flags: 0,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
        .await;
    }
    // The Pong: A's session handled every publish before the Ping (one connection is
    // handled in order), so all of them were accepted and offered to the forward queue.
    publ.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 7 }))
        .await;
    match publ.recv().await {
        Frame::Pong(p) => assert_eq!(p.nonce, 7),
        other => panic!("expected Pong, got {other:?}"),
    }
    drop(publ);
    a.sigterm();
    a.wait_log(&["shutting down"]).await;
    for n in &nats.nodes {
        n.signal("CONT");
    }
    let status = tokio::task::spawn_blocking(move || a.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let got = reader.await.expect("reader");
    if got != (0..total).collect::<Vec<_>>() {
        let mut why = String::new();
        for name in [
            "whispeer_relay_cluster_received_total",
            "whispeer_relay_cluster_receive_dropped_total",
            "whispeer_relay_cluster_duplicates_total",
            "whispeer_relay_cluster_connects_total",
        ] {
            why += &format!("B {name} = {}; ", metric(b.admin(), name).await);
        }
        let soon = std::time::Instant::now() + std::time::Duration::from_millis(200);
        if let Ok(line) = nats.nodes[0].try_wait_log("Slow Consumer", soon) {
            why += &format!("NATS: {line}");
        }
        let first_missing = (0..total).find(|n| !got.contains(n));
        panic!(
            "B's subscriber got {} of {total} (first missing {first_missing:?}): {why}",
            got.len()
        );
    }
}

/// QoS 0 + `RETAIN` when the retention policy keeps no QoS 0 (`store_qos0` off): kept as
/// the path's retained value only, as with SQLite — numbered (so the retained value has a
/// sequence on every relay), delivered live, absent from history.
#[tokio::test]
async fn qos0_retain_is_a_retained_value_only() {
    let Some(s) = Setup::start(2) else { return };
    let (mut watch, _) = connect(s.relays[1].tcp()).await;
    subscribe(&mut watch, sub(1, pattern(11, &[], true), Qos::AtMostOnce)).await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    for n in [0, 1] {
        publ.send(&Frame::Pub(Pub {
            envelope: numbered(11, &[1], n),
            flags: pub_flags::RETAIN,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
        .await;
    }
    let marker = publish_acked(
        &mut publ,
        &[(2, numbered(11, &[2], 2))],
        Qos::AtLeastOnce,
        false,
    )
    .await[0];
    let live = read_until(&mut watch, marker).await;
    let live: Vec<u32> = live.iter().map(|m| number(&m.envelope)).collect();
    assert_eq!(live, vec![0, 1, 2], "all delivered live");

    let (mut c, _) = connect(s.relays[1].tcp()).await;
    let mut h = sub(2, pattern(11, &[], true), Qos::AtLeastOnce);
    h.replay = Some(Replay::FromSeq(1));
    subscribe(&mut c, h).await;
    let got = read_until(&mut c, marker).await;
    let got: Vec<u32> = got.iter().map(|m| number(&m.envelope)).collect();
    assert_eq!(got, vec![2], "history holds the QoS 1 message only");

    let mut r = sub(3, pattern(11, &[], true), Qos::AtMostOnce);
    r.retained = true;
    subscribe(&mut c, r).await;
    let m = c.expect_msg().await;
    assert_eq!(number(&m.envelope), 1, "the retained value");
    assert!(
        m.seq > 0 && m.seq < marker,
        "numbered by the stream: {}",
        m.seq
    );
    assert!(m.flags & msg_flags::RETAINED != 0);
}

/// Durable owners across relays: the owner is kept with the durable in the durable stream,
/// so relay B — which did not create it — refuses another owner's `Sub`, and lets the
/// owner resume from the floor the creation recorded even before any acknowledgement (the
/// record is written before the `Sub` is answered, not behind).
#[tokio::test]
async fn durable_owner_is_enforced_by_a_relay_that_did_not_create_it() {
    let Some(s) = Setup::start(2) else { return };
    let (mut publ, _) = connect(s.relays[1].tcp()).await;
    let old: Vec<(u32, Envelope)> = (0..2).map(|i| (i, numbered(12, &[1], i))).collect();
    publish_acked(&mut publ, &old, Qos::AtLeastOnce, false).await;

    let (mut a, _) = connect(s.relays[0].tcp()).await;
    let mut d = sub(1, pattern(12, &[], true), Qos::AtLeastOnce);
    d.durable = Some("d2".into());
    d.owner = Some(Bytes::from(vec![9u8; 16]));
    subscribe(&mut a, d.clone()).await;
    let mut leases = lease_watch(&s.nats).await;
    drop(a); // releases the durable at A (no acknowledgement)

    let (mut thief, _) = connect(s.relays[1].tcp()).await;
    let mut t = d.clone();
    t.owner = Some(Bytes::from(vec![8u8; 16]));
    thief.send(&Frame::Sub(t)).await;
    let e = thief.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::NotAllowed, "{e:?}");
    assert_eq!(e.sub_id, Some(1));
    assert!(e.message.contains("belongs to someone else"), "{e:?}");

    let new: Vec<(u32, Envelope)> = (2..5).map(|i| (i, numbered(12, &[1], i))).collect();
    let seqs = publish_acked(&mut publ, &new, Qos::AtLeastOnce, false).await;
    let (mut b, _) = connect(s.relays[1].tcp()).await;
    wait_released(&mut leases).await; // A gave the hold back
    subscribe(&mut b, d).await;
    let got = read_until(&mut b, seqs[2]).await;
    let got: Vec<(u64, u32)> = got.iter().map(|m| (m.seq, number(&m.envelope))).collect();
    let want: Vec<(u64, u32)> = seqs.iter().copied().zip(2..5).collect();
    assert_eq!(
        got, want,
        "resumed from the creation's floor: not new (live only), not from the start"
    );
}

/// Retained races, 1: a relay that has routed a retained publish serves it as the retained
/// value at once, even before its write to the retained stream lands (it reads it from
/// the main stream by the sequence its ordered read recorded).
#[tokio::test]
async fn a_routed_retained_value_is_served_at_once() {
    let Some(s) = Setup::start(2) else { return };
    let (mut watch, _) = connect(s.relays[1].tcp()).await;
    subscribe(&mut watch, sub(1, pattern(13, &[], true), Qos::AtMostOnce)).await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let (mut c, _) = connect(s.relays[1].tcp()).await;
    for i in 0..20u32 {
        // No waiting for the PubAck (it follows the retained write): the event is B
        // routing the message.
        publ.send(&Frame::Pub(Pub {
            envelope: numbered(13, &[1], i),
            flags: pub_flags::RETAIN,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
        .await;
        let m = watch.expect_msg().await;
        assert_eq!(number(&m.envelope), i);
        let mut r = sub(100 + u64::from(i), pattern(13, &[], true), Qos::AtMostOnce);
        r.retained = true;
        let boundary = subscribe(&mut c, r).await;
        assert!(boundary >= m.seq);
        let got = c.expect_msg().await;
        assert_eq!(
            (got.seq, number(&got.envelope)),
            (m.seq, i),
            "round {i}: the value B routed"
        );
        c.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
            sub_id: 100 + u64::from(i),
            delete: None,
        }))
        .await;
    }
}

/// Retained races, 2: relays replacing one path's value at once — the highest stream
/// sequence wins in the retained stream and on every relay, whatever order the writes
/// landed in. On nats-server before 2.9.21 (Debian's 2.9.10) this needs the relay's
/// confirming write: the server's check lets racing writes pass (it failed once in a full
/// run, ending on `Wsp-Seq` 126 of 200; the race is made deterministic in
/// `a_retained_value_overtaken_by_an_older_racing_write_is_written_again`).
#[tokio::test]
async fn concurrent_retained_writers_the_stream_order_decides() {
    let Some(mut s) = Setup::start(2) else { return };
    // Watchers: each relay having routed the last publish is the event to check it after
    // (a PubAck can come before the ordered read routes the message).
    let mut watchers = Vec::new();
    for r in &s.relays {
        let (mut w, _) = connect(r.tcp()).await;
        subscribe(&mut w, sub(9, pattern(14, &[], true), Qos::AtMostOnce)).await;
        watchers.push(w);
    }
    let (mut pa, _) = connect(s.relays[0].tcp()).await;
    let (mut pb, _) = connect(s.relays[1].tcp()).await;
    let ea: Vec<(u32, Envelope)> = (0..100).map(|i| (i, numbered(14, &[1], i))).collect();
    let eb: Vec<(u32, Envelope)> = (100..200).map(|i| (i, numbered(14, &[1], i))).collect();
    let (sa, sb) = tokio::join!(
        publish_acked(&mut pa, &ea, Qos::AtLeastOnce, true),
        publish_acked(&mut pb, &eb, Qos::AtLeastOnce, true)
    );
    let (last_seq, last_n) = sa
        .iter()
        .zip(0..100u32)
        .chain(sb.iter().zip(100..200u32))
        .map(|(s, n)| (*s, n))
        .max()
        .unwrap();
    for w in &mut watchers {
        read_until(w, last_seq).await;
    }

    // The retained stream holds the highest sequence (every PubAck followed its write).
    let nc = async_nats::connect(s.nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let rs = js.get_stream("WSP_RETAINED").await.unwrap();
    let subject = format!("wsp_retained.{}.{}", key(14), tok(1));
    let m = rs.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(
        m.headers.get("Wsp-Seq").map(|v| v.as_str().to_string()),
        Some(last_seq.to_string())
    );

    let late = start_relay(&s.nats.urls(), "late");
    s.relays.push(late);
    for (i, r) in s.relays.iter().enumerate() {
        let (mut c, _) = connect(r.tcp()).await;
        let mut q = sub(1, pattern(14, &[], true), Qos::AtMostOnce);
        q.retained = true;
        subscribe(&mut c, q).await;
        let m = c.expect_msg().await;
        assert_eq!(
            (m.seq, number(&m.envelope)),
            (last_seq, last_n),
            "relay {i}: the highest sequence"
        );
    }
}

/// nats-server before 2.9.21 (Debian's is 2.9.10) checks `Nats-Expected-Last-Subject-
/// Sequence` against the messages a clustered stream has applied, not those proposed and
/// not yet applied (nats-server issue 4320): two relays writing one retained path at once
/// can both pass, and the write landing last stays — an older value over a newer one (the
/// flake of `concurrent_retained_writers_the_stream_order_decides`). A retained write whose
/// path had a value between the one it read and its own (or whose ordered read cannot
/// tell) is confirmed by one more checked write, which comes after every write that raced
/// it. Driven at two stores: relay A's write of the older value held, relay B writes the
/// newer one (it read no value; the path had A's); with B's confirming write held, A's
/// value lands in the retained stream as the lost race would (after B's); let go, B writes
/// its value again. A's write, let go last, finds the newer value and writes nothing.
/// Before: B never confirmed (it never parks here) and the older value stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_value_overtaken_by_an_older_racing_write_is_written_again() {
    use whispeer_relay::store::{Accepted, Append, Store, StoreError};
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let a = open_store(&nats.urls(), "relay-a").await;
    let b = open_store(&nats.urls(), "relay-b").await;
    a.hold_retained_writes(true);
    b.confirm_writes(true);
    b.hold_write_confirms(true);
    let mut parked = b.write_confirms_parked();
    type Answer = tokio::sync::mpsc::UnboundedReceiver<Result<Accepted, StoreError>>;
    let publish = |store: &whispeer_relay::store::JetStreamStore, n: u32| -> Answer {
        let env = numbered(61, &[7], n);
        let tenant = whispeer_relay::store::Tenant::Address("10.0.0.1".parse().unwrap());
        let Accepted::Pending(ticket) = store
            .append(Append {
                path: &env.token_path(),
                envelope: &env,
                flags: pub_flags::RETAIN,
                qos: Qos::AtLeastOnce,
                publish_id: None,
                tenant: &tenant,
            })
            .expect("queued")
        else {
            panic!("a stored publish waits for the stream");
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        store.when_sequenced(ticket, Box::new(move |r| drop(tx.send(r))));
        rx
    };
    async fn answered(rx: &mut Answer) -> u64 {
        match tokio::time::timeout(TIMEOUT, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Ok(Accepted::New(s)) => s.0,
            other => panic!("{other:?}"),
        }
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await.unwrap());
    let main = js.get_stream("WSP").await.unwrap();
    let path_subject = format!("wsp.{}.{}", key(61), tok(7));
    // A's value in the stream (its retained write held) before B publishes: B's is newer.
    let mut at_a = publish(&a, 1);
    let older = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Ok(m) = main.get_last_raw_message_by_subject(&path_subject).await {
                break m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("A's publish in the stream");
    let mut at_b = publish(&b, 2);
    tokio::time::timeout(TIMEOUT, parked.wait_for(|n| *n == 1))
        .await
        .expect("B's write waits before its confirming write")
        .unwrap();
    // A's write, landing after B's as a lost race does.
    let rs = js.get_stream("WSP_RETAINED").await.unwrap();
    let subject = format!("wsp_retained.{}.{}", key(61), tok(7));
    let wsp_seq = |m: &async_nats::jetstream::message::StreamMessage| {
        m.headers.get("Wsp-Seq").map(|v| v.as_str().to_string())
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert("Wsp-Seq", older.sequence.to_string().as_str());
    js.publish_with_headers(subject.clone(), h, older.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let last = rs.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(wsp_seq(&last), Some(older.sequence.to_string()));
    b.hold_write_confirms(false);
    let newer = answered(&mut at_b).await;
    assert!(newer > older.sequence);
    let last = rs.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(
        wsp_seq(&last),
        Some(newer.to_string()),
        "the newer value is the retained one again"
    );
    assert_eq!(number(&Envelope::from_bytes(last.payload).unwrap()), 2);
    let m = b.metrics();
    assert_eq!((m.retained_confirms, m.retained_repairs), (1, 1));
    a.hold_retained_writes(false);
    assert_eq!(answered(&mut at_a).await, older.sequence);
    let last = rs.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(wsp_seq(&last), Some(newer.to_string()), "A wrote nothing");
    let m = a.metrics();
    assert_eq!((m.retained_confirms, m.retained_repairs), (0, 0));
}

/// A relay on a replicated stream of a nats-server before 2.9.21 (issue 4320: writes in
/// flight not checked) says so at start, naming the version and what it means.
#[tokio::test]
async fn a_relay_on_a_nats_server_before_2_9_21_warns_at_start() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let Some(v) = nats_before_2_9_21() else {
        eprintln!("nats-server 2.9.21 or later: fixed, no warning to wait for");
        return;
    };
    let mut relay = start_logged_relay_with(&nats.urls(), "relay-a", &[]);
    let line = relay.wait_log(&["nats-server issue 4320"]).await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&v), "{line}");
}

/// The installed nats-server's version (`x.y.z`) when it is older than 2.9.21 (its
/// conditional writes can let racing writes pass: nats-server issue 4320).
fn nats_before_2_9_21() -> Option<String> {
    let out = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = version
        .trim()
        .trim_start_matches("nats-server: v")
        .split(['.', '-'])
        .take(3)
        .map(|p| p.parse().unwrap())
        .collect();
    ((v[0], v[1], v[2]) < (2, 9, 21)).then(|| format!("{}.{}.{}", v[0], v[1], v[2]))
}

/// History reads: `LastN` and `SinceMs` are planned from the relay's ledger (sequence and
/// time of each kept message per path), not by scanning the key id's whole history, and a
/// read of several chunks reuses its consumer. Measured by the rows the relay reads
/// (`whispeer_relay_store_rows_read_total`).
#[tokio::test]
async fn last_n_and_since_do_not_scan_the_whole_history() {
    let Some(s) = Setup::start(1) else { return };
    let admin = s.relays[0].admin();
    // A PubAck can come before the relay's ordered read routes the message (and moves the
    // SubOk boundary): a watcher reading the last one is the event that it has.
    let (mut watch, _) = connect(s.relays[0].tcp()).await;
    subscribe(
        &mut watch,
        sub(9, pattern(15, &[Some(2)], false), Qos::AtMostOnce),
    )
    .await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let bulk: Vec<(u32, Envelope)> = (0..1500).map(|i| (i, numbered(15, &[1], i))).collect();
    publish_acked(&mut publ, &bulk, Qos::AtLeastOnce, false).await;
    let tail: Vec<(u32, Envelope)> = (2000..2003).map(|i| (i, numbered(15, &[2], i))).collect();
    let tail_seqs = publish_acked(&mut publ, &tail, Qos::AtLeastOnce, false).await;
    read_until(&mut watch, tail_seqs[2]).await;

    let rows = metric(admin, "whispeer_relay_store_rows_read_total").await;
    let (mut c, _) = connect(s.relays[0].tcp()).await;
    let mut r = sub(1, pattern(15, &[Some(2)], false), Qos::AtMostOnce);
    r.replay = Some(Replay::LastN(2));
    subscribe(&mut c, r).await;
    let got = read_until(&mut c, tail_seqs[2]).await;
    let got: Vec<u32> = got.iter().map(|m| number(&m.envelope)).collect();
    assert_eq!(got, vec![2001, 2002]);
    let read = metric(admin, "whispeer_relay_store_rows_read_total").await - rows;
    assert!(
        read <= 3,
        "LastN(2) read {read} rows of a 1503-message history"
    );

    // SinceMs: a time after the bulk (the stream's clock is this machine's).
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1;
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64)
        <= t
    {
        tokio::task::yield_now().await;
    }
    let late: Vec<(u32, Envelope)> = (3000..3002).map(|i| (i, numbered(15, &[1], i))).collect();
    let late_seqs = publish_acked(&mut publ, &late, Qos::AtLeastOnce, false).await;
    let rows = metric(admin, "whispeer_relay_store_rows_read_total").await;
    let mut r = sub(2, pattern(15, &[], true), Qos::AtMostOnce);
    r.replay = Some(Replay::SinceMs(t));
    subscribe(&mut c, r).await;
    let got = read_until(&mut c, late_seqs[1]).await;
    let got: Vec<u32> = got.iter().map(|m| number(&m.envelope)).collect();
    assert_eq!(got, vec![3000, 3001]);
    let read = metric(admin, "whispeer_relay_store_rows_read_total").await - rows;
    assert!(read <= 2, "SinceMs read {read} rows");

    // A full replay of more than one chunk (1024) is complete and in order.
    let mut r = sub(3, pattern(15, &[Some(1)], false), Qos::AtMostOnce);
    r.replay = Some(Replay::FromSeq(1));
    subscribe(&mut c, r).await;
    let got = read_until(&mut c, late_seqs[1]).await;
    let got: Vec<u32> = got
        .iter()
        .filter(|m| m.seq > 0)
        .map(|m| number(&m.envelope))
        .collect();
    let want: Vec<u32> = (0..1500).chain(3000..3002).collect();
    assert_eq!(got, want);
}

/// Retained values sent under a small credit (hostile-client review): a QoS 1 subscription
/// with credit 1 acknowledging each value before the next is sent gets every one, in order,
/// and the relay reads each value from JetStream about once. Before, each credit window
/// read a whole chunk of values (one NATS request per path) and cut it to the credit:
/// 40 values cost 820 reads, and n values n²/2 — a client acking one by one turned a
/// pattern with many retained values into a flood of NATS requests.
#[tokio::test]
async fn retained_values_under_a_small_credit_are_read_about_once() {
    let Some(s) = Setup::start(1) else { return };
    let admin = s.relays[0].admin();
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let values: Vec<(u32, Envelope)> = (0..40u32)
        .map(|i| (i, numbered(17, &[i as u8], i)))
        .collect();
    let seqs = publish_acked(&mut publ, &values, Qos::AtLeastOnce, true).await;

    let rows = metric(admin, "whispeer_relay_store_rows_read_total").await;
    let (mut c, _) = connect(s.relays[0].tcp()).await;
    let mut r = sub(1, pattern(17, &[], true), Qos::AtLeastOnce);
    r.retained = true;
    r.credit = Some(1);
    subscribe(&mut c, r).await;
    let mut got = Vec::new();
    while got.len() < values.len() {
        match c.recv().await {
            Frame::Msg(m) => {
                assert!(m.flags & msg_flags::RETAINED != 0, "a retained value");
                got.push((m.seq, number(&m.envelope)));
                c.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
            }
            Frame::ReplayDone(_) => {}
            other => panic!("expected Msg, got {other:?}"),
        }
    }
    let want: Vec<(u64, u32)> = seqs.iter().copied().zip(0..40).collect();
    assert_eq!(got, want, "every retained value, once, in sequence order");
    let read = metric(admin, "whispeer_relay_store_rows_read_total").await - rows;
    assert!(
        read <= 2 * values.len() as u64,
        "{read} values read from JetStream for {} sent under credit 1",
        values.len()
    );
}

/// Retained races, 3 (deterministic): a retained write for a *higher* stream sequence that
/// landed first — put in the retained stream by hand here — is not replaced by a later
/// write for a lower one.
#[tokio::test]
async fn a_lower_sequence_never_replaces_a_higher_retained_value() {
    let Some(s) = Setup::start(1) else { return };
    let nc = async_nats::connect(s.nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let subject = format!("wsp_retained.{}.{}", key(16), tok(1));
    let mut h = async_nats::HeaderMap::new();
    h.insert("Wsp-Seq", "1000000000");
    js.publish_with_headers(
        subject.clone(),
        h,
        numbered(16, &[1], 999).as_bytes().clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let seq = publish_acked(
        &mut publ,
        &[(1, numbered(16, &[1], 1))],
        Qos::AtLeastOnce,
        true,
    )
    .await[0];
    assert!(seq < 1_000_000_000);
    let rs = js.get_stream("WSP_RETAINED").await.unwrap();
    let m = rs.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(
        m.headers.get("Wsp-Seq").map(|v| v.as_str().to_string()),
        Some("1000000000".to_string()),
        "the PubAck came after the (skipped) write; the higher sequence stays"
    );
}

/// Measurement (ignored; `cargo test -p whispeer-relay --test cluster_jetstream -- --ignored
/// ledger_load --nocapture`): how long a relay started beside a stream of
/// `WSP_LEDGER_MESSAGES` (default 100,000) stored messages takes to read the usage back
/// (headers only), from its "usage per tenant read from the streams" log line.
#[tokio::test]
#[ignore]
async fn ledger_load_time() {
    let Some(s) = Setup::start(1) else { return };
    let total: u32 = std::env::var("WSP_LEDGER_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let started = std::time::Instant::now();
    let mut done = 0u32;
    while done < total {
        let batch: Vec<(u32, Envelope)> = (done..(done + 1000).min(total))
            .map(|i| (i, numbered_sized(17, &[(i % 50) as u8], i, 256)))
            .collect();
        publish_acked(
            &mut publ,
            &batch,
            Qos::AtLeastOnce,
            i64::from(done) % 7 == 0,
        )
        .await;
        done += batch.len() as u32;
    }
    let publish = started.elapsed();
    let mut args = jetstream_relay_args(&s.nats.urls(), "late");
    args.extend(["--log".to_string(), "info".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let mut late = BinRelay::start_logged(&args);
    let line = late
        .wait_log(&["usage per tenant read from the streams"])
        .await;
    eprintln!(
        "ledger load: {total} messages published (QoS 1, 256 B) in {publish:?}; a new relay \
         ready in {:?}: {line}",
        started.elapsed()
    );
}

/// Retained-value and durable-name quotas with the JetStream store, across relays: a
/// tenant's retained value published at A counts at B (replacing it stays free), and a
/// durable created at A counts at B once B's durable reader has it.
#[tokio::test]
async fn retained_and_durable_quotas_count_the_whole_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let quota = ["--tenant-max-retained", "1", "--tenant-max-durables", "1"];
    let a = start_relay_with(&urls, "relay-a", &quota);
    // Logged: B's "durable record read" line is the event that it learned of A's durable.
    let mut b = start_logged_relay_with(&urls, "relay-b", &quota);
    let (mut watch, _) = connect(b.tcp()).await;
    subscribe(&mut watch, sub(1, pattern(18, &[], true), Qos::AtMostOnce)).await;
    let (mut pa, _) = connect(a.tcp()).await;
    let first = publish_acked(
        &mut pa,
        &[(1, numbered(18, &[1], 1))],
        Qos::AtLeastOnce,
        true,
    )
    .await;
    read_until(&mut watch, first[0]).await; // B's ledger has it

    let (mut pb, _) = connect(b.tcp()).await;
    pb.send(&pub_frame(numbered(18, &[2], 2), Qos::AtLeastOnce, 2, true))
        .await;
    let e = pb.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");
    assert!(e.message.contains("retained values quota (1)"), "{e:?}");
    publish_acked(
        &mut pb,
        &[(3, numbered(18, &[1], 3))],
        Qos::AtLeastOnce,
        true,
    )
    .await; // replacing the tenant's one retained value is free

    let (mut ca, _) = connect(a.tcp()).await;
    let mut d = sub(5, pattern(18, &[], true), Qos::AtLeastOnce);
    d.durable = Some("q1".into());
    subscribe(&mut ca, d).await;
    // B's durable reader learning of q1 is the event (it logs each durable it learns).
    b.wait_log(&["durable record read", "durables=1"]).await;
    let mut q2 = sub(6, pattern(18, &[], true), Qos::AtLeastOnce);
    q2.durable = Some("q2".into());
    pb.send(&Frame::Sub(q2)).await;
    let e = loop {
        match pb.recv().await {
            Frame::Err(e) => break e,
            Frame::Msg(_) | Frame::PubAck(_) => {}
            other => panic!("expected Err, got {other:?}"),
        }
    };
    assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");
    assert_eq!(e.sub_id, Some(6));
    assert!(e.message.contains("durable names quota (1)"), "{e:?}");
    assert!(
        metric(
            b.admin(),
            "whispeer_relay_store_quota_tenant_rejections_total"
        )
        .await
            >= 2
    );
}

/// Review 28 finding 4: a new durable name is counted as in flight while the relay creates
/// it in NATS, so `Sub`s of one tenant creating distinct names at once cannot all pass the
/// durable quota (they did: the check ran before the NATS round trip, the count after it).
/// Eight connections from one address ask for eight new names at once under a quota of one.
#[tokio::test]
async fn concurrent_creations_of_distinct_durables_respect_the_quota() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let a = start_relay_with(&nats.urls(), "relay-a", &["--tenant-max-durables", "1"]);
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(connect(a.tcp()).await.0);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut d = sub(i as u64 + 1, pattern(19, &[], true), Qos::AtLeastOnce);
        d.durable = Some(format!("racer-{i}"));
        c.send(&Frame::Sub(d)).await;
    }
    let (mut created, mut refused) = (0, 0);
    for c in &mut conns {
        loop {
            match c.recv().await {
                Frame::SubOk(_) => created += 1,
                Frame::Err(e) => {
                    assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");
                    refused += 1;
                }
                Frame::Msg(_) => continue,
                other => panic!("expected SubOk or Err, got {other:?}"),
            }
            break;
        }
    }
    assert_eq!((created, refused), (1, 7), "one name within a quota of one");
}

/// True on the next `PubAck`, false on an `Err(auth_failed)`.
async fn acked_or_refused(c: &mut Client) -> bool {
    loop {
        match c.recv().await {
            Frame::PubAck(_) => return true,
            Frame::Err(e) => {
                assert_eq!(e.code, whispeer_protocol::ErrorCode::AuthFailed, "{e:?}");
                return false;
            }
            _ => {}
        }
    }
}

/// A token account in `group`: the token printed.
fn token_account(file: &std::path::Path, name: &str, group: &str) -> String {
    let out = account_add(file, name, &["--token", "--group", group]);
    out.trim().lines().last().unwrap().to_string()
}

/// A `Hello` with a bearer token.
fn token_hello(token: &str) -> Frame {
    Frame::Hello(whispeer_protocol::frame::Hello {
        versions: vec![whispeer_protocol::frame::PROTOCOL_VERSION],
        features: u64::MAX,
        client: Some("accounts-test".into()),
        auth: Some(Bytes::copy_from_slice(token.as_bytes())),
        account: None,
    })
}

/// A client logged in with a bearer token.
async fn token_client(addr: SocketAddr, token: &str) -> Client {
    let mut c = Client::tcp(addr).await;
    c.send(&token_hello(token)).await;
    match c.recv().await {
        Frame::Welcome(_) => c,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// A JetStream relay requiring accounts from `accounts`, its auth-state file in `dir`.
fn auth_relay(
    urls: &str,
    dir: &std::path::Path,
    accounts: &std::path::Path,
    name: &str,
    extra: &[&str],
) -> BinRelay {
    let state = dir.join(format!("{name}.state"));
    let mut args = vec![
        "--auth",
        "required",
        "--accounts",
        accounts.to_str().unwrap(),
        "--auth-state",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    start_relay_with(urls, name, &args)
}

/// Key-id claims are the cluster's with the JetStream store: the first accounts group to
/// use a key id at relay A holds it at relay B too (each relay with its own auth-state file,
/// one account list), so another group cannot take it over by connecting elsewhere — nor at
/// a relay started later. Two groups claiming one new key id at two relays at once: one wins.
#[tokio::test]
async fn key_id_claims_hold_across_the_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let dir = temp_dir("claims");
    let accounts = dir.join("accounts.toml");
    let alice = token_account(&accounts, "alice", "a");
    let mallory = token_account(&accounts, "mallory", "m");
    let relay = |name: &str| auth_relay(&urls, &dir, &accounts, name, &[]);
    let (a, b) = (relay("claims-a"), relay("claims-b"));
    let publish = |k: u8, id: u32| pub_frame(numbered(k, &[1], id), Qos::AtLeastOnce, id, false);

    // Alice's group claims key 41 at A by publishing on it.
    let mut pa = token_client(a.tcp(), &alice).await;
    let seqs = publish_acked(
        &mut pa,
        &[(0, numbered(41, &[1], 0))],
        Qos::AtLeastOnce,
        false,
    )
    .await;
    assert_eq!(seqs.len(), 1);
    // Mallory at B: refused, publishing or subscribing.
    let mut mb = token_client(b.tcp(), &mallory).await;
    mb.send(&publish(41, 1)).await;
    let e = mb.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::AuthFailed, "{e:?}");
    assert!(e.message.contains("claimed by another group"), "{e:?}");
    mb.send(&Frame::Sub(sub(1, pattern(41, &[], true), Qos::AtMostOnce)))
        .await;
    assert_eq!(
        mb.expect_err().await.code,
        whispeer_protocol::ErrorCode::AuthFailed
    );
    // Alice's group keeps it at B.
    let mut ab = token_client(b.tcp(), &alice).await;
    publish_acked(
        &mut ab,
        &[(2, numbered(41, &[1], 2))],
        Qos::AtLeastOnce,
        false,
    )
    .await;

    // A second record of a claimed key id is refused by the stream itself (a racing
    // claim that passed nats-server's check before 2.9.21, issue 4320, written here
    // without the check): the first record stays. Before: the later record replaced it.
    let js = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await.unwrap());
    let subject = format!("wsp_claim.{}", hex::encode(key(41).as_bytes()));
    let claims = js.get_stream("WSP_CLAIMS").await.unwrap();
    let first = claims
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    let racing = js
        .publish(subject.clone(), Bytes::from_static(b"a racing group"))
        .await
        .unwrap()
        .await;
    assert!(
        racing.is_err(),
        "a second claim record is refused: {racing:?}"
    );
    let kept = claims
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(
        (kept.sequence, kept.payload),
        (first.sequence, first.payload)
    );

    // A relay started now knows the claim (it reads it from the stream on first use).
    let c = relay("claims-c");
    let mut mc = token_client(c.tcp(), &mallory).await;
    mc.send(&publish(41, 3)).await;
    assert_eq!(
        mc.expect_err().await.code,
        whispeer_protocol::ErrorCode::AuthFailed
    );

    // A new key id claimed at A and B at the same moment by the two groups: one group
    // holds it at both relays, the other is refused at both.
    pa.send(&publish(42, 10)).await;
    mb.send(&publish(42, 11)).await;
    let alice_won = acked_or_refused(&mut pa).await;
    let mallory_won = acked_or_refused(&mut mb).await;
    assert!(alice_won != mallory_won, "exactly one group holds key 42");
    let (mut winner_elsewhere, mut loser_elsewhere) = if alice_won {
        (ab, token_client(a.tcp(), &mallory).await)
    } else {
        (token_client(a.tcp(), &mallory).await, ab)
    };
    publish_acked(
        &mut winner_elsewhere,
        &[(12, numbered(42, &[1], 12))],
        Qos::AtLeastOnce,
        false,
    )
    .await;
    loser_elsewhere.send(&publish(42, 13)).await;
    assert_eq!(
        loser_elsewhere.expect_err().await.code,
        whispeer_protocol::ErrorCode::AuthFailed
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A claims stream made by an older relay (a second record of a key id replaced the first)
/// is set at start to refuse second records, as a new one is made.
#[tokio::test]
async fn an_older_claims_stream_is_set_to_refuse_second_records() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "WSP_CLAIMS".into(),
        subjects: vec!["wsp_claim.>".into()],
        max_messages_per_subject: 1,
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let _relay = start_relay(&nats.urls(), "relay-a");
    let mut claims = js.get_stream("WSP_CLAIMS").await.unwrap();
    let c = &claims.info().await.unwrap().config;
    assert_eq!(
        (c.discard, c.discard_new_per_subject),
        (async_nats::jetstream::stream::DiscardPolicy::New, true)
    );
    let subject = format!("wsp_claim.{}", hex::encode(key(43).as_bytes()));
    js.publish(subject.clone(), Bytes::from_static(b"first"))
        .await
        .unwrap()
        .await
        .unwrap();
    let second = js
        .publish(subject, Bytes::from_static(b"second"))
        .await
        .unwrap()
        .await;
    assert!(second.is_err(), "{second:?}");
}

/// Two edits of the cluster's account list at the same moment (nats-server before 2.9.21
/// lets both conditional writes pass, issue 4320): the later-landing version, made from
/// the same older one, would drop the other edit — an account added lost, or a removal
/// undone. An edit is settled: a barrier, then the versions after it read back along
/// `Wsp-After`. Driven step by step: A writes its version; a racing version made from the
/// same older one lands after it (written here without the check, as the race would); A's
/// settle says its edit is not in the list (the tool then reads again and redoes it). A
/// version made from A's is a later edit that contains it: settled. Before: no settle, A's
/// edit was reported done and lost.
#[tokio::test]
async fn an_account_list_edit_replaced_by_a_racing_one_is_made_again() {
    use whispeer_relay::config::ClusterConfig;
    use whispeer_relay::store::jetstream::accounts as list;
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let cluster = ClusterConfig {
        urls: nats.urls().split(',').map(str::to_string).collect(),
        replicas: 3,
        ..ClusterConfig::default()
    };
    let js = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await.unwrap());
    let stream = list::open(&js, &cluster).await.unwrap();
    let v1 = list::write(&js, &cluster, 0, "v1".into())
        .await
        .unwrap()
        .unwrap();
    assert!(
        list::settled(&js, &cluster, v1).await.unwrap(),
        "alone: settled"
    );
    // A's edit, made from v1, lands; then the racing edit also made from v1.
    let a = list::write(&js, &cluster, v1, "v1 + a".into())
        .await
        .unwrap()
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Wsp-After", v1.to_string().as_str());
    js.publish_with_headers("wsp_accounts.list", h, Bytes::from_static(b"v1 + b"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        !list::settled(&js, &cluster, a).await.unwrap(),
        "A's edit was replaced by a version without it: to be made again"
    );
    let (latest, text) = list::latest(&stream, &cluster).await.unwrap().unwrap();
    assert_eq!(text, "v1 + b");
    // Made again from the racing version: settled, and a later edit made from it keeps it.
    let again = list::write(&js, &cluster, latest, "v1 + b + a".into())
        .await
        .unwrap()
        .unwrap();
    let later = list::write(&js, &cluster, again, "v1 + b + a + c".into())
        .await
        .unwrap()
        .unwrap();
    assert!(list::settled(&js, &cluster, again).await.unwrap());
    assert!(list::settled(&js, &cluster, later).await.unwrap());
    // `replace` answers `false` when `after` is not the latest (the check alone)...
    assert!(!list::replace(&js, &cluster, v1, "stale".into())
        .await
        .unwrap());
    // ...and on a server that needs it, settles what it wrote: its barrier follows it.
    assert!(
        list::replace(&js, &cluster, later, "v1 + b + a + c + d".into())
            .await
            .unwrap()
    );
    if nats_before_2_9_21().is_some() {
        let (written, _) = list::latest(&stream, &cluster).await.unwrap().unwrap();
        let barrier = stream
            .get_last_raw_message_by_subject("wsp_accounts.barrier")
            .await
            .expect("replace wrote its barrier");
        assert!(barrier.sequence > written, "after the version it settles");
    }
}

/// The cluster's account list in JetStream (`[cluster] shared_accounts`): accounts added
/// once with `whispeer-relay account add --config relay.toml` are admitted at every relay
/// (none reads an account file) — including one started afterwards — and removing one
/// closes its connections at every relay at once.
#[tokio::test]
async fn a_shared_account_list_admits_and_revokes_at_every_relay() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let dir = temp_dir("shared-accounts");
    let config = dir.join("relay.toml");
    let list: Vec<String> = urls.split(',').map(|u| format!("{u:?}")).collect();
    std::fs::write(
        &config,
        format!(
            "[cluster]\nurls = [{}]\nstore = \"jetstream\"\nreplicas = 3\nshared_accounts = true\n\
             [auth]\nmode = \"required\"\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_string();
    let add = |name: &str| {
        let out = account_add(
            &dir.join("unused.toml"),
            name,
            &["--token", "--config", &cfg],
        );
        assert!(!dir.join("unused.toml").exists(), "the file is not used");
        out.trim().lines().last().unwrap().to_string()
    };
    let alice = add("alice");
    // Logged: a relay's "account list reloaded" line is the event that it installed a
    // new version.
    let relay = |name: &str| {
        let state = dir.join(format!("{name}.state"));
        let mut args = jetstream_relay_args(&urls, name);
        args.extend(
            [
                "--cluster-shared-accounts",
                "true",
                "--auth",
                "required",
                "--auth-state",
                state.to_str().unwrap(),
                "--log",
                "warn,whispeer_relay::accounts=info",
            ]
            .map(String::from),
        );
        BinRelay::start_logged(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (mut a, mut b) = (relay("acct-a"), relay("acct-b"));
    let mut at_a = token_client(a.tcp(), &alice).await;
    let mut at_b = token_client(b.tcp(), &alice).await;
    // Added while both run: admitted at both (each follows the list).
    let bob = add("bob");
    for r in [&mut a, &mut b] {
        r.wait_log(&["account list reloaded", "accounts=2"]).await;
        let mut c = token_client(r.tcp(), &bob).await;
        publish_acked(
            &mut c,
            &[(1, numbered(51, &[1], 1))],
            Qos::AtLeastOnce,
            false,
        )
        .await;
    }
    // Removed: both relays close alice's connections.
    relay_cli(&["account", "remove", "alice", "--config", &cfg]);
    for c in [&mut at_a, &mut at_b] {
        let e = c
            .expect_fatal(whispeer_protocol::ErrorCode::AuthFailed)
            .await;
        assert!(e.message.contains("removed"), "{e:?}");
    }
    // A relay started now reads the list: bob in, alice out.
    let c = relay("acct-c");
    token_client(c.tcp(), &bob).await;
    let mut refused = Client::tcp(c.tcp()).await;
    refused.send(&token_hello(&alice)).await;
    refused
        .expect_fatal(whispeer_protocol::ErrorCode::AuthFailed)
        .await;
    let listed = relay_cli(&["account", "list", "--config", &cfg]);
    assert!(
        listed.starts_with("bob\t") && !listed.contains("alice"),
        "{listed}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `auth.max_claims_per_group` counts the claims made at each relay; a group at its limit
/// at one relay still uses the key ids it claimed at another (the shared store is asked,
/// not written), and only a new key id is refused.
#[tokio::test]
async fn a_group_at_its_claim_limit_still_uses_what_it_claimed_elsewhere() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let dir = temp_dir("claim-limit");
    let accounts = dir.join("accounts.toml");
    let alice = token_account(&accounts, "alice", "a");
    let relay = |name: &str| auth_relay(&urls, &dir, &accounts, name, &["--max-claims", "1"]);
    let (a, b) = (relay("limit-a"), relay("limit-b"));
    let mut at_a = token_client(a.tcp(), &alice).await;
    let mut at_b = token_client(b.tcp(), &alice).await;
    let env = |k: u8, id: u32| [(id, numbered(k, &[1], id))];
    publish_acked(&mut at_a, &env(61, 1), Qos::AtLeastOnce, false).await;
    publish_acked(&mut at_b, &env(62, 2), Qos::AtLeastOnce, false).await;
    // Each relay is at the limit now; each still takes the other's claim.
    publish_acked(&mut at_a, &env(62, 3), Qos::AtLeastOnce, false).await;
    publish_acked(&mut at_b, &env(61, 4), Qos::AtLeastOnce, false).await;
    // A new key id is one claim too many.
    at_a.send(&pub_frame(
        numbered(63, &[1], 5),
        Qos::AtLeastOnce,
        5,
        false,
    ))
    .await;
    let e = at_a.expect_err().await;
    assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay that waits for the cluster's account list still stops when asked: here JetStream
/// stops answering after the relay's store opened, so the relay keeps retrying the list —
/// and `run` must still return soon after the stop instead of retrying until NATS is back.
#[tokio::test]
async fn a_relay_waiting_for_the_shared_account_list_stops_when_asked() {
    let Some(mut nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let mut config = whispeer_relay::Config::ephemeral();
    config.listen.ws = whispeer_relay::config::ListenAddr::OFF;
    config.cluster.urls = nats.urls().split(',').map(str::to_string).collect();
    config.cluster.store = whispeer_relay::config::ClusterStore::Jetstream;
    config.cluster.replicas = 3;
    config.cluster.shared_accounts = true;
    config.auth.mode = whispeer_relay::config::AuthMode::Required;
    config.store.total_max_bytes = 256 << 20;
    let relay = whispeer_relay::Relay::bind(config)
        .await
        .expect("the store opens while JetStream answers");
    for node in &mut nats.nodes {
        node.kill();
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(relay.run(async {
        let _ = stop_rx.await;
    }));
    stop_tx.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, run)
        .await
        .expect("run returns after the stop while the account list is unavailable")
        .unwrap()
        .unwrap();
}

/// A relay that falls behind the stream — frozen here (SIGSTOP) while another relay takes
/// 300 × 60 KiB — has been sent only what its live read's two bounded pull requests asked
/// for (2 × 2 MiB), not the backlog: what the server sends lands in that relay's memory
/// whether its router keeps up or not (async-nats's ordered consumer kept 500 messages of
/// any size requested: the whole 18 MiB here). Running again, its subscriber gets every
/// message, once, in order — three of them larger than a request's bytes (asked for alone).
#[tokio::test]
async fn a_relay_behind_the_stream_is_sent_two_bounded_requests_not_the_backlog() {
    const N: u32 = 300;
    const BODY: usize = 60 * 1024;
    const LARGE: usize = 3 << 20;
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let urls = nats.urls();
    // The default 8 MiB outbound queue: three 3 MiB envelopes arriving together after the
    // thaw overflow it before the writer sent the first; the QoS 1 subscription pauses
    // there and they follow from the stream (before wave 2 session 34 the `drop` policy
    // dropped the oldest queued message even at QoS 1, and the subscriber saw a `Gap`).
    let frame = ["--max-frame", "8000000"];
    let s = Setup {
        relays: vec![
            start_relay_with(&urls, "relay-0", &frame),
            start_relay_with(&urls, "relay-1", &frame),
        ],
        nats,
    };
    let (mut watch, _) = connect(s.relays[1].tcp()).await;
    subscribe(&mut watch, sub(1, pattern(21, &[], true), Qos::AtLeastOnce)).await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    // Relay 1 reads the stream before it is frozen: one message through it.
    let first = publish_acked(
        &mut publ,
        &[(0, numbered_sized(21, &[1], 0, 1024))],
        Qos::AtLeastOnce,
        false,
    )
    .await[0];
    read_until(&mut watch, first).await;

    s.relays[1].signal("STOP");
    let envs: Vec<(u32, Envelope)> = (1..=N)
        .map(|i| (i, numbered_sized(21, &[1], i, BODY)))
        .collect();
    let mut acked = publish_acked(&mut publ, &envs, Qos::AtLeastOnce, false).await;
    let last = *acked.last().unwrap();
    // What the server has sent each relay's live read (the running relay: everything).
    let mut sent: Vec<u64> = stream_consumers(&s.nats.nodes[0].url())
        .await
        .into_iter()
        .filter(|c| {
            let d = c.config.description.as_deref().unwrap_or_default();
            d.starts_with("whispeer-relay live read")
        })
        .map(|c| c.delivered.stream_sequence)
        .collect();
    sent.sort_unstable();
    assert_eq!(sent.len(), 2, "one live read per relay: {sent:?}");
    let bound = first + (2 * (2 << 20) / BODY) as u64 + 2;
    eprintln!(
        "stream at {last}; sent to the frozen relay up to {}, to the running one up to {} \
         (bound {bound})",
        sent[0], sent[1]
    );
    assert!(
        sent[0] <= bound,
        "the frozen relay was sent up to sequence {} of {last} (bound {bound})",
        sent[0]
    );
    // Then three envelopes larger than a live request's 2 MiB, between small ones.
    let more: Vec<(u32, Envelope)> = (N + 1..=N + 6)
        .map(|i| {
            let size = if i % 2 == 0 { LARGE } else { 1024 };
            (i, numbered_sized(21, &[1], i, size))
        })
        .collect();
    acked.extend(publish_acked(&mut publ, &more, Qos::AtLeastOnce, false).await);
    let last = *acked.last().unwrap();

    s.relays[1].signal("CONT");
    // Acknowledged as read: the relay holds back a QoS 1 subscriber's deliveries beyond its
    // unacknowledged bytes.
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(seq, _)| *seq < last) {
        match watch.recv().await {
            Frame::Msg(m) => {
                watch.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
                seen.push((m.seq, number(&m.envelope)));
            }
            other => panic!("expected Msg, got {other:?}"),
        }
    }
    let want: Vec<(u64, u32)> = acked.iter().copied().zip(1..=N + 6).collect();
    assert_eq!(seen, want, "every message, once, in order, after the thaw");
}

/// How long a frame may take while NATS recovers from a killed server: the relay retries at
/// once, but creating its new consumer waits for the cluster's metadata leader, and with
/// this suite's 24 tests each running three nats-servers on two cores an election has
/// taken over 30 s (the frame timeout the other tests use).
const RECOVERY: std::time::Duration = std::time::Duration::from_secs(180);

/// The live read's consumer lives on one NATS server (R1, in memory). When that server
/// dies, the relay hears an error or nothing at all, and reads on from where it was with a
/// new consumer: its subscriber gets every later message, in order, none twice.
#[tokio::test]
async fn live_delivery_goes_on_when_the_server_of_a_live_read_dies() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    // Waits below may outlast the relay's default idle timeout (see `RECOVERY`).
    let idle = ["--idle-ms", "600000"];
    let mut s = Setup {
        relays: vec![
            start_relay_with(&nats.urls(), "relay-0", &idle),
            start_relay_with(&nats.urls(), "relay-1", &idle),
        ],
        nats,
    };
    let (mut watch, _) = connect(s.relays[1].tcp()).await;
    subscribe(&mut watch, sub(1, pattern(22, &[], true), Qos::AtLeastOnce)).await;
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let before: Vec<(u32, Envelope)> = (0..5).map(|i| (i, numbered(22, &[1], i))).collect();
    let mut acked = publish_acked(&mut publ, &before, Qos::AtLeastOnce, false).await;
    read_until(&mut watch, acked[4]).await;
    // Acknowledged as read: a wait longer than the relay's ack timeout would otherwise
    // bring them again (QoS 1 redelivery), which is not what this test looks at.
    watch
        .send(&Frame::Ack(Ack {
            seqs: acked.clone(),
        }))
        .await;

    // The server holding relay-1's live read.
    let host = stream_consumers(&s.nats.nodes[0].url())
        .await
        .into_iter()
        .find(|c| c.config.description.as_deref() == Some("whispeer-relay live read: relay-1"))
        .and_then(|c| c.cluster.and_then(|cl| cl.leader))
        .expect("relay-1's live read and its server");
    let node = s
        .nats
        .nodes
        .iter_mut()
        .find(|n| n.name == host)
        .expect("the host is one of the cluster's nodes");
    node.kill();

    // Two servers of three keep the stream (R3); publishes go on (each re-sent on the
    // retryable error while relay-0 reconnects, if the dead server was its own: QoS 2, so a
    // re-send of one the stream did take is answered with its sequence), and reach relay-1.
    // Re-sends are paced (the relay answers at once while it reconnects).
    let mut retry = tokio::time::interval(std::time::Duration::from_millis(20));
    for i in 5..25 {
        let f = pub_frame(numbered(22, &[1], i), Qos::ExactlyOnce, i, false);
        let seq = loop {
            publ.send(&f).await;
            match publ.recv_within(RECOVERY).await {
                Frame::PubAck(a) => break a.seq,
                Frame::Err(e) if e.code == whispeer_protocol::ErrorCode::StoreFailed => {
                    retry.tick().await;
                }
                other => panic!("expected PubAck, got {other:?}"),
            }
        };
        acked.push(seq);
    }
    let last = *acked.last().unwrap();
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(seq, _)| *seq < last) {
        match watch.recv_within(RECOVERY).await {
            Frame::Msg(m) => {
                watch.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
                seen.push((m.seq, number(&m.envelope)));
            }
            // relay-1's bridge to NATS (live-only QoS 0) may have been on the dead server:
            // a relay that reconnects tells its subscribers in a `Gap` (review finding F5).
            // Stored messages come from the stream and are all checked below.
            Frame::Gap(_) => {}
            other => panic!("expected Msg, got {other:?}"),
        }
    }
    let want: Vec<(u64, u32)> = acked[5..].iter().copied().zip(5..25).collect();
    assert_eq!(seen, want, "every later message, in order, once");
}

/// A JetStream store opened in this process on `urls` (as a relay opens it), to drive its
/// durable-owner steps in an exact interleaving.
async fn open_store(
    urls: &str,
    name: &str,
) -> std::sync::Arc<whispeer_relay::store::JetStreamStore> {
    open_store_limited(urls, name, 0).await
}

/// A three-node NATS cluster, its URLs and two stores on it ("relay-a", "relay-b") with
/// `tenant_max_durables` (0: the default); `None` (the test is skipped) without nats-server.
async fn two_stores(
    tenant_max_durables: u64,
) -> Option<(
    NatsCluster,
    String,
    std::sync::Arc<whispeer_relay::store::JetStreamStore>,
    std::sync::Arc<whispeer_relay::store::JetStreamStore>,
)> {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return None;
    };
    let urls = nats.urls();
    let a = open_store_limited(&urls, "relay-a", tenant_max_durables).await;
    let b = open_store_limited(&urls, "relay-b", tenant_max_durables).await;
    Some((nats, urls, a, b))
}

/// Runs a store step on a runtime worker, as a relay's connection task does (the store
/// blocks in place there for its JetStream round trips).
async fn on_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::spawn(async move { f() }).await.expect("store step")
}

/// Review finding 6: the owner of a new durable is the one whose `Sub` creates it. A
/// relay's `Sub` checks the owner (the durable is new), then takes the name and the
/// cluster hold and reads the durable — JetStream round trips — and only then creates it.
/// Another owner's `Sub` for the same name in that window is answered `busy` and changes
/// nothing: the creation records the first owner, which then resumes it, at this relay and
/// at a relay that did not create it, while the other owner is refused. Before, the
/// pending creation was keyed by name alone: the second `Sub` overwrote it, the victim's
/// creation wrote the stranger as owner, and the victim was the one refused.
///
/// Driven at the store (the steps a `Sub` takes, in the problematic order), so the
/// interleaving is exact rather than timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_sub_of_another_owner_does_not_become_the_owner_of_a_new_durable() {
    use whispeer_relay::store::{DurableKey, Store, StoreError, Tenant};
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let a = open_store(&urls, "relay-a").await;
    let victim = "sha256:victim".to_string();
    let thief = "sha256:thief".to_string();
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let d = DurableKey {
        key_id: key(40),
        name: "d".into(),
    };

    let (s, k, v, t) = (a.clone(), d.clone(), victim.clone(), thief.clone());
    on_worker(move || {
        // The victim's `Sub`: the durable is new, its owner is noted for the creation.
        assert!(matches!(s.durable_owner(&k, Some(&v)), Ok(true)));
        // The stranger's `Sub` for the same name before the victim's creation.
        let during = s.durable_owner(&k, Some(&t));
        // The victim's `Sub` goes on and creates it.
        s.set_durable(&k, 0, &tenant)
            .expect("the victim creates it");
        let victim_after = s.durable_owner(&k, Some(&v));
        assert!(
            matches!(victim_after, Ok(true)),
            "the victim after its creation: {victim_after:?}"
        );
        match s.durable_owner(&k, Some(&t)) {
            Err(StoreError::NotAllowed(m)) => assert!(m.contains("someone else"), "{m}"),
            other => panic!("the other owner after the creation: {other:?}"),
        }
        match during {
            Err(e @ StoreError::Busy(_)) => {
                assert_eq!(e.code(), whispeer_protocol::ErrorCode::Busy);
            }
            other => panic!("the other owner's Sub during the creation: {other:?}"),
        }
    })
    .await;

    // The durable record carries the victim (header `Wsp-Owner`): a relay that did not
    // create it enforces the same owner.
    let b = open_store(&urls, "relay-b").await;
    let (s, k, v, t) = (b.clone(), d.clone(), victim.clone(), thief.clone());
    on_worker(move || {
        assert!(matches!(
            s.durable_owner(&k, Some(&t)),
            Err(StoreError::NotAllowed(_))
        ));
        assert!(matches!(s.durable_owner(&k, Some(&v)), Ok(true)));
    })
    .await;
}

/// Review finding 6, second route: creations the relay remembers between a `Sub`'s owner
/// check and its creation are bounded (4,096), and `Sub`s that fail in between (a hold
/// elsewhere, a read) leave theirs behind. Past the bound the map was cleared, dropping
/// the victim's creation in flight, so its durable was created with no owner, for anyone
/// to adopt. Now an entry in flight is never dropped: past the bound a `Sub` creating yet
/// another name is answered `busy`, and the victim's creation keeps its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_creations_past_their_bound_keep_the_owner_of_one_in_flight() {
    use whispeer_relay::store::{DurableKey, Store, StoreError, Tenant};
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let a = open_store(&urls, "relay-a").await;
    let victim = "sha256:victim".to_string();
    let thief = "sha256:thief".to_string();
    let d = DurableKey {
        key_id: key(41),
        name: "d".into(),
    };
    let (s, k, v, t) = (a.clone(), d.clone(), victim.clone(), thief.clone());
    let (taken, busy) = on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(&v)), Ok(true)));
        // Creations that never happen (their `Sub`s failed after the owner check).
        let (mut taken, mut busy) = (0, 0);
        for i in 0..4200 {
            let other = DurableKey {
                key_id: key(41),
                name: format!("left-{i}"),
            };
            match s.durable_owner(&other, Some(&t)) {
                Ok(true) => taken += 1,
                Err(StoreError::Busy(_)) => busy += 1,
                r => panic!("{r:?}"),
            }
        }
        s.set_durable(&k, 0, &Tenant::Address("10.0.0.1".parse().unwrap()))
            .expect("the victim creates it");
        (taken, busy)
    })
    .await;
    eprintln!("{taken} other creations noted, {busy} answered busy past the bound");
    let b = open_store(&urls, "relay-b").await;
    let (s, k, v, t) = (b, d, victim, thief);
    on_worker(move || {
        let stranger = s.durable_owner(&k, Some(&t));
        assert!(
            matches!(stranger, Err(StoreError::NotAllowed(_))),
            "created with its owner, nobody else adopts it: {stranger:?}"
        );
        assert!(matches!(s.durable_owner(&k, Some(&v)), Ok(true)));
    })
    .await;
    assert_eq!(
        (taken, busy),
        (4095, 105),
        "the bound, with the victim's in it"
    );
}

/// Review of 90ea234: a relay whose background read of the durable stream is behind (the
/// durable was created at another relay an instant ago) serves a `Sub` from the record it
/// reads directly — and the floor it then writes must carry that record's owner
/// (`Wsp-Owner`). Before, the owner came only from the background read: the floor went out
/// owner-less, and an owner-less durable is adopted by the next `Sub` naming any owner, at
/// every relay. Driven at the store with relay B's reader held, so B is behind for sure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_written_before_the_reader_caught_up_keeps_the_owner() {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use whispeer_relay::store::{DurableKey, Store, StoreError, Tenant};
    let Some((nats, urls, a, b)) = two_stores(0).await else {
        return;
    };
    // Every record of the durable stream, as written (creation first).
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let mut records = async_nats::jetstream::new(nc)
        .get_stream("WSP_DURABLE")
        .await
        .unwrap()
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    b.hold_durable_reader(true);
    let victim = "sha256:victim".to_string();
    let thief = "sha256:thief".to_string();
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let d = DurableKey {
        key_id: key(42),
        name: "d".into(),
    };
    // The victim's `Sub` at A creates it.
    let (s, k, v, t) = (a.clone(), d.clone(), victim.clone(), tenant.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(&v)), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), None, "new");
        s.set_durable(&k, 0, &t).expect("the victim creates it");
    })
    .await;
    let created = records.next().await.unwrap().unwrap();
    let owner = created
        .headers
        .as_ref()
        .and_then(|h| h.get("Wsp-Owner"))
        .map(|o| o.to_string())
        .expect("the creation names its owner");
    // The victim's next `Sub` (or its acks) at B, whose reader has not seen the creation.
    let (s, k, v, t) = (b.clone(), d.clone(), victim.clone(), thief.clone());
    let tenant_b = tenant.clone();
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(&v)), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), Some(0), "read directly");
        s.set_durable(&k, 5, &tenant_b).expect("a floor");
        match s.durable_owner(&k, Some(&t)) {
            Err(StoreError::NotAllowed(m)) => assert!(m.contains("someone else"), "{m}"),
            other => panic!("the other owner at B: {other:?}"),
        }
    })
    .await;
    let floor = tokio::time::timeout(std::time::Duration::from_secs(10), records.next())
        .await
        .expect("B writes the floor")
        .unwrap()
        .unwrap();
    assert_eq!(&floor.payload[..], b"5", "B's floor");
    assert_eq!(
        floor
            .headers
            .as_ref()
            .and_then(|h| h.get("Wsp-Owner"))
            .map(|o| o.to_string()),
        Some(owner),
        "B's floor carries the owner"
    );
    // A relay started now reads the floor B wrote last: the thief is refused there too.
    b.hold_durable_reader(false);
    let c = open_store(&urls, "relay-c").await;
    on_worker(move || {
        let stranger = c.durable_owner(&d, Some(&thief));
        assert!(
            matches!(stranger, Err(StoreError::NotAllowed(_))),
            "nobody else adopts it: {stranger:?}"
        );
        assert!(matches!(c.durable_owner(&d, Some(&victim)), Ok(true)));
    })
    .await;
}

// Deleting durables with the JetStream store: a deletion marker replaces the durable's
// record in `WSP_DURABLE`, so every relay (and one started later) sees it gone.

/// What a client that deletes durables offers.
const DELETING: u64 = whispeer_protocol::frame::features::AT_LEAST_ONCE
    | whispeer_protocol::frame::features::REPLAY
    | whispeer_protocol::frame::features::DURABLE
    | whispeer_protocol::frame::features::DURABLE_DELETE;

/// A client greeted offering [`DELETING`]; the JetStream relay must grant `DURABLE_DELETE`.
async fn connect_deleting(addr: SocketAddr) -> Client {
    let mut c = Client::tcp(addr).await;
    let w = c.hello_with(DELETING).await;
    assert_eq!(
        w.features & whispeer_protocol::frame::features::DURABLE_DELETE,
        whispeer_protocol::frame::features::DURABLE_DELETE,
        "a JetStream relay grants DURABLE_DELETE: {w:?}"
    );
    c
}

/// Durable `name` on everything under key `k`, owned by the secret `[secret; 16]`.
fn durable_sub(sub_id: u64, k: u8, name: &str, secret: u8) -> Sub {
    let mut d = sub(sub_id, pattern(k, &[], true), Qos::AtLeastOnce);
    d.durable = Some(name.into());
    d.owner = Some(Bytes::from(vec![secret; 16]));
    d
}

/// Sends `d`; the relay's answer: `Ok` for its `SubOk`, else its non-fatal `Err`.
async fn sub_answer(c: &mut Client, d: &Sub) -> Result<(), whispeer_protocol::frame::ErrFrame> {
    c.send(&Frame::Sub(d.clone())).await;
    loop {
        match c.recv().await {
            Frame::SubOk(ok) if ok.sub_id == d.sub_id => return Ok(()),
            Frame::Err(e) if e.sub_id == Some(d.sub_id) => {
                assert!(!e.fatal, "{e:?}");
                return Err(e);
            }
            Frame::Msg(_) | Frame::ReplayDone(_) | Frame::PubAck(_) => {}
            other => panic!("Sub {}: unexpected {other:?}", d.sub_id),
        }
    }
}

/// Sends `d` until it is answered `SubOk` (bounded by `TIMEOUT`), each refusal meanwhile
/// being one of `retry` (the codes of a state the cluster has not reached yet).
async fn sub_until_ok(c: &mut Client, d: &Sub, retry: &[whispeer_protocol::ErrorCode]) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match sub_answer(c, d).await {
            Ok(()) => return,
            Err(e) => {
                assert!(retry.contains(&e.code), "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "still refused after {TIMEOUT:?}: {e:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// `Unsub {sub_id, delete: true}`, then a `Ping`, read up to its `Pong`: the `Err` naming
/// `sub_id` sent meanwhile, if any.
async fn delete_and_pong(
    c: &mut Client,
    sub_id: u64,
) -> Option<whispeer_protocol::frame::ErrFrame> {
    c.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
        sub_id,
        delete: Some(true),
    }))
    .await;
    c.send(&Frame::Ping(whispeer_protocol::frame::Ping {
        nonce: 0xde1,
    }))
    .await;
    let mut err = None;
    loop {
        match c.recv().await {
            Frame::Pong(p) if p.nonce == 0xde1 => return err,
            Frame::Err(e) if e.sub_id == Some(sub_id) => {
                assert!(!e.fatal, "{e:?}");
                err = Some(e);
            }
            Frame::Msg(_) | Frame::ReplayDone(_) | Frame::PubAck(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Publishes a probe on `[key(k), 1]` from `publ` (number `n`) and returns the numbers of
/// what `c` got before it: the replayed backlog of a resumed durable, none for a new one.
async fn before_probe(c: &mut Client, publ: &mut Client, k: u8, n: u32) -> Vec<u32> {
    let seq = publish_acked(publ, &[(n, numbered(k, &[1], n))], Qos::AtLeastOnce, false).await;
    read_until(c, seq[0])
        .await
        .iter()
        .map(|m| number(&m.envelope))
        .filter(|got| *got != n)
        .collect()
}

/// Polls `/status` until its store counts `n` durables (bounded by `TIMEOUT`).
async fn wait_durables(relay: &BinRelay, n: u64) {
    relay
        .wait_status(&format!("{n} durables"), |s| s.store.durables == n)
        .await;
}

/// `Unsub {delete}` at relay A deletes the durable for the whole cluster: relay B, which
/// counted it against the tenant's one durable name, gives the count back (learned from
/// `WSP_DURABLE`), and a `Sub` of the name at B — by another owner even: the owner went
/// with the durable — starts a new durable, without the old one's unacknowledged backlog.
#[tokio::test]
async fn a_durable_deleted_at_one_relay_is_gone_at_every_relay_and_frees_its_quota() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let quota = ["--tenant-max-durables", "1", "--durable-idle-ms", "0"];
    let a = start_relay_with(&urls, "relay-a", &quota);
    // Logged: B's "durable record read" line is the event that it counts A's durable.
    let mut b = start_logged_relay_with(&urls, "relay-b", &quota);
    let (mut publ, _) = connect(b.tcp()).await;
    let mut ca = connect_deleting(a.tcp()).await;
    sub_answer(&mut ca, &durable_sub(1, 21, "d", 1))
        .await
        .expect("d created at A");
    b.wait_log(&["durable record read", "durables=1"]).await;
    let mut cb = connect_deleting(b.tcp()).await;
    let e = sub_answer(&mut cb, &durable_sub(2, 21, "e", 1))
        .await
        .expect_err("B counts A's durable");
    assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");

    // Delivered, never acknowledged: a resumed "d" would replay them.
    let backlog: Vec<(u32, Envelope)> = (0..3).map(|i| (i, numbered(21, &[1], i))).collect();
    let seqs = publish_acked(&mut publ, &backlog, Qos::AtLeastOnce, false).await;
    assert_eq!(read_until(&mut ca, seqs[2]).await.len(), 3);
    assert!(delete_and_pong(&mut ca, 1).await.is_none(), "deleted");

    // B learns of the deletion from the durable stream: "e" fits its quota then.
    sub_until_ok(
        &mut cb,
        &durable_sub(2, 21, "e", 1),
        &[whispeer_protocol::ErrorCode::QuotaExceeded],
    )
    .await;
    wait_durables(&a, 1).await; // A counts "e" (B's), not "d"
    assert!(
        delete_and_pong(&mut cb, 2).await.is_none(),
        "e deleted at B"
    );
    // "d" again, at B and by another owner: a new durable (A's hold may still be released).
    sub_until_ok(
        &mut cb,
        &durable_sub(3, 21, "d", 2),
        &[whispeer_protocol::ErrorCode::Busy],
    )
    .await;
    assert_eq!(
        before_probe(&mut cb, &mut publ, 21, 100).await,
        Vec::<u32>::new(),
        "a new durable: live only, not the deleted one's backlog"
    );
}

/// Only the holder deletes, and only the owner can hold: another owner's `Sub` at relay B
/// is refused (`not_allowed`), so its `Unsub {delete}` names no subscription; the durable
/// stays and resumes for its owner at B — who deletes it there, at a relay that did not
/// create it. Then another owner may create the name anew at A, without its backlog.
#[tokio::test]
async fn a_non_owner_cannot_delete_a_durable_but_its_owner_can_at_another_relay() {
    let Some(s) = Setup::start(2) else { return };
    let (mut publ, _) = connect(s.relays[1].tcp()).await;
    let mut leases = lease_watch(&s.nats).await;
    let mut owner_a = connect_deleting(s.relays[0].tcp()).await;
    sub_answer(&mut owner_a, &durable_sub(1, 22, "n", 1))
        .await
        .expect("n created at A");
    let backlog: Vec<(u32, Envelope)> = (0..2).map(|i| (i, numbered(22, &[1], i))).collect();
    let seqs = publish_acked(&mut publ, &backlog, Qos::AtLeastOnce, false).await;
    read_until(&mut owner_a, seqs[1]).await;
    drop(owner_a); // released, not deleted, nothing acknowledged
    wait_released(&mut leases).await;

    let mut other = connect_deleting(s.relays[1].tcp()).await;
    let e = sub_answer(&mut other, &durable_sub(7, 22, "n", 2))
        .await
        .expect_err("another owner's Sub");
    assert_eq!(e.code, whispeer_protocol::ErrorCode::NotAllowed, "{e:?}");
    let e = delete_and_pong(&mut other, 7)
        .await
        .expect("no subscription to delete");
    assert_eq!(
        e.code,
        whispeer_protocol::ErrorCode::UnknownSubscription,
        "{e:?}"
    );

    let mut owner_b = connect_deleting(s.relays[1].tcp()).await;
    sub_answer(&mut owner_b, &durable_sub(1, 22, "n", 1))
        .await
        .expect("the owner resumes n at B");
    assert_eq!(
        before_probe(&mut owner_b, &mut publ, 22, 100).await,
        vec![0, 1],
        "resumed with its backlog: the non-owner deleted nothing"
    );
    assert!(
        delete_and_pong(&mut owner_b, 1).await.is_none(),
        "deleted at B"
    );
    wait_released(&mut leases).await;

    let mut other_a = connect_deleting(s.relays[0].tcp()).await;
    sub_answer(&mut other_a, &durable_sub(2, 22, "n", 2))
        .await
        .expect("the name is free for anyone");
    assert_eq!(
        before_probe(&mut other_a, &mut publ, 22, 101).await,
        Vec::<u32>::new(),
        "a new durable"
    );
}

/// One record of `WSP_DURABLE` as the test's own ordered read sees it.
struct DurableEvent {
    subject: String,
    deleted: bool,
    /// NATS timestamp, Unix ms.
    at: i128,
}

async fn durable_events(nats: &NatsCluster) -> async_nats::jetstream::consumer::pull::Ordered {
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    js.get_stream("WSP_DURABLE")
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap()
}

async fn next_durable_event(
    watch: &mut async_nats::jetstream::consumer::pull::Ordered,
) -> DurableEvent {
    let m = tokio::time::timeout(TIMEOUT, watch.next())
        .await
        .expect("a durable record within TIMEOUT")
        .expect("durable stream")
        .unwrap();
    DurableEvent {
        subject: m.subject.to_string(),
        deleted: m
            .headers
            .as_ref()
            .is_some_and(|h| h.get("Wsp-Deleted").is_some()),
        at: m.info().unwrap().published.unix_timestamp_nanos() / 1_000_000,
    }
}

/// Idle expiry across relays (`--durable-idle-ms 1500`): a durable released at relay A is
/// deleted once idle that long (by whichever relay's sweep), for every relay; durables held
/// all along — one at A, one at B — are not, for a whole further idle time during which
/// their holders refresh their records. A relay started afterwards (reading the stream
/// afresh, as after a restart) sees the durable gone: its name is free, with no backlog.
#[tokio::test]
async fn an_idle_durable_is_deleted_for_every_relay_and_a_held_one_never() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let idle = ["--durable-idle-ms", "1500"];
    let a = start_relay_with(&urls, "relay-a", &idle);
    let b = start_relay_with(&urls, "relay-b", &idle);
    let mut events = durable_events(&nats).await;
    let (mut publ, _) = connect(b.tcp()).await;
    let mut holder_a = connect_deleting(a.tcp()).await;
    sub_answer(&mut holder_a, &durable_sub(1, 23, "held-a", 1))
        .await
        .expect("held at A");
    let mut holder_b = connect_deleting(b.tcp()).await;
    sub_answer(&mut holder_b, &durable_sub(1, 23, "held-b", 1))
        .await
        .expect("held at B");
    let mut c = connect_deleting(a.tcp()).await;
    sub_answer(&mut c, &durable_sub(1, 23, "idle", 1))
        .await
        .expect("idle created at A");
    let backlog: Vec<(u32, Envelope)> = (0..3).map(|i| (i, numbered(23, &[1], i))).collect();
    let seqs = publish_acked(&mut publ, &backlog, Qos::AtLeastOnce, false).await;
    read_until(&mut c, seqs[2]).await;
    drop(c); // released with its backlog unacknowledged

    // The three records, then the deletion marker of one of them.
    let mut held: HashSet<String> = HashSet::new();
    let (gone, gone_at) = loop {
        let e = next_durable_event(&mut events).await;
        if e.deleted {
            break (e.subject, e.at);
        }
        held.insert(e.subject);
    };
    assert_eq!(held.len(), 3, "three durables written before the deletion");
    held.remove(&gone);
    // A further idle time and more: both held durables rewritten by their holders after it,
    // and no marker on them meanwhile.
    let mut refreshed = HashSet::new();
    while refreshed.len() < 2 {
        let e = next_durable_event(&mut events).await;
        assert!(
            !(e.deleted && held.contains(&e.subject)),
            "a held durable was deleted"
        );
        if held.contains(&e.subject) && e.at >= gone_at + 1500 {
            refreshed.insert(e.subject);
        }
    }
    wait_durables(&a, 2).await;
    wait_durables(&b, 2).await;
    // Still held where they were: not taken by anyone's sweep.
    let mut probe = connect_deleting(b.tcp()).await;
    let e = sub_answer(&mut probe, &durable_sub(9, 23, "held-a", 1))
        .await
        .expect_err("held at A");
    assert_eq!(e.code, whispeer_protocol::ErrorCode::Busy, "{e:?}");

    // A relay started now reads the stream afresh: "idle" is gone there too, owner and all.
    let c_relay = start_relay_with(&urls, "relay-c", &idle);
    let mut fresh = connect_deleting(c_relay.tcp()).await;
    sub_answer(&mut fresh, &durable_sub(2, 23, "idle", 2))
        .await
        .expect("the idle durable's name is free");
    assert_eq!(
        before_probe(&mut fresh, &mut publ, 23, 100).await,
        Vec::<u32>::new(),
        "a new durable, not the deleted one's backlog"
    );
    drop((holder_a, holder_b));
}

/// The test's own handle on `WSP_DURABLE`.
async fn durable_stream(nats: &NatsCluster) -> async_nats::jetstream::stream::Stream {
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    async_nats::jetstream::new(nc)
        .get_stream("WSP_DURABLE")
        .await
        .unwrap()
}

/// The last message of `WSP_DURABLE` on `subject`: whether it is a deletion marker, `None`
/// when the subject holds no message.
async fn last_durable_record(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
) -> Option<bool> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Some(m.headers.get("Wsp-Deleted").is_some()),
        Err(e) if e.kind() == K::NoMessageFound => None,
        Err(e) => panic!("durable stream read: {e}"),
    }
}

/// Reads `events` up to a live record on a subject not in `known` (one durable being
/// created at a time: its subject), which it adds to `known`.
async fn next_new_durable(
    events: &mut async_nats::jetstream::consumer::pull::Ordered,
    known: &mut HashSet<String>,
) -> String {
    loop {
        let e = next_durable_event(events).await;
        if !e.deleted && known.insert(e.subject.clone()) {
            return e.subject;
        }
    }
}

/// Reads `events` up to the deletion markers on all of `subjects`; the markers, in the
/// order of `subjects`.
async fn next_markers(
    events: &mut async_nats::jetstream::consumer::pull::Ordered,
    subjects: &[&str],
) -> Vec<DurableEvent> {
    let mut found: Vec<Option<DurableEvent>> = subjects.iter().map(|_| None).collect();
    while found.iter().any(Option::is_none) {
        let e = next_durable_event(events).await;
        if let Some(i) = subjects.iter().position(|s| e.deleted && *s == e.subject) {
            found[i] = Some(e);
        }
    }
    found.into_iter().flatten().collect()
}

/// `store.durable_marker_keep_ms`: a deletion marker stays in `WSP_DURABLE` while younger
/// than the keep time, then a sweep purges its subject. Relay A keeps markers an hour and
/// sweeps every 250 ms (`--durable-idle-ms 1000`): the markers of "d" and "f" (deleted with
/// a backlog) outlive a whole sweep of A's run when they were older than a second — the
/// sweep that deleted idle "e1", known complete once the later sweep that deleted "e2"
/// (released after e1's marker) wrote its marker. Relay B, keeping markers a second,
/// purges all four once that old: the subjects hold nothing, nor does the stream (the
/// deleted records went when their markers took their place). A relay started afterwards
/// knows no "d": another owner creates it, without the deleted one's backlog; and A, which
/// had read f's marker, creates "f" anew over the emptied subject.
#[tokio::test]
async fn deletion_markers_stay_for_the_keep_time_then_are_purged() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let a = start_relay_with(
        &urls,
        "relay-a",
        &[
            "--durable-idle-ms",
            "1000",
            "--durable-marker-keep-ms",
            "3600000",
        ],
    );
    let mut events = durable_events(&nats).await;
    let stream = durable_stream(&nats).await;
    let (mut publ, _) = connect(a.tcp()).await;
    let mut known = HashSet::new();

    // "d" and "f": created, a backlog delivered and never acknowledged, deleted.
    let mut cd = connect_deleting(a.tcp()).await;
    sub_answer(&mut cd, &durable_sub(1, 24, "d", 1))
        .await
        .expect("d created at A");
    let d = next_new_durable(&mut events, &mut known).await;
    let mut cf = connect_deleting(a.tcp()).await;
    sub_answer(&mut cf, &durable_sub(1, 24, "f", 1))
        .await
        .expect("f created at A");
    let f = next_new_durable(&mut events, &mut known).await;
    let backlog: Vec<(u32, Envelope)> = (0..3).map(|i| (i, numbered(24, &[1], i))).collect();
    let seqs = publish_acked(&mut publ, &backlog, Qos::AtLeastOnce, false).await;
    for c in [&mut cd, &mut cf] {
        assert_eq!(read_until(c, seqs[2]).await.len(), 3);
        assert!(delete_and_pong(c, 1).await.is_none(), "deleted");
    }
    next_markers(&mut events, &[&d, &f]).await;

    // Two sweeps of A deleting an idle durable each, the second after the first's marker.
    let mut gone = vec![d.clone(), f.clone()];
    let mut last_marker = None;
    for name in ["e1", "e2"] {
        let mut c = connect_deleting(a.tcp()).await;
        sub_answer(&mut c, &durable_sub(1, 24, name, 1))
            .await
            .expect("created at A");
        let e = next_new_durable(&mut events, &mut known).await;
        drop(c); // released: deleted once idle a second
        last_marker = next_markers(&mut events, &[&e]).await.pop();
        gone.push(e);
    }
    for s in [&d, &f] {
        assert_eq!(
            last_durable_record(&stream, s).await,
            Some(true),
            "a marker younger than A's keep time stays through A's sweeps"
        );
    }

    // B keeps markers a second: its sweeps purge them all, each once that old.
    let _b = start_relay_with(&urls, "relay-b", &["--durable-marker-keep-ms", "1000"]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    for s in &gone {
        while last_durable_record(&stream, s).await.is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the marker on {s} is still there after {TIMEOUT:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let e2 = last_marker.expect("e2's marker");
    assert!(
        wall_ms() >= e2.at + 1000,
        "e2's marker purged before it was a second old"
    );
    assert_eq!(
        stream.get_info().await.unwrap().state.messages,
        0,
        "nothing left of the deleted durables: markers and records purged"
    );

    // A relay started after the purge: "d" is no durable there.
    let c_relay = start_relay_with(&urls, "relay-c", &[]);
    let mut fresh = connect_deleting(c_relay.tcp()).await;
    sub_answer(&mut fresh, &durable_sub(1, 24, "d", 2))
        .await
        .expect("d is free for another owner at a relay started after the purge");
    assert_eq!(
        before_probe(&mut fresh, &mut publ, 24, 100).await,
        Vec::<u32>::new(),
        "a new durable, not the deleted one's backlog"
    );
    // A, which had read f's marker, creates "f" anew over the emptied subject.
    let mut again = connect_deleting(a.tcp()).await;
    sub_answer(&mut again, &durable_sub(1, 24, "f", 2))
        .await
        .expect("f created again at A");
    assert_eq!(
        before_probe(&mut again, &mut publ, 24, 101).await,
        Vec::<u32>::new(),
        "a new durable, not the deleted one's backlog"
    );
    assert_eq!(
        last_durable_record(&stream, &f).await,
        Some(false),
        "f's new record"
    );
}

// Adversarial review of the durable stream's background reader (the
// `hold_durable_reader` hook): a relay whose reader is behind, or whose direct reads are
// ahead of it.

/// [`open_store`] with `tenant_max_durables` set (0: the default).
async fn open_store_limited(
    urls: &str,
    name: &str,
    tenant_max_durables: u64,
) -> std::sync::Arc<whispeer_relay::store::JetStreamStore> {
    use whispeer_relay::config::{ClusterConfig, ClusterStore, StoreConfig};
    let cluster = ClusterConfig {
        urls: urls.split(',').map(str::to_string).collect(),
        name: Some(name.into()),
        store: ClusterStore::Jetstream,
        replicas: 3,
        ..ClusterConfig::default()
    };
    let mut store = StoreConfig {
        // As `jetstream_relay_args`: the stream's byte limit is reserved up front.
        total_max_bytes: 256 << 20,
        ..StoreConfig::default()
    };
    if tenant_max_durables > 0 {
        store.tenant_max_durables = tenant_max_durables;
    }
    let s = whispeer_relay::store::JetStreamStore::open(&cluster, &store)
        .await
        .expect("the JetStream store opens");
    std::sync::Arc::new(s)
}

/// Lets relay `b`'s held durable reader go on and waits until it has applied every record
/// written so far: a sentinel durable (named `sentinel`, key id 99) is created at `b` and
/// deleted at `a`; `b` reports it gone (`take_gone`, whose receiver is `gone`) once its
/// reader applies the marker, the stream's last record.
async fn catch_up(
    a: &std::sync::Arc<whispeer_relay::store::JetStreamStore>,
    b: &std::sync::Arc<whispeer_relay::store::JetStreamStore>,
    gone: &mut tokio::sync::mpsc::UnboundedReceiver<whispeer_relay::store::DurableKey>,
    sentinel: &str,
) {
    use whispeer_relay::store::{DurableKey, Store, Tenant};
    let s = DurableKey {
        key_id: key(99),
        name: sentinel.into(),
    };
    let (sa, sb, k) = (a.clone(), b.clone(), s.clone());
    on_worker(move || {
        assert!(matches!(sb.durable_owner(&k, None), Ok(true)));
        assert_eq!(sb.durable(&k).expect("read"), None);
        sb.set_durable(&k, 0, &Tenant::Address("10.9.9.9".parse().unwrap()))
            .expect("the sentinel is created");
        assert!(sa.delete_durable(&k).expect("the sentinel is deleted"));
    })
    .await;
    b.hold_durable_reader(false);
    loop {
        let k = tokio::time::timeout(TIMEOUT, gone.recv())
            .await
            .expect("relay B's reader reaches the sentinel's marker")
            .expect("gone channel");
        if k == s {
            return;
        }
    }
}

/// A durable deleted at relay A and created again (same name) at relay B before B's
/// reader has read the deleted one's records. When the reader catches up it applies the
/// deleted durable's floor as a floor of the new one (the in-memory floor is a maximum),
/// and it skips the deletion marker (B knows a newer record). B's release of the hold
/// rewrites the record (the idle clock) with that in-memory floor: the new durable's floor
/// jumps to the deleted one's, and every message in between is skipped on its next resume.
/// (How it was; the newest record known now decides, and a refresh rewrites its floor.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_durables_floor_read_late_is_not_written_into_its_successor() {
    use whispeer_relay::store::{DurableKey, HoldLost, Store, Tenant};
    let Some((nats, urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut gone_b = b.take_gone().expect("gone receiver");
    let mut leases = lease_watch(&nats).await;
    b.hold_durable_reader(true);
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let d = DurableKey {
        key_id: key(43),
        name: "d".into(),
    };
    // The first owner's durable at A: acknowledged up to 100, then deleted.
    let (s, k, t) = (a.clone(), d.clone(), tenant.clone());
    on_worker(move || {
        assert!(matches!(
            s.durable_owner(&k, Some("sha256:first")),
            Ok(true)
        ));
        assert_eq!(s.durable(&k).expect("read"), None, "new");
        s.set_durable(&k, 90, &t).expect("created");
        s.set_durable(&k, 100, &t).expect("a floor");
        assert!(
            s.delete_durable(&k).expect("deleted"),
            "there was a durable"
        );
    })
    .await;
    // Another owner creates the name at B, replaying from the start (floor 0), acks up to 3.
    let (s, k, t) = (b.clone(), d.clone(), tenant.clone());
    let (tx, _lost) = tokio::sync::mpsc::unbounded_channel();
    on_worker(move || {
        assert!(matches!(
            s.durable_owner(&k, Some("sha256:second")),
            Ok(true)
        ));
        s.hold_durable(&k, &HoldLost::new(tx, 1))
            .expect("held at B");
        assert_eq!(
            s.durable(&k).expect("read"),
            None,
            "the deleted one is gone"
        );
        s.set_durable(&k, 0, &t).expect("created again");
        s.set_durable(&k, 3, &t).expect("a floor");
    })
    .await;
    catch_up(&a, &b, &mut gone_b, "sentinel-43").await;
    // The subscription ends at B: the hold goes back (its record rewritten first).
    b.release_hold(&d);
    wait_released(&mut leases).await;
    let c = open_store(&urls, "relay-c").await;
    let floor = on_worker(move || c.durable(&d).expect("read")).await;
    assert_eq!(
        floor,
        Some(3),
        "the new durable's floor, not the deleted one's (messages 4..=100 would be skipped)"
    );
}

/// A durable deleted by its owner at relay A and created again there without an owner
/// (a `Sub` naming none), while relay B's reader is behind. B had checked the first owner
/// (a `Sub` of theirs at B: the owner is noted from the record read directly). B then
/// reads the new, owner-less record directly, but keeps the deleted durable's owner: the
/// new durable's own subscriber is refused at B as "someone else" — and still is once B's
/// reader caught up (it skips the marker: B knows a newer record). (How it was; an owner
/// learned from an older record goes when a newer owner-less one is read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_created_again_without_an_owner_does_not_keep_the_deleted_ones_at_a_relay_behind()
{
    use whispeer_relay::store::{DurableKey, Store, Tenant};
    let Some((_nats, _urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut gone_b = b.take_gone().expect("gone receiver");
    b.hold_durable_reader(true);
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let d = DurableKey {
        key_id: key(44),
        name: "d".into(),
    };
    let first = "sha256:first";
    let (s, k, t) = (a.clone(), d.clone(), tenant.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(first)), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), None, "new");
        s.set_durable(&k, 0, &t).expect("created");
    })
    .await;
    // The first owner's `Sub` at B (refused later, say, held at A): its owner check.
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || assert!(matches!(s.durable_owner(&k, Some(first)), Ok(true)))).await;
    // Deleted at A; a `Sub` naming no owner creates the name again there.
    let (s, k, t) = (a.clone(), d.clone(), tenant.clone());
    on_worker(move || {
        assert!(s.delete_durable(&k).expect("deleted"));
        assert!(matches!(s.durable_owner(&k, None), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), None, "gone");
        s.set_durable(&k, 0, &t).expect("created again");
        assert!(matches!(s.durable_owner(&k, None), Ok(true)), "at A");
    })
    .await;
    // Its subscriber at B.
    let (s, k) = (b.clone(), d.clone());
    let behind = on_worker(move || s.durable_owner(&k, None)).await;
    catch_up(&a, &b, &mut gone_b, "sentinel-44").await;
    let (s, k) = (b.clone(), d.clone());
    let caught_up = on_worker(move || s.durable_owner(&k, None)).await;
    assert!(
        matches!((&behind, &caught_up), (Ok(true), Ok(true))),
        "the new durable's subscriber at B, reader behind: {behind:?}; caught up: {caught_up:?}"
    );
}

/// Durable quota per tenant (1 here) at a relay whose reader is behind: tenant T1's
/// durable "d" is known at relay B (read directly), deleted at A and created again there
/// by tenant T2; B reads the new record directly (T2's subscriber at B) before its reader
/// reaches the deletion marker, which it then skips (B knows a newer record). B's ledger
/// keeps "d" on T1's account: T2 creates a second durable at B past its quota (A refuses
/// it), and T1, with no durable in the cluster, is refused one at B. (How it was; the
/// count follows the newest record's tenant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_created_again_by_another_tenant_counts_for_that_tenant_at_a_relay_behind() {
    use whispeer_relay::store::{DurableKey, Store, StoreError, Tenant};
    let Some((_nats, _urls, a, b)) = two_stores(1).await else {
        return;
    };
    let mut gone_b = b.take_gone().expect("gone receiver");
    let t1 = Tenant::Address("10.0.0.1".parse().unwrap());
    let t2 = Tenant::Address("10.0.0.2".parse().unwrap());
    let named = |n: &str| DurableKey {
        key_id: key(45),
        name: n.into(),
    };
    let d = named("d");
    let (s, k, t) = (a.clone(), d.clone(), t1.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some("sha256:one")), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), None, "new");
        s.set_durable(&k, 0, &t).expect("T1 creates d");
    })
    .await;
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || assert_eq!(s.durable(&k).expect("read"), Some(0), "B knows d")).await;
    b.hold_durable_reader(true);
    let (s, k, t) = (a.clone(), d.clone(), t2.clone());
    on_worker(move || {
        assert!(s.delete_durable(&k).expect("T1 deletes d"));
        assert!(matches!(s.durable_owner(&k, Some("sha256:two")), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), None, "gone");
        s.set_durable(&k, 0, &t).expect("T2 creates d");
    })
    .await;
    // T2's subscriber of d at B reads the new record.
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some("sha256:two")), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), Some(0));
    })
    .await;
    // At A (caught up), T2 is at its quota.
    let (s, f, t) = (a.clone(), named("f"), t2.clone());
    let at_a = on_worker(move || {
        assert!(matches!(s.durable_owner(&f, Some("sha256:two")), Ok(true)));
        assert_eq!(s.durable(&f).expect("read"), None);
        s.set_durable(&f, 0, &t)
    })
    .await;
    assert!(
        matches!(at_a, Err(StoreError::QuotaExceeded(_))),
        "T2 at A: {at_a:?}"
    );
    catch_up(&a, &b, &mut gone_b, "sentinel-45").await;
    let (s, f, e, tt1, tt2) = (b.clone(), named("f"), named("e"), t1.clone(), t2.clone());
    let (t2_second, t1_first) = on_worker(move || {
        assert!(matches!(s.durable_owner(&f, Some("sha256:two")), Ok(true)));
        assert_eq!(s.durable(&f).expect("read"), None);
        let t2_second = s.set_durable(&f, 0, &tt2);
        assert!(matches!(s.durable_owner(&e, Some("sha256:one")), Ok(true)));
        assert_eq!(s.durable(&e).expect("read"), None);
        let t1_first = s.set_durable(&e, 0, &tt1);
        (t2_second, t1_first)
    })
    .await;
    assert!(
        matches!(
            (&t2_second, &t1_first),
            (Err(StoreError::QuotaExceeded(_)), Ok(()))
        ),
        "at B: T2's second durable {t2_second:?} (quota 1), T1's only one {t1_first:?}"
    );
}

/// nats-server before 2.9.21 lets two relays' conditional writes of one durable hold pass
/// when they reach the stream at the same moment (issue 4320): both would hold it. After
/// its write a relay writes a barrier record in the lease stream and reads the hold again;
/// a record after its own is the other relay's, which holds it. Driven at one store with
/// that step held: the racing relay's record lands after A's write (written here as the
/// race would); let go, A's take is refused (`busy`: "just taken at another relay").
/// Before: A held it too (and so did the other relay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_hold_taken_at_once_at_another_relay_is_not_held_twice() {
    use whispeer_relay::store::{DurableKey, HoldLost, Store, StoreError};
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let a = open_store(&nats.urls(), "relay-a").await;
    a.confirm_writes(true);
    a.hold_write_confirms(true);
    let mut parked = a.write_confirms_parked();
    let d = DurableKey {
        key_id: key(71),
        name: "d".into(),
    };
    let (s, k) = (a.clone(), d.clone());
    let (tx, _lost) = tokio::sync::mpsc::unbounded_channel();
    let take = tokio::spawn(on_worker(move || s.hold_durable(&k, &HoldLost::new(tx, 1))));
    tokio::time::timeout(TIMEOUT, parked.wait_for(|n| *n == 1))
        .await
        .expect("A's take waits after its write")
        .unwrap();
    // A's record is the stream's only one: the racing relay's lands after it.
    let js = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await.unwrap());
    let mut leases = js.get_stream("WSP_LEASES").await.unwrap();
    let last = leases.info().await.unwrap().state.last_sequence;
    let ours = leases.get_raw_message(last).await.unwrap();
    assert!(!ours.subject.contains(".barrier."), "{}", ours.subject);
    js.publish(
        ours.subject.to_string(),
        Bytes::from_static(b"0123456789abcdef:1 6000"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    a.hold_write_confirms(false);
    let r = take.await.unwrap();
    assert!(
        matches!(&r, Err(StoreError::Held(m)) if m.contains("just taken at another relay")),
        "{r:?}"
    );
}

/// Review finding 6 across relays: a `Sub` at relay B finds the name new (its owner check
/// passes: nothing to check), then — before it takes the cluster hold — another owner's
/// `Sub` at relay A creates the durable, acks and ends. B's `Sub` takes the hold and reads
/// the durable: it resumes the other owner's durable (its backlog, and its acks move that
/// durable's floor), never having been checked against its owner. (How it was; now
/// that read refuses it: `NotAllowed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_that_found_the_name_new_does_not_resume_a_durable_another_owner_created_meanwhile() {
    use whispeer_relay::store::{DurableKey, HoldLost, Store, Tenant};
    let Some((nats, _urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut leases = lease_watch(&nats).await;
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let d = DurableKey {
        key_id: key(46),
        name: "d".into(),
    };
    // The stranger's `Sub` at B: the name is new.
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || {
        assert!(matches!(
            s.durable_owner(&k, Some("sha256:thief")),
            Ok(true)
        ))
    })
    .await;
    // The victim's `Sub` at A creates it, acks up to 7, ends.
    let (s, k, t) = (a.clone(), d.clone(), tenant.clone());
    let (tx, _lost_a) = tokio::sync::mpsc::unbounded_channel();
    on_worker(move || {
        assert!(matches!(
            s.durable_owner(&k, Some("sha256:victim")),
            Ok(true)
        ));
        s.hold_durable(&k, &HoldLost::new(tx, 1))
            .expect("held at A");
        assert_eq!(s.durable(&k).expect("read"), None, "new");
        s.set_durable(&k, 0, &t).expect("created");
        s.set_durable(&k, 7, &t).expect("a floor");
        s.release_hold(&k);
    })
    .await;
    wait_released(&mut leases).await;
    // The stranger's `Sub` goes on at B: the hold, then the durable's floor.
    let (s, k) = (b.clone(), d.clone());
    let (tx, _lost_b) = tokio::sync::mpsc::unbounded_channel();
    let found = on_worker(move || {
        s.hold_durable(&k, &HoldLost::new(tx, 1))
            .expect("held at B");
        s.durable_for(&k, Some("sha256:thief"))
    })
    .await;
    assert!(
        matches!(found, Err(whispeer_relay::store::StoreError::NotAllowed(_))),
        "the stranger's Sub (checked as the creator of a new name) resumes the victim's \
         durable: {found:?}"
    );
}

/// A durable deleted at relay A while relay B's reader is behind (B had resumed it, so it
/// knows its floor and owner): at B the name is new — neither resumed with the deleted
/// floor nor refused as the deleted owner's — and its new owner's creation there stands
/// (owner and floor), at B once its reader caught up and at a relay started afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_deleted_while_a_relay_is_behind_is_new_there_for_any_owner() {
    use whispeer_relay::store::{DurableKey, Store, StoreError, Tenant};
    let Some((_nats, urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut gone_b = b.take_gone().expect("gone receiver");
    b.hold_durable_reader(true);
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let d = DurableKey {
        key_id: key(47),
        name: "d".into(),
    };
    let (first, second) = ("sha256:first", "sha256:second");
    let (s, k, t) = (a.clone(), d.clone(), tenant.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(first)), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), None, "new");
        s.set_durable(&k, 0, &t).expect("created");
        s.set_durable(&k, 5, &t).expect("a floor");
    })
    .await;
    // Resumed at B (read directly), then deleted at A.
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(first)), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), Some(5), "resumed at B");
    })
    .await;
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || assert!(s.delete_durable(&k).expect("deleted"))).await;
    // At B: new for another owner, with no backlog; created there at 40.
    let (s, k, t) = (b.clone(), d.clone(), tenant.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(second)), Ok(true)));
        assert_eq!(
            s.durable(&k).expect("read"),
            None,
            "not the deleted one's floor"
        );
        s.set_durable(&k, 40, &t).expect("created again at B");
        match s.durable_owner(&k, Some(first)) {
            Err(StoreError::NotAllowed(_)) => {}
            other => panic!("the deleted durable's owner at B: {other:?}"),
        }
    })
    .await;
    catch_up(&a, &b, &mut gone_b, "sentinel-47").await;
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || {
        assert!(matches!(
            s.durable_owner(&k, Some(first)),
            Err(StoreError::NotAllowed(_))
        ));
        assert!(matches!(s.durable_owner(&k, Some(second)), Ok(true)));
        assert_eq!(s.durable(&k).expect("read"), Some(40), "caught up");
    })
    .await;
    let c = open_store(&urls, "relay-c").await;
    on_worker(move || {
        assert!(matches!(
            c.durable_owner(&d, Some(first)),
            Err(StoreError::NotAllowed(_))
        ));
        assert!(matches!(c.durable_owner(&d, Some(second)), Ok(true)));
        assert_eq!(c.durable(&d).expect("read"), Some(40), "at a new relay");
    })
    .await;
}

/// A `Sub`'s store steps under its hold (the hold, then the read checked against its
/// owner), as a relay's session takes them after the owner check; `lost` keeps the hold
/// notices' receiver alive.
fn hold_and_read(
    s: &whispeer_relay::store::JetStreamStore,
    k: &whispeer_relay::store::DurableKey,
    owner: &str,
    lost: &tokio::sync::mpsc::UnboundedSender<(whispeer_relay::store::DurableKey, u64)>,
) -> Result<Option<u64>, whispeer_relay::store::StoreError> {
    use whispeer_relay::store::{HoldLost, Store};
    s.hold_durable(k, &HoldLost::new(lost.clone(), 1))?;
    s.durable_for(k, Some(owner))
}

/// A durable `Sub` of `owner` at `s` from its owner check to its end: resumed or created
/// (at `floor`), its floor moved to `acked`, the hold given back. Returns what it read.
fn whole_sub(
    s: &whispeer_relay::store::JetStreamStore,
    k: &whispeer_relay::store::DurableKey,
    owner: &str,
    floor: u64,
    acked: u64,
) -> Option<u64> {
    use whispeer_relay::store::{Store, Tenant};
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    assert!(matches!(s.durable_owner(k, Some(owner)), Ok(true)));
    let found = hold_and_read(s, k, owner, &tx).expect("held and read");
    if found.is_none() {
        s.set_durable(k, floor, &tenant).expect("created");
    }
    s.set_durable(k, acked, &tenant).expect("a floor");
    s.release_hold(k);
    found
}

/// Review finding (durable ownership, 1): a `Sub` at relay B is checked against the
/// durable that exists (its own owner's: allowed); before it takes the cluster hold, that
/// durable is deleted at relay A and another owner creates the name again there, acks up
/// to 8 and ends. B's `Sub` takes the hold and reads the durable: it resumed the other
/// owner's durable (its backlog; its acks move that durable's floor), checked only against
/// the deleted one. (How it was; the read under the hold checks the `Sub`'s owner again:
/// `NotAllowed`, as every other wrong-owner case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_checked_against_a_deleted_durable_does_not_resume_another_owners_new_one() {
    use whispeer_relay::store::{DurableKey, Store, StoreError};
    let Some((nats, _urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut leases = lease_watch(&nats).await;
    let d = DurableKey {
        key_id: key(48),
        name: "d".into(),
    };
    let (first, second) = ("sha256:first", "sha256:second");
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || assert_eq!(whole_sub(&s, &k, first, 0, 3), None, "new")).await;
    wait_released(&mut leases).await;
    // The first owner's `Sub` at B: its owner check.
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || assert!(matches!(s.durable_owner(&k, Some(first)), Ok(true)))).await;
    // Meanwhile at A: the first owner deletes it; the second creates the name again.
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(hold_and_read(&s, &k, first, &tx).expect("read"), Some(3));
        assert!(s.delete_durable(&k).expect("deleted"));
        s.release_hold(&k);
    })
    .await;
    wait_released(&mut leases).await;
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || assert_eq!(whole_sub(&s, &k, second, 0, 8), None, "new again")).await;
    wait_released(&mut leases).await;
    // The first owner's `Sub` goes on at B: the hold, then the read.
    let (s, k) = (b.clone(), d.clone());
    let found = on_worker(move || {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        hold_and_read(&s, &k, first, &tx)
    })
    .await;
    assert!(
        matches!(found, Err(StoreError::NotAllowed(_))),
        "the first owner's Sub resumes the second owner's durable: {found:?}"
    );
}

/// Review finding (durable ownership, 2): a `Sub` at relay B is checked against the
/// durable that exists (its owner's), which is then deleted at relay A; the `Sub` takes the
/// hold, finds the name new and creates it. Its creation took the owner from the names
/// being created at B — none for "e" (the `Sub` was checked against an existing durable):
/// created owner-less, for anyone to adopt; for "d", a stranger's `Sub` at B found the
/// name new in between: created as the stranger's, and its real owner refused. (How it
/// was; the creation records the owner of the `Sub` that creates it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_created_by_a_sub_checked_against_a_deleted_one_is_that_subs_owners() {
    use whispeer_relay::store::{DurableKey, Store, StoreError};
    let Some((nats, urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut leases = lease_watch(&nats).await;
    let (owner, stranger) = ("sha256:owner", "sha256:stranger");
    for (name, with_stranger) in [("d", true), ("e", false)] {
        let d = DurableKey {
            key_id: key(49),
            name: name.into(),
        };
        let (s, k) = (a.clone(), d.clone());
        on_worker(move || assert_eq!(whole_sub(&s, &k, owner, 0, 3), None, "new")).await;
        wait_released(&mut leases).await;
        // The owner's `Sub` at B: its owner check, against the durable.
        let (s, k) = (b.clone(), d.clone());
        on_worker(move || assert!(matches!(s.durable_owner(&k, Some(owner)), Ok(true)))).await;
        // Deleted at A (the owner's subscription there).
        let (s, k) = (a.clone(), d.clone());
        on_worker(move || {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            assert_eq!(hold_and_read(&s, &k, owner, &tx).expect("read"), Some(3));
            assert!(s.delete_durable(&k).expect("deleted"));
            s.release_hold(&k);
        })
        .await;
        wait_released(&mut leases).await;
        // A stranger's `Sub` at B finds the name new.
        if with_stranger {
            let (s, k) = (b.clone(), d.clone());
            on_worker(move || assert!(matches!(s.durable_owner(&k, Some(stranger)), Ok(true))))
                .await;
        }
        // The owner's `Sub` goes on at B: the name is new; it creates it.
        let (s, k) = (b.clone(), d.clone());
        on_worker(move || {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            assert_eq!(hold_and_read(&s, &k, owner, &tx).expect("read"), None);
            let tenant = whispeer_relay::store::Tenant::Address("10.0.0.1".parse().unwrap());
            s.set_durable(&k, 0, &tenant).expect("created again");
            s.release_hold(&k);
        })
        .await;
        wait_released(&mut leases).await;
        // The stranger's `Sub` goes on at B once the owner's ended.
        if with_stranger {
            let (s, k) = (b.clone(), d.clone());
            let r = on_worker(move || {
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                let r = hold_and_read(&s, &k, stranger, &tx);
                s.release_hold(&k);
                r
            })
            .await;
            assert!(
                matches!(r, Err(StoreError::NotAllowed(_))),
                "{name}: the stranger's Sub at B: {r:?}"
            );
            wait_released(&mut leases).await;
        }
        // A relay that did not create it reads the owner from its record.
        let c = open_store(&urls, &format!("relay-c-{name}")).await;
        let (theirs, owners) = on_worker(move || {
            (
                c.durable_owner(&d, Some(stranger)),
                c.durable_owner(&d, Some(owner)),
            )
        })
        .await;
        assert!(
            matches!(
                (&theirs, &owners),
                (Err(StoreError::NotAllowed(_)), Ok(true))
            ),
            "{name}: the stranger {theirs:?}, the owner {owners:?}"
        );
    }
}

/// Review finding (durable ownership, 3): a stranger's `Sub` at relay A found "d" new and
/// was noted as on its way to create it (another owner's `Sub` there meanwhile is `busy`).
/// Then the durable's owner created "d" at relay B: its `Sub`s at A were `busy` too while
/// the note lasted — until the stranger's `Sub` read the durable, or for 60 s when that
/// `Sub` had failed before (its hold refused, say), since nothing told the store. Now the
/// durable's owner is let through (each `Sub`'s read under its hold checks its own owner,
/// so the stranger's is refused there), and a `Sub` that fails before its read gives its
/// note up (`Store::durable_abandoned`): for "e", whose stranger's `Sub` at A was refused
/// the hold (held at B), the owner's `Sub` at A is not `busy` either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_sub_on_its_way_to_create_a_name_does_not_keep_others_busy() {
    use whispeer_relay::store::{DurableKey, Store, StoreError};
    let Some((nats, _urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut leases = lease_watch(&nats).await;
    let (owner, stranger) = ("sha256:owner", "sha256:stranger");
    let named = |n: &str| DurableKey {
        key_id: key(50),
        name: n.into(),
    };
    let (d, e) = (named("d"), named("e"));
    // The stranger's `Sub` for "d" at A: new.
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || assert!(matches!(s.durable_owner(&k, Some(stranger)), Ok(true)))).await;
    // The owner creates "d" at B, acks up to 4, ends.
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || assert_eq!(whole_sub(&s, &k, owner, 0, 4), None, "new")).await;
    wait_released(&mut leases).await;
    // The owner's `Sub` at A.
    let (s, k) = (a.clone(), d.clone());
    let (checked, read) = on_worker(move || {
        let checked = s.durable_owner(&k, Some(owner));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let read = checked.is_ok().then(|| hold_and_read(&s, &k, owner, &tx));
        s.release_hold(&k);
        (checked, read)
    })
    .await;
    assert!(
        matches!((&checked, &read), (Ok(true), Some(Ok(Some(4))))),
        "the owner of d at A: {checked:?}, then {read:?}"
    );
    wait_released(&mut leases).await;
    // The stranger's `Sub` goes on: refused under the hold.
    let (s, k) = (a.clone(), d.clone());
    let theirs = on_worker(move || {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = hold_and_read(&s, &k, stranger, &tx);
        s.release_hold(&k);
        r
    })
    .await;
    assert!(
        matches!(theirs, Err(StoreError::NotAllowed(_))),
        "the stranger's Sub for d: {theirs:?}"
    );
    wait_released(&mut leases).await;

    // "e": held at B by a `Sub` on its way (the hold taken, nothing read yet).
    let (tx_b, _rx_b) = tokio::sync::mpsc::unbounded_channel();
    let (s, k) = (b.clone(), e.clone());
    on_worker(move || {
        s.hold_durable(&k, &whispeer_relay::store::HoldLost::new(tx_b, 1))
            .expect("held at B")
    })
    .await;
    // The stranger's `Sub` at A finds "e" new, is refused the hold, and gives up, as a
    // relay's session does.
    let (s, k) = (a.clone(), e.clone());
    on_worker(move || {
        assert!(matches!(s.durable_owner(&k, Some(stranger)), Ok(true)));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let held = s.hold_durable(&k, &whispeer_relay::store::HoldLost::new(tx, 1));
        assert!(held.is_err(), "held at B: {held:?}");
        s.durable_abandoned(&k, Some(stranger));
    })
    .await;
    b.release_hold(&e);
    wait_released(&mut leases).await;
    // The owner's `Sub` for "e" at A: new, and its own.
    let (s, k) = (a.clone(), e.clone());
    let checked = on_worker(move || s.durable_owner(&k, Some(owner))).await;
    assert!(
        matches!(checked, Ok(true)),
        "the owner of e at A after the stranger's Sub failed: {checked:?}"
    );
}

/// Review finding (durable ownership, 4): floors were written unconditionally. Relay A
/// holds a durable and its writer took a floor (9) that is slow to reach NATS; A's
/// subscription ends, and A gives the hold back after waiting 5 s for that floor in vain.
/// The owner resumes the durable at relay B and deletes it. A's floor then lands after
/// the deletion marker: the durable was back — floor 9 and its owner — for every relay
/// reading the stream. (How it was; a floor is written only over the record its relay
/// knows last, and dropped when it finds a marker there instead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_in_flight_across_a_deletion_does_not_bring_the_durable_back() {
    use whispeer_relay::store::{DurableKey, Store, Tenant};
    let Some((nats, urls, a, b)) = two_stores(0).await else {
        return;
    };
    let mut leases = lease_watch(&nats).await;
    let owner = "sha256:owner";
    let d = DurableKey {
        key_id: key(51),
        name: "d".into(),
    };
    a.hold_durable_writer(true);
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || {
        let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(matches!(s.durable_owner(&k, Some(owner)), Ok(true)));
        assert_eq!(hold_and_read(&s, &k, owner, &tx).expect("read"), None);
        s.set_durable(&k, 0, &tenant).expect("created");
        s.set_durable(&k, 5, &tenant)
            .expect("written at once (its first floor)");
        s.set_durable(&k, 9, &tenant).expect("written behind");
    })
    .await;
    // Floor 9 is in flight (taken by A's writer).
    a.durable_writer_parked().await;
    a.release_hold(&d);
    wait_released(&mut leases).await;
    let (s, k) = (b.clone(), d.clone());
    on_worker(move || {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(matches!(s.durable_owner(&k, Some(owner)), Ok(true)));
        assert_eq!(hold_and_read(&s, &k, owner, &tx).expect("read"), Some(5));
        assert!(s.delete_durable(&k).expect("deleted at B"));
        s.release_hold(&k);
    })
    .await;
    // A's floor reaches NATS now. A deletion at A waits for it (its floors in flight),
    // then reads the durable's record: still the marker, nothing to delete.
    a.hold_durable_writer(false);
    let (s, k) = (a.clone(), d.clone());
    let again = on_worker(move || s.delete_durable(&k)).await;
    assert!(
        matches!(again, Ok(false)),
        "A's floor written after B's deletion brought the durable back: {again:?}"
    );
    let c = open_store(&urls, "relay-c").await;
    let floor = on_worker(move || c.durable(&d)).await;
    assert!(matches!(floor, Ok(None)), "at a new relay: {floor:?}");
}

/// Review finding (floors at release, Low): relay A's subscription ends with its last floor
/// (9) on its way to NATS, and the durable's record changes meanwhile in a way A has not
/// read yet (here: rewritten as it was, floor `changed`, conditionally on its sequence).
/// A's conditional write of 9 fails, reads the record again and — the hold forgotten at
/// the release, not after the 5 s flush it waits for — dropped floor 9 as if the durable
/// were held elsewhere: the next resume replayed what was acked. Returns the floor the
/// durable has once the hold is back (read at relay B); `None`: skipped (no nats-server).
async fn floor_after_a_release_meeting_a_record_change(changed: u64) -> Option<Option<u64>> {
    use whispeer_relay::store::{DurableKey, Store, Tenant};
    let (nats, _urls, a, b) = two_stores(0).await?;
    let mut leases = lease_watch(&nats).await;
    let mut events = durable_events(&nats).await;
    let owner = "sha256:owner";
    let d = DurableKey {
        key_id: key(52),
        name: "d".into(),
    };
    a.hold_durable_writer(true);
    let (s, k) = (a.clone(), d.clone());
    on_worker(move || {
        let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(matches!(s.durable_owner(&k, Some(owner)), Ok(true)));
        assert_eq!(hold_and_read(&s, &k, owner, &tx).expect("read"), None);
        s.set_durable(&k, 0, &tenant).expect("created");
        s.set_durable(&k, 5, &tenant)
            .expect("written at once (its first floor)");
        s.set_durable(&k, 9, &tenant).expect("written behind");
    })
    .await;
    let subject = next_new_durable(&mut events, &mut HashSet::new()).await;
    // Floor 9 is in flight (taken by A's writer); A's subscription ends.
    a.durable_writer_parked().await;
    a.release_hold(&d);
    // The record changes without A reading it (its reader held).
    a.hold_durable_reader(true);
    let stream = durable_stream(&nats).await;
    let last = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .expect("the durable's record");
    assert_eq!(&last.payload[..], b"5", "the record A wrote at once");
    let mut h = async_nats::HeaderMap::new();
    for name in ["Wsp-Tenant", "Wsp-Owner"] {
        let v = last.headers.get(name).expect("record header").clone();
        h.insert(name, v);
    }
    h.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        last.sequence.to_string().as_str(),
    );
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    async_nats::jetstream::new(nc)
        .publish_with_headers(subject.clone(), h, Bytes::from(changed.to_string()))
        .await
        .unwrap()
        .await
        .expect("the record rewritten");
    // A's last floor goes on; the hold goes back once it is written (or dropped).
    a.hold_durable_writer(false);
    wait_released(&mut leases).await;
    let read = on_worker(move || b.durable(&d)).await;
    drop(a);
    Some(read.expect("read at B"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_last_floor_meets_a_record_change_still_writes_it() {
    let Some(floor) = floor_after_a_release_meeting_a_record_change(5).await else {
        return;
    };
    assert_eq!(
        floor,
        Some(9),
        "A's last floor was dropped at its release: the acked messages come again"
    );
}

/// The same with a record changed to a higher floor (12: written meanwhile): A's last
/// floor, lower, is not written over it when written again (floors only go up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_written_again_never_goes_below_the_records() {
    let Some(floor) = floor_after_a_release_meeting_a_record_change(12).await else {
        return;
    };
    assert_eq!(
        floor,
        Some(12),
        "A's lower floor was written over a higher one"
    );
}

/// Review finding F1: QoS 0 + `RETAIN` values are retained-only, yet each one is a message
/// of the stream `WSP` (`wsp.r.<path>`) until it ages out. They were charged to nobody, so
/// one client replacing one path's value over and over filled the stream's total limit
/// (discard new) and every stored publish of every tenant at every relay got
/// `Err(store_failed)`. Now each copy in the stream is charged to its tenant (one message
/// and its size) until the stream drops it (the older copies of a path are purged soon
/// after a newer one), so the tenant meets its quota (here the reserve) first, and another
/// tenant at another relay still stores.
#[tokio::test]
async fn retained_only_values_are_charged_and_do_not_fill_the_stream_for_others() {
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let urls = nats.urls();
    let limits = ["--total-max-messages", "200"];
    let a = start_relay_with(&urls, "relay-a", &limits);
    let b = start_relay_with(&urls, "relay-b", &limits);
    let mut hog = Client::tcp_from(a.tcp(), "127.0.0.1").await;
    hog.hello().await;
    for n in 0..300 {
        hog.send(&Frame::Pub(Pub {
            envelope: numbered(31, &[1], n),
            flags: pub_flags::RETAIN,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
        .await;
    }
    // A QoS 1 marker behind them: its answer (acknowledged or refused) is the event that
    // A has handled the 300 before it.
    hog.send(&pub_frame(
        numbered(31, &[2], 999),
        Qos::AtLeastOnce,
        999,
        false,
    ))
    .await;
    let mut refused = 0;
    loop {
        match hog.recv().await {
            Frame::PubAck(a) if id_of(&a.publish_id) == 999 => break,
            Frame::Err(e) if e.publish_id.map(|p| id_of(&p)) == Some(999) => break,
            Frame::Err(e) => {
                assert_eq!(e.code, whispeer_protocol::ErrorCode::QuotaExceeded, "{e:?}");
                refused += 1;
            }
            _ => {}
        }
    }
    eprintln!("retained-only values refused: {refused} of 300");

    let mut honest = Client::tcp_from(b.tcp(), "127.0.0.2").await;
    honest.hello().await;
    honest
        .send(&pub_frame(
            numbered(32, &[1], 1),
            Qos::AtLeastOnce,
            1,
            false,
        ))
        .await;
    match honest.recv().await {
        Frame::PubAck(a) => assert_eq!(id_of(&a.publish_id), 1),
        other => panic!("another tenant's stored publish at relay B: {other:?}"),
    }
    let refused = metric(
        a.admin(),
        "whispeer_relay_store_quota_reserve_rejections_total",
    )
    .await;
    assert!(refused > 0, "the hog's values were never refused");
    // The older values of the path are purged (`RETAINED_ONLY_KEEP` after each newer one):
    // the stream comes down to the newest value and the two QoS 1 messages.
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut stream = js.get_stream("WSP").await.unwrap();
    let deadline = std::time::Instant::now() + 2 * TIMEOUT;
    loop {
        let held = stream.info().await.unwrap().state.messages;
        if held <= 3 {
            eprintln!("{refused} retained-only values refused at the reserve; WSP holds {held}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced values stay in the stream: {held} messages"
        );
        tokio::task::yield_now().await;
    }
}

/// Review finding F-A: the ledger charges every retained-only copy the stream holds until
/// it is purged, not until a timer. Driven at the store with its retained writes held
/// (`hold_retained_writes`: the retained stream slow, as in a flood), a tenant writes
/// QoS 0 + `RETAIN` values, 200 on one path and 200 round-robin over 50 paths. Once the
/// ledger has read them all, and for 17 s on (past the 15 s after which the ledger used to
/// release the older copies whether or not they were purged), then with the writes let go
/// until the stream is down to the newest value of each path: WSP never holds more
/// messages than the ledger counts. Before, the purges were queued only once each value's
/// retained write had finished (held here), and the ledger released the older copies 15 s
/// after the newer one's stream time: 400 copies in the stream, 51 counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_counts_every_retained_only_copy_until_it_is_purged() {
    use whispeer_relay::store::{Append, Store, Tenant};
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed: skipped");
        return;
    };
    let store = open_store(&nats.urls(), "relay-a").await;
    let nc = async_nats::connect(nats.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut wsp = js.get_stream("WSP").await.unwrap();
    let base = wsp.info().await.unwrap().state.last_sequence;
    store.hold_retained_writes(true);
    let tenant = Tenant::Address("10.0.0.1".parse().unwrap());
    let publish = |env: Envelope| {
        let path = env.token_path();
        store
            .append(Append {
                path: &path,
                envelope: &env,
                flags: pub_flags::RETAIN,
                qos: Qos::AtMostOnce,
                publish_id: None,
                tenant: &tenant,
            })
            .expect("queued");
    };
    for n in 0..200u32 {
        publish(numbered(61, &[1], n));
        publish(numbered(62, &[(n % 50) as u8], n));
    }
    // The ledger's count (read first: the stream only loses messages meanwhile, by purges
    // whose charge ends after them) and the stream's.
    async fn counts(
        store: &whispeer_relay::store::JetStreamStore,
        wsp: &mut async_nats::jetstream::stream::Stream,
    ) -> (u64, async_nats::jetstream::stream::State) {
        use whispeer_relay::store::Store;
        let counted = store.status().messages;
        (counted, wsp.info().await.unwrap().state.clone())
    }
    let deadline = std::time::Instant::now() + 2 * TIMEOUT;
    // All 400 in the stream, then in the ledger (its ordered read behind).
    loop {
        let (counted, state) = counts(&store, &mut wsp).await;
        if state.last_sequence >= base + 400 && counted >= state.messages {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not read: {counted} of {state:?}"
        );
        tokio::task::yield_now().await;
    }
    let held_until = std::time::Instant::now() + std::time::Duration::from_secs(17);
    let mut released = false;
    loop {
        let (counted, state) = counts(&store, &mut wsp).await;
        assert!(
            state.messages <= counted,
            "WSP holds {} messages, the ledger counts {counted}",
            state.messages
        );
        if !released && std::time::Instant::now() >= held_until {
            store.hold_retained_writes(false);
            released = true;
        }
        if released && state.messages == 51 && counted == 51 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(17),
            "not settled: WSP {} messages, ledger {counted}",
            state.messages
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// History consumers of the relays' stream: those filtering on one key id (the relays' own
/// reads of the whole stream have no filter).
async fn history_consumers(url: &str) -> usize {
    stream_consumers(url)
        .await
        .iter()
        .filter(|c| !c.config.filter_subject.is_empty())
        .count()
}

/// Review finding F6: each history read created a JetStream consumer and left it behind
/// (deleted by the server only after a minute idle), so a client replaying in a loop made
/// the relay hold one consumer per read on the NATS servers (each with replicas = 1, in
/// memory, but state on the server all the same). A read's consumer is now deleted when
/// the read ends (or its cursor is dropped between chunks): after 100 × (replay `Sub`, the
/// message, `Unsub`) the stream's history consumers go back to none.
#[tokio::test]
async fn history_reads_do_not_leave_consumers_behind() {
    let Some(s) = Setup::start(1) else { return };
    let (mut publ, _) = connect(s.relays[0].tcp()).await;
    let seq = publish_acked(
        &mut publ,
        &[(1, numbered(33, &[1], 1))],
        Qos::AtLeastOnce,
        false,
    )
    .await[0];
    let (mut c, _) = connect(s.relays[0].tcp()).await;
    for i in 0..100u64 {
        let mut r = sub(i + 1, pattern(33, &[], true), Qos::AtMostOnce);
        r.replay = Some(Replay::FromSeq(1));
        subscribe(&mut c, r).await;
        let got = read_until(&mut c, seq).await;
        assert_eq!(number(&got.last().unwrap().envelope), 1);
        c.send(&Frame::Unsub(whispeer_protocol::frame::Unsub {
            sub_id: i + 1,
            delete: None,
        }))
        .await;
    }
    let url = s.nats.nodes[0].url();
    let left = history_consumers(&url).await;
    // Deletions are sent behind the reads: wait for them (the server itself would delete
    // the consumers only after a minute without a request, past this deadline).
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let n = history_consumers(&url).await;
        if n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} history consumers left behind by 100 reads"
        );
        tokio::task::yield_now().await;
    }
    eprintln!("history consumers right after 100 reads: {left}; then none");
}

/// With the JetStream store a local QoS >= 1 publish is routed (its subscription index
/// walked) only when it comes back numbered from the stream, after the publish was handled:
/// that walk is still charged to its publisher at its relay — before the first frame the
/// publisher sends after that routing (review of ddd438b: it was charged to no one). The reviewer's construction
/// (`common::wildcard`) and an exact subscription on P: each QoS 1 publish on P walks
/// 41,391 nodes, 646 tokens; at `publish_rate` 1/s, burst 1,000 the publisher is throttled
/// once two of them were charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_numbered_publishs_walk_is_charged_to_its_publisher() {
    use common::wildcard::*;
    let Some(nats) = NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let mut config = whispeer_relay::Config::ephemeral();
    config.listen.ws = whispeer_relay::config::ListenAddr::OFF;
    config.cluster.urls = nats.urls().split(',').map(str::to_string).collect();
    config.cluster.store = whispeer_relay::config::ClusterStore::Jetstream;
    config.cluster.replicas = 3;
    config.store.total_max_bytes = 256 << 20;
    config.limits.publish_rate = 1;
    config.limits.publish_burst = 1000;
    let relay = TestRelay::start(config).await;
    let attackers = construction(&relay).await;
    let mut honest = greeted(&relay, "127.0.0.2").await;
    honest.subscribe(1, exact(K, &path())).await;

    let mut publ = greeted(&relay, "127.0.0.3").await;
    let before = metric(&relay, "whispeer_relay_walk_tokens_total");
    // Waits for the PubAck (the stream's acknowledgement) and the delivery (the routing).
    let mut publish = async |c: &mut Client, n: u32| {
        c.send(&pub_frame(
            numbered(K, &path(), n),
            Qos::AtLeastOnce,
            n,
            false,
        ))
        .await;
        match c.recv().await {
            Frame::PubAck(a) => assert_eq!(id_of(&a.publish_id), n),
            other => panic!("expected PubAck, got {other:?}"),
        }
        assert_eq!(number(&honest.expect_msg().await.envelope), n);
    };
    // Each publish's walk is its connection's debt once it was routed (just after its
    // delivery), and is charged before the next frame the connection sends: the publishes
    // go on until two walks were charged — the second takes the connection into debt
    // (1,000 - 2 × 647 < 0) and its reads pause. (A publish once paused would not be read
    // for minutes: it stops at the one whose handling charged the second walk.)
    let mut n = 0;
    while metric(&relay, "whispeer_relay_walk_tokens_total") < before + 2 * 646 {
        n += 1;
        assert!(
            n <= 10,
            "ten publishes charged {} walk tokens, not 2 × 646",
            metric(&relay, "whispeer_relay_walk_tokens_total") - before
        );
        publish(&mut publ, n).await;
    }
    // A walk's debt is added once its routing returns — just after the delivery the test
    // waits for — so the next publish may be read before it: that walk is then charged
    // one frame later, with the next one's (CI: three walks charged when the loop ended,
    // the second and third at the fourth publish). Whole walks, at least two (the loop's
    // end), none that was not published.
    let charged = metric(&relay, "whispeer_relay_walk_tokens_total") - before;
    assert!(
        charged % 646 == 0 && (2..=u64::from(n)).contains(&(charged / 646)),
        "41,391 nodes / 64 = 646 per publish, 2..={n} walks: {charged}"
    );
    metric_reaches(&relay, "whispeer_relay_throttled_total", 1).await;
    drop((attackers, honest, publ));
    relay.stop().await;
}
