//! The v2 key format wired into the client (issue 9: grants bound to their tree, revocation
//! that means it), against a real relay on real sockets: history of a superseded epoch opens
//! only if dated before the rotation cutoff (and live only within the grace), messages
//! expose the provenance of the grant that opened them, a delegated grant seals only after
//! an opt-in, the pinned admins survive a restart in the client state file, a publish
//! names the tree when two trees cover a topic, and a subscription is bound to one tree:
//! another tree's admin cannot write into it, live, from history or after a reconnect.

mod support;

use futures_util::StreamExt;
use support::proxy::KillerProxy;
use support::raw::*;
use support::*;
use whispeer::protocol::{KeyError, Provenance, Scope};
use whispeer::{Client, Encryption, PublishError, PublishOptions, Replay, SubscribeError, Tcp};
use whispeer::{Keyring, SubscribeOptions, Topic, TreeKey};

async fn next(sub: &mut whispeer::Subscription<u32>) -> whispeer::Message<u32> {
    within("a message", sub.next())
        .await
        .expect("stream open")
        .expect("a message")
}

async fn client_with(url: &str, keys: Keyring) -> Client {
    Client::builder()
        .with(Tcp::new(url))
        .with(Encryption::with_keyring(keys))
        .with(identity())
        .connect()
        .await
        .expect("connects")
}

