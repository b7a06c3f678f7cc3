//! A store that cannot be broken from outside (issue 10), against the real relay over real
//! sockets and real SQLite files: per-tenant and global quotas (tenants are source
//! addresses: clients connect from 127.0.0.2, 127.0.0.3, ...), a full store queue answered
//! with a retryable `Busy`, QoS 0 kept live-only, retained values that roll over and
//! expire, a flood of `Sub{replay: FromSeq(0)}` under random key ids beside an honest
//! client, store reads served fairly per tenant (one tenant's full queue of replay reads
//! delays another's replay by at most 3 reads; past 1,024 queued the flood gets `busy`),
//! and a disk that fills up and frees again (a real 8 MiB tmpfs, root only).
//!
//! Every wait is on an event (a frame, a counter polled with a deadline), bounded by
//! `TIMEOUT`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rusqlite::OptionalExtension;
use whispeer_protocol::frame::{features, msg_flags, pub_flags, Ack, Pub, Replay, Sub, Unsub};
use whispeer_protocol::{Envelope, ErrorCode, Frame, KeyId, Qos, TokenPattern};
use whispeer_relay::config::StoreKind;
use whispeer_relay::store::{Accepted, Append, SqliteStore, Store, StoreError, Tenant};
use whispeer_relay::{Config, Relay};

const ALL_FEATURES: u64 = features::AT_LEAST_ONCE
    | features::EXACTLY_ONCE
    | features::RETAIN
    | features::REPLAY
    | features::DURABLE;

/// An envelope on `[key, tok(level)]` whose body starts with `i` ([`index_of`]).
fn env_on(key: [u8; 16], level: u8, i: u64, body: usize) -> Envelope {
    indexed_on(KeyId::from_bytes(key), level, i, body)
}

