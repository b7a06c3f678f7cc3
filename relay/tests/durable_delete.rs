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
//!   data there is gone;
//! - session-25 review: a tenant filling the dedup window leaves others their share (F2);
//!   the auth-state file cuts off a torn last line (F4) and is compacted (F3).
//! - review F7: an explicit deletion disowns the durable's owner only once the
//!   store committed it (the test holds SQLite's write lock meanwhile); when that commit
//!   fails, the durable comes back with its backlog, still its owner's.
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
    assert_eq!(relay.status().await.store.durables, 2);

    assert_eq!(then_pong(&mut c, unsub(1, true), 1).await, None, "deleted");
    assert_eq!(relay.status().await.store.durables, 1);
    // The owner goes once the store committed the deletion (review F7).
    relay
        .wait_status("a's owner to go too", |s| s.accounts.durable_owners == 1)
        .await;
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
    assert_eq!(relay.status().await.store.durables, 1);
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
    relay
        .wait_status("b to idle out", |s| s.store.durables == 1)
        .await;
    relay
        .wait_status("b's owner to go", |s| s.accounts.durable_owners == 1)
        .await;
    subscribe_durable(&mut c, 3, "c", 1)
        .await
        .expect("b's quota is free");
    quota_refused(
        subscribe_durable(&mut c, 4, "d", 1).await,
        "held past the idle time, a still counts",
    );
    assert_eq!(relay.status().await.store.durables, 2, "a and c");
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
    relay
        .wait_status("their owners to go", |s| s.accounts.durable_owners == 2)
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

/// A client from 127.0.0.9 watching everything under [`K`] (QoS 0).
async fn watch_all(relay: SocketAddr) -> Client {
    let mut watcher = client_from("127.0.0.9", relay).await;
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
    watcher
}

/// `n` QoS 2 publishes by `c` with fresh ids (indices 100..).
async fn fill_dedup_window(c: &mut Client, n: u64) {
    for i in 0..n {
        let mut id = [0xb0; 16];
        id[..8].copy_from_slice(&i.to_le_bytes());
        publish(c, on(1, 100 + i), Qos::ExactlyOnce, id, false)
            .await
            .unwrap();
    }
}

/// The indices `watcher` saw before a marker that `a` publishes now (which proves nothing
/// else was on its way).
async fn seen_until_marker(a: &mut Client, watcher: &mut Client) -> Vec<u64> {
    publish(a, on(1, 999), Qos::AtLeastOnce, [0x99; 16], false)
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let m = watcher.expect_msg().await;
        let i = index_of(&m.envelope);
        if i == 999 {
            return seen;
        }
        seen.push(i);
    }
}

/// Finding 11: QoS 2 publish ids are remembered per tenant. With `dedup_max = 10`, A's id
/// P survives B's 10 fresh ids, and A's retry of P is answered with the original sequence
/// and not delivered again; B publishing under A's id P is its own publish.
#[tokio::test]
async fn qos2_dedup_ids_are_kept_per_tenant() {
    let relay = BinRelay::start(&["--dedup-max", "10"]);
    let mut watcher = watch_all(relay.tcp()).await;
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
    fill_dedup_window(&mut b, 10).await;
    let again = publish(&mut a, on(1, 1), Qos::ExactlyOnce, p, false)
        .await
        .unwrap();
    assert_eq!(
        again, first,
        "A's retry is answered with its original sequence"
    );
    // The watcher saw 12 messages: A's once, B's 11; A's retry was not delivered again.
    let seen = seen_until_marker(&mut a, &mut watcher).await;
    assert_eq!(seen.iter().filter(|i| **i == 1).count(), 1, "{seen:?}");
    assert_eq!(seen.len(), 12, "{seen:?}");
}

