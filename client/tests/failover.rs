//! Failover between relays: a client given several relay URLs (`Relays`) moves to the next
//! when its relay dies, resubscribes and re-sends its unacknowledged QoS 1 publishes; a
//! resume position from one relay's sequence space is never used on another.
//!
//! Real `whispeer-relay` processes on 127.0.0.1 (port 0), killed with SIGKILL; every wait
//! is on an event (a message, a state or relay change), bounded only by `TIMEOUT`.

mod support;

/// relay/tests' real three-node nats-server cluster (JetStream, routes, free ports, ready on
/// log events), used as is; the four items after it are what it expects from its parent.
#[path = "../../relay/tests/common/nats.rs"]
mod nats;
const TIMEOUT: Duration = Duration::from_secs(30);
#[allow(dead_code)]
fn key(k: u8) -> whispeer_protocol::KeyId {
    whispeer_protocol::KeyId::from_bytes([k; 16])
}
#[allow(dead_code)]
fn tok(t: u8) -> whispeer_protocol::TopicToken {
    whispeer_protocol::TopicToken::from_bytes([t; 16])
}
fn temp_dir(tag: &str) -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("whispeer-client-test-{tag}-"))
        .tempdir()
        .expect("temp dir")
        .keep()
}

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{identity, keyring_with, start_relay_binary, tree, within, RelayProcess};
use whispeer::protocol::frame::Replay;
use whispeer::{
    Client, ConnectError, Encryption, Keyring, PublishOptions, Qos, Reconnect, Relays,
    SubscribeOptions, Subscription,
};

/// A client over these relays, reconnecting quickly (the backoff is per full round).
async fn client(urls: &[String], keys: Keyring) -> Result<Client, ConnectError> {
    Client::builder()
        .with(Relays::new(urls.iter().cloned()))
        .with(Encryption::with_keyring(keys))
        .with(identity())
        .with(Reconnect::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
        .connect()
        .await
}

/// An address nothing listens on, held for the whole test: a TCP socket bound to a port
/// but not listening, so a connection is refused and no other process can take the port.
fn dead_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

/// Stops (SIGSTOP) a relay process: it keeps its sockets but processes nothing.
fn freeze(r: &RelayProcess) {
    let st = std::process::Command::new("kill")
        .args(["-STOP", &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A TCP proxy to a relay that can swallow everything the relay sends back (`mute`): the
/// relay gets and delivers a client's publishes, the client never sees their `PubAck`s.
/// A connection ends when either side does.
async fn mute_proxy(upstream: std::net::SocketAddr) -> (String, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", l.local_addr().unwrap());
    let mute = Arc::new(AtomicBool::new(false));
    let m = mute.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(relay) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let m = m.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut rr, mut rw) = relay.into_split();
                let down = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = rr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        if !m.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = tokio::io::copy(&mut cr, &mut rw) => {}
                    _ = down => {}
                }
            });
        }
    });
    (url, mute)
}

/// Waits until `c` is connected to `url`.
async fn on_relay(what: &str, c: &Client, url: &str) {
    let mut rx = c.relay_changes();
    within(what, async {
        loop {
            if *rx.borrow_and_update() == url && c.state() == whispeer::ConnectionState::Connected {
                return;
            }
            let mut st = c.state_changes();
            tokio::select! {
                r = rx.changed() => r.unwrap(),
                r = st.changed() => r.unwrap(),
            }
        }
    })
    .await
}

/// Takes messages until every value in `want` was seen; returns how often each value came.
async fn take_until(
    what: &str,
    sub: &mut Subscription<u32>,
    seen: &mut BTreeMap<u32, u32>,
    want: impl IntoIterator<Item = u32>,
) {
    let want: Vec<u32> = want.into_iter().collect();
    within(what, async {
        while !want.iter().all(|v| seen.contains_key(v)) {
            let m = sub.next_message().await.expect("open").expect("a message");
            *seen.entry(m.value).or_default() += 1;
        }
    })
    .await
}

