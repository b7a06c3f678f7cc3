//! The relay as a whole: state shared by every connection, the builder, the listeners and
//! accept loops, the in-process handle, and the run loop with graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::StoreKind;
use crate::config::{Config, ListenAddr};
use crate::error::RelayError;
use crate::handshakes::{Admission, Gate, Handshakes, Ticket};
use crate::ids::{ConnId, TransportKind};
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::plugin::{LoggingPlugin, MetricsPlugin, Plugin, Plugins};
use crate::rate::{AccountRates, AddrSlot, AddrTable, Rates, Refusal};
use crate::router::Router;
use crate::store::{DurableKey, Store};
use crate::transport::channel::{ChannelSink, ChannelSource};
use crate::transport::frame_budget::FrameBudget;
use crate::transport::read_ahead::ReadAhead;
use crate::transport::stream::{StreamSink, StreamSource};
use crate::transport::ws_gate::{Follower, WsGate};
use crate::transport::{ws, FrameSink, FrameSource};
use crate::{admin, conn, tls};

/// Open connections, for the connection limit and for shutdown.
#[derive(Debug)]
pub(crate) struct Registry {
    conns: Mutex<Conns>,
    next: AtomicU64,
    empty: Notify,
    /// Connections not yet welcomed, oldest first (shared with the address table): when
    /// full, a newcomer evicts the oldest instead of being refused.
    handshakes: Arc<Handshakes>,
}

/// The registry's connections, and how many of them it refused (over the limit, closing).
#[derive(Debug, Default)]
struct Conns {
    map: HashMap<ConnId, Arc<Outbound>>,
    /// Entries of `map` refused at [`Registry::register`]: recorded until they have closed
    /// (for shutdown and status) but holding no place — never counted against
    /// `max_connections` nor the ceiling, never lingering (an evicted ticket's refused
    /// entry is not a place it held).
    refused: usize,
}

impl Conns {
    /// Places the registry admitted and still holds: counted ones and lingering ones
    /// (evicted, still closing), refused entries excluded.
    fn held(&self) -> usize {
        self.map.len() - self.refused
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn new(handshakes: Arc<Handshakes>) -> Self {
        Self {
            conns: Mutex::default(),
            next: AtomicU64::new(0),
            empty: Notify::new(),
            handshakes,
        }
    }

    /// Numbers a new connection and records it; `admitted` is false over the limit. At
    /// the limit a connection not yet welcomed may be evicted to make room (the fair-share
    /// victim past its grace, under the ceiling: see [`crate::handshakes`]); otherwise the
    /// newcomer is refused. `ticket`: the connection's, from its address slot (a new one
    /// otherwise, returned). A ticket already evicted (during its transport handshake)
    /// evicts no one: it is recorded, admitted, and closes as evicted. The limit and the
    /// ceiling count the places admitted (lingering ones included), not the connections
    /// refused here: those are recorded while they close but hold no place.
    pub(crate) fn register(
        &self,
        out: &Arc<Outbound>,
        max: usize,
        ticket: Option<Arc<Ticket>>,
    ) -> (ConnId, bool, Arc<Ticket>) {
        let id = ConnId(self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let ticket =
            ticket.unwrap_or_else(|| self.handshakes.ticket(None, std::time::Instant::now()));
        let mut conns = self.lock();
        let mut queues = self.handshakes.lock();
        let admitted = ticket.is_evicted()
            || match queues.admission(Gate::Registry, conns.held(), max, std::time::Instant::now())
            {
                Admission::Admit => true,
                Admission::Evict(victim) => {
                    queues.evict(&victim);
                    true
                }
                Admission::Refuse => false,
            };
        conns.map.insert(id, out.clone());
        if admitted {
            queues.enter(Gate::Registry, &ticket);
        } else {
            conns.refused += 1;
        }
        (id, admitted, ticket)
    }

    /// Removes the connection when the returned guard drops (also on abort). `admitted`:
    /// as [`Registry::register`] returned it.
    pub(crate) fn guard(
        self: &Arc<Self>,
        conn: ConnId,
        admitted: bool,
        ticket: Arc<Ticket>,
    ) -> Registration {
        Registration {
            registry: self.clone(),
            conn,
            admitted,
            ticket,
        }
    }

    fn remove(&self, conn: ConnId, admitted: bool, ticket: &Arc<Ticket>) {
        let mut conns = self.lock();
        self.handshakes.leave(Gate::Registry, ticket);
        if conns.map.remove(&conn).is_some() && !admitted {
            conns.refused -= 1;
        }
        if conns.is_empty() {
            self.empty.notify_waiters();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    async fn wait_empty(&self) {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// Deregisters a connection on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<Registry>,
    conn: ConnId,
    admitted: bool,
    ticket: Arc<Ticket>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(self.conn, self.admitted, &self.ticket);
    }
}

/// State every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) router: Router,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) plugins: Plugins,
    pub(crate) registry: Arc<Registry>,
    /// Connections not yet welcomed, oldest first (both gates' eviction queues).
    pub(crate) handshakes: Arc<Handshakes>,
    /// Permits of the refused TCP connections being told why at once
    /// ([`crate::handshakes::REFUSAL_ANSWERS`]).
    pub(crate) refusal_answers: Arc<tokio::sync::Semaphore>,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) addrs: BoundAddrs,
    /// Relay accounts, key-id claims and durable owners.
    pub(crate) accounts: Arc<crate::accounts::Accounts>,
    /// `auth.names` in canonical form: the names a relay-bound `Auth` may carry (empty:
    /// sign-ins are not bound).
    pub(crate) auth_names: Vec<String>,
    /// Durable subscription names currently held by a connection.
    pub(crate) active_durables: Mutex<std::collections::HashSet<DurableKey>>,
    /// Connections and handshakes per source address, and per-address rate buckets.
    pub(crate) addr_table: Arc<AddrTable>,
    /// Rate buckets per relay account.
    pub(crate) account_rates: AccountRates,
    /// The relay-wide budget of queued outbound message bytes.
    pub(crate) budget: Arc<crate::outbound::Budget>,
    /// Subscriptions held per tenant (`limits.tenant_max_subscriptions`).
    pub(crate) sub_quota: crate::sub_quota::SubQuota,
    /// The relay-wide budget of large frames being received (`None`: unlimited).
    pub(crate) frame_budget: Option<Arc<FrameBudget>>,
    /// The NATS bridge's status, in a cluster.
    pub(crate) cluster: Option<crate::cluster::State>,
    /// QUIC connections' send windows (`limits.quic_send_window_total`).
    pub(crate) quic_windows: Arc<crate::quic::SendWindows>,
    /// QUIC connections' receive windows (`limits.quic_receive_window_total`).
    pub(crate) quic_receive_windows: Arc<crate::quic::ReceiveWindows>,
}

impl Shared {
    /// Takes a durable name for one connection; false if another connection holds it.
    pub(crate) fn claim_durable(&self, key: &DurableKey) -> bool {
        self.active_durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
    }

    /// Gives a durable name back (and its cluster-wide hold, if the store took one).
    ///
    /// The store's hold is given back before the name (under the same lock): the next
    /// holder can claim the name only once this release reached the store, so its
    /// `hold_durable` always comes after, and the store never takes a held durable for
    /// idle (SQLite) nor drops the new holder's lease (JetStream) for a late release
    /// (review F1). `release_hold` does not block (no I/O waited on).
    pub(crate) fn release_durable(&self, key: &DurableKey) {
        let mut active = self
            .active_durables
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if active.contains(key) {
            self.router.store().release_hold(key);
            active.remove(key);
        }
    }
}

/// The addresses the relay listens on (the `--ready-file` JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundAddrs {
    /// Plain WebSocket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<SocketAddr>,
    /// Length-prefixed TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<SocketAddr>,
    /// WebSocket over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wss: Option<SocketAddr>,
    /// Length-prefixed TCP over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SocketAddr>,
    /// QUIC (UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<SocketAddr>,
    /// Admin HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

/// Bound (not yet accepting) listening sockets. Binding first lets port-0 addresses be
/// known before the relay runs.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Plain WebSocket.
    pub ws: Option<TcpListener>,
    /// Length-prefixed TCP.
    pub tcp: Option<TcpListener>,
    /// WebSocket over TLS.
    pub wss: Option<TcpListener>,
    /// Length-prefixed TCP over TLS.
    pub tls: Option<TcpListener>,
    /// QUIC: the bound UDP socket (the QUIC endpoint is made on it when the relay runs).
    pub quic: Option<std::net::UdpSocket>,
    /// Admin HTTP.
    pub admin: Option<TcpListener>,
}

/// The largest TCP segment the relay's listeners announce and send (`TCP_MAXSEG`, inherited
/// by every accepted connection). Real links (MTU 1500, jumbo 9000) stay below it, so there
/// it changes nothing; it matters on the loopback interface (MTU 65536, segments of 65,483
/// bytes), where a client on the same host that falls behind for a moment shrinks its
/// receive window below one segment. Linux then sends nothing until the persist timer fires
/// (sender-side silly-window avoidance), 200 ms later, and again each time it recurs:
/// measured with `whispeer bench` (1 KiB, TCP, unpaced, 100k messages), 4 of 10 runs
/// stalled 1-7 times for ~206 ms each (40-74k msg/s); with this cap, 0 of 10 (63-82k).
pub const LISTEN_MSS: u32 = 16 * 1024;

/// Pending connections the kernel queues for each listener before `accept` (the kernel
/// caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 1024;

/// A TCP listener with `SO_REUSEADDR` (as `TcpListener::bind`) and [`LISTEN_MSS`].
fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    // Best effort: a platform without TCP_MAXSEG keeps its default segment size.
    let _ = socket2::SockRef::from(&sock).set_tcp_mss(LISTEN_MSS);
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

impl Listeners {
    /// No sockets at all (an embedded relay used only in process).
    pub fn none() -> Self {
        Self::default()
    }

