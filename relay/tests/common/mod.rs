//! Test helpers: syntactically valid envelopes without keys, protocol clients over every
//! transport, an in-process relay on real sockets, and the real binary.
//!
//! Waiting is always on an event (a frame, EOF, a file appearing) bounded by a generous
//! timeout that only exists so a broken relay fails the test instead of hanging it.
#![allow(dead_code)]

pub mod construction;
pub mod nats;
pub mod wildcard;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::frame::{ErrFrame, Hello, Msg, Pub, Sub, SubOk, Welcome, PROTOCOL_VERSION};
use whispeer_protocol::{
    codec, Envelope, Frame, FrameDecoder, KeyId, PatternElem, Qos, TokenPattern, TopicToken,
};
use whispeer_relay::{BoundAddrs, Config, Relay, RelayHandle};

#[path = "indexed.rs"]
mod indexed;
#[allow(unused_imports)] // used by some of the test files that include `common`
pub use indexed::{index_of, indexed_on};

/// Long enough for a loaded CI machine; only reached when the relay is broken.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn key(k: u8) -> KeyId {
    KeyId::from_bytes([k; 16])
}

pub fn tok(t: u8) -> TopicToken {
    TopicToken::from_bytes([t; 16])
}

/// An envelope routed as `[key(k), tok(levels[0]), …]` with `body` ciphertext bytes
/// (at least 16). The relay never opens it, so random-looking content is fine.
pub fn envelope_sized(k: u8, levels: &[u8], body: usize) -> Envelope {
    let tokens: Vec<TopicToken> = levels.iter().map(|t| tok(*t)).collect();
    let fields = HeaderFields {
        flags: 0,
        key_id: key(k),
        nonce: [7; 24],
        commit: [8; 32],
        tokens: &tokens,
    };
    let mut out = Vec::new();
    fields.write_prefix(48, &mut out);
    out.extend_from_slice(&[0x5a; 48]);
    out.extend((0..body.max(16)).map(|i| i as u8));
    Envelope::from_bytes(Bytes::from(out)).expect("valid envelope")
}

pub fn envelope(k: u8, levels: &[u8]) -> Envelope {
    envelope_sized(k, levels, 64)
}

/// Pattern elements: `Some(t)` = token, `None` = `+`; `rest` appends `#`.
pub fn pattern(k: u8, elems: &[Option<u8>], rest: bool) -> TokenPattern {
    let mut v: Vec<PatternElem> = elems
        .iter()
        .map(|e| match e {
            Some(t) => PatternElem::Token(tok(*t)),
            None => PatternElem::One,
        })
        .collect();
    if rest {
        v.push(PatternElem::Rest);
    }
    TokenPattern::new(key(k), v).expect("valid pattern")
}

pub fn exact(k: u8, levels: &[u8]) -> TokenPattern {
    pattern(
        k,
        &levels.iter().map(|t| Some(*t)).collect::<Vec<_>>(),
        false,
    )
}

pub fn hello_frame() -> Frame {
    Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: 0,
        client: Some("relay-tests".into()),
        auth: None,
        account: None,
    })
}

pub fn sub_frame(sub_id: u64, pattern: TokenPattern) -> Frame {
    Frame::Sub(Sub::live(sub_id, pattern))
}

