//! Durable names are freed again (review finding 4), and the store's per-tenant accounting
//! of dedup ids, retained values and paths (findings 9, 10, 11), against the real
//! `whispeer-relay` binary over real sockets and a real SQLite file:
//!
//! - the owner deletes its durable with `Unsub {delete: true}` (feature `DURABLE_DELETE`),
//!   which gives its count back to `tenant_max_durables`; a non-owner cannot;
//! - a durable no subscription held for `durable_idle_ms` is deleted (owner record too),
//!   one still held is not, and the idle time survives a restart;
//! - QoS 2 publish ids are remembered per tenant; taking over another tenant's retained
//!   value counts against the retained quota; a path stops counting against a tenant whose
//!   data there is gone.
//!
//! Tenants are source addresses (clients bind 127.0.0.x). Every wait is on a frame, a
//! `Pong`, `/status` polled with a deadline, or the process exiting, bounded by `TIMEOUT`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use whispeer_protocol::frame::{features, pub_flags, Ping, Pub, Sub, Unsub};
use whispeer_protocol::{Envelope, ErrorCode, Frame, KeyId, Qos};

const FEATURES: u64 = features::AT_LEAST_ONCE
    | features::EXACTLY_ONCE
    | features::RETAIN
    | features::REPLAY
    | features::DURABLE
    | features::DURABLE_DELETE;

const K: [u8; 16] = [0xd1; 16];

/// A greeted client whose TCP connection comes from `ip` (its tenant: accounts are off).
async fn client_from(ip: &str, relay: SocketAddr) -> Client {
    let (c, w) = greeted_from(ip, relay, FEATURES).await;
    assert_eq!(
        w.features & features::DURABLE_DELETE,
        features::DURABLE_DELETE,
        "an SQLite relay grants DURABLE_DELETE: {w:?}"
    );
    c
}

/// A durable `Sub` for everything under [`K`], owned by `secret`.
fn durable(sub_id: u64, name: &str, secret: u8) -> Frame {
    Frame::Sub(Sub {
        sub_id,
        pattern: all_of(K),
        qos: Qos::AtLeastOnce,
        durable: Some(name.into()),
        replay: None,
        retained: false,
        credit: None,
        owner: Some(Bytes::from(vec![secret; 32])),
    })
}

/// The relay's answer to `Sub` `sub_id`: `Ok` for `SubOk`, else its `Err`'s code.
async fn answer(c: &mut Client, sub_id: u64) -> Result<(), (ErrorCode, String)> {
    loop {
        match c.recv().await {
            Frame::SubOk(ok) if ok.sub_id == sub_id => return Ok(()),
            Frame::Err(e) if e.sub_id == Some(sub_id) => {
                assert!(!e.fatal, "{e:?}");
                return Err((e.code, e.message));
            }
            Frame::Msg(_) | Frame::ReplayDone(_) => {}
            other => panic!("Sub {sub_id}: unexpected {other:?}"),
        }
    }
}

async fn subscribe_durable(
    c: &mut Client,
    sub_id: u64,
    name: &str,
    secret: u8,
) -> Result<(), (ErrorCode, String)> {
    c.send(&durable(sub_id, name, secret)).await;
    answer(c, sub_id).await
}