    /// Binds every listener the configuration turns on.
    pub async fn bind(config: &Config) -> Result<Self, RelayError> {
        fn one(name: &'static str, addr: ListenAddr) -> Result<Option<TcpListener>, RelayError> {
            match addr.0 {
                None => Ok(None),
                Some(a) => listen_tcp(a).map(Some).map_err(|source| RelayError::Bind {
                    listener: name,
                    addr: a,
                    source,
                }),
            }
        }
        let l = &config.listen;
        Ok(Self {
            ws: one("ws", l.ws)?,
            tcp: one("tcp", l.tcp)?,
            wss: one("wss", l.wss)?,
            tls: one("tls", l.tls)?,
            quic: match l.quic.0 {
                None => None,
                Some(a) => {
                    Some(
                        std::net::UdpSocket::bind(a).map_err(|source| RelayError::Bind {
                            listener: "quic",
                            addr: a,
                            source,
                        })?,
                    )
                }
            },
            admin: one("admin", l.admin)?,
        })
    }

    /// The bound addresses (with the ports the OS picked).
    pub fn addrs(&self) -> BoundAddrs {
        let a = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        BoundAddrs {
            ws: a(&self.ws),
            tcp: a(&self.tcp),
            wss: a(&self.wss),
            tls: a(&self.tls),
            quic: self.quic.as_ref().and_then(|u| u.local_addr().ok()),
            admin: a(&self.admin),
        }
    }
}

/// Configures a [`Relay`]: listeners, extra plugins, a store.
#[derive(Debug)]
pub struct RelayBuilder {
    config: Config,
    listeners: Listeners,
    plugins: Vec<Arc<dyn Plugin>>,
    store: Option<Arc<dyn Store>>,
}

impl RelayBuilder {
    /// Uses these bound listeners (default: none).
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// Adds a plugin after the built-in metrics and logging plugins.
    pub fn plugin(mut self, plugin: Arc<dyn Plugin>) -> Self {
        self.plugins.push(plugin);
        self
    }

    /// Uses this store (default: the one `config.store` describes; `memory` when it names
    /// no kind).
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Validates the configuration and loads TLS material.
    pub fn build(self) -> Result<Relay, RelayError> {
        self.config.validate()?;
        let tls = match (&self.config.tls.cert, &self.config.tls.key) {
            (Some(c), Some(k)) if self.listeners.wss.is_some() || self.listeners.tls.is_some() => {
                Some(tls::acceptor(c, k)?)
            }
            _ => None,
        };
        if tls.is_none() && (self.listeners.wss.is_some() || self.listeners.tls.is_some()) {
            return Err(RelayError::Config(crate::config::ConfigError::Invalid {
                field: "tls",
                reason: "a wss or tls listener needs tls.cert and tls.key".into(),
            }));
        }
        let quic = match (
            &self.config.tls.cert,
            &self.config.tls.key,
            &self.listeners.quic,
        ) {
            (_, _, None) => None,
            (Some(c), Some(k), Some(_)) => Some(tls::quic_server(
                c,
                k,
                self.config.timeouts.idle(),
                self.config.limits.max_connections,
            )?),
            _ => {
                return Err(RelayError::Config(crate::config::ConfigError::Invalid {
                    field: "tls",
                    reason: "a quic listener needs tls.cert and tls.key (QUIC is always TLS 1.3)"
                        .into(),
                }))
            }
        };
        let metrics = Arc::new(Metrics::new());
        let mut plugins = Plugins::new();
        plugins.push(Arc::new(MetricsPlugin::new(metrics.clone())));
        plugins.push(Arc::new(LoggingPlugin));
        for p in self.plugins {
            plugins.push(p);
        }
        let store = match self.store {
            Some(s) => s,
            None => crate::store::open(&self.config.store, StoreKind::Memory)
                .map_err(RelayError::Store)?,
        };
        let addrs = self.listeners.addrs();
        let handshakes = Arc::new(Handshakes::new(
            metrics.clone(),
            crate::handshakes::grace(self.config.timeouts.hello()),
        ));
        let l = &self.config.limits;
        let addr_table = Arc::new(
            AddrTable::new(
                Rates {
                    publish: (l.addr_publish_rate, l.addr_publish_burst),
                    sub: (l.addr_sub_rate, l.addr_sub_burst),
                    ack: (l.addr_ack_rate, l.addr_ack_burst),
                    store: (l.addr_store_rate, l.addr_store_burst),
                },
                (l.addr_connect_rate, l.addr_connect_burst),
                l.addr_ipv6_prefix,
                l.max_connections_per_addr,
                l.max_connections,
                std::time::Duration::from_secs(u64::from(l.addr_churn_ban_secs)),
            )
            .with_network_cap(
                l.max_connections_per_network,
                l.network_ipv4_prefix,
                l.network_ipv6_prefix,
            )
            .with_handshakes(handshakes.clone()),
        );

        // With the cluster's shared account list the file is not read: `run` installs the
        // list from JetStream before it accepts a connection.
        let mut auth = self.config.auth.clone();
        if self.config.cluster.shared_accounts {
            auth.accounts = None;
        }
        // In a cluster claims never lapse: the JetStream store's are the cluster's, and a
        // relay with a local store cannot tell whether other relays use a key id.
        if self.config.cluster.enabled() {
            auth.claim_idle_ms = 0;
        }
        let accounts =
            Arc::new(crate::accounts::Accounts::open(&auth).map_err(RelayError::Accounts)?);
        let account_rates = AccountRates::new(Rates {
            publish: (l.account_publish_rate, l.account_publish_burst),
            sub: (l.account_sub_rate, l.account_sub_burst),
            ack: (l.account_ack_rate, l.account_ack_burst),
            store: (l.account_store_rate, l.account_store_burst),
        });
        let (link, cluster_rx) = if self.config.cluster.enabled() {
            let (l, r) = crate::cluster::link(&self.config.cluster, metrics.clone());
            (Some(l), Some(r))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            cluster: cluster_rx
                .as_ref()
                .map(|_| crate::cluster::State::new(&self.config.cluster)),
            sub_quota: crate::sub_quota::SubQuota::new(
                (
                    self.config.limits.tenant_max_subscriptions,
                    self.config.limits.tenant_subscription_bytes,
                ),
                (
                    self.config.limits.max_total_subscriptions,
                    self.config.limits.total_subscription_bytes,
                ),
                (
                    self.config.limits.subscription_reserve_percent,
                    self.config.limits.subscription_reserve_tenants,
                ),
            ),
            frame_budget: FrameBudget::new(self.config.limits.large_frame_budget),
            quic_windows: crate::quic::SendWindows::new(self.config.limits.quic_send_window_total),
            quic_receive_windows: crate::quic::ReceiveWindows::new(
                self.config.limits.quic_receive_window_total,
            ),
            budget: Arc::new(crate::outbound::Budget::new(
                self.config.queue.total_max_bytes,
            )),
            account_rates,
            accounts,
            // Checked by `validate` above.
            auth_names: self.config.auth.relay_names().unwrap_or_default(),
            router: Router::new(store, metrics.clone(), link),
            config: self.config,
            metrics,
            plugins,
            registry: Arc::new(Registry::new(handshakes.clone())),
            handshakes,
            refusal_answers: Arc::new(tokio::sync::Semaphore::new(
                crate::handshakes::REFUSAL_ANSWERS,
            )),
            shutdown: watch::Sender::new(false),
            addrs,
            active_durables: Mutex::new(Default::default()),
            addr_table,
        });
        Ok(Relay {
            shared,
            listeners: self.listeners,
            tls,
            quic,
            cluster_rx,
        })
    }
}

