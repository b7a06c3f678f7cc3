//! Durable benchmark: the real relay binary with its SQLite store against nats-server with
//! JetStream file storage (`nats-server -js -sd DIR`), same load, same run.
//!
//! ```sh
//! cargo bench -p whispeer-relay --bench durable            # 100,000 messages per run
//! cargo bench -p whispeer-relay --bench durable -- --quick # 20,000
//! ```
//!
//! Two measurements, 1 KiB messages (whispeer: a 1 KiB envelope built with the header
//! writer; NATS: a 1 KiB payload):
//! - **durable publish**: one publisher, QoS 1 with `PubAck` (whispeer) / JetStream publish
//!   with its ack (NATS), windowed: at most `WINDOW` publishes without an ack. Reported:
//!   acknowledged messages/s and the publish→ack latency p50/p99.
//! - **replay**: a fresh subscriber reads everything back from the start (whispeer: `Sub`
//!   with `Replay::FromSeq(0)` until `ReplayDone`; NATS: an ordered pull consumer with
//!   `DeliverPolicy::All`). Reported: messages/s.
//!
//! whispeer runs twice: `sync = full` (fsync per group commit: an acknowledged message
//! survives power loss) and `sync = normal` (fsync at checkpoints: survives a crash of the
//! process, like JetStream's default `sync_interval`, which fsyncs every 2 minutes) — and a
//! third time as a cluster relay on the JetStream store (`--cluster-store jetstream`, its
//! own nats-server with file storage, R1): the same load, acknowledged by the relay only
//! once JetStream has the message, replayed from the stream.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use whispeer_protocol::frame::{features, pub_flags, Hello, Pub, Replay, Sub, PROTOCOL_VERSION};
use whispeer_protocol::{
    codec, Envelope, Frame, FrameDecoder, KeyId, PatternElem, Qos, TokenPattern,
};
use whispeer_relay::BoundAddrs;

#[path = "../tests/common/indexed.rs"]
#[allow(dead_code)]
mod indexed;
use indexed::indexed_on;
#[path = "common/nats.rs"]
mod nats;
use nats::NatsProc;

const WINDOW: usize = 1024;
const SIZE: usize = 1024;

