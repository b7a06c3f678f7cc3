//! The shared scenario suite (issue 13, "one scenario suite, two drivers"), run with the
//! tokio `Client`: every `tests/scenarios/*.json` against the real `whispeer-relay` binary,
//! clients connected directly or through a fault proxy on 127.0.0.1. The same files are run
//! by the npm package's runner (`client-wasm/test/scenarios/run.test.js`); the format is
//! specified in `tests/scenarios/README.md`. Waits poll their condition against a deadline.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use whispeer::protocol::Qos;
use whispeer::{
    Client, ConnectionState, Encryption, Identity, Keyring, PublishOptions, ReceiveError,
    Reconnect, Replay, SubscribeOptions, TreeKey, WebSocket,
};

/// How long one wait may take before the scenario fails (only a broken run gets there).
const DEADLINE: Duration = Duration::from_secs(60);
/// How long an expectation waits for its client's flush at most.
const SETTLE: Duration = Duration::from_secs(5);
const CONTENT_TYPE: &str = "application/octet-stream";

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------------------------------
// The relay binary: started on a chosen WebSocket port with a store, killed with SIGKILL.

fn relay_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WHISPEER_RELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile.join(format!("whispeer-relay{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "whispeer-relay", "--bin", "whispeer-relay"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(target) = profile.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        if profile.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building whispeer-relay failed"
        );
    }
    bin
}

struct RelaySpec {
    sqlite: bool,
    limits: Vec<(String, String)>,
}

struct Relay {
    spec: RelaySpec,
    dir: tempfile::TempDir,
    child: Option<Child>,
    ws: SocketAddr,
}

impl Relay {
    async fn start(spec: RelaySpec) -> Res<Relay> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut r = Relay {
            spec,
            dir,
            child: None,
            ws: "127.0.0.1:0".parse().unwrap(),
        };
        r.spawn().await?;
        Ok(r)
    }

    /// Starts the binary on `self.ws` (port 0 the first time) and waits for its ready line
    /// on stdout (`--ready-file -`): an event, or end of stream if it exits first.
    async fn spawn(&mut self) -> Res<()> {
        let mut cmd = Command::new(relay_binary());
        cmd.arg("serve")
            .args(["--ws", &self.ws.to_string()])
            .args(["--tcp", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--ready-file", "-"]);
        if self.spec.sqlite {
            cmd.args(["--store", "sqlite", "--store-path"])
                .arg(self.dir.path().join("relay.db"));
        } else {
            cmd.args(["--store", "memory"]);
        }
        for (k, v) in &self.spec.limits {
            cmd.arg(format!("--{k}")).arg(v);
        }
        let mut child = cmd
            // No free-space reserve on a small TMPDIR (the relay's own tests cover it).
            .env("WHISPEER_STORE_MIN_FREE_BYTES", "0")
            .env_remove("RUST_LOG")
            .env("WHISPEER_LOG", "warn")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn whispeer-relay: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            // Keep draining so the relay never writes into a closed pipe.
            for _ in lines.map_while(Result::ok) {}
        });
        let line = match tokio::time::timeout(DEADLINE, rx).await {
            Ok(Ok(Some(line))) => line,
            Ok(_) => {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!("the relay exited before it was ready: {status}"));
            }
            Err(_) => {
                let _ = child.kill();
                return Err("the relay printed no ready line".into());
            }
        };
        let text: Value =
            serde_json::from_str(&line).map_err(|e| format!("ready line {line:?}: {e}"))?;
        self.ws = text["ws"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("ready file without ws: {text}"))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// The fault proxy: one per client connected `via: proxy`, forwarding to the relay's
// WebSocket port (the same after a restart).

