//! The cluster bridge: relays share live routing through core NATS.
//!
//! Why NATS and not a home-made mesh: NATS already does cluster-wide wildcard routing,
//! interest propagation, reconnection and TLS/auth between servers. The relay only maps its
//! opaque routes onto NATS subjects:
//!
//! - a token path `[key_id, t0, t1, …]` is the subject `<prefix>.<key id hex>.<t0 hex>…`;
//! - a filter maps `+` → `*` and `#` → `>`. MQTT's `a/#` also matches `a` and NATS's `a.>`
//!   does not, so a filter ending in `#` with at least one level before it takes two NATS
//!   subscriptions (`a.>` and `a`), which never both match one subject.
//!
//! **Interest.** The router keeps a refcount per distinct local filter under its routing
//! lock and sends the 0 → 1 and 1 → 0 transitions here, in order; this task holds one NATS
//! subscription set per distinct filter, shared by every local client holding it.
//!
//! **Forwarding.** Every local publish is offered (non-blocking) to a bounded queue; one
//! task publishes the queue to NATS in order, so a publisher's envelopes keep their order on
//! every path. A full queue (NATS slow or down) is counted in
//! `whispeer_relay_cluster_forward_dropped_total` and told to the other relays in loss
//! notices: QoS 0 loss across relays, visible. Local routing never waits for NATS. The
//! queue's bounds, the loss records and the receiving relay's queue are shared fairly
//! among tenants ([`FairLimit`]): one tenant's flood fills its share, and another tenant's
//! envelope is still taken (review finding F4).
//!
//! **Once per client.** The connection uses NATS `no_echo`, so a relay never receives its own
//! publishes. When local filters overlap, NATS delivers one copy per matching subscription:
//! every forwarded envelope carries the sending relay's random origin id and a counter, and
//! a window of recently seen counters per origin lets only the first copy through. That copy
//! is routed like a local publish (one `Msg` per connection, whatever its subscriptions), so
//! every client sees it once and its own filter matching gives it to each subscription once.
//!
//! **Sequence numbers.** In this phase every relay numbers what it routes: an envelope from
//! another relay gets this relay's next sequence number and is stored per this relay's
//! store policy (retained values, history of QoS ≥ 1), so replay and retained values are
//! served for it by this relay — but only for envelopes that reached it, i.e. matched a
//! filter one of its clients held at the time. QoS ≥ 1 guarantees do not cross relays yet
//! (that is JetStream's job, later: its stream sequence will become the relay sequence).
//!
//! **Quotas.** What a relay stores for another relay counts against the tenant that
//! published it there: each forward carries its tenant's tag in the NATS header
//! `Wsp-Tenant` (the encoding the JetStream store uses), and the receiving relay charges the
//! envelope to that tag ([`Tenant::Remote`]), so its per-tenant quotas apply to each remote
//! publisher on its own. Charged to one shared tenant, one publisher filling it made the
//! relay refuse every other tenant's stored traffic from the cluster. A forward without
//! the header (a relay from before it) is charged to this relay's [`Tenant::Local`], as
//! before. With the JetStream store the bridge carries only live-only envelopes, never
//! stored; they carry the header too, for the receiving relay's fair share of its receive
//! queue by tenant.
//!
//! **Blind.** The NATS payload is a 26-byte bridge header (version, origin, counter, publish
//! flags, QoS) and the sealed envelope as the relay received it, with the tenant tag in a
//! NATS header: NATS sees exactly what a relay sees — key ids, tokens, sizes, timing — plus
//! which envelopes share a (hashed) tenant, and no key code enters the relay.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use whispeer_protocol::{Envelope, KeyId, PatternElem, Qos, TokenPath, TokenPattern, TopicToken};

use crate::config::ClusterConfig;
use crate::held_bytes::{fair_admits, FairLimit, Queued, Share};
use crate::metrics::Metrics;
use crate::relay::Shared;
use crate::store::jetstream::TENANT_HEADER;
use crate::store::Tenant;

/// Version byte of the bridge header.
const VERSION: u8 = 1;
/// First byte of a loss notice: `LOST`, origin (8), counter (8), count (8), then the path
/// (key id and tokens, 16 bytes each) of local publishes the forward queue dropped.
const LOST: u8 = 2;
/// Loss-notice header before the path.
const LOST_HEADER_LEN: usize = 25;
/// First byte of a key-wide loss notice: `LOST_KEY`, origin (8), counter (8), count (8),
/// key id (16) — publishes to paths of that key id the forward queue dropped, beyond the
/// path records of their tenant's share. Published on `<prefix>.lost`, which every relay
/// subscribes (a key id's filters have no one subject in common).
const LOST_KEY: u8 = 3;
/// Distinct paths whose forward drops are remembered until told, shared fairly among the
/// tenants with drops; a tenant past its share is remembered by key id instead.
const MAX_LOST_PATHS: usize = 4096;
/// Distinct key ids whose forward drops are remembered until told (key-wide notices),
/// shared the same way; beyond, a drop is only counted
/// (`whispeer_relay_cluster_forward_dropped_total`).
const MAX_LOST_KEYS: usize = 4096;
/// Bridge header: version, origin (8), counter (8), publish flags (8), QoS (1).
const HEADER_LEN: usize = 26;
/// Counters remembered per origin for duplicate detection.
const WINDOW: u64 = 1 << 16;
/// Origins remembered (relays restart with a new origin id; old ones are forgotten).
const MAX_ORIGINS: usize = 1024;
/// Envelopes received from NATS and not yet routed (also bounded in bytes by
/// `cluster.receive_bytes`).
const INBOUND: usize = 65_536;
/// Unflushed bytes after which the publisher flushes the NATS client even while more waits.
const FLUSH_BYTES: u64 = 1 << 20;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The credentials file could not be read.
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The NATS client refused the options.
    #[error("cannot set up the NATS connection: {0}")]
    Connect(String),
}

/// A subscription set change, recorded by the router ([`InterestSet`]) and applied by the keeper.
#[derive(Debug)]
pub(crate) enum Interest {
    /// The first local subscription with this filter.
    Add(TokenPattern),
    /// The last local subscription with this filter went away.
    Remove(TokenPattern),
}

/// A local publish to forward.
#[derive(Debug)]
pub(crate) struct Forward {
    envelope: Envelope,
    flags: u64,
    qos: Qos,
    /// Whose publish it is: the receiving relays charge it to this tenant's tag.
    tenant: Tenant,
    /// Its place and bytes in the queue's bounds until the NATS client has written it (or
    /// it is dropped).
    held: Option<Share<Tenant>>,
}

/// Losses counted by key until someone reports them, with a wake-up at each new key:
/// `SlowSubscriptions`, envelopes the NATS client dropped, by its subscription id, until
/// the interest keeper tells the subscribers of that filter.
#[derive(Debug)]
pub(crate) struct Tally<K> {
    counts: Mutex<HashMap<K, u64>>,
    /// Woken at a first loss, so a reporter idle on an empty queue tells it too.
    added: tokio::sync::Notify,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
            added: tokio::sync::Notify::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Tally<K> {
    /// Counts one loss under `key`; beyond [`MAX_LOST_PATHS`] distinct keys it is only
    /// counted in the caller's metric (subscription ids: at most the subscriptions held).
    fn add(&self, key: K) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&key) {
            *n += 1;
        } else if m.len() < MAX_LOST_PATHS {
            m.insert(key, 1);
            self.added.notify_one();
        }
    }

    fn take(&self) -> HashMap<K, u64> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Envelopes the NATS client dropped for each of its subscriptions (by sid).
pub(crate) type SlowSubscriptions = Tally<u64>;

/// Loss records of one kind (by path, or by key id), each counted to the tenant whose drop
/// made it, and shared fairly among those tenants ([`fair_admits`]).
#[derive(Debug)]
struct Records<K> {
    counts: HashMap<K, u64>,
    by_tenant: HashMap<Tenant, usize>,
}

impl<K> Default for Records<K> {
    fn default() -> Self {
        Self {
            counts: HashMap::new(),
            by_tenant: HashMap::new(),
        }
    }
}

/// What [`Records::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// Added to a record there was.
    Counted,
    /// A new record.
    New,
    /// Not recorded: the tenant is past its share of `cap` records.
    Refused,
}

impl<K: std::hash::Hash + Eq> Records<K> {
    /// Counts one loss under `key`: on its record, else on a new one for `tenant` if
    /// [`fair_admits`] lets it have one more of `cap` records.
    fn add(&mut self, key: K, tenant: &Tenant, cap: usize) -> Recorded {
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
            return Recorded::Counted;
        }
        let mine = self.by_tenant.get(tenant).copied().unwrap_or(0);
        let tenants = self.by_tenant.len() + usize::from(mine == 0);
        let n = |msgs| Queued { msgs, bytes: 0 };
        if !fair_admits(n(self.counts.len()), n(mine), tenants, n(1), cap, 0) {
            return Recorded::Refused;
        }
        self.counts.insert(key, 1);
        *self.by_tenant.entry(tenant.clone()).or_default() += 1;
        Recorded::New
    }

    fn take(&mut self) -> HashMap<K, u64> {
        self.by_tenant.clear();
        std::mem::take(&mut self.counts)
    }
}

