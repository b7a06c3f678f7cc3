//! Every configurable limit: the violating client gets a typed fatal `Err` and is closed;
//! the relay and the other clients carry on (checked with a probe after each case).
//! Also protocol-order errors, timeouts and plugin rejections.

mod common;

use std::sync::Arc;

use common::*;
use tokio_tungstenite::tungstenite::Message;
use whispeer_protocol::frame::{Ack, Close, Hello, Msg, Ping, Pub};
use whispeer_protocol::{Envelope, ErrorCode, Frame, Qos};
use whispeer_relay::plugin::{Plugin, PublishInfo, Rejection, SubscribeInfo, Verdict};
use whispeer_relay::{Config, Relay};

fn small_limits() -> Config {
    let mut c = Config::ephemeral();
    c.limits.max_frame = 4096;
    c.limits.max_subscriptions = 3;
    c.limits.max_filter_depth = 4;
    c.limits.publish_rate = 1;
    c.limits.publish_burst = 3;
    c
}

#[tokio::test]
async fn frame_size_limit_on_tcp_and_ws() {
    let relay = TestRelay::start(small_limits()).await;
    let mut probe = Probe::new(relay.tcp()).await;

    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    c.send_raw(&5000u32.to_be_bytes()).await.unwrap();
    c.expect_fatal(ErrorCode::FrameTooLarge).await;
    probe.check("tcp oversized frame").await;

    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    c.send_ws_message(Message::Binary(vec![0u8; 5000].into()))
        .await;
    c.expect_fatal(ErrorCode::FrameTooLarge).await;
    probe.check("ws oversized message").await;

    // A publish that fits is fine; one that does not is refused.
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    c.publish(envelope_sized(1, &[1], 5000)).await;
    c.expect_fatal(ErrorCode::FrameTooLarge).await;
    probe.check("oversized publish").await;
}

#[tokio::test]
async fn subscription_and_filter_depth_limits() {
    let relay = TestRelay::start(small_limits()).await;
    let mut probe = Probe::new(relay.tcp()).await;

    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    for i in 1..=3 {
        c.subscribe(i, exact(1, &[i as u8])).await;
    }
    // Replacing an existing id does not count as a new subscription.
    c.subscribe(2, exact(1, &[9])).await;
    c.send(&sub_frame(4, exact(1, &[4]))).await;
    let e = c.expect_fatal(ErrorCode::TooManySubscriptions).await;
    assert_eq!(e.sub_id, Some(4));
    probe.check("subscription flood").await;

    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    c.subscribe(1, exact(1, &[1, 2, 3, 4])).await;
    c.send(&sub_frame(2, exact(1, &[1, 2, 3, 4, 5]))).await;
    let e = c.expect_fatal(ErrorCode::InvalidFilter).await;
    assert_eq!(e.sub_id, Some(2));
    probe.check("deep filter").await;
}

#[tokio::test]
async fn connection_limit() {
    let mut config = small_limits();
    config.limits.max_connections = 3;
    let relay = TestRelay::start(config).await;
    let mut probe = Probe::new(relay.tcp()).await; // 2 of 3 connections
    let mut third = Client::ws(relay.ws()).await;
    third.hello().await;
    let mut fourth = Client::tcp(relay.tcp()).await;
    fourth.expect_fatal(ErrorCode::TooManyConnections).await;
    probe.check("connection refused").await;
    // Once the third leaves, a new client gets in (retry until the relay has noticed;
    // each attempt is answered at once, so this waits on events, not on time).
    drop(third);
    drop(fourth);
    loop {
        let mut c = Client::tcp(relay.tcp()).await;
        c.send(&hello_frame()).await;
        match c.recv().await {
            Frame::Welcome(_) => break,
            Frame::Err(e) => assert_eq!(e.code, ErrorCode::TooManyConnections),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Over its publish rate a publisher is slowed (its reads pause until the bucket refills),
/// never disconnected, and loses nothing: 200 unpaced publishes at 100/s (burst 10) all
/// arrive, in order, and take at least the time the bucket allows.
#[tokio::test]
async fn publish_rate_limit_slows_the_publisher_and_loses_nothing() {
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 100;
    config.limits.publish_burst = 10;
    let relay = TestRelay::start(config).await;
    let mut probe = Probe::new(relay.tcp()).await;
    let mut sub = subscriber_ws(relay.ws(), exact(1, &[1])).await;
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    let started = std::time::Instant::now();
    // Unpaced: far more than 10x the rate for as long as the socket accepts bytes.
    let publisher = tokio::spawn(async move {
        for i in 0..200u32 {
            let env = envelope_sized(1, &[1], 16 + i as usize);
            c.send(&Frame::Pub(Pub {
                envelope: env,
                flags: 0,
                publish_id: None,
                qos: Qos::AtMostOnce,
            }))
            .await;
        }
        c
    });
    for i in 0..200u32 {
        let m = sub.expect_msg().await;
        assert_eq!(
            m.envelope.len(),
            envelope_sized(1, &[1], 16 + i as usize).len()
        );
    }
    let elapsed = started.elapsed();
    // (200 - burst 10) / 100 per second: the bucket cannot let them through faster.
    assert!(
        elapsed >= std::time::Duration::from_millis(1_800),
        "not slowed: 200 publishes in {elapsed:?}"
    );
    // Still connected: a ping is answered.
    let mut c = publisher.await.unwrap();
    c.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: 7 }))
        .await;
    match c.recv().await {
        Frame::Pong(p) => assert_eq!(p.nonce, 7),
        other => panic!("expected Pong, got {other:?}"),
    }
    probe.check("rate limit").await;
}

