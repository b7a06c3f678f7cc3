//! The admin port under hostile local use: an anonymous `/status` costs the relay counts
//! only (never a walk over every stored path), and admin connections are capped while the
//! relay keeps serving its clients.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use whispeer_protocol::frame::Replay;
use whispeer_protocol::{KeyId, TokenPattern};
use whispeer_relay::admin::{http_get, http_get_auth, Status};
use whispeer_relay::config::StoreKind;
use whispeer_relay::store::{self, Store, Tenant};
use whispeer_relay::{Config, Listeners, Relay};

/// A store that counts which `/status` computation the relay asks for.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<dyn Store>,
    /// `status()`: with the per-path list (every stored path visited).
    full: AtomicU64,
    /// `status_counts()`: totals only.
    counts: AtomicU64,
}

impl Store for CountingStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn append(&self, msg: store::Append<'_>) -> Result<store::Accepted, store::StoreError> {
        self.inner.append(msg)
    }
    fn last_seq(&self) -> whispeer_relay::Seq {
        self.inner.last_seq()
    }
    fn seq_space(&self) -> [u8; 16] {
        self.inner.seq_space()
    }
    fn when_durable(&self, seq: whispeer_relay::Seq, done: store::OnDurable) {
        self.inner.when_durable(seq, done)
    }
    fn when_sequenced(&self, ticket: u64, done: store::OnSequenced) {
        self.inner.when_sequenced(ticket, done)
    }
    fn advance(&self, seq: whispeer_relay::Seq) {
        self.inner.advance(seq)
    }
    fn take_sequenced(&self) -> Option<tokio::sync::mpsc::Receiver<store::Sequenced>> {
        self.inner.take_sequenced()
    }
    fn when_readable(&self, key_id: &KeyId, upto: whispeer_relay::Seq, done: store::OnDurable) {
        self.inner.when_readable(key_id, upto, done)
    }
    fn plan(
        &self,
        pattern: &TokenPattern,
        replay: Replay,
        upto: whispeer_relay::Seq,
    ) -> Result<store::ReadPlan, store::StoreError> {
        self.inner.plan(pattern, replay, upto)
    }
    fn read(
        &self,
        pattern: &TokenPattern,
        plan: &store::ReadPlan,
        from: u64,
        upto: whispeer_relay::Seq,
    ) -> Result<store::ReadChunk, store::StoreError> {
        self.inner.read(pattern, plan, from, upto)
    }
    fn retained(
        &self,
        pattern: &TokenPattern,
        from: u64,
        upto: whispeer_relay::Seq,
    ) -> Result<store::ReadChunk, store::StoreError> {
        self.inner.retained(pattern, from, upto)
    }
    fn durable(&self, key: &store::DurableKey) -> Result<Option<u64>, store::StoreError> {
        self.inner.durable(key)
    }
    fn set_durable(
        &self,
        key: &store::DurableKey,
        floor: u64,
        tenant: &Tenant,
    ) -> Result<(), store::StoreError> {
        self.inner.set_durable(key, floor, tenant)
    }
    fn delete_durable(&self, key: &store::DurableKey) -> Result<bool, store::StoreError> {
        self.inner.delete_durable(key)
    }
    fn take_gone(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<store::DurableKey>> {
        self.inner.take_gone()
    }
    fn claim_key(
        &self,
        key_id: &KeyId,
        group: &str,
        create: bool,
    ) -> Result<store::Claim, store::StoreError> {
        self.inner.claim_key(key_id, group, create)
    }
    fn durable_owner(
        &self,
        key: &store::DurableKey,
        owner: Option<&str>,
    ) -> Result<bool, store::StoreError> {
        self.inner.durable_owner(key, owner)
    }
    fn status(&self) -> store::StoreStatus {
        self.full.fetch_add(1, Ordering::SeqCst);
        self.inner.status()
    }
    fn status_counts(&self) -> store::StoreStatus {
        self.counts.fetch_add(1, Ordering::SeqCst);
        self.inner.status_counts()
    }
    fn metrics(&self) -> store::StoreMetrics {
        self.inner.metrics()
    }
    fn close(&self) {
        self.inner.close()
    }
}