/// A configured relay, ready to [`run`](Relay::run).
pub struct Relay {
    shared: Arc<Shared>,
    listeners: Listeners,
    tls: Option<TlsAcceptor>,
    quic: Option<quinn::ServerConfig>,
    /// The bridge's ends of the router's queues, until `run` starts the bridge.
    cluster_rx: Option<crate::cluster::Receivers>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("addrs", &self.shared.addrs)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts configuring a relay.
    pub fn builder(config: Config) -> RelayBuilder {
        RelayBuilder {
            config,
            listeners: Listeners::none(),
            plugins: Vec::new(),
            store: None,
        }
    }

    /// Binds the configured listeners and builds the relay with default plugins and store.
    pub async fn bind(config: Config) -> Result<Self, RelayError> {
        let listeners = Listeners::bind(&config).await?;
        let mut builder = Self::builder(config);
        if builder.config.cluster.jetstream() {
            // The cluster's JetStream stream is the store: opened (and waited for) before
            // the relay can name its sequence space in a Welcome.
            builder.config.validate()?;
            let store =
                crate::store::JetStreamStore::open(&builder.config.cluster, &builder.config.store)
                    .await
                    .map_err(RelayError::Store)?;
            builder = builder.store(Arc::new(store));
        }
        builder.listeners(listeners).build()
    }

    /// The shared state, for unit tests that drive a session directly.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The bound addresses.
    pub fn addrs(&self) -> BoundAddrs {
        self.shared.addrs
    }

