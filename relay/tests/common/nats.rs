//! A real nats-server cluster on loopback for cluster tests: one config file, JetStream
//! store directory and log stream per node, routes between all of them, free ports.
//!
//! Ready is an event, not a delay: every node's log has said "Server is ready" (its client
//! port accepts) and named the JetStream metadata leader (which needs routes to a quorum).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use bytes::Bytes;
use whispeer_protocol::envelope_header::HeaderFields;
use whispeer_protocol::{Envelope, TopicToken};

use super::{key, temp_dir, tok, TIMEOUT};

/// What JetStream says of every consumer of the relays' stream (`WSP`), asked at `url`.
pub async fn stream_consumers(url: &str) -> Vec<async_nats::jetstream::consumer::Info> {
    use futures_util::StreamExt;
    let nc = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nc);
    let stream = js.get_stream("WSP").await.expect("the relays' stream");
    stream
        .consumers()
        .map(|info| info.expect("consumer info"))
        .collect()
        .await
}

/// `nats-server` on PATH, or Debian's location. Without it the cluster tests skip, unless
/// `WHISPEER_REQUIRE_NATS` is set (`.ci/run` sets it, after installing nats-server): there a
/// missing server fails the test instead of letting it pass untested.
pub fn nats_server_bin() -> Option<PathBuf> {
    let found = find_nats_server();
    if found.is_none() && std::env::var_os("WHISPEER_REQUIRE_NATS").is_some() {
        panic!("nats-server not found and WHISPEER_REQUIRE_NATS is set (apt-get install -y nats-server)");
    }
    found
}

fn find_nats_server() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            Command::new("nats-server")
                .arg("--version")
                .output()
                .ok()
                .map(|_| PathBuf::from("nats-server"))
        })
}

/// A free loopback TCP port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One node of the cluster.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    child: Option<Child>,
    log: mpsc::Receiver<String>,
}

impl NatsNode {
    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Sends the node a signal through kill(1) (the test crates have no unsafe code):
    /// `STOP` freezes it — its clients' writes back up, as behind a stalled network —
    /// and `CONT` resumes it.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = std::process::Command::new("kill")
                .args([format!("-{sig}"), c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig} nats-server {}", self.name);
        }
    }

    /// Kills the node (SIGKILL: no lame-duck goodbye to clients or routes).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for a log line containing `needle`; panics on timeout or exit.
    pub fn wait_log(&self, needle: &str, deadline: Instant) -> String {
        self.try_wait_log(needle, deadline)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`wait_log`](Self::wait_log) returning the failure instead of panicking.
    pub fn try_wait_log(&self, needle: &str, deadline: Instant) -> Result<String, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "nats-server {} logged no {needle:?} in time",
                        self.name
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "nats-server {} exited before logging {needle:?}",
                        self.name
                    ))
                }
            }
        }
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `whispeer-relay serve` arguments of relay `name` storing in the cluster's JetStream
/// (`--cluster-store jetstream`, R3) on the NATS servers `urls`.
pub fn jetstream_relay_args(urls: &str, name: &str) -> Vec<String> {
    [
        "--cluster",
        urls,
        "--cluster-name",
        name,
        "--cluster-store",
        "jetstream",
        "--cluster-replicas",
        "3",
        // The stream's byte limit is reserved on every replica's disk up front: the
        // default (8 GiB) made JetStream refuse placement ("insufficient storage") when
        // parallel tests' clusters shared a disk with under ~11 GB free.
        "--total-max-bytes",
        "268435456",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A NATS cluster with JetStream, every node routed to every other.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    pub dir: PathBuf,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each is ready and the cluster has a JetStream
    /// metadata leader. `None` when nats-server is not installed.
    ///
    /// Ports are picked free and released before nats-server binds them, so a parallel test
    /// can take one in between (the node exits): the whole cluster is started again on
    /// fresh ports, up to three times.
    pub fn start(n: usize) -> Option<Self> {
        let bin = nats_server_bin()?;
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(&bin, n) {
                Ok(c) => return Some(c),
                Err(e) => {
                    eprintln!("nats cluster start failed, retrying on fresh ports: {e}");
                    last = e;
                }
            }
        }
        panic!("nats cluster did not start: {last}");
    }

    fn try_start(bin: &std::path::Path, n: usize) -> Result<Self, String> {
        let dir = temp_dir("nats");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.join(format!("js-{name}"));
            let conf = dir.join(format!("{name}.conf"));
            // `max_file_store` set: by default JetStream reserves from the disk's free space
            // at start, and on a machine whose disk a fresh build has nearly filled it
            // refused the relays' streams ("insufficient storage"), so a relay retried its
            // store forever (CI hung there). The tests write a few MiB.
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\n\
                     listen: 127.0.0.1:{port}\n\
                     max_payload: 8MB\n\
                     jetstream {{ store_dir: {store:?}, max_file_store: 8GB }}\n\
                     cluster {{\n  name: wsp\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{routes}]\n}}\n"
                ),
            )
            .expect("write nats config");
            let mut child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn nats-server");
            let stderr = child.stderr.take().expect("piped stderr");
            let (tx, rx) = mpsc::channel();
            let tag = name.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("WHISPEER_TEST_NATS_LOG").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    // Nobody may listen any more; keep draining so the server never blocks.
                    let _ = tx.send(line);
                }
            });
            nodes.push(NatsNode {
                name,
                port: *port,
                cluster_port: *cluster_port,
                child: Some(child),
                log: rx,
            });
        }
        // From here a failure drops `cluster`, which kills the nodes and removes the dir.
        let cluster = Self { nodes, dir };
        let deadline = Instant::now() + TIMEOUT;
        for node in &cluster.nodes {
            node.try_wait_log("Server is ready", deadline)?;
        }
        for node in &cluster.nodes {
            // "JetStream cluster new metadata leader: …", or "Self is new JetStream cluster
            // metadata leader" on the leader itself.
            node.try_wait_log("metadata leader", deadline)?;
        }
        Ok(cluster)
    }

    /// Every node's URL, comma separated (what `--cluster` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node listening on client port `port`.
    pub fn node_on_port(&mut self, port: u16) -> Option<&mut NatsNode> {
        self.nodes.iter_mut().find(|n| n.port == port)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An envelope on `[key(k), tok(levels)…]` told apart by `n` (in its nonce) and `size`.
pub fn numbered_sized(k: u8, levels: &[u8], n: u32, size: usize) -> Envelope {
    let tokens: Vec<TopicToken> = levels.iter().map(|t| tok(*t)).collect();
    let mut nonce = [0u8; 24];
    nonce[..4].copy_from_slice(&n.to_be_bytes());
    let fields = HeaderFields {
        flags: 0,
        key_id: key(k),
        nonce,
        commit: [8; 32],
        tokens: &tokens,
    };
    let mut out = Vec::new();
    fields.write_prefix(48, &mut out);
    out.extend_from_slice(&[0x5a; 48]);
    out.extend((0..size.max(16)).map(|i| i as u8));
    Envelope::from_bytes(Bytes::from(out)).expect("valid envelope")
}