fn qos1() -> PublishOptions {
    PublishOptions::at_least_once()
}

/// Publishes each value on `feed/x` at QoS 1, one after another, each acknowledged.
async fn publish_acked(p: &Client, values: std::ops::RangeInclusive<u32>) {
    for v in values {
        // Bounded: a relay whose store refuses (retryable) would be retried forever.
        within(
            "a publish acknowledged",
            p.publish_with("feed/x", &v, qos1()),
        )
        .await
        .unwrap();
    }
}

/// Starts a QoS 1 publish of each value on `feed/x` without waiting for its `PubAck`.
fn publish_pending(
    p: &Client,
    values: std::ops::RangeInclusive<u32>,
) -> Vec<tokio::task::JoinHandle<Result<u64, whispeer::PublishError>>> {
    values
        .map(|v| {
            let p = p.clone();
            tokio::spawn(async move { p.publish_with("feed/x", &v, qos1()).await })
        })
        .collect()
}

/// A subscriber over `subscriber_relays` holding durable `name` on `feed/x` (QoS 1) and a
/// publisher at `publisher_relay`, both with tree `name`'s keys.
async fn durable_pair(
    subscriber_relays: &[String],
    publisher_relay: String,
    name: &str,
) -> (Client, Client, Subscription<u32>) {
    let t = tree(name);
    let sub_client = client(subscriber_relays, keyring_with(&t)).await.unwrap();
    let publisher = client(&[publisher_relay], keyring_with(&t)).await.unwrap();
    let sub = within(
        "the durable subscription",
        sub_client.subscribe_with_options::<u32>(
            "feed/x",
            SubscribeOptions::new().qos(Qos::AtLeastOnce).durable(name),
        ),
    )
    .await
    .unwrap();
    (sub_client, publisher, sub)
}

/// SIGKILLs a relay process and reaps it.
fn sigkill(mut r: RelayProcess) {
    r.child.kill().unwrap();
    r.child.wait().unwrap();
}

