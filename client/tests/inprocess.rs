//! In-process mode (an embedded relay, no sockets unless asked) and client plugins.
#![cfg(feature = "in-process")]

mod support;

use std::net::SocketAddr;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use support::within;
use whispeer::plugin::{Logging, Metrics, Outgoing, Plugin, PluginError, Transform};
use whispeer::{
    Broker, Client, Identity, Keyring, PublishError, SubscribeError, TopicFilter, WebSocket,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    room: String,
    celsius: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_broker_seals_routes_and_opens_without_sockets() {
    let broker = Broker::start().await.unwrap();
    assert_eq!(broker.ws_url(), None, "no listener unless asked");
    let a = broker.client().await.unwrap();
    let b = broker.client().await.unwrap();
    let mut sub = b.subscribe::<Reading>("sensor/+/temp").await.unwrap();
    let r = Reading {
        room: "kitchen".into(),
        celsius: 21.5,
    };
    a.publish("sensor/kitchen/temp", &r).await.unwrap();
    a.publish("sensor/kitchen/humidity", &r).await.unwrap();
    a.publish(
        "sensor/garage/temp",
        &Reading {
            room: "garage".into(),
            ..r.clone()
        },
    )
    .await
    .unwrap();
    let m1 = within("first", sub.next()).await.unwrap().unwrap();
    assert_eq!(m1.value, r);
    assert_eq!(m1.sender, a.sender_id());
    let m2 = within("second", sub.next()).await.unwrap().unwrap();
    assert_eq!(m2.topic.as_str(), "sensor/garage/temp");

    // The relay routed ciphertext: its metrics saw the messages, and it holds no key.
    let status = serde_json::to_value(broker.relay().status()).unwrap();
    assert!(status.to_string().contains("connections"), "{status}");
    a.close().await;
    b.close().await;
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_websocket_listener_joins_network_clients_and_in_process_ones() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let broker = Broker::build_default()
        .with(WebSocket::new(format!("ws://{any}")))
        .passphrase("family", "correct horse battery staple")
        .unwrap()
        .build()
        .await
        .unwrap();
    let url = broker.ws_url().expect("listening");
    let local = broker.client().await.unwrap();
    let mut inbox = local.subscribe::<String>("chat/#").await.unwrap();

    // A network client that only knows the passphrase.
    let tree = whispeer::TreeKey::from_passphrase(
        "family",
        b"correct horse battery staple",
        Default::default(),
    )
    .unwrap();
    let mut keys = Keyring::new();
    keys.add_tree_key(&tree).unwrap();
    let remote = Client::builder()
        .with(WebSocket::new(url))
        .with(whispeer::Encryption::with_keyring(keys))
        .with(Identity::generate())
        .connect()
        .await
        .unwrap();
    remote
        .publish("chat/kitchen", "dinner is ready")
        .await
        .unwrap();
    let m = within("ws → in-process", inbox.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.value, "dinner is ready");
    assert_eq!(m.sender, remote.sender_id());
    remote.close().await;
    local.close().await;
    broker.shutdown().await.unwrap();
}

/// Refuses subscriptions to `admin/#` and publishes over 64 bytes.
struct Policy;
impl Plugin for Policy {
    fn name(&self) -> &str {
        "policy"
    }
    fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        if msg.payload.len() > 64 {
            return Err(PluginError::new(self.name(), "payload over 64 bytes"));
        }
        Ok(())
    }
    fn on_subscribe(&self, filter: &TopicFilter) -> Result<(), PluginError> {
        if filter.as_str().starts_with("admin") {
            return Err(PluginError::new(self.name(), "admin topics are off limits"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_transform_count_drop_and_refuse() {
    let broker = Broker::start().await.unwrap();
    // A versioning transform: prefix b'1' before sealing, require and strip it after opening.
    let versioned = || {
        Transform::new(
            "v1-wrapper",
            "text/plain",
            |_, _, p| Ok([b"1".as_slice(), &p].concat()),
            |_, _, p| match p.split_first() {
                Some((b'1', rest)) => Ok(rest.to_vec()),
                _ => Err("not a v1 message".into()),
            },
        )
    };
    let sent = Metrics::new();
    let got = Metrics::new();
    let publisher = broker
        .client_builder()
        .with(Logging::default())
        .with(sent.clone())
        .with(versioned())
        .with(Policy)
        .connect()
        .await
        .unwrap();
    let subscriber = broker
        .client_builder()
        .with(got.clone())
        .with(versioned())
        .connect()
        .await
        .unwrap();
    let plain = broker.client().await.unwrap(); // no plugins: sends unwrapped text
    let mut sub = subscriber.subscribe_bytes("notes/#").await.unwrap();

    publisher
        .publish_bytes("notes/a", "text/plain", b"hello")
        .await
        .unwrap();
    let m = within("transformed", sub.next()).await.unwrap().unwrap();
    assert_eq!(m.value, b"hello", "the inverse transform ran after opening");

    // The subscriber's transform drops what does not carry the version byte.
    plain
        .publish_bytes("notes/b", "text/plain", b"2-unversioned")
        .await
        .unwrap();
    // Two connections: the relay keeps order per connection only, so wait until the
    // subscriber has dropped notes/b before the publisher sends notes/c.
    let mut stats = subscriber.stats_changes();
    within("dropped", stats.wait_for(|s| s.plugin_drops == 1))
        .await
        .unwrap();
    publisher
        .publish_bytes("notes/c", "text/plain", b"after")
        .await
        .unwrap();
    let m = within("next kept", sub.next()).await.unwrap().unwrap();
    assert_eq!(m.value, b"after");
    assert_eq!(m.topic.as_str(), "notes/c");
    assert_eq!(subscriber.stats().plugin_drops, 1);

    // Refusals are typed errors.
    match publisher
        .publish_bytes("notes/big", "text/plain", &[b'x'; 100])
        .await
    {
        Err(PublishError::Plugin(e)) => assert_eq!(e.plugin, "policy"),
        other => panic!("expected a plugin refusal, got {other:?}"),
    }
    match publisher.subscribe::<String>("admin/#").await {
        Err(SubscribeError::Plugin(e)) => assert!(e.reason.contains("off limits")),
        other => panic!("expected a plugin refusal, got {other:?}"),
    }

    let s = sent.snapshot();
    assert_eq!((s.published, s.published_bytes), (3, 5 + 5 + 100));
    let g = got.snapshot();
    assert_eq!(
        g.received, 3,
        "metrics ran before the transform dropped one"
    );
    assert_eq!(g.subscriptions, 1);
    for c in [publisher, subscriber, plain] {
        c.close().await;
    }
    broker.shutdown().await.unwrap();
}
