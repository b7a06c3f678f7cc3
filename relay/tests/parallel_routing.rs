//! Routing in parallel (the routing lock is split into shards by key id, so publishes on
//! different key ids append to the store at the same time): sequence numbers stay unique,
//! increase for every subscriber, and the store's committed mark never passes a message it
//! has not queued. Against a real SQLite file and the real relay over real sockets.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use whispeer_protocol::frame::{features, pub_flags, Pub, Replay, Sub};
use whispeer_protocol::{Envelope, Frame, KeyId, Qos, TokenPattern};
use whispeer_relay::config::{StoreConfig, StoreKind};
use whispeer_relay::store::{Accepted, Append, SqliteStore, Store, Tenant};
use whispeer_relay::{Config, Relay};

fn key_of(t: usize) -> KeyId {
    KeyId::from_bytes([0x40 + t as u8; 16])
}

/// Message `i` on key id `t`'s one path.
fn env_on(t: usize, i: u64) -> Envelope {
    indexed_on(key_of(t), 7, i, 16)
}

/// Threads append on their own key ids at once, mixing live-only QoS 0 (numbered without
/// being queued; three in four) and stored QoS 1. (With the sequence read and written
/// outside the queue lock this failed 4 runs in 4: a sequence handed out twice.) Every sequence is handed out once, each thread's grow,
/// and once the last is durable every stored message reads back under its own sequence —
/// so no sequence was committed before a smaller one was queued.
#[test]
fn concurrent_appends_get_unique_sequences_and_read_back_in_order() {
    const THREADS: usize = 8;
    const EACH: u64 = 40_000;
    let dir = temp_dir("parallel-append");
    let store = Arc::new(
        SqliteStore::open_file(StoreConfig {
            path: dir.join("s.db"),
            max_messages: 0,
            max_bytes: 0,
            // No free-space reserve: the test must not depend on TMPDIR's free space.
            min_free_bytes: 0,
            ..StoreConfig::default()
        })
        .expect("open store"),
    );
    let start = Arc::new(std::sync::Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                let tenant = Tenant::Local;
                let mut out = Vec::with_capacity(EACH as usize);
                start.wait();
                for i in 0..EACH {
                    let env = env_on(t, i);
                    let path = env.token_path();
                    let qos = if i % 4 != 0 {
                        Qos::AtMostOnce
                    } else {
                        Qos::AtLeastOnce
                    };
                    let deadline = std::time::Instant::now() + TIMEOUT;
                    let a = loop {
                        match store.append(Append {
                            path: &path,
                            envelope: &env,
                            flags: 0,
                            qos,
                            publish_id: None,
                            tenant: &tenant,
                        }) {
                            Ok(a) => break a,
                            // The writer is behind: publish again (what a client does), for
                            // a while.
                            Err(e) if e.code().is_retryable() => {
                                assert!(
                                    std::time::Instant::now() < deadline,
                                    "append {i} still refused after {TIMEOUT:?}: {e}"
                                );
                                std::thread::yield_now()
                            }
                            Err(e) => panic!("append failed: {e}"),
                        }
                    };
                    let (seq, stored) = match a {
                        Accepted::New(s) => (s.0, true),
                        Accepted::Live(s) => (s.0, false),
                        other => panic!("unexpected {other:?}"),
                    };
                    assert_eq!(stored, qos == Qos::AtLeastOnce);
                    out.push((i, seq, stored));
                }
                out
            })
        })
        .collect();
    let per_thread: Vec<Vec<(u64, u64, bool)>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();

    let mut all = HashSet::new();
    for seqs in &per_thread {
        assert!(
            seqs.windows(2).all(|w| w[0].1 < w[1].1),
            "one thread's sequences must increase"
        );
        for (_, s, _) in seqs {
            assert!(all.insert(*s), "sequence {s} handed out twice");
        }
    }
    let n = THREADS as u64 * EACH;
    assert_eq!(all.len() as u64, n);
    assert_eq!(store.last_seq().0, n);
    assert_eq!(*all.iter().max().unwrap(), n);

    let (tx, rx) = std::sync::mpsc::channel();
    store.when_durable(
        whispeer_relay::ids::Seq(n),
        Box::new(move |r| tx.send(r).unwrap()),
    );
    rx.recv_timeout(TIMEOUT)
        .expect("durable in time")
        .expect("committed");
    for (t, seqs) in per_thread.iter().enumerate() {
        let pattern =
            TokenPattern::new(key_of(t), vec![whispeer_protocol::PatternElem::Rest]).unwrap();
        let upto = store.last_seq();
        let plan = store.plan(&pattern, Replay::FromSeq(0), upto).unwrap();
        let mut from = 0;
        let mut got = Vec::new();
        while from <= upto.0 {
            let chunk = store.read(&pattern, &plan, from, upto).unwrap();
            got.extend(chunk.msgs.iter().map(|m| (index_of(&m.envelope), m.seq.0)));
            from = chunk.next;
        }
        let want: Vec<(u64, u64)> = seqs
            .iter()
            .filter(|(_, _, stored)| *stored)
            .map(|(i, s, _)| (*i, *s))
            .collect();
        // (Compared by count and first difference: the lists are long.)
        assert_eq!(
            got.len(),
            want.len(),
            "thread {t}: stored messages read back"
        );
        if let Some(k) = (0..got.len()).find(|&k| got[k] != want[k]) {
            panic!(
                "thread {t}: message {k} read back as (index, seq) {:?}, appended as {:?}",
                got[k], want[k]
            );
        }
    }
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

