//! Relay metrics: lock-free counters and a routing-latency histogram, rendered in the
//! Prometheus text exposition format (`/metrics`) and summarised for `/status`.
//!
//! Hand-rolled rather than a metrics crate: the set is small and fixed, every update on the
//! hot path is one relaxed atomic add, and the output is checked with `promtool` in tests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use whispeer_protocol::ErrorCode;

use crate::ids::TransportKind;

/// Upper bounds of the routing histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 1e-1,
];

/// Upper bounds of the walk histogram buckets (`whispeer_relay_route_nodes_visited`), in
/// index nodes: a publish costs one rate token per 64 ([`crate::rate::NODES_PER_TOKEN`]),
/// a tenant's worst case is ~43,000 at the default quotas (relay README, "Routing cost").
const NODE_BUCKETS: [u64; 8] = [16, 64, 256, 1024, 4096, 16_384, 65_536, 262_144];

/// Error codes the relay can send, in wire order (index = code - 1).
const CODES: [ErrorCode; 17] = [
    ErrorCode::Malformed,
    ErrorCode::UnsupportedVersion,
    ErrorCode::UnknownFrame,
    ErrorCode::FrameTooLarge,
    ErrorCode::InvalidFilter,
    ErrorCode::TooManySubscriptions,
    ErrorCode::RateLimited,
    ErrorCode::TooManyConnections,
    ErrorCode::NotAllowed,
    ErrorCode::SlowConsumer,
    ErrorCode::ShuttingDown,
    ErrorCode::IdleTimeout,
    ErrorCode::Internal,
    ErrorCode::StoreFailed,
    ErrorCode::ProtocolViolation,
    ErrorCode::InvalidEnvelope,
    ErrorCode::UnknownSubscription,
];

/// Which cap refused a connection before its handshake (the `cap` label of
/// `whispeer_relay_connections_refused_total`: a fixed set, never an address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusedCap {
    /// `max_connections`.
    Global,
    /// `max_connections_per_addr`.
    PerAddr,
    /// `max_connections_per_network`.
    PerNetwork,
    /// A cap reached by an address over its connect rate: closed unanswered.
    Churning,
}

impl RefusedCap {
    const ALL: [RefusedCap; 4] = [
        RefusedCap::Global,
        RefusedCap::PerAddr,
        RefusedCap::PerNetwork,
        RefusedCap::Churning,
    ];

    fn label(self) -> &'static str {
        match self {
            RefusedCap::Global => "global",
            RefusedCap::PerAddr => "per_addr",
            RefusedCap::PerNetwork => "per_network",
            RefusedCap::Churning => "churning",
        }
    }
}

/// Latency histogram with fixed buckets.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
}

/// Every counter the relay keeps. Shared by the router, connections and the metrics plugin.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    connections: [AtomicI64; TransportKind::ALL.len()],
    connections_total: [AtomicU64; TransportKind::ALL.len()],
    connections_rejected: AtomicU64,
    connections_refused: [AtomicU64; RefusedCap::ALL.len()],
    /// Connections refused before their handshake and closed without their `Err` (and
    /// plain TCP ones evicted before it whose `Err` could not be written).
    connections_refused_unanswered: AtomicU64,
    /// Connections not yet past `Hello` closed to make room for a newcomer while the relay
    /// was full (`limits.max_connections`).
    handshakes_evicted: AtomicU64,
    subscriptions: AtomicI64,
    subscribes_total: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    writes_out: AtomicU64,
    dropped: AtomicU64,
    slow_consumer_disconnects: AtomicU64,
    rejected_by_plugin: AtomicU64,
    errors: [AtomicU64; CODES.len() + 1],
    routing: Histogram,
    /// Index nodes visited per routing walk, by [`NODE_BUCKETS`] (the last: above them).
    walk_nodes: [AtomicU64; NODE_BUCKETS.len() + 1],
    walk_count: AtomicU64,
    walk_sum: AtomicU64,
    /// Publish rate tokens charged for walks, beyond each publish's own one.
    walk_tokens: AtomicU64,
    replayed: AtomicU64,
    redelivered: AtomicU64,
    redeliveries_deferred: AtomicU64,
    duplicate_publishes: AtomicU64,
    throttled: AtomicU64,
    light_started: AtomicU64,
    light_moved: [AtomicU64; crate::hop::Cause::ALL.len()],
    addr_bans: AtomicU64,
    addr_banned: AtomicU64,
    light_busy_percent: AtomicU64,
    quic_retries: AtomicU64,
    refusal_paused: AtomicU64,
    credit_pauses: AtomicU64,
    credit_lost: AtomicU64,
    /// Unacknowledged QoS 0 deliveries the store did not keep, forgotten to take the
    /// relay-wide budget's room back (`flow::UnackedBudget::reclaim`).
    unacked_qos0_forgotten: AtomicU64,
    /// Unacknowledged envelope bytes of all QoS >= 1 subscriptions, relay-wide (the
    /// `delivery.total_unacked_bytes` budget counts them here: `flow::UnackedBudget`).
    pub(crate) unacked_bytes: AtomicU64,
    /// QoS >= 1 subscriptions paused by that budget.
    unacked_budget_pauses: AtomicU64,
    /// The NATS bridge (see `cluster`); all zero without a cluster.
    pub(crate) cluster: ClusterMetrics,
}

