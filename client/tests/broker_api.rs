//! The Broker API of issue 14: the example `broker_api` run as a test, many tasks on one
//! broker, typed topics refusing other types, and the broker's persistence directory.
#![cfg(feature = "in-process")]

#[allow(dead_code)]
#[path = "../examples/broker_api.rs"]
mod example;
#[path = "support/logs.rs"]
mod logs;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use whispeer::{
    Broker, BrokerOptions, Encryption, Message, Persistence, PublishError, PublishOptions,
    ReceiveError, TypeTag,
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issue_example_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let done = example::run(dir.path()).await.unwrap();
    assert_eq!(done.len(), 7, "{done:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_publish_and_subscribe_on_one_broker() {
    let broker = Broker::build_default().build().await.unwrap();
    const TASKS: u32 = 16;
    const EACH: u32 = 50;
    // Subscribers made from many tasks at once, each counting everything.
    let mut subs = Vec::new();
    for _ in 0..4 {
        let b = broker.clone();
        subs.push(tokio::spawn(async move {
            b.subscribe_stream::<(u32, u32)>("load/#").await.unwrap()
        }));
    }
    let mut streams = Vec::new();
    for s in subs {
        streams.push(s.await.unwrap());
    }
    let mut pubs = Vec::new();
    for t in 0..TASKS {
        let b = broker.clone();
        pubs.push(tokio::spawn(async move {
            for i in 0..EACH {
                if i % 2 == 0 {
                    b.publish(&format!("load/{t}"), (t, i)).await.unwrap();
                } else {
                    b.publish(&format!("load/{t}"), &(t, i)).await.unwrap();
                }
            }
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    for mut s in streams {
        let mut seen = HashSet::new();
        while seen.len() < (TASKS * EACH) as usize {
            let m = tokio::time::timeout(WAIT, s.next())
                .await
                .expect("every message arrives")
                .unwrap()
                .unwrap();
            assert!(seen.insert(m.value), "no duplicates");
        }
    }
    broker.shutdown().await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "test.Celsius/v1")]
struct Celsius {
    value: f64,
}

/// The same shape as `Celsius`: only the tag tells them apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "test.Fahrenheit/v1")]
struct Fahrenheit {
    value: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_subscriber_refuses_another_type_and_counts_it() {
    let broker = Broker::build_default().build().await.unwrap();
    let celsius = broker.topic::<Celsius>("temp/kitchen").unwrap();
    let mut stream = celsius.stream().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _cb = celsius
        .subscribe(move |m: Message<Celsius>| {
            let _ = tx.send(m.value);
        })
        .await
        .unwrap();

    // Another client publishes tag B (and untagged CBOR of the same shape) on the topic.
    let other = broker.connect_client().await.unwrap();
    let f = other.topic::<Fahrenheit>("temp/kitchen").unwrap();
    f.publish_with(Fahrenheit { value: 70.0 }, PublishOptions::at_least_once())
        .await
        .unwrap();
    let plain = broker.connect_client().await.unwrap();
    plain
        .publish_with(
            "temp/kitchen",
            &Fahrenheit { value: 71.0 },
            PublishOptions::at_least_once(),
        )
        .await
        .unwrap();
    celsius.publish(Celsius { value: 21.0 }).await.unwrap();

    for found in ["test.Fahrenheit/v1", "application/cbor"] {
        match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
            Some(Err(ReceiveError::TypeMismatch {
                expected, found: f, ..
            })) => {
                assert_eq!(expected, "test.Celsius/v1");
                assert!(f.contains(found), "{f}");
            }
            other => panic!("expected a type mismatch, got {other:?}"),
        }
    }
    let ok = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ok.value, Celsius { value: 21.0 });
    // The callback only ever saw the Celsius value.
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, Celsius { value: 21.0 });
    // Two refusals on each of the two typed subscriptions, counted.
    assert_eq!(broker.type_mismatches(), 4);
    assert_eq!(broker.client_handle().stats().type_mismatches, 4);
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_topic_refuses_other_types_through_the_untyped_api() {
    let broker = Broker::build_default().build().await.unwrap();
    let t = broker.topic::<Celsius>("temp/hall").unwrap();
    let e = broker
        .publish("temp/hall", Fahrenheit { value: 1.0 })
        .await
        .unwrap_err();
    assert!(matches!(e, PublishError::TypeMismatch { .. }), "{e}");
    let e = broker
        .client_handle()
        .publish_bytes("temp/hall", "application/cbor", b"\xa0")
        .await
        .unwrap_err();
    assert!(matches!(e, PublishError::TypeMismatch { .. }), "{e}");
    // Re-registering with another type is refused; the same type is fine.
    assert!(matches!(
        broker.topic::<Fahrenheit>("temp/hall"),
        Err(PublishError::TypeMismatch { .. })
    ));
    broker.topic::<Celsius>("temp/hall").unwrap();
    // The right type through the untyped API goes out tagged: the typed stream takes it.
    let mut s = t.stream().await.unwrap();
    broker
        .publish("temp/hall", &Celsius { value: 19.5 })
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.value.value, 19.5);
    assert_eq!(m.content_type, "application/cbor; type=\"test.Celsius/v1\"");
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_broker_keeps_its_key_in_a_0600_file_never_in_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker");
    let broker = Broker::builder(BrokerOptions::default())
        .with(Encryption::new())
        .with(Persistence::sqlite(&db))
        .build()
        .await
        .unwrap();
    broker
        .publish_with("a/b", "secret text", PublishOptions::at_least_once())
        .await
        .unwrap();
    let tree = broker.tree_key().unwrap().to_key_string().to_string();
    broker.shutdown().await.unwrap();

    let key_file = db.join(whispeer::broker::KEY_FILE);
    let text = std::fs::read_to_string(&key_file).unwrap();
    assert!(text.contains(&tree), "the key file holds the tree key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    }
    // Neither store holds the key (nor the plaintext).
    for f in [
        whispeer::broker::RELAY_STORE_FILE,
        whispeer::broker::CLIENT_STATE_FILE,
    ] {
        let mut bytes = std::fs::read(db.join(f)).unwrap();
        for ext in ["-wal", "-shm"] {
            if let Ok(more) = std::fs::read(db.join(format!("{f}{ext}"))) {
                bytes.extend(more);
            }
        }
        for needle in [tree.as_bytes(), b"secret text".as_slice()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{f} holds no key and no plaintext"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_listen_addresses_and_keyrings_are_typed_errors() {
    let e = Broker::build_default_with_ws("ftp://127.0.0.1:0")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, whispeer::BrokerError::Listen { .. }), "{e}");
    let e = Broker::build_default()
        .with(Encryption::with_keyring(whispeer::Keyring::new()))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(e, whispeer::BrokerError::KeyringNotShareable),
        "{e}"
    );
    assert!(Encryption::with_keys(["not a key"]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_sealed_under_a_passphrase_needs_it_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker");
    let opts = || {
        let mut o = BrokerOptions::default().key_passphrase("correct horse");
        // The cheapest cost locking accepts (64 MiB, t = 2).
        o.key_passphrase_params = whispeer::PassphraseParams {
            m_kib: whispeer::protocol::locked::MIN_M_KIB,
            t: whispeer::protocol::locked::MIN_T,
            p: 1,
        };
        o
    };
    let broker = Broker::builder(opts())
        .with(Persistence::sqlite(&db))
        .build()
        .await
        .unwrap();
    broker
        .publish_with(
            "diary/today",
            "sealed at rest",
            PublishOptions::at_least_once(),
        )
        .await
        .unwrap();
    let keys = broker.keys();
    let tree = broker.tree_key().unwrap().to_key_string().to_string();
    broker.shutdown().await.unwrap();
    let text = std::fs::read_to_string(db.join(whispeer::broker::KEY_FILE)).unwrap();
    assert!(
        text.contains("wslocked1") && !text.contains(&tree),
        "{text}"
    );

    // Without the passphrase, or with another one: typed errors, nothing opened.
    let e = Broker::builder(BrokerOptions::default())
        .with(Persistence::sqlite(&db))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(e, whispeer::BrokerError::KeyFileLocked { .. }),
        "{e}"
    );
    let mut wrong = opts().key_passphrase("wrong horse");
    wrong.key_passphrase_params = opts().key_passphrase_params;
    let e = Broker::builder(wrong)
        .with(Persistence::sqlite(&db))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            whispeer::BrokerError::Keys(whispeer::protocol::KeyError::Locked)
        ),
        "{e}"
    );

    // With it: the same keys, and the history reads.
    let broker = Broker::builder(opts())
        .with(Persistence::sqlite(&db))
        .build()
        .await
        .unwrap();
    assert_eq!(broker.keys(), keys);
    let mut s = broker
        .subscribe_stream_with_options::<String>(
            "diary/#",
            whispeer::SubscribeOptions::new().replay(whispeer::Replay::FromSeq(0)),
        )
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.value, "sealed at rest");
    broker.shutdown().await.unwrap();
}