    /// A handle for in-process connections, metrics and shutdown.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts connections until `shutdown` completes (or [`RelayHandle::shutdown`] is
    /// called), then stops accepting, sends `Close(ShuttingDown)` to every client, and
    /// waits for their queues to drain (bounded by `timeouts.drain_ms`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let Relay {
            shared,
            listeners,
            tls,
            quic,
            cluster_rx,
        } = self;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut stop = shared.shutdown.subscribe();
        // Stopped before accepting (while waiting for the shared account list).
        let mut stopped = false;
        let mut tasks = JoinSet::new();
        // The bridge runs apart from `tasks`: at shutdown it drains its forward queue after
        // the connections are gone instead of being aborted with the listeners.
        let mut bridge = None;
        if let Some(rx) = cluster_rx {
            // Connects in the background: the relay serves its own clients while NATS is
            // unreachable (forwarded envelopes are counted as dropped meanwhile).
            let client = crate::cluster::connect(
                &shared.config.cluster,
                shared.metrics.clone(),
                rx.slow.clone(),
                rx.connected.clone(),
            )
            .await?;
            let (drain_tx, drain_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(crate::cluster::run(shared.clone(), client, rx, drain_rx));
            bridge = Some((task, drain_tx));
        }
        if let Some(mut rx) = shared.router.store().take_sequenced() {
            // Messages the cluster stream numbered, in order, routed on this relay.
            let s = shared.clone();
            tasks.spawn(async move {
                while let Some(m) = rx.recv().await {
                    if let Err(e) = s.router.publish_sequenced(&m) {
                        tracing::debug!(error = %e, "cluster store: a stream message was not routed");
                    }
                }
            });
        }
        if let Some(mut rx) = shared.router.store().take_gone() {
            // Durables the store deleted for idleness: their owners go too (unless a Sub
            // created the name again meanwhile).
            let s = shared.clone();
            tasks.spawn(async move {
                while let Some(k) = rx.recv().await {
                    let store = s.router.store();
                    s.accounts.forget_durable_owner(&k.key_id, &k.name, || {
                        matches!(store.durable(&k), Ok(None))
                    });
                }
            });
        }
        if shared.config.cluster.shared_accounts {
            // Waits (retrying) until JetStream answers; a stop asked for meanwhile is obeyed.
            tokio::select! {
                follow = follow_accounts(shared.clone()) => {
                    tasks.spawn(follow);
                }
                _ = &mut shutdown => stopped = true,
                _ = stop.wait_for(|s| *s) => stopped = true,
            }
            if stopped {
                tracing::info!("stopped while waiting for the shared account list");
            }
        }
        tasks.spawn(lift_bans(shared.clone()));
        // The light runtime (see `hop`): shut down in the background when `run` ends.
        let light = crate::hop::Light::start(shared.config.runtime.light_workers)
            .map_err(RelayError::Runtime)?;
        let light_handle = light.as_ref().map(crate::hop::Light::handle);
        if let Some(light) = &light {
            tasks.spawn(light.watch(
                shared.metrics.clone(),
                shared.config.runtime.light_busy_percent,
            ));
        }
        let mut spawn = |l: Option<TcpListener>, kind: TransportKind| {
            if let Some(l) = l {
                tasks.spawn(accept_loop(
                    shared.clone(),
                    l,
                    kind,
                    tls.clone(),
                    light_handle.clone(),
                ));
            }
        };
        spawn(listeners.ws, TransportKind::Ws);
        spawn(listeners.tcp, TransportKind::Tcp);
        spawn(listeners.wss, TransportKind::Wss);
        spawn(listeners.tls, TransportKind::Tls);
        let mut quic_endpoint = None;
        if let (Some(socket), Some(server)) = (listeners.quic, quic) {
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|source| RelayError::Bind {
                listener: "quic",
                addr: shared
                    .addrs
                    .quic
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
            quic_endpoint = Some(endpoint.clone());
            tasks.spawn(crate::quic::accept_loop(shared.clone(), endpoint));
        }
        if let Some(l) = listeners.admin {
            tasks.spawn(admin::serve(l, shared.clone()));
        }
        // The account list is in place (read at start, or installed from JetStream above).
        let warned = warn_unbound_auth(&shared);
        if shared.accounts.file().is_some() {
            tasks.spawn(reload_accounts(shared.clone(), warned));
        }
        if !stopped {
            tokio::select! {
                _ = &mut shutdown => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        let open = shared.registry.len();
        tracing::info!(
            connections = open,
            "shutting down: no longer accepting; draining"
        );
        shared.shutdown.send_replace(true);
        tasks.abort_all();
        // Connections drain within `drain_ms` each, in parallel; allow a little more.
        let limit = shared.config.timeouts.drain() + std::time::Duration::from_millis(500);
        let deadline = tokio::time::Instant::now() + limit;
        if tokio::time::timeout(limit, shared.registry.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                left = shared.registry.len(),
                "drain deadline passed; dropping remaining connections"
            );
        }
        // QUIC: close what is left and wait (within the drain time) until every connection
        // has finished closing, so the UDP port is free when `run` returns (a restart in
        // the same process can bind it again).
        if let Some(endpoint) = quic_endpoint {
            endpoint.close(0u32.into(), b"relay stopped");
            let _ =
                tokio::time::timeout(shared.config.timeouts.drain(), endpoint.wait_idle()).await;
        }
        // The forward queue to NATS: envelopes accepted before the stop reach the other
        // relays, within what is left of the deadline.
        if let Some((task, drain)) = bridge {
            let _ = drain.send(());
            let abort = task.abort_handle();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, task).await.is_err() {
                abort.abort();
                tracing::warn!(
                    "drain deadline passed; envelopes not yet forwarded to NATS are dropped"
                );
            }
        }
        // Flush and close the store off the runtime (the writer thread commits what is queued).
        let store = shared.router.store().clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        // The auth-state lines the ended connections' claim holds wrote (their `used` lines)
        // reach the disk before the process may end: the writer thread is not waited for
        // otherwise. Bounded like the drain (a full disk keeps the writer retrying).
        if tokio::time::timeout(shared.config.timeouts.drain(), shared.accounts.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "drain deadline passed; auth-state lines not yet on disk (claims' last \
                 uses) are lost"
            );
        }
        drop(light);
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Installs the cluster's account list from JetStream (waiting, with warnings, until
/// JetStream answers: a relay with `auth = required` admits no one without it) and returns
/// the task that follows its later versions.
async fn follow_accounts(shared: Arc<Shared>) -> impl Future<Output = ()> + Send + 'static {
    use crate::store::jetstream::accounts;
    let cluster = shared.config.cluster.clone();
    let mut attempt = 0u32;
    let (stream, after) = loop {
        let r = async {
            let client = crate::cluster::connect_plain(&cluster)
                .await
                .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))?;
            let js = async_nats::jetstream::new(client);
            let stream = accounts::open(&js, &cluster).await?;
            let latest = accounts::latest(&stream, &cluster).await?;
            Ok::<_, crate::store::StoreError>((stream, latest))
        }
        .await;
        match r {
            Ok((stream, latest)) => {
                let after = match latest {
                    Some((seq, text)) => {
                        if let Err(e) = shared.accounts.install(&text) {
                            tracing::error!(error = %e, "cluster accounts: the list in JetStream is invalid; no account admitted until a valid one is written");
                        }
                        seq
                    }
                    None => {
                        tracing::warn!("cluster accounts: no account list in JetStream yet (whispeer-relay account add --config …)");
                        0
                    }
                };
                break (stream, after);
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "cluster accounts: JetStream not ready; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(
                    250 * u64::from(attempt.min(8)),
                ))
                .await;
            }
        }
    };
    let s = shared.clone();
    // Warned by `run` if keys were listed at start; a list with keys arriving later warns
    // here (once).
    let mut warned = shared.accounts.key_count() > 0;
    accounts::follow(stream, cluster, after, move |text| {
        if let Err(e) = s.accounts.install(text) {
            tracing::error!(error = %e, "cluster accounts: a new list in JetStream is invalid; the previous one stays in force, less the accounts and credentials it no longer names");
        }
        if !warned {
            warned = warn_unbound_auth(&s);
        }
    })
}

/// Reloads the account file when it changes (polled every `auth.reload_ms`) or on SIGHUP.
/// Warns when more relay accounts are listed than the store reserve is divided among
/// (`store.reserve_tenants`, read at start): past the reserve's line some accounts are not
/// sure of a share (review 28 finding 6).
fn warn_reserve_accounts(config: &Config, accounts: usize) {
    let s = &config.store;
    if config.auth.mode == crate::config::AuthMode::Required
        && s.reserve_percent > 0
        && accounts as u64 > s.reserve_tenants
    {
        tracing::warn!(
            accounts,
            reserve_tenants = s.reserve_tenants,
            "more relay accounts than store.reserve_tenants: once the store passes its \
             reserve's line, only reserve_tenants of them are sure of a share of the rest \
             (raise reserve_tenants and restart)"
        );
    }
}

/// Warns when account keys sign in without relay binding (`auth = required`, account keys
/// listed, `auth.names` empty): a relay that clients also sign in to with the same account
/// key can pass this relay's challenge on and sign in here as them (PROTOCOL §3.5.6, §10).
/// Whether it warned.
fn warn_unbound_auth(shared: &Shared) -> bool {
    let keys = shared.accounts.key_count();
    if shared.config.auth.mode != crate::config::AuthMode::Required
        || !shared.auth_names.is_empty()
        || keys == 0
    {
        return false;
    }
    tracing::warn!(
        account_keys = keys,
        "auth.names is empty: account-key sign-ins are not bound to this relay, so another \
         relay a client signs in to with the same account key can pass this relay's \
         challenge on and sign in here as that client (PROTOCOL §3.5.6). Set auth.names \
         (--auth-name HOST[:PORT], repeatable; WHISPEER_AUTH_NAMES) to every name clients \
         dial this relay by (clients must know relay-bound sign-ins)"
    );
    true
}

async fn reload_accounts(shared: Arc<Shared>, mut warned: bool) {
    let every = std::time::Duration::from_millis(shared.config.auth.reload_ms);
    let mut listed = shared.accounts.count();
    warn_reserve_accounts(&shared.config, listed);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let forced = match hup.as_mut() {
            Some(h) => tokio::select! {
                _ = h.recv() => true,
                _ = tokio::time::sleep(every) => false,
            },
            None => {
                tokio::time::sleep(every).await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tokio::time::sleep(every).await;
            false
        };
        let r = if forced {
            tracing::info!("SIGHUP: reloading the account list");
            shared.accounts.reload()
        } else {
            shared.accounts.reload_if_changed()
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "account list invalid, not reloaded: the previous one \
                stays in force (less the accounts and credentials it no longer names, once the \
                same text is read again a reload period later) until a \
                valid one is written; whispeer_relay_account_list_valid is 0 meanwhile");
        }
        let now = shared.accounts.count();
        if now != listed {
            listed = now;
            warn_reserve_accounts(&shared.config, listed);
            if !warned {
                warned = warn_unbound_auth(&shared);
            }
        }
    }
}

