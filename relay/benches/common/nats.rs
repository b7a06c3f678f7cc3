//! nats-server as the benchmark peer, shared by the load and durable benchmarks.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server on a free loopback port; killed on drop.
pub struct NatsProc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl NatsProc {
    /// Starts `nats-server -a 127.0.0.1 -p PORT EXTRA…` and waits until it accepts
    /// connections; `None` if it is not installed or does not come up.
    pub fn start(extra: &[OsString]) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        // A benchmark harness, not a test: polling the port is how nats-server says "ready".
        while std::net::TcpStream::connect(addr).is_err() {
            if child.try_wait().ok()?.is_some() || start.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self { child, addr })
    }
}

impl Drop for NatsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
