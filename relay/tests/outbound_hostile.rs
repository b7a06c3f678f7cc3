//! A connection's outbound queue against subscribers that read nothing: what policy `drop`
//! drops (the oldest QoS 0 message, counted and reported in a `Gap`) with many QoS 1
//! messages queued before it. Real relay, real sockets.

mod common;

use bytes::Bytes;
use common::*;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::frame::{features, pub_flags, Hello, Ping, Pub, Sub, PROTOCOL_VERSION};
use whispeer_protocol::{Envelope, Frame, Qos, TokenPattern};
use whispeer_relay::Config;

/// An envelope on `[key(1), tok(level)]` with `body` bytes (at least 16) whose last four
/// are `n`: which message a subscriber got.
fn numbered(level: u8, body: usize, n: u32) -> Envelope {
    let tokens = [tok(level)];
    let fields = HeaderFields {
        flags: 0,
        key_id: key(1),
        nonce: [7; 24],
        commit: [8; 32],
        tokens: &tokens,
    };
    let mut out = Vec::new();
    fields.write_prefix(48, &mut out);
    out.extend_from_slice(&[0x5a; 48]);
    out.resize(out.len() + body.max(16) - 4, 0x33);
    out.extend_from_slice(&n.to_be_bytes());
    Envelope::from_bytes(Bytes::from(out)).expect("valid envelope")
}

/// Numbers of QoS 1 messages have this bit.
const QOS1: u32 = 1 << 31;

/// The number [`numbered`] wrote.
fn number(e: &Envelope) -> u32 {
    let b = e.as_bytes();
    u32::from_be_bytes(b[b.len() - 4..].try_into().unwrap())
}

fn sub(sub_id: u64, pattern: TokenPattern, qos: Qos) -> Frame {
    Frame::Sub(Sub {
        sub_id,
        pattern,
        qos,
        durable: None,
        replay: None,
        retained: false,
        credit: None,
        owner: None,
    })
}

fn qos1_hello() -> Frame {
    Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: features::AT_LEAST_ONCE,
        client: Some("outbound-hostile".into()),
        auth: None,
        account: None,
    })
}

fn qos0_pub(env: Envelope) -> Frame {
    Frame::Pub(Pub {
        envelope: env,
        flags: 0,
        publish_id: None,
        qos: Qos::AtMostOnce,
    })
}

fn qos1_pub(env: Envelope, id: u32) -> Frame {
    let mut publish_id = [0u8; 16];
    publish_id[..4].copy_from_slice(&id.to_be_bytes());
    Frame::Pub(Pub {
        envelope: env,
        flags: pub_flags::ACK,
        publish_id: Some(publish_id),
        qos: Qos::AtLeastOnce,
    })
}

/// Pings and waits for the Pong: every frame `c` sent before was handled (a publish routed).
async fn barrier(c: &mut Client, nonce: u64) {
    c.send(&Frame::Ping(Ping { nonce })).await;
    loop {
        match c.recv().await {
            Frame::Pong(p) if p.nonce == nonce => return,
            Frame::PubAck(_) => {}
            other => panic!("expected Pong, got {other:?}"),
        }
    }
}

/// QoS 0 messages on `[2]` numbered `first..first + n`, `body` bytes each.
async fn publish_qos0(p: &mut Client, first: u32, n: u32, body: usize) {
    for i in first..first + n {
        p.send(&qos0_pub(numbered(2, body, i))).await;
    }
}

/// Messages of QoS 0 that fill a non-reading subscriber's socket and block its writer:
/// 10 MiB, beyond the relay's socket send buffer (4 MiB at most) and its 8 MiB queue.
const FILLER: u32 = 640;
const FILLER_BODY: usize = 16 << 10;