/// The testable entry point: runs a relay on bound `listeners` until `shutdown` completes.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    Relay::builder(config)
        .listeners(listeners)
        .build()?
        .run(shutdown)
        .await
}

/// A cloneable handle to a built relay.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

impl RelayHandle {
    /// Opens an in-process connection: send frames (no length prefix) on the sender,
    /// receive frames on the receiver. Dropping the sender closes the connection. Must be
    /// called inside a tokio runtime; the relay need not be running listeners.
    pub fn connect_in_process(&self) -> (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>) {
        let (to_relay, from_client) = mpsc::channel(256);
        let (to_client, from_relay) = mpsc::channel(256);
        let max = self.shared.config.limits.max_frame;
        self.serve(
            ChannelSource::new(from_client, max),
            ChannelSink::new(to_client),
            TransportKind::InProcess,
            None,
        );
        (to_relay, from_relay)
    }

    /// Serves a connection over any transport (spawns its task).
    pub fn serve<Src: FrameSource, Snk: FrameSink>(
        &self,
        source: Src,
        sink: Snk,
        transport: TransportKind,
        peer: Option<SocketAddr>,
    ) {
        tokio::spawn(conn::serve(
            self.shared.clone(),
            source,
            sink,
            transport,
            peer,
            None,
            None,
        ));
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The `/status` document.
    pub fn status(&self) -> admin::Status {
        admin::status(&self.shared)
    }

    /// The number of client connections open or in their handshake (what
    /// `max_connections` and `max_connections_per_addr` count), as a watch: an operator's
    /// tooling or a test waits on it (`wait_for`) instead of polling.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.addr_table.watch()
    }

    /// Test hook, not for embedders: every connection not yet welcomed ages by `by` as
    /// far as its eviction grace is concerned (`limits.max_connections`), so a test gets
    /// handshakes past their grace without sleeping (on a loaded machine a sleep could
    /// outlast their `hello_ms`). Connections admitted later are not aged.
    #[doc(hidden)]
    pub fn age_handshakes(&self, by: std::time::Duration) {
        self.shared.handshakes.advance(by);
    }

    /// Asks [`Relay::run`] to shut down gracefully.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// `light`: the light runtime, where accepted connections run until they flood (`hop`).
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    kind: TransportKind,
    tls: Option<TlsAcceptor>,
    light: Option<crate::hop::LightHandle>,
) {
    let mut bans = shared.addr_table.bans().watch();
    // Whether this listener has had a ban filter: its accepted sockets may inherit one.
    let mut filtered = false;
    let mut failures = crate::logging::AcceptFailures::new();
    loop {
        let accepted = tokio::select! {
            biased;
            changed = bans.changed() => {
                if changed.is_ok() {
                    filtered |= refilter(&shared, &listener, kind, &mut bans);
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                failures.accepted(&kind);
                x
            }
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning. Logged at most
                // once every 10 s while it lasts (`logging::AcceptFailures`).
                failures.failed(&kind, &e);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // A banned source address the listener's socket filter does not hold (it keeps
        // the newest bans only; none where it cannot be attached) or whose connection was
        // queued before its ban: closed before anything is spent on it, as QUIC drops
        // its attempts (`quic::accept_loop`).
        if shared.addr_table.banned(peer.ip()) {
            tracing::debug!(listener = %kind, "connection from a banned address closed at accept");
            continue;
        }
        // Counted from here, through the handshake, until the connection ends.
        let slot = match shared.addr_table.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                // Only the plain TCP listener can explain without a handshake; the others
                // (TLS, WebSocket) close, as does every listener for a churning address.
                let message = refused(&shared, kind, &why, peer.ip());
                // A ban this refusal struck is in force on this listener before the
                // connection closes.
                if bans.has_changed().unwrap_or(false) {
                    filtered |= refilter(&shared, &listener, kind, &mut bans);
                }
                // Told why by a task holding the socket up to `EVICTED_CLOSE`, counted in
                // no gate: at most `REFUSAL_ANSWERS` at once, the rest closed unanswered
                // (`Limits::connection_ceiling` counts them). The `Err` is counted sent
                // only once such a task has written it; the others, and a write that
                // failed (the peer gone) or timed out, count as unanswered.
                let permit = match message {
                    Some(message) if kind == TransportKind::Tcp => shared
                        .refusal_answers
                        .clone()
                        .try_acquire_owned()
                        .ok()
                        .map(|permit| (permit, message)),
                    _ => None,
                };
                match permit {
                    Some((permit, message)) => {
                        let metrics = shared.metrics.clone();
                        tokio::spawn(async move {
                            if answer_refusal(stream, message).await {
                                metrics
                                    .error_sent(whispeer_protocol::ErrorCode::TooManyConnections);
                            } else {
                                metrics.refused_unanswered();
                            }
                            drop(permit);
                        });
                    }
                    None => shared.metrics.refused_unanswered(),
                }
                continue;
            }
        };
        if filtered {
            crate::syn_ban::clear_inherited(&stream);
        }
        let _ = stream.set_nodelay(true);
        // An address that opened or holds many connections (churning, a connection flood)
        // handshakes on the main runtime: only a client's few connections start light.
        // So do all while the light runtime is full (`hop::LightHandle::is_full`).
        let light = light.as_ref().filter(|l| !slot.busy() && !l.is_full());
        let Some(light) = light else {
            tokio::spawn(handshake(
                shared.clone(),
                stream,
                peer,
                kind,
                tls.clone(),
                slot,
            ));
            continue;
        };
        // On the light runtime's reactor too: its readiness must not wait for the main
        // runtime's busy workers to poll their driver.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand an accepted socket over");
                continue;
            }
        };
        let (metrics, shared, tls) = (shared.metrics.clone(), shared.clone(), tls.clone());
        let main = tokio::runtime::Handle::current();
        light.handle().spawn(crate::hop::Hop::new(
            async move {
                match TcpStream::from_std(std_stream) {
                    Ok(stream) => handshake(shared, stream, peer, kind, tls, slot).await,
                    Err(e) => tracing::debug!(error = %e, "cannot register an accepted socket"),
                }
            },
            main,
            metrics,
        ));
    }
}

/// Rebuilds `listener`'s ban filter from the latest list; true if a filter is now on it.
fn refilter(
    shared: &Shared,
    listener: &TcpListener,
    kind: TransportKind,
    bans: &mut watch::Receiver<crate::syn_ban::BanList>,
) -> bool {
    let list = bans.borrow_and_update().clone();
    let applied = crate::syn_ban::apply(listener, &list, shared.addr_table.v6_prefix());
    if !applied && !list.is_empty() {
        tracing::debug!(listener = %kind, "no socket filter here: banned addresses are refused at accept");
    }
    applied && !list.is_empty()
}