const HOUR: u64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_history_before_the_cutoff_replays_and_after_it_is_refused() {
    let relay = TestRelay::start().await;
    let now = whispeer::now_ms();
    let e0 = tree("team");
    let cutoff = now - 30_000;
    let e1 = e0.rotate(cutoff, &mut rand::rngs::OsRng).expect("rotates");
    let alice = identity();
    let mut member = RawPublisher::connect(relay.addrs.tcp.unwrap()).await;

    // History: epoch 0 before the cutoff, epoch 0 after it (a removed member backdating
    // is bounded by the cutoff; this one dates after it), then epoch 1.
    let first = member
        .publish(&seal(&e0, Some(&alice), "team/a", 1, now - 60_000), false)
        .await;
    member
        .publish(&seal(&e0, Some(&alice), "team/a", 2, now - 10_000), false)
        .await;
    member
        .publish(&seal(&e1, Some(&alice), "team/a", 3, now - 5_000), false)
        .await;

    // The subscriber got the rotation two hours ago; the grace (one hour) is over.
    let mut keys = Keyring::with_grace(HOUR);
    keys.add_grant_at(e0.grant_all(), now - 2 * HOUR).unwrap();
    keys.add_grant_at(e1.grant_all(), now - 2 * HOUR).unwrap();
    let c = client_with(&relay.tcp_url(), keys).await;
    let mut sub = c
        .subscribe_with_options::<u32>(
            "team/#",
            SubscribeOptions::new().replay(Replay::FromSeq(first)),
        )
        .await
        .unwrap();
    // One relay subscription per epoch, each replaying its own history: any order.
    let mut got = vec![next(&mut sub).await, next(&mut sub).await]
        .into_iter()
        .map(|m| (m.value, m.epoch))
        .collect::<Vec<_>>();
    got.sort();
    assert_eq!(
        got,
        [(1, 0), (3, 1)],
        "previous-epoch history dated before the cutoff opens after the grace; dated after \
         the cutoff it is refused"
    );
    until_stats(&c, "the post-cutoff message counted", |s| {
        s.core.rejected >= 1
    })
    .await;

    // Live, past the grace: a previous-epoch message is refused even dated before the
    // cutoff; the current epoch goes on.
    member
        .publish(&seal(&e0, Some(&alice), "team/a", 4, now - 45_000), false)
        .await;
    member
        .publish(
            &seal(&e1, Some(&alice), "team/a", 5, whispeer::now_ms()),
            false,
        )
        .await;
    assert_eq!(next(&mut sub).await.value, 5, "live old epoch refused");
    let s = until_stats(&c, "both refusals counted", |s| s.core.rejected >= 2).await;
    assert_eq!(s.core.rejected, 2);
    c.close().await;
    drop(member);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_the_provenance_and_a_delegated_grant_seals_only_after_opt_in() {
    let relay = TestRelay::start().await;
    let t = tree("org");
    let bob = identity();
    let news = Topic::new("org/news").unwrap();
    // Admin-signed (the whole tree), and a subtree narrowed by bob (delegated).
    let delegated = t.grant_all().narrow(&news, false, &bob).unwrap();
    let mut dkeys = Keyring::new();
    dkeys.add_grant(delegated).unwrap();

    let admin = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    let member = client_with(&relay.tcp_url(), dkeys).await;
    let scope = Scope::Subtree(news.clone());
    assert_eq!(
        member.provenance(t.tree_id(), &scope),
        Some(Provenance::Delegated {
            by: bob.sender_id()
        })
    );

    let mut at_admin = admin.subscribe::<u32>("org/#").await.unwrap();
    let mut at_member = member.subscribe::<u32>("org/news/#").await.unwrap();
    admin
        .publish_with("org/news/x", &1u32, PublishOptions::at_least_once())
        .await
        .unwrap();
    let m = next(&mut at_member).await;
    assert_eq!(m.value, 1);
    assert_eq!(
        m.provenance,
        Provenance::Delegated {
            by: bob.sender_id()
        }
    );
    assert_eq!(m.tree_id, t.tree_id());
    let m = next(&mut at_admin).await;
    assert_eq!(m.provenance, Provenance::AdminSigned);

    // The delegated grant opens but does not seal until the member opts in.
    let e = member
        .publish_with("org/news/y", &2u32, PublishOptions::at_least_once())
        .await
        .unwrap_err();
    assert!(
        matches!(e, PublishError::Key(KeyError::NotSealable { .. })),
        "{e}"
    );
    assert!(matches!(
        member.allow_sealing(t.tree_id(), &Scope::Topic(news.clone())),
        Err(KeyError::NoSuchGrant { .. })
    ));
    member.allow_sealing(t.tree_id(), &scope).unwrap();
    member
        .publish_with("org/news/y", &2u32, PublishOptions::at_least_once())
        .await
        .unwrap();
    assert_eq!(next(&mut at_admin).await.value, 2);
    admin.close().await;
    member.close().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_trees_covering_a_topic_the_publish_names_the_tree() {
    let relay = TestRelay::start().await;
    let a = tree("alpha");
    let b = tree("beta");
    let mut keys = keyring_with(&a);
    keys.add_tree_key(&b).unwrap();
    let mut keys2 = keyring_with(&a);
    keys2.add_tree_key(&b).unwrap();
    let publisher = client_with(&relay.tcp_url(), keys).await;
    let subscriber = client_with(&relay.tcp_url(), keys2).await;
    // A subscription names its tree too (one per tree here).
    let in_tree = |t: &TreeKey| SubscribeOptions::new().tree(t.tree_id());
    let mut sub_a = subscriber
        .subscribe_with_options::<u32>("shared/#", in_tree(&a))
        .await
        .unwrap();
    let mut sub_b = subscriber
        .subscribe_with_options::<u32>("shared/#", in_tree(&b))
        .await
        .unwrap();

    let e = publisher
        .publish_with("shared/x", &1u32, PublishOptions::at_least_once())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, PublishError::Key(KeyError::AmbiguousTree { .. })),
        "{e}"
    );
    for id in [a.tree_id(), b.tree_id()] {
        assert!(text.contains(&id.to_string()), "{text} names {id}");
    }
    for (t, v, sub) in [(&b, 2u32, &mut sub_b), (&a, 3u32, &mut sub_a)] {
        publisher
            .publish_with(
                "shared/x",
                &v,
                PublishOptions::at_least_once().tree(t.tree_id()),
            )
            .await
            .unwrap();
        let m = next(sub).await;
        assert_eq!((m.value, m.tree_id), (v, t.tree_id()));
    }
    // A tree that does not cover the topic is an error, not a fallback to another tree.
    let c = tree("gamma");
    assert!(publisher
        .publish_with(
            "shared/x",
            &4u32,
            PublishOptions::at_least_once().tree(c.tree_id()),
        )
        .await
        .is_err());
    publisher.close().await;
    subscriber.close().await;
    relay.stop().await;
}