/// Everything from the start of the relay's history, then live: after a move to a relay of
/// another sequence space the subscription starts again as first asked, so what the
/// publisher re-sent there before the subscriber arrived is in that history.
fn all_history() -> SubscribeOptions {
    SubscribeOptions::new()
        .qos(Qos::AtLeastOnce)
        .replay(Replay::FromSeq(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_moves_both_clients_to_the_next_relay_exactly_once() {
    let a = start_relay_binary(&[]);
    let b = start_relay_binary(&[]);
    let t = tree("fo");
    let sub_client = client(&[a.ws_url(), b.tcp_url()], keyring_with(&t))
        .await
        .unwrap();
    // The publisher reaches A through a proxy that can hide A's answers from it.
    let (to_a, mute) = mute_proxy(a.tcp).await;
    let publisher = client(&[to_a.clone(), b.ws_url()], keyring_with(&t))
        .await
        .unwrap();
    assert_eq!(sub_client.relay_url(), a.ws_url());
    assert_eq!(publisher.relay_url(), to_a);
    let mut sub = sub_client
        .subscribe_with_options::<u32>("feed/x", all_history())
        .await
        .unwrap();
    let mut seen = BTreeMap::new();

    // 1..=20 through A, each acknowledged and received.
    publish_acked(&publisher, 1..=20).await;
    take_until("1..=20 on A", &mut sub, &mut seen, 1..=20).await;

    // 21..=30: A stores and delivers them, but their `PubAck`s never reach the publisher,
    // so it re-sends all ten to B, which delivers them again: the subscriber's dedup must
    // show each once.
    mute.store(true, Ordering::SeqCst);
    let mut pending = publish_pending(&publisher, 21..=30);
    take_until("21..=30 on A", &mut sub, &mut seen, 21..=30).await;
    let mut stats = publisher.stats_changes();
    within(
        "21..=30 kept",
        stats.wait_for(|s| s.unacked_publishes >= 10),
    )
    .await
    .unwrap();
    freeze(&a);
    // 31..=40 reach the frozen A's socket at most: never acknowledged, kept in the outbox.
    pending.extend(publish_pending(&publisher, 31..=40));
    // In the outbox (sent to the frozen A's socket, never acknowledged) before A dies.
    within(
        "31..=40 kept",
        stats.wait_for(|s| s.unacked_publishes >= 20),
    )
    .await
    .unwrap();
    sigkill(a);

    on_relay("subscriber on B", &sub_client, &b.tcp_url()).await;
    on_relay("publisher on B", &publisher, &b.ws_url()).await;
    mute.store(false, Ordering::SeqCst); // (A is gone; nothing goes through the proxy now)
    for p in pending {
        within("kept publishes acknowledged by B", p)
            .await
            .unwrap()
            .expect("acknowledged");
    }
    publish_acked(&publisher, 41..=50).await;
    take_until("31..=50 on B", &mut sub, &mut seen, 31..=50).await;
    // A last one: anything delivered twice before it would be counted by now.
    publisher
        .publish_with("feed/x", &51u32, qos1())
        .await
        .unwrap();
    take_until("the last one", &mut sub, &mut seen, [51]).await;

    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=51).collect::<Vec<_>>()
    );
    // 21..=30 came twice (from A, then from B after the publisher re-sent them): the
    // dedup window dropped the second copies (counted), the app saw each once (above).
    let dups = sub_client.stats().core.duplicates;
    assert!(dups >= 10, "duplicates dropped: {dups}");
    assert!(sub_client.stats().reconnects >= 1);
    assert!(publisher.stats().reconnects >= 1);
    assert_eq!(publisher.stats().unacked_publishes, 0);
    sub_client.close().await;
    publisher.close().await;
}

/// The same failover with the cluster's JetStream store (`--cluster-store jetstream`, a real
/// three-node nats-server cluster, R3): one sequence space on every relay, so a subscriber
/// that moves resumes from its position instead of starting again, and a publish a dead
/// relay acknowledged is in the stream for every other relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_cluster_failover_resumes_in_place_and_loses_no_acknowledged_message() {
    let Some(nats) = nats::NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let urls = nats.urls();
    let relay = |name: &str| {
        let args = nats::jetstream_relay_args(&urls, name);
        start_relay_binary(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (a, b, c) = (relay("fo-a"), relay("fo-b"), relay("fo-c"));
    let spaces = (
        welcome_space(&a).await,
        welcome_space(&b).await,
        welcome_space(&c).await,
    );
    assert!(
        spaces.0.is_some(),
        "the JetStream store names its sequence space"
    );
    assert!(
        spaces.0 == spaces.1 && spaces.1 == spaces.2,
        "one sequence space for the cluster: {spaces:?}"
    );
    let t = tree("fo-js");
    let sub_client = client(&[b.ws_url(), c.tcp_url()], keyring_with(&t))
        .await
        .unwrap();
    let (to_a, mute) = mute_proxy(a.tcp).await;
    let publisher = client(&[to_a.clone(), c.ws_url()], keyring_with(&t))
        .await
        .unwrap();
    let mut sub = sub_client
        .subscribe_with_options::<u32>("feed/x", all_history())
        .await
        .unwrap();
    let mut seen = BTreeMap::new();
    publish_acked(&publisher, 1..=20).await;
    take_until("1..=20 from A at B", &mut sub, &mut seen, 1..=20).await;

    // 21..=30: A puts them in the stream (B delivers them) but the acks never reach the
    // publisher; A dies; the publisher re-sends them at C.
    mute.store(true, Ordering::SeqCst);
    let pending = publish_pending(&publisher, 21..=30);
    take_until("21..=30 from A at B", &mut sub, &mut seen, 21..=30).await;
    sigkill(a);
    on_relay("publisher on C", &publisher, &c.ws_url()).await;
    for p in pending {
        within("re-sent publishes acknowledged by C", p)
            .await
            .unwrap()
            .expect("acknowledged");
    }
    // 31 follows the re-sent copies in the stream: once it arrives, so have they.
    publish_acked(&publisher, 31..=31).await;
    take_until("31 after the re-sent copies", &mut sub, &mut seen, [31]).await;
    let dups_before = sub_client.stats().core.duplicates;

    // 32..=41 are acknowledged (in the stream) while the subscriber's relay B is frozen,
    // then B dies: the subscriber moves to C and reads them from its resume position.
    freeze(&b);
    publish_acked(&publisher, 32..=41).await;
    sigkill(b);
    on_relay("subscriber on C", &sub_client, &c.tcp_url()).await;
    take_until("32..=41 from history at C", &mut sub, &mut seen, 32..=41).await;
    publish_acked(&publisher, 42..=42).await;
    take_until("live at C", &mut sub, &mut seen, [42]).await;

    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=42).collect::<Vec<_>>()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    // The re-sent 21..=30 are second copies in the stream, dropped by the client's dedup.
    assert!(dups_before >= 10, "duplicates dropped: {dups_before}");
    // Resumed in place: starting again from the first sequence would have re-read 1..=30
    // (and their re-sent copies) and counted them as duplicates.
    let after = sub_client.stats().core.duplicates - dups_before;
    assert!(
        after < 10,
        "the subscriber started over on C instead of resuming ({after} more duplicates)"
    );
    assert_eq!(publisher.stats().unacked_publishes, 0);
    sub_client.close().await;
    publisher.close().await;
    drop(nats);
}

/// A durable subscriber whose relay is frozen (SIGSTOP) and then killed, in a JetStream
/// cluster: the next relay refuses its resume (`Err(not_allowed)`) while the dead relay's
/// hold on the name has not lapsed; the client asks again with its reconnect backoff until
/// the hold lapses (a short TTL here), then resumes from the durable's floor and misses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_durable_subscriber_resumes_at_another_relay_once_the_hold_lapses() {
    let Some(nats) = nats::NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let urls = nats.urls();
    let relay = |name: &str| {
        let mut args = nats::jetstream_relay_args(&urls, name);
        args.extend(["--cluster-durable-lease-ms".to_string(), "1500".to_string()]);
        start_relay_binary(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (a, b) = (relay("fd-a"), relay("fd-b"));
    let (sub_client, publisher, mut sub) =
        durable_pair(&[a.ws_url(), b.tcp_url()], b.ws_url(), "fo-durable").await;
    let mut seen = BTreeMap::new();
    publish_acked(&publisher, 1..=5).await;
    take_until("1..=5 at A", &mut sub, &mut seen, 1..=5).await;

    freeze(&a);
    publish_acked(&publisher, 6..=10).await;
    sigkill(a);
    on_relay("subscriber on B", &sub_client, &b.tcp_url()).await;
    take_until(
        "6..=10 from the durable's floor at B",
        &mut sub,
        &mut seen,
        6..=10,
    )
    .await;
    publish_acked(&publisher, 11..=11).await;
    take_until("live at B", &mut sub, &mut seen, [11]).await;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    sub_client.close().await;
    publisher.close().await;
    drop(nats);
}

/// A durable subscription refused for good on a resume (here: the next relay keeps no store,
/// so it has no durable subscriptions — `not_allowed`) ends: its stream yields
/// `ReceiveError::Ended` with the relay's code, then `None` — not asked again forever, as a
/// name held elsewhere for now (`busy`) is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_refused_for_good_on_a_resume_ends_its_stream_with_the_reason() {
    let a = start_relay_binary(&[]);
    let b = start_relay_binary(&["--store", "none"]);
    let (sub_client, publisher, mut sub) =
        durable_pair(&[a.tcp_url(), b.tcp_url()], a.tcp_url(), "fo-ends").await;
    let mut seen = BTreeMap::new();
    publish_acked(&publisher, 1..=2).await;
    take_until("1..=2 at A", &mut sub, &mut seen, 1..=2).await;
    sigkill(a);
    let end = match within("the stream ends at B", sub.next_message()).await {
        Some(Ok(m)) => panic!("a message after the failover: {}", m.value),
        Some(Err(e)) => e,
        None => panic!("the stream ended without saying why"),
    };
    match &end {
        whispeer::ReceiveError::Ended { code, message } => {
            assert_eq!(*code, whispeer::protocol::ErrorCode::NotAllowed, "{end:?}");
            assert!(message.contains("no store"), "{end:?}");
        }
        other => panic!("expected Ended, got {other:?}"),
    }
    assert!(
        within("then None", sub.next_message()).await.is_none(),
        "the stream is over"
    );
    assert_eq!(sub_client.relay_url(), b.tcp_url(), "on B");
    sub_client.close().await;
    publisher.close().await;
}

/// Review finding: messages a durable subscription had buffered and the app had not taken
/// when the relay ended it are released (never acked, not remembered as seen) — the relay
/// delivers them again when the durable is resumed. So its stream does not yield them
/// after the end either (taken then, they would come twice): `Ended` comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_buffered_when_the_relay_ends_a_durable_are_not_yielded() {
    let a = start_relay_binary(&[]);
    let b = start_relay_binary(&["--store", "none"]);
    let (sub_client, publisher, mut sub) =
        durable_pair(&[a.tcp_url(), b.tcp_url()], a.tcp_url(), "fo-buffered").await;
    let mut seen = BTreeMap::new();
    publish_acked(&publisher, 1..=4).await;
    take_until("1..=2 at A", &mut sub, &mut seen, 1..=2).await;
    // 3 and 4 reached the client (its stream buffers them) but the app has not taken them.
    let mut stats = sub_client.stats_changes();
    within(
        "3 and 4 handed to the stream",
        stats.wait_for(|s| s.core.delivered >= 4),
    )
    .await
    .unwrap();
    let mut relay = sub_client.relay_changes();
    sigkill(a);
    // Taken before the client learns of the end, 3 is still the app's (the end is what
    // releases it): wait until it is live at B and B answered its resubscription (its
    // refusal comes before the answer to a flush sent after it).
    let b_url = b.tcp_url();
    within("live at B", relay.wait_for(|u| *u == b_url))
        .await
        .unwrap();
    within("B answered", sub_client.flush()).await.unwrap();
    match within("the stream ends at B", sub.next_message()).await {
        Some(Err(whispeer::ReceiveError::Ended { code, .. })) => {
            assert_eq!(code, whispeer::protocol::ErrorCode::NotAllowed)
        }
        Some(Ok(m)) => panic!("a released message was yielded after the end: {}", m.value),
        other => panic!("expected Ended, got {other:?}"),
    }
    assert!(within("then None", sub.next_message()).await.is_none());
    sub_client.close().await;
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_connect_skips_a_dead_relay_and_fails_only_when_all_are_dead() {
    let (_held, dead) = dead_port();
    let (_held2, dead2) = dead_port();
    let b = start_relay_binary(&[]);
    let t = tree("fo");
    let urls = [format!("ws://{dead}"), b.ws_url()];
    let sub_client = client(&urls, keyring_with(&t))
        .await
        .expect("connects to B");
    assert_eq!(sub_client.relay_url(), b.ws_url());
    let publisher = client(&[format!("tcp://{dead}"), b.tcp_url()], keyring_with(&t))
        .await
        .expect("connects to B");
    let mut sub = sub_client.subscribe::<u32>("feed/x").await.unwrap();
    publisher
        .publish_with("feed/x", &7u32, qos1())
        .await
        .unwrap();
    let mut seen = BTreeMap::new();
    take_until("7 through B", &mut sub, &mut seen, [7]).await;

    // Every relay down: the first connection fails after one round (no endless retry).
    let err = within(
        "connect over two dead relays",
        client(
            &[format!("ws://{dead}"), format!("tcp://{dead2}")],
            keyring_with(&t),
        ),
    )
    .await
    .expect_err("no relay answers");
    // The error of the last relay tried (the second dead one).
    match &err {
        ConnectError::Io { addr, .. } => assert!(addr.contains(&dead2.port().to_string()), "{err}"),
        other => panic!("expected Io, got {other:?}"),
    }
    sub_client.close().await;
    publisher.close().await;
}

/// B numbers its messages far below A: a subscriber that resumed "after A's sequence N" on
/// B would skip what B stored meanwhile. It must start again as first asked (here: B's
/// whole history), get what B stored, and then live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_position_is_not_used_in_another_sequence_space() {
    let a = start_relay_binary(&[]);
    let b = start_relay_binary(&[]);
    let t = tree("fo");
    let sub_client = client(&[a.ws_url(), b.ws_url()], keyring_with(&t))
        .await
        .unwrap();
    let mut sub = sub_client
        .subscribe_with_options::<u32>("feed/x", all_history())
        .await
        .unwrap();
    // A's numbers climb well past anything B will use.
    let on_a = client(&[a.tcp_url()], keyring_with(&t)).await.unwrap();
    let mut seen = BTreeMap::new();
    for v in 1..=60u32 {
        on_a.publish_with("feed/x", &v, qos1()).await.unwrap();
    }
    take_until("1..=60 on A", &mut sub, &mut seen, 1..=60).await;

    // Stored on B while the subscriber is on A: B's sequences 1..=5.
    let on_b = client(&[b.tcp_url()], keyring_with(&t)).await.unwrap();
    for v in 101..=105u32 {
        let seq = on_b.publish_with("feed/x", &v, qos1()).await.unwrap();
        assert!(seq <= 5, "B numbers from 1, got {seq}");
    }

    sigkill(a);
    on_relay("subscriber on B", &sub_client, &b.ws_url()).await;
    take_until("B's history", &mut sub, &mut seen, 101..=105).await;
    on_b.publish_with("feed/x", &106u32, qos1()).await.unwrap();
    take_until("live on B", &mut sub, &mut seen, [106]).await;
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    sub_client.close().await;
    on_a.close().await;
    on_b.close().await;
}