const TOKEN: &str = "admin-test-token";

/// On a loopback admin port anyone local may ask `/status`: without the admin token the
/// relay asks its store for counts only, never the per-path list it would then redact
/// (which visits every stored path under the store's locks); with the token, the detail.
/// The counts are there either way. Before, every anonymous `/status` computed the full
/// per-path status and cleared the list afterwards.
#[tokio::test]
async fn an_anonymous_status_never_computes_the_per_path_status() {
    let mut config = Config::ephemeral();
    config.auth.admin_token = Some(TOKEN.into());
    let inner = store::open(&config.store, StoreKind::Memory).expect("memory store");
    let counting = Arc::new(CountingStore {
        inner,
        full: AtomicU64::new(0),
        counts: AtomicU64::new(0),
    });
    let listeners = Listeners::bind(&config).await.expect("bind");
    let relay = TestRelay::run(
        Relay::builder(config)
            .listeners(listeners)
            .store(counting.clone())
            .build()
            .expect("relay builds"),
    );
    let admin = format!("http://{}", relay.addrs.admin.expect("admin"));
    // Something stored, so there is a path to list.
    let mut p = Client::tcp(relay.tcp()).await;
    p.hello().await;
    let mut sub = subscriber_tcp(relay.tcp(), exact(1, &[1])).await;
    p.publish(envelope(1, &[1])).await;
    sub.expect_msg().await;

    let status = |body: bytes::Bytes| -> Status { serde_json::from_slice(&body).expect("json") };
    let anonymous = status(http_get(&admin, "/status").await.expect("/status"));
    assert!(!anonymous.detail);
    assert!(anonymous.store.paths.is_empty(), "key ids shown");
    assert_eq!(
        counting.full.load(Ordering::SeqCst),
        0,
        "an anonymous /status computed the per-path status"
    );
    assert_eq!(counting.counts.load(Ordering::SeqCst), 1);
    // With the token: the detail, from the full status.
    let detailed = status(
        http_get_auth(&admin, "/status", Some(TOKEN))
            .await
            .expect("/status with the token"),
    );
    assert!(detailed.detail);
    assert_eq!(counting.full.load(Ordering::SeqCst), 1);
    assert_eq!(counting.counts.load(Ordering::SeqCst), 1);
    drop((p, sub));
    relay.stop().await;
}

