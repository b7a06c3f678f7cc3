//! Hostile WebSocket clients against the real relay binary: what their control frames
//! (pings) may cost the relay.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use common::*;
use tokio::io::AsyncWriteExt;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The relay's RSS at its highest while `f` runs, sampled every 20 ms.
async fn peak_rss_kib<F: std::future::Future>(pid: u32, f: F) -> (u64, F::Output) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut peak = 0;
            while !stop.load(Relaxed) {
                peak = peak.max(rss_kib(pid));
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            peak.max(rss_kib(pid))
        }
    });
    let out = f.await;
    stop.store(true, Relaxed);
    (sampler.await.unwrap(), out)
}

/// A masked client ping with `len` payload bytes.
fn ping(len: u8) -> Vec<u8> {
    [0x89u8, 0x80 | len, 1, 2, 3, 4]
        .into_iter()
        .chain(std::iter::repeat_n(0u8, len.into()))
        .collect()
}

/// A raw WebSocket connection (upgraded) with a 4 KiB receive buffer: what the relay
/// writes to it cannot drain while it does not read.
async fn small_window_ws(relay: &BinRelay) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(relay.ws()).await.unwrap();
    let head = raw_ws_upgrade(&mut s).await.expect("upgrade answered");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

const FLOODS: usize = 150;

/// Review finding (session 44): tungstenite queues a pong for every ping, and when the
/// socket refuses the write it puts the pong back and reads on, until its write buffer
/// reaches its bound (~1.2 MiB, a 2 MiB allocation) — on every connection, before Hello,
/// for its Hello deadline and drain: ~300 MiB from one address at 256 connections. 150
/// connections from one address each send up to 1.3 MB of 125-byte pings before Hello and
/// never read: each is closed well before its (60 s) Hello deadline, as `malformed` (for
/// its pings), and the relay's RSS grows by less than 16 MiB (the debug relay grew 29 MiB
/// within 30 s without the count, reading the pings slower than they came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_before_hello_that_never_read_are_closed_within_bounded_memory() {
    rlimit::increase_nofile_limit(4 * FLOODS as u64 + 256).expect("raise the fd limit");
    let relay = BinRelay::start(&[
        "--store",
        "none",
        "--max-connections-per-addr",
        "4096",
        "--max-connections-per-network",
        "0",
        "--addr-connect-rate",
        "0",
        "--hello-ms",
        "60000",
    ]);
    let pid = relay.child.id();
    let flood: Arc<Vec<u8>> = Arc::new(ping(125).repeat(1_000));
    let mut socks = Vec::with_capacity(FLOODS);
    for _ in 0..FLOODS {
        socks.push(small_window_ws(&relay).await);
    }
    let before = rss_kib(pid);
    let (peak, ends) = peak_rss_kib(pid, async {
        let tasks: Vec<_> = socks
            .into_iter()
            .map(|mut s| {
                let flood = flood.clone();
                tokio::spawn(async move {
                    // Never reading: 131 KB of pings a write, until a write fails (the
                    // relay closed: a reset for the bytes it left unread) or 1.3 MB of
                    // them passed or the timeout.
                    let closed = tokio::time::timeout(TIMEOUT, async {
                        for _ in 0..10 {
                            if s.write_all(&flood).await.is_err() {
                                return true;
                            }
                        }
                        // All taken: the relay closes still (the writes fail then).
                        loop {
                            if s.write_all(&ping(0)).await.is_err() {
                                return true;
                            }
                            tokio::task::yield_now().await;
                        }
                    })
                    .await
                    .is_ok();
                    (closed, s)
                })
            })
            .collect();
        let mut ends = Vec::new();
        for t in tasks {
            ends.push(t.await.unwrap());
        }
        ends
    })
    .await;
    let closed = ends.iter().filter(|(c, _)| *c).count();
    let grown = peak.saturating_sub(before);
    let malformed = metric(
        relay.admin(),
        "whispeer_relay_errors_total{kind=\"malformed\"}",
    )
    .await;
    eprintln!(
        "{FLOODS} ping floods before Hello: {closed} closed, {malformed} malformed; relay RSS \
         {before} KiB, peak +{grown} KiB"
    );
    assert_eq!(
        closed, FLOODS,
        "every flood closed before its Hello deadline"
    );
    assert_eq!(malformed, FLOODS as u64, "every flood closed for its pings");
    assert!(grown < 16 * 1024, "relay RSS grew {grown} KiB");
    drop(ends);
}