/// `Sub` requests are rate limited by backpressure too: a flood of 60 at 20/s (burst 5) is
/// answered in full, in order, slowed to the rate, and the connection stays open.
#[tokio::test]
async fn sub_flood_is_slowed_not_kicked() {
    let mut config = Config::ephemeral();
    config.limits.sub_rate = 20;
    config.limits.sub_burst = 5;
    config.limits.max_subscriptions = 100;
    let relay = TestRelay::start(config).await;
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    let started = std::time::Instant::now();
    for i in 0..60u64 {
        c.send(&sub_frame(i, exact(1, &[i as u8]))).await;
    }
    for i in 0..60u64 {
        match c.recv().await {
            Frame::SubOk(ok) => assert_eq!(ok.sub_id, i),
            other => panic!("expected SubOk, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(2_500),
        "not slowed: 60 subs in {elapsed:?}"
    );
}

/// Six connections from 127.0.0.1 each send `make(connection, i)` for i in 0..10 and then
/// a `Ping`; returns how long until every one had its `Pong` (so every request was read;
/// a rate limit never refuses or disconnects).
async fn sixty_requests_from_one_address(
    addr: std::net::SocketAddr,
    make: fn(u8, u8) -> Frame,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..6u8 {
        tasks.push(tokio::spawn(async move {
            let mut cl = Client::tcp(addr).await;
            cl.hello().await;
            for i in 0..10u8 {
                cl.send(&make(c, i)).await;
            }
            cl.send(&Frame::Ping(Ping { nonce: 7 })).await;
            loop {
                match cl.recv().await {
                    Frame::Pong(p) if p.nonce == 7 => break,
                    Frame::SubOk(_) => {}
                    other => panic!("expected SubOk or Pong, got {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

/// Runs [`sixty_requests_from_one_address`] against a relay of `config` (whose per-address
/// rate for this request kind is 20/s, burst 5, per-connection rate off) and asserts it took
/// at least 2 s: the last request of each of the 6 connections can land together, so
/// (60 - 5 - 6) / 20 s — had each connection its own bucket, all 60 would fit at once.
async fn assert_an_address_shares_its_rate(config: Config, what: &str, make: fn(u8, u8) -> Frame) {
    let relay = TestRelay::start(config).await;
    let elapsed = sixty_requests_from_one_address(relay.tcp(), make).await;
    assert!(
        elapsed >= std::time::Duration::from_millis(2_000),
        "per-address {what} rate not shared: 60 from one address in {elapsed:?}"
    );
}

/// The per-address bucket is shared by every connection of the address, so opening more
/// connections (or reconnecting) does not multiply the rate.
#[tokio::test]
async fn per_address_sub_rate_is_shared_across_connections() {
    let mut config = Config::ephemeral();
    config.limits.sub_rate = 0;
    config.limits.addr_sub_rate = 20;
    config.limits.addr_sub_burst = 5;
    assert_an_address_shares_its_rate(config, "sub", |c, i| {
        sub_frame(u64::from(i), exact(1, &[c, i]))
    })
    .await;
}

/// `Ack` frames from one address share a bucket too (per-connection ack rate off).
#[tokio::test]
async fn per_address_ack_rate_is_shared_across_connections() {
    let mut config = Config::ephemeral();
    config.limits.ack_rate = 0;
    config.limits.addr_ack_rate = 20;
    config.limits.addr_ack_burst = 5;
    assert_an_address_shares_its_rate(config, "ack", |_, i| {
        Frame::Ack(Ack {
            seqs: vec![u64::from(i) + 1],
        })
    })
    .await;
}

/// Publishes from one address share its bucket too (`addr_publish_rate`; per-connection
/// rate off): opening more connections does not multiply an address's publishes, and
/// reaching the rate slows them down, never refuses them.
#[tokio::test]
async fn per_address_publish_rate_is_shared_across_connections() {
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 0;
    config.limits.addr_publish_rate = 20;
    config.limits.addr_publish_burst = 5;
    assert_an_address_shares_its_rate(config, "publish", |c, i| pub_frame(envelope(1, &[c, i])))
        .await;
}

/// A `Sub` that asks for history costs `replay_cost` tokens of the sub rate, not one: a
/// replay reads the store, so a client cannot ask for history as often as for live
/// subscriptions. 10 replaying Subs at 100/s (burst 10) and a cost of 10 take 100 tokens:
/// each answered (`SubOk`, then `ReplayDone`), none refused, and slowed to the bucket's
/// (100 - 10) / 100 s; at a cost of one token they would all fit in the burst.
#[tokio::test]
async fn a_replaying_sub_costs_replay_cost_tokens_of_the_sub_rate() {
    use whispeer_protocol::frame::{features, Replay, Sub};
    let mut config = Config::ephemeral();
    config.limits.sub_rate = 100;
    config.limits.sub_burst = 10;
    config.limits.replay_cost = 10;
    config.limits.max_subscriptions = 100;
    let relay = TestRelay::start(config).await;
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello_with(features::REPLAY).await;
    let started = std::time::Instant::now();
    for i in 0..10u64 {
        let mut sub = Sub::live(i, exact(1, &[i as u8]));
        sub.replay = Some(Replay::FromSeq(0));
        c.send(&Frame::Sub(sub)).await;
    }
    let (mut ok, mut done) = (0, 0);
    while done < 10 {
        match c.recv().await {
            Frame::SubOk(s) => {
                assert_eq!(s.sub_id, ok);
                ok += 1;
            }
            Frame::ReplayDone(_) => done += 1,
            other => panic!("expected SubOk or ReplayDone, got {other:?}"),
        }
    }
    assert_eq!(ok, 10);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(800),
        "replaying Subs not charged replay_cost: 10 of them in {elapsed:?}"
    );
}

/// `Unsub` is charged to the sub buckets like `Sub`, and a durable `Sub` costs `replay_cost`
/// tokens like a replaying one (README: "`Sub`/`Unsub` slowed the same way; a `Sub` with
/// replay or a durable name costs `replay_cost` tokens"). Counted, not timed: a burst of
/// 5 tokens, so 10 `Unsub`s (each answered `unknown_subscription`) pause their reader, and
/// so does one durable `Sub` at a cost of 10; uncharged, neither would pause anything.
/// Each on an address of its own (the per-address sub bucket is not the one tested).
#[tokio::test]
async fn unsubs_and_durable_subs_are_charged_to_the_sub_rate() {
    use whispeer_protocol::frame::{features, Sub, Unsub};
    let mut config = Config::ephemeral();
    config.limits.sub_rate = 20;
    config.limits.sub_burst = 5;
    config.limits.replay_cost = 10;
    let relay = TestRelay::start(config).await;
    let (addr, admin) = (relay.tcp(), relay.addrs.admin.expect("admin"));
    let throttled = || metric(admin, "whispeer_relay_throttled_total");
    assert_eq!(throttled().await, 0);

    let mut c = Client::tcp_from(addr, "127.0.0.2").await;
    c.hello().await;
    for sub_id in 0..10u64 {
        c.send(&Frame::Unsub(Unsub {
            sub_id,
            delete: None,
        }))
        .await;
    }
    for sub_id in 0..10u64 {
        let e = c.expect_err().await;
        assert_eq!(
            (e.code, e.fatal, e.sub_id),
            (ErrorCode::UnknownSubscription, false, Some(sub_id)),
            "{e:?}"
        );
    }
    let after_unsubs = throttled().await;
    assert!(
        after_unsubs >= 1,
        "10 Unsubs over a burst of 5 never paused"
    );

    let mut c = Client::tcp_from(addr, "127.0.0.3").await;
    c.hello_with(features::AT_LEAST_ONCE | features::DURABLE)
        .await;
    let mut sub = Sub::live(1, exact(1, &[1]));
    sub.qos = Qos::AtLeastOnce;
    sub.durable = Some("d".into());
    c.send(&Frame::Sub(sub)).await;
    match c.recv().await {
        Frame::SubOk(ok) => assert_eq!(ok.sub_id, 1),
        other => panic!("expected SubOk, got {other:?}"),
    }
    // The pause begins after the frame that went into debt: counted once its answer left.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while throttled().await == after_unsubs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a durable Sub costing 10 tokens over a burst of 5 never paused"
        );
        tokio::task::yield_now().await;
    }
}

/// A relay with auth required and one token account (its token returned), every
/// per-connection and per-address rate off: only the account's buckets, which `set` sets,
/// can pause a reader.
async fn one_account_relay(
    tag: &str,
    set: impl FnOnce(&mut whispeer_relay::config::Limits),
) -> (TestRelay, String) {
    let dir = temp_dir(tag);
    let file = dir.join("accounts.toml");
    let out = account_add(&file, "alice", &["--token"]);
    let token = out.trim().lines().last().unwrap().to_string();
    let mut config = Config::ephemeral();
    config.auth.mode = whispeer_relay::config::AuthMode::Required;
    config.auth.accounts = Some(file);
    let l = &mut config.limits;
    (l.publish_rate, l.sub_rate, l.ack_rate) = (0, 0, 0);
    (l.addr_publish_rate, l.addr_sub_rate, l.addr_ack_rate) = (0, 0, 0);
    set(l);
    (TestRelay::start(config).await, token)
}

/// Sends `frames` then a `Ping`, and reads up to its `Pong` (non-fatal `Err`s and `SubOk`s
/// in between are the frames' answers): every frame was read and handled by then.
async fn frames_then_pong(c: &mut Client, frames: &[Frame]) {
    for f in frames {
        c.send(f).await;
    }
    c.send(&Frame::Ping(Ping { nonce: 77 })).await;
    loop {
        match c.recv().await {
            Frame::Pong(p) if p.nonce == 77 => return,
            Frame::Err(e) if !e.fatal => continue,
            Frame::SubOk(_) => continue,
            other => panic!("expected answers and the Pong, got {other:?}"),
        }
    }
}

/// One account on two addresses (127.0.0.2, then 127.0.0.3) sends `frames(0)` then
/// `frames(1)`, each followed by a `Ping`: the first half fits in the account's burst and
/// pauses nothing; the second takes the account into debt and its reader pauses
/// (`whispeer_relay_throttled_total`, counted not timed). Only the account's buckets are
/// on, so a frame kind not charged to them pauses nothing at all.
async fn account_buckets_pause(
    tag: &str,
    what: &str,
    features: u64,
    set: impl FnOnce(&mut whispeer_relay::config::Limits),
    frames: impl Fn(usize) -> Vec<Frame>,
) {
    let (relay, token) = one_account_relay(tag, set).await;
    let admin = relay.addrs.admin.expect("admin");
    let throttled = || metric(admin, "whispeer_relay_throttled_total");
    let mut first = Client::token_login_from(relay.tcp(), "127.0.0.2", &token, features).await;
    let mut second = Client::token_login_from(relay.tcp(), "127.0.0.3", &token, features).await;
    let before = throttled().await;
    frames_then_pong(&mut first, &frames(0)).await;
    assert_eq!(
        throttled().await,
        before,
        "{what}: the first connection's half fits in the account's burst"
    );
    frames_then_pong(&mut second, &frames(1)).await;
    // The pause begins after the frame that went into debt: counted once its answer left.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while throttled().await == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the account's two connections together went over its burst and never \
             paused: not charged to the account's bucket"
        );
        tokio::task::yield_now().await;
    }
    drop((first, second));
    relay.stop().await;
}

/// `Pong`s and a client's non-fatal `Err`s are charged to the account's ack bucket, shared
/// by its connections on any address (README, `limits.ack_rate`: "charged to the same
/// buckets (connection, address, account)"). Burst 20: 14 `Pong`s and a `Ping` from one
/// address (15 tokens), 14 `Err`s and a `Ping` from another (15 more) take it into debt;
/// with either kind uncharged the account spends 16 and nothing pauses.
#[tokio::test]
async fn pongs_and_errs_are_charged_to_the_accounts_ack_bucket() {
    use whispeer_protocol::frame::{ErrFrame, Pong};
    let frames = |half: usize| -> Vec<Frame> {
        (0..14u64)
            .map(|i| match half {
                0 => Frame::Pong(Pong { nonce: i }),
                _ => Frame::Err(ErrFrame {
                    code: ErrorCode::Other(0),
                    message: "not fatal".into(),
                    fatal: false,
                    sub_id: None,
                    publish_id: None,
                }),
            })
            .collect()
    };
    account_buckets_pause(
        "acct-pong-err",
        "Pongs then Errs",
        0,
        |l| (l.account_ack_rate, l.account_ack_burst) = (4, 20),
        frames,
    )
    .await;
}

/// `Unsub` is charged to the account's sub bucket (README: `Sub`/`Unsub` slowed the same
/// way; the account buckets are "shared by all connections of one account, from any
/// address"). Burst 20: 15 `Unsub`s from each of two addresses (each answered
/// `unknown_subscription`) take it into debt; uncharged, nothing pauses.
#[tokio::test]
async fn unsubs_are_charged_to_the_accounts_sub_bucket() {
    use whispeer_protocol::frame::Unsub;
    account_buckets_pause(
        "acct-unsub",
        "Unsubs",
        0,
        |l| (l.account_sub_rate, l.account_sub_burst) = (4, 20),
        |_| {
            (0..15u64)
                .map(|sub_id| {
                    Frame::Unsub(Unsub {
                        sub_id,
                        delete: None,
                    })
                })
                .collect()
        },
    )
    .await;
}

/// A durable `Sub` costs `replay_cost` tokens of the account's sub bucket too, not one.
/// `replay_cost` 20, burst 30: one durable `Sub` from each of two addresses (40 tokens)
/// take it into debt; charged one token each, nothing pauses.
#[tokio::test]
async fn a_durable_sub_costs_replay_cost_of_the_accounts_sub_bucket() {
    use whispeer_protocol::frame::{features, Sub};
    account_buckets_pause(
        "acct-durable",
        "durable Subs",
        features::AT_LEAST_ONCE | features::DURABLE,
        |l| {
            (l.account_sub_rate, l.account_sub_burst) = (4, 30);
            l.replay_cost = 20;
        },
        |half| {
            let mut sub = Sub::live(1, exact(1, &[1]));
            sub.qos = Qos::AtLeastOnce;
            sub.durable = Some(format!("d{half}"));
            vec![Frame::Sub(sub)]
        },
    )
    .await;
}

/// Connection churn from one address is slowed, not refused: over `addr_connect_rate` a new
/// connection waits for the address's bucket before its handshake (every one still gets its
/// `Welcome`), hanging up and reconnecting does not reset the bucket, and another address
/// has its own.
#[tokio::test]
async fn connection_churn_from_one_address_is_slowed_not_refused() {
    let mut config = Config::ephemeral();
    config.limits.addr_connect_rate = 10;
    config.limits.addr_connect_burst = 2;
    let relay = TestRelay::start(config).await;
    let (addr, admin) = (relay.tcp(), relay.addrs.admin.expect("admin"));
    let throttled = || metric(admin, "whispeer_relay_throttled_total");
    let started = std::time::Instant::now();
    // Six connections in a row, each hung up once welcomed: the burst (2) is not delayed,
    // the other four wait one token (100 ms) each.
    for i in 0..6 {
        let mut c = Client::tcp(addr).await;
        c.send(&hello_frame()).await;
        match c.recv().await {
            Frame::Welcome(_) => {}
            other => panic!("connection {i}: expected Welcome, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    // A lower bound only: the relay cannot have let them through faster than its rate.
    assert!(
        elapsed >= std::time::Duration::from_millis(350),
        "6 connections from one address at 10/s (burst 2) in {elapsed:?}"
    );
    // Up to four were delayed (fewer only if this test was itself slower than the rate).
    let delayed = throttled().await;
    assert!((1..=4).contains(&delayed), "{delayed} connections delayed");
    // Another address (127.0.0.2) has its own bucket: not delayed.
    let mut other = Client::tcp_from(addr, "127.0.0.2").await;
    other.hello().await;
    assert_eq!(throttled().await, delayed, "another address was delayed");
}

/// An address at its connection cap that is also over its connect rate (churning) has a
/// further connection closed at once without an answer; the same cap reached without churn
/// is explained with `Err(too_many_connections)` (`connection_flood_from_one_address_is_capped`).
#[tokio::test]
async fn a_churning_address_at_its_cap_is_closed_unanswered() {
    let mut config = Config::ephemeral();
    config.limits.max_connections_per_addr = 4;
    config.limits.addr_connect_rate = 1;
    config.limits.addr_connect_burst = 1;
    let relay = TestRelay::start(config).await;
    let addr = relay.tcp();
    // The first takes the burst, the others wait 1, 2 and 3 s for their handshakes: the
    // address stays in debt for 3 s.
    let mut open = relay.handle.connections();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::timeout(TIMEOUT, open.wait_for(|n| *n == 4))
        .await
        .expect("all four counted")
        .expect("relay running");
    let mut c = Client::tcp(addr).await;
    let (frames, _) = c.drain_to_end().await;
    assert!(
        frames.is_empty(),
        "a churning address was answered: {frames:?}"
    );
}

/// A churning address is banned before accept (Linux: a socket filter on the listeners):
/// its next connect is not answered by the kernel while another address connects and its
/// connection already open keeps working; once the ban ends, the stalled connect completes
/// (the client's SYN retransmitted, as after packet loss) and is served.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_churning_address_is_banned_before_accept() {
    churn_ban("127.0.0.1:0", "127.0.0.3", "127.0.0.4").await;
}

/// The same on a dual-stack IPv6 listener: an IPv6 churner (::1, banned by its /64) is
/// dropped by the filter's IPv6 branch while an IPv4 client (mapped) still connects.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_churning_ipv6_address_is_banned_before_accept() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    }
    churn_ban("[::]:0", "::1", "127.0.0.4").await;
}

/// A source banned for churn on TCP is banned on QUIC too (no socket filter covers UDP:
/// the QUIC listener drops its attempts unanswered): its QUIC connect stalls while another
/// address's QUIC client is welcomed, and completes once the ban ends (its client resends
/// its Initial). Before, a banned address kept its QUIC access.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_address_is_banned_on_quic_too() {
    let (cert, quic) = quic_relay_args(&temp_dir("quic-ban"));
    let mut args: Vec<&str> = quic.iter().map(String::as_str).collect();
    args.extend([
        "--max-connections-per-addr",
        "2",
        "--addr-connect-rate",
        "1",
        "--addr-connect-burst",
        "1",
        "--addr-churn-ban-secs",
        "2",
    ]);
    let relay = BinRelay::start(&args);
    let (port, admin, quic) = (
        relay.tcp().port(),
        relay.admin(),
        relay.addrs.quic.expect("quic"),
    );
    let churner: std::net::IpAddr = "127.0.0.41".parse().unwrap();
    // At its cap (one welcomed, one waiting for its handshake) and over its connect rate:
    // a third TCP connect is churn and bans it.
    let mut open = client_from(port, churner).await;
    open.hello().await;
    let waiting = client_from(port, churner).await;
    let mut refused = client_from(port, churner).await;
    let (frames, _) = refused.drain_to_end().await;
    assert!(frames.is_empty(), "answered: {frames:?}");
    assert_eq!(metric(admin, "whispeer_relay_addr_bans_total").await, 1);
    drop(waiting);
    // Its QUIC connect stalls ...
    let stalled = tokio::spawn(quic_hello(cert.clone(), "127.0.0.41", quic));
    // ... while another address's is welcomed (after the stalled one's Initial was sent).
    quic_hello(cert.clone(), "127.0.0.42", quic).await;
    open.subscribe(1, exact(1, &[1])).await;
    assert!(
        !stalled.is_finished(),
        "a banned address's QUIC connect was answered (refused or served)"
    );
    // The ban ends (2 s): its resent Initial gets through.
    tokio::time::timeout(TIMEOUT, stalled)
        .await
        .expect("the QUIC connect completed after the ban")
        .expect("welcomed");
}

/// A QUIC connection stays open for the drain time after its session ended (so its last
/// frames reach the client) and counts against its source address's cap meanwhile. Its
/// slot was given back as the session ended: a client that kept ended sessions open held
/// connections no cap counted (and, its stream ended, room to open another).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_connection_draining_after_its_session_still_counts_against_its_address() {
    let (cert, quic) = quic_relay_args(&temp_dir("quic-linger"));
    let mut args: Vec<&str> = quic.iter().map(String::as_str).collect();
    args.extend(["--max-connections-per-addr", "1", "--drain-ms", "60000"]);
    let relay = BinRelay::start(&args);
    let (port, admin, quic) = (
        relay.tcp().port(),
        relay.admin(),
        relay.addrs.quic.expect("quic"),
    );
    let from = "127.0.0.43";
    let endpoint = quic_endpoint(&cert, from);
    let conn = endpoint.connect(quic, "localhost").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&whispeer_protocol::codec::encode_prefixed(&hello_frame()))
        .await
        .unwrap();
    let mut c = Client::over_stream(Box::new(tokio::io::join(recv, tokio::io::sink())));
    assert!(matches!(c.recv().await, Frame::Welcome(_)), "welcomed");
    // The client ends its stream (the session ends) and keeps the connection open.
    send.finish().unwrap();
    c.drain_to_end().await;
    let gauge = "whispeer_relay_connections{transport=\"quic\"}";
    tokio::time::timeout(TIMEOUT, async {
        while metric(admin, gauge).await > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the QUIC session ended");
    // Its address is still at its cap: another connection from it is refused.
    let mut tcp = client_from(port, from.parse().unwrap()).await;
    tcp.expect_fatal(ErrorCode::TooManyConnections).await;
    drop(conn);
}

/// Review finding: quinn holds what the relay wrote to a QUIC connection and the client has
/// not acknowledged, up to the connection's send window, outside every relay budget. The
/// windows share `limits.quic_send_window_total`: each connection gets the total divided by
/// the open connections (at most 2 MiB, at least 64 KiB), set again every second — so they
/// shrink as connections open and grow back as they close (not first come, first served).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_send_windows_share_the_total_and_grow_back_when_connections_close() {
    let (cert, quic) = quic_relay_args(&temp_dir("quic-windows"));
    let mut args: Vec<&str> = quic.iter().map(String::as_str).collect();
    let total = (3u64 << 20).to_string();
    args.extend(["--quic-send-window-total", &total, "--drain-ms", "0"]);
    let relay = BinRelay::start(&args);
    let (admin, quic) = (relay.admin(), relay.addrs.quic.expect("quic"));
    let gauge = "whispeer_relay_quic_send_window_bytes";
    let wait_for = |want: u64, what: &'static str| async move {
        tokio::time::timeout(TIMEOUT, async {
            while metric(admin, gauge).await != want {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: {gauge} never reached {want}"));
    };
    let mut conns = Vec::new();
    // One: 2 MiB (the most); two: 1.5 MiB each; three: 1 MiB each.
    for (i, want) in [(1, 2u64 << 20), (2, 3 << 20), (3, 3 << 20)] {
        conns.push(quic_session(&cert, &format!("127.0.0.{}", 50 + i), quic).await);
        wait_for(want, "the windows share the total").await;
    }
    // Two close: the one left grows back from 1 MiB to 2 MiB.
    for (endpoint, conn, c) in conns.drain(..2) {
        drop(c);
        conn.close(0u32.into(), b"bye");
        endpoint.wait_idle().await;
    }
    wait_for(2 << 20, "the window left grew back").await;
    drop(conns);
}

/// Connects over QUIC from `from` (a loopback address), sends `Hello` and waits for
/// `Welcome`.
async fn quic_hello(cert: std::path::PathBuf, from: &str, to: std::net::SocketAddr) {
    // Keeping the connection (and its endpoint) until the test's end is not needed: closed.
    drop(quic_session(&cert, from, to).await);
}

/// A QUIC session from `from` (a loopback address): connected, `Hello` sent, `Welcome`
/// read. The endpoint and connection come with the client (dropping them closes it).
async fn quic_session(
    cert: &std::path::Path,
    from: &str,
    to: std::net::SocketAddr,
) -> (quinn::Endpoint, quinn::Connection, Client) {
    let endpoint = quic_endpoint(cert, from);
    let conn = endpoint.connect(to, "localhost").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&whispeer_protocol::codec::encode_prefixed(&hello_frame()))
        .await
        .unwrap();
    let mut c = Client::over_stream(Box::new(tokio::io::join(recv, send)));
    assert!(matches!(c.recv().await, Frame::Welcome(_)), "welcomed");
    (endpoint, conn, c)
}

/// A TCP client from `from` to the relay's `port` on the loopback of `from`'s family.
async fn client_from(port: u16, from: std::net::IpAddr) -> Client {
    let (sock, to) = match from {
        std::net::IpAddr::V4(_) => (
            tokio::net::TcpSocket::new_v4().unwrap(),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ),
        std::net::IpAddr::V6(_) => (
            tokio::net::TcpSocket::new_v6().unwrap(),
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        ),
    };
    sock.bind(std::net::SocketAddr::new(from, 0))
        .expect("bind the source address");
    let s = sock.connect(to).await.expect("connect tcp");
    s.set_nodelay(true).ok();
    Client::over_stream(Box::new(s))
}

async fn churn_ban(listen: &str, churner: &str, other: &str) {
    let mut config = Config::ephemeral();
    config.listen.tcp = whispeer_relay::config::ListenAddr::on(listen.parse().unwrap());
    config.limits.max_connections_per_addr = 2;
    config.limits.addr_connect_rate = 1;
    config.limits.addr_connect_burst = 1;
    config.limits.addr_churn_ban_secs = 1;
    let relay = TestRelay::start(config).await;
    let (port, admin) = (relay.tcp().port(), relay.addrs.admin.expect("admin"));
    let churner: std::net::IpAddr = churner.parse().unwrap();
    // One welcomed connection (the burst), one waiting for its handshake (in debt): the
    // address is at its cap and over its connect rate.
    let mut open = client_from(port, churner).await;
    open.hello().await;
    let mut count = relay.handle.connections();
    let waiting = client_from(port, churner).await;
    tokio::time::timeout(TIMEOUT, count.wait_for(|n| *n == 2))
        .await
        .expect("both counted")
        .expect("relay running");
    // A third is churn: closed unanswered, and the address banned.
    let mut refused = client_from(port, churner).await;
    let (frames, _) = refused.drain_to_end().await;
    // The ban (its first: 1 s) is in place by now.
    let banned_at = std::time::Instant::now();
    assert!(
        frames.is_empty(),
        "a churning address was answered: {frames:?}"
    );
    assert_eq!(metric(admin, "whispeer_relay_addr_bans_total").await, 1);
    assert_eq!(metric(admin, "whispeer_relay_addr_banned").await, 1);
    assert_eq!(
        relay.handle.status().banned_addresses,
        1,
        "/status counts it"
    );
    let rejected = metric(admin, "whispeer_relay_connections_rejected_total").await;
    // Its slot frees as the relay sees it close, though it still waits for its connect
    // rate (before, only after that 1 s wait: a race with the ban's end on a loaded machine,
    // where the stalled connect was then refused at the address's cap).
    drop(waiting);
    // Banned: a connect from it stalls in the kernel ...
    let stalled = tokio::spawn(async move {
        let mut c = client_from(port, churner).await;
        c.hello().await
    });
    // ... while another address connects, and the banned address's open connection is
    // served, both after the stalled SYN was sent.
    let mut other = client_from(port, other.parse().unwrap()).await;
    other.hello().await;
    open.subscribe(1, exact(1, &[1])).await;
    other.subscribe(1, exact(1, &[1])).await;
    // Only while the 1 s ban surely lasts: on a loaded machine the steps above can take
    // longer, and the stalled connect then rightly completes (a flaky failure seen in the
    // full suite). The ban itself is shown by the metrics above either way.
    if banned_at.elapsed() < std::time::Duration::from_millis(700) {
        assert!(
            !stalled.is_finished(),
            "a banned address's connect completed"
        );
    }
    // The ban ends (1 s); the retransmitted SYN gets through and the client is welcomed,
    // never having been refused at accept.
    tokio::time::timeout(std::time::Duration::from_secs(30), stalled)
        .await
        .expect("the stalled connect completed after the ban")
        .expect("welcomed");
    assert_eq!(
        metric(admin, "whispeer_relay_connections_rejected_total").await,
        rejected
    );
}

/// A WebSocket client in the middle of a fragmented message holds `max_frame` of the
/// large-frame budget; pings between its fragments (RFC 6455 allows them) must not keep it
/// alive, or a few such clients would hold the whole budget for ever and stall every large
/// frame on the relay. It is closed at its idle timeout like any partial frame's sender.
#[tokio::test]
async fn pings_between_fragments_do_not_keep_a_partial_message_alive() {
    use tokio_tungstenite::tungstenite::protocol::frame::{coding, Frame as WsFrame};
    let mut config = Config::ephemeral();
    config.timeouts.idle_ms = 1_500;
    config.timeouts.heartbeat_ms = 500;
    // After the close the relay reads on for `drain_ms` (the pinger never stops).
    config.timeouts.drain_ms = 500;
    // (The first idle check comes at the Hello deadline.)
    config.timeouts.hello_ms = 1_000;
    let relay = TestRelay::start(config).await;
    let mut count = relay.handle.connections();
    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    // The first fragment of a binary message, past the 64 KiB that take no budget.
    let first = WsFrame::message(
        vec![0u8; 65_537],
        coding::OpCode::Data(coding::Data::Binary),
        false,
    );
    c.send_ws_message(Message::Frame(first)).await;
    // A ping every 200 ms, never the rest of the message.
    let pinger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tick.tick().await;
            c.send_ws_message(Message::Ping(Vec::new().into())).await;
        }
    });
    // Closed by its idle timeout (1.5 s), not kept by the pings.
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        count.wait_for(|n| *n == 0),
    )
    .await
    .expect("the partial message's sender was closed at its idle timeout")
    .expect("relay running");
    pinger.abort();
}

/// Refused connects count against the address's connect rate: an address that holds its
/// cap and keeps connecting is churning (closed unanswered and banned), however full its
/// bucket was when it reached the cap — refusals used to cost the bucket nothing, so such an
/// address was answered `too_many_connections` at any speed and never banned.
#[tokio::test]
async fn an_address_at_its_cap_that_keeps_connecting_is_banned() {
    let mut config = Config::ephemeral();
    config.limits.max_connections_per_addr = 2;
    config.limits.addr_connect_rate = 1;
    config.limits.addr_connect_burst = 2;
    config.limits.addr_churn_ban_secs = 1;
    let relay = TestRelay::start(config).await;
    let (port, admin) = (relay.tcp().port(), relay.addrs.admin.expect("admin"));
    let ip: std::net::IpAddr = "127.0.0.23".parse().unwrap();
    // Both places, within the burst: no debt.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = client_from(port, ip).await;
        c.hello().await;
        held.push(c);
    }
    // One more, right away: over the connect rate at the cap.
    let mut refused = client_from(port, ip).await;
    let (frames, _) = refused.drain_to_end().await;
    assert!(frames.is_empty(), "answered instead of closed: {frames:?}");
    assert_eq!(metric(admin, "whispeer_relay_addr_bans_total").await, 1);
    // Its held connections are still served.
    held[0].subscribe(1, exact(1, &[1])).await;
}