/// Review F2: B fills the dedup window (`dedup_max` 10) with its own ids first; A then
/// publishes P1 and P2. Over the bound the largest holder (B) gives back its oldest id, not
/// the publisher (A), so A's retry of P1 is still answered with its original sequence and
/// not delivered again (before, A's P2 pushed out A's own P1: stored and delivered twice).
#[tokio::test]
async fn a_tenant_filling_the_dedup_window_leaves_others_their_share() {
    let relay = BinRelay::start(&["--dedup-max", "10"]);
    let mut watcher = watch_all(relay.tcp()).await;
    let mut a = client_from("127.0.0.1", relay.tcp()).await;
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    fill_dedup_window(&mut b, 10).await;
    let (p1, p2) = ([0x71; 16], [0x72; 16]);
    let s1 = publish(&mut a, on(1, 1), Qos::ExactlyOnce, p1, false)
        .await
        .unwrap();
    publish(&mut a, on(1, 2), Qos::ExactlyOnce, p2, false)
        .await
        .unwrap();
    let again = publish(&mut a, on(1, 1), Qos::ExactlyOnce, p1, false)
        .await
        .unwrap();
    assert_eq!(
        again, s1,
        "A's retry of P1 is answered with its original sequence"
    );
    let seen = seen_until_marker(&mut a, &mut watcher).await;
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
    relay
        .wait_status("A's messages to age out", |s| s.store.messages == 0)
        .await;
    publish(&mut a, on(3, 6), Qos::AtLeastOnce, [6; 16], false)
        .await
        .expect("P1 and P2 no longer count against A");
}