async fn greeted(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::tcp(addr).await;
    c.hello_with(features::AT_LEAST_ONCE | features::REPLAY)
        .await;
    c
}

/// Eight publishers on eight key ids publish at once (QoS 0 and 1 mixed) through the real
/// relay on a SQLite file; a subscriber per key id, and one replaying afterwards, see every
/// message of their key id once, in publish order and with increasing sequences, and no
/// two key ids' messages share a sequence. (A guard: the single-lock relay passed it too;
/// it fails if sharded routing reorders, loses or double-numbers a key id's messages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_many_key_ids_route_in_parallel_in_order_without_loss() {
    const KEYS: usize = 8;
    const EACH: u64 = 2_000;
    let dir = temp_dir("parallel-route");
    let mut config = Config::ephemeral();
    config.store.kind = Some(StoreKind::Sqlite);
    config.store.path = dir.join("s.db");
    config.store.min_free_bytes = 0;
    config.listen.ws = whispeer_relay::config::ListenAddr::OFF;
    config.limits.publish_rate = 0;
    config.limits.addr_publish_rate = 0;
    let listeners = whispeer_relay::Listeners::bind(&config).await.unwrap();
    let relay = TestRelay::run(Relay::builder(config).listeners(listeners).build().unwrap());
    let addr = relay.tcp();

    let pattern = |t: usize| {
        TokenPattern::new(key_of(t), vec![whispeer_protocol::PatternElem::Rest]).unwrap()
    };
    let mut subs = Vec::new();
    for t in 0..KEYS {
        let mut c = greeted(addr).await;
        c.subscribe(1, pattern(t)).await;
        subs.push(c);
    }
    let publishers: Vec<_> = (0..KEYS)
        .map(|t| {
            tokio::spawn(async move {
                let mut c = greeted(addr).await;
                for i in 0..EACH {
                    let qos = if i % 3 == 0 {
                        Qos::AtLeastOnce
                    } else {
                        Qos::AtMostOnce
                    };
                    c.send(&Frame::Pub(Pub {
                        envelope: env_on(t, i),
                        flags: if i == EACH - 1 { pub_flags::ACK } else { 0 },
                        publish_id: Some([t as u8; 16]).filter(|_| i == EACH - 1),
                        qos,
                    }))
                    .await;
                }
                // The last one is acknowledged: everything before it was accepted.
                loop {
                    if let Frame::PubAck(_) = c.recv().await {
                        break;
                    }
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for (t, c) in subs.iter_mut().enumerate() {
        let mut last = 0;
        for i in 0..EACH {
            let m = c.expect_msg().await;
            assert_eq!(
                index_of(&m.envelope),
                i,
                "key {t}: in publish order, none lost"
            );
            assert!(
                m.seq > last,
                "key {t}: sequences increase ({} after {last})",
                m.seq
            );
            last = m.seq;
            assert!(
                seen.insert(m.seq),
                "sequence {} delivered on two key ids",
                m.seq
            );
        }
    }
    for p in publishers {
        p.await.unwrap();
    }
    // History: the stored third of each key id, in order.
    let mut c = greeted(addr).await;
    for t in 0..KEYS {
        c.send(&Frame::Sub(Sub {
            sub_id: 10 + t as u64,
            pattern: pattern(t),
            qos: Qos::AtMostOnce,
            durable: None,
            replay: Some(Replay::FromSeq(0)),
            retained: false,
            credit: None,
            owner: None,
        }))
        .await;
        let mut got = Vec::new();
        loop {
            match c.recv().await {
                Frame::SubOk(_) => {}
                Frame::Msg(m) => got.push(index_of(&m.envelope)),
                Frame::ReplayDone(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let want: Vec<u64> = (0..EACH).filter(|i| i % 3 == 0).collect();
        assert_eq!(got, want, "key {t}'s history");
    }
    relay.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