/// One network's addresses together are capped (`max_connections_per_network`; an IPv4
/// /24 by default): sources 127.0.1.1 to 127.0.1.5, each under its own cap, fill their /24,
/// a sixth address and a second connection of the first are refused with the typed error
/// naming the network's cap, and a source of another /24 (127.0.2.1) still connects and is
/// served. Without the cap one IPv6 /48, or 40 addresses of one network, held every place.
/// The real binary, so the flag is checked too.
#[tokio::test]
async fn one_network_cannot_take_more_than_its_cap() {
    let relay = BinRelay::start(&[
        "--max-connections-per-addr",
        "2",
        "--max-connections-per-network",
        "5",
        "--max-connections",
        "100",
    ]);
    let (port, admin) = (relay.tcp().port(), relay.admin());
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let mut held = Vec::new();
    for i in 1..=5 {
        let mut c = client_from(port, ip(&format!("127.0.1.{i}"))).await;
        c.hello().await;
        held.push(c);
    }
    for from in ["127.0.1.6", "127.0.1.1"] {
        let mut c = client_from(port, ip(from)).await;
        let e = c.expect_fatal(ErrorCode::TooManyConnections).await;
        assert!(e.message.contains("per network"), "{from}: {}", e.message);
    }
    assert_eq!(
        metric(
            admin,
            "whispeer_relay_connections_refused_total{cap=\"per_network\"}"
        )
        .await,
        2
    );
    // Another network is not affected, and the held connections are served.
    let mut other = client_from(port, ip("127.0.2.1")).await;
    other.hello().await;
    other.subscribe(1, exact(1, &[1])).await;
    held[0].subscribe(1, exact(1, &[1])).await;
    // A connection of the network closed gives its place back (each attempt is answered
    // at once: this waits on the relay noticing the close, not on time).
    drop(held.pop());
    loop {
        let mut c = client_from(port, ip("127.0.1.6")).await;
        c.send(&hello_frame()).await;
        match c.recv().await {
            Frame::Welcome(_) => break,
            Frame::Err(e) => assert!(e.message.contains("per network"), "{}", e.message),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Many addresses of one network, each refused once at the network's full cap (a /48
/// rotating its /64s; here the /24 127.0.3.0, an IPv4 network being a /24): the refusals
/// charge the network's bucket too (8 × `addr_connect_burst` / `addr_connect_rate`), so
/// once it is in debt the network's connects are closed unanswered (no task spawned to
/// explain) and the network banned at accept, while another /24 connects and the
/// network's held connection is served. Before, each fresh address had its own full
/// bucket: every connect was answered `too_many_connections` and nothing was ever banned.
#[tokio::test]
async fn a_network_rotating_its_addresses_into_its_cap_is_banned() {
    let mut config = Config::ephemeral();
    config.limits.max_connections_per_addr = 2;
    config.limits.max_connections_per_network = 2;
    config.limits.addr_connect_rate = 1;
    config.limits.addr_connect_burst = 2;
    config.limits.addr_churn_ban_secs = 60;
    let relay = TestRelay::start(config).await;
    let (port, admin) = (relay.tcp().port(), relay.addrs.admin.expect("admin"));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = client_from(port, ip("127.0.3.1")).await;
        c.hello().await;
        held.push(c);
    }
    let start = std::time::Instant::now();
    let (mut explained, mut unanswered) = (0u32, Vec::new());
    for i in 2..=121 {
        let from = format!("127.0.3.{i}");
        let mut c = client_from(port, ip(&from)).await;
        let (frames, _) = c.drain_to_end().await;
        match frames.as_slice() {
            [] => {
                unanswered.push((i, start.elapsed()));
                // A few more than the first: the network's first ban lasts 1 s, and on a
                // loaded machine the rest of the loop could outlast it (then explained
                // again, and banned a second time).
                if unanswered.len() >= 3 {
                    break;
                }
            }
            [Frame::Err(e)] if e.message.contains("per network") => {
                assert!(
                    unanswered.is_empty(),
                    "{from} answered after the ban: {e:?}"
                );
                explained += 1;
            }
            other => panic!("{from}: {other:?}"),
        }
    }
    let &(_, at) = unanswered
        .first()
        .expect("every connect was explained: the network was never churning");
    // The network's burst (16) and what its rate (8/s) refilled meanwhile, no more.
    let most = 16.0 + 8.0 * at.as_secs_f64() + 1.0;
    assert!(
        f64::from(explained) <= most,
        "{explained} refusals explained (at most {most})"
    );
    assert_eq!(metric(admin, "whispeer_relay_addr_bans_total").await, 1);
    // Another network is unaffected, and the banned network's open connection is served.
    let mut other = client_from(port, ip("127.0.4.1")).await;
    other.hello().await;
    other.subscribe(1, exact(1, &[1])).await;
    held[0].subscribe(1, exact(1, &[1])).await;
}

/// A connection flood from one address is capped (handshakes included: these connections
/// never send a byte) while another address still connects.
#[tokio::test]
async fn connection_flood_from_one_address_is_capped() {
    let mut config = Config::ephemeral();
    config.limits.max_connections_per_addr = 8;
    let relay = TestRelay::start(config).await;
    let addr = relay.tcp();
    let mut flood = Vec::new();
    for _ in 0..8 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The ninth from 127.0.0.1 is refused with a typed error naming the cap.
    let mut c = Client::tcp(addr).await;
    let e = c.expect_fatal(ErrorCode::TooManyConnections).await;
    assert!(e.message.contains("per source address"), "{}", e.message);
    // A WebSocket from the same address is refused before its handshake.
    let tcp = tokio::net::TcpStream::connect(relay.ws()).await.unwrap();
    let ws = tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::client_async(format!("ws://{}/", relay.ws()), tcp),
    )
    .await
    .expect("refused promptly");
    assert!(
        ws.is_err(),
        "WebSocket over the per-address cap was accepted"
    );
    // Another address (127.0.0.2, also loopback) still connects and works.
    let mut other = Client::tcp_from(addr, "127.0.0.2").await;
    other.hello().await;
    other.subscribe(1, exact(1, &[1])).await;
    // Closing flood connections frees their slots: once the relay has seen them close
    // (only `other` is left), 127.0.0.1 connects again.
    let mut open = relay.handle.connections();
    drop(flood);
    tokio::time::timeout(TIMEOUT, open.wait_for(|n| *n <= 1))
        .await
        .expect("slots never freed")
        .expect("relay running");
    let mut c = Client::tcp(addr).await;
    c.send(&hello_frame()).await;
    match c.recv().await {
        Frame::Welcome(_) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn protocol_order_and_version_errors() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut probe = Probe::new(relay.tcp()).await;

    let mut c = Client::tcp(relay.tcp()).await;
    c.publish(envelope(1, &[1])).await;
    c.expect_fatal(ErrorCode::ProtocolViolation).await;
    probe.check("pub before hello").await;

    let mut c = Client::ws(relay.ws()).await;
    c.send(&Frame::Hello(Hello {
        versions: vec![1, 7],
        features: 0,
        client: None,
        auth: None,
        account: None,
    }))
    .await;
    let e = c.expect_fatal(ErrorCode::UnsupportedVersion).await;
    assert!(e.message.contains("[1, 7]"), "{}", e.message);
    probe.check("wrong version").await;

    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    c.send(&hello_frame()).await;
    c.expect_fatal(ErrorCode::ProtocolViolation).await;
    probe.check("second hello").await;

    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    c.send(&Frame::Msg(Msg {
        paused: None,
        sub_id: None,
        seq: 1,
        envelope: envelope(1, &[1]),
        flags: 0,
    }))
    .await;
    c.expect_fatal(ErrorCode::ProtocolViolation).await;
    probe.check("relay-to-client frame").await;

    // A client Close is answered by an orderly close without an error.
    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    c.send(&Frame::Close(Close {
        code: ErrorCode::Other(0),
        message: "bye".into(),
    }))
    .await;
    let (frames, clean) = c.drain_to_end().await;
    assert!(frames.is_empty() && clean, "{frames:?}");
    probe.check("client close").await;
}

#[tokio::test]
async fn hello_and_idle_timeouts() {
    let mut config = Config::ephemeral();
    config.timeouts.hello_ms = 200;
    config.timeouts.idle_ms = 300;
    config.timeouts.heartbeat_ms = 100;
    let relay = TestRelay::start(config).await;

    let mut silent = Client::tcp(relay.tcp()).await;
    let e = silent.expect_fatal(ErrorCode::IdleTimeout).await;
    assert!(e.message.contains("Hello"), "{}", e.message);

    let mut idle = Client::tcp(relay.tcp()).await;
    let w = idle.hello().await;
    assert_eq!(w.heartbeat_ms, 100);
    idle.expect_fatal(ErrorCode::IdleTimeout).await;
}

/// `idle_ms` shorter than `hello_ms` applies from the `Welcome` on: the connection's timer,
/// armed for the Hello deadline, first looked at idleness at that deadline, so a silent
/// client was closed after `hello_ms` (10 s here) with a message saying `idle_ms` (found by
/// an independent client written from the spec: idle 1.5 s, closed after 10.0 s).
#[tokio::test]
async fn an_idle_limit_shorter_than_the_hello_limit_applies_after_the_welcome() {
    let mut config = Config::ephemeral();
    config.timeouts.hello_ms = 30_000;
    config.timeouts.idle_ms = 300;
    config.timeouts.heartbeat_ms = 100;
    let relay = TestRelay::start(config).await;
    let mut idle = Client::tcp(relay.tcp()).await;
    idle.hello().await;
    let welcomed = std::time::Instant::now();
    let e = idle.expect_fatal(ErrorCode::IdleTimeout).await;
    let after = welcomed.elapsed();
    assert!(e.message.contains("no traffic for 300 ms"), "{}", e.message);
    // Functional, not a speed figure: the idle limit (0.3 s), far from the Hello one (30 s).
    assert!(
        after < std::time::Duration::from_secs(15),
        "closed after {after:?}"
    );
}

#[derive(Debug)]
struct Gatekeeper;

impl Plugin for Gatekeeper {
    fn name(&self) -> &'static str {
        "gatekeeper"
    }
    fn on_subscribe(&self, i: &SubscribeInfo<'_>) -> Verdict {
        if i.pattern.key_id() == &key(66) {
            return Err(Rejection("tree 66 is closed".into()));
        }
        Ok(())
    }
    fn on_publish(&self, i: &PublishInfo<'_>) -> Verdict {
        if i.size > 1000 {
            return Err(Rejection("too big for this relay".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn plugins_can_reject_subscribe_and_publish() {
    let relay = Relay::builder(Config::ephemeral())
        .listeners(
            whispeer_relay::Listeners::bind(&Config::ephemeral())
                .await
                .unwrap(),
        )
        .plugin(Arc::new(Gatekeeper))
        .build()
        .unwrap();
    assert_eq!(
        relay.handle().status().plugins,
        vec!["metrics", "logging", "gatekeeper"]
    );
    let relay = TestRelay::run(relay);
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    c.send(&sub_frame(5, exact(66, &[1]))).await;
    let e = c.expect_err().await;
    assert_eq!(
        (e.code, e.fatal, e.sub_id),
        (ErrorCode::NotAllowed, false, Some(5))
    );
    assert!(e.message.contains("gatekeeper"));
    c.subscribe(6, exact(1, &[1])).await;
    c.send(&Frame::Pub(Pub {
        envelope: envelope_sized(1, &[1], 2000),
        flags: 0,
        publish_id: Some([3; 16]),
        qos: Qos::AtMostOnce,
    }))
    .await;
    let e = c.expect_err().await;
    assert_eq!(
        (e.code, e.fatal, e.publish_id),
        (ErrorCode::NotAllowed, false, Some([3; 16]))
    );
    // A refused publish like any other: the connection's reads paused for it.
    assert!(relay
        .handle
        .metrics()
        .render_prometheus(0)
        .contains("whispeer_relay_refusal_pauses_total 1\n"));
    let ok = envelope(1, &[1]);
    c.publish(ok.clone()).await;
    assert_eq!(c.expect_msg().await.envelope, ok);
}

/// Refuses publishes on key id 66 and subscriptions on key id 67, whoever asks.
#[derive(Debug)]
struct KeyGate;

impl Plugin for KeyGate {
    fn name(&self) -> &'static str {
        "keygate"
    }
    fn on_subscribe(&self, i: &SubscribeInfo<'_>) -> Verdict {
        if i.pattern.key_id() == &key(67) {
            return Err(Rejection("no subscriptions on 67".into()));
        }
        Ok(())
    }
    fn on_publish(&self, i: &PublishInfo<'_>) -> Verdict {
        if i.path.key_id() == &key(66) {
            return Err(Rejection("no publishes on 66".into()));
        }
        Ok(())
    }
}

/// A token account of `group` in the account file `file`; returns its token.
fn token_of_group(file: &std::path::Path, name: &str, group: &str) -> String {
    let out = account_add(file, name, &["--token", "--group", group]);
    out.trim().lines().last().unwrap().to_string()
}

/// A request a plugin refuses claims no key id for the account's group: the claim was
/// made before the plugin ran, so a refused `Pub` (or `Sub`) on a key id nobody held
/// claimed it for good, and another group's later use of it was refused.
#[tokio::test]
async fn a_request_a_plugin_refuses_claims_no_key_id() {
    let dir = temp_dir("plugin-claims");
    let file = dir.join("accounts.toml");
    let a = token_of_group(&file, "a", "group-a");
    let b = token_of_group(&file, "b", "group-b");
    let mut config = Config::ephemeral();
    config.auth.mode = whispeer_relay::config::AuthMode::Required;
    config.auth.accounts = Some(file);
    let relay = Relay::builder(config.clone())
        .listeners(whispeer_relay::Listeners::bind(&config).await.unwrap())
        .plugin(Arc::new(KeyGate))
        .build()
        .unwrap();
    let relay = TestRelay::run(relay);
    let login = |token: String| {
        let addr = relay.tcp();
        async move {
            let mut c = Client::tcp(addr).await;
            c.send(&Frame::Hello(Hello {
                versions: vec![whispeer_protocol::frame::PROTOCOL_VERSION],
                features: 0,
                client: None,
                auth: Some(bytes::Bytes::from(token)),
                account: None,
            }))
            .await;
            assert!(matches!(c.recv().await, Frame::Welcome(_)));
            c
        }
    };
    let (mut ca, mut cb) = (login(a).await, login(b).await);
    // Group A: a publish on 66 and a Sub on 67, both refused by the plugin.
    ca.send(&Frame::Pub(Pub {
        envelope: envelope(66, &[1]),
        flags: 0,
        publish_id: Some([6; 16]),
        qos: Qos::AtMostOnce,
    }))
    .await;
    let e = ca.expect_err().await;
    assert_eq!(
        (e.code, e.publish_id),
        (ErrorCode::NotAllowed, Some([6; 16]))
    );
    assert!(e.message.contains("keygate"), "{}", e.message);
    ca.send(&sub_frame(1, exact(67, &[1]))).await;
    let e = ca.expect_err().await;
    assert_eq!((e.code, e.sub_id), (ErrorCode::NotAllowed, Some(1)));
    assert!(e.message.contains("keygate"), "{}", e.message);
    // Group B may use both key ids: A's refused requests claimed neither.
    cb.subscribe(1, exact(66, &[1])).await;
    cb.publish(envelope(67, &[1])).await;
    cb.send(&Frame::Ping(Ping { nonce: 1 })).await;
    assert!(
        matches!(cb.recv().await, Frame::Pong(_)),
        "B's publish on 67 accepted"
    );
    // Now group B holds them: A is refused as before.
    ca.send(&sub_frame(3, exact(66, &[1]))).await;
    let e = ca.expect_err().await;
    assert_eq!(
        (e.code, e.sub_id),
        (ErrorCode::AuthFailed, Some(3)),
        "{e:?}"
    );
}

/// The WebSocket read buffer is small (idle connections stay cheap), yet a frame near
/// `max_frame` still arrives whole and intact.
#[tokio::test]
async fn large_websocket_frames_arrive_whole_despite_the_small_read_buffer() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut sub = subscriber_ws(relay.ws(), exact(1, &[1])).await;
    let mut c = Client::ws(relay.ws()).await;
    c.hello().await;
    let env = envelope_sized(1, &[1], 900 * 1024);
    c.publish(env.clone()).await;
    assert_eq!(sub.expect_msg().await.envelope, env);
}

/// Operator basics: logs written to a pipe (or a file) carry no ANSI colour codes.
#[test]
fn logs_to_a_pipe_have_no_ansi_colour_codes() {
    use std::io::BufRead;
    let dir = temp_dir("ansi");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "off",
            "--store",
            "none",
            "--log",
            "info",
        ])
        .env_remove("RUST_LOG")
        .env_remove("WHISPEER_LOG")
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn whispeer-relay");
    let stderr = child.stderr.take().unwrap();
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(stderr);
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "relay exited before logging"
        );
        if line.contains("listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !line.contains('\u{1b}'),
        "ANSI escape in a piped log: {line:?}"
    );
    assert!(line.contains("INFO"), "{line:?}");
}

/// Fairness between connections is counted in bytes as well as frames: a connection whose
/// frames are large yields the relay after each one, so another connection's frame waits
/// behind one of them, not behind 16. Deterministic on the single-threaded test runtime:
/// the flooder's frames and then the other connection's frame are all queued before the
/// relay runs, so its connection tasks run in that order, and a subscriber of both sees
/// the messages in the order the relay handled (and numbered) them. Before, a connection
/// handled 16 frames a turn whatever their size — with 25 connections flooding 4 KiB
/// publishes, everyone else waited 10–24 ms for their next turn (hostile bench).
#[tokio::test]
async fn a_connection_of_large_frames_yields_after_each_one() {
    // The flooder's 20 frames of 60 KiB.
    let flood = (0..20u8).map(|i| envelope_sized(20, &[i], 60 << 10));
    let before = flood_handled_before_another_frame(Config::ephemeral(), flood.collect()).await;
    assert!(
        before <= 1,
        "{before} frames of 60 KiB from one connection were handled before another \
         connection's frame"
    );
}

/// Fairness is counted in frames as well as bytes: a connection flooding small frames —
/// far from 16 KiB a turn — yields the relay after `FRAMES_PER_TURN` (16) of them, so
/// another connection's frame waits behind one turn of the flood, not behind the ~100
/// small frames that 16 KiB holds. Deterministic like the large-frame test above.
#[tokio::test]
async fn a_connection_of_small_frames_yields_after_sixteen_of_them() {
    let mut config = Config::ephemeral();
    // No rate pauses the flooder: only the turn may let the other connection in.
    config.limits.publish_rate = 0;
    config.limits.addr_publish_rate = 0;
    // The flooder's 200 small frames (~200 bytes each).
    let flood = (0..200usize).map(|i| envelope(20, &[i as u8]));
    let before = flood_handled_before_another_frame(config, flood.collect()).await;
    assert!(
        before <= 16,
        "{before} small frames from one connection were handled before another \
         connection's frame"
    );
}

/// The fairness tests' setup: a subscriber of key ids 20 and 21 on an in-process relay; a
/// flooder's publishes of `flood` (all on key id 20) and then another connection's one
/// publish on 21 are queued without yielding to the relay's tasks, so its connection tasks
/// run in that order. Returns how many flood messages the subscriber saw before the other
/// one (the relay numbers and routes in the order it handles them). Neither publisher
/// gets an error.
async fn flood_handled_before_another_frame(config: Config, flood: Vec<Envelope>) -> usize {
    let relay = Relay::builder(config).build().unwrap();
    let h = relay.handle();
    let (s_tx, mut s_rx) = h.connect_in_process();
    let (f_tx, mut f_rx) = h.connect_in_process();
    let (o_tx, mut o_rx) = h.connect_in_process();
    for (tx, rx) in [(&s_tx, &mut s_rx), (&f_tx, &mut f_rx), (&o_tx, &mut o_rx)] {
        tx.send(hello_frame().to_bytes()).await.unwrap();
        let w = Frame::decode(&rx.recv().await.unwrap()).unwrap();
        assert!(matches!(w, Frame::Welcome(_)), "{w:?}");
    }
    for (id, k) in [(1, 20), (2, 21)] {
        s_tx.send(sub_frame(id, pattern(k, &[], true)).to_bytes())
            .await
            .unwrap();
        let ok = Frame::decode(&s_rx.recv().await.unwrap()).unwrap();
        assert!(matches!(ok, Frame::SubOk(_)), "{ok:?}");
    }
    let total = flood.len();
    for env in flood {
        f_tx.try_send(pub_frame(env).to_bytes()).unwrap();
    }
    o_tx.try_send(pub_frame(envelope(21, &[1])).to_bytes())
        .unwrap();
    let mut flood_before = None;
    let mut seen = 0;
    while seen < total || flood_before.is_none() {
        let m = match Frame::decode(&s_rx.recv().await.unwrap()).unwrap() {
            Frame::Msg(m) => m,
            other => panic!("unexpected {other:?}"),
        };
        if m.envelope.token_path().key_id() == &key(21) {
            flood_before = Some(seen);
        } else {
            seen += 1;
        }
    }
    // Nothing refused either publisher.
    assert!(f_rx.try_recv().is_err() && o_rx.try_recv().is_err());
    flood_before.unwrap()
}

/// `max_connections` counts connections from accept, handshakes included: WebSocket
/// connections that never send their upgrade request hold their places, so stalling before
/// the session starts does not get round the cap — but a newcomer to the full relay takes
/// the place of the oldest of them (evicted, closed before its upgrade), not the other way
/// round: a TCP client (from another address: no per-address cap involved) is welcomed,
/// the oldest stalled handshake is closed, the younger ones are not. Once they close, the
/// count goes back to the welcomed client alone. (The stalled handshakes are first aged
/// past their eviction grace, min(2 s, hello_ms / 2), by the relay's test clock: no sleep
/// a loaded machine could stretch past their `hello_ms`.)
#[tokio::test]
async fn the_connection_limit_counts_connections_still_in_their_handshake() {
    use tokio::io::AsyncReadExt;
    let mut config = Config::ephemeral();
    config.limits.max_connections = 3;
    config.timeouts.hello_ms = HELLO_LONG;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut count = relay.handle.connections();
    let mut stalled = Vec::new();
    for n in 1..=3 {
        stalled.push(tokio::net::TcpStream::connect(relay.ws()).await.unwrap());
        tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == n))
            .await
            .expect("the stalled handshakes counted")
            .expect("relay running");
    }
    relay.handle.age_handshakes(PAST_GRACE);
    let mut c = Client::tcp_from(relay.tcp(), "127.0.0.2").await;
    c.hello().await;
    let mut oldest = stalled.remove(0);
    let mut b = [0u8; 64];
    let read = tokio::time::timeout(TIMEOUT, oldest.read(&mut b))
        .await
        .expect("the oldest stalled handshake was not closed");
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "the oldest stalled handshake got bytes: {read:?}"
    );
    assert_eq!(
        metric(admin, "whispeer_relay_handshakes_evicted_total").await,
        1
    );
    drop(stalled);
    tokio::time::timeout(TIMEOUT, count.wait_for(|n| *n == 1))
        .await
        .expect("places never freed")
        .expect("relay running");
    c.subscribe(1, exact(1, &[1])).await;
}

