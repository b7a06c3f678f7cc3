//! The admin HTTP port (hyper, HTTP/1.1 only): `/metrics` in Prometheus text format,
//! `/status` as JSON, `/healthz`. Also a tiny HTTP GET client for `whispeer-relay status`.
//!
//! The port leaks nothing about tenants: without the admin token (`Authorization: Bearer
//! …`, `auth.admin_token`) `/status` shows counts only, never key ids or token paths. Bound
//! off loopback, every endpoint but `/healthz` needs the token (and the relay refuses to
//! start without one). Without the token a request must name the port as `localhost` or an
//! IP address in `Host` (DNS rebinding; see [`local_host`]), `/healthz` excepted.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Whether the request names the admin port as `localhost` or an IP address (any port),
/// in its `Host` header and in an absolute URI. A web page the operator visits can make
/// its own name resolve to 127.0.0.1 (DNS rebinding) and read what the port answers
/// without the token; the browser then sends that name as `Host`. An IP address cannot be
/// rebound, and `localhost` is resolved by the browser itself. A request without `Host`
/// (HTTP/1.0 by hand) is no browser's.
fn local_host(req: &Request<Incoming>) -> bool {
    let named = req
        .headers()
        .get_all(HOST)
        .iter()
        .all(|h| h.to_str().is_ok_and(is_local_authority));
    named
        && req
            .uri()
            .authority()
            .is_none_or(|a| is_local_authority(a.as_str()))
}