/// Prints publish→stream throughput on one in-memory broker, untyped and typed (no
/// threshold): `cargo test -p whispeer --features in-process --test broker_api measure --
/// --ignored --nocapture` (add `--release` for real numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_broker_throughput_untyped_and_typed() {
    const TASKS: u32 = 8;
    const EACH: u32 = 2_500;
    let broker = Broker::build_default().build().await.unwrap();
    for typed in [false, true] {
        let topic = if typed { "m/typed" } else { "m/plain" };
        let t = broker.topic::<Celsius>("m/typed").unwrap();
        let mut s = if typed {
            t.stream().await.unwrap()
        } else {
            broker.subscribe_stream::<Celsius>(topic).await.unwrap()
        };
        let start = std::time::Instant::now();
        let mut pubs = Vec::new();
        for _ in 0..TASKS {
            let (b, t) = (broker.clone(), t.clone());
            pubs.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let v = Celsius {
                        value: f64::from(i),
                    };
                    if typed {
                        t.publish(&v).await.unwrap();
                    } else {
                        b.publish(topic, &v).await.unwrap();
                    }
                }
            }));
        }
        // QoS 0: a subscriber that falls behind loses messages, reported as `Lagged(n)`.
        let (mut got, mut lost) = (0u64, 0u64);
        while got + lost < u64::from(TASKS * EACH) {
            match tokio::time::timeout(WAIT, s.next()).await.unwrap().unwrap() {
                Ok(_) => got += 1,
                Err(ReceiveError::Lagged(n)) => lost += n,
                Err(e) => panic!("{e}"),
            }
        }
        let dt = start.elapsed();
        for p in pubs {
            p.await.unwrap();
        }
        println!(
            "{}: {} published, {got} delivered, {lost} lost (QoS 0, reported) in {dt:?} = {:.0} msg/s",
            if typed { "typed" } else { "untyped" },
            TASKS * EACH,
            f64::from(TASKS * EACH) / dt.as_secs_f64()
        );
    }
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_serves_tcp_and_callback_handles_unsubscribe_on_drop() {
    let broker = Broker::build_default()
        .with(whispeer::Tcp::new("tcp://127.0.0.1:0"))
        .build()
        .await
        .unwrap();
    let url = broker.tcp_url().expect("serving TCP");
    assert!(!url.ends_with(":0"), "{url}");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = broker
        .subscribe("tcp/#", move |m: Message<String>| {
            let _ = tx.send(m.value);
        })
        .await
        .unwrap();
    let remote = whispeer::Client::builder()
        .with(whispeer::Tcp::new(url))
        .with(Encryption::with_keys(broker.keys()).unwrap())
        .with(whispeer::Identity::generate())
        .connect()
        .await
        .unwrap();
    remote.publish("tcp/x", "over tcp").await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
    assert_eq!(got.as_deref(), Some("over tcp"));

    // Dropping the handle ends the callback: its closure (and the sender it owns) is
    // dropped, so the channel closes; later messages never reach it.
    drop(handle);
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap(), None);
    let mut after = broker.subscribe_stream::<String>("tcp/#").await.unwrap();
    remote.publish("tcp/x", "later").await.unwrap();
    let m = tokio::time::timeout(WAIT, after.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.value, "later");
    remote.close().await;
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_serves_quic_with_a_pinnable_certificate_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Broker::build_default_with_persistence(whispeer::PersistenceType::Sqlite(dir.path()))
            .with(whispeer::Quic::new("quic://127.0.0.1:0"))
            .build()
    };
    let broker = start().await.unwrap();
    let url = broker.quic_url().expect("serving QUIC");
    let pin = broker.tls_pin().expect("a generated certificate");
    let remote = |url: String, pin: String, keys: Vec<String>| async move {
        whispeer::Client::builder()
            .with(whispeer::Quic::new(url))
            .with(whispeer::TlsPin::sha256_hex(&pin).unwrap())
            .with(Encryption::with_keys(keys).unwrap())
            .with(whispeer::Identity::generate())
            .connect()
            .await
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _handle = broker
        .subscribe("quic/#", move |m: Message<String>| {
            let _ = tx.send((m.topic.as_str().to_owned(), m.value));
        })
        .await
        .unwrap();
    let client = remote(url.clone(), pin.clone(), broker.keys())
        .await
        .unwrap();
    let mut from_broker = client.subscribe::<u32>("numbers/+").await.unwrap();
    client.publish("quic/a/b", "over quic").await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ("quic/a/b".to_owned(), "over quic".to_owned()));
    broker.publish("numbers/one", 1u32).await.unwrap();
    let m = tokio::time::timeout(WAIT, from_broker.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((m.topic.as_str(), m.value), ("numbers/one", 1));
    // Without the pin the self-signed certificate is refused.
    let unpinned = whispeer::Client::builder()
        .with(whispeer::Quic::new(url.clone()))
        .with(Encryption::with_keys(broker.keys()).unwrap())
        .connect()
        .await;
    assert!(unpinned.is_err(), "an unpinned self-signed certificate");
    // The certificate is the broker's (in its directory, key 0600): a restart (on any
    // port: the certificate names the address, not the port) presents the same one, so
    // clients' pins keep working.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(whispeer::broker::QUIC_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    client.close().await;
    broker.shutdown().await.unwrap();
    let again = start().await.unwrap();
    assert_eq!(again.tls_pin().as_deref(), Some(pin.as_str()));
    let client = remote(again.quic_url().unwrap(), pin, again.keys())
        .await
        .expect("the old pin still connects");
    client.close().await;
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_persistence_serves_quic_from_a_temporary_certificate() {
    let broker = Broker::build_default()
        .with(whispeer::Quic::new("127.0.0.1:0"))
        .build()
        .await
        .unwrap();
    let client = whispeer::Client::builder()
        .with(whispeer::Quic::new(broker.quic_url().unwrap()))
        .with(whispeer::TlsPin::sha256_hex(&broker.tls_pin().unwrap()).unwrap())
        .with(Encryption::with_keys(broker.keys()).unwrap())
        .connect()
        .await
        .unwrap();
    let mut sub = broker.subscribe_stream::<String>("t").await.unwrap();
    client.publish("t", "hi").await.unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.value, "hi");
    let err = Broker::build_default()
        .with(whispeer::Quic::new("ws://127.0.0.1:0"))
        .build()
        .await
        .expect_err("a ws:// URL is not a QUIC address");
    assert!(err.to_string().contains("quic://"), "{err}");
    client.close().await;
    broker.shutdown().await.unwrap();
}