/// A full relay (`max_connections` 16) whose every place is held by a stranger's silent
/// connection (TCP, no `Hello`, each renewed as its `hello_ms` runs out, from as many
/// networks as it takes to stay under the per-address and per-network caps) does not shut
/// out an honest client: its connection evicts the oldest silent one (closed with
/// `Err(too_many_connections)` saying so) and it is welcomed, subscribes and publishes.
/// Only that one is evicted (`whispeer_relay_handshakes_evicted_total` 1). Before, the
/// honest client was refused for as long as the stranger kept reconnecting. (The silent
/// connections are aged past their eviction grace by the relay's test clock before the
/// honest client comes; all from 127.0.0.0/24, the honest client's network too, whose
/// oldest is evicted.)
#[tokio::test]
async fn a_full_relay_evicts_its_oldest_silent_connection_for_a_newcomer() {
    const MAX: usize = 16;
    let mut config = Config::ephemeral();
    config.limits.max_connections = MAX;
    config.timeouts.hello_ms = HELLO_LONG;
    config.limits.max_connections_per_addr = 2 * MAX;
    config.limits.max_connections_per_network = 2 * MAX;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut count = relay.handle.connections();
    let mut silent = Vec::new();
    for n in 1..=MAX {
        let s = tokio::net::TcpStream::connect(relay.tcp()).await.unwrap();
        silent.push(Client::over_stream(Box::new(s)));
        // Accepted in this order: the first is the oldest.
        tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == n))
            .await
            .expect("the silent connections counted")
            .expect("relay running");
    }
    relay.handle.age_handshakes(PAST_GRACE);
    let mut honest = Client::tcp(relay.tcp()).await;
    honest.hello().await;
    honest.subscribe(1, exact(7, &[1])).await;
    let env = envelope(7, &[1]);
    honest.publish(env.clone()).await;
    assert_eq!(honest.expect_msg().await.envelope, env);
    // The oldest silent connection was told why and closed.
    let e = silent[0].expect_fatal(ErrorCode::TooManyConnections).await;
    assert!(e.message.contains("evicted"), "{}", e.message);
    assert_eq!(
        metric(admin, "whispeer_relay_handshakes_evicted_total").await,
        1
    );
    // Its place is given back once it closed: the honest client and 15 silent ones.
    tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == MAX))
        .await
        .expect("the evicted connection's place never freed")
        .expect("relay running");
    assert_eq!(
        metric(admin, "whispeer_relay_connections_rejected_total").await,
        0
    );
}