/// `HOST[:PORT]` with HOST `localhost` or an IP address (IPv6 in brackets).
fn is_local_authority(authority: &str) -> bool {
    let host = match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::Ipv4Addr>().is_ok()
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
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
    if !authorized && req.uri().path() != "/healthz" && !local_host(req) {
        return respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "Host must be localhost or an IP address without the admin token (DNS rebinding)\n",
        );
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

/// Admin sockets open at once: [`ADMIN_PLACES`] connections with a place, and up to
/// [`ADMIN_PARKED`] newcomers that have sent nothing yet, parked while every place is
/// taken. A newcomer past the places closes one of them, chosen so that a flood of
/// connections cannot close a health check, even one from the flood's own source address
/// (on a loopback port every local user shares 127.0.0.1 with the probe):
///
/// 1. a connection whose request head has not arrived [`ADMIN_SILENT_GRACE`] after its
///    accept — silent ones before trickling ones, oldest first;
/// 2. one served more than [`ADMIN_SERVED_GRACE`] ago and still open (its client does not
///    read the answer);
/// 3. a younger connection whose head has not arrived, oldest first, but not one accepted
///    within [`ADMIN_NEWBORN`] that has sent nothing yet (a probe's head may be
///    microseconds behind its connect);
/// 4. of the connections being served and those newborn ones, the one that has had the
///    longest — the earliest served (or accepted, for a head waiting unread) or accepted.
///
/// That is for a newcomer whose request head has arrived (complete in its socket's receive
/// buffer): it always gets a place. A newcomer that has sent nothing closes only what
/// step 2 and trickling ones of step 1 name — never a connection that has sent nothing
/// either, however old (under a flood, a probe accepted before its `GET` arrived), nor one
/// whose head has arrived. Otherwise it is parked: a socket and a small task waiting for
/// its head without a place (no HTTP state); when the head arrives it takes a place as a
/// newcomer with its head does, and when it has not arrived [`ADMIN_HEADER_TIMEOUT`] after
/// the accept the socket is closed. A newcomer past the parked cap closes the parked one
/// that has waited longest (after giving a place to any whose head has come meanwhile).
///
/// A connection whose head has arrived — read by its task (the blank line ending it),
/// or complete in its socket's receive buffer while the task has not run yet — is never
/// closed for a newcomer that has sent nothing (it is answered within milliseconds; its
/// answer never waits on another connection). A health check sends its head right after
/// its connect, so a flood of connections that send nothing, or a head byte at a time,
/// only ever closes its own connections; a flood of whole requests is served and closed as
/// fast as it comes. A probe accepted before its head arrived waits for it among the
/// parked ones, and is closed only once [`ADMIN_PARKED`] newer connections without a head
/// were parked before its head came (10 ms at 20,000 silent connects a second). Before,
/// a newcomer without its head closed the oldest young connection without one: a probe
/// whose head was 64 newer connections late (3 ms at that rate; 1 in 200 probes under the
/// full test suite's load) was closed unanswered, and one without its head at accept was
/// refused while every place was being served (test
/// `admin::a_probe_whose_head_is_late_is_not_closed_by_newer_silent_connections`).
///
/// Before that, the port closed the oldest connection of the source address holding the
/// most: a flood from 127.0.0.1 closed probes from 127.0.0.1 before their task had read
/// them (tests
/// `admin::a_connect_flood_from_the_probes_own_address_does_not_fail_health_checks`,
/// `admin::a_connect_flood_from_64_loopback_addresses_does_not_fail_health_checks`), and
/// when the port stopped accepting at the cap, 64 silent connections made probes time
/// out. Each connection serves one request (no keep-alive), must send its headers within
/// [`ADMIN_HEADER_TIMEOUT`] and lives at most [`ADMIN_CONNECTION_LIFETIME`]; one served
/// over [`ADMIN_SERVED_GRACE`] ago whose client does not read its answer may be closed for
/// any newcomer, so slow readers never hold the places for that lifetime.
///
/// Public (hidden) for the binary's open-file estimate only.
#[doc(hidden)]
pub const ADMIN_MAX_CONNECTIONS: usize = ADMIN_PLACES + ADMIN_PARKED;

/// Admin connections with a place (a task serving them) at once.
const ADMIN_PLACES: usize = 64;

/// Newcomers that have sent nothing parked at once while every place is taken, waiting
/// for their head (a socket and a small task each, no HTTP state).
const ADMIN_PARKED: usize = 192;

/// Longest an admin connection may take to send its request headers.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest an admin connection is kept, request and answer included.
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// A connection whose request head has not arrived this long after its accept is the
/// first to close for a newcomer (an honest client sends its head with its connect).
const ADMIN_SILENT_GRACE: Duration = Duration::from_millis(250);

/// A connection accepted this recently that has sent nothing may have its head on the way:
/// a newcomer whose head has arrived closes it only after the connections being served
/// since before its accept (see [`ADMIN_MAX_CONNECTIONS`], 4).
const ADMIN_NEWBORN: Duration = Duration::from_millis(50);

/// A connection served this long ago and still open (its client does not read the
/// answer) may be closed for a newcomer, after the silent ones.
const ADMIN_SERVED_GRACE: Duration = Duration::from_secs(1);

/// Serves the admin port until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_capped(listener, shared, ADMIN_PLACES, ADMIN_PARKED).await
}

/// The admin port's connections, shared by the accept loop and the tasks of parked ones.
#[derive(Default)]
struct Port {
    /// Connections holding a place (at most `places`).
    open: Vec<LiveConn>,
    /// Headless newcomers waiting for their head (at most `parked`), oldest first.
    parked: std::collections::VecDeque<(u64, LiveConn)>,
    /// Parked ones given a place by the accept loop, their task not told yet.
    promoted: Vec<u64>,
    next_id: u64,
}

type SharedPort = Arc<std::sync::Mutex<Port>>;

fn lock(port: &SharedPort) -> std::sync::MutexGuard<'_, Port> {
    port.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`serve`] with at most `places` connections served at once and `parked` more waiting