/// Local publishes the forward queue dropped, until the publisher tells the other relays
/// in loss notices (their subscribers get the count in a `Gap`): by path, and for a tenant
/// past its share of [`MAX_LOST_PATHS`] path records, by key id (a key-wide notice, told
/// to every subscriber of the key id). One cap for everyone let a tenant's flood over
/// 4,096 invented paths take every record, and other tenants' losses went untold: their
/// remote subscribers missed messages with no `Gap` (review finding F4).
#[derive(Debug, Default)]
pub(crate) struct LostPaths {
    records: Mutex<(Records<TokenPath>, Records<KeyId>)>,
    /// Woken at a new record, so a publisher idle on an empty queue tells it too.
    added: tokio::sync::Notify,
}

impl LostPaths {
    /// Counts one dropped publish of `tenant` to `path`; beyond its share of both kinds
    /// of records it is only counted in the caller's metric.
    fn add(&self, path: TokenPath, tenant: &Tenant) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let key = *path.key_id();
        let mut done = r.0.add(path, tenant, MAX_LOST_PATHS);
        if done == Recorded::Refused {
            done = r.1.add(key, tenant, MAX_LOST_KEYS);
        }
        drop(r);
        if done == Recorded::New {
            self.added.notify_one();
        }
    }

    /// The records (by path, by key id), emptied.
    fn take(&self) -> (HashMap<TokenPath, u64>, HashMap<KeyId, u64>) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        (r.0.take(), r.1.take())
    }
}

/// The router's side of the bridge: two queues, both fed without blocking.
#[derive(Debug)]
pub(crate) struct Link {
    forward: mpsc::Sender<Forward>,
    lost: Arc<LostPaths>,
    /// Envelopes and their bytes in the forward queue (`cluster.queue`,
    /// `cluster.queue_bytes`), shared fairly among tenants.
    queued: Arc<FairLimit<Tenant>>,
    interest: Arc<InterestSet>,
    metrics: Arc<Metrics>,
}

/// The filters the bridge should hold NATS subscriptions for, coalesced per filter: the
/// router records each change without waiting, the interest keeper applies what changed.
/// A queue of changes grew without bound while the keeper waited on NATS (a subscribe
/// blocks while the client's command buffer is full, NATS down): a client subscribing and
/// unsubscribing new filters in a loop added two entries per round. Here a filter is an
/// entry only while it is wanted or held: at most the local subscriptions' filters plus
/// those the keeper holds.
#[derive(Debug, Default)]
pub(crate) struct InterestSet {
    /// Per filter: (wanted by a local subscription now, taken on by the keeper).
    filters: Mutex<HashMap<TokenPattern, (bool, bool)>>,
    changed: tokio::sync::Notify,
}

impl InterestSet {
    fn record(&self, change: Interest) {
        let mut f = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        match change {
            Interest::Add(p) => f.entry(p).or_insert((false, false)).0 = true,
            Interest::Remove(p) => {
                if let Some(e) = f.get_mut(&p) {
                    e.0 = false;
                    if !e.1 {
                        // Never taken on: nothing to undo.
                        f.remove(&p);
                    }
                }
            }
        }
        drop(f);
        self.changed.notify_one();
    }

    /// What the keeper must do now: each filter whose wish differs from what the keeper
    /// holds, as an `Add` or a `Remove` (taken on at once: a change after this call is the
    /// next call's).
    fn take(&self) -> Vec<Interest> {
        let mut f = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        f.retain(|p, (want, held)| {
            if *want != *held {
                out.push(if *want {
                    Interest::Add(p.clone())
                } else {
                    Interest::Remove(p.clone())
                });
                *held = *want;
            }
            *want || *held
        });
        out
    }

    /// Filters recorded (wanted or held).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.filters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Link {
    /// Offers a local publish by `tenant` to NATS; a full queue is counted (and told in a
    /// loss notice), never waited on. Beyond the queue's bounds only a tenant under its
    /// fair share is queued: one tenant's flood is dropped, not every tenant's forwards.
    pub(crate) fn forward(&self, envelope: &Envelope, flags: u64, qos: Qos, tenant: &Tenant) {
        let dropped = || {
            self.metrics.cluster.forward_dropped.fetch_add(1, Relaxed);
            self.lost.add(envelope.token_path(), tenant);
        };
        let Some(held) = self.queued.take(tenant, envelope.as_bytes().len() as u64) else {
            dropped();
            return;
        };
        let f = Forward {
            envelope: envelope.clone(),
            flags,
            qos,
            tenant: tenant.clone(),
            held: Some(held),
        };
        if self.forward.try_send(f).is_err() {
            dropped();
        }
    }

    /// Reports a subscription set change (coalesced per filter, see [`InterestSet`]).
    pub(crate) fn interest(&self, change: Interest) {
        self.interest.record(change);
    }
}

/// The bridge's side of the queues, taken by [`run`].
#[derive(Debug)]
pub(crate) struct Receivers {
    forward: mpsc::Receiver<Forward>,
    lost: Arc<LostPaths>,
    interest: Arc<InterestSet>,
    /// Filled by the NATS client's events ([`connect`]), reported by the interest keeper.
    pub(crate) slow: Arc<SlowSubscriptions>,
    /// Told by the NATS client's `Connected` events ([`connect`]): the interest keeper
    /// tells every connection with a remote interest of a reconnection.
    pub(crate) connected: Arc<tokio::sync::Notify>,
}

/// The queues between router and bridge.
pub(crate) fn link(config: &ClusterConfig, metrics: Arc<Metrics>) -> (Link, Receivers) {
    // Bounded by `queued` (never past twice `cluster.queue`): the channel never fills.
    let (ftx, frx) = mpsc::channel(config.queue.max(1).saturating_mul(2));
    let interest = Arc::new(InterestSet::default());
    let lost = Arc::new(LostPaths::default());
    (
        Link {
            forward: ftx,
            lost: lost.clone(),
            queued: FairLimit::new(config.queue.max(1), config.queue_bytes),
            interest: interest.clone(),
            metrics,
        },
        Receivers {
            forward: frx,
            lost,
            interest,
            slow: Arc::default(),
            connected: Arc::default(),
        },
    )
}

/// What `/status` shows of the bridge (never key ids or subjects).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Connected to a NATS server now.
    pub connected: bool,
    /// NATS URLs configured.
    pub servers: usize,
    /// The NATS server connected to (`host:port` as that server announces itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// NATS subscriptions held for local filters.
    pub subscriptions: u64,
    /// Envelopes published to NATS.
    pub forwarded: u64,
    /// Envelopes not forwarded (queue full or publish failed).
    pub forward_dropped: u64,
    /// Envelopes from other relays routed here.
    pub received: u64,
}

/// Bridge state shared with `/status`.
#[derive(Debug, Default)]
pub(crate) struct State {
    client: OnceLock<async_nats::Client>,
    servers: usize,
}

impl State {
    pub(crate) fn new(config: &ClusterConfig) -> Self {
        Self {
            client: OnceLock::new(),
            servers: config.urls.len(),
        }
    }

    /// Sets `whispeer_relay_cluster_connected` from the client's own state, as `/status`
    /// reads it: async-nats's `Connected`/`Disconnected` events travel through a bounded
    /// channel that drops events when full (a burst of `SlowConsumer` events can crowd a
    /// `Disconnected` out), so a gauge kept by events could stay at 1 with NATS gone.
    pub(crate) fn refresh_connected(&self, metrics: &Metrics) {
        let up = self.connected();
        metrics.cluster.connected.store(i64::from(up), Relaxed);
    }

    /// Whether the bridge's NATS client is connected now.
    fn connected(&self) -> bool {
        self.client
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    pub(crate) fn status(&self, metrics: &Metrics) -> ClusterStatus {
        let c = &metrics.cluster;
        let client = self.client.get();
        let connected = self.connected();
        ClusterStatus {
            connected,
            servers: self.servers,
            server: client
                .filter(|_| connected)
                .map(|cl| cl.server_info())
                .map(|i| format!("{}:{}", i.host, i.port)),
            subscriptions: c.subscriptions.load(Relaxed).max(0) as u64,
            forwarded: c.forwarded.load(Relaxed),
            forward_dropped: c.forward_dropped.load(Relaxed),
            received: c.received.load(Relaxed),
        }
    }
}

/// Connects (in the background: an unreachable NATS does not stop the relay from serving
/// its own clients; the client keeps retrying every configured server).
pub(crate) async fn connect(
    config: &ClusterConfig,
    metrics: Arc<Metrics>,
    slow: Arc<SlowSubscriptions>,
    connected: Arc<tokio::sync::Notify>,
) -> Result<async_nats::Client, ClusterError> {
    let o = async_nats::ConnectOptions::new()
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .name(config.name.as_deref().unwrap_or("whispeer-relay"))
        // Each subscription's reader moves what arrives at once into the byte-bounded
        // receive queue, so this buffer holds only what came in since the reader last ran
        // (one socket read); beyond it NATS reports a slow consumer (counted).
        .subscription_capacity(config.subscription_capacity)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let slow = slow.clone();
            let connected = connected.clone();
            async move {
                let c = &metrics.cluster;
                match &event {
                    // `whispeer_relay_cluster_connected` is read from the client's state
                    // at each scrape (`State::refresh_connected`), not set here.
                    async_nats::Event::Connected => {
                        c.connects.fetch_add(1, Relaxed);
                        connected.notify_one();
                        tracing::info!("cluster: connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("cluster: disconnected from NATS; reconnecting");
                    }
                    async_nats::Event::Closed => {
                        tracing::debug!("cluster: NATS connection closed");
                    }
                    // One event per envelope the client dropped (its events channel
                    // drops events too when full, so this undercounts): the interest
                    // keeper tells that subscription's filter's subscribers in a `Gap`.
                    async_nats::Event::SlowConsumer(sid) => {
                        c.receive_dropped.fetch_add(1, Relaxed);
                        slow.add(*sid);
                    }
                    // Repeats on every reconnect attempt while NATS is unreachable.
                    async_nats::Event::ClientError(e) => {
                        tracing::debug!(error = %e, "cluster: NATS client error");
                    }
                    other => tracing::warn!(event = %other, "cluster: NATS event"),
                }
            }
        });
    auth(o, config)
        .await?
        .connect(urls(config))
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))
}

