//! `whispeer bench`: a load generator in the style of `nats bench`.
//!
//! N publisher clients and M subscriber clients (each its own connection) share one topic
//! in a fresh random tree (or the given keys). Every payload is sealed like any message and
//! carries the send time (nanoseconds since a shared `Instant`) and a run id, padded to
//! `--size`; subscribers record end-to-end latency in an HDR histogram.
//!
//! Flow control: unpaced publishers keep at most `--window` messages in flight (sent but
//! not yet delivered to the slowest subscriber; without subscribers, acknowledged by a
//! relay round trip), so the run measures throughput rather than how long queues can grow.
//! A window that stalls (messages the relay dropped) is released after a short wait and the
//! missing messages are counted as lost.
//!
//! Debugging aid: with `WHISPEER_BENCH_TRACE=FILE` in the environment, subscriber `i` writes
//! one line per message to `FILE.i`: the send time (ns since the run's start) and the
//! latency (µs), so a tail can be placed in time (a startup stall or periodic ones).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use whispeer::{CipherSuite, Client, Compression, Identity, Padding, Signing, Topic, TreeKey};

use crate::io::{self, AnyKey, KeyArgs};
use crate::pubsub::{secs, ConnArgs, SealArgs};
use crate::usage;

mod child;

/// Content type of bench payloads.
const CONTENT_TYPE: &str = "application/x-whispeer-bench";
/// Timestamp (8 bytes) + run id (8 bytes).
const HEADER: usize = 16;
/// Payload bytes in flight that the default `--window` allows. Measured (1 KiB, 1 → 1,
/// TCP, relay without rate limits, 2 cores): a window of 200 messages held the pipeline to
/// 57–63k msg/s batch-signed and 87–97k unsigned with the cores ~40 % idle (Little's law: at
/// ~3 ms through a batch-signing pipeline, 200 in flight cap the rate); 1,000 reached 80–90k
/// and 115–121k, and 2,000–4,000 no more (only latency grew). At 128 bytes the knee is
/// further out (unsigned 124k / 186k / 237k at 200 / 1,000 / 4,000), hence bytes, not a count.
const DEFAULT_WINDOW_BYTES: u64 = 1 << 20;

/// How long a full window may wait for deliveries before the missing ones count as lost.
const STALL: Duration = Duration::from_millis(500);
/// Most publisher or subscriber clients (one connection each; the vectors of their tasks
/// and figures are made before anything connects: a number past memory was a panic).
const MAX_CLIENTS: usize = 10_000;
/// Largest `--size` (a payload is one frame: relays take at most 1 MiB by default).
const MAX_SIZE: usize = 64 << 20;

/// After the publishers finish: how long deliveries may stop before the rest counts as lost.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Publisher clients (one connection each).
    #[arg(long, default_value_t = 1)]
    pubs: usize,
    /// Subscriber clients (one connection each).
    #[arg(long, default_value_t = 1)]
    subs: usize,
    /// Payload bytes per message (at least 16: send time and run id, then random padding).
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    size: usize,
    /// Total publish rate in messages per second across all publishers; 0 = unpaced.
    #[arg(long, value_name = "MSGS_PER_SEC", default_value_t = 0.0)]
    rate: f64,
    /// With --rate: space messages evenly (a thread sleeping to each one's due time)
    /// instead of on tokio's 1 ms timer, which sends each tick's messages back to back
    /// (~13 at 10k msg/s every 1.3 ms). A steady stream is the harder case: batches stay
    /// small and every message costs its own wake-ups.
    #[arg(long)]
    even_pacing: bool,
    /// Seconds to publish (ignored with --msgs).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    duration: f64,
    /// Publish exactly this many messages in total, then stop.
    #[arg(long, value_name = "N")]
    msgs: Option<u64>,
    /// The topic (in the bench's own random tree unless keys are given).
    #[arg(long, value_name = "TOPIC", default_value = "bench/load")]
    topic: String,
    /// Most messages in flight (published, not yet delivered to every subscriber).
    /// Default: 1 MiB of payloads ([`DEFAULT_WINDOW_BYTES`]; 1,024 messages at `--size
    /// 1024`), at least 200 and at most 65,536.
    #[arg(long, value_name = "N")]
    window: Option<u64>,
    /// Compress payloads with zstd at this level (default: off; bench payloads are random).
    /// The same as `--compress zstd:LEVEL`.
    #[arg(long, value_name = "LEVEL", conflicts_with = "compress")]
    zstd: Option<i32>,
    /// Compression (`none`, `zstd`, `zstd:N`, `lz4`) and AEAD suite (`xchacha`, `aes-gcm`).
    #[command(flatten)]
    seal: SealArgs,
    /// Exact sizes instead of Padmé padding.
    #[arg(long)]
    no_padding: bool,
    /// Do not sign messages (publishers have no identity); the same as `--signing off`.
    #[arg(long)]
    no_sign: bool,
    /// How publishers sign: `batch` (the default: one Ed25519 signature per batch of
    /// messages, PROTOCOL §4.14), `message` (one per message), `off` (unsigned).
    #[arg(long, value_enum, default_value_t = SigningArg::Batch)]
    signing: SigningArg,
    /// Batch signing: most messages per signature (1..=4096; the client's default).
    #[arg(long, value_name = "N", default_value_t = whispeer::core::DEFAULT_BATCH.max_messages)]
    batch_max: u32,
    /// Batch signing: microseconds a batch waits for more messages after its first (0:
    /// sign whatever is pending at once).
    #[arg(long, value_name = "MICROS", default_value_t = 0)]
    batch_wait_us: u64,
    /// Then run the same load (publishers, subscribers, size, rate, count or duration,
    /// window) through this nats-server with plaintext payloads via async-nats, and print
    /// NATS beside whispeer with the ratio (JSON: `nats` and `nats_ratio`).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// The relay's process id, when it runs on this machine: its CPU seconds during the run
    /// (from `/proc`) are reported beside this process's, with CPU per delivered message
    /// (JSON: `server_cpu_s`). Three processes sharing the cores is what limits a one-box
    /// benchmark; this says how the CPU was spent.
    #[arg(long, value_name = "PID")]
    relay_pid: Option<u32>,
    /// nats-server's process id, for the same figure in the `--nats` run.
    #[arg(long, value_name = "PID", requires = "nats")]
    nats_pid: Option<u32>,
    /// Run the subscribers in a process of their own (this program, started again), as
    /// users' publishers and subscribers would be: publisher, relay and subscriber
    /// processes sharing the cores. Latency stays on one clock (the two processes' clocks
    /// are aligned through the wall clock to within µs). Also for the `--nats` run.
    #[arg(long)]
    sub_process: bool,
    /// Internal: this process is the subscriber process of a `--sub-process` run.
    #[arg(long, hide = true, value_name = "MODE")]
    subscriber_child: Option<String>,
    /// Print one JSON object with the results instead of text.
    #[arg(long)]
    json: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Seal with the key of this tree, and subscribe in it (32 hex digits): needed when keys
    /// of two trees cover the topic.
    #[arg(long, value_name = "TREE_ID", value_parser = io::parse_tree_id)]
    tree: Option<whispeer::protocol::TreeId>,
    #[command(flatten)]
    keys: KeyArgs,
}