/// At most 64 admin connections are served at once: the 65th waits (in the kernel's
/// listen queue: no descriptor, no task) while 64 idle ones hold the places, clients of the
/// relay are served meanwhile, and it is answered once places free. Before, every admin
/// connection was accepted and kept up to its 10 s header timeout, without bound.
#[tokio::test]
async fn idle_admin_connections_cannot_starve_a_health_check() {
    use tokio::io::AsyncReadExt;
    let relay = TestRelay::start(Config::ephemeral()).await;
    let admin = relay.addrs.admin.expect("admin");
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect"),
        );
    }
    // 64 silent connections hold every place: a health check is still answered (it
    // waited in the listen queue for up to the header timeout before).
    let url = format!("http://{admin}");
    let body = tokio::time::timeout(TIMEOUT, http_get(&url, "/healthz"))
        .await
        .expect("/healthz answered beside 64 idle admin connections")
        .expect("/healthz");
    assert_eq!(&body[..], b"ok\n");
    // Answered while the idle ones were still open: not after their header timeout.
    let mut b = [0u8; 1];
    assert!(
        matches!(idle[1].try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the health check waited for idle connections to time out"
    );
    // The oldest idle connection was closed to make room.
    let n = tokio::time::timeout(TIMEOUT, idle[0].read(&mut b))
        .await
        .expect("the oldest idle admin connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The relay serves clients meanwhile.
    let mut c = Client::tcp(relay.tcp()).await;
    c.hello().await;
    c.subscribe(1, exact(1, &[1])).await;
    drop(c);
    relay.stop().await;
}

/// One health check: `GET /healthz` from `source` on a fresh connection (its request sent
/// right after the connect), the whole answer read.
fn probe_once(admin: std::net::SocketAddr, source: std::net::IpAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    socket
        .bind(&std::net::SocketAddr::new(source, 0).into())
        .map_err(|e| format!("bind: {e}"))?;
    socket
        .connect_timeout(&admin.into(), TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Silent connections to `admin` as fast as `threads` threads can open them, each from the
/// next of `sources` in turn, until `stop`; each thread keeps its newest 64 open (closed
/// with a reset: no TIME_WAIT). `progress` counts every connection opened, as it happens.
/// Returns the threads, which answer how many they opened.
fn connect_flood(
    admin: std::net::SocketAddr,
    sources: Vec<std::net::IpAddr>,
    threads: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    progress: tokio::sync::watch::Sender<u64>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..threads)
        .map(|t| {
            let (sources, stop, progress) = (sources.clone(), stop.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut open = std::collections::VecDeque::new();
                let mut opened = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let source = sources[i % sources.len()];
                    let Ok(socket) =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    else {
                        continue;
                    };
                    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
                    if socket
                        .bind(&std::net::SocketAddr::new(source, 0).into())
                        .is_err()
                    {
                        continue;
                    }
                    if socket
                        .connect_timeout(&admin.into(), std::time::Duration::from_millis(200))
                        .is_ok()
                    {
                        opened += 1;
                        progress.send_modify(|n| *n += 1);
                        open.push_back(socket);
                        if open.len() > 64 {
                            open.pop_front();
                        }
                    }
                }
                opened
            })
        })
        .collect()
}

/// Probes `/healthz` from 127.0.0.1 200 times while a flood of silent connections from
/// `sources` goes on, each probe after the flood opened 10 more (so every probe meets new
/// flood connections, and the flood is past the port's 64 places before the first);
/// every probe must be answered 200.
async fn probes_get_through_a_connect_flood(sources: Vec<std::net::IpAddr>) {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let admin = relay.addrs.admin.expect("admin");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (progress, mut flooded) = tokio::sync::watch::channel(0u64);
    let flood = connect_flood(admin, sources, 2, stop.clone(), progress);
    let runtime = tokio::runtime::Handle::current();
    let answers = tokio::task::spawn_blocking(move || {
        let mut after = 64;
        (0..200)
            .map(|_| {
                runtime
                    .block_on(tokio::time::timeout(
                        TIMEOUT,
                        flooded.wait_for(|n| *n >= after),
                    ))
                    .expect("the flood stalled")
                    .expect("flood running");
                after += 10;
                probe_once(admin, [127, 0, 0, 1].into())
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("probes");
    stop.store(true, Ordering::Relaxed);
    let opened: u64 = flood.into_iter().map(|t| t.join().expect("flood")).sum();
    let failed: Vec<_> = answers
        .iter()
        .enumerate()
        .filter(
            |(_, a)| !matches!(a, Ok(a) if a.starts_with("HTTP/1.1 200") && a.ends_with("ok\n")),
        )
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 probes failed beside {opened} flood connections: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // The flood was one: far more connections than the port's 64 places.
    assert!(opened > 1_000, "only {opened} flood connections");
    relay.stop().await;
}

/// A local user flooding the loopback admin port with silent connections from 127.0.0.1 —
/// the health check's own source address — cannot close the health check: a connection
/// whose request head has arrived (read, or waiting in its socket) is never closed to make
/// room while silent ones are open. Before, the port closed the oldest connection of the
/// address holding the most: with the probe's address flooding, the probe's connection
/// before it was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_from_the_probes_own_address_does_not_fail_health_checks() {
    probes_get_through_a_connect_flood(vec![[127, 0, 0, 1].into()]).await;
}

/// The same flood from 64 addresses of 127/8 (127.0.0.1 among them), so that every
/// source holds about one connection, as the probe's does: every probe is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_from_64_loopback_addresses_does_not_fail_health_checks() {
    probes_get_through_a_connect_flood((1..=64).map(|i| [127, 0, 0, i].into()).collect()).await;
}

/// A probe accepted before its request arrived, its head then late behind 100 newer
/// connections that send nothing, while 64 silent ones hold every place: it is answered.
/// A newcomer that has sent nothing never closes a connection that has sent nothing either
/// (it waits for its head among the port's parked newcomers instead), so the probe waits
/// for its head too. Before, each newer silent connection closed the oldest young one
/// without a head: the probe after at most 64 of them (under a local flood of 20,000
/// connects a second, a probe whose `GET` came 3 ms after its accept was closed
/// unanswered). Each step is known to have been accepted by the answer to a whole request
/// on a connection made after it (the listen queue is first in, first out): no sleeps.
#[tokio::test]
async fn a_probe_whose_head_is_late_is_not_closed_by_newer_silent_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = TestRelay::start(Config::ephemeral()).await;
    let admin = relay.addrs.admin.expect("admin");
    let connect = || async {
        tokio::net::TcpStream::connect(admin)
            .await
            .expect("connect")
    };
    let host = admin.to_string();
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(connect().await);
    }
    let mut probe = connect().await;
    let line = status_line(admin, "/healthz", &host, None).await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // The probe has been accepted without its head. 100 newer silent connections.
    for _ in 0..100 {
        silent.push(connect().await);
    }
    let line = status_line(admin, "/healthz", &host, None).await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // Now its request.
    probe
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("the probe's request sent");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, probe.read_to_end(&mut answer))
        .await
        .expect("answered or closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
        "the late probe was closed unanswered: {read:?} {answer:?}"
    );
    drop(silent);
    relay.stop().await;
}

