//! The admin HTTP port (hyper, HTTP/1.1 only): `/metrics` in Prometheus text format,
//! `/status` as JSON, `/healthz`. Also a tiny HTTP GET client for `whispeer-relay status`.
//!
//! The port leaks nothing about tenants: without the admin token (`Authorization: Bearer
//! …`, `auth.admin_token`) `/status` shows counts only, never key ids or token paths. Bound
//! off loopback, every endpoint but `/healthz` needs the token (and the relay refuses to
//! start without one).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Limits, SlowConsumerPolicy};
use crate::metrics::Snapshot;
use crate::relay::{BoundAddrs, Shared};
use crate::transport::frame_budget::FrameBudget;

/// The `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Software name and version.
    pub relay: String,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// True while draining after a shutdown signal.
    pub shutting_down: bool,
    /// Listening addresses.
    pub listeners: BoundAddrs,
    /// Open sockets, including ones still before `Hello`.
    pub sockets: u64,
    /// Source addresses banned now for connection churn (`limits.addr_churn_ban_secs`): a
    /// count, never the addresses.
    #[serde(default)]
    pub banned_addresses: u64,
    /// Traffic totals.
    pub traffic: Snapshot,
    /// Last relay sequence assigned.
    pub last_seq: u64,
    /// Slow-consumer policy.
    pub slow_consumer: SlowConsumerPolicy,
    /// Outbound queue capacity per connection.
    pub queue_capacity: usize,
    /// Configured limits.
    pub limits: Limits,
    /// Plugin chain, in order.
    pub plugins: Vec<String>,
    /// The store: kind, file size, retention, per-path totals (the per-path list only
    /// with the admin token: it names key ids).
    #[serde(default)]
    pub store: crate::store::StoreStatus,
    /// Relay accounts: counts only.
    #[serde(default)]
    pub accounts: AccountsStatus,
    /// Whether per-tenant detail (key ids) is included (admin token given).
    #[serde(default)]
    pub detail: bool,
    /// The NATS bridge, in a cluster: connected or not, server counts, traffic totals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterStatus>,
}

/// Relay account counts in `/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountsStatus {
    /// `off` or `required`.
    pub auth: String,
    /// Accounts in the account file.
    pub accounts: usize,
    /// Connections authenticated with an account.
    pub authenticated_connections: usize,
    /// Key ids claimed by groups.
    pub claimed_key_ids: usize,
    /// Durable subscriptions with an owner.
    pub durable_owners: usize,
}

/// The full `/status` (per-path detail included).
pub(crate) fn status(shared: &Shared) -> Status {
    status_with(shared, true)
}

/// `/status` with per-path detail (key ids: the admin token's) or counts only. Without
/// detail the store answers from its totals: an anonymous caller never makes the relay walk
/// every stored path under the store's locks (any local user can reach a loopback port).
fn status_with(shared: &Shared, detail: bool) -> Status {
    let cfg = &shared.config;
    Status {
        relay: concat!("whispeer-relay ", env!("CARGO_PKG_VERSION")).into(),
        uptime_seconds: (shared.metrics.uptime().as_secs_f64() * 1000.0).round() / 1000.0,
        shutting_down: *shared.shutdown.borrow(),
        listeners: shared.addrs,
        sockets: shared.registry.len() as u64,
        banned_addresses: shared.addr_table.bans().active() as u64,
        traffic: shared.metrics.snapshot(),
        last_seq: shared.router.last_seq().0,
        slow_consumer: cfg.queue.slow_consumer,
        queue_capacity: cfg.queue.capacity,
        limits: cfg.limits.clone(),
        plugins: shared
            .plugins
            .names()
            .into_iter()
            .map(String::from)
            .collect(),
        store: if detail {
            shared.router.store().status()
        } else {
            shared.router.store().status_counts()
        },
        accounts: {
            let a = &shared.accounts;
            let (claimed_key_ids, durable_owners) = a.state_counts();
            AccountsStatus {
                auth: cfg.auth.mode.to_string(),
                accounts: a.count(),
                authenticated_connections: a.live_count(),
                claimed_key_ids,
                durable_owners,
            }
        },
        detail,
        cluster: shared.cluster.as_ref().map(|c| c.status(&shared.metrics)),
    }
}