/// Security review F2: a topic (any UTF-8 but NUL) chosen by a member is logged at WARN
/// when its message does not decode; fmt writes named fields raw, so the topic is escaped
/// (no ESC reaches the terminal, no forged line).
#[tokio::test]
async fn a_hostile_topic_in_a_skipped_message_warning_is_escaped() {
    // A current-thread runtime: the callback task runs on this thread, under this default.
    let (buf, _guard) = logs::capture_warnings();
    let broker = Broker::build_default().build().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _h = broker
        .subscribe("a/#", move |m: Message<u32>| {
            let _ = tx.send(m.value);
        })
        .await
        .unwrap();
    let hostile = "a/\u{1b}[2J\nX";
    broker
        .client_handle()
        .publish_bytes(hostile, "application/cbor", b"\x60")
        .await
        .unwrap();
    broker.publish("a/ok", 7u32).await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
    assert_eq!(got, Some(7), "the next message still delivered");
    let log = buf.text();
    assert_eq!(log.matches("skipping message").count(), 1, "{log:?}");
    assert!(!log.contains('\u{1b}'), "no ESC in the log: {log:?}");
    for line in log.lines() {
        assert!(
            line.trim_start().starts_with("WARN"),
            "a forged line: {log:?}"
        );
    }
    assert!(log.contains("a/\\u{1b}[2J\\nX"), "{log:?}");
    broker.shutdown().await.unwrap();
}