/// The `seq_space` a relay process sends in `Welcome`.
async fn welcome_space(r: &RelayProcess) -> Option<[u8; 16]> {
    use support::raw::{read_frame, write_frame};
    use whispeer::protocol::Frame;
    let mut s = tokio::net::TcpStream::connect(r.tcp).await.unwrap();
    write_frame(&mut s, &whispeer::core::ClientCore::hello("space-probe")).await;
    loop {
        match within("Welcome", read_frame(&mut s))
            .await
            .expect("a frame")
        {
            Frame::Welcome(w) => return w.seq_space,
            Frame::Challenge(_) => panic!("relay wants auth"),
            _ => {}
        }
    }
}

/// A SQLite store keeps its sequence space across a restart (its numbers go on, so clients
/// resume by sequence); another store, or a memory store, is another space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_names_the_store_and_a_file_store_keeps_it_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let args = ["--store", "sqlite", "--store-path", path.to_str().unwrap()];
    let mut a = start_relay_binary(&args);
    let first = welcome_space(&a)
        .await
        .expect("the relay names its sequence space");
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let a2 = start_relay_binary(&args);
    assert_eq!(
        welcome_space(&a2).await,
        Some(first),
        "same store, same space"
    );
    let other = start_relay_binary(&[]);
    let mem = start_relay_binary(&["--store", "memory"]);
    let others = [welcome_space(&other).await, welcome_space(&mem).await];
    assert!(others.iter().all(|s| s.is_some() && *s != Some(first)));
    assert_ne!(others[0], others[1]);
}