/// for their request head.
async fn serve_capped(listener: TcpListener, shared: Arc<Shared>, places: usize, parked: usize) {
    let port = SharedPort::default();
    // Failing accepts logged at most once every 10 s, as the client listeners' are.
    let mut failures = crate::logging::AcceptFailures::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures.accepted(&"admin");
                Arc::new(stream)
            }
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning on a core.
                failures.failed(&"admin", &e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted = Instant::now();
        let mut guard = lock(&port);
        let p = &mut *guard;
        let id = p.next_id;
        p.next_id += 1;
        p.open.retain(|c| !c.task.is_finished());
        p.parked.retain(|(_, c)| !c.task.is_finished());
        let place = p.open.len() < places.max(1) || {
            let head = head_waiting(&stream);
            make_room(&mut p.open, places, head, accepted) || head
        };
        if place {
            let conn = spawn_conn(&port, &shared, stream, accepted, id, None);
            p.open.push(conn);
            continue;
        }
        // Headless, and no place to take without closing one younger than its grace (its
        // head may be on its way): it waits for its head without a place, beside at most
        // `parked` others — the one that has waited longest closed for it.
        if parked == 0 {
            continue;
        }
        while p.parked.len() >= parked {
            let Some((old, oldest)) = p.parked.pop_front() else {
                break;
            };
            if oldest.stream.upgrade().is_some_and(|s| head_waiting(&s)) {
                // Its head came and its task has not run yet: it takes a place (its task
                // serves it when it runs).
                make_room(&mut p.open, places, true, accepted);
                p.promoted.push(old);
                p.open.push(oldest);
            } else {
                oldest.task.abort();
            }
        }
        p.promoted.retain(|id| p.open.iter().any(|c| c.id == *id));
        let conn = spawn_conn(&port, &shared, stream, accepted, id, Some(places));
        p.parked.push_back((id, conn));
    }
}

/// The task of an admin connection (`id`): for a parked one (`park`: the places),
/// first the wait for its head (until [`ADMIN_HEADER_TIMEOUT`] after its accept), which
/// then takes a place as a newcomer with its head does; then one request served.
fn spawn_conn(
    port: &SharedPort,
    shared: &Arc<Shared>,
    stream: Arc<TcpStream>,
    accepted: Instant,
    id: u64,
    park: Option<usize>,
) -> LiveConn {
    let progress = Arc::new(Progress::default());
    let conn_stream = Arc::downgrade(&stream);
    let io = AdminIo {
        stream,
        progress: progress.clone(),
        accepted,
        tail: 0,
    };
    let (port, shared, served) = (port.clone(), shared.clone(), progress.clone());
    let task = tokio::spawn(async move {
        if let Some(places) = park {
            let deadline = tokio::time::Instant::from_std(accepted + ADMIN_HEADER_TIMEOUT);
            let head = tokio::time::timeout_at(deadline, head_arrives(&io.stream)).await;
            let mut p = lock(&port);
            if let Some(at) = p.promoted.iter().position(|i| *i == id) {
                // Given a place by the accept loop already.
                p.promoted.swap_remove(at);
            } else if !matches!(head, Ok(true)) {
                // No head in time, or closed by its client: closed, no longer parked.
                p.parked.retain(|(i, _)| *i != id);
                return;
            } else {
                // Closed meanwhile for a newer one: gone (this task is aborted).
                let Some(at) = p.parked.iter().position(|(i, _)| *i == id) else {
                    return;
                };
                let Some((_, conn)) = p.parked.remove(at) else {
                    return;
                };
                p.open.retain(|c| !c.task.is_finished());
                // With its head it always gets a place.
                make_room(&mut p.open, places, true, Instant::now());
                p.open.push(conn);
            }
        }
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            served.mark_served(accepted);
            let resp = route(&shared, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(ADMIN_HEADER_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(io), svc);
        let _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, connection).await;
    });
    LiveConn {
        id,
        accepted,
        progress,
        stream: conn_stream,
        task: task.abort_handle(),
    }
}

/// Waits until a whole request head is in the socket's receive buffer (peeked, not taken):
/// true; false when the client closed (or the socket failed) first.
async fn head_arrives(stream: &TcpStream) -> bool {
    use rustix::net::{recv, RecvFlags};
    loop {
        if stream.readable().await.is_err() {
            return false;
        }
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = [0u8; 2048];
            match recv(stream, &mut buf[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
                Ok((0, _)) => Ok(false),
                Ok((n, _)) if is_whole_head(&buf[..n]) => Ok(true),
                // Part of a head: wait for more (the readiness cleared).
                Ok(_) => Err(std::io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e.into()),
            }
        });
        match peeked {
            Ok(head) => return head,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        }
    }
}