/// `--signing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SigningArg {
    /// One signature per batch of messages.
    Batch,
    /// One signature per message.
    Message,
    /// Unsigned.
    Off,
}

impl SigningArg {
    fn name(self) -> &'static str {
        match self {
            SigningArg::Batch => "batch",
            SigningArg::Message => "message",
            SigningArg::Off => "off",
        }
    }
}

impl BenchArgs {
    /// `--window`, or [`DEFAULT_WINDOW_BYTES`] of payloads.
    fn window(&self) -> u64 {
        self.window
            .unwrap_or_else(|| (DEFAULT_WINDOW_BYTES / self.size.max(1) as u64).clamp(200, 65_536))
    }
}

/// Shared between publishers, subscribers and the progress ticker.
struct Shared {
    base: Instant,
    run_id: u64,
    sent: AtomicU64,
    received: Vec<AtomicU64>,
    /// Messages given up on by the window (delivered never, or so late it stalled).
    forgiven: AtomicU64,
    progress: Notify,
    stop_publishing: AtomicBool,
    window: u64,
    notify_every: u64,
}

impl Shared {
    /// A run's state: `subs` subscribers, at most `window` messages in flight.
    fn new(base: Instant, run_id: u64, subs: usize, window: u64) -> Arc<Self> {
        Arc::new(Shared {
            base,
            run_id,
            sent: AtomicU64::new(0),
            received: (0..subs).map(|_| AtomicU64::new(0)).collect(),
            forgiven: AtomicU64::new(0),
            progress: Notify::new(),
            stop_publishing: AtomicBool::new(false),
            window,
            notify_every: (window / 8).clamp(1, 64),
        })
    }

    /// Starts a [`subscriber`] task per connection (subscriber `i` counts in `received[i]`).
    fn spawn_subscribers(
        self: &Arc<Self>,
        conns: Vec<SubConn>,
        stop: &watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<SubResult>> {
        conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| tokio::spawn(subscriber(i, c, self.clone(), stop.clone())))
            .collect()
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    fn min_received(&self) -> Option<u64> {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .min()
    }
    fn total_received(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum()
    }
    /// Waits while the window is full.
    async fn window_open(&self) {
        loop {
            let Some(min) = self.min_received() else {
                return;
            };
            let sent = self.sent.load(Ordering::Acquire);
            let done = min + self.forgiven.load(Ordering::Acquire);
            if sent < done + self.window {
                return;
            }
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.min_received() != Some(min) {
                continue;
            }
            if tokio::time::timeout(STALL, notified).await.is_err()
                && self.min_received() == Some(min)
            {
                // Nothing arrived for a while: give up on what is outstanding.
                let outstanding = sent.saturating_sub(done);
                self.forgiven.fetch_add(outstanding, Ordering::AcqRel);
                tracing::debug!(outstanding, "window stalled; counting as lost");
            }
        }
    }
}

#[derive(Default)]
struct PubResult {
    sent: u64,
    end_ns: u64,
    reconnects: u64,
}

struct SubResult {
    hist: Histogram<u64>,
    totals: SubTotals,
}

/// What subscribers counted, summed over them (and sent over by a subscriber process).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SubTotals {
    received: u64,
    /// Nanoseconds after the run's start of the last delivery.
    last_ns: u64,
    reconnects: u64,
    relay_gaps: u64,
    rejected: u64,
    batch_root_hits: u64,
}