/// A second connection for the JetStream store (`[cluster] store = "jetstream"`): the same
/// servers, credentials and TLS, without the bridge's metrics.
pub(crate) async fn connect_plain(
    config: &ClusterConfig,
) -> Result<async_nats::Client, ClusterError> {
    let o = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .name(format!(
            "{} store",
            config.name.as_deref().unwrap_or("whispeer-relay")
        ));
    auth(o, config)
        .await?
        .connect(urls(config))
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))
}

/// One connection with the configuration's servers, credentials and TLS, not retried
/// (`whispeer-relay account … --config`): an error when NATS does not answer.
pub async fn connect_once(config: &ClusterConfig) -> Result<async_nats::Client, ClusterError> {
    let o = async_nats::ConnectOptions::new().name("whispeer-relay account");
    auth(o, config)
        .await?
        .connect(urls(config))
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))
}

fn urls(config: &ClusterConfig) -> Vec<&str> {
    config.urls.iter().map(|u| u.trim()).collect()
}

/// Credentials and TLS from the configuration.
async fn auth(
    mut o: async_nats::ConnectOptions,
    config: &ClusterConfig,
) -> Result<async_nats::ConnectOptions, ClusterError> {
    if let Some(path) = &config.credentials {
        o = o
            .credentials_file(path)
            .await
            .map_err(|source| ClusterError::Credentials {
                path: path.clone(),
                source,
            })?;
    }
    if let (Some(u), Some(p)) = (&config.user, &config.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &config.token {
        o = o.token(t.clone());
    }
    if let Some(ca) = &config.tls_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(o)
}

/// Runs the bridge: the publisher, the subscription keeper and the router of remote
/// envelopes. Returns once `drain` fires (graceful shutdown, after the relay's connections
/// are gone, so nothing more is offered) and every envelope already accepted for other
/// relays is published and flushed to the NATS server — QoS 0 a client saw accepted is not
/// lost by a clean stop. The caller bounds the wait with the shutdown deadline (and aborts
/// the bridge past it).
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: async_nats::Client,
    rx: Receivers,
    drain: tokio::sync::oneshot::Receiver<()>,
) {
    let Some(state) = shared.cluster.as_ref() else {
        return;
    };
    let _ = state.client.set(client.clone());
    // With the JetStream store the stream owns `<prefix>.>`: stored envelopes reach every
    // relay through it, and only live-only (unnumbered) ones travel here, beside it.
    let prefix = if shared.config.cluster.jetstream() {
        crate::store::jetstream::live_prefix(&shared.config.cluster.subject_prefix)
    } else {
        shared.config.cluster.subject_prefix.clone()
    };
    let origin = random_origin();
    // Bounded by the receive limit (never past twice `INBOUND`): the channel never fills.
    let (in_tx, in_rx) = mpsc::channel(INBOUND * 2);
    let mut tasks = JoinSet::new();
    let publisher = publish_loop(
        client.clone(),
        rx.forward,
        rx.lost,
        Publishing {
            prefix: prefix.clone(),
            origin,
        },
        shared.metrics.clone(),
        drain,
    );
    tasks.spawn(interest_loop(
        client,
        rx.interest,
        rx.slow,
        rx.connected,
        prefix,
        in_tx,
        FairLimit::new(INBOUND, shared.config.cluster.receive_bytes),
        shared.clone(),
    ));
    tasks.spawn(receive_loop(shared.clone(), in_rx, origin));
    // The publisher ends when drained (or its queue closes); the other loops go with it.
    publisher.await;
    tasks.abort_all();
}

fn random_origin() -> u64 {
    let mut b = [0u8; 8];
    // A fallback origin still works unless two relays draw the same one.
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return t ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// What the publisher puts on the forwards it sends (each names its tenant in header
/// `Wsp-Tenant`: what the receiving relays charge it to, and share their receive queue by —
/// live-only envelopes beside the JetStream stream too, which are never stored).
struct Publishing {
    prefix: String,
    origin: u64,
}

/// The NATS headers of a forward by `tenant`: its tag ([`Tenant::tag`]) in hex.
fn tenant_headers(tenant: &Tenant) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert(TENANT_HEADER, hex::encode(tenant.tag()).as_str());
    h
}

/// The tenant a forward from another relay is charged to here: the one its `Wsp-Tenant`
/// header names ([`Tenant::Remote`]), else — a relay from before the header, or a value
/// that is not 16 bytes of hex — this relay's [`Tenant::Local`], as before.
fn origin_tenant(headers: Option<&async_nats::HeaderMap>) -> Tenant {
    let mut tag = [0u8; 16];
    match headers.and_then(|h| h.get(TENANT_HEADER)) {
        Some(v) if hex::decode_to_slice(v.as_str(), &mut tag).is_ok() => Tenant::Remote(tag),
        _ => Tenant::Local,
    }
}

async fn publish_loop(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<Forward>,
    lost: Arc<LostPaths>,
    publishing: Publishing,
    metrics: Arc<Metrics>,
    mut drain: tokio::sync::oneshot::Receiver<()>,
) {
    let Publishing { prefix, origin } = publishing;
    // The last tenant's headers: a run of publishes by one tenant hashes its tag once.
    let mut last: Option<(Tenant, async_nats::HeaderMap)> = None;
    let mut counter = 0u64;
    // What the NATS client may still hold: published, not yet known written to its socket.
    let mut unflushed: Vec<Share<Tenant>> = Vec::new();
    let mut unflushed_bytes = 0u64;
    loop {
        // Queued envelopes first: `drain` is taken only once the queue is empty.
        let f = tokio::select! {
            biased;
            f = rx.recv() => f,
            // Drops while the queue is empty (its bytes still held by a flush): told now.
            _ = lost.added.notified() => {
                counter = tell_lost(&client, &lost, &prefix, origin, counter).await;
                continue;
            }
            _ = &mut drain => None,
        };
        let Some(mut f) = f else {
            tell_lost(&client, &lost, &prefix, origin, counter).await;
            // Whatever the NATS client still buffers goes out before the process exits —
            // and reaches the server: a flush only hands it to the socket, whose unsent
            // bytes a reset at exit would discard. A request nobody answers comes back
            // ("no responders") only after the server has read every publish before it.
            if let Err(e) = client.flush().await {
                tracing::warn!(error = %e, "cluster: flushing the forward queue to NATS failed");
            }
            // Inside the relays' subjects (NATS permissions), never a path (not 32 hex).
            let probe = format!("{prefix}.drained.{origin:016x}");
            match client.request(probe, Bytes::new()).await {
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: the forward queue's last publishes may not have reached NATS");
                }
            }
            return;
        };
        counter += 1;
        let subject = path_subject(&prefix, &f.envelope.token_path());
        let payload = encode(origin, counter, &f);
        // Waits only while the NATS client's own buffer is full (reconnecting); the router
        // never waits: its offers fail and are counted meanwhile.
        let headers = match &last {
            Some((t, h)) if *t == f.tenant => h.clone(),
            _ => {
                let h = tenant_headers(&f.tenant);
                last = Some((f.tenant.clone(), h.clone()));
                h
            }
        };
        let sent = client.publish_with_headers(subject, headers, payload).await;
        match sent {
            Ok(()) => {
                metrics.cluster.forwarded.fetch_add(1, Relaxed);
            }
            Err(e) => {
                metrics.cluster.forward_dropped.fetch_add(1, Relaxed);
                lost.add(f.envelope.token_path(), &f.tenant);
                tracing::debug!(error = %e, "cluster: publish to NATS failed");
            }
        }
        // An envelope's bytes stay in `cluster.queue_bytes` until a flush says the client
        // has written it: the client's own buffer (2,048 publishes of any size) is memory
        // too, and fills whenever NATS is slow or away. A flush after each burst (and
        // every `FLUSH_BYTES` within one) gives them back; meanwhile the router's offers
        // beyond the bound are dropped and counted.
        unflushed_bytes += f.envelope.as_bytes().len() as u64;
        unflushed.extend(f.held.take());
        if rx.is_empty() || unflushed_bytes >= FLUSH_BYTES {
            if let Err(e) = client.flush().await {
                tracing::debug!(error = %e, "cluster: flushing to NATS failed");
            }
            unflushed.clear();
            unflushed_bytes = 0;
            // Caught up (or a burst's worth written): what the queue dropped meanwhile is
            // told after the envelopes that were queued before it.
            counter = tell_lost(&client, &lost, &prefix, origin, counter).await;
        }
    }
}

