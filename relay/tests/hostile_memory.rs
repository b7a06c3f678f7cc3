//! Memory bounds against subscribers that never read (issue 10): 1,000 subscribers that
//! stop reading keep the real relay binary's RSS bounded by the configured byte limit of
//! the outbound queues (`queue.max_bytes`), not by the count limit (`queue.capacity`,
//! 4,096 messages here about 280 MiB); and subscribers of distinct topics (no frame shared
//! between queues) keep it bounded by the relay-wide budget (`queue.total_max_bytes`), not
//! by connections × `queue.max_bytes`. The numbers are printed for the report.

mod common;

use common::*;
use whispeer_protocol::codec;
use whispeer_protocol::frame::Ping;
use whispeer_protocol::Frame;

const SUBS: usize = 1_000;
const MSGS: usize = 3_500;
/// Above the stream writer's 64 KiB coalescing chunk, so frames are written, not copied.
const BODY: usize = 70 * 1024;
const QUEUE_MAX_BYTES: usize = 256 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_subscribers_keep_rss_bounded_by_the_byte_limits() {
    rlimit::increase_nofile_limit(4 * SUBS as u64 + 256).expect("raise the fd limit");
    let max_bytes = QUEUE_MAX_BYTES.to_string();
    let relay = BinRelay::start(&[
        "--store",
        "none",
        "--queue-max-bytes",
        &max_bytes,
        "--max-connections-per-addr",
        "4096",
        // Every subscriber connects from 127.0.0.1 at once: not churn.
        "--addr-connect-rate",
        "0",
        "--publish-rate",
        "0",
    ]);
    let pid = relay.child.id();
    let addr = relay.tcp();
    // Subscribers that subscribe, then never read again.
    let mut subs = Vec::with_capacity(SUBS);
    for _ in 0..SUBS {
        subs.push(non_reader(addr, &[1]).await);
    }
    let before = rss_kib(pid);
    let mut p = Client::tcp(addr).await;
    p.hello().await;
    let frame = codec::encode_prefixed(&pub_frame(envelope_sized(1, &[1], BODY)));
    let mut peak = before;
    for i in 0..MSGS {
        p.send_raw(&frame).await.unwrap();
        if i % 250 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    // Every publish was routed once the relay answers a ping sent after them.
    p.send(&Frame::Ping(Ping { nonce: 1 })).await;
    loop {
        if let Frame::Pong(_) = p.recv().await {
            break;
        }
    }
    let after = rss_kib(pid);
    peak = peak.max(after);
    let dropped = http_get_metrics(relay.admin()).await;
    let grown = peak.saturating_sub(before);
    eprintln!(
        "relay RSS with {SUBS} non-reading subscribers: {before} KiB idle, peak {peak} KiB \
         after {MSGS} x {BODY} B ({} MiB published); growth {grown} KiB; queue.max_bytes {} KiB; \
         dropped {}",
        (MSGS * BODY) >> 20,
        QUEUE_MAX_BYTES >> 10,
        dropped
    );
    // Bound: the shared queue window (all queues hold the same frames) and each stuck
    // writer's batch (<= queue.max_bytes), plus per-connection buffers and slack. Without
    // the byte bound the count bound keeps every one of the 3,500 frames (~240 MiB).
    let bound_kib = (4 * QUEUE_MAX_BYTES / 1024) as u64 + SUBS as u64 * 64 + 64 * 1024;
    assert!(
        grown <= bound_kib,
        "relay RSS grew by {grown} KiB, more than the {bound_kib} KiB the byte limits allow"
    );
    assert!(dropped > 0, "the slow-consumer policy dropped messages");
    drop(subs);
}

/// A subscriber of `levels` under key 1 with a tiny receive buffer (no kernel autotuning
/// soaking up data), which the caller never reads from again.
async fn non_reader(addr: std::net::SocketAddr, levels: &[u8]) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let mut c = Client::over_stream(Box::new(stream));
    c.hello().await;
    c.subscribe(1, exact(1, levels)).await;
    c
}