/// Below `places` open connections, closing the one [`victim`] names, so that a newcomer
/// (its head arrived: `head`) fits at `now`; false when the newcomer is the one to refuse.
fn make_room(open: &mut Vec<LiveConn>, places: usize, head: bool, now: Instant) -> bool {
    while open.len() >= places.max(1) {
        let seen: Vec<Seen> = open.iter().map(LiveConn::seen).collect();
        let i = victim(&seen, head, now, |i| {
            open[i].stream.upgrade().is_some_and(|s| head_waiting(&s))
        });
        if i >= open.len() {
            return false;
        }
        open.swap_remove(i).task.abort();
    }
    true
}

/// An open admin connection, as the accept loop keeps it.
struct LiveConn {
    id: u64,
    accepted: Instant,
    progress: Arc<Progress>,
    /// The socket, to look into its receive buffer; the task holds it.
    stream: std::sync::Weak<TcpStream>,
    task: tokio::task::AbortHandle,
}

impl LiveConn {
    fn seen(&self) -> Seen {
        let served = self.progress.served.load(Ordering::Relaxed);
        Seen {
            accepted: self.accepted,
            served: (served > 0).then(|| self.accepted + Duration::from_micros(served - 1)),
            got_bytes: self.progress.got_bytes.load(Ordering::Relaxed),
        }
    }
}

/// What a connection's task has seen.
#[derive(Debug, Default)]
struct Progress {
    /// Microseconds after the accept when the request head had arrived, plus one; 0 not yet.
    served: AtomicU64,
    /// Whether any byte was read.
    got_bytes: AtomicBool,
}