/// Counters of the NATS bridge. Forwarded envelopes that could not be handed to NATS are
/// QoS 0 loss across relays and are counted, never silent.
#[derive(Debug, Default)]
pub(crate) struct ClusterMetrics {
    /// Envelopes published to NATS.
    pub(crate) forwarded: AtomicU64,
    /// Envelopes not forwarded: the queue to NATS was full or the publish failed.
    pub(crate) forward_dropped: AtomicU64,
    /// Envelopes from other relays routed to local subscribers.
    pub(crate) received: AtomicU64,
    /// Second copies NATS delivered for overlapping filters (dropped on purpose).
    pub(crate) duplicates: AtomicU64,
    /// Envelopes from NATS that could not be routed (malformed, refused by the store, or
    /// dropped by NATS for a slow subscription).
    pub(crate) receive_dropped: AtomicU64,
    /// Loss notices from other relays (publishes their forward queue dropped), each
    /// reported to the matching local subscribers in a `Gap`.
    pub(crate) lost_notices: AtomicU64,
    /// 1 while connected to a NATS server.
    pub(crate) connected: AtomicI64,
    /// NATS subscriptions held (one or two per distinct local filter).
    pub(crate) subscriptions: AtomicI64,
    /// Connections (first and re-) to a NATS server.
    pub(crate) connects: AtomicU64,
    /// Requests the interest keeper made to confirm new NATS subscriptions before it
    /// released those they replace (at most one per batch of interest changes).
    pub(crate) settles: AtomicU64,
    /// Of those, the ones not confirmed (error or `SETTLE_TIMEOUT`): the old subscriptions
    /// were released anyway.
    pub(crate) settles_unconfirmed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            connections: Default::default(),
            connections_total: Default::default(),
            connections_rejected: AtomicU64::new(0),
            connections_refused: Default::default(),
            connections_refused_unanswered: AtomicU64::new(0),
            handshakes_evicted: AtomicU64::new(0),
            subscriptions: AtomicI64::new(0),
            subscribes_total: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            writes_out: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            rejected_by_plugin: AtomicU64::new(0),
            errors: Default::default(),
            routing: Histogram::default(),
            walk_nodes: Default::default(),
            walk_count: AtomicU64::new(0),
            walk_sum: AtomicU64::new(0),
            walk_tokens: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            redeliveries_deferred: AtomicU64::new(0),
            duplicate_publishes: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            light_started: AtomicU64::new(0),
            light_moved: Default::default(),
            addr_bans: AtomicU64::new(0),
            quic_retries: AtomicU64::new(0),
            addr_banned: AtomicU64::new(0),
            light_busy_percent: AtomicU64::new(0),
            refusal_paused: AtomicU64::new(0),
            credit_pauses: AtomicU64::new(0),
            credit_lost: AtomicU64::new(0),
            unacked_qos0_forgotten: AtomicU64::new(0),
            unacked_bytes: AtomicU64::new(0),
            unacked_budget_pauses: AtomicU64::new(0),
            cluster: ClusterMetrics::default(),
        }
    }
}

/// A point-in-time summary (the `/status` JSON "traffic" part).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Open client connections.
    pub connections: u64,
    /// Active subscriptions.
    pub subscriptions: u64,
    /// Publishes accepted.
    pub messages_in: u64,
    /// Message deliveries queued to subscribers.
    pub messages_out: u64,
    /// Frame bytes received.
    pub bytes_in: u64,
    /// Frame bytes written.
    pub bytes_out: u64,
    /// Coalesced writes to clients (each one batch of frames).
    pub writes_out: u64,
    /// Messages dropped by the slow-consumer policy.
    pub dropped: u64,
    /// Connections closed by the slow-consumer policy.
    pub slow_consumer_disconnects: u64,
    /// Err frames sent, all kinds.
    pub errors: u64,
}