/// Review F4: a crash left a torn last line in the auth-state file (no newline). The relay
/// cuts it off before appending: the owner line A's durable `Sub` was answered after is a
/// whole line, and after a restart B (another owner secret) is refused the name. Before,
/// the new line was glued to the fragment, unreadable at the next start: B took the name.
#[tokio::test]
async fn an_owner_written_after_a_torn_auth_state_line_survives_a_restart() {
    let dir = temp_dir("auth-torn-tail");
    let state = dir.join("relay.db.auth");
    std::fs::write(&state, br#"{"t":"owner","key_id":"d1d1"#).unwrap();
    let args = ["--auth-state", state.to_str().unwrap()];
    {
        let relay = BinRelay::start(&args);
        let mut a = client_from("127.0.0.1", relay.tcp()).await;
        subscribe_durable(&mut a, 1, "x", 1)
            .await
            .expect("A creates x");
        // Answered once its owner line is on disk: the relay may die now.
    }
    let relay = BinRelay::start(&args);
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    match subscribe_durable(&mut b, 1, "x", 2).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        other => panic!("B on A's durable after the restart: {other:?}"),
    }
    drop(relay);
    // Whole JSON lines only: the fragment is gone, A's owner line is its own line.
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Review F4, second variant: the tear splits a multi-byte UTF-8 character (a durable
/// named "é"). The relay still starts (before, reading the file failed: it refused to
/// start), keeps every whole line (A's "é" stays A's), and appends after the cut.
#[tokio::test]
async fn a_torn_auth_state_line_inside_a_utf8_character_does_not_stop_the_relay() {
    let dir = temp_dir("auth-torn-utf8");
    let state = dir.join("relay.db.auth");
    let args = ["--auth-state", state.to_str().unwrap()];
    {
        let relay = BinRelay::start(&args);
        let mut a = client_from("127.0.0.1", relay.tcp()).await;
        subscribe_durable(&mut a, 1, "é", 1)
            .await
            .expect("A creates é");
    }
    // A crash mid-write of a second copy of that line: up to the first byte of "é".
    let mut text = std::fs::read(&state).unwrap();
    let line_end = text.len();
    let first = text.iter().position(|b| *b == 0xc3).expect("é in the file");
    text.extend_from_within(..first + 1);
    assert!(line_end < text.len());
    std::fs::write(&state, &text).unwrap();
    {
        let relay = BinRelay::start(&args);
        let mut b = client_from("127.0.0.2", relay.tcp()).await;
        match subscribe_durable(&mut b, 1, "é", 2).await {
            Err((ErrorCode::NotAllowed, _)) => {}
            other => panic!("B on A's durable é: {other:?}"),
        }
        let mut a = client_from("127.0.0.1", relay.tcp()).await;
        subscribe_durable(&mut a, 1, "y", 1)
            .await
            .expect("A creates y");
    }
    let relay = BinRelay::start(&args);
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    match subscribe_durable(&mut b, 1, "y", 2).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        other => panic!("B on A's durable y after the restart: {other:?}"),
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Review F3: a client loops creating a durable with an owner and deleting it (`Unsub
/// {delete}`): an `Owner` and a `Disown` line each time. The auth-state file is compacted
/// once most of its lines are dead, so it stays bounded (it grew by ~230 bytes a cycle,
/// ~700 KB over these 3000), and what it holds replays to the same owners: after a restart
/// "keep" is still A's, and "d" (deleted) is free.
#[tokio::test]
async fn the_auth_state_file_stays_bounded_over_owner_and_disown_cycles() {
    let dir = temp_dir("auth-compact");
    let state = dir.join("relay.db.auth");
    let path = state.to_str().unwrap();
    let args = [
        "--auth-state",
        path,
        "--sub-rate",
        "1000000",
        "--sub-burst",
        "1000000",
        "--addr-sub-rate",
        "1000000",
        "--addr-sub-burst",
        "1000000",
    ];
    {
        let relay = BinRelay::start(&args);
        let mut a = client_from("127.0.0.1", relay.tcp()).await;
        subscribe_durable(&mut a, 1, "keep", 1)
            .await
            .expect("A creates keep");
        let mut c = client_from("127.0.0.3", relay.tcp()).await;
        let mut most = 0;
        for i in 0..3000 {
            subscribe_durable(&mut c, 2, "d", 3)
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: {e:?}"));
            assert_eq!(
                then_pong(&mut c, unsub(2, true), 2).await,
                None,
                "cycle {i}"
            );
            most = most.max(std::fs::metadata(&state).unwrap().len());
        }
        assert!(most < 64 * 1024, "the auth state file grew to {most} bytes");
        // The last deletion's owner goes once the store committed it (review F7): B may
        // then create "d" as its own.
        let mut b = client_from("127.0.0.2", relay.tcp()).await;
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            match subscribe_durable(&mut b, 2, "d", 2).await {
                Ok(()) => break,
                Err((ErrorCode::NotAllowed, m)) => {
                    assert!(std::time::Instant::now() < deadline, "d stays C's: {m}");
                }
                Err(e) => panic!("B creating d: {e:?}"),
            }
        }
    }
    // After a restart the compacted file still knows both live owners: keep is A's, d is B's.
    let relay = BinRelay::start(&args);
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    match subscribe_durable(&mut b, 1, "keep", 2).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        other => panic!("B on A's durable keep after the restart: {other:?}"),
    }
    subscribe_durable(&mut b, 2, "d", 2)
        .await
        .expect("B resumes its d");
    let mut c = client_from("127.0.0.3", relay.tcp()).await;
    match subscribe_durable(&mut c, 2, "d", 3).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        other => panic!("C on B's durable d after the restart: {other:?}"),
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Review F7: an explicit deletion (`Unsub {delete}`) disowns the durable's owner only once
/// the store has committed it (the SQLite store announces it through `Store::take_gone`).
/// The test holds SQLite's write lock (another connection's `BEGIN IMMEDIATE`, as a slow
/// disk would) while A deletes its durable "d", which has three unacknowledged messages
/// behind its floor: until the deletion commits, B (another owner secret) is refused the
/// name and A's owner record stays. Once the lock goes, the owner goes with the committed
/// deletion and B creates "d" empty: its first message is one published after its `SubOk`,
/// none of A's. Before the fix the owner was forgotten at once: B took the name while the
/// deletion was not committed (had the commit failed, the durable would have come back,
/// floor and backlog, with no owner for anyone to adopt).
#[tokio::test]
async fn a_deleted_durable_stays_its_owners_until_the_deletion_is_committed() {
    // The writer gets stuck: nothing queued from now on commits until the lock goes.
    let DeletionBehindLock {
        dir,
        relay,
        mut a,
        lock,
        since: stuck,
    } = a_deletes_d_behind_a_write_lock("delete-uncommitted", &[]).await;
    // The deletion is queued, not committed: the name is still A's.
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    match subscribe_durable(&mut b, 1, "d", 2).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        other => panic!("B on A's durable whose deletion is not committed: {other:?}"),
    }
    let s = relay.status().await;
    assert_eq!(
        (s.store.durables, s.accounts.durable_owners),
        (0, 1),
        "d is gone from the store's index, its owner is kept: {s:?}"
    );
    // Under the writer's 5 s busy timeout, past which its commit would fail (and the
    // durable come back, still A's: B would wait for it in vain below).
    assert!(
        stuck.elapsed() < Duration::from_secs(4),
        "the lock was held {:?}: the writer's commit may have failed",
        stuck.elapsed()
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    relay
        .wait_status("d's owner to go with the committed deletion", |s| {
            s.accounts.durable_owners == 0
        })
        .await;
    subscribe_durable(&mut b, 2, "d", 2)
        .await
        .expect("the deletion is committed: B creates d");
    publish(&mut a, on(1, 9), Qos::AtLeastOnce, [9; 16], false)
        .await
        .unwrap();
    loop {
        match b.recv().await {
            Frame::Msg(m) => {
                assert_eq!(index_of(&m.envelope), 9, "B's d holds none of A's backlog");
                break;
            }
            Frame::ReplayDone(_) => {}
            other => panic!("B: unexpected {other:?}"),
        }
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Review F7, the failure path: the deletion's commit fails. A's durable "d" has three
/// unacknowledged QoS 1 messages behind its floor (committed and `PubAck`ed) when the test
/// takes SQLite's write lock (another connection's `BEGIN IMMEDIATE`) and A deletes "d"
/// (`Unsub {delete}`). The lock is held past the writer's busy timeout (5 s), so the commit
/// fails: the store goes down (`/status` `store.state` "unavailable") and drops what was
/// queued, the deletion with it. Once the lock goes, the store's probe commits and it
/// reloads from the file: "d" is back, floor and backlog, and must still be A's — B
/// (another owner secret) is refused it, A resumes it and gets its three messages. Before
/// the fix the owner was forgotten when the deletion was queued: the durable came back
/// with no owner, and B would have adopted it, A's backlog included.
#[tokio::test]
async fn a_durable_whose_deletion_fails_to_commit_comes_back_still_its_owners() {
    // The writer gets stuck, and its commit fails once its busy timeout has passed.
    let DeletionBehindLock {
        dir,
        relay,
        a: _a,
        lock,
        ..
    } = a_deletes_d_behind_a_write_lock("delete-failed", &["--store-retry-ms", "50"]).await;
    relay
        .wait_status("the deletion's commit to fail", |s| {
            s.store.state == "unavailable"
        })
        .await;
    let failures = metric(relay.admin(), "whispeer_relay_store_commit_failures_total").await;
    assert!(failures >= 1, "{failures} commit failures");
    let s = relay.status().await;
    assert_eq!(
        (s.store.durables, s.accounts.durable_owners),
        (0, 1),
        "the store is down, d's deletion dropped, its owner kept: {s:?}"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    // The probe commits; the store reloads from the file, where d was never deleted.
    relay
        .wait_status("the store to resume", |s| s.store.state == "ok")
        .await;
    let s = relay.status().await;
    assert_eq!(
        (s.store.durables, s.accounts.durable_owners),
        (1, 1),
        "d is back in the store, still owned: {s:?}"
    );
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    match subscribe_durable(&mut b, 1, "d", 2).await {
        Err((ErrorCode::NotAllowed, _)) => {}
        other => panic!("B on A's durable whose deletion failed: {other:?}"),
    }
    // A resumes d (a new connection, A's owner secret): its floor and backlog are back.
    let mut a2 = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut a2, 1, "d", 1)
        .await
        .expect("A resumes d");
    let mut backlog = Vec::new();
    loop {
        match a2.recv().await {
            Frame::Msg(m) => backlog.push(index_of(&m.envelope)),
            Frame::ReplayDone(_) => break,
            other => panic!("A resuming d: unexpected {other:?}"),
        }
    }
    assert_eq!(backlog, [1, 2, 3], "A's unacknowledged backlog");
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The F7 tests' start: A's durable "d" on a relay with a SQLite file, three QoS 1
/// messages behind its floor (`PubAck`ed, so committed; never acked by A), then SQLite's
/// write lock taken by another connection (`BEGIN IMMEDIATE`, as a stuck disk would) and
/// A's `Unsub {delete}` of "d" answered: the deletion waits behind the lock.
struct DeletionBehindLock {
    dir: std::path::PathBuf,
    relay: BinRelay,
    a: Client,
    lock: rusqlite::Connection,
    /// When the lock was taken.
    since: Instant,
}

async fn a_deletes_d_behind_a_write_lock(tag: &str, extra: &[&str]) -> DeletionBehindLock {
    let dir = temp_dir(tag);
    let db = dir.join("relay.db");
    let store = store_arg(&db);
    let mut args = vec!["--store-path", &store];
    args.extend_from_slice(extra);
    let relay = BinRelay::start(&args);
    let mut a = client_from("127.0.0.1", relay.tcp()).await;
    subscribe_durable(&mut a, 1, "d", 1)
        .await
        .expect("A creates d");
    // Acknowledged once committed (with d before them), never acked by A: d's backlog.
    for i in 1..=3u8 {
        publish(&mut a, on(1, i.into()), Qos::AtLeastOnce, [i; 16], false)
            .await
            .unwrap();
    }
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let since = Instant::now();
    assert_eq!(then_pong(&mut a, unsub(1, true), 1).await, None, "deleted");
    DeletionBehindLock {
        dir,
        relay,
        a,
        lock,
        since,
    }
}