#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    publish_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    replay_per_s: f64,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 20_000 } else { 100_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = std::env::temp_dir().join(format!("whispeer-durable-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();

    let mut rows: Vec<(String, Outcome, Option<f64>)> = Vec::new();
    for sync in ["full", "normal"] {
        let dir = base.join(format!("wsp-{sync}"));
        std::fs::create_dir_all(&dir).unwrap();
        let relay = RelayProc::start(&dir, sync);
        let o = rt.block_on(whispeer_run(relay.addrs.tcp.unwrap(), n));
        let admin = relay.addrs.admin.unwrap().to_string();
        let metrics = rt
            .block_on(whispeer_relay::admin::http_get(&admin, "/metrics"))
            .unwrap();
        let text = String::from_utf8_lossy(&metrics);
        let metric = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0.0)
        };
        let commits = metric("whispeer_relay_store_commit_seconds_count ");
        eprintln!(
            "whispeer sync={sync}: {commits} commits, mean batch {:.0} operations, mean commit {:.2} ms",
            metric("whispeer_relay_store_commit_batch_size_sum ") / commits.max(1.0),
            1000.0 * metric("whispeer_relay_store_commit_seconds_sum ") / commits.max(1.0)
        );
        let size = file_bytes(&dir);
        rows.push((
            format!("whispeer sqlite sync={sync}"),
            o,
            Some(size as f64 / 1048576.0),
        ));
        drop(relay);
    }
    match start_jetstream(&base.join("nats-relay")) {
        Some(nats) => {
            let dir = base.join("wsp-jetstream");
            std::fs::create_dir_all(&dir).unwrap();
            let relay = RelayProc::jetstream(&dir, nats.addr);
            let cpu = [cpu_s(relay.child.id()), cpu_s(nats.child.id())];
            let o = rt.block_on(whispeer_run(relay.addrs.tcp.unwrap(), n));
            eprintln!(
                "whispeer on JetStream: CPU per message (publish + ack + replay): relay {:.1} µs, \
                 nats-server {:.1} µs",
                (cpu_s(relay.child.id()) - cpu[0]) * 1e6 / n as f64,
                (cpu_s(nats.child.id()) - cpu[1]) * 1e6 / n as f64,
            );
            let size = file_bytes(&base.join("nats-relay"));
            rows.push((
                "whispeer on JetStream (R1)".into(),
                o,
                Some(size as f64 / 1048576.0),
            ));
            drop(relay);
        }
        None => eprintln!("nats-server not found: no whispeer-on-JetStream row"),
    }
    match start_jetstream(&base.join("nats")) {
        Some(nats) => {
            let cpu = cpu_s(nats.child.id());
            let o = rt.block_on(nats_run(nats.addr, n));
            eprintln!(
                "nats-server JetStream: CPU per message (publish + ack + replay): {:.1} µs",
                (cpu_s(nats.child.id()) - cpu) * 1e6 / n as f64
            );
            let size = file_bytes(&base.join("nats"));
            rows.push((
                "nats-server JetStream file".into(),
                o,
                Some(size as f64 / 1048576.0),
            ));
        }
        None => eprintln!("nats-server not found (apt-get install -y nats-server): whispeer only"),
    }
    println!();
    println!(
        "{n} messages of {SIZE} bytes, window {WINDOW}, one publisher, one replaying subscriber"
    );
    println!(
        "{:<30} | {:>14} {:>9} {:>9} | {:>13} | {:>9}",
        "broker", "publish+ack/s", "ack p50us", "ack p99us", "replay msg/s", "disk MiB"
    );
    for (name, o, disk) in &rows {
        println!(
            "{:<30} | {:>14.0} {:>9.0} {:>9.0} | {:>13.0} | {:>9.1}",
            name,
            o.publish_per_s,
            o.p50_us,
            o.p99_us,
            o.replay_per_s,
            disk.unwrap_or(0.0)
        );
    }
    if let Some((_, nats, _)) = rows.iter().find(|r| r.0.starts_with("nats")) {
        for (name, o, _) in rows.iter().filter(|r| r.0.starts_with("whispeer")) {
            println!(
                "ratio {name} / JetStream: publish {:.2}  replay {:.2}",
                o.publish_per_s / nats.publish_per_s,
                o.replay_per_s / nats.replay_per_s
            );
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// CPU seconds (user + system) a process has used so far, from `/proc` (0 elsewhere).
fn cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3; utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn file_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    walk(dir)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

// ---------- whispeer ----------

struct RelayProc {
    child: Child,
    addrs: BoundAddrs,
}

impl RelayProc {
    fn start(dir: &Path, sync: &str) -> Self {
        let db: PathBuf = dir.join("bench.db");
        let store: Vec<OsString> = vec![
            "--store".into(),
            "sqlite".into(),
            "--store-sync".into(),
            sync.into(),
            "--store-path".into(),
            db.into(),
        ];
        Self::start_with(dir, &store)
    }

    /// A cluster relay on the JetStream store of the nats-server at `nats`.
    fn jetstream(dir: &Path, nats: SocketAddr) -> Self {
        let store: Vec<OsString> = vec![
            "--cluster".into(),
            format!("nats://{nats}").into(),
            "--cluster-store".into(),
            "jetstream".into(),
        ];
        Self::start_with(dir, &store)
    }

    fn start_with(dir: &Path, store: &[OsString]) -> Self {
        let ready = dir.join("ready.json");
        let mut child = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
            .args([
                "serve",
                "--ws",
                "off",
                "--tcp",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args([
                "--publish-rate",
                "0",
                "--idle-ms",
                "3600000",
                "--heartbeat-ms",
                "0",
            ])
            .args(["--queue-capacity", "65536"])
            .args(store)
            .arg("--ready-file")
            .arg(&ready)
            .env("WHISPEER_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start whispeer-relay");
        let start = Instant::now();
        let addrs = loop {
            if let Ok(t) = std::fs::read(&ready) {
                break serde_json::from_slice(&t).unwrap();
            }
            assert!(child.try_wait().unwrap().is_none(), "relay exited");
            assert!(start.elapsed() < Duration::from_secs(30), "relay not ready");
            std::thread::sleep(Duration::from_millis(10));
        };
        Self { child, addrs }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Envelope `i` of the run, `SIZE` bytes in all (numbered as the relay tests number theirs).
fn envelope(i: u64) -> Envelope {
    let key = KeyId::from_bytes([7; 16]);
    let header = indexed_on(key, 1, i, 16).as_bytes().len() - 16;
    indexed_on(key, 1, i, SIZE - header)
}

struct Conn {
    io: TcpStream,
    dec: FrameDecoder,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let io = TcpStream::connect(addr).await.unwrap();
        io.set_nodelay(true).unwrap();
        let mut c = Self {
            io,
            dec: FrameDecoder::new(1 << 24),
        };
        c.send(&Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            features: features::AT_LEAST_ONCE | features::REPLAY,
            client: Some("durable-bench".into()),
            auth: None,
            account: None,
        }))
        .await;
        assert!(matches!(c.next().await, Frame::Welcome(_)));
        c
    }
    async fn send(&mut self, f: &Frame) {
        self.io.write_all(&codec::encode_prefixed(f)).await.unwrap();
    }
    /// The next frame already received, without reading the socket.
    fn buffered(&mut self) -> Option<Frame> {
        self.dec
            .next_frame()
            .unwrap()
            .map(|f| Frame::decode(&f).unwrap())
    }
    async fn next(&mut self) -> Frame {
        loop {
            if let Some(f) = self.buffered() {
                return f;
            }
            self.dec.reserve_read(256 * 1024);
            assert!(
                self.io.read_buf(self.dec.buffer_mut()).await.unwrap() > 0,
                "relay closed"
            );
        }
    }
}

async fn whispeer_run(addr: SocketAddr, n: u64) -> Outcome {
    let frames: Vec<Bytes> = (0..n)
        .map(|i| {
            let mut pid = [0u8; 16];
            pid[..8].copy_from_slice(&i.to_le_bytes());
            codec::encode_prefixed(&Frame::Pub(Pub {
                envelope: envelope(i),
                flags: pub_flags::ACK,
                publish_id: Some(pid),
                qos: Qos::AtLeastOnce,
            }))
        })
        .collect();
    let mut c = Conn::open(addr).await;
    let mut sent_at = vec![Instant::now(); n as usize];
    let mut lat = Vec::with_capacity(n as usize);
    let (mut sent, mut acked) = (0u64, 0u64);
    let start = Instant::now();
    let mut buf = Vec::new();
    while acked < n {
        buf.clear();
        let now = Instant::now();
        while sent < n && (sent - acked) < WINDOW as u64 {
            buf.extend_from_slice(&frames[sent as usize]);
            sent_at[sent as usize] = now;
            sent += 1;
        }
        if !buf.is_empty() {
            c.io.write_all(&buf).await.unwrap();
        }
        // Every ack already received before the next write: one write refills the window
        // for all of them, as async-nats coalesces JetStream publishes.
        let mut next = Some(c.next().await);
        while let Some(f) = next {
            match f {
                Frame::PubAck(a) => {
                    let i = u64::from_le_bytes(a.publish_id[..8].try_into().unwrap());
                    lat.push(sent_at[i as usize].elapsed().as_nanos() as u64);
                    acked += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
            next = c.buffered();
        }
    }
    let publish_s = start.elapsed().as_secs_f64();
    lat.sort_unstable();

    let mut s = Conn::open(addr).await;
    let start = Instant::now();
    s.send(&Frame::Sub(Sub {
        sub_id: 1,
        pattern: TokenPattern::new(KeyId::from_bytes([7; 16]), vec![PatternElem::Rest]).unwrap(),
        qos: Qos::AtMostOnce,
        durable: None,
        replay: Some(Replay::FromSeq(0)),
        retained: false,
        credit: None,
        owner: None,
    }))
    .await;
    // History up to the `SubOk` boundary, then live. On the JetStream store a `PubAck`
    // can leave before the relay's ordered read of the stream reaches that message, so the
    // boundary may be below the last acknowledged sequence: the rest comes live.
    let (mut got, mut done) = (0u64, false);
    while !done || got < n {
        match s.next().await {
            Frame::SubOk(_) => {}
            Frame::Msg(_) => got += 1,
            Frame::ReplayDone(_) => done = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    let replay_s = start.elapsed().as_secs_f64();
    assert_eq!(got, n, "replayed everything");
    Outcome {
        publish_per_s: n as f64 / publish_s,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        replay_per_s: n as f64 / replay_s,
    }
}

// ---------- NATS JetStream ----------

async fn nats_run(addr: SocketAddr, n: u64) -> Outcome {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(format!("nats://{addr}")).await.unwrap();
    let js = jetstream::new(client);
    let st = js
        .create_stream(stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let payloads: Vec<Bytes> = (0..n)
        .map(|i| Bytes::from(envelope(i).as_bytes().to_vec()))
        .collect();
    // Acks are awaited as they complete (not in order), so latency is measured when each
    // ack arrives rather than when the window forces a wait.
    let mut pending = FuturesUnordered::new();
    let mut lat = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for p in payloads {
        if pending.len() >= WINDOW {
            lat.push(pending.next().await.unwrap());
        }
        let t = Instant::now();
        let fut = js.publish("bench.a", p).await.unwrap();
        pending.push(async move {
            fut.await.unwrap();
            t.elapsed().as_nanos() as u64
        });
    }
    while let Some(l) = pending.next().await {
        lat.push(l);
    }
    let publish_s = start.elapsed().as_secs_f64();
    lat.sort_unstable();

    let start = Instant::now();
    let c = st
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = c.messages().await.unwrap();
    let mut got = 0u64;
    while got < n {
        msgs.next().await.unwrap().unwrap();
        got += 1;
    }
    let replay_s = start.elapsed().as_secs_f64();
    Outcome {
        publish_per_s: n as f64 / publish_s,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        replay_per_s: n as f64 / replay_s,
    }
}

/// nats-server with JetStream file storage in `dir`.
fn start_jetstream(dir: &Path) -> Option<NatsProc> {
    std::fs::create_dir_all(dir).ok()?;
    NatsProc::start(&["-js".into(), "-sd".into(), dir.as_os_str().to_owned()])
}