impl Metrics {
    /// Fresh counters; uptime starts now.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn connection_opened(&self, kind: TransportKind) {
        self.connections[kind.index()].fetch_add(1, Relaxed);
        self.connections_total[kind.index()].fetch_add(1, Relaxed);
    }
    pub(crate) fn connection_closed(&self, kind: TransportKind) {
        self.connections[kind.index()].fetch_sub(1, Relaxed);
    }
    pub(crate) fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
    }
    /// A connection refused before its handshake by `cap` (also counted as rejected).
    pub(crate) fn connection_refused(&self, cap: RefusedCap) {
        self.connection_rejected();
        self.connections_refused[cap as usize].fetch_add(1, Relaxed);
    }
    /// A connection refused before its handshake was closed without being told why: no
    /// protocol to speak yet (TLS, WebSocket, QUIC), a churning address or network, or
    /// every task answering refusals busy. (One told why counts in `error_sent`.)
    pub(crate) fn refused_unanswered(&self) {
        self.connections_refused_unanswered.fetch_add(1, Relaxed);
    }
    /// A connection not yet past `Hello` was closed to make room for a newcomer.
    pub(crate) fn handshake_evicted(&self) {
        self.handshakes_evicted.fetch_add(1, Relaxed);
    }
    pub(crate) fn subscribed(&self) {
        self.subscriptions.fetch_add(1, Relaxed);
        self.subscribes_total.fetch_add(1, Relaxed);
    }
    pub(crate) fn unsubscribed(&self, n: usize) {
        self.subscriptions.fetch_sub(n as i64, Relaxed);
    }
    pub(crate) fn published(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }
    pub(crate) fn delivered(&self, n: usize) {
        self.messages_out.fetch_add(n as u64, Relaxed);
    }
    pub(crate) fn frame_in(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }
    /// One coalesced write of `frames` frames.
    pub(crate) fn frames_out(&self, frames: usize, bytes: usize) {
        self.writes_out.fetch_add(1, Relaxed);
        self.frames_out.fetch_add(frames as u64, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }
    pub(crate) fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }
    pub(crate) fn slow_consumer_disconnect(&self) {
        self.slow_consumer_disconnects.fetch_add(1, Relaxed);
        self.error_sent(ErrorCode::SlowConsumer);
    }
    /// A connection's reads were paused by a rate limit.
    /// A connection's reads were paused after a refused publish.
    pub(crate) fn refusal_paused(&self) {
        self.refusal_paused.fetch_add(1, Relaxed);
    }

    pub(crate) fn addr_banned(&self) {
        self.addr_bans.fetch_add(1, Relaxed);
    }
    /// The light runtime's threads' busy share over the last sample, in percent (`hop`).
    pub(crate) fn set_light_busy(&self, share: f64) {
        let pct = (share * 100.0).round().clamp(0.0, 100.0) as u64;
        self.light_busy_percent.store(pct, Relaxed);
    }
    pub(crate) fn set_addr_banned(&self, n: usize) {
        self.addr_banned.store(n as u64, Relaxed);
    }
    pub(crate) fn throttled(&self) {
        self.throttled.fetch_add(1, Relaxed);
    }
    /// A connection was accepted onto the light runtime (`hop`).
    pub(crate) fn light_started(&self) {
        self.light_started.fetch_add(1, Relaxed);
    }
    /// A connection moves from the light runtime to the main one (`hop`), for `cause`.
    pub(crate) fn light_moved(&self, cause: crate::hop::Cause) {
        self.light_moved[cause as usize].fetch_add(1, Relaxed);
    }
    /// A QUIC connection attempt was answered with a Retry (its address not yet validated).
    pub(crate) fn quic_retry(&self) {
        self.quic_retries.fetch_add(1, Relaxed);
    }
    /// A subscription ran out of credit and its delivery paused.
    pub(crate) fn credit_paused(&self) {
        self.credit_pauses.fetch_add(1, Relaxed);
    }
    /// Messages a paused subscription skipped that the store does not keep (sent as `Gap`).
    pub(crate) fn credit_lost(&self, n: u64) {
        self.credit_lost.fetch_add(n, Relaxed);
    }
    /// Unacknowledged QoS 0 deliveries forgotten by the relay-wide budget (sent as `Gap`).
    pub(crate) fn unacked_qos0_forgotten(&self, n: u64) {
        self.unacked_qos0_forgotten.fetch_add(n, Relaxed);
    }
    /// A subscription's delivery paused for the relay-wide unacknowledged-bytes budget.
    pub(crate) fn unacked_budget_paused(&self) {
        self.unacked_budget_pauses.fetch_add(1, Relaxed);
    }
    pub(crate) fn rejected_by_plugin(&self) {
        self.rejected_by_plugin.fetch_add(1, Relaxed);
    }
    pub(crate) fn error_sent(&self, code: ErrorCode) {
        let i = match code.to_u16() as usize {
            c @ 1..=17 => c,
            _ => 0,
        };
        self.errors[i].fetch_add(1, Relaxed);
    }
    pub(crate) fn routed(&self, d: Duration) {
        self.routing.observe(d);
    }
    /// A routing walk visited `nodes` index nodes.
    pub(crate) fn walked(&self, nodes: usize) {
        let n = nodes as u64;
        let i = NODE_BUCKETS
            .iter()
            .position(|b| n <= *b)
            .unwrap_or(NODE_BUCKETS.len());
        self.walk_nodes[i].fetch_add(1, Relaxed);
        self.walk_count.fetch_add(1, Relaxed);
        self.walk_sum.fetch_add(n, Relaxed);
    }

    /// A publisher was charged `tokens` publish tokens for its walk, beyond its publish's.
    pub(crate) fn walk_charged(&self, tokens: u64) {
        self.walk_tokens.fetch_add(tokens, Relaxed);
    }

    pub(crate) fn replayed(&self, n: u64) {
        self.replayed.fetch_add(n, Relaxed);
    }
    pub(crate) fn redelivered(&self, n: u64) {
        self.redelivered.fetch_add(n, Relaxed);
    }
    pub(crate) fn redeliveries_deferred(&self, n: u64) {
        if n > 0 {
            self.redeliveries_deferred.fetch_add(n, Relaxed);
        }
    }
    pub(crate) fn duplicate_publish(&self) {
        self.duplicate_publishes.fetch_add(1, Relaxed);
    }

    /// The store part of the Prometheus exposition (appended after
    /// [`render_prometheus`](Self::render_prometheus)).
    pub fn render_store_prometheus(&self, kind: &str, s: &crate::store::StoreMetrics) -> String {
        use crate::store::{BATCH_BUCKETS, COMMIT_BUCKETS};
        let mut o = String::with_capacity(2048);
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        family(
            &mut o,
            "whispeer_relay_store_info",
            "gauge",
            "The store kind (value is always 1).",
        );
        let _ = writeln!(o, "whispeer_relay_store_info{{kind=\"{kind}\"}} 1");
        // The store-reader thread is one per process: its counters are the process's.
        let reads = crate::store::reads().status();
        family(
            &mut o,
            "whispeer_relay_store_reads_queued",
            "gauge",
            "Store reads (history, replay, retained, catch-up) waiting for the reader thread, all tenants.",
        );
        let _ = writeln!(o, "whispeer_relay_store_reads_queued {}", reads.queued);
        family(
            &mut o,
            "whispeer_relay_store_read_tenants_queued",
            "gauge",
            "Tenants with store reads waiting (the reader thread serves them round-robin).",
        );
        let _ = writeln!(
            o,
            "whispeer_relay_store_read_tenants_queued {}",
            reads.tenants
        );
        if let Some(free) = s.disk_free_bytes {
            family(
                &mut o,
                "whispeer_relay_store_disk_free_bytes",
                "gauge",
                "Free bytes of the file system holding the store file, as last measured (below store.min_free_bytes publishes that need the store are refused).",
            );
            let _ = writeln!(o, "whispeer_relay_store_disk_free_bytes {free}");
        }
        let counters: [(&str, &str, u64); 23] = [
            (
                "whispeer_relay_store_reads_total",
                "Store reads run by the reader thread.",
                reads.served,
            ),
            (
                "whispeer_relay_store_read_busy_rejections_total",
                "Store reads refused because their tenant had the most reads queued (Err busy).",
                reads.refused,
            ),
            (
                "whispeer_relay_store_rows_read_total",
                "Stored rows examined by history, replay and retained reads.",
                s.rows_read,
            ),
            (
                "whispeer_relay_store_retained_confirms_total",
                "Cluster store: retained writes followed by a confirming write (another relay may have written an older value of the path at the same moment).",
                s.retained_confirms,
            ),
            (
                "whispeer_relay_store_retained_repairs_total",
                "Cluster store: retained values written again because an older value written at the same moment landed after them (nats-server before 2.9.21).",
                s.retained_repairs,
            ),
            (
                "whispeer_relay_store_quota_tenant_rejections_total",
                "Publishes refused by a per-tenant storage quota (Err quota_exceeded).",
                s.quota_tenant_rejections,
            ),
            (
                "whispeer_relay_store_quota_global_rejections_total",
                "Publishes refused by a global storage quota (Err quota_exceeded).",
                s.quota_global_rejections,
            ),
            (
                "whispeer_relay_store_quota_reserve_rejections_total",
                "Publishes refused by the reserve: the relay's totals nearly used up and the tenant holding more than its share of the rest (Err quota_exceeded).",
                s.quota_reserve_rejections,
            ),
            (
                "whispeer_relay_store_full_rejections_total",
                "Publishes refused while the disk was full (Err storage_full).",
                s.storage_full_rejections,
            ),
            (
                "whispeer_relay_store_low_disk_rejections_total",
                "Publishes refused because the store's file system would keep less than store.min_free_bytes free (Err storage_full).",
                s.low_disk_rejections,
            ),
            (
                "whispeer_relay_store_busy_rejections_total",
                "Publishes refused because the store queue was full (Err busy).",
                s.busy_rejections,
            ),
            (
                "whispeer_relay_store_commit_failures_total",
                "Store transactions that failed (their publishers got an error).",
                s.commit_failures,
            ),
            (
                "whispeer_relay_store_live_only_total",
                "Messages routed live and not stored (QoS 0 outside the retention policy).",
                s.live_only,
            ),
            (
                "whispeer_relay_store_checkpoints_total",
                "Background WAL checkpoints run.",
                s.checkpoints,
            ),
            (
                "whispeer_relay_store_wal_truncations_total",
                "Times the store's writer checkpointed the WAL and truncated it (grown past 64 MiB while commits ran back to back, or free space below store.min_free_bytes).",
                s.wal_truncations,
            ),
            (
                "whispeer_relay_store_appends_total",
                "Messages appended to the store.",
                s.appends,
            ),
            (
                "whispeer_relay_store_commits_total",
                "Store transactions committed.",
                s.commits,
            ),
            (
                "whispeer_relay_store_trimmed_total",
                "Stored messages deleted by retention limits.",
                s.trimmed,
            ),
            (
                "whispeer_relay_store_duplicates_total",
                "Publishes answered from the publish-id dedup window.",
                s.duplicates,
            ),
            (
                "whispeer_relay_replayed_messages_total",
                "History messages sent to replaying subscriptions.",
                self.replayed.load(Relaxed),
            ),
            (
                "whispeer_relay_redelivered_messages_total",
                "Unacknowledged messages sent again after the ack timeout.",
                self.redelivered.load(Relaxed),
            ),
            (
                "whispeer_relay_redeliveries_deferred_total",
                "Redeliveries not queued because the connection's queue had no room for QoS >= 1 messages (the client is not reading); each is tried again after another ack timeout.",
                self.redeliveries_deferred.load(Relaxed),
            ),
            (
                "whispeer_relay_duplicate_publishes_total",
                "Publishes with a publish id already in the dedup window.",
                self.duplicate_publishes.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {v}");
        }
        let hist = |o: &mut String,
                    name: &str,
                    help: &str,
                    bounds: &[f64],
                    cum: &[u64],
                    sum: f64,
                    count: u64| {
            family(o, name, "histogram", help);
            for (i, le) in bounds.iter().enumerate() {
                let v = cum.get(i).copied().unwrap_or(0);
                let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {v}");
            }
            let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {count}");
            let _ = writeln!(o, "{name}_sum {sum}");
            let _ = writeln!(o, "{name}_count {count}");
        };
        hist(
            &mut o,
            "whispeer_relay_store_commit_batch_size",
            "Operations per store transaction (group commit).",
            &BATCH_BUCKETS,
            &s.batch_buckets,
            s.batch_sum as f64,
            s.commits,
        );
        hist(
            &mut o,
            "whispeer_relay_store_commit_seconds",
            "Store transaction commit latency.",
            &COMMIT_BUCKETS,
            &s.commit_buckets,
            s.commit_seconds_sum,
            s.commits,
        );
        o
    }

    /// Uptime since the metrics were created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Current totals.
    pub fn snapshot(&self) -> Snapshot {
        let sum = |a: &[AtomicI64]| a.iter().map(|x| x.load(Relaxed).max(0) as u64).sum();
        Snapshot {
            connections: sum(&self.connections),
            subscriptions: self.subscriptions.load(Relaxed).max(0) as u64,
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            writes_out: self.writes_out.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            slow_consumer_disconnects: self.slow_consumer_disconnects.load(Relaxed),
            errors: self.errors.iter().map(|e| e.load(Relaxed)).sum(),
        }
    }

    /// Open connections right now.
    pub fn open_connections(&self) -> u64 {
        self.snapshot().connections
    }

    /// The Prometheus text exposition (format version 0.0.4).
    pub fn render_prometheus(&self, last_seq: u64) -> String {
        let mut o = String::with_capacity(4096);
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        let load = |a: &AtomicU64| a.load(Relaxed);

        family(
            &mut o,
            "whispeer_relay_connections",
            "gauge",
            "Open client connections by transport.",
        );
        for k in TransportKind::ALL {
            let v = self.connections[k.index()].load(Relaxed).max(0);
            let _ = writeln!(o, "whispeer_relay_connections{{transport=\"{k}\"}} {v}");
        }
        family(
            &mut o,
            "whispeer_relay_connections_total",
            "counter",
            "Client connections accepted by transport.",
        );
        for k in TransportKind::ALL {
            let v = load(&self.connections_total[k.index()]);
            let _ = writeln!(
                o,
                "whispeer_relay_connections_total{{transport=\"{k}\"}} {v}"
            );
        }
        family(
            &mut o,
            "whispeer_relay_connections_refused_total",
            "counter",
            "Connections refused before their handshake, by the cap that refused them (global = max_connections, per_addr, per_network, churning = closed unanswered).",
        );
        for cap in RefusedCap::ALL {
            let v = load(&self.connections_refused[cap as usize]);
            let _ = writeln!(
                o,
                "whispeer_relay_connections_refused_total{{cap=\"{}\"}} {v}",
                cap.label()
            );
        }
        family(
            &mut o,
            "whispeer_relay_connections_refused_unanswered_total",
            "counter",
            "Connections refused before their handshake and closed without an Err frame: on TLS, WebSocket and QUIC (nothing can be said before the handshake), churning addresses and networks, and plain TCP ones while every task telling refused connections why was busy, or whose Err could not be written (the peer gone); also plain TCP connections evicted while waiting over their connect rate (whispeer_relay_handshakes_evicted_total) whose Err could not be written. The others were told why: whispeer_relay_errors_total{kind=\"too_many_connections\"}.",
        );
        let _ = writeln!(
            o,
            "whispeer_relay_connections_refused_unanswered_total {}",
            load(&self.connections_refused_unanswered)
        );
        let counters: [(&str, &str, u64); 23] = [
            (
                "whispeer_relay_walk_tokens_total",
                "Publish rate tokens charged for routing walks, beyond each publish's own one: one per 64 subscription index nodes visited (whispeer_relay_route_nodes_visited), taken from the publisher's connection, address and account buckets (backpressure).",
                load(&self.walk_tokens),
            ),
            (
                "whispeer_relay_connections_rejected_total",
                "Connections refused (connection limit, plugins).",
                load(&self.connections_rejected),
            ),
            (
                "whispeer_relay_handshakes_evicted_total",
                "Connections still in their handshake or waiting for Hello closed to make room for a new connection while the relay was full (max_connections): the oldest of the network holding the most unwelcomed places, past its grace.",
                load(&self.handshakes_evicted),
            ),
            (
                "whispeer_relay_subscribes_total",
                "Subscriptions created.",
                load(&self.subscribes_total),
            ),
            (
                "whispeer_relay_messages_in_total",
                "Publishes accepted and routed.",
                load(&self.messages_in),
            ),
            (
                "whispeer_relay_messages_out_total",
                "Message deliveries queued to subscribers.",
                load(&self.messages_out),
            ),
            (
                "whispeer_relay_bytes_in_total",
                "Frame bytes received from clients.",
                load(&self.bytes_in),
            ),
            (
                "whispeer_relay_bytes_out_total",
                "Frame bytes written to clients.",
                load(&self.bytes_out),
            ),
            (
                "whispeer_relay_frames_in_total",
                "Frames received from clients.",
                load(&self.frames_in),
            ),
            (
                "whispeer_relay_frames_out_total",
                "Frames written to clients.",
                load(&self.frames_out),
            ),
            (
                "whispeer_relay_writes_total",
                "Coalesced writes to clients, each a batch of frames (frames_out_total / writes_total is the batching).",
                load(&self.writes_out),
            ),
            (
                "whispeer_relay_dropped_messages_total",
                "Messages dropped by the slow-consumer policy.",
                load(&self.dropped),
            ),
            (
                "whispeer_relay_slow_consumer_disconnects_total",
                "Connections closed by the slow-consumer policy.",
                load(&self.slow_consumer_disconnects),
            ),
            (
                "whispeer_relay_throttled_total",
                "Times a connection was slowed by a rate limit (backpressure): its reads paused, or its handshake delayed (addr_connect_rate).",
                load(&self.throttled),
            ),
            (
                "whispeer_relay_light_started_total",
                "Connections started on the light runtime (runtime.light_workers): accepted from an address with few connections, they run there while they stay light.",
                load(&self.light_started),
            ),
            (
                "whispeer_relay_quic_retries_total",
                "QUIC connection attempts answered with a Retry: a source address is counted (and limited, or banned) only once it has proved it receives packets sent to it.",
                load(&self.quic_retries),
            ),
            (
                "whispeer_relay_addr_bans_total",
                "Source addresses (or whole networks, when many of their addresses churn together) banned for connection churn: their new TCP connections dropped before accept for a while (addr_churn_ban_secs).",
                load(&self.addr_bans),
            ),
            (
                "whispeer_relay_refusal_pauses_total",
                "Times a connection's reads were paused after a refused publish (the pause doubles per refusal in a row).",
                load(&self.refusal_paused),
            ),
            (
                "whispeer_relay_credit_pauses_total",
                "Times a QoS >= 1 subscription ran out of credit and its delivery paused.",
                load(&self.credit_pauses),
            ),
            (
                "whispeer_relay_credit_lost_total",
                "Messages a paused subscription (out of credit, or over the relay-wide unacknowledged-bytes budget) skipped that the store does not keep (QoS 0), or kept and dropped (retention) before its catch-up read them (reported to the client in a Gap).",
                load(&self.credit_lost),
            ),
            (
                "whispeer_relay_unacked_qos0_forgotten_total",
                "Unacknowledged QoS 0 deliveries to QoS >= 1 subscriptions that the store does not keep, forgotten (no redelivery: at most once) to take back room in the spent relay-wide budget of unacknowledged bytes for an address under its share, before any connection is closed as a slow consumer; each is reported to its connection in a Gap.",
                load(&self.unacked_qos0_forgotten),
            ),
            (
                "whispeer_relay_unacked_budget_pauses_total",
                "Times a QoS >= 1 subscription's delivery paused because the relay-wide budget of unacknowledged bytes (delivery.total_unacked_bytes) was spent and its address held its share (stored messages wait in the store; unstored QoS 0 ones count in whispeer_relay_credit_lost_total and a Gap).",
                load(&self.unacked_budget_pauses),
            ),
            (
                "whispeer_relay_plugin_rejections_total",
                "Operations refused by a plugin.",
                load(&self.rejected_by_plugin),
            ),
        ];
        for (name, help, v) in counters {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {v}");
        }
        let c = &self.cluster;
        let cluster: [(&str, &str, u64); 9] = [
            (
                "whispeer_relay_cluster_forwarded_total",
                "Envelopes published to NATS for other relays.",
                load(&c.forwarded),
            ),
            (
                "whispeer_relay_cluster_forward_dropped_total",
                "Envelopes not forwarded to other relays (queue to NATS full or publish failed): QoS 0 loss across relays.",
                load(&c.forward_dropped),
            ),
            (
                "whispeer_relay_cluster_received_total",
                "Envelopes from other relays (via NATS) routed to local subscribers.",
                load(&c.received),
            ),
            (
                "whispeer_relay_cluster_duplicates_total",
                "Second copies NATS delivered for overlapping filters, dropped so each client gets a message once.",
                load(&c.duplicates),
            ),
            (
                "whispeer_relay_cluster_receive_dropped_total",
                "Envelopes from NATS not routed (malformed, refused by the store, or dropped by NATS for a slow subscription).",
                load(&c.receive_dropped),
            ),
            (
                "whispeer_relay_cluster_lost_notices_total",
                "Loss notices from other relays (publishes their queue to NATS dropped), reported to the matching local subscribers in Gap frames.",
                load(&c.lost_notices),
            ),
            (
                "whispeer_relay_cluster_connects_total",
                "Connections (first and reconnections) to a NATS server.",
                load(&c.connects),
            ),
            (
                "whispeer_relay_cluster_settle_requests_total",
                "Requests confirming new NATS subscriptions before those they replace are released (at most one per batch of subscription changes).",
                load(&c.settles),
            ),
            (
                "whispeer_relay_cluster_settle_unconfirmed_total",
                "Settle requests not answered in time or failed (no _INBOX permission?): the replaced NATS subscriptions were released anyway, envelopes may be lost in the swap.",
                load(&c.settles_unconfirmed),
            ),
        ];
        for (name, help, v) in cluster {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {v}");
        }
        for (name, help, v) in [
            (
                "whispeer_relay_cluster_connected",
                "1 while connected to a NATS server (always 0 without a cluster).",
                &c.connected,
            ),
            (
                "whispeer_relay_cluster_subscriptions",
                "NATS subscriptions held for the filters of local clients.",
                &c.subscriptions,
            ),
        ] {
            family(&mut o, name, "gauge", help);
            let _ = writeln!(o, "{name} {}", v.load(Relaxed).max(0));
        }
        family(
            &mut o,
            "whispeer_relay_addr_banned",
            "gauge",
            "Source addresses banned now for connection churn.",
        );
        let _ = writeln!(o, "whispeer_relay_addr_banned {}", load(&self.addr_banned));
        family(
            &mut o,
            "whispeer_relay_unacked_bytes",
            "gauge",
            "Bytes of envelopes delivered to QoS >= 1 subscriptions and not yet acknowledged, all connections (bounded by delivery.total_unacked_bytes).",
        );
        let _ = writeln!(
            o,
            "whispeer_relay_unacked_bytes {}",
            load(&self.unacked_bytes)
        );
        family(
            &mut o,
            "whispeer_relay_light_busy_percent",
            "gauge",
            "How busy the light runtime's threads were over the last 100 ms (percent); at runtime.light_busy_percent (default 75) or more new connections start on the main runtime.",
        );
        let _ = writeln!(
            o,
            "whispeer_relay_light_busy_percent {}",
            load(&self.light_busy_percent)
        );
        family(
            &mut o,
            "whispeer_relay_subscriptions",
            "gauge",
            "Active subscriptions.",
        );
        let _ = writeln!(
            o,
            "whispeer_relay_subscriptions {}",
            self.subscriptions.load(Relaxed).max(0)
        );
        family(
            &mut o,
            "whispeer_relay_last_sequence",
            "gauge",
            "Last relay sequence number assigned.",
        );
        let _ = writeln!(o, "whispeer_relay_last_sequence {last_seq}");
        family(
            &mut o,
            "whispeer_relay_uptime_seconds",
            "gauge",
            "Seconds since the relay started.",
        );
        let _ = writeln!(
            o,
            "whispeer_relay_uptime_seconds {:.3}",
            self.uptime().as_secs_f64()
        );

        family(
            &mut o,
            "whispeer_relay_errors_total",
            "counter",
            "Err frames sent to clients by error kind.",
        );
        for (i, code) in CODES.iter().enumerate() {
            let v = load(&self.errors[i + 1]);
            let _ = writeln!(
                o,
                "whispeer_relay_errors_total{{kind=\"{}\"}} {v}",
                code.name()
            );
        }
        let _ = writeln!(
            o,
            "whispeer_relay_errors_total{{kind=\"other\"}} {}",
            load(&self.errors[0])
        );

        family(
            &mut o,
            "whispeer_relay_light_moves_total",
            "counter",
            "Connections moved from the light runtime to the main one, by cause: reading (8 full turns without waiting for the socket), writing (8 turns' worth written without the queue running empty), limited (a rate limit or refusal pause), walking (its publishes' routing walks cost 128 publish rate tokens beyond their own: 8,192 subscription index nodes).",
        );
        for cause in crate::hop::Cause::ALL {
            let _ = writeln!(
                o,
                "whispeer_relay_light_moves_total{{cause=\"{}\"}} {}",
                cause.name(),
                load(&self.light_moved[cause as usize])
            );
        }

        family(
            &mut o,
            "whispeer_relay_routing_seconds",
            "histogram",
            "Time to accept a publish and queue it to every matching subscriber.",
        );
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += load(&self.routing.buckets[i]);
            let _ = writeln!(
                o,
                "whispeer_relay_routing_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = load(&self.routing.count);
        let _ = writeln!(
            o,
            "whispeer_relay_routing_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = load(&self.routing.sum_nanos) as f64 / 1e9;
        let _ = writeln!(o, "whispeer_relay_routing_seconds_sum {sum}");
        let _ = writeln!(o, "whispeer_relay_routing_seconds_count {count}");

        family(
            &mut o,
            "whispeer_relay_route_nodes_visited",
            "histogram",
            "Subscription index nodes a routing walk visited (per publish routed, local or from another relay): its cost under the routing shard's lock, which wildcard filters multiply. A publish is charged one publish rate token per 64 beyond its own (whispeer_relay_walk_tokens_total).",
        );
        let mut cumulative = 0;
        for (i, le) in NODE_BUCKETS.iter().enumerate() {
            cumulative += load(&self.walk_nodes[i]);
            let _ = writeln!(
                o,
                "whispeer_relay_route_nodes_visited_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = load(&self.walk_count);
        let _ = writeln!(
            o,
            "whispeer_relay_route_nodes_visited_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "whispeer_relay_route_nodes_visited_sum {}",
            load(&self.walk_sum)
        );
        let _ = writeln!(o, "whispeer_relay_route_nodes_visited_count {count}");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_everything() {
        let m = Metrics::new();
        m.routed(Duration::from_nanos(500));
        m.routed(Duration::from_micros(3));
        m.routed(Duration::from_secs(2));
        let text = m.render_prometheus(7);
        assert!(text.contains("whispeer_relay_routing_seconds_bucket{le=\"0.000001\"} 1"));
        assert!(text.contains("whispeer_relay_routing_seconds_bucket{le=\"0.000005\"} 2"));
        assert!(text.contains("whispeer_relay_routing_seconds_bucket{le=\"0.1\"} 2"));
        assert!(text.contains("whispeer_relay_routing_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("whispeer_relay_last_sequence 7"));
    }

    #[test]
    fn the_walk_histogram_counts_nodes() {
        let m = Metrics::new();
        m.walked(3);
        m.walked(64);
        m.walked(41_359);
        m.walked(1 << 20);
        m.walk_charged(646);
        let text = m.render_prometheus(0);
        for line in [
            "whispeer_relay_route_nodes_visited_bucket{le=\"16\"} 1\n",
            "whispeer_relay_route_nodes_visited_bucket{le=\"64\"} 2\n",
            "whispeer_relay_route_nodes_visited_bucket{le=\"16384\"} 2\n",
            "whispeer_relay_route_nodes_visited_bucket{le=\"65536\"} 3\n",
            "whispeer_relay_route_nodes_visited_bucket{le=\"262144\"} 3\n",
            "whispeer_relay_route_nodes_visited_bucket{le=\"+Inf\"} 4\n",
            "whispeer_relay_route_nodes_visited_sum 1090002\n",
            "whispeer_relay_route_nodes_visited_count 4\n",
            "whispeer_relay_walk_tokens_total 646\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
