//! Many connections and slow consumers.

mod common;

use common::*;
use tokio::net::TcpSocket;
use whispeer_protocol::{ErrorCode, Frame};
use whispeer_relay::config::SlowConsumerPolicy;
use whispeer_relay::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_all_receive() {
    const N: usize = 1000;
    // Each connection costs two descriptors in this process (client and relay side).
    rlimit::increase_nofile_limit(4 * N as u64 + 256).expect("raise the fd limit");
    let mut config = Config::ephemeral();
    // Every connection comes from 127.0.0.1.
    config.limits.max_connections_per_addr = 2 * N;
    config.limits.addr_connect_rate = 0;
    let relay = TestRelay::start(config).await;
    let (tcp, ws) = (relay.tcp(), relay.ws());
    let mut clients = Vec::with_capacity(N);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        set.spawn(async move {
            let c = if i % 2 == 0 {
                subscriber_tcp(tcp, exact(1, &[1])).await
            } else {
                subscriber_ws(ws, exact(1, &[1])).await
            };
            (i, c)
        });
    }
    while let Some(r) = set.join_next().await {
        clients.push(r.expect("client task").1);
    }
    assert_eq!(relay.handle.metrics().snapshot().subscriptions, N as u64);
    let mut publ = Client::tcp(tcp).await;
    publ.hello().await;
    let env = envelope(1, &[1]);
    publ.publish(env.clone()).await;
    let mut set = tokio::task::JoinSet::new();
    for mut c in clients {
        let env = env.clone();
        set.spawn(async move {
            assert_eq!(c.expect_msg().await.envelope, env);
            c
        });
    }
    let mut alive = Vec::with_capacity(N);
    while let Some(r) = set.join_next().await {
        alive.push(r.expect("receiver task"));
    }
    assert_eq!(alive.len(), N);
    let snap = relay.handle.metrics().snapshot();
    assert_eq!(snap.connections, N as u64 + 1);
    assert_eq!(snap.messages_out, N as u64);
}

/// A TCP subscriber with a tiny receive buffer that stops reading after `SubOk`.
async fn stalled_subscriber(addr: std::net::SocketAddr) -> Client {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let mut c = Client::over_stream(Box::new(stream));
    c.hello().await;
    c.subscribe(1, exact(1, &[1])).await;
    c
}

const BIG: usize = 64 * 1024;
const COUNT: usize = 300;

fn slow_config(policy: SlowConsumerPolicy) -> Config {
    let mut c = Config::ephemeral();
    c.queue.capacity = 8;
    c.queue.slow_consumer = policy;
    c.limits.publish_rate = 0;
    // Generous: the stalled client reads only after the fast one got everything.
    c.timeouts.drain_ms = 120_000;
    c.timeouts.idle_ms = 600_000;
    c
}

/// Publishes COUNT large messages in lockstep with the fast subscriber (each is published
/// once the previous one arrived, so its own queue never fills): it must get every one of
/// them while the stalled one reads nothing.
async fn publish_past_a_stalled_client(relay: &TestRelay) -> Client {
    let mut fast = subscriber_ws(relay.ws(), exact(1, &[1])).await;
    let mut publ = Client::tcp(relay.tcp()).await;
    publ.hello().await;
    let mut last = 0;
    for i in 0..COUNT {
        let env = envelope_sized(1, &[1], BIG + i);
        publ.publish(env.clone()).await;
        let m = fast.expect_msg().await;
        assert_eq!(m.envelope, env);
        assert!(m.seq > last);
        last = m.seq;
    }
    fast
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_drop_policy_counts_gaps_and_does_not_delay_others() {
    let relay = TestRelay::start(slow_config(SlowConsumerPolicy::Drop)).await;
    let mut slow = stalled_subscriber(relay.tcp()).await;
    publish_past_a_stalled_client(&relay).await;
    let dropped = relay.handle.metrics().snapshot().dropped;
    assert!(
        dropped > 0,
        "the stalled client's queue must have overflowed"
    );

    // Now the stalled client reads: every message is either delivered or counted in a Gap.
    let (mut msgs, mut gaps, mut gap_frames) = (0u64, 0u64, 0);
    let mut last = 0;
    while msgs + gaps < COUNT as u64 {
        match slow.recv().await {
            Frame::Msg(m) => {
                assert!(m.seq > last, "order kept across drops");
                last = m.seq;
                msgs += 1;
            }
            Frame::Gap(g) => {
                assert!(g.dropped > 0);
                gaps += g.dropped;
                gap_frames += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(msgs + gaps, COUNT as u64);
    assert_eq!(gaps, dropped);
    assert!(gap_frames >= 1);
    // Still subscribed and healthy.
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    let env = envelope(1, &[1]);
    p.publish(env.clone()).await;
    assert_eq!(slow.expect_msg().await.envelope, env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_disconnect_policy() {
    let relay = TestRelay::start(slow_config(SlowConsumerPolicy::Disconnect)).await;
    let mut slow = stalled_subscriber(relay.tcp()).await;
    let mut fast = publish_past_a_stalled_client(&relay).await;
    assert_eq!(
        relay.handle.metrics().snapshot().slow_consumer_disconnects,
        1
    );
    let (frames, _) = slow.drain_to_end().await;
    let last = frames.last().expect("frames before the close");
    assert!(
        matches!(last, Frame::Err(e) if e.code == ErrorCode::SlowConsumer && e.fatal),
        "{last:?}"
    );
    assert!(frames[..frames.len() - 1]
        .iter()
        .all(|f| matches!(f, Frame::Msg(_))));
    // The others carry on.
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    let env = envelope(1, &[1]);
    p.publish(env.clone()).await;
    assert_eq!(fast.expect_msg().await.envelope, env);
}