pub fn pub_frame(env: Envelope) -> Frame {
    Frame::Pub(Pub {
        envelope: env,
        flags: 0,
        publish_id: None,
        qos: Qos::AtMostOnce,
    })
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Inner {
    Stream {
        io: Box<dyn Io>,
        dec: FrameDecoder,
        eof: bool,
    },
    Ws(Box<WebSocketStream<Box<dyn Io>>>),
}

/// What a read produced.
#[derive(Debug)]
pub enum Read {
    Frame(Bytes),
    /// Clean end of stream (EOF or WebSocket close).
    Closed,
    /// Reset or another transport error.
    Broken(String),
}

/// A protocol client over TCP, TLS, WS or WSS.
pub struct Client {
    inner: Inner,
}

impl Client {
    pub async fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.expect("connect tcp");
        s.set_nodelay(true).ok();
        Self::over_stream(Box::new(s))
    }

    /// A TCP client whose connection comes from `from` (another loopback address, for
    /// per-address limits).
    pub async fn tcp_from(addr: SocketAddr, from: &str) -> Self {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(from.parse().expect("an IPv4 address"), 0))
            .expect("bind the source address");
        let s = sock.connect(addr).await.expect("connect tcp");
        s.set_nodelay(true).ok();
        Self::over_stream(Box::new(s))
    }

    /// A TCP client from `from` signed in with the bearer token `token` (a token account),
    /// offering `features`, its `Welcome` read.
    pub async fn token_login_from(
        addr: SocketAddr,
        from: &str,
        token: &str,
        features: u64,
    ) -> Self {
        let mut c = Self::tcp_from(addr, from).await;
        c.send(&whispeer_protocol::Frame::Hello(
            whispeer_protocol::frame::Hello {
                versions: vec![whispeer_protocol::frame::PROTOCOL_VERSION],
                features,
                client: None,
                auth: Some(Bytes::from(token.to_owned())),
                account: None,
            },
        ))
        .await;
        match c.recv().await {
            whispeer_protocol::Frame::Welcome(_) => c,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub fn over_stream(io: Box<dyn Io>) -> Self {
        Self {
            inner: Inner::Stream {
                io,
                dec: FrameDecoder::new(64 << 20),
                eof: false,
            },
        }
    }

    pub async fn ws(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.expect("connect ws");
        s.set_nodelay(true).ok();
        Self::ws_over(Box::new(s), &format!("ws://{addr}/")).await
    }

    /// A WebSocket client whose upgrade request is `request`, sent as is (for requests
    /// another client library would not write); `None` if the relay does not answer 101.
    #[allow(dead_code)]
    pub async fn ws_with_request(addr: SocketAddr, request: &[u8]) -> Option<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.expect("connect ws");
        s.write_all(request)
            .await
            .expect("send the upgrade request");
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            response.push(b[0]);
        }
        if !response.starts_with(b"HTTP/1.1 101") {
            return None;
        }
        let io: Box<dyn Io> = Box::new(s);
        let ws = WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        Some(Self {
            inner: Inner::Ws(Box::new(ws)),
        })
    }

    pub async fn ws_over(io: Box<dyn Io>, url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::client_async(url, io)
            .await
            .expect("ws handshake");
        Self {
            inner: Inner::Ws(Box::new(ws)),
        }
    }

    /// Sends a frame.
    pub async fn send(&mut self, f: &Frame) {
        match &mut self.inner {
            Inner::Stream { io, .. } => {
                io.write_all(&codec::encode_prefixed(f))
                    .await
                    .expect("write");
                io.flush().await.expect("flush");
            }
            Inner::Ws(ws) => ws
                .send(Message::Binary(f.to_bytes()))
                .await
                .expect("ws send"),
        }
    }

    /// Sends raw bytes: on streams as they are, on WebSocket as one binary message.
    pub async fn send_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Stream { io, .. } => {
                io.write_all(b).await?;
                io.flush().await
            }
            Inner::Ws(ws) => ws
                .send(Message::Binary(Bytes::copy_from_slice(b)))
                .await
                .map_err(std::io::Error::other),
        }
    }

    pub async fn send_ws_message(&mut self, m: Message) {
        match &mut self.inner {
            Inner::Ws(ws) => ws.send(m).await.expect("ws send"),
            Inner::Stream { .. } => panic!("not a WebSocket client"),
        }
    }

    /// Half-closes the write side (TCP FIN). No-op on WebSocket.
    pub async fn shutdown_write(&mut self) {
        if let Inner::Stream { io, .. } = &mut self.inner {
            let _ = io.shutdown().await;
        }
    }

    /// The next frame or the end of the connection (fails after [`TIMEOUT`]).
    pub async fn read(&mut self) -> Read {
        tokio::time::timeout(TIMEOUT, self.read_inner())
            .await
            .expect("timed out waiting for the relay")
    }

    async fn read_inner(&mut self) -> Read {
        match &mut self.inner {
            Inner::Stream { io, dec, eof } => loop {
                match dec.next_frame() {
                    Ok(Some(f)) => return Read::Frame(f),
                    Ok(None) => {}
                    Err(e) => return Read::Broken(e.to_string()),
                }
                if *eof {
                    return Read::Closed;
                }
                let buf = dec.buffer_mut();
                buf.reserve(64 * 1024);
                match io.read_buf(buf).await {
                    Ok(0) => *eof = true,
                    Ok(_) => {}
                    Err(e) => return Read::Broken(e.to_string()),
                }
            },
            Inner::Ws(ws) => loop {
                match ws.next().await {
                    None => return Read::Closed,
                    Some(Ok(Message::Binary(b))) => return Read::Frame(b),
                    Some(Ok(Message::Close(_))) => return Read::Closed,
                    Some(Ok(Message::Text(t))) => return Read::Broken(format!("text: {t}")),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Read::Broken(e.to_string()),
                }
            },
        }
    }

    /// The next frame; panics on close.
    pub async fn recv(&mut self) -> Frame {
        self.recv_within(TIMEOUT).await
    }

    /// The next frame within `limit` (for waits longer than [`TIMEOUT`] by design, such as
    /// a NATS cluster electing new leaders); panics on close or after `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Frame {
        let read = tokio::time::timeout(limit, self.read_inner())
            .await
            .expect("timed out waiting for the relay");
        match read {
            Read::Frame(b) => Frame::decode(&b).expect("relay sent an undecodable frame"),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    pub async fn recv_bytes(&mut self) -> Bytes {
        match self.read().await {
            Read::Frame(b) => b,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    pub async fn hello(&mut self) -> Welcome {
        self.hello_with(0).await
    }

    /// `Hello` offering `features` (§3.4.6); returns the `Welcome`.
    pub async fn hello_with(&mut self, features: u64) -> Welcome {
        self.send(&Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            features,
            client: Some("relay-tests".into()),
            auth: None,
            account: None,
        }))
        .await;
        match self.recv().await {
            Frame::Welcome(w) => w,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, sub_id: u64, p: TokenPattern) -> SubOk {
        self.send(&sub_frame(sub_id, p)).await;
        match self.recv().await {
            Frame::SubOk(s) => {
                assert_eq!(s.sub_id, sub_id);
                s
            }
            other => panic!("expected SubOk, got {other:?}"),
        }
    }

    pub async fn publish(&mut self, env: Envelope) {
        self.send(&pub_frame(env)).await;
    }

    pub async fn expect_msg(&mut self) -> Msg {
        match self.recv().await {
            Frame::Msg(m) => m,
            other => panic!("expected Msg, got {other:?}"),
        }
    }

    pub async fn expect_err(&mut self) -> ErrFrame {
        match self.recv().await {
            Frame::Err(e) => e,
            other => panic!("expected Err, got {other:?}"),
        }
    }

    /// Reads until the connection ends; returns the frames seen and whether it ended
    /// cleanly (EOF/close rather than a reset).
    pub async fn drain_to_end(&mut self) -> (Vec<Frame>, bool) {
        let mut frames = Vec::new();
        loop {
            match self.read().await {
                Read::Frame(b) => frames.push(Frame::decode(&b).expect("decodable frame")),
                Read::Closed => return (frames, true),
                Read::Broken(_) => return (frames, false),
            }
        }
    }

    /// Expects a fatal Err with `code`, then the end of the connection.
    pub async fn expect_fatal(&mut self, code: whispeer_protocol::ErrorCode) -> ErrFrame {
        let (frames, _) = self.drain_to_end().await;
        let err = frames
            .iter()
            .find_map(|f| match f {
                Frame::Err(e) => Some(e.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("expected Err({code:?}), got {frames:?}"));
        assert_eq!(err.code, code, "{err:?}");
        assert!(err.fatal, "{err:?}");
        err
    }
}

/// A greeted client subscribed to `p`.
pub async fn subscriber_tcp(addr: SocketAddr, p: TokenPattern) -> Client {
    let mut c = Client::tcp(addr).await;
    c.hello().await;
    c.subscribe(1, p).await;
    c
}

pub async fn subscriber_ws(addr: SocketAddr, p: TokenPattern) -> Client {
    let mut c = Client::ws(addr).await;
    c.hello().await;
    c.subscribe(1, p).await;
    c
}

/// A relay library instance on real 127.0.0.1 sockets, stopped on drop.
pub struct TestRelay {
    pub addrs: BoundAddrs,
    pub handle: RelayHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

impl TestRelay {
    pub async fn start(config: Config) -> Self {
        let relay = Relay::bind(config).await.expect("relay binds");
        Self::run(relay)
    }

    pub fn run(relay: Relay) -> Self {
        let addrs = relay.addrs();
        let handle = relay.handle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("relay runs");
        });
        Self {
            addrs,
            handle,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub fn ws(&self) -> SocketAddr {
        self.addrs.ws.expect("ws listener")
    }
    pub fn tcp(&self) -> SocketAddr {
        self.addrs.tcp.expect("tcp listener")
    }

    /// Stops the relay and waits until it finished draining.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(TIMEOUT, done)
                .await
                .expect("relay stops")
                .expect("relay task");
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A fresh empty directory under the system temp dir.
///
/// Named `whispeer-relay-test-PID-TAG-N`. Tests hand the path to relays they SIGKILL, so
/// nothing removes it when a test ends; instead the first call in each test process
/// removes the directories of test processes that have exited (their PID has no `/proc`
/// entry): leftovers never outlive the next test binary. (898 of them, up to 280 MB each,
/// had filled this machine's disk until a link failed with a bus error.)
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_dead_processes_dirs);
    let dir = std::env::temp_dir().join(format!(
        "whispeer-relay-test-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A pattern for everything under key id `key` (`[key, #]`).
pub fn all_of(key: [u8; 16]) -> TokenPattern {
    TokenPattern::new(
        KeyId::from_bytes(key),
        vec![whispeer_protocol::PatternElem::Rest],
    )
    .unwrap()
}

/// A client whose TCP connection comes from `ip` (a tenant when accounts are off),
/// greeted with `features`; the relay's `Welcome` with it.
pub async fn greeted_from(ip: &str, relay: SocketAddr, features: u64) -> (Client, Welcome) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let io = sock.connect(relay).await.expect("connect");
    io.set_nodelay(true).unwrap();
    let mut c = Client::over_stream(Box::new(io));
    let w = c.hello_with(features).await;
    (c, w)
}

/// An 8 MiB tmpfs mounted for one test, unmounted on drop (also on panic). `None` when it
/// cannot be mounted (not root): the caller says SKIPPED rather than pass quietly.
pub struct SmallDisk {
    pub dir: PathBuf,
}

impl SmallDisk {
    pub fn mount(tag: &str) -> Option<Self> {
        Self::mount_mib(tag, 8)
    }

    /// A tmpfs of `mib` MiB (root only; `None` otherwise).
    pub fn mount_mib(tag: &str, mib: u32) -> Option<Self> {
        let dir = temp_dir(tag);
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .ok()?;
        st.success().then_some(Self { dir })
    }

    /// Fills the filesystem with the file `name` until the disk is full; its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Removes `whispeer-relay-test-PID-…` directories whose process has exited.
fn remove_dead_processes_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("whispeer-relay-test-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The real binary, started with `--ready-file`; killed on drop if still running.
pub struct BinRelay {
    pub child: Child,
    pub addrs: BoundAddrs,
    pub dir: PathBuf,
    /// The relay's log lines (only with [`BinRelay::start_logged`]).
    pub log: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

impl BinRelay {
    /// Starts `whispeer-relay serve` on port-0 listeners plus `extra` arguments and waits
    /// for its ready file.
    pub fn start(extra: &[&str]) -> Self {
        Self::spawn(extra, false)
    }

    /// Like [`start`](Self::start), with the relay's stderr read line by line into
    /// [`log`](Self::log) (and echoed), so a test can wait for a log event.
    pub fn start_logged(extra: &[&str]) -> Self {
        Self::spawn(extra, true)
    }

    /// Waits for a log line containing every one of `needles` (needs `start_logged`).
    /// Forgets the log lines read so far, so the next [`wait_log`](Self::wait_log) waits
    /// for a line written from now on (or still on its way from the relay's stderr).
    pub fn skip_log(&mut self) {
        let log = self.log.as_mut().expect("started with start_logged");
        while log.try_recv().is_ok() {}
    }

    pub async fn wait_log(&mut self, needles: &[&str]) -> String {
        let log = self.log.as_mut().expect("started with start_logged");
        let found = tokio::time::timeout(TIMEOUT, async {
            while let Some(line) = log.recv().await {
                if needles.iter().all(|n| line.contains(n)) {
                    return line;
                }
            }
            panic!("the relay's stderr ended before a line with {needles:?}");
        });
        found
            .await
            .unwrap_or_else(|_| panic!("no log line with {needles:?} within {TIMEOUT:?}"))
    }

    fn spawn(extra: &[&str], logged: bool) -> Self {
        let dir = temp_dir("bin");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"));
        cmd.args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--ready-file",
            "-",
        ])
        .args(extra)
        .env_remove("RUST_LOG")
        .env("WHISPEER_LOG", "warn")
        // The durable store lives in the test's own directory (flags still override).
        .env("WHISPEER_STORE_PATH", dir.join("relay.db"))
        // No free-space reserve (default 256 MiB): with less than that free in TMPDIR every
        // stored publish would be refused. The reserve's own tests set it (flags override).
        .env("WHISPEER_STORE_MIN_FREE_BYTES", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if logged {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
        let mut child = cmd.spawn().expect("spawn whispeer-relay");
        let log = child.stderr.take().map(|stderr| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    let _ = tx.send(line);
                }
            });
            rx
        });
        let addrs = wait_ready(&mut child);
        Self {
            child,
            addrs,
            dir,
            log,
        }
    }

    pub fn ws(&self) -> SocketAddr {
        self.addrs.ws.expect("ws")
    }
    pub fn tcp(&self) -> SocketAddr {
        self.addrs.tcp.expect("tcp")
    }
    pub fn admin(&self) -> SocketAddr {
        self.addrs.admin.expect("admin")
    }

    /// Its admin `/status` (no token: counts only).
    pub async fn status(&self) -> whispeer_relay::admin::Status {
        serde_json::from_slice(
            &whispeer_relay::admin::http_get(&self.admin().to_string(), "/status")
                .await
                .unwrap(),
        )
        .unwrap()
    }

    /// Polls `/status` until `f` holds (bounded by [`TIMEOUT`]): the store's counts change
    /// with no event a client sees (a sweep, another relay's record).
    pub async fn wait_status(
        &self,
        what: &str,
        f: impl Fn(&whispeer_relay::admin::Status) -> bool,
    ) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let s = self.status().await;
            if f(&s) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends SIGTERM (via kill(1): the test crate has no unsafe code).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends `SIG<sig>` via kill(1): `STOP` freezes the relay (a relay falling behind, or
    /// stalled), `CONT` lets it run again.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (blocking; call from spawn_blocking in async tests).
    /// A watchdog SIGKILLs it after [`TIMEOUT`], and the test fails.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let (done, watch) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let late =
                watch.recv_timeout(TIMEOUT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
            if late {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            late
        });
        let status = self.child.wait().expect("wait");
        drop(done);
        assert!(
            !watchdog.join().unwrap(),
            "relay did not exit within {TIMEOUT:?}"
        );
        status
    }
}

impl Drop for BinRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for the ready line of a relay started with `--ready-file -` and stdout piped: an
/// event (the line, or end of stream when the process exits first), bounded by
/// [`TIMEOUT`]. Stdout is drained afterwards so the relay never writes into a closed pipe.
pub fn wait_ready(child: &mut Child) -> BoundAddrs {
    use std::io::BufRead;
    let stdout = child
        .stdout
        .take()
        .expect("start the relay with --ready-file - and stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
        for _ in lines.map_while(Result::ok) {}
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(Some(line)) => serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line is not the addresses ({e}): {line}")),
        Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().expect("wait");
            panic!("whispeer-relay exited before it was ready: {status}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("whispeer-relay not ready after {TIMEOUT:?}")
        }
    }
}

/// Publishes on a probe topic and checks the probe subscriber gets exactly that message:
/// proof that the relay still routes for other clients.
pub struct Probe {
    pub publisher: Client,
    pub subscriber: Client,
    n: u64,
}

impl Probe {
    pub const KEY: u8 = 200;

    pub async fn new(addr: SocketAddr) -> Self {
        let subscriber = subscriber_tcp(addr, exact(Self::KEY, &[1])).await;
        let mut publisher = Client::tcp(addr).await;
        publisher.hello().await;
        Self {
            publisher,
            subscriber,
            n: 0,
        }
    }

    pub async fn check(&mut self, context: &str) {
        self.n += 1;
        let env = envelope_sized(Self::KEY, &[1], 16 + self.n as usize);
        self.publisher.publish(env.clone()).await;
        let msg = self.subscriber.expect_msg().await;
        assert_eq!(msg.envelope, env, "probe after {context}");
    }
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// A metric's value from a relay's admin port (0 when absent).
pub async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let body = whispeer_relay::admin::http_get(&format!("http://{admin}"), "/metrics")
        .await
        .unwrap();
    metric_value(std::str::from_utf8(&body).unwrap(), name)
}

/// Waits until a relay's metric `name` (from its admin port) reaches `at_least`, for at
/// most 30 s: for counters that move on the relay's own schedule, after what a test can
/// wait on (an acknowledged publish is stored before it is routed to subscribers).
pub async fn wait_metric(admin: SocketAddr, name: &str, at_least: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = metric(admin, name).await;
        if v >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {v} (< {at_least})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A metric's value in Prometheus text (0 when absent); `name` includes any labels.
pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `whispeer-relay account add NAME --file FILE ARGS…`; returns stdout.
#[allow(dead_code)]
pub fn account_add(file: &std::path::Path, name: &str, args: &[&str]) -> String {
    let file = file.to_str().expect("a UTF-8 path");
    let mut all = vec!["account", "add", name, "--file", file];
    all.extend_from_slice(args);
    relay_cli(&all)
}

/// Runs `whispeer-relay ARGS…`, which must succeed; returns its stdout.
#[allow(dead_code)]
pub fn relay_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
        .args(args)
        .output()
        .expect("run whispeer-relay");
    assert!(
        out.status.success(),
        "whispeer-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A QoS 1 subscriber of `[1]` under key `k` replaying from the start with `credit`
/// (features: at-least-once, flow control, replay); returns after its `SubOk`.
pub async fn replay_subscriber(addr: SocketAddr, k: u8, credit: u64) -> Client {
    let mut s = Client::tcp(addr).await;
    s.send(&Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: whispeer_protocol::frame::features::AT_LEAST_ONCE
            | whispeer_protocol::frame::features::FLOW_CONTROL
            | whispeer_protocol::frame::features::REPLAY,
        client: None,
        auth: None,
        account: None,
    }))
    .await;
    assert!(matches!(s.recv().await, Frame::Welcome(_)));
    s.send(&replay_sub(
        1,
        exact(k, &[1]),
        Qos::AtLeastOnce,
        Some(credit),
    ))
    .await;
    assert!(matches!(s.recv().await, Frame::SubOk(_)));
    s
}

/// A `Sub` replaying everything stored under `pattern` from the start, then live.
pub fn replay_sub(sub_id: u64, pattern: TokenPattern, qos: Qos, credit: Option<u64>) -> Frame {
    Frame::Sub(Sub {
        sub_id,
        pattern,
        qos,
        durable: None,
        replay: Some(whispeer_protocol::frame::Replay::FromSeq(0)),
        retained: false,
        credit,
        owner: None,
    })
}

/// Sends a WebSocket upgrade request on a raw socket and reads the response head (up to the
/// blank line); `None` when the relay closed the socket first. For tests that speak the
/// WebSocket framing themselves.
pub async fn raw_ws_upgrade(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .ok()?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

/// A self-signed certificate and key for the relay in `dir` (`whispeer-relay tls
/// generate`); returns the certificate's path and the relay flags serving QUIC with them on
/// a free loopback port.
#[allow(dead_code)]
pub fn quic_relay_args(dir: &std::path::Path) -> (PathBuf, Vec<String>) {
    let (cert, key) = (dir.join("relay.crt"), dir.join("relay.key"));
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    relay_cli(&["tls", "generate", "--cert", cert_s, "--key", key_s]);
    let args = [
        "--quic",
        "127.0.0.1:0",
        "--tls-cert",
        cert_s,
        "--tls-key",
        key_s,
    ]
    .map(String::from)
    .to_vec();
    (cert, args)
}

/// A QUIC client endpoint on `from` (a loopback address) trusting the relay certificate in
/// `cert` (PEM).
#[allow(dead_code)]
pub fn quic_endpoint(cert: &std::path::Path, from: &str) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"whispeer".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let bind = std::net::SocketAddr::new(from.parse().unwrap(), 0);
    let mut endpoint = quinn::Endpoint::client(bind).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    endpoint
}