/// Whether the request carries the configured admin token.
fn has_token(shared: &Shared, req: &Request<Incoming>) -> bool {
    use sha2::{Digest, Sha256};
    let Some(want) = &shared.config.auth.admin_token else {
        return false;
    };
    let Some(got) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare digests: equal length, no early exit on the secret's bytes.
    // Both trimmed: a token configured from an env file or `$(cat file)` may keep its
    // trailing newline, and it would never have matched.
    let (a, b) = (
        Sha256::digest(want.trim().as_bytes()),
        Sha256::digest(got.trim().as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n",
        );
    }
    let authorized = has_token(shared, req);
    let public = shared.addrs.admin.is_some_and(|a| !a.ip().is_loopback());
    if public && !authorized && req.uri().path() != "/healthz" {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .header("www-authenticate", "Bearer")
            .body(Full::new(Bytes::from_static(
                b"admin token required (Authorization: Bearer ...)\n",
            )))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            {
                let store = shared.router.store();
                if let Some(c) = &shared.cluster {
                    c.refresh_connected(&shared.metrics);
                }
                let mut text = shared.metrics.render_prometheus(shared.router.last_seq().0);
                text.push_str(
                    &shared
                        .metrics
                        .render_store_prometheus(store.kind(), &store.metrics()),
                );
                text.push_str(&shared.budget.render_prometheus());
                text.push_str(&FrameBudget::render_prometheus(
                    shared.frame_budget.as_deref(),
                ));
                text.push_str(&shared.quic_windows.render_prometheus());
                text.push_str(&shared.quic_receive_windows.render_prometheus());
                text.push_str(&shared.accounts.render_prometheus());
                text
            },
        ),
        "/status" => match serde_json::to_vec_pretty(&status_with(shared, authorized)) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(_) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "status unavailable\n",
            ),
        },
        "/healthz" if *shared.shutdown.borrow() => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "shutting down\n",
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics, /status or /healthz\n",
        ),
    }
}

/// Admin connections open at once. A new one past it closes the oldest connection of the
/// source address holding the most: an idle or trickling connection cannot hold a place
/// against a health check (whose request takes milliseconds), and 64 of them cannot starve
/// the port (they did when the port stopped accepting at the cap: probes timed out and an
/// orchestrator could restart the relay in a loop). Nor can a connect flood from one
/// address close a probe from another: evicting the oldest of all, a flood of 64 new
/// connections within a probe's round trip closed the probe. A source address is the
/// connection's IP address with IPv6 cut to `limits.addr_ipv6_prefix`, as every
/// per-address limit counts it ([`source_address`](crate::store::source_address)): keyed
/// by the full /128, a flood from one /64 held one connection per address, as many as the
/// probe's, and the tie closed the oldest of all. Each connection serves one request (no
/// keep-alive), must send its headers within [`ADMIN_HEADER_TIMEOUT`] and lives at most
/// [`ADMIN_CONNECTION_LIFETIME`].
pub(crate) const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Longest an admin connection may take to send its request headers.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest an admin connection is kept, request and answer included.
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves the admin port until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_capped(listener, shared, ADMIN_MAX_CONNECTIONS).await
}

/// [`serve`] with at most `cap` connections at once.
async fn serve_capped(listener: TcpListener, shared: Arc<Shared>, cap: usize) {
    let mut open = OpenConns::new(shared.addr_table.v6_prefix());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning on a core.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        open.retain(|h: &tokio::task::AbortHandle| !h.is_finished());
        open.make_room(cap, |oldest| oldest.abort());
        let shared = shared.clone();
        let task = tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route(&shared, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, connection).await;
        });
        open.push(peer.ip(), task.abort_handle());
    }
}

/// The admin connections open, oldest first, each with its source address (see
/// [`ADMIN_MAX_CONNECTIONS`]); `H` closes one.
struct OpenConns<H> {
    conns: std::collections::VecDeque<(std::net::IpAddr, H)>,
    /// Leading bits an IPv6 address is counted by (`limits.addr_ipv6_prefix`).
    v6_prefix: u8,
}

impl<H> OpenConns<H> {
    fn new(v6_prefix: u8) -> Self {
        Self {
            conns: std::collections::VecDeque::new(),
            v6_prefix,
        }
    }