/// A `hello_ms` no test step outlasts, however loaded the machine: eviction tests age
/// their handshakes past the grace (2 s, its longest) with the relay's test clock
/// (`RelayHandle::age_handshakes`) rather than sleeping past it within `hello_ms`. Before,
/// they slept 1.55 s with `hello_ms` 3,000 (0.6 s with 600): a stall of the connect loop
/// on a loaded machine made the oldest time out instead of being evicted.
const HELLO_LONG: u64 = 60_000;

/// Past the eviction grace (at most 2 s), for `RelayHandle::age_handshakes`.
const PAST_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Review finding (Medium/High): a full relay evicted its oldest unwelcomed connection,
/// whoever held the most places — a client slow with its `Hello` was the first evicted by
/// a stranger's flood. Now the victim is the oldest of the network holding the most
/// unwelcomed places. `max_connections` 8, networks of one address (`network_ipv4_prefix`
/// 32). A client from 127.0.0.1 connects and holds its `Hello` until the flood is done;
/// 127.0.0.9 fills the other 7 places with silent connections, which (and the client)
/// are aged past the grace by the relay's test clock, then opens 17 more (3 × 8 in all):
/// they evict its own old ones (127.0.0.9 holds the most; as many as its connect rate
/// lets it), then are refused (the victim would be one of its own, within its grace).
/// Once all 17 are accounted for (evicted + refused), the client, older than the grace,
/// was never evicted: it gets its `Welcome`. Before, the flood's first new connection
/// evicted the client. (It slept past a 300 ms grace and sent its `Hello` with ~290 ms
/// to spare, let late newcomers of a slow connect loop evict early ones past their own
/// grace, and read the metric before the 17 were all admitted: flaky on a loaded machine.)
#[tokio::test]
async fn a_flood_from_another_network_evicts_its_own_connections_not_a_slow_client() {
    const MAX: usize = 8;
    const MORE: u64 = 2 * MAX as u64 + 1;
    let mut config = Config::ephemeral();
    config.limits.max_connections = MAX;
    config.limits.network_ipv4_prefix = 32;
    config.timeouts.hello_ms = HELLO_LONG;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut count = relay.handle.connections();
    let mut client = Client::tcp(relay.tcp()).await;
    tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == 1))
        .await
        .expect("the client counted")
        .expect("relay running");
    let silent = || silent_from(relay.tcp(), "127.0.0.9");
    let mut flood = Vec::new();
    for _ in 1..MAX {
        flood.push(silent().await);
    }
    tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == MAX))
        .await
        .expect("the flood's first connections counted")
        .expect("relay running");
    // The relay is full; the client and the flood's first connections age past the grace.
    relay.handle.age_handshakes(PAST_GRACE);
    for _ in 0..MORE {
        flood.push(silent().await);
    }
    // Every newcomer evicted one or was refused.
    let [evicted, rejected] = metrics_reaching(
        admin,
        [
            "whispeer_relay_handshakes_evicted_total",
            "whispeer_relay_connections_rejected_total",
        ],
        |[e, r]| e + r >= MORE,
    )
    .await;
    assert_eq!(evicted + rejected, MORE);
    assert!(
        (1..MAX as u64).contains(&evicted),
        "the flood evicted {evicted} of its own {} first connections",
        MAX - 1
    );
    let welcome = client.hello().await;
    assert_eq!(welcome.version, whispeer_protocol::frame::PROTOCOL_VERSION);
    drop(flood);
}

