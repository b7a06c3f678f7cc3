//! Batch signatures on the publish path (PROTOCOL §4.14), through a real relay on real
//! sockets: the default client signs in batches — a tight publish loop is covered by few
//! signatures, each message still verifies alone and names its sender — the order of
//! publishes is kept across batches, flush, acks and a sealed publish in between; a
//! positive window holds messages for its timer; per-message signing stays available.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::*;
use whispeer::{Client, Encryption, PublishOptions, Signing, Tcp};

async fn publisher(
    url: &str,
    keys: whispeer::Keyring,
    id: whispeer::Identity,
    s: Signing,
) -> Client {
    Client::builder()
        .with(Tcp::new(url))
        .with(Encryption::with_keyring(keys))
        .with(id)
        .with(s)
        .connect()
        .await
        .expect("connects")
}

#[tokio::test]
async fn the_default_signs_a_tight_loop_in_batches_and_every_message_names_its_sender() {
    let relay = TestRelay::start().await;
    let t = tree("batch");
    let id = identity();
    let sender = id.sender_id();
    let publisher = tcp_client(&relay.tcp_url(), keyring_with(&t), id).await;
    let subscriber = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    let mut sub = subscriber.subscribe::<u64>("b/#").await.unwrap();

    const N: u64 = 600;
    for i in 0..N {
        // Two topics interleaved: one batch covers both; each opens alone.
        let topic = if i % 2 == 0 { "b/even" } else { "b/odd" };
        publisher.publish(topic, &i).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for i in 0..N {
        let m = within("a batch-signed message", sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.value, i, "publish order is kept across batches");
        assert_eq!(m.sender, Some(sender), "each message verifies alone");
    }
    let hits = subscriber.stats().core.batch_root_hits;
    // A loop that never waits hands the driver many publishes per turn: most messages ride
    // on a signature the subscriber already checked (per-message signing: none do).
    assert!(hits >= N / 2, "batch root cache hits {hits} of {N}");
    relay.stop().await;
}

#[tokio::test]
async fn per_message_signing_is_still_there_and_acks_flush_and_order_hold_with_batches() {
    let relay = TestRelay::start().await;
    let t = tree("batch");
    let subscriber = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    let mut sub = subscriber.subscribe::<u64>("p/#").await.unwrap();

    let single = publisher(
        &relay.tcp_url(),
        keyring_with(&t),
        identity(),
        Signing::per_message(),
    )
    .await;
    for i in 0..50u64 {
        single.publish("p/one", &i).await.unwrap();
    }
    single.flush().await.unwrap();
    for i in 0..50u64 {
        let m = within("a per-message-signed message", sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.value, i);
        assert!(m.sender.is_some());
    }
    assert_eq!(
        subscriber.stats().core.batch_root_hits,
        0,
        "one signature each"
    );

    // Batched: acked publishes between fire-and-forget ones keep their place; the ack
    // comes once the relay has the message (so its batch was signed and sent).
    let batched = publisher(
        &relay.tcp_url(),
        keyring_with(&t),
        identity(),
        Signing::on(),
    )
    .await;
    let mut seqs = Vec::new();
    for i in 100..160u64 {
        if i % 10 == 0 {
            let opts = PublishOptions::at_least_once();
            seqs.push(batched.publish_with("p/two", &i, opts).await.unwrap());
        } else {
            batched.publish("p/two", &i).await.unwrap();
        }
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "acked in order: {seqs:?}"
    );
    for i in 100..160u64 {
        let m = within("a batched message", sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.value, i);
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_positive_window_gathers_publishes_made_apart_under_one_signature() {
    let relay = TestRelay::start().await;
    let t = tree("batch");
    let subscriber = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    let mut sub = subscriber.subscribe::<u64>("w/#").await.unwrap();
    // A window far longer than this test's publishes take: the three publishes below, each
    // awaited and yielding in between, still share one signature — the timer, not a full
    // batch, sends them.
    let p = publisher(
        &relay.tcp_url(),
        keyring_with(&t),
        identity(),
        Signing::batched(64, Duration::from_millis(300)),
    )
    .await;
    for i in 0..3u64 {
        p.publish("w/x", &i).await.unwrap();
        tokio::task::yield_now().await;
    }
    for i in 0..3u64 {
        let m = within("a message sent by the window's timer", sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.value, i);
    }
    // Opened in parallel (more than one core), two workers may meet the new root at once
    // and both verify it: counted as a race, never as a hit.
    let core = subscriber.stats().core;
    assert_eq!(
        core.batch_root_hits + core.batch_root_races,
        2,
        "one signature for three"
    );
    relay.stop().await;
}