/// Security review F1: a store directory another user can write is refused before any
/// file in it is used (a planted `broker.keys` would be the broker's tree key, known to
/// whoever planted it).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_directory_others_can_write_is_refused_with_its_planted_keys() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("broker");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let planted = whispeer::TreeKey::generate("planted").unwrap();
    std::fs::write(
        dir.join(whispeer::broker::KEY_FILE),
        format!("{}\n", planted.to_key_string().as_str()),
    )
    .unwrap();
    let e = Broker::builder(BrokerOptions::default())
        .with(Encryption::new())
        .with(Persistence::sqlite(&dir))
        .build()
        .await
        .map(|b| b.tree_key().map(|k| k.to_key_string().to_string()))
        .unwrap_err();
    assert!(
        matches!(e, whispeer::BrokerError::UnsafeDirectory { .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("writable by others without the sticky bit (mode 777)"),
        "{e}"
    );
    // Nothing was written into it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [whispeer::broker::KEY_FILE], "{names:?}");
}

/// A store directory its group may write (made by the old `create_dir_all` under umask
/// 002, or a Kubernetes `fsGroup` volume) keeps working after the upgrade, with a warning:
/// group members could only delete or rename the broker's files, not plant ones it uses.
/// Before: `UnsafeDirectory` (mode 775) at every start.
#[cfg(unix)]
#[test]
fn a_group_writable_store_directory_is_used_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let (buf, _guard) = logs::capture_warnings();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("broker");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let key = rt.block_on(async {
        let broker = Broker::builder(BrokerOptions::default())
            .with(Encryption::new())
            .with(Persistence::sqlite(&dir))
            .build()
            .await
            .expect("a group-writable directory of ours is used");
        let key = broker.tree_key().unwrap().to_key_string().to_string();
        broker.shutdown().await.unwrap();
        key
    });
    let log = buf.text();
    assert!(
        log.contains("broker directory writable by group") && log.contains("can delete or rename"),
        "{log:?}"
    );
    // The next start reads the same key from it.
    let again = rt.block_on(async {
        let broker = Broker::builder(BrokerOptions::default())
            .with(Encryption::new())
            .with(Persistence::sqlite(&dir))
            .build()
            .await
            .expect("second start");
        let key = broker.tree_key().unwrap().to_key_string().to_string();
        broker.shutdown().await.unwrap();
        key
    });
    assert_eq!(key, again);
}

