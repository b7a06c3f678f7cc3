//! A kept message must not keep its publisher's read buffer alive (review finding: pinned
//! buffers). Frames were cut out of the connection's read buffer without a copy, and the
//! envelope is a slice of its frame: a 200-byte QoS 1 envelope the relay keeps until it is
//! acknowledged kept the whole 64 KiB buffer it was read into, while every limit (the
//! unacknowledged bytes of a subscription and of a connection, the queues, the replay's
//! hold) counts the envelope's length. The attack: a subscriber of 16 paths at QoS 1 that
//! reads but never acks; a publisher writing, in one write each, a QoS 1 `Pub` of ~250
//! bytes and a 60 KB frame the relay reads and drops (a `Pong` padded under a key the
//! decoder skips). 16,384 such pairs, within every unacknowledged limit, kept ~1 GiB.
//!
//! Each test runs the real relay binary, waits until every publish is acknowledged and
//! every message delivered (events, not time), and bounds the relay's RSS growth by four
//! times the envelope bytes it holds plus 64 MiB (the store's cache, buffers, slack).

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use whispeer_protocol::frame::{features, pub_flags, Pub, Sub};
use whispeer_protocol::{codec, Frame, FrameDecoder, Qos};

/// Paths the subscriber subscribes to (one subscription each).
const PATHS: u32 = 16;
/// Publishes: 1,024 per subscription, within `delivery.max_unacked` (4,096).
const PAIRS: u32 = 4 * 4096;
/// Ciphertext bytes of each published envelope (~250 bytes in all).
const BODY: usize = 100;
/// Most publishes the publisher has unacknowledged.
const WINDOW: usize = 256;
/// The frame read and dropped after each publish.
const FILLER: usize = 60_000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The `i`th publish: QoS 1 with a `PubAck`, on path `i % PATHS`.
fn publish(i: u32) -> Frame {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    Frame::Pub(Pub {
        envelope: envelope_sized(1, &[(i % PATHS) as u8], BODY),
        flags: pub_flags::ACK,
        publish_id: Some(id),
        qos: Qos::AtLeastOnce,
    })
}

/// `{0: Pong, 9: h'00…'}`: a `Pong` of `len` bytes, its padding under a key the relay's
/// decoder skips. The relay reads it and drops it.
fn padded_pong(len: usize) -> Bytes {
    let pad = len - 9;
    let mut f = vec![0xa2, 0x00, 0x0c, 0x09, 0x5a];
    f.extend_from_slice(&(pad as u32).to_be_bytes());
    f.resize(len, 0);
    assert!(matches!(
        Frame::decode(&Bytes::from(f.clone())),
        Ok(Frame::Pong(_))
    ));
    Bytes::from(f)
}

/// A `Pub` of `len` bytes: `publish(i)` with padding under a key the decoder skips (a
/// large frame whose envelope is small).
fn padded_publish(i: u32, len: usize) -> Bytes {
    let mut f = publish(i).to_bytes().to_vec();
    assert!((0xa1..0xb7).contains(&f[0]), "a small map");
    f[0] += 1;
    let pad = len - f.len() - 6;
    f.extend_from_slice(&[0x09, 0x5a]);
    f.extend_from_slice(&(pad as u32).to_be_bytes());
    f.resize(len, 0);
    let f = Bytes::from(f);
    assert!(matches!(Frame::decode(&f), Ok(Frame::Pub(_))));
    f
}

/// How the publisher sends each pair.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// TCP: the publish and the filler in one write.
    Tcp,
    /// WebSocket: the publish and the filler as two messages, flushed together.
    Ws,
    /// TCP: one padded publish of the filler's size.
    PaddedPub,
}

/// The relay with its store, no publish rate limit and no redelivery during the test.
fn relay() -> BinRelay {
    BinRelay::start(&[
        "--publish-rate",
        "0",
        "--store-sync",
        "normal",
        "--ack-timeout-ms",
        "3600000",
    ])
}