    /// Forgets the connections `keep` says are done.
    fn retain(&mut self, keep: impl Fn(&H) -> bool) {
        self.conns.retain(|(_, h)| keep(h));
    }

    /// Records a new connection from `ip`, by its source address.
    fn push(&mut self, ip: std::net::IpAddr, h: H) {
        let source = crate::store::source_address(ip, self.v6_prefix);
        self.conns.push_back((source, h));
    }

    /// Below `cap` connections, closing (`close`) the oldest of the source address holding
    /// the most (the first to reach that count on a tie) until there is room for one more.
    fn make_room(&mut self, cap: usize, mut close: impl FnMut(H)) {
        while self.conns.len() >= cap.max(1) {
            let mut counts: std::collections::HashMap<std::net::IpAddr, usize> =
                std::collections::HashMap::new();
            for (ip, _) in &self.conns {
                *counts.entry(*ip).or_default() += 1;
            }
            let most = counts.values().copied().max().unwrap_or(0);
            let Some(i) = self.conns.iter().position(|(ip, _)| counts[ip] == most) else {
                break;
            };
            if let Some((_, oldest)) = self.conns.remove(i) {
                close(oldest);
            }
        }
    }
}

/// Why an admin HTTP request failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The URL is not `http://HOST:PORT[/…]`.
    #[error("admin URL must look like http://127.0.0.1:7482, got {0:?}")]
    BadUrl(String),
    /// Could not connect or talk HTTP.
    #[error("admin request to {addr} failed: {reason}")]
    Http { addr: String, reason: String },
    /// A non-200 answer.
    #[error("admin endpoint answered {0}")]
    Status(StatusCode),
}

/// `GET path` from an admin port given as `http://host:port` (or `host:port`).
pub async fn http_get(admin: &str, path: &str) -> Result<Bytes, AdminError> {
    http_get_auth(admin, path, None).await
}

/// `GET path` with an optional admin token (`Authorization: Bearer`).
pub async fn http_get_auth(
    admin: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Bytes, AdminError> {
    let authority = admin
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    if authority.is_empty() || authority.contains('/') || authority.starts_with("https://") {
        return Err(AdminError::BadUrl(admin.to_string()));
    }
    let http = |reason: String| AdminError::Http {
        addr: authority.clone(),
        reason,
    };
    let stream = TcpStream::connect(&authority)
        .await
        .map_err(|e| http(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    tokio::spawn(connection);
    let mut req = Request::builder()
        .uri(path)
        .header(HOST, authority.as_str());
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(AdminError::Status(resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?;
    Ok(body.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connect flood from many IPv6 addresses of one /64 counts as one source address
    /// (`limits.addr_ipv6_prefix` 64): its own oldest connections are closed, never a probe
    /// from another network that connected first. Keyed by the full address, each flood
    /// address held one connection like the probe, and the tie closed the oldest of all:
    /// the probe. (Loopback offers one IPv6 address, so the admin port's integration test
    /// floods from 127.0.0.1 and probes from 127.0.0.2; this is the IPv6 keying alone.)
    #[test]
    fn a_flood_from_one_ipv6_prefix_counts_as_one_source_address() {
        const CAP: usize = 64;
        let mut open = OpenConns::new(64);
        let mut closed = Vec::new();
        let probe: std::net::IpAddr = "2001:db8:1::1".parse().unwrap();
        open.push(probe, 0u32);
        for i in 1..=200u32 {
            open.make_room(CAP, |h| closed.push(h));
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, (i >> 16) as u16, i as u16);
            open.push(ip.into(), i);
        }
        assert!(!closed.contains(&0), "the probe was closed");
        assert_eq!(
            closed,
            (1..=200 - 63).collect::<Vec<_>>(),
            "the flood's oldest"
        );
        // The prefix is the relay's setting: at 128 each address counts alone.
        let mut open = OpenConns::new(128);
        let mut closed = Vec::new();
        open.push(probe, 0u32);
        for i in 1..=CAP as u32 {
            open.make_room(CAP, |h| closed.push(h));
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, i as u16);
            open.push(ip.into(), i);
        }
        assert_eq!(closed, vec![0], "all tied at one: the oldest of all");
    }
}