/// A world-writable store directory with the sticky bit (1777) is used, with a warning, but
/// a key file planted in it by another user is not: every file is checked (another user's
/// → refused; as non-root, where no file of another user can be made, one writable by
/// others stands for it).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_shared_store_directory_is_used_but_a_key_file_planted_in_it_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("broker");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let build = || {
        Broker::builder(BrokerOptions::default())
            .with(Encryption::new())
            .with(Persistence::sqlite(&dir))
            .build()
    };
    build().await.expect("1777: used").shutdown().await.unwrap();
    let keys = dir.join(whispeer::broker::KEY_FILE);
    std::fs::remove_file(&keys).unwrap();
    let planted = whispeer::TreeKey::generate("planted").unwrap();
    std::fs::write(&keys, format!("{}\n", planted.to_key_string().as_str())).unwrap();
    // The tempdir is this process's: uid 0 means root, who can give a file to another.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(t.path()).unwrap()) == 0;
    if root {
        std::os::unix::fs::chown(&keys, Some(12345), Some(12345)).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    } else {
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let e = build()
        .await
        .map(|b| b.tree_key().map(|k| k.to_key_string().to_string()))
        .unwrap_err();
    match &e {
        whispeer::BrokerError::UnsafeFile { path, reason } => {
            assert_eq!(path, &keys);
            if root {
                assert!(
                    matches!(
                        reason,
                        whispeer::error::UnsafeFile::OtherOwner { owner: 12345, .. }
                    ),
                    "{e}"
                );
            }
        }
        _ => panic!("{e}"),
    }
}