/// `Relays` from a comma-separated list (the form of the CLI's `--relay` and
/// `WHISPEER_RELAY`): blanks and empty entries dropped, a bare `host:port` is WebSocket only
/// on a loopback host; a bad URL fails `connect` at once, before any relay is dialed.
#[tokio::test]
async fn relay_lists_parse_and_a_bad_url_fails_connect() {
    assert_eq!(
        Relays::parse_list(" ws://a:1, ,tcp://b:2,127.0.0.1:3,localhost:4,[::1]:5 ").urls(),
        [
            "ws://a:1",
            "tcp://b:2",
            "ws://127.0.0.1:3",
            "ws://localhost:4",
            "ws://[::1]:5"
        ]
    );
    let err = client(
        &["ws://127.0.0.1:1".into(), "http://x:2".into()],
        Keyring::new(),
    )
    .await
    .expect_err("http:// is no relay URL");
    assert!(matches!(err, ConnectError::InvalidUrl { .. }), "{err:?}");
}

/// Review finding: a scheme-less relay address on a host other than loopback was read as
/// `ws://` — `relay.example:443` sent the account's bearer token (`Hello`) and all metadata
/// in cleartext. It is now refused at `connect`, before anything is dialed, with the fix in
/// the error.
#[tokio::test]
async fn a_scheme_less_relay_address_off_loopback_is_refused_not_plaintext() {
    for addr in [
        "relay.invalid:443",
        "192.0.2.7:7070",
        "[2001:db8::1]:443",
        "c:3",
    ] {
        assert_eq!(Relays::parse_list(addr).urls(), [addr], "kept as given");
        let err = client(
            &["ws://127.0.0.1:1".into(), addr.to_owned()],
            Keyring::new(),
        )
        .await
        .expect_err("no scheme");
        let ConnectError::InvalidUrl { url, reason, .. } = &err else {
            panic!("{addr}: {err:?}");
        };
        assert_eq!(url, addr);
        assert!(
            reason.contains("no scheme") && reason.contains(&format!("wss://{addr}")),
            "{err}"
        );
    }
}