/// `whispeer_relay_dropped_messages_total` from the admin port.
async fn http_get_metrics(admin: std::net::SocketAddr) -> u64 {
    metric(admin, "whispeer_relay_dropped_messages_total").await
}

/// A count from the environment (for measuring at other sizes), else `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Subscribers of distinct topics (`WSP_MEMORY_SUBS`, default 100) that never read;
/// `WSP_MEMORY_ROUNDS` (default 64) messages of `BODY` bytes published to each topic.
/// Returns the relay's RSS growth in KiB, the budget's drop count and the subscribers.
async fn distinct_topics(budget: usize, per_queue: usize) -> (u64, u64, usize) {
    let subs = env_or("WSP_MEMORY_SUBS", 100);
    let rounds = env_or("WSP_MEMORY_ROUNDS", 64);
    rlimit::increase_nofile_limit(4 * subs as u64 + 256).expect("raise the fd limit");
    let (budget, per_queue) = (budget.to_string(), per_queue.to_string());
    let relay = BinRelay::start(&[
        "--store",
        "none",
        "--queue-max-bytes",
        &per_queue,
        "--queue-total-max-bytes",
        &budget,
        "--max-connections-per-addr",
        "4096",
        // Every subscriber connects from 127.0.0.1 at once: not churn.
        "--addr-connect-rate",
        "0",
        "--publish-rate",
        "0",
        "--addr-publish-rate",
        "0",
    ]);
    let pid = relay.child.id();
    let addr = relay.tcp();
    let topic = |i: usize| [(i >> 8) as u8, i as u8];
    let mut clients = Vec::with_capacity(subs);
    for i in 0..subs {
        clients.push(non_reader(addr, &topic(i)).await);
    }
    let before = rss_kib(pid);
    let mut p = Client::tcp(addr).await;
    p.hello().await;
    let mut peak = before;
    for r in 0..rounds {
        for i in 0..subs {
            let frame = codec::encode_prefixed(&pub_frame(envelope_sized(1, &topic(i), BODY)));
            p.send_raw(&frame).await.unwrap();
        }
        if r % 4 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    p.send(&Frame::Ping(Ping { nonce: 1 })).await;
    loop {
        if let Frame::Pong(_) = p.recv().await {
            break;
        }
    }
    peak = peak.max(rss_kib(pid));
    let dropped = metric(
        relay.admin(),
        "whispeer_relay_outbound_budget_dropped_total",
    )
    .await;
    drop(clients);
    (peak.saturating_sub(before), dropped, subs)
}

/// Without the relay-wide budget, non-reading subscribers of distinct topics hold
/// connections × `queue.max_bytes` (plus each stuck writer's batch); with it, RSS stays
/// near the budget and the budget's drops are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_topic_subscribers_keep_rss_within_the_relay_budget() {
    const PER_QUEUE: usize = 2 << 20;
    const BUDGET: usize = 32 << 20;
    let (unbounded, _, subs) = distinct_topics(0, PER_QUEUE).await;
    let (bounded, dropped, _) = distinct_topics(BUDGET, PER_QUEUE).await;
    eprintln!(
        "relay RSS growth with {subs} non-reading subscribers of distinct topics, \
         queue.max_bytes {} KiB: {unbounded} KiB without the relay budget, {bounded} KiB \
         with queue.total_max_bytes {} KiB ({dropped} QoS 0 messages dropped by it)",
        PER_QUEUE >> 10,
        BUDGET >> 10,
    );
    // Budget, plus per-connection buffers and slack.
    let bound_kib = (BUDGET / 1024) as u64 + subs as u64 * 64 + 48 * 1024;
    assert!(
        bounded <= bound_kib,
        "relay RSS grew by {bounded} KiB, more than the {bound_kib} KiB the budget allows"
    );
    assert!(dropped > 0, "the budget dropped (and counted) messages");
    assert!(
        unbounded > bound_kib,
        "without the budget the same load holds more ({unbounded} KiB): the test would \
         not notice a missing budget"
    );
}
