//! The built-in plugins in the users' words: `LocalHistory` (decrypted messages of chosen
//! topics in a local SQLite file, by topic and time), `TypeEnforcement`, `Logging` with its
//! own writer, and a user `Plugin` given straight to `.with(...)`.
#![cfg(feature = "in-process")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use whispeer::plugin::{Outgoing, PluginError};
use whispeer::{
    Broker, Client, Encryption, Identity, InProcess, LocalHistory, Logging, Plugin, PublishError,
    PublishOptions, TypeEnforcement, TypeTag,
};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "test.Celsius/v1")]
struct Celsius {
    value: f64,
}

/// Waits until the wall clock has moved past `t` (so later messages are dated after it).
async fn clock_past(t: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while whispeer::now_ms() <= t {
        assert!(tokio::time::Instant::now() < deadline, "clock stuck");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_history_keeps_chosen_topics_queryable_by_topic_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.sqlite");
    let history = LocalHistory::open(&file, ["sensor/#"]).unwrap();
    let broker = Broker::build_default()
        .with(history.clone())
        .build()
        .await
        .unwrap();
    let mut all = broker.subscribe_stream::<f64>("#").await.unwrap();

    let publish = |topic: &'static str, v: f64| {
        let b = broker.clone();
        async move {
            b.publish_with(topic, v, PublishOptions::at_least_once())
                .await
                .unwrap()
        }
    };
    publish("sensor/kitchen/temp", 20.0).await;
    publish("sensor/garage/temp", 10.0).await;
    publish("chat/lobby", 1.0).await; // not a chosen topic
    for _ in 0..3 {
        tokio::time::timeout(WAIT, all.next()).await.unwrap();
    }
    let mid = whispeer::now_ms();
    clock_past(mid).await;
    publish("sensor/kitchen/temp", 21.0).await;
    tokio::time::timeout(WAIT, all.next()).await.unwrap();

    let values = |v: Vec<whispeer::HistoryEntry>| {
        v.iter()
            .map(|e| e.decode::<f64>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(values(history.query("#", ..).unwrap()), [20.0, 10.0, 21.0]);
    assert_eq!(
        values(history.query("sensor/kitchen/#", ..).unwrap()),
        [20.0, 21.0]
    );
    assert_eq!(
        values(history.query("sensor/+/temp", ..=mid).unwrap()),
        [20.0, 10.0]
    );
    assert_eq!(
        values(history.query("sensor/#", mid + 1..).unwrap()),
        [21.0]
    );
    let e = &history.query("sensor/garage/temp", ..).unwrap()[0];
    assert_eq!(e.sender, broker.client_handle().sender_id());
    broker.shutdown().await.unwrap();

    // The file outlives the process: reopened, the same answers.
    drop(history);
    let again = LocalHistory::open(&file, ["sensor/#"]).unwrap();
    assert_eq!(again.query("#", ..).unwrap().len(), 3);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "plaintext file is owner-only");
    }
    assert!(LocalHistory::open(&file, ["bad/#/filter"]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_enforcement_refuses_publishes_and_drops_messages_of_other_types() {
    let enforce = TypeEnforcement::new().topic::<Celsius>("temp/#").unwrap();
    let broker = Broker::build_default()
        .with(enforce.clone())
        .build()
        .await
        .unwrap();
    // Through the untyped API, plain CBOR on an enforced topic is refused.
    let e = broker.publish("temp/hall", 1.5f64).await.unwrap_err();
    assert!(matches!(e, PublishError::Plugin(_)), "{e}");

    let mut sub = broker.subscribe_stream::<Celsius>("temp/#").await.unwrap();
    // A client without the plugin sends plain CBOR of the same shape, then a tagged value.
    let rogue = Client::builder()
        .with(InProcess::new(broker.relay().clone()))
        .with(Encryption::with_keys(broker.keys()).unwrap())
        .with(Identity::generate())
        .connect()
        .await
        .unwrap();
    rogue
        .publish_with(
            "temp/hall",
            &Celsius { value: -1.0 },
            PublishOptions::at_least_once(),
        )
        .await
        .unwrap();
    let typed = rogue.topic::<Celsius>("temp/hall").unwrap();
    typed.publish(Celsius { value: 19.0 }).await.unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.value.value, 19.0, "the untagged value was dropped");
    assert_eq!(enforce.refused(), 1);
    assert_eq!(broker.client_handle().stats().plugin_drops, 1);
    broker.shutdown().await.unwrap();
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A user plugin given straight to `.with(...)`.
struct NoShouting;
impl Plugin for NoShouting {
    fn name(&self) -> &str {
        "no-shouting"
    }
    fn on_publish(&self, msg: &mut Outgoing) -> Result<(), PluginError> {
        if msg.payload.iter().any(u8::is_ascii_uppercase) {
            return Err(PluginError::new(self.name(), "no capitals"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_writes_events_without_payloads_and_user_plugins_plug_in() {
    let buf = Buf::default();
    let broker = Broker::build_default()
        .with(Logging::to_writer(tracing_level_info(), buf.clone()))
        .with(NoShouting)
        .build()
        .await
        .unwrap();
    let mut s = broker.subscribe_stream::<String>("notes/#").await.unwrap();
    broker.publish("notes/a", "quiet words").await.unwrap();
    tokio::time::timeout(WAIT, s.next()).await.unwrap();
    let e = broker.publish("notes/a", "LOUD").await.unwrap_err();
    assert!(matches!(e, PublishError::Plugin(_)), "{e}");
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("subscribe filter=notes/#"), "{log}");
    assert!(log.contains("publish topic=notes/a"), "{log}");
    assert!(log.contains("message topic=notes/a"), "{log}");
    assert!(log.starts_with("INFO whispeer:"), "{log}");
    assert!(!log.contains("quiet words"), "never payloads: {log}");
    broker.shutdown().await.unwrap();
}

fn tracing_level_info() -> whispeer::LogLevel {
    whispeer::LogLevel::INFO
}

/// Security review F3: `Logging` writes topics chosen by whoever publishes; a topic with
/// ESC and a newline is escaped, so it neither acts on a terminal nor forges a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_escapes_a_hostile_topic_on_one_line() {
    let buf = Buf::default();
    let broker = Broker::build_default()
        .with(Logging::to_writer(tracing_level_info(), buf.clone()))
        .build()
        .await
        .unwrap();
    let hostile = "a/\u{1b}[31m\nWARN fake";
    // Logged in `on_publish`, before the message is sealed: one event, one line.
    broker.publish(hostile, "hi").await.unwrap();
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(!log.contains('\u{1b}'), "no ESC: {log:?}");
    assert_eq!(log.lines().count(), 1, "exactly one line: {log:?}");
    assert!(
        log.starts_with("INFO whispeer: publish topic=a/\\u{1b}[31m\\nWARN fake"),
        "{log:?}"
    );
    broker.shutdown().await.unwrap();
}
