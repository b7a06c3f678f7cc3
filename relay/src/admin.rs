//! The admin HTTP port (hyper, HTTP/1.1 only): `/metrics` in Prometheus text format,
//! `/status` as JSON, `/healthz`. Also a tiny HTTP GET client for `whispeer-relay status`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Limits, SlowConsumerPolicy};
use crate::metrics::Snapshot;
use crate::relay::{BoundAddrs, Shared};

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
    /// The store: kind, file size, retention, per-path totals.
    #[serde(default)]
    pub store: crate::store::StoreStatus,
}

pub(crate) fn status(shared: &Shared) -> Status {
    let cfg = &shared.config;
    Status {
        relay: concat!("whispeer-relay ", env!("CARGO_PKG_VERSION")).into(),
        uptime_seconds: (shared.metrics.uptime().as_secs_f64() * 1000.0).round() / 1000.0,
        shutting_down: *shared.shutdown.borrow(),
        listeners: shared.addrs,
        sockets: shared.registry.len() as u64,
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
        store: shared.router.store().status(),
    }
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
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            {
                let store = shared.router.store();
                let mut text = shared.metrics.render_prometheus(shared.router.last_seq().0);
                text.push_str(
                    &shared
                        .metrics
                        .render_store_prometheus(store.kind(), &store.metrics()),
                );
                text
            },
        ),
        "/status" => match serde_json::to_vec_pretty(&status(shared)) {
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

/// Serves the admin port until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route(&shared, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
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
    let req = Request::builder()
        .uri(path)
        .header(HOST, authority.as_str())
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
