//! The tokio driver over the connection engine, against the real relay: the engine's
//! "fix while moving" items hold end to end, not only in the scripted scenarios.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// A TCP proxy that can swallow what clients send (reporting each swallowed read) and cut
/// every live connection at once.
struct HoleProxy {
    addr: std::net::SocketAddr,
    hole: Arc<AtomicBool>,
    kill: Arc<Notify>,
    swallowed: mpsc::UnboundedReceiver<usize>,
}

impl HoleProxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hole = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(Notify::new());
        let (tx, swallowed) = mpsc::unbounded_channel();
        let (h, k) = (hole.clone(), kill.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(relay) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (h, k, tx) = (h.clone(), k.clone(), tx.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut rr, mut rw) = relay.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            if h.load(Ordering::SeqCst) {
                                let _ = tx.send(n);
                            } else if rw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = tokio::io::copy(&mut rr, &mut cw) => {}
                        _ = k.notified() => {}
                    }
                });
            }
        });
        HoleProxy {
            addr,
            hole,
            kill,
            swallowed,
        }
    }
}

/// ENGINE.md "fix while moving" (3): a `subscribe` whose `Sub` was sent but never confirmed
/// when the connection dropped is sent again on the next connection and resolves (before,
/// it waited forever for a `SubOk` of the old connection's relay ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_pending_when_the_connection_drops_resolves_after_reconnect() {
    let relay = TestRelay::start().await;
    let mut proxy = HoleProxy::start(relay.addrs.tcp.unwrap()).await;
    let t = tree("pending");
    let url = format!("tcp://{}", proxy.addr);
    let c = tcp_client(&url, keyring_with(&t), identity()).await;
    proxy.hole.store(true, Ordering::SeqCst);
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe::<u32>("p/#").await }
    });
    // The Sub left the client and the relay never saw it.
    within("Sub swallowed", proxy.swallowed.recv())
        .await
        .unwrap();
    assert!(!pending.is_finished());
    proxy.hole.store(false, Ordering::SeqCst);
    proxy.kill.notify_waiters();
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
