//! Relay restart: the client reconnects with backoff, resubscribes and keeps receiving.
//!
//! The restarted relay binds the same ports, so this test lives alone in its own test binary
//! (cargo runs test binaries one after another): no other test of this process can take a
//! port while it is free.

mod support;

use futures_util::StreamExt;
use support::*;
use whispeer::ConnectionState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_reconnects_resubscribes_and_keeps_receiving() {
    let relay = TestRelay::start().await;
    let (ws, tcp) = (relay.addrs.ws.unwrap(), relay.addrs.tcp.unwrap());
    let t = tree("home");
    let sub_client = ws_client(&relay.ws_url(), keyring_with(&t), identity()).await;
    let mut states = sub_client.state_changes();
    let mut sub = sub_client.subscribe::<u32>("tick").await.unwrap();
    let p = tcp_client(&relay.tcp_url(), keyring_with(&t), identity()).await;
    p.publish("tick", &1u32).await.unwrap();
    assert_eq!(
        within("before restart", sub.next())
            .await
            .unwrap()
            .unwrap()
            .value,
        1
    );

    relay.stop().await;
    within(
        "reconnecting",
        states.wait_for(|s| matches!(s, ConnectionState::Reconnecting(_))),
    )
    .await
    .unwrap();
    let relay = TestRelay::start_on(ws, tcp).await;
    within(
        "reconnected",
        states.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap();

    // The publisher reconnects too; publish until the resubscribed subscriber sees one.
    let mut n = 2u32;
    let got = within("after restart", async {
        loop {
            if p.publish("tick", &n).await.is_ok() {
                let _ = p.flush().await;
            }
            tokio::select! {
                m = sub.next() => break m.unwrap().unwrap().value,
                _ = p.flush() => { n += 1; }
            }
        }
    })
    .await;
    assert!(got >= 2);
    assert!(sub_client.stats().reconnects >= 1);
    relay.stop().await;
}