#[derive(Clone)]
struct Proxy {
    addr: SocketAddr,
    /// Bumped by `cut`: every connection open at that moment is dropped (both sides).
    cut: Arc<watch::Sender<u64>>,
    up_stalled: Arc<watch::Sender<bool>>,
    down_stalled: Arc<watch::Sender<bool>>,
    duplicate: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Proxy {
            addr: listener.local_addr().unwrap(),
            cut: Arc::new(watch::Sender::new(0)),
            up_stalled: Arc::new(watch::Sender::new(false)),
            down_stalled: Arc::new(watch::Sender::new(false)),
            duplicate: Arc::new(AtomicBool::new(false)),
        };
        let q = p.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cut = q.cut.subscribe();
                cut.borrow_and_update();
                let Ok(relay) = tokio::net::TcpStream::connect(upstream).await else {
                    continue; // the relay is down: the client sees the connection close
                };
                let (cr, cw) = client.into_split();
                let (rr, rw) = relay.into_split();
                let up = pipe(cr, rw, q.up_stalled.subscribe(), cut.clone(), None);
                let down = pipe(
                    rr,
                    cw,
                    q.down_stalled.subscribe(),
                    cut.clone(),
                    Some(q.duplicate.clone()),
                );
                tokio::spawn(async move {
                    // Dropping every half cuts the connection abruptly.
                    tokio::select! {
                        biased;
                        _ = cut.changed() => {}
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        p
    }
}

/// Copies `from` to `to`; reads nothing while `stalled`. With `duplicate` (relay → client),
/// the stream is parsed as WebSocket frames after the HTTP upgrade answer and, while the flag
/// is set, every binary frame holding a relay `Msg` (CBOR map, key 0 = 7) is written twice.
/// Once `cut` changes nothing more is written (the connection task drops both sockets).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    cut: watch::Receiver<u64>,
    duplicate: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut upgraded = false;
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = from.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        // A read that was waiting when the stall began is held too.
        if stalled.wait_for(|s| !*s).await.is_err() || cut.has_changed().unwrap_or(true) {
            return;
        }
        let Some(dup) = &duplicate else {
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            continue;
        };
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::with_capacity(pending.len() * 2);
        let mut used = 0;
        if !upgraded {
            match pending.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(end) => {
                    used = end + 4;
                    out.extend_from_slice(&pending[..used]);
                    upgraded = true;
                }
                None => continue,
            }
        }
        while let Some(len) = ws_frame_len(&pending[used..]) {
            let frame = &pending[used..used + len];
            out.extend_from_slice(frame);
            if dup.load(Ordering::SeqCst) && is_msg_frame(frame) {
                out.extend_from_slice(frame);
            }
            used += len;
        }
        pending.drain(..used);
        if cut.has_changed().unwrap_or(true) || to.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The length of the complete WebSocket frame at the start of `b`, if it is all there.
fn ws_frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut head) = match b[1] & 0x7f {
        126 => (
            u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    if masked {
        head += 4;
    }
    (b.len() >= head + len).then_some(head + len)
}

/// A final, unmasked, uncompressed binary frame whose payload is a relay `Msg`.
fn is_msg_frame(f: &[u8]) -> bool {
    let head = match f[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    f[0] == 0x82 && f[1] & 0x80 == 0 && f.get(head + 1) == Some(&0) && f.get(head + 2) == Some(&7)
}

// ---------------------------------------------------------------------------------------
// Actors: clients, their subscriptions and their publishes.

#[derive(Default)]
struct SubLog {
    received: Vec<(String, u64)>,
    lost: u64,
    ended: bool,
}

struct Sub {
    client: String,
    log: Arc<Mutex<SubLog>>,
    reading: watch::Sender<bool>,
}

#[derive(Default)]
struct PubLog {
    /// QoS >= 1 publishes the relay acknowledged.
    acked: Vec<(String, u64)>,
    /// QoS 0 publishes handed to the connection.
    sent: u64,
    failed: Vec<String>,
    running: usize,
}

struct Actor {
    client: Client,
    log: Arc<Mutex<PubLog>>,
}

struct World {
    relay: Relay,
    trees: HashMap<String, TreeKey>,
    identities: HashMap<String, Identity>,
    proxies: HashMap<String, Proxy>,
    clients: HashMap<String, Actor>,
    subs: HashMap<String, Sub>,
    next_index: HashMap<String, u64>,
    progress: Arc<Notify>,
}

/// Payload of message `i`: `i` as 8 bytes big-endian, then zeros up to `size`.
fn payload(i: u64, size: usize) -> Vec<u8> {
    let mut p = i.to_be_bytes().to_vec();
    p.resize(size.max(8), 0);
    p
}

fn index_of(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------
// Reading a step: every key must be known, so a typo fails instead of being ignored.

struct Step<'a> {
    obj: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Step<'a> {
    fn str(&mut self, k: &'static str) -> Res<&'a str> {
        self.opt_str(k)?.ok_or_else(|| format!("missing \"{k}\""))
    }
    fn opt_str(&mut self, k: &'static str) -> Res<Option<&'a str>> {
        self.used.push(k);
        match self.obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be a string")),
        }
    }
    fn opt_u64(&mut self, k: &'static str) -> Res<Option<u64>> {
        self.used.push(k);
        match self.obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be a count")),
        }
    }
    fn opt_bool(&mut self, k: &'static str) -> Res<Option<bool>> {
        self.used.push(k);
        match self.obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be a boolean")),
        }
    }
    fn opt(&mut self, k: &'static str) -> Option<&'a Value> {
        self.used.push(k);
        self.obj.get(k)
    }
    fn done(&self) -> Res<()> {
        match self.obj.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(format!("unknown key \"{k}\"")),
            None => Ok(()),
        }
    }
}

fn qos(n: Option<u64>) -> Res<Qos> {
    match n.unwrap_or(0) {
        0 => Ok(Qos::AtMostOnce),
        1 => Ok(Qos::AtLeastOnce),
        2 => Ok(Qos::ExactlyOnce),
        q => Err(format!("qos {q} is not 0, 1 or 2")),
    }
}

fn ranges(v: &Value) -> Res<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for r in v.as_array().ok_or("a message list is an array of ranges")? {
        let topic = r["topic"].as_str().ok_or("a range needs \"topic\"")?;
        let from = r["from"].as_u64().ok_or("a range needs \"from\"")?;
        let to = r["to"].as_u64().ok_or("a range needs \"to\"")?;
        out.extend((from..=to).map(|i| (topic.to_string(), i)));
    }
    Ok(out)
}