/// Receives until `last` and returns every (value, tree) seen on the way.
async fn until_value(
    sub: &mut whispeer::Subscription<u32>,
    last: u32,
) -> Vec<(u32, whispeer::protocol::TreeId)> {
    let mut seen = Vec::new();
    loop {
        let m = next(sub).await;
        seen.push((m.value, m.tree_id));
        if m.value == last {
            return seen;
        }
    }
}

/// PROTOCOL §4.11, receiving (threat model: "write into another tree's subscription"): the
/// victim holds tree A (`alerts/#`) and accepted tree B from Mallory (`#`). A subscription
/// to `alerts/#` naming no tree is refused naming both; bound to A, Mallory's admin-signed
/// messages on `alerts/fire` never reach it, live or replayed from the relay's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_trees_admin_cannot_write_into_a_subscription_of_a_tree() {
    let relay = TestRelay::start().await;
    let work = tree("work");
    let mallory_tree = tree("mallory");
    let mut keys = Keyring::new();
    keys.add_grant(work.grant(&Scope::Subtree(Topic::new("alerts").unwrap())))
        .unwrap();
    keys.add_tree_key(&mallory_tree).unwrap();
    let victim = client_with(&relay.tcp_url(), keys).await;
    let mallory = client_with(&relay.tcp_url(), keyring_with(&mallory_tree)).await;
    let colleague = client_with(&relay.tcp_url(), keyring_with(&work)).await;

    let e = victim.subscribe::<u32>("alerts/#").await.unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, SubscribeError::Key(KeyError::AmbiguousTree { .. })),
        "{e}"
    );
    for id in [work.tree_id(), mallory_tree.tree_id()] {
        assert!(text.contains(&id.to_string()), "{text} names {id}");
    }
    let in_work = || SubscribeOptions::new().tree(work.tree_id());
    let mut sub = victim
        .subscribe_with_options::<u32>("alerts/#", in_work())
        .await
        .unwrap();
    for (c, v) in [
        (&mallory, 1u32),
        (&colleague, 2),
        (&mallory, 3),
        (&colleague, 4),
    ] {
        c.publish_with("alerts/fire", &v, PublishOptions::at_least_once())
            .await
            .unwrap();
    }
    let seen = until_value(&mut sub, 4).await;
    assert_eq!(seen, [(2, work.tree_id()), (4, work.tree_id())], "live");

    // From the relay's history too: the replay compiles for tree A only.
    let mut replayed = victim
        .subscribe_with_options::<u32>("alerts/#", in_work().replay(Replay::FromSeq(0)))
        .await
        .unwrap();
    let seen = until_value(&mut replayed, 4).await;
    assert_eq!(seen, [(2, work.tree_id()), (4, work.tree_id())], "replayed");
    for c in [victim, mallory, colleague] {
        c.close().await;
    }
    relay.stop().await;
}