/// Review finding (Medium): a connection not yet welcomed stays evictable while it drains
/// (after a Hello timeout, a refused Hello, any fatal `Err` before `Welcome`), and an
/// eviction then did not shorten its drain: a stranger that sent nothing (or a bad first
/// frame) and never closed held its socket for the whole `drain_ms` (5 s), past the
/// `EVICTED_CLOSE` (1 s) an evicted connection gets. `max_connections` 1, `hello_ms` 1,000
/// (grace 500 ms), `drain_ms` 5,000: A sends nothing, gets its fatal `Err` at 1 s and
/// keeps its socket open (draining); B (another network) connects and evicts it; the
/// relay's connection count is back to B alone within 3 s (before: ~5 s later; the bound
/// counts from B's connect, not from the eviction, so it leaves a loaded machine room).
#[tokio::test]
async fn a_connection_evicted_while_it_drains_is_closed_within_a_second() {
    let mut config = Config::ephemeral();
    config.limits.max_connections = 1;
    config.limits.network_ipv4_prefix = 32;
    config.timeouts.hello_ms = 1_000;
    config.timeouts.drain_ms = 5_000;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut count = relay.handle.connections();
    let mut a = Client::tcp(relay.tcp()).await;
    match a.recv().await {
        Frame::Err(e) => assert!(e.fatal, "{e:?}"),
        other => panic!("expected the Hello timeout's Err, got {other:?}"),
    }
    tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == 1))
        .await
        .expect("A counted")
        .expect("relay running");
    let mut b = Client::tcp_from(relay.tcp(), "127.0.0.2").await;
    let evicting = tokio::time::Instant::now();
    b.hello().await;
    assert_eq!(
        metric(admin, "whispeer_relay_handshakes_evicted_total").await,
        1
    );
    tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == 1))
        .await
        .expect("A's place never freed")
        .expect("relay running");
    let closed_after = evicting.elapsed();
    assert!(
        closed_after < std::time::Duration::from_secs(3),
        "A, evicted while draining, kept its socket {closed_after:?} after B came"
    );
    drop(a);
}

/// Review finding (Medium): an evicted TCP connection kept reading until its peer closed
/// or `EVICTED_CLOSE` (1 s) ran out, so a stranger that never closes held every evicted
/// socket for the whole second: 16 evictions a second from one address filled the
/// lingering places up to the ceiling (`max_connections` + 16) and the relay refused
/// everyone, honest newcomers included (`Err(too_many_connections)`). Now an evicted
/// connection is closed once its `Err` is written (what it sent is discarded first).
/// `max_connections` 1 (ceiling 17), networks of one address: 127.0.0.9 holds the place
/// with a silent connection that never reads nor closes, then 16 times ages it past the
/// grace (test clock) and evicts it with a new silent one; at once (well within the
/// second the evicted sockets lingered) the place is aged again and a client from
/// 127.0.0.2 sends `Hello`: it is welcomed, evicting the stranger's last one. Before: it
/// got `Err(too_many_connections)`.
#[tokio::test]
async fn evicted_connections_of_a_peer_that_never_closes_do_not_fill_the_ceiling() {
    let mut config = Config::ephemeral();
    config.limits.max_connections = 1;
    config.limits.network_ipv4_prefix = 32;
    config.timeouts.hello_ms = HELLO_LONG;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut count = relay.handle.connections();
    let silent = || silent_from(relay.tcp(), "127.0.0.9");
    // Never read nor closed until the end of the test.
    let mut held = vec![silent().await];
    tokio::time::timeout(TIMEOUT, count.wait_for(|c| *c == 1))
        .await
        .expect("the first silent connection counted")
        .expect("relay running");
    let started = tokio::time::Instant::now();
    for n in 1..=16u64 {
        relay.handle.age_handshakes(PAST_GRACE);
        held.push(silent().await);
        metrics_reaching(admin, ["whispeer_relay_handshakes_evicted_total"], |[e]| {
            e >= n
        })
        .await;
    }
    relay.handle.age_handshakes(PAST_GRACE);
    let mut c = Client::tcp_from(relay.tcp(), "127.0.0.2").await;
    // The 16 evicted sockets lingered up to 1 s each: the newcomer must come within it.
    eprintln!("newcomer {:?} after the first eviction", started.elapsed());
    c.hello().await;
    drop(held);
}

