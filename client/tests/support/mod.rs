//! Test support: a relay (the real `whispeer-relay` library) on real sockets on 127.0.0.1,
//! keys, and clients. Waiting is always on events, bounded by a generous timeout that only
//! fires when something is broken.
#![allow(dead_code)]

pub mod logs;
pub mod proxy;
pub mod raw;

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
        Self::start_config(ws, tcp, |_| {}).await
    }

    /// A relay on any ports with `tune` applied to its configuration.
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::start_config(any, any, tune).await
    }

    async fn start_config(ws: SocketAddr, tcp: SocketAddr, tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.listen.ws = ListenAddr::on(ws);
        config.listen.tcp = ListenAddr::on(tcp);
        config.listen.admin = ListenAddr::OFF;
        // Raw test peers never answer the relay's Close: without this every stop would wait
        // out the default 5 s drain deadline.
        config.timeouts.drain_ms = 500;
        tune(&mut config);
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
    TreeKey::generate(name).unwrap()
}

pub fn keyring_with(tree: &TreeKey) -> Keyring {
    let mut k = Keyring::new();
    k.add_tree_key(tree).unwrap();
    k
}

pub fn identity() -> Identity {
    Identity::generate()
}

pub async fn ws_client(url: &str, keys: Keyring, id: Identity) -> Client {
    Client::builder()
        .with(WebSocket::new(url))
        .with(Compression::zstd(3))
        .with(Encryption::with_keyring(keys))
        .with(id)
        .connect()
        .await
        .expect("connects")
}

pub async fn tcp_client(url: &str, keys: Keyring, id: Identity) -> Client {
    Client::builder()
        .with(Tcp::new(url))
        .with(Encryption::with_keyring(keys))
        .with(id)
        .connect()
        .await
        .expect("connects")
}

/// A TCP client of `url` (often a fake relay) holding `keys`, no identity, that redials
/// within milliseconds (backoff 5 to 50 ms).
pub async fn quick_tcp_client(url: &str, keys: Keyring) -> Client {
    Client::builder()
        .with(Tcp::new(url))
        .with(Encryption::with_keyring(keys))
        .with(whispeer::Reconnect::new(
            std::time::Duration::from_millis(5),
            std::time::Duration::from_millis(50),
        ))
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

/// The real `whispeer-relay` binary: next to this test executable
/// (`target/<profile>/whispeer-relay`), built with cargo into the same target directory
/// when it is missing.
/// `whispeer-relay tls generate` into `dir`: (certificate, key, the SHA-256 hex it printed).
pub fn tls_generate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let cert = dir.join("relay.crt");
    let key = dir.join("relay.key");
    let out = std::process::Command::new(relay_binary())
        .args(["tls", "generate", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("run whispeer-relay tls generate");
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    let hex = line
        .trim()
        .strip_prefix("sha256:")
        .expect("prints sha256:HEX")
        .to_owned();
    assert_eq!(hex.len(), 64);
    (cert, key, hex)
}

/// `whispeer-relay account add NAME --file FILE ARGS…`: its standard output (a token, with
/// `--token`, on its last line).
#[allow(dead_code)]
pub fn account_add(file: &std::path::Path, name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(relay_binary())
        .args(["account", "add", name, "--file"])
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn relay_binary() -> std::path::PathBuf {
    use std::path::PathBuf;
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir: PathBuf = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf();
    let bin = profile_dir.join(format!("whispeer-relay{}", std::env::consts::EXE_SUFFIX));
    if bin.exists() {
        return bin;
    }
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| profile_dir.parent().map(PathBuf::from))
        .expect("target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "whispeer-relay", "--bin", "whispeer-relay"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build for whispeer-relay");
    assert!(status.success(), "building whispeer-relay failed");
    assert!(
        bin.exists(),
        "whispeer-relay not found at {}",
        bin.display()
    );
    bin
}

/// The relay binary started by [`start_relay_binary`]; killed on drop.
pub struct RelayProcess {
    pub child: std::process::Child,
    pub ws: SocketAddr,
    pub tcp: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl RelayProcess {
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ws)
    }
    pub fn tcp_url(&self) -> String {
        format!("tcp://{}", self.tcp)
    }

    /// The relay's Prometheus sample `name` (no labels) from its admin port, read with a
    /// plain blocking HTTP/1.0 request.
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).expect("admin port");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.admin).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in the relay's metrics"))
            .trim()
            .parse()
            .expect("a counter")
    }

    /// Waits until the relay's metric `name` satisfies `cond`. The relay offers no event
    /// for its counters; polled every 10 ms, bounded by [`TIMEOUT`].
    pub fn wait_metric(&self, name: &str, cond: impl Fn(u64) -> bool) -> u64 {
        let end = std::time::Instant::now() + TIMEOUT;
        loop {
            let v = self.metric(name);
            if cond(v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < end,
                "{name} stayed at {v} for {TIMEOUT:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `whispeer-relay serve --ws 127.0.0.1:0 --tcp 127.0.0.1:0 --admin 127.0.0.1:0
/// --ready-file PATH` plus `extra`, and waits for its ready file. Waiting is on an event:
/// the relay's "whispeer-relay listening" log line, logged once the ready file is in place;
/// a generous bound only catches a broken relay.
pub fn start_relay_binary(extra: &[&str]) -> RelayProcess {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("temp dir");
    let ready = dir.path().join("ready.json");
    let mut child = Command::new(relay_binary())
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log",
            "warn,whispeer_relay=info",
            "--ready-file",
        ])
        .arg(&ready)
        .args(extra)
        // A SQLite store's free-space reserve (256 MiB by default) would refuse every stored
        // publish on a small TMPDIR; the relay's own tests cover it (flags still override).
        .env("WHISPEER_STORE_MIN_FREE_BYTES", "0")
        .env_remove("RUST_LOG")
        .env_remove("WHISPEER_LOG")
        // Anything the relay keeps by default (a store file) goes to its own directory.
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn whispeer-relay");
    let stderr = child.stderr.take().expect("relay stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        // Keep draining so the relay never blocks on a full pipe.
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    // One deadline for the whole start: a relay that keeps logging (a cluster store
    // retrying "JetStream not ready") must not reset it line by line.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) if line.contains("whispeer-relay listening") => break,
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("whispeer-relay did not start ({e:?}, {status:?}); stderr: {seen:?}");
            }
        }
    }
    // The relay logs that line once the ready file is in place.
    let text = std::fs::read(&ready).expect("the ready file exists once 'listening' is logged");
    let v: serde_json::Value = serde_json::from_slice(&text).expect("ready file is JSON");
    let addr = |k: &str| -> SocketAddr {
        v[k].as_str()
            .unwrap_or_else(|| panic!("ready file lacks {k}: {v}"))
            .parse()
            .expect("socket address")
    };
    RelayProcess {
        ws: addr("ws"),
        tcp: addr("tcp"),
        admin: addr("admin"),
        child,
        dir,
    }
}

/// Polls the client's own counters until `cond` holds (bounded by [`within`]'s timeout);
/// returns the counters that satisfied it.
pub async fn until_stats(
    c: &Client,
    what: &str,
    cond: impl Fn(&whispeer::ClientStats) -> bool,
) -> whispeer::ClientStats {
    let mut rx = c.stats_changes();
    within(what, async {
        loop {
            let s = rx.borrow_and_update().clone();
            if cond(&s) {
                return s;
            }
            rx.changed().await.expect("the client keeps its counters");
        }
    })
    .await
}