fn show(list: &[(String, u64)]) -> String {
    // Runs of consecutive indices on one topic, so a long list stays readable.
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let mut j = i;
        while j + 1 < list.len() && list[j + 1].0 == list[i].0 && list[j + 1].1 == list[j].1 + 1 {
            j += 1;
        }
        parts.push(if i == j {
            format!("{}:{}", list[i].0, list[i].1)
        } else {
            format!("{}:{}..={}", list[i].0, list[i].1, list[j].1)
        });
        i = j + 1;
    }
    format!("[{}]", parts.join(", "))
}

impl World {
    async fn connect(&mut self, s: &mut Step<'_>) -> Res<()> {
        let name = s.str("client")?.to_string();
        let via = s.opt_str("via")?.unwrap_or("direct");
        let tree_name = s.opt_str("tree")?.unwrap_or("t").to_string();
        let capacity = s.opt_u64("capacity")?;
        let identity = s.opt_str("identity")?;
        s.done()?;
        if self.clients.contains_key(&name) {
            return Err(format!("client {name} exists"));
        }
        let tree = self
            .trees
            .entry(tree_name.clone())
            .or_insert_with(|| TreeKey::generate(&tree_name).unwrap());
        let mut keys = Keyring::new();
        keys.add_tree_key(tree).map_err(|e| e.to_string())?;
        let id = match identity {
            Some(n) => self
                .identities
                .entry(n.to_string())
                .or_insert_with(Identity::generate)
                .clone(),
            None => Identity::generate(),
        };
        let url = match via {
            "direct" => format!("ws://{}", self.relay.ws),
            "proxy" => {
                let p = Proxy::start(self.relay.ws).await;
                let url = format!("ws://{}", p.addr);
                self.proxies.insert(name.clone(), p);
                url
            }
            v => return Err(format!("via {v:?} is not direct or proxy")),
        };
        let mut b = Client::builder()
            .with(WebSocket::new(url))
            .with(Encryption::with_keyring(keys))
            .with(id)
            .with(Reconnect::new(
                Duration::from_millis(20),
                Duration::from_millis(200),
            ));
        if let Some(c) = capacity {
            b = b.subscription_capacity(c as usize);
        }
        let client = b
            .connect()
            .await
            .map_err(|e| format!("connect {name}: {e}"))?;
        self.clients.insert(
            name,
            Actor {
                client,
                log: Arc::default(),
            },
        );
        Ok(())
    }