/// A subscription made while only tree A covered its filter stays A's: a grant of another
/// tree added later (an invite accepted at run time) does not widen it, neither on the
/// resubscribe the new grant causes nor after a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_grant_of_another_tree_does_not_widen_a_subscription() {
    let relay = TestRelay::start().await;
    let proxy = KillerProxy::start(relay.addrs.tcp.unwrap()).await;
    let work = tree("work");
    let mallory_tree = tree("mallory");
    let mut keys = Keyring::new();
    keys.add_grant(work.grant(&Scope::Subtree(Topic::new("alerts").unwrap())))
        .unwrap();
    let victim = client_with(&format!("tcp://{}", proxy.addr), keys).await;
    let mallory = client_with(&relay.tcp_url(), keyring_with(&mallory_tree)).await;
    let colleague = client_with(&relay.tcp_url(), keyring_with(&work)).await;
    // One tree covers the filter: bound to it without naming it.
    let mut sub = victim.subscribe::<u32>("alerts/#").await.unwrap();

    victim.add_grant(mallory_tree.grant_all()).unwrap();
    proxy.kill.notify_waiters();
    until_stats(&victim, "a reconnect", |s| s.reconnects >= 1).await;
    // Until the resubscribed subscription sees one of A's messages, publish Mallory's then
    // A's: had the new grant widened it, Mallory's would come too.
    let mut seen = Vec::new();
    for round in 0u32.. {
        let v = 10 * round;
        for (c, v) in [(&mallory, v + 1), (&colleague, v + 2)] {
            c.publish_with("alerts/fire", &v, PublishOptions::at_least_once())
                .await
                .unwrap();
        }
        match tokio::time::timeout(std::time::Duration::from_millis(500), sub.next()).await {
            Ok(m) => {
                let m = m.expect("stream open").expect("a message");
                seen.push((m.value, m.tree_id));
                break;
            }
            Err(_) => assert!(round < 40, "the subscription came back"),
        }
    }
    // A last one of A's after all of them: everything before it is in `seen` then.
    colleague
        .publish_with("alerts/fire", &9999u32, PublishOptions::at_least_once())
        .await
        .unwrap();
    seen.extend(until_value(&mut sub, 9999).await);
    assert!(
        seen.iter()
            .all(|(v, t)| v % 10 != 1 && *t == work.tree_id()),
        "only tree A's messages: {seen:?}"
    );
    // The new grant itself works: a subscription naming tree B gets Mallory's.
    let mut in_b = victim
        .subscribe_with_options::<u32>(
            "alerts/#",
            SubscribeOptions::new().tree(mallory_tree.tree_id()),
        )
        .await
        .unwrap();
    mallory
        .publish_with("alerts/fire", &7u32, PublishOptions::at_least_once())
        .await
        .unwrap();
    assert_eq!(
        until_value(&mut in_b, 7).await,
        [(7, mallory_tree.tree_id())]
    );
    for c in [victim, mallory, colleague] {
        c.close().await;
    }
    relay.stop().await;
}

#[cfg(feature = "persistence")]
/// A key claiming `tree`'s id but signed by another admin.
fn forged(tree: &TreeKey) -> TreeKey {
    let mut root = [0u8; 32];
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut root);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    TreeKey::from_parts(tree.tree_id(), 0, tree.name(), root, seed).unwrap()
}

#[cfg(feature = "persistence")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_admin_survives_a_restart_and_another_admin_is_refused() {
    use whispeer::{ConnectError, Persistence};
    let relay = TestRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("client.db");
    let t = tree("pinned");
    let other = tree("other");
    let evil = forged(&t);
    let connect = |keys: Keyring| {
        Client::builder()
            .with(Tcp::new(relay.tcp_url()))
            .with(Encryption::with_keyring(keys))
            .with(Persistence::sqlite(&state))
            .connect()
    };

    // First run: the tree's admin is pinned (and saved).
    let c = connect(keyring_with(&t)).await.unwrap();
    c.close().await;

    // Restart with only another tree: a certificate for the pinned tree signed by another
    // admin is refused at run time...
    let c = connect(keyring_with(&other)).await.unwrap();
    let e = c.add_grant(evil.grant_all()).unwrap_err();
    assert!(matches!(e, KeyError::AdminMismatch { .. }), "{e}");
    // ...the genuine admin's next epoch is accepted...
    let t1 = t
        .rotate(whispeer::now_ms(), &mut rand::rngs::OsRng)
        .unwrap();
    c.add_grant(t1.grant_all()).unwrap();
    c.close().await;

    // ...and a restart with the forged key in the builder's keyring does not connect.
    let e = connect(keyring_with(&evil)).await.unwrap_err();
    assert!(
        matches!(e, ConnectError::Keys(KeyError::AdminMismatch { .. })),
        "{e}"
    );

    // Without the state file nothing remembers the pin: the forged key is taken (which is
    // what the persisted pin prevents).
    let fresh = tcp_client(&relay.tcp_url(), keyring_with(&other), identity()).await;
    fresh.add_grant(evil.grant_all()).unwrap();
    fresh.close().await;
    relay.stop().await;
}