impl Progress {
    fn mark_served(&self, accepted: Instant) {
        let us = u64::try_from(accepted.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        let _ = self
            .served
            .compare_exchange(0, us + 1, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// One open connection, for [`victim`].
#[derive(Debug, Clone, Copy)]
struct Seen {
    accepted: Instant,
    /// When its request head had arrived (its task read it).
    served: Option<Instant>,
    /// Whether its task read any byte.
    got_bytes: bool,
}

/// Which connection to close for a newcomer (see [`ADMIN_MAX_CONNECTIONS`]): an index
/// into `open`, or `open.len()` for none (a newcomer without its head is parked). `newcomer_head`: the newcomer's
/// request head waits in its socket; `waiting(i)`: connection `i`'s does (its task has not
/// read it yet), asked only of connections that would otherwise be closed.
fn victim(
    open: &[Seen],
    newcomer_head: bool,
    now: Instant,
    mut waiting: impl FnMut(usize) -> bool,
) -> usize {
    // 0: silent past the grace; 1: trickling past it, or served long ago and still open;
    // 2: younger, head not read; 3: served lately. A newcomer without its head closes
    // rank 1 only (else it is parked).
    let rank = |c: &Seen| match c.served {
        Some(t) if now.saturating_duration_since(t) >= ADMIN_SERVED_GRACE => 1,
        Some(_) => 3,
        None if now.saturating_duration_since(c.accepted) < ADMIN_SILENT_GRACE => 2,
        None if c.got_bytes => 1,
        None => 0,
    };
    // Accepted within ADMIN_NEWBORN, nothing sent: its head may be on its way.
    let newborn = |c: &Seen| {
        c.served.is_none()
            && !c.got_bytes
            && now.saturating_duration_since(c.accepted) < ADMIN_NEWBORN
    };
    let mut order: Vec<usize> = (0..open.len()).collect();
    order.sort_by_key(|&i| (rank(&open[i]), open[i].accepted));
    // For a newcomer with its head: the connections being served, and the newborn ones,
    // each with the time since which it has had its chance (served, or accepted).
    let mut last = Vec::new();
    for &i in &order {
        let c = &open[i];
        if !newcomer_head && rank(c) != 1 {
            // One that has sent nothing is never closed for a newcomer that has sent
            // nothing either (under a flood, a probe whose head is a few milliseconds
            // behind its accept): the newcomer is parked instead. Only trickling ones past
            // their grace and ones served long ago go.
            continue;
        }
        if rank(c) == 3 || waiting(i) {
            last.push((c.served.unwrap_or(c.accepted), i));
        } else if newborn(c) {
            last.push((c.accepted, i));
        } else {
            return i;
        }
    }
    if !newcomer_head {
        return open.len();
    }
    // The newcomer, which has its head, takes the place of the one that has had the
    // longest: a probe accepted a moment ago, its head on the way, is not closed while a
    // connection served before its accept is open.
    last.into_iter().min().map_or(open.len(), |(_, i)| i)
}

/// Whether a whole request head waits in the socket's receive buffer, not read yet (its
/// task has not run): up to 2 KiB looked at by one `recv(MSG_PEEK | MSG_DONTWAIT)` on the
/// borrowed descriptor (nothing taken, tokio's readiness untouched, no descriptor
/// duplicated — a `dup` failed with `EMFILE` under the fd pressure a flood brings, and the
/// check said no). (rustix, as `#![forbid(unsafe_code)]` rules out socket2's `peek` into
/// uninitialized bytes.)
fn head_waiting(stream: &TcpStream) -> bool {
    use rustix::net::{recv, RecvFlags};
    let mut buf = [0u8; 2048];
    match recv(stream, &mut buf[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((n, _)) => is_whole_head(&buf[..n]),
        Err(_) => false,
    }
}

/// Bytes that start a request line and hold the blank line ending its head.
fn is_whole_head(b: &[u8]) -> bool {
    b.first().is_some_and(u8::is_ascii_alphabetic)
        && (b.windows(4).any(|w| w == b"\r\n\r\n") || b.windows(2).any(|w| w == b"\n\n"))
}

/// The admin connection's socket, shared with the accept loop (which looks into its
/// receive buffer); records what the connection sent.
struct AdminIo {
    stream: Arc<TcpStream>,
    progress: Arc<Progress>,
    accepted: Instant,
    /// The last bytes read (the newest lowest), to see the blank line ending the head.
    tail: u32,
}

impl tokio::io::AsyncRead for AdminIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            // Into the unfilled part as it is (no zeroing of hyper's spare buffer first).
            let before = buf.filled().len();
            match self.stream.try_read_buf(buf) {
                Ok(n) => {
                    if n > 0 {
                        let this = self.as_mut().get_mut();
                        this.progress.got_bytes.store(true, Ordering::Relaxed);
                        // The head is read once its blank line is: the connection counts
                        // as served from then on, not only once hyper has parsed it (a
                        // task preempted in between left its connection closable).
                        for &b in &buf.filled()[before..] {
                            this.tail = (this.tail << 8) | u32::from(b);
                            if this.tail == 0x0d0a_0d0a || (this.tail & 0xffff) == 0x0a0a {
                                this.progress.mark_served(this.accepted);
                            }
                        }
                    }
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for AdminIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                done => return std::task::Poll::Ready(done),
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(
            socket2::SockRef::from(&*self.stream).shutdown(std::net::Shutdown::Write),
        )
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

    fn conn(accepted: Instant, served: Option<Instant>, got_bytes: bool) -> Seen {
        Seen {
            accepted,
            served,
            got_bytes,
        }
    }

    /// The order connections are closed in for a newcomer with its head: silent past the
    /// grace (oldest first), then trickling past it or served long ago, then younger ones
    /// without a head (oldest first), then one whose head waits unread or was served lately.
    /// A newcomer without its head closes only trickling ones past the grace or ones served
    /// long ago; else it is refused (parked).
    #[test]
    fn a_newcomer_closes_silent_connections_never_ones_being_served() {
        let now = Instant::now() + Duration::from_secs(10);
        let ago = |ms: u64| now - Duration::from_millis(ms);
        let none = |_| false;
        // Served lately (0) beside a young silent one (1): the silent one, for a newcomer
        // with its head; one without is refused (parked): both are within their grace.
        let open = [
            conn(ago(150), Some(ago(149)), true),
            conn(ago(100), None, false),
        ];
        assert_eq!(victim(&open, true, now, none), 1);
        assert_eq!(victim(&open, false, now, none), 2);
        // Young ones: the oldest first, however many bytes it sent.
        let open = [
            conn(ago(105), None, true),
            conn(ago(120), None, true),
            conn(ago(110), None, false),
        ];
        assert_eq!(victim(&open, true, now, none), 1);
        // Past the grace: silent before trickling, before served long ago, before young.
        let open = [
            conn(ago(3_000), Some(ago(2_000)), true),
            conn(ago(900), None, true),
            conn(ago(10), None, false),
            conn(ago(300), None, false),
        ];
        assert_eq!(victim(&open, true, now, none), 3);
        assert_eq!(victim(&open[..3], true, now, none), 0);
        assert_eq!(victim(&open[..2], true, now, none), 0);
        assert_eq!(victim(&open[1..3], true, now, none), 0);
        // Without its head: the one served long ago, the trickling one, never a silent one.
        assert_eq!(victim(&open, false, now, none), 0);
        assert_eq!(victim(&open[1..], false, now, none), 0);
        assert_eq!(
            victim(&open[2..], false, now, none),
            2,
            "a silent one closed"
        );
        assert_eq!(victim(&open[2..3], true, now, none), 0);
        // A head waiting unread protects as being served does.
        let open = [conn(ago(400), None, false), conn(ago(100), None, false)];
        assert_eq!(victim(&open, true, now, |i| i == 0), 1);
        assert_eq!(victim(&open, false, now, |i| i == 0), 2);
        // Nothing to close for a newcomer without a head: the newcomer is refused …
        assert_eq!(victim(&open, false, now, |_| true), 2);
        let served = [
            conn(ago(50), Some(ago(49)), true),
            conn(ago(20), Some(ago(19)), true),
        ];
        assert_eq!(victim(&served, false, now, none), 2);
        // … one with its head takes the place of the one served longest ago.
        assert_eq!(victim(&served, true, now, none), 0);
        assert_eq!(victim(&open, true, now, |_| true), 0);
    }

    /// A newcomer with its head, everything else being served: it closes the connection
    /// served longest ago, not a probe accepted 0.1 ms ago whose head is on its way (that
    /// probe used to be closed, after one newer connection); a connection served after the
    /// probe's accept, or a newborn one beside a connection served since, goes after it.
    #[test]
    fn a_newcomer_with_its_head_spares_a_probe_whose_head_is_on_its_way() {
        let now = Instant::now() + Duration::from_secs(10);
        let ago_us = |us: u64| now - Duration::from_micros(us);
        let none = |_| false;
        // 63 served lately (accepted 900..270 ms ago, served 1 ms later), one probe
        // accepted 0.1 ms ago, nothing read yet.
        let mut open: Vec<Seen> = (0..63u64)
            .map(|k| {
                let at = 900_000 - k * 10_000;
                conn(ago_us(at), Some(ago_us(at - 1_000)), true)
            })
            .collect();
        open.push(conn(ago_us(100), None, false));
        let v = victim(&open, true, now, none);
        assert_ne!(v, 63, "the probe was closed");
        assert_eq!(v, 0, "the one served longest ago");
        // Nor does a newcomer without its head (it is parked: see
        // `a_headless_newcomer_never_closes_a_newborn_connection`).
        assert_eq!(victim(&open, false, now, none), 64);
        // A probe 60 ms old (past ADMIN_NEWBORN) without its head goes first, as before.
        open[63] = conn(ago_us(60_000), None, false);
        assert_eq!(victim(&open, true, now, none), 63);
        // A silent flood (newborn ones, 1-2.5 ms old) beside a connection served 0.5 ms
        // ago (its answer on its way): the oldest of the flood, not the one being served.
        let open = [
            conn(ago_us(600), Some(ago_us(500)), true),
            conn(ago_us(1_000), None, false),
            conn(ago_us(2_500), None, false),
            conn(ago_us(1_800), None, false),
        ];
        assert_eq!(victim(&open, true, now, none), 2);
        // Only newborn ones: the oldest.
        assert_eq!(victim(&open[1..], true, now, none), 1);
    }

    /// A newcomer that has sent nothing never closes a connection accepted within
    /// ADMIN_NEWBORN that has sent nothing either (its head may be on its way: a probe
    /// accepted a few milliseconds before the flood's newer connections): with every place
    /// newborn it is refused here — and parked by the accept loop, so a probe among them
    /// waits for its head instead. Before, it closed the oldest newborn one: under a flood
    /// of 20,000 silent connects a second, a probe whose head was 3.2 ms late (64 newer
    /// connections) was closed unanswered.
    #[test]
    fn a_headless_newcomer_never_closes_a_newborn_connection() {
        let now = Instant::now() + Duration::from_secs(10);
        let ago_us = |us: u64| now - Duration::from_micros(us);
        let none = |_| false;
        // 64 flood connections accepted 3.2..0.05 ms ago (20,000 a second), nothing sent;
        // the probe is the oldest.
        let open: Vec<Seen> = (0..64u64)
            .map(|k| conn(ago_us(3_200 - k * 50), None, false))
            .collect();
        assert_eq!(
            victim(&open, false, now, none),
            64,
            "a newborn one was closed"
        );
        // Its head arrived (waiting unread): still not, and not the others.
        assert_eq!(victim(&open, false, now, |i| i == 0), 64);
        // Nor any other younger than ADMIN_SILENT_GRACE (60 ms old; trickling) …
        let mut aged = open.clone();
        aged[40] = conn(ago_us(60_000), None, false);
        assert_eq!(victim(&aged, false, now, none), 64);
        aged[41] = conn(ago_us(1_000), None, true);
        assert_eq!(victim(&aged, false, now, none), 64);
        // … nor one silent past it (left to newcomers with their head) …
        aged[42] = conn(ago_us(300_000), None, false);
        assert_eq!(victim(&aged, false, now, none), 64);
        assert_eq!(victim(&aged, true, now, none), 42);
        // … but one trickling past it, or one served long ago whose client does not read.
        aged[43] = conn(ago_us(300_000), None, true);
        assert_eq!(victim(&aged, false, now, none), 43);
        aged[43] = conn(ago_us(1_300_000), Some(ago_us(1_200_000)), true);
        assert_eq!(victim(&aged, false, now, none), 43);
        // A newcomer with its head takes the oldest newborn's place.
        assert_eq!(victim(&open, true, now, none), 0);
    }

    #[test]
    fn only_localhost_and_ip_addresses_are_local_hosts() {
        for ok in [
            "127.0.0.1:7482",
            "127.0.0.1",
            "localhost:7482",
            "LOCALHOST",
            "localhost.:1",
            "[::1]:7482",
            "[::1]",
            "10.0.0.5:7482",
        ] {
            assert!(is_local_authority(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7482",
            "127.0.0.1.evil.example",
            "localhost.evil.example:7482",
            "evil@127.0.0.1:7482",
            "127.0.0.1:7482:1",
            "::1",
            "127.0.0.1:",
            "",
        ] {
            assert!(!is_local_authority(bad), "{bad}");
        }
    }

    /// `head_waiting` peeks on the borrowed socket: it sees a whole head only once it has
    /// all arrived, and takes nothing (the task then reads every byte).
    #[tokio::test]
    async fn a_waiting_head_is_peeked_not_taken() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut served, _) = listener.accept().await.unwrap();
        assert!(!head_waiting(&served), "nothing sent yet");
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        served.readable().await.unwrap();
        assert!(!head_waiting(&served), "half a head");
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !head_waiting(&served) {
            assert!(Instant::now() < deadline, "the whole head never showed");
            tokio::task::yield_now().await;
        }
        let mut got = [0u8; 64];
        let mut n = 0;
        while !got[..n].ends_with(b"\r\n\r\n") {
            n += served.read(&mut got[n..]).await.unwrap();
        }
        assert_eq!(&got[..n], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn a_whole_head_is_a_request_line_and_a_blank_line() {
        assert!(is_whole_head(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_whole_head(b"GET / HTTP/1.0\n\n"));
        assert!(!is_whole_head(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"));
        assert!(!is_whole_head(b"\r\n\r\n"));
        assert!(!is_whole_head(b""));
    }
}