    fn client(&self, name: &str) -> Res<&Actor> {
        self.clients
            .get(name)
            .ok_or_else(|| format!("no client {name}"))
    }

    async fn subscribe(&mut self, s: &mut Step<'_>) -> Res<()> {
        let client = s.str("client")?.to_string();
        let name = s.str("sub")?.to_string();
        let filter = s.str("filter")?;
        let mut opts = SubscribeOptions::new().qos(qos(s.opt_u64("qos")?)?);
        if let Some(r) = s.opt("replay") {
            let r = r.as_object().ok_or("\"replay\" is an object")?;
            let replay = match (r.get("fromSeq"), r.get("sinceMs"), r.get("last")) {
                (Some(v), None, None) => Replay::FromSeq(v.as_u64().ok_or("fromSeq")?),
                (None, Some(v), None) => Replay::SinceMs(v.as_u64().ok_or("sinceMs")?),
                (None, None, Some(v)) => Replay::LastN(v.as_u64().ok_or("last")?),
                _ => return Err("\"replay\" has exactly one of fromSeq, sinceMs, last".into()),
            };
            opts = opts.replay(replay);
        }
        if let Some(d) = s.opt_str("durable")? {
            opts = opts.durable(d);
        }
        if let Some(c) = s.opt_u64("capacity")? {
            opts = opts.capacity(c);
        }
        let reading = s.opt_bool("reading")?.unwrap_or(true);
        s.done()?;
        if self.subs.contains_key(&name) {
            return Err(format!("subscription {name} exists"));
        }
        let c = self.client(&client)?.client.clone();
        let mut sub = c
            .subscribe_bytes_with_options(filter, opts)
            .await
            .map_err(|e| format!("subscribe {name}: {e}"))?;
        let log = Arc::new(Mutex::new(SubLog::default()));
        let (reading_tx, mut reading_rx) = watch::channel(reading);
        let (l, progress) = (log.clone(), self.progress.clone());
        tokio::spawn(async move {
            loop {
                if reading_rx.wait_for(|r| *r).await.is_err() {
                    break;
                }
                let item = sub.next_message().await;
                {
                    let mut l = l.lock().unwrap();
                    match item {
                        Some(Ok(m)) => {
                            let i = index_of(&m.value).unwrap_or(u64::MAX);
                            l.received.push((m.topic.to_string(), i));
                        }
                        Some(Err(ReceiveError::Lagged(n))) => l.lost += n,
                        Some(Err(e)) => {
                            l.received.push((format!("error: {e}"), u64::MAX));
                        }
                        None => l.ended = true,
                    }
                    if l.ended {
                        progress.notify_waiters();
                        break;
                    }
                }
                progress.notify_waiters();
            }
        });
        self.subs.insert(
            name,
            Sub {
                client,
                log,
                reading: reading_tx,
            },
        );
        Ok(())
    }

    async fn publish(&mut self, s: &mut Step<'_>) -> Res<()> {
        let client = s.str("client")?;
        let topic = s.str("topic")?.to_string();
        let count = s.opt_u64("count")?.unwrap_or(1);
        let q = qos(s.opt_u64("qos")?)?;
        let size = s.opt_u64("size")?.unwrap_or(8) as usize;
        let window = s.opt_u64("window")?.unwrap_or(1).max(1) as usize;
        let background = s.opt_bool("background")?.unwrap_or(false);
        s.done()?;
        let actor = self.client(client)?;
        let (c, log, progress) = (
            actor.client.clone(),
            actor.log.clone(),
            self.progress.clone(),
        );
        let next = self.next_index.entry(topic.clone()).or_insert(0);
        let first = *next;
        *next += count;
        log.lock().unwrap().running += 1;
        let run = async move {
            let opts = PublishOptions::default().qos(q);
            let mut inflight = FuturesUnordered::new();
            let mut i = first;
            loop {
                // Futures are polled in the order they were pushed: publishes leave in order.
                while inflight.len() < window && i < first + count {
                    let (c, topic, body) = (c.clone(), topic.clone(), payload(i, size));
                    inflight.push(async move {
                        let r = c
                            .publish_bytes_with(&topic, CONTENT_TYPE, &body, opts)
                            .await;
                        (topic, i, r)
                    });
                    i += 1;
                }
                let Some((topic, i, r)) = inflight.next().await else {
                    break;
                };
                let mut l = log.lock().unwrap();
                match r {
                    // QoS 0 resolves once handed to the connection: sent, not acknowledged.
                    Ok(_) if q == Qos::AtMostOnce => l.sent += 1,
                    Ok(_) => l.acked.push((topic, i)),
                    Err(e) => l.failed.push(format!("{topic}:{i}: {e}")),
                }
                drop(l);
                progress.notify_waiters();
            }
            log.lock().unwrap().running -= 1;
            progress.notify_waiters();
        };
        if background {
            tokio::spawn(run);
        } else {
            run.await;
        }
        Ok(())
    }