/// `GET path` on a fresh connection to `admin` with `Host: host` (and the admin token
/// when given): the status line.
async fn status_line(
    admin: std::net::SocketAddr,
    path: &str,
    host: &str,
    token: Option<&str>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("request sent");
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_string()
}

/// DNS rebinding: a web page the operator visits makes its own name resolve to 127.0.0.1
/// and reads the tokenless loopback admin port (listeners, store path, disk free, plugin
/// and NATS server names); the browser sends that name as `Host`. Without the token the
/// port answers only `Host: localhost` or an IP address (any port): 403 otherwise;
/// `/healthz` (which tells nothing) and requests with the token answer any `Host`.
/// Before, `Host: evil.example` got the whole `/status`.
#[tokio::test]
async fn a_tokenless_request_naming_another_host_is_refused() {
    let mut config = Config::ephemeral();
    config.auth.admin_token = Some(TOKEN.into());
    let relay = TestRelay::start(config).await;
    let admin = relay.addrs.admin.expect("admin");
    let port = admin.port();
    for path in ["/status", "/metrics"] {
        for host in ["evil.example", &format!("evil.example:{port}")] {
            let line = status_line(admin, path, host, None).await;
            assert!(
                line.starts_with("HTTP/1.1 403"),
                "{path} Host {host}: {line}"
            );
        }
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "localhost".into(),
        ] {
            let line = status_line(admin, path, &host, None).await;
            assert!(
                line.starts_with("HTTP/1.1 200"),
                "{path} Host {host}: {line}"
            );
        }
        let line = status_line(admin, path, "relay.example", Some(TOKEN)).await;
        assert!(
            line.starts_with("HTTP/1.1 200"),
            "{path} with the token: {line}"
        );
        let line = status_line(admin, path, "relay.example", Some("wrong-token-123456")).await;
        assert!(
            line.starts_with("HTTP/1.1 403"),
            "{path} a wrong token: {line}"
        );
    }
    let line = status_line(admin, "/healthz", "evil.example", None).await;
    assert!(line.starts_with("HTTP/1.1 200"), "/healthz: {line}");
    // The status command's client sends the URL's host: 127.0.0.1 and localhost pass.
    assert!(http_get(&format!("http://{admin}"), "/status")
        .await
        .is_ok());
    assert!(http_get(&format!("http://localhost:{port}"), "/status")
        .await
        .is_ok());
    relay.stop().await;
}
