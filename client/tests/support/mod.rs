//! Test support: a relay (the real `whispeer-relay` library) on real sockets on 127.0.0.1,
//! keys, and clients. Waiting is always on events, bounded by a generous timeout that only
//! fires when something is broken.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use whispeer::{Client, Compression, Encryption, Identity, Keyring, Tcp, TreeKey, WebSocket};
use whispeer_relay::config::ListenAddr;
use whispeer_relay::{BoundAddrs, Config, Relay};

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct TestRelay {
    pub addrs: BoundAddrs,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestRelay {
    /// A relay with WebSocket and TCP listeners on the given addresses (port 0 = any).
    pub async fn start_on(ws: SocketAddr, tcp: SocketAddr) -> Self {
        let mut config = Config::default();
        config.listen.ws = ListenAddr::on(ws);
        config.listen.tcp = ListenAddr::on(tcp);
        config.listen.admin = ListenAddr::OFF;
        let relay = Relay::bind(config).await.expect("relay binds");
        let addrs = relay.addrs();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("relay runs");
        });
        TestRelay {
            addrs,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub async fn start() -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::start_on(any, any).await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addrs.ws.unwrap())
    }

    pub fn tcp_url(&self) -> String {
        format!("tcp://{}", self.addrs.tcp.unwrap())
    }

    /// Graceful shutdown; returns once the relay has stopped and released its ports.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            tokio::time::timeout(TIMEOUT, d)
                .await
                .expect("relay stops")
                .expect("relay task");
        }
    }
}

pub fn tree(name: &str) -> TreeKey {
    TreeKey::generate(name, &mut rand::rngs::OsRng).unwrap()
}

pub fn keyring_with(tree: &TreeKey) -> Keyring {
    let mut k = Keyring::new();
    k.add_tree_key(tree, whispeer::now_ms()).unwrap();
    k
}

pub fn identity() -> Identity {
    Identity::generate(&mut rand::rngs::OsRng)
}

pub async fn ws_client(url: &str, keys: Keyring, id: Identity) -> Client {
    Client::builder()
        .with(WebSocket::new(url))
        .with(Compression::zstd(3))
        .with(Encryption::new(keys))
        .with(id)
        .connect()
        .await
        .expect("connects")
}

pub async fn tcp_client(url: &str, keys: Keyring, id: Identity) -> Client {
    Client::builder()
        .with(Tcp::new(url))
        .with(Encryption::new(keys))
        .with(id)
        .connect()
        .await
        .expect("connects")
}

/// Awaits `fut` or fails the test after [`TIMEOUT`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