    fn proxy(&mut self, s: &mut Step<'_>) -> Res<()> {
        let client = s.str("client")?;
        let action = s.str("action")?;
        s.done()?;
        let p = self
            .proxies
            .get(client)
            .ok_or_else(|| format!("client {client} is not behind a proxy"))?;
        match action {
            "cut" => {
                p.cut.send_modify(|g| *g += 1);
            }
            "stall" => {
                p.up_stalled.send_replace(true);
            }
            "stall_down" => {
                p.down_stalled.send_replace(true);
            }
            "resume" => {
                p.up_stalled.send_replace(false);
                p.down_stalled.send_replace(false);
            }
            "duplicate" => p.duplicate.store(true, Ordering::SeqCst),
            "pass" => p.duplicate.store(false, Ordering::SeqCst),
            a => return Err(format!("unknown proxy action {a:?}")),
        }
        Ok(())
    }

    async fn relay(&mut self, s: &mut Step<'_>) -> Res<()> {
        let action = s.str("action")?;
        s.done()?;
        match action {
            "kill" => self.relay.kill(),
            "start" => self.relay.spawn().await?,
            "restart" => {
                self.relay.kill();
                self.relay.spawn().await?;
            }
            a => return Err(format!("unknown relay action {a:?}")),
        }
        Ok(())
    }

    /// Polls `cond` until it holds, woken by any subscription or publish event, at least
    /// every 10 ms (client counters and states); fails after [`DEADLINE`].
    async fn until(&self, what: &str, mut cond: impl FnMut(&World) -> Res<bool>) -> Res<()> {
        let start = Instant::now();
        loop {
            let woken = self.progress.notified();
            if cond(self)? {
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                return Err(format!("timed out after {DEADLINE:?} waiting for {what}"));
            }
            let _ = tokio::time::timeout(Duration::from_millis(10), woken).await;
        }
    }

    fn sub(&self, name: &str) -> Res<&Sub> {
        self.subs
            .get(name)
            .ok_or_else(|| format!("no subscription {name}"))
    }

    async fn wait(&mut self, s: &mut Step<'_>) -> Res<()> {
        if let Some(sub) = s.opt_str("sub")? {
            let received = s.opt_u64("received")?;
            let accounted = s.opt_u64("accounted")?;
            s.done()?;
            let log = self.sub(sub)?.log.clone();
            return match (received, accounted) {
                (Some(n), None) => {
                    let r = self
                        .until(&format!("{sub} to receive {n}"), |_| {
                            Ok(log.lock().unwrap().received.len() as u64 >= n)
                        })
                        .await;
                    let l = log.lock().unwrap();
                    r.map_err(|e| format!("{e} (received {})", show(&l.received)))
                }
                (None, Some(n)) => {
                    let r = self
                        .until(&format!("{sub} to receive or lose {n}"), |_| {
                            let l = log.lock().unwrap();
                            Ok(l.received.len() as u64 + l.lost >= n)
                        })
                        .await;
                    let l = log.lock().unwrap();
                    let stats = self.client(&self.sub(sub)?.client)?.client.stats();
                    r.map_err(|e| {
                        format!(
                            "{e} (received {}, lost {}; client {stats:?})",
                            l.received.len(),
                            l.lost
                        )
                    })
                }
                _ => Err("wait on a sub needs one of received, accounted".into()),
            };
        }
        let name = s.str("client")?;
        let acked = s.opt_u64("acked")?;
        let published = s.opt_bool("published")?;
        let duplicates = s.opt_u64("duplicates")?;
        let state = s.opt_str("state")?;
        s.done()?;
        let actor = self.client(name)?;
        let (log, c) = (actor.log.clone(), actor.client.clone());
        match (acked, published, duplicates, state) {
            (Some(n), None, None, None) => {
                self.until(
                    &format!("{name} to have {n} publishes acknowledged"),
                    |_| Ok(log.lock().unwrap().acked.len() as u64 >= n),
                )
                .await
            }
            (None, Some(true), None, None) => {
                self.until(&format!("{name} to finish publishing"), |_| {
                    Ok(log.lock().unwrap().running == 0)
                })
                .await
            }
            (None, None, Some(n), None) => {
                self.until(&format!("{name} to count {n} duplicates"), |_| {
                    Ok(c.stats().core.duplicates >= n)
                })
                .await
            }
            (None, None, None, Some(st)) => {
                let want = match st {
                    "connected" => |s: ConnectionState| s == ConnectionState::Connected,
                    "reconnecting" => {
                        |s: ConnectionState| matches!(s, ConnectionState::Reconnecting(_))
                    }
                    "closed" => |s: ConnectionState| s == ConnectionState::Closed,
                    o => return Err(format!("unknown state {o:?}")),
                };
                self.until(&format!("{name} to be {st}"), |_| Ok(want(c.state())))
                    .await
            }
            _ => Err("wait on a client needs one of acked, published, duplicates, state".into()),
        }
    }