/// Sends `frame`, then a `Ping`, and reads up to its `Pong` (the relay handles a
/// connection's frames in order): the `Err` naming `sub_id` sent meanwhile, if any.
async fn then_pong(c: &mut Client, frame: Frame, sub_id: u64) -> Option<(ErrorCode, String)> {
    c.send(&frame).await;
    c.send(&Frame::Ping(Ping { nonce: 0x5eed })).await;
    let mut err = None;
    loop {
        match c.recv().await {
            Frame::Pong(p) if p.nonce == 0x5eed => return err,
            Frame::Err(e) if e.sub_id == Some(sub_id) => {
                assert!(!e.fatal, "{e:?}");
                err = Some((e.code, e.message));
            }
            Frame::Msg(_) | Frame::SubOk(_) | Frame::ReplayDone(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn unsub(sub_id: u64, delete: bool) -> Frame {
    Frame::Unsub(Unsub {
        sub_id,
        delete: delete.then_some(true),
    })
}

fn quota_refused(r: Result<(), (ErrorCode, String)>, what: &str) {
    match r {
        Err((ErrorCode::QuotaExceeded, m)) => assert!(m.contains("durable"), "{what}: {m}"),
        other => panic!("{what}: expected Err(quota_exceeded), got {other:?}"),
    }
}

async fn status(relay: &BinRelay) -> whispeer_relay::admin::Status {
    serde_json::from_slice(
        &whispeer_relay::admin::http_get(&relay.admin().to_string(), "/status")
            .await
            .unwrap(),
    )
    .unwrap()
}

/// Polls `/status` until `f` holds (bounded by `TIMEOUT`).
async fn wait_status(
    relay: &BinRelay,
    what: &str,
    f: impl Fn(&whispeer_relay::admin::Status) -> bool,
) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = status(relay).await;
        if f(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn store_arg(path: &Path) -> String {
    path.display().to_string()
}

/// With `tenant_max_durables = 2`, durables "a" and "b" use the quota up; deleting "a"
/// (`Unsub {delete}`, the owner's own subscription) frees it for "c", and "a" is gone, not
/// just released: subscribing to it again would create it, which the quota refuses.
#[tokio::test]
async fn the_owner_deletes_a_durable_and_its_name_no_longer_counts() {
    let relay = BinRelay::start(&["--tenant-max-durables", "2", "--durable-idle-ms", "0"]);
    let mut c = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut c, 1, "a", 1).await.expect("a");
    subscribe_durable(&mut c, 2, "b", 1).await.expect("b");
    quota_refused(subscribe_durable(&mut c, 3, "c", 1).await, "c at the quota");
    assert_eq!(status(&relay).await.store.durables, 2);

    assert_eq!(then_pong(&mut c, unsub(1, true), 1).await, None, "deleted");
    assert_eq!(status(&relay).await.store.durables, 1);
    assert_eq!(
        status(&relay).await.accounts.durable_owners,
        1,
        "a's owner too"
    );
    subscribe_durable(&mut c, 4, "c", 1)
        .await
        .expect("the deleted name's quota is free again");
    quota_refused(
        subscribe_durable(&mut c, 5, "a", 1).await,
        "a is gone: subscribing creates it anew",
    );
    // A plain Unsub keeps the durable (and its quota).
    assert_eq!(then_pong(&mut c, unsub(2, false), 2).await, None);
    quota_refused(subscribe_durable(&mut c, 6, "d", 1).await, "b is kept");
}

/// A non-owner cannot delete: its `Sub` for the name is refused (`not_allowed`), so it
/// never holds a subscription of it; `Unsub {delete}` of a subscription it does not have is
/// `unknown_subscription`, of one that is not durable `not_allowed`. The owner's durable
/// stays and resumes.
#[tokio::test]
async fn a_non_owner_cannot_delete_a_durable() {
    let relay = BinRelay::start(&["--tenant-max-durables", "1", "--durable-idle-ms", "0"]);
    let mut owner = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut owner, 1, "a", 1).await.expect("a");
    assert_eq!(then_pong(&mut owner, unsub(1, false), 1).await, None);

    let mut other = client_from("127.0.0.2", relay.tcp()).await;
    match subscribe_durable(&mut other, 7, "a", 2).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        r => panic!("another owner's Sub: {r:?}"),
    }
    match then_pong(&mut other, unsub(7, true), 7).await {
        Some((ErrorCode::UnknownSubscription, _)) => {}
        r => panic!("delete of a refused subscription: {r:?}"),
    }
    other
        .send(&Frame::Sub(Sub {
            sub_id: 8,
            pattern: all_of(K),
            qos: Qos::AtMostOnce,
            durable: None,
            replay: None,
            retained: false,
            credit: None,
            owner: None,
        }))
        .await;
    answer(&mut other, 8).await.expect("a plain subscription");
    match then_pong(&mut other, unsub(8, true), 8).await {
        Some((ErrorCode::NotAllowed, m)) => assert!(m.contains("not durable"), "{m}"),
        r => panic!("delete of a subscription that is not durable: {r:?}"),
    }
    assert_eq!(status(&relay).await.store.durables, 1);
    subscribe_durable(&mut owner, 2, "a", 1)
        .await
        .expect("the owner's durable is still there (a new one would be over the quota)");
}

/// A durable released for `durable_idle_ms` is deleted with its owner record, and its
/// count frees the quota; one held all along by a connection is not deleted.
#[tokio::test]
async fn an_idle_durable_is_deleted_and_a_held_one_is_kept() {
    let relay = BinRelay::start(&["--tenant-max-durables", "2", "--durable-idle-ms", "1000"]);
    let mut holder = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut holder, 1, "a", 1).await.expect("a");
    let mut c = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut c, 1, "b", 1).await.expect("b");
    assert_eq!(then_pong(&mut c, unsub(1, false), 1).await, None);
    // "b" idles out while "a" stays held (it was taken before "b" was released).
    wait_status(&relay, "b to idle out", |s| s.store.durables == 1).await;
    wait_status(&relay, "b's owner to go", |s| {
        s.accounts.durable_owners == 1
    })
    .await;
    subscribe_durable(&mut c, 3, "c", 1)
        .await
        .expect("b's quota is free");
    quota_refused(
        subscribe_durable(&mut c, 4, "d", 1).await,
        "held past the idle time, a still counts",
    );
    assert_eq!(status(&relay).await.store.durables, 2, "a and c");
    drop(holder);
}

