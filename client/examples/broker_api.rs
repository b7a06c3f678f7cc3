//! The Broker API as issue 14 spells it, run end to end: every builder form, publish by
//! value and by reference, sync and async callbacks, a stream, typed topics (and a type
//! mismatch refused), a plugin, a second client in one line, and persistence with replay
//! across a broker restart.
//!
//! `cargo run -p whispeer --features in-process --example broker_api [DIR]` (DIR: where the
//! persistent brokers keep their files; a fresh temporary directory by default). It listens
//! on port 0 where the issue says 8080, so it never collides with a running service.
//! `client/tests/broker_api.rs` runs it as a test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use whispeer::{
    Broker, BrokerOptions, Client, Compression, Encryption, Identity, Message, Metrics,
    Persistence, PersistenceType, PublishOptions, Replay, SubscribeOptions, TypeTag, WebSocket,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "myapp.MyData/v1")]
struct MyData {
    name: String,
    id: i32,
}

/// Same shape as `MyData`, another type: only the tag tells them apart.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "other.Impostor/v1")]
struct Impostor {
    name: String,
    id: i32,
}

const WAIT: Duration = Duration::from_secs(20);

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> Result<T, Error> {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(format!("{what}: channel closed").into()),
        Err(_) => Err(format!("{what}: nothing within {WAIT:?}").into()),
    }
}