    async fn expect(&mut self, s: &mut Step<'_>) -> Res<()> {
        if let Some(sub) = s.opt_str("sub")? {
            let exact = s.opt("exact").map(ranges).transpose()?;
            let once = s.opt("once").map(ranges).transpose()?;
            let ordered = s.opt_bool("ordered")?;
            let includes_acked = s.opt_str("includes_acked")?;
            let accounted = s.opt_u64("accounted")?;
            let lost = s.opt_u64("lost")?;
            let lost_min = s.opt_u64("lost_min")?;
            s.done()?;
            let sb = self.sub(sub)?;
            // What the relay sent before now has reached the client.
            settle(&self.client(&sb.client)?.client).await;
            let l = sb.log.lock().unwrap();
            let got = &l.received;
            if let Some(want) = exact {
                if *got != want {
                    return Err(format!(
                        "{sub} received {} — expected exactly {}",
                        show(got),
                        show(&want)
                    ));
                }
            }
            if let Some(want) = once {
                let mut g = got.clone();
                g.sort();
                let mut w = want.clone();
                w.sort();
                if g != w {
                    return Err(format!(
                        "{sub} received {} — expected each of {} exactly once",
                        show(&g),
                        show(&w)
                    ));
                }
            }
            if ordered == Some(true) {
                let mut last: HashMap<&str, u64> = HashMap::new();
                for (t, i) in got {
                    if let Some(p) = last.insert(t, *i) {
                        if p >= *i {
                            return Err(format!("{sub} received {t}:{i} after {t}:{p}"));
                        }
                    }
                }
            }
            if let Some(p) = includes_acked {
                let have: HashSet<&(String, u64)> = got.iter().collect();
                let acked = self.client(p)?.log.lock().unwrap().acked.clone();
                let missing: Vec<_> = acked
                    .iter()
                    .filter(|m| !have.contains(m))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "{sub} lacks {} acknowledged publishes of {p}: {}",
                        missing.len(),
                        show(&missing)
                    ));
                }
            }
            if let Some(n) = accounted {
                let distinct: HashSet<_> = got.iter().collect();
                if distinct.len() != got.len() {
                    return Err(format!("{sub} received a message twice: {}", show(got)));
                }
                if got.len() as u64 + l.lost != n {
                    return Err(format!(
                        "{sub}: {} received + {} reported lost ≠ {n} published",
                        got.len(),
                        l.lost
                    ));
                }
            }
            if let Some(n) = lost {
                if l.lost != n {
                    return Err(format!("{sub} reported {} lost, expected {n}", l.lost));
                }
            }
            if let Some(n) = lost_min {
                if l.lost < n {
                    return Err(format!(
                        "{sub} reported {} lost, expected at least {n}",
                        l.lost
                    ));
                }
            }
            return Ok(());
        }
        let name = s.str("client")?;
        let acked = s.opt_u64("acked")?;
        let failed = s.opt_u64("failed")?;
        let reconnects_min = s.opt_u64("reconnects_min")?;
        let duplicates = s.opt_u64("duplicates")?;
        let delivered = s.opt_u64("delivered")?;
        let held_back = s.opt_u64("held_back")?;
        s.done()?;
        let actor = self.client(name)?;
        if delivered.is_some() || held_back.is_some() {
            // What the relay sent before now has reached the client.
            settle(&actor.client).await;
        }
        if let Some(n) = reconnects_min {
            // A reconnect is an event that may still be on its way (a relay restart the
            // client has not noticed yet): waited for, within the step's deadline.
            let c = actor.client.clone();
            self.until(&format!("{name} to reconnect {n} times"), |_| {
                Ok(c.stats().reconnects >= n)
            })
            .await?;
        }
        let stats = actor.client.stats();
        let l = actor.log.lock().unwrap();
        if let Some(n) = acked {
            if l.acked.len() as u64 != n {
                return Err(format!(
                    "{name} has {} publishes acknowledged, expected {n}",
                    l.acked.len()
                ));
            }
        }
        if let Some(n) = failed {
            if l.failed.len() as u64 != n {
                return Err(format!(
                    "{name} has {} failed publishes, expected {n}: {:?}",
                    l.failed.len(),
                    l.failed
                ));
            }
        }
        if let Some(n) = reconnects_min {
            if stats.reconnects < n {
                return Err(format!(
                    "{name} reconnected {} times, expected at least {n} ({stats:?})",
                    stats.reconnects
                ));
            }
        }
        if let Some(n) = held_back {
            if stats.core.held_back != n {
                return Err(format!(
                    "{name} held back {} messages beyond a subscription's capacity, expected {n}",
                    stats.core.held_back
                ));
            }
        }
        if let Some(n) = delivered {
            if stats.core.delivered != n {
                return Err(format!(
                    "{name} delivered {} messages to its subscriptions, expected {n}",
                    stats.core.delivered
                ));
            }
        }
        if let Some(n) = duplicates {
            if stats.core.duplicates != n {
                return Err(format!(
                    "{name} counted {} duplicates, expected {n}",
                    stats.core.duplicates
                ));
            }
        }
        Ok(())
    }

    async fn step(&mut self, obj: &Map<String, Value>) -> Res<()> {
        let mut s = Step {
            obj,
            used: vec!["do", "note"],
        };
        let op = obj
            .get("do")
            .and_then(Value::as_str)
            .ok_or("a step needs \"do\"")?;
        match op {
            "connect" => self.connect(&mut s).await,
            "close" => {
                let c = s.str("client")?;
                s.done()?;
                self.client(c)?.client.close().await;
                Ok(())
            }
            "flush" => {
                let c = s.str("client")?;
                s.done()?;
                self.client(c)?
                    .client
                    .flush()
                    .await
                    .map_err(|e| format!("flush {c}: {e}"))
            }
            "subscribe" => self.subscribe(&mut s).await,
            "read" => {
                let sub = s.str("sub")?;
                let on = s.opt_bool("on")?.ok_or("read needs \"on\"")?;
                s.done()?;
                self.sub(sub)?.reading.send_replace(on);
                Ok(())
            }
            "publish" => self.publish(&mut s).await,
            "proxy" => self.proxy(&mut s),
            "relay" => self.relay(&mut s).await,
            "wait" => self.wait(&mut s).await,
            "expect" => self.expect(&mut s).await,
            o => Err(format!("unknown step {o:?}")),
        }
    }
}