/// Publishes a loss notice per path with forward drops since the last call, on the path's
/// subject, so the relays with subscribers to it report the count in their `Gap`s: a QoS 0
/// message this relay could not forward is visible to whom it was lost, as when it is
/// dropped on the receiving side; and one per key id recorded instead (a tenant past its
/// share of path records), on `<prefix>.lost`, told to every subscriber of the key id.
/// Returns the counter after the notices (they share the envelopes' counter, so the
/// receivers' duplicate window covers them).
async fn tell_lost(
    client: &async_nats::Client,
    lost: &LostPaths,
    prefix: &str,
    origin: u64,
    mut counter: u64,
) -> u64 {
    let (paths, keys) = lost.take();
    for (path, count) in paths {
        counter += 1;
        let payload = encode_lost(origin, counter, count, &path);
        if let Err(e) = client.publish(path_subject(prefix, &path), payload).await {
            tracing::debug!(error = %e, "cluster: a loss notice could not be published");
        }
    }
    for (key, count) in keys {
        counter += 1;
        let payload = encode_lost_key(origin, counter, count, &key);
        if let Err(e) = client.publish(lost_subject(prefix), payload).await {
            tracing::debug!(error = %e, "cluster: a loss notice could not be published");
        }
    }
    counter
}

/// The subject of key-wide loss notices, which every relay subscribes: inside the relays'
/// subjects (NATS permissions), never a path (not 32 hex).
fn lost_subject(prefix: &str) -> String {
    format!("{prefix}.lost")
}

/// Distinct filters of one key id above which the interest keeper holds one NATS
/// subscription for the whole key id (`<prefix>.<key id>.>`) instead of one per filter:
/// NATS delivers an envelope once per matching subscription, and filters of one key id can
/// overlap without covering each other (`a/+/c` and `+/b/c`: 2^levels of them match one
/// path), so per-filter subscriptions let one client make every envelope on a path cross
/// to this relay thousands of times. The router matches exactly either way.
const KEY_WIDE_ABOVE: usize = 4;
/// A key id held key-wide goes back to per-filter subscriptions at or below this many
/// filters (apart from [`KEY_WIDE_ABOVE`], so a client moving around the line does not
/// make the keeper swap subscriptions at each change).
const PER_FILTER_AT: usize = 2;

/// Longest the interest keeper waits for NATS to confirm new subscriptions before it
/// releases those they replace ([`Keeper::settle`]; without `_INBOX.>` rights the answer
/// never comes).
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a NATS subscription is held for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Holder {
    /// One filter (its one or two subjects).
    Filter(TokenPattern),
    /// Every filter of a key id ([`KEY_WIDE_ABOVE`]).
    Key(KeyId),
    /// Key-wide loss notices (`<prefix>.lost`), held from the start.
    Notices,
}

/// What one batch of interest changes releases once its new subscriptions are settled.
#[derive(Default)]
struct Swap {
    /// A new subscription replaces a held one (a settle is needed before the release).
    replacing: bool,
    /// Released after the settle.
    release: Vec<Holder>,
}

/// The NATS side of a [`Holder`]: its readers and the client's ids of its subscriptions.
#[derive(Default)]
struct HeldSubs {
    /// Dropped to release: each reader then unsubscribes and routes what its subscription
    /// already holds (see [`Keeper::hold`]).
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Closed when each reader has ended (the subscriptions replacing these wait for it).
    done: Vec<tokio::sync::watch::Receiver<()>>,
    sids: Vec<u64>,
}

/// The interest keeper: the local filters by key id, and the NATS subscriptions held for
/// them (per filter, or per key id past [`KEY_WIDE_ABOVE`]).
struct Keeper {
    client: async_nats::Client,
    prefix: String,
    inbound: mpsc::Sender<Received>,
    received: Arc<FairLimit<Tenant>>,
    shared: Arc<Shared>,
    /// Filters local subscriptions hold, by key id.
    wanted: HashMap<KeyId, std::collections::HashSet<TokenPattern>>,
    /// Per-filter subscriptions held, by key id.
    per_filter: HashMap<KeyId, std::collections::HashSet<TokenPattern>>,
    subs: HashMap<Holder, HeldSubs>,
    holder_of: HashMap<u64, Holder>,
    readers: JoinSet<()>,
}

impl Keeper {
    /// Applies a batch of filter changes, then brings each key id it touched to the
    /// subscriptions it needs. A new subscription is always made before the one it
    /// replaces is dropped (both go to NATS in order on one connection, and on to the
    /// other servers in that order), so a swap loses nothing; the copies both deliver
    /// meanwhile are dropped as duplicates. The whole batch is one swap: every new
    /// subscription first, then one [`settle`](Self::settle) (only when something new
    /// replaces something held), then every release — a tenant cycling thousands of key
    /// ids across the thresholds costs one round trip per batch, not one per key id, and
    /// holds up nobody else's subscriptions for long.
    async fn apply(&mut self, changes: Vec<Interest>) {
        while self.readers.try_join_next().is_some() {}
        let mut touched = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for change in changes {
            let (p, add) = match change {
                Interest::Add(p) => (p, true),
                Interest::Remove(p) => (p, false),
            };
            let k = *p.key_id();
            let w = self.wanted.entry(k).or_default();
            if add {
                w.insert(p);
            } else {
                w.remove(&p);
            }
            if seen.insert(k) {
                touched.push(k);
            }
        }
        let mut swap = Swap::default();
        for k in touched {
            self.reconcile(k, &mut swap).await;
        }
        if swap.replacing {
            self.settle().await;
        }
        for h in swap.release {
            self.release(&h);
        }
    }

    /// Subscribes what key id `k` newly needs and records in `swap` what it no longer
    /// needs (released by [`apply`](Self::apply) after the batch's settle).
    async fn reconcile(&mut self, k: KeyId, swap: &mut Swap) {
        let n = self.wanted.get(&k).map_or(0, |w| w.len());
        let key_wide = self.subs.contains_key(&Holder::Key(k));
        if n > KEY_WIDE_ABOVE || (key_wide && n > PER_FILTER_AT) {
            let replaced: Vec<Holder> = self
                .per_filter
                .remove(&k)
                .unwrap_or_default()
                .into_iter()
                .map(Holder::Filter)
                .collect();
            if !key_wide {
                let after = self.done_of(&replaced);
                let subject = format!("{}.{k}.>", self.prefix);
                self.hold(Holder::Key(k), vec![subject], after).await;
                swap.replacing |= !replaced.is_empty();
            }
            swap.release.extend(replaced);
            return;
        }
        let wanted = self.wanted.get(&k).cloned().unwrap_or_default();
        let after = self.done_of(&[Holder::Key(k)]);
        for p in &wanted {
            if !self.per_filter.get(&k).is_some_and(|h| h.contains(p)) {
                let subjects = pattern_subjects(&self.prefix, p);
                self.hold(Holder::Filter(p.clone()), subjects, after.clone())
                    .await;
                self.per_filter.entry(k).or_default().insert(p.clone());
                // Replacing the key-wide subscription (a drop to no filter replaces it
                // with nothing: no settle for it).
                swap.replacing |= key_wide;
            }
        }
        if key_wide {
            swap.release.push(Holder::Key(k));
        }
        let gone: Vec<TokenPattern> = self
            .per_filter
            .get(&k)
            .map(|h| h.difference(&wanted).cloned().collect())
            .unwrap_or_default();
        for p in gone {
            if let Some(h) = self.per_filter.get_mut(&k) {
                h.remove(&p);
            }
            swap.release.push(Holder::Filter(p));
        }
        if self.per_filter.get(&k).is_some_and(|h| h.is_empty()) {
            self.per_filter.remove(&k);
        }
        if wanted.is_empty() {
            self.wanted.remove(&k);
        }
    }

    /// The end signals of the readers of `holders` (those a new subscription replaces).
    fn done_of(&self, holders: &[Holder]) -> Vec<tokio::sync::watch::Receiver<()>> {
        holders
            .iter()
            .filter_map(|h| self.subs.get(h))
            .flat_map(|h| h.done.iter().cloned())
            .collect()
    }