/// A subscriber that reads nothing (4 KiB receive buffer) with a QoS 1 subscription on
/// `[1]` and a QoS 0 one on `[2]`, its writer blocked by a QoS 0 filler; 3,000 QoS 1
/// messages for `[1]` queued, then 11,192 QoS 0 ones for `[2]`: each of those offered to
/// the full queue drops the oldest queued QoS 0 message, past the 3,000 QoS 1 ones queued
/// before it (a scan of them under the routing lock per message, before the drop was made
/// O(1)). What is dropped is unchanged: the subscriber gets every QoS 1 message in order,
/// the QoS 0 ones it gets are in order and include the newest ones the queue holds beside
/// the QoS 1 ones, and each one it does not get is counted once in a `Gap` and in
/// `whispeer_relay_dropped_messages_total`.
#[tokio::test]
async fn a_qos0_flood_behind_queued_qos1_messages_drops_the_oldest_qos0_ones() {
    const KEPT: u32 = 3000;
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 0;
    config.delivery.max_unacked = 10_000;
    config.delivery.max_unacked_bytes = 64 << 20;
    config.delivery.ack_timeout_ms = 600_000;
    let capacity = config.queue.capacity as u32;
    // More than the queue holds, whatever the writer has taken out of it: on a loaded
    // machine the writer may first take the filler and every QoS 1 message in one batch
    // (and block writing it), which leaves the flood an empty queue (CI: 3,000 flooded into
    // a queue of 4,096 dropped only 18). The first batch the writer takes after the filler
    // is routed is its last (it holds more filler than the kernel's buffers take), so what
    // it keeps of the flood is at most that batch plus a full queue behind it: 2 x capacity.
    let flood = 2 * capacity + KEPT;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = Client::over_stream(Box::new(sock.connect(relay.tcp()).await.unwrap()));
    s.send(&qos1_hello()).await;
    assert!(matches!(s.recv().await, Frame::Welcome(_)));
    s.send(&sub(1, exact(1, &[1]), Qos::AtLeastOnce)).await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    s.send(&sub(2, exact(1, &[2]), Qos::AtMostOnce)).await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));

    let mut p = Client::tcp(relay.tcp()).await;
    p.hello_with(features::AT_LEAST_ONCE).await;
    publish_qos0(&mut p, 0, FILLER, FILLER_BODY).await;
    barrier(&mut p, 1).await;
    // The QoS 1 messages, pipelined; each PubAck means stored (and routed).
    for i in 0..KEPT {
        p.send(&qos1_pub(numbered(1, 16, QOS1 | i), i)).await;
    }
    for _ in 0..KEPT {
        match p.recv().await {
            Frame::PubAck(_) => {}
            other => panic!("publisher expected PubAck, got {other:?}"),
        }
    }
    publish_qos0(&mut p, FILLER, flood, 16).await;
    barrier(&mut p, 2).await;

    // The subscriber reads everything queued for it (up to its Pong).
    s.send(&Frame::Ping(Ping { nonce: 9 })).await;
    let (mut qos1, mut qos0, mut gaps) = (Vec::new(), Vec::new(), 0u64);
    loop {
        match s.recv().await {
            Frame::Msg(m) if number(&m.envelope) & QOS1 != 0 => {
                qos1.push(number(&m.envelope) & !QOS1)
            }
            Frame::Msg(m) => qos0.push(number(&m.envelope)),
            Frame::Gap(g) => gaps += g.dropped,
            Frame::Pong(p) if p.nonce == 9 => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        qos1.iter().copied().eq(0..KEPT),
        "every QoS 1 message, in order, none dropped: {} of {KEPT}",
        qos1.len()
    );
    assert!(
        qos0.windows(2).all(|w| w[0] < w[1]),
        "QoS 0 messages in order, none twice"
    );
    let published = u64::from(FILLER + flood);
    assert_eq!(
        qos0.len() as u64 + gaps,
        published,
        "every QoS 0 message arrived or was counted in a Gap"
    );
    // The queue kept the newest QoS 0 messages beside the QoS 1 ones: the oldest went.
    let room = capacity - KEPT;
    let newest: Vec<u32> = (FILLER + flood - room..FILLER + flood).collect();
    assert!(
        qos0.ends_with(&newest),
        "the newest {room} QoS 0 messages stay; the last received: {:?}",
        &qos0[qos0.len().saturating_sub(5)..]
    );
    // The flood overflowed the queue: at most 2 x capacity of it kept (above), so at least
    // KEPT dropped, whatever batch the writer holds.
    let flood_kept = qos0.iter().filter(|&&n| n >= FILLER).count() as u32;
    assert!(
        flood - flood_kept >= flood - 2 * capacity,
        "the flood dropped only {} of {flood}",
        flood - flood_kept
    );
    assert_eq!(
        metric(admin, "whispeer_relay_dropped_messages_total").await,
        gaps,
        "the drops are counted as reported"
    );
}