/// Review of b07abc2: in a store directory others may write (1777 here; a group-writable
/// one alike), the embedded relay's store is checked as the broker's other files are
/// (it was opened with a plain SQLite open: no owner or mode check, links followed). A
/// `relay.sqlite-wal` planted by another user after a clean shutdown removed ours would be
/// replayed into the relay's history at the next start (history, retained values, durable
/// positions tampered with); a `-shm`, `-journal` or `-lock` alike (a `-lock` held stops
/// the broker); a `relay.sqlite` replaced by a symbolic link. Each is refused
/// (`UnsafeFile`) and left as it is; `relay.sqlite` and its `-lock` are made 0600 (so are
/// the `-wal` and `-shm` SQLite makes beside them, taking its mode).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_store_file_planted_in_a_shared_store_directory_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("broker");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let build = || {
        Broker::builder(BrokerOptions::default())
            .with(Encryption::new())
            .with(Persistence::sqlite(&dir))
            .build()
    };
    let broker = build().await.expect("1777: used");
    broker.publish("t/x", &1u32).await.unwrap();
    broker.shutdown().await.unwrap();
    let store = dir.join(whispeer::broker::RELAY_STORE_FILE);
    let beside = |suffix: &str| {
        let mut p = store.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    };
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    for p in [store.clone(), beside("-lock")] {
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    // The tempdir is this process's: uid 0 means root, who can give a file to another
    // (otherwise one writable by others stands for another user's).
    let root = std::fs::metadata(t.path()).unwrap().uid() == 0;
    if !root {
        eprintln!("not root: planted files are ours, mode 0666, not another user's");
    }
    for suffix in ["-wal", "-shm", "-journal", "-lock"] {
        let planted = beside(suffix);
        // A clean shutdown removed the -wal and -shm; ours, where left, are replaced.
        let _ = std::fs::remove_file(&planted);
        std::fs::write(&planted, b"planted").unwrap();
        if root {
            std::os::unix::fs::chown(&planted, Some(12345), Some(12345)).unwrap();
            std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();
        } else {
            std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let before = std::fs::metadata(&planted).unwrap();
        let e = build().await.map(|b| b.tls_pin()).unwrap_err();
        match &e {
            whispeer::BrokerError::UnsafeFile { path, reason } => {
                assert_eq!(path, &planted, "{e}");
                if root {
                    assert!(
                        matches!(
                            reason,
                            whispeer::error::UnsafeFile::OtherOwner { owner: 12345, .. }
                        ),
                        "{e}"
                    );
                }
            }
            other => panic!("{suffix}: {other}"),
        }
        // Untouched: neither replayed into the store nor truncated nor made ours.
        let after = std::fs::metadata(&planted).unwrap();
        assert_eq!(std::fs::read(&planted).unwrap(), b"planted", "{suffix}");
        assert_eq!(
            (after.uid(), after.mode(), after.len()),
            (before.uid(), before.mode(), before.len()),
            "{suffix}"
        );
        std::fs::remove_file(&planted).unwrap();
    }
    // A relay.sqlite replaced by a symbolic link (to the real one, moved aside) is refused,
    // its target left alone.
    let moved = t.path().join("moved.sqlite");
    std::fs::rename(&store, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &store).unwrap();
    let target = std::fs::read(&moved).unwrap();
    let e = build().await.map(|b| b.tls_pin()).unwrap_err();
    match &e {
        whispeer::BrokerError::UnsafeFile { path, reason } => {
            assert_eq!(path, &store, "{e}");
            assert!(
                matches!(reason, whispeer::error::UnsafeFile::Symlink),
                "{e}"
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(std::fs::read(&moved).unwrap(), target);
    assert!(std::fs::symlink_metadata(&store)
        .unwrap()
        .file_type()
        .is_symlink());
    // Put back, the store is used again (its -lock made anew, 0600).
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(&moved, &store).unwrap();
    let broker = build().await.expect("the store put back");
    broker.shutdown().await.unwrap();
    assert_eq!(mode(&beside("-lock")), 0o600);
}

/// Security review F1: a symbolic link planted as `broker.crt` is never written through
/// (it was: `write_pem` opened it with create + truncate, overwriting the link's target).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_quic_certificate_is_refused_and_its_target_left_alone() {
    let t = tempfile::tempdir().unwrap();
    let victim = t.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let dir = t.path().join("broker");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join(whispeer::broker::QUIC_CERT_FILE)).unwrap();
    let r = Broker::build_default_with_persistence(whispeer::PersistenceType::Sqlite(&dir))
        .with(whispeer::Quic::new("quic://127.0.0.1:0"))
        .build()
        .await;
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let e = r.map(|b| b.tls_pin()).unwrap_err();
    assert!(matches!(e, whispeer::BrokerError::UnsafeFile { .. }), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
}

/// Security review F1: a `broker.key` planted by another user (mode 0666) is refused,
/// never used nor written into (the broker wrote its new private key into it, keeping the
/// file's mode: the planter could read the QUIC key).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_world_writable_quic_key_is_refused_and_not_written_into() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("broker");
    std::fs::create_dir(&dir).unwrap();
    let key = dir.join(whispeer::broker::QUIC_KEY_FILE);
    std::fs::write(&key, "planted").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = Broker::build_default_with_persistence(whispeer::PersistenceType::Sqlite(&dir))
        .with(whispeer::Quic::new("quic://127.0.0.1:0"))
        .build()
        .await;
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "planted");
    let e = r.map(|b| b.tls_pin()).unwrap_err();
    assert!(matches!(e, whispeer::BrokerError::UnsafeFile { .. }), "{e}");
    assert!(e.to_string().contains("writable by group or others"), "{e}");
}

/// Since 66e8b79 a subscription is bound to one tree: with keys of two trees covering
/// `shared/#`, every callback API naming no tree is refused (`AmbiguousTree`), and its
/// `*_with_options` variant bound to tree A gets A's messages only (B's, published first
/// on the same topic, never reach it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_subscribes_take_options_naming_the_tree() {
    use whispeer::protocol::KeyError;
    use whispeer::{SubscribeError, SubscribeOptions, TreeKey};

    let a = TreeKey::generate("alpha").unwrap();
    let b = TreeKey::generate("beta").unwrap();
    let keys = [&a, &b].map(|t| t.to_key_string().to_string());
    let broker = Broker::build_default()
        .with(Encryption::with_keys(keys).unwrap())
        .build()
        .await
        .unwrap();
    let client = broker.client_handle().clone();
    let typed = broker.topic::<Celsius>("shared/t").unwrap();
    fn ambiguous<H>(r: Result<H, SubscribeError>, what: &str) {
        match r {
            Err(SubscribeError::Key(KeyError::AmbiguousTree { .. })) => {}
            Err(e) => panic!("{what}: {e}"),
            Ok(_) => panic!("{what}: subscribed across two trees"),
        }
    }
    ambiguous(
        broker.subscribe("shared/#", |_: Message<u32>| {}).await,
        "Broker::subscribe",
    );
    ambiguous(
        broker
            .subscribe_async("shared/#", |_: Message<u32>| async {})
            .await,
        "Broker::subscribe_async",
    );
    ambiguous(
        client
            .subscribe_callback("shared/#", |_: Message<u32>| {})
            .await,
        "Client::subscribe_callback",
    );
    ambiguous(
        client
            .subscribe_async("shared/#", |_: Message<u32>| async {})
            .await,
        "Client::subscribe_async",
    );
    ambiguous(
        client.on("shared/#", |_: Message<u32>| {}).await,
        "Client::on",
    );
    ambiguous(
        client
            .on_async("shared/#", |_: Message<u32>| async {})
            .await,
        "Client::on_async",
    );
    ambiguous(typed.subscribe(|_| {}).await, "TypedTopic::subscribe");
    ambiguous(
        typed.subscribe_async(|_| async {}).await,
        "TypedTopic::subscribe_async",
    );

    let in_a = || SubscribeOptions::new().tree(a.tree_id());
    let (tx, mut rx) = mpsc::unbounded_channel::<(&'static str, f64, whispeer::protocol::TreeId)>();
    let cb = |name: &'static str| {
        let tx = tx.clone();
        move |m: Message<u32>| {
            let _ = tx.send((name, f64::from(m.value), m.tree_id));
        }
    };
    let acb = |name: &'static str| {
        let tx = tx.clone();
        move |m: Message<u32>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((name, f64::from(m.value), m.tree_id));
            }
        }
    };
    let tcb = |name: &'static str| {
        let tx = tx.clone();
        move |m: Message<Celsius>| {
            let _ = tx.send((name, m.value.value, m.tree_id));
        }
    };
    let tacb = |name: &'static str| {
        let tx = tx.clone();
        move |m: Message<Celsius>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((name, m.value.value, m.tree_id));
            }
        }
    };
    let _h1 = broker
        .subscribe_with_options("shared/#", in_a(), cb("broker"))
        .await
        .unwrap();
    let _h2 = broker
        .subscribe_async_with_options("shared/#", in_a(), acb("broker async"))
        .await
        .unwrap();
    let _h3 = client
        .subscribe_callback_with_options("shared/#", in_a(), cb("client"))
        .await
        .unwrap();
    let _h4 = client
        .subscribe_async_with_options("shared/#", in_a(), acb("client async"))
        .await
        .unwrap();
    let h5 = client
        .on_with_options("shared/#", in_a(), cb("on"))
        .await
        .unwrap();
    let h6 = client
        .on_async_with_options("shared/#", in_a(), acb("on async"))
        .await
        .unwrap();
    let _h7 = typed
        .subscribe_with_options(in_a(), tcb("typed"))
        .await
        .unwrap();
    let _h8 = typed
        .subscribe_async_with_options(in_a(), tacb("typed async"))
        .await
        .unwrap();
    drop(tx);

    // B's first, then A's: a callback bound to A sees A's value first, and only it.
    for (t, v) in [(&b, 1u32), (&a, 2)] {
        let o = || PublishOptions::at_least_once().tree(t.tree_id());
        broker.publish_with("shared/x", v, o()).await.unwrap();
        typed
            .publish_with(
                Celsius {
                    value: f64::from(v),
                },
                o(),
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 8 {
        let m = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("every callback gets A's message")
            .unwrap();
        assert_eq!(
            (m.1, m.2),
            (2.0, a.tree_id()),
            "{}: only tree A's message",
            m.0
        );
        got.push(m.0);
    }
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), 8, "one message per callback: {got:?}");
    // The untyped subscriptions on shared/# see the typed topic's message too (skipped
    // or not, it is A's); nothing of B's arrives within a short wait.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        assert_eq!(m.2, a.tree_id(), "{}: only tree A's messages", m.0);
    }
    h5.abort();
    h6.abort();
    broker.shutdown().await.unwrap();
}