    /// Waits until the NATS server has handled the subscriptions just made, before those
    /// they replace are released: a request on a subject nobody subscribes comes back ("no
    /// responders") after everything the server sent this client before it — so what it
    /// sent before it handled the new subscriptions, which reached only the old ones, is in
    /// their buffers by then, and everything after reaches the new ones too. (A flush only
    /// hands the subscribe to the socket; async-nats's `drain` ends a subscription at the
    /// first pong, which may answer an earlier ping.)
    async fn settle(&self) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return; // nothing flows meanwhile; the reconnection is told (`tell_reconnected`)
        }
        // Inside the relays' subjects (NATS permissions), never a path (not 32 hex).
        let probe = format!("{}.settled", self.prefix);
        let c = &self.shared.metrics.cluster;
        c.settles.fetch_add(1, Relaxed);
        // Twice: the server matches a message from another server (its route's task)
        // before it hands it to this client's buffer, so one matched for the old
        // subscriptions just before the new were added can follow the first answer (and
        // is then dropped by the client once the old subscription is released: a lost
        // envelope, about 1 swap test run in 150). The second request leaves after the
        // first answer came back, a whole round trip later.
        let asked = async {
            let first = self.client.request(probe.clone(), Bytes::new()).await;
            match first {
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            self.client.request(probe, Bytes::new()).await
        };
        let failed = match tokio::time::timeout(SETTLE_TIMEOUT, asked).await {
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => return,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {SETTLE_TIMEOUT:?}"),
        };
        c.settles_unconfirmed.fetch_add(1, Relaxed);
        tracing::debug!(error = %failed, "cluster: new NATS subscriptions not confirmed");
        // Once per process: the usual cause (no permission to subscribe `_INBOX.>`) holds
        // for every later swap; whispeer_relay_cluster_settle_unconfirmed_total counts them.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                error = %failed,
                "cluster: NATS did not confirm new subscriptions (request on {}.settled; \
                 does this relay's NATS user lack permission to subscribe _INBOX.>?): \
                 subscription swaps wait {SETTLE_TIMEOUT:?} each and may lose envelopes",
                self.prefix
            )
        });
    }

    /// Subscribes `subjects` on NATS for `holder`, each with a reader moving what arrives
    /// into the receive queue — once the readers of `after` (the subscriptions this one
    /// replaces) have ended, so envelopes keep their order across the swap.
    async fn hold(
        &mut self,
        holder: Holder,
        subjects: Vec<String>,
        after: Vec<tokio::sync::watch::Receiver<()>>,
    ) {
        let metrics = self.shared.metrics.clone();
        let mut held = HeldSubs::default();
        // The gauge counts subscriptions held for local filters (not the loss notices').
        let gauged = holder != Holder::Notices;
        for subject in subjects {
            let mut sub = match self.client.subscribe(subject).await {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: NATS subscribe failed");
                    continue;
                }
            };
            if gauged {
                metrics.cluster.subscriptions.fetch_add(1, Relaxed);
            }
            match subscription_id(&sub) {
                Some(sid) => {
                    self.holder_of.insert(sid, holder.clone());
                    held.sids.push(sid);
                }
                None => {
                    // Once per process: the cause (an async-nats that formats its
                    // subscriber differently) holds for all.
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(
                            "cluster: NATS subscription ids are unknown; \
                             slow-consumer drops are counted, not reported"
                        )
                    });
                }
            }
            let tx = self.inbound.clone();
            let m = metrics.clone();
            let limit = self.received.clone();
            let shared = self.shared.clone();
            let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
            held.stops.push(stop_tx);
            let (done_tx, done_rx) = tokio::sync::watch::channel(());
            held.done.push(done_rx);
            let mut after = after.clone();
            self.readers.spawn(async move {
                // Dropping `sub` (on abort, at shutdown) unsubscribes on NATS.
                let _gauge = gauged.then(|| Gauge(m.clone()));
                // Told (closed) when this reader ends, however.
                let _done = done_tx;
                // The replaced subscriptions' readers first: what they hold is older.
                for a in &mut after {
                    while a.changed().await.is_ok() {}
                }
                // A dropped envelope is reported to the connections it was for, in a `Gap`.
                let lost = |payload: &Bytes| {
                    if let Some(d) = decode(payload.clone()) {
                        match d.missed() {
                            Missed::Path(path, n) => shared.router.lost_remote(&path, n),
                            Missed::Key(key, n) => shared.router.lost_key(&key, n),
                        }
                    }
                };
                // Unconstrained: a reader takes everything buffered each time it runs (a
                // few nanoseconds each: a byte count and a `try_send`), rather than 128 per
                // turn against the NATS connection task's thousands; on a busy machine the
                // budget made the client's buffer overflow (found by
                // `graceful_shutdown_drains_the_forward_queue`).
                tokio::task::unconstrained(async {
                    loop {
                        tokio::select! {
                            biased;
                            msg = sub.next() => {
                                let Some(msg) = msg else { return };
                                if !receive(&tx, &limit, &m, msg, &lost) {
                                    return;
                                }
                            }
                            _ = &mut stop => break,
                        }
                    }
                    // Released (after `Keeper::settle` when replaced): what the client holds
                    // for it is routed still; the channel ends there.
                    let _ = sub.unsubscribe().await;
                    while let Some(msg) = sub.next().await {
                        if !receive(&tx, &limit, &m, msg, &lost) {
                            return;
                        }
                    }
                })
                .await;
            });
        }
        self.subs.insert(holder, held);
    }

    /// Drops `holder`'s NATS subscriptions (each reader routes what it already holds).
    fn release(&mut self, holder: &Holder) {
        let held = self.subs.remove(holder).unwrap_or_default();
        for sid in held.sids {
            self.holder_of.remove(&sid);
        }
    }

    /// The filters a NATS subscription's drops concern: its own, or every filter of its
    /// key id.
    fn filters_of_sid(&self, sid: u64) -> Vec<TokenPattern> {
        match self.holder_of.get(&sid) {
            Some(Holder::Filter(p)) => vec![p.clone()],
            Some(Holder::Key(k)) => self
                .wanted
                .get(k)
                .map(|w| w.iter().cloned().collect())
                .unwrap_or_default(),
            // Dropped loss notices: whose they were is unknown (counted only).
            Some(Holder::Notices) | None => Vec::new(),
        }
    }

    /// Every filter held for local subscriptions.
    fn all_filters(&self) -> impl Iterator<Item = &TokenPattern> {
        self.wanted.values().flatten()
    }
}

#[allow(clippy::too_many_arguments)]
async fn interest_loop(
    client: async_nats::Client,
    interest: Arc<InterestSet>,
    slow: Arc<SlowSubscriptions>,
    connected: Arc<tokio::sync::Notify>,
    prefix: String,
    inbound: mpsc::Sender<Received>,
    received: Arc<FairLimit<Tenant>>,
    shared: Arc<Shared>,
) {
    // Connections made so far (the client's own count: its `Connected` events can be
    // dropped when its event channel is full, so they only wake this, with a slow check
    // beside them).
    let stats = client.statistics();
    let mut connects = stats.connects.load(Relaxed);
    let mut recheck = tokio::time::interval(RECONNECT_CHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keeper = Keeper {
        client,
        prefix,
        inbound,
        received,
        shared: shared.clone(),
        wanted: HashMap::new(),
        per_filter: HashMap::new(),
        subs: HashMap::new(),
        holder_of: HashMap::new(),
        readers: JoinSet::new(),
    };
    let notices = lost_subject(&keeper.prefix);
    keeper
        .hold(Holder::Notices, vec![notices], Vec::new())
        .await;
    loop {
        tokio::select! {
            // (`notify_one` keeps a permit: a change recorded since `take` wakes this.)
            _ = interest.changed.notified() => keeper.apply(interest.take()).await,
            // Envelopes the NATS client dropped (`SlowConsumer`): their paths are
            // unknown, so every connection subscribed with a filter that subscription
            // served hears of them in a `Gap`.
            _ = slow.added.notified() => {
                for (sid, n) in slow.take() {
                    for pattern in keeper.filters_of_sid(sid) {
                        shared.router.lost_filter(&pattern, n);
                    }
                }
            }
            // A reconnection: while disconnected this relay had no NATS subscriptions,
            // so what other relays published for its subscribers meanwhile is lost (the
            // client subscribes again on its own). How much is unknown: every connection
            // with a filter held here hears of at least one in a `Gap`.
            _ = connected.notified() => {
                tell_reconnected(&stats, &mut connects, keeper.all_filters(), &shared)
            }
            _ = recheck.tick() => {
                tell_reconnected(&stats, &mut connects, keeper.all_filters(), &shared)
            }
        }
    }
}

/// How often the interest keeper checks the NATS client's connection count besides its
/// `Connected` events (which the client drops when its event channel is full).
const RECONNECT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Tells every connection subscribed with one of `filters` of a loss (count unknown: one)
/// when the NATS client connected again since `connects` (not at its first connection).
fn tell_reconnected<'a>(
    stats: &async_nats::Statistics,
    connects: &mut u64,
    filters: impl Iterator<Item = &'a TokenPattern>,
    shared: &Shared,
) {
    let now = stats.connects.load(Relaxed);
    if now <= *connects {
        return;
    }
    let again = *connects > 0;
    *connects = now;
    if again {
        tracing::info!("cluster: reconnected to NATS; remote traffic meanwhile reported lost");
        for pattern in filters {
            shared.router.lost_filter(pattern, 1);
        }
    }
}