/// A client whose writer is blocked — it is a subscriber that reads nothing (4 KiB
/// receive buffer) behind 10 MiB of QoS 0 messages — and pipelines 10,000 QoS 1 publishes
/// is slowed down, not disconnected: once half the queue's capacity of replies is queued
/// and not taken, the relay stops reading it until its writer takes them (counted in
/// `whispeer_relay_outbound_reply_pauses_total`, which the test waits for). It never gets a
/// fatal `Err`; once it reads, it gets a `PubAck` for each of the 10,000, each stored.
/// (Before, the 4,097th unread reply closed it with a fatal `Err(slow_consumer)`.)
#[tokio::test]
async fn a_pipelining_client_that_reads_nothing_is_slowed_not_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use whispeer_protocol::{codec, FrameDecoder};
    const PUBLISHES: u32 = 10_000;
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 0;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(relay.tcp()).await.unwrap();
    stream.set_nodelay(true).ok();
    let (mut rd, mut wr) = stream.into_split();
    let mut dec = FrameDecoder::new(64 << 20);
    let mut next = async |rd: &mut tokio::net::tcp::OwnedReadHalf| loop {
        if let Some(f) = dec.next_frame().expect("decodable") {
            return Frame::decode(&f).expect("a frame");
        }
        let buf = dec.buffer_mut();
        buf.reserve(64 << 10);
        let n = tokio::time::timeout(TIMEOUT, rd.read_buf(buf))
            .await
            .expect("timed out waiting for the relay")
            .expect("read");
        assert!(n > 0, "the relay closed the connection");
    };
    wr.write_all(&codec::encode_prefixed(&qos1_hello()))
        .await
        .unwrap();
    assert!(matches!(next(&mut rd).await, Frame::Welcome(_)));
    wr.write_all(&codec::encode_prefixed(&sub(
        1,
        exact(1, &[2]),
        Qos::AtMostOnce,
    )))
    .await
    .unwrap();
    assert!(matches!(next(&mut rd).await, Frame::SubOk(_)));

    // Its writer blocks behind 10 MiB of messages it does not read.
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello_with(features::AT_LEAST_ONCE).await;
    publish_qos0(&mut p, 0, FILLER, FILLER_BODY).await;
    barrier(&mut p, 1).await;

    // 10,000 QoS 1 publishes, pipelined, in writes of 100.
    let sender = tokio::spawn(async move {
        for chunk in 0..PUBLISHES / 100 {
            let mut buf = Vec::new();
            for i in chunk * 100..(chunk + 1) * 100 {
                buf.extend_from_slice(&codec::encode_prefixed(&qos1_pub(numbered(1, 16, i), i)));
            }
            if wr.write_all(&buf).await.is_err() {
                return None;
            }
        }
        Some(wr)
    });
    // The relay stopped reading it for its replies (before, it closed it at the 4,097th
    // unread reply, and this wait failed): only then does it read.
    wait_metric(admin, "whispeer_relay_outbound_reply_pauses_total", 1).await;
    let mut acked = vec![false; PUBLISHES as usize];
    let (mut acks, mut seqs) = (0, std::collections::HashSet::new());
    while acks < PUBLISHES {
        match next(&mut rd).await {
            Frame::PubAck(a) => {
                let id = u32::from_be_bytes(a.publish_id[..4].try_into().unwrap()) as usize;
                assert!(!acked[id], "publish {id} acknowledged twice");
                acked[id] = true;
                assert!(a.seq > 0 && seqs.insert(a.seq), "stored once: {a:?}");
                acks += 1;
            }
            Frame::Msg(_) | Frame::Gap(_) => {}
            Frame::Err(e) => panic!("after {acks} PubAcks: {e:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(sender.await.unwrap().is_some(), "every publish was written");
    assert_eq!(
        metric(admin, "whispeer_relay_slow_consumer_disconnects_total").await,
        0
    );
}

/// The relay's side of a socket, whose writes the test can stop as a full socket would:
/// once `shut`, every write is pending for good (and says so through `blocked`).
struct Valve<S> {
    inner: S,
    state: std::sync::Arc<ValveState>,
}

#[derive(Default)]
struct ValveState {
    shut: std::sync::atomic::AtomicBool,
    blocked: tokio::sync::Notify,
}

impl ValveState {
    fn closed(&self) -> bool {
        let shut = self.shut.load(std::sync::atomic::Ordering::SeqCst);
        if shut {
            self.blocked.notify_one();
        }
        shut
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Valve<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Valve<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.state.closed() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.state.closed() {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A WebSocket client (4 KiB receive buffer) that reads its last batch and then nothing:
/// the relay's writer, its queue empty, sends its keepalive `Ping` into the full socket and
/// waits there — holding no batch. The client then pipelines QoS 1 publishes (up to
/// 20,000, until the relay stops reading them); their `PubAck`s queue behind the blocked
/// writer, untaken, and once 2,048 are queued the reader stops reading for them (owed
/// ones, not yet answered by the store, do not count: more are sent than the pause needs). The last resort still applies: the writer makes no progress for `idle_ms`, so the
/// connection is closed with fatal `Err(slow_consumer)`, counted in
/// `whispeer_relay_slow_consumer_disconnects_total`. (Before, a writer that held no batch
/// restarted the stall clock at every deadline: neither that close nor the idle timeout
/// ever came, and the connection's slot and queue stayed pinned.)
///
/// The relay's own WebSocket (tungstenite, its configuration, `ws::split`) over a real TCP
/// socket, served as a listener's would be; under it a valve stops the relay's writes once
/// the client has read the `Welcome`, as a full socket stops them: the kernel cannot be made
/// to refuse a 2-byte `Ping` at a chosen moment (Linux appends small writes to the last
/// unsent segment past the send buffer's size).
#[tokio::test]
async fn a_websocket_writer_blocked_in_its_keepalive_is_closed_when_replies_back_up() {
    use whispeer_relay::transport::{ws, ws_gate::WsGate};
    const PUBLISHES: u32 = 20_000;
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 0;
    config.timeouts.heartbeat_ms = 100;
    config.timeouts.idle_ms = 1_000;
    config.timeouts.drain_ms = 200;
    let max_frame = config.limits.max_frame;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let (client, accepted) = tokio::join!(sock.connect(addr), listener.accept());
    let (accepted, peer) = accepted.unwrap();
    let valve = std::sync::Arc::new(ValveState::default());
    let server = tokio_tungstenite::accept_async_with_config(
        Valve {
            inner: accepted,
            state: valve.clone(),
        },
        Some(ws::ws_config(max_frame)),
    );
    let url = format!("ws://{addr}/");
    let (server, mut c) = tokio::join!(server, Client::ws_over(Box::new(client.unwrap()), &url));
    let (source, sink) = ws::split(server.unwrap(), WsGate::new(None, peer.ip()));
    relay
        .handle
        .serve(source, sink, whispeer_relay::TransportKind::Ws, Some(peer));
    c.send(&qos1_hello()).await;
    assert!(matches!(c.recv().await, Frame::Welcome(_)));

    // The socket is full from here on; the writer's queue is empty, so what it blocks in
    // is its next keepalive.
    valve.shut.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(TIMEOUT, valve.blocked.notified())
        .await
        .expect("the keepalive was written");
    // Sent until the relay stops reading: the reader looks at its replies before each
    // frame, so it must have more to read once their PubAcks are queued (no longer owed).
    let sender = tokio::spawn(async move {
        for i in 0..PUBLISHES {
            if c.send_raw(&qos1_pub(numbered(1, 16, i), i).to_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        c
    });
    wait_metric(admin, "whispeer_relay_outbound_reply_pauses_total", 1).await;
    wait_metric(admin, "whispeer_relay_slow_consumer_disconnects_total", 1).await;
    sender.abort();
}

/// An honest client during a store stall: SQLite's write lock is held by another
/// connection (as a long commit elsewhere would hold it), and the client pipelines 2,048
/// QoS 1 publishes — half the default `queue.capacity`. Once the relay has taken them all
/// (`whispeer_relay_messages_in_total`), their `PubAck`s are owed — the store has not
/// committed — but the connection's writer is idle, so the reader is not paused: the
/// client's `Ping`, sent then, is read and answered while the store is stuck (the Rust
/// client's heartbeat would otherwise drop the connection and publish again: QoS 1
/// duplicates). The lock goes at once after the `Pong` (well within the store writer's
/// 5 s busy timeout, past which it would fail the batch), and each publish is acknowledged
/// exactly once, with nothing else sent. (Before, owed replies counted towards the
/// reader's pause: at 2,048 of them the relay stopped reading the connection, and the
/// `Pong` never came while the store was stuck.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_stall_with_thousands_of_owed_pubacks_leaves_the_connection_read() {
    use std::sync::Arc;
    use whispeer_protocol::codec;
    use whispeer_relay::config::{ListenAddr, StoreKind};
    use whispeer_relay::store::{SqliteStore, Store};
    const PUBLISHES: u32 = 2_048;
    let dir = temp_dir("owed-replies");
    let db = dir.join("s.db");
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 0;
    config.store.kind = Some(StoreKind::Sqlite);
    config.store.path = db.clone();
    config.store.min_free_bytes = 0;
    config.listen.ws = ListenAddr::OFF;
    assert_eq!(
        config.queue.capacity / 2,
        PUBLISHES as usize,
        "owed replies enough to pause the reader if they counted"
    );
    let store = Arc::new(SqliteStore::open_file(config.store.clone()).unwrap());
    let listeners = whispeer_relay::Listeners::bind(&config).await.unwrap();
    let relay = TestRelay::run(
        whispeer_relay::Relay::builder(config)
            .listeners(listeners)
            .store(store.clone())
            .build()
            .unwrap(),
    );
    let admin = relay.addrs.admin.expect("admin");
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello_with(features::AT_LEAST_ONCE).await;
    let mut burst = Vec::new();
    for i in 0..PUBLISHES {
        burst.extend_from_slice(&codec::encode_prefixed(&qos1_pub(numbered(1, 16, i), i)));
    }

    // The store's writer gets stuck from the first publish on.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let before = store.metrics();
    c.send_raw(&burst).await.unwrap();
    // Every publish taken by the relay and owed a PubAck (none committed yet).
    wait_metric(admin, "whispeer_relay_messages_in_total", PUBLISHES as u64).await;
    c.send(&Frame::Ping(Ping { nonce: 7 })).await;
    let answer = c.recv().await;
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    match answer {
        Frame::Pong(p) if p.nonce == 7 => {}
        other => panic!("expected the Pong while the store is stuck, got {other:?}"),
    }
    assert_eq!(
        store.metrics().commits,
        before.commits,
        "the store was stuck until the Pong"
    );

    let mut acked = vec![false; PUBLISHES as usize];
    let mut seqs = std::collections::HashSet::new();
    for _ in 0..PUBLISHES {
        match c.recv().await {
            Frame::PubAck(a) => {
                let id = u32::from_be_bytes(a.publish_id[..4].try_into().unwrap()) as usize;
                assert!(!acked[id], "publish {id} acknowledged twice");
                acked[id] = true;
                assert!(a.seq > 0 && seqs.insert(a.seq), "stored once: {a:?}");
            }
            other => panic!("expected only PubAcks, got {other:?}"),
        }
    }
    // Nothing after them: the next frame answers the next Ping.
    c.send(&Frame::Ping(Ping { nonce: 8 })).await;
    match c.recv().await {
        Frame::Pong(p) if p.nonce == 8 => {}
        other => panic!("expected the Pong after the PubAcks, got {other:?}"),
    }
    let after = store.metrics();
    assert_eq!(
        after.commit_failures, before.commit_failures,
        "no failed commit"
    );
    assert_eq!(after.appends - before.appends, PUBLISHES as u64);
    assert_eq!(
        metric(admin, "whispeer_relay_slow_consumer_disconnects_total").await,
        0
    );
    drop(c);
    relay.stop().await;
}
