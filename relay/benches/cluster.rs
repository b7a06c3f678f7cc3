//! Cluster benchmark: the latency the NATS hop adds. Two release relay processes share
//! routing through nats-server (`--cluster`); a paced publisher (default 10,000 msg/s,
//! 1 KiB envelopes) sends to one subscriber on the same relay and, in a second run, to one
//! subscriber on the other relay. Latency is publish → subscriber decoded the frame
//! (the send time travels in the envelope's nonce bytes, which the relay never reads).
//!
//! ```sh
//! cargo bench -p whispeer-relay --bench cluster                   # 10k msg/s, 5 s, 1 NATS node
//! cargo bench -p whispeer-relay --bench cluster -- --rate 20000 --secs 3 --nats-nodes 2
//! ```
//!
//! With `--nats-nodes 2` the relays connect to different NATS servers joined by a route
//! (two NATS hops). nats-server must be installed; no assertion on timing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::frame::{Hello, Pub, Sub, PROTOCOL_VERSION};
use whispeer_protocol::{
    codec, Envelope, Frame, FrameDecoder, KeyId, PatternElem, Qos, TokenPattern, TopicToken,
};
use whispeer_relay::BoundAddrs;

const PAYLOAD: usize = 1024;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` nats-server nodes routed together; returns their client URLs. Ready when each has
/// logged "Server is ready" (and, for several nodes, a route).
fn start_nats(n: usize, dir: &std::path::Path) -> Option<(Vec<Proc>, Vec<String>)> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
        .collect();
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for (i, (p, c)) in ports.iter().enumerate() {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &p.to_string()]);
        if n > 1 {
            cmd.args(["-n", &format!("n{i}"), "--cluster_name", "bench"])
                .args(["--cluster", &format!("nats://127.0.0.1:{c}")])
                .args(["--routes", &routes.join(",")]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let stderr = child.stderr.take()?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let need_route = n > 1;
        let (mut ready, mut routed) = (false, !need_route);
        while !(ready && routed) {
            let line = rx.recv_timeout(Duration::from_secs(30)).ok()?;
            ready |= line.contains("Server is ready");
            routed |= line.contains("Route connection created");
        }
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        procs.push(Proc(child));
        urls.push(format!("nats://127.0.0.1:{p}"));
    }
    let _ = dir;
    Some((procs, urls))
}

fn start_relay(dir: &std::path::Path, name: &str, nats: &str) -> (Proc, BoundAddrs) {
    start_relay_with(dir, name, &["--store", "none", "--cluster", nats])
}

fn start_relay_with(dir: &std::path::Path, name: &str, extra: &[&str]) -> (Proc, BoundAddrs) {
    let ready = dir.join(format!("{name}.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_whispeer-relay"))
        .args(["serve", "--tcp", "127.0.0.1:0", "--ws", "off"])
        .args(["--admin", "127.0.0.1:0"])
        .args(["--publish-rate", "0", "--addr-publish-rate", "0"])
        .args(["--cluster-name", name])
        .args(extra)
        .arg("--ready-file")
        .arg(&ready)
        .env("WHISPEER_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn relay");
    let mut p = Proc(child);
    let start = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(&ready) {
            return (p, serde_json::from_slice(&b).unwrap());
        }
        assert!(p.0.try_wait().unwrap().is_none(), "relay exited");
        assert!(start.elapsed() < Duration::from_secs(30), "relay not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A 1 KiB envelope on `[key 1, tok 1]` whose nonce carries `t` (ns) and `n`.
fn envelope(t: u64, n: u64) -> Envelope {
    let tokens = [TopicToken::from_bytes([1; 16])];
    let mut nonce = [0u8; 24];
    nonce[..8].copy_from_slice(&t.to_be_bytes());
    nonce[8..16].copy_from_slice(&n.to_be_bytes());
    let fields = HeaderFields {
        flags: 0,
        key_id: KeyId::from_bytes([1; 16]),
        nonce,
        commit: [8; 32],
        tokens: &tokens,
    };
    let mut out = Vec::with_capacity(PAYLOAD + 200);
    fields.write_prefix(48, &mut out);
    out.extend_from_slice(&[0x5a; 48]);
    out.resize(PAYLOAD, 0xa5);
    Envelope::from_bytes(Bytes::from(out)).unwrap()
}

async fn connect(addr: SocketAddr) -> (TcpStream, FrameDecoder) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let hello = Frame::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        features: 0,
        client: Some("cluster-bench".into()),
        auth: None,
        account: None,
    });
    s.write_all(&codec::encode_prefixed(&hello)).await.unwrap();
    let mut dec = FrameDecoder::new(1 << 20);
    next(&mut s, &mut dec).await; // Welcome
    (s, dec)
}

async fn next(s: &mut TcpStream, dec: &mut FrameDecoder) -> Frame {
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            return Frame::decode(&f).unwrap();
        }
        dec.reserve_read(64 * 1024);
        assert!(
            s.read_buf(dec.buffer_mut()).await.unwrap() > 0,
            "relay closed"
        );
    }
}

/// Latencies (µs) of `n` messages at `rate`/s from a publisher at `pub_addr` to a
/// subscriber at `sub_addr`.
async fn run(pub_addr: SocketAddr, sub_addr: SocketAddr, rate: f64, n: u64) -> (Vec<f64>, u64) {
    let (mut sub, mut sdec) = connect(sub_addr).await;
    let pattern = TokenPattern::new(
        KeyId::from_bytes([1; 16]),
        vec![PatternElem::Token(TopicToken::from_bytes([1; 16]))],
    )
    .unwrap();
    let s = Frame::Sub(Sub::live(1, pattern));
    sub.write_all(&codec::encode_prefixed(&s)).await.unwrap();
    next(&mut sub, &mut sdec).await; // SubOk
    let (mut publ, _pdec) = connect(pub_addr).await;
    let epoch = Instant::now();
    let frame = |e: Envelope| {
        codec::encode_prefixed(&Frame::Pub(Pub {
            envelope: e,
            flags: 0,
            publish_id: None,
            qos: Qos::AtMostOnce,
        }))
    };
    // Warm-up: until a probe arrives (NATS interest has propagated), paced.
    let mut probe_at = Instant::now() - Duration::from_secs(1);
    loop {
        if probe_at.elapsed() > Duration::from_millis(20) {
            publ.write_all(&frame(envelope(0, u64::MAX))).await.unwrap();
            probe_at = Instant::now();
        }
        if let Ok(f) =
            tokio::time::timeout(Duration::from_millis(20), next(&mut sub, &mut sdec)).await
        {
            if matches!(f, Frame::Msg(_)) {
                break;
            }
        }
    }
    let reader = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n as usize);
        let mut got = 0u64;
        let deadline = Duration::from_secs(5);
        while got < n {
            match tokio::time::timeout(deadline, next(&mut sub, &mut sdec)).await {
                Ok(Frame::Msg(m)) => {
                    let nonce = m.envelope.nonce();
                    let seq = u64::from_be_bytes(nonce[8..16].try_into().unwrap());
                    if seq == u64::MAX {
                        continue; // a late probe
                    }
                    let t = u64::from_be_bytes(nonce[..8].try_into().unwrap());
                    let now = epoch.elapsed().as_nanos() as u64;
                    lat.push((now.saturating_sub(t)) as f64 / 1000.0);
                    got += 1;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (lat, got)
    });
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let t = epoch.elapsed().as_nanos() as u64;
        publ.write_all(&frame(envelope(t, i))).await.unwrap();
    }
    let (mut lat, got) = reader.await.unwrap();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (lat, got)
}

/// QoS 1 publish → `PubAck` latencies (µs) of `n` publishes, one in flight at a time.
async fn run_acked(addr: SocketAddr, n: u64) -> Vec<f64> {
    let (mut publ, mut dec) = connect(addr).await;
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        let f = codec::encode_prefixed(&Frame::Pub(Pub {
            envelope: envelope(0, i),
            flags: whispeer_protocol::frame::pub_flags::ACK,
            publish_id: Some(id),
            qos: Qos::AtLeastOnce,
        }));
        let t = Instant::now();
        publ.write_all(&f).await.unwrap();
        loop {
            match next(&mut publ, &mut dec).await {
                Frame::PubAck(_) => break,
                Frame::Err(e) => panic!("publish refused: {e:?}"),
                _ => {}
            }
        }
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat
}

/// `--acked N`: QoS 1 publish → `PubAck` with the JetStream store (one nats-server with
/// JetStream, file storage, R1) against a relay with its SQLite file store, same run.
fn acked_bench(n: u64, dir: &std::path::Path) {
    let port = free_port();
    let store = dir.join("js");
    let Ok(child) = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("nats-server not found (apt-get install -y nats-server)");
        return;
    };
    let mut nats = Proc(child);
    let stderr = nats.0.stderr.take().unwrap();
    {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok);
        assert!(
            lines.any(|l| l.contains("Server is ready")),
            "nats-server not ready"
        );
        std::thread::spawn(move || lines.for_each(drop));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let db = dir.join("relay.db");
    let (_js, js) = start_relay_with(
        dir,
        "relay-js",
        &["--cluster", &url, "--cluster-store", "jetstream"],
    );
    let (_sq, sq) = start_relay_with(
        dir,
        "relay-sqlite",
        &["--store", "sqlite", "--store-path", db.to_str().unwrap()],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("acked bench: {n} QoS 1 publishes × {PAYLOAD} B, one in flight, release relays");
    println!("| store | p50 µs | p90 µs | p99 µs | max µs |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, addr) in [
        ("SQLite file (sync full)", sq.tcp.unwrap()),
        ("JetStream (1 node, file, R1)", js.tcp.unwrap()),
    ] {
        let lat = rt.block_on(run_acked(addr, n));
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} |",
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
    drop(nats);
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: f64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rate = arg("--rate", 10_000.0);
    let secs = arg("--secs", 5.0);
    let nodes = arg("--nats-nodes", 1.0) as usize;
    let n = (rate * secs) as u64;
    let dir: PathBuf =
        std::env::temp_dir().join(format!("whispeer-cluster-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let acked = arg("--acked", 0.0) as u64;
    if acked > 0 {
        acked_bench(acked, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let Some((_nats, urls)) = start_nats(nodes.max(1), &dir) else {
        eprintln!("nats-server not found or not ready (apt-get install -y nats-server)");
        return;
    };
    let (_a, a) = start_relay(&dir, "relay-a", &urls[0]);
    let (_b, b) = start_relay(&dir, "relay-b", urls.last().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "cluster bench: {n} × {PAYLOAD} B at {rate} msg/s, 1 → 1, {} NATS node(s), release relays, store none",
        nodes.max(1)
    );
    println!("| path | delivered | p50 µs | p90 µs | p99 µs | max µs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, p, s) in [
        ("same relay (A → A)", a.tcp.unwrap(), a.tcp.unwrap()),
        ("across NATS (A → B)", a.tcp.unwrap(), b.tcp.unwrap()),
    ] {
        let (lat, got) = rt.block_on(run(p, s, rate, n));
        println!(
            "| {label} | {got}/{n} | {:.0} | {:.0} | {:.0} | {:.0} |",
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