/// Everything; returns what it checked, one line each.
pub async fn run(dir: &Path) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();

    // The block (port 0 where it says 8080; the directory under `dir`).
    let metrics = Metrics::new();
    let broker = Broker::builder(BrokerOptions::default())
        .with(Encryption::new())
        .with(Compression::new())
        .with(WebSocket::new("http://localhost:0"))
        .with(Persistence::sqlite(dir.join("db")))
        .with(metrics.clone())
        .build()
        .await?;
    let url = broker
        .ws_url()
        .ok_or("a WebSocket listener was asked for")?;
    assert!(!url.ends_with(":0"), "ws_url tells the real port: {url}");
    done.push(format!("builder with .with(...): serving {url}"));

    let b2 = Broker::build_default().build().await?;
    let b3 = Broker::build_default_with_ws("http://127.0.0.1:0")
        .build()
        .await?;
    let b4 =
        Broker::build_default_with_persistence(PersistenceType::Sqlite(dir.join("db4").as_path()))
            .build()
            .await?;
    let b5 = Broker::build_default_with_persistence_ws(
        "ws://127.0.0.1:0",
        PersistenceType::Sqlite(dir.join("db5")),
    )
    .build()
    .await?;
    assert!(b3.ws_url().is_some() && b5.ws_url().is_some() && b2.ws_url().is_none());
    assert!(dir
        .join("db4")
        .join(whispeer::broker::RELAY_STORE_FILE)
        .exists());
    for b in [b2, b3, b4, b5] {
        b.shutdown().await?;
    }
    done.push("the four build_default* constructors".into());

    // Sync and async callbacks, and a stream; publish by value, turbofish, by reference.
    let (sync_tx, mut sync_rx) = mpsc::unbounded_channel();
    let sub = broker
        .subscribe("some-event", move |msg: Message<MyData>| {
            println!("{:?}", msg.value);
            let _ = sync_tx.send(msg.value);
        })
        .await?;
    let (async_tx, mut async_rx) = mpsc::unbounded_channel();
    let sub2 = broker
        .subscribe_async("some-event", move |msg: Message<MyData>| {
            let tx = async_tx.clone();
            async move {
                tokio::task::yield_now().await;
                let _ = tx.send(msg.value);
            }
        })
        .await?;
    let mut stream = broker.subscribe_stream::<MyData>("some-event").await?;
    let my_data = MyData {
        name: "first".into(),
        id: 1,
    };
    broker.publish("some-event", my_data.clone()).await?;
    broker.publish::<MyData>("some-event", my_data).await?;
    let third = MyData {
        name: "third".into(),
        id: 3,
    };
    broker.publish("some-event", &third).await?;
    for want in [1, 1, 3] {
        assert_eq!(recv(&mut sync_rx, "sync callback").await?.id, want);
        assert_eq!(recv(&mut async_rx, "async callback").await?.id, want);
        let m = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut stream))
            .await?
            .ok_or("stream ended")??;
        assert_eq!(m.value.id, want);
    }
    drop((sub, sub2, stream));
    done.push("publish by value/reference; subscribe, subscribe_async, subscribe_stream".into());

    // A second client in one line (another task here; another process would use the URL).
    let other = broker.connect_client().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _sub = broker
        .subscribe("greetings", move |m: Message<String>| {
            let _ = tx.send((m.value, m.sender));
        })
        .await?;
    other.publish("greetings", "hello from a task").await?;
    let (text, from) = recv(&mut rx, "connect_client publish").await?;
    assert_eq!(text, "hello from a task");
    assert_eq!(from, other.sender_id());
    let remote = Client::builder()
        .with(WebSocket::new(url.clone()))
        .with(Encryption::with_keys(broker.keys())?)
        .with(Identity::generate())
        .connect()
        .await?;
    remote.publish("greetings", "hello over ws").await?;
    assert_eq!(recv(&mut rx, "ws client publish").await?.0, "hello over ws");
    remote.close().await;
    done.push("connect_client() and ws_url() + keys() join in one line".into());

    // Typed topics: one type per topic, enforced.
    let typed = broker.topic::<MyData>("typed-event")?;
    let (ttx, mut trx) = mpsc::unbounded_channel();
    let _typed_sub = typed
        .subscribe(move |m: Message<MyData>| {
            let _ = ttx.send(m.value);
        })
        .await?;
    let impostor = other.topic::<Impostor>("typed-event")?; // another client, another type
                                                            // Acknowledged: the relay has routed it before the typed publish below.
    impostor
        .publish_with(
            Impostor {
                name: "not mine".into(),
                id: 66,
            },
            PublishOptions::at_least_once(),
        )
        .await?;
    typed
        .publish(MyData {
            name: "typed".into(),
            id: 7,
        })
        .await?;
    let got = recv(&mut trx, "typed subscriber").await?;
    assert_eq!(got.id, 7, "the impostor never reached the callback");
    assert_eq!(broker.type_mismatches(), 1, "the impostor was counted");
    let refused = broker
        .publish(
            "typed-event",
            Impostor {
                name: "untyped".into(),
                id: 1,
            },
        )
        .await;
    assert!(
        matches!(refused, Err(whispeer::PublishError::TypeMismatch { .. })),
        "{refused:?}"
    );
    done.push("typed topic: impostor counted, never delivered; untyped publish refused".into());

    // The plugin saw every publish of the broker's embedded client.
    let m = metrics.snapshot();
    assert!(m.published >= 4 && m.received >= 4, "{m:?}");
    done.push(format!(
        "Metrics plugin: {} published, {} received",
        m.published, m.received
    ));

    // Persistence: history and keys survive a restart of the broker.
    let keys = broker.keys();
    for i in 0..3 {
        broker
            .publish_with(
                "journal/day",
                format!("entry {i}"),
                PublishOptions::at_least_once(),
            )
            .await?;
    }
    other.close().await;
    broker.shutdown().await?;
    let broker = Broker::builder(BrokerOptions::default())
        .with(Encryption::new()) // the key file wins: the same tree as before
        .with(Persistence::sqlite(dir.join("db")))
        .build()
        .await?;
    assert_eq!(
        broker.keys(),
        keys,
        "the generated key was kept in its key file"
    );
    let mut replay = broker
        .subscribe_stream_with_options::<String>(
            "journal/#",
            SubscribeOptions::new().replay(Replay::FromSeq(0)),
        )
        .await?;
    for i in 0..3 {
        let m = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut replay))
            .await?
            .ok_or("replay ended")??;
        assert_eq!(m.value, format!("entry {i}"));
    }
    broker.shutdown().await?;
    done.push("persistence: 3 messages replayed and decrypted after a restart".into());
    Ok(done)
}

#[allow(dead_code)] // a test includes this file and calls `run`
#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir: PathBuf = match std::env::args().nth(1) {
        Some(d) => d.into(),
        None => std::env::temp_dir().join(format!("whispeer-broker-api-{}", std::process::id())),
    };
    for line in run(&dir).await? {
        println!("ok: {line}");
    }
    Ok(())
}