/// The NATS client's id of a subscription (what its `SlowConsumer` events name). async-nats
/// 0.51 keeps it private and shows it only in `Debug` (`Subscriber { sid: 7, … }`); the unit
/// test `a_subscription_id_is_read_from_the_subscriber` and the integration test
/// `cluster::drops_in_the_nats_client_are_reported_in_a_gap` fail if that changes.
fn subscription_id(sub: &async_nats::Subscriber) -> Option<u64> {
    let debug = format!("{sub:?}");
    let rest = debug.strip_prefix("Subscriber { sid: ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// An envelope from NATS waiting to be routed; it counts in `cluster.receive_bytes` (and
/// the count bound), in the share of the tenant its header names.
pub(crate) struct Received {
    msg: async_nats::Message,
    tenant: Tenant,
    _held: Share<Tenant>,
}

/// Queues `msg` for routing without waiting: beyond the receive bounds (bytes or count) it
/// is dropped, counted and handed to `lost` (which tells its subscribers) — the reader never
/// leaves it in the NATS client's buffer, where `cluster.subscription_capacity` messages of
/// any size per subscription would wait. The bounds are shared fairly among the tenants
/// the envelopes' `Wsp-Tenant` headers name (forwards without one share one part): one
/// tenant's burst from another relay is dropped beyond its share, not every other
/// tenant's envelopes with it. `false` once routing has ended.
fn receive(
    tx: &mpsc::Sender<Received>,
    limit: &Arc<FairLimit<Tenant>>,
    metrics: &Metrics,
    msg: async_nats::Message,
    lost: &dyn Fn(&Bytes),
) -> bool {
    let dropped = |payload: &Bytes| {
        metrics.cluster.receive_dropped.fetch_add(1, Relaxed);
        tracing::debug!("cluster: receive queue full, an envelope from NATS dropped");
        lost(payload);
    };
    let tenant = origin_tenant(msg.headers.as_ref());
    let Some(held) = limit.take(&tenant, msg.payload.len() as u64) else {
        dropped(&msg.payload);
        return true;
    };
    let r = Received {
        msg,
        tenant,
        _held: held,
    };
    match tx.try_send(r) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(r)) => {
            dropped(&r.msg.payload);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Decrements the subscription gauge when a reader ends (aborted or finished).
struct Gauge(Arc<Metrics>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.cluster.subscriptions.fetch_sub(1, Relaxed);
    }
}

async fn receive_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Received>, origin: u64) {
    let metrics = shared.metrics.clone();
    let c = &metrics.cluster;
    let mut seen = Dedup::default();
    // Each envelope's bytes leave the receive bound once routed (end of the iteration).
    while let Some(r) = rx.recv().await {
        let Some(d) = decode(r.msg.payload.clone()) else {
            c.receive_dropped.fetch_add(1, Relaxed);
            continue;
        };
        // `no_echo` keeps our own publishes away; this is the second line of defence.
        let seen_as = if d.origin == origin {
            Seen::Again
        } else {
            seen.first(d.origin, d.counter)
        };
        // Too old to tell: a plain envelope goes on (never lost; clients deduplicate),
        // a retained value or a loss notice does not (see `Dedup`).
        let late_ok = matches!(
            d.what,
            Carried::Envelope { flags, .. }
                if flags & whispeer_protocol::frame::pub_flags::RETAIN == 0
        );
        if seen_as == Seen::Again || (seen_as == Seen::Late && !late_ok) {
            c.duplicates.fetch_add(1, Relaxed);
            tracing::debug!(counter = d.counter, "cluster duplicate dropped");
            continue;
        }
        let (flags, qos, envelope) = match d.what {
            Carried::Envelope {
                flags,
                qos,
                envelope,
            } => (flags, qos, envelope),
            Carried::Lost { count, path } => {
                // Another relay's forward queue dropped `count` publishes to this path.
                c.lost_notices.fetch_add(1, Relaxed);
                shared.router.lost_remote(&path, count);
                continue;
            }
            Carried::LostKey { count, key } => {
                // … to paths of this key id (its tenant was past its share of records).
                c.lost_notices.fetch_add(1, Relaxed);
                shared.router.lost_key(&key, count);
                continue;
            }
        };
        let path = envelope.token_path();
        // Charged here to the tenant that published it at its relay.
        match shared
            .router
            .publish_remote(&envelope, &path, flags, qos, &r.tenant)
        {
            Ok(_) => {
                c.received.fetch_add(1, Relaxed);
            }
            Err(e) => {
                // Refused by this relay's store (a quota, a full disk): its subscribers
                // here miss it — told in a `Gap`, as at the receive bound.
                c.receive_dropped.fetch_add(1, Relaxed);
                shared.router.lost_remote(&path, 1);
                tracing::debug!(error = %e, "cluster: an envelope from NATS was not routed");
            }
        }
    }
}

/// `<prefix>.<key id hex>.<token hex>…`
pub fn path_subject(prefix: &str, path: &TokenPath) -> String {
    let mut s = String::with_capacity(prefix.len() + 33 * (1 + path.tokens().len()));
    s.push_str(prefix);
    s.push('.');
    s.push_str(&path.key_id().to_string());
    for t in path.tokens() {
        s.push('.');
        s.push_str(&t.to_string());
    }
    s
}

/// The NATS subjects covering a filter: one, or two for `…/x/#` (`x.>` and `x`).
pub fn pattern_subjects(prefix: &str, pattern: &TokenPattern) -> Vec<String> {
    let mut base = format!("{prefix}.{}", pattern.key_id());
    let elems = pattern.elems();
    for e in elems {
        match e {
            PatternElem::Token(t) => {
                base.push('.');
                base.push_str(&t.to_string());
            }
            PatternElem::One => base.push_str(".*"),
            PatternElem::Rest => {}
        }
    }
    if elems.last() == Some(&PatternElem::Rest) {
        let rest = format!("{base}.>");
        // `k/#` alone: a path has at least one level, so the bare key id never occurs.
        if elems.len() > 1 {
            vec![rest, base]
        } else {
            vec![rest]
        }
    } else {
        vec![base]
    }
}

fn encode(origin: u64, counter: u64, f: &Forward) -> Bytes {
    let env = f.envelope.as_bytes();
    let mut b = BytesMut::with_capacity(HEADER_LEN + env.len());
    b.put_u8(VERSION);
    b.put_u64(origin);
    b.put_u64(counter);
    b.put_u64(f.flags);
    b.put_u8(f.qos as u8);
    b.extend_from_slice(env);
    b.freeze()
}

fn encode_lost(origin: u64, counter: u64, count: u64, path: &TokenPath) -> Bytes {
    let mut b = BytesMut::with_capacity(LOST_HEADER_LEN + 16 * (1 + path.tokens().len()));
    b.put_u8(LOST);
    b.put_u64(origin);
    b.put_u64(counter);
    b.put_u64(count);
    b.extend_from_slice(path.key_id().as_bytes());
    for t in path.tokens() {
        b.extend_from_slice(t.as_bytes());
    }
    b.freeze()
}

fn encode_lost_key(origin: u64, counter: u64, count: u64, key: &KeyId) -> Bytes {
    let mut b = BytesMut::with_capacity(LOST_HEADER_LEN + 16);
    b.put_u8(LOST_KEY);
    b.put_u64(origin);
    b.put_u64(counter);
    b.put_u64(count);
    b.extend_from_slice(key.as_bytes());
    b.freeze()
}

struct Decoded {
    origin: u64,
    counter: u64,
    what: Carried,
}

/// Whom a dropped bridge message concerned, and how many messages they miss.
#[derive(Debug, PartialEq, Eq)]
enum Missed {
    /// The subscribers of this path.
    Path(TokenPath, u64),
    /// Every subscriber of this key id.
    Key(KeyId, u64),
}

/// What a bridge message carries.
enum Carried {
    /// A publish another relay accepted.
    Envelope {
        flags: u64,
        qos: Qos,
        envelope: Envelope,
    },
    /// `count` publishes to `path` that another relay could not forward.
    Lost { count: u64, path: TokenPath },
    /// `count` publishes to paths of `key` that another relay could not forward.
    LostKey { count: u64, key: KeyId },
}

impl Decoded {
    /// Whom it concerns and how many messages they miss if it is dropped here (an
    /// envelope: itself; a loss notice: its count).
    fn missed(&self) -> Missed {
        match &self.what {
            Carried::Envelope { envelope, .. } => Missed::Path(envelope.token_path(), 1),
            Carried::Lost { count, path } => Missed::Path(path.clone(), *count),
            Carried::LostKey { count, key } => Missed::Key(*key, *count),
        }
    }
}

fn decode(payload: Bytes) -> Option<Decoded> {
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(payload.get(i..i + 8)?);
        Some(u64::from_be_bytes(a))
    };
    let what = match *payload.first()? {
        VERSION if payload.len() >= HEADER_LEN => Carried::Envelope {
            flags: u64_at(17)?,
            qos: Qos::from_u64(u64::from(payload[25]))?,
            envelope: Envelope::from_bytes(payload.slice(HEADER_LEN..)).ok()?,
        },
        LOST => {
            let ids = payload.get(LOST_HEADER_LEN..)?;
            if ids.is_empty() || ids.len() % 16 != 0 {
                return None;
            }
            let mut ids = ids.chunks_exact(16);
            let key_id = KeyId::from_slice(ids.next()?).ok()?;
            let tokens = ids
                .map(TopicToken::from_slice)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            Carried::Lost {
                count: u64_at(17)?,
                path: TokenPath::new(key_id, tokens).ok()?,
            }
        }
        LOST_KEY if payload.len() == LOST_HEADER_LEN + 16 => Carried::LostKey {
            count: u64_at(17)?,
            key: KeyId::from_slice(&payload[LOST_HEADER_LEN..]).ok()?,
        },
        _ => return None,
    };
    Some(Decoded {
        origin: u64_at(1)?,
        counter: u64_at(9)?,
        what,
    })
}