fn pid(i: u64, salt: u8) -> [u8; 16] {
    let mut p = [salt; 16];
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

fn pub_qos(env: Envelope, qos: Qos, id: Option<[u8; 16]>, retain: bool) -> Frame {
    let mut flags = if id.is_some() { pub_flags::ACK } else { 0 };
    if retain {
        flags |= pub_flags::RETAIN;
    }
    Frame::Pub(Pub {
        envelope: env,
        flags,
        publish_id: id,
        qos,
    })
}

fn sub(id: u64, pattern: TokenPattern, replay: Option<Replay>, retained: bool) -> Frame {
    Frame::Sub(Sub {
        sub_id: id,
        pattern,
        qos: Qos::AtMostOnce,
        durable: None,
        replay,
        retained,
        credit: None,
        owner: None,
    })
}

/// A greeted client whose TCP connection comes from `ip` (a tenant when accounts are off).
async fn client_from(ip: &str, relay: SocketAddr) -> Client {
    greeted_from(ip, relay, ALL_FEATURES).await.0
}

/// What the relay answered a publish with an ack request.
#[derive(Debug)]
enum Answer {
    #[allow(dead_code)] // the sequence, shown when an assertion prints the answer
    Acked(u64),
    Refused(ErrorCode, String),
}

/// Publishes one message with a publish id and waits for its `PubAck` or `Err`.
async fn publish_one(
    c: &mut Client,
    env: Envelope,
    qos: Qos,
    id: [u8; 16],
    retain: bool,
) -> Answer {
    c.send(&pub_qos(env, qos, Some(id), retain)).await;
    loop {
        match c.recv().await {
            Frame::PubAck(a) if a.publish_id == id => return Answer::Acked(a.seq),
            Frame::Err(e) if e.publish_id == Some(id) => {
                assert!(!e.fatal, "a store refusal is not fatal: {e:?}");
                return Answer::Refused(e.code, e.message);
            }
            Frame::Msg(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Publishes QoS 1 envelopes of `size` bytes under `key` at `level` (index `from`,
/// `from + 1`, …, publish ids `pid(i, tag)`) until one is refused; the indexes acked go to
/// `acked`. Returns the refused index and the refusal; fails naming `what` at index `max`.
async fn publish_until_refused(
    c: &mut Client,
    (key, level, tag): ([u8; 16], u8, u8),
    (from, size): (u64, usize),
    acked: &mut Vec<u64>,
    max: u64,
    what: &str,
) -> (u64, (ErrorCode, String)) {
    let mut i = from;
    loop {
        match publish_one(
            c,
            env_on(key, level, i, size),
            Qos::AtLeastOnce,
            pid(i, tag),
            false,
        )
        .await
        {
            Answer::Acked(_) => acked.push(i),
            Answer::Refused(code, m) => return (i, (code, m)),
        }
        i += 1;
        assert!(i < max, "{what}");
    }
}

/// Replays everything under `pattern` from sequence 0; returns the envelopes' indexes.
async fn replay_all(c: &mut Client, sub_id: u64, pattern: TokenPattern) -> Vec<u64> {
    c.send(&sub(sub_id, pattern, Some(Replay::FromSeq(0)), false))
        .await;
    let mut got = Vec::new();
    loop {
        match c.recv().await {
            Frame::SubOk(_) => {}
            Frame::Msg(m) if m.flags & msg_flags::REPLAYED != 0 => got.push(index_of(&m.envelope)),
            Frame::ReplayDone(d) if d.sub_id == sub_id => return got,
            Frame::Msg(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn file_config(path: &Path) -> Config {
    let mut c = Config::ephemeral();
    c.store.kind = Some(StoreKind::Sqlite);
    c.store.path = path.to_owned();
    c.listen.ws = whispeer_relay::config::ListenAddr::OFF;
    // No free-space reserve (default 256 MiB): with less than that free in TMPDIR every
    // stored publish would be refused. The reserve's own tests set it.
    c.store.min_free_bytes = 0;
    c
}

/// A relay over a store the test can inspect.
async fn relay_with(config: Config, store: Arc<SqliteStore>) -> TestRelay {
    let listeners = whispeer_relay::Listeners::bind(&config).await.unwrap();
    TestRelay::run(
        Relay::builder(config)
            .listeners(listeners)
            .store(store)
            .build()
            .unwrap(),
    )
}

/// A relay over a file store opened from `config` (the store, for the test to inspect).
async fn file_relay(config: Config) -> (Arc<SqliteStore>, TestRelay) {
    let store = Arc::new(SqliteStore::open_file(config.store.clone()).unwrap());
    let relay = relay_with(config, store.clone()).await;
    (store, relay)
}

/// Waits (bounded) until `f` holds, re-checking after each turn of the store's writer.
async fn wait_until(store: &SqliteStore, what: &str, mut f: impl FnMut() -> bool) {
    let mut changes = store.changes();
    tokio::time::timeout(TIMEOUT, changes.wait_for(|_| f()))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("store open");
}

/// The store-reader thread is one per process (relay/src/store/reads.rs), shared by every
/// relay a test binary runs at once. Its queue is fair per tenant, so the `Sub` flood's
/// thousands of reads no longer queue ahead of the backlog test's one timed replay; but the
/// fairness test stops the reader thread on purpose (a gated read), so it and the timed
/// test take turns.
static READER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KA: [u8; 16] = [0xa1; 16];
const KB: [u8; 16] = [0xb2; 16];
const KC: [u8; 16] = [0xc3; 16];

#[tokio::test]
async fn tenant_quota_refuses_one_source_address_and_not_another() {
    let dir = temp_dir("quota-tenant");
    let mut config = file_config(&dir.join("s.db"));
    config.store.tenant_max_messages = 20;
    config.store.tenant_max_bytes = 64 * 1024;
    let (store, relay) = file_relay(config).await;

    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    let mut b = client_from("127.0.0.3", relay.tcp()).await;
    // A live subscriber on A's tree: QoS 0 routing is never subject to a store quota.
    let mut live = client_from("127.0.0.4", relay.tcp()).await;
    live.send(&sub(1, all_of(KA), None, false)).await;
    assert!(matches!(live.recv().await, Frame::SubOk(_)));

    for i in 0..20 {
        let r = publish_one(
            &mut a,
            env_on(KA, 1, i, 100),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "within quota: {r:?}");
    }
    // The 21st message: refused, typed, naming the publish id, not fatal.
    let r = publish_one(
        &mut a,
        env_on(KA, 1, 20, 100),
        Qos::AtLeastOnce,
        pid(20, 1),
        false,
    )
    .await;
    match r {
        Answer::Refused(ErrorCode::QuotaExceeded, m) => {
            assert!(m.contains("stored messages"), "{m}")
        }
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
    // Inventing another key id does not help: the quota is the tenant's.
    let r = publish_one(
        &mut a,
        env_on(KC, 9, 21, 100),
        Qos::AtLeastOnce,
        pid(21, 1),
        false,
    )
    .await;
    assert!(
        matches!(r, Answer::Refused(ErrorCode::QuotaExceeded, _)),
        "{r:?}"
    );
    assert!(store.metrics().quota_tenant_rejections >= 2);
    // Another tenant is untouched.
    for i in 0..20 {
        let r = publish_one(
            &mut b,
            env_on(KB, 1, i, 100),
            Qos::AtLeastOnce,
            pid(i, 2),
            false,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "tenant B: {r:?}");
    }
    // Tenant A's live QoS 0 traffic still flows.
    a.send(&pub_qos(
        env_on(KA, 1, 999, 100),
        Qos::AtMostOnce,
        None,
        false,
    ))
    .await;
    loop {
        match live.recv().await {
            Frame::Msg(m) if index_of(&m.envelope) == 999 => break,
            Frame::Msg(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // What A stored is intact.
    let mut r = client_from("127.0.0.5", relay.tcp()).await;
    assert_eq!(
        replay_all(&mut r, 7, all_of(KA)).await,
        (0..20).collect::<Vec<_>>()
    );

    // The byte quota: a tenant of large messages hits it before the message count.
    let mut c = client_from("127.0.0.6", relay.tcp()).await;
    let mut acked = Vec::new();
    let (_, refused) = publish_until_refused(
        &mut c,
        (KC, 2, 3),
        (0, 16 * 1024),
        &mut acked,
        20,
        "the byte quota never applied",
    )
    .await;
    let acked = acked.len();
    assert_eq!(refused.0, ErrorCode::QuotaExceeded);
    assert!(refused.1.contains("stored bytes"), "{}", refused.1);
    assert_eq!(acked, 3, "64 KiB holds three 16 KiB envelopes");
    relay.stop().await;
}

#[tokio::test]
async fn path_retained_and_durable_quotas_per_tenant() {
    let dir = temp_dir("quota-kinds");
    let mut config = file_config(&dir.join("s.db"));
    config.store.tenant_max_paths = 5;
    config.store.tenant_max_retained = 2;
    config.store.tenant_max_durables = 2;
    let (store, relay) = file_relay(config).await;
    let mut a = client_from("127.0.0.2", relay.tcp()).await;

    // Distinct paths: five, then refused (random key ids do not help).
    for i in 0..5u8 {
        let r = publish_one(
            &mut a,
            env_on([i; 16], 1, i as u64, 50),
            Qos::AtLeastOnce,
            pid(i as u64, 1),
            false,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    }
    match publish_one(
        &mut a,
        env_on([77; 16], 1, 5, 50),
        Qos::AtLeastOnce,
        pid(5, 1),
        false,
    )
    .await
    {
        Answer::Refused(ErrorCode::QuotaExceeded, m) => {
            assert!(m.contains("distinct paths"), "{m}")
        }
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
    // An existing path still takes messages.
    let r = publish_one(
        &mut a,
        env_on([0; 16], 1, 6, 50),
        Qos::AtLeastOnce,
        pid(6, 1),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");

    // Retained values: two paths, then refused; replacing one (rollover) is fine.
    for (i, k) in [[0u8; 16], [1u8; 16]].into_iter().enumerate() {
        let r = publish_one(
            &mut a,
            env_on(k, 1, 10 + i as u64, 50),
            Qos::AtLeastOnce,
            pid(10 + i as u64, 1),
            true,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    }
    match publish_one(
        &mut a,
        env_on([2; 16], 1, 12, 50),
        Qos::AtLeastOnce,
        pid(12, 1),
        true,
    )
    .await
    {
        Answer::Refused(ErrorCode::QuotaExceeded, m) => {
            assert!(m.contains("retained values"), "{m}")
        }
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
    let r = publish_one(
        &mut a,
        env_on([0; 16], 1, 13, 50),
        Qos::AtLeastOnce,
        pid(13, 1),
        true,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "rollover: {r:?}");

    // Durable names: two, then the third Sub is refused (typed, names the subscription).
    for (i, name) in ["d1", "d2", "d3"].into_iter().enumerate() {
        a.send(&Frame::Sub(Sub {
            sub_id: 100 + i as u64,
            pattern: all_of([0; 16]),
            qos: Qos::AtLeastOnce,
            durable: Some(name.into()),
            replay: None,
            retained: false,
            credit: None,
            owner: None,
        }))
        .await;
        let f = loop {
            match a.recv().await {
                Frame::Msg(_) => {}
                f => break f,
            }
        };
        match (i, f) {
            (0 | 1, Frame::SubOk(ok)) => assert_eq!(ok.sub_id, 100 + i as u64),
            (2, Frame::Err(e)) => {
                assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}");
                assert_eq!(e.sub_id, Some(102));
                assert!(!e.fatal);
            }
            (i, f) => panic!("durable {i}: unexpected {f:?}"),
        }
    }
    // Another tenant still gets all of it.
    let mut b = client_from("127.0.0.3", relay.tcp()).await;
    let r = publish_one(
        &mut b,
        env_on([99; 16], 1, 1, 50),
        Qos::AtLeastOnce,
        pid(1, 2),
        true,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    assert!(store.metrics().quota_tenant_rejections >= 3);
    relay.stop().await;
}

/// The answer to a `Sub` (`SubOk` or `Err`), past any messages.
async fn sub_answer(c: &mut Client) -> Frame {
    loop {
        match c.recv().await {
            Frame::Msg(_) => {}
            f => return f,
        }
    }
}

/// A durable `Sub` refused for the tenant's durable quota leaves no owner behind: the owner
/// was recorded (in memory and as an auth-state line) before the quota was checked, so a
/// stranger sending new names with new owner secrets grew both without bound, ~1 KB per
/// refused `Sub`. One durable is created and owned; 200 more, each with its own name and
/// secret, are all refused `quota_exceeded`, and the relay still knows one owner — in
/// `/status` and in the auth-state file — which still keeps out anyone else.
#[tokio::test]
async fn durables_refused_by_the_quota_record_no_owner() {
    let dir = temp_dir("quota-owners");
    let state = dir.join("s.auth");
    let mut config = file_config(&dir.join("s.db"));
    config.auth.state = Some(state.clone());
    config.store.tenant_max_durables = 1;
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin listener").to_string();
    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    let durable = |sub_id: u64, name: String, secret: [u8; 32]| {
        Frame::Sub(Sub {
            sub_id,
            pattern: all_of([5; 16]),
            qos: Qos::AtLeastOnce,
            durable: Some(name),
            replay: None,
            retained: false,
            credit: None,
            owner: Some(bytes::Bytes::copy_from_slice(&secret)),
        })
    };
    // A message stored before the durable exists: the new durable starts after it (its
    // Sub waits for the owner line and is handled again, still as new, not resumed).
    let mut p = client_from("127.0.0.4", relay.tcp()).await;
    let r = publish_one(
        &mut p,
        env_on([5; 16], 1, 1, 50),
        Qos::AtLeastOnce,
        pid(1, 9),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    a.send(&durable(1, "owned".into(), [1; 32])).await;
    assert!(
        matches!(sub_answer(&mut a).await, Frame::SubOk(_)),
        "within the quota"
    );
    let r = publish_one(
        &mut p,
        env_on([5; 16], 1, 2, 50),
        Qos::AtLeastOnce,
        pid(2, 9),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    match a.recv().await {
        Frame::Msg(m) => assert_eq!(index_of(&m.envelope), 2, "a new durable starts live"),
        f => panic!("unexpected {f:?}"),
    }
    for i in 0..200u64 {
        let mut secret = [2; 32];
        secret[..8].copy_from_slice(&i.to_le_bytes());
        a.send(&durable(10 + i, format!("{}{i}", "x".repeat(200)), secret))
            .await;
        match sub_answer(&mut a).await {
            Frame::Err(e) => {
                assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}");
                assert_eq!(e.sub_id, Some(10 + i));
                assert!(!e.fatal);
            }
            f => panic!("durable {i}: unexpected {f:?}"),
        }
    }
    let status: whispeer_relay::admin::Status = serde_json::from_slice(
        &whispeer_relay::admin::http_get(&admin, "/status")
            .await
            .unwrap(),
    )
    .unwrap();
    let lines = std::fs::read_to_string(&state).unwrap();
    let owner_lines = lines
        .lines()
        .filter(|l| l.contains(r#""t":"owner""#))
        .count();
    println!(
        "after 200 refused durable Subs: {} owners in /status, {owner_lines} owner lines in \
         the auth-state file ({} bytes)",
        status.accounts.durable_owners,
        lines.len()
    );
    assert_eq!(status.accounts.durable_owners, 1, "owners in memory");
    assert_eq!(
        owner_lines, 1,
        "owner lines in the auth-state file:\n{lines}"
    );
    // The one owner still keeps its durable: another secret is refused, its own resumes
    // (once the first connection's end was handled: the relay frees the name before it
    // closes its side).
    a.shutdown_write().await;
    a.drain_to_end().await;
    let mut b = client_from("127.0.0.3", relay.tcp()).await;
    b.send(&durable(1, "owned".into(), [3; 32])).await;
    match sub_answer(&mut b).await {
        Frame::Err(e) => assert_eq!(e.code, ErrorCode::NotAllowed, "{e:?}"),
        f => panic!("a stranger: unexpected {f:?}"),
    }
    b.send(&durable(2, "owned".into(), [1; 32])).await;
    assert!(
        matches!(sub_answer(&mut b).await, Frame::SubOk(_)),
        "the owner resumes"
    );
    drop((b, p));
    relay.stop().await;
}

#[tokio::test]
async fn global_quota_applies_across_tenants_and_live_routing_goes_on() {
    let dir = temp_dir("quota-global");
    let mut config = file_config(&dir.join("s.db"));
    config.store.tenant_max_messages = 20;
    config.store.total_max_messages = 50;
    // No reserve: the total is first-come (the reserve has its own test below).
    config.store.reserve_percent = 0;
    let (store, relay) = file_relay(config).await;
    let mut acked = 0;
    let mut refused = None;
    'tenants: for t in 2..6u8 {
        let mut c = client_from(&format!("127.0.0.{t}"), relay.tcp()).await;
        for i in 0..20u64 {
            match publish_one(
                &mut c,
                env_on([t; 16], 1, i, 64),
                Qos::AtLeastOnce,
                pid(i, t),
                false,
            )
            .await
            {
                Answer::Acked(_) => acked += 1,
                Answer::Refused(code, m) => {
                    refused = Some((t, i, code, m));
                    break 'tenants;
                }
            }
        }
    }
    let (t, i, code, m) = refused.expect("the global quota applied");
    assert_eq!(acked, 50);
    assert_eq!(
        (t, i),
        (4, 10),
        "the third tenant is stopped at the global limit"
    );
    assert_eq!(code, ErrorCode::QuotaExceeded);
    assert!(m.contains("total stored messages"), "{m}");
    assert_eq!(store.metrics().quota_global_rejections, 1);
    // Live routing is not a store write: it goes on for everyone.
    let mut s = client_from("127.0.0.9", relay.tcp()).await;
    s.send(&sub(1, all_of(KA), None, false)).await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let mut p = client_from("127.0.0.8", relay.tcp()).await;
    p.send(&pub_qos(
        env_on(KA, 1, 4242, 64),
        Qos::AtMostOnce,
        None,
        false,
    ))
    .await;
    match s.recv().await {
        Frame::Msg(m) => assert_eq!(index_of(&m.envelope), 4242),
        other => panic!("unexpected {other:?}"),
    }
    relay.stop().await;
}

/// The reserve (`store.reserve_percent`): tenants that filled the store's common part are
/// refused before the store is full, and every other tenant can still store its share of
/// the rest — the relay's totals are not first-come to the last byte, so a flood from a
/// few addresses cannot leave everyone else nothing (review finding 5). Real relay, real
/// SQLite file, one source address per tenant.
#[tokio::test]
async fn tenants_that_filled_the_store_leave_the_reserve_to_the_others() {
    let dir = temp_dir("quota-reserve");
    let mut config = file_config(&dir.join("s.db"));
    config.store.tenant_max_messages = 30;
    config.store.total_max_messages = 50;
    // 20 % of 50 = 10 kept back, shared by 5 tenants: 2 each.
    config.store.reserve_percent = 20;
    config.store.reserve_tenants = 5;
    let (store, relay) = file_relay(config).await;
    // Publishes until the first refusal (at most `max`): (acked, the refusal).
    async fn fill(
        c: &mut Client,
        t: u8,
        from: u64,
        max: u64,
    ) -> (u64, Option<(ErrorCode, String)>) {
        for i in from..from + max {
            match publish_one(
                c,
                env_on([t; 16], 1, i, 64),
                Qos::AtLeastOnce,
                pid(i, t),
                false,
            )
            .await
            {
                Answer::Acked(_) => {}
                Answer::Refused(code, m) => return (i - from, Some((code, m))),
            }
        }
        (max, None)
    }
    // Two flooding tenants take the common 40, first come.
    let mut flood_a = client_from("127.0.0.2", relay.tcp()).await;
    let mut flood_b = client_from("127.0.0.3", relay.tcp()).await;
    assert_eq!(fill(&mut flood_a, 2, 0, 20).await, (20, None));
    assert_eq!(fill(&mut flood_b, 3, 0, 20).await, (20, None));
    // Neither may go on into the reserve, far below its own quota of 30.
    let (n, refused) = fill(&mut flood_a, 2, 20, 1).await;
    let (code, m) = refused.expect("a tenant past its share is refused the reserve");
    assert_eq!((n, code), (0, ErrorCode::QuotaExceeded));
    assert!(m.contains("kept for tenants holding at most 2"), "{m}");
    assert_eq!(store.metrics().quota_reserve_rejections, 1);
    // Every other tenant still stores its share, then is refused like the floods.
    for t in 4..=7u8 {
        let mut c = client_from(&format!("127.0.0.{t}"), relay.tcp()).await;
        let (n, refused) = fill(&mut c, t, 0, 5).await;
        assert_eq!(n, 2, "tenant {t} stores its share of the reserve");
        assert!(
            refused.unwrap().1.contains("kept for tenants"),
            "tenant {t}"
        );
    }
    // 48 stored: the fifth newcomer takes the last 2, and the total is then the total.
    let mut c = client_from("127.0.0.8", relay.tcp()).await;
    let (n, refused) = fill(&mut c, 8, 0, 5).await;
    assert_eq!(n, 2);
    assert!(refused
        .unwrap()
        .1
        .contains("total stored messages quota (50) is reached"));
    let m = store.metrics();
    assert_eq!(
        (
            m.quota_reserve_rejections,
            m.quota_global_rejections,
            m.quota_tenant_rejections
        ),
        (5, 1, 0)
    );
    // The counter reaches the operator.
    let text = relay
        .handle
        .metrics()
        .render_store_prometheus("sqlite", &store.metrics());
    assert!(
        text.contains("whispeer_relay_store_quota_reserve_rejections_total 5"),
        "{text}"
    );
    relay.stop().await;
}

/// Review 28 finding 1: a retained value taken over past the reserve's line is a transfer
/// into the reserve. Without the check, a small tenant wrote values into the reserve and a
/// big one took each over (its count grew, the small one's fell, the total stayed), so a
/// few addresses filled the reserve after all.
#[tokio::test]
async fn a_big_tenant_cannot_take_over_values_stored_in_the_reserve() {
    let dir = temp_dir("quota-reserve-takeover");
    let mut config = file_config(&dir.join("s.db"));
    config.store.total_max_retained = 10;
    // 20 % of 10 = 2 kept back, 2 tenants: 1 each; the common part is 8.
    config.store.reserve_percent = 20;
    config.store.reserve_tenants = 2;
    let (store, relay) = file_relay(config).await;
    async fn retain(c: &mut Client, t: u8, level: u8) -> Answer {
        let env = env_on([0xAB; 16], level, u64::from(level), 64);
        publish_one(c, env, Qos::AtLeastOnce, pid(u64::from(level), t), true).await
    }
    let mut big = client_from("127.0.0.2", relay.tcp()).await;
    for level in 0..8 {
        assert!(matches!(retain(&mut big, 2, level).await, Answer::Acked(_)));
    }
    let mut small = client_from("127.0.0.3", relay.tcp()).await;
    assert!(matches!(retain(&mut small, 3, 8).await, Answer::Acked(_)));
    // The big tenant's takeover of the small one's value: refused by the reserve.
    match retain(&mut big, 2, 8).await {
        Answer::Refused(code, m) => {
            assert_eq!(code, ErrorCode::QuotaExceeded);
            assert!(m.contains("kept for tenants holding at most 1"), "{m}");
        }
        other => panic!("the takeover went through: {other:?}"),
    }
    assert_eq!(store.metrics().quota_reserve_rejections, 1);
    // Past the line (9 of 10 held) no tenant may take a value over beyond its share: the
    // small one holds 1 already.
    match retain(&mut small, 3, 0).await {
        Answer::Refused(_, m) => assert!(m.contains("kept for tenants"), "{m}"),
        other => panic!("a transfer past the line to a tenant over its share: {other:?}"),
    }
    relay.stop().await;
}

/// Review 28 finding 2: replacing one's own retained value is charged what it adds, not
/// its whole size, so a tenant above its share of the reserve can still update its state
/// topics once the store passed the reserve's line — and still cannot add new ones.
#[tokio::test]
async fn a_tenant_past_the_line_still_replaces_its_own_retained_values() {
    let dir = temp_dir("quota-reserve-replace");
    let mut config = file_config(&dir.join("s.db"));
    let size = env_on([0xCD; 16], 0, 0, 400).as_bytes().len() as u64;
    // Room for 10 values: 8 first-come, 2 in the reserve, one per tenant.
    config.store.total_max_bytes = 10 * SqliteStore::quota_bytes_of(size);
    config.store.reserve_percent = 20;
    config.store.reserve_tenants = 2;
    let (store, relay) = file_relay(config).await;
    async fn retain(c: &mut Client, level: u8, i: u64) -> Answer {
        let env = env_on([0xCD; 16], level, i, 400);
        publish_one(c, env, Qos::AtMostOnce, pid(i, level), true).await
    }
    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    for level in 0..8 {
        assert!(matches!(retain(&mut a, level, 0).await, Answer::Acked(_)));
    }
    // At the line: its own values, again and again.
    for i in 1..=3 {
        let r = retain(&mut a, (i % 8) as u8, i).await;
        assert!(matches!(r, Answer::Acked(_)), "replace {i}: {r:?}");
    }
    // A new value would take from the reserve: refused.
    match retain(&mut a, 9, 0).await {
        Answer::Refused(_, m) => assert!(m.contains("kept for tenants"), "{m}"),
        other => panic!("a new value past the line: {other:?}"),
    }
    assert_eq!(store.metrics().quota_reserve_rejections, 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_full_store_queue_answers_busy_and_never_stalls_others() {
    let dir = temp_dir("busy");
    let mut config = file_config(&dir.join("s.db"));
    config.store.queue = 2;
    config.store.max_batch = 1;
    let (store, relay) = file_relay(config).await;
    let mut p = client_from("127.0.0.2", relay.tcp()).await;
    const N: u64 = 2_000;
    for i in 0..N {
        p.send(&pub_qos(
            env_on(KA, 1, i, 200),
            Qos::AtLeastOnce,
            Some(pid(i, 1)),
            false,
        ))
        .await;
    }
    let (mut acked, mut busy) = (Vec::new(), 0u64);
    while acked.len() as u64 + busy < N {
        match p.recv().await {
            Frame::PubAck(a) => acked.push(index_of_pid(a.publish_id)),
            Frame::Err(e) => {
                assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
                assert!(!e.fatal && e.code.is_retryable());
                busy += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    println!("queue of 2: {} acked, {busy} busy", acked.len());
    assert!(busy > 0, "a queue of 2 overflowed");
    assert_eq!(store.metrics().busy_rejections, busy);
    // Every acknowledged message is stored.
    let mut r = client_from("127.0.0.3", relay.tcp()).await;
    let mut got = replay_all(&mut r, 1, all_of(KA)).await;
    got.sort_unstable();
    acked.sort_unstable();
    assert_eq!(got, acked);
    relay.stop().await;
}

/// A new subscription with a retained lookup or a replay waits only for its own key id's
/// queued writes, never for another tenant's backlog: while the store's writer is stuck
/// (the test holds SQLite's write lock, as a slow disk under a flood would), a subscriber of
/// key A gets its retained value, its history and then live messages at once, although
/// tenant B's QoS 1 publish waits in the queue. Before, the lookup waited for the whole
/// store to commit, so a flood of other tenants' writes held every new subscriber's live
/// messages back for as long as the commits took (the hostile bench saw 1–2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_store_backlog_never_holds_back_a_new_subscription() {
    let _alone = READER.lock().await;
    let dir = temp_dir("barrier");
    let db = dir.join("s.db");
    let config = file_config(&db);
    let (_store, relay) = file_relay(config).await;
    // Key A holds a retained value and a stored message, committed.
    let mut a = client_from("127.0.0.4", relay.tcp()).await;
    let r = publish_one(
        &mut a,
        env_on(KA, 1, 1, 64),
        Qos::AtLeastOnce,
        pid(1, 4),
        true,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    // The writer gets stuck: SQLite's write lock is held by another connection.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    // Tenant B's write is queued behind the lock (its PubAck cannot come yet).
    let mut b = client_from("127.0.0.2", relay.tcp()).await;
    b.send(&pub_qos(
        env_on(KB, 1, 2, 64),
        Qos::AtLeastOnce,
        Some(pid(2, 2)),
        false,
    ))
    .await;
    // A new subscriber of key A: its retained value, then a live message.
    let mut c = client_from("127.0.0.3", relay.tcp()).await;
    c.send(&sub(1, all_of(KA), None, true)).await;
    // And one replaying key A's history.
    let mut d = client_from("127.0.0.5", relay.tcp()).await;
    d.send(&sub(1, all_of(KA), Some(Replay::FromSeq(0)), false))
        .await;
    // The live message is published once both subscriptions exist (SubOk seen by the relay
    // before the publish: the same connection orders them).
    a.send(&sub(9, all_of(KC), None, false)).await;
    loop {
        if let Frame::SubOk(_) = a.recv().await {
            break;
        }
    }
    a.send(&pub_qos(env_on(KA, 1, 3, 64), Qos::AtMostOnce, None, false))
        .await;
    // While the writer is stuck: long enough for a loaded machine, far below the writer's
    // 5 s busy timeout, after which its commit would fail and release the lookup anyway.
    let limit = Duration::from_secs(4);
    let (got_c, got_d) = tokio::join!(
        tokio::time::timeout(limit, first_two(&mut c)),
        tokio::time::timeout(limit, first_two(&mut d))
    );
    let got_c = got_c.expect("the retained lookup waited for another tenant's queued write");
    let got_d = got_d.expect("the replay waited for another tenant's queued write");
    assert_eq!(got_c[0], (1, msg_flags::RETAINED), "{got_c:?}");
    assert_eq!(got_c[1].0, 3, "then the live message: {got_c:?}");
    assert_eq!(got_d[0].0, 1, "history first: {got_d:?}");
    assert!(got_d[0].1 & msg_flags::REPLAYED != 0, "{got_d:?}");
    assert_eq!(got_d[1], (3, 0), "then the live message: {got_d:?}");
    // The lock goes: tenant B's write commits and is acknowledged; nothing was lost.
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    match b.recv().await {
        Frame::PubAck(p) => assert_eq!(p.publish_id, pid(2, 2)),
        other => panic!("unexpected {other:?}"),
    }
    drop((a, b, c, d));
    relay.stop().await;
}

/// While the store's writer is stuck in a commit (the test holds SQLite's write lock, as a
/// slow disk under a stored flood would) and one tenant's stored publishes have filled its
/// write queue — the next one answered `busy`, retryable, naming the publish id — another
/// tenant's live QoS 0 messages are routed and acknowledged at once: nothing on the live
/// path waits for the store (issue 10: a full store queue pushes back on the publishing
/// connection only). Once the lock goes, every publish the queue took is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_routing_goes_on_while_the_writer_is_stuck_and_its_queue_is_full() {
    let dir = temp_dir("stuck");
    let db = dir.join("s.db");
    let mut config = file_config(&db);
    config.store.queue = 64;
    config.store.max_batch = 16;
    let (store, relay) = file_relay(config).await;
    let mut c = client_from("127.0.0.4", relay.tcp()).await;
    c.send(&sub(1, all_of(KB), None, false)).await;
    assert!(matches!(c.recv().await, Frame::SubOk(_)));
    // The writer gets stuck: SQLite's write lock is held by another connection.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let commits = store.metrics().commits;
    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    let queued = fill_until_busy(&mut a, KA, 200).await;
    assert!(queued.len() >= 64, "the queue took {}", queued.len());
    // Tenant B's live QoS 0 message: acknowledged and delivered while the writer is stuck.
    let mut b = client_from("127.0.0.3", relay.tcp()).await;
    let r = publish_one(
        &mut b,
        env_on(KB, 1, 7, 64),
        Qos::AtMostOnce,
        pid(7, 3),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    match c.recv().await {
        Frame::Msg(m) => assert_eq!(index_of(&m.envelope), 7),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        store.metrics().commits,
        commits,
        "the writer was stuck throughout"
    );
    // The lock goes: everything the queue took commits and is acknowledged, in order.
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let mut acked = Vec::new();
    while acked.len() < queued.len() {
        match a.recv().await {
            Frame::PubAck(p) => acked.push(p.publish_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, queued);
    drop((a, b, c));
    relay.stop().await;
}

/// Publishes QoS 1 envelopes with `body`-byte bodies on `key`, one at a time (a Ping after
/// each tells when the relay has handled it), while the writer is stuck, until the store
/// answers `busy`; returns the publish ids it queued (nothing is acknowledged meanwhile).
async fn fill_until_busy(a: &mut Client, key: [u8; 16], body: usize) -> Vec<[u8; 16]> {
    let mut queued = Vec::new();
    for i in 0u64.. {
        let id = pid(i, key[0]);
        a.send(&pub_qos(
            env_on(key, 1, i, body),
            Qos::AtLeastOnce,
            Some(id),
            false,
        ))
        .await;
        a.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: i }))
            .await;
        let mut busy = false;
        loop {
            match a.recv().await {
                Frame::Pong(p) if p.nonce == i => break,
                Frame::Err(e) => {
                    assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
                    assert!(!e.fatal && e.code.is_retryable(), "{e:?}");
                    assert_eq!(e.publish_id, Some(id));
                    busy = true;
                }
                other => panic!("nothing is acknowledged while the writer is stuck: {other:?}"),
            }
        }
        if busy {
            return queued;
        }
        queued.push(id);
    }
    unreachable!()
}

/// While the disk lags, what waits for the writer is held in memory: the queue is bounded
/// in envelope bytes as well as in messages (65,536 queued 1 MiB envelopes would be 64 GiB).
/// With the writer stuck, one tenant's 8 KiB envelopes fill a 64 KiB bound after 7, not
/// after `queue` (65,536) of them; another tenant still gets its fair share (half of it)
/// while the first is refused — one tenant's flood never refuses another's publish — and
/// nothing takes what waits past twice the bound; a larger envelope waits for an empty
/// queue, then goes in alone; everything queued is acknowledged in order when the disk is
/// back.
#[tokio::test]
async fn the_write_queue_is_bounded_in_bytes_while_the_writer_is_stuck() {
    let dir = temp_dir("queue-bytes");
    let db = dir.join("s.db");
    let mut config = file_config(&db);
    config.store.queue = 65_536;
    config.store.queue_bytes = 64 << 10;
    let (store, relay) = file_relay(config).await;
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let busy = store.metrics().busy_rejections;
    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    let each = env_on(KA, 1, 0, 8 << 10).as_bytes().len();
    let queued = fill_until_busy(&mut a, KA, 8 << 10).await;
    assert_eq!(queued.len(), (64 << 10) / each, "{each}-byte envelopes");
    assert_eq!(store.metrics().busy_rejections, busy + 1);
    // The queue is full, but not of tenant B's writes: B gets its fair share (half the
    // bound, two tenants waiting) while A stays refused.
    let mut b = client_from("127.0.0.3", relay.tcp()).await;
    let queued_b = fill_until_busy(&mut b, KB, 8 << 10).await;
    assert_eq!(queued_b.len(), (32 << 10) / each, "tenant B's share");
    let r = publish_one(
        &mut a,
        env_on(KA, 1, 99, 64),
        Qos::AtLeastOnce,
        pid(99, 2),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Refused(ErrorCode::Busy, _)), "{r:?}");
    // A third tenant's envelope that would take what waits past twice the bound: busy.
    let mut c = client_from("127.0.0.5", relay.tcp()).await;
    let big = || env_on(KC, 1, 9, 100 << 10);
    let r = publish_one(&mut c, big(), Qos::AtLeastOnce, pid(9, 5), false).await;
    assert!(matches!(r, Answer::Refused(ErrorCode::Busy, _)), "{r:?}");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    for (client, queued) in [(&mut a, &queued), (&mut b, &queued_b)] {
        let mut acked = Vec::new();
        while acked.len() < queued.len() {
            match client.recv().await {
                Frame::PubAck(p) => acked.push(p.publish_id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(&acked, queued);
    }
    // The queue is empty: the large envelope goes in alone.
    let r = publish_one(&mut c, big(), Qos::AtLeastOnce, pid(10, 5), false).await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    drop((a, b, c));
    relay.stop().await;
}

/// The first two messages a subscriber gets (skipping `SubOk` and `ReplayDone`): index, flags.
async fn first_two(c: &mut Client) -> Vec<(u64, u64)> {
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match c.recv().await {
            Frame::SubOk(_) | Frame::ReplayDone(_) => {}
            Frame::Msg(m) => seen.push((index_of(&m.envelope), m.flags)),
            other => panic!("unexpected {other:?}"),
        }
    }
    seen
}

fn index_of_pid(p: [u8; 16]) -> u64 {
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

#[tokio::test]
async fn qos0_is_live_only_and_retained_values_roll_over_and_expire() {
    let dir = temp_dir("retained");
    let mut config = file_config(&dir.join("s.db"));
    config.store.retained_max_age_ms = 60_000;
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    let store = Arc::new(SqliteStore::open_file_with_clock(config.store.clone(), clock).unwrap());
    let relay = relay_with(config, store.clone()).await;
    let mut p = client_from("127.0.0.2", relay.tcp()).await;
    // QoS 0 without retain: routed, not stored. QoS 1: stored.
    for i in 0..5 {
        p.send(&pub_qos(env_on(KA, 1, i, 64), Qos::AtMostOnce, None, false))
            .await;
    }
    let r = publish_one(
        &mut p,
        env_on(KA, 1, 5, 64),
        Qos::AtLeastOnce,
        pid(5, 1),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)));
    // Retained QoS 0 values are kept as retained values; a newer one replaces the older.
    p.send(&pub_qos(
        env_on(KA, 2, 100, 64),
        Qos::AtMostOnce,
        None,
        true,
    ))
    .await;
    let r = publish_one(
        &mut p,
        env_on(KA, 2, 101, 64),
        Qos::AtMostOnce,
        pid(101, 1),
        true,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)));
    let r = publish_one(
        &mut p,
        env_on(KA, 3, 200, 64),
        Qos::AtLeastOnce,
        pid(200, 1),
        true,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)));

    let mut s = client_from("127.0.0.3", relay.tcp()).await;
    assert_eq!(
        replay_all(&mut s, 1, all_of(KA)).await,
        vec![5, 200],
        "history holds QoS >= 1 only (the retained QoS 1 value is history too)"
    );
    // A fresh connection: the relay sends a message once per connection.
    let mut s = client_from("127.0.0.3", relay.tcp()).await;
    s.send(&sub(2, all_of(KA), None, true)).await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let marker = publish_one(
        &mut p,
        env_on(KA, 9, 999, 64),
        Qos::AtMostOnce,
        pid(999, 1),
        false,
    )
    .await;
    assert!(matches!(marker, Answer::Acked(_)));
    let mut values = Vec::new();
    loop {
        match s.recv().await {
            Frame::Msg(m) if index_of(&m.envelope) == 999 => break,
            Frame::Msg(m) => {
                assert!(m.flags & msg_flags::RETAINED != 0);
                values.push(index_of(&m.envelope));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(values, vec![101, 200], "one value per path, the newest");
    assert_eq!(store.status().retained, 2);

    // Past the maximum age the values are no longer sent, and the sweep (once a second)
    // deletes them.
    now.fetch_add(61_000, Ordering::SeqCst);
    let mut s = client_from("127.0.0.3", relay.tcp()).await;
    s.send(&sub(3, all_of(KA), None, true)).await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    let marker = publish_one(
        &mut p,
        env_on(KA, 9, 1000, 64),
        Qos::AtMostOnce,
        pid(1000, 1),
        false,
    )
    .await;
    assert!(matches!(marker, Answer::Acked(_)));
    match s.recv().await {
        Frame::Msg(m) => assert_eq!(index_of(&m.envelope), 1000, "no retained value left"),
        other => panic!("unexpected {other:?}"),
    }
    wait_until(&store, "retained values to be deleted", || {
        store.status().retained == 0
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_flood_under_random_key_ids_reads_no_row_and_the_honest_client_loses_nothing() {
    let dir = temp_dir("flood");
    let mut config = file_config(&dir.join("s.db"));
    config.limits.max_subscriptions = 100_000;
    // The preload pipelines its publishes; the per-connection publish rate is not tested here.
    config.limits.publish_rate = 0;
    let (store, relay) = file_relay(config).await;
    let addr = relay.tcp();
    // Another tenant's stored history: what a scan would have to read.
    {
        let mut o = client_from("127.0.0.7", addr).await;
        const PRE: u64 = 20_000;
        // In windows of 500, so the PubAcks never pile up unread.
        for w in 0..PRE / 500 {
            for i in w * 500..(w + 1) * 500 {
                o.send(&pub_qos(
                    env_on(KB, (i % 16) as u8, i, 256),
                    Qos::AtLeastOnce,
                    Some(pid(i, 7)),
                    false,
                ))
                .await;
            }
            let mut n = 0;
            while n < 500 {
                if let Frame::PubAck(_) = o.recv().await {
                    n += 1;
                }
            }
        }
    }
    let rows_before = store.metrics().rows_read;

    // The flood: 8 connections, each sends Subs with replay from 0 under random key ids.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for f in 0..8u8 {
        let stop = stop.clone();
        flood.push(tokio::spawn(async move {
            let mut c = client_from(&format!("127.0.1.{}", f + 1), addr).await;
            let mut sent = 0u64;
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ f as u64;
            while !stop.load(Ordering::Relaxed) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let mut k = [0u8; 16];
                k[..8].copy_from_slice(&seed.to_le_bytes());
                k[8..].copy_from_slice(&sent.to_le_bytes());
                c.send(&sub(
                    sent % 64 + 1,
                    all_of(k),
                    Some(Replay::FromSeq(0)),
                    true,
                ))
                .await;
                sent += 1;
                // Read what comes back (SubOk, ReplayDone) so the relay never blocks on us.
                while let Ok(r) = tokio::time::timeout(Duration::from_millis(0), c.read()).await {
                    if !matches!(r, Read::Frame(_)) {
                        panic!("flood connection closed: {r:?}");
                    }
                }
            }
            sent
        }));
    }

    // The honest client: publishes QoS 1 on its own tree, a subscriber receives live.
    let mut sub_c = client_from("127.0.0.2", addr).await;
    sub_c.send(&sub(1, all_of(KA), None, false)).await;
    assert!(matches!(sub_c.recv().await, Frame::SubOk(_)));
    let mut pubc = client_from("127.0.0.2", addr).await;
    const N: u64 = 2_000;
    let mut lat = Vec::with_capacity(N as usize);
    for i in 0..N {
        let t = Instant::now();
        pubc.send(&pub_qos(
            env_on(KA, 1, i, 256),
            Qos::AtLeastOnce,
            Some(pid(i, 2)),
            false,
        ))
        .await;
        let got = match sub_c.recv().await {
            Frame::Msg(m) => index_of(&m.envelope),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(got, i, "in order, nothing lost");
        lat.push(t.elapsed());
        match pubc.recv().await {
            Frame::PubAck(a) => assert_eq!(a.publish_id, pid(i, 2)),
            other => panic!("unexpected {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut subs = 0;
    for f in flood {
        subs += f.await.unwrap();
    }
    lat.sort_unstable();
    println!(
        "honest client beside {subs} replay-from-0 Subs under random key ids: p50 {:?} p99 {:?} max {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    assert!(subs > 100, "the flood ran ({subs} Subs)");
    assert_eq!(
        store.metrics().rows_read,
        rows_before,
        "a replay or retained lookup under an unknown key id reads no stored row"
    );
    // And the honest client's history is complete.
    let mut r = client_from("127.0.0.3", addr).await;
    assert_eq!(
        replay_all(&mut r, 1, all_of(KA)).await,
        (0..N).collect::<Vec<_>>()
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_refused_retryably_live_routing_goes_on_and_the_store_resumes() {
    let Some(disk) = SmallDisk::mount("diskfull") else {
        // Mounting needs root (CI runs the suite as root); say so rather than pass quietly.
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    let mut config = file_config(&disk.dir.join("s.db"));
    config.store.retry_ms = 50;
    // No free-space reserve: SQLite meets the full disk and the store recovers by its probe
    // (the reserve: `the_free_space_reserve_refuses_publishes_before_the_disk_is_full`).
    config.store.min_free_bytes = 0;
    let (store, relay) = file_relay(config).await;
    let addr = relay.tcp();
    let mut p = client_from("127.0.0.2", addr).await;
    let mut acked: Vec<u64> = Vec::new();
    for i in 0..20 {
        match publish_one(
            &mut p,
            env_on(KA, 1, i, 1024),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await
        {
            Answer::Acked(_) => acked.push(i),
            other => panic!("before the disk fills: {other:?}"),
        }
    }
    // A live subscriber on another tree.
    let mut live = client_from("127.0.0.3", addr).await;
    live.send(&sub(1, all_of(KB), None, false)).await;
    assert!(matches!(live.recv().await, Frame::SubOk(_)));

    let filler = disk.fill("filler");
    // Publish until the store notices the full disk.
    let (mut i, full) = publish_until_refused(
        &mut p,
        (KA, 1, 1),
        (20, 4096),
        &mut acked,
        5_000,
        "the full disk was never noticed",
    )
    .await;
    assert_eq!(full.0, ErrorCode::StorageFull, "{}", full.1);
    assert!(full.0.is_retryable());
    // A failed commit refused it. (Without a free-space reserve the one-row probe may have
    // resumed the store already — the flapping the reserve prevents — so its state is not
    // asserted here: `a_full_disk_does_not_flap_and_recovers_with_every_acknowledged_message`
    // does, with a reserve.)
    assert!(store.metrics().commit_failures >= 1);
    // While the disk is full: live QoS 0 routing on another tree goes on.
    for j in 0..50 {
        p.send(&pub_qos(
            env_on(KB, 1, j, 512),
            Qos::AtMostOnce,
            None,
            false,
        ))
        .await;
    }
    for j in 0..50 {
        match live.recv().await {
            Frame::Msg(m) => assert_eq!(index_of(&m.envelope), j),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Publishes needing the store are refused (retryable), never acknowledged unstored.
    i += 1;
    match publish_one(
        &mut p,
        env_on(KA, 1, i, 4096),
        Qos::AtLeastOnce,
        pid(i, 1),
        false,
    )
    .await
    {
        Answer::Refused(ErrorCode::StorageFull, _) => {}
        Answer::Acked(_) => acked.push(i),
        other => panic!("unexpected {other:?}"),
    }
    assert!(store.metrics().commit_failures >= 1);

    // Space frees: the store resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut streak = 0;
    while streak < 50 {
        i += 1;
        match publish_one(
            &mut p,
            env_on(KA, 1, i, 1024),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await
        {
            Answer::Acked(_) => {
                acked.push(i);
                streak += 1;
            }
            Answer::Refused(code, m) => {
                assert!(code.is_retryable(), "{code:?}: {m}");
                streak = 0;
                assert!(Instant::now() < deadline, "the store never resumed: {m}");
                // Retry once the store's recovery probe committed.
                wait_until(&store, "the store to resume", || {
                    store.status().state == "ok"
                })
                .await;
            }
        }
    }
    assert_eq!(store.status().state, "ok");
    // Every acknowledged message is in the history.
    let mut r = client_from("127.0.0.4", addr).await;
    let got = replay_all(&mut r, 1, all_of(KA)).await;
    let got: std::collections::HashSet<u64> = got.into_iter().collect();
    for a in &acked {
        assert!(got.contains(a), "acknowledged message {a} lost");
    }
    println!(
        "disk full after {} acked; {} commit failures; resumed",
        acked.len(),
        store.metrics().commit_failures
    );
    relay.stop().await;
    drop(store);
    drop(disk);
}

/// An envelope of exactly `len` bytes on `[key, tok(0)]`, its body starting with `i`.
fn env_of_len(key: KeyId, i: u64, len: usize) -> Envelope {
    let small = indexed_on(key, 0, i, 16).as_bytes().len();
    let env = indexed_on(
        key,
        0,
        i,
        16 + len.checked_sub(small).expect("not below the smallest"),
    );
    assert_eq!(env.as_bytes().len(), len);
    env
}

/// Appends `n` QoS 1 messages of `len` bytes, `per_path` on each path (one path per key
/// id, taking turns), every tenth also its path's retained value, and waits until the last
/// is durable; `each` runs after each append.
fn store_messages(
    store: &SqliteStore,
    n: u64,
    len: usize,
    per_path: u64,
    mut each: impl FnMut(u64),
) {
    let tenant = Tenant::Local;
    for i in 0..n {
        each(i);
        let deadline = Instant::now() + TIMEOUT;
        let mut k = [1u8; 16];
        let paths = n.div_ceil(per_path);
        k[..8].copy_from_slice(
            &(i % paths)
                .wrapping_mul(0x2545_f491_4f6c_dd1d)
                .to_le_bytes(),
        );
        let env = env_of_len(KeyId::from_bytes(k), i, len);
        let path = env.token_path();
        let flags = if i % 10 == 0 { pub_flags::RETAIN } else { 0 };
        loop {
            match store.append(Append {
                path: &path,
                envelope: &env,
                flags,
                qos: Qos::AtLeastOnce,
                publish_id: None,
                tenant: &tenant,
            }) {
                Ok(Accepted::New(_)) => break,
                Ok(other) => panic!("unexpected {other:?}"),
                // The writer is behind: publish again (what a client does), for a while:
                // a refusal that lasts (storage_full: the disk) fails the test, never
                // spins for ever.
                Err(e) if e.code().is_retryable() => {
                    assert!(
                        Instant::now() < deadline,
                        "message {i} still refused after {TIMEOUT:?}: {e}"
                    );
                    std::thread::yield_now()
                }
                Err(e) => panic!("append failed: {e}"),
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    store.when_durable(store.last_seq(), Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(TIMEOUT)
        .expect("durable in time")
        .expect("committed");
}

/// Bytes of the pages in use in a closed store file (its size less its free pages).
fn used_bytes(db: &Path) -> u64 {
    let c = rusqlite::Connection::open(db).unwrap();
    let q = |p: &str| {
        c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))
            .unwrap() as u64
    };
    (q("page_count") - q("freelist_count")) * q("page_size")
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Finding (adversarial review): the byte quotas counted envelope bytes, but a stored
/// message costs more on disk — its row, two index entries, and the part of its page no
/// further row fits in — so a `total_max_bytes` sized to the disk still filled it. A real
/// file for each of five envelope sizes (the smallest envelope, 1 KiB, just over half a
/// page — the worst packing —, a page, 64 KiB): the pages the messages and retained values
/// take must stay within what the quotas count (`quota_bytes`), and not far below it.
#[test]
fn the_bytes_the_quotas_count_cover_the_store_files_size() {
    // (envelope bytes, messages); 100 messages per path, every tenth retained.
    let cases: [(usize, u64); 5] = [
        (160, 60_000),
        (1024, 12_000),
        (8_300, 1_500),
        (16 * 1024, 1_000),
        (64 * 1024, 200),
    ];
    let mut report = Vec::new();
    for (len, n) in cases {
        let dir = temp_dir(&format!("disk-cost-{len}"));
        let db = dir.join("s.db");
        let open = || {
            SqliteStore::open_file(whispeer_relay::config::StoreConfig {
                path: db.clone(),
                tenant_max_bytes: 0,
                tenant_max_messages: 0,
                total_max_bytes: 0,
                total_max_messages: 0,
                min_free_bytes: 0,
                ..Config::ephemeral().store
            })
            .expect("open store")
        };
        let store = open();
        store.close();
        drop(store);
        let empty = used_bytes(&db);
        let store = open();
        store_messages(&store, n, len, 100, |_| {});
        let (st, wal) = (store.status_counts(), {
            let mut w = db.as_os_str().to_owned();
            w.push("-wal");
            std::path::PathBuf::from(w)
        });
        let running = file_len(&db) + file_len(&wal);
        store.close();
        drop(store);
        let used = used_bytes(&db) - empty;
        report.push(format!(
            "{len:>6} B x {n:>6} + {:>3} retained: envelopes {:>9}, pages used {used:>9} \
             ({:.2}x), counted {:>9} ({:.2}x the pages); file + WAL while running {running} \
             ({:.2}x)",
            st.retained,
            st.bytes,
            used as f64 / st.bytes as f64,
            st.quota_bytes,
            st.quota_bytes as f64 / used as f64,
            running as f64 / st.bytes as f64,
        ));
        assert!(
            used <= st.quota_bytes,
            "{len}-byte envelopes: {used} bytes of pages, {} counted",
            st.quota_bytes
        );
        assert!(
            st.quota_bytes <= used + used / 5,
            "{len}-byte envelopes: {} counted, over 1.2x the {used} bytes of pages",
            st.quota_bytes
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", report.join("\n"));
}

/// Found measuring the disk cost (review finding 1's follow-up): while publishes stream in
/// back to back, the background PASSIVE checkpoint copies pages but never catches up with
/// the WAL's end, so the WAL never restarts and grows with the flood — 67 MB for 9.6 MB of
/// 160-byte envelopes, beside a 13 MB file. The writer now checkpoints and truncates it
/// between two commits once it passes 64 MiB. 250,000 × 160-byte envelopes (40 MB) in one
/// flood: the WAL never passes twice that (its size sampled every 1,000 appends).
#[test]
fn the_wal_stays_bounded_during_a_flood() {
    let dir = temp_dir("wal-bound");
    let db = dir.join("s.db");
    let wal = dir.join("s.db-wal");
    let store = SqliteStore::open_file(whispeer_relay::config::StoreConfig {
        path: db.clone(),
        tenant_max_bytes: 0,
        tenant_max_messages: 0,
        min_free_bytes: 0,
        ..Config::ephemeral().store
    })
    .expect("open store");
    let mut peak = 0;
    store_messages(&store, 250_000, 160, 100, |i| {
        if i % 1000 == 0 {
            peak = peak.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
    });
    peak = peak.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    let m = store.metrics();
    println!(
        "WAL peak {peak} bytes, {} truncations, file {} bytes",
        m.wal_truncations,
        std::fs::metadata(&db).unwrap().len()
    );
    // The size bound only: whether a truncation was needed depends on whether the
    // background checkpoint ever caught up with the flood (machine-dependent).
    assert!(peak <= 128 << 20, "the WAL grew to {peak} bytes");
    store.close();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits for `turns` more turns of the store's writer (each a commit, a sweep, a failure or,
/// while the store is down, one recovery attempt per `retry_ms`), running `each` after
/// every one: an event to wait on, not a sleep.
async fn each_writer_turn<F, Fut>(store: &SqliteStore, turns: usize, mut each: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut changes = store.changes();
    changes.borrow_and_update();
    for _ in 0..turns {
        tokio::time::timeout(TIMEOUT, changes.changed())
            .await
            .expect("the writer turns while the store is down")
            .expect("store open");
        each().await;
    }
}

/// Finding (adversarial review, suspected): while the disk was full the store retried a
/// one-row probe commit every `retry_ms`; the probe fits in room a batch does not (WAL
/// frames and free pages the file system already gave SQLite), so the store resumed,
/// reloaded its counters with a full scan, took the next publishes, failed their commit
/// and went down again — as long as the disk stayed full (seen: 2 more failed commits in
/// 40 retry periods, the store `ok` between them). Now it resumes only once
/// `store.min_free_bytes` is free. On a real 32 MiB tmpfs: a filler file written first, the
/// writer held (SQLite's write lock taken by another connection) while a batch larger than
/// the WAL is queued, the rest of the disk filled, the writer let go — its commit meets the
/// full disk. Then a publisher retries once per recovery attempt for 40 attempts while the
/// disk stays full: no commit may fail again and the store must not resume. Then the filler
/// goes, the store resumes by itself, and every acknowledged message replays.
///
/// "Stays full" means below the reserve even after the store gives back its own room: while
/// down, an idle writer turn truncates the WAL (600–800 KiB here before the fill), and with
/// a 256 KiB reserve that alone let the store resume, rightly, and store the next publish
/// (this test failed about 1 run in 4 under load, "a publish went through on a full disk").
/// The reserve is now 4 MiB, several times what the WAL holds (asserted before the fill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_does_not_flap_and_recovers_with_every_acknowledged_message() {
    const MIN_FREE: u64 = 4 << 20;
    let Some(disk) = SmallDisk::mount_mib("diskflap", 32) else {
        // Mounting needs root (CI runs the suite as root); say so rather than pass quietly.
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    let filler = disk.dir.join("filler");
    std::fs::write(&filler, vec![0x5au8; 6 << 20]).unwrap();
    let db = disk.dir.join("s.db");
    let mut config = file_config(&db);
    config.store.retry_ms = 20;
    config.store.min_free_bytes = MIN_FREE;
    let (store, relay) = file_relay(config).await;
    let mut p = client_from("127.0.0.2", relay.tcp()).await;
    let mut acked: Vec<u64> = Vec::new();
    for i in 0..5 {
        let r = publish_one(
            &mut p,
            env_on(KA, 1, i, 1024),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "{r:?}");
        acked.push(i);
    }

    // The writer is held while a batch larger than the WAL is queued (a Ping after each
    // publish tells it was handled: queued, or refused by the reserve), so its commit needs
    // room the file system has not given SQLite yet.
    let wal = disk.dir.join("s.db-wal");
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut queued = Vec::new();
    let mut i = 5u64;
    while (queued.len() as u64) * 16 * 1024 <= std::fs::metadata(&wal).unwrap().len() + 65536 {
        p.send(&pub_qos(
            env_on(KA, 1, i, 16 * 1024),
            Qos::AtLeastOnce,
            Some(pid(i, 1)),
            false,
        ))
        .await;
        p.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce: i }))
            .await;
        match p.recv().await {
            Frame::Pong(g) if g.nonce == i => {}
            Frame::Err(e) => panic!("the batch does not fit the reserve: {e:?}"),
            other => panic!("unexpected {other:?}"),
        }
        queued.push(i);
        i += 1;
    }
    // What the WAL can give back when the store truncates it while down (all of it, at
    // most, with the failed batch's frames cut short by the full disk) must stay well
    // under the reserve, or the disk does not stay full in the sense the test means.
    let wal_now = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_now * 2 < MIN_FREE,
        "the WAL ({wal_now} bytes) could free the reserve by itself"
    );
    let _rest = disk.fill("rest");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let mut answered = 0;
    while answered < queued.len() {
        match p.recv().await {
            Frame::PubAck(a) => {
                acked.push(u64::from_le_bytes(a.publish_id[..8].try_into().unwrap()));
                answered += 1;
            }
            Frame::Err(e) => {
                assert_eq!(e.code, ErrorCode::StorageFull, "{e:?}");
                answered += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let failures = store.metrics().commit_failures;
    assert!(
        failures >= 1,
        "the batch's commit did not meet the full disk"
    );
    assert_eq!(store.status().state, "storage_full");

    // The disk stays full: a publisher retries once per recovery attempt.
    let p = tokio::sync::Mutex::new(p);
    let next = std::sync::atomic::AtomicU64::new(i);
    let states = std::sync::Mutex::new(std::collections::BTreeSet::new());
    each_writer_turn(&store, 40, || async {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let r = publish_one(
            &mut *p.lock().await,
            env_on(KA, 1, n, 1024),
            Qos::AtLeastOnce,
            pid(n, 1),
            false,
        )
        .await;
        match r {
            Answer::Refused(code, m) => assert_eq!(code, ErrorCode::StorageFull, "{m}"),
            other => panic!("a publish went through on a full disk: {other:?}"),
        }
        states.lock().unwrap().insert(store.status().state);
    })
    .await;
    let flaps = store.metrics().commit_failures - failures;
    assert_eq!(
        flaps, 0,
        "the store resumed and failed again {flaps} times while the disk stayed full"
    );
    assert_eq!(
        states.into_inner().unwrap().into_iter().collect::<Vec<_>>(),
        vec!["storage_full".to_string()],
        "the store resumed (and rescanned its file) while the disk stayed full"
    );

    // Space frees: the store resumes by itself; nothing fails after it.
    std::fs::remove_file(&filler).unwrap();
    wait_until(&store, "the store to resume", || {
        store.status().state == "ok"
    })
    .await;
    let mut p = p.into_inner();
    let from = next.into_inner();
    for i in from..from + 5 {
        let r = publish_one(
            &mut p,
            env_on(KA, 1, i, 1024),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "after the disk freed: {r:?}");
        acked.push(i);
    }
    assert_eq!(store.metrics().commit_failures, failures);
    // Every acknowledged message is in the history.
    let mut r = client_from("127.0.0.4", relay.tcp()).await;
    let got: std::collections::HashSet<u64> = replay_all(&mut r, 1, all_of(KA))
        .await
        .into_iter()
        .collect();
    for a in &acked {
        assert!(got.contains(a), "acknowledged message {a} lost");
    }
    println!(
        "{} acknowledged (batch of {} x 16 KiB met the full disk), {failures} failed commit(s)",
        acked.len(),
        queued.len()
    );
    relay.stop().await;
    drop(store);
    drop(disk);
}

/// Finding (adversarial review): nothing kept the disk from filling — SQLite met ENOSPC
/// and the store went down (every publisher refused, its counters rescanned at recovery)
/// even with the quotas sized to the disk, since the WAL grows beyond what they count. With
/// `store.min_free_bytes`, on a real 8 MiB tmpfs: QoS 1 publishes until the first refusal,
/// which is the reserve's `storage_full` (retryable, names the setting) and no commit
/// ever failed; the reserve is visible (`/status` state `low_disk` and `disk_free_bytes`,
/// `/metrics`); once space frees, publishes are stored again and every acknowledged one
/// replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_free_space_reserve_refuses_publishes_before_the_disk_is_full() {
    let Some(disk) = SmallDisk::mount("diskreserve") else {
        // Mounting needs root (CI runs the suite as root); say so rather than pass quietly.
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    let filler = disk.dir.join("filler");
    std::fs::write(&filler, vec![0x5au8; 1 << 20]).unwrap();
    let mut config = file_config(&disk.dir.join("s.db"));
    const MIN: u64 = 1 << 20;
    config.store.min_free_bytes = MIN;
    let (store, relay) = file_relay(config).await;
    let mut p = client_from("127.0.0.2", relay.tcp()).await;
    let mut acked: Vec<u64> = Vec::new();
    let (mut i, refused) = publish_until_refused(
        &mut p,
        (KA, 1, 1),
        (0, 1024),
        &mut acked,
        20_000,
        "the reserve never applied",
    )
    .await;
    assert_eq!(refused.0, ErrorCode::StorageFull, "{}", refused.1);
    assert!(refused.1.contains("store.min_free_bytes"), "{}", refused.1);
    let m = store.metrics();
    assert_eq!(m.commit_failures, 0, "SQLite met the full disk");
    assert!(m.low_disk_rejections >= 1);
    // The free figure the refusal was decided on (its message says it): the store's status
    // may already show more — it truncates its WAL on idle turns while space is low (this
    // read the status before, and failed when that truncation came first).
    let free: u64 = refused
        .1
        .split("has ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no free figure in {:?}", refused.1));
    assert!(free < MIN + 4096, "refused with {free} bytes free");
    println!(
        "{} x 1 KiB acknowledged, then refused with {free} bytes free",
        acked.len()
    );
    // Another process takes more of the disk (not all of it): the store says so. What it
    // takes is measured on the file system at the time, not from the store's last figure:
    // on idle turns while space is low the store truncates its WAL, which can give room
    // back after that figure (this step then failed ~1 run in 3 of the whole file: the
    // store saw the WAL's room free again and never went low). Taken again each turn of
    // the store's writer until it says so.
    let more = disk.dir.join("more");
    let mut taken = std::fs::File::create(&more).unwrap();
    let mut turns = store.changes();
    tokio::time::timeout(TIMEOUT, async {
        while store.status().state != "low_disk" {
            let fs = rustix::fs::statvfs(&disk.dir)
                .map(|v| v.f_bavail * v.f_frsize)
                .expect("statvfs");
            if fs > MIN / 4 {
                use std::io::Write;
                taken
                    .write_all(&vec![0x5au8; (fs - MIN / 4) as usize])
                    .unwrap();
            }
            turns.changed().await.expect("store open");
        }
    })
    .await
    .expect("the store to see the low disk");
    let text = relay
        .handle
        .metrics()
        .render_store_prometheus("sqlite", &store.metrics());
    assert!(
        text.contains("whispeer_relay_store_low_disk_rejections_total ")
            && text.contains("whispeer_relay_store_disk_free_bytes "),
        "{text}"
    );
    // Space frees: publishes are stored again, and nothing ever failed.
    drop(taken);
    std::fs::remove_file(&more).unwrap();
    std::fs::remove_file(&filler).unwrap();
    wait_until(&store, "the store to see the room", || {
        store.status().state == "ok"
    })
    .await;
    for _ in 0..20 {
        i += 1;
        let r = publish_one(
            &mut p,
            env_on(KA, 1, i, 1024),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await;
        assert!(matches!(r, Answer::Acked(_)), "{r:?}");
        acked.push(i);
    }
    assert_eq!(store.metrics().commit_failures, 0);
    let mut r = client_from("127.0.0.4", relay.tcp()).await;
    assert_eq!(replay_all(&mut r, 1, all_of(KA)).await, acked);
    relay.stop().await;
    drop(store);
    drop(disk);
}

/// Free bytes of the file system holding `dir` (`stat -f`: available blocks × block size).
fn fs_free(dir: &Path) -> u64 {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .expect("stat -f");
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("a number"));
    it.next().expect("blocks") * it.next().expect("block size")
}

/// Appends one QoS 1 message of `len` bytes on its own path (`i`); the store's answer.
fn append_qos1(store: &SqliteStore, i: u64, len: usize) -> Result<Accepted, StoreError> {
    let mut k = [7u8; 16];
    k[..8].copy_from_slice(&i.to_le_bytes());
    let env = env_of_len(KeyId::from_bytes(k), i, len);
    store.append(Append {
        path: &env.token_path(),
        envelope: &env,
        flags: 0,
        qos: Qos::AtLeastOnce,
        publish_id: None,
        tenant: &Tenant::Local,
    })
}

/// Waits (bounded) until everything appended to `store` so far is committed.
async fn all_durable(store: &SqliteStore) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.when_durable(
        store.last_seq(),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    tokio::time::timeout(TIMEOUT, rx)
        .await
        .expect("durable in time")
        .expect("answered")
        .expect("committed");
}

/// Finding (review F-C): the store file has no auto_vacuum, so the pages retention and
/// expiry free stay in the file (its free list) and the file system's free space never
/// rises; a store file that itself ate into `store.min_free_bytes` stayed `low_disk` — every
/// stored publish refused — for good, although the file had room to write into. Now the
/// file's free pages count as free space. On a real 8 MiB tmpfs: 1.25 MiB of 256 KiB messages
/// stored, the store closed (its WAL checkpointed away), a filler leaving half the reserve
/// free, the store reopened: `low_disk`, publishes refused; every message expires (injected
/// clock past `max_age_ms`): the store is `ok` again and a publish is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_make_room_inside_the_file_for_new_ones() {
    let Some(disk) = SmallDisk::mount("diskreuse") else {
        // Mounting needs root (CI runs the suite as root); say so rather than pass quietly.
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    const MIN: u64 = 1 << 20;
    const LEN: usize = 256 << 10;
    let mut config = file_config(&disk.dir.join("s.db"));
    config.store.min_free_bytes = MIN;
    config.store.max_age_ms = 60_000;
    config.store.tenant_max_bytes = 0;
    config.store.tenant_max_messages = 0;
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = {
        let now = now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    // Filled without the reserve (each small commit adds pages to the WAL, which only the
    // close below gives back).
    let store = SqliteStore::open_file_with_clock(
        whispeer_relay::config::StoreConfig {
            min_free_bytes: 0,
            ..config.store.clone()
        },
        clock.clone(),
    )
    .unwrap();
    for i in 0..5 {
        let r = append_qos1(&store, i, LEN);
        assert!(matches!(r, Ok(Accepted::New(_))), "message {i}: {r:?}");
    }
    all_durable(&store).await;
    store.close();
    drop(store);
    // Another file takes the rest of the disk but half the reserve.
    let filler = disk.dir.join("filler");
    std::fs::write(
        &filler,
        vec![0x5au8; (fs_free(&disk.dir) - MIN / 2) as usize],
    )
    .unwrap();
    let store = SqliteStore::open_file_with_clock(config.store.clone(), clock).unwrap();
    assert_eq!(store.status().state, "low_disk");
    let r = append_qos1(&store, 100, LEN);
    assert!(
        matches!(&r, Err(e) if e.code() == ErrorCode::StorageFull),
        "{r:?}"
    );
    // Every message expires; the file keeps their pages as free pages.
    now.fetch_add(120_000, Ordering::SeqCst);
    wait_until(&store, "the store to expire its messages", || {
        store.status_counts().messages == 0
    })
    .await;
    wait_until(&store, "the store to count its free pages as room", || {
        store.status().state == "ok"
    })
    .await;
    let free = fs_free(&disk.dir);
    assert!(free < MIN, "the file system itself has {free} bytes free");
    // (Smaller than the file system's own free space: the WAL's copy goes there.)
    let r = append_qos1(&store, 101, 16 << 10);
    assert!(matches!(r, Ok(Accepted::New(_))), "{r:?}");
    all_durable(&store).await;
    assert_eq!(store.metrics().commit_failures, 0);
    store.close();
    drop(store);
    drop(disk);
}

/// A [`SqliteStore`] that logs which key id each history read is for, in the order the
/// store-reader thread runs them, and whose first replay plan of `gate_key` stops the
/// reader thread until the test opens the gate (so everything queued meanwhile is ordered
/// by the reader's queue alone).
#[derive(Debug)]
struct GatedStore {
    inner: Arc<SqliteStore>,
    gate_key: KeyId,
    /// Taken by the gate read: tells the test it runs, then waits for the gate to open
    /// (or its sender to drop, should the test fail).
    gate: std::sync::Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            std::sync::mpsc::Receiver<()>,
        )>,
    >,
    /// (first byte of the key id, "plan" / "read" / "retained", whether `watched` had a
    /// read queued when this one started), in run order.
    log: std::sync::Mutex<Vec<(u8, &'static str, bool)>>,
    /// The tenant whose waiting the log records.
    watched: std::sync::Mutex<Option<Tenant>>,
}

impl GatedStore {
    fn note(&self, key: &KeyId, what: &'static str) {
        let waiting = self
            .watched
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|t| whispeer_relay::store::reads().queued_for(t) > 0);
        self.log
            .lock()
            .unwrap()
            .push((key.as_bytes()[0], what, waiting));
    }
}

impl Store for GatedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn append(
        &self,
        msg: whispeer_relay::store::Append<'_>,
    ) -> Result<whispeer_relay::store::Accepted, whispeer_relay::store::StoreError> {
        self.inner.append(msg)
    }
    fn last_seq(&self) -> whispeer_relay::Seq {
        self.inner.last_seq()
    }
    fn seq_space(&self) -> [u8; 16] {
        self.inner.seq_space()
    }
    fn when_durable(&self, seq: whispeer_relay::Seq, done: whispeer_relay::store::OnDurable) {
        self.inner.when_durable(seq, done)
    }
    fn when_sequenced(&self, ticket: u64, done: whispeer_relay::store::OnSequenced) {
        self.inner.when_sequenced(ticket, done)
    }
    fn advance(&self, seq: whispeer_relay::Seq) {
        self.inner.advance(seq)
    }
    fn take_sequenced(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<whispeer_relay::store::Sequenced>> {
        self.inner.take_sequenced()
    }
    fn when_readable(
        &self,
        key_id: &KeyId,
        upto: whispeer_relay::Seq,
        done: whispeer_relay::store::OnDurable,
    ) {
        self.inner.when_readable(key_id, upto, done)
    }
    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: whispeer_relay::Seq,
    ) -> Result<whispeer_relay::store::ReadPlan, whispeer_relay::store::StoreError> {
        self.note(pattern.key_id(), "plan");
        if *pattern.key_id() == self.gate_key {
            let gate = self.gate.lock().unwrap().take();
            if let Some((entered, open)) = gate {
                let _ = entered.send(());
                let _ = open.recv();
            }
        }
        self.inner.plan(pattern, replay, upto)
    }
    fn read(
        &self,
        pattern: &TokenPattern,
        plan: &whispeer_relay::store::ReadPlan,
        from: u64,
        upto: whispeer_relay::Seq,
    ) -> Result<whispeer_relay::store::ReadChunk, whispeer_relay::store::StoreError> {
        self.note(pattern.key_id(), "read");
        self.inner.read(pattern, plan, from, upto)
    }
    fn retained(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: whispeer_relay::Seq,
    ) -> Result<whispeer_relay::store::ReadChunk, whispeer_relay::store::StoreError> {
        self.note(pattern.key_id(), "retained");
        self.inner.retained(pattern, from, upto)
    }
    fn durable(
        &self,
        key: &whispeer_relay::store::DurableKey,
    ) -> Result<Option<u64>, whispeer_relay::store::StoreError> {
        self.inner.durable(key)
    }
    fn set_durable(
        &self,
        key: &whispeer_relay::store::DurableKey,
        floor: u64,
        tenant: &Tenant,
    ) -> Result<(), whispeer_relay::store::StoreError> {
        self.inner.set_durable(key, floor, tenant)
    }
    fn claim_key(
        &self,
        key_id: &whispeer_protocol::KeyId,
        group: &str,
        create: bool,
    ) -> Result<whispeer_relay::store::Claim, whispeer_relay::store::StoreError> {
        self.inner.claim_key(key_id, group, create)
    }

    fn durable_owner(
        &self,
        key: &whispeer_relay::store::DurableKey,
        owner: Option<&str>,
    ) -> Result<bool, whispeer_relay::store::StoreError> {
        self.inner.durable_owner(key, owner)
    }
    fn delete_durable(
        &self,
        key: &whispeer_relay::store::DurableKey,
    ) -> Result<bool, whispeer_relay::store::StoreError> {
        self.inner.delete_durable(key)
    }
    fn take_gone(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<whispeer_relay::store::DurableKey>> {
        self.inner.take_gone()
    }
    fn status(&self) -> whispeer_relay::store::StoreStatus {
        self.inner.status()
    }
    fn metrics(&self) -> whispeer_relay::store::StoreMetrics {
        self.inner.metrics()
    }
    fn close(&self) {
        self.inner.close()
    }
}

/// Store reads are served fairly per tenant: while one tenant (a source address) has a
/// full queue of replay reads — 1,024 queued, 8 more refused with the retryable `busy` —
/// each read of another tenant's replay waits for at most 2 of them (the running one and
/// the one whose turn comes first), not for the backlog. Before, the reader's single FIFO
/// ran the other tenant's replay after all 1,024.
/// The reader is held in a gated read until both tenants' reads are queued, so the order
/// is the queue's alone; the log is the order the real SQLite store was read in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_replay_flood_delays_anothers_replay_by_a_bounded_count_of_reads() {
    // This test stops the process's reader thread for a moment: the test timing a replay
    // must not run meanwhile.
    let _alone = READER.lock().await;
    const KG: [u8; 16] = [0xd4; 16];
    const A_MSGS: u64 = 4;
    const B_MSGS: u64 = 5;
    let cap = whispeer_relay::store::MAX_QUEUED_READS_PER_TENANT as u64;
    let flood = cap + 8;
    let dir = temp_dir("fair-reads");
    let mut config = file_config(&dir.join("s.db"));
    config.limits.max_subscriptions = 10_000;
    config.limits.sub_rate = 0;
    config.limits.addr_sub_rate = 0;
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (open, gate) = std::sync::mpsc::channel::<()>();
    let store = Arc::new(GatedStore {
        inner: Arc::new(SqliteStore::open_file(config.store.clone()).unwrap()),
        gate_key: KeyId::from_bytes(KG),
        gate: std::sync::Mutex::new(Some((entered_tx, gate))),
        log: Default::default(),
        watched: Default::default(),
    });
    let listeners = whispeer_relay::Listeners::bind(&config).await.unwrap();
    let relay = TestRelay::run(
        Relay::builder(config)
            .listeners(listeners)
            .store(store.clone())
            .build()
            .unwrap(),
    );
    let addr = relay.tcp();
    // Stored history of both trees (tenant A reads key A's, tenant B key B's).
    let mut p = client_from("127.0.2.4", addr).await;
    for i in 0..A_MSGS.max(B_MSGS) {
        for (key, n, salt) in [(KA, A_MSGS, 0xa), (KB, B_MSGS, 0xb)] {
            if i < n {
                let r = publish_one(
                    &mut p,
                    env_on(key, 1, i, 128),
                    Qos::AtLeastOnce,
                    pid(i, salt),
                    false,
                )
                .await;
                assert!(matches!(r, Answer::Acked(_)), "{r:?}");
            }
        }
    }

    // The gate: a replay whose plan read stops the reader thread.
    let mut g = client_from("127.0.2.1", addr).await;
    g.send(&sub(1, all_of(KG), Some(Replay::FromSeq(0)), false))
        .await;
    tokio::time::timeout(TIMEOUT, entered)
        .await
        .expect("the gate read runs")
        .unwrap();

    // Tenant A floods replaying Subs: 1,024 reads queue, the rest are refused `busy`.
    let mut a = client_from("127.0.2.2", addr).await;
    for id in 1..=flood {
        a.send(&sub(id, all_of(KA), Some(Replay::FromSeq(0)), false))
            .await;
    }
    let (mut sub_oks, mut refused, mut done_a) = (0u64, Vec::new(), Vec::new());
    while sub_oks < flood || (refused.len() as u64) < flood - cap {
        match a.recv().await {
            Frame::SubOk(_) => sub_oks += 1,
            Frame::Err(e) => {
                assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
                assert!(!e.fatal && e.code.is_retryable(), "{e:?}");
                refused.push(e.sub_id.expect("the Err names the Sub"));
            }
            Frame::ReplayDone(d) => done_a.push((d.sub_id, d.count)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let tenant_a = Tenant::from_peer(Some("127.0.2.2:1".parse().unwrap()), 64);
    let reads = whispeer_relay::store::reads();
    assert_eq!(
        reads.queued_for(&tenant_a) as u64,
        cap,
        "tenant A's queue is full"
    );

    // Tenant B's one replay queues behind A's full queue.
    let tenant_b = Tenant::from_peer(Some("127.0.2.3:1".parse().unwrap()), 64);
    let mut b = client_from("127.0.2.3", addr).await;
    *store.watched.lock().unwrap() = Some(tenant_b.clone());
    let mut changes = reads.changes();
    b.send(&sub(1, all_of(KB), Some(Replay::FromSeq(0)), false))
        .await;
    tokio::time::timeout(
        TIMEOUT,
        changes.wait_for(|_| reads.queued_for(&tenant_b) == 1),
    )
    .await
    .expect("tenant B's replay read is queued")
    .unwrap();
    assert_eq!(reads.queued_for(&tenant_a) as u64, cap);

    // The gate opens: B's replay completes, in full.
    open.send(()).unwrap();
    let mut got = Vec::new();
    let count = loop {
        match b.recv().await {
            Frame::SubOk(_) => {}
            Frame::Msg(m) => {
                assert!(m.flags & msg_flags::REPLAYED != 0);
                got.push(index_of(&m.envelope));
            }
            Frame::ReplayDone(d) => break d.count,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got, (0..B_MSGS).collect::<Vec<_>>());
    assert_eq!(count, B_MSGS);
    let log = store.log.lock().unwrap().clone();
    let gate_at = log.iter().position(|e| e.0 == KG[0]).unwrap();
    let after = &log[gate_at + 1..];
    let b_last = after
        .iter()
        .rposition(|e| e.0 == KB[0])
        .expect("B's reads are logged");
    let b_reads: Vec<_> = after[..=b_last]
        .iter()
        .filter(|e| e.0 == KB[0])
        .map(|e| e.1)
        .collect();
    assert_eq!(b_reads, ["plan", "read"], "{after:?}");
    // Both were queued when the gate opened: one of A's reads, then B's plan.
    assert_eq!(after[0].0, KA[0], "{:?}", &after[..2]);
    assert_eq!(after[1].0, KB[0], "{:?}", &after[..2]);
    // Each of B's reads waited for at most two of A's once queued: the one whose turn came
    // first and, counted when it started just before B's read was queued, the one running.
    // (Between its plan and its chunk read B has nothing queued: reads of A that run while
    // B's task turns the plan into the next read wait for nobody.)
    let a_while_b_waited = after[..b_last]
        .iter()
        .filter(|e| e.0 == KA[0] && e.2)
        .count();
    let a_before = after[..b_last].iter().filter(|e| e.0 == KA[0]).count();
    println!(
        "tenant B's replay (2 reads) waited for {a_while_b_waited} of tenant A's {cap} queued \
         reads ({a_before} of A's ran before B's last read)"
    );
    assert!(
        a_while_b_waited <= 4,
        "tenant B's replay waited for {a_while_b_waited} of tenant A's reads: {:?}",
        &after[..=b_last]
    );

    // The flood's admitted replays complete too, each in full; the refused ones got
    // `ReplayDone` with nothing (after their `Err`).
    while (done_a.len() as u64) < flood {
        match a.recv().await {
            Frame::ReplayDone(d) => done_a.push((d.sub_id, d.count)),
            Frame::Msg(_) | Frame::SubOk(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    for (id, n) in &done_a {
        let want = if refused.contains(id) { 0 } else { A_MSGS };
        assert_eq!(*n, want, "sub {id}");
    }
    assert!(matches!(g.recv().await, Frame::SubOk(_)));
    assert!(matches!(g.recv().await, Frame::ReplayDone(_)));
    assert!(reads.status().refused >= flood - cap);
    drop((a, b, g, p));
    relay.stop().await;
}

/// A path (or key id) row left in the file without any message or retained value — the
/// batch that created it committed, the one with its message did not (a full disk splits a
/// publish across two batches), or the relay stopped between them — does not break the
/// store: before, the next publish to that path inserted the row again, the UNIQUE
/// constraint failed the whole batch (every tenant's writes in it) and reloading brought
/// the same state back, for every publish to it, across restarts.
#[tokio::test]
async fn a_path_row_left_without_messages_does_not_break_later_commits() {
    let dir = temp_dir("orphan-path");
    let path = dir.join("s.db");
    let config = file_config(&path);
    let (store, relay) = file_relay(config.clone()).await;
    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    let r = publish_one(
        &mut a,
        env_on(KA, 1, 0, 100),
        Qos::AtLeastOnce,
        pid(0, 1),
        false,
    )
    .await;
    assert!(matches!(r, Answer::Acked(_)), "{r:?}");
    drop(a);
    relay.stop().await;
    store.close();
    drop(store);
    // The message goes; its path and key id rows stay.
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute("DELETE FROM msgs", []).unwrap();
        let rows: i64 = db
            .query_row("SELECT count(*) FROM paths", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }
    let (store, relay) = file_relay(config).await;
    let mut a = client_from("127.0.0.2", relay.tcp()).await;
    for i in 1..4 {
        let r = publish_one(
            &mut a,
            env_on(KA, 1, i, 100),
            Qos::AtLeastOnce,
            pid(i, 1),
            false,
        )
        .await;
        assert!(
            matches!(r, Answer::Acked(_)),
            "publish {i} to the same path: {r:?}"
        );
    }
    let mut b = client_from("127.0.0.3", relay.tcp()).await;
    assert_eq!(replay_all(&mut b, 9, all_of(KA)).await, vec![1, 2, 3]);
    relay.stop().await;
    store.close();
}

/// Appends `n` QoS 1 messages on `[key, tok(1)]` (indexes 0..n) straight to the store and
/// waits until the last is durable; returns their sequences, by index.
fn stored_history(store: &SqliteStore, key: [u8; 16], n: u64) -> Vec<u64> {
    let tenant = Tenant::Local;
    let seqs: Vec<u64> = (0..n)
        .map(|i| {
            let env = env_on(key, 1, i, 32);
            match store.append(Append {
                path: &env.token_path(),
                envelope: &env,
                flags: 0,
                qos: Qos::AtLeastOnce,
                publish_id: None,
                tenant: &tenant,
            }) {
                Ok(Accepted::New(s)) => s.0,
                other => panic!("append {i}: {other:?}"),
            }
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    store.when_durable(store.last_seq(), Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(TIMEOUT)
        .expect("durable in time")
        .expect("committed");
    seqs
}

/// A QoS 1 durable `Sub` `name` for everything under `key`, with credit 4096.
fn durable_sub(sub_id: u64, key: [u8; 16], name: &str, replay: Option<Replay>) -> Frame {
    Frame::Sub(Sub {
        sub_id,
        pattern: all_of(key),
        qos: Qos::AtLeastOnce,
        durable: Some(name.into()),
        replay,
        retained: false,
        credit: Some(4096),
        owner: None,
    })
}

/// Durable `name`'s floor in the store file, read by a connection of the test's own (what
/// the writer has committed); None: no such row.
fn floor_on_disk(db: &Path, name: &str) -> Option<u64> {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT floor FROM durables WHERE name = ?1", [name], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .unwrap()
    .map(|f| f as u64)
}

/// Reads durable subscription `sub_id`'s replay up to its `ReplayDone` (after its `SubOk`),
/// acknowledging the first `ack` messages one `Ack` each; returns the messages' indexes
/// and sequences. Other subscriptions' frames are not expected.
async fn replay_acking(c: &mut Client, sub_id: u64, ack: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    loop {
        match c.recv().await {
            Frame::SubOk(ok) => assert_eq!(ok.sub_id, sub_id),
            Frame::Msg(m) => {
                assert_eq!(m.sub_id, Some(sub_id));
                if got.len() < ack {
                    c.send(&Frame::Ack(Ack { seqs: vec![m.seq] })).await;
                }
                got.push((index_of(&m.envelope), m.seq));
            }
            Frame::ReplayDone(d) if d.sub_id == sub_id => {
                assert_eq!(d.count, got.len() as u64);
                return got;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Sends a `Ping` and reads up to its `Pong` (the relay handles a connection's frames in
/// order: everything sent before has been handled); other frames are skipped.
async fn round_trip(c: &mut Client, nonce: u64) {
    c.send(&Frame::Ping(whispeer_protocol::frame::Ping { nonce }))
        .await;
    loop {
        if let Frame::Pong(p) = c.recv().await {
            if p.nonce == nonce {
                return;
            }
        }
    }
}

fn floors_config(db: &Path) -> Config {
    let mut config = file_config(db);
    // The client acks as fast as it reads (the ack rate limits are not what is tested,
    // and the writer is held for less than its 5 s busy timeout).
    config.limits.ack_rate = 0;
    config.limits.addr_ack_rate = 0;
    config
}

/// Finding (review, Medium-High): every `Ack` that moved a durable's floor queued one
/// SQLite UPSERT, uncounted by the write queue's bounds (65,536 messages, 64 MiB) and never
/// merged: a client replaying a stored history into a durable and acking each message on
/// its own (`Ack{seqs:[s]}`, 100,000/s per address) grew the queue without bound while
/// the disk lagged, and QoS ≥ 1 `PubAck`s waited behind it. Now a durable's newest floor
/// waits merged, one per durable. With the writer stuck (the test holds SQLite's write
/// lock), 20,000 replayed messages acked one by one leave no operation queued and one
/// floor waiting; once the lock goes the writer writes it once (at most 2 writes in all:
/// the first floor, which woke the writer, and the merged last), the file holds the last
/// ack's floor, and the durable resumes right after it — on the same relay and on a new
/// relay over the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_moving_a_durables_floor_wait_merged_while_the_writer_is_stuck() {
    const N: u64 = 20_000;
    const ACKED: usize = N as usize - 10;
    let dir = temp_dir("floors");
    let db = dir.join("s.db");
    let config = floors_config(&db);
    let (store, relay) = file_relay(config.clone()).await;
    let seqs = stored_history(&store, KA, N);
    let mut s = client_from("127.0.0.2", relay.tcp()).await;
    s.send(&durable_sub(1, KA, "d1", Some(Replay::FromSeq(0))))
        .await;
    // The durable's row is on disk before the writer is held.
    wait_until(&store, "d1 on disk", || floor_on_disk(&db, "d1") == Some(0)).await;
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let before = store.metrics();
    let got = replay_acking(&mut s, 1, ACKED).await;
    assert_eq!(got.len() as u64, N, "the whole history replays");
    round_trip(&mut s, 1).await;
    assert_eq!(
        store.metrics().commits,
        before.commits,
        "the writer was stuck throughout"
    );
    let (ops, floors) = store.queued_writes();
    assert_eq!(
        ops, 0,
        "{ACKED} acks moved the floor: nothing is queued for them ({floors} floors wait)"
    );
    assert!(floors <= 1, "one floor per durable waits, not {floors}");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let last = seqs[ACKED - 1];
    assert_eq!(got[ACKED - 1], (ACKED as u64 - 1, last));
    wait_until(&store, "the last ack's floor on disk", || {
        floor_on_disk(&db, "d1") == Some(last)
    })
    .await;
    let written = store.metrics().batch_sum - before.batch_sum;
    assert!(
        written <= 2,
        "the floor was written once merged: {written} writes"
    );
    // The durable resumes right after its last acknowledged message.
    s.send(&Frame::Unsub(Unsub {
        sub_id: 1,
        delete: None,
    }))
    .await;
    s.send(&durable_sub(2, KA, "d1", None)).await;
    let again = replay_acking(&mut s, 2, 0).await;
    assert_eq!(again, got[ACKED..].to_vec(), "resumes after the floor");
    drop(s);
    relay.stop().await;
    store.close();
    drop(store);
    // And from the file, on a new relay.
    assert_eq!(floor_on_disk(&db, "d1"), Some(last));
    let (store, relay) = file_relay(config).await;
    let mut s = client_from("127.0.0.2", relay.tcp()).await;
    s.send(&durable_sub(1, KA, "d1", None)).await;
    let again = replay_acking(&mut s, 1, 0).await;
    assert_eq!(
        again,
        got[ACKED..].to_vec(),
        "resumes after the floor on disk"
    );
    drop(s);
    relay.stop().await;
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The merged floors keep their order against deletions: with the writer stuck, durables
/// "gone" and "again" each have 2,000 acks merged (a floor waiting for each), then both are
/// deleted (`Unsub {delete}`) and "again" is created anew from the start (floor 0). The
/// queue holds the two deletions and the creation, and no floor (the deletions took them):
/// once the lock goes "gone" stays deleted — its waiting floor does not bring it back — and
/// the new "again" keeps floor 0, not the old one's; after a restart too, where the new
/// "again" replays the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_deleted_while_its_merged_floor_waits_stays_deleted() {
    const N: u64 = 2_000;
    let dir = temp_dir("floors-delete");
    let db = dir.join("s.db");
    let config = floors_config(&db);
    let (store, relay) = file_relay(config.clone()).await;
    stored_history(&store, KA, N);
    let features = ALL_FEATURES | features::DURABLE_DELETE;
    let mut g = greeted_from("127.0.0.2", relay.tcp(), features).await.0;
    let mut a = greeted_from("127.0.0.2", relay.tcp(), features).await.0;
    g.send(&durable_sub(1, KA, "gone", Some(Replay::FromSeq(0))))
        .await;
    a.send(&durable_sub(1, KA, "again", Some(Replay::FromSeq(0))))
        .await;
    wait_until(&store, "both durables on disk", || {
        floor_on_disk(&db, "gone") == Some(0) && floor_on_disk(&db, "again") == Some(0)
    })
    .await;
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let commits = store.metrics().commits;
    for c in [&mut g, &mut a] {
        assert_eq!(replay_acking(c, 1, N as usize).await.len() as u64, N);
        round_trip(c, 1).await;
    }
    let (ops, floors) = store.queued_writes();
    assert_eq!((ops, floors <= 2), (0, true), "{ops} ops, {floors} floors");
    for c in [&mut g, &mut a] {
        c.send(&Frame::Unsub(Unsub {
            sub_id: 1,
            delete: Some(true),
        }))
        .await;
        round_trip(c, 2).await;
    }
    a.send(&durable_sub(2, KA, "again", Some(Replay::FromSeq(1))))
        .await;
    round_trip(&mut a, 3).await;
    assert_eq!(
        store.metrics().commits,
        commits,
        "the writer was stuck throughout"
    );
    assert_eq!(
        store.queued_writes(),
        (3, 0),
        "two deletions and a creation queued, no floor"
    );
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    // The deletions and the creation commit together (one batch).
    wait_until(&store, "gone deleted", || {
        floor_on_disk(&db, "gone").is_none()
    })
    .await;
    assert_eq!(
        floor_on_disk(&db, "again"),
        Some(0),
        "the new durable's floor"
    );
    drop((g, a));
    relay.stop().await;
    store.close();
    drop(store);
    assert_eq!(floor_on_disk(&db, "gone"), None, "stays deleted");
    assert_eq!(floor_on_disk(&db, "again"), Some(0), "keeps its own floor");
    let (store, relay) = file_relay(config).await;
    assert_eq!(store.status().durables, 1);
    let mut a = greeted_from("127.0.0.2", relay.tcp(), features).await.0;
    a.send(&durable_sub(1, KA, "again", None)).await;
    assert_eq!(replay_acking(&mut a, 1, 0).await.len() as u64, N);
    drop(a);
    relay.stop().await;
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}