/// Eviction never takes an admitted session's place: with all 16 places held by welcomed
/// sessions, a 17th connection is refused with `Err(too_many_connections)` as before, no
/// session is closed (each still answers a `Ping`) and nothing is counted as evicted.
#[tokio::test]
async fn a_relay_full_of_sessions_refuses_a_newcomer_and_evicts_none() {
    const MAX: usize = 16;
    let mut config = Config::ephemeral();
    config.limits.max_connections = MAX;
    config.limits.max_connections_per_addr = 2 * MAX;
    config.limits.max_connections_per_network = 2 * MAX;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut sessions = Vec::new();
    for _ in 0..MAX {
        let mut c = Client::tcp(relay.tcp()).await;
        c.hello().await;
        sessions.push(c);
    }
    let mut late = Client::tcp(relay.tcp()).await;
    let e = late.expect_fatal(ErrorCode::TooManyConnections).await;
    assert!(e.message.contains("max_connections"), "{}", e.message);
    for (i, c) in sessions.iter_mut().enumerate() {
        c.send(&Frame::Ping(Ping { nonce: i as u64 })).await;
        match c.recv().await {
            Frame::Pong(p) => assert_eq!(p.nonce, i as u64),
            other => panic!("session {i}: expected Pong, got {other:?}"),
        }
    }
    assert_eq!(
        metric(admin, "whispeer_relay_handshakes_evicted_total").await,
        0
    );
}