impl SubTotals {
    fn add(&mut self, o: &SubTotals) {
        self.received += o.received;
        self.last_ns = self.last_ns.max(o.last_ns);
        self.reconnects += o.reconnects;
        self.relay_gaps += o.relay_gaps;
        self.rejected += o.rejected;
        self.batch_root_hits += o.batch_root_hits;
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    pubs: usize,
    subs: usize,
    size: usize,
    sent: u64,
    received: u64,
    duration_s: f64,
    publish_rate: f64,
    delivery_rate: f64,
    latency_us: Latency,
    /// sent × subs.
    expected: u64,
    lost: u64,
    publish_mb_per_s: f64,
    delivery_mb_per_s: f64,
    /// The requested total rate (0 = unpaced).
    target_rate: f64,
    /// `--even-pacing` with a rate: messages evenly spaced, not in timer-tick bursts.
    even_pacing: bool,
    /// Most messages in flight (unpaced runs; `--window`).
    window: u64,
    relay: String,
    topic: String,
    reconnects: u64,
    relay_gaps: u64,
    /// `batch`, `message` or `off`.
    signing: &'static str,
    /// Signatures the subscribers did not have to check (batch signing, PROTOCOL §4.14).
    batch_root_hits: u64,
    /// CPU seconds the bench used during the run (publishers and subscribers together,
    /// with `--sub-process` both processes), from `/proc/…/stat` (0 where there is none).
    cpu_s: f64,
    /// `--sub-process`: the subscribers ran in a process of their own.
    sub_process: bool,
    /// `--sub-process`: CPU seconds of the subscriber process (part of `cpu_s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    sub_cpu_s: Option<f64>,
    /// `--relay-pid` / `--nats-pid`: CPU seconds the server process used during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_s: Option<f64>,
    /// Messages the subscribers could not open.
    rejected: u64,
    /// Cores the run kept busy: the bench's CPU seconds (both processes with
    /// `--sub-process`) plus the server's (`--relay-pid` / `--nats-pid`), over its duration.
    cores_used: f64,
    /// `delivery_rate` ÷ `cores_used`: deliveries per second per core the run used — on a
    /// machine whose cores the processes share, the figure that says what the stack costs.
    delivery_rate_per_core: f64,
    /// What sealing and opening alone cost here, and the delivery rate that allows
    /// (whispeer runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pipeline: Option<Pipeline>,
    /// Paced runs: the latency of the same rate and size through two loopback hops with
    /// nothing in between (`floor`), measured before the run: what this machine adds to
    /// any message path of a run's shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_us: Option<Latency>,
    /// `--nats`: the same load through nats-server, plaintext (`signing` = `plaintext`).
    #[serde(skip_serializing_if = "Option::is_none")]
    nats: Option<Box<Report>>,
    /// `--nats`: whispeer divided by NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_ratio: Option<Ratio>,
}

/// whispeer's figure divided by NATS's, per figure (throughput above 1 = whispeer faster;
/// latency and CPU above 1 = whispeer slower or costlier).
#[derive(Debug, Serialize)]
struct Ratio {
    delivery_rate: f64,
    publish_rate: f64,
    latency_p50: f64,
    latency_p99: f64,
    /// CPU seconds of this process per delivered message.
    cpu_per_msg: f64,
}

impl Ratio {
    fn of(w: &Report, n: &Report) -> Self {
        let div = |a: f64, b: f64| if b > 0.0 { round3(a / b) } else { 0.0 };
        let per_msg = |r: &Report| r.cpu_s / (r.received.max(r.sent).max(1)) as f64;
        Self {
            delivery_rate: div(w.delivery_rate, n.delivery_rate),
            publish_rate: div(w.publish_rate, n.publish_rate),
            latency_p50: div(w.latency_us.p50 as f64, n.latency_us.p50 as f64),
            latency_p99: div(w.latency_us.p99 as f64, n.latency_us.p99 as f64),
            cpu_per_msg: div(per_msg(w), per_msg(n)),
        }
    }
}

/// The pipeline limit (issue 11): what sealing and opening one message cost on one thread
/// here — measured before the load with the run's topic, size, codec, suite, padding and
/// signing — plus the relay's CPU per delivery in the run (`--relay-pid`), and so the most
/// deliveries/s the machine's cores could sustain with publisher, relay and subscribers
/// sharing them. `reached` says how close the run came: the rest is the client stack
/// (framing, syscalls, task hand-offs) and scheduling.
#[derive(Debug, Clone, Serialize)]
struct Pipeline {
    /// µs of one thread to seal one message (batch signing: with its share of the
    /// batch's signature).
    seal_us: f64,
    /// µs of one thread to open one message (verify, decrypt, decompress).
    open_us: f64,
    /// The relay's CPU µs per delivered message during the run (`--relay-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_us: Option<f64>,
    /// Cores of this machine.
    cores: usize,
    /// cores × 10⁶ ÷ (seal ÷ subs + open + relay): deliveries/s at those costs.
    limit_per_s: f64,
    /// The run's delivery rate ÷ `limit_per_s`.
    reached: f64,
    /// The same costs measured with every core sealing and opening at once (one thread
    /// per core), as in the run: cores that share a host's physical core, its caches or
    /// its power budget are slower together than alone, which the one-thread limit does
    /// not show. Absent on one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    busy: Option<BusyLimit>,
}

/// [`Pipeline`]'s limit from costs measured with every core busy.
#[derive(Debug, Clone, serde::Serialize)]
struct BusyLimit {
    /// µs per seal, the mean over the threads.
    seal_us: f64,
    /// µs per open, the mean over the threads.
    open_us: f64,
    /// cores × 10⁶ ÷ (seal ÷ subs + open + relay) at these costs.
    limit_per_s: f64,
    /// The run's delivery rate ÷ `limit_per_s`.
    reached: f64,
}

/// Messages sealed and opened to measure [`Pipeline`] (about 4 MiB of payload, 256–4,096).
fn pipeline_messages(size: usize) -> usize {
    ((4 << 20) / size.max(1)).clamp(256, 4096)
}

/// Seals then opens [`pipeline_messages`] messages on this thread as the run's clients
/// would; returns µs per seal and per open.
#[allow(clippy::too_many_arguments)]
fn measure_seal_open(
    keys: &[AnyKey],
    topic: &Topic,
    tree: Option<whispeer::protocol::TreeId>,
    signing: SigningArg,
    batch_max: u32,
    opts: whispeer::protocol::SealOptions,
    size: usize,
) -> Result<(f64, f64)> {
    use whispeer::core::{self, batching::PublishBatch, SealPolicy};
    use whispeer::protocol::{BatchPolicy, Opener, Sealer};
    let kr = std::sync::RwLock::new(io::keyring(keys)?);
    let n = pipeline_messages(size);
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut payload = vec![0u8; size];
    rng.fill_bytes(&mut payload);
    let id = (signing != SigningArg::Off).then(Identity::generate);
    let policy = SealPolicy::new(opts, id.is_some());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut sealer = Sealer::new();
    let mut envs = Vec::with_capacity(n);
    let t = Instant::now();
    match (&id, signing) {
        (Some(id), SigningArg::Batch) => {
            let per = batch_max.clamp(1, 4096) as usize;
            let window = BatchPolicy {
                max_messages: per as u32,
                max_wait_us: 0,
            };
            for start in (0..n).step_by(per) {
                let mut batch = PublishBatch::new(window);
                for i in start..(start + per).min(n) {
                    let (p, _) = core::prepare_publish_in(
                        &kr,
                        tree,
                        &policy,
                        &mut sealer,
                        topic,
                        CONTENT_TYPE,
                        &payload,
                        now,
                        &mut rng,
                    )?;
                    batch.push(p, i, 0);
                }
                for (env, _) in batch.seal_all(&mut sealer, id, &mut rng) {
                    envs.push(env?);
                }
            }
        }
        _ => {
            for _ in 0..n {
                let (env, _) = core::seal_publish_in(
                    &kr,
                    tree,
                    id.as_ref(),
                    &policy,
                    &mut sealer,
                    topic,
                    CONTENT_TYPE,
                    &payload,
                    now,
                    &mut rng,
                )?;
                envs.push(env);
            }
        }
    }
    let seal_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let keyring = kr.read().unwrap_or_else(|p| p.into_inner());
    let mut opener = Opener::new();
    let t = Instant::now();
    for e in &envs {
        opener
            .open(&keyring, e, now)
            .context("the pipeline measurement could not open its own message")?;
    }
    let open_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    Ok((seal_us, open_us))
}

impl Pipeline {
    /// From the one-thread costs and, when measured, the costs with every core busy.
    fn of(seal_us: f64, open_us: f64, busy: Option<(f64, f64)>, r: &Report) -> Self {
        let relay_us = r
            .server_cpu_s
            .map(|cpu| round1(cpu * 1e6 / r.received.max(1) as f64));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let limit = |seal_us: f64, open_us: f64| {
            let per = seal_us / r.subs.max(1) as f64 + open_us + relay_us.unwrap_or(0.0);
            (cores as f64 * 1e6 / per.max(1e-9)).round()
        };
        let limit_per_s = limit(seal_us, open_us);
        Pipeline {
            seal_us: round1(seal_us),
            open_us: round1(open_us),
            relay_us,
            cores,
            limit_per_s,
            reached: round3(r.delivery_rate / limit_per_s.max(1.0)),
            busy: busy.map(|(seal_us, open_us)| {
                let limit_per_s = limit(seal_us, open_us);
                BusyLimit {
                    seal_us: round1(seal_us),
                    open_us: round1(open_us),
                    limit_per_s,
                    reached: round3(r.delivery_rate / limit_per_s.max(1.0)),
                }
            }),
        }
    }
}

impl Latency {
    fn of(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Latency {
                p50: 0,
                p90: 0,
                p99: 0,
                p999: 0,
                max: 0,
                mean: 0.0,
            };
        }
        Latency {
            p50: hist.value_at_quantile(0.50),
            p90: hist.value_at_quantile(0.90),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            mean: round1(hist.mean()),
        }
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub async fn run(a: BenchArgs) -> Result<ExitCode> {
    a.conn.check()?;
    if a.pubs == 0 {
        usage!("--pubs must be at least 1");
    }
    if a.pubs > MAX_CLIENTS || a.subs > MAX_CLIENTS {
        usage!("--pubs and --subs take at most {MAX_CLIENTS} clients each");
    }
    if a.size < HEADER {
        usage!("--size must be at least {HEADER} bytes (send time and run id)");
    }
    if a.size > MAX_SIZE {
        usage!("--size takes at most {MAX_SIZE} bytes (a payload is one frame)");
    }
    if !a.rate.is_finite() || a.rate < 0.0 {
        usage!("--rate must be a non-negative number");
    }
    if a.window == Some(0) {
        usage!("--window must be at least 1");
    }
    if let Some(url) = &a.nats {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            usage!("--nats takes a nats:// (or tls://) URL, not '{url}'");
        }
    }
    let duration = secs(a.duration)?;
    let topic = Topic::new(a.topic.as_str()).with_context(|| format!("topic '{}'", a.topic))?;
    let mut keys = a.keys.load()?;
    // The key strings a subscriber process (`--sub-process`) is handed in its environment,
    // never on its command line: those given (each key file read once, here) or a key made
    // here.
    let mut key_texts = zeroize::Zeroizing::new(a.keys.texts()?.join("\n"));
    if keys.is_empty() {
        let key = TreeKey::generate_with("bench", &mut rand::rngs::OsRng)?;
        key_texts = zeroize::Zeroizing::new(key.to_key_string().to_string());
        keys.push(AnyKey::Tree(key));
    }
    // The relay account (`--auth-key FILE` read once, or `--auth-token`): every connection
    // uses it, and a subscriber process gets it in its environment too.
    let auth_secret = if a.subscriber_child.is_some() {
        child::parent_auth(&a.conn)?
    } else {
        a.conn.auth_secret()?
    };
    let auth = auth_secret
        .as_ref()
        .map(crate::pubsub::AuthSecret::relay_auth)
        .transpose()?;
    let child_secrets = child::Secrets {
        keys: key_texts,
        auth: auth_secret,
    };
    {
        let kr = io::keyring(&keys)?;
        match a.tree {
            Some(t) => kr.grant_in(t, &topic),
            None => kr.grant_for(&topic),
        }
        .context("the given keys cannot publish on the bench topic")?;
    }