/// Lifts each address ban when it ends (the accept loops then rebuild their filters) and
/// keeps the `whispeer_relay_addr_banned` gauge.
async fn lift_bans(shared: Arc<Shared>) {
    let bans = shared.addr_table.bans();
    let mut list = bans.watch();
    loop {
        shared
            .metrics
            .set_addr_banned(list.borrow_and_update().len());
        let next = bans.expire(std::time::Instant::now());
        tokio::select! {
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            changed = list.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Bytes a client may send before its TLS handshake completes. rustls joins a handshake
/// message (the ClientHello) of up to 64 KiB from its records and holds it until complete:
/// a stranger could park ~64 KiB per connection until `hello_ms`, where TCP holds at most
/// 4 KiB before `Welcome` (review finding). A real ClientHello, post-quantum key shares
/// included, is 2–3 KiB, and the client's whole handshake little more (no client
/// certificates, no early data).
pub(crate) const TLS_HANDSHAKE_READ_MAX: usize = 16 * 1024;

/// A socket whose reads fail once more than a bound was read, until [`lift`](Self::lift)ed:
/// under the TLS acceptor, so a handshake that sends more than
/// [`TLS_HANDSHAKE_READ_MAX`] fails (its connection closed) instead of being buffered.
#[derive(Debug)]
pub(crate) struct HandshakeCap<S> {
    inner: S,
    /// Bytes still allowed (`None`: lifted).
    left: Option<usize>,
}

impl<S> HandshakeCap<S> {
    pub(crate) fn new(inner: S, max: usize) -> Self {
        Self {
            inner,
            left: Some(max),
        }
    }

    /// The handshake is done: reads are no longer counted.
    pub(crate) fn lift(&mut self) {
        self.left = None;
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HandshakeCap<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (std::task::Poll::Ready(Ok(())), Some(left)) = (&r, self.left) {
            let n = buf.filled().len() - before;
            if n > left {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "more than {TLS_HANDSHAKE_READ_MAX} bytes before the TLS handshake \
                         completed"
                    ),
                )));
            }
            self.left = Some(left - n);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HandshakeCap<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a connection refused before its handshake (over the per-address or global cap)
/// and returns what to tell the client: `None` for a churning address or network, which
/// is closed unanswered ([`Refusal::Churning`], [`Refusal::NetworkChurning`]) — no task
/// spawned to answer it. The caller counts the refusal told (`Metrics::error_sent`) or
/// unanswered (`Metrics::refused_unanswered`): only it knows whether an answer goes out.
pub(crate) fn refused(
    shared: &Shared,
    kind: TransportKind,
    why: &Refusal,
    peer: std::net::IpAddr,
) -> Option<String> {
    shared.metrics.connection_refused(why.cap());
    tracing::debug!(listener = %kind, ?why, "connection refused before its handshake");
    if *why == Refusal::Churning {
        if let Some(length) = shared.addr_table.strike(peer) {
            shared.metrics.addr_banned();
            shared
                .metrics
                .set_addr_banned(shared.addr_table.bans().active());
            tracing::warn!(
                addr = %crate::store::source_address(peer, shared.addr_table.v6_prefix()),
                ban_s = length.as_secs(),
                "connection churn: this source address's new connections are dropped before accept for a while (addr_churn_ban_secs)"
            );
        }
    }
    if *why == Refusal::NetworkChurning {
        if let Some((net, length)) = shared.addr_table.strike_network(peer) {
            shared.metrics.addr_banned();
            tracing::warn!(
                network = %net,
                ban_s = length.as_secs(),
                "connection churn from many addresses of one network: its new connections are closed at accept for a while (addr_churn_ban_secs)"
            );
        }
    }
    why.explanation()
}

/// Answers a refused plain TCP connection with a fatal `Err(too_many_connections)` saying
/// which cap, then closes it. Returns whether the `Err` was written (within
/// `EVICTED_CLOSE`).
async fn answer_refusal(mut stream: TcpStream, message: String) -> bool {
    use tokio::io::AsyncWriteExt;
    use whispeer_protocol::frame::ErrFrame;
    use whispeer_protocol::{codec, ErrorCode, Frame};
    let frame = codec::encode_prefixed(&Frame::Err(ErrFrame {
        code: ErrorCode::TooManyConnections,
        message,
        fatal: true,
        sub_id: None,
        publish_id: None,
    }));
    let deadline = tokio::time::Instant::now() + crate::handshakes::EVICTED_CLOSE;
    let written = matches!(
        tokio::time::timeout_at(deadline, stream.write_all(&frame)).await,
        Ok(Ok(()))
    );
    if written {
        let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    }
    written
}

/// Tells a plain TCP connection evicted before its handshake why ([`answer_refusal`]),
/// counting the `Err` as the accept loop counts its refusals' answers: sent
/// (`Metrics::error_sent`) only once written, else the connection closed unanswered
/// (`Metrics::refused_unanswered`: the peer gone, or the write timed out). It was counted
/// sent before the write, a peer already gone included.
async fn answer_eviction(metrics: &Metrics, stream: TcpStream) {
    if answer_refusal(stream, crate::handshakes::EVICTED.into()).await {
        metrics.error_sent(whispeer_protocol::ErrorCode::TooManyConnections);
    } else {
        metrics.refused_unanswered();
    }
}

/// Over its address's connect rate (`addr_connect_rate`), a new connection waits before
/// its handshake — its place in the per-address count held meanwhile, so the waits of one
/// address stay bounded — instead of being refused: connection churn costs the relay a
/// bounded rate of handshakes per address. Returns false if the relay began shutting down
/// during the wait.
pub(crate) async fn connect_wait(shared: &Shared, slot: &AddrSlot) -> bool {
    let Some(wait) = slot.wait() else {
        return true;
    };
    shared.metrics.throttled();
    let mut stop = shared.shutdown.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// `fut`, unless a newer connection evicts this one first (the relay is full and it is
/// the oldest not yet welcomed, [`crate::handshakes`]): then the reason, as an `Err`.
pub(crate) async fn unless_evicted<F: Future>(
    ticket: &Ticket,
    fut: F,
) -> Result<F::Output, String> {
    tokio::select! {
        biased;
        () = ticket.evicted() => Err(crate::handshakes::EVICTED.into()),
        out = fut => Ok(out),
    }
}

/// [`connect_wait`] for a TCP connection, which also ends — its place given back at once —
/// when the client hangs up meanwhile: a churning client's abandoned connects held their
/// address's places (and counted against its cap) for the whole wait.
async fn connect_wait_tcp(shared: &Shared, slot: &AddrSlot, stream: &TcpStream) -> bool {
    if slot.wait().is_none() {
        return true;
    }
    let gone = async {
        let mut one = [0u8; 1];
        match stream.peek(&mut one).await {
            // Bytes came (its Hello): it is still there; the wait decides.
            Ok(n) if n > 0 => std::future::pending::<()>().await,
            _ => {} // end of stream or an error: the client is gone
        }
    };
    tokio::select! {
        ok = connect_wait(shared, slot) => ok,
        () = gone => false,
        () = slot.ticket().evicted() => false,
    }
}

/// The WebSocket follower (`transport::ws_gate`) and tungstenite disagree on where the
/// upgrade request ended: the client's frame sizes could not be followed, so it is not
/// served (no client of this crate, a browser or a conforming library gets here).
const UPGRADE_OUT_OF_STEP: &str =
    "WebSocket upgrade request not delimited as the frame follower expects";

/// Upgrades `stream` to a WebSocket by `deadline` (the frame follower under tungstenite
/// from the first byte), then serves it; `ws` and `wss` alike.
async fn serve_ws<S>(
    shared: &Arc<Shared>,
    stream: S,
    kind: TransportKind,
    peer: SocketAddr,
    slot: AddrSlot,
    since: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let max = shared.config.limits.max_frame;
    let gate = WsGate::new(shared.frame_budget.clone(), slot.addr());
    // In a block of its own: a local once borrowed (`get_ref`) stays in the future's state
    // until its scope ends, so the stream would sit in the task beside the one `serve` holds
    // (hostile_memory::idle_connections_cost_at_most_15_kib_each).
    let (src, snk) = {
        let ws = unless_evicted(
            slot.ticket(),
            tokio::time::timeout_at(
                deadline,
                // Boxed: the upgrade's state (the stream inside tungstenite's handshake
                // machine) is freed once it completes, not kept in this task's future
                // at its own size for the connection's life.
                Box::pin(tokio_tungstenite::accept_async_with_config(
                    ReadAhead::new(stream).following(Follower::new(gate.clone(), max)),
                    Some(ws::ws_config(max)),
                )),
            ),
        )
        .await?
        .map_err(|_| "WebSocket handshake timed out".to_string())?
        .map_err(|e| format!("WebSocket handshake failed: {e}"))?;
        if ws.get_ref().upgrade_unfinished() {
            return Err(UPGRADE_OUT_OF_STEP.into());
        }
        ws::split(ws, gate)
    };
    conn::serve(
        shared.clone(),
        src,
        snk,
        kind,
        Some(peer),
        Some(slot),
        Some(since),
    )
    .await;
    Ok(())
}

/// Completes the transport handshake (TLS, WebSocket upgrade) within `hello_ms`, then
/// serves the connection.
async fn handshake(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    kind: TransportKind,
    tls: Option<TlsAcceptor>,
    slot: AddrSlot,
) {
    if !connect_wait_tcp(&shared, &slot, &stream).await {
        // Evicted while it waited (over its connect rate): told why on plain TCP, within
        // `EVICTED_CLOSE`, its slot held until then (the other listeners have no protocol
        // to speak before their handshake).
        if kind == TransportKind::Tcp && slot.ticket().is_evicted() {
            answer_eviction(&shared.metrics, stream).await;
        }
        return;
    }
    // The source address whose share of the large-frame budget the connection draws on.
    let addr = slot.addr();
    let ticket = slot.ticket().clone();
    let mut slot = Some(slot);
    let max = shared.config.limits.max_frame;
    // One deadline for the whole handshake (TLS, the WebSocket upgrade) and the Hello:
    // each phase used to get `hello_ms` of its own, so a slow stranger held its place
    // three times as long over wss.
    let since = tokio::time::Instant::now();
    let deadline = since + shared.config.timeouts.hello();
    let peer_s = Some(peer);
    let result: Result<(), String> = async {
        match kind {
            TransportKind::Tcp => {
                let (r, w) = stream.into_split();
                // Each transport's serve loop boxed at its own size: inline, the task held
                // the largest (TLS's) for every connection, 13 KiB per idle connection
                // (test hostile_memory::idle_connections_cost_at_most_15_kib_each).
                Box::pin(conn::serve(
                    shared.clone(),
                    StreamSource::new(r, max).with_budget(shared.frame_budget.clone(), addr),
                    StreamSink::new(w),
                    kind,
                    peer_s,
                    slot.take(),
                    Some(since),
                ))
                .await;
            }
            TransportKind::Ws => {
                let slot = slot.take().expect("one connection, one slot");
                Box::pin(serve_ws(&shared, stream, kind, peer, slot, since, deadline)).await?;
            }
            TransportKind::Tls | TransportKind::Wss => {
                let acceptor = tls.ok_or("TLS listener without TLS configuration")?;
                let capped = HandshakeCap::new(stream, TLS_HANDSHAKE_READ_MAX);
                // In a block of its own: a local once borrowed (`lift`) stays in the
                // future's state until its scope ends, and the TLS stream (rustls' state,
                // ~1.5 KiB) would then sit in every connection's task for its whole life,
                // whatever its transport (hostile_memory::idle_connections_cost_at_most_15_kib_each).
                let tls_stream = {
                    let mut accepted = unless_evicted(
                        &ticket,
                        tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(capped))),
                    )
                    .await?
                    .map_err(|_| "TLS handshake timed out".to_string())?
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                    accepted.get_mut().0.lift();
                    accepted
                };
                if kind == TransportKind::Tls {
                    let (r, w) = tokio::io::split(tls_stream);
                    Box::pin(conn::serve(
                        shared.clone(),
                        StreamSource::new(r, max).with_budget(shared.frame_budget.clone(), addr),
                        StreamSink::new(w),
                        kind,
                        peer_s,
                        slot.take(),
                        Some(since),
                    ))
                    .await;
                } else {
                    let slot = slot.take().expect("one connection, one slot");
                    Box::pin(serve_ws(
                        &shared, tls_stream, kind, peer, slot, since, deadline,
                    ))
                    .await?;
                }
            }
            // Not accepted here (in-process channels, QUIC's own listener).
            TransportKind::InProcess | TransportKind::Quic => {}
        }
        Ok(())
    }
    .await;
    if let Err(why) = result {
        // Escaped (`?`): the library errors in `why` may carry the peer's bytes.
        tracing::debug!(%peer, listener = %kind, ?why, "connection dropped during handshake");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The eviction answer of a connection waiting over its connect rate (`handshake`)
    /// counts its `Err` sent only once written, as the accept loop's refusal answers do:
    /// a peer that reads gets the `Err` and it counts in `errors_total`; a peer already
    /// gone (reset) gets nothing and counts as closed unanswered. Before, the `Err` was
    /// counted sent before the write: 1 in `errors_total` for the reset peer too.
    #[tokio::test]
    async fn an_eviction_answer_counts_its_err_sent_only_once_written() {
        const ERRS: &str = "whispeer_relay_errors_total{kind=\"too_many_connections\"}";
        const SILENT: &str = "whispeer_relay_connections_refused_unanswered_total";
        let count = |m: &Metrics, name: &str| -> u64 {
            m.render_prometheus(0)
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();

        // A peer that reads: told why, counted sent.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        answer_eviction(&metrics, server).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let mut dec = whispeer_protocol::codec::FrameDecoder::new(1 << 20);
        dec.buffer_mut().extend_from_slice(&got);
        let frame = dec.next_frame().unwrap().expect("a whole frame");
        match whispeer_protocol::Frame::decode(&frame).unwrap() {
            whispeer_protocol::Frame::Err(e) => {
                assert_eq!(e.code, whispeer_protocol::ErrorCode::TooManyConnections);
                assert!(e.fatal);
            }
            other => panic!("expected Err(too_many_connections), got {other:?}"),
        }
        assert_eq!((count(&metrics, ERRS), count(&metrics, SILENT)), (1, 0));

        // A peer gone (it reset the connection): nothing written, counted unanswered.
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        // Until the reset has arrived (what an evicted peer gone meanwhile looks like).
        let mut one = [0u8; 1];
        loop {
            server.readable().await.unwrap();
            match server.try_read(&mut one) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
                Ok(n) => panic!("expected a reset, read {n} bytes"),
            }
        }
        answer_eviction(&metrics, server).await;
        assert_eq!(
            (count(&metrics, ERRS), count(&metrics, SILENT)),
            (1, 1),
            "the reset peer's Err is not counted sent"
        );
    }

    /// A plain `Hello` with its length prefix, as a TCP client sends it.
    fn hello_prefixed() -> bytes::Bytes {
        whispeer_protocol::codec::encode_prefixed(&whispeer_protocol::frame::Frame::Hello(
            whispeer_protocol::frame::Hello {
                versions: vec![whispeer_protocol::frame::PROTOCOL_VERSION],
                features: 0,
                client: None,
                auth: None,
                account: None,
            },
        ))
    }

    /// A banned address the listener's socket filter does not hold (the filter keeps the
    /// newest bans only: here 127.0.0.1's ban is older than 4,500 others) is closed at
    /// accept, before a `Hello` is read (fails without the check: served, a `Welcome`). Before, the accept loop never asked: such an address
    /// churned at full cost although the log said it was refused at accept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_banned_address_the_filter_does_not_hold_is_closed_at_accept() {
        let relay = Relay::bind(Config::ephemeral()).await.unwrap();
        let shared = relay.shared();
        let tcp = relay.addrs().tcp.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(relay.run(async {
            let _ = stopped.await;
        }));
        // 4,500 bans newer than 127.0.0.1's (dated ahead: a first ban lasts 1 s, less
        // than these strikes take in a debug build), then 127.0.0.1's.
        let ahead = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for i in 0..4_500u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            let at = ahead + std::time::Duration::from_micros(u64::from(i));
            assert!(shared.addr_table.bans().strike(ip.into(), at).is_some());
        }
        assert!(shared
            .addr_table
            .strike("127.0.0.1".parse().unwrap())
            .is_some());
        let list = shared.addr_table.bans().watch().borrow().clone();
        assert!(
            !list.contains(&"127.0.0.1".parse().unwrap()),
            "the filters' list holds the newest bans only"
        );
        // The connection completes (the filter lets it through) and is closed unanswered.
        let mut c = tokio::net::TcpStream::connect(tcp).await.unwrap();
        let _ = c.write_all(&hello_prefixed()).await;
        // Served, it would get a `Welcome` and stay open; closed, the read ends at once.
        let mut answer = [0u8; 256];
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), c.read(&mut answer))
            .await
            .expect("closed at accept");
        assert!(
            !matches!(read, Ok(n) if n > 0),
            "a banned address was served: {read:?}"
        );
        let _ = stop.send(());
        run.await.unwrap().unwrap();
    }

    /// Refused plain TCP connections are told why by at most `REFUSAL_ANSWERS` tasks at
    /// once (each holds its socket up to `EVICTED_CLOSE`, counted in no gate); beyond, a
    /// refused connection is closed unanswered. Here every permit is taken: a newcomer to
    /// a relay full of one session is closed without a byte; with the permits back the
    /// next is told `Err(too_many_connections)`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_connections_are_told_why_by_a_bounded_number_of_tasks() {
        let mut config = Config::ephemeral();
        config.limits.max_connections = 1;
        let relay = Relay::bind(config).await.unwrap();
        let shared = relay.shared();
        let tcp = relay.addrs().tcp.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(relay.run(async {
            let _ = stopped.await;
        }));
        // The one place: a welcomed session (never evicted).
        let mut session = tokio::net::TcpStream::connect(tcp).await.unwrap();
        session.write_all(&hello_prefixed()).await.unwrap();
        let mut welcome = [0u8; 256];
        let n = session.read(&mut welcome).await.unwrap();
        assert!(n > 0, "no Welcome");
        let limit = std::time::Duration::from_secs(30);
        let answer = |mut c: tokio::net::TcpStream| async move {
            let mut b = [0u8; 512];
            tokio::time::timeout(limit, c.read(&mut b))
                .await
                .expect("refused connection left open")
                .unwrap_or(0)
        };
        let permits = shared
            .refusal_answers
            .clone()
            .acquire_many_owned(crate::handshakes::REFUSAL_ANSWERS as u32)
            .await
            .unwrap();
        let c = tokio::net::TcpStream::connect(tcp).await.unwrap();
        assert_eq!(answer(c).await, 0, "told why with no permit left");
        drop(permits);
        let c = tokio::net::TcpStream::connect(tcp).await.unwrap();
        assert!(answer(c).await > 0, "not told why with permits back");
        let _ = stop.send(());
        run.await.unwrap().unwrap();
    }

    /// A connection an embedder serves with its peer's address (`RelayHandle::serve`)
    /// counts in that address's network for the eviction's fair share (fails without:
    /// every such connection counted as one network, and the oldest, 192.0.2.1's, was
    /// evicted although 10.0.0.0/24 held the most places). `max_connections` 3: 192.0.2.1,
    /// then 10.0.0.1 and 10.0.0.2, aged past their grace; a fourth from 10.0.0.3 evicts
    /// 10.0.0.1, the oldest of the network holding the most.
    #[tokio::test]
    async fn an_embedder_served_connection_counts_in_its_peers_network() {
        let mut config = Config::ephemeral();
        config.limits.max_connections = 3;
        config.timeouts.hello_ms = 60_000;
        let relay = Relay::bind(config).await.unwrap();
        let (shared, handle) = (relay.shared(), relay.handle());
        let mut conns = Vec::new();
        for (n, ip) in ["192.0.2.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .enumerate()
        {
            if n == 3 {
                handle.age_handshakes(std::time::Duration::from_secs(3));
            }
            let (to_relay, from_client) = mpsc::channel(16);
            let (to_client, from_relay) = mpsc::channel(16);
            handle.serve(
                ChannelSource::new(from_client, 4096),
                ChannelSink::new(to_client),
                TransportKind::Tcp,
                Some(SocketAddr::new(ip.parse().unwrap(), 4000)),
            );
            conns.push((to_relay, from_relay));
            // Registered in this order: the first is the oldest. (Not awaited for the
            // fourth: it evicts one, which closes as soon as its Err is written, so the
            // registry may never hold four.)
            while n < 3 && shared.registry.len() < n + 1 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let told = tokio::time::timeout(std::time::Duration::from_secs(30), conns[1].1.recv())
            .await
            .expect("10.0.0.1 was not evicted")
            .expect("an Err frame");
        assert!(
            String::from_utf8_lossy(&told).contains("evicted"),
            "{told:?}"
        );
        for (i, (_, rx)) in conns.iter_mut().enumerate() {
            if i != 1 {
                assert!(rx.try_recv().is_err(), "connection {i} was told something");
            }
        }
    }

    /// The registry counts only the places it admitted: a connection it refused (over the
    /// limit) stays recorded while it closes, but holds no place — neither one a newcomer
    /// is refused for, nor one that makes it evict (fails without: the refused entry made
    /// the registry full, and the newcomer was refused with no place held by anyone).
    #[test]
    fn refused_connections_hold_no_place_in_the_registry() {
        use crate::config::SlowConsumerPolicy;
        use crate::outbound::Budget;
        let metrics = Arc::new(Metrics::new());
        let handshakes = Arc::new(Handshakes::new(
            metrics,
            std::time::Duration::from_secs(3600),
        ));
        let registry = Arc::new(Registry::new(handshakes.clone()));
        let out = || {
            Arc::new(Outbound::new(
                16,
                1 << 16,
                SlowConsumerPolicy::Drop,
                Arc::new(Budget::new(0)),
            ))
        };
        let register = |max| {
            let (id, admitted, ticket) = registry.register(&out(), max, None);
            (admitted, registry.guard(id, admitted, ticket))
        };
        let (admitted, first) = register(1);
        assert!(admitted);
        // Full, the first within its grace: refused, recorded while it closes.
        let (admitted, refused) = register(1);
        assert!(!admitted);
        assert_eq!(registry.len(), 2);
        drop(first);
        // One place, none held: admitted although the refused one is still closing.
        let (admitted, second) = register(1);
        assert!(admitted, "a refused connection held a place");
        assert_eq!(registry.len(), 2);
        // And it is full again: the refused entry did not count as lingering either.
        let (admitted, third) = register(1);
        assert!(!admitted);
        drop((refused, second, third));
        assert_eq!(registry.len(), 0);
        assert_eq!(registry.lock().refused, 0);
        assert_eq!(handshakes.lingering(Gate::Registry), 0);
    }
}