/// Stored bytes from one address are slowed, not refused: over `addr_store_rate` the
/// address's connections are read more slowly (every QoS 1 publish still gets its
/// `PubAck`), and publishes the relay does not store (QoS 0, live only) are not charged.
/// (The bucket is the address's, shared by its connections like the other per-address
/// rates: `rate::tests`.)
#[tokio::test]
async fn stored_bytes_from_one_address_are_slowed_not_refused() {
    use whispeer_protocol::frame::pub_flags;
    const BODY: usize = 32 * 1024;
    let mut config = Config::ephemeral();
    config.limits.addr_store_rate = 128 * 1024;
    config.limits.addr_store_burst = 32 * 1024;
    let relay = TestRelay::start(config).await;
    let (addr, admin) = (relay.tcp(), relay.addrs.admin.expect("admin"));
    let throttled = || metric(admin, "whispeer_relay_throttled_total");
    let mut c = Client::tcp(addr).await;
    c.hello().await;
    let started = std::time::Instant::now();
    // Six stored publishes of a little over 32 KiB: the burst covers the first, and each
    // later one is read only once the debt of those before it is repaid — the sixth after
    // (5 × 32 − 32) KiB at 128 KiB/s, at least 1 s.
    for i in 0..6u8 {
        c.send(&Frame::Pub(Pub {
            envelope: envelope_sized(1, &[1, i], BODY),
            flags: pub_flags::ACK,
            publish_id: Some([i; 16]),
            qos: Qos::AtLeastOnce,
        }))
        .await;
        match c.recv().await {
            Frame::PubAck(ack) => assert_eq!(ack.publish_id, [i; 16]),
            other => panic!("publish {i}: expected PubAck, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    // A lower bound only: the relay cannot have stored them faster than its rate.
    assert!(
        elapsed >= std::time::Duration::from_millis(1_000),
        "6 × 32 KiB stored from one address at 128 KiB/s (burst 32 KiB) in {elapsed:?}"
    );
    // Live-only publishes are not stored, so not charged: after the last stored publish's
    // pause (the next frame is read only then), no further pause, however many.
    for i in 0..16u8 {
        c.send(&pub_frame(envelope_sized(1, &[2, i], BODY))).await;
    }
    c.send(&Frame::Ping(Ping { nonce: 9 })).await;
    loop {
        if let Frame::Pong(_) = c.recv().await {
            break;
        }
    }
    // Each stored envelope (a little over the 32 KiB burst) left the bucket in debt: one
    // pause each, and none for the live-only ones.
    assert_eq!(
        throttled().await,
        6,
        "pauses: one per stored publish, none for live ones"
    );
}

/// A client on the loopback interface (MTU 65536) must not be offered 64 KiB segments: a
/// receive window that shrinks below one segment stalls Linux senders for the 200 ms persist
/// timer (see `LISTEN_MSS`). Both directions depend on the listener: the segment size it
/// announces caps the client's, and its own cap is inherited by each accepted socket.
#[tokio::test]
async fn listeners_cap_the_segment_size_of_their_connections() {
    let listeners = whispeer_relay::Listeners::bind(&Config::ephemeral())
        .await
        .unwrap();
    for (name, l) in [("tcp", &listeners.tcp), ("ws", &listeners.ws)] {
        let l = l.as_ref().expect("bound");
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        for (side, s) in [("client", &client), ("relay", &accepted)] {
            let mss = socket2::SockRef::from(s).tcp_mss().unwrap();
            assert!(
                mss <= whispeer_relay::LISTEN_MSS,
                "{name} listener, {side} side: segments of {mss} bytes"
            );
        }
    }
}

/// One source address cannot hold the whole large-frame budget (review finding 7): a
/// length prefix costs 4 bytes and held up to `max_frame` of the relay-wide budget until
/// the idle timeout, so an address with a few connections announcing large frames it never
/// sent starved every other client's large frames for `idle_ms`. Now an address claims at
/// most its share — alone, half the budget — and its further frames wait (not read, not
/// refused); another address's large frames, over TCP and WebSocket, are read and
/// delivered meanwhile. Fails without the shares: the four prefixes take the whole budget
/// and the other address's publish is not delivered until they time out (45 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_parking_partial_large_frames_holds_only_its_share_of_the_budget() {
    const MAX: usize = 1 << 20;
    let mut relay = BinRelay::start_logged(&[
        "--store",
        "none",
        "--max-frame",
        &MAX.to_string(),
        "--large-frame-budget",
        &(4 * MAX).to_string(),
        "--log",
        "warn,whispeer_relay::transport::frame_budget=debug",
    ]);
    let (port, admin) = (relay.tcp().port(), relay.admin());
    let mut sub = subscriber_tcp(relay.tcp(), exact(1, &[1])).await;
    // Address A: four connections each announce a max_frame frame and send nothing more.
    let a: std::net::IpAddr = "127.0.0.50".parse().unwrap();
    let mut parkers = Vec::new();
    for _ in 0..4 {
        let mut c = client_from(port, a).await;
        c.hello().await;
        c.send_raw(&(MAX as u32).to_be_bytes()).await.unwrap();
        // Each either takes budget or waits for it.
        relay
            .wait_log(&["large frame", "budget", &format!("bytes={MAX}")])
            .await;
        parkers.push(c);
    }
    // Address B's 200 KiB publish over TCP, address C's 300 KiB one over WebSocket: read
    // and delivered while A's partial frames are parked.
    let mut b = client_from(port, "127.0.0.51".parse().unwrap()).await;
    b.hello().await;
    b.publish(envelope_sized(1, &[1], 200 << 10)).await;
    assert!(sub.expect_msg().await.envelope.len() > 200 << 10);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.52:0".parse().unwrap()).unwrap();
    let s = sock.connect(relay.ws()).await.unwrap();
    let mut c = Client::ws_over(Box::new(s), &format!("ws://{}/", relay.ws())).await;
    c.hello().await;
    c.publish(envelope_sized(1, &[1], 300 << 10)).await;
    assert!(sub.expect_msg().await.envelope.len() > 300 << 10);
    // A holds its share, half the budget; its other two frames waited (the third for its
    // share, the fourth behind it), and B's and C's frames did not.
    for _ in 0..2 {
        relay.wait_log(&["large frame budget given back"]).await;
    }
    assert_eq!(
        metric(admin, "whispeer_relay_frame_budget_bytes").await,
        2 * MAX as u64
    );
    assert_eq!(
        metric(admin, "whispeer_relay_frame_budget_waits_total").await,
        2
    );
    drop(parkers);
}

/// A masked client WebSocket frame (mask key 0: the payload as is).
fn ws_client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(fin) << 7 | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    f
}

/// A WebSocket message sent as a long run of tiny fragments yields the relay every turn
/// (review finding 10): tungstenite parses non-final fragments without returning anything,
/// so the reader loop's per-turn fairness never saw them, and one poll of the connection
/// parsed everything buffered — megabytes of 6-byte frames while every other connection
/// on that worker waited. Deterministic on the single-threaded test runtime: the
/// flooder's message (one byte, 5,000 empty continuations, then the rest) and then another
/// connection's publish are both in the relay's sockets before it runs, so their
/// connection tasks run in that order, and a subscriber of both sees the messages in the
/// order the relay handled them. Fails without the yield: the flooder's whole message is
/// parsed and routed in its first turn, before the other publish. The connections run on
/// the test's runtime (`light_workers = 0`): on the light runtime's own thread the flood's
/// parsing may start, and end, before the test has written the other publish.
#[tokio::test]
async fn a_websocket_message_in_tiny_fragments_yields_every_turn() {
    use futures_util::{FutureExt, SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    const FRAGMENTS: usize = 5_000;
    let mut config = Config::ephemeral();
    config.runtime.light_workers = 0;
    let relay = TestRelay::start(config).await;
    let mut sub = subscriber_tcp(relay.tcp(), pattern(20, &[], true)).await;
    sub.subscribe(2, pattern(21, &[], true)).await;
    // The flooder: a WebSocket client whose socket the test then writes to directly.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(1 << 20).unwrap();
    let s = sock.connect(relay.ws()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/", relay.ws()), s)
        .await
        .unwrap();
    ws.send(Message::Binary(hello_frame().to_bytes()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => {
            let w = Frame::decode(&b).unwrap();
            assert!(matches!(w, Frame::Welcome(_)), "{w:?}");
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut other = Client::tcp(relay.tcp()).await;
    other.hello().await;
    let flood_env = envelope(20, &[1]);
    let body = pub_frame(flood_env.clone()).to_bytes();
    let mut flood = ws_client_frame(false, 2, &body[..1]);
    for _ in 0..FRAGMENTS {
        flood.extend(ws_client_frame(false, 0, &[]));
    }
    flood.extend(ws_client_frame(true, 0, &body[1..]));
    // Both written before the relay runs again (nothing here waits: checked).
    tokio::task::unconstrained(ws.get_mut().write_all(&flood))
        .now_or_never()
        .expect("the flood written at once")
        .unwrap();
    tokio::task::unconstrained(other.publish(envelope(21, &[1])))
        .now_or_never()
        .expect("the publish written at once");
    let first = sub.expect_msg().await;
    assert_eq!(
        first.envelope.token_path().key_id(),
        &key(21),
        "the flooder's {FRAGMENTS} fragments were all parsed before another connection's \
         frame was read"
    );
    // The flooder's message arrives whole after it.
    assert_eq!(sub.expect_msg().await.envelope, flood_env);
    drop(ws);
}

/// `hello_ms` is the time a connection has for its whole handshake and its Hello, counted
/// once from its start: each phase (TLS, the WebSocket upgrade, then the Hello) used to get
/// it afresh, so a slow stranger held its place twice (ws) or three times (wss) as long.
/// The delays below are the slow client under test, not waits for the relay.
#[tokio::test]
async fn the_hello_deadline_counts_from_the_start_of_the_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = Config::ephemeral();
    config.timeouts.hello_ms = 1_000;
    let relay = TestRelay::start(config).await;
    let mut s = tokio::net::TcpStream::connect(relay.ws()).await.unwrap();
    // The upgrade request at 0.7 s (within the deadline) ...
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let Some(head) = raw_ws_upgrade(&mut s).await else {
        // Dropped during its upgrade (a slow machine got past the deadline first): the
        // deadline held all the same.
        return;
    };
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // ... and the Hello at 1.4 s: past it. The relay closes instead of welcoming.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let hello = whispeer_protocol::codec::encode_prefixed(&hello_frame());
    // One masked binary WebSocket frame carrying the Hello (its length prefix dropped).
    let body = &hello[whispeer_protocol::codec::LEN_PREFIX..];
    let mut f = vec![0x82u8];
    if body.len() < 126 {
        f.push(0x80 | body.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(body);
    let _ = s.write_all(&f).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest)).await;
    // A Welcome would be a binary frame (0x82) carrying the Welcome frame; the relay's
    // answer to a late connection is its idle/hello error and a close.
    let first = match rest.get(1).map(|b| b & 0x7f) {
        Some(126) if rest.len() >= 4 => {
            let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
            rest.get(4..4 + len)
        }
        Some(n) if n < 126 => rest.get(2..2 + n as usize),
        _ => None,
    };
    let welcomed = rest.first() == Some(&0x82)
        && first.is_some_and(|b| {
            matches!(
                Frame::decode(&bytes::Bytes::copy_from_slice(b)),
                Ok(Frame::Welcome(_))
            )
        });
    assert!(
        !welcomed,
        "welcomed 1.4 s after connecting with hello_ms = 1 s"
    );
}

/// Counts the connections its `on_connect` accepted less its greeted disconnects (with
/// `limit`, it refuses a connection beyond that many at once: a connection-limiting
/// plugin), the lowest that balance ever was, and every `on_disconnect`.
#[derive(Debug)]
struct Balance {
    limit: Option<i64>,
    open: std::sync::atomic::AtomicI64,
    lowest: std::sync::atomic::AtomicI64,
    disconnects: tokio::sync::watch::Sender<u64>,
}

impl Balance {
    fn new(limit: Option<i64>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: 0.into(),
            lowest: 0.into(),
            disconnects: tokio::sync::watch::channel(0).0,
        })
    }
}

impl Plugin for Balance {
    fn name(&self) -> &'static str {
        if self.limit.is_some() {
            "limiter"
        } else {
            "counter"
        }
    }
    fn on_connect(&self, _: &whispeer_relay::plugin::ConnectInfo<'_>) -> Verdict {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.open.fetch_add(1, SeqCst) + 1;
        if self.limit.is_some_and(|l| now > l) {
            self.open.fetch_sub(1, SeqCst);
            return Err(Rejection("full".into()));
        }
        Ok(())
    }
    fn on_disconnect(&self, i: &whispeer_relay::plugin::DisconnectInfo<'_>) {
        use std::sync::atomic::Ordering::SeqCst;
        if i.greeted {
            let now = self.open.fetch_sub(1, SeqCst) - 1;
            self.lowest.fetch_min(now, SeqCst);
        }
        self.disconnects.send_modify(|n| *n += 1);
    }
}

/// `on_disconnect(greeted)` only for the plugins whose `on_connect` accepted: a limiter
/// refusing beyond 2 connections at once, then a counter. Of 10 connections held open, 2
/// are welcomed and 8 refused by the limiter (the counter's `on_connect` never runs for
/// them); once all ended, each plugin's accepted connects less its greeted disconnects
/// never went below 0 and is 0 (the refused ones used to decrement both: the limit was
/// bypassed).
#[tokio::test]
async fn plugins_see_a_greeted_disconnect_only_for_connections_they_accepted() {
    let limiter = Balance::new(Some(2));
    let counter = Balance::new(None);
    let relay = Relay::builder(Config::ephemeral())
        .plugin(limiter.clone())
        .plugin(counter.clone())
        .build()
        .unwrap();
    let h = relay.handle();
    let mut conns = Vec::new();
    let (mut welcomed, mut refused) = (0, 0);
    for _ in 0..10 {
        let (tx, mut rx) = h.connect_in_process();
        tx.send(hello_frame().to_bytes()).await.unwrap();
        match Frame::decode(&rx.recv().await.unwrap()).unwrap() {
            Frame::Welcome(_) => welcomed += 1,
            Frame::Err(e) => {
                assert_eq!((e.code, e.fatal), (ErrorCode::NotAllowed, true));
                assert!(e.message.contains("limiter"), "{}", e.message);
                refused += 1;
            }
            other => panic!("expected Welcome or Err, got {other:?}"),
        }
        conns.push((tx, rx));
    }
    assert_eq!((welcomed, refused), (2, 8));
    // The welcomed ones end too (the refused ones end on their own).
    drop(conns);
    for p in [&limiter, &counter] {
        let mut seen = p.disconnects.subscribe();
        tokio::time::timeout(TIMEOUT, seen.wait_for(|n| *n >= 10))
            .await
            .unwrap_or_else(|_| panic!("{}: not every connection ended", p.name()))
            .unwrap();
    }
    use std::sync::atomic::Ordering::SeqCst;
    for p in [&limiter, &counter] {
        assert_eq!(*p.disconnects.borrow(), 10, "{}: one each", p.name());
        assert!(
            p.lowest.load(SeqCst) >= 0,
            "{}: the balance went down to {}",
            p.name(),
            p.lowest.load(SeqCst)
        );
        assert_eq!(p.open.load(SeqCst), 0, "{}", p.name());
    }
}

/// A plugin whose `on_connect` panics (a bug in an operator's plugin).
#[derive(Debug)]
struct Panicker;

impl Plugin for Panicker {
    fn name(&self) -> &'static str {
        "panicker"
    }
    fn on_connect(&self, _: &whispeer_relay::plugin::ConnectInfo<'_>) -> Verdict {
        panic!("panicker: on_connect panics (on purpose, a test)");
    }
}

/// A plugin panicking in `on_connect` does not leak the places of the plugins before it:
/// with [counter, panicker], one `Hello` — the counter accepts, the panicker panics, the
/// connection's task unwinds and its session is dropped — and the counter still gets its
/// greeted disconnect (its accepted connects less greeted disconnects is 0; the accepted
/// count used to be recorded only once every `on_connect` had returned).
#[tokio::test]
async fn a_plugin_panicking_in_on_connect_leaks_no_place_of_the_plugins_before_it() {
    let counter = Balance::new(None);
    let relay = Relay::builder(Config::ephemeral())
        .plugin(counter.clone())
        .plugin(Arc::new(Panicker))
        .build()
        .unwrap();
    let mut seen = counter.disconnects.subscribe();
    let (tx, mut rx) = relay.handle().connect_in_process();
    tx.send(hello_frame().to_bytes()).await.unwrap();
    // The connection ends without a Welcome.
    let end = tokio::time::timeout(TIMEOUT, async {
        while let Some(b) = rx.recv().await {
            if let Frame::Welcome(_) = Frame::decode(&b).unwrap() {
                panic!("welcomed through a panicking plugin");
            }
        }
    });
    end.await.expect("the connection did not end");
    tokio::time::timeout(TIMEOUT, seen.wait_for(|n| *n >= 1))
        .await
        .expect("the counter got no disconnect")
        .unwrap();
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(*counter.disconnects.borrow(), 1);
    assert_eq!(
        counter.open.load(SeqCst),
        0,
        "the counter's accepted connect got no greeted disconnect"
    );
    assert!(counter.lowest.load(SeqCst) >= 0);
}

/// A TCP connection to `relay` from the loopback address `source`, that sends nothing.
async fn silent_from(relay: std::net::SocketAddr, source: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    sock.connect(relay).await.unwrap()
}

/// The admin port's values of `names` once `reached` holds for them, read again until it
/// does (within `TIMEOUT`; the relay announces no metric change, so this polls, each read
/// answered at once).
async fn metrics_reaching<const N: usize>(
    admin: std::net::SocketAddr,
    names: [&str; N],
    reached: impl Fn([u64; N]) -> bool,
) -> [u64; N] {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let mut values = [0; N];
        for (v, name) in values.iter_mut().zip(names) {
            *v = metric(admin, name).await;
        }
        if reached(values) {
            return values;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{names:?} stuck at {values:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A connection refused while the relay is full counts either as told why — its `Err` in
/// `errors_total{kind="too_many_connections"}` — or as closed unanswered
/// (`connections_refused_unanswered_total`), as it really went: the two add up to the
/// refusals, and each equals what the clients saw. 200 plain TCP connects made while the
/// relay cannot run (this runtime's one thread is busy connecting: they wait in the listen
/// queue) are refused by the accept loop, each told why by one of the 64 answer tasks if
/// one is free, else closed without a byte; and 3 WebSocket connects, which cannot be told
/// anything before their upgrade. Ahead of them in the queue, 8 connections reset by
/// their clients (RST) before the relay accepts them: answer tasks are free for them, and
/// their writes fail — unanswered, never told. How many of the 200 find a free task
/// depends on how the accept loop and the tasks are scheduled (tokio's cooperative budget
/// makes the loop yield every 128 accepts), so the test asserts no particular mix, only
/// that the counts match what each client saw. Before 15142c0 every refusal with a cap to
/// name counted an `Err` sent, the unanswered ones included; before the review's fix an
/// answer task counted its `Err` sent before writing it, so the 8 reset ones counted as
/// told (`errors` 8 above what the clients saw).
#[tokio::test]
async fn refused_connections_count_as_told_or_unanswered_as_they_went() {
    const REFUSED: usize = 200;
    const RESET: usize = 8;
    const WS: usize = 3;
    let mut config = Config::ephemeral();
    config.limits.max_connections = 1;
    // All from 127.0.0.1 at once: not churning.
    config.limits.addr_connect_burst = 100_000;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut session = Client::tcp(relay.tcp()).await;
    session.hello().await;
    for _ in 0..RESET {
        let s = socket2::Socket::from(std::net::TcpStream::connect(relay.tcp()).expect("connect"));
        s.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(s); // an RST: queued, accepted reset
    }
    let queued: Vec<std::net::TcpStream> = (0..REFUSED)
        .map(|_| std::net::TcpStream::connect(relay.tcp()).expect("connect"))
        .collect();
    let (mut told, mut unanswered) = (0u64, 0u64);
    for s in queued {
        s.set_nonblocking(true).unwrap();
        let mut c = Client::over_stream(Box::new(tokio::net::TcpStream::from_std(s).unwrap()));
        let (frames, _) = tokio::time::timeout(TIMEOUT, c.drain_to_end())
            .await
            .expect("a refused connection left open");
        match frames.as_slice() {
            [] => unanswered += 1,
            [Frame::Err(e)] if e.code == ErrorCode::TooManyConnections => told += 1,
            other => panic!("expected one Err(too_many_connections) or nothing, got {other:?}"),
        }
    }
    for _ in 0..WS {
        let mut c = Client::over_stream(Box::new(
            tokio::net::TcpStream::connect(relay.ws()).await.unwrap(),
        ));
        let (frames, _) = tokio::time::timeout(TIMEOUT, c.drain_to_end())
            .await
            .expect("a refused WebSocket connection left open");
        assert!(frames.is_empty(), "{frames:?}");
    }
    eprintln!("{told} told why, {unanswered} closed unanswered (and {RESET} reset)");
    assert_eq!(told + unanswered, REFUSED as u64);
    // Counted once each refusal's answer task is done: waited for until every refusal
    // is counted one way or the other.
    let [refused, errors, silent] = metrics_reaching(
        admin,
        [
            "whispeer_relay_connections_refused_total{cap=\"global\"}",
            "whispeer_relay_errors_total{kind=\"too_many_connections\"}",
            "whispeer_relay_connections_refused_unanswered_total",
        ],
        |[r, e, s]| r >= (REFUSED + RESET + WS) as u64 && e + s >= r,
    )
    .await;
    assert_eq!(refused, (REFUSED + RESET + WS) as u64);
    assert_eq!(errors, told, "Errs counted sent");
    assert_eq!(
        silent,
        unanswered + (RESET + WS) as u64,
        "refusals counted unanswered"
    );
    assert_eq!(errors + silent, refused);
    drop(session);
}