    let compression = match (a.zstd, a.seal.compress) {
        (_, Some(c)) => c,
        (Some(l), None) if l > 0 => Compression::zstd(l),
        _ => Compression::none(),
    };
    let suite = a.seal.suite.unwrap_or_else(CipherSuite::xchacha);
    let signing_arg = if a.no_sign {
        SigningArg::Off
    } else {
        a.signing
    };
    let signing = match signing_arg {
        SigningArg::Batch => Signing::batched(a.batch_max, Duration::from_micros(a.batch_wait_us)),
        SigningArg::Message => Signing::per_message(),
        SigningArg::Off => Signing::off(),
    };
    let connect = |identity: Option<Identity>| {
        connect_bench(
            &a.conn,
            auth.as_ref(),
            &keys,
            identity,
            signing,
            (compression, suite),
            a.no_padding,
        )
    };

    // Connect everyone and subscribe before the first publish.
    let wsp_subs = || async {
        let mut subs = Vec::with_capacity(a.subs);
        for _ in 0..a.subs {
            let client = connect(None).await?;
            // The subscribers get the messages of the tree the publishers seal with.
            let mut o = whispeer::SubscribeOptions::new();
            if let Some(t) = a.tree {
                o = o.tree(t);
            }
            let sub = client
                .subscribe_bytes_with_options(topic.as_str(), o)
                .await
                .context("subscribe failed")?;
            subs.push(SubConn::Wsp { client, sub });
        }
        anyhow::Ok(subs)
    };
    if let Some(mode) = &a.subscriber_child {
        let subs = match (mode.strip_prefix("nats:"), &a.nats) {
            (Some(subject), Some(url)) => nats_subs(&a, url, subject).await?,
            (Some(_), None) => anyhow::bail!("a NATS subscriber process needs --nats"),
            (None, _) => wsp_subs().await?,
        };
        child::serve(&a, subs).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let subs = if a.sub_process && a.subs > 0 {
        Subs::Child(child::ChildSubs::spawn("wsp".to_owned(), child_secrets.clone()).await?)
    } else {
        Subs::Local(wsp_subs().await?)
    };
    let opts = match a.tree {
        Some(t) => whispeer::PublishOptions::default().tree(t),
        None => whispeer::PublishOptions::default(),
    };
    let mut pubs = Vec::with_capacity(a.pubs);
    for _ in 0..a.pubs {
        let id = (signing_arg != SigningArg::Off).then(Identity::generate);
        pubs.push(PubConn::Wsp {
            client: connect(id).await?,
            topic: topic.clone(),
            opts,
        });
    }
    // Seal and open alone, before the load (so the load does not slow it down).
    let seal_opts = whispeer::protocol::SealOptions {
        compression: compression.into_inner(),
        padding: if a.no_padding {
            Padding::none()
        } else {
            Padding::padme()
        }
        .into_inner(),
        suite: suite.into_inner(),
    };
    // Twice, keeping the faster of each: the first pass also warms caches and clocks.
    let seal_open = || {
        measure_seal_open(
            &keys,
            &topic,
            a.tree,
            signing_arg,
            a.batch_max,
            seal_opts,
            a.size,
        )
    };
    let twice = || -> Result<(f64, f64)> {
        let ((s1, o1), (s2, o2)) = (seal_open()?, seal_open()?);
        Ok((s1.min(s2), o1.min(o2)))
    };
    let (seal_us, open_us) = twice()?;
    // Then on every core at once (the same, one thread each): the run keeps them all busy.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = if cores > 1 {
        let each = std::thread::scope(|s| {
            let threads: Vec<_> = (0..cores).map(|_| s.spawn(twice)).collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<_>>>()
        })?;
        let mean = |f: fn(&(f64, f64)) -> f64| each.iter().map(f).sum::<f64>() / cores as f64;
        Some((mean(|c| c.0), mean(|c| c.1)))
    } else {
        None
    };
    let floor = if a.rate > 0.0 {
        let (rate, size) = (a.rate, a.size);
        let h = tokio::task::spawn_blocking(move || {
            crate::floor::measure(rate, size, crate::floor::messages(rate), new_hist())
        })
        .await??;
        Some(Latency::of(&h))
    } else {
        None
    };
    let mut report = run_load(&a, duration, pubs, subs, a.relay_pid).await?;
    report.pipeline = Some(Pipeline::of(seal_us, open_us, busy, &report));
    report.floor_us = floor;
    report.relay = a.conn.relay.clone();
    report.signing = signing_arg.name();
    if report.reconnects > 0 {
        io::warn(format!(
            "clients reconnected {} time(s) during the run (a relay limit such as \
             publish_rate? run the relay with --publish-rate 0 for benchmarks)",
            report.reconnects
        ));
    }
    if report.rejected > 0 {
        io::warn(format!(
            "{} message(s) could not be opened",
            report.rejected
        ));
    }