/// Runs `attack` against a fresh relay; returns (RSS before, RSS after, envelope bytes
/// held) in KiB, KiB and bytes.
async fn run(attack: Attack) -> (u64, u64, usize) {
    let relay = relay();
    let pid = relay.child.id();
    // The subscriber: QoS 1 on every path; it reads everything and never acks.
    let mut sub = Client::tcp(relay.tcp()).await;
    sub.hello_with(features::AT_LEAST_ONCE | features::FLOW_CONTROL)
        .await;
    for p in 0..PATHS {
        sub.send(&Frame::Sub(Sub {
            sub_id: u64::from(p) + 1,
            pattern: exact(1, &[p as u8]),
            qos: Qos::AtLeastOnce,
            durable: None,
            replay: None,
            retained: false,
            credit: None,
            owner: None,
        }))
        .await;
        assert!(matches!(sub.recv().await, Frame::SubOk(_)));
    }
    let reader = tokio::spawn(async move {
        let mut seqs = std::collections::HashSet::new();
        let mut held = 0;
        while seqs.len() < PAIRS as usize {
            match sub.recv().await {
                Frame::Msg(m) => {
                    if seqs.insert(m.seq) {
                        held += m.envelope.as_bytes().len();
                    }
                }
                other => panic!("subscriber got {other:?}"),
            }
        }
        (sub, held)
    });
    let before = rss_kib(pid);
    let filler = padded_pong(FILLER);
    // The publisher waits for `Welcome` before its first large frame (the handshake's
    // limit is 4 KiB), and keeps at most `WINDOW` publishes unacknowledged, as a client
    // does (its `PubAck`s are replies the relay holds for it only so long).
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let (welcome_tx, welcome_rx) = tokio::sync::oneshot::channel::<()>();
    match attack {
        Attack::Tcp | Attack::PaddedPub => {
            let mut s = tokio::net::TcpStream::connect(relay.tcp()).await.unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&codec::encode_prefixed(&hello_frame()))
                .await
                .unwrap();
            let (mut r, mut w) = s.into_split();
            let (freed, welcome) = (window.clone(), welcome_tx);
            let acks = tokio::spawn(async move {
                let mut d = FrameDecoder::new(1 << 20);
                let mut acked = 0;
                let mut welcome = Some(welcome);
                while acked < PAIRS {
                    while let Some(f) = d.next_decoded().unwrap() {
                        match f {
                            Frame::Welcome(_) => {
                                let _ = welcome.take().expect("one Welcome").send(());
                            }
                            Frame::PubAck(_) => {
                                acked += 1;
                                freed.add_permits(1);
                            }
                            other => panic!("publisher got {other:?}"),
                        }
                    }
                    if acked == PAIRS {
                        break;
                    }
                    d.buffer_mut().reserve(64 << 10);
                    assert!(
                        r.read_buf(d.buffer_mut()).await.unwrap() > 0,
                        "relay closed"
                    );
                }
            });
            welcome_rx.await.expect("Welcome");
            for i in 0..PAIRS {
                window.acquire().await.unwrap().forget();
                let mut pair = Vec::with_capacity(FILLER + 1024);
                if let Attack::PaddedPub = attack {
                    codec::write_prefixed(&padded_publish(i, FILLER), &mut pair);
                } else {
                    pair.extend_from_slice(&codec::encode_prefixed(&publish(i)));
                    codec::write_prefixed(&filler, &mut pair);
                }
                w.write_all(&pair).await.unwrap();
            }
            tokio::time::timeout(TIMEOUT * 4, acks)
                .await
                .expect("every publish acknowledged")
                .unwrap();
        }
        Attack::Ws => {
            let s = tokio::net::TcpStream::connect(relay.ws()).await.unwrap();
            s.set_nodelay(true).unwrap();
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{}/", relay.ws()), s)
                .await
                .expect("ws handshake");
            let (mut w, mut r) = ws.split();
            w.send(Message::Binary(hello_frame().to_bytes()))
                .await
                .unwrap();
            let (freed, welcome) = (window.clone(), welcome_tx);
            let acks = tokio::spawn(async move {
                let mut acked = 0;
                let mut welcome = Some(welcome);
                while acked < PAIRS {
                    match r.next().await.expect("relay closed").unwrap() {
                        Message::Binary(b) => match Frame::decode(&b).unwrap() {
                            Frame::Welcome(_) => {
                                let _ = welcome.take().expect("one Welcome").send(());
                            }
                            Frame::PubAck(_) => {
                                acked += 1;
                                freed.add_permits(1);
                            }
                            other => panic!("publisher got {other:?}"),
                        },
                        Message::Ping(_) | Message::Pong(_) => {}
                        other => panic!("publisher got {other:?}"),
                    }
                }
            });
            welcome_rx.await.expect("Welcome");
            for i in 0..PAIRS {
                window.acquire().await.unwrap().forget();
                w.feed(Message::Binary(publish(i).to_bytes()))
                    .await
                    .unwrap();
                w.feed(Message::Binary(filler.clone())).await.unwrap();
                w.flush().await.unwrap();
            }
            tokio::time::timeout(TIMEOUT * 4, acks)
                .await
                .expect("every publish acknowledged")
                .unwrap();
        }
    }
    let (sub, held) = tokio::time::timeout(TIMEOUT * 4, reader)
        .await
        .expect("every message delivered")
        .unwrap();
    let after = rss_kib(pid);
    drop(sub);
    (before, after, held)
}

async fn assert_bounded(attack: Attack) {
    let (before, after, held) = run(attack).await;
    let grown = after.saturating_sub(before);
    let bound_kib = (4 * held as u64) / 1024 + 64 * 1024;
    eprintln!(
        "{attack:?}: relay RSS {before} KiB before, {after} KiB after {PAIRS} QoS 1 publishes \
         kept unacknowledged ({} KiB of envelopes, each sent with {FILLER} bytes the relay \
         drops): growth {grown} KiB, bound {bound_kib} KiB",
        held / 1024
    );
    assert!(
        grown <= bound_kib,
        "{attack:?}: relay RSS grew by {grown} KiB holding {} KiB of envelopes (bound \
         {bound_kib} KiB): kept envelopes pin their read buffers",
        held / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_envelopes_do_not_pin_tcp_read_buffers() {
    assert_bounded(Attack::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_envelopes_do_not_pin_websocket_read_buffers() {
    assert_bounded(Attack::Ws).await;
}

/// A large frame shares its buffer (no copy), but its small envelope must not keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_envelopes_do_not_pin_their_padded_frames() {
    assert_bounded(Attack::PaddedPub).await;
}