/// Best effort before an expectation: what the relay sent before now has reached the
/// client (a Ping/Pong round trip). Bounded: a client that is not connected (a stalled or
/// dead link) is checked as it is.
async fn settle(c: &Client) {
    let _ = tokio::time::timeout(SETTLE, c.flush()).await;
}

/// Runs one scenario file; `Err((step index, message))` at the first failing step (index
/// `usize::MAX` for a bad file or relay section).
async fn run(path: &Path) -> Result<(), (usize, String)> {
    let bad = |m: String| (usize::MAX, m);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let relay = v.get("relay").cloned().unwrap_or_default();
    let sqlite = match relay
        .get("store")
        .and_then(Value::as_str)
        .unwrap_or("memory")
    {
        "memory" => false,
        "sqlite" => true,
        o => return Err(bad(format!("store {o:?} is not memory or sqlite"))),
    };
    let mut limits = Vec::new();
    if let Some(l) = relay.get("limits").and_then(Value::as_object) {
        for (k, v) in l {
            let v = match v {
                Value::String(s) => s.clone(),
                o => o.to_string(),
            };
            limits.push((k.clone(), v));
        }
    }
    let relay = Relay::start(RelaySpec { sqlite, limits })
        .await
        .map_err(bad)?;
    let mut w = World {
        relay,
        trees: HashMap::new(),
        identities: HashMap::new(),
        proxies: HashMap::new(),
        clients: HashMap::new(),
        subs: HashMap::new(),
        next_index: HashMap::new(),
        progress: Arc::new(Notify::new()),
    };
    let steps = v["steps"]
        .as_array()
        .ok_or_else(|| bad("no \"steps\" array".into()))?;
    let mut result = Ok(());
    for (i, st) in steps.iter().enumerate() {
        let Some(obj) = st.as_object() else {
            result = Err((i, "a step is an object".into()));
            break;
        };
        if let Err(e) = w.step(obj).await {
            result = Err((i, format!("step {i} {}: {e}", Value::Object(obj.clone()))));
            break;
        }
    }
    for a in w.clients.values() {
        let _ = tokio::time::timeout(Duration::from_secs(5), a.client.close()).await;
    }
    result
}