    if let Some(url) = a.nats.clone() {
        let mut nats = run_nats(&a, duration, &url, child_secrets).await?;
        nats.relay = url;
        report.nats_ratio = Some(Ratio::of(&report, &nats));
        report.nats = Some(Box::new(nats));
    }
    if a.json {
        io::print_or_exit(&serde_json::to_string(&report)?)?;
    } else {
        print_human(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The same load through nats-server (core NATS, plaintext payloads of the same size, one
/// subject, one async-nats connection per publisher and per subscriber).
async fn run_nats(
    a: &BenchArgs,
    duration: Duration,
    url: &str,
    secrets: child::Secrets,
) -> Result<Report> {
    let subject = format!("whispeer.bench.{:016x}", rand::rngs::OsRng.next_u64());
    let subs = if a.sub_process && a.subs > 0 {
        Subs::Child(child::ChildSubs::spawn(format!("nats:{subject}"), secrets).await?)
    } else {
        Subs::Local(nats_subs(a, url, &subject).await?)
    };
    let mut pubs = Vec::with_capacity(a.pubs);
    for _ in 0..a.pubs {
        pubs.push(PubConn::Nats {
            client: nats_connect(a, url).await?,
            subject: subject.clone(),
        });
    }
    let mut r = run_load(a, duration, pubs, subs, a.nats_pid).await?;
    r.signing = "plaintext";
    r.topic = subject;
    Ok(r)
}

async fn nats_connect(a: &BenchArgs, url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(secs(a.conn.connect_timeout)?)
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to nats-server at {url}"))
}

/// `--subs` NATS connections subscribed to `subject`.
async fn nats_subs(a: &BenchArgs, url: &str, subject: &str) -> Result<Vec<SubConn>> {
    let mut subs = Vec::with_capacity(a.subs);
    for _ in 0..a.subs {
        let client = nats_connect(a, url).await?;
        let sub = client
            .subscribe(subject.to_owned())
            .await
            .context("NATS subscribe failed")?;
        registered(&client).await?;
        subs.push(SubConn::Nats { client, sub });
    }
    Ok(subs)
}

/// Returns once nats-server has processed everything `client` sent so far (its `SUB`s
/// included). async-nats' `flush` only empties the socket's write buffer, so under load a
/// publisher on another connection could get ahead of the `SUB` and its first messages
/// would count as lost (seen in CI: 288 of 2,000). The server handles one connection's
/// operations in order: a message published to an inbox of this client coming back means
/// the earlier `SUB` is in place.
async fn registered(client: &async_nats::Client) -> Result<()> {
    use futures_util::StreamExt;
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .context("NATS subscribe failed")?;
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .context("NATS publish failed")?;
    client.flush().await.context("NATS flush failed")?;
    tokio::time::timeout(Duration::from_secs(10), probe.next())
        .await
        .context("nats-server did not echo a probe within 10 s")?
        .context("the NATS connection closed")?;
    probe
        .unsubscribe()
        .await
        .context("NATS unsubscribe failed")?;
    Ok(())
}

/// The subscribers of a load: here, or in a subscriber process (`--sub-process`).
enum Subs {
    Local(Vec<SubConn>),
    Child(child::ChildSubs),
}

/// Runs one load (publishers and subscribers already connected and subscribed) and
/// reports it; `relay` and `signing` are for the caller to fill in.
async fn run_load(
    a: &BenchArgs,
    duration: Duration,
    pub_conns: Vec<PubConn>,
    subs: Subs,
    server_pid: Option<u32>,
) -> Result<Report> {
    let cpu0 = cpu_seconds(None);
    let server0 = server_pid.map(|p| cpu_seconds(Some(p)));
    let window = a.window();
    let (base, base_unix_ns) = child::base_now();
    let shared = Shared::new(base, rand::rngs::OsRng.next_u64(), a.subs, window);

    let (stop_tx, stop_rx) = watch::channel(false);
    let (sub_tasks, sub_process) = match subs {
        Subs::Local(conns) => (shared.spawn_subscribers(conns, &stop_rx), None),
        Subs::Child(c) => (Vec::new(), Some(c.start(shared.clone(), base_unix_ns)?)),
    };

    let bar = progress_bar(a, duration);
    let ticker = {
        let shared = shared.clone();
        let bar = bar.clone();
        let msgs = a.msgs;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let sent = shared.sent.load(Ordering::Relaxed);
                let recv = shared.total_received();
                let el = shared.base.elapsed();
                match msgs {
                    Some(_) => bar.set_position(sent),
                    None => bar.set_position(el.as_millis() as u64),
                }
                let rate = sent as f64 / el.as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "sent {sent}  received {recv}  {} msgs/s",
                    fmt_int(rate)
                ));
            }
        })
    };

    let per_pub_rate = a.rate / a.pubs as f64;
    let mut pub_tasks = Vec::new();
    for (i, conn) in pub_conns.into_iter().enumerate() {
        let quota = a.msgs.map(|m| {
            let n = a.pubs as u64;
            m / n + u64::from((i as u64) < m % n)
        });
        pub_tasks.push(tokio::spawn(publisher(
            conn,
            shared.clone(),
            a.size,
            quota,
            duration,
            Pace {
                rate: per_pub_rate,
                even: a.even_pacing,
            },
            a.subs == 0,
        )));
    }
    let mut pubs = Vec::new();
    for t in pub_tasks {
        pubs.push(t.await.context("publisher task")??);
    }
    shared.stop_publishing.store(true, Ordering::Release);
    let sent: u64 = pubs.iter().map(|p| p.sent).sum();
    let pub_end_ns = pubs.iter().map(|p| p.end_ns).max().unwrap_or(0);