/// The time a durable was released is persisted: released, the relay stopped (with no
/// idle expiry configured), restarted after more than the idle time with
/// `durable_idle_ms` set — the durables are gone at once, before the first `Sub`. Counted
/// from the restart instead, they would still fill the quota.
#[tokio::test]
async fn the_idle_time_survives_a_restart() {
    let dir = temp_dir("durable-idle-restart");
    let db = store_arg(&dir.join("relay.db"));
    let idle = Duration::from_millis(1500);
    let released = {
        let mut relay = BinRelay::start(&[
            "--store-path",
            &db,
            "--tenant-max-durables",
            "2",
            "--durable-idle-ms",
            "0",
        ]);
        let mut c = client_from("127.0.0.1", relay.tcp()).await;
        subscribe_durable(&mut c, 1, "a", 1).await.expect("a");
        subscribe_durable(&mut c, 2, "b", 1).await.expect("b");
        assert_eq!(then_pong(&mut c, unsub(1, false), 1).await, None);
        assert_eq!(then_pong(&mut c, unsub(2, false), 2).await, None);
        let released = Instant::now();
        drop(c);
        relay.sigterm();
        let status = tokio::task::spawn_blocking(move || relay.wait_exit())
            .await
            .unwrap();
        assert!(status.success(), "{status}");
        released
    };
    // The relay is down: the idle time passes on the clock alone.
    tokio::time::sleep_until((released + idle + Duration::from_millis(200)).into()).await;
    let relay = BinRelay::start(&[
        "--store-path",
        &db,
        "--tenant-max-durables",
        "2",
        "--durable-idle-ms",
        &idle.as_millis().to_string(),
    ]);
    let mut c = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut c, 1, "c", 1)
        .await
        .expect("a and b idled out while the relay was down");
    subscribe_durable(&mut c, 2, "d", 1)
        .await
        .expect("both of them");
    wait_status(&relay, "their owners to go", |s| {
        s.accounts.durable_owners == 2
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn pub_frame_with(env: Envelope, qos: Qos, id: [u8; 16], retain: bool) -> Frame {
    Frame::Pub(Pub {
        envelope: env,
        flags: pub_flags::ACK | if retain { pub_flags::RETAIN } else { 0 },
        publish_id: Some(id),
        qos,
    })
}

/// Publishes and waits for the `PubAck` (its sequence) or the `Err` (its code).
async fn publish(
    c: &mut Client,
    env: Envelope,
    qos: Qos,
    id: [u8; 16],
    retain: bool,
) -> Result<u64, (ErrorCode, String)> {
    c.send(&pub_frame_with(env, qos, id, retain)).await;
    loop {
        match c.recv().await {
            Frame::PubAck(a) if a.publish_id == id => return Ok(a.seq),
            Frame::Err(e) if e.publish_id == Some(id) => {
                assert!(!e.fatal, "{e:?}");
                return Err((e.code, e.message));
            }
            Frame::Msg(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn on(level: u8, i: u64) -> Envelope {
    indexed_on(KeyId::from_bytes(K), level, i, 16)
}

/// Finding 11: QoS 2 publish ids are remembered per tenant. With `dedup_max = 10`, A's id
/// P survives B's 10 fresh ids, and A's retry of P is answered with the original sequence
/// and not delivered again; B publishing under A's id P is its own publish.
#[tokio::test]
async fn qos2_dedup_ids_are_kept_per_tenant() {
    let relay = BinRelay::start(&["--dedup-max", "10"]);
    let mut watcher = client_from("127.0.0.9", relay.tcp()).await;
    watcher
        .send(&Frame::Sub(Sub {
            sub_id: 1,
            pattern: all_of(K),
            qos: Qos::AtMostOnce,
            durable: None,
            replay: None,
            retained: false,
            credit: None,
            owner: None,
        }))
        .await;
    answer(&mut watcher, 1).await.unwrap();
    let p = [0x77; 16];
    let mut a = client_from("127.0.0.1", relay.tcp()).await;
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    let first = publish(&mut a, on(1, 1), Qos::ExactlyOnce, p, false)
        .await
        .unwrap();
    // B's own publish under the same id is B's: stored and delivered.
    let bs = publish(&mut b, on(1, 2), Qos::ExactlyOnce, p, false)
        .await
        .expect("B's publish under A's id");
    assert_ne!(bs, first, "B's publish is not answered with A's");
    for i in 0..10u64 {
        let mut id = [0xb0; 16];
        id[..8].copy_from_slice(&i.to_le_bytes());
        publish(&mut b, on(1, 100 + i), Qos::ExactlyOnce, id, false)
            .await
            .unwrap();
    }
    let again = publish(&mut a, on(1, 1), Qos::ExactlyOnce, p, false)
        .await
        .unwrap();
    assert_eq!(
        again, first,
        "A's retry is answered with its original sequence"
    );
    // The watcher saw 12 messages: A's once, B's 11; A's retry was not delivered again.
    // A marker publish after it proves nothing else was on its way.
    publish(&mut a, on(1, 999), Qos::AtLeastOnce, [0x99; 16], false)
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let m = watcher.expect_msg().await;
        let i = index_of(&m.envelope);
        if i == 999 {
            break;
        }
        seen.push(i);
    }
    assert_eq!(seen.iter().filter(|i| **i == 1).count(), 1, "{seen:?}");
    assert_eq!(seen.len(), 12, "{seen:?}");
}

/// Finding 9: with `tenant_max_retained = 1`, B at its quota cannot take over A's
/// retained value (it used to: replacing a value was free whoever had set it).
#[tokio::test]
async fn taking_over_another_tenants_retained_value_counts_against_the_quota() {
    let relay = BinRelay::start(&["--tenant-max-retained", "1"]);
    let mut a = client_from("127.0.0.1", relay.tcp()).await;
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    publish(&mut a, on(1, 1), Qos::AtLeastOnce, [1; 16], true)
        .await
        .expect("A retains on P1");
    publish(&mut b, on(2, 2), Qos::AtLeastOnce, [2; 16], true)
        .await
        .expect("B retains on P2");
    match publish(&mut b, on(1, 3), Qos::AtLeastOnce, [3; 16], true).await {
        Err((ErrorCode::QuotaExceeded, m)) => assert!(m.contains("retained"), "{m}"),
        r => panic!("B taking over P1 at its quota: {r:?}"),
    }
    // Replacing its own value stays free.
    publish(&mut b, on(2, 4), Qos::AtLeastOnce, [4; 16], true)
        .await
        .expect("B replaces its own value");
    publish(&mut a, on(1, 5), Qos::AtLeastOnce, [5; 16], true)
        .await
        .expect("A replaces its own value");
}

/// Finding 10: with `tenant_max_paths = 2` and `max_age_ms = 1000`, A publishes on P1 and
/// P2, B retains a value on each; once A's messages are gone, those paths count against B
/// (who holds data there), not A: A's publish on P3 is taken.
#[tokio::test]
async fn a_path_stops_counting_against_a_tenant_whose_data_there_is_gone() {
    let relay = BinRelay::start(&["--tenant-max-paths", "2", "--retention-age-ms", "1000"]);
    let mut a = client_from("127.0.0.1", relay.tcp()).await;
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    publish(&mut a, on(1, 1), Qos::AtLeastOnce, [1; 16], false)
        .await
        .unwrap();
    publish(&mut a, on(2, 2), Qos::AtLeastOnce, [2; 16], false)
        .await
        .unwrap();
    publish(&mut b, on(1, 3), Qos::AtMostOnce, [3; 16], true)
        .await
        .unwrap();
    publish(&mut b, on(2, 4), Qos::AtMostOnce, [4; 16], true)
        .await
        .unwrap();
    match publish(&mut a, on(3, 5), Qos::AtLeastOnce, [5; 16], false).await {
        Err((ErrorCode::QuotaExceeded, m)) => assert!(m.contains("paths"), "{m}"),
        r => panic!("A at its path quota: {r:?}"),
    }
    // Retention removes A's two messages (the retained values stay).
    wait_status(&relay, "A's messages to age out", |s| s.store.messages == 0).await;
    publish(&mut a, on(3, 6), Qos::AtLeastOnce, [6; 16], false)
        .await
        .expect("P1 and P2 no longer count against A");
}