/// Adversarial review (clients), finding 2: the previous epoch's grace started again at
/// every process start (the application adds its grants again, so the keyring saw the
/// rotation "now"), and a receiver restarted now and then accepted live messages of the old
/// epoch — from a removed member still holding its key — for as long as it kept restarting.
/// With the state file the grace runs from the first time a run saw the rotation. Time is
/// set through the grants' add time: the rotation reached this client 70 minutes ago (a
/// one-hour grace, over 10 minutes ago), the process restarted 30 minutes ago. A client
/// with the same keys and no state file is the control: for it the grace restarted, and the
/// old epoch's message arrives.
#[cfg(feature = "persistence")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_refuses_the_old_epoch_once_the_first_grace_is_over() {
    use whispeer::Persistence;
    const MIN: u64 = 60_000;
    let relay = TestRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("client.db");
    let now = whispeer::now_ms();
    let e0 = tree("grace");
    let e1 = e0.rotate(u64::MAX, &mut rand::rngs::OsRng).unwrap();
    let keys = |at: u64| {
        let mut k = Keyring::with_grace(HOUR);
        k.add_grant_at(e0.grant_all(), at).unwrap();
        k.add_grant_at(e1.grant_all(), at).unwrap();
        k
    };
    let connect = |keys: Keyring, state: Option<&std::path::Path>| {
        let b = Client::builder()
            .with(Tcp::new(relay.tcp_url()))
            .with(Encryption::with_keyring(keys))
            .with(identity());
        match state {
            Some(s) => b.with(Persistence::sqlite(s)),
            None => b,
        }
        .connect()
    };

    // The first run saw the rotation 70 minutes ago.
    connect(keys(now - 70 * MIN), Some(&state))
        .await
        .unwrap()
        .close()
        .await;
    // Restarted 30 minutes ago: its grants added again then.
    let c = connect(keys(now - 30 * MIN), Some(&state)).await.unwrap();
    let control = connect(keys(now - 30 * MIN), None).await.unwrap();
    let mut sub = c.subscribe::<u32>("grace/#").await.unwrap();
    let mut ctl = control.subscribe::<u32>("grace/#").await.unwrap();
    let alice = identity();
    let mut member = RawPublisher::connect(relay.addrs.tcp.unwrap()).await;
    let t = whispeer::now_ms();
    member
        .publish(&seal(&e0, Some(&alice), "grace/a", 1, t), false)
        .await;
    member
        .publish(&seal(&e1, Some(&alice), "grace/a", 2, t), false)
        .await;
    assert_eq!(next(&mut ctl).await.value, 1, "control: a new grace");
    assert_eq!(next(&mut ctl).await.value, 2);
    assert_eq!(
        next(&mut sub).await.value,
        2,
        "restarted with the state file: the old epoch is refused"
    );
    c.close().await;
    control.close().await;

    // A rotation at run time (`Client::add_grant`) is saved at once, with its time.
    let state2 = dir.path().join("runtime.db");
    let mut k = Keyring::with_grace(HOUR);
    k.add_grant(e0.grant_all()).unwrap();
    let c = connect(k, Some(&state2)).await.unwrap();
    let before = whispeer::now_ms();
    c.add_grant(e1.grant_all()).unwrap();
    let after = whispeer::now_ms();
    c.close().await;
    let db = rusqlite::Connection::open(&state2).unwrap();
    let (tree, epoch, at): (Vec<u8>, i64, i64) = db
        .query_row("SELECT tree, epoch, at FROM superseded", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((&tree[..], epoch), (&e0.tree_id().0[..], 0));
    assert!(
        (before..=after).contains(&(at as u64)),
        "{before} ≤ {at} ≤ {after}"
    );
    drop(member);
    relay.stop().await;
}
