//! Load benchmark: the real relay binary against nats-server with the same load, same run.
//!
//! ```sh
//! cargo bench -p whispeer-relay --bench load            # full
//! cargo bench -p whispeer-relay --bench load -- --quick # fewer messages
//! ```
//!
//! Pre-sealed 1 KiB envelopes (built once with the header writer; the relay never opens
//! them), fan-out 1→1, 1→4, 1→64, 1→1 beside 10,000 idle subscriber connections, and two
//! paced runs whose latency is not dominated by the window's queueing.
//! Publishing is closed-loop with a window (a publisher never runs more than `WINDOW`
//! messages ahead of its slowest subscriber), so both brokers are measured at a rate they
//! sustain without dropping. Reported per scenario: deliveries/s, broker CPU (cores) and
//! RSS, end-to-end latency p50/p99 (publish → subscriber decoded it, timestamps carried in
//! the payload), and the whispeer/NATS ratio. NATS runs twice: driven by the same
//! raw-socket generator as the relay (the NATS text protocol over plain sockets, publishes
//! coalesced the same way — the fair broker-to-broker figure) and through `async-nats`
//! (what a NATS user's program sees). nats-server is skipped if not installed.
//!
//! `-- --cluster 1,3` (issue 12's cluster benchmark) adds, after each whispeer row, the same
//! scenario on a relay cluster sharing routing through one nats-server: with 1 relay (every
//! envelope also forwarded to NATS) and with 3 relays (publisher on the first, subscribers
//! spread round-robin over all three, so most deliveries cross NATS). Its CPU column is
//! every relay plus nats-server, and `cpu µs/d` is CPU time per delivered message — what
//! docs/DEPLOY.md's capacity estimate is computed from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::frame::{Hello, Pub, Sub, PROTOCOL_VERSION};
use whispeer_protocol::{
    codec, Envelope, Frame, FrameDecoder, KeyId, PatternElem, Qos, TokenPattern, TopicToken,
};
use whispeer_relay::BoundAddrs;

#[path = "common/nats.rs"]
mod nats;
use nats::NatsProc;

const WINDOW: u64 = 2048;
const PAYLOAD: usize = 1024;
const IDLE: usize = 10_000;

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    fanout: usize,
    messages: u64,
    idle: usize,
    /// Publish at this many messages/s instead of as fast as the window allows.
    paced: Option<u64>,
    /// The idle subscribers connect over WebSocket (NATS: its plain TCP protocol).
    ws_idle: bool,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    deliveries_per_s: f64,
    cpu_cores: f64,
    /// Cores the load generator (this process: publisher and subscribers) used meanwhile:
    /// on a small machine it competes with the broker for the same cores.
    gen_cores: f64,
    rss_mib: f64,
    p50_us: f64,
    p99_us: f64,
    lost: u64,
}

