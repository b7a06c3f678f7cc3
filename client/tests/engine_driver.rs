//! The tokio driver over the connection engine, against the real relay: the engine's
//! "fix while moving" items hold end to end, not only in the scripted scenarios.

mod support;

use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use support::proxy::KillerProxy;
use support::*;

/// ENGINE.md "fix while moving" (3): a `subscribe` whose `Sub` was sent but never confirmed
/// when the connection dropped is sent again on the next connection and resolves (before,
/// it waited forever for a `SubOk` of the old connection's relay ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_pending_when_the_connection_drops_resolves_after_reconnect() {
    let relay = TestRelay::start().await;
    let mut proxy = KillerProxy::start(relay.addrs.tcp.unwrap()).await;
    let t = tree("pending");
    let url = format!("tcp://{}", proxy.addr);
    let c = tcp_client(&url, keyring_with(&t), identity()).await;
    proxy.blackhole.store(true, Ordering::SeqCst);
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe::<u32>("p/#").await }
    });
    // The Sub left the client and the relay never saw it.
    within("Sub swallowed", proxy.swallowed.recv())
        .await
        .unwrap();
    assert!(!pending.is_finished());
    proxy.blackhole.store(false, Ordering::SeqCst);
    proxy.cut_all();
    let mut sub = within("subscribe resolves", pending)
        .await
        .unwrap()
        .expect("confirmed on the new connection");
    assert!(c.stats().reconnects >= 1);
    let p = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    p.publish("p/x", &5u32).await.unwrap();
    assert_eq!(
        within("delivered", sub.next())
            .await
            .unwrap()
            .unwrap()
            .value,
        5
    );
    c.close().await;
    p.close().await;
    relay.stop().await;
}