/// Which counters of each origin were already routed: a bitmap of the last [`WINDOW`]
/// counters below the highest seen. Copies of one envelope arrive close together (NATS
/// writes them back to back on one connection), but each NATS subscription has its own
/// reader task, so one reader descheduled while another runs far ahead can bring a
/// *first* copy older than the window ([`Seen::Late`]). A plain envelope that late is let
/// through: a second copy would reach clients twice, and their dedup drops it (message
/// ids), while dropping a first copy would lose it for good. A late retained value or
/// loss notice is dropped: a stale retained copy would replace a newer value at this
/// relay, a repeated notice would count a loss twice.
#[derive(Default)]
struct Dedup {
    origins: HashMap<u64, Window>,
    tick: u64,
}

/// What the window says of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    First,
    Again,
    /// Older than the window: not known either way.
    Late,
}

struct Window {
    max: u64,
    bits: Vec<u64>,
    used: u64,
}

impl Dedup {
    /// Whether `(origin, counter)` is seen for the first time.
    fn first(&mut self, origin: u64, counter: u64) -> Seen {
        self.tick += 1;
        if !self.origins.contains_key(&origin) && self.origins.len() >= MAX_ORIGINS {
            // Forget the origin unused longest (a relay that restarted or left).
            if let Some(old) = self
                .origins
                .iter()
                .min_by_key(|(_, w)| w.used)
                .map(|(k, _)| *k)
            {
                self.origins.remove(&old);
            }
        }
        let w = self.origins.entry(origin).or_insert_with(|| Window {
            max: 0,
            bits: vec![0; (WINDOW / 64) as usize],
            used: 0,
        });
        w.used = self.tick;
        w.first(counter)
    }
}

