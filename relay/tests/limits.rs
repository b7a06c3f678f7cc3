//! Every configurable limit: the violating client gets a typed fatal `Err` and is closed;
//! the relay and the other clients carry on (checked with a probe after each case).
//! Also protocol-order errors, timeouts and plugin rejections.

mod common;

use std::sync::Arc;

use common::*;
use tokio_tungstenite::tungstenite::Message;
use whispeer_protocol::frame::{Close, Hello, Msg, Pub};
use whispeer_protocol::{ErrorCode, Frame, Qos};
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

#[tokio::test]
async fn publish_rate_limit() {
    let relay = TestRelay::start(small_limits()).await;
    let mut probe = Probe::new(relay.tcp()).await;
    let mut sub = subscriber_ws(relay.ws(), exact(1, &[1])).await;
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    // Burst 3 at 1/s: ten back-to-back publishes cannot all pass.
    for i in 0..10u8 {
        let ok = c
            .send_raw(&whispeer_protocol::codec::encode_prefixed(&Frame::Pub(
                Pub {
                    envelope: envelope(1, &[1]),
                    flags: 0,
                    publish_id: Some([i; 16]),
                    qos: Qos::AtMostOnce,
                },
            )))
            .await;
        if ok.is_err() {
            break;
        }
    }
    let e = c.expect_fatal(ErrorCode::RateLimited).await;
    assert!(e.publish_id.is_some());
    // The burst went through to the subscriber.
    for _ in 0..3 {
        sub.expect_msg().await;
    }
    probe.check("rate limit").await;
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
    let ok = envelope(1, &[1]);
    c.publish(ok.clone()).await;
    assert_eq!(c.expect_msg().await.envelope, ok);
}