/// With the cluster's JetStream store a QoS 0 publish is live-only and *unnumbered*
/// (sequence 0): nothing tracks it for a QoS 1 subscription, so nothing sends it again. A
/// QoS 1 subscription of capacity 2 whose app reads nothing, beside a QoS 0 one on the same
/// topic and connection, gets six such messages: the client must not hold the four beyond
/// the capacity back from both (it did, for want of the QoS 1 one's room: the QoS 0 one
/// lost them and neither app heard of it). The QoS 0 subscription gets all six; the QoS 1
/// one its two and a lag of four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnumbered_messages_beyond_a_qos1_subscriptions_room_reach_its_qos0_neighbour() {
    let Some(nats) = nats::NatsCluster::start(3) else {
        eprintln!("nats-server not installed (apt-get install -y nats-server): skipped");
        return;
    };
    let args = nats::jetstream_relay_args(&nats.urls(), "unnumbered");
    let relay = start_relay_binary(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let t = tree("unnumbered");
    let c = client(&[relay.tcp_url()], keyring_with(&t)).await.unwrap();
    let mut s = c
        .subscribe_with_options::<u32>(
            "u/#",
            SubscribeOptions::new().qos(Qos::AtLeastOnce).capacity(2),
        )
        .await
        .unwrap();
    let mut n = c
        .subscribe_with_options::<u32>("u/#", SubscribeOptions::new())
        .await
        .unwrap();
    let p = client(&[relay.tcp_url()], keyring_with(&t)).await.unwrap();
    for i in 0..6u32 {
        // Acknowledged once routed: each reaches the subscriber's connection in order.
        let seq = p
            .publish_with("u/x", &i, PublishOptions::default().ack())
            .await
            .unwrap();
        assert_eq!(seq, 0, "live-only QoS 0 is unnumbered with JetStream");
    }
    let mut got = Vec::new();
    within("the neighbour gets all six", async {
        while got.len() < 6 {
            got.push(n.next_message().await.unwrap().unwrap().value);
        }
    })
    .await;
    assert_eq!(got, (0..6).collect::<Vec<_>>());
    let (mut took, mut lost) = (Vec::new(), 0u64);
    within("the QoS 1 one's two and its lag", async {
        while took.len() < 2 || lost < 4 {
            match s.next_message().await.unwrap() {
                Ok(m) => took.push(m.value),
                Err(whispeer::ReceiveError::Lagged(k)) => lost += k,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!((took, lost), (vec![0, 1], 4));
    c.close().await;
    p.close().await;
}