impl Window {
    fn bit(n: u64) -> (usize, u64) {
        let i = n % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn first(&mut self, n: u64) -> Seen {
        if n > self.max {
            if n - self.max >= WINDOW {
                self.bits.iter_mut().for_each(|b| *b = 0);
            } else {
                for k in self.max + 1..n {
                    let (i, m) = Self::bit(k);
                    self.bits[i] &= !m;
                }
            }
            self.max = n;
            let (i, m) = Self::bit(n);
            self.bits[i] |= m;
            return Seen::First;
        }
        if self.max - n >= WINDOW {
            return Seen::Late;
        }
        let (i, m) = Self::bit(n);
        let fresh = self.bits[i] & m == 0;
        self.bits[i] |= m;
        if fresh {
            Seen::First
        } else {
            Seen::Again
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whispeer_protocol::{KeyId, TopicToken};

    fn k() -> KeyId {
        KeyId::from_bytes([0xab; 16])
    }
    fn t(b: u8) -> TopicToken {
        TopicToken::from_bytes([b; 16])
    }

    /// Subscription changes are coalesced per filter: while the interest keeper is stuck
    /// (NATS down, its subscribe waiting), a client subscribing and unsubscribing new
    /// filters in a loop leaves nothing behind — a queue of changes grew by two per round —
    /// and the keeper then sees exactly what differs from what it holds.
    #[test]
    fn interest_changes_are_coalesced_and_bounded_by_what_is_wanted_or_held() {
        let set = InterestSet::default();
        let f = |i: u32| {
            let b = i.to_be_bytes();
            let mut tok = [0u8; 16];
            tok[..4].copy_from_slice(&b);
            TokenPattern::new(k(), vec![PatternElem::Token(TopicToken::from_bytes(tok))]).unwrap()
        };
        // Churn of 100,000 distinct filters the keeper never took on.
        for i in 0..100_000 {
            set.record(Interest::Add(f(i)));
            set.record(Interest::Remove(f(i)));
        }
        assert_eq!(set.len(), 0, "churned filters are not kept");
        assert!(set.take().is_empty());

        // A wanted filter is taken on once; churn of it while held ends as one Remove.
        set.record(Interest::Add(f(1)));
        set.record(Interest::Add(f(2)));
        let mut first: Vec<_> = set.take().into_iter().map(|c| format!("{c:?}")).collect();
        first.sort();
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(first.iter().all(|c| c.starts_with("Add")), "{first:?}");
        assert!(set.take().is_empty(), "nothing changed since");
        for _ in 0..1000 {
            set.record(Interest::Remove(f(1)));
            set.record(Interest::Add(f(1)));
        }
        assert!(set.take().is_empty(), "wanted and held: nothing to do");
        set.record(Interest::Remove(f(1)));
        let second = set.take();
        assert!(
            matches!(&second[..], [Interest::Remove(p)] if *p == f(1)),
            "{second:?}"
        );
        assert_eq!(set.len(), 1, "only the filter still held");
    }

    /// The id async-nats gives each subscription (what its `SlowConsumer` events name) is
    /// read from the subscriber; no server is needed: the client queues the subscribes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_subscription_id_is_read_from_the_subscriber() {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .expect("a client that connects in the background");
        let a = client.subscribe("a").await.expect("queued");
        let b = client.subscribe("b").await.expect("queued");
        let ia = subscription_id(&a).expect("the id of a");
        let ib = subscription_id(&b).expect("the id of b");
        assert_eq!(ib, ia + 1, "ids are handed out in order: {a:?}");
    }

    fn nats_msg(len: usize) -> async_nats::Message {
        async_nats::Message {
            subject: "wsp.x".into(),
            reply: None,
            payload: Bytes::from(vec![0u8; len]),
            headers: None,
            status: None,
            description: None,
            length: len,
        }
    }

    /// What arrives from NATS waits for routing within the byte bound (and the count),
    /// never in the NATS client's buffer: beyond either it is dropped and counted.
    #[test]
    fn received_envelopes_are_bounded_in_bytes_and_count() {
        let metrics = Metrics::default();
        let dropped = || metrics.cluster.receive_dropped.load(Relaxed);
        let limit = FairLimit::new(3, 100);
        let (tx, mut rx) = mpsc::channel(6);
        assert!(receive(&tx, &limit, &metrics, nats_msg(60), &|_| {}));
        assert!(
            receive(&tx, &limit, &metrics, nats_msg(60), &|_| {}),
            "goes on"
        );
        let bytes = || limit.held().bytes;
        assert_eq!((dropped(), bytes()), (1, 60), "60 + 60 > 100: dropped");
        assert!(receive(&tx, &limit, &metrics, nats_msg(40), &|_| {}));
        assert_eq!(bytes(), 100);
        let first = rx.try_recv().expect("queued");
        drop(first);
        assert_eq!(bytes(), 40, "routed: its bytes are given back");
        // By count: 3 wait at most.
        for _ in 0..3 {
            assert!(receive(&tx, &limit, &metrics, nats_msg(1), &|_| {}));
        }
        assert_eq!(dropped(), 2, "the third small one found the count bound");
        assert_eq!(bytes(), 42, "a dropped one holds nothing");
        drop(rx);
        assert!(
            !receive(&tx, &limit, &metrics, nats_msg(1), &|_| {}),
            "routing ended"
        );
    }

    fn nats_msg_of(len: usize, tenant: u8) -> async_nats::Message {
        let mut m = nats_msg(len);
        m.headers = Some(tenant_headers(&Tenant::Remote([tenant; 16])));
        m
    }

    /// The receive bounds are shared among the tenants the envelopes' headers name: one
    /// tenant's burst fills them and is dropped beyond, another tenant's envelope is still
    /// queued (its share), and never past twice the bounds.
    #[test]
    fn the_receive_queue_is_shared_fairly_among_tenants() {
        let metrics = Metrics::default();
        let dropped = || metrics.cluster.receive_dropped.load(Relaxed);
        let limit = FairLimit::new(100, 1000);
        let (tx, mut rx) = mpsc::channel(200);
        for _ in 0..20 {
            receive(&tx, &limit, &metrics, nats_msg_of(100, 1), &|_| {});
        }
        assert_eq!(dropped(), 10, "a lone tenant gets the whole bound");
        for _ in 0..6 {
            receive(&tx, &limit, &metrics, nats_msg_of(100, 2), &|_| {});
        }
        assert_eq!(dropped(), 11, "another tenant gets its half");
        assert_eq!(limit.held().bytes, 1500);
        let mut by = HashMap::new();
        while let Ok(r) = rx.try_recv() {
            *by.entry(r.tenant.clone()).or_insert(0) += 1;
        }
        assert_eq!(by[&Tenant::Remote([1; 16])], 10);
        assert_eq!(by[&Tenant::Remote([2; 16])], 5);
        assert_eq!(limit.held().bytes, 0, "routed: given back");
    }

    /// Loss records are shared among the tenants with drops: a tenant past its share of
    /// path records is recorded by key id; another tenant's paths are still recorded.
    #[test]
    fn loss_records_keep_each_tenants_share() {
        let lost = LostPaths::default();
        let (flood, honest) = (Tenant::Remote([1; 16]), Tenant::Remote([2; 16]));
        let path_of = |k: u8, i: u32| {
            let mut key = [k; 16];
            key[..4].copy_from_slice(&i.to_be_bytes());
            TokenPath::new(KeyId::from_bytes(key), vec![t(1)]).unwrap()
        };
        // The flood: every path of one key id, then as many key ids.
        let flood_path = |i: u32| {
            TokenPath::new(
                k(),
                vec![
                    t(1),
                    TopicToken::from_bytes({
                        let mut b = [0u8; 16];
                        b[..4].copy_from_slice(&i.to_be_bytes());
                        b
                    }),
                ],
            )
            .unwrap()
        };
        for i in 0..(MAX_LOST_PATHS as u32 + 100) {
            lost.add(flood_path(i), &flood);
        }
        for i in 0..(MAX_LOST_KEYS as u32 + 100) {
            lost.add(path_of(9, i), &flood);
        }
        lost.add(path_of(7, 0), &honest);
        lost.add(path_of(7, 0), &honest);
        let (paths, keys) = lost.take();
        assert_eq!(
            paths.len(),
            MAX_LOST_PATHS + 1,
            "the flood's share, and the honest path"
        );
        assert_eq!(paths[&path_of(7, 0)], 2);
        assert_eq!(keys[&k()], 100, "the flood past its path share, by key id");
        assert_eq!(
            keys.len(),
            MAX_LOST_KEYS,
            "the flood's key records: all it may have"
        );
        assert_eq!(lost.take(), (HashMap::new(), HashMap::new()), "taken");
        // Past the paths, the honest tenant's drops are recorded by key id too.
        for i in 0..(MAX_LOST_PATHS as u32) {
            lost.add(flood_path(i), &flood);
        }
        for i in 0..(MAX_LOST_PATHS as u32 / 2 + 1) {
            lost.add(path_of(7, i), &honest);
        }
        let (paths, keys) = lost.take();
        assert_eq!(
            paths.len(),
            MAX_LOST_PATHS + MAX_LOST_PATHS / 2,
            "half each past the cap"
        );
        let honest_key = *path_of(7, MAX_LOST_PATHS as u32 / 2).key_id();
        assert_eq!(
            keys.get(&honest_key),
            Some(&1),
            "its one past its share, by key id"
        );
    }

    /// A key-wide loss notice carries its origin, counter, count and key id; cut or
    /// padded it is refused.
    #[test]
    fn key_wide_loss_notices_round_trip() {
        let b = encode_lost_key(9, 8, 41, &k());
        let d = decode(b.clone()).unwrap();
        assert_eq!((d.origin, d.counter), (9, 8));
        assert_eq!(d.missed(), Missed::Key(k(), 41));
        assert!(decode(b.slice(..b.len() - 1)).is_none());
        let mut long = b.to_vec();
        long.push(0);
        assert!(decode(Bytes::from(long)).is_none());
    }

    #[test]
    fn subjects_follow_the_mapping() {
        let kh = "ab".repeat(16);
        let th = |b: u8| format!("{b:02x}").repeat(16);
        let path = TokenPath::new(k(), vec![t(1), t(2)]).unwrap();
        assert_eq!(
            path_subject("wsp", &path),
            format!("wsp.{kh}.{}.{}", th(1), th(2))
        );
        let p = |e: Vec<PatternElem>| TokenPattern::new(k(), e).unwrap();
        use PatternElem::*;
        assert_eq!(
            pattern_subjects("wsp", &p(vec![Token(t(1)), One])),
            vec![format!("wsp.{kh}.{}.*", th(1))]
        );
        assert_eq!(
            pattern_subjects("wsp", &p(vec![Rest])),
            vec![format!("wsp.{kh}.>")]
        );
        assert_eq!(
            pattern_subjects("x.y", &p(vec![Token(t(1)), Rest])),
            vec![
                format!("x.y.{kh}.{}.>", th(1)),
                format!("x.y.{kh}.{}", th(1))
            ]
        );
    }

    #[test]
    fn dedup_lets_each_counter_through_once() {
        let mut d = Dedup::default();
        assert_eq!(d.first(1, 1), Seen::First);
        assert_eq!(d.first(1, 1), Seen::Again);
        assert_eq!(d.first(1, 3), Seen::First);
        assert_eq!(
            d.first(1, 2),
            Seen::First,
            "a later counter does not hide an earlier first copy"
        );
        assert_eq!(d.first(1, 2), Seen::Again);
        assert_eq!(d.first(2, 1), Seen::First, "origins are separate");
        assert_eq!(d.first(1, 3 + WINDOW), Seen::First);
        assert_eq!(
            d.first(1, 2),
            Seen::Late,
            "older than the window: unknown (a plain envelope goes on, see receive_loop)"
        );
        assert_eq!(d.first(1, 4 + WINDOW), Seen::First);
        assert_eq!(d.first(1, 4 + WINDOW), Seen::Again);
    }

    #[test]
    fn header_round_trips() {
        let path = TokenPath::new(k(), vec![t(1)]).unwrap();
        let mut raw = Vec::new();
        whispeer_protocol::envelope_header::HeaderFields {
            flags: 0,
            key_id: k(),
            nonce: [7; 24],
            commit: [8; 32],
            tokens: &[t(1)],
        }
        .write_prefix(48, &mut raw);
        raw.extend_from_slice(&[0x5a; 64]);
        let envelope = Envelope::from_bytes(Bytes::from(raw)).unwrap();
        let f = Forward {
            envelope: envelope.clone(),
            flags: 5,
            qos: Qos::AtLeastOnce,
            tenant: Tenant::Local,
            held: None,
        };
        let d = decode(encode(9, 7, &f)).unwrap();
        assert_eq!((d.origin, d.counter), (9, 7));
        assert_eq!(d.missed(), Missed::Path(path.clone(), 1));
        let Carried::Envelope {
            flags,
            qos,
            envelope: got,
        } = d.what
        else {
            panic!("an envelope");
        };
        assert_eq!((flags, qos), (5, Qos::AtLeastOnce));
        assert_eq!(got.as_bytes(), envelope.as_bytes());
        assert!(decode(Bytes::from_static(b"short")).is_none());
    }

    /// A forward names its tenant by the tag the JetStream store uses (header `Wsp-Tenant`);
    /// the receiving relay charges it to that tag, the same for every forward of one
    /// tenant and a different one for another tenant. Without the header (a relay from
    /// before it) or with a malformed one it is charged to the local tenant, as before.
    #[test]
    fn a_forward_is_charged_to_the_tenant_its_header_names() {
        let x = Tenant::Address("10.0.0.1".parse().unwrap());
        let y = Tenant::Address("10.0.0.2".parse().unwrap());
        let h = tenant_headers(&x);
        assert_eq!(
            h.get("Wsp-Tenant").map(|v| v.as_str().to_string()),
            Some(hex::encode(x.tag())),
            "the JetStream store's encoding"
        );
        let at_b = origin_tenant(Some(&h));
        assert_eq!(at_b, Tenant::Remote(x.tag()));
        assert_eq!(origin_tenant(Some(&tenant_headers(&x))), at_b);
        assert_ne!(origin_tenant(Some(&tenant_headers(&y))), at_b);
        assert_eq!(
            at_b.tag(),
            x.tag(),
            "a relay that forwards it again names the same tenant"
        );
        assert_ne!(at_b.key(), x.key(), "filed apart from local tenants");
        assert_ne!(at_b.key(), Tenant::Local.key());
        assert_eq!(
            origin_tenant(None),
            Tenant::Local,
            "an older relay's forward"
        );
        for bad in ["", "zz", &"ab".repeat(15), &"ab".repeat(17)] {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Wsp-Tenant", bad);
            assert_eq!(origin_tenant(Some(&h)), Tenant::Local, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever arrives on a bridge subject, decoding never panics (the payload kinds
        /// are picked often enough to reach both decoders).
        #[test]
        fn bridge_payloads_never_panic_the_decoder(
            mut b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            kind in 0u8..4,
        ) {
            if let Some(first) = b.first_mut() {
                *first = kind;
            }
            if let Some(d) = decode(Bytes::from(b)) {
                let _ = d.missed();
            }
        }
    }

    /// A loss notice carries its origin, counter, count and path; cut or padded it is
    /// refused (a malformed bridge message is dropped and counted, never routed).
    #[test]
    fn loss_notices_round_trip() {
        let path = TokenPath::new(k(), vec![t(1), t(2), t(3)]).unwrap();
        let b = encode_lost(9, 8, 41, &path);
        let d = decode(b.clone()).unwrap();
        assert_eq!((d.origin, d.counter), (9, 8));
        assert_eq!(d.missed(), Missed::Path(path, 41));
        for bad in [
            b.slice(..b.len() - 1),
            b.slice(..LOST_HEADER_LEN),
            b.slice(..20),
        ] {
            assert!(decode(bad).is_none());
        }
        let mut long = b.to_vec();
        long.extend_from_slice(&[0; 16 * whispeer_protocol::limits::MAX_LEVELS]);
        assert!(
            decode(Bytes::from(long)).is_none(),
            "more levels than a path has"
        );
    }
}