fn scenario_files() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/scenarios")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files.into_iter().partition(|p| {
        !p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fail_")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_passes_with_the_rust_driver() {
    let (good, _) = scenario_files();
    assert!(
        good.len() >= 6,
        "the six scenarios of issue 13 at least: {good:?}"
    );
    let only = std::env::var("SCENARIO").ok();
    if let Ok(f) = std::env::var("SCENARIO_FILE") {
        run(Path::new(&f)).await.unwrap();
        return;
    }
    let mut failures = Vec::new();
    for f in &good {
        let name = f.file_stem().unwrap().to_string_lossy().to_string();
        if only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        let t = Instant::now();
        match run(f).await {
            Ok(()) => eprintln!("scenario {name}: ok in {:?}", t.elapsed()),
            Err((_, e)) => {
                eprintln!("scenario {name}: FAILED: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n")
    );
}

/// Each `fail_*.json` holds a wrong expectation (its `"fails_at"` names the step): the
/// runner must report a failure at exactly that step — so it can fail at all, and does not
/// fail for a reason other than the one planted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_expectations_are_reported() {
    let (_, bad) = scenario_files();
    assert!(!bad.is_empty(), "fail_*.json files exist");
    let mut wrong = Vec::new();
    for f in &bad {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let at = v["fails_at"]
            .as_u64()
            .expect("fail_*.json names \"fails_at\"") as usize;
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        match run(f).await {
            Ok(()) => wrong.push(format!("{name}: passed, but its expectation is wrong")),
            Err((i, e)) if i == at => eprintln!("{name}: reported as expected: {e}"),
            Err((i, e)) => wrong.push(format!("{name}: failed at step {i}, not {at}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn ws_frames_are_parsed_and_only_msg_frames_duplicated() {
    // Msg {seq: 1, envelope: h'00', flags: 0} as one unmasked binary frame.
    let msg = [
        0x82, 0x0a, 0xa3, 0x00, 0x07, 0x01, 0x01, 0x02, 0x41, 0x00, 0x03,
    ];
    assert_eq!(ws_frame_len(&msg), None, "one byte short");
    let msg = [
        0x82, 0x0a, 0xa3, 0x00, 0x07, 0x01, 0x01, 0x02, 0x41, 0x00, 0x03, 0x00,
    ];
    assert_eq!(ws_frame_len(&msg), Some(12));
    assert!(is_msg_frame(&msg));
    // Pong {nonce: 42}
    let pong = [0x82, 0x06, 0xa2, 0x00, 0x0c, 0x01, 0x18, 0x2a];
    assert_eq!(ws_frame_len(&pong), Some(8));
    assert!(!is_msg_frame(&pong));
    let mut long = vec![0x82, 126, 0x01, 0x00];
    long.extend(std::iter::repeat_n(0u8, 256));
    assert_eq!(ws_frame_len(&long), Some(260));
}