fn main() {
    check_msg_envelope();
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only SUBSTRING`: run the scenarios whose name contains it.
    let only: Option<String> = {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1).cloned())
    };
    // `--cluster 1,3`: also run each scenario on relay clusters of these sizes.
    let cluster: Vec<usize> = {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == "--cluster")
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.split(',')
                    .filter_map(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .collect()
            })
            .unwrap_or_default()
    };
    // `--rounds N`: run each scenario's brokers N times in turn and print the median ratio.
    let rounds: usize = {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == "--rounds")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(1)
    };
    let scale = if quick { 10 } else { 1 };
    rlimit::increase_nofile_limit(2 * IDLE as u64 + 4096).ok();
    let scenarios = [
        Scenario {
            name: "1->1",
            fanout: 1,
            messages: 400_000 / scale,
            idle: 0,
            paced: None,
            ws_idle: false,
        },
        Scenario {
            name: "1->4",
            fanout: 4,
            messages: 200_000 / scale,
            idle: 0,
            paced: None,
            ws_idle: false,
        },
        Scenario {
            name: "1->64",
            fanout: 64,
            messages: 20_000 / scale,
            idle: 0,
            paced: None,
            ws_idle: false,
        },
        Scenario {
            name: "1->1 + 10k idle",
            fanout: 1,
            messages: 200_000 / scale,
            idle: IDLE,
            paced: None,
            ws_idle: false,
        },
        Scenario {
            name: "1->1 + 10k idle ws",
            fanout: 1,
            messages: 200_000 / scale,
            idle: IDLE,
            paced: None,
            ws_idle: true,
        },
        Scenario {
            name: "1->1 paced 20k/s",
            fanout: 1,
            messages: 40_000 / scale,
            idle: 0,
            paced: Some(20_000),
            ws_idle: false,
        },
        Scenario {
            name: "1->64 paced 1k/s",
            fanout: 64,
            messages: 4_000 / scale,
            idle: 0,
            paced: Some(1_000),
            ws_idle: false,
        },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let relay = RelayProc::start();
    let nats = NatsProc::start(&[]);
    if nats.is_none() {
        eprintln!("nats-server not found (apt-get install -y nats-server): whispeer only");
    }
    // The cluster's own nats-server (the peer above is measured on its own).
    let cluster_nats = if cluster.is_empty() {
        None
    } else {
        let n = NatsProc::start(&[]);
        if n.is_none() {
            eprintln!("nats-server not found: no cluster rows");
        }
        n
    };
    println!(
        "{:<18} {:>8} | {:<10} {:>12} {:>6} {:>5} {:>8} {:>8} {:>8} {:>9} | {:>9}",
        "scenario",
        "msgs",
        "broker",
        "deliv/s",
        "cpu",
        "gen",
        "rss MiB",
        "p50 us",
        "p99 us",
        "cpu us/d",
        "wsp/this"
    );
    for s in scenarios {
        if only.as_deref().is_some_and(|o| !s.name.contains(o)) {
            continue;
        }
        // One round per broker, back to back; over several rounds the brokers alternate, so
        // a machine that changes speed between runs (this VM moves between two speeds for
        // tens of seconds, both brokers alike) shifts both sides of a round's ratio.
        let mut ratios: Vec<Vec<(String, f64)>> = Vec::new();
        for round in 1..=rounds {
            let w = rt.block_on(run_whispeer(&relay, s));
            let mut rows = vec![("whispeer".to_owned(), w.clone())];
            if let Some(n) = cluster_nats.as_ref().filter(|_| s.idle == 0) {
                let url = format!("nats://{}", n.addr);
                for &k in &cluster {
                    let relays: Vec<RelayProc> = (0..k)
                        .map(|i| {
                            let name = format!("bench-{k}-{i}");
                            RelayProc::start_with(
                                &name,
                                &["--cluster", &url, "--cluster-name", &name],
                            )
                        })
                        .collect();
                    let o = rt.block_on(run_whispeer_on(&relays, &[n.child.id()], s));
                    rows.push((format!("cluster x{k}"), o));
                }
            }
            if let Some(n) = nats.as_ref() {
                // The same raw-socket generator as whispeer's, then the official async client.
                rows.push((
                    "nats raw".to_owned(),
                    rt.block_on(run_nats(n, s, NatsClient::Raw)),
                ));
                rows.push((
                    "nats async".to_owned(),
                    rt.block_on(run_nats(n, s, NatsClient::Async)),
                ));
            }
            let label = if rounds > 1 {
                format!("{} #{round}", s.name)
            } else {
                s.name.to_owned()
            };
            ratios.push(print_rows(&label, s.messages, &rows));
        }
        if rounds > 1 {
            print_round_summary(s.name, &ratios);
        }
    }
}

/// Prints one round's rows; returns whispeer's deliveries/s over each other row's.
fn print_rows(label: &str, messages: u64, rows: &[(String, Outcome)]) -> Vec<(String, f64)> {
    let w = &rows[0].1;
    let mut ratios = Vec::new();
    for (i, (broker, o)) in rows.iter().enumerate() {
        let (name, msgs) = if i == 0 {
            (label.to_owned(), messages.to_string())
        } else {
            (String::new(), String::new())
        };
        let ratio = if i == 0 {
            String::new()
        } else {
            // A run that lost messages measured a stall, not a rate: no ratio from it.
            let r = if o.deliveries_per_s > 0.0 && o.lost == 0 && w.lost == 0 {
                w.deliveries_per_s / o.deliveries_per_s
            } else {
                f64::NAN
            };
            ratios.push((broker.clone(), r));
            format!("{r:.2}")
        };
        let cpu_per = if o.deliveries_per_s > 0.0 {
            o.cpu_cores / o.deliveries_per_s * 1e6
        } else {
            f64::NAN
        };
        println!(
            "{:<18} {:>8} | {:<10} {:>12.0} {:>6.2} {:>5.2} {:>8.1} {:>8.0} {:>8.0} {:>9.2} | {:>9}",
            name,
            msgs,
            broker,
            o.deliveries_per_s,
            o.cpu_cores,
            o.gen_cores,
            o.rss_mib,
            o.p50_us,
            o.p99_us,
            cpu_per,
            ratio
        );
        if o.lost > 0 {
            println!("  ({broker} lost {})", o.lost);
        }
    }
    ratios
}

/// After `--rounds N`: whispeer over each other broker, the median over the rounds with its
/// range and every round's ratio.
fn print_round_summary(name: &str, ratios: &[Vec<(String, f64)>]) {
    let Some(first) = ratios.first() else { return };
    for (c, (broker, _)) in first.iter().enumerate() {
        let each: Vec<f64> = ratios
            .iter()
            .filter_map(|r| r.get(c).map(|x| x.1))
            .collect();
        // Rounds where a side lost messages have no ratio (NaN): left out of the median.
        let mut v: Vec<f64> = each.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            println!("{name}: whispeer / {broker}: no round without lost messages");
            continue;
        }
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        let list: Vec<String> = each.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "{name}: whispeer / {broker} median {median:.2} over {} rounds (range {:.2}-{:.2}: {}){}",
            v.len(),
            v[0],
            v[v.len() - 1],
            list.join(" "),
            if v.len() < each.len() {
                format!("; {} round(s) lost messages, left out", each.len() - v.len())
            } else {
                String::new()
            }
        );
    }
}

// ---------- processes ----------

fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn proc_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

struct RelayProc {
    child: Child,
    addrs: BoundAddrs,
    dir: PathBuf,
}

impl RelayProc {
    fn start() -> Self {
        Self::start_with("single", &[])
    }

    /// A relay with `extra` arguments (e.g. `--cluster URL`), its files under a directory
    /// named for `tag`.
    fn start_with(tag: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("whispeer-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        // `LOAD_RELAY_BIN=path` runs another build of the relay (A/B comparisons).
        let bin = std::env::var_os("LOAD_RELAY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_whispeer-relay").into());
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--ws",
                "127.0.0.1:0",
                "--tcp",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args(["--publish-rate", "0", "--max-connections", "100000"])
            // One source address opens every connection of the benchmark.
            .args([
                "--max-connections-per-addr",
                "100000",
                "--max-connections-per-network",
                "0",
                "--addr-connect-rate",
                "0",
            ])
            .args(["--addr-publish-rate", "0", "--addr-sub-rate", "0"])
            // 10,000 idle subscribers and the measured ones, all from 127.0.0.1.
            .args(["--tenant-max-subscriptions", "0"])
            // Live fan-out against NATS core: no store (the durable bench is benches/durable.rs).
            .args(["--store", "none"])
            .args(extra)
            .args([
                "--idle-ms",
                "3600000",
                "--heartbeat-ms",
                "0",
                "--queue-capacity",
                "8192",
            ])
            .arg("--ready-file")
            .arg(&ready)
            .env("WHISPEER_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn relay");
        let start = Instant::now();
        let addrs = loop {
            if let Ok(b) = std::fs::read(&ready) {
                break serde_json::from_slice(&b).unwrap();
            }
            assert!(child.try_wait().unwrap().is_none(), "relay exited");
            assert!(start.elapsed() < Duration::from_secs(30), "relay not ready");
            std::thread::sleep(Duration::from_millis(10));
        };
        Self { child, addrs, dir }
    }
    fn tcp(&self) -> SocketAddr {
        self.addrs.tcp.unwrap()
    }
    fn ws(&self) -> SocketAddr {
        self.addrs.ws.unwrap()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------- shared harness ----------

/// When message `n` at `rate` per second is due, if that is still in the future.
fn pace(start: Instant, n: u64, rate: Option<u64>) -> Option<Instant> {
    let rate = rate?;
    let due = start + Duration::from_nanos(n * 1_000_000_000 / rate);
    (Instant::now() < due).then_some(due)
}

/// Per-run shared state: delivered counts per subscriber, latency samples, wakeups.
/// The timestamp of a warm-up probe (not counted).
const PROBE: u64 = u64::MAX;

struct Harness {
    base: Instant,
    /// Subscribers that have seen a warm-up probe.
    warm: AtomicU64,
    received: Vec<AtomicU64>,
    latencies: Mutex<Vec<u64>>,
    progress: Notify,
}

impl Harness {
    fn new(subs: usize) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            warm: AtomicU64::new(0),
            received: (0..subs).map(|_| AtomicU64::new(0)).collect(),
            latencies: Mutex::new(Vec::new()),
            progress: Notify::new(),
        })
    }
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    fn min_received(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Called by subscriber `i` per message with the timestamp it carried.
    fn record(&self, i: usize, sent_ns: u64, local: &mut Vec<u64>) {
        local.push(self.now_ns().saturating_sub(sent_ns));
        let n = self.received[i].fetch_add(1, Ordering::Relaxed) + 1;
        if n % 256 == 0 {
            self.progress.notify_one();
        }
    }
    fn finish_sub(&self, local: Vec<u64>) {
        self.latencies.lock().unwrap().extend(local);
        self.progress.notify_one();
    }
    /// Waits until the slowest subscriber is within the window of `sent`.
    async fn wait_window(&self, sent: u64) {
        while sent >= self.min_received() + WINDOW {
            let _ = tokio::time::timeout(Duration::from_millis(20), self.progress.notified()).await;
        }
    }
    async fn wait_all(&self, total: u64) -> u64 {
        let start = Instant::now();
        while self.min_received() < total && start.elapsed() < Duration::from_secs(60) {
            let _ = tokio::time::timeout(Duration::from_millis(20), self.progress.notified()).await;
        }
        self.received
            .iter()
            .map(|r| total.saturating_sub(r.load(Ordering::Relaxed)))
            .sum()
    }
    fn outcome(
        &self,
        elapsed: Duration,
        deliveries: u64,
        (cpu, gen_cpu): (f64, f64),
        rss: f64,
        lost: u64,
    ) -> Outcome {
        let mut l = self.latencies.lock().unwrap();
        l.sort_unstable();
        let pct = |p: f64| {
            if l.is_empty() {
                0.0
            } else {
                l[((l.len() - 1) as f64 * p) as usize] as f64 / 1000.0
            }
        };
        Outcome {
            deliveries_per_s: deliveries as f64 / elapsed.as_secs_f64(),
            cpu_cores: cpu / elapsed.as_secs_f64(),
            gen_cores: gen_cpu / elapsed.as_secs_f64(),
            rss_mib: rss,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            lost,
        }
    }
}

/// The pre-sealed envelope: a valid header, 48 bytes of sealed name, and a body whose
/// first 8 bytes are overwritten with the send timestamp.
fn sealed_envelope(levels: &[u8]) -> (Vec<u8>, usize) {
    let tokens: Vec<TopicToken> = levels
        .iter()
        .map(|t| TopicToken::from_bytes([*t; 16]))
        .collect();
    let mut out = Vec::new();
    HeaderFields {
        flags: 0,
        key_id: KeyId::from_bytes([1; 16]),
        nonce: [3; 24],
        commit: [4; 32],
        tokens: &tokens,
    }
    .write_prefix(48, &mut out);
    out.extend_from_slice(&[5; 48]);
    let body_at = out.len();
    out.resize(PAYLOAD, 0x77);
    (out, body_at)
}

/// The raw-socket publisher shared by whispeer and NATS: stamps the send time into the
/// payload, appends each message with `encode` and writes in 64 KiB chunks, flushing when
/// the window is full or a paced message is not yet due.
async fn raw_publish(
    publ: &mut TcpStream,
    h: &Harness,
    s: Scenario,
    start: Instant,
    payload: &mut [u8],
    body_at: usize,
    mut encode: impl FnMut(&[u8], &mut Vec<u8>),
) {
    let mut buf = Vec::with_capacity(128 * 1024);
    for n in 0..s.messages {
        if n >= h.min_received() + WINDOW {
            publ.write_all(&buf).await.unwrap();
            buf.clear();
            h.wait_window(n).await;
        }
        if let Some(due) = pace(start, n, s.paced) {
            publ.write_all(&buf).await.unwrap();
            buf.clear();
            tokio::time::sleep_until(due.into()).await;
        }
        payload[body_at..body_at + 8].copy_from_slice(&h.now_ns().to_be_bytes());
        encode(payload, &mut buf);
        if buf.len() >= 64 * 1024 {
            publ.write_all(&buf).await.unwrap();
            buf.clear();
        }
    }
    publ.write_all(&buf).await.unwrap();
}

fn timestamp_of(payload: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(payload[at..at + 8].try_into().unwrap())
}

// ---------- whispeer ----------

/// The envelope of a `Msg` frame (PROTOCOL §3.3.7), found the way [`nats_raw_next`] finds a
/// `MSG` payload: the few header bytes in front of it are read and nothing else is decoded.
/// `Frame::decode` would also parse and check the whole envelope header — work the NATS
/// side of the generator does not do, on the cores the broker under test shares (it took
/// the generator from ~0.3 to ~0.7 cores in the 1→4 run). Every envelope here is the one the
/// generator published, so its body starts at the same offset as in the NATS runs.
fn msg_envelope(f: &[u8]) -> Option<&[u8]> {
    /// A CBOR head of major type `major` at `f[*at..]`: its argument; `at` moves past it.
    fn head(f: &[u8], at: &mut usize, major: u8) -> Option<u64> {
        let b = *f.get(*at)?;
        if b >> 5 != major {
            return None;
        }
        let n = match b & 0x1f {
            v @ 0..=23 => {
                *at += 1;
                return Some(u64::from(v));
            }
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return None,
        };
        let arg = f.get(*at + 1..*at + 1 + n)?;
        *at += 1 + n;
        Some(arg.iter().fold(0, |v, b| (v << 8) | u64::from(*b)))
    }
    let mut at = 0;
    // {0: 7 (Msg), 1: seq, 2: envelope, ...}: keys in ascending order, key 0 first.
    head(f, &mut at, 5)?;
    let fields = [(0, Some(7)), (1, None)];
    for (key, want) in fields {
        if head(f, &mut at, 0)? != key {
            return None;
        }
        let v = head(f, &mut at, 0)?;
        if want.is_some_and(|w| w != v) {
            return None;
        }
    }
    if head(f, &mut at, 0)? != 2 {
        return None;
    }
    let len = usize::try_from(head(f, &mut at, 2)?).ok()?;
    f.get(at..at + len)
}

/// [`msg_envelope`] finds what `Frame::decode` finds, for every width of `seq`, with and
/// without the optional fields; and nothing in a frame of another type.
fn check_msg_envelope() {
    let (env, _) = sealed_envelope(&[1]);
    let envelope = Envelope::from_slice(&env).unwrap();
    for seq in [0, 23, 24, 255, 256, 65_536, u64::MAX] {
        for (flags, sub_id) in [(0, None), (1, Some(9))] {
            let msg = Frame::Msg(whispeer_protocol::frame::Msg {
                paused: None,
                seq,
                envelope: envelope.clone(),
                flags,
                sub_id,
            });
            let mut f = Vec::new();
            msg.encode(&mut f);
            let f = Bytes::from(f);
            let Ok(Frame::Msg(m)) = Frame::decode(&f) else {
                unreachable!()
            };
            assert_eq!(
                msg_envelope(&f),
                Some(&m.envelope.as_bytes()[..]),
                "seq {seq}"
            );
        }
    }
    let mut f = Vec::new();
    Frame::Pub(Pub {
        envelope,
        flags: 0,
        publish_id: None,
        qos: Qos::AtMostOnce,
    })
    .encode(&mut f);
    assert_eq!(msg_envelope(&f), None);
}

async fn wsp_connect(addr: SocketAddr) -> (TcpStream, FrameDecoder) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let hello = Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: 0,
        client: Some("bench".into()),
        auth: None,
        account: None,
    });
    s.write_all(&codec::encode_prefixed(&hello)).await.unwrap();
    let mut dec = FrameDecoder::new(1 << 20);
    wsp_next(&mut s, &mut dec).await; // Welcome
    (s, dec)
}

async fn wsp_next(s: &mut TcpStream, dec: &mut FrameDecoder) -> Option<Bytes> {
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            return Some(f);
        }
        dec.reserve_read(64 * 1024);
        if s.read_buf(dec.buffer_mut()).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

/// The timestamp in the next frame's envelope (`None` for a frame that is not a `Msg`),
/// read in place in the read buffer as [`nats_raw_next`] reads a `MSG` payload: a frame
/// copied out of the buffer (what [`wsp_next`] returns for frames under half of it) costs
/// an allocation and a `memcpy` per delivery that the NATS side of the generator does not
/// pay, on the cores the broker under test shares. `None` at end of stream.
async fn wsp_next_stamp(
    s: &mut TcpStream,
    dec: &mut FrameDecoder,
    body_at: usize,
) -> Option<Option<u64>> {
    loop {
        let stamp = |f: &[u8]| msg_envelope(f).map(|e| timestamp_of(e, body_at));
        if let Some(ts) = dec.with_next_frame(stamp).unwrap() {
            return Some(ts);
        }
        dec.reserve_read(64 * 1024);
        if s.read_buf(dec.buffer_mut()).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

async fn wsp_subscribe(s: &mut TcpStream, dec: &mut FrameDecoder, levels: &[u8]) {
    let pattern = TokenPattern::new(
        KeyId::from_bytes([1; 16]),
        levels
            .iter()
            .map(|t| PatternElem::Token(TopicToken::from_bytes([*t; 16])))
            .collect(),
    )
    .unwrap();
    let sub = Frame::Sub(Sub::live(1, pattern));
    s.write_all(&codec::encode_prefixed(&sub)).await.unwrap();
    wsp_next(s, dec).await; // SubOk
}

async fn run_whispeer(relay: &RelayProc, s: Scenario) -> Outcome {
    run_whispeer_on(std::slice::from_ref(relay), &[], s).await
}

/// The scenario on `relays` (publisher and idle subscribers on the first, subscriber `i`
/// on relay `i % n`); CPU is summed over the relays and `also` (nats-server of a cluster).
async fn run_whispeer_on(relays: &[RelayProc], also: &[u32], s: Scenario) -> Outcome {
    let relay = &relays[0];
    let addr = relay.tcp();
    let pid = relay.child.id();
    let pids: Vec<u32> = relays
        .iter()
        .map(|r| r.child.id())
        .chain(also.iter().copied())
        .collect();
    let cpu_now = || pids.iter().map(|p| proc_cpu_secs(*p)).sum::<f64>();
    // Idle subscribers: connected, greeted, subscribed to their own topic, never sent to.
    let rss_before_idle = proc_rss_mib(pid);
    let mut idle = Vec::with_capacity(s.idle);
    let mut idle_ws = Vec::with_capacity(if s.ws_idle { s.idle } else { 0 });
    for i in 0..s.idle {
        let levels = [2, (i % 256) as u8, (i / 256) as u8];
        if s.ws_idle {
            idle_ws.push(ws_idle_subscriber(relay.ws(), &levels).await);
        } else {
            let (mut c, mut d) = wsp_connect(addr).await;
            wsp_subscribe(&mut c, &mut d, &levels).await;
            idle.push(c);
        }
    }
    if s.idle > 0 {
        let per = (proc_rss_mib(pid) - rss_before_idle) * 1024.0 / s.idle as f64;
        println!(
            "  {}: relay RSS per idle {} subscriber connection: {per:.1} KiB",
            s.name,
            if s.ws_idle { "WebSocket" } else { "TCP" }
        );
    }
    let h = Harness::new(s.fanout);
    let (_, body_at) = sealed_envelope(&[1]);
    let mut readers = Vec::new();
    for i in 0..s.fanout {
        let (mut c, mut d) = wsp_connect(relays[i % relays.len()].tcp()).await;
        wsp_subscribe(&mut c, &mut d, &[1]).await;
        let h = h.clone();
        let total = s.messages;
        readers.push(tokio::spawn(async move {
            let mut local = Vec::with_capacity(total as usize);
            let mut n = 0;
            let mut warm = false;
            while n < total {
                let Some(ts) = wsp_next_stamp(&mut c, &mut d, body_at).await else {
                    break;
                };
                if let Some(ts) = ts {
                    if ts == PROBE {
                        if !warm {
                            warm = true;
                            h.warm.fetch_add(1, Ordering::Relaxed);
                            h.progress.notify_one();
                        }
                        continue;
                    }
                    h.record(i, ts, &mut local);
                    n += 1;
                }
            }
            h.finish_sub(local);
        }));
    }
    let (mut publ, _) = wsp_connect(addr).await;
    let (mut payload, _) = sealed_envelope(&[1]);
    let pub_frame = |p: &[u8], buf: &mut Vec<u8>| {
        let frame = Frame::Pub(Pub {
            envelope: Envelope::from_slice(p).unwrap(),
            flags: 0,
            publish_id: None,
            qos: Qos::AtMostOnce,
        });
        let at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        frame.encode(buf);
        let len = (buf.len() - at - 4) as u32;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    };
    if relays.len() > 1 || !also.is_empty() {
        // Across relays a subscription reaches the others through NATS interest: probe
        // until every subscriber has seen one, so no counted message is sent too early.
        payload[body_at..body_at + 8].copy_from_slice(&PROBE.to_be_bytes());
        let mut probe = Vec::new();
        pub_frame(&payload, &mut probe);
        let start = Instant::now();
        while (h.warm.load(Ordering::Relaxed) as usize) < s.fanout {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cluster interest never arrived"
            );
            publ.write_all(&probe).await.unwrap();
            let _ = tokio::time::timeout(Duration::from_millis(20), h.progress.notified()).await;
        }
    }
    // The `Pub` frame is encoded once; each message is a copy of it with its timestamp
    // patched in, as the NATS side copies its `PUB` line and payload: no per-message
    // envelope parsing and frame encoding in the generator, on the cores the broker shares.
    let mut template = Vec::new();
    pub_frame(&payload, &mut template);
    let ts_at = template
        .windows(payload.len())
        .position(|w| w == payload.as_slice())
        .expect("the envelope is in its frame")
        + body_at;
    let copy_frame = |p: &[u8], buf: &mut Vec<u8>| {
        let at = buf.len() + ts_at;
        buf.extend_from_slice(&template);
        buf[at..at + 8].copy_from_slice(&p[body_at..body_at + 8]);
    };
    let cpu0 = cpu_now();
    let gen0 = proc_cpu_secs(std::process::id());
    let start = Instant::now();
    raw_publish(&mut publ, &h, s, start, &mut payload, body_at, copy_frame).await;
    let lost = h.wait_all(s.messages).await;
    let elapsed = start.elapsed();
    let cpu = (cpu_now() - cpu0, proc_cpu_secs(std::process::id()) - gen0);
    let rss = proc_rss_mib(pid);
    for r in readers {
        r.abort();
    }
    drop(idle);
    drop(idle_ws);
    h.outcome(elapsed, s.messages * s.fanout as u64 - lost, cpu, rss, lost)
}

/// A WebSocket subscriber: `Hello`, `Sub` to `levels`, then silence (the relay pings it
/// only if heartbeats are on; the bench turns them off).
async fn ws_idle_subscriber(
    addr: SocketAddr,
    levels: &[u8],
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
        .await
        .unwrap();
    let hello = Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: 0,
        client: Some("bench".into()),
        auth: None,
        account: None,
    });
    let pattern = TokenPattern::new(
        KeyId::from_bytes([1; 16]),
        levels
            .iter()
            .map(|t| PatternElem::Token(TopicToken::from_bytes([*t; 16])))
            .collect(),
    )
    .unwrap();
    let sub = Frame::Sub(Sub::live(1, pattern));
    for f in [hello, sub] {
        ws.send(Message::Binary(f.to_bytes())).await.unwrap();
    }
    // Welcome, SubOk.
    let mut got = 0;
    while got < 2 {
        match ws.next().await {
            Some(Ok(Message::Binary(_))) => got += 1,
            Some(Ok(_)) => {}
            other => panic!("idle WebSocket subscriber: {other:?}"),
        }
    }
    ws
}

// ---------- NATS ----------

/// How the NATS side is driven.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NatsClient {
    /// Raw sockets and the NATS text protocol, the same shape as the whispeer generator
    /// (publishes coalesced into 64 KiB writes, subscribers parsing frames off the socket).
    Raw,
    /// The official async client (`async-nats`).
    Async,
}

/// A raw NATS connection: `CONNECT`, optional `SUB`, then `PING` answered by `PONG`, so
/// the subscription is registered when this returns.
async fn nats_raw_connect(addr: SocketAddr, sub: Option<&str>) -> (TcpStream, bytes::BytesMut) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let sub = sub.map_or(String::new(), |s| format!("SUB {s} 1\r\n"));
    c.write_all(format!("CONNECT {{\"verbose\":false}}\r\n{sub}PING\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    loop {
        if let Some(i) = buf.windows(6).position(|w| w == b"PONG\r\n") {
            let _ = buf.split_to(i + 6);
            return (c, buf);
        }
        assert!(c.read_buf(&mut buf).await.unwrap() > 0, "nats closed");
    }
}

/// The next `MSG` payload on a raw NATS connection (answering `PING`s, skipping `+OK`,
/// `INFO`, `PONG`); `None` at end of stream.
async fn nats_raw_next(c: &mut TcpStream, buf: &mut bytes::BytesMut) -> Option<Bytes> {
    loop {
        if let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = &buf[..eol];
            if line.starts_with(b"MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let len: usize = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .expect("MSG size");
                if buf.len() >= eol + 2 + len + 2 {
                    let _ = buf.split_to(eol + 2);
                    let payload = buf.split_to(len).freeze();
                    let _ = buf.split_to(2);
                    return Some(payload);
                }
            } else {
                if line == b"PING" {
                    c.write_all(b"PONG\r\n").await.ok()?;
                }
                let _ = buf.split_to(eol + 2);
                continue;
            }
        }
        buf.reserve(64 * 1024);
        if c.read_buf(buf).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

async fn run_nats(nats: &NatsProc, s: Scenario, how: NatsClient) -> Outcome {
    use futures_util::StreamExt;
    let url = format!("nats://{}", nats.addr);
    let pid = nats.child.id();
    // Idle subscribers over raw connections (cheap on our side, a real client to the server).
    let mut idle = Vec::with_capacity(s.idle);
    for i in 0..s.idle {
        idle.push(
            nats_raw_connect(nats.addr, Some(&format!("idle.{i}")))
                .await
                .0,
        );
    }
    let h = Harness::new(s.fanout);
    let (_, body_at) = sealed_envelope(&[1]);
    let mut readers = Vec::new();
    for i in 0..s.fanout {
        let h = h.clone();
        let total = s.messages;
        let mut local = Vec::with_capacity(total as usize);
        match how {
            NatsClient::Raw => {
                let (mut c, mut buf) = nats_raw_connect(nats.addr, Some("bench.t")).await;
                readers.push(tokio::spawn(async move {
                    let mut n = 0;
                    while n < total {
                        let Some(p) = nats_raw_next(&mut c, &mut buf).await else {
                            break;
                        };
                        h.record(i, timestamp_of(&p, body_at), &mut local);
                        n += 1;
                    }
                    h.finish_sub(local);
                }));
            }
            NatsClient::Async => {
                let client = async_nats::connect(&url).await.unwrap();
                let mut sub = client.subscribe("bench.t").await.unwrap();
                client.flush().await.unwrap();
                readers.push(tokio::spawn(async move {
                    let _client = client;
                    let mut n = 0;
                    while n < total {
                        let Some(m) = sub.next().await else { break };
                        h.record(i, timestamp_of(&m.payload, body_at), &mut local);
                        n += 1;
                    }
                    h.finish_sub(local);
                }));
            }
        }
    }
    let (mut payload, _) = sealed_envelope(&[1]);
    let cpu0 = proc_cpu_secs(pid);
    let gen0 = proc_cpu_secs(std::process::id());
    let start = Instant::now();
    // The raw publisher stays open until every delivery arrived, as whispeer's does. Closed
    // with unread bytes from the server (nats-server 2.9 sends its first PING two seconds
    // after the connection opens), Linux resets the connection and discards what was not
    // sent yet: the run lost the tail and waited a minute for it (seen under load: 12.7k
    // deliveries/s, "lost 1028").
    let mut _raw_publisher = None;
    match how {
        NatsClient::Raw => {
            let (mut publ, _) = nats_raw_connect(nats.addr, None).await;
            let head = format!("PUB bench.t {}\r\n", payload.len());
            raw_publish(&mut publ, &h, s, start, &mut payload, body_at, |p, buf| {
                buf.extend_from_slice(head.as_bytes());
                buf.extend_from_slice(p);
                buf.extend_from_slice(b"\r\n");
            })
            .await;
            _raw_publisher = Some(publ);
        }
        NatsClient::Async => {
            let publ = async_nats::connect(&url).await.unwrap();
            for n in 0..s.messages {
                if n >= h.min_received() + WINDOW {
                    publ.flush().await.unwrap();
                    h.wait_window(n).await;
                }
                if let Some(due) = pace(start, n, s.paced) {
                    publ.flush().await.unwrap();
                    tokio::time::sleep_until(due.into()).await;
                }
                payload[body_at..body_at + 8].copy_from_slice(&h.now_ns().to_be_bytes());
                publ.publish("bench.t", Bytes::copy_from_slice(&payload))
                    .await
                    .unwrap();
            }
            publ.flush().await.unwrap();
        }
    }
    let lost = h.wait_all(s.messages).await;
    let elapsed = start.elapsed();
    let cpu = (
        proc_cpu_secs(pid) - cpu0,
        proc_cpu_secs(std::process::id()) - gen0,
    );
    let rss = proc_rss_mib(pid);
    for r in readers {
        r.abort();
    }
    drop(idle);
    h.outcome(elapsed, s.messages * s.fanout as u64 - lost, cpu, rss, lost)
}