    // Drain: wait for every subscriber to have everything, or for deliveries to stop.
    if a.subs > 0 {
        let mut last = shared.total_received();
        let mut last_change = Instant::now();
        let target = sent * a.subs as u64;
        while shared.total_received() < target {
            let notified = shared.progress.notified();
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            let now = shared.total_received();
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() > DRAIN_IDLE {
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    bar.finish_and_clear();

    let (hist, mut t) = collect_subscribers(sub_tasks).await?;
    t.reconnects += pubs.iter().map(|p| p.reconnects).sum::<u64>();
    let mut latency = None;
    let mut sub_cpu_s = None;
    if let Some(c) = sub_process {
        let r = c.finish().await?;
        t.add(&r.totals);
        latency = Some(r.latency);
        sub_cpu_s = Some(r.cpu_s);
    }
    let (received, last_ns) = (t.received, t.last_ns);

    let cpu_s = round3(cpu_seconds(None) - cpu0 + sub_cpu_s.unwrap_or(0.0));
    let server_cpu_s = server_pid
        .zip(server0)
        .map(|(p, c0)| round3(cpu_seconds(Some(p)) - c0));
    let pub_s = (pub_end_ns as f64 / 1e9).max(1e-9);
    let del_s = (last_ns as f64 / 1e9).max(1e-9);
    let duration_s = pub_s.max(if received > 0 { del_s } else { 0.0 });
    let cores_used = (cpu_s + server_cpu_s.unwrap_or(0.0)) / duration_s;
    let expected = sent * a.subs as u64;
    let mb = |rate: f64| rate * a.size as f64 / 1e6;
    let publish_rate = sent as f64 / pub_s;
    let delivery_rate = if received > 0 {
        received as f64 / del_s
    } else {
        0.0
    };
    Ok(Report {
        pubs: a.pubs,
        subs: a.subs,
        size: a.size,
        sent,
        received,
        duration_s: round3(duration_s),
        publish_rate: round1(publish_rate),
        delivery_rate: round1(delivery_rate),
        latency_us: latency.unwrap_or_else(|| Latency::of(&hist)),
        expected,
        lost: expected.saturating_sub(received),
        publish_mb_per_s: round3(mb(publish_rate)),
        delivery_mb_per_s: round3(mb(delivery_rate)),
        target_rate: a.rate,
        even_pacing: a.even_pacing && a.rate > 0.0,
        window,
        relay: String::new(),
        topic: a.topic.clone(),
        reconnects: t.reconnects,
        relay_gaps: t.relay_gaps,
        signing: "",
        batch_root_hits: t.batch_root_hits,
        cpu_s,
        sub_process: sub_cpu_s.is_some(),
        sub_cpu_s,
        server_cpu_s,
        rejected: t.rejected,
        cores_used: round3(cores_used),
        delivery_rate_per_core: round1(delivery_rate / cores_used.max(1e-9)),
        pipeline: None,
        floor_us: None,
        nats: None,
        nats_ratio: None,
    })
}

async fn connect_bench(
    conn: &ConnArgs,
    auth: Option<&whispeer::RelayAuth>,
    keys: &[AnyKey],
    identity: Option<Identity>,
    signing: Signing,
    (compression, suite): (Compression, CipherSuite),
    no_padding: bool,
) -> Result<Client> {
    let keyring = io::keyring(keys)?;
    let mut b = Client::builder()
        .with(whispeer::Relays::new(conn.urls()))
        .with(whispeer::Encryption::with_keyring(keyring))
        .with(signing)
        .with(compression)
        .with(suite)
        .with(if no_padding {
            Padding::none()
        } else {
            Padding::padme()
        })
        .connect_timeout(secs(conn.connect_timeout)?)
        .require_bound_auth(conn.require_bound_auth);
    if let Some(id) = identity {
        b = b.with(id);
    }
    if let Some(auth) = auth {
        b = b.with(auth.clone());
    }
    if let Some(ca) = &conn.ca {
        b = b.with(
            whispeer::TlsRoot::pem_file(ca)
                .with_context(|| format!("cannot read {}", ca.display()))?,
        );
    }
    for pin in conn.pins()? {
        b = b.with(pin);
    }
    b.connect()
        .await
        .with_context(|| format!("cannot connect to {}", conn.relay))
}

/// A publishing connection of a run: a whispeer client (sealed, and signed as asked) or a
/// NATS one (plaintext), driven by the same [`publisher`] loop.
enum PubConn {
    Wsp {
        client: Client,
        topic: Topic,
        opts: whispeer::PublishOptions,
    },
    Nats {
        client: async_nats::Client,
        subject: String,
    },
}

impl PubConn {
    async fn send(&self, payload: &[u8]) -> Result<()> {
        match self {
            PubConn::Wsp {
                client,
                topic,
                opts,
            } => client
                .publish_bytes_with(topic.as_str(), CONTENT_TYPE, payload, *opts)
                .await
                .map(drop)
                .context("publish failed"),
            PubConn::Nats { client, subject } => client
                .publish(subject.clone(), bytes::Bytes::copy_from_slice(payload))
                .await
                .context("NATS publish failed"),
        }
    }

    /// Waits until the server has everything sent so far.
    async fn flush(&self) -> Result<()> {
        match self {
            PubConn::Wsp { client, .. } => client
                .flush()
                .await
                .context("the relay did not confirm the messages"),
            PubConn::Nats { client, .. } => client.flush().await.context("NATS flush failed"),
        }
    }

    /// Closes the connection; returns how often it reconnected.
    async fn close(self) -> u64 {
        match self {
            PubConn::Wsp { client, .. } => {
                let n = client.stats().reconnects;
                client.close().await;
                n
            }
            PubConn::Nats { client, .. } => {
                let n = client.statistics().connects.load(Ordering::Relaxed);
                // Until nats-server has handled every publish: `flush` only empties the
                // socket's write buffer, and closing a socket with unread bytes in its
                // receive queue (the server's PONGs) sends a reset, on which the server may
                // drop publishes it had not read yet (seen in CI: 384 of 1,000 arrived).
                if let Err(e) = registered(&client).await {
                    tracing::warn!(error = %e, "nats-server did not confirm the last publishes");
                }
                drop(client);
                n.saturating_sub(1)
            }
        }
    }
}

/// A subscribing connection of a run (see [`PubConn`]).
enum SubConn {
    Wsp {
        client: Client,
        sub: whispeer::Subscription<Vec<u8>>,
    },
    Nats {
        client: async_nats::Client,
        sub: async_nats::Subscriber,
    },
}

impl SubConn {
    /// The next payload; `None` when the stream ended, `Some(None)` for a message that could
    /// not be opened (counted by the client).
    async fn next(&mut self) -> Option<Option<Vec<u8>>> {
        use futures_util::StreamExt;
        match self {
            SubConn::Wsp { sub, .. } => sub.next_message().await.map(|m| m.ok().map(|m| m.value)),
            SubConn::Nats { sub, .. } => sub.next().await.map(|m| Some(m.payload.into())),
        }
    }

    /// Closes the connection; returns (reconnects, relay gaps, rejected, batch root hits).
    async fn close(self, idx: usize, received: u64) -> [u64; 4] {
        match self {
            SubConn::Wsp { client, sub } => {
                let stats = client.stats();
                tracing::debug!(subscriber = idx, received, ?stats, "subscriber done");
                drop(sub);
                client.close().await;
                [
                    stats.reconnects,
                    stats.core.relay_gaps,
                    stats.core.rejected,
                    stats.core.batch_root_hits,
                ]
            }
            SubConn::Nats { client, sub } => {
                let connects = client.statistics().connects.load(Ordering::Relaxed);
                drop(sub);
                drop(client);
                [connects.saturating_sub(1), 0, 0, 0]
            }
        }
    }
}

/// A publisher's rate (messages/s, 0 = unpaced) and whether to space them evenly.
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: f64,
    even: bool,
}

/// With `--even-pacing`, intervals shorter than this are paced by a [`Pacer`] thread rather
/// than tokio's timer.
const PACER_BELOW: Duration = Duration::from_millis(2);

/// Even pacing below tokio's 1 ms timer resolution (`--even-pacing`): a thread sleeps
/// (µs-precise, an hrtimer) until each message's due time and hands the publisher a
/// permit. With tokio's timer a publisher at 10k msg/s wakes once per tick and sends ~13
/// messages back to back 1.3 ms apart: cheaper for every stage (batches form, one wake-up
/// per burst), so a steady stream is measured this way. Behind schedule (a full window),
/// permits accumulate and the publisher catches up, as with the timer.
struct Pacer {
    permits: Arc<tokio::sync::Semaphore>,
}

impl Pacer {
    fn start(interval: Duration) -> Self {
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let p = permits.clone();
        let spawned = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let start = Instant::now();
                for n in 0u64.. {
                    let due = start + interval.mul_f64(n as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if p.is_closed() {
                        return;
                    }
                    p.add_permits(1);
                }
            });
        if spawned.is_err() {
            // No thread: unpaced rather than stuck.
            permits.close();
        }
        Pacer { permits }
    }

    async fn tick(&self) {
        if let Ok(p) = self.permits.acquire().await {
            p.forget();
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.permits.close();
    }
}

async fn publisher(
    conn: PubConn,
    shared: Arc<Shared>,
    size: usize,
    quota: Option<u64>,
    duration: Duration,
    pace: Pace,
    flush_window: bool,
) -> Result<PubResult> {
    let Pace { rate, even } = pace;
    let mut buf = vec![0u8; size];
    rand::rngs::OsRng.fill_bytes(&mut buf[HEADER..]);
    buf[8..16].copy_from_slice(&shared.run_id.to_be_bytes());
    let start = tokio::time::Instant::now();
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let pacer = interval
        .filter(|iv| even && *iv < PACER_BELOW)
        .map(Pacer::start);
    let mut n = 0u64;
    loop {
        match quota {
            Some(q) if n >= q => break,
            None if shared.base.elapsed() >= duration => break,
            _ => {}
        }
        if let Some(p) = &pacer {
            p.tick().await;
        } else if let Some(iv) = interval {
            let due = start + iv.mul_f64(n as f64);
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
        }
        if flush_window {
            if n > 0 && n % shared.window == 0 {
                conn.flush().await?;
            }
        } else {
            shared.window_open().await;
        }
        buf[..8].copy_from_slice(&shared.now_ns().to_be_bytes());
        conn.send(&buf).await?;
        shared.sent.fetch_add(1, Ordering::AcqRel);
        n += 1;
    }
    conn.flush().await?;
    let end_ns = shared.now_ns();
    let reconnects = conn.close().await;
    Ok(PubResult {
        sent: n,
        end_ns,
        reconnects,
    })
}

async fn subscriber(
    idx: usize,
    mut conn: SubConn,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubResult {
    let mut hist = new_hist();
    let mut received = 0u64;
    let mut last_ns = 0u64;
    let mut trace = std::env::var_os("WHISPEER_BENCH_TRACE").map(|p| (p, Vec::new()));
    loop {
        let m = tokio::select! {
            biased;
            m = conn.next() => m,
            _ = stop.changed() => break,
        };
        let Some(Some(v)) = m else {
            if m.is_none() {
                break;
            }
            continue;
        };
        if v.len() < HEADER || v[8..16] != shared.run_id.to_be_bytes() {
            continue; // not from this run
        }
        let now = shared.now_ns();
        let sent_ns = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
        let us = now.saturating_sub(sent_ns) / 1000;
        hist.saturating_record(us.max(1));
        if let Some((_, t)) = trace.as_mut() {
            t.push((sent_ns, us));
        }
        received += 1;
        last_ns = now;
        shared.received[idx].fetch_add(1, Ordering::AcqRel);
        if received % shared.notify_every == 0 {
            shared.progress.notify_waiters();
        }
    }
    shared.progress.notify_waiters();
    if let Some((path, t)) = trace {
        let mut path = path;
        path.push(format!(".{idx}"));
        let lines: String = t.iter().map(|(s, us)| format!("{s} {us}\n")).collect();
        // Created exclusively with mode 0600 and renamed into place: a symbolic link planted
        // at the path is replaced, never followed (review F10).
        if let Err(e) = io::write_secret_bytes(std::path::Path::new(&path), lines.as_bytes(), true)
        {
            tracing::warn!(?path, %e, "could not write the latency trace");
        }
    }
    let [reconnects, relay_gaps, rejected, batch_root_hits] = conn.close(idx, received).await;
    SubResult {
        hist,
        totals: SubTotals {
            received,
            last_ns,
            reconnects,
            relay_gaps,
            rejected,
            batch_root_hits,
        },
    }
}

/// Waits for the subscriber tasks: their histograms merged, their counts summed.
async fn collect_subscribers(
    tasks: Vec<tokio::task::JoinHandle<SubResult>>,
) -> Result<(Histogram<u64>, SubTotals)> {
    let mut hist = new_hist();
    let mut totals = SubTotals::default();
    for t in tasks {
        let r = t.await.context("subscriber task")?;
        hist.add(&r.hist).expect("same bounds");
        totals.add(&r.totals);
    }
    Ok((hist, totals))
}

fn progress_bar(a: &BenchArgs, duration: Duration) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if a.no_progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let len = a.msgs.unwrap_or(duration.as_millis() as u64);
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let tmpl = if a.msgs.is_some() {
        "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}"
    } else {
        "{elapsed_precise} [{bar:30}] {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(tmpl) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// CPU seconds (user + system) of this process (`None`) or of process `pid` so far: fields
/// 14 and 15 of `/proc/…/stat`, in clock ticks (100 per second on Linux). 0 where there is
/// no `/proc` (or no such process).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count from after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// 1234567.8 → "1,234,568".
fn fmt_int(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_human(r: &Report) -> Result<()> {
    let pace = if r.target_rate > 0.0 {
        format!(
            "paced at {} msgs/s{}",
            fmt_int(r.target_rate),
            if r.even_pacing {
                " (evenly)"
            } else {
                " (timer ticks)"
            }
        )
    } else {
        format!("unpaced (window {})", fmt_int(r.window as f64))
    };
    let lines = [
        format!(
            "whispeer bench: {} publisher(s), {} subscriber(s), {}-byte payloads, {pace}, {} {}",
            r.pubs, r.subs, r.size, r.relay, r.topic
        ),
        format!(
            "publish:   {} msgs = {} msgs/s ({:.2} MB/s)",
            fmt_int(r.sent as f64),
            fmt_int(r.publish_rate),
            r.publish_mb_per_s
        ),
        format!(
            "delivered: {} msgs = {} msgs/s ({:.2} MB/s) across {} subscriber(s); lost {}",
            fmt_int(r.received as f64),
            fmt_int(r.delivery_rate),
            r.delivery_mb_per_s,
            r.subs,
            r.lost
        ),
        format!(
            "latency µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.1})",
            r.latency_us.p50,
            r.latency_us.p90,
            r.latency_us.p99,
            r.latency_us.p999,
            r.latency_us.max,
            r.latency_us.mean
        ),
        format!(
            "signing:   {} ({} of {} deliveries rode on an already verified batch signature)",
            r.signing,
            fmt_int(r.batch_root_hits as f64),
            fmt_int(r.received as f64)
        ),
        match r.sub_cpu_s {
            None => format!(
                "duration:  {:.3} s; this process used {:.2} CPU s ({:.2} cores)",
                r.duration_s,
                r.cpu_s,
                r.cpu_s / r.duration_s.max(1e-9)
            ),
            Some(sub) => format!(
                "duration:  {:.3} s; publisher process {:.2} CPU s ({:.2} cores), subscriber \
                 process {:.2} CPU s ({:.2} cores)",
                r.duration_s,
                r.cpu_s - sub,
                (r.cpu_s - sub) / r.duration_s.max(1e-9),
                sub,
                sub / r.duration_s.max(1e-9)
            ),
        },
    ];
    for l in lines {
        io::print_or_exit(&l)?;
    }
    if let Some(f) = &r.floor_us {
        io::print_or_exit(&format!(
            "floor µs:  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}: the same rate and size \
             through two loopback hops with nothing in between (measured before the run): \
             what this machine adds to any path of this shape",
            f.p50, f.p90, f.p99, f.p999, f.max
        ))?;
    }
    if let Some(server) = r.server_cpu_s {
        let per = |cpu: f64| cpu * 1e6 / r.received.max(1) as f64;
        io::print_or_exit(&format!(
            "cpu:       relay {:.2} CPU s ({:.2} cores); per delivered message: relay {:.2} µs, \
             clients {:.2} µs, together {:.2} µs",
            server,
            server / r.duration_s.max(1e-9),
            per(server),
            per(r.cpu_s),
            per(server + r.cpu_s)
        ))?;
    }
    io::print_or_exit(&format!(
        "per core:  {} deliveries/s per core used ({:.2} cores{})",
        fmt_int(r.delivery_rate_per_core),
        r.cores_used,
        if r.server_cpu_s.is_some() {
            ": the bench and the relay"
        } else {
            " of the bench; add --relay-pid for the relay's"
        }
    ))?;
    if let Some(p) = &r.pipeline {
        let relay = p.relay_us.map_or_else(
            || " (relay not counted: --relay-pid)".to_owned(),
            |us| format!(" + relay {us:.1} µs"),
        );
        io::print_or_exit(&format!(
            "pipeline:  seal {:.1} µs{} + open {:.1} µs{} per delivery (one thread each, \
             measured before the run) → limit {} deliveries/s on {} core(s); reached {:.0} %",
            p.seal_us,
            if r.subs > 1 {
                format!(" ÷ {} subscribers", r.subs)
            } else {
                String::new()
            },
            p.open_us,
            relay,
            fmt_int(p.limit_per_s),
            p.cores,
            p.reached * 100.0
        ))?;
        if let Some(b) = &p.busy {
            io::print_or_exit(&format!(
                "           every core sealing and opening at once: seal {:.1} µs + open {:.1} \
                 µs → limit {} deliveries/s; reached {:.0} %",
                b.seal_us,
                b.open_us,
                fmt_int(b.limit_per_s),
                b.reached * 100.0
            ))?;
        }
    }
    if let (Some(n), Some(x)) = (&r.nats, &r.nats_ratio) {
        let lines = [
            format!(
                "nats (plaintext, async-nats, same load) {}: publish {} msgs/s, delivered {} \
                 msgs/s, lost {}",
                n.relay,
                fmt_int(n.publish_rate),
                fmt_int(n.delivery_rate),
                n.lost
            ),
            format!(
                "nats latency µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}; {:.2} CPU s",
                n.latency_us.p50,
                n.latency_us.p90,
                n.latency_us.p99,
                n.latency_us.p999,
                n.latency_us.max,
                n.cpu_s
            ),
            format!(
                "whispeer/nats: delivered {:.3}×, published {:.3}×, p50 latency {:.2}×, p99 \
                 latency {:.2}×, client CPU per message {:.2}×",
                x.delivery_rate, x.publish_rate, x.latency_p50, x.latency_p99, x.cpu_per_msg
            ),
        ];
        for l in lines {
            io::print_or_exit(&l)?;
        }
        if let Some(server) = n.server_cpu_s {
            io::print_or_exit(&format!(
                "nats cpu:  nats-server {:.2} CPU s; per delivered message: server {:.2} µs, \
                 clients {:.2} µs",
                server,
                server * 1e6 / n.received.max(1) as f64,
                n.cpu_s * 1e6 / n.received.max(1) as f64
            ))?;
        }
    }
    Ok(())
}
